//! Time on the edge. Gateways often have no RTC: the wall clock may start far
//! behind and be stepped (forward by NTP, or back when a wrong clock is
//! corrected). Ordering never depends on it (sequence numbers do), but
//! timestamps and windows do, so ingest uses the *node clock*: the wall clock,
//! never going backwards on a node. When the wall clock steps back, the node
//! clock holds at its high-water mark until the wall clock catches up; the
//! step is logged and counted. The high-water mark is committed with every
//! batch, so it holds across restarts too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub use fogline_telemetry::clock::now_ms;

/// Clock steps backwards seen (each episode once).
pub const CLOCK_STEPS_TOTAL: &str = "fogline_clock_steps_back_total";

/// A step back smaller than this is jitter, not worth a log line.
const STEP_TOLERANCE_MS: u64 = 1_000;

static LAST: AtomicU64 = AtomicU64::new(0);
static STEPPED: AtomicBool = AtomicBool::new(false);

/// Start the node clock no earlier than `high_water_ms` (from the outbox).
pub fn init(high_water_ms: u64) {
    LAST.fetch_max(high_water_ms, Ordering::AcqRel);
    // The aggregator's certificate is checked no earlier than this either.
    fogline_transport::tls::raise_clock_floor(high_water_ms);
    metrics::describe_counter!(
        CLOCK_STEPS_TOTAL,
        "Times the wall clock went backwards; ingest timestamps held until it caught up."
    );
}

/// The node clock: milliseconds since the Unix epoch, never going backwards.
pub fn ingest_ms() -> u64 {
    node_ms(now_ms())
}

/// The node clock given a wall-clock reading (for tests of the rule).
pub fn node_ms(wall: u64) -> u64 {
    let mut last = LAST.load(Ordering::Acquire);
    loop {
        if wall >= last {
            match LAST.compare_exchange_weak(last, wall, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    if STEPPED.swap(false, Ordering::AcqRel) {
                        tracing::info!(
                            now_ms = wall,
                            "The wall clock caught up; ingest timestamps follow it again."
                        );
                    }
                    return wall;
                }
                Err(seen) => last = seen,
            }
        } else {
            if last - wall > STEP_TOLERANCE_MS && !STEPPED.swap(true, Ordering::AcqRel) {
                metrics::counter!(CLOCK_STEPS_TOTAL).increment(1);
                tracing::warn!(
                    wall_ms = wall,
                    held_at_ms = last,
                    behind_ms = last - wall,
                    "The wall clock went back; ingest timestamps are held at the latest one given until it catches up."
                );
            }
            return last;
        }
    }
}

/// The latest time the node clock gave out (committed as its high-water mark).
pub fn high_water_ms() -> u64 {
    LAST.load(Ordering::Acquire)
}

/// How far the wall clock is behind the latest time this node has seen
/// (0 when it is not): a clock stepped back, or a boot without RTC.
pub fn behind_ms() -> u64 {
    high_water_ms().saturating_sub(now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ARCHITECTURE.md I-27.
    #[test]
    fn the_node_clock_never_goes_back() {
        // Ahead of anything this process read from the real clock.
        let base = now_ms() + 10_000_000;
        init(base + 5_000);
        assert_eq!(
            node_ms(base + 4_000),
            base + 5_000,
            "held at the high-water mark"
        );
        assert_eq!(node_ms(base + 6_000), base + 6_000);
        assert_eq!(node_ms(base + 1_000), base + 6_000, "a step back is held");
        assert_eq!(
            node_ms(base + 6_500),
            base + 6_500,
            "and followed again once caught up"
        );
        assert!(high_water_ms() >= base + 6_500);
    }
}
