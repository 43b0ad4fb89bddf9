#!/bin/sh
# timeout: 900
# needs: domu-kit
# Scenario 4: block, to real PV guests. Tiny busybox domUs are created with
# `xl create -p`; this script plays the toolstack and writes each guest's vbd
# (qdisk node set, params aio:FILE) for ONE `xenbackd serve` to serve. Each
# guest (domu-init.sh) checks the marker dom0 wrote at offset 0, writes its
# own marker at 1 MiB and a 1 MiB pattern it reads back, and powers off; dom0
# then checks the guest's marker in the backing file. First one guest, then
# two guests at once from the same daemon; DOMU_ROUNDS times (default 1),
# all from the same daemon.
# Env: DOMU_MEM (MiB, default 128), DOMU_TIMEOUT (s, default 300),
#      DOMU_BACKEND=ours (default) or vbd (the kernel's blkback on a loop
#      device, to compare or to check this script without xenbackd).
. /test/lib/vbd.sh
. /test/lib/xl.sh # alive
DEVID=51712
BACKEND=${DOMU_BACKEND:-ours}
. /test/lib/checks.sh
checks_begin domu DOMU
finish() {
    for n in domu1 domu2 domu3; do xl domid $n >/dev/null 2>&1 && xl destroy $n; done
    xenbackd_log_end
    checks_end
}
[ -f /boot/domu/vmlinuz ] || { bad "no /boot/domu (the domu-kit archive is missing)"; finish; }
mkdir -p /var/log/xen/console /var/lib/xen/dump /run/xen /var/lock
xenconsoled --log=guest --log-dir=/var/log/xen/console --pid-file=/run/xenconsoled.pid || { bad "xenconsoled"; finish; }
if [ "$BACKEND" = ours ]; then
    if ! xenbackd_start; then bad "domu: $XENBACKD_WHY"; finish; fi
    step "xenbackd serve pid $XENBACKD_PID"
fi

# create_domu NAME: paused domU with a vbd served by xenbackd; sets DOMID_<NAME>
create_domu() {
    n=$1
    # a new console log: the verdict must come from this guest's boot
    rm -f /var/log/xen/console/guest-$n.log
    cat > /tmp/$n.cfg <<CFG
name = "$n"
type = "pv"
kernel = "/boot/domu/vmlinuz"
ramdisk = "/boot/domu/initrd.cpio.gz"
extra = "console=hvc0 loglevel=4 domu.wait=90"
memory = ${DOMU_MEM:-128}
vcpus = 1
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
CFG
    xl create -p /tmp/$n.cfg > /tmp/xl-$n.log 2>&1 || { cat /tmp/xl-$n.log; bad "$n: xl create -p"; return 1; }
    d=$(xl domid $n) || { bad "$n: xl domid"; return 1; }
    dd if=/dev/zero of=/tmp/$n.img bs=1M count=32 2>/dev/null
    printf 'XENVM-DOM0-MARKER-%s' "$d" | dd of=/tmp/$n.img conv=notrunc 2>/dev/null
    if [ "$BACKEND" = ours ]; then
        vbd_attach qdisk "$d" $DEVID "aio:/tmp/$n.img" || { bad "$n: xenstore writes"; return 1; }
    else
        l=$(losetup -f) && losetup "$l" /tmp/$n.img || { bad "$n: losetup"; return 1; }
        vbd_attach vbd "$d" $DEVID "$l" "$(phys_of "$l")" || { bad "$n: xenstore writes"; return 1; }
    fi
    eval "B_$n=$VBD_B"
    eval "DOMID_$n=$d"
    step "$n: domid $d, vbd $VBD_B -> /tmp/$n.img"
}
# check_domu NAME: after the guest is gone, its verdict and its marker
check_domu() {
    n=$1; eval "d=\$DOMID_$n"
    echo "----- $n console -----"; sed "s/^/  $n| /" /var/log/xen/console/guest-$n.log 2>/dev/null
    grep -q 'DOMU-RESULT rc=0' /var/log/xen/console/guest-$n.log 2>/dev/null &&
        ok "$n: guest read dom0's marker and verified its own 1 MiB pattern" ||
        bad "$n: guest did not report success"
    sync
    m=$(dd if=/tmp/$n.img bs=512 skip=2048 count=1 2>/dev/null | head -c 64 | tr -d '\0')
    case "$m" in
        "XENVM-DOMU-MARKER XENVM-DOM0-MARKER-$d") ok "$n: guest's marker in the backing file: '$m'";;
        *) bad "$n: backing file at 1 MiB holds '$m'";;
    esac
    eval "xenstore-rm \$B_$n" 2>/dev/null
}
# run_domus NAME...: create all paused, unpause all, wait until all are gone
run_domus() {
    for n in "$@"; do create_domu $n || return 1; done
    for n in "$@"; do xl unpause $n || bad "$n: xl unpause"; done
    step "unpaused: $*"
    T=${DOMU_TIMEOUT:-300}; t0=$(cut -d. -f1 /proc/uptime)
    while :; do
        left=
        for n in "$@"; do eval "d=\$DOMID_$n"; alive $d $n && left="$left $n"; done
        [ -z "$left" ] && break
        el=$(( $(cut -d. -f1 /proc/uptime) - t0 ))
        if [ $el -ge $T ]; then
            bad "still running after ${T}s:$left"
            timeout 20 xl list 2>&1; ps | grep -v ' \[' | tail -25; dmesg | tail -15
            break
        fi
        if [ $((el / 20)) != "${last:-}" ]; then
            last=$((el / 20)); st=
            for n in $left; do
                eval "d=\$DOMID_$n; b=\$B_$n"
                st="$st $n(be=$(timeout 5 xenstore-read $b/state 2>&1) fe=$(timeout 5 xenstore-read /local/domain/$d/device/vbd/$DEVID/state 2>&1) console=$(tail -1 /var/log/xen/console/guest-$n.log 2>/dev/null | cut -c1-60))"
            done
            step "waiting ${el}s:$st"
        fi
        sleep 2
    done
    step "guests gone after $(( $(cut -d. -f1 /proc/uptime) - t0 ))s"
    for n in "$@"; do check_domu $n; done
    [ "$BACKEND" = ours ] || return 0
    kill -0 $XENBACKD_PID 2>/dev/null && ok "xenbackd alive after: $*" || bad "xenbackd died serving: $*"
}

ROUNDS=${DOMU_ROUNDS:-1}
for round in $(seq 1 $ROUNDS); do
    step "---- round $round of $ROUNDS: one guest"
    run_domus domu1
    step "---- round $round of $ROUNDS: two guests at once, one daemon"
    run_domus domu2 domu3
done
finish
