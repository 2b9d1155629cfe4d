//! Recognising redeliveries, per sender: which QoS 1/2 PUBLISHes are resends
//! of messages already accepted (acknowledge only) and which are new
//! (process, then acknowledge).
//!
//! A *sender* is an MQTT session that publishes to us: a sensor on the
//! native endpoint, or the external broker delivering to our subscription.
//! [`SenderState`] is a plain state machine (no I/O, no clock), driven by the
//! connection that currently owns the session.
//!
//! # QoS 2: exact
//! A packet id is *received* from the commit holding the message's outputs
//! (PUBREC is sent after it) until the commit that records its PUBREL (PUBCOMP
//! is sent after that). Any PUBLISH with a received packet id is a resend.
//!
//! # QoS 1: marks, proofs, and what MQTT cannot tell (ARCHITECTURE.md I-5)
//! Each accepted QoS 1 message leaves a *mark* (packet id → digest of topic
//! and payload) in the same commit as its outputs. A mark is removed as soon
//! as there is *proof* that the sender received its PUBACK, because from
//! then on the sender may reuse the packet id for a new message:
//!
//! - **P1, reuse.** The sender used the packet id again for different content
//!   or with `DUP=0`: it had the PUBACK. PUBACKs on one connection are written
//!   in arrival order and TCP delivers them in order, so it also had every
//!   earlier PUBACK of that connection, and (P3) everything older.
//! - **P2, receive maximum.** A sender that honours a receive maximum `N` has
//!   at most `N` unacknowledged messages when it sends one: at the arrival of
//!   the `k`-th QoS 1 PUBLISH on a connection, the PUBACKs of the first
//!   `k - N` have been received.
//! - **P3, reconnection.** On a new connection a sender first resends what it
//!   has not had acknowledged (MQTT requires it, in order); its first `DUP=0`
//!   PUBLISH there proves that marks from older connections not resent were
//!   acknowledged.
//!
//! A `DUP=1` PUBLISH whose packet id has a mark with the same digest is then
//! either a resend, or a new message with identical content whose first
//! transmission was lost after the previous one's PUBACK got through. It is
//! a **resend** (acknowledged, not processed) when
//! - the sender is *proven sequential*: it has issued more consecutive packet
//!   ids than marks are kept (`retain`) without ever reusing one out of
//!   order, so it cannot come back to an id while its mark exists; or
//! - this content is *evidently unique*: after 16+ new messages from the
//!   sender, it occurs once among its last 64 and in no other mark.
//!
//! Otherwise it is a **possible duplicate**: kept, processed and counted —
//! MQTT 3.1.1/5 at QoS 1 cannot tell, and a message is never dropped on a
//! guess. That covers low-entropy payloads (`1`, `online`) from senders that
//! reuse packet ids, and every sender until one of the two proofs holds.
//!
//! The residual window, where a legitimate message is taken for a resend:
//! a sender that is not proven sequential repeats, on an unproven mark's
//! packet id, content seen only in that mark among its last 64 messages,
//! and the repeat's first transmission is lost with its connection. QoS 2
//! has no window.

use std::collections::{HashMap, VecDeque};

/// What to do with a PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A new message: process it, acknowledge after its commit.
    New,
    /// A resend of a message already accepted: acknowledge only (after the
    /// next commit, so acknowledgements keep their order).
    Resend,
}

/// A durable change to a sender's state, committed with the outbox commit
/// that carries the PUBLISH (or PUBREL) that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Op {
    /// A QoS 1 message with this packet id and digest was accepted.
    Mark(u16, u64),
    /// The mark for this packet id is proven acknowledged.
    Unmark(u16),
    /// A QoS 2 packet id is now received (PUBREC will follow the commit).
    Received(u16, u64),
    /// A QoS 2 packet id was released by PUBREL (PUBCOMP follows the commit).
    Released(u16),
    /// What is proven about the sender changed.
    Shape(Shape),
}

/// What has been proven about a sender's packet ids and content; persisted
/// so a restart keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    /// Issued more consecutive ids than marks are kept, never out of order.
    pub sequential: bool,
    /// Seen reusing an id out of order: never sequential again.
    pub unordered: bool,
    /// Enough new messages seen to judge whether content repeats, and none
    /// of the last ones repeated (what survives a restart of the content
    /// history, which is not persisted).
    pub warm: bool,
}

/// New messages remembered to judge whether content repeats.
const HISTORY: usize = 64;
/// Fewest new messages seen before content can count as evidently unique.
const WARM_AFTER: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Mark {
    digest: u64,
    /// Connection it arrived on last (0: before this process started).
    conn: u32,
    /// Its QoS 1 arrival index on that connection (= the order of its PUBACK).
    index: u64,
}

/// Most QoS 1 marks kept per sender: below half the packet-id space, so a
/// sequential sender cannot come back to an id while its mark is kept.
pub const MAX_RETAIN: usize = 32_000;

/// Counters a sender's owner reports as metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Resends recognised and acknowledged without processing.
    pub resends: u64,
    /// Marks dropped by the retention cap without proof (a later resend of
    /// them would be processed again: a possible duplicate).
    pub evicted: u64,
    /// Resends MQTT could not tell from new identical messages: processed
    /// (never dropped on a guess), so possibly duplicated downstream.
    pub possible_duplicates: u64,
}

/// One sender's redelivery state.
#[derive(Debug, Clone)]
pub struct SenderState {
    marks: HashMap<u16, Mark>,
    /// (conn, index, pkid) in arrival order; may hold stale entries for
    /// marks since replaced (checked on removal).
    order: VecDeque<(u32, u64, u16)>,
    qos2: HashMap<u16, u64>,
    /// How many marks hold each digest (repeated content shows here).
    contents: HashMap<u64, u32>,
    shape: Shape,
    /// Consecutive successor ids seen (toward `shape.sequential`).
    successors: usize,
    last_new: Option<u16>,
    /// Enough new messages seen (in this process, or `shape.warm` restored)
    /// to judge whether content repeats.
    warm: bool,
    /// Digests of the last new messages, and how many times each occurs.
    history: VecDeque<u64>,
    history_counts: HashMap<u64, u32>,
    conn: u32,
    q1_arrivals: u64,
    seen_new: bool,
    receive_maximum: Option<u16>,
    retain: usize,
    persistent: bool,
    ops: Vec<Op>,
    counters: Counters,
}

impl SenderState {
    /// A fresh sender. `persistent`: record [`Op`]s for the outbox.
    /// `retain`: most QoS 1 marks kept (at least the sender's in-flight window).
    pub fn new(persistent: bool, retain: usize) -> Self {
        Self {
            marks: HashMap::new(),
            order: VecDeque::new(),
            qos2: HashMap::new(),
            contents: HashMap::new(),
            shape: Shape::default(),
            successors: 0,
            last_new: None,
            warm: false,
            history: VecDeque::new(),
            history_counts: HashMap::new(),
            conn: 0,
            q1_arrivals: 0,
            seen_new: false,
            receive_maximum: None,
            // Below 65,535/2: a sequential sender cannot come back to an id
            // while its mark is kept.
            retain: retain.clamp(1, MAX_RETAIN),
            persistent,
            ops: Vec::new(),
            counters: Counters::default(),
        }
    }

    /// A sender restored from the outbox after a restart: its marks count as
    /// coming from an older connection whose PUBACKs may or may not have been
    /// written.
    pub fn restore(
        marks: impl IntoIterator<Item = (u16, u64)>,
        received: impl IntoIterator<Item = (u16, u64)>,
        shape: Shape,
        retain: usize,
    ) -> Self {
        let mut s = Self::new(true, retain);
        // The content history is not persisted; `shape.warm` is stored true
        // only while that history held no repeated content, so every mark's
        // content was unique in it and stays judged so after the restart.
        s.shape = shape;
        s.warm = shape.warm;
        for (i, (pkid, digest)) in marks.into_iter().enumerate() {
            s.insert_mark(pkid, digest, 0, i as u64);
        }
        s.qos2.extend(received);
        s
    }

    fn insert_mark(&mut self, pkid: u16, digest: u64, conn: u32, index: u64) {
        if let Some(old) = self.marks.insert(
            pkid,
            Mark {
                digest,
                conn,
                index,
            },
        ) {
            self.forget_content(old.digest);
        }
        *self.contents.entry(digest).or_default() += 1;
        self.order.push_back((conn, index, pkid));
    }

    fn forget_content(&mut self, digest: u64) {
        if let Some(n) = self.contents.get_mut(&digest) {
            *n -= 1;
            if *n == 0 {
                self.contents.remove(&digest);
            }
        }
    }

    fn set_shape(&mut self, shape: Shape) {
        if shape != self.shape {
            self.shape = shape;
            if self.persistent {
                self.ops.push(Op::Shape(shape));
            }
        }
    }

    /// A new (`DUP=0`) message's packet id: is the sender numbering
    /// sequentially? Within a connection the next id must follow; the first
    /// new id on a connection may skip ahead over messages lost with the
    /// previous one (they come back as resends), by at most `retain`.
    fn observe_new(&mut self, pkid: u16, first_on_connection: bool) {
        let mut shape = self.shape;
        if let Some(prev) = self.last_new {
            // Ids run 1..=65535; distance forward from prev, 1 = successor.
            let d = (i32::from(pkid) - i32::from(prev) - 1).rem_euclid(65535) + 1;
            let d = d as usize;
            if d == 1 || (first_on_connection && d <= self.retain) {
                self.successors = self.successors.saturating_add(d);
                if !shape.unordered && self.successors > self.retain {
                    shape.sequential = true;
                }
            } else {
                shape.unordered = true;
                shape.sequential = false;
            }
        }
        self.last_new = Some(pkid);
        self.set_shape(shape);
    }

    /// A new message's content, for the distinct-content proof.
    fn observe_content(&mut self, digest: u64) {
        *self.history_counts.entry(digest).or_default() += 1;
        self.history.push_back(digest);
        if self.history.len() > HISTORY {
            if let Some(old) = self.history.pop_front() {
                if let Some(n) = self.history_counts.get_mut(&old) {
                    *n -= 1;
                    if *n == 0 {
                        self.history_counts.remove(&old);
                    }
                }
            }
        }
        if self.history.len() >= WARM_AFTER {
            self.warm = true;
        }
        let distinct = self.history_counts.len() == self.history.len();
        let persisted = self.warm && distinct;
        if persisted != self.shape.warm {
            let shape = Shape {
                warm: persisted,
                ..self.shape
            };
            self.set_shape(shape);
        }
    }

    /// What is proven about the sender.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Whether changes are recorded for the outbox.
    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// Make the state persistent (v5 session expiry raised on DISCONNECT):
    /// record everything it holds so the outbox has it.
    pub fn make_persistent(&mut self) {
        if !self.persistent {
            self.persistent = true;
            let mut ops: Vec<Op> = self
                .order
                .iter()
                .filter_map(|(c, i, p)| {
                    self.marks
                        .get(p)
                        .filter(|m| m.conn == *c && m.index == *i)
                        .map(|m| Op::Mark(*p, m.digest))
                })
                .collect();
            ops.extend(self.qos2.iter().map(|(p, d)| Op::Received(*p, *d)));
            ops.push(Op::Shape(self.shape));
            self.ops.extend(ops);
        }
    }

    /// A new connection of this sender begins. `receive_maximum`: the window
    /// the sender must honour on it (MQTT 5), enabling proof P2.
    pub fn start_connection(&mut self, receive_maximum: Option<u16>) {
        self.conn = self.conn.saturating_add(1);
        self.q1_arrivals = 0;
        self.seen_new = false;
        self.receive_maximum = receive_maximum.filter(|n| *n > 0);
    }

    fn unmark_front_while(&mut self, mut pred: impl FnMut(u32, u64) -> bool) {
        while let Some(&(c, i, p)) = self.order.front() {
            if !pred(c, i) {
                break;
            }
            self.order.pop_front();
            if self
                .marks
                .get(&p)
                .is_some_and(|m| m.conn == c && m.index == i)
            {
                if let Some(m) = self.marks.remove(&p) {
                    self.forget_content(m.digest);
                }
                if self.persistent {
                    self.ops.push(Op::Unmark(p));
                }
            }
        }
    }

    /// Proofs that hold at any QoS 1/2 arrival: P2 and, for `DUP=0`, P3.
    fn on_arrival(&mut self, pkid: u16, dup: bool) {
        let conn = self.conn;
        if !dup {
            let first = !self.seen_new;
            self.observe_new(pkid, first);
        }
        if !dup && !self.seen_new {
            self.seen_new = true;
            self.unmark_front_while(|c, _| c < conn); // P3
        }
        if let Some(n) = self.receive_maximum {
            let q1 = self.q1_arrivals;
            self.unmark_front_while(|c, i| c == conn && i + u64::from(n) <= q1);
            // P2
        }
    }

    /// The sender used `pkid` for another message: it had the PUBACK of the
    /// mark on `pkid` and of everything acknowledged before it (P1).
    fn on_reuse(&mut self, pkid: u16) {
        if let Some(m) = self.marks.get(&pkid).copied() {
            self.unmark_front_while(|c, i| c < m.conn || (c == m.conn && i <= m.index));
        }
    }

    /// The sender sent more than its receive maximum: proof P2 does not
    /// hold on this connection.
    pub fn receive_maximum_broken(&mut self) {
        self.receive_maximum = None;
    }

    /// A QoS 1 PUBLISH arrived.
    pub fn on_qos1(&mut self, pkid: u16, dup: bool, digest: u64) -> Verdict {
        self.on_arrival(pkid, dup);
        let index = self.q1_arrivals;
        self.q1_arrivals += 1;
        let conn = self.conn;
        if let Some(m) = self.marks.get(&pkid).copied() {
            if dup && m.digest == digest {
                let in_marks = self.contents.get(&digest).is_none_or(|n| *n <= 1);
                let in_history = self.history_counts.get(&digest).is_none_or(|n| *n <= 1);
                if self.shape.sequential || (self.warm && in_marks && in_history) {
                    // Its PUBACK will be written on this connection, in this order.
                    if let Some(m) = self.marks.get_mut(&pkid) {
                        m.conn = conn;
                        m.index = index;
                    }
                    self.order.push_back((conn, index, pkid));
                    self.counters.resends += 1;
                    return Verdict::Resend;
                }
                // Cannot tell: keep it. No proof either (it may be a resend).
                self.counters.possible_duplicates += 1;
                self.observe_content(digest);
                self.insert_mark(pkid, digest, conn, index);
                if self.persistent {
                    self.ops.push(Op::Mark(pkid, digest));
                }
                return Verdict::New;
            }
        }
        self.on_reuse(pkid);
        self.observe_content(digest);
        self.insert_mark(pkid, digest, conn, index);
        if self.persistent {
            self.ops.push(Op::Mark(pkid, digest));
        }
        while self.marks.len() > self.retain {
            let before = self.marks.len();
            if let Some((c, i, _)) = self.order.front().copied() {
                self.unmark_front_while(|c2, i2| (c2, i2) <= (c, i));
            }
            if self.marks.len() < before {
                self.counters.evicted += (before - self.marks.len()) as u64;
            } else {
                break;
            }
        }
        Verdict::New
    }

    /// A QoS 2 PUBLISH arrived.
    pub fn on_qos2(&mut self, pkid: u16, dup: bool, digest: u64) -> Verdict {
        if self.qos2.contains_key(&pkid) {
            self.counters.resends += 1;
            return Verdict::Resend;
        }
        self.on_arrival(pkid, dup);
        self.on_reuse(pkid);
        self.observe_content(digest);
        self.qos2.insert(pkid, digest);
        if self.persistent {
            self.ops.push(Op::Received(pkid, digest));
        }
        Verdict::New
    }

    /// A PUBREL arrived. True if the packet id was received (PUBCOMP after
    /// the commit that records the release); false if unknown (PUBCOMP with
    /// "packet identifier not found").
    pub fn on_pubrel(&mut self, pkid: u16) -> bool {
        if self.qos2.remove(&pkid).is_some() {
            if self.persistent {
                self.ops.push(Op::Released(pkid));
            }
            true
        } else {
            false
        }
    }

    /// QoS 2 packet ids awaiting PUBREL.
    pub fn received(&self) -> usize {
        self.qos2.len()
    }

    /// QoS 1 marks held.
    pub fn marks(&self) -> usize {
        self.marks.len()
    }

    /// Durable changes since the last call, for the next outbox commit.
    pub fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.ops)
    }

    /// Counters since the last call.
    pub fn take_counters(&mut self) -> Counters {
        std::mem::take(&mut self.counters)
    }
}

/// A stable 64-bit digest of topic and payload (xxh3, whose output is fixed
/// by its specification): what identifies a message's content across
/// restarts when recognising redeliveries.
pub fn digest(topic: &[u8], payload: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(topic.len() as u64).to_le_bytes());
    h.update(topic);
    h.update(payload);
    h.digest()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fresh() -> SenderState {
        let mut s = SenderState::new(true, 10_000);
        s.start_connection(None);
        s
    }

    /// Warms a sender up with `n` distinct messages on ids 100.. (not
    /// sequential-proven with a large retain, but evidently distinct).
    fn warm(s: &mut SenderState, n: u16) {
        for i in 0..n {
            s.on_qos1(100 + i, false, 1_000_000 + u64::from(i));
        }
    }

    #[test]
    fn a_resend_after_a_crash_is_recognised() {
        let mut s = fresh();
        warm(&mut s, 20);
        assert!(s.shape().warm);
        assert_eq!(s.on_qos1(1, false, 11), Verdict::New);
        assert_eq!(s.on_qos1(2, false, 22), Verdict::New);
        let ops = s.take_ops();
        assert!(ops.contains(&Op::Mark(1, 11)) && ops.contains(&Op::Mark(2, 22)));
        let shape = ops
            .iter()
            .rev()
            .find_map(|op| match op {
                Op::Shape(sh) => Some(*sh),
                _ => None,
            })
            .unwrap();
        // Restart: the outbox gives the marks and the shape back.
        let mut r = SenderState::restore([(1, 11), (2, 22)], [], shape, 10_000);
        r.start_connection(None);
        assert_eq!(r.on_qos1(1, true, 11), Verdict::Resend);
        assert_eq!(r.on_qos1(2, true, 22), Verdict::Resend);
        assert_eq!(r.on_qos1(3, false, 33), Verdict::New);
    }

    #[test]
    fn low_entropy_payloads_on_a_reused_id_are_kept_and_counted() {
        // The case: "1" on pkid 7, acknowledged; "1" again on pkid 7,
        // first transmission lost; resent with DUP. MQTT cannot tell it
        // from a resend: it is kept, and counted as a possible duplicate.
        let mut s = fresh();
        assert_eq!(s.on_qos1(7, false, 1), Verdict::New);
        s.start_connection(None);
        assert_eq!(s.on_qos1(7, true, 1), Verdict::New);
        assert_eq!(s.take_counters().possible_duplicates, 1);
        // A sender of repeated content never becomes "evidently distinct".
        for _ in 0..40 {
            s.on_qos1(7, false, 1);
        }
        s.start_connection(None);
        assert_eq!(s.on_qos1(7, true, 1), Verdict::New);
    }

    #[test]
    fn a_proven_sequential_sender_is_exact_even_with_identical_content() {
        let mut s = SenderState::new(true, 64);
        s.start_connection(None);
        for p in 1..=100u16 {
            assert_eq!(s.on_qos1(p, false, 1), Verdict::New);
        }
        assert!(s.shape().sequential);
        s.start_connection(None);
        assert_eq!(s.on_qos1(100, true, 1), Verdict::Resend);
        // Reusing an id out of order revokes it for good.
        s.on_qos1(5, false, 2);
        assert!(!s.shape().sequential && s.shape().unordered);
    }

    #[test]
    fn identical_content_on_a_reused_id_is_new_once_the_ack_is_proven() {
        // "1" on pkid 5, acknowledged; later "1" again on pkid 5, first
        // transmission lost, resent with DUP.
        let mut s = fresh();
        assert_eq!(s.on_qos1(5, false, 1), Verdict::New);
        for p in 6..=70u16 {
            s.on_qos1(p, false, u64::from(p));
        }
        // pkid 6 reused by a new message: PUBACK of 5 and 6 proven (P1).
        assert_eq!(s.on_qos1(6, false, 999), Verdict::New);
        s.start_connection(None);
        assert_eq!(
            s.on_qos1(5, true, 1),
            Verdict::New,
            "identical content, proven ack: a new message"
        );
        assert_eq!(s.take_counters().possible_duplicates, 0);
    }

    #[test]
    fn receive_maximum_proves_old_acks() {
        let mut s = SenderState::new(true, 100_000);
        s.start_connection(Some(10));
        warm(&mut s, 20);
        s.start_connection(Some(10));
        s.on_qos1(1, false, 7);
        for p in 2..=11u16 {
            s.on_qos1(p, false, u64::from(p) * 100);
        }
        // 11th arrival: the sender can have at most 10 unacknowledged, so #1's
        // PUBACK was received.
        s.start_connection(Some(10));
        assert_eq!(s.on_qos1(11, true, 1100), Verdict::Resend);
        assert_eq!(s.on_qos1(1, true, 7), Verdict::New);
    }

    #[test]
    fn a_new_message_after_reconnect_proves_older_connections() {
        let mut s = fresh();
        warm(&mut s, 20);
        s.on_qos1(1, false, 7);
        s.start_connection(None);
        assert_eq!(s.on_qos1(2, false, 8), Verdict::New); // first DUP=0 (P3)
        s.start_connection(None);
        assert_eq!(s.on_qos1(2, true, 8), Verdict::Resend);
        assert_eq!(s.on_qos1(1, true, 7), Verdict::New);
    }

    #[test]
    fn qos2_is_exact_until_pubrel() {
        let mut s = fresh();
        assert_eq!(s.on_qos2(9, false, 1), Verdict::New);
        assert_eq!(s.on_qos2(9, true, 1), Verdict::Resend);
        assert_eq!(s.on_qos2(9, false, 2), Verdict::Resend, "id still received");
        assert!(s.on_pubrel(9));
        assert!(!s.on_pubrel(9));
        assert_eq!(
            s.on_qos2(9, false, 1),
            Verdict::New,
            "released: a new message"
        );
        let ops: Vec<Op> = s
            .take_ops()
            .into_iter()
            .filter(|o| !matches!(o, Op::Shape(_)))
            .collect();
        assert_eq!(
            ops,
            vec![Op::Received(9, 1), Op::Released(9), Op::Received(9, 1)]
        );
    }

    #[test]
    fn the_retention_cap_evicts_oldest_and_counts() {
        let mut s = SenderState::new(false, 3);
        s.start_connection(None);
        for p in 1..=5u16 {
            s.on_qos1(p, false, u64::from(p));
        }
        assert_eq!(s.marks(), 3);
        assert_eq!(s.take_counters().evicted, 2);
        assert!(s.take_ops().is_empty(), "not persistent: no ops");
    }

    /// A model sender: a window, PUBLISHes and PUBACKs lost with their
    /// connection, receiver crashes; packet ids numbered sequentially or in
    /// a small cycle (like small clients); distinct or identical content.
    #[derive(Debug, Clone)]
    enum Step {
        Send(u8),
        SendLost,
        Ack(u8),
        Cut,
        Crash,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (1u8..8).prop_map(Step::Send),
            1 => Just(Step::SendLost),
            6 => (1u8..8).prop_map(Step::Ack),
            1 => Just(Step::Cut),
            1 => Just(Step::Crash),
        ]
    }

    struct Model {
        rx: SenderState,
        rm: Option<u16>,
        retain: usize,
        durable: Vec<Op>,
        inflight: VecDeque<(u16, u64)>,
        wire: VecDeque<u16>,
        next_msg: u64,
        next_pkid: u16,
        space: u16,
        window: u16,
        identical: bool,
        accepted: HashMap<u64, u32>,
        possible_duplicates: u64,
        resend_pending: bool,
    }

    impl Model {
        fn deliver(&mut self, p: u16, m: u64, dup: bool) {
            let digest = if self.identical { 7 } else { m };
            if self.rx.on_qos1(p, dup, digest) == Verdict::New {
                *self.accepted.entry(m).or_default() += 1;
            }
            self.possible_duplicates += self.rx.take_counters().possible_duplicates;
            self.wire.push_back(p);
        }

        fn resend(&mut self) {
            if self.resend_pending {
                for (p, m) in self.inflight.clone() {
                    self.deliver(p, m, true);
                }
                self.resend_pending = false;
            }
        }

        fn new_message(&mut self) -> Option<(u16, u64)> {
            if self.inflight.len() >= usize::from(self.window) {
                return None;
            }
            while self.inflight.iter().any(|(p, _)| *p == self.next_pkid) {
                self.next_pkid = self.next_pkid % self.space + 1;
            }
            let (p, m) = (self.next_pkid, self.next_msg);
            self.next_pkid = self.next_pkid % self.space + 1;
            self.next_msg += 1;
            self.inflight.push_back((p, m));
            Some((p, m))
        }

        fn cut(&mut self) {
            self.wire.clear();
            self.rx.start_connection(self.rm);
            self.resend_pending = true;
        }

        fn step(&mut self, st: Step) {
            match st {
                Step::Send(n) => {
                    self.resend();
                    for _ in 0..n {
                        let Some((p, m)) = self.new_message() else {
                            break;
                        };
                        self.deliver(p, m, false);
                    }
                    self.durable.extend(self.rx.take_ops());
                }
                Step::SendLost => {
                    self.resend();
                    if self.new_message().is_some() {
                        self.cut();
                    }
                }
                Step::Ack(n) => {
                    for _ in 0..n {
                        let Some(p) = self.wire.pop_front() else {
                            break;
                        };
                        self.inflight.retain(|(q, _)| *q != p);
                    }
                }
                Step::Cut => self.cut(),
                Step::Crash => {
                    self.durable.extend(self.rx.take_ops());
                    let mut marks: Vec<(u16, u64)> = Vec::new();
                    let mut shape = Shape::default();
                    for op in &self.durable {
                        match op {
                            Op::Mark(p, d) => {
                                marks.retain(|(q, _)| q != p);
                                marks.push((*p, *d));
                            }
                            Op::Unmark(p) => marks.retain(|(q, _)| q != p),
                            Op::Shape(sh) => shape = *sh,
                            _ => {}
                        }
                    }
                    self.rx = SenderState::restore(marks, [], shape, self.retain);
                    self.cut();
                }
            }
        }
    }

    fn run_model(steps: Vec<Step>, window: u16, space: u16, v5: bool, identical: bool) -> Model {
        let retain = usize::from(space.min(4096)) + 16;
        let rm = if v5 { Some(window) } else { None };
        let mut rx = SenderState::new(true, retain);
        rx.start_connection(rm);
        let mut m = Model {
            rx,
            rm,
            retain,
            durable: Vec::new(),
            inflight: VecDeque::new(),
            wire: VecDeque::new(),
            next_msg: 0,
            next_pkid: 1,
            space,
            window,
            identical,
            accepted: HashMap::new(),
            possible_duplicates: 0,
            resend_pending: false,
        };
        for st in steps {
            m.step(st);
        }
        // Deliver whatever is still unacknowledged.
        m.step(Step::Cut);
        m.resend();
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, .. ProptestConfig::default() })]
        /// Distinct content, whatever the numbering: never lost; every extra
        /// copy counted (only before a proof holds); exactly once from a
        /// sequential sender.
        #[test]
        fn distinct_messages_are_never_lost_and_extra_copies_are_counted(
            steps in proptest::collection::vec(step(), 1..300),
            window in 1u16..16,
            extra in 0u16..48,
            sequential in any::<bool>(),
            v5 in any::<bool>(),
        ) {
            let space = if sequential { 65535 } else { window + extra };
            let m = run_model(steps, window, space, v5, false);
            prop_assert_eq!(m.accepted.len() as u64, m.next_msg, "every message was accepted");
            let extra_copies: u64 = m.accepted.values().map(|n| u64::from(*n) - 1).sum();
            prop_assert!(extra_copies <= m.possible_duplicates,
                "{} extra copies, {} counted", extra_copies, m.possible_duplicates);
        }

        /// Identical content: never lost; every extra copy counted as a
        /// possible duplicate.
        #[test]
        fn identical_messages_are_never_lost_and_extra_copies_are_counted(
            steps in proptest::collection::vec(step(), 1..300),
            window in 1u16..16,
            extra in 0u16..48,
            sequential in any::<bool>(),
            v5 in any::<bool>(),
        ) {
            let space = if sequential { 65535 } else { window + extra };
            let m = run_model(steps, window, space, v5, true);
            prop_assert_eq!(m.accepted.len() as u64, m.next_msg, "every message was accepted");
            let extra_copies: u64 = m.accepted.values().map(|n| u64::from(*n) - 1).sum();
            prop_assert!(extra_copies <= m.possible_duplicates,
                "{} extra copies, {} counted", extra_copies, m.possible_duplicates);
        }
    }

    #[test]
    fn the_digest_separates_topic_from_payload() {
        assert_ne!(digest(b"a", b"bc"), digest(b"ab", b"c"));
        assert_eq!(digest(b"t", b"1"), digest(b"t", b"1"));
    }
}
