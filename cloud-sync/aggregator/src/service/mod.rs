//! The aggregator's replication service: accepts node connections over QUIC
//! and TLS-over-TCP, identifies the node by its client certificate, refuses
//! revoked or expired ones, and drives one
//! [`ServerSession`](fogline_protocol::session::server::ServerSession) per
//! connection against the [`Store`].
//!
//! - [`nodes`]: which connection speaks for a node (takeover at `Hello`).
//! - [`gate`]: the CRL and validity checks, at the handshake and for
//!   connections already up.
//! - `session`: the I/O driver of one connection.
//! - [`events`]: metric names and the service's events.
//!
//! TLS files (certificate, key, CA, CRL) are watched: when one changes, new
//! connections use the new material and live connections whose certificate
//! is now refused are closed (`Unauthorized`), without a restart.

pub mod events;
pub mod gate;
pub mod guard;
pub mod latest;
pub mod nodes;
mod session;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fogline_protocol::frame::ErrorCode;
use fogline_protocol::session::server::ServerConfig;
use fogline_transport::server::{Incoming, Listener};
use fogline_transport::TransportError;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::warn;

use crate::config::CloudConfig;
use crate::store::health::StoreHealth;
use crate::store::Store;
use events::Rejected;
use gate::{revoked_serials, Gate};
use guard::{GuardConfig, HandshakeGuard, Report};
use nodes::Nodes;
use session::Shared;

/// The replication listener of the aggregator.
pub struct Service {
    listener: Arc<Listener>,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    config: CloudConfig,
}

/// Seconds since the Unix epoch, as certificate validity is given.
fn now_s() -> i64 {
    i64::try_from(fogline_telemetry::clock::now_ms() / 1000).unwrap_or(i64::MAX)
}

impl Service {
    /// Loads the TLS material and the CRL and binds QUIC (and TCP if
    /// enabled).
    pub async fn bind(
        config: &CloudConfig,
        store: Arc<dyn Store>,
        wants: crate::rollout::Wants,
    ) -> Result<Self, TransportError> {
        let tls = config.tls.server_tls();
        let gate = Gate::default();
        gate.set(revoked_serials(config.tls.crl.as_deref())?);
        let listener = Listener::bind(config.quic.listen, config.tcp_listen(), &tls).await?;
        let limits = &config.limits;
        let budget_bytes = limits.total_pending_bytes.clamp(1, Semaphore::MAX_PERMITS);
        // Applies that may wait on the store at once: its writers (one
        // SQLite connection, or the PostgreSQL pool) plus one ready to go.
        // The rest wait here, first come first served, on no thread: past
        // a few thousand nodes, applies parked on the SQLite writer's lock
        // filled tokio's blocking pool (512 threads), the decodes queued
        // behind them and context switches ate the CPU (issue 13 §2).
        // Both stores' applies wait on a channel (no thread) and are
        // committed in groups of up to GROUP_MAX: let that many through.
        let store_writers = match config.store.url {
            Some(_) => crate::store::postgres::GROUP_MAX,
            None => crate::store::sqlite::GROUP_MAX,
        };
        let shared = Shared {
            store,
            apply_slots: Arc::new(Semaphore::new(store_writers + 1)),
            holder: config.cluster.name(),
            health: Arc::new(StoreHealth::default()),
            nodes: Arc::new(Nodes::default()),
            latest: Arc::new(latest::LatestCache::new(config.http.latest_cache_bytes)),
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
            wants,
            deploy_budget: Arc::new(Semaphore::new(session::DEPLOY_BUDGET_BYTES)),
            session: ServerConfig {
                hello_timeout: limits.hello_timeout,
                idle_timeout: limits.idle_timeout,
                max_pending_bytes: limits.node_pending_bytes,
                group_records: limits.group_records,
                group_bytes: limits.node_pending_bytes.min(32 * 1024 * 1024),
            },
        };
        Ok(Self {
            listener: Arc::new(listener),
            shared: Arc::new(shared),
            gate: Arc::new(gate),
            config: config.clone(),
        })
    }

    /// The bound QUIC (UDP) address.
    pub fn quic_addr(&self) -> Result<std::net::SocketAddr, TransportError> {
        self.listener.quic_addr()
    }

    /// The bound TCP address, if TCP is served.
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        self.listener.tcp_addr()
    }

    /// Store failures the sessions met, for `/healthz`.
    pub fn store_health(&self) -> Arc<StoreHealth> {
        self.shared.health.clone()
    }

    /// Which connection speaks for each node.
    pub fn nodes(&self) -> Arc<Nodes> {
        self.shared.nodes.clone()
    }

    /// The newest record per stream of the nodes held here.
    pub fn latest_cache(&self) -> Arc<latest::LatestCache> {
        self.shared.latest.clone()
    }

    /// Accepts connections until `shutdown` flips, then closes every
    /// connection with `ShuttingDown` and waits briefly for them to go.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut conns = JoinSet::new();
        let reload = tokio::spawn(watch_tls(
            self.config.clone(),
            self.listener.clone(),
            self.gate.clone(),
            self.shared.nodes.clone(),
            shutdown.clone(),
        ));
        let handshake_timeout = self.config.limits.hello_timeout;
        let guard = Arc::new(Mutex::new(HandshakeGuard::new(GuardConfig::default())));
        loop {
            let incoming = tokio::select! {
                _ = shutdown.changed() => break,
                i = self.listener.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
            };
            // Reap finished connection tasks as we go.
            while conns.try_join_next().is_some() {}
            let remote = incoming.remote_address();
            let now = fogline_telemetry::clock::now_ms();
            let admitted = match guard.lock() {
                Ok(mut g) => {
                    if g.admit(remote.ip(), now) {
                        None
                    } else {
                        Some(g.due(remote.ip(), now))
                    }
                }
                Err(_) => None,
            };
            if let Some(report) = admitted {
                Rejected::RateLimited.count();
                incoming.refuse();
                if let Some(r) = report {
                    log_refused(remote, &r, None);
                }
                continue;
            }
            let (shared, gate, guard) = (self.shared.clone(), self.gate.clone(), guard.clone());
            conns.spawn(accept(incoming, handshake_timeout, shared, gate, guard));
        }
        reload.abort();
        self.shared.nodes.close_where(ErrorCode::ShuttingDown, |_| {
            Some("aggregator shutting down".into())
        });
        self.listener
            .close(
                ErrorCode::ShuttingDown,
                "aggregator shutting down",
                Duration::from_secs(2),
            )
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while conns.join_next().await.is_some() {}
        })
        .await;
    }
}

/// One line per source and interval: what failed, what was refused.
fn log_refused(remote: std::net::SocketAddr, r: &Report, error: Option<&str>) {
    warn!(
        %remote,
        failed_handshakes = r.failures,
        refused_without_handshake = r.refused,
        blocked = r.blocked,
        error = error.unwrap_or(""),
        "Rejected a connection during the handshake (repeats from this source are counted, logged at most every 10 s, and refused cheaply past 30 a minute)."
    );
}

async fn accept(
    incoming: Incoming,
    timeout: Duration,
    shared: Arc<Shared>,
    gate: Arc<Gate>,
    guard: Arc<Mutex<HandshakeGuard>>,
) {
    let remote = incoming.remote_address();
    let accepted = match incoming.handshake(timeout).await {
        Ok(a) => {
            if let Ok(mut g) = guard.lock() {
                g.succeeded(remote.ip());
            }
            a
        }
        Err(e) => {
            Rejected::Handshake.count();
            let report = guard
                .lock()
                .ok()
                .and_then(|mut g| g.failed(remote.ip(), fogline_telemetry::clock::now_ms()));
            if let Some(r) = report {
                log_refused(remote, &r, Some(&e.to_string()));
            }
            return;
        }
    };
    // rustls checked the chain and the CRL; resumed sessions skip that, and
    // the CRL may have changed since: check again.
    if let Some(reason) = gate.refuse(&accepted.peer, now_s()) {
        events::NodeRejected {
            remote,
            node: &accepted.peer.node_id,
            reason: &reason,
        }
        .emit();
        refuse(accepted.conn, ErrorCode::Unauthorized, &reason).await;
        return;
    }
    session::serve(shared, accepted.conn, accepted.peer).await;
}

/// Closes a connection the gate refused.
async fn refuse(mut conn: fogline_transport::conn::Connection, code: ErrorCode, reason: &str) {
    fogline_transport::conn::close_with(
        &mut conn.writer,
        &conn.handle,
        code,
        reason,
        Duration::from_secs(1),
    )
    .await;
}

/// Size and modification time of each TLS file: a change means reload.
fn fingerprint(config: &CloudConfig) -> Vec<fogline_transport::tls::FileStamp> {
    fogline_transport::tls::stamps(&config.tls.server_tls().files())
}

/// Polls the TLS files every `reload_every`; on a change, swaps the
/// listener's TLS configuration and the gate's CRL. Every tick, closes live
/// connections whose certificate is now refused (revoked or expired).
async fn watch_tls(
    config: CloudConfig,
    listener: Arc<Listener>,
    gate: Arc<Gate>,
    nodes: Arc<Nodes>,
    mut shutdown: watch::Receiver<bool>,
) {
    let every = config.tls.reload_every.max(Duration::from_millis(100));
    let mut seen = fingerprint(&config);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let now = fingerprint(&config);
        if now != seen {
            // Files are often written one after the other: let a rotation
            // settle before loading it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let tls = config.tls.server_tls();
            let loaded = revoked_serials(config.tls.crl.as_deref())
                .and_then(|revoked| listener.reload(&tls).map(|()| revoked));
            match loaded {
                Ok(revoked) => {
                    events::TlsReloaded {
                        revoked: revoked.len(),
                    }
                    .emit();
                    gate.set(revoked);
                    seen = fingerprint(&config);
                }
                // Keep serving with what was loaded before; retry next tick.
                Err(e) => events::TlsReloadFailed { error: &e }.emit(),
            }
        }
        let at = now_s();
        nodes.close_where(ErrorCode::Unauthorized, |peer| gate.refuse(peer, at));
    }
}
