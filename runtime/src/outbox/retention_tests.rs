//! The outbox's bounds (I-32) and loss accounting (I-33) against a real
//! SQLite file: what a quota drops is reported in the same commit, and
//! delivered + lost = accepted, exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use fogline_protocol::{LossReason, LossReport, LOSS_STREAM};

use super::super::*;
use super::*;

fn open(dir: &tempfile::TempDir) -> (Outbox, OutboxReader, PathBuf) {
    let path = dir.path().join("outbox.db");
    let w = Outbox::open(&path, SyncMode::Normal).unwrap();
    let mut r = OutboxReader::open(&path, SyncMode::Normal).unwrap();
    r.set_protected(w.protected_handle());
    (w, r, path)
}

fn batch(lane: u32, stream: &str, n: usize, size: usize, first: u64) -> Commit {
    Commit {
        records: (0..n)
            .map(|i| Message {
                stream: stream.into(),
                timestamp_ms: first + i as u64,
                payload: vec![b'x'; size],
            })
            .collect(),
        lanes: vec![(lane, n)],
        ..Commit::default()
    }
}

/// Everything in the outbox: data seqs and loss reports.
fn contents(r: &OutboxReader) -> (BTreeSet<u64>, Vec<LossReport>) {
    let mut data = BTreeSet::new();
    let mut reports = Vec::new();
    let mut after = 0;
    loop {
        let rows = r.read_after(after, 10_000, 64 << 20).unwrap();
        let Some(last) = rows.last() else { break };
        after = last.seq;
        for row in rows {
            if row.stream == LOSS_STREAM {
                reports.push(LossReport::decode(&row.payload).unwrap());
            } else {
                data.insert(row.seq);
            }
        }
    }
    (data, reports)
}

fn policy(lane: u32, lp: LanePolicy) -> Retention {
    Retention {
        lanes: [(lane, lp)].into_iter().collect(),
        dead_letter_max_bytes: u64::MAX,
        local_max_bytes: 64 << 20,
        wal_allowance: 4 << 20,
        ..Retention::default()
    }
}

/// I-32, I-33: a full lane with `drop_oldest` drops its oldest records in
/// the commit that needs the room, and reports each with its seq range;
/// kept + reported = committed.
#[test]
fn drop_oldest_reports_every_drop_in_the_same_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, r, _) = open(&dir);
    let lane = w.lane("telemetry").unwrap();
    w.set_retention(policy(
        lane,
        LanePolicy {
            name: "telemetry".into(),
            max_bytes: Some(100 * 1024),
            when_full: WhenFull::DropOldest,
            ..LanePolicy::default()
        },
    ))
    .unwrap();
    let mut committed = 0u64;
    for i in 0..40 {
        let c = w.commit(&batch(lane, "s/1", 50, 100, i * 50)).unwrap();
        committed += 50;
        assert!(c.records >= 50);
    }
    let (data, reports) = contents(&r);
    let lost: u64 = reports.iter().map(|l| l.records).sum();
    assert!(lost > 0, "the lane overflowed");
    assert_eq!(data.len() as u64 + lost, committed, "nothing silent");
    assert!(reports.iter().all(|l| l.reason == LossReason::Quota
        && l.stream == "s/1"
        && l.detail.as_deref() == Some("pipelines.telemetry.max_bytes")));
    // The dropped seqs are exactly the ones missing, and the oldest.
    let min_kept = *data.first().unwrap();
    let dropped_hi = reports.iter().filter_map(|l| l.last_seq).max().unwrap();
    assert!(dropped_hi < min_kept, "oldest first");
    let stats = r.stats().unwrap();
    let lane_bytes = stats.backlog_bytes;
    assert!(lane_bytes <= 100 * 1024 + 4096 * 2, "{lane_bytes}");
    assert_eq!(
        stats.losses.iter().map(|l| l.records).sum::<u64>(),
        lost,
        "local totals agree"
    );
}

/// I-32: `block` refuses the commit, writes nothing, and says which quota
/// with the numbers.
#[test]
fn block_refuses_the_commit_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, r, _) = open(&dir);
    let lane = w.lane("p").unwrap();
    w.set_retention(policy(
        lane,
        LanePolicy {
            name: "p".into(),
            max_bytes: Some(10_000),
            when_full: WhenFull::Block,
            ..LanePolicy::default()
        },
    ))
    .unwrap();
    w.commit(&batch(lane, "s", 9, 1000, 0)).unwrap();
    let next = r.identity().unwrap().next_seq;
    let err = w.commit(&batch(lane, "s", 5, 1000, 9)).unwrap_err();
    assert!(matches!(err, OutboxError::QuotaFull { .. }), "{err}");
    assert_eq!(
        err.problem_kind(),
        fogline_telemetry::health::ProblemKind::QuotaFull
    );
    let text = err.to_string();
    assert!(text.contains("pipelines.p.max_bytes"), "{text}");
    assert_eq!(r.identity().unwrap().next_seq, next, "nothing numbered");
    let (data, reports) = contents(&r);
    assert_eq!(data.len(), 9);
    assert!(reports.is_empty());
    // Deleting what was acknowledged makes room again.
    r.delete_through(next - 1).unwrap();
    w.commit(&batch(lane, "s", 5, 1000, 9)).unwrap();
}

/// I-32: under the whole-outbox quota, `low` lanes are dropped before
/// `normal`, `high` last; a `block` lane is never dropped by it.
#[test]
fn priorities_decide_what_goes_first() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, r, path) = open(&dir);
    let low = w.lane("bulk").unwrap();
    let high = w.lane("alerts").unwrap();
    let mut p = Retention {
        max_bytes: Some(24 << 20),
        when_full: WhenFull::DropOldest,
        dead_letter_max_bytes: u64::MAX,
        local_max_bytes: 64 << 20,
        // As `EdgeConfig::wal_allowance` makes it for max_batch_bytes = 1 MiB.
        wal_allowance: (4 << 20) + 2 * (1 << 20),
        ..Retention::default()
    };
    p.lanes.insert(
        low,
        LanePolicy {
            name: "bulk".into(),
            priority: Priority::Low,
            when_full: WhenFull::DropOldest,
            ..LanePolicy::default()
        },
    );
    p.lanes.insert(
        high,
        LanePolicy {
            name: "alerts".into(),
            priority: Priority::High,
            when_full: WhenFull::DropOldest,
            ..LanePolicy::default()
        },
    );
    w.set_retention(p).unwrap();
    // Alerts first (oldest), then bulk until the quota is passed.
    w.commit(&batch(high, "alerts/a", 200, 500, 0)).unwrap();
    let mut committed = 200u64;
    for i in 0..60 {
        w.commit(&batch(low, "bulk/b", 1000, 500, i * 1000))
            .unwrap();
        committed += 1000;
    }
    let (data, reports) = contents(&r);
    let lost: u64 = reports.iter().map(|l| l.records).sum();
    assert!(lost > 0);
    assert_eq!(data.len() as u64 + lost, committed, "nothing silent");
    assert!(
        reports.iter().all(|l| l.stream == "bulk/b"),
        "the alerts, though oldest, were kept: {reports:?}"
    );
    let on_disk = std::fs::metadata(&path).unwrap().len()
        + std::fs::metadata(dir.path().join("outbox.db-wal")).map_or(0, |m| m.len());
    eprintln!("on disk: {on_disk} bytes of a 24 MiB quota");
    assert!(on_disk <= 24 << 20, "the quota holds on disk: {on_disk}");
}

/// I-32: records in flight (read by the uplink, not yet acknowledged) are
/// never dropped: they may be applied and would count twice.
#[test]
fn records_in_flight_are_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, r, _) = open(&dir);
    let lane = w.lane("p").unwrap();
    w.set_retention(policy(
        lane,
        LanePolicy {
            name: "p".into(),
            max_bytes: Some(20_000),
            when_full: WhenFull::DropOldest,
            ..LanePolicy::default()
        },
    ))
    .unwrap();
    w.commit(&batch(lane, "s", 10, 1000, 0)).unwrap();
    let sent = r.read_after(0, 5, 1 << 20).unwrap();
    assert_eq!(sent.len(), 5);
    for i in 0..10 {
        w.commit(&batch(lane, "s", 5, 1000, 10 + i * 5)).unwrap();
    }
    let (data, reports) = contents(&r);
    assert!(
        (1..=5).all(|s| data.contains(&s)),
        "in flight kept: {data:?}"
    );
    assert!(reports.iter().all(|l| l.first_seq.is_some_and(|f| f > 5)));
    // Across a restart too: what the last run sent may have been applied.
    let sent = w.protected_handle().below();
    assert!(sent >= 5);
    drop((w, r));
    let (w, r, _) = open(&dir);
    assert_eq!(w.protected_handle().below(), sent);
    // A new session's cursor releases them.
    r.accept_cursor(0).unwrap();
    assert_eq!(w.protected_handle().below(), 0);
}

/// I-32: `max_age` drops what was committed longer ago, counted.
#[test]
fn max_age_drops_old_records() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, r, _) = open(&dir);
    let lane = w.lane("p").unwrap();
    w.set_retention(policy(
        lane,
        LanePolicy {
            name: "p".into(),
            max_age: Some(Duration::from_secs(1)),
            ..LanePolicy::default()
        },
    ))
    .unwrap();
    let now = crate::clock::ingest_ms();
    let mut old = batch(lane, "s", 10, 10, 0);
    old.clock_ms = now - 5_000;
    w.commit(&old).unwrap();
    let mut fresh = batch(lane, "s", 10, 10, 0);
    fresh.clock_ms = now;
    w.commit(&fresh).unwrap();
    assert_eq!(w.expire().unwrap(), 10, "the old commit only");
    let (data, reports) = contents(&r);
    assert_eq!(data.len(), 10);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].reason, LossReason::MaxAge);
    assert_eq!(
        (reports[0].first_seq, reports[0].last_seq),
        (Some(1), Some(10))
    );
}

/// I-33: dead letters beyond their byte bound are pruned, oldest first,
/// and the pruning is reported.
#[test]
fn pruned_dead_letters_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, r, _) = open(&dir);
    w.set_retention(Retention {
        dead_letter_max_bytes: 50_000,
        ..Retention::default()
    })
    .unwrap();
    for i in 0..20u64 {
        let c = Commit {
            dead_letters: vec![DeadLetter {
                pipeline: "p".into(),
                function: "f".into(),
                reason: "rejected".into(),
                stage: Stage::Input,
                error: "no".into(),
                message: Message {
                    stream: "s/dl".into(),
                    timestamp_ms: i,
                    payload: vec![0; 5000],
                },
                payload_size: 5000,
            }],
            ..Commit::default()
        };
        w.commit(&c).unwrap();
    }
    let stats = r.stats().unwrap();
    assert!(
        stats.dead_letter_bytes <= 50_000,
        "{}",
        stats.dead_letter_bytes
    );
    let (_, reports) = contents(&r);
    let pruned: u64 = reports
        .iter()
        .filter(|l| l.reason == LossReason::DeadLetterPruned)
        .map(|l| l.records)
        .sum();
    assert_eq!(pruned + stats.dead_letters, 20, "kept + pruned = refused");
}

/// Lane usage moves with deletes too, and survives a reopen.
#[test]
fn usage_follows_deletes_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, r, path) = open(&dir);
    let lane = w.lane("p").unwrap();
    w.commit(&batch(lane, "s", 100, 10, 0)).unwrap();
    r.delete_through(40).unwrap();
    let s = r.stats().unwrap();
    assert_eq!((s.backlog_records, s.backlog_bytes), (60, 60 * 11));
    drop((w, r));
    let w = Outbox::open(&path, SyncMode::Normal).unwrap();
    assert_eq!(w.lane("p").unwrap(), lane, "lanes are stable");
    assert_eq!(read_stats(&path).unwrap().backlog_records, 60);
}

/// I-12 at drain time: a delete's accounting reads the rows it deletes by
/// their seq — never the whole backlog through the lane index, never a sort
/// holding their payloads.
#[test]
fn a_delete_counts_only_the_rows_it_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut w, r, path) = open(&dir);
    w.commit(&batch(5, "s", 100, 10, 1)).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let plan: Vec<String> = conn
        .prepare(&format!(
            "EXPLAIN QUERY PLAN {}",
            retention::subtract_through_sql()
        ))
        .unwrap()
        .query_map([40], |row| row.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        plan.iter().any(|p| p.contains("INTEGER PRIMARY KEY")),
        "a range of seq, not a scan: {plan:?}"
    );
    assert!(
        !plan
            .iter()
            .any(|p| p.contains("SCAN") || p.contains("TEMP B-TREE")),
        "no scan of the backlog, no sort of the rows (payloads and all): {plan:?}"
    );
    // And the counts stay right.
    r.delete_through(40).unwrap();
    assert_eq!(r.stats().unwrap().backlog_records, 60);
    assert_eq!(r.stats().unwrap().backlog_bytes, 60 * 11);
}
