#!/bin/sh
# Checks deploy/xenbackd.init with a stand-in daemon (prints a line, drains
# for 1 s on SIGTERM, then exits): its output reaches the log, a second
# start does not start a second daemon, stop and restart wait for the drain,
# status answers 0/3, and a daemon exiting at once fails the start.
# Run by scripts/test; needs start-stop-daemon (Debian's dpkg).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
INIT="$HERE/../../deploy/xenbackd.init"
command -v start-stop-daemon >/dev/null || { echo "init-script: skipped: no start-stop-daemon"; exit 0; }
T=$(mktemp -d)
trap 'kill $(cat "$T/pid" 2>/dev/null) 2>/dev/null; rm -rf "$T"' EXIT
export XENBACKD="$T/fake" XENBACKD_PIDFILE="$T/pid" XENBACKD_LOG="$T/log" XENBACKD_STOP_TIMEOUT=10
cat > "$T/fake" <<'FAKE'
#!/bin/sh
echo "fake $1 started as $$"
trap 'sleep 1; echo "fake $$ drained"; exit 0' TERM
while :; do sleep 0.1; done
FAKE
chmod +x "$T/fake"
pass=0 fail=0
check() { if eval "$2"; then pass=$((pass + 1)); else fail=$((fail + 1)); echo "FAIL: $1"; fi; }
count() { pgrep -f "$T/fake" | wc -l; }

sh "$INIT" start >/dev/null
check "start: running" 'sh "$INIT" status >/dev/null'
check "start: the daemon's output is in the log" 'grep -q "fake serve started" "$T/log"'
first=$(cat "$T/pid")
check "start: the pid file names the daemon" 'grep -q "started as $first" "$T/log"'
sh "$INIT" start >/dev/null
check "a second start starts no second daemon" '[ "$(count)" -eq 1 ] && [ "$(cat "$T/pid")" = "$first" ]'
sh "$INIT" restart >/dev/null
check "restart: the old daemon drained first" 'grep -q "fake $first drained" "$T/log"'
check "restart: a new daemon runs" '[ "$(cat "$T/pid")" != "$first" ] && [ "$(count)" -eq 1 ]'
second=$(cat "$T/pid")
sh "$INIT" stop
check "stop: waited for the drain" 'grep -q "fake $second drained" "$T/log" && [ "$(count)" -eq 0 ]'
sh "$INIT" status >/dev/null; rc=$?
check "status of a stopped daemon is 3" '[ $rc -eq 3 ]'
printf '#!/bin/sh\necho "bad config" >&2\nexit 1\n' > "$T/fake"
sh "$INIT" start 2>"$T/err"; rc=$?
check "a daemon exiting at once fails the start" '[ $rc -ne 0 ] && grep -q "bad config" "$T/err"'
echo "init-script: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
