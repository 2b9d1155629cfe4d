//! Port numbers for daemons a test starts later or restarts.
//!
//! A port the OS hands out (bind to 0, then release) can be handed out
//! again — as another test's listener or any client socket's ephemeral
//! port — before the daemon binds it, and a daemon that restarts must find
//! its port still free. Under a parallel suite that happened: an aggregator
//! started seconds after its port was picked found it taken. So ports come
//! from below the kernel's ephemeral range (never given to client sockets),
//! and each is claimed across test processes by a file in
//! `$TMPDIR/fogline-test-ports/` (claims older than [`CLAIM_LIFETIME`] are
//! taken back: no test runs that long).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// Ports handed out: below Linux's default ephemeral range (32768–60999).
const RANGE: std::ops::Range<u16> = 20_000..32_000;

/// After this, a claim is stale.
const CLAIM_LIFETIME: Duration = Duration::from_secs(20 * 60);

fn claims_dir() -> PathBuf {
    std::env::temp_dir().join("fogline-test-ports")
}

/// Whether `port` can be bound on 127.0.0.1 for TCP and for UDP now.
fn bindable(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

/// Claims `port` for this process unless another claimed it recently.
fn claim_file(port: u16) -> bool {
    let path = claims_dir().join(port.to_string());
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .is_ok()
    };
    if create() {
        return true;
    }
    let stale = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > CLAIM_LIFETIME);
    stale && std::fs::remove_file(&path).is_ok() && create()
}

/// A port free for TCP and UDP on 127.0.0.1, claimed for this test.
pub fn claim() -> std::io::Result<u16> {
    std::fs::create_dir_all(claims_dir())?;
    let span = u32::from(RANGE.end - RANGE.start);
    let start = rand::random::<u32>() % span;
    for i in 0..span {
        let port = RANGE.start + ((start + i * 7919) % span) as u16;
        if bindable(port) && claim_file(port) {
            return Ok(port);
        }
    }
    Err(std::io::Error::other(format!(
        "no port in {}..{} is free and unclaimed ({})",
        RANGE.start,
        RANGE.end,
        claims_dir().display()
    )))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn claimed_ports_are_distinct_and_bindable() {
        let ports: Vec<u16> = (0..50).map(|_| super::claim().unwrap()).collect();
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len());
        for p in ports {
            assert!(super::RANGE.contains(&p));
            std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
    }
}
