//! The native MQTT endpoint: sensors publish straight to the gateway.
//!
//! MQTT 3.1.1 and 5 on one listener (plain TCP, and TLS with optional client
//! certificates), QoS 0/1/2. It is an *ingest* endpoint, not a broker: every
//! PUBLISH goes into the pipeline, and its PUBACK (QoS 1) or PUBREC (QoS 2)
//! is written only after the outbox commit holding its outputs is durable
//! (ARCHITECTURE.md I-1). SUBSCRIBE is refused with a reason.
//!
//! It is bounded before it trusts (I-34): a connection takes its slot at
//! accept, before TLS and CONNECT, and everything it does until its CONNECT
//! is authenticated is limited in time, bytes and rate.
//!
//! - `admission`: slots, per-address connection limit and rate, at accept.
//! - `budget`: bytes buffered before CONNECT, and of large packets.
//! - `connection`: one client's protocol state machine.
//! - `sessions`: client ids, takeover, persistence, expiry.
//! - `wills`: wills waiting for their delay, one per client id, bounded.
//! - `auth`: users (Argon2 hashes), certificates, anonymous.
//! - `tls`: the rustls acceptor.
//! - `events`: metric names, the reasons connections are cut, and the
//!   connections' events.

pub mod admission;
pub mod auth;
pub mod budget;
mod connection;
pub mod events;
pub mod sessions;
pub mod tls;
pub mod wills;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::session_store::{RestoredSession, SessionUpdate};
use super::{Chunk, IngestSink, IngestState};
use crate::config::EdgeConfig;
use admission::{Admission, Admitted, PerIp};
use auth::Authenticator;
use budget::PreConnect;
use events::{Cut, PRECONNECT_CONNECTIONS};
use sessions::Sessions;
use wills::Wills;

/// How often expired sessions are swept.
const EXPIRY_SWEEP: Duration = Duration::from_secs(60);

/// Limits every connection applies.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest packet.
    pub max_packet: usize,
    /// Largest payload processed (larger: refused and dead-lettered).
    pub max_payload: usize,
    /// QoS 1/2 window per client.
    pub receive_maximum: u16,
    /// Longest keep alive granted (enforced on MQTT 3.1.1 clients too).
    pub max_keep_alive: Duration,
    /// Longest session expiry granted.
    pub max_session_expiry: Duration,
    /// Accept → complete CONNECT deadline, TLS handshake included.
    pub connect_timeout: Duration,
    /// Largest CONNECT (before authentication).
    pub max_connect_bytes: usize,
    /// Idle limit of an MQTT 3.1.1 client with keep alive 0.
    pub idle_timeout: Duration,
    /// Simultaneous connections.
    pub max_connections: usize,
    /// On shutdown, how long a connection waits for the acknowledgements of
    /// what the pipeline took.
    pub drain_timeout: Duration,
}

/// Most of `node.shutdown_timeout`, leaving the daemon time to close.
pub(crate) fn drain_timeout(config: &EdgeConfig) -> Duration {
    config
        .node
        .shutdown_timeout
        .saturating_sub(Duration::from_millis(500))
        .max(Duration::from_millis(100))
}

/// What every connection shares.
pub(crate) struct Shared {
    pub sink: IngestSink,
    pub sessions: Arc<Sessions>,
    pub auth: Authenticator,
    pub limits: Limits,
    pub state: Arc<IngestState>,
    pub shutdown: watch::Receiver<bool>,
    pub admission: Arc<Admission>,
    pub preconnect: Arc<PreConnect>,
    pub wills: Wills,
    /// Local subscribers and who may subscribe to what.
    pub local: Arc<crate::local::LocalBus>,
    pub grants: crate::local::Grants,
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// A listener could not bind.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        /// Config key.
        key: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// TLS files are unusable.
    #[error("[broker.tls]: {0}")]
    Tls(String),
}

/// A running endpoint.
pub struct Endpoint {
    /// Addresses listened on (plain, TLS).
    pub addrs: Vec<(&'static str, SocketAddr)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Endpoint {
    /// Starts the listeners. `restored`: sessions read from the outbox;
    /// `local`: where pipelines' local outputs are served to subscribers.
    pub async fn start(
        config: &EdgeConfig,
        sink: IngestSink,
        restored: Vec<RestoredSession>,
        state: Arc<IngestState>,
        shutdown: watch::Receiver<bool>,
        local: Arc<crate::local::LocalBus>,
    ) -> Result<Self, EndpointError> {
        let b = &config.broker;
        let sessions = Arc::new(Sessions::new(
            b.max_sessions,
            2 * usize::from(b.receive_maximum),
        ));
        sessions.restore(restored, crate::clock::ingest_ms());
        let limits = Limits {
            max_packet: config.broker_max_packet(),
            max_payload: b.max_payload_bytes,
            receive_maximum: b.receive_maximum,
            max_keep_alive: b.max_keep_alive,
            max_session_expiry: b.max_session_expiry,
            connect_timeout: b.connect_timeout,
            max_connect_bytes: config.broker_max_connect(),
            idle_timeout: b.idle_timeout,
            max_connections: b.max_connections,
            drain_timeout: drain_timeout(config),
        };
        let shared = Arc::new(Shared {
            preconnect: PreConnect::new(sink.clone(), config.broker_max_preconnect()),
            sink,
            sessions: sessions.clone(),
            auth: Authenticator::new(
                &b.users,
                config.broker_allows_anonymous(),
                b.auth_workers,
                b.auth_queue,
            ),
            limits,
            state,
            shutdown: shutdown.clone(),
            admission: Arc::new(Admission::new(
                b.max_connections,
                PerIp {
                    max_connections: b.max_connections_per_ip,
                    rate: b.connect_rate_per_ip,
                    burst: b.connect_burst_per_ip,
                },
            )),
            wills: Wills::new(b.max_pending_will_bytes),
            local,
            grants: crate::local::Grants::new(&b.local_topics),
        });
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        let mut plain = Vec::new();
        if b.plaintext {
            plain.push(("broker.listen", b.listen));
        }
        if let Some(extra) = b.listen_v5 {
            warn!(listen_v5 = %extra, "broker.listen_v5 is deprecated: MQTT 3.1.1 and 5 are both served on broker.listen; listening on it too.");
            plain.push(("broker.listen_v5", extra));
        }
        for (key, addr) in plain {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| EndpointError::Bind { key, addr, source })?;
            let local = listener.local_addr().unwrap_or(addr);
            addrs.push((key, local));
            tasks.push(tokio::spawn(accept(
                listener,
                None,
                shared.clone(),
                shutdown.clone(),
            )));
        }
        if let Some(t) = &b.tls {
            let acceptor = tls::acceptor(
                &config.resolve(&t.cert),
                &config.resolve(&t.key),
                t.client_ca.as_ref().map(|p| config.resolve(p)).as_deref(),
                t.require_client_cert,
            )
            .map_err(EndpointError::Tls)?;
            let listener =
                TcpListener::bind(t.listen)
                    .await
                    .map_err(|source| EndpointError::Bind {
                        key: "broker.tls.listen",
                        addr: t.listen,
                        source,
                    })?;
            addrs.push((
                "broker.tls.listen",
                listener.local_addr().unwrap_or(t.listen),
            ));
            tasks.push(tokio::spawn(accept(
                listener,
                Some(acceptor),
                shared.clone(),
                shutdown.clone(),
            )));
        }
        tasks.push(tokio::spawn(wills::run(shared.clone(), shutdown.clone())));
        tasks.push(tokio::spawn(sweep_expired(shared.clone(), shutdown)));
        for (key, addr) in &addrs {
            info!(%key, %addr, "MQTT endpoint listening (MQTT 3.1.1 and 5).");
        }
        Ok(Self { addrs, tasks })
    }

    /// The first plain listener's address.
    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.addrs
            .iter()
            .find(|(k, _)| *k == "broker.listen")
            .map(|(_, a)| *a)
    }

    /// Stops accepting (connections end on the shutdown signal).
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Accepts connections until shutdown. Each is admitted first (slot,
/// per-address limit and rate) or closed at once; then served on its own
/// task, after a TLS handshake when `tls` is set, with `connect_timeout`
/// running from now.
async fn accept(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: pause, go on.
                    warn!(error = %e, "Accepting an MQTT connection failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let accepted = Instant::now();
        let admitted = match shared.admission.admit(peer.ip(), accepted.into_std()) {
            Ok(a) => a,
            Err(cut) => {
                // Closed before anything is read or allocated for it.
                cut.count();
                debug!(%peer, reason = cut.label(), "Connection refused at accept.");
                // A reset, not a close: no FIN exchange and no TIME_WAIT
                // kept for a peer we refuse (a flood makes thousands).
                let _ = stream.set_zero_linger();
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let pre = PreConnectGauge::new();
        let deadline = accepted + shared.limits.connect_timeout;
        let shared = shared.clone();
        match tls.clone() {
            None => tokio::spawn(connection::serve(
                stream, peer, None, shared, admitted, pre, deadline,
            )),
            Some(acceptor) => tokio::spawn(serve_tls(
                acceptor, stream, peer, shared, admitted, pre, deadline,
            )),
        };
    }
}

/// Counts a connection as "before CONNECT" until dropped.
pub(crate) struct PreConnectGauge(bool);

impl PreConnectGauge {
    fn new() -> Self {
        metrics::gauge!(PRECONNECT_CONNECTIONS).increment(1.0);
        Self(true)
    }

    /// The connection is past CONNECT (or gone).
    pub(crate) fn done(&mut self) {
        if std::mem::take(&mut self.0) {
            metrics::gauge!(PRECONNECT_CONNECTIONS).decrement(1.0);
        }
    }
}

impl Drop for PreConnectGauge {
    fn drop(&mut self) {
        self.done();
    }
}

async fn serve_tls(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    admitted: Admitted,
    pre: PreConnectGauge,
    deadline: Instant,
) {
    // The handshake runs on the connection's slot and within its
    // connect_timeout (I-34).
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let cn = tls::client_cn(tls.get_ref().1.peer_certificates());
            connection::serve(tls, peer, cn, shared, admitted, pre, deadline).await;
        }
        Ok(Err(e)) => events::TlsHandshakeFailed { peer, error: &e }.emit(),
        Err(_) => {
            Cut::ConnectTimeout.count();
            debug!(%peer, "TLS handshake not done within broker.connect_timeout; closing.");
        }
    }
}

async fn sweep_expired(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        for key in shared.sessions.expire(crate::clock::ingest_ms()) {
            events::SessionExpired { session: &key }.emit();
            let mut chunk = Chunk::new(None, shared.limits.max_payload);
            chunk.session = Some(SessionUpdate {
                key,
                discard: true,
                ..SessionUpdate::default()
            });
            if shared.sink.send(chunk).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(EXPIRY_SWEEP) => {}
        }
    }
}
