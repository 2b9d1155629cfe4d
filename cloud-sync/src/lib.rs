//! Fogline cloud side: the replication protocol, its QUIC transport for both
//! ends, fleet certificates, and the aggregator service with its store and
//! HTTP API.
#![warn(missing_docs)]

pub mod aggregator;
pub mod certs;
pub mod clock;
pub mod protocol;
pub mod store;
pub mod telemetry;
pub mod transport;
