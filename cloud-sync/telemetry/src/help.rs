//! HELP text for metrics: each daemon lists its metrics in one table
//! (`metrics_help.rs`) and registers it at start, so Prometheus shows a
//! `# HELP` line for every one.

/// Kind of a metric, for its `describe_*` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution.
    Histogram,
}

/// One metric: name, kind, HELP text.
pub type Help = (&'static str, Kind, &'static str);

/// Registers every HELP text of `table` (idempotent).
pub fn describe(table: &[Help]) {
    for (name, kind, help) in table {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
            Kind::Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
}
