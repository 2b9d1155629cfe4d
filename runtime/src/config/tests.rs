#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use super::*;

fn example() -> EdgeConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/edge.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    EdgeConfig::parse(&text, path.parent().unwrap()).unwrap()
}

#[test]
fn the_example_config_parses_with_every_key() {
    let c = example();
    assert_eq!(c.node.id, "gw-001");
    assert_eq!(c.pipelines.len(), 2);
    assert_eq!(c.functions["hot"].config["above"].as_float(), Some(30.0));
    assert_eq!(c.outbox.sync, SyncMode::Full);
    let u = c.uplink.as_ref().unwrap();
    assert_eq!(u.server_name(), "127.0.0.1");
    assert_eq!(c.topic_filters(), vec!["sensors/+/reading".to_string()]);
}

#[test]
fn an_empty_config_gets_defaults_and_one_clear_problem() {
    let c = EdgeConfig::parse("", Path::new(".")).unwrap();
    assert_eq!(c.mqtt.receive_maximum, 4096);
    assert!(c.uplink.is_none());
    let problems = c.validate().unwrap_err();
    assert_eq!(problems.0.len(), 1, "{problems}");
    assert!(problems.0[0].contains("pipelines"));
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let err = EdgeConfig::parse("[mqtt]\nbrokr = \"x:1\"\n", Path::new(".")).unwrap_err();
    assert!(err.contains("brokr"), "{err}");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn validation_reports_every_problem_at_once() {
    let text = r#"
        [functions.f]
        module = "missing.wasm"
        memory_mib = 0
        [[pipelines]]
        name = "p"
        topics = ["a/#/b"]
        functions = ["f", "nope"]
        [[pipelines]]
        name = "p"
        topics = []
    "#;
    let c = EdgeConfig::parse(text, Path::new("/nonexistent")).unwrap();
    let p = c.validate().unwrap_err().to_string();
    for needle in [
        "missing.wasm",
        "memory_mib",
        "`a/#/b`",
        "no function named `nope`",
        "`p` is used twice",
        "at least one topic filter",
    ] {
        assert!(p.contains(needle), "missing {needle:?} in:\n{p}");
    }
}

#[test]
fn embedded_broker_becomes_the_ingest_broker() {
    let c = EdgeConfig::parse(
        "[broker]\nembedded = true\nlisten_v5 = \"0.0.0.0:18830\"\n",
        Path::new("."),
    )
    .unwrap();
    assert_eq!(c.ingest_broker(), "127.0.0.1:18830");
}
