//! Ingest: MQTT in, two ways, into the pipeline.
//!
//! - [`endpoint`]: the native MQTT endpoint sensors publish to (3.1.1 and 5,
//!   QoS 0/1/2, TLS, users, persistent sessions).
//! - [`broker_client`]: a subscriber to an external broker (mosquitto and
//!   friends), on a non-overlapping cover of the pipelines' filters.
//!
//! Both hand the pipeline [`Chunk`]s through an [`IngestSink`] — a queue
//! bounded in *bytes*, so a burst of large payloads stops the sockets being
//! read instead of filling memory — and get acknowledgements back on the
//! [`AckRoute`] of the connection the packets came in on.
//!
//! **Invariants** (ARCHITECTURE.md I-1, I-2, I-12):
//! - A PUBACK or PUBREC is sent only after the pipeline's commit holding the
//!   message's outputs (and the sender's redelivery state) is durable.
//! - Acknowledgements go back on the connection the packet arrived on, in
//!   arrival order; a connection that is gone takes its pending
//!   acknowledgements with it, they are never sent on another one.
//! - Ingest knows nothing about functions, SQLite or QUIC.

pub mod broker_client;
/// The MQTT codec (crate `fogline-mqtt`, `runtime/mqtt-codec/`).
pub use fogline_mqtt as codec;
pub mod endpoint;
pub mod events;
mod intake;
pub mod redelivery;
pub mod session_store;
pub mod topic;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

pub use codec::AckKind;
use session_store::SessionUpdate;

/// Bytes counted for an item beyond its topic and payload (struct, queue slot).
pub const ITEM_OVERHEAD: usize = 64;

/// A message on its way to the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Topic name as received (the pipeline checks it is UTF-8 and within limits).
    pub topic: Vec<u8>,
    /// Payload.
    pub payload: Vec<u8>,
    /// Gateway clock at arrival.
    pub received_ms: u64,
}

/// An acknowledgement to send once the commit holding its item is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// PUBACK, PUBREC or PUBCOMP.
    pub kind: AckKind,
    /// Packet identifier.
    pub pkid: u16,
    /// MQTT 5 reason code (0: success; the pipeline sets a refusal code when
    /// it dead-letters the message and the route can carry one).
    pub reason: u8,
}

/// One unit of work for the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// A message to process (`None`: acknowledgement only, e.g. a resend).
    pub message: Option<Received>,
    /// What to send back after the commit.
    pub ack: Option<Ack>,
}

/// One connection's way back for acknowledgements.
#[derive(Debug)]
pub struct AckRoute {
    tx: mpsc::UnboundedSender<Vec<Ack>>,
    /// The connection speaks MQTT 5 to a client: refusals are reported with
    /// reason codes (≥ 0x80) instead of being acknowledged as success.
    pub reports_refusals: bool,
}

impl AckRoute {
    /// A route and the receiver its connection reads acknowledgements from.
    /// Dropping the receiver (the connection ends) drops every later ack.
    pub fn new(reports_refusals: bool) -> (Arc<Self>, mpsc::UnboundedReceiver<Vec<Ack>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Self {
                tx,
                reports_refusals,
            }),
            rx,
        )
    }

    /// Hands acknowledgements to the connection. Returns false if it is gone
    /// (they are dropped: the sender resends on its next connection).
    pub fn send(&self, acks: Vec<Ack>) -> bool {
        acks.is_empty() || self.tx.send(acks).is_ok()
    }
}

/// Items from one connection, with the session changes they caused.
#[derive(Debug, Default)]
pub struct Chunk {
    /// In arrival order.
    pub items: Vec<Item>,
    /// Where their acknowledgements go.
    pub route: Option<Arc<AckRoute>>,
    /// Durable session changes, committed with the items.
    pub session: Option<SessionUpdate>,
    /// Durable local subscribers' positions (crate::local::durable).
    pub local: Vec<crate::outbox::SubscriberWrite>,
    /// Payloads above this are refused and dead-lettered.
    pub max_payload: usize,
    /// How long a small batch holding this chunk may wait for more before
    /// its commit (`None`: `outbox.commit_linger`). A broker does not wait
    /// for each acknowledgement, so its chunks can wait longer.
    pub linger: Option<std::time::Duration>,
    bytes: usize,
    permit: Option<OwnedSemaphorePermit>,
}

impl Chunk {
    /// An empty chunk for a connection.
    pub fn new(route: Option<Arc<AckRoute>>, max_payload: usize) -> Self {
        Self {
            route,
            max_payload,
            ..Self::default()
        }
    }

    /// Adds an item, counting its bytes.
    pub fn push(&mut self, item: Item) {
        if let Some(m) = &item.message {
            self.bytes += m.topic.len() + m.payload.len();
        }
        self.bytes += ITEM_OVERHEAD;
        self.items.push(item);
    }

    /// Bytes counted against the ingest budget.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
            && self.session.as_ref().is_none_or(SessionUpdate::is_empty)
            && self.local.is_empty()
    }
}

/// The pipeline stopped: nothing more can be queued.
#[derive(Debug, thiserror::Error)]
#[error("the pipeline has stopped")]
pub struct SinkClosed;

/// Ingest's side of the queue into the pipeline, bounded in bytes.
#[derive(Clone, Debug)]
pub struct IngestSink {
    tx: mpsc::UnboundedSender<Chunk>,
    budget: Arc<Semaphore>,
    capacity: usize,
}

/// Reads how full the ingest queue is.
#[derive(Clone, Debug)]
pub struct SinkMeter {
    budget: Arc<Semaphore>,
    capacity: usize,
}

impl SinkMeter {
    /// Bytes queued and not yet committed.
    pub fn pending_bytes(&self) -> usize {
        self.capacity
            .saturating_sub(self.budget.available_permits())
    }

    /// The budget.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// The pipeline's side of the queue.
pub type ChunkReceiver = mpsc::UnboundedReceiver<Chunk>;

impl IngestSink {
    /// A queue holding at most `max_bytes` of items.
    pub fn new(max_bytes: usize) -> (Self, ChunkReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let capacity = max_bytes.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        (
            Self {
                tx,
                budget: Arc::new(Semaphore::new(capacity)),
                capacity,
            },
            rx,
        )
    }

    /// Queues a chunk, first waiting until its bytes fit in the budget (a
    /// chunk larger than the whole budget waits for all of it).
    ///
    /// # Cancel safety
    /// Cancelling while waiting drops the chunk unqueued: nothing of it was
    /// acknowledged, so its sender resends it.
    pub async fn send(&self, mut chunk: Chunk) -> Result<(), SinkClosed> {
        if chunk.is_empty() {
            return Ok(());
        }
        let n = chunk.bytes.min(self.capacity) as u32;
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| SinkClosed)?;
        chunk.permit = Some(permit);
        self.tx.send(chunk).map_err(|_| SinkClosed)
    }

    /// Bytes queued and not yet committed.
    pub fn pending_bytes(&self) -> usize {
        self.meter().pending_bytes()
    }

    /// Takes `n` bytes of the budget for bytes received but not yet queued
    /// (a packet still arriving), if they are free now. Never waits: who
    /// cannot wait (a connection before its CONNECT) is refused instead.
    pub fn try_reserve(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = n.min(self.capacity) as u32;
        self.budget.clone().try_acquire_many_owned(n).ok()
    }

    /// Waits for `n` bytes of the budget for bytes received but not yet
    /// queued. The caller holds nothing else of the budget while it waits
    /// (it releases the permit before queueing the decoded chunk), so
    /// waiters cannot block each other.
    ///
    /// # Cancel safety
    /// Cancelling gives up the place in the queue and takes nothing.
    pub async fn reserve(&self, n: usize) -> Result<OwnedSemaphorePermit, SinkClosed> {
        let n = n.min(self.capacity) as u32;
        self.budget
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| SinkClosed)
    }

    /// A handle that reads the queue's fill without keeping it open.
    pub fn meter(&self) -> SinkMeter {
        SinkMeter {
            budget: self.budget.clone(),
            capacity: self.capacity,
        }
    }

    /// Whether the pipeline still takes chunks.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Live state of both ways in, for `/status` and metrics.
#[derive(Debug, Default)]
pub struct IngestState {
    /// Connected to the external broker.
    pub broker_connected: AtomicBool,
    /// Broker connections made so far.
    pub broker_connections: AtomicU64,
    /// Subscriptions the broker refused: (filter, reason code).
    pub refused_subscriptions: Mutex<Vec<(String, u8)>>,
    /// Clients connected to the native endpoint.
    pub clients: AtomicU64,
    /// Sessions the endpoint keeps (connected or persistent).
    pub sessions: AtomicU64,
}

impl IngestState {
    /// Connected to the external broker.
    pub fn broker_connected(&self) -> bool {
        self.broker_connected.load(Ordering::Acquire)
    }
}
