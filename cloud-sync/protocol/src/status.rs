//! A node's status, sent by the edge in a `Status` frame (protocol 5) when
//! a session starts and then every `uplink.status_every`: what the fleet
//! page and `/api/v1/nodes` show about a gateway beyond its data — backlog,
//! drops, dead letters, health, versions, certificate expiry.
//!
//! Carried as JSON inside the frame: fields can be added without a new
//! protocol version (unknown ones are ignored, missing ones default), and
//! the aggregator stores it as it came. Bounded by [`MAX_STATUS_BYTES`].

use serde::{Deserialize, Serialize};

/// Largest status accepted, encoded.
pub const MAX_STATUS_BYTES: usize = 64 * 1024;

/// Most entries in each of its lists.
pub const MAX_STATUS_ITEMS: usize = 100;

/// What a node says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeStatus {
    /// When the node made it (node clock, ms since the Unix epoch).
    pub at_ms: u64,
    /// Its software (`fogline-edge/0.1.0`).
    pub version: String,
    /// `ok`, `degraded` (problems that do not lose data yet) or
    /// `unhealthy`.
    pub health: String,
    /// Its problems, one line each.
    pub problems: Vec<String>,
    /// Records buffered and not yet acknowledged.
    pub backlog_records: u64,
    /// Their bytes.
    pub backlog_bytes: u64,
    /// Event time of the oldest record not yet acknowledged.
    pub oldest_ms: Option<u64>,
    /// Records lost on the gateway, by reason, since its outbox began.
    pub drops: Vec<DropCount>,
    /// Dead letters kept.
    pub dead_letters: u64,
    /// The functions running, with their versions.
    pub modules: Vec<ModuleVersion>,
    /// When the node's certificate expires (ms since the Unix epoch).
    pub cert_not_after_ms: Option<u64>,
    /// Its labels (`[uplink] labels`): what rollouts select nodes by.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its newest deployments (rollouts applied), newest last, at most
    /// [`crate::deploy::MAX_REPORTED_DEPLOYMENTS`].
    pub deployments: Vec<crate::deploy::DeploymentReport>,
}

/// Records lost for one reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DropCount {
    /// `quota`, `max_age`, `unrouted`, `dead_letter_pruned`, `corrupt`, …
    pub reason: String,
    /// How many.
    pub records: u64,
}

/// A function and the version it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModuleVersion {
    /// The function (pipeline/function).
    pub name: String,
    /// Its version.
    pub version: String,
}

/// A status that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    /// Larger than [`MAX_STATUS_BYTES`].
    #[error("status is {0} bytes, limit is {MAX_STATUS_BYTES}")]
    TooLarge(usize),
    /// Not the expected JSON.
    #[error("status is not valid JSON: {0}")]
    Json(String),
}

impl NodeStatus {
    /// Its lists cut to [`MAX_STATUS_ITEMS`] and its text to 256 bytes per
    /// item.
    fn normalize(&mut self) {
        self.problems.truncate(MAX_STATUS_ITEMS);
        self.drops.truncate(MAX_STATUS_ITEMS);
        self.modules.truncate(MAX_STATUS_ITEMS);
        let extra = self
            .deployments
            .len()
            .saturating_sub(crate::deploy::MAX_REPORTED_DEPLOYMENTS);
        self.deployments.drain(..extra);
        while self.labels.len() > MAX_STATUS_ITEMS {
            self.labels.pop_last();
        }
        self.labels = std::mem::take(&mut self.labels)
            .into_iter()
            .map(|(mut k, mut v)| {
                cut(&mut k);
                cut(&mut v);
                (k, v)
            })
            .collect();
        for d in &mut self.deployments {
            cut(&mut d.function);
            cut(&mut d.action);
            cut(&mut d.version);
            if let Some(r) = &mut d.reason {
                // A reason is what an operator reads first: room for a
                // wasm trap's message.
                cut_to(r, 1024);
            }
        }
        for p in &mut self.problems {
            cut(p);
        }
        for m in &mut self.modules {
            cut(&mut m.name);
            cut(&mut m.version);
        }
        for d in &mut self.drops {
            cut(&mut d.reason);
        }
        cut(&mut self.version);
        cut(&mut self.health);
    }

    /// JSON, normalized, and within [`MAX_STATUS_BYTES`]: list items are
    /// left out from the end until it fits.
    pub fn encode(&self) -> Vec<u8> {
        let mut s = self.clone();
        s.normalize();
        loop {
            let bytes = serde_json::to_vec(&s).unwrap_or_default();
            if bytes.len() <= MAX_STATUS_BYTES {
                return bytes;
            }
            // The longest list gives up an item.
            let (p, m, d) = (s.problems.len(), s.modules.len(), s.drops.len());
            if p >= m && p >= d && p > 0 {
                s.problems.pop();
            } else if m >= d && m > 0 {
                s.modules.pop();
            } else if d > 0 {
                s.drops.pop();
            } else {
                return bytes;
            }
        }
    }

    /// Parses what a peer sent, normalized; refuses one whose normalized
    /// form would not fit (so decode → encode → decode is the identity).
    pub fn decode(bytes: &[u8]) -> Result<Self, StatusError> {
        if bytes.len() > MAX_STATUS_BYTES {
            return Err(StatusError::TooLarge(bytes.len()));
        }
        let mut s: Self =
            serde_json::from_slice(bytes).map_err(|e| StatusError::Json(e.to_string()))?;
        s.normalize();
        let size = encoded_len(&s);
        if size > MAX_STATUS_BYTES {
            return Err(StatusError::TooLarge(size));
        }
        Ok(s)
    }
}

/// The length of `s` as JSON, counted without building it.
fn encoded_len(s: &NodeStatus) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    match serde_json::to_writer(&mut c, s) {
        Ok(()) => c.0,
        Err(_) => usize::MAX,
    }
}

/// Cuts `s` to 256 bytes at a char boundary.
fn cut(s: &mut String) {
    cut_to(s, 256)
}

/// Cuts `s` to `max` bytes at a char boundary.
fn cut_to(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_status_round_trips_and_always_fits() {
        let mut s = NodeStatus {
            at_ms: 5,
            version: "fogline-edge/0.1.0".into(),
            health: "ok".into(),
            backlog_records: 3,
            drops: vec![DropCount {
                reason: "quota".into(),
                records: 9,
            }],
            ..NodeStatus::default()
        };
        assert_eq!(NodeStatus::decode(&s.encode()).unwrap(), s);
        s.problems = vec!["é".repeat(1000); 10_000];
        let bytes = s.encode();
        assert!(bytes.len() <= MAX_STATUS_BYTES, "{}", bytes.len());
        assert_eq!(
            NodeStatus::decode(&bytes).unwrap().problems.len(),
            MAX_STATUS_ITEMS
        );
        // A newer node's extra field is ignored; a missing one defaults.
        let newer = br#"{"at_ms":1,"future":true}"#;
        assert_eq!(NodeStatus::decode(newer).unwrap().at_ms, 1);
        assert!(NodeStatus::decode(b"[").is_err());
        assert!(NodeStatus::decode(&vec![b' '; MAX_STATUS_BYTES + 1]).is_err());
    }
}
