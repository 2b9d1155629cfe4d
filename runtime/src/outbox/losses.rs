//! Loss accounting in the outbox (I-33): every drop is written, in the
//! transaction that drops, as a record on the reserved stream
//! [`fogline_protocol::LOSS_STREAM`] — numbered like the data, so the
//! aggregator applies it exactly once — and added to the local totals that
//! `fogline-edge status` shows.

use std::collections::BTreeMap;

use fogline_protocol::{LossReason, LossReport, LOSS_STREAM};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::retention::{add_usage, REPORT_LANE};

/// Most reports one commit writes per reason; the rest of its streams are
/// folded into one report on stream `*` (a flood of distinct topics must
/// not turn into a flood of reports).
const MAX_REPORTS_PER_REASON: usize = 64;

/// Most (stream, reason) rows the local totals keep; further streams are
/// added up under `*`.
const MAX_TOTALS: i64 = 10_000;

/// The stream name losses of many streams are folded into.
pub const MANY_STREAMS: &str = "*";

/// What the outbox lost (or dead-lettered) on one stream for one reason,
/// since it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossTotal {
    /// The stream.
    pub stream: String,
    /// Why.
    pub reason: LossReason,
    /// Records (or messages).
    pub records: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Sequence range, where they had numbers.
    pub first_seq: Option<u64>,
    /// See `first_seq`.
    pub last_seq: Option<u64>,
    /// Time range of the records.
    pub first_ms: u64,
    /// See `first_ms`.
    pub last_ms: u64,
}

/// At most [`MAX_REPORTS_PER_REASON`] reports per reason.
pub fn compact(reports: Vec<LossReport>) -> Vec<LossReport> {
    let mut by_reason: BTreeMap<LossReason, Vec<LossReport>> = BTreeMap::new();
    for r in reports {
        by_reason.entry(r.reason).or_default().push(r);
    }
    let mut out = Vec::new();
    for (_, mut list) in by_reason {
        if list.len() > MAX_REPORTS_PER_REASON {
            let rest = list.split_off(MAX_REPORTS_PER_REASON - 1);
            let streams = rest.len();
            let mut folded = rest[0].clone();
            folded.stream = MANY_STREAMS.into();
            for r in &rest[1..] {
                folded.absorb(r);
            }
            folded.detail = Some(format!(
                "{streams} more streams{}",
                folded
                    .detail
                    .as_deref()
                    .map(|d| format!("; {d}"))
                    .unwrap_or_default()
            ));
            list.push(folded);
        }
        out.extend(list);
    }
    out
}

/// Writes `reports` as records numbered from `first_seq` (stamped
/// `now_ms`) and adds them to the totals. Returns how many it numbered.
pub fn write(
    conn: &Connection,
    reports: &[LossReport],
    first_seq: u64,
    now_ms: u64,
) -> rusqlite::Result<u64> {
    let mut bytes = 0i64;
    for (i, r) in reports.iter().enumerate() {
        let payload = r.encode();
        bytes += (payload.len() + LOSS_STREAM.len()) as i64;
        conn.prepare_cached(
            "INSERT INTO records (seq, stream, timestamp_ms, payload, lane) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            (first_seq + i as u64) as i64,
            LOSS_STREAM,
            now_ms as i64,
            payload,
            REPORT_LANE
        ])?;
        add_total(conn, r)?;
    }
    add_usage(conn, REPORT_LANE, reports.len() as i64, bytes)?;
    Ok(reports.len() as u64)
}

/// Records lost or dead-lettered, by reason (also the salvage's).
pub const LOSSES_TOTAL: &str = "fogline_outbox_records_lost_total";

fn add_total(conn: &Connection, r: &LossReport) -> rusqlite::Result<()> {
    let reason = r.reason.as_str();
    let exists = |stream: &str| -> rusqlite::Result<bool> {
        conn.prepare_cached("SELECT 1 FROM losses WHERE stream = ?1 AND reason = ?2")?
            .query_row(params![stream, reason], |_| Ok(()))
            .optional()
            .map(|o| o.is_some())
    };
    let mut stream = r.stream.as_str();
    if !exists(stream)? {
        let rows: i64 = conn.query_row("SELECT COUNT(*) FROM losses", [], |r| r.get(0))?;
        if rows >= MAX_TOTALS {
            stream = MANY_STREAMS;
        }
    }
    conn.prepare_cached(
        "INSERT INTO losses (stream, reason, records, bytes, first_seq, last_seq, first_ms, last_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
         ON CONFLICT(stream, reason) DO UPDATE SET records = records + excluded.records, \
         bytes = bytes + excluded.bytes, \
         first_seq = COALESCE(MIN(first_seq, excluded.first_seq), first_seq, excluded.first_seq), \
         last_seq = COALESCE(MAX(last_seq, excluded.last_seq), last_seq, excluded.last_seq), \
         first_ms = MIN(first_ms, excluded.first_ms), last_ms = MAX(last_ms, excluded.last_ms)",
    )?
    .execute(params![
        stream,
        reason,
        r.records as i64,
        r.bytes as i64,
        r.first_seq.map(|v| v as i64),
        r.last_seq.map(|v| v as i64),
        r.first_ms as i64,
        r.last_ms as i64
    ])
    .map(drop)
}

/// The totals, largest first.
pub fn totals(conn: &Connection) -> rusqlite::Result<Vec<LossTotal>> {
    conn.prepare_cached(
        "SELECT stream, reason, records, bytes, first_seq, last_seq, first_ms, last_ms FROM losses \
         ORDER BY records DESC, stream, reason LIMIT 1000",
    )?
    .query_map([], |r| {
        let reason: String = r.get(1)?;
        Ok(LossTotal {
            stream: r.get(0)?,
            reason: serde_json::from_value(serde_json::Value::String(reason))
                .unwrap_or(LossReason::Corrupt),
            records: r.get::<_, i64>(2)?.max(0) as u64,
            bytes: r.get::<_, i64>(3)?.max(0) as u64,
            first_seq: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
            last_seq: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
            first_ms: r.get::<_, i64>(6)?.max(0) as u64,
            last_ms: r.get::<_, i64>(7)?.max(0) as u64,
        })
    })?
    .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn report(stream: &str) -> LossReport {
        LossReport {
            stream: stream.into(),
            reason: LossReason::Unrouted,
            detail: None,
            records: 1,
            bytes: 3,
            first_seq: None,
            last_seq: None,
            first_ms: 1,
            last_ms: 1,
        }
    }

    #[test]
    fn many_streams_fold_into_one_report() {
        let reports: Vec<_> = (0..200).map(|i| report(&format!("t/{i}"))).collect();
        let out = compact(reports);
        assert_eq!(out.len(), MAX_REPORTS_PER_REASON);
        assert_eq!(
            out.iter().map(|r| r.records).sum::<u64>(),
            200,
            "nothing uncounted"
        );
        let folded = out.last().unwrap();
        assert_eq!(folded.stream, MANY_STREAMS);
        assert!(folded
            .detail
            .as_deref()
            .unwrap()
            .starts_with("137 more streams"));
    }
}
