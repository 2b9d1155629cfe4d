//! HELP text for every metric the aggregator exports, registered at start,
//! and the series registered at zero then. The HELP texts live with each
//! part's events (`events.rs`).

use crate::service::events::{self as service, Rejected};
use crate::store::events as store;
use fogline_telemetry::help::{register_zero, Help, Series};

/// Every HELP table: each part's.
const TABLES: &[&[Help]] = &[service::HELP, store::HELP];

/// Every series known before any event, registered at zero at start.
const AT_START: &[Series] = &[
    (service::CONNECTIONS, &[("transport", "quic")]),
    (service::CONNECTIONS, &[("transport", "tcp")]),
    (
        service::CONNECTIONS_REJECTED_TOTAL,
        &[("reason", Rejected::Certificate.label())],
    ),
    (
        service::CONNECTIONS_REJECTED_TOTAL,
        &[("reason", Rejected::Handshake.label())],
    ),
    (
        service::CONNECTIONS_REJECTED_TOTAL,
        &[("reason", Rejected::RateLimited.label())],
    ),
    (service::RECORDS_APPLIED_TOTAL, &[]),
    (service::RECORDS_SKIPPED_TOTAL, &[]),
    (service::RECORDS_LOST_TOTAL, &[]),
    (service::CURSOR_REGRESSIONS_TOTAL, &[]),
    (service::APPLY_SECONDS, &[]),
    (service::TLS_RELOADS_TOTAL, &[]),
    (service::TLS_RELOAD_FAILURES_TOTAL, &[]),
];

/// Registers every HELP text, the build, and the series known at start at
/// zero (idempotent).
pub fn describe() {
    service::describe();
    store::describe();
    fogline_telemetry::register_build_info(
        env!("CARGO_PKG_VERSION"),
        option_env!("FOGLINE_GIT_SHA"),
    );
    register_zero(&all_help(), AT_START);
}

/// [`TABLES`] as one table.
fn all_help() -> Vec<Help> {
    TABLES.iter().flat_map(|t| t.iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorder keeps the first HELP given for a name: a second entry
    /// would be dead text.
    #[test]
    fn every_metric_has_one_help_and_every_series_at_start_has_one() {
        let problems =
            fogline_telemetry::help::help_problems(&all_help(), AT_START.iter().map(|(n, _)| *n));
        assert!(problems.is_empty(), "{problems:?}");
    }
}
