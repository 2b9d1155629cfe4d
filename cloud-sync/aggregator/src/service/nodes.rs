//! Which connection speaks for each node, and the lock that keeps a node's
//! sessions from applying side by side.
//!
//! **Invariant:** at most one session per node applies at a time. A new
//! session takes over at its `Hello`: the node's previous connection is
//! closed (`Superseded`) and the new session waits for the previous one to
//! finish (its apply committed or abandoned) before it reads the cursor it
//! sends in `Welcome`. A connection that never says Hello (a probe the
//! node abandoned) takes nothing over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fogline_protocol::frame::ErrorCode;
use fogline_transport::conn::ConnHandle;
use fogline_transport::identity::PeerIdentity;
use serde::Serialize;
use tokio::sync::OwnedMutexGuard;

/// A live session, as `/api/v1/connections` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionInfo {
    /// Node id.
    pub node: String,
    /// `quic` or `tcp`.
    pub transport: &'static str,
    /// The node's address now (QUIC follows it when it changes).
    pub remote: String,
    /// Since when (ms since the Unix epoch).
    pub since_ms: u64,
    /// The certificate's serial (hex).
    pub serial: String,
    /// The certificate's end of validity (s since the Unix epoch).
    pub not_after: i64,
}

struct Current {
    id: usize,
    handle: ConnHandle,
    peer: PeerIdentity,
    since_ms: u64,
}

#[derive(Default)]
struct Slot {
    current: Mutex<Option<Current>>,
    apply: Arc<tokio::sync::Mutex<()>>,
    activity: Mutex<Activity>,
}

/// Minutes of applied-record counts kept per node, for the sparkline.
pub const THROUGHPUT_MINUTES: usize = 60;

/// What this aggregator saw of a node: when it last heard from it, and the
/// records it applied per minute over the last hour.
#[derive(Debug, Clone, Default)]
pub struct Activity {
    /// Last frame received (ms since the Unix epoch); 0: never.
    pub last_seen_ms: u64,
    /// (minute, records applied in it), oldest first.
    minutes: std::collections::VecDeque<(u64, u64)>,
}

impl Activity {
    fn applied(&mut self, records: u64, now_ms: u64) {
        let minute = now_ms / 60_000;
        match self.minutes.back_mut() {
            Some((m, n)) if *m == minute => *n += records,
            _ => self.minutes.push_back((minute, records)),
        }
        while self
            .minutes
            .front()
            .is_some_and(|(m, _)| *m + THROUGHPUT_MINUTES as u64 <= minute)
        {
            self.minutes.pop_front();
        }
    }

    /// Records applied per second over the last full minute.
    pub fn records_per_s(&self, now_ms: u64) -> f64 {
        let last = now_ms / 60_000 - 1;
        self.minutes
            .iter()
            .find(|(m, _)| *m == last)
            .map_or(0.0, |(_, n)| *n as f64 / 60.0)
    }

    /// `(minute start in ms, records)` for the last hour, oldest first,
    /// minutes without records included as 0.
    pub fn throughput(&self, now_ms: u64) -> Vec<(u64, u64)> {
        let now = now_ms / 60_000;
        (now + 1 - THROUGHPUT_MINUTES as u64..=now)
            .map(|m| {
                let n = self
                    .minutes
                    .iter()
                    .find(|(x, _)| *x == m)
                    .map_or(0, |e| e.1);
                (m * 60_000, n)
            })
            .collect()
    }
}

/// Every node's slot.
#[derive(Default)]
pub struct Nodes {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

/// Held by the session that speaks for a node; dropping it lets the next one in.
pub struct Turn {
    _guard: OwnedMutexGuard<()>,
    slot: Arc<Slot>,
    id: usize,
}

impl Turn {
    /// A frame came from the node.
    pub fn seen(&self, now_ms: u64) {
        if let Ok(mut a) = self.slot.activity.lock() {
            a.last_seen_ms = now_ms;
        }
    }

    /// Records of the node were applied.
    pub fn applied(&self, records: u64, now_ms: u64) {
        if let Ok(mut a) = self.slot.activity.lock() {
            a.applied(records, now_ms);
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Ok(mut c) = self.slot.current.lock() {
            if c.as_ref().is_some_and(|c| c.id == self.id) {
                *c = None;
            }
        }
    }
}

impl Nodes {
    fn slot(&self, node: &str) -> Option<Arc<Slot>> {
        self.slots
            .lock()
            .ok()
            .map(|mut m| m.entry(node.to_string()).or_default().clone())
    }

    /// Makes `handle` the node's connection: closes the previous one and
    /// waits for its session to let go. `None` if this connection was
    /// itself superseded or closed while waiting.
    ///
    /// # Cancel safety
    /// Cancel-safe: nothing is held until it returns.
    pub async fn take_over(
        &self,
        peer: &PeerIdentity,
        handle: &ConnHandle,
        now_ms: u64,
    ) -> Option<Turn> {
        let slot = self.slot(&peer.node_id)?;
        let id = handle.stable_id();
        if let Ok(mut current) = slot.current.lock() {
            let new = Current {
                id,
                handle: handle.clone(),
                peer: peer.clone(),
                since_ms: now_ms,
            };
            if let Some(old) = current.replace(new) {
                if old.id != id {
                    tracing::info!(node = %peer.node_id, old = %old.handle.remote_address(), new = %handle.remote_address(), "Node reconnected; closing its previous connection.");
                    old.handle.close(
                        ErrorCode::Superseded,
                        "a newer connection of this node took over",
                    );
                }
            }
        }
        let guard = tokio::select! {
            g = slot.apply.clone().lock_owned() => g,
            _ = handle.close_requested() => return None,
        };
        Some(Turn {
            _guard: guard,
            slot,
            id,
        })
    }

    /// Whether `node` is connected here now, and what this aggregator saw
    /// of it (`None`: never connected here).
    pub fn activity(&self, node: &str) -> Option<(bool, Activity)> {
        let slot = self.slots.lock().ok()?.get(node)?.clone();
        let connected = slot.current.lock().map(|c| c.is_some()).unwrap_or(false);
        let activity = slot.activity.lock().ok()?.clone();
        Some((connected, activity))
    }

    /// Closes the live connections `refuse` picks (revoked or expired
    /// certificates), with `code` and the reason it gives.
    pub fn close_where(&self, code: ErrorCode, refuse: impl Fn(&PeerIdentity) -> Option<String>) {
        let Ok(slots) = self.slots.lock() else {
            return;
        };
        for slot in slots.values() {
            if let Ok(current) = slot.current.lock() {
                if let Some(c) = current.as_ref() {
                    if let Some(reason) = refuse(&c.peer) {
                        tracing::warn!(node = %c.peer.node_id, serial = %c.peer.serial, %reason, "Closing a node's live connection.");
                        c.handle.close(code, &reason);
                    }
                }
            }
        }
    }

    /// The live sessions.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let Ok(slots) = self.slots.lock() else {
            return Vec::new();
        };
        let mut out: Vec<ConnectionInfo> = slots
            .values()
            .filter_map(|slot| {
                let current = slot.current.lock().ok()?;
                let c = current.as_ref()?;
                Some(ConnectionInfo {
                    node: c.peer.node_id.clone(),
                    transport: c.handle.transport().name(),
                    remote: c.handle.remote_address().to_string(),
                    since_ms: c.since_ms,
                    serial: c.peer.serial.clone(),
                    not_after: c.peer.not_after,
                })
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }
}
