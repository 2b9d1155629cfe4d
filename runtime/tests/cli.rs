//! The `fogline-edge` command line, run as a user would.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::process::Command;

fn edge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fogline-edge"))
}

#[test]
fn check_accepts_the_example_config_and_loads_its_modules() {
    // The example config points at the modules fogline-modules builds.
    let _ = fogline_modules::threshold();
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/edge.toml");
    // Certificates the example names must exist for validation to pass.
    let text = std::fs::read_to_string(&example)
        .unwrap()
        .replace(
            "fogline-data",
            &dir.path().join("data").display().to_string(),
        )
        .replace("\"../certs/", &format!("\"{}/", dir.path().display()))
        .replace(
            "../target/",
            &format!("{}/../target/", env!("CARGO_MANIFEST_DIR")),
        );
    for f in ["ca.pem", "node-gw-001.pem", "node-gw-001.key"] {
        std::fs::write(dir.path().join(f), "placeholder").unwrap();
    }
    let cfg = dir.path().join("edge.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = edge()
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 pipeline(s), 2 function(s)"), "{stdout}");
}

#[test]
fn check_reports_every_problem_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("edge.toml");
    std::fs::write(
        &cfg,
        "[[pipelines]]\nname = \"p\"\ntopics = [\"a/#/b\"]\nfunctions = [\"nope\"]\n",
    )
    .unwrap();
    let out = edge()
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pipelines[0] (p).topics: `a/#/b`"), "{err}");
    assert!(err.contains("no function named `nope`"), "{err}");
}

#[test]
fn module_test_runs_a_component_over_samples_ticks_and_an_expected_output() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples.jsonl");
    std::fs::write(
        &samples,
        "{\"temp\": 31.5}\n{\"temp\": 12}\nnot json\n{\"stream\":\"sensors/a\",\"timestamp_ms\":5,\"payload\":{\"temp\":40}}\n",
    )
    .unwrap();
    let conf = dir.path().join("f.toml");
    std::fs::write(&conf, "field = \"temp\"\nabove = 30.0\n").unwrap();
    let run = |extra: &[&str]| {
        edge()
            .args(["module", "test", "--wasm"])
            .arg(fogline_modules::threshold())
            .arg("--input")
            .arg(&samples)
            .arg("--settings")
            .arg(&conf)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Samples without a time get fixed ones (2026-01-01, a second apart).
    assert_eq!(
        stdout,
        "{\"stream\":\"test\",\"timestamp_ms\":1767225600000,\"payload\":{\"temp\":31.5}}\n\
         {\"stream\":\"sensors/a\",\"timestamp_ms\":5,\"payload\":{\"temp\":40}}\n"
    );
    assert!(
        stderr.contains("rejected (line 3): payload is not JSON"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "4 sample(s) in 1 batch(es) of up to 8192, 1 tick(s): 2 emitted, 1 problem(s)"
        ),
        "{stderr}"
    );

    // Batches of 2 and scripted ticks cut the script as the daemon would.
    let out = run(&["--batch", "2", "--ticks", "+1s", "--no-final-tick"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("4 sample(s) in 3 batch(es) of up to 2, 1 tick(s)"),
        "{stderr}"
    );

    // An expected output: key order and spacing do not matter; a difference
    // is a diff and exit 1.
    let expected = dir.path().join("expected.jsonl");
    std::fs::write(
        &expected,
        "{\"payload\": {\"temp\": 31.5}, \"stream\": \"test\"}\n{\"stream\": \"sensors/a\", \"payload\": {\"temp\": 40}}\n",
    )
    .unwrap();
    let out = run(&["--expect", expected.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        &expected,
        "{\"stream\": \"test\", \"payload\": {\"temp\": 31.5}}\n{\"stream\": \"sensors/a\", \"payload\": {\"temp\": 41}}\n",
    )
    .unwrap();
    let out = run(&["--expect", expected.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("-{\"stream\":\"sensors/a\",\"payload\":{\"temp\":41}}")
            && stdout.contains("+{\"stream\":\"sensors/a\",\"payload\":{\"temp\":40}}")
            && stdout.contains(" {\"stream\":\"test\",\"payload\":{\"temp\":31.5}}"),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("MISMATCH: 2 output(s), 2 expected"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_example_gives_its_expected_output_for_its_samples() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../modules/examples");
    for (name, wasm) in fogline_modules::all() {
        let dir = examples.join(name);
        let out = edge()
            .args(["module", "test", "--wasm"])
            .arg(wasm)
            .arg("--input")
            .arg(dir.join("samples.jsonl"))
            .arg("--settings")
            .arg(dir.join("function.toml"))
            .arg("--expect")
            .arg(dir.join("expected.jsonl"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.contains("ok: "),
            "{name}: {}{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        let expected = std::fs::read_to_string(dir.join("expected.jsonl")).unwrap();
        assert!(expected.lines().count() >= 2, "{name}: a real expectation");
    }
}

/// Runs `fogline-edge` with the nested cargo builds kept apart from the
/// outer one's flags, their target directory shared between runs.
fn edge_building() -> Command {
    let mut c = edge();
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
    ] {
        c.env_remove(var);
    }
    c.env(
        "CARGO_TARGET_DIR",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/module-workflow"),
    );
    c
}

#[test]
fn module_new_build_and_test_work_in_a_fresh_directory_outside_the_repository() {
    let dir = tempfile::tempdir().unwrap();
    for template in ["filter", "map", "window", "deadband"] {
        let name = format!("my-{template}");
        let out = edge()
            .args(["module", "new", &name, "--template", template, "--dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let krate = dir.path().join(&name);
        let out = edge_building()
            .args(["module", "build"])
            .current_dir(&krate)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{template}: {stderr}");
        let wasm = format!("{}.wasm", name.replace('-', "_"));
        assert!(
            stderr.contains(&wasm) && stderr.contains("a component of the function contract"),
            "{template}: {stderr}"
        );
        // The template's own samples give its expected output.
        let out = edge_building()
            .args([
                "module",
                "test",
                "--input",
                "samples.jsonl",
                "--expect",
                "expected.jsonl",
            ])
            .current_dir(&krate)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.contains("ok: "),
            "{template}: {}{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // Samples on standard input; a change to the function shows as a diff.
    let krate = dir.path().join("my-deadband");
    let lib = krate.join("src/lib.rs");
    let text = std::fs::read_to_string(&lib).unwrap();
    std::fs::write(
        &lib,
        text.replace("> self.deadband", ">= 100.0 * self.deadband"),
    )
    .unwrap();
    let mut child = edge_building()
        .args([
            "module",
            "test",
            "--input",
            "-",
            "--expect",
            "expected.jsonl",
        ])
        .current_dir(&krate)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let samples = std::fs::read(krate.join("samples.jsonl")).unwrap();
        child.stdin.take().unwrap().write_all(&samples).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("-{\"stream\":\"sensors/t1\",\"timestamp_ms\":1767225604000"),
        "{stdout}"
    );

    // The crate's unit tests (fogline_sdk::harness) run on the host.
    std::fs::write(&lib, text).unwrap();
    let out = edge_building_cargo()
        .args(["test-host", "--quiet"])
        .current_dir(&krate)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("5 passed"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Errors say what is wrong and what to do.
    let out = edge()
        .args(["module", "build"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("has no Cargo.toml"),
        "{stderr}"
    );
    let out = edge()
        .args(["module", "new", "my-filter", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("exists and is not empty"),
        "{stderr}"
    );
}

/// `cargo` as a user would run it in the new crate.
fn edge_building_cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (k, v) in edge_building().get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

#[test]
fn status_reads_the_outbox_when_no_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("edge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nid = \"gw-x\"\ndata_dir = \"{}\"\n[[pipelines]]\nname = \"p\"\ntopics = [\"a/#\"]\n[metrics]\nlisten = \"127.0.0.1:1\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    fogline_edge::outbox::Outbox::open(
        &dir.path().join("data/outbox.db"),
        fogline_edge::config::SyncMode::Full,
    )
    .unwrap();
    let out = edge()
        .args(["status", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "not running is exit 3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("daemon            not running"), "{stdout}");
    assert!(stdout.contains("backlog           0 records"), "{stdout}");
}
