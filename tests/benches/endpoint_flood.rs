//! Healthy sensors' throughput through the native endpoint without and with
//! a flood of hostile sockets (ARCHITECTURE.md I-34), in the same run,
//! against the same edge: 4 raw-socket publishers (QoS 1, window 500), each
//! its own 2 streams, 75,000 readings each; then the same again while 1,000
//! hostile sockets from 40 loopback addresses misbehave (half-open,
//! slowloris, garbage, oversized and half-sent CONNECTs, reconnecting when
//! cut). Prints both throughputs, the ratio (target ≥ 0.80), the edge's CPU
//! time per 1,000 healthy readings in both runs (what the flood costs the
//! edge, whatever the machine's speed), the hostile connections opened and
//! cut, and the edge's peak RSS. Printed, not asserted.
//!
//! The attacker runs on its own single-threaded runtime and OS thread, as a
//! separate host would: its tasks do not queue in front of the healthy
//! publishers' in one scheduler. It still shares the machine's 2 cores with
//! the edge and the publishers, which a real attacker would not.
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

/// One healthy run's figures.
struct Run {
    /// Readings per second, all publishers together.
    rate: f64,
    /// The edge's peak RSS.
    peak_rss: u64,
    /// The edge's CPU time per 1,000 readings.
    cpu_per_1k: Duration,
}

async fn healthy_run(addr: &str, pid: u32, n: usize, round: &str) -> Run {
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
    let cpu_before = cpu::cpu_time(pid).unwrap();
    for t in tasks {
        while !t.is_finished() {
            if let Ok(m) = cpu::memory(pid) {
                peak = peak.max(m.rss_bytes);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        t.await.unwrap().unwrap().ensure_all_safe().unwrap();
    }
    let sent = n / PUBLISHERS * PUBLISHERS;
    let rate = sent as f64 / started.elapsed().as_secs_f64();
    let cpu = cpu::cpu_time(pid).unwrap().saturating_sub(cpu_before);
    Run {
        rate,
        peak_rss: peak,
        cpu_per_1k: cpu.mul_f64(1000.0 / sent as f64),
    }
}

/// The flood, on its own thread and runtime until `stop` is sent; returns
/// the connections opened and cut.
fn attacker(
    port: u16,
    sockets: usize,
    stop: std::sync::mpsc::Receiver<()>,
) -> std::thread::JoinHandle<(usize, usize)> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let flood = Flood::start(port, sockets, 25);
            let _ = tokio::task::spawn_blocking(move || stop.recv()).await;
            (
                flood.opened.load(Ordering::Relaxed),
                flood.closed.load(Ordering::Relaxed),
            )
        })
    })
}

fn main() {
    let n = fogline_tests::bench_arg("--readings", 300_000);
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
    // Calm and flooded runs alternate, ROUNDS of each; the median of the
    // per-round ratios is the figure (one run lasts about a second, and a
    // shared 2-core machine varies more than that from second to second).
    let rounds = fogline_tests::bench_arg("--rounds", 5);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "endpoint flood bench: {n} readings of 100 B at QoS 1 per run, {PUBLISHERS} healthy publishers (window 500), {rounds} rounds"
    );
    let (mut ratios, mut cpu_ratios, mut peak) = (Vec::new(), Vec::new(), 0u64);
    for round in 0..rounds {
        let calm = rt.block_on(healthy_run(&addr, pid, n, &format!("calm{round}")));
        let (stop, stopped) = std::sync::mpsc::channel();
        let flood = attacker(port, hostile, stopped);
        std::thread::sleep(Duration::from_secs(2));
        let stormy = rt.block_on(healthy_run(&addr, pid, n, &format!("flood{round}")));
        let _ = stop.send(());
        let (opened, closed) = flood.join().unwrap();
        let ratio = stormy.rate / calm.rate;
        let cpu_ratio = stormy.cpu_per_1k.as_secs_f64() / calm.cpu_per_1k.as_secs_f64();
        peak = peak.max(stormy.peak_rss).max(calm.peak_rss);
        println!(
            "  round {round}: without flood {:>7.0} msg/s ({:.1} ms edge CPU per 1k), with flood {:>7.0} msg/s ({:.1} ms per 1k; {opened} hostile connections opened, {closed} cut), ratio {ratio:.2}, edge CPU per reading {cpu_ratio:.2}×",
            calm.rate,
            calm.cpu_per_1k.as_secs_f64() * 1e3,
            stormy.rate,
            stormy.cpu_per_1k.as_secs_f64() * 1e3,
        );
        ratios.push(ratio);
        cpu_ratios.push(cpu_ratio);
        // Let the refused sockets' state drain before the next calm run.
        std::thread::sleep(Duration::from_secs(1));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "  median ratio   {:.2} throughput with/without {hostile} hostile sockets (target ≥ 0.80); edge CPU per healthy reading {:.2}×; edge peak RSS {:.1} MiB",
        median(&mut ratios),
        median(&mut cpu_ratios),
        mib(peak)
    );
}
