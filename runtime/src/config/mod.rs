//! The edge daemon's configuration: one typed tree read from TOML.
//!
//! Every key has a default (see [`defaults`]); unknown keys are errors. After
//! parsing, [`EdgeConfig::validate`] reports every problem at once, each naming
//! the key it is about.

mod defaults;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use validate::ConfigProblems;

/// Errors reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        message: String,
    },
    /// The file parsed but its values do not make sense together.
    #[error("invalid config file {path}:\n{problems}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: ConfigProblems,
    },
}

/// The whole `edge.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// `[node]`: identity and where data lives.
    #[serde(default)]
    pub node: NodeConfig,
    /// `[mqtt]`: the broker ingest subscribes to.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// `[broker]`: the optional embedded MQTT broker.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// `[functions.<name>]`: WASM functions by name.
    #[serde(default)]
    pub functions: BTreeMap<String, FunctionConfig>,
    /// `[[pipelines]]`: topic filters routed through chains of functions.
    #[serde(default)]
    pub pipelines: Vec<PipelineConfig>,
    /// `[outbox]`: the SQLite buffer.
    #[serde(default)]
    pub outbox: OutboxConfig,
    /// `[uplink]`: the QUIC connection to the aggregator. Absent: buffer only.
    #[serde(default)]
    pub uplink: Option<UplinkConfig>,
    /// `[metrics]`: the Prometheus / status HTTP endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Directory the config file was read from; relative paths resolve against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[node]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// A name for logs and the MQTT client id. The aggregator identifies the
    /// node by its certificate, not by this.
    pub id: String,
    /// Where the outbox and the compiled-module cache live.
    pub data_dir: PathBuf,
}

/// `[mqtt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `host:port` of the broker.
    pub broker: String,
    /// MQTT client id; the persistent session is keyed by it. Default `fogline-<node.id>`.
    pub client_id: Option<String>,
    /// Optional credentials.
    pub username: Option<String>,
    /// Optional credentials.
    pub password: Option<String>,
    /// Keep-alive interval.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// MQTT v5 receive maximum: how many unacknowledged QoS 1 messages the
    /// broker may have in flight to us. Acks wait for the outbox commit, so this
    /// window is what keeps throughput up.
    pub receive_maximum: u16,
    /// Payloads larger than this are dead-lettered (first KiB kept), not processed.
    pub max_payload_bytes: usize,
    /// Session expiry the broker keeps our subscriptions and queued messages for.
    #[serde(with = "humantime_serde")]
    pub session_expiry: Duration,
}

/// `[broker]`: an MQTT broker inside the daemon, so sensors can publish
/// straight to the gateway with nothing else installed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Run the embedded broker. Ingest then connects to it unless `[mqtt] broker` says otherwise.
    pub embedded: bool,
    /// Where the embedded broker listens for MQTT 3.1.1 clients (most sensors).
    pub listen: SocketAddr,
    /// Where it listens for MQTT 5 clients; ingest connects here.
    pub listen_v5: SocketAddr,
    /// Largest payload it accepts.
    pub max_payload_bytes: usize,
}

/// `[functions.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// Path to the `.wasm` component.
    pub module: PathBuf,
    /// Memory cap per instance, MiB.
    #[serde(default = "defaults::function_memory_mib")]
    pub memory_mib: usize,
    /// Deadline per call.
    #[serde(default = "defaults::function_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// The function's own settings, handed to its `init` as JSON.
    #[serde(default = "defaults::empty_table")]
    pub config: toml::Table,
}

/// `[[pipelines]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// A unique name, used in logs, metrics and dead letters.
    pub name: String,
    /// MQTT topic filters (`+` and `#` allowed).
    pub topics: Vec<String>,
    /// Function names, applied in order. Empty: messages pass unchanged.
    #[serde(default)]
    pub functions: Vec<String>,
}

/// How hard each outbox commit is pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync every commit: acknowledged messages survive power loss. Default.
    Full,
    /// fsync at checkpoints only: faster, but a power cut can lose the last
    /// commits the broker already forgot. The operator's explicit choice.
    Normal,
}

/// `[outbox]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Database file. Default `<node.data_dir>/outbox.db`.
    pub path: Option<PathBuf>,
    /// Durability of each commit.
    pub sync: SyncMode,
    /// Most messages the pipeline takes into one batch (one commit).
    pub max_batch: usize,
    /// How often functions' `tick` is called.
    #[serde(with = "humantime_serde")]
    pub tick_interval: Duration,
}

/// `[uplink]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Aggregator address, `host:port` (resolved at each connect).
    pub server: String,
    /// Name the aggregator's certificate must carry. Default: the host of `server`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Fleet CA certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM), issued by the fleet CA.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// Most records per batch.
    #[serde(default = "defaults::uplink_batch_records")]
    pub batch_records: usize,
    /// Most payload bytes per batch.
    #[serde(default = "defaults::uplink_batch_bytes")]
    pub batch_bytes: usize,
    /// Batches sent but not yet acknowledged.
    #[serde(default = "defaults::uplink_max_in_flight")]
    pub max_in_flight: usize,
    /// First reconnect delay; doubles up to `reconnect_max`, with jitter.
    #[serde(default = "defaults::reconnect_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    #[serde(default = "defaults::reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Handshake deadline.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` and `/status` here. Set `enabled = false` to turn off.
    pub listen: SocketAddr,
    /// Serve at all.
    pub enabled: bool,
}

impl EdgeConfig {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut config = Self::parse(&text, &base).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        config.base_dir = base;
        config.validate().map_err(|problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })?;
        Ok(config)
    }

    /// Parse TOML text; relative paths will resolve against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self, String> {
        let mut config: EdgeConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.base_dir = base_dir.to_path_buf();
        Ok(config)
    }

    /// Resolve a path from the config against the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    /// The data directory, resolved.
    pub fn data_dir(&self) -> PathBuf {
        self.resolve(&self.node.data_dir)
    }

    /// The outbox database file, resolved.
    pub fn outbox_path(&self) -> PathBuf {
        match &self.outbox.path {
            Some(p) => self.resolve(p),
            None => self.data_dir().join("outbox.db"),
        }
    }

    /// Where compiled modules are cached.
    pub fn module_cache_dir(&self) -> PathBuf {
        self.data_dir().join("module-cache")
    }

    /// The MQTT client id.
    pub fn client_id(&self) -> String {
        self.mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("fogline-{}", self.node.id))
    }

    /// The broker ingest connects to: the embedded one's address when it runs
    /// and `[mqtt] broker` was left at its default.
    pub fn ingest_broker(&self) -> String {
        if self.broker.embedded && self.mqtt.broker == defaults::MQTT_BROKER {
            let port = self.broker.listen_v5.port();
            format!("127.0.0.1:{port}")
        } else {
            self.mqtt.broker.clone()
        }
    }

    /// Every topic filter any pipeline subscribes to, deduplicated.
    pub fn topic_filters(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .pipelines
            .iter()
            .flat_map(|p| p.topics.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

impl UplinkConfig {
    /// The TLS server name to expect.
    pub fn server_name(&self) -> String {
        match &self.server_name {
            Some(n) => n.clone(),
            None => self
                .server
                .rsplit_once(':')
                .map(|(host, _)| host.trim_matches(['[', ']']).to_string())
                .unwrap_or_else(|| self.server.clone()),
        }
    }
}

#[cfg(test)]
mod tests;
