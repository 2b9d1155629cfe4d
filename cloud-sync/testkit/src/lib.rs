//! `fogline-testkit`: what tests, benches and the demo need and production
//! code must not carry — link relays that cut, drop and delay traffic,
//! sample telemetry, and throwaway certificates.
#![warn(missing_docs)]

pub mod certs;
pub mod fleet;
pub mod node;
pub mod postgres;
pub mod relay;
pub mod samples;
