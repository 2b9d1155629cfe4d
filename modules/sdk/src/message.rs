//! [`Message`]: one input record, with lazily parsed JSON.

use std::cell::OnceCell;
use std::fmt;

use serde_json::Value;

use crate::bindings::Message as WitMessage;
use crate::{Error, Result};

/// One record: a stream (the MQTT topic, or what a function assigned), a
/// timestamp and an opaque payload (JSON by convention).
///
/// The JSON accessors ([`json`](Message::json), [`json_f64`](Message::json_f64),
/// [`json_field`](Message::json_field)) parse the payload at most once per
/// message, on first use, and reuse the parsed value afterwards.
pub struct Message {
    inner: WitMessage,
    // The parse result, success or failure, so a second accessor call does
    // not parse again. Cleared when the payload changes.
    json: OnceCell<std::result::Result<Value, String>>,
}

impl Message {
    /// A new message.
    pub fn new(stream: impl Into<String>, timestamp_ms: u64, payload: impl Into<Vec<u8>>) -> Self {
        Self::from_wit(WitMessage {
            stream: stream.into(),
            timestamp_ms,
            payload: payload.into(),
        })
    }

    pub(crate) fn from_wit(inner: WitMessage) -> Self {
        Self {
            inner,
            json: OnceCell::new(),
        }
    }

    pub(crate) fn into_wit(self) -> WitMessage {
        self.inner
    }

    /// The stream (topic) the message belongs to.
    pub fn stream(&self) -> &str {
        &self.inner.stream
    }

    /// Milliseconds since the Unix epoch.
    pub fn timestamp_ms(&self) -> u64 {
        self.inner.timestamp_ms
    }

    /// The raw payload.
    pub fn payload(&self) -> &[u8] {
        &self.inner.payload
    }

    /// Move the message to another stream.
    pub fn set_stream(&mut self, stream: impl Into<String>) {
        self.inner.stream = stream.into();
    }

    /// Change the timestamp.
    pub fn set_timestamp_ms(&mut self, timestamp_ms: u64) {
        self.inner.timestamp_ms = timestamp_ms;
    }

    /// Replace the payload (forgets the parsed JSON).
    pub fn set_payload(&mut self, payload: impl Into<Vec<u8>>) {
        self.inner.payload = payload.into();
        self.json = OnceCell::new();
    }

    /// Take the message apart: `(stream, timestamp_ms, payload)`.
    pub fn into_parts(self) -> (String, u64, Vec<u8>) {
        (
            self.inner.stream,
            self.inner.timestamp_ms,
            self.inner.payload,
        )
    }

    /// The payload parsed as JSON (parsed once, then cached).
    ///
    /// Error: `payload is not JSON: expected value at line 1 column 1`.
    pub fn json(&self) -> Result<&Value> {
        self.json
            .get_or_init(|| {
                serde_json::from_slice(&self.inner.payload)
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
        let Value::Object(top) = root else {
            return Err(Error::new(format!(
                "field `{path}` missing: the payload is {}, not a JSON object",
                kind(root)
            )));
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
            .ok_or_else(|| Error::new(format!("field `{path}` missing")))?;
        }
        Ok(current)
    }

    /// The number at `path` (see [`json_field`](Message::json_field)).
    ///
    /// Errors: `payload is not JSON: …`, `field `temp` missing`,
    /// `field `temp` is not a number (found a string)`.
    pub fn json_f64(&self, path: &str) -> Result<f64> {
        let value = self.json_field(path)?;
        value.as_f64().ok_or_else(|| {
            Error::new(format!(
                "field `{path}` is not a number (found {})",
                kind(value)
            ))
        })
    }
}

/// "a string", "null", … for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Clone for Message {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            json: self.json.clone(),
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("stream", &self.inner.stream)
            .field("timestamp_ms", &self.inner.timestamp_ms)
            .field("payload", &String::from_utf8_lossy(&self.inner.payload))
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn json_f64_errors_name_the_field_and_the_problem() {
        let m = msg(r#"{"temp": "hot", "n": null, "sensor": {"x": 1}}"#);
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
    }

    #[test]
    fn set_payload_forgets_the_parsed_json() {
        let mut m = msg(r#"{"temp": 1}"#);
        assert_eq!(m.json_f64("temp").unwrap(), 1.0);
        m.set_payload(r#"{"temp": 2}"#);
        assert_eq!(m.json_f64("temp").unwrap(), 2.0);
        m.set_stream("other");
        m.set_timestamp_ms(5);
        let clone = m.clone();
        assert_eq!(
            clone.into_parts(),
            ("other".to_string(), 5, br#"{"temp": 2}"#.to_vec())
        );
    }
}
