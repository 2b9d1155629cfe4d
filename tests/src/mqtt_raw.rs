//! A fast raw-socket MQTT client for end-to-end tests, fault tests and
//! benchmarks.
//!
//! Packets are encoded and decoded with the edge's own codec, crate
//! `fogline-mqtt` (one codec everywhere: the tests cannot drift from what
//! production speaks). Everything else is here in plain sight — socket, buffering,
//! packet ids, DUP flags, retries — so a test controls exactly what goes on
//! the wire. rumqttc's `AsyncClient`/`EventLoop` is not used: it hides packet
//! ids and DUP flags, and is too slow to serve as a reference.
//!
//! - [`Connection`]: one TCP connection. Sends queue encoded packets in a
//!   buffer that is written in batches; [`Connection::next_packet`] returns
//!   incoming packets as one [`Incoming`] enum for both protocol versions.
//!   Also raw bytes and a PUBLISH cut in half, for malformed-input tests.
//! - [`Publisher`]: pipelined QoS 1/2 publisher with a window of unacknowledged
//!   messages that survives the broker dying (reconnect, resend with DUP=1
//!   and the same packet ids) and reports, per message, when it became safe.
//! - [`Subscriber`] / [`count_subscriber`]: counts (and optionally keeps) what
//!   arrives on a filter, acknowledging it.
//! - [`mosquitto_reference`]: bare mosquitto → one counting QoS 1 subscriber,
//!   throughput and mosquitto's CPU per message.
//! - [`broker`]: a private mosquitto (persistence, SIGKILL, restart);
//!   [`cpu`]: CPU time and memory of a process from `/proc`.

pub mod cpu;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use fogline_mqtt::{self as codec, ConnectOut, Inbound};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Quality of service (rumqttc's MQTT 3.1.1 type, used for both versions).
pub use rumqttc::QoS;

/// Bytes read per system call at most.
const READ_CHUNK: usize = 64 * 1024;
/// The publisher stops encoding new messages while this much is unwritten,
/// so a huge window does not become a huge buffer.
const TX_HIGH_WATER: usize = 256 * 1024;
/// Session expiry the publisher asks for on MQTT 5 when none is set: without
/// one an MQTT 5 session ends with the connection and nothing would survive
/// a reconnect.
const DEFAULT_SESSION_EXPIRY_SECS: u32 = 300;
/// Longest pause between two connection attempts of the publisher.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// Options, CONNACK, errors
// ---------------------------------------------------------------------------

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.
    V5,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V311 => "MQTT 3.1.1",
            Version::V5 => "MQTT 5",
        })
    }
}

/// How to connect. Build with [`Options::new`] and set fields.
#[derive(Debug, Clone)]
pub struct Options {
    /// `host:port`, e.g. `127.0.0.1:1883`.
    pub addr: String,
    pub client_id: String,
    pub version: Version,
    /// Clean session (3.1.1) / clean start (5).
    pub clean_start: bool,
    /// MQTT 5 Session Expiry Interval; `None` sends none (session ends with
    /// the connection). Ignored for 3.1.1.
    pub session_expiry_secs: Option<u32>,
    /// Keep alive sent in CONNECT; 0 disables it. [`Publisher`] and
    /// [`Subscriber`] send PINGREQ when idle this long; a bare
    /// [`Connection`] leaves that to the test.
    pub keep_alive_secs: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// MQTT 5 Receive Maximum we announce (QoS 1/2 messages the broker may
    /// have in flight towards us). Ignored for 3.1.1.
    pub receive_maximum: Option<u16>,
    /// Largest incoming packet accepted (remaining length); bounds every
    /// allocation made for the peer. Larger packets are an error.
    pub max_packet_size: usize,
    /// Limit for TCP connect, and separately for the CONNACK.
    pub connect_timeout: Duration,
    /// Will message (MQTT 5: with its delay when non-zero).
    pub will: Option<codec::Will>,
}

impl Options {
    /// MQTT 3.1.1, clean start, keep alive 30 s, 1 MiB packets, 5 s connect
    /// timeout.
    pub fn new(addr: impl Into<String>, client_id: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            client_id: client_id.into(),
            version: Version::V311,
            clean_start: true,
            session_expiry_secs: None,
            keep_alive_secs: 30,
            username: None,
            password: None,
            receive_maximum: None,
            max_packet_size: 1024 * 1024,
            connect_timeout: Duration::from_secs(5),
            will: None,
        }
    }

    /// The same options with `version`.
    pub fn with_version(mut self, version: Version) -> Self {
        self.version = version;
        self
    }
}

/// A CONNACK, normalised across versions. MQTT 5 properties are `None` for
/// 3.1.1 or when the broker did not send them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// 3.1.1 return code (0..=5) or MQTT 5 reason code; 0 is success.
    pub code: u8,
    pub receive_maximum: Option<u16>,
    pub maximum_packet_size: Option<u32>,
    pub assigned_client_id: Option<String>,
    pub session_expiry_secs: Option<u32>,
    pub server_keep_alive: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub reason_string: Option<String>,
}

/// The broker refused the connection. Reach it with
/// `err.downcast_ref::<ConnectRefused>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRefused {
    pub code: u8,
    pub version: Version,
    pub reason_string: Option<String>,
}

impl ConnectRefused {
    /// Whether waiting and trying again can help (server unavailable or busy,
    /// rate limited).
    pub fn is_transient(&self) -> bool {
        match self.version {
            Version::V311 => self.code == 3,
            Version::V5 => matches!(self.code, 0x88 | 0x89 | 0x9F),
        }
    }
}

impl fmt::Display for ConnectRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.version {
            Version::V311 => write!(
                f,
                "CONNACK refused: return code {} ({})",
                self.code,
                connack_v311_text(self.code)
            )?,
            Version::V5 => write!(
                f,
                "CONNACK refused: reason 0x{:02X} ({})",
                self.code,
                reason_text(self.code)
            )?,
        }
        if let Some(s) = &self.reason_string {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConnectRefused {}

/// The connection is gone (EOF, reset, broken pipe). Test for it with
/// [`is_closed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub detail: String,
}

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connection closed: {}", self.detail)
    }
}

impl std::error::Error for Closed {}

/// Whether `err` (or anything in its chain) says the connection is closed.
pub fn is_closed(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.downcast_ref::<Closed>().is_some())
}

/// Name of an MQTT 5 reason code (CONNACK, PUBACK, PUBREC, SUBACK,
/// DISCONNECT, ...), as in the specification (the codec's table).
pub fn reason_text(code: u8) -> &'static str {
    codec::reason_name(code)
}

fn connack_v311_text(code: u8) -> &'static str {
    match code {
        0 => "accepted",
        1 => "unacceptable protocol version",
        2 => "identifier rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorized",
        _ => "unknown return code",
    }
}

// ---------------------------------------------------------------------------
// Incoming packets
// ---------------------------------------------------------------------------

/// A packet from the broker, the same for both versions. Reason codes are
/// MQTT 5's (0 = success); 3.1.1 packets carry 0. `codes` of a 3.1.1 SUBACK
/// are its return codes (0, 1, 2 or 0x80).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    ConnAck(Box<ConnAck>),
    Publish {
        topic: String,
        payload: Bytes,
        qos: QoS,
        pkid: u16,
        dup: bool,
        retain: bool,
    },
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PubRec {
        pkid: u16,
        reason: u8,
    },
    PubRel {
        pkid: u16,
        reason: u8,
    },
    PubComp {
        pkid: u16,
        reason: u8,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    /// `codes` is empty for 3.1.1.
    UnsubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    PingResp,
    /// Only MQTT 5 brokers send it (a 3.1.1 broker just closes).
    Disconnect {
        reason: u8,
        reason_string: Option<String>,
    },
}

/// Decode one packet from the front of `rx` if it is complete, with the
/// production codec (header bound check first, then the frame), and turn it
/// into the test's view of it.
fn decode(version: Version, rx: &mut BytesMut, max_size: usize) -> Result<Option<Incoming>> {
    let Some(p) = codec::decode(rx, Some(version.codec()), max_size)
        .map_err(|e| anyhow!("bad {version} packet from the peer: {e}"))?
    else {
        return Ok(None);
    };
    Ok(Some(match p {
        Inbound::ConnAck(a) => Incoming::ConnAck(Box::new(ConnAck {
            session_present: a.session_present,
            code: a.code,
            receive_maximum: a.receive_maximum,
            maximum_packet_size: a.max_packet_size,
            assigned_client_id: a.assigned_client_id,
            session_expiry_secs: a.session_expiry,
            server_keep_alive: a.server_keep_alive,
            topic_alias_maximum: a.topic_alias_max,
            maximum_qos: a.max_qos,
            retain_available: a.retain_available,
            reason_string: a.reason_string,
        })),
        Inbound::Publish(p) => Incoming::Publish {
            topic: String::from_utf8(p.topic.to_vec())
                .map_err(|_| anyhow!("PUBLISH topic from the peer is not UTF-8"))?,
            payload: p.payload,
            qos: qos_of(p.qos),
            pkid: p.pkid,
            dup: p.dup,
            retain: p.retain,
        },
        Inbound::PubAck(pkid, reason) => Incoming::PubAck { pkid, reason },
        Inbound::PubRec(pkid, reason) => Incoming::PubRec { pkid, reason },
        Inbound::PubRel(pkid, reason) => Incoming::PubRel { pkid, reason },
        Inbound::PubComp(pkid, reason) => Incoming::PubComp { pkid, reason },
        Inbound::SubAck(pkid, codes) => Incoming::SubAck { pkid, codes },
        Inbound::UnsubAck(pkid, codes) => Incoming::UnsubAck { pkid, codes },
        Inbound::PingResp => Incoming::PingResp,
        Inbound::Disconnect(reason, _, reason_string) => Incoming::Disconnect {
            reason,
            reason_string,
        },
        Inbound::Auth => bail!("the peer sent AUTH, which this client does not support"),
        other => bail!("the peer sent {other:?}, which only clients send"),
    }))
}

fn qos_u8(q: QoS) -> u8 {
    q as u8
}

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

impl Version {
    fn codec(self) -> codec::Version {
        match self {
            Version::V311 => codec::Version::V311,
            Version::V5 => codec::Version::V5,
        }
    }
}

/// Turns a codec refusal into the test's error.
fn encoded(what: &str, r: std::result::Result<(), codec::CodecError>) -> Result<()> {
    r.map_err(|e| anyhow!("cannot encode {what}: {e}"))
}

// ---------------------------------------------------------------------------
// Connection
// ---------------------------------------------------------------------------

/// One MQTT connection over TCP.
///
/// Sending methods only encode into a write buffer; it is written by
/// [`flush`](Self::flush) and, opportunistically, while
/// [`next_packet`](Self::next_packet) waits — so a test can queue a burst and
/// have it leave in few system calls. `next_packet` and `flush` are
/// cancel-safe (nothing is lost if a `select!` or timeout drops them).
pub struct Connection {
    stream: TcpStream,
    version: Version,
    rx: BytesMut,
    tx: BytesMut,
    max_incoming: usize,
    /// The broker's Maximum Packet Size (MQTT 5 CONNACK).
    max_outgoing: Option<usize>,
    /// Why the connection is unusable, once it is. A write error is kept
    /// here rather than returned at once, so packets that arrived before it
    /// (say a DISCONNECT with its reason) are still handed out first.
    broken: Option<String>,
    last_read: Instant,
    last_write: Instant,
}

impl Connection {
    /// TCP connection only, no CONNECT sent: for tests that send a
    /// malformed or early packet. Use [`send_connect`](Self::send_connect)
    /// for the normal handshake.
    pub async fn open(opts: &Options) -> Result<Connection> {
        let stream =
            tokio::time::timeout(opts.connect_timeout, TcpStream::connect(opts.addr.as_str()))
                .await
                .map_err(|_| {
                    anyhow!(
                        "TCP connect to {} timed out after {:?}",
                        opts.addr,
                        opts.connect_timeout
                    )
                })?
                .with_context(|| format!("TCP connect to {}", opts.addr))?;
        // We batch writes ourselves; Nagle would only add latency.
        stream.set_nodelay(true).context("cannot set TCP_NODELAY")?;
        let now = Instant::now();
        Ok(Connection {
            stream,
            version: opts.version,
            rx: BytesMut::with_capacity(READ_CHUNK),
            tx: BytesMut::with_capacity(READ_CHUNK),
            max_incoming: opts.max_packet_size,
            max_outgoing: None,
            broken: None,
            last_read: now,
            last_write: now,
        })
    }

    /// Open, send CONNECT and wait for CONNACK. A refusal is an error
    /// carrying [`ConnectRefused`].
    pub async fn connect(opts: &Options) -> Result<(Connection, ConnAck)> {
        let mut conn = Self::open(opts).await?;
        conn.send_connect(opts)?;
        let ack = match tokio::time::timeout(opts.connect_timeout, conn.next_packet()).await {
            Err(_) => bail!(
                "no CONNACK from {} within {:?}",
                opts.addr,
                opts.connect_timeout
            ),
            Ok(Err(e)) => return Err(e.context(format!("waiting for CONNACK from {}", opts.addr))),
            Ok(Ok(Incoming::ConnAck(a))) => *a,
            Ok(Ok(other)) => bail!("expected CONNACK from {}, got {other:?}", opts.addr),
        };
        if ack.code != 0 {
            return Err(ConnectRefused {
                code: ack.code,
                version: opts.version,
                reason_string: ack.reason_string.clone(),
            }
            .into());
        }
        Ok((conn, ack))
    }

    /// Queue a CONNECT built from `opts`.
    pub fn send_connect(&mut self, opts: &Options) -> Result<()> {
        let has_login = opts.username.is_some() || opts.password.is_some();
        let v5 = opts.version == Version::V5;
        let connect = ConnectOut {
            version: opts.version.codec(),
            client_id: opts.client_id.clone(),
            clean_start: opts.clean_start,
            keep_alive: opts.keep_alive_secs,
            session_expiry: opts.session_expiry_secs.filter(|_| v5),
            receive_maximum: opts.receive_maximum.filter(|_| v5),
            max_packet_size: None,
            username: has_login.then(|| opts.username.clone().unwrap_or_default()),
            password: opts.password.clone(),
            will: opts.will.clone(),
        };
        encoded("CONNECT", codec::encode_connect(&mut self.tx, &connect))
    }

    /// Protocol version of this connection.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Queue a PUBLISH. `pkid` must be non-zero for QoS 1/2 and is ignored
    /// for QoS 0; `dup` is sent as given.
    pub fn publish(
        &mut self,
        topic: &str,
        payload: impl Into<Bytes>,
        qos: QoS,
        pkid: u16,
        dup: bool,
    ) -> Result<()> {
        self.publish_bytes(topic, &payload.into(), qos, pkid, dup)
    }

    fn publish_bytes(
        &mut self,
        topic: &str,
        payload: &Bytes,
        qos: QoS,
        pkid: u16,
        dup: bool,
    ) -> Result<()> {
        if qos != QoS::AtMostOnce && pkid == 0 {
            bail!("PUBLISH at {qos:?} needs a non-zero packet id (send_raw can send a bad one)");
        }
        if topic.len() > usize::from(u16::MAX) {
            bail!("topic of {} bytes is longer than MQTT allows", topic.len());
        }
        let mark = self.tx.len();
        encoded(
            "PUBLISH",
            codec::encode_publish(
                &mut self.tx,
                self.version.codec(),
                topic.as_bytes(),
                payload.clone(),
                qos_u8(qos),
                pkid,
                dup,
                false,
            ),
        )?;
        let size = self.tx.len() - mark;
        if let Err(e) = self.check_outgoing(size) {
            self.tx.truncate(mark);
            return Err(e);
        }
        Ok(())
    }

    fn check_outgoing(&self, size: usize) -> Result<()> {
        match self.max_outgoing {
            Some(max) if size > max => {
                bail!("packet of {size} bytes exceeds the broker's maximum packet size of {max}")
            }
            _ => Ok(()),
        }
    }

    /// Queue a PUBACK (acknowledging a QoS 1 PUBLISH from the broker).
    pub fn puback(&mut self, pkid: u16) -> Result<()> {
        codec::encode_ack(
            &mut self.tx,
            self.version.codec(),
            codec::AckKind::PubAck,
            pkid,
            0,
        );
        Ok(())
    }

    /// Queue a PUBREC (first answer to a QoS 2 PUBLISH from the broker).
    pub fn pubrec(&mut self, pkid: u16) -> Result<()> {
        codec::encode_ack(
            &mut self.tx,
            self.version.codec(),
            codec::AckKind::PubRec,
            pkid,
            0,
        );
        Ok(())
    }

    /// Queue a PUBREL (after the broker's PUBREC for our QoS 2 PUBLISH).
    pub fn pubrel(&mut self, pkid: u16) -> Result<()> {
        codec::encode_pubrel(&mut self.tx, self.version.codec(), pkid);
        Ok(())
    }

    /// Queue a PUBCOMP (after the broker's PUBREL).
    pub fn pubcomp(&mut self, pkid: u16) -> Result<()> {
        codec::encode_ack(
            &mut self.tx,
            self.version.codec(),
            codec::AckKind::PubComp,
            pkid,
            0,
        );
        Ok(())
    }

    /// Queue a SUBSCRIBE for `filters` (filter, maximum QoS).
    pub fn subscribe(&mut self, pkid: u16, filters: &[(&str, QoS)]) -> Result<()> {
        if filters.is_empty() {
            bail!("SUBSCRIBE needs at least one filter");
        }
        let filters: Vec<(String, u8)> = filters
            .iter()
            .map(|(f, q)| ((*f).to_owned(), qos_u8(*q)))
            .collect();
        encoded(
            "SUBSCRIBE",
            codec::encode_subscribe_each(&mut self.tx, self.version.codec(), pkid, &filters),
        )
    }

    /// Queue an UNSUBSCRIBE.
    pub fn unsubscribe(&mut self, pkid: u16, filters: &[&str]) -> Result<()> {
        if filters.is_empty() {
            bail!("UNSUBSCRIBE needs at least one filter");
        }
        let filters: Vec<String> = filters.iter().map(|f| (*f).to_owned()).collect();
        encoded(
            "UNSUBSCRIBE",
            codec::encode_unsubscribe(&mut self.tx, self.version.codec(), pkid, &filters),
        )
    }

    /// Queue a PINGREQ.
    pub fn pingreq(&mut self) -> Result<()> {
        codec::encode_pingreq(&mut self.tx, self.version.codec());
        Ok(())
    }

    /// Queue a DISCONNECT; `reason` is an MQTT 5 reason code (ignored for
    /// 3.1.1, whose DISCONNECT has none). A non-zero reason goes with its
    /// name as Reason String.
    pub fn disconnect(&mut self, reason: u8) -> Result<()> {
        if !codec::encode_disconnect(&mut self.tx, self.version.codec(), reason, None, false) {
            bail!("cannot encode DISCONNECT {reason:#04x}");
        }
        Ok(())
    }

    /// Queue arbitrary bytes, for malformed-packet tests.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.tx.extend_from_slice(bytes);
    }

    /// Write everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        while !self.tx.is_empty() {
            self.pump_once().await?;
        }
        match &self.broken {
            Some(detail) => Err(Closed {
                detail: detail.clone(),
            }
            .into()),
            None => Ok(()),
        }
    }

    /// The next packet from the peer; writes queued packets meanwhile.
    /// Packets that arrived before the connection closed are returned first;
    /// after that the error is [`Closed`] (see [`is_closed`]).
    pub async fn next_packet(&mut self) -> Result<Incoming> {
        loop {
            if let Some(p) = self.decode()? {
                if let Incoming::ConnAck(a) = &p {
                    // Also when the handshake was driven by hand (open + send_connect).
                    self.max_outgoing = a.maximum_packet_size.map(|m| m as usize);
                }
                return Ok(p);
            }
            self.pump_once().await?;
        }
    }

    /// [`next_packet`](Self::next_packet), or `None` if nothing complete
    /// arrives within `limit`.
    pub async fn next_packet_within(&mut self, limit: Duration) -> Result<Option<Incoming>> {
        match tokio::time::timeout(limit, self.next_packet()).await {
            Err(_) => Ok(None),
            Ok(r) => r.map(Some),
        }
    }

    /// Simulate a lost first transmission: write everything queued, then
    /// only the first half of this PUBLISH's bytes, then close the
    /// connection. Returns (bytes sent, full packet length).
    pub async fn publish_cut_and_close(
        mut self,
        topic: &str,
        payload: impl Into<Bytes>,
        qos: QoS,
        pkid: u16,
        dup: bool,
    ) -> Result<(usize, usize)> {
        self.flush().await?;
        self.publish(topic, payload, qos, pkid, dup)?;
        let full = self.tx.len();
        let half = full / 2;
        self.tx.truncate(half);
        self.flush().await?;
        // FIN after half a packet: the peer sees a truncated PUBLISH.
        let _ = self.stream.shutdown().await;
        Ok((half, full))
    }

    /// Write what is queued (for at most a second) and close.
    pub async fn close(mut self) -> Result<()> {
        let flushed = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
        let _ = self.stream.shutdown().await;
        match flushed {
            Err(_) => bail!("could not write the last packets within 1 s"),
            Ok(r) => r,
        }
    }

    fn decode(&mut self) -> Result<Option<Incoming>> {
        decode(self.version, &mut self.rx, self.max_incoming)
    }

    /// Wait until the socket can make progress, then read what is there and
    /// write what fits. The only await is `ready()`, so dropping this future
    /// loses nothing.
    async fn pump_once(&mut self) -> Result<()> {
        if let Some(detail) = &self.broken {
            return Err(Closed {
                detail: detail.clone(),
            }
            .into());
        }
        // Bound what we buffer from the peer; a partial packet is never
        // bigger than max_incoming, so this only pauses reading.
        let want_read = self.rx.len() < self.max_incoming.saturating_add(READ_CHUNK);
        let want_write = !self.tx.is_empty();
        let interest = match (want_read, want_write) {
            (true, true) => Interest::READABLE.add(Interest::WRITABLE),
            (true, false) => Interest::READABLE,
            (false, true) => Interest::WRITABLE,
            (false, false) => bail!(
                "{} bytes received but not consumed: call next_packet",
                self.rx.len()
            ),
        };
        let ready = self
            .stream
            .ready(interest)
            .await
            .context("waiting for the socket")?;
        if want_read && ready.is_readable() {
            self.rx.reserve(READ_CHUNK);
            match self.stream.try_read_buf(&mut self.rx) {
                Ok(0) => {
                    let detail = if self.rx.is_empty() {
                        "the peer closed the connection".to_owned()
                    } else {
                        format!(
                            "the peer closed the connection with {} bytes of an incomplete packet pending",
                            self.rx.len()
                        )
                    };
                    self.broken = Some(detail.clone());
                    return Err(Closed { detail }.into());
                }
                Ok(_) => self.last_read = Instant::now(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    let detail = format!("read failed: {e}");
                    self.broken = Some(detail.clone());
                    return Err(Closed { detail }.into());
                }
            }
        }
        if want_write && ready.is_writable() {
            match self.stream.try_write(&self.tx) {
                Ok(n) => {
                    self.tx.advance(n);
                    self.last_write = Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.broken = Some(format!("write failed: {e}"));
                    self.tx.clear();
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------

/// A flag that stops a [`Publisher`] run early; clone it freely.
#[derive(Clone, Default)]
pub struct Cancel(Arc<CancelInner>);

#[derive(Default)]
struct CancelInner {
    flag: AtomicBool,
    notify: Notify,
}

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask every run using this flag to stop.
    pub fn cancel(&self) {
        self.0.flag.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.flag.load(Ordering::SeqCst)
    }

    /// Completes once [`cancel`](Self::cancel) has been called.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            // Register before checking, so a cancel in between is not missed.
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

// ---------------------------------------------------------------------------
// Publisher
// ---------------------------------------------------------------------------

/// How the publisher picks packet ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdAlloc {
    /// 1, 2, ... 65535, 1, ...: the next id after the last one, skipping
    /// ids still in flight.
    Sequential,
    /// The lowest id not in flight, as some small clients do (ids get
    /// reused quickly, which exercises a broker's or gateway's id reuse).
    LowestFree,
}

/// Packet id allocator; which ids are in use is told by the caller.
struct PkidPool {
    mode: IdAlloc,
    last: u16,
    /// LowestFree: ids >= `fresh` have never been used; freed ones below
    /// it wait in `freed`.
    fresh: u32,
    freed: BinaryHeap<Reverse<u16>>,
}

impl PkidPool {
    fn new(mode: IdAlloc) -> Self {
        Self {
            mode,
            last: 0,
            fresh: 1,
            freed: BinaryHeap::new(),
        }
    }

    fn alloc(&mut self, in_use: impl Fn(u16) -> bool) -> Option<u16> {
        match self.mode {
            IdAlloc::Sequential => {
                let mut id = self.last;
                for _ in 0..u16::MAX {
                    id = if id == u16::MAX { 1 } else { id + 1 };
                    if !in_use(id) {
                        self.last = id;
                        return Some(id);
                    }
                }
                None
            }
            IdAlloc::LowestFree => {
                if let Some(Reverse(id)) = self.freed.pop() {
                    return Some(id);
                }
                let id = u16::try_from(self.fresh).ok()?;
                self.fresh += 1;
                Some(id)
            }
        }
    }

    fn free(&mut self, id: u16) {
        if self.mode == IdAlloc::LowestFree {
            self.freed.push(Reverse(id));
        }
    }
}

/// How a [`Publisher::run`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every message was answered (safe or refused), and for QoS 2 every
    /// PUBCOMP arrived.
    Complete,
    /// Stopped through [`Cancel`].
    Cancelled,
    /// The overall deadline passed first.
    DeadlineExceeded,
    /// Gave up: the broker refused the connection for good, or a message
    /// cannot be encoded.
    Failed(String),
}

/// What a [`Publisher::run`] achieved. Times are offsets from `started`.
#[derive(Debug, Clone)]
pub struct PublishReport {
    pub started: Instant,
    /// Per message index: when PUBACK (QoS 1) or PUBREC (QoS 2) with a
    /// success code arrived; `None` if it never did.
    pub safe_at: Vec<Option<Duration>>,
    /// Messages answered with a failure reason (MQTT 5, >= 0x80), by index.
    pub refused: Vec<(usize, u8)>,
    pub outcome: Outcome,
    /// Successful connections after the first.
    pub reconnects: u32,
    /// Reconnections whose CONNACK said no session was present.
    pub sessions_lost: u32,
    /// Connection attempts that failed (TCP or CONNACK).
    pub failed_connects: u32,
    /// PUBLISHes sent again with DUP=1 after a reconnect.
    pub resent_publishes: u64,
    /// PUBRELs sent again after a reconnect.
    pub resent_pubrels: u64,
    /// Acknowledgements for packet ids not in flight (e.g. a duplicate ack).
    pub unexpected_acks: u64,
    /// Window actually used: the requested one capped by the broker's
    /// Receive Maximum (last connection).
    pub window_used: usize,
    pub first_send: Option<Duration>,
    pub last_ack: Option<Duration>,
    pub elapsed: Duration,
    /// Last connection error, if any (the reason for the last reconnect).
    pub last_error: Option<String>,
}

impl PublishReport {
    pub fn safe_count(&self) -> usize {
        self.safe_at.iter().filter(|s| s.is_some()).count()
    }

    pub fn is_safe(&self, index: usize) -> bool {
        self.safe_at.get(index).is_some_and(Option::is_some)
    }

    /// From the first PUBLISH written to the last acknowledgement.
    pub fn ack_span(&self) -> Option<Duration> {
        Some(self.last_ack?.saturating_sub(self.first_send?))
    }

    /// When the first PUBLISH was written.
    pub fn first_send_at(&self) -> Option<Instant> {
        Some(self.started + self.first_send?)
    }

    /// Safe messages per second over [`ack_span`](Self::ack_span).
    pub fn msgs_per_sec(&self) -> f64 {
        match self.ack_span() {
            Some(d) if !d.is_zero() => self.safe_count() as f64 / d.as_secs_f64(),
            _ => 0.0,
        }
    }

    /// Ok if the run completed and every message is safe; otherwise an error
    /// saying how far it got and why it stopped.
    pub fn ensure_all_safe(&self) -> Result<()> {
        let n = self.safe_at.len();
        let safe = self.safe_count();
        if self.outcome == Outcome::Complete && safe == n {
            return Ok(());
        }
        let mut msg = format!(
            "publisher: {safe}/{n} messages safe, {} refused",
            self.refused.len()
        );
        if let Some((i, code)) = self.refused.first() {
            msg += &format!(" (first: #{i}, reason 0x{code:02X} {})", reason_text(*code));
        }
        msg += &format!(
            "; outcome {:?} after {:?}; {} reconnects, {} failed connects",
            self.outcome, self.elapsed, self.reconnects, self.failed_connects
        );
        if let Some(e) = &self.last_error {
            msg += &format!("; last error: {e}");
        }
        Err(anyhow!(msg))
    }
}

/// Pipelined QoS 1/2 publisher that survives the broker dying.
///
/// Keeps up to `window` messages unacknowledged. On any connection error it
/// reconnects with the same client id and clean start off (retrying with
/// backoff until `deadline`), re-sends every unacknowledged PUBLISH in the
/// original order with DUP=1 and its packet id (and PUBREL for QoS 2
/// messages already PUBREC'd), and continues. On MQTT 5 it asks for a
/// session expiry of 300 s unless `options.session_expiry_secs` is set.
///
/// The first connection uses `options.clean_start` as given.
pub struct Publisher {
    pub options: Options,
    /// QoS 1 or 2.
    pub qos: QoS,
    /// Unacknowledged messages at most (capped by the broker's MQTT 5
    /// Receive Maximum and by 65535).
    pub window: usize,
    pub ids: IdAlloc,
    /// Overall limit for [`run`](Self::run), reconnects included.
    pub deadline: Duration,
    /// First pause after a failed connection attempt (or a connection that
    /// got nothing acknowledged); doubles up to 1 s, resets on progress.
    pub backoff: Duration,
    /// With messages in flight (or a PINGREQ out), nothing received for this
    /// long means the connection is dead: drop it and reconnect. Catches a
    /// hung (e.g. SIGSTOPped) peer that keeps the socket open.
    pub ack_timeout: Duration,
    /// Messages answered so far (safe or refused); readable while running.
    pub progress: Arc<AtomicUsize>,
    pub cancel: Cancel,
}

/// A message's place in the QoS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// PUBLISH sent, waiting for PUBACK/PUBREC.
    Published,
    /// QoS 2: PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug, Clone, Copy)]
struct Flight {
    index: usize,
    stage: Stage,
}

enum PumpEnd {
    Done,
    Cancelled,
    Deadline,
    Fatal(String),
}

struct PubState {
    started: Instant,
    qos: QoS,
    /// In-flight messages by packet id (index 0 unused).
    slots: Vec<Option<Flight>>,
    inflight: usize,
    /// Next message to send for the first time.
    next: usize,
    ids: PkidPool,
    safe_at: Vec<Option<Duration>>,
    refused: Vec<(usize, u8)>,
    settled: usize,
    first_send: Option<Instant>,
    last_ack: Option<Instant>,
    reconnects: u32,
    sessions_lost: u32,
    failed_connects: u32,
    resent_publishes: u64,
    resent_pubrels: u64,
    unexpected_acks: u64,
    ping_out: bool,
    /// Start of the current wait for the broker (for `ack_timeout`).
    waiting_since: Instant,
}

impl PubState {
    fn settle(&mut self, index: usize, reason: u8, progress: &AtomicUsize) {
        let now = Instant::now();
        if reason >= 0x80 {
            self.refused.push((index, reason));
        } else {
            self.safe_at[index] = Some(now - self.started);
        }
        self.settled += 1;
        self.last_ack = Some(now);
        progress.store(self.settled, Ordering::Release);
    }

    fn release(&mut self, pkid: u16) {
        self.slots[usize::from(pkid)] = None;
        self.inflight -= 1;
        self.ids.free(pkid);
    }

    /// React to one packet; queues PUBREL/acks on `conn`.
    fn on_packet(
        &mut self,
        p: Incoming,
        conn: &mut Connection,
        progress: &AtomicUsize,
    ) -> Result<()> {
        match p {
            Incoming::PubAck { pkid, reason } => match self.slots[usize::from(pkid)] {
                Some(Flight {
                    index,
                    stage: Stage::Published,
                }) if self.qos == QoS::AtLeastOnce => {
                    self.settle(index, reason, progress);
                    self.release(pkid);
                }
                _ => self.unexpected_acks += 1,
            },
            Incoming::PubRec { pkid, reason } => match self.slots[usize::from(pkid)] {
                Some(Flight {
                    index,
                    stage: Stage::Published,
                }) if self.qos == QoS::ExactlyOnce => {
                    self.settle(index, reason, progress);
                    if reason >= 0x80 {
                        // A failed PUBREC ends the exchange: no PUBREL.
                        self.release(pkid);
                    } else {
                        self.slots[usize::from(pkid)] = Some(Flight {
                            index,
                            stage: Stage::Released,
                        });
                        conn.pubrel(pkid)?;
                    }
                }
                // PUBREC again (we resent the PUBLISH): it still wants PUBREL.
                Some(Flight {
                    stage: Stage::Released,
                    ..
                }) => conn.pubrel(pkid)?,
                _ => self.unexpected_acks += 1,
            },
            Incoming::PubComp { pkid, .. } => match self.slots[usize::from(pkid)] {
                Some(Flight {
                    stage: Stage::Released,
                    ..
                }) => self.release(pkid),
                _ => self.unexpected_acks += 1,
            },
            Incoming::PingResp => self.ping_out = false,
            // Not expected (we subscribe to nothing) but answered properly so
            // a leftover session cannot wedge the broker's queue.
            Incoming::Publish { qos, pkid, .. } => match qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => conn.puback(pkid)?,
                QoS::ExactlyOnce => conn.pubrec(pkid)?,
            },
            Incoming::PubRel { pkid, .. } => conn.pubcomp(pkid)?,
            Incoming::Disconnect {
                reason,
                reason_string,
            } => bail!(
                "the broker sent DISCONNECT: reason 0x{reason:02X} ({}){}",
                reason_text(reason),
                reason_string.map(|s| format!(": {s}")).unwrap_or_default()
            ),
            Incoming::ConnAck(_) | Incoming::SubAck { .. } | Incoming::UnsubAck { .. } => {
                self.unexpected_acks += 1
            }
        }
        Ok(())
    }

    /// After a reconnect: everything in flight again, in message order.
    fn resend(&mut self, conn: &mut Connection, messages: &[(String, Bytes)]) -> Result<()> {
        let mut flights: Vec<(usize, u16, Stage)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(pkid, f)| {
                let f = f.as_ref()?;
                Some((f.index, u16::try_from(pkid).ok()?, f.stage))
            })
            .collect();
        flights.sort_unstable_by_key(|f| f.0);
        for (index, pkid, stage) in flights {
            match stage {
                Stage::Published => {
                    let (topic, payload) = &messages[index];
                    conn.publish_bytes(topic, payload, self.qos, pkid, true)?;
                    self.resent_publishes += 1;
                }
                Stage::Released => {
                    conn.pubrel(pkid)?;
                    self.resent_pubrels += 1;
                }
            }
        }
        Ok(())
    }
}

impl Publisher {
    /// Window 1000, sequential ids, 120 s deadline, 50 ms backoff, 15 s ack
    /// timeout.
    pub fn new(options: Options, qos: QoS) -> Self {
        Self {
            options,
            qos,
            window: 1000,
            ids: IdAlloc::Sequential,
            deadline: Duration::from_secs(120),
            backoff: Duration::from_millis(50),
            ack_timeout: Duration::from_secs(15),
            progress: Arc::new(AtomicUsize::new(0)),
            cancel: Cancel::new(),
        }
    }

    /// Publish `messages` (topic, payload) in order. Returns `Err` only for
    /// invalid settings: whatever happens on the wire is in the report —
    /// check it with [`PublishReport::ensure_all_safe`].
    pub async fn run(&self, messages: &[(String, Bytes)]) -> Result<PublishReport> {
        if self.qos == QoS::AtMostOnce {
            bail!("Publisher needs QoS 1 or 2: QoS 0 has no acknowledgement to wait for");
        }
        if self.window == 0 {
            bail!("Publisher window must be at least 1");
        }
        let started = Instant::now();
        let deadline = started + self.deadline;
        let mut st = PubState {
            started,
            qos: self.qos,
            slots: vec![None; usize::from(u16::MAX) + 1],
            inflight: 0,
            next: 0,
            ids: PkidPool::new(self.ids),
            safe_at: vec![None; messages.len()],
            refused: Vec::new(),
            settled: 0,
            first_send: None,
            last_ack: None,
            reconnects: 0,
            sessions_lost: 0,
            failed_connects: 0,
            resent_publishes: 0,
            resent_pubrels: 0,
            unexpected_acks: 0,
            ping_out: false,
            waiting_since: started,
        };
        self.progress.store(0, Ordering::Release);
        let mut last_error: Option<String> = None;
        let mut connected_once = false;
        let mut backoff = self.backoff;
        let mut window_used = 0;

        let outcome = loop {
            if self.cancel.is_cancelled() {
                break Outcome::Cancelled;
            }
            if Instant::now() >= deadline {
                break Outcome::DeadlineExceeded;
            }
            let mut opts = self.options.clone();
            if connected_once {
                opts.clean_start = false;
            }
            if opts.version == Version::V5 && opts.session_expiry_secs.is_none() {
                opts.session_expiry_secs = Some(DEFAULT_SESSION_EXPIRY_SECS);
            }
            let attempt = tokio::select! {
                r = Connection::connect(&opts) => r,
                _ = sleep_until(deadline) => break Outcome::DeadlineExceeded,
                _ = self.cancel.cancelled() => break Outcome::Cancelled,
            };
            let (mut conn, ack) = match attempt {
                Ok(c) => c,
                Err(e) => {
                    let text = format!("{e:#}");
                    if let Some(r) = e.downcast_ref::<ConnectRefused>() {
                        if !r.is_transient() {
                            last_error = Some(text.clone());
                            break Outcome::Failed(text);
                        }
                    }
                    tracing::debug!(client = %opts.client_id, "connect failed: {text}");
                    st.failed_connects += 1;
                    last_error = Some(text);
                    tokio::select! {
                        _ = sleep_until(deadline.min(Instant::now() + backoff)) => {}
                        _ = self.cancel.cancelled() => break Outcome::Cancelled,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            if connected_once {
                st.reconnects += 1;
                if !ack.session_present {
                    st.sessions_lost += 1;
                }
                tracing::debug!(
                    client = %opts.client_id,
                    session_present = ack.session_present,
                    in_flight = st.inflight,
                    "reconnected"
                );
            }
            connected_once = true;
            window_used = self
                .window
                .min(
                    ack.receive_maximum
                        .map_or(usize::from(u16::MAX), usize::from),
                )
                .min(usize::from(u16::MAX));
            let keep_alive = Duration::from_secs(u64::from(
                ack.server_keep_alive.unwrap_or(opts.keep_alive_secs),
            ));
            st.ping_out = false;
            st.waiting_since = Instant::now();
            if let Err(e) = st.resend(&mut conn, messages) {
                let text = format!("{e:#}");
                last_error = Some(text.clone());
                break Outcome::Failed(text);
            }
            let settled_before = st.settled;
            match self
                .pump(
                    &mut conn,
                    &mut st,
                    messages,
                    window_used,
                    keep_alive,
                    deadline,
                )
                .await
            {
                Ok(PumpEnd::Done) => {
                    // Polite goodbye; the result is already known.
                    if conn.disconnect(0).is_ok() {
                        let _ = conn.close().await;
                    }
                    break Outcome::Complete;
                }
                Ok(PumpEnd::Cancelled) => break Outcome::Cancelled,
                Ok(PumpEnd::Deadline) => break Outcome::DeadlineExceeded,
                Ok(PumpEnd::Fatal(text)) => {
                    last_error = Some(text.clone());
                    break Outcome::Failed(text);
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    tracing::debug!(client = %opts.client_id, "connection lost: {text}");
                    last_error = Some(text);
                    // A connection that achieved nothing (say the peer accepts
                    // and drops us at once) must not turn into a busy loop.
                    if st.settled > settled_before {
                        backoff = self.backoff;
                    } else {
                        tokio::select! {
                            _ = sleep_until(deadline.min(Instant::now() + backoff)) => {}
                            _ = self.cancel.cancelled() => break Outcome::Cancelled,
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        };

        Ok(PublishReport {
            started,
            safe_at: st.safe_at,
            refused: st.refused,
            outcome,
            reconnects: st.reconnects,
            sessions_lost: st.sessions_lost,
            failed_connects: st.failed_connects,
            resent_publishes: st.resent_publishes,
            resent_pubrels: st.resent_pubrels,
            unexpected_acks: st.unexpected_acks,
            window_used,
            first_send: st.first_send.map(|t| t - started),
            last_ack: st.last_ack.map(|t| t - started),
            elapsed: started.elapsed(),
            last_error,
        })
    }

    /// Drive one connection until everything is settled. `Err` means the
    /// connection failed (reconnect); `Ok` ends the run.
    async fn pump(
        &self,
        conn: &mut Connection,
        st: &mut PubState,
        messages: &[(String, Bytes)],
        window: usize,
        keep_alive: Duration,
        deadline: Instant,
    ) -> Result<PumpEnd> {
        loop {
            while let Some(p) = conn.decode()? {
                st.on_packet(p, conn, &self.progress)?;
            }
            if st.next == messages.len() && st.inflight == 0 {
                return Ok(PumpEnd::Done);
            }
            // Refill as soon as any id is free, even by one message: holding
            // back to send bigger batches stalls against a peer using Nagle
            // (its further acks then wait for our delayed ACK, ~40 ms).
            while st.inflight < window && st.next < messages.len() && conn.tx.len() < TX_HIGH_WATER
            {
                let slots = &st.slots;
                let Some(pkid) = st.ids.alloc(|id| slots[usize::from(id)].is_some()) else {
                    return Ok(PumpEnd::Fatal("no free packet id".into()));
                };
                let index = st.next;
                let (topic, payload) = &messages[index];
                if let Err(e) = conn.publish_bytes(topic, payload, self.qos, pkid, false) {
                    return Ok(PumpEnd::Fatal(format!("message #{index}: {e:#}")));
                }
                if st.inflight == 0 {
                    st.waiting_since = Instant::now();
                }
                st.slots[usize::from(pkid)] = Some(Flight {
                    index,
                    stage: Stage::Published,
                });
                st.inflight += 1;
                st.next += 1;
                st.first_send.get_or_insert_with(Instant::now);
            }

            let now = Instant::now();
            if now >= deadline {
                return Ok(PumpEnd::Deadline);
            }
            if self.cancel.is_cancelled() {
                return Ok(PumpEnd::Cancelled);
            }
            let mut wake = deadline;
            if !keep_alive.is_zero() {
                let ping_at = conn.last_write + keep_alive;
                if now >= ping_at && !st.ping_out {
                    conn.pingreq()?;
                    st.ping_out = true;
                    if st.inflight == 0 {
                        st.waiting_since = now;
                    }
                } else if !st.ping_out {
                    wake = wake.min(ping_at);
                }
            }
            if st.inflight > 0 || st.ping_out {
                let quiet_since = conn.last_read.max(st.waiting_since);
                let stall_at = quiet_since + self.ack_timeout;
                if now >= stall_at {
                    bail!(
                        "nothing from the broker for {:?} with {} messages in flight",
                        self.ack_timeout,
                        st.inflight
                    );
                }
                wake = wake.min(stall_at);
            }
            tokio::select! {
                r = conn.pump_once() => r?,
                _ = sleep_until(wake) => {}
                _ = self.cancel.cancelled() => return Ok(PumpEnd::Cancelled),
            }
        }
    }
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await
}

// ---------------------------------------------------------------------------
// Subscriber
// ---------------------------------------------------------------------------

/// What a [`Subscriber`] received.
#[derive(Debug, Clone, Default)]
pub struct Received {
    /// PUBLISH packets received (duplicates included).
    pub count: usize,
    /// How many of them had DUP=1.
    pub dup_flagged: usize,
    /// (topic, payload) in arrival order, if kept.
    pub messages: Vec<(String, Bytes)>,
    pub first_at: Option<Instant>,
    pub last_at: Option<Instant>,
    /// The timeout passed before `expected` messages arrived.
    pub timed_out: bool,
}

/// One subscription on one connection that counts, acknowledges and
/// optionally keeps what arrives. Does not reconnect.
pub struct Subscriber {
    conn: Connection,
    /// Packets that arrived before the SUBACK (queued for a resumed session).
    early: VecDeque<Incoming>,
    keep_alive: Duration,
    keep_messages: bool,
    linger: Duration,
    received: Arc<AtomicUsize>,
}

impl Subscriber {
    /// Connect and subscribe to `filter` at `qos`; returns once the SUBACK
    /// granted it, so publishing can start.
    pub async fn subscribe(opts: &Options, filter: &str, qos: QoS) -> Result<Subscriber> {
        let (mut conn, ack) = Connection::connect(opts).await?;
        conn.subscribe(1, &[(filter, qos)])?;
        let mut early = VecDeque::new();
        let limit = Instant::now() + opts.connect_timeout;
        loop {
            let left = limit.saturating_duration_since(Instant::now());
            let p = conn
                .next_packet_within(left)
                .await
                .with_context(|| format!("waiting for SUBACK for {filter}"))?
                .ok_or_else(|| {
                    anyhow!("no SUBACK for {filter} within {:?}", opts.connect_timeout)
                })?;
            match p {
                Incoming::SubAck { pkid: 1, codes } => match codes.first() {
                    Some(&c) if c < 0x80 => break,
                    Some(&c) => bail!(
                        "SUBSCRIBE to {filter} refused: reason 0x{c:02X} ({})",
                        reason_text(c)
                    ),
                    None => bail!("SUBACK for {filter} has no reason code"),
                },
                other => early.push_back(other),
            }
        }
        let keep_alive = Duration::from_secs(u64::from(
            ack.server_keep_alive.unwrap_or(opts.keep_alive_secs),
        ));
        Ok(Subscriber {
            conn,
            early,
            keep_alive,
            keep_messages: false,
            linger: Duration::ZERO,
            received: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Keep (topic, payload) of every message, not just count them.
    pub fn keep_messages(mut self, keep: bool) -> Self {
        self.keep_messages = keep;
        self
    }

    /// After `expected` messages, go on listening this long, to catch
    /// extra or duplicate deliveries.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Count of messages received so far, readable while counting.
    pub fn counter(&self) -> Arc<AtomicUsize> {
        self.received.clone()
    }

    /// Receive until `expected` messages (plus the linger time) or until
    /// `timeout` (then `timed_out` is set). A lost connection is an error.
    pub async fn count(mut self, expected: usize, timeout: Duration) -> Result<Received> {
        let deadline = Instant::now() + timeout;
        let mut r = Received::default();
        let mut linger_until: Option<Instant> = None;
        let mut ping_out = false;
        loop {
            loop {
                let p = match self.early.pop_front() {
                    Some(p) => p,
                    None => match self.conn.decode()? {
                        Some(p) => p,
                        None => break,
                    },
                };
                self.on_packet(p, &mut r, &mut ping_out).with_context(|| {
                    format!("subscriber after {} of {expected} messages", r.count)
                })?;
            }
            let now = Instant::now();
            if r.count >= expected {
                let until = *linger_until.get_or_insert(now + self.linger);
                if now >= until {
                    break;
                }
            }
            if now >= deadline {
                r.timed_out = r.count < expected;
                break;
            }
            let mut wake = deadline.min(linger_until.unwrap_or(deadline));
            if !self.keep_alive.is_zero() && !ping_out {
                // Keep alive is about what the broker hears from us.
                let ping_at = self.conn.last_write + self.keep_alive;
                if now >= ping_at {
                    self.conn.pingreq()?;
                    ping_out = true;
                } else {
                    wake = wake.min(ping_at);
                }
            }
            tokio::select! {
                res = self.conn.pump_once() => res.with_context(|| {
                    format!("subscriber connection failed after {} of {expected} messages", r.count)
                })?,
                _ = sleep_until(wake) => {}
            }
        }
        // Deliver the last acks, then leave; a failure here changes nothing
        // that was counted.
        if self.conn.disconnect(0).is_ok() {
            let _ = self.conn.close().await;
        }
        Ok(r)
    }

    fn on_packet(&mut self, p: Incoming, r: &mut Received, ping_out: &mut bool) -> Result<()> {
        match p {
            Incoming::Publish {
                topic,
                payload,
                qos,
                pkid,
                dup,
                ..
            } => {
                let now = Instant::now();
                r.count += 1;
                self.received.store(r.count, Ordering::Release);
                r.dup_flagged += usize::from(dup);
                r.first_at.get_or_insert(now);
                r.last_at = Some(now);
                if self.keep_messages {
                    r.messages.push((topic, payload));
                }
                match qos {
                    QoS::AtMostOnce => {}
                    QoS::AtLeastOnce => self.conn.puback(pkid)?,
                    QoS::ExactlyOnce => self.conn.pubrec(pkid)?,
                }
            }
            Incoming::PubRel { pkid, .. } => self.conn.pubcomp(pkid)?,
            Incoming::PingResp => *ping_out = false,
            Incoming::Disconnect {
                reason,
                reason_string,
            } => bail!(
                "the broker sent DISCONNECT: reason 0x{reason:02X} ({}){}",
                reason_text(reason),
                reason_string.map(|s| format!(": {s}")).unwrap_or_default()
            ),
            _ => {}
        }
        Ok(())
    }
}

/// A [`Subscriber`] counting in a spawned task.
pub struct CountingSubscriber {
    /// Messages received so far.
    pub received: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Result<Received>>,
}

impl CountingSubscriber {
    /// Wait for the count to finish.
    pub async fn finish(self) -> Result<Received> {
        self.task
            .await
            .map_err(|e| anyhow!("subscriber task failed: {e}"))?
    }
}

/// Subscribe (returns once the SUBACK is in, so publishing can start) and
/// count `expected` messages in a spawned task, for at most `timeout`.
pub async fn count_subscriber(
    opts: &Options,
    filter: &str,
    qos: QoS,
    expected: usize,
    timeout: Duration,
    keep_messages: bool,
) -> Result<CountingSubscriber> {
    let sub = Subscriber::subscribe(opts, filter, qos)
        .await?
        .keep_messages(keep_messages);
    let received = sub.counter();
    let task = tokio::spawn(sub.count(expected, timeout));
    Ok(CountingSubscriber { received, task })
}

// ---------------------------------------------------------------------------
// Reference benchmark
// ---------------------------------------------------------------------------

/// About `len` bytes of sensor-reading JSON, unique per `i` (padded with a
/// `pad` field when `len` is longer than the reading itself).
pub fn reference_payload(i: usize, len: usize) -> Bytes {
    let sensor = i % 16;
    let mut s = format!(
        r#"{{"id":"s{sensor}-{i:07}","sensor":"s{sensor}","n":{i},"temp":{:.2},"ts":{}"#,
        10.0 + (i * 7919 % 3000) as f64 / 100.0,
        1_700_000_000_000u64 + i as u64
    );
    let pad_overhead = r#","pad":""}"#.len();
    if s.len() + pad_overhead < len {
        s.push_str(r#","pad":""#);
        let fill = len - s.len() - 2;
        s.extend(std::iter::repeat_n('x', fill));
        s.push('"');
    }
    s.push('}');
    Bytes::from(s)
}

/// Figures of the bare-mosquitto reference run.
#[derive(Debug, Clone)]
pub struct ReferenceFigures {
    pub n: usize,
    pub payload_len: usize,
    pub window: usize,
    /// First PUBLISH written → subscriber has counted all `n`.
    pub elapsed: Duration,
    pub msgs_per_sec: f64,
    /// mosquitto's user+system CPU over the run.
    pub mosquitto_cpu: Duration,
    pub mosquitto_cpu_us_per_msg: f64,
    /// Average cores mosquitto kept busy.
    pub mosquitto_cores: f64,
    pub mosquitto_peak_rss_bytes: u64,
    /// This process (publisher + subscriber) CPU per message.
    pub client_cpu_us_per_msg: f64,
    /// Publisher alone: first PUBLISH → last PUBACK.
    pub publisher_ack_span: Option<Duration>,
}

impl fmt::Display for ReferenceFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "mosquitto reference: {} msgs of {} B at QoS 1, window {}",
            self.n, self.payload_len, self.window
        )?;
        writeln!(
            f,
            "  elapsed (first publish -> all counted): {:.3} s = {:.0} msg/s",
            self.elapsed.as_secs_f64(),
            self.msgs_per_sec
        )?;
        writeln!(
            f,
            "  mosquitto CPU: {:.3} s = {:.2} us/msg ({:.2} cores), peak RSS {:.1} MiB",
            self.mosquitto_cpu.as_secs_f64(),
            self.mosquitto_cpu_us_per_msg,
            self.mosquitto_cores,
            self.mosquitto_peak_rss_bytes as f64 / 1048576.0
        )?;
        write!(
            f,
            "  client CPU (publisher + subscriber): {:.2} us/msg; publisher acks span {:.3} s",
            self.client_cpu_us_per_msg,
            self.publisher_ack_span.unwrap_or_default().as_secs_f64()
        )
    }
}

/// Bare mosquitto → one counting QoS 1 subscriber: start a private mosquitto,
/// subscribe, publish `n` readings of about `payload_len` bytes at QoS 1 with
/// the pipelined publisher (`window` in flight), and measure the time from the
/// first PUBLISH until the subscriber has counted all `n`, and mosquitto's CPU
/// time over that run.
pub async fn mosquitto_reference(
    n: usize,
    payload_len: usize,
    window: usize,
) -> Result<ReferenceFigures> {
    mosquitto_reference_with(
        crate::mosquitto::MosquittoConfig::default(),
        n,
        payload_len,
        window,
    )
    .await
}

/// [`mosquitto_reference`] with a chosen broker configuration (e.g. extra
/// lines such as `set_tcp_nodelay true`).
pub async fn mosquitto_reference_with(
    config: crate::mosquitto::MosquittoConfig,
    n: usize,
    payload_len: usize,
    window: usize,
) -> Result<ReferenceFigures> {
    let broker = crate::mosquitto::Mosquitto::start_with(config)?;
    let pid = broker.pid().context("mosquitto has no pid")?;
    let addr = broker.addr();
    let limit = Duration::from_secs(60) + Duration::from_micros(200 * n as u64);
    let tag = format!("{}-{}", std::process::id(), rand::random::<u32>());

    let sub = count_subscriber(
        &Options::new(&addr, format!("ref-sub-{tag}")),
        "ref/#",
        QoS::AtLeastOnce,
        n,
        limit,
        false,
    )
    .await?;
    let messages: Vec<(String, Bytes)> = (0..n)
        .map(|i| {
            (
                format!("ref/s{}", i % 16),
                reference_payload(i, payload_len),
            )
        })
        .collect();
    let mut publisher = Publisher::new(
        Options::new(&addr, format!("ref-pub-{tag}")),
        QoS::AtLeastOnce,
    );
    publisher.window = window;
    publisher.deadline = limit;

    let broker_before = cpu::sample(pid)?;
    let me_before = cpu::sample_self()?;
    let report = publisher.run(&messages).await?;
    report
        .ensure_all_safe()
        .context("reference publisher did not finish")?;
    let received = sub.finish().await?;
    let broker_after = cpu::sample(pid)?;
    let me_after = cpu::sample_self()?;
    if received.count != n {
        bail!(
            "reference subscriber counted {} of {n} messages (timed out: {})",
            received.count,
            received.timed_out
        );
    }
    let first = report
        .first_send_at()
        .context("publisher recorded no first send")?;
    let last = received
        .last_at
        .context("subscriber recorded no message time")?;
    let elapsed = last.saturating_duration_since(first);
    let mosquitto_cpu = broker_after.cpu_since(&broker_before);
    let client_cpu = me_after.cpu_since(&me_before);
    let per_msg = |d: Duration| d.as_secs_f64() * 1e6 / n.max(1) as f64;
    Ok(ReferenceFigures {
        n,
        payload_len,
        window,
        elapsed,
        msgs_per_sec: n as f64 / elapsed.as_secs_f64().max(1e-9),
        mosquitto_cpu,
        mosquitto_cpu_us_per_msg: per_msg(mosquitto_cpu),
        mosquitto_cores: broker_after.cores_since(&broker_before),
        mosquitto_peak_rss_bytes: broker_after.peak_rss_bytes,
        client_cpu_us_per_msg: per_msg(client_cpu),
        publisher_ack_span: report.ack_span(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_ids_wrap_and_skip_ids_in_use() {
        let mut pool = PkidPool::new(IdAlloc::Sequential);
        let mut used = vec![false; 65536];
        assert_eq!(pool.alloc(|id| used[usize::from(id)]), Some(1));
        pool.last = 65534;
        used[65535] = true;
        used[1] = true;
        // 65535 and 1 are in flight: wrap past both.
        assert_eq!(pool.alloc(|id| used[usize::from(id)]), Some(2));
        assert_eq!(pool.alloc(|id| used[usize::from(id)]), Some(3));
        let all = vec![true; 65536];
        assert_eq!(pool.alloc(|id| all[usize::from(id)]), None);
    }

    #[test]
    fn lowest_free_ids_reuse_the_smallest() {
        let mut pool = PkidPool::new(IdAlloc::LowestFree);
        let ids: Vec<u16> = (0..5).filter_map(|_| pool.alloc(|_| false)).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5]);
        pool.free(4);
        pool.free(2);
        assert_eq!(pool.alloc(|_| false), Some(2));
        assert_eq!(pool.alloc(|_| false), Some(4));
        assert_eq!(pool.alloc(|_| false), Some(6));
    }

    #[test]
    fn decode_waits_for_whole_packets_and_bounds_size() -> Result<()> {
        // pkid 0 at QoS 1 is refused by the encoder, which leaves nothing.
        let mut c = BytesMut::new();
        let r = codec::encode_publish(
            &mut c,
            codec::Version::V311,
            b"a/b",
            Bytes::from_static(&[1]),
            1,
            0,
            false,
            false,
        );
        assert!(r.is_err() && c.is_empty());

        let mut full = BytesMut::new();
        codec::encode_publish(
            &mut full,
            codec::Version::V311,
            b"a/b",
            Bytes::from(vec![7u8; 300]),
            1,
            5,
            true,
            false,
        )
        .map_err(|e| anyhow!("{e}"))?;
        let mut part = BytesMut::from(&full[..100]);
        assert_eq!(decode(Version::V311, &mut part, 1024)?, None);
        assert_eq!(part.len(), 100, "an incomplete packet stays buffered");
        let mut whole = full.clone();
        match decode(Version::V311, &mut whole, 1024)? {
            Some(Incoming::Publish {
                topic,
                pkid: 5,
                dup: true,
                qos: QoS::AtLeastOnce,
                payload,
                ..
            }) => assert_eq!((topic.as_str(), payload.len()), ("a/b", 300)),
            other => panic!("decoded {other:?}"),
        }
        let mut whole = full;
        let err = decode(Version::V311, &mut whole, 100).err();
        assert!(
            format!("{err:?}").contains("maximum packet size"),
            "{err:?}"
        );
        Ok(())
    }

    #[test]
    fn v5_short_disconnect_and_reasoned_disconnect() -> Result<()> {
        let mut rx = BytesMut::from(&[0xE0u8, 0x00, 0xD0, 0x00][..]);
        assert_eq!(
            decode(Version::V5, &mut rx, 1024)?,
            Some(Incoming::Disconnect {
                reason: 0,
                reason_string: None
            })
        );
        assert_eq!(
            decode(Version::V5, &mut rx, 1024)?,
            Some(Incoming::PingResp)
        );
        // What mosquitto sends on session take-over.
        let mut b = BytesMut::from(&[0xE0u8, 0x01, 0x8E][..]);
        assert_eq!(
            decode(Version::V5, &mut b, 1024)?,
            Some(Incoming::Disconnect {
                reason: 0x8E,
                reason_string: None
            })
        );
        // With properties (reason string "bye").
        let mut b =
            BytesMut::from(&[0xE0u8, 0x08, 0x8B, 0x06, 0x1F, 0x00, 0x03, b'b', b'y', b'e'][..]);
        assert_eq!(
            decode(Version::V5, &mut b, 1024)?,
            Some(Incoming::Disconnect {
                reason: 0x8B,
                reason_string: Some("bye".into())
            })
        );
        // Garbage: a reserved packet type.
        let mut junk = BytesMut::from(&[0xF0u8, 0x00][..]);
        assert!(decode(Version::V311, &mut junk, 1024).is_err());
        // A complete frame whose body is cut short is malformed, not "wait".
        let mut short = BytesMut::from(&[0x40u8, 0x01, 0x00][..]);
        assert!(decode(Version::V311, &mut short, 1024).is_err());
        Ok(())
    }

    #[test]
    fn v5_disconnect_encodes_correctly() -> Result<()> {
        let mut b = BytesMut::new();
        let v = codec::Version::V5;
        assert!(codec::encode_disconnect(&mut b, v, 0, None, false));
        assert_eq!(&b[..], &[0xE0, 0x00]);
        assert!(codec::encode_disconnect(&mut b, v, 0x8B, None, false));
        assert_eq!(
            decode(Version::V5, &mut b, 1024)?,
            Some(Incoming::Disconnect {
                reason: 0,
                reason_string: None
            })
        );
        assert_eq!(
            decode(Version::V5, &mut b, 1024)?,
            Some(Incoming::Disconnect {
                reason: 0x8B,
                reason_string: Some("server shutting down".into())
            })
        );
        assert!(b.is_empty(), "stray bytes after DISCONNECT: {b:?}");
        Ok(())
    }

    #[test]
    fn refusal_messages_name_the_reason() {
        let v5 = ConnectRefused {
            code: 0x86,
            version: Version::V5,
            reason_string: None,
        };
        assert_eq!(
            v5.to_string(),
            "CONNACK refused: reason 0x86 (bad user name or password)"
        );
        let v3 = ConnectRefused {
            code: 5,
            version: Version::V311,
            reason_string: None,
        };
        assert_eq!(
            v3.to_string(),
            "CONNACK refused: return code 5 (not authorized)"
        );
        assert!(!v3.is_transient());
        assert!(ConnectRefused {
            code: 0x89,
            version: Version::V5,
            reason_string: None
        }
        .is_transient());
    }

    #[test]
    fn reference_payload_is_json_of_the_asked_length() -> Result<()> {
        for (i, len) in [(0, 100), (123_456, 100), (7, 200), (1, 10)] {
            let p = reference_payload(i, len);
            let v: serde_json::Value = serde_json::from_slice(&p)?;
            assert_eq!(v["n"], i);
            if len >= 100 {
                assert_eq!(p.len(), len, "{}", String::from_utf8_lossy(&p));
            }
        }
        Ok(())
    }

    #[tokio::test]
    async fn cancel_wakes_waiters_and_is_sticky() {
        let c = Cancel::new();
        let c2 = c.clone();
        let waiter = tokio::spawn(async move { c2.cancelled().await });
        tokio::task::yield_now().await;
        c.cancel();
        assert!(tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .is_ok());
        // Already cancelled: returns at once.
        c.cancelled().await;
    }
}
