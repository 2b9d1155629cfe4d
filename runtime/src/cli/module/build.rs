//! `fogline-edge module build`: build a function crate into a component.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// The target every function is built for.
pub const TARGET: &str = "wasm32-wasip2";

/// What a build made.
#[derive(Debug)]
pub struct Built {
    /// The component.
    pub wasm: PathBuf,
}

/// Whether to say more than cargo does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// Only cargo's own output (`module test` builds before it runs).
    Quiet,
    /// Also what was built, where, and that it loads.
    Report,
}

/// Builds the crate in `dir` for [`TARGET`] in release mode; installs the
/// target first when it is missing.
pub fn build(dir: &Path, verbosity: Verbosity) -> anyhow::Result<Built> {
    // Absolute: cargo runs in `dir`, the paths given are relative to here.
    let dir = &std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        bail!(
            "{} is not a function crate: it has no Cargo.toml (start one with `fogline-edge module new NAME`)",
            dir.display()
        );
    }
    ensure_target(dir)?;
    // Run in the crate, so its `.cargo/config.toml` and toolchain file apply.
    let mut child = Command::new(cargo())
        .current_dir(dir)
        .args(["build", "--release", "--target", TARGET])
        .args(["--message-format", "json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(&manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot run cargo (is the Rust toolchain installed? https://rustup.rs)")?;
    let mut wasm = None;
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines() {
            let line = line.context("reading cargo's output")?;
            if let Some(p) = wasm_artifact(&line) {
                wasm = Some(p);
            }
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!(
            "cargo build failed in {} ({status}): see its errors above",
            dir.display()
        );
    }
    let Some(wasm) = wasm else {
        bail!(
            "cargo built no .wasm in {}: a function crate needs `crate-type = [\"cdylib\"]` under [lib]",
            dir.display()
        );
    };
    if verbosity == Verbosity::Report {
        let bytes = std::fs::metadata(&wasm)
            .with_context(|| format!("cannot read {}", wasm.display()))?
            .len();
        // Loading it checks it is a component of the current contract.
        let rt = fogline_edge::functions::FunctionRuntime::new(Default::default())?;
        rt.load(&wasm)?;
        eprintln!(
            "Built {} ({} KiB): a component of the function contract; test it with `fogline-edge module test {}`",
            wasm.display(),
            bytes.div_ceil(1024),
            dir.display()
        );
    }
    Ok(Built { wasm })
}

/// `$CARGO` when run under cargo, else `cargo`.
fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// The `.wasm` a `compiler-artifact` message names, if any.
fn wasm_artifact(line: &str) -> Option<PathBuf> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v.get("reason")?.as_str()? != "compiler-artifact" {
        return None;
    }
    v.get("filenames")?
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str())
        .find(|f| f.ends_with(".wasm"))
        .map(PathBuf::from)
}

/// Installs the target with rustup when the toolchain lacks it.
fn ensure_target(dir: &Path) -> anyhow::Result<()> {
    let sysroot = Command::new("rustc")
        .current_dir(dir)
        .args(["--print", "sysroot"])
        .output()
        .context("cannot run rustc (is the Rust toolchain installed? https://rustup.rs)")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib").join(TARGET).is_dir() {
        return Ok(());
    }
    eprintln!("Installing the {TARGET} target: rustup target add {TARGET}");
    let status = Command::new("rustup")
        .current_dir(dir)
        .args(["target", "add", TARGET])
        .status()
        .with_context(|| {
            format!(
                "the toolchain at {} has no {TARGET} target and rustup is not there to add it: \
                 install the target for this toolchain",
                sysroot.display()
            )
        })?;
    if !status.success() {
        bail!("`rustup target add {TARGET}` failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_component_is_read_from_cargos_messages() {
        let line = r#"{"reason":"compiler-artifact","target":{"kind":["cdylib"]},"filenames":["/t/wasm32-wasip2/release/clamp.wasm"]}"#;
        assert_eq!(
            wasm_artifact(line),
            Some(PathBuf::from("/t/wasm32-wasip2/release/clamp.wasm"))
        );
        let dep = r#"{"reason":"compiler-artifact","filenames":["/t/libserde.rlib"]}"#;
        assert_eq!(wasm_artifact(dep), None);
        assert_eq!(
            wasm_artifact(r#"{"reason":"build-finished","success":true}"#),
            None
        );
        assert_eq!(wasm_artifact("Compiling…"), None);
    }
}
