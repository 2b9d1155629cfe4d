//! The outbox's identity against the aggregator's cursor (I-8, I-9): a wiped
//! outbox, a restored aggregator store, an outbox restored from an older
//! copy of itself. Each test drives real processes through the event and
//! checks the aggregator's store with the oracle, the edge's alarms and
//! metrics, and the aggregator's `/api/v1/nodes`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use fogline_edge::uplink::events as uplink;
use fogline_tests::deploy::Edge;
use fogline_tests::mqtt_raw::QoS;
use fogline_tests::{oracle, process};

use crate::external::{
    alarm_kinds, assert_exact, debug_broker, ids_of, passthrough, publish, readings, status, stop,
    Site,
};

/// An edge passing readings unchanged, whose uplink gives up a connection
/// attempt after 1 s (so an attempt made while the aggregator was down
/// does not linger into the next step).
fn start_edge(site: &Site, node: &str) -> Edge {
    let pipelines = passthrough(&[("readings", &["sensors/+/reading"])]);
    let body = site.edge_body(node, &pipelines, "") + "connect_timeout = \"1s\"\n";
    Edge::start(site.dir.path(), node, &body).unwrap()
}

/// Failed uplink connection attempts so far.
fn failed_attempts(edge: &Edge) -> usize {
    let log = edge.daemon.log_text();
    log.matches("Uplink session ended").count() + log.matches("Cannot reach the aggregator").count()
}

/// Waits until the edge's uplink has failed one more connection attempt:
/// the next one reads the outbox as it is now.
fn wait_next_attempt(edge: &Edge) {
    let before = failed_attempts(edge);
    let ok = process::wait_until(Duration::from_secs(15), || failed_attempts(edge) > before);
    assert!(ok, "the uplink kept retrying:\n{}", edge.daemon.log_text());
}

/// Waits until the aggregator's cursor for `node` and the edge's
/// acknowledged mark are both `seq`.
fn wait_synced(site: &Site, edge: &Edge, node: &str, seq: u64) {
    let ok = process::wait_until(Duration::from_secs(60), || {
        site.cloud.cursor(node) == seq
            && edge
                .status()
                .is_some_and(|s| s["outbox"]["acked_seq"].as_u64() == Some(seq))
    });
    assert!(
        ok,
        "not synced through {seq}: cursor {}\n{}",
        site.cloud.cursor(node),
        site.logs(edge)
    );
}

/// `path` with `suffix` appended (`-wal`, `-shm`).
fn sibling(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    p.into()
}

/// Copies a stopped SQLite database (and its WAL, if any) to `to`.
fn copy_db(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
    let wal = sibling(from, "-wal");
    if wal.exists() {
        std::fs::copy(&wal, sibling(to, "-wal")).unwrap();
    }
}

/// Deletes a stopped SQLite database with its WAL and shared-memory files.
fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let p = sibling(path, suffix);
        if p.exists() {
            std::fs::remove_file(&p).unwrap();
        }
    }
}

/// Replaces the stopped database at `path` with the copy at `backup`.
fn restore_db(backup: &Path, path: &Path) {
    remove_db(path);
    copy_db(backup, path);
}

/// The aggregator's `/api/v1/nodes` entry for `node`.
fn node_summary(site: &Site, node: &str) -> Option<serde_json::Value> {
    site.cloud
        .nodes()?
        .as_array()?
        .iter()
        .find(|n| n["node"].as_str() == Some(node))
        .cloned()
}

/// How many sessions the aggregator has served so far (its log survives
/// restarts).
fn cloud_sessions(site: &Site) -> usize {
    site.cloud
        .daemon
        .log_text()
        .matches("Node connected.")
        .count()
}

/// Restarts the aggregator (SIGTERM: it closes the edge's connection, which
/// reconnects at once) and waits until the edge has opened a session with
/// the new process.
fn bounce_aggregator(site: &mut Site, edge: &Edge) {
    let before = cloud_sessions(site);
    stop(&mut site.cloud.daemon);
    site.cloud.daemon.restart().unwrap();
    let ok = process::wait_until(Duration::from_secs(30), || cloud_sessions(site) > before);
    assert!(ok, "the edge reconnected\n{}", site.logs(edge));
    edge.wait_for(Duration::from_secs(30), "uplink connected", |s| {
        s["uplink_connected"].as_bool() == Some(true)
    })
    .unwrap();
}

/// I-8: an outbox that was wiped (new incarnation) meets the aggregator's
/// cursor of the old one: it deletes nothing, renumbers its 50 buffered
/// records (numbered 1..=50, below the cursor 100) above the cursor, sends
/// them, and keeps a `new_outbox` alarm. All 150 readings stored, once.
#[test]
fn a_wiped_outbox_meeting_an_existing_cursor_is_renumbered_above_it_and_loses_nothing() {
    let node = "gw-id-wiped";
    let mut site = Site::start(node, debug_broker());
    let mut edge = start_edge(&site, node);
    site.wait_subscribed(&edge, node, 1);
    let port = site.mosquitto.port();

    let first = readings(0..2, 0..50);
    publish(port, QoS::AtLeastOnce, &first);
    wait_synced(&site, &edge, node, 100);

    stop(&mut edge.daemon);
    let outbox = edge.data_dir.join("outbox.db");
    assert!(outbox.exists(), "{}", outbox.display());
    remove_db(&outbox);
    stop(&mut site.cloud.daemon);
    edge.daemon.restart().unwrap();
    site.wait_subscribed(&edge, node, 2);

    let second = readings(0..2, 50..75);
    publish(port, QoS::AtLeastOnce, &second);
    edge.wait_for(Duration::from_secs(30), "buffer 50 readings", |s| {
        s["outbox"]["backlog_records"].as_u64() == Some(50)
    })
    .unwrap();
    let st = status(&edge);
    assert_eq!(
        st["outbox"]["next_seq"].as_u64(),
        Some(51),
        "the new outbox numbered its records 1..=50, at or below the old cursor: {st}"
    );

    site.cloud.daemon.restart().unwrap();
    let expected: BTreeSet<String> = ids_of(&first).into_iter().chain(ids_of(&second)).collect();
    assert_exact(
        &site.cloud.store,
        &expected,
        Duration::from_secs(60),
        || site.logs(&edge),
    );
    assert_eq!(oracle::count(&site.cloud.store), 150);
    assert_eq!(site.cloud.cursor(node), 150);
    edge.wait_for(Duration::from_secs(10), "alarm new_outbox", |s| {
        alarm_kinds(s).iter().any(|k| k == "new_outbox")
    })
    .unwrap();
    assert!(
        edge.metric(uplink::RENUMBERED_TOTAL) >= 1.0,
        "{}",
        site.logs(&edge)
    );
}

/// Brings a node to the state of I-9: the aggregator acknowledged 100
/// readings (seq 1..=100), then its store went back to a copy holding 60;
/// it is running again and the edge has seen its cursor. Returns the
/// site, the edge and the ids that are still stored.
fn restored_store(node: &str) -> (Site, Edge, BTreeSet<String>) {
    let mut site = Site::start(node, debug_broker());
    let edge = start_edge(&site, node);
    site.wait_subscribed(&edge, node, 1);
    let port = site.mosquitto.port();

    let kept = readings(0..1, 0..60);
    publish(port, QoS::AtLeastOnce, &kept);
    wait_synced(&site, &edge, node, 60);
    stop(&mut site.cloud.daemon);
    let backup = site.dir.path().join("cloud-backup.db");
    copy_db(&site.cloud.store, &backup);
    site.cloud.daemon.restart().unwrap();

    publish(port, QoS::AtLeastOnce, &readings(0..1, 60..100));
    wait_synced(&site, &edge, node, 100);
    stop(&mut site.cloud.daemon);
    restore_db(&backup, &site.cloud.store);
    assert_eq!(site.cloud.cursor(node), 60, "the restored store");
    site.cloud.daemon.restart().unwrap();

    edge.wait_for(Duration::from_secs(30), "alarm cursor_behind", |s| {
        alarm_kinds(s).iter().any(|k| k == "cursor_behind")
            && s["uplink_cursor_regressions"].as_u64().unwrap_or(0) >= 1
    })
    .unwrap();
    (site, edge, ids_of(&kept))
}

/// I-9: a store restored from a backup (cursor 60) behind what it
/// acknowledged (100): the edge logs an error, counts the regression and
/// keeps a `cursor_behind` alarm; the aggregator records the gap
/// (`lost_records` = 40); readings published afterwards still arrive.
#[test]
fn a_restored_aggregator_store_is_an_alarm_on_both_sides_and_replication_goes_on() {
    let node = "gw-id-restored-store";
    let (site, edge, kept) = restored_store(node);

    assert!(
        edge.metric(uplink::CURSOR_REGRESSIONS_TOTAL) >= 1.0,
        "{}",
        site.logs(&edge)
    );
    let log = edge.daemon.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("records 61..=100 were lost")),
        "the edge logs an error naming the lost range\n{}",
        site.logs(&edge)
    );
    let ok = process::wait_until(Duration::from_secs(10), || {
        node_summary(&site, node).is_some_and(|n| n["lost_records"].as_u64() == Some(40))
    });
    assert!(
        ok,
        "lost_records: {:?}\n{}",
        node_summary(&site, node),
        site.logs(&edge)
    );

    let later = readings(0..1, 100..120);
    publish(site.mosquitto.port(), QoS::AtLeastOnce, &later);
    let expected: BTreeSet<String> = kept.into_iter().chain(ids_of(&later)).collect();
    assert_exact(
        &site.cloud.store,
        &expected,
        Duration::from_secs(60),
        || site.logs(&edge),
    );
    let summary = node_summary(&site, node).unwrap();
    assert_eq!(summary["cursor"].as_str(), Some("120"), "{summary}");
    assert_eq!(summary["lost_records"].as_u64(), Some(40), "{summary}");
    assert!(edge.status().is_some_and(|s| s["uplink_connected"] == true));
}

/// I-9, the gap is a fact recorded once: when the edge reconnects to the
/// restored aggregator again before anything new was applied (an aggregator
/// restart, a network flap), `lost_records` still says 40, not 40 per
/// reconnection.
#[test]
fn a_restored_aggregator_store_counts_its_lost_records_once_across_reconnects() {
    let node = "gw-id-gap-once";
    let (mut site, edge, _) = restored_store(node);
    let ok = process::wait_until(Duration::from_secs(10), || {
        node_summary(&site, node).is_some_and(|n| n["lost_records"].as_u64() == Some(40))
    });
    assert!(ok, "lost_records: {:?}", node_summary(&site, node));

    bounce_aggregator(&mut site, &edge);
    std::thread::sleep(Duration::from_millis(500));
    let summary = node_summary(&site, node).unwrap();
    assert_eq!(
        summary["lost_records"].as_u64(),
        Some(40),
        "records 61..=100 were lost once: {summary}\n{}",
        site.logs(&edge)
    );
}

/// I-9, the incarnation-less case: the aggregator's store is deleted
/// outright (no row for the node at all). The edge, acknowledged 1..=50,
/// raises its alarm; the aggregator records the same gap (`lost_records` =
/// 50) although it has nothing of the node; what comes later is stored once.
#[test]
fn a_deleted_aggregator_store_records_the_gap_on_both_sides() {
    let node = "gw-id-deleted-store";
    let mut site = Site::start(node, debug_broker());
    let edge = start_edge(&site, node);
    site.wait_subscribed(&edge, node, 1);
    let port = site.mosquitto.port();
    publish(port, QoS::AtLeastOnce, &readings(0..1, 0..50));
    wait_synced(&site, &edge, node, 50);

    stop(&mut site.cloud.daemon);
    remove_db(&site.cloud.store);
    site.cloud.daemon.restart().unwrap();
    edge.wait_for(Duration::from_secs(30), "alarm cursor_behind", |s| {
        alarm_kinds(s).iter().any(|k| k == "cursor_behind")
    })
    .unwrap();
    let ok = process::wait_until(Duration::from_secs(10), || {
        node_summary(&site, node).is_some_and(|n| n["lost_records"].as_u64() == Some(50))
    });
    assert!(
        ok,
        "the aggregator records records 1..=50 as lost: {:?}\n{}",
        node_summary(&site, node),
        site.logs(&edge)
    );
    assert!(
        edge.daemon
            .log_text()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("records 1..=50 were lost")),
        "{}",
        site.logs(&edge)
    );

    let later = readings(0..1, 50..70);
    publish(port, QoS::AtLeastOnce, &later);
    assert_exact(
        &site.cloud.store,
        &ids_of(&later),
        Duration::from_secs(60),
        || site.logs(&edge),
    );
    let summary = node_summary(&site, node).unwrap();
    assert_eq!(summary["cursor"].as_str(), Some("70"), "{summary}");
    assert_eq!(summary["lost_records"].as_u64(), Some(50), "{summary}");
}

/// What [`old_copy`] leaves behind.
struct OldCopy {
    site: Site,
    edge: Edge,
    /// Every reading published so far (all must be stored once).
    expected: BTreeSet<String>,
}

/// Brings a node through I-8's "older copy" case: the outbox is copied
/// aside after 50 readings were synced, 50 more are synced, then the edge
/// comes back with the old copy (same incarnation, next seq 51) while the
/// aggregator is down and buffers `buffered` new readings as seq 51..; then
/// the aggregator (cursor 100) comes back. Checks the recovery: nothing
/// deleted (every reading stored once), alarm `cursor_ahead`, a new
/// incarnation.
fn old_copy(node: &str, buffered: usize) -> OldCopy {
    let mut site = Site::start(node, debug_broker());
    let mut edge = start_edge(&site, node);
    site.wait_subscribed(&edge, node, 1);
    let port = site.mosquitto.port();

    let mut published = readings(0..1, 0..50);
    publish(port, QoS::AtLeastOnce, &published);
    wait_synced(&site, &edge, node, 50);
    let incarnation = status(&edge)["outbox"]["incarnation"].as_u64().unwrap();

    stop(&mut edge.daemon);
    let outbox = edge.data_dir.join("outbox.db");
    let backup = site.dir.path().join("outbox-backup.db");
    copy_db(&outbox, &backup);
    edge.daemon.restart().unwrap();
    site.wait_subscribed(&edge, node, 2);

    let more = readings(0..1, 50..100);
    publish(port, QoS::AtLeastOnce, &more);
    published.extend(more);
    wait_synced(&site, &edge, node, 100);

    stop(&mut edge.daemon);
    stop(&mut site.cloud.daemon);
    restore_db(&backup, &outbox);
    edge.daemon.restart().unwrap();
    site.wait_subscribed(&edge, node, 3);

    let new = readings(0..1, 100..100 + buffered);
    publish(port, QoS::AtLeastOnce, &new);
    published.extend(new);
    edge.wait_for(Duration::from_secs(30), "buffer the new readings", |s| {
        s["outbox"]["backlog_records"].as_u64() == Some(buffered as u64)
    })
    .unwrap();
    let st = status(&edge);
    assert_eq!(
        (
            st["outbox"]["next_seq"].as_u64(),
            st["outbox"]["incarnation"].as_u64()
        ),
        (Some(51 + buffered as u64), Some(incarnation)),
        "the old copy numbered the new readings from 51 under its old incarnation: {st}"
    );
    // The uplink's next Hello describes the outbox with these readings.
    wait_next_attempt(&edge);

    site.cloud.daemon.restart().unwrap();
    let expected = ids_of(&published);
    assert_eq!(expected.len(), 100 + buffered);
    edge.wait_for(Duration::from_secs(60), "drain its backlog", |s| {
        s["outbox"]["backlog_records"].as_u64() == Some(0)
            && s["outbox"]["acked_seq"].as_u64().unwrap_or(0) > 100
    })
    .unwrap();
    assert_exact(&site.cloud.store, &expected, Duration::from_secs(5), || {
        site.logs(&edge)
    });
    edge.wait_for(Duration::from_secs(10), "alarm cursor_ahead", |s| {
        alarm_kinds(s).iter().any(|k| k == "cursor_ahead")
    })
    .unwrap();
    assert!(edge.metric(uplink::RENUMBERED_TOTAL) >= 1.0);
    let now = status(&edge)["outbox"]["incarnation"].as_u64().unwrap();
    assert_ne!(now, incarnation, "the older copy took a new incarnation");
    OldCopy {
        site,
        edge,
        expected,
    }
}

/// I-8: an outbox restored from an older copy of itself (same incarnation,
/// the aggregator's cursor beyond its next seq) deletes none of the readings
/// it buffered before its first connection: they are renumbered above the
/// cursor and sent, and the edge keeps a `cursor_ahead` alarm.
#[test]
fn an_outbox_restored_from_an_older_copy_keeps_what_it_buffered_and_raises_cursor_ahead() {
    let OldCopy {
        site, edge: _edge, ..
    } = old_copy("gw-id-old-copy", 30);
    assert_eq!(oracle::count(&site.cloud.store), 130);
    assert_eq!(site.cloud.cursor("gw-id-old-copy"), 130);
}

/// I-8, after the recovery from an older copy: the new incarnation is the
/// one the aggregator records with the cursor, so the next connection (here
/// after an aggregator restart) simply continues — no second renumbering,
/// no `new_outbox` alarm (which would also renumber, and so duplicate,
/// records applied but not yet acknowledged) — and new readings arrive once.
#[test]
fn after_recovering_from_an_older_copy_the_next_connection_continues_under_the_new_incarnation() {
    let node = "gw-id-old-copy-next";
    let OldCopy {
        mut site,
        edge,
        mut expected,
    } = old_copy(node, 30);
    let recorded_before = node_summary(&site, node).map(|n| n["incarnation"].clone());
    bounce_aggregator(&mut site, &edge);
    let later = readings(0..1, 130..140);
    publish(site.mosquitto.port(), QoS::AtLeastOnce, &later);
    expected.extend(ids_of(&later));
    assert_exact(
        &site.cloud.store,
        &expected,
        Duration::from_secs(60),
        || site.logs(&edge),
    );

    let st = status(&edge);
    let edge_incarnation = st["outbox"]["incarnation"].as_u64();
    let summary = node_summary(&site, node).unwrap();
    assert_eq!(
        // u64s are strings in the aggregator's API.
        summary["incarnation"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok()),
        edge_incarnation,
        "the aggregator records the cursor for the outbox's current incarnation: {summary}\n{}",
        site.logs(&edge)
    );
    assert!(
        !alarm_kinds(&st).iter().any(|k| k == "new_outbox"),
        "no `new_outbox` alarm for the edge's own outbox: {}\n(the aggregator had recorded incarnation {recorded_before:?} with its cursor before the restart; the edge's is {edge_incarnation:?})\n{}",
        st["outbox"]["alarms"],
        site.logs(&edge)
    );
    assert_eq!(
        edge.metric(uplink::RENUMBERED_TOTAL),
        1.0,
        "renumbered once (the older copy), not again on the next connection\n{}",
        site.logs(&edge)
    );
}

/// I-8 ("deleted only after acknowledged"), the older copy that buffered
/// more than the aggregator moved on: the copy (next seq 51) buffers 60
/// readings as seq 51..=110 while the aggregator's cursor for its
/// incarnation is 100. Seq 51..=100 of this file were never sent, yet the
/// cursor "covers" them; none may be deleted: all 160 readings stored once.
#[test]
fn an_outbox_restored_from_an_older_copy_loses_nothing_when_it_buffered_past_the_cursor() {
    let OldCopy {
        site, edge: _edge, ..
    } = old_copy("gw-id-old-copy-past", 60);
    assert_eq!(oracle::count(&site.cloud.store), 160);
}

/// Overwrites two pages at 60 % of a stopped SQLite file with garbage: the
/// middle of the records.
fn damage_pages(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let pages = bytes.len() / 4096;
    assert!(
        pages > 20,
        "{} is too small to damage its middle",
        path.display()
    );
    for page in [pages * 3 / 5, pages * 3 / 5 + 1] {
        bytes[page * 4096..(page + 1) * 4096].fill(0xA5);
    }
    std::fs::write(path, bytes).unwrap();
}

/// The number in "N lost" of the edge's `outbox_damaged` alarm.
fn lost_in_alarm(status: &serde_json::Value) -> Option<u64> {
    let alarms = status["outbox"]["alarms"].as_array()?;
    let detail = alarms.iter().find(|a| a["kind"] == "outbox_damaged")?["detail"].as_str()?;
    let before = detail.split(" lost").next()?;
    before.rsplit(' ').next()?.parse().ok()
}

/// Who finds the damage.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Finder {
    /// The daemon's check at start.
    Start,
    /// The uplink, reading it (no check at start): the daemon restarts.
    Uplink,
    /// The operator: `fogline-edge outbox check` and `outbox recover`.
    Operator,
}

/// Runs `fogline-edge <args>`: exit code and stdout.
fn edge_cli(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(process::binary("fogline-edge").unwrap())
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// I-31: 20,000 readings buffered while the aggregator is down, the edge
/// stopped, two pages in the middle of its outbox overwritten. With
/// `check_on_start` the edge finds the damage as it starts; without, its
/// uplink meets it and the daemon restarts itself; or the operator checks
/// and salvages it by hand. Each way the rest is salvaged into a new file
/// and replication goes on: every reading that was not on the damaged
/// pages is stored exactly once, the ones that were are exactly the loss
/// its `outbox_damaged` alarm reports, and readings published afterwards
/// arrive.
fn a_damaged_outbox_is_salvaged(node: &str, finder: Finder) {
    let mut site = Site::start(node, debug_broker());
    stop(&mut site.cloud.daemon);
    let pipelines = passthrough(&[("readings", &["sensors/+/reading"])]);
    let check = if finder == Finder::Start { "10s" } else { "0s" };
    let body = site.edge_body(node, &pipelines, "").replace(
        "[outbox]\n",
        &format!("[outbox]\ncheck_on_start = \"{check}\"\n"),
    ) + "connect_timeout = \"1s\"\n";
    let mut edge = Edge::start(site.dir.path(), node, &body).unwrap();
    site.wait_subscribed(&edge, node, 1);
    let first = readings(0..4, 0..5_000);
    publish(site.mosquitto.port(), QoS::AtLeastOnce, &first);
    edge.wait_for(Duration::from_secs(60), "buffer 20000 readings", |s| {
        s["outbox"]["backlog_records"].as_u64() == Some(20_000)
    })
    .unwrap();
    stop(&mut edge.daemon);
    damage_pages(&edge.data_dir.join("outbox.db"));
    if finder == Finder::Operator {
        let config = edge.config.display().to_string();
        let (code, out) = edge_cli(&["outbox", "check", "--config", &config]);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("DAMAGED"), "{out}");
        let (code, out) = edge_cli(&["outbox", "recover", "--config", &config]);
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains("records lost") && out.contains("(kept)"),
            "{out}"
        );
        let (code, out) = edge_cli(&["outbox", "check", "--config", &config]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains(": ok"), "{out}");
        let (code, out) = edge_cli(&["outbox", "recover", "--config", &config]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("nothing to salvage"), "{out}");
    }

    edge.daemon.restart().unwrap();
    site.cloud.daemon.restart().unwrap();
    edge.wait_for(Duration::from_secs(60), "alarm outbox_damaged", |s| {
        alarm_kinds(s).iter().any(|k| k == "outbox_damaged")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", site.logs(&edge)));
    let st = status(&edge);
    let lost = lost_in_alarm(&st).unwrap_or_else(|| panic!("no count in the alarm: {st}"));
    assert!(
        lost > 0 && lost < 1_000,
        "two pages hold tens of readings: {lost}"
    );
    let later = readings(0..1, 10_000..10_100);
    publish(site.mosquitto.port(), QoS::AtLeastOnce, &later);
    let ok = process::wait_until(Duration::from_secs(60), || {
        oracle::read_store(&site.cloud.store).is_ok_and(|r| r.len() as u64 >= 20_100 - lost)
    });
    std::thread::sleep(Duration::from_millis(800));
    let records = oracle::read_store(&site.cloud.store).unwrap_or_default();
    let mut expected = ids_of(&first);
    expected.extend(ids_of(&later));
    let v = oracle::judge(&records, &expected);
    assert!(
        ok && v.duplicated.is_empty() && v.unexpected.is_empty(),
        "{}\n{}",
        v.summary(),
        site.logs(&edge)
    );
    assert_eq!(
        v.lost.len(),
        lost as usize,
        "exactly the readings the alarm counts are missing: {}",
        v.summary()
    );
    let later_ids = ids_of(&later);
    assert!(
        v.lost.iter().all(|id| !later_ids.contains(id)),
        "readings published after the salvage all arrive: {}",
        v.summary()
    );
    let log = edge.daemon.log_text();
    assert_eq!(
        log.contains("Outbox salvaged"),
        finder != Finder::Operator,
        "{}",
        site.logs(&edge)
    );
    if finder == Finder::Uplink {
        assert!(
            log.contains("Restarting to salvage the damaged outbox"),
            "{}",
            site.logs(&edge)
        );
    }
    eprintln!(
        "damaged outbox (found by {finder:?}): {lost} readings lost of 20000, the rest stored once"
    );
}

#[test]
fn a_damaged_outbox_found_at_start_is_salvaged_and_only_the_damaged_readings_are_lost() {
    a_damaged_outbox_is_salvaged("gw-id-damaged-start", Finder::Start);
}

#[test]
fn a_damaged_outbox_met_while_running_restarts_the_daemon_which_salvages_it() {
    a_damaged_outbox_is_salvaged("gw-id-damaged-run", Finder::Uplink);
}

#[test]
fn a_damaged_outbox_is_checked_and_salvaged_by_hand_with_the_daemon_stopped() {
    a_damaged_outbox_is_salvaged("gw-id-damaged-hand", Finder::Operator);
}
