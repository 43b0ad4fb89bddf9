#!/bin/sh
# timeout: 480
# Scenario 3: block, self-attached in dom0 (what `xl block-attach 0` does).
# `xenbackd serve` (no flags: serves backend/qdisk) serves a qdisk device
# (params aio:/path) to dom0's own xen-blkfront, on (a) a file in tmpfs and
# (b) a RAM disk (brd, /dev/ram0). For each: known pattern written through
# /dev/xvda, read back and compared with the backing store, unaligned and
# last-sector writes, flush, discard, ten detach/re-attach cycles keeping the
# data, a restart of the daemon (SIGTERM, then a new serve) in the middle of
# a 16 MiB write that must complete with the data intact and xvda never
# leaving, and finally the backend directory removed without a handshake:
# the frontend must close and its disk fail I/O at once, the daemon must
# survive, and xvda goes once the frontend directory is removed too.
. /test/lib/vbd.sh
DEV=/dev/xvda
DEVID=51712
. /test/lib/checks.sh
checks_begin selfattach SELFATTACH
md5() { md5sum | cut -d' ' -f1; }
finish() {
    xenbackd_log_end
    checks_end
}

if ! xenbackd_start; then bad "selfattach: $XENBACKD_WHY"; finish; fi
step "xenbackd serve pid $XENBACKD_PID"

SIZE_MB=64
dd if=/dev/zero of=/tmp/disk.img bs=1M count=$SIZE_MB 2>/dev/null
modprobe brd rd_nr=1 rd_size=$((SIZE_MB * 1024)) max_part=0 || bad "modprobe brd"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=16 2>/dev/null
PAT=$(md5 < /tmp/pattern)

# attach_ours NAME PATH: attach and wait for the device; 0 if it is there
attach_ours() {
    vbd_attach qdisk 0 $DEVID "aio:$2" || { bad "$1: xenstore writes"; return 1; }
    if wait_for xvda 30 is_blk $DEV; then return 0; fi
    bad "$1: $DEV did not appear within 30s (backend state $(xenstore-read $VBD_B/state 2>&1), frontend state $(xenstore-read $VBD_F/state 2>&1))"
    xenstore-ls -f $VBD_B 2>&1 | sed 's/^/    /'
    vbd_detach; return 1
}
# detach_ours NAME: the xl block-detach handshake; the device must go away
detach_ours() {
    vbd_detach || { bad "$1: backend did not reach Closed in 20s (state $(xenstore-read $VBD_B/state 2>&1))"; }
    wait_for "xvda gone" 20 no_blk $DEV || { bad "$1: $DEV still present 20s after detach"; return 1; }
}

run_target() { # run_target NAME PATH
    name=$1 path=$2
    step "---- $name: $path"
    attach_ours "$name" "$path" || return 1
    ok "$name: $DEV appeared after ${WAITED}s"
    [ "$(xenstore-read $VBD_B/state)" = 4 ] && ok "$name: backend Connected (4)" || bad "$name: backend state $(xenstore-read $VBD_B/state)"
    xenstore-ls -f $VBD_B | sed 's/^/    /'
    sec=$(cat /sys/block/xvda/size)
    [ "$sec" = $((SIZE_MB * 2048)) ] && ok "$name: size $sec sectors" || bad "$name: size $sec sectors, want $((SIZE_MB * 2048))"

    # pattern through the PV path, then compared three ways
    dd if=/tmp/pattern of=$DEV bs=1M oflag=direct conv=fsync 2>/dev/null || bad "$name: write $DEV"
    got=$(dd if=$DEV bs=1M count=16 iflag=direct 2>/dev/null | md5)
    [ "$got" = "$PAT" ] && ok "$name: 16 MiB pattern read back through $DEV" || bad "$name: read back $got, want $PAT"
    sync
    got=$(dd if="$path" bs=1M count=16 2>/dev/null | md5)
    [ "$got" = "$PAT" ] && ok "$name: backing store holds the pattern" || bad "$name: backing store $got, want $PAT"
    # written to the backing store directly, read through $DEV
    printf 'XENLAB-BACKING-MARKER' | dd of="$path" bs=512 seek=40000 conv=notrunc,fsync 2>/dev/null
    [ -b "$path" ] && blockdev --flushbufs "$path" 2>/dev/null
    m=$(dd if=$DEV bs=512 skip=40000 count=1 iflag=direct 2>/dev/null | head -c 21)
    [ "$m" = XENLAB-BACKING-MARKER ] && ok "$name: backing-store write visible through $DEV" || bad "$name: read '$m' through $DEV"
    # 4 KiB writes at scattered offsets and the very last sector
    for off in 1 77 4001; do
        dd if=/tmp/pattern of=$DEV bs=4k count=1 skip=$off seek=$((off + 5000)) oflag=direct 2>/dev/null
    done
    printf 'XENLAB-LAST-SECTOR' | dd of=$DEV bs=512 seek=$((sec - 1)) conv=sync oflag=direct 2>/dev/null || bad "$name: write last sector"
    okk=1
    for off in 1 77 4001; do
        a=$(dd if=/tmp/pattern bs=4k count=1 skip=$off 2>/dev/null | md5)
        b=$(dd if=$DEV bs=4k count=1 skip=$((off + 5000)) iflag=direct 2>/dev/null | md5)
        [ "$a" = "$b" ] || okk=0
    done
    m=$(dd if=$DEV bs=512 skip=$((sec - 1)) count=1 iflag=direct 2>/dev/null | head -c 18)
    [ "$okk" = 1 ] && [ "$m" = XENLAB-LAST-SECTOR ] && ok "$name: scattered 4 KiB and last-sector writes" || bad "$name: scattered/last-sector writes (last='$m')"

    # flush: a write-back cache advertised and fsync of the device succeeds
    fc=$(xenstore-read $VBD_B/feature-flush-cache 2>/dev/null)
    wc=$(cat /sys/block/xvda/queue/write_cache 2>/dev/null)
    step "$name: feature-flush-cache=$fc write_cache='$wc'"
    if dd if=/tmp/pattern of=$DEV bs=4k count=1 oflag=direct conv=fsync 2>/dev/null && blockdev --flushbufs $DEV; then
        ok "$name: flush (fsync + flushbufs) succeeded"
    else bad "$name: flush failed"; fi
    # blkfront turns flushes off for good when one fails ("empty flush op
    # failed"), after which fsync succeeds without reaching the disk
    wc=$(cat /sys/block/xvda/queue/write_cache 2>/dev/null)
    if [ "$wc" = "write back" ] && ! dmesg | grep -q 'xvda: .*op failed'; then
        ok "$name: flushes still on after fsyncs (write_cache '$wc')"
    else bad "$name: blkfront turned flushes off (write_cache '$wc'): $(dmesg | grep 'xvda: .*op failed' | tail -1)"; fi
    [ "$fc" = 1 ] && ok "$name: backend advertises feature-flush-cache" || bad "$name: feature-flush-cache='$fc'"
    dmesg | grep -Ei 'blkfront|xvda' | tail -4 | while read -r l; do step "$name: kernel: $l"; done

    # discard
    fd=$(xenstore-read $VBD_B/feature-discard 2>/dev/null)
    dmax=$(cat /sys/block/xvda/queue/discard_max_bytes 2>/dev/null)
    step "$name: feature-discard='$fd' discard_max_bytes=$dmax"
    if [ "$fd" = 1 ]; then
        if blkdiscard -o $((32 * 1048576)) -l 1048576 $DEV; then
            ok "$name: blkdiscard of 1 MiB"
            z=$(dd if=$DEV bs=1M skip=32 count=1 iflag=direct 2>/dev/null | tr -d '\0' | wc -c)
            if [ "$name" = file ]; then
                [ "$z" = 0 ] && ok "$name: discarded range reads as zeros (hole punched)" || bad "$name: discarded range has $z non-zero bytes"
            else step "$name: discarded range has $z non-zero bytes (zeroing not required)"; fi
        else bad "$name: blkdiscard failed"; fi
    elif [ "$name" = file ]; then
        bad "$name: no feature-discard on a file backend"
    else
        step "$name: no feature-discard on this device (allowed: brd of Linux 6.1 has no discard)"
    fi

    # ten detach / re-attach cycles; the data survives
    okc=0
    for i in 1 2 3 4 5 6 7 8 9 10; do
        detach_ours "$name cycle $i" || break
        attach_ours "$name cycle $i" "$path" || break
        got=$(dd if=$DEV bs=1M count=1 iflag=direct 2>/dev/null | md5)
        want=$(dd if=/tmp/pattern bs=1M count=1 2>/dev/null | md5)
        [ "$got" = "$want" ] || { bad "$name cycle $i: data after re-attach differs"; break; }
        okc=$i
    done
    [ $okc = 10 ] && ok "$name: 10 detach/re-attach cycles, data intact" || bad "$name: only $okc of 10 detach/re-attach cycles"
    kill -0 $XENBACKD_PID 2>/dev/null && ok "$name: xenbackd alive" || { bad "$name: xenbackd died"; return 1; }

    # the daemon restarted under I/O: the guest sees a pause, not an error
    dd if=/tmp/pattern of=$DEV bs=64k oflag=direct conv=fsync 2>/tmp/dd-restart.err &
    ddpid=$!
    sleep 0.5
    xenbackd_stop
    if [ -n "$XENBACKD_KILLED" ]; then bad "$name: xenbackd did not exit within 10s of SIGTERM"; fi
    st=$(xenstore-read $VBD_B/state 2>&1)
    [ "$st" = 4 ] && [ -b $DEV ] && ok "$name: with the daemon stopped, state still Connected and $DEV present" ||
        bad "$name: after SIGTERM state '$st', $DEV $([ -b $DEV ] && echo present || echo gone)"
    resumes=$(grep -c "resuming it" /tmp/xenbackd.log)
    if xenbackd_start; then
        step "$name: new xenbackd serve pid $XENBACKD_PID"
        if wait_for "dd across the restart" 60 eval "! kill -0 $ddpid 2>/dev/null"; then
            wait $ddpid && ok "$name: 16 MiB write across the restart completed ($(cat /tmp/dd-restart.err | tail -1))" ||
                bad "$name: write across the restart failed: $(cat /tmp/dd-restart.err)"
        else bad "$name: write across the restart still blocked 60s after the new daemon started"; kill $ddpid; fi
        got=$(dd if=$DEV bs=1M count=16 iflag=direct 2>/dev/null | md5)
        [ "$got" = "$PAT" ] && ok "$name: pattern intact through $DEV after the restart" || bad "$name: after the restart read $got, want $PAT"
        [ "$(grep -c "resuming it" /tmp/xenbackd.log)" -gt "$resumes" ] && ok "$name: the new daemon resumed the device" || bad "$name: the new daemon did not log a resume"
        kerr='I/O error|for further use|wrong operation'
        if dmesg | grep -E 'xvda|blkfront' | grep -Eiq "$kerr"; then
            bad "$name: dom0 kernel complained: $(dmesg | grep -E 'xvda|blkfront' | grep -Ei "$kerr" | tail -2 | tr '\n' ';')"
        else ok "$name: no blkfront error in the kernel log"; fi
    else bad "$name: xenbackd did not start again: $XENBACKD_WHY"; return 1; fi

    # backend directory removed by the toolstack with no handshake. Linux
    # 6.1's blkfront learns of it only from the backend's state node, and on
    # Closed marks the disk dead (size 0, I/O fails) and goes Closed; the
    # node itself goes when the toolstack removes the frontend directory.
    # (The kernel's blkback, in the same steps, writes nothing: the frontend
    # stays Connected and I/O to xvda hangs; docs/xen-lab.md.)
    [ -b $DEV ] || attach_ours "$name final" "$path" || return 1
    xenstore-rm $VBD_B
    if wait_for "frontend Closed" 30 eval '[ "$(xenstore-read $VBD_F/state 2>/dev/null)" = 6 ]'; then
        ok "$name: frontend Closed ${WAITED}s after the backend directory was removed"
    else bad "$name: frontend state '$(xenstore-read $VBD_F/state 2>&1)' 30s after the backend directory was removed"; fi
    sz=$(cat /sys/block/xvda/size 2>/dev/null || echo gone)
    [ "$sz" = 0 ] || [ "$sz" = gone ] && ok "$name: $DEV marked dead (size $sz)" || bad "$name: $DEV still has $sz sectors"
    rm -f /tmp/after-rm
    timeout 20 dd if=$DEV of=/tmp/after-rm bs=4k count=1 iflag=direct 2>/dev/null; rc=$?
    n=$(wc -c < /tmp/after-rm 2>/dev/null || echo 0)
    if [ $rc = 124 ]; then bad "$name: a read of $DEV hung after the removal"
    elif [ "$n" -gt 0 ]; then bad "$name: $n bytes read from $DEV after the removal"
    else ok "$name: a read of $DEV returns no data at once after the removal (rc $rc)"; fi
    if wait_for "stray state node gone" 30 eval '! xenstore-exists $VBD_B 2>/dev/null'; then
        ok "$name: the Closed state written for the frontend was removed again"
    else bad "$name: $VBD_B still exists: $(xenstore-ls -f $VBD_B 2>&1 | tr '\n' ' ')"; fi
    xenstore-rm $VBD_F
    if wait_for "xvda gone" 30 no_blk $DEV; then ok "$name: $DEV gone ${WAITED}s after the frontend directory was removed"
    else bad "$name: $DEV still present 30s after both directories were removed"; fi
    kill -0 $XENBACKD_PID 2>/dev/null && ok "$name: xenbackd survived the removal" || bad "$name: xenbackd died on removal"
}

run_target file /tmp/disk.img
[ -b /dev/ram0 ] && run_target ramdisk /dev/ram0
finish
