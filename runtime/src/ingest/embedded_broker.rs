//! The embedded MQTT broker (rumqttd): sensors publish straight to the
//! gateway, nothing else to install. It keeps no state on disk; what it has
//! handed to ingest is safe once acknowledged, what it had not yet handed over
//! is lost if the daemon dies, as with any non-persistent broker.

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tracing::{error, info};

use crate::config::BrokerConfig;

/// Start the broker on its own threads. It runs until the process exits.
pub fn start(config: &BrokerConfig) -> std::io::Result<SocketAddr> {
    // Fail early and clearly if a port is taken: rumqttd would only log it.
    for (key, addr) in [("listen", config.listen), ("listen_v5", config.listen_v5)] {
        drop(std::net::TcpListener::bind(addr).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("broker.{key}: cannot listen on {addr}: {e}"),
            )
        })?);
    }
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: config.max_payload_bytes,
        max_inflight_count: 65_535,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, listen| ServerSettings {
        name: name.to_string(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    let broker_config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 4096,
            max_segment_size: 64 << 20,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([(
            "v4".to_string(),
            server("v4", config.listen),
        )])),
        v5: Some(HashMap::from([(
            "v5".to_string(),
            server("v5", config.listen_v5),
        )])),
        ..Config::default()
    };
    let listen = config.listen;
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(broker_config);
            if let Err(e) = broker.start() {
                error!(error = %e, listen = %listen, "Embedded MQTT broker stopped.");
            }
        })?;
    info!(listen = %listen, listen_v5 = %config.listen_v5, "Embedded MQTT broker started.");
    Ok(listen)
}
