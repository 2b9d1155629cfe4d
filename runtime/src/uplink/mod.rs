//! The uplink: drives the QUIC replication client. Reads batches from the
//! outbox after the aggregator's cursor, keeps several in flight, and deletes
//! what the aggregator acknowledged.
//!
//! Invariants (ARCHITECTURE.md I-7, I-8, I-9):
//! - Outbox rows are deleted only up to a sequence the aggregator acknowledged
//!   (its acks follow its commit) or reported as its cursor on connect *for
//!   this outbox's incarnation*. A cursor recorded for another outbox (wiped,
//!   replaced, cloned) or beyond anything this outbox numbered (an older
//!   copy of it) deletes nothing: the outbox is renumbered above it instead.
//! - A cursor below what the aggregator already acknowledged to this outbox
//!   (its store was restored) raises an alarm; replication goes on after it.
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

use fogline_protocol::client::{InFlight, SenderError, SenderState};
use fogline_protocol::server::HelloInfo;
use fogline_transport::client::{ClientTls, Link, UplinkClient};
use rand::Rng;
use tokio::sync::{watch, Notify};
use tracing::{debug, error, info, warn};

use crate::config::{EdgeConfig, UplinkConfig};
use crate::outbox::{OutboxError, OutboxIdentity, OutboxReader, Record};

/// No ack for this long while batches are in flight: reconnect.
const STALL_TIMEOUT: Duration = Duration::from_secs(20);

/// While batches are in flight, a batch smaller than a quarter of
/// `batch_records` waits up to this long for more records: fewer, larger
/// batches (each costs the aggregator a transaction) when records trickle
/// in. Nothing waits when nothing is in flight.
const COALESCE_WAIT: Duration = Duration::from_millis(5);

/// Acknowledged rows are deleted in bulk: when this many are pending, when
/// nothing is in flight, or `DELETE_EVERY` after the first one. Deleting is
/// bookkeeping (the cursor protects against resends), it need not follow
/// every ack.
const DELETE_BATCH: u64 = 16_384;
const DELETE_EVERY: Duration = Duration::from_millis(200);

/// Live uplink state for status and metrics.
#[derive(Debug, Default)]
pub struct UplinkState {
    /// Connected to the aggregator.
    pub connected: AtomicBool,
    /// Highest sequence acknowledged.
    pub acked_seq: AtomicU64,
    /// When the aggregator last acknowledged anything (ms since epoch).
    pub last_sync_ms: AtomicU64,
    /// When the current session last made progress (connect or ack), ms
    /// since epoch; 0 when not connected.
    pub last_progress_ms: AtomicU64,
    /// Batches in flight right now.
    pub in_flight: AtomicU64,
    /// Times the aggregator's cursor was behind what it had acknowledged.
    pub cursor_regressions: AtomicU64,
}

/// How to resume, given this outbox and the aggregator's Welcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The cursor is this outbox's: delete through it, send after it.
    Continue,
    /// The cursor is this outbox's but below what was acknowledged: records
    /// `from..=to` were lost by the aggregator (restored store). Alarm, then
    /// continue: they were deleted here and cannot be resent.
    Regressed {
        /// First lost seq.
        from: u64,
        /// Last lost seq.
        to: u64,
    },
    /// The cursor belongs to another outbox of this node: renumber every
    /// buffered record above it, delete nothing.
    Foreign,
    /// The cursor claims this outbox's incarnation but is beyond anything it
    /// numbered: this file is an older copy (a restored image, a clone).
    /// Take a new incarnation and renumber above it; delete nothing.
    Ahead,
}

/// What the aggregator's Welcome said about this node's outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Welcomed {
    /// Highest seq applied.
    pub cursor: u64,
    /// The incarnation that cursor belongs to (0: none recorded).
    pub incarnation: u64,
    /// The epoch last recorded with it (0: none).
    pub epoch: u64,
}

/// Decides how to resume (the policy of ARCHITECTURE.md I-8 and I-9). An
/// aggregator that recorded no incarnation (0, an older store) is taken at
/// its word only if its cursor is within what this outbox numbered.
///
/// Same incarnation, but this file is an older copy of itself when the
/// aggregator last saw another start (epoch) of it and this start numbered
/// from at or below the cursor — a genuine restart numbers above everything
/// applied: its numbering forked, and nothing of it may be deleted by the
/// cursor.
pub fn reconcile(outbox: OutboxIdentity, w: Welcomed) -> Resume {
    let cursor = w.cursor;
    let ours =
        w.incarnation == outbox.incarnation || (w.incarnation == 0 && cursor < outbox.next_seq);
    let forked = w.incarnation != 0
        && w.epoch != 0
        && w.epoch != outbox.epoch
        && outbox.epoch_start <= cursor;
    if !ours {
        Resume::Foreign
    } else if cursor >= outbox.next_seq || forked {
        Resume::Ahead
    } else if cursor < outbox.acked_seq {
        Resume::Regressed {
            from: cursor + 1,
            to: outbox.acked_seq,
        }
    } else {
        Resume::Continue
    }
}

/// Why a session with the aggregator ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("{0}")]
    Transport(#[from] fogline_transport::TransportError),
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
    #[error("the outbox took a new incarnation; reconnecting to announce it")]
    Renewed,
}

/// Everything the uplink needs.
pub struct Uplink {
    config: UplinkConfig,
    tls: ClientTls,
    reader: Arc<Mutex<OutboxReader>>,
    state: Arc<UplinkState>,
    committed: Arc<Notify>,
    committed_seq: Arc<AtomicU64>,
}

impl Uplink {
    /// Prepare the uplink for `config` (which must have an `[uplink]`).
    pub fn new(
        config: &EdgeConfig,
        uplink: &UplinkConfig,
        reader: OutboxReader,
        state: Arc<UplinkState>,
        committed: Arc<Notify>,
        committed_seq: Arc<AtomicU64>,
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
            committed_seq,
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
                Err(SessionEnd::Renewed) => {
                    info!("Reconnecting at once to announce the outbox's new incarnation.");
                    continue;
                }
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
        if !connected {
            self.state.last_progress_ms.store(0, Ordering::Release);
            self.state.in_flight.store(0, Ordering::Release);
        }
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
            .map_err(|e| fogline_transport::TransportError::Resolve {
                server: self.config.server.clone(),
                reason: e.to_string(),
            })?;
        addrs.into_iter().next().ok_or_else(|| {
            fogline_transport::TransportError::Resolve {
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
        let id = self.outbox(|r| r.identity()).await?;
        let hello = HelloInfo {
            incarnation: id.incarnation,
            next_seq: id.next_seq,
            acked: id.acked_seq,
            epoch: id.epoch,
            epoch_start: id.epoch_start,
        };
        let Link {
            node_id,
            cursor,
            incarnation,
            epoch,
            mut sender,
            mut receiver,
        } = tokio::select! {
            _ = shutdown.changed() => return Err(SessionEnd::Shutdown),
            l = client.connect(addr, &server_name, self.config.connect_timeout, hello) => l?,
        };
        let welcomed = Welcomed {
            cursor,
            incarnation,
            epoch,
        };
        if let Err(e) = self.resume(&node_id, id, welcomed).await {
            sender.close(fogline_protocol::ErrorCode::Ok, "reconnecting");
            return Err(e);
        }
        sender.resume_after(cursor);
        self.set_connected(true).await;
        self.note_ack(cursor);
        self.state
            .last_progress_ms
            .store(crate::clock::now_ms(), Ordering::Release);

        let max_records = self.config.batch_records;
        let max_bytes = self.config.batch_bytes;
        // The protocol's sender state: window, in-flight batches, ack checks.
        let mut window = SenderState::new(cursor, self.config.max_in_flight);
        let mut last_progress = Instant::now();
        let mut drained = false;
        // Records committed so far (at least what the outbox held at connect).
        let known_seq = id.next_seq.saturating_sub(1);
        let mut coalescing: Option<Instant> = None;
        let coalesce_min = (max_records / 4).max(1) as u64;
        // Acknowledged but not deleted yet: (through, since).
        let mut to_delete: Option<(u64, Instant)> = None;
        let mut deleted_through = cursor;
        loop {
            // Keep the window full.
            while window.has_room() && !drained {
                let after = window.last_sent();
                let available = self
                    .committed_seq
                    .load(Ordering::Acquire)
                    .max(known_seq)
                    .saturating_sub(after);
                if window.in_flight().next().is_some() && available < coalesce_min {
                    let since = *coalescing.get_or_insert_with(Instant::now);
                    if since.elapsed() < COALESCE_WAIT {
                        break;
                    }
                }
                coalescing = None;
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
            self.state
                .in_flight
                .store(window.in_flight().count() as u64, Ordering::Release);
            let stall_in = STALL_TIMEOUT.saturating_sub(last_progress.elapsed());
            tokio::select! {
                _ = shutdown.changed() => return Err(SessionEnd::Shutdown),
                ack = receiver.next_ack() => {
                    let acked = ack?;
                    window.on_ack(acked)?;
                    last_progress = Instant::now();
                    self.state
                        .last_progress_ms
                        .store(crate::clock::now_ms(), Ordering::Release);
                    self.note_ack(acked);
                    let since = to_delete.map_or_else(Instant::now, |(_, t)| t);
                    to_delete = Some((acked, since));
                    if acked.saturating_sub(deleted_through) >= DELETE_BATCH
                        || window.in_flight().next().is_none()
                    {
                        deleted_through = self.delete_acknowledged(&mut to_delete).await?;
                    }
                }
                _ = async {
                    match to_delete {
                        Some((_, since)) => tokio::time::sleep_until((since + DELETE_EVERY).into()).await,
                        None => std::future::pending().await,
                    }
                } => {
                    deleted_through = self.delete_acknowledged(&mut to_delete).await?;
                }
                _ = self.committed.notified(), if drained || coalescing.is_some() => { drained = false; }
                _ = async {
                    match coalescing {
                        Some(since) => tokio::time::sleep_until((since + COALESCE_WAIT).into()).await,
                        None => std::future::pending().await,
                    }
                }, if !drained => {}
                // New records may also come from another writer; poll now and then.
                _ = tokio::time::sleep(Duration::from_millis(250)), if drained => { drained = false; }
                _ = tokio::time::sleep(stall_in), if window.in_flight().next().is_some() => {
                    return Err(SessionEnd::Stalled(STALL_TIMEOUT));
                }
            }
        }
    }

    /// Applies the aggregator's cursor to the outbox according to [`reconcile`].
    async fn resume(&self, node: &str, id: OutboxIdentity, w: Welcomed) -> Result<(), SessionEnd> {
        let (cursor, theirs) = (w.cursor, w.incarnation);
        match reconcile(id, w) {
            Resume::Continue => {
                let removed = self.outbox(move |r| r.accept_cursor(cursor)).await?;
                info!(
                    node,
                    cursor,
                    removed,
                    incarnation = id.incarnation,
                    "Uplink connected; resuming after the aggregator's cursor."
                );
            }
            Resume::Regressed { from, to } => {
                let detail = format!(
                    "the aggregator's cursor is {cursor} but it had acknowledged up to {to} to this outbox: records {from}..={to} were lost on its side (store restored from a backup?); they were deleted here after the acknowledgement and cannot be resent"
                );
                metrics::counter!("fogline_uplink_cursor_regressions_total").increment(1);
                self.state.cursor_regressions.fetch_add(1, Ordering::AcqRel);
                error!(node, cursor, acked = to, lost = to - from + 1, "{detail}");
                let d = detail.clone();
                self.outbox(move |r| r.raise_alarm("cursor_behind", &d))
                    .await?;
                let removed = self.outbox(move |r| r.accept_cursor(cursor)).await?;
                info!(
                    node,
                    cursor, removed, "Uplink connected; resuming after the aggregator's cursor."
                );
            }
            r @ (Resume::Foreign | Resume::Ahead) => {
                let ahead = r == Resume::Ahead;
                let incarnation = if ahead {
                    self.outbox(|r| r.rotate_incarnation()).await?
                } else {
                    id.incarnation
                };
                let (moved, offset) = self.outbox(move |r| r.renumber_above(cursor)).await?;
                if ahead || moved > 0 {
                    metrics::counter!("fogline_uplink_renumbered_total").increment(1);
                }
                let detail = if ahead {
                    format!(
                        "the aggregator has seen this outbox further (cursor {cursor}, epoch {}; this file: next seq {}, epoch {} from seq {}): it is an older copy of the outbox (restored image or clone); new incarnation {incarnation:#x}, {moved} buffered records renumbered by +{offset} and resent, nothing deleted",
                        w.epoch, id.next_seq, id.epoch, id.epoch_start
                    )
                } else {
                    format!(
                        "the aggregator's cursor {cursor} belongs to another outbox of this node (incarnation {theirs:#x}, this one is {:#x}: wiped or replaced); {moved} buffered records renumbered by +{offset}, nothing deleted",
                        id.incarnation
                    )
                };
                if ahead || moved > 0 {
                    warn!(node, cursor, moved, offset, "{detail}");
                    let kind = if ahead { "cursor_ahead" } else { "new_outbox" };
                    self.outbox(move |r| r.raise_alarm(kind, &detail)).await?;
                } else {
                    info!(node, cursor, incarnation = id.incarnation, "The aggregator's cursor belongs to an earlier outbox of this node; this one's records are already above it.");
                }
                if ahead {
                    // The Hello carried the old incarnation: announce the new
                    // one before anything is applied under it.
                    return Err(SessionEnd::Renewed);
                }
            }
        }
        Ok(())
    }

    /// Deletes what is acknowledged; returns how far.
    async fn delete_acknowledged(
        &self,
        to_delete: &mut Option<(u64, Instant)>,
    ) -> Result<u64, SessionEnd> {
        let Some((through, _)) = to_delete.take() else {
            return Ok(0);
        };
        let deleted = self.outbox(move |r| r.delete_through(through)).await?;
        metrics::counter!("fogline_uplink_records_acked_total").increment(deleted as u64);
        Ok(through)
    }

    fn note_ack(&self, acked: u64) {
        self.state.acked_seq.fetch_max(acked, Ordering::AcqRel);
        self.state
            .last_sync_ms
            .store(crate::clock::now_ms(), Ordering::Release);
        metrics::gauge!("fogline_uplink_acked_seq").set(acked as f64);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn outbox(incarnation: u64, next_seq: u64, acked_seq: u64) -> OutboxIdentity {
        OutboxIdentity {
            incarnation,
            next_seq,
            acked_seq,
            first_unsent: None,
            epoch: 5,
            epoch_start: 1,
        }
    }

    fn w(cursor: u64, incarnation: u64) -> Welcomed {
        Welcomed {
            cursor,
            incarnation,
            epoch: 0,
        }
    }

    #[test]
    fn the_cursor_of_another_outbox_deletes_nothing() {
        // 100 synced by an old outbox, this one is new with 50 buffered.
        assert_eq!(reconcile(outbox(2, 51, 0), w(100, 1)), Resume::Foreign);
        // An older aggregator store that recorded no incarnation.
        assert_eq!(reconcile(outbox(2, 51, 0), w(100, 0)), Resume::Foreign);
        assert_eq!(reconcile(outbox(2, 51, 0), w(30, 0)), Resume::Continue);
    }

    #[test]
    fn same_outbox_continue_regressed_or_ahead() {
        assert_eq!(reconcile(outbox(7, 301, 250), w(250, 7)), Resume::Continue);
        assert_eq!(reconcile(outbox(7, 301, 250), w(280, 7)), Resume::Continue);
        assert_eq!(
            reconcile(outbox(7, 301, 250), w(200, 7)),
            Resume::Regressed { from: 201, to: 250 }
        );
        assert_eq!(reconcile(outbox(7, 301, 250), w(301, 7)), Resume::Ahead);
        assert_eq!(reconcile(outbox(7, 1, 0), w(0, 0)), Resume::Continue);
    }

    #[test]
    fn an_older_copy_whose_numbering_forked_is_told_by_its_epoch() {
        // The file restarted (epoch 6) numbering from seq 51, but the
        // aggregator applied up to 100 under epoch 5: a restored copy.
        let copy = OutboxIdentity {
            epoch: 6,
            epoch_start: 51,
            ..outbox(7, 111, 50)
        };
        let seen = Welcomed {
            cursor: 100,
            incarnation: 7,
            epoch: 5,
        };
        assert_eq!(reconcile(copy, seen), Resume::Ahead);
        // A genuine restart numbers above everything applied.
        let genuine = OutboxIdentity {
            epoch: 6,
            epoch_start: 111,
            ..outbox(7, 130, 100)
        };
        assert_eq!(reconcile(genuine, seen), Resume::Continue);
        // A copy whose restart numbered above the cursor collides with
        // nothing applied: it goes on.
        let above = OutboxIdentity {
            epoch: 4,
            epoch_start: 101,
            ..outbox(7, 130, 100)
        };
        assert_eq!(reconcile(above, seen), Resume::Continue);
        // Same start, a reconnect within it.
        let same = OutboxIdentity {
            epoch: 5,
            epoch_start: 1,
            ..outbox(7, 130, 100)
        };
        assert_eq!(reconcile(same, seen), Resume::Continue);
    }
}
