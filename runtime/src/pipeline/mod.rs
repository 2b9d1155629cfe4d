//! The pipeline: takes MQTT deliveries in batches, routes them through the
//! configured chains of WASM functions, commits what comes out to the outbox
//! in one transaction (group commit), then acknowledges the deliveries.
//!
//! Invariants:
//! - A delivery is acked only after the commit holding its outputs, its dead
//!   letters and its delivery mark returned (durable with `sync = full`).
//! - A redelivery (DUP, same packet id, same digest as a committed delivery)
//!   is acked without being processed again.
//! - A failed commit (disk full, I/O error) is retried, never skipped: nothing
//!   is acked until it succeeds.
//!
//! The pipeline knows nothing about QUIC.

mod batch;
mod chain;
mod route;
mod worker;

use std::collections::HashMap;

pub use batch::{plan_batch, BatchPlan};
pub use chain::{Chain, ChainResult};
pub use route::Router;
pub use worker::{spawn_worker, Worker, WorkerHandle, WorkerOptions};

use crate::config::EdgeConfig;
use crate::functions::{FunctionError, FunctionInstance, FunctionRuntime, Limits, Module};

/// Load every module once and instantiate each pipeline's functions.
pub fn build_chains(
    config: &EdgeConfig,
    runtime: &FunctionRuntime,
) -> Result<Vec<Chain>, FunctionError> {
    let mut modules: HashMap<std::path::PathBuf, Module> = HashMap::new();
    let mut chains = Vec::with_capacity(config.pipelines.len());
    for p in &config.pipelines {
        let mut instances = Vec::with_capacity(p.functions.len());
        for name in &p.functions {
            let Some(f) = config.functions.get(name) else {
                continue; // validation already reported it
            };
            let path = config.resolve(&f.module);
            let module = match modules.get(&path) {
                Some(m) => m.clone(),
                None => {
                    let m = runtime.load(&path)?;
                    modules.insert(path.clone(), m.clone());
                    m
                }
            };
            let json = serde_json::to_string(&f.config).unwrap_or_else(|_| "{}".to_string());
            let limits = Limits {
                memory_bytes: f.memory_mib << 20,
                call_timeout: f.timeout,
                ..Limits::default()
            };
            instances.push(FunctionInstance::new(
                runtime, &module, name, &json, limits,
            )?);
        }
        chains.push(Chain::new(p.name.clone(), instances));
    }
    Ok(chains)
}
