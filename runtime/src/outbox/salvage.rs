//! A damaged outbox: found by a time-bounded integrity check (at start,
//! `fogline-edge outbox check`), and salvaged (`fogline-edge outbox
//! recover`, or by the daemon at start) into a new file — every row that
//! can still be read, in order; what cannot is reported as a loss, with its
//! sequence numbers. The file keeps its incarnation while its numbering can
//! be read (so nothing the aggregator holds is sent again); otherwise it
//! takes a new one. The damaged file is kept aside for a post-mortem.
//!
//! Rows are read by rowid ranges, halved around whatever fails: a damaged
//! page costs the rows on it, not the rows after it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags};

use super::{open_connection, OutboxError};
use crate::config::SyncMode;

/// Raised when a read or write of the outbox meets a damaged page: the
/// writer then refuses to commit (nothing more is acknowledged into a file
/// that cannot be replicated) and the daemon restarts itself to salvage it.
#[derive(Debug, Clone, Default)]
pub struct DamageFlag {
    inner: Arc<DamageInner>,
}

#[derive(Debug, Default)]
struct DamageInner {
    raised: AtomicBool,
    detail: Mutex<Option<(u64, String)>>,
    notify: tokio::sync::Notify,
}

impl DamageFlag {
    /// Damage was found: `detail` says where.
    pub fn raise(&self, detail: &str) {
        if let Ok(mut d) = self.inner.detail.lock() {
            d.get_or_insert_with(|| (crate::clock::now_ms(), detail.to_string()));
        }
        if !self.inner.raised.swap(true, Ordering::AcqRel) {
            tracing::error!(detail, "The outbox is damaged: nothing more is acknowledged into it; it is salvaged into a new file at the next start.");
        }
        self.inner.notify.notify_waiters();
    }

    /// Whether damage was found.
    pub fn is_raised(&self) -> bool {
        self.inner.raised.load(Ordering::Acquire)
    }

    /// When and where, if damage was found.
    pub fn detail(&self) -> Option<(u64, String)> {
        self.inner.detail.lock().ok().and_then(|d| d.clone())
    }

    /// Resolves once damage is found.
    pub async fn raised(&self) {
        loop {
            let notified = self.inner.notify.notified();
            if self.is_raised() {
                return;
            }
            notified.await;
        }
    }
}

pub use fogline_integrity::{is_damage, Integrity};

/// Checks `path` (`PRAGMA quick_check`), giving up after `budget`.
pub fn check(path: &Path, budget: Duration) -> Result<Integrity, OutboxError> {
    let err = |source| OutboxError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = match Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) {
        Ok(c) => c,
        Err(e) if is_damage(&e) => return Ok(Integrity::Damaged(vec![e.to_string()])),
        Err(e) => return Err(err(e)),
    };
    fogline_integrity::quick_check(&conn, budget).map_err(err)
}

/// What a salvage did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Salvage {
    /// Unacknowledged records copied.
    pub records: u64,
    /// Records that could not be read: inclusive seq ranges.
    pub lost: Vec<(u64, u64)>,
    /// Rows of other tables copied (dead letters, functions' state, MQTT
    /// sessions, held inputs, alarms, versions).
    pub other_rows: u64,
    /// Tables (or parts) that could not be read, in words.
    pub unreadable: Vec<String>,
    /// Where the damaged file was moved.
    pub kept_as: PathBuf,
    /// The new file's incarnation.
    pub incarnation: u64,
    /// Whether it is a new one (the numbering could not be read).
    pub new_incarnation: bool,
}

impl Salvage {
    /// How many records were lost.
    pub fn lost_records(&self) -> u64 {
        self.lost.iter().map(|(a, b)| b - a + 1).sum()
    }

    /// The lost ranges as `1..=5, 9..=9`.
    pub fn lost_ranges(&self) -> String {
        self.lost
            .iter()
            .map(|(a, b)| format!("{a}..={b}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Tables copied besides `records`, and whether they have rowids.
const OTHER_TABLES: &[(&str, bool)] = &[
    ("dead_letters", true),
    ("ingest_sessions", true),
    ("ingest_session_log", true),
    ("alarms", true),
    ("function_versions", true),
    ("function_state", false),
    ("held", true),
    ("lanes", true),
    ("seq_marks", true),
    ("losses", false),
];

/// `meta` keys carried over (the incarnation and epoch are new).
const META_KEPT: &[&str] = &[
    "next_seq",
    "acked_seq",
    "clock_high_water_ms",
    "next_generation",
    "last_sync_ms",
];

/// Copies what can be read of the outbox at `path` into a new file with a
/// new incarnation, moves the damaged one to `<path>.damaged-<unix ms>` and
/// the new one into its place, and records the loss as an alarm in it.
/// The daemon must not be running.
pub fn recover(path: &Path) -> Result<Salvage, OutboxError> {
    let io = |op: &'static str| {
        let path = path.to_path_buf();
        move |e: std::io::Error| OutboxError::Sql {
            path: path.clone(),
            op,
            source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
        }
    };
    let fresh = sibling(path, ".recovering");
    for p in [
        fresh.clone(),
        sibling(&fresh, "-wal"),
        sibling(&fresh, "-shm"),
    ] {
        if p.exists() {
            std::fs::remove_file(&p).map_err(io("remove an earlier attempt"))?;
        }
    }
    let src = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| OutboxError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let dst = open_connection(&fresh, SyncMode::Full, false)?;
    let dst_err = |op: &'static str| {
        let fresh = fresh.clone();
        move |source| OutboxError::Sql {
            path: fresh.clone(),
            op,
            source,
        }
    };
    let mut unreadable = Vec::new();

    // What the file says about itself, key by key: a damaged page of meta
    // must not cost the rest.
    let mut meta = std::collections::BTreeMap::new();
    for key in META_KEPT {
        match src.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
            r.get::<_, i64>(0)
        }) {
            Ok(v) => {
                meta.insert(*key, v);
            }
            Err(rusqlite::Error::QueryReturnedNoRows) => {}
            Err(e) => unreadable.push(format!("meta.{key}: {e}")),
        }
    }

    let tx = dst.unchecked_transaction().map_err(dst_err("begin"))?;
    // Records: every seq after the acknowledged mark up to the last
    // numbered one should be there; whatever is not is lost.
    let acked = meta.get("acked_seq").copied().unwrap_or(0).max(0) as u64;
    let numbered = meta.get("next_seq").copied().map(|n| (n.max(1) - 1) as u64);
    let hi = match numbered {
        Some(n) => n,
        None => {
            // Without meta, as far as the records themselves go.
            let max: Option<i64> = src
                .query_row("SELECT MAX(seq) FROM records", [], |r| r.get(0))
                .unwrap_or(None);
            max.map_or(acked, |m| m.max(0) as u64)
        }
    };
    let mut copied_seqs = Vec::new();
    // Lanes (I-32) where the file has them.
    let has_lane = src
        .prepare("SELECT 1 FROM pragma_table_info('records') WHERE name = 'lane'")
        .and_then(|mut st| st.exists([]))
        .unwrap_or(false);
    let (columns, insert_sql) = if has_lane {
        (
            "seq, stream, timestamp_ms, payload, lane",
            "INSERT INTO records (seq, stream, timestamp_ms, payload, lane) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
    } else {
        (
            "seq, stream, timestamp_ms, payload",
            "INSERT INTO records (seq, stream, timestamp_ms, payload) VALUES (?1, ?2, ?3, ?4)",
        )
    };
    let mut insert_records = |rows: Vec<Vec<Value>>| -> Result<(), OutboxError> {
        let mut st = tx
            .prepare_cached(insert_sql)
            .map_err(dst_err("copy records"))?;
        for row in rows {
            if let Some(Value::Integer(seq)) = row.first() {
                copied_seqs.push(*seq as u64);
            }
            st.execute(rusqlite::params_from_iter(row))
                .map_err(dst_err("copy records"))?;
        }
        Ok(())
    };
    if hi > acked {
        let mut bad = Vec::new();
        copy_range(
            &src,
            "records",
            columns,
            (acked + 1) as i64,
            hi as i64,
            &mut insert_records,
            &mut bad,
        )?;
        if !bad.is_empty() {
            unreadable.push(format!("records: {} unreadable rows", bad.len()));
        }
    }
    copied_seqs.sort_unstable();
    let lost = missing_ranges(acked + 1, hi, &copied_seqs);

    let mut other_rows = 0u64;
    for (table, rowid) in OTHER_TABLES {
        // A file from an older version may not have every table.
        let absent = src
            .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")
            .and_then(|mut st| st.exists([table]))
            .is_ok_and(|exists| !exists);
        if absent {
            continue;
        }
        let cols: Vec<String> = tx
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
            .and_then(|mut st| {
                st.query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(dst_err("read the schema"))?;
        let list = cols.join(", ");
        let marks = (1..=cols.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!("INSERT OR REPLACE INTO {table} ({list}) VALUES ({marks})");
        let mut insert = |rows: Vec<Vec<Value>>| -> Result<(), OutboxError> {
            let mut st = tx.prepare_cached(&sql).map_err(dst_err("copy rows"))?;
            for row in rows {
                st.execute(rusqlite::params_from_iter(row))
                    .map_err(dst_err("copy rows"))?;
                other_rows += 1;
            }
            Ok(())
        };
        if *rowid {
            let mut bad = Vec::new();
            let range: Result<(Option<i64>, Option<i64>), _> = src.query_row(
                &format!("SELECT MIN(rowid), MAX(rowid) FROM {table}"),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            );
            let (lo, hi) = match range {
                Ok((Some(lo), Some(hi))) => (lo, hi),
                Ok(_) => continue,
                Err(e) if is_damage(&e) => (1, i64::from(i32::MAX)),
                Err(e) => {
                    unreadable.push(format!("{table}: {e}"));
                    continue;
                }
            };
            copy_range(&src, table, &list, lo, hi, &mut insert, &mut bad)?;
            if !bad.is_empty() {
                unreadable.push(format!("{table}: {} unreadable rows", bad.len()));
            }
        } else {
            let rows = src
                .prepare(&format!("SELECT {list} FROM {table}"))
                .and_then(|mut st| read_rows(&mut st, cols.len(), ()));
            match rows {
                Ok(rows) => insert(rows)?,
                Err(e) => unreadable.push(format!("{table}: {e} (not copied)")),
            }
        }
    }
    for (key, value) in &meta {
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
            rusqlite::params![key, value],
        )
        .map_err(dst_err("copy meta"))?;
    }
    // Numbering goes on above everything the old file numbered.
    let mut next = hi.max(copied_seqs.last().copied().unwrap_or(0)) + 1;
    // What is lost is reported to the aggregator like any loss (I-33): one
    // record, numbered above everything, with the sequence range.
    let lost_count: u64 = lost.iter().map(|(a, b)| b - a + 1).sum();
    if lost_count > 0 {
        let now = crate::clock::now_ms();
        let mut ranges: String = lost
            .iter()
            .map(|(a, b)| format!("{a}..={b}"))
            .collect::<Vec<_>>()
            .join(", ");
        if ranges.len() > 1000 {
            ranges = format!("{}…", crate::functions::truncate(&ranges, 1000));
        }
        let report = fogline_protocol::LossReport {
            stream: super::losses::MANY_STREAMS.into(),
            reason: fogline_protocol::LossReason::Corrupt,
            detail: Some(format!("unreadable in a damaged outbox: seq {ranges}")),
            records: lost_count,
            bytes: 0,
            first_seq: lost.first().map(|r| r.0),
            last_seq: lost.last().map(|r| r.1),
            first_ms: now,
            last_ms: now,
        };
        super::losses::write(&tx, &[report], next, now).map_err(dst_err("record the loss"))?;
        next += 1;
    }
    tx.execute(
        "UPDATE meta SET value = MAX(value, ?1) WHERE key = 'next_seq'",
        [next as i64],
    )
    .map_err(dst_err("copy meta"))?;
    super::retention::rebuild_usage(&tx).map_err(dst_err("count lane usage"))?;
    // The same incarnation while the numbering is known: the aggregator's
    // cursor then deletes what it already holds and nothing arrives twice;
    // lost records are a gap in the numbering. Without a readable
    // `next_seq`, numbers given out before may be reused: a new
    // incarnation, so its records are renumbered above the cursor.
    let old_incarnation: Option<i64> = src
        .query_row(
            "SELECT value FROM meta WHERE key = 'incarnation'",
            [],
            |r| r.get(0),
        )
        .ok();
    let keep = numbered.is_some() && old_incarnation.is_some();
    match old_incarnation.filter(|_| keep) {
        Some(i) => tx.execute("UPDATE meta SET value = ?1 WHERE key = 'incarnation'", [i]),
        None => {
            unreadable.push("the numbering (meta.next_seq): a new incarnation".into());
            tx.execute(
                "UPDATE meta SET value = random() WHERE key = 'incarnation'",
                [],
            )
        }
    }
    .map_err(dst_err("incarnation"))?;
    let incarnation: i64 = tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'incarnation'",
            [],
            |r| r.get(0),
        )
        .map_err(dst_err("new incarnation"))?;
    let now = crate::clock::now_ms();
    let kept_as = sibling(path, &format!(".damaged-{now}"));
    let mut report = Salvage {
        records: copied_seqs.len() as u64,
        lost,
        other_rows,
        unreadable,
        kept_as: kept_as.clone(),
        incarnation: incarnation as u64,
        new_incarnation: !keep,
    };
    let detail = format!(
        "the outbox was damaged and salvaged into a new file (incarnation {:#x}{}): {} unacknowledged records kept, {} lost{}{}; the damaged file is {}",
        report.incarnation,
        if report.new_incarnation { ", new" } else { ", kept" },
        report.records,
        report.lost_records(),
        if report.lost.is_empty() {
            String::new()
        } else {
            format!(" (seq {})", report.lost_ranges())
        },
        if report.unreadable.is_empty() {
            String::new()
        } else {
            format!("; unreadable: {}", report.unreadable.join("; "))
        },
        kept_as.display()
    );
    // An alarm is for a loss (or a new numbering the aggregator will see as
    // a gap); a rebuild that lost nothing is logged by the caller only.
    if report.lost_records() > 0 || !report.unreadable.is_empty() || report.new_incarnation {
        tx.execute(
            "INSERT INTO alarms (at_ms, kind, detail) VALUES (?1, 'outbox_damaged', ?2)",
            rusqlite::params![now as i64, detail],
        )
        .map_err(dst_err("record the loss"))?;
    }
    tx.commit().map_err(dst_err("commit"))?;
    drop(src);
    dst.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .map_err(dst_err("checkpoint"))?;
    drop(dst);
    // The damaged file (and its WAL) aside, the new one in its place.
    for suffix in ["", "-wal", "-shm"] {
        let from = sibling(path, suffix);
        if from.exists() {
            std::fs::rename(&from, sibling(&kept_as, suffix))
                .map_err(io("move the damaged file aside"))?;
        }
    }
    for suffix in ["-wal", "-shm"] {
        let p = sibling(&fresh, suffix);
        if p.exists() {
            std::fs::remove_file(&p).map_err(io("tidy the new file"))?;
        }
    }
    std::fs::rename(&fresh, path).map_err(io("put the new file in place"))?;
    report.kept_as = kept_as;
    Ok(report)
}

/// Reads `columns` of `table` with rowids in `lo..=hi` and hands them to
/// `sink`, halving around ranges that fail; single rowids that fail go to
/// `bad`.
fn copy_range(
    src: &Connection,
    table: &str,
    columns: &str,
    lo: i64,
    hi: i64,
    sink: &mut dyn FnMut(Vec<Vec<Value>>) -> Result<(), OutboxError>,
    bad: &mut Vec<i64>,
) -> Result<(), OutboxError> {
    let n = columns.split(',').count();
    let sql = format!("SELECT {columns} FROM {table} WHERE rowid BETWEEN ?1 AND ?2 ORDER BY rowid");
    // A stack, not recursion: a badly damaged file must not blow it.
    let mut todo = vec![(lo, hi)];
    while let Some((a, b)) = todo.pop() {
        if a > b {
            continue;
        }
        let rows = src
            .prepare_cached(&sql)
            .and_then(|mut st| read_rows(&mut st, n, [a, b]));
        match rows {
            Ok(rows) => sink(rows)?,
            Err(_) if a == b => bad.push(a),
            Err(_) => {
                let mid = a + (b - a) / 2;
                // Lower half first (popped first): rows stay in order.
                todo.push((mid + 1, b));
                todo.push((a, mid));
            }
        }
    }
    Ok(())
}

fn read_rows<P: rusqlite::Params>(
    st: &mut rusqlite::Statement<'_>,
    n: usize,
    params: P,
) -> rusqlite::Result<Vec<Vec<Value>>> {
    st.query_map(params, |r| (0..n).map(|i| r.get::<_, Value>(i)).collect())?
        .collect()
}

/// The ranges of `lo..=hi` not in `have` (sorted).
fn missing_ranges(lo: u64, hi: u64, have: &[u64]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut next = lo;
    for &s in have.iter().filter(|&&s| s >= lo && s <= hi) {
        if s > next {
            out.push((next, s - 1));
        }
        next = s + 1;
    }
    if next <= hi {
        out.push((next, hi));
    }
    out
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    p.into()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::outbox::Outbox;

    /// An outbox with records 1..=5000 numbered, 1..=1000 acknowledged
    /// and deleted, a dead letter, then pages in the middle overwritten.
    fn damaged(dir: &Path) -> (PathBuf, u64) {
        let path = dir.join("outbox.db");
        let w = Outbox::open(&path, SyncMode::Normal).unwrap();
        let tx = w.conn.unchecked_transaction().unwrap();
        for seq in 1..=5000i64 {
            tx.execute(
                "INSERT INTO records (seq, stream, timestamp_ms, payload) VALUES (?1, 's', ?1, ?2)",
                rusqlite::params![seq, vec![7u8; 100]],
            )
            .unwrap();
        }
        tx.execute_batch(
            "UPDATE meta SET value = 5001 WHERE key = 'next_seq';
             INSERT OR REPLACE INTO meta (key, value) VALUES ('acked_seq', 1000);
             DELETE FROM records WHERE seq <= 1000;
             INSERT INTO dead_letters (created_ms, pipeline, function, error, stream, timestamp_ms, payload_size, payload)
                 VALUES (1, 'p', 'f', 'e', 's', 1, 1, x'00');",
        )
        .unwrap();
        tx.commit().unwrap();
        let incarnation: i64 = w
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'incarnation'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        w.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        drop(w);
        let mut bytes = std::fs::read(&path).unwrap();
        let pages = bytes.len() / 4096;
        for page in [pages * 3 / 5, pages * 3 / 5 + 1] {
            bytes[page * 4096..(page + 1) * 4096].fill(0xFF);
        }
        std::fs::write(&path, bytes).unwrap();
        (path, incarnation as u64)
    }

    #[test]
    fn a_damaged_outbox_is_found_and_salvaged_into_a_new_incarnation() {
        let dir = tempfile::tempdir().unwrap();
        let (path, old_incarnation) = damaged(dir.path());
        assert!(
            matches!(
                check(&path, Duration::from_secs(10)).unwrap(),
                Integrity::Damaged(_)
            ),
            "the check finds the damage"
        );
        let s = recover(&path).unwrap();
        assert!(!s.lost.is_empty(), "{s:?}");
        assert_eq!(
            s.records + s.lost_records(),
            4000,
            "every record kept or counted: {s:?}"
        );
        assert!(
            s.lost_records() < 200,
            "only the damaged pages' rows: {s:?}"
        );
        assert!(s.lost.iter().all(|(a, b)| *a > 1000 && *b <= 5000));
        assert_eq!(s.incarnation, old_incarnation, "the numbering was readable");
        assert!(!s.new_incarnation);
        assert!(s.kept_as.exists(), "the damaged file is kept");
        assert_eq!(
            check(&path, Duration::from_secs(10)).unwrap(),
            Integrity::Ok
        );

        let r = crate::outbox::OutboxReader::open(&path, SyncMode::Normal).unwrap();
        let id = r.identity().unwrap();
        assert_eq!(id.incarnation, s.incarnation);
        // The loss is reported to the aggregator (I-33): one record, 5001.
        assert_eq!((id.next_seq, id.acked_seq), (5002, 1000));
        let report = r.read_after(5000, 1, 1 << 20).unwrap();
        assert_eq!(report[0].stream, fogline_protocol::LOSS_STREAM);
        let report = fogline_protocol::LossReport::decode(&report[0].payload).unwrap();
        assert_eq!(report.reason, fogline_protocol::LossReason::Corrupt);
        assert_eq!(report.records, s.lost_records());
        let stats = crate::outbox::read_stats(&path).unwrap();
        assert_eq!(stats.backlog_records, s.records + 1);
        assert_eq!(stats.losses[0].records, s.lost_records());
        assert_eq!(stats.dead_letters, 1);
        assert!(
            stats.alarms.iter().any(|a| a.kind == "outbox_damaged"
                && a.detail.contains(&format!("{} lost", s.lost_records()))),
            "{:?}",
            stats.alarms
        );
        // In order, none twice.
        let recs = r.read_after(1000, 10_000, usize::MAX).unwrap();
        assert!(recs.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(recs.len() as u64, s.records + 1, "and the loss report");
    }

    #[test]
    fn a_sound_outbox_checks_ok() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        drop(Outbox::open(&path, SyncMode::Normal).unwrap());
        assert_eq!(
            check(&path, Duration::from_secs(10)).unwrap(),
            Integrity::Ok
        );
    }

    #[test]
    fn missing_ranges_are_the_gaps() {
        assert_eq!(
            missing_ranges(1, 10, &[1, 2, 5, 6, 10]),
            vec![(3, 4), (7, 9)]
        );
        assert_eq!(missing_ranges(1, 3, &[]), vec![(1, 3)]);
        assert_eq!(missing_ranges(4, 3, &[]), vec![]);
    }
}
