//! `fogline-aggregator`: the cloud aggregator service (QUIC and TCP/TLS listeners, store
//! and HTTP read API, started together by [`start`]) and the fleet
//! certificate tool behind `fogline-cloud certs`.
#![warn(missing_docs)]

pub mod certs;
pub mod config;
pub mod http;
pub mod metrics_help;
pub mod rollout;
pub mod service;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::service::Service;
use crate::store::{SqliteStore, Store, StoreError};
use config::CloudConfig;
use fogline_transport::TransportError;

/// The aggregator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Opening the store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// TLS material or the QUIC socket failed.
    #[error("{0}")]
    Transport(#[from] TransportError),
    /// The store's directory could not be created.
    #[error("creating store directory {path}: {source}")]
    DataDir {
        /// Directory.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The store is damaged: acknowledging from it would hide the loss.
    #[error(
        "store {path} is damaged ({found}): not starting on it. Restore it from a backup (the \
         gap behind its acknowledgements is then recorded, I-9; edges keep buffering meanwhile), \
         or move it aside to start with an empty store"
    )]
    StoreDamaged {
        /// The file.
        path: String,
        /// What the check found.
        found: String,
    },
    /// The store task panicked or was cancelled.
    #[error("opening the store: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// The API tokens could not be read.
    #[error("http tokens: {0}")]
    Tokens(http::auth::TokenError),
    /// The HTTP listener could not be bound.
    #[error("binding HTTP {addr}: {source}")]
    Http {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// A running aggregator.
pub struct RunningAggregator {
    /// Bound QUIC (UDP) address.
    pub quic_addr: SocketAddr,
    /// Bound TCP (TLS) address, if TCP is served.
    pub tcp_addr: Option<SocketAddr>,
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    /// The store, for in-process readers (demo, tests).
    pub store: Arc<dyn Store>,
    shutdown: watch::Sender<bool>,
    quic: JoinHandle<()>,
    http: JoinHandle<()>,
}

/// How long the store's integrity check at start may take.
const STORE_CHECK_BUDGET: std::time::Duration = std::time::Duration::from_secs(30);

/// How often the PostgreSQL store makes coming partitions and drops expired
/// ones.
const MAINTAIN_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Opens the SQLite store at `path`, checking its integrity first.
async fn open_sqlite(path: &std::path::Path) -> Result<SqliteStore, StartError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let damaged = |found: String| StartError::StoreDamaged {
        path: path.display().to_string(),
        found,
    };
    let p = path.to_path_buf();
    let store = match tokio::task::spawn_blocking(move || SqliteStore::open(&p)).await? {
        Ok(store) => store,
        Err(StoreError::Open { source, .. }) if fogline_integrity::is_damage(&source) => {
            return Err(damaged(source.to_string()));
        }
        Err(e) => return Err(e.into()),
    };
    let checked = store.clone();
    match tokio::task::spawn_blocking(move || checked.quick_check(STORE_CHECK_BUDGET)).await?? {
        fogline_integrity::Integrity::Ok => {}
        fogline_integrity::Integrity::Damaged(found) => return Err(damaged(found.join("; "))),
        fogline_integrity::Integrity::Unfinished => {
            tracing::warn!(budget = ?STORE_CHECK_BUDGET, store = %path.display(), "The store's integrity check did not finish; starting without it (damage met later makes /healthz unhealthy).")
        }
    }
    Ok(store)
}

/// Opens the store `[store]` names: SQLite (checked) or PostgreSQL
/// (migrated, partitions made, then maintained hourly until `shutdown`).
async fn open_store(
    config: &config::StoreConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<Arc<dyn Store>, StartError> {
    match config.kind() {
        config::StoreKind::Sqlite(path) => Ok(Arc::new(open_sqlite(path).await?)),
        config::StoreKind::Postgres(url) => {
            let options = store::PostgresOptions {
                pool_size: config.pool_size,
                retention: config.retention,
            };
            let pg = store::PostgresStore::connect(url, options).await?;
            let maintained = pg.clone();
            let mut shutdown = shutdown;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(MAINTAIN_EVERY) => {}
                    }
                    if let Err(e) = maintained
                        .maintain(fogline_telemetry::clock::now_ms())
                        .await
                    {
                        tracing::warn!(error = %e, "Store maintenance (partitions, retention) failed; retried in an hour.");
                    }
                }
            });
            Ok(Arc::new(pg))
        }
    }
}

/// Opens the store (checking its integrity), loads TLS material and binds
/// both listeners.
pub async fn start(config: CloudConfig) -> Result<RunningAggregator, StartError> {
    metrics_help::describe();
    let (shutdown, rx) = watch::channel(false);
    let store = open_store(&config.store, rx.clone()).await?;
    let wants = rollout::Wants::default();
    let rollouts = rollout::Controller::new(store.clone(), wants.clone());
    rollouts.spawn(rx.clone());
    let server = Service::bind(&config, store.clone(), wants).await?;
    let quic_addr = server.quic_addr()?;
    let tcp_addr = server.tcp_addr();
    let nodes = server.nodes();
    let latest = server.latest_cache();
    let health = server.store_health();
    let tokens = Arc::new(
        http::auth::Tokens::new(
            config.http.tokens.clone(),
            config.http.tokens_file.clone(),
            config.http.open_paths(),
        )
        .map_err(StartError::Tokens)?,
    );
    if tokens.count() == 0 {
        tracing::warn!("No API tokens: the HTTP API answers 401 to every data request. Make one with `fogline-cloud token new --config <cloud.toml> --name <who> --scope read`.");
    }
    let app = http::router(http::Api {
        store: store.clone(),
        nodes,
        latest,
        health,
        tokens: tokens.clone(),
        max_response_bytes: config.http.max_response_bytes,
        rollouts,
    });
    let std_listener = std::net::TcpListener::bind(config.http.listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| StartError::Http {
            addr: config.http.listen,
            source,
        })?;
    let http_addr = std_listener
        .local_addr()
        .map_err(|source| StartError::Http {
            addr: config.http.listen,
            source,
        })?;
    let quic = tokio::spawn(server.run(rx.clone()));
    let http = tokio::spawn(serve_http(
        std_listener,
        app,
        config.http.clone(),
        tokens,
        config.tls.reload_every,
        rx,
    ));
    info!(%quic_addr, tcp_addr = ?tcp_addr, %http_addr, store = %config.store.describe(), "Aggregator listening.");
    Ok(RunningAggregator {
        quic_addr,
        tcp_addr,
        http_addr,
        store,
        shutdown,
        quic,
        http,
    })
}

/// Serves the API until `shutdown`, over TLS when `[http]` names a
/// certificate; re-reads the tokens file every `reload_every`.
async fn serve_http(
    listener: std::net::TcpListener,
    app: axum::Router,
    config: config::HttpConfig,
    tokens: Arc<http::auth::Tokens>,
    reload_every: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        let mut tick =
            tokio::time::interval(reload_every.max(std::time::Duration::from_millis(100)));
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => match tokens.reload() {
                    Ok(true) => info!(tokens = tokens.count(), "API tokens re-read."),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "The API tokens file does not read; the tokens read before stay in force."),
                },
            }
        }
        stopper.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
    });
    let service = app.into_make_service();
    let served = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => match http_tls(cert, key) {
            Ok(tls) => {
                axum_server::from_tcp_rustls(listener, tls)
                    .handle(handle)
                    .serve(service)
                    .await
            }
            Err(e) => {
                tracing::error!(error = %e, "HTTP TLS material does not load; the HTTP API is not served.");
                return;
            }
        },
        _ => {
            axum_server::from_tcp(listener)
                .handle(handle)
                .serve(service)
                .await
        }
    };
    if let Err(e) = served {
        tracing::error!(error = %e, "HTTP server failed.");
    }
}

/// The HTTP listener's TLS (rustls, ring).
fn http_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<axum_server::tls_rustls::RustlsConfig, TransportError> {
    let certs = fogline_transport::tls::load_certs(cert)?;
    let key = fogline_transport::tls::load_key(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
    .map_err(|e| TransportError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(axum_server::tls_rustls::RustlsConfig::from_config(
        Arc::new(config),
    ))
}

impl RunningAggregator {
    /// Stops accepting, closes node connections and waits for both listeners.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.quic.await;
        let _ = self.http.await;
    }
}
