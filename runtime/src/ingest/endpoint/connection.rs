//! One client connection of the native endpoint: CONNECT, authentication,
//! session, then PUBLISHes into the pipeline and acknowledgements back once
//! durable.
//!
//! Everything one read brings in becomes one [`Chunk`] (with the session
//! changes it caused), so a pipelining client costs one queue operation per
//! read, not per message; acknowledgements from one commit are written with
//! one system call.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::admission::Admitted;
use super::budget::Charge;
use super::events::{self, Cut, CONNECTIONS_REFUSED};
use super::sessions::{Lease, OpenRequest};
use super::{PreConnectGauge, Shared};
use crate::ingest::codec::{self, ConnAckOut, ConnectIn, Framing, Inbound, Version};
use crate::ingest::intake::Intake;
use crate::ingest::session_store::SessionUpdate;
use crate::ingest::{AckRoute, Chunk};

/// Most items one chunk carries (one read of a fast client is ~600).
const CHUNK_ITEMS: usize = 4096;
/// Read granularity after CONNECT; a packet larger than this is given its
/// size from the ingest budget before the rest of it is read.
const READ_BYTES: usize = 64 * 1024;
/// What is read before CONNECT until its fixed header is known (a typical
/// CONNECT is whole in it).
const HEADER_READ: usize = 256;
/// Longest client id accepted.
const MAX_CLIENT_ID: usize = 256;
/// What subscribers are told when no topic is local.
const SUBSCRIBE_REFUSED: &str = "this endpoint serves no local topics ([[broker.local_topics]]); to subscribe to sensors, use an MQTT broker and let Fogline subscribe to it too";

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT; `will` asks for the will anyway (v5 0x04).
    Disconnect { will: bool, expiry: Option<u32> },
    /// The socket closed or failed without DISCONNECT.
    Lost(String),
    /// We close it, telling a v5 client `code`.
    Close { code: u8, reason: String },
}

impl End {
    fn close(code: u8, reason: impl Into<String>) -> Self {
        End::Close {
            code,
            reason: reason.into(),
        }
    }
}

struct Conn<R, W> {
    rd: R,
    wr: W,
    rbuf: BytesMut,
    wbuf: BytesMut,
    peer: SocketAddr,
    shared: Arc<Shared>,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Conn<R, W> {
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.wbuf.is_empty() {
            let out = self.wbuf.split();
            self.wr.write_all(&out).await?;
            self.wr.flush().await?;
        }
        Ok(())
    }

    /// Reads until a whole CONNECT is buffered. Every byte buffered is
    /// charged to the pre-CONNECT share first (I-34), and nothing is read
    /// beyond what the CONNECT's header announces (or [`HEADER_READ`]
    /// before it is known).
    async fn read_connect(&mut self, charge: &mut Charge) -> Result<Box<ConnectIn>, End> {
        let max = self
            .shared
            .limits
            .max_connect_bytes
            .min(self.shared.limits.max_packet);
        loop {
            // The first byte already tells: anything but CONNECT (HTTP,
            // garbage, a port scan) is dropped without waiting for more.
            if let Some(&first) = self.rbuf.first() {
                if first != 0x10 {
                    return Err(End::Lost(format!(
                        "first packet is not CONNECT (first byte {first:#04x})"
                    )));
                }
            }
            let want = match codec::framing(&self.rbuf, max) {
                Ok(Framing::NeedHeader) => HEADER_READ,
                Ok(Framing::Packet { len }) => len,
                Err(codec::CodecError::TooLarge { size, max }) => {
                    // Answer in 3.1.1, which every client understands. Not
                    // logged above debug: a flood of these must not flood
                    // the log too (the metric counts them).
                    metrics::counter!(CONNECTIONS_REFUSED, "reason" => codec::reason_name(0x95))
                        .increment(1);
                    codec::encode_connack(
                        &mut self.wbuf,
                        Version::V311,
                        &ConnAckOut {
                            code: 0x95,
                            ..ConnAckOut::default()
                        },
                    );
                    let _ = self.flush().await;
                    return Err(End::Lost(format!(
                        "CONNECT of {size} bytes, the limit before authentication is {max} (broker.max_connect_bytes)"
                    )));
                }
                Err(e) => return Err(End::Lost(format!("bad CONNECT: {e}"))),
            };
            match codec::decode(&mut self.rbuf, None, max) {
                Ok(Some(Inbound::Connect(c))) => return Ok(c),
                Ok(Some(other)) => {
                    return Err(End::Lost(format!(
                        "first packet is not CONNECT ({other:?})"
                    )))
                }
                Ok(None) => {}
                Err(codec::CodecError::UnsupportedLevel(level)) => {
                    // Answer in 3.1.1, which every client understands.
                    codec::encode_connack(
                        &mut self.wbuf,
                        Version::V311,
                        &ConnAckOut {
                            code: 0x84,
                            ..ConnAckOut::default()
                        },
                    );
                    let _ = self.flush().await;
                    return Err(End::Lost(format!(
                        "unsupported MQTT protocol level {level} (3.1.1 and 5 are)"
                    )));
                }
                Err(e) => return Err(End::Lost(format!("bad CONNECT: {e}"))),
            }
            if let Err(cut) = charge.grow_to(want) {
                cut.count();
                return Err(End::Lost(format!(
                    "no room for {want} bytes before CONNECT (broker.max_preconnect_bytes, ingest.max_pending_bytes)"
                )));
            }
            let room = want.saturating_sub(self.rbuf.len()).max(1);
            self.rbuf.reserve(room);
            match (&mut self.rd)
                .take(room as u64)
                .read_buf(&mut self.rbuf)
                .await
            {
                Ok(0) => return Err(End::Lost("closed before CONNECT".into())),
                Ok(_) => {}
                Err(e) => return Err(End::Lost(format!("read failed before CONNECT: {e}"))),
            }
        }
    }

    async fn refuse(&mut self, version: Version, code: u8, why: &str) {
        metrics::counter!(CONNECTIONS_REFUSED, "reason" => codec::reason_name(code)).increment(1);
        self.answer_refusal(version, code, why).await;
    }

    /// Sends the refusing CONNACK; the caller counted it.
    async fn answer_refusal(&mut self, version: Version, code: u8, why: &str) {
        warn!(peer = %self.peer, code = format!("{code:#04x}"), reason = %why, "Refused an MQTT connection.");
        codec::encode_connack(
            &mut self.wbuf,
            version,
            &ConnAckOut {
                code,
                ..ConnAckOut::default()
            },
        );
        let _ = self.flush().await;
    }
}

/// Serves one admitted connection until it ends. `deadline`: accept +
/// `connect_timeout`, for the whole CONNECT.
pub(super) async fn serve<S>(
    io: S,
    peer: SocketAddr,
    certificate_cn: Option<String>,
    shared: Arc<Shared>,
    _admitted: Admitted,
    mut pre: PreConnectGauge,
    deadline: Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (rd, wr) = tokio::io::split(io);
    // Nothing is allocated for a connection before it sends something.
    let mut c = Conn {
        rd,
        wr,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        peer,
        shared: shared.clone(),
    };
    let mut charge = shared.preconnect.charge();
    let connect = match tokio::time::timeout_at(deadline, c.read_connect(&mut charge)).await {
        Ok(Ok(connect)) => connect,
        Ok(Err(End::Lost(why))) => {
            events::EndedBeforeSession { peer, reason: &why }.emit();
            return;
        }
        Ok(Err(_)) => return,
        Err(_) => {
            Cut::ConnectTimeout.count();
            debug!(%peer, timeout = ?shared.limits.connect_timeout, buffered = c.rbuf.len(), "No complete CONNECT within broker.connect_timeout of accept; closing.");
            return;
        }
    };
    pre.done();
    let version = connect.version;
    if connect.auth_method.is_some() {
        c.refuse(
            version,
            0x8C,
            "enhanced authentication (AUTH) is not supported",
        )
        .await;
        return;
    }
    let mut assigned = None;
    let client_id = if connect.client_id.is_empty() {
        if !connect.clean_start && version == Version::V311 {
            c.refuse(version, 0x85, "empty client id with clean session 0")
                .await;
            return;
        }
        let id = format!("fogline-auto-{:016x}", rand::random::<u64>());
        assigned = Some(id.clone());
        id
    } else {
        connect.client_id.clone()
    };
    if client_id.len() > MAX_CLIENT_ID {
        c.refuse(
            version,
            0x85,
            &format!(
                "client id is {} bytes, the limit is {MAX_CLIENT_ID}",
                client_id.len()
            ),
        )
        .await;
        return;
    }
    let owner = match shared
        .auth
        .check(
            connect.username.as_deref(),
            connect.password.as_deref(),
            certificate_cn.as_deref(),
        )
        .await
    {
        Ok(o) => o,
        Err(r) if r.code == 0x89 => {
            Cut::AuthBusy.count();
            c.answer_refusal(
                version,
                r.code,
                &format!("client `{client_id}`: {}", r.reason),
            )
            .await;
            return;
        }
        Err(r) => {
            metrics::counter!(events::AUTH_FAILURES).increment(1);
            c.refuse(
                version,
                r.code,
                &format!("client `{client_id}`: {}", r.reason),
            )
            .await;
            return;
        }
    };
    let limits = &shared.limits;
    let max_expiry = limits
        .max_session_expiry
        .as_secs()
        .min(u64::from(u32::MAX - 1)) as u32;
    let expiry = match version {
        Version::V311 if connect.clean_start => 0,
        Version::V311 => max_expiry,
        Version::V5 => connect.session_expiry.min(max_expiry),
    };
    let req = OpenRequest {
        client_id: client_id.clone(),
        owner,
        clean_start: connect.clean_start,
        expiry_secs: expiry,
        protocol: if version == Version::V5 { 5 } else { 4 },
    };
    let mut lease = match shared.sessions.open(&req).await {
        Ok(l) => l,
        Err(r) => {
            c.refuse(version, r.code, &r.reason).await;
            return;
        }
    };
    // Trusted now: its CONNECT's bytes leave the pre-CONNECT share, and a
    // will it left pending is not published (it is back).
    drop(charge);
    shared.wills.cancel(&client_id);
    let max_keep_alive = limits
        .max_keep_alive
        .as_secs()
        .clamp(1, u64::from(u16::MAX)) as u16;
    let (keep_alive, server_keep_alive) = match version {
        Version::V5 if connect.keep_alive == 0 || connect.keep_alive > max_keep_alive => {
            (max_keep_alive, Some(max_keep_alive))
        }
        // MQTT 3.1.1 cannot be told: it is held to the limit all the same,
        // or a client asking for 18 h would hold its slot that long silent.
        Version::V311 if connect.keep_alive > max_keep_alive => (max_keep_alive, None),
        _ => (connect.keep_alive, None),
    };
    codec::encode_connack(
        &mut c.wbuf,
        version,
        &ConnAckOut {
            session_present: lease.session_present,
            code: 0,
            receive_maximum: Some(limits.receive_maximum),
            max_packet_size: u32::try_from(limits.max_packet).ok(),
            server_keep_alive,
            session_expiry: (version == Version::V5 && expiry != connect.session_expiry)
                .then_some(expiry),
            assigned_client_id: assigned,
            reason_string: None,
        },
    );
    shared.state.clients.fetch_add(1, Ordering::AcqRel);
    shared
        .state
        .sessions
        .store(shared.sessions.len() as u64, Ordering::Release);
    events::ClientConnected {
        peer,
        client: &client_id,
        version: version.name(),
        session_present: lease.session_present,
        keep_alive,
    }
    .emit();

    let will = connect.will.clone();
    let mut session = SessionUpdate {
        key: lease.key.clone(),
        discard: lease.discard_stored,
        meta: (expiry > 0).then(|| lease.meta.clone()),
        ops: Vec::new(),
    };
    let mut feed = None;
    let end = run(
        &mut c,
        &mut lease,
        &connect,
        keep_alive,
        &mut session,
        &mut feed,
    )
    .await;
    // Its durable local subscription's position, kept for the next
    // connection before the session is handed back (a takeover waits for it).
    let local_write = feed.map(crate::local::DurableFeed::close);
    let mut expiry = expiry;
    let (publish_will, why) = match &end {
        End::Disconnect { will, expiry: e } => {
            if let Some(e) = e {
                expiry = (*e).min(max_expiry);
            }
            (*will, "client disconnected".to_string())
        }
        End::Lost(why) => (true, why.clone()),
        End::Close { code, reason } => {
            if codec::encode_disconnect(&mut c.wbuf, version, *code, Some(reason), true) {
                let _ = tokio::time::timeout(Duration::from_secs(1), c.flush()).await;
            }
            // Our own shutdown is no news about the client: its session is
            // kept and it will reconnect, so its will is not published.
            (
                *code != 0x8B,
                format!("{reason} ({})", codec::reason_name(*code)),
            )
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), c.wr.shutdown()).await;
    shared.state.clients.fetch_sub(1, Ordering::AcqRel);
    events::ClientDisconnected {
        peer,
        client: &client_id,
        reason: &why,
    }
    .emit();

    // Hand the session back and persist what changed.
    let mut state = std::mem::replace(
        &mut lease.state,
        crate::ingest::redelivery::SenderState::new(false, 1),
    );
    if expiry > 0 && !state.is_persistent() {
        state.make_persistent();
    }
    session.ops.extend(state.take_ops());
    let (meta, discard) = shared
        .sessions
        .release(&lease, state, expiry, crate::clock::ingest_ms());
    session.meta = meta;
    session.discard |= discard;
    if !session.is_empty() || local_write.is_some() {
        let mut chunk = Chunk::new(None, shared.limits.max_payload);
        chunk.session = Some(session);
        chunk.local.extend(local_write);
        let _ = shared.sink.send(chunk).await;
    }
    shared
        .state
        .sessions
        .store(shared.sessions.len() as u64, Ordering::Release);
    if publish_will {
        if let Some(w) = will {
            super::wills::on_disconnect(&shared, &client_id, lease.generation, w, expiry).await;
        }
    }
}

/// The connection's life after CONNACK.
async fn run<R, W>(
    c: &mut Conn<R, W>,
    lease: &mut Lease,
    connect: &ConnectIn,
    keep_alive: u16,
    session: &mut SessionUpdate,
    feed: &mut Option<crate::local::DurableFeed>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let version = connect.version;
    let client_max_packet = connect.max_packet_size;
    let shared = c.shared.clone();
    let limits = &shared.limits;
    let rm = usize::from(limits.receive_maximum);
    let (route, mut acks) = AckRoute::new(version == Version::V5);
    lease
        .state
        .start_connection((version == Version::V5).then_some(limits.receive_maximum));
    let mut intake = Intake::new(
        "endpoint",
        (version == Version::V5).then_some(limits.receive_maximum),
    );
    // Keep alive 0 ("never", only MQTT 3.1.1 gets it) still has a
    // server-side idle limit: a silent client does not hold its slot forever.
    let (idle_limit, idle_what) = if keep_alive > 0 {
        (
            Duration::from_millis(u64::from(keep_alive) * 1500),
            if keep_alive < connect.keep_alive {
                format!(
                    "1.5 × broker.max_keep_alive ({keep_alive} s; the client asked for {} s)",
                    connect.keep_alive
                )
            } else {
                format!("1.5 × keep alive ({keep_alive} s)")
            },
        )
    } else {
        (
            limits.idle_timeout,
            format!(
                "broker.idle_timeout ({:?}; the client asked for keep alive 0)",
                limits.idle_timeout
            ),
        )
    };
    let mut last_rx = Instant::now();
    // The ingest budget's bytes for a large packet still arriving (I-12).
    let mut packet_permit: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut shutdown = shared.shutdown.clone();
    let mut first = true;
    // Local subscribers: the outputs of pipelines with `local` (crate::local).
    let owner = lease.meta.owner.clone();
    let mut subscription: Option<crate::local::Subscription> = None;
    // Durable local subscribers resume where they left off (I-40).
    let hub = shared.local.durable.clone();
    let mut local_writes = Vec::new();
    if hub.enabled() {
        let (stored, forgotten) = hub.take_stored(&lease.client_id, connect.clean_start);
        if forgotten {
            local_writes.push(crate::outbox::SubscriberWrite::Delete(
                lease.client_id.clone(),
            ));
        }
        if let Some(stored) = stored {
            let sub = subscription
                .get_or_insert_with(|| shared.local.subscribe(crate::local::SUBSCRIBER_QUEUE));
            for (f, _) in &stored.filters {
                sub.add(f);
            }
            *feed = Some(crate::local::DurableFeed::open(
                hub.clone(),
                &lease.client_id,
                lease.meta.expiry_secs,
                Some(stored),
                connect.receive_maximum,
            ));
        }
    }
    if let Err(e) = c.flush().await {
        return End::Lost(format!("write failed: {e}"));
    }
    loop {
        // Everything buffered becomes one chunk.
        let mut chunk = Chunk::new(Some(route.clone()), limits.max_payload);
        let mut end = None;
        let buffered = c.rbuf.len();
        while chunk.items.len() < CHUNK_ITEMS {
            // MQTT 3.1.1 has no receive maximum: beyond ours, stop reading.
            if version == Version::V311 && intake.in_flight.len() >= rm {
                break;
            }
            let packet = match codec::decode(&mut c.rbuf, Some(version), limits.max_packet) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(codec::CodecError::TooLarge { size, max }) => {
                    metrics::counter!(events::PROTOCOL_ERRORS).increment(1);
                    end = Some(End::close(
                        0x95,
                        format!("packet of {size} bytes, the maximum packet size is {max}"),
                    ));
                    break;
                }
                Err(e) => {
                    metrics::counter!(events::PROTOCOL_ERRORS).increment(1);
                    end = Some(End::close(0x81, e.to_string()));
                    break;
                }
            };
            match packet {
                Inbound::Publish(p) => {
                    if p.topic_alias.is_some() {
                        end = Some(End::close(
                            0x94,
                            "topic aliases are not supported (Topic Alias Maximum is 0)",
                        ));
                        break;
                    }
                    if p.topic.is_empty() || p.topic.iter().any(|b| matches!(b, b'+' | b'#')) {
                        end = Some(End::close(
                            0x90,
                            format!(
                                "PUBLISH topic `{}` is empty or has wildcards",
                                String::from_utf8_lossy(&p.topic)
                            ),
                        ));
                        break;
                    }
                    let qos = p.qos;
                    intake.publish(&mut lease.state, p, &mut chunk);
                    if qos > 0 && version == Version::V5 && intake.in_flight.len() > rm {
                        end = Some(End::close(
                            0x93,
                            format!(
                                "more than {rm} QoS 1/2 messages unacknowledged (Receive Maximum)"
                            ),
                        ));
                        break;
                    }
                }
                Inbound::PubRel(pkid, _) => intake.pubrel(&mut lease.state, pkid, &mut chunk),
                // Acknowledgements of durable local deliveries (I-40).
                Inbound::PubAck(..) | Inbound::PubRec(..) | Inbound::PubComp(..) => {
                    crate::local::DurableFeed::acknowledge(
                        feed.as_mut(),
                        &packet,
                        &mut c.wbuf,
                        version,
                    )
                }
                Inbound::PingReq => codec::encode_pingresp(&mut c.wbuf, version),
                Inbound::Subscribe(pkid, filters) => {
                    let checked: Vec<Result<(), String>> = filters
                        .iter()
                        .map(|(f, _)| shared.grants.check(owner.as_deref(), f))
                        .collect();
                    // QoS 1/2 only where outputs are kept (durable mode);
                    // immediate outputs go at QoS 0 whatever was granted.
                    let granted: Vec<Option<u8>> = checked
                        .iter()
                        .zip(&filters)
                        .map(|(r, (_, q))| {
                            r.is_ok()
                                .then(|| if hub.enabled() { (*q).min(2) } else { 0 })
                        })
                        .collect();
                    let refused: Vec<&String> =
                        checked.iter().filter_map(|r| r.as_ref().err()).collect();
                    if granted.iter().any(Option::is_some) {
                        let sub = subscription.get_or_insert_with(|| {
                            shared.local.subscribe(crate::local::SUBSCRIBER_QUEUE)
                        });
                        for ((f, _), g) in filters.iter().zip(&granted) {
                            if g.is_some() {
                                sub.add(f);
                            }
                        }
                        if hub.enabled() {
                            let d = feed.get_or_insert_with(|| {
                                crate::local::DurableFeed::open(
                                    hub.clone(),
                                    &lease.client_id,
                                    lease.meta.expiry_secs,
                                    None,
                                    connect.receive_maximum,
                                )
                            });
                            for ((f, _), g) in filters.iter().zip(&granted) {
                                if let Some(q) = g {
                                    d.subscribe(f, *q);
                                }
                            }
                        }
                    }
                    let reason = if shared.grants.is_empty() {
                        Some(SUBSCRIBE_REFUSED.to_string())
                    } else {
                        refused.first().map(|r| r.to_string())
                    };
                    if !refused.is_empty() {
                        metrics::counter!(events::SUBSCRIBES_REFUSED)
                            .increment(refused.len() as u64);
                        if first {
                            info!(peer = %c.peer, client = %lease.client_id, reason = reason.as_deref().unwrap_or(""), "Refused SUBSCRIBE.");
                            first = false;
                        }
                    }
                    codec::encode_suback(&mut c.wbuf, version, pkid, &granted, reason.as_deref());
                }
                Inbound::Unsubscribe(pkid, filters) => {
                    if let Some(sub) = &subscription {
                        for f in &filters {
                            sub.remove(f);
                        }
                    }
                    if let Some(d) = feed.as_mut() {
                        let mut left = true;
                        for f in &filters {
                            left = d.unsubscribe(f);
                        }
                        if !left {
                            if let Some(d) = feed.take() {
                                local_writes.push(d.drop_subscription());
                            }
                        }
                    }
                    codec::encode_unsuback(&mut c.wbuf, version, pkid, filters.len())
                }
                Inbound::Disconnect(reason, expiry, _) => {
                    if expiry.is_some_and(|e| e > 0) && lease.meta.expiry_secs == 0 {
                        end = Some(End::close(
                            0x82,
                            "DISCONNECT raised a session expiry of 0 (MQTT 5 §3.14.2.2.2)",
                        ));
                    } else {
                        end = Some(End::Disconnect {
                            will: reason == 0x04,
                            expiry,
                        });
                    }
                    break;
                }
                Inbound::Auth => {
                    end = Some(End::close(0x8C, "AUTH is not supported"));
                    break;
                }
                other => {
                    metrics::counter!(events::PROTOCOL_ERRORS).increment(1);
                    end = Some(End::close(
                        0x82,
                        format!("unexpected packet from a client: {other:?}"),
                    ));
                    break;
                }
            }
        }
        if c.rbuf.len() < buffered {
            // The packet it was held for is decoded: its bytes are the
            // chunk's now, counted when the chunk is queued.
            packet_permit = None;
        }
        intake.report(&mut lease.state);
        if lease.state.is_persistent() {
            session.ops.extend(lease.state.take_ops());
        }
        if let Some(d) = feed.as_mut() {
            d.pump(&mut c.wbuf, version, client_max_packet);
            local_writes.extend(d.take_write());
        }
        chunk.local.append(&mut local_writes);
        if !session.is_empty() {
            chunk.session = Some(std::mem::take(session));
            session.key = lease.key.clone();
        }
        if !chunk.is_empty() {
            let owed = Intake::acks_in(&chunk);
            tokio::select! {
                r = shared.sink.send(chunk) => match r {
                    Ok(()) => intake.took(owed),
                    Err(_) => return End::close(0x8B, "the daemon is shutting down"),
                },
                _ = shutdown.changed() => {
                    return shutting_down(c, &mut intake, &mut acks, version, limits).await;
                }
                _ = lease.kick.notified() => return End::close(0x8E, "another connection took the client id over"),
            }
            // Waiting for room is our doing, not the client's silence.
            last_rx = Instant::now();
        }
        if let Some(end) = end {
            return end;
        }
        if let Err(e) = c.flush().await {
            return End::Lost(format!("write failed: {e}"));
        }
        let can_read = !(version == Version::V311 && intake.in_flight.len() >= rm);
        // A packet larger than one read waits for its bytes in the ingest
        // budget before the rest of it is read.
        let large = match codec::framing(&c.rbuf, limits.max_packet) {
            Ok(Framing::Packet { len }) if len > READ_BYTES && len > c.rbuf.len() => Some(len),
            _ => None,
        };
        let need_permit = large.is_some() && packet_permit.is_none();
        let idle_at = last_rx + idle_limit;
        tokio::select! {
            p = shared.sink.reserve(large.unwrap_or(0)), if can_read && need_permit => match p {
                Ok(p) => packet_permit = Some(p),
                Err(_) => return End::close(0x8B, "the daemon is shutting down"),
            },
            r = async {
                c.rbuf.reserve(READ_BYTES);
                c.rd.read_buf(&mut c.rbuf).await
            }, if can_read && !need_permit => match r {
                Ok(0) => return End::Lost("connection closed without DISCONNECT".into()),
                Ok(_) => last_rx = Instant::now(),
                Err(e) => return End::Lost(format!("read failed: {e}")),
            },
            () = async {
                match feed.as_mut() {
                    Some(d) => d.wait().await,
                    None => std::future::pending().await,
                }
            } => {}
            d = async {
                match subscription.as_mut() {
                    Some(s) => s.rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if let (Some(d), Some(s)) = (d, subscription.as_mut()) {
                    s.write_queued(d, &mut c.wbuf, version, client_max_packet);
                }
            }
            batch = acks.recv() => {
                let Some(batch) = batch else { return End::Lost("ack route closed".into()) };
                intake.write_acks(&mut c.wbuf, version, batch);
                // More may already be waiting: one write for all of them.
                while let Ok(batch) = acks.try_recv() {
                    intake.write_acks(&mut c.wbuf, version, batch);
                }
            }
            _ = tokio::time::sleep_until(idle_at) => {
                Cut::Idle.count();
                return End::close(0x8D, format!("nothing received for {idle_what}"));
            }
            _ = lease.kick.notified() => return End::close(0x8E, "another connection took the client id over"),
            _ = shutdown.changed() => {
                return shutting_down(c, &mut intake, &mut acks, version, limits).await;
            }
        }
    }
}

/// The daemon is stopping: read nothing more, but acknowledge what the
/// pipeline took as its commits finish (I-16), then DISCONNECT 0x8B.
async fn shutting_down<R, W>(
    c: &mut Conn<R, W>,
    intake: &mut Intake,
    acks: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<crate::ingest::Ack>>,
    version: Version,
    limits: &super::Limits,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let deadline = Instant::now() + limits.drain_timeout;
    if c.flush().await.is_ok() {
        intake
            .drain(acks, &mut c.wr, &mut c.wbuf, version, deadline)
            .await;
    }
    End::close(0x8B, "the daemon is shutting down")
}
