//! What a rollout does next, from what its nodes report: pure, so every
//! aggregator of a cluster that runs it over the same reports decides the
//! same.

use std::collections::HashMap;

use fogline_protocol::deploy::{DeployState, DeploymentReport};

use super::{Rollout, RolloutState};

/// What a node is to be sent for a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The build.
    Install,
    /// Put back what ran before.
    Revert,
}

/// How many of `n` nodes stages `0..=stage` reach together.
pub fn reach(stages: &[u32], stage: usize, n: usize) -> usize {
    let pct = stages.get(stage).copied().unwrap_or(100).min(100) as usize;
    (pct * n).div_ceil(100).max(1).min(n)
}

/// The nodes of `stage` alone: `lo..hi` in the rollout's order.
fn stage_range(r: &Rollout, stage: usize) -> (usize, usize) {
    let n = r.nodes.len();
    let lo = if stage == 0 {
        0
    } else {
        reach(&r.stages, stage - 1, n)
    };
    (lo, reach(&r.stages, stage, n))
}

/// Takes in the nodes' reports of this rollout (by node) and moves the
/// rollout on: the next stage, completed, or stopped. Returns whether
/// anything changed.
pub fn advance(r: &mut Rollout, reports: &HashMap<String, DeploymentReport>, now_ms: u64) -> bool {
    let mut changed = false;
    for p in &mut r.nodes {
        let Some(rep) = reports.get(&p.node) else {
            continue;
        };
        // A revert's report is only taken once the node was told to revert.
        if rep.action == "revert" && !p.revert {
            continue;
        }
        let state = rep.state.name().to_string();
        if p.state != state || p.reason != rep.reason {
            p.state = state;
            p.reason = rep.reason.clone();
            p.at_ms = Some(rep.at_ms);
            changed = true;
        }
    }
    if r.state != RolloutState::Running || r.nodes.is_empty() {
        return changed;
    }
    loop {
        let (lo, hi) = stage_range(r, r.stage);
        let nodes = &r.nodes[lo..hi];
        let failed: Vec<&super::NodeProgress> = nodes
            .iter()
            .filter(|p| is(p, DeployState::RolledBack) || is(p, DeployState::Refused))
            .collect();
        // Stops as soon as the failures alone pass the threshold: waiting
        // for the rest of the stage would only spread a bad build.
        if failed.len() as f64 > r.max_failure_rate * nodes.len() as f64 + 1e-9 {
            let first = failed[0];
            let reason = format!(
                "stage {} of {}: {} of {} node(s) failed, above the {}% allowed; {} {}: {}",
                r.stage + 1,
                r.stages.len(),
                failed.len(),
                nodes.len(),
                r.max_failure_rate * 100.0,
                first.node,
                first.state.replace('_', " "),
                first.reason.as_deref().unwrap_or("no reason given")
            );
            stop(r, reason, now_ms);
            return true;
        }
        let settled = nodes
            .iter()
            .all(|p| p.state != "pending" && p.state != "probation");
        if !settled {
            return changed;
        }
        changed = true;
        r.updated_ms = now_ms;
        if hi == r.nodes.len() {
            let promoted = r
                .nodes
                .iter()
                .filter(|p| is(p, DeployState::Promoted))
                .count();
            if promoted == 0 {
                // Failures within the threshold, and yet nobody runs it.
                let first = &r.nodes[0];
                let reason = format!(
                    "no node took the build; {} {}: {}",
                    first.node,
                    first.state.replace('_', " "),
                    first.reason.as_deref().unwrap_or("no reason given")
                );
                stop(r, reason, now_ms);
                return true;
            }
            r.state = RolloutState::Completed;
            r.reason = Some(format!(
                "{promoted} of {} node(s) run the build",
                r.nodes.len()
            ));
            return true;
        }
        r.stage += 1;
    }
}

/// Stops `r`: every node it reached that took the build is told to revert.
pub fn stop(r: &mut Rollout, reason: String, now_ms: u64) {
    let (_, hi) = stage_range(r, r.stage);
    for p in &mut r.nodes[..hi] {
        if is(p, DeployState::Promoted) || is(p, DeployState::Probation) {
            p.revert = true;
        }
    }
    r.state = RolloutState::Stopped;
    r.reason = Some(reason);
    r.updated_ms = now_ms;
}

fn is(p: &super::NodeProgress, s: DeployState) -> bool {
    p.state == s.name()
}

/// What each node of `r` is still to be sent: the build to the nodes
/// reached that have not answered, a revert to those told to revert that
/// have not done it.
pub fn wanted(r: &Rollout) -> Vec<(String, Action)> {
    let mut out = Vec::new();
    match r.state {
        RolloutState::Running => {
            let (_, hi) = stage_range(r, r.stage);
            for p in &r.nodes[..hi.min(r.nodes.len())] {
                if p.state == "pending" {
                    out.push((p.node.clone(), Action::Install));
                }
            }
        }
        RolloutState::Stopped => {
            for p in &r.nodes {
                if p.revert && !is(p, DeployState::Reverted) && !is(p, DeployState::RevertFailed) {
                    out.push((p.node.clone(), Action::Revert));
                }
            }
        }
        RolloutState::Completed => {}
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::{NodeProgress, Target};
    use super::*;

    fn rollout(nodes: &[&str], stages: &[u32], max_failure_rate: f64) -> Rollout {
        Rollout {
            id: 7,
            function: "f".into(),
            module: "m".into(),
            version: "1".into(),
            sha256: "ab".into(),
            module_bytes: 1,
            signature: String::new(),
            target: Target::Nodes(nodes.iter().map(|n| n.to_string()).collect()),
            stages: stages.to_vec(),
            max_failure_rate,
            nodes: nodes
                .iter()
                .map(|n| NodeProgress {
                    node: n.to_string(),
                    state: "pending".into(),
                    reason: None,
                    at_ms: None,
                    stage: 0,
                    revert: false,
                })
                .collect(),
            stage: 0,
            state: RolloutState::Running,
            reason: None,
            created_ms: 0,
            updated_ms: 0,
        }
    }

    fn report(state: DeployState, action: &str) -> DeploymentReport {
        DeploymentReport {
            rollout: 7,
            function: "f".into(),
            action: action.into(),
            state,
            version: String::new(),
            reason: Some(format!("{} here", state.name())),
            at_ms: 5,
        }
    }

    fn reports(r: &[(&str, DeployState)]) -> HashMap<String, DeploymentReport> {
        r.iter()
            .map(|(n, s)| (n.to_string(), report(*s, "install")))
            .collect()
    }

    #[test]
    fn stages_reach_their_share_and_at_least_one_node() {
        assert_eq!(reach(&[34, 100], 0, 3), 2);
        assert_eq!(reach(&[1, 100], 0, 3), 1);
        assert_eq!(reach(&[1, 100], 1, 3), 3);
        assert_eq!(reach(&[10, 50, 100], 1, 10), 5);
    }

    #[test]
    fn a_rollout_moves_stage_by_stage_and_completes() {
        let mut r = rollout(&["a", "b", "c"], &[34, 100], 0.0);
        let want = |r: &Rollout| -> Vec<String> { wanted(r).into_iter().map(|w| w.0).collect() };
        assert_eq!(want(&r), ["a", "b"]);
        assert!(advance(
            &mut r,
            &reports(&[("a", DeployState::Probation)]),
            1
        ));
        assert_eq!((r.stage, want(&r)), (0, vec!["b".to_string()]));
        let done = reports(&[("a", DeployState::Promoted), ("b", DeployState::Promoted)]);
        assert!(advance(&mut r, &done, 2));
        assert_eq!((r.stage, want(&r)), (1, vec!["c".to_string()]));
        let all = reports(&[
            ("a", DeployState::Promoted),
            ("b", DeployState::Promoted),
            ("c", DeployState::Promoted),
        ]);
        assert!(advance(&mut r, &all, 3));
        assert_eq!(r.state, RolloutState::Completed);
        assert!(want(&r).is_empty());
        assert!(!advance(&mut r, &all, 4), "nothing changes any more");
    }

    #[test]
    fn a_failure_above_the_threshold_stops_and_reverts_the_nodes_reached() {
        let mut r = rollout(&["a", "b", "c"], &[34, 100], 0.25);
        advance(
            &mut r,
            &reports(&[("a", DeployState::Promoted), ("b", DeployState::Promoted)]),
            1,
        );
        assert_eq!(r.stage, 1);
        let rep = reports(&[
            ("a", DeployState::Promoted),
            ("b", DeployState::Promoted),
            ("c", DeployState::RolledBack),
        ]);
        assert!(advance(&mut r, &rep, 2));
        assert_eq!(r.state, RolloutState::Stopped);
        let reason = r.reason.clone().unwrap();
        assert!(
            reason.contains("stage 2 of 2: 1 of 1 node(s) failed")
                && reason.contains("c rolled back: rolled_back here"),
            "{reason}"
        );
        assert_eq!(
            wanted(&r),
            [("a".into(), Action::Revert), ("b".into(), Action::Revert)]
        );
        // An install report does not count as the revert.
        let mut rep = rep;
        rep.insert("a".into(), report(DeployState::Reverted, "revert"));
        advance(&mut r, &rep, 3);
        assert_eq!(wanted(&r), [("b".into(), Action::Revert)]);
        assert_eq!(r.nodes[2].state, "rolled_back");
    }

    #[test]
    fn failures_within_the_threshold_let_the_rollout_go_on() {
        let mut r = rollout(&["a", "b", "c", "d"], &[100], 0.25);
        let rep = reports(&[
            ("a", DeployState::Refused),
            ("b", DeployState::Promoted),
            ("c", DeployState::Promoted),
            ("d", DeployState::Promoted),
        ]);
        advance(&mut r, &rep, 1);
        assert_eq!(r.state, RolloutState::Completed);
        assert_eq!(r.reason.as_deref(), Some("3 of 4 node(s) run the build"));
        // At 0, the first refusal stops it before the others answer.
        let mut r = rollout(&["a", "b", "c", "d"], &[100], 0.0);
        advance(&mut r, &reports(&[("a", DeployState::Refused)]), 1);
        assert_eq!(r.state, RolloutState::Stopped);
        assert!(wanted(&r).is_empty(), "nobody took the build");
        // Allowed to fail, and every node did: not a completed rollout.
        let mut r = rollout(&["a", "b"], &[100], 1.0);
        let rep = reports(&[("a", DeployState::Refused), ("b", DeployState::Refused)]);
        advance(&mut r, &rep, 1);
        assert_eq!(r.state, RolloutState::Stopped);
        assert!(
            r.reason
                .as_deref()
                .unwrap()
                .starts_with("no node took the build; a refused"),
            "{:?}",
            r.reason
        );
    }
}
