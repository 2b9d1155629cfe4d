//! Bytes buffered before a packet is whole, counted (ARCHITECTURE.md I-12,
//! I-34). They come out of the ingest budget (`ingest.max_pending_bytes`),
//! like everything received and not yet committed:
//!
//! - before CONNECT, everything a connection buffers, from its first byte,
//!   taken without waiting (who is not known yet does not queue) and
//!   together at most `broker.max_preconnect_bytes` — a quarter of the
//!   budget at most, so unknown sockets cannot starve known sensors;
//! - after CONNECT, a packet larger than one read (64 KiB) is given its
//!   whole announced size before the rest of it is read, and gives it back
//!   once decoded.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;

use super::events::{Cut, PRECONNECT_BYTES};
use crate::ingest::IngestSink;

/// The pre-CONNECT share of the ingest budget.
pub struct PreConnect {
    sink: IngestSink,
    used: AtomicUsize,
    max: usize,
}

/// What one connection holds of the pre-CONNECT share; given back on drop.
pub struct Charge {
    pool: Arc<PreConnect>,
    bytes: usize,
    permit: Option<OwnedSemaphorePermit>,
}

impl PreConnect {
    /// At most `max` bytes, out of `sink`'s budget.
    pub fn new(sink: IngestSink, max: usize) -> Arc<Self> {
        Arc::new(Self {
            sink,
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// Bytes held now, all connections together.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// A connection's empty charge.
    pub fn charge(self: &Arc<Self>) -> Charge {
        Charge {
            pool: self.clone(),
            bytes: 0,
            permit: None,
        }
    }

    fn publish(&self) {
        metrics::gauge!(PRECONNECT_BYTES).set(self.used() as f64);
    }
}

impl Charge {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds at least `to` bytes, or refuses ([`Cut::Budget`]) without
    /// waiting when the pre-CONNECT share or the ingest budget has no room.
    pub fn grow_to(&mut self, to: usize) -> Result<(), Cut> {
        let Some(more) = to.checked_sub(self.bytes).filter(|m| *m > 0) else {
            return Ok(());
        };
        let pool = &self.pool;
        pool.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(more).filter(|n| *n <= pool.max)
            })
            .map_err(|_| Cut::Budget)?;
        let Some(permit) = pool.sink.try_reserve(more) else {
            pool.used.fetch_sub(more, Ordering::AcqRel);
            return Err(Cut::Budget);
        };
        match &mut self.permit {
            Some(p) => p.merge(permit),
            None => self.permit = Some(permit),
        }
        self.bytes = to;
        pool.publish();
        Ok(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.pool.used.fetch_sub(self.bytes, Ordering::AcqRel);
            self.pool.publish();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// I-34 / I-12: pre-CONNECT bytes come out of the ingest budget, within
    /// their share, and go back when the connection goes.
    #[test]
    fn preconnect_bytes_are_bounded_and_returned() {
        let (sink, _rx) = IngestSink::new(1 << 20);
        let pool = PreConnect::new(sink.clone(), 100_000);
        let mut a = pool.charge();
        let mut b = pool.charge();
        a.grow_to(60_000).unwrap();
        assert_eq!(sink.pending_bytes(), 60_000, "counted in the ingest budget");
        assert_eq!(b.grow_to(50_000), Err(Cut::Budget), "over the share");
        b.grow_to(40_000).unwrap();
        assert_eq!(pool.used(), 100_000);
        drop(a);
        assert_eq!(pool.used(), 40_000);
        assert_eq!(sink.pending_bytes(), 40_000);
        b.grow_to(90_000).unwrap();
        drop(b);
        assert_eq!((pool.used(), sink.pending_bytes()), (0, 0));
    }

    /// The share never waits for the ingest budget: when queued data holds
    /// it, a connection before CONNECT is refused at once.
    #[test]
    fn a_full_ingest_budget_refuses_at_once() {
        let (sink, _rx) = IngestSink::new(64 * 1024);
        let held = sink.try_reserve(60 * 1024).unwrap();
        let pool = PreConnect::new(sink.clone(), 16 * 1024);
        let mut a = pool.charge();
        assert_eq!(a.grow_to(8 * 1024), Err(Cut::Budget));
        assert_eq!(pool.used(), 0, "a refusal takes nothing");
        drop(held);
        a.grow_to(8 * 1024).unwrap();
    }
}
