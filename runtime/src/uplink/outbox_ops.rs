//! What the uplink asks of the outbox: read batches, delete what was
//! acknowledged, and carry out the session's resume decision — each on a
//! blocking thread, since SQLite calls block.

use std::sync::{Arc, Mutex};

use fogline_protocol::batch::{encode_batch, DEFAULT_ZSTD_LEVEL};
use fogline_protocol::session::resume::Resume;
use fogline_protocol::session::OutboxInfo;
use fogline_protocol::BatchFrame;
use tracing::{error, info, warn};

use crate::outbox::{OutboxError, OutboxIdentity, OutboxReader};

/// An outbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The outbox refused.
    #[error("{0}")]
    Outbox(#[from] OutboxError),
    /// Records could not be encoded into a batch.
    #[error("encoding a batch: {0}")]
    Encode(#[from] fogline_protocol::batch::BatchError),
    /// The blocking task died.
    #[error("outbox task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The outbox's reading side, shared between the uplink's tasks.
#[derive(Clone)]
pub struct Outbox(Arc<Mutex<OutboxReader>>);

impl Outbox {
    /// Wraps `reader`.
    pub fn new(reader: OutboxReader) -> Self {
        Self(Arc::new(Mutex::new(reader)))
    }

    /// Runs `f` on a blocking thread with the reader.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&OutboxReader) -> Result<T, OpError> + Send + 'static,
    ) -> Result<T, OpError> {
        let reader = self.0.clone();
        tokio::task::spawn_blocking(move || match reader.lock() {
            Ok(r) => f(&r),
            Err(poisoned) => f(&poisoned.into_inner()),
        })
        .await?
    }

    /// What `Hello` announces.
    pub async fn identity(&self) -> Result<OutboxIdentity, OpError> {
        self.run(|r| Ok(r.identity()?)).await
    }

    /// Whether records go out of seq order (drain priorities, live data
    /// first: I-35).
    pub fn out_of_order(&self) -> bool {
        match self.0.lock() {
            Ok(r) => r.out_of_order(),
            Err(poisoned) => poisoned.into_inner().out_of_order(),
        }
    }

    /// The next records, encoded as one batch (`None`: nothing unsent):
    /// those after `after` in seq order, or what the drain plan picks.
    pub async fn read_batch(
        &self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Option<BatchFrame>, OpError> {
        self.run(move |r| {
            if r.out_of_order() {
                let Some((records, floor)) = r.read_planned(max_records, max_bytes)? else {
                    return Ok(None);
                };
                let batch = encode_batch(&records, DEFAULT_ZSTD_LEVEL)?;
                return Ok(Some(BatchFrame { floor, ..batch }));
            }
            let records = r.read_after(after, max_records, max_bytes)?;
            if records.is_empty() {
                return Ok(None);
            }
            Ok(Some(encode_batch(&records, DEFAULT_ZSTD_LEVEL)?))
        })
        .await
    }

    /// Deletes rows through `through` and the records of the session's
    /// first `batches` batches; returns how many went.
    pub async fn delete_acked(&self, through: u64, batches: u64) -> Result<usize, OpError> {
        self.run(move |r| Ok(r.delete_acked(through, batches)?))
            .await
    }

    /// Records the uplink's state for `status`.
    pub async fn note_connected(&self, connected: bool) -> Result<(), OpError> {
        self.run(move |r| Ok(r.note_connected(connected)?)).await
    }

    /// Carries out a resume decision (ARCHITECTURE.md I-8, I-9); returns
    /// the outbox's next seq afterwards.
    pub async fn resume(
        &self,
        node: &str,
        id: OutboxIdentity,
        decision: Resume,
        cursor: u64,
        top: u64,
    ) -> Result<(u64, u64), OpError> {
        let mut regressions = 0;
        match decision {
            Resume::Continue => {
                let removed = self.run(move |r| Ok(r.accept_cursor(cursor)?)).await?;
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
                metrics::counter!(super::events::CURSOR_REGRESSIONS_TOTAL).increment(1);
                regressions = 1;
                error!(node, cursor, acked = to, lost = to - from + 1, "{detail}");
                self.run(move |r| Ok(r.raise_alarm("cursor_behind", &detail)?))
                    .await?;
                let removed = self.run(move |r| Ok(r.accept_cursor(cursor)?)).await?;
                info!(
                    node,
                    cursor, removed, "Uplink connected; resuming after the aggregator's cursor."
                );
            }
            Resume::Foreign | Resume::Ahead => {
                let ahead = decision == Resume::Ahead;
                let incarnation = if ahead {
                    self.run(|r| Ok(r.rotate_incarnation()?)).await?
                } else {
                    id.incarnation
                };
                // Above everything the aggregator stores for this node: what
                // it applied out of order lies above its cursor.
                let above = top.max(cursor);
                let (moved, offset) = self
                    .run(move |r| Ok(r.renumber_above(cursor, above)?))
                    .await?;
                if ahead || moved > 0 {
                    metrics::counter!(super::events::RENUMBERED_TOTAL).increment(1);
                    let detail = if ahead {
                        format!(
                            "the aggregator has seen this outbox further (cursor {cursor}; this file: next seq {}, epoch {} from seq {}): it is an older copy of the outbox (restored image or clone); new incarnation {incarnation:#x}, {moved} buffered records renumbered by +{offset} and resent, nothing deleted",
                            id.next_seq, id.epoch, id.epoch_start
                        )
                    } else {
                        format!(
                            "the aggregator's cursor {cursor} belongs to another outbox of this node (this one is {:#x}: wiped or replaced); {moved} buffered records renumbered by +{offset}, nothing deleted",
                            id.incarnation
                        )
                    };
                    warn!(node, cursor, moved, offset, "{detail}");
                    let kind = if ahead { "cursor_ahead" } else { "new_outbox" };
                    self.run(move |r| Ok(r.raise_alarm(kind, &detail)?)).await?;
                } else {
                    info!(node, cursor, incarnation = id.incarnation, "The aggregator's cursor belongs to an earlier outbox of this node; this one's records are already above it.");
                }
            }
        }
        self.run(move |r| Ok(r.start_plan(cursor)?)).await?;
        let next_seq = self.identity().await?.next_seq;
        Ok((next_seq, regressions))
    }
}

/// What `Hello` says about `id`.
pub fn outbox_info(id: OutboxIdentity) -> OutboxInfo {
    OutboxInfo {
        incarnation: id.incarnation,
        next_seq: id.next_seq,
        acked: id.acked_seq,
        epoch: id.epoch,
        epoch_start: id.epoch_start,
    }
}
