//! Signed rollouts to a fleet of three gateways through their replication
//! connections (ARCHITECTURE.md I-41, I-42), while sensors publish to every
//! gateway: a stage that fails stops the rollout and reverts the nodes it
//! reached; a build signed by an untrusted key is refused by every node;
//! and no reading is lost or stored twice through any of it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fogline_tests::deploy::{http_get, uplink_toml, Cloud, Edge, TEST_TOKEN};
use fogline_tests::process;
use fogline_tests::sensors::{self, BackgroundPublisher};
use serde_json::Value;

const NODES: [&str; 3] = ["gw-1", "gw-2", "gw-3"];
const SENSORS: usize = 2;
const PER_SENSOR: usize = 700;

/// Runs a `fogline-cloud` command in `dir`: (exit code, stdout, stderr).
fn fogline_cloud(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(process::binary("fogline-cloud").unwrap())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Signs `file` as `name version` with `key` (writes `file.sig`).
fn publish(dir: &Path, file: &Path, name: &str, version: &str, key: &str) {
    let f = file.to_string_lossy();
    let (code, _, err) = fogline_cloud(
        dir,
        &[
            "modules",
            "publish",
            &f,
            "--name",
            name,
            "--version",
            version,
            "--key",
            key,
        ],
    );
    assert_eq!(code, 0, "{err}");
}

/// `module` with a custom section appended: the same code, another build
/// (another SHA-256), as a rebuild with a new version string would be.
fn rebuilt(module: &Path, tag: &str) -> Vec<u8> {
    let mut bytes = std::fs::read(module).unwrap();
    let mut body = vec![tag.len() as u8];
    body.extend_from_slice(tag.as_bytes());
    body.extend_from_slice(b"rebuilt for the rollout test");
    assert!(body.len() < 128, "one-byte LEB128 size");
    bytes.push(0); // custom section
    bytes.push(body.len() as u8);
    bytes.extend_from_slice(&body);
    bytes
}

/// `fogline-cloud rollout start` of `module` for function `f` with `args`.
fn rollout_start(f: &Fleet, module: &str, args: &[&str]) -> (i32, String, String) {
    let config = f.cloud.config.to_string_lossy().into_owned();
    let mut all = vec![
        "rollout",
        "start",
        "--config",
        &config,
        "--token",
        TEST_TOKEN,
        module,
        "--function",
        "f",
    ];
    all.extend_from_slice(args);
    fogline_cloud(f.dir.path(), &all)
}

fn sha8(bytes: &[u8]) -> String {
    fogline_protocol::signing::sha256_hex(bytes)[..8].to_string()
}

fn rollout_json(cloud: &Cloud, id: u64) -> Value {
    let (code, body) = http_get(cloud.http_port, &format!("/api/v1/rollouts/{id}")).unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn node_state(r: &Value, node: &str) -> (String, String) {
    let p = r["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == node)
        .unwrap();
    (
        p["state"].as_str().unwrap_or("").to_string(),
        p["reason"].as_str().unwrap_or("").to_string(),
    )
}

/// The version label of the edge's function `f`, once nothing is on
/// probation.
fn running_version(edge: &Edge) -> Option<String> {
    let s = edge.status()?;
    let f = s["functions"].as_array()?.first()?.clone();
    f["candidate"]
        .is_null()
        .then(|| f["version"].as_str().unwrap_or("").to_string())
}

struct Fleet {
    dir: tempfile::TempDir,
    cloud: Cloud,
    edges: Vec<Edge>,
    ports: Vec<u16>,
    modules: Vec<PathBuf>,
}

impl Fleet {
    fn logs(&self) -> String {
        let mut s = format!("--- cloud\n{}", self.cloud.daemon.log_text());
        for (i, e) in self.edges.iter().enumerate() {
            let log = e.daemon.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            s += &format!(
                "\n--- {}\n{}",
                NODES[i],
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        s
    }
}

/// Three gateways trusting the fleet key `fleet.key`. gw-1 and gw-2 run
/// `scale` on the readings; gw-3 runs `hostile` in its `ok` mode (it passes
/// readings on) with a config only that module accepts — so a new `scale`
/// build fails its `init` there, and only there.
fn fleet() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    fogline_testkit::certs::dev_bundle(&certs, &NODES).unwrap();
    let cloud = Cloud::start(dir.path(), &certs).unwrap();
    let (code, out, err) = fogline_cloud(dir.path(), &["modules", "keygen", "--out", "fleet.key"]);
    assert_eq!(code, 0, "{err}");
    let trusted = out.lines().nth(1).unwrap().to_string();
    let (mut edges, mut ports, mut modules) = (Vec::new(), Vec::new(), Vec::new());
    for (i, node) in NODES.iter().enumerate() {
        let module = dir.path().join(format!("{node}-f.wasm"));
        let (source, config) = if i < 2 {
            (fogline_modules::scale(), "{ field = \"temp\" }")
        } else {
            (fogline_modules::hostile(), "{ mode = \"ok\" }")
        };
        std::fs::copy(source, &module).unwrap();
        publish(dir.path(), &module, "f", "1.0.0", "fleet.key");
        let port = fogline_tests::free_tcp_port().unwrap();
        let body = format!(
            "[modules]\n{trusted}\n\
             [broker]\nembedded = true\nlisten = \"127.0.0.1:{port}\"\n\
             [outbox]\ntick_interval = \"100ms\"\n\
             [functions.f]\nmodule = \"{}\"\nconfig = {config}\nprobation_batches = 3\n\
             [[pipelines]]\nname = \"p\"\ntopics = [\"sensors/#\"]\nfunctions = [\"f\"]\n\
             {}labels = {{ site = \"{}\" }}\n",
            module.display(),
            uplink_toml(node, &certs, cloud.quic_port),
            if i == 0 { "north" } else { "south" },
        );
        edges.push(Edge::start(dir.path(), node, &body).unwrap());
        ports.push(port);
        modules.push(module);
    }
    Fleet {
        dir,
        cloud,
        edges,
        ports,
        modules,
    }
}

impl Fleet {
    /// Waits until the aggregator knows every gateway with its status (a
    /// node is listed once it has sent data).
    fn wait_known(&self) {
        let known = process::wait_until(Duration::from_secs(60), || {
            self.cloud.nodes().is_some_and(|n| {
                NODES.iter().all(|node| {
                    n.as_array()
                        .into_iter()
                        .flatten()
                        .any(|x| x["node"] == *node && !x["status"].is_null())
                })
            })
        });
        assert!(known, "not every gateway reported:\n{}", self.logs());
    }
}

/// A rollout to three gateways, one of which fails the new build's
/// `init`: that one rolls back by itself, the stage's failure stops the
/// rollout, the two nodes of the first stage revert, and the status says
/// why (I-42). Then a build signed by a key no gateway trusts is refused by
/// every node (I-41). Sensors publish to every gateway throughout; every
/// reading arrives once (I-3).
#[test]
fn i42_a_failing_stage_stops_the_rollout_and_reverts_and_an_untrusted_build_is_refused_everywhere()
{
    let mut f = fleet();
    let publishers: Vec<BackgroundPublisher> = f
        .ports
        .iter()
        .map(|p| BackgroundPublisher::start(*p, SENSORS, PER_SENSOR, Some(20)))
        .collect();
    for p in &publishers {
        assert!(p.wait_for(100, Duration::from_secs(60)), "{}", f.logs());
    }
    f.wait_known();
    let v1: Vec<String> = f
        .modules
        .iter()
        .map(|m| sha8(&std::fs::read(m).unwrap()))
        .collect();

    // v2: a new build of `scale`, signed by the fleet key.
    let v2_path = f.dir.path().join("scale-2.wasm");
    let v2 = rebuilt(fogline_modules::scale(), "v2");
    std::fs::write(&v2_path, &v2).unwrap();
    publish(f.dir.path(), &v2_path, "scale", "2.0.0", "fleet.key");
    let config = f.cloud.config.to_string_lossy().into_owned();
    let v2_arg = v2_path.to_string_lossy().into_owned();
    // Stage 1: gw-1 and gw-2 (60 % of 3); stage 2: gw-3.
    let (code, out, err) = rollout_start(
        &f,
        &v2_arg,
        &[
            "--nodes",
            "gw-1,gw-2,gw-3",
            "--stages",
            "60,100",
            "--wait",
            "120s",
        ],
    );
    eprintln!("fogline-cloud rollout start printed:\n{out}");
    let logs = || format!("stdout:\n{out}\nstderr:\n{err}\n{}", f.logs());
    assert_eq!(code, 1, "the rollout stops: {}", logs());
    assert!(
        out.contains("rollout #1: scale 2.0.0")
            && out.contains("stage 2 of 2")
            && out.contains("STOPPED: stage 2 of 2: 1 of 1 node(s) failed")
            && out.contains("gw-3 rolled back"),
        "{}",
        logs()
    );
    // The first stage took the build before the second was sent.
    for node in ["gw-1", "gw-2"] {
        assert!(
            out.contains(&format!("{node:<20} promoted")),
            "{node}: {}",
            logs()
        );
    }
    let r = rollout_json(&f.cloud, 1);
    let (state, reason) = node_state(&r, "gw-3");
    assert_eq!(state, "rolled_back", "{r}");
    assert!(
        reason.contains("unknown field `mode`"),
        "gw-3's reason is its init's error: {reason}"
    );
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("unknown field `mode`"),
        "{r}"
    );

    // The nodes of stage 1 go back to the build they ran before.
    let reverted = process::wait_until(Duration::from_secs(60), || {
        let r = rollout_json(&f.cloud, 1);
        ["gw-1", "gw-2"]
            .iter()
            .all(|n| node_state(&r, n).0 == "reverted")
    });
    assert!(reverted, "{}\n{}", rollout_json(&f.cloud, 1), f.logs());
    for (i, edge) in f.edges.iter().enumerate() {
        let back = process::wait_until(Duration::from_secs(60), || {
            running_version(edge).is_some_and(|v| v.contains(&format!("module {}", v1[i])))
        });
        assert!(back, "{} runs {:?}\n{}", NODES[i], edge.status(), f.logs());
        assert_eq!(
            sha8(&std::fs::read(&f.modules[i]).unwrap()),
            v1[i],
            "{}: the file on disk is what runs",
            NODES[i]
        );
        let s = edge.status().unwrap();
        let d = &s["deployments"][0];
        assert_eq!(d["rollout"], 1, "{s}");
        let want = if i < 2 { "reverted" } else { "rolled_back" };
        assert_eq!(d["state"], want, "{}: {s}", NODES[i]);
    }

    // A build signed by a key no gateway trusts: every node refuses it.
    let (code, _, err) = fogline_cloud(f.dir.path(), &["modules", "keygen", "--out", "rogue.key"]);
    assert_eq!(code, 0, "{err}");
    let rogue_path = f.dir.path().join("scale-3.wasm");
    std::fs::write(&rogue_path, rebuilt(fogline_modules::scale(), "v3")).unwrap();
    publish(f.dir.path(), &rogue_path, "scale", "3.0.0", "rogue.key");
    let rogue_arg = rogue_path.to_string_lossy().into_owned();
    let (code, out, err) = rollout_start(
        &f,
        &rogue_arg,
        &[
            "--percent",
            "100",
            "--max-failure-rate",
            "1",
            "--wait",
            "60s",
        ],
    );
    let logs = || format!("stdout:\n{out}\nstderr:\n{err}\n{}", f.logs());
    assert_eq!(code, 1, "{}", logs());
    assert!(
        out.contains("STOPPED: no node took the build"),
        "{}",
        logs()
    );
    let r = rollout_json(&f.cloud, 2);
    for (i, node) in NODES.iter().enumerate() {
        let (state, reason) = node_state(&r, node);
        assert_eq!(state, "refused", "{node}: {r}");
        assert!(
            reason.contains("not among the 1 trusted key(s)"),
            "{node}: {reason}"
        );
        assert_eq!(
            sha8(&std::fs::read(&f.modules[i]).unwrap()),
            v1[i],
            "{node}: nothing was installed"
        );
    }
    // The label target and the status listing (`fogline-cloud rollout status`).
    let (code, out, err) = fogline_cloud(
        f.dir.path(),
        &[
            "rollout", "status", "--config", &config, "--token", TEST_TOKEN,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("#1 scale 2.0.0") && out.contains("#2 scale 3.0.0"),
        "{out}"
    );

    // Every reading reached the cloud once, whatever ran it.
    for p in publishers {
        p.finish().unwrap();
    }
    let expected: BTreeSet<String> = (0..SENSORS)
        .flat_map(|s| (0..PER_SENSOR).map(move |n| sensors::reading_id(s, n)))
        .collect();
    for node in NODES {
        let mut verdict = None;
        let done = process::wait_until(Duration::from_secs(60), || {
            let records: Vec<_> = fogline_tests::oracle::read_store(&f.cloud.store)
                .unwrap_or_default()
                .into_iter()
                .filter(|r| r.node == node)
                .collect();
            let v = fogline_tests::oracle::judge(&records, &expected);
            let exact = v.is_exact();
            verdict = Some(v);
            exact
        });
        let v = verdict.unwrap();
        assert!(done, "{node}: {}\n{}", v.summary(), f.logs());
    }

    // Resumable: a rollout to a gateway that is down waits for it, and the
    // gateway takes the build once, when it is back.
    f.edges[1].daemon.terminate().unwrap();
    assert!(f.edges[1]
        .daemon
        .wait_exit(Duration::from_secs(20))
        .is_some());
    let (code, out, err) = rollout_start(&f, &v2_arg, &["--nodes", "gw-2", "--wait", "0s"]);
    assert_eq!(code, 2, "still running: {out}{err}");
    assert!(out.contains("rollout #3"), "{out}");
    std::thread::sleep(Duration::from_secs(2));
    let r = rollout_json(&f.cloud, 3);
    assert_eq!(
        (r["state"].as_str(), node_state(&r, "gw-2").0.as_str()),
        (Some("running"), "pending"),
        "{r}"
    );
    // A second rollout of the function to that node would undo this one.
    let (code, _, err) = rollout_start(&f, &v2_arg, &["--nodes", "gw-1,gw-2"]);
    assert!(
        code == 1 && err.contains("rollout #3 of `f` is still under way on 1 of these nodes (gw-2"),
        "{err}"
    );
    f.edges[1].daemon.restart().unwrap();
    // Traffic for its probation batches.
    let traffic = BackgroundPublisher::start(f.ports[1], 1, 200, Some(40));
    let completed = process::wait_until(Duration::from_secs(60), || {
        rollout_json(&f.cloud, 3)["state"] == "completed"
    });
    assert!(completed, "{}\n{}", rollout_json(&f.cloud, 3), f.logs());
    traffic.finish().unwrap();
    let v2_sha = sha8(&v2);
    assert!(running_version(&f.edges[1]).is_some_and(|v| v.contains(&format!("module {v2_sha}"))));
    assert_eq!(sha8(&std::fs::read(&f.modules[1]).unwrap()), v2_sha);
    let s = f.edges[1].status().unwrap();
    let threes: Vec<&Value> = s["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["rollout"] == 3)
        .collect();
    assert_eq!(threes.len(), 1, "{s}");
    assert_eq!(threes[0]["state"], "promoted", "{s}");
    let sent = f
        .cloud
        .daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("deployment sent") && l.contains("rollout=3"))
        .count();
    assert_eq!(sent, 1, "sent once, when the node came back");
}
