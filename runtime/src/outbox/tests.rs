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
fn session_changes_and_dead_letters_commit_with_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut w = Outbox::open(&path, SyncMode::Full).unwrap();
    let commit = Commit {
        records: vec![msg(1, b"{}".to_vec())],
        dead_letters: vec![DeadLetter {
            pipeline: "p".into(),
            function: "f".into(),
            reason: "rejected".into(),
            stage: Stage::Input,
            error: "bad".into(),
            message: msg(2, b"x".to_vec()),
            payload_size: 1,
        }],
        sessions: vec![
            SessionWrite::Meta {
                key: "c:a".into(),
                meta: vec![1],
            },
            SessionWrite::Append {
                key: "c:a".into(),
                entry: vec![2],
            },
            SessionWrite::Append {
                key: "c:a".into(),
                entry: vec![3],
            },
            SessionWrite::Append {
                key: "c:b".into(),
                entry: vec![9],
            },
            SessionWrite::Replace {
                key: "c:b".into(),
                entry: vec![4],
            },
        ],
        ..Commit::default()
    };
    w.commit(&commit).unwrap();
    w.commit(&Commit {
        sessions: vec![SessionWrite::Delete { key: "c:x".into() }],
        ..Commit::default()
    })
    .unwrap();
    drop(w);
    let w = Outbox::open(&path, SyncMode::Full).unwrap();
    assert_eq!(
        w.load_sessions().unwrap(),
        vec![
            StoredSession {
                key: "c:a".into(),
                meta: Some(vec![1]),
                entries: vec![vec![2], vec![3]],
            },
            StoredSession {
                key: "c:b".into(),
                meta: None,
                entries: vec![vec![4]],
            },
        ]
    );
    let stats = read_stats(&path).unwrap();
    assert_eq!(stats.backlog_records, 1);
    assert_eq!(stats.dead_letters, 1);
    assert_eq!(stats.backlog_bytes, 5, "payload and stream-name bytes");
}

#[test]
fn renumbering_moves_every_record_above_a_foreign_cursor_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut w = Outbox::open(&path, SyncMode::Normal).unwrap();
    let r = OutboxReader::open(&path, SyncMode::Normal).unwrap();
    let before = r.identity().unwrap();
    assert_ne!(before.incarnation, 0);
    w.commit(&Commit {
        records: (0..50).map(|i| msg(i % 3, vec![i])).collect(),
        ..Commit::default()
    })
    .unwrap();
    // The aggregator holds 100 records of an older outbox of this node.
    assert_eq!(r.renumber_above(100, 100).unwrap(), (50, 100));
    let got = r.read_after(0, 1000, usize::MAX).unwrap();
    assert_eq!(got.len(), 50, "nothing deleted");
    assert_eq!(got.first().unwrap().seq, 101);
    assert_eq!(got.last().unwrap().seq, 150);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, rec)| rec.payload == vec![i as u8]));
    let id = r.identity().unwrap();
    assert_eq!(
        (id.next_seq, id.acked_seq, id.incarnation),
        (151, 100, before.incarnation)
    );
    // Already above: nothing moves.
    assert_eq!(r.renumber_above(100, 100).unwrap(), (0, 0));
    let done = w
        .commit(&Commit {
            records: vec![msg(0, vec![7])],
            ..Commit::default()
        })
        .unwrap();
    assert_eq!(done.first_seq, 151);
    assert_ne!(r.rotate_incarnation().unwrap(), before.incarnation);
    r.raise_alarm("cursor_ahead", "x").unwrap();
    assert_eq!(read_stats(&path).unwrap().alarms[0].kind, "cursor_ahead");
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

/// Held inputs of a function the config dropped become dead letters
/// (listable, replayable); those of running functions stay held.
#[test]
fn held_inputs_of_a_removed_function_become_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let mut w = Outbox::open(&path, SyncMode::Full).unwrap();
    let held = |owner: &str, payload: &[u8]| Held {
        owner: owner.into(),
        step: 0,
        message: msg(1, payload.to_vec()),
    };
    w.commit(&Commit {
        held: vec![
            held("p/gone", b"a"),
            held("p/kept", b"b"),
            held("p/gone", b"c"),
        ],
        ..Commit::default()
    })
    .unwrap();
    assert_eq!(w.orphan_held(&["p/kept".to_string()]).unwrap(), 2);
    let counts = w.held_counts().unwrap();
    assert_eq!(counts.keys().collect::<Vec<_>>(), vec!["p/kept"]);
    let dead = list_dead_letters(
        &path,
        &DeadLetterFilter {
            reason: Some("orphaned".into()),
            limit: 10,
            ..DeadLetterFilter::default()
        },
    )
    .unwrap();
    assert_eq!(dead.len(), 2);
    assert!(dead
        .iter()
        .all(|d| d.pipeline == "p" && d.function == "gone" && d.is_complete()));
    assert_eq!(
        dead.iter().map(|d| d.payload.clone()).collect::<Vec<_>>(),
        vec![b"c".to_vec(), b"a".to_vec()],
        "newest first"
    );
}
