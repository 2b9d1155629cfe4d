//! Hostile MQTT sockets, for the endpoint's limits (ARCHITECTURE.md I-34):
//! half-open, slowloris, garbage, oversized and half-sent CONNECTs, opened
//! from many loopback addresses (all of 127.0.0.0/8 is loopback on Linux, so
//! per-address limits see many hosts). Each socket misbehaves until the
//! endpoint closes it, then is opened again, until the flood is stopped.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use fogline_mqtt::{self as codec, ConnectOut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How a hostile socket misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Connects and sends nothing.
    HalfOpen,
    /// Sends a valid CONNECT one byte every 500 ms.
    Slowloris,
    /// Sends bytes that are not MQTT.
    Garbage,
    /// Announces a 320 KB CONNECT and sends its start.
    Oversized,
    /// Announces a CONNECT just under the pre-CONNECT allowance and sends
    /// half of it.
    HalfSent,
}

impl Kind {
    /// Every kind, for round-robin floods.
    pub const ALL: [Kind; 5] = [
        Kind::HalfOpen,
        Kind::Slowloris,
        Kind::Garbage,
        Kind::Oversized,
        Kind::HalfSent,
    ];
}

/// Connects to `port` on 127.0.0.1 from `from`.
pub async fn connect_from(from: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((from, 0)))?;
    s.connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
}

/// A fixed header announcing a CONNECT of `remaining` bytes.
fn connect_header(remaining: usize) -> Vec<u8> {
    let mut out = vec![0x10];
    let mut n = remaining;
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return out;
        }
    }
}

/// Misbehaves on `s` until the endpoint closes it. Returns true if it did.
pub async fn misbehave(kind: Kind, mut s: TcpStream) -> bool {
    let mut out = Vec::new();
    match kind {
        Kind::HalfOpen => {}
        Kind::Slowloris => {
            let mut b = BytesMut::new();
            let _ = codec::encode_connect(&mut b, &ConnectOut::new(codec::Version::V311, "slow"));
            out = b.to_vec();
        }
        Kind::Garbage => out = b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n".to_vec(),
        Kind::Oversized => {
            out = connect_header(320_000);
            out.extend_from_slice(&[0u8; 1000]);
        }
        Kind::HalfSent => {
            let len = 60 * 1024;
            out = connect_header(len);
            out.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30]);
            out.resize(out.len() + len / 2, b'x');
        }
    }
    let slow = kind == Kind::Slowloris;
    let mut sent = 0;
    let mut buf = [0u8; 256];
    loop {
        if sent < out.len() {
            let n = if slow { 1 } else { out.len() - sent };
            if s.write_all(&out[sent..sent + n]).await.is_err() {
                return true;
            }
            sent += n;
        }
        let wait = if slow && sent < out.len() {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(3600)
        };
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {} // a refusing CONNACK: the close follows
            Err(_) => {}
        }
    }
}

/// A running flood; stopped when dropped.
pub struct Flood {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Connections opened so far.
    pub opened: Arc<AtomicUsize>,
    /// Connections the endpoint closed so far.
    pub closed: Arc<AtomicUsize>,
}

impl Flood {
    /// `sockets` hostile sockets against `port`, from 127.0.0.2 onwards,
    /// `per_addr` per address, kinds round-robin. Spawned on the current
    /// tokio runtime.
    pub fn start(port: u16, sockets: usize, per_addr: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let tasks = (0..sockets)
            .map(|i| {
                let (stop, opened, closed) = (stop.clone(), opened.clone(), closed.clone());
                let n = 2 + (i / per_addr.max(1)) as u32;
                let from = Ipv4Addr::from(0x7F00_0000 + n);
                let kind = Kind::ALL[i % Kind::ALL.len()];
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(s) = connect_from(from, port).await {
                            opened.fetch_add(1, Ordering::Relaxed);
                            if misbehave(kind, s).await {
                                closed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // Come back, as a botnet does.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            tasks,
            opened,
            closed,
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}
