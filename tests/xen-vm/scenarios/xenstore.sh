#!/bin/sh
# timeout: 600
# Scenario 1: `xenbackd xs` against the real C xenstored, over /dev/xen/xenbus
# and over the xenstored socket (XENSTORED_PATH), compared with Xen's
# xenstore-utils run with the same arguments: stdout byte for byte and the
# exit status must match (stderr differences are printed as NOTE lines only:
# they are human messages). Mutations run once with each tool on two sibling
# subtrees whose dumps (taken with xenstore-ls -f -p) must then be equal.
# Transactions are reached the way the tools reach them: a multi-key
# read/write is one transaction. Everything runs as dom0.
XB=/test/xenbackd
. /test/lib/checks.sh
checks_begin xenstore XENSTORE

if ! $XB xs --help >/tmp/xs-help 2>&1 && grep -q 'unknown command' /tmp/xs-help; then
    bad "xenstore: this xenbackd has no \`xs\` command: $(head -1 /tmp/xs-help)"
    exit 1
fi

show_diff() { # show_diff A B
    diff -u "$1" "$2" | head -20 | sed 's/^/    | /'
}
compare() { # compare DESC: ref/our .out .err and rc in $rr/$ro
    if [ "$rr" = "$ro" ] && cmp -s /tmp/ref.out /tmp/our.out; then
        ok "$T: $1 (rc=$rr, $(wc -c < /tmp/ref.out) bytes)"
    else
        bad "$T: $1: xenstore-utils rc=$rr, ours rc=$ro; stdout diff (- xenstore-utils, + ours):"
        show_diff /tmp/ref.out /tmp/our.out
    fi
    if ! cmp -s /tmp/ref.err /tmp/our.err; then
        echo "NOTE $T: $1: stderr differs: xenstore-utils '$(head -c 120 /tmp/ref.err | tr '\n' ' ')' ours '$(head -c 120 /tmp/our.err | tr '\n' ' ')'"
    fi
}
# same OP ARGS...: both tools with identical arguments (read-only checks)
same() {
    op=$1; shift
    "xenstore-$op" "$@" > /tmp/ref.out 2> /tmp/ref.err; rr=$?
    $XB xs "$op" "$@" > /tmp/our.out 2> /tmp/our.err; ro=$?
    compare "$op $*"
}
# on PREFIX CMD ARGS...: run CMD with every "@" in ARGS replaced by PREFIX
on() {
    pre=$1; shift; n=$#; i=0
    while [ $i -lt $n ]; do a=$1; shift; set -- "$@" "${a//@/$pre}"; i=$((i + 1)); done
    "$@"
}
dump() { xenstore-ls -f -p "$1" 2>&1 | sed "s|$1|@|g"; }
# mut OP ARGS...: xenstore-OP on $R, ours on $O ("@" = the subtree); then
# compare stdout, status, and the two subtrees
mut() {
    op=$1; shift
    on "$R" "xenstore-$op" "$@" > /tmp/ref.out 2> /tmp/ref.err; rr=$?
    on "$O" $XB xs "$op" "$@" > /tmp/our.out 2> /tmp/our.err; ro=$?
    sed -i "s|$R|@|g" /tmp/ref.out /tmp/ref.err; sed -i "s|$O|@|g" /tmp/our.out /tmp/our.err
    compare "$op $*"
    dump "$R" > /tmp/ref.tree; dump "$O" > /tmp/our.tree
    if cmp -s /tmp/ref.tree /tmp/our.tree; then
        ok "$T: $op $*: resulting trees equal ($(wc -l < /tmp/ref.tree) nodes)"
    else
        bad "$T: $op $*: trees differ (- xenstore-utils, + ours):"; show_diff /tmp/ref.tree /tmp/our.tree
    fi
}

LONG=0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyz
for XP in /dev/xen/xenbus /run/xenstored/socket; do
    export XENSTORED_PATH=$XP
    case $XP in /dev/*) T=xenbus;; *) T=socket;; esac
    echo "---- transport $T (XENSTORED_PATH=$XP)"
    xenstore-rm /lab 2>/dev/null
    # fixture (one transaction)
    xenstore-write /lab/tree/a 1 /lab/tree/b "two words" /lab/tree/c/d deep /lab/tree/e "" \
        /lab/tree/long "$LONG" /lab/tree/esc 'tab\there' || bad "$T: fixture write"
    xenstore-chmod /lab/tree/b n0 r3 w4

    same read /lab/tree/a
    same read /lab/tree/a /lab/tree/b /lab/tree/c/d
    same read -p /lab/tree/a /lab/tree/b
    same read /lab/tree/e
    same read /lab/tree/c
    same read /lab/tree/long
    same read /lab/tree/esc
    same read -R /lab/tree/esc
    same read /lab/nonexistent
    same read /lab/tree/a /lab/nonexistent
    same read /local/domain/0/name
    same exists /lab/tree/a
    same exists /lab/tree/a /lab/tree/c/d
    same exists /lab/nonexistent
    same list /lab/tree
    same list -p /lab/tree
    same list /lab/tree /lab/tree/c
    same list /lab/nonexistent
    same ls /lab/tree
    same ls -f /lab/tree
    same ls -p /lab/tree
    same ls -f -p /lab/tree
    same ls /lab/nonexistent
    same ls /local/domain/0
    same ls /

    R=/lab/$T/r; O=/lab/$T/o
    mut write @/a 1 @/b "x y" @/c/d/e deep @/f ""
    mut write @/a 2
    mut write @/esc 'tab\there\x41'
    mut write -R @/raw 'tab\there'
    mut write @/odd
    mut read @/a @/c/d/e
    mut chmod @/a n0 r5 w7
    mut chmod @/b b0
    mut chmod -r @/c r0 w3
    mut chmod -u @/c/d/e n0 r9
    mut ls -p @
    mut rm @/b
    mut rm @/nonexistent
    mut rm @/c/d
    mut write @/g/h/i 1
    mut rm -t @/g/h/i
    mut rm @/a @/f

    # mkdir (no xenstore-mkdir in xenstore-utils): an empty node, like
    # xenstore-write PATH "" with the parents created
    xenstore-write "$R/m/n" "" > /tmp/ref.out 2> /tmp/ref.err; rr=$?
    $XB xs mkdir "$O/m/n" > /tmp/our.out 2> /tmp/our.err; ro=$?
    compare "mkdir @/m/n (vs xenstore-write @/m/n '')"
    dump "$R" > /tmp/ref.tree; dump "$O" > /tmp/our.tree
    if cmp -s /tmp/ref.tree /tmp/our.tree; then ok "$T: mkdir: trees equal"
    else bad "$T: mkdir: trees differ:"; show_diff /tmp/ref.tree /tmp/our.tree; fi

    # watches: both tools watch the same path; the first event is the watch
    # registration itself, then one per write
    W=/lab/$T/w
    xenstore-write $W/init 0
    timeout 30 xenstore-watch -n 3 $W > /tmp/ref.watch 2>&1 & p1=$!
    timeout 30 $XB xs watch -n 3 $W > /tmp/our.watch 2>&1 & p2=$!
    sleep 3
    xenstore-write $W/x 1
    sleep 0.5
    xenstore-write $W/y 2
    wait $p1; rr=$?; wait $p2; ro=$?
    cp /tmp/ref.watch /tmp/ref.out; cp /tmp/our.watch /tmp/our.out; : > /tmp/ref.err; : > /tmp/our.err
    compare "watch -n 3 $W (3 events: registration, 2 writes)"
    [ "$(wc -l < /tmp/our.out)" = 3 ] || bad "$T: watch: expected 3 lines from ours, got $(wc -l < /tmp/our.out)"

    # invoked through a symlink named like the C tool, it behaves as that tool
    mkdir -p /tmp/xsbin
    for t in read ls; do ln -sf $XB /tmp/xsbin/xenstore-$t; done
    xenstore-read /lab/tree/a /lab/tree/b > /tmp/ref.out 2> /tmp/ref.err; rr=$?
    /tmp/xsbin/xenstore-read /lab/tree/a /lab/tree/b > /tmp/our.out 2> /tmp/our.err; ro=$?
    compare "symlink xenstore-read /lab/tree/a /lab/tree/b"
    xenstore-ls -f /lab/tree > /tmp/ref.out 2> /tmp/ref.err; rr=$?
    /tmp/xsbin/xenstore-ls -f /lab/tree > /tmp/our.out 2> /tmp/our.err; ro=$?
    compare "symlink xenstore-ls -f /lab/tree"

    # the transport is really the one asked for: a bad path fails both
    XENSTORED_PATH=/nonexistent/xenstore
    same read /local/domain/0/name
    [ "$ro" != 0 ] || bad "$T: ours ignored XENSTORED_PATH=/nonexistent/xenstore"
done
unset XENSTORED_PATH
# xenstore-control (Xen's, in /usr/lib/xen-4.17/bin) against `xs control`:
# the daemon's answers printed, usage and unknown commands
T=control
XC=/usr/lib/xen-4.17/bin/xenstore-control
if [ -x $XC ]; then
    for args in "" "check" "help" "quota" "frobnicate" "live-update" "live-update -t"; do
        # shellcheck disable=SC2086
        $XC $args > /tmp/ref.out 2> /tmp/ref.err; rr=$?
        # shellcheck disable=SC2086
        $XB xs control $args > /tmp/our.out 2> /tmp/our.err; ro=$?
        compare "control ${args:-(no command)}"
    done
else
    bad "control: no $XC in the image"
fi
xenstore-rm /lab
checks_end
