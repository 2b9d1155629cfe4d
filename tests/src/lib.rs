//! Support for Fogline's end-to-end and fault tests: a private Mosquitto,
//! the real binaries as child processes (`deploy`), a raw-socket MQTT client
//! (`mqtt_raw`), sensors that publish readings with unique ids, and an
//! oracle that reads the aggregator's store.
#![allow(missing_docs)]

pub mod deploy;
pub mod mosquitto;
pub mod mqtt_raw;
pub mod oracle;
pub mod process;
pub mod sensors;

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_tcp_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A port number free on 127.0.0.1 for both UDP and TCP (the aggregator
/// serves QUIC and TLS-over-TCP on the same number).
pub fn free_udp_tcp_port() -> std::io::Result<u16> {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other(
        "no port number free for both UDP and TCP",
    ))
}

/// A free UDP port on 127.0.0.1 (bound then released).
pub fn free_udp_port() -> std::io::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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
