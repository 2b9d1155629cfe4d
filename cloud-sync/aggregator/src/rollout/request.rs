//! A new rollout as the API takes it: checked, and resolved to its nodes.

use std::collections::BTreeMap;

use fogline_protocol::deploy::MAX_DEPLOY_MODULE_BYTES;
use fogline_protocol::signing::{sha256_hex, ModuleSignature};
use serde::Deserialize;

use super::{NodeProgress, Rollout, RolloutState, Target};

/// `POST /api/v1/rollouts`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    /// The function on the nodes.
    pub function: String,
    /// The build, base64.
    pub module_base64: String,
    /// Its `.sig` document (`fogline-cloud modules publish`).
    pub signature: String,
    /// Which nodes.
    pub target: Target,
    /// Cumulative percentages per stage (default `[100]`: one stage).
    #[serde(default)]
    pub stages: Option<Vec<u32>>,
    /// Share of a stage's nodes that may fail (default 0).
    #[serde(default)]
    pub max_failure_rate: Option<f64>,
}

/// A request that cannot become a rollout; each says what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum RolloutRequestError {
    /// Something in the request is not valid.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(s: impl Into<String>) -> RolloutRequestError {
    RolloutRequestError::Invalid(s.into())
}

/// A node the aggregator knows, with its labels.
#[derive(Debug, Clone, Default)]
pub struct KnownNode {
    /// Its id.
    pub node: String,
    /// Its labels, from its last status.
    pub labels: BTreeMap<String, String>,
}

impl RolloutRequest {
    /// The rollout (number 0 until stored) and the build's bytes.
    pub fn build(
        self,
        known: &[KnownNode],
        now_ms: u64,
    ) -> Result<(Rollout, Vec<u8>), RolloutRequestError> {
        use base64::Engine;
        if self.function.is_empty() || self.function.len() > 256 {
            return Err(invalid(format!(
                "function: `{}` must be 1 to 256 bytes",
                self.function
            )));
        }
        // 4 base64 characters per 3 bytes: refuse before decoding.
        if self.module_base64.len() / 4 * 3 > MAX_DEPLOY_MODULE_BYTES + 3 {
            return Err(invalid(format!(
                "module: about {} bytes, a rollout carries at most {MAX_DEPLOY_MODULE_BYTES}",
                self.module_base64.len() / 4 * 3
            )));
        }
        let module = base64::engine::general_purpose::STANDARD
            .decode(self.module_base64.as_bytes())
            .map_err(|e| invalid(format!("module_base64: not base64: {e}")))?;
        if module.is_empty() || module.len() > MAX_DEPLOY_MODULE_BYTES {
            return Err(invalid(format!(
                "module: {} bytes, a rollout carries 1 to {MAX_DEPLOY_MODULE_BYTES}",
                module.len()
            )));
        }
        if self.signature.len() > fogline_protocol::deploy::MAX_SIGNATURE_BYTES {
            return Err(invalid(format!(
                "signature: {} bytes, at most {}",
                self.signature.len(),
                fogline_protocol::deploy::MAX_SIGNATURE_BYTES
            )));
        }
        // Whether the key is trusted is each node's to decide; here only
        // that it is a signature of exactly these bytes.
        let sig = ModuleSignature::parse(self.signature.as_bytes())
            .map_err(|e| invalid(format!("signature: {e}")))?;
        let sha = sha256_hex(&module);
        if !sig.sha256.eq_ignore_ascii_case(&sha) {
            return Err(invalid(format!(
                "signature: it signs a build with SHA-256 {}, this module's is {sha} (signed another file?)",
                sig.sha256
            )));
        }
        let stages = self.stages.unwrap_or_else(|| vec![100]);
        if stages.is_empty()
            || stages.last() != Some(&100)
            || stages.windows(2).any(|w| w[0] >= w[1])
            || stages.iter().any(|s| *s == 0 || *s > 100)
        {
            return Err(invalid(format!(
                "stages: {stages:?}: cumulative percentages, rising, from 1 to 100, the last 100"
            )));
        }
        let max_failure_rate = self.max_failure_rate.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&max_failure_rate) {
            return Err(invalid(format!(
                "max_failure_rate: {max_failure_rate} is not between 0 and 1"
            )));
        }
        let nodes = resolve(&self.target, known, &sha)?;
        let n = nodes.len();
        let nodes = nodes
            .into_iter()
            .enumerate()
            .map(|(i, node)| NodeProgress {
                node,
                state: "pending".into(),
                reason: None,
                at_ms: None,
                stage: (0..stages.len())
                    .find(|s| i < super::plan::reach(&stages, *s, n))
                    .unwrap_or(0)
                    + 1,
                revert: false,
            })
            .collect();
        Ok((
            Rollout {
                id: 0,
                function: self.function,
                module: sig.name,
                version: sig.version,
                sha256: sha,
                module_bytes: module.len(),
                signature: self.signature,
                target: self.target,
                stages,
                max_failure_rate,
                nodes,
                stage: 0,
                state: RolloutState::Running,
                reason: None,
                created_ms: now_ms,
                updated_ms: now_ms,
            },
            module,
        ))
    }
}

/// The target's nodes, in rollout order.
fn resolve(
    target: &Target,
    known: &[KnownNode],
    sha: &str,
) -> Result<Vec<String>, RolloutRequestError> {
    // Rendezvous order: stable for a build, spread over the fleet.
    let ordered = |mut nodes: Vec<String>| {
        nodes.sort_by_cached_key(|n| sha256_hex(format!("{sha}/{n}").as_bytes()));
        nodes
    };
    let nodes = match target {
        Target::Nodes(names) => {
            let mut seen = std::collections::HashSet::new();
            for n in names {
                if !known.iter().any(|k| &k.node == n) {
                    return Err(invalid(format!(
                        "target: node `{n}` is not known to this aggregator (no data from it yet)"
                    )));
                }
                if !seen.insert(n) {
                    return Err(invalid(format!("target: node `{n}` is named twice")));
                }
            }
            names.clone()
        }
        Target::Percent(p) => {
            if *p == 0 || *p > 100 {
                return Err(invalid(format!("target: percent {p} is not 1 to 100")));
            }
            let all = ordered(known.iter().map(|k| k.node.clone()).collect());
            let take = (*p as usize * all.len()).div_ceil(100);
            all.into_iter().take(take).collect()
        }
        Target::Label(l) => {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| invalid(format!("target: label `{l}` is not name=value")))?;
            ordered(
                known
                    .iter()
                    .filter(|n| n.labels.get(k).is_some_and(|x| x == v))
                    .map(|n| n.node.clone())
                    .collect(),
            )
        }
    };
    if nodes.is_empty() {
        return Err(invalid(format!(
            "target: {target:?} selects no node of the {} this aggregator knows",
            known.len()
        )));
    }
    Ok(nodes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use base64::Engine;
    use fogline_protocol::signing::SigningKey;

    fn known(n: usize) -> Vec<KnownNode> {
        (0..n)
            .map(|i| KnownNode {
                node: format!("gw-{i}"),
                labels: [(
                    "site".to_string(),
                    if i % 2 == 0 { "north" } else { "south" }.to_string(),
                )]
                .into(),
            })
            .collect()
    }

    fn request(target: Target) -> RolloutRequest {
        let (key, _) = SigningKey::generate().unwrap();
        let module = b"\0asm component".to_vec();
        let sig = key.sign("m", "1.0.0", &module);
        RolloutRequest {
            function: "f".into(),
            module_base64: base64::engine::general_purpose::STANDARD.encode(&module),
            signature: serde_json::to_string(&sig).unwrap(),
            target,
            stages: Some(vec![50, 100]),
            max_failure_rate: None,
        }
    }

    #[test]
    fn targets_resolve_to_their_nodes_in_stages() {
        let k = known(10);
        let (r, bytes) = request(Target::Label("site=north".into()))
            .build(&k, 1)
            .unwrap();
        assert_eq!(bytes, b"\0asm component");
        assert_eq!(r.nodes.len(), 5);
        assert!(r
            .nodes
            .iter()
            .all(|p| ["gw-0", "gw-2", "gw-4", "gw-6", "gw-8"].contains(&p.node.as_str())));
        assert_eq!(r.nodes.iter().filter(|p| p.stage == 1).count(), 3);
        let (r, _) = request(Target::Percent(30)).build(&k, 1).unwrap();
        assert_eq!(r.nodes.len(), 3);
        let (r, _) = request(Target::Nodes(vec!["gw-3".into(), "gw-1".into()]))
            .build(&k, 1)
            .unwrap();
        assert_eq!(r.nodes[0].node, "gw-3");
        assert_eq!((r.module.as_str(), r.version.as_str()), ("m", "1.0.0"));
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let k = known(3);
        let err = |r: RolloutRequest| r.build(&k, 1).unwrap_err().to_string();
        assert!(err(request(Target::Nodes(vec!["gw-9".into()]))).contains("`gw-9` is not known"));
        assert!(
            err(request(Target::Label("site=east".into()))).contains("selects no node of the 3")
        );
        let mut r = request(Target::Percent(100));
        r.stages = Some(vec![50, 40, 100]);
        assert!(err(r).contains("stages: [50, 40, 100]"));
        let mut r = request(Target::Percent(100));
        r.module_base64 = base64::engine::general_purpose::STANDARD.encode(b"other");
        assert!(err(r).contains("signed another file?"));
        let mut r = request(Target::Percent(100));
        r.max_failure_rate = Some(1.5);
        assert!(err(r).contains("1.5 is not between 0 and 1"));
    }
}
