//! A UDP relay between nodes and an aggregator that can be cut and restored,
//! to simulate an uplink outage (demo, fault tests, benches) and count the
//! bytes that cross the "wire".
//!
//! While cut, datagrams in both directions are dropped, as on a dead link:
//! QUIC sees loss, not a closed socket. With [`UdpRelay::start_with_tcp`]
//! it also relays TCP on the same port number; [`UdpRelay::block_udp`]
//! then drops UDP only, as a network that blocks it does, while TCP flows.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

#[derive(Default)]
struct Shared {
    cut: AtomicBool,
    /// Bumped to make every client appear from a new address.
    address_epoch: AtomicU64,
    udp_blocked: AtomicBool,
    tcp_to_server: AtomicU64,
    to_server: AtomicU64,
    to_client: AtomicU64,
}

/// A running relay; stops when dropped.
pub struct UdpRelay {
    local: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    tcp: Option<JoinHandle<()>>,
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
            tcp: None,
        })
    }

    /// Like [`Self::start`], and relays TCP on the same port number to
    /// `tcp_upstream`.
    pub async fn start_with_tcp(
        upstream: SocketAddr,
        tcp_upstream: SocketAddr,
    ) -> std::io::Result<Self> {
        // Find a port number free for both UDP and TCP.
        for _ in 0..50 {
            let mut relay = Self::start(upstream).await?;
            let Ok(listener) = tokio::net::TcpListener::bind(relay.local).await else {
                continue;
            };
            relay.tcp = Some(tokio::spawn(tcp_accept(
                listener,
                tcp_upstream,
                relay.shared.clone(),
            )));
            return Ok(relay);
        }
        Err(std::io::Error::other(
            "no port number free for both UDP and TCP",
        ))
    }

    /// From now on, every client's datagrams reach the aggregator from a
    /// new source port, as after a cellular re-attach or a NAT rebinding:
    /// QUIC must migrate the connection.
    pub fn change_client_addresses(&self) {
        self.shared.address_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Drops UDP (both ways) while `blocked`; TCP still flows.
    pub fn block_udp(&self, blocked: bool) {
        self.shared.udp_blocked.store(blocked, Ordering::Release);
    }

    /// TCP bytes forwarded towards the aggregator.
    pub fn tcp_bytes_to_server(&self) -> u64 {
        self.shared.tcp_to_server.load(Ordering::Relaxed)
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
        if let Some(t) = &self.tcp {
            t.abort();
        }
    }
}

impl Shared {
    fn drops_udp(&self) -> bool {
        self.cut.load(Ordering::Acquire) || self.udp_blocked.load(Ordering::Acquire)
    }
}

async fn tcp_accept(listener: tokio::net::TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut conns = tokio::task::JoinSet::new();
    while let Ok((client, _)) = listener.accept().await {
        let shared = shared.clone();
        conns.spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                return;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let up = pump(cr, sw, shared.clone(), true);
            let down = pump(sr, cw, shared, false);
            tokio::join!(up, down);
        });
    }
}

/// Copies bytes one way; while the relay is cut, holds them (a dead link
/// delivers nothing, and TCP retransmits once it is back).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    to_server: bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while shared.cut.load(Ordering::Acquire) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if to_server {
            shared.tcp_to_server.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    let _ = to.shutdown().await;
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
    let mut epoch = 0;
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else {
            continue;
        };
        if shared.drops_udp() {
            continue;
        }
        let now = shared.address_epoch.load(Ordering::Acquire);
        if now != epoch {
            // New upstream sockets (new source ports) for everyone.
            epoch = now;
            peers.clear();
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
        if shared.drops_udp() {
            continue;
        }
        if front.send_to(&buf[..n], client).await.is_ok() {
            shared.to_client.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}
