//! The validation pass: every problem at once, each naming its key.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use super::EdgeConfig;
use crate::ingest::topic::validate_filter;
use fogline_protocol::{MAX_RECORD_PAYLOAD_BYTES, MAX_STREAM_NAME_BYTES};

/// The longest `outbox.commit_interval`.
pub const MAX_COMMIT_INTERVAL: Duration = Duration::from_secs(10);

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
        let budget = self.ingest.max_pending_bytes;
        if budget < 64 * 1024 {
            p.push(format!(
                "ingest.max_pending_bytes: {budget} is below the minimum of 65536"
            ));
        }
        for (key, v) in [
            ("mqtt.max_payload_bytes", self.mqtt.max_payload_bytes),
            ("broker.max_payload_bytes", self.broker.max_payload_bytes),
        ] {
            if v == 0 {
                p.push(format!("{key}: must be at least 1"));
            } else if v > MAX_RECORD_PAYLOAD_BYTES {
                p.push(format!(
                    "{key}: {v} is above {MAX_RECORD_PAYLOAD_BYTES}, the largest record the replication protocol carries"
                ));
            } else if v > budget / 2 {
                p.push(format!(
                    "{key}: {v} is more than half of ingest.max_pending_bytes ({budget}); raise the budget or lower the limit"
                ));
            }
        }
        for k in &self.modules.trusted_keys {
            if let Err(e) = k.parse::<fogline_protocol::signing::PublicKey>() {
                p.push(format!("modules.trusted_keys: {e}"));
            }
        }
        if !matches!(self.mqtt.publish_qos, 1 | 2) {
            p.push(format!(
                "mqtt.publish_qos: {} is not 1 or 2",
                self.mqtt.publish_qos
            ));
        }
        for f in &self.mqtt.publish {
            if let Err(e) = validate_filter(f) {
                p.push(format!("mqtt.publish: `{f}` {e}"));
            }
        }
        if !self.mqtt.publish.is_empty() && !self.external_broker_enabled() {
            p.push("mqtt.publish: outputs are to be published to the external broker, but it is not used (set mqtt.enabled = true and mqtt.broker)".to_string());
        }
        if !matches!(self.mqtt.qos, 1 | 2) {
            p.push(format!("mqtt.qos: {} is not 1 or 2", self.mqtt.qos));
        }
        let b = &self.broker;
        if b.max_topic_bytes == 0 || b.max_topic_bytes > MAX_STREAM_NAME_BYTES {
            p.push(format!(
                "broker.max_topic_bytes: {} is outside 1..={MAX_STREAM_NAME_BYTES} (the replication protocol's stream-name limit)",
                b.max_topic_bytes
            ));
        }
        let max_packet = self.broker_max_packet();
        if max_packet < b.max_payload_bytes.saturating_add(b.max_topic_bytes) {
            p.push(format!(
                "broker.max_packet_bytes: {max_packet} cannot hold a payload of broker.max_payload_bytes ({}) with a topic of broker.max_topic_bytes ({})",
                b.max_payload_bytes, b.max_topic_bytes
            ));
        } else if max_packet > budget {
            p.push(format!(
                "broker.max_packet_bytes: {max_packet} is larger than ingest.max_pending_bytes ({budget})"
            ));
        }
        if b.receive_maximum == 0 {
            p.push("broker.receive_maximum: must be at least 1".to_string());
        }
        if b.max_connections == 0 {
            p.push("broker.max_connections: must be at least 1".to_string());
        }
        if b.max_connections_per_ip == 0 {
            p.push("broker.max_connections_per_ip: must be at least 1".to_string());
        }
        if b.connect_rate_per_ip == 0 {
            p.push(
                "broker.connect_rate_per_ip: must be at least 1 (connections per second)"
                    .to_string(),
            );
        }
        if b.connect_burst_per_ip < b.connect_rate_per_ip {
            p.push(format!(
                "broker.connect_burst_per_ip: {} is below broker.connect_rate_per_ip ({})",
                b.connect_burst_per_ip, b.connect_rate_per_ip
            ));
        }
        if b.max_connect_bytes < 1024 {
            p.push(format!(
                "broker.max_connect_bytes: {} is below 1024 (a CONNECT with credentials and a will needs room)",
                b.max_connect_bytes
            ));
        }
        let preconnect = self.broker_max_preconnect();
        if preconnect < 1024 || preconnect > budget / 4 {
            p.push(format!(
                "broker.max_preconnect_bytes: {preconnect} is outside 1024..={} (a quarter of ingest.max_pending_bytes, {budget}, which it is taken from)",
                budget / 4
            ));
        }
        if b.connect_timeout.is_zero() || b.connect_timeout > std::time::Duration::from_secs(300) {
            p.push(format!(
                "broker.connect_timeout: {:?} is outside (0, 5min]",
                b.connect_timeout
            ));
        }
        if b.idle_timeout < std::time::Duration::from_secs(1) {
            p.push(format!(
                "broker.idle_timeout: {:?} is below 1s (keep alive 0 needs a server-side idle limit)",
                b.idle_timeout
            ));
        }
        if b.auth_workers == 0 || b.auth_workers > 64 {
            p.push(format!(
                "broker.auth_workers: {} is outside 1..=64",
                b.auth_workers
            ));
        }
        if b.auth_queue > 100_000 {
            p.push(format!(
                "broker.auth_queue: {} is above 100000",
                b.auth_queue
            ));
        }
        if b.max_pending_will_bytes > budget {
            p.push(format!(
                "broker.max_pending_will_bytes: {} is larger than ingest.max_pending_bytes ({budget})",
                b.max_pending_will_bytes
            ));
        }
        if b.max_sessions == 0 {
            p.push("broker.max_sessions: must be at least 1".to_string());
        }
        if b.embedded && !b.plaintext && b.tls.is_none() {
            p.push(
                "broker.plaintext: false leaves no listener; add [broker.tls] or set it true"
                    .to_string(),
            );
        }
        let mut users = BTreeSet::new();
        for (i, u) in b.users.iter().enumerate() {
            if u.name.is_empty() {
                p.push(format!("broker.users[{i}].name: must not be empty"));
            }
            if !users.insert(u.name.as_str()) {
                p.push(format!(
                    "broker.users[{i}].name: `{}` is used twice",
                    u.name
                ));
            }
            if let Err(e) = crate::ingest::endpoint::auth::check_hash(&u.password_hash) {
                p.push(format!(
                    "broker.users[{i}].password_hash ({}): {e}; make one with `fogline-edge passwd`",
                    u.name
                ));
            }
        }
        for (i, t) in b.local_topics.iter().enumerate() {
            if let Err(e) = validate_filter(&t.filter) {
                p.push(format!(
                    "broker.local_topics[{i}].filter: `{}` {e}",
                    t.filter
                ));
            }
            if t.subscribers.is_empty() || t.subscribers.iter().any(|s| s.is_empty()) {
                p.push(format!(
                    "broker.local_topics[{i}] ({}).subscribers: list who may subscribe (user names, certificate CNs, or \"*\" for anyone)",
                    t.filter
                ));
            }
        }
        if let Some(t) = &b.tls {
            let mut files = vec![("cert", &t.cert), ("key", &t.key)];
            if let Some(ca) = &t.client_ca {
                files.push(("client_ca", ca));
            }
            for (key, path) in files {
                let path = self.resolve(path);
                if !path.is_file() {
                    p.push(format!(
                        "broker.tls.{key}: file {} does not exist",
                        path.display()
                    ));
                }
            }
        }
        let has_client_ca = b.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if b.embedded && !self.broker_allows_anonymous() && b.users.is_empty() && !has_client_ca {
            p.push(
                "broker.allow_anonymous: false, but there are no [[broker.users]] and no broker.tls.client_ca: nobody could connect"
                    .to_string(),
            );
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
            if !pipe.cloud && pipe.local == crate::config::LocalMode::Off {
                p.push(format!(
                    "{at}.cloud: false sends its outputs nowhere: set local = \"immediate\" or \"durable\" too"
                ));
            }
            if pipe.local != crate::config::LocalMode::Off
                && (!b.embedded || b.local_topics.is_empty())
                && self.mqtt.publish.is_empty()
            {
                p.push(format!(
                    "{at}.local: its outputs are for local subscribers, but {} and mqtt.publish names no topics for the external broker",
                    if b.embedded {
                        "no [[broker.local_topics]] lets anyone subscribe to them"
                    } else {
                        "the endpoint is off (broker.embedded = false)"
                    }
                ));
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
            for (key, d) in [("timeout", f.timeout), ("init_timeout", f.init_timeout)] {
                if d.is_zero() || d > std::time::Duration::from_secs(600) {
                    p.push(format!(
                        "functions.{name}.{key}: {d:?} is outside (0, 10min]"
                    ));
                }
            }
            if f.timeout_per_message > std::time::Duration::from_secs(1) {
                p.push(format!(
                    "functions.{name}.timeout_per_message: {:?} is above 1s",
                    f.timeout_per_message
                ));
            }
            if f.max_state_mib == 0 || f.max_state_mib > 1024 {
                p.push(format!(
                    "functions.{name}.max_state_mib: {} is outside 1..=1024",
                    f.max_state_mib
                ));
            }
            if f.breaker_failures == 0 {
                p.push(format!(
                    "functions.{name}.breaker_failures: must be at least 1"
                ));
            }
            if f.breaker_cooldown.is_zero() || f.breaker_max_cooldown < f.breaker_cooldown {
                p.push(format!(
                    "functions.{name}.breaker_cooldown: {:?} must be above 0 and at most breaker_max_cooldown ({:?})",
                    f.breaker_cooldown, f.breaker_max_cooldown
                ));
            }
            if f.probation_batches == 0 {
                p.push(format!(
                    "functions.{name}.probation_batches: must be at least 1"
                ));
            }
        }
        if self.outbox.max_batch == 0 {
            p.push("outbox.max_batch: must be at least 1".to_string());
        }
        if self.outbox.max_batch_bytes < 64 * 1024 {
            p.push(format!(
                "outbox.max_batch_bytes: {} is below the minimum of 65536",
                self.outbox.max_batch_bytes
            ));
        }
        // A commit of max_batch_bytes, and the checkpoint after it (the
        // write-ahead log is checkpointed at about 4 MiB), must fit in it.
        let need_mib = (2 * self.outbox.max_batch_bytes as u64).div_ceil(1 << 20) + 4;
        if self.outbox.reserve_mib != 0 && self.outbox.reserve_mib < need_mib {
            p.push(format!(
                "outbox.reserve_mib: {} is too small for outbox.max_batch_bytes = {}: a commit and \
                 the checkpoint after it can take 2 × max_batch_bytes + 4 MiB = {need_mib} MiB; \
                 raise it to at least {need_mib}, or set 0 for no reserve",
                self.outbox.reserve_mib, self.outbox.max_batch_bytes
            ));
        }
        for (key, linger) in [
            ("outbox.commit_linger", self.outbox.commit_linger),
            ("mqtt.commit_linger", self.mqtt.commit_linger),
        ] {
            if linger > std::time::Duration::from_millis(100) {
                p.push(format!(
                    "{key}: {linger:?} is above 100ms: acknowledgements would wait that long"
                ));
            }
        }
        // Acknowledgements wait up to the interval: beyond 10 s MQTT senders
        // sit on full windows, and /healthz must not take the wait for a stall.
        let interval = self.outbox.commit_interval;
        if interval > MAX_COMMIT_INTERVAL {
            p.push(format!(
                "outbox.commit_interval: {interval:?} is above {MAX_COMMIT_INTERVAL:?}: \
                 acknowledgements would wait that long between commits"
            ));
        } else if !interval.is_zero() && interval * 2 > self.health.stall_after {
            p.push(format!(
                "outbox.commit_interval: {interval:?} is more than half of health.stall_after \
                 ({:?}): the wait between commits would be reported as a wedged pipeline; \
                 lower the interval or raise stall_after to at least {:?}",
                self.health.stall_after,
                interval * 2
            ));
        }
        if self.health.stall_after < std::time::Duration::from_secs(1) {
            p.push("health.stall_after: must be at least 1s".to_string());
        }
        if self.outbox.tick_interval.is_zero() {
            p.push("outbox.tick_interval: must be more than 0".to_string());
        }
        if let Some(u) = &self.uplink {
            let servers = u.server_list();
            if servers.is_empty() {
                p.push("uplink: give the aggregator's address as `servers = [\"host:port\", ...]` (or `server = \"host:port\"`)".to_string());
            }
            for s in &servers {
                if s.rsplit_once(':')
                    .is_none_or(|(h, port)| h.is_empty() || port.parse::<u16>().is_err())
                {
                    p.push(format!("uplink.servers: `{s}` is not host:port"));
                }
            }
            if u.silence_timeout < std::time::Duration::from_millis(500) {
                p.push(format!(
                    "uplink.silence_timeout: {:?} is below 500ms",
                    u.silence_timeout
                ));
            }
            if u.probe_after.is_zero() || u.probe_after > u.silence_timeout {
                p.push(format!(
                    "uplink.probe_after: {:?} must be above 0 and at most uplink.silence_timeout ({:?})",
                    u.probe_after, u.silence_timeout
                ));
            }
            if u.keepalive < std::time::Duration::from_secs(1)
                || u.keepalive > std::time::Duration::from_secs(540)
            {
                p.push(format!(
                    "uplink.keepalive: {:?} is outside 1s..=9m (QUIC drops a connection idle for 10 min)",
                    u.keepalive
                ));
            }
            if u.stall_timeout < u.silence_timeout {
                p.push(format!(
                    "uplink.stall_timeout: {:?} is below uplink.silence_timeout ({:?})",
                    u.stall_timeout, u.silence_timeout
                ));
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
            } else if u.batch_records > fogline_protocol::MAX_BATCH_RECORDS {
                p.push(format!(
                    "uplink.batch_records: {} is above the protocol's {} records per batch",
                    u.batch_records,
                    fogline_protocol::MAX_BATCH_RECORDS
                ));
            }
            if u.batch_bytes > fogline_protocol::MAX_BATCH_RAW_BYTES / 2 {
                p.push(format!(
                    "uplink.batch_bytes: {} is above {}, half the protocol's batch limit",
                    u.batch_bytes,
                    fogline_protocol::MAX_BATCH_RAW_BYTES / 2
                ));
            }
            if u.max_in_flight == 0 {
                p.push("uplink.max_in_flight: must be at least 1".to_string());
            }
            if u.reconnect_min > u.reconnect_max {
                p.push(format!(
                    "uplink.reconnect_min: {:?} is above uplink.reconnect_max ({:?})",
                    u.reconnect_min, u.reconnect_max
                ));
            }
            if u.refused_delay > u.refused_max_delay {
                p.push(format!(
                    "uplink.refused_delay: {:?} is above uplink.refused_max_delay ({:?})",
                    u.refused_delay, u.refused_max_delay
                ));
            }
            // What the status frame carries without cutting.
            if u.labels.len() > 32 {
                p.push(format!(
                    "uplink.labels: {} labels, at most 32",
                    u.labels.len()
                ));
            }
            for (k, v) in &u.labels {
                if k.is_empty() || k.len() > 64 || v.len() > 128 || k.contains('=') {
                    p.push(format!(
                        "uplink.labels: `{k}` = `{v}`: a name of 1 to 64 bytes without `=` and a value of at most 128 bytes"
                    ));
                }
            }
        }
        self.validate_retention(&mut p);
        self.check_conflicts(&mut p);
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigProblems(p))
        }
    }

    /// The outbox's bounds (I-32): each quota must hold a batch or two.
    fn validate_retention(&self, p: &mut Vec<String>) {
        let o = &self.outbox;
        let batch = o.max_batch_bytes as u64;
        if let Some(max) = o.max_bytes {
            let min = 2 * self.wal_allowance() + 8 * (1 << 20);
            if max.as_u64() < min {
                p.push(format!(
                    "outbox.max_bytes: {} is below the minimum of {} for outbox.max_batch_bytes = {} (the write-ahead log's allowance, twice, plus 8 MiB)",
                    crate::outbox::human_bytes(max.as_u64()),
                    crate::outbox::human_bytes(min),
                    crate::outbox::human_bytes(batch)
                ));
            }
        }
        let min_age = Duration::from_secs(1);
        if o.max_age.is_some_and(|a| a < min_age) {
            p.push("outbox.max_age: must be at least 1s".to_string());
        }
        if o.dead_letter_max_bytes.as_u64() < 1 << 20 {
            p.push(format!(
                "outbox.dead_letter_max_bytes: {} is below the minimum of 1 MiB",
                o.dead_letter_max_bytes
            ));
        }
        if o.local_max_bytes.as_u64() < 1 << 20 {
            p.push(format!(
                "outbox.local_max_bytes: {} is below the minimum of 1 MiB",
                o.local_max_bytes
            ));
        }
        for (i, pipe) in self.pipelines.iter().enumerate() {
            if let Some(max) = pipe.max_bytes {
                if max.as_u64() < 2 * batch {
                    p.push(format!(
                        "pipelines[{i}] ({}).max_bytes: {} cannot hold two batches of outbox.max_batch_bytes ({})",
                        pipe.name,
                        crate::outbox::human_bytes(max.as_u64()),
                        crate::outbox::human_bytes(batch)
                    ));
                }
            }
            if pipe.max_age.is_some_and(|a| a < min_age) {
                p.push(format!(
                    "pipelines[{i}] ({}).max_age: must be at least 1s",
                    pipe.name
                ));
            }
        }
    }
}
