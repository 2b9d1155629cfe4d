//! HELP text for every metric the edge daemon exports (Prometheus shows it
//! with `# HELP`), registered once at start, and the series registered at
//! zero then, so dashboards and rates see them before their first event.
//! Functions' and the pipeline's own HELP live with their events.

use crate::ingest::endpoint::events as endpoint;
use fogline_telemetry::help::{register_zero, Help, Kind::*, Series};

/// Free bytes on the outbox's filesystem, read at each scrape.
pub const OUTBOX_DISK_FREE_BYTES: &str = "fogline_outbox_disk_free_bytes";

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
        "fogline_ingest_received_total",
        Counter,
        "Messages received, by source (endpoint or broker).",
    ),
    (
        "fogline_ingest_acks_sent_total",
        Counter,
        "PUBACKs and PUBRECs sent after their commit.",
    ),
    (
        "fogline_ingest_resends_total",
        Counter,
        "Resends recognised and not stored again.",
    ),
    (
        "fogline_ingest_possible_duplicates_total",
        Counter,
        "Messages that may repeat one already stored (QoS 1 after lost state).",
    ),
    (
        "fogline_ingest_marks_evicted_total",
        Counter,
        "QoS 1 redelivery marks dropped to stay within bounds.",
    ),
    (
        "fogline_ingest_auth_failures_total",
        Counter,
        "MQTT connections refused for bad credentials.",
    ),
    (
        "fogline_ingest_connections_total",
        Counter,
        "MQTT connections accepted by the endpoint.",
    ),
    (
        endpoint::CONNECTIONS_REFUSED,
        Counter,
        "MQTT connections refused or cut, by reason: a CONNACK reason, or per_ip, rate, max_connections, budget, connect_timeout, idle, auth_busy (I-34).",
    ),
    (
        endpoint::PRECONNECT_BYTES,
        Gauge,
        "Bytes buffered by MQTT connections still before their CONNECT (out of ingest.max_pending_bytes, at most broker.max_preconnect_bytes).",
    ),
    (
        endpoint::PRECONNECT_CONNECTIONS,
        Gauge,
        "MQTT connections accepted and not yet past CONNECT (TLS handshake included).",
    ),
    (
        endpoint::PENDING_WILL_BYTES,
        Gauge,
        "Bytes of will messages waiting for their delay (at most broker.max_pending_will_bytes).",
    ),
    (
        endpoint::WILLS_HURRIED,
        Counter,
        "Will messages published before their delay because broker.max_pending_will_bytes was spent.",
    ),
    (
        "fogline_ingest_connection_errors_total",
        Counter,
        "MQTT connections that ended in an error.",
    ),
    (
        "fogline_ingest_protocol_errors_total",
        Counter,
        "Malformed or forbidden MQTT packets.",
    ),
    (
        "fogline_ingest_sessions_expired_total",
        Counter,
        "MQTT sessions expired.",
    ),
    (
        "fogline_ingest_subscribes_refused_total",
        Counter,
        "SUBSCRIBEs the endpoint refused.",
    ),
    (
        "fogline_ingest_subscriptions_refused_total",
        Counter,
        "Subscriptions the external broker refused.",
    ),
    (
        "fogline_ingest_tls_handshake_failures_total",
        Counter,
        "TLS handshakes of MQTT clients that failed.",
    ),
    (
        "fogline_ingest_unrouted_total",
        Counter,
        "Messages whose topic no pipeline takes.",
    ),
    (
        endpoint::WILLS,
        Counter,
        "Will messages published.",
    ),
    (
        "fogline_ingest_broker_connected",
        Gauge,
        "1 while connected to the external MQTT broker.",
    ),
    (
        "fogline_ingest_clients",
        Gauge,
        "MQTT clients connected to the endpoint.",
    ),
    (
        "fogline_pipeline_messages_in_total",
        Counter,
        "Messages taken into pipeline batches.",
    ),
    (
        "fogline_outbox_commit_seconds",
        Histogram,
        "Time to commit one batch into the outbox, fsync included.",
    ),
    (
        "fogline_ingest_refused_total",
        Counter,
        "Messages refused at ingest (a topic or payload over a limit) and kept as dead letters, by check.",
    ),
    (
        OUTBOX_DISK_FREE_BYTES,
        Gauge,
        "Bytes free (for unprivileged writers) on the filesystem holding the outbox, read at each scrape.",
    ),
    (
        "fogline_outbox_salvaged_total",
        Counter,
        "Times a damaged outbox was salvaged into a new file.",
    ),
    (
        "fogline_outbox_records_lost_total",
        Counter,
        "Records that could not be read back from a damaged outbox (each recorded as an alarm).",
    ),
    (
        "fogline_outbox_commit_failures_total",
        Counter,
        "Outbox commits that failed (full disk, I/O) and were retried.",
    ),
    (
        "fogline_outbox_records_written_total",
        Counter,
        "Records committed into the outbox.",
    ),
    (
        "fogline_outbox_dead_letters_written_total",
        Counter,
        "Dead letters committed into the outbox.",
    ),
    (
        "fogline_outbox_delete_failures_total",
        Counter,
        "Deletes of acknowledged records that failed (retried by the next).",
    ),
    (
        "fogline_outbox_reserve_released_total",
        Counter,
        "Times the outbox's reserve file was given back on a full disk.",
    ),
    (
        "fogline_uplink_connected",
        Gauge,
        "1 while a session with the aggregator is up.",
    ),
    (
        "fogline_uplink_acked_seq",
        Gauge,
        "Highest outbox sequence the aggregator acknowledged.",
    ),
    (
        "fogline_uplink_connects_total",
        Counter,
        "Sessions established, by transport.",
    ),
    (
        "fogline_uplink_connect_failures_total",
        Counter,
        "Connection attempts that failed, by transport.",
    ),
    (
        "fogline_uplink_disconnects_total",
        Counter,
        "Sessions ended, by reason (silent, stalled, refused, ...).",
    ),
    (
        "fogline_uplink_probes_total",
        Counter,
        "Fresh connections tried alongside a silent session.",
    ),
    (
        "fogline_uplink_probe_switches_total",
        Counter,
        "Sessions moved to a probe's connection.",
    ),
    (
        "fogline_uplink_zero_rtt_total",
        Counter,
        "Sessions whose Hello went out as 0-RTT data.",
    ),
    (
        "fogline_uplink_records_sent_total",
        Counter,
        "Records sent in batches (resends included).",
    ),
    (
        "fogline_uplink_bytes_sent_total",
        Counter,
        "Frame bytes sent to the aggregator.",
    ),
    (
        "fogline_uplink_records_acked_total",
        Counter,
        "Records acknowledged by the aggregator and deleted.",
    ),
    (
        "fogline_uplink_cursor_regressions_total",
        Counter,
        "Times the aggregator's cursor was behind its acknowledgements (records lost there).",
    ),
    (
        "fogline_uplink_renumbered_total",
        Counter,
        "Times buffered records were renumbered above another outbox's cursor.",
    ),
];

/// Metrics of [`HELP`] that always carry labels: never registered bare.
const LABELLED: &[&str] = &[
    "fogline_ingest_received_total",
    "fogline_ingest_acks_sent_total",
    "fogline_ingest_resends_total",
    "fogline_ingest_possible_duplicates_total",
    "fogline_ingest_marks_evicted_total",
    "fogline_ingest_connections_refused_total",
    "fogline_ingest_refused_total",
    "fogline_uplink_connects_total",
    "fogline_uplink_connect_failures_total",
    "fogline_uplink_disconnects_total",
];

/// Labelled series whose label values are known before any event.
const AT_START: &[Series] = &[
    ("fogline_ingest_received_total", &[("source", "endpoint")]),
    ("fogline_ingest_received_total", &[("source", "broker")]),
    ("fogline_ingest_acks_sent_total", &[("source", "endpoint")]),
    ("fogline_ingest_acks_sent_total", &[("source", "broker")]),
    ("fogline_ingest_resends_total", &[("source", "endpoint")]),
    ("fogline_ingest_resends_total", &[("source", "broker")]),
    (
        "fogline_ingest_possible_duplicates_total",
        &[("source", "endpoint")],
    ),
    (
        "fogline_ingest_possible_duplicates_total",
        &[("source", "broker")],
    ),
    ("fogline_uplink_connects_total", &[("transport", "quic")]),
    ("fogline_uplink_connects_total", &[("transport", "tcp")]),
    (
        "fogline_uplink_connect_failures_total",
        &[("transport", "quic")],
    ),
    (
        "fogline_uplink_connect_failures_total",
        &[("transport", "tcp")],
    ),
];

/// Registers every HELP text, the build, and every series known at start
/// at zero (idempotent: values set since are kept).
pub fn describe() {
    // The recorder first: whatever is described or registered before it
    // exists goes to the no-op recorder and is lost.
    let _ = fogline_telemetry::prometheus_handle();
    fogline_telemetry::help::describe(HELP);
    crate::pipeline::events::describe();
    fogline_telemetry::register_build_info(
        env!("CARGO_PKG_VERSION"),
        option_env!("FOGLINE_GIT_SHA"),
    );
    let bare: Vec<Series> = HELP
        .iter()
        .filter(|(name, _, _)| !LABELLED.contains(name))
        .map(|(name, _, _)| (*name, &[][..]))
        .collect();
    register_zero(HELP, &bare);
    register_zero(HELP, AT_START);
    metrics::counter!(crate::clock::CLOCK_STEPS_TOTAL).increment(0);
}

/// Registers each configured function's series at zero: per function,
/// and per `pipeline/function` for the breaker's.
pub fn describe_functions(config: &crate::config::EdgeConfig) {
    use crate::functions::events::*;
    for p in &config.pipelines {
        for f in &p.functions {
            let owner = format!("{}/{f}", p.name);
            metrics::counter!(crate::pipeline::events::BREAKER_OPENED_TOTAL, "function" => owner)
                .increment(0);
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
