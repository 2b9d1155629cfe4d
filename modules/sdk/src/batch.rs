//! [`Batch`]: one `process` call's input, decoded from the columnar WIT
//! record once, then read by [`Message`](crate::Message) views without a copy.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::bindings::fogline::function::types::Batch as WitBatch;

/// Identifies the call a batch belongs to: a [`Message`](crate::Message) kept
/// from an earlier batch must not be emitted as "input `i`" of this one.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A decoded batch. Checked once at decode (lengths agree, ranges in bounds
/// and on UTF-8 boundaries), so the accessors cannot fail.
#[derive(Debug)]
pub(crate) struct Batch {
    pub(crate) id: u64,
    payloads: Vec<u8>,
    payload_ends: Vec<u32>,
    timestamps_ms: Vec<u64>,
    streams: Vec<u32>,
    stream_names: String,
    stream_name_ends: Vec<u32>,
}

impl Batch {
    /// Decode and check what the host sent.
    pub(crate) fn decode(b: WitBatch) -> Result<Self, String> {
        let n = b.payload_ends.len();
        if b.timestamps_ms.len() != n || b.streams.len() != n {
            return Err(format!(
                "malformed batch: {n} payload ends, {} timestamps, {} streams",
                b.timestamps_ms.len(),
                b.streams.len()
            ));
        }
        check_ends(&b.payload_ends, b.payloads.len(), "payload")?;
        check_ends(&b.stream_name_ends, b.stream_names.len(), "stream name")?;
        let names = String::from_utf8(b.stream_names)
            .map_err(|e| format!("malformed batch: stream names are not UTF-8: {e}"))?;
        if let Some(end) = b
            .stream_name_ends
            .iter()
            .find(|&&e| !names.is_char_boundary(e as usize))
        {
            return Err(format!(
                "malformed batch: a stream name ends at byte {end}, inside a character"
            ));
        }
        let table = b.stream_name_ends.len();
        if let Some(s) = b.streams.iter().find(|&&s| s as usize >= table) {
            return Err(format!(
                "malformed batch: stream index {s}, the table has {table}"
            ));
        }
        Ok(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            payloads: b.payloads,
            payload_ends: b.payload_ends,
            timestamps_ms: b.timestamps_ms,
            streams: b.streams,
            stream_names: names,
            stream_name_ends: b.stream_name_ends,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.payload_ends.len()
    }

    pub(crate) fn payload(&self, i: u32) -> &[u8] {
        let (start, end) = span(&self.payload_ends, i as usize);
        &self.payloads[start..end]
    }

    pub(crate) fn stream(&self, i: u32) -> &str {
        let s = self.streams[i as usize] as usize;
        let (start, end) = span(&self.stream_name_ends, s);
        &self.stream_names[start..end]
    }

    pub(crate) fn timestamp_ms(&self, i: u32) -> u64 {
        self.timestamps_ms[i as usize]
    }
}

/// `[ends[i-1], ends[i])`, the first item starting at 0.
fn span(ends: &[u32], i: usize) -> (usize, usize) {
    let start = if i == 0 { 0 } else { ends[i - 1] as usize };
    (start, ends[i] as usize)
}

/// Ends never decrease and the last is within the buffer.
fn check_ends(ends: &[u32], len: usize, what: &str) -> Result<(), String> {
    let mut prev = 0u32;
    for &e in ends {
        if e < prev {
            return Err(format!("malformed batch: {what} ends go backwards"));
        }
        prev = e;
    }
    if prev as usize > len {
        return Err(format!(
            "malformed batch: {what} ends at {prev}, the buffer holds {len} bytes"
        ));
    }
    Ok(())
}

/// One `(key, value)` state entry, borrowed.
pub(crate) type Entry<'a> = (&'a [u8], &'a [u8]);

/// Columnar state entries (`restore`), as `(key, value)` pairs.
pub(crate) fn state_entries(
    e: &crate::bindings::fogline::function::types::StateEntries,
) -> Result<Vec<Entry<'_>>, String> {
    if e.key_ends.len() != e.value_ends.len() {
        return Err(format!(
            "malformed state: {} keys, {} values",
            e.key_ends.len(),
            e.value_ends.len()
        ));
    }
    check_ends(&e.key_ends, e.keys.len(), "state key")?;
    check_ends(&e.value_ends, e.values.len(), "state value")?;
    Ok((0..e.key_ends.len())
        .map(|i| {
            let (ks, ke) = span(&e.key_ends, i);
            let (vs, ve) = span(&e.value_ends, i);
            (&e.keys[ks..ke], &e.values[vs..ve])
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;

    /// A batch as the host would send it: `(stream, timestamp, payload)`.
    pub(crate) fn wit_batch(items: &[(&str, u64, &[u8])]) -> WitBatch {
        let inputs: Vec<crate::harness::Input> = items
            .iter()
            .map(|(s, t, p)| crate::harness::Input::new(*s, *t, p.to_vec()))
            .collect();
        crate::harness::wit_batch(&inputs)
    }

    #[test]
    fn decodes_and_reads_each_message() {
        let b = Batch::decode(wit_batch(&[
            ("a/1", 5, b"x"),
            ("b", 6, b""),
            ("a/1", 7, b"zz"),
        ]))
        .unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(
            (b.stream(0), b.payload(0), b.timestamp_ms(0)),
            ("a/1", &b"x"[..], 5)
        );
        assert_eq!((b.stream(1), b.payload(1)), ("b", &b""[..]));
        assert_eq!((b.stream(2), b.payload(2)), ("a/1", &b"zz"[..]));
    }

    #[test]
    fn malformed_batches_are_errors_not_panics() {
        let mut w = wit_batch(&[("a", 1, b"xy")]);
        w.payload_ends[0] = 9;
        assert!(Batch::decode(w).unwrap_err().contains("payload ends at 9"));
        let mut w = wit_batch(&[("a", 1, b"xy")]);
        w.streams[0] = 3;
        assert!(Batch::decode(w).unwrap_err().contains("stream index 3"));
        let mut w = wit_batch(&[("é", 1, b"")]);
        w.stream_name_ends[0] = 1;
        assert!(Batch::decode(w).unwrap_err().contains("inside a character"));
        let mut w = wit_batch(&[("a", 1, b"x"), ("a", 2, b"y")]);
        w.timestamps_ms.pop();
        assert!(Batch::decode(w).unwrap_err().contains("1 timestamps"));
    }
}
