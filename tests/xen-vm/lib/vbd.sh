# Shell helpers for vbd scenarios inside dom0 (busybox sh): the toolstack's
# part of attaching a block device, the node set `xl block-attach` writes.
# Source it: . /test/lib/vbd.sh
#
# vbd_attach KIND FE DEVID PARAMS [PHYS]
#   KIND  vbd (kernel xen-blkback; PHYS = hex major:minor of PARAMS' device)
#         or qdisk (QEMU's backend or xenbackd serve; PARAMS = aio:/path)
#   FE    frontend domid (0 = dom0 attaches to itself)
#   DEVID virtual-device (51712 = xvda, 51728 = xvdb)
# Sets VBD_B and VBD_F to the backend and frontend directories.
vbd_attach() {
    _k=$1 _fe=$2 _dev=$3 _params=$4 _phys=${5:-}
    VBD_B=/local/domain/0/backend/$_k/$_fe/$_dev
    VBD_F=/local/domain/$_fe/device/vbd/$_dev
    # one xenstore-write call is one transaction
    xenstore-write \
      $VBD_F/backend $VBD_B  $VBD_F/backend-id 0  $VBD_F/state 1 \
      $VBD_F/virtual-device $_dev  $VBD_F/device-type disk \
      $VBD_B/frontend $VBD_F  $VBD_B/frontend-id $_fe  $VBD_B/online 1  $VBD_B/state 1 \
      $VBD_B/removable 0  $VBD_B/bootable 1  $VBD_B/dev xvda  $VBD_B/type phy \
      $VBD_B/mode w  $VBD_B/device-type disk  $VBD_B/params "$_params" || return 1
    # backend dir owned by dom0 and readable by the frontend; frontend dir
    # owned by the frontend and readable by dom0
    xenstore-chmod -r $VBD_B n0 r$_fe || return 1
    xenstore-chmod -r $VBD_F n$_fe r0 || return 1
    if [ -n "$_phys" ]; then
        # what the block hotplug script writes once the device is set up
        xenstore-write $VBD_B/physical-device "$_phys" $VBD_B/physical-device-path "$_params" || return 1
    fi
}

# phys_of BLOCKDEV: hex major:minor as blkback's physical-device wants it
phys_of() {
    printf '%x:%x' $(( $(stat -c '0x%t' "$1") )) $(( $(stat -c '0x%T' "$1") ))
}

# wait_for DESC SECONDS CMD...: poll CMD every 0.1 s; 0 once it succeeds
wait_for() {
    _d=$1 _s=$2; shift 2; _i=0
    while ! "$@"; do
        _i=$((_i + 1)); [ $_i -ge $((_s * 10)) ] && return 1
        sleep 0.1
    done
    WAITED=$((_i / 10)).$((_i % 10))
    return 0
}
is_blk() { [ -b "$1" ]; }
no_blk() { [ ! -b "$1" ]; }
be_state_is() { [ "$(xenstore-read "$VBD_B/state" 2>/dev/null)" = "$1" ]; }
# Closed (6), or the backend removed its own directory (QEMU's xen-bus does)
be_closed_or_gone() {
    _st=$(xenstore-read "$VBD_B/state" 2>/dev/null) || { ! xenstore-exists "$VBD_B" 2>/dev/null; return; }
    [ "$_st" = 6 ]
}

# vbd_detach: like xl block-detach: backend online=0 and state=5 (Closing),
# wait for Closed (6) or the backend directory gone, then remove both
# directories. 0 if the backend closed.
vbd_detach() {
    _rc=0
    xenstore-write $VBD_B/online 0 $VBD_B/state 5
    wait_for "backend Closed" 20 be_closed_or_gone || _rc=1
    xenstore-rm $VBD_F; xenstore-rm $VBD_B
    return $_rc
}

# xenbackd_start: `xenbackd serve [ARGS]` in the background, log appended to
# /tmp/xenbackd.log; fails if the binary has no serve command or exits at once.
# XENBACKD_IO_ENGINE (run-scenarios --env) picks serve's --io-engine.
xenbackd_start() {
    [ -x /test/xenbackd ] || { XENBACKD_WHY="no /test/xenbackd"; return 1; }
    RUST_LOG=${RUST_LOG:-info} /test/xenbackd serve ${XENBACKD_IO_ENGINE:+--io-engine $XENBACKD_IO_ENGINE} "$@" >> /tmp/xenbackd.log 2>&1 &
    XENBACKD_PID=$!
    sleep 1
    if ! kill -0 $XENBACKD_PID 2>/dev/null; then
        if grep -q 'unknown command' /tmp/xenbackd.log; then
            XENBACKD_WHY="this xenbackd has no serve command"
        else
            XENBACKD_WHY="xenbackd serve exited: $(tail -2 /tmp/xenbackd.log | tr '\n' ' ')"
        fi
        return 1
    fi
}
# xenbackd_stop: SIGTERM (the daemon finishes its requests in flight and
# exits, leaving devices Connected for the next serve); SIGKILL after 10 s,
# which sets XENBACKD_KILLED
xenbackd_stop() {
    XENBACKD_KILLED=
    [ -n "${XENBACKD_PID:-}" ] || return 0
    kill $XENBACKD_PID 2>/dev/null
    wait_for "xenbackd exit" 10 eval "! kill -0 $XENBACKD_PID 2>/dev/null" ||
        { kill -9 $XENBACKD_PID 2>/dev/null; XENBACKD_KILLED=1; }
    XENBACKD_PID=
}

# qemu_qdisk_start: QEMU's qdisk backend for frontend domain FE (QEMU's xen-bus
# serves only backend/qdisk/<its -xen-domid>/*, so one QEMU per frontend)
qemu_qdisk_start() {
    _q=/usr/lib/xen-4.17/bin/qemu-system-i386
    [ -x $_q ] || { QEMU_WHY="no $_q (needs the qemu-xen archive)"; return 1; }
    mkdir -p /run/xen
    $_q -xen-domid "$1" -xen-attach -name "qdisk-$1" -nographic -M xenpv -daemonize \
        -monitor /dev/null -serial /dev/null -parallel /dev/null -nodefaults \
        -no-user-config -pidfile "/run/xen/qemu-dom$1.pid" -D "/tmp/qemu-dom$1.log" ||
        { QEMU_WHY="qemu-system-i386 failed to start"; return 1; }
}
qemu_qdisk_stop() {
    kill "$(cat "/run/xen/qemu-dom$1.pid" 2>/dev/null)" 2>/dev/null
    sleep 0.5
}
