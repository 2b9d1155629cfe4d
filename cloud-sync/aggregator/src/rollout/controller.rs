//! Runs the rollouts: every second (and at once when one is made or
//! stopped) reads the reports of each active rollout's nodes from their
//! stored statuses, moves its plan on, stores it, and publishes what each
//! node is still to be sent ([`Wants`]) for the sessions to send.
//!
//! Every aggregator of a cluster runs it over the same store; the plan is a
//! function of the stored reports, so they decide alike, and a node is
//! sent its deployment by whichever aggregator serves it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fogline_protocol::deploy::{DeployAction, DeployFrame, DeploymentReport};
use fogline_protocol::status::NodeStatus;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use super::plan::{self, Action};
use super::request::{KnownNode, RolloutRequest, RolloutRequestError};
use super::{Rollout, RolloutState};
use crate::store::{Store, StoreError};

/// How often rollouts are looked at.
const TICK: Duration = Duration::from_secs(1);

/// Metric names and HELP.
pub mod events {
    use fogline_telemetry::help::{Help, Kind::*};

    /// Rollouts by `state`.
    pub const ROLLOUTS: &str = "fogline_cloud_rollouts";
    /// `Deploy` frames sent to nodes, by `action`.
    pub const DEPLOY_FRAMES_TOTAL: &str = "fogline_cloud_deploy_frames_total";

    /// HELP texts.
    pub const HELP: &[Help] = &[
        (
            ROLLOUTS,
            Gauge,
            "Rollouts of signed modules, by state (running, completed, stopped).",
        ),
        (
            DEPLOY_FRAMES_TOTAL,
            Counter,
            "Deploy frames sent to nodes (a build to install, or a revert), by action.",
        ),
    ];
}

/// What a node is to be sent for one rollout.
#[derive(Debug, Clone)]
pub struct Want {
    /// The rollout.
    pub rollout: u64,
    /// The function.
    pub function: String,
    /// Install or revert.
    pub action: Action,
    /// The build and its signature (installs).
    build: Option<(Arc<str>, Arc<Vec<u8>>)>,
}

impl Want {
    /// The frame to send (copies the build: one per connection at most).
    pub fn frame(&self) -> DeployFrame {
        DeployFrame {
            rollout: self.rollout,
            function: self.function.clone(),
            action: match &self.build {
                Some((sig, module)) if self.action == Action::Install => DeployAction::Install {
                    signature: sig.to_string(),
                    module: module.as_ref().clone(),
                },
                _ => DeployAction::Revert,
            },
        }
    }

    /// Bytes the frame takes.
    pub fn frame_bytes(&self) -> usize {
        self.build
            .as_ref()
            .map_or(64, |(s, m)| s.len() + m.len() + 64)
    }

    /// Whether `reported` (the node's own account) already covers it.
    pub fn is_reported(&self, reported: &[DeploymentReport]) -> bool {
        reported.iter().any(|d| {
            d.rollout == self.rollout
                && d.function == self.function
                && (self.action == Action::Install || d.action == "revert")
        })
    }
}

/// What each node is to be sent, as last decided; sessions watch
/// [`Wants::subscribe`] for changes.
#[derive(Clone)]
pub struct Wants {
    by_node: Arc<RwLock<HashMap<String, Vec<Want>>>>,
    version: Arc<watch::Sender<u64>>,
}

impl Default for Wants {
    fn default() -> Self {
        Self {
            by_node: Default::default(),
            version: Arc::new(watch::channel(0).0),
        }
    }
}

impl Wants {
    /// What `node` is to be sent.
    pub fn for_node(&self, node: &str) -> Vec<Want> {
        self.by_node
            .read()
            .map(|m| m.get(node).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Changes whenever the wants change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn set(&self, wants: HashMap<String, Vec<Want>>) {
        let same = self.by_node.read().is_ok_and(|m| {
            m.len() == wants.len()
                && m.iter().all(|(n, w)| {
                    wants.get(n).is_some_and(|x| {
                        x.len() == w.len()
                            && x.iter()
                                .zip(w)
                                .all(|(a, b)| (a.rollout, a.action) == (b.rollout, b.action))
                    })
                })
        });
        if same {
            return;
        }
        if let Ok(mut m) = self.by_node.write() {
            *m = wants;
        }
        self.version.send_modify(|v| *v += 1);
    }
}

/// Why a rollout could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The request is wrong (the caller's fault).
    #[error(transparent)]
    Request(#[from] RolloutRequestError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The rollout controller.
pub struct Controller {
    store: Arc<dyn Store>,
    wants: Wants,
    poke: Notify,
    /// Builds of rollouts with installs pending, by rollout.
    builds: Mutex<HashMap<u64, Arc<Vec<u8>>>>,
}

fn now_ms() -> u64 {
    fogline_telemetry::clock::now_ms()
}

fn to_json(r: &Rollout) -> String {
    serde_json::to_string(r).unwrap_or_default()
}

impl Controller {
    /// A controller over `store`, publishing to `wants`.
    pub fn new(store: Arc<dyn Store>, wants: Wants) -> Arc<Self> {
        Arc::new(Self {
            store,
            wants,
            poke: Notify::new(),
            builds: Default::default(),
        })
    }

    /// Runs until `shutdown` flips.
    pub fn spawn(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                match me.tick().await {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        warn!(error = %e, "Rollouts: the store failed; retrying every second.");
                    }
                    Err(_) => {}
                }
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(TICK) => {}
                    _ = me.poke.notified() => {}
                }
            }
        });
    }

    /// Makes a rollout from `req`.
    pub async fn create(&self, req: RolloutRequest) -> Result<Rollout, CreateError> {
        let nodes = self.store.nodes().await?;
        let known: Vec<KnownNode> = nodes
            .into_iter()
            .map(|n| KnownNode {
                labels: n
                    .status
                    .as_ref()
                    .and_then(|s| serde_json::from_value::<NodeStatus>(s.clone()).ok())
                    .map(|s| s.labels)
                    .unwrap_or_default(),
                node: n.node,
            })
            .collect();
        let now = now_ms();
        let (mut rollout, module) = req.build(&known, now)?;
        // Two rollouts of one function on one node would undo each other.
        for other in self.list().await? {
            let busy = other.state == RolloutState::Running || !plan::wanted(&other).is_empty();
            if !busy || other.function != rollout.function {
                continue;
            }
            let shared: Vec<&str> = other
                .nodes
                .iter()
                .filter(|p| rollout.nodes.iter().any(|q| q.node == p.node))
                .map(|p| p.node.as_str())
                .collect();
            if let Some(first) = shared.first() {
                return Err(RolloutRequestError::Invalid(format!(
                    "rollout #{} of `{}` is still under way on {} of these nodes ({first}, …): wait for it or stop it (`fogline-cloud rollout stop … {}`)",
                    other.id,
                    other.function,
                    shared.len(),
                    other.id
                ))
                .into());
            }
        }
        rollout.id = self
            .store
            .create_rollout(&to_json(&rollout), &module, now)
            .await?;
        info!(
            rollout = rollout.id,
            function = %rollout.function,
            module = %rollout.module,
            version = %rollout.version,
            nodes = rollout.nodes.len(),
            stages = ?rollout.stages,
            "Rollout started."
        );
        self.poke.notify_one();
        Ok(rollout)
    }

    /// Every rollout, oldest first.
    pub async fn list(&self) -> Result<Vec<Rollout>, StoreError> {
        Ok(self
            .store
            .rollouts()
            .await?
            .into_iter()
            .filter_map(|(id, doc)| parse(id, &doc))
            .collect())
    }

    /// Rollout `id`.
    pub async fn get(&self, id: u64) -> Result<Option<Rollout>, StoreError> {
        Ok(self.list().await?.into_iter().find(|r| r.id == id))
    }

    /// Stops rollout `id` (an operator's call): the nodes it reached that
    /// took the build are told to revert. `None`: no such rollout.
    pub async fn stop(&self, id: u64, reason: String) -> Result<Option<Rollout>, StoreError> {
        let Some(mut r) = self.get(id).await? else {
            return Ok(None);
        };
        if r.state == RolloutState::Running {
            plan::stop(&mut r, reason, now_ms());
            self.store
                .update_rollout(id, &to_json(&r), now_ms())
                .await?;
            info!(
                rollout = id,
                reason = r.reason.as_deref().unwrap_or(""),
                "Rollout stopped."
            );
            self.poke.notify_one();
        }
        Ok(Some(r))
    }

    async fn tick(&self) -> Result<(), StoreError> {
        let mut wants: HashMap<String, Vec<Want>> = HashMap::new();
        let mut counts: HashMap<&'static str, u64> = HashMap::new();
        let mut needed = Vec::new();
        for r in self.list().await? {
            let mut r = r;
            let before = (r.state, r.stage);
            if r.state != RolloutState::Completed {
                let names: Vec<String> = r.nodes.iter().map(|p| p.node.clone()).collect();
                let reports = reports(self.store.statuses(&names).await?, r.id, &r.function);
                let now = now_ms();
                if plan::advance(&mut r, &reports, now) {
                    r.updated_ms = now;
                    self.store.update_rollout(r.id, &to_json(&r), now).await?;
                    log_change(&r, before);
                }
            }
            *counts
                .entry(match r.state {
                    RolloutState::Running => "running",
                    RolloutState::Completed => "completed",
                    RolloutState::Stopped => "stopped",
                })
                .or_default() += 1;
            for (node, action) in plan::wanted(&r) {
                let build = match action {
                    Action::Install => {
                        needed.push(r.id);
                        match self.build(r.id).await? {
                            Some(m) => Some((Arc::<str>::from(r.signature.as_str()), m)),
                            None => continue,
                        }
                    }
                    Action::Revert => None,
                };
                wants.entry(node).or_default().push(Want {
                    rollout: r.id,
                    function: r.function.clone(),
                    action,
                    build,
                });
            }
        }
        if let Ok(mut b) = self.builds.lock() {
            b.retain(|id, _| needed.contains(id));
        }
        for state in ["running", "completed", "stopped"] {
            metrics::gauge!(events::ROLLOUTS, "state" => state)
                .set(counts.get(state).copied().unwrap_or(0) as f64);
        }
        self.wants.set(wants);
        Ok(())
    }

    /// Rollout `id`'s build, read once from the store.
    async fn build(&self, id: u64) -> Result<Option<Arc<Vec<u8>>>, StoreError> {
        if let Some(m) = self.builds.lock().ok().and_then(|b| b.get(&id).cloned()) {
            return Ok(Some(m));
        }
        let Some(m) = self.store.rollout_module(id).await? else {
            return Ok(None);
        };
        let m = Arc::new(m);
        if let Ok(mut b) = self.builds.lock() {
            b.insert(id, m.clone());
        }
        Ok(Some(m))
    }
}

fn parse(id: u64, doc: &str) -> Option<Rollout> {
    match serde_json::from_str::<Rollout>(doc) {
        Ok(mut r) => {
            r.id = id;
            Some(r)
        }
        Err(e) => {
            warn!(rollout = id, error = %e, "A stored rollout does not parse; skipped.");
            None
        }
    }
}

/// Each node's newest report of rollout `id` for `function`.
fn reports(
    statuses: Vec<(String, String)>,
    id: u64,
    function: &str,
) -> HashMap<String, DeploymentReport> {
    statuses
        .into_iter()
        .filter_map(|(node, json)| {
            let status = NodeStatus::decode(json.as_bytes()).ok()?;
            let report = status
                .deployments
                .into_iter()
                .rev()
                .find(|d| d.rollout == id && d.function == function)?;
            Some((node, report))
        })
        .collect()
}

fn log_change(r: &Rollout, (state, stage): (RolloutState, usize)) {
    if r.state == state && r.stage == stage {
        return;
    }
    let reason = r.reason.as_deref().unwrap_or("");
    match r.state {
        RolloutState::Running => info!(
            rollout = r.id,
            stage = r.stage + 1,
            of = r.stages.len(),
            "Rollout: next stage."
        ),
        RolloutState::Completed => info!(rollout = r.id, %reason, "Rollout completed."),
        RolloutState::Stopped => warn!(
            rollout = r.id,
            %reason,
            "Rollout stopped; the nodes it reached are told to revert."
        ),
    }
}
