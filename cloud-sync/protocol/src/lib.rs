//! `fogline-protocol`: the replication protocol without I/O: frames and their codec, the batch
//! encoding, and the sender/receiver session state machines.
//!
//! **Invariant:** nothing in here touches a socket, a runtime, or a clock.
//! Time, bytes and store results are passed in; the async transport only
//! moves bytes. That is what makes the simulated-link tests deterministic.
#![warn(missing_docs)]

pub mod batch;
pub mod deploy;
pub mod dial;
pub mod frame;
pub mod loss;
pub mod placement;
pub mod session;
pub mod signing;
pub mod status;
pub mod topic;
mod wire;

pub use batch::{decode_batch, encode_batch, DecodedBatch, Record, RecordRef};
pub use frame::{BatchFrame, BlockCodec, ErrorCode, Frame, FrameDecoder};
pub use loss::{LossReason, LossReport, LOSS_STREAM};

/// Version of the wire protocol spoken by this crate, sent in `Hello`.
/// 2: `Hello` carries the outbox incarnation, `Welcome` the one the cursor
/// belongs to. 3: `Batch` carries its block codec; `Ping`/`Pong`. 4: records
/// may be sent out of seq order — `Batch.floor`, `Ack.applied`, `Welcome.top`.
/// 5: `Welcome.version` (the aggregator's), `Status` frames from the node.
/// 6: `Deploy` frames from the aggregator (signed rollouts, `deploy.rs`).
pub const PROTOCOL_VERSION: u32 = 6;

/// Oldest version an aggregator still serves (edges are upgraded after it).
pub const MIN_PROTOCOL_VERSION: u32 = 2;

/// ALPN protocol identifier negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"fogline/1";

/// A zstd block may declare at most this many times its own size as its
/// uncompressed length. Bounds what a frame can make a receiver allocate:
/// see [`batch::decoded_bytes_bound`].
pub const MAX_INFLATION: usize = 1024;

/// Hard cap on one frame (type byte + body), checked before buffering it.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Hard cap on the uncompressed size of one batch block.
pub const MAX_BATCH_RAW_BYTES: usize = 64 * 1024 * 1024;

/// Hard cap on the number of records in one batch.
pub const MAX_BATCH_RECORDS: usize = 1_000_000;

/// Longest stream name accepted, in bytes.
pub const MAX_STREAM_NAME_BYTES: usize = 1024;

/// Largest payload of one record, in bytes. The edge refuses larger
/// messages at ingest, so none can ever block replication.
pub const MAX_RECORD_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;

/// Why bytes from the peer could not be decoded. Every variant names the
/// field that was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Input ended in the middle of a field.
    #[error("truncated input while reading {field}")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// A varint longer than 10 bytes or overflowing u64.
    #[error("varint overflow in {field}")]
    VarintOverflow {
        /// The field being read.
        field: &'static str,
    },
    /// A value above its limit.
    #[error("{field} is {value}, limit is {max}")]
    TooLarge {
        /// The field being read.
        field: &'static str,
        /// The value found.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// A string that is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field being read.
        field: &'static str,
    },
    /// Bytes left over after a complete structure.
    #[error("{count} trailing bytes after {what}")]
    TrailingBytes {
        /// The structure decoded.
        what: &'static str,
        /// How many bytes were left.
        count: usize,
    },
    /// A frame type byte that this version does not know.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// A frame of zero length (it must hold at least the type byte).
    #[error("empty frame")]
    EmptyFrame,
    /// The batch block is inconsistent with itself or its header.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// The zstd block could not be decompressed within its declared size.
    #[error("batch decompression failed: {0}")]
    Decompress(String),
    /// A field whose content is not what it must be.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong (fixed text: a decoder's error allocates nothing
        /// a peer chose).
        reason: &'static str,
    },
}
