//! A test script for a function: samples (one per line) with ticks between
//! them, cut into batches as the daemon would.
//!
//! Each non-blank line is one of
//! - a raw payload: `{"temp": 91.2}` or `not json` (stream `test`, and a
//!   timestamp one second after the previous sample's),
//! - a full message: `{"stream": "s/1", "timestamp_ms": 1767225600000, "payload": {"temp": 91.2}}`
//!   (`timestamp_ms` optional; a string payload is taken as text),
//! - a tick: `{"tick": 1767225660000}` (the gateway clock at the tick).
//!
//! Timestamps are fixed, not read from the clock, so an expected output can
//! hold them.

use std::time::Duration;

use anyhow::{bail, Context};
use fogline_edge::message::Message;
use serde_json::Value;

/// Timestamp of the first sample that names none: 2026-01-01T00:00:00Z.
pub const FIRST_MS: u64 = 1_767_225_600_000;
/// Gap between samples that name no timestamp.
const STEP_MS: u64 = 1_000;

/// One step of a script.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A sample, and the line of the input it came from.
    Sample(Message, usize),
    /// A tick at this gateway time.
    Tick(u64),
}

/// Where samples came from, for messages (`samples.jsonl`, `stdin`).
pub fn parse(text: &str, source: &str) -> anyhow::Result<Vec<Step>> {
    let mut steps = Vec::new();
    let mut next_ms = FIRST_MS;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        // A line that is not JSON is a raw payload: that is how to see what
        // a function does with garbage from a sensor.
        let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        if let Some(t) = v.as_object().and_then(|o| o.get("tick")) {
            let Some(ms) = t.as_u64() else {
                bail!(
                    "{source} line {line_no}: `tick` must be a time in ms since the epoch, not {t}"
                );
            };
            steps.push(Step::Tick(ms));
            next_ms = next_ms.max(ms);
            continue;
        }
        let wrapped = v.get("payload").is_some() && v.get("stream").is_some();
        let msg = if wrapped {
            let Some(stream) = v["stream"].as_str() else {
                bail!("{source} line {line_no}: `stream` must be a string");
            };
            let timestamp_ms = match v.get("timestamp_ms") {
                None => next_ms,
                Some(t) => t.as_u64().with_context(|| {
                    format!("{source} line {line_no}: `timestamp_ms` must be ms since the epoch, not {t}")
                })?,
            };
            Message {
                stream: stream.to_string(),
                timestamp_ms,
                payload: payload_bytes(&v["payload"]),
            }
        } else {
            Message {
                stream: "test".to_string(),
                timestamp_ms: next_ms,
                payload: line.as_bytes().to_vec(),
            }
        };
        next_ms = msg.timestamp_ms.saturating_add(STEP_MS);
        steps.push(Step::Sample(msg, line_no));
    }
    Ok(steps)
}

fn payload_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::String(s) => s.clone().into_bytes(),
        other => other.to_string().into_bytes(),
    }
}

/// `--ticks`: comma-separated gateway times, each `1767225660000` (ms since
/// the epoch), `+10s` (after the first sample of the script) or
/// `every:10s` (each multiple of 10 s from the earliest sample's time to
/// the latest).
pub fn tick_times(spec: &str, steps: &[Step]) -> anyhow::Result<Vec<u64>> {
    let samples = || {
        steps.iter().filter_map(|s| match s {
            Step::Sample(m, _) => Some(m.timestamp_ms),
            Step::Tick(_) => None,
        })
    };
    // `+10s` counts from the first sample in the script; `every:` spans
    // the samples' times.
    let first = samples().next().unwrap_or(FIRST_MS);
    let low = samples().min().unwrap_or(first);
    let last = samples().max().unwrap_or(first);
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let dur = |s: &str| -> anyhow::Result<u64> {
            let d: Duration = humantime::parse_duration(s).with_context(|| {
                format!("--ticks `{item}`: `{s}` is not a duration (10s, 500ms)")
            })?;
            u64::try_from(d.as_millis()).context("duration too long")
        };
        if let Some(every) = item.strip_prefix("every:") {
            let every = dur(every)?;
            if every == 0 {
                bail!("--ticks `{item}`: the interval must be above 0");
            }
            let count = (last - low) / every;
            if count > 100_000 {
                bail!("--ticks `{item}` makes {count} ticks over the samples; at most 100000");
            }
            out.extend((1..=count).map(|k| low - low % every + k * every));
        } else if let Some(after) = item.strip_prefix('+') {
            out.push(first.saturating_add(dur(after)?));
        } else {
            out.push(item.parse().with_context(|| {
                format!("--ticks `{item}`: expected ms since the epoch, `+10s` or `every:10s`")
            })?);
        }
    }
    Ok(out)
}

/// What to hand the function, in order.
#[derive(Debug, PartialEq)]
pub enum Call<'a> {
    /// A batch: the samples and their input lines.
    Process(Vec<(&'a Message, usize)>),
    Tick(u64),
}

/// Cuts the script into calls: up to `batch` samples per `process` call;
/// a tick (inline, or from `ticks`, placed before the first sample past
/// it) ends the batch before it.
pub fn calls<'a>(steps: &'a [Step], ticks: &[u64], batch: usize) -> Vec<Call<'a>> {
    let batch = batch.max(1);
    let mut ticks: Vec<u64> = ticks.to_vec();
    ticks.sort_unstable();
    let mut ticks = ticks.into_iter().peekable();
    let mut out = Vec::new();
    let mut pending: Vec<(&Message, usize)> = Vec::new();
    let flush = |pending: &mut Vec<(&'a Message, usize)>, out: &mut Vec<Call<'a>>| {
        if !pending.is_empty() {
            out.push(Call::Process(std::mem::take(pending)));
        }
    };
    for step in steps {
        match step {
            Step::Tick(ms) => {
                flush(&mut pending, &mut out);
                out.push(Call::Tick(*ms));
            }
            Step::Sample(m, line) => {
                while let Some(t) = ticks.next_if(|t| *t <= m.timestamp_ms) {
                    flush(&mut pending, &mut out);
                    out.push(Call::Tick(t));
                }
                pending.push((m, *line));
                if pending.len() >= batch {
                    flush(&mut pending, &mut out);
                }
            }
        }
    }
    flush(&mut pending, &mut out);
    out.extend(ticks.map(Call::Tick));
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_samples_and_ticks_with_fixed_times() {
        let steps = parse(
            "{\"temp\": 1}\n\nnot json\n{\"tick\": 1767225605000}\n{\"stream\":\"s\",\"timestamp_ms\":1767225610000,\"payload\":\"x\"}\n{\"stream\":\"s\",\"payload\":{\"a\":1}}\n",
            "t",
        )
        .unwrap();
        let ts: Vec<String> = steps
            .iter()
            .map(|s| match s {
                Step::Sample(m, line) => {
                    format!("{line}:{}:{}", m.stream, m.timestamp_ms - FIRST_MS)
                }
                Step::Tick(t) => format!("tick {}", t - FIRST_MS),
            })
            .collect();
        assert_eq!(
            ts,
            [
                "1:test:0",
                "3:test:1000",
                "tick 5000",
                "5:s:10000",
                "6:s:11000"
            ]
        );
        let err = parse("{\"tick\": \"soon\"}", "x.jsonl").unwrap_err();
        assert!(err.to_string().contains("x.jsonl line 1: `tick`"), "{err}");
    }

    #[test]
    fn ticks_cut_batches_before_the_first_sample_past_them() {
        let steps = parse(&"{\"v\":1}\n".repeat(5), "t").unwrap();
        let ticks = tick_times("+1500ms, every:2s", &steps).unwrap();
        assert_eq!(
            ticks,
            vec![FIRST_MS + 1500, FIRST_MS + 2000, FIRST_MS + 4000]
        );
        let shape: Vec<String> = calls(&steps, &ticks, 8)
            .iter()
            .map(|c| match c {
                Call::Process(b) => format!("batch {}", b.len()),
                Call::Tick(t) => format!("tick {}", t - FIRST_MS),
            })
            .collect();
        assert_eq!(
            shape,
            [
                "batch 2",
                "tick 1500",
                "tick 2000",
                "batch 2",
                "tick 4000",
                "batch 1"
            ]
        );
        let sizes: Vec<usize> = calls(&steps, &[], 2)
            .iter()
            .map(|c| match c {
                Call::Process(b) => b.len(),
                Call::Tick(_) => 0,
            })
            .collect();
        assert_eq!(sizes, [2, 2, 1]);
        assert!(tick_times("soon", &steps).is_err());
        assert!(tick_times("every:0s", &steps).is_err());
    }
}
