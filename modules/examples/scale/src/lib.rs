//! Map: converts a numeric JSON field to engineering units,
//! `value × factor + offset` (°F from °C: factor 1.8, offset 32; a 4–20 mA
//! loop to 0–100 %: factor 6.25, offset -25), optionally into another field
//! and onto another stream.
//!
//! ```toml
//! [functions.to_fahrenheit]
//! module = "scale.wasm"
//! config = { field = "temp", factor = 1.8, offset = 32.0 }
//! # optional: output_field = "temp_f"    keep the input field, add this one
//! #           output_stream = "{stream}/f"   default: the input's stream
//! #           decimals = 2              round the result
//! ```
//!
//! Every other field of the payload is kept. A payload that is not a JSON
//! object or lacks the numeric field is rejected (dead-lettered) with the
//! reason. Stateless: a restart changes nothing.

use fogline_sdk::prelude::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Scale {
    field: String,
    #[serde(default = "one")]
    factor: f64,
    #[serde(default)]
    offset: f64,
    output_field: Option<String>,
    /// `{stream}` stands for the input's stream.
    output_stream: Option<String>,
    decimals: Option<u32>,
}

fn one() -> f64 {
    1.0
}

impl Function for Scale {
    fn init(config: Config) -> Result<Self> {
        let f: Scale = config.parse()?;
        if f.field.is_empty() {
            bail!("invalid config: `field` is empty");
        }
        if !f.factor.is_finite() || !f.offset.is_finite() {
            bail!("invalid config: `factor` and `offset` must be finite numbers");
        }
        if f.decimals.is_some_and(|d| d > 15) {
            bail!("invalid config: `decimals` is at most 15");
        }
        Ok(f)
    }

    fn on_message(&mut self, msg: Message, out: &mut Output) -> Result<()> {
        let mut value = msg.json_f64(&self.field)? * self.factor + self.offset;
        if let Some(d) = self.decimals {
            let p = 10f64.powi(d as i32);
            value = (value * p).round() / p;
        }
        let mut doc = msg.json()?.clone();
        let Some(obj) = doc.as_object_mut() else {
            bail!("payload is not a JSON object");
        };
        let target = self.output_field.as_deref().unwrap_or(&self.field);
        obj.insert(target.to_string(), json!(value));
        let stream = match &self.output_stream {
            Some(s) => s.replace("{stream}", msg.stream()),
            None => msg.stream().to_string(),
        };
        out.emit_json(stream, msg.timestamp_ms(), &doc)
    }
}

export_function!(Scale);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use fogline_sdk::harness::Harness;

    #[test]
    fn converts_the_field_and_keeps_the_rest() {
        let cfg = r#"{"field": "temp", "factor": 1.8, "offset": 32, "output_field": "temp_f", "output_stream": "{stream}/f", "decimals": 1}"#;
        let mut h = Harness::<Scale>::new(cfg).unwrap();
        let out = h
            .send_json("s/1", 5, &json!({"temp": 21.5, "id": "a"}))
            .unwrap();
        assert_eq!(out.emitted[0].stream, "s/1/f");
        assert_eq!(out.emitted[0].timestamp_ms, 5);
        assert_eq!(
            out.emitted[0].json().unwrap(),
            json!({"temp": 21.5, "temp_f": 70.7, "id": "a"})
        );
    }

    #[test]
    fn what_cannot_be_converted_is_rejected() {
        let mut h = Harness::<Scale>::new(r#"{"field": "temp"}"#).unwrap();
        let out = h.send("s/1", 5, "12").unwrap();
        assert_eq!(out.rejected.len(), 1);
        assert!(out.emitted.is_empty());
        let out = h.send_json("s/1", 5, &json!({"temp": "hot"})).unwrap();
        assert!(
            out.rejected[0].error.contains("not a number"),
            "{:?}",
            out.rejected
        );
        assert!(Harness::<Scale>::new(r#"{"field": "t", "fudge": 1}"#).is_err());
    }
}
