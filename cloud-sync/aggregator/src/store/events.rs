//! The store's metric names and events.

use fogline_telemetry::help::{Help, Kind::*};

/// Store reads and writes that failed, by `kind` (`disk_full`, `corrupt`,
/// `error`).
pub const FAILURES_TOTAL: &str = "fogline_cloud_store_failures_total";
/// Day partitions of `records` dropped by the retention (PostgreSQL).
pub const PARTITIONS_DROPPED_TOTAL: &str = "fogline_cloud_store_partitions_dropped_total";
/// Applies refused because another aggregator took the node's lease.
pub const FENCED_TOTAL: &str = "fogline_cloud_store_fenced_total";

/// HELP texts: name, kind, text.
pub const HELP: &[Help] = &[
    (
        FAILURES_TOTAL,
        Counter,
        "Store reads and writes that failed, by kind (disk_full, corrupt, error).",
    ),
    (
        PARTITIONS_DROPPED_TOTAL,
        Counter,
        "Day partitions of records dropped by store.retention (PostgreSQL).",
    ),
    (
        FENCED_TOTAL,
        Counter,
        "Applies refused in their transaction because another aggregator holds the node's lease.",
    ),
];

/// HELP texts, registered once per process.
pub fn describe() {
    fogline_telemetry::help::describe(HELP);
}

/// The retention dropped a day's partition of records.
pub struct PartitionDropped<'a> {
    /// The partition's table.
    pub partition: &'a str,
}

impl PartitionDropped<'_> {
    /// Logs and counts it.
    pub fn emit(self) {
        tracing::info!(
            partition = self.partition,
            "Records older than store.retention dropped (a day's partition)."
        );
        metrics::counter!(PARTITIONS_DROPPED_TOTAL).increment(1);
    }
}
