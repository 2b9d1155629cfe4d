//! HELP text for every metric the aggregator exports, registered at start,
//! and the series registered at zero then. The HELP texts live with each
//! part's events (`events.rs`).

use crate::rollout::controller::events as rollout;
use crate::service::events::{self as service, Rejected};
use crate::store::events as store;
use fogline_telemetry::help::{register_zero, Help, Series};

/// Every HELP table: each part's.
const TABLES: &[&[Help]] = &[service::HELP, store::HELP, rollout::HELP];

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
    (service::BYTES_IN_TOTAL, &[]),
    (service::LEASES_HELD, &[]),
    (service::STATUS_FRAMES_TOTAL, &[]),
    (service::LATEST_LOOKUPS_TOTAL, &[("result", "hit")]),
    (service::LATEST_LOOKUPS_TOTAL, &[("result", "store")]),
    (service::LATEST_CACHE_BYTES, &[]),
    (service::LATEST_CACHE_OVERFLOWS_TOTAL, &[]),
    (store::FENCED_TOTAL, &[]),
    (store::PARTITIONS_DROPPED_TOTAL, &[]),
    (service::TLS_RELOADS_TOTAL, &[]),
    (service::TLS_RELOAD_FAILURES_TOTAL, &[]),
    (rollout::ROLLOUTS, &[("state", "running")]),
    (rollout::ROLLOUTS, &[("state", "completed")]),
    (rollout::ROLLOUTS, &[("state", "stopped")]),
    (rollout::DEPLOY_FRAMES_TOTAL, &[("action", "install")]),
    (rollout::DEPLOY_FRAMES_TOTAL, &[("action", "revert")]),
];

/// Registers every HELP text, the build, and the series known at start at
/// zero (idempotent).
pub fn describe() {
    service::describe();
    store::describe();
    fogline_telemetry::help::describe(rollout::HELP);
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

#[cfg(test)]
mod dashboard {
    use super::*;

    /// The Grafana dashboard in the repo uses only series the aggregator
    /// exports (a renamed metric would leave an empty panel).
    #[test]
    fn the_grafana_dashboard_uses_only_exported_metrics() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../grafana/fogline-aggregators.json"
        );
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let dash: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let names: Vec<&str> = all_help().iter().map(|h| h.0).collect();
        let mut used = 0;
        for panel in dash["panels"].as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_default();
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("fogline_") {
                        let base = word
                            .trim_end_matches("_bucket")
                            .trim_end_matches("_sum")
                            .trim_end_matches("_count");
                        assert!(
                            names.contains(&base),
                            "panel {:?} uses {word}, which the aggregator does not export",
                            panel["title"]
                        );
                        used += 1;
                    }
                }
            }
        }
        assert!(used >= 10, "the dashboard at {path} has {used} metric uses");
    }
}
