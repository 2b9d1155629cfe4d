//! `fogline-edge status`: asks the running daemon; if none answers, reads
//! the outbox file directly.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use fogline_edge::config::EdgeConfig;
use fogline_edge::outbox;
use fogline_telemetry::health::{Health, Problem};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal HTTP/1.0 GET against our own daemon (loopback, our own
/// server): not worth an HTTP client dependency. `None`: nobody answered.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.take(1 << 20).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// What the daemon said to `/status`.
pub(super) enum Answer {
    /// Its status.
    Status(serde_json::Value),
    /// It answered, with an error: the daemon runs but cannot report.
    Failed(String),
}

pub(super) async fn fetch_status(addr: std::net::SocketAddr) -> Option<Answer> {
    let (code, body) = http_get(addr, "/status").await?;
    if code != 200 {
        return Some(Answer::Failed(format!("HTTP {code}: {}", body.trim())));
    }
    Some(match serde_json::from_str(&body) {
        Ok(v) => Answer::Status(v),
        Err(e) => Answer::Failed(format!("an answer that is not JSON ({e})")),
    })
}

fn ago(now: u64, t: Option<u64>) -> String {
    match t {
        None => "never".to_string(),
        Some(t) => {
            let s = now.saturating_sub(t) / 1000;
            match s {
                0..=119 => format!("{s}s ago"),
                120..=7199 => format!("{}m ago", s / 60),
                _ => format!("{}h ago", s / 3600),
            }
        }
    }
}

/// Exit codes, as `systemctl status` and LSB init scripts use them: 0 the
/// daemon runs and is healthy, 1 it runs but is unhealthy (or cannot
/// report), 3 it is not running. Scripts and probes can act on them.
const EXIT_UNHEALTHY: u8 = 1;
const EXIT_NOT_RUNNING: u8 = 3;

fn exit_code(running: bool, healthy: bool) -> ExitCode {
    match (running, healthy) {
        (false, _) => ExitCode::from(EXIT_NOT_RUNNING),
        (true, false) => ExitCode::from(EXIT_UNHEALTHY),
        (true, true) => ExitCode::SUCCESS,
    }
}

/// Where the daemon answers `/status` (its metrics listener, on loopback
/// when it listens on every address); `None` with metrics off.
pub(super) fn status_addr(config: &EdgeConfig) -> Option<std::net::SocketAddr> {
    if !config.metrics.enabled {
        return None;
    }
    let mut addr = config.metrics.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Some(addr)
}

pub async fn run(path: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let config = EdgeConfig::load(path)?;
    let outbox_path = config.outbox_path();
    let answer = match status_addr(&config) {
        Some(addr) => fetch_status(addr).await.map(|a| (addr, a)),
        None => None,
    };
    let (live, daemon_error) = match answer {
        Some((addr, Answer::Status(v))) => (Some((addr, v)), None),
        Some((addr, Answer::Failed(e))) => (None, Some((addr, e))),
        None => (None, None),
    };
    // A daemon that cannot report its status may still say what is wrong.
    let mut daemon_health: Vec<Problem> = Vec::new();
    if let Some((addr, _)) = &daemon_error {
        if let Some((_, body)) = http_get(*addr, "/healthz").await {
            if let Ok(h) = serde_json::from_str::<Health>(&body) {
                daemon_health = h.problems;
            }
        }
    }
    let stats = match &live {
        Some((_, v)) => serde_json::from_value(v["outbox"].clone())
            .context("the daemon's /status answer has no valid `outbox`")?,
        None => match outbox::read_stats(&outbox_path) {
            Ok(s) => s,
            Err(e) if daemon_error.is_some() => {
                let (addr, why) = daemon_error
                    .as_ref()
                    .map(|(a, w)| (*a, w.clone()))
                    .unwrap_or_else(|| (config.metrics.listen, String::new()));
                if json {
                    let v = serde_json::json!({
                        "node": config.node.id,
                        "daemon_running": true,
                        "daemon_error": why,
                        "outbox_error": e.to_string(),
                        "problems": daemon_health,
                    });
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    println!("node              {}", config.node.id);
                    println!("daemon            running, but /status at {addr} failed: {why}");
                    println!("outbox            cannot be read: {e}");
                    print_problems(&daemon_health, fogline_edge::clock::now_ms());
                }
                return Ok(ExitCode::from(EXIT_UNHEALTHY));
            }
            Err(e) => {
                // Not running, and never ran here (or its outbox is gone).
                eprintln!(
                    "fogline-edge is not running (nothing answered on {}), and its outbox {} cannot be read: {e}",
                    config.metrics.listen,
                    outbox_path.display()
                );
                return Ok(ExitCode::from(EXIT_NOT_RUNNING));
            }
        },
    };
    let stats: outbox::OutboxStats = stats;
    let broker = live
        .as_ref()
        .map(|(_, v)| v["broker_connected"].as_bool().unwrap_or(false));
    let uplink = live
        .as_ref()
        .map(|(_, v)| v["uplink_connected"].as_bool().unwrap_or(false));
    let ingest = live.as_ref().map(|(_, v)| v["ingest"].clone());
    let link: Option<fogline_edge::uplink::UplinkStatus> = live
        .as_ref()
        .and_then(|(_, v)| serde_json::from_value(v["uplink"].clone()).ok());
    let problems: Vec<Problem> = live
        .as_ref()
        .and_then(|(_, v)| serde_json::from_value(v["problems"].clone()).ok())
        .unwrap_or(daemon_health);
    let functions: Vec<fogline_edge::pipeline::FunctionStatus> = live
        .as_ref()
        .and_then(|(_, v)| serde_json::from_value(v["functions"].clone()).ok())
        .unwrap_or_default();
    let local_subscribers: Vec<fogline_edge::local::SubscriberStatus> = live
        .as_ref()
        .and_then(|(_, v)| serde_json::from_value(v["local_subscribers"].clone()).ok())
        .unwrap_or_default();
    let deployments: Vec<fogline_protocol::deploy::DeploymentReport> = live
        .as_ref()
        .and_then(|(_, v)| serde_json::from_value(v["deployments"].clone()).ok())
        .unwrap_or_default();
    // Without a daemon, what the outbox records of the functions' versions.
    let recorded = if live.is_none() {
        outbox::function_records(&outbox_path).unwrap_or_default()
    } else {
        Vec::new()
    };
    let code = exit_code(
        live.is_some() || daemon_error.is_some(),
        problems.is_empty() && daemon_error.is_none(),
    );
    if json {
        let v = serde_json::json!({
            "node": config.node.id,
            "daemon_running": live.is_some() || daemon_error.is_some(),
            "daemon_error": daemon_error.as_ref().map(|(_, e)| e),
            "broker_connected": broker,
            "uplink_connected": uplink,
            "uplink": link,
            "ingest": ingest,
            "problems": problems,
            "outbox": stats,
            "functions": if live.is_some() { serde_json::to_value(&functions)? } else { serde_json::to_value(&recorded)? },
            "local_subscribers": local_subscribers,
            "deployments": deployments,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(code);
    }
    let now = fogline_edge::clock::now_ms();
    let yes_no = |b: Option<bool>| match b {
        Some(true) => "connected",
        Some(false) => "disconnected",
        None => "unknown (daemon not running)",
    };
    println!("node              {}", config.node.id);
    match (&live, &daemon_error) {
        (Some((addr, _)), _) => println!("daemon            running (status from {addr})"),
        (None, Some((addr, e))) => println!(
            "daemon            running, but /status at {addr} failed: {e} (read {})",
            outbox_path.display()
        ),
        (None, None) => println!(
            "daemon            not running (read {})",
            outbox_path.display()
        ),
    }
    if config.broker.embedded {
        let clients = ingest.as_ref().and_then(|i| i["clients"].as_u64());
        let sessions = ingest.as_ref().and_then(|i| i["sessions"].as_u64());
        match (clients, sessions) {
            (Some(c), Some(s)) => println!(
                "mqtt endpoint     {} — {c} clients, {s} sessions",
                config.broker.listen
            ),
            _ => println!(
                "mqtt endpoint     {} — unknown (daemon not running)",
                config.broker.listen
            ),
        }
    }
    if config.external_broker_enabled() {
        println!(
            "external broker   {} — {}",
            config.ingest_broker(),
            yes_no(broker)
        );
        for r in ingest
            .as_ref()
            .and_then(|i| i["refused_subscriptions"].as_array().cloned())
            .unwrap_or_default()
        {
            println!("  refused filter  {}", r.as_str().unwrap_or("?"));
        }
    }
    if let Some(i) = &ingest {
        println!(
            "ingest pending    {} of {} bytes",
            i["pending_bytes"].as_u64().unwrap_or(0),
            i["budget_bytes"].as_u64().unwrap_or(0)
        );
    }
    match link.as_ref().and_then(|l| l.link.as_ref()) {
        _ if link.as_ref().is_some_and(|l| l.refusals > 0) => println!(
            "uplink            REFUSED by the aggregator {} time(s) in a row (its certificate? see the log); retrying in minutes",
            link.as_ref().map_or(0, |l| l.refusals)
        ),
        _ if link.as_ref().is_some_and(|l| l.fruitless >= 3) => println!(
            "uplink            FLAPPING — {} sessions in a row ended before making progress (see the log); backing off",
            link.as_ref().map_or(0, |l| l.fruitless)
        ),
        Some(l) => println!(
            "uplink            connected — {} over {} since {}{}",
            l.server,
            l.transport,
            ago(now, Some(l.since_ms)),
            if l.zero_rtt { " (0-RTT)" } else { "" }
        ),
        None => println!("uplink            {}", yes_no(uplink)),
    }
    if let Some(l) = &link {
        println!(
            "uplink history    {} connects, {} silent, {} stalled, {} probes ({} moved), {} failed attempts",
            l.connects, l.silent, l.stalls, l.probes, l.probe_switches, l.failed_attempts
        );
    }
    println!(
        "backlog           {} records, {} bytes",
        stats.backlog_records, stats.backlog_bytes
    );
    println!(
        "oldest unsynced   {}",
        if stats.backlog_records == 0 {
            "none".to_string()
        } else {
            ago(now, stats.oldest_unsynced_ms)
        }
    );
    println!("last sync         {}", ago(now, stats.last_sync_ms));
    println!("acked through     seq {}", stats.acked_seq);
    println!(
        "dead letters      {} ({})",
        stats.dead_letters,
        fogline_edge::outbox::human_bytes(stats.dead_letter_bytes)
    );
    println!(
        "disk              {} bytes ({})",
        stats.disk_bytes,
        fogline_edge::outbox::human_bytes(stats.disk_bytes)
    );
    // What was lost, by stream and reason (I-33): also told to the aggregator.
    let lost: u64 = stats
        .losses
        .iter()
        .filter(|l| l.reason.is_loss())
        .map(|l| l.records)
        .sum();
    println!("lost              {lost} records");
    for l in stats.losses.iter().take(20) {
        let seqs = match (l.first_seq, l.last_seq) {
            (Some(a), Some(b)) => format!(", seq {a}..={b}"),
            _ => String::new(),
        };
        println!(
            "  {:<18} {} records ({}) on {}{seqs}, {} to {}",
            l.reason.as_str(),
            l.records,
            fogline_edge::outbox::human_bytes(l.bytes),
            l.stream,
            ago(now, Some(l.first_ms)),
            ago(now, Some(l.last_ms)),
        );
    }
    if stats.losses.len() > 20 {
        println!("  … {} more streams and reasons", stats.losses.len() - 20);
    }
    println!("outbox identity   incarnation {:#018x}", stats.incarnation);
    for f in &functions {
        print_function(f, now);
    }
    for r in &recorded {
        println!(
            "function          {} — gen {} (module {}, config {}) since {}{}",
            r.owner,
            r.generation,
            &r.module_sha256[..r.module_sha256.len().min(8)],
            &r.config_sha256[..r.config_sha256.len().min(8)],
            ago(now, Some(r.since_ms)),
            r.rejected
                .as_ref()
                .map(|(m, _, why, at)| format!(
                    "; refused module {} {}: {why}",
                    &m[..m.len().min(8)],
                    ago(now, Some(*at))
                ))
                .unwrap_or_default()
        );
    }
    for l in &local_subscribers {
        let filters: Vec<String> = l
            .filters
            .iter()
            .map(|(f, q)| format!("{f} (QoS {q})"))
            .collect();
        println!(
            "local subscriber  {} — {}, {}, delivered up to output #{} of #{}",
            l.client,
            if l.connected { "connected" } else { "away" },
            filters.join(", "),
            l.acked,
            l.acked + l.behind
        );
    }
    for d in &deployments {
        println!(
            "rollout           #{} {} {}: {} {}{}",
            d.rollout,
            d.function,
            d.version,
            d.state.name(),
            ago(now, Some(d.at_ms)),
            d.reason
                .as_ref()
                .map(|r| format!(" — {r}"))
                .unwrap_or_default()
        );
    }
    for a in &stats.alarms {
        println!(
            "alarm             {} {}: {}",
            ago(now, Some(a.at_ms)),
            a.kind,
            a.detail
        );
    }
    if problems.is_empty() {
        if live.is_some() {
            println!("health            ok");
        }
    } else {
        print_problems(&problems, now);
    }
    Ok(code)
}

fn print_problems(problems: &[Problem], now: u64) {
    for p in problems {
        println!(
            "health            UNHEALTHY since {}: {p}",
            ago(now, Some(p.since_ms))
        );
    }
}

fn bytes(n: u64) -> String {
    match n {
        0..=9_999 => format!("{n} B"),
        10_000..=9_999_999 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0)),
    }
}

fn print_function(f: &fogline_edge::pipeline::FunctionStatus, now: u64) {
    let circuit = match (f.breaker.as_str(), f.open_until_ms) {
        ("open", Some(until)) => format!(
            "SUSPENDED (circuit open, next probe in {}s)",
            until.saturating_sub(now).div_ceil(1000)
        ),
        ("half-open", _) => "probing (circuit half-open)".to_string(),
        _ if !f.running => "not running".to_string(),
        _ => "running".to_string(),
    };
    println!(
        "function          {} — {} — {circuit}; state {}, memory {}, {} restarts, opened {} times",
        f.owner,
        f.version,
        bytes(f.state_bytes),
        bytes(f.memory_bytes),
        f.restarts,
        f.breaker_opened
    );
    if f.held > 0 {
        println!(
            "  held inputs     {} (run in order once it recovers)",
            f.held
        );
    }
    if let Some((at, e)) = &f.last_error {
        println!("  last failure    {}: {e}", ago(now, Some(*at)));
    }
    if let Some((v, passed, of)) = &f.candidate {
        println!("  new version     {v} on probation: {passed}/{of} batches passed");
    }
    if let Some(s) = &f.last_swap {
        println!(
            "  last swap       {} {} {}{}",
            s.outcome.replace('_', " "),
            s.version,
            ago(now, Some(s.at_ms)),
            s.reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
}
