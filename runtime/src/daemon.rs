//! Wiring the daemon together: ingest (native endpoint and/or external
//! broker) → pipeline worker → outbox → uplink, plus the metrics, status
//! and health endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use crate::config::EdgeConfig;
use crate::functions::{FunctionError, FunctionRuntime, RuntimeOptions};
use crate::ingest::endpoint::{Endpoint, EndpointError};
use crate::ingest::session_store::Replica;
use crate::ingest::{broker_client, IngestSink, IngestState, SinkMeter};
use crate::outbox::{Outbox, OutboxError, OutboxReader};
use crate::pipeline::{
    self, FunctionStatus, ModuleStore, PipelineHealth, Router, Worker, WorkerOptions,
};
use crate::telemetry;
use crate::uplink::{Uplink, UplinkState};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A function module failed to load or initialise.
    #[error("{0}")]
    Function(#[from] FunctionError),
    /// The functions' versions could not be set up.
    #[error("{0}")]
    Versions(#[from] pipeline::VersionError),
    /// The outbox could not be opened.
    #[error("{0}")]
    Outbox(#[from] OutboxError),
    /// The MQTT endpoint could not start.
    #[error("{0}")]
    Endpoint(#[from] EndpointError),
    /// The rollout journal could not be opened.
    #[error("{0}")]
    Deploy(#[from] crate::deploy::DeployError),
    /// A socket or thread could not be started.
    #[error("{what}: {source}")]
    Io {
        /// What we were starting.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// Shared live state, served on `/status` and checked by `/healthz`.
#[derive(Debug)]
pub struct LiveState {
    /// Ingest side.
    pub ingest: Arc<IngestState>,
    /// Bytes between the sockets and the outbox commit.
    pub pending: SinkMeter,
    /// Pipeline progress.
    pub pipeline: Arc<PipelineHealth>,
    /// Uplink side.
    pub uplink: Arc<UplinkState>,
    /// Whether an uplink is configured.
    pub uplink_configured: bool,
    /// No progress for this long with work pending: wedged.
    pub stall_after: Duration,
    /// The functions: versions, breakers, held inputs, state.
    pub functions: Arc<std::sync::Mutex<Vec<FunctionStatus>>>,
    /// Raised when the outbox is found damaged at run time.
    pub damage: crate::outbox::salvage::DamageFlag,
    /// The endpoint's local subscribers (durable ones' positions).
    pub local: Arc<crate::local::LocalBus>,
    /// Rollouts applied here, as the aggregator is told.
    pub deployments: crate::deploy::Reports,
}

/// A started daemon.
pub struct Daemon {
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    endpoint: Option<Endpoint>,
    uplink: Option<tokio::task::JoinHandle<()>>,
    worker: pipeline::WorkerHandle,
    shutdown_timeout: Duration,
    /// Where `/metrics`, `/status` and `/healthz` are served, if enabled.
    pub http_addr: Option<SocketAddr>,
    /// Where the MQTT endpoint listens (plain TCP), if it runs.
    pub broker_addr: Option<SocketAddr>,
    /// Live state.
    pub state: Arc<LiveState>,
}

/// Start everything. Returns once all parts run; modules are loaded and
/// initialised before ingest listens, so a bad module fails the start.
pub async fn start(config: EdgeConfig) -> Result<Daemon, DaemonError> {
    crate::metrics_help::describe();
    crate::metrics_help::describe_functions(&config);
    let started = std::time::Instant::now();
    let io = |what: String| move |source| DaemonError::Io { what, source };
    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir).map_err(io(format!(
        "cannot create node.data_dir {}",
        data_dir.display()
    )))?;

    let runtime = Arc::new(FunctionRuntime::new(RuntimeOptions {
        cache_dir: Some(config.module_cache_dir()),
        ..RuntimeOptions::default()
    })?);
    let outbox_path = config.outbox_path();
    check_outbox(&outbox_path, config.outbox.check_on_start)?;
    let damage = crate::outbox::salvage::DamageFlag::default();
    let mut outbox = Outbox::open(&outbox_path, config.outbox.sync)?;
    outbox.set_reserve(config.outbox.reserve_mib.saturating_mul(1 << 20));
    outbox.set_damage_flag(damage.clone());
    let epoch = outbox.begin_epoch()?;
    crate::clock::init(outbox.clock_high_water()?);
    let store = ModuleStore::new(config.module_store_dir());
    let mut chains = pipeline::start_chains(
        &config,
        &runtime,
        &mut outbox,
        &store,
        crate::clock::ingest_ms(),
    )?;
    let mut retention = config.retention();
    for (chain, p) in chains.iter_mut().zip(&config.pipelines) {
        chain.lane = outbox.lane(&p.name)?;
        chain.cloud = p.cloud;
        retention.lanes.insert(chain.lane, config.lane_policy(p));
    }
    let drain = crate::outbox::drain::DrainPolicy {
        order: config.uplink.as_ref().map(|u| u.drain).unwrap_or_default(),
        priorities: retention
            .lanes
            .iter()
            .map(|(lane, p)| (*lane, p.priority))
            .collect(),
    };
    outbox.set_retention(retention)?;
    let protected = outbox.protected_handle();
    let (replica, restored) = Replica::load(outbox.load_sessions()?);
    let broker_key = broker_client::session_key(&config);
    let (broker_session, endpoint_sessions): (Vec<_>, Vec<_>) =
        restored.into_iter().partition(|s| s.key == broker_key);
    let committed = Arc::new(Notify::new());
    let (sink, chunks) = IngestSink::new(config.ingest.max_pending_bytes);
    // The endpoint's local subscribers, fed by pipelines with `local`.
    let local = crate::local::LocalBus::new();
    let state = Arc::new(LiveState {
        ingest: Arc::new(IngestState::default()),
        pending: sink.meter(),
        pipeline: Arc::new(PipelineHealth::default()),
        uplink: Arc::new(UplinkState::default()),
        uplink_configured: config.uplink.is_some(),
        stall_after: config.health.stall_after,
        functions: Arc::new(std::sync::Mutex::new(Vec::new())),
        damage: damage.clone(),
        local: local.clone(),
        deployments: Default::default(),
    });
    let (commands, commands_rx) = tokio::sync::mpsc::unbounded_channel();
    let (shutdown, shutdown_rx) = watch::channel(false);

    let router = Router::new(config.pipelines.iter().map(|p| p.topics.clone()).collect());
    // Local delivery runs the functions as soon as a message is in: the
    // batch does not linger for more (it cost 2 ms of a 2.6 ms p50:
    // `cargo bench -p fogline-tests --bench local_actions`).
    let local_pipeline = config
        .pipelines
        .iter()
        .find(|p| p.local != crate::config::LocalMode::Off);
    let commit_linger = match local_pipeline {
        Some(p) if !config.outbox.commit_linger.is_zero() => {
            tracing::info!(pipeline = %p.name, "outbox.commit_linger is not applied: a pipeline serves local subscribers.");
            Duration::ZERO
        }
        _ => config.outbox.commit_linger,
    };
    // Durable local delivery: who is subscribed and where they are (I-40).
    if config
        .pipelines
        .iter()
        .any(|p| p.local == crate::config::LocalMode::Durable)
    {
        let (mut stored, last_id) = outbox.local_subscribers()?;
        // Publishing to the external broker was configured and is not now:
        // its position would keep outputs for nobody.
        let publisher = crate::ingest::broker_client::PUBLISHER;
        if (config.mqtt.publish.is_empty() || !config.external_broker_enabled())
            && stored.iter().any(|s| s.client == publisher)
        {
            outbox.commit(&crate::outbox::Commit {
                local_subscribers: vec![crate::outbox::SubscriberWrite::Delete(
                    publisher.to_string(),
                )],
                ..Default::default()
            })?;
            stored.retain(|s| s.client != publisher);
        }
        let reader = crate::outbox::LocalReader::open(&outbox_path)?;
        tracing::info!(
            subscribers = stored.len(),
            last_id,
            "Durable local delivery: subscribers resume where they left off."
        );
        local.durable.start(Arc::new(reader), stored, last_id);
    }
    let worker = pipeline::spawn_worker(
        Worker {
            chains,
            router,
            outbox,
            options: WorkerOptions {
                max_batch: config.outbox.max_batch,
                max_batch_bytes: config.outbox.max_batch_bytes,
                commit_linger,
                commit_interval: config.outbox.commit_interval,
                max_topic: config
                    .broker
                    .max_topic_bytes
                    .min(fogline_protocol::MAX_STREAM_NAME_BYTES),
                tick_interval: config.outbox.tick_interval,
                unrouted: config.ingest.unrouted,
            },
            committed: committed.clone(),
            sessions: replica,
            health: state.pipeline.clone(),
            commands: commands_rx,
            functions: state.functions.clone(),
            warned_unrouted: Default::default(),
            local: pipeline::LocalOutputs {
                bus: local.clone(),
                modes: config.pipelines.iter().map(|p| p.local).collect(),
            },
        },
        chunks,
    )
    .map_err(io("pipeline worker thread".into()))?;

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
            let mut reader = OutboxReader::open(&outbox_path, config.outbox.sync)?;
            reader.set_damage_flag(damage.clone());
            reader.set_protected(protected.clone());
            reader.set_drain(drain);
            let (reader, reserved) =
                reader.with_reserve(config.outbox.reserve_mib.saturating_mul(1 << 19));
            match reserved {
                Ok(true) => {}
                Ok(false) if config.outbox.reserve_mib == 0 => {}
                Ok(false) => warn!(
                    path = %outbox_path.display(),
                    reserve_mib = config.outbox.reserve_mib,
                    "Not enough free disk for the outbox's reserve file (twice its size); it is made when there is."
                ),
                Err(e) => {
                    warn!(path = %outbox_path.display(), error = %e, "Cannot make the outbox's reserve.")
                }
            }
            let (live, path, cert) = (state.clone(), outbox_path.clone(), config.resolve(&u.cert));
            let labels = u.labels.clone();
            // Rollouts come over the uplink (protocol 6).
            let deployer = crate::deploy::start(
                &config,
                runtime.clone(),
                state.functions.clone(),
                state.deployments.clone(),
                shutdown_rx.clone(),
            )?;
            let up = Uplink::new(
                &config,
                u,
                reader,
                state.uplink.clone(),
                committed.clone(),
                state.pipeline.committed_seq.clone(),
            )
            .with_status(Arc::new(move || {
                let mut s =
                    crate::telemetry::node_status(&live, &path, &cert, crate::clock::now_ms());
                s.labels = labels.clone();
                s
            }))
            .with_deployer(deployer);
            Some(tokio::spawn(up.run(shutdown_rx.clone())))
        }
        None => None,
    };

    let endpoint = if config.broker.embedded {
        Some(
            Endpoint::start(
                &config,
                sink.clone(),
                endpoint_sessions,
                state.ingest.clone(),
                shutdown_rx.clone(),
                local.clone(),
            )
            .await?,
        )
    } else {
        None
    };
    let mut tasks = Vec::new();
    tokio::spawn(crate::reload::watch(
        config.clone(),
        runtime.clone(),
        store,
        commands,
        shutdown_rx.clone(),
    ));
    if config.external_broker_enabled() {
        tasks.push(broker_client::spawn(
            &config,
            sink.clone(),
            broker_session.into_iter().next(),
            state.ingest.clone(),
            shutdown_rx.clone(),
            &local,
        ));
    }
    // Only ingest holds the sink now: when it stops, the worker drains and ends.
    drop(sink);
    let broker_addr = endpoint.as_ref().and_then(Endpoint::plain_addr);
    info!(
        node = %config.node.id,
        endpoint = ?endpoint.as_ref().map(|e| e.addrs.iter().map(|(_, a)| a.to_string()).collect::<Vec<_>>()),
        external_broker = config.external_broker_enabled().then(|| config.ingest_broker()),
        pipelines = config.pipelines.len(),
        outbox = %outbox_path.display(),
        epoch,
        startup_ms = started.elapsed().as_millis() as u64,
        "Fogline edge daemon started."
    );
    Ok(Daemon {
        shutdown,
        tasks,
        endpoint,
        uplink,
        worker,
        shutdown_timeout: config.node.shutdown_timeout,
        http_addr,
        broker_addr,
        state,
    })
}

/// Checks the outbox (within `budget`; zero: no check) and salvages it
/// into a new file if it is damaged (I-31).
fn check_outbox(path: &std::path::Path, budget: Duration) -> Result<(), DaemonError> {
    use crate::outbox::salvage::{self, Integrity};
    if budget.is_zero() || !path.exists() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    match salvage::check(path, budget)? {
        Integrity::Ok => {
            info!(path = %path.display(), took_ms = started.elapsed().as_millis() as u64, "Outbox integrity checked.");
            Ok(())
        }
        Integrity::Unfinished => {
            warn!(path = %path.display(), budget = ?budget, "The outbox's integrity check did not finish in outbox.check_on_start; starting without it (damage met later is still found).");
            Ok(())
        }
        Integrity::Damaged(found) => {
            error!(path = %path.display(), found = %found.join("; "), "The outbox is damaged; salvaging what can be read into a new file.");
            salvage_outbox(path).map(drop)
        }
    }
}

/// Salvages the damaged outbox at `path` (the daemon stopped), logs and
/// counts what was kept and lost (I-31).
pub fn salvage_outbox(
    path: &std::path::Path,
) -> Result<crate::outbox::salvage::Salvage, DaemonError> {
    let s = crate::outbox::salvage::recover(path)?;
    crate::outbox::events::Salvaged { salvage: &s }.emit();
    Ok(s)
}

impl Daemon {
    /// Resolves when the outbox is found damaged while running: the caller
    /// restarts the daemon, whose start salvages it (I-31).
    pub async fn damaged(&self) {
        self.state.damage.raised().await;
    }

    /// Stop within `node.shutdown_timeout` (I-16): ingest stops reading; each
    /// connection stays open until the pipeline has committed and
    /// acknowledged what it took from it, then is closed (MQTT 5: DISCONNECT
    /// 0x8B); the uplink closes. A commit that cannot finish (full disk) is
    /// abandoned when the time is up: nothing of it was acknowledged, its
    /// senders resend it to the next run.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        // What the worker gathers for `commit_interval` is committed now:
        // the connections and the broker client wait for those acks below.
        self.worker.commit_now();
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        if let Some(e) = self.endpoint {
            e.stop();
        }
        for t in self.tasks {
            let _ = tokio::time::timeout_at(deadline, t).await;
        }
        let worker = self.worker;
        while !worker.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if worker.is_finished() {
            worker.join();
        } else {
            warn!(timeout = ?self.shutdown_timeout, "The pipeline did not finish in time (a commit is failing or stuck); stopping without it. Nothing it held was acknowledged.");
            worker.abandon_retries();
        }
        if let Some(u) = self.uplink {
            // Within the same bound: the uplink may be waiting on a locked
            // outbox (a stuck commit holds the write lock).
            let at = deadline.max(tokio::time::Instant::now() + Duration::from_millis(200));
            let _ = tokio::time::timeout_at(at, u).await;
        }
        info!("Fogline edge daemon stopped.");
    }
}
