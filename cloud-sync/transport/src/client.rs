//! Edge side of the transport: connect, say Hello, learn the cursor, then
//! send batches on one half and read acks on the other.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use fogline_protocol::batch::{encode_batch, DEFAULT_ZSTD_LEVEL};
use fogline_protocol::frame::ErrorCode;
use fogline_protocol::server::HelloInfo;
use fogline_protocol::{Frame, Record, PROTOCOL_VERSION};

use super::framed::{write_frame, FrameReader};
use super::{close_code, tls, TransportError};

/// Where the node's TLS material is.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// Fleet CA certificate (PEM); the aggregator's certificate must chain to it.
    pub ca: PathBuf,
    /// This node's certificate (PEM); its CN is the node id.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
}

/// A QUIC endpoint with the node's identity, reused across reconnects.
pub struct UplinkClient {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
}

/// An established session.
pub struct Link {
    /// The node id the aggregator read from our certificate.
    pub node_id: String,
    /// Highest seq the aggregator has durably applied for us.
    pub cursor: u64,
    /// The outbox incarnation that cursor belongs to (0: none recorded).
    pub incarnation: u64,
    /// The outbox epoch recorded with it (0: none).
    pub epoch: u64,
    /// Sends batches.
    pub sender: LinkSender,
    /// Reads acknowledgements.
    pub receiver: LinkReceiver,
}

/// What [`LinkSender::send_batch`] put on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentBatch {
    /// First seq in the batch.
    pub first_seq: u64,
    /// Last seq in the batch.
    pub last_seq: u64,
    /// Number of records.
    pub records: usize,
    /// Bytes of the encoded frame (compressed block plus header).
    pub encoded_bytes: usize,
}

/// Sending half of a [`Link`].
pub struct LinkSender {
    conn: quinn::Connection,
    send: quinn::SendStream,
    last_sent: u64,
}

/// Receiving half of a [`Link`].
pub struct LinkReceiver {
    reader: FrameReader,
}

impl UplinkClient {
    /// Loads the node's TLS material and binds a UDP socket.
    pub fn new(tls: &ClientTls) -> Result<Self, TransportError> {
        let config = tls::client_config(&tls.ca, &tls.cert, &tls.key)?;
        let bind: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 0));
        let endpoint = quinn::Endpoint::client(bind).map_err(|source| TransportError::Bind {
            addr: bind.to_string(),
            source,
        })?;
        Ok(Self { endpoint, config })
    }

    /// Connects to the aggregator at `addr` (certificate must be valid for
    /// `server_name`), sends Hello describing the outbox, and waits for
    /// Welcome, all within `timeout`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
        timeout: Duration,
        outbox: HelloInfo,
    ) -> Result<Link, TransportError> {
        let server = addr.to_string();
        let handshake = async {
            let connecting = self
                .endpoint
                .connect_with(self.config.clone(), addr, server_name)
                .map_err(|e| TransportError::Connect {
                    server: server.clone(),
                    reason: e.to_string(),
                })?;
            let conn = connecting.await.map_err(|e| TransportError::Connect {
                server: server.clone(),
                reason: e.to_string(),
            })?;
            let (mut send, recv) = conn
                .open_bi()
                .await
                .map_err(TransportError::from_connection)?;
            write_frame(
                &mut send,
                &Frame::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    agent: format!("fogline-edge/{}", env!("CARGO_PKG_VERSION")),
                    incarnation: outbox.incarnation,
                    next_seq: outbox.next_seq,
                    acked: outbox.acked,
                    epoch: outbox.epoch,
                    epoch_start: outbox.epoch_start,
                },
            )
            .await?;
            let mut reader = FrameReader::new(recv);
            match reader.next().await? {
                Frame::Welcome {
                    node_id,
                    cursor,
                    incarnation,
                    epoch,
                } => Ok(Link {
                    node_id,
                    cursor,
                    incarnation,
                    epoch,
                    sender: LinkSender {
                        conn,
                        send,
                        last_sent: cursor,
                    },
                    receiver: LinkReceiver { reader },
                }),
                Frame::Error { code, message } => Err(TransportError::Closed {
                    code,
                    reason: message,
                }),
                other => Err(TransportError::Protocol(format!(
                    "expected Welcome, got {}",
                    other.kind()
                ))),
            }
        };
        tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| TransportError::Timeout {
                what: "connecting and handshake",
                after: timeout,
            })?
    }
}

impl LinkSender {
    /// Resumes sending after `seq` (the outbox was renumbered above the
    /// cursor, so nothing at or below it will be sent).
    pub fn resume_after(&mut self, seq: u64) {
        self.last_sent = seq;
    }

    /// Encodes `records` (strictly ascending, all above what was sent
    /// before) as one batch and writes it. Returns once the bytes are handed
    /// to QUIC, not when they are acknowledged.
    pub async fn send_batch(&mut self, records: &[Record]) -> Result<SentBatch, TransportError> {
        if let Some(first) = records.first() {
            if first.seq <= self.last_sent {
                return Err(TransportError::Protocol(format!(
                    "batch starts at seq {} but seq {} was already sent",
                    first.seq, self.last_sent
                )));
            }
        }
        let batch = encode_batch(records, DEFAULT_ZSTD_LEVEL)?;
        let (first_seq, last_seq) = (batch.first_seq, batch.last_seq);
        let encoded_bytes = write_frame(&mut self.send, &Frame::Batch(batch)).await?;
        self.last_sent = last_seq;
        Ok(SentBatch {
            first_seq,
            last_seq,
            records: records.len(),
            encoded_bytes,
        })
    }

    /// Closes the connection, telling the aggregator why.
    pub fn close(&self, code: ErrorCode, reason: &str) {
        self.conn.close(close_code(code), reason.as_bytes());
    }
}

impl LinkReceiver {
    /// The next cumulative acknowledgement. Cancel-safe. Not checked
    /// against what was sent: that is [`fogline_protocol::client::SenderState`]'s job.
    pub async fn next_ack(&mut self) -> Result<u64, TransportError> {
        match self.reader.next().await? {
            Frame::Ack { up_to } => Ok(up_to),
            Frame::Error { code, message } => Err(TransportError::Closed {
                code,
                reason: message,
            }),
            other => Err(TransportError::Protocol(format!(
                "expected Ack, got {}",
                other.kind()
            ))),
        }
    }
}
