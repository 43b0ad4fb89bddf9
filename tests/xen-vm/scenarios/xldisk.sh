#!/bin/sh
# timeout: 900
# needs: domu-kit
# Issue 11: `xl create` of PV guests whose xl.cfg has a qdisk disk, on an
# image with no QEMU: libxl starts xenbackd as the guest's device model.
#  1. device_model_override naming /test/xenbackd: the guest (domu-init.sh)
#     checks dom0's marker on xvda, writes its own and a 1 MiB pattern, and
#     powers off; dom0 checks the marker in the image.
#  2. xenbackd installed at libxl's compiled-in QEMU path, no override.
#  3. xl block-attach of a second qdisk disk (xvdb) to the running guest,
#     used by it, then xl block-detach.
#  4. two guests at once; xl reboot of one (it comes back with a new domid
#     and device model, the other keeps running); xl shutdown of the other;
#     a third guest destroyed (xl destroy) while it writes its disk.
# After each guest: no xenbackd process for its domid, no backend node, no
# open file of its image.
# Env: DOMU_MEM (MiB, default 128), DOMU_TIMEOUT (s, default 300),
#      XLDISK_HOLDIO=0: holding guests sleep instead of writing their disks.
. /test/lib/vbd.sh
. /test/lib/xl.sh
. /test/lib/checks.sh
checks_begin xldisk XLDISK
T=${DOMU_TIMEOUT:-300}
XB=/usr/lib/xen-4.17/bin
finish() {
    xl_logs g1 g2 g3 g4 g5 g6
    checks_end
}
[ -f /boot/domu/vmlinuz ] || { bad "no /boot/domu (the domu-kit archive is missing)"; finish; }
[ -x /test/xenbackd ] || { bad "no /test/xenbackd"; finish; }
xl_setup || { bad "xenconsoled"; finish; }

step "---- 1: device_model_override = /test/xenbackd"
cfg g1 once /test/xenbackd
if create g1; then
    wait_gone g1; verdict g1; clean g1 $D_g1
fi

step "---- 2: xenbackd at the compiled-in path ${DM_PATH:-?}, no override"
if [ -n "$DM_PATH" ]; then
    mkdir -p "$(dirname "$DM_PATH")" /usr/libexec
    cp /test/xenbackd /usr/libexec/xen-qemu-system-i386
    [ "$DM_PATH" = /usr/libexec/xen-qemu-system-i386 ] || ln -sf /usr/libexec/xen-qemu-system-i386 "$DM_PATH"
    cfg g2 once
    if create g2; then
        wait_gone g2; verdict g2; clean g2 $D_g2
    fi
else
    bad "no compiled-in QEMU path found in libxenlight"
fi
ovr=; [ -n "$DM_PATH" ] || ovr=/test/xenbackd

step "---- 3: xl block-attach / block-detach of a second qdisk disk"
cfg g3 xvdb $ovr
dd if=/dev/zero of=/tmp/g3b.img bs=1M count=8 2>/dev/null
printf 'XENVM-DOM0-XVDB' | dd of=/tmp/g3b.img conv=notrunc 2>/dev/null
if create g3; then
    if console_has g3 'pattern md5' $T && xl block-attach g3 'format=raw,vdev=xvdb,access=rw,backendtype=qdisk,target=/tmp/g3b.img'; then
        ok "g3: xl block-attach xvdb"
        if console_has g3 'DOMU-XVDB written rc=0' $T; then
            ok "g3: guest used xvdb"
            xl block-detach g3 xvdb && ok "g3: xl block-detach xvdb" || bad "g3: xl block-detach"
            console_has g3 'DOMU-XVDB gone' 60 && ok "g3: xvdb gone in the guest" || bad "g3: xvdb still in the guest"
            wait_for "xvdb backend gone" 20 sh -c "! xenstore-exists /local/domain/0/backend/qdisk/$D_g3/51728" &&
                ok "g3: xvdb's backend node removed" || bad "g3: backend/qdisk/$D_g3/51728 still there"
            no_open /tmp/g3b.img && ok "g3: /tmp/g3b.img closed after detach" || bad "g3: /tmp/g3b.img still open by $(open_of /tmp/g3b.img)"
        else
            bad "g3: guest did not write xvdb"
        fi
    else
        bad "g3: xl block-attach xvdb"
    fi
    wait_gone g3; verdict g3; clean g3 $D_g3
    m=$(dd if=/tmp/g3b.img bs=512 skip=2048 count=1 2>/dev/null | head -c 40 | tr -d '\0')
    [ "$m" = "XENVM-DOMU-XVDB XENVM-DOM0-XVDB" ] && ok "g3: guest's xvdb marker in the second image" || bad "g3: second image at 1 MiB holds '$m'"
fi

step "---- 4: two guests; xl reboot of one, xl shutdown of the other; xl destroy mid-I/O"
cfg g4 holdonce $ovr
cfg g5 hold $ovr
if create g4 && create g5; then
    d4=$D_g4; d5=$D_g5
    console_has g4 'holding' $T && console_has g5 'holding' $T && ok "g4, g5: both up, writing their disks" || bad "g4/g5 did not reach hold"
    xl reboot g4 && ok "g4: xl reboot" || bad "g4: xl reboot"
    newd() { n4=$(xl domid g4 2>/dev/null) && [ -n "$n4" ] && [ "$n4" != "$d4" ]; }
    if wait_for "g4 back" $T newd; then
        ok "g4: back as domid $n4"
        clean g4 $d4 reboot
        D_g4=$n4; wait_gone g4; verdict g4 2; clean g4 $n4
    else
        bad "g4: not recreated after reboot"
    fi
    alive $d5 g5 && ok "g5: kept running through g4's reboot" || bad "g5: gone during g4's reboot"
    xl shutdown g5 && ok "g5: xl shutdown" || bad "g5: xl shutdown"
    console_has g5 'poweroff requested' 60 && ok "g5: guest saw the shutdown request" || bad "g5: no shutdown request seen in the guest"
    wait_gone g5; verdict g5; clean g5 $d5
fi
cfg g6 hold $ovr
if create g6; then
    console_has g6 'holding' $T && ok "g6: writing its disk" || bad "g6: did not reach hold"
    sleep 2
    xl destroy g6 && ok "g6: xl destroy in the middle of its writes" || bad "g6: xl destroy"
    wait_gone g6; clean g6 $D_g6
fi
finish
