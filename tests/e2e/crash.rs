//! Kill -9 of the aggregator and of the edge daemon mid-stream: the
//! aggregator ends up with exactly the readings the function passes.
//! (Checks: ingest acks only after a durable commit; redeliveries after an
//! edge crash are not processed twice; the aggregator applies (node, seq)
//! once; the edge resumes from the aggregator's cursor; a restarted edge
//! takes over its old, still-open connection.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::{expected_hot, Cluster};

#[test]
fn kill9_aggregator_and_edge_mid_stream_lose_and_duplicate_nothing() {
    const SENSORS: usize = 8;
    const PER_SENSOR: usize = 2_500; // 20,000 readings
    const TOTAL: usize = SENSORS * PER_SENSOR;
    let mut cluster = Cluster::start("gw-crash");
    let expected = expected_hot(SENSORS, PER_SENSOR);
    assert!(
        expected.len() > 5_000,
        "the threshold should pass a good share"
    );

    // Publish in the background; the main thread kills at 30% and 60%.
    let published = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let port = cluster.mosquitto.port;
    let (p2, f2) = (published.clone(), finished.clone());
    let publisher = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(fogline_tests::sensors::publish(
            "127.0.0.1",
            port,
            SENSORS,
            PER_SENSOR,
            Some(500), // 4,000/s in total: long enough to kill mid-stream
            move |n| p2.store(n, Ordering::Release),
        ))
        .unwrap();
        f2.store(true, Ordering::Release);
    });

    let reached = |frac: f64| {
        fogline_tests::process::wait_until(Duration::from_secs(60), || {
            published.load(Ordering::Acquire) as f64 >= frac * TOTAL as f64
        })
    };
    assert!(reached(0.3), "publisher stalled before 30%");
    cluster.cloud.kill9();
    std::thread::sleep(Duration::from_millis(700));
    cluster.cloud.restart().unwrap();

    assert!(reached(0.6), "publisher stalled before 60%");
    cluster.edge.kill9();
    std::thread::sleep(Duration::from_millis(300));
    cluster.edge.restart().unwrap();

    publisher.join().unwrap();
    assert!(finished.load(Ordering::Acquire));
    let verdict = cluster.settle(&expected, Duration::from_secs(120));
    assert!(
        verdict.is_exact(),
        "{}\n{}",
        verdict.summary(),
        cluster.logs()
    );
    assert!(cluster.edge.is_running() && cluster.cloud.is_running());
    // The killed edge's connection was still open on the aggregator when
    // the restarted edge connected: the new one took over (and, per the
    // verdict above, nothing was applied twice).
    assert!(
        cluster
            .cloud
            .log_text()
            .contains("Node reconnected; closing its previous connection"),
        "{}",
        cluster.logs()
    );
}
