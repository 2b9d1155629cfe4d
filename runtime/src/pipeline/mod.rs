//! The pipeline: takes chunks from ingest in batches, refuses what the
//! replication protocol cannot carry, routes the rest through the configured
//! chains of WASM functions, commits what comes out — with the ingest
//! sessions' redelivery state — to the outbox in one transaction (group
//! commit), then hands each connection its acknowledgements.
//!
//! Invariants (ARCHITECTURE.md I-1, I-6):
//! - An acknowledgement is released only after the commit holding its
//!   item's outputs, dead letters and session changes returned (durable with
//!   `sync = full`).
//! - A failed commit (disk full, I/O error) is retried, never skipped: nothing
//!   is acknowledged until it succeeds.
//! - Memory is bounded in bytes: a batch takes at most `max_batch_bytes`, and
//!   its chunks' bytes return to the ingest budget only after its commit.
//!
//! The pipeline knows nothing about QUIC, and nothing about MQTT beyond the
//! acknowledgements it hands back.

mod batch;
mod chain;
mod route;
mod worker;

use std::collections::HashMap;

pub use batch::{plan_batch, BatchPlan};
pub use chain::{Chain, ChainResult};
pub use route::Router;
pub use worker::{spawn_worker, PipelineHealth, Worker, WorkerHandle, WorkerOptions};

use crate::config::EdgeConfig;
use crate::functions::{FunctionError, FunctionInstance, FunctionRuntime, Limits, Module};

/// A function's TOML table as the JSON its `init` receives. Datetimes
/// become their RFC 3339 text (serde would wrap them in a private marker).
pub fn config_json(table: &toml::Table) -> serde_json::Value {
    fn value(v: &toml::Value) -> serde_json::Value {
        match v {
            toml::Value::String(s) => serde_json::Value::String(s.clone()),
            toml::Value::Integer(i) => serde_json::Value::from(*i),
            toml::Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            toml::Value::Boolean(b) => serde_json::Value::Bool(*b),
            toml::Value::Datetime(d) => serde_json::Value::String(d.to_string()),
            toml::Value::Array(a) => serde_json::Value::Array(a.iter().map(value).collect()),
            toml::Value::Table(t) => {
                serde_json::Value::Object(t.iter().map(|(k, v)| (k.clone(), value(v))).collect())
            }
        }
    }
    serde_json::Value::Object(table.iter().map(|(k, v)| (k.clone(), value(v))).collect())
}

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
            let json = config_json(&f.config).to_string();
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
