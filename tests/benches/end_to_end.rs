//! End-to-end figures for fixed scenarios, printed (not asserted):
//! 1. drain a 1,000,000-record backlog from the outbox into the aggregator's
//!    store over QUIC on loopback: records/s and bytes on the wire per record
//!    (UDP payload bytes both ways, counted by a relay in the path). The
//!    reference, measured in the same run: the same rows inserted into the
//!    same kind of SQLite database (same table, WAL, synchronous=FULL) by a
//!    bare rusqlite prepared statement in transactions of 4096 rows; the
//!    ratio drain / reference is the figure (target ≥ 0.6);
//! 2. RSS of the idle edge daemon with three functions loaded.
//!
//! cargo bench -p fogline-tests --bench end_to_end [-- --records N]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use fogline_edge::config::{EdgeConfig, SyncMode};
use fogline_edge::outbox::{Commit, Outbox, OutboxReader};
use fogline_edge::uplink::{Uplink, UplinkState};
use fogline_testkit::relay::UdpRelay;
use fogline_tests::sensors;

fn arg(name: &str, default: usize) -> usize {
    fogline_tests::bench_arg(name, default)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let records = arg("--records", 1_000_000);
    rt.block_on(drain(records));
    idle_rss();
}

async fn drain(total: usize) {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    fogline_testkit::certs::dev_bundle(&certs, &["gw-bench"]).unwrap();

    // Fill the outbox: ~100-byte JSON readings from 10 sensors.
    let outbox_path = dir.path().join("edge/outbox.db");
    let mut outbox = Outbox::open(&outbox_path, SyncMode::Normal).unwrap();
    let started = Instant::now();
    let mut n = 0;
    while n < total {
        let chunk = (total - n).min(20_000);
        let records = (n..n + chunk)
            .map(|i| {
                let s = i % 10;
                let ts = 1_764_000_000_000 + i as u64 * 10;
                fogline_edge::message::Message {
                    stream: sensors::topic(s),
                    timestamp_ms: ts,
                    payload: sensors::payload(s, i / 10, ts).into_bytes(),
                }
            })
            .collect();
        outbox
            .commit(&Commit {
                records,
                ..Commit::default()
            })
            .unwrap();
        n += chunk;
    }
    let avg_payload = sensors::payload(3, 12345, 1_764_000_000_000).len();
    println!(
        "backlog: {total} records of ~{avg_payload} bytes written in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let cloud = fogline_tests::deploy::in_process_aggregator(&certs, &dir.path().join("cloud.db"))
        .await
        .unwrap();
    let relay = UdpRelay::start(cloud.quic_addr).await.unwrap();
    let edge_toml = format!(
        "[node]\nid = \"gw-bench\"\ndata_dir = \"{d}/edge\"\n[[pipelines]]\nname = \"p\"\ntopics = [\"#\"]\n[uplink]\nserver = \"{r}\"\nserver_name = \"localhost\"\nca = \"{c}/ca.pem\"\ncert = \"{c}/node-gw-bench.pem\"\nkey = \"{c}/node-gw-bench.key\"\nkeepalive = \"1s\"\n",
        d = dir.path().display(),
        r = relay.local_addr(),
        c = certs.display()
    );
    let config = EdgeConfig::parse(&edge_toml, dir.path()).unwrap();
    let state = Arc::new(UplinkState::default());
    let reader = OutboxReader::open(&outbox_path, SyncMode::Normal).unwrap();
    let uplink = Uplink::new(
        &config,
        config.uplink.as_ref().unwrap(),
        reader,
        state.clone(),
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(std::sync::atomic::AtomicU64::new(0)),
    );
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let task = tokio::spawn(uplink.run(stop_rx));
    let last = total as u64;
    while state.acked_seq.load(std::sync::atomic::Ordering::Acquire) < last {
        if started.elapsed() > Duration::from_secs(600) {
            panic!("drain did not finish in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let wire = relay.bytes_forwarded();
    let drain_rate = total as f64 / secs;
    println!(
        "drain: {total} records in {secs:.2}s = {drain_rate:.0} records/s; {:.1} bytes on the wire per record ({} bytes UDP payload both ways; target ≤ 8)",
        wire as f64 / total as f64,
        wire
    );
    // Idle keep-alive traffic: pings every second for 10 s, nothing else.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = (relay.bytes_forwarded(), state.status());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = relay.bytes_forwarded() - before.0;
    let per_ping = idle as f64 / 10.0;
    // + 28 bytes of IPv4/UDP header per datagram, about 3 datagrams a round.
    let month_mb = |every: f64| (per_ping + 3.0 * 28.0) * (30.0 * 86_400.0 / every) / 1e6;
    println!(
        "idle keep-alive: {per_ping:.0} bytes of UDP payload per ping round trip (both ways, ACKs included); with IP/UDP headers, per idle gateway and month: {:.1} MB at keepalive = 20s, {:.1} MB at 60s (default), {:.1} MB at 300s",
        month_mb(20.0),
        month_mb(60.0),
        month_mb(300.0)
    );
    let _ = stop.send(true);
    let _ = task.await;
    cloud.shutdown().await;
    let store = dir.path().join("cloud.db");
    let bare_rate = tokio::task::spawn_blocking(move || bare_insert(&store))
        .await
        .unwrap();
    println!(
        "reference: bare rusqlite prepared insert of the same {total} rows, 4096 per transaction: {bare_rate:.0} records/s"
    );
    println!(
        "drain / reference = {:.2} (target ≥ 0.6)",
        drain_rate / bare_rate
    );
}

/// Reads every row the drain stored, then times inserting them into a fresh
/// database of the same kind with a prepared statement, 4096 rows per
/// transaction. Returns rows per second.
fn bare_insert(store: &std::path::Path) -> f64 {
    type Row = (String, i64, String, i64, Vec<u8>, i64);
    let src = rusqlite::Connection::open(store).unwrap();
    let rows: Vec<Row> = src
        .prepare("SELECT node, seq, stream, timestamp_ms, payload, received_ms FROM records ORDER BY node, seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut db = rusqlite::Connection::open(dir.path().join("bare.db")).unwrap();
    db.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
         CREATE TABLE records (node TEXT NOT NULL, seq INTEGER NOT NULL, stream TEXT NOT NULL,
           timestamp_ms INTEGER NOT NULL, payload BLOB NOT NULL, received_ms INTEGER NOT NULL,
           PRIMARY KEY (node, seq)) WITHOUT ROWID;",
    )
    .unwrap();
    let started = Instant::now();
    for chunk in rows.chunks(4096) {
        let tx = db.transaction().unwrap();
        {
            let mut ins = tx
                .prepare_cached("INSERT INTO records VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
                .unwrap();
            for r in chunk {
                ins.execute(rusqlite::params![r.0, r.1, r.2, r.3, r.4, r.5])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    rows.len() as f64 / started.elapsed().as_secs_f64()
}

fn idle_rss() {
    let Ok(bin) = fogline_tests::process::binary("fogline-edge") else {
        println!("idle RSS: skipped, fogline-edge not built (cargo build --bins)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("edge.toml");
    let port = fogline_tests::free_tcp_port().unwrap();
    std::fs::write(
        &cfg,
        format!(
            r#"
[node]
data_dir = "{d}/data"
[broker]
embedded = true
listen = "127.0.0.1:{port}"
[functions.hot]
module = "{t}"
config = {{ field = "temp", above = 30.0 }}
[functions.cold]
module = "{t}"
config = {{ field = "temp", below = 0.0 }}
[functions.avg]
module = "{w}"
config = {{ field = "temp", window_ms = 10000 }}
[[pipelines]]
name = "hot"
topics = ["sensors/+/reading"]
functions = ["hot", "avg"]
[[pipelines]]
name = "cold"
topics = ["sensors/+/reading"]
functions = ["cold"]
[metrics]
enabled = false
"#,
            d = dir.path().display(),
            t = fogline_modules::threshold().display(),
            w = fogline_modules::window_avg().display(),
        ),
    )
    .unwrap();
    for round in ["first start (compiles modules)", "restart (cached modules)"] {
        let started = Instant::now();
        let mut child = std::process::Command::new(&bin)
            .args(["run", "--config", cfg.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(3));
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        let rss = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap_or("VmRSS: ? kB")
            .to_string();
        println!(
            "idle edge daemon, 3 functions, MQTT endpoint, {round}: {} (sampled {:.1}s after start)",
            rss.trim_start_matches("VmRSS:").trim(),
            started.elapsed().as_secs_f64()
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}
