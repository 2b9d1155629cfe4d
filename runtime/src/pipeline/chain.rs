//! A pipeline's chain of functions, run over one batch (or tick).

use crate::message::Message;
use crate::outbox::{Commit, DeadLetter, Held, SessionWrite, StateCommit, VersionWrite};

use super::slot::{FunctionSlot, Lifecycle};

/// What one batch (or tick) through the chains produced: everything the
/// outbox commits in one transaction.
#[derive(Debug, Default)]
pub struct ChainResult {
    /// Records for the outbox.
    pub outputs: Vec<Message>,
    /// Inputs refused or lost to a failing function, and refused outputs.
    pub dead_letters: Vec<DeadLetter>,
    /// Inputs parked behind an open breaker.
    pub held: Vec<Held>,
    /// Held inputs now run: `(owner, highest id consumed)`.
    pub held_consumed: Vec<(String, i64)>,
    /// Durable state changes, per function and generation.
    pub state: Vec<StateCommit>,
    /// Versions promoted or rolled back.
    pub lifecycle: Vec<Lifecycle>,
    /// Which lane each run of `outputs` belongs to: `(lane, count)`.
    pub lanes: Vec<(u32, usize)>,
    /// Losses to report with the commit (dead letters replayed...).
    pub losses: Vec<fogline_protocol::LossReport>,
    /// Outputs also kept for durable local subscribers.
    pub local: Vec<Message>,
    /// Durable local subscribers' positions, from ingest.
    pub local_subscribers: Vec<crate::outbox::SubscriberWrite>,
    /// Outputs of pipelines with `cloud = false`: for local subscribers
    /// only, never in the outbox's records.
    pub withheld: Vec<Message>,
}

impl ChainResult {
    /// The commit that makes all of it durable at once, with ingest's
    /// refusals and session changes and the dead letters it replayed.
    pub fn into_commit(
        self,
        mut dead_letters: Vec<DeadLetter>,
        sessions: Vec<SessionWrite>,
        replayed: Vec<i64>,
    ) -> Commit {
        let ChainResult {
            outputs,
            dead_letters: mut chain_dead,
            held,
            held_consumed,
            state,
            lifecycle,
            lanes,
            losses,
            local,
            local_subscribers,
            withheld: _,
        } = self;
        dead_letters.append(&mut chain_dead);
        let versions = lifecycle
            .into_iter()
            .map(|l| match l {
                Lifecycle::Promoted {
                    owner,
                    version,
                    retired,
                } => VersionWrite::Activate {
                    owner,
                    generation: version.generation,
                    module_sha256: version.module_sha256,
                    config_sha256: version.config_sha256,
                    config_json: version.config_json,
                    retire: Some(retired),
                },
                Lifecycle::RolledBack {
                    owner,
                    version,
                    reason,
                } => VersionWrite::Reject {
                    owner,
                    generation: version.generation,
                    module_sha256: version.module_sha256,
                    config_sha256: version.config_sha256,
                    reason,
                },
            })
            .collect();
        Commit {
            records: outputs,
            lanes,
            losses,
            dead_letters,
            sessions,
            state,
            held,
            held_consumed,
            replayed,
            versions,
            local,
            local_subscribers,
            clock_ms: crate::clock::high_water_ms(),
        }
    }
}

/// One pipeline: a name and its functions, in order.
pub struct Chain {
    /// The pipeline's name.
    pub name: String,
    /// Its lane in the outbox (quotas, drop order).
    pub lane: u32,
    /// Its outputs go to the outbox (and the cloud); false: to local
    /// subscribers only (`[[pipelines]] cloud = false`).
    pub cloud: bool,
    slots: Vec<FunctionSlot>,
}

impl Chain {
    /// A chain over its function slots, in order.
    pub fn new(name: String, slots: Vec<FunctionSlot>) -> Self {
        Self {
            name,
            lane: crate::outbox::retention::LEGACY_LANE,
            cloud: true,
            slots,
        }
    }

    /// The function slots, in order.
    pub fn slots(&self) -> &[FunctionSlot] {
        &self.slots
    }

    /// The function slots, to change (a swap, held counts).
    pub fn slots_mut(&mut self) -> &mut [FunctionSlot] {
        &mut self.slots
    }

    /// Process one batch of inputs.
    pub fn process(&mut self, batch: Vec<Message>, now_ms: u64, result: &mut ChainResult) {
        self.run_from(0, batch, now_ms, false, result);
    }

    /// Run `batch` through every function from step `from` on. `from_held`:
    /// these are held inputs of step `from`, run in order at last.
    pub fn run_from(
        &mut self,
        from: usize,
        mut batch: Vec<Message>,
        now_ms: u64,
        from_held: bool,
        result: &mut ChainResult,
    ) {
        for (n, slot) in self.slots.iter_mut().enumerate().skip(from) {
            if batch.is_empty() {
                return;
            }
            batch = slot.run(batch, now_ms, from_held && n == from, result);
        }
        if batch.is_empty() {
            return;
        }
        if !self.cloud {
            result.withheld.append(&mut batch);
            return;
        }
        match result.lanes.last_mut() {
            Some((lane, n)) if *lane == self.lane => *n += batch.len(),
            _ => result.lanes.push((self.lane, batch.len())),
        }
        result.outputs.append(&mut batch);
    }

    /// Call every function's `tick`; what function `i` emits goes through
    /// functions `i+1..`. A function whose breaker is open is not ticked; a
    /// half-open one is ticked as its probe.
    pub fn tick(&mut self, now_ms: u64, result: &mut ChainResult) {
        for i in 0..self.slots.len() {
            let emitted = self.slots[i].tick(now_ms, result);
            self.run_from(i + 1, emitted, now_ms, false, result);
        }
    }
}
