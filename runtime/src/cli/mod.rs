//! Command-line commands: run, status, check, test-module.

mod check;
mod status;
mod test_module;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fogline_edge::config::EdgeConfig;

/// Fogline edge daemon: MQTT → WASM functions → SQLite outbox → QUIC uplink.
#[derive(Parser, Debug)]
#[command(name = "fogline-edge", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon.
    Run {
        /// The edge configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show backlog, oldest unsynced record, disk use, last sync, connections.
    Status {
        /// The edge configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration and load every module; non-zero exit on any problem.
    Check {
        /// The edge configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a module over sample data and print what it emits.
    TestModule {
        /// The `.wasm` component.
        module: PathBuf,
        /// Samples, one per line: a payload (JSON or not), or
        /// `{"stream": .., "timestamp_ms": .., "payload": ..}`.
        #[arg(long)]
        input: PathBuf,
        /// The function's own settings (a TOML table), as in `[functions.x.config]`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => run(config).await,
        Command::Status { config, json } => status::run(&config, json).await,
        Command::Check { config } => check::run(&config).await,
        Command::TestModule {
            module,
            input,
            config,
        } => test_module::run(&module, &input, config.as_deref()),
    }
}

async fn run(path: PathBuf) -> anyhow::Result<ExitCode> {
    let config = EdgeConfig::load(&path)?;
    let daemon = fogline_edge::daemon::start(config)
        .await
        .with_context(|| format!("cannot start with {}", path.display()))?;
    if let Some(addr) = daemon.http_addr {
        tracing::info!(%addr, "Serving /metrics and /status.");
    }
    fogline_cloud::telemetry::shutdown_signal().await;
    tracing::info!("Shutting down.");
    daemon.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
