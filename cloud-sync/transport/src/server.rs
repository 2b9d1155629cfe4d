//! The aggregator's transport: QUIC (UDP) and TLS over TCP on the same
//! port number, both with mutual TLS; hands back framed connections with
//! the node's identity.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};

use super::conn::{ConnHandle, Connection};
use super::framed::{FrameReader, FrameWriter};
use super::identity::{peer_identity, PeerIdentity};
use super::tls::{reset_secret, server_rustls, ServerTls};
use super::{close_code, quic, tcp, Transport, TransportError};
use fogline_protocol::frame::ErrorCode;

/// A connection whose handshake completed, with the node it belongs to.
pub struct Accepted {
    /// The framed stream and its handle.
    pub conn: Connection,
    /// Who the certificate says it is.
    pub peer: PeerIdentity,
}

/// A connection attempt not yet handshaken.
pub enum Incoming {
    /// Over QUIC.
    Quic(Box<quinn::Incoming>),
    /// Over TCP.
    Tcp(TcpStream, SocketAddr, Arc<rustls::ServerConfig>),
}

/// The aggregator's listeners.
pub struct Listener {
    quic: quinn::Endpoint,
    tcp: Option<TcpListener>,
    tcp_tls: RwLock<Arc<rustls::ServerConfig>>,
}

impl Listener {
    /// Binds QUIC on `quic_addr` and, if given, TLS over TCP on `tcp_addr`.
    /// The stateless-reset key is derived from the server's private key.
    pub async fn bind(
        quic_addr: SocketAddr,
        tcp_addr: Option<SocketAddr>,
        tls: &ServerTls,
    ) -> Result<Self, TransportError> {
        let rustls = server_rustls(tls)?;
        let socket =
            std::net::UdpSocket::bind(quic_addr).map_err(|source| TransportError::Bind {
                addr: format!("UDP {quic_addr}"),
                source,
            })?;
        let runtime = quinn::default_runtime().ok_or_else(|| TransportError::Bind {
            addr: format!("UDP {quic_addr}"),
            source: std::io::Error::other("no async runtime"),
        })?;
        let quic = quinn::Endpoint::new(
            quic::server_endpoint_config(reset_secret(&tls.key)?),
            Some(quic::server_config(rustls.clone())?),
            socket,
            runtime,
        )
        .map_err(|source| TransportError::Bind {
            addr: format!("UDP {quic_addr}"),
            source,
        })?;
        let tcp = match tcp_addr {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| TransportError::Bind {
                            addr: format!("TCP {addr}"),
                            source,
                        })?,
                )
            }
            None => None,
        };
        Ok(Self {
            quic,
            tcp,
            tcp_tls: RwLock::new(tcp::without_early_data_server(&rustls)),
        })
    }

    /// The bound QUIC (UDP) address.
    pub fn quic_addr(&self) -> Result<SocketAddr, TransportError> {
        self.quic
            .local_addr()
            .map_err(|source| TransportError::Bind {
                addr: "local UDP address".into(),
                source,
            })
    }

    /// The bound TCP address, if TCP is served.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Loads the TLS material (certificate, key, CA, CRL) again; new
    /// connections use it. Connections already up are not touched: the
    /// service closes those whose certificate is now refused.
    pub fn reload(&self, tls: &ServerTls) -> Result<(), TransportError> {
        let rustls = server_rustls(tls)?;
        self.quic
            .set_server_config(Some(quic::server_config(rustls.clone())?));
        if let Ok(mut t) = self.tcp_tls.write() {
            *t = tcp::without_early_data_server(&rustls);
        }
        Ok(())
    }

    /// The next connection attempt on either listener; `None` once closed.
    ///
    /// # Cancel safety
    /// Cancel-safe.
    pub async fn accept(&self) -> Option<Incoming> {
        let tcp = async {
            match &self.tcp {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            i = self.quic.accept() => i.map(|i| Incoming::Quic(Box::new(i))),
            r = tcp => match r {
                Ok((stream, remote)) => {
                    let tls = self.tcp_tls.read().map(|t| t.clone()).ok()?;
                    Some(Incoming::Tcp(stream, remote, tls))
                }
                // A failed accept (out of descriptors): try again later.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Box::pin(self.accept()).await
                }
            },
        }
    }

    /// Closes every QUIC connection with `code` and waits (up to `wait`)
    /// for them to go.
    pub async fn close(&self, code: ErrorCode, reason: &str, wait: Duration) {
        self.quic.close(close_code(code), reason.as_bytes());
        let _ = tokio::time::timeout(wait, self.quic.wait_idle()).await;
    }
}

impl Incoming {
    /// Where it comes from.
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Incoming::Quic(i) => i.remote_address(),
            Incoming::Tcp(_, remote, _) => *remote,
        }
    }

    /// Refuse it before any cryptography: QUIC answers with a
    /// connection-refused close, TCP is closed.
    pub fn refuse(self) {
        match self {
            Incoming::Quic(i) => i.refuse(),
            Incoming::Tcp(stream, ..) => drop(stream),
        }
    }

    /// QUIC or TCP.
    pub fn transport(&self) -> Transport {
        match self {
            Incoming::Quic(_) => Transport::Quic,
            Incoming::Tcp(..) => Transport::Tcp,
        }
    }

    /// Completes the handshake (and, for QUIC, waits for the node to open
    /// its stream), all within `timeout`. Nothing the node sent — 0-RTT data
    /// included — is read before the handshake is complete.
    pub async fn handshake(self, timeout: Duration) -> Result<Accepted, TransportError> {
        let remote = self.remote_address();
        let timed_out = |what| TransportError::Timeout {
            what,
            after: timeout,
        };
        match self {
            Incoming::Quic(incoming) => {
                let run = async {
                    let conn = (*incoming).await.map_err(|e| TransportError::Connect {
                        server: remote.to_string(),
                        transport: "quic",
                        reason: e.to_string(),
                    })?;
                    let peer = quic_peer(&conn);
                    let handle = ConnHandle::quic(conn.clone());
                    let peer = match peer {
                        Ok(p) => p,
                        Err(e) => {
                            handle.close(ErrorCode::Unauthorized, &e.to_string());
                            return Err(e);
                        }
                    };
                    let (send, recv) = conn
                        .accept_bi()
                        .await
                        .map_err(TransportError::from_connection)?;
                    Ok(Accepted {
                        conn: Connection {
                            reader: FrameReader::new(Box::new(recv)),
                            writer: FrameWriter::new(Box::new(send)),
                            handle,
                        },
                        peer,
                    })
                };
                tokio::time::timeout(timeout, run)
                    .await
                    .map_err(|_| timed_out("QUIC handshake and stream"))?
            }
            Incoming::Tcp(stream, remote, tls) => {
                let (conn, certs) = tcp::accept(stream, remote, tls, timeout).await?;
                let peer = leaf_identity(&certs)?;
                Ok(Accepted { conn, peer })
            }
        }
    }
}

fn quic_peer(conn: &quinn::Connection) -> Result<PeerIdentity, TransportError> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| unauthorized("no client certificate"))?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| unauthorized("unexpected peer identity type"))?;
    leaf_identity(&certs)
}

fn leaf_identity(certs: &[CertificateDer<'_>]) -> Result<PeerIdentity, TransportError> {
    let leaf = certs
        .first()
        .ok_or_else(|| unauthorized("empty certificate chain"))?;
    peer_identity(leaf).map_err(|e| unauthorized(&e.to_string()))
}

fn unauthorized(reason: &str) -> TransportError {
    TransportError::Closed {
        code: ErrorCode::Unauthorized,
        reason: reason.to_string(),
    }
}
