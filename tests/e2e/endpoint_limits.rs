//! The endpoint is bounded before it trusts (ARCHITECTURE.md I-34), against
//! the real `fogline-edge`: slots and bytes taken from accept, per-address
//! limits, `connect_timeout` from accept, the keep-alive-0 idle limit, the
//! MQTT 3.1.1 keep alive held to `max_keep_alive`, wills
//! replaced on reconnect, the password-check queue, and a flood of hostile
//! sockets while healthy sensors publish.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fogline_edge::ingest::endpoint::events::{self as endpoint, Cut};
use fogline_mqtt::{self as codec, ConnectOut};
use fogline_tests::deploy::series;
use fogline_tests::flood::{self, Flood};
use fogline_tests::mqtt_raw::{cpu, Connection, Options, Publisher, QoS, Version};
use fogline_tests::{oracle, process};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::endpoint::{readings, Gateway};
use crate::rt;

fn rss_mib(g: &Gateway) -> f64 {
    let pid = g.edge.daemon.pid().expect("edge running");
    cpu::memory(pid).expect("edge /proc status").rss_bytes as f64 / (1 << 20) as f64
}

/// Whether the endpoint closes `s` within `within` (reads until EOF).
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    let end = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// I-34: a connection holds a slot and its bytes count from accept. 200
/// sockets each send half of a 60 KiB CONNECT: the pre-CONNECT share
/// (`max_preconnect_bytes`, 1 MiB here) holds ~30 of them, the others are
/// closed at once (`budget`), and the edge's RSS stays bounded; a CONNECT
/// announcing 320 KB is refused from its header; a silent socket is cut at
/// `connect_timeout`; a healthy sensor still connects and is acknowledged.
#[test]
fn preconnect_bytes_slots_and_connect_timeout_are_bounded_from_accept() {
    let g = Gateway::start(
        "connect_timeout = \"3s\"\nmax_preconnect_bytes = 1048576\nmax_connections_per_ip = 1000\nconnect_burst_per_ip = 1000\nconnect_rate_per_ip = 1000\n",
        &[],
    );
    let port = g.port;
    let rt = rt();
    rt.block_on(async {
        let before = rss_mib(&g);
        let mut held = Vec::new();
        let mut cut = 0;
        for i in 0..200u32 {
            let from = Ipv4Addr::from(0x7F00_0002 + i / 50);
            let mut s = flood::connect_from(from, port).await.unwrap();
            let mut out = vec![0x10, 0x80, 0xE0, 0x03]; // remaining length 61,440
            out.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30]);
            out.resize(out.len() + 30 * 1024, b'x');
            let _ = s.write_all(&out).await;
            held.push(s);
        }
        for s in &mut held {
            if closed_within(s, Duration::from_millis(50)).await {
                cut += 1;
            }
        }
        let during = rss_mib(&g);
        let budget = g.edge.metric(&refused(Cut::Budget));
        println!("200 half-sent 60 KiB CONNECTs: {cut} cut at once, RSS {before:.1} → {during:.1} MiB, budget refusals {budget}");
        assert!(cut >= 150, "only {cut} of 200 cut: the pre-CONNECT share did not bound them\n{}", g.logs());
        assert!(during - before < 40.0, "RSS grew {before:.1} → {during:.1} MiB");
        assert!(
            g.edge.metric(endpoint::PRECONNECT_BYTES) <= 1_048_576.0,
            "pre-CONNECT bytes over the share"
        );

        // A healthy sensor gets in meanwhile and is acknowledged.
        let (mut c, _) = Connection::connect(&Options::new(g.addr(), "healthy"))
            .await
            .unwrap();
        c.publish("sensors/h", Bytes::from_static(b"{\"id\":\"h-1\"}"), QoS::AtLeastOnce, 1, false)
            .unwrap();
        let ack = c.next_packet_within(Duration::from_secs(10)).await.unwrap();
        assert!(matches!(ack, Some(fogline_tests::mqtt_raw::Incoming::PubAck { pkid: 1, .. })), "{ack:?}");

        // The survivors are cut at connect_timeout (3 s from accept).
        let started = Instant::now();
        for s in &mut held {
            assert!(closed_within(s, Duration::from_secs(6)).await, "a half-sent CONNECT outlived connect_timeout");
        }
        assert!(started.elapsed() < Duration::from_secs(6));

        // Oversized CONNECT: refused from its header, with a CONNACK.
        let mut s = flood::connect_from(Ipv4Addr::LOCALHOST, port).await.unwrap();
        s.write_all(&[0x10, 0x80, 0xC4, 0x13, 0, 4]).await.unwrap();
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..n.min(4)], &[0x20, 0x02, 0x00, 0x03], "CONNACK server unavailable (3.1.1)");

        // A silent socket: cut at connect_timeout, not before.
        let t0 = Instant::now();
        let mut silent = flood::connect_from(Ipv4Addr::LOCALHOST, port).await.unwrap();
        assert!(closed_within(&mut silent, Duration::from_secs(8)).await);
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(2800) && took < Duration::from_secs(5), "cut after {took:?}");
        assert!(g.edge.metric(&refused(Cut::ConnectTimeout)) >= 1.0);
    });
}

/// I-34: at most `max_connections_per_ip` connections per address, counted
/// from accept (before CONNECT); another address is not affected.
#[test]
fn per_address_connection_limit_holds_before_connect() {
    let g = Gateway::start("max_connections_per_ip = 3\n", &[]);
    let port = g.port;
    rt().block_on(async {
        let a = Ipv4Addr::new(127, 0, 0, 7);
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(flood::connect_from(a, port).await.unwrap());
        }
        for s in &mut open {
            assert!(
                !closed_within(s, Duration::from_millis(300)).await,
                "one of the first 3 was closed"
            );
        }
        // Refused at accept with a reset: seen at connect or at the first read.
        match flood::connect_from(a, port).await {
            Ok(mut fourth) => assert!(
                closed_within(&mut fourth, Duration::from_secs(2)).await,
                "the 4th stayed open"
            ),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        let mut other = flood::connect_from(Ipv4Addr::new(127, 0, 0, 8), port)
            .await
            .unwrap();
        assert!(!closed_within(&mut other, Duration::from_millis(300)).await);
        assert!(g.edge.metric(&refused(Cut::PerIp)) >= 1.0);
        // One goes: the address may connect again (rate permitting).
        drop(open.pop());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut again = flood::connect_from(a, port).await.unwrap();
        assert!(!closed_within(&mut again, Duration::from_millis(300)).await);
    });
}

/// I-34: an MQTT 3.1.1 client with keep alive 0 is cut after
/// `broker.idle_timeout` of silence; one that speaks is not.
#[test]
fn keep_alive_zero_is_cut_by_the_idle_limit() {
    let g = Gateway::start("idle_timeout = \"2s\"\n", &[]);
    rt().block_on(async {
        let mut o = Options::new(g.addr(), "forever");
        o.keep_alive_secs = 0;
        let (mut silent, _) = Connection::connect(&o).await.unwrap();
        let mut o2 = Options::new(g.addr(), "chatty");
        o2.keep_alive_secs = 0;
        let (mut chatty, _) = Connection::connect(&o2).await.unwrap();
        let t0 = Instant::now();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(600)).await;
            chatty.pingreq().unwrap();
            let _ = chatty
                .next_packet_within(Duration::from_secs(2))
                .await
                .unwrap();
        }
        let r = silent.next_packet_within(Duration::from_secs(3)).await;
        assert!(
            r.is_err(),
            "the silent keep-alive-0 client was not closed: {r:?}"
        );
        assert!(t0.elapsed() >= Duration::from_millis(1900));
        chatty.pingreq().unwrap();
        assert!(
            chatty
                .next_packet_within(Duration::from_secs(2))
                .await
                .unwrap()
                .is_some(),
            "the chatty one was cut"
        );
        assert!(g.edge.metric(&refused(Cut::Idle)) >= 1.0);
    });
}

/// I-34: an MQTT 3.1.1 client asking for a keep alive above
/// `broker.max_keep_alive` cannot be told (MQTT 5 clients get Server Keep
/// Alive), so it is held to the limit all the same: cut after 1.5 ×
/// `max_keep_alive` (2 s here) of silence, not 1.5 × the hour it asked for;
/// one asking the same that speaks within the limit is not cut.
#[test]
fn mqtt311_keep_alive_above_the_limit_is_held_to_max_keep_alive() {
    let g = Gateway::start("max_keep_alive = \"2s\"\n", &[]);
    rt().block_on(async {
        let mut o = Options::new(g.addr(), "asks-an-hour");
        o.keep_alive_secs = 3600;
        let (mut silent, _) = Connection::connect(&o).await.unwrap();
        let mut o2 = Options::new(g.addr(), "asks-an-hour-and-talks");
        o2.keep_alive_secs = 3600;
        let (mut chatty, _) = Connection::connect(&o2).await.unwrap();
        // 2 s in: silent, but not yet 1.5 × max_keep_alive.
        ping_every_half_second(&mut chatty, 4).await;
        let r = silent.next_packet_within(Duration::from_millis(100)).await;
        assert!(
            matches!(r, Ok(None)),
            "cut before 1.5 × max_keep_alive: {r:?}"
        );
        // 4 s in: past the 3 s limit.
        ping_every_half_second(&mut chatty, 4).await;
        let r = silent.next_packet_within(Duration::from_secs(2)).await;
        assert!(
            r.is_err(),
            "the silent client asking for an hour was not cut: {r:?}"
        );
        assert!(g.edge.metric(&refused(Cut::Idle)) >= 1.0);
    });
    let log = g.edge.daemon.log_text();
    assert!(
        log.contains("1.5 × broker.max_keep_alive (2 s; the client asked for 3600 s)"),
        "the cut names the limit:\n{}",
        crate::tail(&log, 20)
    );
}

/// `n` times: waits 500 ms, sends PINGREQ and expects its answer.
async fn ping_every_half_second(c: &mut Connection, n: usize) {
    for _ in 0..n {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.pingreq().unwrap();
        let pong = c.next_packet_within(Duration::from_secs(2)).await;
        assert!(
            matches!(pong, Ok(Some(_))),
            "the client that talks was cut: {pong:?}"
        );
    }
}

fn will_connect(id: &str, will_id: &str, delay: u32) -> BytesMut {
    let mut c = ConnectOut::new(codec::Version::V5, id);
    c.clean_start = false;
    c.keep_alive = 30;
    c.session_expiry = Some(60);
    c.will = Some(codec::Will {
        topic: Bytes::copy_from_slice(format!("wills/{id}").as_bytes()),
        payload: Bytes::from(format!("{{\"id\":\"{will_id}\"}}")),
        qos: 1,
        delay_secs: delay,
    });
    let mut b = BytesMut::new();
    codec::encode_connect(&mut b, &c).unwrap();
    b
}

/// I-34: one pending will per session — a client that vanishes, comes back
/// within its will delay and vanishes again leaves exactly its second will
/// (the first is replaced, not duplicated), published after the delay; the
/// pending will bytes go back to 0.
#[test]
fn a_pending_will_is_replaced_when_its_client_reconnects() {
    let g = Gateway::start("", &[]);
    let port = g.port;
    rt().block_on(async {
        for will_id in ["will-a", "will-b"] {
            let mut s = flood::connect_from(Ipv4Addr::LOCALHOST, port)
                .await
                .unwrap();
            s.write_all(&will_connect("phoenix", will_id, 3))
                .await
                .unwrap();
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(
                n >= 4 && buf[0] == 0x20 && buf[3] == 0,
                "CONNACK accepted: {:x?}",
                &buf[..n]
            );
            drop(s); // vanish
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        assert!(
            g.edge.metric(endpoint::PENDING_WILL_BYTES) > 0.0,
            "the will is pending"
        );
    });
    let expected: BTreeSet<String> = ["will-b".to_string()].into();
    process::wait_until(Duration::from_secs(20), || {
        oracle::count(&g.cloud.store) >= 1
    });
    std::thread::sleep(Duration::from_secs(2));
    let v = oracle::judge(&oracle::read_store(&g.cloud.store).unwrap(), &expected);
    assert!(v.is_exact(), "{}\n{}", v.summary(), g.logs());
    assert_eq!(g.edge.metric(endpoint::PENDING_WILL_BYTES), 0.0);
}

/// I-34: password checks beyond `auth_workers + auth_queue` are refused at
/// once with CONNACK 0x89 server busy (MQTT 5) / 3 server unavailable
/// (3.1.1), and counted as `auth_busy`.
#[test]
fn a_full_password_queue_refuses_with_server_busy() {
    let h = fogline_edge::ingest::endpoint::auth::hash_password("pw").unwrap();
    let g = Gateway::start(
        &format!("auth_workers = 1\nauth_queue = 1\n[[broker.users]]\nname = \"s\"\npassword_hash = \"{h}\"\n"),
        &[],
    );
    rt().block_on(async {
        let mut tasks = Vec::new();
        for i in 0..24 {
            let mut o = Options::new(g.addr(), format!("c{i}")).with_version(if i % 2 == 0 {
                Version::V5
            } else {
                Version::V311
            });
            o.username = Some("s".into());
            o.password = Some(format!("wrong-{i}"));
            tasks.push(tokio::spawn(async move {
                let e = Connection::connect(&o)
                    .await
                    .err()
                    .expect("a wrong password got in");
                let r = e
                    .downcast_ref::<fogline_tests::mqtt_raw::ConnectRefused>()
                    .cloned()
                    .unwrap_or_else(|| panic!("not a CONNACK refusal: {e:#}"));
                (r.version, r.code)
            }));
        }
        let mut busy = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                (Version::V5, 0x89) => busy.0 += 1,
                (Version::V311, 3) => busy.1 += 1,
                (Version::V5, 0x86) | (Version::V311, 4) => {}
                other => panic!("unexpected refusal {other:?}"),
            }
        }
        println!("busy refusals: {} MQTT 5, {} MQTT 3.1.1", busy.0, busy.1);
        assert!(busy.0 >= 1 && busy.1 >= 1, "{busy:?}");
        assert!(g.edge.metric(&refused(Cut::AuthBusy)) >= 2.0);
    });
}

/// I-34 with I-1/I-12: 1,000 hostile sockets (half-open, slowloris, garbage,
/// oversized and half-sent CONNECTs, from 40 addresses, reconnecting when
/// cut) while 4 healthy sensors publish 2,000 QoS 1 readings each: every
/// reading is acknowledged and stored exactly once, and the edge's RSS
/// stays under 150 MB.
#[test]
fn healthy_sensors_get_everything_through_a_flood_of_hostile_sockets() {
    let g = Gateway::start("connect_timeout = \"2s\"\nmax_connections = 1100\n", &[]);
    let rt = rt();
    let (msgs, ids) = readings(8_000);
    let report = rt.block_on(async {
        let flood = Flood::start(g.port, 1_000, 25);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut tasks = Vec::new();
        for k in 0..4 {
            // Two sensors (streams) per publisher: each stream's order is one sender's.
            let part: Vec<_> = msgs
                .iter()
                .enumerate()
                .filter(|(i, _)| (i % 8) / 2 == k)
                .map(|(_, m)| m.clone())
                .collect();
            let mut p = Publisher::new(Options::new(g.addr(), format!("healthy-{k}")), QoS::AtLeastOnce);
            p.deadline = Duration::from_secs(40);
            tasks.push(tokio::spawn(async move { p.run(&part).await }));
        }
        let mut peak = 0f64;
        let mut reports = Vec::new();
        for t in tasks {
            while !t.is_finished() {
                peak = peak.max(rss_mib(&g));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            reports.push(t.await.unwrap().unwrap());
        }
        let opened = flood.opened.load(std::sync::atomic::Ordering::Relaxed);
        let closed = flood.closed.load(std::sync::atomic::Ordering::Relaxed);
        drop(flood);
        println!("flood: {opened} hostile connections opened, {closed} cut by the edge; edge peak RSS {peak:.1} MiB");
        assert!(peak < 150.0, "edge RSS peaked at {peak:.1} MiB");
        reports
    });
    for r in &report {
        r.ensure_all_safe().unwrap();
    }
    let expected: BTreeSet<String> = ids.into_iter().collect();
    process::wait_until(Duration::from_secs(30), || {
        oracle::count(&g.cloud.store) >= expected.len() as u64
    });
    let v = oracle::judge(&oracle::read_store(&g.cloud.store).unwrap(), &expected);
    assert!(v.is_exact(), "{}\n{}", v.summary(), g.logs());
}

/// The series of the connections the endpoint cut for `cut`.
fn refused(cut: Cut) -> String {
    series(endpoint::CONNECTIONS_REFUSED, &[("reason", cut.label())])
}
