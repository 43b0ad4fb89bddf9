#!/bin/sh
# timeout: 300
# The real xenstored goes away under `xenbackd serve`: a qdisk served to
# dom0's own blkfront, then the C xenstored is killed. The rings must go on
# being served (a 16 MiB direct write and read through /dev/xvda, verified
# against the backing file) and the daemon must stay up and try to
# reconnect. Then xenstored is started again: Xen 4.17's C xenstored keeps
# its store in memory, so the new one starts empty (no live update here);
# the daemon must reconnect and survive what it finds (every device gone)
# without a panic.
. /test/lib/vbd.sh
DEV=/dev/xvda
DEVID=51712
. /test/lib/checks.sh
checks_begin xsaway XSAWAY
md5() { md5sum | cut -d' ' -f1; }
finish() {
    kill -9 ${XENBACKD_PID:-} 2>/dev/null
    echo "----- xenbackd log (tail) -----"; tail -25 /tmp/xenbackd.log 2>/dev/null
    if grep -qi 'panick' /tmp/xenbackd.log 2>/dev/null; then bad "xenbackd panicked"; fi
    checks_end
}

if ! xenbackd_start; then bad "xsaway: $XENBACKD_WHY"; finish; fi
dd if=/dev/zero of=/tmp/disk.img bs=1M count=64 2>/dev/null
vbd_attach qdisk 0 $DEVID "aio:/tmp/disk.img" || { bad "xenstore writes"; finish; }
wait_for xvda 30 is_blk $DEV || { bad "$DEV did not appear"; finish; }
ok "$DEV appeared after ${WAITED}s"

xspid=$(cat /run/xenstored.pid 2>/dev/null)
[ -n "$xspid" ] || { bad "no xenstored pid"; finish; }
kill -9 "$xspid"
wait_for "xenstored gone" 10 eval "! kill -0 $xspid 2>/dev/null" && ok "xenstored (pid $xspid) killed" || bad "xenstored still running"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=16 2>/dev/null
PAT=$(md5 < /tmp/pattern)
if timeout 60 dd if=/tmp/pattern of=$DEV bs=64k oflag=direct conv=fsync 2>/tmp/dd.err; then
    got=$(timeout 60 dd if=$DEV bs=1M count=16 iflag=direct 2>/dev/null | md5)
    file=$(dd if=/tmp/disk.img bs=1M count=16 2>/dev/null | md5)
    [ "$got" = "$PAT" ] && [ "$file" = "$PAT" ] && ok "16 MiB written and read through $DEV with xenstored gone" ||
        bad "with xenstored gone: xvda $got, file $file, want $PAT"
else bad "write with xenstored gone failed or hung: $(cat /tmp/dd.err)"; fi
sleep 2
kill -0 $XENBACKD_PID 2>/dev/null && ok "xenbackd up with xenstored gone" || bad "xenbackd exited with xenstored gone"
grep -q "Xenstore connection lost" /tmp/xenbackd.log && ok "xenbackd noticed the lost connection" ||
    step "xenbackd did not notice (its connection is through /dev/xen/xenbus, which waits)"

xenstored --pid-file /run/xenstored.pid -T /var/log/xen/xenstored-trace.log || bad "xenstored did not start again"
wait_for "xenstored socket" 10 eval '[ -S /run/xenstored/socket ]'
sleep 3
kill -0 $XENBACKD_PID 2>/dev/null && ok "xenbackd up after xenstored came back (empty)" || bad "xenbackd exited after xenstored came back"
grep -E "connection made again|Reconnecting|rescanning|removed" /tmp/xenbackd.log | tail -5 | while read -r l; do step "log: $l"; done
finish
