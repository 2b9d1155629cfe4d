//! `fogline-edge module new`: a function crate that builds anywhere.
//!
//! The SDK and the WIT contract travel inside this binary and are written
//! into the crate (`vendor/`), so the crate needs no checkout of this
//! repository and always matches the contract of the daemon that made it.
//! Each template is one of the examples in `modules/examples/`, with its
//! sample input, expected output and settings.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// What a new function starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
    /// Pass readings whose field is above/below a bound (examples/threshold).
    Filter,
    /// Convert a field to engineering units (examples/scale).
    Map,
    /// Per-stream window averages, windows durable (examples/window-avg).
    Window,
    /// Report by exception per sensor, durable (examples/deadband).
    Deadband,
}

/// A template's files, from `modules/examples/<dir>/`.
struct Source {
    lib_rs: &'static str,
    samples: &'static str,
    expected: &'static str,
    settings: &'static str,
    /// The example's crate name, replaced by the new one in `lib.rs`.
    example: &'static str,
}

macro_rules! example {
    ($dir:literal, $name:literal) => {
        Source {
            lib_rs: include_str!(concat!(
                "../../../../modules/examples/",
                $dir,
                "/src/lib.rs"
            )),
            samples: include_str!(concat!(
                "../../../../modules/examples/",
                $dir,
                "/samples.jsonl"
            )),
            expected: include_str!(concat!(
                "../../../../modules/examples/",
                $dir,
                "/expected.jsonl"
            )),
            settings: include_str!(concat!(
                "../../../../modules/examples/",
                $dir,
                "/function.toml"
            )),
            example: $name,
        }
    };
}

impl Template {
    fn source(self) -> Source {
        match self {
            Template::Filter => example!("threshold", "threshold"),
            Template::Map => example!("scale", "scale"),
            Template::Window => example!("window-avg", "window_avg"),
            Template::Deadband => example!("deadband", "deadband"),
        }
    }
}

/// The SDK's sources, as vendored into a new crate (`vendor/fogline-sdk/`).
const SDK_FILES: &[(&str, &str)] = &[
    (
        "src/lib.rs",
        include_str!("../../../../modules/sdk/src/lib.rs"),
    ),
    (
        "src/batch.rs",
        include_str!("../../../../modules/sdk/src/batch.rs"),
    ),
    (
        "src/function.rs",
        include_str!("../../../../modules/sdk/src/function.rs"),
    ),
    (
        "src/harness.rs",
        include_str!("../../../../modules/sdk/src/harness.rs"),
    ),
    (
        "src/host.rs",
        include_str!("../../../../modules/sdk/src/host.rs"),
    ),
    (
        "src/json.rs",
        include_str!("../../../../modules/sdk/src/json.rs"),
    ),
    (
        "src/log.rs",
        include_str!("../../../../modules/sdk/src/log.rs"),
    ),
    (
        "src/message.rs",
        include_str!("../../../../modules/sdk/src/message.rs"),
    ),
    (
        "src/output.rs",
        include_str!("../../../../modules/sdk/src/output.rs"),
    ),
    (
        "src/state.rs",
        include_str!("../../../../modules/sdk/src/state.rs"),
    ),
    (
        "src/window.rs",
        include_str!("../../../../modules/sdk/src/window.rs"),
    ),
];

/// The contract, where the SDK's `generate!` looks for it (`../wit`).
const WIT: &str = include_str!("../../../../modules/wit/function.wit");

/// The SDK's own dependencies: the same as in `modules/Cargo.toml` (a test
/// keeps them equal).
const SDK_DEPENDENCIES: &str = r#"wit-bindgen = { version = "0.61", default-features = false, features = ["macros", "realloc"] }
serde = { version = "1", features = ["derive"] }
serde_json = "1"
"#;

fn sdk_manifest() -> String {
    format!(
        r#"# fogline-sdk {version}, vendored by `fogline-edge module new`: the SDK of
# the daemon that made this crate. Newer daemons ship newer copies.
[package]
name = "fogline-sdk"
version = "{version}"
edition = "2021"
license = "Apache-2.0"
publish = false

[dependencies]
{SDK_DEPENDENCIES}"#,
        version = env!("CARGO_PKG_VERSION"),
    )
}

fn crate_manifest(name: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib"]          # a WebAssembly component, not an rlib

[dependencies]
fogline-sdk = {{ path = "vendor/fogline-sdk" }}
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"

[profile.release]
# Small modules load faster and are what gateways download.
opt-level = "s"
lto = true
codegen-units = 1
strip = true
panic = "abort"                  # a panic is a trap the daemon recovers from

# A workspace of its own, wherever it is created.
[workspace]
"#
    )
}

const CARGO_CONFIG: &str = r#"# `cargo build` builds the component; `cargo test-host` runs the unit
# tests (fogline_sdk::harness) on this machine instead.
[build]
target = "wasm32-wasip2"

[alias]
test-host = "test --target host-tuple"
"#;

fn readme(name: &str, template: Template) -> String {
    format!(
        r#"# {name}

A Fogline function (from the `{template}` template of `fogline-edge module new`).

```sh
fogline-edge module build                                   # → target/wasm32-wasip2/release/{file}.wasm
fogline-edge module test --input samples.jsonl --expect expected.jsonl
cargo test-host                                             # unit tests with fogline_sdk::harness
```

- `src/lib.rs`: the function. `function.toml`: its settings (the `config` table in edge.toml).
- `samples.jsonl`: one sample per line (`{{"stream": .., "payload": ..}}`, a bare payload, or
  `{{"tick": <ms>}}`); `expected.jsonl`: what the function must emit for them.
- `vendor/`: the SDK and the contract, as shipped with the daemon that created this crate.
"#,
        template = format!("{template:?}").to_lowercase(),
        file = name.replace('-', "_"),
    )
}

/// A Cargo package name that is also a valid file name: letters, digits,
/// `-` and `_`, starting with a letter, at most 64 characters.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let starts = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if name.is_empty() || name.len() > 64 || !ok_chars || !starts {
        bail!(
            "`{name}` cannot name a function crate: use letters, digits, `-` and `_`, starting with a letter, at most 64 characters"
        );
    }
    if ["fogline-sdk", "fogline_sdk", "test", "core", "std", "alloc"].contains(&name) {
        bail!("`{name}` is taken (it would shadow a crate the function depends on)");
    }
    Ok(())
}

/// Writes the new crate `parent/name`; refuses an existing, non-empty directory.
pub fn create(name: &str, template: Template, parent: &Path) -> anyhow::Result<PathBuf> {
    check_name(name)?;
    let dir = parent.join(name);
    if dir.exists()
        && std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} exists and is not empty: choose another name or directory",
            dir.display()
        );
    }
    let source = template.source();
    let lib_rs = source.lib_rs.replace(
        &format!("{}.wasm", source.example),
        &format!("{}.wasm", name.replace('-', "_")),
    );
    let mut files: Vec<(PathBuf, String)> = vec![
        ("Cargo.toml".into(), crate_manifest(name)),
        (".cargo/config.toml".into(), CARGO_CONFIG.into()),
        (".gitignore".into(), "/target\n".into()),
        ("README.md".into(), readme(name, template)),
        ("src/lib.rs".into(), lib_rs),
        ("samples.jsonl".into(), source.samples.into()),
        ("expected.jsonl".into(), source.expected.into()),
        ("function.toml".into(), source.settings.into()),
        ("vendor/fogline-sdk/Cargo.toml".into(), sdk_manifest()),
        ("vendor/wit/function.wit".into(), WIT.into()),
    ];
    for (path, text) in SDK_FILES {
        files.push((Path::new("vendor/fogline-sdk").join(path), (*text).into()));
    }
    for (path, text) in &files {
        let path = dir.join(path);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(dir)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    #[test]
    fn every_sdk_source_file_is_vendored() {
        let mut on_disk: Vec<String> = std::fs::read_dir(repo().join("modules/sdk/src"))
            .unwrap()
            .map(|e| format!("src/{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        on_disk.sort();
        let mut vendored: Vec<String> = SDK_FILES.iter().map(|(p, _)| p.to_string()).collect();
        vendored.sort();
        assert_eq!(vendored, on_disk, "add the new SDK file to SDK_FILES");
    }

    #[test]
    fn the_vendored_sdk_depends_on_what_the_guest_workspace_pins() {
        let ws = std::fs::read_to_string(repo().join("modules/Cargo.toml")).unwrap();
        for line in SDK_DEPENDENCIES.lines() {
            assert!(
                ws.contains(line),
                "modules/Cargo.toml no longer has `{line}`"
            );
        }
    }

    #[test]
    fn names_are_checked_and_an_existing_crate_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "1abc", "a b", "../x", "fogline-sdk", &"x".repeat(65)] {
            let err = create(bad, Template::Filter, dir.path()).unwrap_err();
            assert!(err.to_string().contains(&format!("`{bad}`")), "{err}");
        }
        let made = create("my-filter", Template::Deadband, dir.path()).unwrap();
        let lib = std::fs::read_to_string(made.join("src/lib.rs")).unwrap();
        assert!(lib.contains("module = \"my_filter.wasm\""), "{lib}");
        assert!(made.join("vendor/fogline-sdk/src/harness.rs").is_file());
        assert!(made.join("vendor/wit/function.wit").is_file());
        let err = create("my-filter", Template::Filter, dir.path()).unwrap_err();
        assert!(err.to_string().contains("exists and is not empty"), "{err}");
    }
}
