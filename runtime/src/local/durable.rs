//! Durable local delivery (I-40): outputs of pipelines with
//! `local = "durable"` are kept in the outbox with the commit that made them
//! (`outbox::local`) and delivered after it, at QoS 1 or 2, from where each
//! subscriber's acknowledgements left off — across reconnects and restarts.
//!
//! The worker hands each commit's rows to the [`DurableHub`], which queues
//! them for every connected durable subscriber (no read from disk on the
//! hot path). A [`DurableFeed`] that fell behind (its queue overflowed, it
//! reconnected, it has too much pending) reads the missed rows back from
//! the outbox, then follows the queue again. Its position is committed by
//! the pipeline worker with the next batch (a chunk carries it).
//!
//! Packet identifiers come from the row id, so a resend after a restart
//! uses the same one: a QoS 2 receiver that saw the PUBLISH before treats it
//! as the duplicate it is (MQTT 5 §4.3.3). A PUBREC is remembered durably:
//! after it only a PUBREL is sent again.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::BytesMut;
use tokio::sync::Notify;

use super::events;
use crate::ingest::topic::matches;
use crate::outbox::{LocalReader, LocalRow, StoredSubscriber, SubscriberWrite};

/// Most PUBLISH packets unacknowledged per subscriber (lower if its MQTT 5
/// Receive Maximum says so).
pub const WINDOW: usize = 256;
/// Most rows a feed keeps ready in memory; beyond, it reads them back later.
pub const PENDING_MAX: usize = 4096;
/// Rows per read-back from the outbox.
pub const CATCH_UP_ROWS: usize = 512;
/// Commits queued for a subscriber before it is told to read back instead.
const INBOX_NOTICES: usize = 1024;

/// What the hub queued for one subscriber.
#[derive(Default)]
pub struct Inbox {
    queue: Mutex<InboxQueue>,
    wake: Notify,
}

#[derive(Default)]
struct InboxQueue {
    notices: VecDeque<Arc<[LocalRow]>>,
    lagged: bool,
}

impl Inbox {
    fn push(&self, rows: &Arc<[LocalRow]>) {
        if let Ok(mut q) = self.queue.lock() {
            if q.notices.len() >= INBOX_NOTICES {
                // It reads them back from the outbox instead.
                q.notices.clear();
                q.lagged = true;
            } else {
                q.notices.push_back(rows.clone());
            }
        }
        self.wake.notify_one();
    }

    fn take(&self) -> (Vec<Arc<[LocalRow]>>, bool) {
        match self.queue.lock() {
            Ok(mut q) => (q.notices.drain(..).collect(), std::mem::take(&mut q.lagged)),
            Err(_) => (Vec::new(), true),
        }
    }
}

/// Durable subscribers, connected or not, and the rows' high-water mark.
#[derive(Default)]
pub struct DurableHub {
    state: Mutex<HubState>,
    reader: OnceLock<Arc<LocalReader>>,
}

#[derive(Default)]
struct HubState {
    last_id: u64,
    stored: HashMap<String, StoredSubscriber>,
    connected: HashMap<String, Arc<Inbox>>,
    /// Connected subscribers' filters and positions, as last stored.
    live: HashMap<String, (Vec<(String, u8)>, u64)>,
}

/// A durable subscriber, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubscriberStatus {
    /// Its client id (`$fogline/external-broker`: `mqtt.publish`).
    pub client: String,
    /// Its filters and their QoS.
    pub filters: Vec<(String, u8)>,
    /// Connected now.
    pub connected: bool,
    /// Every output up to this id is delivered to it (or not its).
    pub acked: u64,
    /// Outputs committed since (for it or for others): a stuck subscriber's
    /// grows.
    pub behind: u64,
}

impl std::fmt::Debug for DurableHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DurableHub")
    }
}

impl DurableHub {
    /// Turns durable delivery on: what the outbox holds (read at start).
    pub fn start(&self, reader: Arc<LocalReader>, stored: Vec<StoredSubscriber>, last_id: u64) {
        let _ = self.reader.set(reader);
        if let Ok(mut s) = self.state.lock() {
            s.last_id = last_id;
            s.stored = stored.into_iter().map(|x| (x.client.clone(), x)).collect();
        }
    }

    /// Whether a pipeline delivers durably (the daemon started the hub).
    pub fn enabled(&self) -> bool {
        self.reader.get().is_some()
    }

    /// A commit kept `rows` (ids increasing, contiguous): queue them for
    /// every connected durable subscriber.
    pub fn committed(&self, rows: Vec<LocalRow>) {
        let Some(last) = rows.last().map(|r| r.id) else {
            return;
        };
        let rows: Arc<[LocalRow]> = rows.into();
        if let Ok(mut s) = self.state.lock() {
            s.last_id = s.last_id.max(last);
            for inbox in s.connected.values() {
                inbox.push(&rows);
            }
        }
    }

    /// A connection of `client` starts: its stored subscription, unless it
    /// starts clean (then whether one was forgotten, to delete it on file).
    pub fn take_stored(&self, client: &str, clean_start: bool) -> (Option<StoredSubscriber>, bool) {
        let Ok(mut s) = self.state.lock() else {
            return (None, false);
        };
        let stored = s.stored.remove(client);
        match (stored, clean_start) {
            (Some(x), false) => (Some(x), false),
            (Some(_), true) => (None, true),
            (None, _) => (None, false),
        }
    }

    fn register(&self, client: &str) -> (Arc<Inbox>, u64) {
        let inbox = Arc::new(Inbox::default());
        let mut last = 0;
        if let Ok(mut s) = self.state.lock() {
            last = s.last_id;
            s.connected.insert(client.to_string(), inbox.clone());
        }
        (inbox, last)
    }

    fn unregister(&self, client: &str, inbox: &Arc<Inbox>, keep: Option<StoredSubscriber>) {
        if let Ok(mut s) = self.state.lock() {
            if s.connected
                .get(client)
                .is_some_and(|i| Arc::ptr_eq(i, inbox))
            {
                s.connected.remove(client);
            }
            if let Some(k) = keep {
                s.stored.insert(client.to_string(), k);
            }
        }
    }

    /// Whether `client` is connected with a durable subscription.
    pub fn is_connected(&self, client: &str) -> bool {
        self.state
            .lock()
            .is_ok_and(|s| s.connected.contains_key(client))
    }

    /// Subscribers whose session expired are forgotten.
    pub fn forget(&self, clients: &[String]) {
        if let Ok(mut s) = self.state.lock() {
            for c in clients {
                s.stored.remove(c);
            }
        }
    }

    /// The highest row id committed.
    pub fn last_id(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.last_id)
    }

    fn note_position(&self, client: &str, filters: &[(String, u8)], acked: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.live.insert(client.to_string(), (filters.to_vec(), acked));
        }
    }

    /// Every durable subscriber, connected or not, by client id.
    pub fn status(&self) -> Vec<SubscriberStatus> {
        let Ok(s) = self.state.lock() else {
            return Vec::new();
        };
        let mut out: Vec<SubscriberStatus> = s
            .stored
            .values()
            .map(|x| (x.client.clone(), x.filters.clone(), x.acked, false))
            .chain(s.connected.keys().map(|c| {
                let (filters, acked) = s.live.get(c).cloned().unwrap_or_default();
                (c.clone(), filters, acked, true)
            }))
            .map(|(client, filters, acked, connected)| SubscriberStatus {
                client,
                filters,
                connected,
                acked,
                behind: s.last_id.saturating_sub(acked),
            })
            .collect();
        out.sort_by(|a, b| a.client.cmp(&b.client));
        out
    }
}

#[derive(Debug, Clone, Copy)]
struct Flight {
    /// PUBREC came: a PUBREL is owed (or out), the PUBLISH is never resent.
    rec: bool,
}

/// A subscriber's position as stored: acked and released.
type Position = (u64, Vec<u64>);

type Read = tokio::task::JoinHandle<(rusqlite::Result<Vec<LocalRow>>, u64)>;

/// One connection's durable subscription: what is pending, in flight and
/// acknowledged.
pub struct DurableFeed {
    hub: Arc<DurableHub>,
    client: String,
    expiry_secs: u32,
    filters: Vec<(String, u8)>,
    inbox: Arc<Inbox>,
    /// The next row id not yet looked at.
    next: u64,
    /// Rows from `next` on are read back from the outbox, not the inbox.
    lagged: bool,
    reading: Option<Read>,
    pending: VecDeque<(LocalRow, u8)>,
    inflight: BTreeMap<u64, Flight>,
    by_pkid: HashMap<u16, u64>,
    owed_pubrel: Vec<u16>,
    /// Rows up to here may have been sent by an earlier connection (DUP).
    dup_upto: u64,
    window: usize,
    /// What was last handed over to be stored.
    written: Option<Position>,
    /// Filters changed since then.
    filters_changed: bool,
}

/// The packet identifier of row `id`: the same on every resend, unique
/// among rows less than 65,535 apart (the window is far smaller).
pub fn pkid_of(id: u64) -> u16 {
    (id % 65_535) as u16 + 1
}

impl DurableFeed {
    /// A feed for `client`, from its stored position if it has one, else
    /// from the next row committed.
    pub fn open(
        hub: Arc<DurableHub>,
        client: &str,
        expiry_secs: u32,
        stored: Option<StoredSubscriber>,
        receive_maximum: Option<u16>,
    ) -> Self {
        let (inbox, last) = hub.register(client);
        let window = receive_maximum.map_or(WINDOW, |r| WINDOW.min(usize::from(r).max(1)));
        let mut feed = Self {
            hub,
            client: client.to_string(),
            expiry_secs,
            filters: Vec::new(),
            inbox,
            next: last + 1,
            lagged: false,
            reading: None,
            pending: VecDeque::new(),
            inflight: BTreeMap::new(),
            by_pkid: HashMap::new(),
            owed_pubrel: Vec::new(),
            dup_upto: 0,
            window,
            written: None,
            filters_changed: false,
        };
        if let Some(s) = stored {
            feed.filters = s.filters.clone();
            feed.next = s.acked + 1;
            feed.lagged = s.acked < last;
            feed.dup_upto = last;
            for id in &s.released {
                let pkid = pkid_of(*id);
                feed.inflight.insert(*id, Flight { rec: true });
                feed.by_pkid.insert(pkid, *id);
                feed.owed_pubrel.push(pkid);
            }
            feed.written = Some((s.acked, s.released));
        }
        feed
    }

    /// Its filters and their QoS.
    pub fn filters(&self) -> &[(String, u8)] {
        &self.filters
    }

    /// Adds or re-grants a filter.
    pub fn subscribe(&mut self, filter: &str, qos: u8) {
        self.filters_changed = true;
        match self.filters.iter_mut().find(|(f, _)| f == filter) {
            Some(x) => x.1 = qos,
            None => self.filters.push((filter.to_string(), qos)),
        }
    }

    /// Removes a filter; whether any is left.
    pub fn unsubscribe(&mut self, filter: &str) -> bool {
        self.filters_changed = true;
        self.filters.retain(|(f, _)| f != filter);
        !self.filters.is_empty()
    }

    fn qos_for(&self, topic: &str) -> Option<u8> {
        self.filters
            .iter()
            .filter(|(f, _)| matches(f, topic))
            .map(|(_, q)| *q)
            .max()
    }

    /// Waits for rows: queued commits, or a read-back finishing. Cancel
    /// safe: what arrived is taken in the same poll it is seen.
    pub async fn wait(&mut self) {
        match self.reading.as_mut() {
            // While reading back, the inbox keeps what comes in meanwhile.
            Some(read) => {
                let r = read.await;
                self.reading = None;
                match r {
                    Ok((rows, snapshot)) => self.read_back(rows, snapshot),
                    Err(e) => {
                        tracing::warn!(client = %self.client, error = %e, "Reading outputs back for a local subscriber failed; tried again.")
                    }
                }
                self.take_notices();
            }
            None => {
                self.inbox.wake.notified().await;
                self.take_notices();
            }
        }
    }

    fn take_notices(&mut self) {
        let (notices, lagged) = self.inbox.take();
        if lagged {
            self.lagged = true;
        }
        for rows in notices {
            self.accept(&rows);
        }
    }

    fn accept(&mut self, rows: &[LocalRow]) {
        if self.lagged {
            return;
        }
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return;
        };
        if last.id < self.next {
            return;
        }
        if first.id > self.next {
            // Rows in between are not in memory: read them back.
            self.lagged = true;
            return;
        }
        let from = self.next;
        for r in rows.iter().filter(|r| r.id >= from) {
            if !self.offer(r) {
                return;
            }
        }
        self.next = last.id + 1;
    }

    /// Takes a row if it is this subscriber's; false when full (then the
    /// rest is read back later, from this row on).
    fn offer(&mut self, r: &LocalRow) -> bool {
        if self.inflight.contains_key(&r.id) {
            return true;
        }
        let Some(qos) = self.qos_for(&r.topic) else {
            return true;
        };
        if self.pending.len() >= PENDING_MAX {
            self.lagged = true;
            self.next = r.id;
            return false;
        }
        self.pending.push_back((r.clone(), qos));
        true
    }

    fn read_back(&mut self, rows: Result<Vec<LocalRow>, rusqlite::Error>, snapshot: u64) {
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(client = %self.client, error = %e, "Reading outputs back for a local subscriber failed; tried again.");
                return;
            }
        };
        let complete = rows.len() < CATCH_UP_ROWS;
        for r in &rows {
            if !self.offer(r) {
                return;
            }
            self.next = r.id + 1;
        }
        if complete {
            // Everything up to the snapshot was committed before the read.
            self.next = self.next.max(snapshot + 1);
            self.lagged = false;
        }
    }

    /// Writes what is owed and what the window allows into `buf`: PUBRELs
    /// first, then PUBLISH packets in row order. Starts a read-back when
    /// rows are missing from memory.
    pub fn pump(
        &mut self,
        buf: &mut BytesMut,
        version: fogline_mqtt::Version,
        client_max_packet: Option<u32>,
    ) {
        for pkid in self.owed_pubrel.drain(..) {
            fogline_mqtt::encode_pubrel(buf, version, pkid);
        }
        if self.lagged && self.reading.is_none() && self.pending.len() < PENDING_MAX / 2 {
            if let Some(reader) = self.hub.reader.get().cloned() {
                let from = self.next;
                let snapshot = self.hub.last_id();
                self.reading = Some(tokio::task::spawn_blocking(move || {
                    (reader.read(from, CATCH_UP_ROWS), snapshot)
                }));
            }
        }
        let (mut delivered, mut too_large) = (0u64, 0u64);
        while self.inflight.len() < self.window {
            let Some((row, qos)) = self.pending.front() else {
                break;
            };
            let (id, qos) = (row.id, *qos);
            let pkid = pkid_of(id);
            if qos > 0 && self.by_pkid.contains_key(&pkid) {
                break;
            }
            let mark = buf.len();
            let encoded = fogline_mqtt::encode_publish(
                buf,
                version,
                row.topic.as_bytes(),
                row.payload.clone(),
                qos,
                pkid,
                qos > 0 && id <= self.dup_upto,
                false,
            );
            self.pending.pop_front();
            let oversize = client_max_packet.is_some_and(|m| buf.len() - mark > m as usize);
            if encoded.is_err() || oversize {
                buf.truncate(mark);
                too_large += 1;
                continue;
            }
            delivered += 1;
            if qos > 0 {
                self.inflight.insert(id, Flight { rec: false });
                self.by_pkid.insert(pkid, id);
            }
        }
        if delivered > 0 {
            metrics::counter!(events::DELIVERED_TOTAL).increment(delivered);
        }
        if too_large > 0 {
            metrics::counter!(events::DROPPED_TOTAL, "reason" => "too_large").increment(too_large);
        }
    }

    /// A PUBACK: that row is delivered.
    pub fn on_puback(&mut self, pkid: u16) {
        if let Some(id) = self.by_pkid.remove(&pkid) {
            self.inflight.remove(&id);
        }
    }

    /// A PUBREC: a PUBREL is owed from now on (a refusal, reason ≥ 0x80,
    /// ends the exchange: the subscriber does not want it).
    pub fn on_pubrec(&mut self, pkid: u16, reason: u8) {
        let Some(&id) = self.by_pkid.get(&pkid) else {
            // Not ours (any more): MQTT says answer it anyway.
            self.owed_pubrel.push(pkid);
            return;
        };
        if reason >= 0x80 {
            self.by_pkid.remove(&pkid);
            self.inflight.remove(&id);
            metrics::counter!(events::DROPPED_TOTAL, "reason" => "refused").increment(1);
            return;
        }
        if let Some(f) = self.inflight.get_mut(&id) {
            f.rec = true;
        }
        self.owed_pubrel.push(pkid);
    }

    /// A PUBCOMP: that row is delivered, exactly once.
    pub fn on_pubcomp(&mut self, pkid: u16) {
        self.on_puback(pkid);
    }

    /// A PUBACK, PUBREC or PUBCOMP from the peer, for `feed` if there is
    /// one (an unknown packet id is ignored; a PUBREC is answered anyway).
    pub fn acknowledge(
        feed: Option<&mut Self>,
        packet: &fogline_mqtt::Inbound,
        buf: &mut BytesMut,
        version: fogline_mqtt::Version,
    ) {
        use fogline_mqtt::Inbound;
        match (feed, packet) {
            (Some(f), Inbound::PubAck(pkid, _)) => f.on_puback(*pkid),
            (Some(f), Inbound::PubRec(pkid, reason)) => f.on_pubrec(*pkid, *reason),
            (Some(f), Inbound::PubComp(pkid, _)) => f.on_pubcomp(*pkid),
            (None, Inbound::PubRec(pkid, _)) => fogline_mqtt::encode_pubrel(buf, version, *pkid),
            _ => {}
        }
    }

    /// Every row up to this id is delivered or not this subscriber's.
    pub fn acked(&self) -> u64 {
        let unsent = self
            .inflight
            .iter()
            .find(|(_, f)| !f.rec)
            .map(|(id, _)| *id);
        let lowest = [
            unsent,
            self.pending.front().map(|(r, _)| r.id),
            Some(self.next),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.next);
        lowest.saturating_sub(1)
    }

    /// Where it is: acked, and the rows owed a PUBREL (below the position
    /// too: the PUBREL is owed until PUBCOMP).
    fn position(&self) -> Position {
        let released = self
            .inflight
            .iter()
            .filter(|(_, f)| f.rec)
            .map(|(id, _)| *id)
            .collect();
        (self.acked(), released)
    }

    /// Its record, as it would be stored now.
    pub fn record(&self) -> StoredSubscriber {
        let (acked, released) = self.position();
        StoredSubscriber {
            client: self.client.clone(),
            filters: self.filters.clone(),
            acked,
            released,
            expiry_secs: self.expiry_secs,
            seen_ms: crate::clock::now_ms(),
        }
    }

    /// What to store, when its position or filters changed since last
    /// time (called on every turn of its connection: nothing is built
    /// when nothing changed).
    pub fn take_write(&mut self) -> Option<SubscriberWrite> {
        let now = self.position();
        if !self.filters_changed && self.written.as_ref() == Some(&now) {
            return None;
        }
        self.filters_changed = false;
        self.written = Some(now);
        let r = self.record();
        self.hub.note_position(&self.client, &r.filters, r.acked);
        Some(SubscriberWrite::Put(r))
    }

    /// The connection ends: the hub keeps its position for the next one
    /// (a session that does not outlive the connection keeps nothing).
    /// Returns the final write.
    pub fn close(mut self) -> SubscriberWrite {
        if let Some(r) = self.reading.take() {
            r.abort();
        }
        let r = self.record();
        if self.expiry_secs == 0 {
            self.hub.unregister(&self.client, &self.inbox, None);
            SubscriberWrite::Delete(self.client.clone())
        } else {
            self.hub
                .unregister(&self.client, &self.inbox, Some(r.clone()));
            SubscriberWrite::Put(r)
        }
    }

    /// Unsubscribed from everything: forget it.
    pub fn drop_subscription(mut self) -> SubscriberWrite {
        if let Some(r) = self.reading.take() {
            r.abort();
        }
        self.hub.unregister(&self.client, &self.inbox, None);
        SubscriberWrite::Delete(self.client.clone())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn row(id: u64, topic: &str) -> LocalRow {
        LocalRow {
            id,
            topic: Arc::from(topic),
            payload: bytes::Bytes::from(format!("{id}")),
        }
    }

    fn hub() -> Arc<DurableHub> {
        Arc::new(DurableHub::default())
    }

    fn sent(buf: &mut BytesMut) -> Vec<(u16, u8)> {
        let mut out = Vec::new();
        while let Ok(Some(p)) = fogline_mqtt::decode(buf, Some(fogline_mqtt::Version::V5), 1 << 20)
        {
            match p {
                fogline_mqtt::Inbound::Publish(p) => out.push((p.pkid, p.qos)),
                fogline_mqtt::Inbound::PubRel(pkid, _) => out.push((pkid, 0xFF)),
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    #[test]
    fn i40_rows_are_acknowledged_in_order_and_the_position_never_passes_a_gap() {
        let h = hub();
        let mut f = DurableFeed::open(h.clone(), "a", 60, None, None);
        f.subscribe("act/#", 1);
        h.committed(vec![row(1, "act/x"), row(2, "other"), row(3, "act/y")]);
        f.take_notices();
        let mut buf = BytesMut::new();
        f.pump(&mut buf, fogline_mqtt::Version::V5, None);
        assert_eq!(sent(&mut buf), vec![(pkid_of(1), 1), (pkid_of(3), 1)]);
        assert_eq!(f.acked(), 0);
        f.on_puback(pkid_of(3));
        assert_eq!(f.acked(), 0, "row 1 is still unacknowledged");
        f.on_puback(pkid_of(1));
        assert_eq!(f.acked(), 3);
        assert!(matches!(f.take_write(), Some(SubscriberWrite::Put(s)) if s.acked == 3));
        assert!(f.take_write().is_none());
    }

    #[test]
    fn i40_qos2_after_pubrec_only_a_pubrel_is_sent_again_after_a_restart() {
        let h = hub();
        let mut f = DurableFeed::open(h.clone(), "a", 60, None, None);
        f.subscribe("act/#", 2);
        h.committed(vec![row(1, "act/x"), row(2, "act/y")]);
        f.take_notices();
        let mut buf = BytesMut::new();
        f.pump(&mut buf, fogline_mqtt::Version::V5, None);
        assert_eq!(sent(&mut buf), vec![(pkid_of(1), 2), (pkid_of(2), 2)]);
        f.on_pubrec(pkid_of(1), 0);
        f.pump(&mut buf, fogline_mqtt::Version::V5, None);
        assert_eq!(sent(&mut buf), vec![(pkid_of(1), 0xFF)]);
        let stored = f.record();
        assert_eq!((stored.acked, stored.released.clone()), (1, vec![1]));
        f.on_pubcomp(pkid_of(2));
        let stored = f.record();
        assert_eq!((stored.acked, stored.released.clone()), (2, vec![1]));
        // A restart: a PUBREL for row 1, no PUBLISH of either row.
        let h2 = hub();
        h2.committed(vec![row(1, "act/x"), row(2, "act/y")]);
        let mut g = DurableFeed::open(h2, "a", 60, Some(stored), None);
        g.pump(&mut buf, fogline_mqtt::Version::V5, None);
        assert_eq!(sent(&mut buf), vec![(pkid_of(1), 0xFF)]);
        assert!(!g.lagged);
        g.on_pubcomp(pkid_of(1));
        assert_eq!((g.acked(), g.record().released), (2, vec![]));
    }

    #[test]
    fn i40_unacknowledged_rows_are_read_back_and_resent_as_duplicates_after_a_restart() {
        let h = hub();
        let mut f = DurableFeed::open(h.clone(), "a", 60, None, None);
        f.subscribe("act/#", 1);
        h.committed(vec![row(1, "act/x"), row(2, "act/y")]);
        f.take_notices();
        let mut buf = BytesMut::new();
        f.pump(&mut buf, fogline_mqtt::Version::V5, None);
        buf.clear();
        f.on_puback(pkid_of(1));
        let stored = f.record();
        assert_eq!(stored.acked, 1);
        let h2 = hub();
        h2.committed(vec![row(1, "act/x"), row(2, "act/y")]);
        let mut g = DurableFeed::open(h2, "a", 60, Some(stored), None);
        assert!(g.lagged);
        g.read_back(Ok(vec![row(2, "act/y")]), 2);
        g.pump(&mut buf, fogline_mqtt::Version::V5, None);
        let again = fogline_mqtt::decode(&mut buf, Some(fogline_mqtt::Version::V5), 1 << 20);
        assert!(
            matches!(again, Ok(Some(fogline_mqtt::Inbound::Publish(ref p))) if p.pkid == pkid_of(2) && p.dup),
            "{again:?}"
        );
    }

    #[test]
    fn i40_a_full_inbox_or_pending_queue_reads_back_instead_of_losing() {
        let h = hub();
        let mut f = DurableFeed::open(h.clone(), "a", 0, None, Some(4));
        f.subscribe("#", 1);
        for i in 0..(INBOX_NOTICES as u64 + 5) {
            h.committed(vec![row(i + 1, "t")]);
        }
        f.take_notices();
        assert!(f.lagged && f.pending.is_empty() && f.next == 1);
        // Read back in pieces of CATCH_UP_ROWS until a short one.
        let mut reads = 0;
        while f.lagged {
            let rows: Vec<LocalRow> = (f.next..=1029)
                .take(CATCH_UP_ROWS)
                .map(|i| row(i, "t"))
                .collect();
            f.read_back(Ok(rows), 1029);
            reads += 1;
        }
        assert_eq!((reads, f.next, f.pending.len()), (3, 1030, 1029));
        // Receive Maximum 4: four in flight.
        let mut buf = BytesMut::new();
        f.pump(&mut buf, fogline_mqtt::Version::V5, None);
        assert_eq!(sent(&mut buf).len(), 4);
        // A gap in the notices (rows committed while nobody looked): read back.
        h.committed(vec![row(1100, "t")]);
        f.take_notices();
        assert!(f.lagged);
    }
}
