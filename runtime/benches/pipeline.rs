//! In-process pipeline throughput: MQTT deliveries → routing → threshold
//! (WASM) → outbox commit (SQLite WAL, fsync per commit), the worker's own
//! code path minus the network.
//!
//! cargo bench -p fogline-edge --bench pipeline
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use fogline_edge::config::SyncMode;
use fogline_edge::functions::{FunctionInstance, FunctionRuntime, Limits, RuntimeOptions};
use fogline_edge::ingest::Delivery;
use fogline_edge::outbox::{Commit, Outbox};
use fogline_edge::pipeline::{plan_batch, Chain, ChainResult, Router};
use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;

const BATCH: usize = 8192;

fn deliveries(start: usize) -> Vec<Delivery> {
    (0..BATCH)
        .map(|i| {
            let n = start + i;
            let s = n % 10;
            let temp = 10.0 + ((n * 7919) % 3000) as f64 / 100.0;
            let payload = format!(
                r#"{{"id":"s{s}-{n:07}","sensor":"s{s}","n":{n},"temp":{temp:.2},"hum":48.2,"ts":1764000000123}}"#
            );
            let mut p = Publish::new(format!("sensors/s{s}/reading"), QoS::AtLeastOnce, payload, None);
            p.pkid = (n % 65535 + 1) as u16;
            Delivery {
                publish: p,
                connection: 1,
                received_ms: 1_764_000_000_000 + n as u64,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let rt = FunctionRuntime::new(RuntimeOptions::default()).unwrap();
    let module = rt.load(fogline_modules::threshold()).unwrap();
    let f = FunctionInstance::new(
        &rt,
        &module,
        "hot",
        r#"{"field":"temp","above":30.0}"#,
        Limits::default(),
    )
    .unwrap();
    let mut chain = Chain::new("hot".into(), vec![f]);
    let mut router = Router::new(vec![vec!["sensors/+/reading".into()]]);
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = Outbox::open(&dir.path().join("outbox.db"), SyncMode::Full).unwrap();
    let mut marks = HashMap::new();
    let mut n = 0usize;

    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    g.bench_function("deliveries→threshold→outbox(fsync), batch 8192", |b| {
        b.iter_batched(
            || {
                n += BATCH;
                deliveries(n)
            },
            |batch| {
                let plan = plan_batch(&batch, 1, 256 * 1024, &mut marks, |t| {
                    router.route(t).to_vec()
                });
                let mut result = ChainResult::default();
                for msgs in plan.per_pipeline {
                    chain.process(msgs, &mut result);
                }
                outbox
                    .commit(&Commit {
                        records: result.outputs,
                        dead_letters: result.dead_letters,
                        delivered: plan.delivered,
                    })
                    .unwrap();
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
