//! Per-stream tumbling-window average of a numeric JSON field.
//!
//! ```toml
//! [functions.avg]
//! module = "window_avg.wasm"
//! config = { field = "temp", window_ms = 10000 }   # output_stream = "stats/temp"
//! ```
//!
//! Windows are aligned to multiples of `window_ms` on the *message*
//! timestamp: a reading at `t` falls in `[t - t % window_ms, … + window_ms)`.
//! Each input stream has its own windows. On `tick(now)` every window whose
//! end is `<= now` is emitted, in order of window start then stream, as
//!
//! ```json
//! {"stream":"sensors/t1","window_start_ms":0,"window_end_ms":10000,
//!  "count":3,"avg":21.5,"min":20.0,"max":23.0}
//! ```
//!
//! on `output_stream` (default `<stream>/avg`), with timestamp = window end.
//! Inputs are consumed, not passed on.
//!
//! Late data: a reading whose window ends at or before the last window
//! already emitted for its stream is rejected ("late reading"), since that
//! window's average is already out. A reading that is not JSON or lacks the
//! numeric field is rejected too. State lives in the instance: a restart
//! (after a trap) loses open windows.

use std::collections::BTreeMap;

use fogline_sdk::prelude::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    field: String,
    window_ms: u64,
    output_stream: Option<String>,
}

struct WindowAvg {
    field: String,
    window_ms: u64,
    output_stream: Option<String>,
    /// Open windows by (window start, stream): iteration order is emission order.
    open: BTreeMap<(u64, String), Stats>,
    /// Per stream: end of the last window emitted. Readings at or before it are late.
    closed_until: BTreeMap<String, u64>,
}

struct Stats {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Function for WindowAvg {
    fn init(config: fogline_sdk::Config) -> Result<Self> {
        let Config {
            field,
            window_ms,
            output_stream,
        } = config.parse()?;
        if field.is_empty() {
            bail!("invalid config: `field` is empty");
        }
        if window_ms == 0 {
            bail!("invalid config: `window_ms` must be > 0");
        }
        if output_stream.as_deref() == Some("") {
            bail!("invalid config: `output_stream` is empty");
        }
        Ok(WindowAvg {
            field,
            window_ms,
            output_stream,
            open: BTreeMap::new(),
            closed_until: BTreeMap::new(),
        })
    }

    fn on_message(&mut self, msg: Message, _out: &mut Output) -> Result<()> {
        let value = msg.json_f64(&self.field)?;
        let ts = msg.timestamp_ms();
        let start = ts - ts % self.window_ms;
        if let Some(&closed) = self.closed_until.get(msg.stream()) {
            if start < closed {
                bail!(
                    "late reading: timestamp {ts} ms falls in window [{start}, {}) but windows up to {closed} ms were already emitted for stream `{}`",
                    start.saturating_add(self.window_ms),
                    msg.stream()
                );
            }
        }
        let (stream, _, _) = msg.into_parts();
        self.open
            .entry((start, stream))
            .and_modify(|s| {
                s.count += 1;
                s.sum += value;
                s.min = s.min.min(value);
                s.max = s.max.max(value);
            })
            .or_insert(Stats {
                count: 1,
                sum: value,
                min: value,
                max: value,
            });
        Ok(())
    }

    fn on_tick(&mut self, now_ms: u64, out: &mut Output) -> Result<()> {
        // Windows are ordered by start; those that ended by `now` form a prefix.
        while let Some(entry) = self.open.first_entry() {
            let (start, _) = *entry.key();
            let end = start.saturating_add(self.window_ms);
            if end > now_ms {
                break;
            }
            let ((_, stream), stats) = entry.remove_entry();
            let output_stream = match &self.output_stream {
                Some(s) => s.clone(),
                None => format!("{stream}/avg"),
            };
            out.emit_json(
                output_stream,
                end,
                &json!({
                    "stream": stream,
                    "window_start_ms": start,
                    "window_end_ms": end,
                    "count": stats.count,
                    "avg": stats.sum / stats.count as f64,
                    "min": stats.min,
                    "max": stats.max,
                }),
            )?;
            let closed = self.closed_until.entry(stream).or_insert(end);
            *closed = (*closed).max(end);
        }
        Ok(())
    }
}

export_function!(WindowAvg);
