//! The endpoint's metric names, the connections it closes before it
//! trusts them, by reason (ARCHITECTURE.md I-34), and its connections'
//! events.

use std::fmt::Display;
use std::net::SocketAddr;

use fogline_telemetry::help::{Help, Kind::*};

/// MQTT clients connected (past CONNECT).
pub const CLIENTS: &str = "fogline_ingest_clients";
/// Connections accepted past CONNECT.
pub const CONNECTIONS: &str = "fogline_ingest_connections_total";
/// Connections refused for bad credentials.
pub const AUTH_FAILURES: &str = "fogline_ingest_auth_failures_total";
/// Malformed or forbidden packets.
pub const PROTOCOL_ERRORS: &str = "fogline_ingest_protocol_errors_total";
/// SUBSCRIBEs refused: this endpoint only ingests.
pub const SUBSCRIBES_REFUSED: &str = "fogline_ingest_subscribes_refused_total";
/// TLS handshakes that failed.
pub const TLS_HANDSHAKE_FAILURES: &str = "fogline_ingest_tls_handshake_failures_total";
/// Persistent sessions expired.
pub const SESSIONS_EXPIRED: &str = "fogline_ingest_sessions_expired_total";
/// Connections refused or cut, by `reason`: a CONNACK reason's name, or one
/// of [`Cut::label`].
pub const CONNECTIONS_REFUSED: &str = "fogline_ingest_connections_refused_total";
/// Bytes buffered by connections still before their CONNECT.
pub const PRECONNECT_BYTES: &str = "fogline_ingest_preconnect_bytes";
/// Connections accepted and not yet past CONNECT (TLS handshake included).
pub const PRECONNECT_CONNECTIONS: &str = "fogline_ingest_preconnect_connections";
/// Bytes of wills waiting for their delay.
pub const PENDING_WILL_BYTES: &str = "fogline_ingest_pending_will_bytes";
/// Wills published.
pub const WILLS: &str = "fogline_ingest_wills_total";
/// Wills published before their delay because the will budget was spent.
pub const WILLS_HURRIED: &str = "fogline_ingest_wills_hurried_total";

/// HELP texts: name, kind, text.
pub const HELP: &[Help] = &[
    (
        AUTH_FAILURES,
        Counter,
        "MQTT connections refused for bad credentials.",
    ),
    (
        CONNECTIONS,
        Counter,
        "MQTT connections accepted by the endpoint.",
    ),
    (
        CONNECTIONS_REFUSED,
        Counter,
        "MQTT connections refused or cut, by reason: a CONNACK reason, or per_ip, rate, max_connections, budget, connect_timeout, idle, auth_busy (I-34).",
    ),
    (
        PRECONNECT_BYTES,
        Gauge,
        "Bytes buffered by MQTT connections still before their CONNECT (out of ingest.max_pending_bytes, at most broker.max_preconnect_bytes).",
    ),
    (
        PRECONNECT_CONNECTIONS,
        Gauge,
        "MQTT connections accepted and not yet past CONNECT (TLS handshake included).",
    ),
    (
        PENDING_WILL_BYTES,
        Gauge,
        "Bytes of will messages waiting for their delay (at most broker.max_pending_will_bytes).",
    ),
    (
        WILLS_HURRIED,
        Counter,
        "Will messages published before their delay because broker.max_pending_will_bytes was spent.",
    ),
    (
        PROTOCOL_ERRORS,
        Counter,
        "Malformed or forbidden MQTT packets.",
    ),
    (SESSIONS_EXPIRED, Counter, "MQTT sessions expired."),
    (
        SUBSCRIBES_REFUSED,
        Counter,
        "SUBSCRIBE filters the endpoint refused: not within a [[broker.local_topics]] its client may subscribe to, or malformed.",
    ),
    (
        TLS_HANDSHAKE_FAILURES,
        Counter,
        "TLS handshakes of MQTT clients that failed.",
    ),
    (WILLS, Counter, "Will messages published."),
    (CLIENTS, Gauge, "MQTT clients connected to the endpoint."),
];

/// HELP texts, registered once per process.
pub fn describe() {
    fogline_telemetry::help::describe(HELP);
}

/// Why the endpoint closed a connection it did not trust yet, or one that
/// went silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// `broker.max_connections_per_ip` connections from its address already.
    PerIp,
    /// Its address opened connections faster than `broker.connect_rate_per_ip`.
    Rate,
    /// `broker.max_connections` connections already.
    MaxConnections,
    /// No room for its bytes before CONNECT (`broker.max_preconnect_bytes`).
    Budget,
    /// No complete CONNECT within `broker.connect_timeout` of accept.
    ConnectTimeout,
    /// Nothing received for 1.5 × keep alive, or `broker.idle_timeout`.
    Idle,
    /// The password verification queue was full (`broker.auth_queue`).
    AuthBusy,
}

impl Cut {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Cut::PerIp => "per_ip",
            Cut::Rate => "rate",
            Cut::MaxConnections => "max_connections",
            Cut::Budget => "budget",
            Cut::ConnectTimeout => "connect_timeout",
            Cut::Idle => "idle",
            Cut::AuthBusy => "auth_busy",
        }
    }

    /// Counts one.
    pub fn count(self) {
        metrics::counter!(CONNECTIONS_REFUSED, "reason" => self.label()).increment(1);
    }
}

/// A client is connected: its CONNECT accepted, the CONNACK queued.
pub struct ClientConnected<'a> {
    /// Its address.
    pub peer: SocketAddr,
    /// Its client id (assigned when it sent none).
    pub client: &'a str,
    /// MQTT version spoken.
    pub version: &'static str,
    /// Whether its stored session was resumed.
    pub session_present: bool,
    /// The keep alive in force, in seconds.
    pub keep_alive: u16,
}

impl ClientConnected<'_> {
    /// Log and count it.
    pub fn emit(&self) {
        metrics::gauge!(CLIENTS).increment(1.0);
        metrics::counter!(CONNECTIONS).increment(1);
        tracing::info!(peer = %self.peer, client = %self.client, version = self.version, session_present = self.session_present, keep_alive = self.keep_alive, "MQTT client connected.");
    }
}

/// A connected client is gone.
pub struct ClientDisconnected<'a> {
    /// Its address.
    pub peer: SocketAddr,
    /// Its client id.
    pub client: &'a str,
    /// Why: its DISCONNECT, a lost socket, or why we closed it.
    pub reason: &'a str,
}

impl ClientDisconnected<'_> {
    /// Log and count it.
    pub fn emit(&self) {
        metrics::gauge!(CLIENTS).decrement(1.0);
        tracing::info!(peer = %self.peer, client = %self.client, reason = %self.reason, "MQTT client disconnected.");
    }
}

/// A connection failed before its session started: the socket ended or a
/// packet could not be read.
pub struct EndedBeforeSession<'a> {
    /// Its address.
    pub peer: SocketAddr,
    /// What happened.
    pub reason: &'a str,
}

impl EndedBeforeSession<'_> {
    /// Log and count it (as a protocol error).
    pub fn emit(&self) {
        metrics::counter!(PROTOCOL_ERRORS).increment(1);
        tracing::debug!(peer = %self.peer, reason = %self.reason, "Connection ended before a session started.");
    }
}

/// A client's TLS handshake failed.
pub struct TlsHandshakeFailed<'a> {
    /// Its address.
    pub peer: SocketAddr,
    /// Why.
    pub error: &'a dyn Display,
}

impl TlsHandshakeFailed<'_> {
    /// Log and count it.
    pub fn emit(&self) {
        metrics::counter!(TLS_HANDSHAKE_FAILURES).increment(1);
        tracing::warn!(peer = %self.peer, error = %self.error, "TLS handshake failed (a client without TLS, or a certificate not from broker.tls.client_ca).");
    }
}

/// A persistent session expired; it is discarded.
pub struct SessionExpired<'a> {
    /// The session's key.
    pub session: &'a str,
}

impl SessionExpired<'_> {
    /// Log and count it.
    pub fn emit(&self) {
        metrics::counter!(SESSIONS_EXPIRED).increment(1);
        tracing::info!(session = %self.session, "MQTT session expired.");
    }
}
