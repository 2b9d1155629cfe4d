//! Functions on a real daemon, fed through its native MQTT endpoint, with the
//! aggregator's store as the oracle: durable window state across kill -9 and
//! SIGTERM (I-22), a new version taking over with the old one's state and a
//! broken one rolled back (I-24), dead letters replayed after a fix (I-25),
//! and hostile modules contained while a healthy pipeline flows (I-13, I-23).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fogline_edge::local::events as local;
use fogline_edge::pipeline::events as pipeline;
use fogline_edge::telemetry::BACKLOG_RECORDS;
use fogline_tests::deploy::{series, uplink_toml, Cloud, Edge};
use fogline_tests::mqtt_raw::{Options, Outcome, PublishReport, Publisher, QoS};
use fogline_tests::{oracle, process};

use crate::{rt, tail};

/// An aggregator and an edge whose native endpoint feeds the pipelines in
/// `functions` (TOML: `[functions.*]` and `[[pipelines]]`).
struct Gateway {
    dir: tempfile::TempDir,
    cloud: Cloud,
    edge: Edge,
    port: u16,
    node: String,
}

impl Gateway {
    fn start(node: &str, functions: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        fogline_testkit::certs::dev_bundle(&certs, &[node]).unwrap();
        let cloud = Cloud::start(dir.path(), &certs).unwrap();
        let port = fogline_tests::free_tcp_port().unwrap();
        let body = Self::body(port, functions, &uplink_toml(node, &certs, cloud.quic_port));
        let edge = Edge::start(dir.path(), node, &body).unwrap();
        let g = Self {
            dir,
            cloud,
            edge,
            port,
            node: node.to_string(),
        };
        g.wait_listening();
        g
    }

    fn body(port: u16, functions: &str, uplink: &str) -> String {
        format!(
            "[broker]\nembedded = true\nlisten = \"127.0.0.1:{port}\"\n\
             [outbox]\ntick_interval = \"100ms\"\n{functions}\n{uplink}"
        )
    }

    /// Rewrite the edge's config with new `functions` and tell it (SIGHUP).
    fn reconfigure(&self, functions: &str) {
        let certs = self.dir.path().join("certs");
        let text = std::fs::read_to_string(&self.edge.config).unwrap();
        // Keep [node] and [metrics] (written by deploy::Edge), replace the rest.
        let head: String = text
            .split("[broker]")
            .next()
            .unwrap_or_default()
            .to_string();
        let body = Self::body(
            self.port,
            functions,
            &uplink_toml(&self.node, &certs, self.cloud.quic_port),
        );
        std::fs::write(&self.edge.config, format!("{head}{body}")).unwrap();
        let pid = self.edge.daemon.pid().unwrap();
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn wait_listening(&self) {
        let ok = process::wait_until(Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
        assert!(ok, "endpoint never listened:\n{}", self.logs());
    }

    fn logs(&self) -> String {
        // The edge's log without the per-connection lines (hostile clients
        // reconnect often), its tail.
        let edge: String = self
            .edge
            .daemon
            .log_text()
            .lines()
            .filter(|l| {
                !l.contains("MQTT client connected") && !l.contains("MQTT client disconnected")
            })
            .collect::<Vec<_>>()
            .join("\n");
        format!(
            "--- edge ---\n{}\n--- cloud ---\n{}",
            tail(&edge, 80),
            tail(&self.cloud.daemon.log_text(), 20)
        )
    }

    /// The function `owner`'s status (`/status` → `functions`).
    fn function(&self, owner: &str) -> Option<serde_json::Value> {
        let s = self.edge.status()?;
        s["functions"]
            .as_array()?
            .iter()
            .find(|f| f["owner"] == owner)
            .cloned()
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        let config = self.edge.config.to_string_lossy().into_owned();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", &config]);
        process::run("fogline-edge", &all).unwrap()
    }
}

/// A sequential QoS 1 publisher with a persistent session (its resends after
/// a cut are recognised exactly, I-5).
fn publisher(g: &Gateway, client: &str, window: usize) -> Publisher {
    let mut p = Publisher::new(Options::new(g.addr(), client), QoS::AtLeastOnce);
    p.options.clean_start = false;
    p.options.session_expiry_secs = Some(3600);
    p.window = window;
    p.deadline = Duration::from_secs(180);
    p
}

fn publish(p: Publisher, msgs: Vec<(String, Bytes)>) -> PublishReport {
    let report = rt().block_on(p.run(&msgs)).unwrap();
    assert_eq!(report.outcome, Outcome::Complete);
    report.ensure_all_safe().unwrap();
    report
}

/// `n` readings `{"v": i}` from `first`, on 8 sensors; and per stream the
/// count and sum a window function must account for.
fn readings(
    first: usize,
    n: usize,
    expected: &mut BTreeMap<String, (u64, f64)>,
) -> Vec<(String, Bytes)> {
    (first..first + n)
        .map(|i| {
            let stream = format!("sensors/s{}", i % 8);
            let e = expected.entry(stream.clone()).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += i as f64;
            (stream, Bytes::from(format!(r#"{{"v":{i}}}"#)))
        })
        .collect()
}

/// Waits until the store's windows account for every reading (or time runs
/// out), then a little longer so late duplicates would show.
fn settle_windows(
    g: &Gateway,
    suffix: &str,
    expected: &BTreeMap<String, (u64, f64)>,
) -> oracle::WindowVerdict {
    process::wait_until(Duration::from_secs(60), || {
        oracle::read_store(&g.cloud.store)
            .map(|r| oracle::judge_windows(&r, suffix, expected).is_exact())
            .unwrap_or(false)
    });
    std::thread::sleep(Duration::from_millis(700));
    oracle::judge_windows(
        &oracle::read_store(&g.cloud.store).unwrap(),
        suffix,
        expected,
    )
}

fn window_avg_toml(window_ms: u64, output_stream: Option<&str>, probation: u32) -> String {
    format!(
        "[functions.avg]\nmodule = \"{m}\"\nprobation_batches = {probation}\n\
         config = {{ field = \"v\", window_ms = {window_ms}{out} }}\n\
         [[pipelines]]\nname = \"avg\"\ntopics = [\"sensors/#\"]\nfunctions = [\"avg\"]\n",
        m = fogline_modules::window_avg().display(),
        out = output_stream
            .map(|s| format!(", output_stream = \"{s}\""))
            .unwrap_or_default()
    )
}

/// I-22: readings with known values, every one PUBACKed; the edge killed
/// with SIGKILL three times mid-window and stopped once with SIGTERM while
/// they flow. Every acknowledged reading is counted in exactly one window
/// at the aggregator: the counts and the sums per sensor match, and no
/// window is emitted twice.
#[test]
fn window_state_survives_kill9_and_sigterm_and_counts_each_acknowledged_reading_once() {
    let mut g = Gateway::start("gw-windows", &window_avg_toml(300, None, 10));
    const N: usize = 24_000;
    let mut expected = BTreeMap::new();
    let msgs = readings(0, N, &mut expected);
    let p = publisher(&g, "windows", 200);
    let progress = p.progress.clone();
    let handle = std::thread::spawn(move || publish(p, msgs));
    let reached = |frac: f64| {
        process::wait_until(Duration::from_secs(90), || {
            progress.load(Ordering::Acquire) >= (frac * N as f64) as usize
        })
    };
    for frac in [0.2, 0.4, 0.6] {
        assert!(
            reached(frac),
            "publisher stalled before {frac}:\n{}",
            g.logs()
        );
        g.edge.daemon.kill9();
        std::thread::sleep(Duration::from_millis(200));
        g.edge.daemon.restart().unwrap();
    }
    assert!(reached(0.8), "publisher stalled before 80%:\n{}", g.logs());
    g.edge.daemon.terminate().unwrap();
    assert!(
        g.edge.daemon.wait_exit(Duration::from_secs(20)).is_some(),
        "SIGTERM did not stop the edge:\n{}",
        g.logs()
    );
    g.edge.daemon.restart().unwrap();
    let report = handle.join().unwrap();
    // (Cuts close together may cost the publisher one reconnect.)
    assert!(
        report.reconnects + report.failed_connects >= 2,
        "the publisher saw the cuts: {} reconnects, {} failed connects",
        report.reconnects,
        report.failed_connects
    );

    let v = settle_windows(&g, "/avg", &expected);
    assert!(v.is_exact(), "{}\n{}", v.summary(), g.logs());
}

fn status_says(g: &Gateway, what: &str, ready: impl Fn(&serde_json::Value) -> bool) {
    let ok = process::wait_until(Duration::from_secs(60), || {
        g.function("avg/avg").is_some_and(|f| ready(&f))
    });
    assert!(
        ok,
        "status never showed {what}: {:?}\n{}",
        g.function("avg/avg"),
        g.logs()
    );
}

/// I-24: a new version (here: the same module with a new config) takes
/// over on a running daemon after its probation, from the running
/// version's state — windows open at the swap are closed by the new version,
/// none is lost or emitted twice. A version that fails on probation is
/// rolled back (logged, counted, shown in `status`) and the running version
/// with its state goes on; one that fails `init` likewise.
#[test]
fn a_new_version_takes_over_with_the_state_and_a_broken_one_is_rolled_back() {
    let g = Gateway::start("gw-swap", &window_avg_toml(400, Some("stats/v1"), 3));
    let mut expected = BTreeMap::new();
    let mut first = 0;
    let mut round = |g: &Gateway, n: usize, expected: &mut BTreeMap<String, (u64, f64)>| {
        let msgs = readings(first, n, expected);
        first += n;
        // Small windows: several batches (commits) per round.
        let p = publisher(g, "swap", 50);
        publish(p, msgs);
    };
    round(&g, 3000, &mut expected);
    // The first version emitted windows of its own...
    let emitted = |stream: &str| {
        oracle::read_store(&g.cloud.store)
            .unwrap_or_default()
            .iter()
            .any(|r| r.stream == stream)
    };
    assert!(
        process::wait_until(Duration::from_secs(30), || emitted("stats/v1")),
        "{}",
        g.logs()
    );
    // ...and has windows open when the new one arrives.
    round(&g, 1500, &mut expected);
    g.reconfigure(&window_avg_toml(400, Some("stats/v2"), 3));
    status_says(&g, "the new version on probation", |f| {
        !f["candidate"].is_null()
    });
    round(&g, 3000, &mut expected);
    status_says(&g, "the promotion", |f| {
        f["last_swap"]["outcome"] == "promoted" && f["candidate"].is_null()
    });
    round(&g, 2000, &mut expected);

    // A build that fails every batch: rolled back on its first one.
    let broken = format!(
        "[functions.avg]\nmodule = \"{}\"\nprobation_batches = 3\nconfig = {{ mode = \"fail\" }}\n\
         [[pipelines]]\nname = \"avg\"\ntopics = [\"sensors/#\"]\nfunctions = [\"avg\"]\n",
        fogline_modules::hostile().display()
    );
    g.reconfigure(&broken);
    status_says(&g, "the broken version on probation", |f| {
        !f["candidate"].is_null()
    });
    round(&g, 2000, &mut expected);
    status_says(&g, "the rollback", |f| {
        f["last_swap"]["outcome"] == "rolled_back"
            && f["last_swap"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("failing the batch"))
    });
    // One whose init fails: rolled back at once.
    let no_init = broken.replace("mode = \"fail\"", "mode = \"init-trap\"");
    g.reconfigure(&no_init);
    status_says(&g, "the init rollback", |f| {
        f["last_swap"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("panicking in init"))
    });
    round(&g, 2000, &mut expected);

    let v = settle_windows(&g, "", &expected);
    assert!(v.is_exact(), "{}\n{}", v.summary(), g.logs());
    let streams: BTreeSet<String> = oracle::read_store(&g.cloud.store)
        .unwrap()
        .into_iter()
        .map(|r| r.stream)
        .collect();
    assert_eq!(
        streams,
        BTreeSet::from(["stats/v1".to_string(), "stats/v2".to_string()]),
        "both versions emitted, nothing else did"
    );
    let metrics = (
        g.edge.metric(pipeline::SWAPS_TOTAL),
        g.edge.metric(&series(
            pipeline::SWAPS_TOTAL,
            &[("function", "avg/avg"), ("outcome", "rolled_back")],
        )),
    );
    assert!(metrics.0 >= 3.0, "{metrics:?}");
}

/// I-25: what a function refused is listed with its reason, and after the
/// function is fixed a replay runs it through the current version: each
/// refused reading reaches the aggregator exactly once, and the dead-letter
/// table is empty again.
#[test]
fn dead_letters_are_listed_and_replayed_once_the_function_is_fixed() {
    let threshold = |field: &str| {
        format!(
            "[functions.t]\nmodule = \"{}\"\nprobation_batches = 1\nconfig = {{ field = \"{field}\", above = 0.0 }}\n\
             [[pipelines]]\nname = \"p\"\ntopics = [\"sensors/#\"]\nfunctions = [\"t\"]\n",
            fogline_modules::threshold().display()
        )
    };
    let g = Gateway::start("gw-replay", &threshold("t"));
    let reading = |i: usize| {
        (
            format!("sensors/s{}", i % 4),
            Bytes::from(format!(r#"{{"id":"r{i}","t2":{}}}"#, i + 1)),
        )
    };
    publish(publisher(&g, "replay", 50), (0..100).map(reading).collect());

    let listed = g.cli(&["dead-letters", "list", "--json", "--limit", "1000"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(rows.len(), 100, "{}", g.logs());
    assert!(rows.iter().all(|r| r["reason"] == "rejected"
        && r["function"] == "t"
        && r["error"].as_str().unwrap().contains("field `t` missing")));
    let text = g.cli(&["dead-letters", "list", "--limit", "2"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("p/t (rejected input)") && text.contains("field `t` missing"),
        "{text}"
    );

    // The fix: read `t2`. Two more readings drive its probation.
    g.reconfigure(&threshold("t2"));
    let ok = process::wait_until(Duration::from_secs(30), || {
        g.function("p/t").is_some_and(|f| !f["candidate"].is_null())
    });
    assert!(ok, "{}", g.logs());
    publish(
        publisher(&g, "replay", 50),
        (100..102).map(reading).collect(),
    );
    let ok = process::wait_until(Duration::from_secs(30), || {
        g.function("p/t")
            .is_some_and(|f| f["last_swap"]["outcome"] == "promoted")
    });
    assert!(ok, "{:?}\n{}", g.function("p/t"), g.logs());

    let replay = g.cli(&["dead-letters", "replay", "--all"]);
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let said = String::from_utf8_lossy(&replay.stdout);
    // The two readings published while the fix was on probation were
    // decided by the running version: refused too.
    assert!(said.contains("102 dead letter(s) marked"), "{said}");

    let ids = || -> Vec<String> {
        oracle::read_store(&g.cloud.store)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|r| r.payload["id"].as_str().map(String::from))
            .collect()
    };
    process::wait_until(Duration::from_secs(30), || ids().len() >= 102);
    std::thread::sleep(Duration::from_millis(500));
    let mut got = ids();
    got.sort();
    let mut want: Vec<String> = (0..102).map(|i| format!("r{i}")).collect();
    want.sort();
    assert_eq!(got, want, "each once\n{}", g.logs());
    let left = g.cli(&["dead-letters", "list"]);
    assert!(String::from_utf8_lossy(&left.stdout).contains("no dead letters"));
}

/// The hostile suite on one daemon: every misbehaviour in its own pipeline
/// beside a healthy one. The daemon starts (a function whose `init` traps or
/// never returns is suspended, not fatal), keeps running, keeps its memory
/// bounded, and the healthy pipeline's readings arrive exactly. (Throughput
/// under each case is measured by `cargo bench -p fogline-edge --bench hostile`.)
#[test]
fn hostile_functions_are_contained_while_a_healthy_pipeline_flows() {
    let cases: &[(&str, &str)] = &[
        ("spin", ""),
        ("sleep", ""),
        ("alloc", ""),
        ("resources", ""),
        ("trap", ""),
        ("log-flood", ", count = 5000"),
        ("print", ""),
        ("alias", ", count = 100000, size = 1048576"),
        ("big", ", size = 2000000"),
        ("long-stream", ", size = 5000"),
        ("state-flood", ", count = 1000, size = 100000"),
        ("tick-trap", ""),
        ("init-trap", ""),
        ("init-spin", ""),
    ];
    let mut toml = format!(
        "[functions.hot]\nmodule = \"{}\"\nconfig = {{ field = \"temp\", above = 30.0 }}\n\
         [[pipelines]]\nname = \"healthy\"\ntopics = [\"sensors/+/reading\"]\nfunctions = [\"hot\"]\n",
        fogline_modules::threshold().display()
    );
    for (mode, extra) in cases {
        toml += &format!(
            "[functions.h-{mode}]\nmodule = \"{}\"\ntimeout = \"100ms\"\ninit_timeout = \"300ms\"\n\
             memory_mib = 32\nconfig = {{ mode = \"{mode}\"{extra} }}\n\
             [[pipelines]]\nname = \"{mode}\"\ntopics = [\"hostile/{mode}\"]\nfunctions = [\"h-{mode}\"]\n",
            fogline_modules::hostile().display()
        );
    }
    let mut g = Gateway::start("gw-hostile", &toml);

    // Hostile traffic: a `boom` to every hostile topic every 20 ms.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hostile = {
        let stop = stop.clone();
        let addr = g.addr();
        let topics: Vec<String> = cases.iter().map(|(m, _)| format!("hostile/{m}")).collect();
        std::thread::spawn(move || {
            let mut sent = 0;
            while !stop.load(Ordering::Acquire) {
                let msgs: Vec<(String, Bytes)> = topics
                    .iter()
                    .map(|t| (t.clone(), Bytes::from_static(b"boom")))
                    .collect();
                let mut p = Publisher::new(Options::new(addr.clone(), "hostile"), QoS::AtLeastOnce);
                p.deadline = Duration::from_secs(30);
                if let Ok(r) = rt().block_on(p.run(&msgs)) {
                    sent += r.safe_count();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            sent
        })
    };

    // Healthy readings: the usual sensors, threshold at 30.
    const SENSORS: usize = 4;
    const PER: usize = 1500;
    let mut msgs = Vec::new();
    let mut expected = BTreeSet::new();
    for n in 0..PER {
        for s in 0..SENSORS {
            msgs.push((
                fogline_tests::sensors::topic(s),
                Bytes::from(fogline_tests::sensors::payload(s, n, 1_764_000_000_000)),
            ));
            if fogline_tests::sensors::temperature(s, n) > 30.0 {
                expected.insert(fogline_tests::sensors::reading_id(s, n));
            }
        }
    }
    let mut healthy = publisher(&g, "healthy", 100);
    healthy.deadline = Duration::from_secs(90);
    let report = rt().block_on(healthy.run(&msgs)).unwrap();
    stop.store(true, Ordering::Release);
    assert!(
        report.ensure_all_safe().is_ok(),
        "{:?}\n{}",
        report.ensure_all_safe(),
        g.logs()
    );
    let hostile_sent = hostile.join().unwrap();
    assert!(hostile_sent > 0);
    assert!(g.edge.daemon.is_running(), "the edge died:\n{}", g.logs());

    let mut verdict = None;
    process::wait_until(Duration::from_secs(60), || {
        let v = oracle::judge(
            &oracle::read_store(&g.cloud.store)
                .unwrap_or_default()
                .into_iter()
                .filter(|r| r.stream.starts_with("sensors/"))
                .collect::<Vec<_>>(),
            &expected,
        );
        let done = v.received >= expected.len();
        verdict = Some(v);
        done
    });
    let v = verdict.unwrap();
    assert!(v.is_exact(), "{}\n{}", v.summary(), g.logs());

    // Each hostile function shows what happened to it: a failure in
    // `status`, or (for outputs refused one by one) dead letters.
    let status = g.edge.status().unwrap();
    for (mode, _) in cases {
        let owner = format!("{mode}/h-{mode}");
        let f = status["functions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["owner"] == owner.as_str())
            .unwrap_or_else(|| panic!("{owner} missing from status"));
        match *mode {
            "log-flood" | "print" => {}
            "big" | "long-stream" => {
                let out = g.cli(&[
                    "dead-letters",
                    "list",
                    "--json",
                    "--function",
                    &format!("h-{mode}"),
                ]);
                let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
                assert!(
                    rows.iter().any(|r| r["reason"] == "invalid_output"),
                    "{owner}: {rows:?}"
                );
            }
            _ => assert!(
                !f["last_error"].is_null() || f["breaker_opened"].as_u64() > Some(0),
                "{owner}: {f}"
            ),
        }
    }
    // Memory stayed bounded: 13 hostile instances of at most 32 MiB each
    // were never all alive at once, and what they grabbed was returned.
    let pid = g.edge.daemon.pid().unwrap();
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(rss_kib < 300 * 1024, "edge RSS {rss_kib} KiB");
    g.edge.daemon.kill9();
}

/// Issue 14 §1, as a new user runs it: `module new` → `module build` →
/// `module test` → `module deploy` onto a running daemon. A build that works
/// takes over after its probation (the command follows the swap on
/// `/status` and says so); one whose `init` fails is rolled back at once,
/// the command says why, exits 1 and puts the previous file back.
#[test]
fn module_deploy_swaps_a_new_build_in_and_reports_a_rollback_with_its_reason() {
    let work = tempfile::tempdir().unwrap();
    let module = work.path().join("t.wasm");
    std::fs::copy(fogline_modules::threshold(), &module).unwrap();
    let g = Gateway::start(
        "gw-deploy",
        &format!(
            "[functions.t]\nmodule = \"{}\"\nprobation_batches = 1\nconfig = {{ field = \"v\", above = -1.0 }}\n\
             [[pipelines]]\nname = \"p\"\ntopics = [\"sensors/#\"]\nfunctions = [\"t\"]\n",
            module.display()
        ),
    );
    let edge = process::binary("fogline-edge").unwrap();
    let building = |args: &[&str], dir: &std::path::Path| {
        let mut c = std::process::Command::new(&edge);
        c.args(args).current_dir(dir).env(
            "CARGO_TARGET_DIR",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/module-workflow"),
        );
        for var in [
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_MAKEFLAGS",
            "MAKEFLAGS",
        ] {
            c.env_remove(var);
        }
        c
    };
    let out = building(
        &["module", "new", "my-threshold", "--template", "filter"],
        work.path(),
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let krate = work.path().join("my-threshold");
    for args in [
        &["module", "build"][..],
        &[
            "module",
            "test",
            "--input",
            "samples.jsonl",
            "--expect",
            "expected.jsonl",
        ][..],
    ] {
        let out = building(args, &krate).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Deploy while readings flow (the probation needs a good batch).
    let config = g.edge.config.to_string_lossy().into_owned();
    let deploy = building(
        &[
            "module",
            "deploy",
            "--config",
            &config,
            "--function",
            "t",
            "--wait",
            "60s",
        ],
        &krate,
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let flowing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let feeder = {
        let (flowing, addr) = (flowing.clone(), g.addr());
        std::thread::spawn(move || {
            let mut sent = 0;
            while flowing.load(Ordering::Relaxed) && sent < 200 {
                let p = Publisher::new(Options::new(addr.clone(), "deploy-feed"), QoS::AtLeastOnce);
                let msgs = vec![(
                    "sensors/a".to_string(),
                    Bytes::from(format!(r#"{{"v":{sent}}}"#)),
                )];
                let _ = rt().block_on(p.run(&msgs));
                sent += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let out = deploy.wait_with_output().unwrap();
    flowing.store(false, Ordering::Relaxed);
    feeder.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", g.logs());
    assert!(stderr.contains("Deployed: `t` runs gen"), "{stderr}");
    let built = std::fs::read(&module).unwrap();
    assert_ne!(built, std::fs::read(fogline_modules::threshold()).unwrap());

    // A build whose init refuses this function's config: rolled back.
    let wasm = fogline_modules::window_avg().display().to_string();
    let out = building(
        &[
            "module",
            "deploy",
            "--wasm",
            &wasm,
            "--config",
            &config,
            "--function",
            "t",
        ],
        work.path(),
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}\n{}", g.logs());
    assert!(
        stderr.contains("ROLLED BACK on p/t") && stderr.contains("window_ms"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&module).unwrap(),
        built,
        "the previous build is back"
    );
    let f = g.function("p/t").unwrap();
    assert!(f["candidate"].is_null(), "{f}");
    assert_eq!(f["last_swap"]["outcome"], "rolled_back", "{f}");
}

/// Issue 14 §2 (local actions, immediate): with the uplink down, a reading
/// that crosses the alert's threshold reaches the actuator subscribed on the
/// gateway's own endpoint as a command, in milliseconds; readings still go
/// to the outbox. A subscription outside `[[broker.local_topics]]` is
/// refused with a reason.
#[test]
fn an_actuator_on_the_gateway_gets_the_alert_while_the_uplink_is_down() {
    use fogline_tests::mqtt_raw::{Connection, Incoming, Version};
    let mut g = Gateway::start("gw-local", &alert_pipeline("local = \"immediate\""));
    g.cloud.daemon.kill9();
    rt().block_on(async {
        let opts = Options::new(g.addr(), "fan-controller").with_version(Version::V5);
        let (mut fan, _) = Connection::connect(&opts).await.unwrap();
        fan.subscribe(
            1,
            &[
                ("actuators/#", QoS::AtMostOnce),
                ("machines/#", QoS::AtMostOnce),
            ],
        )
        .unwrap();
        match fan
            .next_packet_within(Duration::from_secs(5))
            .await
            .unwrap()
        {
            // Granted at QoS 0 (immediate is at most once); sensors' own topics are not local.
            Some(Incoming::SubAck { codes, .. }) => assert_eq!(codes, vec![0x00, 0x87]),
            other => panic!("expected SUBACK, got {other:?}"),
        }
        let (mut sensor, _) =
            Connection::connect(&Options::new(g.addr(), "m1").with_version(Version::V5))
                .await
                .unwrap();
        let mut commands = Vec::new();
        for (i, temp) in [70.0, 79.0, 85.0, 86.0, 74.0].into_iter().enumerate() {
            let sent = std::time::Instant::now();
            sensor
                .publish(
                    "machines/m1",
                    format!(r#"{{"temp":{temp}}}"#).into_bytes(),
                    QoS::AtLeastOnce,
                    i as u16 + 1,
                    false,
                )
                .unwrap();
            sensor.flush().await.unwrap();
            // The command, if this reading crosses: on the endpoint, not via the cloud.
            if let Some(Incoming::Publish {
                topic,
                payload,
                qos,
                ..
            }) = fan
                .next_packet_within(Duration::from_millis(500))
                .await
                .unwrap()
            {
                let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                commands.push((
                    topic,
                    v["command"].as_str().unwrap_or("").to_string(),
                    temp,
                    sent.elapsed(),
                ));
                assert_eq!(qos, QoS::AtMostOnce);
            }
        }
        let got: Vec<(&str, &str, f64)> = commands
            .iter()
            .map(|(t, c, v, _)| (t.as_str(), c.as_str(), *v))
            .collect();
        assert_eq!(
            got,
            vec![
                ("actuators/machines/m1/fan", "on", 85.0),
                ("actuators/machines/m1/fan", "off", 74.0)
            ],
            "{}",
            g.logs()
        );
        for (_, _, _, took) in &commands {
            assert!(*took < Duration::from_millis(500), "{took:?}");
        }
    });
    // 5 readings and 2 commands wait in the outbox for the uplink.
    let backlog = || g.edge.metric(BACKLOG_RECORDS);
    assert!(
        process::wait_until(Duration::from_secs(15), || backlog() >= 7.0),
        "backlog {}\n{}",
        backlog(),
        g.logs()
    );
}

/// The `alert` example as `overheat` in a `machines` pipeline whose
/// commands go to local subscribers of `actuators/#`; `local` is the
/// pipeline's extra keys.
fn alert_pipeline(local: &str) -> String {
    format!(
        "[[broker.local_topics]]\nfilter = \"actuators/#\"\nsubscribers = [\"*\"]\n\
         [functions.overheat]\nmodule = \"{}\"\n\
         config = {{ field = \"temp\", above = 80.0, clear_below = 75.0, command_stream = \"actuators/{{stream}}/fan\" }}\n\
         [[pipelines]]\nname = \"machines\"\ntopics = [\"machines/#\"]\nfunctions = [\"overheat\"]\n{local}\n",
        fogline_modules::alert().display()
    )
}

/// A QoS 2 receiver as MQTT 5 §4.3.3 has it: a PUBLISH whose packet id is
/// awaiting PUBREL is the same message again. Returns each message the
/// application would see, once.
struct ExactlyOnceReceiver {
    awaiting_pubrel: BTreeSet<u16>,
    got: Vec<(String, String)>,
}

impl ExactlyOnceReceiver {
    /// Reads for `window`, answering the broker, and returns how many new
    /// messages arrived.
    async fn run(
        &mut self,
        c: &mut fogline_tests::mqtt_raw::Connection,
        window: Duration,
    ) -> usize {
        use fogline_tests::mqtt_raw::Incoming;
        let before = self.got.len();
        let until = std::time::Instant::now() + window;
        while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
            let Ok(Some(p)) = c.next_packet_within(left).await else {
                break;
            };
            match p {
                Incoming::Publish {
                    topic,
                    payload,
                    qos,
                    pkid,
                    ..
                } => {
                    assert_eq!(qos, QoS::ExactlyOnce, "granted QoS 2, delivered at {qos:?}");
                    if self.awaiting_pubrel.insert(pkid) {
                        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                        self.got
                            .push((topic, v["command"].as_str().unwrap_or("").to_string()));
                    }
                    c.pubrec(pkid).unwrap();
                }
                Incoming::PubRel { pkid, .. } => {
                    self.awaiting_pubrel.remove(&pkid);
                    c.pubcomp(pkid).unwrap();
                }
                _ => {}
            }
            c.flush().await.unwrap();
        }
        self.got.len() - before
    }
}

/// Durable local delivery (`local = "durable"`): the actuator's command is
/// written with the commit that made it and delivered after it at QoS 2.
/// The edge aborts between that commit and the delivery (fault point
/// `local::after_commit_before_delivery`), with the uplink down; after the
/// restart the actuator, reconnecting to its session, gets the command
/// exactly once, and a later kill -9 redelivers nothing it completed.
/// Clause I-40.
#[test]
fn i40_a_durable_command_survives_a_crash_between_commit_and_delivery_and_arrives_once() {
    use fogline_tests::mqtt_raw::{Connection, Incoming, Version};
    let mut g = Gateway::start("gw-durable", &alert_pipeline("local = \"durable\""));
    g.cloud.daemon.kill9();
    let addr = g.addr();
    let fan_opts = || {
        let mut o = Options::new(addr.clone(), "fan-controller").with_version(Version::V5);
        o.clean_start = false;
        o.session_expiry_secs = Some(3600);
        o
    };
    let sensor_opts = || Options::new(addr.clone(), "m1").with_version(Version::V5);
    let mut fan_rx = ExactlyOnceReceiver {
        awaiting_pubrel: BTreeSet::new(),
        got: Vec::new(),
    };
    // Subscribe at QoS 2, then an orderly stop keeps the subscription.
    rt().block_on(async {
        let (mut fan, _) = Connection::connect(&fan_opts()).await.unwrap();
        fan.subscribe(1, &[("actuators/#", QoS::ExactlyOnce)])
            .unwrap();
        fan.flush().await.unwrap();
        match fan
            .next_packet_within(Duration::from_secs(5))
            .await
            .unwrap()
        {
            Some(Incoming::SubAck { codes, .. }) => assert_eq!(codes, vec![0x02]),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    });
    g.edge.daemon.terminate().unwrap();
    assert!(g.edge.daemon.wait_exit(Duration::from_secs(30)).is_some());
    g.edge
        .daemon
        .restart_with_env(&[("FAILPOINTS", "local::after_commit_before_delivery=return")])
        .unwrap();
    g.wait_listening();
    rt().block_on(async {
        let (mut fan, ack) = Connection::connect(&fan_opts()).await.unwrap();
        assert!(ack.session_present, "{}", g.logs());
        let (mut sensor, _) = Connection::connect(&sensor_opts()).await.unwrap();
        sensor
            .publish(
                "machines/m1",
                br#"{"temp":70.0}"#.to_vec(),
                QoS::AtLeastOnce,
                1,
                false,
            )
            .unwrap();
        sensor
            .publish(
                "machines/m1",
                br#"{"temp":85.0}"#.to_vec(),
                QoS::AtLeastOnce,
                2,
                false,
            )
            .unwrap();
        sensor.flush().await.unwrap();
        // The command's commit aborts the edge before anyone is told.
        assert_eq!(fan_rx.run(&mut fan, Duration::from_millis(1500)).await, 0);
    });
    let status = g.edge.daemon.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| !s.success()),
        "the edge did not abort at local::after_commit_before_delivery:\n{}",
        g.logs()
    );
    g.edge.daemon.restart_with_env(&[]).unwrap();
    g.wait_listening();
    rt().block_on(async {
        let (mut fan, ack) = Connection::connect(&fan_opts()).await.unwrap();
        assert!(ack.session_present);
        assert_eq!(
            fan_rx.run(&mut fan, Duration::from_secs(3)).await,
            1,
            "{}",
            g.logs()
        );
        // The sensor was not acknowledged: it sends 85 again; the alert's
        // state was committed with the command, so no second "on".
        let (mut sensor, _) = Connection::connect(&sensor_opts()).await.unwrap();
        sensor
            .publish(
                "machines/m1",
                br#"{"temp":85.0}"#.to_vec(),
                QoS::AtLeastOnce,
                2,
                true,
            )
            .unwrap();
        sensor
            .publish(
                "machines/m1",
                br#"{"temp":74.0}"#.to_vec(),
                QoS::AtLeastOnce,
                3,
                false,
            )
            .unwrap();
        sensor.flush().await.unwrap();
        assert_eq!(fan_rx.run(&mut fan, Duration::from_secs(2)).await, 1);
    });
    // Completed deliveries are not delivered again after a crash.
    std::thread::sleep(Duration::from_millis(500));
    g.edge.daemon.kill9();
    g.edge.daemon.restart().unwrap();
    g.wait_listening();
    rt().block_on(async {
        let (mut fan, _) = Connection::connect(&fan_opts()).await.unwrap();
        assert_eq!(fan_rx.run(&mut fan, Duration::from_secs(2)).await, 0);
    });
    assert_eq!(
        fan_rx.got,
        vec![
            ("actuators/machines/m1/fan".to_string(), "on".to_string()),
            ("actuators/machines/m1/fan".to_string(), "off".to_string())
        ],
        "{}",
        g.logs()
    );
    assert!(
        fan_rx.awaiting_pubrel.is_empty(),
        "every QoS 2 exchange completed"
    );
}

/// A durable local subscriber that stops reading (and so acknowledging)
/// holds nothing back: the sensor's 6,000 readings are all acknowledged, a
/// healthy subscriber gets every output once and in order, and when the
/// stuck one reads again it gets all 6,000 too — 256 in flight, 4,096 pending, then
/// the rest read back from the outbox — in order, none lost. Clauses I-39
/// (nothing waits for a subscriber) and I-40.
#[test]
fn i40_a_stuck_durable_subscriber_delays_nothing_and_loses_nothing() {
    use fogline_tests::mqtt_raw::{Connection, Incoming, Version};
    const N: usize = 6000;
    let g = Gateway::start(
        "gw-stuck",
        &format!(
            "[[broker.local_topics]]\nfilter = \"local/#\"\nsubscribers = [\"*\"]\n\
             [functions.map]\nmodule = \"{}\"\nconfig = {{ field = \"temp\", output_stream = \"local/{{stream}}\" }}\n\
             [[pipelines]]\nname = \"machines\"\ntopics = [\"sensors/#\"]\nfunctions = [\"map\"]\nlocal = \"durable\"\n",
            fogline_modules::scale().display()
        ),
    );
    let addr = g.addr();
    rt().block_on(async {
        let subscriber = |id: &str| {
            let mut o = Options::new(addr.clone(), id).with_version(Version::V5);
            o.clean_start = false;
            o.session_expiry_secs = Some(600);
            o
        };
        let mut subs = Vec::new();
        for id in ["healthy", "stuck"] {
            let (mut s, _) = Connection::connect(&subscriber(id)).await.unwrap();
            s.subscribe(1, &[("local/#", QoS::AtLeastOnce)]).unwrap();
            s.flush().await.unwrap();
            match s.next_packet_within(Duration::from_secs(5)).await.unwrap() {
                Some(Incoming::SubAck { codes, .. }) => assert_eq!(codes, vec![0x01]),
                other => panic!("expected SUBACK, got {other:?}"),
            }
            subs.push(s);
        }
        let mut stuck = subs.pop().unwrap();
        let mut healthy = subs.pop().unwrap();
        // Reads every output, acknowledges it, returns the sequence numbers.
        async fn drain(c: &mut Connection, n: usize, limit: Duration) -> Vec<u64> {
            let mut got = Vec::new();
            let until = std::time::Instant::now() + limit;
            while got.len() < n {
                let Some(left) = until.checked_duration_since(std::time::Instant::now()) else {
                    break;
                };
                match c.next_packet_within(left).await.unwrap() {
                    Some(Incoming::Publish { payload, pkid, .. }) => {
                        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                        got.push(v["i"].as_u64().unwrap());
                        c.puback(pkid).unwrap();
                        c.flush().await.unwrap();
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            got
        }
        let healthy_task = tokio::spawn(async move {
            let got = drain(&mut healthy, N, Duration::from_secs(60)).await;
            (healthy, got)
        });
        let (mut sensor, _) =
            Connection::connect(&Options::new(addr.clone(), "m1").with_version(Version::V5))
                .await
                .unwrap();
        let mut acked = 0usize;
        for i in 0..N {
            let payload = format!(r#"{{"temp":{},"i":{i}}}"#, i % 50);
            sensor
                .publish(
                    "sensors/m1",
                    payload.into_bytes(),
                    QoS::AtLeastOnce,
                    (i % 60_000) as u16 + 1,
                    false,
                )
                .unwrap();
            sensor.flush().await.unwrap();
            // At most 100 unacknowledged (well under the Receive Maximum).
            while i + 1 - acked > 100 {
                match sensor
                    .next_packet_within(Duration::from_secs(10))
                    .await
                    .unwrap()
                {
                    Some(Incoming::PubAck { .. }) => acked += 1,
                    Some(_) => {}
                    None => panic!("no PUBACK for 10 s with a subscriber stuck"),
                }
            }
        }
        while acked < N {
            match sensor
                .next_packet_within(Duration::from_secs(10))
                .await
                .unwrap()
            {
                Some(Incoming::PubAck { .. }) => acked += 1,
                Some(_) => {}
                None => panic!("only {acked} of {N} PUBACKs with a subscriber stuck"),
            }
        }
        let (_healthy, got) = healthy_task.await.unwrap();
        assert_eq!(
            got,
            (0..N as u64).collect::<Vec<_>>(),
            "healthy subscriber: once, in order"
        );
        // The stuck one reads again: everything, in order, nothing lost.
        let got = drain(&mut stuck, N, Duration::from_secs(60)).await;
        let mut seen = BTreeSet::new();
        let firsts: Vec<u64> = got.iter().copied().filter(|i| seen.insert(*i)).collect();
        assert_eq!(
            firsts,
            (0..N as u64).collect::<Vec<_>>(),
            "stuck subscriber: all, in order"
        );
    });
    let dropped = g.edge.metric(local::DROPPED_TOTAL);
    assert_eq!(dropped, 0.0, "{}", g.logs());
}

/// Signed modules (issue 14 §3): with `[modules] trusted_keys`, a gateway
/// runs a module only with a `<module>.sig` that a trusted fleet key made
/// for exactly its bytes, name and version (`fogline-cloud modules keygen`
/// and `publish`). `check` refuses, with the reason, a module signed by
/// another key, one changed after signing and one without a signature;
/// `module deploy` refuses such a build before touching the installed one;
/// and a running daemon told to reload onto a tampered module keeps the
/// version it runs, saying why.
#[test]
fn only_modules_signed_by_a_trusted_fleet_key_run_and_bad_signatures_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let cloud_bin = process::binary("fogline-cloud").unwrap();
    let edge_bin = process::binary("fogline-edge").unwrap();
    let run = |bin: &std::path::Path, args: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(args)
            .current_dir(work.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, trusted, err) = run(&cloud_bin, &["modules", "keygen", "--out", "fleet.key"]);
    assert!(ok, "{err}");
    assert!(
        trusted.starts_with("[modules]\ntrusted_keys = [\"ed25519:"),
        "{trusted}"
    );
    let (ok, _, err) = run(&cloud_bin, &["modules", "keygen", "--out", "fleet.key"]);
    assert!(!ok && err.contains("not overwritten"), "{err}");
    assert!(run(&cloud_bin, &["modules", "keygen", "--out", "rogue.key"]).0);
    let module = work.path().join("t.wasm");
    std::fs::copy(fogline_modules::threshold(), &module).unwrap();
    let publish = |file: &str, key: &str| {
        let (ok, _, err) = run(
            &cloud_bin,
            &[
                "modules",
                "publish",
                file,
                "--name",
                "threshold",
                "--version",
                "1.0.0",
                "--key",
                key,
            ],
        );
        assert!(ok, "{err}");
        assert!(err.contains("signed"), "{err}");
    };
    publish("t.wasm", "fleet.key");
    let trusted_keys = trusted.lines().nth(1).unwrap();
    let g = Gateway::start(
        "gw-signed",
        &format!(
            "[modules]\n{trusted_keys}\n\
             [functions.t]\nmodule = \"{}\"\nconfig = {{ field = \"v\", above = -1.0 }}\n\
             [[pipelines]]\nname = \"p\"\ntopics = [\"sensors/#\"]\nfunctions = [\"t\"]\n",
            module.display()
        ),
    );
    let config = g.edge.config.to_string_lossy().into_owned();
    let check = || run(&edge_bin, &["check", "--config", &config]);
    let (ok, _, err) = check();
    assert!(ok, "the signed module passes: {err}");

    // Signed by a key the gateway does not trust.
    let rogue = work.path().join("rogue.wasm");
    std::fs::copy(&module, &rogue).unwrap();
    publish("rogue.wasm", "rogue.key");
    std::fs::copy(
        work.path().join("rogue.wasm.sig"),
        work.path().join("t.wasm.sig"),
    )
    .unwrap();
    let (ok, _, err) = check();
    assert!(
        !ok && err.contains("not among the 1 trusted key(s)"),
        "{err}"
    );
    // Changed after signing.
    publish("t.wasm", "fleet.key");
    std::fs::copy(fogline_modules::scale(), &module).unwrap();
    let (ok, _, err) = check();
    assert!(
        !ok && err.contains("the file was changed after signing"),
        "{err}"
    );
    // No signature at all.
    std::fs::remove_file(work.path().join("t.wasm.sig")).unwrap();
    let (ok, _, err) = check();
    assert!(
        !ok && err.contains("sign it with `fogline-cloud modules publish`"),
        "{err}"
    );

    // The daemon, told to reload onto the unsigned module, keeps its own.
    g.reconfigure(&format!(
        "[modules]\n{trusted_keys}\n\
         [functions.t]\nmodule = \"{}\"\nconfig = {{ field = \"v\", above = -2.0 }}\n\
         [[pipelines]]\nname = \"p\"\ntopics = [\"sensors/#\"]\nfunctions = [\"t\"]\n",
        module.display()
    ));
    assert!(
        process::wait_until(Duration::from_secs(15), || g
            .edge
            .daemon
            .log_text()
            .contains("cannot be read")),
        "{}",
        g.logs()
    );
    let status = g.edge.status().unwrap();
    let f = &status["functions"][0];
    assert!(
        f["running"].as_bool() == Some(true) && f["candidate"].is_null(),
        "{status}"
    );

    // `module deploy` of a rogue-signed build: refused before installing.
    std::fs::copy(fogline_modules::threshold(), &module).unwrap();
    publish("t.wasm", "fleet.key");
    let before = std::fs::read(&module).unwrap();
    let (ok, _, err) = run(
        &edge_bin,
        &[
            "module",
            "deploy",
            "--config",
            &config,
            "--function",
            "t",
            "--wasm",
            "rogue.wasm",
        ],
    );
    assert!(
        !ok && err.contains("not among the 1 trusted key(s)"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&module).unwrap(),
        before,
        "the installed module is untouched"
    );
}

/// `cloud = false`: a pipeline whose outputs are for local subscribers
/// only. With the uplink down, the actuator gets every command, and nothing
/// of the pipeline waits in the outbox for the cloud.
#[test]
fn a_local_only_pipeline_serves_its_subscribers_and_uplinks_nothing() {
    use fogline_tests::mqtt_raw::{Connection, Incoming, Version};
    let g = Gateway::start(
        "gw-local-only",
        &alert_pipeline("local = \"durable\"\ncloud = false"),
    );
    let addr = g.addr();
    let got = rt().block_on(async {
        let (mut fan, _) =
            Connection::connect(&Options::new(addr.clone(), "fan").with_version(Version::V5))
                .await
                .unwrap();
        fan.subscribe(1, &[("actuators/#", QoS::AtLeastOnce)])
            .unwrap();
        fan.flush().await.unwrap();
        let _ = fan
            .next_packet_within(Duration::from_secs(5))
            .await
            .unwrap();
        let (mut sensor, _) =
            Connection::connect(&Options::new(addr.clone(), "m1").with_version(Version::V5))
                .await
                .unwrap();
        for (i, temp) in [70.0, 85.0, 74.0, 90.0].into_iter().enumerate() {
            sensor
                .publish(
                    "machines/m1",
                    format!(r#"{{"temp":{temp}}}"#).into_bytes(),
                    QoS::AtLeastOnce,
                    i as u16 + 1,
                    false,
                )
                .unwrap();
        }
        sensor.flush().await.unwrap();
        let mut got = Vec::new();
        while got.len() < 3 {
            match fan
                .next_packet_within(Duration::from_secs(5))
                .await
                .unwrap()
            {
                Some(Incoming::Publish { payload, pkid, .. }) => {
                    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                    got.push(v["command"].as_str().unwrap_or("").to_string());
                    fan.puback(pkid).unwrap();
                    fan.flush().await.unwrap();
                }
                Some(_) => {}
                None => break,
            }
        }
        got
    });
    assert_eq!(got, vec!["on", "off", "on"], "{}", g.logs());
    // The readings and commands reached no record: the cloud gets nothing
    // of this pipeline (the aggregator, running, has nothing to apply).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        g.edge.metric(pipeline::RECORDS_WRITTEN_TOTAL),
        0.0,
        "{}",
        g.logs()
    );
}
