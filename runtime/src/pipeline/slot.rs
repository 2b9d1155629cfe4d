//! [`FunctionSlot`]: one function at one step of a pipeline — the running
//! version, a candidate version on probation, the circuit breaker, the
//! inputs held while it is open — and the isolation of failing inputs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::functions::{FunctionError, FunctionInstance, Limits, Module, Output};
use crate::message::Message;
use crate::outbox::{DeadLetter, Stage, StateCommit};

use super::breaker::{Admit, Breaker, BreakerConfig};
use super::chain::ChainResult;

/// What to do with a function's inputs while its breaker is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnOpen {
    /// Park them durably in the outbox (acknowledged to their senders) and
    /// run them through the function, in order, once it recovers.
    Hold,
    /// Dead-letter them (replayable with `fogline-edge dead-letters replay`).
    DeadLetter,
}

/// Which build of a function runs: what the outbox records for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Numbers the state this version owns (`function_state.generation`).
    pub generation: u64,
    /// SHA-256 of the module's bytes, hex.
    pub module_sha256: String,
    /// SHA-256 of the function's init config (JSON), hex.
    pub config_sha256: String,
    /// The init config itself.
    pub config_json: String,
}

impl Version {
    /// A short label: `gen 3 (module 1a2b3c4d, config 5e6f7a8b)`.
    pub fn label(&self) -> String {
        format!(
            "gen {} (module {}, config {})",
            self.generation,
            &self.module_sha256[..self.module_sha256.len().min(8)],
            &self.config_sha256[..self.config_sha256.len().min(8)]
        )
    }
}

/// How to (re)start an instance of a version.
#[derive(Clone)]
pub struct Spec {
    /// The compiled module.
    pub module: Module,
    /// Its `init` argument.
    pub config_json: String,
    /// Its limits.
    pub limits: Limits,
}

/// A version on probation: it runs in shadow on the same inputs as the
/// active one (its outputs are checked, then dropped; its state is
/// committed under its own generation) until `probation` batches passed,
/// then takes over. Any failure rolls it back.
pub struct Candidate {
    /// The running candidate.
    pub instance: FunctionInstance,
    /// Its version.
    pub version: Version,
    /// Batches it passed.
    pub passed: u32,
}

/// What happened to a function's versions in one batch, for the outbox and
/// for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    /// The candidate passed probation and is now the running version; the
    /// old generation's state is deleted.
    Promoted {
        /// `pipeline/function`.
        owner: String,
        /// The new running version.
        version: Version,
        /// The generation whose state goes.
        retired: u64,
    },
    /// The candidate failed: dropped with its state; the running version
    /// and its state never stopped.
    RolledBack {
        /// `pipeline/function`.
        owner: String,
        /// The refused version.
        version: Version,
        /// Why.
        reason: String,
    },
}

/// Extra calls one step may spend isolating failing inputs.
const ISOLATION_CALLS: usize = 64;

/// One function at one step of a pipeline.
pub struct FunctionSlot {
    /// `pipeline/function`: owns the state and held inputs.
    pub owner: String,
    /// The pipeline's name.
    pub pipeline: String,
    /// The function's name.
    pub function: String,
    /// Position in the pipeline's chain.
    pub step: usize,
    /// The running instance (`None`: it failed to start; the breaker
    /// retries).
    pub active: Option<FunctionInstance>,
    /// How to start it again.
    pub spec: Spec,
    /// The running version.
    pub version: Version,
    /// State to start from when `active` is `None`.
    pub start_state: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Why it last failed to start or call.
    pub last_error: Option<(u64, String)>,
    /// The breaker.
    pub breaker: Breaker,
    /// Inputs' fate while the breaker is open.
    pub on_open: OnOpen,
    /// Inputs parked in the outbox, not yet run.
    pub held: u64,
    /// Most bytes of held inputs; past it new ones are dead-lettered.
    pub max_held_bytes: u64,
    /// Bytes of held inputs (approximate: stream + payload).
    pub held_bytes: u64,
    /// A version on probation.
    pub candidate: Option<Candidate>,
    /// Batches a candidate must pass.
    pub probation: u32,
    /// A start in progress on its own thread.
    starting: Option<std::sync::mpsc::Receiver<Result<FunctionInstance, FunctionError>>>,
    /// The last version refused (module and config SHA-256): not tried
    /// again until one of them changes.
    pub refused: Option<(String, String)>,
    /// The last promotion or rollback.
    pub last_swap: Option<SwapNote>,
    breaker_cfg: BreakerConfig,
}

/// A promotion or rollback, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SwapNote {
    /// When (ms).
    pub at_ms: u64,
    /// `promoted` or `rolled_back`.
    pub outcome: String,
    /// The version it was about.
    pub version: String,
    /// Why it was rolled back.
    pub reason: Option<String>,
}

/// A function slot as `status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FunctionStatus {
    /// `pipeline/function`.
    pub owner: String,
    /// The running version.
    pub version: String,
    /// Whether an instance is running.
    pub running: bool,
    /// `closed`, `open` or `half-open`.
    pub breaker: String,
    /// Until when it is open (ms).
    pub open_until_ms: Option<u64>,
    /// Times the breaker opened.
    pub breaker_opened: u64,
    /// Inputs held behind the breaker.
    pub held: u64,
    /// Bytes of durable state.
    pub state_bytes: u64,
    /// Linear memory held.
    pub memory_bytes: u64,
    /// Restarts (rollbacks to the last good state).
    pub restarts: u64,
    /// The last failure: when and why.
    pub last_error: Option<(u64, String)>,
    /// A version on probation: its label, batches passed, batches needed.
    pub candidate: Option<(String, u32, u32)>,
    /// The last promotion or rollback.
    pub last_swap: Option<SwapNote>,
}

/// Durable state entries, by key.
pub type StateMap = BTreeMap<Vec<u8>, Vec<u8>>;

/// How a started function came out: running, or the error and the state it
/// is to start from on a retry.
pub type Started = Result<FunctionInstance, (FunctionError, StateMap)>;

/// How a step went, for the breaker.
#[derive(Debug, Default, Clone, Copy)]
struct StepOutcome {
    ok_calls: usize,
    failed_inputs: usize,
    /// Time spent in calls that failed.
    failed_time: Duration,
}

impl FunctionSlot {
    /// A slot running `instance` (or, if it failed to start, with `error`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pipeline: &str,
        function: &str,
        step: usize,
        spec: Spec,
        version: Version,
        started: Started,
        breaker_cfg: BreakerConfig,
        on_open: OnOpen,
        now_ms: u64,
    ) -> Self {
        let (active, start_state, last_error, breaker) = match started {
            Ok(i) => (Some(i), BTreeMap::new(), None, Breaker::new(breaker_cfg)),
            Err((e, state)) => (
                None,
                state,
                Some((now_ms, e.to_string())),
                Breaker::open_at(breaker_cfg, now_ms),
            ),
        };
        Self {
            owner: format!("{pipeline}/{function}"),
            pipeline: pipeline.to_string(),
            function: function.to_string(),
            step,
            active,
            spec,
            version,
            start_state,
            last_error,
            breaker,
            on_open,
            held: 0,
            max_held_bytes: 64 << 20,
            held_bytes: 0,
            candidate: None,
            probation: 10,
            starting: None,
            refused: None,
            last_swap: None,
            breaker_cfg,
        }
    }

    /// A slot for `function` at the first step of `pipeline`, started with
    /// no state, default breaker, holding its inputs while open: for
    /// benches, tests and `test-module`, which run functions without an
    /// outbox.
    pub fn standalone(
        pipeline: &str,
        function: &str,
        module: &Module,
        config_json: &str,
        limits: Limits,
    ) -> Result<Self, FunctionError> {
        let instance = FunctionInstance::from_module(
            module,
            function,
            config_json,
            limits.clone(),
            BTreeMap::new(),
        )?;
        Ok(Self::new(
            pipeline,
            function,
            0,
            Spec {
                module: module.clone(),
                config_json: config_json.to_string(),
                limits,
            },
            Version {
                generation: 1,
                module_sha256: String::new(),
                config_sha256: String::new(),
                config_json: config_json.to_string(),
            },
            Ok(instance),
            BreakerConfig::default(),
            OnOpen::Hold,
            0,
        ))
    }

    /// The breaker's settings.
    pub fn breaker_config(&self) -> BreakerConfig {
        self.breaker_cfg
    }

    /// Change the breaker's settings (a reload); the state is kept.
    pub fn set_breaker_config(&mut self, config: BreakerConfig) {
        self.breaker_cfg = config;
    }

    /// Remember a promotion or rollback for `status`.
    pub fn note_swap(
        &mut self,
        at_ms: u64,
        outcome: &str,
        version: &Version,
        reason: Option<String>,
    ) {
        self.last_swap = Some(SwapNote {
            at_ms,
            outcome: outcome.to_string(),
            version: version.label(),
            reason,
        });
    }

    /// What `status` shows.
    pub fn status(&self) -> FunctionStatus {
        let (breaker, open_until_ms) = match self.breaker.state() {
            super::breaker::BreakerState::Closed { .. } => ("closed", None),
            super::breaker::BreakerState::Open { until_ms } => ("open", Some(until_ms)),
            super::breaker::BreakerState::HalfOpen => ("half-open", None),
        };
        FunctionStatus {
            owner: self.owner.clone(),
            version: self.version.label(),
            running: self.active.is_some(),
            breaker: breaker.to_string(),
            open_until_ms,
            breaker_opened: self.breaker.times_opened(),
            held: self.held,
            state_bytes: self.active.as_ref().map_or(
                self.start_state
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum(),
                |a| a.state_bytes(),
            ) as u64,
            memory_bytes: self.active.as_ref().map_or(0, |a| a.memory_bytes()) as u64,
            restarts: self.active.as_ref().map_or(0, |a| a.restarts()),
            last_error: self.last_error.clone(),
            candidate: self
                .candidate
                .as_ref()
                .map(|c| (c.version.label(), c.passed, self.probation)),
            last_swap: self.last_swap.clone(),
        }
    }

    /// Resolved outputs: the messages, in order; dead letters to `result`.
    fn sort_out(&self, resolved: Vec<Resolved>, result: &mut ChainResult) -> Vec<Message> {
        let mut out = Vec::with_capacity(resolved.len());
        for r in resolved {
            match r {
                Resolved::Output(m) => out.push(m),
                Resolved::Dead {
                    reason,
                    error,
                    stage,
                    message,
                } => result
                    .dead_letters
                    .push(self.dead(&reason, error, stage, message)),
            }
        }
        out
    }

    fn dead(&self, reason: &str, error: String, stage: Stage, message: Message) -> DeadLetter {
        DeadLetter {
            pipeline: self.pipeline.clone(),
            function: self.function.clone(),
            reason: reason.to_string(),
            stage,
            error,
            payload_size: message.payload.len(),
            message,
        }
    }

    /// Inputs the function does not run now: held (in order) or
    /// dead-lettered, by policy and within the held budget.
    pub fn set_aside(&mut self, batch: Vec<Message>, why: &str, result: &mut ChainResult) {
        for m in batch {
            let bytes = (m.stream.len() + m.payload.len()) as u64;
            if self.on_open == OnOpen::Hold && self.held_bytes + bytes <= self.max_held_bytes {
                self.held += 1;
                self.held_bytes += bytes;
                result.held.push(crate::outbox::Held {
                    owner: self.owner.clone(),
                    step: self.step,
                    message: m,
                });
            } else {
                let error = if self.on_open == OnOpen::Hold {
                    format!(
                        "{why}; the inputs held for it reached max_held_mib ({} MiB)",
                        self.max_held_bytes >> 20
                    )
                } else {
                    why.to_string()
                };
                result
                    .dead_letters
                    .push(self.dead("circuit_open", error, Stage::Input, m));
            }
        }
    }

    fn open_reason(&self) -> String {
        match &self.last_error {
            Some((_, e)) => format!(
                "function `{}` is suspended (circuit open) after: {e}",
                self.function
            ),
            None => format!("function `{}` is suspended (circuit open)", self.function),
        }
    }

    /// Start the instance if it is not running. False if that failed (the
    /// breaker then stays open).
    /// Whether an instance runs. A function that is not running is started
    /// on a thread of its own (its `init` may hang until `init_timeout`; the
    /// pipeline must not wait for it): this returns false until it reports,
    /// and the inputs meanwhile are set aside like those of an open breaker.
    pub fn ready(&mut self, now_ms: u64) -> bool {
        if self.active.is_some() {
            return true;
        }
        if let Some(rx) = &self.starting {
            let outcome = match rx.try_recv() {
                Ok(outcome) => outcome,
                Err(std::sync::mpsc::TryRecvError::Empty) => return false,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => Err(FunctionError::Init {
                    function: self.function.clone(),
                    message: "the start thread ended without an answer".into(),
                }),
            };
            self.starting = None;
            return match outcome {
                Ok(i) => {
                    tracing::info!(pipeline = %self.pipeline, function = %self.function, "Function started.");
                    self.active = Some(i);
                    self.start_state.clear();
                    true
                }
                Err(e) => {
                    tracing::warn!(pipeline = %self.pipeline, function = %self.function, error = %e, "Function failed to start.");
                    self.last_error = Some((now_ms, e.to_string()));
                    if self.breaker.on_failure(now_ms) {
                        super::events::BreakerOpened { owner: &self.owner }.emit();
                    }
                    false
                }
            };
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let Spec {
            module,
            config_json,
            limits,
        } = self.spec.clone();
        let function = self.function.clone();
        let state = self.start_state.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("start-{}", self.function))
            .spawn(move || {
                let _ = tx.send(FunctionInstance::from_module(
                    &module,
                    &function,
                    &config_json,
                    limits,
                    state,
                ));
            });
        match spawned {
            Ok(_) => self.starting = Some(rx),
            Err(e) => {
                self.last_error = Some((now_ms, format!("cannot start a thread to start it: {e}")));
                self.breaker.on_failure(now_ms);
            }
        }
        false
    }

    fn ensure_started(&mut self, now_ms: u64) -> bool {
        self.ready(now_ms)
    }

    /// Run `batch` through the function (breaker, probe, isolation, shadow
    /// candidate). Returns its outputs; refusals, failures and state go to
    /// `result`.
    pub fn run(
        &mut self,
        batch: Vec<Message>,
        now_ms: u64,
        from_held: bool,
        result: &mut ChainResult,
    ) -> Vec<Message> {
        if batch.is_empty() {
            return batch;
        }
        // New inputs queue behind the held ones: per-stream order.
        if self.held > 0 && !from_held {
            let why = format!("queued behind {} held inputs", self.held);
            self.set_aside(batch, &why, result);
            return Vec::new();
        }
        match self.breaker.admit(now_ms) {
            Admit::None => {
                let why = self.open_reason();
                self.set_aside(batch, &why, result);
                Vec::new()
            }
            Admit::Probe => {
                if !self.ensure_started(now_ms) {
                    let why = self.open_reason();
                    self.set_aside(batch, &why, result);
                    return Vec::new();
                }
                let mut rest = batch;
                let probe = vec![rest.remove(0)];
                let (mut out, outcome) = self.step(probe, now_ms, result);
                if outcome.ok_calls == 0 {
                    self.breaker.on_failure(now_ms);
                    let why = self.open_reason();
                    self.set_aside(rest, &why, result);
                    return out;
                }
                tracing::info!(pipeline = %self.pipeline, function = %self.function, "Function recovered: circuit closed.");
                self.breaker.on_success();
                out.append(&mut self.run_closed(rest, now_ms, result));
                out
            }
            Admit::All => self.run_closed(batch, now_ms, result),
        }
    }

    fn run_closed(
        &mut self,
        batch: Vec<Message>,
        now_ms: u64,
        result: &mut ChainResult,
    ) -> Vec<Message> {
        if batch.is_empty() {
            return batch;
        }
        if !self.ensure_started(now_ms) {
            let why = self.open_reason();
            self.set_aside(batch, &why, result);
            return Vec::new();
        }
        let (out, outcome) = self.step(batch, now_ms, result);
        // A step that failed on everything counts towards opening; one that
        // spent a whole deadline failing (a spin, a sleep) opens at once:
        // every such step costs the pipeline that much.
        let costly = outcome.failed_time >= self.spec.limits.call_timeout;
        if outcome.ok_calls > 0 {
            self.breaker.on_success();
        } else if outcome.failed_inputs > 0
            && (if costly {
                self.breaker.trip(now_ms)
            } else {
                self.breaker.on_failure(now_ms)
            })
        {
            tracing::warn!(
                pipeline = %self.pipeline,
                function = %self.function,
                error = self.last_error.as_ref().map(|(_, e)| e.as_str()).unwrap_or(""),
                policy = ?self.on_open,
                "Function keeps failing: circuit opened; its inputs are set aside until a probe succeeds."
            );
            super::events::BreakerOpened { owner: &self.owner }.emit();
        }
        out
    }

    /// Call the function's `tick` (only while its breaker is closed);
    /// returns what it emitted. The candidate ticks in shadow.
    pub fn tick(&mut self, now_ms: u64, result: &mut ChainResult) -> Vec<Message> {
        // Only a closed breaker ticks: a tick that succeeds says nothing of
        // the batches that failed, so inputs probe, ticks do not.
        let admit = self.breaker.admit(now_ms);
        if admit != Admit::All || !self.ensure_started(now_ms) {
            return Vec::new();
        }
        let Some(active) = self.active.as_mut() else {
            return Vec::new();
        };
        match active.tick(now_ms) {
            Ok(mut output) => {
                let changes = std::mem::take(&mut output.state);
                if !changes.is_empty() {
                    result.state.push(StateCommit {
                        owner: self.owner.clone(),
                        generation: self.version.generation,
                        changes,
                    });
                }
                let out = self.sort_out(resolve(Vec::new(), output), result);
                if let Some(c) = self.candidate.as_mut() {
                    let outcome = c.instance.tick(now_ms).map(|o| o.state);
                    self.finish_shadow(outcome, false, result);
                }
                out
            }
            Err(e) => {
                tracing::warn!(pipeline = %self.pipeline, function = %self.function, error = %e, "Function tick failed; rolled back to its last good state, tried again next tick.");
                self.last_error = Some((now_ms, e.to_string()));
                if self.breaker.on_failure(now_ms) {
                    super::events::BreakerOpened { owner: &self.owner }.emit();
                }
                Vec::new()
            }
        }
    }

    /// One step: the active function with isolation, then the candidate in
    /// shadow on the inputs the active one did not fail on.
    fn step(
        &mut self,
        batch: Vec<Message>,
        now_ms: u64,
        result: &mut ChainResult,
    ) -> (Vec<Message>, StepOutcome) {
        let shadow = self.candidate.as_ref().map(|_| batch.clone());
        let Some(active) = self.active.as_mut() else {
            return (Vec::new(), StepOutcome::default());
        };
        let mut outcome = StepOutcome::default();
        let mut failed: Vec<usize> = Vec::new();
        let mut isolation = Isolation::new(active.limits(), batch.len());
        let indices: Vec<usize> = (0..batch.len()).collect();
        let mut slots: Vec<Option<Message>> = batch.into_iter().map(Some).collect();
        let mut state = Vec::new();
        let mut out = Vec::new();
        let mut errors = Vec::new();
        let mut acc = Accumulated {
            out: &mut out,
            state: &mut state,
            failed: &mut failed,
            errors: &mut errors,
            outcome: &mut outcome,
        };
        isolate(active, &mut slots, &indices, &mut isolation, &mut acc);
        // What failed is dead-lettered with its error.
        if let Some((_, e)) = errors.last() {
            self.last_error = Some((now_ms, e.to_string()));
        }
        for (i, e) in errors {
            if let Some(m) = slots[i].take() {
                result
                    .dead_letters
                    .push(self.dead(e.kind(), e.to_string(), Stage::Input, m));
            }
        }
        let resolved = self.sort_out(out, result);
        if !state.is_empty() {
            result.state.push(StateCommit {
                owner: self.owner.clone(),
                generation: self.version.generation,
                changes: state,
            });
        }
        if let Some(inputs) = shadow {
            let good: Vec<Message> = inputs
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !failed.contains(i))
                .map(|(_, m)| m)
                .collect();
            self.shadow(good, result);
        }
        (resolved, outcome)
    }

    /// Run the candidate on what the active version accepted; promote it
    /// after its probation, roll it back on any failure.
    fn shadow(&mut self, inputs: Vec<Message>, result: &mut ChainResult) {
        let Some(c) = self.candidate.as_mut() else {
            return;
        };
        let outcome = if inputs.is_empty() {
            Ok(Vec::new())
        } else {
            c.instance.process(&inputs).map(|o| o.state)
        };
        self.finish_shadow(outcome, true, result);
    }

    /// A candidate's call finished: commit its state, count the batch, and
    /// promote or roll back.
    pub fn finish_shadow(
        &mut self,
        outcome: Result<Vec<crate::functions::StateChange>, FunctionError>,
        counts: bool,
        result: &mut ChainResult,
    ) {
        let Some(mut c) = self.candidate.take() else {
            return;
        };
        match outcome {
            Err(e) => {
                tracing::warn!(
                    pipeline = %self.pipeline,
                    function = %self.function,
                    version = %c.version.label(),
                    error = %e,
                    "New version failed on probation: rolled back; the running version and its state carry on."
                );
                self.refused = Some((
                    c.version.module_sha256.clone(),
                    c.version.config_sha256.clone(),
                ));
                self.note_swap(
                    crate::clock::now_ms(),
                    "rolled_back",
                    &c.version,
                    Some(e.to_string()),
                );
                super::events::Swapped {
                    owner: &self.owner,
                    outcome: "rolled_back",
                }
                .emit();
                result.lifecycle.push(Lifecycle::RolledBack {
                    owner: self.owner.clone(),
                    version: c.version,
                    reason: e.to_string(),
                });
            }
            Ok(changes) => {
                if !changes.is_empty() {
                    result.state.push(StateCommit {
                        owner: self.owner.clone(),
                        generation: c.version.generation,
                        changes,
                    });
                }
                if counts {
                    c.passed += 1;
                }
                if c.passed >= self.probation {
                    let retired = self.version.generation;
                    tracing::info!(
                        pipeline = %self.pipeline,
                        function = %self.function,
                        from = %self.version.label(),
                        to = %c.version.label(),
                        "New version passed probation and took over."
                    );
                    self.spec.module = c.instance.module().clone();
                    self.spec.config_json = c.instance.config_json().to_string();
                    self.spec.limits = c.instance.limits().clone();
                    self.version = c.version.clone();
                    self.active = Some(c.instance);
                    self.breaker.on_success();
                    self.note_swap(crate::clock::now_ms(), "promoted", &c.version, None);
                    super::events::Swapped {
                        owner: &self.owner,
                        outcome: "promoted",
                    }
                    .emit();
                    result.lifecycle.push(Lifecycle::Promoted {
                        owner: self.owner.clone(),
                        version: c.version,
                        retired,
                    });
                } else {
                    self.candidate = Some(c);
                }
            }
        }
    }
}

/// A resolved output of one call: a message, or a dead letter.
enum Resolved {
    Output(Message),
    Dead {
        reason: String,
        error: String,
        stage: Stage,
        message: Message,
    },
}

/// Where [`isolate`] puts what it finds.
struct Accumulated<'a> {
    out: &'a mut Vec<Resolved>,
    state: &'a mut Vec<crate::functions::StateChange>,
    failed: &'a mut Vec<usize>,
    errors: &'a mut Vec<(usize, FunctionError)>,
    outcome: &'a mut StepOutcome,
}

/// Bounds on isolating failures in one step: calls and time.
struct Isolation {
    calls_left: usize,
    started: Instant,
    budget: Duration,
}

impl Isolation {
    fn new(limits: &Limits, n: usize) -> Self {
        // Enough to find one input that spins: one full deadline, then a
        // binary search (a deadline per level), each level on half the rest.
        let levels = usize::BITS - n.max(1).leading_zeros();
        let budget = (limits.call_timeout * (levels + 1))
            + limits.timeout_per_message * (2 * n.min(u32::MAX as usize / 2)) as u32;
        Self {
            calls_left: ISOLATION_CALLS,
            started: Instant::now(),
            budget,
        }
    }

    fn may_split(&mut self) -> bool {
        if self.calls_left < 2 || self.started.elapsed() >= self.budget {
            return false;
        }
        self.calls_left -= 2;
        true
    }
}

/// Call `f` on the inputs at `indices` (cloned from `slots`: the retry of a
/// half needs them). On success the output is resolved into messages and
/// dead letters, and its state changes kept. On failure, unless one input is
/// left or the isolation budget is spent, retry each half, in order (the
/// instance restarts from the state of its last success in between); what
/// still fails is recorded with its error.
fn isolate(
    f: &mut FunctionInstance,
    slots: &mut [Option<Message>],
    indices: &[usize],
    iso: &mut Isolation,
    acc: &mut Accumulated<'_>,
) {
    let inputs: Vec<Message> = indices.iter().filter_map(|&i| slots[i].clone()).collect();
    let started = Instant::now();
    let called = f.process(&inputs);
    if called.is_err() {
        acc.outcome.failed_time += started.elapsed();
    }
    match called {
        Ok(mut output) => {
            acc.outcome.ok_calls += 1;
            for &i in indices {
                slots[i] = None;
            }
            acc.state.append(&mut output.state);
            acc.out.extend(resolve(inputs, output));
        }
        Err(e) if indices.len() > 1 && iso.may_split() => {
            tracing::debug!(function = %f.name(), error = %e, inputs = indices.len(), "Function failed; retrying in halves to isolate the failing input.");
            let (left, right) = indices.split_at(indices.len() / 2);
            isolate(f, slots, left, iso, acc);
            isolate(f, slots, right, iso, acc);
        }
        Err(e) => {
            acc.outcome.failed_inputs += indices.len();
            tracing::warn!(function = %f.name(), error = %e, inputs = indices.len(), "Function failed; its input sent to dead letters.");
            for &i in indices {
                acc.failed.push(i);
                acc.errors.push((i, e.clone()));
            }
        }
    }
}

/// Turn a successful call's output into messages, in emission order, and dead
/// letters: inputs the function rejected, inputs whose outputs the host
/// refused (with every other output of theirs), and refused tick outputs.
/// Forwarded inputs are moved on their last use, cloned before.
fn resolve(inputs: Vec<Message>, output: Output) -> Vec<Resolved> {
    let Output {
        emitted,
        rejected,
        refused,
        ..
    } = output;
    let mut out = Vec::with_capacity(emitted.len() + rejected.len() + refused.len());
    let mut inputs: Vec<Option<Message>> = inputs.into_iter().map(Some).collect();
    let mut dropped = vec![false; inputs.len()];
    let mut dead_inputs: Vec<(usize, String, String)> = Vec::new();
    for r in rejected {
        dropped[r.index] = true;
        dead_inputs.push((r.index, "rejected".to_string(), r.error));
    }
    for r in refused {
        match r.input {
            Some(i) => {
                let i = i as usize;
                if !dropped[i] {
                    dropped[i] = true;
                    dead_inputs.push((i, "invalid_output".to_string(), r.error));
                }
            }
            None => out.push(Resolved::Dead {
                reason: "invalid_output".into(),
                error: r.error,
                stage: Stage::Output,
                message: Message {
                    stream: r.stream,
                    timestamp_ms: r.timestamp_ms,
                    payload: r.payload,
                },
            }),
        }
    }
    // Last use of each input by a forward, so it can be moved then.
    let mut last_use = vec![usize::MAX; inputs.len()];
    for (n, e) in emitted.iter().enumerate() {
        if let Some(i) = e.input {
            if e.stream.is_none() || e.payload.is_none() {
                last_use[i as usize] = n;
            }
        }
    }
    for (n, e) in emitted.into_iter().enumerate() {
        let src = e.input.map(|i| i as usize);
        if src.is_some_and(|i| dropped[i]) {
            continue;
        }
        let needs_input = e.stream.is_none() || e.payload.is_none();
        let message = match (src, needs_input) {
            (Some(i), true) => {
                let input = if last_use[i] == n {
                    inputs[i].take()
                } else {
                    inputs[i].clone()
                };
                let Some(input) = input else { continue };
                Message {
                    stream: e.stream.unwrap_or(input.stream),
                    timestamp_ms: e.timestamp_ms,
                    payload: e.payload.unwrap_or(input.payload),
                }
            }
            _ => Message {
                stream: e.stream.unwrap_or_default(),
                timestamp_ms: e.timestamp_ms,
                payload: e.payload.unwrap_or_default(),
            },
        };
        out.push(Resolved::Output(message));
    }
    for (i, reason, error) in dead_inputs {
        if let Some(m) = inputs[i].take() {
            out.push(Resolved::Dead {
                reason,
                error,
                stage: Stage::Input,
                message: m,
            });
        }
    }
    out
}
