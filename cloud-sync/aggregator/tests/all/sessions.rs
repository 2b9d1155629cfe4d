//! The aggregator over real QUIC and TLS-over-TCP on loopback: cursor and
//! acks after commit (I-10), takeover of an open connection (I-14), both
//! transports, connection migration, and the node identity lifecycle —
//! foreign CA, expired, not yet valid, tampered and revoked certificates
//! refused, a revoked node's live connection closed (I-19).

use std::path::Path;
use std::time::Duration;

use fogline_aggregator::certs::{self, Validity};
use fogline_aggregator::service::events::{self, Rejected};
use fogline_aggregator::store::RecordQuery;
use fogline_aggregator::{self as aggregator, config::CloudConfig, RunningAggregator};
use fogline_protocol::frame::ErrorCode;
use fogline_protocol::session::OutboxInfo;
use fogline_protocol::Record;
use fogline_testkit::node::{node_tls, TestNode};
use fogline_testkit::samples::sample_readings;
use fogline_transport::client::ClientTransport;
use fogline_transport::tls::ClientTls;
use fogline_transport::{Transport, TransportError};

const T: Duration = Duration::from_secs(10);

/// The Hello of an outbox with incarnation 1 that has numbered 1..=3000.
const OUTBOX: OutboxInfo = OutboxInfo {
    incarnation: 1,
    next_seq: 3001,
    acked: 0,
    epoch: 1,
    epoch_start: 1,
};

/// The read token the test aggregators accept.
const TOKEN: &str = "fgl_aggregator_tests_read_token";

/// `GET url` with the test token.
async fn get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(TOKEN)
        .send()
        .await
}

async fn start(dir: &Path, extra: &str) -> RunningAggregator {
    aggregator::start(config(dir, extra)).await.unwrap()
}

/// An aggregator's config with its files in `dir` (certificates made if
/// missing), `extra` in its `[tls]` section.
/// An aggregator on `dir`, gw-1 connected to it over QUIC (its transport
/// and link), and 3,000 readings for it to send.
async fn gw1_connected(dir: &Path) -> (RunningAggregator, ClientTransport, TestNode, Vec<Record>) {
    let agg = start(dir, "").await;
    let client = ClientTransport::new(node_tls(&dir.join("certs"), "gw-1")).unwrap();
    let link = TestNode::connect(&client, Transport::Quic, agg.quic_addr, OUTBOX)
        .await
        .unwrap();
    (agg, client, link, sample_readings(3000, 3, 9))
}

fn config(dir: &Path, extra: &str) -> CloudConfig {
    let certs = dir.join("certs");
    if !certs.join("ca.pem").exists() {
        fogline_testkit::certs::dev_bundle(&certs, &["gw-1", "gw-2"]).unwrap();
    }
    let toml = format!(
        "[quic]\nlisten = \"127.0.0.1:0\"\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/server.pem\"\nkey = \"{c}/server.key\"\n{extra}\n[store]\npath = \"{d}/cloud.db\"\n[http]\nlisten = \"127.0.0.1:0\"\n[[http.tokens]]\nname = \"tests\"\nscope = \"read\"\nsha256 = \"{t}\"\n[tcp]\nlisten = \"127.0.0.1:0\"\n",
        c = certs.display(),
        d = dir.display(),
        t = fogline_aggregator::http::auth::digest(TOKEN)
    );
    CloudConfig::parse(&toml).unwrap()
}

fn addr(agg: &RunningAggregator, how: Transport) -> std::net::SocketAddr {
    match how {
        Transport::Quic => agg.quic_addr,
        Transport::Tcp => agg.tcp_addr.unwrap(),
    }
}

async fn stored(agg: &RunningAggregator, node: &str) -> Vec<u64> {
    agg.store
        .records(&RecordQuery::node(node, 0, 10_000))
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.seq)
        .collect()
}

async fn connections(agg: &RunningAggregator) -> serde_json::Value {
    get(format!("http://{}/api/v1/connections", agg.http_addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn acks_replays_takeover_and_http(how: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let agg = start(dir.path(), "").await;
    let client = ClientTransport::new(node_tls(&dir.path().join("certs"), "gw-1")).unwrap();
    let records = sample_readings(3000, 3, 7);
    let to = addr(&agg, how);

    let mut link = TestNode::connect(&client, how, to, OUTBOX).await.unwrap();
    assert_eq!(
        (link.welcome.node_id.as_str(), link.welcome.cursor),
        ("gw-1", 0)
    );
    link.send(&records[..1000]).await.unwrap();
    link.send(&records[1000..2000]).await.unwrap();
    let acked = link.acked_through(records[1999].seq).await.unwrap();
    assert_eq!(
        acked, records[1999].seq,
        "I-10: acked through what committed"
    );
    let live = connections(&agg).await;
    assert_eq!(live[0]["node"], "gw-1");
    assert_eq!(live[0]["transport"], how.name());

    // Reconnect while the old connection is still open: takeover (I-14),
    // and the new session resumes after the durable cursor.
    let mut link2 = TestNode::connect(&client, how, to, OUTBOX).await.unwrap();
    assert_eq!(link2.welcome.cursor, records[1999].seq);
    let old = tokio::time::timeout(T, link.next_ack()).await.unwrap();
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
    // A replay of what is applied is harmless: skipped, acked again.
    link2.send(&records[1500..2500]).await.unwrap();
    assert_eq!(link2.next_ack().await.unwrap(), records[2499].seq);
    link2.send(&records[2500..]).await.unwrap();
    assert_eq!(link2.next_ack().await.unwrap(), records[2999].seq);
    assert_eq!(
        stored(&agg, "gw-1").await,
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        "each record exactly once"
    );

    // HTTP read path.
    let base = format!("http://{}", agg.http_addr);
    let nodes: serde_json::Value = get(format!("{base}/api/v1/nodes"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(nodes[0]["node"], "gw-1");
    assert_eq!(nodes[0]["records"], 3000);
    let stream = records[0].stream.clone();
    let page: serde_json::Value = get(format!(
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
    assert!(rows[0]["payload"].is_object(), "{}", rows[0]);
    let bad = get(format!("{base}/api/v1/records?limit=5")).await.unwrap();
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("node"), "{body}");
    let metrics = get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains(events::RECORDS_APPLIED_TOTAL), "{metrics}");
    agg.shutdown().await;
}

#[tokio::test]
async fn quic_batches_are_acked_after_commit_replays_apply_once_and_http_serves_them() {
    acks_replays_takeover_and_http(Transport::Quic).await;
}

#[tokio::test]
async fn tcp_carries_the_same_sessions() {
    acks_replays_takeover_and_http(Transport::Tcp).await;
}

#[tokio::test]
async fn a_migrating_node_keeps_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (agg, client, mut link, records) = gw1_connected(dir.path()).await;
    link.send(&records[..1000]).await.unwrap();
    link.acked_through(records[999].seq).await.unwrap();
    let before = connections(&agg).await[0].clone();
    let old_local = client.local_addr().unwrap();

    // The gateway's address changes (a cellular re-attach): same
    // connection, new path, no new handshake.
    let new_local = client.rebind().unwrap();
    assert_ne!(old_local.port(), new_local.port());
    link.send(&records[1000..2000]).await.unwrap();
    link.acked_through(records[1999].seq).await.unwrap();
    link.send(&records[2000..]).await.unwrap();
    link.acked_through(records[2999].seq).await.unwrap();
    let after = connections(&agg).await;
    assert_eq!(after.as_array().unwrap().len(), 1);
    assert_eq!(
        after[0]["since_ms"], before["since_ms"],
        "the same session carried on"
    );
    assert!(
        after[0]["remote"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{}", new_local.port())),
        "the aggregator follows the new address: {after} (client now {new_local})"
    );
    assert_eq!(stored(&agg, "gw-1").await.len(), 3000);
    agg.shutdown().await;
}

/// Connecting with `tls` fails on both transports.
async fn refused(agg: &RunningAggregator, tls: ClientTls, why: &str) {
    for how in [Transport::Quic, Transport::Tcp] {
        let client = ClientTransport::new(tls.clone()).unwrap();
        let result = TestNode::connect(&client, how, addr(agg, how), OUTBOX).await;
        assert!(result.is_err(), "{why} over {}: got a session", how.name());
    }
}

fn tls_with(dir: &Path, certs: &Path, node: &str) -> ClientTls {
    ClientTls {
        ca: dir.join("certs/ca.pem"),
        ..node_tls(certs, node)
    }
}

#[tokio::test]
async fn foreign_expired_not_yet_valid_and_tampered_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agg = start(dir.path(), "").await;
    let certs_dir = dir.path().join("certs");

    // Another CA's certificate for the same node id.
    let rogue = dir.path().join("rogue");
    fogline_testkit::certs::dev_bundle(&rogue, &["gw-1"]).unwrap();
    refused(&agg, tls_with(dir.path(), &rogue, "gw-1"), "foreign CA").await;

    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let odd = dir.path().join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(certs_dir.join(f), odd.join(f)).unwrap();
    }
    certs::issue_node(
        &odd,
        "expired",
        Validity::between(now - day * 30, now - day).unwrap(),
        true,
    )
    .unwrap();
    refused(&agg, tls_with(dir.path(), &odd, "expired"), "expired").await;
    certs::issue_node(
        &odd,
        "early",
        Validity::between(now + day, now + day * 30).unwrap(),
        true,
    )
    .unwrap();
    refused(&agg, tls_with(dir.path(), &odd, "early"), "not yet valid").await;

    // gw-2's certificate with its name edited to gw-1: the signature no
    // longer matches.
    let text = std::fs::read_to_string(certs_dir.join("node-gw-2.pem")).unwrap();
    let mut bytes = pem::parse(text).unwrap().into_contents();
    let mut edits = 0;
    for i in 0..bytes.len() - 4 {
        if &bytes[i..i + 4] == b"gw-2" {
            bytes[i + 3] = b'1';
            edits += 1;
        }
    }
    assert!(edits >= 1);
    std::fs::write(
        odd.join("node-gw-1.pem"),
        pem::encode(&pem::Pem::new("CERTIFICATE", bytes)),
    )
    .unwrap();
    std::fs::copy(certs_dir.join("node-gw-2.key"), odd.join("node-gw-1.key")).unwrap();
    refused(&agg, tls_with(dir.path(), &odd, "gw-1"), "renamed CN").await;

    // The genuine node still gets in.
    let client = ClientTransport::new(node_tls(&certs_dir, "gw-1")).unwrap();
    TestNode::connect(&client, Transport::Quic, agg.quic_addr, OUTBOX)
        .await
        .unwrap();
    agg.shutdown().await;
}

#[tokio::test]
async fn a_revoked_node_is_cut_off_live_and_refused_after_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    fogline_testkit::certs::dev_bundle(&certs_dir, &["gw-1", "gw-2"]).unwrap();
    certs::revoke(&certs_dir, &[]).unwrap(); // an empty CRL to start with
    let crl = certs::crl_path(&certs_dir);
    let agg = start(
        dir.path(),
        &format!("crl = \"{}\"\nreload_every = \"100ms\"", crl.display()),
    )
    .await;
    let records = sample_readings(2000, 2, 3);
    let c1 = ClientTransport::new(node_tls(&certs_dir, "gw-1")).unwrap();
    let c2 = ClientTransport::new(node_tls(&certs_dir, "gw-2")).unwrap();
    let mut n1 = TestNode::connect(&c1, Transport::Quic, agg.quic_addr, OUTBOX)
        .await
        .unwrap();
    let mut n2 = TestNode::connect(&c2, Transport::Tcp, agg.tcp_addr.unwrap(), OUTBOX)
        .await
        .unwrap();
    n1.send(&records[..1000]).await.unwrap();
    n1.acked_through(records[999].seq).await.unwrap();

    let (serial, _) = certs::certificate_serial(&certs_dir.join("node-gw-1.pem")).unwrap();
    certs::revoke(&certs_dir, &[serial]).unwrap();
    let closed = tokio::time::timeout(T, n1.next_ack()).await.unwrap();
    assert!(
        matches!(
            closed,
            Err(TransportError::Closed {
                code: ErrorCode::Unauthorized,
                ..
            })
        ),
        "the live connection of a revoked node is closed: {closed:?}"
    );
    // A new connection — with a resumable TLS session in hand — is refused.
    refused(&agg, node_tls(&certs_dir, "gw-1"), "revoked").await;
    let again = TestNode::connect(&c1, Transport::Quic, agg.quic_addr, OUTBOX).await;
    assert!(
        again.is_err(),
        "revoked, resumed session: {:?}",
        again.is_ok()
    );

    // The other node is untouched.
    n2.send(&records[1000..]).await.unwrap();
    n2.acked_through(records[1999].seq).await.unwrap();
    agg.shutdown().await;
}

#[tokio::test]
async fn a_batch_that_does_not_decode_closes_the_session_as_malformed_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agg = start(dir.path(), "").await;
    let client = ClientTransport::new(node_tls(&dir.path().join("certs"), "gw-1")).unwrap();
    let mut link = TestNode::connect(&client, Transport::Quic, agg.quic_addr, OUTBOX)
        .await
        .unwrap();
    // A well-formed frame whose block is garbage: the frame decoder passes
    // it, the batch decoder (on a blocking thread) refuses it.
    let junk = vec![0xff; 64];
    let batch = fogline_protocol::BatchFrame {
        first_seq: 1,
        last_seq: 10,
        record_count: 10,
        raw_len: junk.len() as u32,
        codec: fogline_protocol::BlockCodec::None,
        block: junk,
        floor: 11,
    };
    link.conn
        .writer
        .send(&fogline_protocol::Frame::Batch(batch))
        .await
        .unwrap();
    let closed = tokio::time::timeout(T, link.next_ack()).await.unwrap();
    assert!(
        matches!(
            &closed,
            Err(TransportError::Closed {
                code: ErrorCode::Malformed,
                reason,
            }) if reason.contains("does not decode")
        ),
        "{closed:?}"
    );
    assert!(stored(&agg, "gw-1").await.is_empty());
    // The node can come back with good batches.
    let records = sample_readings(100, 2, 1);
    let mut link = TestNode::connect(&client, Transport::Quic, agg.quic_addr, OUTBOX)
        .await
        .unwrap();
    link.send(&records).await.unwrap();
    link.acked_through(records[99].seq).await.unwrap();
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
    let err = ClientTransport::new(tls).err().unwrap().to_string();
    assert!(err.contains("nope/ca.pem"), "{err}");
}

/// A source that keeps failing its handshake (a node with a foreign
/// certificate that does not back off) is refused before any cryptography
/// once it passed the limit, and logged once per interval, not per attempt.
#[tokio::test]
async fn a_source_that_keeps_failing_handshakes_is_refused_without_a_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let agg = start(dir.path(), "").await;
    let rogue = dir.path().join("rogue");
    fogline_testkit::certs::dev_bundle(&rogue, &["gw-1"]).unwrap();
    let client = ClientTransport::new(tls_with(dir.path(), &rogue, "gw-1")).unwrap();
    for i in 0..80 {
        let how = if i % 4 == 0 {
            Transport::Quic
        } else {
            Transport::Tcp
        };
        let result = TestNode::connect(&client, how, addr(&agg, how), OUTBOX).await;
        assert!(result.is_err());
    }
    let metrics = get(format!("http://{}/metrics", agg.http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |reason: Rejected| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with(events::CONNECTIONS_REJECTED_TOTAL)
                    && l.contains(&format!("reason=\"{}\"", reason.label()))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(count(Rejected::Handshake) <= 31.0, "{metrics}");
    assert!(count(Rejected::RateLimited) >= 45.0, "{metrics}");
    agg.shutdown().await;
}

/// I-30: a gateway that booted with its clock behind (no RTC) sees the
/// aggregator's certificate as "not valid yet": the failure says so
/// (`is_clock_behind`, not a plain refusal), and once the node clock's
/// high-water mark (the latest time it has seen, kept in the outbox) is the
/// floor of certificate checks, the same node connects.
#[tokio::test]
async fn a_node_whose_clock_is_behind_checks_against_the_latest_time_it_saw() {
    let dir = tempfile::tempdir().unwrap();
    let certs_dir = dir.path().join("certs");
    fogline_testkit::certs::dev_bundle(&certs_dir, &["gw-1"]).unwrap();
    // Issued "an hour from now" by this machine's clock: to the node, whose
    // clock is an hour behind the aggregator's, it is not valid yet.
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    certs::issue_server(
        &certs_dir,
        &["localhost".to_string()],
        Validity::between(now + hour, now + hour * 24 * 365).unwrap(),
        true,
    )
    .unwrap();
    let agg = start(dir.path(), "").await;
    for how in [Transport::Quic, Transport::Tcp] {
        let client = ClientTransport::new(node_tls(&certs_dir, "gw-1")).unwrap();
        let err = TestNode::connect(&client, how, addr(&agg, how), OUTBOX)
            .await
            .err()
            .unwrap_or_else(|| {
                panic!("{}: connected with a certificate not valid yet", how.name())
            });
        assert!(err.is_clock_behind(), "{}: {err}", how.name());
    }
    // The node has seen a time two hours later than its wall clock says.
    let seen = fogline_telemetry::clock::now_ms() + 2 * 3_600_000;
    fogline_transport::tls::raise_clock_floor(seen);
    for how in [Transport::Quic, Transport::Tcp] {
        let client = ClientTransport::new(node_tls(&certs_dir, "gw-1")).unwrap();
        let link = TestNode::connect(&client, how, addr(&agg, how), OUTBOX).await;
        assert!(link.is_ok(), "{}: {:?}", how.name(), link.err());
    }
}

/// I-31: an aggregator whose store is damaged does not start on it (it
/// would acknowledge from a file that lost records) and says which file and
/// what to do; the edges keep buffering meanwhile.
#[tokio::test]
async fn an_aggregator_refuses_to_start_on_a_damaged_store() {
    let dir = tempfile::tempdir().unwrap();
    let (agg, _client, mut link, records) = gw1_connected(dir.path()).await;
    link.send(&records).await.unwrap();
    link.acked_through(records[2999].seq).await.unwrap();
    drop(link);
    agg.shutdown().await;

    // Scribble over the pages after the schema's: the records' b-tree and
    // its indexes no longer hold together.
    let db = dir.path().join("cloud.db");
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 16 * 4096, "store too small: {}", bytes.len());
    for b in &mut bytes[4 * 4096..12 * 4096] {
        *b = 0xa5;
    }
    std::fs::write(&db, &bytes).unwrap();

    let err = aggregator::start(config(dir.path(), ""))
        .await
        .err()
        .expect("started on a damaged store");
    assert!(
        matches!(err, aggregator::StartError::StoreDamaged { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&db.display().to_string()), "{msg}");
    assert!(msg.contains("damaged"), "{msg}");
}
