//! The store contract (ARCHITECTURE.md I-3, I-9, I-33, I-36), one suite run
//! against both stores: SQLite (a temp file) and PostgreSQL (a database of
//! its own on a real server, see `fogline_testkit::postgres`). Each case
//! gets a fixture that can open a second handle on the same storage — a
//! restarted aggregator, or a second aggregator beside the first.

use std::sync::Arc;
use std::time::Duration;

use fogline_aggregator::store::{
    ApplyBatches, Lease, PostgresOptions, PostgresStore, RecordQuery, SqliteStore, Store,
    StoreError, MAX_QUERY_LIMIT,
};
use fogline_protocol::session::StoredCursor;
use fogline_protocol::{decode_batch, encode_batch, DecodedBatch, Record, LOSS_STREAM};
use fogline_testkit::postgres::TestDb;
use fogline_testkit::samples::sample_readings;

enum Storage {
    Sqlite(tempfile::TempDir),
    Postgres(TestDb),
}

struct Fixture {
    storage: Storage,
}

impl Fixture {
    async fn sqlite() -> Self {
        Self {
            storage: Storage::Sqlite(tempfile::tempdir().unwrap()),
        }
    }

    async fn postgres() -> Self {
        Self {
            storage: Storage::Postgres(TestDb::create().await.unwrap_or_else(|e| panic!("{e}"))),
        }
    }

    /// A handle on the storage: the first, a restarted aggregator's, or a
    /// second aggregator's.
    async fn open(&self) -> Arc<dyn Store> {
        self.open_with(PostgresOptions::default()).await
    }

    async fn open_with(&self, options: PostgresOptions) -> Arc<dyn Store> {
        match &self.storage {
            Storage::Sqlite(dir) => Arc::new(SqliteStore::open(dir.path().join("t.db")).unwrap()),
            Storage::Postgres(db) => {
                Arc::new(PostgresStore::connect(&db.url, options).await.unwrap())
            }
        }
    }
}

/// The records as one decoded batch (none for an empty slice).
fn b(records: &[Record]) -> Vec<DecodedBatch> {
    if records.is_empty() {
        return Vec::new();
    }
    vec![decode_batch(&encode_batch(records, 3).unwrap()).unwrap()]
}

async fn apply(
    s: &Arc<dyn Store>,
    lease: &Lease,
    records: &[Record],
    through: u64,
    now_ms: u64,
) -> Result<fogline_aggregator::store::ApplyOutcome, StoreError> {
    s.apply(ApplyBatches {
        lease: lease.clone(),
        outbox: (9, 1),
        batches: b(records),
        through,
        now_ms,
    })
    .await
}

async fn lease(s: &Arc<dyn Store>, node: &str) -> Lease {
    s.take_lease(node, "agg-test", 1).await.unwrap().0
}

async fn all(s: &Arc<dyn Store>, node: &str) -> Vec<u64> {
    s.records(&RecordQuery::node(node, 0, MAX_QUERY_LIMIT))
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.seq)
        .collect()
}

/// I-3: an apply is idempotent; an overlap inserts only what is above the
/// cursor; nodes are independent; gaps are recorded once (I-9).
async fn apply_is_idempotent_and_overlaps_are_skipped(f: Fixture) {
    let s = f.open().await;
    let recs = sample_readings(30, 3, 7);
    assert_eq!(s.cursor("n1").await.unwrap().seq, 0);
    let l1 = lease(&s, "n1").await;
    let a = apply(&s, &l1, &recs[..10], 10, 1).await.unwrap();
    assert_eq!((a.cursor, a.inserted, a.skipped), (10, 10, 0));
    let a = apply(&s, &l1, &recs[..10], 10, 2).await.unwrap();
    assert_eq!((a.cursor, a.inserted, a.skipped), (10, 0, 10));
    let a = apply(&s, &l1, &recs[5..20], 20, 3).await.unwrap();
    assert_eq!((a.cursor, a.inserted, a.skipped), (20, 10, 5));
    assert_eq!(all(&s, "n1").await, (1..=20).collect::<Vec<_>>());
    assert_eq!(s.cursor("n2").await.unwrap().seq, 0);
    let l2 = lease(&s, "n2").await;
    assert_eq!(apply(&s, &l2, &recs[..3], 3, 4).await.unwrap().inserted, 3);
    let nodes = s.nodes().await.unwrap();
    assert_eq!(nodes.len(), 2);
    assert_eq!(
        (nodes[0].node.as_str(), nodes[0].cursor, nodes[0].records),
        ("n1", 20, 20)
    );
    assert_eq!(nodes[0].incarnation, Some(9));
    assert_eq!(s.node("n2").await.unwrap().as_ref(), nodes.get(1));
    assert_eq!(s.node("n7").await.unwrap(), None);
    assert_eq!(
        s.cursor("n1").await.unwrap(),
        StoredCursor {
            seq: 20,
            incarnation: Some(9),
            epoch: 1,
            top: 20,
        }
    );
    s.record_gap("n1", 11, 20, 5).await.unwrap();
    s.record_gap("n1", 11, 20, 6).await.unwrap();
    s.record_gap("n1", 12, 15, 7).await.unwrap();
    assert_eq!(
        s.nodes().await.unwrap()[0].lost_records,
        10,
        "each gap once"
    );
    s.record_gap("n9", 1, 40, 8).await.unwrap();
    let n9 = s
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.node == "n9")
        .unwrap();
    assert_eq!((n9.cursor, n9.records, n9.lost_records), (0, 0, 40));
    assert_eq!((n9.incarnation, n9.last_update_ms), (None, 8));
}

/// I-3: the cursor moves only with an apply, never back, and survives a
/// restart; an empty apply can move it over a gap in the seqs.
async fn cursor_only_moves_forward_and_survives_reopen(f: Fixture) {
    let recs = sample_readings(10, 2, 1);
    {
        let s = f.open().await;
        let l = lease(&s, "n1").await;
        apply(&s, &l, &recs[..4], 4, 1).await.unwrap();
        assert_eq!(s.cursor("n1").await.unwrap().seq, 4);
        let _ = all(&s, "n1").await;
        assert_eq!(s.cursor("n1").await.unwrap().seq, 4);
    }
    let s = f.open().await;
    let (l, cursor) = s.take_lease("n1", "agg-test", 2).await.unwrap();
    assert_eq!(cursor.seq, 4, "the lease comes with the stored cursor");
    let a = apply(&s, &l, &[], 7, 2).await.unwrap();
    assert_eq!(a.cursor, 7);
    let a = apply(&s, &l, &recs[4..], 10, 3).await.unwrap();
    assert_eq!((a.inserted, a.skipped), (3, 3));
    // A late apply that names a lower `through` never moves it back.
    let a = apply(&s, &l, &[], 5, 4).await.unwrap();
    assert_eq!(a.cursor, 10);
    assert_eq!(s.cursor("n1").await.unwrap().seq, 10);
}

/// Queries filter by stream, `after_seq` and limit.
async fn records_query_filters_by_stream_after_and_limit(f: Fixture) {
    let s = f.open().await;
    let recs = sample_readings(20, 2, 3);
    let l = lease(&s, "n1").await;
    apply(&s, &l, &recs, 20, 9).await.unwrap();
    let q = |stream: Option<&str>, after_seq, limit| RecordQuery {
        stream: stream.map(str::to_owned),
        ..RecordQuery::node("n1", after_seq, limit)
    };
    let r = s.records(&q(Some("sensors/s1"), 0, 100)).await.unwrap();
    assert_eq!(
        r.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    );
    assert_eq!(r[0].payload, recs[1].payload);
    assert_eq!(r[0].timestamp_ms, recs[1].timestamp_ms);
    assert_eq!(r[0].received_ms, 9);
    let r = s.records(&q(None, 15, 3)).await.unwrap();
    assert_eq!(
        r.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![16, 17, 18]
    );
    assert!(s.records(&q(None, 0, 0)).await.unwrap().is_empty());
    let mut nobody = q(None, 0, 5);
    nobody.node = "nobody".into();
    assert!(s.records(&nobody).await.unwrap().is_empty());
}

/// I-33: a loss report rides the ordered stream: filed apart from the
/// data, exactly once, summed per stream and reason.
async fn loss_reports_are_filed_once_and_summed(f: Fixture) {
    let s = f.open().await;
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
    let l = lease(&s, "n").await;
    let out = apply(&s, &l, &batch, 25, 5).await.unwrap();
    assert_eq!(out.inserted, 5);
    // Resent above the cursor (an out-of-order peer): nothing twice.
    let again = s
        .apply(ApplyBatches {
            lease: l.clone(),
            outbox: (9, 1),
            batches: b(&batch),
            through: 10,
            now_ms: 6,
        })
        .await
        .unwrap();
    assert_eq!((again.inserted, again.skipped), (0, 5));
    assert_eq!(
        all(&s, "n").await,
        vec![11, 23, 25],
        "an unreadable report is kept as data"
    );
    let nodes = s.nodes().await.unwrap();
    let losses = &nodes[0].losses;
    assert_eq!(losses.len(), 1);
    assert_eq!((losses[0].records, losses[0].reports), (20, 2));
    assert_eq!(
        (losses[0].first_seq, losses[0].last_seq),
        (Some(1), Some(22))
    );
    assert_eq!(losses[0].reason, "quota");
    let listed = s.losses("n", 0, 10).await.unwrap();
    assert_eq!(
        listed.iter().map(|l| l.seq).collect::<Vec<_>>(),
        vec![12, 24]
    );
    assert_eq!(s.losses("n", 12, 10).await.unwrap().len(), 1);
}

/// I-36: a second aggregator taking the node's lease fences the first: its
/// next apply is refused in the transaction and writes nothing; the new
/// holder resumes from the stored cursor.
async fn a_taken_lease_fences_the_earlier_holder(f: Fixture) {
    let a = f.open().await;
    let b_store = f.open().await;
    let recs = sample_readings(30, 1, 5);
    let (la, _) = a.take_lease("n1", "agg-a", 1).await.unwrap();
    apply(&a, &la, &recs[..10], 10, 1).await.unwrap();
    let (lb, cursor) = b_store.take_lease("n1", "agg-b", 2).await.unwrap();
    assert!(lb.token > la.token, "{lb:?} after {la:?}");
    assert_eq!(cursor.seq, 10);
    let refused = apply(&a, &la, &recs[10..20], 20, 3).await.unwrap_err();
    assert!(
        matches!(refused, StoreError::Fenced { held, current, .. } if held == la.token && current == lb.token),
        "{refused}"
    );
    assert_eq!(
        all(&a, "n1").await,
        (1..=10).collect::<Vec<_>>(),
        "nothing written"
    );
    assert_eq!(a.cursor("n1").await.unwrap().seq, 10);
    apply(&b_store, &lb, &recs[10..20], 20, 4).await.unwrap();
    assert_eq!(all(&a, "n1").await, (1..=20).collect::<Vec<_>>());
    // Letting go of a lease someone else took since changes nothing.
    a.release_lease(&la, 5).await.unwrap();
    let leases = a.leases().await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(
        (leases[0].token, leases[0].holder.as_deref()),
        (lb.token, Some("agg-b"))
    );
    assert_eq!(a.lease("n1").await.unwrap().as_ref(), leases.first());
    assert_eq!(a.lease("n9").await.unwrap(), None);
    b_store.release_lease(&lb, 6).await.unwrap();
    let leases = a.leases().await.unwrap();
    assert_eq!((leases[0].holder.as_deref(), leases[0].since_ms), (None, 6));
    // An apply without ever taking the lease is refused too.
    let never = Lease {
        node: "n2".into(),
        token: 1,
    };
    assert!(matches!(
        apply(&a, &never, &recs[..1], 1, 7).await,
        Err(StoreError::Fenced { current: 0, .. })
    ));
}

/// Applies of many nodes at once (committed together in groups by both
/// stores): each node's records land once with its cursor and count, and
/// a fenced apply among them is refused alone (I-36).
async fn many_nodes_applying_at_once_and_a_fenced_one_among_them(f: Fixture) {
    let s = f.open().await;
    let recs = sample_readings(10, 2, 3);
    let mut leases = Vec::new();
    for i in 0..40 {
        leases.push(lease(&s, &format!("g{i:02}")).await);
    }
    // Someone else took g07 since.
    let newer = lease(&s, "g07").await;
    let mut set = tokio::task::JoinSet::new();
    for l in leases {
        let (s, recs) = (s.clone(), recs.clone());
        set.spawn(async move {
            let r = apply(&s, &l, &recs, 10, 5).await;
            (l.node, r)
        });
    }
    let mut outcomes = std::collections::BTreeMap::new();
    while let Some(done) = set.join_next().await {
        let (node, r) = done.unwrap();
        outcomes.insert(node, r);
    }
    for (node, r) in &outcomes {
        if node == "g07" {
            assert!(matches!(r, Err(StoreError::Fenced { .. })), "{r:?}");
            assert!(
                all(&s, node).await.is_empty(),
                "a fenced apply writes nothing"
            );
        } else {
            let o = r.as_ref().unwrap();
            assert_eq!((o.cursor, o.inserted, o.skipped), (10, 10, 0), "{node}");
            assert_eq!(all(&s, node).await, (1..=10).collect::<Vec<_>>());
        }
    }
    let nodes = s.nodes().await.unwrap();
    assert_eq!(nodes.len(), 39);
    assert!(nodes.iter().all(|n| (n.cursor, n.records) == (10, 10)));
    // The new holder applies as usual.
    assert_eq!(apply(&s, &newer, &recs, 10, 6).await.unwrap().inserted, 10);
}

/// Rollouts (I-42): numbered in order, a second aggregator's filings
/// included; documents replaced; modules kept; statuses read back by node.
async fn rollouts_are_numbered_kept_and_updated(f: Fixture) {
    let s = f.open().await;
    let other = f.open().await;
    assert_eq!(s.create_rollout("{\"a\":1}", b"mod-a", 1).await.unwrap(), 1);
    assert_eq!(
        other
            .create_rollout("{\"b\":1}", b"mod-b", 2)
            .await
            .unwrap(),
        2
    );
    s.update_rollout(1, "{\"a\":2}", 3).await.unwrap();
    drop(s);
    let s = f.open().await;
    assert_eq!(
        s.rollouts().await.unwrap(),
        [(1, "{\"a\":2}".to_string()), (2, "{\"b\":1}".to_string())]
    );
    assert_eq!(
        s.rollout_module(2).await.unwrap().as_deref(),
        Some(&b"mod-b"[..])
    );
    assert!(s.rollout_module(9).await.unwrap().is_none());
    let status = fogline_protocol::status::NodeStatus {
        at_ms: 5,
        ..Default::default()
    };
    s.put_status("n1", &status, 6).await.unwrap();
    let got = s
        .statuses(&["n1".to_string(), "n2".to_string()])
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "n1");
    let back = fogline_protocol::status::NodeStatus::decode(got[0].1.as_bytes()).unwrap();
    assert_eq!(back.at_ms, 5);
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Fixture::sqlite().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Fixture::postgres().await).await
                }
            )*
        }
    };
}

contract!(
    apply_is_idempotent_and_overlaps_are_skipped,
    cursor_only_moves_forward_and_survives_reopen,
    records_query_filters_by_stream_after_and_limit,
    loss_reports_are_filed_once_and_summed,
    a_taken_lease_fences_the_earlier_holder,
    many_nodes_applying_at_once_and_a_fenced_one_among_them,
    rollouts_are_numbered_kept_and_updated,
);

/// I-36 on PostgreSQL, interleaved for real: aggregator A passes its fence
/// check and is paused mid-apply (the test holds the cursor row's lock);
/// B's take of the lease waits for A's transaction; A commits; from B's
/// take on, A's applies are refused. Never both applying.
#[tokio::test]
async fn postgres_a_paused_apply_and_a_racing_take_never_both_apply() {
    let f = Fixture::postgres().await;
    let Storage::Postgres(db) = &f.storage else {
        unreachable!()
    };
    let a = f.open().await;
    let b_store = f.open().await;
    let recs = sample_readings(30, 1, 11);
    let (la, _) = a.take_lease("n1", "agg-a", 1).await.unwrap();
    apply(&a, &la, &recs[..5], 5, 1).await.unwrap();

    // Pause: hold the cursor row, which A's apply locks after its fence.
    let mut pauser = db.connect().await.unwrap();
    let hold = pauser.transaction().await.unwrap();
    hold.execute("SELECT 1 FROM cursors WHERE node = 'n1' FOR UPDATE", &[])
        .await
        .unwrap();
    let a2 = a.clone();
    let la2 = la.clone();
    let recs2 = recs.clone();
    let paused = tokio::spawn(async move { apply(&a2, &la2, &recs2[5..10], 10, 2).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!paused.is_finished(), "A's apply is paused mid-transaction");
    let b2 = b_store.clone();
    let take = tokio::spawn(async move { b2.take_lease("n1", "agg-b", 3).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !take.is_finished(),
        "B's take waits for A's transaction (A holds the lease row)"
    );
    hold.rollback().await.unwrap();
    let applied = paused.await.unwrap().unwrap();
    assert_eq!(applied.cursor, 10, "A, fenced in before the take, commits");
    let (lb, cursor) = take.await.unwrap().unwrap();
    assert_eq!(cursor.seq, 10, "B's take reads the cursor A left: final");
    assert!(matches!(
        apply(&a, &la, &recs[10..15], 15, 4).await,
        Err(StoreError::Fenced { .. })
    ));
    apply(&b_store, &lb, &recs[10..15], 15, 5).await.unwrap();
    assert_eq!(all(&a, "n1").await, (1..=15).collect::<Vec<_>>());
}

/// PostgreSQL: several aggregators starting at once on a new database run
/// each migration once; retention drops whole day partitions by event time.
#[tokio::test]
async fn postgres_migrates_once_and_retention_drops_old_days() {
    let f = Fixture::postgres().await;
    let Storage::Postgres(db) = &f.storage else {
        unreachable!()
    };
    let opened = futures_join(&f).await;
    assert_eq!(opened, 3);
    let client = db.connect().await.unwrap();
    let versions: i64 = client
        .query_one("SELECT COUNT(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(versions, 5, "each migration ran once");

    const DAY: u64 = 86_400_000;
    let now = fogline_telemetry::clock::now_ms();
    let store = PostgresStore::connect(
        &db.url,
        PostgresOptions {
            pool_size: 2,
            retention: Some(Duration::from_secs(2 * 86_400)),
        },
    )
    .await
    .unwrap();
    // Partitions for ten days ago exist once maintenance ran then.
    store.maintain(now - 10 * DAY).await.unwrap();
    let s: Arc<dyn Store> = Arc::new(store.clone());
    let old: Vec<Record> = (1..=5)
        .map(|i| Record {
            seq: i,
            stream: "s".into(),
            timestamp_ms: now - 10 * DAY,
            payload: b"{}".to_vec(),
        })
        .chain((6..=8).map(|i| Record {
            seq: i,
            stream: "s".into(),
            timestamp_ms: now,
            payload: b"{}".to_vec(),
        }))
        .collect();
    let l = lease(&s, "n1").await;
    apply(&s, &l, &old, 8, now).await.unwrap();
    assert_eq!(all(&s, "n1").await.len(), 8);
    store.maintain(now).await.unwrap();
    assert_eq!(
        all(&s, "n1").await,
        vec![6, 7, 8],
        "the day ten days back was dropped whole; today kept"
    );
    assert_eq!(s.cursor("n1").await.unwrap().seq, 8, "the cursor stays");
}

/// Three aggregators connecting to a fresh database at once.
async fn futures_join(f: &Fixture) -> usize {
    let (a, b, c) = tokio::join!(f.open(), f.open(), f.open());
    [a, b, c].len()
}

/// A SQLite file from before the per-node record count gets it counted
/// once at open, then kept by the applies.
#[tokio::test]
async fn an_older_sqlite_file_gets_its_record_counts_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let l = lease(&s, "n1").await;
        apply(&s, &l, &sample_readings(12, 2, 1), 12, 1)
            .await
            .unwrap();
    }
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("ALTER TABLE cursors DROP COLUMN records")
        .unwrap();
    let s: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
    assert_eq!(s.nodes().await.unwrap()[0].records, 12);
    let l = lease(&s, "n1").await;
    let more = sample_readings(15, 2, 1);
    apply(&s, &l, &more[12..], 15, 2).await.unwrap();
    assert_eq!(s.nodes().await.unwrap()[0].records, 15);
}
