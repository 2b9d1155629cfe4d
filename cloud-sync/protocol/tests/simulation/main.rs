//! Deterministic simulation of replication (ARCHITECTURE.md I-8, I-10,
//! I-14, I-18): the real client and server sessions, the real codecs and
//! the real dialer over a simulated link with delay, loss, cuts, UDP
//! blocking, dropped connections, restarts of either end with their durable
//! state kept, a store that fails or stalls, an aggregator that refuses the
//! node for minutes and connections killed before any ack — all driven by a
//! seed. After every run: the aggregator holds exactly the records the
//! outbox accepted, per stream in order, once, and the outbox is empty; and
//! within any minute without progress the edge opened at most
//! `MAX_SESSIONS_PER_MINUTE` sessions and met at most
//! `MAX_REFUSALS_PER_MINUTE` refusals (I-18).
//!
//! - `SIM_SEEDS=N` (default 1500 per shard, 4 shards) sets how many seeds
//!   run; `SIM_SEEDS=100000` for a long local run.
//! - A failure prints its seed and a shrunk scenario. Replay one with
//!   `SIM_SEED=<seed> cargo test -p fogline-protocol --test simulation replay -- --nocapture`.
//! - Shrunk failures are committed in `regressions.json` and replayed by
//!   `committed_regressions`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod scenario;
mod world;

use scenario::Scenario;

fn seeds_per_shard() -> u64 {
    std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

/// Shrinks a failing scenario: keeps any smaller variant that still fails.
fn shrink(mut s: Scenario) -> (Scenario, String) {
    let mut err = world::run(&s).err().unwrap_or_default();
    'outer: for _ in 0..200 {
        for candidate in s.shrink_candidates() {
            if let Err(e) = world::run(&candidate) {
                s = candidate;
                err = e;
                continue 'outer;
            }
        }
        break;
    }
    (s, err)
}

fn run_shard(shard: u64) {
    let n = seeds_per_shard();
    let mut failures = Vec::new();
    for i in 0..n {
        let seed = shard * 1_000_000_007 + i;
        let scenario = Scenario::from_seed(seed);
        if let Err(e) = world::run(&scenario) {
            let (small, small_err) = shrink(scenario);
            failures.push(format!(
                "SIM_SEED={seed} failed: {e}\n  shrunk: {small_err}\n  scenario (add to regressions.json): {}",
                serde_json::to_string(&small).unwrap()
            ));
            if failures.len() >= 3 {
                break;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} simulation failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn seeds_shard_0() {
    run_shard(0);
}

#[test]
fn seeds_shard_1() {
    run_shard(1);
}

#[test]
fn seeds_shard_2() {
    run_shard(2);
}

#[test]
fn seeds_shard_3() {
    run_shard(3);
}

#[test]
fn committed_regressions() {
    let text = include_str!("regressions.json");
    let cases: Vec<Scenario> = serde_json::from_str(text).unwrap();
    for case in cases {
        if let Err(e) = world::run(&case) {
            panic!(
                "regression {} failed again: {e}",
                serde_json::to_string(&case).unwrap()
            );
        }
    }
}

/// The I-18 oracle bites: an edge that reconnects every second with no
/// progress fails it, one whose sessions progress in between passes.
#[test]
fn the_reconnect_bound_catches_an_edge_that_spins() {
    let spinning = world::Reconnects {
        dial_sessions: (0..30).map(|i| i * 1_000).collect(),
        ..Default::default()
    };
    let err = spinning.check().unwrap_err();
    assert!(err.contains("I-18"), "{err}");
    let productive = world::Reconnects {
        resets: (0..30).map(|i| i * 1_000 + 500).collect(),
        ..spinning.clone()
    };
    productive.check().unwrap();
    let refused = world::Reconnects {
        refusals: (0..10).map(|i| i * 5_000).collect(),
        ..Default::default()
    };
    assert!(refused.check().is_err());
}

/// `SIM_SEED=n`: runs that one seed and prints what happened.
#[test]
fn replay() {
    let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|v| v.parse().ok()) else {
        return;
    };
    let s = Scenario::from_seed(seed);
    println!("{}", serde_json::to_string_pretty(&s).unwrap());
    match world::run(&s) {
        Ok(stats) => println!("ok: {stats:?}"),
        Err(e) => panic!("SIM_SEED={seed}: {e}"),
    }
}

/// The faults are not decoration: over a fixed set of seeds, sessions are
/// really lost and re-established, probes win, TCP is used and the store
/// fails — and every run still ends exact.
#[test]
fn the_faults_really_happen() {
    let mut total = world::RunStats::default();
    // The most sessions one run opened within a minute with no progress:
    // the backoff of I-18 is really exercised, not only its calm case.
    let mut busiest = 0;
    for seed in 0..300 {
        let stats = world::run(&Scenario::from_seed(seed)).unwrap();
        total.sessions += stats.sessions;
        total.probes_won += stats.probes_won;
        total.resets += stats.resets;
        total.tcp_sessions += stats.tcp_sessions;
        total.store_failures += stats.store_failures;
        total.refused_sessions += stats.refused_sessions;
        total.refused_handshakes += stats.refused_handshakes;
        total.flapped_sessions += stats.flapped_sessions;
        total.lost += stats.lost;
        busiest = busiest.max(stats.log.busiest_sessions());
        for (k, v) in stats.closes {
            *total.closes.entry(k).or_default() += v;
        }
    }
    println!("{total:?}");
    assert!(total.sessions > 600, "{total:?}");
    assert!(total.probes_won > 0, "{total:?}");
    assert!(total.resets > 0, "{total:?}");
    assert!(total.tcp_sessions > 0, "{total:?}");
    assert!(total.store_failures > 0, "{total:?}");
    assert!(total.refused_sessions > 0, "{total:?}");
    assert!(total.refused_handshakes > 0, "{total:?}");
    assert!(total.flapped_sessions > 0, "{total:?}");
    // I-33: quotas really drop (and the oracle counts what they dropped).
    assert!(total.lost > 0, "{total:?}");
    assert!(
        busiest >= world::MAX_SESSIONS_PER_MINUTE / 2,
        "no failure state ran long enough to test the backoff (busiest minute {busiest})"
    );
    for reason in ["silent", "stalled", "closed_by_aggregator"] {
        assert!(
            total.closes.get(reason).copied().unwrap_or(0) > 0,
            "no {reason}: {total:?}"
        );
    }
}
