//! Loss reports: what an edge dropped, and why, carried to the aggregator
//! *as records* on the reserved stream [`LOSS_STREAM`].
//!
//! A report gets a sequence number in the same outbox transaction as the
//! drop it describes, so it rides the ordered stream and is applied exactly
//! once, like the data (no second channel that could lose or repeat it).
//! The aggregator files it apart from the data. Stream names under
//! [`RESERVED_PREFIX`] are refused from sensors and functions (MQTT
//! reserves `$` topics for the server), so a report cannot be forged.
//!
//! The payload is JSON: small, self-describing, readable by an old
//! aggregator that would store it as an ordinary record.

use serde::{Deserialize, Serialize};

/// Streams under this prefix are the protocol's own.
pub const RESERVED_PREFIX: &str = "$fogline/";

/// The stream loss reports travel on.
pub const LOSS_STREAM: &str = "$fogline/loss";

/// Longest loss report payload accepted (a report is a few hundred bytes).
pub const MAX_LOSS_REPORT_BYTES: usize = 8 * 1024;

/// Whether `stream` is reserved for the protocol.
pub fn is_reserved(stream: &str) -> bool {
    stream.starts_with(RESERVED_PREFIX)
}

/// Why records did not reach the aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossReason {
    /// The outbox (or its pipeline's share) was full and `drop_oldest`
    /// made room for newer data.
    Quota,
    /// Buffered longer than `max_age`.
    MaxAge,
    /// Matched no pipeline, and the unrouted policy is `drop`.
    Unrouted,
    /// A dead letter removed by the dead-letter retention bound.
    DeadLetterPruned,
    /// Unreadable in a damaged outbox file.
    Corrupt,
    /// Not lost: kept on the gateway as a dead letter (a function or
    /// ingest refused it); `detail` says why. It may be replayed.
    DeadLettered,
    /// Dead letters replayed: what they produced was sent as data.
    Replayed,
}

impl LossReason {
    /// A short, stable name (`quota`, `max_age`...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quota => "quota",
            Self::MaxAge => "max_age",
            Self::Unrouted => "unrouted",
            Self::DeadLetterPruned => "dead_letter_pruned",
            Self::Corrupt => "corrupt",
            Self::DeadLettered => "dead_lettered",
            Self::Replayed => "replayed",
        }
    }

    /// Whether the records are gone for good (dead letters are kept on the
    /// gateway; replays undo them).
    pub fn is_loss(self) -> bool {
        !matches!(self, Self::DeadLettered | Self::Replayed)
    }
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one drop removed from one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossReport {
    /// The stream the records belonged to (for a damaged file whose rows
    /// are unreadable: `*`).
    pub stream: String,
    /// Why.
    pub reason: LossReason,
    /// More about why (a dead letter's reason, the quota that was full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// How many records (or messages, before they had a sequence number).
    pub records: u64,
    /// Their payload and stream-name bytes.
    pub bytes: u64,
    /// The outbox sequence numbers they had, first and last (none for what
    /// never entered the outbox: unrouted messages, dead letters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
    /// See `first_seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// Their earliest timestamp (ms since the Unix epoch).
    pub first_ms: u64,
    /// Their latest timestamp.
    pub last_ms: u64,
}

/// A loss report could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LossDecodeError {
    /// Larger than [`MAX_LOSS_REPORT_BYTES`].
    #[error("loss report is {len} bytes, limit is {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not the JSON of a [`LossReport`].
    #[error("loss report is not valid: {0}")]
    Invalid(#[from] serde_json::Error),
}

impl LossReport {
    /// The payload of its record.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and integers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a report from a record's payload.
    pub fn decode(payload: &[u8]) -> Result<Self, LossDecodeError> {
        if payload.len() > MAX_LOSS_REPORT_BYTES {
            return Err(LossDecodeError::TooLarge {
                len: payload.len(),
                max: MAX_LOSS_REPORT_BYTES,
            });
        }
        Ok(serde_json::from_slice(payload)?)
    }

    /// Folds `other` (same stream and reason) into this one.
    pub fn absorb(&mut self, other: &LossReport) {
        self.records += other.records;
        self.bytes += other.bytes;
        self.first_seq = min_opt(self.first_seq, other.first_seq);
        self.last_seq = self.last_seq.max(other.last_seq);
        self.first_ms = self.first_ms.min(other.first_ms);
        self.last_ms = self.last_ms.max(other.last_ms);
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_report_round_trips_and_oversized_ones_are_refused() {
        let r = LossReport {
            stream: "sensors/t1".into(),
            reason: LossReason::Quota,
            detail: Some("outbox.max_bytes".into()),
            records: 3,
            bytes: 120,
            first_seq: Some(10),
            last_seq: Some(14),
            first_ms: 1,
            last_ms: 2,
        };
        assert_eq!(LossReport::decode(&r.encode()).unwrap(), r);
        let text = String::from_utf8(r.encode()).unwrap();
        assert!(text.contains(r#""reason":"quota""#), "{text}");
        assert!(LossReport::decode(&vec![b' '; MAX_LOSS_REPORT_BYTES + 1]).is_err());
        assert!(LossReport::decode(b"{}").is_err());
    }

    #[test]
    fn absorbing_widens_ranges_and_adds_counts() {
        let mut a = LossReport {
            stream: "s".into(),
            reason: LossReason::MaxAge,
            detail: None,
            records: 1,
            bytes: 10,
            first_seq: Some(5),
            last_seq: Some(5),
            first_ms: 50,
            last_ms: 50,
        };
        let b = LossReport {
            records: 2,
            bytes: 20,
            first_seq: Some(2),
            last_seq: Some(9),
            first_ms: 20,
            last_ms: 90,
            ..a.clone()
        };
        a.absorb(&b);
        assert_eq!((a.records, a.bytes), (3, 30));
        assert_eq!((a.first_seq, a.last_seq), (Some(2), Some(9)));
        assert_eq!((a.first_ms, a.last_ms), (20, 90));
        assert!(LossReason::Quota.is_loss() && !LossReason::DeadLettered.is_loss());
    }
}
