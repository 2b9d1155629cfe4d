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
fn test_module_runs_threshold_over_samples() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples.jsonl");
    std::fs::write(
        &samples,
        "{\"temp\": 31.5}\n{\"temp\": 12}\nnot json\n{\"stream\":\"sensors/a\",\"timestamp_ms\":5,\"payload\":{\"temp\":40}}\n",
    )
    .unwrap();
    let conf = dir.path().join("f.toml");
    std::fs::write(&conf, "field = \"temp\"\nabove = 30.0\n").unwrap();
    let out = edge()
        .arg("test-module")
        .arg(fogline_modules::threshold())
        .arg("--input")
        .arg(&samples)
        .arg("--config")
        .arg(&conf)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].contains("31.5") && lines[1].contains("sensors/a"),
        "{stdout}"
    );
    assert!(stderr.contains("rejected input 2"), "{stderr}");
    assert!(
        stderr.contains("4 input(s): 2 emitted, 1 rejected"),
        "{stderr}"
    );
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
