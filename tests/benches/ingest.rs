//! Ingest end to end with the real binaries, printed (not asserted).
//! 200,000 readings of ~100 bytes, QoS 1, one raw-socket publisher with a
//! window of 1,000, three ways, in the same run:
//!
//! - reference: publisher → a bare mosquitto → one counting QoS 1 subscriber;
//! - native:    publisher → fogline-edge's MQTT endpoint → empty chain →
//!   outbox (fsync) → QUIC → fogline-cloud store;
//! - filtered:  the same with the `threshold` WASM function in the chain
//!   (`temp > 30`: about a third of the readings pass);
//! - external:  publisher → mosquitto → fogline-edge (subscribed) → … → store.
//!
//! Throughput is readings / (first PUBLISH → last reading counted, or in the
//! store); CPU is the process's user+system time over the run per reading;
//! RSS is the edge's peak. Ratios are against the reference of this run.
//!
//! cargo build --release --bins && cargo bench -p fogline-tests --bench ingest [-- --readings N]
//! Add `--perf DIR` to record the edge with `perf record` (call graphs in
//! DIR/edge-native.data and DIR/edge-external.data).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use fogline_edge::pipeline::events as pipeline;
use fogline_tests::deploy::{uplink_toml, Cloud, CursorWatch, Edge};
use fogline_tests::mosquitto::Mosquitto;
use fogline_tests::mqtt_raw::{self, cpu, Options, Publisher, QoS, Version};

const NODE: &str = "gw-bench";
const WINDOW: usize = 1000;
const PAYLOAD: usize = 100;

fn arg(name: &str, default: usize) -> usize {
    fogline_tests::bench_arg(name, default)
}

struct Figures {
    commits: f64,
    msgs_per_sec: f64,
    edge_cpu_us: f64,
    cloud_cpu_us: f64,
    broker_cpu_us: Option<f64>,
    edge_peak_rss: u64,
    elapsed: Duration,
}

fn messages(n: usize) -> Vec<(String, Bytes)> {
    (0..n)
        .map(|i| {
            (
                format!("bench/s{}", i % 16),
                mqtt_raw::reference_payload(i, PAYLOAD),
            )
        })
        .collect()
}

/// How many of `messages(n)` a threshold at 30 passes.
fn passing(n: usize) -> usize {
    (0..n).filter(|i| i * 7919 % 3000 > 2000).count()
}

/// Publishes `n` readings to `addr` and waits until the store holds what
/// the chain passes (all of them, or with `filter` what `threshold` passes).
async fn run_fogline(n: usize, external: bool, filter: bool) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    fogline_testkit::certs::dev_bundle(&certs, &[NODE])?;
    let cloud = Cloud::start(dir.path(), &certs)?;
    let broker = if external {
        Some(Mosquitto::start()?)
    } else {
        None
    };
    let mqtt_port = fogline_tests::free_tcp_port()?;
    let ingest = match &broker {
        Some(b) => format!("[mqtt]\nbroker = \"{}\"\n", b.addr()),
        None => format!("[broker]\nembedded = true\nlisten = \"127.0.0.1:{mqtt_port}\"\n"),
    };
    let chain = if filter {
        format!(
            "[functions.hot]\nmodule = \"{}\"\nconfig = {{ field = \"temp\", above = 30.0 }}\n\
             [[pipelines]]\nname = \"all\"\ntopics = [\"bench/#\"]\nfunctions = [\"hot\"]\n",
            fogline_modules::threshold().display()
        )
    } else {
        "[[pipelines]]\nname = \"all\"\ntopics = [\"bench/#\"]\nfunctions = []\n".to_string()
    };
    let expected = if filter { passing(n) } else { n };
    let edge = Edge::start(
        dir.path(),
        NODE,
        &format!(
            "{ingest}{chain}{}{}",
            uplink_toml(NODE, &certs, cloud.quic_port),
            std::env::var("FOGLINE_BENCH_EXTRA")
                .unwrap_or_default()
                .replace("\\n", "\n")
        ),
    )?;
    edge.wait_for(Duration::from_secs(60), "uplink connected", |s| {
        s["uplink_connected"].as_bool() == Some(true)
            && (!external || s["broker_connected"].as_bool() == Some(true))
    })?;
    let target = match &broker {
        Some(b) => b.addr(),
        None => format!("127.0.0.1:{mqtt_port}"),
    };
    let msgs = messages(n);
    let mut publisher = Publisher::new(
        Options::new(&target, "bench-publisher").with_version(Version::V5),
        QoS::AtLeastOnce,
    );
    publisher.window = WINDOW;
    publisher.deadline = Duration::from_secs(600);
    let edge_pid = edge.daemon.pid().context("edge not running")?;
    let broker_pid = broker.as_ref().and_then(Mosquitto::pid);
    let cloud_pid = cloud.daemon.pid().context("cloud not running")?;
    let watch = loop {
        // The store file appears with the aggregator's first start.
        if let Ok(w) = CursorWatch::open(&cloud.store, NODE) {
            break w;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let perf = std::env::args()
        .skip_while(|a| a != "--perf")
        .nth(1)
        .map(|d| {
            let out = format!(
                "{d}/edge-{}.data",
                if external { "external" } else { "native" }
            );
            std::process::Command::new("perf")
                .args([
                    "record",
                    "-F",
                    "1999",
                    "-g",
                    "-o",
                    &out,
                    "-p",
                    &edge_pid.to_string(),
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
        })
        .transpose()?;
    if perf.is_some() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let edge_before = cpu::sample(edge_pid)?;
    let cloud_before = cpu::sample(cloud_pid)?;
    let broker_before = broker_pid.map(cpu::sample).transpose()?;
    let started = Instant::now();
    let task = tokio::spawn(async move { publisher.run(&msgs).await });
    loop {
        if watch.get() >= expected as u64 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the store holds {} of {expected} records after 10 minutes",
            watch.get()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let done = Instant::now();
    let edge_after = cpu::sample(edge_pid)?;
    let cloud_after = cpu::sample(cloud_pid)?;
    let broker_after = broker_pid.map(cpu::sample).transpose()?;
    if let Some(mut p) = perf {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &p.id().to_string()])
            .status();
        let _ = p.wait();
    }
    let report = task.await??;
    report.ensure_all_safe()?;
    let first = report.first_send_at().context("no first send")?;
    let elapsed = done.saturating_duration_since(first);
    let stored = fogline_tests::oracle::count(&cloud.store);
    anyhow::ensure!(
        stored == expected as u64,
        "the store holds {stored} records, {expected} expected for {n} readings published"
    );
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let commits = edge.metric(&format!("{}_count", pipeline::COMMIT_SECONDS));
    Ok(Figures {
        commits,
        msgs_per_sec: n as f64 / elapsed.as_secs_f64(),
        edge_cpu_us: per(edge_after.cpu_since(&edge_before)),
        cloud_cpu_us: per(cloud_after.cpu_since(&cloud_before)),
        broker_cpu_us: broker_after
            .zip(broker_before)
            .map(|(a, b)| per(a.cpu_since(&b))),
        edge_peak_rss: edge_after.peak_rss_bytes,
        elapsed,
    })
}

/// The native path with the aggregator down: every reading stays in the
/// outbox. Returns (acknowledged readings/s, edge peak RSS, backlog).
async fn backlog_rss(n: usize) -> anyhow::Result<(f64, u64, u64)> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    fogline_testkit::certs::dev_bundle(&certs, &[NODE])?;
    let quic_port = fogline_tests::free_udp_tcp_port()?;
    let mqtt_port = fogline_tests::free_tcp_port()?;
    let edge = Edge::start(
        dir.path(),
        NODE,
        &format!(
            "[broker]\nembedded = true\nlisten = \"127.0.0.1:{mqtt_port}\"\n\
             [[pipelines]]\nname = \"all\"\ntopics = [\"bench/#\"]\nfunctions = []\n{}",
            uplink_toml(NODE, &certs, quic_port)
        ),
    )?;
    let mut ready = false;
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", mqtt_port)).is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::ensure!(ready, "the endpoint did not listen");
    let mut publisher = Publisher::new(
        Options::new(format!("127.0.0.1:{mqtt_port}"), "backlog-publisher")
            .with_version(Version::V5),
        QoS::AtLeastOnce,
    );
    publisher.window = WINDOW;
    publisher.deadline = Duration::from_secs(600);
    let report = publisher.run(&messages(n)).await?;
    report.ensure_all_safe()?;
    let pid = edge.daemon.pid().context("edge not running")?;
    let peak = cpu::sample(pid)?.peak_rss_bytes;
    let backlog = edge
        .status()
        .and_then(|s| s["outbox"]["backlog_records"].as_u64())
        .unwrap_or(0);
    Ok((report.msgs_per_sec(), peak, backlog))
}

fn main() {
    let n = arg("--readings", 200_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let reference = mqtt_raw::mosquitto_reference(n, PAYLOAD, WINDOW)
            .await
            .expect("reference run");
        let native = run_fogline(n, false, false).await.expect("native endpoint run");
        let filtered = run_fogline(n, false, true).await.expect("native endpoint run with threshold");
        let external = run_fogline(n, true, false).await.expect("external broker run");
        let (acked, backlog_peak, backlog) = backlog_rss(n).await.expect("backlog run");
        let r = reference.msgs_per_sec;
        let m = reference.mosquitto_cpu_us_per_msg;
        println!("ingest bench: {n} readings of {PAYLOAD} B at QoS 1, one publisher, window {WINDOW}");
        println!(
            "  reference  publisher → mosquitto → counting subscriber   {:>9.0} msg/s  ({:.2} s)   mosquitto {:.2} µs/msg",
            r,
            reference.elapsed.as_secs_f64(),
            m
        );
        println!(
            "  native     publisher → edge endpoint → outbox → QUIC → store {:>9.0} msg/s  ({:.2} s)   ratio {:.2}× (target ≥ 2.5)",
            native.msgs_per_sec,
            native.elapsed.as_secs_f64(),
            native.msgs_per_sec / r
        );
        println!(
            "             edge CPU {:.2} µs/reading = {:.2}× mosquitto's (target ≤ 0.4); aggregator {:.2} µs/reading; edge peak RSS {:.1} MB (target ≤ 48); {:.0} commits, {:.0} readings/commit",
            native.edge_cpu_us,
            native.edge_cpu_us / m,
            native.cloud_cpu_us,
            native.edge_peak_rss as f64 / 1e6,
            native.commits,
            n as f64 / native.commits.max(1.0)
        );
        println!(
            "  filtered   publisher → edge endpoint → threshold (WASM) → outbox → QUIC → store {:>9.0} msg/s  ({:.2} s)   ratio {:.2}× (target ≥ 3)",
            filtered.msgs_per_sec,
            filtered.elapsed.as_secs_f64(),
            filtered.msgs_per_sec / r
        );
        println!(
            "             edge CPU {:.2} µs/reading = {:.2}× mosquitto's; edge peak RSS {:.1} MB; {:.0} commits",
            filtered.edge_cpu_us,
            filtered.edge_cpu_us / m,
            filtered.edge_peak_rss as f64 / 1e6,
            filtered.commits
        );
        println!(
            "  external   publisher → mosquitto → edge → outbox → QUIC → store {:>9.0} msg/s  ({:.2} s)   ratio {:.2}× (target ≥ 0.9)",
            external.msgs_per_sec,
            external.elapsed.as_secs_f64(),
            external.msgs_per_sec / r
        );
        println!(
            "             edge CPU {:.2} µs/reading = {:.2}× mosquitto's reference; aggregator {:.2} µs/reading; mosquitto {:.2} µs/reading; edge peak RSS {:.1} MB; {:.0} commits, {:.0} readings/commit",
            external.edge_cpu_us,
            external.edge_cpu_us / m,
            external.cloud_cpu_us,
            external.broker_cpu_us.unwrap_or(0.0),
            external.edge_peak_rss as f64 / 1e6,
            external.commits,
            n as f64 / external.commits.max(1.0)
        );
        println!(
            "  backlog    native endpoint, aggregator down: {acked:.0} readings/s acknowledged, {backlog} buffered; edge peak RSS {:.1} MB (target ≤ 48 whatever the backlog)",
            backlog_peak as f64 / 1e6
        );
    });
}
