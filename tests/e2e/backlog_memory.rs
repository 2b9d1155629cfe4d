//! I-12 (memory is bounded in bytes) against I-32's backlog: the edge's RSS
//! stays ≤ 64 MiB whatever the backlog. Ten million records are written
//! into the outbox through the edge's own commit code, the edge starts on
//! them with its aggregator unreachable, takes live readings, answers
//! `/metrics`, `/status` and `fogline-edge status`, then drains into the
//! aggregator for a bounded time; its peak RSS (`VmHWM`) is checked
//! throughout, and what was drained is checked row by row (each backlog
//! record once, in order, nothing else).
//!
//! `FOGLINE_BACKLOG_RECORDS` changes the record count (default 10,000,000,
//! the figure); `FOGLINE_BACKLOG_DRAIN_SECS` the drain's budget
//! (default 60 s; the live readings are checked in the store only if the whole
//! backlog drains within it).

use std::time::{Duration, Instant};

use fogline_edge::telemetry::BACKLOG_RECORDS;
use fogline_tests::deploy::{uplink_toml, Cloud, CursorWatch, Edge};
use fogline_tests::mqtt_raw::{cpu, QoS};
use fogline_tests::{backlog, oracle, process};

use crate::external::{ids_of, publish, readings};

const NODE: &str = "gw-backlog";
/// The bound on the edge's resident memory.
const MAX_RSS: u64 = 64 << 20;

fn env_or(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a whole number: {e}")),
        Err(_) => default,
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// `RssAnon`, `RssFile` and `RssShmem` of the edge now, in MiB: what its
/// resident memory is made of (heap; mapped files; the WAL index), and its
/// threads.
fn breakdown(edge: &Edge) -> String {
    let pid = edge.daemon.pid().expect("the edge runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    format!(
        "RssAnon {:.1} MiB, RssFile {:.1} MiB, RssShmem {:.1} MiB, {} threads",
        field("RssAnon:") / 1024.0,
        field("RssFile:") / 1024.0,
        field("RssShmem:") / 1024.0,
        field("Threads:")
    )
}

/// The edge's peak RSS so far (`VmHWM`), and its RSS now.
fn memory(edge: &Edge) -> cpu::Memory {
    let pid = edge.daemon.pid().expect("the edge runs");
    cpu::memory(pid).expect("the edge's /proc status")
}

/// I-12 with I-32's backlog: ≤ 64 MiB RSS with 10 M records buffered,
/// while idle, taking readings, reporting and draining.
#[test]
fn memory_stays_bounded_with_a_ten_million_record_backlog() {
    let records = env_or("FOGLINE_BACKLOG_RECORDS", 10_000_000);
    let drain_budget = Duration::from_secs(env_or("FOGLINE_BACKLOG_DRAIN_SECS", 60));
    let test_started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    crate::write_certs(&certs, &[NODE]);
    // Configured, not started: the uplink is unreachable at first.
    let mut cloud = Cloud::configure(dir.path(), &certs).unwrap();

    // The backlog, in the lane of the pipeline the edge will run.
    let data_dir = dir.path().join(format!("edge-{NODE}"));
    let filled = backlog::fill(&data_dir.join("outbox.db"), "telemetry", records).unwrap();
    println!(
        "backlog: {records} records written through Outbox::commit in {:.1}s ({:.0} records/s), outbox file {:.0} MiB",
        filled.took.as_secs_f64(),
        records as f64 / filled.took.as_secs_f64(),
        mib(filled.file_bytes)
    );

    let port = fogline_tests::free_tcp_port().unwrap();
    // The default quota (1 GiB) holds 10 M records of this size; a longer
    // local run gets room for its file, or the live readings would be
    // refused (`block`, I-32) — right, but not what this test is about.
    let quota = if filled.file_bytes + (128 << 20) > 1 << 30 {
        let mib = (filled.file_bytes >> 20) + 256;
        println!("outbox.max_bytes raised to {mib} MiB for this backlog");
        format!("[outbox]\nmax_bytes = \"{mib} MiB\"\n")
    } else {
        String::new()
    };
    let body = format!(
        "[broker]\nembedded = true\nlisten = \"127.0.0.1:{port}\"\n\
         [[pipelines]]\nname = \"telemetry\"\ntopics = [\"sensors/+/reading\", \"backlog/#\"]\nfunctions = []\n\
         {quota}{uplink}",
        uplink = uplink_toml(NODE, &certs, cloud.quic_port)
    );
    let mut edge = Edge::start(dir.path(), NODE, &body).unwrap();
    let logs = |edge: &Edge, cloud: &Cloud| {
        format!(
            "--- edge ---\n{}\n--- cloud ---\n{}",
            crate::tail(&edge.daemon.log_text(), 60),
            crate::tail(&cloud.daemon.log_text(), 30)
        )
    };
    let started = Instant::now();
    let listening = process::wait_until(Duration::from_secs(60), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(
        listening,
        "endpoint never listened:\n{}",
        logs(&edge, &cloud)
    );
    let start_mem = memory(&edge);
    println!(
        "edge started on the backlog in {:.1}s: RSS {:.1} MiB, peak {:.1} MiB",
        started.elapsed().as_secs_f64(),
        mib(start_mem.rss_bytes),
        mib(start_mem.peak_rss_bytes)
    );

    // Live readings while the aggregator is unreachable: acknowledged, so
    // committed behind the backlog.
    let live = readings(0..4, 0..250);
    let report = publish(port, QoS::AtLeastOnce, &live);
    println!(
        "live: {} readings acknowledged in {:.1}s",
        live.len(),
        report.started.elapsed().as_secs_f64()
    );
    let total = records + live.len() as u64;

    // Reports read the per-lane counts, never the backlog.
    for _ in 0..3 {
        let metric = edge.metric(BACKLOG_RECORDS);
        assert_eq!(
            metric as u64,
            total,
            "/metrics counts the backlog:\n{}",
            logs(&edge, &cloud)
        );
        let status = edge.status().expect("/status answers");
        assert_eq!(
            status["outbox"]["backlog_records"].as_u64(),
            Some(total),
            "/status counts the backlog: {}",
            status["outbox"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = process::run(
        "fogline-edge",
        &["status", "--config", &edge.config.to_string_lossy()],
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // 0 healthy, 1 unhealthy (the uplink is down), never 3 (not running).
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "fogline-edge status: {:?}\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&total.to_string()),
        "fogline-edge status shows the backlog of {total}:\n{text}"
    );
    let before_drain = memory(&edge);
    println!(
        "before the drain (live readings taken, /metrics, /status and `fogline-edge status` answered): RSS {:.1} MiB, peak {:.1} MiB",
        mib(before_drain.rss_bytes),
        mib(before_drain.peak_rss_bytes)
    );
    println!("  {}", breakdown(&edge));
    assert!(
        before_drain.peak_rss_bytes <= MAX_RSS,
        "I-12: the edge's peak RSS with a {records}-record backlog is {:.1} MiB, above {:.0} MiB",
        mib(before_drain.peak_rss_bytes),
        mib(MAX_RSS)
    );

    // The aggregator comes up: drain for a bounded time, sampling memory.
    cloud.daemon.restart().unwrap();
    let drain_started = Instant::now();
    let cursor_ok = process::wait_until(Duration::from_secs(30), || cloud.store.exists());
    assert!(cursor_ok, "no aggregator store:\n{}", logs(&edge, &cloud));
    let watch = CursorWatch::open(&cloud.store, NODE).unwrap();
    let mut peak_rss = before_drain.peak_rss_bytes;
    let mut max_now = before_drain.rss_bytes;
    let mut cursor = 0;
    let cpu = |d: &fogline_tests::process::Daemon| {
        d.pid()
            .and_then(|p| cpu::cpu_time(p).ok())
            .unwrap_or_default()
    };
    let (edge_cpu, cloud_cpu) = (cpu(&edge.daemon), cpu(&cloud.daemon));
    let mut next_report = Duration::from_secs(10);
    while drain_started.elapsed() < drain_budget && cursor < total {
        std::thread::sleep(Duration::from_millis(250));
        let m = memory(&edge);
        peak_rss = peak_rss.max(m.peak_rss_bytes);
        max_now = max_now.max(m.rss_bytes);
        cursor = watch.get();
        if drain_started.elapsed() >= next_report {
            next_report += Duration::from_secs(10);
            println!(
                "  {:>3.0}s: {cursor} applied; edge RSS {:.1} MiB (peak {:.1}); CPU so far: edge {:.1}s, aggregator {:.1}s",
                drain_started.elapsed().as_secs_f64(),
                mib(m.rss_bytes),
                mib(m.peak_rss_bytes),
                (cpu(&edge.daemon) - edge_cpu).as_secs_f64(),
                (cpu(&cloud.daemon) - cloud_cpu).as_secs_f64(),
            );
        }
    }
    let drain_secs = drain_started.elapsed().as_secs_f64();
    let end = memory(&edge);
    let made_of = breakdown(&edge);
    peak_rss = peak_rss.max(end.peak_rss_bytes);
    let drained_all = cursor >= total;
    println!(
        "drain: {cursor} of {total} records applied in {drain_secs:.1}s ({:.0} records/s){}; edge RSS now {:.1} MiB, highest sampled {:.1} MiB, peak (VmHWM) {:.1} MiB of {:.0} MiB allowed",
        cursor as f64 / drain_secs,
        if drained_all { "" } else { " — budget spent, stopped there" },
        mib(end.rss_bytes),
        mib(max_now),
        mib(peak_rss),
        mib(MAX_RSS)
    );
    println!("  edge RSS at the end of the drain: {made_of}");
    assert!(
        cursor > 0,
        "nothing drained in {drain_secs:.0}s:\n{}",
        logs(&edge, &cloud)
    );
    assert!(
        peak_rss <= MAX_RSS,
        "I-12: the edge's peak RSS while draining a {records}-record backlog is {:.1} MiB, above {:.0} MiB",
        mib(peak_rss),
        mib(MAX_RSS)
    );

    // What was drained: every backlog record once, in seq order, as
    // committed (record n has seq n + 1), then the live readings.
    if !drained_all {
        // Stop the sender so the store stops moving under the check.
        edge.daemon.kill9();
    }
    std::thread::sleep(Duration::from_millis(500));
    let checked = Instant::now();
    let applied = check_store(&cloud.store, records);
    assert!(
        applied.backlog >= cursor.min(records),
        "the cursor says {cursor} applied, the store holds {} backlog records",
        applied.backlog
    );
    if drained_all {
        let verdict = oracle::judge(&applied.live, &ids_of(&live));
        assert!(verdict.is_exact(), "live readings: {}", verdict.summary());
        println!("live readings in the store: {}", verdict.summary());
    } else {
        println!(
            "the live readings ({}) are behind the backlog and were not reached in {drain_secs:.0}s: set FOGLINE_BACKLOG_DRAIN_SECS higher to wait for them",
            live.len()
        );
    }
    println!(
        "store checked row by row in {:.1}s; backlog memory test: {:.0}s in all",
        checked.elapsed().as_secs_f64(),
        test_started.elapsed().as_secs_f64()
    );
}

/// What the aggregator's store holds of this node.
struct Applied {
    /// Backlog records, each checked in place.
    backlog: u64,
    /// The rest: the live readings.
    live: Vec<oracle::Stored>,
}

/// Reads the node's records in seq order without holding them: backlog
/// record n must be seq n + 1, once; anything else must be a live reading
/// after the whole backlog.
fn check_store(store: &std::path::Path, records: u64) -> Applied {
    let conn =
        rusqlite::Connection::open_with_flags(store, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut stmt = conn
        .prepare("SELECT seq, stream, payload FROM records WHERE node = ?1 ORDER BY seq")
        .unwrap();
    let mut rows = stmt.query([NODE]).unwrap();
    let mut backlog = 0u64;
    let mut live = Vec::new();
    let mut expect_seq = 1u64;
    while let Some(row) = rows.next().unwrap() {
        let seq = row.get::<_, i64>(0).unwrap() as u64;
        let stream: String = row.get(1).unwrap();
        let payload: Vec<u8> = row.get(2).unwrap();
        assert_eq!(seq, expect_seq, "a gap in the drained sequence");
        expect_seq += 1;
        if seq <= records {
            let n = backlog::number_of(&payload).unwrap_or_else(|| {
                panic!(
                    "seq {seq} ({stream}) is not backlog record {}: {}",
                    seq - 1,
                    String::from_utf8_lossy(&payload)
                )
            });
            assert_eq!(
                n,
                seq - 1,
                "seq {seq} holds backlog record {n}: duplicated or out of order"
            );
            assert_eq!(stream, backlog::stream(n), "seq {seq}'s stream");
            backlog += 1;
        } else {
            assert!(
                backlog::number_of(&payload).is_none(),
                "a backlog record after the backlog (seq {seq}): duplicated"
            );
            live.push(oracle::Stored {
                node: NODE.to_string(),
                seq,
                stream,
                payload: serde_json::from_slice(&payload).unwrap_or_default(),
            });
        }
    }
    Applied { backlog, live }
}
