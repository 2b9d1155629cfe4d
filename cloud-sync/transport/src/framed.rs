//! Frames over any byte stream (a QUIC stream, a TLS-over-TCP stream).

use fogline_protocol::{Frame, FrameDecoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::TransportError;

/// Size of one read from the stream.
const READ_CHUNK: usize = 64 * 1024;

/// Reads whole frames from a byte stream. Buffers at most one maximal frame
/// plus one read ([`FrameDecoder`]'s bound).
pub struct FrameReader<R> {
    inner: R,
    decoder: FrameDecoder,
    buf: Box<[u8]>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads frames from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            decoder: FrameDecoder::new(),
            buf: vec![0; READ_CHUNK].into_boxed_slice(),
        }
    }

    /// The peer's protocol version (from its `Hello`): later frames are
    /// decoded with that version's layout.
    pub fn set_peer_version(&mut self, version: u32) {
        self.decoder.set_peer_version(version);
    }

    /// The next frame already buffered, without reading the stream.
    pub fn buffered_frame(&mut self) -> Result<Option<Frame>, TransportError> {
        Ok(self.decoder.next_frame()?)
    }

    /// The next frame.
    ///
    /// # Cancel safety
    /// Cancel-safe: bytes read are kept in the decoder, and a read that is
    /// cancelled before it completes has taken nothing from the stream.
    pub async fn next(&mut self) -> Result<Frame, TransportError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(frame);
            }
            let n = self
                .inner
                .read(&mut self.buf)
                .await
                .map_err(|e| TransportError::ConnectionLost(e.to_string()))?;
            if n == 0 {
                return Err(TransportError::StreamFinished);
            }
            self.decoder.push(&self.buf[..n]);
        }
    }
}

/// Writes frames to a byte stream.
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    written: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Writes frames to `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            written: 0,
        }
    }

    /// Encodes `frame` into the send buffer; returns its encoded size.
    pub fn queue(&mut self, frame: &Frame) -> Result<usize, TransportError> {
        let before = self.buf.len();
        frame.encode(&mut self.buf)?;
        Ok(self.buf.len() - before)
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.buf.len() - self.written
    }

    /// Queues raw, already encoded frames (the `Hello` sent as 0-RTT data).
    pub fn queue_encoded(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Writes everything queued.
    ///
    /// # Cancel safety
    /// Cancel-safe: what was written is remembered, the next call goes on
    /// from there. A driver can select on it alongside reads and timers, so
    /// a peer that stops granting flow control cannot hide a dead link.
    pub async fn flush(&mut self) -> Result<(), TransportError> {
        while self.written < self.buf.len() {
            let n = self
                .inner
                .write(&self.buf[self.written..])
                .await
                .map_err(|e| TransportError::ConnectionLost(e.to_string()))?;
            if n == 0 {
                return Err(TransportError::ConnectionLost(
                    "stream closed for writing".into(),
                ));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        self.inner
            .flush()
            .await
            .map_err(|e| TransportError::ConnectionLost(e.to_string()))?;
        Ok(())
    }

    /// Queues and writes one frame; returns its encoded size.
    pub async fn send(&mut self, frame: &Frame) -> Result<usize, TransportError> {
        let n = self.queue(frame)?;
        self.flush().await?;
        Ok(n)
    }

    /// Closes the writing half (TCP: FIN after the TLS close_notify).
    pub async fn shutdown(&mut self) {
        let _ = self.inner.shutdown().await;
    }
}
