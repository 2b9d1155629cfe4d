//! Where applied records live. [`Store`] is what the transport and HTTP API
//! need, async; [`SqliteStore`] is the embedded implementation (its blocking
//! work runs on tokio's blocking pool) and [`PostgresStore`] the one several
//! aggregators share. Both pass the same contract suite
//! (`tests/store_contract.rs`).
//!
//! **Invariants:** `apply` inserts the records above the node's cursor and
//! advances the cursor in ONE transaction; a record at or below the cursor is
//! never inserted again (I-3); the cursor only moves forward. Every apply
//! checks, in its transaction, that the caller still holds the node's lease
//! (its fencing token is the newest): of two aggregators that both believe
//! they serve a node, only the later taker applies (I-36). The store knows
//! nothing about QUIC or frames.

pub mod events;
pub mod health;
pub(crate) mod postgres;
pub mod sqlite;

pub use postgres::{redact as redact_url, PostgresOptions, PostgresStore};
pub use sqlite::SqliteStore;

use std::future::Future;
use std::pin::Pin;

use fogline_protocol::session::StoredCursor;
use fogline_protocol::DecodedBatch;

/// What a [`Store`] method returns: a future that owns what it needs.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The right to apply a node's batches, until another aggregator (or
/// another session of this one) takes the node's lease: `token` is the
/// fencing token every apply checks (I-36).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The node.
    pub node: String,
    /// Fencing token: each take of the node's lease gets a higher one.
    pub token: u64,
}

/// A node's lease as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeaseInfo {
    /// The node.
    pub node: String,
    /// The newest fencing token.
    pub token: u64,
    /// The aggregator holding it, if not released.
    pub holder: Option<String>,
    /// When it was taken or released (ms since the Unix epoch).
    pub since_ms: u64,
}

/// Largest `limit` accepted by [`Store::records`].
pub const MAX_QUERY_LIMIT: usize = 10_000;

/// Most streams [`Store::latest`] answers for one node.
pub const MAX_LATEST_STREAMS: usize = 1_000;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening or preparing the database failed.
    #[error("cannot open store {path}: {source}")]
    Open {
        /// Database path.
        path: String,
        /// Cause.
        source: rusqlite::Error,
    },
    /// A query or transaction failed.
    #[error("store {op} failed for node {node:?}: {source}")]
    Query {
        /// What was being done.
        op: &'static str,
        /// Node concerned, if any.
        node: Option<String>,
        /// Cause.
        source: rusqlite::Error,
    },
    /// A PostgreSQL query, transaction or connection failed.
    #[error("PostgreSQL {op} failed for node {node:?}: {source}")]
    Postgres {
        /// What was being done.
        op: &'static str,
        /// Node concerned, if any.
        node: Option<String>,
        /// Cause.
        source: tokio_postgres::Error,
    },
    /// No PostgreSQL connection could be had from the pool.
    #[error("PostgreSQL {url}: no connection: {message}")]
    Pool {
        /// The server (without password).
        url: String,
        /// Why.
        message: String,
    },
    /// The database was made by a newer aggregator: its migrations are not
    /// known here.
    #[error(
        "PostgreSQL schema version {found} is newer than this aggregator knows ({known}): upgrade it"
    )]
    SchemaTooNew {
        /// Highest version applied in the database.
        found: i64,
        /// Highest version this build has.
        known: i64,
    },
    /// Another aggregator (or a newer session) took the node's lease: this
    /// apply was refused in its transaction, nothing written (I-36).
    #[error(
        "node {node}: lease lost (this session holds fencing token {held}, the store has {current}): another aggregator serves the node now"
    )]
    Fenced {
        /// The node.
        node: String,
        /// The token this session holds.
        held: u64,
        /// The newest token in the store.
        current: u64,
    },
    /// The transaction this apply shared with other nodes' failed (at
    /// begin or commit): nothing of it was written.
    #[error("store group commit failed for node {node}: {message}")]
    Group {
        /// The node.
        node: String,
        /// The failure.
        message: String,
        /// Its kind (full disk, damage, other).
        kind: fogline_telemetry::health::ProblemKind,
    },
    /// The store's internal lock was poisoned by a panic, or its blocking
    /// task failed.
    #[error("store lock poisoned or its task failed")]
    Poisoned,
}

/// Result of one [`Store::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// The node's cursor after the commit.
    pub cursor: u64,
    /// Records newly inserted.
    pub inserted: usize,
    /// Records skipped because they were at or below the cursor (already applied).
    pub skipped: usize,
}

/// Records a query may look at before it answers with what it found so
/// far (a sparse wildcard over a big node must not scan it whole).
pub const MAX_SCAN_ROWS: usize = 100_000;

/// Default byte bound of one page of records (payload bytes).
pub const DEFAULT_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// Filter for [`Store::records`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordQuery {
    /// Node id (required).
    pub node: String,
    /// Only streams this MQTT topic filter matches (`+`, `#`), if set.
    pub stream: Option<String>,
    /// Only records with seq above this.
    pub after_seq: u64,
    /// Only records whose event time is at or after this (ms since the
    /// Unix epoch).
    pub from_ms: Option<u64>,
    /// Only records whose event time is before this.
    pub to_ms: Option<u64>,
    /// At most this many (capped at [`MAX_QUERY_LIMIT`]).
    pub limit: usize,
    /// The page ends once its payloads reach this many bytes (it always
    /// holds at least one record when one matches).
    pub max_bytes: usize,
}

impl RecordQuery {
    /// Every record of `node` after `after_seq`, `limit` at most.
    pub fn node(node: &str, after_seq: u64, limit: usize) -> Self {
        Self {
            node: node.to_string(),
            stream: None,
            after_seq,
            from_ms: None,
            to_ms: None,
            limit,
            max_bytes: DEFAULT_PAGE_BYTES,
        }
    }

    /// The SQL pre-filter on `stream`: `(exact, like)`; a wildcard filter
    /// becomes a LIKE pattern that matches a superset, and
    /// [`PageBuilder`] keeps only the topics the filter matches.
    pub(crate) fn stream_sql(&self) -> (Option<String>, Option<String>) {
        match &self.stream {
            None => (None, None),
            Some(f) if !f.contains(['+', '#']) => (Some(f.clone()), None),
            Some(f) => (None, Some(like_pattern(f))),
        }
    }
}

/// `sensors/+/reading` → `sensors/%/reading`; `a/#` → `a%` (also `a`
/// itself); LIKE's own `%`, `_` and `\` escaped.
fn like_pattern(filter: &str) -> String {
    let mut out = String::new();
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if *level == "#" {
            if out.ends_with('/') {
                out.pop();
            }
            out.push('%');
            return out;
        }
        if *level == "+" {
            out.push('%');
        } else {
            for c in level.chars() {
                if matches!(c, '%' | '_' | '\\') {
                    out.push('\\');
                }
                out.push(c);
            }
        }
        if i + 1 < levels.len() {
            out.push('/');
        }
    }
    out
}

/// One page of [`Store::records`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecordPage {
    /// The records, ascending by seq.
    pub records: Vec<StoredRecord>,
    /// Where the next page starts: the last seq looked at (which may be
    /// past the last record returned, when a filter skipped rows).
    pub next_after_seq: u64,
    /// Whether the page stopped before the end (limit, bytes or scan bound).
    pub more: bool,
}

/// Gathers a page from rows in seq order: applies the topic filter, the
/// row, byte and scan bounds. Both stores feed it.
pub(crate) struct PageBuilder<'q> {
    query: &'q RecordQuery,
    page: RecordPage,
    bytes: usize,
    scanned: usize,
}

impl<'q> PageBuilder<'q> {
    pub(crate) fn new(query: &'q RecordQuery) -> Self {
        Self {
            query,
            page: RecordPage {
                next_after_seq: query.after_seq,
                ..RecordPage::default()
            },
            bytes: 0,
            scanned: 0,
        }
    }

    /// Room for another row? (Asked before each is read.)
    pub(crate) fn wants_more(&mut self) -> bool {
        let limit = self.query.limit.min(MAX_QUERY_LIMIT);
        let full = self.page.records.len() >= limit
            || (self.bytes >= self.query.max_bytes && !self.page.records.is_empty())
            || self.scanned >= MAX_SCAN_ROWS;
        if full {
            self.page.more = true;
        }
        !full
    }

    /// A row in seq order.
    pub(crate) fn offer(&mut self, record: StoredRecord) {
        self.scanned += 1;
        self.page.next_after_seq = record.seq;
        if let Some(f) = &self.query.stream {
            if !fogline_protocol::topic::matches(f, &record.stream) {
                return;
            }
        }
        self.bytes += record.payload.len();
        self.page.records.push(record);
    }

    pub(crate) fn finish(self) -> RecordPage {
        self.page
    }
}

/// A record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Node id.
    pub node: String,
    /// Per-node sequence number.
    pub seq: u64,
    /// Stream name.
    pub stream: String,
    /// Event time.
    pub timestamp_ms: u64,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// When the aggregator applied it.
    pub received_ms: u64,
}

/// Per-node summary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeSummary {
    /// Node id.
    pub node: String,
    /// Highest seq applied.
    #[serde(serialize_with = "as_string::serialize")]
    pub cursor: u64,
    /// Records stored (each once), counted by the applies; with
    /// PostgreSQL `retention`, dropped partitions do not lower it.
    pub records: u64,
    /// When the cursor last moved (ms since epoch).
    pub last_update_ms: u64,
    /// The node's outbox incarnation the cursor belongs to.
    #[serde(serialize_with = "as_string::option::serialize")]
    pub incarnation: Option<u64>,
    /// Records this store acknowledged and later lost (restored from a
    /// backup), summed over every recorded gap.
    pub lost_records: u64,
    /// What the node reported it lost or dead-lettered, by stream and
    /// reason (I-33).
    pub losses: Vec<LossSummary>,
    /// The node's latest status frame, as it sent it (protocol 5).
    pub status: Option<serde_json::Value>,
    /// When the aggregator received it.
    pub status_received_ms: Option<u64>,
}

/// One stream of a node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamSummary {
    /// The stream (MQTT topic).
    pub stream: String,
    /// Records stored.
    pub records: u64,
    /// Event time of its newest record.
    pub last_ms: u64,
}

/// A node's losses on one stream for one reason, summed over its reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LossSummary {
    /// The stream (`*`: many streams, or unreadable rows).
    pub stream: String,
    /// `quota`, `max_age`, `unrouted`, `dead_letter_pruned`, `corrupt` (lost);
    /// `dead_lettered`, `replayed` (kept on the gateway, replayed).
    pub reason: String,
    /// Records (or messages).
    pub records: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The node's sequence numbers they had, first and last.
    #[serde(serialize_with = "as_string::option::serialize")]
    pub first_seq: Option<u64>,
    /// See `first_seq`.
    #[serde(serialize_with = "as_string::option::serialize")]
    pub last_seq: Option<u64>,
    /// Their time range (ms since the Unix epoch).
    pub first_ms: u64,
    /// See `first_ms`.
    pub last_ms: u64,
    /// How many reports were summed.
    pub reports: u64,
}

/// One loss report as the node sent it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredLoss {
    /// The report's own sequence number.
    #[serde(serialize_with = "as_string::serialize")]
    pub seq: u64,
    /// The stream.
    pub stream: String,
    /// Why (see [`LossSummary::reason`]).
    pub reason: String,
    /// More about why.
    pub detail: Option<String>,
    /// Records.
    pub records: u64,
    /// Bytes.
    pub bytes: u64,
    /// Sequence range of what was lost, where it had numbers.
    #[serde(serialize_with = "as_string::option::serialize")]
    pub first_seq: Option<u64>,
    /// See `first_seq`.
    #[serde(serialize_with = "as_string::option::serialize")]
    pub last_seq: Option<u64>,
    /// Time range.
    pub first_ms: u64,
    /// See `first_ms`.
    pub last_ms: u64,
    /// When the aggregator applied the report.
    pub received_ms: u64,
}

/// One apply: a node's decoded batches and where its cursor goes.
#[derive(Debug)]
pub struct ApplyBatches {
    /// The lease the applying session holds (names the node).
    pub lease: Lease,
    /// The edge outbox's incarnation and epoch, recorded with the cursor.
    pub outbox: (u64, u64),
    /// Each ascending by seq; from protocol 4 not necessarily after the one
    /// before.
    pub batches: Vec<DecodedBatch>,
    /// The cursor moves to `max(cursor, through)`.
    pub through: u64,
    /// Stamps `received_ms`.
    pub now_ms: u64,
}

/// The loss report a record on [`fogline_protocol::LOSS_STREAM`] carries;
/// `None` for other records, and (with a warning) for one that does not
/// parse: that one is stored as an ordinary record, never dropped (I-33).
pub(crate) fn loss_report(
    node: &str,
    r: &fogline_protocol::RecordRef<'_>,
) -> Option<fogline_protocol::LossReport> {
    if r.stream != fogline_protocol::LOSS_STREAM {
        return None;
    }
    match fogline_protocol::LossReport::decode(r.payload) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(
                node,
                seq = r.seq,
                error = %e,
                "A loss report does not parse; stored as an ordinary record."
            );
            None
        }
    }
}

/// Storage for applied records, per-node cursors and leases. Async: the
/// SQLite store runs its blocking work on tokio's blocking pool.
pub trait Store: Send + Sync + 'static {
    /// Takes `node`'s lease for `holder` (an aggregator's name): the
    /// fencing token goes up by one, so any earlier holder's next apply is
    /// refused (I-36). Then reads the cursor, which is final: no earlier
    /// holder can move it any more.
    fn take_lease<'a>(
        &'a self,
        node: &'a str,
        holder: &'a str,
        now_ms: u64,
    ) -> StoreFuture<'a, (Lease, StoredCursor)>;
    /// Lets go of a lease (the session ended). A lease taken since by
    /// someone else is left alone.
    fn release_lease<'a>(&'a self, lease: &'a Lease, now_ms: u64) -> StoreFuture<'a, ()>;
    /// Every node's lease.
    fn leases(&self) -> StoreFuture<'_, Vec<LeaseInfo>>;
    /// `node`'s lease, if it ever had one (a primary-key lookup).
    fn lease<'a>(&'a self, node: &'a str) -> StoreFuture<'a, Option<LeaseInfo>>;
    /// In ONE transaction: checks the lease is still the newest (else
    /// [`StoreError::Fenced`], nothing written), inserts the records above
    /// the cursor that are not stored yet, advances the cursor to
    /// `max(cursor, through)` and the highest seq stored (`top`), commits.
    fn apply(&self, apply: ApplyBatches) -> StoreFuture<'_, ApplyOutcome>;
    /// Highest seq applied for `node` (0 if none) and its incarnation.
    fn cursor<'a>(&'a self, node: &'a str) -> StoreFuture<'a, StoredCursor>;
    /// Records that `from..=to` of `node` were acknowledged and are gone
    /// (the store was restored from a backup): the loss is kept, not hidden.
    /// A range already recorded is not recorded again.
    fn record_gap<'a>(
        &'a self,
        node: &'a str,
        from: u64,
        to: u64,
        now_ms: u64,
    ) -> StoreFuture<'a, ()>;
    /// A page of the records matching `query`, ascending by seq.
    fn records_page<'a>(&'a self, query: &'a RecordQuery) -> StoreFuture<'a, RecordPage>;
    /// The records of one page, ascending by seq.
    fn records<'a>(&'a self, query: &'a RecordQuery) -> StoreFuture<'a, Vec<StoredRecord>> {
        Box::pin(async move { Ok(self.records_page(query).await?.records) })
    }
    /// The newest record (highest seq) of each of `node`'s streams that
    /// `stream` matches (all if `None`), at most [`MAX_LATEST_STREAMS`].
    fn latest<'a>(
        &'a self,
        node: &'a str,
        stream: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<StoredRecord>>;
    /// All known nodes.
    fn nodes(&self) -> StoreFuture<'_, Vec<NodeSummary>>;
    /// One node, as [`Store::nodes`] lists it.
    fn node<'a>(&'a self, node: &'a str) -> StoreFuture<'a, Option<NodeSummary>>;
    /// Keeps `node`'s latest status (replacing the one before).
    fn put_status<'a>(
        &'a self,
        node: &'a str,
        status: &'a fogline_protocol::status::NodeStatus,
        now_ms: u64,
    ) -> StoreFuture<'a, ()>;
    /// `node`'s streams with their record counts, at most
    /// [`MAX_LATEST_STREAMS`].
    fn streams<'a>(&'a self, node: &'a str) -> StoreFuture<'a, Vec<StreamSummary>>;

    /// Files a new rollout — its document (JSON, see `rollout::Rollout`)
    /// and its module — under the next free number, which it returns.
    fn create_rollout<'a>(
        &'a self,
        doc: &'a str,
        module: &'a [u8],
        now_ms: u64,
    ) -> StoreFuture<'a, u64>;

    /// Replaces rollout `id`'s document.
    fn update_rollout<'a>(&'a self, id: u64, doc: &'a str, now_ms: u64) -> StoreFuture<'a, ()>;

    /// Every rollout's document, by number (oldest first).
    fn rollouts(&self) -> StoreFuture<'_, Vec<(u64, String)>>;

    /// Rollout `id`'s module.
    fn rollout_module(&self, id: u64) -> StoreFuture<'_, Option<Vec<u8>>>;

    /// The newest status of each of `nodes` that sent one (JSON as stored).
    fn statuses<'a>(&'a self, nodes: &'a [String]) -> StoreFuture<'a, Vec<(String, String)>>;
    /// `node`'s loss reports with seq above `after_seq`, ascending, at most
    /// `limit` (capped at [`MAX_QUERY_LIMIT`]).
    fn losses<'a>(
        &'a self,
        node: &'a str,
        after_seq: u64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredLoss>>;
}

#[cfg(test)]
mod tests {
    use super::like_pattern;

    #[test]
    fn topic_filters_become_like_supersets() {
        assert_eq!(like_pattern("sensors/+/reading"), "sensors/%/reading");
        assert_eq!(like_pattern("sensors/#"), "sensors%");
        assert_eq!(like_pattern("#"), "%");
        assert_eq!(like_pattern("a_b/100%/+"), "a\\_b/100\\%/%");
    }
}

/// Serde helpers: u64 values that JavaScript cannot hold exactly are sent
/// as strings in the HTTP API.
pub(crate) mod as_string {
    use serde::Serializer;

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub mod option {
        use serde::Serializer;

        pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.collect_str(v),
                None => s.serialize_none(),
            }
        }
    }
}
