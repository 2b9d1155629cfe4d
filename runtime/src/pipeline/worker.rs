//! The pipeline worker: one OS thread that owns the function instances and
//! the outbox writer. Batching is group commit: while one commit is being
//! fsynced, deliveries queue up, and the next batch takes all of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use tracing::{error, info};

use super::{plan_batch, Chain, ChainResult, Router};
use crate::ingest::{AckSender, Delivery};
use crate::outbox::{Commit, Outbox};

/// Batching and limits for the worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Most deliveries per batch.
    pub max_batch: usize,
    /// Larger payloads are dead-lettered.
    pub max_payload: usize,
    /// How often functions tick.
    pub tick_interval: Duration,
}

/// The running worker.
pub struct WorkerHandle {
    join: std::thread::JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

impl WorkerHandle {
    /// Wait for the worker to finish: it ends when ingest closes the delivery
    /// channel, after committing and acking what it took.
    pub fn join(self) {
        let _ = self.join.join();
    }

    /// Give up retrying a failing commit (shutdown while the disk is full):
    /// the batch stays unacked, the broker redelivers it.
    pub fn abandon_retries(&self) {
        self.stop.store(true, Ordering::Release);
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
    /// Woken after each commit (the uplink waits on it).
    pub committed: Arc<Notify>,
}

/// Start the worker thread.
pub fn spawn_worker(
    worker: Worker,
    deliveries: mpsc::Receiver<Delivery>,
    acks: AckSender,
) -> std::io::Result<WorkerHandle> {
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
            rt.block_on(run(worker, deliveries, acks, stop2));
        })?;
    Ok(WorkerHandle { join, stop })
}

async fn run(
    mut w: Worker,
    mut rx: mpsc::Receiver<Delivery>,
    acks: AckSender,
    stop: Arc<AtomicBool>,
) {
    let mut marks: HashMap<u16, u64> = match w.outbox.delivery_marks() {
        Ok(m) => m.into_iter().map(|m| (m.pkid, m.digest)).collect(),
        Err(e) => {
            error!(error = %e, "Cannot read delivery marks; duplicates after a crash will not be detected.");
            HashMap::new()
        }
    };
    let mut next_tick = Instant::now() + w.options.tick_interval;
    let mut batches: u64 = 0;
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        let first = tokio::select! {
            d = rx.recv() => match d {
                Some(d) => Some(d),
                None => break,
            },
            _ = tokio::time::sleep(wait) => None,
        };
        if let Some(first) = first {
            let mut batch = Vec::with_capacity(64);
            batch.push(first);
            while batch.len() < w.options.max_batch {
                match rx.try_recv() {
                    Ok(d) => batch.push(d),
                    Err(_) => break,
                }
            }
            if !process_batch(&mut w, &batch, &mut marks, &stop).await {
                break;
            }
            acks.ack(batch);
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
                delivered: Vec::new(),
            };
            if !commit.is_empty() && !commit_until_done(&mut w, &commit, &stop).await {
                break;
            }
        }
    }
    info!("Pipeline worker stopped.");
}

/// Returns false when it gave up (shutdown during a failing commit).
async fn process_batch(
    w: &mut Worker,
    batch: &[Delivery],
    marks: &mut HashMap<u16, u64>,
    stop: &AtomicBool,
) -> bool {
    let router = &mut w.router;
    let plan = plan_batch(batch, w.chains.len(), w.options.max_payload, marks, |t| {
        router.route(t).to_vec()
    });
    metrics::counter!("fogline_pipeline_messages_in_total").increment(batch.len() as u64);
    if plan.duplicates > 0 {
        metrics::counter!("fogline_ingest_duplicates_total").increment(plan.duplicates as u64);
    }
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
    let commit = Commit {
        records: result.outputs,
        dead_letters,
        delivered: plan.delivered,
    };
    commit_until_done(w, &commit, stop).await
}

async fn commit_until_done(w: &mut Worker, commit: &Commit, stop: &AtomicBool) -> bool {
    let mut backoff = Duration::from_millis(50);
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
                    w.committed.notify_one();
                }
                return true;
            }
            Err(e) => {
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
