//! HELP text for every metric the aggregator exports, registered at start.

use fogline_telemetry::help::{register_zero, Help, Kind::*, Series};

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

/// Every series known before any event, registered at zero at start.
const AT_START: &[Series] = &[
    ("fogline_cloud_connections", &[("transport", "quic")]),
    ("fogline_cloud_connections", &[("transport", "tcp")]),
    (
        "fogline_cloud_connections_rejected_total",
        &[("reason", "certificate")],
    ),
    (
        "fogline_cloud_connections_rejected_total",
        &[("reason", "handshake")],
    ),
    (
        "fogline_cloud_connections_rejected_total",
        &[("reason", "rate_limited")],
    ),
    ("fogline_cloud_records_applied_total", &[]),
    ("fogline_cloud_records_skipped_total", &[]),
    ("fogline_cloud_records_lost_total", &[]),
    ("fogline_cloud_cursor_regressions_total", &[]),
    ("fogline_cloud_apply_seconds", &[]),
    ("fogline_cloud_tls_reloads_total", &[]),
    ("fogline_cloud_tls_reload_failures_total", &[]),
];

/// Registers every HELP text, the build, and the series known at start at
/// zero (idempotent).
pub fn describe() {
    fogline_telemetry::help::describe(HELP);
    fogline_telemetry::register_build_info(
        env!("CARGO_PKG_VERSION"),
        option_env!("FOGLINE_GIT_SHA"),
    );
    register_zero(HELP, AT_START);
}
