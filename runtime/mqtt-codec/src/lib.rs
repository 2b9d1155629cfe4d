//! MQTT 3.1.1 and 5 packets, through rumqttc's codec (`mqttbytes`), reduced
//! to what Fogline needs on every side: the edge's native endpoint (server
//! side), the edge's client of an external broker, and the tests' raw-socket
//! client — one codec, so the tests cannot drift from production.
//!
//! No packet is parsed by hand here: framing, limits and fields come from
//! `rumqttc::mqttbytes::v4` and `rumqttc::v5::mqttbytes::v5`. This crate
//! picks the version, normalises the two into one [`Inbound`], and encodes
//! the packets either side sends. Decoding is two steps, header first:
//! [`framing`] reads the fixed header and checks the announced size against
//! the limit before anything more is buffered, then [`decode`] decodes a
//! whole frame. Decoding never panics on hostile input: the codec is called
//! under `catch_unwind`, so a bug in it costs one connection, not the daemon.
//!
//! **Invariant:** this crate knows nothing about sockets, sessions, the
//! pipeline or time.
#![warn(missing_docs)]

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::{Error as V4Error, QoS};
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::Error as V5Error;
use rumqttc::v5::mqttbytes::QoS as QoS5;

/// The MQTT protocol version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    #[default]
    V311,
    /// MQTT 5 (protocol level 5).
    V5,
}

impl Version {
    /// As written in logs and status.
    pub fn name(self) -> &'static str {
        match self {
            Version::V311 => "3.1.1",
            Version::V5 => "5",
        }
    }
}

/// A PUBLISH as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishIn {
    /// Topic name bytes (may be empty when a v5 topic alias is used).
    pub topic: Bytes,
    /// Payload.
    pub payload: Bytes,
    /// 0, 1 or 2.
    pub qos: u8,
    /// Packet identifier (0 at QoS 0).
    pub pkid: u16,
    /// DUP flag: the sender says it may have sent this before.
    pub dup: bool,
    /// RETAIN flag.
    pub retain: bool,
    /// v5 Topic Alias property, if any.
    pub topic_alias: Option<u16>,
}

/// A will message from CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Topic name.
    pub topic: Bytes,
    /// Payload.
    pub payload: Bytes,
    /// 0, 1 or 2.
    pub qos: u8,
    /// v5 Will Delay Interval, seconds (0 for v3.1.1).
    pub delay_secs: u32,
}

/// A CONNECT, normalised across versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectIn {
    /// Protocol version.
    pub version: Version,
    /// Client identifier (may be empty).
    pub client_id: String,
    /// v3 Clean Session / v5 Clean Start.
    pub clean_start: bool,
    /// Keep alive, seconds (0: none).
    pub keep_alive: u16,
    /// Session expiry, seconds: v5 property (absent = 0); for v3.1.1,
    /// `u32::MAX` ("never") when clean session is 0, else 0.
    pub session_expiry: u32,
    /// v5 Receive Maximum the client accepts (we never publish to clients).
    pub receive_maximum: Option<u16>,
    /// v5 Maximum Packet Size the client accepts.
    pub max_packet_size: Option<u32>,
    /// v5 Authentication Method (enhanced auth is not supported).
    pub auth_method: Option<String>,
    /// User name, if given.
    pub username: Option<String>,
    /// Password, if given.
    pub password: Option<String>,
    /// Will message, if any.
    pub will: Option<Will>,
}

/// A CONNACK, normalised (client side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAckIn {
    /// Session present flag.
    pub session_present: bool,
    /// v3 return code or v5 reason code (0 = success).
    pub code: u8,
    /// v5 Receive Maximum of the broker.
    pub receive_maximum: Option<u16>,
    /// v5 Maximum Packet Size of the broker.
    pub max_packet_size: Option<u32>,
    /// v5 Server Keep Alive.
    pub server_keep_alive: Option<u16>,
    /// v5 Reason String.
    pub reason_string: Option<String>,
    /// v5 Assigned Client Identifier.
    pub assigned_client_id: Option<String>,
    /// v5 Session Expiry Interval the broker granted.
    pub session_expiry: Option<u32>,
    /// v5 Topic Alias Maximum.
    pub topic_alias_max: Option<u16>,
    /// v5 Maximum QoS.
    pub max_qos: Option<u8>,
    /// v5 Retain Available.
    pub retain_available: Option<u8>,
}

/// Every packet, normalised across versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// CONNECT (boxed: it is much larger than the rest and rare).
    Connect(Box<ConnectIn>),
    /// CONNACK.
    ConnAck(ConnAckIn),
    /// PUBLISH.
    Publish(PublishIn),
    /// PUBACK with its reason code.
    PubAck(u16, u8),
    /// PUBREC with its reason code.
    PubRec(u16, u8),
    /// PUBREL with its v5 reason code (0 for v3.1.1).
    PubRel(u16, u8),
    /// PUBCOMP with its v5 reason code (0 for v3.1.1).
    PubComp(u16, u8),
    /// SUBSCRIBE: packet id and filters, each with its requested QoS.
    Subscribe(u16, Vec<(String, u8)>),
    /// SUBACK: packet id and one return/reason code per filter.
    SubAck(u16, Vec<u8>),
    /// UNSUBSCRIBE: packet id and the filters.
    Unsubscribe(u16, Vec<String>),
    /// UNSUBACK with its v5 reason codes (none for v3.1.1).
    UnsubAck(u16, Vec<u8>),
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT with its v5 reason code (0 for v3.1.1), v5 session
    /// expiry and v5 Reason String.
    Disconnect(u8, Option<u32>, Option<String>),
    /// v5 AUTH.
    Auth,
}

/// Why bytes could not be decoded into a packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The packet is larger than allowed; nothing of it was buffered.
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    TooLarge {
        /// Remaining length announced by the header.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A CONNECT for a protocol level other than 4 (3.1.1) or 5.
    #[error("unsupported MQTT protocol level {0} (this endpoint speaks 3.1.1 and 5)")]
    UnsupportedLevel(u8),
    /// Anything else the codec refused.
    #[error("malformed {version} packet: {reason}")]
    Malformed {
        /// The version being decoded.
        version: &'static str,
        /// What the codec said.
        reason: String,
    },
}

fn qos_u8(q: QoS) -> u8 {
    q as u8
}

fn qos5_u8(q: QoS5) -> u8 {
    q as u8
}

fn qos5_of(q: u8) -> QoS5 {
    match q {
        0 => QoS5::AtMostOnce,
        1 => QoS5::AtLeastOnce,
        _ => QoS5::ExactlyOnce,
    }
}

fn qos_of(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Runs a codec call, turning a panic inside it into an error.
fn guarded<T>(version: &'static str, f: impl FnOnce() -> T) -> Result<T, CodecError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| CodecError::Malformed {
        version,
        reason: "the codec panicked on this input".into(),
    })
}

fn v4_err(e: V4Error, max: usize) -> CodecError {
    match e {
        V4Error::PayloadSizeLimitExceeded(size) => CodecError::TooLarge { size, max },
        V4Error::InvalidProtocolLevel(l) => CodecError::UnsupportedLevel(l),
        other => CodecError::Malformed {
            version: "MQTT 3.1.1",
            reason: other.to_string(),
        },
    }
}

fn v5_err(e: V5Error, max: usize) -> CodecError {
    match e {
        V5Error::PayloadSizeLimitExceeded { pkt_size, .. } => CodecError::TooLarge {
            size: pkt_size,
            max,
        },
        V5Error::InvalidProtocolLevel(l) => CodecError::UnsupportedLevel(l),
        other => CodecError::Malformed {
            version: "MQTT 5",
            reason: other.to_string(),
        },
    }
}

/// What the fixed header at the front of a buffer announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Not even the fixed header (type byte and remaining length) is whole.
    NeedHeader,
    /// A packet of `len` bytes, fixed header included, within the limit;
    /// whole when the buffer holds at least `len` bytes.
    Packet {
        /// Frame length, fixed header included.
        len: usize,
    },
}

/// Reads the fixed header at the front of `buf` and checks the size it
/// announces against `max_packet` (on the remaining length, as the codec
/// does), before the packet is buffered: a caller knows from the first few
/// bytes how much a packet will hold, and refuses or budgets for it.
pub fn framing(buf: &[u8], max_packet: usize) -> Result<Framing, CodecError> {
    match rumqttc::mqttbytes::check(buf.iter(), max_packet) {
        Ok(h) => Ok(Framing::Packet {
            len: h.frame_length(),
        }),
        Err(V4Error::PayloadSizeLimitExceeded(size)) => Err(CodecError::TooLarge {
            size,
            max: max_packet,
        }),
        Err(V4Error::InsufficientBytes(missing)) => {
            // The codec says "missing bytes" both for a header cut short and
            // for a body: the header is whole once a length byte without its
            // continuation bit has arrived.
            let header_whole = buf
                .get(1..)
                .is_some_and(|rest| rest.iter().take(4).any(|b| b & 0x80 == 0));
            Ok(if header_whole {
                Framing::Packet {
                    len: buf.len().saturating_add(missing),
                }
            } else {
                Framing::NeedHeader
            })
        }
        Err(e) => Err(CodecError::Malformed {
            version: "MQTT",
            reason: e.to_string(),
        }),
    }
}

/// Whether `buf` holds a whole frame: `Ok(false)` means more bytes are
/// needed, and the codec is not called until they are (it consumes a frame
/// before decoding its body, so a body that ends early is malformed, never
/// "wait for more").
fn frame_ready(buf: &[u8], max_packet: usize) -> Result<bool, CodecError> {
    Ok(match framing(buf, max_packet)? {
        Framing::NeedHeader => false,
        Framing::Packet { len } => buf.len() >= len,
    })
}

/// A body that ended before its fields did: the frame is consumed already.
fn truncated(version: &'static str) -> CodecError {
    CodecError::Malformed {
        version,
        reason: "a field runs past the end of its packet".into(),
    }
}

/// Decodes the next packet from `buf`, consuming it. `Ok(None)`: more bytes
/// are needed. `version` is `None` before CONNECT: the first packet is then
/// decoded as whichever version it declares. Nothing beyond `max_packet`
/// bytes is ever accepted, whatever the header claims.
pub fn decode(
    buf: &mut BytesMut,
    version: Option<Version>,
    max_packet: usize,
) -> Result<Option<Inbound>, CodecError> {
    if buf.is_empty() {
        return Ok(None);
    }
    match version {
        Some(Version::V311) => decode_v4(buf, max_packet),
        Some(Version::V5) => decode_v5(buf, max_packet),
        None => {
            // Both codecs frame identically; the CONNECT's protocol level
            // picks the version. Try v5 on a copy so a v3.1.1 CONNECT can be
            // re-read from the untouched buffer (copied only once whole).
            if !frame_ready(buf, max_packet)? {
                return Ok(None);
            }
            let mut probe = buf.clone();
            match decode_v5(&mut probe, max_packet) {
                Ok(Some(p)) => {
                    *buf = probe;
                    Ok(Some(p))
                }
                Ok(None) => Ok(None),
                Err(CodecError::UnsupportedLevel(4)) => decode_v4(buf, max_packet),
                Err(e) => Err(e),
            }
        }
    }
}

fn decode_v4(buf: &mut BytesMut, max: usize) -> Result<Option<Inbound>, CodecError> {
    if !frame_ready(buf, max)? {
        return Ok(None);
    }
    let packet = match guarded("MQTT 3.1.1", || v4::Packet::read(buf, max))? {
        Ok(p) => p,
        Err(V4Error::InsufficientBytes(_)) => return Err(truncated("MQTT 3.1.1")),
        Err(e) => return Err(v4_err(e, max)),
    };
    Ok(Some(match packet {
        v4::Packet::Connect(c) => Inbound::Connect(Box::new(ConnectIn {
            version: Version::V311,
            client_id: c.client_id,
            clean_start: c.clean_session,
            keep_alive: c.keep_alive,
            session_expiry: if c.clean_session { 0 } else { u32::MAX },
            receive_maximum: None,
            max_packet_size: None,
            auth_method: None,
            username: c.login.as_ref().map(|l| l.username.clone()),
            password: c.login.map(|l| l.password),
            will: c.last_will.map(|w| Will {
                topic: Bytes::from(w.topic.into_bytes()),
                payload: w.message,
                qos: qos_u8(w.qos),
                delay_secs: 0,
            }),
        })),
        v4::Packet::ConnAck(a) => Inbound::ConnAck(ConnAckIn {
            session_present: a.session_present,
            code: a.code as u8,
            receive_maximum: None,
            max_packet_size: None,
            server_keep_alive: None,
            reason_string: None,
            assigned_client_id: None,
            session_expiry: None,
            topic_alias_max: None,
            max_qos: None,
            retain_available: None,
        }),
        v4::Packet::Publish(p) => Inbound::Publish(PublishIn {
            topic: Bytes::from(p.topic.into_bytes()),
            payload: p.payload,
            qos: qos_u8(p.qos),
            pkid: p.pkid,
            dup: p.dup,
            retain: p.retain,
            topic_alias: None,
        }),
        v4::Packet::PubAck(a) => Inbound::PubAck(a.pkid, 0),
        v4::Packet::PubRec(a) => Inbound::PubRec(a.pkid, 0),
        v4::Packet::PubRel(a) => Inbound::PubRel(a.pkid, 0),
        v4::Packet::PubComp(a) => Inbound::PubComp(a.pkid, 0),
        v4::Packet::Subscribe(s) => Inbound::Subscribe(
            s.pkid,
            s.filters
                .into_iter()
                .map(|f| (f.path, qos_u8(f.qos)))
                .collect(),
        ),
        v4::Packet::SubAck(s) => Inbound::SubAck(
            s.pkid,
            s.return_codes
                .iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => qos_u8(*q),
                    v4::SubscribeReasonCode::Failure => 0x80,
                })
                .collect(),
        ),
        v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe(u.pkid, u.topics),
        v4::Packet::UnsubAck(u) => Inbound::UnsubAck(u.pkid, Vec::new()),
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::PingResp => Inbound::PingResp,
        v4::Packet::Disconnect => Inbound::Disconnect(0, None, None),
    }))
}

fn decode_v5(buf: &mut BytesMut, max: usize) -> Result<Option<Inbound>, CodecError> {
    // rumqttc 0.25 cannot read an MQTT 5 DISCONNECT of remaining length 0
    // (`E0 00`, what most clients send) or 1 (`E0 01 <reason>`, what
    // mosquitto sends); both are valid (MQTT 5 §3.14.2.1). Only those two
    // exact forms are read here; everything else goes to the codec.
    if buf.first() == Some(&0xE0) {
        match buf.get(1) {
            None => return Ok(None),
            Some(0) => {
                let _ = buf.split_to(2);
                return Ok(Some(Inbound::Disconnect(0, None, None)));
            }
            Some(1) => {
                let Some(&reason) = buf.get(2) else {
                    return Ok(None);
                };
                let _ = buf.split_to(3);
                return Ok(Some(Inbound::Disconnect(reason, None, None)));
            }
            Some(_) => {}
        }
    }
    if !frame_ready(buf, max)? {
        return Ok(None);
    }
    let limit = u32::try_from(max).unwrap_or(u32::MAX);
    let packet = match guarded("MQTT 5", || v5::Packet::read(buf, Some(limit)))? {
        Ok(p) => p,
        Err(V5Error::InsufficientBytes(_)) => return Err(truncated("MQTT 5")),
        Err(e) => return Err(v5_err(e, max)),
    };
    Ok(Some(match packet {
        v5::Packet::Connect(c, will, login) => {
            let props = c.properties.as_ref();
            Inbound::Connect(Box::new(ConnectIn {
                version: Version::V5,
                client_id: c.client_id,
                clean_start: c.clean_start,
                keep_alive: c.keep_alive,
                session_expiry: props.and_then(|p| p.session_expiry_interval).unwrap_or(0),
                receive_maximum: props.and_then(|p| p.receive_maximum),
                max_packet_size: props.and_then(|p| p.max_packet_size),
                auth_method: props.and_then(|p| p.authentication_method.clone()),
                username: login.as_ref().map(|l| l.username.clone()),
                password: login.map(|l| l.password),
                will: will.map(|w| Will {
                    delay_secs: w
                        .properties
                        .as_ref()
                        .and_then(|p| p.delay_interval)
                        .unwrap_or(0),
                    topic: w.topic,
                    payload: w.message,
                    qos: qos5_u8(w.qos),
                }),
            }))
        }
        v5::Packet::ConnAck(a) => {
            let props = a.properties.as_ref();
            Inbound::ConnAck(ConnAckIn {
                session_present: a.session_present,
                code: connack_code_v5(a.code),
                receive_maximum: props.and_then(|p| p.receive_max),
                max_packet_size: props.and_then(|p| p.max_packet_size),
                server_keep_alive: props.and_then(|p| p.server_keep_alive),
                reason_string: props.and_then(|p| p.reason_string.clone()),
                assigned_client_id: props.and_then(|p| p.assigned_client_identifier.clone()),
                session_expiry: props.and_then(|p| p.session_expiry_interval),
                topic_alias_max: props.and_then(|p| p.topic_alias_max),
                max_qos: props.and_then(|p| p.max_qos),
                retain_available: props.and_then(|p| p.retain_available),
            })
        }
        v5::Packet::Publish(p) => Inbound::Publish(PublishIn {
            topic_alias: p.properties.as_ref().and_then(|pp| pp.topic_alias),
            topic: p.topic,
            payload: p.payload,
            qos: qos5_u8(p.qos),
            pkid: p.pkid,
            dup: p.dup,
            retain: p.retain,
        }),
        v5::Packet::PubAck(a) => Inbound::PubAck(a.pkid, puback_code(a.reason)),
        v5::Packet::PubRec(a) => Inbound::PubRec(a.pkid, pubrec_code(a.reason)),
        v5::Packet::PubRel(a) => Inbound::PubRel(
            a.pkid,
            match a.reason {
                v5::PubRelReason::Success => 0,
                v5::PubRelReason::PacketIdentifierNotFound => 0x92,
            },
        ),
        v5::Packet::PubComp(a) => Inbound::PubComp(
            a.pkid,
            match a.reason {
                v5::PubCompReason::Success => 0,
                v5::PubCompReason::PacketIdentifierNotFound => 0x92,
            },
        ),
        v5::Packet::Subscribe(s) => Inbound::Subscribe(
            s.pkid,
            s.filters
                .into_iter()
                .map(|f| (f.path, qos5_u8(f.qos)))
                .collect(),
        ),
        v5::Packet::SubAck(s) => Inbound::SubAck(
            s.pkid,
            s.return_codes.iter().map(|c| suback_code_v5(*c)).collect(),
        ),
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe(u.pkid, u.filters),
        v5::Packet::UnsubAck(u) => Inbound::UnsubAck(
            u.pkid,
            u.reasons.iter().map(|r| unsuback_code_v5(*r)).collect(),
        ),
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::PingResp(_) => Inbound::PingResp,
        v5::Packet::Disconnect(d) => {
            let props = d.properties;
            Inbound::Disconnect(
                disconnect_code(d.reason_code),
                props.as_ref().and_then(|p| p.session_expiry_interval),
                props.and_then(|p| p.reason_string),
            )
        }
        v5::Packet::Auth(_) => Inbound::Auth,
    }))
}

fn connack_code_v5(c: v5::ConnectReturnCode) -> u8 {
    use v5::ConnectReturnCode as C;
    match c {
        C::Success => 0x00,
        C::RefusedProtocolVersion => 0x84,
        C::BadClientId => 0x85,
        C::ServiceUnavailable => 0x88,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::UnsupportedProtocolVersion => 0x84,
        C::ClientIdentifierNotValid => 0x85,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerUnavailable => 0x88,
        C::ServerBusy => 0x89,
        C::Banned => 0x8A,
        C::BadAuthenticationMethod => 0x8C,
        C::TopicNameInvalid => 0x90,
        C::PacketTooLarge => 0x95,
        C::QuotaExceeded => 0x97,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9A,
        C::QoSNotSupported => 0x9B,
        C::UseAnotherServer => 0x9C,
        C::ServerMoved => 0x9D,
        C::ConnectionRateExceeded => 0x9F,
    }
}

fn connack_reason_v5(code: u8) -> v5::ConnectReturnCode {
    use v5::ConnectReturnCode as C;
    match code {
        0x00 => C::Success,
        0x81 => C::MalformedPacket,
        0x82 => C::ProtocolError,
        0x84 => C::UnsupportedProtocolVersion,
        0x85 => C::ClientIdentifierNotValid,
        0x86 => C::BadUserNamePassword,
        0x87 => C::NotAuthorized,
        0x88 => C::ServerUnavailable,
        0x89 => C::ServerBusy,
        0x8C => C::BadAuthenticationMethod,
        0x95 => C::PacketTooLarge,
        0x97 => C::QuotaExceeded,
        _ => C::UnspecifiedError,
    }
}

/// PUBACK and PUBREC reasons are the same list in rumqttc's two enums.
macro_rules! ack_reasons {
    ($code:ident, $reason:ident, $ty:ty) => {
        fn $code(r: $ty) -> u8 {
            use $ty as R;
            match r {
                R::Success => 0x00,
                R::NoMatchingSubscribers => 0x10,
                R::UnspecifiedError => 0x80,
                R::ImplementationSpecificError => 0x83,
                R::NotAuthorized => 0x87,
                R::TopicNameInvalid => 0x90,
                R::PacketIdentifierInUse => 0x91,
                R::QuotaExceeded => 0x97,
                R::PayloadFormatInvalid => 0x99,
            }
        }

        fn $reason(code: u8) -> $ty {
            use $ty as R;
            match code {
                0x00 => R::Success,
                0x10 => R::NoMatchingSubscribers,
                0x83 => R::ImplementationSpecificError,
                0x87 => R::NotAuthorized,
                0x90 => R::TopicNameInvalid,
                0x91 => R::PacketIdentifierInUse,
                0x97 => R::QuotaExceeded,
                0x99 => R::PayloadFormatInvalid,
                _ => R::UnspecifiedError,
            }
        }
    };
}

ack_reasons!(puback_code, puback_reason, v5::PubAckReason);
ack_reasons!(pubrec_code, pubrec_reason, v5::PubRecReason);

fn suback_code_v5(c: v5::SubscribeReasonCode) -> u8 {
    use v5::SubscribeReasonCode as S;
    match c {
        S::Success(q) => qos5_u8(q),
        S::Failure | S::Unspecified => 0x80,
        S::ImplementationSpecific => 0x83,
        S::NotAuthorized => 0x87,
        S::TopicFilterInvalid => 0x8F,
        S::PkidInUse => 0x91,
        S::QuotaExceeded => 0x97,
        S::SharedSubscriptionsNotSupported => 0x9E,
        S::SubscriptionIdNotSupported => 0xA1,
        S::WildcardSubscriptionsNotSupported => 0xA2,
    }
}

fn unsuback_code_v5(r: v5::UnsubAckReason) -> u8 {
    use v5::UnsubAckReason as U;
    match r {
        U::Success => 0x00,
        U::NoSubscriptionExisted => 0x11,
        U::UnspecifiedError => 0x80,
        U::ImplementationSpecificError => 0x83,
        U::NotAuthorized => 0x87,
        U::TopicFilterInvalid => 0x8F,
        U::PacketIdentifierInUse => 0x91,
    }
}

fn disconnect_code(c: v5::DisconnectReasonCode) -> u8 {
    c as u8
}

fn disconnect_reason(code: u8) -> v5::DisconnectReasonCode {
    v5::DisconnectReasonCode::try_from(code).unwrap_or(v5::DisconnectReasonCode::UnspecifiedError)
}

/// Acknowledgement packets ingest sends once a message is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// QoS 1.
    PubAck,
    /// QoS 2, first step.
    PubRec,
    /// QoS 2, after PUBREL.
    PubComp,
}

/// Encodes an acknowledgement. `reason` is only carried by MQTT 5 (≥ 0x80
/// refuses the message); MQTT 3.1.1 acks carry none.
pub fn encode_ack(buf: &mut BytesMut, version: Version, kind: AckKind, pkid: u16, reason: u8) {
    // Encoding into a BytesMut cannot fail for these fixed-size packets.
    let _ = match (version, kind) {
        (Version::V311, AckKind::PubAck) => v4::PubAck::new(pkid).write(buf).map_err(drop),
        (Version::V311, AckKind::PubRec) => v4::PubRec::new(pkid).write(buf).map_err(drop),
        (Version::V311, AckKind::PubComp) => v4::PubComp::new(pkid).write(buf).map_err(drop),
        (Version::V5, AckKind::PubAck) => v5::PubAck {
            pkid,
            reason: puback_reason(reason),
            properties: None,
        }
        .write(buf)
        .map_err(drop),
        (Version::V5, AckKind::PubRec) => v5::PubRec {
            pkid,
            reason: pubrec_reason(reason),
            properties: None,
        }
        .write(buf)
        .map_err(drop),
        (Version::V5, AckKind::PubComp) => v5::PubComp {
            pkid,
            reason: if reason == 0x92 {
                v5::PubCompReason::PacketIdentifierNotFound
            } else {
                v5::PubCompReason::Success
            },
            properties: None,
        }
        .write(buf)
        .map_err(drop),
    };
}

/// What the endpoint tells a client in CONNACK.
#[derive(Debug, Clone, Default)]
pub struct ConnAckOut {
    /// Session present flag.
    pub session_present: bool,
    /// v5 reason code (0 = accepted). For 3.1.1 it is mapped to the nearest
    /// return code.
    pub code: u8,
    /// v5 properties (ignored for 3.1.1).
    pub receive_maximum: Option<u16>,
    /// v5 Maximum Packet Size.
    pub max_packet_size: Option<u32>,
    /// v5 Server Keep Alive (when we lower the client's).
    pub server_keep_alive: Option<u16>,
    /// v5 Session Expiry Interval (when we lower the client's).
    pub session_expiry: Option<u32>,
    /// v5 Assigned Client Identifier.
    pub assigned_client_id: Option<String>,
    /// v5 Reason String.
    pub reason_string: Option<String>,
}

/// The 3.1.1 return code closest to a v5 CONNACK reason code.
fn v3_connack_code(code: u8) -> v4::ConnectReturnCode {
    use v4::ConnectReturnCode as C;
    match code {
        0x00 => C::Success,
        0x84 => C::RefusedProtocolVersion,
        0x85 => C::BadClientId,
        0x86 => C::BadUserNamePassword,
        0x87 | 0x8C => C::NotAuthorized,
        _ => C::ServiceUnavailable,
    }
}

/// Encodes a CONNACK.
pub fn encode_connack(buf: &mut BytesMut, version: Version, c: &ConnAckOut) {
    let _ = match version {
        Version::V311 => v4::ConnAck::new(v3_connack_code(c.code), c.session_present)
            .write(buf)
            .map_err(drop),
        Version::V5 => {
            let accepted = c.code == 0;
            v5::ConnAck {
                session_present: c.session_present,
                code: connack_reason_v5(c.code),
                properties: Some(v5::ConnAckProperties {
                    session_expiry_interval: c.session_expiry,
                    receive_max: if accepted { c.receive_maximum } else { None },
                    max_qos: None,
                    retain_available: None,
                    max_packet_size: if accepted { c.max_packet_size } else { None },
                    assigned_client_identifier: c.assigned_client_id.clone(),
                    // Topic aliases are not supported: 0 tells clients not to use them.
                    topic_alias_max: Some(0),
                    reason_string: c.reason_string.clone(),
                    user_properties: Vec::new(),
                    wildcard_subscription_available: Some(0),
                    subscription_identifiers_available: Some(0),
                    shared_subscription_available: Some(0),
                    server_keep_alive: c.server_keep_alive,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                }),
            }
            .write(buf)
            .map_err(drop)
        }
    };
}

/// Encodes a SUBACK: per filter, the QoS granted (`Some`) or refused as
/// not authorized (`None`); v5 carries `reason` when any is refused.
pub fn encode_suback(
    buf: &mut BytesMut,
    version: Version,
    pkid: u16,
    granted: &[Option<u8>],
    reason: Option<&str>,
) {
    let _ = match version {
        Version::V311 => v4::SubAck::new(
            pkid,
            granted
                .iter()
                .map(|g| match g {
                    Some(q) => v4::SubscribeReasonCode::Success(qos_of(*q)),
                    None => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )
        .write(buf),
        Version::V5 => v5::SubAck {
            pkid,
            return_codes: granted
                .iter()
                .map(|g| match g {
                    Some(q) => v5::SubscribeReasonCode::Success(qos5_of(*q)),
                    None => v5::SubscribeReasonCode::NotAuthorized,
                })
                .collect(),
            properties: reason.map(|r| v5::SubAckProperties {
                reason_string: Some(r.to_string()),
                user_properties: Vec::new(),
            }),
        }
        .write(buf)
        .map_err(|_| V4Error::PayloadTooLong),
    };
}

/// Encodes an UNSUBACK ("no subscription existed" for v5).
pub fn encode_unsuback(buf: &mut BytesMut, version: Version, pkid: u16, filters: usize) {
    let _ = match version {
        Version::V311 => v4::UnsubAck::new(pkid).write(buf).map_err(drop),
        Version::V5 => v5::UnsubAck {
            pkid,
            reasons: vec![v5::UnsubAckReason::NoSubscriptionExisted; filters.max(1)],
            properties: None,
        }
        .write(buf)
        .map_err(drop),
    };
}

/// Encodes a PINGRESP.
pub fn encode_pingresp(buf: &mut BytesMut, version: Version) {
    let _ = match version {
        Version::V311 => v4::PingResp.write(buf).map_err(drop),
        Version::V5 => v5::PingResp::write(buf).map_err(drop),
    };
}

/// Encodes a PINGREQ (client side).
pub fn encode_pingreq(buf: &mut BytesMut, version: Version) {
    let _ = match version {
        Version::V311 => v4::PingReq.write(buf).map_err(drop),
        Version::V5 => v5::PingReq::write(buf).map_err(drop),
    };
}

/// Encodes a DISCONNECT. MQTT 3.1.1 servers send none: returns false then.
pub fn encode_disconnect(
    buf: &mut BytesMut,
    version: Version,
    reason: u8,
    reason_string: Option<&str>,
    server: bool,
) -> bool {
    match version {
        Version::V311 if server => false,
        Version::V311 => v4::Disconnect.write(buf).is_ok(),
        // rumqttc 0.25 mis-encodes a reason code without properties (a stray
        // byte) and with empty ones (it sends `E0 00`): give every non-normal
        // DISCONNECT a reason string.
        Version::V5 => v5::Disconnect {
            reason_code: disconnect_reason(reason),
            properties: (reason != 0 || reason_string.is_some()).then(|| {
                v5::DisconnectProperties {
                    session_expiry_interval: None,
                    reason_string: Some(reason_string.unwrap_or(reason_name(reason)).to_string()),
                    user_properties: Vec::new(),
                    server_reference: None,
                }
            }),
        }
        .write(buf)
        .is_ok(),
    }
}

/// What a client puts in its CONNECT.
#[derive(Debug, Clone, Default)]
pub struct ConnectOut {
    /// Version to speak.
    pub version: Version,
    /// Client id.
    pub client_id: String,
    /// Clean start / clean session.
    pub clean_start: bool,
    /// Keep alive, seconds.
    pub keep_alive: u16,
    /// v5 session expiry, seconds (`None`: no property, the session ends
    /// with the connection).
    pub session_expiry: Option<u32>,
    /// v5 receive maximum: how many QoS 1/2 deliveries the broker may have in flight to us.
    pub receive_maximum: Option<u16>,
    /// v5 maximum packet size we accept.
    pub max_packet_size: Option<u32>,
    /// Credentials (a login is sent when a user name is given).
    pub username: Option<String>,
    /// Credentials.
    pub password: Option<String>,
    /// Will message (v5: with its Will Delay Interval when non-zero).
    pub will: Option<Will>,
}

impl ConnectOut {
    /// Clean start, no keep alive, no properties, no login, no will.
    pub fn new(version: Version, client_id: impl Into<String>) -> Self {
        Self {
            version,
            client_id: client_id.into(),
            clean_start: true,
            ..Self::default()
        }
    }
}

/// Encodes a CONNECT (client side).
pub fn encode_connect(buf: &mut BytesMut, c: &ConnectOut) -> Result<(), CodecError> {
    let malformed = |e: String| CodecError::Malformed {
        version: c.version.name(),
        reason: e,
    };
    match c.version {
        Version::V311 => {
            let mut connect = v4::Connect::new(c.client_id.clone());
            connect.keep_alive = c.keep_alive;
            connect.clean_session = c.clean_start;
            if let Some(u) = &c.username {
                connect.set_login(u.clone(), c.password.clone().unwrap_or_default());
            }
            connect.last_will = c.will.as_ref().map(|w| v4::LastWill {
                topic: String::from_utf8_lossy(&w.topic).into_owned(),
                message: w.payload.clone(),
                qos: qos_of(w.qos),
                retain: false,
            });
            connect.write(buf).map_err(|e| malformed(e.to_string()))?;
        }
        Version::V5 => {
            let connect = v5::Connect {
                keep_alive: c.keep_alive,
                client_id: c.client_id.clone(),
                clean_start: c.clean_start,
                properties: Some(v5::ConnectProperties {
                    session_expiry_interval: c.session_expiry,
                    receive_maximum: c.receive_maximum,
                    max_packet_size: c.max_packet_size,
                    topic_alias_max: None,
                    request_response_info: None,
                    request_problem_info: None,
                    user_properties: Vec::new(),
                    authentication_method: None,
                    authentication_data: None,
                }),
            };
            let login = c.username.as_ref().map(|u| v5::Login {
                username: u.clone(),
                password: c.password.clone().unwrap_or_default(),
            });
            let will = c.will.as_ref().map(|w| v5::LastWill {
                topic: w.topic.clone(),
                message: w.payload.clone(),
                qos: qos5_of(w.qos),
                retain: false,
                properties: (w.delay_secs > 0).then(|| v5::LastWillProperties {
                    delay_interval: Some(w.delay_secs),
                    payload_format_indicator: None,
                    message_expiry_interval: None,
                    content_type: None,
                    response_topic: None,
                    correlation_data: None,
                    user_properties: Vec::new(),
                }),
            });
            connect
                .write(&will, &login, buf)
                .map_err(|e| malformed(e.to_string()))?;
        }
    }
    Ok(())
}

/// Encodes a PUBLISH (a client's, or the endpoint's to local subscribers). QoS 1/2
/// need a non-zero `pkid`; at QoS 0 it is ignored.
#[allow(clippy::too_many_arguments)]
pub fn encode_publish(
    buf: &mut BytesMut,
    version: Version,
    topic: &[u8],
    payload: Bytes,
    qos: u8,
    pkid: u16,
    dup: bool,
    retain: bool,
) -> Result<(), CodecError> {
    let malformed = |e: String| CodecError::Malformed {
        version: version.name(),
        reason: e,
    };
    let pkid = if qos == 0 { 0 } else { pkid };
    let mark = buf.len();
    let r = match version {
        Version::V311 => v4::Publish {
            dup,
            qos: qos_of(qos),
            retain,
            topic: String::from_utf8(topic.to_vec())
                .map_err(|_| malformed("MQTT 3.1.1 topics are UTF-8".into()))?,
            pkid,
            payload,
        }
        .write(buf)
        .map(drop)
        .map_err(|e| malformed(e.to_string())),
        Version::V5 => v5::Publish {
            dup,
            qos: qos5_of(qos),
            retain,
            topic: Bytes::copy_from_slice(topic),
            pkid,
            payload,
            properties: None,
        }
        .write(buf)
        .map(drop)
        .map_err(|e| malformed(e.to_string())),
    };
    if r.is_err() {
        // Some encoders fail half-way (packet id 0): leave nothing behind.
        buf.truncate(mark);
    }
    r
}

/// Encodes a PUBREL (the sender's answer to a PUBREC).
pub fn encode_pubrel(buf: &mut BytesMut, version: Version, pkid: u16) {
    let _ = match version {
        Version::V311 => v4::PubRel::new(pkid).write(buf).map_err(drop),
        Version::V5 => v5::PubRel::new(pkid, None).write(buf).map_err(drop),
    };
}

/// Encodes a SUBSCRIBE of `filters`, each at its own maximum QoS.
pub fn encode_subscribe_each(
    buf: &mut BytesMut,
    version: Version,
    pkid: u16,
    filters: &[(String, u8)],
) -> Result<(), CodecError> {
    let malformed = |e: String| CodecError::Malformed {
        version: version.name(),
        reason: e,
    };
    match version {
        Version::V311 => {
            let mut s = v4::Subscribe::new_many(
                filters
                    .iter()
                    .map(|(f, q)| v4::SubscribeFilter::new(f.clone(), qos_of(*q))),
            );
            s.pkid = pkid;
            s.write(buf).map_err(|e| malformed(e.to_string()))?;
        }
        Version::V5 => {
            let mut s = v5::Subscribe::new_many(
                filters
                    .iter()
                    .map(|(f, q)| v5::Filter::new(f.clone(), qos5_of(*q))),
                None,
            );
            s.pkid = pkid;
            s.write(buf).map_err(|e| malformed(e.to_string()))?;
        }
    }
    Ok(())
}

/// Encodes a SUBSCRIBE of `filters`, each at `qos`.
pub fn encode_subscribe(
    buf: &mut BytesMut,
    version: Version,
    pkid: u16,
    filters: &[String],
    qos: u8,
) -> Result<(), CodecError> {
    let malformed = |e: String| CodecError::Malformed {
        version: version.name(),
        reason: e,
    };
    match version {
        Version::V311 => {
            let mut s = v4::Subscribe::new_many(
                filters
                    .iter()
                    .map(|f| v4::SubscribeFilter::new(f.clone(), qos_of(qos))),
            );
            s.pkid = pkid;
            s.write(buf).map_err(|e| malformed(e.to_string()))?;
        }
        Version::V5 => {
            let mut s = v5::Subscribe::new_many(
                filters
                    .iter()
                    .map(|f| v5::Filter::new(f.clone(), qos5_of(qos))),
                None,
            );
            s.pkid = pkid;
            s.write(buf).map_err(|e| malformed(e.to_string()))?;
        }
    }
    Ok(())
}

/// Encodes an UNSUBSCRIBE of `filters`.
pub fn encode_unsubscribe(
    buf: &mut BytesMut,
    version: Version,
    pkid: u16,
    filters: &[String],
) -> Result<(), CodecError> {
    let malformed = |e: String| CodecError::Malformed {
        version: version.name(),
        reason: e,
    };
    match version {
        Version::V311 => {
            let u = v4::Unsubscribe {
                pkid,
                topics: filters.to_vec(),
            };
            u.write(buf).map_err(|e| malformed(e.to_string()))?;
        }
        Version::V5 => {
            let u = v5::Unsubscribe {
                pkid,
                filters: filters.to_vec(),
                properties: None,
            };
            u.write(buf).map_err(|e| malformed(e.to_string()))?;
        }
    }
    Ok(())
}

/// The meaning of a v5 reason code / v3 return code, for error messages.
pub fn reason_name(code: u8) -> &'static str {
    match code {
        0x00 => "success",
        0x01 => "unacceptable protocol version (3.1.1) / granted QoS 1",
        0x02 => "identifier rejected (3.1.1) / granted QoS 2",
        0x03 => "server unavailable (3.1.1)",
        0x04 => "bad user name or password (3.1.1) / disconnect with will message",
        0x05 => "not authorized (3.1.1)",
        0x10 => "no matching subscribers",
        0x11 => "no subscription existed",
        0x18 => "continue authentication",
        0x19 => "re-authenticate",
        0x80 => "unspecified error",
        0x81 => "malformed packet",
        0x82 => "protocol error",
        0x83 => "implementation specific error",
        0x84 => "unsupported protocol version",
        0x85 => "client identifier not valid",
        0x86 => "bad user name or password",
        0x87 => "not authorized",
        0x88 => "server unavailable",
        0x89 => "server busy",
        0x8A => "banned",
        0x8B => "server shutting down",
        0x8C => "bad authentication method",
        0x8D => "keep alive timeout",
        0x8E => "session taken over",
        0x8F => "topic filter invalid",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x92 => "packet identifier not found",
        0x93 => "receive maximum exceeded",
        0x94 => "topic alias invalid",
        0x95 => "packet too large",
        0x96 => "message rate too high",
        0x97 => "quota exceeded",
        0x98 => "administrative action",
        0x99 => "payload format invalid",
        0x9A => "retain not supported",
        0x9B => "QoS not supported",
        0x9C => "use another server",
        0x9D => "server moved",
        0x9E => "shared subscriptions not supported",
        0x9F => "connection rate exceeded",
        0xA0 => "maximum connect time",
        0xA1 => "subscription identifiers not supported",
        0xA2 => "wildcard subscriptions not supported",
        _ => "unknown reason",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn v4_publish(topic: &str, payload: &[u8], qos: QoS, pkid: u16, dup: bool) -> BytesMut {
        let mut p = v4::Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        p.dup = dup;
        let mut b = BytesMut::new();
        p.write(&mut b).unwrap();
        b
    }

    #[test]
    fn connect_picks_the_version_it_declares() {
        for version in [Version::V311, Version::V5] {
            let mut b = BytesMut::new();
            encode_connect(
                &mut b,
                &ConnectOut {
                    version,
                    client_id: "c1".into(),
                    clean_start: false,
                    keep_alive: 30,
                    session_expiry: Some(60),
                    receive_maximum: Some(100),
                    max_packet_size: Some(1 << 20),
                    username: Some("u".into()),
                    password: Some("p".into()),
                    will: None,
                },
            )
            .unwrap();
            let Some(Inbound::Connect(c)) = decode(&mut b, None, 1 << 20).unwrap() else {
                panic!("not a connect");
            };
            assert_eq!(c.version, version);
            assert_eq!(c.client_id, "c1");
            assert!(!c.clean_start);
            assert_eq!(c.username.as_deref(), Some("u"));
            assert_eq!(c.password.as_deref(), Some("p"));
            assert!(b.is_empty());
        }
    }

    #[test]
    fn partial_packets_wait_for_more_bytes() {
        let full = v4_publish("a/b", b"hello", QoS::AtLeastOnce, 7, true);
        let mut b = BytesMut::from(&full[..full.len() - 2]);
        assert_eq!(decode(&mut b, Some(Version::V311), 1024).unwrap(), None);
        b.extend_from_slice(&full[full.len() - 2..]);
        let Some(Inbound::Publish(p)) = decode(&mut b, Some(Version::V311), 1024).unwrap() else {
            panic!()
        };
        assert_eq!((p.pkid, p.dup, p.qos), (7, true, 1));
        assert_eq!(&p.topic[..], b"a/b");
        assert_eq!(&p.payload[..], b"hello");
    }

    #[test]
    fn oversized_packets_are_refused_from_the_header_alone() {
        let full = v4_publish("a", &[0u8; 5000], QoS::AtMostOnce, 0, false);
        // Only the fixed header has arrived: the size is known, nothing is buffered.
        let mut b = BytesMut::from(&full[..4]);
        let e = decode(&mut b, Some(Version::V311), 1024).unwrap_err();
        assert!(matches!(e, CodecError::TooLarge { max: 1024, .. }), "{e}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &[0x10u8, 0x02, 0x00, 0x04][..],
            &[0xF0, 0x00],
            &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
            &[
                0x10, 0x0A, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x03, 0x02, 0x00, 0x3C,
            ],
        ] {
            let mut b = BytesMut::from(bytes);
            let _ = decode(&mut b, None, 1 << 20);
            let mut b = BytesMut::from(bytes);
            let _ = decode(&mut b, Some(Version::V5), 1 << 20);
        }
    }

    #[test]
    fn acks_round_trip_through_the_codec() {
        for version in [Version::V311, Version::V5] {
            let mut b = BytesMut::new();
            encode_ack(&mut b, version, AckKind::PubAck, 9, 0);
            encode_ack(&mut b, version, AckKind::PubRec, 10, 0);
            encode_ack(&mut b, version, AckKind::PubComp, 11, 0);
            assert_eq!(
                decode(&mut b, Some(version), 64).unwrap(),
                Some(Inbound::PubAck(9, 0))
            );
            assert_eq!(
                decode(&mut b, Some(version), 64).unwrap(),
                Some(Inbound::PubRec(10, 0))
            );
            assert_eq!(
                decode(&mut b, Some(version), 64).unwrap(),
                Some(Inbound::PubComp(11, 0))
            );
        }
        let mut b = BytesMut::new();
        encode_ack(&mut b, Version::V5, AckKind::PubAck, 3, 0x97);
        assert_eq!(
            decode(&mut b, Some(Version::V5), 64).unwrap(),
            Some(Inbound::PubAck(3, 0x97))
        );
    }

    #[test]
    fn short_mqtt5_disconnects_decode_and_ours_are_well_formed() {
        let mut b = BytesMut::from(&[0xE0u8, 0x00, 0xE0, 0x01, 0x95][..]);
        assert_eq!(
            decode(&mut b, Some(Version::V5), 64).unwrap(),
            Some(Inbound::Disconnect(0, None, None))
        );
        assert_eq!(
            decode(&mut b, Some(Version::V5), 64).unwrap(),
            Some(Inbound::Disconnect(0x95, None, None))
        );
        for (reason, text) in [(0x8E, Some("taken over")), (0x8B, None), (0x00, None)] {
            let mut b = BytesMut::new();
            assert!(encode_disconnect(&mut b, Version::V5, reason, text, true));
            let Some(Inbound::Disconnect(code, None, text_in)) =
                decode(&mut b, Some(Version::V5), 64).unwrap()
            else {
                panic!("not a DISCONNECT");
            };
            assert_eq!(code, reason);
            assert_eq!(
                text_in.as_deref(),
                (reason != 0).then(|| text.unwrap_or(reason_name(reason)))
            );
            assert!(b.is_empty(), "no stray bytes after DISCONNECT {reason:#x}");
        }
    }

    proptest::proptest! {
        /// Whatever a peer sends: no panic, no packet larger than the
        /// limit, and decoding only consumes what it was given.
        #[test]
        fn hostile_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            v in 0u8..3,
        ) {
            let version = match v { 0 => None, 1 => Some(Version::V311), _ => Some(Version::V5) };
            let mut b = BytesMut::from(&bytes[..]);
            for _ in 0..8 {
                let before = b.len();
                match decode(&mut b, version, 256) {
                    Ok(Some(_)) => proptest::prop_assert!(before - b.len() <= 256 + 5),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
