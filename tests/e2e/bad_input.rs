//! Bad input: each gets a clear error, the daemon goes on where that makes
//! sense, and nothing already accepted is lost.

use std::time::Duration;

use fogline_tests::process;

use crate::{cloud_config, edge_config, expected_hot, publish_raw, write_certs, Cluster};

#[test]
fn non_json_and_oversized_payloads_are_dead_lettered_and_the_daemon_goes_on() {
    let mut cluster = Cluster::start("gw-bad-payloads");
    publish_raw(
        cluster.mosquitto.port(),
        vec![
            ("sensors/s0/reading".into(), b"not json at all".to_vec()),
            ("sensors/s0/reading".into(), vec![b'x'; 300 * 1024]),
        ],
    );
    cluster.publish(2, 200, None, |_| {});
    let expected = expected_hot(2, 200);
    let verdict = cluster.settle(&expected, Duration::from_secs(60));
    assert!(
        verdict.is_exact(),
        "{}\n{}",
        verdict.summary(),
        cluster.logs()
    );
    let status = cluster.edge_status().expect("status");
    assert_eq!(
        status["outbox"]["dead_letters"].as_u64(),
        Some(2),
        "{status}"
    );
    assert!(cluster.edge.is_running());
    let db = cluster.dir.path().join("edge-gw-bad-payloads/outbox.db");
    let conn = rusqlite::Connection::open(db).unwrap();
    let errors: Vec<String> = conn
        .prepare("SELECT error FROM dead_letters ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(errors.iter().any(|e| e.contains("not JSON")), "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("payload is 300 KiB, limit is 256 KiB (topic sensors/s0/reading)")),
        "{errors:?}"
    );
}

#[test]
fn a_trapping_function_loses_only_the_poison_message_and_the_daemon_goes_on() {
    // `crasher` traps on a payload `boom` and passes everything else. The
    // pipeline must isolate the one poison message (dead letter) and still
    // deliver every other message of the same batches, while the threshold
    // pipeline next to it is unaffected.
    let extra = format!(
        r#"
[functions.crasher]
module = "{}"
config = {{ mode = "trap" }}
[[pipelines]]
name = "crashing"
topics = ["faulty/#"]
functions = ["crasher"]
"#,
        fogline_modules::hostile().display()
    );
    let mut cluster = Cluster::start_with("gw-trap", &extra);
    let mut faulty: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            (
                "faulty/x".to_string(),
                format!("{{\"id\":\"f-{i}\"}}").into_bytes(),
            )
        })
        .collect();
    faulty.insert(17, ("faulty/x".to_string(), b"boom".to_vec()));
    publish_raw(cluster.mosquitto.port(), faulty);
    cluster.publish(2, 300, None, |_| {});
    let expected = expected_hot(2, 300);

    let ok = process::wait_until(Duration::from_secs(60), || {
        fogline_tests::oracle::read_store(&cluster.store)
            .is_ok_and(|r| r.len() >= expected.len() + 40)
    });
    std::thread::sleep(Duration::from_millis(500));
    let records = fogline_tests::oracle::read_store(&cluster.store).unwrap();
    assert!(
        ok,
        "store holds {} records\n{}",
        records.len(),
        cluster.logs()
    );
    let (sensor_records, faulty_records): (Vec<_>, Vec<_>) = records
        .into_iter()
        .partition(|r| r.stream.starts_with("sensors/"));
    let verdict = fogline_tests::oracle::judge(&sensor_records, &expected);
    assert!(
        verdict.is_exact(),
        "{}\n{}",
        verdict.summary(),
        cluster.logs()
    );
    let ids: Vec<String> = faulty_records
        .iter()
        .map(|r| r.payload["id"].as_str().unwrap_or("?").to_string())
        .collect();
    let want: Vec<String> = (0..40).map(|i| format!("f-{i}")).collect();
    assert_eq!(ids, want, "every good faulty/x message once, in order");

    let status = cluster.edge_status().expect("status");
    assert_eq!(
        status["outbox"]["dead_letters"].as_u64(),
        Some(1),
        "{status}"
    );
    let db = cluster.dir.path().join("edge-gw-trap/outbox.db");
    let conn = rusqlite::Connection::open(db).unwrap();
    let (function, error, payload): (String, String, Vec<u8>) = conn
        .query_row(
            "SELECT function, error, payload FROM dead_letters",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        (function.as_str(), payload.as_slice()),
        ("crasher", &b"boom"[..])
    );
    assert!(error.contains("trap"), "{error}");
    assert!(cluster.edge.is_running());
}

#[test]
fn check_names_an_unknown_key_and_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("edge.toml");
    std::fs::write(
        &cfg,
        "[mqtt]\nbroker = \"127.0.0.1:1883\"\nbrokr = \"oops\"\n",
    )
    .unwrap();
    let out = process::run(
        "fogline-edge",
        &["check", "--config", cfg.to_str().unwrap()],
    )
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("brokr") && err.contains("line 3") && err.contains("edge.toml"),
        "{err}"
    );
}

#[test]
fn a_module_that_fails_to_load_is_named_by_check_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.wasm");
    std::fs::write(&bogus, b"this is not WebAssembly").unwrap();
    let cfg = dir.path().join("edge.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\ndata_dir = \"{}\"\n[functions.f]\nmodule = \"bogus.wasm\"\n[[pipelines]]\nname = \"p\"\ntopics = [\"a/#\"]\nfunctions = [\"f\"]\n[metrics]\nenabled = false\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    for cmd in ["check", "run"] {
        let out = process::run("fogline-edge", &[cmd, "--config", cfg.to_str().unwrap()]).unwrap();
        assert!(!out.status.success(), "{cmd} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("bogus.wasm"), "{cmd}: {err}");
    }
}

#[test]
fn a_node_certificate_from_another_ca_is_rejected_and_others_are_served() {
    // A legitimate deployment keeps flowing while a rogue node knocks.
    let cluster = Cluster::start("gw-good");
    let rogue_dir = tempfile::tempdir().unwrap();
    let rogue_certs = rogue_dir.path().join("rogue-ca");
    write_certs(&rogue_certs, &["gw-rogue"]);
    let fleet_certs = cluster.dir.path().join("certs");
    // The rogue trusts the real fleet CA for the server, but its own
    // certificate is signed by a CA the aggregator does not know.
    let http = fogline_tests::free_tcp_port().unwrap();
    let cfg = edge_config(
        rogue_dir.path(),
        &fleet_certs,
        "gw-rogue",
        &cluster.mosquitto.addr(),
        cluster.quic_port,
        http,
        "",
    );
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("{}/node-gw-rogue", fleet_certs.display()),
        &format!("{}/node-gw-rogue", rogue_certs.display()),
    );
    std::fs::write(&cfg, text).unwrap();
    let mut rogue = process::Daemon::spawn(
        "fogline-edge",
        &["run", "--config", cfg.to_str().unwrap()],
        &rogue_dir.path().join("rogue.log"),
    )
    .unwrap();
    cluster.publish(2, 200, None, |_| {});
    let expected = expected_hot(2, 200);
    let verdict = cluster.settle(&expected, Duration::from_secs(60));
    assert!(
        verdict.is_exact(),
        "{}\n{}",
        verdict.summary(),
        cluster.logs()
    );
    let records = fogline_tests::oracle::read_store(&cluster.store).unwrap();
    assert!(
        records.iter().all(|r| r.node == "gw-good"),
        "only the fleet node is stored"
    );
    assert!(
        rogue.is_running(),
        "the rogue edge keeps retrying, it does not crash"
    );
    let said_so = process::wait_until(Duration::from_secs(30), || {
        rogue
            .log_text()
            .contains("The aggregator refuses this node")
    });
    let log = rogue.log_text();
    assert!(said_so, "the rogue edge says it is refused:\n{log}");
    let rejections = || {
        cluster
            .cloud
            .log_text()
            .matches("Rejected a connection during the handshake")
            .count()
    };
    assert!(
        rejections() > 0,
        "the aggregator says why:\n{}",
        cluster.logs()
    );
    // Backoff that means it: a refused node waits minutes, it does not
    // hammer the aggregator (before: 350–450 handshakes a second).
    let before = rejections();
    std::thread::sleep(Duration::from_secs(8));
    let during = rejections() - before;
    assert!(
        during <= 2,
        "{during} more handshakes refused in 8 s from one refused node\n{}",
        cluster.logs()
    );
    rogue.kill9();
    let _ = cloud_config; // same helper the cluster used
}
