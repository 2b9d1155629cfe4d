//! In-process pipeline throughput: chunks from ingest → routing → threshold
//! (WASM) → outbox commit (SQLite WAL, fsync per commit): the worker's own
//! code path minus the network. The reference, measured in the same run: a
//! bare rusqlite prepared insert of the same rows, same batch size, fsync
//! per batch (design.md: pipeline ≥ 0.5× the reference).
//!
//! cargo bench -p fogline-edge --bench pipeline [-- --batches N]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use fogline_edge::config::SyncMode;
use fogline_edge::functions::{FunctionInstance, FunctionRuntime, Limits, RuntimeOptions};
use fogline_edge::ingest::{Ack, AckKind, AckRoute, Chunk, Item, Received};
use fogline_edge::outbox::{Commit, Outbox};
use fogline_edge::pipeline::{plan_batch, Chain, ChainResult, Router};

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

fn chunk(start: usize, route: &std::sync::Arc<AckRoute>) -> Chunk {
    let mut c = Chunk::new(Some(route.clone()), 256 * 1024);
    for i in 0..BATCH {
        let n = start + i;
        let (topic, payload) = reading(n);
        c.push(Item {
            message: Some(Received {
                topic: topic.into_bytes(),
                payload: payload.into_bytes(),
                received_ms: 1_764_000_000_000 + n as u64,
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

fn main() {
    let batches: usize = std::env::args()
        .skip_while(|a| a != "--batches")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();

    // Reference: the same rows, prepared insert, one fsynced transaction per batch.
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

    let rt = FunctionRuntime::new(RuntimeOptions::default()).unwrap();
    let module = rt.load(fogline_modules::threshold()).unwrap();
    let run = |functions: bool| {
        let mut chain = if functions {
            let f = FunctionInstance::new(
                &rt,
                &module,
                "hot",
                r#"{"field":"temp","above":30.0}"#,
                Limits::default(),
            )
            .unwrap();
            Chain::new("hot".into(), vec![f])
        } else {
            Chain::new("pass".into(), vec![])
        };
        let mut router = Router::new(vec![vec!["sensors/+/reading".into()]]);
        let path = dir
            .path()
            .join(format!("outbox-{}.db", if functions { "f" } else { "p" }));
        let mut outbox = Outbox::open(&path, SyncMode::Full).unwrap();
        let (route, _rx) = AckRoute::new(false);
        let mut total = Duration::ZERO;
        for b in 0..batches {
            let mut chunks = vec![chunk(b * BATCH, &route)];
            let t = Instant::now();
            let plan = plan_batch(&mut chunks, 1, 1024, |t| router.route(t).to_vec());
            let mut result = ChainResult::default();
            for msgs in plan.per_pipeline {
                chain.process(msgs, &mut result);
            }
            outbox
                .commit(&Commit {
                    records: result.outputs,
                    dead_letters: result.dead_letters,
                    sessions: Vec::new(),
                })
                .unwrap();
            total += t.elapsed();
        }
        (batches * BATCH) as f64 / total.as_secs_f64()
    };
    let pass = run(false);
    let threshold = run(true);
    println!("pipeline bench: {batches} batches of {BATCH} readings, fsync per batch");
    println!("  reference  bare rusqlite prepared insert        {reference:>12.0} rows/s");
    println!(
        "  pipeline   chunks → route → empty chain → outbox {pass:>12.0} msgs/s   ratio {:.2}×",
        pass / reference
    );
    println!(
        "  pipeline   chunks → route → threshold → outbox   {threshold:>12.0} msgs/s   ratio {:.2}× (threshold passes ~1/3 of the readings)",
        threshold / reference
    );
}
