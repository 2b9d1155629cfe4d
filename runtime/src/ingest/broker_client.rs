//! Subscribing to an external broker (mosquitto and friends): MQTT 5 (or
//! 3.1.1), persistent session, QoS 1/2, acknowledgements after commit.
//!
//! Built on the same codec and acknowledgement routes as the endpoint rather
//! than on rumqttc's event loop, because ingest must control what that loop
//! hides: an acknowledgement belongs to the connection its PUBLISH came in
//! on and is never sent on the next one; PUBCOMP waits until the PUBREL is
//! durable; a PUBREL for a packet id received before a restart is expected,
//! not an error.
//!
//! On every CONNACK the client subscribes to a non-overlapping cover of the
//! pipelines' filters ([`topic::cover`]) — a changed config takes effect on
//! restart — and unsubscribes what an earlier configuration subscribed and
//! this one does not. A refused filter is logged with its reason code and
//! shown by `fogline-edge status`.
//!
//! With `mqtt.publish`, the same connection publishes the outputs of
//! pipelines with `local` to the broker (crate::local): `immediate` ones at
//! QoS 0, `durable` ones as a durable subscriber named [`PUBLISHER`] whose
//! position survives reconnects and restarts (I-40). Publishing starts once
//! the SUBACK is in, so our packet ids never meet SUBSCRIBE's.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::codec::{self, ConnectOut, Inbound, Version};
use super::events;
use super::intake::Intake;
use super::redelivery::SenderState;
use super::session_store::{RestoredSession, SessionMeta, SessionUpdate};
use super::topic;
use super::{AckRoute, Chunk, IngestSink, IngestState};
use crate::config::{EdgeConfig, MqttProtocol};

const READ_BYTES: usize = 64 * 1024;
const CHUNK_ITEMS: usize = 4096;
/// Packet ids of our SUBSCRIBE / UNSUBSCRIBE (publishing waits for their
/// acknowledgements).
const SUBSCRIBE_PKID: u16 = 1;
const UNSUBSCRIBE_PKID: u16 = 2;
/// The durable local subscriber that publishes to the external broker.
pub const PUBLISHER: &str = "$fogline/external-broker";

/// What this connection publishes to the broker (`mqtt.publish`).
struct Publishing {
    filters: Vec<String>,
    qos: u8,
    /// Immediate outputs (QoS 0).
    live: Option<crate::local::Subscription>,
    /// Durable outputs, kept in the outbox until the broker acknowledged.
    feed: Option<crate::local::DurableFeed>,
    hub: Arc<crate::local::DurableHub>,
}

impl Publishing {
    fn start_feed(&mut self) {
        if self.feed.is_some() || !self.hub.enabled() || self.filters.is_empty() {
            return;
        }
        let (stored, _) = self.hub.take_stored(PUBLISHER, false);
        let mut feed =
            crate::local::DurableFeed::open(self.hub.clone(), PUBLISHER, u32::MAX, stored, None);
        for f in &self.filters {
            feed.subscribe(f, self.qos);
        }
        self.feed = Some(feed);
    }
}

/// Why one connection to the broker ended.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// TCP or TLS failed.
    #[error("{broker}: {what}: {source}")]
    Io {
        /// Broker address.
        broker: String,
        /// What we were doing.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The broker refused the CONNECT.
    #[error("{broker} refused the connection: CONNACK code {code:#04x} ({name}){detail}")]
    Refused {
        /// Broker address.
        broker: String,
        /// Return / reason code.
        code: u8,
        /// Its meaning.
        name: &'static str,
        /// Reason string, if any.
        detail: String,
    },
    /// The broker broke the protocol (or a packet did not decode).
    #[error("{broker}: {reason}")]
    Protocol {
        /// Broker address.
        broker: String,
        /// What was wrong.
        reason: String,
    },
    /// Nothing heard for too long.
    #[error("{broker}: no answer to PINGREQ within {0:?}", .waited)]
    Silent {
        /// Broker address.
        broker: String,
        /// How long.
        waited: Duration,
    },
    /// The pipeline stopped.
    #[error("shutting down")]
    Shutdown,
}

/// The subscriber's settings, from `[mqtt]`.
#[derive(Debug, Clone)]
struct Settings {
    broker: String,
    version: Version,
    client_id: String,
    username: Option<String>,
    password: Option<String>,
    keep_alive: Duration,
    receive_maximum: u16,
    session_expiry: u32,
    max_payload: usize,
    max_packet: usize,
    qos: u8,
    connect_timeout: Duration,
    drain_timeout: Duration,
    commit_linger: Duration,
    cover: Vec<String>,
}

/// The outbox key of the broker session.
pub fn session_key(config: &EdgeConfig) -> String {
    format!("b:{}/{}", config.ingest_broker(), config.client_id())
}

/// Starts the subscriber. It reconnects until `shutdown` flips.
pub fn spawn(
    config: &EdgeConfig,
    sink: IngestSink,
    restored: Option<RestoredSession>,
    state: Arc<IngestState>,
    shutdown: watch::Receiver<bool>,
    local: &Arc<crate::local::LocalBus>,
) -> tokio::task::JoinHandle<()> {
    let m = &config.mqtt;
    let live = (!m.publish.is_empty()).then(|| {
        let sub = local.subscribe(crate::local::SUBSCRIBER_QUEUE);
        for f in &m.publish {
            sub.add(f);
        }
        sub
    });
    let publishing = Publishing {
        filters: m.publish.clone(),
        qos: m.publish_qos,
        live,
        feed: None,
        hub: local.durable.clone(),
    };
    let settings = Settings {
        broker: config.ingest_broker(),
        version: match m.protocol {
            MqttProtocol::V5 => Version::V5,
            MqttProtocol::V311 => Version::V311,
        },
        client_id: config.client_id(),
        username: m.username.clone(),
        password: m.password.clone(),
        keep_alive: m.keep_alive.max(Duration::from_secs(5)),
        receive_maximum: m.receive_maximum,
        session_expiry: m.session_expiry.as_secs().min(u64::from(u32::MAX)) as u32,
        max_payload: m.max_payload_bytes,
        // Oversized payloads are better received and dead-lettered (visible)
        // than dropped by the broker for exceeding our Maximum Packet Size.
        max_packet: m
            .max_payload_bytes
            .saturating_mul(4)
            .clamp(64 * 1024, 16 << 20),
        qos: m.qos,
        connect_timeout: m.connect_timeout,
        drain_timeout: super::endpoint::drain_timeout(config),
        commit_linger: m.commit_linger,
        cover: topic::cover(&config.topic_filters()),
    };
    let key: Arc<str> = Arc::from(session_key(config));
    let retain = 2 * usize::from(m.receive_maximum);
    tokio::spawn(run(
        settings, key, retain, sink, restored, state, shutdown, publishing,
    ))
}

#[allow(clippy::too_many_arguments)]
async fn run(
    s: Settings,
    key: Arc<str>,
    retain: usize,
    sink: IngestSink,
    restored: Option<RestoredSession>,
    state: Arc<IngestState>,
    mut shutdown: watch::Receiver<bool>,
    mut publishing: Publishing,
) {
    let (mut sender, mut subscribed) = match restored {
        Some(r) => (
            SenderState::restore(r.marks, r.received, r.shape, retain),
            r.meta.map(|m| m.subscriptions).unwrap_or_default(),
        ),
        None => (SenderState::new(true, retain), Vec::new()),
    };
    info!(broker = %s.broker, filters = ?s.cover, "Subscribing to the external MQTT broker.");
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            break;
        }
        let result = session(
            &s,
            &key,
            &mut sender,
            &mut subscribed,
            &sink,
            &state,
            &mut shutdown,
            &mut backoff,
            &mut publishing,
        )
        .await;
        // What the broker acknowledged is kept; the rest goes again on the
        // next connection (I-40).
        if let Some(feed) = publishing.feed.take() {
            let mut chunk = Chunk::new(None, s.max_payload);
            chunk.local.push(feed.close());
            let _ = sink.send(chunk).await;
        }
        if state.broker_connected.swap(false, Ordering::AcqRel) {
            metrics::gauge!(events::BROKER_CONNECTED).set(0.0);
        }
        match result {
            Err(BrokerError::Shutdown) | Ok(()) => break,
            Err(e) => events::BrokerConnectionFailed {
                error: &e,
                retry_in: backoff,
            }
            .emit(),
        }
        let jitter = rand::rng().random_range(0.75..1.25);
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    info!("MQTT broker client stopped.");
}

#[allow(clippy::too_many_arguments)]
async fn session(
    s: &Settings,
    key: &Arc<str>,
    sender: &mut SenderState,
    subscribed: &mut Vec<String>,
    sink: &IngestSink,
    state: &IngestState,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
    publishing: &mut Publishing,
) -> Result<(), BrokerError> {
    let io = |what: &'static str| {
        let broker = s.broker.clone();
        move |source| BrokerError::Io {
            broker,
            what,
            source,
        }
    };
    let proto = |reason: String| BrokerError::Protocol {
        broker: s.broker.clone(),
        reason,
    };
    let stream = tokio::time::timeout(s.connect_timeout, TcpStream::connect(&s.broker))
        .await
        .map_err(|_| {
            io("connect")(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out",
            ))
        })?
        .map_err(io("connect"))?;
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut rbuf = BytesMut::with_capacity(READ_BYTES);
    let mut wbuf = BytesMut::with_capacity(4096);
    codec::encode_connect(
        &mut wbuf,
        &ConnectOut {
            version: s.version,
            client_id: s.client_id.clone(),
            clean_start: false,
            keep_alive: s.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16,
            session_expiry: Some(s.session_expiry),
            receive_maximum: Some(s.receive_maximum),
            max_packet_size: Some(u32::try_from(s.max_packet).unwrap_or(u32::MAX)),
            username: s.username.clone(),
            password: s.password.clone(),
            will: None,
        },
    )
    .map_err(|e| proto(e.to_string()))?;
    wr.write_all(&wbuf).await.map_err(io("send CONNECT"))?;
    wbuf.clear();
    let connack = tokio::time::timeout(s.connect_timeout, async {
        loop {
            match codec::decode(&mut rbuf, Some(s.version), s.max_packet) {
                Ok(Some(Inbound::ConnAck(a))) => return Ok(a),
                Ok(Some(other)) => return Err(proto(format!("expected CONNACK, got {other:?}"))),
                Ok(None) => {}
                Err(e) => return Err(proto(format!("bad CONNACK: {e}"))),
            }
            rbuf.reserve(1024);
            if rd.read_buf(&mut rbuf).await.map_err(io("read CONNACK"))? == 0 {
                return Err(io("read CONNACK")(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    })
    .await
    .map_err(|_| {
        io("wait for CONNACK")(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "timed out",
        ))
    })??;
    if connack.code != 0 {
        return Err(BrokerError::Refused {
            broker: s.broker.clone(),
            code: connack.code,
            name: codec::reason_name(connack.code),
            detail: connack
                .reason_string
                .map(|r| format!(": {r}"))
                .unwrap_or_default(),
        });
    }
    *backoff = Duration::from_millis(100);
    let n = state.broker_connections.fetch_add(1, Ordering::AcqRel) + 1;
    state.broker_connected.store(true, Ordering::Release);
    events::BrokerConnected {
        broker: &s.broker,
        connection: n,
        session_present: connack.session_present,
        version: s.version.name(),
    }
    .emit();

    let mut update = SessionUpdate {
        key: key.clone(),
        ..SessionUpdate::default()
    };
    if !connack.session_present {
        // The broker has no session for us: it will resend nothing we
        // accepted before, and holds no subscription.
        if sender.marks() > 0 || sender.received() > 0 {
            info!("The broker kept no session for us; forgetting the redelivery state of the old one.");
        }
        *sender = SenderState::new(true, sender_retain(s));
        update.discard = true;
        subscribed.clear();
    }
    sender.start_connection((s.version == Version::V5).then_some(s.receive_maximum));

    // Subscribe on every CONNACK; unsubscribe what the config dropped.
    let stale: Vec<String> = subscribed
        .iter()
        .filter(|f| !s.cover.contains(f))
        .cloned()
        .collect();
    if !stale.is_empty() {
        info!(filters = ?stale, "Unsubscribing filters no pipeline uses any more.");
        codec::encode_unsubscribe(&mut wbuf, s.version, UNSUBSCRIBE_PKID, &stale)
            .map_err(|e| proto(e.to_string()))?;
    }
    codec::encode_subscribe(&mut wbuf, s.version, SUBSCRIBE_PKID, &s.cover, s.qos)
        .map_err(|e| proto(e.to_string()))?;
    wr.write_all(&wbuf).await.map_err(io("send SUBSCRIBE"))?;
    wbuf.clear();

    let (route, mut acks) = AckRoute::new(false);
    let mut intake = Intake::new(
        "broker",
        (s.version == Version::V5).then_some(s.receive_maximum),
    );
    let keep_alive = connack
        .server_keep_alive
        .map(|k| Duration::from_secs(u64::from(k.max(1))))
        .unwrap_or(s.keep_alive);
    let mut next_ping = Instant::now() + keep_alive;
    let mut ping_outstanding: Option<Instant> = None;
    loop {
        let mut chunk = Chunk::new(Some(route.clone()), s.max_payload);
        chunk.linger = Some(s.commit_linger);
        while chunk.items.len() < CHUNK_ITEMS {
            let packet = match codec::decode(&mut rbuf, Some(s.version), s.max_packet) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => return Err(proto(e.to_string())),
            };
            match packet {
                Inbound::Publish(p) => intake.publish(sender, p, &mut chunk),
                Inbound::PubRel(pkid, _) => intake.pubrel(sender, pkid, &mut chunk),
                Inbound::SubAck(pkid, codes) if pkid == SUBSCRIBE_PKID => {
                    let mut refused = Vec::new();
                    for (filter, code) in s
                        .cover
                        .iter()
                        .zip(codes.iter().chain(std::iter::repeat(&0x80)))
                    {
                        if *code >= 0x80 {
                            events::SubscriptionRefused {
                                broker: &s.broker,
                                filter,
                                code: *code,
                            }
                            .emit();
                            refused.push((filter.clone(), *code));
                        } else if *code < s.qos {
                            warn!(%filter, granted = code, asked = s.qos, "The broker granted a lower QoS than asked.");
                        }
                    }
                    if let Ok(mut r) = state.refused_subscriptions.lock() {
                        *r = refused;
                    }
                    publishing.start_feed();
                    *subscribed = s.cover.clone();
                    update.meta = Some(SessionMeta {
                        expiry_secs: s.session_expiry,
                        protocol: if s.version == Version::V5 { 5 } else { 4 },
                        subscriptions: s.cover.clone(),
                        ..SessionMeta::default()
                    });
                }
                Inbound::PubAck(..) | Inbound::PubRec(..) | Inbound::PubComp(..) => {
                    crate::local::DurableFeed::acknowledge(
                        publishing.feed.as_mut(),
                        &packet,
                        &mut wbuf,
                        s.version,
                    )
                }
                Inbound::UnsubAck(..) | Inbound::SubAck(..) | Inbound::PingResp => {}
                Inbound::Disconnect(code, ..) => {
                    return Err(proto(format!(
                        "the broker sent DISCONNECT {code:#04x} ({})",
                        codec::reason_name(code)
                    )));
                }
                other => {
                    return Err(proto(format!(
                        "unexpected packet from the broker: {other:?}"
                    )))
                }
            }
        }
        intake.report(sender);
        update.ops.extend(sender.take_ops());
        if let Some(f) = publishing.feed.as_mut() {
            f.pump(&mut wbuf, s.version, connack.max_packet_size);
            chunk.local.extend(f.take_write());
        }
        if !update.is_empty() {
            chunk.session = Some(std::mem::replace(
                &mut update,
                SessionUpdate {
                    key: key.clone(),
                    ..SessionUpdate::default()
                },
            ));
        }
        if !chunk.is_empty() {
            let owed = Intake::acks_in(&chunk);
            tokio::select! {
                r = sink.send(chunk) => {
                    r.map_err(|_| BrokerError::Shutdown)?;
                    intake.took(owed);
                }
                _ = shutdown.changed() => {
                    let deadline = Instant::now() + s.drain_timeout;
                    intake.drain(&mut acks, &mut wr, &mut wbuf, s.version, deadline).await;
                    return Err(BrokerError::Shutdown);
                }
            }
        }
        if !wbuf.is_empty() {
            wr.write_all(&wbuf).await.map_err(io("write"))?;
            wbuf.clear();
        }
        tokio::select! {
            r = async {
                rbuf.reserve(READ_BYTES);
                rd.read_buf(&mut rbuf).await
            } => match r {
                Ok(0) => return Err(io("read")(std::io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => ping_outstanding = None,
                Err(e) => return Err(io("read")(e)),
            },
            batch = acks.recv() => {
                let Some(batch) = batch else { return Err(BrokerError::Shutdown) };
                intake.write_acks(&mut wbuf, s.version, batch);
                while let Ok(batch) = acks.try_recv() {
                    intake.write_acks(&mut wbuf, s.version, batch);
                }
            }
            () = async {
                match publishing.feed.as_mut() {
                    Some(f) => f.wait().await,
                    None => std::future::pending().await,
                }
            } => {}
            d = async {
                match publishing.live.as_mut() {
                    Some(l) => l.rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if let (Some(d), Some(l)) = (d, publishing.live.as_mut()) {
                    l.write_queued(d, &mut wbuf, s.version, connack.max_packet_size);
                }
            }
            _ = tokio::time::sleep_until(next_ping) => {
                if let Some(since) = ping_outstanding {
                    return Err(BrokerError::Silent { broker: s.broker.clone(), waited: since.elapsed() });
                }
                codec::encode_pingreq(&mut wbuf, s.version);
                ping_outstanding = Some(Instant::now());
                next_ping = Instant::now() + keep_alive;
            }
            _ = shutdown.changed() => {
                // Acknowledge what the pipeline took as it commits (I-16),
                // then leave cleanly (the session is kept).
                let deadline = Instant::now() + s.drain_timeout;
                if wr.write_all(&wbuf).await.is_ok() {
                    wbuf.clear();
                    intake.drain(&mut acks, &mut wr, &mut wbuf, s.version, deadline).await;
                }
                codec::encode_disconnect(&mut wbuf, s.version, 0, None, false);
                let _ = tokio::time::timeout(Duration::from_millis(500), wr.write_all(&wbuf)).await;
                return Err(BrokerError::Shutdown);
            }
        }
    }
}

fn sender_retain(s: &Settings) -> usize {
    2 * usize::from(s.receive_maximum)
}
