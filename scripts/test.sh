#!/usr/bin/env bash
# The whole Fogline test suite. Installs what it needs itself: the
# wasm32-wasip2 target, Mosquitto and libfaketime (Debian packages) and
# cargo-nextest.
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
export PATH="$PATH:/usr/sbin"

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "Installing cargo-nextest..."
  cargo install --locked cargo-nextest
fi

# The SDK's own unit tests run on the host (the SDK builds for both).
(cd modules && CARGO_TARGET_DIR=../target/sdk-host cargo test -p fogline-sdk --quiet)

# The end-to-end tests run the real binaries: build them first.
cargo build --workspace --bins
exec cargo nextest run --workspace --no-fail-fast "$@"
