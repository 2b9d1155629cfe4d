//! The outbox: one SQLite database (WAL) holding what the functions emitted
//! until the aggregator has acknowledged it.
//!
//! Two handles share the file: the [`Outbox`] writer, owned by the pipeline
//! worker, and an [`OutboxReader`], owned by the uplink, which reads batches
//! and deletes what the aggregator acknowledged.
//!
//! Invariants:
//! - Every record gets a sequence number larger than any this node ever gave
//!   out (the high-water mark lives in `meta.next_seq`, never in `MAX(seq)`, so
//!   deleting every row cannot make a number come back).
//! - A commit holds a batch's records, its dead letters and the ingest
//!   session changes (MQTT redelivery state) those inputs caused, all or
//!   nothing.
//! - The outbox has an *incarnation*: a random id made with the file. The
//!   uplink sends it to the aggregator so a cursor recorded for another file
//!   (a wiped outbox, a replaced SD card, a clone) never deletes this one's
//!   records; [`OutboxReader::renumber_above`] moves them above it instead.
//! - A row is deleted only through [`OutboxReader::delete_through`], which the
//!   uplink calls with a sequence the aggregator acknowledged after its commit.
//!
//! The outbox knows nothing about MQTT or QUIC.

pub mod drain;
pub mod events;
mod functions;
pub mod local;
pub mod losses;
mod reserve;
pub mod retention;
pub mod salvage;
mod schema;
mod stats;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};

use crate::config::SyncMode;
use crate::message::Message;

pub use functions::{
    function_records, list_dead_letters, request_replay, DeadLetterFilter, FunctionRecord, Held,
    HeldInput, StateCommit, StoredDeadLetter, VersionWrite,
};
pub use local::{LocalReader, LocalRow, StoredSubscriber, SubscriberWrite};
pub use losses::LossTotal;
pub use reserve::Reserve;
pub use retention::{Blocked, LanePolicy, Priority, Retention, WhenFull};
pub use stats::OutboxStats;

/// What went wrong in the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// Opening or preparing the database failed.
    #[error("cannot open outbox {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// Less room is left on the outbox's disk than the reserve it keeps for
    /// draining: nothing more is committed until deletes free some.
    #[error(
        "outbox {path}: the disk is full for new readings: {room} bytes free (disk and free pages \
         inside the outbox) of the {floor} kept for draining the backlog (outbox.reserve_mib); \
         readings wait unacknowledged until the uplink drains it or space is freed"
    )]
    Full {
        /// The file.
        path: PathBuf,
        /// Bytes free on its filesystem plus free pages inside it.
        room: u64,
        /// The reserve kept free.
        floor: u64,
    },
    /// A quota whose policy is `block` (or with nothing left it may drop)
    /// is reached: nothing more is committed until the uplink drains.
    #[error(
        "outbox {path}: {} is full: {} held, {} more in this commit, limit {}; readings wait \
         unacknowledged until the uplink drains it (or set when_full = \"drop_oldest\")",
        blocked.quota, human_bytes(blocked.used), human_bytes(blocked.incoming), human_bytes(blocked.limit)
    )]
    QuotaFull {
        /// The file.
        path: PathBuf,
        /// Which quota, and its numbers.
        blocked: Blocked,
    },
    /// The file was found damaged: nothing more is committed into it.
    #[error(
        "outbox {path} is damaged ({detail}): nothing more is acknowledged into it; it is \
         salvaged at the next start (or by `fogline-edge outbox recover`)"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// A statement failed (disk full, I/O error, corrupt file...).
    #[error("outbox {path}: {op} failed: {source}")]
    Sql {
        /// The file.
        path: PathBuf,
        /// What we were doing.
        op: &'static str,
        /// Why.
        source: rusqlite::Error,
    },
}

impl OutboxError {
    /// The filesystem (or the database's size limit) is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::Full { .. } => true,
            Self::Damaged { .. } | Self::QuotaFull { .. } => false,
            Self::Open { source, .. } | Self::Sql { source, .. } => {
                matches!(source, rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::DiskFull)
            }
        }
    }
}

impl OutboxError {
    /// The file is damaged.
    pub fn is_damage(&self) -> bool {
        match self {
            Self::Damaged { .. } => true,
            Self::Full { .. } | Self::QuotaFull { .. } => false,
            Self::Open { source, .. } | Self::Sql { source, .. } => salvage::is_damage(source),
        }
    }

    /// The kind of problem this is, for `/healthz`.
    pub fn problem_kind(&self) -> fogline_telemetry::health::ProblemKind {
        use fogline_telemetry::health::ProblemKind;
        if matches!(self, Self::QuotaFull { .. }) {
            ProblemKind::QuotaFull
        } else if self.is_disk_full() {
            ProblemKind::DiskFull
        } else if self.is_damage() {
            ProblemKind::Corrupt
        } else {
            ProblemKind::StoreError
        }
    }
}

/// `n` bytes as `12.3 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// SQLite's default `wal_autocheckpoint`, in pages.
const DEFAULT_AUTOCHECKPOINT: i64 = 1000;

/// A record as the uplink sends it.
pub type Record = fogline_protocol::Record;

/// Where in a pipeline a dead letter was taken out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// An input of the function (or ingest) that refused it: a replay runs
    /// it through that function again.
    Input,
    /// An output of the function the host refused (from a `tick`): a replay
    /// runs it through the functions after it.
    Output,
}

impl Stage {
    /// `input` or `output`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Input => "input",
            Stage::Output => "output",
        }
    }

    fn parse(s: &str) -> Self {
        if s == "output" {
            Stage::Output
        } else {
            Stage::Input
        }
    }
}

/// An input a function (or ingest) refused, kept with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The pipeline it went through (or `ingest`).
    pub pipeline: String,
    /// The function that refused it (or the ingest check).
    pub function: String,
    /// A short, stable name for why: `rejected`, `trap`, `timeout`,
    /// `invalid_output`, `circuit_open`, `max_payload_bytes`...
    pub reason: String,
    /// Whether it is an input or an output of `function`.
    pub stage: Stage,
    /// Why, in words, with the numbers.
    pub error: String,
    /// The refused message. Oversized payloads are truncated by the caller.
    pub message: Message,
    /// The payload's original size in bytes.
    pub payload_size: usize,
}

/// A change to the stored ingest sessions (opaque blobs: ingest gives them
/// meaning, see `ingest::session_store`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionWrite {
    /// Set the session's metadata.
    Meta {
        /// Session key.
        key: String,
        /// Encoded metadata.
        meta: Vec<u8>,
    },
    /// Append to the session's log.
    Append {
        /// Session key.
        key: String,
        /// Encoded entry.
        entry: Vec<u8>,
    },
    /// Replace the session's whole log with one entry (a snapshot).
    Replace {
        /// Session key.
        key: String,
        /// Encoded entry.
        entry: Vec<u8>,
    },
    /// Forget the session.
    Delete {
        /// Session key.
        key: String,
    },
}

/// A stored ingest session, as [`Outbox::load_sessions`] returns it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredSession {
    /// Session key.
    pub key: String,
    /// Encoded metadata, if any.
    pub meta: Option<Vec<u8>>,
    /// Encoded log entries, oldest first.
    pub entries: Vec<Vec<u8>>,
}

/// One atomic commit.
#[derive(Debug, Default)]
pub struct Commit {
    /// Records to buffer, in order.
    pub records: Vec<Message>,
    /// Which lane (pipeline) the records belong to: runs of `(lane, count)`
    /// in order; records past the runs go to the legacy lane.
    pub lanes: Vec<(u32, usize)>,
    /// Losses found before the commit (unrouted messages dropped, dead
    /// letters): written with it as loss records.
    pub losses: Vec<fogline_protocol::LossReport>,
    /// Refused inputs.
    pub dead_letters: Vec<DeadLetter>,
    /// Ingest session changes caused by this commit's inputs.
    pub sessions: Vec<SessionWrite>,
    /// Functions' durable state changes caused by this commit's inputs.
    pub state: Vec<StateCommit>,
    /// Inputs parked behind open circuit breakers.
    pub held: Vec<Held>,
    /// Held inputs this commit ran: delete `owner`'s up to the id.
    pub held_consumed: Vec<(String, i64)>,
    /// Dead letters this commit replayed: deleted with it.
    pub replayed: Vec<i64>,
    /// Function versions promoted or rolled back.
    pub versions: Vec<VersionWrite>,
    /// Outputs of pipelines with `local = "durable"`, kept for local
    /// subscribers (local.rs).
    pub local: Vec<Message>,
    /// Durable local subscribers' positions and subscriptions.
    pub local_subscribers: Vec<SubscriberWrite>,
    /// The node's ingest clock when the batch was taken (kept as the
    /// clock's high-water mark, so it never goes back across restarts).
    pub clock_ms: u64,
}

impl Commit {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.losses.is_empty()
            && self.dead_letters.is_empty()
            && self.sessions.is_empty()
            && self.state.is_empty()
            && self.held.is_empty()
            && self.held_consumed.is_empty()
            && self.replayed.is_empty()
            && self.versions.is_empty()
            && self.local.is_empty()
            && self.local_subscribers.is_empty()
    }
}

/// What the uplink tells the aggregator about this outbox, and compares its
/// answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxIdentity {
    /// This outbox file's incarnation.
    pub incarnation: u64,
    /// The next sequence number to be given out.
    pub next_seq: u64,
    /// Highest sequence the aggregator acknowledged to this outbox.
    pub acked_seq: u64,
    /// Lowest sequence still buffered, if any.
    pub first_unsent: Option<u64>,
    /// This daemon start's random id (0: never started).
    pub epoch: u64,
    /// The next seq when this epoch began.
    pub epoch_start: u64,
}

/// An alarm kept for `fogline-edge status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Alarm {
    /// When (ms since epoch).
    pub at_ms: u64,
    /// Short machine-readable kind, e.g. `cursor_behind`.
    pub kind: String,
    /// What happened, with the numbers.
    pub detail: String,
}

/// The sequence numbers a commit gave out.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    /// First sequence number given out (meaningless when `records == 0`).
    pub first_seq: u64,
    /// How many records were written (data and loss reports).
    pub records: usize,
    /// Records the quotas dropped to make room.
    pub dropped: u64,
    /// The outputs kept for durable local subscribers, with their ids.
    pub local: Vec<LocalRow>,
    /// Old outputs for local subscribers dropped to stay under
    /// `outbox.local_max_bytes`.
    pub local_dropped: u64,
}

fn open_connection(
    path: &Path,
    sync: SyncMode,
    read_only: bool,
) -> Result<Connection, OutboxError> {
    let err = |source| OutboxError::Open {
        path: path.to_path_buf(),
        source,
    };
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags).map_err(err)?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
    if !read_only {
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        let sync = match sync {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync).map_err(err)?;
        schema::migrate(&conn).map_err(err)?;
    }
    Ok(conn)
}

/// The writer side, owned by the pipeline worker.
pub struct Outbox {
    conn: Connection,
    path: PathBuf,
    /// Bytes kept free for draining (0: none): see [`Outbox::set_reserve`].
    floor: u64,
    damage: salvage::DamageFlag,
    retention: Retention,
    /// Records in flight to the aggregator: never dropped (they may be
    /// applied, and would then count twice).
    protected: std::sync::Arc<retention::InFlightMarks>,
    /// When the last seq mark (for `max_age`) was written.
    last_mark_ms: u64,
    /// When `expire` last looked (it looks at most once a second).
    last_expire: Option<std::time::Instant>,
}

/// An SQL error of `op` on the outbox at `path`; damage raises `damage`
/// (I-31).
fn sql_error<'a>(
    path: &'a Path,
    damage: &'a salvage::DamageFlag,
    op: &'static str,
) -> impl FnOnce(rusqlite::Error) -> OutboxError + 'a {
    move |source| {
        if salvage::is_damage(&source) {
            damage.raise(&format!("{op}: {source}"));
        }
        OutboxError::Sql {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

/// A write transaction on a shared handle that takes the write lock at
/// once: a deferred one that read first cannot take it after the other
/// connection committed (`SQLITE_BUSY_SNAPSHOT`, which no busy timeout
/// waits out), and a delete would fail for nothing.
pub(crate) fn write_tx(conn: &Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
}

/// A record from a `SELECT seq, stream, timestamp_ms, payload` row.
fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        seq: row.get::<_, i64>(0)? as u64,
        stream: row.get(1)?,
        timestamp_ms: row.get::<_, i64>(2)? as u64,
        payload: row.get(3)?,
    })
}

/// Bytes free on the filesystem holding `path`.
pub fn disk_free(path: &Path) -> std::io::Result<u64> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

impl Outbox {
    /// Open (creating if needed) the outbox at `path`.
    pub fn open(path: &Path, sync: SyncMode) -> Result<Self, OutboxError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| OutboxError::Open {
                    path: path.to_path_buf(),
                    source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
                })?;
            }
        }
        let conn = open_connection(path, sync, false)?;
        // What the last run sent stays protected until a session's cursor.
        let sent: i64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'sent_seq'", [], |r| {
                r.get(0)
            })
            .map_err(|source| OutboxError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let carried =
            retention::InFlightMarks::load(&conn).map_err(|source| OutboxError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
            floor: 0,
            damage: salvage::DamageFlag::default(),
            retention: Retention {
                dead_letter_max_bytes: u64::MAX,
                local_max_bytes: 64 << 20,
                ..Retention::default()
            },
            protected: std::sync::Arc::new(retention::InFlightMarks::new(
                sent.max(0) as u64,
                carried,
            )),
            last_mark_ms: 0,
            last_expire: None,
        })
    }

    /// Bounds the outbox (I-32). The write-ahead log is kept within the
    /// quota's allowance for it.
    pub fn set_retention(&mut self, retention: Retention) -> Result<(), OutboxError> {
        if retention.max_bytes.is_some() {
            // Checkpoint once the log holds half its allowance (never less
            // than SQLite's default: the allowance is at least that plus two
            // commits): with one commit on top it stays inside. The file is not truncated
            // after (no `journal_size_limit`): on a full disk the log must
            // reuse the blocks it has, so acknowledged records can still be
            // deleted (I-28).
            let half = retention.wal_allowance as i64 / 2;
            let page: i64 = self
                .conn
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .map_err(self.sql("limit the write-ahead log"))?;
            self.conn
                .pragma_update(
                    None,
                    "wal_autocheckpoint",
                    (half / page.max(512)).max(DEFAULT_AUTOCHECKPOINT),
                )
                .map_err(self.sql("limit the write-ahead log"))?;
        }
        self.retention = retention;
        Ok(())
    }

    /// The in-flight marks the uplink raises as it sends (see `protected`).
    pub fn protected_handle(&self) -> std::sync::Arc<retention::InFlightMarks> {
        self.protected.clone()
    }

    /// The lane of pipeline `name`: stable across restarts and reordering.
    pub fn lane(&self, name: &str) -> Result<u32, OutboxError> {
        self.conn
            .execute("INSERT OR IGNORE INTO lanes (name) VALUES (?1)", [name])
            .and_then(|_| {
                self.conn
                    .query_row("SELECT id FROM lanes WHERE name = ?1", [name], |r| r.get(0))
            })
            .map_err(self.sql("register lane"))
    }

    /// Durable local subscribers on file, and the highest output id given.
    pub fn local_subscribers(&self) -> Result<(Vec<StoredSubscriber>, u64), OutboxError> {
        let op = "read local subscribers";
        let subs = local::load(&self.conn).map_err(sql_error(&self.path, &self.damage, op))?;
        let last = local::last_id(&self.conn).map_err(sql_error(&self.path, &self.damage, op))?;
        Ok((subs, last))
    }

    /// Forgets durable local subscribers whose session expired (never a
    /// `connected` one) and deletes outputs every other one has passed.
    /// Returns the subscribers forgotten.
    pub fn trim_local(
        &mut self,
        connected: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<String>, OutboxError> {
        if self.damage.is_raised() {
            return Ok(Vec::new());
        }
        let path = self.path.clone();
        let damage = self.damage.clone();
        let sql = |op: &'static str| sql_error(&path, &damage, op);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin trimming local outputs"))?;
        let gone = local::trim(&tx, crate::clock::now_ms(), connected)
            .map_err(sql("trim local outputs"))?;
        tx.commit().map_err(sql("commit trimming local outputs"))?;
        Ok(gone)
    }

    /// Drops what waited longer than its `max_age` (I-32), counting it
    /// (I-33). Returns how many records were dropped.
    pub fn expire(&mut self) -> Result<u64, OutboxError> {
        let has_age = self.retention.max_age.is_some()
            || self.retention.lanes.values().any(|l| l.max_age.is_some());
        if !has_age
            || self.damage.is_raised()
            || self
                .last_expire
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return Ok(0);
        }
        self.last_expire = Some(std::time::Instant::now());
        let marks = self.protected.clone();
        let _reading = marks.reading();
        let protected = marks.snapshot();
        let now = crate::clock::ingest_ms();
        let path = self.path.clone();
        let damage = self.damage.clone();
        let sql = |op: &'static str| sql_error(&path, &damage, op);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin expiry"))?;
        let mut dropped = retention::Dropped::default();
        retention::expire(&tx, &self.retention, &protected, now, &mut dropped)
            .map_err(sql("drop expired records"))?;
        let reports = losses::compact(dropped.into_reports());
        if reports.is_empty() {
            tx.commit().map_err(sql("commit expiry"))?;
            return Ok(0);
        }
        let n: u64 = reports.iter().map(|r| r.records).sum();
        let first: i64 = tx
            .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get(0)
            })
            .map_err(sql("read next_seq"))?;
        let written =
            losses::write(&tx, &reports, first as u64, now).map_err(sql("record losses"))?;
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'next_seq'",
            [first + written as i64],
        )
        .map_err(sql("advance next_seq"))?;
        tx.commit().map_err(sql("commit expiry"))?;
        log_drops(&reports);
        Ok(n)
    }

    /// Shares `flag` with the reader: damage either finds stops commits.
    pub fn set_damage_flag(&mut self, flag: salvage::DamageFlag) {
        self.damage = flag;
    }

    /// Keeps `bytes` free for draining: a commit is refused
    /// ([`OutboxError::Full`]) while the filesystem's free space plus the
    /// free pages inside the outbox are below it. Deleting acknowledged
    /// records and the checkpoint that moves the write-ahead log into the
    /// file need that room — a truly full disk could never drain.
    pub fn set_reserve(&mut self, bytes: u64) {
        self.floor = bytes;
    }

    /// Bytes a commit may still use, as far as the floor needs to know:
    /// free on the disk, plus — only when that alone is below the floor —
    /// free pages inside the outbox (SQLite reuses them before growing the
    /// file). One `statvfs` per commit while the disk has room.
    pub fn room(&self) -> Result<u64, OutboxError> {
        let disk = disk_free(&self.path).map_err(|e| OutboxError::Sql {
            path: self.path.clone(),
            op: "read free disk space",
            source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
        })?;
        if disk >= self.floor {
            return Ok(disk);
        }
        let free_pages: i64 = self
            .conn
            .query_row(
                "SELECT freelist_count * page_size FROM pragma_freelist_count(), pragma_page_size()",
                [],
                |r| r.get(0),
            )
            .map_err(self.sql("read free pages"))?;
        Ok(disk.saturating_add(free_pages.max(0) as u64))
    }

    fn sql(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> OutboxError + '_ {
        sql_error(&self.path, &self.damage, op)
    }

    /// A daemon starts on this outbox: a new epoch (a random id: two copies
    /// of one file restarting never share one), numbering from the current
    /// `next_seq`. Call once per start, before anything is numbered.
    pub fn begin_epoch(&mut self) -> Result<u64, OutboxError> {
        let path = self.path.clone();
        let err = move |source| OutboxError::Sql {
            path: path.clone(),
            op: "begin epoch",
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        tx.execute_batch(
            "UPDATE meta SET value = (abs(random()) % 9223372036854775806) + 1 WHERE key = 'epoch';
             INSERT OR REPLACE INTO meta (key, value)
                 VALUES ('epoch_start', (SELECT value FROM meta WHERE key = 'next_seq'));",
        )
        .map_err(&err)?;
        let epoch: i64 = tx
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })
            .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(epoch as u64)
    }

    /// Every stored ingest session with its log, for the restart of ingest.
    pub fn load_sessions(&self) -> Result<Vec<StoredSession>, OutboxError> {
        let mut sessions: std::collections::BTreeMap<String, StoredSession> =
            std::collections::BTreeMap::new();
        let err = self.sql("read ingest sessions");
        let mut stmt = match self.conn.prepare("SELECT key, meta FROM ingest_sessions") {
            Ok(s) => s,
            Err(e) => return Err(err(e)),
        };
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(self.sql("read ingest sessions"))?;
        for (key, meta) in rows {
            sessions.insert(
                key.clone(),
                StoredSession {
                    key,
                    meta: Some(meta),
                    entries: Vec::new(),
                },
            );
        }
        let mut stmt = self
            .conn
            .prepare("SELECT key, entry FROM ingest_session_log ORDER BY id")
            .map_err(self.sql("read ingest session log"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(self.sql("read ingest session log"))?;
        for (key, entry) in rows {
            sessions
                .entry(key.clone())
                .or_insert_with(|| StoredSession {
                    key,
                    ..StoredSession::default()
                })
                .entries
                .push(entry);
        }
        Ok(sessions.into_values().collect())
    }

    /// Write one commit atomically. With `sync = full` it is on disk when this returns.
    ///
    /// Refused with [`OutboxError::Full`] when less than the reserve is left.
    pub fn commit(&mut self, commit: &Commit) -> Result<Committed, OutboxError> {
        let r = self.commit_once(commit);
        if let Err(e) = &r {
            if e.is_damage() {
                self.damage.raise(&e.to_string());
            }
        }
        r
    }

    fn commit_once(&mut self, commit: &Commit) -> Result<Committed, OutboxError> {
        if self.damage.is_raised() {
            return Err(OutboxError::Damaged {
                path: self.path.clone(),
                detail: self.damage.detail().map(|d| d.1).unwrap_or_default(),
            });
        }
        // A commit that may drop holds off the uplink's reads until it is
        // committed: a record read after the marks were copied would be
        // sent and reported lost.
        let marks = self.protected.clone();
        let _reading = self.retention.may_drop().then(|| marks.reading());
        if self.floor > 0 {
            let room = self.room()?;
            if room < self.floor {
                return Err(OutboxError::Full {
                    path: self.path.clone(),
                    room,
                    floor: self.floor,
                });
            }
        }
        let path = self.path.clone();
        let damage = self.damage.clone();
        let sql = |op: &'static str| sql_error(&path, &damage, op);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let first_seq: u64 = tx
            .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(sql("read next_seq"))? as u64;
        // Each record's lane, from the runs.
        let lanes: Vec<u32> = {
            let mut v = Vec::with_capacity(commit.records.len());
            for &(lane, n) in &commit.lanes {
                v.extend(std::iter::repeat_n(lane, n));
            }
            v.resize(commit.records.len(), retention::LEGACY_LANE);
            v
        };
        let mut incoming = retention::Incoming::new();
        for (m, &lane) in commit.records.iter().zip(&lanes) {
            let e = incoming.entry(lane).or_default();
            e.0 += 1;
            e.1 += retention::record_bytes(&m.stream, &m.payload);
        }
        // Room under every quota first: what is dropped is reported below,
        // in this transaction (I-32, I-33).
        let mut dropped = retention::Dropped::default();
        if !commit.records.is_empty() {
            let protected = self.protected.snapshot();
            if let Err(blocked) =
                retention::make_room(&tx, &self.retention, &incoming, &protected, &mut dropped)
                    .map_err(sql("make room"))?
            {
                return Err(OutboxError::QuotaFull {
                    path: self.path.clone(),
                    blocked,
                });
            }
        }
        let dropped_records: u64 = dropped.count();
        if !commit.records.is_empty() {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO records (seq, stream, timestamp_ms, payload, lane) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(sql("prepare insert"))?;
            for (i, (m, lane)) in commit.records.iter().zip(&lanes).enumerate() {
                insert
                    .execute(params![
                        (first_seq + i as u64) as i64,
                        m.stream,
                        m.timestamp_ms as i64,
                        m.payload,
                        lane
                    ])
                    .map_err(sql("insert record"))?;
            }
            for (lane, (n, bytes)) in &incoming {
                retention::add_usage(&tx, *lane, *n as i64, *bytes as i64)
                    .map_err(sql("count lane usage"))?;
            }
            let now = if commit.clock_ms > 0 {
                commit.clock_ms
            } else {
                crate::clock::ingest_ms()
            };
            // One mark a second is enough for max_age.
            if now >= self.last_mark_ms + 1000 {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO seq_marks (first_seq, at_ms) VALUES (?1, ?2)",
                )
                .and_then(|mut st| st.execute(params![first_seq as i64, now as i64]))
                .map_err(sql("mark commit time"))?;
                self.last_mark_ms = now;
            }
        }
        if !commit.dead_letters.is_empty() {
            let bytes: u64 = commit
                .dead_letters
                .iter()
                .map(|d| {
                    retention::dead_letter_bytes(&d.message.stream, &d.message.payload, &d.error)
                })
                .sum();
            tx.prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('dead_letter_bytes', ?1) \
                 ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            )
            .and_then(|mut st| st.execute([bytes as i64]))
            .map_err(sql("count dead letters"))?;
        }
        if !commit.dead_letters.is_empty() {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO dead_letters (created_ms, pipeline, function, error, stream, timestamp_ms, payload_size, payload, reason, stage) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(sql("prepare dead letter"))?;
            let now = crate::clock::now_ms() as i64;
            for d in &commit.dead_letters {
                insert
                    .execute(params![
                        now,
                        d.pipeline,
                        d.function,
                        d.error,
                        d.message.stream,
                        d.message.timestamp_ms as i64,
                        d.payload_size as i64,
                        d.message.payload,
                        d.reason,
                        d.stage.as_str()
                    ])
                    .map_err(sql("insert dead letter"))?;
            }
        }
        for w in &commit.sessions {
            match w {
                SessionWrite::Meta { key, meta } => tx
                    .prepare_cached(
                        "INSERT OR REPLACE INTO ingest_sessions (key, meta) VALUES (?1, ?2)",
                    )
                    .and_then(|mut st| st.execute(params![key, meta]))
                    .map_err(sql("write ingest session"))?,
                SessionWrite::Append { key, entry } => tx
                    .prepare_cached("INSERT INTO ingest_session_log (key, entry) VALUES (?1, ?2)")
                    .and_then(|mut st| st.execute(params![key, entry]))
                    .map_err(sql("append ingest session log"))?,
                SessionWrite::Replace { key, entry } => {
                    tx.prepare_cached("DELETE FROM ingest_session_log WHERE key = ?1")
                        .and_then(|mut st| st.execute([key]))
                        .map_err(sql("compact ingest session log"))?;
                    tx.prepare_cached("INSERT INTO ingest_session_log (key, entry) VALUES (?1, ?2)")
                        .and_then(|mut st| st.execute(params![key, entry]))
                        .map_err(sql("compact ingest session log"))?
                }
                SessionWrite::Delete { key } => {
                    tx.prepare_cached("DELETE FROM ingest_session_log WHERE key = ?1")
                        .and_then(|mut st| st.execute([key]))
                        .map_err(sql("delete ingest session"))?;
                    tx.prepare_cached("DELETE FROM ingest_sessions WHERE key = ?1")
                        .and_then(|mut st| st.execute([key]))
                        .map_err(sql("delete ingest session"))?
                }
            };
        }
        if !commit.dead_letters.is_empty() {
            retention::prune_dead_letters(&tx, self.retention.dead_letter_max_bytes, &mut dropped)
                .map_err(sql("prune dead letters"))?;
        }
        // Losses, after the records: numbered with them, applied with them.
        let mut reports = commit.losses.clone();
        reports.extend(dropped.into_reports());
        let reports = losses::compact(reports);
        let mut numbered = commit.records.len() as u64;
        if !reports.is_empty() {
            numbered += losses::write(
                &tx,
                &reports,
                first_seq + numbered,
                crate::clock::ingest_ms(),
            )
            .map_err(sql("record losses"))?;
        }
        if numbered > 0 {
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'next_seq'",
                [(first_seq + numbered) as i64],
            )
            .map_err(sql("advance next_seq"))?;
        }
        functions::write(&tx, commit).map_err(sql("write function state"))?;
        let (local, local_dropped) = local::write(
            &tx,
            &commit.local,
            &commit.local_subscribers,
            self.retention.local_max_bytes,
        )
        .map_err(sql("keep outputs for local subscribers"))?;
        if commit.clock_ms > 0 {
            tx.prepare_cached(
                "UPDATE meta SET value = MAX(value, ?1) WHERE key = 'clock_high_water_ms'",
            )
            .and_then(|mut st| st.execute([commit.clock_ms as i64]))
            .map_err(sql("note the clock"))?;
        }
        // A crash in the middle of a commit: nothing of it may count.
        fail::fail_point!("outbox::commit::before", |_| std::process::abort());
        // The same crash in a commit that drops, once the drop, its loss
        // records and the data are all written: none of the three may
        // survive without the others (I-32, I-33). Counts only such commits.
        fail::fail_point!("outbox::commit::dropping", dropped_records > 0, |_| {
            std::process::abort()
        });
        tx.commit().map_err(sql("commit"))?;
        log_drops(&reports);
        Ok(Committed {
            first_seq,
            records: numbered as usize,
            dropped: dropped_records,
            local,
            local_dropped,
        })
    }
}

/// One warning per drop run, with the numbers (drops come in runs of about
/// 1 % of the quota, so this is not a flood).
fn log_drops(reports: &[fogline_protocol::LossReport]) {
    for r in reports {
        metrics::counter!(losses::LOSSES_TOTAL, "reason" => r.reason.as_str()).increment(r.records);
    }
    for r in reports.iter().filter(|r| r.reason.is_loss()) {
        tracing::warn!(
            stream = %r.stream,
            reason = %r.reason,
            records = r.records,
            bytes = r.bytes,
            first_seq = ?r.first_seq,
            last_seq = ?r.last_seq,
            detail = r.detail.as_deref().unwrap_or(""),
            "Records dropped; the loss is counted and reported to the aggregator."
        );
    }
}

/// The uplink's side: reads batches, deletes acknowledged rows.
pub struct OutboxReader {
    conn: Connection,
    path: PathBuf,
    reserve: std::cell::RefCell<Reserve>,
    damage: salvage::DamageFlag,
    /// Raised over what is read (about to be in flight), reset to the
    /// aggregator's cursor when a session starts: the writer's quotas never
    /// drop a record that may be applied (it would count twice).
    protected: std::sync::Arc<retention::InFlightMarks>,
    /// Sending out of seq order: the policy and this session's plan.
    drain: drain::DrainPolicy,
    plan: std::cell::RefCell<Option<drain::Plan>>,
}

impl OutboxReader {
    /// Open a second handle on an outbox the writer already created.
    ///
    /// Its own writes (deleting acknowledged rows, bookkeeping) are not
    /// fsynced one by one (`synchronous = NORMAL`): losing one to a power cut
    /// only means acknowledged rows are deleted again, or resent and skipped
    /// by the aggregator below its cursor — never a lost record. The
    /// writer's commits keep `outbox.sync`.
    pub fn open(path: &Path, _sync: SyncMode) -> Result<Self, OutboxError> {
        Ok(Self {
            conn: open_connection(path, SyncMode::Normal, false)?,
            path: path.to_path_buf(),
            reserve: std::cell::RefCell::new(Reserve::new(path, 0)),
            damage: salvage::DamageFlag::default(),
            protected: Default::default(),
            drain: drain::DrainPolicy::default(),
            plan: std::cell::RefCell::new(None),
        })
    }

    /// A session starts with the aggregator holding everything through
    /// `cursor`: nothing above it is in flight.
    /// Best effort on disk: a stale mark there only protects more after a
    /// restart, and a reconnect on a full disk must not fail for it (I-28).
    fn reset_sent(&self, cursor: u64) -> Result<(), OutboxError> {
        self.protected.reset(cursor);
        self.plan.replace(None);
        if let Err(e) = self.conn.execute(
            "DELETE FROM sent_marks WHERE MAX(after, COALESCE(live_hi, 0)) <= ?1",
            [cursor as i64],
        ) {
            tracing::debug!(error = %e, "Cannot prune the sent marks.");
        }
        if let Err(e) = self.conn.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'sent_seq' AND value != ?1",
            [cursor as i64],
        ) {
            tracing::debug!(error = %e, "Cannot note the sent mark.");
        }
        Ok(())
    }

    /// Shares the in-flight marks with the writer ([`Outbox::protected_handle`]).
    pub fn set_protected(&mut self, marks: std::sync::Arc<retention::InFlightMarks>) {
        self.protected = marks;
    }

    /// Shares `flag` with the writer: damage either finds stops commits.
    pub fn set_damage_flag(&mut self, flag: salvage::DamageFlag) {
        self.damage = flag;
    }

    /// Keeps `bytes` of spare space beside the outbox for deleting
    /// acknowledged records on a full disk ([`Reserve`]); makes it now if
    /// there is room. Returns whether it is in place.
    pub fn with_reserve(self, bytes: u64) -> (Self, std::io::Result<bool>) {
        let made = {
            let mut r = self.reserve.borrow_mut();
            *r = Reserve::new(&self.path, bytes);
            r.replenish()
        };
        (self, made)
    }

    fn sql(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> OutboxError + '_ {
        sql_error(&self.path, &self.damage, op)
    }

    /// Records with `seq > after`, ascending, at most `max_records` and about
    /// `max_bytes` of payload (always at least one record if any exists).
    /// Reads only what it returns: a large backlog is never loaded whole.
    pub fn read_after(
        &self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, OutboxError> {
        let _reading = self.protected.reading();
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, stream, timestamp_ms, payload FROM records WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(self.sql("prepare read"))?;
        let mut rows = stmt
            .query(params![after as i64, max_records as i64])
            .map_err(self.sql("read records"))?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while let Some(row) = rows.next().map_err(self.sql("read records"))? {
            let record = record_from_row(row).map_err(self.sql("read records"))?;
            bytes += record.payload.len();
            out.push(record);
            if bytes >= max_bytes {
                break;
            }
        }
        if let Some(last) = out.last() {
            let before = self.protected.raise(last.seq);
            // Kept in the file too: after a restart, what the last run sent
            // may have been applied, and stays protected until the next
            // session's cursor says (a failed write only costs that).
            if last.seq > before {
                if let Err(e) = self.conn.execute(
                    "UPDATE meta SET value = MAX(value, ?1) WHERE key = 'sent_seq'",
                    [last.seq as i64],
                ) {
                    tracing::debug!(error = %e, "Cannot note the sent mark.");
                }
            }
        }
        Ok(out)
    }

    /// Delete every record with `seq <= through`: the aggregator has applied
    /// them durably. Also records when that happened.
    ///
    /// Writes nothing when there is nothing to delete. On a full disk it
    /// releases the reserve and tries once more; after deleting it takes
    /// the reserve back now and then, when there is room.
    pub fn delete_through(&self, through: u64) -> Result<usize, OutboxError> {
        self.delete_acked_ranges(through, &[])
    }

    /// [`Self::delete_through`], and the records of lane `.0` numbered
    /// `.1..=.2` in `ranges` (batches acknowledged out of order), in the
    /// same transaction and with the same full-disk retry (I-28).
    fn delete_acked_ranges(
        &self,
        through: u64,
        ranges: &[(u32, u64, u64)],
    ) -> Result<usize, OutboxError> {
        let (acked, first): (Option<i64>, Option<i64>) = self
            .conn
            .query_row(
                "SELECT (SELECT value FROM meta WHERE key = 'acked_seq'), (SELECT MIN(seq) FROM records)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(self.sql("read acknowledged mark"))?;
        let done = acked.is_some_and(|a| a as u64 >= through);
        if done && first.is_none_or(|f| f as u64 > through) && ranges.is_empty() {
            return Ok(0);
        }
        let n = match self.delete_through_once(through, ranges) {
            Err(e) if e.is_disk_full() => {
                let released = self.reserve.borrow_mut().release();
                if released == 0 {
                    return Err(e);
                }
                metrics::counter!(events::RESERVE_RELEASED_TOTAL).increment(1);
                tracing::warn!(
                    path = %self.path.display(),
                    released_bytes = released,
                    through,
                    "The disk is full: released the outbox's reserve so acknowledged records can be deleted; it is taken back when there is room."
                );
                self.delete_through_once(through, ranges)?
            }
            r => r?,
        };
        if let Err(e) = self.reserve.borrow_mut().replenish_now_and_then() {
            tracing::debug!(error = %e, "Cannot take the outbox's reserve back yet.");
        }
        Ok(n)
    }

    fn delete_through_once(
        &self,
        through: u64,
        ranges: &[(u32, u64, u64)],
    ) -> Result<usize, OutboxError> {
        let tx = write_tx(&self.conn).map_err(self.sql("begin delete"))?;
        let mut n = 0;
        for &(lane, first, last) in ranges {
            retention::subtract_range(&tx, lane, first, last)
                .map_err(self.sql("count lane usage"))?;
            n += tx
                .execute(
                    "DELETE FROM records WHERE lane = ?1 AND seq BETWEEN ?2 AND ?3",
                    params![lane, first as i64, last as i64],
                )
                .map_err(self.sql("delete acknowledged"))?;
        }
        retention::subtract_through(&tx, through).map_err(self.sql("count lane usage"))?;
        n += tx
            .execute("DELETE FROM records WHERE seq <= ?1", [through as i64])
            .map_err(self.sql("delete acknowledged"))?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('acked_seq', MAX(?1, COALESCE((SELECT value FROM meta WHERE key = 'acked_seq'), 0))), ('last_sync_ms', ?2)",
            params![through as i64, crate::clock::now_ms() as i64],
        )
        .map_err(self.sql("note sync"))?;
        tx.commit().map_err(self.sql("commit delete"))?;
        Ok(n)
    }

    /// The aggregator says it holds everything through `cursor`: delete that,
    /// and make sure new records are numbered above it (an outbox that was
    /// wiped must not reuse numbers the aggregator would ignore as duplicates).
    /// Writes nothing when both already hold (a reconnect on a full disk
    /// must not fail for want of a no-op write).
    pub fn accept_cursor(&self, cursor: u64) -> Result<usize, OutboxError> {
        // A session starts: nothing is in flight, the aggregator holds
        // everything through the cursor.
        self.reset_sent(cursor)?;
        let id = self.identity()?;
        if id.next_seq > cursor
            && id.acked_seq >= cursor
            && id.first_unsent.is_none_or(|f| f > cursor)
        {
            return Ok(0);
        }
        if id.next_seq > cursor {
            return self.delete_through(cursor);
        }
        self.conn
            .execute(
                "UPDATE meta SET value = MAX(value, ?1) WHERE key = 'next_seq'",
                [(cursor + 1) as i64],
            )
            .map_err(self.sql("raise next_seq"))?;
        self.delete_through(cursor)
    }

    /// This outbox's incarnation, numbering and acknowledgement state.
    pub fn identity(&self) -> Result<OutboxIdentity, OutboxError> {
        let meta = |key: &str| -> Result<Option<i64>, OutboxError> {
            use rusqlite::OptionalExtension;
            self.conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map_err(self.sql("read outbox identity"))
        };
        let first: Option<i64> = self
            .conn
            .query_row("SELECT MIN(seq) FROM records", [], |r| r.get(0))
            .map_err(self.sql("read outbox identity"))?;
        Ok(OutboxIdentity {
            incarnation: meta("incarnation")?.unwrap_or(0) as u64,
            next_seq: meta("next_seq")?.unwrap_or(1) as u64,
            acked_seq: meta("acked_seq")?.unwrap_or(0) as u64,
            first_unsent: first.map(|v| v as u64),
            epoch: meta("epoch")?.unwrap_or(0) as u64,
            epoch_start: meta("epoch_start")?.unwrap_or(1) as u64,
        })
    }

    /// The aggregator lost what it acknowledged above `cursor` (its store was
    /// restored): the alarm is raised, so this outbox stops claiming more.
    pub fn lower_acked(&self, cursor: u64) -> Result<(), OutboxError> {
        self.conn
            .execute(
                "UPDATE meta SET value = MIN(value, ?1) WHERE key = 'acked_seq'",
                [cursor as i64],
            )
            .map_err(self.sql("lower acked seq"))?;
        Ok(())
    }

    /// Moves every buffered record above `cursor`, keeping their order, and
    /// numbers new records after them: the aggregator's cursor belongs to
    /// another outbox (or an older copy of this one), so nothing here may be
    /// taken as already applied. Returns how many records moved and by how
    /// much. The acknowledged mark restarts at `cursor`.
    ///
    /// `above` (≥ `cursor`) is the highest seq the aggregator stores for the
    /// node, above its cursor when the node sent out of order: the records
    /// move above that.
    pub fn renumber_above(&self, cursor: u64, above: u64) -> Result<(usize, u64), OutboxError> {
        self.reset_sent(cursor)?;
        let above = above.max(cursor);
        let tx = write_tx(&self.conn).map_err(self.sql("begin renumber"))?;
        // Take the write lock first so the pipeline cannot number records in between.
        tx.execute("UPDATE meta SET value = value WHERE key = 'next_seq'", [])
            .map_err(self.sql("renumber"))?;
        let first: Option<i64> = tx
            .query_row("SELECT MIN(seq) FROM records", [], |r| r.get(0))
            .map_err(self.sql("renumber"))?;
        let offset = match first {
            Some(f) if (f as u64) <= above => above + 1 - f as u64,
            _ => 0,
        };
        let mut moved = 0;
        if offset > 0 {
            // Two steps through negative numbers: seq is the primary key, and
            // moving rows up in place would collide with rows not yet moved.
            moved = tx
                .execute("UPDATE records SET seq = -(seq + ?1)", [offset as i64])
                .map_err(self.sql("renumber"))?;
            tx.execute("UPDATE records SET seq = -seq", [])
                .map_err(self.sql("renumber"))?;
        }
        tx.execute(
            "UPDATE meta SET value = MAX(value + ?1, ?2) WHERE key = 'next_seq'",
            params![offset as i64, (above + 1) as i64],
        )
        .map_err(self.sql("renumber"))?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('acked_seq', ?1)",
            [cursor as i64],
        )
        .map_err(self.sql("renumber"))?;
        // The numbering of this epoch now starts above the cursor.
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch_start', ?1)",
            [(above + 1) as i64],
        )
        .map_err(self.sql("renumber"))?;
        tx.commit().map_err(self.sql("commit renumber"))?;
        Ok((moved, offset))
    }

    /// Gives this outbox a new incarnation (it turned out to be an older copy
    /// of a file the aggregator knows better). Returns the new one.
    pub fn rotate_incarnation(&self) -> Result<u64, OutboxError> {
        self.conn
            .execute(
                "UPDATE meta SET value = random() WHERE key = 'incarnation'",
                [],
            )
            .map_err(self.sql("rotate incarnation"))?;
        Ok(self.identity()?.incarnation)
    }

    /// Keeps an alarm for `fogline-edge status` (the newest 100 are kept).
    pub fn raise_alarm(&self, kind: &str, detail: &str) -> Result<(), OutboxError> {
        self.conn
            .execute(
                "INSERT INTO alarms (at_ms, kind, detail) VALUES (?1, ?2, ?3)",
                params![crate::clock::now_ms() as i64, kind, detail],
            )
            .and_then(|_| {
                self.conn.execute(
                    "DELETE FROM alarms WHERE id <= (SELECT MAX(id) FROM alarms) - 100",
                    [],
                )
            })
            .map_err(self.sql("raise alarm"))?;
        Ok(())
    }

    /// Record whether the uplink is connected, for `fogline-edge status`.
    pub fn note_connected(&self, connected: bool) -> Result<(), OutboxError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('uplink_connected', ?1)",
                [connected as i64],
            )
            .map_err(self.sql("note connection state"))?;
        Ok(())
    }

    /// Backlog, disk use and sync state.
    pub fn stats(&self) -> Result<OutboxStats, OutboxError> {
        stats::read(&self.conn, &self.path)
    }
}

/// Read the outbox's statistics from a read-only handle (for `status`).
pub fn read_stats(path: &Path) -> Result<OutboxStats, OutboxError> {
    let conn = open_connection(path, SyncMode::Full, true)?;
    stats::read(&conn, path)
}

#[cfg(test)]
mod tests;
