//! The aggregator's replication service: accepts node connections, identifies the
//! node by its client certificate, and runs one [`ReceiverSession`] per
//! connection against the [`Store`].
//!
//! **Invariants.**
//! - An `Ack{up_to}` is written only after the store transaction holding
//!   every record ≤ `up_to` has committed.
//! - At most one session per node applies at a time: a new connection for a
//!   node closes the old one (`Superseded`) and waits for its session to
//!   finish before reading the cursor it sends in `Welcome`. The store's
//!   "insert only above the cursor" rule makes a replay harmless anyway.
//! - Batches already buffered when one is read are applied together in one
//!   transaction (group commit), then acknowledged with one `Ack`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::store::{Store, StoreError};
use fogline_protocol::batch::decode_batch;
use fogline_protocol::frame::ErrorCode;
use fogline_protocol::server::{regression, HelloInfo, ReceiverSession, SessionError};
use fogline_protocol::{Frame, Record};

use fogline_transport::framed::{write_frame, FrameReader};
use fogline_transport::{close_code, TransportError};

/// How long a node has after the handshake to send `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Most records applied in one transaction when batches queue up.
const GROUP_RECORDS: usize = 32 * 1024;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("{0}")]
    Session(#[from] SessionError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("no Hello within {0:?}")]
    HelloTimeout(Duration),
}

impl SessionEnd {
    fn code(&self) -> ErrorCode {
        match self {
            SessionEnd::Transport(TransportError::Decode(_)) => ErrorCode::Malformed,
            SessionEnd::Transport(_) => ErrorCode::ProtocolViolation,
            SessionEnd::Session(e) => e.code(),
            SessionEnd::Store(_) | SessionEnd::Join(_) => ErrorCode::Internal,
            SessionEnd::HelloTimeout(_) => ErrorCode::ProtocolViolation,
        }
    }

    /// The connection is already gone: nothing to tell the peer.
    fn is_disconnect(&self) -> bool {
        matches!(
            self,
            SessionEnd::Transport(
                TransportError::ConnectionLost(_)
                    | TransportError::Closed { .. }
                    | TransportError::StreamFinished
            )
        )
    }
}

/// Per-node slot: the current connection and the lock its session holds.
#[derive(Default)]
struct NodeSlot {
    current: Mutex<Option<quinn::Connection>>,
    session: tokio::sync::Mutex<()>,
}

/// The QUIC listener of the aggregator.
pub struct QuicServer {
    endpoint: quinn::Endpoint,
    store: Arc<dyn Store>,
    nodes: Arc<Mutex<HashMap<String, Arc<NodeSlot>>>>,
}

impl QuicServer {
    /// Binds `listen` with the given TLS configuration.
    pub fn bind(
        listen: SocketAddr,
        config: quinn::ServerConfig,
        store: Arc<dyn Store>,
    ) -> Result<Self, TransportError> {
        let endpoint =
            quinn::Endpoint::server(config, listen).map_err(|source| TransportError::Bind {
                addr: listen.to_string(),
                source,
            })?;
        Ok(Self {
            endpoint,
            store,
            nodes: Arc::default(),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint
            .local_addr()
            .map_err(|source| TransportError::Bind {
                addr: "local address".into(),
                source,
            })
    }

    /// Accepts connections until `shutdown` flips, then closes every
    /// connection with `ShuttingDown` and waits briefly for them to go.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let incoming = tokio::select! {
                _ = shutdown.changed() => break,
                i = self.endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
            };
            let store = self.store.clone();
            let nodes = self.nodes.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => serve_connection(conn, store, nodes).await,
                    Err(e) => {
                        metrics::counter!("fogline_cloud_connections_rejected_total").increment(1);
                        warn!(%remote, error = %e, "Rejected a connection during the handshake.");
                    }
                }
            });
        }
        self.endpoint.close(
            close_code(ErrorCode::ShuttingDown),
            b"aggregator shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

fn peer_node_id(conn: &quinn::Connection) -> Result<String, String> {
    let identity = conn.peer_identity().ok_or("no client certificate")?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| "unexpected peer identity type")?;
    let leaf = certs.first().ok_or("empty certificate chain")?;
    fogline_transport::identity::node_id_from_der(leaf).map_err(|e| e.to_string())
}

async fn serve_connection(
    conn: quinn::Connection,
    store: Arc<dyn Store>,
    nodes: Arc<Mutex<HashMap<String, Arc<NodeSlot>>>>,
) {
    let remote = conn.remote_address();
    let node = match peer_node_id(&conn) {
        Ok(n) => n,
        Err(reason) => {
            metrics::counter!("fogline_cloud_connections_rejected_total").increment(1);
            warn!(%remote, %reason, "Rejected a node: unusable client certificate.");
            conn.close(close_code(ErrorCode::Unauthorized), reason.as_bytes());
            return;
        }
    };
    let slot = match nodes.lock() {
        Ok(mut map) => map.entry(node.clone()).or_default().clone(),
        Err(_) => {
            conn.close(close_code(ErrorCode::Internal), b"internal error");
            return;
        }
    };
    // Take over: close the previous connection of this node, then wait for
    // its session to finish so the cursor we read is final.
    if let Ok(mut current) = slot.current.lock() {
        if let Some(old) = current.replace(conn.clone()) {
            info!(%node, old = %old.remote_address(), new = %remote, "Node reconnected; closing its previous connection.");
            old.close(
                close_code(ErrorCode::Superseded),
                b"a newer connection of this node took over",
            );
        }
    }
    let guard = slot.session.lock().await;
    if conn.close_reason().is_some() {
        return; // superseded while waiting
    }
    info!(%node, %remote, "Node connected.");
    metrics::gauge!("fogline_cloud_connected_nodes").increment(1.0);
    let result = run_session(&conn, &node, store).await;
    metrics::gauge!("fogline_cloud_connected_nodes").decrement(1.0);
    match result {
        Ok(()) => info!(%node, %remote, "Node disconnected."),
        Err(e) if e.is_disconnect() => info!(%node, %remote, reason = %e, "Node disconnected."),
        Err(e) => {
            metrics::counter!("fogline_cloud_sessions_failed_total", "code" => e.code().name())
                .increment(1);
            warn!(%node, %remote, error = %e, "Closing the node's connection.");
            conn.close(close_code(e.code()), e.to_string().as_bytes());
        }
    }
    drop(guard);
    if let Ok(mut current) = slot.current.lock() {
        if current
            .as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            *current = None;
        }
    };
}

async fn run_session(
    conn: &quinn::Connection,
    node: &str,
    store: Arc<dyn Store>,
) -> Result<(), SessionEnd> {
    let (mut send, recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| SessionEnd::HelloTimeout(HELLO_TIMEOUT))?
        .map_err(TransportError::from_connection)?;
    let mut reader = FrameReader::new(recv);
    let mut session = ReceiverSession::new(node);
    let hello = tokio::time::timeout(HELLO_TIMEOUT, reader.next())
        .await
        .map_err(|_| SessionEnd::HelloTimeout(HELLO_TIMEOUT))??;
    let Frame::Hello {
        protocol_version,
        agent,
        incarnation,
        next_seq,
        acked,
        epoch,
        epoch_start,
    } = hello
    else {
        session.on_other(&hello)?;
        return Ok(());
    };
    let info = HelloInfo {
        incarnation,
        next_seq,
        acked,
        epoch,
        epoch_start,
    };
    let stored = {
        let (store, node) = (store.clone(), node.to_string());
        tokio::task::spawn_blocking(move || store.cursor(&node)).await??
    };
    let welcome = session.on_hello(protocol_version, info, stored)?;
    if let Some(r) = regression(stored, info) {
        // The store forgot records it acknowledged to this very outbox (a
        // restore from backup). The edge deleted them: they cannot come back.
        // Keep the loss on record and go on (ARCHITECTURE.md I-9).
        metrics::counter!("fogline_cloud_cursor_regressions_total").increment(1);
        metrics::counter!("fogline_cloud_records_lost_total").increment(r.to - r.from + 1);
        tracing::error!(node, from = r.from, to = r.to, cursor = stored.seq, acknowledged = acked, "The store is behind what it acknowledged to this node (restored from a backup?): records {}..={} are lost; recorded as a gap.", r.from, r.to);
        let (store, node) = (store.clone(), node.to_string());
        let now = fogline_telemetry::clock::now_ms();
        tokio::task::spawn_blocking(move || store.record_gap(&node, r.from, r.to, now)).await??;
    }
    write_frame(&mut send, &welcome).await?;
    debug!(node, %agent, cursor = stored.seq, incarnation, "Sent Welcome.");

    loop {
        let first = reader.next().await?;
        let mut group: Vec<Record> = Vec::new();
        let mut last_seq = 0;
        let mut skipped = 0;
        let mut frame = Some(first);
        while let Some(f) = frame.take() {
            let Frame::Batch(batch) = f else {
                session.on_other(&f)?;
                return Ok(());
            };
            session.check_batch(&batch)?;
            let records = decode_batch(&batch).map_err(TransportError::from)?;
            let accepted = session.on_batch(&batch, records)?;
            skipped += accepted.skipped;
            last_seq = accepted.last_seq;
            group.extend(accepted.to_apply);
            if group.len() < GROUP_RECORDS {
                frame = reader.buffered_frame()?;
            }
        }
        let started = Instant::now();
        let outcome = {
            let (store, node) = (store.clone(), node.to_string());
            let now = fogline_telemetry::clock::now_ms();
            let outbox = session.outbox();
            tokio::task::spawn_blocking(move || store.apply(&node, outbox, &group, last_seq, now))
                .await??
        };
        metrics::histogram!("fogline_cloud_apply_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("fogline_cloud_records_applied_total").increment(outcome.inserted as u64);
        metrics::counter!("fogline_cloud_records_skipped_total")
            .increment((outcome.skipped + skipped) as u64);
        write_frame(
            &mut send,
            &Frame::Ack {
                up_to: outcome.cursor,
            },
        )
        .await?;
    }
}
