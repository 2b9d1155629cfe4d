//! The endpoint's metric names, and the connections it closes before it
//! trusts them, by reason (ARCHITECTURE.md I-34).

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
