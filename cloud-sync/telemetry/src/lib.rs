//! `fogline-telemetry`: process-wide telemetry shared by every Fogline binary: the Prometheus
//! recorder (one per process: the demo runs edge and aggregator in one),
//! log setup, the shutdown signal and the health shape both `/healthz` answer.

#![warn(missing_docs)]

pub mod clock;
pub mod health;
pub mod help;
pub mod process;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Buckets (seconds) for every histogram: latencies from 50 µs to 10 s.
/// Histograms, not summaries: they aggregate across instances.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Install the recorder on first use and return a handle that renders the
/// Prometheus text format.
pub fn prometheus_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            // Only fails on an empty bucket list, which this is not.
            let builder = match builder.set_buckets(LATENCY_BUCKETS) {
                Ok(b) => b,
                Err(_) => PrometheusBuilder::new(),
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed; then ours just
            // renders nothing, which is visible and harmless.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// What `/metrics` answers: every series of the recorder, then the process
/// metrics (read now).
pub fn render_metrics(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    text.push_str(&process::render());
    text
}

/// Always 1; its labels `version` and `git_sha` say which build runs.
pub const BUILD_INFO: &str = "fogline_build_info";

/// `fogline_build_info{version, git_sha}` = 1: which build is running
/// (`git_sha` only when the build knew it, from `FOGLINE_GIT_SHA`).
pub fn register_build_info(version: &'static str, git_sha: Option<&'static str>) {
    metrics::describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels say which build runs (version, git_sha when known)."
    );
    match git_sha.filter(|s| !s.is_empty()) {
        Some(sha) => metrics::gauge!(BUILD_INFO, "version" => version, "git_sha" => sha).set(1.0),
        None => metrics::gauge!(BUILD_INFO, "version" => version).set(1.0),
    }
}

/// Logs to stderr with `tracing`, filtered by `RUST_LOG` (else `default`,
/// e.g. `"info"`), as text. For binaries; call once.
pub fn init_tracing(default: &str) {
    init_logging(default, false);
}

/// Logs to stderr with `tracing`, filtered by `RUST_LOG` (else `default`).
/// `json`: one JSON object per line (for Loki, Elasticsearch, journald
/// tooling); `FOGLINE_LOG_FORMAT=json|text` overrides it. Text carries
/// colour codes only when stderr is a terminal, so files and the journal
/// get plain lines.
pub fn init_logging(default: &str, json: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let json = match std::env::var("FOGLINE_LOG_FORMAT") {
        Ok(v) if v.eq_ignore_ascii_case("json") => true,
        Ok(v) if v.eq_ignore_ascii_case("text") => false,
        _ => json,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}

/// Resolves on Ctrl-C or SIGTERM: the daemons' cue for an orderly shutdown.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
