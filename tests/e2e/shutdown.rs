//! Orderly shutdown and health, over real processes: `fogline-edge` with its
//! native MQTT endpoint, `fogline-cloud`, and the raw pipelined publisher
//! (persistent MQTT 5 session; resends what is unacknowledged with DUP=1
//! after every reconnect). A full disk is a small tmpfs this file mounts as
//! the edge's `data_dir` (needs root, as CI has) and grows again later.
//!
//! The oracle: every reading has a unique id; once the publisher has had a
//! PUBACK for every one of them, the aggregator's store must hold each
//! exactly once and nothing else (I-1: an ack only after the commit; I-5
//! resends recognised; I-10 applied once).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::tail;
use bytes::Bytes;
use fogline_tests::deploy::{uplink_toml, Cloud, Edge};
use fogline_tests::mqtt_raw::{Options, Outcome, PublishReport, Publisher, QoS, Version};
use fogline_tests::{oracle, process, sensors};

/// `[node] shutdown_timeout` of every edge here.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// What the process may take beyond `shutdown_timeout` to be gone.
const EXIT_MARGIN: Duration = Duration::from_secs(1);
/// The log line the worker writes for each failed commit.
const COMMIT_FAILED: &str = "Outbox commit failed";
const STARTED: &str = "Fogline edge daemon started.";
/// A disk that fills to the last byte (no outbox reserve, I-28): what an
/// operator who turned the reserve off gets.
const NO_RESERVE: &str = "[outbox]\nreserve_mib = 0\n";

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// I-16, I-17, I-1: the disk fills under QoS 1 traffic; `/healthz` turns
/// 503 naming the wedged pipeline while the daemon keeps running and
/// retrying; SIGTERM ends it within `shutdown_timeout` although the commit
/// it holds cannot finish, leaving an outbox with exactly the readings it
/// acknowledged; after the disk grows and the edge restarts, the
/// publisher's resends complete and every acknowledged reading is stored
/// exactly once, nothing unpublished is stored, and `/healthz` is 200 again.
#[test]
fn sigterm_with_a_full_disk_exits_in_time_and_loses_no_acknowledged_reading() {
    const N: usize = 30_000;
    let dir = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&dir.path().join("disk"), "1m");
    // The aggregator starts only after the restart, so nothing drains the
    // outbox while the disk fills.
    let (mut cloud, mqtt_port, mut edge) =
        edge_on_disk_cloud_idle(dir.path(), "gw-full", &disk.path.join("edge"), NO_RESERVE);

    let (messages, ids) = readings(0, N);
    let p = publisher(mqtt_port, "full-disk-sensor");
    let acked = p.progress.clone();
    let run = spawn_publisher(p, messages);

    wait_for_commit_failures(&edge, &acked, N);
    let problems = wait_wedged(&edge);
    assert!(
        problems.iter().any(|p| p.contains("pipeline")),
        "/healthz should name the pipeline: {problems:?}"
    );
    // Still retrying (several failures logged), still the first process.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        edge.daemon.is_running(),
        "the edge died while the disk was full:\n{}",
        tail(&edge.daemon.log_text(), 40)
    );
    let log = edge.daemon.log_text();
    assert!(
        log.matches(COMMIT_FAILED).count() >= 2,
        "the failing commit should be retried:\n{}",
        tail(&log, 40)
    );
    assert_eq!(log.matches(STARTED).count(), 1, "{}", tail(&log, 40));
    let acked_at_sigterm = acked.load(Ordering::Acquire);

    let (took, status) = sigterm_and_time(&mut edge);
    assert!(
        status.code().is_some(),
        "the edge should exit on its own after SIGTERM, not die of it: {status}"
    );

    disk.resize("64m");
    let committed = committed_ids(&edge.data_dir.join("outbox.db"), &cloud.store);
    let restarted = Instant::now();
    cloud.daemon.restart().unwrap();
    edge.daemon.restart().unwrap();
    let report = run.join().expect("publisher thread");
    report.ensure_all_safe().unwrap_or_else(|e| {
        panic!(
            "{e:#}\n--- edge log ---\n{}",
            tail(&edge.daemon.log_text(), 40)
        )
    });
    assert!(
        report.reconnects >= 1,
        "the publisher should have lived through the restart"
    );
    let mut acked_ids = BTreeSet::new();
    add_acked_before(&ids, &report, restarted, &mut acked_ids);
    assert_same(&acked_ids, &committed);
    eprintln!(
        "full disk: {acked_at_sigterm}/{N} acked before SIGTERM, exit took {took:?}, {} resent with DUP",
        report.resent_publishes
    );

    assert_stored_exactly(&cloud, &edge, &ids);
    let healthy = wait_healthy(&edge, Duration::from_secs(10));
    assert!(healthy.is_ok(), "after the restart: {healthy:?}");
}

/// I-1, I-17: the disk fills, `/healthz` says 503 and why; the disk grows
/// while the daemon runs: its retried commit succeeds, `/healthz` is 200
/// `ok` again within the retry backoff, and the readings held during the
/// failure are acknowledged then and stored exactly once.
#[test]
fn healthz_recovers_when_the_disk_has_room_again() {
    const N: usize = 30_000;
    let dir = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&dir.path().join("disk"), "1m");
    let (mut cloud, mqtt_port, edge) =
        edge_on_disk_cloud_idle(dir.path(), "gw-heal", &disk.path.join("edge"), NO_RESERVE);
    let (messages, ids) = readings(0, N);
    let p = publisher(mqtt_port, "healing-sensor");
    let acked = p.progress.clone();
    let run = spawn_publisher(p, messages);

    wait_for_commit_failures(&edge, &acked, N);
    let problems = wait_problem(&edge, |p| p.starts_with("pipeline disk_full:"));
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("pipeline disk_full:") && p.contains("disk is full")),
        "/healthz should say the pipeline's commits fail for a full disk: {problems:?}"
    );
    // `fogline-edge status` says so too, with exit 1 (running, unhealthy)
    // for scripts and probes.
    let out = Command::new(process::binary("fogline-edge").unwrap())
        .args(["status", "--config", &edge.config.to_string_lossy()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "status of an unhealthy daemon:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines()
            .any(|l| l.contains("UNHEALTHY") && l.contains("pipeline disk_full:")),
        "status names the problem:\n{text}"
    );

    disk.resize("64m");
    let grown = Instant::now();
    // The retry backoff is at most 5 s; then stall_after (1 s) must not
    // still count the old commit.
    let healthy = wait_healthy(&edge, Duration::from_secs(10));
    assert!(
        healthy.is_ok(),
        "/healthz after the disk grew: {healthy:?}\n{}",
        tail(&edge.daemon.log_text(), 30)
    );
    let healed_after = grown.elapsed();

    cloud.daemon.restart().unwrap();
    let report = run.join().expect("publisher thread");
    report.ensure_all_safe().unwrap();
    assert_stored_exactly(&cloud, &edge, &ids);
    let log = edge.daemon.log_text();
    assert_eq!(log.matches(STARTED).count(), 1, "{}", tail(&log, 40));
    eprintln!("healthz ok {healed_after:?} after the disk grew");
}

/// I-28: the disk fills while the uplink is down (the outbox stops at 8 MiB
/// free and holds a 4 MiB reserve file); then the aggregator
/// comes back, and meanwhile a log eats the room the outbox kept. The edge
/// gives its reserve file back to delete what was acknowledged (I-28), the
/// backlog drains, ingest resumes in the
/// space the deletes freed, and every reading the publisher sent is
/// acknowledged and stored exactly once — with a bounded number of
/// sessions, not a reconnect storm.
#[test]
fn a_full_disk_drains_by_itself_when_the_aggregator_returns() {
    const N: usize = 250_000;
    let dir = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&dir.path().join("disk"), "24m");
    let (mut cloud, mqtt_port, edge) = edge_on_disk_cloud_idle(
        dir.path(),
        "gw-drain",
        &disk.path.join("edge"),
        "[outbox]\nreserve_mib = 8\nmax_batch_bytes = 1048576\n",
    );
    let reserve = edge.data_dir.join("outbox.db.reserve");
    assert!(
        reserve.exists(),
        "the reserve is made at start: {}",
        tail(&edge.daemon.log_text(), 20)
    );
    let (messages, ids) = readings(0, N);
    let p = publisher(mqtt_port, "draining-sensor");
    let acked = p.progress.clone();
    let run = spawn_publisher(p, messages);
    wait_for_commit_failures(&edge, &acked, N);
    let acked_when_full = acked.load(Ordering::Acquire);
    let problems = wait_problem(&edge, |p| p.starts_with("pipeline disk_full:"));
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("pipeline disk_full:")),
        "/healthz should say the outbox's disk is full: {problems:?}"
    );
    // Something else (a log) takes the room the outbox kept: only the
    // reserve file is left for the deletes.
    let filler = fill(&disk.path.join("filler.log"));

    cloud.daemon.restart().unwrap();
    let report = run.join().expect("publisher thread");
    report.ensure_all_safe().unwrap_or_else(|e| {
        panic!(
            "{e:#}\n--- edge log ---\n{}\n--- cloud log ---\n{}",
            tail(&edge.daemon.log_text(), 40),
            tail(&cloud.daemon.log_text(), 20)
        )
    });
    assert_stored_exactly(&cloud, &edge, &ids);
    let log = edge.daemon.log_text();
    assert!(
        log.contains("the disk is full for new readings"),
        "the disk never filled:\n{}",
        tail(&log, 40)
    );
    let sessions = cloud.daemon.log_text().matches("Node connected.").count();
    assert!(
        sessions <= 3,
        "{sessions} sessions to drain one backlog: a reconnect storm\n{}",
        tail(&log, 40)
    );
    let healthy = wait_healthy(&edge, Duration::from_secs(10));
    assert!(healthy.is_ok(), "after the drain: {healthy:?}");
    eprintln!(
        "full disk drained: {acked_when_full}/{N} acknowledged when the disk filled, {filler} bytes of filler after, {sessions} session(s), reserve file {}",
        if reserve.exists() { "kept" } else { "released" }
    );
}

/// I-17, I-18, I-28: the aggregator's store is on a disk that fills. Its
/// applies fail, so it acknowledges nothing and its `/healthz` says `store
/// disk_full`; the edge backs off instead of reconnecting in a loop (a
/// bounded number of sessions) and says `uplink flapping`. The disk grows:
/// the backlog drains with no restart, every reading stored once, both
/// sides healthy again.
#[test]
fn an_aggregator_store_on_a_full_disk_is_unhealthy_and_the_edge_backs_off() {
    const N: usize = 30_000;
    let dir = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&dir.path().join("cloud-disk"), "2m");
    let certs = dir.path().join("certs");
    fogline_testkit::certs::dev_bundle(&certs, &["gw-cloudfull"]).unwrap();
    let mut cloud = Cloud::configure(dir.path(), &certs).unwrap();
    cloud.move_store(&disk.path.join("cloud.db")).unwrap();
    cloud.daemon.restart().unwrap();
    let mqtt_port = fogline_tests::free_tcp_port().unwrap();
    let edge = start_edge(
        dir.path(),
        "gw-cloudfull",
        &dir.path().join("edge-gw-cloudfull"),
        mqtt_port,
        &uplink_toml("gw-cloudfull", &certs, cloud.quic_port),
        "",
        &[],
    );
    let (messages, ids) = readings(0, N);
    let p = publisher(mqtt_port, "cloudfull-sensor");
    let run = spawn_publisher(p, messages);
    let report = run.join().expect("publisher thread");
    report.ensure_all_safe().unwrap();

    let mut last = None;
    let full = process::wait_until(Duration::from_secs(30), || {
        last = cloud.healthz();
        last.as_ref().is_some_and(|(code, v)| {
            *code == 503
                && v["problems"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|p| p["component"] == "store" && p["kind"] == "disk_full")
                })
        })
    });
    assert!(
        full,
        "the aggregator's /healthz should say its store's disk is full: {last:?}\n{}",
        tail(&cloud.daemon.log_text(), 20)
    );
    let sessions_before = cloud.daemon.log_text().matches("Node connected.").count();
    std::thread::sleep(Duration::from_secs(10));
    let sessions = cloud.daemon.log_text().matches("Node connected.").count() - sessions_before;
    // reconnect_max is 500 ms here: at most ~2 a second, not the 70 a
    // second of a loop without backoff.
    assert!(
        sessions <= 25,
        "{sessions} sessions in 10 s against a failing store\n{}",
        tail(&edge.daemon.log_text(), 20)
    );
    let problems = wait_problem(&edge, |p| p.starts_with("uplink flapping:"));
    assert!(
        problems.iter().any(|p| p.starts_with("uplink flapping:")),
        "/healthz of the edge: {problems:?}"
    );

    disk.resize("64m");
    assert_stored_exactly(&cloud, &edge, &ids);
    let healed = process::wait_until(Duration::from_secs(15), || {
        cloud.healthz().is_some_and(|(code, _)| code == 200)
    });
    assert!(
        healed,
        "the aggregator healthy again: {:?}",
        cloud.healthz()
    );
    let edge_ok = wait_healthy(&edge, Duration::from_secs(20));
    assert!(edge_ok.is_ok(), "the edge healthy again: {edge_ok:?}");
    eprintln!("store on a full disk: {sessions} sessions in 10 s of failing");
}

/// I-16, I-17, I-1: a commit that hangs (an fsync that never returns; the
/// fault point `outbox::commit::before` sleeps 30 s inside the commit's
/// transaction, holding the outbox's write lock) while the uplink is
/// connected: `/healthz` says 503, nothing is acknowledged, and SIGTERM
/// still ends the daemon within `shutdown_timeout`. After a restart the
/// publisher's resends are stored exactly once.
#[test]
fn sigterm_with_a_hung_commit_and_a_connected_uplink_exits_in_time() {
    const N: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    fogline_testkit::certs::dev_bundle(&certs, &["gw-hung"]).unwrap();
    let cloud = Cloud::start(dir.path(), &certs).unwrap();
    let mqtt_port = fogline_tests::free_tcp_port().unwrap();
    let mut edge = start_edge(
        dir.path(),
        "gw-hung",
        &dir.path().join("edge-gw-hung"),
        mqtt_port,
        &uplink_toml("gw-hung", &certs, cloud.quic_port),
        "",
        &[("FAILPOINTS", "outbox::commit::before=sleep(30000)")],
    );
    edge.wait_for(Duration::from_secs(30), "uplink connected", |s| {
        s["uplink_connected"].as_bool() == Some(true)
    })
    .unwrap();

    let (messages, ids) = readings(0, N);
    let p = publisher(mqtt_port, "hung-sensor");
    let acked = p.progress.clone();
    let run = spawn_publisher(p, messages);
    let problems = wait_wedged(&edge);
    assert!(
        problems.iter().any(|p| p.contains("pipeline")),
        "/healthz should name the pipeline: {problems:?}"
    );
    assert_eq!(
        acked.load(Ordering::Acquire),
        0,
        "acknowledged while the commit hangs (I-1)"
    );

    let (took, status) = sigterm_and_time(&mut edge);
    assert!(
        status.code().is_some(),
        "the edge should exit on its own after SIGTERM, not die of it: {status}"
    );
    edge.daemon.restart_with_env(&[]).unwrap();
    let report = run.join().expect("publisher thread");
    report.ensure_all_safe().unwrap();
    assert_stored_exactly(&cloud, &edge, &ids);
    eprintln!("hung commit: exit took {took:?}");
}

/// I-16, I-1 (and `/healthz` 200 `ok` under traffic, I-17): readings flow
/// continuously into the endpoint; SIGTERM makes the daemon exit with
/// status 0 within `shutdown_timeout`, without abandoning its pipeline;
/// after a restart the publisher's resends complete and every acknowledged
/// reading is stored exactly once, nothing else.
#[test]
fn sigterm_under_traffic_exits_cleanly_and_every_acknowledged_reading_is_stored_once() {
    let t = sigterm_mid_stream("gw-term");
    assert!(
        t.status.success(),
        "SIGTERM should end the edge with status 0: {}",
        t.status
    );
    assert!(
        t.first_log.contains("Fogline edge daemon stopped."),
        "{}",
        tail(&t.first_log, 30)
    );
    assert!(
        !t.first_log.contains("did not finish in time"),
        "a healthy pipeline should finish, not be abandoned:\n{}",
        tail(&t.first_log, 30)
    );
    let uncommitted: Vec<_> = t.acked.difference(&t.committed).take(5).collect();
    assert!(
        uncommitted.is_empty(),
        "acknowledged but not in the outbox or the store when the edge exited (I-1): {} readings, e.g. {uncommitted:?}",
        t.acked.difference(&t.committed).count()
    );
    assert!(t.verdict.is_exact(), "{}\n{}", t.verdict.summary(), t.logs);
}

/// I-16 "the worker commits *and acknowledges* what it took": a reading the
/// daemon committed during its shutdown was acknowledged to its sender
/// before the daemon exited (the acks were written before the connection
/// closed). Same scenario as the test above; here the oracle is the
/// publisher's acknowledged set against the outbox and store as the exited
/// daemon left them.
#[test]
fn sigterm_acknowledges_every_reading_the_worker_committed() {
    let t = sigterm_mid_stream("gw-term-ack");
    let unacked: Vec<_> = t.committed.difference(&t.acked).collect();
    assert!(
        unacked.is_empty(),
        "committed by the edge but never acknowledged to the sender before it exited (I-16): \
         {} of {} committed readings, e.g. {:?}\n--- edge log (first run) ---\n{}",
        unacked.len(),
        t.committed.len(),
        &unacked[..unacked.len().min(5)],
        tail(&t.first_log, 12)
    );
    assert!(t.verdict.is_exact(), "{}\n{}", t.verdict.summary(), t.logs);
}

/// I-16 with `outbox.commit_interval`: SIGTERM does not wait out the
/// interval. Readings gathered for an 8 s interval are committed and
/// acknowledged at once, well within the 2 s `shutdown_timeout`, and what
/// the daemon acknowledged is what it committed (I-1).
#[test]
fn sigterm_commits_what_the_commit_interval_gathered_at_once() {
    let node = "gw-term-interval";
    let dir = tempfile::tempdir().unwrap();
    let mqtt_port = fogline_tests::free_tcp_port().unwrap();
    let body = format!(
        "[broker]\nembedded = true\nlisten = \"127.0.0.1:{mqtt_port}\"\n\
         [[pipelines]]\nname = \"readings\"\ntopics = [\"sensors/+/reading\"]\nfunctions = []\n\
         [outbox]\ncommit_interval = \"8s\"\n"
    );
    let keys = format!("shutdown_timeout = \"{}ms\"", SHUTDOWN_TIMEOUT.as_millis());
    let data_dir = dir.path().join(format!("edge-{node}"));
    let mut edge = Edge::start_in(dir.path(), node, &data_dir, &keys, &body, &[]).unwrap();
    edge.wait_for(Duration::from_secs(30), "start", |_| true)
        .unwrap();

    let (messages, ids) = readings(0, 300);
    let mut p = publisher(mqtt_port, node);
    p.window = 100;
    let progress = p.progress.clone();
    let cancel = p.cancel.clone();
    let handle = spawn_publisher(p, messages);
    // The first batch commits at once; the next waits for the interval.
    assert!(
        process::wait_until(Duration::from_secs(10), || progress.load(Ordering::Acquire)
            >= 1),
        "nothing acknowledged:\n{}",
        tail(&edge.daemon.log_text(), 30)
    );
    std::thread::sleep(Duration::from_millis(500));
    let before = progress.load(Ordering::Acquire);
    assert!(
        before < 300,
        "the interval held the rest back ({before} acknowledged)"
    );
    let (took, status) = sigterm_and_time(&mut edge);
    let log = edge.daemon.log_text();
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        tail(&log, 30)
    );
    assert!(
        !log.contains("did not finish in time"),
        "the worker waited out the interval instead of committing (took {took:?}):\n{}",
        tail(&log, 30)
    );
    cancel.cancel();
    let report = handle.join().unwrap();
    let mut acked = BTreeSet::new();
    add_acked_before(&ids, &report, Instant::now(), &mut acked);
    let committed = committed_ids(&data_dir.join("outbox.db"), &dir.path().join("none.db"));
    assert!(
        acked.len() > before,
        "what the interval gathered was acknowledged at SIGTERM: {before} before, {} after",
        acked.len()
    );
    assert_same(&acked, &committed);
    eprintln!(
        "{node}: exit took {took:?}; {before} acknowledged before SIGTERM, {} after, {} committed",
        acked.len(),
        committed.len()
    );
}

/// Logs written to a file (stderr redirected, as under systemd or Docker)
/// carry no ANSI colour codes.
#[test]
fn text_logs_to_a_file_have_no_colour_codes() {
    let log = run_briefly("gw-log-text", "[log]\nformat = \"text\"\n", &[]);
    assert!(log.contains(STARTED), "{log}");
    assert!(
        !log.contains("\x1b["),
        "ANSI escape codes in a log file:\n{log}"
    );
}

/// `[log] format = "json"`: every line is one JSON object with a level and a
/// message, the start line among them.
#[test]
fn json_logs_are_one_object_per_line_with_level_and_message() {
    let log = run_briefly("gw-log-json", "[log]\nformat = \"json\"\n", &[]);
    let mut started = None;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\n{log}"));
        assert!(v.is_object(), "not an object: {line}");
        assert!(v["level"].is_string(), "no level: {line}");
        let message = v["message"]
            .as_str()
            .or_else(|| v["fields"]["message"].as_str());
        assert!(message.is_some(), "no message: {line}");
        if message == Some(STARTED) {
            started = Some(v.clone());
        }
    }
    let started = started.unwrap_or_else(|| panic!("no start line:\n{log}"));
    assert_eq!(started["level"], "INFO", "{started}");
}

/// `FOGLINE_LOG_FORMAT=text` overrides `[log] format = "json"`.
#[test]
fn fogline_log_format_text_overrides_json_in_the_config() {
    let log = run_briefly(
        "gw-log-env",
        "[log]\nformat = \"json\"\n",
        &[("FOGLINE_LOG_FORMAT", "text")],
    );
    let start = log
        .lines()
        .find(|l| l.contains(STARTED))
        .unwrap_or_else(|| panic!("no start line:\n{log}"));
    assert!(
        serde_json::from_str::<serde_json::Value>(start).is_err(),
        "still JSON: {start}"
    );
    assert!(start.contains("INFO"), "{start}");
    assert!(
        log.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_err()),
        "JSON lines in a text log:\n{log}"
    );
    assert!(!log.contains("\x1b["), "ANSI escape codes:\n{log}");
}

// ---------------------------------------------------------------------------
// Support
// ---------------------------------------------------------------------------

/// A tmpfs of a fixed size mounted on a directory: a disk that fills up.
/// Unmounted on drop (after the processes using it are gone: declare it
/// before them).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(path)
            .output();
        match out {
            Ok(o) if o.status.success() => Self {
                path: path.to_path_buf(),
            },
            Ok(o) => panic!(
                "this test needs root (CAP_SYS_ADMIN): it mounts a {size} tmpfs as a disk that fills up, \
                 and `mount -t tmpfs` on {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("this test needs root and `mount`: cannot run it: {e}"),
        }
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "growing the tmpfs to {size} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a process we could not stop): detach it anyway.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// An edge with the native endpoint on `mqtt_port`, one pipeline without
/// functions (readings pass unchanged), `shutdown_timeout` 2 s and
/// `stall_after` 1 s; `extra` is appended (e.g. `[log]`). Waits until it
/// answers `/status`.
/// Certificates for `node`, an aggregator configured but not started, and
/// an edge with its data in `data_dir` (on a small disk) and `extra` config
/// that replicates to it: (aggregator, the edge's MQTT port, edge).
fn edge_on_disk_cloud_idle(
    dir: &Path,
    node: &str,
    data_dir: &Path,
    extra: &str,
) -> (Cloud, u16, Edge) {
    let certs = dir.join("certs");
    fogline_testkit::certs::dev_bundle(&certs, &[node]).unwrap();
    let cloud = Cloud::configure(dir, &certs).unwrap();
    let mqtt_port = fogline_tests::free_tcp_port().unwrap();
    let edge = start_edge(
        dir,
        node,
        data_dir,
        mqtt_port,
        &uplink_toml(node, &certs, cloud.quic_port),
        extra,
        &[],
    );
    (cloud, mqtt_port, edge)
}

fn start_edge(
    dir: &Path,
    node: &str,
    data_dir: &Path,
    mqtt_port: u16,
    uplink: &str,
    extra: &str,
    env: &[(&str, &str)],
) -> Edge {
    let body = format!(
        "[broker]\nembedded = true\nlisten = \"127.0.0.1:{mqtt_port}\"\n\
         [[pipelines]]\nname = \"readings\"\ntopics = [\"sensors/+/reading\"]\nfunctions = []\n\
         [health]\nstall_after = \"1s\"\n{uplink}\n{extra}"
    );
    let keys = format!("shutdown_timeout = \"{}ms\"", SHUTDOWN_TIMEOUT.as_millis());
    let edge = Edge::start_in(dir, node, data_dir, &keys, &body, env).unwrap();
    edge.wait_for(Duration::from_secs(30), "start", |_| true)
        .unwrap();
    edge
}

/// Readings `first..first + n`, spread over 4 sensors: (topic, payload) and
/// their ids.
fn readings(first: usize, n: usize) -> (Vec<(String, Bytes)>, Vec<String>) {
    const SENSORS: usize = 4;
    (first..first + n)
        .map(|i| {
            let (s, k) = (i % SENSORS, i / SENSORS);
            let payload = sensors::payload(s, k, 1_764_000_000_000 + i as u64);
            (
                (sensors::topic(s), Bytes::from(payload)),
                sensors::reading_id(s, k),
            )
        })
        .unzip()
}

/// A QoS 1 publisher on a persistent MQTT 5 session (kept across
/// reconnects and edge restarts) that waits patiently while a commit fails.
fn publisher(mqtt_port: u16, client_id: &str) -> Publisher {
    let mut o = Options::new(format!("127.0.0.1:{mqtt_port}"), client_id).with_version(Version::V5);
    o.clean_start = false;
    o.session_expiry_secs = Some(300);
    let mut p = Publisher::new(o, QoS::AtLeastOnce);
    p.window = 200;
    p.ack_timeout = Duration::from_secs(60);
    p.deadline = Duration::from_secs(120);
    p
}

fn spawn_publisher(
    p: Publisher,
    messages: Vec<(String, Bytes)>,
) -> std::thread::JoinHandle<PublishReport> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(p.run(&messages)).unwrap()
    })
}

/// Writes `path` until the disk is full; returns its size.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    let _ = f.sync_all();
    written
}

/// Publishing without pause until the edge logs a failed commit (the disk
/// is full).
fn wait_for_commit_failures(edge: &Edge, acked: &AtomicUsize, n: usize) {
    let failed = process::wait_until(Duration::from_secs(60), || {
        edge.daemon.log_text().contains(COMMIT_FAILED)
    });
    assert!(
        failed,
        "the disk never filled ({} of {n} readings acknowledged); the edge log:\n{}",
        acked.load(Ordering::Acquire),
        tail(&edge.daemon.log_text(), 40)
    );
}

/// `/healthz` as (code, JSON body).
fn healthz(edge: &Edge) -> Option<(u16, serde_json::Value)> {
    let (code, body) = edge.healthz()?;
    Some((code, serde_json::from_str(&body).ok()?))
}

/// Waits (a few seconds: `stall_after` is 1 s) for `/healthz` to answer
/// 503 `wedged`; returns its problems.
fn wait_wedged(edge: &Edge) -> Vec<String> {
    wait_problem(edge, |_| true)
}

/// Waits (up to 10 s) for `/healthz` to answer 503 with a problem that
/// `wanted` accepts — under load the first 503 may still name another
/// (`wedged` before the commit's error is known) — and returns its
/// problems, "component kind: detail" as `status` prints them; the last
/// 503's if none was wanted.
fn wait_problem(edge: &Edge, wanted: impl Fn(&str) -> bool) -> Vec<String> {
    let mut last = None;
    let mut problems = Vec::new();
    let found = process::wait_until(Duration::from_secs(10), || {
        last = healthz(edge);
        let Some((503, v)) = last.as_ref().filter(|(_, v)| v["status"] == "unhealthy") else {
            return false;
        };
        problems = v["problems"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        format!(
                            "{} {}: {}",
                            p["component"].as_str().unwrap_or("?"),
                            p["kind"].as_str().unwrap_or("?"),
                            p["detail"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        problems.iter().any(|p| wanted(p))
    });
    assert!(
        found || !problems.is_empty(),
        "/healthz did not turn 503 while commits failed; last answer {last:?}\n{}",
        tail(&edge.daemon.log_text(), 20)
    );
    assert!(!problems.is_empty(), "503 without a reason: {last:?}");
    problems
}

/// Waits for `/healthz` to answer 200 `{"status":"ok"}`; the last answer
/// otherwise.
fn wait_healthy(edge: &Edge, timeout: Duration) -> Result<(), Option<(u16, serde_json::Value)>> {
    let mut last = None;
    let ok = process::wait_until(timeout, || {
        last = healthz(edge);
        last.as_ref()
            .is_some_and(|(code, v)| *code == 200 && v["status"] == "ok")
    });
    if ok {
        Ok(())
    } else {
        Err(last)
    }
}

/// SIGTERM; asserts the process is gone within `shutdown_timeout` plus
/// [`EXIT_MARGIN`]; returns how long it took and its exit status.
fn sigterm_and_time(edge: &mut Edge) -> (Duration, std::process::ExitStatus) {
    let bound = SHUTDOWN_TIMEOUT + EXIT_MARGIN;
    let t0 = Instant::now();
    edge.daemon.terminate().unwrap();
    let status = edge.daemon.wait_exit(bound + Duration::from_secs(10));
    let took = t0.elapsed();
    let Some(status) = status else {
        panic!(
            "the edge was still running {took:?} after SIGTERM (shutdown_timeout {SHUTDOWN_TIMEOUT:?}):\n{}",
            tail(&edge.daemon.log_text(), 30)
        );
    };
    assert!(
        took <= bound,
        "the edge took {took:?} to exit after SIGTERM; shutdown_timeout is {SHUTDOWN_TIMEOUT:?} \
         (+{EXIT_MARGIN:?} margin); status {status}:\n{}",
        tail(&edge.daemon.log_text(), 30)
    );
    (took, status)
}

/// Reading ids the edge committed, read once its process is gone: its
/// outbox, and what the uplink already moved into the aggregator's store
/// (a row leaves the outbox only after the store committed it, I-8).
fn committed_ids(outbox: &Path, store: &Path) -> BTreeSet<String> {
    use rusqlite::{Connection, OpenFlags};
    let conn = Connection::open_with_flags(outbox, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("opening the outbox {}: {e}", outbox.display()));
    let mut stmt = conn.prepare("SELECT payload FROM records").unwrap();
    let payloads = stmt
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .map(|p| serde_json::from_slice::<serde_json::Value>(&p.unwrap()).unwrap());
    let stored = if store.exists() {
        oracle::read_store(store).unwrap()
    } else {
        Vec::new()
    };
    payloads
        .chain(stored.into_iter().map(|r| r.payload))
        .filter_map(|v| v["id"].as_str().map(String::from))
        .collect()
}

/// Adds to `into` the ids whose PUBACK reached the publisher before `t`.
fn add_acked_before(
    ids: &[String],
    report: &PublishReport,
    t: Instant,
    into: &mut BTreeSet<String>,
) {
    for (id, safe) in ids.iter().zip(&report.safe_at) {
        if safe.is_some_and(|d| report.started + d < t) {
            into.insert(id.clone());
        }
    }
}

/// What the first life of the edge acknowledged and what it committed are
/// the same readings: nothing acknowledged uncommitted (I-1), nothing it
/// took left committed but unacknowledged (I-16: the worker commits *and
/// acknowledges* what it took before the daemon exits).
fn assert_same(acked: &BTreeSet<String>, committed: &BTreeSet<String>) {
    let uncommitted: Vec<_> = acked.difference(committed).take(5).collect();
    let unacked: Vec<_> = committed.difference(acked).collect();
    assert!(
        uncommitted.is_empty(),
        "acknowledged but not in the outbox or the store when the edge exited (I-1): {} readings, e.g. {uncommitted:?}",
        acked.difference(committed).count()
    );
    assert!(
        unacked.is_empty(),
        "committed by the edge but never acknowledged to the sender before it exited (I-16): {} of {} committed readings, e.g. {:?}",
        unacked.len(),
        committed.len(),
        &unacked[..unacked.len().min(5)]
    );
}

/// Waits until the store holds at least as many readings as `ids` (or time
/// runs out), a little longer so late duplicates would show, then judges.
/// Waits (up to 60 s) for the aggregator to hold every one of `ids`, then
/// asserts it holds each exactly once, showing both logs if not.
fn assert_stored_exactly(cloud: &Cloud, edge: &Edge, ids: &[String]) {
    let verdict = settle(&cloud.store, ids, Duration::from_secs(60));
    assert!(
        verdict.is_exact(),
        "{}\n--- edge log ---\n{}\n--- cloud log ---\n{}",
        verdict.summary(),
        tail(&edge.daemon.log_text(), 40),
        tail(&cloud.daemon.log_text(), 20)
    );
}

fn settle(store: &Path, ids: &[String], timeout: Duration) -> oracle::Verdict {
    let expected = ids.iter().cloned().collect();
    process::wait_until(timeout, || {
        oracle::read_store(store)
            .is_ok_and(|r| oracle::judge(&r, &expected).received >= expected.len())
    });
    std::thread::sleep(Duration::from_millis(500));
    let records = oracle::read_store(store).unwrap_or_default();
    oracle::judge(&records, &expected)
}

/// Readings in runs of [`Stream::RUN`] (one publisher each, same client id
/// and persistent session), one after the other with a short pause, until
/// told to finish: a steady flow whose every run ends only when all its
/// readings are acknowledged, through any restart in between.
struct Stream {
    acked: Arc<AtomicUsize>,
    /// Answered messages of the run going on.
    current: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Vec<String>, PublishReport)>>,
}

impl Stream {
    const RUN: usize = 500;

    fn spawn(mqtt_port: u16, client_id: &str) -> Self {
        let acked = Arc::new(AtomicUsize::new(0));
        let current = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, c, s) = (acked.clone(), current.clone(), stop.clone());
        let id = client_id.to_string();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut runs = Vec::new();
            while !s.load(Ordering::Acquire) {
                let (messages, ids) = readings(runs.len() * Self::RUN, Self::RUN);
                let mut p = publisher(mqtt_port, &id);
                p.window = 100;
                p.ack_timeout = Duration::from_secs(10);
                p.deadline = Duration::from_secs(60);
                p.progress = c.clone();
                let report = rt.block_on(p.run(&messages)).unwrap();
                a.fetch_add(report.safe_count(), Ordering::AcqRel);
                let complete = report.outcome == Outcome::Complete;
                runs.push((ids, report));
                if !complete {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            runs
        });
        Self {
            acked,
            current,
            stop,
            thread,
        }
    }

    /// Readings acknowledged in completed runs.
    fn acked(&self) -> usize {
        self.acked.load(Ordering::Acquire)
    }

    fn wait_acked(&self, n: usize, timeout: Duration) -> bool {
        process::wait_until(timeout, || self.acked() >= n)
    }

    /// Waits until a run is well under way (a full window in flight), so
    /// that what comes next hits it mid-stream.
    fn wait_mid_run(&self) -> bool {
        let mid = Self::RUN / 5..=Self::RUN * 3 / 5;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if mid.contains(&self.current.load(Ordering::Acquire)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// Stops after the current run; every run's ids and report.
    fn finish(self) -> Vec<(Vec<String>, PublishReport)> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("stream thread")
    }
}

/// What [`sigterm_mid_stream`] saw.
struct MidStreamTerm {
    /// Exit status after SIGTERM.
    status: std::process::ExitStatus,
    /// The log of the first process (up to its exit).
    first_log: String,
    /// Readings whose PUBACK reached the publisher before the restart.
    acked: BTreeSet<String>,
    /// Readings in the outbox or the store once the first process was gone.
    committed: BTreeSet<String>,
    /// Every published reading against the store, after the restart.
    verdict: oracle::Verdict,
    /// Log tails, for failure messages.
    logs: String,
}

/// An edge with a connected uplink takes a steady QoS 1 stream (persistent
/// session); `/healthz` must be 200 `ok` under it; SIGTERM while a run is
/// mid-window (the worker holds readings: small batches linger 50 ms), the
/// exit timed against `shutdown_timeout`; the edge restarts and the stream
/// goes on until 1,000 more readings are acknowledged.
fn sigterm_mid_stream(node: &str) -> MidStreamTerm {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    fogline_testkit::certs::dev_bundle(&certs, &[node]).unwrap();
    let cloud = Cloud::start(dir.path(), &certs).unwrap();
    let mqtt_port = fogline_tests::free_tcp_port().unwrap();
    let mut edge = start_edge(
        dir.path(),
        node,
        &dir.path().join(format!("edge-{node}")),
        mqtt_port,
        &uplink_toml(node, &certs, cloud.quic_port),
        "[outbox]\ncommit_linger = \"50ms\"\n",
        &[],
    );
    edge.wait_for(Duration::from_secs(30), "uplink connected", |s| {
        s["uplink_connected"].as_bool() == Some(true)
    })
    .unwrap();

    let stream = Stream::spawn(mqtt_port, &format!("{node}-sensor"));
    assert!(
        stream.wait_acked(1_000, Duration::from_secs(30)),
        "the stream did not get going:\n{}",
        tail(&edge.daemon.log_text(), 30)
    );
    for _ in 0..5 {
        let h = healthz(&edge);
        assert_eq!(
            h.as_ref().map(|h| (h.0, h.1["status"].as_str())),
            Some((200, Some("ok"))),
            "/healthz under traffic: {h:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    assert!(stream.wait_mid_run(), "no run under way");
    let (took, status) = sigterm_and_time(&mut edge);
    let first_log = edge.daemon.log_text();
    let committed = committed_ids(&edge.data_dir.join("outbox.db"), &cloud.store);
    let restarted = Instant::now();
    edge.daemon.restart().unwrap();
    let after = stream.acked() + 1_000;
    assert!(
        stream.wait_acked(after, Duration::from_secs(30)),
        "the stream did not resume after the restart:\n{}",
        tail(&edge.daemon.log_text(), 30)
    );
    let runs = stream.finish();
    let mut ids = Vec::new();
    let mut acked = BTreeSet::new();
    let mut interrupted = 0;
    for (run_ids, report) in &runs {
        report.ensure_all_safe().unwrap();
        interrupted += usize::from(report.reconnects > 0);
        ids.extend(run_ids.iter().cloned());
        add_acked_before(run_ids, report, restarted, &mut acked);
    }
    assert_eq!(
        interrupted, 1,
        "SIGTERM should hit exactly one run mid-window"
    );
    eprintln!(
        "{node}: exit took {took:?}; {} acked before the restart, {} committed; {} readings in {} runs",
        acked.len(),
        committed.len(),
        ids.len(),
        runs.len()
    );
    let verdict = settle(&cloud.store, &ids, Duration::from_secs(60));
    let logs = format!(
        "--- edge log ---\n{}\n--- cloud log ---\n{}",
        tail(&edge.daemon.log_text(), 40),
        tail(&cloud.daemon.log_text(), 20)
    );
    MidStreamTerm {
        status,
        first_log,
        acked,
        committed,
        verdict,
        logs,
    }
}

/// Runs an edge with `log_toml`, sends it a few readings, stops it with
/// SIGTERM; returns its log (stdout and stderr, redirected to a file).
fn run_briefly(node: &str, log_toml: &str, env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mqtt_port = fogline_tests::free_tcp_port().unwrap();
    let mut edge = start_edge(
        dir.path(),
        node,
        &dir.path().join(format!("edge-{node}")),
        mqtt_port,
        "",
        log_toml,
        env,
    );
    let (messages, _) = readings(0, 50);
    let report = spawn_publisher(publisher(mqtt_port, node), messages)
        .join()
        .unwrap();
    report.ensure_all_safe().unwrap();
    edge.daemon.terminate().unwrap();
    assert!(
        edge.daemon.wait_exit(Duration::from_secs(10)).is_some(),
        "the edge did not stop"
    );
    edge.daemon.log_text()
}
