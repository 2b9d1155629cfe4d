//! Outputs kept for durable local subscribers (pipelines with
//! `local = "durable"`), and where each subscriber is (I-40).
//!
//! `local_out` rows are written in the same transaction as the outputs'
//! records, so an output a subscriber may get is exactly one the outbox
//! kept. Each durable subscriber has a row in `local_subscribers`: its
//! filters, `acked` (every row up to it was delivered or is not its) and
//! the QoS 2 rows it got a PUBREC for (a PUBREL is owed, never the PUBLISH
//! again). Rows every subscriber passed are deleted; beyond
//! `outbox.local_max_bytes` the oldest go, counted.

use std::sync::Arc;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

use crate::message::Message;

/// One kept output, as subscribers get it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalRow {
    /// Its place in `local_out` (increasing, never reused).
    pub id: u64,
    /// Its topic (the output's stream).
    pub topic: Arc<str>,
    /// Its payload.
    pub payload: Bytes,
}

/// A durable subscriber's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSubscriber {
    /// Its MQTT client id.
    pub client: String,
    /// Topic filters and the QoS granted for each (1 or 2).
    pub filters: Vec<(String, u8)>,
    /// Every row up to this id was acknowledged by it or does not match.
    pub acked: u64,
    /// Rows above `acked` it sent PUBREC for: owed a PUBREL only.
    pub released: Vec<u64>,
    /// Its session expiry (0: dropped when it disconnects).
    pub expiry_secs: u32,
    /// When it was last heard of (ms since epoch).
    pub seen_ms: u64,
}

/// A change to `local_subscribers`, committed with a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum SubscriberWrite {
    /// Create or replace.
    Put(StoredSubscriber),
    /// Forget it (clean start, or it unsubscribed from everything).
    Delete(String),
}

pub(super) fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    // AUTOINCREMENT: ids are never reused, even once every row is deleted,
    // so a cursor never skips a new row that took an old id.
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS local_out (
             id      INTEGER PRIMARY KEY AUTOINCREMENT,
             topic   TEXT NOT NULL,
             payload BLOB NOT NULL
         );
         CREATE TABLE IF NOT EXISTS local_subscribers (
             client TEXT PRIMARY KEY,
             record TEXT NOT NULL
         );
         INSERT OR IGNORE INTO meta (key, value) VALUES ('local_bytes', 0);",
    )
}

fn row_bytes(topic: &str, payload: &[u8]) -> i64 {
    (topic.len() + payload.len()) as i64
}

/// Writes `outputs` and the subscriber changes; returns the rows as written
/// and how many old rows were dropped to stay under `max_bytes`.
pub(super) fn write(
    tx: &Transaction<'_>,
    outputs: &[Message],
    subscribers: &[SubscriberWrite],
    max_bytes: u64,
) -> rusqlite::Result<(Vec<LocalRow>, u64)> {
    for w in subscribers {
        match w {
            SubscriberWrite::Put(s) => {
                let record = serde_json::to_string(s)
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO local_subscribers (client, record) VALUES (?1, ?2)",
                )?
                .execute(params![s.client, record])?;
            }
            SubscriberWrite::Delete(client) => {
                tx.prepare_cached("DELETE FROM local_subscribers WHERE client = ?1")?
                    .execute([client])?;
            }
        }
    }
    if outputs.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let mut rows = Vec::with_capacity(outputs.len());
    let mut added = 0i64;
    {
        let mut insert =
            tx.prepare_cached("INSERT INTO local_out (topic, payload) VALUES (?1, ?2)")?;
        for m in outputs {
            insert.execute(params![m.stream, m.payload])?;
            added += row_bytes(&m.stream, &m.payload);
            rows.push(LocalRow {
                id: tx.last_insert_rowid() as u64,
                topic: Arc::from(m.stream.as_str()),
                payload: Bytes::copy_from_slice(&m.payload),
            });
        }
    }
    let total: i64 = tx.query_row(
        "UPDATE meta SET value = value + ?1 WHERE key = 'local_bytes' RETURNING value",
        [added],
        |r| r.get(0),
    )?;
    let mut dropped = 0u64;
    if total as u64 > max_bytes {
        // Oldest first, down to 90 % of the bound: drops come in runs,
        // not one row per commit.
        let target = (max_bytes / 10 * 9) as i64;
        let mut over = total - target;
        let mut cut = 0i64;
        let mut freed = 0i64;
        {
            let mut st = tx.prepare_cached(
                "SELECT id, length(topic) + length(payload) FROM local_out ORDER BY id",
            )?;
            let mut q = st.query([])?;
            while over > 0 {
                let Some(r) = q.next()? else { break };
                let (id, b): (i64, i64) = (r.get(0)?, r.get(1)?);
                cut = id;
                freed += b;
                over -= b;
                dropped += 1;
            }
        }
        tx.prepare_cached("DELETE FROM local_out WHERE id <= ?1")?
            .execute([cut])?;
        tx.prepare_cached("UPDATE meta SET value = value - ?1 WHERE key = 'local_bytes'")?
            .execute([freed])?;
    }
    Ok((rows, dropped))
}

/// Every durable subscriber on file.
pub(super) fn load(conn: &Connection) -> rusqlite::Result<Vec<StoredSubscriber>> {
    let mut st = conn.prepare("SELECT client, record FROM local_subscribers")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for r in rows {
        let (client, record) = r?;
        match serde_json::from_str::<StoredSubscriber>(&record) {
            Ok(s) => out.push(s),
            Err(e) => {
                tracing::warn!(client = %client, error = %e, "A durable local subscriber's record is unreadable; it is forgotten (it subscribes again).")
            }
        }
    }
    Ok(out)
}

/// The highest id ever given to a row (0: none).
pub(super) fn last_id(conn: &Connection) -> rusqlite::Result<u64> {
    Ok(conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'local_out'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .unwrap_or(0) as u64)
}

/// Up to `limit` rows from id `from` on, in order.
pub(super) fn read(conn: &Connection, from: u64, limit: usize) -> rusqlite::Result<Vec<LocalRow>> {
    let mut st = conn.prepare_cached(
        "SELECT id, topic, payload FROM local_out WHERE id >= ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = st.query_map(params![from as i64, limit as i64], |r| {
        Ok(LocalRow {
            id: r.get::<_, i64>(0)? as u64,
            topic: Arc::from(r.get::<_, String>(1)?.as_str()),
            payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
        })
    })?;
    rows.collect()
}

/// Forgets subscribers whose session expired (`connected` ones never), and
/// deletes rows every remaining subscriber has passed. Returns the
/// subscribers forgotten.
pub(super) fn trim(
    tx: &Transaction<'_>,
    now_ms: u64,
    connected: &dyn Fn(&str) -> bool,
) -> rusqlite::Result<Vec<String>> {
    let mut expired = Vec::new();
    let mut floor: Option<u64> = None;
    for s in load(tx)? {
        let gone = !connected(&s.client)
            && (s.expiry_secs == 0
                || now_ms > s.seen_ms.saturating_add(u64::from(s.expiry_secs) * 1000));
        if gone {
            expired.push(s.client);
        } else {
            floor = Some(floor.map_or(s.acked, |f| f.min(s.acked)));
        }
    }
    for c in &expired {
        tx.prepare_cached("DELETE FROM local_subscribers WHERE client = ?1")?
            .execute([c])?;
    }
    // Nobody left: nothing is owed to anyone.
    let upto = floor.unwrap_or(u64::MAX >> 1) as i64;
    let freed: i64 = tx.query_row(
        "SELECT COALESCE(SUM(length(topic) + length(payload)), 0) FROM local_out WHERE id <= ?1",
        [upto],
        |r| r.get(0),
    )?;
    if freed > 0 {
        tx.prepare_cached("DELETE FROM local_out WHERE id <= ?1")?
            .execute([upto])?;
        tx.prepare_cached("UPDATE meta SET value = MAX(0, value - ?1) WHERE key = 'local_bytes'")?
            .execute([freed])?;
    }
    Ok(expired)
}

/// Reads `local_out` for subscribers catching up, on its own connection
/// (the endpoint's tasks use it from blocking threads).
pub struct LocalReader {
    conn: std::sync::Mutex<Connection>,
}

impl LocalReader {
    /// Opens a read-only handle on the outbox at `path`.
    pub fn open(path: &std::path::Path) -> Result<Self, super::OutboxError> {
        Ok(Self {
            conn: std::sync::Mutex::new(super::open_connection(
                path,
                crate::config::SyncMode::Normal,
                true,
            )?),
        })
    }

    /// Up to `limit` rows from id `from` on.
    pub fn read(&self, from: u64, limit: usize) -> rusqlite::Result<Vec<LocalRow>> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| rusqlite::Error::InvalidQuery)?;
        read(&conn, from, limit)
    }
}

impl std::fmt::Debug for LocalReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalReader")
    }
}
