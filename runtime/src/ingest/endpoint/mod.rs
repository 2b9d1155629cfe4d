//! The native MQTT endpoint: sensors publish straight to the gateway.
//!
//! MQTT 3.1.1 and 5 on one listener (plain TCP, and TLS with optional client
//! certificates), QoS 0/1/2. It is an *ingest* endpoint, not a broker: every
//! PUBLISH goes into the pipeline, and its PUBACK (QoS 1) or PUBREC (QoS 2)
//! is written only after the outbox commit holding its outputs is durable
//! (ARCHITECTURE.md I-1). SUBSCRIBE is refused with a reason.
//!
//! - `connection`: one client's protocol state machine.
//! - `sessions`: client ids, takeover, persistence, expiry.
//! - `auth`: users (Argon2 hashes), certificates, anonymous.
//! - `tls`: the rustls acceptor.

pub mod auth;
mod connection;
pub mod sessions;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

use super::session_store::{RestoredSession, SessionUpdate};
use super::{Chunk, IngestSink, IngestState};
use crate::config::EdgeConfig;
use auth::Authenticator;
use sessions::Sessions;

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
    /// Longest keep alive granted.
    pub max_keep_alive: Duration,
    /// Longest session expiry granted.
    pub max_session_expiry: Duration,
    /// Accept → CONNECT deadline.
    pub connect_timeout: Duration,
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
    pub connections: Arc<Semaphore>,
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
    /// Starts the listeners. `restored`: sessions read from the outbox.
    pub async fn start(
        config: &EdgeConfig,
        sink: IngestSink,
        restored: Vec<RestoredSession>,
        state: Arc<IngestState>,
        shutdown: watch::Receiver<bool>,
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
            max_connections: b.max_connections,
            drain_timeout: drain_timeout(config),
        };
        let shared = Arc::new(Shared {
            sink,
            sessions: sessions.clone(),
            auth: Authenticator::new(&b.users, config.broker_allows_anonymous()),
            limits,
            state,
            shutdown: shutdown.clone(),
            connections: Arc::new(Semaphore::new(b.max_connections)),
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

/// Accepts connections until shutdown; each is served on its own task,
/// after a TLS handshake when `tls` is set.
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
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        match tls.clone() {
            None => tokio::spawn(connection::serve(stream, peer, None, shared)),
            Some(acceptor) => tokio::spawn(serve_tls(acceptor, stream, peer, shared)),
        };
    }
}

async fn serve_tls(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
) {
    let timeout = shared.limits.connect_timeout;
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let cn = tls::client_cn(tls.get_ref().1.peer_certificates());
            connection::serve(tls, peer, cn, shared).await;
        }
        Ok(Err(e)) => {
            metrics::counter!("fogline_ingest_tls_handshake_failures_total").increment(1);
            warn!(%peer, error = %e, "TLS handshake failed (a client without TLS, or a certificate not from broker.tls.client_ca).");
        }
        Err(_) => debug!(%peer, "TLS handshake timed out."),
    }
}

async fn sweep_expired(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        for key in shared.sessions.expire(crate::clock::ingest_ms()) {
            metrics::counter!("fogline_ingest_sessions_expired_total").increment(1);
            info!(session = %key, "MQTT session expired.");
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
