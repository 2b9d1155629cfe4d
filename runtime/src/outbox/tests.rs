//! The outbox against a simple in-memory model, driven by proptest through
//! random append / read / ack / cursor / reopen sequences.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<(u8, Vec<u8>)>),
    Read {
        max_records: usize,
        max_bytes: usize,
    },
    AckSome(u8),
    Cursor(u16),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((0u8..4, prop::collection::vec(any::<u8>(), 0..40)), 0..20).prop_map(Op::Append),
        2 => (1usize..30, 1usize..400).prop_map(|(r, b)| Op::Read { max_records: r, max_bytes: b }),
        2 => any::<u8>().prop_map(Op::AckSome),
        1 => (0u16..300).prop_map(Op::Cursor),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default)]
struct Model {
    rows: BTreeMap<u64, Message>,
    next_seq: u64,
}

fn msg(stream: u8, payload: Vec<u8>) -> Message {
    Message {
        stream: format!("s/{stream}"),
        timestamp_ms: 1000 + stream as u64,
        payload,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// outbox invariants: sequence numbers only grow (also across a cursor
    /// from the aggregator and across restarts); reads are ascending and
    /// complete; a delete removes exactly what is at or below the ack.
    #[test]
    fn outbox_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        let mut w = Outbox::open(&path, SyncMode::Normal).unwrap();
        let mut r = OutboxReader::open(&path, SyncMode::Normal).unwrap();
        let mut model = Model { next_seq: 1, ..Model::default() };
        for op in ops {
            match op {
                Op::Append(items) => {
                    let commit = Commit {
                        records: items.into_iter().map(|(s, p)| msg(s, p)).collect(),
                        ..Commit::default()
                    };
                    let done = w.commit(&commit).unwrap();
                    if !commit.records.is_empty() {
                        prop_assert_eq!(done.first_seq, model.next_seq);
                    }
                    for m in commit.records {
                        model.rows.insert(model.next_seq, m);
                        model.next_seq += 1;
                    }
                }
                Op::Read { max_records, max_bytes } => {
                    let after = model.rows.keys().next().copied().unwrap_or(1) - 1;
                    let got = r.read_after(after, max_records, max_bytes).unwrap();
                    let mut bytes = 0;
                    let mut expected = Vec::new();
                    for (seq, m) in &model.rows {
                        if expected.len() == max_records || (bytes >= max_bytes) {
                            break;
                        }
                        bytes += m.payload.len();
                        expected.push((*seq, m.clone()));
                    }
                    prop_assert_eq!(got.len(), expected.len());
                    for (g, (seq, m)) in got.iter().zip(expected) {
                        prop_assert_eq!(g.seq, seq);
                        prop_assert_eq!(&g.stream, &m.stream);
                        prop_assert_eq!(&g.payload, &m.payload);
                        prop_assert_eq!(g.timestamp_ms, m.timestamp_ms);
                    }
                }
                Op::AckSome(k) => {
                    let keys: Vec<u64> = model.rows.keys().copied().collect();
                    if let Some(&through) = keys.get(k as usize % (keys.len() + 1)) {
                        let n = r.delete_through(through).unwrap();
                        let before = model.rows.len();
                        model.rows.retain(|s, _| *s > through);
                        prop_assert_eq!(n, before - model.rows.len());
                    }
                }
                Op::Cursor(c) => {
                    let c = c as u64;
                    r.accept_cursor(c).unwrap();
                    model.rows.retain(|s, _| *s > c);
                    model.next_seq = model.next_seq.max(c + 1);
                }
                Op::Reopen => {
                    drop(w);
                    drop(r);
                    w = Outbox::open(&path, SyncMode::Normal).unwrap();
                    r = OutboxReader::open(&path, SyncMode::Normal).unwrap();
                }
            }
            let stats = r.stats().unwrap();
            prop_assert_eq!(stats.backlog_records, model.rows.len() as u64);
            prop_assert_eq!(stats.next_seq, model.next_seq);
        }
    }
}

#[test]
fn delivery_marks_and_dead_letters_commit_with_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut w = Outbox::open(&path, SyncMode::Full).unwrap();
    let commit = Commit {
        records: vec![msg(1, b"{}".to_vec())],
        dead_letters: vec![DeadLetter {
            pipeline: "p".into(),
            function: "f".into(),
            error: "bad".into(),
            message: msg(2, b"x".to_vec()),
            payload_size: 1,
        }],
        delivered: vec![
            DeliveryMark {
                pkid: 7,
                digest: u64::MAX,
            },
            DeliveryMark { pkid: 7, digest: 3 },
        ],
    };
    w.commit(&commit).unwrap();
    drop(w);
    let w = Outbox::open(&path, SyncMode::Full).unwrap();
    assert_eq!(
        w.delivery_marks().unwrap(),
        vec![DeliveryMark { pkid: 7, digest: 3 }]
    );
    let stats = read_stats(&path).unwrap();
    assert_eq!(stats.backlog_records, 1);
    assert_eq!(stats.dead_letters, 1);
    assert_eq!(stats.backlog_bytes, 2);
}

#[test]
fn a_wiped_outbox_numbers_above_the_aggregator_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut w = Outbox::open(&path, SyncMode::Normal).unwrap();
    let r = OutboxReader::open(&path, SyncMode::Normal).unwrap();
    r.accept_cursor(500).unwrap();
    let done = w
        .commit(&Commit {
            records: vec![msg(0, vec![1])],
            ..Commit::default()
        })
        .unwrap();
    assert_eq!(done.first_seq, 501);
}
