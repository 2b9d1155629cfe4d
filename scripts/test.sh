#!/usr/bin/env bash
# The whole Fogline test suite. Installs what it needs itself: the
# wasm32-wasip2 target, Mosquitto, libfaketime, PostgreSQL, Chromium and
# chromedriver (Debian packages) and cargo-nextest. The store tests use the
# PostgreSQL named by FOGLINE_TEST_PG (an admin URL), else the local service
# on 127.0.0.1:5432, else a private server started here on a free port and
# stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "Installing mosquitto (the end-to-end tests start private instances of it)..."
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto >/dev/null
fi
if ! ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1; then
  echo "Installing libfaketime (the clock tests run the edge with its clock behind)..."
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libfaketime >/dev/null
fi
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  echo "Installing chromium and chromium-driver (the fleet page test drives headless Chromium)..."
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
export PATH="$PATH:/usr/sbin"

# PostgreSQL for the store contract suite.
PG_PRIVATE=""
pg_answers() {
  python3 - "$1" <<'PY'
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
s = socket.socket()
s.settimeout(2)
try:
    s.connect((u.hostname or "127.0.0.1", u.port or 5432))
except OSError:
    sys.exit(1)
PY
}
export FOGLINE_TEST_PG="${FOGLINE_TEST_PG:-postgres://postgres@127.0.0.1:5432/postgres}"
if ! pg_answers "$FOGLINE_TEST_PG"; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "Installing PostgreSQL (the store tests start a private server)..."
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
  fi
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  PG_PRIVATE=$(mktemp -d /tmp/fogline-pg.XXXXXX)
  PG_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # initdb refuses root: the server runs as the postgres user where we are root.
  AS=""; [ "$(id -u)" -eq 0 ] && { chown postgres "$PG_PRIVATE"; AS="runuser -u postgres --"; }
  $AS "$PG_BIN/initdb" -D "$PG_PRIVATE/data" --auth=trust -U postgres >/dev/null
  $AS "$PG_BIN/pg_ctl" -D "$PG_PRIVATE/data" -l "$PG_PRIVATE/log" -w \
    -o "-p $PG_PORT -k $PG_PRIVATE -c listen_addresses=127.0.0.1 -c max_connections=300" start >/dev/null
  trap '$AS "$PG_BIN/pg_ctl" -D "$PG_PRIVATE/data" -m immediate stop >/dev/null 2>&1; rm -rf "$PG_PRIVATE"' EXIT
  export FOGLINE_TEST_PG="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  echo "Started a private PostgreSQL on 127.0.0.1:$PG_PORT for the store tests."
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "Installing cargo-nextest..."
  cargo install --locked cargo-nextest
fi

# The SDK's and the examples' unit tests run on the host (fogline_sdk::harness).
(cd modules && CARGO_TARGET_DIR=../target/sdk-host cargo test -p fogline-sdk -p deadband -p scale -p downsample -p alert --quiet)

# The end-to-end tests run the real binaries: build them first.
cargo build --workspace --bins
# Not exec: a private PostgreSQL is stopped on exit.
cargo nextest run --workspace --no-fail-fast "$@"
