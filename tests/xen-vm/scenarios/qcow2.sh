#!/bin/sh
# timeout: 300
# Issue 15 on real Xen: `xenbackd serve` serves dom0's own xen-blkfront a
# qcow2 disk (params qcow2:/path, as xl's format=qcow2 writes it) on the
# backing chain tests/xen-vm/host-images made with the host's qemu-img:
# raw <- qcow2 v3 (64 KiB clusters) <- qcow2 v2 (512 B clusters, zero and
# compressed clusters). /dev/xvda must read exactly what `qemu-img convert
# -O raw` read on the host; a write must read back, survive a detach and
# re-attach, and leave the backing files untouched; the same image given
# as raw (aio:) must read as the bytes of the file, header included.
. /test/lib/vbd.sh
. /test/lib/checks.sh
checks_begin qcow2 QCOW2
DEV=/dev/xvda
DEVID=51712
md5() { md5sum | cut -d' ' -f1; }
finish() { xenbackd_log_end; checks_end; }
[ -f /test/images/top.md5 ] || { bad "no /test/images (run-scenarios makes them with tests/xen-vm/host-images)"; finish; }
if ! xenbackd_start; then bad "qcow2: $XENBACKD_WHY"; finish; fi
step "xenbackd serve pid $XENBACKD_PID"
rm -rf /tmp/img; cp -a /test/images /tmp/img
WANT=$(cat /tmp/img/top.md5)
BASE=$(md5 < /tmp/img/base.raw); MID=$(md5 < /tmp/img/mid.qcow2)

attach() { # attach PARAMS: the disk on xvda
    vbd_attach qdisk 0 $DEVID "$1" || { bad "xenstore writes for $1"; return 1; }
    wait_for xvda 30 is_blk $DEV || { bad "$DEV did not appear for $1: $(xenstore-read $VBD_B/error 2>/dev/null)"; return 1; }
}

if attach "qcow2:/tmp/img/top.qcow2"; then
    sectors=$(cat /sys/block/xvda/size)
    [ "$sectors" = 16384 ] && ok "xvda is the image's 8 MiB ($sectors sectors)" || bad "xvda has $sectors sectors, want 16384"
    got=$(dd if=$DEV bs=1M iflag=direct 2>/dev/null | md5)
    [ "$got" = "$WANT" ] && ok "xvda reads the three-deep chain as qemu-img convert -O raw ($got)" ||
        bad "xvda reads $got, qemu-img convert read $WANT"
    dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null
    PAT=$(md5 < /tmp/pattern)
    dd if=/tmp/pattern of=$DEV bs=64k seek=40 oflag=direct conv=fsync 2>/dev/null || bad "write through xvda"
    rb=$(dd if=$DEV bs=64k skip=40 count=16 iflag=direct 2>/dev/null | md5)
    [ "$rb" = "$PAT" ] && ok "1 MiB written at 2.5 MiB reads back" || bad "read back $rb, wrote $PAT"
    vbd_detach && ok "detached" || bad "detach"
    [ "$(md5 < /tmp/img/base.raw)" = "$BASE" ] && [ "$(md5 < /tmp/img/mid.qcow2)" = "$MID" ] &&
        ok "the backing files are untouched" || bad "a backing file changed"
    if attach "qcow2:/tmp/img/top.qcow2"; then
        rb=$(dd if=$DEV bs=64k skip=40 count=16 iflag=direct 2>/dev/null | md5)
        [ "$rb" = "$PAT" ] && ok "the write is in the image after a detach and re-attach" || bad "after re-attach read $rb, want $PAT"
        vbd_detach || bad "second detach"
    fi
fi
# The same file given as raw: its bytes, never parsed as qcow2.
if attach "aio:/tmp/img/top.qcow2"; then
    magic=$(dd if=$DEV bs=512 count=1 iflag=direct 2>/dev/null | head -c 3)
    [ "$magic" = QFI ] && ok "aio: serves the qcow2 file's own bytes (its header at sector 0)" || bad "aio: sector 0 starts '$magic'"
    vbd_detach || bad "detach of the raw view"
fi
finish
