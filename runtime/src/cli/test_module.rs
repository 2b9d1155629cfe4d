//! `fogline-edge test-module`: run one module over sample data.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use fogline_edge::functions::{FunctionInstance, FunctionRuntime, Limits, RuntimeOptions};
use fogline_edge::message::Message;

/// Samples and the file line each came from (blank lines are skipped).
fn parse_samples(text: &str) -> (Vec<Message>, Vec<usize>) {
    let mut out = Vec::new();
    let mut lines = Vec::new();
    let base = fogline_edge::clock::now_ms();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        // A line that is not JSON is passed as a raw payload: that is how to
        // see what a function does with garbage from a sensor.
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or(serde_json::Value::Null);
        let wrapped = v.get("payload").is_some() && v.get("stream").is_some();
        let msg = if wrapped {
            let payload = match &v["payload"] {
                serde_json::Value::String(s) => s.clone().into_bytes(),
                other => other.to_string().into_bytes(),
            };
            Message {
                stream: v["stream"].as_str().unwrap_or("test").to_string(),
                timestamp_ms: v["timestamp_ms"].as_u64().unwrap_or(base + i as u64),
                payload,
            }
        } else {
            Message {
                stream: "test".to_string(),
                timestamp_ms: base + i as u64,
                payload: line.as_bytes().to_vec(),
            }
        };
        out.push(msg);
        lines.push(i + 1);
    }
    (out, lines)
}

fn print(m: &Message) {
    let payload: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&m.payload).into_owned())
    });
    println!(
        "{}",
        serde_json::json!({"stream": m.stream, "timestamp_ms": m.timestamp_ms, "payload": payload})
    );
}

pub fn run(
    module: &Path,
    input: &Path,
    config: Option<&Path>,
    memory_mib: usize,
    timeout: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(input)
        .with_context(|| format!("cannot read samples {}", input.display()))?;
    let (samples, lines) = parse_samples(&text);
    if memory_mib == 0 || memory_mib > 4096 {
        bail!("--memory-mib {memory_mib} is outside 1..=4096");
    }
    let config_json = match config {
        Some(p) => {
            let t = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read function config {}", p.display()))?;
            let table: toml::Table =
                toml::from_str(&t).with_context(|| format!("invalid TOML in {}", p.display()))?;
            fogline_edge::pipeline::config_json(&table).to_string()
        }
        None => "{}".to_string(),
    };
    let rt = FunctionRuntime::new(RuntimeOptions::default())?;
    let m = rt.load(module)?;
    let name = module
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "module".into());
    let limits = Limits {
        memory_bytes: memory_mib << 20,
        call_timeout: timeout,
        ..Limits::default()
    };
    let mut f = FunctionInstance::new(&rt, &m, &name, &config_json, limits)?;
    let out = f.process(&samples)?;
    let emitted = out.messages(&samples);
    for m in &emitted {
        print(m);
    }
    for r in &out.refused {
        eprintln!(
            "refused output{}: {}",
            r.input
                .map(|i| format!(
                    " of input {i} ({} line {})",
                    input.display(),
                    lines.get(i as usize).copied().unwrap_or(0)
                ))
                .unwrap_or_default(),
            r.error
        );
    }
    for r in &out.rejected {
        eprintln!(
            "rejected input {} ({} line {}): {}",
            r.index,
            input.display(),
            lines.get(r.index).copied().unwrap_or(0),
            r.error
        );
    }
    // Close every open window: tick far past the last sample.
    let last = samples.iter().map(|m| m.timestamp_ms).max().unwrap_or(0);
    let ticked = f.tick(last.saturating_add(24 * 3600 * 1000))?;
    let ticked = ticked.messages(&[]);
    for m in &ticked {
        print(m);
    }
    eprintln!(
        "{} input(s): {} emitted, {} rejected, {} emitted on tick",
        samples.len(),
        emitted.len(),
        out.rejected.len(),
        ticked.len()
    );
    if samples.is_empty() {
        bail!("{} holds no samples", input.display());
    }
    Ok(ExitCode::SUCCESS)
}
