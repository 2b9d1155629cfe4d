//! Persistent MQTT sessions in the outbox: each sender's session metadata
//! and its redelivery state ([`Op`]s), committed in the same transaction as
//! the outputs of the PUBLISHes that changed it.
//!
//! The outbox stores opaque rows (a metadata blob per session, a log of
//! blobs per session); this module gives them meaning. The pipeline worker
//! keeps a [`Replica`] of every session's durable state so it can compact a
//! session's log into one snapshot row without asking the connection that
//! owns the session.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::redelivery::{Op, Shape};
use crate::outbox::{SessionWrite, StoredSession};

/// A session's log is compacted into one snapshot after this many rows.
const COMPACT_AFTER_ROWS: u32 = 32;

/// What is kept about a session besides its redelivery state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    /// Identity that owns the client id (user name or certificate CN);
    /// `None`: anonymous.
    pub owner: Option<String>,
    /// Session expiry after disconnect, seconds (`u32::MAX`: never).
    pub expiry_secs: u32,
    /// Protocol level of the last connection (4 or 5).
    pub protocol: u8,
    /// When the last connection ended (ms since epoch); `None` while connected.
    pub disconnected_ms: Option<u64>,
    /// Topic filters subscribed (external broker session only).
    pub subscriptions: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
enum LogEntry {
    Ops(Vec<Op>),
    Snapshot {
        marks: Vec<(u16, u64)>,
        received: Vec<(u16, u64)>,
        shape: Shape,
    },
}

/// Changes to one session, carried by a chunk of ingest to the pipeline and
/// committed with it.
#[derive(Debug, Clone, Default)]
pub struct SessionUpdate {
    /// The session (`c:<client id>` on the endpoint, `b:<broker>/<client id>`
    /// for the external broker).
    pub key: Arc<str>,
    /// Forget everything stored first (clean start, expiry).
    pub discard: bool,
    /// New metadata.
    pub meta: Option<SessionMeta>,
    /// Redelivery state changes, in order.
    pub ops: Vec<Op>,
}

impl SessionUpdate {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        !self.discard && self.meta.is_none() && self.ops.is_empty()
    }
}

/// A session as read back from the outbox at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoredSession {
    /// Its key.
    pub key: String,
    /// Its metadata, if any was stored.
    pub meta: Option<SessionMeta>,
    /// QoS 1 marks, oldest first.
    pub marks: Vec<(u16, u64)>,
    /// QoS 2 packet ids awaiting PUBREL.
    pub received: Vec<(u16, u64)>,
    /// What was proven about the sender.
    pub shape: Shape,
}

#[derive(Debug, Default)]
struct State {
    marks: BTreeMap<u64, (u16, u64)>,
    by_pkid: HashMap<u16, u64>,
    next: u64,
    received: HashMap<u16, u64>,
    shape: Shape,
    rows: u32,
}

impl State {
    fn apply(&mut self, op: Op) {
        match op {
            Op::Mark(p, d) => {
                if let Some(old) = self.by_pkid.insert(p, self.next) {
                    self.marks.remove(&old);
                }
                self.marks.insert(self.next, (p, d));
                self.next += 1;
            }
            Op::Unmark(p) => {
                if let Some(old) = self.by_pkid.remove(&p) {
                    self.marks.remove(&old);
                }
            }
            Op::Received(p, d) => {
                self.received.insert(p, d);
            }
            Op::Released(p) => {
                self.received.remove(&p);
            }
            Op::Shape(sh) => self.shape = sh,
        }
    }

    fn snapshot(&self) -> LogEntry {
        let mut received: Vec<(u16, u64)> = self.received.iter().map(|(p, d)| (*p, *d)).collect();
        received.sort_unstable();
        LogEntry::Snapshot {
            marks: self.marks.values().copied().collect(),
            received,
            shape: self.shape,
        }
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // postcard cannot fail on these plain types.
    postcard::to_allocvec(v).unwrap_or_default()
}

/// The worker's copy of every persistent session's durable state.
#[derive(Debug, Default)]
pub struct Replica {
    sessions: HashMap<Arc<str>, State>,
}

impl Replica {
    /// Turns one update into outbox writes (appending to the session's
    /// log, compacting it when long).
    pub fn apply(&mut self, update: SessionUpdate, out: &mut Vec<SessionWrite>) {
        let key = update.key.to_string();
        if update.discard {
            self.sessions.remove(&update.key);
            out.push(SessionWrite::Delete { key: key.clone() });
        }
        if let Some(meta) = &update.meta {
            out.push(SessionWrite::Meta {
                key: key.clone(),
                meta: encode(meta),
            });
        }
        if update.ops.is_empty() {
            return;
        }
        let state = self.sessions.entry(update.key.clone()).or_default();
        for op in &update.ops {
            state.apply(*op);
        }
        state.rows += 1;
        if state.rows > COMPACT_AFTER_ROWS {
            state.rows = 1;
            out.push(SessionWrite::Replace {
                key,
                entry: encode(&state.snapshot()),
            });
        } else {
            out.push(SessionWrite::Append {
                key,
                entry: encode(&LogEntry::Ops(update.ops)),
            });
        }
    }

    /// Rebuilds the replica from what the outbox holds and returns each
    /// session's state. A row that does not decode (a corrupt file) is
    /// skipped with an error log: the session loses that part of its
    /// redelivery state, the daemon keeps running.
    pub fn load(stored: Vec<StoredSession>) -> (Self, Vec<RestoredSession>) {
        let mut replica = Self::default();
        let mut restored = Vec::with_capacity(stored.len());
        for s in stored {
            let meta = s.meta.as_deref().and_then(|m| {
                postcard::from_bytes::<SessionMeta>(m)
                    .map_err(|e| {
                        tracing::error!(session = %s.key, error = %e, "Stored MQTT session metadata is unreadable; ignoring it.");
                    })
                    .ok()
            });
            let mut state = State::default();
            for entry in &s.entries {
                match postcard::from_bytes::<LogEntry>(entry) {
                    Ok(LogEntry::Ops(ops)) => ops.into_iter().for_each(|op| state.apply(op)),
                    Ok(LogEntry::Snapshot {
                        marks,
                        received,
                        shape,
                    }) => {
                        state = State::default();
                        for (p, d) in marks {
                            state.apply(Op::Mark(p, d));
                        }
                        state.received.extend(received);
                        state.shape = shape;
                    }
                    Err(e) => {
                        tracing::error!(session = %s.key, error = %e, "A stored MQTT session entry is unreadable; skipping it (redeliveries of its messages may be processed twice).");
                    }
                }
                state.rows += 1;
            }
            if let LogEntry::Snapshot {
                marks,
                received,
                shape,
            } = state.snapshot()
            {
                restored.push(RestoredSession {
                    key: s.key.clone(),
                    meta,
                    marks,
                    received,
                    shape,
                });
            }
            replica.sessions.insert(Arc::from(s.key.as_str()), state);
        }
        (replica, restored)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn stored(writes: &[SessionWrite]) -> Vec<StoredSession> {
        // A tiny model of what the outbox does with the writes.
        let mut map: BTreeMap<String, StoredSession> = BTreeMap::new();
        for w in writes {
            match w {
                SessionWrite::Meta { key, meta } => {
                    map.entry(key.clone())
                        .or_insert_with(|| StoredSession {
                            key: key.clone(),
                            ..StoredSession::default()
                        })
                        .meta = Some(meta.clone());
                }
                SessionWrite::Append { key, entry } => map
                    .entry(key.clone())
                    .or_insert_with(|| StoredSession {
                        key: key.clone(),
                        ..StoredSession::default()
                    })
                    .entries
                    .push(entry.clone()),
                SessionWrite::Replace { key, entry } => {
                    let s = map.entry(key.clone()).or_insert_with(|| StoredSession {
                        key: key.clone(),
                        ..StoredSession::default()
                    });
                    s.entries = vec![entry.clone()];
                }
                SessionWrite::Delete { key } => {
                    map.remove(key);
                }
            }
        }
        map.into_values().collect()
    }

    #[test]
    fn a_long_log_compacts_and_restores_in_order() {
        let mut r = Replica::default();
        let mut writes = Vec::new();
        let key: Arc<str> = Arc::from("c:s1");
        r.apply(
            SessionUpdate {
                key: key.clone(),
                meta: Some(SessionMeta {
                    owner: Some("u".into()),
                    expiry_secs: 60,
                    protocol: 5,
                    ..SessionMeta::default()
                }),
                ..SessionUpdate::default()
            },
            &mut writes,
        );
        for i in 0..100u16 {
            r.apply(
                SessionUpdate {
                    key: key.clone(),
                    ops: vec![Op::Mark(i % 40 + 1, u64::from(i)), Op::Received(500 + i, 1)],
                    ..SessionUpdate::default()
                },
                &mut writes,
            );
            if i % 3 == 0 {
                r.apply(
                    SessionUpdate {
                        key: key.clone(),
                        ops: vec![Op::Released(500 + i)],
                        ..SessionUpdate::default()
                    },
                    &mut writes,
                );
            }
        }
        assert!(writes
            .iter()
            .any(|w| matches!(w, SessionWrite::Replace { .. })));
        let (_, restored) = Replica::load(stored(&writes));
        assert_eq!(restored.len(), 1);
        let s = &restored[0];
        assert_eq!(s.meta.as_ref().unwrap().owner.as_deref(), Some("u"));
        // The last 40 marks, oldest first.
        let want: Vec<(u16, u64)> = (60..100u16).map(|i| (i % 40 + 1, u64::from(i))).collect();
        assert_eq!(s.marks, want);
        assert_eq!(s.received.len(), 100 - 34);
    }

    #[test]
    fn discard_forgets_and_corrupt_rows_are_skipped() {
        let mut r = Replica::default();
        let mut writes = Vec::new();
        let key: Arc<str> = Arc::from("c:s1");
        r.apply(
            SessionUpdate {
                key: key.clone(),
                ops: vec![Op::Mark(1, 1)],
                ..SessionUpdate::default()
            },
            &mut writes,
        );
        r.apply(
            SessionUpdate {
                key: key.clone(),
                discard: true,
                ops: vec![Op::Mark(2, 2)],
                ..SessionUpdate::default()
            },
            &mut writes,
        );
        let mut s = stored(&writes);
        s[0].entries.push(vec![0xff, 0xff, 0xff]);
        let (_, restored) = Replica::load(s);
        assert_eq!(restored[0].marks, vec![(2, 2)]);
    }
}
