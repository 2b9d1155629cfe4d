//! quinn configuration shared by both ends.

use std::sync::Arc;
use std::time::Duration;

use super::{TransportError, IDLE_TIMEOUT};

/// Flow-control window per stream: room for several 1 MiB batches in flight.
const STREAM_WINDOW: u32 = 32 * 1024 * 1024;

/// Transport parameters: large stream windows so a window of in-flight
/// batches is not throttled by flow control; no QUIC keep-alives (the
/// sessions ping, on QUIC and TCP alike); one bidirectional stream.
/// `initial_rtt` sets how fast an unanswered Initial is retransmitted
/// (three times it): a client sets it short so that an aggregator coming
/// back is noticed quickly.
pub(crate) fn transport_config(initial_rtt: Option<Duration>) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(quinn::VarInt::from_u32(2 * STREAM_WINDOW));
    t.send_window(2 * u64::from(STREAM_WINDOW));
    t.keep_alive_interval(None);
    // IDLE_TIMEOUT is well inside the VarInt range.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1));
    if let Some(rtt) = initial_rtt {
        t.initial_rtt(rtt);
    }
    Arc::new(t)
}

/// The server's endpoint configuration: stateless-reset key and
/// connection-id generator both keyed from `secret` (derived from the
/// server's private key). quinn's defaults draw both at random per process:
/// a restarted aggregator then fails to validate the connection ids of its
/// previous life and drops their packets without a reset, and even when it
/// does send one, its token cannot match. Keyed from the persistent secret,
/// the restarted process answers an old connection's first packet with a
/// reset the node accepts, and the node reconnects at once.
pub(crate) fn server_endpoint_config(secret: [u8; 32]) -> quinn::EndpointConfig {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    let cid_key = u64::from_le_bytes([
        secret[0], secret[1], secret[2], secret[3], secret[4], secret[5], secret[6], secret[7],
    ]);
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            as Box<dyn quinn::ConnectionIdGenerator>
    });
    config
}

/// quinn's server configuration from rustls's.
pub(crate) fn server_config(
    tls: Arc<rustls::ServerConfig>,
) -> Result<quinn::ServerConfig, TransportError> {
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config(None));
    // Gateways change address (cellular re-attach): keep the connection.
    config.migration(true);
    Ok(config)
}

/// quinn's client configuration from rustls's.
pub(crate) fn client_config(
    tls: Arc<rustls::ClientConfig>,
    initial_rtt: Duration,
) -> Result<quinn::ClientConfig, TransportError> {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config(Some(initial_rtt)));
    Ok(config)
}
