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

/// A TCP port free on 127.0.0.1 now (bound, then released), for a process
/// a test starts that must be told its port.
pub fn free_tcp_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
