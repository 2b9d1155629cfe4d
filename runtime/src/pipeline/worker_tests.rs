//! The worker's batching against a real outbox: `outbox.commit_interval`
//! gathers what arrives into fewer commits, and never releases an
//! acknowledgement before the commit holding its message (I-1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::*;
use crate::config::SyncMode;
use crate::ingest::session_store::Replica;
use crate::ingest::{Ack, AckKind, AckRoute, Chunk, IngestSink, Item, Received};
use crate::outbox::Outbox;

struct Running {
    sink: IngestSink,
    route: Arc<AckRoute>,
    acks: mpsc::UnboundedReceiver<Vec<Ack>>,
    handle: WorkerHandle,
    health: Arc<PipelineHealth>,
    path: std::path::PathBuf,
    _commands: mpsc::UnboundedSender<WorkerCommand>,
    _dir: tempfile::TempDir,
}

/// A worker with one pass-through pipeline on a fresh outbox.
fn start(commit_interval: Duration) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let outbox = Outbox::open(&path, SyncMode::Full).unwrap();
    let mut chain = Chain::new("p".into(), Vec::new());
    chain.lane = outbox.lane("p").unwrap();
    let (sink, chunks) = IngestSink::new(1 << 20);
    let (commands_tx, commands) = mpsc::unbounded_channel();
    let health = Arc::new(PipelineHealth::default());
    let handle = spawn_worker(
        Worker {
            chains: vec![chain],
            router: Router::new(vec![vec!["s/#".into()]]),
            outbox,
            options: WorkerOptions {
                max_batch: 8192,
                max_batch_bytes: 4 << 20,
                commit_linger: Duration::ZERO,
                commit_interval,
                max_topic: 1024,
                tick_interval: Duration::from_secs(3600),
                unrouted: crate::config::UnroutedPolicy::DeadLetter,
            },
            committed: Arc::new(tokio::sync::Notify::new()),
            sessions: Replica::default(),
            health: health.clone(),
            commands,
            functions: Default::default(),
            warned_unrouted: Default::default(),
            local: Default::default(),
        },
        chunks,
    )
    .unwrap();
    let (route, acks) = AckRoute::new(false);
    Running {
        sink,
        route,
        acks,
        handle,
        health,
        path,
        _commands: commands_tx,
        _dir: dir,
    }
}

impl Running {
    fn chunk(&self, pkid: u16) -> Chunk {
        let mut c = Chunk::new(Some(self.route.clone()), 1 << 16);
        c.push(Item {
            message: Some(Received {
                topic: b"s/1".to_vec(),
                payload: format!("m{pkid}").into_bytes(),
                received_ms: 1_764_000_000_000,
            }),
            ack: Some(Ack {
                kind: AckKind::PubAck,
                pkid,
                reason: 0,
            }),
        });
        c
    }

    async fn send(&self, pkid: u16) {
        self.sink.send(self.chunk(pkid)).await.unwrap();
    }

    /// Whether message `pkid` is in a committed outbox row (a reader sees
    /// only committed transactions).
    fn committed(&self, pkid: u16) -> bool {
        let conn = rusqlite::Connection::open(&self.path).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.query_row(
            "SELECT COUNT(*) FROM records WHERE payload = ?1",
            [format!("m{pkid}").into_bytes()],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
            == 1
    }

    /// The next acknowledgements, with when they came; each checked
    /// against the outbox the moment it arrives.
    async fn next_acks(&mut self, within: Duration) -> (Vec<u16>, Instant) {
        let acks = tokio::time::timeout(within, self.acks.recv())
            .await
            .expect("acknowledgements in time")
            .expect("the route is open");
        let at = Instant::now();
        let pkids: Vec<u16> = acks.iter().map(|a| a.pkid).collect();
        for &p in &pkids {
            assert!(
                self.committed(p),
                "I-1: PUBACK {p} released before the commit holding its message"
            );
        }
        (pkids, at)
    }
}

/// I-1 with `commit_interval`: readings arriving within the interval wait
/// for one commit, and no acknowledgement leaves before it — even while the
/// commit is held up (another writer holds the outbox's lock) past the
/// interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_interval_groups_commits_and_acks_only_after_them() {
    let interval = Duration::from_millis(400);
    let mut w = start(interval);

    // The first batch after a quiet spell commits at once.
    let sent = Instant::now();
    w.send(1).await;
    let (acked, first_at) = w.next_acks(Duration::from_secs(5)).await;
    assert_eq!(acked, vec![1]);
    assert!(
        first_at - sent < interval,
        "a lone reading after a quiet spell is not held for the interval ({:?})",
        first_at - sent
    );
    let commits_before = w.health.commits.load(Ordering::Acquire);

    // Three readings 100 ms apart, within one interval: one commit, one
    // release of their acks, no earlier than the interval allows.
    for pkid in 2..=4 {
        w.send(pkid).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (acked, at) = w.next_acks(Duration::from_secs(5)).await;
    assert_eq!(acked, vec![2, 3, 4], "one commit gathered the interval");
    assert!(
        at - first_at >= interval - Duration::from_millis(50),
        "committed {:?} after the previous batch, interval {interval:?}",
        at - first_at
    );
    assert_eq!(
        w.health.commits.load(Ordering::Acquire) - commits_before,
        1,
        "one commit for the three readings"
    );

    // Another writer holds the outbox's write lock: the commit waits, and
    // so do the acknowledgements, well past the interval.
    let blocker = rusqlite::Connection::open(&w.path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    w.send(5).await;
    let held = tokio::time::timeout(interval * 3, w.acks.recv()).await;
    assert!(
        held.is_err(),
        "I-1: an acknowledgement left while its commit could not have happened: {held:?}"
    );
    assert!(!w.committed(5));
    blocker.execute_batch("ROLLBACK").unwrap();
    let (acked, _) = w.next_acks(Duration::from_secs(10)).await;
    assert_eq!(acked, vec![5]);

    drop(w.sink);
    tokio::task::spawn_blocking(move || w.handle.join())
        .await
        .unwrap();
}

/// A stopping daemon does not wait out the interval: what was gathered is
/// committed and acknowledged at once (I-16).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_now_ends_the_interval_wait() {
    let interval = Duration::from_secs(8);
    let mut w = start(interval);
    w.send(1).await;
    let _ = w.next_acks(Duration::from_secs(5)).await;
    w.send(2).await;
    // Held for the interval…
    assert!(
        tokio::time::timeout(Duration::from_millis(300), w.acks.recv())
            .await
            .is_err(),
        "the second reading waits for the interval"
    );
    // …until the daemon stops.
    let asked = Instant::now();
    w.handle.commit_now();
    let (acked, at) = w.next_acks(Duration::from_secs(5)).await;
    assert_eq!(acked, vec![2]);
    assert!(
        at - asked < Duration::from_secs(2),
        "committed {:?} after commit_now",
        at - asked
    );
    drop(w.sink);
    tokio::task::spawn_blocking(move || w.handle.join())
        .await
        .unwrap();
}
