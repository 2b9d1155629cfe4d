//! Kill -9 of the aggregator and of the edge daemon mid-stream: the
//! aggregator ends up with exactly the readings the function passes.
//! (Checks: ingest acks only after a durable commit; redeliveries after an
//! edge crash are not processed twice; the aggregator applies (node, seq)
//! once; the edge resumes from the aggregator's cursor; a restarted edge
//! takes over its old, still-open connection.)

use fogline_tests::sensors::{self, BackgroundPublisher};

use std::time::Duration;

use crate::{expected_hot, Cluster};

#[test]
fn kill9_aggregator_and_edge_mid_stream_lose_and_duplicate_nothing() {
    const SENSORS: usize = 8;
    const PER_SENSOR: usize = 2_500; // 20,000 readings
    const TOTAL: usize = SENSORS * PER_SENSOR;
    let mut cluster = Cluster::start("gw-crash");
    let expected = expected_hot(SENSORS, PER_SENSOR);
    assert!(
        expected.len() > 5_000,
        "the threshold should pass a good share"
    );

    // Publish in the background; the main thread kills at 30% and 60%.
    // 2,000/s in total: long enough to kill mid-stream.
    let publisher =
        BackgroundPublisher::start(cluster.mosquitto.port(), SENSORS, PER_SENSOR, Some(250));
    let reached =
        |frac: f64| publisher.wait_for((frac * TOTAL as f64) as usize, Duration::from_secs(60));
    assert!(reached(0.3), "publisher stalled before 30%");
    cluster.cloud.kill9();
    std::thread::sleep(Duration::from_millis(700));
    cluster.cloud.restart().unwrap();

    assert!(reached(0.6), "publisher stalled before 60%");
    cluster.edge.kill9();
    std::thread::sleep(Duration::from_millis(300));
    cluster.edge.restart().unwrap();

    publisher.finish().unwrap();
    let verdict = cluster.settle(&expected, Duration::from_secs(120));
    assert!(
        verdict.is_exact(),
        "{}\n{}",
        verdict.summary(),
        cluster.logs()
    );
    assert!(cluster.edge.is_running() && cluster.cloud.is_running());
}

#[test]
fn an_edge_restarted_while_its_old_connection_is_open_takes_over_and_nothing_is_applied_twice() {
    let mut cluster = Cluster::start("gw-takeover");
    cluster.publish(4, 250, None, |_| {});
    // Wait until the edge has synced (its connection is up and busy), then
    // kill it: the aggregator still holds that connection (no close frame).
    let synced = fogline_tests::process::wait_until(Duration::from_secs(30), || {
        fogline_tests::oracle::count(&cluster.store) > 0
    });
    assert!(synced, "{}", cluster.logs());
    cluster.edge.kill9();
    cluster.edge.restart().unwrap();
    cluster.wait_edge_subscribed();
    // More readings through the new process.
    // Sensors 4..8, so ids do not collide with the first round.
    let second_round = (4..8)
        .flat_map(|s| (0..250).map(move |n| (s, n)))
        .map(|(s, n)| {
            let payload = sensors::payload(s, n, 1_764_000_000_000 + n as u64);
            (sensors::topic(s), payload.into_bytes())
        })
        .collect();
    crate::publish_raw(cluster.mosquitto.port(), second_round);
    let expected = crate::expected_hot(8, 250);
    let verdict = cluster.settle(&expected, Duration::from_secs(60));
    assert!(
        verdict.is_exact(),
        "{}\n{}",
        verdict.summary(),
        cluster.logs()
    );
    assert!(
        cluster
            .cloud
            .log_text()
            .contains("Node reconnected; closing its previous connection"),
        "the new connection took over the old one:\n{}",
        cluster.logs()
    );
}

/// I-18: a restarted aggregator (kill -9, back 300 ms later) is found by its
/// stateless reset (keys derived from its private key, so the edge believes
/// it) or by a fresh connection tried alongside the silent one — not by
/// waiting out the silence timeout, nor QUIC's idle timeout — and nothing is
/// lost or applied twice.
#[test]
fn a_restarted_aggregator_is_found_by_its_reset_or_a_probe_well_before_the_silence_timeout() {
    const SENSORS: usize = 4;
    const PER_SENSOR: usize = 1_500;
    let mut cluster = Cluster::start("gw-probe");
    let expected = expected_hot(SENSORS, PER_SENSOR);
    // 1,000/s: batches are always in flight.
    let publisher =
        BackgroundPublisher::start(cluster.mosquitto.port(), SENSORS, PER_SENSOR, Some(250));
    let reached = publisher.wait_for(SENSORS * PER_SENSOR / 4, Duration::from_secs(60));
    assert!(reached, "publisher stalled");
    cluster.cloud.kill9();
    std::thread::sleep(Duration::from_millis(300));
    cluster.cloud.restart().unwrap();
    let restarted = std::time::Instant::now();
    let mut uplink = serde_json::Value::Null;
    let found = fogline_tests::process::wait_until(Duration::from_secs(25), || {
        uplink = cluster
            .edge_status()
            .map(|s| s["uplink"].clone())
            .unwrap_or_default();
        uplink["connects"].as_u64().unwrap_or(0) >= 2
    });
    let took = restarted.elapsed();
    assert!(
        found,
        "the edge never reconnected: {uplink}\n{}",
        cluster.logs()
    );
    let log = cluster.edge.log_text();
    let by_reset = log.contains("reset by peer");
    let by_probe = uplink["probe_switches"].as_u64().unwrap_or(0) >= 1;
    assert!(by_reset || by_probe, "{uplink}\n{log}");
    // The silence timeout (5 s) never had to fire.
    assert_eq!(
        uplink["silent"], 0,
        "found by a reset or a probe, not by silence: {uplink}"
    );
    assert!(took < Duration::from_secs(5), "found after {took:?}");
    publisher.finish().unwrap();
    let verdict = cluster.settle(&expected, Duration::from_secs(60));
    assert!(
        verdict.is_exact(),
        "{}\n{}",
        verdict.summary(),
        cluster.logs()
    );
}
