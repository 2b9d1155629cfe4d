//! Wills waiting for their delay (MQTT 5 Will Delay Interval), held in one
//! table, not in a task each (ARCHITECTURE.md I-34): at most one per client
//! id — a later disconnect replaces it, a reconnect drops it — and their
//! bytes bounded by `broker.max_pending_will_bytes`. A will that does not fit
//! is published at once (sooner than asked, counted) rather than lost. One
//! task publishes the wills that fall due. Pending wills are lost when the
//! daemon stops (their connections are gone; MQTT keeps no will across a
//! server restart).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::debug;

use super::events::{PENDING_WILL_BYTES, WILLS, WILLS_HURRIED};
use super::Shared;
use crate::ingest::codec::Will;
use crate::ingest::{Chunk, Item, Received, ITEM_OVERHEAD};

/// A will and when it is due.
#[derive(Debug)]
struct Pending {
    /// The session generation of the connection that left it.
    generation: u64,
    due: Instant,
    will: Will,
}

fn cost(will: &Will) -> usize {
    will.topic.len() + will.payload.len() + ITEM_OVERHEAD
}

/// Every will waiting for its delay.
pub struct Wills {
    pending: Mutex<(HashMap<String, Pending>, usize)>,
    changed: Notify,
    max_bytes: usize,
}

impl Wills {
    /// At most `max_bytes` of wills pending.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            pending: Mutex::new((HashMap::new(), 0)),
            changed: Notify::new(),
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, (HashMap<String, Pending>, usize)> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes pending.
    pub fn bytes(&self) -> usize {
        self.lock().1
    }

    /// Wills pending.
    pub fn len(&self) -> usize {
        self.lock().0.len()
    }

    /// None pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The client reconnected: its pending will is not published.
    pub fn cancel(&self, client_id: &str) {
        let mut g = self.lock();
        if let Some(p) = g.0.remove(client_id) {
            g.1 -= cost(&p.will);
            metrics::gauge!(PENDING_WILL_BYTES).set(g.1 as f64);
        }
    }

    /// Holds `will` until `due`, replacing the client's pending one. Gives
    /// it back when it does not fit in the budget: publish it now.
    pub fn defer(
        &self,
        client_id: &str,
        generation: u64,
        will: Will,
        due: Instant,
    ) -> Result<(), Will> {
        let mut g = self.lock();
        let (map, bytes) = &mut *g;
        let freed = map.get(client_id).map_or(0, |p| cost(&p.will));
        let after = *bytes - freed + cost(&will);
        if after > self.max_bytes {
            return Err(will);
        }
        map.insert(
            client_id.to_string(),
            Pending {
                generation,
                due,
                will,
            },
        );
        *bytes = after;
        metrics::gauge!(PENDING_WILL_BYTES).set(after as f64);
        drop(g);
        self.changed.notify_one();
        Ok(())
    }

    /// Removes and returns the wills due at `now`, with the generation of
    /// the connection that left each; and when the next one is due.
    fn take_due(&self, now: Instant) -> (Vec<(String, u64, Will)>, Option<Instant>) {
        let mut g = self.lock();
        let (map, bytes) = &mut *g;
        let due: Vec<String> = map
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::with_capacity(due.len());
        for k in due {
            if let Some(p) = map.remove(&k) {
                *bytes -= cost(&p.will);
                out.push((k, p.generation, p.will));
            }
        }
        metrics::gauge!(PENDING_WILL_BYTES).set(*bytes as f64);
        (out, map.values().map(|p| p.due).min())
    }
}

/// Queues a will for the pipeline.
pub(super) async fn publish(shared: &Shared, client_id: &str, will: Will) {
    metrics::counter!(WILLS).increment(1);
    debug!(client = %client_id, "Publishing the will message.");
    let mut chunk = Chunk::new(None, shared.limits.max_payload);
    chunk.push(Item {
        message: Some(Received {
            topic: will.topic.to_vec(),
            payload: will.payload.to_vec(),
            received_ms: crate::clock::ingest_ms(),
        }),
        ack: None,
    });
    let _ = shared.sink.send(chunk).await;
}

/// A connection ended and its will is to be published: now, or after its
/// delay (cut short by the session's expiry) unless the client comes back.
pub(super) async fn on_disconnect(
    shared: &Shared,
    client_id: &str,
    generation: u64,
    will: Will,
    expiry: u32,
) {
    let delay = will.delay_secs.min(expiry);
    if delay == 0 {
        return publish(shared, client_id, will).await;
    }
    let due = Instant::now() + std::time::Duration::from_secs(u64::from(delay));
    if let Err(will) = shared.wills.defer(client_id, generation, will, due) {
        metrics::counter!(WILLS_HURRIED).increment(1);
        tracing::warn!(client = %client_id, delay_secs = delay, budget = shared.wills.max_bytes, "Wills waiting for their delay fill broker.max_pending_will_bytes: publishing this one now.");
        publish(shared, client_id, will).await;
    }
}

/// Publishes wills as they fall due, unless their client came back (a newer
/// session generation) meanwhile.
pub(super) async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (due, next) = shared.wills.take_due(Instant::now());
        for (client_id, generation, will) in due {
            let now = shared.sessions.generation(&client_id);
            if now.is_some_and(|g| g != generation) {
                continue; // reconnected: no will
            }
            publish(&shared, &client_id, will).await;
        }
        let changed = shared.wills.changed.notified();
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = changed => {}
            _ = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;

    fn will(payload: &str) -> Will {
        Will {
            topic: Bytes::from_static(b"wills/c"),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos: 1,
            delay_secs: 30,
        }
    }

    /// I-34: one pending will per client id, replaced, counted, bounded.
    #[test]
    fn one_will_per_client_replaced_and_bounded() {
        let w = Wills::new(3 * cost(&will("xx")));
        let t = Instant::now() + Duration::from_secs(30);
        w.defer("c1", 1, will("a1"), t).unwrap();
        w.defer("c1", 2, will("a2"), t).unwrap();
        assert_eq!(w.len(), 1, "replaced, not duplicated");
        assert_eq!(w.bytes(), cost(&will("a2")));
        w.defer("c2", 1, will("b1"), t).unwrap();
        w.defer("c3", 1, will("c1"), t).unwrap();
        let refused = w.defer("c4", 1, will("d1"), t).unwrap_err();
        assert_eq!(&refused.payload[..], b"d1", "over budget: given back");
        w.cancel("c1");
        assert_eq!(w.len(), 2);
        w.defer("c4", 1, will("d1"), t).unwrap();
        assert_eq!(w.bytes(), 3 * cost(&will("xx")));
    }

    #[test]
    fn due_wills_come_out_once_in_time() {
        let w = Wills::new(1 << 20);
        let now = Instant::now();
        w.defer("late", 1, will("l"), now + Duration::from_secs(60))
            .unwrap();
        w.defer("soon", 1, will("s"), now + Duration::from_secs(1))
            .unwrap();
        let (due, next) = w.take_due(now);
        assert!(due.is_empty());
        assert_eq!(next, Some(now + Duration::from_secs(1)));
        let (due, next) = w.take_due(now + Duration::from_secs(2));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, "soon");
        assert_eq!(next, Some(now + Duration::from_secs(60)));
        assert_eq!(w.bytes(), cost(&will("l")));
    }
}
