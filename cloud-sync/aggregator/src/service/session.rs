//! Drives one node connection: moves frames between the transport and a
//! [`ServerSession`], and runs what the session asks of the store on tasks
//! of their own (batches decode on blocking threads). The policy (what to apply, when to ack, when to give
//! up) is the session's; this file only does I/O.

use std::sync::Arc;
use std::time::Instant;

use fogline_protocol::batch::decode_batch;
use fogline_protocol::frame::ErrorCode;
use fogline_protocol::session::server::{ApplyRequest, ServerAction, ServerSession};
use fogline_protocol::session::{Regression, StoredCursor};
use fogline_transport::conn::{close_with, Connection};
use fogline_transport::identity::PeerIdentity;
use fogline_transport::TransportError;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::nodes::{Nodes, Turn};
use crate::store::health::StoreHealth;
use crate::store::{ApplyBatches, ApplyOutcome, Lease, Store, StoreError};

/// What every session shares.
pub(super) struct Shared {
    pub store: Arc<dyn Store>,
    /// This aggregator's name, written on the leases it takes.
    pub holder: String,
    /// Store failures, for `/healthz`.
    pub health: Arc<StoreHealth>,
    pub nodes: Arc<Nodes>,
    /// Newest record per stream of the nodes held here (write-through).
    pub latest: Arc<super::latest::LatestCache>,
    /// Bytes of batches being decoded and applied, over all nodes.
    pub budget: Arc<Semaphore>,
    pub budget_bytes: usize,
    /// Applies let through to the store at once (its writers, plus one).
    pub apply_slots: Arc<Semaphore>,
    pub session: fogline_protocol::session::server::ServerConfig,
    /// What each node is to be sent for rollouts.
    pub wants: crate::rollout::Wants,
    /// Bytes of `Deploy` frames queued on all connections at once: a build
    /// goes to a node only while it fits (many MB each, to many nodes).
    pub deploy_budget: Arc<Semaphore>,
}

/// [`Shared::deploy_budget`].
pub(super) const DEPLOY_BUDGET_BYTES: usize = 256 * 1024 * 1024;

/// A node not sent its deployment for want of budget is offered it again
/// this much later.
const DEPLOY_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Rollout deployments on one connection: sent at most once each (the node
/// applies each once anyway and reports it), only to nodes of protocol 6.
#[derive(Default)]
struct Deploys {
    sent: std::collections::HashSet<(u64, String, bool)>,
    /// The node's own account, from its last status.
    reported: Vec<fogline_protocol::deploy::DeploymentReport>,
    /// Budget held for frames still being written.
    held: Vec<tokio::sync::OwnedSemaphorePermit>,
    retry_at: Option<Instant>,
}

impl Deploys {
    /// Queues what `node` is still to be sent.
    fn offer(
        &mut self,
        shared: &Shared,
        session: &ServerSession,
        node: &str,
        writer: &mut fogline_transport::framed::FrameWriter<fogline_transport::conn::BoxWrite>,
    ) {
        self.retry_at = None;
        if session.peer_version().is_none_or(|v| v < 6) || session.cursor().is_none() {
            return;
        }
        for want in shared.wants.for_node(node) {
            let key = (
                want.rollout,
                want.function.clone(),
                want.action == crate::rollout::plan::Action::Install,
            );
            if self.sent.contains(&key) || want.is_reported(&self.reported) {
                continue;
            }
            let bytes = u32::try_from(want.frame_bytes()).unwrap_or(u32::MAX);
            let Ok(permit) = shared.deploy_budget.clone().try_acquire_many_owned(bytes) else {
                self.retry_at = Some(Instant::now() + DEPLOY_RETRY);
                return;
            };
            let frame = fogline_protocol::Frame::Deploy(want.frame());
            match writer.queue(&frame) {
                Ok(_) => {
                    metrics::counter!(crate::rollout::controller::events::DEPLOY_FRAMES_TOTAL, "action" => if key.2 { "install" } else { "revert" }).increment(1);
                    info!(node, rollout = want.rollout, function = %want.function, action = if key.2 { "install" } else { "revert" }, "Rollout: deployment sent.");
                    self.held.push(permit);
                    self.sent.insert(key);
                }
                Err(e) => {
                    warn!(node, rollout = want.rollout, error = %e, "A deployment cannot be encoded.")
                }
            }
        }
    }
}

/// Batches up to this many bytes (as sent) decode on the session's task.
const INLINE_DECODE_BYTES: usize = 16 * 1024;

/// How long a closing connection may take to write its last `Error` frame.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

type Task<T, E = String> = JoinHandle<Result<T, E>>;

/// Why an apply failed: the node's fault (a batch that does not decode),
/// the store's, or another aggregator took the node (I-36).
enum ApplyFailed {
    Malformed(String),
    Store(String),
    Fenced(String),
}

impl From<String> for ApplyFailed {
    fn from(e: String) -> Self {
        ApplyFailed::Store(e)
    }
}

/// Resolves a task slot, or never when it is empty.
async fn join<T, E: From<String>>(slot: &mut Option<Task<T, E>>) -> Result<T, E> {
    match slot {
        Some(t) => {
            let r = t
                .await
                .unwrap_or_else(|e| Err(E::from(format!("store task failed: {e}"))));
            *slot = None;
            r
        }
        None => std::future::pending().await,
    }
}

/// Serves `conn` for `peer` until either side ends it.
pub(super) async fn serve(shared: Arc<Shared>, conn: Connection, peer: PeerIdentity) {
    let Connection {
        mut reader,
        mut writer,
        handle,
    } = conn;
    let node = peer.node_id.clone();
    let remote = handle.remote_address();
    let transport = handle.transport();
    let mut session = ServerSession::new(&node, shared.session.clone(), Instant::now());
    let mut turn: Option<Turn> = None;
    let mut cursor_task: Option<Task<(Lease, StoredCursor)>> = None;
    let mut lease: Option<Lease> = None;
    let mut status_task: Option<JoinHandle<()>> = None;
    let mut apply_task: Option<Task<ApplyOutcome, ApplyFailed>> = None;
    let mut applied_records = 0u64;
    let mut deploys = Deploys::default();
    let mut wants_changed = shared.wants.subscribe();
    metrics::gauge!(super::events::CONNECTIONS, "transport" => transport.name()).increment(1.0);

    // Why the connection ends, and whether the peer must be told.
    let end: (ErrorCode, String, bool) = 'session: loop {
        while let Some(action) = session.poll_action() {
            match action {
                ServerAction::Send(frame) => {
                    if let Err(e) = writer.queue(&frame) {
                        session.close(ErrorCode::Internal, e.to_string());
                    }
                }
                ServerAction::ReadCursor => {
                    let now_ms = fogline_telemetry::clock::now_ms();
                    // Waits for the node's previous session to let go, so
                    // the cursor read is final.
                    turn = shared.nodes.take_over(&peer, &handle, now_ms).await;
                    if turn.is_none() {
                        break 'session (ErrorCode::Superseded, "superseded".into(), false);
                    }
                    info!(%node, %remote, transport = transport.name(), "Node connected.");
                    // The node's lease in the store, then its cursor: from
                    // here no other aggregator's apply can move it (I-36).
                    let shared = shared.clone();
                    let n = node.clone();
                    cursor_task = Some(tokio::spawn(async move {
                        let now = fogline_telemetry::clock::now_ms();
                        shared
                            .store
                            .take_lease(&n, &shared.holder, now)
                            .await
                            .map_err(|e| {
                                shared.health.failed(&e, now);
                                e.to_string()
                            })
                    }));
                }
                ServerAction::RecordGap(r) => {
                    if let Err(e) = record_gap(&shared, &node, r).await {
                        session.close(ErrorCode::Internal, format!("store: {e}"));
                    }
                }
                ServerAction::Apply(req) => match &lease {
                    Some(l) => apply_task = Some(spawn_apply(&shared, l.clone(), req)),
                    None => session.close(ErrorCode::Internal, "apply without a lease".into()),
                },
                ServerAction::Status(status) => {
                    metrics::counter!(super::events::STATUS_FRAMES_TOTAL).increment(1);
                    deploys.reported = status.deployments.clone();
                    // At most one write in flight: a newer status while one
                    // is being stored waits for the next (30 s later).
                    if status_task.as_ref().is_none_or(|t| t.is_finished()) {
                        let shared = shared.clone();
                        let n = node.clone();
                        status_task = Some(tokio::spawn(async move {
                            let now = fogline_telemetry::clock::now_ms();
                            if let Err(e) = shared.store.put_status(&n, &status, now).await {
                                shared.health.failed(&e, now);
                                warn!(node = %n, error = %e, "Storing the node's status failed.");
                            }
                        }));
                    }
                }
                ServerAction::Close { code, reason } => break 'session (code, reason, true),
            }
        }
        let flushed = tokio::select! {
            r = writer.flush() => r,
            c = handle.close_requested() => break 'session (c.0, c.1, false),
        };
        if let Err(e) = flushed {
            break 'session (ErrorCode::Ok, handle.explain(e).to_string(), false);
        }
        // Everything queued is written: the deployments' budget is free.
        deploys.held.clear();
        let deadline = session.poll_timeout();
        tokio::select! {
            frame = reader.next(), if session.wants_read() => match frame {
                Ok(frame) => {
                    if let Some(t) = &turn {
                        t.seen(fogline_telemetry::clock::now_ms());
                    }
                    session.handle_frame(frame, Instant::now());
                    if let Some(v) = session.peer_version() {
                        reader.set_peer_version(v);
                    }
                }
                Err(TransportError::Decode(e)) => {
                    session.close(ErrorCode::Malformed, format!("malformed frame: {e}"));
                }
                Err(e) => break 'session (ErrorCode::Ok, handle.explain(e).to_string(), false),
            },
            r = join(&mut cursor_task) => {
                let r = r.map(|(l, cursor)| {
                    shared.latest.hold(&l);
                    lease = Some(l);
                    metrics::gauge!(super::events::LEASES_HELD).increment(1.0);
                    cursor
                });
                session.handle_cursor(r, Instant::now());
                // What rollouts want of the node follows the Welcome: offered
                // on the next turn, once the session's actions (the Welcome
                // among them) are queued.
                deploys.retry_at = Some(Instant::now());
            }
            r = wants_changed.changed() => {
                if r.is_ok() {
                    deploys.offer(&shared, &session, &node, &mut writer);
                }
            }
            _ = sleep_until(deploys.retry_at) => deploys.offer(&shared, &session, &node, &mut writer),
            r = join(&mut apply_task) => match r {
                Ok(o) => {
                    applied_records += o.inserted as u64;
                    if let Some(t) = &turn {
                        t.applied(o.inserted as u64, fogline_telemetry::clock::now_ms());
                    }
                    session.handle_applied(Ok(o.cursor), Instant::now());
                }
                Err(ApplyFailed::Store(e)) => session.handle_applied(Err(e), Instant::now()),
                Err(ApplyFailed::Malformed(e)) => session.close(ErrorCode::Malformed, e),
                Err(ApplyFailed::Fenced(e)) => session.close(ErrorCode::Superseded, e),
            },
            _ = sleep_until(deadline) => session.handle_timeout(Instant::now()),
            c = handle.close_requested() => break 'session (c.0, c.1, false),
        }
    };

    // An apply already started commits or fails before the node's turn is
    // released: the next session must read a final cursor.
    if apply_task.is_some() {
        let _ = join(&mut apply_task).await;
    }
    if let Some(l) = &lease {
        shared.latest.release(l);
        metrics::gauge!(super::events::LEASES_HELD).decrement(1.0);
        // Only clears the holder: a later take has a higher token anyway.
        if let Err(e) = shared
            .store
            .release_lease(l, fogline_telemetry::clock::now_ms())
            .await
        {
            debug!(%node, error = %e, "Releasing the node's lease failed (the next take supersedes it).");
        }
    }
    let (code, reason, tell) = end;
    if tell {
        if code == ErrorCode::Ok {
            debug!(%node, %remote, %reason, "Session ended.");
        } else {
            metrics::counter!(super::events::SESSIONS_FAILED_TOTAL, "code" => code.name())
                .increment(1);
            warn!(%node, %remote, %code, %reason, "Closing the node's connection.");
        }
        close_with(&mut writer, &handle, code, &reason, CLOSE_WAIT).await;
    } else if let Some((code, message)) = handle.close_requested_now() {
        // Closed from elsewhere (takeover, revocation): over TCP the code
        // still has to be written.
        close_with(&mut writer, &handle, code, &message, CLOSE_WAIT).await;
    }
    metrics::gauge!(super::events::CONNECTIONS, "transport" => transport.name()).decrement(1.0);
    if turn.is_some() {
        info!(%node, %remote, applied = applied_records, %reason, "Node disconnected.");
    }
    drop(turn);
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// The store forgot records it acknowledged to this very outbox (restored
/// from a backup). The edge deleted them: they cannot come back. The loss is
/// kept on record before anything else happens (ARCHITECTURE.md I-9).
async fn record_gap(shared: &Shared, node: &str, r: Regression) -> Result<(), String> {
    super::events::CursorRegressed {
        lost: r.to - r.from + 1,
    }
    .emit();
    tracing::error!(
        node,
        from = r.from,
        to = r.to,
        "The store is behind what it acknowledged to this node (restored from a backup?): records {}..={} are lost; recorded as a gap.",
        r.from,
        r.to
    );
    let now = fogline_telemetry::clock::now_ms();
    shared
        .store
        .record_gap(node, r.from, r.to, now)
        .await
        .map_err(|e| {
            shared.health.failed(&e, now);
            e.to_string()
        })
}

/// Waits for its share of the global budget (first come, first served),
/// then decodes on a blocking thread (zstd and record parsing never run on
/// an async worker) and applies under `lease`.
fn spawn_apply(
    shared: &Arc<Shared>,
    lease: Lease,
    req: ApplyRequest,
) -> Task<ApplyOutcome, ApplyFailed> {
    let shared = shared.clone();
    let budget = shared.budget.clone();
    let want = req.memory_bytes.clamp(1, shared.budget_bytes);
    let permits = u32::try_from(want).unwrap_or(u32::MAX);
    tokio::spawn(async move {
        let mut req = req;
        let _permit = budget
            .acquire_many_owned(permits)
            .await
            .map_err(|e| ApplyFailed::Store(format!("budget: {e}")))?;
        let started = Instant::now();
        let batches = std::mem::take(&mut req.batches);
        let bytes: usize = batches.iter().map(|b| b.block.len()).sum();
        let decode = move || {
            batches
                .iter()
                .map(decode_batch)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ApplyFailed::Malformed(format!("a batch that does not decode: {e}")))
        };
        // A small apply (a gateway's reading or few: the fleet's common
        // case) decodes in microseconds, here: a hand-off to a blocking
        // thread would cost more in wake-ups than the work (10k gateways:
        // 10k hand-offs a second). Big ones go to a blocking thread.
        let decoded = if bytes <= INLINE_DECODE_BYTES {
            decode()?
        } else {
            tokio::task::spawn_blocking(decode)
                .await
                .map_err(|e| ApplyFailed::Store(format!("decode task failed: {e}")))??
        };
        let now = fogline_telemetry::clock::now_ms();
        let newest = super::latest::newest_per_stream(&lease.node, &decoded, now);
        let apply = ApplyBatches {
            lease: lease.clone(),
            outbox: req.outbox,
            batches: decoded,
            through: req.through,
            now_ms: now,
        };
        let slot = shared
            .apply_slots
            .acquire()
            .await
            .map_err(|e| ApplyFailed::Store(format!("apply slots: {e}")))?;
        let applied = shared.store.apply(apply).await;
        drop(slot);
        let outcome = match applied {
            Ok(o) => {
                shared.health.worked();
                shared.latest.applied(&lease, newest);
                o
            }
            Err(e @ StoreError::Fenced { .. }) => {
                metrics::counter!(crate::store::events::FENCED_TOTAL).increment(1);
                return Err(ApplyFailed::Fenced(e.to_string()));
            }
            Err(e) => {
                shared.health.failed(&e, now);
                return Err(ApplyFailed::Store(e.to_string()));
            }
        };
        super::events::BatchesApplied {
            elapsed: started.elapsed(),
            bytes,
            inserted: outcome.inserted,
            skipped: outcome.skipped,
        }
        .emit();
        Ok(outcome)
    })
}
