//! The aggregator over real QUIC on loopback: handshake and cursor, acks
//! after commit, replay after reconnect applied once, takeover of an open
//! connection, a foreign CA refused, and the HTTP read API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use fogline_aggregator::{self as aggregator, config::CloudConfig, RunningAggregator};
use fogline_protocol::frame::ErrorCode;
use fogline_protocol::server::HelloInfo;
use fogline_testkit::samples::sample_readings;
use fogline_transport::client::{ClientTls, UplinkClient};
use fogline_transport::TransportError;

const T: Duration = Duration::from_secs(10);

/// The Hello of an outbox with incarnation 1 that has numbered 1..=3000.
const OUTBOX: HelloInfo = HelloInfo {
    incarnation: 1,
    next_seq: 3001,
    acked: 0,
    epoch: 1,
    epoch_start: 1,
};

async fn start(dir: &Path) -> RunningAggregator {
    fogline_testkit::certs::dev_bundle(&dir.join("certs"), &["gw-1"]).unwrap();
    let toml = format!(
        "[quic]\nlisten = \"127.0.0.1:0\"\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/server.pem\"\nkey = \"{c}/server.key\"\n[store]\npath = \"{d}/cloud.db\"\n[http]\nlisten = \"127.0.0.1:0\"\n",
        c = dir.join("certs").display(),
        d = dir.display()
    );
    aggregator::start(CloudConfig::parse(&toml).unwrap())
        .await
        .unwrap()
}

fn node_tls(certs: &Path, node: &str) -> ClientTls {
    ClientTls {
        ca: certs.join("ca.pem"),
        cert: certs.join(format!("node-{node}.pem")),
        key: certs.join(format!("node-{node}.key")),
    }
}

#[tokio::test]
async fn batches_are_acked_after_commit_replays_apply_once_and_http_serves_them() {
    let dir = tempfile::tempdir().unwrap();
    let agg = start(dir.path()).await;
    let client = UplinkClient::new(&node_tls(&dir.path().join("certs"), "gw-1")).unwrap();
    let records = sample_readings(3000, 3, 7);

    let mut link = client
        .connect(agg.quic_addr, "localhost", T, OUTBOX)
        .await
        .unwrap();
    assert_eq!((link.node_id.as_str(), link.cursor), ("gw-1", 0));
    link.sender.send_batch(&records[..1000]).await.unwrap();
    link.sender.send_batch(&records[1000..2000]).await.unwrap();
    let mut acked = 0;
    while acked < records[1999].seq {
        acked = link.receiver.next_ack().await.unwrap();
    }
    assert_eq!(acked, records[1999].seq);

    // Reconnect while the old connection is still open: takeover, and the
    // new session resumes after the durable cursor.
    let mut link2 = client
        .connect(agg.quic_addr, "localhost", T, OUTBOX)
        .await
        .unwrap();
    assert_eq!(
        link2.cursor, records[1999].seq,
        "resume from the durable cursor"
    );
    let old = tokio::time::timeout(T, link.receiver.next_ack())
        .await
        .unwrap();
    assert!(
        matches!(
            old,
            Err(TransportError::Closed {
                code: ErrorCode::Superseded,
                ..
            })
        ),
        "{old:?}"
    );
    assert!(
        link2.sender.send_batch(&records[1500..]).await.is_err(),
        "the client refuses to resend below the cursor"
    );
    link2.sender.send_batch(&records[2000..]).await.unwrap();
    let up_to = link2.receiver.next_ack().await.unwrap();
    assert_eq!(up_to, records[2999].seq);

    let nodes = agg.store.clone();
    let stored = tokio::task::spawn_blocking(move || {
        use fogline_aggregator::store::{RecordQuery, Store};
        nodes
            .records(&RecordQuery {
                node: "gw-1".into(),
                stream: None,
                after_seq: 0,
                limit: 10_000,
            })
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(stored.len(), 3000, "each record exactly once");
    assert!(stored
        .iter()
        .zip(&records)
        .all(|(s, r)| s.seq == r.seq && s.payload == r.payload));

    // HTTP read path.
    let base = format!("http://{}", agg.http_addr);
    let nodes: serde_json::Value = reqwest::get(format!("{base}/api/v1/nodes"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(nodes[0]["node"], "gw-1");
    assert_eq!(nodes[0]["records"], 3000);
    let stream = records[0].stream.clone();
    let page: serde_json::Value = reqwest::get(format!(
        "{base}/api/v1/records?node=gw-1&stream={stream}&after_seq=0&limit=5"
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let rows = page["records"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    assert!(rows.iter().all(|r| r["stream"] == stream.as_str()));
    assert_eq!(page["next_after_seq"], rows[4]["seq"]);
    assert!(
        rows[0]["payload"].is_object(),
        "JSON payloads are served as JSON: {}",
        rows[0]
    );
    let bad = reqwest::get(format!("{base}/api/v1/records?limit=5"))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("node"), "{body}");
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("fogline_cloud_records_applied_total"),
        "{metrics}"
    );
    agg.shutdown().await;
}

#[tokio::test]
async fn a_node_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agg = start(dir.path()).await;
    let rogue = dir.path().join("rogue");
    fogline_testkit::certs::dev_bundle(&rogue, &["gw-1"]).unwrap();
    // Trusts the real CA for the server, presents a certificate from its own CA.
    let tls = ClientTls {
        ca: dir.path().join("certs/ca.pem"),
        cert: rogue.join("node-gw-1.pem"),
        key: rogue.join("node-gw-1.key"),
    };
    let client = UplinkClient::new(&tls).unwrap();
    let result = client.connect(agg.quic_addr, "localhost", T, OUTBOX).await;
    assert!(
        result.is_err(),
        "a foreign certificate must not get a session"
    );
    agg.shutdown().await;
}

#[tokio::test]
async fn missing_tls_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let tls = ClientTls {
        ca: dir.path().join("nope/ca.pem"),
        cert: dir.path().join("c.pem"),
        key: dir.path().join("c.key"),
    };
    let err = UplinkClient::new(&tls).err().unwrap().to_string();
    assert!(err.contains("nope/ca.pem"), "{err}");
}
