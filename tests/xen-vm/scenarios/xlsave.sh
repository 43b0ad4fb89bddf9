#!/bin/sh
# timeout: 600
# needs: domu-kit
# Issue 11: `xl save` and `xl restore` of a PV guest whose qdisk disk is
# served by xenbackd as its device model (no QEMU in the image). The guest
# (domu-init.sh, mode hold) checks and writes its disk, then writes it in a
# loop. `xl save` suspends it (blkfront suspends with requests in flight)
# and destroys the domain: its device model must exit and leave no backend
# node and no open image. `xl restore` makes a new domain with a new device
# model: the guest's blkfront must reconnect and its writes go on (the new
# device model's counters grow); then `xl shutdown` and the guest's marker
# in the image.
# Env: DOMU_MEM (MiB, default 128), DOMU_TIMEOUT (s, default 300).
. /test/lib/vbd.sh
. /test/lib/xl.sh
. /test/lib/checks.sh
checks_begin xlsave XLSAVE
T=${DOMU_TIMEOUT:-300}
finish() { xl_logs g7; checks_end; }
[ -f /boot/domu/vmlinuz ] || { bad "no /boot/domu (the domu-kit archive is missing)"; finish; }
[ -x /test/xenbackd ] || { bad "no /test/xenbackd"; finish; }
xl_setup || { bad "xenconsoled"; finish; }

# completed DOMID: requests the device model of DOMID answered on xvda
completed() {
    /test/xenbackd metrics --control-socket /run/xenbackd/dm-$1.sock 2>/dev/null |
        awk '/^xenbackd_ring_requests_completed_total/ { n += $2 } END { print n + 0 }'
}
# grows DOMID: the count goes up within 2 s
grows() {
    a=$(completed $1); sleep 2; b=$(completed $1)
    [ "$b" -gt "$a" ]
}
connected() {
    [ "$(xenstore-read /local/domain/0/backend/qdisk/$1/51712/state 2>/dev/null)" = 4 ] &&
        [ "$(xenstore-read /local/domain/$1/device/vbd/51712/state 2>/dev/null)" = 4 ]
}

cfg g7 hold /test/xenbackd
create g7 || finish
d=$D_g7
console_has g7 'holding, writing' $T && ok "g7: up, writing its disk" || { bad "g7: did not reach hold"; finish; }
wait_for "writes counted" 20 grows $d && ok "g7: device model of domid $d answers the writes ($(completed $d) requests)" ||
    bad "g7: no requests counted by the device model of domid $d"

step "xl save"
if xl save g7 /tmp/g7.save > /tmp/xl-save.log 2>&1; then
    ok "g7: xl save ($(du -k /tmp/g7.save | cut -f1) KiB)"
else
    cat /tmp/xl-save.log; bad "g7: xl save"; finish
fi
xl domid g7 >/dev/null 2>&1 && bad "g7: still running after xl save" || ok "g7: domain gone after xl save"
clean g7 $d reboot
wait_for "image closed" 20 no_open /tmp/g7.img && ok "g7: /tmp/g7.img open nowhere after the save" ||
    bad "g7: /tmp/g7.img still open by $(open_of /tmp/g7.img)"

step "xl restore"
if xl restore /tmp/g7.save > /tmp/xl-restore.log 2>&1; then
    ok "g7: xl restore"
else
    cat /tmp/xl-restore.log; tail -20 /var/log/xen/qemu-dm-g7.log 2>/dev/null; bad "g7: xl restore"; finish
fi
n=$(xl domid g7 2>/dev/null)
[ -n "$n" ] && [ "$n" != "$d" ] && ok "g7: restored as domid $n" || { bad "g7: domid after restore '$n'"; finish; }
st=$(xenstore-read /local/domain/0/device-model/$n/state 2>/dev/null)
[ "$st" = running ] && ok "g7: device model of domid $n running" || bad "g7: device-model state '$st'"
wait_for "reconnect" 60 connected $n && ok "g7: blkfront reconnected to the new device model" ||
    bad "g7: backend $(xenstore-read /local/domain/0/backend/qdisk/$n/51712/state 2>&1), frontend $(xenstore-read /local/domain/$n/device/vbd/51712/state 2>&1)"
wait_for "writes after restore" 30 grows $n && ok "g7: its writes go on after the restore ($(completed $n) requests)" ||
    bad "g7: no requests answered after the restore"
xl shutdown g7 && ok "g7: xl shutdown" || bad "g7: xl shutdown"
console_has g7 'poweroff requested' 60 && ok "g7: guest saw the shutdown request" || bad "g7: no shutdown request seen in the guest"
D_g7=$n
wait_gone g7; verdict g7; clean g7 $n
rm -f /tmp/g7.save
finish
