//! Builds the guest workspace (`modules/`: the SDK and the example functions)
//! for `wasm32-wasip2` and tells `src/lib.rs` where the components are.
//!
//! The guest build runs a nested `cargo` with its own target directory
//! (`<repo>/target/wasm`): the outer build holds the lock on its own target
//! directory, so sharing it would deadlock, and a fixed directory keeps the
//! guest build cached across outer builds and profiles.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

/// (crate name, env var read by `src/lib.rs`).
const COMPONENTS: [(&str, &str); 7] = [
    ("threshold", "FOGLINE_WASM_THRESHOLD"),
    ("window_avg", "FOGLINE_WASM_WINDOW_AVG"),
    ("deadband", "FOGLINE_WASM_DEADBAND"),
    ("scale", "FOGLINE_WASM_SCALE"),
    ("downsample", "FOGLINE_WASM_DOWNSAMPLE"),
    ("alert", "FOGLINE_WASM_ALERT"),
    ("hostile", "FOGLINE_WASM_HOSTILE"),
];

const TARGET: &str = "wasm32-wasip2";

/// Variables the outer build sets that must not leak into the guest build:
/// host RUSTFLAGS break a wasm build; an inherited target dir or target
/// would deadlock or build for the wrong platform; clippy's wrapper would
/// lint instead of build; and the outer jobserver's file descriptors are not
/// reliably inherited (a nested cargo that finds `CARGO_MAKEFLAGS` pointing
/// at closed descriptors warns or stalls), so the guest build runs its own
/// job pool.
const STRIPPED_ENV: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_BUILD_DIR",
    "CARGO_BUILD_TARGET",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
];

fn main() {
    let manifest_dir = PathBuf::from(env_or_fail("CARGO_MANIFEST_DIR"));
    let modules = match manifest_dir.parent() {
        Some(p) => p.to_path_buf(),
        None => fail("modules/build has no parent directory"),
    };
    let repo = match modules.parent() {
        Some(p) => p.to_path_buf(),
        None => fail("modules/ has no parent directory"),
    };
    for watched in ["sdk", "examples", "wit", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", modules.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=FOGLINE_WASM_TARGET_DIR");

    let target_dir = env::var_os("FOGLINE_WASM_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target").join("wasm"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));

    ensure_target_installed(&rustc);

    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--release", "--workspace", "--target", TARGET])
        .arg("--manifest-path")
        .arg(modules.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&modules);
    for var in STRIPPED_ENV {
        cmd.env_remove(var);
    }
    // Per-target flags for the host (CARGO_TARGET_<TRIPLE>_RUSTFLAGS) are
    // harmless for wasm; only the global ones above leak.
    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) => fail(&format!(
            "could not run `{}` to build the WASM functions: {e}",
            Path::new(&cargo).display()
        )),
    };
    if !status.success() {
        fail(&format!(
            "building the WASM functions failed ({status}); reproduce with:\n  \
             cd {} && cargo build --release --target {TARGET} --target-dir {}",
            modules.display(),
            target_dir.display()
        ));
    }

    // Copy into OUT_DIR so the paths handed out stay valid and match this
    // build even if the shared guest target dir is rebuilt meanwhile.
    let out_dir = PathBuf::from(env_or_fail("OUT_DIR"));
    let built = target_dir.join(TARGET).join("release");
    for (name, var) in COMPONENTS {
        let from = built.join(format!("{name}.wasm"));
        let to = out_dir.join(format!("{name}.wasm"));
        if let Err(e) = std::fs::copy(&from, &to) {
            fail(&format!(
                "copying {} to {}: {e}",
                from.display(),
                to.display()
            ));
        }
        println!("cargo:rustc-env={var}={}", to.display());
    }
}

/// Fail with the command to run if rustc lacks the wasm32-wasip2 standard
/// library. (A build script does not install toolchain components behind
/// the user's back.)
fn ensure_target_installed(rustc: &OsString) {
    if target_installed(rustc) {
        return;
    }
    fail(&format!(
        "the Rust target {TARGET} is not installed; the example WASM functions need it.\n  \
         Install it with:  rustup target add {TARGET}\n  \
         (without rustup, install the {TARGET} standard library for your toolchain)"
    ));
}

fn target_installed(rustc: &OsString) -> bool {
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .join("lib")
        .is_dir()
}

fn env_or_fail(var: &str) -> OsString {
    env::var_os(var).unwrap_or_else(|| fail(&format!("{var} is not set (run through cargo)")))
}

fn fail(message: &str) -> ! {
    // Cargo prints a failing build script's stderr; say it plainly there.
    eprintln!("error: fogline-modules: {message}");
    exit(1)
}
