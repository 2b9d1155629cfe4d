//! The edge's side of one connection, without I/O.
//!
//! Life of a session: `Hello` goes out at once; the `Welcome` is checked
//! against the outbox ([`reconcile`]) and the outbox is told how to resume
//! ([`ClientAction::Resume`]); then the window is kept full from the outbox
//! ([`ClientAction::Read`] → [`ClientSession::handle_read`] → `Batch`), acks
//! release it and, in bulk, delete what they cover ([`ClientAction::Delete`]).
//!
//! Liveness, all measured from the last frame heard:
//! - **expecting an answer** (a batch or a ping outstanding): after
//!   `probe_after / 2` of silence a `Ping` goes out; after `probe_after` the
//!   driver is asked to try a fresh connection alongside
//!   ([`ClientAction::Probe`], again every `probe_after`) — that is how an
//!   aggregator restart is found within a second even when the old path is
//!   stuck in retransmission backoff; after `silence_timeout` the session is
//!   declared dead.
//! - **idle**: a `Ping` after `keepalive` of quiet both ways.
//! - **stall**: pongs come back but no ack moves for `stall_timeout` with
//!   batches in flight — connected but stuck is a failure too.
//!
//! **Invariants** (ARCHITECTURE.md I-7, I-8, I-18):
//! - A `Delete` never goes beyond an `Ack` of this session or a cursor the
//!   outbox accepted through `Resume`.
//! - Every batch starts after everything sent or acknowledged before it; an
//!   ack below the previous one or beyond what was sent closes the session.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::resume::{reconcile, Resume, Welcomed};
use super::window::{InFlight, Window};
use super::OutboxInfo;
use crate::frame::{BatchFrame, ErrorCode, Frame};
use crate::PROTOCOL_VERSION;

/// Policy knobs of a client session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Batches in flight.
    pub window: usize,
    /// Most records per batch.
    pub batch_records: usize,
    /// Most payload bytes per batch.
    pub batch_bytes: usize,
    /// `Welcome` must arrive within this.
    pub handshake_timeout: Duration,
    /// Expecting an answer and silent this long: ping at half of it, try a
    /// fresh connection at it.
    pub probe_after: Duration,
    /// Expecting an answer and silent this long: the connection is dead.
    pub silence_timeout: Duration,
    /// Quiet both ways this long: ping (keeps NAT bindings and finds a dead
    /// path while idle).
    pub keepalive: Duration,
    /// Batches in flight, the aggregator answers pings, but no ack moved for
    /// this long: stalled.
    pub stall_timeout: Duration,
    /// With batches in flight, a read that would yield less than a quarter
    /// of `batch_records` waits this long for more.
    pub coalesce_wait: Duration,
    /// Delete acknowledged rows once this many are pending...
    pub delete_batch: u64,
    /// ...or this long after the first one.
    pub delete_every: Duration,
    /// Sent in `Hello`, for the aggregator's logs.
    pub agent: String,
    /// The outbox sends out of seq order (drain priorities, live data
    /// first): how many records wait cannot be told from seqs, so reads are
    /// never held back to gather more.
    pub out_of_order: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            window: 16,
            batch_records: 4096,
            batch_bytes: 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            probe_after: Duration::from_secs(1),
            silence_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(15),
            coalesce_wait: Duration::from_millis(5),
            delete_batch: 16_384,
            delete_every: Duration::from_millis(200),
            agent: String::from("fogline"),
            out_of_order: false,
        }
    }
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAction {
    /// Write this frame.
    Send(Frame),
    /// Apply the aggregator's cursor to the outbox as decided (delete
    /// through it, raise an alarm, renumber, take a new incarnation: see
    /// [`Resume`]), then call [`ClientSession::handle_resumed`].
    Resume {
        /// What to do.
        decision: Resume,
        /// The aggregator's cursor.
        cursor: u64,
        /// The highest seq it stores for this node (≥ `cursor`): renumbering
        /// moves records above this.
        top: u64,
    },
    /// Read records after `after` from the outbox (or, sending out of
    /// order, the next the drain plan picks), at most `max_records` and
    /// `max_bytes` of payload, encode them as one batch and hand it to
    /// [`ClientSession::handle_read`] (`None` when there are none).
    Read {
        /// Highest seq already sent or acknowledged.
        after: u64,
        /// Most records.
        max_records: usize,
        /// Most payload bytes.
        max_bytes: usize,
    },
    /// Delete outbox rows through this seq, and the records of the first
    /// `batches` batches this session sent: the aggregator acknowledged them.
    Delete {
        /// Last seq to delete.
        through: u64,
        /// Batches of this session acknowledged so far (cumulative).
        batches: u64,
    },
    /// Try a fresh connection to the same aggregator alongside this one; if
    /// it completes its handshake before this session hears anything, move
    /// over to it.
    Probe,
    /// The aggregator asks for a deployment (protocol 6): hand it to the
    /// node's deployer, which applies each `(rollout, action)` once.
    Deploy(crate::deploy::DeployFrame),
    /// The session is over: close the connection with `reason.code()`.
    Close(CloseReason),
}

/// Why a client session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// The outbox took a new incarnation; reconnect at once to announce it.
    #[error("the outbox took a new incarnation; reconnecting to announce it")]
    Renewed,
    /// No `Welcome` in time.
    #[error("no Welcome within {after:?}")]
    HandshakeTimeout {
        /// How long we waited.
        after: Duration,
    },
    /// Nothing heard while waiting for an answer.
    #[error("nothing heard from the aggregator for {after:?} while waiting for an answer")]
    Silent {
        /// How long it was silent.
        after: Duration,
    },
    /// Alive but not applying.
    #[error("no acknowledgement for {after:?} with {in_flight} batches in flight (acknowledged through seq {acked}): the aggregator answers but does not apply")]
    Stalled {
        /// How long without progress.
        after: Duration,
        /// The cumulative ack.
        acked: u64,
        /// Batches in flight.
        in_flight: usize,
    },
    /// The aggregator closed the session.
    #[error("the aggregator closed the session: {code}: {message}")]
    Peer {
        /// Its code.
        code: ErrorCode,
        /// Its text.
        message: String,
    },
    /// The aggregator broke the protocol.
    #[error("the aggregator broke the protocol: {detail}")]
    Violation {
        /// What it did.
        detail: String,
    },
    /// This side failed (the outbox handed out a batch the window refuses).
    #[error("{detail}")]
    Local {
        /// What failed.
        detail: String,
    },
}

impl CloseReason {
    /// The code to close the connection with.
    pub fn code(&self) -> ErrorCode {
        match self {
            CloseReason::Renewed | CloseReason::Peer { .. } => ErrorCode::Ok,
            CloseReason::HandshakeTimeout { .. }
            | CloseReason::Silent { .. }
            | CloseReason::Stalled { .. } => ErrorCode::Timeout,
            CloseReason::Violation { .. } => ErrorCode::ProtocolViolation,
            CloseReason::Local { .. } => ErrorCode::Internal,
        }
    }

    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::Renewed => "renewed",
            CloseReason::HandshakeTimeout { .. } => "handshake_timeout",
            CloseReason::Silent { .. } => "silent",
            CloseReason::Stalled { .. } => "stalled",
            CloseReason::Peer { .. } => "closed_by_aggregator",
            CloseReason::Violation { .. } => "protocol_violation",
            CloseReason::Local { .. } => "local",
        }
    }
}

/// Counters of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// The cumulative ack (or the Welcome cursor).
    pub acked: u64,
    /// Batches sent.
    pub batches_sent: u64,
    /// Records sent.
    pub records_sent: u64,
    /// Records newly acknowledged.
    pub records_acked: u64,
    /// Pings sent.
    pub pings: u64,
    /// Fresh connections asked for while silent.
    pub probes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitWelcome,
    Resuming { decision: Resume, cursor: u64 },
    Active,
    Closed,
}

/// The edge's side of one connection.
#[derive(Debug)]
pub struct ClientSession {
    cfg: ClientConfig,
    outbox: OutboxInfo,
    phase: Phase,
    node_id: Option<String>,
    /// The aggregator's protocol version, from `Welcome` (5 and later).
    server_version: Option<u32>,
    actions: VecDeque<ClientAction>,
    window: Window,
    created: Instant,
    last_heard: Instant,
    last_sent: Instant,
    /// Since when an answer has been awaited with nothing heard.
    expecting_since: Option<Instant>,
    ping: Option<u64>,
    next_nonce: u64,
    next_probe: Option<Instant>,
    last_progress: Instant,
    reading: bool,
    /// A commit notice came while a read was out: that read may have looked
    /// before the commit was visible, so an empty answer proves nothing.
    committed_while_reading: bool,
    drained: bool,
    /// Highest seq known to be committed in the outbox.
    committed: u64,
    coalescing: Option<Instant>,
    /// Since when acknowledged records wait for their delete.
    delete_pending: Option<Instant>,
    /// Records acknowledged since the last delete.
    delete_records: u64,
    deleted_through: u64,
    deleted_batches: u64,
    stats: ClientStats,
}

impl ClientSession {
    /// A session on a connection that is up: `Hello` describing `outbox` is
    /// the first action.
    pub fn new(cfg: ClientConfig, outbox: OutboxInfo, now: Instant) -> Self {
        let hello = Frame::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent: cfg.agent.clone(),
            incarnation: outbox.incarnation,
            next_seq: outbox.next_seq,
            acked: outbox.acked,
            epoch: outbox.epoch,
            epoch_start: outbox.epoch_start,
        };
        let window = Window::new(0, cfg.window);
        let mut s = Self {
            cfg,
            outbox,
            phase: Phase::AwaitWelcome,
            node_id: None,
            server_version: None,
            actions: VecDeque::new(),
            window,
            created: now,
            last_heard: now,
            last_sent: now,
            expecting_since: Some(now),
            ping: None,
            next_nonce: 1,
            next_probe: None,
            last_progress: now,
            reading: false,
            committed_while_reading: false,
            drained: false,
            committed: outbox.next_seq.saturating_sub(1),
            coalescing: None,
            delete_pending: None,
            delete_records: 0,
            deleted_through: 0,
            deleted_batches: 0,
            stats: ClientStats::default(),
        };
        s.send(hello, now);
        s
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<ClientAction> {
        self.actions.pop_front()
    }

    /// When to call [`Self::handle_timeout`] next (`None`: no timer).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = Timer::default();
        match self.phase {
            Phase::Closed => return None,
            Phase::AwaitWelcome => t.at(self.created + self.cfg.handshake_timeout),
            // The outbox is busy with the cursor: nothing is due from us.
            Phase::Resuming { .. } => {}
            Phase::Active => {
                match self.expecting_since {
                    Some(since) => {
                        t.at(since + self.cfg.silence_timeout);
                        if self.ping.is_none() {
                            t.at(since + self.cfg.probe_after / 2);
                        }
                        t.at_opt(self.next_probe);
                    }
                    None => t.at(self.last_heard.max(self.last_sent) + self.cfg.keepalive),
                }
                if !self.window_empty() {
                    t.at(self.last_progress + self.cfg.stall_timeout);
                }
                if !self.reading {
                    t.at_opt(self.coalescing.map(|c| c + self.cfg.coalesce_wait));
                }
                t.at_opt(self.delete_pending.map(|s| s + self.cfg.delete_every));
            }
        }
        t.0
    }

    /// Has the session ended? (Its last action is a `Close`.)
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Is it past the handshake and the resume?
    pub fn is_active(&self) -> bool {
        self.phase == Phase::Active
    }

    /// The node id the aggregator read from our certificate (after `Welcome`).
    pub fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    /// Sends the node's status, if the session is active and the
    /// aggregator speaks protocol 5 (an older one would call the frame
    /// malformed). Returns whether it was queued.
    pub fn send_status(&mut self, status: crate::status::NodeStatus, now: Instant) -> bool {
        if !self.is_active() || self.server_version.is_none_or(|v| v < 5) {
            return false;
        }
        self.send(Frame::Status(status), now);
        true
    }

    /// Counters.
    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    /// Batches in flight.
    pub fn in_flight(&self) -> usize {
        self.window.in_flight().count()
    }

    /// Highest seq written to the link.
    pub fn last_sent_seq(&self) -> u64 {
        self.window.last_sent()
    }

    /// Since when the session has been waiting for an answer with nothing
    /// heard (for status).
    pub fn silent_since(&self) -> Option<Instant> {
        self.expecting_since
    }

    /// A frame from the aggregator.
    pub fn handle_frame(&mut self, frame: Frame, now: Instant) {
        if self.is_closed() {
            return;
        }
        self.last_heard = now;
        match frame {
            Frame::Welcome {
                node_id,
                cursor,
                incarnation,
                epoch,
                top,
                version,
            } if self.phase == Phase::AwaitWelcome => {
                self.node_id = Some(node_id);
                self.server_version = version;
                let welcomed = Welcomed {
                    cursor,
                    incarnation,
                    epoch,
                    top: top.unwrap_or(cursor).max(cursor),
                };
                let decision = reconcile(self.outbox, welcomed);
                self.phase = Phase::Resuming { decision, cursor };
                self.actions.push_back(ClientAction::Resume {
                    decision,
                    cursor,
                    top: welcomed.top,
                });
            }
            Frame::Ack { up_to, applied } if self.phase == Phase::Active => {
                self.on_ack(up_to, applied, now)
            }
            Frame::Pong { nonce } => {
                if self.ping == Some(nonce) {
                    self.ping = None;
                }
            }
            Frame::Ping { nonce } => self.send(Frame::Pong { nonce }, now),
            // After the Welcome (a v6 aggregator may send it before the
            // outbox has resumed: it does not touch the outbox).
            Frame::Deploy(d) if self.phase != Phase::AwaitWelcome => {
                self.actions.push_back(ClientAction::Deploy(d))
            }
            Frame::Error { code, message } => {
                self.close(CloseReason::Peer { code, message });
                return;
            }
            other => {
                self.close(CloseReason::Violation {
                    detail: format!("unexpected {} frame", other.kind()),
                });
                return;
            }
        }
        self.heard(now);
        self.pump(now);
    }

    /// The outbox carried out a [`ClientAction::Resume`]; it now numbers its
    /// next record `next_seq`.
    pub fn handle_resumed(&mut self, next_seq: u64, now: Instant) {
        let Phase::Resuming { decision, cursor } = self.phase else {
            return;
        };
        if decision == Resume::Ahead {
            self.close(CloseReason::Renewed);
            return;
        }
        self.phase = Phase::Active;
        self.window = Window::new(cursor, self.cfg.window);
        self.committed = next_seq.saturating_sub(1);
        self.drained = false;
        self.stats.acked = cursor;
        self.deleted_through = cursor;
        self.deleted_batches = 0;
        self.delete_records = 0;
        self.delete_pending = None;
        self.last_progress = now;
        self.pump(now);
    }

    /// The answer to a [`ClientAction::Read`]: one encoded batch, or `None`
    /// when the outbox holds nothing after the seq asked for.
    pub fn handle_read(&mut self, batch: Option<BatchFrame>, now: Instant) {
        self.reading = false;
        if self.phase != Phase::Active {
            return;
        }
        let Some(batch) = batch else {
            if std::mem::take(&mut self.committed_while_reading) {
                // The read may have begun before that commit was visible:
                // look again (once per notice, so a stale notice cannot spin).
                self.drained = false;
                self.pump(now);
                return;
            }
            // Nothing beyond what was sent, whatever an older notice said.
            self.drained = true;
            self.committed = self.window.last_sent();
            return;
        };
        let was_empty = self.window_empty();
        let sent = InFlight {
            first_seq: batch.first_seq,
            last_seq: batch.last_seq,
            records: batch.record_count as usize,
            floor: batch.floor,
        };
        if let Err(e) = self.window.on_sent(sent) {
            self.close(CloseReason::Local {
                detail: format!("the outbox returned a batch the window refuses: {e}"),
            });
            return;
        }
        if was_empty {
            self.last_progress = now;
        }
        self.committed = self.committed.max(batch.last_seq);
        self.stats.batches_sent += 1;
        self.stats.records_sent += u64::from(batch.record_count);
        self.send(Frame::Batch(batch), now);
        self.pump(now);
    }

    /// The outbox now holds records through `seq` (new data committed).
    pub fn handle_committed(&mut self, seq: u64, now: Instant) {
        if self.reading && seq > self.window.last_sent() {
            self.committed_while_reading = true;
        }
        if seq > self.committed || (self.drained && seq > self.window.last_sent()) {
            self.committed = self.committed.max(seq);
            self.drained = false;
            self.pump(now);
        }
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Closed | Phase::Resuming { .. } => return,
            Phase::AwaitWelcome => {
                let after = now.saturating_duration_since(self.created);
                if after >= self.cfg.handshake_timeout {
                    self.close(CloseReason::HandshakeTimeout { after });
                }
                return;
            }
            Phase::Active => {}
        }
        match self.expecting_since {
            Some(since) => {
                let silent = now.saturating_duration_since(since);
                if silent >= self.cfg.silence_timeout {
                    self.close(CloseReason::Silent { after: silent });
                    return;
                }
                if silent >= self.cfg.probe_after / 2 && self.ping.is_none() {
                    self.ping(now);
                }
                if self.next_probe.is_some_and(|p| now >= p) {
                    self.stats.probes += 1;
                    self.actions.push_back(ClientAction::Probe);
                    self.next_probe = Some(now + self.cfg.probe_after);
                }
            }
            None => {
                if now.saturating_duration_since(self.last_heard.max(self.last_sent))
                    >= self.cfg.keepalive
                {
                    self.ping(now);
                }
            }
        }
        if !self.window_empty() {
            let after = now.saturating_duration_since(self.last_progress);
            if after >= self.cfg.stall_timeout {
                self.close(CloseReason::Stalled {
                    after,
                    acked: self.window.acked(),
                    in_flight: self.in_flight(),
                });
                return;
            }
        }
        if let Some(since) = self.delete_pending {
            if now >= since + self.cfg.delete_every {
                self.delete();
            }
        }
        self.pump(now);
    }

    /// Ends the session from this side (shutdown, a transport error).
    pub fn close(&mut self, reason: CloseReason) {
        if self.is_closed() {
            return;
        }
        self.phase = Phase::Closed;
        self.actions.push_back(ClientAction::Close(reason));
    }

    fn window_empty(&self) -> bool {
        self.window.in_flight().next().is_none()
    }

    fn expecting(&self) -> bool {
        self.phase == Phase::AwaitWelcome || !self.window_empty() || self.ping.is_some()
    }

    /// Something was heard: wait for the rest from now on.
    fn heard(&mut self, now: Instant) {
        self.expecting_since = self.expecting().then_some(now);
        self.next_probe = self.expecting_since.map(|s| s + self.cfg.probe_after);
    }

    fn send(&mut self, frame: Frame, now: Instant) {
        let asks = matches!(
            frame,
            Frame::Hello { .. } | Frame::Batch(_) | Frame::Ping { .. }
        );
        self.last_sent = now;
        self.actions.push_back(ClientAction::Send(frame));
        if asks && self.expecting_since.is_none() {
            self.expecting_since = Some(now);
            self.next_probe = Some(now + self.cfg.probe_after);
        }
    }

    fn ping(&mut self, now: Instant) {
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        self.ping = Some(nonce);
        self.stats.pings += 1;
        self.send(Frame::Ping { nonce }, now);
    }

    fn on_ack(&mut self, up_to: u64, applied: Option<u64>, now: Instant) {
        let before = self.window.acked();
        let progress = match self.window.on_ack(up_to, applied) {
            Ok(progress) => progress,
            Err(e) => {
                self.close(CloseReason::Violation {
                    detail: e.to_string(),
                });
                return;
            }
        };
        if up_to > before || progress.batches > 0 {
            self.last_progress = now;
            self.stats.records_acked += progress.records as u64;
        }
        self.stats.acked = up_to;
        self.delete_records += progress.records as u64;
        if up_to > self.deleted_through || self.window.released() > self.deleted_batches {
            self.delete_pending.get_or_insert(now);
            if self.delete_records >= self.cfg.delete_batch || self.window_empty() {
                self.delete();
            }
        }
    }

    fn delete(&mut self) {
        self.delete_pending = None;
        self.delete_records = 0;
        self.deleted_through = self.window.acked();
        self.deleted_batches = self.window.released();
        self.actions.push_back(ClientAction::Delete {
            through: self.deleted_through,
            batches: self.deleted_batches,
        });
    }

    /// Keeps the window full: asks for the next read when there is room.
    fn pump(&mut self, now: Instant) {
        if self.phase != Phase::Active || self.reading || !self.window.has_room() {
            return;
        }
        let after = self.window.last_sent();
        if self.drained && self.committed <= after {
            return;
        }
        let available = self.committed.saturating_sub(after);
        let coalesce_min = (self.cfg.batch_records / 4).max(1) as u64;
        if !self.cfg.out_of_order
            && !self.window_empty()
            && !self.drained
            && available < coalesce_min
        {
            // Few records and others in flight: let more gather, briefly.
            let since = *self.coalescing.get_or_insert(now);
            if now < since + self.cfg.coalesce_wait {
                return;
            }
        }
        self.coalescing = None;
        self.reading = true;
        self.committed_while_reading = false;
        self.actions.push_back(ClientAction::Read {
            after,
            max_records: self.cfg.batch_records,
            max_bytes: self.cfg.batch_bytes,
        });
    }
}

/// The earliest of several deadlines.
#[derive(Default)]
struct Timer(Option<Instant>);

impl Timer {
    fn at(&mut self, t: Instant) {
        self.0 = Some(self.0.map_or(t, |c| c.min(t)));
    }

    fn at_opt(&mut self, t: Option<Instant>) {
        if let Some(t) = t {
            self.at(t);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::frame::BlockCodec;

    fn outbox(next_seq: u64) -> OutboxInfo {
        OutboxInfo {
            incarnation: 7,
            next_seq,
            acked: 0,
            epoch: 1,
            epoch_start: 1,
        }
    }

    fn batch(first_seq: u64, last_seq: u64) -> BatchFrame {
        BatchFrame {
            first_seq,
            last_seq,
            record_count: (last_seq - first_seq + 1) as u32,
            raw_len: 0,
            codec: BlockCodec::None,
            block: Vec::new(),
            floor: last_seq + 1,
        }
    }

    fn actions(s: &mut ClientSession) -> Vec<ClientAction> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn welcome(cursor: u64) -> Frame {
        Frame::Welcome {
            node_id: "gw".into(),
            cursor,
            incarnation: 7,
            epoch: 1,
            top: None,
            version: None,
        }
    }

    /// A session past Hello, Welcome(cursor) and Resume.
    fn active(cfg: ClientConfig, next_seq: u64, cursor: u64, t0: Instant) -> ClientSession {
        let mut s = ClientSession::new(cfg, outbox(next_seq), t0);
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ClientAction::Send(Frame::Hello { .. })]
        ));
        s.handle_frame(welcome(cursor), t0);
        assert_eq!(
            actions(&mut s),
            vec![ClientAction::Resume {
                decision: Resume::Continue,
                cursor,
                top: cursor
            }]
        );
        s.handle_resumed(next_seq, t0);
        s
    }

    #[test]
    fn resumes_after_the_cursor_fills_the_window_and_deletes_what_acks_cover() {
        let t0 = Instant::now();
        let cfg = ClientConfig {
            window: 2,
            batch_records: 10,
            ..ClientConfig::default()
        };
        let mut s = active(cfg, 101, 40, t0);
        assert_eq!(
            actions(&mut s),
            vec![ClientAction::Read {
                after: 40,
                max_records: 10,
                max_bytes: 1024 * 1024
            }]
        );
        s.handle_read(Some(batch(41, 50)), t0);
        let a = actions(&mut s);
        assert!(matches!(a[0], ClientAction::Send(Frame::Batch(_))));
        assert!(matches!(a[1], ClientAction::Read { after: 50, .. }));
        s.handle_read(Some(batch(51, 60)), t0);
        // Window of 2 is full: no read.
        assert_eq!(actions(&mut s).len(), 1);
        s.handle_frame(
            Frame::Ack {
                up_to: 50,
                applied: Some(1),
            },
            t0,
        );
        // One batch still in flight, 6 pending deletes: not yet.
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ClientAction::Read { after: 60, .. }]
        ));
        s.handle_read(None, t0);
        s.handle_frame(
            Frame::Ack {
                up_to: 60,
                applied: Some(2),
            },
            t0,
        );
        // Nothing in flight: delete at once.
        assert_eq!(
            actions(&mut s),
            vec![ClientAction::Delete {
                through: 60,
                batches: 2
            }]
        );
        assert_eq!(s.stats().acked, 60);
        assert_eq!(s.stats().records_acked, 20);
    }

    #[test]
    fn acks_backwards_or_beyond_what_was_sent_close_the_session() {
        let t0 = Instant::now();
        let mut s = active(ClientConfig::default(), 101, 0, t0);
        actions(&mut s);
        s.handle_read(Some(batch(1, 10)), t0);
        actions(&mut s);
        s.handle_frame(
            Frame::Ack {
                up_to: 11,
                applied: None,
            },
            t0,
        );
        let a = actions(&mut s);
        assert!(
            matches!(
                a.last(),
                Some(ClientAction::Close(CloseReason::Violation { .. }))
            ),
            "{a:?}"
        );
        assert!(s.is_closed());
    }

    #[test]
    fn silence_with_a_batch_outstanding_pings_probes_then_declares_the_link_dead() {
        let t0 = Instant::now();
        let cfg = ClientConfig::default();
        let mut s = active(cfg.clone(), 11, 0, t0);
        actions(&mut s);
        s.handle_read(Some(batch(1, 10)), t0);
        actions(&mut s);
        let ms = Duration::from_millis;
        // Few records left and one batch in flight: the next read waits a
        // moment for more, then finds the outbox drained.
        assert_eq!(s.poll_timeout(), Some(t0 + ms(5)));
        s.handle_timeout(t0 + ms(5));
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ClientAction::Read { after: 10, .. }]
        ));
        s.handle_read(None, t0 + ms(5));
        // Half of probe_after: a ping.
        assert_eq!(s.poll_timeout(), Some(t0 + ms(500)));
        s.handle_timeout(t0 + ms(500));
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ClientAction::Send(Frame::Ping { .. })]
        ));
        // probe_after: a fresh connection is tried, again every second.
        assert_eq!(s.poll_timeout(), Some(t0 + ms(1000)));
        s.handle_timeout(t0 + ms(1000));
        assert_eq!(actions(&mut s), vec![ClientAction::Probe]);
        s.handle_timeout(t0 + ms(2000));
        assert_eq!(actions(&mut s), vec![ClientAction::Probe]);
        // silence_timeout: dead.
        s.handle_timeout(t0 + ms(5000));
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ClientAction::Close(CloseReason::Silent { .. })]
        ));
    }

    #[test]
    fn a_pong_keeps_a_slow_aggregator_alive_until_the_stall_timeout() {
        let t0 = Instant::now();
        let cfg = ClientConfig {
            stall_timeout: Duration::from_secs(8),
            ..ClientConfig::default()
        };
        let mut s = active(cfg, 11, 0, t0);
        actions(&mut s);
        s.handle_read(Some(batch(1, 10)), t0);
        actions(&mut s);
        s.handle_timeout(t0 + Duration::from_millis(5));
        actions(&mut s);
        s.handle_read(None, t0);
        let mut now = t0;
        for _ in 0..15 {
            now += Duration::from_millis(500);
            s.handle_timeout(now);
            for a in actions(&mut s) {
                if let ClientAction::Send(Frame::Ping { nonce }) = a {
                    s.handle_frame(Frame::Pong { nonce }, now);
                }
                assert!(
                    !matches!(a, ClientAction::Close(_)),
                    "{a:?} at {:?}",
                    now - t0
                );
            }
        }
        now = t0 + Duration::from_secs(8);
        s.handle_timeout(now);
        assert!(matches!(
            actions(&mut s).last(),
            Some(ClientAction::Close(CloseReason::Stalled {
                acked: 0,
                in_flight: 1,
                ..
            }))
        ));
    }

    #[test]
    fn idle_sessions_ping_at_the_keepalive_interval_only() {
        let t0 = Instant::now();
        let mut s = active(ClientConfig::default(), 1, 0, t0);
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ClientAction::Read { .. }]
        ));
        s.handle_read(None, t0);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(60)));
        s.handle_timeout(t0 + Duration::from_secs(60));
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ClientAction::Send(Frame::Ping { nonce: 1 })]
        ));
        // New data wakes the reader.
        s.handle_committed(5, t0 + Duration::from_secs(21));
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ClientAction::Read { after: 0, .. }]
        ));
    }

    /// The last reading of a burst is committed while a read that began
    /// before the commit was visible is out: the empty answer must not hide
    /// it (it would wait for the next commit, which may never come).
    #[test]
    fn a_commit_during_a_read_that_finds_nothing_is_read_again() {
        let ms = Duration::from_millis;
        // The next read, after the brief gathering wait when others are in
        // flight.
        let next_read = |s: &mut ClientSession, now: Instant| {
            let mut a = actions(s);
            if a.is_empty() {
                let at = s.poll_timeout().expect("a deadline for the next read");
                assert!(at <= now + ms(10), "{:?}", at - now);
                s.handle_timeout(at);
                a = actions(s);
            }
            a
        };
        let t0 = Instant::now();
        let mut s = active(ClientConfig::default(), 11, 0, t0);
        actions(&mut s);
        s.handle_read(Some(batch(1, 10)), t0);
        actions(&mut s);
        assert!(matches!(
            next_read(&mut s, t0).as_slice(),
            [ClientAction::Read { after: 10, .. }]
        ));
        // Seq 11 is committed while that read is out; the read saw nothing.
        s.handle_committed(11, t0 + ms(6));
        assert!(actions(&mut s).is_empty(), "one read at a time");
        s.handle_read(None, t0 + ms(7));
        let a = next_read(&mut s, t0 + ms(7));
        assert!(
            matches!(a.as_slice(), [ClientAction::Read { after: 10, .. }]),
            "{a:?}"
        );
        // A second empty answer with no new notice: drained, no spinning.
        s.handle_read(None, t0 + ms(20));
        assert!(actions(&mut s).is_empty());
        assert!(s.poll_timeout() > Some(t0 + ms(100)), "no read pending");
        // The next notice wakes it as before.
        s.handle_committed(11, t0 + ms(30));
        assert!(matches!(
            next_read(&mut s, t0 + ms(30)).as_slice(),
            [ClientAction::Read { after: 10, .. }]
        ));
    }

    #[test]
    fn an_older_copy_of_the_outbox_renews_and_reconnects() {
        let t0 = Instant::now();
        let mut s = ClientSession::new(ClientConfig::default(), outbox(11), t0);
        actions(&mut s);
        s.handle_frame(welcome(50), t0);
        assert_eq!(
            actions(&mut s),
            vec![ClientAction::Resume {
                decision: Resume::Ahead,
                cursor: 50,
                top: 50
            }]
        );
        s.handle_resumed(61, t0);
        assert_eq!(
            actions(&mut s),
            vec![ClientAction::Close(CloseReason::Renewed)]
        );
    }

    #[test]
    fn no_welcome_in_time_and_unexpected_frames_close() {
        let t0 = Instant::now();
        let mut s = ClientSession::new(ClientConfig::default(), outbox(1), t0);
        actions(&mut s);
        s.handle_timeout(t0 + Duration::from_secs(10));
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ClientAction::Close(CloseReason::HandshakeTimeout { .. })]
        ));
        let mut s = ClientSession::new(ClientConfig::default(), outbox(1), t0);
        actions(&mut s);
        s.handle_frame(
            Frame::Ack {
                up_to: 1,
                applied: None,
            },
            t0,
        );
        assert!(matches!(
            actions(&mut s).as_slice(),
            [ClientAction::Close(CloseReason::Violation { .. })]
        ));
    }
}
