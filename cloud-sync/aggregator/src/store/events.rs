//! The store's metric names.

use fogline_telemetry::help::{Help, Kind::*};

/// Store reads and writes that failed, by `kind` (`disk_full`, `corrupt`,
/// `error`).
pub const FAILURES_TOTAL: &str = "fogline_cloud_store_failures_total";

/// HELP texts: name, kind, text.
pub const HELP: &[Help] = &[(
    FAILURES_TOTAL,
    Counter,
    "Store reads and writes that failed, by kind (disk_full, corrupt, error).",
)];

/// HELP texts, registered once per process.
pub fn describe() {
    fogline_telemetry::help::describe(HELP);
}
