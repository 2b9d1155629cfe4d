//! Rollouts from the aggregator (protocol 6 `Deploy` frames): install a
//! signed build for a function, follow its hot swap to promotion or
//! rollback, revert it when the rollout stops — each `(rollout, action)`
//! at most once (ARCHITECTURE.md I-42).
//!
//! The hot swap itself is the daemon's (`pipeline::versions`, started by
//! the reload watcher when the module file changes); this module only
//! decides whether a build may be installed, replaces the files the way
//! `fogline-edge module deploy` does, and reports. The order on disk:
//! 1. the build is checked: the function exists, the signature is by a
//!    trusted key and covers the bytes, the component compiles;
//! 2. the running build (and its signature) is copied to
//!    `<data_dir>/deployments/`;
//! 3. the journal records the install (state `probation`), fsynced;
//! 4. the signature, then the module, are replaced atomically.
//!
//! A crash between 3 and 4 is found at start (the module file is not the
//! recorded build): the entry is forgotten and the old files put back, and
//! the aggregator's resend installs it again.

pub mod files;
pub mod journal;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fogline_protocol::deploy::{DeployAction, DeployFrame, DeployState, DeploymentReport};
use fogline_protocol::signing::ModuleSignature;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{info, warn};

use crate::config::EdgeConfig;
use crate::functions::FunctionRuntime;
use crate::pipeline::versions::sha256_hex;
use crate::pipeline::FunctionStatus;
use journal::{Entry, Journal};

/// Deployments waiting to be handled; more are dropped (the aggregator
/// sends them again until the status shows them).
const QUEUE: usize = 8;

/// How often a build on probation is looked at.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// Metric names and HELP.
pub mod events {
    use fogline_telemetry::help::{Help, Kind::*};

    /// Deployments that reached a state, by state.
    pub const DEPLOYMENTS_TOTAL: &str = "fogline_deployments_total";

    /// HELP texts.
    pub const HELP: &[Help] = &[(
        DEPLOYMENTS_TOTAL,
        Counter,
        "Rollout deployments on this node that reached a state (probation, promoted, rolled_back, refused, reverted, revert_failed), by state.",
    )];
}

/// The deployer could not keep its journal.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// Reading or writing `deployments.json` failed.
    #[error("deployment journal {path}: {source}")]
    Journal {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What the uplink holds of the deployer.
#[derive(Clone)]
pub struct DeployHandle {
    tx: mpsc::Sender<DeployFrame>,
    /// Raised when a deployment's state changed: send a status now.
    pub changed: Arc<Notify>,
}

impl DeployHandle {
    /// Hands a `Deploy` over; false when the queue is full (it is resent).
    pub fn offer(&self, frame: DeployFrame) -> bool {
        self.tx.try_send(frame).is_ok()
    }
}

/// The reports the node's status carries.
pub type Reports = Arc<Mutex<Vec<DeploymentReport>>>;

struct Deployer {
    config: EdgeConfig,
    runtime: Arc<FunctionRuntime>,
    functions: Arc<Mutex<Vec<FunctionStatus>>>,
    journal: Journal,
    kept: PathBuf,
    reports: Reports,
    changed: Arc<Notify>,
    /// Installs on probation, looked at every `FOLLOW_EVERY`.
    following: Vec<Entry>,
}

/// Starts the deployer for `config`'s daemon: opens the journal, settles
/// installs a crash interrupted, and follows builds still on probation.
pub fn start(
    config: &EdgeConfig,
    runtime: Arc<FunctionRuntime>,
    functions: Arc<Mutex<Vec<FunctionStatus>>>,
    reports: Reports,
    shutdown: watch::Receiver<bool>,
) -> Result<DeployHandle, DeployError> {
    let data = config.data_dir();
    let kept = data.join("deployments");
    std::fs::create_dir_all(&kept).map_err(|e| DeployError::Journal {
        path: kept.clone(),
        source: e,
    })?;
    let journal = Journal::open(&data.join("deployments.json"))?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let changed = Arc::new(Notify::new());
    let mut d = Deployer {
        config: config.clone(),
        runtime,
        functions,
        journal,
        kept,
        reports,
        changed: changed.clone(),
        following: Vec::new(),
    };
    d.settle_interrupted()?;
    d.publish();
    tokio::spawn(d.run(rx, shutdown));
    Ok(DeployHandle { tx, changed })
}

fn now_ms() -> u64 {
    crate::clock::now_ms()
}

impl Deployer {
    /// Installs that a crash cut between the journal and the file: undone.
    fn settle_interrupted(&mut self) -> Result<(), DeployError> {
        for e in self.journal.on_probation() {
            let on_disk = std::fs::read(&e.module).map(|b| sha256_hex(&b));
            if on_disk.is_ok_and(|s| s == e.sha256) {
                continue;
            }
            warn!(
                rollout = e.report.rollout,
                function = %e.report.function,
                "A rollout's install was interrupted before its module was replaced; undone (the aggregator sends it again)."
            );
            self.put_back(&e);
            self.journal.forget(e.report.rollout, &e.report.function)?;
        }
        Ok(())
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<DeployFrame>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // A build on probation is looked at between frames, so a revert
        // or another deployment never waits for its traffic.
        self.following = self.journal.on_probation();
        loop {
            let following = !self.following.is_empty();
            tokio::select! {
                _ = shutdown.changed() => return,
                f = rx.recv() => match f {
                    Some(f) => self.handle(f).await,
                    None => return,
                },
                _ = tokio::time::sleep(FOLLOW_EVERY), if following => self.settle(),
            }
        }
    }

    /// The reports, to the status; the uplink is told to send one.
    fn publish(&self) {
        if let Ok(mut r) = self.reports.lock() {
            *r = self.journal.reports();
        }
        self.changed.notify_one();
    }

    /// Records `entry`; a journal that cannot be written is logged (the
    /// aggregator sends the deployment again, and it is redone).
    fn record(&mut self, entry: Entry) {
        metrics::counter!(events::DEPLOYMENTS_TOTAL, "state" => entry.report.state.name())
            .increment(1);
        let (rollout, function, state) = (
            entry.report.rollout,
            entry.report.function.clone(),
            entry.report.state,
        );
        match &entry.report.reason {
            Some(reason) if state.is_failure() => {
                warn!(rollout, %function, state = state.name(), %reason, "Rollout: not taken.")
            }
            _ => {
                info!(rollout, %function, state = state.name(), version = %entry.report.version, "Rollout.")
            }
        }
        if let Err(e) = self.journal.put(entry) {
            warn!(error = %e, "Cannot write the deployment journal.");
        }
        self.publish();
    }

    fn report(
        frame: &DeployFrame,
        state: DeployState,
        version: &str,
        reason: Option<String>,
    ) -> DeploymentReport {
        DeploymentReport {
            rollout: frame.rollout,
            function: frame.function.clone(),
            action: frame.action.name().into(),
            state,
            version: version.into(),
            reason,
            at_ms: now_ms(),
        }
    }

    /// Handles one frame.
    async fn handle(&mut self, frame: DeployFrame) {
        let known = self.journal.find(frame.rollout, &frame.function).cloned();
        match &frame.action {
            DeployAction::Install { signature, module } => {
                if known.is_some() {
                    // Done already (or reverted since): say so again.
                    self.publish();
                    return;
                }
                match self.install(&frame, signature, module).await {
                    Ok(entry) => {
                        self.following.push(entry.clone());
                        self.record(entry);
                    }
                    Err(reason) => {
                        let target = self
                            .config
                            .functions
                            .get(&frame.function)
                            .map(|f| self.config.resolve(&f.module))
                            .unwrap_or_default();
                        self.record(Entry {
                            report: Self::report(
                                &frame,
                                DeployState::Refused,
                                &version_of(signature),
                                Some(reason),
                            ),
                            module: target,
                            sha256: String::new(),
                            previous: None,
                            previous_sig: None,
                            installed_at_ms: 0,
                        });
                    }
                }
            }
            DeployAction::Revert => {
                // Whatever it is doing, it is not on probation any more.
                self.following.retain(|e| {
                    !(e.report.rollout == frame.rollout && e.report.function == frame.function)
                });
                match known {
                    Some(e) if e.report.action == "revert" => self.publish(),
                    Some(e)
                        if matches!(
                            e.report.state,
                            DeployState::Promoted | DeployState::Probation
                        ) =>
                    {
                        let state = if self.put_back(&e) {
                            DeployState::Reverted
                        } else {
                            DeployState::RevertFailed
                        };
                        let reason = match state {
                            DeployState::Reverted => format!(
                                "rollout {} stopped: the build that ran before it is back",
                                frame.rollout
                            ),
                            _ => format!(
                                "rollout {} stopped, and the build that ran before it could not be put back (see the daemon's log)",
                                frame.rollout
                            ),
                        };
                        let mut e = e;
                        e.report = Self::report(&frame, state, &e.report.version, Some(reason));
                        self.record(e);
                    }
                    // Never took the build (refused, rolled back): it runs
                    // the old one already.
                    Some(mut e) => {
                        e.report.action = "revert".into();
                        self.record(e);
                    }
                    None => self.record(Entry {
                        report: Self::report(
                            &frame,
                            DeployState::RevertFailed,
                            "",
                            Some(format!(
                                "nothing of rollout {} was installed on this node",
                                frame.rollout
                            )),
                        ),
                        module: PathBuf::new(),
                        sha256: String::new(),
                        previous: None,
                        previous_sig: None,
                        installed_at_ms: 0,
                    }),
                }
            }
        }
    }

    /// Checks and installs a build; the entry on probation, or why not.
    async fn install(
        &mut self,
        frame: &DeployFrame,
        signature: &str,
        module: &[u8],
    ) -> Result<Entry, String> {
        let function = self.config.functions.get(&frame.function).ok_or_else(|| {
            format!(
                "this node has no function `{}` ([functions.{}] in its config)",
                frame.function, frame.function
            )
        })?;
        let target = self.config.resolve(&function.module);
        let trusted = self.config.modules.keys();
        if trusted.is_empty() {
            return Err("this node trusts no fleet key ([modules] trusted_keys is empty): it takes no build from a rollout".into());
        }
        ModuleSignature::parse(signature.as_bytes())
            .and_then(|s| s.verify(module, &trusted))
            .map_err(|e| format!("signature refused: {e}"))?;
        let sha = sha256_hex(module);
        // The daemon does not try a build it rolled back again until its
        // module or config changes: following it would wait for ever.
        if let Some(reason) = rollback_of(&self.slots(&frame.function), &sha, 0) {
            return Err(format!(
                "this node rolled this build back already ({reason}); it is not tried again until the module or the function's config changes"
            ));
        }
        let on_disk = std::fs::read(&target).map_err(|e| {
            format!(
                "cannot read the running build {} to keep it: {e}",
                target.display()
            )
        })?;
        if sha256_hex(&on_disk) == sha {
            return Err(format!(
                "{} already holds this build ({}): nothing to roll out",
                target.display(),
                &sha[..8]
            ));
        }
        // A component that does not compile here never reaches the file.
        let (rt, path, bytes) = (self.runtime.clone(), target.clone(), module.to_vec());
        tokio::task::spawn_blocking(move || rt.load_bytes(&path, &bytes).map(|_| ()))
            .await
            .map_err(|e| format!("compiling the build: {e}"))?
            .map_err(|e| format!("the build does not load: {e}"))?;

        let stem = format!("{}-{}", frame.rollout, frame.function);
        let previous = self.kept.join(format!("{stem}.wasm"));
        files::write_atomic(&previous, &on_disk).map_err(|e| {
            format!(
                "cannot keep the running build as {}: {e}",
                previous.display()
            )
        })?;
        let sig_target = files::sig_path(&target);
        let previous_sig = match std::fs::read(&sig_target) {
            Ok(old) => {
                let p = self.kept.join(format!("{stem}.wasm.sig"));
                files::write_atomic(&p, &old)
                    .map_err(|e| format!("cannot keep the running signature: {e}"))?;
                Some(p)
            }
            Err(_) => None,
        };
        let entry = Entry {
            report: Self::report(frame, DeployState::Probation, &version_of(signature), None),
            module: target.clone(),
            sha256: sha,
            previous: Some(previous),
            previous_sig,
            installed_at_ms: now_ms(),
        };
        self.journal
            .put(entry.clone())
            .map_err(|e| format!("cannot record the install: {e}"))?;
        // The signature first: the daemon reloads when the module changes.
        let installed = files::write_atomic(&sig_target, signature.as_bytes())
            .and_then(|()| files::write_atomic(&target, module));
        if let Err(e) = installed {
            self.put_back(&entry);
            let _ = self.journal.forget(frame.rollout, &frame.function);
            return Err(format!(
                "cannot write {} (a rollout needs write access to the module's directory): {e}",
                target.display()
            ));
        }
        Ok(entry)
    }

    /// Puts back the files that ran before `e`'s install; false if that
    /// could not be done.
    fn put_back(&self, e: &Entry) -> bool {
        let Some(previous) = &e.previous else {
            return false;
        };
        let sig_target = files::sig_path(&e.module);
        let restored = std::fs::read(previous).and_then(|old| {
            match &e.previous_sig {
                Some(s) => files::write_atomic(&sig_target, &std::fs::read(s)?)?,
                None => match std::fs::remove_file(&sig_target) {
                    Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
                    _ => {}
                },
            }
            files::write_atomic(&e.module, &old)
        });
        match restored {
            Ok(()) => true,
            Err(err) => {
                warn!(module = %e.module.display(), error = %err, "Cannot put the previous build back.");
                false
            }
        }
    }

    /// The function's slots, as the daemon last reported them.
    fn slots(&self, function: &str) -> Vec<FunctionStatus> {
        let suffix = format!("/{function}");
        self.functions
            .lock()
            .map(|f| {
                f.iter()
                    .filter(|s| s.owner.ends_with(&suffix))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Where the hot swap of `entry`'s build stands: `None` while on
    /// probation (or not picked up yet), else promoted or rolled back.
    fn swap_outcome(&self, entry: &Entry) -> Option<(DeployState, Option<String>)> {
        let tag = tag(&entry.sha256);
        let slots = self.slots(&entry.report.function);
        // Slack for the worker's stamp (the same clock, read earlier).
        let since = entry.installed_at_ms.saturating_sub(1000);
        if let Some(reason) = rollback_of(&slots, &entry.sha256, since) {
            return Some((DeployState::RolledBack, Some(reason)));
        }
        slots
            .iter()
            .all(|s| s.version.contains(&tag) && s.candidate.is_none())
            .then(|| {
                (
                    DeployState::Promoted,
                    slots
                        .is_empty()
                        .then(|| "installed; no pipeline runs this function".into()),
                )
            })
    }

    /// Settles the builds on probation whose hot swap has ended.
    fn settle(&mut self) {
        let following = std::mem::take(&mut self.following);
        for mut entry in following {
            match self.swap_outcome(&entry) {
                None => self.following.push(entry),
                Some((state, reason)) => {
                    if state == DeployState::RolledBack {
                        // The file on disk is what runs.
                        self.put_back(&entry);
                    }
                    entry.report.state = state;
                    entry.report.reason = reason;
                    entry.report.at_ms = now_ms();
                    self.record(entry);
                }
            }
        }
    }
}

/// How a build shows in a function's version label (`module 1a2b3c4d`).
pub fn tag(sha256: &str) -> String {
    format!("module {}", sha256.chars().take(8).collect::<String>())
}

/// Why the daemon rolled build `sha256` back on one of `slots`, at or
/// after `since_ms`, if it did.
fn rollback_of(slots: &[FunctionStatus], sha256: &str, since_ms: u64) -> Option<String> {
    let tag = tag(sha256);
    slots.iter().find_map(|s| {
        let swap = s.last_swap.as_ref()?;
        (swap.outcome == "rolled_back" && swap.version.contains(&tag) && swap.at_ms >= since_ms)
            .then(|| swap.reason.clone().unwrap_or_else(|| "rolled back".into()))
    })
}

/// `name version` from a signature document, for reports.
fn version_of(signature: &str) -> String {
    ModuleSignature::parse(signature.as_bytes())
        .map(|s| {
            let short: String = s.sha256.chars().take(8).collect();
            format!("{} {} ({short})", s.name, s.version)
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
