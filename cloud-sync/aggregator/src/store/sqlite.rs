//! Embedded SQLite store (WAL, synchronous=FULL: an acked batch survives
//! power loss). Its work blocks: each [`Store`] call runs on tokio's
//! blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    ApplyBatches, ApplyOutcome, Lease, LeaseInfo, LossSummary, NodeSummary, PageBuilder,
    RecordPage, RecordQuery, Store, StoreError, StoreFuture, StoredLoss, StoredRecord,
    StreamSummary, MAX_LATEST_STREAMS, MAX_QUERY_LIMIT,
};
use fogline_protocol::session::StoredCursor;
use fogline_protocol::DecodedBatch;
use fogline_protocol::LossReport;

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
-- The newest record per stream (`latest`), and stream-filtered pages.
CREATE INDEX IF NOT EXISTS records_by_stream ON records (node, stream, seq);
-- Each node's latest status frame (JSON, as sent).
CREATE TABLE IF NOT EXISTS node_status (
    node TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    received_ms INTEGER NOT NULL
);
-- Rollouts (I-42): the document as the controller keeps it, the module.
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY,
    doc TEXT NOT NULL,
    module BLOB NOT NULL,
    updated_ms INTEGER NOT NULL
);
-- Who may apply a node's batches (I-36): every take raises the token.
CREATE TABLE IF NOT EXISTS leases (
    node TEXT PRIMARY KEY,
    token INTEGER NOT NULL,
    holder TEXT,
    since_ms INTEGER NOT NULL
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
    // Records stored per node, kept by each apply: the fleet view must not
    // count a node's records on every request.
    let has_records: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('cursors') WHERE name = 'records'")?
        .exists([])?;
    if !has_records {
        conn.execute_batch(
            "ALTER TABLE cursors ADD COLUMN records INTEGER NOT NULL DEFAULT 0; \
             UPDATE cursors SET records = (SELECT COUNT(*) FROM records r WHERE r.node = cursors.node);",
        )?;
    }
    Ok(())
}

/// SQLite-backed [`Store`]. One writer connection and one reader connection
/// (WAL lets queries run while a batch is being applied). Cloning shares
/// them.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: String,
    writer: Arc<Mutex<Connection>>,
    reader: Mutex<Connection>,
    /// Applies, to the group writer.
    applies: Option<std::sync::mpsc::Sender<Job>>,
    group_writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Inner {
    /// Closes the group writer's queue and waits for it: the group in
    /// flight commits and the writer connection closes (checkpointing the
    /// WAL) before the store is gone.
    fn drop(&mut self) {
        self.applies.take();
        if let Some(t) = self.group_writer.take() {
            let _ = t.join();
        }
    }
}

/// An apply waiting for its group, and where its outcome goes.
type Job = (
    ApplyBatches,
    tokio::sync::oneshot::Sender<Result<ApplyOutcome, StoreError>>,
);

/// Most applies committed together. Each node's apply keeps its own fence
/// check and cursor (a savepoint); the group shares one commit, so one
/// fsync serves many nodes (thousands of gateways each sending a reading a
/// second are thousands of applies a second).
pub const GROUP_MAX: usize = 256;

/// The group writer: takes what is queued (up to [`GROUP_MAX`]), applies
/// each in a savepoint of one transaction, commits once, answers each.
/// Ends when the store is dropped.
fn group_writer(writer: Arc<Mutex<Connection>>, jobs: std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match jobs.try_recv() {
                Ok(j) => group.push(j),
                Err(_) => break,
            }
        }
        let results = apply_group(&writer, &group);
        for ((_, reply), result) in group.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

fn apply_group(writer: &Mutex<Connection>, group: &[Job]) -> Vec<Result<ApplyOutcome, StoreError>> {
    let failed_all = |e: &StoreError| -> Vec<Result<ApplyOutcome, StoreError>> {
        group
            .iter()
            .map(|(a, _)| {
                Err(StoreError::Group {
                    node: a.lease.node.clone(),
                    message: e.to_string(),
                    kind: e.kind(),
                })
            })
            .collect()
    };
    let mut conn = match lock(writer) {
        Ok(c) => c,
        Err(e) => return failed_all(&e),
    };
    let mut tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => return failed_all(&q_err("begin", None)(e)),
    };
    let mut results = Vec::with_capacity(group.len());
    for (a, _) in group {
        let outcome = match tx.savepoint() {
            Ok(mut sp) => {
                // A refused apply (fenced, failed) leaves nothing: rolled back.
                sp.set_drop_behavior(rusqlite::DropBehavior::Rollback);
                match Inner::apply_in(&sp, a) {
                    Ok(o) => sp
                        .commit()
                        .map(|()| o)
                        .map_err(q_err("release savepoint", Some(&a.lease.node))),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(q_err("savepoint", Some(&a.lease.node))(e)),
        };
        results.push(outcome);
    }
    match tx.commit() {
        Ok(()) => results,
        Err(e) => failed_all(&q_err("commit", None)(e)),
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
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
        // The writer maps the file and keeps 64 MiB of pages: at 10k
        // gateways its page reads through `read()` were 13% of the one
        // serial stage (docs/scaling.md, "The standing queue traced").
        writer
            .execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000; PRAGMA mmap_size=268435456; PRAGMA cache_size=-65536;",
            )
            .map_err(open_err)?;
        writer.execute_batch(SCHEMA).map_err(open_err)?;
        migrate(&writer).map_err(open_err)?;
        let reader = Connection::open(path.as_ref()).map_err(open_err)?;
        reader
            .execute_batch("PRAGMA busy_timeout=5000; PRAGMA query_only=1;")
            .map_err(open_err)?;
        let writer = Arc::new(Mutex::new(writer));
        let (applies, jobs) = std::sync::mpsc::channel();
        let w = writer.clone();
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || group_writer(w, jobs))
            .map_err(|e| StoreError::Open {
                path: path_str.clone(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path_str,
                writer,
                reader: Mutex::new(reader),
                applies: Some(applies),
                group_writer: Some(thread),
            }),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// `PRAGMA quick_check`, given up after `budget`. Blocks.
    pub fn quick_check(
        &self,
        budget: std::time::Duration,
    ) -> Result<fogline_integrity::Integrity, StoreError> {
        let conn = lock(&self.inner.reader)?;
        fogline_integrity::quick_check(&conn, budget).map_err(q_err("integrity check", None))
    }

    /// Runs `f` on the blocking pool with the store's connections.
    fn blocking<'a, T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'a, T> {
        let inner = self.inner.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&inner))
                .await
                .map_err(|_| StoreError::Poisoned)?
        })
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

fn lease_token(conn: &Connection, node: &str) -> Result<u64, StoreError> {
    conn.prepare_cached("SELECT token FROM leases WHERE node = ?1")
        .and_then(|mut st| st.query_row([node], |r| r.get::<_, i64>(0)).optional())
        .map(|t| t.map_or(0, from_sql))
        .map_err(q_err("read lease", Some(node)))
}

impl Inner {
    fn take_lease(
        &self,
        node: &str,
        holder: &str,
        now_ms: u64,
    ) -> Result<(Lease, StoredCursor), StoreError> {
        let mut conn = lock(&self.writer)?;
        let err = |op| q_err(op, Some(node));
        let tx = conn.transaction().map_err(err("begin"))?;
        let token: i64 = tx
            .query_row(
                "INSERT INTO leases (node, token, holder, since_ms) VALUES (?1, 1, ?2, ?3) \
                 ON CONFLICT(node) DO UPDATE SET token = token + 1, holder = excluded.holder, \
                 since_ms = excluded.since_ms RETURNING token",
                params![node, holder, to_sql(now_ms)],
                |r| r.get(0),
            )
            .map_err(err("take lease"))?;
        let cursor = read_cursor(&tx, node)?;
        tx.commit().map_err(err("commit"))?;
        Ok((
            Lease {
                node: node.to_string(),
                token: from_sql(token),
            },
            cursor,
        ))
    }

    fn release_lease(&self, lease: &Lease, now_ms: u64) -> Result<(), StoreError> {
        let conn = lock(&self.writer)?;
        conn.execute(
            "UPDATE leases SET holder = NULL, since_ms = ?3 WHERE node = ?1 AND token = ?2",
            params![lease.node, to_sql(lease.token), to_sql(now_ms)],
        )
        .map(drop)
        .map_err(q_err("release lease", Some(&lease.node)))
    }

    /// Every node's lease, or `node`'s alone.
    fn leases(&self, node: Option<&str>) -> Result<Vec<LeaseInfo>, StoreError> {
        let conn = lock(&self.reader)?;
        conn.prepare_cached(
            "SELECT node, token, holder, since_ms FROM leases \
             WHERE ?1 IS NULL OR node = ?1 ORDER BY node",
        )
        .and_then(|mut st| {
            st.query_map(params![node], |r| {
                Ok(LeaseInfo {
                    node: r.get(0)?,
                    token: from_sql(r.get(1)?),
                    holder: r.get(2)?,
                    since_ms: from_sql(r.get(3)?),
                })
            })?
            .collect()
        })
        .map_err(q_err("list leases", node))
    }

    /// One apply inside the group's transaction (see [`group_writer`]).
    fn apply_in(tx: &Connection, a: &ApplyBatches) -> Result<ApplyOutcome, StoreError> {
        let ApplyBatches {
            lease,
            outbox: (incarnation, epoch),
            batches,
            through,
            now_ms,
        } = a;
        let (incarnation, epoch, through, now_ms) = (*incarnation, *epoch, *through, *now_ms);
        let node = lease.node.as_str();
        let err = |op| q_err(op, Some(node));
        // The fence, checked inside the transaction that writes (I-36).
        let current = lease_token(tx, node)?;
        if current != lease.token {
            return Err(StoreError::Fenced {
                node: node.to_string(),
                held: lease.token,
                current,
            });
        }
        let stored = read_cursor(tx, node)?;
        let cursor = stored.seq;
        let mut inserted = 0;
        let mut skipped = 0;
        // Data records inserted (loss reports are filed apart).
        let mut stored_records = 0u64;
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
                // A loss report is filed apart from the data (I-33).
                if let Some(l) = super::loss_report(node, &r) {
                    let n = insert_loss(tx, node, r.seq, &l, now_ms)
                        .map_err(err("insert loss report"))?;
                    if n == 1 {
                        inserted += 1;
                    } else {
                        skipped += 1;
                    }
                    continue;
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
                    stored_records += 1;
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
                "INSERT INTO cursors (node, seq, updated_ms, incarnation, epoch, top, records) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT(node) DO UPDATE SET seq = excluded.seq, updated_ms = excluded.updated_ms, \
                 incarnation = excluded.incarnation, epoch = excluded.epoch, top = excluded.top, \
                 records = cursors.records + excluded.records",
            )
            .and_then(|mut st| {
                st.execute(params![
                    node,
                    to_sql(new_cursor),
                    to_sql(now_ms),
                    to_sql(incarnation),
                    to_sql(epoch),
                    to_sql(top),
                    to_sql(stored_records)
                ])
            })
            .map_err(err("advance cursor"))?;
        }
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

    fn records_page(&self, query: &RecordQuery) -> Result<RecordPage, StoreError> {
        let conn = lock(&self.reader)?;
        let node = query.node.as_str();
        // NULL parameters switch a condition off: one statement, cached.
        let (exact, like) = query.stream_sql();
        let mut page = PageBuilder::new(query);
        let result = conn
            .prepare_cached(
                "SELECT seq, stream, timestamp_ms, payload, received_ms FROM records \
                 WHERE node = ?1 AND seq > ?2 AND (?3 IS NULL OR stream = ?3) \
                 AND (?4 IS NULL OR stream LIKE ?4 ESCAPE '\\') \
                 AND (?5 IS NULL OR timestamp_ms >= ?5) AND (?6 IS NULL OR timestamp_ms < ?6) \
                 ORDER BY seq",
            )
            .and_then(|mut st| {
                let mut rows = st.query(params![
                    node,
                    to_sql(query.after_seq),
                    exact,
                    like,
                    query.from_ms.map(to_sql),
                    query.to_ms.map(to_sql)
                ])?;
                while page.wants_more() {
                    let Some(r) = rows.next()? else {
                        break;
                    };
                    page.offer(StoredRecord {
                        node: query.node.clone(),
                        seq: from_sql(r.get(0)?),
                        stream: r.get(1)?,
                        timestamp_ms: from_sql(r.get(2)?),
                        payload: r.get(3)?,
                        received_ms: from_sql(r.get(4)?),
                    });
                }
                Ok(())
            });
        result.map_err(q_err("query records", Some(node)))?;
        Ok(page.finish())
    }

    fn latest(&self, node: &str, stream: Option<&str>) -> Result<Vec<StoredRecord>, StoreError> {
        let conn = lock(&self.reader)?;
        let q = RecordQuery {
            stream: stream.map(str::to_owned),
            ..RecordQuery::node(node, 0, 0)
        };
        let (exact, like) = q.stream_sql();
        conn.prepare_cached(
            "SELECT r.seq, r.stream, r.timestamp_ms, r.payload, r.received_ms FROM records r \
             JOIN (SELECT MAX(seq) AS seq FROM records WHERE node = ?1 \
                   AND (?2 IS NULL OR stream = ?2) AND (?3 IS NULL OR stream LIKE ?3 ESCAPE '\\') \
                   GROUP BY stream) m ON r.node = ?1 AND r.seq = m.seq ORDER BY r.stream",
        )
        .and_then(|mut st| {
            st.query_map(params![node, exact, like], |r| {
                Ok(StoredRecord {
                    node: node.to_string(),
                    seq: from_sql(r.get(0)?),
                    stream: r.get(1)?,
                    timestamp_ms: from_sql(r.get(2)?),
                    payload: r.get(3)?,
                    received_ms: from_sql(r.get(4)?),
                })
            })?
            .filter(|r| {
                r.as_ref().map_or(true, |r| {
                    stream.is_none_or(|f| fogline_protocol::topic::matches(f, &r.stream))
                })
            })
            .take(MAX_LATEST_STREAMS)
            .collect()
        })
        .map_err(q_err("latest records", Some(node)))
    }

    /// Every node, or `only` that one.
    fn nodes(&self, only: Option<&str>) -> Result<Vec<NodeSummary>, StoreError> {
        let conn = lock(&self.reader)?;
        conn.prepare_cached(
            // A node known only by a gap (its store was lost, nothing
            // applied since) is listed too: the loss is the news.
            "SELECT n.node, COALESCE(c.seq, 0), \
             COALESCE(c.updated_ms, (SELECT MAX(g.detected_ms) FROM gaps g WHERE g.node = n.node)), \
             COALESCE(c.records, 0), c.incarnation, \
             (SELECT COALESCE(SUM(g.last_seq - g.first_seq + 1), 0) FROM gaps g WHERE g.node = n.node) \
             , s.status, s.received_ms \
             FROM (SELECT node FROM cursors UNION SELECT node FROM gaps UNION SELECT node FROM node_status) n \
             LEFT JOIN cursors c ON c.node = n.node LEFT JOIN node_status s ON s.node = n.node \
             WHERE ?1 IS NULL OR n.node = ?1 ORDER BY n.node",
        )
        .and_then(|mut st| {
            st.query_map(params![only], |r| {
                Ok(NodeSummary {
                    node: r.get(0)?,
                    cursor: from_sql(r.get(1)?),
                    last_update_ms: from_sql(r.get(2)?),
                    records: from_sql(r.get(3)?),
                    incarnation: r.get::<_, Option<i64>>(4)?.map(from_sql),
                    lost_records: from_sql(r.get(5)?),
                    losses: Vec::new(),
                    status: r
                        .get::<_, Option<String>>(6)?
                        .and_then(|t| serde_json::from_str(&t).ok()),
                    status_received_ms: r.get::<_, Option<i64>>(7)?.map(from_sql),
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
        .map_err(q_err("list nodes", only))
    }

    fn put_status(
        &self,
        node: &str,
        status: &fogline_protocol::status::NodeStatus,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let conn = lock(&self.writer)?;
        let json = String::from_utf8_lossy(&status.encode()).into_owned();
        conn.prepare_cached(
            "INSERT INTO node_status (node, status, received_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT(node) DO UPDATE SET status = excluded.status, received_ms = excluded.received_ms",
        )
        .and_then(|mut st| st.execute(params![node, json, to_sql(now_ms)]))
        .map(drop)
        .map_err(q_err("store status", Some(node)))
    }

    fn streams(&self, node: &str) -> Result<Vec<StreamSummary>, StoreError> {
        let conn = lock(&self.reader)?;
        conn.prepare_cached(
            "SELECT stream, COUNT(*), MAX(timestamp_ms) FROM records WHERE node = ?1 \
             GROUP BY stream ORDER BY stream LIMIT ?2",
        )
        .and_then(|mut st| {
            st.query_map(params![node, MAX_LATEST_STREAMS as i64], |r| {
                Ok(StreamSummary {
                    stream: r.get(0)?,
                    records: from_sql(r.get(1)?),
                    last_ms: from_sql(r.get(2)?),
                })
            })?
            .collect()
        })
        .map_err(q_err("list streams", Some(node)))
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

impl Inner {
    fn create_rollout(&self, doc: &str, module: &[u8], now_ms: u64) -> Result<u64, StoreError> {
        let conn = lock(&self.writer)?;
        conn.prepare_cached(
            "INSERT INTO rollouts (id, doc, module, updated_ms) \
             VALUES ((SELECT COALESCE(MAX(id), 0) + 1 FROM rollouts), ?1, ?2, ?3) RETURNING id",
        )
        .and_then(|mut st| st.query_row(params![doc, module, to_sql(now_ms)], |r| r.get(0)))
        .map(from_sql)
        .map_err(q_err("file a rollout", None))
    }

    fn update_rollout(&self, id: u64, doc: &str, now_ms: u64) -> Result<(), StoreError> {
        let conn = lock(&self.writer)?;
        conn.prepare_cached("UPDATE rollouts SET doc = ?2, updated_ms = ?3 WHERE id = ?1")
            .and_then(|mut st| st.execute(params![to_sql(id), doc, to_sql(now_ms)]))
            .map(drop)
            .map_err(q_err("update a rollout", None))
    }

    fn rollouts(&self) -> Result<Vec<(u64, String)>, StoreError> {
        let conn = lock(&self.reader)?;
        conn.prepare_cached("SELECT id, doc FROM rollouts ORDER BY id")
            .and_then(|mut st| {
                st.query_map([], |r| Ok((from_sql(r.get(0)?), r.get(1)?)))?
                    .collect()
            })
            .map_err(q_err("list rollouts", None))
    }

    fn rollout_module(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let conn = lock(&self.reader)?;
        conn.prepare_cached("SELECT module FROM rollouts WHERE id = ?1")
            .and_then(|mut st| st.query_row(params![to_sql(id)], |r| r.get(0)).optional())
            .map_err(q_err("read a rollout's module", None))
    }

    fn statuses(&self, nodes: &[String]) -> Result<Vec<(String, String)>, StoreError> {
        let conn = lock(&self.reader)?;
        let mut st = conn
            .prepare_cached("SELECT status FROM node_status WHERE node = ?1")
            .map_err(q_err("read statuses", None))?;
        let mut out = Vec::new();
        for n in nodes {
            let s: Option<String> = st
                .query_row(params![n], |r| r.get(0))
                .optional()
                .map_err(q_err("read statuses", Some(n)))?;
            if let Some(s) = s {
                out.push((n.clone(), s));
            }
        }
        Ok(out)
    }
}

impl Store for SqliteStore {
    fn take_lease<'a>(
        &'a self,
        node: &'a str,
        holder: &'a str,
        now_ms: u64,
    ) -> StoreFuture<'a, (Lease, StoredCursor)> {
        let (node, holder) = (node.to_string(), holder.to_string());
        self.blocking(move |s| s.take_lease(&node, &holder, now_ms))
    }

    fn release_lease<'a>(&'a self, lease: &'a Lease, now_ms: u64) -> StoreFuture<'a, ()> {
        let lease = lease.clone();
        self.blocking(move |s| s.release_lease(&lease, now_ms))
    }

    fn leases(&self) -> StoreFuture<'_, Vec<LeaseInfo>> {
        self.blocking(|s| s.leases(None))
    }

    fn lease<'a>(&'a self, node: &'a str) -> StoreFuture<'a, Option<LeaseInfo>> {
        let node = node.to_string();
        self.blocking(move |s| Ok(s.leases(Some(&node))?.pop()))
    }

    fn apply(&self, apply: ApplyBatches) -> StoreFuture<'_, ApplyOutcome> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let queued = match &self.inner.applies {
            Some(q) => q.send((apply, reply)).map_err(drop),
            None => Err(()),
        };
        Box::pin(async move {
            queued.map_err(|_| StoreError::Poisoned)?;
            outcome.await.map_err(|_| StoreError::Poisoned)?
        })
    }

    fn cursor<'a>(&'a self, node: &'a str) -> StoreFuture<'a, StoredCursor> {
        let node = node.to_string();
        self.blocking(move |s| s.cursor(&node))
    }

    fn record_gap<'a>(
        &'a self,
        node: &'a str,
        from: u64,
        to: u64,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        let node = node.to_string();
        self.blocking(move |s| s.record_gap(&node, from, to, now_ms))
    }

    fn records_page<'a>(&'a self, query: &'a RecordQuery) -> StoreFuture<'a, RecordPage> {
        let query = query.clone();
        self.blocking(move |s| s.records_page(&query))
    }

    fn latest<'a>(
        &'a self,
        node: &'a str,
        stream: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<StoredRecord>> {
        let (node, stream) = (node.to_string(), stream.map(str::to_owned));
        self.blocking(move |s| s.latest(&node, stream.as_deref()))
    }

    fn nodes(&self) -> StoreFuture<'_, Vec<NodeSummary>> {
        self.blocking(|s| s.nodes(None))
    }

    fn node<'a>(&'a self, node: &'a str) -> StoreFuture<'a, Option<NodeSummary>> {
        let node = node.to_string();
        self.blocking(move |s| Ok(s.nodes(Some(&node))?.pop()))
    }

    fn put_status<'a>(
        &'a self,
        node: &'a str,
        status: &'a fogline_protocol::status::NodeStatus,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        let (node, status) = (node.to_string(), status.clone());
        self.blocking(move |s| s.put_status(&node, &status, now_ms))
    }

    fn streams<'a>(&'a self, node: &'a str) -> StoreFuture<'a, Vec<StreamSummary>> {
        let node = node.to_string();
        self.blocking(move |s| s.streams(&node))
    }

    fn create_rollout<'a>(
        &'a self,
        doc: &'a str,
        module: &'a [u8],
        now_ms: u64,
    ) -> StoreFuture<'a, u64> {
        let (doc, module) = (doc.to_string(), module.to_vec());
        self.blocking(move |s| s.create_rollout(&doc, &module, now_ms))
    }

    fn update_rollout<'a>(&'a self, id: u64, doc: &'a str, now_ms: u64) -> StoreFuture<'a, ()> {
        let doc = doc.to_string();
        self.blocking(move |s| s.update_rollout(id, &doc, now_ms))
    }

    fn rollouts(&self) -> StoreFuture<'_, Vec<(u64, String)>> {
        self.blocking(|s| s.rollouts())
    }

    fn rollout_module(&self, id: u64) -> StoreFuture<'_, Option<Vec<u8>>> {
        self.blocking(move |s| s.rollout_module(id))
    }

    fn statuses<'a>(&'a self, nodes: &'a [String]) -> StoreFuture<'a, Vec<(String, String)>> {
        let nodes = nodes.to_vec();
        self.blocking(move |s| s.statuses(&nodes))
    }

    fn losses<'a>(
        &'a self,
        node: &'a str,
        after_seq: u64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredLoss>> {
        let node = node.to_string();
        self.blocking(move |s| s.losses(&node, after_seq, limit))
    }
}
