//! Recovery after an aggregator outage, with real processes (mosquitto,
//! `fogline-edge`, `fogline-cloud`): 200,000 readings published; the
//! aggregator goes away at 30 % and is restarted once publishing ends (the
//! rest is backlogged on the gateway). Printed: from the restart to the
//! last reading stored, lost and duplicated (oracle against the store).
//!
//! Two rounds in the same run:
//! - **reference**: the aggregator is stopped cleanly (SIGTERM): the edge is
//!   told at once that the connection closed, so this is recovery with no
//!   failure to detect;
//! - **kill -9**: the aggregator dies silently; the edge has to find out.
//!
//! The ratio kill-9 / reference is the cost of detecting a dead aggregator.
//! Target (issue 6): kill -9 round ≤ 2 s, 0 lost, 0 duplicated.
//!
//! cargo build --release --bins && cargo bench -p fogline-tests --bench recovery [-- --per-sensor N]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fogline_tests::deploy::{http_get, uplink_toml, Cloud, Edge};
use fogline_tests::mosquitto::Mosquitto;
use fogline_tests::{oracle, process, sensors};

const SENSORS: usize = 10;

fn arg(name: &str, default: usize) -> usize {
    fogline_tests::bench_arg(name, default)
}

struct Round {
    restart_to_all: Duration,
    restart_to_listening: Duration,
    backlog: u64,
    verdict: oracle::Verdict,
}

fn round(per_sensor: usize, kill9: bool) -> Round {
    let total = SENSORS * per_sensor;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let node = "gw-recovery";
    fogline_testkit::certs::dev_bundle(&certs, &[node]).unwrap();
    let mosquitto = Mosquitto::start().unwrap();
    let mut cloud = Cloud::start(dir.path(), &certs).unwrap();
    let body = format!(
        "[mqtt]\nbroker = \"{}\"\n[[pipelines]]\nname = \"readings\"\ntopics = [\"sensors/+/reading\"]\nfunctions = []\n{}",
        mosquitto.addr(),
        uplink_toml(node, &certs, cloud.quic_port)
    );
    // RECOVERY_RUST_LOG=fogline_edge::uplink=debug shows the uplink's every step.
    let log = std::env::var("RECOVERY_RUST_LOG").unwrap_or_else(|_| "info".into());
    let edge = Edge::start_with_env(dir.path(), node, &body, &[("RUST_LOG", &log)]).unwrap();
    let subscribed = process::wait_until(Duration::from_secs(30), || {
        edge.status()
            .is_some_and(|s| s["broker_connected"].as_bool() == Some(true))
    });
    assert!(subscribed, "edge did not connect to mosquitto");
    std::thread::sleep(Duration::from_millis(300));

    let publisher =
        sensors::BackgroundPublisher::start(mosquitto.port(), SENSORS, per_sensor, None);
    let at_30 = publisher.wait_for(total * 3 / 10, Duration::from_secs(120));
    assert!(at_30, "publisher stalled before 30 %");
    if kill9 {
        cloud.daemon.kill9();
    } else {
        cloud.daemon.terminate().unwrap();
        cloud.daemon.wait_exit(Duration::from_secs(10));
    }
    publisher.finish().unwrap();
    // Every reading was PUBACKed, so every one is in the outbox (acks after
    // commit); what the aggregator has not got is the backlog.
    let stored_before = oracle::count(&cloud.store);
    let backlog = total as u64 - stored_before;
    // Let the edge's side settle into its outage (reconnect waits grow).
    std::thread::sleep(Duration::from_secs(2));

    let restarted = Instant::now();
    if std::env::var_os("RECOVERY_LOGS").is_some() {
        println!(
            "restarting the aggregator at {} ms since the epoch",
            fogline_telemetry::clock::now_ms()
        );
    }
    cloud.daemon.restart().unwrap();
    let mut listening = None;
    let watch = loop {
        if listening.is_none() && http_get(cloud.http_port, "/healthz").is_some() {
            listening = Some(restarted.elapsed());
        }
        if let Ok(w) = fogline_tests::deploy::CursorWatch::open(&cloud.store, node) {
            break w;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let last = total as u64;
    let all = process::wait_until(Duration::from_secs(120), || {
        if listening.is_none() && http_get(cloud.http_port, "/healthz").is_some() {
            listening = Some(restarted.elapsed());
        }
        watch.get() >= last
    });
    let restart_to_all = restarted.elapsed();
    assert!(all, "not all delivered within 120 s");
    let expected: BTreeSet<String> = (0..SENSORS)
        .flat_map(|s| (0..per_sensor).map(move |n| sensors::reading_id(s, n)))
        .collect();
    let verdict = oracle::judge(&oracle::read_store(&cloud.store).unwrap(), &expected);
    if std::env::var_os("RECOVERY_LOGS").is_some() {
        println!("{}", edge.daemon.log_text());
    }
    Round {
        restart_to_all,
        restart_to_listening: listening.unwrap_or_default(),
        backlog,
        verdict,
    }
}

fn main() {
    let per_sensor = arg("--per-sensor", 20_000);
    let total = SENSORS * per_sensor;
    println!("recovery: {total} readings from {SENSORS} sensors through mosquitto → fogline-edge → fogline-cloud; aggregator down at 30 %, restarted after publishing ends");
    let reference = round(per_sensor, false);
    let killed = round(per_sensor, true);
    for (name, r) in [("reference (SIGTERM)", &reference), ("kill -9", &killed)] {
        println!(
            "  {name:20} backlog {:>7} readings; restart → aggregator listening {:.3}s; restart → all delivered {:.3}s; {}",
            r.backlog,
            r.restart_to_listening.as_secs_f64(),
            r.restart_to_all.as_secs_f64(),
            r.verdict.summary()
        );
    }
    let ratio = killed.restart_to_all.as_secs_f64() / reference.restart_to_all.as_secs_f64();
    println!(
        "recovery after kill -9: {:.3}s from restart to all delivered (target ≤ 2 s: {}); reference {:.3}s; ratio {ratio:.2}×; lost {} duplicated {}",
        killed.restart_to_all.as_secs_f64(),
        if killed.restart_to_all <= Duration::from_secs(2) { "met" } else { "MISSED" },
        reference.restart_to_all.as_secs_f64(),
        killed.verdict.lost.len(),
        killed.verdict.duplicated.len()
    );
}
