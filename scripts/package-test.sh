#!/usr/bin/env bash
# Installs the edge's Debian package (target/debian/fogline-edge_*.deb, from
# scripts/package.sh) and starts it as its systemd unit would — as root, for
# CI. Containers rarely run systemd as PID 1, so this runs the unit's
# ExecStart as the unit's User, in its WorkingDirectory, with NOTIFY_SOCKET
# pointing at a socket this script listens on and a WatchdogSec of 2 s; it
# checks READY=1 and WATCHDOG=1 arrive, /healthz answers ok, `status` exits
# 0, and SIGTERM brings STOPPING=1 and exit 0. The unit's sandboxing
# (ProtectSystem=...) is checked by `systemd-analyze verify` where it exists,
# not enforced here. Purges the package at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "run as root (installs a package)"; exit 1; }
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
DEB="$(ls -t "$TARGET_DIR"/debian/fogline-edge_*.deb 2>/dev/null | head -1 || true)"
[ -n "$DEB" ] || { echo "no $TARGET_DIR/debian/fogline-edge_*.deb: run scripts/package.sh first"; exit 1; }
WORK="$(mktemp -d)"
DAEMON_PID=""
cleanup() {
  [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null || true
  [ -n "${LISTENER_PID:-}" ] && kill "$LISTENER_PID" 2>/dev/null || true
  dpkg --purge fogline-edge >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; [ -f "$WORK/daemon.log" ] && tail -30 "$WORK/daemon.log"; exit 1; }

echo "== dpkg -i $(basename "$DEB")"
dpkg -i "$DEB"
dpkg-deb --contents "$DEB" | awk '{print "   " $6}'
# /lib or /usr/lib, as the distribution has it.
UNIT="$(dpkg -L fogline-edge | grep '/systemd/system/fogline-edge.service$' | head -1)"
getent passwd fogline >/dev/null || fail "postinst made no user fogline"
[ "$(stat -c %U "/var/lib/fogline")" = fogline ] || fail "/var/lib/fogline is not fogline's"
[ -f /etc/fogline/edge.toml ] || fail "no /etc/fogline/edge.toml"
[ -n "$UNIT" ] && [ -f "$UNIT" ] || fail "the package installs no fogline-edge.service"
[ -x /usr/bin/fogline-edge ] || fail "no /usr/bin/fogline-edge"

if command -v systemd-analyze >/dev/null 2>&1; then
  echo "== systemd-analyze verify $UNIT"
  # Offline (no systemd running) it still parses every directive and
  # checks the binary exists; it exits non-zero on an error.
  systemd-analyze verify "$UNIT" || fail "systemd-analyze verify found problems in $UNIT"
else
  echo "== systemd-analyze not available: skipping the unit's verification"
fi

unit_value() { sed -n "s/^$1=//p" "$UNIT" | head -1; }
EXEC="$(unit_value ExecStart)"
USER_="$(unit_value User)"
DIR="$(unit_value WorkingDirectory)"
for k in "Type=notify" "WatchdogSec=" "ProtectSystem=strict" "NoNewPrivileges=yes" "StateDirectory=fogline" "PrivateTmp=yes"; do
  grep -q "^$k" "$UNIT" || fail "$UNIT has no $k"
done
echo "== ExecStart: $EXEC (User=$USER_, WorkingDirectory=$DIR)"

# This machine may run its own MQTT broker on 1883: move the endpoint to a
# free port, as an operator would (the config is a conffile).
if (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
  PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  echo "== 127.0.0.1:1883 is taken here: the endpoint listens on $PORT"
  sed -i "s|^listen = \"127.0.0.1:1883\"|listen = \"127.0.0.1:$PORT\"|" /etc/fogline/edge.toml
fi

# The service manager's side: a datagram socket that logs what it receives.
SOCK="$WORK/notify.sock"
python3 -u - "$SOCK" > "$WORK/notify.log" <<'PY' &
import os, socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
os.chmod(path, 0o777)
print("listening", flush=True)
while True:
    for line in s.recv(4096).decode().splitlines():
        print(line, flush=True)
PY
LISTENER_PID=$!
chmod 755 "$WORK"
for _ in $(seq 50); do grep -q listening "$WORK/notify.log" 2>/dev/null && break; sleep 0.1; done

echo "== starting it as $USER_ with NOTIFY_SOCKET and WATCHDOG_USEC=2000000"
# shellcheck disable=SC2086 # ExecStart is split into words, as systemd does.
(cd "$DIR" && exec setpriv --reuid="$USER_" --regid="$USER_" --init-groups \
  env -i PATH=/usr/bin:/bin NOTIFY_SOCKET="$SOCK" WATCHDOG_USEC=2000000 $EXEC) \
  > "$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
wait_for() { # pattern seconds
  for _ in $(seq $(( $2 * 10 ))); do grep -q "$1" "$WORK/notify.log" && return 0; sleep 0.1; done
  return 1
}
wait_for '^READY=1' 60 || fail "no READY=1 within 60 s"
echo "   READY=1 ($(grep '^STATUS=' "$WORK/notify.log" | head -1))"
wait_for '^WATCHDOG=1' 5 || fail "no WATCHDOG=1 within 5 s"
echo "   WATCHDOG=1"
HEALTH="$(curl -fsS http://127.0.0.1:9464/healthz)" || fail "/healthz did not answer 200"
echo "   /healthz: $HEALTH"
[ "$HEALTH" = '{"status":"ok","problems":[]}' ] || fail "/healthz: $HEALTH"
curl -fsS http://127.0.0.1:9464/metrics | grep -q '^fogline_build_info{' || fail "no fogline_build_info in /metrics"
setpriv --reuid="$USER_" --regid="$USER_" --init-groups /usr/bin/fogline-edge status --config /etc/fogline/edge.toml \
  > "$WORK/status.txt" || fail "status exited $? on a healthy daemon: $(cat "$WORK/status.txt")"
echo "   status: $(grep '^health' "$WORK/status.txt")"

echo "== SIGTERM"
kill -TERM "$DAEMON_PID"
RC=0; wait "$DAEMON_PID" || RC=$?
DAEMON_PID=""
[ "$RC" -eq 0 ] || fail "exit status $RC after SIGTERM"
wait_for '^STOPPING=1' 2 || fail "no STOPPING=1"
RC=0; /usr/bin/fogline-edge status --config /etc/fogline/edge.toml >/dev/null 2>&1 || RC=$?
[ "$RC" -eq 3 ] || fail "status exited $RC with the daemon stopped (3 expected)"
echo "   stopped; STOPPING=1; status exits 3"
echo "package test: 1 passed, 0 failed"
