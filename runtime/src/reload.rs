//! Reloading functions on a running daemon: on SIGHUP, or when the config
//! file or a module file changes (looked at every two seconds), the config
//! is read again and every function's build and settings go to the pipeline
//! worker, which starts changed builds on probation (`pipeline::versions`).
//! Modules are compiled here, off the pipeline thread. A config that does not
//! load is logged with every problem and changes nothing; changes to
//! anything but functions take effect at the next restart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::config::EdgeConfig;
use crate::functions::FunctionRuntime;
use crate::pipeline::versions::{self, ModuleStore, RELOAD_POLL};
use crate::pipeline::{Spec, SwapRequest, Version, WorkerCommand};

/// What a file looked like: modified time and length.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &std::path::Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn stamps(config: &EdgeConfig) -> BTreeMap<PathBuf, Stamp> {
    let mut out = BTreeMap::new();
    if let Some(p) = &config.path {
        out.insert(p.clone(), stamp(p));
    }
    for f in config.functions.values() {
        let p = config.resolve(&f.module);
        let s = stamp(&p);
        out.insert(p, s);
    }
    out
}

/// Pipelines as far as a reload cannot change them.
fn topology(config: &EdgeConfig) -> Vec<(String, Vec<String>, Vec<String>)> {
    config
        .pipelines
        .iter()
        .map(|p| (p.name.clone(), p.topics.clone(), p.functions.clone()))
        .collect()
}

/// Watch for reloads until shutdown.
pub async fn watch(
    config: EdgeConfig,
    runtime: Arc<FunctionRuntime>,
    store: ModuleStore,
    commands: mpsc::UnboundedSender<WorkerCommand>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(path) = config.path.clone() else {
        return;
    };
    let started_topology = topology(&config);
    let mut seen = stamps(&config);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let forced = tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(RELOAD_POLL) => false,
            _ = hangup => true,
        };
        let current = match EdgeConfig::load(&path) {
            Ok(c) => c,
            Err(e) => {
                if forced || stamps_changed(&seen, &path) {
                    error!(error = %e, "Reload: the config does not load; nothing changed.");
                    seen.insert(path.clone(), stamp(&path));
                }
                continue;
            }
        };
        let now = stamps(&current);
        if !forced && now == seen {
            continue;
        }
        seen = now;
        info!(config = %path.display(), signal = forced, "Reloading functions.");
        if topology(&current) != started_topology {
            warn!("Reload: pipelines (names, topics or function lists) changed; that takes effect at the next restart. Functions' builds and settings are reloaded now.");
        }
        let rt = runtime.clone();
        let store = store.clone();
        let built = tokio::task::spawn_blocking(move || requests(&current, &rt, &store)).await;
        match built {
            Ok(Ok(requests)) => {
                if commands.send(WorkerCommand::Swap(requests)).is_err() {
                    return;
                }
            }
            Ok(Err(e)) => error!(error = %e, "Reload: a module does not load; nothing changed."),
            Err(e) => error!(error = %e, "Reload: the build task failed; nothing changed."),
        }
    }
}

fn stamps_changed(seen: &BTreeMap<PathBuf, Stamp>, path: &std::path::Path) -> bool {
    seen.get(path).cloned().flatten() != stamp(path)
}

/// Every function's build and settings, compiled.
fn requests(
    config: &EdgeConfig,
    runtime: &FunctionRuntime,
    store: &ModuleStore,
) -> Result<Vec<SwapRequest>, crate::functions::FunctionError> {
    let mut out = Vec::new();
    for w in versions::wanted(config)? {
        let module = runtime.load_bytes(&w.path, &w.bytes)?;
        // A trial `init`, here and not on the pipeline thread: an `init` that
        // hangs (until `init_timeout`) or fails is found without holding up
        // any batch. The real start, from the running version's state,
        // happens between two batches.
        let init_error = crate::functions::FunctionInstance::from_module(
            &module,
            &w.function,
            &w.config_json,
            w.limits.clone(),
            Default::default(),
        )
        .err()
        .map(|e| e.to_string());
        // Kept before it runs: after a promotion and a restart, the build
        // that runs must be found even if its file changed again.
        if let Err(e) = store.put(&w.module_sha256, &w.bytes) {
            return Err(crate::functions::FunctionError::Load {
                path: w.path.clone(),
                reason: format!("keeping a copy in the module store: {e}"),
            });
        }
        out.push(SwapRequest {
            owner: w.owner,
            spec: Spec {
                module,
                config_json: w.config_json.clone(),
                limits: w.limits,
            },
            version: Version {
                generation: 0,
                module_sha256: w.module_sha256,
                config_sha256: w.config_sha256,
                config_json: w.config_json,
            },
            breaker: w.breaker,
            on_open: w.on_open,
            probation: w.probation,
            max_held_bytes: w.max_held_bytes,
            init_error,
        });
    }
    Ok(out)
}
