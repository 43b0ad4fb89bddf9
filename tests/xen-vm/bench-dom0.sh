#!/bin/sh
# /test/run of tests/xen-vm/bench: fio in dom0 against the same RAM disk
# ($DISK: brd's /dev/ram0 or null_blk's /dev/nullb0, BENCH_DISK) reached five ways:
#   ours     xenbackd serve --io-engine threads (qdisk node set) -> dom0's xen-blkfront /dev/xvda
#   uring    the same with serve --io-engine io-uring (grant copy)
#   mapped   uring with --persistent-grants 1056 (Linux's blkfront asks for
#            them: the guest's pages mapped and kept)
#   blkback  the kernel's xen-blkback         -> /dev/xvda
#   qdisk    QEMU's qdisk (qemu-system-xen)   -> /dev/xvda
#   raw      $DISK itself, no PV layer
# BENCH_ROUNDS rounds; in round R the backend order is rotated by R-1, so no
# backend always runs first or last. Each backend runs all jobs in a row:
#   rr32 4k randread QD32 (IOPS)     rw32 4k randwrite QD32 (IOPS)
#   mix32 4k randrw 70/30 QD32 (IOPS, reads + writes)
#   rr1 4k randread QD1 (IOPS), rr1p50 / rr1p99 its completion latency (us)
#   sr1m 1M read QD8 (MiB/s)         sw1m 1M write QD8 (MiB/s)
# Prints "BENCHRES <round> <backend> <test> <value>" lines or
# "BENCHNA <backend> round <R>: <reason>".
# Env (kernel cmdline via boot --env): BENCH_SECS (default 5), BENCH_ROUNDS
# (default 3), BENCH_ONLY (colon list of backends, default all five),
# BENCH_FORMAT=qcow2: ours, uring and qdisk serve the fully allocated
# bench.qcow2 (made by the host's qemu-img) as params qcow2:PATH, in the
# ext4 file system the host made around it (/test/images/bench.ext4),
# written onto the RAM disk, mounted, and the image rewritten in place so
# that its blocks are allocated: O_DIRECT and non-blocking overwrites as on
# a host's disk (on /test's tmpfs, and on busybox's ext2, writes went to
# io_uring's io-wq threads, a context switch each).
# BENCH_SERVE_ARGS: more arguments for xenbackd serve, colons for spaces.
# BENCH_MODE=neighbour: instead of those jobs, two RAM disks attached as
# /dev/xvda (the attacker's) and /dev/xvdb (the neighbour's) from one
# backend; the neighbour's 4k random reads at QD1 alone, then beside each
# attacker on xvda (1M random read QD32, 1M random write QD32, 4k random
# read QD32): the neighbour's p50/p99 and its p99 over the undisturbed p99
# of the same round (n1p50 n1p99, then brp99 brx, bwp99 bwx, srp99 srx), and
# what the attacker got (brbw bwbw MiB/s, sriops IOPS). Raw disks only.
# BENCH_ATTACKER=domu (neighbour mode): the attacker is a PV domU of its
# own (domu-kit, 1 vCPU, created with xl, its vbd on $DISK from the same
# backend) running 32 dd of 1 MiB direct reads, then writes
# (domu-init.sh's domu.attack); the neighbour is dom0's xvdb as before.
# What the attacker got is read off $DISK's own counters (/sys/block/*/stat).
# BENCH_DISK: brd (default, /dev/ram0, bio-based), nullb (/dev/nullb0:
# null_blk, memory-backed, blk-mq as NVMe or SCSI disks are, completions
# inline) or nullio (null_blk with no memory: I/O costs no CPU, no data kept).
. /test/lib/vbd.sh
SECS=${BENCH_SECS:-5}
ROUNDS=${BENCH_ROUNDS:-3}
ONLY=,$(echo "${BENCH_ONLY:-ours,uring,blkback,qdisk,raw}" | tr : ,),
SIZE_MB=256
DEV=/dev/xvda DEV2=/dev/xvdb
say() { echo "BENCH [$(cut -d' ' -f1 /proc/uptime)]: $*"; }
na() { echo "BENCHNA $1 round $ROUND: $2"; }

FORMAT=${BENCH_FORMAT:-raw}
MODE=${BENCH_MODE:-jobs}
# make_disk MIB [COUNT]: the RAM disk $DISK of that size (and $DISK2 if COUNT is 2)
case ${BENCH_DISK:-brd} in
brd) DISK=/dev/ram0 DISK2=/dev/ram1
    make_disk() { modprobe brd rd_nr=${2:-1} rd_size=$(($1 * 1024)) max_part=0; } ;;
nullb|nullio) DISK=/dev/nullb0 DISK2=/dev/nullb1
    # nullio: no memory behind it, an I/O is done as soon as it is queued
    # (reads give whatever the buffer held), so storage costs no CPU, as
    # a DMA disk's does not; what is left is the backends' own work
    [ "$BENCH_DISK" = nullio ] && _mem=0 || _mem=1
    make_disk() {
        modprobe null_blk nr_devices=0 || return 1
        grep -q configfs /proc/mounts || mount -t configfs none /sys/kernel/config || return 1
        # (not _i: wait_for's own counter)
        _nb=0
        while [ $_nb -lt "${2:-1}" ]; do
            _n=/sys/kernel/config/nullb/nullb$_nb
            { mkdir $_n && echo $_mem > $_n/memory_backed && echo 0 > $_n/irqmode &&
                echo 512 > $_n/blocksize && echo "$1" > $_n/size && echo 1 > $_n/power &&
                wait_for nullb$_nb 10 is_blk /dev/nullb$_nb; } || return 1
            _nb=$((_nb + 1))
        done
    } ;;
*) say "BENCH_DISK takes brd, nullb or nullio"; exit 1 ;;
esac
NDISKS=1
ATTACKER=${BENCH_ATTACKER:-dom0}
if [ "$MODE" = neighbour ]; then
    [ "$FORMAT" = raw ] || { say "BENCH_MODE=neighbour takes raw disks only"; exit 1; }
    # two disks in dom0's 1 GiB
    NDISKS=2 SIZE_MB=128
    if [ "$ATTACKER" = domu ]; then
        [ -f /boot/domu/vmlinuz ] || { say "no /boot/domu (needs the domu-kit archive)"; exit 1; }
        mkdir -p /var/log/xen/console /var/lib/xen/dump /var/run/xen /var/lock /run/xen
        xenconsoled --log=guest --log-dir=/var/log/xen/console --pid-file=/run/xenconsoled.pid ||
            { say "xenconsoled did not start"; exit 1; }
    fi
fi
SERVE_ARGS=$(echo "${BENCH_SERVE_ARGS:-}" | tr : ' ')
[ -x /usr/bin/fio ] || { say "no fio in the image (needs the fio archive)"; exit 1; }
if [ "$FORMAT" = qcow2 ]; then
    FS=/test/images/bench.ext4 Q=/mnt/qcow2/bench.qcow2
    [ -f $FS ] || { say "no $FS"; exit 1; }
    make_disk $(( ($(stat -c %s $FS) + 1048575) / 1048576 )) &&
        dd if=$FS of=$DISK bs=1M 2>/dev/null && rm -f $FS && modprobe ext4 &&
        mkdir -p /mnt/qcow2 && mount -t ext4 $DISK /mnt/qcow2 &&
        dd if=$Q of=$Q bs=1M conv=notrunc 2>/dev/null ||
        { say "cannot put the image on ext4 on $DISK"; exit 1; }
    QIMG=/mnt/qcow2/bench.qcow2
    SIZE_MB=128 PARAMS=qcow2:$QIMG
    say "target qcow2 $QIMG ($(du -m $QIMG | cut -f1) MiB allocated, ${SIZE_MB}MiB virtual) on $(stat -f -c %T /mnt/qcow2) on $DISK"
else
    make_disk $SIZE_MB $NDISKS || { say "cannot make the RAM disk $DISK"; exit 1; }
    [ -b $DISK ] || { say "no $DISK"; exit 1; }
    # fill it once so that reads hit allocated pages everywhere
    dd if=/dev/zero of=$DISK bs=1M count=$SIZE_MB oflag=direct 2>/dev/null
    PARAMS=aio:$DISK PARAMS2=
    if [ $NDISKS = 2 ]; then
        [ -b $DISK2 ] || { say "no $DISK2"; exit 1; }
        dd if=/dev/zero of=$DISK2 bs=1M count=$SIZE_MB oflag=direct 2>/dev/null
        PARAMS2=aio:$DISK2
        say "target raw ram disks $DISK (the attacker's) and $DISK2 (the neighbour's) ${SIZE_MB}MiB each"
    else
        say "target raw ram disk $DISK ${SIZE_MB}MiB ($(phys_of $DISK))"
    fi
fi

# the I/O engine: libaio if fio and the kernel accept it, else psync
ENGINE=libaio
PROBE="--filename=$DISK --direct=1"; [ "$FORMAT" = qcow2 ] && PROBE="--filename=/tmp/probe.dat --direct=0"
/usr/bin/fio --name=probe $PROBE --rw=read --bs=4k --size=64k \
    --ioengine=libaio --minimal > /tmp/probe.out 2>&1 || ENGINE=psync
say "fio $(/usr/bin/fio --version), ioengine=$ENGINE, ${SECS}s per test, $ROUNDS rounds, cpus=$(grep -c ^processor /proc/cpuinfo)"
[ $ENGINE = psync ] && say "libaio refused: $(tail -1 /tmp/probe.out)"

# fio's terse (v3) output, one line of ';' fields: 7 read KiB/s, 8 read
# IOPS, 18-37 read completion-latency percentiles as "50.000000%=N" (us),
# 48 write KiB/s, 49 write IOPS.
# Each fio run is bounded: a hung backend gives "not available", not a hung VM.
fio() { timeout -s KILL $((SECS * 3 + 30)) /usr/bin/fio "$@" || { echo "fio exited with $? (137: killed by the time limit)" >&2; return 1; }; }
res() { echo "BENCHRES $ROUND $1 $2 $3"; }
# pct LINE P: the read completion-latency percentile P (e.g. 50.000000) in us
pct() { echo "$1" | awk -F';' -v p="$2%" '{ for (i = 18; i <= 37; i++) { split($i, kv, "="); if (kv[1] == p) { print kv[2]; exit } } }'; }
# job BACKEND NAME FIO-ARGS...: one fio run; the terse line in $R
job() {
    _b=$1 _n=$2; shift 2
    # Mid-run: io_uring's io-wq workers alive (threads named iou-wrk-*, of
    # whichever process submits): operations the kernel could not do
    # without blocking go to them, a context switch each way.
    # Only with BENCH_IOWQ=1: the count costs instructions, which icount times.
    _s=
    if [ -n "${BENCH_IOWQ:-}" ]; then
        ( sleep $((SECS / 2 + 1)); say "$_b $_n: $(cat /proc/[0-9]*/task/[0-9]*/comm 2>/dev/null | grep -c '^iou-wrk') io-wq workers" ) &
        _s=$!
    fi
    R=$(fio --name="$_n" $COMMON "$@" 2>/tmp/fio.err) || { [ -z "$_s" ] || wait $_s; na "$_b" "fio $_n failed: $(tail -1 /tmp/fio.err)"; return 1; }
    [ -z "$_s" ] || wait $_s
    if [ -z "$RAWDONE" ]; then echo "BENCHRAW $_n $R"; fi
}
runfio() {
    b=$1 t=$2
    COMMON="--filename=$t --direct=1 --ioengine=$ENGINE --time_based --runtime=$SECS --ramp_time=1 --size=${SIZE_MB}M --minimal"
    job "$b" rr32 --rw=randread --bs=4k --iodepth=32 || return 1
    res "$b" rr32 "$(echo "$R" | cut -d';' -f8)"
    job "$b" rw32 --rw=randwrite --bs=4k --iodepth=32 || return 1
    res "$b" rw32 "$(echo "$R" | cut -d';' -f49)"
    job "$b" mix32 --rw=randrw --rwmixread=70 --bs=4k --iodepth=32 || return 1
    res "$b" mix32 "$(echo "$R" | awk -F';' '{print $8 + $49}')"
    job "$b" rr1 --rw=randread --bs=4k --iodepth=1 || return 1
    res "$b" rr1 "$(echo "$R" | cut -d';' -f8)"
    res "$b" rr1p50 "$(pct "$R" 50.000000)"
    res "$b" rr1p99 "$(pct "$R" 99.000000)"
    job "$b" sr1m --rw=read --bs=1M --iodepth=8 || return 1
    res "$b" sr1m "$(echo "$R" | cut -d';' -f7 | awk '{printf "%.1f", $1/1024}')"
    job "$b" sw1m --rw=write --bs=1M --iodepth=8 || return 1
    res "$b" sw1m "$(echo "$R" | cut -d';' -f48 | awk '{printf "%.1f", $1/1024}')"
    RAWDONE=1
}
# The neighbour's QD1 reads on $2 alone, then beside each attacker on $1
runneighbour() {
    b=$1 ta=$2 tn=$3
    COMMON="--filename=$tn --direct=1 --ioengine=$ENGINE --time_based --runtime=$SECS --ramp_time=1 --size=${SIZE_MB}M --minimal --rw=randread --bs=4k --iodepth=1"
    job "$b" alone || return 1
    _alone=$(pct "$R" 99.000000)
    res "$b" n1p50 "$(pct "$R" 50.000000)"
    res "$b" n1p99 "$_alone"
    if [ "$ATTACKER" = domu ]; then
        for _a in "br read" "bw write"; do
            set -- $_a
            domu_attack "$2" || { na "$b" "attacker domU ($2): $ATT_WHY"; domu_attack_stop; return 1; }
            _s0=$(disk_sectors $ATT_DISK $2) _t0=$(cut -d' ' -f1 /proc/uptime)
            job "$b" "beside-$1" || { domu_attack_stop; return 1; }
            _s1=$(disk_sectors $ATT_DISK $2) _t1=$(cut -d' ' -f1 /proc/uptime)
            domu_attack_stop
            _p99=$(pct "$R" 99.000000)
            res "$b" "${1}p99" "$_p99"
            res "$b" "${1}x" "$(awk -v a="$_p99" -v u="$_alone" 'BEGIN { if (u > 0) printf "%.2f", a / u }')"
            # (brd keeps no I/O counters)
            [ "$_s1" = 0 ] || res "$b" "${1}bw" "$(awk -v s=$((_s1 - _s0)) -v a="$_t0" -v z="$_t1" 'BEGIN { printf "%.1f", s / 2048 / (z - a) }')"
        done
        return 0
    fi
    # KEY RW BS: the attacker runs from 1 s before the neighbour's fio until
    # after its end (its ramp, SECS, and fio's start under TCG)
    for _a in "br read 1M" "bw write 1M" "sr read 4k"; do
        set -- $_a
        timeout -s KILL $((SECS * 3 + 30)) /usr/bin/fio --name="attack-$1" --filename="$ta" --direct=1 \
            --ioengine=$ENGINE --time_based --runtime=$((SECS + 5)) --size=${SIZE_MB}M --minimal \
            --rw=rand$2 --bs=$3 --iodepth=32 > /tmp/attack.out 2>&1 &
        _ap=$!
        sleep 1
        job "$b" "beside-$1" || { wait $_ap; return 1; }
        wait $_ap || { na "$b" "attacker $1 failed: $(tail -1 /tmp/attack.out)"; return 1; }
        _p99=$(pct "$R" 99.000000)
        res "$b" "${1}p99" "$_p99"
        res "$b" "${1}x" "$(awk -v a="$_p99" -v u="$_alone" 'BEGIN { if (u > 0) printf "%.2f", a / u }')"
        case $1 in
        br) res "$b" brbw "$(cut -d';' -f7 /tmp/attack.out | awk '{printf "%.1f", $1/1024}')" ;;
        bw) res "$b" bwbw "$(cut -d';' -f48 /tmp/attack.out | awk '{printf "%.1f", $1/1024}')" ;;
        sr) res "$b" sriops "$(cut -d';' -f8 /tmp/attack.out)" ;;
        esac
    done
}
# disk_sectors DEV read|write: sectors read (or written) on DEV so far
disk_sectors() {
    case $2 in read) _f=3 ;; *) _f=7 ;; esac
    awk -v f=$_f '{ print $f }' /sys/block/${1#/dev/}/stat
}
# domu_attack read|write: the attacker domU created, its vbd ($kind, on
# $ATT_DISK, as the attach of xvda would be) attached, started, and
# attacking (its console says so); ATT_WHY on failure
domu_attack() {
    ATT_WHY=
    rm -f /var/log/xen/console/guest-attacker.log
    # a pCPU of its own if there is one beyond dom0's (bench --attacker
    # domu boots 3 with dom0's vCPUs pinned), else Xen shares them
    _pc=$(xl info 2>/dev/null | sed -n 's/^nr_cpus *: *//p')
    _pin=; [ "${_pc:-2}" -gt 2 ] && _pin="cpus = \"$((_pc - 1))\""
    cat > /tmp/attacker.cfg <<CFG
$_pin
name = "attacker"
type = "pv"
kernel = "/boot/domu/vmlinuz"
ramdisk = "/boot/domu/initrd.cpio.gz"
extra = "console=hvc0 loglevel=4 domu.wait=90 domu.attack=$1"
memory = 128
vcpus = 1
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
CFG
    xl create -p /tmp/attacker.cfg > /tmp/xl-attacker.log 2>&1 || { ATT_WHY="xl create: $(tail -1 /tmp/xl-attacker.log)"; return 1; }
    _ad=$(xl domid attacker) || { ATT_WHY="xl domid"; return 1; }
    vbd_attach "$kind" "$_ad" 51712 "$params" "$phys" || { ATT_WHY="xenstore writes"; return 1; }
    ATT_B=$VBD_B ATT_F=$VBD_F
    xl unpause attacker || { ATT_WHY="xl unpause"; return 1; }
    wait_for "attacker" 180 grep -q "DOMU: attacking" /var/log/xen/console/guest-attacker.log ||
        { ATT_WHY="no attack after 180 s: $(tail -1 /var/log/xen/console/guest-attacker.log 2>/dev/null)"; return 1; }
    say "$b: attacker dom$_ad $1 after ${WAITED}s${_pin:+ ($_pin)}: $(grep 'DOMU: attacking' /var/log/xen/console/guest-attacker.log)"
    # its 32 dd under way
    sleep 2
}
# domu_attack_stop: the attacker destroyed and its vbd removed (the
# toolstack's part: the backend directory goes, the backend lets go)
domu_attack_stop() {
    xl domid attacker >/dev/null 2>&1 && xl destroy attacker
    [ -z "${ATT_B:-}" ] || { xenstore-rm "$ATT_B"; xenstore-rm "$ATT_F"; } 2>/dev/null
    ATT_B= ATT_F=
    sleep 2
}
# attach_one NAME DEVID PARAMS PHYS: one vbd, saved as VBD_B_NAME/VBD_F_NAME
attach_one() {
    vbd_attach "$kind" 0 "$2" "$3" "$4" || return 1
    eval "VBD_B_$1=\$VBD_B VBD_F_$1=\$VBD_F"
}
# detach_one NAME DEVICE: detach it and wait for DEVICE to go
detach_one() {
    eval "VBD_B=\$VBD_B_$1 VBD_F=\$VBD_F_$1"
    vbd_detach || say "$b: backend of $2 did not reach Closed"
    wait_for "$2 gone" 20 no_blk "$2" || { say "$b: $2 still present after detach"; STUCK=1; }
}
# through BACKEND KIND PARAMS [PHYS [PARAMS2 PHYS2]]: attach $DISK to dom0
# as /dev/xvda (and $DISK2 as /dev/xvdb in neighbour mode), bench, detach
through() {
    b=$1 kind=$2 params=$3 phys=${4:-} params2=${5:-} phys2=${6:-}
    _devs=$DEV
    if [ "$ATTACKER" = domu ]; then
        # xvda goes to the attacker domU (domu_attack), xvdb to dom0
        _devs=$DEV2
        ATT_DISK=${params#aio:}
    else
        attach_one a 51712 "$params" "$phys" || { na "$b" "xenstore writes failed"; return 1; }
    fi
    if [ $NDISKS = 2 ]; then
        [ "$ATTACKER" = domu ] || _devs="$DEV $DEV2"
        attach_one n 51728 "$params2" "$phys2" || { na "$b" "xenstore writes failed"; [ "$ATTACKER" = domu ] || detach_one a $DEV; return 1; }
    fi
    _r=0
    for _d in $_devs; do
        if ! wait_for "$_d" 30 is_blk $_d; then
            na "$b" "$_d did not appear within 30s (backend state $(xenstore-read $VBD_B/state 2>&1))"
            _r=1; break
        fi
        _s=${_d#/dev/}
        say "$b: $_d after ${WAITED}s, $(cat /sys/block/$_s/size) sectors, queue $(cat /sys/block/$_s/queue/max_sectors_kb 2>/dev/null)KiB max, $(ls /sys/block/$_s/mq 2>/dev/null | wc -l) queues"
    done
    if [ $_r = 0 ]; then
        if [ $NDISKS = 2 ]; then runneighbour "$b" $DEV $DEV2; else runfio "$b" $DEV; fi
        _r=$?
    fi
    [ "$ATTACKER" = domu ] || detach_one a $DEV
    [ $NDISKS = 1 ] || detach_one n $DEV2
    return $_r
}
# bench_one BACKEND: one backend's jobs in the current round
bench_one() {
    case $FORMAT,$1 in
    qcow2,raw|qcow2,blkback) na "$1" "not with BENCH_FORMAT=qcow2"; return 1 ;;
    esac
    case $1 in
    raw)
        if [ "$ATTACKER" = domu ]; then na raw "no PV layer to give a domU"; return 1; fi
        if [ $NDISKS = 2 ]; then runneighbour raw $DISK $DISK2; else runfio raw $DISK; fi ;;
    blkback)
        _p2=; [ $NDISKS = 1 ] || _p2=$(phys_of $DISK2)
        through blkback vbd $DISK "$(phys_of $DISK)" "${_p2:+$DISK2}" "$_p2" ;;
    qdisk)
        if qemu_qdisk_start 0; then
            through qdisk qdisk $PARAMS "" "$PARAMS2"; _q=$?
            qemu_qdisk_stop 0; return $_q
        fi
        na qdisk "$QEMU_WHY"; return 1 ;;
    ours|uring|mapped)
        _x=
        case $1 in ours) _e=threads ;; uring) _e=io-uring ;; mapped) _e=io-uring _x="--persistent-grants 1056" ;; esac
        # shellcheck disable=SC2086 # words on purpose
        if xenbackd_start --io-engine $_e $_x $SERVE_ARGS; then
            through "$1" qdisk $PARAMS "" "$PARAMS2" || { tail -20 /tmp/xenbackd.log | sed 's/^/  xenbackd| /'; xenbackd_stop; return 1; }
            xenbackd_stop
        else
            na "$1" "$XENBACKD_WHY"; return 1
        fi ;;
    esac
}

ALL=
for b in raw blkback qdisk ours uring mapped; do
    case $ONLY in *,$b,*) ALL="$ALL $b" ;; esac
done
N=$(echo $ALL | wc -w)
RAWDONE= STUCK=
ROUND=1
while [ $ROUND -le $ROUNDS ]; do
    # rotate by ROUND-1
    set -- $ALL; k=1
    while [ $k -lt $ROUND ] && [ $N -gt 1 ]; do _f=$1; shift; set -- "$@" "$_f"; k=$((k + 1)); done
    say "round $ROUND of $ROUNDS: $*"
    for b in "$@"; do
        if [ -n "$STUCK" ] && [ "$b" != raw ]; then na "$b" "skipped: $DEV stuck after an earlier detach"; continue; fi
        bench_one "$b"
    done
    ROUND=$((ROUND + 1))
done
say "done"
exit 0
