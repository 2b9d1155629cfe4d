//! What the uplink sends next when the order is not the seq order (I-35):
//! `high` pipelines (alerts) before `normal` before `low`, and within one
//! priority the backlog oldest first, or the records committed since the
//! session started first (`live_first`), or alternating (`interleaved`).
//!
//! Each pipeline's records are one lane; a session's [`Plan`] holds, per
//! lane, a segment for the backlog and (live-first or interleaved) one for
//! live records, each sent in seq order. Every batch carries its *floor*:
//! the lowest seq that may still be unsent, so the aggregator's cursor
//! moves only over what it holds (or what was dropped and reported); what
//! it applied above its cursor is skipped on a resend (protocol 4). The
//! sent ranges are the in-flight marks the quotas drop around.
//!
//! With every pipeline at one priority and `oldest_first` there is no plan:
//! records go in seq order, as they were numbered.

use std::collections::{HashMap, VecDeque};

use rusqlite::params;

use super::retention::{self, LaneSent, Priority, REPORT_LANE};
use super::{OutboxError, OutboxReader, Record};

/// The order within one priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainOrder {
    /// Oldest first: the backlog, then what came since.
    #[default]
    OldestFirst,
    /// What was committed since the session started goes first; the backlog
    /// fills the rest of the link.
    LiveFirst,
    /// One batch of live records, one of backlog, in turn.
    Interleaved,
}

/// How the uplink drains.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DrainPolicy {
    /// The order within one priority.
    pub order: DrainOrder,
    /// Priorities by lane (pipeline); others are `normal`, loss reports `high`.
    pub priorities: HashMap<u32, Priority>,
}

impl DrainPolicy {
    /// True when records simply go in seq order (no plan needed).
    pub fn in_seq_order(&self) -> bool {
        self.order == DrainOrder::OldestFirst
            && self.priorities.values().all(|p| *p == Priority::Normal)
    }

    fn priority(&self, lane: u32) -> Priority {
        if lane == REPORT_LANE {
            // The cloud hears of a loss before the data that follows it.
            return Priority::High;
        }
        self.priorities.get(&lane).copied().unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
struct Segment {
    lane: u32,
    priority: Priority,
    live: bool,
    /// Everything of the segment at or below this was sent.
    after: u64,
    /// Exclusive upper bound (`u64::MAX`: none).
    until: u64,
    /// Nothing unsent of the segment lies below this (seen empty when the
    /// outbox numbered up to here).
    clear_below: u64,
}

impl Segment {
    /// The lowest seq this segment may still send (`None`: none).
    fn lowest_unsent(&self) -> Option<u64> {
        let low = self.after.saturating_add(1).max(self.clear_below);
        (low < self.until).then_some(low)
    }
}

/// A batch sent from a plan: deleted once acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SentBatch {
    lane: u32,
    first: u64,
    last: u64,
}

/// One session's drain.
#[derive(Debug)]
pub struct Plan {
    cursor: u64,
    segments: Vec<Segment>,
    /// `next_seq` at the last read.
    numbered: u64,
    turn: usize,
    floor: u64,
    sent: VecDeque<SentBatch>,
    released: u64,
}

impl Plan {
    fn add_lane(&mut self, policy: &DrainPolicy, lane: u32, live_from: u64, clear_below: u64) {
        let priority = policy.priority(lane);
        let split = policy.order != DrainOrder::OldestFirst;
        self.segments.push(Segment {
            lane,
            priority,
            live: false,
            after: self.cursor,
            until: if split { live_from } else { u64::MAX },
            clear_below,
        });
        if split {
            self.segments.push(Segment {
                lane,
                priority,
                live: true,
                after: live_from.saturating_sub(1).max(self.cursor),
                until: u64::MAX,
                clear_below,
            });
        }
    }

    /// Segment indices in the order to try them for the next batch.
    fn order(&self, policy: &DrainPolicy) -> Vec<usize> {
        let n = self.segments.len().max(1);
        let live_first = match policy.order {
            DrainOrder::OldestFirst => false,
            DrainOrder::LiveFirst => true,
            DrainOrder::Interleaved => self.turn.is_multiple_of(2),
        };
        let mut idx: Vec<usize> = (0..self.segments.len()).collect();
        // Rotating the start by the turn shares the link between lanes of
        // one priority; the sort is stable.
        idx.rotate_left(self.turn % n);
        idx.sort_by_key(|&i| {
            let s = &self.segments[i];
            (
                std::cmp::Reverse(s.priority),
                if live_first { !s.live } else { s.live },
            )
        });
        idx
    }

    fn floor(&self) -> u64 {
        self.segments
            .iter()
            .filter_map(Segment::lowest_unsent)
            .fold(self.numbered, u64::min)
    }

    fn marks(&self) -> HashMap<u32, LaneSent> {
        let mut out: HashMap<u32, LaneSent> = HashMap::new();
        for s in &self.segments {
            let m = out.entry(s.lane).or_insert(LaneSent {
                after: self.cursor,
                live: None,
            });
            if s.live {
                // The live segment starts where its backlog segment ends.
                let lo = self
                    .segments
                    .iter()
                    .find(|b| b.lane == s.lane && !b.live)
                    .map_or(self.cursor + 1, |b| b.until);
                if s.after >= lo {
                    m.live = Some((lo, s.after));
                }
            } else {
                m.after = m.after.max(s.after);
            }
        }
        out
    }
}

impl OutboxReader {
    /// How the uplink drains (I-35). Takes effect at the next session.
    pub fn set_drain(&mut self, policy: DrainPolicy) {
        self.drain = policy;
    }

    /// Whether this reader sends out of seq order.
    pub fn out_of_order(&self) -> bool {
        !self.drain.in_seq_order()
    }

    /// A session starts after `cursor` (the resume decision carried out):
    /// its plan, when the policy needs one.
    pub fn start_plan(&self, cursor: u64) -> Result<(), OutboxError> {
        if self.drain.in_seq_order() {
            self.plan.replace(None);
            return Ok(());
        }
        let numbered = self.next_seq()?;
        let mut plan = Plan {
            cursor,
            segments: Vec::new(),
            numbered,
            turn: 0,
            floor: cursor + 1,
            sent: VecDeque::new(),
            released: 0,
        };
        for lane in self.lanes_holding()? {
            plan.add_lane(&self.drain, lane, numbered, 0);
        }
        self.protected.with_lanes(|l| *l = plan.marks());
        self.plan.replace(Some(plan));
        Ok(())
    }

    fn next_seq(&self) -> Result<u64, OutboxError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|v| v.max(1) as u64)
            .map_err(self.sql("read next_seq"))
    }

    fn lanes_holding(&self) -> Result<Vec<u32>, OutboxError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT lane FROM lane_usage WHERE records > 0 ORDER BY lane")
            .map_err(self.sql("read lanes"))?;
        let rows = st
            .query_map([], |r| r.get(0))
            .map_err(self.sql("read lanes"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.sql("read lanes"))
    }

    /// The next batch the plan picks, with its floor (`None`: nothing
    /// unsent). Reads only what it returns.
    pub fn read_planned(
        &self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Option<(Vec<Record>, u64)>, OutboxError> {
        let mut slot = self.plan.borrow_mut();
        let Some(plan) = slot.as_mut() else {
            return Ok(None);
        };
        let _reading = self.protected.reading();
        // Numbered before looking: anything committed after is above it.
        let numbered = self.next_seq()?;
        let known: Vec<u32> = plan.segments.iter().map(|s| s.lane).collect();
        for lane in self.lanes_holding()? {
            if !known.contains(&lane) {
                // Empty when the last read looked: its records are newer.
                let since = plan.numbered;
                plan.add_lane(&self.drain, lane, since, since);
            }
        }
        let mut chosen = None;
        for i in plan.order(&self.drain) {
            let s = &plan.segments[i];
            let Some(low) = s.lowest_unsent() else {
                continue;
            };
            let (records, exhausted) =
                self.read_lane(s.lane, low, s.until, max_records, max_bytes)?;
            if exhausted {
                // Nothing more below what was numbered when this read began.
                let s = &mut plan.segments[i];
                s.clear_below = s.clear_below.max(numbered.min(s.until));
            }
            if records.is_empty() {
                continue;
            }
            chosen = Some((i, records));
            break;
        }
        plan.numbered = numbered;
        let Some((i, records)) = chosen else {
            return Ok(None);
        };
        let (first, last) = match (records.first(), records.last()) {
            (Some(f), Some(l)) => (f.seq, l.seq),
            _ => return Ok(None),
        };
        let s = &mut plan.segments[i];
        s.after = last;
        let lane = s.lane;
        plan.turn = plan.turn.wrapping_add(1);
        plan.sent.push_back(SentBatch { lane, first, last });
        // Never below the last one's (new lanes start above it).
        plan.floor = plan.floor.max(plan.floor());
        self.protected.with_lanes(|l| *l = plan.marks());
        // What was sent stays protected across a restart until a cursor
        // passes it (best effort: a failed write only protects less after
        // a restart, and a full disk must not stop the uplink, I-28).
        if let Err(e) = retention::InFlightMarks::store(&self.conn, &self.protected.lanes_joined())
        {
            tracing::debug!(error = %e, "Cannot note the sent marks.");
        }
        Ok(Some((records, plan.floor)))
    }

    fn read_lane(
        &self,
        lane: u32,
        from: u64,
        until: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Record>, bool), OutboxError> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT seq, stream, timestamp_ms, payload FROM records \
                 WHERE lane = ?1 AND seq >= ?2 AND seq < ?3 ORDER BY seq LIMIT ?4",
            )
            .map_err(self.sql("prepare read"))?;
        let until = until.min(i64::MAX as u64) as i64;
        // One row more than asked tells whether the segment is exhausted,
        // so the last batch's floor can clear it.
        let mut rows = st
            .query(params![lane, from as i64, until, max_records as i64 + 1])
            .map_err(self.sql("read records"))?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while let Some(row) = rows.next().map_err(self.sql("read records"))? {
            if out.len() == max_records {
                return Ok((out, false));
            }
            let record = super::record_from_row(row).map_err(self.sql("read records"))?;
            bytes += record.payload.len();
            out.push(record);
            if bytes >= max_bytes {
                return Ok((out, false));
            }
        }
        Ok((out, true))
    }

    /// The aggregator applied the first `batches` batches of this session
    /// and everything through `through`: delete them. Returns how many rows
    /// went.
    pub fn delete_acked(&self, through: u64, batches: u64) -> Result<usize, OutboxError> {
        let mut done = Vec::new();
        if let Some(plan) = self.plan.borrow_mut().as_mut() {
            while plan.released < batches {
                match plan.sent.pop_front() {
                    Some(b) => done.push((b.lane, b.first, b.last)),
                    None => break,
                }
                plan.released += 1;
            }
        }
        // One transaction with the in-order delete, and its full-disk retry.
        self.delete_acked_ranges(through, &done)
    }
}

#[cfg(test)]
#[path = "drain_tests.rs"]
mod tests;
