//! The bounded buffer and loss accounting end to end (I-32, I-33): with the
//! aggregator down, a pipeline's quota overflows under `drop_oldest`; every
//! drop is counted on the edge and reaches the aggregator in the ordered
//! stream, so that per stream, delivered + counted as lost = accepted,
//! exactly — nothing silent, nothing twice. A message no pipeline takes is
//! a dead letter the cloud is told about.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use fogline_edge::ingest::events as ingest;
use fogline_tests::deploy::{uplink_toml, Cloud, Edge};
use fogline_tests::mqtt_raw::QoS;
use fogline_tests::process;

use crate::external::{ids_of, publish, readings, stored};

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
    let body = format!(
        "[broker]\nembedded = true\nlisten = \"127.0.0.1:{port}\"\n\
         \n[[pipelines]]\nname = \"telemetry\"\ntopics = [\"sensors/+/reading\"]\nfunctions = []\n\
         max_bytes = \"160 KiB\"\nwhen_full = \"drop_oldest\"\n\
         [outbox]\ntick_interval = \"200ms\"\nmax_batch_bytes = 65536\n{uplink}",
        uplink = uplink_toml(NODE, &certs, cloud.quic_port)
    );
    let mut edge = Edge::start(dir.path(), NODE, &body).unwrap();
    let logs = |edge: &Edge, cloud: &Cloud| {
        format!(
            "--- edge ---\n{}\n--- cloud ---\n{}",
            edge.daemon.log_text(),
            cloud.daemon.log_text()
        )
    };
    let listening = process::wait_until(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(
        listening,
        "endpoint never listened:\n{}",
        logs(&edge, &cloud)
    );

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
    let local_lost: u64 = edge.status().map_or(0, |s| {
        s["outbox"]["losses"]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter(|x| x["reason"] == "quota")
                    .map(|x| x["records"].as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    });
    assert!(
        local_lost > 0,
        "the quota overflowed:\n{}",
        logs(&edge, &cloud)
    );

    // The uplink comes back: the backlog, and the loss records with it.
    cloud.daemon.restart().unwrap();
    let drained = process::wait_until(Duration::from_secs(90), || {
        edge.status()
            .is_some_and(|s| s["outbox"]["backlog_records"].as_u64() == Some(0))
    });
    assert!(
        drained,
        "the backlog did not drain:\n{}",
        logs(&edge, &cloud)
    );

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
    let mut seen = std::collections::BTreeSet::new();
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
    assert_eq!(
        lost_total, local_lost,
        "the cloud knows what the edge counted"
    );
    for (stream, published) in &published_by_stream {
        let delivered = delivered_by_stream.get(stream).copied().unwrap_or(0);
        let lost = lost_by_stream.get(stream).copied().unwrap_or(0);
        assert_eq!(
            delivered + lost,
            *published,
            "{stream}: {delivered} delivered + {lost} counted as lost != {published} accepted"
        );
    }
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
