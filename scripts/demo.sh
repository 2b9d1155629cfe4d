#!/usr/bin/env bash
# The Fogline demo on embedded defaults: embedded MQTT broker, simulated
# sensors, the edge daemon with both example functions, an aggregator, an
# uplink cut and restore, and a lost/duplicated summary from the store.
# Installs what it needs (the wasm32-wasip2 target) itself.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2
exec cargo run --quiet -p fogline-demo -- "$@"
