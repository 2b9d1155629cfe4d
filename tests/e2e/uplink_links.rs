//! The edge's uplink over links as they really are (ARCHITECTURE.md I-10,
//! I-18, I-19): a network that blocks UDP (TCP/TLS fallback, then back to QUIC),
//! an unreachable first server (failover to the next), a gateway whose
//! address changes mid-stream (QUIC migrates, no new handshake), a link that goes
//! silent (found within `silence_timeout`, then resumed exactly), and a
//! certificate renewed mid-stream (picked up, nothing lost or doubled). The real
//! uplink and aggregator run in-process; a relay in between drops what the
//! test says.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fogline_aggregator::store::RecordQuery;
use fogline_aggregator::RunningAggregator;
use fogline_edge::config::{EdgeConfig, SyncMode};
use fogline_edge::message::Message;
use fogline_edge::outbox::{Commit, Outbox, OutboxReader};
use fogline_edge::uplink::{Uplink, UplinkState};
use fogline_testkit::relay::UdpRelay;
use fogline_tests::sensors;
use tokio::sync::{watch, Notify};

struct Rig {
    _dir: tempfile::TempDir,
    agg: RunningAggregator,
    relay: UdpRelay,
    outbox: Outbox,
    state: Arc<UplinkState>,
    notify: Arc<Notify>,
    committed: Arc<AtomicU64>,
    written: usize,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Rig {
    /// Aggregator, relay in front of it, and an uplink whose `[uplink]`
    /// gets `servers` (`{relay}` is replaced by the relay's address) and
    /// `extra` keys.
    async fn start(servers: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        fogline_testkit::certs::dev_bundle(&certs, &["gw-links"]).unwrap();
        let agg =
            fogline_tests::deploy::in_process_aggregator(&certs, &dir.path().join("cloud.db"))
                .await
                .unwrap();
        let relay = UdpRelay::start_with_tcp(agg.quic_addr, agg.tcp_addr.unwrap())
            .await
            .unwrap();
        let outbox_path = dir.path().join("edge/outbox.db");
        let outbox = Outbox::open(&outbox_path, SyncMode::Normal).unwrap();
        let servers = servers.replace("{relay}", &relay.local_addr().to_string());
        let edge_toml = format!(
            "[node]\nid = \"gw-links\"\ndata_dir = \"{d}/edge\"\n[[pipelines]]\nname = \"p\"\ntopics = [\"#\"]\n[uplink]\nservers = {servers}\nserver_name = \"localhost\"\nca = \"{c}/ca.pem\"\ncert = \"{c}/node-gw-links.pem\"\nkey = \"{c}/node-gw-links.key\"\nreconnect_max = \"500ms\"\nconnect_timeout = \"1s\"\n{extra}\n",
            d = dir.path().display(),
            c = certs.display()
        );
        let config = EdgeConfig::parse(&edge_toml, dir.path()).unwrap();
        let state = Arc::new(UplinkState::default());
        let notify = Arc::new(Notify::new());
        let committed = Arc::new(AtomicU64::new(0));
        let reader = OutboxReader::open(&outbox_path, SyncMode::Normal).unwrap();
        let uplink = Uplink::new(
            &config,
            config.uplink.as_ref().unwrap(),
            reader,
            state.clone(),
            notify.clone(),
            committed.clone(),
        );
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(uplink.run(stop_rx));
        Self {
            _dir: dir,
            agg,
            relay,
            outbox,
            state,
            notify,
            committed,
            written: 0,
            stop,
            task,
        }
    }

    /// Buffers `n` more readings and tells the uplink.
    fn write(&mut self, n: usize) {
        let records = (self.written..self.written + n)
            .map(|i| {
                let s = i % 5;
                let ts = 1_764_000_000_000 + i as u64;
                Message {
                    stream: sensors::topic(s),
                    timestamp_ms: ts,
                    payload: sensors::payload(s, i / 5, ts).into_bytes(),
                }
            })
            .collect();
        self.outbox
            .commit(&Commit {
                records,
                ..Commit::default()
            })
            .unwrap();
        self.written += n;
        self.committed.store(self.written as u64, Ordering::Release);
        self.notify.notify_one();
    }

    /// Waits until everything written is acknowledged.
    async fn synced(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.state.acked_seq.load(Ordering::Acquire) >= self.written as u64 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    fn transport(&self) -> Option<String> {
        self.state.status().link.map(|l| l.transport)
    }

    /// The store holds exactly seqs 1..=written, once each, in order.
    async fn assert_exact(&self) {
        let mut seqs: Vec<u64> = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .agg
                .store
                .records(&RecordQuery::node("gw-links", after, 10_000))
                .await
                .unwrap();
            let Some(last) = page.last() else { break };
            after = last.seq;
            seqs.extend(page.iter().map(|r| r.seq));
        }
        assert_eq!(
            seqs,
            (1..=self.written as u64).collect::<Vec<_>>(),
            "the store holds every buffered record once, in order"
        );
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.agg.shutdown().await;
    }
}

fn run<F: std::future::Future<Output = ()>>(f: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f);
}

#[test]
fn a_network_that_blocks_udp_falls_back_to_tcp_and_returns_to_quic() {
    run(async {
        let mut rig = Rig::start("[\"{relay}\"]", "quic_retry = \"1s\"").await;
        rig.relay.block_udp(true);
        rig.write(20_000);
        assert!(
            rig.synced(Duration::from_secs(30)).await,
            "not synced over TCP: {:?}",
            rig.state.status()
        );
        assert_eq!(rig.transport().as_deref(), Some("tcp"));
        assert!(rig.relay.tcp_bytes_to_server() > 100_000);
        assert_eq!(rig.relay.bytes_to_client(), 0, "no UDP got through");

        // UDP comes back: the periodic QUIC retry moves the session over.
        rig.relay.block_udp(false);
        let deadline = Instant::now() + Duration::from_secs(15);
        while rig.transport().as_deref() != Some("quic") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            rig.transport().as_deref(),
            Some("quic"),
            "{:?}",
            rig.state.status()
        );
        rig.write(20_000);
        assert!(rig.synced(Duration::from_secs(30)).await);
        rig.assert_exact().await;
        rig.stop().await;
    });
}

#[test]
fn a_gateway_whose_address_changes_keeps_its_connection() {
    run(async {
        let mut rig = Rig::start("[\"{relay}\"]", "").await;
        rig.write(5_000);
        assert!(rig.synced(Duration::from_secs(30)).await);
        let before = reqwest_connections(&rig).await[0].clone();
        for i in 0..10 {
            rig.write(1_000);
            if i == 3 {
                // Mid-stream, the aggregator starts seeing this gateway
                // from another address (cellular re-attach, NAT rebinding).
                rig.relay.change_client_addresses();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            rig.synced(Duration::from_secs(30)).await,
            "{:?}",
            rig.state.status()
        );
        let after = reqwest_connections(&rig).await[0].clone();
        assert_ne!(
            after["remote"], before["remote"],
            "the aggregator follows the new address"
        );
        assert_eq!(
            after["since_ms"], before["since_ms"],
            "same session: {before} → {after}"
        );
        assert_eq!(rig.state.status().connects, 1, "no new handshake");
        rig.assert_exact().await;
        rig.stop().await;
    });
}

#[test]
fn the_next_server_takes_over_when_the_first_is_unreachable() {
    run(async {
        // Nothing listens on the first address, over UDP or TCP.
        let dead = fogline_tests::free_udp_tcp_port().unwrap();
        // As listed: the dead one first (rendezvous order could put it second).
        let mut rig = Rig::start(
            &format!("[\"127.0.0.1:{dead}\", \"{{relay}}\"]"),
            "server_order = \"listed\"",
        )
        .await;
        rig.write(10_000);
        assert!(
            rig.synced(Duration::from_secs(30)).await,
            "{:?}",
            rig.state.status()
        );
        let link = rig.state.status().link.unwrap();
        assert_eq!(link.server, rig.relay.local_addr().to_string());
        assert_eq!(link.transport, "quic");
        assert!(rig.state.status().failed_attempts >= 1);
        rig.assert_exact().await;
        rig.stop().await;
    });
}

#[test]
fn a_silent_link_is_found_within_the_silence_timeout_and_replication_resumes_exactly() {
    run(async {
        let mut rig = Rig::start(
            "[\"{relay}\"]",
            "silence_timeout = \"2s\"\nprobe_after = \"500ms\"\ntcp_fallback = false",
        )
        .await;
        rig.write(5_000);
        assert!(rig.synced(Duration::from_secs(30)).await);

        // Everything is dropped from now on, no reset, no close.
        rig.relay.cut();
        let cut = Instant::now();
        rig.write(5_000);
        while rig.state.status().silent == 0 && cut.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let found = cut.elapsed();
        let status = rig.state.status();
        assert_eq!(status.silent, 1, "{status:?}");
        assert!(
            status.probes >= 1,
            "probes were tried while silent: {status:?}"
        );
        // 2 s of silence plus scheduling; far below the 60 s QUIC idle timeout.
        assert!(found < Duration::from_secs(4), "found after {found:?}");

        rig.relay.restore();
        assert!(
            rig.synced(Duration::from_secs(30)).await,
            "{:?}",
            rig.state.status()
        );
        rig.assert_exact().await;
        rig.stop().await;
    });
}

#[test]
fn a_certificate_renewed_during_traffic_is_picked_up_without_a_restart_and_nothing_is_lost_or_doubled(
) {
    run(async {
        let mut rig = Rig::start("[\"{relay}\"]", "").await;
        let certs = rig._dir.path().join("certs");
        let cert = certs.join("node-gw-links.pem");
        let (old_serial, _) = fogline_aggregator::certs::certificate_serial(&cert).unwrap();
        rig.write(5_000);
        assert!(rig.synced(Duration::from_secs(30)).await);

        // Renew while records keep coming.
        let connects = rig.state.status().connects;
        for i in 0..20 {
            rig.write(500);
            if i == 5 {
                fogline_aggregator::certs::renew_node(
                    &certs,
                    "gw-links",
                    fogline_aggregator::certs::Validity::days(30).unwrap(),
                )
                .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (new_serial, _) = fogline_aggregator::certs::certificate_serial(&cert).unwrap();
        assert_ne!(new_serial, old_serial);
        // The edge checks its files every 5 s, then reconnects to present
        // the new certificate.
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut serial = String::new();
        while Instant::now() < deadline {
            let live: serde_json::Value = reqwest_connections(&rig).await;
            serial = live[0]["serial"].as_str().unwrap_or_default().to_string();
            if serial == new_serial {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            serial, new_serial,
            "the aggregator sees the renewed certificate"
        );
        assert!(rig.state.status().connects > connects);
        rig.write(5_000);
        assert!(rig.synced(Duration::from_secs(30)).await);
        rig.assert_exact().await;
        rig.stop().await;
    });
}

/// `/api/v1/connections` of the rig's aggregator.
async fn reqwest_connections(rig: &Rig) -> serde_json::Value {
    let port = rig.agg.http_addr.port();
    tokio::task::spawn_blocking(move || {
        fogline_tests::deploy::http_get(port, "/api/v1/connections")
            .and_then(|(_, body)| serde_json::from_str(&body).ok())
            .unwrap_or(serde_json::Value::Null)
    })
    .await
    .unwrap()
}
