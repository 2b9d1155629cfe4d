//! End-to-end and fault tests across real processes: a private Mosquitto,
//! `fogline-edge`, `fogline-cloud`. One test binary, one module per topic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backlog_memory;
mod bad_input;
mod clock;
mod crash;
mod drain;
mod endpoint;
mod endpoint_limits;
mod external;
mod failover;
mod functions;
mod losses;
mod outbox_identity;
mod rollout;
mod shutdown;
mod uplink_links;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fogline_tests::mosquitto::Mosquitto;
use fogline_tests::process::{self, Daemon};
use fogline_tests::sensors;

/// The threshold every test pipeline applies: readings with temp above pass.
pub const ABOVE: f64 = 30.0;

/// A whole deployment in a temp dir.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub mosquitto: Mosquitto,
    pub cloud: Daemon,
    pub edge: Daemon,
    pub edge_config: PathBuf,
    pub store: PathBuf,
    pub quic_port: u16,
    pub edge_http: u16,
    pub cloud_http: u16,
}

pub fn write_certs(dir: &Path, nodes: &[&str]) {
    fogline_testkit::certs::dev_bundle(dir, nodes).expect("dev certs");
}

pub fn cloud_config(dir: &Path, certs: &Path, quic_port: u16, http_port: u16) -> PathBuf {
    let path = dir.join("cloud.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[quic]
listen = "127.0.0.1:{quic_port}"
[tls]
ca = "{c}/ca.pem"
cert = "{c}/server.pem"
key = "{c}/server.key"
[store]
path = "{d}/cloud.db"
[http]
listen = "127.0.0.1:{http_port}"
{t}"#,
            c = certs.display(),
            d = dir.display(),
            t = fogline_tests::deploy::test_token_toml()
        ),
    )
    .unwrap();
    path
}

/// An edge config with one threshold pipeline (`extra` is appended verbatim).
pub fn edge_config(
    dir: &Path,
    certs: &Path,
    node: &str,
    broker: &str,
    quic_port: u16,
    http_port: u16,
    extra: &str,
) -> PathBuf {
    let path = dir.join(format!("edge-{node}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[node]
id = "{node}"
data_dir = "{d}/edge-{node}"
[mqtt]
broker = "{broker}"
[functions.hot]
module = "{threshold}"
config = {{ field = "temp", above = {ABOVE:.1} }}
[[pipelines]]
name = "hot"
topics = ["sensors/+/reading"]
functions = ["hot"]
[outbox]
tick_interval = "200ms"
[uplink]
server = "127.0.0.1:{quic_port}"
server_name = "localhost"
ca = "{c}/ca.pem"
cert = "{c}/node-{node}.pem"
key = "{c}/node-{node}.key"
reconnect_max = "500ms"
[metrics]
listen = "127.0.0.1:{http_port}"
{extra}
"#,
            d = dir.display(),
            c = certs.display(),
            threshold = fogline_modules::threshold().display(),
        ),
    )
    .unwrap();
    path
}

impl Cluster {
    pub fn start(node: &str) -> Self {
        Self::start_with(node, "")
    }

    pub fn start_with(node: &str, extra_edge: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        write_certs(&certs, &[node]);
        let mosquitto = Mosquitto::start().unwrap();
        let quic_port = fogline_tests::free_udp_tcp_port().unwrap();
        let cloud_http = fogline_tests::free_tcp_port().unwrap();
        let edge_http = fogline_tests::free_tcp_port().unwrap();
        let cloud_cfg = cloud_config(dir.path(), &certs, quic_port, cloud_http);
        let edge_cfg = edge_config(
            dir.path(),
            &certs,
            node,
            &mosquitto.addr(),
            quic_port,
            edge_http,
            extra_edge,
        );
        let cloud = Daemon::spawn(
            "fogline-cloud",
            &["run", "--config", cloud_cfg.to_str().unwrap()],
            &dir.path().join("cloud.log"),
        )
        .unwrap();
        let edge = Daemon::spawn(
            "fogline-edge",
            &["run", "--config", edge_cfg.to_str().unwrap()],
            &dir.path().join("edge.log"),
        )
        .unwrap();
        let c = Self {
            store: dir.path().join("cloud.db"),
            dir,
            mosquitto,
            cloud,
            edge,
            edge_config: edge_cfg,
            quic_port,
            edge_http,
            cloud_http,
        };
        c.wait_edge_subscribed();
        c
    }

    /// The edge answers `/status` and is connected to the broker (so its
    /// persistent session exists and nothing published from now on is missed).
    pub fn wait_edge_subscribed(&self) {
        let ok = process::wait_until(Duration::from_secs(60), || {
            self.edge_status()
                .is_some_and(|v| v["broker_connected"].as_bool() == Some(true))
        });
        assert!(
            ok,
            "edge never connected to the broker:\n{}",
            self.edge.log_text()
        );
        // SUBACK follows CONNACK closely; give it a moment.
        std::thread::sleep(Duration::from_millis(300));
    }

    pub fn edge_status(&self) -> Option<serde_json::Value> {
        let out = process::run(
            "fogline-edge",
            &["status", "--json", "--config", self.edge_config.to_str()?],
        )
        .ok()?;
        // Exit 1 (unhealthy) and 3 (not running) still print the status.
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        if v["daemon_running"].as_bool() == Some(true) {
            Some(v)
        } else {
            None
        }
    }

    pub fn publish(
        &self,
        sensors_n: usize,
        per_sensor: usize,
        rate: Option<u32>,
        progress: impl Fn(usize) + Send + Sync + 'static,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(sensors::publish(
            "127.0.0.1",
            self.mosquitto.port(),
            sensors_n,
            per_sensor,
            rate,
            progress,
        ))
        .unwrap();
    }

    /// Wait until the store holds `expected` readings (or time runs out), then judge.
    pub fn settle(
        &self,
        expected: &BTreeSet<String>,
        timeout: Duration,
    ) -> fogline_tests::oracle::Verdict {
        let mut verdict = None;
        process::wait_until(timeout, || {
            if let Ok(records) = fogline_tests::oracle::read_store(&self.store) {
                let v = fogline_tests::oracle::judge(&records, expected);
                let done = v.received >= expected.len();
                verdict = Some(v);
                return done;
            }
            false
        });
        // A little longer, so late duplicates would show.
        std::thread::sleep(Duration::from_millis(500));
        let records = fogline_tests::oracle::read_store(&self.store).unwrap_or_default();
        let v = fogline_tests::oracle::judge(&records, expected);
        let _ = verdict;
        v
    }

    /// The sum of every series of an aggregator metric whose line contains
    /// `filter` (0 if absent).
    pub fn cloud_metric(&self, name: &str, filter: &str) -> f64 {
        let Some((_, body)) = fogline_tests::deploy::http_get(self.cloud_http, "/metrics") else {
            return 0.0;
        };
        body.lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn logs(&self) -> String {
        // Where a missing record waits (outbox, in flight, ingest) shows here.
        let status = self
            .edge_status()
            .map(|s| format!("outbox {}\nuplink {}", s["outbox"], s["uplink"]))
            .unwrap_or_else(|| "(edge not running)".into());
        format!(
            "--- edge log ---\n{}\n--- edge status ---\n{status}\n--- cloud log ---\n{}",
            tail(&self.edge.log_text(), 60),
            tail(&self.cloud.log_text(), 40)
        )
    }
}

/// A two-thread runtime for tests that drive async clients.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The readings a threshold at [`ABOVE`] must pass.
pub fn expected_hot(sensors_n: usize, per_sensor: usize) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for s in 0..sensors_n {
        for n in 0..per_sensor {
            if sensors::temperature(s, n) > ABOVE {
                set.insert(sensors::reading_id(s, n));
            }
        }
    }
    set
}

/// Publishes `(topic, payload)` pairs at QoS 1 and waits for every PUBACK.
pub fn publish_raw(port: u16, items: Vec<(String, Vec<u8>)>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut o = rumqttc::MqttOptions::new("raw-publisher", "127.0.0.1", port);
        o.set_max_packet_size(2 << 20, 2 << 20);
        let (client, mut el) = rumqttc::AsyncClient::new(o, items.len() + 1);
        let n = items.len();
        for (topic, payload) in items {
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
        let mut acked = 0;
        while acked < n {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = el.poll().await.unwrap() {
                acked += 1;
            }
        }
    });
}
