//! `fogline-edge module test`: run a function over a script of samples and
//! ticks with the daemon's limits and batch size, print what it emits, and
//! compare it with an expected output.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use fogline_edge::config::EdgeConfig;
use fogline_edge::functions::{FunctionInstance, FunctionRuntime, Limits, RuntimeOptions};
use fogline_edge::message::Message;
use serde_json::Value;

use super::script::{self, Call, Step};

/// What to run, and how.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// The function's crate (built first, as `module build` does). Default:
    /// the current directory, or with `--config` and no crate, the module
    /// that config loads. Not with `--wasm`.
    pub dir: Option<PathBuf>,
    /// Run this component instead of building a crate.
    #[arg(long, conflicts_with = "dir")]
    pub wasm: Option<PathBuf>,
    /// The script: one sample per line (a payload, or
    /// `{"stream": .., "timestamp_ms": .., "payload": ..}`), and ticks
    /// `{"tick": <ms>}`. `-` reads standard input. Default: `samples.jsonl`
    /// in the crate.
    #[arg(long, short)]
    pub input: Option<PathBuf>,
    /// Compare what the function emits with this file (same line format as
    /// the output); exit 1 with a diff when they differ.
    #[arg(long)]
    pub expect: Option<PathBuf>,
    /// Extra ticks: comma-separated gateway times, each ms since the epoch,
    /// `+10s` (after the first sample) or `every:10s`.
    #[arg(long)]
    pub ticks: Option<String>,
    /// No tick one day past the last sample at the end (that tick closes
    /// every open window).
    #[arg(long)]
    pub no_final_tick: bool,
    /// Most samples per `process` call. Default: the config's
    /// `[outbox] max_batch`, else 8192 (the daemon's default).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Take the function's settings, limits and the batch size from this
    /// daemon configuration (with `--function`).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The function in `--config` (default: its only one).
    #[arg(long, requires = "config")]
    pub function: Option<String>,
    /// The function's own table (what goes under `config = …` in
    /// edge.toml), as a TOML file. Default: `function.toml` in the crate.
    #[arg(long, conflicts_with = "config")]
    pub settings: Option<PathBuf>,
    /// Memory cap per instance, MiB (without `--config`).
    #[arg(long, default_value_t = 64, conflicts_with = "config")]
    pub memory_mib: usize,
    /// Deadline per call (without `--config`), e.g. `1s`, `500ms`.
    #[arg(long, default_value = "1s", conflicts_with = "config")]
    pub timeout: humantime::Duration,
}

/// The daemon's default `[outbox] max_batch`.
const DEFAULT_BATCH: usize = 8192;
/// The closing tick comes this long after the last sample.
const FINAL_TICK_AFTER_MS: u64 = 24 * 3600 * 1000;

/// What the function will be given besides the samples.
struct Setup {
    config_json: String,
    limits: Limits,
    batch: usize,
    name: String,
}

/// The function's entry in `--config`, and the config (parsed, not
/// validated as a whole: certificates and brokers do not matter here).
fn configured(a: &TestArgs) -> anyhow::Result<Option<(EdgeConfig, String)>> {
    let Some(path) = &a.config else {
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let config = EdgeConfig::parse(&text, &base)
        .map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))?;
    let name = super::pick_function(&config, path, a.function.as_deref())?;
    Ok(Some((config, name)))
}

fn setup(
    a: &TestArgs,
    configured: Option<&(EdgeConfig, String)>,
    dir: Option<&Path>,
    wasm: &Path,
) -> anyhow::Result<Setup> {
    if let Some((config, name)) = configured {
        let f = &config.functions[name];
        return Ok(Setup {
            config_json: fogline_edge::pipeline::config_json(&f.config).to_string(),
            limits: fogline_edge::pipeline::versions::limits(f),
            batch: a.batch.unwrap_or(config.outbox.max_batch),
            name: name.clone(),
        });
    }
    if a.memory_mib == 0 || a.memory_mib > 4096 {
        bail!("--memory-mib {} is outside 1..=4096", a.memory_mib);
    }
    let settings = match (&a.settings, dir) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(d)) => Some(d.join("function.toml")).filter(|p| p.is_file()),
        (None, None) => None,
    };
    let config_json = match settings {
        Some(p) => {
            let t = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read the function's settings {}", p.display()))?;
            let table: toml::Table =
                toml::from_str(&t).with_context(|| format!("invalid TOML in {}", p.display()))?;
            fogline_edge::pipeline::config_json(&table).to_string()
        }
        None => "{}".to_string(),
    };
    Ok(Setup {
        config_json,
        limits: Limits {
            memory_bytes: a.memory_mib << 20,
            call_timeout: a.timeout.into(),
            ..Limits::default()
        },
        batch: a.batch.unwrap_or(DEFAULT_BATCH),
        name: wasm
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "module".into()),
    })
}

/// Reads the script from a file or, for `-`, standard input.
fn read_input(path: &Path) -> anyhow::Result<(String, String)> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read samples from standard input")?;
        return Ok((text, "stdin".into()));
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read samples {}", path.display()))?;
    Ok((text, path.display().to_string()))
}

/// One emitted message as an output line: `{"stream", "timestamp_ms",
/// "payload"}`, the payload as JSON where it is JSON, else as text.
fn line_of(m: &Message) -> Value {
    let payload: Value = serde_json::from_slice(&m.payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&m.payload).into_owned()));
    serde_json::json!({"stream": m.stream, "timestamp_ms": m.timestamp_ms, "payload": payload})
}

/// JSON with object keys sorted, so key order never makes a difference
/// (whatever serde_json's `preserve_order` feature says); an output line's
/// own keys come first, in the order the output prints them.
fn canonical(v: &Value) -> String {
    canonical_at(v, true)
}

fn canonical_at(v: &Value, top: bool) -> String {
    const FIRST: [&str; 3] = ["stream", "timestamp_ms", "payload"];
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_by_key(|(k, _)| {
                let rank = FIRST
                    .iter()
                    .position(|f| top && f == k)
                    .unwrap_or(FIRST.len());
                (rank, k.as_str())
            });
            let parts: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), canonical_at(v, false)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter()
                .map(|v| canonical_at(v, false))
                .collect::<Vec<_>>()
                .join(",")
        ),
        other => other.to_string(),
    }
}

/// Runs one batch; a failed call is retried in halves, as the pipeline does,
/// so only the sample that fails is reported (and left out).
fn process(
    f: &mut FunctionInstance,
    batch: &[(&Message, usize)],
    emitted: &mut Vec<Message>,
    problems: &mut Vec<String>,
) {
    let inputs: Vec<Message> = batch.iter().map(|(m, _)| (*m).clone()).collect();
    match f.process(&inputs) {
        Ok(out) => {
            emitted.extend(out.messages(&inputs));
            for r in &out.rejected {
                let line = batch.get(r.index).map(|b| b.1).unwrap_or(0);
                problems.push(format!("rejected (line {line}): {}", r.error));
            }
            for r in &out.refused {
                let line = r
                    .input
                    .and_then(|i| batch.get(i as usize))
                    .map(|b| format!(" of line {}", b.1))
                    .unwrap_or_default();
                problems.push(format!("output{line} refused by the host: {}", r.error));
            }
        }
        Err(e) if batch.len() == 1 => {
            problems.push(format!("failed (line {}): {e}", batch[0].1));
        }
        Err(_) => {
            let (a, b) = batch.split_at(batch.len() / 2);
            process(f, a, emitted, problems);
            process(f, b, emitted, problems);
        }
    }
}

pub fn run(a: &TestArgs) -> anyhow::Result<ExitCode> {
    let configured = configured(a)?;
    let (dir, wasm) = match (&a.wasm, &a.dir, &configured) {
        (Some(w), _, _) => (None, w.clone()),
        // `--config` alone: the module the daemon would load.
        (None, None, Some((config, name))) => {
            (None, config.resolve(&config.functions[name].module))
        }
        (None, _, _) => {
            let dir = a.dir.clone().unwrap_or_else(|| PathBuf::from("."));
            let built = super::build::build(&dir, super::build::Verbosity::Quiet)?;
            (Some(dir), built.wasm)
        }
    };
    let input = match (&a.input, &dir) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) if d.join("samples.jsonl").is_file() => d.join("samples.jsonl"),
        _ => bail!("no samples: give --input FILE (or `-` for standard input)"),
    };
    let (text, source) = read_input(&input)?;
    let steps = script::parse(&text, &source)?;
    if !steps.iter().any(|s| matches!(s, Step::Sample(..))) {
        bail!("{source} holds no samples");
    }
    let mut ticks = match &a.ticks {
        Some(spec) => script::tick_times(spec, &steps)?,
        None => Vec::new(),
    };
    if !a.no_final_tick {
        let last = steps
            .iter()
            .map(|s| match s {
                Step::Sample(m, _) => m.timestamp_ms,
                Step::Tick(t) => *t,
            })
            .chain(ticks.iter().copied())
            .max()
            .unwrap_or(script::FIRST_MS);
        ticks.push(last.saturating_add(FINAL_TICK_AFTER_MS));
    }
    let s = setup(a, configured.as_ref(), dir.as_deref(), &wasm)?;
    let rt = FunctionRuntime::new(RuntimeOptions::default())?;
    let module = rt.load(&wasm)?;
    let mut f = FunctionInstance::new(&rt, &module, &s.name, &s.config_json, s.limits)?;

    let mut emitted = Vec::new();
    let mut problems = Vec::new();
    let (mut batches, mut tick_calls, mut samples) = (0usize, 0usize, 0usize);
    for call in script::calls(&steps, &ticks, s.batch) {
        match call {
            Call::Process(batch) => {
                batches += 1;
                samples += batch.len();
                process(&mut f, &batch, &mut emitted, &mut problems);
            }
            Call::Tick(now) => {
                tick_calls += 1;
                match f.tick(now) {
                    Ok(out) => emitted.extend(out.messages(&[])),
                    Err(e) => problems.push(format!("tick at {now} failed: {e}")),
                }
            }
        }
    }
    for p in &problems {
        eprintln!("{p}");
    }
    eprintln!(
        "{samples} sample(s) in {batches} batch(es) of up to {}, {tick_calls} tick(s): {} emitted, {} problem(s)",
        s.batch,
        emitted.len(),
        problems.len()
    );
    let lines: Vec<Value> = emitted.iter().map(line_of).collect();
    let Some(expect) = &a.expect else {
        for l in &lines {
            println!("{}", canonical(l));
        }
        return Ok(ExitCode::SUCCESS);
    };
    compare(expect, &lines)
}

/// Compares the output with the expected file: exit 0 when equal, else a
/// diff and exit 1. Timestamps are compared only when the expected file
/// has them.
fn compare(expect: &Path, lines: &[Value]) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(expect)
        .with_context(|| format!("cannot read the expected output {}", expect.display()))?;
    let mut expected = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {}: not a JSON output line",
                expect.display(),
                i + 1
            )
        })?;
        expected.push(v);
    }
    let timed = expected.iter().any(|v| v.get("timestamp_ms").is_some());
    let actual: Vec<String> = lines
        .iter()
        .map(|v| {
            let mut v = v.clone();
            if !timed {
                if let Some(o) = v.as_object_mut() {
                    o.remove("timestamp_ms");
                }
            }
            canonical(&v)
        })
        .collect();
    let expected: Vec<String> = expected.iter().map(canonical).collect();
    if actual == expected {
        eprintln!("ok: {} output(s) match {}", actual.len(), expect.display());
        return Ok(ExitCode::SUCCESS);
    }
    let want: String = expected.iter().map(|l| format!("{l}\n")).collect();
    let got: String = actual.iter().map(|l| format!("{l}\n")).collect();
    let diff = similar::TextDiff::from_lines(&want, &got);
    println!("--- {} (expected)\n+++ actual", expect.display());
    for change in diff.iter_all_changes() {
        let sign = match change.tag() {
            similar::ChangeTag::Delete => "-",
            similar::ChangeTag::Insert => "+",
            similar::ChangeTag::Equal => " ",
        };
        print!("{sign}{change}");
    }
    eprintln!(
        "MISMATCH: {} output(s), {} expected ({})",
        actual.len(),
        expected.len(),
        expect.display()
    );
    Ok(ExitCode::FAILURE)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn canonical_lines_ignore_key_order() {
        let a: Value =
            serde_json::from_str(r#"{"b": {"y": 1, "x": [2, {"q": 1, "p": 0}]}, "a": "s"}"#)
                .unwrap();
        let b: Value =
            serde_json::from_str(r#"{"a": "s", "b": {"x": [2, {"p": 0, "q": 1}], "y": 1}}"#)
                .unwrap();
        assert_eq!(canonical(&a), canonical(&b));
        assert_eq!(
            canonical(&a),
            r#"{"a":"s","b":{"x":[2,{"p":0,"q":1}],"y":1}}"#
        );
        let line: Value = serde_json::from_str(
            r#"{"payload": {"b": 1, "a": 2}, "timestamp_ms": 5, "stream": "s"}"#,
        )
        .unwrap();
        assert_eq!(
            canonical(&line),
            r#"{"stream":"s","timestamp_ms":5,"payload":{"a":2,"b":1}}"#
        );
        let nested: Value = serde_json::from_str(r#"{"payload": {"stream": 1, "a": 2}}"#).unwrap();
        assert_eq!(canonical(&nested), r#"{"payload":{"a":2,"stream":1}}"#);
    }
}
