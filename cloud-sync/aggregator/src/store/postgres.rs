//! PostgreSQL store: several aggregators share one database (I-36).
//!
//! - A pool of connections (deadpool); versioned migrations run at start,
//!   serialised between aggregators starting together by a table lock.
//! - `records` is partitioned by event time (`timestamp_ms`, one partition
//!   per UTC day, made ahead; a DEFAULT partition takes what falls outside),
//!   so retention drops whole partitions. A record keeps its event time
//!   when resent, so its primary key `(node, seq, timestamp_ms)` still
//!   catches a duplicate.
//! - An apply is one transaction: the node's lease row is locked and its
//!   fencing token compared, records go in with one multi-row
//!   `INSERT … SELECT FROM UNNEST(…) ON CONFLICT DO NOTHING`, the cursor
//!   moves with `GREATEST` (never back, whatever the interleaving).

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use fogline_protocol::session::StoredCursor;
use fogline_protocol::{DecodedBatch, LossReport};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

use super::{
    ApplyBatches, ApplyOutcome, Lease, LeaseInfo, LossSummary, NodeSummary, PageBuilder,
    RecordPage, RecordQuery, Store, StoreError, StoreFuture, StoredLoss, StoredRecord,
    StreamSummary, MAX_LATEST_STREAMS, MAX_QUERY_LIMIT,
};

/// One UTC day, the partition width.
const DAY_MS: i64 = 86_400_000;
/// Partitions made ahead of today.
const DAYS_AHEAD: i64 = 3;

/// The migrations, in order; each runs once, in a transaction, and its
/// number is recorded in `schema_migrations`.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE records (
        node TEXT NOT NULL,
        seq BIGINT NOT NULL,
        stream TEXT NOT NULL,
        timestamp_ms BIGINT NOT NULL,
        payload BYTEA NOT NULL,
        received_ms BIGINT NOT NULL,
        PRIMARY KEY (node, seq, timestamp_ms)
    ) PARTITION BY RANGE (timestamp_ms);
    CREATE TABLE records_default PARTITION OF records DEFAULT;
    CREATE INDEX records_by_stream_time ON records (node, stream, timestamp_ms);
    CREATE TABLE cursors (
        node TEXT PRIMARY KEY,
        seq BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL,
        incarnation BIGINT,
        epoch BIGINT NOT NULL DEFAULT 0,
        top BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE leases (
        node TEXT PRIMARY KEY,
        token BIGINT NOT NULL,
        holder TEXT,
        since_ms BIGINT NOT NULL
    );
    CREATE TABLE losses (
        node TEXT NOT NULL,
        seq BIGINT NOT NULL,
        stream TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT,
        records BIGINT NOT NULL,
        bytes BIGINT NOT NULL,
        first_seq BIGINT,
        last_seq BIGINT,
        first_ms BIGINT NOT NULL,
        last_ms BIGINT NOT NULL,
        received_ms BIGINT NOT NULL,
        PRIMARY KEY (node, seq)
    );
    CREATE TABLE gaps (
        node TEXT NOT NULL,
        first_seq BIGINT NOT NULL,
        last_seq BIGINT NOT NULL,
        detected_ms BIGINT NOT NULL
    );
    CREATE INDEX gaps_by_node ON gaps (node);",
    ),
    (
        2,
        // The newest record per stream (`latest`), and stream-filtered pages.
        "CREATE INDEX records_by_stream_seq ON records (node, stream, seq DESC);",
    ),
    (
        3,
        // Each node's latest status frame (JSON, as sent).
        "CREATE TABLE node_status (
            node TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            received_ms BIGINT NOT NULL
        );",
    ),
    (
        4,
        // Records applied per node, kept by each apply: the fleet view must
        // not count a node's records on every request.
        "ALTER TABLE cursors ADD COLUMN records BIGINT NOT NULL DEFAULT 0;
        UPDATE cursors c SET records = (SELECT COUNT(*) FROM records r WHERE r.node = c.node);",
    ),
    (
        5,
        // Rollouts (I-42): the controller's document, the module.
        "CREATE TABLE rollouts (
            id BIGINT PRIMARY KEY,
            doc TEXT NOT NULL,
            module BYTEA NOT NULL,
            updated_ms BIGINT NOT NULL
        );",
    ),
];

/// How the PostgreSQL store is set up (`[store]` in `cloud.toml`).
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Connections in the pool.
    pub pool_size: usize,
    /// Records whose event time is older than this are dropped, a whole
    /// day's partition at a time. `None`: kept for ever.
    pub retention: Option<Duration>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            retention: None,
        }
    }
}

/// PostgreSQL-backed [`Store`].
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// Applies waiting for a group writer ([`dispatch_groups`]).
    applies: tokio::sync::mpsc::UnboundedSender<Queued>,
    /// The URL without its password, for messages.
    shown: String,
    options: PostgresOptions,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.shown)
            .finish()
    }
}

// Same bit-pattern mapping as the SQLite store: u64 values above i64::MAX
// read back identically; SQL ordering is relied on only below 2^63.
fn to_sql(v: u64) -> i64 {
    v as i64
}
fn from_sql(v: i64) -> u64 {
    v as u64
}

fn pg_err<'a>(
    op: &'static str,
    node: Option<&'a str>,
) -> impl FnOnce(tokio_postgres::Error) -> StoreError + 'a {
    move |source| StoreError::Postgres {
        op,
        node: node.map(str::to_owned),
        source,
    }
}

/// `url` with any password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/db`),
    /// runs the migrations this database has not had, and makes the
    /// partitions of the coming days.
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let shown = redact(url);
        let config = tokio_postgres::Config::from_str(url).map_err(|e| StoreError::Pool {
            url: shown.clone(),
            message: format!("not a PostgreSQL URL: {e}"),
        })?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| StoreError::Pool {
                url: shown.clone(),
                message: e.to_string(),
            })?;
        let (applies, queue) = tokio::sync::mpsc::unbounded_channel();
        let store = Self {
            pool,
            applies,
            shown,
            options,
        };
        store.migrate().await?;
        store.maintain(fogline_telemetry::clock::now_ms()).await?;
        // Few group writers: while they are busy the queue gathers bigger
        // groups (fewer commits: PostgreSQL's CPU per reading falls); the
        // rest of the pool serves takes and reads.
        let writers = (store.options.pool_size / 8).clamp(1, 2);
        // The writers' copy holds no sender of the queue: dropping the
        // store's last handle closes it and ends the dispatcher.
        let (closed, _) = tokio::sync::mpsc::unbounded_channel();
        let writer = Self {
            applies: closed,
            ..store.clone()
        };
        tokio::spawn(dispatch_groups(writer, queue, writers));
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| StoreError::Pool {
            url: self.shown.clone(),
            message: e.to_string(),
        })
    }

    /// Runs the migrations not yet applied. Aggregators starting together
    /// wait on the table lock, so each migration runs once.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let err = |op| pg_err(op, None);
        // Aggregators starting together on a new database may race here:
        // IF NOT EXISTS is not atomic in PostgreSQL, and the loser's
        // duplicate error (on the table, its type or its index, 42P07 /
        // 42710 / 23505, whichever it hits) only means the table is there now.
        for attempt in 0..3 {
            match client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (
                        version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
                )
                .await
            {
                Ok(()) => break,
                Err(e)
                    if attempt < 2
                        && (e.code() == Some(&SqlState::UNIQUE_VIOLATION)
                            || e.code() == Some(&SqlState::DUPLICATE_OBJECT)
                            || e.code() == Some(&SqlState::DUPLICATE_TABLE)) =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(err("create schema_migrations")(e)),
            }
        }
        let tx = client.transaction().await.map_err(err("begin"))?;
        tx.batch_execute("LOCK TABLE schema_migrations IN EXCLUSIVE MODE")
            .await
            .map_err(err("lock schema_migrations"))?;
        let found: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .map_err(err("read schema version"))?
            .get(0);
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if found > known {
            return Err(StoreError::SchemaTooNew { found, known });
        }
        for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
            tx.batch_execute(sql).await.map_err(err("migrate"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)",
                &[version, &to_sql(fogline_telemetry::clock::now_ms())],
            )
            .await
            .map_err(err("record migration"))?;
            tracing::info!(version, "PostgreSQL store migrated.");
        }
        tx.commit().await.map_err(err("commit migrations"))
    }

    /// Makes the day partitions from yesterday to [`DAYS_AHEAD`] days ahead
    /// and drops those wholly older than the retention. Run at start and
    /// then hourly.
    pub async fn maintain(&self, now_ms: u64) -> Result<(), StoreError> {
        let client = self.client().await?;
        let err = |op| pg_err(op, None);
        let today = to_sql(now_ms).div_euclid(DAY_MS);
        let existing: Vec<String> = client
            .query(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'records'",
                &[],
            )
            .await
            .map_err(err("list partitions"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for day in today - 1..=today + DAYS_AHEAD {
            let name = format!("records_d{day}");
            if existing.contains(&name) {
                continue;
            }
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF records FOR VALUES FROM ({}) TO ({})",
                day * DAY_MS,
                (day + 1) * DAY_MS
            );
            // Two aggregators may race here, or the DEFAULT partition may
            // already hold rows of that day (an edge clock ahead): the day
            // then stays in DEFAULT, which is only slower to drop.
            if let Err(e) = client.batch_execute(&sql).await {
                tracing::warn!(partition = %name, error = %e, "Could not make a records partition; that day's records go to records_default.");
            }
        }
        if let Some(retention) = self.options.retention {
            let keep_from = to_sql(now_ms.saturating_sub(retention.as_millis() as u64));
            for name in &existing {
                let Some(day) = name
                    .strip_prefix("records_d")
                    .and_then(|d| d.parse::<i64>().ok())
                else {
                    continue;
                };
                if (day + 1) * DAY_MS <= keep_from {
                    client
                        .batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                        .await
                        .map_err(err("drop expired partition"))?;
                    super::events::PartitionDropped { partition: name }.emit();
                }
            }
        }
        Ok(())
    }
}

async fn read_cursor(
    client: &impl GenericClient,
    node: &str,
    lock: bool,
) -> Result<StoredCursor, StoreError> {
    let sql = if lock {
        "SELECT seq, incarnation, epoch, top FROM cursors WHERE node = $1 FOR UPDATE"
    } else {
        "SELECT seq, incarnation, epoch, top FROM cursors WHERE node = $1"
    };
    let row = client
        .query_opt(sql, &[&node])
        .await
        .map_err(pg_err("read cursor", Some(node)))?;
    Ok(row.map_or_else(StoredCursor::default, |r| StoredCursor {
        seq: from_sql(r.get(0)),
        incarnation: r.get::<_, Option<i64>>(1).map(from_sql),
        epoch: from_sql(r.get(2)),
        top: from_sql(r.get(3)),
    }))
}

fn stored_record(node: &str, r: &Row) -> StoredRecord {
    StoredRecord {
        node: node.to_string(),
        seq: from_sql(r.get(0)),
        stream: r.get(1),
        timestamp_ms: from_sql(r.get(2)),
        payload: r.get(3),
        received_ms: from_sql(r.get(4)),
    }
}

fn stored_loss(r: &Row) -> StoredLoss {
    StoredLoss {
        seq: from_sql(r.get(0)),
        stream: r.get(1),
        reason: r.get(2),
        detail: r.get(3),
        records: from_sql(r.get(4)),
        bytes: from_sql(r.get(5)),
        first_seq: r.get::<_, Option<i64>>(6).map(from_sql),
        last_seq: r.get::<_, Option<i64>>(7).map(from_sql),
        first_ms: from_sql(r.get(8)),
        last_ms: from_sql(r.get(9)),
        received_ms: from_sql(r.get(10)),
    }
}

/// Applies queued for the group writers, each with where its outcome goes.
type Queued = (
    ApplyBatches,
    tokio::sync::oneshot::Sender<Result<ApplyOutcome, StoreError>>,
);

/// Most applies committed in one transaction.
pub const GROUP_MAX: usize = 256;

/// Takes what is queued (up to [`GROUP_MAX`], in arrival order) while a
/// group writer is free, and runs it as one transaction: each apply waits
/// for one commit, not one per node. Ends when the store is dropped.
async fn dispatch_groups(
    store: PostgresStore,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Queued>,
    writers: usize,
) {
    let writers = std::sync::Arc::new(tokio::sync::Semaphore::new(writers.max(1)));
    while let Some(first) = queue.recv().await {
        let Ok(permit) = writers.clone().acquire_owned().await else {
            return;
        };
        // Those that queued while every writer was busy go together.
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match queue.try_recv() {
                Ok(q) => group.push(q),
                Err(_) => break,
            }
        }
        let store = store.clone();
        tokio::spawn(async move {
            store.apply_group(group).await;
            drop(permit);
        });
    }
}

/// The arrays of one multi-row upsert of cursors.
#[derive(Default)]
struct CursorRows<'a> {
    nodes: Vec<&'a str>,
    seqs: Vec<i64>,
    updated: Vec<i64>,
    incarnations: Vec<i64>,
    epochs: Vec<i64>,
    tops: Vec<i64>,
    records: Vec<i64>,
}

/// Files one loss report (I-33); false if it was filed already.
async fn insert_loss(
    tx: &impl GenericClient,
    node: &str,
    seq: u64,
    l: &LossReport,
    now_ms: u64,
) -> Result<bool, StoreError> {
    let n = tx
        .execute(
            "INSERT INTO losses (node, seq, stream, reason, detail, records, \
             bytes, first_seq, last_seq, first_ms, last_ms, received_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT DO NOTHING",
            &[
                &node,
                &to_sql(seq),
                &l.stream,
                &l.reason.as_str(),
                &l.detail,
                &to_sql(l.records),
                &to_sql(l.bytes),
                &l.first_seq.map(to_sql),
                &l.last_seq.map(to_sql),
                &to_sql(l.first_ms),
                &to_sql(l.last_ms),
                &to_sql(now_ms),
            ],
        )
        .await
        .map_err(pg_err("insert loss report", Some(node)))?;
    Ok(n == 1)
}

/// The arrays of one multi-row insert of records.
#[derive(Default)]
struct RecordRows<'a> {
    nodes: Vec<&'a str>,
    seqs: Vec<i64>,
    streams: Vec<&'a str>,
    times: Vec<i64>,
    payloads: Vec<&'a [u8]>,
    received: Vec<i64>,
}

impl PostgresStore {
    /// Runs `group` as one transaction; if that fails as a whole, each
    /// apply alone, so one node's trouble is its own.
    async fn apply_group(&self, group: Vec<Queued>) {
        let (applies, replies): (Vec<ApplyBatches>, Vec<_>) = group.into_iter().unzip();
        let refs: Vec<&ApplyBatches> = applies.iter().collect();
        let outcomes = match self.apply_set(&refs).await {
            Ok(outcomes) => outcomes,
            Err(e) if refs.len() == 1 => vec![Err(e)],
            Err(e) => {
                tracing::debug!(applies = refs.len(), error = %e, "A group apply failed; applying each alone.");
                let mut each = Vec::with_capacity(refs.len());
                for a in &refs {
                    each.push(match self.apply_set(&[a]).await {
                        Ok(mut one) => one.pop().unwrap_or(Err(StoreError::Poisoned)),
                        Err(e) => Err(e),
                    });
                }
                each
            }
        };
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            let _ = reply.send(outcome);
        }
    }

    /// In ONE transaction, set-based: locks the leases of every node in
    /// `applies` (in node order, so concurrent groups cannot deadlock) and
    /// checks each token — a fenced apply writes nothing and gets
    /// [`StoreError::Fenced`] while the others go on (I-36) — reads the
    /// cursors, inserts every record above its node's cursor in one
    /// statement, advances the cursors in one statement, commits. At most
    /// one apply per node (a session has one apply in flight).
    async fn apply_set(
        &self,
        applies: &[&ApplyBatches],
    ) -> Result<Vec<Result<ApplyOutcome, StoreError>>, StoreError> {
        let only = match applies {
            [one] => Some(one.lease.node.as_str()),
            _ => None,
        };
        let err = |op| pg_err(op, only);
        let mut nodes: Vec<&str> = applies.iter().map(|a| a.lease.node.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        if nodes.len() != applies.len() {
            return Err(StoreError::Group {
                node: applies
                    .iter()
                    .map(|a| a.lease.node.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                message: "two applies of one node in one group".into(),
                kind: fogline_telemetry::health::ProblemKind::StoreError,
            });
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(err("begin"))?;
        // The fence: the lease rows are locked for the transaction, so a
        // taker waits for this apply to end and this apply sees any take
        // that committed before it (I-36).
        let tokens: HashMap<String, u64> = tx
            .query(
                "SELECT node, token FROM leases WHERE node = ANY($1) ORDER BY node FOR UPDATE",
                &[&nodes],
            )
            .await
            .map_err(err("check leases"))?
            .iter()
            .map(|r| (r.get(0), from_sql(r.get(1))))
            .collect();
        let cursors: HashMap<String, StoredCursor> = tx
            .query(
                "SELECT node, seq, incarnation, epoch, top FROM cursors WHERE node = ANY($1)",
                &[&nodes],
            )
            .await
            .map_err(err("read cursors"))?
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    StoredCursor {
                        seq: from_sql(r.get(1)),
                        incarnation: r.get::<_, Option<i64>>(2).map(from_sql),
                        epoch: from_sql(r.get(3)),
                        top: from_sql(r.get(4)),
                    },
                )
            })
            .collect();
        let mut outcomes: Vec<Result<ApplyOutcome, StoreError>> = Vec::with_capacity(applies.len());
        // Per apply: its stored cursor and top, loss reports inserted.
        let mut plans: Vec<Option<(StoredCursor, u64)>> = Vec::with_capacity(applies.len());
        let mut rows = RecordRows::default();
        for a in applies {
            let node = a.lease.node.as_str();
            let current = tokens.get(node).copied().unwrap_or(0);
            if current != a.lease.token {
                outcomes.push(Err(StoreError::Fenced {
                    node: node.to_string(),
                    held: a.lease.token,
                    current,
                }));
                plans.push(None);
                continue;
            }
            let stored = cursors.get(node).cloned().unwrap_or_default();
            let mut outcome = ApplyOutcome {
                cursor: stored.seq.max(a.through),
                inserted: 0,
                skipped: 0,
            };
            let mut top = stored.top();
            for r in a.batches.iter().flat_map(DecodedBatch::iter) {
                if r.seq <= stored.seq {
                    outcome.skipped += 1;
                    continue;
                }
                top = top.max(r.seq);
                // A loss report is filed apart from the data (I-33).
                if let Some(l) = super::loss_report(node, &r) {
                    if insert_loss(&tx, node, r.seq, &l, a.now_ms).await? {
                        outcome.inserted += 1;
                    } else {
                        outcome.skipped += 1;
                    }
                    continue;
                }
                rows.nodes.push(node);
                rows.seqs.push(to_sql(r.seq));
                rows.streams.push(r.stream);
                rows.times.push(to_sql(r.timestamp_ms));
                rows.payloads.push(r.payload);
                rows.received.push(to_sql(a.now_ms));
            }
            outcomes.push(Ok(outcome));
            plans.push(Some((stored, top)));
        }
        // Records: one statement for the whole group; what it did not
        // insert was stored already (a resend above the cursor).
        let mut added: HashMap<String, usize> = HashMap::new();
        if !rows.seqs.is_empty() {
            for r in tx
                .query(
                    "INSERT INTO records (node, seq, stream, timestamp_ms, payload, received_ms) \
                     SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::TEXT[], $4::BIGINT[], \
                     $5::BYTEA[], $6::BIGINT[]) ON CONFLICT DO NOTHING RETURNING node",
                    &[
                        &rows.nodes,
                        &rows.seqs,
                        &rows.streams,
                        &rows.times,
                        &rows.payloads,
                        &rows.received,
                    ],
                )
                .await
                .map_err(err("insert records"))?
            {
                *added.entry(r.get(0)).or_default() += 1;
            }
        }
        let offered: HashMap<&str, usize> = rows.nodes.iter().fold(HashMap::new(), |mut m, n| {
            *m.entry(*n).or_default() += 1;
            m
        });
        // Cursors: one statement for every apply that moved something.
        let mut c = CursorRows::default();
        for ((a, plan), outcome) in applies.iter().zip(&plans).zip(&mut outcomes) {
            let (Some((stored, top)), Ok(outcome)) = (plan, outcome) else {
                continue;
            };
            let node = a.lease.node.as_str();
            let new = added.get(node).copied().unwrap_or(0);
            outcome.inserted += new;
            outcome.skipped += offered.get(node).copied().unwrap_or(0) - new;
            let (incarnation, epoch) = a.outbox;
            if outcome.cursor != stored.seq
                || outcome.inserted > 0
                || stored.incarnation != Some(incarnation)
                || stored.epoch != epoch
            {
                c.nodes.push(node);
                c.seqs.push(to_sql(outcome.cursor));
                c.updated.push(to_sql(a.now_ms));
                c.incarnations.push(to_sql(incarnation));
                c.epochs.push(to_sql(epoch));
                c.tops.push(to_sql((*top).max(outcome.cursor)));
                c.records.push(to_sql(new as u64));
            }
        }
        if !c.nodes.is_empty() {
            tx.execute(
                "INSERT INTO cursors (node, seq, updated_ms, incarnation, epoch, top, records) \
                 SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], \
                 $5::BIGINT[], $6::BIGINT[], $7::BIGINT[]) \
                 ON CONFLICT (node) DO UPDATE SET \
                 seq = GREATEST(cursors.seq, excluded.seq), updated_ms = excluded.updated_ms, \
                 incarnation = excluded.incarnation, epoch = excluded.epoch, \
                 top = GREATEST(cursors.top, excluded.top), \
                 records = cursors.records + excluded.records",
                &[
                    &c.nodes,
                    &c.seqs,
                    &c.updated,
                    &c.incarnations,
                    &c.epochs,
                    &c.tops,
                    &c.records,
                ],
            )
            .await
            .map_err(err("advance cursors"))?;
        }
        tx.commit().await.map_err(err("commit"))?;
        Ok(outcomes)
    }

    async fn take_lease_now(
        &self,
        node: &str,
        holder: &str,
        now_ms: u64,
    ) -> Result<(Lease, StoredCursor), StoreError> {
        let err = |op| pg_err(op, Some(node));
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(err("begin"))?;
        // The upsert waits for an apply holding the row; once it commits,
        // no earlier holder can apply again.
        let token: i64 = tx
            .query_one(
                "INSERT INTO leases (node, token, holder, since_ms) VALUES ($1, 1, $2, $3) \
                 ON CONFLICT (node) DO UPDATE SET token = leases.token + 1, \
                 holder = excluded.holder, since_ms = excluded.since_ms RETURNING token",
                &[&node, &holder, &to_sql(now_ms)],
            )
            .await
            .map_err(err("take lease"))?
            .get(0);
        let cursor = read_cursor(&tx, node, false).await?;
        tx.commit().await.map_err(err("commit"))?;
        Ok((
            Lease {
                node: node.to_string(),
                token: from_sql(token),
            },
            cursor,
        ))
    }

    async fn records_page_now(&self, q: &RecordQuery) -> Result<RecordPage, StoreError> {
        use futures_util::TryStreamExt;
        let node = q.node.as_str();
        let err = |op| pg_err(op, Some(node));
        let client = self.client().await?;
        let (exact, like) = q.stream_sql();
        let (after, from, to) = (
            to_sql(q.after_seq),
            q.from_ms.map(to_sql),
            q.to_ms.map(to_sql),
        );
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
            [&node, &after, &exact, &like, &from, &to];
        // Rows stream in; the page stops reading at its bounds.
        let rows = client
            .query_raw(
                "SELECT seq, stream, timestamp_ms, payload, received_ms FROM records \
                 WHERE node = $1 AND seq > $2 AND ($3::TEXT IS NULL OR stream = $3) \
                 AND ($4::TEXT IS NULL OR stream LIKE $4) \
                 AND ($5::BIGINT IS NULL OR timestamp_ms >= $5) \
                 AND ($6::BIGINT IS NULL OR timestamp_ms < $6) ORDER BY seq",
                params,
            )
            .await
            .map_err(err("query records"))?;
        let mut rows = std::pin::pin!(rows);
        let mut page = PageBuilder::new(q);
        while page.wants_more() {
            let Some(r) = rows.try_next().await.map_err(err("query records"))? else {
                break;
            };
            page.offer(stored_record(&q.node, &r));
        }
        Ok(page.finish())
    }

    /// Every node's lease, or `node`'s alone.
    async fn leases_now(&self, node: Option<&str>) -> Result<Vec<LeaseInfo>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT node, token, holder, since_ms FROM leases \
                 WHERE $1::text IS NULL OR node = $1 ORDER BY node",
                &[&node],
            )
            .await
            .map_err(pg_err("list leases", node))?;
        Ok(rows
            .iter()
            .map(|r| LeaseInfo {
                node: r.get(0),
                token: from_sql(r.get(1)),
                holder: r.get(2),
                since_ms: from_sql(r.get(3)),
            })
            .collect())
    }

    async fn latest_now(
        &self,
        node: &str,
        stream: Option<&str>,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let client = self.client().await?;
        let q = RecordQuery {
            stream: stream.map(str::to_owned),
            ..RecordQuery::node(node, 0, 0)
        };
        let (exact, like) = q.stream_sql();
        let rows = client
            .query(
                "SELECT DISTINCT ON (stream) seq, stream, timestamp_ms, payload, received_ms \
                 FROM records WHERE node = $1 AND ($2::TEXT IS NULL OR stream = $2) \
                 AND ($3::TEXT IS NULL OR stream LIKE $3) ORDER BY stream, seq DESC",
                &[&node, &exact, &like],
            )
            .await
            .map_err(pg_err("latest records", Some(node)))?;
        Ok(rows
            .iter()
            .map(|r| stored_record(node, r))
            .filter(|r| stream.is_none_or(|f| fogline_protocol::topic::matches(f, &r.stream)))
            .take(MAX_LATEST_STREAMS)
            .collect())
    }

    /// Every node, or `only` that one.
    async fn nodes_now(&self, only: Option<&str>) -> Result<Vec<NodeSummary>, StoreError> {
        let client = self.client().await?;
        let err = |op| pg_err(op, only);
        let rows = client
            .query(
                // A node known only by a gap (its store was lost, nothing
                // applied since) is listed too: the loss is the news.
                "SELECT n.node, COALESCE(c.seq, 0), \
                 COALESCE(c.updated_ms, (SELECT MAX(g.detected_ms) FROM gaps g WHERE g.node = n.node)), \
                 COALESCE(c.records, 0), c.incarnation, \
                 (SELECT COALESCE(SUM(g.last_seq - g.first_seq + 1), 0)::BIGINT FROM gaps g WHERE g.node = n.node) \
                 , s.status, s.received_ms \
                 FROM (SELECT node FROM cursors UNION SELECT node FROM gaps UNION SELECT node FROM node_status) n \
                 LEFT JOIN cursors c ON c.node = n.node LEFT JOIN node_status s ON s.node = n.node \
                 WHERE $1::text IS NULL OR n.node = $1 ORDER BY n.node",
                &[&only],
            )
            .await
            .map_err(err("list nodes"))?;
        let mut nodes: Vec<NodeSummary> = rows
            .iter()
            .map(|r| NodeSummary {
                node: r.get(0),
                cursor: from_sql(r.get(1)),
                last_update_ms: from_sql(r.get(2)),
                records: from_sql(r.get(3)),
                incarnation: r.get::<_, Option<i64>>(4).map(from_sql),
                lost_records: from_sql(r.get(5)),
                losses: Vec::new(),
                status: r
                    .get::<_, Option<String>>(6)
                    .and_then(|t| serde_json::from_str(&t).ok()),
                status_received_ms: r.get::<_, Option<i64>>(7).map(from_sql),
            })
            .collect();
        let sums = client
            .query(
                "SELECT node, stream, reason, SUM(records)::BIGINT, SUM(bytes)::BIGINT, \
                 MIN(first_seq), MAX(last_seq), MIN(first_ms), MAX(last_ms), COUNT(*) \
                 FROM losses WHERE $1::text IS NULL OR node = $1 GROUP BY node, stream, reason \
                 ORDER BY node, SUM(records) DESC, stream, reason",
                &[&only],
            )
            .await
            .map_err(err("sum losses"))?;
        let index: std::collections::HashMap<String, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.node.clone(), i))
            .collect();
        for r in &sums {
            let node: &str = r.get(0);
            if let Some(n) = index.get(node).and_then(|&i| nodes.get_mut(i)) {
                // At most 1,000 (stream, reason) lines per node, as SQLite.
                if n.losses.len() < 1000 {
                    n.losses.push(LossSummary {
                        stream: r.get(1),
                        reason: r.get(2),
                        records: from_sql(r.get(3)),
                        bytes: from_sql(r.get(4)),
                        first_seq: r.get::<_, Option<i64>>(5).map(from_sql),
                        last_seq: r.get::<_, Option<i64>>(6).map(from_sql),
                        first_ms: from_sql(r.get(7)),
                        last_ms: from_sql(r.get(8)),
                        reports: from_sql(r.get(9)),
                    });
                }
            }
        }
        Ok(nodes)
    }
}

impl Store for PostgresStore {
    fn take_lease<'a>(
        &'a self,
        node: &'a str,
        holder: &'a str,
        now_ms: u64,
    ) -> StoreFuture<'a, (Lease, StoredCursor)> {
        Box::pin(self.take_lease_now(node, holder, now_ms))
    }

    fn release_lease<'a>(&'a self, lease: &'a Lease, now_ms: u64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute(
                    "UPDATE leases SET holder = NULL, since_ms = $3 WHERE node = $1 AND token = $2",
                    &[&lease.node, &to_sql(lease.token), &to_sql(now_ms)],
                )
                .await
                .map(drop)
                .map_err(pg_err("release lease", Some(&lease.node)))
        })
    }

    fn leases(&self) -> StoreFuture<'_, Vec<LeaseInfo>> {
        Box::pin(self.leases_now(None))
    }

    fn lease<'a>(&'a self, node: &'a str) -> StoreFuture<'a, Option<LeaseInfo>> {
        Box::pin(async move { Ok(self.leases_now(Some(node)).await?.pop()) })
    }

    fn apply(&self, apply: ApplyBatches) -> StoreFuture<'_, ApplyOutcome> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let queued = self.applies.send((apply, reply)).map_err(drop);
        Box::pin(async move {
            queued.map_err(|_| StoreError::Poisoned)?;
            outcome.await.map_err(|_| StoreError::Poisoned)?
        })
    }

    fn cursor<'a>(&'a self, node: &'a str) -> StoreFuture<'a, StoredCursor> {
        Box::pin(async move {
            let client = self.client().await?;
            read_cursor(&client, node, false).await
        })
    }

    fn record_gap<'a>(
        &'a self,
        node: &'a str,
        from: u64,
        to: u64,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO gaps (node, first_seq, last_seq, detected_ms) \
                     SELECT $1, $2, $3, $4 WHERE NOT EXISTS \
                     (SELECT 1 FROM gaps WHERE node = $1 AND first_seq <= $2 AND last_seq >= $3)",
                    &[&node, &to_sql(from), &to_sql(to), &to_sql(now_ms)],
                )
                .await
                .map(drop)
                .map_err(pg_err("record gap", Some(node)))
        })
    }

    fn records_page<'a>(&'a self, query: &'a RecordQuery) -> StoreFuture<'a, RecordPage> {
        Box::pin(self.records_page_now(query))
    }

    fn latest<'a>(
        &'a self,
        node: &'a str,
        stream: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<StoredRecord>> {
        Box::pin(self.latest_now(node, stream))
    }

    fn nodes(&self) -> StoreFuture<'_, Vec<NodeSummary>> {
        Box::pin(self.nodes_now(None))
    }

    fn node<'a>(&'a self, node: &'a str) -> StoreFuture<'a, Option<NodeSummary>> {
        Box::pin(async move { Ok(self.nodes_now(Some(node)).await?.pop()) })
    }

    fn put_status<'a>(
        &'a self,
        node: &'a str,
        status: &'a fogline_protocol::status::NodeStatus,
        now_ms: u64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let client = self.client().await?;
            let json = String::from_utf8_lossy(&status.encode()).into_owned();
            client
                .execute(
                    "INSERT INTO node_status (node, status, received_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (node) DO UPDATE SET status = excluded.status, \
                     received_ms = excluded.received_ms",
                    &[&node, &json, &to_sql(now_ms)],
                )
                .await
                .map(drop)
                .map_err(pg_err("store status", Some(node)))
        })
    }

    fn create_rollout<'a>(
        &'a self,
        doc: &'a str,
        module: &'a [u8],
        now_ms: u64,
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let client = self.client().await?;
            // Two aggregators filing at once: the primary key refuses the
            // second, which takes the next number.
            let mut tries = 0;
            loop {
                let r = client
                    .query_one(
                        "INSERT INTO rollouts (id, doc, module, updated_ms) \
                         VALUES ((SELECT COALESCE(MAX(id), 0) + 1 FROM rollouts), $1, $2, $3) \
                         RETURNING id",
                        &[&doc, &module, &to_sql(now_ms)],
                    )
                    .await;
                match r {
                    Ok(row) => return Ok(from_sql(row.get(0))),
                    Err(e)
                        if tries < 5
                            && e.code()
                                == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
                    {
                        tries += 1;
                    }
                    Err(e) => return Err(pg_err("file a rollout", None)(e)),
                }
            }
        })
    }

    fn update_rollout<'a>(&'a self, id: u64, doc: &'a str, now_ms: u64) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute(
                    "UPDATE rollouts SET doc = $2, updated_ms = $3 WHERE id = $1",
                    &[&to_sql(id), &doc, &to_sql(now_ms)],
                )
                .await
                .map(drop)
                .map_err(pg_err("update a rollout", None))
        })
    }

    fn rollouts(&self) -> StoreFuture<'_, Vec<(u64, String)>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query("SELECT id, doc FROM rollouts ORDER BY id", &[])
                .await
                .map_err(pg_err("list rollouts", None))?;
            Ok(rows
                .iter()
                .map(|r| (from_sql(r.get(0)), r.get(1)))
                .collect())
        })
    }

    fn rollout_module(&self, id: u64) -> StoreFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let client = self.client().await?;
            let row = client
                .query_opt("SELECT module FROM rollouts WHERE id = $1", &[&to_sql(id)])
                .await
                .map_err(pg_err("read a rollout's module", None))?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn statuses<'a>(&'a self, nodes: &'a [String]) -> StoreFuture<'a, Vec<(String, String)>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT node, status FROM node_status WHERE node = ANY($1)",
                    &[&nodes],
                )
                .await
                .map_err(pg_err("read statuses", None))?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn streams<'a>(&'a self, node: &'a str) -> StoreFuture<'a, Vec<StreamSummary>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT stream, COUNT(*), MAX(timestamp_ms) FROM records WHERE node = $1 \
                     GROUP BY stream ORDER BY stream LIMIT $2",
                    &[&node, &(MAX_LATEST_STREAMS as i64)],
                )
                .await
                .map_err(pg_err("list streams", Some(node)))?;
            Ok(rows
                .iter()
                .map(|r| StreamSummary {
                    stream: r.get(0),
                    records: from_sql(r.get(1)),
                    last_ms: from_sql(r.get(2)),
                })
                .collect())
        })
    }

    fn losses<'a>(
        &'a self,
        node: &'a str,
        after_seq: u64,
        limit: usize,
    ) -> StoreFuture<'a, Vec<StoredLoss>> {
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT seq, stream, reason, detail, records, bytes, first_seq, last_seq, \
                     first_ms, last_ms, received_ms FROM losses WHERE node = $1 AND seq > $2 \
                     ORDER BY seq LIMIT $3",
                    &[
                        &node,
                        &to_sql(after_seq),
                        &(limit.min(MAX_QUERY_LIMIT) as i64),
                    ],
                )
                .await
                .map_err(pg_err("query losses", Some(node)))?;
            Ok(rows.iter().map(stored_loss).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn a_password_never_reaches_a_message() {
        assert_eq!(
            redact("postgres://fog:s3cret@db:5432/fogline"),
            "postgres://fog:***@db:5432/fogline"
        );
        assert_eq!(redact("postgres://fog@db/f"), "postgres://fog@db/f");
        assert_eq!(redact("host=db user=fog"), "host=db user=fog");
    }
}
