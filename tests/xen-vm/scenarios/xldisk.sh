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
npass=0; nfail=0
ok() { echo "PASS $*"; npass=$((npass + 1)); }
bad() { echo "FAIL $*"; nfail=$((nfail + 1)); }
step() { echo "XLDISK [$(cut -d' ' -f1 /proc/uptime)]: $*"; }
T=${DOMU_TIMEOUT:-300}
XB=/usr/lib/xen-4.17/bin
finish() {
    for n in g1 g2 g3 g4 g5 g6; do xl domid $n >/dev/null 2>&1 && xl destroy $n; done
    for f in /var/log/xen/xl-*.log /var/log/xen/qemu-dm-*.log; do
        [ -f "$f" ] || continue
        echo "----- $f (tail) -----"; tail -15 "$f"
        grep -qi 'panick' "$f" && bad "$f: xenbackd panicked"
    done
    echo "xldisk: $npass checks passed, $nfail failed"
    if [ "$nfail" = 0 ] && [ "$npass" -gt 0 ]; then echo "PASS xldisk"; exit 0; fi
    echo "FAIL xldisk"; exit 1
}
[ -f /boot/domu/vmlinuz ] || { bad "no /boot/domu (the domu-kit archive is missing)"; finish; }
[ -x /test/xenbackd ] || { bad "no /test/xenbackd"; finish; }
mkdir -p /var/log/xen/console /var/lib/xen/dump /var/run/xen /var/lock /run/xen
xenconsoled --log=guest --log-dir=/var/log/xen/console --pid-file=/run/xenconsoled.pid || { bad "xenconsoled"; finish; }

# No QEMU anywhere; which path libxl would run.
q=$(find / -xdev \( -name 'qemu-system-*' -o -name 'xen-qemu-system-*' \) 2>/dev/null | head -3)
[ -z "$q" ] && ok "no QEMU in the image" || bad "QEMU found: $q"
LIBXL=$(ls /usr/lib/x86_64-linux-gnu/libxenlight.so.* 2>/dev/null | head -1)
DM_PATH=
for p in /usr/libexec/xen-qemu-system-i386 /usr/lib/xen-4.17/bin/qemu-system-i386 /usr/local/lib/xen/bin/qemu-system-i386; do
    grep -q "$p" "$LIBXL" && { DM_PATH=$p; break; }
done
step "libxl's compiled-in device model: ${DM_PATH:-not found in $LIBXL}"

# cfg NAME MODE [override]: xl.cfg of a guest with a qdisk disk on /tmp/NAME.img
cfg() {
    n=$1 mode=$2 ovr=${3:-}
    dd if=/dev/zero of=/tmp/$n.img bs=1M count=32 2>/dev/null
    printf 'XENVM-DOM0-MARKER-%s' "$n" | dd of=/tmp/$n.img conv=notrunc 2>/dev/null
    extra="console=hvc0 loglevel=4 domu.wait=90 domu.mode=$mode domu.holdio=${XLDISK_HOLDIO:-1}"
    [ "$mode" = xvdb ] && extra="console=hvc0 loglevel=4 domu.wait=90 domu.xvdb=$T"
    cat > /tmp/$n.cfg <<CFG
name = "$n"
type = "pv"
kernel = "/boot/domu/vmlinuz"
ramdisk = "/boot/domu/initrd.cpio.gz"
extra = "$extra"
memory = ${DOMU_MEM:-128}
vcpus = 1
disk = ['format=raw,vdev=xvda,access=rw,backendtype=qdisk,target=/tmp/$n.img']
on_poweroff = "destroy"
on_reboot = "restart"
on_crash = "destroy"
CFG
    [ -n "$ovr" ] && printf 'device_model_version = "qemu-xen"\ndevice_model_override = "%s"\n' "$ovr" >> /tmp/$n.cfg
    :
}
# create NAME: xl create (the device model is started; the guest runs)
create() {
    n=$1
    step "$n: before xl create: $(free -m | awk '/Mem:/{print "dom0 free " $4 " MiB of " $2}'), $(xl info 2>/dev/null | awk '/free_memory/{print "Xen free " $3 " MiB"}')"
    if ! xl create /tmp/$n.cfg > /tmp/xl-$n.log 2>&1; then
        cat /tmp/xl-$n.log; tail -20 /var/log/xen/qemu-dm-$n.log 2>/dev/null
        bad "$n: xl create"; return 1
    fi
    d=$(xl domid $n) || { bad "$n: xl domid"; return 1; }
    eval "D_$n=$d"
    pid=$(xenstore-read /local/domain/$d/image/device-model-pid 2>/dev/null)
    st=$(xenstore-read /local/domain/0/device-model/$d/state 2>/dev/null)
    cmd=$(tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null | cut -c1-100)
    [ "$st" = running ] && ok "$n: xl create, domid $d, device model pid $pid ($cmd...) state running" ||
        bad "$n: device-model state '$st', pid '$pid'"
}
alive() {
    [ "$(timeout 10 xenstore-read /local/domain/$1/name 2>/dev/null)" = "$2" ] && return 0
    sleep 1
    [ "$(timeout 10 xenstore-read /local/domain/$1/name 2>/dev/null)" = "$2" ]
}
# wait_gone NAME: until domain D_NAME is gone (or T seconds)
wait_gone() {
    n=$1; eval "d=\$D_$n"; t0=$(cut -d. -f1 /proc/uptime)
    while alive $d $n; do
        if [ $(( $(cut -d. -f1 /proc/uptime) - t0 )) -ge $T ]; then
            bad "$n: still running after ${T}s"; tail -5 /var/log/xen/console/guest-$n.log; return 1
        fi
        sleep 2
    done
    step "$n (domid $d) gone after $(( $(cut -d. -f1 /proc/uptime) - t0 ))s"
}
# console_has NAME TEXT SECONDS: wait for TEXT on the guest's console
console_has() {
    wait_for "$2" "$3" grep -q "$2" /var/log/xen/console/guest-$1.log
}
# procs_for DOMID: pids of processes started with -xen-domid DOMID
procs_for() {
    for p in /proc/[0-9]*; do
        c=$(tr '\0' ' ' < $p/cmdline 2>/dev/null)
        case "$c" in *"-xen-domid $1 "*) echo "${p#/proc/}";; esac
    done
}
# open_of FILE: pids with FILE open
open_of() {
    for p in /proc/[0-9]*; do
        ls -l $p/fd 2>/dev/null | grep -q " $1\$" && echo "${p#/proc/}"
    done
}
no_dm_left() { [ -z "$(procs_for $1)" ]; }
no_be_left() { ! xenstore-exists /local/domain/0/backend/qdisk/$1 2>/dev/null; }
no_open() { [ -z "$(open_of $1)" ]; }
# clean NAME DOMID [reboot]: nothing of that guest instance is left (after
# a reboot the next instance has the image open)
clean() {
    n=$1 d=$2 rb=${3:-}
    wait_for "dm exit" 20 no_dm_left $d && ok "$n: no device model process left for domid $d" ||
        bad "$n: device model of domid $d still running: $(procs_for $d)"
    wait_for "backend gone" 20 no_be_left $d && ok "$n: no backend/qdisk/$d left" ||
        bad "$n: backend/qdisk/$d still there: $(xenstore-ls /local/domain/0/backend/qdisk/$d 2>&1 | head -5)"
    [ -n "$rb" ] && return 0
    wait_for "image closed" 20 no_open /tmp/$n.img && ok "$n: /tmp/$n.img open nowhere" ||
        bad "$n: /tmp/$n.img still open by $(open_of /tmp/$n.img)"
    # (checked by verdict before; tmpfs is dom0's RAM)
    rm -f /tmp/$n.img
}
# verdict NAME COUNT: the guest reported success COUNT times; its marker is in the image
verdict() {
    n=$1 want=${2:-1}
    echo "----- $n console -----"; sed "s/^/  $n| /" /var/log/xen/console/guest-$n.log 2>/dev/null | tail -30
    got=$(grep -c 'DOMU-RESULT rc=0' /var/log/xen/console/guest-$n.log 2>/dev/null)
    [ "${got:-0}" -ge "$want" ] && ok "$n: guest verified its disk ($got boot(s))" || bad "$n: guest reported success $got time(s), want $want"
    m=$(dd if=/tmp/$n.img bs=512 skip=2048 count=1 2>/dev/null | head -c 64 | tr -d '\0')
    [ "$m" = "XENVM-DOMU-MARKER XENVM-DOM0-MARKER-$n" ] && ok "$n: guest's marker in the image" ||
        bad "$n: image at 1 MiB holds '$m'"
}

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
