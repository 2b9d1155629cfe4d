//! What a call hands the host through `host.emit`, checked before it is
//! copied: counts first, then every span and index, then the total the copy
//! would make — aliased spans counted once per use — against the call's
//! budget. Only then are the bytes copied out of guest memory.
//!
//! Two kinds of trouble, two answers:
//! - *Contract* violations (a span outside the buffer, an index outside the
//!   batch, a duplicate rejection, a budget exceeded) mean the guest is
//!   broken or hostile: `emit` traps, the call fails, the instance is rolled
//!   back and restarted.
//! - *Data* problems in one message (a stream name that is too long or not a
//!   valid topic, a payload over the limit) are refusals: the input that
//!   message derives from is dead-lettered with the reason, every other output
//!   of that input is dropped, and the rest of the call's output stands.

use std::collections::HashSet;

use super::bindings::{Emission, Rejection as WitRejection, Span, StateWrite};
use super::{Limits, Message, Rejection};

/// Longest stream name a function may emit: the replication protocol's
/// limit, the same number ingest enforces on topics.
pub const MAX_STREAM_BYTES: usize = fogline_protocol::MAX_STREAM_NAME_BYTES;
/// Longest state key (bytes).
pub const MAX_STATE_KEY_BYTES: usize = 1024;
/// Longest error text or log line kept from a guest (bytes).
pub(crate) const MAX_GUEST_TEXT: usize = 4096;
/// Most state writes one call may hand over.
const MAX_STATE_WRITES: usize = 1 << 20;

/// One message a function emitted, before the chain resolves it against its
/// inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// The input it derives from (`None` from `tick`).
    pub input: Option<u32>,
    /// Its stream; `None`: the input's.
    pub stream: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Its payload; `None`: the input's, unchanged.
    pub payload: Option<Vec<u8>>,
}

/// An output the host refused for its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The input it derives from: that input is dead-lettered (`None`: a
    /// `tick` output, dead-lettered itself).
    pub input: Option<u32>,
    /// Why.
    pub error: String,
    /// The refused message as far as it is safe to keep: its stream (cut to
    /// the limit) and the first KiB of its payload (`tick` outputs only).
    pub stream: String,
    /// See `stream`.
    pub payload: Vec<u8>,
    /// The refused message's timestamp.
    pub timestamp_ms: u64,
    /// The payload's full size.
    pub payload_size: usize,
}

/// One change to a function's durable state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// The key.
    pub key: Vec<u8>,
    /// The new value; `None` deletes.
    pub value: Option<Vec<u8>>,
}

/// What a call produced, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// Messages to pass on, in the order the function emitted them.
    pub emitted: Vec<Emitted>,
    /// Inputs the function refused, by index, unique, in its order.
    pub rejected: Vec<Rejection>,
    /// Outputs the host refused for their content.
    pub refused: Vec<Refusal>,
    /// State changes, in order.
    pub state: Vec<StateChange>,
}

impl Output {
    /// The emitted messages, resolved against the call's `inputs` (copies):
    /// outputs of refused inputs (rejected, or with a refused output) are
    /// left out, as the pipeline leaves them out.
    pub fn messages(&self, inputs: &[Message]) -> Vec<Message> {
        let dropped: HashSet<usize> = self
            .rejected
            .iter()
            .map(|r| r.index)
            .chain(
                self.refused
                    .iter()
                    .filter_map(|r| r.input.map(|i| i as usize)),
            )
            .collect();
        self.emitted
            .iter()
            .filter(|e| !e.input.is_some_and(|i| dropped.contains(&(i as usize))))
            .map(|e| {
                let input = e.input.and_then(|i| inputs.get(i as usize));
                Message {
                    stream: e
                        .stream
                        .clone()
                        .or_else(|| input.map(|m| m.stream.clone()))
                        .unwrap_or_default(),
                    timestamp_ms: e.timestamp_ms,
                    payload: e
                        .payload
                        .clone()
                        .or_else(|| input.map(|m| m.payload.clone()))
                        .unwrap_or_default(),
                }
            })
            .collect()
    }
}

/// The call in progress, as `emit` sees it: what the inputs weigh (a
/// forwarded input costs a copy of it), what is left of the budgets, and the
/// output so far.
pub(crate) struct CallOutput {
    /// Per input: stream and payload bytes (a forward copies them).
    inputs: Vec<(u32, u32)>,
    is_tick: bool,
    messages_left: usize,
    bytes_left: usize,
    state_bytes_left: usize,
    max_payload: usize,
    rejected_seen: HashSet<u32>,
    pub(crate) out: Output,
}

impl CallOutput {
    /// A `process` call over inputs of these (stream, payload) sizes.
    pub(crate) fn process(inputs: Vec<(u32, u32)>, limits: &Limits) -> Self {
        Self::new(inputs, false, limits)
    }

    /// A `tick`.
    pub(crate) fn tick(limits: &Limits) -> Self {
        Self::new(Vec::new(), true, limits)
    }

    fn new(inputs: Vec<(u32, u32)>, is_tick: bool, limits: &Limits) -> Self {
        Self {
            inputs,
            is_tick,
            messages_left: limits.max_output_messages,
            bytes_left: limits.max_output_bytes,
            state_bytes_left: limits.max_state_write_bytes,
            max_payload: limits.max_payload_bytes,
            rejected_seen: HashSet::new(),
            out: Output::default(),
        }
    }

    /// How many records `emit` may read now: checked before a list is read.
    pub(crate) fn check_counts(
        &self,
        emissions: usize,
        rejected: usize,
        state: usize,
    ) -> Result<(), String> {
        if emissions > self.messages_left {
            return Err(format!(
                "emitted {} messages in one call, the limit is {}",
                self.out.emitted.len() + self.out.refused.len() + emissions,
                self.out.emitted.len() + self.out.refused.len() + self.messages_left
            ));
        }
        if rejected > 0 && self.is_tick {
            return Err("rejected inputs from `tick`, which has none".into());
        }
        if rejected > self.inputs.len() {
            return Err(format!(
                "rejected {rejected} messages of a batch of {}",
                self.inputs.len()
            ));
        }
        if state > MAX_STATE_WRITES {
            return Err(format!(
                "wrote {state} state keys in one call, the limit is {MAX_STATE_WRITES}"
            ));
        }
        Ok(())
    }

    /// Check everything against `bytes` and the budgets, then copy. On `Err`
    /// nothing was taken.
    pub(crate) fn take(
        &mut self,
        emissions: &[Emission],
        rejected: &[WitRejection],
        state: &[StateWrite],
        bytes: &[u8],
    ) -> Result<(), String> {
        let range = |s: &Span, what: &str| -> Result<std::ops::Range<usize>, String> {
            let start = s.offset as usize;
            let end = start.saturating_add(s.len as usize);
            if end > bytes.len() {
                return Err(format!(
                    "{what} spans bytes {start}..{end}, the buffer holds {}",
                    bytes.len()
                ));
            }
            Ok(start..end)
        };
        let input = |i: u32, what: &str| -> Result<(u32, u32), String> {
            self.inputs.get(i as usize).copied().ok_or_else(|| {
                format!(
                    "{what} names input {i}, but the batch has {} messages",
                    self.inputs.len()
                )
            })
        };

        // Pass 1: every span and index, and what copying would cost.
        let mut cost: usize = 0;
        for (n, e) in emissions.iter().enumerate() {
            let what = format!("emission {n}");
            let from = match e.input {
                Some(_) if self.is_tick => {
                    return Err(format!("{what} names an input, but `tick` has none"))
                }
                Some(i) => Some(input(i, &what)?),
                None => None,
            };
            let stream = match (&e.stream, from) {
                (Some(s), _) => range(s, &what)?.len(),
                (None, Some((s, _))) => s as usize,
                (None, None) => return Err(format!("{what} has no stream and no input")),
            };
            let payload = match (&e.payload, from) {
                (Some(p), _) => range(p, &what)?.len(),
                (None, Some((_, p))) => p as usize,
                (None, None) => return Err(format!("{what} has no payload and no input")),
            };
            cost = cost.saturating_add(stream).saturating_add(payload);
        }
        let mut seen = HashSet::new();
        for r in rejected {
            let what = format!("rejection of input {}", r.index);
            input(r.index, &what)?;
            if self.rejected_seen.contains(&r.index) || !seen.insert(r.index) {
                return Err(format!("rejected index {} twice", r.index));
            }
            cost = cost.saturating_add(range(&r.error, &what)?.len().min(MAX_GUEST_TEXT));
        }
        if cost > self.bytes_left {
            return Err(format!(
                "output would copy {cost} bytes, {} are left of the call's {} limit \
                 (spans that alias the same bytes count once per use)",
                self.bytes_left,
                self.bytes_left + self.spent_bytes()
            ));
        }
        let mut state_cost: usize = 0;
        for (n, w) in state.iter().enumerate() {
            let what = format!("state write {n}");
            let key = range(&w.key, &what)?;
            if key.is_empty() || key.len() > MAX_STATE_KEY_BYTES {
                return Err(format!(
                    "{what}: the key is {} bytes, keys are 1..={MAX_STATE_KEY_BYTES}",
                    key.len()
                ));
            }
            let value = match &w.value {
                Some(v) => range(v, &what)?.len(),
                None => 0,
            };
            state_cost = state_cost.saturating_add(key.len()).saturating_add(value);
        }
        if state_cost > self.state_bytes_left {
            return Err(format!(
                "state writes of {state_cost} bytes, {} are left of the call's limit",
                self.state_bytes_left
            ));
        }

        // Pass 2: copy. Nothing below can exceed what pass 1 counted.
        self.bytes_left -= cost;
        self.state_bytes_left -= state_cost;
        self.messages_left -= emissions.len();
        let slice = |s: &Span| &bytes[s.offset as usize..][..s.len as usize];
        for e in emissions {
            let stream = match &e.stream {
                None => None,
                Some(s) => match check_stream(slice(s)) {
                    Ok(name) => Some(name.to_string()),
                    Err(error) => {
                        self.refuse(e, error, slice(s), e.payload.as_ref().map(slice));
                        continue;
                    }
                },
            };
            if let Some(p) = &e.payload {
                let len = p.len as usize;
                if len > self.max_payload {
                    let error = format!(
                        "emitted a payload of {len} bytes, the limit is {} (max_payload_bytes)",
                        self.max_payload
                    );
                    let stream_bytes = e.stream.as_ref().map(slice).unwrap_or_default();
                    self.refuse(e, error, stream_bytes, Some(slice(p)));
                    continue;
                }
            }
            self.out.emitted.push(Emitted {
                input: e.input,
                stream,
                timestamp_ms: e.timestamp_ms,
                payload: e.payload.as_ref().map(|p| slice(p).to_vec()),
            });
        }
        for r in rejected {
            self.rejected_seen.insert(r.index);
            let text = String::from_utf8_lossy(slice(&r.error));
            self.out.rejected.push(Rejection {
                index: r.index as usize,
                error: truncate(&text, MAX_GUEST_TEXT).to_string(),
            });
        }
        for w in state {
            self.out.state.push(super::StateChange {
                key: slice(&w.key).to_vec(),
                value: w.value.as_ref().map(|v| slice(v).to_vec()),
            });
        }
        Ok(())
    }

    fn spent_bytes(&self) -> usize {
        self.out
            .emitted
            .iter()
            .map(|e| {
                e.stream.as_ref().map_or(0, String::len) + e.payload.as_ref().map_or(0, Vec::len)
            })
            .sum()
    }

    fn refuse(&mut self, e: &Emission, error: String, stream: &[u8], payload: Option<&[u8]>) {
        let payload = payload.unwrap_or_default();
        let stream = String::from_utf8_lossy(stream);
        self.out.refused.push(Refusal {
            input: e.input,
            error,
            stream: cut(&stream, MAX_STREAM_BYTES),
            payload: payload[..payload.len().min(1024)].to_vec(),
            timestamp_ms: e.timestamp_ms,
            payload_size: payload.len(),
        });
    }
}

/// A stream name is UTF-8, non-empty, at most [`MAX_STREAM_BYTES`], and a
/// valid MQTT topic name (no wildcards, no NUL) so it can be routed and
/// republished.
pub(crate) fn check_stream(bytes: &[u8]) -> Result<&str, String> {
    let Ok(stream) = std::str::from_utf8(bytes) else {
        return Err("emitted a stream name that is not UTF-8".into());
    };
    if stream.is_empty() {
        return Err("emitted an empty stream name".into());
    }
    if stream.len() > MAX_STREAM_BYTES {
        return Err(format!(
            "emitted a stream name of {} bytes, the limit is {MAX_STREAM_BYTES} (`{}…`)",
            stream.len(),
            truncate(stream, 64)
        ));
    }
    if fogline_protocol::loss::is_reserved(stream) {
        return Err(format!(
            "emitted stream name `{}` is under `{}`, which the replication protocol reserves for itself",
            truncate(stream, 64).escape_debug(),
            fogline_protocol::loss::RESERVED_PREFIX
        ));
    }
    if let Some(c) = stream.chars().find(|c| matches!(c, '+' | '#' | '\0')) {
        return Err(format!(
            "emitted stream name `{}` contains {c:?}, which a topic name cannot",
            truncate(stream, 64).escape_debug()
        ));
    }
    Ok(stream)
}

/// At most `max` bytes of `s`, cut at a char boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn cut(s: &str, max: usize) -> String {
    truncate(s, max).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn span(offset: u32, len: u32) -> Span {
        Span { offset, len }
    }

    fn limits() -> Limits {
        Limits {
            max_output_bytes: 1000,
            max_payload_bytes: 100,
            ..Limits::default()
        }
    }

    #[test]
    fn aliased_spans_count_once_per_use_before_anything_is_copied() {
        let mut call = CallOutput::process(vec![(1, 1)], &limits());
        let bytes = vec![b'a'; 100];
        let e = Emission {
            input: Some(0),
            stream: None,
            timestamp_ms: 0,
            payload: Some(span(0, 100)),
        };
        // 10 × (1 + 100) = 1010 > 1000: refused whole, nothing taken.
        let err = call.take(&vec![e; 10], &[], &[], &bytes).unwrap_err();
        assert!(err.contains("would copy 1010 bytes"), "{err}");
        assert!(call.out.emitted.is_empty());
        call.take(&vec![e; 9], &[], &[], &bytes).unwrap();
        assert_eq!(call.out.emitted.len(), 9);
    }

    #[test]
    fn spans_and_indices_are_checked() {
        let mut call = CallOutput::process(vec![(1, 1), (1, 1)], &limits());
        let bad_span = Emission {
            input: Some(0),
            stream: None,
            timestamp_ms: 0,
            payload: Some(span(5, 10)),
        };
        assert!(call
            .take(&[bad_span], &[], &[], b"tiny")
            .unwrap_err()
            .contains("spans bytes 5..15"));
        let bad_input = Emission {
            input: Some(2),
            stream: None,
            timestamp_ms: 0,
            payload: None,
        };
        assert!(call
            .take(&[bad_input], &[], &[], b"")
            .unwrap_err()
            .contains("names input 2"));
        let r = WitRejection {
            index: 1,
            error: span(0, 2),
        };
        call.take(&[], &[r], &[], b"no").unwrap();
        assert!(call
            .take(&[], &[r], &[], b"no")
            .unwrap_err()
            .contains("twice"));
        let mut tick = CallOutput::tick(&limits());
        assert!(tick
            .take(&[bad_input], &[], &[], b"")
            .unwrap_err()
            .contains("`tick` has none"));
    }

    #[test]
    fn a_bad_stream_or_oversized_payload_refuses_that_message_only() {
        let mut call = CallOutput::process(vec![(1, 1), (1, 1), (1, 1)], &limits());
        let mut bytes = b"ok/1".to_vec();
        bytes.extend_from_slice(&[b's'; 300]); // 4..304: too long for... no: 300 < 1024
        bytes.extend_from_slice(b"a/#"); // 304..307
        bytes.extend_from_slice(&[b'p'; 101]); // 307..408
        let emissions = [
            Emission {
                input: Some(0),
                stream: Some(span(0, 4)),
                timestamp_ms: 1,
                payload: None,
            },
            Emission {
                input: Some(1),
                stream: Some(span(304, 3)),
                timestamp_ms: 2,
                payload: None,
            },
            Emission {
                input: Some(2),
                stream: None,
                timestamp_ms: 3,
                payload: Some(span(307, 101)),
            },
        ];
        let mut l = limits();
        l.max_output_bytes = 10_000;
        call.bytes_left = l.max_output_bytes;
        call.take(&emissions, &[], &[], &bytes).unwrap();
        assert_eq!(call.out.emitted.len(), 1);
        assert_eq!(call.out.emitted[0].stream.as_deref(), Some("ok/1"));
        let refused: Vec<(Option<u32>, &str)> = call
            .out
            .refused
            .iter()
            .map(|r| (r.input, r.error.as_str()))
            .collect();
        assert_eq!(refused.len(), 2);
        assert_eq!(refused[0].0, Some(1));
        assert!(refused[0].1.contains("contains '#'"), "{}", refused[0].1);
        assert_eq!(refused[1].0, Some(2));
        assert!(
            refused[1].1.contains("payload of 101 bytes"),
            "{}",
            refused[1].1
        );
        assert!(check_stream(&[b'x'; MAX_STREAM_BYTES + 1])
            .unwrap_err()
            .contains("limit is 1024"));
    }

    #[test]
    fn state_writes_are_bounded() {
        let mut l = limits();
        l.max_state_write_bytes = 10;
        let mut call = CallOutput::process(vec![], &l);
        let w = StateWrite {
            key: span(0, 3),
            value: Some(span(0, 8)),
        };
        assert!(call
            .take(&[], &[], &[w], b"keyvalue")
            .unwrap_err()
            .contains("11 bytes"));
        let empty = StateWrite {
            key: span(0, 0),
            value: None,
        };
        assert!(call
            .take(&[], &[], &[empty], b"")
            .unwrap_err()
            .contains("keys are 1..="));
        let ok = StateWrite {
            key: span(0, 3),
            value: Some(span(3, 5)),
        };
        call.take(&[], &[], &[ok], b"keyvalue").unwrap();
        assert_eq!(
            call.out.state,
            vec![StateChange {
                key: b"key".to_vec(),
                value: Some(b"value".to_vec())
            }]
        );
    }
}
