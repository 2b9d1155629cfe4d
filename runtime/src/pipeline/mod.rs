//! The pipeline: takes chunks from ingest in batches, refuses what the
//! replication protocol cannot carry, routes the rest through the configured
//! chains of WASM functions, commits what comes out — with the ingest
//! sessions' redelivery state — to the outbox in one transaction (group
//! commit), then hands each connection its acknowledgements.
//!
//! Invariants (ARCHITECTURE.md I-1, I-6, I-13, I-22..I-25):
//! - An acknowledgement is released only after the commit holding its
//!   item's outputs, dead letters, held inputs, the functions' state changes
//!   and the session changes returned (durable with `sync = full`).
//! - A function's state is committed with the outputs of the batch that
//!   changed it; a failed call rolls the function back to the state of its
//!   last success and the good inputs are run again (`slot.rs`).
//! - A new function version runs in shadow until it passed its probation;
//!   exactly one version's outputs are committed per batch (`versions.rs`).
//! - A failed commit (disk full, I/O error) is retried, never skipped: nothing
//!   is acknowledged until it succeeds.
//! - Memory is bounded in bytes: a batch takes at most `max_batch_bytes`, and
//!   its chunks' bytes return to the ingest budget only after its commit.
//!
//! The pipeline knows nothing about QUIC, and nothing about MQTT beyond the
//! acknowledgements it hands back.

mod batch;
pub mod breaker;
mod chain;
pub mod events;
mod route;
mod slot;
pub mod versions;
mod worker;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod worker_tests;

pub use batch::{plan_batch, BatchPlan};
pub use breaker::{Admit, Breaker, BreakerConfig, BreakerState};
pub use chain::{Chain, ChainResult};
pub use route::Router;
pub use slot::{
    Candidate, FunctionSlot, FunctionStatus, Lifecycle, OnOpen, Spec, SwapNote, Version,
};
pub use versions::{config_json, start_chains, ModuleStore, VersionError};
pub use worker::{
    spawn_worker, LocalOutputs, PipelineHealth, SwapRequest, Worker, WorkerCommand, WorkerHandle,
    WorkerOptions,
};
