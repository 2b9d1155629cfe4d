//! The two ends of a replication session as state machines, in the shape of
//! quinn-proto: they take events (a frame received, a store or outbox
//! result, time passed in) and hand out actions (send a frame, read the
//! outbox after N, delete through N, apply these batches, close with a
//! code). The async layer only moves bytes and calls the outbox or store.
//!
//! - [`client::ClientSession`]: the edge. Resume point (with
//!   [`resume::reconcile`]), the in-flight window, acks and deletes, liveness
//!   (ping, probe, silence), stall detection.
//! - [`server::ServerSession`]: the aggregator. Version and ordering checks,
//!   the cursor handshake, group apply, the per-node byte budget, acks after
//!   the store's answer, pongs that never wait for an apply.
//! - [`crate::dial::Dialer`]: which server and transport to try next, and when.
//!
//! **Invariant:** nothing here reads a clock, a socket or a file. Every
//! method that depends on time takes `now`; [`client::ClientSession::poll_timeout`]
//! and [`server::ServerSession::poll_timeout`] say when to call back.

pub mod client;
pub mod resume;
pub mod server;
mod window;

pub use window::{AckProgress, InFlight, Window, WindowError};

/// The edge's outbox, as its `Hello` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxInfo {
    /// Outbox incarnation (a random id made with the file).
    pub incarnation: u64,
    /// Next seq it will give out.
    pub next_seq: u64,
    /// Highest seq it was told is applied.
    pub acked: u64,
    /// This start of the outbox (a random id per daemon start).
    pub epoch: u64,
    /// The seq this epoch's numbering started from.
    pub epoch_start: u64,
}

/// What the store holds for a node when it says Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoredCursor {
    /// Highest seq applied.
    pub seq: u64,
    /// The outbox incarnation that cursor belongs to (`None`: not recorded).
    pub incarnation: Option<u64>,
    /// The outbox epoch last recorded with it (0: none).
    pub epoch: u64,
    /// The highest seq stored for the node (0: none; never below `seq`
    /// when read through [`StoredCursor::top`]).
    pub top: u64,
}

impl StoredCursor {
    /// The highest seq stored for the node: above the cursor when the node
    /// sent out of order.
    pub fn top(&self) -> u64 {
        self.top.max(self.seq)
    }
}

/// The store is behind what it acknowledged to this very outbox (restored
/// from a backup): records `from..=to` were acknowledged, then forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regression {
    /// First forgotten seq.
    pub from: u64,
    /// Last forgotten seq.
    pub to: u64,
}

/// Compares the store's cursor with the Hello of the same outbox
/// incarnation: a cursor below what that outbox was acknowledged means the
/// store lost applied records (ARCHITECTURE.md I-9). A store with no
/// incarnation for the node (deleted, or from before incarnations) is taken
/// as this outbox's, as the edge takes it ([`super::resume::reconcile`]):
/// both sides then record the same gap.
pub fn regression(stored: StoredCursor, hello: OutboxInfo) -> Option<Regression> {
    let same = stored.incarnation.is_none_or(|i| i == hello.incarnation);
    (same && stored.seq < hello.acked).then_some(Regression {
        from: stored.seq + 1,
        to: hello.acked,
    })
}
