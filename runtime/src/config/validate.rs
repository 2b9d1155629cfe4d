//! The validation pass: every problem at once, each naming its key.

use std::collections::BTreeSet;
use std::fmt;

use super::EdgeConfig;
use crate::ingest::topic::validate_filter;

/// Every problem found in a config, one per line.
#[derive(Debug, Clone, Default)]
pub struct ConfigProblems(pub Vec<String>);

impl fmt::Display for ConfigProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl EdgeConfig {
    /// Check the values make sense together. Files are checked to exist;
    /// modules are loaded only by `fogline-edge check`.
    pub fn validate(&self) -> Result<(), ConfigProblems> {
        let mut p = Vec::new();
        if self.node.id.is_empty() {
            p.push("node.id: must not be empty".to_string());
        }
        if self.mqtt.broker.rsplit_once(':').is_none() {
            p.push(format!(
                "mqtt.broker: `{}` is not host:port",
                self.mqtt.broker
            ));
        }
        if self.mqtt.receive_maximum == 0 {
            p.push("mqtt.receive_maximum: must be at least 1".to_string());
        }
        if self.mqtt.max_payload_bytes == 0 {
            p.push("mqtt.max_payload_bytes: must be at least 1".to_string());
        }
        if self.pipelines.is_empty() {
            p.push("pipelines: at least one [[pipelines]] entry is needed".to_string());
        }
        let mut names = BTreeSet::new();
        for (i, pipe) in self.pipelines.iter().enumerate() {
            let at = format!("pipelines[{i}] ({})", pipe.name);
            if pipe.name.is_empty() {
                p.push(format!("pipelines[{i}].name: must not be empty"));
            }
            if !names.insert(pipe.name.clone()) {
                p.push(format!("{at}.name: `{}` is used twice", pipe.name));
            }
            if pipe.topics.is_empty() {
                p.push(format!("{at}.topics: at least one topic filter is needed"));
            }
            for t in &pipe.topics {
                if let Err(e) = validate_filter(t) {
                    p.push(format!("{at}.topics: `{t}` {e}"));
                }
            }
            for f in &pipe.functions {
                if !self.functions.contains_key(f) {
                    p.push(format!(
                        "{at}.functions: no function named `{f}` (define it as [functions.{f}])"
                    ));
                }
            }
        }
        for (name, f) in &self.functions {
            let path = self.resolve(&f.module);
            if !path.is_file() {
                p.push(format!(
                    "functions.{name}.module: file {} does not exist",
                    path.display()
                ));
            }
            if f.memory_mib == 0 || f.memory_mib > 4096 {
                p.push(format!(
                    "functions.{name}.memory_mib: {} is outside 1..=4096",
                    f.memory_mib
                ));
            }
            if f.timeout.is_zero() {
                p.push(format!("functions.{name}.timeout: must be more than 0"));
            }
        }
        if self.outbox.max_batch == 0 {
            p.push("outbox.max_batch: must be at least 1".to_string());
        }
        if self.outbox.tick_interval.is_zero() {
            p.push("outbox.tick_interval: must be more than 0".to_string());
        }
        if let Some(u) = &self.uplink {
            if u.server.rsplit_once(':').is_none() {
                p.push(format!("uplink.server: `{}` is not host:port", u.server));
            }
            for (key, path) in [("ca", &u.ca), ("cert", &u.cert), ("key", &u.key)] {
                let path = self.resolve(path);
                if !path.is_file() {
                    p.push(format!(
                        "uplink.{key}: file {} does not exist",
                        path.display()
                    ));
                }
            }
            if u.batch_records == 0 {
                p.push("uplink.batch_records: must be at least 1".to_string());
            }
            if u.max_in_flight == 0 {
                p.push("uplink.max_in_flight: must be at least 1".to_string());
            }
            if u.reconnect_min > u.reconnect_max {
                p.push("uplink.reconnect_min: is larger than uplink.reconnect_max".to_string());
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigProblems(p))
        }
    }
}
