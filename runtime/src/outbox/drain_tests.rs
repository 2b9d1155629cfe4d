//! The drain plan (I-35) against a real SQLite file and a model aggregator
//! that applies by floor and skips what it holds: alerts first, live data
//! first, turns; every record applied exactly once, floors never going
//! down, the cursor never passing a record still unsent; what was sent is
//! never dropped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use super::super::retention::{LanePolicy, Retention, WhenFull};
use super::super::*;
use super::*;

const BULK: u32 = 10;
const ALERTS: u32 = 11;

fn open(dir: &tempfile::TempDir, order: DrainOrder) -> (Outbox, OutboxReader) {
    let path = dir.path().join("outbox.db");
    let w = Outbox::open(&path, SyncMode::Normal).unwrap();
    let mut r = OutboxReader::open(&path, SyncMode::Normal).unwrap();
    r.set_protected(w.protected_handle());
    r.set_drain(DrainPolicy {
        order,
        priorities: [(BULK, Priority::Normal), (ALERTS, Priority::High)]
            .into_iter()
            .collect(),
    });
    (w, r)
}

fn commit(w: &mut Outbox, lane: u32, n: usize) -> (u64, u64) {
    let c = Commit {
        records: (0..n)
            .map(|i| Message {
                stream: format!("s/{lane}"),
                timestamp_ms: i as u64,
                payload: vec![b'x'; 100],
            })
            .collect(),
        lanes: vec![(lane, n)],
        ..Commit::default()
    };
    let done = w.commit(&c).unwrap();
    (done.first_seq, done.first_seq + n as u64 - 1)
}

/// The aggregator as protocol 4 has it: skips what it holds, moves its
/// cursor to the floor.
#[derive(Default)]
struct Agg {
    cursor: u64,
    applied: BTreeSet<u64>,
    /// The data records among them (not loss reports).
    data: BTreeSet<u64>,
    /// Lanes in the order their batches arrived.
    arrivals: Vec<(u32, u64, u64)>,
    last_floor: u64,
}

impl Agg {
    fn apply(&mut self, r: &OutboxReader, records: &[Record], floor: u64) {
        assert!(
            floor >= self.last_floor,
            "floor went down: {floor} after {}",
            self.last_floor
        );
        self.last_floor = floor;
        let lane = if records[0].stream == "s/11" {
            ALERTS
        } else {
            BULK
        };
        self.arrivals
            .push((lane, records[0].seq, records[records.len() - 1].seq));
        for rec in records {
            if rec.seq > self.cursor && self.applied.insert(rec.seq) && rec.stream.starts_with("s/")
            {
                self.data.insert(rec.seq);
            }
        }
        self.cursor = self.cursor.max(floor - 1);
        // The cursor never passes a record the outbox still holds unsent
        // and the aggregator does not have.
        let held: i64 = r
            .conn
            .query_row(
                "SELECT COUNT(*) FROM records WHERE seq <= ?1",
                [self.cursor as i64],
                |x| x.get(0),
            )
            .unwrap();
        let missing = (1..=self.cursor)
            .filter(|s| !self.applied.contains(s))
            .filter(|s| {
                r.conn
                    .query_row(
                        "SELECT COUNT(*) FROM records WHERE seq = ?1",
                        [*s as i64],
                        |x| x.get::<_, i64>(0),
                    )
                    .unwrap()
                    > 0
            })
            .count();
        assert_eq!(
            missing, 0,
            "cursor {} passed unsent records ({held} held)",
            self.cursor
        );
    }
}

/// Whether the outbox still holds `seq`.
fn held(r: &OutboxReader, seq: u64) -> bool {
    r.conn
        .query_row(
            "SELECT COUNT(*) FROM records WHERE seq = ?1",
            [seq as i64],
            |x| x.get::<_, i64>(0),
        )
        .unwrap()
        > 0
}

/// The bulk lane may hold `bytes` and drops its oldest beyond that.
fn bulk_quota(bytes: u64) -> Retention {
    Retention {
        lanes: [(
            BULK,
            LanePolicy {
                name: "bulk".into(),
                max_bytes: Some(bytes),
                when_full: WhenFull::DropOldest,
                ..LanePolicy::default()
            },
        )]
        .into_iter()
        .collect(),
        dead_letter_max_bytes: u64::MAX,
        local_max_bytes: 64 << 20,
        ..Retention::default()
    }
}

/// Sends and acknowledges everything, one batch at a time.
fn drain(r: &OutboxReader, agg: &mut Agg, per_batch: usize) {
    let mut batches = 0;
    while let Some((records, floor)) = r.read_planned(per_batch, 1 << 20).unwrap() {
        agg.apply(r, &records, floor);
        batches += 1;
        r.delete_acked(agg.cursor, batches).unwrap();
    }
}

#[test]
fn alerts_drain_before_the_backlog_and_everything_arrives_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, r) = open(&dir, DrainOrder::OldestFirst);
    assert!(r.out_of_order());
    commit(&mut w, BULK, 300);
    let alerts = commit(&mut w, ALERTS, 5);
    commit(&mut w, BULK, 100);
    r.start_plan(0).unwrap();
    let mut agg = Agg::default();
    // The first batch is the alerts, though numbered after 300 records.
    let (first, floor) = r.read_planned(100, 1 << 20).unwrap().unwrap();
    assert_eq!(
        (first[0].seq, first[first.len() - 1].seq),
        alerts,
        "alerts first"
    );
    assert_eq!(floor, 1, "the backlog is still unsent");
    agg.apply(&r, &first, floor);
    r.delete_acked(agg.cursor, 1).unwrap();
    assert_eq!(agg.cursor, 0);
    // An alert committed while the backlog drains jumps the queue too.
    let (rec, _) = r.read_planned(100, 1 << 20).unwrap().unwrap();
    agg.apply(&r, &rec, 101);
    r.delete_acked(agg.cursor, 2).unwrap();
    let late = commit(&mut w, ALERTS, 2);
    let (rec, _) = r.read_planned(100, 1 << 20).unwrap().unwrap();
    assert_eq!((rec[0].seq, rec[1].seq), late);
    agg.apply(&r, &rec, 101);
    r.delete_acked(agg.cursor, 3).unwrap();
    let mut batches = 3;
    while let Some((records, floor)) = r.read_planned(100, 1 << 20).unwrap() {
        assert!(!records.iter().any(|x| x.stream == "s/11"));
        agg.apply(&r, &records, floor);
        batches += 1;
        r.delete_acked(agg.cursor, batches).unwrap();
    }
    assert_eq!(agg.applied.len(), 407, "every record once");
    assert_eq!(agg.cursor, 407, "the cursor reaches the end");
    let left: i64 = r
        .conn
        .query_row("SELECT COUNT(*) FROM records", [], |x| x.get(0))
        .unwrap();
    assert_eq!(left, 0, "acknowledged records are deleted");
    let usage: i64 = r
        .conn
        .query_row(
            "SELECT COALESCE(SUM(records), 0) FROM lane_usage",
            [],
            |x| x.get(0),
        )
        .unwrap();
    assert_eq!(usage, 0, "lane usage moved with the deletes");
}

#[test]
fn live_first_sends_what_arrives_now_before_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, r) = open(&dir, DrainOrder::LiveFirst);
    commit(&mut w, BULK, 500);
    r.start_plan(0).unwrap();
    let live = commit(&mut w, BULK, 20);
    let mut agg = Agg::default();
    let (rec, floor) = r.read_planned(100, 1 << 20).unwrap().unwrap();
    assert_eq!((rec[0].seq, rec[rec.len() - 1].seq), live, "live first");
    assert_eq!(floor, 1);
    agg.apply(&r, &rec, floor);
    r.delete_acked(agg.cursor, 1).unwrap();
    // More live data keeps jumping the backlog.
    let (_, mut batches) = (0, 1);
    let (rec, floor) = r.read_planned(100, 1 << 20).unwrap().unwrap();
    assert_eq!(rec[0].seq, 1, "then the backlog, oldest first");
    agg.apply(&r, &rec, floor);
    batches += 1;
    r.delete_acked(agg.cursor, batches).unwrap();
    let live2 = commit(&mut w, BULK, 3);
    let (rec, floor) = r.read_planned(100, 1 << 20).unwrap().unwrap();
    assert_eq!((rec[0].seq, rec[2].seq), live2);
    agg.apply(&r, &rec, floor);
    batches += 1;
    r.delete_acked(agg.cursor, batches).unwrap();
    while let Some((records, floor)) = r.read_planned(100, 1 << 20).unwrap() {
        agg.apply(&r, &records, floor);
        batches += 1;
        r.delete_acked(agg.cursor, batches).unwrap();
    }
    assert_eq!(agg.applied.len(), 523);
    assert_eq!(agg.cursor, 523);
}

#[test]
fn interleaved_takes_turns_between_live_and_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, r) = open(&dir, DrainOrder::Interleaved);
    commit(&mut w, BULK, 400);
    r.start_plan(0).unwrap();
    commit(&mut w, BULK, 400);
    let mut agg = Agg::default();
    drain(&r, &mut agg, 100);
    let kinds: Vec<bool> = agg.arrivals.iter().map(|a| a.1 > 400).collect();
    assert_eq!(
        &kinds[..6],
        &[true, false, true, false, true, false],
        "{:?}",
        agg.arrivals
    );
    assert_eq!(agg.applied.len(), 800);
    assert_eq!(agg.cursor, 800);
}

#[test]
fn a_resend_after_a_lost_ack_is_applied_once_and_sent_records_are_never_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, r) = open(&dir, DrainOrder::LiveFirst);
    w.set_retention(bulk_quota(60_000)).unwrap();
    commit(&mut w, BULK, 300);
    r.start_plan(0).unwrap();
    commit(&mut w, BULK, 50);
    let mut agg = Agg::default();
    // Live (301..=350) sent and applied, but the ack is lost.
    let (live, floor) = r.read_planned(100, 1 << 20).unwrap().unwrap();
    agg.apply(&r, &live, floor);
    // Oldest backlog sent too, not applied.
    let (old, _) = r.read_planned(50, 1 << 20).unwrap().unwrap();
    assert_eq!(old[0].seq, 1);
    // The lane fills: the drops take the unsent backlog, never what was sent.
    commit(&mut w, BULK, 400);
    let held = |seq: u64| held(&r, seq);
    assert!(live.iter().all(|x| held(x.seq)), "sent live records kept");
    assert!(old.iter().all(|x| held(x.seq)), "sent backlog records kept");
    assert!(!held(51), "the unsent backlog made room");
    // Reconnect: the cursor is still 0; everything left is resent, and
    // the aggregator skips what it holds.
    r.accept_cursor(agg.cursor).unwrap();
    // The carried marks still protect what the last session sent.
    commit(&mut w, BULK, 100);
    assert!(
        live.iter().all(|x| held(x.seq)),
        "still kept after the reconnect"
    );
    r.start_plan(agg.cursor).unwrap();
    agg.last_floor = 0;
    drain(&r, &mut agg, 100);
    let dropped: u64 = r
        .conn
        .query_row(
            "SELECT COALESCE(SUM(records), 0) FROM losses WHERE reason = 'quota'",
            [],
            |x| x.get::<_, i64>(0),
        )
        .unwrap() as u64;
    // Delivered + counted lost = accepted, with nothing counted twice.
    assert!(dropped > 0, "the quota dropped");
    assert_eq!(agg.data.len() as u64 + dropped, 850);
}

#[test]
fn what_was_sent_out_of_order_stays_protected_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let live = {
        let (mut w, r) = open(&dir, DrainOrder::LiveFirst);
        commit(&mut w, BULK, 200);
        r.start_plan(0).unwrap();
        commit(&mut w, BULK, 50);
        let (live, _) = r.read_planned(100, 1 << 20).unwrap().unwrap();
        assert_eq!(live[0].seq, 201);
        live
    };
    // Restarted: the session's cursor says nothing was applied, yet the
    // live records may have been (their ack lost with the process).
    let (mut w, r) = open(&dir, DrainOrder::LiveFirst);
    w.set_retention(bulk_quota(30_000)).unwrap();
    r.accept_cursor(0).unwrap();
    r.start_plan(0).unwrap();
    // Room for these needs more than the unsent backlog: refused, rather
    // than dropping what was sent.
    let refused = w.commit(&Commit {
        records: (0..250)
            .map(|i| Message {
                stream: format!("s/{BULK}"),
                timestamp_ms: i,
                payload: vec![b'x'; 100],
            })
            .collect(),
        lanes: vec![(BULK, 250)],
        ..Commit::default()
    });
    assert!(
        matches!(refused, Err(OutboxError::QuotaFull { .. })),
        "{refused:?}"
    );
    commit(&mut w, BULK, 100);
    let held = |seq: u64| held(&r, seq);
    assert!(!held(1), "the quota dropped the unsent backlog");
    assert!(live.iter().all(|x| held(x.seq)), "what was sent is kept");
}
