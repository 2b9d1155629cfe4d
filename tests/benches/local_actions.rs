//! Local actions latency (issue 14 §2), printed (not asserted): a sensor
//! PUBLISH → fogline-edge's endpoint → a function → a subscriber on the same
//! endpoint, at a steady rate (1,000 readings/s by default). The function is
//! `scale` mapping each reading onto `local/<stream>`, so every reading
//! makes one local output.
//!
//! Runs, in the same process, one after the other:
//! - reference: publisher → a bare mosquitto → subscriber (the same
//!   payloads, rate and clients), at QoS 0 and at QoS 1;
//! - `local = "immediate"`, QoS 0, uplink up (the outbox draining) and down
//!   (the aggregator killed: the outbox grows; local delivery must not
//!   notice); ratios against the QoS 0 reference;
//! - `local = "durable"`, sensor and subscriber at QoS 1 (the output is
//!   committed before it is delivered), uplink up and down; ratios against
//!   the QoS 1 reference.
//!
//! Latency is the subscriber's receive time minus the send time the
//! publisher wrote into the payload (one clock: both in this process).
//!
//! cargo build --release --bins && cargo bench -p fogline-tests --bench local_actions [-- --rate 1000 --seconds 10]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use fogline_tests::deploy::{uplink_toml, Cloud, Edge};
use fogline_tests::mosquitto::Mosquitto;
use fogline_tests::mqtt_raw::{Connection, Incoming, Options, QoS, Version};

const NODES: [&str; 2] = ["gw-local-bench", "gw-durable-bench"];

fn arg(name: &str, default: usize) -> usize {
    fogline_tests::bench_arg(name, default)
}

struct Figures {
    sent: usize,
    received: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Publishes `rate`/s for `seconds` to `addr` on `sensors/m<i>`, and
/// times each message `filter` delivers to a subscriber on the same server.
async fn measure(addr: &str, filter: &str, qos: QoS, rate: usize, seconds: usize) -> Figures {
    let start = Instant::now();
    let (mut sub, _) =
        Connection::connect(&Options::new(addr, "bench-sub").with_version(Version::V5))
            .await
            .unwrap();
    sub.subscribe(1, &[(filter, qos)]).unwrap();
    sub.flush().await.unwrap();
    match sub
        .next_packet_within(Duration::from_secs(5))
        .await
        .unwrap()
    {
        Some(Incoming::SubAck { codes, .. }) => assert!(codes[0] < 0x80, "refused: {codes:?}"),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let total = rate * seconds;
    let receiver = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(total);
        let deadline = Instant::now() + Duration::from_secs(seconds as u64 + 10);
        while lat.len() < total && Instant::now() < deadline {
            match sub.next_packet_within(Duration::from_secs(2)).await {
                Ok(Some(Incoming::Publish {
                    payload, qos, pkid, ..
                })) => {
                    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                    let sent = Duration::from_nanos(v["sent_ns"].as_u64().unwrap());
                    lat.push(start.elapsed().saturating_sub(sent));
                    if qos == QoS::AtLeastOnce {
                        sub.puback(pkid).unwrap();
                        sub.flush().await.unwrap();
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => panic!("subscriber: {e}"),
            }
        }
        lat
    });
    let (mut publisher, _) =
        Connection::connect(&Options::new(addr, "bench-pub").with_version(Version::V5))
            .await
            .unwrap();
    // The publisher's PUBACKs stay unread in its socket buffer (4 bytes each).
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..total {
        tick.tick().await;
        let payload = format!(
            r#"{{"temp":{},"sent_ns":{}}}"#,
            20 + i % 10,
            start.elapsed().as_nanos()
        );
        publisher
            .publish(
                &format!("sensors/m{}", i % 16),
                payload.into_bytes(),
                qos,
                (i % 65_535) as u16 + 1,
                false,
            )
            .unwrap();
        publisher.flush().await.unwrap();
    }
    let mut lat = receiver.await.unwrap();
    lat.sort();
    Figures {
        sent: total,
        received: lat.len(),
        p50: quantile(&lat, 0.50),
        p99: quantile(&lat, 0.99),
        max: lat.last().copied().unwrap_or_default(),
    }
}

fn row(name: &str, f: &Figures, reference: &Figures) {
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!(
        "| {name} | {}/{} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2}× | {:.2}× |",
        f.received,
        f.sent,
        f.p50.as_secs_f64() * 1e3,
        f.p99.as_secs_f64() * 1e3,
        f.max.as_secs_f64() * 1e3,
        ratio(f.p50, reference.p50),
        ratio(f.p99, reference.p99),
    );
}

/// Starts an edge for `node` whose `machines` pipeline serves local
/// subscribers in `mode`; returns it and its endpoint's address.
fn edge(
    dir: &std::path::Path,
    certs: &std::path::Path,
    cloud: &Cloud,
    node: &str,
    mode: &str,
    linger_ms: usize,
) -> (Edge, String) {
    let port = fogline_tests::free_tcp_port().unwrap();
    let body = format!(
        "[outbox]\ncommit_linger = \"{linger_ms}ms\"\n\
         [broker]\nembedded = true\nlisten = \"127.0.0.1:{port}\"\n\
         [[broker.local_topics]]\nfilter = \"local/#\"\nsubscribers = [\"*\"]\n\
         [functions.map]\nmodule = \"{}\"\nconfig = {{ field = \"temp\", output_stream = \"local/{{stream}}\" }}\n\
         [[pipelines]]\nname = \"machines\"\ntopics = [\"sensors/#\"]\nfunctions = [\"map\"]\nlocal = \"{mode}\"\n{}",
        fogline_modules::scale().display(),
        uplink_toml(node, certs, cloud.quic_port)
    );
    let edge = Edge::start(dir, node, &body).unwrap();
    let addr = format!("127.0.0.1:{port}");
    let listening = fogline_tests::process::wait_until(Duration::from_secs(30), || {
        std::net::TcpStream::connect(&addr).is_ok()
    });
    assert!(listening, "{}", edge.daemon.log_text());
    (edge, addr)
}

fn main() {
    let rate = arg("--rate", 1000);
    let seconds = arg("--seconds", 10);
    // The outbox's commit_linger (not applied with local delivery: shown
    // to make the point).
    let linger_ms = arg("--linger-ms", 1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let broker = Mosquitto::start().unwrap();
    let reference = rt.block_on(measure(
        &broker.addr(),
        "sensors/#",
        QoS::AtMostOnce,
        rate,
        seconds,
    ));
    let reference1 = rt.block_on(measure(
        &broker.addr(),
        "sensors/#",
        QoS::AtLeastOnce,
        rate,
        seconds,
    ));
    drop(broker);

    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    fogline_testkit::certs::dev_bundle(&certs, &NODES).unwrap();
    let mut cloud = Cloud::start(dir.path(), &certs).unwrap();
    let (immediate, addr) = edge(dir.path(), &certs, &cloud, NODES[0], "immediate", linger_ms);
    let up = rt.block_on(measure(&addr, "local/#", QoS::AtMostOnce, rate, seconds));
    cloud.daemon.kill9();
    let down = rt.block_on(measure(&addr, "local/#", QoS::AtMostOnce, rate, seconds));
    drop(immediate);

    cloud.daemon.restart().unwrap();
    let (_durable, addr) = edge(dir.path(), &certs, &cloud, NODES[1], "durable", linger_ms);
    let dup = rt.block_on(measure(&addr, "local/#", QoS::AtLeastOnce, rate, seconds));
    cloud.daemon.kill9();
    let ddown = rt.block_on(measure(&addr, "local/#", QoS::AtLeastOnce, rate, seconds));

    println!(
        "\n## local actions: sensor PUBLISH → function → local subscriber, {rate}/s for {seconds} s"
    );
    println!("| run | received | p50 | p99 | max | p50 ÷ reference | p99 ÷ reference |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    row(
        "reference: publisher → mosquitto → subscriber, QoS 0",
        &reference,
        &reference,
    );
    row("immediate, QoS 0, uplink up", &up, &reference);
    row("immediate, QoS 0, uplink down", &down, &reference);
    row(
        "reference: publisher → mosquitto → subscriber, QoS 1",
        &reference1,
        &reference1,
    );
    row("durable, QoS 1, uplink up", &dup, &reference1);
    row("durable, QoS 1, uplink down", &ddown, &reference1);
    println!(
        "targets (issue 14): immediate p50 ≤ 1 ms, p99 ≤ 5 ms; durable p99 ≤ 20 ms; neither slowed by an uplink outage"
    );
}
