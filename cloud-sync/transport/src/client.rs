//! The edge's transport: connects to an aggregator over QUIC or TCP/TLS and
//! hands back a framed [`Connection`].
//!
//! - One QUIC endpoint (one UDP socket) is reused across connections, so
//!   TLS session tickets let a reconnect send its `Hello` as 0-RTT data.
//!   `Hello` is idempotent (it only asks for the cursor) and the aggregator
//!   reads nothing before the handshake completes, so a replay does no harm.
//! - [`ClientTransport::rebind`] moves the endpoint to a new socket: QUIC
//!   migrates the live connection (a cellular re-attach changes the address).
//! - [`ClientTransport::reload_if_changed`] picks up rotated certificate
//!   files; the next connection uses them.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::conn::{ConnHandle, Connection};
use super::framed::{FrameReader, FrameWriter};
use super::tls::{client_rustls, stamps, ClientTls, FileStamp};
use super::{quic, tcp, Transport, TransportError};

/// A connection just established.
pub struct Connected {
    /// The connection; `early` has been written to it.
    pub conn: Connection,
    /// The `early` bytes went out as 0-RTT data and the server took them.
    pub zero_rtt: bool,
    /// How long the handshake took.
    pub handshake: Duration,
}

/// The edge's transport, reused across connections.
///
/// Shared by reference between the session and its probes: the TLS
/// configurations sit behind a lock that is never held across an await.
pub struct ClientTransport {
    tls: ClientTls,
    loaded: RwLock<Loaded>,
    endpoint: quinn::Endpoint,
}

struct Loaded {
    stamps: Vec<FileStamp>,
    rustls: Arc<rustls::ClientConfig>,
    tcp_rustls: Arc<rustls::ClientConfig>,
}

impl ClientTransport {
    /// Loads the node's TLS material and binds a UDP socket.
    pub fn new(tls: ClientTls) -> Result<Self, TransportError> {
        let bind = SocketAddr::from(([0, 0, 0, 0], 0));
        let endpoint = quinn::Endpoint::client(bind).map_err(|source| TransportError::Bind {
            addr: bind.to_string(),
            source,
        })?;
        Self::on_endpoint(tls, endpoint)
    }

    /// `tls` loaded, on `endpoint`.
    fn on_endpoint(tls: ClientTls, endpoint: quinn::Endpoint) -> Result<Self, TransportError> {
        let rustls = client_rustls(&tls)?;
        Ok(Self {
            loaded: RwLock::new(Loaded {
                stamps: stamps(&tls.files()),
                tcp_rustls: tcp::without_early_data_client(&rustls),
                rustls,
            }),
            tls,
            endpoint,
        })
    }

    /// A transport with its own TLS material (its own node identity) on
    /// `other`'s QUIC endpoint: one UDP socket for many connections, each
    /// with its own client certificate. For load generators that simulate
    /// thousands of nodes in one process, where a socket per node would
    /// exhaust file descriptors. [`rebind`](Self::rebind) on either moves
    /// them all.
    pub fn sharing_endpoint(
        tls: ClientTls,
        other: &ClientTransport,
    ) -> Result<Self, TransportError> {
        Self::on_endpoint(tls, other.endpoint.clone())
    }

    /// Reloads the certificate, key and CA if any of their files changed.
    /// `Ok(true)`: new material is in use for the next connection. On an
    /// error the previous material stays in use (a half-written file is
    /// retried on the next call).
    pub fn reload_if_changed(&self) -> Result<bool, TransportError> {
        let now = stamps(&self.tls.files());
        if self.loaded.read().is_ok_and(|l| l.stamps == now) {
            return Ok(false);
        }
        let rustls = client_rustls(&self.tls)?;
        let loaded = Loaded {
            stamps: now,
            tcp_rustls: tcp::without_early_data_client(&rustls),
            rustls,
        };
        match self.loaded.write() {
            Ok(mut l) => *l = loaded,
            Err(poisoned) => *poisoned.into_inner() = loaded,
        }
        Ok(true)
    }

    fn configs(&self) -> (Arc<rustls::ClientConfig>, Arc<rustls::ClientConfig>) {
        match self.loaded.read() {
            Ok(l) => (l.rustls.clone(), l.tcp_rustls.clone()),
            Err(poisoned) => {
                let l = poisoned.into_inner();
                (l.rustls.clone(), l.tcp_rustls.clone())
            }
        }
    }

    /// The files in use.
    pub fn tls(&self) -> &ClientTls {
        &self.tls
    }

    /// The local UDP address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint
            .local_addr()
            .map_err(|source| TransportError::Bind {
                addr: "local UDP address".into(),
                source,
            })
    }

    /// Moves QUIC to a new local UDP socket; live connections migrate to
    /// it without a new handshake. Returns the new address.
    pub fn rebind(&self) -> Result<SocketAddr, TransportError> {
        let bind = SocketAddr::from(([0, 0, 0, 0], 0));
        let err = |source| TransportError::Bind {
            addr: bind.to_string(),
            source,
        };
        let socket = std::net::UdpSocket::bind(bind).map_err(err)?;
        self.endpoint.rebind(socket).map_err(err)?;
        self.local_addr()
    }

    /// Connects over `transport` to `addr` (whose certificate must be valid
    /// for `server_name`), writes `early` (the encoded `Hello`) — as 0-RTT
    /// data when a session ticket allows — all within `timeout`.
    /// `initial_rtt` paces QUIC's Initial retransmissions.
    pub async fn connect(
        &self,
        transport: Transport,
        addr: SocketAddr,
        server_name: &str,
        timeout: Duration,
        initial_rtt: Duration,
        early: &[u8],
    ) -> Result<Connected, TransportError> {
        let started = Instant::now();
        let attempt = async {
            match transport {
                Transport::Quic => {
                    self.connect_quic(addr, server_name, initial_rtt, early)
                        .await
                }
                Transport::Tcp => {
                    let mut conn = tcp::connect(addr, server_name, self.configs().1).await?;
                    conn.writer.queue_encoded(early);
                    conn.writer.flush().await?;
                    Ok((conn, false))
                }
            }
        };
        let (conn, zero_rtt) = tokio::time::timeout(timeout, attempt).await.map_err(|_| {
            TransportError::Timeout {
                what: match transport {
                    Transport::Quic => "QUIC handshake",
                    Transport::Tcp => "TCP/TLS handshake",
                },
                after: timeout,
            }
        })??;
        Ok(Connected {
            conn,
            zero_rtt,
            handshake: started.elapsed(),
        })
    }

    async fn connect_quic(
        &self,
        addr: SocketAddr,
        server_name: &str,
        initial_rtt: Duration,
        early: &[u8],
    ) -> Result<(Connection, bool), TransportError> {
        let err = |reason: String| TransportError::Connect {
            server: addr.to_string(),
            transport: "quic",
            reason,
        };
        let config = quic::client_config(self.configs().0, initial_rtt)?;
        let connecting = self
            .endpoint
            .connect_with(config, addr, server_name)
            .map_err(|e| err(e.to_string()))?;
        let (conn, zero_rtt) = match connecting.into_0rtt() {
            Ok((conn, accepted)) => {
                // The Hello goes out with the first flight.
                let early_stream = open_and_write(&conn, early).await;
                if accepted.await {
                    (conn, Some(early_stream?))
                } else {
                    // Rejected (the aggregator restarted and lost its
                    // tickets): the stream is void, say Hello again.
                    (conn, None)
                }
            }
            Err(connecting) => (connecting.await.map_err(|e| err(e.to_string()))?, None),
        };
        let ((send, recv), zero) = match zero_rtt {
            Some(streams) => (streams, true),
            None => (open_and_write(&conn, early).await?, false),
        };
        Ok((
            Connection {
                reader: FrameReader::new(Box::new(recv)),
                writer: FrameWriter::new(Box::new(send)),
                handle: ConnHandle::quic(conn),
            },
            zero,
        ))
    }
}

async fn open_and_write(
    conn: &quinn::Connection,
    early: &[u8],
) -> Result<(quinn::SendStream, quinn::RecvStream), TransportError> {
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(TransportError::from_connection)?;
    send.write_all(early)
        .await
        .map_err(|e| TransportError::ConnectionLost(e.to_string()))?;
    Ok((send, recv))
}
