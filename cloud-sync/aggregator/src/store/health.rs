//! The store as `/healthz` sees it: failures of the service's reads and
//! writes, kept from the first of a run until one works again. While the
//! store fails nothing is acknowledged (the session closes on a store
//! error) — the health says why, since when, how often.

use std::sync::Mutex;

use fogline_telemetry::health::{Component, Problem, ProblemKind};

use super::StoreError;

impl StoreError {
    /// The kind of problem this is: a full disk, a damaged file, or another
    /// failure.
    pub fn kind(&self) -> ProblemKind {
        let source = match self {
            StoreError::Open { source, .. } | StoreError::Query { source, .. } => source,
            StoreError::Postgres { source, .. } => {
                use tokio_postgres::error::SqlState;
                return match source.code() {
                    Some(c) if *c == SqlState::DISK_FULL => ProblemKind::DiskFull,
                    Some(c)
                        if *c == SqlState::DATA_CORRUPTED || *c == SqlState::INDEX_CORRUPTED =>
                    {
                        ProblemKind::Corrupt
                    }
                    _ => ProblemKind::StoreError,
                };
            }
            StoreError::Group { kind, .. } => return *kind,
            _ => return ProblemKind::StoreError,
        };
        match source {
            rusqlite::Error::SqliteFailure(e, _) => match e.code {
                rusqlite::ErrorCode::DiskFull => ProblemKind::DiskFull,
                rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase => {
                    ProblemKind::Corrupt
                }
                _ => ProblemKind::StoreError,
            },
            _ => ProblemKind::StoreError,
        }
    }
}

/// A run of store failures.
#[derive(Debug, Clone)]
struct Run {
    kind: ProblemKind,
    since_ms: u64,
    count: u64,
    last: String,
}

/// Store failures seen by the service.
#[derive(Debug, Default)]
pub struct StoreHealth {
    run: Mutex<Option<Run>>,
}

impl StoreHealth {
    /// A read or write failed with `e` at `now_ms`.
    pub fn failed(&self, e: &StoreError, now_ms: u64) {
        metrics::counter!(super::events::FAILURES_TOTAL, "kind" => kind_label(e.kind()))
            .increment(1);
        if let Ok(mut run) = self.run.lock() {
            let (since_ms, count) = run.as_ref().map_or((now_ms, 0), |r| (r.since_ms, r.count));
            *run = Some(Run {
                kind: e.kind(),
                since_ms,
                count: count + 1,
                last: e.to_string(),
            });
        }
    }

    /// A write committed: the run is over.
    pub fn worked(&self) {
        if let Ok(mut run) = self.run.lock() {
            *run = None;
        }
    }

    /// What `/healthz` reports.
    pub fn problems(&self) -> Vec<Problem> {
        let Ok(run) = self.run.lock() else {
            return Vec::new();
        };
        run.iter()
            .map(|r| {
                Problem::new(
                    Component::Store,
                    r.kind,
                    r.since_ms,
                    format!(
                        "{} failure(s), nothing acknowledged meanwhile; the latest: {}",
                        r.count, r.last
                    ),
                )
            })
            .collect()
    }
}

fn kind_label(kind: ProblemKind) -> &'static str {
    match kind {
        ProblemKind::DiskFull => "disk_full",
        ProblemKind::Corrupt => "corrupt",
        _ => "error",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sqlite(code: i32) -> StoreError {
        StoreError::Query {
            op: "apply",
            node: Some("n1".into()),
            source: rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None),
        }
    }

    #[test]
    fn a_run_of_failures_until_one_write_works() {
        let h = StoreHealth::default();
        assert!(h.problems().is_empty());
        h.failed(&sqlite(rusqlite::ffi::SQLITE_FULL), 10);
        h.failed(&sqlite(rusqlite::ffi::SQLITE_CORRUPT), 20);
        let p = h.problems();
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].kind, p[0].since_ms), (ProblemKind::Corrupt, 10));
        assert!(p[0].detail.starts_with("2 failure(s)"), "{}", p[0].detail);
        h.worked();
        assert!(h.problems().is_empty());
        assert_eq!(
            sqlite(rusqlite::ffi::SQLITE_IOERR).kind(),
            ProblemKind::StoreError
        );
    }
}
