//! [`Breaker`]: the circuit breaker of one function, as a plain state machine
//! (no clock: time is passed in), so its policy is tested on its own.
//!
//! - **Closed**: calls go through. A *failed step* — a batch or tick in which
//!   the function failed (trapped, missed its deadline, ran out of memory,
//!   broke the output contract, returned `Err`) on every input it was given —
//!   counts; `failures` in a row open the breaker. A step with any success
//!   resets the count. (One poison message among good ones is isolated and
//!   dead-lettered; that is not a broken function.) A failed step that cost
//!   a whole call deadline (a spin, a sleep) opens it at once ([`Breaker::trip`]):
//!   each such step holds every pipeline up by that much.
//! - **Open** for a cool-down: nothing is called; the function's inputs are
//!   held or dead-lettered by its policy. The cool-down doubles with each
//!   failed probe, up to `max_cooldown`.
//! - **Half-open** after the cool-down: one small probe (one message, or a
//!   tick) goes through. Success closes the breaker (cool-down back to its
//!   start); failure opens it again.

use std::time::Duration;

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failed steps in a row that open the breaker.
    pub failures: u32,
    /// First cool-down.
    pub cooldown: Duration,
    /// Longest cool-down.
    pub max_cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 3,
            cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(300),
        }
    }
}

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; `failures` failed steps so far in a row.
    Closed {
        /// Failed steps in a row.
        failures: u32,
    },
    /// No calls until `until_ms`.
    Open {
        /// When a probe may go.
        until_ms: u64,
    },
    /// One probe may go.
    HalfOpen,
}

/// What the caller may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Call with everything.
    All,
    /// Call with one message (or one tick), then report.
    Probe,
    /// Do not call.
    None,
}

/// The circuit breaker of one function.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    /// The cool-down the next opening uses.
    cooldown: Duration,
    /// Times it opened.
    opened: u64,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            state: BreakerState::Closed { failures: 0 },
            cooldown: config.cooldown,
            config,
            opened: 0,
        }
    }

    /// A breaker that starts open (a function that failed to start): the
    /// first retry after `cooldown`.
    pub fn open_at(config: BreakerConfig, now_ms: u64) -> Self {
        let mut b = Self::new(config);
        b.open(now_ms);
        b
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// How many times it opened.
    pub fn times_opened(&self) -> u64 {
        self.opened
    }

    /// Whether it is open or half-open (the function is not trusted).
    pub fn is_tripped(&self) -> bool {
        !matches!(self.state, BreakerState::Closed { .. })
    }

    /// What may be called at `now_ms`. Moves an expired open breaker to
    /// half-open.
    pub fn admit(&mut self, now_ms: u64) -> Admit {
        match self.state {
            BreakerState::Closed { .. } => Admit::All,
            BreakerState::HalfOpen => Admit::Probe,
            BreakerState::Open { until_ms } if now_ms >= until_ms => {
                self.state = BreakerState::HalfOpen;
                Admit::Probe
            }
            BreakerState::Open { .. } => Admit::None,
        }
    }

    /// A step (or probe) succeeded on at least one input.
    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
        self.cooldown = self.config.cooldown;
    }

    /// A step (or probe) failed on everything. Returns true if this opened
    /// the breaker.
    pub fn on_failure(&mut self, now_ms: u64) -> bool {
        match self.state {
            BreakerState::Closed { failures } => {
                let failures = failures + 1;
                if failures >= self.config.failures.max(1) {
                    self.open(now_ms);
                    true
                } else {
                    self.state = BreakerState::Closed { failures };
                    false
                }
            }
            BreakerState::HalfOpen => {
                self.open(now_ms);
                true
            }
            // A failure reported while open (a tick that was already under
            // way): it stays open as it is.
            BreakerState::Open { .. } => false,
        }
    }

    /// A failure costly enough to open the breaker at once (a step that
    /// spent a whole deadline failing). Returns true if this opened it.
    pub fn trip(&mut self, now_ms: u64) -> bool {
        match self.state {
            BreakerState::Open { .. } => false,
            _ => {
                self.open(now_ms);
                true
            }
        }
    }

    fn open(&mut self, now_ms: u64) {
        let until_ms = now_ms.saturating_add(self.cooldown.as_millis() as u64);
        self.state = BreakerState::Open { until_ms };
        self.opened += 1;
        self.cooldown = (self.cooldown * 2).min(self.config.max_cooldown);
    }

    /// When the current cool-down ends (ms), if open.
    pub fn open_until(&self) -> Option<u64> {
        match self.state {
            BreakerState::Open { until_ms } => Some(until_ms),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failures: 3,
            cooldown: Duration::from_millis(100),
            max_cooldown: Duration::from_millis(800),
        }
    }

    #[test]
    fn opens_after_failures_in_a_row_and_probes_after_the_cooldown() {
        let mut b = Breaker::new(config());
        assert_eq!(b.admit(0), Admit::All);
        assert!(!b.on_failure(0));
        b.on_success();
        assert!(!b.on_failure(1));
        assert!(!b.on_failure(2));
        assert!(b.on_failure(3), "the third failure in a row opens it");
        assert_eq!(b.admit(50), Admit::None);
        assert_eq!(b.admit(103), Admit::Probe);
        assert!(b.on_failure(103), "a failed probe opens it again");
        assert_eq!(b.open_until(), Some(303), "for twice as long");
        assert_eq!(b.admit(303), Admit::Probe);
        b.on_success();
        assert_eq!(b.admit(303), Admit::All);
        assert!(!b.on_failure(400));
        assert!(!b.on_failure(401));
        assert!(b.on_failure(402));
        assert_eq!(
            b.open_until(),
            Some(502),
            "the cool-down restarted from its base"
        );
    }

    #[derive(Debug, Clone)]
    enum Event {
        Wait(u64),
        Call { ok: bool },
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0u64..500).prop_map(Event::Wait),
            any::<bool>().prop_map(|ok| Event::Call { ok }),
        ]
    }

    proptest! {
        /// Against a model: never a call while open before the cool-down,
        /// a probe is a single call, cool-downs double up to the cap, and
        /// the breaker opens exactly on the configured run of failures.
        #[test]
        fn breaker_follows_its_model(events in proptest::collection::vec(event(), 1..200)) {
            let cfg = config();
            let mut b = Breaker::new(cfg);
            let mut now = 0u64;
            let mut run = 0u32;
            let mut cooldown = cfg.cooldown.as_millis() as u64;
            let mut open_until: Option<u64> = None;
            for e in events {
                match e {
                    Event::Wait(ms) => now += ms,
                    Event::Call { ok } => {
                        let admit = b.admit(now);
                        match open_until {
                            Some(t) if now < t => {
                                prop_assert_eq!(admit, Admit::None);
                                continue;
                            }
                            Some(_) => prop_assert_eq!(admit, Admit::Probe),
                            None => prop_assert_eq!(admit, Admit::All),
                        }
                        if ok {
                            b.on_success();
                            run = 0;
                            open_until = None;
                            cooldown = cfg.cooldown.as_millis() as u64;
                        } else if open_until.is_some() {
                            // A failed probe.
                            prop_assert!(b.on_failure(now));
                            open_until = Some(now + cooldown);
                            cooldown = (cooldown * 2).min(cfg.max_cooldown.as_millis() as u64);
                        } else {
                            run += 1;
                            let opened = b.on_failure(now);
                            prop_assert_eq!(opened, run >= cfg.failures);
                            if opened {
                                open_until = Some(now + cooldown);
                                cooldown = (cooldown * 2).min(cfg.max_cooldown.as_millis() as u64);
                                run = 0;
                            }
                        }
                        prop_assert_eq!(b.open_until(), open_until);
                    }
                }
            }
        }
    }
}
