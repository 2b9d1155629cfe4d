//! Telemetry of the uplink as named events; metric names as constants. The
//! uplink deletes what the aggregator acknowledged, so the outbox's delete
//! failures are counted here.

use fogline_telemetry::help::{Help, Kind::*};

/// 1 while a session with the aggregator is up.
pub const CONNECTED: &str = "fogline_uplink_connected";
/// Highest outbox sequence the aggregator acknowledged.
pub const ACKED_SEQ: &str = "fogline_uplink_acked_seq";
/// Sessions established, by `transport` (`quic`, `tcp`).
pub const CONNECTS_TOTAL: &str = "fogline_uplink_connects_total";
/// Connection attempts that failed, by `transport`.
pub const CONNECT_FAILURES_TOTAL: &str = "fogline_uplink_connect_failures_total";
/// Sessions ended, by `reason` (`silent`, `stalled`, `refused`, ...).
pub const DISCONNECTS_TOTAL: &str = "fogline_uplink_disconnects_total";
/// Fresh connections tried alongside a silent session.
pub const PROBES_TOTAL: &str = "fogline_uplink_probes_total";
/// Sessions moved to a probe's connection.
pub const PROBE_SWITCHES_TOTAL: &str = "fogline_uplink_probe_switches_total";
/// Sessions whose Hello went out as 0-RTT data.
pub const ZERO_RTT_TOTAL: &str = "fogline_uplink_zero_rtt_total";
/// Records sent in batches (resends included).
pub const RECORDS_SENT_TOTAL: &str = "fogline_uplink_records_sent_total";
/// Frame bytes of batches sent.
pub const BYTES_SENT_TOTAL: &str = "fogline_uplink_bytes_sent_total";
/// Records acknowledged by the aggregator and deleted.
pub const RECORDS_ACKED_TOTAL: &str = "fogline_uplink_records_acked_total";
/// Times the aggregator's cursor was behind its acknowledgements.
pub const CURSOR_REGRESSIONS_TOTAL: &str = "fogline_uplink_cursor_regressions_total";
/// Times buffered records were renumbered above another outbox's cursor.
pub const RENUMBERED_TOTAL: &str = "fogline_uplink_renumbered_total";
/// Deletes of acknowledged records that failed.
pub const DELETE_FAILURES_TOTAL: &str = "fogline_outbox_delete_failures_total";

/// HELP texts: name, kind, text.
pub const HELP: &[Help] = &[
    (
        CONNECTED,
        Gauge,
        "1 while a session with the aggregator is up.",
    ),
    (
        ACKED_SEQ,
        Gauge,
        "Highest outbox sequence the aggregator acknowledged.",
    ),
    (
        CONNECTS_TOTAL,
        Counter,
        "Sessions established, by transport.",
    ),
    (
        CONNECT_FAILURES_TOTAL,
        Counter,
        "Connection attempts that failed, by transport.",
    ),
    (
        DISCONNECTS_TOTAL,
        Counter,
        "Sessions ended, by reason (silent, stalled, refused, ...).",
    ),
    (
        PROBES_TOTAL,
        Counter,
        "Fresh connections tried alongside a silent session.",
    ),
    (
        PROBE_SWITCHES_TOTAL,
        Counter,
        "Sessions moved to a probe's connection.",
    ),
    (
        ZERO_RTT_TOTAL,
        Counter,
        "Sessions whose Hello went out as 0-RTT data.",
    ),
    (
        RECORDS_SENT_TOTAL,
        Counter,
        "Records sent in batches (resends included).",
    ),
    (
        BYTES_SENT_TOTAL,
        Counter,
        "Frame bytes sent to the aggregator.",
    ),
    (
        RECORDS_ACKED_TOTAL,
        Counter,
        "Records acknowledged by the aggregator and deleted.",
    ),
    (
        CURSOR_REGRESSIONS_TOTAL,
        Counter,
        "Times the aggregator's cursor was behind its acknowledgements (records lost there).",
    ),
    (
        RENUMBERED_TOTAL,
        Counter,
        "Times buffered records were renumbered above another outbox's cursor.",
    ),
    (
        DELETE_FAILURES_TOTAL,
        Counter,
        "Deletes of acknowledged records that failed (retried by the next).",
    ),
];

/// HELP texts, registered once per process.
pub fn describe() {
    fogline_telemetry::help::describe(HELP);
}

/// A session with the aggregator is established.
pub struct Connected {
    /// `quic` or `tcp`.
    pub transport: &'static str,
    /// Whether its Hello went out as 0-RTT data.
    pub zero_rtt: bool,
}

impl Connected {
    /// Count it.
    pub fn emit(&self) {
        metrics::counter!(CONNECTS_TOTAL, "transport" => self.transport).increment(1);
        if self.zero_rtt {
            metrics::counter!(ZERO_RTT_TOTAL).increment(1);
        }
    }
}

/// A batch was queued for sending.
pub struct BatchSent {
    /// Records in it.
    pub records: u32,
    /// Its frame's bytes.
    pub bytes: usize,
}

impl BatchSent {
    /// Count it.
    pub fn emit(&self) {
        metrics::counter!(RECORDS_SENT_TOTAL).increment(u64::from(self.records));
        metrics::counter!(BYTES_SENT_TOTAL).increment(self.bytes as u64);
    }
}
