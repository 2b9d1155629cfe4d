//! Ingest: subscribes to the broker (MQTT v5, QoS 1, persistent session,
//! manual acks) and hands every delivery to the pipeline.
//!
//! Invariant: a delivery is acknowledged to the broker only when the pipeline
//! says the outbox commit holding everything derived from it is durable
//! ([`AckSender`]). Acks go back on the connection the delivery came in on;
//! deliveries from an older connection are not acked, because the broker
//! resends them on the new one (same packet id, DUP set) and the pipeline's
//! duplicate check turns the resend into an ack without reprocessing.
//!
//! Ingest knows nothing about functions, SQLite or QUIC.

pub mod embedded_broker;
pub mod topic;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::config::EdgeConfig;

/// One MQTT delivery on its way to the pipeline.
#[derive(Debug)]
pub struct Delivery {
    /// The PUBLISH as received.
    pub publish: Publish,
    /// Which broker connection it arrived on.
    pub connection: u64,
    /// Gateway clock at arrival.
    pub received_ms: u64,
}

/// Acknowledges deliveries once their outputs are durable.
#[derive(Clone)]
pub struct AckSender {
    tx: mpsc::UnboundedSender<Vec<Delivery>>,
}

impl AckSender {
    /// Acknowledge these deliveries to the broker. Call only after the outbox
    /// commit that holds their outputs returned.
    pub fn ack(&self, deliveries: Vec<Delivery>) {
        if !deliveries.is_empty() {
            // Err only when ingest has stopped; the broker then redelivers.
            let _ = self.tx.send(deliveries);
        }
    }
}

/// Live ingest state shared with status and metrics.
#[derive(Debug, Default)]
pub struct IngestState {
    /// Connected to the broker.
    pub connected: AtomicBool,
    /// Current broker connection number.
    pub connection: AtomicU64,
}

/// Errors that stop ingest.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// `[mqtt] broker` is not host:port.
    #[error("mqtt.broker: `{0}` is not host:port")]
    BadBroker(String),
}

fn options(config: &EdgeConfig) -> Result<MqttOptions, IngestError> {
    let broker = config.ingest_broker();
    let (host, port) = broker
        .rsplit_once(':')
        .and_then(|(h, p)| {
            Some((
                h.trim_matches(['[', ']']).to_string(),
                p.parse::<u16>().ok()?,
            ))
        })
        .ok_or_else(|| IngestError::BadBroker(broker.clone()))?;
    let m = &config.mqtt;
    let mut o = MqttOptions::new(config.client_id(), host, port);
    o.set_keep_alive(m.keep_alive.max(Duration::from_secs(5)));
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(m.session_expiry.as_secs().min(u32::MAX as u64) as u32));
    o.set_receive_maximum(Some(m.receive_maximum));
    o.set_manual_acks(true);
    // Larger packets would kill the connection and be redelivered forever;
    // asking the broker (v5 Maximum Packet Size) makes it drop them instead.
    // Between max_payload_bytes and this, ingest dead-letters them.
    let max_packet = (m.max_payload_bytes.saturating_mul(4)).clamp(64 * 1024, 16 << 20);
    o.set_max_packet_size(Some(max_packet as u32));
    // One ack request per in-flight delivery at most, plus subscribes.
    o.set_request_channel_capacity(m.receive_maximum as usize + 1024);
    if let (Some(u), p) = (&m.username, &m.password) {
        o.set_credentials(u.clone(), p.clone().unwrap_or_default());
    }
    Ok(o)
}

/// Run ingest until `shutdown` flips: connect, subscribe, forward deliveries
/// to `deliveries`, send acks that come back through the returned
/// [`AckSender`]. Reconnects forever with backoff.
pub fn start(
    config: &EdgeConfig,
    deliveries: mpsc::Sender<Delivery>,
    state: Arc<IngestState>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(AckSender, tokio::task::JoinHandle<()>), IngestError> {
    let opts = options(config)?;
    let broker = config.ingest_broker();
    let filters = config.topic_filters();
    let (client, mut eventloop) =
        AsyncClient::new(opts, config.mqtt.receive_maximum as usize + 1024);
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Vec<Delivery>>();

    // Acks run in their own task so a full request channel can never block
    // the event loop that drains it.
    let acker_client = client.clone();
    let acker_state = state.clone();
    tokio::spawn(async move {
        while let Some(batch) = ack_rx.recv().await {
            let current = acker_state.connection.load(Ordering::Acquire);
            let mut acked = 0u64;
            for d in batch {
                if d.connection != current {
                    continue; // the broker redelivers it on the current connection
                }
                if acker_client.ack(&d.publish).await.is_err() {
                    return; // event loop gone
                }
                acked += 1;
            }
            metrics::counter!("fogline_ingest_acked_total").increment(acked);
        }
    });

    let handle = tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let event = tokio::select! {
                _ = shutdown.changed() => break,
                ev = eventloop.poll() => ev,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = Duration::from_millis(100);
                    let n = state.connection.fetch_add(1, Ordering::AcqRel) + 1;
                    state.connected.store(true, Ordering::Release);
                    metrics::gauge!("fogline_ingest_connected").set(1.0);
                    info!(broker = %broker, connection = n, session_present = ack.session_present, "Connected to MQTT broker.");
                    if !ack.session_present {
                        for f in &filters {
                            if let Err(e) = client.subscribe(f.clone(), QoS::AtLeastOnce).await {
                                warn!(error = %e, filter = %f, "Subscribe request failed.");
                            }
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    metrics::counter!("fogline_ingest_received_total").increment(1);
                    let d = Delivery {
                        publish,
                        connection: state.connection.load(Ordering::Acquire),
                        received_ms: crate::clock::now_ms(),
                    };
                    // Backpressure: when the pipeline is behind, stop reading.
                    if deliveries.send(d).await.is_err() {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    debug!(reasons = ?s.return_codes, "Subscribed.");
                }
                Ok(Event::Incoming(Packet::Disconnect(d))) => {
                    warn!(reason = ?d.reason_code, "Broker sent DISCONNECT.");
                }
                Ok(_) => {}
                Err(e) => {
                    if state.connected.swap(false, Ordering::AcqRel) {
                        metrics::gauge!("fogline_ingest_connected").set(0.0);
                    }
                    log_connection_error(&broker, &e);
                    tokio::select! {
                        _ = shutdown.changed() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        // Best effort: a clean DISCONNECT keeps the session (clean_start=false).
        let _ = tokio::time::timeout(Duration::from_millis(200), client.disconnect()).await;
    });
    Ok((AckSender { tx: ack_tx }, handle))
}

fn log_connection_error(broker: &str, e: &ConnectionError) {
    metrics::counter!("fogline_ingest_connection_errors_total").increment(1);
    warn!(broker = %broker, error = %e, "MQTT connection failed; retrying.");
}

/// A stable 64-bit digest (FNV-1a) of topic and payload, for duplicate
/// detection across restarts (std's hasher is not stable across releases).
pub fn digest(topic: &[u8], payload: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in topic.iter().chain([0xffu8].iter()).chain(payload) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
