//! A gateway's clock behind (I-30): no RTC, booted 30 days in the past.
//! The edge runs under libfaketime (only its wall clock is shifted; its
//! monotonic clock and everything else are real).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use fogline_tests::deploy::Edge;
use fogline_tests::mqtt_raw::QoS;
use fogline_tests::process;

use crate::external::{
    assert_exact, debug_broker, ids_of, passthrough, publish, readings, status, stop, Site,
};

/// libfaketime's multi-threaded preload library (`scripts/test.sh`
/// installs Debian's `libfaketime`).
fn faketime() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!("libfaketime is not installed: scripts/test.sh installs it (apt-get install libfaketime)")
    })
}

/// The environment that puts the edge's wall clock 30 days behind.
fn thirty_days_behind(lib: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME".into(), "-30d".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
    ]
}

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The `/healthz` problems as `component kind` strings.
fn problems(edge: &Edge) -> (u16, Vec<String>) {
    let Some((code, body)) = edge.healthz() else {
        return (0, Vec::new());
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let list = v["problems"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    format!(
                        "{} {}",
                        p["component"].as_str().unwrap_or(""),
                        p["kind"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (code, list)
}

/// I-30, the three moments of a gateway without RTC:
/// 1. First boot 30 days behind, never having seen the time: the
///    aggregator's certificate is "not valid yet" by its clock. Readings are
///    acknowledged and buffered; `/healthz` says `clock_wrong` — not
///    `refused` — and nothing reaches the aggregator.
/// 2. The clock is set: it drains, exactly once.
/// 3. A power cut resets the clock 30 days back again: having seen the time
///    before, the edge checks certificates against that, reconnects at
///    once, and says its wall clock is behind; readings arrive exactly once.
#[test]
fn a_gateway_whose_clock_is_behind_buffers_reconnects_once_it_has_seen_the_time_and_says_so() {
    let lib = faketime();
    let behind = thirty_days_behind(&lib);
    let node = "gw-clock";
    let site = Site::start(node, debug_broker());
    let pipelines = passthrough(&[("readings", &["sensors/+/reading"])]);
    let body = site.edge_body(node, &pipelines, "") + "connect_timeout = \"1s\"\n";
    let mut edge = Edge::start_with_env(site.dir.path(), node, &body, &env_refs(&behind)).unwrap();
    site.wait_subscribed(&edge, node, 1);

    // 1. Never seen the time.
    let first = readings(0..2, 0..500);
    publish(site.mosquitto.port(), QoS::AtLeastOnce, &first);
    let said = process::wait_until(Duration::from_secs(30), || {
        problems(&edge).1.iter().any(|p| p == "clock clock_wrong")
    });
    let (code, found) = problems(&edge);
    assert!(
        said && code == 503,
        "{code} {found:?}\n{}",
        site.logs(&edge)
    );
    assert!(
        !found.iter().any(|p| p.ends_with(" refused")),
        "a clock behind is not a refusal: {found:?}"
    );
    // The broker acknowledged them; the edge receives them a moment later.
    edge.wait_for(Duration::from_secs(30), "buffer 1000 readings", |s| {
        s["outbox"]["backlog_records"].as_u64() == Some(1000)
    })
    .unwrap_or_else(|e| panic!("{e}: {}", status(&edge)));
    assert_eq!(
        fogline_tests::deploy::store_cursor(&site.cloud.store, node),
        0
    );

    // 2. The clock is set (NTP synced): everything drains.
    stop(&mut edge.daemon);
    edge.daemon.restart_with_env(&[]).unwrap();
    site.wait_subscribed(&edge, node, 2);
    let mut expected: BTreeSet<String> = ids_of(&first);
    assert_exact(
        &site.cloud.store,
        &expected,
        Duration::from_secs(60),
        || site.logs(&edge),
    );

    // 3. Power cut, clock 30 days back again.
    stop(&mut edge.daemon);
    edge.daemon.restart_with_env(&env_refs(&behind)).unwrap();
    site.wait_subscribed(&edge, node, 3);
    let later = readings(0..2, 500..1000);
    publish(site.mosquitto.port(), QoS::AtLeastOnce, &later);
    expected.extend(ids_of(&later));
    assert_exact(
        &site.cloud.store,
        &expected,
        Duration::from_secs(60),
        || site.logs(&edge),
    );
    let (code, found) = problems(&edge);
    assert_eq!(code, 503, "{found:?}");
    assert!(
        found.iter().any(|p| p == "clock clock_wrong"),
        "the wall clock behind is reported: {found:?}"
    );
    let log = edge.daemon.log_text();
    let third_run = log
        .rsplit("Fogline edge daemon started")
        .next()
        .unwrap_or("");
    assert!(
        !third_run.contains("not valid yet"),
        "the third run reconnected without a certificate error:\n{third_run}"
    );
}
