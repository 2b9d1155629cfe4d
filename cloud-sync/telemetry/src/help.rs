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

/// A series known before any event: a name and its labels (none, a
/// source, a transport).
pub type Series = (&'static str, &'static [(&'static str, &'static str)]);

/// What is wrong with a process's HELP tables: a name with two entries (the
/// recorder keeps the first, so the second is dead text), or a name in
/// `required` with none. Empty when all is well; for each binary's test.
pub fn help_problems<'a>(
    table: &[Help],
    required: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let mut names: Vec<&str> = table.iter().map(|(n, _, _)| *n).collect();
    names.sort_unstable();
    let mut problems: Vec<String> = names
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| format!("{} has two HELP entries", w[0]))
        .collect();
    names.dedup();
    problems.extend(
        required
            .into_iter()
            .filter(|n| names.binary_search(n).is_err())
            .map(|n| format!("{n} has no HELP")),
    );
    problems
}

/// Registers each series at zero, as the kind `table` gives its name, so a
/// dashboard sees it — and a rate starts at 0 — before its first event.
/// `increment(0)` changes no value set since: this may run again, on a
/// daemon restart. A histogram is rendered with empty buckets.
pub fn register_zero(table: &[Help], series: &[Series]) {
    for (name, labels) in series {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, *v))
            .collect();
        match table.iter().find(|(n, _, _)| n == name).map(|(_, k, _)| k) {
            Some(Kind::Gauge) => metrics::gauge!(*name, labels).increment(0.0),
            Some(Kind::Histogram) => {
                let _ = metrics::histogram!(*name, labels);
            }
            Some(Kind::Counter) | None => metrics::counter!(*name, labels).increment(0),
        }
    }
}

#[cfg(test)]
mod help_problems_tests {
    use super::*;

    #[test]
    fn two_entries_and_missing_names_are_reported() {
        let table: &[Help] = &[
            ("a_total", Kind::Counter, "A."),
            ("b_total", Kind::Counter, "B."),
            ("a_total", Kind::Counter, "A again."),
        ];
        assert_eq!(
            help_problems(table, ["b_total", "c_total"]),
            vec!["a_total has two HELP entries", "c_total has no HELP"]
        );
        assert!(help_problems(&table[..2], ["a_total"]).is_empty());
    }
}
