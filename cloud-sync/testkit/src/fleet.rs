//! A fleet of simulated gateways in one process, for load tests of one
//! aggregator: each gateway has its own client certificate (its node id is
//! the CN), its own outbox state (incarnation, epoch, next seq, acked, the
//! readings not yet acknowledged) and its own QUIC connection speaking the
//! real protocol (`Hello` → `Welcome`, then `Batch` / `Ack`).
//!
//! Each gateway makes one reading per `interval` (a ~100 B JSON payload on
//! a stream of its own, `fleet/<node>/env`), sends it as one batch, and
//! measures the apply latency: from sending the batch that carried a
//! reading to receiving the `Ack` that covers it. A lost connection is
//! dialled again and what was not acknowledged is sent again, as an edge
//! does from its outbox.
//!
//! Connections are set up over time (`ramp_per_s`) so thousands of TLS
//! handshakes do not land in one second. Gateways share `sockets` UDP
//! sockets (QUIC endpoints), each connection with its own certificate.
//!
//! [`Fleet::progress`] says whether any gateway is starved: how far each
//! one's acknowledged readings are behind what its clock says it should
//! have made by now.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fogline_aggregator::certs::{self, CertError, Validity};
use fogline_protocol::batch::{encode_batch, DEFAULT_ZSTD_LEVEL};
use fogline_protocol::{Frame, Record, PROTOCOL_VERSION};
use fogline_transport::client::ClientTransport;
use fogline_transport::conn::Connection;
use fogline_transport::{Transport, TransportError};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::node::node_tls;

/// The id of gateway `i` of a fleet.
pub fn node_id(i: usize) -> String {
    format!("gw-{i:06}")
}

/// Writes a fleet CA, a server certificate for `localhost`/`127.0.0.1` and
/// certificates for gateways `0..nodes` into `dir`, on `threads` threads.
/// Certificates already there (from an earlier call with the same CA) are
/// kept, so a bench that grows its fleet issues only the new ones.
pub fn issue_certs(dir: &Path, nodes: usize, threads: usize) -> Result<(), CertError> {
    if !dir.join("ca.pem").exists() {
        certs::init_ca(dir, "fogline-fleet", Validity::days(3650)?, true)?;
        certs::issue_server(
            dir,
            &["localhost".into(), "127.0.0.1".into()],
            Validity::days(365)?,
            true,
        )?;
    }
    let leaf = Validity::days(365)?;
    let todo: Vec<usize> = (0..nodes)
        .filter(|&i| !dir.join(format!("node-{}.pem", node_id(i))).exists())
        .collect();
    let threads = threads.max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let todo = &todo;
                s.spawn(move || -> Result<(), CertError> {
                    for &i in todo.iter().skip(t).step_by(threads) {
                        certs::issue_node(dir, &node_id(i), leaf, true)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })
}

/// What a fleet does.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Number of gateways, `gw-000000` up.
    pub nodes: usize,
    /// The aggregator's QUIC address.
    pub addr: SocketAddr,
    /// Where [`issue_certs`] wrote the certificates.
    pub certs: PathBuf,
    /// Connections started per second.
    pub ramp_per_s: u32,
    /// One reading per gateway per this.
    pub interval: Duration,
    /// UDP sockets (QUIC endpoints) the gateways share, round robin; at
    /// least 1, at most `nodes` (a socket each).
    pub sockets: usize,
}

/// Apply latencies, in log-spaced buckets 2 % wide from 1 µs to ~10 min.
#[derive(Debug)]
pub struct Histogram {
    buckets: Vec<AtomicU64>,
}

const BUCKET_GROWTH: f64 = 1.02;
const BUCKETS: usize = 1400;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Histogram {
    fn index(d: Duration) -> usize {
        let us = d.as_secs_f64() * 1e6;
        if us <= 1.0 {
            return 0;
        }
        ((us.ln() / BUCKET_GROWTH.ln()) as usize + 1).min(BUCKETS - 1)
    }

    fn upper(index: usize) -> Duration {
        Duration::from_secs_f64(BUCKET_GROWTH.powi(index as i32) / 1e6)
    }

    /// Counts one latency.
    pub fn record(&self, d: Duration) {
        self.buckets[Self::index(d)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far, and zeroes them.
    pub fn take(&self) -> Latencies {
        Latencies {
            counts: self
                .buckets
                .iter()
                .map(|b| b.swap(0, Ordering::Relaxed))
                .collect(),
        }
    }
}

/// Counts taken from a [`Histogram`]; they add up.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    counts: Vec<u64>,
}

impl Latencies {
    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &Latencies) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    /// How many latencies.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (0..=1), to the bucket's upper bound (2 %); zero
    /// when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        let n = self.count();
        if n == 0 {
            return Duration::ZERO;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Histogram::upper(i);
            }
        }
        Duration::ZERO
    }

    /// The largest, to its bucket's upper bound.
    pub fn max(&self) -> Duration {
        self.counts
            .iter()
            .rposition(|&c| c > 0)
            .map_or(Duration::ZERO, Histogram::upper)
    }
}

/// One gateway's counters.
#[derive(Debug, Default)]
struct NodeState {
    /// Readings made (seq of the last one).
    made: AtomicU64,
    /// Highest seq acknowledged.
    acked: AtomicU64,
    /// When its first reading was due, in ms since the fleet started
    /// (`u64::MAX`: not yet).
    first_due_ms: AtomicU64,
}

/// Counters shared by every gateway of a fleet.
#[derive(Debug)]
struct Shared {
    started: Instant,
    interval: Duration,
    nodes: Vec<NodeState>,
    connected: AtomicUsize,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    disconnects: AtomicU64,
    acked_total: AtomicU64,
    window: Histogram,
    last_error: std::sync::Mutex<Option<String>>,
}

/// How far behind the gateways are, at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Gateways whose first reading is due.
    pub started: usize,
    /// Gateways connected now.
    pub connected: usize,
    /// Readings acknowledged, over all gateways.
    pub acked: u64,
    /// Readings made, over all gateways.
    pub made: u64,
    /// The least and the most any started gateway is behind its schedule:
    /// readings due by its clock minus readings acknowledged, in intervals.
    pub min_behind: u64,
    /// See `min_behind`.
    pub max_behind: u64,
    /// Started gateways behind by more than the `starved` bound.
    pub starved: usize,
    /// Successful connections so far (reconnects included).
    pub connects: u64,
    /// Failed connection attempts so far.
    pub connect_failures: u64,
    /// Connections lost so far.
    pub disconnects: u64,
}

/// What one gateway did, when the fleet is stopped.
#[derive(Debug, Clone)]
pub struct NodeReport {
    /// Its node id.
    pub node: String,
    /// Readings made: seqs `1..=made`.
    pub made: u64,
    /// Highest seq acknowledged.
    pub acked: u64,
    /// Readings still unacknowledged at the end.
    pub unacked: usize,
}

/// A running fleet.
pub struct Fleet {
    shared: Arc<Shared>,
    /// `Some(deadline)`: stop making readings, drain until then.
    stop: watch::Sender<Option<Instant>>,
    tasks: JoinSet<NodeReport>,
}

impl Fleet {
    /// Starts the gateways (their connections over the ramp).
    pub fn start(config: FleetConfig) -> Result<Self, TransportError> {
        let started = Instant::now();
        let shared = Arc::new(Shared {
            started,
            interval: config.interval,
            nodes: (0..config.nodes)
                .map(|_| NodeState {
                    first_due_ms: AtomicU64::new(u64::MAX),
                    ..NodeState::default()
                })
                .collect(),
            connected: AtomicUsize::new(0),
            connects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            acked_total: AtomicU64::new(0),
            window: Histogram::default(),
            last_error: std::sync::Mutex::new(None),
        });
        let (stop, stop_rx) = watch::channel(None);
        let sockets = config.sockets.clamp(1, config.nodes.max(1));
        let mut endpoints: Vec<Arc<ClientTransport>> = Vec::with_capacity(sockets);
        let mut tasks = JoinSet::new();
        for i in 0..config.nodes {
            let id = node_id(i);
            let tls = node_tls(&config.certs, &id);
            let transport = if endpoints.len() < sockets {
                let t = Arc::new(ClientTransport::new(tls)?);
                endpoints.push(t.clone());
                t
            } else {
                let base = &endpoints[i % sockets];
                Arc::new(ClientTransport::sharing_endpoint(tls, base)?)
            };
            let at = Duration::from_secs_f64(i as f64 / f64::from(config.ramp_per_s.max(1)));
            let gw = Gateway {
                index: i,
                id,
                transport,
                addr: config.addr,
                interval: config.interval,
                shared: shared.clone(),
                outbox: Outbox {
                    incarnation: rand::random::<u64>() | 1,
                    epoch: rand::random::<u64>() | 1,
                    next_seq: 1,
                    acked: 0,
                    unacked: VecDeque::new(),
                },
            };
            tasks.spawn(gw.run(started + at, stop_rx.clone()));
        }
        Ok(Self {
            shared,
            stop,
            tasks,
        })
    }

    /// Apply latencies since the last call.
    pub fn take_latencies(&self) -> Latencies {
        self.shared.window.take()
    }

    /// Readings acknowledged so far, over all gateways.
    pub fn acked(&self) -> u64 {
        self.shared.acked_total.load(Ordering::Relaxed)
    }

    /// The last error a gateway met, if any.
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Where the gateways are now; `starved`: behind by more than this many
    /// intervals.
    pub fn progress(&self, starved: u64) -> Progress {
        let s = &self.shared;
        let now_ms = s.started.elapsed().as_millis() as u64;
        let every = (s.interval.as_millis() as u64).max(1);
        let mut p = Progress {
            connected: s.connected.load(Ordering::Relaxed),
            connects: s.connects.load(Ordering::Relaxed),
            connect_failures: s.connect_failures.load(Ordering::Relaxed),
            disconnects: s.disconnects.load(Ordering::Relaxed),
            min_behind: u64::MAX,
            ..Progress::default()
        };
        for n in &s.nodes {
            let first = n.first_due_ms.load(Ordering::Relaxed);
            let acked = n.acked.load(Ordering::Relaxed);
            p.acked += acked;
            p.made += n.made.load(Ordering::Relaxed);
            if first > now_ms {
                continue;
            }
            p.started += 1;
            let due = (now_ms - first) / every + 1;
            let behind = due.saturating_sub(acked);
            p.min_behind = p.min_behind.min(behind);
            p.max_behind = p.max_behind.max(behind);
            if behind > starved {
                p.starved += 1;
            }
        }
        if p.started == 0 {
            p.min_behind = 0;
        }
        p
    }

    /// Stops making readings, waits up to `drain` for every reading made to
    /// be acknowledged, closes the connections and reports per gateway.
    pub async fn stop(mut self, drain: Duration) -> Vec<NodeReport> {
        let _ = self.stop.send(Some(Instant::now() + drain));
        let mut reports = Vec::with_capacity(self.shared.nodes.len());
        let _ = tokio::time::timeout(drain + Duration::from_secs(5), async {
            while let Some(r) = self.tasks.join_next().await {
                if let Ok(r) = r {
                    reports.push(r);
                }
            }
        })
        .await;
        self.tasks.abort_all();
        reports.sort_by(|a, b| a.node.cmp(&b.node));
        reports
    }
}

struct Outbox {
    incarnation: u64,
    epoch: u64,
    next_seq: u64,
    acked: u64,
    /// Made and not acknowledged: (record, when it was first sent).
    unacked: VecDeque<(Record, Option<Instant>)>,
}

struct Gateway {
    index: usize,
    id: String,
    transport: Arc<ClientTransport>,
    addr: SocketAddr,
    interval: Duration,
    shared: Arc<Shared>,
    outbox: Outbox,
}

/// How long a gateway waits after a failed connection attempt.
const RETRY: Duration = Duration::from_secs(1);

impl Gateway {
    async fn run(
        mut self,
        start_at: Instant,
        mut stop: watch::Receiver<Option<Instant>>,
    ) -> NodeReport {
        tokio::select! {
            _ = tokio::time::sleep_until(start_at.into()) => {}
            _ = stop.changed() => return self.report(),
        }
        let first_due = Instant::now();
        self.state()
            .first_due_ms
            .store(self.ms_since_start(first_due), Ordering::Relaxed);
        let mut tick = tokio::time::interval_at(first_due.into(), self.interval);
        let mut drain_until: Option<Instant> = *stop.borrow();
        let mut stopping = drain_until.is_some();
        'dial: loop {
            if stopping && self.outbox.unacked.is_empty() {
                break;
            }
            let mut conn = tokio::select! {
                c = self.connect() => match c {
                    Ok(c) => c,
                    Err(e) => {
                        self.failed(format!("{} connecting: {e}", self.id));
                        self.shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                        if stopping {
                            break 'dial;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(RETRY) => {}
                            _ = stop.changed() => {
                                stopping = true;
                                drain_until = *stop.borrow();
                            }
                        }
                        continue 'dial;
                    }
                },
                _ = stop.changed(), if !stopping => {
                    stopping = true;
                    drain_until = *stop.borrow();
                    continue 'dial;
                }
            };
            self.shared.connects.fetch_add(1, Ordering::Relaxed);
            self.shared.connected.fetch_add(1, Ordering::Relaxed);
            // Readings made while disconnected go out now, as one batch.
            let resend = self.send_unacked(&mut conn).await;
            let lost = loop {
                if let Err(e) = &resend {
                    break e.to_string();
                }
                if stopping {
                    if self.outbox.unacked.is_empty() {
                        conn.writer.shutdown().await;
                        conn.handle
                            .close(fogline_protocol::frame::ErrorCode::Ok, "fleet stopped");
                        self.shared.connected.fetch_sub(1, Ordering::Relaxed);
                        break 'dial;
                    }
                    if drain_until.is_some_and(|d| Instant::now() >= d) {
                        break "drain timed out".into();
                    }
                }
                let drain_at = drain_until.unwrap_or_else(|| Instant::now() + self.interval);
                tokio::select! {
                    _ = tick.tick(), if !stopping => {
                        if let Err(e) = self.make_and_send(&mut conn).await {
                            break e.to_string();
                        }
                    }
                    frame = conn.reader.next() => match frame {
                        Ok(Frame::Ack { up_to, .. }) => self.acked(up_to),
                        Ok(Frame::Pong { .. }) => {}
                        Ok(other) => break format!("unexpected {}", other.kind()),
                        Err(e) => break conn.handle.explain(e).to_string(),
                    },
                    _ = stop.changed(), if !stopping => {
                        stopping = true;
                        drain_until = *stop.borrow();
                    }
                    _ = tokio::time::sleep_until(drain_at.into()), if stopping => {}
                }
            };
            self.shared.connected.fetch_sub(1, Ordering::Relaxed);
            self.shared.disconnects.fetch_add(1, Ordering::Relaxed);
            self.failed(format!("{} lost its connection: {lost}", self.id));
            if drain_until.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.changed(), if !stopping => {
                    stopping = true;
                    drain_until = *stop.borrow();
                }
            }
        }
        self.report()
    }

    fn report(&self) -> NodeReport {
        NodeReport {
            node: self.id.clone(),
            made: self.outbox.next_seq - 1,
            acked: self.outbox.acked,
            unacked: self.outbox.unacked.len(),
        }
    }

    fn state(&self) -> &NodeState {
        &self.shared.nodes[self.index]
    }

    fn ms_since_start(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.shared.started)
            .as_millis() as u64
    }

    fn failed(&self, e: String) {
        if let Ok(mut last) = self.shared.last_error.lock() {
            *last = Some(e);
        }
    }

    /// Dials, says `Hello` with the outbox's state, waits for `Welcome`
    /// and forgets what its cursor covers.
    async fn connect(&mut self) -> Result<Connection, TransportError> {
        let o = &self.outbox;
        let hello = Frame::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent: "fogline-fleet".into(),
            incarnation: o.incarnation,
            next_seq: o.next_seq,
            acked: o.acked,
            epoch: o.epoch,
            epoch_start: 1,
        };
        let mut early = Vec::new();
        hello.encode(&mut early)?;
        let connected = self
            .transport
            .connect(
                Transport::Quic,
                self.addr,
                "localhost",
                Duration::from_secs(10),
                Duration::from_millis(50),
                &early,
            )
            .await?;
        let mut conn = connected.conn;
        let welcome = tokio::time::timeout(Duration::from_secs(30), conn.reader.next())
            .await
            .map_err(|_| TransportError::Timeout {
                what: "Welcome",
                after: Duration::from_secs(30),
            })?;
        match welcome {
            Ok(Frame::Welcome { cursor, .. }) => {
                self.acked(cursor);
                Ok(conn)
            }
            Ok(other) => Err(TransportError::ConnectionLost(format!(
                "expected Welcome, got {}",
                other.kind()
            ))),
            Err(e) => Err(conn.handle.explain(e)),
        }
    }

    /// Everything up to `up_to` is applied.
    fn acked(&mut self, up_to: u64) {
        let now = Instant::now();
        let mut n = 0;
        while self
            .outbox
            .unacked
            .front()
            .is_some_and(|(r, _)| r.seq <= up_to)
        {
            if let Some((_, Some(sent))) = self.outbox.unacked.pop_front() {
                self.shared.window.record(now.duration_since(sent));
            }
            n += 1;
        }
        if up_to > self.outbox.acked {
            self.outbox.acked = up_to;
            self.state().acked.store(up_to, Ordering::Relaxed);
        }
        self.shared.acked_total.fetch_add(n, Ordering::Relaxed);
    }

    async fn make_and_send(&mut self, conn: &mut Connection) -> Result<(), TransportError> {
        let seq = self.outbox.next_seq;
        self.outbox.next_seq += 1;
        let now_ms = wall_ms();
        // ~100 B, varying like a sensor's: temperature, humidity, battery.
        let x = (seq as f64 * 0.1 + self.index as f64).sin();
        let payload = format!(
            "{{\"node\":\"{}\",\"n\":{seq},\"t\":{now_ms},\"temp_c\":{:.2},\"rh\":{:.1},\"bat_v\":{:.3}}}",
            self.id,
            21.0 + 3.0 * x,
            48.0 + 10.0 * x,
            3.7 - 0.001 * (seq % 100) as f64
        );
        let record = Record {
            seq,
            stream: format!("fleet/{}/env", self.id),
            timestamp_ms: now_ms,
            payload: payload.into_bytes(),
        };
        self.state().made.store(seq, Ordering::Relaxed);
        self.outbox.unacked.push_back((record, None));
        self.send_from(conn, self.outbox.unacked.len() - 1).await
    }

    async fn send_unacked(&mut self, conn: &mut Connection) -> Result<(), TransportError> {
        if self.outbox.unacked.is_empty() {
            return Ok(());
        }
        self.send_from(conn, 0).await
    }

    /// Sends `unacked[from..]` as one batch; readings sent for the first
    /// time are timed from now.
    async fn send_from(
        &mut self,
        conn: &mut Connection,
        from: usize,
    ) -> Result<(), TransportError> {
        let records: Vec<Record> = self
            .outbox
            .unacked
            .iter()
            .skip(from)
            .map(|(r, _)| r.clone())
            .collect();
        let batch = encode_batch(&records, DEFAULT_ZSTD_LEVEL)
            .map_err(|e| TransportError::ConnectionLost(format!("encoding: {e}")))?;
        let now = Instant::now();
        for (_, sent) in self.outbox.unacked.iter_mut().skip(from) {
            sent.get_or_insert(now);
        }
        conn.writer.send(&Frame::Batch(batch)).await?;
        Ok(())
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `GET path` over plain HTTP/1.1 from `addr` (the aggregator's HTTP
/// listener); the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(match text.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_string(),
        None => text,
    })
}

/// The sum of a Prometheus metric's samples (every label set) in `text`.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_two_percent() {
        let h = Histogram::default();
        for ms in 1..=1000u64 {
            h.record(Duration::from_millis(ms));
        }
        let l = h.take();
        assert_eq!(l.count(), 1000);
        let p50 = l.quantile(0.5).as_secs_f64();
        let p99 = l.quantile(0.99).as_secs_f64();
        assert!((0.5..=0.5 * 1.03).contains(&p50), "{p50}");
        assert!((0.99..=0.99 * 1.03).contains(&p99), "{p99}");
        assert!(l.max() >= Duration::from_secs(1));
        assert_eq!(h.take().count(), 0);
    }

    #[test]
    fn metric_sum_adds_label_sets() {
        let text = "# HELP x\nfoo_total{a=\"1\"} 3\nfoo_total{a=\"2\"} 4\nfoo_total_other 9\nfoo_total 1\n";
        assert_eq!(metric_sum(text, "foo_total"), 8.0);
    }
}
