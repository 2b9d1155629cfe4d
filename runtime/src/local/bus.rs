//! [`LocalBus`]: who is subscribed to what, and handing outputs to them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::events;
use crate::ingest::topic::matches;

/// Deliveries a subscriber may have queued; beyond, it loses them (counted).
pub const SUBSCRIBER_QUEUE: usize = 4096;
/// Deliveries encoded before the connection's buffer is written.
const DELIVERIES_PER_WRITE: usize = 256;

/// One output for one subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Its topic (the output's stream).
    pub topic: Arc<str>,
    /// Its payload.
    pub payload: Bytes,
}

struct Subscriber {
    id: u64,
    filters: Mutex<Vec<String>>,
    tx: mpsc::Sender<Delivery>,
}

/// Subscribers of the endpoint, by their filters.
#[derive(Default)]
pub struct LocalBus {
    subscribers: RwLock<Vec<Arc<Subscriber>>>,
    next_id: AtomicU64,
    /// Durable subscribers (`local = "durable"`).
    pub durable: Arc<super::DurableHub>,
}

impl std::fmt::Debug for LocalBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.subscribers.read().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("LocalBus").field("subscribers", &n).finish()
    }
}

/// A connection's subscriptions; dropping it unsubscribes.
pub struct Subscription {
    bus: Arc<LocalBus>,
    me: Arc<Subscriber>,
    /// What was delivered to it.
    pub rx: mpsc::Receiver<Delivery>,
}

impl Subscription {
    /// Adds a filter (again: no change).
    pub fn add(&self, filter: &str) {
        if let Ok(mut f) = self.me.filters.lock() {
            if !f.iter().any(|x| x == filter) {
                f.push(filter.to_string());
            }
        }
    }

    /// Encodes `first` and what else is queued (up to a bound: the buffer
    /// is written before more is taken) as QoS 0 PUBLISH packets: at most
    /// once (I-39). One above the peer's MQTT 5 Maximum Packet Size is
    /// dropped, counted (it was counted delivered when queued).
    pub fn write_queued(
        &mut self,
        first: Delivery,
        buf: &mut bytes::BytesMut,
        version: fogline_mqtt::Version,
        max_packet: Option<u32>,
    ) {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(d) = next {
            taken += 1;
            let mark = buf.len();
            let encoded = fogline_mqtt::encode_publish(
                buf,
                version,
                d.topic.as_bytes(),
                d.payload,
                0,
                0,
                false,
                false,
            );
            if encoded.is_err() || max_packet.is_some_and(|m| buf.len() - mark > m as usize) {
                buf.truncate(mark);
                metrics::counter!(events::DROPPED_TOTAL, "reason" => "too_large").increment(1);
            }
            next = if taken < DELIVERIES_PER_WRITE {
                self.rx.try_recv().ok()
            } else {
                None
            };
        }
    }

    /// Removes a filter; whether it was there.
    pub fn remove(&self, filter: &str) -> bool {
        self.me.filters.lock().is_ok_and(|mut f| {
            let before = f.len();
            f.retain(|x| x != filter);
            f.len() != before
        })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Ok(mut s) = self.bus.subscribers.write() {
            s.retain(|x| x.id != self.me.id);
            metrics::gauge!(events::SUBSCRIBERS).set(s.len() as f64);
        }
    }
}

impl LocalBus {
    /// An empty bus.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A subscriber with no filters yet and a queue of `capacity`.
    pub fn subscribe(self: &Arc<Self>, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let me = Arc::new(Subscriber {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            filters: Mutex::new(Vec::new()),
            tx,
        });
        if let Ok(mut s) = self.subscribers.write() {
            s.push(me.clone());
            metrics::gauge!(events::SUBSCRIBERS).set(s.len() as f64);
        }
        Subscription {
            bus: self.clone(),
            me,
            rx,
        }
    }

    /// Whether anybody is subscribed (a pipeline skips the work when not).
    pub fn is_idle(&self) -> bool {
        self.subscribers.read().map_or(true, |s| s.is_empty())
    }

    /// Hands `payload` on `topic` to every subscriber with a matching
    /// filter, once each, without waiting: a full queue loses it (counted).
    /// Returns how many subscribers got it.
    pub fn publish(&self, topic: &str, payload: &[u8]) -> usize {
        let Ok(subs) = self.subscribers.read() else {
            return 0;
        };
        let mut made: Option<Delivery> = None;
        let (mut delivered, mut dropped) = (0u64, 0u64);
        for s in subs.iter() {
            let wanted = s
                .filters
                .lock()
                .is_ok_and(|f| f.iter().any(|f| matches(f, topic)));
            if !wanted {
                continue;
            }
            let d = made
                .get_or_insert_with(|| Delivery {
                    topic: Arc::from(topic),
                    payload: Bytes::copy_from_slice(payload),
                })
                .clone();
            match s.tx.try_send(d) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                // Its connection is ending; it unsubscribes as it goes.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        if delivered > 0 {
            metrics::counter!(events::DELIVERED_TOTAL).increment(delivered);
        }
        if dropped > 0 {
            metrics::counter!(events::DROPPED_TOTAL, "reason" => "queue_full").increment(dropped);
        }
        delivered as usize
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn outputs_reach_matching_subscribers_once_and_a_full_queue_drops() {
        let bus = LocalBus::new();
        let mut a = bus.subscribe(2);
        a.add("actuators/#");
        a.add("actuators/+/fan");
        let mut b = bus.subscribe(8);
        b.add("alerts/#");
        assert_eq!(bus.publish("actuators/m1/fan", b"on"), 1);
        assert_eq!(bus.publish("sensors/t1", b"x"), 0);
        let d = a.rx.try_recv().unwrap();
        assert_eq!(
            (&*d.topic, &d.payload[..]),
            ("actuators/m1/fan", &b"on"[..])
        );
        assert!(
            a.rx.try_recv().is_err(),
            "two matching filters, one delivery"
        );
        assert!(b.rx.try_recv().is_err());
        // Queue of 2: the third is lost, not waited for.
        for _ in 0..3 {
            bus.publish("actuators/m1/fan", b"on");
        }
        assert_eq!(
            (a.rx.try_recv().is_ok(), a.rx.try_recv().is_ok()),
            (true, true)
        );
        assert!(a.rx.try_recv().is_err());
        assert!(a.remove("actuators/#") && a.remove("actuators/+/fan"));
        assert_eq!(bus.publish("actuators/m1/fan", b"on"), 0);
        drop(a);
        drop(b);
        assert!(bus.is_idle());
    }
}
