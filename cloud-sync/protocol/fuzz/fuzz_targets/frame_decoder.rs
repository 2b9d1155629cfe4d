//! Feeds arbitrary bytes, in chunks, to a `FrameDecoder` at every supported
//! peer version. Input: `chunk_seed:u8  stream...` (seed 0: push the whole
//! stream at once; otherwise push `seed` bytes at a time).
//!
//! Checks: no panic; framing agrees with an independent reading of the
//! length prefixes; a poisoned decoder stays poisoned; every decoded frame
//! survives decode → encode → decode; every `Batch` frame is run through
//! `decode_batch` (and its records through encode → decode); allocation
//! stays within the budgets of `fogline_protocol_fuzz`.
#![no_main]

use fogline_protocol::{FrameDecoder, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use fogline_protocol_fuzz::{check_batch, check_frame, live_bytes, peak_above, warm_up};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: warm_up(),
    |data: &[u8]| {
        let Some((&seed, stream)) = data.split_first() else {
            return;
        };
        let chunk = if seed == 0 { stream.len().max(1) } else { usize::from(seed) };
        for version in MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION {
            run(stream, chunk, version);
        }
    }
);

fn run(input: &[u8], chunk: usize, version: u32) {
    let base = live_bytes();
    let mut dec = FrameDecoder::new();
    dec.set_peer_version(version);

    let mut framing_peak = 0;
    let mut pushed = 0;
    // Offset in `input` of the first byte not yet returned as a frame.
    let mut consumed = 0;
    let mut failed = None;
    for piece in input.chunks(chunk) {
        let ((), p) = peak_above(base, || dec.push(piece));
        framing_peak = framing_peak.max(p);
        pushed += piece.len();
        if let Some(e) = &failed {
            // Poisoned: pushes are dropped, the same error comes back.
            assert_eq!(dec.buffered(), 0);
            assert_eq!(dec.next_frame().as_ref(), Err(e));
            continue;
        }
        assert_eq!(dec.buffered(), pushed - consumed);
        loop {
            let (res, p) = peak_above(base, || dec.next_frame());
            framing_peak = framing_peak.max(p);
            match res {
                Ok(Some(frame)) => {
                    let frame_len = pushed - dec.buffered() - consumed;
                    let prefix = &input[consumed..consumed + 4];
                    let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
                    assert_eq!(frame_len, 4 + len as usize, "frame length vs its prefix");
                    consumed += frame_len;
                    check_frame(&frame, frame_len, version);
                    if let fogline_protocol::Frame::Batch(b) = &frame {
                        check_batch(b, frame_len, false);
                    }
                }
                Ok(None) => {
                    // Incomplete: fewer than 4 bytes, or fewer than the prefix says.
                    let rest = &input[consumed..pushed];
                    assert_eq!(dec.buffered(), rest.len());
                    if let Some(p) = rest.get(..4) {
                        let len = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
                        assert!(rest.len() < 4 + len, "a complete frame was not returned");
                    }
                    break;
                }
                Err(e) => {
                    assert_eq!(dec.buffered(), 0, "a failed decoder keeps its buffer");
                    assert_eq!(dec.next_frame().as_ref(), Err(&e));
                    failed = Some(e);
                    break;
                }
            }
        }
    }

    // The buffer never exceeds twice what was pushed (Vec doubling), and a
    // frame owns at most its own body — except a Status frame's JSON, whose
    // lists of short strings take up to ~24 bytes per input byte (each
    // String is 24 bytes), within its 64 KiB bound.
    let framing_budget = 3 * input.len() + 64 + 32 * status_frame_bytes(input);
    assert!(
        framing_peak <= framing_budget,
        "FrameDecoder held {framing_peak} bytes for {} bytes pushed in chunks of {chunk} \
         (budget {framing_budget})",
        input.len()
    );
}

/// Bytes of the frames in `input` (by their length prefixes) whose type is
/// `Status` (0x08).
fn status_frame_bytes(input: &[u8]) -> usize {
    let (mut pos, mut total) = (0usize, 0usize);
    while let Some(p) = input.get(pos..pos + 5) {
        let len = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
        if p[4] == 0x08 {
            total += len.min(input.len() - pos - 4);
        }
        pos = pos.saturating_add(4).saturating_add(len);
    }
    total
}
