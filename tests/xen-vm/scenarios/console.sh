#!/bin/sh
# timeout: 600
# needs: domu-kit
# Issue 16 on real Xen, with the real toolstack and no QEMU in the image:
#  1. Channels: `xl create` of a PV guest with a pty channel and a unix
#     socket channel (xl.cfg `channel = [...]`), xenbackd its device model.
#     The guest (domu-init.sh, domu.chan) writes a line to each of
#     /dev/hvc1 and /dev/hvc2 and reads one back, then sends 256 KiB of
#     random bytes on the socket channel: dom0 reads the pty named in the
#     frontend's `tty` node and the socket (unixcat) and must get exactly
#     those bytes; `xl channel-list` lists both. After `xl shutdown` no
#     device model, no backend/console node and no socket file are left.
#  2. The primary console without xenconsoled: `serve --consoles` refuses
#     while xenconsoled runs; with xenconsoled stopped it serves a guest's
#     console: the guest's boot in console/tty's pty and in
#     /var/log/xen/console/guest-NAME.log, and `xl console` (Xen's
#     xenconsole client on that pty) shows the guest's output, a line typed
#     into it reaches the guest (domu.mode=cons echoes it back).
# Env: DOMU_MEM (MiB, default 128), DOMU_TIMEOUT (s, default 300).
. /test/lib/vbd.sh
. /test/lib/xl.sh
. /test/lib/checks.sh
checks_begin console CONSOLE
T=${DOMU_TIMEOUT:-300}
md5() { md5sum | cut -d' ' -f1; }
finish() { xl_logs g9 g10; xenbackd_log_end; checks_end; }
[ -f /boot/domu/vmlinuz ] || { bad "no /boot/domu (the domu-kit archive is missing)"; finish; }
[ -x /test/xenbackd ] && [ -x /test/unixcat ] || { bad "no /test/xenbackd or /test/unixcat"; finish; }
xl_setup || { bad "xenconsoled"; finish; }
SOCK=/run/xen/ch-g9.sock

step "---- 1: a pty channel and a socket channel, xenbackd the device model"
cfg g9 once /test/xenbackd
sed -i 's/^extra = "\(.*\)"$/extra = "\1 domu.chan=120"/' /tmp/g9.cfg
# Debian 12's xl (Xen 4.17) numbers channels from devid 0, which is the
# primary console's: the first channel is overwritten by it and lost, with
# QEMU as with us (fixed upstream in 2025, "tools/xl: fix channel
# parsing"). A placeholder takes that place, so the two real channels are
# devids 1 and 2 (hvc1 and hvc2 in the guest).
cat >> /tmp/g9.cfg <<CFG
channel = [ "connection=pty,name=org.xenbackd.lab.lost", "connection=pty,name=org.xenbackd.lab.pty", "connection=socket,path=$SOCK,name=org.xenbackd.lab.sock" ]
CFG
if create g9; then
    d=$D_g9
    for n in 1 2; do step "device/console/$n: $(xenstore-ls /local/domain/$d/device/console/$n 2>&1 | tr '\n' ' ' | cut -c1-300)"; done
    [ "$(xenstore-read /local/domain/$d/device/console/1/name 2>/dev/null)" = org.xenbackd.lab.pty ] &&
        [ "$(xenstore-read /local/domain/$d/device/console/2/name 2>/dev/null)" = org.xenbackd.lab.sock ] &&
        ok "g9: libxl made console devices 1 (pty) and 2 (socket)" || bad "g9: console device names"
    wait_for "channel tty" 30 sh -c "[ -c \"\$(xenstore-read /local/domain/$d/device/console/1/tty 2>/dev/null)\" ]"
    tty=$(xenstore-read /local/domain/$d/device/console/1/tty 2>/dev/null)
    xl channel-list g9 > /tmp/chl 2>&1; sed 's/^/    /' /tmp/chl
    if [ -n "$tty" ] && [ -c "$tty" ]; then
        ok "g9: pty channel at $tty (device/console/1/tty)"
        grep -q "$tty" /tmp/chl && ok "g9: xl channel-list shows $tty" || bad "g9: xl channel-list does not show $tty"
    else
        bad "g9: no pty in device/console/1/tty ('$tty')"; tty=/nonexistent
    fi
    [ -S $SOCK ] && ok "g9: socket channel listening at $SOCK" || bad "g9: no socket at $SOCK"
    # the socket: our line once the guest has hvc2 raw (before, its tty
    # would echo it back), then everything the guest sends
    (console_has g9 '/dev/hvc2 wrote' $T; echo XENVM-CHAN-SOCK-IN; sleep $T) | /test/unixcat $SOCK 60 > /tmp/sock.out 2>/tmp/sock.err & UC=$!
    if [ -c "$tty" ] && console_has g9 '/dev/hvc1 wrote' $T; then
        l=$(timeout 20 head -n1 "$tty")
        [ "$l" = XENVM-CHAN-PTY-OUT ] && ok "g9: the guest's line on hvc1 read from $tty" || bad "g9: read '$l' from $tty"
        echo XENVM-CHAN-PTY-IN > "$tty"
        console_has g9 "/dev/hvc1 read 'XENVM-CHAN-PTY-IN'" 60 && ok "g9: dom0's line written to $tty read by the guest on hvc1" ||
            bad "g9: the guest did not read dom0's line on hvc1"
    else
        bad "g9: the guest did not write hvc1"
    fi
    console_has g9 "/dev/hvc2 read 'XENVM-CHAN-SOCK-IN'" $T && ok "g9: dom0's line on the socket read by the guest on hvc2" ||
        bad "g9: the guest did not read dom0's line on hvc2"
    if console_has g9 'bulk sent' $T; then
        want=$(sed -n "s/.*DOMU: bulk md5 \([0-9a-f]*\).*/\1/p" /var/log/xen/console/guest-g9.log | tail -1)
        wait_for "bulk" 60 sh -c '[ $(wc -c < /tmp/sock.out) -ge $((20 + 262144)) ]'
        first=$(head -n1 /tmp/sock.out)
        got=$(tail -c 262144 /tmp/sock.out | md5)
        [ "$first" = XENVM-CHAN-SOCK-OUT ] && ok "g9: the guest's line on hvc2 read from the socket" || bad "g9: socket's first line '$first'"
        [ "$got" = "$want" ] && [ "$(wc -c < /tmp/sock.out)" = $((20 + 262144)) ] &&
            ok "g9: 256 KiB from the guest through the socket channel byte-exact ($got)" ||
            bad "g9: socket got $(wc -c < /tmp/sock.out) bytes, md5 $got, the guest sent $want"
    else
        bad "g9: the guest did not send its bulk"
    fi
    kill $UC 2>/dev/null
    grep -q 'DOMU-CHAN rc=0' /var/log/xen/console/guest-g9.log && ok "g9: the guest's channel checks passed" || bad "g9: DOMU-CHAN not rc=0"
    wait_gone g9
    wait_for "dm exit" 20 no_dm_left $d && ok "g9: no device model left for domid $d" || bad "g9: device model of domid $d still running: $(procs_for $d)"
    wait_for "console backend gone" 20 sh -c "! xenstore-exists /local/domain/0/backend/console/$d" &&
        ok "g9: no backend/console/$d left" || bad "g9: backend/console/$d still there"
    [ ! -e $SOCK ] && ok "g9: the socket file is removed" || bad "g9: $SOCK left behind"
    clean g9 $d
fi

step "---- 2: the primary console, served by xenbackd instead of xenconsoled"
RUST_LOG=info /test/xenbackd serve --consoles --console-log-dir /tmp/clog > /tmp/refuse.log 2>&1 & rp=$!
wait_for "refusal" 20 eval "! kill -0 $rp 2>/dev/null"
if kill -0 $rp 2>/dev/null; then
    kill $rp; bad "serve --consoles ran beside xenconsoled"
else
    wait $rp; rc=$?
    [ $rc != 0 ] && grep -qi xenconsoled /tmp/refuse.log && ok "serve --consoles refuses while xenconsoled runs (rc $rc: $(grep -i xenconsoled /tmp/refuse.log | tail -1 | cut -c1-160))" ||
        bad "serve --consoles: rc $rc, $(tail -2 /tmp/refuse.log)"
fi
kill "$(cat /run/xenconsoled.pid)" 2>/dev/null
wait_for "xenconsoled gone" 10 sh -c '! pidof xenconsoled >/dev/null' || kill -9 $(pidof xenconsoled) 2>/dev/null
wait_for "xenconsoled gone" 10 sh -c '! pidof xenconsoled >/dev/null' && ok "xenconsoled stopped" || bad "xenconsoled still running"
mv /var/log/xen/console /var/log/xen/console.xenconsoled; mkdir -p /var/log/xen/console
if xenbackd_start --consoles --console-log-dir /var/log/xen/console; then
    step "xenbackd serve --consoles pid $XENBACKD_PID"
    cfg g10 cons
    sed -i 's/^disk = .*$/disk = []/; s/domu.mode=cons/domu.mode=cons domu.noblk=1/' /tmp/g10.cfg
    # no disk, no channel: libxl starts no device model for this one
    if xl create /tmp/g10.cfg > /tmp/xl-g10.log 2>&1 && D_g10=$(xl domid g10); then
        d=$D_g10
        ok "g10: xl create, domid $d, no device model"
        wait_for "console tty" 60 sh -c "[ -c \"\$(xenstore-read /local/domain/$d/console/tty 2>/dev/null)\" ]" &&
            ok "g10: console/tty = $(xenstore-read /local/domain/$d/console/tty) (written by xenbackd)" || bad "g10: no console/tty"
        console_has g10 'echoing the console' $T && ok "g10: the guest's boot in /var/log/xen/console/guest-g10.log" ||
            bad "g10: no guest output in the log: $(tail -3 /var/log/xen/console/guest-g10.log 2>&1)"
        # (first: what the guest wrote since boot waits in the pty for its reader)
        timeout 15 xl console g10 < /dev/null > /tmp/xlcons2.out 2>&1
        grep -q "echoing the console" /tmp/xlcons2.out && ok "g10: xl console shows the guest's output" ||
            bad "g10: xl console got: $(tr -d '\r' < /tmp/xlcons2.out | tail -2 | tr '\n' ';')"
        # xl console runs Xen's xenconsole client on console/tty; it reads
        # its stdin only when interactive (a terminal), so here it is run
        # as xl runs it plus --interactive, stdin a pipe
        (sleep 3; echo XENVM-XLCONSOLE-IN; sleep 8; printf '\035') |
            timeout 40 /usr/lib/xen-4.17/bin/xenconsole --interactive --num 0 --type pv $d > /tmp/xlcons.out 2>&1
        grep -q "console read 'XENVM-XLCONSOLE-IN'" /tmp/xlcons.out && ok "g10: xenconsole: a typed line reached the guest and its answer came back" ||
            bad "g10: xenconsole got: $(tr -d '\r' < /tmp/xlcons.out | tail -3 | tr '\n' ';')"
        console_has g10 "console read 'XENVM-XLCONSOLE-IN'" 10 && ok "g10: the exchange is in the log too" || bad "g10: not in the log"
        xl shutdown g10 && ok "g10: xl shutdown" || bad "g10: xl shutdown"
        wait_gone g10
        rm -f /tmp/g10.img
    else
        cat /tmp/xl-g10.log; bad "g10: xl create"
    fi
    grep -q "domain 0\b.*console\|console.*domain 0\b" /tmp/xenbackd.log && step "note: log mentions domain 0's console: $(grep 'domain 0' /tmp/xenbackd.log | head -2)"
else
    bad "serve --consoles: $XENBACKD_WHY"
fi
finish
