//! Which aggregator and which transport to try next, and when — the edge's
//! reconnect policy, without I/O.
//!
//! - **Servers** are tried in the configured order, every round from the
//!   first: the first is the preferred one.
//! - **Transports**: QUIC first; when QUIC fails and TCP/TLS to the same
//!   server then works, that server is reached over TCP from then on, and
//!   QUIC is tried again every `quic_retry` ([`Dialer::quic_retry_due`]).
//! - **Waiting**: attempts within a round follow each other at once. After a
//!   whole round fails, the wait is a tenth of how long the uplink has been
//!   down, between `min_delay` and `max_delay`, jittered ±25%: a restored
//!   link is never slept through for more than a tenth of the outage it
//!   ends, and a long outage costs a gateway one round per `max_delay`.
//!   A successful handshake resets it all.
//! - **Backoff that means it**: a session that ends before it was
//!   *productive* — resumed and then acknowledged something, or stayed up
//!   `stable_after` — counts as fruitless (an unreachable aggregator does
//!   not: that is an outage, paced as above); the wait before the next round
//!   is then at least `min_delay` doubled per
//!   fruitless session in a row (jittered, up to `max_delay`). A refusal —
//!   the aggregator rejected the node's certificate, or closed with
//!   `Unauthorized` — waits `refused_delay` doubled per refusal, up to
//!   `refused_max_delay` (minutes). Only a productive session resets them;
//!   new credentials reset the refusals. So no failure state reconnects more
//!   than a bounded number of times per minute (the simulation checks it).
//! - **Attempt timeouts**: three times the last successful handshake, at
//!   least `attempt_floor`, at most `connect_timeout` (which alone applies
//!   until a first handshake is measured). Short attempts keep QUIC's
//!   Initial retransmissions close together, so an aggregator that comes
//!   back is found within a fraction of a second.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How to reach an aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// QUIC over UDP.
    Quic,
    /// TLS 1.3 over TCP, for networks that block UDP.
    Tcp,
}

impl Transport {
    /// Lower-case name for logs, metrics and status.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

/// Policy knobs of the dialer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialConfig {
    /// Number of configured servers (at least one).
    pub servers: usize,
    /// Fall back to TCP/TLS when QUIC fails.
    pub tcp_fallback: bool,
    /// While on TCP, try QUIC again this often.
    pub quic_retry: Duration,
    /// Shortest wait between rounds.
    pub min_delay: Duration,
    /// Longest wait between rounds.
    pub max_delay: Duration,
    /// Longest attempt (and the only one before a handshake was measured).
    pub connect_timeout: Duration,
    /// Shortest attempt.
    pub attempt_floor: Duration,
    /// A resumed session that stays up this long counts as productive even
    /// if it had nothing to send.
    pub stable_after: Duration,
    /// First wait after a refusal (a rejected certificate).
    pub refused_delay: Duration,
    /// Longest wait after refusals.
    pub refused_max_delay: Duration,
}

impl Default for DialConfig {
    fn default() -> Self {
        Self {
            servers: 1,
            tcp_fallback: true,
            quic_retry: Duration::from_secs(300),
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            attempt_floor: Duration::from_secs(1),
            stable_after: Duration::from_secs(10),
            refused_delay: Duration::from_secs(15),
            refused_max_delay: Duration::from_secs(600),
        }
    }
}

/// How a session (or an attempt) ended, for the backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Whatever it was; the session's progress decides.
    Ended,
    /// The aggregator refused the node (certificate rejected, `Unauthorized`).
    Refused,
}

/// One connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// Index into the configured servers.
    pub server: usize,
    /// Over what.
    pub transport: Transport,
    /// Give up after this long (handshake included).
    pub timeout: Duration,
}

/// The reconnect policy's state.
#[derive(Debug, Clone)]
pub struct Dialer {
    cfg: DialConfig,
    plan: VecDeque<(usize, Transport)>,
    /// Since when no session has been up (`None`: connected).
    down_since: Option<Instant>,
    /// Per server: when it was last found reachable over TCP only.
    tcp_since: Vec<Option<Instant>>,
    /// Per server: QUIC failed in the current round.
    quic_failed: Vec<bool>,
    last_handshake: Option<Duration>,
    rounds_failed: u64,
    /// Sessions (and failed rounds) in a row that made no progress.
    fruitless: u32,
    /// Refusals in a row.
    refusals: u32,
    /// The session in progress: when it began, whether it resumed, whether
    /// anything was acknowledged.
    session: Option<(Instant, bool, bool)>,
}

impl Dialer {
    /// A dialer that starts out disconnected at `now`.
    pub fn new(cfg: DialConfig, now: Instant) -> Self {
        let n = cfg.servers.max(1);
        Self {
            cfg: DialConfig { servers: n, ..cfg },
            plan: VecDeque::new(),
            down_since: Some(now),
            tcp_since: vec![None; n],
            quic_failed: vec![false; n],
            last_handshake: None,
            rounds_failed: 0,
            fruitless: 0,
            refusals: 0,
            session: None,
        }
    }

    /// The next attempt and the earliest time to start it. `jitter` is a
    /// random number in `[0, 1)`.
    pub fn next(&mut self, now: Instant, jitter: f64) -> (Instant, Attempt) {
        let mut at = now;
        if self.plan.is_empty() {
            let mut wait = Duration::ZERO;
            if self.rounds_failed > 0 {
                wait = self.delay(now, jitter);
            }
            wait = wait.max(self.backoff(jitter));
            at = now + wait;
            self.plan_round(at);
        }
        let (server, transport) = self.plan.pop_front().unwrap_or((0, Transport::Quic));
        (
            at,
            Attempt {
                server,
                transport,
                timeout: self.attempt_timeout(),
            },
        )
    }

    /// An attempt failed (refused, timed out, handshake rejected).
    pub fn failed(&mut self, attempt: Attempt, now: Instant) {
        self.failed_as(attempt, Ending::Ended, now);
    }

    /// An attempt failed, and how.
    pub fn failed_as(&mut self, attempt: Attempt, ending: Ending, _now: Instant) {
        if attempt.transport == Transport::Quic {
            if let Some(f) = self.quic_failed.get_mut(attempt.server) {
                *f = true;
            }
        }
        if ending == Ending::Refused {
            self.refusals = self.refusals.saturating_add(1);
        }
        // An unreachable aggregator is an outage, paced by its length (a
        // tenth of it): doubling here would sleep through its return.
        if self.plan.is_empty() {
            self.rounds_failed += 1;
        }
    }

    /// An attempt's handshake completed after `handshake`: the session is
    /// up. The backoff stays until the session proves productive
    /// ([`Dialer::resumed`], [`Dialer::progressed`]).
    pub fn connected(&mut self, attempt: Attempt, handshake: Duration, now: Instant) {
        self.last_handshake = Some(handshake);
        self.down_since = None;
        self.plan.clear();
        self.rounds_failed = 0;
        self.session = Some((now, false, false));
        let i = attempt.server;
        if let Some(slot) = self.tcp_since.get_mut(i) {
            *slot = match attempt.transport {
                Transport::Quic => None,
                Transport::Tcp if self.quic_failed.get(i).copied().unwrap_or(false) => Some(now),
                Transport::Tcp => *slot,
            };
        }
        self.quic_failed.iter_mut().for_each(|f| *f = false);
    }

    /// The session resumed (the aggregator's cursor was applied).
    pub fn resumed(&mut self) {
        if let Some(s) = self.session.as_mut() {
            s.1 = true;
        }
    }

    /// The session got something acknowledged: it is productive, the backoff
    /// is over.
    pub fn progressed(&mut self) {
        if let Some(s) = self.session.as_mut() {
            if s.1 {
                s.2 = true;
                self.fruitless = 0;
                self.refusals = 0;
            }
        }
    }

    /// Whether the session now running counts as productive: it got
    /// something acknowledged, or it resumed and held for `stable_after`.
    pub fn session_productive(&self, now: Instant) -> bool {
        self.session.is_some_and(|(since, resumed, progressed)| {
            progressed || (resumed && now.saturating_duration_since(since) >= self.cfg.stable_after)
        })
    }

    /// The node's credentials changed: whatever was refused may work now.
    pub fn credentials_changed(&mut self) {
        self.refusals = 0;
        self.plan.clear();
    }

    /// The session ended: the outage starts now (unless one is running).
    pub fn disconnected(&mut self, now: Instant) {
        self.disconnected_as(Ending::Ended, now);
    }

    /// The session ended, and how.
    pub fn disconnected_as(&mut self, ending: Ending, now: Instant) {
        let productive = self.session_productive(now);
        self.session = None;
        if productive {
            self.fruitless = 0;
            self.refusals = 0;
        } else {
            self.fruitless = self.fruitless.saturating_add(1);
        }
        if ending == Ending::Refused {
            self.refusals = self.refusals.saturating_add(1);
        }
        self.down_since.get_or_insert(now);
        self.plan.clear();
        self.rounds_failed = 0;
    }

    /// Sessions in a row that made no progress, and refusals in a row.
    pub fn backoff_state(&self) -> (u32, u32) {
        (self.fruitless, self.refusals)
    }

    /// While connected over TCP to `server`: when QUIC should be tried
    /// again (a probe alongside the session).
    pub fn quic_retry_due(&self, server: usize) -> Option<Instant> {
        self.tcp_since
            .get(server)
            .copied()
            .flatten()
            .map(|since| since + self.cfg.quic_retry)
    }

    /// A QUIC retry while on TCP failed: wait another `quic_retry`.
    pub fn quic_retry_failed(&mut self, server: usize, now: Instant) {
        if let Some(Some(since)) = self.tcp_since.get_mut(server) {
            *since = now;
        }
    }

    /// A probe attempt alongside a silent session on `server` over
    /// `transport`.
    pub fn probe(&self, server: usize, transport: Transport) -> Attempt {
        Attempt {
            server,
            transport,
            timeout: self.attempt_timeout(),
        }
    }

    /// How long the uplink has been down, if it is.
    pub fn down_for(&self, now: Instant) -> Option<Duration> {
        self.down_since.map(|s| now.saturating_duration_since(s))
    }

    fn attempt_timeout(&self) -> Duration {
        match self.last_handshake {
            Some(h) => (h * 3)
                .max(self.cfg.attempt_floor)
                .min(self.cfg.connect_timeout),
            None => self.cfg.connect_timeout,
        }
    }

    /// The wait fruitless sessions and refusals impose.
    fn backoff(&self, jitter: f64) -> Duration {
        let jitter = 0.75 + 0.5 * jitter.clamp(0.0, 1.0);
        let doubled = |base: Duration, n: u32, cap: Duration| {
            if n == 0 {
                return Duration::ZERO;
            }
            let factor = 1u32 << (n - 1).min(16);
            base.saturating_mul(factor).min(cap).mul_f64(jitter)
        };
        let fruitless = doubled(self.cfg.min_delay, self.fruitless, self.cfg.max_delay);
        let refused = doubled(
            self.cfg.refused_delay,
            self.refusals,
            self.cfg.refused_max_delay,
        );
        fruitless.max(refused)
    }

    fn delay(&self, now: Instant, jitter: f64) -> Duration {
        let down = self.down_for(now).unwrap_or_default();
        let base = (down / 10).clamp(self.cfg.min_delay, self.cfg.max_delay);
        base.mul_f64(0.75 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    fn plan_round(&mut self, at: Instant) {
        self.quic_failed.iter_mut().for_each(|f| *f = false);
        for server in 0..self.cfg.servers {
            let on_tcp = self.cfg.tcp_fallback
                && self.tcp_since[server].is_some_and(|since| at < since + self.cfg.quic_retry);
            if on_tcp {
                self.plan.push_back((server, Transport::Tcp));
            } else {
                self.plan.push_back((server, Transport::Quic));
                if self.cfg.tcp_fallback {
                    self.plan.push_back((server, Transport::Tcp));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sessions that end before they were productive back off exponentially;
    /// refusals back off to minutes; only progress resets them.
    #[test]
    fn fruitless_sessions_and_refusals_back_off_until_progress() {
        let t0 = Instant::now();
        let mut d = Dialer::new(DialConfig::default(), t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..12 {
            let (at, a) = d.next(now, 0.5);
            waits.push(at - now);
            now = at;
            // The handshake completes, then the session ends at once.
            d.connected(a, ms(5), now);
            d.disconnected(now);
        }
        assert_eq!(waits[0], Duration::ZERO);
        assert_eq!(&waits[1..5], &[ms(100), ms(200), ms(400), ms(800)]);
        assert_eq!(waits[waits.len() - 1], Duration::from_secs(30), "capped");
        // A productive session resets it: the next reconnect is immediate.
        let (at, a) = d.next(now, 0.5);
        d.connected(a, ms(5), at);
        d.resumed();
        d.progressed();
        d.disconnected(at);
        assert_eq!(d.next(at, 0.5).0, at);

        // Refusals: 15 s, 30 s, 60 s... up to 10 minutes.
        let mut d = Dialer::new(DialConfig::default(), t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..10 {
            let (at, a) = d.next(now, 0.5);
            waits.push(at - now);
            now = at;
            d.connected(a, ms(5), now);
            d.disconnected_as(Ending::Refused, now);
        }
        assert_eq!(
            &waits[1..4],
            &[
                Duration::from_secs(15),
                Duration::from_secs(30),
                Duration::from_secs(60)
            ]
        );
        assert_eq!(waits[waits.len() - 1], Duration::from_secs(600));
        // New credentials: the refusals are forgotten.
        d.credentials_changed();
        let (at, _) = d.next(now, 0.5);
        assert!(at - now <= Duration::from_secs(30), "{:?}", at - now);

        // A resumed session that stayed up counts as productive.
        let mut d = Dialer::new(DialConfig::default(), t0);
        let (_, a) = d.next(t0, 0.5);
        d.connected(a, ms(5), t0);
        d.resumed();
        d.disconnected(t0 + Duration::from_secs(11));
        assert_eq!(d.backoff_state(), (0, 0));
    }

    /// However an aggregator misbehaves, a dialer that is told the truth
    /// reconnects a bounded number of times per minute.
    #[test]
    fn no_failure_state_reconnects_more_than_a_bound_per_minute() {
        let t0 = Instant::now();
        for (name, ending, resumes) in [
            ("handshake ok, closed at once", Ending::Ended, false),
            ("resumed, then closed before any ack", Ending::Ended, true),
            ("certificate refused", Ending::Refused, false),
        ] {
            let mut d = Dialer::new(DialConfig::default(), t0);
            let mut now = t0;
            let mut connects = 0;
            while now < t0 + Duration::from_secs(600) {
                let (at, a) = d.next(now, 0.0);
                now = at + ms(1);
                connects += 1;
                d.connected(a, ms(1), now);
                if resumes {
                    d.resumed();
                }
                d.disconnected_as(ending, now);
            }
            // 10 minutes: the doubling reaches the cap within a few tries.
            let per_minute = connects as f64 / 10.0;
            assert!(per_minute <= 8.0, "{name}: {connects} connects in 10 min");
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn servers_in_order_quic_then_tcp_and_rounds_wait_a_tenth_of_the_outage() {
        let t0 = Instant::now();
        let cfg = DialConfig {
            servers: 2,
            ..DialConfig::default()
        };
        let mut d = Dialer::new(cfg, t0);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (at, a) = d.next(t0, 0.5);
            assert_eq!(at, t0, "a round's attempts follow each other");
            assert_eq!(
                a.timeout,
                Duration::from_secs(10),
                "no handshake measured yet"
            );
            seen.push((a.server, a.transport));
            d.failed(a, t0);
        }
        assert_eq!(
            seen,
            vec![
                (0, Transport::Quic),
                (0, Transport::Tcp),
                (1, Transport::Quic),
                (1, Transport::Tcp)
            ]
        );
        // Down 5 s: the next round waits 0.5 s (jitter 0.5 → ×1).
        let now = t0 + Duration::from_secs(5);
        let (at, a) = d.next(now, 0.5);
        assert_eq!((at - now, a.server), (ms(500), 0));
        // Down an hour: capped at max_delay.
        let mut d2 = d.clone();
        d2.failed(a, now);
        for _ in 0..3 {
            let (_, a) = d2.next(now, 0.0);
            d2.failed(a, now);
        }
        let late = t0 + Duration::from_secs(3600);
        let (at, _) = d2.next(late, 0.99);
        assert!(at - late <= Duration::from_secs(38) && at - late >= Duration::from_secs(29));
    }

    #[test]
    fn a_handshake_resets_the_wait_and_sets_short_attempts() {
        let t0 = Instant::now();
        let mut d = Dialer::new(DialConfig::default(), t0);
        let (_, a) = d.next(t0, 0.0);
        d.connected(a, ms(20), t0 + ms(20));
        d.resumed();
        d.progressed();
        d.disconnected(t0 + Duration::from_secs(100));
        let now = t0 + Duration::from_secs(100);
        let (at, a) = d.next(now, 0.0);
        assert_eq!(at, now, "first attempt of an outage is immediate");
        assert_eq!(
            a.timeout,
            Duration::from_secs(1),
            "3 × 20 ms, floored at 1 s"
        );
        d.failed(a, now);
        let (_, a) = d.next(now, 0.0);
        d.failed(a, now);
        let (at, _) = d.next(now + ms(300), 0.0);
        // Down 0.3 s: the minimum wait, jittered to 75%.
        assert_eq!(at - (now + ms(300)), ms(75));
    }

    #[test]
    fn tcp_becomes_the_way_in_when_only_tcp_works_and_quic_is_retried() {
        let t0 = Instant::now();
        let mut d = Dialer::new(DialConfig::default(), t0);
        let (_, q) = d.next(t0, 0.0);
        assert_eq!(q.transport, Transport::Quic);
        d.failed(q, t0);
        let (_, t) = d.next(t0, 0.0);
        assert_eq!(t.transport, Transport::Tcp);
        d.connected(t, ms(10), t0);
        assert_eq!(d.quic_retry_due(0), Some(t0 + Duration::from_secs(300)));
        // Reconnecting within quic_retry goes straight to TCP.
        d.disconnected(t0 + ms(1));
        let (_, a) = d.next(t0 + ms(1), 0.0);
        assert_eq!(a.transport, Transport::Tcp);
        // After it, QUIC first again.
        d.failed(a, t0 + ms(1));
        let later = t0 + Duration::from_secs(301);
        let (at, a) = d.next(later, 0.0);
        assert_eq!(a.transport, Transport::Quic, "at {at:?}");
        // A QUIC connection clears TCP mode.
        d.connected(a, ms(10), later);
        assert_eq!(d.quic_retry_due(0), None);
    }
}
