# Shell helpers for scenarios that run PV guests with the real toolstack
# (xl) and xenbackd as their device model; busybox sh. Source it after
# /test/lib/vbd.sh, with ok, bad, step and T (seconds a guest may take)
# defined by the scenario.
#
# xl_setup: xenconsoled started (guest consoles logged in
#   /var/log/xen/console/guest-NAME.log), a check that the image has no
#   QEMU, DM_PATH set to libxl's compiled-in device model path. Non-zero if
#   xenconsoled did not start.
xl_setup() {
    mkdir -p /var/log/xen/console /var/lib/xen/dump /var/run/xen /var/lock /run/xen
    xenconsoled --log=guest --log-dir=/var/log/xen/console --pid-file=/run/xenconsoled.pid || return 1
    # No QEMU anywhere; which path libxl would run.
    # (xldisk installs xenbackd at libxl's QEMU path: that one is not QEMU)
    q=$(find / -xdev \( -name 'qemu-system-*' -o -name 'xen-qemu-system-*' \) 2>/dev/null |
        while read -r f; do cmp -s "$f" /test/xenbackd || echo "$f"; done | head -3)
    [ -z "$q" ] && ok "no QEMU in the image" || bad "QEMU found: $q"
    LIBXL=$(ls /usr/lib/x86_64-linux-gnu/libxenlight.so.* 2>/dev/null | head -1)
    DM_PATH=
    for p in /usr/libexec/xen-qemu-system-i386 /usr/lib/xen-4.17/bin/qemu-system-i386 /usr/local/lib/xen/bin/qemu-system-i386; do
        grep -q "$p" "$LIBXL" && { DM_PATH=$p; break; }
    done
    step "libxl's compiled-in device model: ${DM_PATH:-not found in $LIBXL}"
}

# xl_logs NAME...: destroys those guests if still there, prints the tails of
# the xl and device-model logs; a panic in one is a failure.
xl_logs() {
    for n in "$@"; do xl domid $n >/dev/null 2>&1 && xl destroy $n; done
    for f in /var/log/xen/xl-*.log /var/log/xen/qemu-dm-*.log; do
        [ -f "$f" ] || continue
        echo "----- $f (tail) -----"; tail -15 "$f"
        grep -qi 'panick' "$f" && bad "$f: xenbackd panicked"
    done
}

# cfg NAME MODE [override]: xl.cfg of a guest with a qdisk disk on
# /tmp/NAME.img (raw, made here), or the disk spec XL_DISK if set (its
# image made by the caller)
cfg() {
    n=$1 mode=$2 ovr=${3:-}
    disk=${XL_DISK:-format=raw,vdev=xvda,access=rw,backendtype=qdisk,target=/tmp/$n.img}
    if [ -z "${XL_DISK:-}" ]; then
        dd if=/dev/zero of=/tmp/$n.img bs=1M count=32 2>/dev/null
        printf 'XENVM-DOM0-MARKER-%s' "$n" | dd of=/tmp/$n.img conv=notrunc 2>/dev/null
    fi
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
disk = ['$disk']
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
# alive DOMID NAME: gone only after two failed reads in a row, a second apart
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
