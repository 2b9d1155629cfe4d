//! Local actions: functions' outputs served to subscribers of the gateway's
//! own MQTT endpoint, on the gateway, without a round trip to the cloud
//! (an actuator, an HMI, a local app).
//!
//! A pipeline with `local = "immediate"` hands each output to the
//! [`LocalBus`] as soon as its functions return, before the batch is
//! committed: the lowest latency, at most once (a crash before the commit
//! may have delivered an output the outbox never keeps; a subscriber that
//! does not keep up loses what overflows its queue, counted). Who may
//! subscribe to what is `[[broker.local_topics]]` ([`Grants`]).
//!
//! A pipeline with `local = "durable"` keeps each output with the commit
//! and delivers it after, at QoS 1 or 2, until acknowledged, across
//! reconnects and restarts ([`durable`], I-40).

mod bus;
pub mod durable;
mod grants;

pub use bus::{Delivery, LocalBus, Subscription, SUBSCRIBER_QUEUE};
pub use durable::{DurableFeed, DurableHub, SubscriberStatus};
pub use grants::Grants;

/// Metric names and their HELP.
pub mod events {
    use fogline_telemetry::help::{Help, Kind::*};

    /// Outputs handed to local subscribers (one per subscriber reached).
    pub const DELIVERED_TOTAL: &str = "fogline_local_delivered_total";
    /// Outputs a local subscriber lost (`reason`: `queue_full`, `too_large`,
    /// `retention`, `refused`, `not_live`).
    pub const DROPPED_TOTAL: &str = "fogline_local_dropped_total";
    /// Local subscribers connected.
    pub const SUBSCRIBERS: &str = "fogline_local_subscribers";

    /// HELP texts, registered at start (`metrics_help.rs`).
    pub const HELP: &[Help] = &[
        (
            DELIVERED_TOTAL,
            Counter,
            "Outputs of pipelines with `local` handed to a local subscriber of the endpoint (one per subscriber reached).",
        ),
        (
            DROPPED_TOTAL,
            Counter,
            "Outputs a local subscriber lost: its queue was full (reason=queue_full, immediate mode), the output exceeds its MQTT 5 Maximum Packet Size (reason=too_large), durable outputs beyond outbox.local_max_bytes were dropped unacknowledged (reason=retention), the subscriber refused one with a PUBREC error (reason=refused), or a `cloud = false` pipeline produced it from held inputs or replays, which local delivery does not serve (reason=not_live).",
        ),
        (
            SUBSCRIBERS,
            Gauge,
            "Connections of the endpoint with local subscriptions.",
        ),
    ];
}
