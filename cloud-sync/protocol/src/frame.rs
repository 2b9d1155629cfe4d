//! Frames on the control stream and their length-prefixed codec.
//!
//! Wire format of one frame:
//!
//! ```text
//! frame   := len:u32-LE  type:u8  body          (len counts type + body, ≤ MAX_FRAME_BYTES)
//! Hello   (0x01) := protocol_version:varint  agent:str  incarnation:varint  next_seq:varint  acked:varint
//!                   epoch:varint  epoch_start:varint
//! Welcome (0x02) := node_id:str  cursor:varint  incarnation:varint (0: none recorded)  epoch:varint
//!                   [top:varint]                                  (to v4 nodes)
//!                   [version:varint]                              (to v5 nodes: the aggregator's)
//! Batch   (0x03) := first_seq:varint  last_seq:varint  record_count:varint  raw_len:varint
//!                   codec:u8 (v3; v2 has none and means zstd)  floor:varint (v4)  block:rest
//! Ack     (0x04) := up_to:varint  [applied:varint]                (to v4 nodes)
//! Error   (0x05) := code:varint  message:str
//! Ping    (0x06) := nonce:varint                                  (v3)
//! Pong    (0x07) := nonce:varint                                  (v3)
//! Status  (0x08) := json:rest (≤ 64 KiB, see `status.rs`)         (v5, node → aggregator,
//!                                                                  only to a v5 aggregator)
//! Deploy  (0x09) := rollout:varint  function:str  action:u8       (v6, aggregator → node,
//!                   [signature:str  module:rest]  (action 1 only)  only to a v6 node;
//!                   action 1: install, 2: revert                   see `deploy.rs`)
//! str     := len:varint  utf8-bytes
//! ```
//!
//! The layout of every frame but `Batch` is the same in versions 2 to 4;
//! a receiver learns the peer's version from `Hello` and decodes `Batch`
//! accordingly ([`FrameDecoder::set_peer_version`]). Version 4 lets a node
//! send its records out of seq order (drain priorities, live data first):
//! `Batch.floor` says below which seq nothing remains to be sent, `Ack`
//! counts the batches applied and `Welcome` names the highest seq stored.
//! The aggregator writes `top` and `applied` only to nodes of version 4
//! (a trailing field an older node would call malformed).

use super::deploy::{DeployAction, DeployFrame, MAX_SIGNATURE_BYTES};
use super::wire::{put_str, put_varint, Reader};
use super::{
    DecodeError, MAX_BATCH_RAW_BYTES, MAX_BATCH_RECORDS, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};

const T_HELLO: u8 = 0x01;
const T_WELCOME: u8 = 0x02;
const T_BATCH: u8 = 0x03;
const T_ACK: u8 = 0x04;
const T_ERROR: u8 = 0x05;
const T_PING: u8 = 0x06;
const T_PONG: u8 = 0x07;
const T_STATUS: u8 = 0x08;
const T_DEPLOY: u8 = 0x09;

/// Longest `agent`, `node_id` or error `message` accepted, in bytes.
pub const MAX_TEXT_BYTES: usize = 4096;

/// Numeric error codes, shared by `Error` frames and QUIC application close codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Orderly close, no error.
    Ok,
    /// The peer speaks a protocol version we do not.
    UnsupportedVersion,
    /// A frame or batch could not be decoded.
    Malformed,
    /// A frame arrived that the session state does not allow (e.g. Batch before Hello,
    /// batches out of order, ack beyond what was sent).
    ProtocolViolation,
    /// The node is not allowed to connect (certificate problems).
    Unauthorized,
    /// Another connection for the same node took over this one.
    Superseded,
    /// The aggregator failed internally (e.g. store error); retry later.
    Internal,
    /// The aggregator is shutting down; retry later.
    ShuttingDown,
    /// Nothing was heard from the peer for too long.
    Timeout,
    /// A code this version does not know.
    Other(u32),
}

impl ErrorCode {
    /// The numeric value on the wire.
    pub fn to_u32(self) -> u32 {
        match self {
            ErrorCode::Ok => 0,
            ErrorCode::UnsupportedVersion => 1,
            ErrorCode::Malformed => 2,
            ErrorCode::ProtocolViolation => 3,
            ErrorCode::Unauthorized => 4,
            ErrorCode::Superseded => 5,
            ErrorCode::Internal => 6,
            ErrorCode::ShuttingDown => 7,
            ErrorCode::Timeout => 8,
            ErrorCode::Other(n) => n,
        }
    }

    /// Parses a numeric value from the wire.
    pub fn from_u32(n: u32) -> Self {
        match n {
            0 => ErrorCode::Ok,
            1 => ErrorCode::UnsupportedVersion,
            2 => ErrorCode::Malformed,
            3 => ErrorCode::ProtocolViolation,
            4 => ErrorCode::Unauthorized,
            5 => ErrorCode::Superseded,
            6 => ErrorCode::Internal,
            7 => ErrorCode::ShuttingDown,
            8 => ErrorCode::Timeout,
            n => ErrorCode::Other(n),
        }
    }

    /// A short lower-case name for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Ok => "ok",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Malformed => "malformed",
            ErrorCode::ProtocolViolation => "protocol_violation",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Superseded => "superseded",
            ErrorCode::Internal => "internal",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Other(_) => "other",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.to_u32())
    }
}

/// How a batch block is stored on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockCodec {
    /// The columnar block as is (used when zstd would inflate more than
    /// [`super::MAX_INFLATION`] times, so the receiver's bound holds).
    None,
    /// One zstd frame.
    Zstd,
}

impl BlockCodec {
    fn to_u8(self) -> u8 {
        match self {
            BlockCodec::None => 0,
            BlockCodec::Zstd => 1,
        }
    }
}

/// A compressed batch as carried in a `Batch` frame. The header repeats what
/// the block holds so the receiver can check ordering and limits before
/// decompressing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchFrame {
    /// Sequence number of the first record.
    pub first_seq: u64,
    /// Sequence number of the last record (≥ `first_seq`).
    pub last_seq: u64,
    /// Number of records in the block.
    pub record_count: u32,
    /// Exact uncompressed size of the columnar block.
    pub raw_len: u32,
    /// How `block` is stored.
    pub codec: BlockCodec,
    /// The columnar block, see [`super::batch`].
    pub block: Vec<u8>,
    /// Every record of the node numbered below this is in this batch, in a
    /// batch sent before it on this connection, already acknowledged, or
    /// will never be sent (dropped, and reported as a loss): the
    /// aggregator's cursor may move to `floor - 1` once the batch is
    /// applied. Records in order make it `last_seq + 1`, which is what a
    /// batch of version 2 or 3 means.
    pub floor: u64,
}

impl BatchFrame {
    /// Memory the receiver may spend on this batch until it is applied: the
    /// block as received plus the decoded columns (see
    /// [`super::batch::decode_batch`]). Used for per-node byte budgets.
    pub fn memory_bytes(&self) -> usize {
        self.block.len() + super::batch::decoded_bytes_bound(self.raw_len as usize)
    }
}

/// One protocol frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Edge → aggregator, first frame on the control stream.
    Hello {
        /// [`super::PROTOCOL_VERSION`] of the sender.
        protocol_version: u32,
        /// Free-form software identification, for logs only.
        agent: String,
        /// The edge outbox's incarnation (a random id made with the file).
        incarnation: u64,
        /// The next seq the outbox will give out.
        next_seq: u64,
        /// The highest seq this outbox was told is applied (what the
        /// aggregator must not have forgotten).
        acked: u64,
        /// This start of the outbox (a random id per daemon start).
        epoch: u64,
        /// The seq this epoch's numbering started from.
        epoch_start: u64,
    },
    /// Aggregator → edge: who the aggregator thinks the node is (from its
    /// certificate), the highest seq it has durably applied, and which
    /// outbox incarnation that cursor belongs to.
    Welcome {
        /// Node id taken from the client certificate.
        node_id: String,
        /// Highest seq applied for this node (0 if none).
        cursor: u64,
        /// Incarnation recorded with the cursor (0: none recorded yet).
        incarnation: u64,
        /// The outbox epoch recorded with the cursor (0: none).
        epoch: u64,
        /// The highest seq of this node the store holds, which may be above
        /// the cursor when the node sent out of order (`None`: not sent,
        /// to nodes before version 4; then it is the cursor).
        top: Option<u64>,
        /// The aggregator's protocol version (`None`: not sent, to nodes
        /// before version 5, or an aggregator before 5). A node sends
        /// `Status` only to an aggregator of version 5 or later.
        version: Option<u32>,
    },
    /// Edge → aggregator: records to apply.
    Batch(BatchFrame),
    /// Aggregator → edge: every record with seq ≤ `up_to` is durably
    /// applied (or will never come), and so are the first `applied`
    /// batches of this connection.
    Ack {
        /// The node's cursor after the apply.
        up_to: u64,
        /// Batches of this connection applied so far (`None`: not sent, to
        /// nodes before version 4).
        applied: Option<u64>,
    },
    /// Either direction: the sender is about to close the connection.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// Either direction: are you there? Answered at once with `Pong`, even
    /// while a batch is being applied.
    Ping {
        /// Echoed in the `Pong`.
        nonce: u64,
    },
    /// The answer to `Ping`.
    Pong {
        /// The `Ping`'s nonce.
        nonce: u64,
    },
    /// Edge → aggregator (version 5): how the node is doing.
    Status(crate::status::NodeStatus),
    /// Aggregator → edge (version 6): install or revert a function's build
    /// for a rollout.
    Deploy(crate::deploy::DeployFrame),
}

/// Frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded frame would exceed [`MAX_FRAME_BYTES`].
    #[error("frame is {size} bytes, limit is {max} bytes")]
    FrameTooLarge {
        /// Encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A text field exceeds [`MAX_TEXT_BYTES`].
    #[error("{field} is {len} bytes, limit is {max} bytes")]
    TextTooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

fn check_text(field: &'static str, s: &str) -> Result<(), EncodeError> {
    if s.len() > MAX_TEXT_BYTES {
        return Err(EncodeError::TextTooLong {
            field,
            len: s.len(),
            max: MAX_TEXT_BYTES,
        });
    }
    Ok(())
}

impl Frame {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "Hello",
            Frame::Welcome { .. } => "Welcome",
            Frame::Batch(_) => "Batch",
            Frame::Ack { .. } => "Ack",
            Frame::Error { .. } => "Error",
            Frame::Ping { .. } => "Ping",
            Frame::Pong { .. } => "Pong",
            Frame::Status(_) => "Status",
            Frame::Deploy(_) => "Deploy",
        }
    }

    /// Appends the length-prefixed encoding of this frame to `out`.
    /// On error `out` is left unchanged.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        match self {
            Frame::Hello {
                protocol_version,
                agent,
                incarnation,
                next_seq,
                acked,
                epoch,
                epoch_start,
            } => {
                check_text("Hello.agent", agent)?;
                out.push(T_HELLO);
                put_varint(out, u64::from(*protocol_version));
                put_str(out, agent);
                for v in [incarnation, next_seq, acked, epoch, epoch_start] {
                    put_varint(out, *v);
                }
            }
            Frame::Welcome {
                node_id,
                cursor,
                incarnation,
                epoch,
                top,
                version,
            } => {
                check_text("Welcome.node_id", node_id)?;
                out.push(T_WELCOME);
                put_str(out, node_id);
                put_varint(out, *cursor);
                put_varint(out, *incarnation);
                put_varint(out, *epoch);
                // `version` follows `top`: it is only ever sent with it.
                if let Some(top) = top.or(version.map(|_| *cursor)) {
                    put_varint(out, top);
                }
                if let Some(v) = version {
                    put_varint(out, u64::from(*v));
                }
            }
            Frame::Batch(b) => {
                out.push(T_BATCH);
                put_varint(out, b.first_seq);
                put_varint(out, b.last_seq);
                put_varint(out, u64::from(b.record_count));
                put_varint(out, u64::from(b.raw_len));
                out.push(b.codec.to_u8());
                put_varint(out, b.floor);
                out.extend_from_slice(&b.block);
            }
            Frame::Ack { up_to, applied } => {
                out.push(T_ACK);
                put_varint(out, *up_to);
                if let Some(n) = applied {
                    put_varint(out, *n);
                }
            }
            Frame::Error { code, message } => {
                check_text("Error.message", message)?;
                out.push(T_ERROR);
                put_varint(out, u64::from(code.to_u32()));
                put_str(out, message);
            }
            Frame::Ping { nonce } => {
                out.push(T_PING);
                put_varint(out, *nonce);
            }
            Frame::Pong { nonce } => {
                out.push(T_PONG);
                put_varint(out, *nonce);
            }
            Frame::Status(status) => {
                out.push(T_STATUS);
                out.extend_from_slice(&status.encode());
            }
            Frame::Deploy(d) => {
                check_text("Deploy.function", &d.function)?;
                out.push(T_DEPLOY);
                put_varint(out, d.rollout);
                put_str(out, &d.function);
                match &d.action {
                    DeployAction::Install { signature, module } => {
                        if signature.len() > MAX_SIGNATURE_BYTES {
                            out.truncate(start);
                            return Err(EncodeError::TextTooLong {
                                field: "Deploy.signature",
                                len: signature.len(),
                                max: MAX_SIGNATURE_BYTES,
                            });
                        }
                        out.push(1);
                        put_str(out, signature);
                        out.extend_from_slice(module);
                    }
                    DeployAction::Revert => out.push(2),
                }
            }
        }
        let len = out.len() - start - 4;
        if len > MAX_FRAME_BYTES {
            out.truncate(start);
            return Err(EncodeError::FrameTooLarge {
                size: len,
                max: MAX_FRAME_BYTES,
            });
        }
        // len ≤ 16 MiB fits in u32.
        out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(())
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }

    /// Decodes one frame body (type byte + body, without the length prefix)
    /// sent by a peer speaking `version`.
    pub fn decode_body(body: &[u8], version: u32) -> Result<Frame, DecodeError> {
        let (&ty, rest) = body.split_first().ok_or(DecodeError::EmptyFrame)?;
        let mut r = Reader::new(rest);
        let frame = match ty {
            T_HELLO => {
                let protocol_version =
                    r.varint_max("Hello.protocol_version", u64::from(u32::MAX))? as u32;
                let agent = r.string("Hello.agent", MAX_TEXT_BYTES)?;
                // A version 1 Hello ends here: decode it so the session can
                // answer "unsupported version" instead of "malformed".
                let mut more = |field| -> Result<u64, DecodeError> {
                    if protocol_version < 2 && r.remaining() == 0 {
                        Ok(0)
                    } else {
                        r.varint(field)
                    }
                };
                Frame::Hello {
                    incarnation: more("Hello.incarnation")?,
                    next_seq: more("Hello.next_seq")?,
                    acked: more("Hello.acked")?,
                    epoch: more("Hello.epoch")?,
                    epoch_start: more("Hello.epoch_start")?,
                    protocol_version,
                    agent,
                }
            }
            T_WELCOME => Frame::Welcome {
                node_id: r.string("Welcome.node_id", MAX_TEXT_BYTES)?,
                cursor: r.varint("Welcome.cursor")?,
                incarnation: r.varint("Welcome.incarnation")?,
                epoch: r.varint("Welcome.epoch")?,
                top: if r.remaining() > 0 {
                    Some(r.varint("Welcome.top")?)
                } else {
                    None
                },
                version: if r.remaining() > 0 {
                    Some(r.varint_max("Welcome.version", u64::from(u32::MAX))? as u32)
                } else {
                    None
                },
            },
            T_BATCH => {
                let first_seq = r.varint("Batch.first_seq")?;
                let last_seq = r.varint("Batch.last_seq")?;
                let record_count =
                    r.varint_max("Batch.record_count", MAX_BATCH_RECORDS as u64)? as u32;
                let raw_len = r.varint_max("Batch.raw_len", MAX_BATCH_RAW_BYTES as u64)? as u32;
                let codec = if version < 3 {
                    BlockCodec::Zstd
                } else {
                    match r.bytes("Batch.codec", 1)?[0] {
                        0 => BlockCodec::None,
                        1 => BlockCodec::Zstd,
                        other => {
                            return Err(DecodeError::TooLarge {
                                field: "Batch.codec",
                                value: u64::from(other),
                                max: 1,
                            })
                        }
                    }
                };
                let floor = if version < 4 {
                    last_seq.saturating_add(1)
                } else {
                    r.varint("Batch.floor")?
                };
                let block = r.rest().to_vec();
                Frame::Batch(BatchFrame {
                    first_seq,
                    last_seq,
                    record_count,
                    raw_len,
                    codec,
                    block,
                    floor,
                })
            }
            T_ACK => Frame::Ack {
                up_to: r.varint("Ack.up_to")?,
                applied: if r.remaining() > 0 {
                    Some(r.varint("Ack.applied")?)
                } else {
                    None
                },
            },
            T_ERROR => Frame::Error {
                code: ErrorCode::from_u32(r.varint_max("Error.code", u64::from(u32::MAX))? as u32),
                message: r.string("Error.message", MAX_TEXT_BYTES)?,
            },
            T_PING => Frame::Ping {
                nonce: r.varint("Ping.nonce")?,
            },
            T_PONG => Frame::Pong {
                nonce: r.varint("Pong.nonce")?,
            },
            T_STATUS if version >= 5 => {
                let bytes = r.bytes("Status.json", r.remaining())?;
                let status =
                    crate::status::NodeStatus::decode(bytes).map_err(|e| DecodeError::Invalid {
                        field: "Status.json",
                        reason: match e {
                            crate::status::StatusError::TooLarge(_) => "larger than 64 KiB",
                            crate::status::StatusError::Json(_) => "not a status JSON object",
                        },
                    })?;
                Frame::Status(status)
            }
            T_DEPLOY if version >= 6 => {
                let rollout = r.varint("Deploy.rollout")?;
                let function = r.string("Deploy.function", MAX_TEXT_BYTES)?;
                let action = match r.bytes("Deploy.action", 1)?[0] {
                    1 => DeployAction::Install {
                        signature: r.string("Deploy.signature", MAX_SIGNATURE_BYTES)?,
                        module: r.rest().to_vec(),
                    },
                    2 => DeployAction::Revert,
                    other => {
                        return Err(DecodeError::TooLarge {
                            field: "Deploy.action",
                            value: u64::from(other),
                            max: 2,
                        })
                    }
                };
                Frame::Deploy(DeployFrame {
                    rollout,
                    function,
                    action,
                })
            }
            other => return Err(DecodeError::UnknownFrameType(other)),
        };
        r.finish(frame.kind())?;
        Ok(frame)
    }
}

/// Incremental decoder: push bytes as they arrive, pull whole frames out.
///
/// Never panics and never buffers more than one maximal frame plus what
/// was pushed: a length prefix above [`MAX_FRAME_BYTES`] is an error as soon
/// as its 4 bytes are seen. After an error the decoder keeps returning it.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    failed: Option<DecodeError>,
    version: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            failed: None,
            version: PROTOCOL_VERSION,
        }
    }
}

impl FrameDecoder {
    /// An empty decoder for a peer speaking this crate's version.
    pub fn new() -> Self {
        Self::default()
    }

    /// The peer's protocol version, as its `Hello` said: frames decoded
    /// from now on use that version's layout.
    pub fn set_peer_version(&mut self, version: u32) {
        self.version = version;
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let avail = &self.buf[self.start..];
        let Some(prefix) = avail.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        let result = if len > MAX_FRAME_BYTES {
            Err(DecodeError::TooLarge {
                field: "frame length",
                value: len as u64,
                max: MAX_FRAME_BYTES as u64,
            })
        } else if avail.len() < 4 + len {
            return Ok(None);
        } else {
            let r = Frame::decode_body(&avail[4..4 + len], self.version);
            self.start += 4 + len;
            r
        };
        match result {
            Ok(frame) => Ok(Some(frame)),
            Err(e) => {
                self.failed = Some(e.clone());
                self.buf = Vec::new();
                self.start = 0;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (any::<u32>(), ".{0,40}", any::<[u64; 5]>()).prop_map(
                |(protocol_version, agent, [incarnation, next_seq, acked, epoch, epoch_start])| {
                    Frame::Hello {
                        protocol_version,
                        agent,
                        incarnation,
                        next_seq,
                        acked,
                        epoch,
                        epoch_start,
                    }
                }
            ),
            (
                "[A-Za-z0-9._-]{1,128}",
                any::<[u64; 3]>(),
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<u32>()),
            )
                .prop_map(|(node_id, [cursor, incarnation, epoch], top, version)| {
                    Frame::Welcome {
                        node_id,
                        cursor,
                        incarnation,
                        epoch,
                        top,
                        // Only ever sent after `top`.
                        version: top.and(version),
                    }
                }),
            (any::<u64>(), "[a-z ]{0,40}", any::<u64>()).prop_map(|(at_ms, health, backlog)| {
                Frame::Status(crate::status::NodeStatus {
                    at_ms,
                    health,
                    backlog_records: backlog,
                    ..Default::default()
                })
            }),
            (
                any::<u64>(),
                any::<u64>(),
                0u32..1000,
                0u32..100_000,
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..300),
                any::<u64>(),
            )
                .prop_map(
                    |(first_seq, last_seq, record_count, raw_len, zstd, block, floor)| {
                        Frame::Batch(BatchFrame {
                            first_seq,
                            last_seq,
                            record_count,
                            raw_len,
                            codec: if zstd {
                                BlockCodec::Zstd
                            } else {
                                BlockCodec::None
                            },
                            block,
                            floor,
                        })
                    }
                ),
            (
                any::<u64>(),
                "[a-z_-]{1,20}",
                proptest::option::of((
                    "[ -~]{0,80}",
                    proptest::collection::vec(any::<u8>(), 0..300)
                ))
            )
                .prop_map(|(rollout, function, install)| {
                    Frame::Deploy(DeployFrame {
                        rollout,
                        function,
                        action: match install {
                            Some((signature, module)) => {
                                DeployAction::Install { signature, module }
                            }
                            None => DeployAction::Revert,
                        },
                    })
                }),
            any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
            any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
            (any::<u64>(), proptest::option::of(any::<u64>()))
                .prop_map(|(up_to, applied)| Frame::Ack { up_to, applied }),
            (any::<u32>(), ".{0,60}").prop_map(|(c, message)| Frame::Error {
                code: ErrorCode::from_u32(c),
                message
            }),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip_through_decoder_in_random_chunks(
            frames in proptest::collection::vec(arb_frame(), 1..8),
            chunk in 1usize..64,
        ) {
            let mut wire = Vec::new();
            for f in &frames {
                f.encode(&mut wire).unwrap();
            }
            let mut dec = FrameDecoder::new();
            let mut out = Vec::new();
            for piece in wire.chunks(chunk) {
                dec.push(piece);
                while let Some(f) = dec.next_frame().unwrap() {
                    out.push(f);
                }
            }
            prop_assert_eq!(out, frames);
            prop_assert_eq!(dec.buffered(), 0);
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut dec = FrameDecoder::new();
            dec.push(&data);
            for _ in 0..64 {
                match dec.next_frame() {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }

        #[test]
        fn truncated_frames_are_incomplete_or_errors(f in arb_frame(), cut in 0usize..400) {
            let wire = f.to_bytes().unwrap();
            let cut = cut.min(wire.len().saturating_sub(1));
            let mut dec = FrameDecoder::new();
            dec.push(&wire[..cut]);
            prop_assert_eq!(dec.next_frame(), Ok(None));
            // A body cut short but declared complete must be an error, not a panic.
            if cut > 5 {
                let mut lying = wire[..cut].to_vec();
                let len = (cut - 4) as u32;
                lying[..4].copy_from_slice(&len.to_le_bytes());
                let _ = Frame::decode_body(&lying[4..], PROTOCOL_VERSION);
            }
        }
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new();
        dec.push(&((MAX_FRAME_BYTES as u32) + 1).to_le_bytes());
        let err = dec.next_frame().unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::TooLarge {
                    field: "frame length",
                    ..
                }
            ),
            "{err}"
        );
        // Poisoned: stays failed.
        dec.push(&[0; 10]);
        assert!(dec.next_frame().is_err());
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn oversized_frame_is_refused_by_encoder() {
        let f = Frame::Batch(BatchFrame {
            first_seq: 1,
            last_seq: 1,
            record_count: 1,
            raw_len: 1,
            codec: BlockCodec::None,
            block: vec![0; MAX_FRAME_BYTES],
            floor: 2,
        });
        let mut out = vec![7];
        assert!(matches!(
            f.encode(&mut out),
            Err(EncodeError::FrameTooLarge { .. })
        ));
        assert_eq!(out, vec![7]);
    }

    #[test]
    fn unknown_type_and_trailing_bytes_are_errors() {
        assert_eq!(
            Frame::decode_body(&[0x7f], PROTOCOL_VERSION),
            Err(DecodeError::UnknownFrameType(0x7f))
        );
        assert!(matches!(
            Frame::decode_body(&[T_ACK, 5, 0, 0], PROTOCOL_VERSION),
            Err(DecodeError::TrailingBytes {
                what: "Ack",
                count: 1
            })
        ));
        assert_eq!(
            Frame::decode_body(&[], PROTOCOL_VERSION),
            Err(DecodeError::EmptyFrame)
        );
        assert!(matches!(
            Frame::decode_body(&[T_BATCH, 1, 1, 1, 1, 7], PROTOCOL_VERSION),
            Err(DecodeError::TooLarge {
                field: "Batch.codec",
                ..
            })
        ));
    }

    #[test]
    fn a_version_2_batch_has_no_codec_byte_and_is_zstd() {
        let body = [T_BATCH, 5, 9, 3, 40, 0xAA, 0xBB];
        let v2 = Frame::decode_body(&body, 2).unwrap();
        assert_eq!(
            v2,
            Frame::Batch(BatchFrame {
                first_seq: 5,
                last_seq: 9,
                record_count: 3,
                raw_len: 40,
                codec: BlockCodec::Zstd,
                block: vec![0xAA, 0xBB],
                floor: 10,
            })
        );
        // The same bytes as version 3: 0xAA is not a codec.
        assert!(Frame::decode_body(&body, 3).is_err());
        let mut dec = FrameDecoder::new();
        dec.set_peer_version(2);
        let mut wire = (body.len() as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(&body);
        dec.push(&wire);
        assert_eq!(dec.next_frame().unwrap(), Some(v2));
    }

    #[test]
    fn version_4_batches_carry_their_floor_and_older_ones_imply_it() {
        let b = BatchFrame {
            first_seq: 20,
            last_seq: 29,
            record_count: 10,
            raw_len: 1,
            codec: BlockCodec::None,
            block: vec![7],
            floor: 5,
        };
        let wire = Frame::Batch(b.clone()).to_bytes().unwrap();
        assert_eq!(
            Frame::decode_body(&wire[4..], 4).unwrap(),
            Frame::Batch(b.clone())
        );
        // A version 3 batch (no floor byte) means "in order": floor = last + 1.
        let v3: Vec<u8> = [T_BATCH, 20, 29, 10, 1, 0, 7].to_vec();
        assert_eq!(
            Frame::decode_body(&v3, 3).unwrap(),
            Frame::Batch(BatchFrame { floor: 30, ..b })
        );
        // Ack and Welcome without their version-4 fields still decode.
        assert_eq!(
            Frame::decode_body(&[T_ACK, 9], 4).unwrap(),
            Frame::Ack {
                up_to: 9,
                applied: None
            }
        );
    }
}
