//! Every default of `edge.toml`, in one place.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::*;

pub(super) const MQTT_BROKER: &str = "127.0.0.1:1883";

pub(super) fn function_memory_mib() -> usize {
    64
}
pub(super) fn function_timeout() -> Duration {
    Duration::from_millis(200)
}
pub(super) fn function_timeout_per_message() -> Duration {
    Duration::from_micros(50)
}
pub(super) fn function_init_timeout() -> Duration {
    Duration::from_secs(5)
}
pub(super) fn function_max_state_mib() -> usize {
    16
}
pub(super) fn breaker_failures() -> u32 {
    3
}
pub(super) fn breaker_cooldown() -> Duration {
    Duration::from_secs(1)
}
pub(super) fn breaker_max_cooldown() -> Duration {
    Duration::from_secs(300)
}
pub(super) fn on_open() -> crate::pipeline::OnOpen {
    crate::pipeline::OnOpen::Hold
}
pub(super) fn max_held_mib() -> usize {
    64
}
pub(super) fn probation_batches() -> u32 {
    10
}
pub(super) fn empty_table() -> toml::Table {
    toml::Table::new()
}
pub(super) fn uplink_batch_records() -> usize {
    4096
}
pub(super) fn uplink_batch_bytes() -> usize {
    1 << 20
}
pub(super) fn uplink_max_in_flight() -> usize {
    // Two of the aggregator's apply groups (32k records) in flight: while it
    // applies one, the next is already on its way (no bubble per ack).
    16
}
pub(super) fn reconnect_min() -> Duration {
    Duration::from_millis(100)
}
pub(super) fn reconnect_max() -> Duration {
    Duration::from_secs(5)
}
pub(super) fn refused_delay() -> Duration {
    Duration::from_secs(15)
}
pub(super) fn refused_max_delay() -> Duration {
    Duration::from_secs(600)
}
pub(super) fn connect_timeout() -> Duration {
    Duration::from_secs(5)
}
pub(super) fn silence_timeout() -> Duration {
    Duration::from_secs(5)
}
pub(super) fn probe_after() -> Duration {
    Duration::from_secs(1)
}
pub(super) fn keepalive() -> Duration {
    Duration::from_secs(60)
}
pub(super) fn status_every() -> Duration {
    Duration::from_secs(30)
}
pub(super) fn stall_timeout() -> Duration {
    Duration::from_secs(15)
}
pub(super) fn quic_retry() -> Duration {
    Duration::from_secs(300)
}
pub(super) fn broker_tls_listen() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 8883))
}
pub(super) fn yes() -> bool {
    true
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: "edge".to_string(),
            data_dir: PathBuf::from("fogline-data"),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            broker: MQTT_BROKER.to_string(),
            protocol: MqttProtocol::V5,
            qos: 2,
            client_id: None,
            username: None,
            password: None,
            keep_alive: Duration::from_secs(30),
            receive_maximum: 4096,
            max_payload_bytes: 256 * 1024,
            session_expiry: Duration::from_secs(7 * 24 * 3600),
            connect_timeout: Duration::from_secs(10),
            commit_linger: Duration::from_millis(5),
            publish: Vec::new(),
            publish_qos: 1,
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            embedded: false,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 1883)),
            listen_v5: None,
            plaintext: true,
            max_payload_bytes: 256 * 1024,
            max_packet_bytes: None,
            max_topic_bytes: fogline_protocol::MAX_STREAM_NAME_BYTES,
            receive_maximum: 1024,
            max_connections: 1000,
            max_sessions: 10_000,
            max_keep_alive: Duration::from_secs(300),
            max_session_expiry: Duration::from_secs(7 * 24 * 3600),
            connect_timeout: Duration::from_secs(10),
            max_connections_per_ip: 100,
            connect_rate_per_ip: 20,
            connect_burst_per_ip: 100,
            max_connect_bytes: 64 * 1024,
            max_preconnect_bytes: None,
            idle_timeout: Duration::from_secs(600),
            auth_workers: 1,
            auth_queue: 32,
            max_pending_will_bytes: 4 << 20,
            allow_anonymous: None,
            users: Vec::new(),
            local_topics: Vec::new(),
            tls: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_pending_bytes: 16 << 20,
            unrouted: super::UnroutedPolicy::DeadLetter,
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            stall_after: Duration::from_secs(30),
        }
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            path: None,
            sync: SyncMode::Full,
            max_batch: 8192,
            max_batch_bytes: 4 << 20,
            commit_linger: Duration::from_millis(1),
            commit_interval: Duration::ZERO,
            tick_interval: Duration::from_secs(1),
            reserve_mib: 16,
            check_on_start: Duration::from_secs(10),
            max_bytes: Some(bytesize::ByteSize::gib(1)),
            max_age: None,
            when_full: crate::outbox::WhenFull::Block,
            dead_letter_max_bytes: bytesize::ByteSize::mib(64),
            local_max_bytes: bytesize::ByteSize::mib(64),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 9464)),
            enabled: true,
        }
    }
}
