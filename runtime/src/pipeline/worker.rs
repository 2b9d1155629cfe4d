//! The pipeline worker: one OS thread that owns the function instances and
//! the outbox writer. Batching is group commit: while one commit is being
//! fsynced, chunks from every connection queue up, and the next batch takes
//! all of them (up to `max_batch` messages and `max_batch_bytes`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{error, info};

use super::{plan_batch, Chain, ChainResult, Router};
use crate::ingest::session_store::Replica;
use crate::ingest::{Ack, AckRoute, Chunk, ChunkReceiver};
use crate::outbox::{Commit, Outbox};

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
    /// Longest topic that may become a stream name.
    pub max_topic: usize,
    /// How often functions tick.
    pub tick_interval: Duration,
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
    /// Commits done.
    pub commits: AtomicU64,
    /// The highest sequence number committed (the uplink sizes its batches by it).
    pub committed_seq: Arc<AtomicU64>,
}

/// The running worker.
pub struct WorkerHandle {
    join: std::thread::JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

impl WorkerHandle {
    /// Wait for the worker to finish: it ends when every ingest sink is gone,
    /// after committing and acknowledging what it took.
    pub fn join(self) {
        let _ = self.join.join();
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
}

/// Start the worker thread.
pub fn spawn_worker(worker: Worker, chunks: ChunkReceiver) -> std::io::Result<WorkerHandle> {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
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
            rt.block_on(run(worker, chunks, stop2));
        })?;
    Ok(WorkerHandle { join, stop })
}

async fn run(mut w: Worker, mut rx: ChunkReceiver, stop: Arc<AtomicBool>) {
    let mut next_tick = Instant::now() + w.options.tick_interval;
    let mut batches: u64 = 0;
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        let first = tokio::select! {
            c = rx.recv() => match c {
                Some(c) => Some(c),
                None => break,
            },
            _ = tokio::time::sleep(wait) => None,
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
                let until = tokio::time::Instant::now() + linger;
                while items < LINGER_BELOW && !full(items, bytes) {
                    tokio::select! {
                        c = rx.recv() => match c {
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
                        },
                        _ = tokio::time::sleep_until(until) => break,
                    }
                }
            }
            if !process_batch(&mut w, &mut batch, &stop).await {
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
            batches += 1;
            if batches.is_multiple_of(1024) {
                if let Err(e) = w.outbox.prune_dead_letters(100_000) {
                    error!(error = %e, "Pruning dead letters failed.");
                }
            }
        }
        if Instant::now() >= next_tick {
            next_tick = Instant::now() + w.options.tick_interval;
            let now = crate::clock::now_ms();
            let mut result = ChainResult::default();
            for chain in &mut w.chains {
                chain.tick(now, &mut result);
            }
            let commit = Commit {
                records: result.outputs,
                dead_letters: result.dead_letters,
                sessions: Vec::new(),
            };
            if !commit.is_empty() && !commit_until_done(&mut w, &commit, &stop).await {
                break;
            }
        }
    }
    info!("Pipeline worker stopped.");
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

/// Returns false when it gave up (shutdown during a failing commit).
async fn process_batch(w: &mut Worker, batch: &mut [Chunk], stop: &AtomicBool) -> bool {
    let router = &mut w.router;
    let plan = plan_batch(batch, w.chains.len(), w.options.max_topic, |t| {
        router.route(t).to_vec()
    });
    metrics::counter!("fogline_pipeline_messages_in_total").increment(plan.messages as u64);
    if plan.unrouted > 0 {
        metrics::counter!("fogline_ingest_unrouted_total").increment(plan.unrouted as u64);
    }
    let mut result = ChainResult::default();
    for (chain, msgs) in w.chains.iter_mut().zip(plan.per_pipeline) {
        if !msgs.is_empty() {
            chain.process(msgs, &mut result);
        }
    }
    let mut dead_letters = plan.dead_letters;
    dead_letters.append(&mut result.dead_letters);
    let mut sessions = Vec::new();
    for chunk in batch.iter_mut() {
        if let Some(update) = chunk.session.take() {
            w.sessions.apply(update, &mut sessions);
        }
    }
    let commit = Commit {
        records: result.outputs,
        dead_letters,
        sessions,
    };
    if commit.is_empty() {
        return true;
    }
    commit_until_done(w, &commit, stop).await
}

async fn commit_until_done(w: &mut Worker, commit: &Commit, stop: &AtomicBool) -> bool {
    let mut backoff = Duration::from_millis(50);
    w.health
        .commit_started_ms
        .store(crate::clock::now_ms(), Ordering::Release);
    loop {
        let started = Instant::now();
        match w.outbox.commit(commit) {
            Ok(done) => {
                metrics::histogram!("fogline_outbox_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("fogline_outbox_records_written_total")
                    .increment(done.records as u64);
                metrics::counter!("fogline_outbox_dead_letters_written_total")
                    .increment(commit.dead_letters.len() as u64);
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
                return true;
            }
            Err(e) => {
                w.health.failing.store(true, Ordering::Release);
                metrics::counter!("fogline_outbox_commit_failures_total").increment(1);
                error!(error = %e, retry_in = ?backoff, "Outbox commit failed; nothing in this batch is acknowledged until it succeeds.");
                if stop.load(Ordering::Acquire) {
                    return false;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
