//! Where applied records live. [`Store`] is what the transport and HTTP API
//! need; [`SqliteStore`] is the embedded implementation. A PostgreSQL store
//! implements the same trait (its `apply` is the same single transaction:
//! insert-ignoring-duplicates plus cursor upsert).
//!
//! **Invariant:** `apply` inserts the records above the node's cursor and
//! advances the cursor in ONE transaction; a record at or below the cursor is
//! never inserted again. The store knows nothing about QUIC or frames.

pub mod events;
pub mod health;
mod sqlite;

pub use sqlite::SqliteStore;

use fogline_protocol::session::StoredCursor;
use fogline_protocol::DecodedBatch;

/// Largest `limit` accepted by [`Store::records`].
pub const MAX_QUERY_LIMIT: usize = 10_000;

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
    /// The store's internal lock was poisoned by a panic.
    #[error("store lock poisoned")]
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

/// Filter for [`Store::records`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordQuery {
    /// Node id (required).
    pub node: String,
    /// Only this stream, if set.
    pub stream: Option<String>,
    /// Only records with seq above this.
    pub after_seq: u64,
    /// At most this many (capped at [`MAX_QUERY_LIMIT`]).
    pub limit: usize,
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
    pub cursor: u64,
    /// Number of records stored.
    pub records: u64,
    /// When the cursor last moved (ms since epoch).
    pub last_update_ms: u64,
    /// The node's outbox incarnation the cursor belongs to.
    pub incarnation: Option<u64>,
    /// Records this store acknowledged and later lost (restored from a
    /// backup), summed over every recorded gap.
    pub lost_records: u64,
    /// What the node reported it lost or dead-lettered, by stream and
    /// reason (I-33).
    pub losses: Vec<LossSummary>,
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
    pub first_seq: Option<u64>,
    /// See `first_seq`.
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
    pub first_seq: Option<u64>,
    /// See `first_seq`.
    pub last_seq: Option<u64>,
    /// Time range.
    pub first_ms: u64,
    /// See `first_ms`.
    pub last_ms: u64,
    /// When the aggregator applied the report.
    pub received_ms: u64,
}

/// Storage for applied records and per-node cursors. Methods block: call them
/// from `spawn_blocking`.
pub trait Store: Send + Sync + 'static {
    /// Applies decoded batches (each ascending by seq; from protocol 4 not
    /// necessarily after the one before) for `node` in one transaction:
    /// inserts the records above the cursor that are not stored yet,
    /// advances the cursor to `max(cursor, through)` and the highest seq
    /// stored (`top`), commits.
    /// `now_ms` stamps `received_ms`. `outbox` (the edge outbox's
    /// incarnation and epoch) is recorded with the cursor.
    fn apply(
        &self,
        node: &str,
        outbox: (u64, u64),
        batches: &[DecodedBatch],
        through: u64,
        now_ms: u64,
    ) -> Result<ApplyOutcome, StoreError>;
    /// Highest seq applied for `node` (0 if none) and its incarnation.
    fn cursor(&self, node: &str) -> Result<StoredCursor, StoreError>;
    /// Records that `from..=to` of `node` were acknowledged and are gone
    /// (the store was restored from a backup): the loss is kept, not hidden.
    /// A range already recorded is not recorded again.
    fn record_gap(&self, node: &str, from: u64, to: u64, now_ms: u64) -> Result<(), StoreError>;
    /// Records matching `query`, ascending by seq.
    fn records(&self, query: &RecordQuery) -> Result<Vec<StoredRecord>, StoreError>;
    /// All known nodes.
    fn nodes(&self) -> Result<Vec<NodeSummary>, StoreError>;
    /// `node`'s loss reports with seq above `after_seq`, ascending, at most
    /// `limit` (capped at [`MAX_QUERY_LIMIT`]).
    fn losses(
        &self,
        node: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredLoss>, StoreError>;
}
