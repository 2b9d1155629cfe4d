//! `fogline-aggregator`: the cloud aggregator service (QUIC and TCP/TLS listeners, store
//! and HTTP read API, started together by [`start`]) and the fleet
//! certificate tool behind `fogline-cloud certs`.
#![warn(missing_docs)]

pub mod certs;
pub mod config;
pub mod http;
pub mod metrics_help;
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
    let server = Service::bind(&config, store.clone()).await?;
    let quic_addr = server.quic_addr()?;
    let tcp_addr = server.tcp_addr();
    let nodes = server.nodes();
    let health = server.store_health();
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|source| StartError::Http {
            addr: config.http.listen,
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| StartError::Http {
        addr: config.http.listen,
        source,
    })?;
    let quic = tokio::spawn(server.run(rx.clone()));
    let mut http_rx = rx;
    let app = http::router(store.clone(), nodes, health);
    let http = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = http_rx.changed().await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "HTTP server failed.");
        }
    });
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

impl RunningAggregator {
    /// Stops accepting, closes node connections and waits for both listeners.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.quic.await;
        let _ = self.http.await;
    }
}
