//! A hand-driven node for aggregator tests: says `Hello`, waits for
//! `Welcome`, sends batches and reads acks — one frame at a time, so tests
//! can check what the aggregator does with each.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use fogline_protocol::batch::{encode_batch, DEFAULT_ZSTD_LEVEL};
use fogline_protocol::session::OutboxInfo;
use fogline_protocol::{Frame, Record, PROTOCOL_VERSION};
use fogline_transport::client::ClientTransport;
use fogline_transport::conn::Connection;
use fogline_transport::tls::ClientTls;
use fogline_transport::{Transport, TransportError};

/// The TLS files `dev_bundle` wrote for `node` in `certs`.
pub fn node_tls(certs: &Path, node: &str) -> ClientTls {
    ClientTls {
        ca: certs.join("ca.pem"),
        cert: certs.join(format!("node-{node}.pem")),
        key: certs.join(format!("node-{node}.key")),
    }
}

/// What the aggregator's `Welcome` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The node id it read from the certificate.
    pub node_id: String,
    /// Its cursor.
    pub cursor: u64,
    /// The incarnation recorded with it.
    pub incarnation: u64,
}

/// A connected test node.
pub struct TestNode {
    /// The connection.
    pub conn: Connection,
    /// The aggregator's `Welcome`.
    pub welcome: Welcome,
}

impl TestNode {
    /// Connects over `how` to `addr` (certificate name `localhost`), says
    /// `Hello` for `outbox` and waits for `Welcome`.
    pub async fn connect(
        transport: &ClientTransport,
        how: Transport,
        addr: SocketAddr,
        outbox: OutboxInfo,
    ) -> Result<Self, TransportError> {
        let hello = Frame::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent: "fogline-testkit".into(),
            incarnation: outbox.incarnation,
            next_seq: outbox.next_seq,
            acked: outbox.acked,
            epoch: outbox.epoch,
            epoch_start: outbox.epoch_start,
        };
        let mut early = Vec::new();
        hello.encode(&mut early)?;
        let t = Duration::from_secs(10);
        let connected = transport
            .connect(how, addr, "localhost", t, Duration::from_millis(50), &early)
            .await?;
        let mut conn = connected.conn;
        match next(&mut conn).await? {
            Frame::Welcome {
                node_id,
                cursor,
                incarnation,
                ..
            } => Ok(Self {
                conn,
                welcome: Welcome {
                    node_id,
                    cursor,
                    incarnation,
                },
            }),
            other => Err(TransportError::ConnectionLost(format!(
                "expected Welcome, got {}",
                other.kind()
            ))),
        }
    }

    /// Sends `records` as one batch.
    pub async fn send(&mut self, records: &[Record]) -> Result<(), TransportError> {
        let batch = encode_batch(records, DEFAULT_ZSTD_LEVEL)
            .map_err(|e| TransportError::ConnectionLost(format!("encoding: {e}")))?;
        self.conn.writer.send(&Frame::Batch(batch)).await?;
        Ok(())
    }

    /// The next `Ack`'s `up_to` (pongs are skipped; an `Error` frame or a
    /// close is returned as [`TransportError::Closed`]).
    pub async fn next_ack(&mut self) -> Result<u64, TransportError> {
        loop {
            match next(&mut self.conn).await? {
                Frame::Ack { up_to, .. } => return Ok(up_to),
                Frame::Pong { .. } => {}
                other => {
                    return Err(TransportError::ConnectionLost(format!(
                        "expected Ack, got {}",
                        other.kind()
                    )))
                }
            }
        }
    }

    /// Reads acks until one covers `seq`.
    pub async fn acked_through(&mut self, seq: u64) -> Result<u64, TransportError> {
        loop {
            let up_to = self.next_ack().await?;
            if up_to >= seq {
                return Ok(up_to);
            }
        }
    }
}

/// The next frame; an `Error` frame (TCP's close) becomes `Closed`.
async fn next(conn: &mut Connection) -> Result<Frame, TransportError> {
    match conn.reader.next().await {
        Ok(Frame::Error { code, message }) => Err(TransportError::Closed {
            code,
            reason: message,
        }),
        Ok(f) => Ok(f),
        Err(e) => Err(conn.handle.explain(e)),
    }
}
