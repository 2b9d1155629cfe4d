//! One health shape for both daemons: `/healthz` answers it (200 when
//! healthy, 503 otherwise) and `status` prints it. Each problem says which
//! part, what kind, since when and why — with the numbers.
//!
//! ```json
//! {"status": "unhealthy", "problems": [{"component": "uplink", "kind": "refused",
//!   "since_ms": 1764000000000, "detail": "the aggregator refuses this node: ..."}]}
//! ```

use serde::{Deserialize, Serialize};

/// The daemon's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Nothing is wrong.
    Ok,
    /// At least one problem: see the list.
    Unhealthy,
}

/// Which part of the daemon a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// The edge's pipeline (commits into the outbox).
    Pipeline,
    /// One of the edge's functions.
    Function,
    /// The edge's uplink to the aggregator.
    Uplink,
    /// The edge's outbox (its SQLite file).
    Outbox,
    /// The aggregator's store.
    Store,
    /// The wall clock.
    Clock,
}

/// What kind of problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// Work waits and nothing moves.
    Wedged,
    /// The disk is full (or below the reserve kept for draining).
    DiskFull,
    /// Reads or writes fail (I/O errors, a locked or unreadable file).
    StoreError,
    /// The database file is damaged.
    Corrupt,
    /// A function's breaker is open: its inputs are held.
    Suspended,
    /// The peer refuses this node (certificate rejected, revoked, expired).
    Refused,
    /// Sessions end before they make progress.
    Flapping,
    /// The peer cannot be reached.
    Unreachable,
    /// Connected, data in flight, no acknowledgement.
    Stalled,
    /// The wall clock looks wrong.
    ClockWrong,
    /// A buffer quota whose policy is `block` is reached: nothing more is
    /// acknowledged until it drains.
    QuotaFull,
}

/// One problem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// Where.
    pub component: Component,
    /// What.
    pub kind: ProblemKind,
    /// Since when (ms since the Unix epoch).
    pub since_ms: u64,
    /// Why, in words, with the numbers.
    pub detail: String,
}

impl Problem {
    /// A problem in `component` of `kind` since `since_ms`.
    pub fn new(
        component: Component,
        kind: ProblemKind,
        since_ms: u64,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            component,
            kind,
            since_ms,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            name(&self.component),
            name(&self.kind),
            self.detail
        )
    }
}

/// A unit variant's name as it is serialized (`disk_full`).
fn name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".into(),
    }
}

/// What `/healthz` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok` or `unhealthy`.
    pub status: HealthStatus,
    /// Empty when `ok`.
    #[serde(default)]
    pub problems: Vec<Problem>,
}

impl Health {
    /// Healthy exactly when there are no problems.
    pub fn of(problems: Vec<Problem>) -> Self {
        let status = if problems.is_empty() {
            HealthStatus::Ok
        } else {
            HealthStatus::Unhealthy
        };
        Self { status, problems }
    }

    /// The HTTP status `/healthz` answers with: 200 or 503.
    pub fn http_status(&self) -> u16 {
        match self.status {
            HealthStatus::Ok => 200,
            HealthStatus::Unhealthy => 503,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_shape_both_daemons_answer() {
        assert_eq!(Health::of(vec![]).http_status(), 200);
        let h = Health::of(vec![Problem::new(
            Component::Uplink,
            ProblemKind::Refused,
            5,
            "certificate revoked",
        )]);
        assert_eq!(h.http_status(), 503);
        let v = serde_json::to_value(&h).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"status": "unhealthy", "problems": [
                {"component": "uplink", "kind": "refused", "since_ms": 5, "detail": "certificate revoked"}
            ]})
        );
        assert_eq!(serde_json::from_value::<Health>(v).unwrap(), h);
        assert_eq!(
            h.problems[0].to_string(),
            "uplink refused: certificate revoked"
        );
        assert_eq!(
            serde_json::to_value(Health::of(vec![])).unwrap(),
            serde_json::json!({"status": "ok", "problems": []})
        );
    }
}
