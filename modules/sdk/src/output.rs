//! [`Output`]: what a call emits, built in the flat layout `host.emit` takes
//! (records of spans into one byte buffer), flushed to the host between
//! inputs once it grows and at the end of every call.

use serde::Serialize;

use crate::bindings::fogline::function::types::{Emission, Rejection, Span, StateWrite};
use crate::message::Message;
use crate::Result;

/// Flush to the host between inputs past this many buffered bytes: keeps a
/// flooding function's guest memory bounded by what it emits per input.
const FLUSH_BYTES: usize = 1 << 20;

/// What a call produces: messages to pass on down the pipeline.
#[derive(Debug, Default)]
pub struct Output {
    pub(crate) emissions: Vec<Emission>,
    pub(crate) rejected: Vec<Rejection>,
    pub(crate) state: Vec<StateWrite>,
    pub(crate) bytes: Vec<u8>,
    /// The batch being processed (its id) and the input being handled: what
    /// is emitted now derives from that input.
    pub(crate) batch_id: u64,
    pub(crate) current_input: Option<u32>,
    /// Emitted in this call so far (flushed or not).
    pub(crate) emitted: usize,
}

/// A point to roll back to when an input is rejected.
pub(crate) struct Mark {
    emissions: usize,
    bytes: usize,
    emitted: usize,
}

impl Output {
    pub(crate) fn new(batch_id: u64) -> Self {
        Self {
            batch_id,
            ..Self::default()
        }
    }

    /// Pass a message on: unchanged, or after [`Message::set_payload`] and
    /// friends. An unchanged input of this batch crosses back to the host as
    /// its index, with no copy.
    pub fn emit(&mut self, msg: Message) {
        let (source, stream, payload) = msg.parts();
        let own = source.filter(|s| s.batch.id == self.batch_id);
        let (input, stream, payload) = match own {
            Some(src) => (
                Some(src.index),
                stream.map(|s| self.push_bytes(s.as_bytes())),
                payload.map(|p| self.push_bytes(p)),
            ),
            // A message kept from an earlier batch, or a new one: bytes.
            None => {
                let stream = self.push_bytes(msg.stream().as_bytes());
                let payload = self.push_bytes(msg.payload());
                (self.current_input, Some(stream), Some(payload))
            }
        };
        self.emissions.push(Emission {
            input,
            stream,
            timestamp_ms: msg.timestamp_ms(),
            payload,
        });
        self.emitted += 1;
    }

    /// Emit a new message.
    pub fn emit_new(
        &mut self,
        stream: impl AsRef<str>,
        timestamp_ms: u64,
        payload: impl AsRef<[u8]>,
    ) {
        let stream = self.push_bytes(stream.as_ref().as_bytes());
        let payload = self.push_bytes(payload.as_ref());
        self.push_new(stream, timestamp_ms, payload);
    }

    /// A new message of this call's current input, its bytes already in the
    /// buffer.
    fn push_new(&mut self, stream: Span, timestamp_ms: u64, payload: Span) {
        self.emissions.push(Emission {
            input: self.current_input,
            stream: Some(stream),
            timestamp_ms,
            payload: Some(payload),
        });
        self.emitted += 1;
    }

    /// Emit a new message whose payload is `value` serialized as JSON
    /// (written straight into the output buffer).
    pub fn emit_json<T: Serialize + ?Sized>(
        &mut self,
        stream: impl AsRef<str>,
        timestamp_ms: u64,
        value: &T,
    ) -> Result<()> {
        let stream = self.push_bytes(stream.as_ref().as_bytes());
        let start = self.bytes.len();
        if let Err(e) = serde_json::to_writer(&mut self.bytes, value) {
            self.bytes.truncate(start);
            return Err(e.into());
        }
        let payload = span(start, self.bytes.len());
        self.push_new(stream, timestamp_ms, payload);
        Ok(())
    }

    /// How many messages were emitted so far in this call.
    pub fn len(&self) -> usize {
        self.emitted
    }

    /// Whether nothing was emitted so far in this call.
    pub fn is_empty(&self) -> bool {
        self.emitted == 0
    }

    pub(crate) fn push_bytes(&mut self, b: &[u8]) -> Span {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(b);
        span(start, self.bytes.len())
    }

    pub(crate) fn mark(&self) -> Mark {
        Mark {
            emissions: self.emissions.len(),
            bytes: self.bytes.len(),
            emitted: self.emitted,
        }
    }

    /// Forget what was emitted since `mark` (a rejected input has no outputs).
    pub(crate) fn rollback(&mut self, mark: Mark) {
        self.emissions.truncate(mark.emissions);
        self.bytes.truncate(mark.bytes);
        self.emitted = mark.emitted;
    }

    pub(crate) fn reject(&mut self, index: u32, error: &str) {
        let error = self.push_bytes(error.as_bytes());
        self.rejected.push(Rejection { index, error });
    }

    /// Whether to flush now (between inputs).
    pub(crate) fn is_large(&self) -> bool {
        self.bytes.len() >= FLUSH_BYTES || self.emissions.len() >= 16 * 1024
    }

    /// Hand everything buffered to the host and start over.
    pub(crate) fn flush(&mut self) {
        if self.emissions.is_empty() && self.rejected.is_empty() && self.state.is_empty() {
            return;
        }
        crate::host::emit(&self.emissions, &self.rejected, &self.state, &self.bytes);
        self.emissions.clear();
        self.rejected.clear();
        self.state.clear();
        self.bytes.clear();
    }
}

fn span(start: usize, end: usize) -> Span {
    // A wasm32 buffer cannot exceed u32::MAX bytes.
    Span {
        offset: u32::try_from(start).unwrap_or(u32::MAX),
        len: u32::try_from(end - start).unwrap_or(u32::MAX),
    }
}
