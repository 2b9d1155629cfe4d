//! Shared pieces of the `fogline-protocol` fuzz targets: a counting global
//! allocator, the allocation budgets, and the decode → encode → decode oracles.
//!
//! Budgets checked (see `check_batch` and `fuzz_targets/frame_decoder.rs`):
//!
//! * **Frame budget** (the requirement): decoding a `Batch` frame of
//!   `n` bytes (4-byte length prefix included) allocates at most
//!   `decoded_bytes_bound(MAX_INFLATION × n) + 1 MiB`.
//! * **Documented batch bound** (`tight`, batch_decoder only): `decode_batch`
//!   documents "Total allocation is at most `decoded_bytes_bound(raw_len)`".
//!   On success nothing transient is allocated (every byte is owned by the
//!   returned `DecodedBatch`), so the bound is checked exactly; on failure the
//!   error's message string is allowed on top (`ERR_SLACK`).
//! * **Framing** (frame_decoder): the `FrameDecoder` buffer never holds more
//!   than twice the bytes pushed (Vec doubling) and the frame it returns owns
//!   at most its own body: `3 × pushed + 64`.
//!
//! Allocations made by zstd's C code (the per-thread decompression context,
//! a fixed ~100–200 KiB) go through libc malloc, not the Rust global
//! allocator, and are not counted; everything sized by the input is a Rust
//! `Vec` and is counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use fogline_protocol::batch::{decoded_bytes_bound, DEFAULT_ZSTD_LEVEL};
use fogline_protocol::frame::EncodeError;
use fogline_protocol::{
    decode_batch, encode_batch, BatchFrame, Frame, Record, MAX_FRAME_BYTES, MAX_INFLATION,
    MAX_RECORD_PAYLOAD_BYTES, MAX_STREAM_NAME_BYTES, PROTOCOL_VERSION,
};

// ---------------------------------------------------------------------------
// Counting allocator
// ---------------------------------------------------------------------------

/// Wraps the system allocator and tracks live and peak requested bytes.
/// libFuzzer runs the target on one thread, so process-wide counters are the
/// target's own allocations.
pub struct CountingAlloc;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[inline]
fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(now, Relaxed);
}

#[inline]
fn shrank(n: usize) {
    CURRENT.fetch_sub(n, Relaxed);
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Bytes currently allocated through the Rust global allocator.
pub fn live_bytes() -> usize {
    CURRENT.load(Relaxed)
}

/// Runs `f` and returns its result and the most bytes live at once while it
/// ran, counted above `base` (a value of [`live_bytes`] taken earlier).
pub fn peak_above<R>(base: usize, f: impl FnOnce() -> R) -> (R, usize) {
    PEAK.store(CURRENT.load(Relaxed), Relaxed);
    let r = f();
    (r, PEAK.load(Relaxed).saturating_sub(base))
}

/// Runs `f` and returns its result and the peak bytes it allocated (its
/// result included).
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    peak_above(live_bytes(), f)
}

// ---------------------------------------------------------------------------
// Budgets
// ---------------------------------------------------------------------------

/// The budget for decoding a frame of `frame_len` bytes.
pub fn frame_budget(frame_len: usize) -> usize {
    decoded_bytes_bound(MAX_INFLATION.saturating_mul(frame_len)).saturating_add(1 << 20)
}

/// What a failed `decode_batch` may allocate on top of the documented bound:
/// the `DecodeError`'s message (`format!` of two numbers and a few words, or
/// zstd's error text), far below this.
pub const ERR_SLACK: usize = 1024;

// ---------------------------------------------------------------------------
// Oracles
// ---------------------------------------------------------------------------

/// Decodes `b` (which came from a frame of `frame_len` bytes) under the
/// allocation budgets, and if it decodes, checks decode → encode → decode.
/// `tight` also checks the documented `decoded_bytes_bound(raw_len)`.
pub fn check_batch(b: &BatchFrame, frame_len: usize, tight: bool) {
    let (res, peak) = measure(|| decode_batch(b));

    let budget = frame_budget(frame_len);
    assert!(
        peak <= budget,
        "decode_batch allocated {peak} bytes for a {frame_len}-byte frame, budget \
         decoded_bytes_bound(MAX_INFLATION × {frame_len}) + 1 MiB = {budget} \
         (raw_len {}, record_count {}, codec {:?}, block {} bytes, result {:?})",
        b.raw_len,
        b.record_count,
        b.codec,
        b.block.len(),
        res.as_ref().map(|d| d.len()),
    );

    let bound = decoded_bytes_bound(b.raw_len as usize);
    let decoded = match res {
        Err(e) => {
            if tight {
                assert!(
                    peak <= bound + ERR_SLACK,
                    "failed decode_batch allocated {peak} bytes, documented bound \
                     decoded_bytes_bound(raw_len = {}) = {bound} (+{ERR_SLACK} for the error): \
                     {e} (record_count {}, codec {:?}, block {} bytes)",
                    b.raw_len,
                    b.record_count,
                    b.codec,
                    b.block.len(),
                );
            }
            return;
        }
        Ok(d) => d,
    };

    let heap = decoded.heap_bytes();
    assert!(
        peak >= heap,
        "harness: peak {peak} below the batch's own heap bytes {heap}"
    );
    if tight {
        assert!(
            peak <= bound && heap <= bound,
            "decode_batch allocated {peak} bytes (DecodedBatch::heap_bytes {heap}), documented \
             bound decoded_bytes_bound(raw_len = {}) = {bound}; {} records, first_seq {}, codec {:?}",
            b.raw_len,
            decoded.len(),
            b.first_seq,
            b.codec,
        );
    }

    // The decoder checked the batch against its header.
    assert!(!decoded.is_empty());
    assert_eq!(decoded.len(), b.record_count as usize);
    assert_eq!(decoded.first_seq(), b.first_seq);
    assert_eq!(decoded.last_seq(), b.last_seq);
    assert_eq!(decoded.iter().len(), decoded.len());
    assert!(decoded.get(decoded.len()).is_none());

    let records = decoded.to_records();
    check_records(&records);
    for (i, r) in decoded.iter().enumerate() {
        assert_eq!(decoded.get(i), Some(r));
    }
    drop(decoded);

    // decode → encode → decode.
    let again = encode_batch(&records, DEFAULT_ZSTD_LEVEL)
        .unwrap_or_else(|e| panic!("decoded records do not re-encode: {e}"));
    assert_eq!(
        (again.first_seq, again.last_seq, again.record_count),
        (b.first_seq, b.last_seq, b.record_count),
        "re-encoded header differs"
    );
    // The encoder writes the canonical (smallest) block: minimal varints, each
    // used stream name once.
    assert!(
        again.raw_len <= b.raw_len,
        "canonical block {} bytes longer than the decoded one {}",
        again.raw_len,
        b.raw_len
    );
    let redecoded = decode_batch(&again)
        .unwrap_or_else(|e| panic!("re-encoded batch does not decode: {e}"))
        .to_records();
    assert_eq!(redecoded, records, "batch decode → encode → decode differs");

    // And through the frame layer.
    let frame = Frame::Batch(again);
    match frame.to_bytes() {
        Ok(bytes) => {
            let f = Frame::decode_body(&bytes[4..], PROTOCOL_VERSION)
                .unwrap_or_else(|e| panic!("re-encoded Batch frame does not decode: {e}"));
            assert_eq!(f, frame, "Batch frame encode → decode differs");
        }
        Err(EncodeError::FrameTooLarge { size, .. }) => assert!(size > MAX_FRAME_BYTES),
        Err(e) => panic!("Batch frame does not encode: {e}"),
    }
}

/// What `decode_batch` promises about the records it returns.
fn check_records(records: &[Record]) {
    for pair in records.windows(2) {
        assert!(pair[0].seq < pair[1].seq, "seqs not strictly ascending");
    }
    for r in records {
        assert!(r.stream.len() <= MAX_STREAM_NAME_BYTES);
        assert!(r.payload.len() <= MAX_RECORD_PAYLOAD_BYTES);
    }
}

/// Checks decode → encode → decode for one frame decoded from `frame_len`
/// bytes sent by a peer speaking `version`. The encoder always writes the
/// current version's layout, so the re-encoding is decoded as such.
pub fn check_frame(frame: &Frame, frame_len: usize, version: u32) {
    let bytes = match frame.to_bytes() {
        Ok(bytes) => bytes,
        // A version 2 Batch has no codec byte: re-encoded it is one byte
        // longer, which can cross the limit for a maximal frame.
        Err(EncodeError::FrameTooLarge { size, .. })
            if version < 3 && matches!(frame, Frame::Batch(_)) =>
        {
            assert_eq!(size, MAX_FRAME_BYTES + 1);
            return;
        }
        Err(e) => panic!("decoded {} frame does not re-encode: {e}", frame.kind()),
    };
    let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    assert_eq!(len + 4, bytes.len(), "length prefix");

    let again = Frame::decode_body(&bytes[4..], PROTOCOL_VERSION)
        .unwrap_or_else(|e| panic!("re-encoded {} frame does not decode: {e}", frame.kind()));
    assert_eq!(&again, frame, "frame decode → encode → decode differs");
    // The encoding is canonical: encoding again gives the same bytes.
    assert_eq!(
        again.to_bytes().ok(),
        Some(bytes.clone()),
        "encoding not stable"
    );

    // Canonical varints are minimal, so the re-encoding is never longer than
    // what was decoded, except for what an older peer leaves out: the codec
    // byte of a version 2 Batch, the floor of a version 2 or 3 Batch (implied,
    // written as a varint), the five trailing fields of a version 1 Hello.
    let varint_len = |v: u64| ((64 - v.leading_zeros()).max(1) as usize).div_ceil(7);
    let extra = match frame {
        Frame::Batch(b) if version < 4 => varint_len(b.floor) + usize::from(version < 3),
        Frame::Hello {
            protocol_version, ..
        } if *protocol_version < 2 => 5,
        // JSON written back with every field (defaults included) in one
        // canonical form: longer than a terse input may be.
        Frame::Status(_) => bytes.len(),
        _ => 0,
    };
    assert!(
        bytes.len() <= frame_len + extra,
        "re-encoded {} is {} bytes, decoded from {frame_len}",
        frame.kind(),
        bytes.len()
    );
}

/// Run once before fuzzing: initialises the thread-local zstd contexts (and
/// whatever std allocates on first use) so they are not charged to an input.
pub fn warm_up() {
    let records: Vec<Record> = (1..=3)
        .map(|seq| Record {
            seq,
            stream: "warm/up".into(),
            timestamp_ms: 1_700_000_000_000 + seq,
            payload: b"{\"x\":1}".to_vec(),
        })
        .collect();
    if let Ok(b) = encode_batch(&records, DEFAULT_ZSTD_LEVEL) {
        let _ = decode_batch(&b);
        if let Ok(bytes) = Frame::Batch(b).to_bytes() {
            let _ = Frame::decode_body(&bytes[4..], PROTOCOL_VERSION);
        }
    }
    let _ = measure(|| ());
}
