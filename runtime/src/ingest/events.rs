//! Telemetry of ingest's two ways in as named events: what both count per
//! sender (the intake, labelled by `source`) and the external broker
//! client's connection. The endpoint's own are in `endpoint/events.rs`.

use std::time::Duration;

use fogline_telemetry::help::{Help, Kind::*};

use super::broker_client::BrokerError;
use super::codec;

/// Messages received, by `source` (`endpoint` or `broker`).
pub const RECEIVED_TOTAL: &str = "fogline_ingest_received_total";
/// PUBACKs and PUBRECs sent after their commit, by `source`.
pub const ACKS_SENT_TOTAL: &str = "fogline_ingest_acks_sent_total";
/// Resends recognised and not stored again, by `source`.
pub const RESENDS_TOTAL: &str = "fogline_ingest_resends_total";
/// Messages that may repeat one already stored, by `source`.
pub const POSSIBLE_DUPLICATES_TOTAL: &str = "fogline_ingest_possible_duplicates_total";
/// QoS 1 redelivery marks dropped to stay within bounds, by `source`.
pub const MARKS_EVICTED_TOTAL: &str = "fogline_ingest_marks_evicted_total";
/// 1 while connected to the external broker.
pub const BROKER_CONNECTED: &str = "fogline_ingest_broker_connected";
/// Connections to the external broker that ended in an error.
pub const CONNECTION_ERRORS_TOTAL: &str = "fogline_ingest_connection_errors_total";
/// Subscriptions the external broker refused.
pub const SUBSCRIPTIONS_REFUSED_TOTAL: &str = "fogline_ingest_subscriptions_refused_total";

/// HELP texts: name, kind, text.
pub const HELP: &[Help] = &[
    (
        RECEIVED_TOTAL,
        Counter,
        "Messages received, by source (endpoint or broker).",
    ),
    (
        ACKS_SENT_TOTAL,
        Counter,
        "PUBACKs and PUBRECs sent after their commit.",
    ),
    (
        RESENDS_TOTAL,
        Counter,
        "Resends recognised and not stored again.",
    ),
    (
        POSSIBLE_DUPLICATES_TOTAL,
        Counter,
        "Messages that may repeat one already stored (QoS 1 after lost state).",
    ),
    (
        MARKS_EVICTED_TOTAL,
        Counter,
        "QoS 1 redelivery marks dropped to stay within bounds.",
    ),
    (
        CONNECTION_ERRORS_TOTAL,
        Counter,
        "MQTT connections that ended in an error.",
    ),
    (
        SUBSCRIPTIONS_REFUSED_TOTAL,
        Counter,
        "Subscriptions the external broker refused.",
    ),
    (
        BROKER_CONNECTED,
        Gauge,
        "1 while connected to the external MQTT broker.",
    ),
];

/// HELP texts, registered once per process.
pub fn describe() {
    fogline_telemetry::help::describe(HELP);
}

/// The external broker accepted our CONNECT.
pub struct BrokerConnected<'a> {
    /// Its address.
    pub broker: &'a str,
    /// Connections made since start, this one included.
    pub connection: u64,
    /// Whether it kept our session.
    pub session_present: bool,
    /// MQTT version spoken.
    pub version: &'static str,
}

impl BrokerConnected<'_> {
    /// Log and count it.
    pub fn emit(&self) {
        metrics::gauge!(BROKER_CONNECTED).set(1.0);
        tracing::info!(broker = %self.broker, connection = self.connection, session_present = self.session_present, version = self.version, "Connected to the MQTT broker.");
    }
}

/// A connection to the external broker ended in an error; the client
/// reconnects after `retry_in`.
pub struct BrokerConnectionFailed<'a> {
    /// Why it ended.
    pub error: &'a BrokerError,
    /// The wait before the next attempt (before jitter).
    pub retry_in: Duration,
}

impl BrokerConnectionFailed<'_> {
    /// Log and count it.
    pub fn emit(&self) {
        metrics::counter!(CONNECTION_ERRORS_TOTAL).increment(1);
        tracing::warn!(error = %self.error, retry_in = ?self.retry_in, "MQTT broker connection ended; reconnecting.");
    }
}

/// The external broker refused one filter of our SUBSCRIBE.
pub struct SubscriptionRefused<'a> {
    /// Its address.
    pub broker: &'a str,
    /// The filter refused.
    pub filter: &'a str,
    /// The SUBACK reason code.
    pub code: u8,
}

impl SubscriptionRefused<'_> {
    /// Log and count it.
    pub fn emit(&self) {
        metrics::counter!(SUBSCRIPTIONS_REFUSED_TOTAL).increment(1);
        tracing::error!(broker = %self.broker, filter = %self.filter, code = format!("{:#04x}", self.code), reason = codec::reason_name(self.code), "The broker refused a subscription: nothing on this filter will arrive.");
    }
}
