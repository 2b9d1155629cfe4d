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
    pub store: Arc<SqliteStore>,
    shutdown: watch::Sender<bool>,
    quic: JoinHandle<()>,
    http: JoinHandle<()>,
}

/// How long the store's integrity check at start may take.
const STORE_CHECK_BUDGET: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens the store (checking its integrity), loads TLS material and binds
/// both listeners.
pub async fn start(config: CloudConfig) -> Result<RunningAggregator, StartError> {
    metrics_help::describe();
    let path = config.store.path.clone();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let damaged = |found: String| StartError::StoreDamaged {
        path: config.store.path.display().to_string(),
        found,
    };
    let store = match tokio::task::spawn_blocking(move || SqliteStore::open(&path)).await? {
        Ok(store) => Arc::new(store),
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
            tracing::warn!(budget = ?STORE_CHECK_BUDGET, store = %config.store.path.display(), "The store's integrity check did not finish; starting without it (damage met later makes /healthz unhealthy).")
        }
    }
    let dyn_store: Arc<dyn Store> = store.clone();
    let server = Service::bind(&config, dyn_store.clone()).await?;
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
    let (shutdown, rx) = watch::channel(false);
    let quic = tokio::spawn(server.run(rx.clone()));
    let mut http_rx = rx;
    let app = http::router(dyn_store, nodes, health);
    let http = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = http_rx.changed().await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "HTTP server failed.");
        }
    });
    info!(%quic_addr, tcp_addr = ?tcp_addr, %http_addr, store = %config.store.path.display(), "Aggregator listening.");
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
