//! Support for Fogline's end-to-end and fault tests: a private Mosquitto,
//! the real binaries as child processes (`deploy`), a raw-socket MQTT client
//! (`mqtt_raw`), sensors that publish readings with unique ids, and an
//! oracle that reads the aggregator's store.
#![allow(missing_docs)]

pub mod backlog;
pub mod deploy;
pub mod flood;
pub mod mosquitto;
pub mod mqtt_raw;
pub mod oracle;
pub mod process;
pub mod sensors;

pub mod ports;

/// A free TCP port on 127.0.0.1, kept for this test ([`ports`]).
pub fn free_tcp_port() -> std::io::Result<u16> {
    ports::claim()
}

/// A port number free on 127.0.0.1 for both UDP and TCP (the aggregator
/// serves QUIC and TLS-over-TCP on the same number), kept for this test.
pub fn free_udp_tcp_port() -> std::io::Result<u16> {
    ports::claim()
}

/// A free UDP port on 127.0.0.1, kept for this test.
pub fn free_udp_port() -> std::io::Result<u16> {
    ports::claim()
}

/// A bench's `--name N` argument, or `default`.
pub fn bench_arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
