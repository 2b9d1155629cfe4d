//! Signed rollouts on the replication connection (protocol 6): the
//! aggregator's `Deploy` frame, and what a node says back in its status.
//!
//! A rollout is numbered by the aggregator. A node applies each
//! `(rollout, action)` at most once — it keeps what it did in a journal of
//! its own and answers a resend with the outcome it already has — so the
//! aggregator may send a deployment again on every connection until the
//! node's status shows it: resumable like the data, applied exactly once.

use serde::{Deserialize, Serialize};

/// Largest module a `Deploy` frame carries (the frame bound less room for
/// its header and signature).
pub const MAX_DEPLOY_MODULE_BYTES: usize = crate::MAX_FRAME_BYTES - 64 * 1024;

/// Longest signature document a `Deploy` frame carries.
pub const MAX_SIGNATURE_BYTES: usize = 4096;

/// Most deployments a node reports in its status (the newest).
pub const MAX_REPORTED_DEPLOYMENTS: usize = 16;

/// Aggregator → node: what to do for one function in one rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployFrame {
    /// The rollout's number (aggregator-wide, never reused).
    pub rollout: u64,
    /// The function (`[functions.NAME]` in the node's config).
    pub function: String,
    /// Install or revert.
    pub action: DeployAction,
}

/// What a `Deploy` asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeployAction {
    /// Install this build: hot swap with probation, rolled back by the node
    /// if it fails. Only a build signed by a key the node trusts is taken.
    Install {
        /// The `.sig` document (`fogline-module-signature/1`).
        signature: String,
        /// The component's bytes.
        module: Vec<u8>,
    },
    /// The rollout stopped: put back what ran before its install.
    Revert,
}

impl DeployAction {
    /// `install` or `revert`.
    pub fn name(&self) -> &'static str {
        match self {
            DeployAction::Install { .. } => "install",
            DeployAction::Revert => "revert",
        }
    }
}

/// Where a deployment stands on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployState {
    /// Installed; the new build runs beside the old one until it has
    /// passed its probation batches.
    Probation,
    /// The new build took over.
    Promoted,
    /// The new build failed (init, a trap, a refusal by the daemon) and the
    /// node went back to the old one.
    RolledBack,
    /// Not installed: bad or untrusted signature, unknown function, no
    /// trusted keys, too large.
    Refused,
    /// The rollout stopped and the node put back what ran before.
    Reverted,
    /// A revert that could not be done (nothing kept to put back).
    RevertFailed,
}

impl DeployState {
    /// Whether the node ended on the old build for a reason of the new one.
    pub fn is_failure(self) -> bool {
        matches!(self, DeployState::RolledBack | DeployState::Refused)
    }

    /// The name in JSON.
    pub fn name(self) -> &'static str {
        match self {
            DeployState::Probation => "probation",
            DeployState::Promoted => "promoted",
            DeployState::RolledBack => "rolled_back",
            DeployState::Refused => "refused",
            DeployState::Reverted => "reverted",
            DeployState::RevertFailed => "revert_failed",
        }
    }
}

/// A node's account of one deployment, in its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentReport {
    /// The rollout.
    pub rollout: u64,
    /// The function.
    pub function: String,
    /// The last action taken for it (`install` or `revert`).
    pub action: String,
    /// Where it stands.
    pub state: DeployState,
    /// The build's `name version` from its signature, or its SHA-256.
    #[serde(default)]
    pub version: String,
    /// Why it was refused or rolled back.
    #[serde(default)]
    pub reason: Option<String>,
    /// When the state was reached (node clock, ms since the Unix epoch).
    #[serde(default)]
    pub at_ms: u64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn states_are_named_as_in_json() {
        for s in [
            DeployState::Probation,
            DeployState::Promoted,
            DeployState::RolledBack,
            DeployState::Refused,
            DeployState::Reverted,
            DeployState::RevertFailed,
        ] {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.name())
            );
        }
        assert!(DeployState::RolledBack.is_failure() && !DeployState::Reverted.is_failure());
    }
}
