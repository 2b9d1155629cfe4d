//! The hostile-module suite, measured: a healthy pipeline (`threshold`) and,
//! beside it on the same worker path, a pipeline whose function misbehaves
//! (the `hostile` fixture, one mode per case, default limits and breaker).
//! Every batch carries healthy readings and a few messages for the hostile
//! pipeline; each batch is committed with fsync, ticks fire every second,
//! as in the daemon. The reference, measured in the same run: the healthy
//! pipeline with a well-behaved function beside it. Target: the healthy
//! pipeline keeps ≥ 0.8× its throughput in every case.
//!
//! cargo bench -p fogline-edge --bench hostile [-- --seconds N] [-- --case MODE]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fogline_edge::config::SyncMode;
use fogline_edge::functions::{FunctionInstance, FunctionRuntime, Limits, Module, RuntimeOptions};
use fogline_edge::ingest::{Ack, AckKind, AckRoute, Chunk, Item, Received};
use fogline_edge::outbox::Outbox;
use fogline_edge::pipeline::{
    plan_batch, BreakerConfig, Chain, ChainResult, FunctionSlot, OnOpen, Router, Spec, Version,
};

/// Healthy readings per batch, and hostile messages among them.
const HEALTHY: usize = 2048;
const HOSTILE: usize = 8;

const CASES: &[(&str, &str)] = &[
    ("ok", r#"{"mode":"ok"}"#),
    ("spin", r#"{"mode":"spin"}"#),
    ("sleep", r#"{"mode":"sleep"}"#),
    ("alloc", r#"{"mode":"alloc"}"#),
    ("huge-output", r#"{"mode":"flood","count":200000}"#),
    (
        "aliased-output",
        r#"{"mode":"alias","count":100000,"size":1048576}"#,
    ),
    ("resources", r#"{"mode":"resources"}"#),
    ("log-flood", r#"{"mode":"log-flood","count":10000}"#),
    ("trap", r#"{"mode":"trap"}"#),
    ("tick-trap", r#"{"mode":"tick-trap"}"#),
    ("init-trap", r#"{"mode":"init-trap"}"#),
    ("init-spin", r#"{"mode":"init-spin"}"#),
    ("long-stream", r#"{"mode":"long-stream","size":5000}"#),
];

fn now_ms() -> u64 {
    fogline_edge::clock::ingest_ms()
}

fn slot(pipeline: &str, module: &Module, config: &str) -> FunctionSlot {
    let limits = Limits::default();
    let started =
        FunctionInstance::from_module(module, pipeline, config, limits.clone(), BTreeMap::new())
            .map_err(|e| (e, BTreeMap::new()));
    FunctionSlot::new(
        pipeline,
        pipeline,
        0,
        Spec {
            module: module.clone(),
            config_json: config.to_string(),
            limits,
        },
        Version {
            generation: 1,
            module_sha256: String::new(),
            config_sha256: String::new(),
            config_json: config.to_string(),
        },
        started,
        BreakerConfig::default(),
        OnOpen::Hold,
        now_ms(),
    )
}

fn chunk(n0: usize, route: &std::sync::Arc<AckRoute>) -> Chunk {
    let mut c = Chunk::new(Some(route.clone()), 256 * 1024);
    let mut push = |topic: String, payload: String, n: usize| {
        c.push(Item {
            message: Some(Received {
                topic: topic.into_bytes(),
                payload: payload.into_bytes(),
                received_ms: now_ms(),
            }),
            ack: Some(Ack {
                kind: AckKind::PubAck,
                pkid: (n % 65535 + 1) as u16,
                reason: 0,
            }),
        });
    };
    for i in 0..HEALTHY {
        let n = n0 + i;
        let temp = 10.0 + ((n * 7919) % 3000) as f64 / 100.0;
        push(
            format!("sensors/s{}/reading", n % 10),
            format!(r#"{{"id":"{n}","temp":{temp:.2},"hum":48.2}}"#),
            n,
        );
    }
    for i in 0..HOSTILE {
        push("hostile/x".into(), "boom".into(), n0 + HEALTHY + i);
    }
    c
}

/// Healthy readings per second over `seconds`, with `case` beside them.
fn run(
    rt: &FunctionRuntime,
    threshold: &Module,
    hostile: &Module,
    config: &str,
    seconds: f64,
) -> (f64, String) {
    let _ = rt;
    let mut chains = vec![
        Chain::new(
            "healthy".into(),
            vec![slot(
                "healthy",
                threshold,
                r#"{"field":"temp","above":30.0}"#,
            )],
        ),
        Chain::new("hostile".into(), vec![slot("hostile", hostile, config)]),
    ];
    let mut router = Router::new(vec![
        vec!["sensors/+/reading".into()],
        vec!["hostile/#".into()],
    ]);
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = Outbox::open(&dir.path().join("outbox.db"), SyncMode::Full).unwrap();
    let (route, _rx) = AckRoute::new(false);
    let started = Instant::now();
    let mut next_tick = started + Duration::from_secs(1);
    let mut healthy = 0usize;
    let mut n = 0usize;
    while started.elapsed().as_secs_f64() < seconds {
        let mut chunks = vec![chunk(n, &route)];
        n += HEALTHY + HOSTILE;
        let plan = plan_batch(
            &mut chunks,
            2,
            1024,
            fogline_edge::config::UnroutedPolicy::DeadLetter,
            |t| router.route(t).to_vec(),
        );
        let now = now_ms();
        let mut result = ChainResult::default();
        for (chain, msgs) in chains.iter_mut().zip(plan.per_pipeline) {
            chain.process(msgs, now, &mut result);
        }
        if Instant::now() >= next_tick {
            next_tick += Duration::from_secs(1);
            for chain in &mut chains {
                chain.tick(now_ms(), &mut result);
            }
        }
        outbox
            .commit(&result.into_commit(plan.dead_letters, Vec::new(), Vec::new()))
            .unwrap();
        healthy += HEALTHY;
    }
    let s = chains[1].slots()[0].status();
    let note = format!(
        "breaker {} (opened {}×), {} restarts, {} held{}",
        s.breaker,
        s.breaker_opened,
        s.restarts,
        s.held,
        s.last_error
            .map(|(_, e)| format!("; {}", e.chars().take(70).collect::<String>()))
            .unwrap_or_default()
    );
    (healthy as f64 / started.elapsed().as_secs_f64(), note)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let seconds: f64 = arg("--seconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(20.0);
    let only = arg("--case");
    let rt = FunctionRuntime::new(RuntimeOptions::default()).unwrap();
    let threshold = rt.load(fogline_modules::threshold()).unwrap();
    let hostile = rt.load(fogline_modules::hostile()).unwrap();
    println!(
        "hostile bench: {HEALTHY} healthy readings + {HOSTILE} hostile messages per batch, fsync per batch, {seconds} s per case"
    );
    let (reference, _) = run(&rt, &threshold, &hostile, CASES[0].1, seconds);
    println!(
        "  reference  healthy beside a well-behaved function      {reference:>10.0} readings/s"
    );
    let mut worst = f64::INFINITY;
    for (name, config) in &CASES[1..] {
        if only.as_deref().is_some_and(|o| o != *name) {
            continue;
        }
        let (got, note) = run(&rt, &threshold, &hostile, config, seconds);
        let ratio = got / reference;
        worst = worst.min(ratio);
        println!(
            "  {name:<15} healthy {got:>10.0} readings/s   ratio {ratio:.2}×   hostile: {note}"
        );
    }
    println!("  worst ratio {worst:.2}× (target ≥ 0.80×)");
}
