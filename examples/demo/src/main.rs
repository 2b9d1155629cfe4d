//! The Fogline demo, all in one process on embedded defaults:
//! the edge's native MQTT endpoint, simulated sensors, the edge daemon running both
//! example functions (threshold, window-avg), an aggregator, and a UDP relay
//! between them that cuts the uplink partway through and restores it.
//! At the end it reads the aggregator's store and reports lost and duplicated
//! readings, computed, not assumed.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use fogline_edge::config::EdgeConfig;
use fogline_testkit::relay::UdpRelay;
use fogline_tests::{oracle, sensors};

/// Run the Fogline demo.
#[derive(Parser, Debug)]
#[command(name = "fogline-demo", about)]
struct Args {
    /// Simulated sensors.
    #[arg(long, default_value_t = 8)]
    sensors: usize,
    /// Readings per sensor.
    #[arg(long, default_value_t = 2500)]
    readings: usize,
    /// Readings per second per sensor.
    #[arg(long, default_value_t = 400)]
    rate: u32,
    /// Threshold: readings with temp above this pass.
    #[arg(long, default_value_t = 30.0)]
    above: f64,
    /// Keep the demo's files (configs, certs, databases) here instead of a temp dir.
    #[arg(long)]
    keep: Option<std::path::PathBuf>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    fogline_telemetry::init_tracing("warn");
    match run(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    fogline_tests::free_tcp_port().context("no free port on 127.0.0.1")
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let tmp = tempfile::tempdir()?;
    let dir = match &args.keep {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_path_buf(),
    };
    println!("Fogline demo — working in {}", dir.display());

    // 1. Certificates: a fleet CA, the aggregator's and the gateway's.
    let certs = dir.join("certs");
    fogline_testkit::certs::dev_bundle(&certs, &["gw-demo"])
        .context("creating demo certificates")?;

    // 2. The aggregator, on loopback ports chosen now.
    let store = dir.join("cloud.db");
    // The API answers only with a token: one made for this run.
    let (token, entry) = fogline_aggregator::http::auth::new_token(
        "demo",
        fogline_aggregator::http::auth::Scope::Read,
    );
    let cloud_toml = format!(
        "[quic]\nlisten = \"127.0.0.1:0\"\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/server.pem\"\nkey = \"{c}/server.key\"\n[store]\npath = \"{s}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[[http.tokens]]\nname = \"demo\"\nscope = \"read\"\nsha256 = \"{h}\"\n",
        c = certs.display(),
        s = store.display(),
        h = entry.sha256
    );
    let cloud_config = fogline_aggregator::config::CloudConfig::parse(&cloud_toml)
        .context("demo aggregator config")?;
    let aggregator = fogline_aggregator::start(cloud_config).await?;
    println!(
        "aggregator      QUIC {}  HTTP: curl -H 'Authorization: Bearer {token}' 'http://{}/api/v1/latest?node=gw-demo'",
        aggregator.quic_addr, aggregator.http_addr
    );

    // 3. The "uplink": a UDP relay we can cut.
    let relay = UdpRelay::start(aggregator.quic_addr).await?;

    // 4. The edge daemon with its MQTT endpoint and both example functions.
    let (mqtt_port, metrics_port) = (free_port()?, free_port()?);
    let edge_toml = format!(
        r#"
[node]
id = "gw-demo"
data_dir = "{d}/edge"
[broker]
embedded = true
listen = "127.0.0.1:{mqtt_port}"
[functions.hot]
module = "{threshold}"
config = {{ field = "temp", above = {above} }}
[functions.avg]
module = "{window}"
config = {{ field = "temp", window_ms = 2000 }}
[[pipelines]]
name = "hot-readings"
topics = ["sensors/+/reading"]
functions = ["hot"]
[[pipelines]]
name = "averages"
topics = ["sensors/+/reading"]
functions = ["avg"]
[outbox]
tick_interval = "500ms"
[uplink]
server = "{relay}"
server_name = "localhost"
ca = "{c}/ca.pem"
cert = "{c}/node-gw-demo.pem"
key = "{c}/node-gw-demo.key"
reconnect_max = "1s"
[metrics]
listen = "127.0.0.1:{metrics_port}"
"#,
        d = dir.display(),
        c = certs.display(),
        threshold = fogline_modules::threshold().display(),
        window = fogline_modules::window_avg().display(),
        above = args.above,
        relay = relay.local_addr(),
    );
    let edge_path = dir.join("edge.toml");
    std::fs::write(&edge_path, &edge_toml)?;
    let edge_config = EdgeConfig::load(&edge_path)?;
    let outbox_path = edge_config.outbox_path();
    let edge = fogline_edge::daemon::start(edge_config).await?;
    println!(
        "edge daemon     MQTT endpoint on {}, metrics http://127.0.0.1:{metrics_port}/metrics",
        edge.broker_addr
            .map(|a| a.to_string())
            .unwrap_or_else(|| "?".into())
    );
    println!("                (a PUBACK means the reading is fsynced in the gateway's outbox)");
    let t0 = Instant::now();

    // 5. Sensors publish; we cut the uplink at 30% and restore it at 70%.
    let total = args.sensors * args.readings;
    println!(
        "sensors         {} sensors × {} readings (~100-byte JSON) at {}/s each\n",
        args.sensors, args.readings, args.rate
    );
    let published = Arc::new(AtomicUsize::new(0));
    let p2 = published.clone();
    let (n_sensors, per, rate) = (args.sensors, args.readings, args.rate);
    let publisher = tokio::spawn(async move {
        sensors::publish(
            "127.0.0.1",
            mqtt_port,
            n_sensors,
            per,
            Some(rate),
            move |n| p2.store(n, Ordering::Release),
        )
        .await
    });

    let progress = |phase: &str| -> anyhow::Result<()> {
        let stats = fogline_edge::outbox::read_stats(&outbox_path)?;
        println!(
            "{:>6.1}s  {:<10} published {:>6}  passed by functions {:>6}  buffered {:>6}  synced {:>6}",
            t0.elapsed().as_secs_f64(),
            phase,
            published.load(Ordering::Acquire),
            stats.next_seq.saturating_sub(1),
            stats.backlog_records,
            oracle::count(&store),
        );
        Ok(())
    };
    let mut cut = false;
    let mut restored = false;
    while !publisher.is_finished() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let done = published.load(Ordering::Acquire);
        if !cut && done >= total * 3 / 10 {
            relay.cut();
            cut = true;
            println!("         ✂  uplink cut: the edge keeps buffering in its outbox");
        }
        if cut && !restored && done >= total * 7 / 10 {
            relay.restore();
            restored = true;
            println!("         ↻  uplink restored: the backlog drains");
        }
        progress(if cut && !restored {
            "offline"
        } else {
            "online"
        })?;
    }
    publisher.await??;
    if !restored {
        relay.restore();
    }
    let restore_at = Instant::now();

    // 6. Wait for everything the threshold passes to reach the store.
    let mut expected = std::collections::BTreeSet::new();
    for s in 0..args.sensors {
        for n in 0..args.readings {
            if sensors::temperature(s, n) > args.above {
                expected.insert(sensors::reading_id(s, n));
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = fogline_edge::outbox::read_stats(&outbox_path)?;
        let records = oracle::read_store(&store)?;
        let verdict = oracle::judge(&records, &expected);
        if (verdict.received >= expected.len() && stats.backlog_records == 0)
            || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let drained_in = restore_at.elapsed();
    progress("done")?;
    let records = oracle::read_store(&store)?;
    let verdict = oracle::judge(&records, &expected);
    let averages = records
        .iter()
        .filter(|r| r.payload.get("avg").is_some())
        .count();
    println!("\nSummary (computed from the aggregator's store)");
    println!("  published readings          {total}");
    println!("  expected past the threshold {}", verdict.expected);
    println!("  received readings           {}", verdict.received);
    println!("  lost                        {}", verdict.lost.len());
    println!("  duplicated                  {}", verdict.duplicated.len());
    println!("  unexpected                  {}", verdict.unexpected.len());
    println!(
        "  streams out of order        {}",
        verdict.out_of_order.len()
    );
    println!("  window averages stored      {averages}");
    println!(
        "  drained after publishing    {:.2}s",
        drained_in.as_secs_f64()
    );
    edge.shutdown().await;
    aggregator.shutdown().await;
    let ok = verdict.is_exact() && averages > 0;
    println!(
        "\n{}",
        if ok {
            "OK: nothing lost, nothing duplicated."
        } else {
            "FAILED: see above."
        }
    );
    Ok(ok)
}
