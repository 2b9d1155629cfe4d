//! Fogline edge daemon: MQTT ingest → WASM functions → SQLite outbox → QUIC
//! uplink. See `ARCHITECTURE.md` at the repository root for the data path
//! and its invariants.
#![warn(missing_docs)]

pub mod clock;
pub mod config;
pub mod daemon;
pub mod deploy;
pub mod functions;
pub mod ingest;
pub mod local;
pub mod message;
pub mod metrics_help;
pub mod outbox;
pub mod pipeline;
pub mod reload;
pub mod service_notify;
pub mod telemetry;
pub mod uplink;
