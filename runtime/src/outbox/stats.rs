//! What `fogline-edge status` and the metrics report about the buffer.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;

use super::OutboxError;

/// Backlog, disk use and sync state.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct OutboxStats {
    /// Records not yet acknowledged by the aggregator.
    pub backlog_records: u64,
    /// Their payload bytes.
    pub backlog_bytes: u64,
    /// Timestamp of the oldest unsynced record.
    pub oldest_unsynced_ms: Option<u64>,
    /// The next sequence number to be given out.
    pub next_seq: u64,
    /// Highest sequence the aggregator acknowledged.
    pub acked_seq: u64,
    /// When the aggregator last acknowledged anything.
    pub last_sync_ms: Option<u64>,
    /// Whether the uplink was connected when it last said.
    pub uplink_connected: bool,
    /// Dead letters kept.
    pub dead_letters: u64,
    /// Size of the database files (db + WAL).
    pub disk_bytes: u64,
    /// This outbox file's incarnation (sent to the aggregator).
    #[serde(default)]
    pub incarnation: u64,
    /// The most recent alarms (newest first, at most 5).
    #[serde(default)]
    pub alarms: Vec<super::Alarm>,
    /// When the oldest buffered record was committed (node clock).
    #[serde(default)]
    pub oldest_committed_ms: Option<u64>,
    /// Bytes the dead letters hold.
    #[serde(default)]
    pub dead_letter_bytes: u64,
    /// What was lost (or dead-lettered), by stream and reason (I-33).
    #[serde(default)]
    pub losses: Vec<super::LossTotal>,
}

fn meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

pub(super) fn read(conn: &Connection, path: &Path) -> Result<OutboxStats, OutboxError> {
    let sql = |source| OutboxError::Sql {
        path: path.to_path_buf(),
        op: "read stats",
        source,
    };
    // Kept per lane with the rows: no scan of a large backlog.
    let (records, bytes): (i64, i64) = conn
        .query_row(
            "SELECT COALESCE(SUM(records), 0), COALESCE(SUM(bytes), 0) FROM lane_usage",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(sql)?;
    let oldest: Option<i64> = conn
        .query_row(
            "SELECT timestamp_ms FROM records ORDER BY seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql)?;
    let dead: i64 = conn
        .query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0))
        .map_err(sql)?;
    let file = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    };
    let mut stmt = conn
        .prepare("SELECT at_ms, kind, detail FROM alarms ORDER BY id DESC LIMIT 5")
        .map_err(sql)?;
    let alarms = stmt
        .query_map([], |r| {
            Ok(super::Alarm {
                at_ms: r.get::<_, i64>(0)? as u64,
                kind: r.get(1)?,
                detail: r.get(2)?,
            })
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(sql)?;
    Ok(OutboxStats {
        backlog_records: records as u64,
        backlog_bytes: bytes as u64,
        oldest_unsynced_ms: oldest.map(|v| v as u64),
        next_seq: meta(conn, "next_seq").map_err(sql)?.unwrap_or(1) as u64,
        acked_seq: meta(conn, "acked_seq").map_err(sql)?.unwrap_or(0) as u64,
        last_sync_ms: meta(conn, "last_sync_ms").map_err(sql)?.map(|v| v as u64),
        uplink_connected: meta(conn, "uplink_connected").map_err(sql)?.unwrap_or(0) != 0,
        dead_letters: dead as u64,
        disk_bytes: file("") + file("-wal"),
        incarnation: meta(conn, "incarnation").map_err(sql)?.unwrap_or(0) as u64,
        alarms,
        oldest_committed_ms: super::retention::oldest_committed_ms(conn).map_err(sql)?,
        dead_letter_bytes: meta(conn, "dead_letter_bytes")
            .map_err(sql)?
            .unwrap_or(0)
            .max(0) as u64,
        losses: super::losses::totals(conn).map_err(sql)?,
    })
}
