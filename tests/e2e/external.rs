//! Ingest from an external broker (a private mosquitto), end to end through
//! `fogline-edge` into `fogline-cloud`, with an oracle on the aggregator's
//! store: the cover of overlapping filters, filter changes across restarts,
//! QoS 1 redeliveries (broker restart, edge kill -9), QoS 2 across edge
//! kills, refused subscriptions, and topics the protocol cannot carry.
//!
//! The helpers here ([`Site`] and friends) are shared with `outbox_identity`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::tail;
use bytes::Bytes;
use fogline_edge::ingest::events as ingest;
use fogline_edge::local::events as local;
use fogline_edge::pipeline::events as pipeline;
use fogline_tests::deploy::{uplink_toml, Cloud, Edge};
use fogline_tests::mosquitto::{Mosquitto, MosquittoConfig};
use fogline_tests::mqtt_raw::{Options, PublishReport, Publisher, QoS};
use fogline_tests::oracle::{self, Stored};
use fogline_tests::process;
use fogline_tests::sensors;

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// A broker, an aggregator and certificates in one temp dir; edges are
/// started on it with [`Site::start_edge`].
pub(crate) struct Site {
    pub dir: tempfile::TempDir,
    pub certs: PathBuf,
    pub mosquitto: Mosquitto,
    pub cloud: Cloud,
}

impl Site {
    pub(crate) fn start(node: &str, mosquitto: MosquittoConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        crate::write_certs(&certs, &[node]);
        let mosquitto = Mosquitto::start_with(mosquitto).unwrap();
        let cloud = Cloud::start(dir.path(), &certs).unwrap();
        Self {
            dir,
            certs,
            mosquitto,
            cloud,
        }
    }

    /// The edge config after `[node]`/`[metrics]`: `[mqtt]` on this site's
    /// broker (`mqtt_extra` appended to that table), `pipelines`, a short
    /// tick, and the uplink to this site's aggregator.
    pub(crate) fn edge_body(&self, node: &str, pipelines: &str, mqtt_extra: &str) -> String {
        format!(
            "[mqtt]\nbroker = \"{}\"\n{mqtt_extra}\n{pipelines}\n[outbox]\ntick_interval = \"200ms\"\n{}",
            self.mosquitto.addr(),
            uplink_toml(node, &self.certs, self.cloud.quic_port)
        )
    }

    pub(crate) fn start_edge(
        &self,
        node: &str,
        pipelines: &str,
        mqtt_extra: &str,
        env: &[(&str, &str)],
    ) -> Edge {
        Edge::start_with_env(
            self.dir.path(),
            node,
            &self.edge_body(node, pipelines, mqtt_extra),
            env,
        )
        .unwrap()
    }

    /// Waits until the edge is connected to the broker and mosquitto's log
    /// (needs `debug_log`) shows `subacks` SUBACKs sent to it in the
    /// current broker run: its subscriptions are in place.
    pub(crate) fn wait_subscribed(&self, edge: &Edge, node: &str, subacks: usize) {
        edge.wait_for(Duration::from_secs(60), "connect to the broker", |s| {
            s["broker_connected"].as_bool() == Some(true)
        })
        .unwrap();
        let needle = format!("Sending SUBACK to {}", client_id(node));
        let ok = process::wait_until(Duration::from_secs(30), || {
            self.mosquitto.log().matches(&needle).count() >= subacks
        });
        assert!(ok, "no SUBACK #{subacks} to the edge\n{}", self.logs(edge));
    }

    /// Tails of every log, for assertion messages.
    pub(crate) fn logs(&self, edge: &Edge) -> String {
        format!(
            "--- edge log ---\n{}\n--- cloud log ---\n{}\n--- mosquitto log ---\n{}",
            tail(&edge.daemon.log_text(), 60),
            tail(&self.cloud.daemon.log_text(), 30),
            tail(&self.mosquitto.log(), 20)
        )
    }
}

/// The edge's MQTT client id at the broker (the default, `fogline-<node>`).
pub(crate) fn client_id(node: &str) -> String {
    format!("fogline-{node}")
}

/// `[[pipelines]]` tables passing messages unchanged (`functions = []`).
pub(crate) fn passthrough(pipelines: &[(&str, &[&str])]) -> String {
    let mut out = String::new();
    for (name, topics) in pipelines {
        let topics: Vec<String> = topics.iter().map(|t| format!("\"{t}\"")).collect();
        out += &format!(
            "[[pipelines]]\nname = \"{name}\"\ntopics = [{}]\nfunctions = []\n",
            topics.join(", ")
        );
    }
    out
}

/// Readings `n` of sensors `s` (each with a unique id), in publish order:
/// by `n`, then by sensor.
pub(crate) fn readings(
    sensors: std::ops::Range<usize>,
    ns: std::ops::Range<usize>,
) -> Vec<(String, Bytes)> {
    let mut out = Vec::new();
    for n in ns {
        for s in sensors.clone() {
            let payload = sensors::payload(s, n, 1_764_000_000_000 + n as u64);
            out.push((sensors::topic(s), Bytes::from(payload)));
        }
    }
    out
}

/// The reading ids among `msgs`.
pub(crate) fn ids_of(msgs: &[(String, Bytes)]) -> BTreeSet<String> {
    msgs.iter()
        .filter_map(|(_, p)| {
            let v: serde_json::Value = serde_json::from_slice(p).ok()?;
            Some(v.get("id")?.as_str()?.to_string())
        })
        .collect()
}

/// A publisher on `port` with a fresh client id.
pub(crate) fn publisher(port: u16, qos: QoS) -> Publisher {
    let options = Options::new(
        format!("127.0.0.1:{port}"),
        format!("test-pub-{:08x}", rand::random::<u32>()),
    );
    let mut p = Publisher::new(options, qos);
    p.deadline = Duration::from_secs(60);
    p
}

/// Publishes `msgs` in order on one connection and waits until the broker
/// acknowledged every one.
pub(crate) fn publish(port: u16, qos: QoS, msgs: &[(String, Bytes)]) -> PublishReport {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(publisher(port, qos).run(msgs)).unwrap();
    report.ensure_all_safe().unwrap();
    report
}

/// Every record in the store (none if it cannot be read yet).
pub(crate) fn stored(store: &Path) -> Vec<Stored> {
    oracle::read_store(store).unwrap_or_default()
}

/// How many records carry each reading id.
pub(crate) fn id_counts(records: &[Stored]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in records {
        if let Some(id) = r.payload.get("id").and_then(|v| v.as_str()) {
            *counts.entry(id.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// Waits until the store holds at least `n` records (or `timeout`), then a
/// little longer so late duplicates would show; returns what it holds.
pub(crate) fn settle_count(store: &Path, n: usize, timeout: Duration) -> Vec<Stored> {
    process::wait_until(timeout, || oracle::count(store) as usize >= n);
    std::thread::sleep(Duration::from_millis(800));
    stored(store)
}

/// Waits until the readings in the store include `expected`, then judges
/// them: every expected id exactly once, nothing else, streams in order.
pub(crate) fn assert_exact(
    store: &Path,
    expected: &BTreeSet<String>,
    timeout: Duration,
    logs: impl Fn() -> String,
) {
    process::wait_until(timeout, || {
        let counts = id_counts(&stored(store));
        expected.iter().all(|id| counts.contains_key(id))
    });
    std::thread::sleep(Duration::from_millis(800));
    let verdict = oracle::judge(&stored(store), expected);
    assert!(
        verdict.is_exact(),
        "{} (duplicated: {:?}; unexpected: {:?}; out of order: {:?})\n{}",
        verdict.summary(),
        &verdict.duplicated[..verdict.duplicated.len().min(5)],
        &verdict.unexpected[..verdict.unexpected.len().min(5)],
        verdict.out_of_order,
        logs()
    );
}

/// SIGTERM and wait for the exit (SIGKILL if it does not come).
pub(crate) fn stop(daemon: &mut process::Daemon) {
    daemon.terminate().unwrap();
    if daemon.wait_exit(Duration::from_secs(20)).is_none() {
        daemon.kill9();
        panic!("{} did not stop on SIGTERM within 20 s", daemon.name);
    }
}

/// The edge's `/status`, waiting for it to answer.
pub(crate) fn status(edge: &Edge) -> serde_json::Value {
    let mut out = None;
    process::wait_until(Duration::from_secs(30), || {
        out = edge.status();
        out.is_some()
    });
    out.unwrap_or_else(|| panic!("edge /status does not answer:\n{}", edge.daemon.log_text()))
}

/// Alarm kinds the edge's `/status` lists.
pub(crate) fn alarm_kinds(status: &serde_json::Value) -> Vec<String> {
    status["outbox"]["alarms"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["kind"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A fault point that holds every batch's acknowledgements back after its
/// durable commit, so a crash or a broker restart lands, for sure, on
/// messages committed but not acknowledged (needs `fogline-edge` built with
/// the `failpoints` feature, as `cargo build --workspace --bins` does).
fn hold_acks(ms: u32) -> String {
    format!("pipeline::after_commit_before_ack=sleep({ms})")
}

/// Filters the edge asked mosquitto for, per SUBSCRIBE, from its debug log
/// (`Received SUBSCRIBE from <id>` then one `\t<filter> (QoS n)` line each).
fn subscribe_requests(log: &str, client: &str) -> Vec<Vec<String>> {
    let head = format!("Received SUBSCRIBE from {client}");
    let mut out = Vec::new();
    let mut lines = log.lines().peekable();
    while let Some(line) = lines.next() {
        if !line.ends_with(&head) {
            continue;
        }
        let mut filters = Vec::new();
        while let Some(next) = lines.peek() {
            match next.split_once(": \t") {
                Some((_, f)) => filters.push(f.to_string()),
                None if next.contains(&format!("{client} ")) && !next.contains("SUBACK") => {}
                None => break,
            }
            lines.next();
        }
        out.push(filters);
    }
    out
}

/// Filters the edge unsubscribed, from mosquitto's debug log.
fn unsubscribe_requests(log: &str, client: &str) -> Vec<String> {
    let head = format!("Received UNSUBSCRIBE from {client}");
    let mut out = Vec::new();
    let mut lines = log.lines().peekable();
    while let Some(line) = lines.next() {
        if !line.ends_with(&head) {
            continue;
        }
        while let Some((_, f)) = lines.peek().and_then(|l| l.split_once(": \t")) {
            out.push(f.to_string());
            lines.next();
        }
    }
    out
}

pub(crate) fn debug_broker() -> MosquittoConfig {
    MosquittoConfig {
        debug_log: true,
        ..MosquittoConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Delivery guarantee (exactly once per pipeline) with the broker client's
/// non-overlapping cover (`ingest/topic.rs::cover`): pipelines on
/// `sensors/#` and `sensors/+/reading` make the edge subscribe to
/// `sensors/#` only, so the broker delivers each message once, and ingest
/// routes it to both pipelines: every reading is stored exactly twice.
#[test]
fn overlapping_filters_are_subscribed_once_and_each_pipeline_gets_every_message_once() {
    let node = "gw-ext-overlap";
    let site = Site::start(node, debug_broker());
    let pipelines = passthrough(&[
        ("everything", &["sensors/#"]),
        ("readings", &["sensors/+/reading"]),
    ]);
    let edge = site.start_edge(node, &pipelines, "", &[]);
    site.wait_subscribed(&edge, node, 1);

    let msgs = readings(0..4, 0..250);
    publish(site.mosquitto.port(), QoS::AtLeastOnce, &msgs);
    let records = settle_count(&site.cloud.store, 2 * msgs.len(), Duration::from_secs(60));

    let counts = id_counts(&records);
    let wrong: Vec<_> = ids_of(&msgs)
        .into_iter()
        .map(|id| (counts.get(&id).copied().unwrap_or(0), id))
        .filter(|(n, _)| *n != 2)
        .take(5)
        .collect();
    assert!(
        wrong.is_empty() && records.len() == 2 * msgs.len(),
        "every reading once per pipeline: {} records for {} readings; first wrong (count, id): {wrong:?}\n{}",
        records.len(),
        msgs.len(),
        site.logs(&edge)
    );
    let received = edge.metric(ingest::RECEIVED_TOTAL);
    assert_eq!(
        received,
        msgs.len() as f64,
        "the broker delivered each message once\n{}",
        site.logs(&edge)
    );
    let subscribes = subscribe_requests(&site.mosquitto.log(), &client_id(node));
    assert_eq!(
        subscribes,
        vec![vec!["sensors/# (QoS 2)".to_string()]],
        "the edge subscribes to the cover only\n{}",
        site.logs(&edge)
    );
}

/// Subscriptions follow the config across restarts, with the persistent
/// session (same client id) kept at the broker (I-4 and the broker client's
/// contract): after `a/#` is replaced by `b/#`, the edge unsubscribes `a/#`,
/// so a later `a/2` is not even delivered (no unrouted message), `b/1` is.
#[test]
fn a_changed_topic_filter_takes_effect_on_restart_and_the_removed_one_is_unsubscribed() {
    let node = "gw-ext-refilter";
    let site = Site::start(node, debug_broker());
    let mut edge = site.start_edge(node, &passthrough(&[("p", &["a/#"])]), "", &[]);
    site.wait_subscribed(&edge, node, 1);
    let msg = |topic: &str, id: &str| {
        (
            topic.to_string(),
            Bytes::from(format!("{{\"id\":\"{id}\"}}")),
        )
    };
    let port = site.mosquitto.port();

    publish(port, QoS::AtLeastOnce, &[msg("a/1", "a-1")]);
    let ok = process::wait_until(Duration::from_secs(30), || {
        id_counts(&stored(&site.cloud.store)).contains_key("a-1")
    });
    assert!(ok, "a/1 arrives\n{}", site.logs(&edge));

    stop(&mut edge.daemon);
    let config = std::fs::read_to_string(&edge.config).unwrap();
    assert!(config.contains("topics = [\"a/#\"]"));
    std::fs::write(
        &edge.config,
        config.replace("topics = [\"a/#\"]", "topics = [\"b/#\"]"),
    )
    .unwrap();
    edge.daemon.restart().unwrap();
    site.wait_subscribed(&edge, node, 2);

    publish(
        port,
        QoS::AtLeastOnce,
        &[msg("a/2", "a-2"), msg("b/1", "b-1")],
    );
    let ok = process::wait_until(Duration::from_secs(30), || {
        id_counts(&stored(&site.cloud.store)).contains_key("b-1")
    });
    assert!(ok, "b/1 arrives\n{}", site.logs(&edge));
    // a/2 was published before b/1 on the same connection: had the broker
    // delivered it, the edge would have taken it before b/1.
    std::thread::sleep(Duration::from_millis(500));
    let counts = id_counts(&stored(&site.cloud.store));
    let want: BTreeMap<String, usize> = [("a-1".to_string(), 1), ("b-1".to_string(), 1)].into();
    assert_eq!(counts, want, "{}", site.logs(&edge));
    assert_eq!(
        edge.metric(pipeline::UNROUTED_TOTAL),
        0.0,
        "a/2 was delivered to the edge: a/# is still subscribed\n{}",
        site.logs(&edge)
    );
    let log = site.mosquitto.log();
    let client = client_id(node);
    assert_eq!(
        unsubscribe_requests(&log, &client),
        vec!["a/#".to_string()],
        "the edge unsubscribed a/#\n{}",
        site.logs(&edge)
    );
    assert_eq!(
        subscribe_requests(&log, &client).last(),
        Some(&vec!["b/# (QoS 2)".to_string()]),
        "{}",
        site.logs(&edge)
    );
}

/// Unique readings interleaved with identical payloads (`1` on `counter/x`).
fn counter_mix(
    sensors: std::ops::Range<usize>,
    ns: std::ops::Range<usize>,
) -> Vec<(String, Bytes)> {
    readings(sensors, ns)
        .into_iter()
        .flat_map(|r| [r, ("counter/x".to_string(), Bytes::from_static(b"1"))])
        .collect()
}

fn counter_records(records: &[Stored]) -> usize {
    records.iter().filter(|r| r.stream == "counter/x").count()
}

const COUNTER_PIPELINES: &[(&str, &[&str])] = &[
    ("readings", &["sensors/+/reading"]),
    ("counters", &["counter/#"]),
];

/// Checks a run of [`counter_mix`] messages: every unique reading once, and
/// as many `1` records as `1`s were published.
fn assert_counter_mix(site: &Site, edge: &Edge, msgs: &[(String, Bytes)]) {
    let ones = msgs.iter().filter(|(t, _)| t == "counter/x").count();
    let readings: BTreeSet<String> = ids_of(msgs);
    let records = settle_count(
        &site.cloud.store,
        readings.len() + ones,
        Duration::from_secs(90),
    );
    let sensor_records: Vec<Stored> = records
        .iter()
        .filter(|r| r.stream.starts_with("sensors/"))
        .cloned()
        .collect();
    let verdict = oracle::judge(&sensor_records, &readings);
    assert!(
        verdict.is_exact(),
        "unique readings: {} (duplicated: {:?})\n{}",
        verdict.summary(),
        &verdict.duplicated[..verdict.duplicated.len().min(5)],
        site.logs(edge)
    );
    assert_eq!(
        counter_records(&records),
        ones,
        "identical `1` payloads: stored vs published (nothing lost, nothing twice)\n{}",
        site.logs(edge)
    );
}

/// The edge's `[mqtt]` for the QoS 1 tests: a receive maximum of 1000, so
/// marks are kept for 2000 packet ids and mosquitto is proven sequential
/// (I-5) after 2000 consecutive ones.
const Q1_MQTT: &str = "receive_maximum = 1000";

/// Starts an edge for the QoS 1 redelivery tests and has mosquitto prove
/// itself sequential to it (I-5): 2400 messages with consecutive packet
/// ids, more than the 2000 marks kept. Then restarts it holding every
/// batch's PUBACKs for a second after its commit, so the fault that follows
/// lands, for sure, on messages committed but not acknowledged. Returns the
/// edge and what was published.
fn q1_edge_proven_sequential(site: &Site, node: &str) -> (Edge, Vec<(String, Bytes)>) {
    let mut edge = site.start_edge(node, &passthrough(COUNTER_PIPELINES), Q1_MQTT, &[]);
    site.wait_subscribed(&edge, node, 1);
    let warmup = counter_mix(0..2, 0..600);
    publish(site.mosquitto.port(), QoS::AtLeastOnce, &warmup);
    let n = warmup.len() as u64;
    edge.wait_for(Duration::from_secs(60), "commit the warm-up", |s| {
        s["outbox"]["next_seq"].as_u64() == Some(n + 1)
    })
    .unwrap();
    stop(&mut edge.daemon);
    edge.daemon
        .restart_with_env(&[("FAILPOINTS", &hold_acks(1000))])
        .unwrap();
    site.wait_subscribed(&edge, node, 2);
    (edge, warmup)
}

/// Publishes the messages that will be in flight at the fault (no more than
/// the receive maximum: mosquitto holds them all in flight, none queued, so
/// its saved state is exact about them) and waits until the edge committed
/// a batch of them (whose PUBACKs are now held back).
fn q1_in_flight(site: &Site, edge: &Edge, published: &mut Vec<(String, Bytes)>) {
    let before = published.len() as u64;
    let batch = counter_mix(0..2, 600..850);
    publish(site.mosquitto.port(), QoS::AtLeastOnce, &batch);
    published.extend(batch);
    edge.wait_for(Duration::from_secs(30), "commit a batch", |s| {
        s["outbox"]["next_seq"].as_u64().unwrap_or(0) > before + 1
    })
    .unwrap();
}

/// After the fault: more messages (new packet ids, DUP=0), then the oracle,
/// and proof that resends of committed messages were recognised.
fn q1_finish(site: &Site, edge: &Edge, mut published: Vec<(String, Bytes)>) {
    let after = counter_mix(0..2, 850..1000);
    publish(site.mosquitto.port(), QoS::AtLeastOnce, &after);
    published.extend(after);
    assert_counter_mix(site, edge, &published);
    assert!(
        edge.metric(ingest::RESENDS_TOTAL) > 0.0,
        "the edge recognised resends of messages it had committed (is fogline-edge built with failpoints?)\n{}",
        site.logs(edge)
    );
    assert_eq!(
        edge.metric(ingest::POSSIBLE_DUPLICATES_TOTAL),
        0.0,
        "mosquitto is proven sequential: no resend is a guess\n{}",
        site.logs(edge)
    );
}

/// I-5 (and I-1, I-2, I-4) with a broker-side disconnect: mosquitto, with
/// persistence, is restarted (its state saved first) while messages are in
/// flight to the edge — some committed but not yet acknowledged — and
/// resends them with DUP=1 and their packet ids. Mosquitto numbers packet
/// ids sequentially and has proven it, so the edge recognises every resend,
/// including those of identical `1` payloads: unique readings exactly once,
/// as many `1` records as were published.
#[test]
fn qos1_resends_after_a_broker_restart_are_recognised_even_for_identical_payloads() {
    let node = "gw-ext-q1-broker";
    let mut site = Site::start(
        node,
        MosquittoConfig {
            persistence: true,
            debug_log: true,
            ..MosquittoConfig::default()
        },
    );
    let (edge, mut published) = q1_edge_proven_sequential(&site, node);
    q1_in_flight(&site, &edge, &mut published);
    site.mosquitto.save_db().unwrap();
    site.mosquitto.restart().unwrap();
    edge.wait_for(Duration::from_secs(30), "reconnect to the broker", |s| {
        s["broker_connected"].as_bool() == Some(true)
    })
    .unwrap();
    q1_finish(&site, &edge, published);
}

/// I-1 and I-5 across an edge kill -9: the edge is killed while a committed
/// batch's PUBACKs are held back, and restarted without the fault point;
/// mosquitto resends everything unacknowledged with DUP=1, and the restored
/// marks (and the restored proof that mosquitto is sequential) recognise
/// what was committed. Unique readings exactly once, as many identical `1`
/// records as were published.
#[test]
fn qos1_resends_after_an_edge_kill9_are_recognised_even_for_identical_payloads() {
    let node = "gw-ext-q1-kill";
    let site = Site::start(node, debug_broker());
    let (mut edge, mut published) = q1_edge_proven_sequential(&site, node);
    q1_in_flight(&site, &edge, &mut published);
    edge.daemon.kill9();
    edge.daemon.restart_with_env(&[]).unwrap();
    site.wait_subscribed(&edge, node, 3);
    q1_finish(&site, &edge, published);
}

/// I-3 end to end: a QoS 2 publisher through mosquitto (paced, in slices),
/// the edge subscribed at QoS 2, killed with SIGKILL at ~30% and ~60% of the
/// stream — each batch's PUBREC/PUBCOMP held 200 ms after its commit, so
/// every kill lands on exchanges in progress — and restarted: every reading
/// exactly once.
#[test]
fn qos2_end_to_end_is_exact_across_edge_kill9s() {
    let node = "gw-ext-q2";
    let site = Site::start(node, debug_broker());
    let mut edge = site.start_edge(
        node,
        &passthrough(&[("readings", &["sensors/+/reading"])]),
        "qos = 2",
        &[("FAILPOINTS", &hold_acks(200))],
    );
    site.wait_subscribed(&edge, node, 1);
    let msgs = readings(0..3, 0..1000);
    let expected = ids_of(&msgs);
    let total = msgs.len() as u64;

    let port = site.mosquitto.port();
    let published = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = published.clone();
    let publishing = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for slice in msgs.chunks(300) {
            let mut p = publisher(port, QoS::ExactlyOnce);
            p.window = 100;
            rt.block_on(p.run(slice))
                .unwrap()
                .ensure_all_safe()
                .unwrap();
            counter.fetch_add(slice.len(), Ordering::AcqRel);
            std::thread::sleep(Duration::from_millis(250));
        }
    });

    let mut kills = Vec::new();
    for (i, frac) in [0.3, 0.6].into_iter().enumerate() {
        let target = (frac * total as f64) as u64;
        edge.wait_for(Duration::from_secs(60), "reach the kill point", |s| {
            s["outbox"]["next_seq"].as_u64().unwrap_or(0) > target
        })
        .unwrap();
        edge.daemon.kill9();
        let outbox = rusqlite::Connection::open(edge.data_dir.join("outbox.db")).unwrap();
        let next_seq: i64 = outbox
            .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get(0)
            })
            .unwrap();
        drop(outbox);
        kills.push(next_seq as u64 - 1);
        std::thread::sleep(Duration::from_millis(200));
        edge.daemon.restart().unwrap();
        site.wait_subscribed(&edge, node, i + 2);
    }
    publishing.join().unwrap();
    assert_eq!(published.load(Ordering::Acquire) as u64, total);
    // Both kills landed mid-stream, at different points.
    assert!(
        kills[0] < kills[1] && kills[1] < total,
        "records committed at the kills: {kills:?} of {total}"
    );
    assert_exact(
        &site.cloud.store,
        &expected,
        Duration::from_secs(90),
        || site.logs(&edge),
    );
}

/// Where mosquitto's dynamic-security plugin lives (Debian/Ubuntu paths).
fn dynsec_plugin() -> &'static str {
    [
        "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/mosquitto_dynamic_security.so",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("mosquitto's dynamic security plugin is not installed")
}

/// The broker client's contract (a refused filter is an error naming it and
/// its reason code, shown by `status`) and per-filter isolation: mosquitto's
/// dynamic-security plugin lets anonymous clients subscribe to `ok/#` only,
/// so the SUBACK refuses `no/#` (MQTT 5: 0x87 not authorized); the edge logs
/// the filter and the code, `/status` lists it, and `ok/#` still delivers.
///
/// (A plain `acl_file` cannot do this: mosquitto 2.0 grants every
/// SUBSCRIBE and filters deliveries by the ACL instead.)
#[test]
fn a_refused_subscription_is_an_error_naming_the_filter_and_code_and_the_other_filter_delivers() {
    use std::os::unix::fs::PermissionsExt;
    let node = "gw-ext-refused";
    let sec_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(sec_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let dynsec = sec_dir.path().join("dynsec.json");
    std::fs::write(
        &dynsec,
        r#"{
  "defaultACLAccess": {"publishClientSend": true, "publishClientReceive": true, "subscribe": false, "unsubscribe": true},
  "clients": [],
  "groups": [{"groupname": "anonymous", "roles": [{"rolename": "ok-only", "priority": 0}], "clients": []}],
  "roles": [{"rolename": "ok-only", "acls": [{"acltype": "subscribePattern", "topic": "ok/#", "priority": 0, "allow": true}]}],
  "anonymousGroup": "anonymous"
}"#,
    )
    .unwrap();
    std::fs::set_permissions(&dynsec, std::fs::Permissions::from_mode(0o666)).unwrap();
    let site = Site::start(
        node,
        MosquittoConfig {
            debug_log: true,
            allow_anonymous: true,
            extra: vec![
                format!("plugin {}", dynsec_plugin()),
                format!("plugin_opt_config_file {}", dynsec.display()),
            ],
            ..MosquittoConfig::default()
        },
    );
    let edge = site.start_edge(
        node,
        &passthrough(&[("ok", &["ok/#"]), ("no", &["no/#"])]),
        "",
        &[],
    );
    site.wait_subscribed(&edge, node, 1);

    let listed = process::wait_until(Duration::from_secs(10), || {
        edge.status().is_some_and(|s| {
            s["ingest"]["refused_subscriptions"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        })
    });
    let st = status(&edge);
    let refused: Vec<String> = st["ingest"]["refused_subscriptions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        listed && refused.len() == 1 && refused[0].starts_with("no/# (0x87"),
        "status lists the refused filter with its code: {refused:?}\n{}",
        site.logs(&edge)
    );
    let log = edge.daemon.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("refused a subscription"))
        .unwrap_or_else(|| panic!("no error log for the refused filter\n{}", site.logs(&edge)));
    assert!(
        line.contains("ERROR") && line.contains("no/#") && line.contains("0x87"),
        "the error names the filter and the reason code: {line}"
    );

    let ok_msgs: Vec<(String, Bytes)> = (0..20)
        .map(|i| {
            (
                format!("ok/{i}"),
                Bytes::from(format!("{{\"id\":\"ok-{i}\"}}")),
            )
        })
        .collect();
    let no_msgs: Vec<(String, Bytes)> = (0..5)
        .map(|i| {
            (
                format!("no/{i}"),
                Bytes::from(format!("{{\"id\":\"no-{i}\"}}")),
            )
        })
        .collect();
    let port = site.mosquitto.port();
    publish(port, QoS::AtLeastOnce, &no_msgs);
    publish(port, QoS::AtLeastOnce, &ok_msgs);
    assert_exact(
        &site.cloud.store,
        &ids_of(&ok_msgs),
        Duration::from_secs(30),
        || site.logs(&edge),
    );
}

/// I-6: a message whose topic is longer than the replication protocol's
/// 1024-byte stream-name limit, arriving through the broker, goes to the
/// dead-letter table (and is acknowledged), never into the outbox; the
/// readings before and after it replicate.
#[test]
fn a_topic_longer_than_a_stream_name_is_dead_lettered_and_replication_goes_on() {
    let node = "gw-ext-longtopic";
    let site = Site::start(node, debug_broker());
    let edge = site.start_edge(
        node,
        &passthrough(&[("readings", &["sensors/+/reading"])]),
        "",
        &[],
    );
    site.wait_subscribed(&edge, node, 1);

    let long_topic = format!("sensors/{}/reading", "x".repeat(1100));
    let long_payload: &'static [u8] = br#"{"id":"long-topic","n":0}"#;
    let mut msgs = readings(0..1, 0..50);
    msgs.push((long_topic.clone(), Bytes::from_static(long_payload)));
    msgs.extend(readings(0..1, 50..100));
    let expected: BTreeSet<String> = ids_of(&msgs)
        .into_iter()
        .filter(|id| id != "long-topic")
        .collect();
    assert_eq!(expected.len(), 100);
    publish(site.mosquitto.port(), QoS::AtLeastOnce, &msgs);

    assert_exact(
        &site.cloud.store,
        &expected,
        Duration::from_secs(60),
        || site.logs(&edge),
    );
    let records = stored(&site.cloud.store);
    assert!(records.iter().all(|r| r.stream.len() <= 1024));
    let st = status(&edge);
    assert_eq!(st["outbox"]["dead_letters"].as_u64(), Some(1), "{st}");
    assert_eq!(st["outbox"]["backlog_records"].as_u64(), Some(0), "{st}");
    assert!(edge.metric(pipeline::REFUSED_TOTAL) >= 1.0);
    let db = edge.data_dir.join("outbox.db");
    let conn = rusqlite::Connection::open(db).unwrap();
    let (function, error, size): (String, String, i64) = conn
        .query_row(
            "SELECT function, error, payload_size FROM dead_letters",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(function, "max_topic_bytes");
    assert!(
        error.contains(&format!("topic is {} bytes", long_topic.len())) && error.contains("1024"),
        "{error}"
    );
    assert_eq!(size, long_payload.len() as i64);
}

/// Outputs of a `durable` pipeline published to the external broker
/// (`mqtt.publish`): an alert's commands reach an actuator subscribed on the
/// site's mosquitto, with the uplink down, and none is lost across a kill -9
/// of the edge and an abort between a command's commit and its publication
/// (fault point `local::after_commit_before_delivery`): what the broker had
/// not acknowledged is sent again from the outbox; QoS 1 may repeat,
/// counted. Clause I-40.
#[test]
fn i40_durable_outputs_reach_an_actuator_on_the_external_broker_across_an_edge_kill9() {
    use fogline_tests::mqtt_raw::{Connection, Incoming, Version};
    let node = "gw-publish";
    let mut site = Site::start(node, debug_broker());
    let pipelines = format!(
        "[functions.overheat]\nmodule = \"{}\"\n\
         config = {{ field = \"temp\", above = 80.0, clear_below = 75.0, command_stream = \"actuators/{{stream}}/fan\", pass_readings = false }}\n\
         [[pipelines]]\nname = \"machines\"\ntopics = [\"machines/#\"]\nfunctions = [\"overheat\"]\nlocal = \"durable\"\n",
        fogline_modules::alert().display()
    );
    let mut edge = site.start_edge(node, &pipelines, "publish = [\"actuators/#\"]", &[]);
    site.cloud.daemon.kill9();
    site.wait_subscribed(&edge, node, 1);
    let addr = site.mosquitto.addr();
    // temps[i]: odd readings cross above (an "on"), even ones fall below
    // (an "off"); each command carries its reading's distinct value.
    let temp = |i: usize| {
        if i % 2 == 1 {
            80.0 + i as f64
        } else {
            70.0 + i as f64 / 100.0
        }
    };
    const N: usize = 30;
    let rt = crate::rt();
    let (tx, rx) = std::sync::mpsc::channel::<f64>();
    let actuator = {
        let mut o = Options::new(addr.clone(), "actuator").with_version(Version::V5);
        o.clean_start = false;
        o.session_expiry_secs = Some(600);
        o
    };
    let mut act = rt.block_on(async {
        let (mut c, _) = Connection::connect(&actuator).await.unwrap();
        c.subscribe(1, &[("actuators/#", QoS::AtLeastOnce)])
            .unwrap();
        c.flush().await.unwrap();
        c
    });
    let reader = rt.spawn(async move {
        while let Ok(Some(p)) = act.next_packet_within(Duration::from_secs(40)).await {
            if let Incoming::Publish {
                payload, pkid, qos, ..
            } = p
            {
                let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                let _ = tx.send(v["value"].as_f64().unwrap());
                if qos != QoS::AtMostOnce {
                    act.puback(pkid).unwrap();
                    act.flush().await.unwrap();
                }
            }
        }
    });
    let send = |from: usize, to: usize| {
        rt.block_on(async {
            let (mut s, _) = Connection::connect(&Options::new(addr.clone(), "m1"))
                .await
                .unwrap();
            for i in from..to {
                s.publish(
                    "machines/m1",
                    format!(r#"{{"temp":{}}}"#, temp(i)).into_bytes(),
                    QoS::AtLeastOnce,
                    i as u16 + 1,
                    false,
                )
                .unwrap();
                s.flush().await.unwrap();
                loop {
                    match s.next_packet_within(Duration::from_secs(5)).await.unwrap() {
                        Some(Incoming::PubAck { .. }) => break,
                        Some(_) => {}
                        None => panic!("mosquitto did not acknowledge"),
                    }
                }
            }
        })
    };
    send(0, 10);
    std::thread::sleep(Duration::from_millis(300));
    edge.daemon.kill9();
    send(10, 20);
    edge.daemon
        .restart_with_env(&[("FAILPOINTS", "local::after_commit_before_delivery=return")])
        .unwrap();
    // The backlog's first command is committed, then the edge aborts.
    let status = edge.daemon.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| !s.success()),
        "the edge did not abort at local::after_commit_before_delivery\n{}",
        site.logs(&edge)
    );
    edge.daemon.restart_with_env(&[]).unwrap();
    site.wait_subscribed(&edge, node, 3);
    send(20, N);
    let expected: Vec<u64> = (1..N).map(|i| (temp(i) * 100.0).round() as u64).collect();
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    let mut order = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while counts.len() < expected.len() {
        let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
            break;
        };
        let Ok(v) = rx.recv_timeout(left) else { break };
        let key = (v * 100.0).round() as u64;
        if *counts.entry(key).and_modify(|c| *c += 1).or_insert(1) == 1 {
            order.push(key);
        }
    }
    let lost: Vec<&u64> = expected
        .iter()
        .filter(|k| !counts.contains_key(k))
        .collect();
    let repeated: usize = counts.values().map(|c| c - 1).sum();
    assert!(
        lost.is_empty(),
        "lost commands {lost:?} (repeated {repeated})\n{}",
        site.logs(&edge)
    );
    assert_eq!(order, expected, "first arrivals in order");
    assert!(edge.metric(local::DELIVERED_TOTAL) > 0.0);
    reader.abort();
}
