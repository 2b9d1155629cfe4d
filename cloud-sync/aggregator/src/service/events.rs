//! Telemetry of the replication service as named events: one type per
//! event, which logs once and moves its metrics. Metric names are the
//! constants below, used by emitters and tests alike.

use std::fmt::Display;
use std::net::SocketAddr;

use fogline_telemetry::help::{Help, Kind::*};

/// Node connections open, by `transport`.
pub const CONNECTIONS: &str = "fogline_cloud_connections";
/// Connections refused, by `reason` ([`Rejected::label`]).
pub const CONNECTIONS_REJECTED_TOTAL: &str = "fogline_cloud_connections_rejected_total";
/// Sessions closed with an error, by `code`.
pub const SESSIONS_FAILED_TOTAL: &str = "fogline_cloud_sessions_failed_total";
/// Records stored (each once).
pub const RECORDS_APPLIED_TOTAL: &str = "fogline_cloud_records_applied_total";
/// Records received again at or below the cursor, not stored twice.
pub const RECORDS_SKIPPED_TOTAL: &str = "fogline_cloud_records_skipped_total";
/// Records a node was acknowledged that the store no longer has.
pub const RECORDS_LOST_TOTAL: &str = "fogline_cloud_records_lost_total";
/// Sessions that found the store behind its acknowledgements.
pub const CURSOR_REGRESSIONS_TOTAL: &str = "fogline_cloud_cursor_regressions_total";
/// Time to decode and apply a group of batches: a histogram.
pub const APPLY_SECONDS: &str = "fogline_cloud_apply_seconds";
/// TLS material reloaded without a restart.
pub const TLS_RELOADS_TOTAL: &str = "fogline_cloud_tls_reloads_total";
/// Changed TLS files that could not be loaded.
pub const TLS_RELOAD_FAILURES_TOTAL: &str = "fogline_cloud_tls_reload_failures_total";

/// Batch bytes received (as sent: compressed), by the batches applied.
pub const BYTES_IN_TOTAL: &str = "fogline_cloud_bytes_in_total";
/// Node leases this aggregator holds (I-36).
pub const LEASES_HELD: &str = "fogline_cloud_leases_held";
/// Status frames received from nodes.
pub const STATUS_FRAMES_TOTAL: &str = "fogline_cloud_status_frames_total";
/// `/api/v1/latest` lookups, by `result` (`hit`, `fill`, `stale`, `store`).
pub const LATEST_LOOKUPS_TOTAL: &str = "fogline_cloud_latest_lookups_total";
/// Bytes the latest-value cache holds.
pub const LATEST_CACHE_BYTES: &str = "fogline_cloud_latest_cache_bytes";
/// Nodes whose latest values did not fit the cache (read from the store).
pub const LATEST_CACHE_OVERFLOWS_TOTAL: &str = "fogline_cloud_latest_cache_overflows_total";

/// HELP texts: name, kind, text.
pub const HELP: &[Help] = &[
    (
        BYTES_IN_TOTAL,
        Counter,
        "Batch bytes received and applied, as sent (compressed).",
    ),
    (
        LEASES_HELD,
        Gauge,
        "Node leases this aggregator holds: the nodes it applies for (I-36).",
    ),
    (
        STATUS_FRAMES_TOTAL,
        Counter,
        "Status frames received from nodes (protocol 5).",
    ),
    (
        LATEST_LOOKUPS_TOTAL,
        Counter,
        "/api/v1/latest lookups by result: hit (cache, lease confirmed), fill (cache filled from the store), stale (lease taken elsewhere: store), store (node not held here).",
    ),
    (
        LATEST_CACHE_BYTES,
        Gauge,
        "Bytes the latest-value cache holds ([http] latest_cache_bytes bounds it).",
    ),
    (
        LATEST_CACHE_OVERFLOWS_TOTAL,
        Counter,
        "Nodes whose newest records did not fit the latest-value cache (read from the store until their session ends).",
    ),
    (CONNECTIONS, Gauge, "Node connections open, by transport."),
    (
        CONNECTIONS_REJECTED_TOTAL,
        Counter,
        "Connections refused, by reason (certificate, revoked, rate_limited, ...).",
    ),
    (
        SESSIONS_FAILED_TOTAL,
        Counter,
        "Sessions closed with an error, by code.",
    ),
    (
        RECORDS_APPLIED_TOTAL,
        Counter,
        "Records stored (each once).",
    ),
    (
        RECORDS_SKIPPED_TOTAL,
        Counter,
        "Records received again at or below the cursor, not stored twice.",
    ),
    (
        RECORDS_LOST_TOTAL,
        Counter,
        "Records a node was acknowledged that the store no longer has (recorded as gaps).",
    ),
    (
        CURSOR_REGRESSIONS_TOTAL,
        Counter,
        "Sessions that found the store behind its acknowledgements.",
    ),
    (
        APPLY_SECONDS,
        Histogram,
        "Time to decode and apply a group of batches, commit included.",
    ),
    (
        TLS_RELOADS_TOTAL,
        Counter,
        "TLS material (certificate, key, CA, CRL) reloaded without a restart.",
    ),
    (
        TLS_RELOAD_FAILURES_TOTAL,
        Counter,
        "Changed TLS files that could not be loaded (the old ones stay).",
    ),
];

/// HELP texts, registered once per process.
pub fn describe() {
    fogline_telemetry::help::describe(HELP);
}

/// Why a connection was refused before its session started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Its address failed too many handshakes lately.
    RateLimited,
    /// Its TLS handshake failed (or timed out).
    Handshake,
    /// Its certificate is revoked or out of validity.
    Certificate,
}

impl Rejected {
    /// The metric label.
    pub const fn label(self) -> &'static str {
        match self {
            Rejected::RateLimited => "rate_limited",
            Rejected::Handshake => "handshake",
            Rejected::Certificate => "certificate",
        }
    }

    /// Counts one.
    pub fn count(self) {
        metrics::counter!(CONNECTIONS_REJECTED_TOTAL, "reason" => self.label()).increment(1);
    }
}

/// A node's connection was refused after its handshake: the gate refuses
/// its certificate.
pub struct NodeRejected<'a> {
    /// Its address.
    pub remote: SocketAddr,
    /// Its node id.
    pub node: &'a str,
    /// Why.
    pub reason: &'a str,
}

impl NodeRejected<'_> {
    /// Log and count it.
    pub fn emit(&self) {
        Rejected::Certificate.count();
        tracing::warn!(remote = %self.remote, node = %self.node, reason = %self.reason, "Rejected a node.");
    }
}

/// Changed TLS files were loaded: new connections use them.
pub struct TlsReloaded {
    /// Serials the CRL revokes.
    pub revoked: usize,
}

impl TlsReloaded {
    /// Log and count it.
    pub fn emit(&self) {
        tracing::info!(revoked = self.revoked, "Reloaded TLS material.");
        metrics::counter!(TLS_RELOADS_TOTAL).increment(1);
    }
}

/// Changed TLS files could not be loaded; the previous ones stay.
pub struct TlsReloadFailed<'a> {
    /// Why.
    pub error: &'a dyn Display,
}

impl TlsReloadFailed<'_> {
    /// Log and count it.
    pub fn emit(&self) {
        metrics::counter!(TLS_RELOAD_FAILURES_TOTAL).increment(1);
        tracing::warn!(error = %self.error, "TLS files changed but cannot be loaded; keeping the previous ones.");
    }
}

/// The store is behind what it acknowledged to a node: records it cannot
/// have back, recorded as a gap.
pub struct CursorRegressed {
    /// How many records.
    pub lost: u64,
}

impl CursorRegressed {
    /// Count it.
    pub fn emit(&self) {
        metrics::counter!(CURSOR_REGRESSIONS_TOTAL).increment(1);
        metrics::counter!(RECORDS_LOST_TOTAL).increment(self.lost);
    }
}

/// A group of batches was decoded and applied, its commit done.
pub struct BatchesApplied {
    /// Time to decode and apply, commit included.
    pub elapsed: std::time::Duration,
    /// Their bytes as received.
    pub bytes: usize,
    /// Records stored.
    pub inserted: usize,
    /// Records already stored, skipped.
    pub skipped: usize,
}

impl BatchesApplied {
    /// Count it.
    pub fn emit(&self) {
        metrics::histogram!(APPLY_SECONDS).record(self.elapsed.as_secs_f64());
        metrics::counter!(BYTES_IN_TOTAL).increment(self.bytes as u64);
        metrics::counter!(RECORDS_APPLIED_TOTAL).increment(self.inserted as u64);
        metrics::counter!(RECORDS_SKIPPED_TOTAL).increment(self.skipped as u64);
    }
}
