//! Deadband (report by exception): passes a sensor's reading only when its
//! value moved by more than `deadband` since the last reading passed, or
//! when nothing was passed for `max_silence_ms` (an integrity report, so
//! the cloud can tell a steady sensor from a dead one).
//!
//! ```toml
//! [functions.deadband]
//! module = "deadband.wasm"
//! config = { field = "temp", deadband = 0.5, max_silence_ms = 600000 }
//! # optional: sensor_field = "id"   one sensor per value of this payload field
//! #                                 (default: one sensor per stream)
//! ```
//!
//! The last value passed per sensor is durable state: after a restart, a
//! crash or a deploy the filter resumes from what it last reported, so a
//! restart neither repeats a report nor swallows a change. A payload that is
//! not JSON or lacks the numeric field is rejected (dead-lettered) with the
//! reason.

use fogline_sdk::prelude::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Deadband {
    /// Top-level or dotted path of the numeric field.
    field: String,
    /// Pass when |value - last passed| > deadband.
    deadband: f64,
    /// Pass anyway when the sensor's last pass is this old (0: never).
    #[serde(default)]
    max_silence_ms: u64,
    /// Tell sensors apart by this payload field instead of by stream.
    sensor_field: Option<String>,
    /// Per sensor: the value and time last passed.
    #[serde(skip)]
    last: Keyed<String, Passed>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Passed {
    value: f64,
    at_ms: u64,
}

impl Deadband {
    fn sensor(&self, msg: &Message) -> Result<String> {
        let Some(field) = &self.sensor_field else {
            return Ok(msg.stream().to_string());
        };
        let id = msg
            .json_field(field)
            .map_err(|_| Error::new(format!("no sensor field `{field}`")))?;
        Ok(match id {
            Value::String(s) => format!("{}/{s}", msg.stream()),
            other => format!("{}/{other}", msg.stream()),
        })
    }
}

impl Function for Deadband {
    fn init(config: Config) -> Result<Self> {
        let f: Deadband = config.parse()?;
        if f.field.is_empty() {
            bail!("invalid config: `field` is empty");
        }
        if !f.deadband.is_finite() || f.deadband < 0.0 {
            bail!(
                "invalid config: `deadband` must be a finite number >= 0, not {}",
                f.deadband
            );
        }
        Ok(f)
    }

    fn on_message(&mut self, msg: Message, out: &mut Output) -> Result<()> {
        // Everything that can fail first: a rejected reading changes no state.
        let value = msg.json_f64(&self.field)?;
        let sensor = self.sensor(&msg)?;
        let now = msg.timestamp_ms();
        let pass = match self.last.get(&sensor) {
            None => true,
            Some(p) => {
                (value - p.value).abs() > self.deadband
                    || (self.max_silence_ms > 0
                        && now.saturating_sub(p.at_ms) >= self.max_silence_ms)
            }
        };
        if pass {
            self.last.insert(sensor, Passed { value, at_ms: now });
            out.emit(msg);
        }
        Ok(())
    }

    fn state(&mut self, state: &mut StateSet<'_>) {
        state.add("last", &mut self.last);
    }
}

export_function!(Deadband);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use fogline_sdk::harness::{Harness, Input};

    const CONFIG: &str = r#"{"field": "temp", "deadband": 0.5, "max_silence_ms": 60000}"#;

    fn temps(out: &fogline_sdk::harness::Outcome) -> Vec<f64> {
        out.emitted
            .iter()
            .map(|e| e.json().unwrap()["temp"].as_f64().unwrap())
            .collect()
    }

    #[test]
    fn passes_only_changes_beyond_the_deadband_per_sensor() {
        let mut h = Harness::<Deadband>::new(CONFIG).unwrap();
        let out = h
            .process([
                Input::json("s/a", 1_000, &json!({"temp": 20.0})),
                Input::json("s/a", 2_000, &json!({"temp": 20.4})),
                Input::json("s/b", 2_000, &json!({"temp": 20.4})),
                Input::json("s/a", 3_000, &json!({"temp": 20.6})),
                Input::json("s/a", 4_000, &json!({"temp": 19.9})),
            ])
            .unwrap();
        assert_eq!(temps(&out), vec![20.0, 20.4, 20.6, 19.9]);
        let streams: Vec<&str> = out.emitted.iter().map(|e| e.stream.as_str()).collect();
        assert_eq!(streams, vec!["s/a", "s/b", "s/a", "s/a"]);
    }

    #[test]
    fn a_silent_sensor_reports_after_max_silence() {
        let mut h = Harness::<Deadband>::new(CONFIG).unwrap();
        h.send_json("s/a", 0, &json!({"temp": 20.0})).unwrap();
        assert!(h
            .send_json("s/a", 59_999, &json!({"temp": 20.0}))
            .unwrap()
            .emitted
            .is_empty());
        assert_eq!(
            temps(&h.send_json("s/a", 60_000, &json!({"temp": 20.0})).unwrap()),
            vec![20.0]
        );
    }

    #[test]
    fn the_last_report_survives_a_restart() {
        let mut h = Harness::<Deadband>::new(CONFIG).unwrap();
        h.send_json("s/a", 1_000, &json!({"temp": 20.0})).unwrap();
        h.restart().unwrap();
        // Without durable state this would pass again as a "first" reading.
        assert!(h
            .send_json("s/a", 2_000, &json!({"temp": 20.1}))
            .unwrap()
            .emitted
            .is_empty());
        assert_eq!(
            temps(&h.send_json("s/a", 3_000, &json!({"temp": 21.0})).unwrap()),
            vec![21.0]
        );
    }

    #[test]
    fn a_bad_reading_is_rejected_and_changes_nothing() {
        let mut h = Harness::<Deadband>::new(CONFIG).unwrap();
        let out = h.send("s/a", 1_000, "not json").unwrap();
        assert_eq!(out.rejected.len(), 1);
        assert!(h.state().is_empty());
        let err = Harness::<Deadband>::new(r#"{"field": "t", "deadband": -1}"#).unwrap_err();
        assert!(err.message().contains("`deadband` must be"), "{err}");
    }

    #[test]
    fn sensors_can_be_told_apart_by_a_payload_field() {
        let cfg = r#"{"field": "v", "deadband": 1, "sensor_field": "id"}"#;
        let mut h = Harness::<Deadband>::new(cfg).unwrap();
        let out = h
            .process([
                Input::json("bus", 1, &json!({"id": "x", "v": 1})),
                Input::json("bus", 2, &json!({"id": "y", "v": 1})),
                Input::json("bus", 3, &json!({"id": "x", "v": 1.5})),
            ])
            .unwrap();
        assert_eq!(out.emitted.len(), 2);
        let out = h.send_json("bus", 4, &json!({"v": 1})).unwrap();
        assert_eq!(out.rejected[0].error, "no sensor field `id`");
    }
}
