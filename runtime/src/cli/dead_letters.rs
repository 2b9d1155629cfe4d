//! `fogline-edge dead-letters list|replay`: what functions or ingest
//! refused, and running it again through the current version of its
//! pipeline.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use fogline_edge::config::EdgeConfig;
use fogline_edge::outbox::{self, DeadLetterFilter, StoredDeadLetter};

/// Which dead letters a command means.
#[derive(clap::Args, Debug, Clone)]
pub struct Filter {
    /// Only this pipeline (`ingest` for what ingest refused).
    #[arg(long)]
    pipeline: Option<String>,
    /// Only this function (or ingest check).
    #[arg(long)]
    function: Option<String>,
    /// Only this reason: rejected, trap, timeout, memory, blocked,
    /// invalid_output, error, circuit_open, max_payload_bytes...
    #[arg(long)]
    reason: Option<String>,
    /// Only these ids (repeatable).
    #[arg(long = "id")]
    ids: Vec<i64>,
}

impl Filter {
    fn to_filter(&self, limit: usize) -> DeadLetterFilter {
        DeadLetterFilter {
            pipeline: self.pipeline.clone(),
            function: self.function.clone(),
            reason: self.reason.clone(),
            ids: self.ids.clone(),
            limit,
        }
    }

    fn is_empty(&self) -> bool {
        self.pipeline.is_none()
            && self.function.is_none()
            && self.reason.is_none()
            && self.ids.is_empty()
    }
}

fn shown(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(payload);
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() > 80 {
        format!("{}…", one_line.chars().take(80).collect::<String>())
    } else {
        one_line
    }
}

pub fn list(config: &Path, filter: &Filter, limit: usize, json: bool) -> anyhow::Result<ExitCode> {
    let config = EdgeConfig::load(config)?;
    let path = config.outbox_path();
    if !path.exists() {
        if json {
            println!("[]");
        } else {
            println!(
                "no dead letters: there is no outbox at {} yet (the daemon has not run with this config)",
                path.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let rows = outbox::list_dead_letters(&path, &filter.to_filter(limit))
        .with_context(|| format!("reading dead letters from {}", path.display()))?;
    if json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|d| {
                let mut v = serde_json::to_value(d).unwrap_or_default();
                v["payload"] =
                    serde_json::Value::String(String::from_utf8_lossy(&d.payload).into_owned());
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!(
            "no dead letters{}",
            if filter.is_empty() { "" } else { " match" }
        );
        return Ok(ExitCode::SUCCESS);
    }
    let now = fogline_edge::clock::now_ms();
    for d in &rows {
        print_one(d, now);
    }
    println!(
        "{} shown (newest first{}); replay with: fogline-edge dead-letters replay --config … [--id N | --pipeline P | --function F | --reason R | --all]",
        rows.len(),
        if rows.len() == limit { ", --limit for more" } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}

fn print_one(d: &StoredDeadLetter, now: u64) {
    let age = now.saturating_sub(d.created_ms) / 1000;
    println!(
        "#{:<6} {:>6}s ago  {}/{} ({} {})  stream {}",
        d.id, age, d.pipeline, d.function, d.reason, d.stage, d.stream
    );
    println!("        error    {}", d.error);
    let kept = if d.is_complete() {
        format!("{} bytes", d.payload_size)
    } else {
        format!(
            "{} of {} bytes kept: cannot be replayed",
            d.payload.len(),
            d.payload_size
        )
    };
    println!("        payload  {} ({kept})", shown(&d.payload));
    if d.replay_requested {
        println!("        replay   requested, waiting for the daemon");
    }
}

pub fn replay(config: &Path, filter: &Filter, all: bool, limit: usize) -> anyhow::Result<ExitCode> {
    if filter.is_empty() && !all {
        anyhow::bail!(
            "say which dead letters to replay: --id N, --pipeline P, --function F, --reason R, or --all"
        );
    }
    let config = EdgeConfig::load(config)?;
    let path = config.outbox_path();
    if !path.exists() {
        anyhow::bail!(
            "there is no outbox at {} (the daemon has not run with this config): nothing to replay",
            path.display()
        );
    }
    let (marked, truncated) = outbox::request_replay(&path, &filter.to_filter(limit))
        .with_context(|| format!("marking dead letters for replay in {}", path.display()))?;
    println!(
        "{marked} dead letter(s) marked for replay: the daemon runs them through the current version of their pipeline, from the function that refused them, within a second (or when it next starts); what succeeds leaves the dead-letter table in the same commit as its outputs."
    );
    if truncated > 0 {
        println!(
            "{truncated} matching dead letter(s) cannot be replayed: ingest kept only the first KiB of what it refused."
        );
    }
    Ok(if marked == 0 && truncated > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
