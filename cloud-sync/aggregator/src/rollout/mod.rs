//! Signed rollouts to the fleet (ARCHITECTURE.md I-42): a build for one
//! function, sent to a set of nodes in stages over their replication
//! connections (`Deploy` frames, protocol 6). Each node verifies the
//! signature against its own trusted keys, hot-swaps, and reports the
//! outcome in its status; a stage whose failure rate passes the threshold
//! stops the rollout, and the nodes it reached are told to revert.
//!
//! - `plan.rs`: what the rollout does next, from the nodes' reports (pure).
//! - `controller.rs`: runs the plans, keeps them in the store, and tells
//!   the sessions what each node is to be sent.
//! - `request.rs`: a new rollout, checked and resolved to its nodes.

pub mod controller;
pub mod plan;
pub mod request;

use serde::{Deserialize, Serialize};

pub use controller::{Controller, Want, Wants};
pub use request::{RolloutRequest, RolloutRequestError};

/// Which nodes a rollout is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// These nodes, in this order (the first ones are the canaries).
    Nodes(Vec<String>),
    /// This percentage of the nodes the aggregator knows, chosen by
    /// rendezvous hashing of the rollout and the node (stable, spread).
    Percent(u32),
    /// The nodes whose status carries this label (`name=value`).
    Label(String),
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Stages are being rolled out.
    Running,
    /// Every stage passed.
    Completed,
    /// A stage failed (or an operator stopped it): the nodes it reached
    /// are told to revert.
    Stopped,
}

/// One node of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeProgress {
    /// The node.
    pub node: String,
    /// `pending` (not reached yet, or reached and not answered), or the
    /// node's [`fogline_protocol::deploy::DeployState`] name.
    pub state: String,
    /// The node's reason (a rollback's, a refusal's).
    #[serde(default)]
    pub reason: Option<String>,
    /// When the node reached that state (its clock).
    #[serde(default)]
    pub at_ms: Option<u64>,
    /// The stage (1-based) the node belongs to.
    pub stage: usize,
    /// Told to revert (the rollout stopped after it took the build).
    #[serde(default)]
    pub revert: bool,
}

/// A rollout, as stored (JSON) and served by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Its number (the store's).
    #[serde(default)]
    pub id: u64,
    /// The function (`[functions.NAME]` on the nodes).
    pub function: String,
    /// The module's name, version and SHA-256, from its signature.
    pub module: String,
    /// Its version.
    pub version: String,
    /// SHA-256 of the build, hex.
    pub sha256: String,
    /// Its size.
    pub module_bytes: usize,
    /// The signature document, sent with the build.
    pub signature: String,
    /// What was asked.
    pub target: Target,
    /// Cumulative percentages of the nodes reached at each stage (the last
    /// is 100).
    pub stages: Vec<u32>,
    /// A stage whose share of failed nodes is above this stops the rollout
    /// (0: any failure stops it).
    pub max_failure_rate: f64,
    /// The nodes, in rollout order.
    pub nodes: Vec<NodeProgress>,
    /// The current stage (0-based).
    pub stage: usize,
    /// Where it stands.
    pub state: RolloutState,
    /// Why it stopped or how it completed.
    #[serde(default)]
    pub reason: Option<String>,
    /// When it was made (ms since the Unix epoch).
    pub created_ms: u64,
    /// When it last changed.
    pub updated_ms: u64,
}
