//! Frames over a QUIC stream: a cancel-safe reader and a writer.

use fogline_protocol::{Frame, FrameDecoder};

use super::TransportError;

/// Reads whole frames from a receive stream.
pub struct FrameReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    buf: Vec<u8>,
}

impl FrameReader {
    /// Reads frames from `recv`.
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(),
            buf: vec![0; 64 * 1024],
        }
    }

    /// The next frame already buffered, without reading the stream.
    pub fn buffered_frame(&mut self) -> Result<Option<Frame>, TransportError> {
        Ok(self.decoder.next_frame()?)
    }

    /// The next frame. Cancel-safe: bytes read are kept in the decoder, and
    /// quinn's `read` is itself cancel-safe.
    pub async fn next(&mut self) -> Result<Frame, TransportError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(frame);
            }
            match self.recv.read(&mut self.buf).await? {
                Some(n) => self.decoder.push(&self.buf[..n]),
                None => return Err(TransportError::StreamFinished),
            }
        }
    }
}

/// Encodes and writes one frame.
pub async fn write_frame(
    send: &mut quinn::SendStream,
    frame: &Frame,
) -> Result<usize, TransportError> {
    let bytes = frame.to_bytes()?;
    send.write_all(&bytes).await?;
    Ok(bytes.len())
}
