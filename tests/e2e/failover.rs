//! Several aggregators on one PostgreSQL database (I-36), as real
//! processes: three `fogline-cloud` share a database, the edge lists all
//! three (rendezvous order), and the aggregator serving the node is killed
//! with SIGKILL mid-stream, three times over (restarted after each). The
//! node fails over, the next aggregator takes its lease and resumes from
//! the database's cursor: every reading exactly once, in order, by the
//! oracle reading PostgreSQL.

use std::collections::BTreeSet;
use std::time::Duration;

use fogline_testkit::postgres::TestDb;
use fogline_tests::deploy::{Cloud, Edge};
use fogline_tests::mqtt_raw::QoS;
use fogline_tests::{oracle, process};

use crate::external::{ids_of, publish, readings};

const NODE: &str = "gw-failover";

struct Db {
    rt: tokio::runtime::Runtime,
    db: TestDb,
    client: tokio_postgres::Client,
}

impl Db {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let db = rt
            .block_on(TestDb::create())
            .unwrap_or_else(|e| panic!("{e}"));
        let client = rt.block_on(db.connect()).unwrap();
        Self { rt, db, client }
    }

    /// The node's cursor (0 before the first apply).
    fn cursor(&self) -> u64 {
        self.rt
            .block_on(
                self.client
                    .query_opt("SELECT seq FROM cursors WHERE node = $1", &[&NODE]),
            )
            .ok()
            .flatten()
            .map_or(0, |r| r.get::<_, i64>(0) as u64)
    }

    fn stored(&self) -> Vec<oracle::Stored> {
        self.rt
            .block_on(oracle::read_postgres(&self.db.url))
            .unwrap_or_default()
    }
}

/// Which of `clouds` the node is connected to, waiting up to `timeout`.
fn serving(clouds: &[Cloud], timeout: Duration) -> Option<usize> {
    let mut found = None;
    process::wait_until(timeout, || {
        found = clouds
            .iter()
            .position(|c| c.connected_nodes().iter().any(|n| n == NODE));
        found.is_some()
    });
    found
}

/// I-36: kill -9 of the serving aggregator mid-stream, three times: 0
/// lost, 0 duplicated, order kept.
#[test]
fn killing_the_serving_aggregator_mid_stream_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    crate::write_certs(&certs, &[NODE]);
    let db = Db::new();
    let mut clouds: Vec<Cloud> = (0..3)
        .map(|i| {
            Cloud::start_postgres(
                &dir.path().join(format!("agg-{i}")),
                &certs,
                &db.db.url,
                &format!("agg-{i}"),
            )
            .unwrap()
        })
        .collect();
    let logs = |edge: &Edge, clouds: &[Cloud]| {
        let mut out = format!("--- edge ---\n{}\n", edge.daemon.log_text());
        for (i, c) in clouds.iter().enumerate() {
            out.push_str(&format!("--- agg-{i} ---\n{}\n", c.daemon.log_text()));
        }
        out
    };
    let servers: Vec<String> = clouds
        .iter()
        .map(|c| format!("\"127.0.0.1:{}\"", c.quic_port))
        .collect();
    let port = fogline_tests::free_tcp_port().unwrap();
    // Small batches, one in flight: each round's upload lasts long enough
    // to be cut in the middle.
    let body = format!(
        "[broker]\nembedded = true\nlisten = \"127.0.0.1:{port}\"\n\
         [[pipelines]]\nname = \"telemetry\"\ntopics = [\"sensors/+/reading\"]\nfunctions = []\n\
         [uplink]\nservers = [{}]\nserver_name = \"localhost\"\nca = \"{c}/ca.pem\"\n\
         cert = \"{c}/node-{NODE}.pem\"\nkey = \"{c}/node-{NODE}.key\"\n\
         reconnect_max = \"500ms\"\nconnect_timeout = \"1s\"\nbatch_records = 5\nmax_in_flight = 1\n",
        servers.join(", "),
        c = certs.display()
    );
    let edge = Edge::start(dir.path(), NODE, &body).unwrap();
    assert!(
        process::wait_until(Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }),
        "endpoint never listened:\n{}",
        logs(&edge, &clouds)
    );

    let mut expected = BTreeSet::new();
    let mut kills = Vec::new();
    for round in 0..3 {
        let batch = readings(0..4, round * 500..(round + 1) * 500);
        expected.extend(ids_of(&batch));
        let before = db.cursor();
        publish(port, QoS::AtLeastOnce, &batch);
        let Some(victim) = serving(&clouds, Duration::from_secs(30)) else {
            panic!("no aggregator serves the node:\n{}", logs(&edge, &clouds));
        };
        // Mid-stream: some of this round applied, not all of it.
        let moving = process::wait_until(Duration::from_secs(30), || db.cursor() >= before + 100);
        assert!(
            moving,
            "round {round}: no progress:\n{}",
            logs(&edge, &clouds)
        );
        let at_kill = db.cursor();
        clouds[victim].daemon.kill9();
        kills.push((victim, at_kill, at_kill < before + 2000));
        // Another one takes over the node, then the victim comes back.
        let Some(next) = serving(&clouds, Duration::from_secs(30)).filter(|&n| n != victim) else {
            panic!(
                "round {round}: no failover from agg-{victim}:\n{}",
                logs(&edge, &clouds)
            );
        };
        assert_ne!(next, victim);
        clouds[victim].daemon.restart().unwrap();
    }

    let all_in = process::wait_until(Duration::from_secs(120), || {
        let stored = db.stored();
        let verdict = oracle::judge(&stored, &expected);
        verdict.lost.is_empty()
    });
    std::thread::sleep(Duration::from_millis(800));
    let verdict = oracle::judge(&db.stored(), &expected);
    assert!(
        all_in && verdict.is_exact(),
        "{} after kills {kills:?} (duplicated: {:?}; out of order: {:?})\n{}",
        verdict.summary(),
        &verdict.duplicated[..verdict.duplicated.len().min(5)],
        verdict.out_of_order,
        logs(&edge, &clouds)
    );
    // The kills fell mid-round (victim, cursor at the kill, mid-round), and
    // the lease moved: one take per connection, so the token went up at
    // least once per failover.
    println!("kills: {kills:?}");
    assert!(
        kills.iter().filter(|k| k.2).count() >= 2,
        "most kills must cut a round's upload: {kills:?}"
    );
    let token: i64 = db
        .rt
        .block_on(
            db.client
                .query_one("SELECT token FROM leases WHERE node = $1", &[&NODE]),
        )
        .unwrap()
        .get(0);
    assert!(token >= 4, "lease token {token} after 3 failovers");
    // The edge told the aggregators how it is (a Status frame at each
    // connect): its version and backlog, in the fleet view of any of them.
    let status = clouds[0]
        .nodes()
        .and_then(|n| n.as_array()?.iter().find(|n| n["node"] == NODE).cloned())
        .map(|n| n["status"].clone())
        .unwrap_or_default();
    assert!(
        status["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("fogline-edge/")),
        "no status from the edge: {status}"
    );
    assert!(status["backlog_records"].is_u64(), "{status}");
    for c in &mut clouds {
        c.daemon.kill9();
    }
}
