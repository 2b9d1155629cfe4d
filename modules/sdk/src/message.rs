//! [`Message`]: one record, read in place from its batch until changed.

use std::cell::OnceCell;
use std::fmt;
use std::rc::Rc;

use serde_json::Value;

use crate::batch::Batch;
use crate::json::{self, Lookup, Scalar};
use crate::{Error, Result};

/// One record: a stream (the MQTT topic, or what a function assigned), a
/// timestamp and an opaque payload (JSON by convention).
///
/// An input message reads its stream and payload in place from the batch
/// the host sent (no copy per message); `set_*` gives it its own copy of
/// what changed. Emitting an unchanged input passes its index to the host,
/// not its bytes. A message kept past the call keeps its whole batch alive:
/// for long-lived state keep what you need (a number, `into_parts()`).
///
/// The JSON accessors ([`json_f64`](Message::json_f64),
/// [`json_u64`](Message::json_u64), [`json_str`](Message::json_str)) read one
/// field without building the document; [`json`](Message::json) and
/// [`json_field`](Message::json_field) parse it once and cache the result.
pub struct Message {
    source: Option<Source>,
    /// `Some`: set by the function (or a new message).
    stream: Option<String>,
    timestamp_ms: u64,
    /// `Some`: set by the function (or a new message).
    payload: Option<Vec<u8>>,
    json: OnceCell<std::result::Result<Value, String>>,
}

/// The input a message came from: its batch and index.
#[derive(Clone)]
pub(crate) struct Source {
    pub(crate) batch: Rc<Batch>,
    pub(crate) index: u32,
}

impl Message {
    /// A new message.
    pub fn new(stream: impl Into<String>, timestamp_ms: u64, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            source: None,
            stream: Some(stream.into()),
            timestamp_ms,
            payload: Some(payload.into()),
            json: OnceCell::new(),
        }
    }

    /// Input `index` of `batch`, read in place.
    pub(crate) fn input(batch: &Rc<Batch>, index: u32) -> Self {
        Self {
            timestamp_ms: batch.timestamp_ms(index),
            source: Some(Source {
                batch: Rc::clone(batch),
                index,
            }),
            stream: None,
            payload: None,
            json: OnceCell::new(),
        }
    }

    /// The input this message is, and what of it changed:
    /// `(source, own stream, own payload)`.
    pub(crate) fn parts(&self) -> (Option<&Source>, Option<&str>, Option<&[u8]>) {
        (
            self.source.as_ref(),
            self.stream.as_deref(),
            self.payload.as_deref(),
        )
    }

    /// The stream (topic) the message belongs to.
    pub fn stream(&self) -> &str {
        match (&self.stream, &self.source) {
            (Some(s), _) => s,
            (None, Some(src)) => src.batch.stream(src.index),
            (None, None) => "",
        }
    }

    /// Milliseconds since the Unix epoch: for an input, the gateway's ingest
    /// clock, which never goes backwards on a node.
    pub fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }

    /// The raw payload.
    pub fn payload(&self) -> &[u8] {
        match (&self.payload, &self.source) {
            (Some(p), _) => p,
            (None, Some(src)) => src.batch.payload(src.index),
            (None, None) => &[],
        }
    }

    /// Move the message to another stream.
    pub fn set_stream(&mut self, stream: impl Into<String>) {
        self.stream = Some(stream.into());
    }

    /// Change the timestamp.
    pub fn set_timestamp_ms(&mut self, timestamp_ms: u64) {
        self.timestamp_ms = timestamp_ms;
    }

    /// Replace the payload (forgets the parsed JSON).
    pub fn set_payload(&mut self, payload: impl Into<Vec<u8>>) {
        self.payload = Some(payload.into());
        self.json = OnceCell::new();
    }

    /// Take the message apart: `(stream, timestamp_ms, payload)` (copies
    /// what is still read in place).
    pub fn into_parts(self) -> (String, u64, Vec<u8>) {
        let stream = match self.stream {
            Some(s) => s,
            None => self.stream().to_string(),
        };
        let payload = match self.payload {
            Some(p) => p,
            None => match &self.source {
                Some(src) => src.batch.payload(src.index).to_vec(),
                None => Vec::new(),
            },
        };
        (stream, self.timestamp_ms, payload)
    }

    /// The payload parsed as JSON (parsed once, then cached).
    ///
    /// Error: `payload is not JSON: expected value at line 1 column 1`.
    pub fn json(&self) -> Result<&Value> {
        self.json
            .get_or_init(|| {
                serde_json::from_slice(self.payload())
                    .map_err(|e| format!("payload is not JSON: {e}"))
            })
            .as_ref()
            .map_err(|e| Error::new(e.clone()))
    }

    /// The JSON value at `path`: a top-level key (`"temp"`), or a dotted
    /// path into nested objects (`"sensor.temp"`). A top-level key that
    /// itself contains dots is matched first, as written.
    ///
    /// Errors: `payload is not JSON: …`, `field `sensor.temp` missing`.
    pub fn json_field(&self, path: &str) -> Result<&Value> {
        let root = self.json()?;
        let serde_json::Value::Object(top) = root else {
            return Err(not_object(path, json::value_kind(root)));
        };
        if let Some(value) = top.get(path) {
            return Ok(value);
        }
        let mut current = root;
        for segment in path.split('.') {
            current = match current {
                Value::Object(map) => map.get(segment),
                _ => None,
            }
            .ok_or_else(|| missing(path))?;
        }
        Ok(current)
    }

    /// The number at `path` (see [`json_field`](Message::json_field)), read
    /// without building the document.
    ///
    /// Errors: `payload is not JSON: …`, `field `temp` missing`,
    /// `field `temp` is not a number (found a string)`.
    pub fn json_f64(&self, path: &str) -> Result<f64> {
        match self.scalar(path)? {
            Scalar::Number { f, .. } => Ok(f),
            other => Err(wrong_type(path, "a number", &other)),
        }
    }

    /// The non-negative integer at `path` (an event time in ms, a counter),
    /// read without building the document.
    ///
    /// Errors as [`json_f64`](Message::json_f64), and
    /// `field `ts` is not an unsigned integer (found -1.5)`.
    pub fn json_u64(&self, path: &str) -> Result<u64> {
        match self.scalar(path)? {
            Scalar::Number { u: Some(u), .. } => Ok(u),
            Scalar::Number { f, u: None } => Err(Error::new(format!(
                "field `{path}` is not an unsigned integer (found {f})"
            ))),
            other => Err(wrong_type(path, "an unsigned integer", &other)),
        }
    }

    /// The string at `path`, read without building the document.
    pub fn json_str(&self, path: &str) -> Result<String> {
        match self.scalar(path)? {
            Scalar::Str(s) => Ok(s),
            other => Err(wrong_type(path, "a string", &other)),
        }
    }

    fn scalar(&self, path: &str) -> Result<Scalar> {
        let lookup = match self.json.get() {
            Some(Ok(value)) => json::lookup_value(value, path),
            Some(Err(e)) => return Err(Error::new(e.clone())),
            None => json::lookup(self.payload(), path)
                .map_err(|e| Error::new(format!("payload is not JSON: {e}")))?,
        };
        match lookup {
            Lookup::Found(s) => Ok(s),
            Lookup::Missing => Err(missing(path)),
            Lookup::NotObject(kind) => Err(not_object(path, kind)),
        }
    }
}

fn missing(path: &str) -> Error {
    Error::new(format!("field `{path}` missing"))
}

fn not_object(path: &str, kind: &str) -> Error {
    Error::new(format!(
        "field `{path}` missing: the payload is {kind}, not a JSON object"
    ))
}

fn wrong_type(path: &str, wanted: &str, found: &Scalar) -> Error {
    Error::new(format!(
        "field `{path}` is not {wanted} (found {})",
        found.kind()
    ))
}

impl Clone for Message {
    fn clone(&self) -> Self {
        Self {
            source: self.source.clone(),
            stream: self.stream.clone(),
            timestamp_ms: self.timestamp_ms,
            payload: self.payload.clone(),
            json: self.json.clone(),
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("stream", &self.stream())
            .field("timestamp_ms", &self.timestamp_ms)
            .field("payload", &String::from_utf8_lossy(self.payload()))
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::batch::tests::wit_batch;

    fn msg(payload: &str) -> Message {
        Message::new("sensors/t1", 1_000, payload)
    }

    #[test]
    fn json_f64_reads_top_level_and_dotted_fields() {
        let m = msg(r#"{"temp": 21.5, "sensor": {"temp": -3, "deep": {"x": 7}}, "a.b": 1}"#);
        assert_eq!(m.json_f64("temp").unwrap(), 21.5);
        assert_eq!(m.json_f64("sensor.temp").unwrap(), -3.0);
        assert_eq!(m.json_f64("sensor.deep.x").unwrap(), 7.0);
        // A top-level key containing dots wins over the nested path.
        assert_eq!(m.json_f64("a.b").unwrap(), 1.0);
        // The same after the document was parsed.
        m.json().unwrap();
        assert_eq!(m.json_f64("sensor.deep.x").unwrap(), 7.0);
    }

    #[test]
    fn json_f64_errors_name_the_field_and_the_problem() {
        let m = msg(r#"{"temp": "hot", "n": null, "sensor": {"x": 1}}"#);
        for parsed in [false, true] {
            if parsed {
                m.json().unwrap();
            }
            assert_eq!(
                m.json_f64("temp").unwrap_err().message(),
                "field `temp` is not a number (found a string)"
            );
            assert_eq!(
                m.json_f64("n").unwrap_err().message(),
                "field `n` is not a number (found null)"
            );
            assert_eq!(
                m.json_f64("missing").unwrap_err().message(),
                "field `missing` missing"
            );
            assert_eq!(
                m.json_f64("sensor.y").unwrap_err().message(),
                "field `sensor.y` missing"
            );
            assert_eq!(
                m.json_f64("sensor.x.y").unwrap_err().message(),
                "field `sensor.x.y` missing"
            );
        }
    }

    #[test]
    fn json_u64_and_json_str() {
        let m = msg(r#"{"ts": 1764000000123, "neg": -1, "f": 1.5, "name": "s\u00e9"}"#);
        assert_eq!(m.json_u64("ts").unwrap(), 1_764_000_000_123);
        assert_eq!(
            m.json_u64("neg").unwrap_err().message(),
            "field `neg` is not an unsigned integer (found -1)"
        );
        assert_eq!(
            m.json_u64("f").unwrap_err().message(),
            "field `f` is not an unsigned integer (found 1.5)"
        );
        assert_eq!(m.json_str("name").unwrap(), "sé");
        assert_eq!(
            m.json_str("ts").unwrap_err().message(),
            "field `ts` is not a string (found a number)"
        );
    }

    #[test]
    fn non_json_and_non_object_payloads_are_errors() {
        let err = msg("not json").json_f64("temp").unwrap_err();
        assert!(
            err.message().starts_with("payload is not JSON: "),
            "{}",
            err.message()
        );
        let err = msg("[1, 2]").json_f64("temp").unwrap_err();
        assert_eq!(
            err.message(),
            "field `temp` missing: the payload is an array, not a JSON object"
        );
        // The failed parse is cached and reported again, consistently.
        let m = msg("{");
        let first = m.json().unwrap_err().message().to_string();
        assert_eq!(m.json().unwrap_err().message(), first);
        assert!(m
            .json_f64("x")
            .unwrap_err()
            .message()
            .starts_with("payload is not JSON"));
    }

    #[test]
    fn inputs_read_in_place_until_changed() {
        let batch = Rc::new(
            Batch::decode(wit_batch(&[("a/1", 5, br#"{"t":1}"#), ("b", 6, b"raw")])).unwrap(),
        );
        let mut m = Message::input(&batch, 1);
        assert_eq!(
            (m.stream(), m.timestamp_ms(), m.payload()),
            ("b", 6, &b"raw"[..])
        );
        let (src, stream, payload) = m.parts();
        assert_eq!(
            (src.map(|s| s.index), stream, payload),
            (Some(1), None, None)
        );
        m.set_stream("c");
        assert_eq!(m.parts().1, Some("c"));
        assert_eq!(m.payload(), b"raw", "the payload is still read in place");
        let clone = m.clone();
        assert_eq!(clone.into_parts(), ("c".to_string(), 6, b"raw".to_vec()));
        let first = Message::input(&batch, 0);
        assert_eq!(first.json_f64("t").unwrap(), 1.0);
        let mut changed = first.clone();
        changed.set_payload(r#"{"t":2}"#);
        assert_eq!(changed.json_f64("t").unwrap(), 2.0);
    }
}
