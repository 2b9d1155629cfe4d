#!/usr/bin/env bash
# Builds what ships: the Debian package of the edge daemon (x86_64, stripped
# release build → target/debian/fogline-edge_<version>_amd64.deb) and the
# stripped aarch64 binary (→ target/aarch64-unknown-linux-gnu/release/fogline-edge),
# then runs the latter under qemu-user. Installs what it needs if missing
# (Debian packages: the aarch64 cross toolchain, qemu-user; rustup's aarch64
# target; cargo-deb). Prints each step's time and the binaries' sizes.
#   scripts/package.sh              # both
#   scripts/package.sh --deb-only   # just the .deb
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# The build's commit, in fogline_build_info{git_sha}.
FOGLINE_GIT_SHA="$(git rev-parse --short=12 HEAD 2>/dev/null || true)"
export FOGLINE_GIT_SHA
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
AARCH64=aarch64-unknown-linux-gnu
DEB_ONLY=0
[ "${1:-}" = "--deb-only" ] && DEB_ONLY=1

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
step() { STEP_NAME="$1"; STEP_START=$(date +%s); echo "== $1"; }
done_step() { echo "== $STEP_NAME: $(( $(date +%s) - STEP_START )) s"; }
size() { stat -c %s "$1" | awk -v f="$1" '{printf "%s: %.1f MiB (%d bytes)\n", f, $1/1048576, $1}'; }

need_apt=()
command -v dpkg-deb >/dev/null || need_apt+=(dpkg-dev)
if [ "$DEB_ONLY" = 0 ]; then
  command -v aarch64-linux-gnu-gcc >/dev/null || need_apt+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
  command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
fi
if [ "${#need_apt[@]}" -gt 0 ]; then
  step "installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  done_step
fi
if ! cargo deb --version >/dev/null 2>&1; then
  step "installing cargo-deb"
  cargo install --locked cargo-deb
  done_step
fi

step "release build, x86_64 (fogline-edge)"
cargo build --release -p fogline-edge
done_step
size "$TARGET_DIR/release/fogline-edge"

step "Debian package"
# --no-build: the binary above is the one packaged (stripped by the profile).
cargo deb -p fogline-edge --no-build
done_step
ls -l "$TARGET_DIR"/debian/fogline-edge_*.deb

if [ "$DEB_ONLY" = 1 ]; then exit 0; fi

if ! rustup target list --installed | grep -qx "$AARCH64"; then
  step "rustup target add $AARCH64"
  rustup target add "$AARCH64"
  done_step
fi
step "release build, aarch64 (fogline-edge, Debian's cross toolchain)"
CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
  cargo build --release -p fogline-edge --target "$AARCH64"
done_step
BIN="$TARGET_DIR/$AARCH64/release/fogline-edge"
size "$BIN"
file "$BIN" 2>/dev/null || true

step "aarch64 binary under qemu-aarch64"
QEMU=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
"${QEMU[@]}" "$BIN" --version
# `check` on the packaged default config (its data_dir moved to a temporary
# directory), with the threshold function added when the example modules
# are built: then wasmtime compiles it to aarch64 code and runs its init.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
sed "s|^data_dir = .*|data_dir = \"$WORK/data\"|" runtime/debian/edge.toml > "$WORK/edge.toml"
WASM="$PWD/target/wasm/wasm32-wasip2/release/threshold.wasm"
[ -f "$WASM" ] || WASM="$TARGET_DIR/wasm/wasm32-wasip2/release/threshold.wasm"
if [ -f "$WASM" ]; then
  sed -i "s|^functions = \[\]|functions = [\"hot\"]|" "$WORK/edge.toml"
  printf '\n[functions.hot]\nmodule = "%s"\nconfig = { field = "temp", above = 30.0 }\n' "$WASM" >> "$WORK/edge.toml"
else
  echo "(no $WASM: build it with 'cargo build -p fogline-modules' to check a function too)"
fi
"${QEMU[@]}" "$BIN" check --config "$WORK/edge.toml"
done_step
