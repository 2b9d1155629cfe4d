//! One established connection, whatever carries it: a framed stream and a
//! handle that closes it with a protocol code.

use std::net::SocketAddr;
use std::time::Duration;

use fogline_protocol::frame::ErrorCode;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::framed::{FrameReader, FrameWriter};
use super::{close_code, Transport, TransportError};

fn next_id() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The reading half of a connection's stream.
pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// The writing half of a connection's stream.
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// An established connection.
pub struct Connection {
    /// Frames from the peer.
    pub reader: FrameReader<BoxRead>,
    /// Frames to the peer.
    pub writer: FrameWriter<BoxWrite>,
    /// Closes it, tells what it is.
    pub handle: ConnHandle,
}

/// Closes a connection with a protocol code, from any task.
///
/// QUIC carries the code in its CONNECTION_CLOSE. TCP has no such field:
/// the task that owns the stream watches [`ConnHandle::close_requested`],
/// writes an `Error` frame with the code, and shuts the stream down.
#[derive(Clone)]
pub struct ConnHandle {
    inner: Inner,
    id: usize,
    remote: SocketAddr,
    close: watch::Sender<Option<(ErrorCode, String)>>,
}

#[derive(Clone)]
enum Inner {
    Quic(quinn::Connection),
    Tcp { rtt: Duration },
}

impl ConnHandle {
    pub(crate) fn quic(conn: quinn::Connection) -> Self {
        let remote = conn.remote_address();
        Self {
            inner: Inner::Quic(conn),
            id: next_id(),
            remote,
            close: watch::channel(None).0,
        }
    }

    pub(crate) fn tcp(remote: SocketAddr, rtt: Duration) -> Self {
        Self {
            inner: Inner::Tcp { rtt },
            id: next_id(),
            remote,
            close: watch::channel(None).0,
        }
    }

    /// QUIC or TCP.
    pub fn transport(&self) -> Transport {
        match self.inner {
            Inner::Quic(_) => Transport::Quic,
            Inner::Tcp { .. } => Transport::Tcp,
        }
    }

    /// The peer's address (for QUIC, the current one: it follows migration).
    pub fn remote_address(&self) -> SocketAddr {
        match &self.inner {
            Inner::Quic(c) => c.remote_address(),
            Inner::Tcp { .. } => self.remote,
        }
    }

    /// Round-trip time (QUIC: smoothed estimate; TCP: the handshake's).
    pub fn rtt(&self) -> Duration {
        match &self.inner {
            Inner::Quic(c) => c.rtt(),
            Inner::Tcp { rtt } => *rtt,
        }
    }

    /// A stable id for this connection within the process.
    pub fn stable_id(&self) -> usize {
        self.id
    }

    /// Closes the connection with `code`.
    pub fn close(&self, code: ErrorCode, reason: &str) {
        if let Inner::Quic(c) = &self.inner {
            c.close(close_code(code), reason.as_bytes());
        }
        self.close.send_replace(Some((code, reason.to_string())));
    }

    /// Has [`Self::close`] been called? Returns its code and reason.
    pub fn close_requested_now(&self) -> Option<(ErrorCode, String)> {
        self.close.borrow().clone()
    }

    /// Resolves when [`Self::close`] is called (at once if it was).
    ///
    /// # Cancel safety
    /// Cancel-safe.
    pub async fn close_requested(&self) -> (ErrorCode, String) {
        let mut rx = self.close.subscribe();
        loop {
            if let Some(c) = rx.borrow_and_update().clone() {
                return c;
            }
            if rx.changed().await.is_err() {
                return (ErrorCode::Ok, String::new());
            }
        }
    }

    /// Why the connection ended, if the transport knows: the peer's code
    /// for QUIC (`None` while open, or for TCP, whose codes travel in
    /// `Error` frames).
    pub fn peer_close(&self) -> Option<TransportError> {
        match &self.inner {
            Inner::Quic(c) => c.close_reason().map(TransportError::from_connection),
            Inner::Tcp { .. } => None,
        }
    }

    /// Turns a read or write failure into the most precise error known.
    pub fn explain(&self, e: TransportError) -> TransportError {
        match e {
            TransportError::ConnectionLost(_) | TransportError::StreamFinished => {
                self.peer_close().unwrap_or(e)
            }
            other => other,
        }
    }

    /// QUIC statistics (`None` for TCP).
    pub fn quic_stats(&self) -> Option<quinn::ConnectionStats> {
        match &self.inner {
            Inner::Quic(c) => Some(c.stats()),
            Inner::Tcp { .. } => None,
        }
    }
}

/// Ends a connection with `code`, whatever carries it: QUIC puts the code in
/// its CONNECTION_CLOSE at once; TCP has no such field, so a last `Error`
/// frame is written (within `wait`) before the stream is shut down.
pub async fn close_with(
    writer: &mut FrameWriter<BoxWrite>,
    handle: &ConnHandle,
    code: ErrorCode,
    reason: &str,
    wait: Duration,
) {
    if handle.transport() == Transport::Tcp {
        let error = fogline_protocol::Frame::Error {
            code,
            message: reason.to_string(),
        };
        if writer.queue(&error).is_ok() {
            let _ = tokio::time::timeout(wait, writer.flush()).await;
        }
        writer.shutdown().await;
    }
    handle.close(code, reason);
}
