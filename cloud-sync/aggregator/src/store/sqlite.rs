//! Embedded SQLite store (WAL, synchronous=FULL: an acked batch survives power loss).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    ApplyOutcome, LossSummary, NodeSummary, RecordQuery, Store, StoreError, StoredLoss,
    StoredRecord, MAX_QUERY_LIMIT,
};
use fogline_protocol::session::StoredCursor;
use fogline_protocol::DecodedBatch;
use fogline_protocol::{LossReport, LOSS_STREAM};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    stream TEXT NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    payload BLOB NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (node, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cursors (
    node TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
-- What each node lost or dead-lettered, as it reported it (I-33): one row
-- per loss record, applied exactly once with the data.
CREATE TABLE IF NOT EXISTS losses (
    node TEXT NOT NULL,
    seq INTEGER NOT NULL,
    stream TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT,
    records INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    first_seq INTEGER,
    last_seq INTEGER,
    first_ms INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (node, seq)
) WITHOUT ROWID;
-- Acknowledged records a node's store lost (a restore from backup).
CREATE TABLE IF NOT EXISTS gaps (
    node TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    detected_ms INTEGER NOT NULL
);
";

/// Additive migrations for files made by older versions.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_incarnation: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('cursors') WHERE name = 'incarnation'")?
        .exists([])?;
    if !has_incarnation {
        conn.execute_batch("ALTER TABLE cursors ADD COLUMN incarnation INTEGER")?;
    }
    let has_epoch: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('cursors') WHERE name = 'epoch'")?
        .exists([])?;
    if !has_epoch {
        conn.execute_batch("ALTER TABLE cursors ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0")?;
    }
    // The highest seq stored, above the cursor when a node sends out of
    // order (protocol 4): what a renumbered outbox must clear.
    let has_top: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('cursors') WHERE name = 'top'")?
        .exists([])?;
    if !has_top {
        conn.execute_batch("ALTER TABLE cursors ADD COLUMN top INTEGER NOT NULL DEFAULT 0")?;
    }
    Ok(())
}

/// SQLite-backed [`Store`]. One writer connection and one reader connection
/// (WAL lets queries run while a batch is being applied).
pub struct SqliteStore {
    path: String,
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

// SQLite stores INTEGER as i64; seqs and times are u64 on our side. Values
// above i64::MAX are stored as their two's-complement bit pattern and read back
// identically; ordering in SQL is only relied on below 2^63.
fn to_sql(v: u64) -> i64 {
    v as i64
}
fn from_sql(v: i64) -> u64 {
    v as u64
}

fn lock(m: &Mutex<Connection>) -> Result<MutexGuard<'_, Connection>, StoreError> {
    m.lock().map_err(|_| StoreError::Poisoned)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path_str = path.as_ref().display().to_string();
        let open_err = |source| StoreError::Open {
            path: path_str.clone(),
            source,
        };
        let writer = Connection::open(path.as_ref()).map_err(open_err)?;
        writer
            .execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;",
            )
            .map_err(open_err)?;
        writer.execute_batch(SCHEMA).map_err(open_err)?;
        migrate(&writer).map_err(open_err)?;
        let reader = Connection::open(path.as_ref()).map_err(open_err)?;
        reader
            .execute_batch("PRAGMA busy_timeout=5000; PRAGMA query_only=1;")
            .map_err(open_err)?;
        Ok(Self {
            path: path_str,
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `PRAGMA quick_check`, given up after `budget`.
    pub fn quick_check(
        &self,
        budget: std::time::Duration,
    ) -> Result<fogline_integrity::Integrity, StoreError> {
        let conn = lock(&self.reader)?;
        fogline_integrity::quick_check(&conn, budget).map_err(q_err("integrity check", None))
    }
}

fn q_err<'a>(
    op: &'static str,
    node: Option<&'a str>,
) -> impl FnOnce(rusqlite::Error) -> StoreError + 'a {
    move |source| StoreError::Query {
        op,
        node: node.map(str::to_owned),
        source,
    }
}

fn insert_loss(
    conn: &Connection,
    node: &str,
    seq: u64,
    l: &LossReport,
    now_ms: u64,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO losses (node, seq, stream, reason, detail, records, bytes, \
         first_seq, last_seq, first_ms, last_ms, received_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        node,
        to_sql(seq),
        l.stream,
        l.reason.as_str(),
        l.detail,
        to_sql(l.records),
        to_sql(l.bytes),
        l.first_seq.map(to_sql),
        l.last_seq.map(to_sql),
        to_sql(l.first_ms),
        to_sql(l.last_ms),
        to_sql(now_ms)
    ])
}

fn loss_summaries(conn: &Connection, node: &str) -> rusqlite::Result<Vec<LossSummary>> {
    conn.prepare_cached(
        "SELECT stream, reason, SUM(records), SUM(bytes), MIN(first_seq), MAX(last_seq), \
         MIN(first_ms), MAX(last_ms), COUNT(*) FROM losses WHERE node = ?1 \
         GROUP BY stream, reason ORDER BY SUM(records) DESC, stream, reason LIMIT 1000",
    )?
    .query_map([node], |r| {
        Ok(LossSummary {
            stream: r.get(0)?,
            reason: r.get(1)?,
            records: from_sql(r.get(2)?),
            bytes: from_sql(r.get(3)?),
            first_seq: r.get::<_, Option<i64>>(4)?.map(from_sql),
            last_seq: r.get::<_, Option<i64>>(5)?.map(from_sql),
            first_ms: from_sql(r.get(6)?),
            last_ms: from_sql(r.get(7)?),
            reports: from_sql(r.get(8)?),
        })
    })?
    .collect()
}

fn read_cursor(conn: &Connection, node: &str) -> Result<StoredCursor, StoreError> {
    conn.prepare_cached("SELECT seq, incarnation, epoch, top FROM cursors WHERE node = ?1")
        .and_then(|mut st| {
            st.query_row([node], |r| {
                Ok(StoredCursor {
                    seq: from_sql(r.get(0)?),
                    incarnation: r.get::<_, Option<i64>>(1)?.map(from_sql),
                    epoch: from_sql(r.get(2)?),
                    top: from_sql(r.get(3)?),
                })
            })
            .optional()
        })
        .map(Option::unwrap_or_default)
        .map_err(q_err("read cursor", Some(node)))
}

impl Store for SqliteStore {
    fn apply(
        &self,
        node: &str,
        (incarnation, epoch): (u64, u64),
        batches: &[DecodedBatch],
        through: u64,
        now_ms: u64,
    ) -> Result<ApplyOutcome, StoreError> {
        let mut conn = lock(&self.writer)?;
        let err = |op| q_err(op, Some(node));
        let tx = conn.transaction().map_err(err("begin"))?;
        let stored = read_cursor(&tx, node)?;
        let cursor = stored.seq;
        let mut inserted = 0;
        let mut skipped = 0;
        let mut top = stored.top();
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO records (node, seq, stream, timestamp_ms, payload, received_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(err("prepare insert"))?;
            for r in batches.iter().flat_map(DecodedBatch::iter) {
                if r.seq <= cursor {
                    skipped += 1;
                    continue;
                }
                top = top.max(r.seq);
                // A loss report is filed apart from the data (I-33); one
                // that does not parse is kept as a record, never dropped.
                if r.stream == LOSS_STREAM {
                    match LossReport::decode(r.payload) {
                        Ok(l) => {
                            let n = insert_loss(&tx, node, r.seq, &l, now_ms)
                                .map_err(err("insert loss report"))?;
                            if n == 1 {
                                inserted += 1;
                            } else {
                                skipped += 1;
                            }
                            continue;
                        }
                        Err(e) => tracing::warn!(
                            node,
                            seq = r.seq,
                            error = %e,
                            "A loss report does not parse; stored as an ordinary record."
                        ),
                    }
                }
                let n = ins
                    .execute(params![
                        node,
                        to_sql(r.seq),
                        r.stream,
                        to_sql(r.timestamp_ms),
                        r.payload,
                        to_sql(now_ms)
                    ])
                    .map_err(err("insert record"))?;
                if n == 1 {
                    inserted += 1;
                } else {
                    skipped += 1;
                }
            }
        }
        let new_cursor = cursor.max(through);
        let top = top.max(new_cursor);
        if new_cursor != cursor
            || inserted > 0
            || stored.incarnation != Some(incarnation)
            || stored.epoch != epoch
        {
            tx.prepare_cached(
                "INSERT INTO cursors (node, seq, updated_ms, incarnation, epoch, top) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT(node) DO UPDATE SET seq = excluded.seq, updated_ms = excluded.updated_ms, \
                 incarnation = excluded.incarnation, epoch = excluded.epoch, top = excluded.top",
            )
            .and_then(|mut st| {
                st.execute(params![
                    node,
                    to_sql(new_cursor),
                    to_sql(now_ms),
                    to_sql(incarnation),
                    to_sql(epoch),
                    to_sql(top)
                ])
            })
            .map_err(err("advance cursor"))?;
        }
        tx.commit().map_err(err("commit"))?;
        Ok(ApplyOutcome {
            cursor: new_cursor,
            inserted,
            skipped,
        })
    }

    fn cursor(&self, node: &str) -> Result<StoredCursor, StoreError> {
        let conn = lock(&self.writer)?;
        read_cursor(&conn, node)
    }

    fn record_gap(&self, node: &str, from: u64, to: u64, now_ms: u64) -> Result<(), StoreError> {
        let conn = lock(&self.writer)?;
        conn.execute(
            "INSERT INTO gaps (node, first_seq, last_seq, detected_ms) \
             SELECT ?1, ?2, ?3, ?4 WHERE NOT EXISTS \
             (SELECT 1 FROM gaps WHERE node = ?1 AND first_seq <= ?2 AND last_seq >= ?3)",
            params![node, to_sql(from), to_sql(to), to_sql(now_ms)],
        )
        .map(drop)
        .map_err(q_err("record gap", Some(node)))
    }

    fn records(&self, query: &RecordQuery) -> Result<Vec<StoredRecord>, StoreError> {
        let conn = lock(&self.reader)?;
        let limit = query.limit.min(MAX_QUERY_LIMIT) as i64;
        let node = query.node.as_str();
        let map = |r: &rusqlite::Row<'_>| {
            Ok(StoredRecord {
                node: query.node.clone(),
                seq: from_sql(r.get(0)?),
                stream: r.get(1)?,
                timestamp_ms: from_sql(r.get(2)?),
                payload: r.get(3)?,
                received_ms: from_sql(r.get(4)?),
            })
        };
        let cols = "SELECT seq, stream, timestamp_ms, payload, received_ms FROM records";
        let result = match &query.stream {
            Some(stream) => conn
                .prepare_cached(&format!(
                    "{cols} WHERE node = ?1 AND seq > ?2 AND stream = ?3 ORDER BY seq LIMIT ?4"
                ))
                .and_then(|mut st| {
                    st.query_map(params![node, to_sql(query.after_seq), stream, limit], map)?
                        .collect::<Result<Vec<_>, _>>()
                }),
            None => conn
                .prepare_cached(&format!(
                    "{cols} WHERE node = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
                ))
                .and_then(|mut st| {
                    st.query_map(params![node, to_sql(query.after_seq), limit], map)?
                        .collect::<Result<Vec<_>, _>>()
                }),
        };
        result.map_err(q_err("query records", Some(node)))
    }

    fn nodes(&self) -> Result<Vec<NodeSummary>, StoreError> {
        let conn = lock(&self.reader)?;
        conn.prepare_cached(
            // A node known only by a gap (its store was lost, nothing
            // applied since) is listed too: the loss is the news.
            "SELECT n.node, COALESCE(c.seq, 0), \
             COALESCE(c.updated_ms, (SELECT MAX(g.detected_ms) FROM gaps g WHERE g.node = n.node)), \
             (SELECT COUNT(*) FROM records r WHERE r.node = n.node), c.incarnation, \
             (SELECT COALESCE(SUM(g.last_seq - g.first_seq + 1), 0) FROM gaps g WHERE g.node = n.node) \
             FROM (SELECT node FROM cursors UNION SELECT node FROM gaps) n \
             LEFT JOIN cursors c ON c.node = n.node ORDER BY n.node",
        )
        .and_then(|mut st| {
            st.query_map([], |r| {
                Ok(NodeSummary {
                    node: r.get(0)?,
                    cursor: from_sql(r.get(1)?),
                    last_update_ms: from_sql(r.get(2)?),
                    records: from_sql(r.get(3)?),
                    incarnation: r.get::<_, Option<i64>>(4)?.map(from_sql),
                    lost_records: from_sql(r.get(5)?),
                    losses: Vec::new(),
                })
            })?
            .collect::<Result<Vec<_>, _>>()
        })
        .and_then(|mut nodes| {
            for n in &mut nodes {
                n.losses = loss_summaries(&conn, &n.node)?;
            }
            Ok(nodes)
        })
        .map_err(q_err("list nodes", None))
    }

    fn losses(
        &self,
        node: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredLoss>, StoreError> {
        let conn = lock(&self.reader)?;
        conn.prepare_cached(
            "SELECT seq, stream, reason, detail, records, bytes, first_seq, last_seq, first_ms, \
             last_ms, received_ms FROM losses WHERE node = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )
        .and_then(|mut st| {
            st.query_map(
                params![node, to_sql(after_seq), limit.min(MAX_QUERY_LIMIT) as i64],
                |r| {
                    Ok(StoredLoss {
                        seq: from_sql(r.get(0)?),
                        stream: r.get(1)?,
                        reason: r.get(2)?,
                        detail: r.get(3)?,
                        records: from_sql(r.get(4)?),
                        bytes: from_sql(r.get(5)?),
                        first_seq: r.get::<_, Option<i64>>(6)?.map(from_sql),
                        last_seq: r.get::<_, Option<i64>>(7)?.map(from_sql),
                        first_ms: from_sql(r.get(8)?),
                        last_ms: from_sql(r.get(9)?),
                        received_ms: from_sql(r.get(10)?),
                    })
                },
            )?
            .collect::<Result<Vec<_>, _>>()
        })
        .map_err(q_err("query losses", Some(node)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use fogline_protocol::{decode_batch, encode_batch, Record};
    use fogline_testkit::samples::sample_readings;

    /// The records as one decoded batch (none for an empty slice).
    fn b(records: &[Record]) -> Vec<DecodedBatch> {
        if records.is_empty() {
            return Vec::new();
        }
        vec![decode_batch(&encode_batch(records, 3).unwrap()).unwrap()]
    }

    /// I-33: a loss report rides the ordered stream: filed apart from the
    /// data, exactly once, summed per stream and reason for `/api/v1/nodes`.
    #[test]
    fn loss_reports_are_filed_once_and_summed() {
        let (_d, s) = store();
        let report = |first: u64, last: u64| fogline_protocol::LossReport {
            stream: "s/1".into(),
            reason: fogline_protocol::LossReason::Quota,
            detail: Some("outbox.max_bytes".into()),
            records: last - first + 1,
            bytes: 10 * (last - first + 1),
            first_seq: Some(first),
            last_seq: Some(last),
            first_ms: first,
            last_ms: last,
        };
        let rec = |seq: u64, stream: &str, payload: Vec<u8>| Record {
            seq,
            stream: stream.into(),
            timestamp_ms: seq,
            payload,
        };
        let batch = vec![
            rec(11, "s/1", b"{}".to_vec()),
            rec(12, LOSS_STREAM, report(1, 10).encode()),
            rec(23, "s/1", b"{}".to_vec()),
            rec(24, LOSS_STREAM, report(13, 22).encode()),
            rec(25, LOSS_STREAM, b"not json".to_vec()),
        ];
        let out = s.apply("n", (1, 1), &b(&batch), 25, 5).unwrap();
        assert_eq!(out.inserted, 5);
        // Applied again (a resend): nothing twice.
        let again = s.apply("n", (1, 1), &b(&batch), 25, 6).unwrap();
        assert_eq!((again.inserted, again.skipped), (0, 5));
        let data: Vec<u64> = all(&s, "n");
        assert_eq!(
            data,
            vec![11, 23, 25],
            "an unreadable report is kept as data"
        );
        let nodes = s.nodes().unwrap();
        let l = &nodes[0].losses;
        assert_eq!(l.len(), 1);
        assert_eq!((l[0].records, l[0].reports), (20, 2));
        assert_eq!((l[0].first_seq, l[0].last_seq), (Some(1), Some(22)));
        assert_eq!(l[0].reason, "quota");
        let listed = s.losses("n", 0, 10).unwrap();
        assert_eq!(
            listed.iter().map(|l| l.seq).collect::<Vec<_>>(),
            vec![12, 24]
        );
        assert_eq!(s.losses("n", 12, 10).unwrap().len(), 1);
    }

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path().join("t.db")).unwrap();
        (dir, s)
    }

    fn all(s: &SqliteStore, node: &str) -> Vec<u64> {
        s.records(&RecordQuery {
            node: node.into(),
            stream: None,
            after_seq: 0,
            limit: MAX_QUERY_LIMIT,
        })
        .unwrap()
        .into_iter()
        .map(|r| r.seq)
        .collect()
    }

    #[test]
    fn apply_is_idempotent_and_overlaps_are_skipped() {
        let (_d, s) = store();
        let recs = sample_readings(30, 3, 7);
        assert_eq!(s.cursor("n1").unwrap().seq, 0);
        let a = s.apply("n1", (9, 1), &b(&recs[..10]), 10, 1).unwrap();
        assert_eq!((a.cursor, a.inserted, a.skipped), (10, 10, 0));
        // Same batch again: nothing inserted.
        let a = s.apply("n1", (9, 1), &b(&recs[..10]), 10, 2).unwrap();
        assert_eq!((a.cursor, a.inserted, a.skipped), (10, 0, 10));
        // Overlapping batch 6..=20: only 11..=20 inserted.
        let a = s.apply("n1", (9, 1), &b(&recs[5..20]), 20, 3).unwrap();
        assert_eq!((a.cursor, a.inserted, a.skipped), (20, 10, 5));
        assert_eq!(all(&s, "n1"), (1..=20).collect::<Vec<_>>());
        // Other nodes are independent.
        assert_eq!(s.cursor("n2").unwrap().seq, 0);
        assert_eq!(
            s.apply("n2", (9, 1), &b(&recs[..3]), 3, 4)
                .unwrap()
                .inserted,
            3
        );
        let nodes = s.nodes().unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(
            (nodes[0].node.as_str(), nodes[0].cursor, nodes[0].records),
            ("n1", 20, 20)
        );
        assert_eq!(nodes[0].incarnation, Some(9));
        assert_eq!(
            s.cursor("n1").unwrap(),
            StoredCursor {
                seq: 20,
                incarnation: Some(9),
                epoch: 1,
                top: 20,
            }
        );
        s.record_gap("n1", 11, 20, 5).unwrap();
        s.record_gap("n1", 11, 20, 6).unwrap();
        s.record_gap("n1", 12, 15, 7).unwrap();
        assert_eq!(s.nodes().unwrap()[0].lost_records, 10, "each gap once");
        // A node known only by its gap (a lost store) is listed.
        s.record_gap("n9", 1, 40, 8).unwrap();
        let n9 = s
            .nodes()
            .unwrap()
            .into_iter()
            .find(|n| n.node == "n9")
            .unwrap();
        assert_eq!((n9.cursor, n9.records, n9.lost_records), (0, 0, 40));
        assert_eq!((n9.incarnation, n9.last_update_ms), (None, 8));
    }

    #[test]
    fn cursor_only_moves_with_apply_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let recs = sample_readings(10, 2, 1);
        {
            let s = SqliteStore::open(&path).unwrap();
            s.apply("n1", (9, 1), &b(&recs[..4]), 4, 1).unwrap();
            assert_eq!(s.cursor("n1").unwrap().seq, 4);
            // Reading does not move it.
            let _ = s.records(&RecordQuery {
                node: "n1".into(),
                stream: None,
                after_seq: 0,
                limit: 10,
            });
            assert_eq!(s.cursor("n1").unwrap().seq, 4);
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.cursor("n1").unwrap().seq, 4);
        // A batch whose records were all skipped can still advance the cursor
        // over a gap (seqs are not dense).
        let a = s.apply("n1", (9, 1), &b(&[]), 7, 2).unwrap();
        assert_eq!(a.cursor, 7);
        let a = s.apply("n1", (9, 1), &b(&recs[4..]), 10, 3).unwrap();
        assert_eq!((a.inserted, a.skipped), (3, 3));
    }

    #[test]
    fn records_query_filters_by_stream_after_and_limit() {
        let (_d, s) = store();
        let recs = sample_readings(20, 2, 3); // streams sensors/s0, sensors/s1 alternating
        s.apply("n1", (9, 1), &b(&recs), 20, 9).unwrap();
        let q = |stream: Option<&str>, after_seq, limit| {
            s.records(&RecordQuery {
                node: "n1".into(),
                stream: stream.map(str::to_owned),
                after_seq,
                limit,
            })
            .unwrap()
        };
        let r = q(Some("sensors/s1"), 0, 100);
        assert_eq!(
            r.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
        );
        assert_eq!(r[0].payload, recs[1].payload);
        assert_eq!(r[0].timestamp_ms, recs[1].timestamp_ms);
        assert_eq!(r[0].received_ms, 9);
        let r = q(None, 15, 3);
        assert_eq!(
            r.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![16, 17, 18]
        );
        assert!(q(None, 0, 0).is_empty());
        assert!(s
            .records(&RecordQuery {
                node: "nobody".into(),
                stream: None,
                after_seq: 0,
                limit: 5
            })
            .unwrap()
            .is_empty());
    }
}
