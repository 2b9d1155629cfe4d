//! Alert that drives an actuator: when a reading's field crosses `above`,
//! emits a command (`{"command": "on", ...}`) on the actuator's stream; when
//! it falls back below `clear_below` (hysteresis, so a value hovering at the
//! threshold does not flap the actuator), emits `{"command": "off", ...}`.
//! Readings themselves pass on unchanged, so the cloud still gets them.
//!
//! ```toml
//! [functions.overheat]
//! module = "alert.wasm"
//! config = { field = "temp", above = 80.0, clear_below = 75.0, command_stream = "actuators/{stream}/fan" }
//! # optional: pass_readings = false   emit only the commands
//! ```
//!
//! Whether each stream is in alarm is durable state: a restart neither
//! repeats an `on` nor forgets that `off` is still owed. With the pipeline's
//! outputs served to local subscribers the actuator gets the command on the
//! gateway itself, without a cloud round trip.

use fogline_sdk::prelude::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Alert {
    field: String,
    above: f64,
    clear_below: Option<f64>,
    /// `{stream}` stands for the reading's stream.
    command_stream: String,
    #[serde(default = "yes")]
    pass_readings: bool,
    /// Streams in alarm.
    #[serde(skip)]
    alarmed: Keyed<String, bool>,
}

fn yes() -> bool {
    true
}

impl Function for Alert {
    fn init(config: Config) -> Result<Self> {
        let f: Alert = config.parse()?;
        if f.field.is_empty() || f.command_stream.is_empty() {
            bail!("invalid config: `field` and `command_stream` must not be empty");
        }
        if f.clear_below.is_some_and(|c| c > f.above) {
            bail!(
                "invalid config: `clear_below` ({}) is above `above` ({})",
                f.clear_below.unwrap_or_default(),
                f.above
            );
        }
        Ok(f)
    }

    fn on_message(&mut self, msg: Message, out: &mut Output) -> Result<()> {
        let value = msg.json_f64(&self.field)?;
        let stream = msg.stream().to_string();
        let on = self.alarmed.get(&stream).copied().unwrap_or(false);
        let clear = self.clear_below.unwrap_or(self.above);
        let command = match (on, value) {
            (false, v) if v > self.above => Some("on"),
            (true, v) if v < clear => Some("off"),
            _ => None,
        };
        if let Some(command) = command {
            let target = self.command_stream.replace("{stream}", &stream);
            out.emit_json(
                target,
                msg.timestamp_ms(),
                &json!({"command": command, "stream": stream, "value": value, "at_ms": msg.timestamp_ms()}),
            )?;
            self.alarmed.insert(stream, command == "on");
        }
        if self.pass_readings {
            out.emit(msg);
        }
        Ok(())
    }

    fn state(&mut self, state: &mut StateSet<'_>) {
        state.add("alarmed", &mut self.alarmed);
    }
}

export_function!(Alert);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use fogline_sdk::harness::Harness;

    const CONFIG: &str = r#"{"field": "temp", "above": 80, "clear_below": 75, "command_stream": "actuators/{stream}/fan", "pass_readings": false}"#;

    fn commands(h: &mut Harness<Alert>, temps: &[f64]) -> Vec<String> {
        let mut out = Vec::new();
        for (i, t) in temps.iter().enumerate() {
            for e in h
                .send_json("m/1", i as u64, &json!({"temp": t}))
                .unwrap()
                .emitted
            {
                assert_eq!(e.stream, "actuators/m/1/fan");
                out.push(e.json().unwrap()["command"].as_str().unwrap().to_string());
            }
        }
        out
    }

    #[test]
    fn one_command_per_crossing_with_hysteresis() {
        let mut h = Harness::<Alert>::new(CONFIG).unwrap();
        assert_eq!(
            commands(&mut h, &[70.0, 81.0, 85.0, 79.0, 81.0, 74.0, 76.0, 90.0]),
            vec!["on", "off", "on"]
        );
    }

    #[test]
    fn the_alarm_survives_a_restart() {
        let mut h = Harness::<Alert>::new(CONFIG).unwrap();
        assert_eq!(commands(&mut h, &[90.0]), vec!["on"]);
        h.restart().unwrap();
        assert_eq!(commands(&mut h, &[91.0, 60.0]), vec!["off"]);
        let err = Harness::<Alert>::new(
            r#"{"field": "t", "above": 1, "clear_below": 2, "command_stream": "x"}"#,
        )
        .unwrap_err();
        assert!(
            err.message().contains("`clear_below` (2) is above"),
            "{err}"
        );
    }
}
