//! `fogline-cloud`: the aggregator and its operator commands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod rollout_cmd;
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
    /// Ask the running aggregator: its health, the aggregators holding
    /// node leases, and each node (connected, lag, backlog, losses). Exit 0
    /// healthy, 1 unhealthy, 3 not answering.
    Status {
        /// Path to cloud.toml (where the API listens, its TLS).
        #[arg(long, short)]
        config: PathBuf,
        /// An API token (or the environment variable FOGLINE_TOKEN).
        #[arg(long, env = "FOGLINE_TOKEN", hide_env_values = true)]
        token: Option<String>,
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
    /// HTTP API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Fleet keys and signed function modules.
    #[command(subcommand)]
    Modules(ModulesCommand),
    /// Roll signed builds out to the fleet, in stages (through the running aggregator's API).
    #[command(subcommand)]
    Rollout(rollout_cmd::RolloutCommand),
}

#[derive(Debug, Subcommand)]
enum ModulesCommand {
    /// Make a fleet signing key (Ed25519): the file is secret; put the
    /// public key it prints in each gateway's `[modules] trusted_keys`.
    Keygen {
        /// Where to write the key (not overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a module (`FILE.sig` next to it): gateways with `[modules]
    /// trusted_keys` run only modules signed by a key they trust.
    Publish {
        /// The module (a wasm32-wasip2 component).
        file: PathBuf,
        /// Its name.
        #[arg(long)]
        name: String,
        /// Its version.
        #[arg(long)]
        version: String,
        /// The fleet key (`fogline-cloud modules keygen`).
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a token, print it once, and add its digest to the config's
    /// `[http] tokens_file` (the running aggregator picks it up).
    New {
        /// Path to cloud.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// Who or what holds it.
        #[arg(long)]
        name: String,
        /// `read` (every GET) or `admin`.
        #[arg(long, default_value = "read")]
        scope: String,
    },
    /// List the tokens in force (names and scopes; the tokens themselves are not kept).
    List {
        /// Path to cloud.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
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
        Command::Status { config, token } => return status(&config, token.as_deref()),
        Command::Certs(c) => certs_command(c),
        Command::Token(c) => token_command(c),
        Command::Modules(c) => modules_command(c),
        Command::Rollout(c) => return rollout_cmd::run(c),
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
    let tokens = fogline_aggregator::http::auth::Tokens::new(
        config.http.tokens.clone(),
        config.http.tokens_file.clone(),
        config.http.open_paths(),
    )
    .with_context(|| format!("{}: [http] tokens", path.display()))?;
    if let (Some(cert), Some(key)) = (&config.http.tls_cert, &config.http.tls_key) {
        tls::load_certs(cert).with_context(|| format!("{}: [http] tls_cert", path.display()))?;
        tls::load_key(key).with_context(|| format!("{}: [http] tls_key", path.display()))?;
    }
    if tokens.count() == 0 {
        eprintln!(
            "warning: no API tokens: the HTTP API answers 401 to every data request (fogline-cloud token new --config {} --name <who>)",
            path.display()
        );
    }
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

/// Exit codes as `systemctl status` uses them (and `fogline-edge status`).
const EXIT_UNHEALTHY: u8 = 1;
const EXIT_NOT_RUNNING: u8 = 3;

fn status(path: &Path, token: Option<&str>) -> ExitCode {
    match status_inner(path, token) {
        Ok(code) => code,
        // It answered, but cannot report (a token missing, an error).
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_UNHEALTHY)
        }
    }
}

/// An HTTP client for the API of the aggregator `config` describes, and
/// its base URL (TLS with the fleet CA when the API has a certificate).
pub(crate) fn api_client(config: &CloudConfig) -> anyhow::Result<(reqwest::Client, String)> {
    let mut addr = config.http.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let tls = config.http.tls_cert.is_some();
    let mut client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(5));
    if tls {
        // The API's certificate is the aggregator's: trust the fleet CA.
        let ca = std::fs::read(&config.tls.ca)
            .with_context(|| format!("reading {}", config.tls.ca.display()))?;
        client = client.add_root_certificate(
            reqwest::Certificate::from_pem(&ca).context("the fleet CA is not PEM")?,
        );
    }
    let client = client.build().context("making the HTTP client")?;
    let base = format!(
        "{}://{}",
        if tls { "https" } else { "http" },
        if tls {
            format!("localhost:{}", addr.port())
        } else {
            addr.to_string()
        }
    );
    Ok((client, base))
}

fn status_inner(path: &Path, token: Option<&str>) -> anyhow::Result<ExitCode> {
    let config = CloudConfig::load(path)?;
    let (client, base) = api_client(&config)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let get = |p: &str| {
            let mut r = client.get(format!("{base}{p}"));
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            r.send()
        };
        let health = match get("/healthz").await {
            Ok(r) => r,
            Err(e) => {
                println!("aggregator at {base}: not answering ({e})");
                return Ok(ExitCode::from(EXIT_NOT_RUNNING));
            }
        };
        let code = health.status();
        let wants_token = || {
            anyhow::anyhow!(
                "{base} wants a token: pass --token or set FOGLINE_TOKEN (fogline-cloud token new --config {} --name <who>)",
                path.display()
            )
        };
        if code == reqwest::StatusCode::UNAUTHORIZED {
            return Err(wants_token());
        }
        let h: serde_json::Value = health.json().await.unwrap_or_default();
        let healthy = code.is_success();
        println!(
            "aggregator at {base}: {}",
            h["status"].as_str().unwrap_or(if healthy { "ok" } else { "unhealthy" })
        );
        for p in h["problems"].as_array().into_iter().flatten() {
            println!("  problem: {} {}: {}", p["component"], p["kind"], p["detail"]);
        }
        let nodes = get("/api/v1/nodes").await.context("GET /api/v1/nodes")?;
        if nodes.status() == reqwest::StatusCode::UNAUTHORIZED {
            return Err(wants_token());
        }
        let nodes: serde_json::Value = nodes
            .error_for_status()
            .context("GET /api/v1/nodes")?
            .json()
            .await
            .context("GET /api/v1/nodes: not JSON")?;
        let nodes = nodes.as_array().cloned().unwrap_or_default();
        let mut by_holder: std::collections::BTreeMap<String, usize> = Default::default();
        for n in &nodes {
            if let Some(h) = n["aggregator"].as_str() {
                *by_holder.entry(h.to_string()).or_default() += 1;
            }
        }
        println!("aggregators holding nodes: {}", by_holder.len());
        for (h, n) in &by_holder {
            println!("  {h:<32} {n} node(s)");
        }
        let now = fogline_telemetry::clock::now_ms();
        let connected = nodes.iter().filter(|n| n["connected"] == true).count();
        println!("nodes: {} known, {connected} connected", nodes.len());
        println!(
            "  {:<24} {:<13} {:>10} {:>10} {:>10} {:>8}",
            "node", "state", "last seen", "lag", "backlog", "lost"
        );
        for n in &nodes {
            let state = if n["connected"] == true {
                if n["status"]["health"] == "unhealthy" {
                    "unhealthy"
                } else {
                    "connected"
                }
            } else {
                "disconnected"
            };
            let secs = |ms: Option<u64>| ms.map_or("—".to_string(), |m| format!("{}s", m / 1000));
            let lost = n["lost_records"].as_u64().unwrap_or(0)
                + n["losses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|l| l["reason"] != "dead_lettered" && l["reason"] != "replayed")
                    .filter_map(|l| l["records"].as_u64())
                    .sum::<u64>();
            println!(
                "  {:<24} {:<13} {:>10} {:>10} {:>10} {:>8}",
                n["node"].as_str().unwrap_or("?"),
                state,
                secs(n["last_seen_ms"].as_u64().map(|t| now.saturating_sub(t))),
                secs(n["lag_ms"].as_u64()),
                n["status"]["backlog_records"]
                    .as_u64()
                    .map_or("—".to_string(), |b| b.to_string()),
                lost
            );
        }
        Ok(if healthy {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EXIT_UNHEALTHY)
        })
    })
}

fn modules_command(c: ModulesCommand) -> anyhow::Result<()> {
    use anyhow::Context;
    use fogline_protocol::signing::SigningKey;
    match c {
        ModulesCommand::Keygen { out } => {
            anyhow::ensure!(
                !out.exists(),
                "{} exists; a fleet key is not overwritten (gateways trust it)",
                out.display()
            );
            let (key, text) = SigningKey::generate()?;
            let mut f = std::fs::OpenOptions::new();
            f.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut f, 0o600);
            std::io::Write::write_all(
                &mut f
                    .open(&out)
                    .with_context(|| format!("cannot create {}", out.display()))?,
                text.as_bytes(),
            )
            .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!(
                "fleet key written to {} (keep it secret); trust it on each gateway with:",
                out.display()
            );
            println!("[modules]\ntrusted_keys = [\"{}\"]", key.public_key());
        }
        ModulesCommand::Publish {
            file,
            name,
            version,
            key,
        } => {
            anyhow::ensure!(!name.trim().is_empty(), "--name must not be empty");
            anyhow::ensure!(!version.trim().is_empty(), "--version must not be empty");
            let text = std::fs::read_to_string(&key)
                .with_context(|| format!("cannot read the fleet key {}", key.display()))?;
            let key =
                SigningKey::from_file_text(&text).with_context(|| format!("{}", key.display()))?;
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            anyhow::ensure!(
                bytes.starts_with(b"\0asm"),
                "{} is not a WebAssembly module (no `\\0asm` header)",
                file.display()
            );
            let sig = key.sign(&name, &version, &bytes);
            let mut out = file.as_os_str().to_owned();
            out.push(".sig");
            let out = PathBuf::from(out);
            std::fs::write(&out, serde_json::to_vec_pretty(&sig)?)
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!(
                "signed {} as {name} {version} (sha256 {}) with {}: {}",
                file.display(),
                &sig.sha256[..12],
                sig.key,
                out.display()
            );
        }
    }
    Ok(())
}

fn token_command(c: TokenCommand) -> anyhow::Result<()> {
    use fogline_aggregator::http::auth;
    match c {
        TokenCommand::New {
            config,
            name,
            scope,
        } => {
            let scope = match scope.as_str() {
                "read" => auth::Scope::Read,
                "admin" => auth::Scope::Admin,
                other => anyhow::bail!("--scope {other:?}: expected read or admin"),
            };
            anyhow::ensure!(!name.trim().is_empty(), "--name must not be empty");
            let cfg = CloudConfig::load(&config)?;
            let Some(file) = cfg.http.tokens_file else {
                anyhow::bail!(
                    "{}: [http] tokens_file is not set; add e.g. tokens_file = \"api-tokens.toml\" (or put the digest in [[http.tokens]] by hand)",
                    config.display()
                );
            };
            if cfg.http.tokens.iter().any(|t| t.name == name) {
                anyhow::bail!(
                    "{}: a token named {name:?} is in [[http.tokens]] already",
                    config.display()
                );
            }
            let (token, entry) = auth::new_token(&name, scope);
            auth::append_file(&file, entry)?;
            eprintln!(
                "token {name:?} ({}) added to {}; it is shown once, keep it:",
                if scope == auth::Scope::Admin {
                    "admin"
                } else {
                    "read"
                },
                file.display()
            );
            println!("{token}");
        }
        TokenCommand::List { config } => {
            let cfg = CloudConfig::load(&config)?;
            let from_file = match &cfg.http.tokens_file {
                Some(f) => auth::read_file(f)?,
                None => Vec::new(),
            };
            for t in cfg.http.tokens.iter().chain(&from_file) {
                println!("{:<24} {:?}", t.name, t.scope);
            }
            if cfg.http.tokens.is_empty() && from_file.is_empty() {
                eprintln!("no tokens: the HTTP API answers 401 to every data request");
            }
        }
    }
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
