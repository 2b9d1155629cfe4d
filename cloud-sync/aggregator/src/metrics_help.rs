//! HELP text for every metric the aggregator exports, registered at start.

use fogline_telemetry::help::{Help, Kind::*};

const HELP: &[Help] = &[
    (
        "fogline_cloud_connections",
        Gauge,
        "Node connections open, by transport.",
    ),
    (
        "fogline_cloud_connections_rejected_total",
        Counter,
        "Connections refused, by reason (certificate, revoked, rate_limited, ...).",
    ),
    (
        "fogline_cloud_sessions_failed_total",
        Counter,
        "Sessions closed with an error, by code.",
    ),
    (
        "fogline_cloud_records_applied_total",
        Counter,
        "Records stored (each once).",
    ),
    (
        "fogline_cloud_records_skipped_total",
        Counter,
        "Records received again at or below the cursor, not stored twice.",
    ),
    (
        "fogline_cloud_records_lost_total",
        Counter,
        "Records a node was acknowledged that the store no longer has (recorded as gaps).",
    ),
    (
        "fogline_cloud_cursor_regressions_total",
        Counter,
        "Sessions that found the store behind its acknowledgements.",
    ),
    (
        "fogline_cloud_apply_seconds",
        Histogram,
        "Time to decode and apply a group of batches, commit included.",
    ),
    (
        "fogline_cloud_store_failures_total",
        Counter,
        "Store reads and writes that failed, by kind (disk_full, corrupt, error).",
    ),
    (
        "fogline_cloud_tls_reloads_total",
        Counter,
        "TLS material (certificate, key, CA, CRL) reloaded without a restart.",
    ),
    (
        "fogline_cloud_tls_reload_failures_total",
        Counter,
        "Changed TLS files that could not be loaded (the old ones stay).",
    ),
];

/// Registers every HELP text (idempotent).
pub fn describe() {
    fogline_telemetry::help::describe(HELP);
}
