#!/bin/sh
# /test/run inside dom0: runs each scenario named in /test/SCENARIOS in turn,
# each under its own timeout, between markers the host runner parses:
#   ==== XENLAB-BEGIN <name>
#   ...scenario output...
#   ==== XENLAB-END <name> rc=<N> secs=<S>
# Exit status: the number of failed scenarios (0 = all passed).
cd /test || exit 1
export PATH=/test:$PATH
failed=0
while read -r name tmo; do
    [ -n "$name" ] || continue
    echo "==== XENLAB-BEGIN $name"
    t0=$(cut -d' ' -f1 /proc/uptime)
    dmesg -c >/dev/null 2>&1
    timeout -s KILL "${tmo:-300}" sh "/test/scenarios/$name.sh" 2>&1
    rc=$?
    t1=$(cut -d' ' -f1 /proc/uptime)
    # a scenario killed by its timeout reports 124 like coreutils' timeout
    [ $rc = 137 ] && { echo "FAIL $name: timed out after ${tmo}s"; rc=124; }
    # a scenario killed by its timeout leaves its `xenbackd serve` behind,
    # which would fail the next one (its control socket is taken)
    for p in /proc/[0-9]*; do
        case "$(tr '\0' ' ' < $p/cmdline 2>/dev/null)" in
        "/test/xenbackd serve"*) echo "XENLAB: killing the xenbackd serve $name left (pid ${p#/proc/})"; kill -9 ${p#/proc/} 2>/dev/null;;
        esac
    done
    # user processes of dom0 killed by a fault meanwhile (the kernel logs them
    # at KERN_INFO, below the console's loglevel): the lab's TCG crashes
    dmesg 2>/dev/null | grep -E 'segfault at|traps:|general protection|invalid opcode' | sed 's/^/DOM0-FAULT /' | tail -20
    echo "==== XENLAB-END $name rc=$rc secs=$(echo "$t0 $t1" | awk '{printf "%.1f", $2-$1}')"
    [ $rc = 0 ] || failed=$((failed + 1))
done < /test/SCENARIOS
exit $failed
