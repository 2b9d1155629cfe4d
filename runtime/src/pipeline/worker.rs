//! The pipeline worker: one OS thread that owns the function instances and
//! the outbox writer. Batching is group commit: while one commit is being
//! fsynced, chunks from every connection queue up, and the next batch takes
//! all of them (up to `max_batch` messages and `max_batch_bytes`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use tracing::{error, info, warn};

use super::slot::{FunctionStatus, Spec, Version};
use super::{plan_batch, Admit, Chain, ChainResult, OnOpen, Router};
use crate::functions::{FunctionInstance, Limits};
use crate::ingest::session_store::Replica;
use crate::ingest::{Ack, AckRoute, Chunk, ChunkReceiver};
use crate::outbox::{Commit, Outbox, SessionWrite};

/// How often held inputs, replay requests and the functions' status are
/// looked at.
const HOUSEKEEPING: Duration = Duration::from_millis(250);

/// A batch smaller than this waits up to `commit_linger` for more.
const LINGER_BELOW: usize = 512;

/// Batching and limits for the worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Most messages per batch.
    pub max_batch: usize,
    /// Most bytes per batch.
    pub max_batch_bytes: usize,
    /// How long a small batch waits for more (see `outbox.commit_linger`).
    pub commit_linger: Duration,
    /// Batches are taken at most this often (see `outbox.commit_interval`):
    /// what arrives in between waits, unacknowledged, for one commit.
    pub commit_interval: Duration,
    /// Longest topic that may become a stream name.
    pub max_topic: usize,
    /// How often functions tick.
    pub tick_interval: Duration,
    /// What happens to messages no pipeline takes.
    pub unrouted: crate::config::UnroutedPolicy,
}

/// Progress the health check reads.
#[derive(Debug, Default)]
pub struct PipelineHealth {
    /// When the last commit finished (ms since epoch; 0: none yet).
    pub last_commit_ms: AtomicU64,
    /// When the commit in progress started (0: none in progress).
    pub commit_started_ms: AtomicU64,
    /// Commits that failed and are being retried right now.
    pub failing: AtomicBool,
    /// Since when commits fail, whether for a full disk, and the last error.
    pub failure: std::sync::Mutex<Option<CommitFailure>>,
    /// Commits done.
    pub commits: AtomicU64,
    /// The highest sequence number committed (the uplink sizes its batches by it).
    pub committed_seq: Arc<AtomicU64>,
}

/// Commits failing right now, for `/healthz`.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitFailure {
    /// Since when (ms since epoch).
    pub since_ms: u64,
    /// Why: a full disk, a damaged file, another store error.
    pub kind: fogline_telemetry::health::ProblemKind,
    /// The last error.
    pub detail: String,
}

impl PipelineHealth {
    fn note_failure(&self, kind: fogline_telemetry::health::ProblemKind, detail: &str) {
        if let Ok(mut f) = self.failure.lock() {
            let since_ms = f.as_ref().map_or_else(crate::clock::now_ms, |f| f.since_ms);
            *f = Some(CommitFailure {
                since_ms,
                kind,
                detail: detail.to_string(),
            });
        }
    }

    fn clear_failure(&self) {
        if let Ok(mut f) = self.failure.lock() {
            *f = None;
        }
    }
}

/// The running worker.
pub struct WorkerHandle {
    join: std::thread::JoinHandle<()>,
    stop: Arc<AtomicBool>,
    flush: Arc<Flush>,
}

/// Ends the wait for `commit_interval`: the daemon is stopping, and what
/// the worker took is committed and acknowledged now (I-16).
#[derive(Debug, Default)]
struct Flush {
    now: AtomicBool,
    wake: Notify,
}

impl WorkerHandle {
    /// Wait for the worker to finish: it ends when every ingest sink is gone,
    /// after committing and acknowledging what it took.
    pub fn join(self) {
        let _ = self.join.join();
    }

    /// Commit what is gathered at once from now on, without waiting for
    /// `commit_interval` (the daemon is stopping).
    pub fn commit_now(&self) {
        self.flush.now.store(true, Ordering::Release);
        self.flush.wake.notify_one();
    }

    /// Give up retrying a failing commit (shutdown while the disk is full):
    /// the batch stays unacknowledged and its senders resend it.
    pub fn abandon_retries(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}

/// Everything the worker owns.
pub struct Worker {
    /// Chains, index = pipeline index in the config.
    pub chains: Vec<Chain>,
    /// Topic routing.
    pub router: Router,
    /// The outbox writer.
    pub outbox: Outbox,
    /// Options.
    pub options: WorkerOptions,
    /// Woken after each commit that wrote records (the uplink waits on it).
    pub committed: Arc<Notify>,
    /// Durable state of the ingest sessions (for compaction).
    pub sessions: Replica,
    /// Progress for `/healthz`.
    pub health: Arc<PipelineHealth>,
    /// Swaps and other requests from the daemon.
    pub commands: mpsc::UnboundedReceiver<WorkerCommand>,
    /// The functions as `status` shows them, refreshed by the worker.
    pub functions: Arc<Mutex<Vec<FunctionStatus>>>,
    /// Topics already warned about as unrouted.
    pub warned_unrouted: std::collections::HashSet<String>,
    /// Pipelines whose outputs also go to local subscribers.
    pub local: LocalOutputs,
}

/// Where pipelines with `local` hand their outputs, by chain index: to the
/// endpoint's subscribers as the functions return, before the commit
/// (`immediate`), or into the commit, delivered after it (`durable`)
/// (crate::local).
#[derive(Debug, Default)]
pub struct LocalOutputs {
    /// The endpoint's subscribers.
    pub bus: Arc<crate::local::LocalBus>,
    /// Per chain: its `local` mode.
    pub modes: Vec<crate::config::LocalMode>,
}

impl LocalOutputs {
    /// Chain `chain` produced the tail of `result.outputs` from `before.0`
    /// (or, with `cloud = false`, of `result.withheld` from `before.1`).
    fn hand_over(&self, chain: usize, result: &mut ChainResult, before: (usize, usize)) {
        let outputs = if result.withheld.len() > before.1 {
            &result.withheld[before.1..]
        } else {
            &result.outputs[before.0..]
        };
        if outputs.is_empty() {
            return;
        }
        match self.modes.get(chain) {
            Some(crate::config::LocalMode::Immediate) if !self.bus.is_idle() => {
                for m in outputs {
                    self.bus.publish(&m.stream, &m.payload);
                }
            }
            Some(crate::config::LocalMode::Durable) => {
                result.local.extend_from_slice(outputs);
            }
            _ => {}
        }
    }
}

/// A request to the worker, applied between batches.
pub enum WorkerCommand {
    /// New versions (or new settings) of functions, from a reload.
    Swap(Vec<SwapRequest>),
}

/// A function's configured build and settings, from a reload.
pub struct SwapRequest {
    /// `pipeline/function`.
    pub owner: String,
    /// The build and its init config and limits.
    pub spec: Spec,
    /// Its hashes (the generation is given when it is proposed).
    pub version: Version,
    /// Breaker settings.
    pub breaker: super::BreakerConfig,
    /// Inputs' fate while open.
    pub on_open: OnOpen,
    /// Batches on probation.
    pub probation: u32,
    /// Held-input budget.
    pub max_held_bytes: u64,
    /// Its `init` failed on trial (before the swap): it is refused as is.
    pub init_error: Option<String>,
}

/// Start the worker thread.
pub fn spawn_worker(worker: Worker, chunks: ChunkReceiver) -> std::io::Result<WorkerHandle> {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let flush = Arc::new(Flush::default());
    let flush2 = flush.clone();
    let join = std::thread::Builder::new()
        .name("pipeline".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!(error = %e, "Cannot start the pipeline worker's runtime.");
                    return;
                }
            };
            // A panic here is a bug in the host, never a guest's doing (traps
            // are errors): stopping the process is safer than a daemon whose
            // endpoint refuses everything. Nothing unacknowledged is lost.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(worker, chunks, stop2, &flush2, &rt)
            }));
            if outcome.is_err() {
                error!("The pipeline worker crashed; stopping the daemon so that it restarts clean (nothing unacknowledged is lost).");
                std::process::exit(70);
            }
        })?;
    Ok(WorkerHandle { join, stop, flush })
}

/// What woke the worker.
enum Wake {
    Chunk(Chunk),
    Closed,
    Command(Option<WorkerCommand>),
    Timer,
}

/// The worker's loop. It waits in the async runtime (channels, timers) and
/// leaves it to do the work: function calls never run inside a runtime
/// context (wasmtime-wasi's blocking calls start their own, and would panic
/// inside ours).
fn run(
    mut w: Worker,
    mut rx: ChunkReceiver,
    stop: Arc<AtomicBool>,
    flush: &Flush,
    rt: &tokio::runtime::Runtime,
) {
    let mut next_tick = Instant::now() + w.options.tick_interval;
    let mut next_housekeeping = Instant::now();
    let mut commands_open = true;
    // When the last batch was taken (`commit_interval` counts from it).
    let mut last_taken: Option<Instant> = None;
    publish_status(&w);
    loop {
        let wake = next_tick.min(next_housekeeping);
        let wait = wake.saturating_duration_since(Instant::now());
        let commands = &mut w.commands;
        let event = rt.block_on(async {
            tokio::select! {
                c = rx.recv() => match c {
                    Some(c) => Wake::Chunk(c),
                    None => Wake::Closed,
                },
                cmd = commands.recv(), if commands_open => Wake::Command(cmd),
                _ = tokio::time::sleep(wait) => Wake::Timer,
            }
        });
        let first = match event {
            Wake::Closed => break,
            Wake::Command(Some(cmd)) => {
                if !apply_command(&mut w, cmd, &stop) {
                    break;
                }
                None
            }
            Wake::Command(None) => {
                commands_open = false;
                None
            }
            Wake::Chunk(c) => Some(c),
            Wake::Timer => None,
        };
        if let Some(first) = first {
            let mut items = first.items.len();
            let mut bytes = first.bytes();
            let mut batch = vec![first];
            let full = |items: usize, bytes: usize| {
                items >= w.options.max_batch || bytes >= w.options.max_batch_bytes
            };
            while !full(items, bytes) {
                match rx.try_recv() {
                    Ok(c) => {
                        items += c.items.len();
                        bytes += c.bytes();
                        batch.push(c);
                    }
                    Err(_) => break,
                }
            }
            // Messages trickling in one by one (a broker forwarding, many slow
            // sensors): gather a little longer, one commit for many. The
            // least patient chunk decides how long.
            let linger = batch
                .iter()
                .map(|c| c.linger.unwrap_or(w.options.commit_linger))
                .min()
                .unwrap_or(w.options.commit_linger);
            if items < LINGER_BELOW && !linger.is_zero() {
                let until = Instant::now() + linger;
                while items < LINGER_BELOW && !full(items, bytes) {
                    let left = until.saturating_duration_since(Instant::now());
                    let more = rt.block_on(async {
                        tokio::select! {
                            c = rx.recv() => c,
                            _ = tokio::time::sleep(left) => None,
                        }
                    });
                    match more {
                        Some(c) => {
                            items += c.items.len();
                            bytes += c.bytes();
                            let impatient = c.linger.is_some_and(|l| l < linger);
                            batch.push(c);
                            if impatient {
                                break;
                            }
                        }
                        None => break,
                    }
                }
            }
            // `commit_interval`: each batch gathers at least that long since
            // the last one was taken (a full one goes at once). Fewer, fuller
            // commits write fewer pages; the acks wait with the batch (I-1).
            let interval = w.options.commit_interval;
            if let Some(until) = last_taken
                .map(|t| t + interval)
                .filter(|_| !interval.is_zero())
            {
                while !full(items, bytes) && !flush.now.load(Ordering::Acquire) {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    let more = rt.block_on(async {
                        tokio::select! {
                            c = rx.recv() => c,
                            _ = tokio::time::sleep(left) => None,
                            _ = flush.wake.notified() => None,
                        }
                    });
                    match more {
                        Some(c) => {
                            items += c.items.len();
                            bytes += c.bytes();
                            batch.push(c);
                        }
                        // Time is up, ingest closed, or the daemon is stopping.
                        None => break,
                    }
                }
            }
            last_taken = Some(Instant::now());
            if !process_batch(&mut w, &mut batch, &stop) {
                break;
            }
            // A crash between the durable commit and the acknowledgements.
            fail::fail_point!(
                "pipeline::after_commit_before_ack",
                |_| std::process::abort()
            );
            dispatch_acks(&batch);
            // Dropping the chunks returns their bytes to the ingest budget.
            drop(batch);
        }
        if Instant::now() >= next_tick {
            next_tick = Instant::now() + w.options.tick_interval;
            let now = crate::clock::ingest_ms();
            let mut result = ChainResult::default();
            for (i, chain) in w.chains.iter_mut().enumerate() {
                let before = (result.outputs.len(), result.withheld.len());
                chain.tick(now, &mut result);
                w.local.hand_over(i, &mut result, before);
            }
            if !commit_result(&mut w, result, Vec::new(), Vec::new(), Vec::new(), &stop) {
                break;
            }
        }
        if Instant::now() >= next_housekeeping {
            next_housekeeping = Instant::now() + HOUSEKEEPING;
            if !drain_held(&mut w, &stop) || !replay_dead_letters(&mut w, &stop) {
                break;
            }
            // max_age (I-32): records that waited too long are dropped and counted.
            if let Err(e) = w.outbox.expire() {
                error!(error = %e, "Dropping expired records failed; tried again shortly.");
            }
            // Outputs every durable local subscriber has (I-40).
            let hub = w.local.bus.durable.clone();
            if hub.enabled() {
                match w.outbox.trim_local(&|c| hub.is_connected(c)) {
                    Ok(gone) if !gone.is_empty() => {
                        info!(subscribers = ?gone, "Durable local subscribers whose session expired are forgotten.");
                        hub.forget(&gone);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        error!(error = %e, "Trimming outputs kept for local subscribers failed; tried again shortly.")
                    }
                }
            }
            publish_status(&w);
        }
    }
    publish_status(&w);
    info!("Pipeline worker stopped.");
}

/// Refresh what `status` shows of the functions.
fn publish_status(w: &Worker) {
    let all: Vec<FunctionStatus> = w
        .chains
        .iter()
        .flat_map(|c| c.slots().iter().map(|s| s.status()))
        .collect();
    for s in &all {
        metrics::gauge!(crate::functions::events::STATE_BYTES, "function" => s.owner.clone())
            .set(s.state_bytes as f64);
    }
    if let Ok(mut f) = w.functions.lock() {
        *f = all;
    }
}

/// Run held inputs of functions whose breaker lets them through: one batch
/// per function (a single probe when half-open), in order.
fn drain_held(w: &mut Worker, stop: &AtomicBool) -> bool {
    let now = crate::clock::ingest_ms();
    let max = w.options.max_batch;
    let mut result = ChainResult::default();
    for chain in &mut w.chains {
        for i in 0..chain.slots().len() {
            let slot = &mut chain.slots_mut()[i];
            if slot.held == 0 {
                continue;
            }
            let take = match slot.breaker.admit(now) {
                Admit::None => continue,
                Admit::Probe => 1,
                Admit::All => max,
            };
            // Held inputs run only on a running function: drained rows are
            // consumed, never set aside again (that would reorder them).
            if !slot.ready(now) {
                continue;
            }
            let held = match w.outbox.read_held(&slot.owner, take) {
                Ok(h) => h,
                Err(e) => {
                    error!(function = %slot.owner, error = %e, "Reading held inputs failed.");
                    continue;
                }
            };
            let Some(last) = held.last().map(|h| h.id) else {
                // Counted but gone (pruned by hand?): nothing to wait for.
                slot.held = 0;
                slot.held_bytes = 0;
                continue;
            };
            let owner = slot.owner.clone();
            let step = slot.step;
            let bytes: u64 = held
                .iter()
                .map(|h| (h.message.stream.len() + h.message.payload.len()) as u64)
                .sum();
            slot.held = slot.held.saturating_sub(held.len() as u64);
            slot.held_bytes = slot.held_bytes.saturating_sub(bytes);
            let messages = held.into_iter().map(|h| h.message).collect();
            chain.run_from(step, messages, now, true, &mut result);
            result.held_consumed.push((owner, last));
        }
    }
    count_withheld(&result);
    commit_result(w, result, Vec::new(), Vec::new(), Vec::new(), stop)
}

/// Run dead letters someone asked to replay through the current version of
/// their pipeline, from the function that refused them; the replayed rows
/// are deleted in the same commit as what the replay produced.
fn replay_dead_letters(w: &mut Worker, stop: &AtomicBool) -> bool {
    let requests = match w.outbox.replay_requests(w.options.max_batch) {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "Reading replay requests failed.");
            return true;
        }
    };
    if requests.is_empty() {
        return true;
    }
    let now = crate::clock::ingest_ms();
    let mut result = ChainResult::default();
    let mut replayed = Vec::new();
    let mut again = Vec::new();
    for d in requests {
        replayed.push(d.id);
        let original = d.to_dead_letter();
        result.losses.push(fogline_protocol::LossReport {
            stream: original.message.stream.clone(),
            reason: fogline_protocol::LossReason::Replayed,
            detail: Some(original.reason.clone()),
            records: 1,
            bytes: (original.message.stream.len() + original.payload_size) as u64,
            first_seq: None,
            last_seq: None,
            first_ms: original.message.timestamp_ms,
            last_ms: original.message.timestamp_ms,
        });
        // A message no pipeline took: routed again, by its topic.
        if d.pipeline == "ingest" && d.function == super::batch::UNROUTED {
            let routes = w.router.route(&original.message.stream).to_vec();
            if routes.is_empty() {
                again.push(original);
                continue;
            }
            for i in routes {
                if let Some(chain) = w.chains.get_mut(i) {
                    chain.run_from(0, vec![original.message.clone()], now, false, &mut result);
                }
            }
            continue;
        }
        let chain = w.chains.iter_mut().find(|c| c.name == d.pipeline);
        let step = chain.as_ref().and_then(|c| {
            c.slots()
                .iter()
                .position(|s| s.function == d.function)
                .map(|i| match d.stage() {
                    crate::outbox::Stage::Input => i,
                    crate::outbox::Stage::Output => i + 1,
                })
        });
        let (Some(chain), Some(step)) = (chain, step) else {
            let mut dl = d.to_dead_letter();
            dl.error = format!(
                "cannot replay: pipeline `{}` has no function `{}` now (first refused: {})",
                d.pipeline, d.function, d.error
            );
            again.push(dl);
            continue;
        };
        let message = d.to_dead_letter().message;
        chain.run_from(step, vec![message], now, false, &mut result);
    }
    info!(
        replayed = replayed.len(),
        refused_again = again.len(),
        "Replaying dead letters."
    );
    count_withheld(&result);
    commit_result(w, result, again, Vec::new(), replayed, stop)
}

/// Apply a request from the daemon between batches.
fn apply_command(w: &mut Worker, cmd: WorkerCommand, stop: &AtomicBool) -> bool {
    let WorkerCommand::Swap(requests) = cmd;
    let now = crate::clock::ingest_ms();
    for r in requests {
        let Some(slot) = w
            .chains
            .iter_mut()
            .flat_map(|c| c.slots_mut().iter_mut())
            .find(|s| s.owner == r.owner)
        else {
            warn!(function = %r.owner, "A reload named a function the running pipelines do not have; pipeline changes take effect at the next restart.");
            continue;
        };
        slot.set_breaker_config(r.breaker);
        slot.on_open = r.on_open;
        slot.probation = r.probation.max(1);
        slot.max_held_bytes = r.max_held_bytes;
        let same_build = slot.version.module_sha256 == r.version.module_sha256
            && slot.version.config_sha256 == r.version.config_sha256;
        if same_build {
            if slot.spec.limits != r.spec.limits {
                restart_with_limits(slot, r.spec.limits);
            }
            if slot.candidate.take().is_some() {
                info!(function = %slot.owner, "The configured build is the running one again: the candidate on probation is dropped.");
            }
            continue;
        }
        if slot.candidate.as_ref().is_some_and(|c| {
            c.version.module_sha256 == r.version.module_sha256
                && c.version.config_sha256 == r.version.config_sha256
        }) {
            continue;
        }
        if slot
            .refused
            .as_ref()
            .is_some_and(|(m, c)| *m == r.version.module_sha256 && *c == r.version.config_sha256)
        {
            warn!(function = %slot.owner, "This build of the function was refused before; not trying it again until the module or its config changes.");
            continue;
        }
        if let Some(reason) = r.init_error {
            loop {
                match super::versions::refuse(
                    slot,
                    &mut w.outbox,
                    r.version.clone(),
                    reason.clone(),
                    now,
                ) {
                    Ok(()) => break,
                    Err(e) => {
                        error!(function = %slot.owner, error = %e, "Recording a refused function version failed; retrying.");
                        if stop.load(Ordering::Acquire) {
                            return false;
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            }
            continue;
        }
        loop {
            match super::versions::propose(
                slot,
                &mut w.outbox,
                r.spec.clone(),
                r.version.clone(),
                now,
            ) {
                Ok(_) => break,
                Err(e) => {
                    error!(function = %slot.owner, error = %e, "Recording a new function version failed; retrying.");
                    if stop.load(Ordering::Acquire) {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }
    publish_status(w);
    true
}

/// Same build, new limits: a fresh instance from the running one's state.
fn restart_with_limits(slot: &mut super::FunctionSlot, limits: Limits) {
    slot.spec.limits = limits.clone();
    let Some(active) = slot.active.as_ref() else {
        return;
    };
    match FunctionInstance::from_module(
        &slot.spec.module,
        &slot.function,
        &slot.spec.config_json,
        limits,
        active.state().clone(),
    ) {
        Ok(i) => {
            info!(function = %slot.owner, "New limits applied.");
            slot.active = Some(i);
        }
        Err(e) => {
            warn!(function = %slot.owner, error = %e, "New limits could not be applied; the function keeps its old ones.")
        }
    }
}

/// Sends each chunk's acknowledgements to its connection, in order; runs of
/// chunks from the same connection go as one message.
fn dispatch_acks(batch: &[Chunk]) {
    let mut current: Option<&Arc<AckRoute>> = None;
    let mut acks: Vec<Ack> = Vec::new();
    for chunk in batch {
        let Some(route) = &chunk.route else { continue };
        if current.is_some_and(|c| !Arc::ptr_eq(c, route)) {
            if let Some(c) = current {
                c.send(std::mem::take(&mut acks));
            }
        }
        current = Some(route);
        acks.extend(chunk.items.iter().filter_map(|i| i.ack));
    }
    if let Some(c) = current {
        c.send(acks);
    }
}

/// At most this many topics are remembered as warned about.
const MAX_WARNED_TOPICS: usize = 1024;

/// One warning per topic that matched no pipeline (bounded).
fn warn_unrouted(
    warned: &mut std::collections::HashSet<String>,
    topics: &[String],
    policy: crate::config::UnroutedPolicy,
) {
    for t in topics {
        if warned.len() >= MAX_WARNED_TOPICS || !warned.insert(t.clone()) {
            continue;
        }
        match policy {
            crate::config::UnroutedPolicy::DeadLetter => warn!(
                topic = %t,
                "A message matched no pipeline: kept as a dead letter (reason `unrouted`), reported to the aggregator. Add a pipeline for it and run `fogline-edge dead-letters replay`; warned once per topic."
            ),
            crate::config::UnroutedPolicy::Drop => warn!(
                topic = %t,
                "A message matched no pipeline: dropped (ingest.unrouted = \"drop\"), counted and reported to the aggregator as a loss; warned once per topic."
            ),
        }
    }
}

/// One report per stream and dead-letter reason.
fn dead_letter_reports(dead: &[crate::outbox::DeadLetter]) -> Vec<fogline_protocol::LossReport> {
    let mut by: std::collections::BTreeMap<(&str, &str), fogline_protocol::LossReport> =
        std::collections::BTreeMap::new();
    for d in dead {
        let r = fogline_protocol::LossReport {
            stream: d.message.stream.clone(),
            reason: fogline_protocol::LossReason::DeadLettered,
            detail: Some(d.reason.clone()),
            records: 1,
            bytes: (d.message.stream.len() + d.payload_size) as u64,
            first_seq: None,
            last_seq: None,
            first_ms: d.message.timestamp_ms,
            last_ms: d.message.timestamp_ms,
        };
        by.entry((&d.message.stream, &d.reason))
            .and_modify(|e| e.absorb(&r))
            .or_insert(r);
    }
    by.into_values().collect()
}

/// The longest wait between retries of a failing commit.
const MAX_COMMIT_BACKOFF: Duration = Duration::from_secs(5);

/// Returns false when it gave up (shutdown during a failing commit).
fn process_batch(w: &mut Worker, batch: &mut [Chunk], stop: &AtomicBool) -> bool {
    let router = &mut w.router;
    let plan = plan_batch(
        batch,
        w.chains.len(),
        w.options.max_topic,
        w.options.unrouted,
        |t| router.route(t).to_vec(),
    );
    metrics::counter!(super::events::MESSAGES_IN_TOTAL).increment(plan.messages as u64);
    if plan.unrouted > 0 {
        metrics::counter!(super::events::UNROUTED_TOTAL).increment(plan.unrouted as u64);
        warn_unrouted(
            &mut w.warned_unrouted,
            &plan.unrouted_topics,
            w.options.unrouted,
        );
    }
    let now = crate::clock::ingest_ms();
    let mut result = ChainResult {
        losses: plan.dropped,
        ..ChainResult::default()
    };
    for (i, (chain, msgs)) in w.chains.iter_mut().zip(plan.per_pipeline).enumerate() {
        if !msgs.is_empty() {
            let before = (result.outputs.len(), result.withheld.len());
            chain.process(msgs, now, &mut result);
            // Immediate: before the commit, local subscribers need not wait
            // for the disk. Durable: into the commit.
            w.local.hand_over(i, &mut result, before);
        }
    }
    let mut sessions = Vec::new();
    for chunk in batch.iter_mut() {
        if let Some(update) = chunk.session.take() {
            w.sessions.apply(update, &mut sessions);
        }
        result.local_subscribers.append(&mut chunk.local);
    }
    commit_result(w, result, plan.dead_letters, sessions, Vec::new(), stop)
}

/// Outputs of `cloud = false` pipelines from held inputs or replays: local
/// delivery is for live outputs only, so these go nowhere — counted.
fn count_withheld(result: &ChainResult) {
    if !result.withheld.is_empty() {
        metrics::counter!(crate::local::events::DROPPED_TOTAL, "reason" => "not_live")
            .increment(result.withheld.len() as u64);
    }
}

/// Commit what a batch, tick, drain or replay produced, in one transaction.
fn commit_result(
    w: &mut Worker,
    result: ChainResult,
    dead_letters: Vec<crate::outbox::DeadLetter>,
    sessions: Vec<SessionWrite>,
    replayed: Vec<i64>,
    stop: &AtomicBool,
) -> bool {
    let mut commit = result.into_commit(dead_letters, sessions, replayed);
    // Dead letters are reported to the aggregator too (I-33): not lost,
    // but not delivered either.
    let reported = dead_letter_reports(&commit.dead_letters);
    commit.losses.extend(reported);
    for d in &commit.dead_letters {
        metrics::counter!(
            super::events::DEAD_LETTERS_TOTAL,
            "pipeline" => d.pipeline.clone(),
            "function" => d.function.clone(),
            "reason" => d.reason.clone()
        )
        .increment(1);
    }
    for h in &commit.held {
        metrics::counter!(super::events::HELD_TOTAL, "function" => h.owner.clone()).increment(1);
    }
    if commit.is_empty() {
        return true;
    }
    commit_until_done(w, &commit, stop)
}

fn commit_until_done(w: &mut Worker, commit: &Commit, stop: &AtomicBool) -> bool {
    let mut backoff = Duration::from_millis(50);
    let mut failures = 0u64;
    let mut last_logged = Instant::now();
    w.health
        .commit_started_ms
        .store(crate::clock::now_ms(), Ordering::Release);
    loop {
        let started = Instant::now();
        match w.outbox.commit(commit) {
            Ok(mut done) => {
                if !done.local.is_empty() {
                    // A crash between the commit and the delivery: the
                    // outputs are kept and delivered after the restart (I-40).
                    fail::fail_point!("local::after_commit_before_delivery", |_| {
                        std::process::abort()
                    });
                    w.local
                        .bus
                        .durable
                        .committed(std::mem::take(&mut done.local));
                }
                if done.local_dropped > 0 {
                    metrics::counter!(crate::local::events::DROPPED_TOTAL, "reason" => "retention")
                        .increment(done.local_dropped);
                    warn!(dropped = done.local_dropped, "Outputs kept for durable local subscribers exceeded outbox.local_max_bytes: the oldest were dropped for local delivery (they still go to the cloud).");
                }
                super::events::BatchCommitted {
                    records: done.records,
                    dead_letters: commit.dead_letters.len(),
                    elapsed: started.elapsed(),
                }
                .emit();
                if done.records > 0 {
                    w.health
                        .committed_seq
                        .fetch_max(done.first_seq + done.records as u64 - 1, Ordering::AcqRel);
                    w.committed.notify_one();
                }
                w.health.commit_started_ms.store(0, Ordering::Release);
                w.health
                    .last_commit_ms
                    .store(crate::clock::now_ms(), Ordering::Release);
                w.health.commits.fetch_add(1, Ordering::AcqRel);
                w.health.failing.store(false, Ordering::Release);
                if failures > 0 {
                    w.health.clear_failure();
                    info!(failures, "Outbox commits succeed again.");
                }
                return true;
            }
            Err(e) => {
                w.health.failing.store(true, Ordering::Release);
                w.health.note_failure(e.problem_kind(), &e.to_string());
                metrics::counter!(super::events::COMMIT_FAILURES_TOTAL).increment(1);
                failures += 1;
                // Every retry while the backoff grows, then once a minute:
                // a disk that stays full for days is not a log flood.
                if backoff < MAX_COMMIT_BACKOFF || last_logged.elapsed() >= Duration::from_secs(60)
                {
                    error!(error = %e, retry_in = ?backoff, failures, "Outbox commit failed; nothing in this batch is acknowledged until it succeeds.");
                    last_logged = Instant::now();
                }
                if stop.load(Ordering::Acquire) {
                    return false;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_COMMIT_BACKOFF);
            }
        }
    }
}
