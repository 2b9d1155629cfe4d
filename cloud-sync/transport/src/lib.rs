//! `fogline-transport`: the replication protocol's byte pipes, for both
//! ends — QUIC (quinn) and, where UDP is blocked, TLS 1.3 over TCP
//! (tokio-rustls) — with mutual TLS and the node identity its certificate
//! carries.
//!
//! One connection carries one bidirectional stream of
//! [`fogline_protocol`] frames. The session state machines decide; this
//! crate only moves bytes, loads certificates and maps failures to
//! [`TransportError`].
//!
//! - [`client::ClientTransport`]: the edge — one QUIC endpoint (reused, and
//!   rebindable for migration), 0-RTT `Hello` when resuming, TCP/TLS
//!   attempts; certificate files reloaded when they change.
//! - [`server::Listener`]: the aggregator — QUIC and TCP/TLS on the same
//!   port number; stateless resets that survive a restart; TLS material
//!   (CRL included) swappable without a restart.
//! - [`conn::Connection`]: a framed stream plus a handle that closes it with
//!   a protocol code, whatever the transport.
//! - [`tls`], [`identity`]: PEM files, rustls configurations, the node id.
#![warn(missing_docs)]

pub mod client;
pub mod conn;
pub mod framed;
pub mod identity;
mod quic;
pub mod server;
mod tcp;
pub mod tls;

use std::time::Duration;

pub use fogline_protocol::dial::Transport;
use fogline_protocol::frame::{EncodeError, ErrorCode};
use fogline_protocol::DecodeError;

/// Idle timeout of a QUIC connection. The sessions ping well within it and
/// decide liveness themselves; this only reaps connections nobody closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// A transport operation failed. Every variant says where.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A certificate, key or CRL file could not be loaded.
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
    /// A local socket could not be bound.
    #[error("binding {addr}: {source}")]
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
    /// Connecting failed (refused, unreachable, certificate rejected).
    #[error("connecting to {server} over {transport}: {reason}")]
    Connect {
        /// Address.
        server: String,
        /// QUIC or TCP.
        transport: &'static str,
        /// Cause.
        reason: String,
    },
    /// No answer within the time allowed.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// The connection was lost.
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

    /// Did the aggregator refuse this node — close it as `Unauthorized`, or
    /// fail the TLS handshake with an alert (its certificate rejected, or
    /// the server's by us)? Retrying at once cannot help: the edge backs off
    /// to minutes (`fogline_protocol::dial`).
    pub fn is_refusal(&self) -> bool {
        let tls_failed = |text: &str| {
            // quinn: "the cryptographic handshake failed: error 42 …";
            // rustls over TCP: "received fatal alert: BadCertificate" or a
            // local "invalid peer certificate: …".
            text.contains("cryptographic handshake failed")
                || text.contains("fatal alert")
                || text.contains("invalid peer certificate")
        };
        match self {
            TransportError::Closed { code, .. } => *code == ErrorCode::Unauthorized,
            TransportError::ConnectionLost(reason) | TransportError::Connect { reason, .. } => {
                tls_failed(reason)
            }
            _ => false,
        }
    }

    /// Did the handshake fail because the aggregator's certificate is not
    /// valid yet by this node's clock (a clock far behind)?
    pub fn is_clock_behind(&self) -> bool {
        match self {
            TransportError::ConnectionLost(reason) | TransportError::Connect { reason, .. } => {
                reason.contains("not valid yet") || reason.contains("NotValidYet")
            }
            _ => false,
        }
    }

    /// Did the peer or the network end the connection (nothing to tell the
    /// peer any more)?
    pub fn is_disconnect(&self) -> bool {
        matches!(
            self,
            TransportError::ConnectionLost(_)
                | TransportError::Closed { .. }
                | TransportError::StreamFinished
        )
    }
}

/// QUIC application close code for `code`.
pub(crate) fn close_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(code.to_u32())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_rejections_and_unauthorized_closes_are_refusals() {
        for text in [
            "aborted by peer: the cryptographic handshake failed: error 48: invalid peer certificate: UnknownIssuer",
            "received fatal alert: CertificateExpired",
        ] {
            assert!(
                TransportError::ConnectionLost(text.into()).is_refusal(),
                "{text}"
            );
        }
        assert!(TransportError::Closed {
            code: ErrorCode::Unauthorized,
            reason: "revoked".into()
        }
        .is_refusal());
        assert!(!TransportError::ConnectionLost("timed out".into()).is_refusal());
        assert!(!TransportError::Closed {
            code: ErrorCode::ShuttingDown,
            reason: String::new()
        }
        .is_refusal());
    }
}
