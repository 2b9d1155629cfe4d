//! [`HandshakeGuard`]: repeated handshake failures from one source are
//! refused cheaply, and logged once per interval with a count — a node with
//! a foreign or revoked certificate that retries without pause (an old
//! gateway, a misconfigured fleet) must not cost the aggregator a TLS
//! handshake and a log line each time. A plain state machine; time is
//! passed in.
//!
//! Per source address: more than `limit` failed handshakes within `window`
//! block the source for `block` (new connections are refused before any
//! cryptography). A successful handshake clears its failures. Many gateways
//! can share one address behind carrier NAT: the limit is far above what a
//! backing-off gateway produces (two failures, then minutes of quiet), so
//! only a source that hammers is blocked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

/// Settings.
#[derive(Debug, Clone, Copy)]
pub struct GuardConfig {
    /// Failed handshakes per source within `window` before it is blocked.
    pub limit: u32,
    /// The counting window.
    pub window: Duration,
    /// How long a blocked source is refused.
    pub block: Duration,
    /// At most one log line per source per this long.
    pub log_every: Duration,
    /// Most sources remembered (the oldest are forgotten past it).
    pub max_sources: usize,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            limit: 30,
            window: Duration::from_secs(60),
            block: Duration::from_secs(60),
            log_every: Duration::from_secs(10),
            max_sources: 10_000,
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Source {
    window_start_ms: u64,
    failures: u32,
    blocked_until_ms: u64,
    last_log_ms: Option<u64>,
    /// Since the last log line: failed handshakes and refused connections.
    unlogged_failures: u64,
    unlogged_refused: u64,
    seen_ms: u64,
}

/// What to log about a source, when a line is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Failed handshakes since the last line.
    pub failures: u64,
    /// Connections refused without a handshake since the last line.
    pub refused: u64,
    /// Whether the source is blocked now.
    pub blocked: bool,
}

/// The guard, per source address.
#[derive(Debug)]
pub struct HandshakeGuard {
    config: GuardConfig,
    sources: HashMap<IpAddr, Source>,
}

impl HandshakeGuard {
    /// An empty guard.
    pub fn new(config: GuardConfig) -> Self {
        Self {
            config,
            sources: HashMap::new(),
        }
    }

    /// May a connection from `ip` have a handshake? `false`: refuse it
    /// cheaply (it is counted for the next log line).
    pub fn admit(&mut self, ip: IpAddr, now_ms: u64) -> bool {
        match self.sources.get_mut(&ip) {
            Some(s) if s.blocked_until_ms > now_ms => {
                s.unlogged_refused += 1;
                s.seen_ms = now_ms;
                false
            }
            _ => true,
        }
    }

    /// A handshake from `ip` failed. Returns a report when a log line is
    /// due (the first failure, then at most one per `log_every`).
    pub fn failed(&mut self, ip: IpAddr, now_ms: u64) -> Option<Report> {
        if !self.sources.contains_key(&ip) && self.sources.len() >= self.config.max_sources {
            self.forget_oldest();
        }
        let cfg = self.config;
        let s = self.sources.entry(ip).or_default();
        s.seen_ms = now_ms;
        if now_ms.saturating_sub(s.window_start_ms) >= cfg.window.as_millis() as u64 {
            s.window_start_ms = now_ms;
            s.failures = 0;
        }
        s.failures += 1;
        s.unlogged_failures += 1;
        if s.failures > cfg.limit {
            s.blocked_until_ms = now_ms.saturating_add(cfg.block.as_millis() as u64);
        }
        Self::report(s, cfg, now_ms)
    }

    /// A log line about `ip` if one is due now (refusals keep counting while
    /// nothing fails).
    pub fn due(&mut self, ip: IpAddr, now_ms: u64) -> Option<Report> {
        let cfg = self.config;
        let s = self.sources.get_mut(&ip)?;
        Self::report(s, cfg, now_ms)
    }

    fn report(s: &mut Source, cfg: GuardConfig, now_ms: u64) -> Option<Report> {
        let due = s
            .last_log_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= cfg.log_every.as_millis() as u64);
        if !due || (s.unlogged_failures == 0 && s.unlogged_refused == 0) {
            return None;
        }
        s.last_log_ms = Some(now_ms);
        let r = Report {
            failures: s.unlogged_failures,
            refused: s.unlogged_refused,
            blocked: s.blocked_until_ms > now_ms,
        };
        s.unlogged_failures = 0;
        s.unlogged_refused = 0;
        Some(r)
    }

    /// A handshake from `ip` succeeded: its failures are forgotten.
    pub fn succeeded(&mut self, ip: IpAddr) {
        self.sources.remove(&ip);
    }

    /// Sources remembered.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// None remembered.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    fn forget_oldest(&mut self) {
        if let Some(ip) = self
            .sources
            .iter()
            .min_by_key(|(_, s)| s.seen_ms)
            .map(|(ip, _)| *ip)
        {
            self.sources.remove(&ip);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn a_hammering_source_is_blocked_and_logged_once_per_interval() {
        let mut g = HandshakeGuard::new(GuardConfig {
            limit: 5,
            ..GuardConfig::default()
        });
        let mut lines = Vec::new();
        let mut now = 0;
        // 400 attempts a second for 10 s, as the issue measured.
        for _ in 0..5000 {
            now += 2;
            if g.admit(ip(1), now) {
                if let Some(r) = g.failed(ip(1), now) {
                    lines.push(r);
                }
            } else if let Some(r) = g.due(ip(1), now) {
                lines.push(r);
            }
        }
        assert_eq!(
            lines.len(),
            1,
            "first failure logged; the next line is due at 10 s: {lines:?}"
        );
        assert_eq!(lines[0].failures, 1);
        now += 4;
        let r = g.due(ip(1), now).unwrap();
        assert_eq!(r.failures, 5, "only 6 handshakes were attempted at all");
        assert!(r.refused > 4900 && r.blocked, "{r:?}");
        // Another source is not affected.
        assert!(g.admit(ip(2), now));
        // After the block, the source may try again.
        assert!(g.admit(ip(1), now + 61_000));
    }

    #[test]
    fn a_backing_off_node_is_never_blocked_and_success_clears() {
        let mut g = HandshakeGuard::new(GuardConfig::default());
        let mut now = 0;
        for _ in 0..100 {
            assert!(g.admit(ip(1), now));
            g.failed(ip(1), now);
            g.failed(ip(1), now + 1); // QUIC, then TCP
            now += 15_000;
        }
        assert!(g.admit(ip(1), now));
        g.succeeded(ip(1));
        assert!(g.is_empty());
    }

    #[test]
    fn memory_is_bounded_by_the_number_of_sources() {
        let mut g = HandshakeGuard::new(GuardConfig {
            max_sources: 100,
            ..GuardConfig::default()
        });
        for n in 0..10_000u32 {
            let ip = IpAddr::from(n.to_be_bytes());
            g.failed(ip, u64::from(n));
        }
        assert_eq!(g.len(), 100);
    }
}
