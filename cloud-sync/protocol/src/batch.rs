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
//! `raw_len` declared in the frame header, itself capped at [`MAX_BATCH_RAW_BYTES`]:
//! a block that inflates beyond it is refused, never allocated.
//!
//! Columns keep like with like: the seq and timestamp columns shrink to about one
//! byte per record, and the payload column holds only payload bytes back to back, which
//! gives zstd long repeated runs (JSON keys, sensor ids) to match.

use std::collections::HashMap;

use super::frame::BatchFrame;
use super::wire::{put_str, put_varint, unzigzag, zigzag, Reader};
use super::{
    DecodeError, MAX_BATCH_RAW_BYTES, MAX_BATCH_RECORDS, MAX_RECORD_PAYLOAD_BYTES,
    MAX_STREAM_NAME_BYTES,
};

/// Default zstd level for batch blocks.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

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
    if raw.len() > MAX_BATCH_RAW_BYTES {
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
    Ok(BatchFrame {
        first_seq: first.seq,
        last_seq: last.seq,
        // Both bounded by the checks above.
        record_count: records.len() as u32,
        raw_len: raw.len() as u32,
        block,
    })
}

fn invalid(msg: impl Into<String>) -> DecodeError {
    DecodeError::InvalidBatch(msg.into())
}

/// Decompresses (bounded by the declared `raw_len`) and decodes a batch,
/// checking it against its header: count, first and last seq, strict order.
pub fn decode_batch(frame: &BatchFrame) -> Result<Vec<Record>, DecodeError> {
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
    // Bounded: the output buffer is exactly `raw_len` bytes; a block that
    // inflates beyond it fails instead of growing the buffer.
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
                // Bounded by the declared size, checked before (a bomb is refused).
                Some(dec) => dec.decompress(&frame.block, raw_len),
                None => zstd::bulk::decompress(&frame.block, raw_len),
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
    let records = decode_columnar(&raw)?;
    if records.len() != frame.record_count as usize {
        return Err(invalid(format!(
            "block holds {} records, header says {}",
            records.len(),
            frame.record_count
        )));
    }
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Err(invalid("block holds no records"));
    };
    if first.seq != frame.first_seq || last.seq != frame.last_seq {
        return Err(invalid(format!(
            "block spans seq {}..={}, header says {}..={}",
            first.seq, last.seq, frame.first_seq, frame.last_seq
        )));
    }
    Ok(records)
}

fn decode_columnar(raw: &[u8]) -> Result<Vec<Record>, DecodeError> {
    let mut r = Reader::new(raw);
    let count = r.varint_max("batch.count", MAX_BATCH_RECORDS as u64)? as usize;
    if count == 0 {
        return Err(invalid("count is 0"));
    }
    // Every record costs at least 4 bytes in the block (seq, ts, index, len),
    // so a lying count cannot make us allocate more than the block justifies.
    if count > raw.len() / 4 {
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
        dict.push(r.string("batch.stream name", MAX_STREAM_NAME_BYTES)?);
    }
    let mut stream_idx = Vec::with_capacity(count);
    for _ in 0..count {
        let i = r.varint("batch.stream index")?;
        if i >= dict_len as u64 {
            return Err(invalid(format!(
                "stream index {i} outside dictionary of {dict_len}"
            )));
        }
        stream_idx.push(i as usize);
    }

    let mut lens = Vec::with_capacity(count);
    let mut total: u64 = 0;
    for _ in 0..count {
        let len = r.varint_max(
            "batch.payload length",
            (raw.len().min(MAX_RECORD_PAYLOAD_BYTES)) as u64,
        )?;
        total += len;
        lens.push(len as usize);
    }
    if total != r.remaining() as u64 {
        return Err(invalid(format!(
            "payload lengths sum to {total} bytes, {} bytes remain",
            r.remaining()
        )));
    }

    let mut records = Vec::with_capacity(count);
    for i in 0..count {
        let payload = r.bytes("batch.payload", lens[i])?.to_vec();
        records.push(Record {
            seq: seqs[i],
            stream: dict[stream_idx[i]].clone(),
            timestamp_ms: timestamps[i],
            payload,
        });
    }
    r.finish("batch block")?;
    Ok(records)
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
            prop_assert_eq!(decode_batch(&frame).unwrap(), records);
        }

        #[test]
        fn random_blocks_never_panic(
            block in proptest::collection::vec(any::<u8>(), 0..512),
            raw_len in 0u32..4096,
            count in 0u32..100,
        ) {
            let frame = BatchFrame { first_seq: 1, last_seq: 5, record_count: count, raw_len, block };
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
            let _ = decode_columnar(&raw);
            let block = zstd::bulk::compress(&raw, 1).unwrap();
            let frame = BatchFrame {
                first_seq: records[0].seq,
                last_seq: records[records.len() - 1].seq,
                record_count: records.len() as u32,
                raw_len: raw.len() as u32,
                block,
            };
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
            block: block.clone(),
        };
        assert!(matches!(
            decode_batch(&frame),
            Err(DecodeError::TooLarge {
                field: "Batch.raw_len",
                ..
            })
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
