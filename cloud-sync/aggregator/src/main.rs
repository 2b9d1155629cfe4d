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
    /// Create a fleet CA (ca.pem, ca.key) in DIR; valid 10 years by default.
    Init {
        /// Directory for the certificates.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Fleet name, used in the CA's common name.
        #[arg(long, default_value = "fogline")]
        fleet: String,
        /// Days the CA is valid.
        #[arg(long, default_value_t = certs::CA_DAYS)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue the aggregator's certificate (server.pem, server.key); valid 1 year by default.
    Server {
        /// Directory holding ca.pem/ca.key.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// DNS names or IP addresses nodes use to reach the aggregator.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = certs::LEAF_DAYS)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue node certificates (node-<ID>.pem, node-<ID>.key); the CN is the node id; valid 1 year by default.
    Node {
        /// Directory holding ca.pem/ca.key.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Node ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = certs::LEAF_DAYS)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Replace a node's key and certificate with fresh ones (the edge picks them up without a restart).
    Renew {
        /// Directory holding ca.pem/ca.key and node-<ID>.pem.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Node ids.
        #[arg(required = true)]
        ids: Vec<String>,
        /// Days the new certificate is valid.
        #[arg(long, default_value_t = certs::LEAF_DAYS)]
        days: u32,
    },
    /// Revoke node certificates: adds their serials to DIR/crl.pem (point `[tls] crl` at it;
    /// the aggregator reloads it and closes the nodes' live connections).
    Revoke {
        /// Directory holding ca.pem/ca.key and node-<ID>.pem.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Node ids whose current certificate (node-<ID>.pem) is revoked. With none and no
        /// --serial, writes the CRL as it is (an empty one the first time).
        ids: Vec<String>,
        /// Revoke certificates by serial (hex, as the aggregator logs it) instead.
        #[arg(long = "serial")]
        serials: Vec<String>,
        /// The CRL was lost: write it again from DIR/revoked.txt (the ledger of
        /// every revocation) instead of refusing.
        #[arg(long)]
        rebuild: bool,
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
        let tcp = running
            .tcp_addr
            .map_or_else(|| "off".to_string(), |a| a.to_string());
        eprintln!(
            "fogline-cloud listening: QUIC {}  TCP/TLS {}  HTTP http://{}",
            running.quic_addr, tcp, running.http_addr
        );
        // Under systemd (Type=notify): up and serving. Outside it, nothing.
        let status = format!(
            "QUIC {}, TCP/TLS {tcp}, HTTP {}",
            running.quic_addr, running.http_addr
        );
        if let Err(e) = sd_notify::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]) {
            tracing::warn!(error = %e, "Cannot notify the service manager.");
        }
        fogline_telemetry::shutdown_signal().await;
        tracing::info!("Shutting down.");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        running.shutdown().await;
        Ok(())
    })
}

fn check(path: &Path) -> anyhow::Result<()> {
    let config = CloudConfig::load(path)?;
    tls::server_rustls(&config.tls.server_tls())
        .with_context(|| format!("{}: [tls]", path.display()))?;
    fogline_aggregator::service::gate::revoked_serials(config.tls.crl.as_deref())
        .with_context(|| format!("{}: [tls] crl", path.display()))?;
    println!(
        "{}: OK (QUIC {}, TCP/TLS {}, HTTP {}, store {})",
        path.display(),
        config.quic.listen,
        config
            .tcp_listen()
            .map_or_else(|| "off".to_string(), |a| a.to_string()),
        config.http.listen,
        config.store.describe()
    );
    Ok(())
}

fn certs_command(c: CertsCommand) -> anyhow::Result<()> {
    use certs::Validity;
    match c {
        CertsCommand::Init {
            dir,
            fleet,
            days,
            force,
        } => {
            certs::init_ca(&dir, &fleet, Validity::days(days)?, force)?;
            println!(
                "created {}/ca.pem and ca.key, valid {days} days (keep ca.key offline)",
                dir.display()
            );
        }
        CertsCommand::Server {
            dir,
            names,
            days,
            force,
        } => {
            certs::issue_server(&dir, &names, Validity::days(days)?, force)?;
            println!(
                "issued {}/server.pem for {}, valid {days} days",
                dir.display(),
                names.join(", ")
            );
        }
        CertsCommand::Node {
            dir,
            ids,
            days,
            force,
        } => {
            for id in &ids {
                certs::issue_node(&dir, id, Validity::days(days)?, force)?;
                println!("issued {}/node-{id}.pem, valid {days} days", dir.display());
            }
        }
        CertsCommand::Renew { dir, ids, days } => {
            for id in &ids {
                let path = dir.join(format!("node-{id}.pem"));
                let (old, _) = certs::certificate_serial(&path)?;
                certs::renew_node(&dir, id, Validity::days(days)?)?;
                let (new, _) = certs::certificate_serial(&path)?;
                println!(
                    "renewed {}: serial {old} -> {new}, valid {days} days (the old one stays valid until it expires; revoke it with --serial {old})",
                    path.display()
                );
            }
        }
        CertsCommand::Revoke {
            dir,
            ids,
            serials,
            rebuild,
        } => {
            // With nothing named, the CRL is (re)written as it is: create an
            // empty one before pointing `[tls] crl` at it.
            let mut all = serials;
            for id in &ids {
                let path = dir.join(format!("node-{id}.pem"));
                let (serial, node) = certs::certificate_serial(&path)?;
                println!("revoking {node}: serial {serial}");
                all.push(serial);
            }
            let n = certs::revoke_with(&dir, &all, rebuild)?;
            println!(
                "wrote {} ({n} revoked in all); aggregators with `[tls] crl` pointing at it apply it within `reload_every`",
                certs::crl_path(&dir).display()
            );
        }
    }
    Ok(())
}
