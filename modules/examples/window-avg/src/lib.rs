//! Per-stream window averages of a numeric JSON field, with durable state:
//! open windows survive restarts, crashes and deploys, and each reading the
//! gateway acknowledged is counted in exactly one emitted window.
//!
//! ```toml
//! [functions.avg]
//! module = "window_avg.wasm"
//! config = { field = "temp", window_ms = 10000 }
//! # optional: hop_ms = 5000         hopping windows (a reading counts in each window holding it)
//! #           lateness_ms = 2000    keep windows open this long past their end
//! #           time_field = "ts"     event time (ms) from the payload instead of ingest time
//! #           output_stream = "stats/temp"   default "<stream>/avg"
//! ```
//!
//! Windows are aligned to multiples of `window_ms` (or `hop_ms`). With
//! ingest time (the default) the watermark is the tick's clock, which never
//! goes backwards on a gateway, so no reading is ever late. With event time
//! the watermark is the latest event time seen, and a reading for a window
//! already emitted is rejected as late (dead-lettered, replayable). Each
//! window is emitted once, in order of its end, as
//!
//! ```json
//! {"stream":"sensors/t1","window_start_ms":0,"window_end_ms":10000,
//!  "count":3,"sum":64.5,"avg":21.5,"min":20.0,"max":23.0}
//! ```
//!
//! on `output_stream` (default `<stream>/avg`), with timestamp = window end.
//! Inputs are consumed, not passed on. A reading that is not JSON or lacks
//! the numeric field is rejected before it touches any window.

use fogline_sdk::prelude::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    field: String,
    window_ms: u64,
    hop_ms: Option<u64>,
    #[serde(default)]
    lateness_ms: u64,
    time_field: Option<String>,
    output_stream: Option<String>,
}

/// What a window accumulates.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stats {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Stats {
    fn add(&mut self, v: f64) {
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }
}

impl Aggregate for Stats {
    fn merge(&mut self, other: Self) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }
}

struct WindowAvg {
    field: String,
    time_field: Option<String>,
    output_stream: Option<String>,
    windows: Windows<Stats>,
}

impl Function for WindowAvg {
    fn init(config: fogline_sdk::Config) -> Result<Self> {
        let c: Config = config.parse()?;
        if c.field.is_empty() {
            bail!("invalid config: `field` is empty");
        }
        if c.window_ms == 0 {
            bail!("invalid config: `window_ms` must be > 0");
        }
        if c.output_stream.as_deref() == Some("") {
            bail!("invalid config: `output_stream` is empty");
        }
        let windows = match c.hop_ms {
            None => Windows::tumbling(c.window_ms),
            Some(hop) => Windows::hopping(c.window_ms, hop),
        }
        .map_err(|e| e.context("invalid config"))?
        .allowed_lateness(c.lateness_ms);
        Ok(WindowAvg {
            field: c.field,
            time_field: c.time_field,
            output_stream: c.output_stream,
            windows,
        })
    }

    fn on_message(&mut self, msg: Message, _out: &mut Output) -> Result<()> {
        // Everything that can fail comes before the state changes.
        let value = msg.json_f64(&self.field)?;
        let time = match &self.time_field {
            Some(f) => msg.json_u64(f)?,
            None => msg.timestamp_ms(),
        };
        self.windows.add(msg.stream(), time, |s| s.add(value))?;
        if self.time_field.is_some() {
            self.windows.advance(time);
        }
        Ok(())
    }

    fn on_tick(&mut self, now_ms: u64, out: &mut Output) -> Result<()> {
        if self.time_field.is_none() {
            self.windows.advance(now_ms);
        }
        let output_stream = &self.output_stream;
        self.windows.close(|stream, w| {
            let s = &w.value;
            let target = match output_stream {
                Some(t) => t.clone(),
                None => format!("{stream}/avg"),
            };
            out.emit_json(
                target,
                w.end_ms,
                &json!({
                    "stream": stream,
                    "window_start_ms": w.start_ms,
                    "window_end_ms": w.end_ms,
                    "count": s.count,
                    "sum": s.sum,
                    "avg": s.sum / s.count as f64,
                    "min": s.min,
                    "max": s.max,
                }),
            )
        })
    }

    fn state(&mut self, state: &mut StateSet<'_>) {
        state.add("windows", &mut self.windows);
    }
}

export_function!(WindowAvg);
