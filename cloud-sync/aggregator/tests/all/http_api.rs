//! The fleet API over HTTP, against a running aggregator: no token, no
//! data (401, and 403 for a read token on an admin action); topic-filter
//! and time-range queries; pages bounded in bytes; the newest record per
//! stream; u64s as strings; TLS on the listener.

use std::path::Path;

use fogline_aggregator::config::CloudConfig;
use fogline_aggregator::http::auth::digest;
use fogline_aggregator::service::events::LATEST_LOOKUPS_TOTAL;
use fogline_aggregator::RunningAggregator;
use fogline_protocol::session::OutboxInfo;
use fogline_protocol::Record;
use fogline_testkit::node::{node_tls, TestNode};
use fogline_transport::client::ClientTransport;
use fogline_transport::Transport;
use serde_json::Value;

pub(crate) const READ: &str = "fgl_http_api_tests_read";
pub(crate) const OUTBOX: OutboxInfo = OutboxInfo {
    incarnation: 7,
    next_seq: 1,
    acked: 0,
    epoch: 1,
    epoch_start: 1,
};

pub(crate) fn config_text(dir: &Path, http_extra: &str) -> String {
    let certs = dir.join("certs");
    if !certs.join("ca.pem").exists() {
        fogline_testkit::certs::dev_bundle(&certs, &["gw-1"]).unwrap();
    }
    format!(
        "[quic]\nlisten = \"127.0.0.1:0\"\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/server.pem\"\nkey = \"{c}/server.key\"\n\
         [store]\npath = \"{d}/cloud.db\"\n[tcp]\nenabled = false\n\
         [http]\nlisten = \"127.0.0.1:0\"\nmax_response_bytes = 2048\n{http_extra}\n\
         [[http.tokens]]\nname = \"reader\"\nscope = \"read\"\nsha256 = \"{t}\"\n",
        c = certs.display(),
        d = dir.display(),
        t = digest(READ)
    )
}

fn config(dir: &Path, http_extra: &str) -> CloudConfig {
    CloudConfig::parse(&config_text(dir, http_extra)).unwrap()
}

/// 40 records on 4 streams (`site/a/temp`, `site/a/hum`, `site/b/temp`,
/// `other/x`), event times 1000, 2000, …; payloads of about 217 bytes.
async fn fill(agg: &RunningAggregator, dir: &Path) -> Vec<Record> {
    let streams = ["site/a/temp", "site/a/hum", "site/b/temp", "other/x"];
    let records: Vec<Record> = (1..=40u64)
        .map(|seq| Record {
            seq,
            stream: streams[(seq as usize - 1) % 4].to_string(),
            timestamp_ms: seq * 1000,
            payload: format!("{{\"n\":{seq},\"pad\":\"{}\"}}", "x".repeat(200)).into_bytes(),
        })
        .collect();
    let client = ClientTransport::new(node_tls(&dir.join("certs"), "gw-1")).unwrap();
    let mut link = TestNode::connect(&client, Transport::Quic, agg.quic_addr, OUTBOX)
        .await
        .unwrap();
    link.send(&records).await.unwrap();
    assert_eq!(link.acked_through(40).await.unwrap(), 40);
    records
}

async fn get_json(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

/// `(stream, seq)` of each record of a `/api/v1/latest` answer.
fn newest(v: &Value) -> Vec<(String, u64)> {
    v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["stream"].as_str().unwrap().to_string(),
                r["seq"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// An aggregator on `dir` with `http_extra` in its `[http]`, and its base URL.
async fn start(dir: &Path, http_extra: &str) -> (RunningAggregator, String) {
    let agg = fogline_aggregator::start(config(dir, http_extra))
        .await
        .unwrap();
    let base = format!("http://{}", agg.http_addr);
    (agg, base)
}

fn seqs(page: &Value) -> Vec<u64> {
    page["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_str().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn no_token_no_data_and_queries_by_filter_time_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (agg, base) = start(dir.path(), "open = [\"/healthz\"]").await;
    fill(&agg, dir.path()).await;

    // No token, a wrong one: 401 with a reason; /healthz is open, /metrics not.
    let (code, body) = get_json(&format!("{base}/api/v1/nodes"), None).await;
    assert_eq!(code, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("bearer token"),
        "{body}"
    );
    let (code, _) = get_json(&format!("{base}/api/v1/nodes"), Some("fgl_wrong")).await;
    assert_eq!(code, 401);
    assert_eq!(get_json(&format!("{base}/healthz"), None).await.0, 200);
    assert_eq!(get_json(&format!("{base}/metrics"), None).await.0, 401);
    // A read token may not change anything.
    let r = reqwest::Client::new()
        .post(format!("{base}/api/v1/nodes"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    // u64s as strings.
    let (code, nodes) = get_json(&format!("{base}/api/v1/nodes"), Some(READ)).await;
    assert_eq!(code, 200);
    assert_eq!(nodes[0]["cursor"], "40");
    assert_eq!(nodes[0]["incarnation"], "7");

    // A topic filter with `+`, then with `#`.
    let q = |extra: &str| format!("{base}/api/v1/records?node=gw-1&limit=100{extra}");
    let (_, page) = get_json(&q("&stream=site/%2B/temp"), Some(READ)).await;
    let got = seqs(&page);
    assert_eq!(
        got,
        vec![1, 3, 5, 7, 9, 11, 13, 15, 17, 19],
        "bytes bound: 2048 B ≈ 10 records"
    );
    assert_eq!(page["more"], true);
    assert_eq!(page["next_after_seq"], "19");
    let (_, rest) = get_json(&q("&stream=site/%2B/temp&after_seq=19"), Some(READ)).await;
    assert_eq!(
        seqs(&rest),
        vec![21, 23, 25, 27, 29, 31, 33, 35, 37, 39],
        "the next page carries on after next_after_seq"
    );
    let (_, page) = get_json(&q("&stream=site/a/%23"), Some(READ)).await;
    assert!(
        seqs(&page).iter().all(|s| s % 4 == 1 || s % 4 == 2),
        "{page}"
    );
    // Event time: [10000, 14000).
    let (_, page) = get_json(&q("&from_ms=10000&to_ms=14000"), Some(READ)).await;
    assert_eq!(seqs(&page), vec![10, 11, 12, 13]);
    assert_eq!(page["more"], false);
    // Bad filters and ranges are refused with the reason.
    let (code, body) = get_json(&q("&stream=site/a%23"), Some(READ)).await;
    assert_eq!(code, 400);
    assert!(
        body["error"].as_str().unwrap().contains("topic filter"),
        "{body}"
    );
    let (code, body) = get_json(&q("&from_ms=5&to_ms=5"), Some(READ)).await;
    assert_eq!(code, 400, "{body}");

    // The newest record of each stream.
    let (_, latest) = get_json(&format!("{base}/api/v1/latest?node=gw-1"), Some(READ)).await;
    let mut found = newest(&latest);
    found.sort();
    assert_eq!(
        found,
        vec![
            ("other/x".to_string(), 40),
            ("site/a/hum".to_string(), 38),
            ("site/a/temp".to_string(), 37),
            ("site/b/temp".to_string(), 39),
        ]
    );
    let (_, latest) = get_json(
        &format!("{base}/api/v1/latest?node=gw-1&stream=site/%2B/temp"),
        Some(READ),
    )
    .await;
    assert_eq!(latest["records"].as_array().unwrap().len(), 2);
    // Which aggregator holds the node.
    let (_, leases) = get_json(&format!("{base}/api/v1/leases"), Some(READ)).await;
    assert_eq!(leases[0]["node"], "gw-1");
    assert!(leases[0]["token"].is_string());
    agg.shutdown().await;
}

#[tokio::test]
async fn the_api_is_served_over_tls_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let _ = config(dir.path(), "");
    let agg = fogline_aggregator::start(config(
        dir.path(),
        &format!(
            "tls_cert = \"{c}/server.pem\"\ntls_key = \"{c}/server.key\"",
            c = certs.display()
        ),
    ))
    .await
    .unwrap();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(certs.join("ca.pem")).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/api/v1/nodes", agg.http_addr.port());
    let r = client.get(&url).bearer_auth(READ).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Plain HTTP on the TLS port gets no answer.
    let plain = reqwest::get(format!("http://{}/healthz", agg.http_addr)).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    agg.shutdown().await;
}

/// A node's status frame (protocol 5) reaches `/api/v1/nodes` and the node
/// detail: connected, lag from its backlog, drops, versions; the detail
/// lists its streams and the records applied per minute.
#[tokio::test]
async fn a_node_status_and_its_activity_show_in_the_fleet_view() {
    use fogline_protocol::status::{DropCount, ModuleVersion, NodeStatus};
    use fogline_protocol::Frame;
    let dir = tempfile::tempdir().unwrap();
    let agg = fogline_aggregator::start(config(dir.path(), ""))
        .await
        .unwrap();
    let base = format!("http://{}", agg.http_addr);
    let records = fill(&agg, dir.path()).await;
    // A second connection (the first one's lease moves to it) says how it is.
    let client = ClientTransport::new(node_tls(&dir.path().join("certs"), "gw-1")).unwrap();
    let mut link = TestNode::connect(
        &client,
        Transport::Quic,
        agg.quic_addr,
        OutboxInfo {
            next_seq: 41,
            acked: 40,
            ..OUTBOX
        },
    )
    .await
    .unwrap();
    let now = fogline_telemetry::clock::now_ms();
    let status = NodeStatus {
        at_ms: now,
        version: "fogline-edge/9.9.9".into(),
        health: "unhealthy".into(),
        problems: vec!["outbox/quota_full: 95 % of max_bytes".into()],
        backlog_records: 1200,
        backlog_bytes: 120_000,
        oldest_ms: Some(now - 30_000),
        drops: vec![DropCount {
            reason: "quota".into(),
            records: 17,
        }],
        dead_letters: 3,
        modules: vec![ModuleVersion {
            name: "telemetry/window-avg".into(),
            version: "1.2.0".into(),
        }],
        cert_not_after_ms: Some(now + 86_400_000),
        ..NodeStatus::default()
    };
    link.conn.writer.send(&Frame::Status(status)).await.unwrap();
    let mut node = Value::Null;
    for _ in 0..50 {
        let (_, nodes) = get_json(&format!("{base}/api/v1/nodes"), Some(READ)).await;
        node = nodes[0].clone();
        if node["status"]["version"] == "fogline-edge/9.9.9" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(node["status"]["version"], "fogline-edge/9.9.9", "{node}");
    assert_eq!(node["status"]["drops"][0]["records"], 17);
    assert_eq!(node["connected"], true);
    assert!(node["aggregator"].is_string(), "{node}");
    let lag = node["lag_ms"].as_u64().unwrap();
    assert!((30_000..60_000).contains(&lag), "lag {lag}");
    assert!(node["last_seen_ms"].as_u64().unwrap() >= now - 1000);

    let (code, detail) = get_json(&format!("{base}/api/v1/nodes/gw-1"), Some(READ)).await;
    assert_eq!(code, 200, "{detail}");
    let streams: Vec<&str> = detail["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream"].as_str().unwrap())
        .collect();
    assert_eq!(
        streams,
        vec!["other/x", "site/a/hum", "site/a/temp", "site/b/temp"]
    );
    assert_eq!(detail["streams"][0]["records"], 10);
    let throughput = detail["throughput"].as_array().unwrap();
    assert_eq!(throughput.len(), 60);
    let applied: u64 = throughput
        .iter()
        .map(|m| m["records"].as_u64().unwrap())
        .sum();
    assert_eq!(
        applied,
        records.len() as u64,
        "this aggregator applied them all"
    );
    let (code, _) = get_json(&format!("{base}/api/v1/nodes/nobody"), Some(READ)).await;
    assert_eq!(code, 404);
    // Gone: not connected (its lease released, no fresh status elsewhere).
    drop(link);
    let mut connected = true;
    for _ in 0..50 {
        let (_, nodes) = get_json(&format!("{base}/api/v1/nodes"), Some(READ)).await;
        connected = nodes[0]["connected"] == true;
        if !connected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!connected, "a closed node shows disconnected");
    agg.shutdown().await;
}

/// The sum of the aggregator's `/metrics` series named `name` whose labels
/// contain `labels`.
async fn metric(base: &str, name: &str, labels: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// I-38: while a node's session holds its lease here, `/api/v1/latest`
/// answers from the cache kept in the apply path; once another aggregator
/// takes the lease and applies newer records, the answer comes from the
/// store — never stale.
#[tokio::test]
async fn latest_values_come_from_the_cache_while_held_and_never_stale_after_a_takeover() {
    use fogline_aggregator::store::{ApplyBatches, SqliteStore, Store};
    let dir = tempfile::tempdir().unwrap();
    let (agg, base) = start(dir.path(), "open = [\"/metrics\"]").await;
    let rec = |seq: u64| Record {
        seq,
        stream: if seq % 2 == 1 { "t/a" } else { "t/b" }.into(),
        timestamp_ms: seq * 1000,
        payload: format!("{{\"n\":{seq}}}").into_bytes(),
    };
    let client = ClientTransport::new(node_tls(&dir.path().join("certs"), "gw-1")).unwrap();
    let mut link = TestNode::connect(&client, Transport::Quic, agg.quic_addr, OUTBOX)
        .await
        .unwrap();
    link.send(&(1..=8).map(rec).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(link.acked_through(8).await.unwrap(), 8);
    let latest_url = format!("{base}/api/v1/latest?node=gw-1");
    let (_, v) = get_json(&latest_url, Some(READ)).await;
    assert_eq!(newest(&v), vec![("t/a".into(), 7), ("t/b".into(), 8)]);
    let hits = metric(&base, LATEST_LOOKUPS_TOTAL, "hit").await;
    // Applied while held: written through, answered from memory.
    link.send(&(9..=10).map(rec).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(link.acked_through(10).await.unwrap(), 10);
    let (_, v) = get_json(&latest_url, Some(READ)).await;
    assert_eq!(newest(&v), vec![("t/a".into(), 9), ("t/b".into(), 10)]);
    let (_, v) = get_json(&format!("{latest_url}&stream=t/%2B"), Some(READ)).await;
    assert_eq!(newest(&v).len(), 2);
    let (_, v) = get_json(&format!("{latest_url}&stream=t/b"), Some(READ)).await;
    assert_eq!(newest(&v), vec![("t/b".into(), 10)]);
    assert!(
        metric(&base, LATEST_LOOKUPS_TOTAL, "hit").await >= hits + 3.0,
        "answered from the cache"
    );

    // Another aggregator on the same store takes the node over and applies
    // a newer record, while this one's session still holds its entry.
    let other: std::sync::Arc<dyn Store> =
        std::sync::Arc::new(SqliteStore::open(dir.path().join("cloud.db")).unwrap());
    let now = fogline_telemetry::clock::now_ms();
    let (lease, cursor) = other.take_lease("gw-1", "agg-other", now).await.unwrap();
    assert_eq!(cursor.seq, 10);
    let batch =
        fogline_protocol::decode_batch(&fogline_protocol::encode_batch(&[rec(11)], 3).unwrap())
            .unwrap();
    other
        .apply(ApplyBatches {
            lease,
            outbox: (OUTBOX.incarnation, OUTBOX.epoch),
            batches: vec![batch],
            through: 11,
            now_ms: now,
        })
        .await
        .unwrap();
    let stale = metric(&base, LATEST_LOOKUPS_TOTAL, "stale").await;
    let (_, v) = get_json(&latest_url, Some(READ)).await;
    assert_eq!(
        newest(&v),
        vec![("t/a".into(), 11), ("t/b".into(), 10)],
        "the store's answer, not the cache's"
    );
    assert!(metric(&base, LATEST_LOOKUPS_TOTAL, "stale").await >= stale + 1.0);
    drop(link);
    agg.shutdown().await;
}
