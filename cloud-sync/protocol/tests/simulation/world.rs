//! The simulated world: an edge (outbox + client session + dialer), an
//! aggregator (store + server sessions) and the link between them, driven
//! by a virtual clock and seeded random streams. The real session state
//! machines and codecs run unchanged; only I/O is modelled.
//!
//! The link is modelled as what a reliable stream transport (QUIC or TCP)
//! shows the sessions: per connection and direction, frames arrive in the
//! order sent or not at all. Packet loss shows up as late frames (a
//! retransmission delays the frame and everything behind it); a cut holds
//! everything until it ends; a closed connection delivers a prefix of what
//! was in flight; frames of an old connection can still arrive after a
//! newer one started (reordering and duplication across connections). A
//! killed aggregator answers an old connection's packets with a stateless
//! reset (QUIC, most of the time) or a TCP reset.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use fogline_protocol::batch::{decode_batch, encode_batch, DEFAULT_ZSTD_LEVEL};
use fogline_protocol::dial::{Attempt, DialConfig, Dialer, Ending, Transport};
use fogline_protocol::session::client::{ClientAction, ClientConfig, ClientSession, CloseReason};
use fogline_protocol::session::resume::Resume;
use fogline_protocol::session::server::{ApplyRequest, ServerAction, ServerConfig, ServerSession};
use fogline_protocol::session::{OutboxInfo, StoredCursor};
use fogline_protocol::{
    BatchFrame, ErrorCode, Frame, FrameDecoder, LossReason, LossReport, Record, LOSS_STREAM,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::scenario::{Fault, Scenario};

/// What a run counted.
#[derive(Debug, Default, Clone)]
pub struct RunStats {
    pub sessions: u64,
    pub probes_won: u64,
    pub closes: BTreeMap<&'static str, u64>,
    pub resets: u64,
    pub tcp_sessions: u64,
    pub store_failures: u64,
    /// Sessions the aggregator closed with `Unauthorized` as they connected
    /// (or live, as the refusal began).
    pub refused_sessions: u64,
    /// Handshakes the aggregator rejected.
    pub refused_handshakes: u64,
    /// Sessions cut after their `Welcome`, before any ack.
    pub flapped_sessions: u64,
    pub virtual_ms: u64,
    /// Records the outbox's quota dropped, as the aggregator was told (I-33).
    pub lost: u64,
    /// When the edge tried to connect and what came of it (I-18).
    pub log: Reconnects,
}

/// When (virtual ms) the edge reconnected, for the I-18 oracle. Each list is
/// in time order.
#[derive(Debug, Default, Clone)]
pub struct Reconnects {
    /// Attempts the dialer planned (QUIC and TCP fallback alike).
    pub dial_attempts: Vec<u64>,
    /// Fresh connections tried alongside a silent session, and QUIC retries
    /// while on TCP.
    pub probe_attempts: Vec<u64>,
    /// Sessions opened by the dialer's attempts.
    pub dial_sessions: Vec<u64>,
    /// Sessions opened by a probe that won.
    pub probe_sessions: Vec<u64>,
    /// Refusals the dialer was told of (a rejected handshake, a session
    /// closed with `Unauthorized`), except on sessions a probe opened.
    pub refusals: Vec<u64>,
    /// Moments the backoff was legitimately forgotten: a session became
    /// productive (resumed, then an ack; or resumed and held
    /// `stable_after`), or the edge restarted with a fresh dialer.
    pub resets: Vec<u64>,
}

/// Runs `s` to the end and checks the invariant: the aggregator holds
/// exactly the records the outbox accepted, in order, once — and got there.
pub fn run(s: &Scenario) -> Result<RunStats, String> {
    let mut w = World::new(s);
    w.run()?;
    w.check()?;
    w.stats.log.check()?;
    Ok(w.stats)
}

/// I-18: however long a failure state lasts, the edge reconnects a bounded
/// number of times per minute. Within any 60 s of virtual time in which the
/// backoff was never legitimately forgotten, the dialer opens at most
/// [`MAX_SESSIONS_PER_MINUTE`] sessions and meets at most
/// [`MAX_REFUSALS_PER_MINUTE`] refusals. With the default policy a fruitless
/// run waits 0.1 s doubled per session (jitter down to 75%) — nine sessions
/// in its first minute, then about two — and refusals wait 15 s doubled, a
/// round (QUIC, then TCP) meeting two.
pub const MAX_SESSIONS_PER_MINUTE: usize = 12;
/// See [`MAX_SESSIONS_PER_MINUTE`].
pub const MAX_REFUSALS_PER_MINUTE: usize = 6;

impl Reconnects {
    /// The most sessions the dialer opened within 60 s with no reset.
    pub fn busiest_sessions(&self) -> usize {
        self.busiest_minute(&self.dial_sessions).0
    }

    /// Checks the I-18 bound on every 60 s window between resets.
    pub fn check(&self) -> Result<(), String> {
        let worst = |what: &[u64]| self.busiest_minute(what);
        let (n, at) = worst(&self.dial_sessions);
        if n > MAX_SESSIONS_PER_MINUTE {
            return Err(format!(
                "I-18: {n} sessions opened within 60 s from {at} ms with no progress between \
                 (at most {MAX_SESSIONS_PER_MINUTE})"
            ));
        }
        let (n, at) = worst(&self.refusals);
        if n > MAX_REFUSALS_PER_MINUTE {
            return Err(format!(
                "I-18: {n} refusals within 60 s from {at} ms with no progress between \
                 (at most {MAX_REFUSALS_PER_MINUTE})"
            ));
        }
        Ok(())
    }

    /// The most events of `times` inside one 60 s window that holds no
    /// reset (an event at the moment of a reset counts after it), and where
    /// that window starts.
    fn busiest_minute(&self, times: &[u64]) -> (usize, u64) {
        // Which stretch between resets an event falls into.
        let stretch = |t: u64| self.resets.partition_point(|&r| r <= t);
        let mut best = (0, 0);
        let mut lo = 0;
        for hi in 0..times.len() {
            while times[hi] - times[lo] >= 60_000 || stretch(times[lo]) != stretch(times[hi]) {
                lo += 1;
            }
            if hi + 1 - lo > best.0 {
                best = (hi + 1 - lo, times[lo]);
            }
        }
        best
    }
}

type ConnId = u64;

#[derive(Debug)]
enum Ev {
    Produce,
    Deliver {
        conn: ConnId,
        to_server: bool,
        index: u64,
        bytes: Vec<u8>,
    },
    Closed {
        conn: ConnId,
        to_server: bool,
        code: ErrorCode,
    },
    Reset {
        conn: ConnId,
    },
    /// A middlebox killed `conn` (Flaps): the server side lost it at once.
    Cut {
        conn: ConnId,
    },
    /// ...and the edge finds out.
    Lost {
        conn: ConnId,
    },
    AttemptDone {
        gen: u64,
        id: u64,
        ok: bool,
    },
    OutboxDone {
        gen: u64,
    },
    StoreDone {
        gen: u64,
    },
    FaultStart(usize),
    FaultEnd(usize),
}

/// The edge's durable outbox.
#[derive(Debug, Clone)]
struct Outbox {
    rows: BTreeMap<u64, (u32, u64)>,
    /// Loss records by seq (kept apart from `rows`; they ride the stream).
    reports: BTreeMap<u64, LossReport>,
    /// Highest seq read since the last session start (durable, as
    /// `meta.sent_seq`): never dropped.
    protected: u64,
    /// Reports of the drop in progress, numbered after its commit's rows.
    pending_reports: Vec<LossReport>,
    next_seq: u64,
    incarnation: u64,
    acked: u64,
    epoch: u64,
    epoch_start: u64,
    /// Sending out of seq order (I-35): this session's plan (volatile).
    plan: Option<ModelPlan>,
    /// Seqs sent out of order and not yet deleted (durable): never dropped.
    sent: BTreeSet<u64>,
}

/// The edge's drain plan as `runtime/src/outbox/drain.rs` makes it, over
/// three lanes: stream 0 (high), the other streams (normal), loss reports
/// (high); within a priority, live records first.
#[derive(Debug, Clone)]
struct ModelPlan {
    segs: Vec<Seg>,
    floor: u64,
    sent: VecDeque<(u8, u64, u64)>,
    released: u64,
    turn: usize,
}

#[derive(Debug, Clone)]
struct Seg {
    lane: u8,
    high: bool,
    live: bool,
    after: u64,
    until: u64,
    clear_below: u64,
}

impl Seg {
    fn lowest_unsent(&self) -> Option<u64> {
        let low = (self.after + 1).max(self.clear_below);
        (low < self.until).then_some(low)
    }
}

impl Outbox {
    fn lane_seqs(&self, lane: u8, from: u64, until: u64, n: usize) -> Vec<u64> {
        if lane == 2 {
            return self
                .reports
                .range(from..until)
                .map(|(s, _)| *s)
                .take(n)
                .collect();
        }
        self.rows
            .range(from..until)
            .filter(|(_, (stream, _))| (*stream == 0) == (lane == 0))
            .map(|(s, _)| *s)
            .take(n)
            .collect()
    }

    fn record(&self, seq: u64) -> Option<Record> {
        if let Some((stream, id)) = self.rows.get(&seq) {
            return Some(Record {
                seq,
                stream: format!("sensors/s{stream}"),
                timestamp_ms: *id,
                payload: format!("{{\"id\":{id}}}").into_bytes(),
            });
        }
        self.reports.get(&seq).map(|r| Record {
            seq,
            stream: LOSS_STREAM.into(),
            timestamp_ms: 0,
            payload: r.encode(),
        })
    }

    fn start_plan(&mut self, cursor: u64) {
        let live_from = self.next_seq.max(cursor + 1);
        let mut segs = Vec::new();
        for lane in 0..3u8 {
            for live in [false, true] {
                segs.push(Seg {
                    lane,
                    high: lane != 1,
                    live,
                    after: if live { live_from - 1 } else { cursor },
                    until: if live { u64::MAX } else { live_from },
                    clear_below: 0,
                });
            }
        }
        self.plan = Some(ModelPlan {
            segs,
            floor: cursor + 1,
            sent: VecDeque::new(),
            released: 0,
            turn: 0,
        });
    }

    fn read_planned(&mut self, max: usize) -> Option<(Vec<Record>, u64)> {
        let numbered = self.next_seq;
        let mut plan = self.plan.take()?;
        let n = plan.segs.len();
        let mut idx: Vec<usize> = (0..n).collect();
        idx.rotate_left(plan.turn % n);
        idx.sort_by_key(|&i| (!plan.segs[i].high, !plan.segs[i].live));
        let mut chosen = None;
        for i in idx {
            let Some(low) = plan.segs[i].lowest_unsent() else {
                continue;
            };
            let (lane, until) = (plan.segs[i].lane, plan.segs[i].until);
            let mut seqs = self.lane_seqs(lane, low, until, max.max(1) + 1);
            if seqs.len() <= max.max(1) {
                let seg = &mut plan.segs[i];
                seg.clear_below = seg.clear_below.max(numbered.min(seg.until));
            }
            seqs.truncate(max.max(1));
            if !seqs.is_empty() {
                chosen = Some((i, seqs));
                break;
            }
        }
        let result = chosen.map(|(i, seqs)| {
            let (first, last) = (seqs[0], seqs[seqs.len() - 1]);
            plan.segs[i].after = last;
            plan.turn += 1;
            plan.sent.push_back((plan.segs[i].lane, first, last));
            let lowest = plan
                .segs
                .iter()
                .filter_map(Seg::lowest_unsent)
                .fold(numbered, u64::min);
            plan.floor = plan.floor.max(lowest);
            self.sent.extend(seqs.iter().copied());
            let records: Vec<Record> = seqs.iter().filter_map(|s| self.record(*s)).collect();
            (records, plan.floor)
        });
        self.plan = Some(plan);
        result
    }

    /// Deletes the records of the first `batches` batches of the session
    /// and everything through `through`; returns the seqs deleted.
    fn delete_acked(&mut self, through: u64, batches: u64) -> Vec<u64> {
        let mut gone = Vec::new();
        if let Some(plan) = self.plan.as_mut() {
            while plan.released < batches {
                let Some((lane, first, last)) = plan.sent.pop_front() else {
                    break;
                };
                plan.released += 1;
                let seqs: Vec<u64> = if lane == 2 {
                    self.reports.range(first..=last).map(|(s, _)| *s).collect()
                } else {
                    self.rows
                        .range(first..=last)
                        .filter(|(_, (stream, _))| (*stream == 0) == (lane == 0))
                        .map(|(s, _)| *s)
                        .collect()
                };
                for seq in seqs {
                    self.rows.remove(&seq);
                    self.reports.remove(&seq);
                    self.sent.remove(&seq);
                    gone.push(seq);
                }
            }
        }
        self.delete_through(through);
        gone
    }

    fn info(&self) -> OutboxInfo {
        OutboxInfo {
            incarnation: self.incarnation,
            next_seq: self.next_seq,
            acked: self.acked,
            epoch: self.epoch,
            epoch_start: self.epoch_start,
        }
    }

    fn delete_through(&mut self, seq: u64) {
        self.rows = self.rows.split_off(&(seq + 1));
        self.reports = self.reports.split_off(&(seq + 1));
        self.sent = self.sent.split_off(&(seq + 1));
        self.acked = self.acked.max(seq);
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.reports.is_empty()
    }

    fn records_after(&mut self, after: u64, max: usize) -> Vec<Record> {
        let data = self
            .rows
            .range(after + 1..)
            .map(|(&seq, &(stream, id))| Record {
                seq,
                stream: format!("sensors/s{stream}"),
                timestamp_ms: id,
                payload: format!("{{\"id\":{id}}}").into_bytes(),
            });
        let losses = self.reports.range(after + 1..).map(|(&seq, r)| Record {
            seq,
            stream: LOSS_STREAM.into(),
            timestamp_ms: 0,
            payload: r.encode(),
        });
        let mut out: Vec<Record> = data.chain(losses).collect();
        out.sort_by_key(|r| r.seq);
        out.truncate(max.max(1));
        if let Some(last) = out.last() {
            self.protected = self.protected.max(last.seq);
        }
        out
    }

    /// Makes room for `n` records under `max` by dropping the oldest not
    /// in flight, reported per stream in loss records numbered after them
    /// — as `runtime/src/outbox/retention.rs` does. Returns how many of the
    /// `n` fit (the rest wait at the broker: nothing left to drop).
    fn make_room(&mut self, max: u64, n: u64) -> u64 {
        let held = self.rows.len() as u64;
        let over = (held + n).saturating_sub(max);
        let victims: Vec<u64> = self
            .rows
            .range(self.protected + 1..)
            .map(|(&seq, _)| seq)
            .filter(|seq| !self.sent.contains(seq))
            .take(over as usize)
            .collect();
        // One report per stream and run: a run ends at a record of the
        // stream that was sent (kept), so no range spans a delivered seq.
        let kept_between: Vec<(u64, u32)> = match (victims.first(), victims.last()) {
            (Some(&first), Some(&last)) => self
                .rows
                .range(first..=last)
                .filter(|(seq, _)| self.sent.contains(seq))
                .map(|(&seq, &(stream, _))| (seq, stream))
                .collect(),
            _ => Vec::new(),
        };
        let mut by_stream: BTreeMap<u32, LossReport> = BTreeMap::new();
        let mut done: Vec<LossReport> = Vec::new();
        let mut kept = kept_between.into_iter().peekable();
        for seq in &victims {
            while let Some((_, stream)) = kept.next_if(|(k, _)| k < seq) {
                if let Some(r) = by_stream.remove(&stream) {
                    done.push(r);
                }
            }
            if let Some((stream, _)) = self.rows.remove(seq) {
                let r = by_stream.entry(stream).or_insert_with(|| LossReport {
                    stream: format!("sensors/s{stream}"),
                    reason: LossReason::Quota,
                    detail: None,
                    records: 0,
                    bytes: 0,
                    first_seq: Some(*seq),
                    last_seq: Some(*seq),
                    first_ms: 0,
                    last_ms: 0,
                });
                r.records += 1;
                r.last_seq = Some(*seq);
            }
        }
        self.pending_reports.extend(done);
        self.pending_reports.extend(by_stream.into_values());
        max.saturating_sub(self.rows.len() as u64).min(n)
    }
}

#[derive(Debug, Clone)]
enum OutOp {
    Resume { decision: Resume, cursor: u64 },
    Read { after: u64, max_records: usize },
    Delete { through: u64, batches: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    id: u64,
    attempt: Attempt,
    started: u64,
}

struct Active {
    conn: ConnId,
    session: ClientSession,
    attempt: Attempt,
    /// When it opened (the dialer's `connected`).
    started: u64,
    /// Opened by a probe that won.
    probe: bool,
    /// The outbox applied the aggregator's cursor (the dialer's `resumed`).
    resumed: bool,
    /// Acknowledged something after it resumed (the dialer's `progressed`).
    progressed: bool,
    /// How the transport lost it, as the uplink labels it (`None`: the
    /// session closed itself).
    lost: Option<&'static str>,
}

struct Edge {
    gen: u64,
    up: bool,
    outbox: Outbox,
    dialer: Dialer,
    session: Option<Active>,
    connecting: Option<Pending>,
    probe: Option<Pending>,
    dial_at: Option<u64>,
    scheduled: Option<Attempt>,
    ops: VecDeque<(ConnId, OutOp)>,
    running: Option<(ConnId, OutOp)>,
    backlog: u64,
}

#[derive(Debug, Clone)]
enum StoreOp {
    ReadCursor,
    Apply(ApplyRequest),
}

struct Agg {
    gen: u64,
    up: bool,
    rows: BTreeMap<u64, (u32, u64)>,
    /// Loss records applied, by seq.
    losses: BTreeMap<u64, LossReport>,
    cursor: StoredCursor,
    sessions: BTreeMap<ConnId, ServerSession>,
    owner: Option<ConnId>,
    ops: VecDeque<(ConnId, StoreOp)>,
    running: Option<(ConnId, StoreOp)>,
}

struct Conn {
    transport: Transport,
    agg_gen: u64,
    edge_gen: u64,
    client_open: bool,
    server_open: bool,
    /// Per direction (0: to server, 1: to client): delivery floor (FIFO),
    /// frames sent, frames past this index are dropped.
    floor: [u64; 2],
    sent: [u64; 2],
    delivered: [u64; 2],
    drop_after: [u64; 2],
    server_dec: FrameDecoder,
    client_dec: FrameDecoder,
    inbox: VecDeque<Vec<u8>>,
    /// Welcomed during Flaps: cut before any ack.
    flap: bool,
}

struct World {
    s: Scenario,
    base: Instant,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Ev>,
    link: StdRng,
    rng: StdRng,
    edge: Edge,
    agg: Agg,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    next_attempt: u64,
    produced: u64,
    /// Ids accepted by the outbox, per stream, in order.
    accepted: BTreeMap<u32, Vec<u64>>,
    faults_active: Vec<bool>,
    stats: RunStats,
    error: Option<String>,
    ccfg: ClientConfig,
    trace: bool,
}

const MS: fn(u64) -> Duration = Duration::from_millis;

impl World {
    fn new(s: &Scenario) -> Self {
        let base = Instant::now();
        let mut rng = StdRng::seed_from_u64(s.seed);
        let outbox = Outbox {
            rows: BTreeMap::new(),
            reports: BTreeMap::new(),
            protected: 0,
            pending_reports: Vec::new(),
            next_seq: 1,
            incarnation: rng.random(),
            acked: 0,
            epoch: rng.random::<u64>() | 1,
            epoch_start: 1,
            plan: None,
            sent: BTreeSet::new(),
        };
        let ccfg = ClientConfig {
            window: s.window,
            batch_records: s.batch_records,
            out_of_order: s.out_of_order,
            ..ClientConfig::default()
        };
        let mut w = World {
            s: s.clone(),
            base,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            link: StdRng::seed_from_u64(s.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 1),
            rng,
            edge: Edge {
                gen: 0,
                up: true,
                outbox,
                dialer: Dialer::new(dial_config(), base),
                session: None,
                connecting: None,
                probe: None,
                dial_at: Some(0),
                scheduled: None,
                ops: VecDeque::new(),
                running: None,
                backlog: 0,
            },
            agg: Agg {
                gen: 0,
                up: true,
                rows: BTreeMap::new(),
                losses: BTreeMap::new(),
                cursor: StoredCursor::default(),
                sessions: BTreeMap::new(),
                owner: None,
                ops: VecDeque::new(),
                running: None,
            },
            conns: BTreeMap::new(),
            next_conn: 1,
            next_attempt: 1,
            produced: 0,
            accepted: BTreeMap::new(),
            faults_active: vec![false; s.faults.len()],
            stats: RunStats::default(),
            error: None,
            ccfg,
            trace: std::env::var("SIM_TRACE").is_ok(),
        };
        for (i, f) in s.faults.iter().enumerate() {
            w.at(f.at_ms(), Ev::FaultStart(i));
            w.at(f.end_ms(), Ev::FaultEnd(i));
        }
        w.at(0, Ev::Produce);
        w
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn instant(&self, t: u64) -> Instant {
        self.base + MS(t)
    }

    fn ms_of(&self, i: Instant) -> u64 {
        let us = i.saturating_duration_since(self.base).as_micros() as u64;
        us.div_ceil(1000)
    }

    fn fail(&mut self, msg: String) {
        if self.error.is_none() {
            self.error = Some(format!("at {} ms: {msg}", self.now));
        }
    }

    fn fault_active(&self, pred: impl Fn(&Fault) -> bool) -> Option<u64> {
        self.s
            .faults
            .iter()
            .zip(&self.faults_active)
            .filter(|(f, on)| **on && pred(f))
            .map(|(f, _)| f.end_ms())
            .max()
    }

    /// Earliest time ≥ `t` at which the link carries `transport`.
    fn link_free_at(&self, t: u64, transport: Transport) -> u64 {
        let mut t = t;
        loop {
            let blocked = self.s.faults.iter().find(|f| {
                let (start, end) = (f.at_ms(), f.end_ms());
                let hit = match f {
                    Fault::Cut { .. } => true,
                    Fault::UdpBlocked { .. } => transport == Transport::Quic,
                    _ => false,
                };
                hit && start <= t && t < end
            });
            match blocked {
                Some(f) => t = f.end_ms(),
                None => return t,
            }
        }
    }

    fn latency(&mut self) -> u64 {
        let (lo, hi) = self.s.latency_ms;
        self.link.random_range(lo..=hi.max(lo)).max(1)
    }

    fn run(&mut self) -> Result<(), String> {
        let last_fault = self.s.faults.iter().map(Fault::end_ms).max().unwrap_or(0);
        // Room for every round trip a small window of small batches needs
        // (one batch in flight, one record per batch: a round trip each).
        let round_trips = (self.s.records as u64)
            .div_ceil((self.s.window as u64).max(1) * (self.s.batch_records as u64).max(1));
        let mut deadline = last_fault.max(self.s.produce_over_ms)
            + 400_000
            + round_trips * 4 * self.s.latency_ms.1;
        if self
            .s
            .faults
            .iter()
            .any(|f| matches!(f, Fault::Refuses { .. }))
        {
            // A node refused for long waits up to `refused_max_delay`
            // (jittered +25%) before it tries again: by design (in the field
            // a renewed certificate cuts it short).
            deadline += (dial_config().refused_max_delay * 5 / 4).as_millis() as u64;
        }
        let mut steps = 0u64;
        loop {
            self.drive();
            if let Some(e) = &self.error {
                return Err(e.clone());
            }
            if self.converged() {
                self.stats.virtual_ms = self.now;
                self.stats.lost = self.lost();
                return Ok(());
            }
            let Some(next) = self.next_time() else {
                return Err(self.stuck("nothing left to happen"));
            };
            if next > deadline {
                return Err(self.stuck("did not converge before the deadline"));
            }
            steps += 1;
            if steps > 3_000_000 {
                return Err(self.stuck("too many steps"));
            }
            self.now = self.now.max(next);
            self.step();
        }
    }

    fn stuck(&self, why: &str) -> String {
        format!(
            "{why} at {} ms: produced {}/{}, outbox holds {} (next seq {}), store holds {} (cursor {}), edge up {} session {} connecting {}, aggregator up {}",
            self.now,
            self.produced,
            self.s.records,
            self.edge.outbox.rows.len(),
            self.edge.outbox.next_seq,
            self.agg.rows.len(),
            self.agg.cursor.seq,
            self.edge.up,
            self.edge.session.is_some(),
            self.edge.connecting.is_some(),
            self.agg.up,
        )
    }

    fn converged(&self) -> bool {
        self.produced == u64::from(self.s.records)
            && self.edge.backlog == 0
            && self.faults_active.iter().all(|a| !a)
            && self.now >= self.s.faults.iter().map(Fault::end_ms).max().unwrap_or(0)
            && self.edge.up
            && self.edge.outbox.is_empty()
            && self.agg.rows.len() as u64 + self.lost() == self.produced
    }

    fn next_time(&self) -> Option<u64> {
        let mut t: Option<u64> = self.queue.peek().map(|Reverse((t, _))| *t);
        let mut consider = |x: Option<u64>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |c| c.min(x)));
            }
        };
        if self.edge.up {
            consider(self.edge.dial_at);
            if let Some(a) = &self.edge.session {
                consider(a.session.poll_timeout().map(|i| self.ms_of(i)));
            }
            if let Some(a) = &self.edge.session {
                if a.attempt.transport == Transport::Tcp && self.edge.probe.is_none() {
                    consider(
                        self.edge
                            .dialer
                            .quic_retry_due(a.attempt.server)
                            .map(|i| self.ms_of(i)),
                    );
                }
            }
        }
        for s in self.agg.sessions.values() {
            consider(s.poll_timeout().map(|i| self.ms_of(i)));
        }
        t
    }

    fn step(&mut self) {
        while let Some(Reverse((t, id))) = self.queue.peek().copied() {
            if t > self.now {
                break;
            }
            self.queue.pop();
            if let Some(ev) = self.events.remove(&id) {
                self.handle(ev);
            }
        }
        let now = self.instant(self.now);
        if self.edge.up {
            if let Some(a) = &mut self.edge.session {
                if a.session.poll_timeout().is_some_and(|t| t <= now) {
                    a.session.handle_timeout(now);
                }
            }
            if self.edge.dial_at.is_some_and(|t| t <= self.now) {
                self.edge.dial_at = None;
                self.dial();
            }
            self.maybe_retry_quic();
        }
        for s in self.agg.sessions.values_mut() {
            if s.poll_timeout().is_some_and(|t| t <= now) {
                s.handle_timeout(now);
            }
        }
    }

    fn handle(&mut self, ev: Ev) {
        if self.trace && !matches!(ev, Ev::Produce) {
            match &ev {
                Ev::Deliver {
                    conn,
                    to_server,
                    bytes,
                    ..
                } => {
                    let f = fogline_protocol::Frame::decode_body(&bytes[4..], 3).map(|f| f.kind());
                    eprintln!(
                        "{:>8} deliver conn {conn} to_server {to_server} {f:?}",
                        self.now
                    );
                }
                other => eprintln!("{:>8} {other:?}", self.now),
            }
        }
        match ev {
            Ev::Produce => self.produce(),
            Ev::Deliver {
                conn,
                to_server,
                index,
                bytes,
            } => self.deliver(conn, to_server, index, bytes),
            Ev::Closed {
                conn,
                to_server,
                code,
            } => self.closed(conn, to_server, code),
            Ev::Reset { conn } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    if c.client_open {
                        c.client_open = false;
                        self.stats.resets += 1;
                        self.client_conn_lost(conn, None, "connection reset by the aggregator");
                    }
                }
            }
            Ev::Cut { conn } => self.cut(conn),
            Ev::Lost { conn } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    if c.client_open && c.edge_gen == self.edge.gen {
                        c.client_open = false;
                        self.client_conn_lost(conn, None, "connection cut by the network");
                    }
                }
            }
            Ev::AttemptDone { gen, id, ok } => {
                if gen == self.edge.gen && self.edge.up {
                    self.attempt_done(id, ok);
                }
            }
            Ev::OutboxDone { gen } => {
                if gen == self.edge.gen && self.edge.up {
                    self.outbox_done();
                }
            }
            Ev::StoreDone { gen } => {
                if gen == self.agg.gen && self.agg.up {
                    self.store_done();
                }
            }
            Ev::FaultStart(i) => {
                self.faults_active[i] = true;
                self.fault_start(self.s.faults[i]);
            }
            Ev::FaultEnd(i) => {
                self.faults_active[i] = false;
                self.fault_end(self.s.faults[i]);
            }
        }
    }

    // ----- production -------------------------------------------------

    fn produce(&mut self) {
        let total = u64::from(self.s.records);
        let due = (total * self.now.min(self.s.produce_over_ms))
            .checked_div(self.s.produce_over_ms)
            .map_or(total, |d| d.max(self.produced + 1).min(total));
        let n = due - self.produced;
        self.produced = due;
        // The broker holds what the edge cannot take while it is down.
        self.edge.backlog += n;
        self.ingest();
        if self.produced < total {
            self.at(self.now + 10, Ev::Produce);
        }
    }

    fn ingest(&mut self) {
        if !self.edge.up || self.edge.backlog == 0 {
            return;
        }
        let first_id = self.produced - self.edge.backlog;
        let mut take = self.edge.backlog;
        if let Some(max) = self.s.max_rows {
            take = self.edge.outbox.make_room(u64::from(max), take);
        }
        for id in first_id..first_id + take {
            let stream = (id % u64::from(self.s.streams.max(1))) as u32;
            let seq = self.edge.outbox.next_seq;
            self.edge.outbox.next_seq += 1;
            self.edge.outbox.rows.insert(seq, (stream, id));
            self.accepted.entry(stream).or_default().push(id);
        }
        for r in std::mem::take(&mut self.edge.outbox.pending_reports) {
            let seq = self.edge.outbox.next_seq;
            self.edge.outbox.next_seq += 1;
            self.edge.outbox.reports.insert(seq, r);
        }
        self.edge.backlog -= take;
        let committed = self.edge.outbox.next_seq - 1;
        let now = self.instant(self.now);
        if let Some(a) = &mut self.edge.session {
            a.session.handle_committed(committed, now);
        }
    }

    // ----- the link ---------------------------------------------------

    fn send(&mut self, conn: ConnId, to_server: bool, frame: &Frame) {
        let mut bytes = Vec::new();
        if let Err(e) = frame.encode(&mut bytes) {
            self.fail(format!("encoding {}: {e}", frame.kind()));
            return;
        }
        let lat = self.latency();
        let lost = self.s.loss > 0.0 && self.link.random_bool(self.s.loss);
        let rto = if lost {
            self.link.random_range(200..1200)
        } else {
            0
        };
        let dir = usize::from(!to_server);
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let open = if to_server {
            c.client_open
        } else {
            c.server_open
        };
        if !open {
            return;
        }
        let transport = c.transport;
        let free = self.link_free_at(self.now, transport);
        let t = (free + lat + rto).max(c.floor[dir]);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.floor[dir] = t;
        c.sent[dir] += 1;
        let index = c.sent[dir];
        self.at(
            t,
            Ev::Deliver {
                conn,
                to_server,
                index,
                bytes,
            },
        );
    }

    fn deliver(&mut self, conn: ConnId, to_server: bool, index: u64, bytes: Vec<u8>) {
        let dir = usize::from(!to_server);
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if index > c.drop_after[dir] {
            return;
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.delivered[dir] = c.delivered[dir].max(index);
        }
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if to_server {
            if c.agg_gen != self.agg.gen {
                // A process that never heard of this connection.
                let reset = if c.transport == Transport::Quic {
                    self.agg.up && self.link.random_bool(0.8)
                } else {
                    self.link.random_bool(0.9)
                };
                if reset {
                    let t = self.now + self.latency();
                    self.at(t, Ev::Reset { conn });
                }
                return;
            }
            if !c.server_open {
                return;
            }
            if let Some(c) = self.conns.get_mut(&conn) {
                c.inbox.push_back(bytes);
            }
            self.server_read(conn);
        } else {
            if !c.client_open || c.edge_gen != self.edge.gen {
                return;
            }
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            c.client_dec.push(&bytes);
            let mut frames = Vec::new();
            loop {
                match c.client_dec.next_frame() {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => break,
                    Err(e) => {
                        self.fail(format!("client could not decode a frame: {e}"));
                        return;
                    }
                }
            }
            let now = self.instant(self.now);
            if let Some(a) = self.edge.session.as_mut().filter(|a| a.conn == conn) {
                let acked = a.session.stats().acked;
                for f in frames {
                    a.session.handle_frame(f, now);
                }
                // As the uplink does: an acknowledgement is progress.
                if a.session.stats().acked > acked {
                    self.edge.dialer.progressed();
                    if a.resumed && !a.progressed {
                        a.progressed = true;
                        self.stats.log.resets.push(self.now);
                    }
                }
            }
        }
    }

    /// Feeds the server session what arrived while it wants to read.
    fn server_read(&mut self, conn: ConnId) {
        let now = self.instant(self.now);
        loop {
            let Some(session) = self.agg.sessions.get_mut(&conn) else {
                return;
            };
            if !session.wants_read() {
                return;
            }
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            match c.server_dec.next_frame() {
                Ok(Some(f)) => {
                    let was_hello = matches!(f, Frame::Hello { .. });
                    session.handle_frame(f, now);
                    if was_hello {
                        if let Some(v) = session.peer_version() {
                            c.server_dec.set_peer_version(v);
                        }
                    }
                }
                Ok(None) => match c.inbox.pop_front() {
                    Some(bytes) => c.server_dec.push(&bytes),
                    None => return,
                },
                Err(e) => {
                    self.fail(format!("server could not decode a frame: {e}"));
                    return;
                }
            }
        }
    }

    /// One side closes `conn`: the other side gets a prefix of what was in
    /// flight, then (if the link lets it through soon) the close itself.
    fn close_conn(&mut self, conn: ConnId, by_client: bool, code: ErrorCode) {
        let lat = self.latency();
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let (open, dir) = if by_client {
            (&mut c.client_open, 0)
        } else {
            (&mut c.server_open, 1)
        };
        if !*open {
            return;
        }
        *open = false;
        let (sent, delivered) = (c.sent[dir], c.delivered[dir]);
        let keep = if self.link.random_bool(0.5) {
            sent
        } else {
            self.link.random_range(delivered..=sent.max(delivered))
        };
        c.drop_after[dir] = keep;
        let floor = c.floor[dir];
        let transport = c.transport;
        let free = self.link_free_at(self.now, transport);
        if free <= self.now + 1000 {
            let t = (free + lat).max(floor);
            self.at(
                t,
                Ev::Closed {
                    conn,
                    to_server: by_client,
                    code,
                },
            );
        }
    }

    /// A random prefix of what is in flight on `conn` in direction `dir`:
    /// the index of the last frame that still arrives.
    fn in_flight_prefix(&mut self, conn: ConnId, dir: usize) -> u64 {
        let Some(c) = self.conns.get(&conn) else {
            return 0;
        };
        let (delivered, sent) = (c.delivered[dir], c.sent[dir]);
        self.link.random_range(delivered..=sent.max(delivered))
    }

    fn closed(&mut self, conn: ConnId, to_server: bool, code: ErrorCode) {
        if to_server {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            if c.agg_gen != self.agg.gen || !c.server_open {
                return;
            }
            c.server_open = false;
            self.agg.sessions.remove(&conn);
            if self.agg.owner == Some(conn) {
                self.agg.owner = None;
            }
        } else {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            if !c.client_open || c.edge_gen != self.edge.gen {
                return;
            }
            c.client_open = false;
            self.client_conn_lost(
                conn,
                Some(code),
                &format!("closed by the aggregator with {code}"),
            );
        }
    }

    // ----- the edge ---------------------------------------------------

    /// The transport lost `conn`: closed by the aggregator with `code`, or
    /// reset / cut (`None`).
    fn client_conn_lost(&mut self, conn: ConnId, code: Option<ErrorCode>, why: &str) {
        if let Some(a) = self.edge.session.as_mut().filter(|a| a.conn == conn) {
            if !a.session.is_closed() {
                a.lost = Some(transport_label(code));
            }
            a.session.close(CloseReason::Peer {
                code: code.unwrap_or(ErrorCode::Ok),
                message: why.to_string(),
            });
        }
    }

    /// The current session is over: tells the dialer how it ended, as the
    /// uplink does, and notes for the oracle whether it had been productive.
    fn session_over(&mut self, ending: Ending) {
        let Some(a) = self.edge.session.take() else {
            return;
        };
        let held = MS(self.now - a.started) >= dial_config().stable_after;
        if a.resumed && held && !a.progressed {
            self.stats.log.resets.push(self.now);
        }
        if ending == Ending::Refused && !a.probe {
            self.stats.log.refusals.push(self.now);
        }
        let now = self.instant(self.now);
        self.edge.dialer.disconnected_as(ending, now);
    }

    fn dial(&mut self) {
        if self.edge.connecting.is_some() || self.edge.session.is_some() {
            self.edge.scheduled = None;
            return;
        }
        let attempt = match self.edge.scheduled.take() {
            Some(a) => a,
            None => {
                let jitter: f64 = self.rng.random();
                let now = self.instant(self.now);
                let (at, attempt) = self.edge.dialer.next(now, jitter);
                let at = self.ms_of(at);
                if at > self.now {
                    self.edge.scheduled = Some(attempt);
                    self.edge.dial_at = Some(at);
                    return;
                }
                attempt
            }
        };
        self.start_attempt(attempt, false);
    }

    fn start_attempt(&mut self, attempt: Attempt, probe: bool) {
        let id = self.next_attempt;
        self.next_attempt += 1;
        if probe {
            self.stats.log.probe_attempts.push(self.now);
        } else {
            self.stats.log.dial_attempts.push(self.now);
        }
        let pending = Pending {
            id,
            attempt,
            started: self.now,
        };
        if probe {
            self.edge.probe = Some(pending);
        } else {
            self.edge.connecting = Some(pending);
        }
        let timeout = attempt.timeout.as_millis() as u64;
        let rtt = 2 * self.latency();
        // QUIC retransmits its Initial at 300 ms, then doubling; TCP its SYN
        // at 1 s, then doubling.
        let mut tries = Vec::new();
        let (mut t, mut gap) = match attempt.transport {
            Transport::Quic => (self.now, 300),
            Transport::Tcp => (self.now, 1000),
        };
        while t < self.now + timeout {
            tries.push(t);
            t += gap;
            gap *= 2;
        }
        let end = self.now + timeout;
        for t in tries {
            let free = self.link_free_at(t, attempt.transport) == t;
            let up = self.agg_up_at(t);
            if free && up && t + rtt < end {
                self.at(
                    t + rtt,
                    Ev::AttemptDone {
                        gen: self.edge.gen,
                        id,
                        ok: true,
                    },
                );
                return;
            }
            if free && !up && attempt.transport == Transport::Tcp && self.agg_host_up() {
                // Nothing listens: the SYN is refused at once.
                self.at(
                    t + rtt,
                    Ev::AttemptDone {
                        gen: self.edge.gen,
                        id,
                        ok: false,
                    },
                );
                return;
            }
        }
        self.at(
            end,
            Ev::AttemptDone {
                gen: self.edge.gen,
                id,
                ok: false,
            },
        );
    }

    /// Is the aggregator up at `t` (planned restarts included)?
    fn agg_up_at(&self, t: u64) -> bool {
        !self.s.faults.iter().any(|f| {
            matches!(f, Fault::AggregatorRestart { .. }) && f.at_ms() <= t && t < f.end_ms()
        }) && (t > self.now || self.agg.up)
    }

    fn agg_host_up(&self) -> bool {
        true
    }

    fn attempt_done(&mut self, id: u64, ok: bool) {
        let now = self.instant(self.now);
        // Refusing, the aggregator rejects half the handshakes (the node's
        // certificate, at TLS) and closes the other half's sessions at once
        // (its gate, right after accepting).
        let handshake_refused = ok
            && self.agg.up
            && self.refusing()
            && (self.edge.connecting.is_some_and(|p| p.id == id)
                || self.edge.probe.is_some_and(|p| p.id == id))
            && self.rng.random_bool(0.5);
        if handshake_refused {
            self.stats.refused_handshakes += 1;
        }
        if let Some(p) = self.edge.connecting.filter(|p| p.id == id) {
            self.edge.connecting = None;
            if handshake_refused {
                // As the uplink does for a refusal at connect.
                self.edge.dialer.failed_as(p.attempt, Ending::Refused, now);
                self.stats.log.refusals.push(self.now);
                self.edge.dial_at = Some(self.now);
                return;
            }
            if !ok || !self.agg.up {
                self.edge.dialer.failed(p.attempt, now);
                self.edge.dial_at = Some(self.now);
                return;
            }
            let hs = MS(self.now - p.started);
            self.edge.dialer.connected(p.attempt, hs, now);
            self.open_session(p.attempt, false);
            return;
        }
        if let Some(p) = self.edge.probe.filter(|p| p.id == id) {
            self.edge.probe = None;
            if !ok || !self.agg.up || handshake_refused {
                if p.attempt.transport == Transport::Quic {
                    self.edge.dialer.quic_retry_failed(p.attempt.server, now);
                }
                return;
            }
            // Switch if the session is still silent since the probe began,
            // or if this is QUIC coming back while we are on TCP.
            let switch = match &self.edge.session {
                Some(a) => {
                    let silent = a
                        .session
                        .silent_since()
                        .is_some_and(|s| s <= self.instant(p.started));
                    let back_to_quic = a.attempt.transport == Transport::Tcp
                        && p.attempt.transport == Transport::Quic;
                    silent || back_to_quic
                }
                None => true,
            };
            if !switch {
                return;
            }
            if let Some(old) = self.edge.session.as_ref().map(|a| a.conn) {
                self.close_conn(old, true, ErrorCode::Ok);
                // As the uplink does for a switch: the old session ended.
                self.session_over(Ending::Ended);
            }
            self.stats.probes_won += 1;
            if self.trace {
                eprintln!("{:>8} probe {id} won ({:?})", self.now, p.attempt.transport);
            }
            let hs = MS(self.now - p.started);
            self.edge.dialer.connected(p.attempt, hs, now);
            self.open_session(p.attempt, true);
        }
    }

    fn refusing(&self) -> bool {
        self.fault_active(|f| matches!(f, Fault::Refuses { .. }))
            .is_some()
    }

    fn open_session(&mut self, attempt: Attempt, probe: bool) {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            conn,
            Conn {
                transport: attempt.transport,
                agg_gen: self.agg.gen,
                edge_gen: self.edge.gen,
                client_open: true,
                server_open: true,
                floor: [self.now; 2],
                sent: [0; 2],
                delivered: [0; 2],
                drop_after: [u64::MAX; 2],
                server_dec: FrameDecoder::new(),
                client_dec: FrameDecoder::new(),
                inbox: VecDeque::new(),
                flap: false,
            },
        );
        let now = self.instant(self.now);
        if self.refusing() {
            // The aggregator's gate: closed with `Unauthorized` before it is
            // served.
            self.stats.refused_sessions += 1;
            self.close_conn(conn, false, ErrorCode::Unauthorized);
        } else {
            self.agg
                .sessions
                .insert(conn, ServerSession::new("n1", server_config(), now));
        }
        self.stats.sessions += 1;
        if probe {
            self.stats.log.probe_sessions.push(self.now);
        } else {
            self.stats.log.dial_sessions.push(self.now);
        }
        if attempt.transport == Transport::Tcp {
            self.stats.tcp_sessions += 1;
        }
        let session = ClientSession::new(self.ccfg.clone(), self.edge.outbox.info(), now);
        self.edge.session = Some(Active {
            conn,
            session,
            attempt,
            started: self.now,
            probe,
            resumed: false,
            progressed: false,
            lost: None,
        });
    }

    fn maybe_retry_quic(&mut self) {
        let Some(a) = &self.edge.session else {
            return;
        };
        if a.attempt.transport != Transport::Tcp || self.edge.probe.is_some() {
            return;
        }
        let now = self.instant(self.now);
        if self
            .edge
            .dialer
            .quic_retry_due(a.attempt.server)
            .is_some_and(|t| t <= now)
        {
            let attempt = self.edge.dialer.probe(a.attempt.server, Transport::Quic);
            self.start_attempt(attempt, true);
        }
    }

    fn drive(&mut self) {
        for _ in 0..1000 {
            let mut busy = self.drive_edge();
            busy |= self.drive_agg();
            if !busy {
                return;
            }
        }
        self.fail("actions never settle".into());
    }

    fn drive_edge(&mut self) -> bool {
        if !self.edge.up {
            return false;
        }
        let mut busy = false;
        while let Some(action) = self
            .edge
            .session
            .as_mut()
            .and_then(|a| a.session.poll_action())
        {
            busy = true;
            let Some(a) = &self.edge.session else {
                break;
            };
            let (conn, attempt, lost) = (a.conn, a.attempt, a.lost);
            match action {
                ClientAction::Send(frame) => self.send(conn, true, &frame),
                ClientAction::Resume {
                    decision, cursor, ..
                } => {
                    if decision != Resume::Continue {
                        self.fail(format!(
                            "unexpected resume decision {decision:?} for cursor {cursor} (outbox {:?})",
                            self.edge.outbox.info()
                        ));
                    }
                    self.edge
                        .ops
                        .push_back((conn, OutOp::Resume { decision, cursor }));
                }
                ClientAction::Read {
                    after, max_records, ..
                } => self
                    .edge
                    .ops
                    .push_back((conn, OutOp::Read { after, max_records })),
                ClientAction::Delete { through, batches } => self
                    .edge
                    .ops
                    .push_back((conn, OutOp::Delete { through, batches })),
                ClientAction::Probe => {
                    if self.edge.probe.is_none() {
                        let p = self.edge.dialer.probe(attempt.server, attempt.transport);
                        self.start_attempt(p, true);
                    }
                }
                // The model aggregator rolls nothing out.
                ClientAction::Deploy(_) => {}
                ClientAction::Close(reason) => {
                    if self.trace {
                        eprintln!("{:>8} client closes conn {conn}: {reason}", self.now);
                    }
                    // Labelled as the uplink does: a transport close with
                    // `Unauthorized` is "refused", and a refusal for the
                    // dialer.
                    let label = lost.unwrap_or(reason.label());
                    *self.stats.closes.entry(label).or_default() += 1;
                    self.close_conn(conn, true, reason.code());
                    self.session_over(if label == "refused" {
                        Ending::Refused
                    } else {
                        Ending::Ended
                    });
                    self.edge.probe = None;
                    self.edge.dial_at = Some(self.now);
                }
            }
        }
        if self.edge.running.is_none() {
            if let Some(op) = self.edge.ops.pop_front() {
                self.edge.running = Some(op);
                let t = self.now + self.rng.random_range(0..3);
                self.at(t, Ev::OutboxDone { gen: self.edge.gen });
                busy = true;
            }
        }
        busy
    }

    fn outbox_done(&mut self) {
        let Some((conn, op)) = self.edge.running.take() else {
            return;
        };
        let now = self.instant(self.now);
        let current = self.edge.session.as_ref().is_some_and(|a| a.conn == conn);
        match op {
            OutOp::Resume { decision, cursor } => {
                // A session starts: nothing above the cursor is in flight.
                self.edge.outbox.protected = cursor;
                if decision == Resume::Continue {
                    self.edge.outbox.delete_through(cursor);
                }
                if self.s.out_of_order {
                    self.edge.outbox.start_plan(cursor);
                }
                let next = self.edge.outbox.next_seq;
                if let Some(a) = self.edge.session.as_mut().filter(|_| current) {
                    a.session.handle_resumed(next, now);
                    a.resumed = true;
                    self.edge.dialer.resumed();
                }
            }
            OutOp::Read { after, max_records } => {
                if !current {
                    return;
                }
                let (records, floor) = if self.s.out_of_order {
                    self.edge
                        .outbox
                        .read_planned(max_records)
                        .unwrap_or_default()
                } else {
                    (self.edge.outbox.records_after(after, max_records), 0)
                };
                let frame = if records.is_empty() {
                    None
                } else {
                    match encode_batch(&records, DEFAULT_ZSTD_LEVEL) {
                        Ok(f) if self.s.out_of_order => Some(BatchFrame { floor, ..f }),
                        Ok(f) => Some(f),
                        Err(e) => {
                            self.fail(format!("encode_batch: {e}"));
                            return;
                        }
                    }
                };
                if let Some(a) = &mut self.edge.session {
                    a.session.handle_read(frame, now);
                }
            }
            OutOp::Delete { through, batches } => {
                if through > self.agg.cursor.seq {
                    self.fail(format!(
                        "the edge deletes through {through} but the store's cursor is {}",
                        self.agg.cursor.seq
                    ));
                }
                let gone = self.edge.outbox.delete_acked(through, batches);
                if let Some(seq) = gone
                    .iter()
                    .find(|s| !self.agg.rows.contains_key(s) && !self.agg.losses.contains_key(s))
                {
                    self.fail(format!(
                        "the edge deletes seq {seq}, acknowledged out of order, but the store does not hold it"
                    ));
                }
            }
        }
        // Room may have come back (a delete, a cursor): what the broker
        // held comes in.
        if self.s.max_rows.is_some() && self.edge.backlog > 0 {
            self.ingest();
        }
    }

    // ----- the aggregator --------------------------------------------

    fn drive_agg(&mut self) -> bool {
        if !self.agg.up {
            return false;
        }
        let mut busy = false;
        let ids: Vec<ConnId> = self.agg.sessions.keys().copied().collect();
        for conn in ids {
            self.server_read(conn);
            while let Some(action) = self
                .agg
                .sessions
                .get_mut(&conn)
                .and_then(|s| s.poll_action())
            {
                busy = true;
                match action {
                    ServerAction::Send(frame) => {
                        let flap = self.conns.get(&conn).is_some_and(|c| c.flap);
                        if flap && matches!(frame, Frame::Ack { .. }) {
                            // The middlebox kills it before any ack gets out.
                            self.cut(conn);
                            continue;
                        }
                        self.send(conn, false, &frame);
                        let flaps = self
                            .fault_active(|f| matches!(f, Fault::Flaps { .. }))
                            .is_some();
                        if flaps && matches!(frame, Frame::Welcome { .. }) {
                            // ...or shortly after the Welcome arrives.
                            let after = self.rng.random_range(1..30);
                            if let Some(c) = self.conns.get_mut(&conn) {
                                c.flap = true;
                                let t = c.floor[1] + after;
                                self.at(t, Ev::Cut { conn });
                            }
                        }
                    }
                    // The simulated nodes send no status.
                    ServerAction::Status(_) => {}
                    ServerAction::ReadCursor => {
                        // Takeover at Hello: the node's older session goes.
                        if let Some(old) = self.agg.owner.filter(|o| *o != conn) {
                            self.agg.sessions.remove(&old);
                            self.close_conn(old, false, ErrorCode::Superseded);
                        }
                        self.agg.owner = Some(conn);
                        self.agg.ops.push_back((conn, StoreOp::ReadCursor));
                    }
                    ServerAction::RecordGap(r) => {
                        self.fail(format!("the store regressed: {r:?}"));
                    }
                    ServerAction::Apply(req) => self.agg.ops.push_back((conn, StoreOp::Apply(req))),
                    ServerAction::Close { code, .. } => {
                        self.agg.sessions.remove(&conn);
                        if self.agg.owner == Some(conn) {
                            self.agg.owner = None;
                        }
                        self.close_conn(conn, false, code);
                    }
                }
            }
        }
        if self.agg.running.is_none() {
            if let Some(op) = self.agg.ops.pop_front() {
                self.agg.running = Some(op);
                let mut t = self.now + self.rng.random_range(1..12);
                if let Some(end) = self.fault_active(|f| matches!(f, Fault::StoreStall { .. })) {
                    t = t.max(end + 1);
                }
                self.at(t, Ev::StoreDone { gen: self.agg.gen });
                busy = true;
            }
        }
        busy
    }

    fn store_done(&mut self) {
        let Some((conn, op)) = self.agg.running.take() else {
            return;
        };
        let failing = self
            .fault_active(|f| matches!(f, Fault::StoreFailing { .. }))
            .is_some();
        let now = self.instant(self.now);
        match op {
            StoreOp::ReadCursor => {
                let result = if failing {
                    self.stats.store_failures += 1;
                    Err("disk I/O error".to_string())
                } else {
                    Ok(self.agg.cursor)
                };
                if let Some(s) = self.agg.sessions.get_mut(&conn) {
                    s.handle_cursor(result, now);
                }
            }
            StoreOp::Apply(req) => {
                let result = if failing {
                    self.stats.store_failures += 1;
                    Err("database or disk is full".to_string())
                } else {
                    self.apply(&req)
                };
                if let Some(s) = self.agg.sessions.get_mut(&conn) {
                    s.handle_applied(result, now);
                }
            }
        }
    }

    /// The store's transaction: insert above the cursor, advance it.
    fn apply(&mut self, req: &ApplyRequest) -> Result<u64, String> {
        let cursor = self.agg.cursor.seq;
        for b in &req.batches {
            let decoded = match decode_batch(b) {
                Ok(d) => d,
                Err(e) => {
                    self.fail(format!("a batch the edge encoded does not decode: {e}"));
                    return Err(e.to_string());
                }
            };
            for r in decoded.iter().filter(|r| r.seq > cursor) {
                if r.stream == LOSS_STREAM {
                    match LossReport::decode(r.payload) {
                        Ok(l) => {
                            self.agg.losses.insert(r.seq, l);
                        }
                        Err(e) => self.fail(format!("a loss record does not decode: {e}")),
                    }
                    continue;
                }
                let id: u64 = std::str::from_utf8(r.payload)
                    .ok()
                    .and_then(|p| {
                        p.trim_start_matches("{\"id\":")
                            .trim_end_matches('}')
                            .parse()
                            .ok()
                    })
                    .unwrap_or(u64::MAX);
                let stream: u32 = r
                    .stream
                    .trim_start_matches("sensors/s")
                    .parse()
                    .unwrap_or(u32::MAX);
                if let Some(prev) = self.agg.rows.get(&r.seq) {
                    if *prev != (stream, id) {
                        self.fail(format!(
                            "seq {} already holds record {:?}, a batch brought {:?}",
                            r.seq,
                            prev,
                            (stream, id)
                        ));
                    }
                    continue;
                }
                self.agg.rows.insert(r.seq, (stream, id));
            }
        }
        self.agg.cursor = StoredCursor {
            seq: cursor.max(req.through),
            incarnation: Some(req.outbox.0),
            epoch: req.outbox.1,
            top: self.agg.rows.keys().next_back().copied().unwrap_or(0),
        };
        Ok(self.agg.cursor.seq)
    }

    // ----- faults -----------------------------------------------------

    fn fault_start(&mut self, f: Fault) {
        match f {
            Fault::EdgeRestart { .. } if !self.edge.up => {}
            Fault::EdgeRestart { .. } => {
                // Power cut: the connection vanishes without a word; an
                // outbox operation in progress committed or not.
                if let Some((_, OutOp::Delete { through, batches })) = self.edge.running.take() {
                    if self.rng.random_bool(0.5) {
                        self.edge.outbox.delete_acked(through, batches);
                    }
                }
                // The plan lives in memory; what was sent is durable.
                self.edge.outbox.plan = None;
                if let Some(a) = self.edge.session.take() {
                    // What was in flight from the dead edge: a prefix arrives.
                    let keep = self.in_flight_prefix(a.conn, 0);
                    if let Some(c) = self.conns.get_mut(&a.conn) {
                        c.client_open = false;
                        c.drop_after[0] = keep;
                    }
                }
                self.edge.up = false;
                self.edge.gen += 1;
                self.edge.ops.clear();
                self.edge.connecting = None;
                self.edge.probe = None;
                self.edge.dial_at = None;
                self.edge.scheduled = None;
            }
            Fault::AggregatorRestart { .. } => {
                if let Some((_, StoreOp::Apply(req))) = self.agg.running.take() {
                    if self.rng.random_bool(0.5) {
                        let _ = self.apply(&req);
                    }
                }
                let ids: Vec<ConnId> = self.conns.keys().copied().collect();
                for id in ids {
                    let keep = self.in_flight_prefix(id, 1);
                    if let Some(c) = self
                        .conns
                        .get_mut(&id)
                        .filter(|c| c.agg_gen == self.agg.gen)
                    {
                        c.server_open = false;
                        // Nobody retransmits for a dead process: a prefix arrives.
                        c.drop_after[1] = c.drop_after[1].min(keep);
                    }
                }
                // The kernel resets the TCP connections of a dead process.
                let tcp: Vec<ConnId> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.agg_gen == self.agg.gen && c.transport == Transport::Tcp)
                    .map(|(id, _)| *id)
                    .collect();
                for conn in tcp {
                    let t = self.now + self.latency();
                    self.at(t, Ev::Reset { conn });
                }
                self.agg.up = false;
                self.agg.gen += 1;
                self.agg.sessions.clear();
                self.agg.ops.clear();
                self.agg.owner = None;
            }
            Fault::DropConnection { .. } => {
                if let Some(conn) = self.edge.session.as_ref().map(|a| a.conn) {
                    self.close_conn(conn, false, ErrorCode::Internal);
                    self.agg.sessions.remove(&conn);
                    if self.agg.owner == Some(conn) {
                        self.agg.owner = None;
                    }
                }
            }
            Fault::Refuses { .. } => {
                // Its certificate is refused now: the aggregator closes the
                // node's live sessions with `Unauthorized`.
                let ids: Vec<ConnId> = self.agg.sessions.keys().copied().collect();
                for conn in ids {
                    self.agg.sessions.remove(&conn);
                    self.stats.refused_sessions += 1;
                    self.close_conn(conn, false, ErrorCode::Unauthorized);
                }
                self.agg.owner = None;
            }
            Fault::Cut { .. }
            | Fault::UdpBlocked { .. }
            | Fault::StoreFailing { .. }
            | Fault::StoreStall { .. }
            | Fault::Flaps { .. } => {}
        }
    }

    /// A middlebox kills `conn`: the aggregator's side goes at once, the
    /// edge finds out a latency later.
    fn cut(&mut self, conn: ConnId) {
        let lat = self.latency();
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.server_open || c.agg_gen != self.agg.gen {
            return;
        }
        c.server_open = false;
        self.stats.flapped_sessions += 1;
        self.agg.sessions.remove(&conn);
        if self.agg.owner == Some(conn) {
            self.agg.owner = None;
        }
        self.at(self.now + lat, Ev::Lost { conn });
    }

    fn fault_end(&mut self, f: Fault) {
        match f {
            Fault::EdgeRestart { .. } => {
                // Another power cut may still be under way.
                let still = self
                    .s
                    .faults
                    .iter()
                    .zip(&self.faults_active)
                    .any(|(g, on)| *on && matches!(g, Fault::EdgeRestart { .. }));
                if still || self.edge.up {
                    return;
                }
                self.edge.up = true;
                self.edge.outbox.epoch = self.rng.random::<u64>() | 1;
                self.edge.outbox.epoch_start = self.edge.outbox.next_seq;
                self.edge.dialer = Dialer::new(dial_config(), self.instant(self.now));
                self.stats.log.resets.push(self.now);
                self.edge.dial_at = Some(self.now);
                self.ingest();
            }
            Fault::AggregatorRestart { .. } => {
                // A second restart may have begun meanwhile.
                let still = self
                    .s
                    .faults
                    .iter()
                    .zip(&self.faults_active)
                    .any(|(g, on)| *on && matches!(g, Fault::AggregatorRestart { .. }));
                if !still {
                    self.agg.up = true;
                }
            }
            _ => {}
        }
    }

    // ----- the oracle -------------------------------------------------

    /// Records the aggregator was told were dropped.
    fn lost(&self) -> u64 {
        self.agg.losses.values().map(|l| l.records).sum()
    }

    /// I-33: every record the outbox accepted is delivered once, in order
    /// per stream, or counted as lost in a loss record the aggregator
    /// applied — and nothing else. Without a quota nothing is lost.
    fn check(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        let mut per_stream: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        let mut seqs: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (&seq, &(stream, id)) in &self.agg.rows {
            if !seen.insert(id) {
                return Err(format!("record {id} stored twice (again at seq {seq})"));
            }
            per_stream.entry(stream).or_default().push(id);
            seqs.entry(stream).or_default().push(seq);
        }
        let mut lost: BTreeMap<String, u64> = BTreeMap::new();
        for l in self.agg.losses.values() {
            *lost.entry(l.stream.clone()).or_default() += l.records;
            // What a report says was dropped was not delivered.
            let stream: u32 = l
                .stream
                .trim_start_matches("sensors/s")
                .parse()
                .unwrap_or(u32::MAX);
            let (Some(a), Some(b)) = (l.first_seq, l.last_seq) else {
                return Err(format!("a loss record without its seq range: {l:?}"));
            };
            if let Some(s) = seqs
                .get(&stream)
                .and_then(|v| v.iter().find(|s| (a..=b).contains(*s)))
            {
                return Err(format!(
                    "seq {s} of {} was delivered and reported lost ({a}..={b})",
                    l.stream
                ));
            }
        }
        if self.s.max_rows.is_none() && !lost.is_empty() {
            return Err(format!("losses without a quota: {lost:?}"));
        }
        for (stream, accepted) in &self.accepted {
            let delivered = per_stream.get(stream).map_or(&[][..], Vec::as_slice);
            let counted = lost
                .get(&format!("sensors/s{stream}"))
                .copied()
                .unwrap_or(0);
            // Delivered in order: a subsequence of what was accepted.
            let mut it = accepted.iter();
            if !delivered.iter().all(|d| it.any(|a| a == d)) {
                return Err(format!(
                    "stream {stream}: delivered out of order or not accepted"
                ));
            }
            if delivered.len() as u64 + counted != accepted.len() as u64 {
                return Err(format!(
                    "stream {stream}: {} delivered + {counted} counted as lost != {} accepted",
                    delivered.len(),
                    accepted.len()
                ));
            }
        }
        if per_stream.keys().any(|k| !self.accepted.contains_key(k)) {
            return Err("records of a stream the outbox never accepted".into());
        }
        Ok(())
    }
}

/// How the uplink labels a connection the transport lost (`runtime/src/
/// uplink/link.rs`, `lost`): closed with `code`, or reset / cut (`None`).
fn transport_label(code: Option<ErrorCode>) -> &'static str {
    match code {
        Some(ErrorCode::Unauthorized) => "refused",
        Some(ErrorCode::Superseded) => "superseded",
        Some(ErrorCode::ShuttingDown) => "aggregator_shutdown",
        Some(_) => "closed_by_aggregator",
        None => "connection_lost",
    }
}

fn dial_config() -> DialConfig {
    DialConfig {
        quic_retry: Duration::from_secs(30),
        ..DialConfig::default()
    }
}

fn server_config() -> ServerConfig {
    ServerConfig {
        max_pending_bytes: 256 * 1024,
        group_records: 2048,
        ..ServerConfig::default()
    }
}
