//! Command-line commands: run, status, check, module, dead-letters, outbox, passwd.

mod check;
mod dead_letters;
mod module;
mod outbox;
mod status;

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
    /// Exit status: 0 running and healthy, 1 running but unhealthy (or
    /// unable to report), 3 not running.
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
    /// Write, build, test and deploy functions: `module new | build | test | deploy`.
    Module {
        #[command(subcommand)]
        command: module::ModuleCommand,
    },
    /// What functions or ingest refused, and replaying it.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// Check or salvage the outbox file (the daemon must be stopped to salvage).
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Hash a password for `[[broker.users]] password_hash`. Reads the
    /// password from standard input (first line), prints the hash.
    Passwd,
}

#[derive(Subcommand, Debug)]
enum OutboxCommand {
    /// Check the outbox's integrity (SQLite quick_check); exit 1 if damaged.
    Check {
        /// The edge configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Give up after this long (a large outbox takes a while).
        #[arg(long, default_value = "5m")]
        timeout: humantime::Duration,
    },
    /// Salvage what can be read of a damaged outbox into a new file (same
    /// incarnation while its numbering is readable); report what could not
    /// be read. The damaged file is
    /// kept as `outbox.db.damaged-<time>`. The daemon salvages by itself at
    /// start; this is for doing it by hand, with the daemon stopped.
    Recover {
        /// The edge configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Rebuild the file even if the check finds it sound.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DeadLetterCommand {
    /// List dead letters, newest first, with their reason.
    List {
        /// The edge configuration file.
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        filter: dead_letters::Filter,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run dead letters again through the current version of their
    /// pipeline, from the function that refused them (after fixing the
    /// function or its config). The running daemon picks them up.
    Replay {
        /// The edge configuration file.
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        filter: dead_letters::Filter,
        /// Every dead letter (that can be replayed).
        #[arg(long)]
        all: bool,
        /// At most this many (0: no limit).
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
}

impl Cli {
    /// The config file of `run`, if that is the command.
    pub fn run_config(&self) -> Option<&std::path::Path> {
        match &self.command {
            Command::Run { config } => Some(config),
            _ => None,
        }
    }
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => run(config).await,
        Command::Status { config, json } => status::run(&config, json).await,
        Command::Check { config } => check::run(&config).await,
        Command::Module { command } => module::dispatch(command).await,
        Command::DeadLetters { command } => match command {
            DeadLetterCommand::List {
                config,
                filter,
                limit,
                json,
            } => dead_letters::list(&config, &filter, limit.max(1), json),
            DeadLetterCommand::Replay {
                config,
                filter,
                all,
                limit,
            } => dead_letters::replay(&config, &filter, all, limit),
        },
        Command::Outbox { command } => match command {
            OutboxCommand::Check { config, timeout } => outbox::check(&config, timeout.into()),
            OutboxCommand::Recover { config, force } => outbox::recover(&config, force).await,
        },
        Command::Passwd => passwd(),
    }
}

fn passwd() -> anyhow::Result<ExitCode> {
    use std::io::{BufRead, IsTerminal};
    if std::io::stdin().is_terminal() {
        eprintln!("Password (it is echoed; pipe it in to avoid that):");
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        anyhow::bail!("the password is empty");
    }
    let hash = fogline_edge::ingest::endpoint::auth::hash_password(password)
        .map_err(|e| anyhow::anyhow!("cannot hash the password: {e}"))?;
    println!("{hash}");
    eprintln!(
        "Put it in edge.toml:\n  [[broker.users]]\n  name = \"...\"\n  password_hash = \"{hash}\""
    );
    Ok(ExitCode::SUCCESS)
}

/// The one-line status the service manager shows (`systemctl status`).
fn ready_status(config: &EdgeConfig, daemon: &fogline_edge::daemon::Daemon) -> String {
    let mut parts = vec![format!("node {}", config.node.id)];
    if let Some(a) = daemon.broker_addr {
        parts.push(format!("MQTT endpoint {a}"));
    }
    if config.external_broker_enabled() {
        parts.push(format!("subscribed to {}", config.ingest_broker()));
    }
    if let Some(a) = daemon.http_addr {
        parts.push(format!("metrics http://{a}/metrics"));
    }
    parts.join(", ")
}

/// Restarts to salvage a damaged outbox allowed within [`RESTART_WINDOW`].
const MAX_SALVAGE_RESTARTS: usize = 3;
const RESTART_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

async fn run(path: PathBuf) -> anyhow::Result<ExitCode> {
    let config = EdgeConfig::load(&path)?;
    let mut restarts: Vec<std::time::Instant> = Vec::new();
    let signal = fogline_telemetry::shutdown_signal();
    tokio::pin!(signal);
    loop {
        let daemon = fogline_edge::daemon::start(config.clone())
            .await
            .with_context(|| format!("cannot start with {}", path.display()))?;
        if let Some(addr) = daemon.http_addr {
            tracing::info!(%addr, "Serving /metrics and /status.");
        }
        fogline_edge::service_notify::ready(&ready_status(&config, &daemon));
        let watchdog = fogline_edge::service_notify::spawn_watchdog(daemon.state.clone());
        let stop = |daemon: fogline_edge::daemon::Daemon| async move {
            daemon.shutdown().await;
            if let Some(w) = watchdog {
                w.abort();
            }
        };
        tokio::select! {
            _ = &mut signal => {
                tracing::info!("Shutting down.");
                fogline_edge::service_notify::stopping();
                stop(daemon).await;
                return Ok(ExitCode::SUCCESS);
            }
            _ = daemon.damaged() => {
                // I-31: stop in order (nothing unacknowledged is lost: its
                // senders resend it) and start again: the start salvages.
                restarts.retain(|t| t.elapsed() < RESTART_WINDOW);
                restarts.push(std::time::Instant::now());
                tracing::error!(restarts = restarts.len(), "Restarting to salvage the damaged outbox.");
                stop(daemon).await;
                let outbox = config.outbox_path();
                tokio::task::spawn_blocking(move || fogline_edge::daemon::salvage_outbox(&outbox))
                    .await
                    .context("the salvage task failed")?
                    .context("cannot salvage the damaged outbox")?;
                if restarts.len() > MAX_SALVAGE_RESTARTS {
                    anyhow::bail!(
                        "the outbox {} was found damaged {} times in {} minutes even after salvaging: \
                         the disk itself is probably failing; see `fogline-edge outbox check`",
                        config.outbox_path().display(),
                        restarts.len(),
                        RESTART_WINDOW.as_secs() / 60
                    );
                }
            }
        }
    }
}
