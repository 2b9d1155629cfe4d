//! Telemetry of the pipeline as named events; metric names as constants.
//! The pipeline worker commits into the outbox and checks what ingest
//! hands it, so the outbox's commit metrics and ingest's refusals are
//! counted here.

use std::time::Duration;

use fogline_telemetry::help::{Help, Kind::*};

use crate::outbox::DeadLetter;

/// Times a function's circuit breaker opened, by `pipeline/function`.
pub const BREAKER_OPENED_TOTAL: &str = "fogline_function_breaker_opened_total";
/// Inputs parked behind an open breaker, by `pipeline/function`.
pub const HELD_TOTAL: &str = "fogline_function_held_total";
/// Versions promoted after probation or rolled back, by `pipeline/function`
/// and outcome (`promoted`, `rolled_back`).
pub const SWAPS_TOTAL: &str = "fogline_function_swaps_total";
/// Dead letters written, by pipeline, function and reason.
pub const DEAD_LETTERS_TOTAL: &str = "fogline_pipeline_dead_letters_total";
/// Messages taken into batches.
pub const MESSAGES_IN_TOTAL: &str = "fogline_pipeline_messages_in_total";
/// Messages whose topic no pipeline takes.
pub const UNROUTED_TOTAL: &str = "fogline_ingest_unrouted_total";
/// Messages refused at ingest and kept as dead letters, by `check` (the
/// limit they broke).
pub const REFUSED_TOTAL: &str = "fogline_ingest_refused_total";
/// Time to commit one batch into the outbox: a histogram.
pub const COMMIT_SECONDS: &str = "fogline_outbox_commit_seconds";
/// Outbox commits that failed (each retry counts).
pub const COMMIT_FAILURES_TOTAL: &str = "fogline_outbox_commit_failures_total";
/// Records committed into the outbox.
pub const RECORDS_WRITTEN_TOTAL: &str = "fogline_outbox_records_written_total";
/// Dead letters committed into the outbox.
pub const DEAD_LETTERS_WRITTEN_TOTAL: &str = "fogline_outbox_dead_letters_written_total";

/// HELP texts: name, kind, text.
pub const HELP: &[Help] = &[
    (
        BREAKER_OPENED_TOTAL,
        Counter,
        "Times a function's circuit breaker opened after repeated failures.",
    ),
    (
        HELD_TOTAL,
        Counter,
        "Inputs parked in the outbox behind a function's open circuit breaker.",
    ),
    (
        SWAPS_TOTAL,
        Counter,
        "New function versions promoted after probation, or rolled back.",
    ),
    (
        DEAD_LETTERS_TOTAL,
        Counter,
        "Dead letters written, by pipeline, function and reason.",
    ),
    (
        MESSAGES_IN_TOTAL,
        Counter,
        "Messages taken into pipeline batches.",
    ),
    (
        UNROUTED_TOTAL,
        Counter,
        "Messages whose topic no pipeline takes.",
    ),
    (
        REFUSED_TOTAL,
        Counter,
        "Messages refused at ingest (a topic or payload over a limit) and kept as dead letters, by check.",
    ),
    (
        COMMIT_SECONDS,
        Histogram,
        "Time to commit one batch into the outbox, fsync included.",
    ),
    (
        COMMIT_FAILURES_TOTAL,
        Counter,
        "Outbox commits that failed (full disk, I/O) and were retried.",
    ),
    (
        RECORDS_WRITTEN_TOTAL,
        Counter,
        "Records committed into the outbox.",
    ),
    (
        DEAD_LETTERS_WRITTEN_TOTAL,
        Counter,
        "Dead letters committed into the outbox.",
    ),
];

/// HELP texts, registered once per process.
pub fn describe() {
    fogline_telemetry::help::describe(HELP);
}

/// A message ingest handed over broke a limit the protocol or the config
/// sets (topic, payload): refused, kept as a dead letter.
pub struct MessageRefused<'a> {
    /// The dead letter it became; its `function` names the check.
    pub dead: &'a DeadLetter,
}

impl MessageRefused<'_> {
    /// Log and count it.
    pub fn emit(&self) {
        metrics::counter!(REFUSED_TOTAL, "check" => self.dead.function.clone()).increment(1);
        tracing::warn!(stream = %self.dead.message.stream, error = %self.dead.error, "Message refused at ingest; kept as a dead letter.");
    }
}

/// A batch's commit into the outbox succeeded.
pub struct BatchCommitted {
    /// Records written.
    pub records: usize,
    /// Dead letters written.
    pub dead_letters: usize,
    /// Time the commit took, fsync included.
    pub elapsed: Duration,
}

impl BatchCommitted {
    /// Count it.
    pub fn emit(&self) {
        metrics::histogram!(COMMIT_SECONDS).record(self.elapsed.as_secs_f64());
        metrics::counter!(RECORDS_WRITTEN_TOTAL).increment(self.records as u64);
        metrics::counter!(DEAD_LETTERS_WRITTEN_TOTAL).increment(self.dead_letters as u64);
    }
}

/// A breaker opened.
pub struct BreakerOpened<'a> {
    /// `pipeline/function`.
    pub owner: &'a str,
}

impl BreakerOpened<'_> {
    /// Count it.
    pub fn emit(&self) {
        metrics::counter!(BREAKER_OPENED_TOTAL, "function" => self.owner.to_string()).increment(1);
    }
}

/// A candidate version was promoted or rolled back.
pub struct Swapped<'a> {
    /// `pipeline/function`.
    pub owner: &'a str,
    /// `promoted` or `rolled_back`.
    pub outcome: &'static str,
}

impl Swapped<'_> {
    /// Count it.
    pub fn emit(&self) {
        metrics::counter!(SWAPS_TOTAL, "function" => self.owner.to_string(), "outcome" => self.outcome)
            .increment(1);
    }
}
