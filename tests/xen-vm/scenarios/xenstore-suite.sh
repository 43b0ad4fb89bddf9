#!/bin/sh
# timeout: 300
# Xen's own xenstore test program, test-xenstore (tools/tests/xenstore, from
# the image's xen-utils-4.17), in one boot against both xenstoreds, each over
# its unix socket: Xen's C xenstored (/run/xenstored/socket; its trace file,
# -T in dom0-init.sh, is switched off with `xenstore-control log off` for the
# run and on again after) and the simulated one, `xenbackd xenstored
# --socket`. For each: every test XS_SUITE_ITERS times (default 20), twice,
# in the order C sim sim C, and the random mode for XS_SUITE_RANDOM seconds
# (default 10) once. Both must pass every test; the ns per operation of both
# are printed side by side (TCG's figures: compare them with each other, not
# with the host's).
TX=/usr/lib/xen-4.17/bin/test-xenstore
ITERS=${XS_SUITE_ITERS:-20}
RSECS=${XS_SUITE_RANDOM:-10}
CSOCK=/run/xenstored/socket
OSOCK=/tmp/sim-xenstored.sock
. /test/lib/checks.sh
checks_begin xenstore-suite XSSUITE
OPID=
finish() {
    [ -n "$OPID" ] && kill "$OPID" 2>/dev/null
    xenstore-control log on >/dev/null 2>&1
    checks_end
}
[ -x "$TX" ] || { bad "no $TX in the image (tests/xen-vm/build-image copies it)"; finish; }
[ -S "$CSOCK" ] || { bad "no C xenstored socket $CSOCK"; finish; }
ntests=$("$TX" -l | grep -c ':')

/test/xenbackd xenstored --socket "$OSOCK" > /tmp/sim-xenstored.log 2>&1 &
OPID=$!
i=0; while [ ! -S "$OSOCK" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -S "$OSOCK" ]; then
    cat /tmp/sim-xenstored.log
    grep -q 'unknown command' /tmp/sim-xenstored.log && bad "this xenbackd has no \`xenstored\` command"
    bad "xenbackd xenstored did not create $OSOCK"; finish
fi
# libxenstore falls back to /dev/xen/xenbus (the C xenstored) when a socket
# fails: make sure each socket reaches the daemon meant.
XENSTORED_PATH=$OSOCK xenstore-write /xenstore-suite-marker sim
if [ "$(XENSTORED_PATH=$OSOCK xenstore-read /xenstore-suite-marker 2>&1)" = sim ] &&
    ! XENSTORED_PATH=$CSOCK xenstore-read /xenstore-suite-marker >/dev/null 2>&1; then
    ok "the two sockets reach two different xenstoreds"
else
    bad "XENSTORED_PATH=$OSOCK does not reach the simulated xenstored alone"; finish
fi
XENSTORED_PATH=$OSOCK xenstore-rm /xenstore-suite-marker

# suite SIDE SOCKET ROUND: test-xenstore -i into /tmp/SIDE-ROUND.out, then
# (first round only) -r
suite() {
    side=$1; sock=$2; round=$3; out=/tmp/$side-$round.out
    echo "== $side, round $round: test-xenstore -i $ITERS (XENSTORED_PATH=$sock)"
    XENSTORED_PATH=$sock timeout 240 "$TX" -i "$ITERS" > "$out" 2>&1
    rc=$?
    sed 's/^/    /' "$out"
    n=$(grep -c ': avg: ' "$out")
    if [ "$rc" = 0 ] && [ "$n" = "$ntests" ] && ! grep -q ': failed' "$out"; then
        ok "$side, round $round: $n of $ntests tests passed, $ITERS iterations each"
    else
        bad "$side, round $round: $n of $ntests tests passed, $ITERS iterations each (rc=$rc)"
    fi
    [ "$round" = 1 ] || return 0
    echo "== $side: test-xenstore -r $RSECS"
    XENSTORED_PATH=$sock timeout $((RSECS + 120)) "$TX" -r "$RSECS" > "/tmp/$side-random.out" 2>&1
    rc=$?
    sed 's/^/    /' "/tmp/$side-random.out"
    if [ "$rc" = 0 ] && ! grep -q ': failed' "/tmp/$side-random.out"; then
        ok "$side: random mode, $RSECS s"
    else
        bad "$side: random mode, $RSECS s (rc=$rc)"
    fi
}
c_suite() { # the C xenstored, its trace file off meanwhile
    xenstore-control log off >/dev/null 2>&1 || echo "NOTE: xenstore-control log off failed (C xenstored keeps tracing)"
    suite C "$CSOCK" "$1"
    xenstore-control log on >/dev/null 2>&1
}

# Rounds in the order C sim sim C, so that a drift of the host's load
# (TCG) weighs on both sides alike.
c_suite 1
suite sim "$OSOCK" 1
suite sim "$OSOCK" 2
c_suite 2
kill -0 "$OPID" 2>/dev/null && ok "the simulated xenstored is still running" || bad "the simulated xenstored died"

echo "== ns per operation (test-xenstore -i $ITERS, two rounds each, same boot):"
echo "   avg = mean of the two rounds' averages, min = fastest iteration"
awk -F': avg: ' '
    /: avg: / { split($2, a, " "); name = $1; sub(/ +$/, "", name)
                side = (FILENAME ~ /\/C-/) ? "C" : "sim"
                if (!(name in seen)) { seen[name] = 1; order[++n] = name }
                sum[side, name] += a[1]; cnt[side, name]++
                m = substr(a[3], 2) + 0
                if (!((side, name) in mn) || m < mn[side, name]) mn[side, name] = m }
    function avg(s, k) { return cnt[s, k] ? sprintf("%d", sum[s, k] / cnt[s, k]) : "-" }
    END { printf "    %-11s %12s %12s %12s %12s %7s\n", "test", "C avg", "C min", "sim avg", "sim min", "avg s/C"
          for (i = 1; i <= n; i++) { k = order[i]; ca = avg("C", k); sa = avg("sim", k)
              printf "    %-11s %12s %12s %12s %12s %7s\n", k, ca, mn["C", k], sa, mn["sim", k],
                     (ca > 0 && sa != "-") ? sprintf("%.2f", sa / ca) : "-" } }
' /tmp/C-1.out /tmp/sim-1.out /tmp/sim-2.out /tmp/C-2.out
finish
