//! The uplink: replicates the outbox to the aggregator.
//!
//! The policy lives in `fogline-protocol`: a
//! [`ClientSession`](fogline_protocol::session::client::ClientSession) per
//! connection (resume, window, acks, pings, stall and silence decisions) and
//! a [`Dialer`] across connections (which server, QUIC or TCP, how long to
//! wait). This module only runs them: it dials with
//! [`ClientTransport`], moves frames ([`link`]) and runs outbox work on
//! blocking threads ([`outbox_ops`]).
//!
//! Invariants (ARCHITECTURE.md I-7, I-8, I-9, I-18, I-19, I-21):
//! - Outbox rows are deleted only up to a sequence the aggregator
//!   acknowledged (its acks follow its commit) or reported as its cursor on
//!   connect *for this outbox's incarnation*.
//! - On every (re)connect, sending resumes right after the aggregator's
//!   cursor, whatever was in flight before.
//! - A dead link is found within `silence_timeout` (default 5 s), a
//!   restarted aggregator within about `probe_after` (1 s), a stuck one
//!   within `stall_timeout`.
//!
//! The uplink knows nothing about MQTT or functions.

pub mod events;
mod link;
pub mod outbox_ops;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fogline_protocol::dial::{Attempt, DialConfig, Dialer, Ending};
use fogline_protocol::session::client::{ClientAction, ClientConfig, ClientSession};
use fogline_protocol::Frame;
use fogline_transport::client::{ClientTransport, Connected};
use fogline_transport::tls::ClientTls;
use fogline_transport::TransportError;
use rand::Rng;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tracing::{debug, error, info, warn};

use crate::config::{EdgeConfig, UplinkConfig};
use crate::outbox::OutboxReader;
use fogline_telemetry::health::ProblemKind;
use link::End;
use outbox_ops::{outbox_info, Outbox};

/// Live uplink state for status and metrics.
#[derive(Debug, Default)]
pub struct UplinkState {
    /// Connected to the aggregator.
    pub connected: AtomicBool,
    /// Highest sequence acknowledged.
    pub acked_seq: AtomicU64,
    /// When the aggregator last acknowledged anything (ms since epoch).
    pub last_sync_ms: AtomicU64,
    /// When the current session last made progress (connect or ack), ms
    /// since epoch; 0 when not connected.
    pub last_progress_ms: AtomicU64,
    /// Batches in flight right now.
    pub in_flight: AtomicU64,
    /// Times the aggregator's cursor was behind what it had acknowledged.
    pub cursor_regressions: AtomicU64,
    /// Sessions established.
    pub connects: AtomicU64,
    /// Sessions ended because the aggregator went silent.
    pub silent: AtomicU64,
    /// Sessions ended because acks stopped with data outstanding.
    pub stalls: AtomicU64,
    /// Fresh connections tried alongside a silent session.
    pub probes: AtomicU64,
    /// Sessions moved to a fresh connection found by a probe.
    pub probe_switches: AtomicU64,
    /// Connection attempts that failed.
    pub failed_attempts: AtomicU64,
    /// Sessions in a row that ended before they made progress (a flapping
    /// link; the dialer backs off).
    pub fruitless: AtomicU64,
    /// Refusals by the aggregator in a row (a rejected certificate).
    pub refusals: AtomicU64,
    /// The link now in use.
    pub link: Mutex<Option<LinkInfo>>,
    /// Why sessions fail, since when (cleared by progress).
    pub failure: Mutex<Option<LinkFailure>>,
    /// Deleting acknowledged records fails (cleared by a delete that works).
    pub store_failure: Mutex<Option<LinkFailure>>,
}

/// A run of uplink failures, for `/healthz`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkFailure {
    /// Which kind (the latest).
    pub kind: ProblemKind,
    /// Since when (ms since epoch): the first failure of the run.
    pub since_ms: u64,
    /// The latest failure, in words.
    pub detail: String,
    /// Failures in the run.
    pub count: u64,
}

/// Adds a failure to the run in `slot`.
fn note_failure(slot: &Mutex<Option<LinkFailure>>, kind: ProblemKind, detail: String) {
    if let Ok(mut f) = slot.lock() {
        let (since_ms, count) = f
            .as_ref()
            .map_or((crate::clock::now_ms(), 0), |f| (f.since_ms, f.count));
        *f = Some(LinkFailure {
            kind,
            since_ms,
            detail,
            count: count + 1,
        });
    }
}

fn clear_failure(slot: &Mutex<Option<LinkFailure>>) {
    if let Ok(mut f) = slot.lock() {
        *f = None;
    }
}

/// The connection in use, for `status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct LinkInfo {
    /// The server as configured.
    pub server: String,
    /// `quic` or `tcp`.
    pub transport: String,
    /// Since when (ms since the Unix epoch).
    pub since_ms: u64,
    /// The `Hello` went out as 0-RTT data.
    pub zero_rtt: bool,
}

/// `status`'s view of the uplink.
#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
pub struct UplinkStatus {
    /// The link in use.
    pub link: Option<LinkInfo>,
    /// Sessions established.
    pub connects: u64,
    /// Sessions ended by silence.
    pub silent: u64,
    /// Sessions ended by a stall.
    pub stalls: u64,
    /// Probes tried.
    pub probes: u64,
    /// Sessions moved to a probe's connection.
    pub probe_switches: u64,
    /// Connection attempts that failed.
    pub failed_attempts: u64,
    /// Sessions in a row that ended before making progress.
    #[serde(default)]
    pub fruitless: u64,
    /// Refusals by the aggregator in a row.
    #[serde(default)]
    pub refusals: u64,
}

impl UplinkState {
    /// A snapshot for `/status`.
    pub fn status(&self) -> UplinkStatus {
        let get = |a: &AtomicU64| a.load(Ordering::Acquire);
        UplinkStatus {
            link: self.link.lock().ok().and_then(|l| l.clone()),
            connects: get(&self.connects),
            silent: get(&self.silent),
            stalls: get(&self.stalls),
            probes: get(&self.probes),
            probe_switches: get(&self.probe_switches),
            failed_attempts: get(&self.failed_attempts),
            fruitless: get(&self.fruitless),
            refusals: get(&self.refusals),
        }
    }

    /// The failing run of sessions, if any.
    pub fn failure(&self) -> Option<LinkFailure> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Deleting acknowledged records fails, if it does.
    pub fn store_failure(&self) -> Option<LinkFailure> {
        self.store_failure.lock().ok().and_then(|f| f.clone())
    }

    /// A session made progress (an acknowledgement, or it held): the run
    /// of failures is over.
    fn healed(&self) {
        self.fruitless.store(0, Ordering::Release);
        self.refusals.store(0, Ordering::Release);
        clear_failure(&self.failure);
    }

    fn set_link(&self, link: Option<LinkInfo>) {
        if let Ok(mut l) = self.link.lock() {
            *l = link;
        }
    }
}

/// Makes the node's status for the aggregator (blocks: reads the outbox).
pub type StatusSource = Arc<dyn Fn() -> fogline_protocol::status::NodeStatus + Send + Sync>;

/// Everything the uplink needs.
pub struct Uplink {
    config: UplinkConfig,
    /// Where the node's status comes from, if it sends one.
    status: Option<StatusSource>,
    /// Where rollouts' `Deploy` frames go (protocol 6).
    deployer: Option<crate::deploy::DeployHandle>,
    /// The node's id: it orders the aggregators (rendezvous hashing).
    node_id: String,
    tls: ClientTls,
    outbox: Outbox,
    state: Arc<UplinkState>,
    committed: Arc<Notify>,
    committed_seq: Arc<AtomicU64>,
}

/// How often certificate files are checked while waiting to reconnect.
const CERT_WATCH: Duration = Duration::from_secs(5);

/// How often certificate files are checked for a renewal.
const CERT_CHECK: Duration = Duration::from_secs(5);

impl Uplink {
    /// Prepare the uplink for `config` (which must have an `[uplink]`).
    pub fn new(
        config: &EdgeConfig,
        uplink: &UplinkConfig,
        reader: OutboxReader,
        state: Arc<UplinkState>,
        committed: Arc<Notify>,
        committed_seq: Arc<AtomicU64>,
    ) -> Self {
        Self {
            tls: ClientTls {
                ca: config.resolve(&uplink.ca),
                cert: config.resolve(&uplink.cert),
                key: config.resolve(&uplink.key),
            },
            config: uplink.clone(),
            status: None,
            deployer: None,
            node_id: config.node.id.clone(),
            outbox: Outbox::new(reader),
            state,
            committed,
            committed_seq,
        }
    }

    /// Sends the node's status from `source` at each connect and every
    /// `uplink.status_every`.
    pub fn with_status(mut self, source: StatusSource) -> Self {
        self.status = Some(source);
        self
    }

    /// Hands rollouts' `Deploy` frames to `deployer`, and sends a status as
    /// soon as a deployment's state changes.
    pub fn with_deployer(mut self, deployer: crate::deploy::DeployHandle) -> Self {
        self.deployer = Some(deployer);
        self
    }

    fn session_config(&self) -> ClientConfig {
        let c = &self.config;
        ClientConfig {
            window: c.max_in_flight,
            batch_records: c.batch_records,
            batch_bytes: c.batch_bytes,
            handshake_timeout: c.connect_timeout.max(Duration::from_secs(1)) * 2,
            probe_after: c.probe_after,
            silence_timeout: c.silence_timeout,
            keepalive: c.keepalive,
            stall_timeout: c.stall_timeout,
            agent: format!("fogline-edge/{}", env!("CARGO_PKG_VERSION")),
            out_of_order: self.outbox.out_of_order(),
            ..ClientConfig::default()
        }
    }

    fn dial_config(&self, servers: usize) -> DialConfig {
        let c = &self.config;
        DialConfig {
            servers,
            tcp_fallback: c.tcp_fallback,
            quic_retry: c.quic_retry,
            min_delay: c.reconnect_min,
            max_delay: c.reconnect_max,
            connect_timeout: c.connect_timeout,
            attempt_floor: Duration::from_secs(1).min(c.connect_timeout),
            refused_delay: c.refused_delay,
            refused_max_delay: c.refused_max_delay.max(c.refused_delay),
            ..DialConfig::default()
        }
    }

    /// Replicate until `shutdown` flips.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let transport = loop {
            match ClientTransport::new(self.tls.clone()) {
                Ok(t) => break t,
                Err(e) => {
                    error!(error = %e, "The uplink cannot load its TLS material; retrying.");
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(self.config.reconnect_max) => continue,
                    }
                }
            }
        };
        let servers = self.config.servers_for(&self.node_id);
        info!(order = ?servers, "Aggregators, in the order this node tries them.");
        let mut dialer = Dialer::new(self.dial_config(servers.len()), Instant::now());
        let mut carried: Option<(Connected, Attempt, SocketAddr)> = None;
        let mut rtt: Option<Duration> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            match transport.reload_if_changed() {
                Ok(true) => {
                    info!(cert = %self.tls.cert.display(), "Node certificate files changed; using them from now on.")
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, "Node certificate files changed but cannot be loaded; keeping the previous ones.")
                }
            }
            let id = match self.outbox.identity().await {
                Ok(id) => id,
                Err(e) => {
                    error!(error = %e, "Cannot read the outbox's identity; retrying.");
                    tokio::select! {
                        _ = shutdown.changed() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let mut session =
                ClientSession::new(self.session_config(), outbox_info(id), Instant::now());
            let mut hello = Vec::new();
            if let Some(ClientAction::Send(frame @ Frame::Hello { .. })) = session.poll_action() {
                if let Err(e) = frame.encode(&mut hello) {
                    error!(error = %e, "Cannot encode Hello.");
                    break;
                }
            }
            let (connected, attempt, addr) = match carried.take() {
                Some((mut c, a, addr)) => {
                    c.conn.writer.queue_encoded(&hello);
                    (c, a, addr)
                }
                None => {
                    let jitter = rand::rng().random_range(0.0..1.0);
                    let (at, attempt) = dialer.next(Instant::now(), jitter);
                    // A long backoff (a refusal waits minutes) still notices
                    // renewed certificate files within CERT_WATCH.
                    let mut renewed = false;
                    while !renewed && Instant::now() < at {
                        let step = (at - Instant::now()).min(CERT_WATCH);
                        tokio::select! {
                            _ = shutdown.changed() => break,
                            _ = tokio::time::sleep(step) => {}
                        }
                        if *shutdown.borrow() {
                            break;
                        }
                        if Instant::now() < at && matches!(transport.reload_if_changed(), Ok(true))
                        {
                            info!(cert = %self.tls.cert.display(), "Node certificate files changed; trying them now.");
                            dialer.credentials_changed();
                            renewed = true;
                        }
                    }
                    if *shutdown.borrow() {
                        break;
                    }
                    if renewed {
                        continue;
                    }
                    let server = servers.get(attempt.server).cloned().unwrap_or_default();
                    let started = Instant::now();
                    fogline_transport::tls::raise_clock_floor(crate::clock::high_water_ms());
                    let result = async {
                        let addr = resolve(&server).await?;
                        let c = transport
                            .connect(
                                attempt.transport,
                                addr,
                                &self.config.server_name(&server),
                                attempt.timeout,
                                initial_rtt(rtt),
                                &hello,
                            )
                            .await?;
                        Ok::<_, TransportError>((c, addr))
                    };
                    let result = tokio::select! {
                        _ = shutdown.changed() => break,
                        r = result => r,
                    };
                    match result {
                        Ok((c, addr)) => (c, attempt, addr),
                        Err(e) => {
                            // A clock behind is not a refusal: NTP may fix
                            // it any minute, so the usual backoff.
                            let clock_behind = e.is_clock_behind();
                            let ending = if e.is_refusal() && !clock_behind {
                                Ending::Refused
                            } else {
                                Ending::Ended
                            };
                            dialer.failed_as(attempt, ending, Instant::now());
                            self.state.failed_attempts.fetch_add(1, Ordering::AcqRel);
                            let (kind, detail) = if clock_behind {
                                let now = crate::clock::now_ms();
                                (ProblemKind::ClockWrong, format!(
                                    "{server}: the aggregator's certificate is not valid yet by this node's clock ({}): the clock is behind (no RTC, NTP not synced?); set it, or wait for NTP — readings are buffered meanwhile. {e}",
                                    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(now))
                                ))
                            } else if ending == Ending::Refused {
                                (
                                    ProblemKind::Refused,
                                    format!("{server} over {}: {e}", attempt.transport.name()),
                                )
                            } else {
                                (
                                    ProblemKind::Unreachable,
                                    format!("{server} over {}: {e}", attempt.transport.name()),
                                )
                            };
                            if clock_behind {
                                error!(%server, "{detail}");
                            }
                            note_failure(&self.state.failure, kind, detail);
                            metrics::counter!(events::CONNECT_FAILURES_TOTAL, "transport" => attempt.transport.name()).increment(1);
                            let down = dialer.down_for(Instant::now()).unwrap_or_default();
                            debug!(%server, transport = attempt.transport.name(), after = ?started.elapsed(), error = %e, "Connection attempt failed.");
                            if attempt.transport == fogline_protocol::dial::Transport::Quic
                                || !self.config.tcp_fallback
                            {
                                warn!(%server, transport = attempt.transport.name(), down_for = ?down, error = %e, "Cannot reach the aggregator.");
                            }
                            continue;
                        }
                    }
                }
            };
            let server = servers.get(attempt.server).cloned().unwrap_or_default();
            dialer.connected(attempt, connected.handshake, Instant::now());
            rtt = Some(connected.conn.handle.rtt());
            self.state.connects.fetch_add(1, Ordering::AcqRel);
            events::Connected {
                transport: attempt.transport.name(),
                zero_rtt: connected.zero_rtt,
            }
            .emit();
            self.state.set_link(Some(LinkInfo {
                server: server.clone(),
                transport: attempt.transport.name().to_string(),
                since_ms: crate::clock::now_ms(),
                zero_rtt: connected.zero_rtt,
            }));
            debug!(%server, transport = attempt.transport.name(), handshake = ?connected.handshake, zero_rtt = connected.zero_rtt, "Connected.");
            let ctx = link::Ctx {
                uplink: &self,
                transport: &transport,
                server: &server,
                addr,
                attempt,
                id,
            };
            let end = ctx
                .drive(session, connected.conn, &mut dialer, &mut shutdown)
                .await;
            self.set_connected(false).await;
            self.state.set_link(None);
            let refused = matches!(
                &end,
                End::Closed {
                    label: "refused",
                    ..
                }
            );
            dialer.disconnected_as(
                if refused {
                    Ending::Refused
                } else {
                    Ending::Ended
                },
                Instant::now(),
            );
            let (fruitless, refusals) = dialer.backoff_state();
            self.state
                .fruitless
                .store(u64::from(fruitless), Ordering::Release);
            self.state
                .refusals
                .store(u64::from(refusals), Ordering::Release);
            if fruitless == 0 && refusals == 0 {
                self.state.healed();
            } else if let End::Closed { reason, label } = &end {
                let kind = match *label {
                    "refused" => ProblemKind::Refused,
                    "local" => ProblemKind::StoreError,
                    _ => ProblemKind::Flapping,
                };
                note_failure(
                    &self.state.failure,
                    kind,
                    format!("{server}: session ended before any progress ({label}): {reason}"),
                );
            }
            match end {
                End::Shutdown => break,
                End::Switch(c, a) => carried = Some((*c, a, addr)),
                End::Closed { reason, label } => {
                    metrics::counter!(events::DISCONNECTS_TOTAL, "reason" => label).increment(1);
                    match label {
                        "silent" => self.state.silent.fetch_add(1, Ordering::AcqRel),
                        "stalled" => self.state.stalls.fetch_add(1, Ordering::AcqRel),
                        _ => 0,
                    };
                    if label == "renewed" || label == "certificate" {
                        info!(%server, "{reason}");
                    } else if label == "refused" {
                        error!(%server, refusals, "The aggregator refuses this node ({reason}); retrying in minutes, or at once when the certificate files change.");
                    } else {
                        warn!(%server, reason = label, "Uplink session ended: {reason}");
                    }
                }
            }
        }
        self.state.set_link(None);
        info!("Uplink stopped.");
    }

    async fn set_connected(&self, connected: bool) {
        if !connected {
            self.state.last_progress_ms.store(0, Ordering::Release);
            self.state.in_flight.store(0, Ordering::Release);
        }
        if self.state.connected.swap(connected, Ordering::AcqRel) != connected {
            metrics::gauge!(events::CONNECTED).set(if connected { 1.0 } else { 0.0 });
            if let Err(e) = self.outbox.note_connected(connected).await {
                debug!(error = %e, "Cannot note the uplink state in the outbox.");
            }
        }
    }

    /// A delete of acknowledged records worked.
    fn deletes_work(&self) {
        clear_failure(&self.state.store_failure);
    }

    /// A delete of acknowledged records failed: logged (the first few,
    /// then every 60th), kept for `/healthz`.
    fn deletes_fail(&self, through: u64, e: &outbox_ops::OpError) {
        let disk_full = matches!(e, outbox_ops::OpError::Outbox(o) if o.is_disk_full());
        let kind = if disk_full {
            ProblemKind::DiskFull
        } else {
            ProblemKind::StoreError
        };
        let detail = format!("deleting acknowledged records through {through}: {e}");
        let count = self.state.store_failure().map_or(0, |f| f.count);
        if count < 3 || count.is_multiple_of(60) {
            warn!(through, failures = count + 1, error = %e, "Cannot delete acknowledged records; replication goes on, the next acknowledgement retries.");
        }
        metrics::counter!(events::DELETE_FAILURES_TOTAL).increment(1);
        note_failure(&self.state.store_failure, kind, detail);
    }

    fn note_ack(&self, acked: u64) {
        self.state.acked_seq.fetch_max(acked, Ordering::AcqRel);
        let now = crate::clock::now_ms();
        self.state.last_sync_ms.store(now, Ordering::Release);
        self.state.last_progress_ms.store(now, Ordering::Release);
        metrics::gauge!(events::ACKED_SEQ).set(acked as f64);
    }
}

/// Paces QUIC's first packets: the last connection's RTT, or 100 ms.
fn initial_rtt(last: Option<Duration>) -> Duration {
    last.unwrap_or(Duration::from_millis(100))
        .clamp(Duration::from_millis(5), Duration::from_secs(1))
}

async fn resolve(server: &str) -> Result<SocketAddr, TransportError> {
    let mut addrs = tokio::net::lookup_host(server)
        .await
        .map_err(|e| TransportError::Resolve {
            server: server.to_string(),
            reason: e.to_string(),
        })?;
    addrs.next().ok_or_else(|| TransportError::Resolve {
        server: server.to_string(),
        reason: "no address".into(),
    })
}
