//! `fogline-cloud`: the aggregator and its operator commands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fogline_aggregator::{self as aggregator, certs, config::CloudConfig};
use fogline_transport::tls;

/// Fogline aggregator: receives node outboxes over QUIC and stores them.
#[derive(Debug, Parser)]
#[command(name = "fogline-cloud", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the aggregator.
    Run {
        /// Path to cloud.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate cloud.toml and its TLS material without starting.
    Check {
        /// Path to cloud.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Create the fleet CA and issue certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a fleet CA (ca.pem, ca.key) in DIR.
    Init {
        /// Directory for the certificates.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Fleet name, used in the CA's common name.
        #[arg(long, default_value = "fogline")]
        fleet: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue the aggregator's certificate (server.pem, server.key).
    Server {
        /// Directory holding ca.pem/ca.key.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// DNS names or IP addresses nodes use to reach the aggregator.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue node certificates (node-<ID>.pem, node-<ID>.key); the CN is the node id.
    Node {
        /// Directory holding ca.pem/ca.key.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Node ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    fogline_telemetry::init_tracing("info");
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::Check { config } => check(&config),
        Command::Certs(c) => certs_command(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &Path) -> anyhow::Result<()> {
    let config = CloudConfig::load(path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let _ = fogline_telemetry::prometheus_handle();
        let running = aggregator::start(config)
            .await
            .with_context(|| format!("starting the aggregator from {}", path.display()))?;
        eprintln!(
            "fogline-cloud listening: QUIC {}  HTTP http://{}",
            running.quic_addr, running.http_addr
        );
        fogline_telemetry::shutdown_signal().await;
        tracing::info!("Shutting down.");
        running.shutdown().await;
        Ok(())
    })
}

fn check(path: &Path) -> anyhow::Result<()> {
    let config = CloudConfig::load(path)?;
    tls::server_config(&config.tls.ca, &config.tls.cert, &config.tls.key)
        .with_context(|| format!("{}: [tls]", path.display()))?;
    println!(
        "{}: OK (QUIC {}, HTTP {}, store {})",
        path.display(),
        config.quic.listen,
        config.http.listen,
        config.store.path.display()
    );
    Ok(())
}

fn certs_command(c: CertsCommand) -> anyhow::Result<()> {
    match c {
        CertsCommand::Init { dir, fleet, force } => {
            certs::init_ca(&dir, &fleet, force)?;
            println!(
                "created {}/ca.pem and ca.key (keep ca.key offline)",
                dir.display()
            );
        }
        CertsCommand::Server { dir, names, force } => {
            certs::issue_server(&dir, &names, force)?;
            println!(
                "issued {}/server.pem for {}",
                dir.display(),
                names.join(", ")
            );
        }
        CertsCommand::Node { dir, ids, force } => {
            for id in &ids {
                certs::issue_node(&dir, id, force)?;
                println!("issued {}/node-{id}.pem", dir.display());
            }
        }
    }
    Ok(())
}
