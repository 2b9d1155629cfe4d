//! The outbox's bounds: quotas in bytes and age, for the whole file and per
//! pipeline (a *lane*), and what happens when one is reached — `block` (the
//! commit is refused, nothing is acknowledged, senders keep their data) or
//! `drop_oldest` (the oldest records make room, lowest priority first).
//!
//! Every drop happens inside the commit's transaction and is reported there
//! as a loss record (`losses.rs`): dropped and counted, or neither (I-32,
//! I-33).
//!
//! Sizes: a lane's quota counts its records' payload and stream-name bytes
//! (kept per lane in `lane_usage`, moved in the same transactions as the
//! rows). The whole-outbox quota counts the file on disk: pages in use plus
//! an allowance for the write-ahead log, which is kept below it by
//! `journal_size_limit` and checkpoints. Free pages are reused before the
//! file grows, so a full outbox stays the size it is.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use fogline_protocol::{LossReason, LossReport};
use rusqlite::{params, Connection, OptionalExtension};

/// The lane of loss reports: never dropped.
pub const REPORT_LANE: u32 = 0;
/// The lane of records written before lanes existed (or by salvage).
pub const LEGACY_LANE: u32 = 1;

/// What a full quota does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Refuse the commit: nothing more is acknowledged until the uplink
    /// drains (senders and the broker hold their messages).
    #[default]
    Block,
    /// Drop the oldest records (lowest priority first) to make room.
    DropOldest,
}

/// Which records go last when room is made.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Default,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Dropped first.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Dropped last (alerts).
    High,
}

/// One lane's (pipeline's) bounds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LanePolicy {
    /// The pipeline's name (for errors and reports).
    pub name: String,
    /// Drop order under the whole-outbox quota.
    pub priority: Priority,
    /// Payload and stream bytes this lane may hold.
    pub max_bytes: Option<u64>,
    /// How long its records may wait.
    pub max_age: Option<Duration>,
    /// What its own full quota does; whether the whole-outbox quota may drop
    /// its records.
    pub when_full: WhenFull,
}

/// The outbox's bounds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Retention {
    /// Bytes on disk for the database and its write-ahead log.
    pub max_bytes: Option<u64>,
    /// How long any record may wait.
    pub max_age: Option<Duration>,
    /// What the whole-outbox quota does when reached.
    pub when_full: WhenFull,
    /// Per lane (pipeline).
    pub lanes: HashMap<u32, LanePolicy>,
    /// Bytes of dead letters kept (oldest pruned, counted as lost).
    pub dead_letter_max_bytes: u64,
    /// Bytes of outputs kept for durable local subscribers.
    pub local_max_bytes: u64,
    /// Bytes of the quota kept for the write-ahead log.
    pub wal_allowance: u64,
}

impl Retention {
    /// Whether any policy drops records (`drop_oldest` or an age limit).
    pub fn may_drop(&self) -> bool {
        self.max_age.is_some()
            || (self.max_bytes.is_some() && self.when_full == WhenFull::DropOldest)
            || self
                .lanes
                .values()
                .any(|l| l.max_age.is_some() || (l.when_full == WhenFull::DropOldest))
    }
}

/// A quota that refuses the commit (`block`, or nothing left to drop).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// Which quota (`outbox.max_bytes`, `pipelines.alerts.max_bytes`).
    pub quota: String,
    /// Bytes it holds now.
    pub used: u64,
    /// The commit's bytes.
    pub incoming: u64,
    /// Its limit.
    pub limit: u64,
}

/// What the uplink sent and the aggregator may have applied: never dropped
/// (it would count as delivered and as lost). Shared by the reader, which
/// raises the marks as it reads, and the writer, which drops around them.
#[derive(Debug, Default)]
pub struct InFlightMarks {
    /// Every record at or below this seq (sending in seq order, and what
    /// the last run sent until a session's cursor says otherwise).
    below: std::sync::atomic::AtomicU64,
    /// Per lane, sending out of order (drain priorities, live data first).
    lanes: std::sync::Mutex<HashMap<u32, LaneSent>>,
    /// What earlier sessions sent out of order above their cursor: it may
    /// have been applied without the ack arriving, so it stays protected
    /// until a cursor passes it.
    carried: std::sync::Mutex<HashMap<u32, LaneSent>>,
    /// Held by the reader from its read to its marks, and by the writer
    /// from its drops to its commit: a record is never read, then dropped
    /// under a mark taken before the read.
    pub(super) reading: std::sync::Mutex<()>,
}

/// What was sent of one lane: its records in `(.., after]` and in `live`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaneSent {
    /// Every record of the lane at or below this was sent.
    pub after: u64,
    /// And those in this range (the live part, sent first).
    pub live: Option<(u64, u64)>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// A copy of the marks for one decision.
#[derive(Debug, Clone, Default)]
pub struct Protect {
    below: u64,
    lanes: HashMap<u32, LaneSent>,
}

impl LaneSent {
    /// Protects what either protects (the live ranges joined).
    fn join(self, other: LaneSent) -> LaneSent {
        let live = match (self.live, other.live) {
            (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
            (a, b) => a.or(b),
        };
        LaneSent {
            after: self.after.max(other.after),
            live,
        }
    }

    fn highest(&self) -> u64 {
        self.live.map_or(self.after, |l| l.1.max(self.after))
    }
}

impl Protect {
    /// Everything at or below `below` protected (tests, and in-order sends).
    pub fn below(below: u64) -> Self {
        Self {
            below,
            lanes: HashMap::new(),
        }
    }

    /// For `lane`: records at or below the first are protected, and those
    /// in the inclusive range of the second two.
    fn lane(&self, lane: u32) -> (u64, u64, u64) {
        match self.lanes.get(&lane) {
            Some(l) => {
                let (lo, hi) = l.live.unwrap_or((1, 0));
                (l.after.max(self.below), lo, hi)
            }
            None => (self.below, 1, 0),
        }
    }
}

impl InFlightMarks {
    /// Marks with everything at or below `below` protected, and what
    /// earlier sessions sent out of order (`carried`).
    pub fn new(below: u64, carried: HashMap<u32, LaneSent>) -> Self {
        Self {
            below: below.into(),
            carried: std::sync::Mutex::new(carried),
            ..Self::default()
        }
    }

    /// Every lane's marks, this session's and carried, joined (what to
    /// keep across a restart).
    pub fn lanes_joined(&self) -> HashMap<u32, LaneSent> {
        self.snapshot().lanes
    }

    /// The marks now.
    pub fn snapshot(&self) -> Protect {
        let mut lanes = self.with_lanes(|l| l.clone());
        for (lane, c) in lock(&self.carried).iter() {
            let e = lanes.entry(*lane).or_insert(*c);
            *e = e.join(*c);
        }
        Protect {
            below: self.below(),
            lanes,
        }
    }

    /// Everything at or below this is protected.
    pub fn below(&self) -> u64 {
        self.below.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Sent in order through `seq`.
    pub fn raise(&self, seq: u64) -> u64 {
        self.below
            .fetch_max(seq, std::sync::atomic::Ordering::AcqRel)
    }

    /// A session starts at `cursor`: nothing above it is in flight.
    pub fn reset(&self, cursor: u64) {
        self.below
            .store(cursor, std::sync::atomic::Ordering::Release);
        let sent = self.with_lanes(std::mem::take);
        let mut carried = lock(&self.carried);
        for (lane, s) in sent {
            let e = carried.entry(lane).or_insert(s);
            *e = e.join(s);
        }
        carried.retain(|_, s| s.highest() > cursor);
    }

    /// Reads the per-lane marks kept in `sent_marks`.
    pub fn load(conn: &Connection) -> rusqlite::Result<HashMap<u32, LaneSent>> {
        let mut st = conn.prepare("SELECT lane, after, live_lo, live_hi FROM sent_marks")?;
        let rows = st.query_map([], |r| {
            let lo: Option<i64> = r.get(2)?;
            let hi: Option<i64> = r.get(3)?;
            Ok((
                r.get::<_, u32>(0)?,
                LaneSent {
                    after: r.get::<_, i64>(1)?.max(0) as u64,
                    live: lo.zip(hi).map(|(l, h)| (l.max(0) as u64, h.max(0) as u64)),
                },
            ))
        })?;
        rows.collect()
    }

    /// Keeps `lanes` in `sent_marks`, replacing what was there.
    pub fn store(conn: &Connection, lanes: &HashMap<u32, LaneSent>) -> rusqlite::Result<()> {
        let tx = super::write_tx(conn)?;
        tx.execute("DELETE FROM sent_marks", [])?;
        for (lane, s) in lanes {
            tx.execute(
                "INSERT INTO sent_marks (lane, after, live_lo, live_hi) VALUES (?1, ?2, ?3, ?4)",
                params![
                    lane,
                    s.after as i64,
                    s.live.map(|l| l.0 as i64),
                    s.live.map(|l| l.1 as i64)
                ],
            )?;
        }
        tx.commit()
    }

    /// Changes the per-lane marks.
    pub fn with_lanes<T>(&self, f: impl FnOnce(&mut HashMap<u32, LaneSent>) -> T) -> T {
        f(&mut lock(&self.lanes))
    }

    /// The lock a reader holds from its read to its marks (and a dropping
    /// writer to its commit).
    pub fn reading(&self) -> std::sync::MutexGuard<'_, ()> {
        match self.reading.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// Bytes a record counts for in its lane.
pub fn record_bytes(stream: &str, payload: &[u8]) -> u64 {
    (stream.len() + payload.len()) as u64
}

const RECORD_BYTES_SQL: &str = "LENGTH(payload) + LENGTH(CAST(stream AS BLOB))";

/// Adds `records`/`bytes` (negative to subtract) to `lane`'s usage.
pub fn add_usage(conn: &Connection, lane: u32, records: i64, bytes: i64) -> rusqlite::Result<()> {
    if records == 0 && bytes == 0 {
        return Ok(());
    }
    conn.prepare_cached(
        "INSERT INTO lane_usage (lane, records, bytes) VALUES (?1, ?2, ?3) \
         ON CONFLICT(lane) DO UPDATE SET records = MAX(0, records + excluded.records), \
         bytes = MAX(0, bytes + excluded.bytes)",
    )?
    .execute(params![lane, records, bytes])
    .map(drop)
}

/// Each row a delete through `?1` takes: its lane and bytes, in seq order.
/// Summed in Rust, not with `GROUP BY lane`: for that SQLite either walks
/// `records_by_lane` — the whole backlog — at every acknowledgement (a
/// 10 M-record backlog drained 4× slower than a small one), or, kept off the
/// index, sorts the rows *with their payloads* in a temporary b-tree (tens
/// of MB of RSS for large payloads). The seq range reads only the rows
/// being deleted, and nothing is held but a total per lane.
pub(super) fn subtract_through_sql() -> String {
    format!("SELECT lane, {RECORD_BYTES_SQL} FROM records NOT INDEXED WHERE seq <= ?1")
}

/// Subtracts from each lane what `seq <= through` holds (before those rows
/// are deleted).
pub fn subtract_through(conn: &Connection, through: u64) -> rusqlite::Result<()> {
    let mut gone: BTreeMap<u32, (i64, i64)> = BTreeMap::new();
    {
        let mut st = conn.prepare_cached(&subtract_through_sql())?;
        let mut rows = st.query([through as i64])?;
        while let Some(r) = rows.next()? {
            let e = gone.entry(r.get(0)?).or_default();
            e.0 += 1;
            e.1 += r.get::<_, i64>(1)?;
        }
    }
    for (lane, (n, b)) in gone {
        add_usage(conn, lane, -n, -b)?;
    }
    Ok(())
}

/// Moves usage for the records of `lane` numbered `first..=last`, about to
/// be deleted.
pub fn subtract_range(conn: &Connection, lane: u32, first: u64, last: u64) -> rusqlite::Result<()> {
    let (n, b): (i64, i64) = conn
        .prepare_cached(&format!(
            "SELECT COUNT(*), COALESCE(SUM({RECORD_BYTES_SQL}), 0) FROM records WHERE lane = ?1 AND seq BETWEEN ?2 AND ?3"
        ))?
        .query_row(params![lane, first as i64, last as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    if n > 0 {
        add_usage(conn, lane, -n, -b)?;
    }
    Ok(())
}

/// Recounts every lane's usage and the dead letters' bytes from the rows
/// (a salvaged file, or one from before lanes).
pub fn rebuild_usage(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "DELETE FROM lane_usage;
         INSERT INTO lane_usage (lane, records, bytes)
             SELECT lane, COUNT(*), COALESCE(SUM({RECORD_BYTES_SQL}), 0) FROM records GROUP BY lane;
         INSERT OR REPLACE INTO meta (key, value)
             VALUES ('dead_letter_bytes', (SELECT COALESCE(SUM({DEAD_LETTER_BYTES_SQL}), 0) FROM dead_letters));
         INSERT OR REPLACE INTO meta (key, value) VALUES ('usage_counted', 1);"
    ))
}

/// Bytes a dead letter counts for.
pub const DEAD_LETTER_BYTES_SQL: &str =
    "LENGTH(payload) + LENGTH(CAST(stream AS BLOB)) + LENGTH(CAST(error AS BLOB))";

/// Bytes a dead letter counts for, from its parts.
pub fn dead_letter_bytes(stream: &str, payload: &[u8], error: &str) -> u64 {
    (stream.len() + payload.len() + error.len()) as u64
}

fn usage(conn: &Connection) -> rusqlite::Result<HashMap<u32, (u64, u64)>> {
    conn.prepare_cached("SELECT lane, records, bytes FROM lane_usage")?
        .query_map([], |r| {
            Ok((
                r.get::<_, u32>(0)?,
                (
                    r.get::<_, i64>(1)?.max(0) as u64,
                    r.get::<_, i64>(2)?.max(0) as u64,
                ),
            ))
        })?
        .collect()
}

/// Per stream, what a drop removed.
#[derive(Default)]
pub struct Dropped {
    by_stream: BTreeMap<(String, LossReason, u32), LossReport>,
    /// Bumped where a drop steps over records in flight: a report's seq
    /// range never spans a record that was delivered.
    part: u32,
    /// Bytes freed (lane measure).
    pub bytes: u64,
}

impl Dropped {
    fn note(
        &mut self,
        reason: LossReason,
        detail: &str,
        seq: u64,
        stream: &str,
        ts: u64,
        bytes: u64,
    ) {
        let r = LossReport {
            stream: stream.to_string(),
            reason,
            detail: Some(detail.to_string()),
            records: 1,
            bytes,
            first_seq: Some(seq),
            last_seq: Some(seq),
            first_ms: ts,
            last_ms: ts,
        };
        self.add(r);
        self.bytes += bytes;
    }

    /// Folds `r` into the report of its stream and reason.
    fn add(&mut self, r: LossReport) {
        self.by_stream
            .entry((r.stream.clone(), r.reason, self.part))
            .and_modify(|e| e.absorb(&r))
            .or_insert(r);
    }

    /// Records dropped.
    pub fn count(&self) -> u64 {
        self.by_stream
            .values()
            .filter(|r| r.first_seq.is_some())
            .map(|r| r.records)
            .sum()
    }

    /// The reports, one per stream and reason.
    pub fn into_reports(self) -> Vec<LossReport> {
        self.by_stream.into_values().collect()
    }
}

/// How far a drop goes.
enum Until {
    /// Until this many bytes are freed.
    Freed(u64),
    /// Everything numbered below this seq.
    Below(u64),
}

/// Drops records of `lane` that `protected` allows, oldest first, as far
/// as `until` says. Returns the bytes freed.
fn drop_from_lane(
    conn: &Connection,
    lane: u32,
    protected: &Protect,
    until: Until,
    reason: LossReason,
    detail: &str,
    out: &mut Dropped,
) -> rusqlite::Result<u64> {
    let (need, below_seq) = match until {
        Until::Freed(n) => (Some(n), None),
        Until::Below(b) => (None, Some(b)),
    };
    let (after, skip_lo, skip_hi) = protected.lane(lane);
    let mut freed = 0u64;
    let mut count = 0i64;
    let mut last = None;
    {
        let mut st = conn.prepare_cached(&format!(
            "SELECT seq, stream, timestamp_ms, {RECORD_BYTES_SQL} FROM records \
             WHERE lane = ?1 AND seq > ?2 AND seq < ?3 AND NOT (seq BETWEEN ?4 AND ?5) \
             ORDER BY seq LIMIT 100000"
        ))?;
        let below = below_seq.unwrap_or(i64::MAX as u64).min(i64::MAX as u64) as i64;
        let mut rows = st.query(params![
            lane,
            after as i64,
            below,
            skip_lo as i64,
            skip_hi as i64
        ])?;
        while let Some(r) = rows.next()? {
            if need.is_some_and(|n| freed >= n) {
                break;
            }
            let seq = r.get::<_, i64>(0)? as u64;
            if skip_lo <= skip_hi && seq > skip_hi && last.is_none_or(|l| l < skip_lo) {
                out.part += 1;
            }
            let stream: String = r.get(1)?;
            let ts = r.get::<_, i64>(2)?.max(0) as u64;
            let bytes = r.get::<_, i64>(3)?.max(0) as u64;
            out.note(reason, detail, seq, &stream, ts, bytes);
            freed += bytes;
            count += 1;
            last = Some(seq);
        }
    }
    if let Some(last) = last {
        conn.prepare_cached(
            "DELETE FROM records WHERE lane = ?1 AND seq > ?2 AND seq <= ?3 AND NOT (seq BETWEEN ?4 AND ?5)",
        )?
        .execute(params![
            lane,
            after as i64,
            last as i64,
            skip_lo as i64,
            skip_hi as i64
        ])?;
        add_usage(conn, lane, -count, -(freed as i64))?;
    }
    Ok(freed)
}

/// The commit's records per lane: `(records, bytes)`.
pub type Incoming = HashMap<u32, (u64, u64)>;

/// Makes room for `incoming` under every quota, dropping what the policies
/// allow (records `protected` says are in flight are never dropped).
/// `Err` when a quota refuses the commit.
pub fn make_room(
    conn: &Connection,
    policy: &Retention,
    incoming: &Incoming,
    protected: &Protect,
    out: &mut Dropped,
) -> rusqlite::Result<Result<(), Blocked>> {
    let usage = usage(conn)?;
    // Each lane's own quota.
    for (&lane, &(_, add)) in incoming {
        let Some(lp) = policy.lanes.get(&lane) else {
            continue;
        };
        let Some(limit) = lp.max_bytes else { continue };
        let used = usage.get(&lane).map_or(0, |u| u.1);
        if used + add <= limit {
            continue;
        }
        let quota = format!("pipelines.{}.max_bytes", lp.name);
        if lp.when_full == WhenFull::Block {
            return Ok(Err(Blocked {
                quota,
                used,
                incoming: add,
                limit,
            }));
        }
        // Room for this commit and 5 % more, so a full lane does not drop
        // (and report) on every commit.
        let need = used + add - limit + limit / 20;
        let freed = drop_from_lane(
            conn,
            lane,
            protected,
            Until::Freed(need),
            LossReason::Quota,
            &quota,
            out,
        )?;
        if freed < used + add - limit {
            return Ok(Err(Blocked {
                quota,
                used: used - freed,
                incoming: add,
                limit,
            }));
        }
    }
    // The whole outbox, on disk.
    let Some(max) = policy.max_bytes else {
        return Ok(Ok(()));
    };
    let limit = max.saturating_sub(policy.wal_allowance);
    let (page_size, pages, free): (i64, i64, i64) = conn.query_row(
        "SELECT page_size, page_count, freelist_count FROM pragma_page_size(), pragma_page_count(), pragma_freelist_count()",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let used = ((pages - free).max(0) * page_size) as u64;
    let add_logical: u64 = incoming.values().map(|v| v.1).sum();
    let add_records: u64 = incoming.values().map(|v| v.0).sum();
    // Disk bytes per lane byte, as the file shows it (b-tree pages are not
    // full, rows have headers); at least 1.5 until there is enough to tell.
    let logical: u64 = usage.values().map(|u| u.1 + 16 * u.0).sum();
    let ratio = if logical >= 1 << 20 {
        (used as f64 / logical as f64).clamp(1.0, 4.0)
    } else {
        1.5
    };
    let add = ((add_logical + 16 * add_records) as f64 * ratio) as u64;
    if used + add <= limit {
        return Ok(Ok(()));
    }
    let quota = "outbox.max_bytes".to_string();
    if policy.when_full == WhenFull::Block {
        return Ok(Err(Blocked {
            quota,
            used,
            incoming: add,
            limit: max,
        }));
    }
    let over = used + add - limit;
    // In lane bytes, plus 2 % of the quota so drops come in runs.
    let mut need = (over as f64 / ratio) as u64 + limit / 50;
    let mut lanes: Vec<(Priority, u64, u32)> = Vec::new();
    for (&lane, u) in &usage {
        if lane == REPORT_LANE || u.0 == 0 {
            continue;
        }
        let lp = policy.lanes.get(&lane);
        if lp.is_some_and(|l| l.when_full == WhenFull::Block) {
            continue;
        }
        let (after, skip_lo, skip_hi) = protected.lane(lane);
        let oldest: Option<i64> = conn
            .prepare_cached(
                "SELECT MIN(seq) FROM records WHERE lane = ?1 AND seq > ?2 AND NOT (seq BETWEEN ?3 AND ?4)",
            )?
            .query_row(
                params![lane, after as i64, skip_lo as i64, skip_hi as i64],
                |r| r.get(0),
            )?;
        if let Some(oldest) = oldest {
            lanes.push((
                lp.map_or(Priority::Normal, |l| l.priority),
                oldest as u64,
                lane,
            ));
        }
    }
    // Lowest priority first; within one, the lane holding the oldest record.
    lanes.sort();
    let mut freed_total = 0;
    for (_, _, lane) in lanes {
        if need == 0 {
            break;
        }
        let freed = drop_from_lane(
            conn,
            lane,
            protected,
            Until::Freed(need),
            LossReason::Quota,
            &quota,
            out,
        )?;
        freed_total += freed;
        need = need.saturating_sub(freed);
    }
    if ((freed_total as f64) * ratio) < over as f64 {
        return Ok(Err(Blocked {
            quota,
            used,
            incoming: add,
            limit: max,
        }));
    }
    Ok(Ok(()))
}

/// Drops what waited longer than its lane's (or the outbox's) `max_age`,
/// as of `now_ms` on the node clock.
pub fn expire(
    conn: &Connection,
    policy: &Retention,
    protected: &Protect,
    now_ms: u64,
    out: &mut Dropped,
) -> rusqlite::Result<()> {
    let lanes: Vec<u32> = conn
        .prepare_cached("SELECT lane FROM lane_usage WHERE records > 0 AND lane != ?1")?
        .query_map([REPORT_LANE], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for lane in lanes {
        let lp = policy.lanes.get(&lane);
        let Some(age) = lp.and_then(|l| l.max_age).or(policy.max_age) else {
            continue;
        };
        let cutoff = now_ms.saturating_sub(age.as_millis() as u64);
        // A mark is written by the first commit a second or more after the
        // previous one: records between two marks were committed within a
        // second of the first. So what is numbered below the first mark
        // after the cutoff is old (to the second); with no mark at or before
        // the cutoff, nothing is known to be.
        let (old, below): (Option<i64>, Option<i64>) = conn
            .prepare_cached(
                "SELECT (SELECT MAX(first_seq) FROM seq_marks WHERE at_ms <= ?1), \
                 (SELECT MIN(first_seq) FROM seq_marks WHERE at_ms > ?1)",
            )?
            .query_row([cutoff as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if old.is_none() {
            continue;
        }
        let below = below.map_or(u64::MAX, |b| b as u64);
        let detail = match lp.filter(|l| l.max_age.is_some()) {
            Some(l) => format!(
                "pipelines.{}.max_age = {}",
                l.name,
                humantime::format_duration(age)
            ),
            None => format!("outbox.max_age = {}", humantime::format_duration(age)),
        };
        drop_from_lane(
            conn,
            lane,
            protected,
            Until::Below(below),
            LossReason::MaxAge,
            &detail,
            out,
        )?;
    }
    // Marks below the oldest record are no longer needed (one is kept).
    conn.execute(
        "DELETE FROM seq_marks WHERE first_seq < (SELECT MAX(first_seq) FROM seq_marks \
         WHERE first_seq <= COALESCE((SELECT MIN(seq) FROM records), 9223372036854775807))",
        [],
    )?;
    Ok(())
}

/// When the oldest record still buffered was committed (ms, node clock).
pub fn oldest_committed_ms(conn: &Connection) -> rusqlite::Result<Option<u64>> {
    let v: Option<i64> = conn
        .query_row(
            "SELECT at_ms FROM seq_marks WHERE first_seq <= \
             (SELECT MIN(seq) FROM records WHERE lane != 0) ORDER BY first_seq DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(v.map(|v| v.max(0) as u64))
}

/// Prunes the oldest dead letters while they hold more than `max_bytes`.
pub fn prune_dead_letters(
    conn: &Connection,
    max_bytes: u64,
    out: &mut Dropped,
) -> rusqlite::Result<()> {
    let held: i64 = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'dead_letter_bytes'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    let held = held.max(0) as u64;
    if held <= max_bytes {
        return Ok(());
    }
    // Down to 90 %, so pruning comes in runs.
    let need = held - max_bytes + max_bytes / 10;
    let mut freed = 0u64;
    let mut last = None;
    {
        let mut st = conn.prepare_cached(&format!(
            "SELECT id, stream, timestamp_ms, payload_size, {DEAD_LETTER_BYTES_SQL}, reason FROM dead_letters ORDER BY id"
        ))?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            if freed >= need {
                break;
            }
            let id: i64 = r.get(0)?;
            let stream: String = r.get(1)?;
            let ts = r.get::<_, i64>(2)?.max(0) as u64;
            let size = r.get::<_, i64>(3)?.max(0) as u64;
            let bytes = r.get::<_, i64>(4)?.max(0) as u64;
            let reason: String = r.get(5)?;
            out.add(LossReport {
                stream,
                reason: LossReason::DeadLetterPruned,
                detail: Some(reason),
                records: 1,
                bytes: size,
                first_seq: None,
                last_seq: None,
                first_ms: ts,
                last_ms: ts,
            });
            freed += bytes;
            last = Some(id);
        }
    }
    if let Some(last) = last {
        conn.execute("DELETE FROM dead_letters WHERE id <= ?1", [last])?;
        conn.execute(
            "UPDATE meta SET value = MAX(0, value - ?1) WHERE key = 'dead_letter_bytes'",
            [freed as i64],
        )?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "retention_tests.rs"]
mod tests;
