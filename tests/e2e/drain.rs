//! Drain priorities end to end (I-35): after an outage, a `high` pipeline's
//! alerts reach the aggregator before the backlog numbered ahead of them,
//! and with `drain = "live_first"` readings arriving during the drain go
//! before the backlog — while every reading is stored exactly once, in seq
//! order per stream (the oracle), over protocol 4.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use fogline_tests::deploy::{uplink_toml, Cloud, Edge};
use fogline_tests::mqtt_raw::QoS;
use fogline_tests::{process, sensors};
use rusqlite::{Connection, OpenFlags};

use crate::external::{assert_exact, ids_of, publish, readings};

const NODE: &str = "gw-drain";

/// Alerts with unique reading ids, on `alerts/<sensor>`.
fn alerts(n: usize) -> Vec<(String, Bytes)> {
    (0..n)
        .map(|i| {
            let p = sensors::payload(90, i, 1_764_000_000_000 + i as u64);
            ("alerts/s90".to_string(), Bytes::from(p))
        })
        .collect()
}

/// (received_ms, seq) of every stored reading, by reading id.
fn arrivals(store: &std::path::Path) -> BTreeMap<String, (u64, u64)> {
    let conn = Connection::open_with_flags(store, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut st = conn
        .prepare("SELECT seq, payload, received_ms FROM records WHERE node = ?1")
        .unwrap();
    let rows = st
        .query_map([NODE], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)? as u64,
            ))
        })
        .unwrap();
    let mut out = BTreeMap::new();
    for row in rows {
        let (seq, payload, received) = row.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
        if let Some(id) = v.get("id").and_then(|i| i.as_str()) {
            out.insert(id.to_string(), (received, seq));
        }
    }
    out
}

/// I-35: alerts first, live readings before the backlog, every reading once.
#[test]
fn alerts_and_live_readings_overtake_the_backlog_and_everything_arrives_once() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    crate::write_certs(&certs, &[NODE]);
    let mut cloud = Cloud::configure(dir.path(), &certs).unwrap();
    let port = fogline_tests::free_tcp_port().unwrap();
    // Small batches, one in flight: the drain takes long enough for live
    // readings to arrive during it.
    let body = format!(
        "[broker]\nembedded = true\nlisten = \"127.0.0.1:{port}\"\n\
         \n[[pipelines]]\nname = \"alerts\"\ntopics = [\"alerts/#\"]\nfunctions = []\npriority = \"high\"\n\
         \n[[pipelines]]\nname = \"telemetry\"\ntopics = [\"sensors/+/reading\"]\nfunctions = []\n\
         {uplink}drain = \"live_first\"\nbatch_records = 20\nmax_in_flight = 1\n",
        uplink = uplink_toml(NODE, &certs, cloud.quic_port)
    );
    let edge = Edge::start(dir.path(), NODE, &body).unwrap();
    let logs = |edge: &Edge, cloud: &Cloud| {
        format!(
            "--- edge ---\n{}\n--- cloud ---\n{}",
            edge.daemon.log_text(),
            cloud.daemon.log_text()
        )
    };
    let listening = process::wait_until(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(
        listening,
        "endpoint never listened:\n{}",
        logs(&edge, &cloud)
    );

    // The aggregator is down: 4 sensors × 1500 readings, then 40 alerts.
    let backlog = readings(0..4, 0..1500);
    let alarms = alerts(40);
    publish(port, QoS::AtLeastOnce, &backlog);
    publish(port, QoS::AtLeastOnce, &alarms);
    let taken = (backlog.len() + alarms.len()) as f64;
    let ok = process::wait_until(Duration::from_secs(60), || {
        edge.metric(fogline_edge::ingest::events::RECEIVED_TOTAL) >= taken
    });
    assert!(
        ok,
        "the edge did not take everything in:\n{}",
        logs(&edge, &cloud)
    );
    std::thread::sleep(Duration::from_millis(500));

    // The uplink comes back; readings keep arriving during the drain.
    cloud.daemon.restart().unwrap();
    let live = readings(8..9, 0..200);
    for chunk in live.chunks(10) {
        publish(port, QoS::AtLeastOnce, chunk);
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut expected = ids_of(&backlog);
    expected.extend(ids_of(&alarms));
    expected.extend(ids_of(&live));
    assert_exact(&cloud.store, &expected, Duration::from_secs(120), || {
        logs(&edge, &cloud)
    });

    let got = arrivals(&cloud.store);
    let backlog_ids = ids_of(&backlog);
    let backlog_arrivals: Vec<(u64, u64)> = backlog_ids.iter().map(|id| got[id]).collect();
    let first_backlog = backlog_arrivals.iter().map(|a| a.0).min().unwrap();
    let last_backlog = backlog_arrivals.iter().map(|a| a.0).max().unwrap();
    let min_backlog_seq = backlog_arrivals.iter().map(|a| a.1).min().unwrap();
    let last_alert = ids_of(&alarms).iter().map(|id| got[id].0).max().unwrap();
    // Alerts were numbered after 6,000 readings, and still arrived first.
    assert!(
        ids_of(&alarms).iter().all(|id| got[id].1 > min_backlog_seq),
        "alerts numbered after the backlog"
    );
    assert!(
        last_alert <= first_backlog,
        "alerts arrived by {last_alert} ms, the backlog from {first_backlog} ms:\n{}",
        logs(&edge, &cloud)
    );
    // Live readings (numbered above the whole backlog) arrived while the
    // backlog was still draining.
    let overtook = ids_of(&live)
        .iter()
        .filter(|id| got[*id].0 < last_backlog)
        .count();
    eprintln!(
        "drain: backlog {first_backlog}..{last_backlog} ms, alerts by {last_alert} ms, {overtook} of {} live readings before the backlog's end",
        live.len()
    );
    assert!(
        overtook > 0,
        "no live reading overtook the backlog ({first_backlog}..{last_backlog} ms):\n{}",
        logs(&edge, &cloud)
    );
    // Nothing left behind, nothing counted as lost.
    let drained = process::wait_until(Duration::from_secs(30), || {
        edge.status()
            .is_some_and(|s| s["outbox"]["backlog_records"].as_u64() == Some(0))
    });
    assert!(
        drained,
        "the outbox did not empty:\n{}",
        logs(&edge, &cloud)
    );
}
