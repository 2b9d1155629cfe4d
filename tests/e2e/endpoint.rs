//! The native MQTT endpoint, with real processes and a raw-socket client:
//! power cuts (kill -9 and aborts at named fault points) against what the
//! publisher was told is safe, QoS 2, identical payloads, refusals with
//! MQTT 5 reason codes, authentication and TLS, sessions and wills.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fogline_edge::ingest::events as ingest;
use fogline_mqtt::{self as codec, ConnectOut, Inbound};
use fogline_tests::deploy::{uplink_toml, Cloud, Edge};
use fogline_tests::mqtt_raw::{
    Connection, IdAlloc, Incoming, Options, Outcome, PublishReport, Publisher, QoS, Version,
};
use fogline_tests::{oracle, process, sensors};

use crate::{rt, tail};

/// An aggregator and one edge whose native endpoint feeds a pass-through
/// pipeline for `sensors/#` and `counter/#`.
pub(crate) struct Gateway {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) cloud: Cloud,
    pub(crate) edge: Edge,
    pub(crate) port: u16,
}

const NODE: &str = "gw-mqtt";

impl Gateway {
    pub(crate) fn start(broker_extra: &str, env: &[(&str, &str)]) -> Self {
        Self::start_with(broker_extra, "", env)
    }

    /// [`Gateway::start`] with more `[outbox]` keys (verbatim).
    pub(crate) fn start_with(broker_extra: &str, outbox_extra: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        fogline_testkit::certs::dev_bundle(&certs, &[NODE, "sensor-a", "sensor-b"]).unwrap();
        let cloud = Cloud::start(dir.path(), &certs).unwrap();
        let port = fogline_tests::free_tcp_port().unwrap();
        let body = format!(
            "[broker]\nembedded = true\nlisten = \"127.0.0.1:{port}\"\n{broker_extra}\n\
             [[pipelines]]\nname = \"all\"\ntopics = [\"sensors/#\", \"counter/#\", \"wills/#\"]\nfunctions = []\n\
             [outbox]\ntick_interval = \"200ms\"\n{outbox_extra}\n{}",
            uplink_toml(NODE, &certs, cloud.quic_port)
        );
        let edge = Edge::start_with_env(dir.path(), NODE, &body, env).unwrap();
        let g = Self {
            dir,
            cloud,
            edge,
            port,
        };
        if !broker_extra.contains("plaintext = false") {
            g.wait_listening();
        }
        g
    }

    fn certs(&self) -> std::path::PathBuf {
        self.dir.path().join("certs")
    }

    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn wait_listening(&self) {
        let ok = process::wait_until(Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
        assert!(
            ok,
            "endpoint never listened:\n{}",
            self.edge.daemon.log_text()
        );
    }

    pub(crate) fn logs(&self) -> String {
        format!(
            "--- edge ---\n{}\n--- cloud ---\n{}",
            tail(&self.edge.daemon.log_text(), 60),
            tail(&self.cloud.daemon.log_text(), 20)
        )
    }
}

/// `count` readings with unique ids, ~100-byte JSON, on 8 sensor topics.
pub(crate) fn readings(count: usize) -> (Vec<(String, Bytes)>, Vec<String>) {
    let mut msgs = Vec::with_capacity(count);
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let (s, n) = (i % 8, i / 8);
        msgs.push((
            sensors::topic(s),
            Bytes::from(sensors::payload(s, n, 1_764_000_000_000 + i as u64)),
        ));
        ids.push(sensors::reading_id(s, n));
    }
    (msgs, ids)
}

/// Starts the publisher on its own thread; returns its progress counter and handle.
fn publish_in_background(
    publisher: Publisher,
    msgs: Vec<(String, Bytes)>,
) -> (
    Arc<std::sync::atomic::AtomicUsize>,
    std::thread::JoinHandle<PublishReport>,
) {
    let progress = publisher.progress.clone();
    let handle = std::thread::spawn(move || rt().block_on(publisher.run(&msgs)).unwrap());
    (progress, handle)
}

/// Waits for the edge to die on its own (a fault point aborted it).
fn wait_aborted(g: &mut Gateway, what: &str) {
    let status = g.edge.daemon.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| !s.success()),
        "the edge did not abort at {what}:\n{}",
        g.logs()
    );
}

/// Power cuts at every dangerous point while a pipelining publisher sends
/// 20,000 readings: an abort right after a durable commit and before its
/// acknowledgements (fault point `pipeline::after_commit_before_ack`), an
/// abort in the middle of a commit (`outbox::commit::before`), kill -9
/// during publishing, and kill -9 right after the last PUBACK. After each,
/// the edge restarts and the publisher resends what it was not told is safe.
/// Every reading that got a PUBACK/PUBREC is stored exactly once, nothing
/// else is stored, order per stream is kept.
/// Clauses I-1 (durable before acknowledged), I-2 (acks stay on their
/// connection), I-3 (QoS 2 exact), I-4 (sessions survive restarts), I-5
/// (resends recognised).
fn power_cuts(version: Version, qos: QoS) {
    power_cuts_with(version, qos, "");
}

/// [`power_cuts`] with more `[outbox]` keys.
fn power_cuts_with(version: Version, qos: QoS, outbox_extra: &str) {
    let mut g = Gateway::start_with("", outbox_extra, &[]);
    const N: usize = 40_000;
    let (msgs, ids) = readings(N);
    let mut publisher = Publisher::new(
        Options::new(
            g.addr(),
            if version == Version::V5 {
                "power-cut-5"
            } else {
                "power-cut-311"
            },
        )
        .with_version(version),
        qos,
    );
    publisher.options.clean_start = false;
    publisher.options.session_expiry_secs = Some(3600);
    publisher.window = 1000;
    publisher.deadline = Duration::from_secs(180);
    let (progress, handle) = publish_in_background(publisher, msgs);

    // kill -9 during publishing; then aborts at the two fault points, each a
    // few commits into the restarted daemon's life, while publishing goes on.
    assert!(
        process::wait_until(Duration::from_secs(60), || progress.load(Ordering::Acquire)
            >= N / 10),
        "publisher stalled before 10%:\n{}",
        g.logs()
    );
    g.edge.daemon.kill9();
    g.edge
        .daemon
        .restart_with_env(&[(
            "FAILPOINTS",
            "pipeline::after_commit_before_ack=2*off->return",
        )])
        .unwrap();
    wait_aborted(&mut g, "pipeline::after_commit_before_ack");
    g.edge
        .daemon
        .restart_with_env(&[("FAILPOINTS", "outbox::commit::before=2*off->return")])
        .unwrap();
    wait_aborted(&mut g, "outbox::commit::before");
    g.edge.daemon.restart_with_env(&[]).unwrap();
    let report = handle.join().unwrap();
    assert_eq!(report.outcome, Outcome::Complete, "{}", g.logs());
    report.ensure_all_safe().unwrap();
    assert!(
        report.reconnects >= 2,
        "the publisher saw the cuts: {} reconnects, {} failed connects, {} resent\n{}",
        report.reconnects,
        report.failed_connects,
        report.resent_publishes,
        g.logs()
    );
    // Right after the last PUBACK: nothing may be lost or applied twice.
    g.edge.daemon.kill9();
    g.edge.daemon.restart().unwrap();

    let expected: BTreeSet<String> = ids.iter().cloned().collect();
    let mut verdict = None;
    process::wait_until(Duration::from_secs(90), || {
        let v = oracle::judge(
            &oracle::read_store(&g.cloud.store).unwrap_or_default(),
            &expected,
        );
        let done = v.received >= N;
        verdict = Some(v);
        done
    });
    std::thread::sleep(Duration::from_millis(500));
    let v = oracle::judge(&oracle::read_store(&g.cloud.store).unwrap(), &expected);
    assert!(
        v.is_exact(),
        "{} (resent {} publishes over {} reconnects)\n{}",
        v.summary(),
        report.resent_publishes,
        report.reconnects,
        g.logs()
    );
    assert_eq!(oracle::count(&g.cloud.store), N as u64);
}

#[test]
fn power_cuts_lose_and_duplicate_nothing_acknowledged_mqtt5_qos1() {
    power_cuts(Version::V5, QoS::AtLeastOnce);
}

#[test]
fn power_cuts_lose_and_duplicate_nothing_acknowledged_mqtt311_qos1() {
    power_cuts(Version::V311, QoS::AtLeastOnce);
}

#[test]
fn power_cuts_lose_and_duplicate_nothing_acknowledged_qos2() {
    power_cuts(Version::V5, QoS::ExactlyOnce);
}

/// I-1 with `outbox.commit_interval`: acknowledgements wait for the commit
/// the interval gathers — a PUBACK released before it would be a reading
/// lost to the kill -9 that follows the last one.
#[test]
fn power_cuts_with_a_commit_interval_lose_and_duplicate_nothing_acknowledged() {
    power_cuts_with(Version::V5, QoS::AtLeastOnce, "commit_interval = \"250ms\"");
}

/// Counts stored records on `counter/x` whose payload is `1`.
fn stored_ones(store: &std::path::Path) -> usize {
    let conn =
        rusqlite::Connection::open_with_flags(store, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row(
        "SELECT COUNT(*) FROM records WHERE stream = 'counter/x' AND payload = X'31'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .unwrap() as usize
}

/// Repeated identical payloads (`1`) at QoS 1 across kill -9 of the edge.
/// From a sender that reuses the lowest free packet id, MQTT cannot tell a
/// resend from a new `1`: nothing may be lost, and every extra copy is one
/// the edge counted as a possible duplicate. From a sequential sender it is
/// exact. Clause I-5.
fn identical_payloads(ids: IdAlloc) -> (usize, usize, f64) {
    let mut g = Gateway::start("", &[]);
    const N: usize = 6_000;
    let msgs: Vec<(String, Bytes)> = (0..N)
        .map(|_| ("counter/x".to_string(), Bytes::from_static(b"1")))
        .collect();
    let mut publisher = Publisher::new(
        Options::new(g.addr(), "counter").with_version(Version::V5),
        QoS::AtLeastOnce,
    );
    publisher.options.clean_start = false;
    publisher.options.session_expiry_secs = Some(3600);
    publisher.ids = ids;
    publisher.window = 200;
    publisher.deadline = Duration::from_secs(120);
    let (progress, handle) = publish_in_background(publisher, msgs);
    let mut possible_duplicates = 0.0;
    for frac in [3, 6] {
        assert!(process::wait_until(Duration::from_secs(60), || {
            progress.load(Ordering::Acquire) >= N * frac / 10
        }));
        possible_duplicates += g.edge.metric(ingest::POSSIBLE_DUPLICATES_TOTAL);
        g.edge.daemon.kill9();
        g.edge.daemon.restart().unwrap();
    }
    let report = handle.join().unwrap();
    report.ensure_all_safe().unwrap();
    process::wait_until(Duration::from_secs(60), || stored_ones(&g.cloud.store) >= N);
    std::thread::sleep(Duration::from_millis(1500));
    possible_duplicates += g.edge.metric(ingest::POSSIBLE_DUPLICATES_TOTAL);
    let stored = stored_ones(&g.cloud.store);
    assert!(
        stored >= N,
        "lost {} of {N} acknowledged `1`s\n{}",
        N - stored,
        g.logs()
    );
    (N, stored, possible_duplicates)
}

#[test]
fn identical_payloads_from_a_lowest_free_id_sender_are_never_lost() {
    let (n, stored, counted) = identical_payloads(IdAlloc::LowestFree);
    // Copies can only come from the cuts, and each one was counted, except
    // those counted by a process killed before its metric was read.
    assert!(
        stored - n <= 2 * 200,
        "{} extra copies for two cuts of a 200-message window",
        stored - n
    );
    if stored > n {
        assert!(counted > 0.0, "extra copies, none counted");
    }
}

#[test]
fn identical_payloads_from_a_sequential_sender_are_exact() {
    let (n, stored, _) = identical_payloads(IdAlloc::Sequential);
    assert_eq!(
        stored, n,
        "a proven-sequential sender's resends are recognised"
    );
}

/// What the replication protocol cannot carry is refused at ingest with an
/// MQTT 5 reason code and kept as a dead letter; everything around it flows
/// (it used to stop replication for good). Clauses I-6, I-12.
#[test]
fn oversized_topics_and_payloads_are_refused_with_reason_codes_and_replication_goes_on() {
    let g = Gateway::start("max_payload_bytes = 2048\n", &[]);
    let rt = rt();
    let (mut c, ack) = rt
        .block_on(Connection::connect(
            &Options::new(g.addr(), "limits").with_version(Version::V5),
        ))
        .unwrap();
    assert_eq!(ack.code, 0);
    assert_eq!(ack.receive_maximum, Some(1024));
    assert_eq!(ack.topic_alias_maximum, Some(0));
    let long_topic = format!("sensors/{}", "x".repeat(2000));
    let mut sent = Vec::new();
    for i in 0..120u16 {
        let (topic, payload): (String, Vec<u8>) = match i {
            50 => (long_topic.clone(), b"{\"id\":\"long\"}".to_vec()),
            51 => ("sensors/s0/reading".into(), vec![b'x'; 4096]),
            _ => (
                sensors::topic(0),
                sensors::payload(0, usize::from(i), 1).into_bytes(),
            ),
        };
        c.publish(&topic, payload, QoS::AtLeastOnce, i + 1, false)
            .unwrap();
        sent.push(i);
    }
    let mut reasons = std::collections::HashMap::new();
    rt.block_on(async {
        while reasons.len() < sent.len() {
            match c.next_packet_within(Duration::from_secs(10)).await.unwrap() {
                Some(Incoming::PubAck { pkid, reason }) => {
                    reasons.insert(pkid - 1, reason);
                }
                Some(other) => panic!("unexpected {other:?}"),
                None => panic!("no PUBACK within 10 s; got {}", reasons.len()),
            }
        }
    });
    assert_eq!(reasons[&50], 0x90, "topic name invalid");
    assert_eq!(reasons[&51], 0x97, "quota exceeded");
    assert!(reasons.iter().all(|(i, r)| *i == 50 || *i == 51 || *r == 0));
    let expected: BTreeSet<String> = (0..120usize)
        .filter(|i| *i != 50 && *i != 51)
        .map(|i| sensors::reading_id(0, i))
        .collect();
    process::wait_until(Duration::from_secs(30), || {
        oracle::count(&g.cloud.store) >= expected.len() as u64
    });
    let v = oracle::judge(&oracle::read_store(&g.cloud.store).unwrap(), &expected);
    assert!(v.is_exact(), "{}\n{}", v.summary(), g.logs());
    let status = g.edge.status().unwrap();
    assert_eq!(status["outbox"]["dead_letters"], 2, "{status}");
    assert_eq!(
        status["outbox"]["backlog_records"], 0,
        "replication went on"
    );
}

/// A packet above the announced Maximum Packet Size closes the connection
/// with DISCONNECT 0x95, before it is buffered (I-12); a SUBSCRIBE is refused
/// with a reason; malformed bytes close the connection; the daemon serves
/// the next client.
#[test]
fn protocol_abuse_gets_clear_refusals_and_the_daemon_goes_on() {
    let g = Gateway::start("max_payload_bytes = 2048\nmax_packet_bytes = 8192\n", &[]);
    let rt = rt();
    rt.block_on(async {
        let opts = Options::new(g.addr(), "abuser").with_version(Version::V5);
        let (mut c, ack) = Connection::connect(&opts).await.unwrap();
        assert_eq!(ack.maximum_packet_size, Some(8192));
        c.subscribe(1, &[("sensors/#", QoS::AtLeastOnce)]).unwrap();
        match c.next_packet_within(Duration::from_secs(5)).await.unwrap() {
            Some(Incoming::SubAck { codes, .. }) => assert_eq!(codes, vec![0x87]),
            other => panic!("expected SUBACK, got {other:?}"),
        }
        // A header announcing 100 KB: refused from the header alone.
        c.send_raw(&[0x30, 0xA0, 0x8D, 0x06]);
        c.flush().await.unwrap();
        match c.next_packet_within(Duration::from_secs(5)).await {
            Ok(Some(Incoming::Disconnect { reason, .. })) => assert_eq!(reason, 0x95),
            other => panic!("expected DISCONNECT 0x95, got {other:?}"),
        }
        // 3.1.1 client: SUBACK failure code 0x80.
        let (mut c, _) =
            Connection::connect(&Options::new(g.addr(), "abuser-3").with_version(Version::V311))
                .await
                .unwrap();
        c.subscribe(1, &[("a", QoS::AtMostOnce)]).unwrap();
        match c.next_packet_within(Duration::from_secs(5)).await.unwrap() {
            Some(Incoming::SubAck { codes, .. }) => assert_eq!(codes, vec![0x80]),
            other => panic!("expected SUBACK, got {other:?}"),
        }
        // Garbage instead of CONNECT.
        let mut raw = Connection::open(&Options::new(g.addr(), "garbage"))
            .await
            .unwrap();
        raw.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        raw.flush().await.unwrap();
        assert!(raw
            .next_packet_within(Duration::from_secs(5))
            .await
            .is_err());
        // And the next client is served.
        let (mut ok, ack) =
            Connection::connect(&Options::new(g.addr(), "fine").with_version(Version::V5))
                .await
                .unwrap();
        assert_eq!(ack.code, 0);
        ok.publish(
            &sensors::topic(1),
            sensors::payload(1, 1, 1).into_bytes(),
            QoS::AtLeastOnce,
            1,
            false,
        )
        .unwrap();
        match ok.next_packet_within(Duration::from_secs(5)).await.unwrap() {
            Some(Incoming::PubAck { reason, .. }) => assert_eq!(reason, 0),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    });
    assert!(g.edge.daemon.log_text().contains("Refused SUBSCRIBE"));
}

/// A persistent session survives a gateway restart (Session Present = 1 and
/// its QoS 2 packet ids are still "received", so a resend after the restart
/// is not processed twice); a will is published when a client vanishes;
/// keep alive closes a silent client with 0x8D. Clauses I-3, I-4.
#[test]
fn sessions_survive_restarts_wills_are_published_and_silent_clients_are_closed() {
    let mut g = Gateway::start("", &[]);
    let rt = rt();
    let opts = {
        let mut o = Options::new(g.addr(), "persistent").with_version(Version::V5);
        o.clean_start = false;
        o.session_expiry_secs = Some(600);
        o
    };
    rt.block_on(async {
        let (mut c, ack) = Connection::connect(&opts).await.unwrap();
        assert!(!ack.session_present);
        c.publish(
            "counter/q2",
            Bytes::from_static(b"{\"id\":\"q2-once\"}"),
            QoS::ExactlyOnce,
            42,
            false,
        )
        .unwrap();
        match c.next_packet_within(Duration::from_secs(10)).await.unwrap() {
            Some(Incoming::PubRec {
                pkid: 42,
                reason: 0,
            }) => {}
            other => panic!("expected PUBREC, got {other:?}"),
        }
        // No PUBREL yet: the id stays received across the restart.
    });
    g.edge.daemon.kill9();
    g.edge.daemon.restart().unwrap();
    g.wait_listening();
    rt.block_on(async {
        let (mut c, ack) = Connection::connect(&opts).await.unwrap();
        assert!(ack.session_present, "the session survived the restart");
        // The sender did not see the PUBREC: it resends with DUP.
        c.publish(
            "counter/q2",
            Bytes::from_static(b"{\"id\":\"q2-once\"}"),
            QoS::ExactlyOnce,
            42,
            true,
        )
        .unwrap();
        match c.next_packet_within(Duration::from_secs(10)).await.unwrap() {
            Some(Incoming::PubRec {
                pkid: 42,
                reason: 0,
            }) => {}
            other => panic!("expected PUBREC, got {other:?}"),
        }
        c.pubrel(42).unwrap();
        match c.next_packet_within(Duration::from_secs(10)).await.unwrap() {
            Some(Incoming::PubComp {
                pkid: 42,
                reason: 0,
            }) => {}
            other => panic!("expected PUBCOMP, got {other:?}"),
        }
        // A PUBREL for an id never received: "packet identifier not found".
        c.pubrel(77).unwrap();
        match c.next_packet_within(Duration::from_secs(10)).await.unwrap() {
            Some(Incoming::PubComp {
                pkid: 77,
                reason: 0x92,
            }) => {}
            other => panic!("expected PUBCOMP 0x92, got {other:?}"),
        }
    });

    // A will, published when the client vanishes without DISCONNECT.
    let port = g.port;
    let will = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut connect = ConnectOut::new(codec::Version::V311, "willing");
        connect.keep_alive = 30;
        connect.will = Some(codec::Will {
            topic: Bytes::from_static(b"wills/willing"),
            payload: Bytes::from_static(b"{\"id\":\"will-1\"}"),
            qos: 1,
            delay_secs: 0,
        });
        let mut b = BytesMut::new();
        codec::encode_connect(&mut b, &connect).unwrap();
        std::io::Write::write_all(&mut s, &b).unwrap();
        let mut buf = [0u8; 4];
        std::io::Read::read_exact(&mut s, &mut buf).unwrap();
        assert_eq!(buf, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
        drop(s); // vanish
    });
    will.join().unwrap();

    // Keep alive: 1 s asked, nothing sent for 1.5 s → DISCONNECT 0x8D.
    rt.block_on(async {
        let mut o = Options::new(g.addr(), "silent").with_version(Version::V5);
        o.keep_alive_secs = 1;
        let (mut c, _) = Connection::connect(&o).await.unwrap();
        let started = Instant::now();
        match c.next_packet_within(Duration::from_secs(5)).await {
            Ok(Some(Incoming::Disconnect { reason, .. })) => assert_eq!(reason, 0x8D),
            other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
        }
        assert!(started.elapsed() >= Duration::from_millis(1400));
    });

    let expected: BTreeSet<String> = ["q2-once".to_string(), "will-1".to_string()].into();
    process::wait_until(Duration::from_secs(30), || {
        oracle::count(&g.cloud.store) >= 2
    });
    std::thread::sleep(Duration::from_millis(500));
    let v = oracle::judge(&oracle::read_store(&g.cloud.store).unwrap(), &expected);
    assert!(v.is_exact(), "{}\n{}", v.summary(), g.logs());
}

/// `[[broker.users]]` with an Argon2 hash: the right password gets in, a
/// wrong one or none gets 0x86 (3.1.1: 4), and nothing of theirs is
/// accepted; a client id belongs to the user who made its session (I-11).
#[test]
fn users_wrong_passwords_and_client_id_ownership() {
    let a = fogline_edge::ingest::endpoint::auth::hash_password("alpha-pw").unwrap();
    let b = fogline_edge::ingest::endpoint::auth::hash_password("bravo-pw").unwrap();
    let g = Gateway::start(
        &format!(
            "[[broker.users]]\nname = \"alpha\"\npassword_hash = \"{a}\"\n\
             [[broker.users]]\nname = \"bravo\"\npassword_hash = \"{b}\"\n"
        ),
        &[],
    );
    let rt = rt();
    rt.block_on(async {
        let with = |id: &str, user: Option<&str>, pw: Option<&str>, v: Version| {
            let mut o = Options::new(g.addr(), id).with_version(v);
            o.username = user.map(str::to_string);
            o.password = pw.map(str::to_string);
            o
        };
        let refused = |r: anyhow::Result<(Connection, fogline_tests::mqtt_raw::ConnAck)>| match r {
            Ok((_, ack)) => panic!("accepted: {ack:?}"),
            Err(e) => e
                .downcast_ref::<fogline_tests::mqtt_raw::ConnectRefused>()
                .map(|r| r.code)
                .unwrap_or_else(|| panic!("not a CONNACK refusal: {e:#}")),
        };
        let code = refused(
            Connection::connect(&with("x1", Some("alpha"), Some("wrong"), Version::V5)).await,
        );
        assert_eq!(code, 0x86);
        let code = refused(Connection::connect(&with("x2", None, None, Version::V5)).await);
        assert_eq!(code, 0x86);
        let code = refused(
            Connection::connect(&with("x3", Some("nobody"), Some("x"), Version::V311)).await,
        );
        assert_eq!(code, 4, "3.1.1: bad user name or password");

        let (mut c, ack) = Connection::connect(&with(
            "owned-id",
            Some("alpha"),
            Some("alpha-pw"),
            Version::V5,
        ))
        .await
        .unwrap();
        assert_eq!(ack.code, 0);
        c.publish(
            &sensors::topic(2),
            sensors::payload(2, 0, 1).into_bytes(),
            QoS::AtLeastOnce,
            1,
            false,
        )
        .unwrap();
        assert!(matches!(
            c.next_packet_within(Duration::from_secs(10)).await.unwrap(),
            Some(Incoming::PubAck { reason: 0, .. })
        ));
        // Bravo may not take alpha's client id over.
        let code = refused(
            Connection::connect(&with(
                "owned-id",
                Some("bravo"),
                Some("bravo-pw"),
                Version::V5,
            ))
            .await,
        );
        assert_eq!(code, 0x87);
    });
    let expected: BTreeSet<String> = [sensors::reading_id(2, 0)].into();
    process::wait_until(Duration::from_secs(30), || {
        oracle::count(&g.cloud.store) >= 1
    });
    std::thread::sleep(Duration::from_millis(300));
    let v = oracle::judge(&oracle::read_store(&g.cloud.store).unwrap(), &expected);
    assert!(v.is_exact(), "{}", v.summary());
}

/// One MQTT exchange over TLS: CONNECT, one QoS 1 PUBLISH; returns the
/// PUBACK's packet id, or the error that stopped it.
async fn tls_publish(
    port: u16,
    ca: &std::path::Path,
    client: Option<(&std::path::Path, &std::path::Path)>,
    id: &str,
) -> anyhow::Result<u16> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder.with_client_auth_cert(
            CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?,
            PrivateKeyDer::from_pem_file(key)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let mut out = BytesMut::new();
    let v = codec::Version::V311;
    codec::encode_connect(&mut out, &ConnectOut::new(v, id))?;
    codec::encode_publish(
        &mut out,
        v,
        sensors::topic(5).as_bytes(),
        Bytes::from(sensors::payload(5, 0, 1)),
        1,
        9,
        false,
        false,
    )?;
    tls.write_all(&out).await?;
    tls.flush().await?;
    let mut inb = BytesMut::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match codec::decode(&mut inb, Some(v), 1 << 16) {
            Ok(Some(Inbound::ConnAck(a))) => anyhow::ensure!(a.code == 0, "CONNACK {a:?}"),
            Ok(Some(Inbound::PubAck(pkid, _))) => return Ok(pkid),
            Ok(Some(other)) => anyhow::bail!("unexpected {other:?}"),
            Ok(None) => {
                anyhow::ensure!(Instant::now() < deadline, "no PUBACK in time");
                let mut buf = [0u8; 1024];
                let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await??;
                anyhow::ensure!(n > 0, "the endpoint closed the connection");
                inb.extend_from_slice(&buf[..n]);
            }
            Err(e) => anyhow::bail!("{e}"),
        }
    }
}

/// TLS only (`plaintext = false`), client certificates from a CA required:
/// a client with a certificate from another CA, one without a certificate,
/// and one speaking plain MQTT to the TLS port are all refused and nothing
/// of theirs is stored; a certificate from the right CA gets in (I-11).
#[test]
fn tls_client_certificates_are_required_and_foreign_ones_refused() {
    let tls_port = fogline_tests::free_tcp_port().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rogue = dir.path().join("rogue");
    fogline_testkit::certs::dev_bundle(&rogue, &["sensor-a"]).unwrap();
    // Relative paths resolve against the edge config's dir, where Gateway
    // made the certificates.
    let g = Gateway::start(
        &format!(
            "plaintext = false\n[broker.tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"\nclient_ca = \"certs/ca.pem\"\n"
        ),
        &[],
    );
    let certs = g.certs();
    let ca = certs.join("ca.pem");
    assert!(process::wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok()
    }));
    let rt = rt();
    rt.block_on(async {
        let foreign = tls_publish(
            tls_port,
            &ca,
            Some((
                &rogue.join("node-sensor-a.pem"),
                &rogue.join("node-sensor-a.key"),
            )),
            "rogue",
        )
        .await;
        assert!(foreign.is_err(), "a certificate from another CA got in");
        let none = tls_publish(tls_port, &ca, None, "anonymous").await;
        assert!(none.is_err(), "a client without certificate got in");
        // Plain MQTT to the TLS port: the TLS handshake fails, no CONNACK.
        let plain =
            Connection::connect(&Options::new(format!("127.0.0.1:{tls_port}"), "plain")).await;
        assert!(plain.is_err(), "plain MQTT got a CONNACK on the TLS port");
        let ok = tls_publish(
            tls_port,
            &ca,
            Some((
                &certs.join("node-sensor-b.pem"),
                &certs.join("node-sensor-b.key"),
            )),
            "sensor-b",
        )
        .await
        .unwrap();
        assert_eq!(ok, 9);
    });
    // The plain port is closed.
    assert!(std::net::TcpStream::connect(("127.0.0.1", g.port)).is_err());
    let expected: BTreeSet<String> = [sensors::reading_id(5, 0)].into();
    process::wait_until(Duration::from_secs(30), || {
        oracle::count(&g.cloud.store) >= 1
    });
    std::thread::sleep(Duration::from_millis(300));
    let v = oracle::judge(&oracle::read_store(&g.cloud.store).unwrap(), &expected);
    assert!(v.is_exact(), "{}\n{}", v.summary(), g.logs());
    assert!(g.edge.daemon.log_text().contains("TLS handshake failed"));
}

/// Memory is bounded in bytes, not messages (I-12): a sensor pipelining
/// 160 payloads of 900 KB (144 MB) against an 8 MiB ingest budget is slowed
/// down (sockets not read), not buffered: the edge's peak RSS stays far
/// below what was sent, and every payload is stored.
#[test]
fn large_payloads_are_bounded_by_the_byte_budget_not_the_message_count() {
    let g = Gateway::start(
        "max_payload_bytes = 1048576\nreceive_maximum = 200\n[ingest]\nmax_pending_bytes = 8388608",
        &[],
    );
    const N: usize = 160;
    const SIZE: usize = 900 * 1024;
    let msgs: Vec<(String, Bytes)> = (0..N)
        .map(|i| {
            let head = format!("{{\"id\":\"big-{i}\",\"pad\":\"");
            let mut p = head.into_bytes();
            p.resize(SIZE - 2, b'x');
            p.extend_from_slice(b"\"}");
            (format!("sensors/big/{}", i % 4), Bytes::from(p))
        })
        .collect();
    let mut publisher = Publisher::new(
        Options::new(g.addr(), "big").with_version(Version::V5),
        QoS::AtLeastOnce,
    );
    publisher.options.max_packet_size = 2 << 20;
    publisher.window = 200;
    publisher.deadline = Duration::from_secs(120);
    let report = rt().block_on(publisher.run(&msgs)).unwrap();
    report.ensure_all_safe().unwrap();
    let pid = g.edge.daemon.pid().unwrap();
    let peak = fogline_tests::mqtt_raw::cpu::sample(pid)
        .unwrap()
        .peak_rss_bytes;
    assert!(
        peak < 80 << 20,
        "edge peak RSS {} MB for {} MB published through an 8 MiB budget",
        peak >> 20,
        (N * SIZE) >> 20
    );
    let expected: BTreeSet<String> = (0..N).map(|i| format!("big-{i}")).collect();
    process::wait_until(Duration::from_secs(60), || {
        oracle::count(&g.cloud.store) >= N as u64
    });
    let v = oracle::judge(&oracle::read_store(&g.cloud.store).unwrap(), &expected);
    assert!(v.is_exact(), "{}\n{}", v.summary(), g.logs());
}
