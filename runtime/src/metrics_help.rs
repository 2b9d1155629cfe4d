//! HELP text for every metric the edge daemon exports (Prometheus shows it
//! with `# HELP`), registered once at start, and the series registered at
//! zero then, so dashboards and rates see them before their first event.
//! Each part's HELP lives with its events (`events.rs`); the table here
//! holds the rest. Functions' series are registered per function.

use crate::ingest::endpoint::events as endpoint;
use crate::ingest::events as ingest;
use crate::outbox::events as outbox;
use crate::pipeline::events as pipeline;
use crate::uplink::events as uplink;
use fogline_telemetry::help::{register_zero, Help, Kind::*, Series};

/// Free bytes on the outbox's filesystem, read at each scrape.
pub const OUTBOX_DISK_FREE_BYTES: &str = "fogline_outbox_disk_free_bytes";

/// HELP of the metrics no part's events module names.
const HELP: &[Help] = &[
    (
        crate::telemetry::BACKLOG_RECORDS,
        Gauge,
        "Records in the outbox waiting for the aggregator (data and loss reports).",
    ),
    (
        crate::telemetry::BACKLOG_BYTES,
        Gauge,
        "Payload and stream-name bytes of the records waiting for the aggregator.",
    ),
    (
        crate::telemetry::BACKLOG_OLDEST_AGE,
        Gauge,
        "Seconds since the oldest waiting record was committed (0 when none waits).",
    ),
    (
        crate::telemetry::DEAD_LETTERS,
        Gauge,
        "Dead letters kept in the outbox.",
    ),
    (
        crate::telemetry::DISK_BYTES,
        Gauge,
        "Bytes of the outbox database and its write-ahead log on disk.",
    ),
    (
        crate::outbox::losses::LOSSES_TOTAL,
        Counter,
        "Records lost (quota, max_age, unrouted, dead_letter_pruned, corrupt) or dead-lettered/replayed, by reason; each also reported to the aggregator.",
    ),
    (
        OUTBOX_DISK_FREE_BYTES,
        Gauge,
        "Bytes free (for unprivileged writers) on the filesystem holding the outbox, read at each scrape.",
    ),
];

/// Every HELP table: this module's (metrics without an events module of
/// their own) and each part's. Their names are registered bare at start,
/// those of [`LABELLED`] excepted.
const TABLES: &[&[Help]] = &[
    HELP,
    ingest::HELP,
    endpoint::HELP,
    crate::local::events::HELP,
    pipeline::HELP,
    outbox::HELP,
    uplink::HELP,
    crate::deploy::events::HELP,
];

/// Metrics of [`TABLES`] that always carry labels: never registered bare.
const LABELLED: &[&str] = &[
    ingest::RECEIVED_TOTAL,
    ingest::ACKS_SENT_TOTAL,
    ingest::RESENDS_TOTAL,
    ingest::POSSIBLE_DUPLICATES_TOTAL,
    ingest::MARKS_EVICTED_TOTAL,
    endpoint::CONNECTIONS_REFUSED,
    crate::local::events::DROPPED_TOTAL,
    pipeline::REFUSED_TOTAL,
    pipeline::BREAKER_OPENED_TOTAL,
    pipeline::HELD_TOTAL,
    pipeline::SWAPS_TOTAL,
    pipeline::DEAD_LETTERS_TOTAL,
    uplink::CONNECTS_TOTAL,
    uplink::CONNECT_FAILURES_TOTAL,
    uplink::DISCONNECTS_TOTAL,
    crate::deploy::events::DEPLOYMENTS_TOTAL,
];

/// Labelled series whose label values are known before any event.
const AT_START: &[Series] = &[
    (ingest::RECEIVED_TOTAL, &[("source", "endpoint")]),
    (ingest::RECEIVED_TOTAL, &[("source", "broker")]),
    (ingest::ACKS_SENT_TOTAL, &[("source", "endpoint")]),
    (ingest::ACKS_SENT_TOTAL, &[("source", "broker")]),
    (ingest::RESENDS_TOTAL, &[("source", "endpoint")]),
    (ingest::RESENDS_TOTAL, &[("source", "broker")]),
    (ingest::POSSIBLE_DUPLICATES_TOTAL, &[("source", "endpoint")]),
    (ingest::POSSIBLE_DUPLICATES_TOTAL, &[("source", "broker")]),
    (uplink::CONNECTS_TOTAL, &[("transport", "quic")]),
    (uplink::CONNECTS_TOTAL, &[("transport", "tcp")]),
    (uplink::CONNECT_FAILURES_TOTAL, &[("transport", "quic")]),
    (uplink::CONNECT_FAILURES_TOTAL, &[("transport", "tcp")]),
];

/// Registers every HELP text, the build, and every series known at start
/// at zero (idempotent: values set since are kept).
pub fn describe() {
    // The recorder first: whatever is described or registered before it
    // exists goes to the no-op recorder and is lost.
    let _ = fogline_telemetry::prometheus_handle();
    fogline_telemetry::help::describe(HELP);
    ingest::describe();
    endpoint::describe();
    fogline_telemetry::help::describe(crate::local::events::HELP);
    pipeline::describe();
    outbox::describe();
    uplink::describe();
    fogline_telemetry::help::describe(crate::deploy::events::HELP);
    fogline_telemetry::register_build_info(
        env!("CARGO_PKG_VERSION"),
        option_env!("FOGLINE_GIT_SHA"),
    );
    let all = all_help();
    let bare: Vec<Series> = all
        .iter()
        .filter(|(name, _, _)| !LABELLED.contains(name))
        .map(|(name, _, _)| (*name, &[][..]))
        .collect();
    register_zero(&all, &bare);
    register_zero(&all, AT_START);
    metrics::counter!(crate::clock::CLOCK_STEPS_TOTAL).increment(0);
}

/// [`TABLES`] as one table.
fn all_help() -> Vec<Help> {
    TABLES.iter().flat_map(|t| t.iter().copied()).collect()
}

/// Registers each configured function's series at zero: per function,
/// and per `pipeline/function` for the breaker's.
pub fn describe_functions(config: &crate::config::EdgeConfig) {
    use crate::functions::events::*;
    for p in &config.pipelines {
        for f in &p.functions {
            let owner = format!("{}/{f}", p.name);
            metrics::counter!(pipeline::BREAKER_OPENED_TOTAL, "function" => owner).increment(0);
        }
    }
    for f in config.functions.keys() {
        for kind in ["process", "tick"] {
            metrics::counter!(CALLS_TOTAL, "function" => f.clone(), "kind" => kind).increment(0);
        }
        let _ = metrics::histogram!(CALL_SECONDS, "function" => f.clone());
        let _ = metrics::histogram!(CALL_CPU_SECONDS, "function" => f.clone());
        metrics::counter!(RESTARTS_TOTAL, "function" => f.clone()).increment(0);
        metrics::gauge!(STATE_BYTES, "function" => f.clone()).increment(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorder keeps the first HELP given for a name: a second entry
    /// would be dead text.
    #[test]
    fn every_metric_has_one_help_and_every_listed_name_has_one() {
        let required = LABELLED
            .iter()
            .copied()
            .chain(AT_START.iter().map(|(n, _)| *n));
        let problems = fogline_telemetry::help::help_problems(&all_help(), required);
        assert!(problems.is_empty(), "{problems:?}");
    }
}
