//! Wall-clock time, for edge and aggregator. Gateways often have no RTC:
//! timestamps are what the clock says, never used for ordering (sequence
//! numbers are).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 if the clock is before 1970.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
