//! In-process pipeline throughput: chunks from ingest → routing → a WASM
//! function → outbox commit (SQLite WAL, fsync per commit): the worker's own
//! code path minus the network. The reference, measured in the same run: a
//! bare rusqlite prepared insert of the same rows, same batch size, fsync
//! per batch (design.md targets: ≥ 1M messages/s and ≥ 0.5× the reference
//! with `threshold`; ≥ 0.5M messages/s with durable function state).
//!
//! Runs: pass-through (no function); `threshold` (a filter: a third of the
//! readings pass); `window-avg` (1 s tumbling windows per sensor, its open
//! windows committed with every batch).
//!
//! Each run also prints the bytes it wrote per reading (`/proc/self/io`),
//! the flash wear, against the reference's per row.
//!
//! Then flash wear where it matters, readings trickling in: the real
//! worker thread fed one reading per chunk (one PUBLISH each) at a steady
//! rate, with `outbox.commit_interval` at its default (0: the reference,
//! measured in the same run) and at 250 ms and 1 s: bytes written per
//! reading, the ratio to the reference, commits, and the acknowledgement
//! latency it costs.
//!
//! cargo bench -p fogline-edge --bench pipeline [-- --batches N --trickle-rate R --trickle-secs S]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use fogline_edge::config::SyncMode;
use fogline_edge::functions::{FunctionRuntime, Limits, RuntimeOptions};
use fogline_edge::ingest::session_store::Replica;
use fogline_edge::ingest::{Ack, AckKind, AckRoute, Chunk, IngestSink, Item, Received};
use fogline_edge::outbox::{Outbox, Retention};
use fogline_edge::pipeline::{
    plan_batch, spawn_worker, Chain, ChainResult, FunctionSlot, PipelineHealth, Router, Worker,
    WorkerOptions,
};

const BATCH: usize = 8192;

fn reading(n: usize) -> (String, String) {
    let s = n % 10;
    let temp = 10.0 + ((n * 7919) % 3000) as f64 / 100.0;
    (
        format!("sensors/s{s}/reading"),
        format!(
            r#"{{"id":"s{s}-{n:07}","sensor":"s{s}","n":{n},"temp":{temp:.2},"hum":48.2,"ts":1764000000123}}"#
        ),
    )
}

/// Readings 1 ms apart: a batch of 8192 spans about 8 windows of 1 s.
fn ts(n: usize) -> u64 {
    1_764_000_000_000 + n as u64
}

fn chunk(start: usize, route: &std::sync::Arc<AckRoute>) -> Chunk {
    let mut c = Chunk::new(Some(route.clone()), 256 * 1024);
    for i in 0..BATCH {
        let n = start + i;
        let (topic, payload) = reading(n);
        c.push(Item {
            message: Some(Received {
                topic: topic.into_bytes(),
                payload: payload.into_bytes(),
                received_ms: ts(n),
            }),
            ack: Some(Ack {
                kind: AckKind::PubAck,
                pkid: (n % 65535 + 1) as u16,
                reason: 0,
            }),
        });
    }
    c
}

struct Run {
    msgs_per_s: f64,
    records: usize,
    state_writes: usize,
    /// Bytes this process wrote (`/proc/self/io` `wchar`) per reading.
    written_per_reading: f64,
}

/// Bytes written so far by this process, as the kernel counts them
/// (`wchar`: every write(2), WAL and checkpoints included) — what wears the
/// flash, before the filesystem's own amplification.
fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("wchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let batches = fogline_bench_arg("--batches", 60);
    let dir = tempfile::tempdir().unwrap();

    // Reference: the same rows, prepared insert, one fsynced transaction per batch.
    let written_before = written_bytes();
    let reference = {
        let conn = rusqlite::Connection::open(dir.path().join("reference.db")).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             CREATE TABLE records (seq INTEGER PRIMARY KEY, stream TEXT NOT NULL, timestamp_ms INTEGER NOT NULL, payload BLOB NOT NULL);",
        )
        .unwrap();
        let mut seq = 0i64;
        let mut total = Duration::ZERO;
        for b in 0..batches {
            let rows: Vec<(String, String)> = (0..BATCH).map(|i| reading(b * BATCH + i)).collect();
            let t = Instant::now();
            let tx = conn.unchecked_transaction().unwrap();
            {
                let mut st = tx
                    .prepare_cached("INSERT INTO records (seq, stream, timestamp_ms, payload) VALUES (?1, ?2, ?3, ?4)")
                    .unwrap();
                for (topic, payload) in &rows {
                    seq += 1;
                    st.execute(rusqlite::params![seq, topic, seq, payload.as_bytes()])
                        .unwrap();
                }
            }
            tx.commit().unwrap();
            total += t.elapsed();
        }
        (batches * BATCH) as f64 / total.as_secs_f64()
    };
    let reference_written = (written_bytes() - written_before) as f64 / (batches * BATCH) as f64;

    let rt = FunctionRuntime::new(RuntimeOptions::default()).unwrap();
    let threshold = rt.load(fogline_modules::threshold()).unwrap();
    let window_avg = rt.load(fogline_modules::window_avg()).unwrap();
    let run = |name: &str, function: Option<(&fogline_edge::functions::Module, &str)>| {
        let slots = match function {
            Some((module, config)) => {
                vec![
                    FunctionSlot::standalone(name, name, module, config, Limits::default())
                        .unwrap(),
                ]
            }
            None => Vec::new(),
        };
        let mut chain = Chain::new(name.into(), slots);
        let mut router = Router::new(vec![vec!["sensors/+/reading".into()]]);
        let path = dir.path().join(format!("outbox-{name}.db"));
        let mut outbox = Outbox::open(&path, SyncMode::Full).unwrap();
        // As the daemon runs it by default: a 1 GiB quota checked per
        // commit, the pipeline's lane.
        outbox.set_retention(daemon_retention()).unwrap();
        chain.lane = outbox.lane(name).unwrap();
        let written_before = written_bytes();
        let (route, _rx) = AckRoute::new(false);
        let mut total = Duration::ZERO;
        let mut records = 0;
        let mut state_writes = 0;
        for b in 0..batches {
            let mut chunks = vec![chunk(b * BATCH, &route)];
            let now = ts((b + 1) * BATCH);
            let t = Instant::now();
            let plan = plan_batch(
                &mut chunks,
                1,
                1024,
                fogline_edge::config::UnroutedPolicy::DeadLetter,
                |t| router.route(t).to_vec(),
            );
            let mut result = ChainResult::default();
            for msgs in plan.per_pipeline {
                chain.process(msgs, now, &mut result);
            }
            // Windows that ended close on the tick, as the worker does.
            chain.tick(now, &mut result);
            state_writes += result.state.iter().map(|s| s.changes.len()).sum::<usize>();
            let commit = result.into_commit(plan.dead_letters, Vec::new(), Vec::new());
            records += commit.records.len();
            outbox.commit(&commit).unwrap();
            total += t.elapsed();
        }
        Run {
            msgs_per_s: (batches * BATCH) as f64 / total.as_secs_f64(),
            records,
            state_writes,
            written_per_reading: (written_bytes() - written_before) as f64
                / (batches * BATCH) as f64,
        }
    };
    let pass = run("pass", None);
    let hot = run(
        "hot",
        Some((&threshold, r#"{"field":"temp","above":30.0}"#)),
    );
    let avg = run(
        "avg",
        Some((&window_avg, r#"{"field":"temp","window_ms":1000}"#)),
    );
    let total = batches * BATCH;
    println!("pipeline bench: {batches} batches of {BATCH} readings, fsync per batch");
    println!(
        "  reference  bare rusqlite prepared insert          {reference:>12.0} rows/s   {reference_written:.0} bytes written per row"
    );
    for (label, r, target) in [
        ("chunks → route → empty chain → outbox", &pass, ""),
        (
            "chunks → route → threshold → outbox  ",
            &hot,
            "target ≥ 1M/s and ≥ 0.5×",
        ),
        (
            "chunks → route → window-avg → outbox ",
            &avg,
            "target ≥ 0.5M/s (durable state)",
        ),
    ] {
        println!(
            "  pipeline   {label} {:>12.0} msgs/s   ratio {:.2}×   ({} records, {} state writes for {total} readings)   {target}",
            r.msgs_per_s,
            r.msgs_per_s / reference,
            r.records,
            r.state_writes,
        );
        println!(
            "             flash wear: {:.0} bytes written per reading ({:.2}× the reference's per row)",
            r.written_per_reading,
            r.written_per_reading / reference_written.max(1.0),
        );
    }
    trickle_report(dir.path());
}

/// The outbox's bounds as the daemon sets them by default: a 1 GiB quota
/// checked per commit, the write-ahead log's allowance.
fn daemon_retention() -> Retention {
    Retention {
        max_bytes: Some(1 << 30),
        wal_allowance: (4 << 20) + 2 * (4 << 20),
        dead_letter_max_bytes: 64 << 20,
        ..Default::default()
    }
}

/// One setting of `commit_interval` under a trickle of readings.
struct Trickle {
    readings: usize,
    commits: u64,
    written_per_reading: f64,
    ack_p50: Duration,
    ack_max: Duration,
}

/// The real worker on a fresh outbox (empty chain, the daemon's defaults
/// but for `commit_interval`), fed `rate` readings a second, one per
/// chunk as the endpoint queues a PUBLISH, for `secs`; bytes this process
/// wrote per reading, from the outbox's creation to its close (checkpoint
/// included).
fn trickle(dir: &std::path::Path, commit_interval: Duration, rate: usize, secs: usize) -> Trickle {
    let path = dir.join(format!("trickle-{}ms.db", commit_interval.as_millis()));
    let mut outbox = Outbox::open(&path, SyncMode::Full).unwrap();
    outbox.set_retention(daemon_retention()).unwrap();
    let mut chain = Chain::new("trickle".into(), Vec::new());
    chain.lane = outbox.lane("trickle").unwrap();
    let (sink, chunks) = IngestSink::new(16 << 20);
    let (_commands, commands) = tokio::sync::mpsc::unbounded_channel();
    let health = std::sync::Arc::new(PipelineHealth::default());
    let written_before = written_bytes();
    let worker = spawn_worker(
        Worker {
            chains: vec![chain],
            router: Router::new(vec![vec!["sensors/+/reading".into()]]),
            outbox,
            options: WorkerOptions {
                max_batch: 8192,
                max_batch_bytes: 4 << 20,
                commit_linger: Duration::from_millis(1),
                commit_interval,
                max_topic: 1024,
                tick_interval: Duration::from_secs(1),
                unrouted: fogline_edge::config::UnroutedPolicy::DeadLetter,
            },
            committed: std::sync::Arc::new(tokio::sync::Notify::new()),
            sessions: Replica::default(),
            health: health.clone(),
            commands,
            functions: Default::default(),
            warned_unrouted: Default::default(),
            local: Default::default(),
        },
        chunks,
    )
    .unwrap();
    let total = rate * secs;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut latencies = rt.block_on(async {
        let (route, mut acks) = AckRoute::new(false);
        let sent = std::sync::Arc::new(std::sync::Mutex::new(vec![None; total]));
        let sent2 = sent.clone();
        let collect = tokio::spawn(async move {
            let mut out = Vec::with_capacity(total);
            while out.len() < total {
                let Some(batch) = acks.recv().await else {
                    break;
                };
                let now = Instant::now();
                let sent = sent2.lock().unwrap();
                for a in batch {
                    if let Some(t) = sent[a.pkid as usize - 1] {
                        out.push(now - t);
                    }
                }
            }
            out
        });
        let start = tokio::time::Instant::now();
        for i in 0..total {
            tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate as f64)).await;
            let (topic, payload) = reading(i);
            let mut c = Chunk::new(Some(route.clone()), 256 * 1024);
            c.push(Item {
                message: Some(Received {
                    topic: topic.into_bytes(),
                    payload: payload.into_bytes(),
                    received_ms: ts(i),
                }),
                ack: Some(Ack {
                    kind: AckKind::PubAck,
                    pkid: (i + 1) as u16,
                    reason: 0,
                }),
            });
            sent.lock().unwrap()[i] = Some(Instant::now());
            sink.send(c).await.unwrap();
        }
        drop(sink);
        collect.await.unwrap()
    });
    // The worker commits the rest, closes the outbox (its last checkpoint).
    worker.join();
    latencies.sort();
    Trickle {
        readings: total,
        commits: health.commits.load(std::sync::atomic::Ordering::Acquire),
        written_per_reading: (written_bytes() - written_before) as f64 / total as f64,
        ack_p50: latencies
            .get(latencies.len() / 2)
            .copied()
            .unwrap_or_default(),
        ack_max: latencies.last().copied().unwrap_or_default(),
    }
}

fn trickle_report(dir: &std::path::Path) {
    let rate = fogline_bench_arg("--trickle-rate", 200);
    let secs = fogline_bench_arg("--trickle-secs", 5);
    // Packet ids are 1..=65535 here, one per reading.
    assert!(
        rate * secs <= 65_535,
        "--trickle-rate × --trickle-secs ≤ 65535"
    );
    println!(
        "flash wear with readings trickling in: {rate} readings/s, one per chunk (a PUBLISH each), {secs} s per setting, fsync per commit"
    );
    let reference = trickle(dir, Duration::ZERO, rate, secs);
    let line = |label: &str, t: &Trickle, ratio: Option<f64>| {
        println!(
            "  {label:<42} {:>8.0} bytes written per reading{}   {:>5} commits for {} readings   ack latency p50 {:>4} ms, max {:>4} ms",
            t.written_per_reading,
            ratio.map_or("          ".to_string(), |r| format!(" = {r:.3}×")),
            t.commits,
            t.readings,
            t.ack_p50.as_millis(),
            t.ack_max.as_millis(),
        );
    };
    line("reference  commit_interval = 0 (default)", &reference, None);
    for ms in [250, 1000] {
        let t = trickle(dir, Duration::from_millis(ms), rate, secs);
        line(
            &format!("           commit_interval = {ms}ms"),
            &t,
            Some(t.written_per_reading / reference.written_per_reading.max(1.0)),
        );
    }
}

/// `--name N` from the bench's arguments.
fn fogline_bench_arg(name: &str, default: usize) -> usize {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
