#!/bin/sh
# timeout: 400
# Issue 12 on real Xen: storage that fails, stalls and dies under `xenbackd
# serve`, with device-mapper targets between the daemon and its images
# (loop devices on dom0's tmpfs), dom0's own blkfront as the guest:
#  1. xvda on a disk with an `error` target over 1 MiB at 8 MiB: reads and
#     writes there fail with EIO in dom0, everything around them works and
#     keeps its data; the kernel's blkback, attached to the same device,
#     answers the same (the reference).
#  2. xvdb on a suspended device (its I/O queued in device-mapper, as on a
#     hung NFS server or a dead path): while a read of xvdb hangs, xvda is
#     served, and a third disk (xvdc) is attached and used: neither the ring
#     worker nor the xenbus thread waits for the stuck disk. Resumed, the
#     hung read completes with the right data.
#  3. The stuck disk detached while its I/O hangs: the device goes alone
#     (Closed), xvda goes on; the I/O that completes after the resume lands
#     nowhere and harms nothing; the daemon closes the device afterwards.
#  4. xvda's whole table switched to `error` while connected (the disk
#     dies): its requests fail, xvdc goes on; switched back: xvda serves its
#     old data again, on the same connection.
#  5. xvdb on a `delay` target (300 ms per I/O): slow but correct.
# The daemon survives everything and never panics.
. /test/lib/vbd.sh
. /test/lib/checks.sh
checks_begin faults FAULTS
md5() { md5sum | cut -d' ' -f1; }
export DM_DISABLE_UDEV=1
finish() {
    dmsetup resume slow 2>/dev/null
    xenbackd_log_end
    checks_end
}
command -v dmsetup >/dev/null || { bad "no dmsetup in the image"; finish; }
for m in dm-mod dm-delay; do modprobe $m || bad "modprobe $m"; done
[ -c /dev/mapper/control ] || { mkdir -p /dev/mapper; mknod /dev/mapper/control c 10 236 2>/dev/null; }
dmsetup version >/dev/null 2>&1 || { bad "device-mapper: $(dmsetup version 2>&1 | tail -1)"; finish; }
if ! xenbackd_start; then bad "faults: $XENBACKD_WHY"; finish; fi
step "xenbackd serve pid $XENBACKD_PID"

SECTORS=65536 # 32 MiB
loopdev() { # loopdev FILE: a loop device over FILE (its name)
    dd if=/dev/urandom of=$1 bs=1M count=32 2>/dev/null
    _l=$(losetup -f) && losetup $_l $1 && echo $_l
}
LA=$(loopdev /tmp/fa.img) && LB=$(loopdev /tmp/fb.img) || { bad "losetup"; finish; }
dd if=/dev/urandom of=/tmp/fc.img bs=1M count=32 2>/dev/null
# bad: linear, but 1 MiB of `error` at 8 MiB
dmsetup create bad --table "0 16384 linear $LA 0
16384 2048 error
18432 47104 linear $LA 18432" || { bad "dmsetup create bad"; finish; }
dmsetup create slow --table "0 $SECTORS linear $LB 0" || { bad "dmsetup create slow"; finish; }
A_BEFORE=$(dd if=/tmp/fa.img bs=1M count=8 2>/dev/null | md5)
A_AFTER=$(dd if=/tmp/fa.img bs=1M skip=9 2>/dev/null | md5)

# attach KIND DEVID PARAMS [PHYS] / detach VAR: per-device VBD_B/VBD_F kept in B_<devid>
attach() {
    vbd_attach "$1" 0 $2 "$3" "${4:-}" || return 1
    eval "B_$2=\$VBD_B F_$2=\$VBD_F"
}
detach() { eval "VBD_B=\$B_$1 VBD_F=\$F_$1"; vbd_detach; }
# rd DEV SKIP_MIB COUNT_MIB: md5 of that range read with O_DIRECT ("EIO" if dd failed)
rd() { dd if=$1 bs=1M skip=$2 count=$3 iflag=direct 2>/tmp/rd.err > /tmp/rd.out && md5 < /tmp/rd.out || echo EIO; }

step "---- 1: an error target over 1 MiB at 8 MiB"
attach qdisk 51712 aio:/dev/mapper/bad && wait_for xvda 30 is_blk /dev/xvda || { bad "xvda did not appear"; finish; }
[ "$(rd /dev/xvda 0 8)" = "$A_BEFORE" ] && ok "xvda: the 8 MiB before the error range read intact" || bad "xvda: 0-8 MiB wrong"
[ "$(rd /dev/xvda 8 1)" = EIO ] && ok "xvda: a read of the error range fails ($(tail -1 /tmp/rd.err))" || bad "xvda: a read of the error range succeeded"
[ "$(rd /dev/xvda 9 23)" = "$A_AFTER" ] && ok "xvda: the 23 MiB after it read intact" || bad "xvda: 9-32 MiB wrong"
dd if=/dev/zero of=/dev/xvda bs=4k seek=2100 count=1 oflag=direct 2>/dev/null && bad "xvda: a write into the error range succeeded" ||
    ok "xvda: a write into the error range fails"
dd if=/dev/urandom of=/tmp/p4k bs=4k count=1 2>/dev/null
dd if=/tmp/p4k of=/dev/xvda bs=4k seek=100 oflag=direct 2>/dev/null &&
    [ "$(dd if=/dev/xvda bs=4k skip=100 count=1 iflag=direct 2>/dev/null | md5)" = "$(md5 < /tmp/p4k)" ] &&
    ok "xvda: a write outside the error range reads back" || bad "xvda: a write outside the error range"
A_BEFORE=$(rd /dev/xvda 0 8) # with that write
[ "$(xenstore-read $B_51712/state)" = 4 ] && ok "xvda: still Connected after the errors" || bad "xvda: backend state $(xenstore-read $B_51712/state)"

step "---- 1b: the kernel's blkback on the same device (reference)"
if modprobe xen-blkback 2>/dev/null; then
    dmsetup create bad2 --table "0 16384 linear $LA 0
16384 2048 error
18432 47104 linear $LA 18432" || bad "dmsetup create bad2"
    attach vbd 51760 /dev/mapper/bad2 "$(phys_of /dev/mapper/bad2)"
    if wait_for xvdd 30 is_blk /dev/xvdd; then
        r1=$(rd /dev/xvdd 0 8); r2=$(rd /dev/xvdd 8 1)
        [ "$r1" = "$A_BEFORE" ] && [ "$r2" = EIO ] && ok "blkback: the same (0-8 MiB as we read them, the error range EIO)" ||
            bad "blkback: 0-8 MiB $r1, error range $r2"
        detach 51760 || bad "blkback: detach"
        wait_for "xvdd gone" 20 no_blk /dev/xvdd || bad "xvdd still there"
    else
        bad "blkback: xvdd did not appear"
    fi
    dmsetup remove bad2 2>/dev/null
else
    step "no xen-blkback module: reference skipped"
fi

step "---- 2: a stuck disk (xvdb, device-mapper suspended)"
attach qdisk 51728 aio:/dev/mapper/slow && wait_for xvdb 30 is_blk /dev/xvdb || { bad "xvdb did not appear"; finish; }
B_WANT=$(dd if=/tmp/fb.img bs=1M skip=4 count=1 2>/dev/null | md5)
dmsetup suspend slow || bad "dmsetup suspend"
dd if=/dev/xvdb of=/tmp/stuck.out bs=1M skip=4 count=1 iflag=direct 2>/tmp/stuck.err & SP=$!
sleep 2
kill -0 $SP 2>/dev/null && ok "xvdb: a read of the suspended disk hangs" || bad "xvdb: the read did not hang"
n=0; for i in $(seq 1 50); do dd if=/dev/xvda of=/dev/null bs=4k skip=$i count=1 iflag=direct 2>/dev/null && n=$((n + 1)); done
[ $n = 50 ] && kill -0 $SP 2>/dev/null && ok "xvda: 50 reads served while xvdb's read hangs" || bad "xvda: $n of 50 reads while xvdb hangs"
attach qdisk 51744 aio:/tmp/fc.img
if wait_for xvdc 30 is_blk /dev/xvdc && kill -0 $SP 2>/dev/null; then
    [ "$(rd /dev/xvdc 0 1)" = "$(dd if=/tmp/fc.img bs=1M count=1 2>/dev/null | md5)" ] &&
        ok "xvdc: attached (after ${WAITED}s) and read while xvdb hangs" || bad "xvdc: wrong data"
else
    bad "xvdc: not attached while xvdb hangs"
fi
dmsetup resume slow || bad "dmsetup resume"
wait_for "stuck read" 30 eval "! kill -0 $SP 2>/dev/null" && wait $SP && [ "$(md5 < /tmp/stuck.out)" = "$B_WANT" ] &&
    ok "xvdb: resumed, the hung read completes with the right data" || bad "xvdb: after resume: $(cat /tmp/stuck.err)"

step "---- 3: the stuck disk detached while its I/O hangs"
dmsetup suspend slow || bad "dmsetup suspend (2)"
dd if=/dev/xvdb of=/dev/null bs=1M skip=8 count=1 iflag=direct 2>/dev/null & SP=$!
sleep 1
eval "VBD_B=\$B_51728"
xenstore-write $VBD_B/online 0 $VBD_B/state 5
# the frontend closes; the daemon gives the ring's I/O its deadline, then the device goes alone
wait_for "xvdb closed" 60 be_closed_or_gone && ok "xvdb: detached while its I/O hangs (Closed after ${WAITED}s)" ||
    bad "xvdb: backend state $(xenstore-read $VBD_B/state 2>&1) 60 s after Closing"
grep -E "51728|drain|aside|reap" /tmp/xenbackd.log | tail -8 | sed 's/^/    xenbackd| /'
n=0; for i in $(seq 1 20); do dd if=/dev/xvdc of=/dev/null bs=4k skip=$i count=1 iflag=direct 2>/dev/null && n=$((n + 1)); done
[ $n = 20 ] && ok "xvdc: served during the stuck detach" || bad "xvdc: $n of 20 reads"
dmsetup resume slow || bad "dmsetup resume (2)"
# (blkfront marked the disk dead at Closing; whether its request returns is the frontend's business)
wait_for "hung dd" 30 eval "! kill -0 $SP 2>/dev/null" && step "the dd on the detached xvdb returned" ||
    step "the dd on the detached xvdb is still blocked in dom0's blkfront"
xenstore-rm $F_51728; xenstore-rm $B_51728
kill -0 $XENBACKD_PID 2>/dev/null && ok "xenbackd alive after the late completions" || bad "xenbackd died"
wait_for "slow closed" 30 sh -c '[ "$(dmsetup info -c --noheadings -o open slow)" = 0 ]' &&
    ok "the daemon closed the detached disk once its I/O was done" || bad "slow still open: $(dmsetup info -c --noheadings -o open slow)"

step "---- 4: xvda's disk dies (table switched to error) and comes back"
dmsetup suspend bad && dmsetup load bad --table "0 $SECTORS error" && dmsetup resume bad || bad "dmsetup switch to error"
[ "$(rd /dev/xvda 0 1)" = EIO ] && ok "xvda: reads fail on the dead disk" || bad "xvda: a read of the dead disk succeeded"
[ "$(rd /dev/xvdc 0 1)" = "$(dd if=/tmp/fc.img bs=1M count=1 2>/dev/null | md5)" ] && ok "xvdc: served meanwhile" || bad "xvdc: wrong"
dmsetup suspend bad && dmsetup load bad --table "0 $SECTORS linear $LA 0" && dmsetup resume bad || bad "dmsetup switch back"
[ "$(rd /dev/xvda 0 8)" = "$A_BEFORE" ] && ok "xvda: back, its old data on the same connection" || bad "xvda: after the switch back"

step "---- 5: a slow disk (delay 300 ms)"
dmsetup create delayed --table "0 $SECTORS delay $LB 0 300" || bad "dmsetup create delayed"
attach qdisk 51728 aio:/dev/mapper/delayed && wait_for xvdb 30 is_blk /dev/xvdb || bad "xvdb (delayed) did not appear"
dd if=/tmp/p4k of=/dev/xvdb bs=4k seek=7 oflag=direct 2>/dev/null &&
    [ "$(dd if=/dev/xvdb bs=4k skip=7 count=1 iflag=direct 2>/dev/null | md5)" = "$(md5 < /tmp/p4k)" ] &&
    ok "xvdb: slow but correct through the delay target" || bad "xvdb: delayed write/read"

step "---- teardown"
for d in 51728 51744 51712; do detach $d || bad "detach $d"; done
for x in xvda xvdb xvdc; do wait_for "$x gone" 20 no_blk /dev/$x || bad "/dev/$x still there"; done
kill -0 $XENBACKD_PID 2>/dev/null && ok "xenbackd alive at the end" || bad "xenbackd died"
if dmesg | grep -qi 'xen-blkfront.*\(bug\|oops\)\|kernel BUG'; then bad "dom0 kernel: $(dmesg | grep -i 'bug\|oops' | tail -2)"; fi
xenbackd_log_end
for m in delayed slow bad; do dmsetup remove $m 2>/dev/null; done
losetup -d $LA; losetup -d $LB
checks_end
