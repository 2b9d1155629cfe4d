//! [`Windows`]: tumbling, hopping and session windows per key, as durable
//! state, closed by a watermark that only moves forward.
//!
//! ```ignore
//! // 10 s tumbling windows per stream; late readings up to 2 s still count.
//! let windows = Windows::<Avg>::tumbling(10_000)?.allowed_lateness(2_000);
//! // per message (ingest time; or an event time read from the payload):
//! self.windows.add(msg.stream(), msg.timestamp_ms(), |avg| avg.add(v))?;
//! // per tick: ingest time moves the watermark; emit what closed.
//! self.windows.advance(now_ms);
//! self.windows.close(|key, w| out.emit_json(..))?;
//! ```
//!
//! A window is emitted once, when the watermark passes its end plus the
//! allowed lateness. A reading for a window already emitted is *late*: `add`
//! returns an error naming the window and the watermark, and the host
//! dead-letters the reading (it is kept and can be replayed, never lost
//! silently). With ingest time the gateway's clock never goes backwards, so
//! no reading is ever late.

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::state::{Durable, StateWriter};
use crate::{Error, Result};

/// What a window accumulates (a count, a sum, min and max...).
pub trait Aggregate: Default + Serialize + DeserializeOwned {
    /// Fold `other` into `self`: two session windows that a reading bridges
    /// become one.
    fn merge(&mut self, other: Self);
}

/// How windows are laid out in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Back to back: `[k·size, (k+1)·size)`.
    Tumbling {
        /// Length, ms.
        size_ms: u64,
    },
    /// Overlapping: a window of `size_ms` starts every `hop_ms`; a reading
    /// counts in every window that contains it.
    Hopping {
        /// Length, ms.
        size_ms: u64,
        /// Distance between window starts, ms.
        hop_ms: u64,
    },
    /// Per key, readings closer than `gap_ms` to each other form one window
    /// `[first, last + gap)`.
    Session {
        /// Inactivity that ends a session, ms.
        gap_ms: u64,
    },
}

/// One window: its bounds and what it accumulated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window<A> {
    /// Inclusive start, ms.
    pub start_ms: u64,
    /// Exclusive end, ms.
    pub end_ms: u64,
    /// The aggregate.
    pub value: A,
}

/// Open windows per key, durable. Name it in [`Function::state`](crate::Function::state).
#[derive(Debug, Clone)]
pub struct Windows<A> {
    kind: WindowKind,
    lateness_ms: u64,
    /// By (key, start).
    open: BTreeMap<(String, u64), Window<A>>,
    /// (end, key, start): what closes first.
    by_end: BTreeSet<(u64, String, u64)>,
    watermark_ms: u64,
    changed: BTreeSet<(String, u64)>,
    removed: BTreeSet<(String, u64)>,
    watermark_changed: bool,
}

impl<A: Aggregate> Windows<A> {
    fn with(kind: WindowKind) -> Self {
        Self {
            kind,
            lateness_ms: 0,
            open: BTreeMap::new(),
            by_end: BTreeSet::new(),
            watermark_ms: 0,
            changed: BTreeSet::new(),
            removed: BTreeSet::new(),
            watermark_changed: false,
        }
    }

    /// Back-to-back windows of `size_ms`.
    pub fn tumbling(size_ms: u64) -> Result<Self> {
        if size_ms == 0 {
            return Err(Error::new("a tumbling window's size must be > 0 ms"));
        }
        Ok(Self::with(WindowKind::Tumbling { size_ms }))
    }

    /// Windows of `size_ms` starting every `hop_ms`.
    pub fn hopping(size_ms: u64, hop_ms: u64) -> Result<Self> {
        if hop_ms == 0 || size_ms < hop_ms {
            return Err(Error::new(format!(
                "a hopping window needs 0 < hop ({hop_ms} ms) <= size ({size_ms} ms)"
            )));
        }
        Ok(Self::with(WindowKind::Hopping { size_ms, hop_ms }))
    }

    /// Sessions that end after `gap_ms` without a reading.
    pub fn session(gap_ms: u64) -> Result<Self> {
        if gap_ms == 0 {
            return Err(Error::new("a session gap must be > 0 ms"));
        }
        Ok(Self::with(WindowKind::Session { gap_ms }))
    }

    /// Keep windows open for readings up to `ms` behind the watermark.
    pub fn allowed_lateness(mut self, ms: u64) -> Self {
        self.lateness_ms = ms;
        self
    }

    /// The layout.
    pub fn kind(&self) -> WindowKind {
        self.kind
    }

    /// How far time has advanced (ms); never goes back.
    pub fn watermark_ms(&self) -> u64 {
        self.watermark_ms
    }

    /// Open windows, all keys.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// No open window.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Open windows in (key, start) order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Window<A>)> {
        self.open.iter().map(|((k, _), w)| (k.as_str(), w))
    }

    fn closed(&self, end_ms: u64) -> bool {
        end_ms.saturating_add(self.lateness_ms) <= self.watermark_ms
    }

    fn late(&self, key: &str, time_ms: u64, start: u64, end: u64) -> Error {
        Error::new(format!(
            "late reading: time {time_ms} ms falls in window [{start}, {end}) of `{key}`, \
             already closed at watermark {} ms (allowed lateness {} ms)",
            self.watermark_ms, self.lateness_ms
        ))
    }

    /// Count a reading at `time_ms` for `key`: `update` runs on every open
    /// window that contains it. `Err` (nothing changed) when every such
    /// window has already been emitted.
    pub fn add(&mut self, key: &str, time_ms: u64, mut update: impl FnMut(&mut A)) -> Result<()> {
        match self.kind {
            WindowKind::Tumbling { size_ms } => {
                let start = time_ms - time_ms % size_ms;
                let end = start.saturating_add(size_ms);
                if self.closed(end) {
                    return Err(self.late(key, time_ms, start, end));
                }
                update(&mut self.open_window(key, start, end).value);
            }
            WindowKind::Hopping { size_ms, hop_ms } => {
                let mut starts = Vec::new();
                let mut start = time_ms - time_ms % hop_ms;
                loop {
                    let end = start.saturating_add(size_ms);
                    if end <= time_ms {
                        break;
                    }
                    starts.push((start, end));
                    match start.checked_sub(hop_ms) {
                        Some(s) => start = s,
                        None => break,
                    }
                }
                let open: Vec<(u64, u64)> = starts
                    .iter()
                    .copied()
                    .filter(|&(_, e)| !self.closed(e))
                    .collect();
                let Some(&(first_start, first_end)) = starts.first() else {
                    return Err(Error::new("no window contains the reading"));
                };
                if open.is_empty() {
                    return Err(self.late(key, time_ms, first_start, first_end));
                }
                for (s, e) in open {
                    update(&mut self.open_window(key, s, e).value);
                }
            }
            WindowKind::Session { gap_ms } => {
                let mut start = time_ms;
                let mut end = time_ms.saturating_add(gap_ms);
                // Sessions this reading touches: they start before its window
                // ends and end after it starts.
                let touching: Vec<(String, u64)> = self
                    .open
                    .range((key.to_string(), 0)..(key.to_string(), end))
                    .filter(|(_, w)| w.end_ms > time_ms)
                    .map(|(k, _)| k.clone())
                    .collect();
                if touching.is_empty() && self.closed(end) {
                    return Err(self.late(key, time_ms, start, end));
                }
                let mut value = A::default();
                for k in touching {
                    if let Some(w) = self.take(&k) {
                        start = start.min(w.start_ms);
                        end = end.max(w.end_ms);
                        value.merge(w.value);
                    }
                }
                update(&mut value);
                self.put(
                    key,
                    Window {
                        start_ms: start,
                        end_ms: end,
                        value,
                    },
                );
            }
        }
        Ok(())
    }

    fn open_window(&mut self, key: &str, start: u64, end: u64) -> &mut Window<A> {
        let k = (key.to_string(), start);
        if !self.open.contains_key(&k) {
            self.by_end.insert((end, key.to_string(), start));
        }
        self.removed.remove(&k);
        self.changed.insert(k.clone());
        self.open.entry(k).or_insert_with(|| Window {
            start_ms: start,
            end_ms: end,
            value: A::default(),
        })
    }

    fn put(&mut self, key: &str, w: Window<A>) {
        let k = (key.to_string(), w.start_ms);
        self.by_end.insert((w.end_ms, key.to_string(), w.start_ms));
        self.removed.remove(&k);
        self.changed.insert(k.clone());
        self.open.insert(k, w);
    }

    fn take(&mut self, k: &(String, u64)) -> Option<Window<A>> {
        let w = self.open.remove(k)?;
        self.by_end.remove(&(w.end_ms, k.0.clone(), k.1));
        self.changed.remove(k);
        self.removed.insert(k.clone());
        Some(w)
    }

    /// Move the watermark to `time_ms` if that is later (ingest time: the
    /// tick's `now_ms`; event time: the latest event time seen).
    pub fn advance(&mut self, time_ms: u64) {
        if time_ms > self.watermark_ms {
            self.watermark_ms = time_ms;
            self.watermark_changed = true;
        }
    }

    /// Emit and forget every window the watermark has passed (end plus
    /// allowed lateness), in order of end, then key. If `emit` fails the
    /// window stays open and the error is returned (the host then rolls the
    /// call back, so nothing is lost).
    pub fn close(&mut self, mut emit: impl FnMut(&str, &Window<A>) -> Result<()>) -> Result<()> {
        while let Some((end, key, start)) = self.by_end.first().cloned() {
            if !self.closed(end) {
                break;
            }
            let k = (key, start);
            if let Some(w) = self.open.get(&k) {
                emit(&k.0, w)?;
            }
            self.take(&k);
        }
        Ok(())
    }
}

impl<A: Aggregate> Durable for Windows<A> {
    fn load(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        match key.split_first() {
            Some((b'm', [])) => {
                self.watermark_ms = serde_json::from_slice(value)?;
            }
            Some((b'w', k)) => {
                let (key, start): (String, u64) = serde_json::from_slice(k)
                    .map_err(|e| Error::new(format!("window key does not decode: {e}")))?;
                let w: Window<A> = serde_json::from_slice(value)
                    .map_err(|e| Error::new(format!("window does not decode: {e}")))?;
                if w.start_ms != start {
                    return Err(Error::new("window key and value disagree on the start"));
                }
                self.by_end.insert((w.end_ms, key.clone(), start));
                self.open.insert((key, start), w);
            }
            _ => return Err(Error::new("not a key of a window set")),
        }
        Ok(())
    }

    fn save(&mut self, out: &mut StateWriter<'_>) -> Result<()> {
        let wkey = |k: &(String, u64)| -> Result<Vec<u8>> {
            let mut v = vec![b'w'];
            serde_json::to_writer(&mut v, k)?;
            Ok(v)
        };
        for k in std::mem::take(&mut self.removed) {
            out.delete(&wkey(&k)?)?;
        }
        for k in std::mem::take(&mut self.changed) {
            if let Some(w) = self.open.get(&k) {
                out.put_json(&wkey(&k)?, w)?;
            }
        }
        if self.watermark_changed {
            out.put_json(b"m", &self.watermark_ms)?;
            self.watermark_changed = false;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::output::Output;
    use crate::state::StateSet;

    #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
    struct Count {
        n: u64,
        sum: u64,
    }

    impl Aggregate for Count {
        fn merge(&mut self, other: Self) {
            self.n += other.n;
            self.sum += other.sum;
        }
    }

    fn closed(w: &mut Windows<Count>) -> Vec<(String, u64, u64, u64)> {
        let mut out = Vec::new();
        w.close(|k, w| {
            out.push((k.to_string(), w.start_ms, w.end_ms, w.value.n));
            Ok(())
        })
        .unwrap();
        out
    }

    fn add(w: &mut Windows<Count>, key: &str, t: u64) -> Result<()> {
        w.add(key, t, |c| {
            c.n += 1;
            c.sum += t;
        })
    }

    #[test]
    fn tumbling_windows_close_at_the_watermark_plus_lateness() {
        let mut w = Windows::<Count>::tumbling(10).unwrap().allowed_lateness(5);
        for t in [1, 9, 10, 19, 3] {
            add(&mut w, "a", t).unwrap();
        }
        add(&mut w, "b", 12).unwrap();
        w.advance(14);
        assert_eq!(closed(&mut w), vec![], "10 + 5 > 14");
        w.advance(15);
        assert_eq!(closed(&mut w), vec![("a".into(), 0, 10, 3)]);
        let err = add(&mut w, "a", 4).unwrap_err();
        assert!(
            err.message()
                .contains("late reading: time 4 ms falls in window [0, 10)"),
            "{err}"
        );
        add(&mut w, "a", 11).unwrap();
        w.advance(10);
        assert_eq!(w.watermark_ms(), 15, "the watermark never goes back");
        w.advance(25);
        assert_eq!(
            closed(&mut w),
            vec![("a".into(), 10, 20, 3), ("b".into(), 10, 20, 1)]
        );
        assert!(w.is_empty());
    }

    #[test]
    fn hopping_windows_count_a_reading_in_each_window_that_holds_it() {
        let mut w = Windows::<Count>::hopping(10, 5).unwrap();
        add(&mut w, "a", 7).unwrap(); // [0,10) and [5,15)
        add(&mut w, "a", 12).unwrap(); // [5,15) and [10,20)
        w.advance(100);
        assert_eq!(
            closed(&mut w),
            vec![
                ("a".into(), 0, 10, 1),
                ("a".into(), 5, 15, 2),
                ("a".into(), 10, 20, 1)
            ]
        );
        assert!(Windows::<Count>::hopping(5, 10).is_err());
    }

    #[test]
    fn sessions_grow_and_merge_when_a_reading_bridges_them() {
        let mut w = Windows::<Count>::session(10).unwrap();
        add(&mut w, "a", 0).unwrap(); // [0,10)
        add(&mut w, "a", 30).unwrap(); // [30,40)
        add(&mut w, "b", 5).unwrap();
        assert_eq!(w.len(), 3);
        add(&mut w, "a", 15).unwrap(); // [15,25) touches neither
        assert_eq!(w.len(), 4);
        add(&mut w, "a", 8).unwrap(); // bridges [0,10) and [15,25) -> [0,25)
        assert_eq!(w.len(), 3);
        add(&mut w, "a", 24).unwrap(); // [24,34) bridges [0,25) and [30,40) -> [0,40)
        w.advance(1000);
        assert_eq!(
            closed(&mut w),
            vec![("b".into(), 5, 15, 1), ("a".into(), 0, 40, 5)]
        );
    }

    #[test]
    fn windows_survive_a_save_and_load() {
        let mut w = Windows::<Count>::tumbling(10).unwrap();
        add(&mut w, "a", 1).unwrap();
        add(&mut w, "b", 15).unwrap();
        w.advance(5);
        let mut out = Output::new(0);
        let mut set = StateSet::save(&mut out);
        set.add("w", &mut w);
        set.saved().unwrap();
        let writes = crate::state::tests::writes(&out);
        assert_eq!(writes.len(), 3, "{writes:?}");
        let mut restored = Windows::<Count>::tumbling(10).unwrap();
        for wr in &out.state {
            let key = &out.bytes[wr.key.offset as usize..][..wr.key.len as usize];
            let (name, key) = crate::state::split_key(key).unwrap();
            let v = wr.value.as_ref().unwrap();
            let value = &out.bytes[v.offset as usize..][..v.len as usize];
            let mut set = StateSet::load(name, key, value);
            set.add("w", &mut restored);
            set.loaded().unwrap().unwrap();
        }
        assert_eq!(restored.watermark_ms(), 5);
        restored.advance(100);
        assert_eq!(
            closed(&mut restored),
            vec![("a".into(), 0, 10, 1), ("b".into(), 10, 20, 1)]
        );
        // Closing deletes: the next save removes both windows.
        let mut out = Output::new(0);
        let mut set = StateSet::save(&mut out);
        set.add("w", &mut restored);
        set.saved().unwrap();
        let writes = crate::state::tests::writes(&out);
        assert_eq!(
            writes.iter().filter(|(_, v)| v.is_none()).count(),
            2,
            "{writes:?}"
        );
    }
}
