//! The unit of data on the edge: what ingest hands the pipeline and what
//! functions emit.
//!
//! [`Message`] is the record type generated from the WIT contract
//! (`modules/wit/function.wit`, `record message`), re-exported: a batch
//! (`&[Message]`) is lowered into a function's memory directly, and what a
//! function returns is lifted straight into `Vec<Message>`, with no
//! conversion pass in between. It is a plain struct with public fields
//! (`stream: String`, `timestamp_ms: u64`, `payload: Vec<u8>`) deriving
//! `Clone, Debug, PartialEq, Eq, Hash`.

pub use crate::functions::bindings::Message;
