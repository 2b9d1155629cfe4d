//! [`Grants`]: which filters a client may subscribe to on the endpoint,
//! from `[[broker.local_topics]]`.

use crate::config::LocalTopicConfig;
use crate::ingest::topic::{subsumes, validate_filter};

/// Who may subscribe to what. Nothing by default: the endpoint then refuses
/// every SUBSCRIBE, as before local actions.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    rules: Vec<LocalTopicConfig>,
}

impl Grants {
    /// From the config (validated there).
    pub fn new(rules: &[LocalTopicConfig]) -> Self {
        Self {
            rules: rules.to_vec(),
        }
    }

    /// Whether any topic is local at all.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// May `owner` (a user name or certificate CN; `None`: anonymous)
    /// subscribe to `filter`? The error says why not.
    pub fn check(&self, owner: Option<&str>, filter: &str) -> Result<(), String> {
        validate_filter(filter).map_err(|e| format!("`{filter}`: {e}"))?;
        let covering: Vec<&LocalTopicConfig> = self
            .rules
            .iter()
            .filter(|r| subsumes(&r.filter, filter))
            .collect();
        if covering.is_empty() {
            return Err(format!(
                "`{filter}` is not within a local topic ([[broker.local_topics]]: {})",
                self.rules
                    .iter()
                    .map(|r| r.filter.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let granted = covering.iter().any(|r| {
            r.subscribers
                .iter()
                .any(|s| s == "*" || owner.is_some_and(|o| o == s))
        });
        if granted {
            Ok(())
        } else {
            Err(format!(
                "{} may not subscribe to `{filter}` (not among its local topic's subscribers)",
                owner.map_or("an anonymous client".to_string(), |o| format!("`{o}`"))
            ))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rule(filter: &str, subs: &[&str]) -> LocalTopicConfig {
        LocalTopicConfig {
            filter: filter.into(),
            subscribers: subs.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn only_granted_clients_get_filters_within_a_local_topic() {
        let g = Grants::new(&[rule("actuators/#", &["fan-1"]), rule("alerts/+", &["*"])]);
        assert!(g.check(Some("fan-1"), "actuators/m1/fan").is_ok());
        assert!(g.check(Some("fan-1"), "actuators/#").is_ok());
        assert!(g.check(None, "alerts/m1").is_ok());
        let e = g.check(Some("hmi"), "actuators/+/fan").unwrap_err();
        assert!(e.contains("`hmi` may not subscribe"), "{e}");
        let e = g.check(Some("fan-1"), "#").unwrap_err();
        assert!(e.contains("not within a local topic"), "{e}");
        assert!(g.check(None, "alerts/#").is_err(), "wider than the grant");
        assert!(
            g.check(Some("fan-1"), "actuators/#/x").is_err(),
            "malformed"
        );
        assert!(Grants::default().check(Some("x"), "a").is_err());
    }
}
