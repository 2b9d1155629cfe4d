//! The fleet load generator, bounded for CI: 200 simulated gateways (each its
//! own certificate, outbox and QUIC connection) send one reading per second
//! to one aggregator on SQLite for ~8 s. The test owns the truth: every
//! reading a gateway made is acknowledged, and stored exactly once (its
//! payload names the node and the reading number), none is lost,
//! duplicated or unexpected, and no gateway falls more than 3 readings
//! behind its schedule (none starved). `benches/fleet.rs` is the full-size
//! version.

use std::collections::HashMap;
use std::time::Duration;

use fogline_aggregator::{self as aggregator, config::CloudConfig};
use fogline_testkit::fleet::{self, Fleet, FleetConfig};

const GATEWAYS: usize = 200;
const RUN: Duration = Duration::from_secs(8);
const STARVED: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_of_200_gateways_is_stored_once_and_none_starves() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    fleet::issue_certs(&certs, GATEWAYS, 2).unwrap();
    let db = dir.path().join("cloud.db");
    let toml = format!(
        "[quic]\nlisten = \"127.0.0.1:0\"\n[tcp]\nenabled = false\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/server.pem\"\nkey = \"{c}/server.key\"\n[store]\npath = \"{d}\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
        c = certs.display(),
        d = db.display()
    );
    let agg = aggregator::start(CloudConfig::parse(&toml).unwrap())
        .await
        .unwrap();
    let fleet = Fleet::start(FleetConfig {
        nodes: GATEWAYS,
        addr: agg.quic_addr,
        certs,
        ramp_per_s: 400,
        interval: Duration::from_secs(1),
        sockets: 50,
    })
    .unwrap();

    // Sampled every half second once the ramp is over (0.5 s at 400/s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut worst = 0;
    let until = tokio::time::Instant::now() + RUN;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let p = fleet.progress(STARVED);
        assert_eq!(p.started, GATEWAYS);
        worst = worst.max(p.max_behind);
        assert_eq!(
            p.starved,
            0,
            "gateways starved (more than {STARVED} readings behind): {p:?}; last error: {:?}",
            fleet.last_error()
        );
    }
    let latencies = fleet.take_latencies();
    let last_error = fleet.last_error();
    let reports = fleet.stop(Duration::from_secs(10)).await;
    agg.shutdown().await;

    assert_eq!(reports.len(), GATEWAYS);
    let made: HashMap<String, u64> = reports.iter().map(|r| (r.node.clone(), r.made)).collect();
    let unacked: Vec<_> = reports
        .iter()
        .filter(|r| r.acked != r.made || r.unacked != 0)
        .collect();
    assert!(
        unacked.is_empty(),
        "readings made and not acknowledged: {unacked:?}; last error: {last_error:?}"
    );
    assert!(
        reports.iter().all(|r| r.made >= RUN.as_secs()),
        "a gateway made fewer than {} readings: {:?}",
        RUN.as_secs(),
        reports.iter().map(|r| r.made).min()
    );

    // The oracle: each payload says which node made it and its number.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut seen: HashMap<(String, u64), u32> = HashMap::new();
    let mut st = conn
        .prepare("SELECT node, seq, stream, payload FROM records")
        .unwrap();
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })
        .unwrap();
    let mut unexpected = Vec::new();
    for row in rows {
        let (node, seq, stream, payload) = row.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        let (pn, n) = (
            v["node"].as_str().unwrap_or(""),
            v["n"].as_u64().unwrap_or(0),
        );
        let ok = pn == node
            && n == seq as u64
            && stream == format!("fleet/{node}/env")
            && made.get(&node).is_some_and(|&m| (1..=m).contains(&n));
        if !ok {
            unexpected.push((node.clone(), seq));
        }
        *seen.entry((pn.to_string(), n)).or_default() += 1;
    }
    let duplicated = seen.values().filter(|&&c| c > 1).count();
    let lost: u64 = made
        .iter()
        .map(|(node, &m)| {
            (1..=m)
                .filter(|n| !seen.contains_key(&(node.clone(), *n)))
                .count() as u64
        })
        .sum();
    let total: u64 = made.values().sum();
    println!(
        "{GATEWAYS} gateways: {total} readings; lost {lost}, duplicated {duplicated}, unexpected {}; worst {worst} behind; p50 {:?} p99 {:?}",
        unexpected.len(),
        latencies.quantile(0.5),
        latencies.quantile(0.99)
    );
    assert_eq!(
        (lost, duplicated, unexpected.len()),
        (0, 0, 0),
        "{unexpected:?}"
    );
}
