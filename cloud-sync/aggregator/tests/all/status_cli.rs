//! `fogline-cloud status` against a running aggregator: health, the
//! aggregators holding nodes, each node; exit 0 healthy, 3 not answering;
//! a missing token named.

use std::process::Command;

use fogline_aggregator::config::CloudConfig;
use fogline_testkit::node::{node_tls, TestNode};
use fogline_testkit::samples::sample_readings;
use fogline_transport::client::ClientTransport;
use fogline_transport::Transport;

use crate::http_api::{config_text, OUTBOX, READ};

fn status(config: &std::path::Path, token: Option<&str>) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fogline-cloud"));
    cmd.args(["status", "--config"]).arg(config);
    cmd.env_remove("FOGLINE_TOKEN");
    if let Some(t) = token {
        cmd.env("FOGLINE_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// [`status`] off the async threads (the aggregator runs on them).
async fn status_of(config: &std::path::Path, token: Option<&'static str>) -> (i32, String) {
    let config = config.to_path_buf();
    tokio::task::spawn_blocking(move || status(&config, token))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_aggregator_and_its_nodes_and_exits_by_health() {
    let dir = tempfile::tempdir().unwrap();
    let port = fogline_testkit::free_tcp_port().unwrap();
    let text = config_text(dir.path(), "open = [\"/healthz\"]").replace(
        "[http]\nlisten = \"127.0.0.1:0\"",
        &format!("[http]\nlisten = \"127.0.0.1:{port}\""),
    ) + "[cluster]\nname = \"agg-status\"\n";
    let path = dir.path().join("cloud.toml");
    std::fs::write(&path, text).unwrap();
    let agg = fogline_aggregator::start(CloudConfig::load(&path).unwrap())
        .await
        .unwrap();
    let client = ClientTransport::new(node_tls(&dir.path().join("certs"), "gw-1")).unwrap();
    let mut link = TestNode::connect(&client, Transport::Quic, agg.quic_addr, OUTBOX)
        .await
        .unwrap();
    let records = sample_readings(20, 2, 1);
    link.send(&records).await.unwrap();
    link.acked_through(20).await.unwrap();

    let (code, out) = status_of(&path, Some(READ)).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(": ok"), "{out}");
    assert!(
        out.contains("agg-status") && out.contains("1 node(s)"),
        "{out}"
    );
    assert!(out.contains("1 known, 1 connected"), "{out}");
    assert!(out.contains("gw-1") && out.contains("connected"), "{out}");

    let (code, out) = status_of(&path, None).await;
    assert_ne!(code, 0);
    assert!(out.contains("FOGLINE_TOKEN"), "{out}");

    drop(link);
    agg.shutdown().await;
    let (code, out) = status_of(&path, Some(READ)).await;
    assert_eq!(code, 3, "not answering: {out}");
    assert!(out.contains("not answering"), "{out}");
}
