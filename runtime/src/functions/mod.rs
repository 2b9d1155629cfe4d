//! The WASM function host: loads stream functions (WebAssembly components
//! implementing `modules/wit/function.wit`) and runs them over batches in a
//! sandbox.
//!
//! - [`FunctionRuntime`]: one per daemon. The wasmtime engine (epoch
//!   interruption, on-disk compile cache), a linker that grants nothing (WASI
//!   p2 without preopens, environment, arguments or network) plus `host.log`
//!   → `tracing`, and the thread that advances the epoch.
//! - [`Module`]: a compiled, pre-linked component ([`FunctionRuntime::load`]).
//! - [`FunctionInstance`]: one running function with its [`Limits`]; called
//!   per batch ([`FunctionInstance::process`]) and per timer tick
//!   ([`FunctionInstance::tick`]), reused across calls.
//!
//! **Invariants.**
//! - Nothing a guest returns is used unchecked: rejection indices are in
//!   range and unique, streams are non-empty valid topic names of at most
//!   [`MAX_STREAM_BYTES`], payloads and message counts are within [`Limits`];
//!   otherwise the call fails with [`FunctionError::InvalidOutput`].
//! - A call is bounded in time (epoch deadline) and memory (resource
//!   limiter). A trap, timeout, memory-cap hit or invalid output poisons the
//!   instance; the next call restarts it from `init`, so one bad batch never
//!   wedges a function.
//! - This module knows nothing about MQTT, the outbox or dead-lettering: it
//!   reports *which* inputs were rejected and *why* a call failed; the
//!   pipeline decides what to do with them.

pub(crate) mod bindings;
mod engine;
mod error;
mod instance;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use crate::message::Message;
pub use engine::{FunctionRuntime, Module, RuntimeOptions};
pub use error::FunctionError;
pub use instance::{FunctionInstance, MAX_STREAM_BYTES};

/// Per-instance resource limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Cap on the instance's linear memory, in bytes. Growing past it traps
    /// ([`FunctionError::MemoryLimit`]). Default 64 MiB.
    pub memory_bytes: usize,
    /// Deadline per call (`init`, `process`, `tick`). Default 1 s.
    pub call_timeout: Duration,
    /// Most messages one call may emit. Default 100 000.
    pub max_output_messages: usize,
    /// Largest payload a function may emit, in bytes. Default 1 MiB.
    pub max_payload_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            call_timeout: Duration::from_secs(1),
            max_output_messages: 100_000,
            max_payload_bytes: 1 << 20,
        }
    }
}

/// What a call produced, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// Messages to pass on, in the order the function emitted them.
    pub messages: Vec<Message>,
    /// Inputs the function refused (only from `process`), by index in the
    /// batch, unique, in the order the function listed them.
    pub rejected: Vec<Rejection>,
}

/// An input message a function refused; the pipeline dead-letters it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Index in the batch passed to [`FunctionInstance::process`].
    pub index: usize,
    /// Why (the function's error text, at most 4 KiB).
    pub error: String,
}
