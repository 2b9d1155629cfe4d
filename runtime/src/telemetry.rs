//! Prometheus metrics, the `/status` endpoint (used by `fogline-edge
//! status`) and `/healthz` (503 when the pipeline or the uplink is wedged:
//! work pending and no progress for `health.stall_after`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::daemon::LiveState;
use crate::outbox::{self, OutboxStats};
use fogline_telemetry::health::{Component, Health, Problem, ProblemKind};

/// Ingest as `/status` reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IngestStatus {
    /// Clients connected to the native endpoint.
    pub clients: u64,
    /// Sessions the endpoint keeps.
    pub sessions: u64,
    /// Bytes received and not yet committed.
    pub pending_bytes: u64,
    /// The ingest byte budget.
    pub budget_bytes: u64,
    /// Subscriptions the external broker refused: filter and reason.
    pub refused_subscriptions: Vec<String>,
}

/// What `/status` returns and `fogline-edge status` prints.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Connected to the external MQTT broker.
    pub broker_connected: bool,
    /// Connected to the aggregator.
    pub uplink_connected: bool,
    /// Ingest.
    pub ingest: IngestStatus,
    /// Times the aggregator's cursor was found behind its acknowledgements.
    pub uplink_cursor_regressions: u64,
    /// The link in use and what happened to earlier ones.
    pub uplink: crate::uplink::UplinkStatus,
    /// Buffer statistics.
    pub outbox: OutboxStats,
    /// The functions: version, breaker, held inputs, state, probation.
    pub functions: Vec<crate::pipeline::FunctionStatus>,
    /// Durable local subscribers and how far behind each is.
    #[serde(default)]
    pub local_subscribers: Vec<crate::local::SubscriberStatus>,
    /// Rollouts from the aggregator: the newest, with their outcome.
    #[serde(default)]
    pub deployments: Vec<fogline_protocol::deploy::DeploymentReport>,
    /// `/healthz`'s verdict: empty when healthy.
    pub problems: Vec<Problem>,
}

#[derive(Clone)]
struct AppState {
    outbox: PathBuf,
    live: Arc<LiveState>,
}

/// Serve `/metrics`, `/status` and `/healthz` on `listen` until shutdown.
pub async fn serve(
    listen: SocketAddr,
    outbox: PathBuf,
    live: Arc<LiveState>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/healthz", get(healthz))
        .with_state(AppState { outbox, live });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
    });
    Ok(addr)
}

/// The buffer's gauges, read from the outbox at each scrape (its usage is
/// kept per lane, so this reads a few rows, never the backlog).
async fn refresh_outbox_gauges(path: PathBuf) {
    let Ok(Ok(stats)) = tokio::task::spawn_blocking(move || outbox::read_stats(&path)).await else {
        return;
    };
    let now = crate::clock::ingest_ms();
    metrics::gauge!(BACKLOG_RECORDS).set(stats.backlog_records as f64);
    metrics::gauge!(BACKLOG_BYTES).set(stats.backlog_bytes as f64);
    let age = stats
        .oldest_committed_ms
        .filter(|_| stats.backlog_records > 0)
        .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
    metrics::gauge!(BACKLOG_OLDEST_AGE).set(age);
    metrics::gauge!(DEAD_LETTERS).set(stats.dead_letters as f64);
    metrics::gauge!(DISK_BYTES).set(stats.disk_bytes as f64);
}

/// Records waiting for the aggregator.
pub const BACKLOG_RECORDS: &str = "fogline_outbox_backlog_records";
/// Their payload and stream bytes.
pub const BACKLOG_BYTES: &str = "fogline_outbox_backlog_bytes";
/// How long the oldest has waited.
pub const BACKLOG_OLDEST_AGE: &str = "fogline_outbox_oldest_age_seconds";
/// Dead letters kept.
pub const DEAD_LETTERS: &str = "fogline_outbox_dead_letters";
/// The outbox's files on disk.
pub const DISK_BYTES: &str = "fogline_outbox_disk_bytes";

/// A wall clock this far behind the node clock is worth a problem.
const CLOCK_BEHIND_MS: u64 = 60_000;

/// What the uplink tells the aggregator about this node (a `Status` frame,
/// protocol 5): backlog, losses by reason, dead letters, health, versions,
/// certificate expiry. Reads the outbox: blocks.
pub fn node_status(
    live: &LiveState,
    outbox: &std::path::Path,
    cert: &std::path::Path,
    now_ms: u64,
) -> fogline_protocol::status::NodeStatus {
    use fogline_protocol::status::{DropCount, ModuleVersion, NodeStatus};
    let problems = problems(live, now_ms);
    let health = if problems.is_empty() {
        "ok"
    } else {
        "unhealthy"
    };
    let mut status = NodeStatus {
        at_ms: now_ms,
        version: format!("fogline-edge/{}", env!("CARGO_PKG_VERSION")),
        health: health.into(),
        problems: problems
            .iter()
            .map(|p| format!("{:?}/{:?}: {}", p.component, p.kind, p.detail))
            .collect(),
        ..NodeStatus::default()
    };
    if let Ok(stats) = outbox::read_stats(outbox) {
        status.backlog_records = stats.backlog_records;
        status.backlog_bytes = stats.backlog_bytes;
        status.oldest_ms = stats.oldest_unsynced_ms;
        status.dead_letters = stats.dead_letters;
        let mut by_reason: std::collections::BTreeMap<String, u64> = Default::default();
        for l in stats.losses.iter().filter(|l| l.reason.is_loss()) {
            *by_reason.entry(l.reason.as_str().to_string()).or_default() += l.records;
        }
        status.drops = by_reason
            .into_iter()
            .map(|(reason, records)| DropCount { reason, records })
            .collect();
    }
    status.modules = live
        .functions
        .lock()
        .map(|f| {
            f.iter()
                .map(|f| ModuleVersion {
                    name: f.owner.clone(),
                    version: f.version.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    status.deployments = live
        .deployments
        .lock()
        .map(|d| d.clone())
        .unwrap_or_default();
    status.cert_not_after_ms = fogline_transport::tls::load_certs(cert)
        .ok()
        .and_then(|c| c.into_iter().next())
        .and_then(|der| fogline_transport::identity::peer_identity(&der).ok())
        .and_then(|p| u64::try_from(p.not_after).ok())
        .map(|s| s.saturating_mul(1000));
    status
}

/// What is wrong with the daemon, if anything (ARCHITECTURE.md I-17):
/// work pending and no progress for `stall_after`, commits failing, a
/// function suspended, the uplink refused, failing or stalled, deletes
/// failing, the clock behind.
pub fn problems(live: &LiveState, now_ms: u64) -> Vec<Problem> {
    let mut out = Vec::new();
    let stall = live.stall_after.as_millis() as u64;
    let secs = |ms: u64| format!("{:.0} s", ms as f64 / 1000.0);
    let p = &live.pipeline;
    let started = p.commit_started_ms.load(Ordering::Acquire);
    let failure = p.failure.lock().ok().and_then(|f| f.clone());
    // A full quota with `block` is the policy at work, not a stall: said at once.
    let quota_full = failure
        .as_ref()
        .is_some_and(|f| f.kind == ProblemKind::QuotaFull);
    if started != 0 && (quota_full || now_ms.saturating_sub(started) > stall) {
        let (kind, why) = match &failure {
            Some(f) => (f.kind, format!(": {}", f.detail)),
            None => (ProblemKind::Wedged, String::new()),
        };
        out.push(Problem::new(
            Component::Pipeline,
            kind,
            started,
            format!(
                "an outbox commit has been running for {}{why}; nothing in it is acknowledged yet",
                secs(now_ms - started)
            ),
        ));
    } else {
        let pending = live.pending.pending_bytes();
        let last = p.last_commit_ms.load(Ordering::Acquire);
        if pending > 0 && last != 0 && now_ms.saturating_sub(last) > stall {
            out.push(Problem::new(
                Component::Pipeline,
                ProblemKind::Wedged,
                last,
                format!(
                    "{pending} bytes waiting and no commit for {}",
                    secs(now_ms - last)
                ),
            ));
        }
    }
    if let Ok(functions) = live.functions.lock() {
        for f in functions.iter() {
            // Suspended for longer than the stall bound: its inputs pile up
            // (held) or go to dead letters.
            let since = f.last_error.as_ref().map(|(at, _)| *at).unwrap_or(now_ms);
            if f.breaker == "open" && now_ms.saturating_sub(since) > stall {
                out.push(Problem::new(
                    Component::Function,
                    ProblemKind::Suspended,
                    since,
                    format!(
                        "function {} suspended (circuit open) for {}, {} inputs held; last error: {}",
                        f.owner,
                        secs(now_ms.saturating_sub(since)),
                        f.held,
                        f.last_error
                            .as_ref()
                            .map(|(_, e)| e.as_str())
                            .unwrap_or("?")
                    ),
                ));
            }
        }
    }
    let u = &live.uplink;
    let progress = u.last_progress_ms.load(Ordering::Acquire);
    let in_flight = u.in_flight.load(Ordering::Acquire);
    if u.connected.load(Ordering::Acquire)
        && in_flight > 0
        && progress != 0
        && now_ms.saturating_sub(progress) > stall
    {
        out.push(Problem::new(
            Component::Uplink,
            ProblemKind::Stalled,
            progress,
            format!(
                "connected, {in_flight} batches in flight and no acknowledgement for {}",
                secs(now_ms - progress)
            ),
        ));
    }
    if let Some(f) = u.failure() {
        // A refusal or a local error will not pass by itself; a peer out of
        // reach or a flapping link may: those count after `stall_after`.
        let lasting = now_ms.saturating_sub(f.since_ms) > stall;
        let at_once = matches!(
            f.kind,
            ProblemKind::Refused | ProblemKind::StoreError | ProblemKind::ClockWrong
        );
        if at_once || lasting {
            let component = if f.kind == ProblemKind::ClockWrong {
                Component::Clock
            } else {
                Component::Uplink
            };
            out.push(Problem::new(
                component,
                f.kind,
                f.since_ms,
                format!(
                    "{} failed session(s) or attempt(s) in {}; the latest: {}",
                    f.count,
                    secs(now_ms.saturating_sub(f.since_ms)),
                    f.detail
                ),
            ));
        }
    }
    if let Some((since, detail)) = live.damage.detail() {
        out.push(Problem::new(
            Component::Outbox,
            ProblemKind::Corrupt,
            since,
            format!("the outbox is damaged ({detail}): nothing more is acknowledged into it; the daemon restarts itself to salvage it into a new file"),
        ));
    }
    let behind = crate::clock::behind_ms();
    if behind > CLOCK_BEHIND_MS {
        out.push(Problem::new(
            Component::Clock,
            ProblemKind::ClockWrong,
            now_ms,
            format!(
                "the wall clock is {} behind the latest time this node has seen: it was stepped back, or the gateway booted without a real-time clock; ingest timestamps are held at the latest until it catches up",
                secs(behind)
            ),
        ));
    }
    if let Some(f) = u.store_failure() {
        out.push(Problem::new(
            Component::Outbox,
            f.kind,
            f.since_ms,
            format!("{} failure(s); the latest: {}", f.count, f.detail),
        ));
    }
    out
}

/// The recorder's series, the process metrics, and the outbox disk's free
/// space as of now.
async fn metrics(State(s): State<AppState>) -> String {
    refresh_outbox_gauges(s.outbox.clone()).await;
    // One statvfs: cheap enough to do on the scrape.
    match outbox::disk_free(&s.outbox) {
        Ok(free) => metrics::gauge!(crate::metrics_help::OUTBOX_DISK_FREE_BYTES).set(free as f64),
        Err(e) => {
            tracing::debug!(error = %e, path = %s.outbox.display(), "Cannot read the outbox disk's free space.")
        }
    }
    fogline_telemetry::render_metrics(&fogline_telemetry::prometheus_handle())
}

async fn healthz(State(s): State<AppState>) -> Response {
    let health = Health::of(problems(&s.live, crate::clock::now_ms()));
    let code = StatusCode::from_u16(health.http_status()).unwrap_or(StatusCode::OK);
    (code, Json(health)).into_response()
}

async fn status(State(s): State<AppState>) -> Response {
    let path = s.outbox.clone();
    let stats = match tokio::task::spawn_blocking(move || outbox::read_stats(&path)).await {
        Ok(Ok(stats)) => stats,
        Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let live = &s.live;
    let refused = live
        .ingest
        .refused_subscriptions
        .lock()
        .map(|r| {
            r.iter()
                .map(|(f, c)| format!("{f} ({c:#04x} {})", crate::ingest::codec::reason_name(*c)))
                .collect()
        })
        .unwrap_or_default();
    Json(Status {
        broker_connected: live.ingest.broker_connected(),
        uplink_connected: live.uplink.connected.load(Ordering::Acquire),
        ingest: IngestStatus {
            clients: live.ingest.clients.load(Ordering::Acquire),
            sessions: live.ingest.sessions.load(Ordering::Acquire),
            pending_bytes: live.pending.pending_bytes() as u64,
            budget_bytes: live.pending.capacity() as u64,
            refused_subscriptions: refused,
        },
        uplink_cursor_regressions: live.uplink.cursor_regressions.load(Ordering::Acquire),
        uplink: live.uplink.status(),
        outbox: stats,
        functions: live.functions.lock().map(|f| f.clone()).unwrap_or_default(),
        deployments: live
            .deployments
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default(),
        local_subscribers: live.local.durable.status(),
        problems: problems(live, crate::clock::now_ms()),
    })
    .into_response()
}
