# Shell helpers every scenario's verdict uses (busybox sh). Source it, then
# call `checks_begin NAME TAG`:
#   ok TEXT / bad TEXT   a passed / failed check (counted)
#   step TEXT            a progress line "TAG [uptime]: TEXT"
#   checks_end           "NAME: N checks passed, M failed", then PASS/FAIL
#                        NAME and exit 0/1 (0 only if something passed)
#   xenbackd_log_end     stops `xenbackd serve`, prints its log's tail, a
#                        panic in it is a failure
npass=0; nfail=0
checks_begin() { CHECKS_NAME=$1; CHECKS_TAG=$2; }
ok() { echo "PASS $*"; npass=$((npass + 1)); }
bad() { echo "FAIL $*"; nfail=$((nfail + 1)); }
step() { echo "$CHECKS_TAG [$(cut -d' ' -f1 /proc/uptime)]: $*"; }
checks_end() {
    echo "$CHECKS_NAME: $npass checks passed, $nfail failed"
    if [ "$nfail" = 0 ] && [ "$npass" -gt 0 ]; then echo "PASS $CHECKS_NAME"; exit 0; fi
    echo "FAIL $CHECKS_NAME"; exit 1
}
xenbackd_log_end() {
    xenbackd_stop
    echo "----- xenbackd log (tail) -----"; tail -25 /tmp/xenbackd.log 2>/dev/null
    if grep -qi 'panick' /tmp/xenbackd.log 2>/dev/null; then bad "xenbackd panicked"; fi
}
