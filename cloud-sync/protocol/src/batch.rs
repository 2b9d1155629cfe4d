//! Records and the compressed columnar batch block.
//!
//! Uncompressed block layout (all integers LEB128 varints):
//!
//! ```text
//! count
//! seq:        first, then count-1 × (delta - 1)            (strictly increasing, gaps allowed)
//! timestamp:  first, then count-1 × zigzag(delta)          (may go backwards across streams; wrapping)
//! streams:    dict_len, dict_len × str, then count × index  (dictionary in first-seen order)
//! payloads:   count × len, then all payload bytes concatenated
//! ```
//!
//! The block is compressed with zstd as one frame. Decompression is bounded by the
//! `raw_len` declared in the frame header, itself capped at [`MAX_BATCH_RAW_BYTES`]
//! and at [`MAX_INFLATION`] times the compressed block: a block that inflates beyond
//! it is refused, never allocated. A block zstd would shrink more than that is sent
//! uncompressed instead.
//!
//! Columns keep like with like: the seq and timestamp columns shrink to about one
//! byte per record, and the payload column holds only payload bytes back to back, which
//! gives zstd long repeated runs (JSON keys, sensor ids) to match.

use std::collections::HashMap;

use super::frame::{BatchFrame, BlockCodec};
use super::wire::{put_str, put_varint, unzigzag, zigzag, Reader};
use super::{
    DecodeError, MAX_BATCH_RAW_BYTES, MAX_BATCH_RECORDS, MAX_INFLATION, MAX_RECORD_PAYLOAD_BYTES,
    MAX_STREAM_NAME_BYTES,
};

/// Default zstd level for batch blocks. The columnar block compresses as
/// well at level 1 as at 3 (4.8 vs 5.2 bytes per reading in the drain
/// bench) for less of the gateway's CPU.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// One record from the edge outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Per-node sequence number, strictly increasing (gaps possible).
    pub seq: u64,
    /// Stream (topic) the record belongs to.
    pub stream: String,
    /// Event time in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Opaque payload (often JSON).
    pub payload: Vec<u8>,
}

/// A batch could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// A batch must hold at least one record.
    #[error("batch is empty")]
    Empty,
    /// Records are not strictly ascending by seq.
    #[error(
        "records not strictly ascending by seq: record {index} has seq {seq} after seq {prev}"
    )]
    NotAscending {
        /// Position in the slice.
        index: usize,
        /// Seq of the previous record.
        prev: u64,
        /// Seq of this record.
        seq: u64,
    },
    /// Too many records in one batch.
    #[error("batch has {count} records, limit is {max}")]
    TooManyRecords {
        /// Records given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A stream name is too long.
    #[error("stream name of record seq {seq} is {len} bytes, limit is {max}")]
    StreamNameTooLong {
        /// Seq of the offending record.
        seq: u64,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A payload is too large for the protocol.
    #[error("payload of record seq {seq} is {len} bytes, limit is {max}")]
    PayloadTooLarge {
        /// Seq of the offending record.
        seq: u64,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The uncompressed block is too large; split the batch.
    #[error(
        "batch block is {size} bytes uncompressed, limit is {max}; send fewer records per batch"
    )]
    TooLarge {
        /// Uncompressed size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// zstd failed.
    #[error("zstd compression failed: {0}")]
    Compress(#[from] std::io::Error),
}

/// Checks that `records` is non-empty, strictly ascending and within limits.
pub fn validate_records(records: &[Record]) -> Result<(), BatchError> {
    if records.is_empty() {
        return Err(BatchError::Empty);
    }
    if records.len() > MAX_BATCH_RECORDS {
        return Err(BatchError::TooManyRecords {
            count: records.len(),
            max: MAX_BATCH_RECORDS,
        });
    }
    for (index, pair) in records.windows(2).enumerate() {
        if pair[1].seq <= pair[0].seq {
            return Err(BatchError::NotAscending {
                index: index + 1,
                prev: pair[0].seq,
                seq: pair[1].seq,
            });
        }
    }
    for r in records {
        if r.stream.len() > MAX_STREAM_NAME_BYTES {
            return Err(BatchError::StreamNameTooLong {
                seq: r.seq,
                len: r.stream.len(),
                max: MAX_STREAM_NAME_BYTES,
            });
        }
        if r.payload.len() > MAX_RECORD_PAYLOAD_BYTES {
            return Err(BatchError::PayloadTooLarge {
                seq: r.seq,
                len: r.payload.len(),
                max: MAX_RECORD_PAYLOAD_BYTES,
            });
        }
    }
    Ok(())
}

/// Builds the uncompressed columnar block. Records must already be validated.
fn columnar(records: &[Record]) -> Vec<u8> {
    let payload_bytes: usize = records.iter().map(|r| r.payload.len()).sum();
    let mut out = Vec::with_capacity(payload_bytes + records.len() * 6 + 64);
    put_varint(&mut out, records.len() as u64);

    let mut prev = None;
    for r in records {
        match prev {
            None => put_varint(&mut out, r.seq),
            Some(p) => put_varint(&mut out, r.seq - p - 1),
        }
        prev = Some(r.seq);
    }

    let mut prev_ts = None;
    for r in records {
        match prev_ts {
            None => put_varint(&mut out, r.timestamp_ms),
            Some(p) => put_varint(&mut out, zigzag(r.timestamp_ms.wrapping_sub(p) as i64)),
        }
        prev_ts = Some(r.timestamp_ms);
    }

    let mut dict: HashMap<&str, u64> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    let mut indices = Vec::with_capacity(records.len());
    for r in records {
        let next = order.len() as u64;
        let idx = *dict.entry(r.stream.as_str()).or_insert_with(|| {
            order.push(r.stream.as_str());
            next
        });
        indices.push(idx);
    }
    put_varint(&mut out, order.len() as u64);
    for s in &order {
        put_str(&mut out, s);
    }
    for idx in indices {
        put_varint(&mut out, idx);
    }

    for r in records {
        put_varint(&mut out, r.payload.len() as u64);
    }
    for r in records {
        out.extend_from_slice(&r.payload);
    }
    out
}

/// Encodes and compresses `records` (strictly ascending by seq) into a batch frame.
pub fn encode_batch(records: &[Record], zstd_level: i32) -> Result<BatchFrame, BatchError> {
    validate_records(records)?;
    let raw = columnar(records);
    let raw_len = raw.len();
    if raw_len > MAX_BATCH_RAW_BYTES {
        return Err(BatchError::TooLarge {
            size: raw.len(),
            max: MAX_BATCH_RAW_BYTES,
        });
    }
    // One compression context per thread, reused: creating one per batch
    // costs more than compressing a small batch.
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    let block = COMPRESSOR.with(|c| -> std::io::Result<Vec<u8>> {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(level, _)| *level != zstd_level) {
            *c = Some((zstd_level, zstd::bulk::Compressor::new(zstd_level)?));
        }
        match c.as_mut() {
            Some((_, compressor)) => compressor.compress(&raw),
            None => zstd::bulk::compress(&raw, zstd_level),
        }
    })?;
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Err(BatchError::Empty);
    };
    // A block that zstd shrinks more than MAX_INFLATION times would break
    // the receiver's memory bound (it refuses such blocks): send it as is.
    let (codec, block) = if raw.len() > MAX_INFLATION.saturating_mul(block.len()) {
        (BlockCodec::None, raw)
    } else {
        (BlockCodec::Zstd, block)
    };
    Ok(BatchFrame {
        first_seq: first.seq,
        last_seq: last.seq,
        // Both bounded by the checks above.
        record_count: records.len() as u32,
        raw_len: raw_len as u32,
        codec,
        block,
        // In order unless the sender says otherwise (see BatchFrame::floor).
        floor: last.seq.saturating_add(1),
    })
}

fn invalid(msg: impl Into<String>) -> DecodeError {
    DecodeError::InvalidBatch(msg.into())
}

/// A byte range inside a decoded block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn of(raw: &[u8], r: &Reader<'_>, len: usize) -> Span {
        // Both below MAX_BATCH_RAW_BYTES < 2^32, checked by the caller.
        Span {
            start: (raw.len() - r.remaining()) as u32,
            len: len as u32,
        }
    }

    fn slice<'a>(&self, raw: &'a [u8]) -> &'a [u8] {
        raw.get(self.start as usize..(self.start + self.len) as usize)
            .unwrap_or_default()
    }
}

/// Per-record memory of a [`DecodedBatch`] besides the block itself: seq,
/// timestamp, stream index and payload span, plus one stream-name span (the
/// name table holds at most one entry per record). Found short by 8 by the
/// `batch_decoder` fuzz target (`fuzz/regressions/batch_decoder/`).
const DECODED_BYTES_PER_RECORD: usize = 8 + 8 + 4 + 8 + 8;

/// Every record costs at least this many bytes of the uncompressed block
/// (seq, timestamp, stream index and payload length, one byte each at least).
const MIN_RECORD_BYTES: usize = 4;

/// The most memory [`decode_batch`] allocates for a block of `raw_len`
/// uncompressed bytes: the block plus the columns of as many records as it
/// can hold. With `raw_len ≤ MAX_INFLATION × frame bytes`, decoding a frame
/// never costs more than `decoded_bytes_bound(MAX_INFLATION × frame_len)`.
pub fn decoded_bytes_bound(raw_len: usize) -> usize {
    raw_len + raw_len / MIN_RECORD_BYTES * DECODED_BYTES_PER_RECORD
}

/// A decoded batch, column by column: payloads and stream names stay in the
/// one decompressed block and are lent out as slices, so decoding costs one
/// allocation per column, never one per record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedBatch {
    raw: Vec<u8>,
    seqs: Vec<u64>,
    timestamps: Vec<u64>,
    dict: Vec<Span>,
    stream_of: Vec<u32>,
    payloads: Vec<Span>,
}

/// One record of a [`DecodedBatch`], borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// Per-node sequence number.
    pub seq: u64,
    /// Stream (topic) name.
    pub stream: &'a str,
    /// Event time in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Payload bytes.
    pub payload: &'a [u8],
}

impl RecordRef<'_> {
    /// An owned copy.
    pub fn to_record(&self) -> Record {
        Record {
            seq: self.seq,
            stream: self.stream.to_string(),
            timestamp_ms: self.timestamp_ms,
            payload: self.payload.to_vec(),
        }
    }
}

impl DecodedBatch {
    /// Number of records (at least one).
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Never true for a batch that decoded.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Seq of the first record.
    pub fn first_seq(&self) -> u64 {
        self.seqs.first().copied().unwrap_or(0)
    }

    /// Seq of the last record.
    pub fn last_seq(&self) -> u64 {
        self.seqs.last().copied().unwrap_or(0)
    }

    /// Record `i`, if there is one.
    pub fn get(&self, i: usize) -> Option<RecordRef<'_>> {
        (i < self.len()).then(|| self.record(i))
    }

    /// The records in seq order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = RecordRef<'_>> + '_ {
        (0..self.len()).map(move |i| self.record(i))
    }

    /// Record `i < len()`. Every column has `len()` entries and every stream
    /// index is within the dictionary: `decode_columnar` checked both.
    fn record(&self, i: usize) -> RecordRef<'_> {
        let stream = self.dict[self.stream_of[i] as usize].slice(&self.raw);
        RecordRef {
            seq: self.seqs[i],
            // Checked to be UTF-8 when decoded.
            stream: std::str::from_utf8(stream).unwrap_or_default(),
            timestamp_ms: self.timestamps[i],
            payload: self.payloads[i].slice(&self.raw),
        }
    }

    /// Owned copies of every record.
    pub fn to_records(&self) -> Vec<Record> {
        self.iter().map(|r| r.to_record()).collect()
    }

    /// Heap bytes held (for accounting).
    pub fn heap_bytes(&self) -> usize {
        self.raw.capacity()
            + (self.seqs.capacity() + self.timestamps.capacity()) * 8
            + (self.dict.capacity() + self.payloads.capacity()) * 8
            + self.stream_of.capacity() * 4
    }
}

/// Decompresses and decodes a batch, checking it against its header: count,
/// first and last seq, strict order.
///
/// **Bounded:** the declared `raw_len` must be within [`MAX_BATCH_RAW_BYTES`]
/// and, for zstd, within [`MAX_INFLATION`] times the block; decompression
/// stops at `raw_len`. Total allocation is at most
/// [`decoded_bytes_bound`]`(raw_len)`, so a frame of `n` bytes can never cost
/// more than `decoded_bytes_bound(MAX_INFLATION × n)`. Runs zstd: call it
/// from a blocking thread, not an async worker.
pub fn decode_batch(frame: &BatchFrame) -> Result<DecodedBatch, DecodeError> {
    let raw_len = frame.raw_len as usize;
    if raw_len > MAX_BATCH_RAW_BYTES {
        return Err(DecodeError::TooLarge {
            field: "Batch.raw_len",
            value: raw_len as u64,
            max: MAX_BATCH_RAW_BYTES as u64,
        });
    }
    if frame.record_count == 0 {
        return Err(invalid("record_count is 0"));
    }
    if frame.last_seq < frame.first_seq {
        return Err(invalid(format!(
            "last_seq {} is below first_seq {}",
            frame.last_seq, frame.first_seq
        )));
    }
    let raw = match frame.codec {
        BlockCodec::None => {
            if frame.block.len() != raw_len {
                return Err(invalid(format!(
                    "uncompressed block is {} bytes, header declared {raw_len}",
                    frame.block.len()
                )));
            }
            frame.block.clone()
        }
        BlockCodec::Zstd => {
            let cap = MAX_INFLATION.saturating_mul(frame.block.len());
            if raw_len > cap {
                return Err(DecodeError::TooLarge {
                    field: "Batch.raw_len (more than MAX_INFLATION × the block)",
                    value: raw_len as u64,
                    max: cap as u64,
                });
            }
            decompress(&frame.block, raw_len)?
        }
    };
    let batch = decode_columnar(raw)?;
    if batch.len() != frame.record_count as usize {
        return Err(invalid(format!(
            "block holds {} records, header says {}",
            batch.len(),
            frame.record_count
        )));
    }
    if batch.first_seq() != frame.first_seq || batch.last_seq() != frame.last_seq {
        return Err(invalid(format!(
            "block spans seq {}..={}, header says {}..={}",
            batch.first_seq(),
            batch.last_seq(),
            frame.first_seq,
            frame.last_seq
        )));
    }
    Ok(batch)
}

/// zstd into a buffer of exactly `raw_len` bytes: a block that inflates
/// beyond it fails instead of growing the buffer.
fn decompress(block: &[u8], raw_len: usize) -> Result<Vec<u8>, DecodeError> {
    // One context per thread, reused: creating one costs more than
    // decompressing a small batch.
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let raw = DECOMPRESSOR
        .with(|d| -> std::io::Result<Vec<u8>> {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new()?);
            }
            match d.as_mut() {
                Some(dec) => dec.decompress(block, raw_len),
                None => zstd::bulk::decompress(block, raw_len),
            }
        })
        .map_err(|e| {
            DecodeError::Decompress(format!("{e} (declared uncompressed size {raw_len} bytes)"))
        })?;
    if raw.len() != raw_len {
        return Err(DecodeError::Decompress(format!(
            "block inflated to {} bytes, header declared {raw_len}",
            raw.len()
        )));
    }
    Ok(raw)
}

fn decode_columnar(raw: Vec<u8>) -> Result<DecodedBatch, DecodeError> {
    let mut r = Reader::new(&raw);
    let count = r.varint_max("batch.count", MAX_BATCH_RECORDS as u64)? as usize;
    if count == 0 {
        return Err(invalid("count is 0"));
    }
    // A lying count cannot make us allocate more than the block justifies.
    if count > raw.len() / MIN_RECORD_BYTES {
        return Err(invalid(format!(
            "count {count} cannot fit in a {}-byte block",
            raw.len()
        )));
    }

    let mut seqs = Vec::with_capacity(count);
    let mut seq = r.varint("batch.seq")?;
    seqs.push(seq);
    for _ in 1..count {
        let d = r.varint("batch.seq delta")?;
        seq = seq
            .checked_add(d)
            .and_then(|s| s.checked_add(1))
            .ok_or_else(|| invalid("seq overflows u64"))?;
        seqs.push(seq);
    }

    let mut timestamps = Vec::with_capacity(count);
    let mut ts = r.varint("batch.timestamp")?;
    timestamps.push(ts);
    for _ in 1..count {
        let d = unzigzag(r.varint("batch.timestamp delta")?);
        // Wrapping: the exact inverse of the encoder's wrapping_sub, so any
        // u64 timestamps round-trip.
        ts = ts.wrapping_add(d as u64);
        timestamps.push(ts);
    }

    let dict_len = r.varint_max("batch.stream dictionary length", count as u64)? as usize;
    let mut dict = Vec::with_capacity(dict_len);
    for _ in 0..dict_len {
        let len = r.varint_max("batch.stream name", MAX_STREAM_NAME_BYTES as u64)? as usize;
        let span = Span::of(&raw, &r, len);
        let name = r.bytes("batch.stream name", len)?;
        if std::str::from_utf8(name).is_err() {
            return Err(DecodeError::InvalidUtf8 {
                field: "batch.stream name",
            });
        }
        dict.push(span);
    }
    let mut stream_of = Vec::with_capacity(count);
    for _ in 0..count {
        let i = r.varint("batch.stream index")?;
        if i >= dict_len as u64 {
            return Err(invalid(format!(
                "stream index {i} outside dictionary of {dict_len}"
            )));
        }
        stream_of.push(i as u32);
    }

    let mut payloads = Vec::with_capacity(count);
    let mut total: u64 = 0;
    let mut lens = Reader::new(&raw[raw.len() - r.remaining()..]);
    for _ in 0..count {
        let len = r.varint_max(
            "batch.payload length",
            (raw.len().min(MAX_RECORD_PAYLOAD_BYTES)) as u64,
        )?;
        total += len;
    }
    if total != r.remaining() as u64 {
        return Err(invalid(format!(
            "payload lengths sum to {total} bytes, {} bytes remain",
            r.remaining()
        )));
    }
    for _ in 0..count {
        // Re-read the lengths checked above, now knowing where payloads start.
        let len = lens.varint("batch.payload length")? as usize;
        let span = Span::of(&raw, &r, len);
        r.bytes("batch.payload", len)?;
        payloads.push(span);
    }
    r.finish("batch block")?;
    Ok(DecodedBatch {
        raw,
        seqs,
        timestamps,
        dict,
        stream_of,
        payloads,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `n` JSON readings over `streams` streams, seq from 1 (deterministic).
    pub(crate) fn readings(n: usize, streams: usize) -> Vec<Record> {
        (0..n)
            .map(|i| {
                let s = i % streams.max(1);
                Record {
                    seq: i as u64 + 1,
                    stream: format!("sensors/s{s}"),
                    timestamp_ms: 1_764_000_000_000 + (i as u64) * 100,
                    payload: format!(r#"{{"sensor":"s{s}","temp":{}.5,"n":{i}}}"#, 20 + i % 7)
                        .into_bytes(),
                }
            })
            .collect()
    }

    fn arb_records() -> impl Strategy<Value = Vec<Record>> {
        (
            any::<u64>(),
            proptest::collection::vec(
                (
                    0u64..1000,
                    any::<u64>(),
                    0usize..4,
                    proptest::collection::vec(any::<u8>(), 0..40),
                ),
                1..60,
            ),
        )
            .prop_map(|(start, items)| {
                let mut seq = start % (u64::MAX / 2);
                items
                    .into_iter()
                    .map(|(gap, ts, stream, payload)| {
                        seq += gap + 1;
                        Record {
                            seq,
                            stream: ["a", "sensors/t1", "", "ünïcode"][stream].to_string(),
                            timestamp_ms: ts,
                            payload,
                        }
                    })
                    .collect()
            })
    }

    proptest! {
        #[test]
        fn batch_round_trip(records in arb_records()) {
            let frame = encode_batch(&records, DEFAULT_ZSTD_LEVEL).unwrap();
            let decoded = decode_batch(&frame).unwrap();
            prop_assert_eq!(decoded.len(), records.len());
            prop_assert_eq!(decoded.to_records(), records);
        }

        #[test]
        fn random_blocks_never_panic(
            block in proptest::collection::vec(any::<u8>(), 0..512),
            raw_len in 0u32..4096,
            count in 0u32..100,
            zstd in any::<bool>(),
        ) {
            let codec = if zstd { BlockCodec::Zstd } else { BlockCodec::None };
            let frame = BatchFrame { first_seq: 1, last_seq: 5, record_count: count, raw_len, codec, block, floor: 6 };
            let _ = decode_batch(&frame);
        }

        #[test]
        fn corrupted_raw_blocks_are_errors_not_panics(
            records in arb_records(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            cut in any::<usize>(),
        ) {
            let mut raw = columnar(&records);
            for (pos, byte) in flips {
                let i = pos % raw.len();
                raw[i] ^= byte | 1;
            }
            raw.truncate(cut % (raw.len() + 1));
            let _ = decode_columnar(raw.clone());
            let block = zstd::bulk::compress(&raw, 1).unwrap();
            let frame = BatchFrame {
                first_seq: records[0].seq,
                last_seq: records[records.len() - 1].seq,
                record_count: records.len() as u32,
                raw_len: raw.len() as u32,
                codec: BlockCodec::Zstd,
                block,
                floor: 0,
            };
            let _ = decode_batch(&frame);
            let frame = BatchFrame { codec: BlockCodec::None, block: raw, ..frame };
            let _ = decode_batch(&frame);
        }
    }

    #[test]
    fn zstd_bomb_is_refused() {
        // 256 MiB of zeros compresses to a few KiB.
        let huge = vec![0u8; 256 * 1024 * 1024];
        let block = zstd::bulk::compress(&huge, 3).unwrap();
        assert!(block.len() < 64 * 1024, "bomb is {} bytes", block.len());
        drop(huge);
        // Declared honestly: over the raw cap, refused before decompressing.
        let frame = BatchFrame {
            first_seq: 1,
            last_seq: 1,
            record_count: 1,
            raw_len: u32::MAX,
            codec: BlockCodec::Zstd,
            block: block.clone(),
            floor: 2,
        };
        assert!(matches!(
            decode_batch(&frame),
            Err(DecodeError::TooLarge {
                field: "Batch.raw_len",
                ..
            })
        ));
        // Declared within the cap but beyond MAX_INFLATION × the block:
        // refused before decompressing.
        let frame = BatchFrame {
            raw_len: (block.len() * MAX_INFLATION + 1) as u32,
            ..frame
        };
        assert!(matches!(
            decode_batch(&frame),
            Err(DecodeError::TooLarge { .. })
        ));
        // Declared small: decompression stops at the declared size and fails.
        let frame = BatchFrame {
            raw_len: 1024,
            ..frame
        };
        let err = decode_batch(&frame).unwrap_err();
        assert!(matches!(err, DecodeError::Decompress(_)), "{err}");
    }

    #[test]
    fn a_block_zstd_would_shrink_too_far_is_sent_uncompressed_and_round_trips() {
        let records: Vec<Record> = (1..=64)
            .map(|seq| Record {
                seq,
                stream: "s".into(),
                timestamp_ms: 0,
                payload: vec![0; 64 * 1024],
            })
            .collect();
        let frame = encode_batch(&records, DEFAULT_ZSTD_LEVEL).unwrap();
        assert_eq!(frame.codec, BlockCodec::None);
        assert_eq!(frame.block.len(), frame.raw_len as usize);
        assert_eq!(decode_batch(&frame).unwrap().to_records(), records);
        // Ordinary telemetry is compressed.
        let frame = encode_batch(&readings(1000, 4), DEFAULT_ZSTD_LEVEL).unwrap();
        assert_eq!(frame.codec, BlockCodec::Zstd);
        assert!(frame.block.len() * 4 < frame.raw_len as usize);
    }

    #[test]
    fn a_long_stream_name_is_held_once_not_per_record() {
        // The amplification of issue 6: a 1 KiB stream name shared by many
        // records must cost its bytes once.
        let name = "n".repeat(MAX_STREAM_NAME_BYTES);
        let records: Vec<Record> = (1..=20_000)
            .map(|seq| Record {
                seq,
                stream: name.clone(),
                timestamp_ms: 0,
                payload: Vec::new(),
            })
            .collect();
        let frame = encode_batch(&records, DEFAULT_ZSTD_LEVEL).unwrap();
        let decoded = decode_batch(&frame).unwrap();
        assert!(decoded.heap_bytes() <= decoded_bytes_bound(frame.raw_len as usize));
        assert!(
            decoded.heap_bytes() < 1024 * 1024,
            "{}",
            decoded.heap_bytes()
        );
        assert_eq!(decoded.get(19_999).unwrap().stream, name);
    }

    #[test]
    fn header_mismatch_is_refused() {
        let records = readings(10, 3);
        let mut frame = encode_batch(&records, 3).unwrap();
        frame.record_count = 9;
        assert!(decode_batch(&frame).is_err());
        let mut frame = encode_batch(&records, 3).unwrap();
        frame.last_seq += 1;
        assert!(decode_batch(&frame).is_err());
        let mut frame = encode_batch(&records, 3).unwrap();
        frame.raw_len += 1;
        assert!(decode_batch(&frame).is_err());
    }

    #[test]
    fn encoder_rejects_unordered_and_empty() {
        let mut records = readings(5, 2);
        records.swap(1, 2);
        assert!(matches!(
            encode_batch(&records, 3),
            Err(BatchError::NotAscending { index: 2, .. })
        ));
        assert!(matches!(encode_batch(&[], 3), Err(BatchError::Empty)));
        let mut records = readings(5, 2);
        records[3].seq = records[2].seq;
        assert!(encode_batch(&records, 3).is_err());
    }
}
