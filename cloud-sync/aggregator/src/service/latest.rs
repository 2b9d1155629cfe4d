//! The newest record of each stream, for the nodes this aggregator holds
//! the lease of, kept in the apply path (write-through) so that
//! `/api/v1/latest` answers without the store's per-stream scan.
//!
//! Never a stale answer (I-38):
//! - an entry exists only while a session of this aggregator holds the
//!   node's lease ([`LatestCache::hold`] after the take, [`LatestCache::release`]
//!   at the end); it answers only once filled from the store *after* the
//!   take (everything earlier holders applied is final by then) and merged
//!   with what this session applied since (newest seq wins, in any order);
//! - before answering, the caller checks in the store that the lease token
//!   is still the entry's (a primary-key lookup): a node another aggregator
//!   took over is read from the store.
//!
//! Bounded: at most `budget` payload-and-name bytes over all nodes, at most
//! [`MAX_LATEST_STREAMS`] streams and [`MAX_CACHED_RECORD`] bytes per
//! record; a node that does not fit is read from the store for the rest of
//! its session.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::store::{Lease, StoredRecord, MAX_LATEST_STREAMS};

/// The largest record kept: bigger ones leave their node uncached.
pub const MAX_CACHED_RECORD: usize = 64 * 1024;

/// Per-entry bookkeeping beyond the payload and names.
const ENTRY_OVERHEAD: usize = 96;

/// See the module docs.
#[derive(Debug)]
pub struct LatestCache {
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    nodes: HashMap<String, Entry>,
    bytes: usize,
}

#[derive(Debug)]
struct Entry {
    token: u64,
    streams: HashMap<String, StoredRecord>,
    bytes: usize,
    /// Merged with a store read made after the lease was taken.
    filled: bool,
    /// Did not fit: answered by the store until the session ends.
    overflow: bool,
}

/// What [`LatestCache::get`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The answer, valid if the node's lease token is still `token`.
    Hit {
        /// The lease the entry belongs to.
        token: u64,
        /// Matching streams' newest records, by stream name.
        records: Vec<StoredRecord>,
    },
    /// Held here but not filled yet: fill it with a store read under `token`.
    Unfilled {
        /// The lease the entry belongs to.
        token: u64,
    },
    /// Not held here, or does not fit: read the store.
    Uncached,
}

fn cost(r: &StoredRecord) -> usize {
    r.payload.len() + r.stream.len() * 2 + ENTRY_OVERHEAD
}

impl LatestCache {
    /// A cache of at most `budget` bytes (0: off).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map stays consistent at every step: a panicking holder
        // leaves nothing half-done.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A session took `lease`: start an (unfilled) entry.
    pub fn hold(&self, lease: &Lease) {
        if self.budget == 0 {
            return;
        }
        let mut inner = self.lock();
        let old = inner.nodes.insert(
            lease.node.clone(),
            Entry {
                token: lease.token,
                streams: HashMap::new(),
                bytes: 0,
                filled: false,
                overflow: false,
            },
        );
        if let Some(old) = old {
            inner.bytes -= old.bytes;
        }
        self.gauge(&inner);
    }

    /// The session holding `lease` ended.
    pub fn release(&self, lease: &Lease) {
        let mut inner = self.lock();
        if inner
            .nodes
            .get(&lease.node)
            .is_some_and(|e| e.token == lease.token)
        {
            if let Some(old) = inner.nodes.remove(&lease.node) {
                inner.bytes -= old.bytes;
            }
            self.gauge(&inner);
        }
    }

    /// Records this session applied under `lease` (committed).
    pub fn applied(&self, lease: &Lease, records: Vec<StoredRecord>) {
        self.merge(&lease.node, lease.token, records, None);
    }

    /// A store read under `token`, made after the lease was taken, of every
    /// stream (`complete`: fewer than the most a read answers).
    pub fn fill(&self, node: &str, token: u64, records: Vec<StoredRecord>, complete: bool) {
        self.merge(node, token, records, Some(complete));
    }

    fn merge(&self, node: &str, token: u64, records: Vec<StoredRecord>, fill: Option<bool>) {
        let mut inner = self.lock();
        let Inner { nodes, bytes } = &mut *inner;
        let Some(e) = nodes.get_mut(node).filter(|e| e.token == token) else {
            return;
        };
        if e.overflow {
            return;
        }
        let mut fits = fill != Some(false);
        for r in records {
            if !fits {
                break;
            }
            if r.payload.len() > MAX_CACHED_RECORD {
                fits = false;
                break;
            }
            let full = e.streams.len() >= MAX_LATEST_STREAMS;
            match e.streams.get_mut(&r.stream) {
                Some(old) if old.seq >= r.seq => {}
                Some(old) => {
                    let grow = cost(&r);
                    let shrink = cost(old);
                    if *bytes + grow > self.budget + shrink {
                        fits = false;
                    } else {
                        *bytes = *bytes + grow - shrink;
                        e.bytes = e.bytes + grow - shrink;
                        *old = r;
                    }
                }
                None if full => fits = false,
                None => {
                    let grow = cost(&r);
                    if *bytes + grow > self.budget {
                        fits = false;
                    } else {
                        *bytes += grow;
                        e.bytes += grow;
                        e.streams.insert(r.stream.clone(), r);
                    }
                }
            }
        }
        if fits {
            if fill.is_some() {
                e.filled = true;
            }
        } else {
            *bytes -= e.bytes;
            e.bytes = 0;
            e.streams = HashMap::new();
            e.overflow = true;
            e.filled = false;
            metrics::counter!(super::events::LATEST_CACHE_OVERFLOWS_TOTAL).increment(1);
        }
        self.gauge(&inner);
    }

    /// What the cache holds for `node`'s streams matching `filter`.
    pub fn get(&self, node: &str, filter: Option<&str>) -> Lookup {
        let inner = self.lock();
        match inner.nodes.get(node) {
            Some(e) if e.overflow => Lookup::Uncached,
            Some(e) if !e.filled => Lookup::Unfilled { token: e.token },
            Some(e) => {
                let mut records: Vec<StoredRecord> = e
                    .streams
                    .values()
                    .filter(|r| {
                        filter.is_none_or(|f| fogline_protocol::topic::matches(f, &r.stream))
                    })
                    .cloned()
                    .collect();
                records.sort_by(|a, b| a.stream.cmp(&b.stream));
                Lookup::Hit {
                    token: e.token,
                    records,
                }
            }
            None => Lookup::Uncached,
        }
    }

    fn gauge(&self, inner: &Inner) {
        metrics::gauge!(super::events::LATEST_CACHE_BYTES).set(inner.bytes as f64);
    }
}

/// The newest record of each stream among `batches` (what an apply wrote
/// or already held: either way the store has it).
pub fn newest_per_stream(
    node: &str,
    batches: &[fogline_protocol::batch::DecodedBatch],
    received_ms: u64,
) -> Vec<StoredRecord> {
    let mut newest: HashMap<&str, fogline_protocol::batch::RecordRef<'_>> = HashMap::new();
    for r in batches.iter().flat_map(|b| b.iter()) {
        match newest.get(r.stream) {
            Some(old) if old.seq >= r.seq => {}
            _ => {
                newest.insert(r.stream, r);
            }
        }
    }
    newest
        .into_values()
        .map(|r| StoredRecord {
            node: node.to_string(),
            seq: r.seq,
            stream: r.stream.to_string(),
            timestamp_ms: r.timestamp_ms,
            payload: r.payload.to_vec(),
            received_ms,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(stream: &str, seq: u64, payload: &str) -> StoredRecord {
        StoredRecord {
            node: "gw".into(),
            seq,
            stream: stream.into(),
            timestamp_ms: seq * 10,
            payload: payload.as_bytes().to_vec(),
            received_ms: 0,
        }
    }

    fn lease(token: u64) -> Lease {
        Lease {
            node: "gw".into(),
            token,
        }
    }

    fn hit(c: &LatestCache, filter: Option<&str>) -> Vec<(String, u64)> {
        match c.get("gw", filter) {
            Lookup::Hit { records, .. } => records.into_iter().map(|r| (r.stream, r.seq)).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn answers_only_once_filled_and_the_newest_seq_wins_in_any_order() {
        let c = LatestCache::new(1 << 20);
        assert_eq!(c.get("gw", None), Lookup::Uncached, "not held");
        c.hold(&lease(3));
        // Applied before the fill's store read came back: not an answer yet.
        c.applied(&lease(3), vec![rec("a/1", 12, "x")]);
        assert_eq!(c.get("gw", None), Lookup::Unfilled { token: 3 });
        // The fill read began before that apply committed: older for a/1.
        c.fill("gw", 3, vec![rec("a/1", 9, "o"), rec("b/2", 7, "y")], true);
        assert_eq!(hit(&c, None), vec![("a/1".into(), 12), ("b/2".into(), 7)]);
        assert_eq!(hit(&c, Some("a/+")), vec![("a/1".into(), 12)]);
        c.applied(&lease(3), vec![rec("b/2", 20, "z")]);
        assert_eq!(
            hit(&c, Some("#")),
            vec![("a/1".into(), 12), ("b/2".into(), 20)]
        );
    }

    #[test]
    fn another_lease_or_the_end_of_the_session_leaves_nothing_to_answer_from() {
        let c = LatestCache::new(1 << 20);
        c.hold(&lease(3));
        c.fill("gw", 3, vec![rec("a", 1, "x")], true);
        // A fill or apply of an older lease is ignored.
        c.hold(&lease(4));
        c.fill("gw", 3, vec![rec("a", 1, "x")], true);
        c.applied(&lease(3), vec![rec("a", 2, "x")]);
        assert_eq!(c.get("gw", None), Lookup::Unfilled { token: 4 });
        // The old session's end does not drop the new one's entry.
        c.release(&lease(3));
        assert_eq!(c.get("gw", None), Lookup::Unfilled { token: 4 });
        c.release(&lease(4));
        assert_eq!(c.get("gw", None), Lookup::Uncached);
    }

    #[test]
    fn what_does_not_fit_is_read_from_the_store_and_the_bytes_stay_bounded() {
        let c = LatestCache::new(1000);
        c.hold(&lease(1));
        c.fill("gw", 1, vec![rec("a", 1, "x")], true);
        assert!(matches!(c.get("gw", None), Lookup::Hit { .. }));
        c.applied(&lease(1), vec![rec("b", 2, &"y".repeat(2000))]);
        assert_eq!(c.get("gw", None), Lookup::Uncached);
        assert_eq!(c.lock().bytes, 0);
        // A fill that may be truncated does not make an entry answer.
        let c = LatestCache::new(1 << 20);
        c.hold(&lease(1));
        c.fill("gw", 1, vec![rec("a", 1, "x")], false);
        assert_eq!(c.get("gw", None), Lookup::Uncached);
        // Off.
        let c = LatestCache::new(0);
        c.hold(&lease(1));
        assert_eq!(c.get("gw", None), Lookup::Uncached);
    }
}
