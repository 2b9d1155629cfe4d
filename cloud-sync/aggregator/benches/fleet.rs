//! `fleet`: N simulated gateways on one aggregator (issue 13 §2).
//!
//! Each gateway has its own certificate, outbox state and QUIC connection
//! (`fogline_testkit::fleet`) and sends one ~100 B reading per second. The
//! aggregator is the real `fogline-cloud` binary, started as a child process
//! so its RSS and CPU are its own, on SQLite or on a throwaway PostgreSQL
//! database.
//!
//! ```sh
//! cargo bench -p fogline-aggregator --bench fleet -- --nodes 10000 --store sqlite --seconds 60
//! cargo bench -p fogline-aggregator --bench fleet -- --nodes 10000 --store postgres --seconds 60
//! cargo bench -p fogline-aggregator --bench fleet -- --ceiling --store sqlite --seconds 30
//! ```
//!
//! Every invocation first runs a reference fleet (`--reference`, 100
//! gateways) in the same conditions and prints the ratios of p99 apply
//! latency and of readings applied per gateway per second against it.
//! `--ceiling` steps the fleet up (`--steps`) until p99 > 1 s or a gateway
//! starves, bounded by the file descriptor limit and `--max-minutes`.
//!
//! Printed every `--report-every` seconds and at the end: gateways
//! connected, readings/s applied (the aggregator's
//! `fogline_cloud_records_applied_total`), p50/p99/max apply latency (send
//! of the batch → its `Ack`), aggregator RSS (current, peak) and CPU (cores
//! used), the generator's own CPU, and how far the gateways are behind
//! their schedule (min/max readings due minus acknowledged; "starved" is
//! more than `--starved` behind).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use fogline_aggregator::service::events::RECORDS_APPLIED_TOTAL;
use fogline_testkit::fleet::{self, Fleet, FleetConfig, Latencies, Progress};
use fogline_testkit::postgres::TestDb;

#[derive(Debug, Parser)]
#[command(about = "N simulated gateways against one fogline-cloud")]
struct Args {
    /// Gateways in the measured run.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// `sqlite` or `postgres`.
    #[arg(long, default_value = "sqlite")]
    store: String,
    /// Seconds measured once every gateway has connected.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Gateways in the reference run (same store, same seconds).
    #[arg(long, default_value_t = 100)]
    reference: usize,
    /// Connections started per second.
    #[arg(long, default_value_t = 500)]
    ramp: u32,
    /// UDP sockets the gateways share (default: one per gateway while the
    /// file descriptor limit allows).
    #[arg(long)]
    sockets: Option<usize>,
    /// A gateway more than this many readings behind its schedule is
    /// starved.
    #[arg(long, default_value_t = 3)]
    starved: u64,
    /// Print a line every this many seconds.
    #[arg(long, default_value_t = 5)]
    report_every: u64,
    /// Step the fleet up until p99 > 1 s or a gateway starves.
    #[arg(long)]
    ceiling: bool,
    /// Fleet sizes for `--ceiling`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2000,4000,6000,8000,10000,12500,15000,20000"
    )]
    steps: Vec<usize>,
    /// `--ceiling` stops starting new steps after this long.
    #[arg(long, default_value_t = 30)]
    max_minutes: u64,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// p99 apply latency above this misses the target.
const P99_TARGET: Duration = Duration::from_secs(1);

fn main() {
    let args = Args::parse();
    assert!(
        matches!(args.store.as_str(), "sqlite" | "postgres"),
        "--store is sqlite or postgres, not {}",
        args.store
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(args));
}

/// What one fleet size measured.
#[derive(Debug, Clone)]
struct Outcome {
    nodes: usize,
    connected: usize,
    applied_per_s: f64,
    acked_per_s: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    rss_mb: f64,
    peak_rss_mb: f64,
    agg_cores: f64,
    gen_cores: f64,
    db_cores: f64,
    min_behind: u64,
    max_behind: u64,
    starved: usize,
    lost: u64,
    ramp_s: f64,
}

impl Outcome {
    fn per_node(&self) -> f64 {
        self.applied_per_s / self.nodes.max(1) as f64
    }
    fn met(&self) -> bool {
        self.p99 <= P99_TARGET
            && self.starved == 0
            && self.connected == self.nodes
            && self.lost == 0
    }
}

async fn run(args: Args) {
    let fd_limit = open_files_limit();
    let largest = if args.ceiling {
        args.steps.iter().copied().max().unwrap_or(args.nodes)
    } else {
        args.nodes
    };
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    // The ceiling issues each step's certificates as it gets there.
    let first = if args.ceiling {
        args.steps.first().copied().unwrap_or(largest)
    } else {
        largest
    }
    .max(args.reference);
    fleet::issue_certs(&certs, first, threads).unwrap();
    println!(
        "fleet: {} gateway certificates issued in {:.1} s; store {}; file descriptor limit {fd_limit}; {} cores",
        first,
        started.elapsed().as_secs_f64(),
        args.store,
        threads
    );

    println!("\n== reference: {} gateways ==", args.reference);
    let reference = measure(&args, dir.path(), args.reference, fd_limit).await;
    if !args.ceiling {
        println!("\n== measured: {} gateways ==", args.nodes);
        let m = measure(&args, dir.path(), args.nodes, fd_limit).await;
        print_table(&args, &reference, &[m]);
        return;
    }
    let deadline = started + Duration::from_secs(args.max_minutes * 60);
    let mut rows = Vec::new();
    for &n in &args.steps {
        if Instant::now() >= deadline {
            println!("ceiling: --max-minutes reached before {n} gateways");
            break;
        }
        fleet::issue_certs(&certs, n, threads).unwrap();
        println!("\n== ceiling step: {n} gateways ==");
        let m = measure(&args, dir.path(), n, fd_limit).await;
        let met = m.met();
        rows.push(m);
        if !met {
            break;
        }
    }
    print_table(&args, &reference, &rows);
    match rows.iter().rev().find(|r| r.met()) {
        Some(r) => println!(
            "ceiling ({}): {} gateways held with p99 ≤ 1 s and none starved; the next step missed{}",
            args.store,
            r.nodes,
            if rows.last().is_some_and(Outcome::met) { " nothing (steps exhausted)" } else { "" }
        ),
        None => println!("ceiling ({}): no step met the target", args.store),
    }
}

fn print_table(args: &Args, reference: &Outcome, rows: &[Outcome]) {
    println!(
        "\n## fleet, store {} — {} s measured per row; reference = {} gateways in the same run",
        args.store, args.seconds, reference.nodes
    );
    println!(
        "| gateways | connected | readings/s applied | p50 | p99 | max | agg RSS (peak) | agg CPU | gen CPU | postgres CPU | behind min/max | starved | lost | p99 ÷ ref | per-gateway rate ÷ ref | target |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in std::iter::once(reference).chain(rows) {
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {:.0} MB ({:.0} MB) | {:.2} cores | {:.2} cores | {:.2} cores | {}/{} | {} | {} | {:.2}× | {:.2}× | {} |",
            r.nodes,
            r.connected,
            r.applied_per_s,
            ms(r.p50),
            ms(r.p99),
            ms(r.max),
            r.rss_mb,
            r.peak_rss_mb,
            r.agg_cores,
            r.gen_cores,
            r.db_cores,
            r.min_behind,
            r.max_behind,
            r.starved,
            r.lost,
            r.p99.as_secs_f64() / reference.p99.as_secs_f64().max(1e-6),
            r.per_node() / reference.per_node().max(1e-9),
            if r.met() { "met" } else { "MISSED" }
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

async fn measure(args: &Args, base: &Path, nodes: usize, fd_limit: usize) -> Outcome {
    let run_dir = tempfile::tempdir_in(base).unwrap();
    let db = match args.store.as_str() {
        "postgres" => Some(TestDb::create().await.unwrap()),
        _ => None,
    };
    let store = match &db {
        Some(db) => format!("url = \"{}\"", db.url),
        None => format!("path = \"{}\"", run_dir.path().join("cloud.db").display()),
    };
    let agg = Aggregator::start(run_dir.path(), &base.join("certs"), &store);
    // One socket per gateway while descriptors allow (the aggregator is
    // another process; keep room for the runtime, PostgreSQL and HTTP).
    let sockets = args
        .sockets
        .unwrap_or(if nodes + 256 <= fd_limit { nodes } else { 64 });
    let fleet = Fleet::start(FleetConfig {
        nodes,
        addr: agg.quic,
        certs: base.join("certs"),
        ramp_per_s: args.ramp,
        interval: Duration::from_secs(1),
        sockets,
    })
    .unwrap();
    let t0 = Instant::now();
    println!(
        "{nodes} gateways on {sockets} UDP sockets, {} connections/s; aggregator pid {}, HTTP {}",
        args.ramp,
        agg.child.id(),
        agg.http
    );
    let mut monitor = Monitor::new(&agg).await;

    // Ramp: until every gateway has connected and sent (bounded).
    let ramp_bound = Duration::from_secs_f64(nodes as f64 / f64::from(args.ramp.max(1)))
        + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_secs(args.report_every)).await;
        let line = monitor.line(&agg, &fleet, args.starved).await;
        println!("ramp    {line}");
        let p = fleet.progress(args.starved);
        if (p.connected == nodes && p.started == nodes) || t0.elapsed() > ramp_bound {
            break;
        }
    }
    let ramp_s = t0.elapsed().as_secs_f64();
    // Settle: the connection storm's backlog is not the steady state.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let _ = fleet.take_latencies();
    let start = monitor.sample(&agg, &fleet).await;
    let mut all = Latencies::default();
    let mut worst = Progress::default();
    let measured = Instant::now();
    while measured.elapsed() < Duration::from_secs(args.seconds) {
        let left = Duration::from_secs(args.seconds).saturating_sub(measured.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(args.report_every))).await;
        let (line, window, p) = monitor.line_with(&agg, &fleet, args.starved).await;
        all.add(&window);
        if p.max_behind >= worst.max_behind {
            worst.max_behind = p.max_behind;
        }
        worst.starved = worst.starved.max(p.starved);
        worst.min_behind = p.min_behind;
        println!("steady  {line}");
    }
    let end = monitor.sample(&agg, &fleet).await;
    let wall = end.at.duration_since(start.at).as_secs_f64();
    let p = fleet.progress(args.starved);
    let reports = fleet.stop(Duration::from_secs(15)).await;
    // Let the aggregator see the closes before it is stopped.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lost: u64 = reports.iter().map(|r| r.made - r.acked.min(r.made)).sum();
    let (rss, peak) = agg.memory_mb();
    let outcome = Outcome {
        nodes,
        connected: p.connected,
        applied_per_s: (end.applied - start.applied) / wall,
        acked_per_s: (end.acked - start.acked) as f64 / wall,
        p50: all.quantile(0.50),
        p99: all.quantile(0.99),
        max: all.max(),
        rss_mb: rss,
        peak_rss_mb: peak,
        agg_cores: (end.agg_cpu - start.agg_cpu) / wall,
        gen_cores: (end.gen_cpu - start.gen_cpu) / wall,
        db_cores: (end.db_cpu - start.db_cpu) / wall,
        min_behind: worst.min_behind,
        max_behind: worst.max_behind,
        starved: worst.starved,
        lost,
        ramp_s,
    };
    println!(
        "result  {nodes} gateways: ramp {:.0} s; {:.0} readings/s applied ({:.0} acked/s), p50 {} p99 {} max {}; aggregator RSS {:.0} MB (peak {:.0} MB), CPU {:.2} cores; generator CPU {:.2} cores; postgres CPU {:.2} cores; behind min {} max {} (starved: {}); unacknowledged after a 15 s drain: {lost}",
        outcome.ramp_s,
        outcome.applied_per_s,
        outcome.acked_per_s,
        ms(outcome.p50),
        ms(outcome.p99),
        ms(outcome.max),
        rss,
        peak,
        outcome.agg_cores,
        outcome.gen_cores,
        outcome.db_cores,
        outcome.min_behind,
        outcome.max_behind,
        outcome.starved
    );
    if let Some(e) = monitor.last_error.take() {
        println!("last gateway error: {e}");
    }
    agg.stop();
    drop(db);
    outcome
}

/// A sample of the counters, for rates.
struct Sample {
    at: Instant,
    applied: f64,
    acked: u64,
    agg_cpu: f64,
    gen_cpu: f64,
    /// Every `postgres` process on the machine.
    db_cpu: f64,
}

struct Monitor {
    last: Sample,
    last_error: Option<String>,
}

impl Monitor {
    async fn new(agg: &Aggregator) -> Self {
        Self {
            last: Sample {
                at: Instant::now(),
                applied: agg.applied().await,
                acked: 0,
                agg_cpu: agg.cpu_seconds(),
                gen_cpu: cpu_seconds(std::process::id()),
                db_cpu: postgres_cpu_seconds(),
            },
            last_error: None,
        }
    }

    async fn sample(&self, agg: &Aggregator, fleet: &Fleet) -> Sample {
        Sample {
            at: Instant::now(),
            applied: agg.applied().await,
            acked: fleet.acked(),
            agg_cpu: agg.cpu_seconds(),
            gen_cpu: cpu_seconds(std::process::id()),
            db_cpu: postgres_cpu_seconds(),
        }
    }

    async fn line(&mut self, agg: &Aggregator, fleet: &Fleet, starved: u64) -> String {
        self.line_with(agg, fleet, starved).await.0
    }

    /// One report line since the previous one, the latencies it covers and
    /// the progress it saw.
    async fn line_with(
        &mut self,
        agg: &Aggregator,
        fleet: &Fleet,
        starved: u64,
    ) -> (String, Latencies, Progress) {
        let now = self.sample(agg, fleet).await;
        let lat = fleet.take_latencies();
        let p = fleet.progress(starved);
        let dt = now.at.duration_since(self.last.at).as_secs_f64().max(1e-3);
        let (rss, peak) = agg.memory_mb();
        let line = format!(
            "connected {:>6}/{:<6} applied {:>7.0}/s acked {:>7.0}/s  p50 {:>9} p99 {:>9} max {:>9}  agg RSS {:>4.0} MB (peak {:>4.0}) CPU {:.2}  gen CPU {:.2}  postgres CPU {:.2}  behind {}..{} starved {}  reconnects {} failures {}",
            p.connected,
            p.started,
            (now.applied - self.last.applied) / dt,
            (now.acked - self.last.acked) as f64 / dt,
            ms(lat.quantile(0.5)),
            ms(lat.quantile(0.99)),
            ms(lat.max()),
            rss,
            peak,
            (now.agg_cpu - self.last.agg_cpu) / dt,
            (now.gen_cpu - self.last.gen_cpu) / dt,
            (now.db_cpu - self.last.db_cpu) / dt,
            p.min_behind,
            p.max_behind,
            p.starved,
            p.connects.saturating_sub(p.started as u64),
            p.connect_failures,
        );
        if let Some(e) = fleet.last_error() {
            self.last_error = Some(e);
        }
        self.last = now;
        (line, lat, p)
    }
}

/// `fogline-cloud run` as a child process.
struct Aggregator {
    child: Child,
    quic: SocketAddr,
    http: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Aggregator {
    fn start(dir: &Path, certs: &Path, store: &str) -> Self {
        let config = dir.join("cloud.toml");
        std::fs::write(
            &config,
            format!(
                "[quic]\nlisten = \"127.0.0.1:0\"\n[tcp]\nenabled = false\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/server.pem\"\nkey = \"{c}/server.key\"\n[store]\n{store}\n[cluster]\nname = \"fleet-bench\"\n[http]\nlisten = \"127.0.0.1:0\"\nopen = [\"/metrics\", \"/healthz\"]\n",
                c = certs.display()
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_fogline-cloud"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("FLEET_AGG_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let keep = log.clone();
        // Drains the child's log (it must never block on a full pipe) and
        // keeps the warnings and errors.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in stderr.lines().map_while(Result::ok) {
                if line.contains("fogline-cloud listening") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line.clone());
                    }
                }
                if line.contains("WARN") || line.contains("ERROR") {
                    let mut l = keep.lock().unwrap();
                    if l.len() < 1000 {
                        l.push(line);
                    }
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "fogline-cloud did not start; log: {:?}",
                    log.lock().unwrap()
                )
            });
        let word_after = |key: &str| -> SocketAddr {
            let rest = line.split(key).nth(1).unwrap().trim_start();
            let w = rest.split_whitespace().next().unwrap();
            w.trim_start_matches("http://").parse().unwrap()
        };
        Self {
            quic: word_after("QUIC"),
            http: word_after("HTTP"),
            child,
            log,
        }
    }

    async fn applied(&self) -> f64 {
        match fleet::http_get(self.http, "/metrics").await {
            Ok(text) => fleet::metric_sum(&text, RECORDS_APPLIED_TOTAL),
            Err(_) => 0.0,
        }
    }

    fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.child.id())
    }

    /// Current and peak RSS in MB (VmRSS, VmHWM).
    fn memory_mb(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let kb = |key: &str| -> f64 {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = self.log.lock().unwrap();
        if !log.is_empty() {
            println!(
                "aggregator warnings/errors: {} (first: {})",
                log.len(),
                log[0]
            );
        }
    }
}

/// User + system CPU seconds of process `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds of every `postgres` process (the server and
/// its backends), for runs on PostgreSQL; 0 when there is none.
fn postgres_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(cpu_seconds)
        .sum()
}

/// This process's soft limit on open files.
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(1024)
}
