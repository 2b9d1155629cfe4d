//! The edge daemon's configuration: one typed tree read from TOML.
//!
//! Every key has a default (see [`defaults`]); unknown keys are errors. After
//! parsing, [`EdgeConfig::validate`] reports every problem at once, each naming
//! the key it is about.

mod conflicts;
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
    /// `[log]`: log format and level.
    #[serde(default)]
    pub log: LogConfig,
    /// `[mqtt]`: the external broker ingest subscribes to.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// `[broker]`: the native MQTT endpoint sensors publish to.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// `[ingest]`: what is shared by both ways in.
    #[serde(default)]
    pub ingest: IngestConfig,
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
    /// `[health]`: when `/healthz` calls the daemon wedged.
    #[serde(default)]
    pub health: HealthConfig,
    /// `[modules]`: which function modules the gateway runs.
    #[serde(default)]
    pub modules: ModulesConfig,
    /// Directory the config file was read from; relative paths resolve against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file it was read from (a running daemon watches it for reloads).
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

/// `[modules]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModulesConfig {
    /// Fleet public keys (`ed25519:<hex>`, from `fogline-cloud modules
    /// keygen`). When any is set, every module must come with a
    /// `<module>.sig` made by one of them (`fogline-cloud modules publish`);
    /// others are refused at start and on reload.
    pub trusted_keys: Vec<String>,
}

impl ModulesConfig {
    /// The trusted keys, parsed (validation reports the bad ones).
    pub fn keys(&self) -> Vec<fogline_protocol::signing::PublicKey> {
        self.trusted_keys
            .iter()
            .filter_map(|k| k.parse().ok())
            .collect()
    }
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
    /// On SIGTERM, how long to wait for the pipeline to commit what it took
    /// (a full disk can make a commit wait forever). Past it the daemon
    /// exits anyway; nothing uncommitted was acknowledged.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; colours only when writing to a terminal.
    Text,
    /// One JSON object per line (Loki, Elasticsearch, journald's JSON tooling).
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// Default filter (`RUST_LOG` overrides), e.g. `info` or `info,fogline_edge::ingest=debug`.
    pub level: String,
}

/// MQTT protocol version the broker client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MqttProtocol {
    /// MQTT 5 (receive maximum, reason codes). Default.
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1, for brokers without MQTT 5.
    #[serde(rename = "3.1.1")]
    V311,
}

/// `[mqtt]`: an external broker (mosquitto and friends) ingest subscribes to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Subscribe to an external broker. Default: yes, unless `[broker]
    /// embedded = true` and `broker` is left at its default.
    pub enabled: Option<bool>,
    /// `host:port` of the broker.
    pub broker: String,
    /// `"5"` (default) or `"3.1.1"`.
    pub protocol: MqttProtocol,
    /// Subscription QoS: 2 (default) keeps publishers' QoS 2 exactly-once;
    /// QoS 1 publications still arrive at QoS 1.
    pub qos: u8,
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
    /// Deadline for TCP connect + CONNACK.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a small batch from the broker may wait for more before its
    /// commit. The broker keeps up to `receive_maximum` messages in flight
    /// to us without waiting, so this costs only acknowledgement latency at
    /// the broker, and saves commits (fsyncs) when messages trickle in.
    #[serde(with = "humantime_serde")]
    pub commit_linger: Duration,
    /// Outputs of pipelines with `local` whose stream matches one of these
    /// filters are also published to this broker, on the stream as topic:
    /// at QoS 0 from `immediate` pipelines, at `publish_qos` from `durable`
    /// ones (kept and resent until the broker acknowledges, across restarts).
    pub publish: Vec<String>,
    /// QoS of publications from `durable` pipelines: 1 (default) or 2.
    pub publish_qos: u8,
}

/// `[broker]`: the native MQTT endpoint. Sensors publish straight to the
/// gateway (MQTT 3.1.1 and 5, QoS 0/1/2); a PUBACK or PUBREC is sent only
/// once the outbox commit holding the message's outputs is durable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Run the endpoint. (The key keeps its old name: it used to start an
    /// embedded broker.)
    pub embedded: bool,
    /// Plain-TCP listener for MQTT 3.1.1 and 5 clients. Loopback by default:
    /// expose it to the LAN knowingly (with users, or TLS).
    pub listen: SocketAddr,
    /// Deprecated: a second plain listener (it used to be the embedded
    /// broker's MQTT 5 port). Both versions are served on `listen` now.
    pub listen_v5: Option<SocketAddr>,
    /// Serve plain TCP on `listen`. Set false to accept TLS only.
    pub plaintext: bool,
    /// Larger payloads are refused (MQTT 5: reason 0x97) and dead-lettered
    /// with their first KiB.
    pub max_payload_bytes: usize,
    /// Larger packets close the connection (MQTT 5: DISCONNECT 0x95 Packet
    /// too large, announced in CONNACK). Default: `max_payload_bytes` + 64 KiB.
    pub max_packet_bytes: Option<usize>,
    /// Longer topic names are refused (MQTT 5: 0x90) and dead-lettered. At
    /// most the replication protocol's stream-name limit (1024).
    pub max_topic_bytes: usize,
    /// QoS 1/2 messages a client may have unacknowledged (MQTT 5 Receive
    /// Maximum; MQTT 3.1.1 clients are simply not read beyond it). Acks wait
    /// for the outbox commit, so this window is what keeps throughput up.
    pub receive_maximum: u16,
    /// Most simultaneous connections; more are refused (0x97 / 3).
    pub max_connections: usize,
    /// Most sessions kept (connected or persistent); more are refused.
    pub max_sessions: usize,
    /// Longest keep-alive granted (MQTT 5 clients asking for more, or for
    /// none, are told this via Server Keep Alive). An MQTT 3.1.1 client
    /// asking for more cannot be told; it is held to this all the same: cut
    /// after 1.5 × `max_keep_alive` of silence.
    #[serde(with = "humantime_serde")]
    pub max_keep_alive: Duration,
    /// Longest a persistent session is kept after its client disconnects
    /// (MQTT 3.1.1 clean session 0 sessions get exactly this).
    #[serde(with = "humantime_serde")]
    pub max_session_expiry: Duration,
    /// Deadline from TCP accept to a complete CONNECT, TLS handshake
    /// included: silent, half-open and slow (slowloris) sockets are closed
    /// then.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Most simultaneous connections from one IP address (counted from
    /// accept, before CONNECT); more are closed at once.
    pub max_connections_per_ip: usize,
    /// Connections one IP address may open per second, on average; a burst
    /// of `connect_burst_per_ip` is allowed. More are closed at accept.
    pub connect_rate_per_ip: u32,
    /// Connections one IP address may open at once before
    /// `connect_rate_per_ip` applies.
    pub connect_burst_per_ip: u32,
    /// Largest CONNECT accepted (before authentication: a client that is
    /// not yet known buffers at most this). Larger: CONNACK 0x95 / closed.
    pub max_connect_bytes: usize,
    /// Bytes that all connections still before their CONNECT may buffer
    /// together; they come out of `ingest.max_pending_bytes` and may take
    /// at most a quarter of it. A connection that finds no room is closed.
    /// Default: 4 MiB, or a quarter of `ingest.max_pending_bytes` if less.
    pub max_preconnect_bytes: Option<usize>,
    /// Server-side idle limit of an MQTT 3.1.1 client that asked for keep
    /// alive 0 ("never"): closed after this long without a packet. (MQTT 5
    /// clients are told `max_keep_alive` instead.)
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Argon2 password verifications run at once (each holds ~7 MiB for
    /// tens of milliseconds).
    pub auth_workers: usize,
    /// CONNECTs waiting for a password verification; beyond, refused with
    /// CONNACK 0x89 server busy (MQTT 3.1.1: 3 server unavailable).
    pub auth_queue: usize,
    /// Bytes of wills waiting for their delay (MQTT 5 Will Delay Interval),
    /// all sessions together. A will that does not fit is published at once.
    pub max_pending_will_bytes: usize,
    /// Accept clients without credentials or client certificate. Default:
    /// true when no `[[broker.users]]` and no `tls.client_ca` are set.
    pub allow_anonymous: Option<bool>,
    /// `[[broker.users]]`: who may connect with a user name and password.
    pub users: Vec<BrokerUser>,
    /// `[[broker.local_topics]]`: topics local subscribers may SUBSCRIBE to
    /// on this endpoint (the outputs of pipelines with `local`), and who.
    /// None: every SUBSCRIBE is refused.
    pub local_topics: Vec<LocalTopicConfig>,
    /// `[broker.tls]`: a TLS listener.
    pub tls: Option<BrokerTls>,
}

/// `[[broker.users]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerUser {
    /// User name.
    pub name: String,
    /// PHC string of the password's Argon2 hash: `fogline-edge passwd` makes
    /// one. Never the password itself.
    pub password_hash: String,
}

/// `[[broker.local_topics]]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LocalTopicConfig {
    /// A topic filter (`actuators/#`): subscriptions within it are allowed.
    pub filter: String,
    /// Who may subscribe: user names of `[[broker.users]]` or certificate
    /// CNs; `"*"` anyone, anonymous clients included.
    pub subscribers: Vec<String>,
}

/// `[broker.tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTls {
    /// TLS listener address.
    #[serde(default = "defaults::broker_tls_listen")]
    pub listen: SocketAddr,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA for client certificates (PEM). Set: clients present a certificate
    /// from it (unless `require_client_cert = false`), and its CN is their
    /// identity.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a certificate from `client_ca`. Default true.
    #[serde(default = "defaults::yes")]
    pub require_client_cert: bool,
}

/// `[ingest]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Byte budget of everything received and not yet committed (both ways
    /// in). When it is spent, sockets are not read: backpressure reaches the
    /// senders instead of memory growing.
    pub max_pending_bytes: usize,
    /// What happens to a message that matches no pipeline.
    pub unrouted: UnroutedPolicy,
}

/// `ingest.unrouted`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnroutedPolicy {
    /// Kept as a dead letter (reason `unrouted`), counted, reported to the
    /// aggregator, warned about once per topic: a typo in a sensor's topic
    /// loses nothing.
    #[default]
    DeadLetter,
    /// Dropped, counted and reported to the aggregator as a loss.
    Drop,
}

/// `[health]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// `/healthz` answers 503 when work is pending and the pipeline (or a
    /// connected uplink) made no progress for this long.
    #[serde(with = "humantime_serde")]
    pub stall_after: Duration,
}

/// `[functions.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// Path to the `.wasm` component.
    pub module: PathBuf,
    /// Memory cap per instance, MiB: all its memories together.
    #[serde(default = "defaults::function_memory_mib")]
    pub memory_mib: usize,
    /// Deadline of a tick, and of a batch before `timeout_per_message`.
    #[serde(default = "defaults::function_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Added to a batch's deadline per message in it: a big batch under
    /// load is not failed for its size.
    #[serde(
        default = "defaults::function_timeout_per_message",
        with = "humantime_serde"
    )]
    pub timeout_per_message: Duration,
    /// Deadline of `init` plus restoring the state.
    #[serde(default = "defaults::function_init_timeout", with = "humantime_serde")]
    pub init_timeout: Duration,
    /// Most durable state, MiB.
    #[serde(default = "defaults::function_max_state_mib")]
    pub max_state_mib: usize,
    /// Failed batches in a row that open the circuit breaker.
    #[serde(default = "defaults::breaker_failures")]
    pub breaker_failures: u32,
    /// First cool-down of an open breaker; it doubles per failed probe.
    #[serde(default = "defaults::breaker_cooldown", with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Longest cool-down.
    #[serde(default = "defaults::breaker_max_cooldown", with = "humantime_serde")]
    pub breaker_max_cooldown: Duration,
    /// While the breaker is open: `hold` the inputs durably (acknowledged,
    /// run in order once it recovers) or `dead_letter` them.
    #[serde(default = "defaults::on_open")]
    pub on_open: crate::pipeline::OnOpen,
    /// Most MiB of inputs held behind an open breaker; past it they are
    /// dead-lettered.
    #[serde(default = "defaults::max_held_mib")]
    pub max_held_mib: usize,
    /// Batches a new version of the function runs in shadow before it takes
    /// over (a failure before then rolls it back).
    #[serde(default = "defaults::probation_batches")]
    pub probation_batches: u32,
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
    /// `high` (alerts) drains to the aggregator first and is dropped last
    /// under `outbox.max_bytes` with `drop_oldest`; `low` drains last and is
    /// dropped first.
    #[serde(default)]
    pub priority: crate::outbox::Priority,
    /// Payload and stream-name bytes this pipeline's records may hold in
    /// the outbox (`"64 MiB"`).
    #[serde(default)]
    pub max_bytes: Option<bytesize::ByteSize>,
    /// How long its records may wait for the uplink (`"7d"`).
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// What its full `max_bytes` does, and whether `outbox.max_bytes` may
    /// drop its records. Default: `outbox.when_full`.
    #[serde(default)]
    pub when_full: Option<crate::outbox::WhenFull>,
    /// Also serve its outputs to local subscribers of the endpoint
    /// (`[[broker.local_topics]]`): `immediate` hands each output over as
    /// soon as the functions return, before the commit (at most once);
    /// `durable` after the commit, at the QoS the subscriber asked for (1 or
    /// 2), kept and redelivered across restarts until acknowledged (at
    /// least once; exactly once at QoS 2). Either way batches do not linger
    /// (`outbox.commit_linger` is not applied).
    #[serde(default)]
    pub local: LocalMode,
    /// Its outputs go to the outbox and the cloud (default). `false`: to
    /// local subscribers only (needs `local`); nothing of it is uplinked.
    #[serde(default = "defaults::yes")]
    pub cloud: bool,
}

/// `[[pipelines]] local`: whether and when outputs go to local subscribers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalMode {
    /// Outputs go to the outbox only.
    #[default]
    Off,
    /// Handed to local subscribers as the functions return, before the
    /// commit: lowest latency, at most once.
    Immediate,
    /// Written with the commit and delivered after it at QoS 1 or 2; kept
    /// until every durable subscriber acknowledged it (crate::local::durable).
    Durable,
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
    /// Most bytes (topics + payloads) the pipeline takes into one batch.
    pub max_batch_bytes: usize,
    /// When fewer than 512 messages are waiting, wait up to this long for
    /// more before committing: fewer, larger commits when messages trickle in
    /// (each commit costs an fsync and CPU), at the price of this much added
    /// acknowledgement latency. 0 commits at once.
    #[serde(with = "humantime_serde")]
    pub commit_linger: Duration,
    /// Flash wear against acknowledgement latency: commit at most once per
    /// this interval (a batch that fills `max_batch` or `max_batch_bytes`
    /// commits at once). Every commit appends each page it touches to the
    /// write-ahead log — 4 KiB per page however few readings it holds — so
    /// readings that trickle in cost several KiB each when committed one by
    /// one, and a few hundred bytes when an interval gathers them.
    /// Acknowledgements wait for the commit as always (I-1): nothing
    /// acknowledged is ever at risk; senders wait up to this long for them
    /// and keep that much more in flight; functions' ticks, which run
    /// between batches, may run up to this late under steady traffic.
    /// 0 (default): commit as soon as the previous commit is done.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How often functions' `tick` is called.
    #[serde(with = "humantime_serde")]
    pub tick_interval: Duration,
    /// MiB the outbox keeps for draining: new readings are not committed
    /// (nor acknowledged) while less than this is free on its disk,
    /// counting free pages inside it, so deleting what the aggregator
    /// acknowledged always has room and a full disk drains by itself. Half
    /// as much again is held in `<outbox>.reserve` and given back if
    /// something else fills the disk. 0: none (a full disk then needs an
    /// operator).
    pub reserve_mib: u64,
    /// At start, check the outbox's integrity for at most this long (a
    /// damaged file is salvaged into a new one); 0 skips the check.
    #[serde(with = "humantime_serde")]
    pub check_on_start: Duration,
    /// Bytes the outbox may take on disk, database and write-ahead log
    /// (`"1 GiB"`); `none` for no bound but the disk.
    #[serde(deserialize_with = "de_opt_size")]
    pub max_bytes: Option<bytesize::ByteSize>,
    /// How long a record may wait for the uplink (`"30d"`); none by default.
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// What a full `max_bytes` does: `block` (stop acknowledging; senders
    /// keep their data) or `drop_oldest` (newest data wins; counted).
    pub when_full: crate::outbox::WhenFull,
    /// Bytes of dead letters kept; the oldest beyond it are pruned and
    /// counted as lost.
    pub dead_letter_max_bytes: bytesize::ByteSize,
    /// Bytes of outputs kept for durable local subscribers (pipelines with
    /// `local = "durable"`) until each has acknowledged them; beyond it the
    /// oldest are dropped for local delivery, counted
    /// (`fogline_local_dropped_total{reason="retention"}`).
    pub local_max_bytes: bytesize::ByteSize,
}

/// A size, or `"none"`.
fn de_opt_size<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<bytesize::ByteSize>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum SizeOrNone {
        Size(bytesize::ByteSize),
        Word(String),
    }
    match SizeOrNone::deserialize(d)? {
        SizeOrNone::Size(s) => Ok(Some(s)),
        SizeOrNone::Word(w) if w == "none" => Ok(None),
        SizeOrNone::Word(w) => w.parse::<bytesize::ByteSize>().map(Some).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{w}` is not a size like \"1 GiB\" or \"none\": {e}"
            ))
        }),
    }
}

/// How a node orders its aggregators.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerOrder {
    /// Highest rendezvous weight of (node id, address) first.
    #[default]
    Rendezvous,
    /// As listed.
    Listed,
}

/// `[uplink]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Aggregator address, `host:port` (resolved at each connect). Kept for
    /// configs written before `servers`; both may be given (this one first).
    #[serde(default)]
    pub server: Option<String>,
    /// Aggregator addresses. With more than one, each node tries them in
    /// its own order (`server_order`); on failure the next one.
    #[serde(default)]
    pub servers: Vec<String>,
    /// `rendezvous` (default): ordered by rendezvous hashing of the node id,
    /// so a fleet spreads evenly over the aggregators and only ≈ 1/N of the
    /// nodes move when one is added or lost. `listed`: as written.
    #[serde(default)]
    pub server_order: ServerOrder,
    /// Name the aggregator's certificate must carry. Default: the host of
    /// each server address.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Fleet CA certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM), issued by the fleet CA. Replaced
    /// files (a renewal) are picked up without a restart.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// The order within one pipeline priority when a backlog drains:
    /// `oldest_first` (default), `live_first` (what arrives now goes
    /// before the backlog) or `interleaved` (one batch of each in turn).
    /// Pipelines of `priority = "high"` always drain first, `low` last.
    #[serde(default)]
    pub drain: crate::outbox::drain::DrainOrder,
    /// Most records per batch.
    #[serde(default = "defaults::uplink_batch_records")]
    pub batch_records: usize,
    /// Most payload bytes per batch.
    #[serde(default = "defaults::uplink_batch_bytes")]
    pub batch_bytes: usize,
    /// Batches sent but not yet acknowledged.
    #[serde(default = "defaults::uplink_max_in_flight")]
    pub max_in_flight: usize,
    /// Shortest wait before reconnecting; the wait grows with the outage
    /// (a tenth of it), jittered, up to `reconnect_max`.
    #[serde(default = "defaults::reconnect_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect wait (also the cap of the backoff after sessions
    /// that end before making progress).
    #[serde(default = "defaults::reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// After the aggregator refuses this node (its certificate rejected, or
    /// closed as unauthorized), wait this long; it doubles per refusal in a
    /// row. Renewed certificate files end the wait at once.
    #[serde(default = "defaults::refused_delay", with = "humantime_serde")]
    pub refused_delay: Duration,
    /// Longest wait after refusals.
    #[serde(default = "defaults::refused_max_delay", with = "humantime_serde")]
    pub refused_max_delay: Duration,
    /// Longest handshake (QUIC or TCP/TLS) before trying the next way.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Waiting for an answer (acks, a pong) and hearing nothing for this
    /// long: the link is dead, reconnect.
    #[serde(default = "defaults::silence_timeout", with = "humantime_serde")]
    pub silence_timeout: Duration,
    /// Waiting for an answer and hearing nothing for this long: try a fresh
    /// connection alongside (finds a restarted aggregator fast).
    #[serde(default = "defaults::probe_after", with = "humantime_serde")]
    pub probe_after: Duration,
    /// Nothing sent or heard for this long: ping (keeps NAT mappings, finds
    /// a dead idle link). About 100 bytes per ping and pong.
    #[serde(default = "defaults::keepalive", with = "humantime_serde")]
    pub keepalive: Duration,
    /// How often the node tells the aggregator how it is (backlog, drops,
    /// health, versions; a `Status` frame of a few hundred bytes), and once
    /// at each connect. Aggregators before protocol 5 are not sent it.
    #[serde(default = "defaults::status_every", with = "humantime_serde")]
    pub status_every: Duration,
    /// Batches in flight, the aggregator answers pings, but nothing is
    /// acknowledged for this long: reconnect.
    #[serde(default = "defaults::stall_timeout", with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Fall back to TLS over TCP when QUIC cannot connect (UDP blocked).
    #[serde(default = "defaults::yes")]
    pub tcp_fallback: bool,
    /// While on TCP, try QUIC again this often.
    #[serde(default = "defaults::quic_retry", with = "humantime_serde")]
    pub quic_retry: Duration,
    /// The node's labels (`{ site = "north", line = "3" }`), sent in its
    /// status: what a rollout's `label` target selects by.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
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
    /// Bytes of `outbox.max_bytes` kept for the write-ahead log: what
    /// accumulates between checkpoints plus the largest commit, twice.
    pub fn wal_allowance(&self) -> u64 {
        (4 << 20) + 2 * self.outbox.max_batch_bytes as u64
    }

    /// The outbox's bounds from `[outbox]` (lanes are added per pipeline).
    pub fn retention(&self) -> crate::outbox::Retention {
        crate::outbox::Retention {
            max_bytes: self.outbox.max_bytes.map(|b| b.as_u64()),
            max_age: self.outbox.max_age,
            when_full: self.outbox.when_full,
            lanes: Default::default(),
            dead_letter_max_bytes: self.outbox.dead_letter_max_bytes.as_u64(),
            local_max_bytes: self.outbox.local_max_bytes.as_u64(),
            wal_allowance: self.wal_allowance(),
        }
    }

    /// A pipeline's bounds in the outbox.
    pub fn lane_policy(&self, p: &PipelineConfig) -> crate::outbox::LanePolicy {
        crate::outbox::LanePolicy {
            name: p.name.clone(),
            priority: p.priority,
            max_bytes: p.max_bytes.map(|b| b.as_u64()),
            max_age: p.max_age,
            when_full: p.when_full.unwrap_or(self.outbox.when_full),
        }
    }

    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        // Absolute, so paths derived from it stay valid whatever the working
        // directory (wasmtime's compile cache insists on an absolute path).
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::path::absolute(&base).unwrap_or(base);
        let mut config = Self::parse(&text, &base).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        config.base_dir = base;
        config.path = Some(path.to_path_buf());
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

    /// Where every function build that ran is kept (by SHA-256).
    pub fn module_store_dir(&self) -> PathBuf {
        self.data_dir().join("modules")
    }

    /// The MQTT client id.
    pub fn client_id(&self) -> String {
        self.mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("fogline-{}", self.node.id))
    }

    /// Whether ingest subscribes to an external broker.
    pub fn external_broker_enabled(&self) -> bool {
        self.mqtt
            .enabled
            .unwrap_or(!self.broker.embedded || self.mqtt.broker != defaults::MQTT_BROKER)
    }

    /// The external broker's address.
    pub fn ingest_broker(&self) -> String {
        self.mqtt.broker.clone()
    }

    /// `broker.max_preconnect_bytes` or its default.
    pub fn broker_max_preconnect(&self) -> usize {
        self.broker
            .max_preconnect_bytes
            .unwrap_or((4 << 20).min(self.ingest.max_pending_bytes / 4))
    }

    /// Largest CONNECT before authentication: `broker.max_connect_bytes`,
    /// within the pre-CONNECT share and the maximum packet size.
    pub fn broker_max_connect(&self) -> usize {
        self.broker
            .max_connect_bytes
            .min(self.broker_max_preconnect())
            .min(self.broker_max_packet())
    }

    /// The native endpoint's largest packet.
    pub fn broker_max_packet(&self) -> usize {
        self.broker
            .max_packet_bytes
            .unwrap_or(self.broker.max_payload_bytes.saturating_add(64 * 1024))
    }

    /// Whether the native endpoint accepts clients without credentials.
    pub fn broker_allows_anonymous(&self) -> bool {
        self.broker.allow_anonymous.unwrap_or(
            self.broker.users.is_empty()
                && self
                    .broker
                    .tls
                    .as_ref()
                    .is_none_or(|t| t.client_ca.is_none()),
        )
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
    /// Every aggregator address, `server` first, then `servers`.
    pub fn server_list(&self) -> Vec<String> {
        self.server.iter().chain(&self.servers).cloned().collect()
    }

    /// The addresses in the order node `node` tries them (`server_order`).
    pub fn servers_for(&self, node: &str) -> Vec<String> {
        let listed = self.server_list();
        match self.server_order {
            ServerOrder::Listed => listed,
            ServerOrder::Rendezvous => fogline_protocol::placement::rendezvous_order(node, &listed),
        }
    }

    /// The name `server`'s certificate must carry.
    pub fn server_name(&self, server: &str) -> String {
        match &self.server_name {
            Some(n) => n.clone(),
            None => server
                .rsplit_once(':')
                .map(|(host, _)| host.trim_matches(['[', ']']).to_string())
                .unwrap_or_else(|| server.to_string()),
        }
    }
}

#[cfg(test)]
mod tests;
