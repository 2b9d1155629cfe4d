//! A large outbox backlog, written through the edge's own outbox code
//! (`fogline_edge::outbox::Outbox::commit`) in large commits: the records
//! carry their pipeline's lane, and `lane_usage`, `seq_marks` and
//! `meta.next_seq` are kept exactly as the daemon keeps them — only the
//! commits are larger than a daemon's, so ten million records take seconds.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use fogline_edge::config::SyncMode;
use fogline_edge::message::Message;
use fogline_edge::outbox::{Commit, Outbox};

/// Records per commit while filling: large enough that the per-commit cost
/// (room check, usage rows, fsync) vanishes, small enough to stay a few MB.
const FILL_COMMIT: u64 = 50_000;

/// The stream of backlog record `n` (10 streams).
pub fn stream(n: u64) -> String {
    format!("backlog/s{}", n % 10)
}

/// The payload of backlog record `n`: small JSON with its number, so a
/// drained prefix can be checked row by row (`n` = seq − 1 in a fresh
/// outbox).
pub fn payload(n: u64) -> Vec<u8> {
    format!(r#"{{"id":"b{n}","n":{n},"v":{}.{}}}"#, 10 + n % 30, n % 10).into_bytes()
}

/// The `n` a backlog payload carries, if it is one.
pub fn number_of(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    let rest = text.strip_prefix(r#"{"id":"b"#)?;
    rest[..rest.find('"')?].parse().ok()
}

/// What [`fill`] wrote.
#[derive(Debug, Clone, Copy)]
pub struct Filled {
    /// Records written.
    pub records: u64,
    /// Time taken.
    pub took: Duration,
    /// Size of the outbox file afterwards (the write-ahead log checkpointed).
    pub file_bytes: u64,
}

/// Writes `records` backlog records into the outbox at `path` (created if
/// missing) in pipeline `pipeline`'s lane, through [`Outbox::commit`].
/// `sync = normal`: a power cut mid-fill does not matter to a test, and the
/// file is the same.
pub fn fill(path: &Path, pipeline: &str, records: u64) -> anyhow::Result<Filled> {
    let started = Instant::now();
    let mut outbox = Outbox::open(path, SyncMode::Normal)
        .with_context(|| format!("opening {}", path.display()))?;
    let lane = outbox.lane(pipeline)?;
    let mut n = 0u64;
    while n < records {
        let count = (records - n).min(FILL_COMMIT);
        // The node clock, as the worker stamps a batch.
        let now = fogline_telemetry::clock::now_ms();
        let batch: Vec<Message> = (n..n + count)
            .map(|i| Message {
                stream: stream(i),
                timestamp_ms: now,
                payload: payload(i),
            })
            .collect();
        let done = outbox
            .commit(&Commit {
                records: batch,
                lanes: vec![(lane, count as usize)],
                clock_ms: now,
                ..Commit::default()
            })
            .with_context(|| format!("committing records {n}.. of {records}"))?;
        anyhow::ensure!(
            done.first_seq == n + 1 && done.records as u64 == count,
            "the outbox numbered records {n}.. from {} ({} records): was it empty?",
            done.first_seq,
            done.records
        );
        n += count;
    }
    drop(outbox);
    let file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    Ok(Filled {
        records,
        took: started.elapsed(),
        file_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_payload_gives_its_number_back() {
        assert_eq!(number_of(&payload(0)), Some(0));
        assert_eq!(number_of(&payload(9_999_999)), Some(9_999_999));
        assert_eq!(number_of(br#"{"id":"s1-0000001"}"#), None);
    }
}
