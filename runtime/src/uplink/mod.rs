//! The uplink: drives the QUIC replication client. Reads batches from the
//! outbox after the aggregator's cursor, keeps several in flight, and deletes
//! what the aggregator acknowledged.
//!
//! Invariants:
//! - Outbox rows are deleted only up to a sequence the aggregator acknowledged
//!   (its acks follow its commit) or reported as its cursor on connect.
//! - On every (re)connect, sending resumes right after the aggregator's
//!   cursor, whatever was in flight before.
//! - A connection that makes no progress for `stall_timeout` while batches are
//!   in flight is dropped and re-established (connected but stuck is a failure).
//!
//! The uplink knows nothing about MQTT or functions.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fogline_cloud::protocol::client::{InFlight, SenderError, SenderState};
use fogline_cloud::transport::client::{ClientTls, Link, UplinkClient};
use rand::Rng;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::config::{EdgeConfig, UplinkConfig};
use crate::outbox::{OutboxError, OutboxReader, Record};

/// No ack for this long while batches are in flight: reconnect.
const STALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Live uplink state for status and metrics.
#[derive(Debug, Default)]
pub struct UplinkState {
    /// Connected to the aggregator.
    pub connected: AtomicBool,
    /// Highest sequence acknowledged.
    pub acked_seq: AtomicU64,
    /// When the aggregator last acknowledged anything (ms since epoch).
    pub last_sync_ms: AtomicU64,
}

/// Why a session with the aggregator ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("{0}")]
    Transport(#[from] fogline_cloud::transport::TransportError),
    #[error("{0}")]
    Outbox(#[from] OutboxError),
    #[error("aggregator broke the protocol: {0}")]
    Protocol(#[from] SenderError),
    #[error("no acknowledgement for {0:?} with batches in flight")]
    Stalled(Duration),
    #[error("outbox task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("shutting down")]
    Shutdown,
}

/// Everything the uplink needs.
pub struct Uplink {
    config: UplinkConfig,
    tls: ClientTls,
    reader: Arc<Mutex<OutboxReader>>,
    state: Arc<UplinkState>,
    committed: Arc<Notify>,
}

impl Uplink {
    /// Prepare the uplink for `config` (which must have an `[uplink]`).
    pub fn new(
        config: &EdgeConfig,
        uplink: &UplinkConfig,
        reader: OutboxReader,
        state: Arc<UplinkState>,
        committed: Arc<Notify>,
    ) -> Self {
        Self {
            tls: ClientTls {
                ca: config.resolve(&uplink.ca),
                cert: config.resolve(&uplink.cert),
                key: config.resolve(&uplink.key),
            },
            config: uplink.clone(),
            reader: Arc::new(Mutex::new(reader)),
            state,
            committed,
        }
    }

    /// Replicate until `shutdown` flips. Reconnects with backoff and jitter.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = self.config.reconnect_min;
        let mut client: Option<UplinkClient> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let result = async {
                let c = match &client {
                    Some(c) => c,
                    None => client.insert(UplinkClient::new(&self.tls)?),
                };
                self.session(c, &mut shutdown).await
            }
            .await;
            self.set_connected(false).await;
            match result {
                Err(SessionEnd::Shutdown) => break,
                Err(e) => {
                    metrics::counter!("fogline_uplink_disconnects_total").increment(1);
                    warn!(server = %self.config.server, error = %e, retry_in = ?backoff, "Uplink session ended.");
                }
                Ok(()) => {}
            }
            let jitter = rand::rng().random_range(0.5..1.5);
            let delay = backoff.mul_f64(jitter);
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(self.config.reconnect_max);
            if backoff.is_zero() {
                backoff = Duration::from_millis(10);
            }
        }
        info!("Uplink stopped.");
    }

    async fn set_connected(&self, connected: bool) {
        if self.state.connected.swap(connected, Ordering::AcqRel) != connected {
            metrics::gauge!("fogline_uplink_connected").set(if connected { 1.0 } else { 0.0 });
            let reader = self.reader.clone();
            let _ = tokio::task::spawn_blocking(move || {
                reader.lock().map(|r| r.note_connected(connected)).ok()
            })
            .await;
        }
    }

    async fn outbox<T: Send + 'static>(
        &self,
        f: impl FnOnce(&OutboxReader) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, SessionEnd> {
        let reader = self.reader.clone();
        let r = tokio::task::spawn_blocking(move || match reader.lock() {
            Ok(r) => f(&r),
            Err(poisoned) => f(&poisoned.into_inner()),
        })
        .await??;
        Ok(r)
    }

    async fn resolve(&self) -> Result<SocketAddr, SessionEnd> {
        let addrs = tokio::net::lookup_host(self.config.server.as_str())
            .await
            .map_err(|e| fogline_cloud::transport::TransportError::Resolve {
                server: self.config.server.clone(),
                reason: e.to_string(),
            })?;
        addrs.into_iter().next().ok_or_else(|| {
            fogline_cloud::transport::TransportError::Resolve {
                server: self.config.server.clone(),
                reason: "no address".into(),
            }
            .into()
        })
    }

    /// One connection's life: handshake, resume after the cursor, then keep
    /// the window full and apply acks until something fails.
    async fn session(
        &self,
        client: &UplinkClient,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), SessionEnd> {
        let addr = self.resolve().await?;
        let server_name = self.config.server_name();
        let Link {
            node_id,
            cursor,
            mut sender,
            mut receiver,
        } = tokio::select! {
            _ = shutdown.changed() => return Err(SessionEnd::Shutdown),
            l = client.connect(addr, &server_name, self.config.connect_timeout) => l?,
        };
        let removed = self.outbox(move |r| r.accept_cursor(cursor)).await?;
        self.set_connected(true).await;
        self.note_ack(cursor);
        info!(server = %addr, node = %node_id, cursor, removed, "Uplink connected; resuming after the aggregator's cursor.");

        let max_records = self.config.batch_records;
        let max_bytes = self.config.batch_bytes;
        // The protocol's sender state: window, in-flight batches, ack checks.
        let mut window = SenderState::new(cursor, self.config.max_in_flight);
        let mut last_progress = Instant::now();
        let mut drained = false;
        loop {
            // Keep the window full.
            while window.has_room() && !drained {
                let after = window.last_sent();
                let batch: Vec<Record> = self
                    .outbox(move |r| r.read_after(after, max_records, max_bytes))
                    .await?;
                if batch.is_empty() {
                    drained = true;
                    break;
                }
                let sent = sender.send_batch(&batch).await?;
                metrics::counter!("fogline_uplink_records_sent_total")
                    .increment(sent.records as u64);
                metrics::counter!("fogline_uplink_bytes_sent_total")
                    .increment(sent.encoded_bytes as u64);
                debug!(
                    first = sent.first_seq,
                    last = sent.last_seq,
                    bytes = sent.encoded_bytes,
                    "Batch sent."
                );
                if window.in_flight().next().is_none() {
                    last_progress = Instant::now();
                }
                window.on_sent(InFlight {
                    first_seq: sent.first_seq,
                    last_seq: sent.last_seq,
                    records: sent.records,
                })?;
            }
            let stall_in = STALL_TIMEOUT.saturating_sub(last_progress.elapsed());
            tokio::select! {
                _ = shutdown.changed() => return Err(SessionEnd::Shutdown),
                ack = receiver.next_ack() => {
                    let acked = ack?;
                    window.on_ack(acked)?;
                    last_progress = Instant::now();
                    let deleted = self.outbox(move |r| r.delete_through(acked)).await?;
                    metrics::counter!("fogline_uplink_records_acked_total").increment(deleted as u64);
                    self.note_ack(acked);
                }
                _ = self.committed.notified(), if drained => { drained = false; }
                // New records may also come from another writer; poll now and then.
                _ = tokio::time::sleep(Duration::from_millis(250)), if drained => { drained = false; }
                _ = tokio::time::sleep(stall_in), if window.in_flight().next().is_some() => {
                    return Err(SessionEnd::Stalled(STALL_TIMEOUT));
                }
            }
        }
    }

    fn note_ack(&self, acked: u64) {
        self.state.acked_seq.fetch_max(acked, Ordering::AcqRel);
        self.state
            .last_sync_ms
            .store(crate::clock::now_ms(), Ordering::Release);
        metrics::gauge!("fogline_uplink_acked_seq").set(acked as f64);
    }
}
