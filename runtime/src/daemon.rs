//! Wiring the daemon together: embedded broker → ingest → pipeline worker →
//! outbox → uplink, plus the metrics/status endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch, Notify};
use tracing::info;

use crate::config::EdgeConfig;
use crate::functions::{FunctionError, FunctionRuntime, RuntimeOptions};
use crate::ingest::{self, IngestState};
use crate::outbox::{Outbox, OutboxError, OutboxReader};
use crate::pipeline::{self, Router, Worker, WorkerOptions};
use crate::telemetry;
use crate::uplink::{Uplink, UplinkState};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A function module failed to load or initialise.
    #[error("{0}")]
    Function(#[from] FunctionError),
    /// The outbox could not be opened.
    #[error("{0}")]
    Outbox(#[from] OutboxError),
    /// Ingest could not start.
    #[error("{0}")]
    Ingest(#[from] ingest::IngestError),
    /// A socket or thread could not be started.
    #[error("{what}: {source}")]
    Io {
        /// What we were starting.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// Shared live state, served on `/status`.
#[derive(Debug, Default)]
pub struct LiveState {
    /// Ingest side.
    pub ingest: Arc<IngestState>,
    /// Uplink side.
    pub uplink: Arc<UplinkState>,
}

/// A started daemon.
pub struct Daemon {
    shutdown: watch::Sender<bool>,
    ingest: tokio::task::JoinHandle<()>,
    uplink: Option<tokio::task::JoinHandle<()>>,
    worker: pipeline::WorkerHandle,
    /// Where `/metrics` and `/status` are served, if enabled.
    pub http_addr: Option<SocketAddr>,
    /// Where the embedded broker listens, if enabled.
    pub broker_addr: Option<SocketAddr>,
    /// Live state.
    pub state: Arc<LiveState>,
}

/// Start everything. Returns once all parts run; modules are loaded and
/// initialised before ingest connects, so a bad module fails the start.
pub async fn start(config: EdgeConfig) -> Result<Daemon, DaemonError> {
    let started = std::time::Instant::now();
    let io = |what: String| move |source| DaemonError::Io { what, source };
    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir).map_err(io(format!(
        "cannot create node.data_dir {}",
        data_dir.display()
    )))?;

    let runtime = FunctionRuntime::new(RuntimeOptions {
        cache_dir: Some(config.module_cache_dir()),
        ..RuntimeOptions::default()
    })?;
    let chains = pipeline::build_chains(&config, &runtime)?;
    let outbox_path = config.outbox_path();
    let outbox = Outbox::open(&outbox_path, config.outbox.sync)?;
    let committed = Arc::new(Notify::new());
    let state = Arc::new(LiveState::default());
    let (shutdown, shutdown_rx) = watch::channel(false);

    let broker_addr = if config.broker.embedded {
        Some(ingest::embedded_broker::start(&config.broker).map_err(io("embedded broker".into()))?)
    } else {
        None
    };

    let http_addr = if config.metrics.enabled {
        Some(
            telemetry::serve(
                config.metrics.listen,
                outbox_path.clone(),
                state.clone(),
                shutdown_rx.clone(),
            )
            .await
            .map_err(io(format!(
                "metrics.listen: cannot listen on {}",
                config.metrics.listen
            )))?,
        )
    } else {
        None
    };

    let uplink = match &config.uplink {
        Some(u) => {
            let reader = OutboxReader::open(&outbox_path, config.outbox.sync)?;
            let up = Uplink::new(&config, u, reader, state.uplink.clone(), committed.clone());
            Some(tokio::spawn(up.run(shutdown_rx.clone())))
        }
        None => None,
    };

    let (tx, rx) = mpsc::channel(config.mqtt.receive_maximum as usize + 1024);
    let (acks, ingest) = ingest::start(&config, tx, state.ingest.clone(), shutdown_rx.clone())?;
    let router = Router::new(config.pipelines.iter().map(|p| p.topics.clone()).collect());
    let worker = pipeline::spawn_worker(
        Worker {
            chains,
            router,
            outbox,
            options: WorkerOptions {
                max_batch: config.outbox.max_batch,
                max_payload: config.mqtt.max_payload_bytes,
                tick_interval: config.outbox.tick_interval,
            },
            committed,
        },
        rx,
        acks,
    )
    .map_err(io("pipeline worker thread".into()))?;
    info!(
        node = %config.node.id,
        broker = %config.ingest_broker(),
        pipelines = config.pipelines.len(),
        outbox = %outbox_path.display(),
        startup_ms = started.elapsed().as_millis() as u64,
        "Fogline edge daemon started."
    );
    Ok(Daemon {
        shutdown,
        ingest,
        uplink,
        worker,
        http_addr,
        broker_addr,
        state,
    })
}

impl Daemon {
    /// Stop cleanly: ingest stops reading, the worker commits and acks what it
    /// took, the uplink closes. Unacked deliveries are redelivered next time.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.ingest.await;
        let worker = self.worker;
        worker.abandon_retries();
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        if let Some(u) = self.uplink {
            let _ = u.await;
        }
        info!("Fogline edge daemon stopped.");
    }
}
