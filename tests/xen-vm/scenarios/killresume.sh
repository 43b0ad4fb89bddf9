#!/bin/sh
# timeout: 600
# Crash-exact resume on real Xen: `xenbackd serve` serves a qdisk to dom0's
# own xen-blkfront (a file in tmpfs); ten times, while a direct 16 MiB write
# of a new pattern and a direct read of a known region run through
# /dev/xvda, the daemon is killed with SIGKILL at a random moment and a new
# one started. Each round the write must complete with its data on xvda and
# in the backing file, the read must return the known data, and neither dd
# may see an I/O error; at the end the kernel must have logged no blkfront
# error and every new daemon must have resumed (from the request journal in
# /run/xenbackd/rings).
. /test/lib/vbd.sh
DEV=/dev/xvda
DEVID=51712
ROUNDS=${KILLRESUME_ROUNDS:-10}
. /test/lib/checks.sh
checks_begin killresume KILLRESUME
md5() { md5sum | cut -d' ' -f1; }
finish() {
    xenbackd_log_end
    checks_end
}

if ! xenbackd_start; then bad "killresume: $XENBACKD_WHY"; finish; fi
step "xenbackd serve pid $XENBACKD_PID"
SIZE_MB=64
dd if=/dev/zero of=/tmp/disk.img bs=1M count=$SIZE_MB 2>/dev/null
vbd_attach qdisk 0 $DEVID "aio:/tmp/disk.img" || { bad "xenstore writes"; finish; }
wait_for xvda 30 is_blk $DEV || { bad "$DEV did not appear"; finish; }
ok "$DEV appeared after ${WAITED}s"
# The known region the reads check: 16 MiB at 32 MiB.
dd if=/dev/urandom of=/tmp/known bs=1M count=16 2>/dev/null
KNOWN=$(md5 < /tmp/known)
dd if=/tmp/known of=$DEV bs=1M seek=32 oflag=direct conv=fsync 2>/dev/null || bad "write of the known region"

kerr='I/O error|for further use|wrong operation|op failed'
dmesg_before=$(dmesg | grep -E 'xvda|blkfront' | grep -Eic "$kerr")
resumed=0
for round in $(seq 1 $ROUNDS); do
    dd if=/dev/urandom of=/tmp/pattern bs=1M count=16 2>/dev/null
    PAT=$(md5 < /tmp/pattern)
    dd if=/tmp/pattern of=$DEV bs=64k oflag=direct conv=fsync 2>/tmp/dd-w.err & wpid=$!
    dd if=$DEV of=/tmp/readback bs=64k skip=512 count=256 iflag=direct 2>/tmp/dd-r.err & rpid=$!
    # 0.1 to 1.0 s into the I/O
    sleep "0.$(( $(od -An -N1 -tu1 /dev/urandom) % 9 + 1 ))"
    kill -9 $XENBACKD_PID 2>/dev/null
    wait $XENBACKD_PID 2>/dev/null
    before=$(grep -c "resuming it" /tmp/xenbackd.log)
    if ! xenbackd_start; then bad "round $round: xenbackd did not start again: $XENBACKD_WHY"; break; fi
    step "round $round: killed, new serve pid $XENBACKD_PID"
    if wait_for "dd across the kill" 60 eval "! kill -0 $wpid 2>/dev/null && ! kill -0 $rpid 2>/dev/null"; then
        wait $wpid; wrc=$?
        wait $rpid; rrc=$?
        [ $wrc = 0 ] || bad "round $round: the write failed: $(cat /tmp/dd-w.err)"
        [ $rrc = 0 ] || bad "round $round: the read failed: $(cat /tmp/dd-r.err)"
    else bad "round $round: I/O still blocked 60s after the new daemon started"; kill $wpid $rpid; break; fi
    got=$(dd if=$DEV bs=1M count=16 iflag=direct 2>/dev/null | md5)
    sync
    file=$(dd if=/tmp/disk.img bs=1M count=16 2>/dev/null | md5)
    rb=$(md5 < /tmp/readback)
    if [ "$got" = "$PAT" ] && [ "$file" = "$PAT" ] && [ "$rb" = "$KNOWN" ]; then
        ok "round $round: write and read across the kill intact"
    else bad "round $round: xvda $got, file $file (want $PAT); read $rb (want $KNOWN)"; fi
    [ "$(grep -c "resuming it" /tmp/xenbackd.log)" -gt "$before" ] && resumed=$((resumed + 1))
done
[ $resumed = $ROUNDS ] && ok "every new daemon resumed the device ($resumed)" || bad "$resumed of $ROUNDS new daemons resumed"
replayed=$(grep -c "again from the journal" /tmp/xenbackd.log)
step "$replayed resumes re-executed requests from the journal"
after=$(dmesg | grep -E 'xvda|blkfront' | grep -Eic "$kerr")
if [ "$after" = "$dmesg_before" ]; then ok "no blkfront error in the kernel log"
else bad "dom0 kernel complained: $(dmesg | grep -E 'xvda|blkfront' | grep -Ei "$kerr" | tail -3 | tr '\n' ';')"; fi
[ "$(xenstore-read $VBD_B/state)" = 4 ] && ok "backend Connected at the end" || bad "backend state $(xenstore-read $VBD_B/state)"
ls /run/xenbackd/rings/ 2>/dev/null | sed 's/^/    journal: /'
vbd_detach || bad "detach"
wait_for "xvda gone" 20 no_blk $DEV && ok "detached" || bad "$DEV still present after detach"
[ -z "$(ls /run/xenbackd/rings/ 2>/dev/null)" ] && ok "journals removed with the device" || bad "journals left: $(ls /run/xenbackd/rings/)"
finish
