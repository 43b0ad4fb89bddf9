#!/bin/sh
# timeout: 600
# needs: domu-kit
# Issue 15 with the real toolstack: `xl create` of a PV guest whose disk is
# `format=qcow2` on a backing chain the host's qemu-img made
# (tests/xen-vm/host-images: xl-base.raw <- xl-top.qcow2, relative backing
# name), xenbackd its device model (no QEMU in the image). libxl must write
# `params = qcow2:<path>`; the guest (domu-init.sh) reads dom0's marker
# from the raw backing file through the qcow2 layer, writes its own marker
# and a 1 MiB pattern and reads it back, then writes in a loop until `xl
# shutdown`. Afterwards nothing of the guest is left, the backing file is
# untouched, and dom0's own blkfront on the same image (xenbackd serve)
# reads the guest's marker and, above 8 MiB, exactly what qemu-img read on
# the host.
# Env: DOMU_MEM (MiB, default 128), DOMU_TIMEOUT (s, default 300).
. /test/lib/vbd.sh
. /test/lib/xl.sh
. /test/lib/checks.sh
checks_begin xlqcow2 XLQCOW2
T=${DOMU_TIMEOUT:-300}
md5() { md5sum | cut -d' ' -f1; }
finish() { xl_logs g8; xenbackd_log_end; checks_end; }
[ -f /boot/domu/vmlinuz ] || { bad "no /boot/domu (the domu-kit archive is missing)"; finish; }
[ -f /test/images/xl-top.md5 ] || { bad "no /test/images/xl-top.qcow2 (run-scenarios makes it with tests/xen-vm/host-images)"; finish; }
[ -x /test/xenbackd ] || { bad "no /test/xenbackd"; finish; }
xl_setup || { bad "xenconsoled"; finish; }
rm -rf /tmp/img; mkdir -p /tmp/img
cp /test/images/xl-base.raw /test/images/xl-top.qcow2 /test/images/xl-top.md5 /tmp/img/
TOP=/tmp/img/xl-top.qcow2 BASE=/tmp/img/xl-base.raw
BASE_MD5=$(md5 < $BASE)

XL_DISK="format=qcow2,vdev=xvda,access=rw,backendtype=qdisk,target=$TOP" cfg g8 hold /test/xenbackd
create g8 || finish
d=$D_g8
p=$(xenstore-read /local/domain/0/backend/qdisk/$d/51712/params 2>&1)
[ "$p" = "qcow2:$TOP" ] && ok "g8: libxl wrote params = $p" || bad "g8: params '$p', want qcow2:$TOP"
console_has g8 'holding, writing' $T && ok "g8: up, writing its disk" || bad "g8: did not reach hold"
grep -q "marker from dom0: 'XENVM-DOM0-MARKER-g8'" /var/log/xen/console/guest-g8.log &&
    ok "g8: the guest read dom0's marker from the raw backing file through the qcow2 layer" ||
    bad "g8: the guest did not read dom0's marker"
xl shutdown g8 && ok "g8: xl shutdown" || bad "g8: xl shutdown"
wait_gone g8
echo "----- g8 console -----"; sed "s/^/  g8| /" /var/log/xen/console/guest-g8.log 2>/dev/null | tail -20
grep -q 'DOMU-RESULT rc=0' /var/log/xen/console/guest-g8.log && ok "g8: guest verified its disk (marker, 1 MiB pattern read back)" ||
    bad "g8: guest did not report success"
wait_for "dm exit" 20 no_dm_left $d && ok "g8: no device model process left for domid $d" ||
    bad "g8: device model of domid $d still running: $(procs_for $d)"
wait_for "backend gone" 20 no_be_left $d && ok "g8: no backend/qdisk/$d left" || bad "g8: backend/qdisk/$d still there"
wait_for "image closed" 20 no_open $TOP && no_open $BASE && ok "g8: both files of the chain open nowhere" ||
    bad "g8: chain still open by $(open_of $TOP) $(open_of $BASE)"
[ "$(md5 < $BASE)" = "$BASE_MD5" ] && ok "g8: the raw backing file is untouched" || bad "g8: the backing file changed"

step "dom0's own blkfront on the guest's image"
if xenbackd_start; then
    if vbd_attach qdisk 0 51712 "qcow2:$TOP" && wait_for xvda 30 is_blk /dev/xvda; then
        m=$(dd if=/dev/xvda bs=512 skip=2048 count=1 iflag=direct 2>/dev/null | head -c 64 | tr -d '\0')
        [ "$m" = "XENVM-DOMU-MARKER XENVM-DOM0-MARKER-g8" ] && ok "g8: the guest's marker is in the qcow2 image" ||
            bad "g8: image at 1 MiB holds '$m'"
        got=$(dd if=/dev/xvda bs=1M skip=8 iflag=direct 2>/dev/null | md5)
        [ "$got" = "$(cat /tmp/img/xl-top.md5)" ] && ok "g8: 8-16 MiB read as qemu-img read them on the host ($got)" ||
            bad "g8: 8-16 MiB read $got, qemu-img read $(cat /tmp/img/xl-top.md5)"
        vbd_detach || bad "detach"
    else
        bad "xvda did not appear: $(xenstore-read $VBD_B/error 2>/dev/null)"
    fi
else
    bad "xenbackd serve: $XENBACKD_WHY"
fi
finish
