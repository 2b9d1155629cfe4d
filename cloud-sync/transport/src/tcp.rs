//! TLS 1.3 over TCP: the same frames where UDP does not get through.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use super::conn::{ConnHandle, Connection};
use super::framed::{FrameReader, FrameWriter};
use super::TransportError;

/// TCP has no 0-RTT here: early data only where replay is handled (QUIC).
pub(crate) fn without_early_data_client(
    tls: &Arc<rustls::ClientConfig>,
) -> Arc<rustls::ClientConfig> {
    let mut c = (**tls).clone();
    c.enable_early_data = false;
    Arc::new(c)
}

/// The server side's TCP configuration (no early data).
pub(crate) fn without_early_data_server(
    tls: &Arc<rustls::ServerConfig>,
) -> Arc<rustls::ServerConfig> {
    let mut c = (**tls).clone();
    c.max_early_data_size = 0;
    Arc::new(c)
}

fn split(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    handle: ConnHandle,
) -> Connection {
    let (r, w) = tokio::io::split(stream);
    Connection {
        reader: FrameReader::new(Box::new(r)),
        writer: FrameWriter::new(Box::new(w)),
        handle,
    }
}

/// Connects to `addr` and completes the TLS handshake for `server_name`.
pub(crate) async fn connect(
    addr: SocketAddr,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Connection, TransportError> {
    let err = |reason: String| TransportError::Connect {
        server: addr.to_string(),
        transport: "tcp",
        reason,
    };
    let started = Instant::now();
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| err(e.to_string()))?;
    // Frames are written whole; do not hold small ones (acks, pings) back.
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| err(format!("server name {server_name:?}: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| err(format!("TLS handshake: {e}")))?;
    // TCP + TLS 1.3: two round trips.
    let rtt = started.elapsed() / 2;
    Ok(split(stream, ConnHandle::tcp(addr, rtt)))
}

/// Completes the server side of a TLS handshake on an accepted socket.
/// Returns the connection and the client's certificate chain.
pub(crate) async fn accept(
    tcp: TcpStream,
    remote: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    timeout: Duration,
) -> Result<(Connection, Vec<CertificateDer<'static>>), TransportError> {
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    let stream = tokio::time::timeout(timeout, tokio_rustls::TlsAcceptor::from(tls).accept(tcp))
        .await
        .map_err(|_| TransportError::Timeout {
            what: "TLS handshake",
            after: timeout,
        })?
        .map_err(|e| TransportError::Connect {
            server: remote.to_string(),
            transport: "tcp",
            reason: format!("TLS handshake: {e}"),
        })?;
    let certs = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let rtt = started.elapsed();
    Ok((split(stream, ConnHandle::tcp(remote, rtt)), certs))
}
