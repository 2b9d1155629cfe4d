//! A UDP relay between nodes and an aggregator that can be cut and restored,
//! to simulate an uplink outage (demo, fault tests, benches) and count the
//! bytes that cross the "wire".
//!
//! While cut, datagrams in both directions are dropped, as on a dead link:
//! QUIC sees loss, not a closed socket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

#[derive(Default)]
struct Shared {
    cut: AtomicBool,
    to_server: AtomicU64,
    to_client: AtomicU64,
}

/// A running relay; stops when dropped.
pub struct UdpRelay {
    local: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl UdpRelay {
    /// Listens on `127.0.0.1:0` and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let local = front.local_addr()?;
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(forward(front, upstream, shared.clone()));
        Ok(Self {
            local,
            shared,
            task,
        })
    }

    /// Where nodes should connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Drops every datagram from now on.
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::Release);
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::Release);
    }

    /// Is the link cut?
    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::Acquire)
    }

    /// UDP payload bytes forwarded towards the aggregator.
    pub fn bytes_to_server(&self) -> u64 {
        self.shared.to_server.load(Ordering::Relaxed)
    }

    /// UDP payload bytes forwarded towards nodes.
    pub fn bytes_to_client(&self) -> u64 {
        self.shared.to_client.load(Ordering::Relaxed)
    }

    /// UDP payload bytes forwarded in both directions.
    pub fn bytes_forwarded(&self) -> u64 {
        self.bytes_to_server() + self.bytes_to_client()
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Stops a per-client task when the relay task (holding the map) stops.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn forward(front: Arc<UdpSocket>, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut peers: HashMap<SocketAddr, (Arc<UdpSocket>, AbortOnDrop)> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            continue;
        };
        if shared.cut.load(Ordering::Acquire) {
            continue;
        }
        let sock = match peers.entry(client) {
            std::collections::hash_map::Entry::Occupied(e) => e.get().0.clone(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let Ok(sock) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if sock.connect(upstream).await.is_err() {
                    continue;
                }
                let sock = Arc::new(sock);
                let back = tokio::spawn(backward(
                    sock.clone(),
                    front.clone(),
                    client,
                    shared.clone(),
                ));
                slot.insert((sock.clone(), AbortOnDrop(back)));
                sock
            }
        };
        if sock.send(&buf[..n]).await.is_ok() {
            shared.to_server.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

async fn backward(
    sock: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok(n) = sock.recv(&mut buf).await else {
            continue;
        };
        if shared.cut.load(Ordering::Acquire) {
            continue;
        }
        if front.send_to(&buf[..n], client).await.is_ok() {
            shared.to_client.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}
