//! The bounded buffer and loss accounting end to end (I-32, I-33): with the
//! aggregator down, a pipeline's quota overflows under `drop_oldest`; every
//! drop is counted on the edge and reaches the aggregator in the ordered
//! stream, so that per stream, delivered + counted as lost = accepted,
//! exactly — nothing silent, nothing twice, also across a crash in the
//! middle of a commit that drops. A message no pipeline takes is a dead
//! letter the cloud is told about.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use bytes::Bytes;
use fogline_edge::ingest::events as ingest;
use fogline_tests::deploy::{http_get, uplink_toml, Cloud, Edge};
use fogline_tests::mqtt_raw::{Options, Publisher, QoS, Version};
use fogline_tests::process;

use crate::external::{ids_of, publish, readings, stored};
use crate::tail;

const NODE: &str = "gw-losses";

/// I-32, I-33: delivered + counted-as-lost = accepted, per stream, with the
/// sequence ranges on both sides; unrouted messages are dead letters the
/// aggregator is told about.
#[test]
fn every_drop_is_counted_and_the_cloud_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    crate::write_certs(&certs, &[NODE]);
    // The uplink is down for the whole publish: the backlog builds up.
    let mut cloud = Cloud::configure(dir.path(), &certs).unwrap();
    let port = fogline_tests::free_tcp_port().unwrap();
    let body = quota_body(port, &uplink_toml(NODE, &certs, cloud.quic_port));
    let mut edge = Edge::start(dir.path(), NODE, &body).unwrap();
    wait_listening(port, &edge, &cloud);

    // 4 sensors × 1000 readings of ~120 bytes: about 3× the lane's quota.
    let msgs = readings(0..4, 0..1000);
    let mut typos: Vec<(String, Bytes)> = (0..5)
        .map(|i| {
            (
                "sensorz/typo/reading".to_string(),
                Bytes::from(format!("{{\"n\":{i}}}")),
            )
        })
        .collect();
    let mut all = msgs.clone();
    all.append(&mut typos);
    publish(port, QoS::AtLeastOnce, &all);
    // Everything taken in, then committed (a commit takes milliseconds).
    let ok = process::wait_until(Duration::from_secs(60), || {
        edge.metric(ingest::RECEIVED_TOTAL) >= all.len() as f64
    });
    assert!(
        ok,
        "the edge did not take everything in: {} of {} received\n{}",
        edge.metric(ingest::RECEIVED_TOTAL),
        all.len(),
        logs(&edge, &cloud)
    );
    std::thread::sleep(Duration::from_secs(2));
    let local_lost = local_quota_losses(&edge);
    assert!(
        local_lost > 0,
        "the quota overflowed:\n{}",
        logs(&edge, &cloud)
    );

    // The uplink comes back: the backlog, and the loss records with it.
    cloud.daemon.restart().unwrap();
    wait_drained(&edge, &cloud);

    let nodes = cloud.nodes().expect("/api/v1/nodes");
    let node = nodes
        .as_array()
        .and_then(|n| n.iter().find(|n| n["node"] == NODE))
        .unwrap_or_else(|| panic!("{NODE} not listed: {nodes}"))
        .clone();
    let losses = node["losses"].as_array().cloned().unwrap_or_default();
    let mut lost_by_stream: BTreeMap<String, u64> = BTreeMap::new();
    for l in &losses {
        if l["reason"] == "quota" {
            *lost_by_stream
                .entry(l["stream"].as_str().unwrap_or("").to_string())
                .or_default() += l["records"].as_u64().unwrap_or(0);
            assert!(
                l["first_seq"].is_string(),
                "a sequence range (u64 as a string): {l}"
            );
        }
    }
    let records = stored(&cloud.store);
    let mut delivered_by_stream: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for r in &records {
        if let Some(id) = r.payload.get("id").and_then(|v| v.as_str()) {
            assert!(seen.insert(id.to_string()), "delivered twice: {id}");
            *delivered_by_stream.entry(r.stream.clone()).or_default() += 1;
        }
    }
    let expected = ids_of(&msgs);
    assert!(seen.is_subset(&expected), "only what was published");
    let mut published_by_stream: BTreeMap<String, u64> = BTreeMap::new();
    for (topic, _) in &msgs {
        *published_by_stream.entry(topic.clone()).or_default() += 1;
    }
    let lost_total: u64 = lost_by_stream.values().sum();
    assert!(lost_total > 0, "the cloud was told: {losses:?}");
    assert_balance(
        &published_by_stream,
        &delivered_by_stream,
        &lost_by_stream,
        local_lost,
    );
    // The newest data won: the last reading of each sensor arrived.
    for s in 0..4 {
        let last = ids_of(&readings(s..s + 1, 999..1000));
        assert!(last.is_subset(&seen), "sensor {s}'s newest reading arrived");
    }
    // The typo: kept as dead letters, and the cloud knows.
    let typo = losses
        .iter()
        .find(|l| l["stream"] == "sensorz/typo/reading" && l["reason"] == "dead_lettered")
        .unwrap_or_else(|| panic!("unrouted messages reported: {losses:?}"));
    assert_eq!(typo["records"].as_u64(), Some(5));
    let status = edge.status().unwrap();
    assert_eq!(
        status["outbox"]["dead_letters"].as_u64(),
        Some(5),
        "{status}"
    );
    // And `status` prints them, by stream and reason.
    let out = std::process::Command::new(process::binary("fogline-edge").unwrap())
        .args(["status", "--config", &edge.config.to_string_lossy()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("lost              {lost_total} records")),
        "{text}"
    );
    assert!(text.contains("dead_lettered"), "{text}");

    // The typo's pipeline is added; a replay routes the dead letters again
    // by their topic: delivered now, and the cloud is told (`replayed`).
    crate::external::stop(&mut edge.daemon);
    let config = std::fs::read_to_string(&edge.config).unwrap().replace(
        "[outbox]",
        "[[pipelines]]\nname = \"typos\"\ntopics = [\"sensorz/#\"]\nfunctions = []\n[outbox]",
    );
    std::fs::write(&edge.config, config).unwrap();
    edge.daemon.restart().unwrap();
    let out = std::process::Command::new(process::binary("fogline-edge").unwrap())
        .args([
            "dead-letters",
            "replay",
            "--config",
            &edge.config.to_string_lossy(),
            "--reason",
            "unrouted",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replayed = process::wait_until(Duration::from_secs(30), || {
        stored(&cloud.store)
            .iter()
            .filter(|r| r.stream == "sensorz/typo/reading")
            .count()
            == 5
    });
    assert!(
        replayed,
        "the replayed typos arrived:\n{}",
        logs(&edge, &cloud)
    );
    let told = process::wait_until(Duration::from_secs(30), || {
        cloud.nodes().is_some_and(|n| {
            n.as_array().into_iter().flatten().any(|n| {
                n["losses"].as_array().into_iter().flatten().any(|l| {
                    l["stream"] == "sensorz/typo/reading"
                        && l["reason"] == "replayed"
                        && l["records"].as_u64() == Some(5)
                })
            })
        })
    });
    assert!(
        told,
        "the cloud knows they were replayed:\n{}",
        logs(&edge, &cloud)
    );
}

/// I-32, I-33: a crash in the middle of a commit that drops. The quota of a
/// `drop_oldest` pipeline overflows while the aggregator is down; the edge
/// aborts (fault point `outbox::commit::dropping`) in its third commit that
/// drops, after that commit has deleted the oldest records and written
/// their loss records and its new readings, before it is durable. Restarted,
/// it takes the sensors' resends (QoS 1, persistent sessions) to the end;
/// then the aggregator comes back and everything drains. Per stream,
/// delivered + counted as lost = accepted (PUBACKed), nothing is delivered
/// twice, and no seq a loss report names was delivered.
///
/// Why this catches a commit that is not one transaction: had the drop been
/// durable without its loss records, the dropped readings would be neither
/// delivered nor counted (delivered + lost < accepted); had the loss records
/// been durable without the drop, readings reported lost would still be
/// delivered (a delivered seq inside a report's range, and more delivered
/// and lost than accepted); had the new readings been durable without the
/// session entries that recognise their resends, they would be delivered
/// twice. (Checked once by making the drop durable on its own at this
/// fault point: 50 readings of a stream were neither delivered nor counted.)
#[test]
fn a_crash_while_dropping_loses_nothing_uncounted() {
    const NODE: &str = "gw-losses-crash";
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    crate::write_certs(&certs, &[NODE]);
    let mut cloud = Cloud::configure(dir.path(), &certs).unwrap();
    let port = fogline_tests::free_tcp_port().unwrap();
    let body = quota_body(port, &uplink_toml(NODE, &certs, cloud.quic_port));
    // Two commits that drop are durable before the crash: it lands among
    // drops already made and counted.
    let mut edge = Edge::start_with_env(
        dir.path(),
        NODE,
        &body,
        &[("FAILPOINTS", "outbox::commit::dropping=2*off->return")],
    )
    .unwrap();
    wait_listening(port, &edge, &cloud);

    // 4 sensors × 1000 readings of ~120 bytes: about 3× the lane's quota.
    let msgs = readings(0..4, 0..1000);
    let mut o =
        Options::new(format!("127.0.0.1:{port}"), "crash-while-dropping").with_version(Version::V5);
    o.clean_start = false;
    o.session_expiry_secs = Some(300);
    let mut publisher = Publisher::new(o, QoS::AtLeastOnce);
    publisher.window = 200;
    publisher.deadline = Duration::from_secs(120);
    let run = {
        let msgs = msgs.clone();
        std::thread::spawn(move || crate::rt().block_on(publisher.run(&msgs)).unwrap())
    };

    // The abort, by the fault point (SIGABRT), not some other death.
    let exit = edge.daemon.wait_exit(Duration::from_secs(60));
    assert!(
        exit.is_some_and(|s| s.signal() == Some(SIGABRT)),
        "the edge did not abort in a commit that drops: {exit:?}\n{}",
        logs(&edge, &cloud)
    );
    assert!(
        edge.daemon.log_text().contains(DROPPED_LOG),
        "drops were committed before the crash:\n{}",
        logs(&edge, &cloud)
    );
    edge.daemon.restart_with_env(&[]).unwrap();
    let report = run.join().expect("publisher thread");
    report
        .ensure_all_safe()
        .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&edge, &cloud)));
    assert!(
        report.reconnects >= 1,
        "the publisher lived through the crash"
    );
    let mut accepted_by_stream: BTreeMap<String, u64> = BTreeMap::new();
    let mut accepted = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        if report.is_safe(i) {
            *accepted_by_stream.entry(m.0.clone()).or_default() += 1;
            accepted.push(m.clone());
        }
    }
    let accepted_ids = ids_of(&accepted);
    let local_lost = local_quota_losses(&edge);
    assert!(
        local_lost > 0,
        "the quota overflowed:\n{}",
        logs(&edge, &cloud)
    );

    cloud.daemon.restart().unwrap();
    wait_drained(&edge, &cloud);

    let records = stored(&cloud.store);
    let mut delivered_by_stream: BTreeMap<String, u64> = BTreeMap::new();
    let mut seqs_by_stream: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for r in records.iter().filter(|r| r.node == NODE) {
        let Some(id) = r.payload.get("id").and_then(|v| v.as_str()) else {
            continue;
        };
        assert!(seen.insert(id.to_string()), "delivered twice: {id}");
        assert!(accepted_ids.contains(id), "delivered, never accepted: {id}");
        *delivered_by_stream.entry(r.stream.clone()).or_default() += 1;
        seqs_by_stream
            .entry(r.stream.clone())
            .or_default()
            .push(r.seq);
    }
    let reports = cloud_losses(&cloud, NODE);
    let mut lost_by_stream: BTreeMap<String, u64> = BTreeMap::new();
    for l in &reports {
        assert_eq!(l["reason"], "quota", "only the quota drops here: {l}");
        let stream = l["stream"].as_str().unwrap_or("").to_string();
        *lost_by_stream.entry(stream.clone()).or_default() += l["records"].as_u64().unwrap_or(0);
        let seq = |k: &str| l[k].as_str().and_then(|s| s.parse::<u64>().ok());
        let (Some(first), Some(last)) = (seq("first_seq"), seq("last_seq")) else {
            panic!("a quota loss without its seq range: {l}");
        };
        let hit = seqs_by_stream
            .get(&stream)
            .and_then(|v| v.iter().find(|s| (first..=last).contains(*s)));
        assert!(
            hit.is_none(),
            "seq {hit:?} of {stream} was delivered and reported lost ({first}..={last})"
        );
    }
    assert_balance(
        &accepted_by_stream,
        &delivered_by_stream,
        &lost_by_stream,
        local_lost,
    );
    let lost_total: u64 = lost_by_stream.values().sum();
    assert_eq!(
        lost_by_stream.keys().collect::<Vec<_>>(),
        accepted_by_stream.keys().collect::<Vec<_>>(),
        "losses only on the sensors' streams"
    );
    eprintln!(
        "crash while dropping: {} accepted, {} delivered, {lost_total} counted as lost in {} reports; {} reconnects, {} resent",
        accepted_ids.len(),
        seen.len(),
        reports.len(),
        report.reconnects,
        report.resent_publishes
    );
}

/// What `std::process::abort` kills the process with.
const SIGABRT: i32 = 6;

/// The warning a durable commit that dropped logs.
const DROPPED_LOG: &str = "Records dropped; the loss is counted";

/// An edge whose endpoint listens on `port`, with one `drop_oldest`
/// pipeline of 160 KiB for `sensors/+/reading`, replicating per `uplink`.
fn quota_body(port: u16, uplink: &str) -> String {
    format!(
        "[broker]\nembedded = true\nlisten = \"127.0.0.1:{port}\"\n\
         \n[[pipelines]]\nname = \"telemetry\"\ntopics = [\"sensors/+/reading\"]\nfunctions = []\n\
         max_bytes = \"160 KiB\"\nwhen_full = \"drop_oldest\"\n\
         [outbox]\ntick_interval = \"200ms\"\nmax_batch_bytes = 65536\n{uplink}"
    )
}

fn logs(edge: &Edge, cloud: &Cloud) -> String {
    format!(
        "--- edge ---\n{}\n--- cloud ---\n{}",
        tail(&edge.daemon.log_text(), 80),
        tail(&cloud.daemon.log_text(), 30)
    )
}

fn wait_listening(port: u16, edge: &Edge, cloud: &Cloud) {
    let listening = process::wait_until(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(listening, "endpoint never listened:\n{}", logs(edge, cloud));
}

/// Waits until the aggregator has acknowledged the whole backlog, loss
/// records included.
fn wait_drained(edge: &Edge, cloud: &Cloud) {
    let drained = process::wait_until(Duration::from_secs(90), || {
        edge.status()
            .is_some_and(|s| s["outbox"]["backlog_records"].as_u64() == Some(0))
    });
    assert!(drained, "the backlog did not drain:\n{}", logs(edge, cloud));
}

/// Records the edge itself counts as lost to the quota (`/status`).
fn local_quota_losses(edge: &Edge) -> u64 {
    edge.status().map_or(0, |s| {
        s["outbox"]["losses"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter(|x| x["reason"] == "quota")
                    .map(|x| x["records"].as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    })
}

/// Every loss report the aggregator holds for `node`, in order
/// (`/api/v1/losses`, page by page).
fn cloud_losses(cloud: &Cloud, node: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut after = "0".to_string();
    loop {
        let path = format!("/api/v1/losses?node={node}&after_seq={after}&limit=1000");
        let Some((200, body)) = http_get(cloud.http_port, &path) else {
            panic!("{path} did not answer 200");
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let page = v["losses"].as_array().cloned().unwrap_or_default();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
        after = v["next_after_seq"].as_str().unwrap_or_default().to_string();
    }
}

/// Per stream, delivered + counted as lost = accepted, and the cloud's loss
/// total is the edge's own count (I-33).
fn assert_balance(
    accepted_by_stream: &BTreeMap<String, u64>,
    delivered_by_stream: &BTreeMap<String, u64>,
    lost_by_stream: &BTreeMap<String, u64>,
    local_lost: u64,
) {
    let lost_total: u64 = lost_by_stream.values().sum();
    assert_eq!(
        lost_total, local_lost,
        "the cloud was told, once, what the edge counted"
    );
    for (stream, accepted) in accepted_by_stream {
        let delivered = delivered_by_stream.get(stream).copied().unwrap_or(0);
        let lost = lost_by_stream.get(stream).copied().unwrap_or(0);
        assert_eq!(
            delivered + lost,
            *accepted,
            "{stream}: {delivered} delivered + {lost} counted as lost != {accepted} accepted"
        );
    }
}
