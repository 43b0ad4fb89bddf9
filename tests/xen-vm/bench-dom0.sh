#!/bin/sh
# /test/run of tests/xen-vm/bench: fio in dom0 against the same RAM disk
# (brd, /dev/ram0) reached four ways:
#   ours     xenbackd serve --io-engine threads (qdisk node set) -> dom0's xen-blkfront /dev/xvda
#   uring    the same with serve --io-engine io-uring
#   blkback  the kernel's xen-blkback         -> /dev/xvda
#   qdisk    QEMU's qdisk (qemu-system-xen)   -> /dev/xvda
#   raw      /dev/ram0 itself, no PV layer
# Prints "BENCHRES <backend> <test> <value>" lines (randread4k in IOPS,
# seqread1m/seqwrite1m in MiB/s) or "BENCHNA <backend> <reason>".
# Env (kernel cmdline via boot --env): BENCH_SECS (default 8), BENCH_ONLY
# (comma list of backends, default ours,blkback,qdisk,raw).
. /test/lib/vbd.sh
SECS=${BENCH_SECS:-8}
ONLY=,$(echo "${BENCH_ONLY:-ours,uring,blkback,qdisk,raw}" | tr : ,),
SIZE_MB=256
DEV=/dev/xvda
say() { echo "BENCH [$(cut -d' ' -f1 /proc/uptime)]: $*"; }
na() { echo "BENCHNA $1 $2"; }

[ -x /usr/bin/fio ] || { say "no fio in the image (needs the fio archive)"; exit 1; }
modprobe brd rd_nr=1 rd_size=$((SIZE_MB * 1024)) max_part=0 || { say "modprobe brd failed"; exit 1; }
[ -b /dev/ram0 ] || { say "no /dev/ram0"; exit 1; }
# fill it once so that reads hit allocated pages everywhere
dd if=/dev/zero of=/dev/ram0 bs=1M count=$SIZE_MB oflag=direct 2>/dev/null
say "ram disk /dev/ram0 ${SIZE_MB}MiB ($(phys_of /dev/ram0))"

# the I/O engine: libaio if fio and the kernel accept it, else psync
ENGINE=libaio
fio --name=probe --filename=/dev/ram0 --rw=read --bs=4k --size=64k --direct=1 \
    --ioengine=libaio --minimal > /tmp/probe.out 2>&1 || ENGINE=psync
say "fio $(fio --version), ioengine=$ENGINE, ${SECS}s per test, cpus=$(grep -c ^processor /proc/cpuinfo)"
[ $ENGINE = psync ] && say "libaio refused: $(tail -1 /tmp/probe.out)"

# runfio BACKEND TARGET: the three tests; field 8 = read IOPS, 7 = read KiB/s,
# 48 = write KiB/s in fio's terse (v3) output
# Each fio run is bounded: a hung backend gives "not available", not a hung VM.
fio() { timeout -s KILL $((SECS * 3 + 30)) /usr/bin/fio "$@" || { echo "fio exited with $? (137: killed by the time limit)" >&2; return 1; }; }
runfio() {
    b=$1 t=$2
    common="--filename=$t --direct=1 --ioengine=$ENGINE --time_based --runtime=$SECS --ramp_time=1 --size=${SIZE_MB}M --minimal"
    r=$(fio --name=rr $common --rw=randread --bs=4k --iodepth=32 2>/tmp/fio.err) || { na "$b" "fio randread failed: $(tail -1 /tmp/fio.err)"; return 1; }
    echo "BENCHRES $b randread4k $(echo "$r" | cut -d';' -f8)"
    r=$(fio --name=sr $common --rw=read --bs=1M --iodepth=8 2>/tmp/fio.err) || { na "$b" "fio read failed: $(tail -1 /tmp/fio.err)"; return 1; }
    echo "BENCHRES $b seqread1m $(echo "$r" | cut -d';' -f7 | awk '{printf "%.1f", $1/1024}')"
    r=$(fio --name=sw $common --rw=write --bs=1M --iodepth=8 2>/tmp/fio.err) || { na "$b" "fio write failed: $(tail -1 /tmp/fio.err)"; return 1; }
    echo "BENCHRES $b seqwrite1m $(echo "$r" | cut -d';' -f48 | awk '{printf "%.1f", $1/1024}')"
}
# through KIND PARAMS [PHYS]: attach /dev/ram0 to dom0, bench /dev/xvda, detach
through() {
    b=$1 kind=$2 params=$3 phys=${4:-}
    vbd_attach "$kind" 0 51712 "$params" "$phys" || { na "$b" "xenstore writes failed"; return 1; }
    if ! wait_for xvda 30 is_blk $DEV; then
        na "$b" "$DEV did not appear within 30s (backend state $(xenstore-read $VBD_B/state 2>&1))"
        vbd_detach; return 1
    fi
    say "$b: $DEV after ${WAITED}s, $(cat /sys/block/xvda/size) sectors, queue $(cat /sys/block/xvda/queue/max_sectors_kb 2>/dev/null)KiB max"
    runfio "$b" $DEV
    vbd_detach || say "$b: backend did not reach Closed"
    wait_for "xvda gone" 20 no_blk $DEV || say "$b: $DEV still present after detach"
}

case $ONLY in *,raw,*)
    runfio raw /dev/ram0 ;;
esac
case $ONLY in *,blkback,*)
    through blkback vbd /dev/ram0 "$(phys_of /dev/ram0)" ;;
esac
case $ONLY in *,qdisk,*)
    if qemu_qdisk_start 0; then
        through qdisk qdisk aio:/dev/ram0
        qemu_qdisk_stop 0
    else
        na qdisk "$QEMU_WHY"
    fi ;;
esac
case $ONLY in *,ours,*)
    if xenbackd_start --io-engine threads; then
        through ours qdisk aio:/dev/ram0 || tail -20 /tmp/xenbackd.log | sed 's/^/  xenbackd| /'
        xenbackd_stop
    else
        na ours "$XENBACKD_WHY"
    fi ;;
esac
case $ONLY in *,uring,*)
    if xenbackd_start --io-engine io-uring; then
        through uring qdisk aio:/dev/ram0 || tail -20 /tmp/xenbackd.log | sed 's/^/  xenbackd| /'
        xenbackd_stop
    else
        na uring "$XENBACKD_WHY"
    fi ;;
esac
say "done"
exit 0
