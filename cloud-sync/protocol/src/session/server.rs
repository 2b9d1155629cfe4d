//! The aggregator's side of one connection, without I/O.
//!
//! `Hello` first (version checked), then the store's cursor is asked for
//! ([`ServerAction::ReadCursor`]) and answered with `Welcome`. Batches of a
//! node before version 4 must start after the previous one; from version 4
//! they may come in any seq order, their floors never going down. They queue until the store is free and are
//! then applied together ([`ServerAction::Apply`], group apply); only the
//! store's answer ([`ServerSession::handle_applied`]) produces an `Ack`. A
//! `Ping` is answered at once, whatever the store is doing, so the edge can
//! tell a slow aggregator from a dead one.
//!
//! **Invariants** (ARCHITECTURE.md I-10, I-14, I-20):
//! - `Ack{up_to, applied}` is sent only after the store reported a commit
//!   holding every batch of this connection up to the `applied`th, and the
//!   cursor `up_to` (below the last batch's floor: everything below it was
//!   applied before or will never be sent).
//! - At most one apply per session is outstanding; batches received
//!   meanwhile wait and go together into the next one.
//! - Batches held (received, not yet applied) never cost more than
//!   `max_pending_bytes` of memory (counted by [`BatchFrame::memory_bytes`])
//!   beyond the one batch that crosses it: [`ServerSession::wants_read`]
//!   turns false and the driver stops reading, so the peer is held back by
//!   flow control.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{regression, OutboxInfo, Regression, StoredCursor};
use crate::frame::{BatchFrame, ErrorCode, Frame};
use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Policy knobs of a server session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// `Hello` must arrive within this.
    pub hello_timeout: Duration,
    /// Nothing heard from a node that pings (version ≥ 3) for this long: close.
    pub idle_timeout: Duration,
    /// Memory of batches held per connection before reading pauses.
    pub max_pending_bytes: usize,
    /// Most records in one apply.
    pub group_records: usize,
    /// Most batch memory in one apply.
    pub group_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(180),
            max_pending_bytes: 64 * 1024 * 1024,
            group_records: 32 * 1024,
            group_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Batches to decode and apply in one store transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyRequest {
    /// In the order received.
    pub batches: Vec<BatchFrame>,
    /// The node's cursor as this session knows it: records at or below it
    /// are already applied (the store checks again inside its transaction).
    pub cursor: u64,
    /// The last batch's floor minus one: the cursor after the apply is
    /// `max(cursor, through)`. Records above it may already be stored
    /// (sent out of order before a reconnect): the store ignores those.
    pub through: u64,
    /// The edge outbox's incarnation and epoch, recorded with the cursor.
    pub outbox: (u64, u64),
    /// Records in the batches.
    pub records: usize,
    /// Their memory, by [`BatchFrame::memory_bytes`] (for shared budgets).
    pub memory_bytes: usize,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAction {
    /// Write this frame.
    Send(Frame),
    /// Read the node's cursor from the store (holding the node's apply
    /// lock) and hand it to [`ServerSession::handle_cursor`].
    ReadCursor,
    /// Record in the store, before anything else, that these acknowledged
    /// records of this node were lost (ARCHITECTURE.md I-9).
    RecordGap(Regression),
    /// Decode the batches (on a blocking thread) and apply them in one
    /// transaction, then call [`ServerSession::handle_applied`].
    Apply(ApplyRequest),
    /// The node said how it is (protocol 5): keep it for the fleet view.
    Status(crate::status::NodeStatus),
    /// The session is over: send `Error{code, reason}` where the transport
    /// needs it and close the connection with `code`.
    Close {
        /// Why.
        code: ErrorCode,
        /// Human-readable detail.
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    ReadingCursor {
        hello: OutboxInfo,
    },
    Active {
        cursor: u64,
        outbox: (u64, u64),
        prev_last: Option<u64>,
        floor: u64,
    },
    Closed,
}

/// The aggregator's side of one connection.
#[derive(Debug)]
pub struct ServerSession {
    node_id: String,
    cfg: ServerConfig,
    phase: Phase,
    version: Option<u32>,
    actions: VecDeque<ServerAction>,
    pending: VecDeque<BatchFrame>,
    /// Memory of pending and applying batches.
    held_bytes: usize,
    /// Memory and number of the batches being applied.
    applying: Option<(usize, u64)>,
    /// Batches of this connection applied.
    applied: u64,
    created: Instant,
    last_heard: Instant,
}

impl ServerSession {
    /// A session for the node authenticated as `node_id`.
    pub fn new(node_id: impl Into<String>, cfg: ServerConfig, now: Instant) -> Self {
        Self {
            node_id: node_id.into(),
            cfg,
            phase: Phase::AwaitHello,
            version: None,
            actions: VecDeque::new(),
            pending: VecDeque::new(),
            held_bytes: 0,
            applying: None,
            applied: 0,
            created: now,
            last_heard: now,
        }
    }

    /// The authenticated node.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The version the node's `Hello` announced (frames after it are
    /// decoded with that version's layout).
    pub fn peer_version(&self) -> Option<u32> {
        self.version
    }

    /// The outbox incarnation and epoch this session applies for.
    pub fn outbox(&self) -> Option<(u64, u64)> {
        match self.phase {
            Phase::Active { outbox, .. } => Some(outbox),
            _ => None,
        }
    }

    /// The node's cursor as this session knows it.
    pub fn cursor(&self) -> Option<u64> {
        match self.phase {
            Phase::Active { cursor, .. } => Some(cursor),
            _ => None,
        }
    }

    /// Memory of the batches held (received, not yet acknowledged).
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Should the driver read more from the connection? False while the
    /// held batches fill the budget: the peer is then held back by flow
    /// control.
    pub fn wants_read(&self) -> bool {
        self.phase != Phase::Closed && self.held_bytes < self.cfg.max_pending_bytes
    }

    /// Has the session ended?
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<ServerAction> {
        self.actions.pop_front()
    }

    /// When to call [`Self::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Closed => None,
            Phase::AwaitHello => Some(self.created + self.cfg.hello_timeout),
            _ if self.pings() => Some(self.last_heard + self.cfg.idle_timeout),
            _ => None,
        }
    }

    /// A frame from the node.
    pub fn handle_frame(&mut self, frame: Frame, now: Instant) {
        if self.is_closed() {
            return;
        }
        self.last_heard = now;
        match (frame, self.phase) {
            (Frame::Ping { nonce }, _) => self.send(Frame::Pong { nonce }),
            (Frame::Pong { .. }, _) => {}
            (Frame::Status(status), Phase::Active { .. }) => {
                self.actions.push_back(ServerAction::Status(status));
            }
            (
                Frame::Hello {
                    protocol_version,
                    incarnation,
                    next_seq,
                    acked,
                    epoch,
                    epoch_start,
                    ..
                },
                Phase::AwaitHello,
            ) => {
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&protocol_version) {
                    self.close(
                        ErrorCode::UnsupportedVersion,
                        format!("node speaks protocol version {protocol_version}, this aggregator speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}"),
                    );
                    return;
                }
                self.version = Some(protocol_version);
                self.phase = Phase::ReadingCursor {
                    hello: OutboxInfo {
                        incarnation,
                        next_seq,
                        acked,
                        epoch,
                        epoch_start,
                    },
                };
                self.actions.push_back(ServerAction::ReadCursor);
            }
            (
                Frame::Batch(batch),
                Phase::Active {
                    prev_last, floor, ..
                },
            ) => {
                if batch.last_seq < batch.first_seq {
                    self.close(
                        ErrorCode::ProtocolViolation,
                        format!(
                            "batch last_seq {} is below first_seq {}",
                            batch.last_seq, batch.first_seq
                        ),
                    );
                    return;
                }
                let in_order = self.version.is_none_or(|v| v < 4);
                if let Some(prev) = prev_last.filter(|p| in_order && batch.first_seq <= *p) {
                    self.close(
                        ErrorCode::ProtocolViolation,
                        format!(
                            "batch {}..={} does not start after the previous batch (last seq {prev})",
                            batch.first_seq, batch.last_seq
                        ),
                    );
                    return;
                }
                if batch.floor < floor {
                    self.close(
                        ErrorCode::ProtocolViolation,
                        format!(
                            "batch {}..={} has floor {}, below the previous batch's {floor}",
                            batch.first_seq, batch.last_seq, batch.floor
                        ),
                    );
                    return;
                }
                if let Phase::Active {
                    prev_last, floor, ..
                } = &mut self.phase
                {
                    *prev_last = Some(batch.last_seq);
                    *floor = batch.floor;
                }
                self.held_bytes += batch.memory_bytes();
                self.pending.push_back(batch);
                self.maybe_apply();
            }
            (Frame::Error { code, message }, _) => {
                // The node is closing; nothing to answer.
                self.phase = Phase::Closed;
                self.actions.push_back(ServerAction::Close {
                    code: ErrorCode::Ok,
                    reason: format!("node closed with {code}: {message}"),
                });
            }
            (other, phase) => {
                let state = match phase {
                    Phase::AwaitHello => "before Hello",
                    Phase::ReadingCursor { .. } => "before Welcome",
                    _ => "from a node",
                };
                self.close(
                    ErrorCode::ProtocolViolation,
                    format!("unexpected {} frame {state}", other.kind()),
                );
            }
        }
    }

    /// The store's answer to [`ServerAction::ReadCursor`].
    pub fn handle_cursor(&mut self, stored: Result<StoredCursor, String>, _now: Instant) {
        let Phase::ReadingCursor { hello } = self.phase else {
            return;
        };
        let stored = match stored {
            Ok(s) => s,
            Err(e) => {
                self.close(ErrorCode::Internal, format!("store: {e}"));
                return;
            }
        };
        if let Some(r) = regression(stored, hello) {
            self.actions.push_back(ServerAction::RecordGap(r));
        }
        self.phase = Phase::Active {
            cursor: stored.seq,
            outbox: (hello.incarnation, hello.epoch),
            prev_last: None,
            floor: 0,
        };
        self.send(Frame::Welcome {
            node_id: self.node_id.clone(),
            cursor: stored.seq,
            incarnation: stored.incarnation.unwrap_or(0),
            epoch: stored.epoch,
            top: self.counts_batches().then_some(stored.top()),
            version: self.version.filter(|v| *v >= 5).map(|_| PROTOCOL_VERSION),
        });
    }

    /// The store's answer to [`ServerAction::Apply`]: the node's cursor
    /// after the commit, or why it failed (the session then closes; the
    /// node resends from the cursor on its next connection).
    pub fn handle_applied(&mut self, result: Result<u64, String>, _now: Instant) {
        let Some((bytes, batches)) = self.applying.take() else {
            return;
        };
        self.held_bytes = self.held_bytes.saturating_sub(bytes);
        if self.is_closed() {
            return;
        }
        match result {
            Ok(committed) => {
                let up_to = match &mut self.phase {
                    Phase::Active { cursor, .. } => {
                        *cursor = (*cursor).max(committed);
                        *cursor
                    }
                    _ => return,
                };
                self.applied += batches;
                let applied = self.counts_batches().then_some(self.applied);
                self.send(Frame::Ack { up_to, applied });
                self.maybe_apply();
            }
            Err(e) => self.close(ErrorCode::Internal, format!("store: {e}")),
        }
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Closed => {}
            Phase::AwaitHello => {
                if now >= self.created + self.cfg.hello_timeout {
                    self.close(
                        ErrorCode::ProtocolViolation,
                        format!("no Hello within {:?}", self.cfg.hello_timeout),
                    );
                }
            }
            _ => {
                let silent = now.saturating_duration_since(self.last_heard);
                if self.pings() && silent >= self.cfg.idle_timeout {
                    self.close(
                        ErrorCode::Timeout,
                        format!("nothing heard from the node for {silent:?}"),
                    );
                }
            }
        }
    }

    /// Ends the session from this side.
    pub fn close(&mut self, code: ErrorCode, reason: String) {
        if self.is_closed() {
            return;
        }
        self.phase = Phase::Closed;
        self.actions.push_back(ServerAction::Close { code, reason });
    }

    /// Nodes from version 4 on may send out of order: their acks count
    /// batches, their Welcome names the highest seq stored.
    fn counts_batches(&self) -> bool {
        self.version.is_some_and(|v| v >= 4)
    }

    /// Nodes from version 3 on ping when idle; older ones rely on QUIC.
    fn pings(&self) -> bool {
        self.version.is_some_and(|v| v >= 3)
    }

    fn send(&mut self, frame: Frame) {
        self.actions.push_back(ServerAction::Send(frame));
    }

    fn maybe_apply(&mut self) {
        let Phase::Active { cursor, outbox, .. } = self.phase else {
            return;
        };
        if self.applying.is_some() || self.pending.is_empty() {
            return;
        }
        let mut batches = Vec::new();
        let (mut records, mut bytes) = (0usize, 0usize);
        while let Some(next) = self.pending.front() {
            let (r, b) = (next.record_count as usize, next.memory_bytes());
            if !batches.is_empty()
                && (records + r > self.cfg.group_records || bytes + b > self.cfg.group_bytes)
            {
                break;
            }
            records += r;
            bytes += b;
            if let Some(batch) = self.pending.pop_front() {
                batches.push(batch);
            }
        }
        let through = batches
            .last()
            .map_or(cursor, |b| b.floor.saturating_sub(1))
            .max(cursor);
        self.applying = Some((bytes, batches.len() as u64));
        self.actions.push_back(ServerAction::Apply(ApplyRequest {
            batches,
            cursor,
            through,
            outbox,
            records,
            memory_bytes: bytes,
        }));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::batch::encode_batch;
    use crate::batch::tests::readings;

    fn hello(version: u32, acked: u64) -> Frame {
        Frame::Hello {
            protocol_version: version,
            agent: "t".into(),
            incarnation: 77,
            next_seq: 21,
            acked,
            epoch: 4,
            epoch_start: 6,
        }
    }

    fn actions(s: &mut ServerSession) -> Vec<ServerAction> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn active(cfg: ServerConfig, cursor: u64, t0: Instant) -> ServerSession {
        active_v(PROTOCOL_VERSION, cfg, cursor, t0)
    }

    fn active_v(version: u32, cfg: ServerConfig, cursor: u64, t0: Instant) -> ServerSession {
        let mut s = ServerSession::new("n1", cfg, t0);
        s.handle_frame(hello(version, cursor), t0);
        assert_eq!(actions(&mut s), vec![ServerAction::ReadCursor]);
        let stored = StoredCursor {
            seq: cursor,
            incarnation: Some(77),
            epoch: 3,
            top: 0,
        };
        s.handle_cursor(Ok(stored), t0);
        assert_eq!(
            actions(&mut s),
            vec![ServerAction::Send(Frame::Welcome {
                node_id: "n1".into(),
                cursor,
                incarnation: 77,
                epoch: 3,
                top: (version >= 4).then_some(cursor),
                version: (version >= 5).then_some(crate::PROTOCOL_VERSION),
            })]
        );
        s
    }

    #[test]
    fn batches_in_order_are_grouped_while_the_store_is_busy_and_acked_after_it() {
        let t0 = Instant::now();
        let records = readings(30, 2);
        let b = |r: std::ops::Range<usize>| encode_batch(&records[r], 3).unwrap();
        let mut s = active(ServerConfig::default(), 5, t0);
        s.handle_frame(Frame::Batch(b(0..10)), t0);
        let first = actions(&mut s);
        let [ServerAction::Apply(req)] = first.as_slice() else {
            panic!("{first:?}")
        };
        assert_eq!((req.cursor, req.through, req.outbox), (5, 10, (77, 4)));
        // While it applies, two more arrive: no apply yet, pings answered.
        s.handle_frame(Frame::Batch(b(10..20)), t0);
        s.handle_frame(Frame::Ping { nonce: 9 }, t0);
        s.handle_frame(Frame::Batch(b(20..30)), t0);
        assert_eq!(
            actions(&mut s),
            vec![ServerAction::Send(Frame::Pong { nonce: 9 })]
        );
        assert!(s.held_bytes() > 0);
        s.handle_applied(Ok(10), t0);
        let next = actions(&mut s);
        assert_eq!(
            next[0],
            ServerAction::Send(Frame::Ack {
                up_to: 10,
                applied: Some(1)
            })
        );
        let ServerAction::Apply(req) = &next[1] else {
            panic!("{next:?}")
        };
        assert_eq!((req.batches.len(), req.records, req.through), (2, 20, 30));
        s.handle_applied(Ok(30), t0);
        assert_eq!(
            actions(&mut s),
            vec![ServerAction::Send(Frame::Ack {
                up_to: 30,
                applied: Some(3)
            })]
        );
        assert_eq!(s.held_bytes(), 0);
    }

    #[test]
    fn version_4_batches_come_in_any_seq_order_and_move_the_cursor_to_their_floor() {
        let t0 = Instant::now();
        let records = readings(30, 2);
        let b = |r: std::ops::Range<usize>, floor: u64| BatchFrame {
            floor,
            ..encode_batch(&records[r], 3).unwrap()
        };
        let mut s = active(ServerConfig::default(), 0, t0);
        // Seqs 21..=30 first (alerts), while 1..=20 wait: the cursor stays.
        s.handle_frame(Frame::Batch(b(20..30, 1)), t0);
        let a = actions(&mut s);
        let [ServerAction::Apply(req)] = a.as_slice() else {
            panic!("{a:?}")
        };
        assert_eq!(req.through, 0);
        s.handle_applied(Ok(0), t0);
        assert_eq!(
            actions(&mut s),
            vec![ServerAction::Send(Frame::Ack {
                up_to: 0,
                applied: Some(1)
            })]
        );
        s.handle_frame(Frame::Batch(b(0..20, 31)), t0);
        let a = actions(&mut s);
        let [ServerAction::Apply(req)] = a.as_slice() else {
            panic!("{a:?}")
        };
        assert_eq!(req.through, 30);
        s.handle_applied(Ok(30), t0);
        actions(&mut s);
        // A floor going down breaks the protocol.
        s.handle_frame(Frame::Batch(b(0..5, 7)), t0);
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ServerAction::Close {
                code: ErrorCode::ProtocolViolation,
                ..
            }]
        ));
        // Older nodes get neither `applied` nor `top`, and must keep order.
        let mut s = active_v(3, ServerConfig::default(), 0, t0);
        s.handle_frame(Frame::Batch(b(20..30, 31)), t0);
        actions(&mut s);
        s.handle_applied(Ok(30), t0);
        assert_eq!(
            actions(&mut s),
            vec![ServerAction::Send(Frame::Ack {
                up_to: 30,
                applied: None
            })]
        );
        s.handle_frame(Frame::Batch(b(0..20, 31)), t0);
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ServerAction::Close {
                code: ErrorCode::ProtocolViolation,
                ..
            }]
        ));
    }

    #[test]
    fn out_of_order_batches_unsupported_versions_and_early_batches_close() {
        let t0 = Instant::now();
        let records = readings(20, 2);
        let b1 = encode_batch(&records[..10], 3).unwrap();
        let mut s = ServerSession::new("n1", ServerConfig::default(), t0);
        s.handle_frame(Frame::Batch(b1.clone()), t0);
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ServerAction::Close {
                code: ErrorCode::ProtocolViolation,
                ..
            }]
        ));
        let mut s = ServerSession::new("n1", ServerConfig::default(), t0);
        s.handle_frame(hello(1, 0), t0);
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ServerAction::Close {
                code: ErrorCode::UnsupportedVersion,
                ..
            }]
        ));
        let mut s = active_v(3, ServerConfig::default(), 0, t0);
        s.handle_frame(Frame::Batch(b1.clone()), t0);
        s.handle_frame(Frame::Batch(b1), t0);
        let a = actions(&mut s);
        assert!(
            matches!(
                a.last(),
                Some(ServerAction::Close {
                    code: ErrorCode::ProtocolViolation,
                    ..
                })
            ),
            "{a:?}"
        );
        // Version 2 nodes are still served.
        let mut s = ServerSession::new("n1", ServerConfig::default(), t0);
        s.handle_frame(hello(2, 0), t0);
        assert_eq!(s.peer_version(), Some(2));
        assert_eq!(actions(&mut s), vec![ServerAction::ReadCursor]);
    }

    #[test]
    fn a_store_behind_its_own_acknowledgements_records_a_gap_before_welcome() {
        let t0 = Instant::now();
        let mut s = ServerSession::new("n1", ServerConfig::default(), t0);
        s.handle_frame(hello(PROTOCOL_VERSION, 250), t0);
        actions(&mut s);
        let behind = StoredCursor {
            seq: 200,
            incarnation: Some(77),
            epoch: 0,
            top: 0,
        };
        s.handle_cursor(Ok(behind), t0);
        let a = actions(&mut s);
        assert_eq!(
            a[0],
            ServerAction::RecordGap(Regression { from: 201, to: 250 })
        );
        assert!(matches!(
            a[1],
            ServerAction::Send(Frame::Welcome { cursor: 200, .. })
        ));
        // Another outbox's cursor says nothing about this one.
        let other = StoredCursor {
            seq: 200,
            incarnation: Some(8),
            epoch: 0,
            top: 0,
        };
        let info = OutboxInfo {
            incarnation: 77,
            acked: 250,
            ..OutboxInfo::default()
        };
        assert_eq!(regression(other, info), None);
        // A store that lost the node altogether (deleted): the gap is
        // everything this outbox was acknowledged, as the edge sees it.
        assert_eq!(
            regression(StoredCursor::default(), info),
            Some(Regression { from: 1, to: 250 })
        );
        let fresh = OutboxInfo {
            incarnation: 77,
            acked: 0,
            ..OutboxInfo::default()
        };
        assert_eq!(regression(StoredCursor::default(), fresh), None);
    }

    #[test]
    fn reading_pauses_while_held_batches_fill_the_budget() {
        let t0 = Instant::now();
        let records = readings(40, 2);
        let cfg = ServerConfig {
            max_pending_bytes: 1,
            ..ServerConfig::default()
        };
        let mut s = active(cfg, 0, t0);
        assert!(s.wants_read());
        s.handle_frame(Frame::Batch(encode_batch(&records[..10], 3).unwrap()), t0);
        assert!(!s.wants_read());
        actions(&mut s);
        s.handle_applied(Ok(10), t0);
        assert!(s.wants_read());
    }

    #[test]
    fn silence_store_failures_and_missing_hello_close() {
        let t0 = Instant::now();
        let mut s = ServerSession::new("n1", ServerConfig::default(), t0);
        s.handle_timeout(t0 + Duration::from_secs(10));
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ServerAction::Close {
                code: ErrorCode::ProtocolViolation,
                ..
            }]
        ));
        let mut s = active(ServerConfig::default(), 0, t0);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(180)));
        s.handle_timeout(t0 + Duration::from_secs(180));
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ServerAction::Close {
                code: ErrorCode::Timeout,
                ..
            }]
        ));
        let records = readings(10, 2);
        let mut s = active(ServerConfig::default(), 0, t0);
        s.handle_frame(Frame::Batch(encode_batch(&records, 3).unwrap()), t0);
        actions(&mut s);
        s.handle_applied(Err("disk full".into()), t0);
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ServerAction::Close {
                code: ErrorCode::Internal,
                ..
            }]
        ));
    }
}
