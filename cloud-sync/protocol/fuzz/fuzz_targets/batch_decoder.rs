//! `decode_batch` on arbitrary input. Input: `mode:u8  rest`, by `mode % 4`:
//!
//! * 0: `rest` is the body of a version 3 `Batch` frame after the type byte
//!   (first_seq, last_seq, record_count, raw_len varints, codec byte, block);
//! * 1: `rest` is an uncompressed columnar block; the header (first/last seq,
//!   count, raw_len) is read off the block so the fuzzer gets past the
//!   header checks into the column decoder;
//! * 2: as 1, but the block is zstd-compressed by the harness (codec Zstd);
//! * 3: as 0, for a version 2 peer (no codec byte, always zstd).
//!
//! Checks: no panic; allocation within the frame budget and within
//! the bound `decode_batch` documents (`decoded_bytes_bound(raw_len)`);
//! decoded records survive encode_batch → decode_batch unchanged.
#![no_main]

use fogline_protocol::{BatchFrame, BlockCodec, Frame, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use fogline_protocol_fuzz::{check_batch, warm_up};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: warm_up(),
    |data: &[u8]| {
        let Some((&mode, rest)) = data.split_first() else {
            return;
        };
        match mode % 4 {
            0 | 3 => {
                let version = if mode % 4 == 0 { PROTOCOL_VERSION } else { MIN_PROTOCOL_VERSION };
                let mut body = Vec::with_capacity(1 + rest.len());
                body.push(0x03); // Batch
                body.extend_from_slice(rest);
                let Ok(Frame::Batch(b)) = Frame::decode_body(&body, version) else {
                    return;
                };
                drop(body);
                // Length prefix + type byte + body.
                check_batch(&b, 4 + 1 + rest.len(), true);
            }
            _ => {
                let (first_seq, last_seq, record_count) = header_of(rest);
                let (codec, block) = if mode % 4 == 1 {
                    (BlockCodec::None, rest.to_vec())
                } else {
                    match zstd::bulk::compress(rest, 1) {
                        Ok(block) => (BlockCodec::Zstd, block),
                        Err(_) => return,
                    }
                };
                let b = BatchFrame {
                    first_seq,
                    last_seq,
                    record_count,
                    raw_len: rest.len() as u32,
                    codec,
                    block,
                    floor: last_seq.saturating_add(1),
                };
                let frame_len = match Frame::Batch(b.clone()).to_bytes() {
                    Ok(bytes) => bytes.len(),
                    Err(_) => return,
                };
                check_batch(&b, frame_len, true);
            }
        }
    }
);

/// Reads `count` and the seq column off an uncompressed block (see
/// `fogline_protocol::batch`) the way a sender would fill in the header.
/// Zeros where the block is too short or overflows: the decoder must then
/// refuse it anyway.
fn header_of(raw: &[u8]) -> (u64, u64, u32) {
    let mut pos = 0;
    let Some(count) = varint(raw, &mut pos) else {
        return (0, 0, 0);
    };
    let Some(first) = varint(raw, &mut pos) else {
        return (0, 0, count as u32);
    };
    let mut last = first;
    for _ in 1..count {
        match varint(raw, &mut pos).and_then(|d| last.checked_add(d)?.checked_add(1)) {
            Some(s) => last = s,
            None => break,
        }
    }
    (first, last, u32::try_from(count).unwrap_or(u32::MAX))
}

fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f).checked_shl(7 * i)?;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}
