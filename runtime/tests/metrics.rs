//! What an operator scrapes and probes on a started edge: every `/metrics`
//! series with HELP and TYPE, histograms (never summaries), the series
//! present from start, and `fogline-edge status` exiting by health.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use fogline_edge::functions::events as functions;
use fogline_edge::ingest::events as ingest;
use fogline_edge::metrics_help;
use fogline_edge::pipeline::events as pipeline;
use fogline_edge::uplink::events as uplink;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// The metric a sample line belongs to: its name without the histogram
/// suffixes.
fn family(sample: &str, histograms: &BTreeSet<String>) -> String {
    let name = sample.split(['{', ' ']).next().unwrap();
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if histograms.contains(base) {
                return base.to_string();
            }
        }
    }
    name.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_has_help_and_type_and_the_operator_series_exist_from_start() {
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let cfg = dir.path().join("edge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nid = \"gw-m\"\ndata_dir = \"data\"\n\
             [broker]\nembedded = true\nlisten = \"127.0.0.1:0\"\n\
             [functions.hot]\nmodule = \"{}\"\nconfig = {{ field = \"temp\", above = 30.0 }}\n\
             [[pipelines]]\nname = \"p\"\ntopics = [\"sensors/#\"]\nfunctions = [\"hot\"]\n\
             [metrics]\nlisten = \"127.0.0.1:{http_port}\"\n",
            fogline_modules::threshold().display()
        ),
    )
    .unwrap();
    let config = fogline_edge::config::EdgeConfig::load(&cfg).unwrap();
    let daemon = fogline_edge::daemon::start(config).await.unwrap();
    let addr = daemon.http_addr.unwrap();

    let (code, text) = tokio::task::spawn_blocking(move || get(addr, "/metrics"))
        .await
        .unwrap();
    assert_eq!(code, 200);
    let mut help = BTreeSet::new();
    let mut types = std::collections::BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("#"), Some("HELP"), Some(name), Some(_)) => {
                help.insert(name.to_string());
            }
            (Some("#"), Some("TYPE"), Some(name), Some(kind)) => {
                types.insert(name.to_string(), kind.to_string());
            }
            _ => {}
        }
    }
    let histograms: BTreeSet<String> = types
        .iter()
        .filter(|(_, k)| *k == "histogram")
        .map(|(n, _)| n.clone())
        .collect();
    let mut families = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let f = family(line, &histograms);
        assert!(help.contains(&f), "no # HELP for {f} ({line})\n{text}");
        assert!(types.contains_key(&f), "no # TYPE for {f} ({line})");
        families.insert(f);
    }
    assert!(
        !types.values().any(|k| k == "summary"),
        "histograms, not summaries: {types:?}"
    );
    for name in [
        fogline_telemetry::BUILD_INFO,
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
        metrics_help::OUTBOX_DISK_FREE_BYTES,
        // Present from start, before any event.
        pipeline::COMMIT_SECONDS,
        pipeline::RECORDS_WRITTEN_TOTAL,
        ingest::RECEIVED_TOTAL,
        uplink::CONNECTED,
        uplink::CONNECTS_TOTAL,
        functions::CALLS_TOTAL,
        functions::CALL_SECONDS,
        pipeline::BREAKER_OPENED_TOTAL,
        fogline_edge::clock::CLOCK_STEPS_TOTAL,
    ] {
        assert!(families.contains(name), "{name} missing:\n{text}");
    }
    assert_eq!(types[pipeline::COMMIT_SECONDS], "histogram");
    assert_eq!(types["process_cpu_seconds_total"], "counter");
    assert!(
        text.contains(&format!(
            "{}{{version=\"{}\"",
            fogline_telemetry::BUILD_INFO,
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert!(text.contains(&format!(
        "{}{{source=\"endpoint\"}} 0",
        ingest::RECEIVED_TOTAL
    )));
    assert!(text.contains(&format!(
        "{}{{function=\"hot\",kind=\"process\"}}",
        functions::CALLS_TOTAL
    )));
    let free: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{} ", metrics_help::OUTBOX_DISK_FREE_BYTES)))
        .unwrap()
        .parse()
        .unwrap();
    assert!(free > 0.0, "{free}");

    // /healthz in the shape both daemons answer; `status` exits 0 on a
    // healthy daemon and 3 once it is gone.
    let (code, body) = tokio::task::spawn_blocking(move || get(addr, "/healthz"))
        .await
        .unwrap();
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"status":"ok","problems":[]}"#)
    );
    let status = |cfg: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_fogline-edge"))
                .args(["status", "--config"])
                .arg(cfg)
                .output()
                .unwrap()
        })
    };
    let out = status(cfg.clone()).await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    daemon.shutdown().await;
    let out = status(cfg).await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
