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
//! - A commit holds a batch's records, its dead letters and the MQTT delivery
//!   marks used for duplicate detection, all or nothing.
//! - A row is deleted only through [`OutboxReader::delete_through`], which the
//!   uplink calls with a sequence the aggregator acknowledged after its commit.
//!
//! The outbox knows nothing about MQTT or QUIC.

mod schema;
mod stats;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};

use crate::config::SyncMode;
use crate::message::Message;

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

/// A record as the uplink sends it.
pub type Record = fogline_cloud::protocol::Record;

/// An input a function (or ingest) refused, kept with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The pipeline it went through (or `ingest`).
    pub pipeline: String,
    /// The function that refused it (or the ingest check).
    pub function: String,
    /// Why.
    pub error: String,
    /// The refused message. Oversized payloads are truncated by the caller.
    pub message: Message,
    /// The payload's original size in bytes.
    pub payload_size: usize,
}

/// Marks an MQTT delivery as handled, for duplicate detection after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryMark {
    /// The MQTT packet id the broker used.
    pub pkid: u16,
    /// A digest of topic and payload.
    pub digest: u64,
}

/// One atomic commit.
#[derive(Debug, Default)]
pub struct Commit {
    /// Records to buffer, in order.
    pub records: Vec<Message>,
    /// Refused inputs.
    pub dead_letters: Vec<DeadLetter>,
    /// MQTT deliveries this commit finishes.
    pub delivered: Vec<DeliveryMark>,
}

impl Commit {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.dead_letters.is_empty() && self.delivered.is_empty()
    }
}

/// The sequence numbers a commit gave out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// First sequence number given out (meaningless when `records == 0`).
    pub first_seq: u64,
    /// How many records were written.
    pub records: usize,
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
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn sql(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> OutboxError + '_ {
        move |source| OutboxError::Sql {
            path: self.path.clone(),
            op,
            source,
        }
    }

    /// Every delivery mark on disk: the pipeline keeps them in memory.
    pub fn delivery_marks(&self) -> Result<Vec<DeliveryMark>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare("SELECT pkid, digest FROM ingest_dedup")
            .map_err(self.sql("read delivery marks"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(DeliveryMark {
                    pkid: r.get::<_, u16>(0)?,
                    digest: r.get::<_, i64>(1)? as u64,
                })
            })
            .map_err(self.sql("read delivery marks"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.sql("read delivery marks"))
    }

    /// Write one commit atomically. With `sync = full` it is on disk when this returns.
    pub fn commit(&mut self, commit: &Commit) -> Result<Committed, OutboxError> {
        let path = self.path.clone();
        let sql = |op: &'static str| {
            let path = path.clone();
            move |source| OutboxError::Sql { path, op, source }
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin"))?;
        let first_seq: u64 = tx
            .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(sql("read next_seq"))? as u64;
        if !commit.records.is_empty() {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO records (seq, stream, timestamp_ms, payload) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(sql("prepare insert"))?;
            for (i, m) in commit.records.iter().enumerate() {
                insert
                    .execute(params![
                        (first_seq + i as u64) as i64,
                        m.stream,
                        m.timestamp_ms as i64,
                        m.payload
                    ])
                    .map_err(sql("insert record"))?;
            }
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'next_seq'",
                [(first_seq + commit.records.len() as u64) as i64],
            )
            .map_err(sql("advance next_seq"))?;
        }
        if !commit.dead_letters.is_empty() {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO dead_letters (created_ms, pipeline, function, error, stream, timestamp_ms, payload_size, payload) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
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
                        d.message.payload
                    ])
                    .map_err(sql("insert dead letter"))?;
            }
        }
        if !commit.delivered.is_empty() {
            let mut upsert = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO ingest_dedup (pkid, digest) VALUES (?1, ?2)",
                )
                .map_err(sql("prepare delivery mark"))?;
            for d in &commit.delivered {
                upsert
                    .execute(params![d.pkid, d.digest as i64])
                    .map_err(sql("write delivery mark"))?;
            }
        }
        tx.commit().map_err(sql("commit"))?;
        Ok(Committed {
            first_seq,
            records: commit.records.len(),
        })
    }

    /// Keep the dead-letter table bounded: drop all but the newest `keep`.
    pub fn prune_dead_letters(&mut self, keep: u64) -> Result<usize, OutboxError> {
        self.conn
            .execute(
                "DELETE FROM dead_letters WHERE id <= (SELECT MAX(id) FROM dead_letters) - ?1",
                [keep as i64],
            )
            .map_err(self.sql("prune dead letters"))
    }
}

/// The uplink's side: reads batches, deletes acknowledged rows.
pub struct OutboxReader {
    conn: Connection,
    path: PathBuf,
}

impl OutboxReader {
    /// Open a second handle on an outbox the writer already created.
    pub fn open(path: &Path, sync: SyncMode) -> Result<Self, OutboxError> {
        Ok(Self {
            conn: open_connection(path, sync, false)?,
            path: path.to_path_buf(),
        })
    }

    fn sql(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> OutboxError + '_ {
        move |source| OutboxError::Sql {
            path: self.path.clone(),
            op,
            source,
        }
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
            let payload: Vec<u8> = row.get(3).map_err(self.sql("read records"))?;
            bytes += payload.len();
            out.push(Record {
                seq: row.get::<_, i64>(0).map_err(self.sql("read records"))? as u64,
                stream: row.get(1).map_err(self.sql("read records"))?,
                timestamp_ms: row.get::<_, i64>(2).map_err(self.sql("read records"))? as u64,
                payload,
            });
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Delete every record with `seq <= through`: the aggregator has applied
    /// them durably. Also records when that happened.
    pub fn delete_through(&self, through: u64) -> Result<usize, OutboxError> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(self.sql("begin delete"))?;
        let n = tx
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
    pub fn accept_cursor(&self, cursor: u64) -> Result<usize, OutboxError> {
        self.conn
            .execute(
                "UPDATE meta SET value = MAX(value, ?1) WHERE key = 'next_seq'",
                [(cursor + 1) as i64],
            )
            .map_err(self.sql("raise next_seq"))?;
        self.delete_through(cursor)
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
