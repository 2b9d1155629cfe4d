//! Healthy sensors' throughput through the native endpoint without and with
//! a flood of hostile sockets (ARCHITECTURE.md I-34), in the same run,
//! against the same edge: 4 raw-socket publishers (QoS 1, window 500), each
//! its own 2 streams, 25,000 readings each; then the same again while 1,000
//! hostile sockets from 40 loopback addresses misbehave (half-open,
//! slowloris, garbage, oversized and half-sent CONNECTs, reconnecting when
//! cut). Prints both throughputs, the ratio (target ≥ 0.80), the hostile
//! connections opened and cut, and the edge's peak RSS. Printed, not
//! asserted.
//!
//! cargo build --workspace --bins && cargo bench -p fogline-tests --profile dev --bench endpoint_flood [-- --readings N --hostile N]
//! (`--profile dev`: against the debug binaries the e2e tests use; without
//! it, build the release binaries first.)
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fogline_tests::deploy::{uplink_toml, Cloud, Edge};
use fogline_tests::flood::Flood;
use fogline_tests::mqtt_raw::{self, cpu, Options, Publisher, QoS};

const NODE: &str = "gw-flood";
const PUBLISHERS: usize = 4;

/// Readings per second, all publishers together, and the edge's peak RSS.
async fn healthy_run(addr: &str, pid: u32, n: usize, round: &str) -> (f64, u64) {
    let mut tasks = Vec::new();
    let started = Instant::now();
    for k in 0..PUBLISHERS {
        let msgs: Vec<(String, Bytes)> = (0..n / PUBLISHERS)
            .map(|i| {
                (
                    format!("bench/{round}/p{k}/s{}", i % 2),
                    mqtt_raw::reference_payload(i, 100),
                )
            })
            .collect();
        let mut p = Publisher::new(
            Options::new(addr, format!("healthy-{round}-{k}")),
            QoS::AtLeastOnce,
        );
        p.window = 500;
        p.deadline = Duration::from_secs(300);
        tasks.push(tokio::spawn(async move { p.run(&msgs).await }));
    }
    let mut peak = 0;
    for t in tasks {
        while !t.is_finished() {
            if let Ok(m) = cpu::memory(pid) {
                peak = peak.max(m.rss_bytes);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        t.await.unwrap().unwrap().ensure_all_safe().unwrap();
    }
    let rate = (n / PUBLISHERS * PUBLISHERS) as f64 / started.elapsed().as_secs_f64();
    (rate, peak)
}

fn main() {
    let n = fogline_tests::bench_arg("--readings", 100_000);
    let hostile = fogline_tests::bench_arg("--hostile", 1_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    fogline_testkit::certs::dev_bundle(&certs, &[NODE]).unwrap();
    let cloud = Cloud::start(dir.path(), &certs).unwrap();
    let port = fogline_tests::free_tcp_port().unwrap();
    let edge = Edge::start(
        dir.path(),
        NODE,
        &format!(
            "[broker]\nembedded = true\nlisten = \"127.0.0.1:{port}\"\nconnect_timeout = \"2s\"\nmax_connections = {}\n\
             [[pipelines]]\nname = \"all\"\ntopics = [\"bench/#\"]\nfunctions = []\n{}",
            hostile + 100,
            uplink_toml(NODE, &certs, cloud.quic_port)
        ),
    )
    .unwrap();
    edge.wait_for(Duration::from_secs(60), "uplink connected", |s| {
        s["uplink_connected"].as_bool() == Some(true)
    })
    .unwrap();
    let pid = edge.daemon.pid().unwrap();
    let addr = format!("127.0.0.1:{port}");
    rt.block_on(async {
        let (calm, calm_rss) = healthy_run(&addr, pid, n, "calm").await;
        let flood = Flood::start(port, hostile, 25);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (stormy, stormy_rss) = healthy_run(&addr, pid, n, "flood").await;
        let opened = flood.opened.load(Ordering::Relaxed);
        let closed = flood.closed.load(Ordering::Relaxed);
        drop(flood);
        println!(
            "endpoint flood bench: {n} readings of 100 B at QoS 1, {PUBLISHERS} healthy publishers (window 500)"
        );
        println!(
            "  without flood  {calm:>9.0} msg/s   edge peak RSS {:>6.1} MiB",
            calm_rss as f64 / (1 << 20) as f64
        );
        println!(
            "  with flood     {stormy:>9.0} msg/s   edge peak RSS {:>6.1} MiB   ({hostile} hostile sockets: {opened} connections opened, {closed} cut)",
            stormy_rss as f64 / (1 << 20) as f64
        );
        println!(
            "  ratio          {:.2} (target ≥ 0.80)",
            stormy / calm
        );
    });
}
