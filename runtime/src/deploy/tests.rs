//! The deployer against real files, a real journal and the real wasm
//! runtime (no daemon): what it refuses and why, a resend answered from the
//! journal, and an install a crash cut short undone at start (I-42).

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fogline_protocol::deploy::{DeployAction, DeployFrame, DeployState, DeploymentReport};
use fogline_protocol::signing::SigningKey;

use super::journal::{Entry, Journal};
use super::{start, Reports};
use crate::config::EdgeConfig;
use crate::functions::FunctionRuntime;
use crate::pipeline::versions::sha256_hex;

struct Node {
    dir: tempfile::TempDir,
    config: EdgeConfig,
    key: SigningKey,
}

/// A node with function `f` (module `f.wasm`, bytes `old`) trusting one key.
fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = SigningKey::generate().unwrap();
    std::fs::write(dir.path().join("f.wasm"), b"old").unwrap();
    let config = EdgeConfig::parse(
        &format!(
            "[node]\nid = \"n\"\ndata_dir = \"data\"\n\
             [modules]\ntrusted_keys = [\"{}\"]\n\
             [functions.f]\nmodule = \"f.wasm\"\n",
            key.public_key()
        ),
        dir.path(),
    )
    .unwrap();
    Node { dir, config, key }
}

fn install(rollout: u64, key: &SigningKey, module: &[u8]) -> DeployFrame {
    let sig = key.sign("f", "2.0.0", module);
    DeployFrame {
        rollout,
        function: "f".into(),
        action: DeployAction::Install {
            signature: serde_json::to_string(&sig).unwrap(),
            module: module.to_vec(),
        },
    }
}

async fn report_of(reports: &Reports, rollout: u64) -> DeploymentReport {
    for _ in 0..200 {
        let found = reports
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.rollout == rollout)
            .cloned();
        if let Some(r) = found {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no report of rollout {rollout}");
}

#[tokio::test]
async fn untrusted_and_unloadable_builds_are_refused_and_a_resend_is_answered_from_the_journal() {
    let n = node();
    let runtime = Arc::new(FunctionRuntime::new(Default::default()).unwrap());
    let reports: Reports = Default::default();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let h = start(
        &n.config,
        runtime,
        Arc::new(Mutex::new(Vec::new())),
        reports.clone(),
        shutdown,
    )
    .unwrap();

    let (rogue, _) = SigningKey::generate().unwrap();
    assert!(h.offer(install(1, &rogue, b"\0asm new")));
    let r = report_of(&reports, 1).await;
    assert_eq!(r.state, DeployState::Refused);
    let reason = r.reason.clone().unwrap();
    assert!(
        reason.contains("not among the 1 trusted key(s)"),
        "{reason}"
    );

    // Signed by the trusted key, but no component: refused before the file.
    assert!(h.offer(install(2, &n.key, b"\0asm not a component")));
    let r2 = report_of(&reports, 2).await;
    assert_eq!(r2.state, DeployState::Refused);
    assert!(
        r2.reason
            .as_deref()
            .unwrap()
            .contains("the build does not load"),
        "{r2:?}"
    );
    assert_eq!(std::fs::read(n.dir.path().join("f.wasm")).unwrap(), b"old");

    // A function the node does not have.
    let mut other = install(3, &n.key, b"\0asm x");
    other.function = "g".into();
    assert!(h.offer(other));
    let r3 = report_of(&reports, 3).await;
    assert!(
        r3.reason.as_deref().unwrap().contains("no function `g`"),
        "{r3:?}"
    );

    // Sent again (a reconnect): answered from the journal, not redone.
    assert!(h.offer(install(1, &rogue, b"\0asm new")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = report_of(&reports, 1).await;
    assert_eq!(again, r, "the first answer, unchanged");
    let journal = Journal::open(&n.config.data_dir().join("deployments.json")).unwrap();
    assert_eq!(journal.reports().len(), 3);
}

/// A crash after the journal recorded an install and before the module
/// file was replaced: at start the install is undone (the old files put
/// back, the entry forgotten), so the aggregator's resend does it again.
#[tokio::test]
async fn an_install_a_crash_cut_short_is_undone_at_start() {
    let n = node();
    let data = n.config.data_dir();
    std::fs::create_dir_all(data.join("deployments")).unwrap();
    let kept = data.join("deployments/7-f.wasm");
    std::fs::write(&kept, b"old").unwrap();
    let module = n.dir.path().join("f.wasm");
    // The signature was already replaced when the crash came.
    std::fs::write(n.dir.path().join("f.wasm.sig"), b"new signature").unwrap();
    let mut journal = Journal::open(&data.join("deployments.json")).unwrap();
    journal
        .put(Entry {
            report: DeploymentReport {
                rollout: 7,
                function: "f".into(),
                action: "install".into(),
                state: DeployState::Probation,
                version: "f 2.0.0".into(),
                reason: None,
                at_ms: 1,
            },
            module: module.clone(),
            sha256: sha256_hex(b"new"),
            previous: Some(kept),
            previous_sig: None,
            installed_at_ms: 1,
        })
        .unwrap();
    drop(journal);

    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let reports: Reports = Default::default();
    start(
        &n.config,
        Arc::new(FunctionRuntime::new(Default::default()).unwrap()),
        Arc::new(Mutex::new(Vec::new())),
        reports.clone(),
        shutdown,
    )
    .unwrap();
    assert_eq!(std::fs::read(&module).unwrap(), b"old");
    assert!(
        !n.dir.path().join("f.wasm.sig").exists(),
        "the module had no signature before: none now"
    );
    let journal = Journal::open(&data.join("deployments.json")).unwrap();
    assert!(journal.find(7, "f").is_none());
    assert!(reports.lock().unwrap().is_empty());
}
