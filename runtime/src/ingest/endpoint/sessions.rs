//! The endpoint's sessions by client id: which connection holds each one,
//! takeover of a client id by its own identity only, persistence across
//! disconnects and restarts, expiry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use super::auth::Refusal;
use crate::ingest::redelivery::SenderState;
use crate::ingest::session_store::{RestoredSession, SessionMeta};

/// How long a new connection waits for the previous connection of the same
/// client id to hand its session over.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// Key prefix of endpoint sessions in the outbox.
pub const KEY_PREFIX: &str = "c:";

struct Slot {
    owner: Option<String>,
    /// `None` while a connection holds the session.
    state: Option<SenderState>,
    /// Set while held: notified to make the holder let go.
    kick: Option<Arc<Notify>>,
    meta: SessionMeta,
    /// Rows for it exist in the outbox.
    persisted: bool,
    /// Bumped by each new connection (a delayed will checks it).
    generation: u64,
}

/// A session held by a connection.
#[derive(Debug)]
pub struct Lease {
    /// Outbox key.
    pub key: Arc<str>,
    /// Client id.
    pub client_id: String,
    /// Redelivery state, owned by the connection until [`Sessions::release`].
    pub state: SenderState,
    /// CONNACK's Session Present.
    pub session_present: bool,
    /// Stored rows of an earlier session must be forgotten (clean start).
    pub discard_stored: bool,
    /// Notified when another connection takes the client id over.
    pub kick: Arc<Notify>,
    /// This connection's generation of the session.
    pub generation: u64,
    /// Metadata as of this connection.
    pub meta: SessionMeta,
}

/// What a new connection asks for.
#[derive(Debug, Clone)]
pub struct OpenRequest {
    /// Client id.
    pub client_id: String,
    /// Authenticated identity (`None`: anonymous).
    pub owner: Option<String>,
    /// Clean start / clean session.
    pub clean_start: bool,
    /// Session expiry granted, seconds (0: ends with the connection).
    pub expiry_secs: u32,
    /// Protocol level.
    pub protocol: u8,
}

/// Every session the endpoint keeps.
pub struct Sessions {
    slots: Mutex<HashMap<String, Slot>>,
    released: Notify,
    max_sessions: usize,
    retain: usize,
}

impl Sessions {
    /// An empty registry. `retain`: QoS 1 marks kept per session.
    pub fn new(max_sessions: usize, retain: usize) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            released: Notify::new(),
            max_sessions,
            retain,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        // A panic while holding the lock cannot leave a slot half-updated in
        // a way that matters more than losing the daemon: keep serving.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Restores sessions read from the outbox (keys `c:<client id>`).
    pub fn restore(&self, sessions: Vec<RestoredSession>, now_ms: u64) {
        let mut slots = self.lock();
        for s in sessions {
            let Some(client_id) = s.key.strip_prefix(KEY_PREFIX) else {
                continue;
            };
            let mut meta = s.meta.unwrap_or_default();
            // Connected when the daemon stopped: its expiry counts from now.
            meta.disconnected_ms = Some(meta.disconnected_ms.unwrap_or(now_ms));
            slots.insert(
                client_id.to_string(),
                Slot {
                    owner: meta.owner.clone(),
                    state: Some(SenderState::restore(
                        s.marks,
                        s.received,
                        s.shape,
                        self.retain,
                    )),
                    kick: None,
                    meta,
                    persisted: true,
                    generation: 0,
                },
            );
        }
    }

    /// Sessions kept (connected or not).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// No sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the session of `req.client_id` for a new connection: waits for a
    /// connection still holding it to let go (it is told to), refuses
    /// another identity's client id.
    pub async fn open(&self, req: &OpenRequest) -> Result<Lease, Refusal> {
        let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut slots = self.lock();
                let full = slots.len() >= self.max_sessions;
                match slots.get_mut(&req.client_id) {
                    Some(slot) if slot.owner != req.owner => {
                        return Err(Refusal {
                            code: 0x87,
                            reason: format!(
                                "client id `{}` belongs to {}, not to {}",
                                req.client_id,
                                slot.owner.as_deref().unwrap_or("an anonymous client"),
                                req.owner.as_deref().unwrap_or("an anonymous client")
                            ),
                        });
                    }
                    Some(slot) if slot.state.is_none() => {
                        if let Some(k) = &slot.kick {
                            k.notify_one();
                        }
                    }
                    Some(slot) => {
                        let previous = slot
                            .state
                            .take()
                            .unwrap_or_else(|| SenderState::new(false, self.retain));
                        let persistent = req.expiry_secs > 0;
                        let (mut state, present, discard) = if req.clean_start {
                            (
                                SenderState::new(persistent, self.retain),
                                false,
                                slot.persisted,
                            )
                        } else {
                            (previous, true, false)
                        };
                        if persistent {
                            state.make_persistent();
                        }
                        let kick = Arc::new(Notify::new());
                        slot.kick = Some(kick.clone());
                        slot.generation += 1;
                        slot.meta = SessionMeta {
                            owner: req.owner.clone(),
                            expiry_secs: req.expiry_secs,
                            protocol: req.protocol,
                            disconnected_ms: None,
                            subscriptions: Vec::new(),
                        };
                        if discard {
                            slot.persisted = false;
                        }
                        return Ok(Lease {
                            key: Arc::from(format!("{KEY_PREFIX}{}", req.client_id)),
                            client_id: req.client_id.clone(),
                            state,
                            session_present: present,
                            discard_stored: discard,
                            kick,
                            generation: slot.generation,
                            meta: slot.meta.clone(),
                        });
                    }
                    None if full => {
                        return Err(Refusal {
                            code: 0x97,
                            reason: format!(
                                "{} sessions already kept (broker.max_sessions)",
                                self.max_sessions
                            ),
                        });
                    }
                    None => {
                        let kick = Arc::new(Notify::new());
                        let meta = SessionMeta {
                            owner: req.owner.clone(),
                            expiry_secs: req.expiry_secs,
                            protocol: req.protocol,
                            disconnected_ms: None,
                            subscriptions: Vec::new(),
                        };
                        slots.insert(
                            req.client_id.clone(),
                            Slot {
                                owner: req.owner.clone(),
                                state: None,
                                kick: Some(kick.clone()),
                                meta: meta.clone(),
                                persisted: false,
                                generation: 1,
                            },
                        );
                        return Ok(Lease {
                            key: Arc::from(format!("{KEY_PREFIX}{}", req.client_id)),
                            client_id: req.client_id.clone(),
                            state: SenderState::new(req.expiry_secs > 0, self.retain),
                            session_present: false,
                            discard_stored: false,
                            kick,
                            generation: 1,
                            meta,
                        });
                    }
                }
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(Refusal {
                    code: 0x89,
                    reason: format!(
                        "the previous connection of client id `{}` did not end within {TAKEOVER_WAIT:?}",
                        req.client_id
                    ),
                });
            }
        }
    }

    /// The connection holding `lease` ended. A session with a non-zero
    /// expiry is kept (and was persisted); others are forgotten. Returns the
    /// metadata to persist, if any, and whether stored rows must go.
    pub fn release(
        &self,
        lease: &Lease,
        state: SenderState,
        expiry_secs: u32,
        now_ms: u64,
    ) -> (Option<SessionMeta>, bool) {
        let mut slots = self.lock();
        let mut out = (None, false);
        if let Some(slot) = slots.get_mut(&lease.client_id) {
            if slot.generation == lease.generation {
                if expiry_secs > 0 {
                    slot.meta.expiry_secs = expiry_secs;
                    slot.meta.disconnected_ms = Some(now_ms);
                    slot.state = Some(state);
                    slot.kick = None;
                    slot.persisted = true;
                    out = (Some(slot.meta.clone()), false);
                } else {
                    let persisted = slot.persisted;
                    slots.remove(&lease.client_id);
                    out = (None, persisted);
                }
            }
        }
        drop(slots);
        self.released.notify_waiters();
        out
    }

    /// The generation of a client id's session, if it is kept.
    pub fn generation(&self, client_id: &str) -> Option<u64> {
        self.lock().get(client_id).map(|s| s.generation)
    }

    /// Forgets sessions whose client has been away longer than their
    /// expiry. Returns their outbox keys (to delete).
    pub fn expire(&self, now_ms: u64) -> Vec<Arc<str>> {
        let mut slots = self.lock();
        let expired: Vec<String> = slots
            .iter()
            .filter(|(_, s)| {
                s.state.is_some()
                    && s.meta.disconnected_ms.is_some_and(|d| {
                        s.meta.expiry_secs != u32::MAX
                            && now_ms.saturating_sub(d) >= u64::from(s.meta.expiry_secs) * 1000
                    })
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut keys = Vec::new();
        for k in expired {
            if let Some(s) = slots.remove(&k) {
                if s.persisted {
                    keys.push(Arc::from(format!("{KEY_PREFIX}{k}")));
                }
            }
        }
        keys
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn req(id: &str, owner: Option<&str>, clean: bool, expiry: u32) -> OpenRequest {
        OpenRequest {
            client_id: id.into(),
            owner: owner.map(str::to_string),
            clean_start: clean,
            expiry_secs: expiry,
            protocol: 5,
        }
    }

    #[tokio::test]
    async fn takeover_waits_for_the_old_connection_and_keeps_the_state() {
        let s = Arc::new(Sessions::new(10, 100));
        let mut a = s.open(&req("c1", None, false, 60)).await.unwrap();
        assert!(!a.session_present);
        a.state.start_connection(None);
        // Distinct content: resends become recognisable.
        for p in 1..=20u16 {
            a.state.on_qos1(p, false, 1000 + u64::from(p));
        }
        a.state.on_qos1(21, false, 42);
        let kick = a.kick.clone();
        let s2 = s.clone();
        let old = tokio::spawn(async move {
            kick.notified().await;
            let state = std::mem::replace(&mut a.state, SenderState::new(false, 1));
            s2.release(&a, state, 60, 1000)
        });
        let mut b = s.open(&req("c1", None, false, 60)).await.unwrap();
        let (meta, discard) = old.await.unwrap();
        assert_eq!(meta.unwrap().disconnected_ms, Some(1000));
        assert!(!discard);
        assert!(b.session_present);
        b.state.start_connection(None);
        assert_eq!(
            b.state.on_qos1(21, true, 42),
            crate::ingest::redelivery::Verdict::Resend
        );
    }

    #[tokio::test]
    async fn another_identity_cannot_take_a_client_id() {
        let s = Sessions::new(10, 100);
        let _a = s.open(&req("c1", Some("user:a"), false, 60)).await.unwrap();
        let e = s
            .open(&req("c1", Some("user:b"), false, 60))
            .await
            .unwrap_err();
        assert_eq!(e.code, 0x87);
        let e = s.open(&req("c1", None, false, 60)).await.unwrap_err();
        assert_eq!(e.code, 0x87);
    }

    #[tokio::test]
    async fn limits_expiry_and_clean_start() {
        let s = Sessions::new(1, 100);
        let a = s.open(&req("c1", None, false, 10)).await.unwrap();
        assert_eq!(
            s.open(&req("c2", None, true, 0)).await.unwrap_err().code,
            0x97
        );
        let st = SenderState::new(true, 100);
        s.release(&a, st, 10, 1_000);
        assert!(s.expire(5_000).is_empty());
        let b = s.open(&req("c1", None, true, 10)).await.unwrap();
        assert!(!b.session_present);
        assert!(b.discard_stored, "clean start forgets the stored session");
        s.release(&b, SenderState::new(true, 100), 10, 1_000);
        assert_eq!(s.expire(11_000).len(), 1);
        assert!(s.is_empty());
    }
}
