//! Telemetry of the outbox as named events; metric names as constants.
//! Commits are counted by the pipeline (`pipeline/events.rs`), deletes by
//! the uplink (`uplink/events.rs`), losses in `losses.rs`.

use fogline_telemetry::help::{Help, Kind::*};

use super::losses::LOSSES_TOTAL;
use super::salvage::Salvage;

/// Times a damaged outbox was salvaged into a new file.
pub const SALVAGED_TOTAL: &str = "fogline_outbox_salvaged_total";
/// Times the reserve file was given back on a full disk.
pub const RESERVE_RELEASED_TOTAL: &str = "fogline_outbox_reserve_released_total";

/// HELP texts: name, kind, text.
pub const HELP: &[Help] = &[
    (
        SALVAGED_TOTAL,
        Counter,
        "Times a damaged outbox was salvaged into a new file.",
    ),
    (
        RESERVE_RELEASED_TOTAL,
        Counter,
        "Times the outbox's reserve file was given back on a full disk.",
    ),
];

/// HELP texts, registered once per process.
pub fn describe() {
    fogline_telemetry::help::describe(HELP);
}

/// A damaged outbox was salvaged into a new file (I-31); what could not be
/// read is lost, as `corrupt`.
pub struct Salvaged<'a> {
    /// What was kept and lost.
    pub salvage: &'a Salvage,
}

impl Salvaged<'_> {
    /// Log and count it.
    pub fn emit(&self) {
        let s = self.salvage;
        metrics::counter!(SALVAGED_TOTAL).increment(1);
        metrics::counter!(LOSSES_TOTAL, "reason" => "corrupt").increment(s.lost_records());
        tracing::error!(
            kept = s.records,
            lost = s.lost_records(),
            lost_seqs = %s.lost_ranges(),
            unreadable = %s.unreadable.join("; "),
            damaged_file = %s.kept_as.display(),
            incarnation = format_args!("{:#x}", s.incarnation),
            new_incarnation = s.new_incarnation,
            "Outbox salvaged: replication goes on from the new file; the loss is recorded as an alarm."
        );
    }
}
