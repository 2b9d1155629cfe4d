//! Arbitrary bytes as the body of a version 3 `Batch` frame (everything after
//! the type byte: first_seq, last_seq, record_count, raw_len varints, the
//! codec byte, then the block), decoded with `decode_batch`.
//!
//! Checks: no panic; allocation within the frame budget and within
//! the bound `decode_batch` documents (`decoded_bytes_bound(raw_len)`);
//! decoded records survive encode_batch → decode_batch unchanged.
#![no_main]

use fogline_protocol::{Frame, PROTOCOL_VERSION};
use fogline_protocol_fuzz::{check_batch, warm_up};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: warm_up(),
    |data: &[u8]| {
        let mut body = Vec::with_capacity(1 + data.len());
        body.push(0x03); // Batch
        body.extend_from_slice(data);
        let Ok(Frame::Batch(b)) = Frame::decode_body(&body, PROTOCOL_VERSION) else {
            return;
        };
        drop(body);
        // Length prefix + type byte + the fuzzer's bytes.
        check_batch(&b, 4 + 1 + data.len(), true);
    }
);
