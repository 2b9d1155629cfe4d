//! A simulation scenario: traffic, link and faults, drawn from a seed, and
//! serialisable so that a shrunk failure can be committed as a regression.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Everything one simulated run depends on. The run itself is a pure
/// function of this value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    /// Seeds the link, store and edge random streams.
    pub seed: u64,
    /// Records the sensors produce into the outbox.
    pub records: u32,
    /// Streams they are spread over.
    pub streams: u32,
    /// Production is spread over this long (ms); 0: all at once.
    pub produce_over_ms: u64,
    /// One-way latency range (ms).
    pub latency_ms: (u64, u64),
    /// Per frame: probability that it is lost once on the wire and
    /// retransmitted (it, and what follows it, arrive late).
    pub loss: f64,
    /// Batches in flight.
    pub window: usize,
    /// Records per batch.
    pub batch_records: usize,
    /// What goes wrong, and when.
    pub faults: Vec<Fault>,
    /// The outbox holds at most this many data records, dropping the
    /// oldest not in flight (`drop_oldest`) and reporting each drop as a
    /// loss record (I-32, I-33); none: unbounded.
    #[serde(default)]
    pub max_rows: Option<u32>,
    /// The edge sends out of seq order (I-35): stream 0 and loss reports
    /// first, live records before the backlog.
    #[serde(default)]
    pub out_of_order: bool,
}

/// One fault, starting `at_ms` after the run starts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Fault {
    /// The link holds every packet for `for_ms` (a dead spot): nothing is
    /// lost, everything is late; sessions decide whether to give up.
    Cut {
        /// Start.
        at_ms: u64,
        /// Length.
        for_ms: u64,
    },
    /// UDP is dropped for `for_ms` (a network that blocks it): QUIC
    /// connections die, QUIC attempts fail, TCP works.
    UdpBlocked {
        /// Start.
        at_ms: u64,
        /// Length.
        for_ms: u64,
    },
    /// The edge loses power; it comes back after `down_ms` with its outbox.
    EdgeRestart {
        /// Start.
        at_ms: u64,
        /// Down time.
        down_ms: u64,
    },
    /// The aggregator is killed; it comes back after `down_ms` with its store.
    AggregatorRestart {
        /// Start.
        at_ms: u64,
        /// Down time.
        down_ms: u64,
    },
    /// Every store operation fails for `for_ms` (full disk): every session
    /// the aggregator serves meanwhile closes with `Internal` at its cursor
    /// read or its first apply. Long ones are a failure state (I-18).
    StoreFailing {
        /// Start.
        at_ms: u64,
        /// Length.
        for_ms: u64,
    },
    /// Store operations hang for `for_ms` (a stuck disk); pings are still
    /// answered.
    StoreStall {
        /// Start.
        at_ms: u64,
        /// Length.
        for_ms: u64,
    },
    /// The current connection is torn down (a NAT rebinding, a middlebox).
    DropConnection {
        /// When.
        at_ms: u64,
    },
    /// The aggregator refuses the node for `for_ms` (its certificate
    /// revoked, then reinstated): the live session is closed with
    /// `Unauthorized` when it starts, and so is every session meanwhile,
    /// right after it connects — or its handshake is rejected outright.
    Refuses {
        /// Start.
        at_ms: u64,
        /// Length.
        for_ms: u64,
    },
    /// For `for_ms`, every connection is cut shortly after its `Welcome`,
    /// before any ack (a middlebox that kills connections after a few
    /// packets): sessions resume but never progress.
    Flaps {
        /// Start.
        at_ms: u64,
        /// Length.
        for_ms: u64,
    },
}

impl Fault {
    /// When it starts.
    pub fn at_ms(&self) -> u64 {
        match *self {
            Fault::Cut { at_ms, .. }
            | Fault::UdpBlocked { at_ms, .. }
            | Fault::EdgeRestart { at_ms, .. }
            | Fault::AggregatorRestart { at_ms, .. }
            | Fault::StoreFailing { at_ms, .. }
            | Fault::StoreStall { at_ms, .. }
            | Fault::Refuses { at_ms, .. }
            | Fault::Flaps { at_ms, .. }
            | Fault::DropConnection { at_ms } => at_ms,
        }
    }

    /// When it is over.
    pub fn end_ms(&self) -> u64 {
        match *self {
            Fault::Cut { at_ms, for_ms }
            | Fault::UdpBlocked { at_ms, for_ms }
            | Fault::StoreFailing { at_ms, for_ms }
            | Fault::StoreStall { at_ms, for_ms }
            | Fault::Refuses { at_ms, for_ms }
            | Fault::Flaps { at_ms, for_ms } => at_ms + for_ms,
            Fault::EdgeRestart { at_ms, down_ms } | Fault::AggregatorRestart { at_ms, down_ms } => {
                at_ms + down_ms
            }
            Fault::DropConnection { at_ms } => at_ms,
        }
    }

    /// The same fault, half as long (`None` if it has no length worth
    /// halving): for shrinking.
    pub fn halved(&self) -> Option<Fault> {
        let half = |d: u64| (d >= 100).then_some(d / 2);
        Some(match *self {
            Fault::Cut { at_ms, for_ms } => Fault::Cut {
                at_ms,
                for_ms: half(for_ms)?,
            },
            Fault::UdpBlocked { at_ms, for_ms } => Fault::UdpBlocked {
                at_ms,
                for_ms: half(for_ms)?,
            },
            Fault::EdgeRestart { at_ms, down_ms } => Fault::EdgeRestart {
                at_ms,
                down_ms: half(down_ms)?,
            },
            Fault::AggregatorRestart { at_ms, down_ms } => Fault::AggregatorRestart {
                at_ms,
                down_ms: half(down_ms)?,
            },
            Fault::StoreFailing { at_ms, for_ms } => Fault::StoreFailing {
                at_ms,
                for_ms: half(for_ms)?,
            },
            Fault::StoreStall { at_ms, for_ms } => Fault::StoreStall {
                at_ms,
                for_ms: half(for_ms)?,
            },
            Fault::Refuses { at_ms, for_ms } => Fault::Refuses {
                at_ms,
                for_ms: half(for_ms)?,
            },
            Fault::Flaps { at_ms, for_ms } => Fault::Flaps {
                at_ms,
                for_ms: half(for_ms)?,
            },
            Fault::DropConnection { .. } => return None,
        })
    }
}

impl Scenario {
    /// The scenario of `seed`.
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5ce7_a210);
        let produce_over_ms = if rng.random_bool(0.3) {
            0
        } else {
            rng.random_range(100..20_000)
        };
        let lat_min = rng.random_range(0..50);
        let latency_ms = (lat_min, lat_min + rng.random_range(0..150));
        let horizon = produce_over_ms.max(2_000) + 5_000;
        let n_faults = rng.random_range(0..=6);
        let mut faults: Vec<Fault> = (0..n_faults)
            .map(|_| {
                let at_ms = rng.random_range(0..horizon);
                match rng.random_range(0..7) {
                    0 => Fault::Cut {
                        at_ms,
                        for_ms: rng.random_range(50..12_000),
                    },
                    1 => Fault::UdpBlocked {
                        at_ms,
                        for_ms: rng.random_range(500..20_000),
                    },
                    2 => Fault::EdgeRestart {
                        at_ms,
                        down_ms: rng.random_range(0..5_000),
                    },
                    3 => Fault::AggregatorRestart {
                        at_ms,
                        down_ms: rng.random_range(0..8_000),
                    },
                    4 => Fault::StoreFailing {
                        at_ms,
                        for_ms: rng.random_range(10..5_000),
                    },
                    5 => Fault::StoreStall {
                        at_ms,
                        for_ms: rng.random_range(10..25_000),
                    },
                    _ => Fault::DropConnection { at_ms },
                }
            })
            .collect();
        // Now and then a failure state that lasts: the aggregator refuses
        // the node, its store fails, or connections die before any ack —
        // up to two minutes of reconnects the backoff must pace (I-18).
        if rng.random_bool(0.2) {
            let at_ms = rng.random_range(0..horizon);
            let for_ms = rng.random_range(500..120_000);
            faults.push(match rng.random_range(0..3) {
                0 => Fault::Refuses { at_ms, for_ms },
                1 => Fault::Flaps { at_ms, for_ms },
                _ => Fault::StoreFailing { at_ms, for_ms },
            });
        }
        Scenario {
            seed,
            records: rng.random_range(1..3_000),
            streams: rng.random_range(1..6),
            produce_over_ms,
            latency_ms,
            loss: if rng.random_bool(0.5) {
                0.0
            } else {
                rng.random_range(0.0..0.08)
            },
            window: rng.random_range(1..10),
            batch_records: rng.random_range(1..600),
            faults,
            max_rows: rng.random_bool(0.3).then(|| rng.random_range(20..2_000)),
            out_of_order: rng.random_bool(0.4),
        }
    }

    /// Smaller variants of this scenario, simplest first: for shrinking a
    /// failure to something a person can read.
    pub fn shrink_candidates(&self) -> Vec<Scenario> {
        let mut out = Vec::new();
        for i in 0..self.faults.len() {
            let mut s = self.clone();
            s.faults.remove(i);
            out.push(s);
        }
        for i in 0..self.faults.len() {
            if let Some(f) = self.faults[i].halved() {
                let mut s = self.clone();
                s.faults[i] = f;
                out.push(s);
            }
        }
        if self.max_rows.is_some() {
            out.push(Scenario {
                max_rows: None,
                ..self.clone()
            });
        }
        if self.out_of_order {
            out.push(Scenario {
                out_of_order: false,
                ..self.clone()
            });
        }
        if self.records > 1 {
            out.push(Scenario {
                records: self.records / 2,
                ..self.clone()
            });
        }
        if self.produce_over_ms > 0 {
            out.push(Scenario {
                produce_over_ms: 0,
                ..self.clone()
            });
        }
        if self.loss > 0.0 {
            out.push(Scenario {
                loss: 0.0,
                ..self.clone()
            });
        }
        if self.streams > 1 {
            out.push(Scenario {
                streams: 1,
                ..self.clone()
            });
        }
        if self.window > 1 {
            out.push(Scenario {
                window: 1,
                ..self.clone()
            });
        }
        if self.latency_ms != (1, 1) {
            out.push(Scenario {
                latency_ms: (1, 1),
                ..self.clone()
            });
        }
        out
    }
}
