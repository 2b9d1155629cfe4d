//! Downsampler: per stream (or per sensor field), passes the first reading
//! of each `interval_ms` and drops the rest — a 10 Hz sensor becomes one
//! reading a minute for the cloud, while the function before it still sees
//! every sample.
//!
//! ```toml
//! [functions.downsample]
//! module = "downsample.wasm"
//! config = { interval_ms = 60000 }
//! # optional: sensor_field = "id"   one series per value of this payload field
//! ```
//!
//! Intervals are aligned to multiples of `interval_ms` on the reading's
//! timestamp (the gateway's ingest clock), so every gateway reports on the
//! same boundaries. The interval last passed per series is durable state: a
//! restart inside an interval does not pass a second reading for it.

use fogline_sdk::prelude::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Downsample {
    interval_ms: u64,
    sensor_field: Option<String>,
    /// Per series: the start of the interval last passed.
    #[serde(skip)]
    passed: Keyed<String, u64>,
}

impl Function for Downsample {
    fn init(config: Config) -> Result<Self> {
        let f: Downsample = config.parse()?;
        if f.interval_ms == 0 {
            bail!("invalid config: `interval_ms` must be above 0");
        }
        Ok(f)
    }

    fn on_message(&mut self, msg: Message, out: &mut Output) -> Result<()> {
        let series = match &self.sensor_field {
            None => msg.stream().to_string(),
            Some(field) => {
                let id = msg.json_field(field)?;
                match id {
                    Value::String(s) => format!("{}/{s}", msg.stream()),
                    other => format!("{}/{other}", msg.stream()),
                }
            }
        };
        let start = msg.timestamp_ms() - msg.timestamp_ms() % self.interval_ms;
        if self.passed.get(&series).is_some_and(|&p| p >= start) {
            return Ok(());
        }
        self.passed.insert(series, start);
        out.emit(msg);
        Ok(())
    }

    fn state(&mut self, state: &mut StateSet<'_>) {
        state.add("passed", &mut self.passed);
    }
}

export_function!(Downsample);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use fogline_sdk::harness::{Harness, Input};

    #[test]
    fn the_first_reading_of_each_interval_passes_per_stream() {
        let mut h = Harness::<Downsample>::new(r#"{"interval_ms": 1000}"#).unwrap();
        let out = h
            .process([
                Input::json("a", 10_000, &json!({"v": 1})),
                Input::json("a", 10_400, &json!({"v": 2})),
                Input::json("b", 10_500, &json!({"v": 3})),
                Input::json("a", 10_999, &json!({"v": 4})),
                Input::json("a", 11_000, &json!({"v": 5})),
            ])
            .unwrap();
        let passed: Vec<Option<u32>> = out.emitted.iter().map(|e| e.input).collect();
        assert_eq!(passed, vec![Some(0), Some(2), Some(4)]);
    }

    #[test]
    fn a_restart_inside_an_interval_passes_nothing_twice() {
        let mut h = Harness::<Downsample>::new(r#"{"interval_ms": 1000}"#).unwrap();
        assert_eq!(
            h.send_json("a", 10_000, &json!({})).unwrap().emitted.len(),
            1
        );
        h.restart().unwrap();
        assert!(h
            .send_json("a", 10_500, &json!({}))
            .unwrap()
            .emitted
            .is_empty());
        assert!(Harness::<Downsample>::new(r#"{"interval_ms": 0}"#).is_err());
    }
}
