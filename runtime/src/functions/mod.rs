//! The WASM function host: loads stream functions (WebAssembly components
//! implementing `modules/wit/function.wit`, package `fogline:function@0.2.0`)
//! and runs them over batches in a sandbox.
//!
//! - [`FunctionRuntime`]: one per daemon. The wasmtime engine (epoch
//!   interruption, on-disk compile cache), a linker that grants nothing (WASI
//!   p2 without preopens, environment, arguments or network; blocking calls
//!   refused) plus the contract's `host` interface (`log`, `emit`), and the
//!   thread that advances the epoch.
//! - [`Module`]: a compiled, pre-linked component ([`FunctionRuntime::load`]).
//! - [`FunctionInstance`]: one running function with its [`Limits`] and its
//!   durable state; called per batch ([`FunctionInstance::process`]) and per
//!   timer tick ([`FunctionInstance::tick`]), reused across calls.
//!
//! **Invariants.**
//! - Nothing a guest hands over is used unchecked, and nothing is copied
//!   before it is checked: counts, spans, indices and the bytes a copy would
//!   make (aliases counted per use) are within [`Limits`] first
//!   (`output.rs`). A message with a bad stream name or an oversized payload
//!   is refused alone: its input is dead-lettered, the rest stands.
//! - A call is bounded in time (an epoch deadline that grows with the batch:
//!   `call_timeout + timeout_per_message × n`; a guest cannot block in a host
//!   call) and in memory (one budget across all memories and tables of the
//!   instance; WASI resources, component handles, random bytes and log lines
//!   capped).
//! - Any failed call rolls the instance back: it restarts from `init` and
//!   the durable state of its last successful call.
//! - This module knows nothing about MQTT, the outbox or dead-lettering: it
//!   reports *which* inputs were refused and *why* a call failed, and the
//!   state changes to commit; the pipeline decides what to do with them.

pub(crate) mod bindings;
mod engine;
mod error;
pub mod events;
mod imports;
mod instance;
mod output;
pub(crate) use output::truncate;
mod sandbox;
#[cfg(test)]
pub(crate) mod tests;

use std::time::Duration;

pub use crate::message::Message;
pub use engine::{FunctionRuntime, Module, RuntimeOptions};
pub use error::FunctionError;
pub use instance::FunctionInstance;
pub use output::{Emitted, Output, Refusal, StateChange, MAX_STATE_KEY_BYTES, MAX_STREAM_BYTES};

/// Per-instance resource limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Cap on the instance's memory, all its linear memories together, in
    /// bytes. Growing past it fails ([`FunctionError::MemoryLimit`]).
    /// Default 64 MiB.
    pub memory_bytes: usize,
    /// Deadline of a `tick`, and of a `process` call before the per-message
    /// allowance. Default 200 ms.
    pub call_timeout: Duration,
    /// Added to a `process` call's deadline per message in the batch, so a
    /// large batch under load is not failed for its size. Default 50 µs.
    pub timeout_per_message: Duration,
    /// Deadline of `init` plus `restore`. Default 5 s.
    pub init_timeout: Duration,
    /// Most messages one call may emit. Default 100 000.
    pub max_output_messages: usize,
    /// Most bytes one call's output may copy to the host (stream names and
    /// payloads, forwarded inputs included, aliased spans counted per use).
    /// Default 64 MiB.
    pub max_output_bytes: usize,
    /// Largest payload a function may emit, in bytes. Default 1 MiB.
    pub max_payload_bytes: usize,
    /// Most bytes of state changes one call may hand over. Default 16 MiB.
    pub max_state_write_bytes: usize,
    /// Most bytes of durable state (keys and values). Default 16 MiB.
    pub max_state_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            call_timeout: Duration::from_millis(200),
            timeout_per_message: Duration::from_micros(50),
            init_timeout: Duration::from_secs(5),
            max_output_messages: 100_000,
            max_output_bytes: 64 << 20,
            max_payload_bytes: 1 << 20,
            max_state_write_bytes: 16 << 20,
            max_state_bytes: 16 << 20,
        }
    }
}

/// An input message a function refused; the pipeline dead-letters it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Index in the batch passed to [`FunctionInstance::process`].
    pub index: usize,
    /// Why (the function's error text, at most 4 KiB).
    pub error: String,
}
