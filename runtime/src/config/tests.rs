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
    assert_eq!(u.server_list(), vec!["127.0.0.1:7400".to_string()]);
    assert_eq!(u.server_name(&u.server_list()[0]), "127.0.0.1");
    assert_eq!(u.silence_timeout, std::time::Duration::from_secs(5));
    assert!(u.tcp_fallback);
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
fn the_old_server_key_and_the_server_list_combine() {
    let text = "[uplink]\nserver = \"a:1\"\nservers = [\"b:2\", \"[::1]:3\"]\nca = \"x\"\ncert = \"y\"\nkey = \"z\"\n";
    let c = EdgeConfig::parse(text, Path::new(".")).unwrap();
    let u = c.uplink.unwrap();
    assert_eq!(u.server_list(), vec!["a:1", "b:2", "[::1]:3"]);
    assert_eq!(u.server_name("[::1]:3"), "::1");
    let none = EdgeConfig::parse(
        "[uplink]\nca = \"x\"\ncert = \"y\"\nkey = \"z\"\n",
        Path::new("."),
    )
    .unwrap();
    let problems = none.validate().unwrap_err().to_string();
    assert!(problems.contains("servers = [\"host:port\""), "{problems}");
    let bad = EdgeConfig::parse(
        "[uplink]\nservers = [\"nope\"]\nprobe_after = \"9s\"\nca = \"x\"\ncert = \"y\"\nkey = \"z\"\n",
        Path::new("."),
    )
    .unwrap();
    let problems = bad.validate().unwrap_err().to_string();
    assert!(problems.contains("`nope` is not host:port"), "{problems}");
    assert!(problems.contains("uplink.probe_after: 9s"), "{problems}");
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
fn the_embedded_keys_of_older_configs_still_work() {
    // Tools outside this repo write these keys: they keep their meaning.
    let c = EdgeConfig::parse(
        "[broker]\nembedded = true\nlisten = \"0.0.0.0:18830\"\nlisten_v5 = \"0.0.0.0:18831\"\n\
         [[pipelines]]\nname = \"p\"\ntopics = [\"#\"]\nfunctions = []\n",
        Path::new("."),
    )
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.broker.listen.port(), 18830);
    assert_eq!(c.broker.listen_v5.map(|a| a.port()), Some(18831));
    assert!(
        c.pipelines[0].functions.is_empty(),
        "no functions: pass unchanged"
    );
    assert!(
        !c.external_broker_enabled(),
        "the endpoint feeds the pipeline directly; no broker to subscribe to"
    );
    let c = EdgeConfig::parse(
        "[broker]\nembedded = true\n[mqtt]\nbroker = \"10.0.0.5:1883\"\n",
        Path::new("."),
    )
    .unwrap();
    assert!(c.external_broker_enabled(), "both ways in when asked");
}

#[test]
fn the_endpoint_binds_loopback_and_allows_anonymous_only_without_users() {
    let c = EdgeConfig::parse("", Path::new(".")).unwrap();
    assert!(c.broker.listen.ip().is_loopback());
    assert!(c.broker_allows_anonymous());
    let hash = crate::ingest::endpoint::auth::hash_password("pw").unwrap();
    let c = EdgeConfig::parse(
        &format!("[[broker.users]]\nname = \"s1\"\npassword_hash = \"{hash}\"\n"),
        Path::new("."),
    )
    .unwrap();
    assert!(!c.broker_allows_anonymous());
}

#[test]
fn limits_are_checked_against_the_replication_protocol() {
    let text = r#"
        [broker]
        embedded = true
        max_topic_bytes = 4096
        max_payload_bytes = 20000000
        [[broker.users]]
        name = "s1"
        password_hash = "hunter2"
        [mqtt]
        qos = 0
        [[pipelines]]
        name = "p"
        topics = ["a/#"]
    "#;
    let c = EdgeConfig::parse(text, Path::new(".")).unwrap();
    let p = c.validate().unwrap_err().to_string();
    for needle in [
        "broker.max_topic_bytes: 4096 is outside 1..=1024",
        "broker.max_payload_bytes: 20000000 is above 8388608",
        "broker.users[0].password_hash (s1): not a password hash",
        "mqtt.qos: 0 is not 1 or 2",
    ] {
        assert!(p.contains(needle), "missing {needle:?} in:\n{p}");
    }
}

#[test]
fn the_edge_subscribing_to_its_own_endpoint_is_refused_naming_both_keys() {
    let pipes = "[[pipelines]]\nname = \"p\"\ntopics = [\"a/#\"]\n";
    for (text, listen) in [
        // Asked for explicitly, at the default address.
        (
            "[broker]\nembedded = true\n[mqtt]\nenabled = true\n",
            "127.0.0.1:1883",
        ),
        // Another spelling of the same address.
        (
            "[broker]\nembedded = true\n[mqtt]\nbroker = \"localhost:1883\"\n",
            "127.0.0.1:1883",
        ),
        // A wildcard listener takes loopback connections.
        (
            "[broker]\nembedded = true\nlisten = \"0.0.0.0:1999\"\n[mqtt]\nbroker = \"127.0.0.1:1999\"\n",
            "0.0.0.0:1999",
        ),
    ] {
        let c = EdgeConfig::parse(&format!("{text}{pipes}"), Path::new(".")).unwrap();
        let p = c.validate().unwrap_err().to_string();
        assert!(
            p.contains("is this gateway's own MQTT endpoint")
                && p.contains(&format!("broker.listen = {listen}")),
            "{text}\n{p}"
        );
    }
    // Another broker on another port or host is fine, and so is the
    // default [mqtt] beside the endpoint (it is then off).
    for text in [
        "[broker]\nembedded = true\n[mqtt]\nbroker = \"127.0.0.1:1884\"\n",
        "[broker]\nembedded = true\n[mqtt]\nbroker = \"10.0.0.5:1883\"\n",
        "[broker]\nembedded = true\n[mqtt]\nbroker = \"127.0.0.1:1883\"\n",
    ] {
        let c = EdgeConfig::parse(&format!("{text}{pipes}"), Path::new(".")).unwrap();
        c.validate().unwrap_or_else(|p| panic!("{text}\n{p}"));
    }
}

#[test]
fn contradictions_between_sections_are_reported_with_their_values() {
    let pipes = "[[pipelines]]\nname = \"p\"\ntopics = [\"a/#\"]\n";
    let cases = [
        (
            "[broker]\nembedded = true\n[metrics]\nlisten = \"127.0.0.1:1883\"\n",
            "metrics.listen: 127.0.0.1:1883 is also broker.listen (127.0.0.1:1883)",
        ),
        (
            "[broker]\nembedded = true\nlisten = \"0.0.0.0:2000\"\nlisten_v5 = \"127.0.0.1:2000\"\n",
            "broker.listen_v5: 127.0.0.1:2000 is also broker.listen (0.0.0.0:2000)",
        ),
        (
            "[mqtt]\nenabled = false\n",
            "mqtt.enabled: false, and broker.embedded is false too",
        ),
        (
            "[broker.tls]\ncert = \"c\"\nkey = \"k\"\n",
            "broker.tls: set, but broker.embedded = false",
        ),
        (
            "[uplink]\nservers = [\"a:1\"]\nca = \"x\"\ncert = \"y\"\nkey = \"z\"\nrefused_delay = \"20m\"\n",
            "uplink.refused_delay: 1200s is above uplink.refused_max_delay (600s)",
        ),
    ];
    for (text, needle) in cases {
        let c = EdgeConfig::parse(&format!("{text}{pipes}"), Path::new(".")).unwrap();
        let p = c.validate().unwrap_err().to_string();
        assert!(p.contains(needle), "missing {needle:?} in:\n{p}");
    }
}

#[test]
fn both_example_configs_parse_and_differ_only_in_the_way_in() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let native = example();
    assert!(
        native.broker.embedded,
        "the newcomer's default needs no broker"
    );
    assert!(!native.external_broker_enabled());
    let text = std::fs::read_to_string(dir.join("edge-mosquitto.toml")).unwrap();
    let external = EdgeConfig::parse(&text, &dir).unwrap();
    assert!(!external.broker.embedded);
    assert!(external.external_broker_enabled());
    assert_eq!(external.mqtt.broker, "127.0.0.1:1883");
    assert_eq!(external.node.id, native.node.id);
    assert_eq!(external.pipelines.len(), native.pipelines.len());
    assert_eq!(
        external.uplink.as_ref().map(|u| u.cert.clone()),
        native.uplink.as_ref().map(|u| u.cert.clone())
    );
}

#[test]
fn the_packaged_default_config_is_valid_as_installed() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("debian/edge.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let c = EdgeConfig::parse(&text, Path::new("/etc/fogline")).unwrap();
    c.validate().unwrap();
    assert_eq!(c.data_dir(), Path::new("/var/lib/fogline"));
    assert!(c.broker.embedded && !c.external_broker_enabled());
    assert!(
        c.uplink.is_none(),
        "buffers until the operator adds [uplink]"
    );
}

#[test]
fn commit_interval_is_bounded_by_ten_seconds_and_the_stall_check() {
    let parse = |outbox: &str, health: &str| {
        let text = format!(
            "[[pipelines]]\nname = \"p\"\ntopics = [\"a/#\"]\nfunctions = []\n[outbox]\n{outbox}\n[health]\n{health}\n"
        );
        EdgeConfig::parse(&text, Path::new(".")).unwrap()
    };
    assert_eq!(parse("", "").outbox.commit_interval, Duration::ZERO);
    let ok = parse("commit_interval = \"250ms\"", "");
    assert_eq!(ok.outbox.commit_interval, Duration::from_millis(250));
    ok.validate().unwrap();
    let p = parse("commit_interval = \"11s\"", "stall_after = \"60s\"")
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        p.contains("outbox.commit_interval: 11s is above 10s"),
        "{p}"
    );
    let p = parse("commit_interval = \"5s\"", "stall_after = \"8s\"")
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        p.contains("outbox.commit_interval: 5s is more than half of health.stall_after (8s)")
            && p.contains("at least 10s"),
        "{p}"
    );
    parse("commit_interval = \"10s\"", "").validate().unwrap();
}
