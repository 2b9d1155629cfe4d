//! Who may hold a connection, decided at accept — before TLS, before a byte
//! of CONNECT (ARCHITECTURE.md I-34): one of `broker.max_connections` slots,
//! at most `max_connections_per_ip` per address, and new connections per
//! address paced by a token bucket (`connect_rate_per_ip`, burst
//! `connect_burst_per_ip`).
//!
//! The per-address table is bounded: an address is kept while it has a
//! connection, and otherwise only while its bucket is not full again; past
//! [`TRACKED_IDLE`] idle addresses the oldest knowledge is dropped (an
//! address forgotten starts with a full bucket, which is what it would have
//! after a quiet second or so anyway). Time is passed in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::events::Cut;

/// Addresses without a connection remembered for their rate, at most.
pub const TRACKED_IDLE: usize = 10_000;

/// What is known about one address.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Connections it holds.
    live: usize,
    /// Connections it may still open now.
    tokens: f64,
    /// When `tokens` was computed.
    at: Instant,
}

/// Limits per address.
#[derive(Debug, Clone, Copy)]
pub struct PerIp {
    /// Simultaneous connections.
    pub max_connections: usize,
    /// New connections per second.
    pub rate: u32,
    /// New connections at once.
    pub burst: u32,
}

/// The per-address table: a plain state machine.
#[derive(Debug)]
pub struct IpTable {
    limits: PerIp,
    entries: HashMap<IpAddr, Entry>,
    max_entries: usize,
}

impl IpTable {
    /// An empty table for at most `max_live` connected addresses.
    pub fn new(limits: PerIp, max_live: usize) -> Self {
        Self {
            limits,
            entries: HashMap::new(),
            max_entries: max_live.saturating_add(TRACKED_IDLE),
        }
    }

    /// Addresses tracked.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Nothing tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A connection from `ip` at `now`: counted as live, or refused.
    pub fn open(&mut self, ip: IpAddr, now: Instant) -> Result<(), Cut> {
        if !self.entries.contains_key(&ip) && self.entries.len() >= self.max_entries {
            self.prune(now);
        }
        let burst = f64::from(self.limits.burst.max(1));
        let rate = f64::from(self.limits.rate.max(1));
        let e = self.entries.entry(ip).or_insert(Entry {
            live: 0,
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(e.at).as_secs_f64();
        e.tokens = (e.tokens + elapsed * rate).min(burst);
        e.at = now;
        if e.tokens < 1.0 {
            return Err(Cut::Rate);
        }
        // An attempt costs a token even when the address is at its limit:
        // a host hammering at its limit is paced too.
        e.tokens -= 1.0;
        if e.live >= self.limits.max_connections {
            return Err(Cut::PerIp);
        }
        e.live += 1;
        Ok(())
    }

    /// A connection from `ip` ended.
    pub fn close(&mut self, ip: IpAddr) {
        if let Some(e) = self.entries.get_mut(&ip) {
            e.live = e.live.saturating_sub(1);
        }
    }

    /// Makes room: first forgets idle addresses whose bucket is full again
    /// (nothing is lost), then, if that freed less than a quarter, every
    /// idle address. Amortised O(1) per connection.
    fn prune(&mut self, now: Instant) {
        let burst = f64::from(self.limits.burst.max(1));
        let rate = f64::from(self.limits.rate.max(1));
        self.entries.retain(|_, e| {
            e.live > 0
                || e.tokens + now.saturating_duration_since(e.at).as_secs_f64() * rate < burst
        });
        if self.entries.len() > self.max_entries - self.max_entries / 4 {
            self.entries.retain(|_, e| e.live > 0);
        }
    }
}

/// Slots and the per-address table, shared by the listeners.
pub struct Admission {
    slots: Arc<Semaphore>,
    max_connections: usize,
    table: Mutex<IpTable>,
}

/// A connection admitted: its slot and its place in its address's count,
/// both given back when it is dropped.
pub struct Admitted {
    _slot: OwnedSemaphorePermit,
    ip: IpAddr,
    admission: Arc<Admission>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.admission.lock().close(self.ip);
    }
}

impl Admission {
    /// `max_connections` slots, and the per-address limits.
    pub fn new(max_connections: usize, per_ip: PerIp) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            table: Mutex::new(IpTable::new(per_ip, max_connections)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, IpTable> {
        // The table holds counters only: a panic elsewhere cannot leave it
        // in a state worse than slightly wrong counts.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot limit.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Admits a connection from `ip` accepted at `now`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Admitted, Cut> {
        self.lock().open(ip, now)?;
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => Ok(Admitted {
                _slot: slot,
                ip,
                admission: self.clone(),
            }),
            Err(_) => {
                self.lock().close(ip);
                Err(Cut::MaxConnections)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0A00_0000 + n))
    }

    /// I-34: per-address connection limit, counted from accept.
    #[test]
    fn an_address_holds_at_most_its_connections() {
        let mut t = IpTable::new(
            PerIp {
                max_connections: 2,
                rate: 100,
                burst: 100,
            },
            10,
        );
        let now = Instant::now();
        assert!(t.open(ip(1), now).is_ok());
        assert!(t.open(ip(1), now).is_ok());
        assert_eq!(t.open(ip(1), now), Err(Cut::PerIp));
        assert!(
            t.open(ip(2), now).is_ok(),
            "another address is not affected"
        );
        t.close(ip(1));
        assert!(t.open(ip(1), now).is_ok());
    }

    /// I-34: per-address CONNECT rate, a token bucket.
    #[test]
    fn an_address_is_paced_after_its_burst() {
        let mut t = IpTable::new(
            PerIp {
                max_connections: 1000,
                rate: 10,
                burst: 5,
            },
            10,
        );
        let t0 = Instant::now();
        for _ in 0..5 {
            t.open(ip(1), t0).unwrap();
        }
        assert_eq!(t.open(ip(1), t0), Err(Cut::Rate));
        // 10 per second: one more after 100 ms.
        let t1 = t0 + Duration::from_millis(100);
        assert!(t.open(ip(1), t1).is_ok());
        assert_eq!(t.open(ip(1), t1), Err(Cut::Rate));
        assert!(t.open(ip(2), t1).is_ok());
    }

    /// I-34: the table is bounded whatever the number of addresses.
    #[test]
    fn the_table_stays_bounded_under_many_addresses() {
        let mut t = IpTable::new(
            PerIp {
                max_connections: 10,
                rate: 1,
                burst: 2,
            },
            100,
        );
        let now = Instant::now();
        // 100 live connections from distinct addresses are always kept.
        for n in 0..100 {
            t.open(ip(n), now).unwrap();
        }
        for n in 100..200_000 {
            let _ = t.open(ip(n), now);
            t.close(ip(n));
            assert!(t.len() <= 100 + TRACKED_IDLE);
        }
        // The live ones are still counted.
        for n in 0..100 {
            t.open(ip(n), now).unwrap();
        }
    }

    /// I-34: a slot is taken at accept and given back on drop.
    #[test]
    fn slots_are_held_from_accept() {
        let a = Arc::new(Admission::new(
            2,
            PerIp {
                max_connections: 10,
                rate: 100,
                burst: 100,
            },
        ));
        let now = Instant::now();
        let x = a.admit(ip(1), now).unwrap();
        let _y = a.admit(ip(2), now).unwrap();
        assert_eq!(a.admit(ip(3), now).err(), Some(Cut::MaxConnections));
        drop(x);
        assert!(a.admit(ip(3), now).is_ok());
    }
}
