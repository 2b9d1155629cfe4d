//! `fogline-transport`: the replication protocol over QUIC (quinn, mutual TLS
//! with rustls), for both ends.
//!
//! One connection per node, one bidirectional stream carrying the frames of
//! [`fogline_protocol`]. The sans-IO session state machines decide; this
//! module only moves bytes, loads certificates and maps failures to
//! [`TransportError`].
//!
//! - [`client`]: the edge side ([`client::UplinkClient`] → [`client::Link`]).
//! - [`framed`]: frames over a stream.
//! - [`identity`]: the node id a certificate carries.
//! - [`tls`]: certificates, keys and the rustls configurations.
#![warn(missing_docs)]

pub mod client;
pub mod framed;
pub mod identity;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use fogline_protocol::frame::{EncodeError, ErrorCode};
use fogline_protocol::DecodeError;

/// Idle timeout of a connection; keep-alives are sent at a third of it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Flow-control window per stream: room for several 1 MiB batches in flight.
const STREAM_WINDOW: u32 = 32 * 1024 * 1024;

/// A transport operation failed. Every variant says where.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A certificate or key file could not be loaded.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// The TLS configuration could not be built.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The local UDP socket could not be bound.
    #[error("binding UDP {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The server address could not be resolved.
    #[error("cannot resolve {server}: {reason}")]
    Resolve {
        /// As configured.
        server: String,
        /// Cause.
        reason: String,
    },
    /// Connecting failed (handshake refused, unreachable, certificate rejected).
    #[error("connecting to {server}: {reason}")]
    Connect {
        /// Address.
        server: String,
        /// Cause.
        reason: String,
    },
    /// No answer within the configured time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// The connection was lost or closed.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The peer closed with a protocol error code.
    #[error("peer closed the connection: {code}: {reason}")]
    Closed {
        /// Why.
        code: ErrorCode,
        /// Peer's text.
        reason: String,
    },
    /// The peer finished its stream.
    #[error("peer finished the stream")]
    StreamFinished,
    /// Bytes from the peer could not be decoded.
    #[error("malformed frame from peer: {0}")]
    Decode(#[from] DecodeError),
    /// A frame could not be encoded.
    #[error("encoding a frame: {0}")]
    Encode(#[from] EncodeError),
    /// A batch could not be encoded.
    #[error("encoding a batch: {0}")]
    Batch(#[from] fogline_protocol::batch::BatchError),
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl TransportError {
    /// Maps a quinn connection error.
    pub fn from_connection(e: quinn::ConnectionError) -> Self {
        match e {
            quinn::ConnectionError::ApplicationClosed(close) => TransportError::Closed {
                code: ErrorCode::from_u32(
                    u32::try_from(close.error_code.into_inner()).unwrap_or(u32::MAX),
                ),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            },
            other => TransportError::ConnectionLost(other.to_string()),
        }
    }
}

impl From<quinn::ReadError> for TransportError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => Self::from_connection(c),
            other => TransportError::ConnectionLost(other.to_string()),
        }
    }
}

impl From<quinn::WriteError> for TransportError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => Self::from_connection(c),
            other => TransportError::ConnectionLost(other.to_string()),
        }
    }
}

/// Transport parameters shared by both ends: large stream windows so a
/// window of in-flight batches is not throttled by flow control, and
/// keep-alives so a dead path is noticed within [`IDLE_TIMEOUT`].
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(quinn::VarInt::from_u32(2 * STREAM_WINDOW));
    t.send_window(2 * u64::from(STREAM_WINDOW));
    t.keep_alive_interval(Some(IDLE_TIMEOUT / 3));
    // IDLE_TIMEOUT is well inside the VarInt range.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1));
    Arc::new(t)
}

/// QUIC application close code for `code`.
pub fn close_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(code.to_u32())
}
