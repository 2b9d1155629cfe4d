//! Writes the committed seed corpora under `seeds/<target>/` (deterministic):
//!
//! ```text
//! cargo run --manifest-path cloud-sync/protocol/fuzz/Cargo.toml --example gen_seeds
//! ```
//!
//! frame_decoder seeds: `chunk_seed:u8` + a stream of length-prefixed frames.
//! batch_decoder seeds: a mode byte, then a `Batch` frame body without its
//! type byte (modes 0, 3) or an uncompressed columnar block (modes 1, 2).

use std::fs;
use std::path::Path;

use fogline_protocol::batch::DEFAULT_ZSTD_LEVEL;
use fogline_protocol::{encode_batch, BatchFrame, BlockCodec, ErrorCode, Frame, Record};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let frames_dir = root.join("frame_decoder");
    let batches_dir = root.join("batch_decoder");
    for d in [&frames_dir, &batches_dir] {
        fs::create_dir_all(d)?;
    }

    let small = encode_batch(&readings(5, 2, 1), DEFAULT_ZSTD_LEVEL)?;
    let mixed = encode_batch(&mixed_records(), DEFAULT_ZSTD_LEVEL)?;
    let none = uncompressed(&small)?;
    let one = encode_batch(&readings(1, 1, 42), DEFAULT_ZSTD_LEVEL)?;
    let larger = encode_batch(&readings(40, 4, 1000), DEFAULT_ZSTD_LEVEL)?;

    // --- frame_decoder -----------------------------------------------------
    let session = vec![
        Frame::Hello {
            protocol_version: 3,
            agent: "fogline-edge/0.1.0".into(),
            incarnation: 0x1234_5678_9abc,
            next_seq: 6,
            acked: 0,
            epoch: 77,
            epoch_start: 1,
        },
        Frame::Welcome {
            node_id: "edge-01".into(),
            cursor: 0,
            incarnation: 0x1234_5678_9abc,
            epoch: 77,
            top: Some(0),
            version: Some(fogline_protocol::PROTOCOL_VERSION),
        },
        Frame::Status(fogline_protocol::status::NodeStatus {
            at_ms: 1_764_000_000_000,
            version: "fogline-edge/0.1.0".into(),
            health: "ok".into(),
            backlog_records: 12,
            ..Default::default()
        }),
        Frame::Batch(small.clone()),
        Frame::Ack {
            up_to: 5,
            applied: Some(1),
        },
        Frame::Ping { nonce: 9 },
        Frame::Pong { nonce: 9 },
        Frame::Batch(none.clone()),
        Frame::Error {
            code: ErrorCode::ShuttingDown,
            message: "bye".into(),
        },
    ];
    write(&frames_dir, "session_whole", &stream(0, &session)?)?;
    write(&frames_dir, "session_chunk7", &stream(7, &session)?)?;
    write(&frames_dir, "session_chunk1", &stream(1, &session[..4])?)?;
    write(
        &frames_dir,
        "batch_mixed",
        &stream(0, &[Frame::Batch(mixed.clone()), Frame::Batch(one.clone())])?,
    )?;
    write(
        &frames_dir,
        "errors_other_codes",
        &stream(
            3,
            &[
                Frame::Error {
                    code: ErrorCode::Other(4711),
                    message: "ünïcode message".into(),
                },
                Frame::Error {
                    code: ErrorCode::Malformed,
                    message: String::new(),
                },
            ],
        )?,
    )?;
    // Version 1 Hello: protocol_version and agent only.
    let mut v1 = vec![0u8];
    frame_raw(&mut v1, &{
        let mut b = vec![0x01, 0x01];
        put_str(&mut b, "old-edge/0.0.1");
        b
    });
    write(&frames_dir, "hello_v1", &v1)?;
    // Version 2 Batch: no codec byte, the block is zstd.
    let mut v2 = vec![5u8];
    frame_raw(&mut v2, &{
        let mut b = vec![0x03];
        put_varint(&mut b, small.first_seq);
        put_varint(&mut b, small.last_seq);
        put_varint(&mut b, u64::from(small.record_count));
        put_varint(&mut b, u64::from(small.raw_len));
        b.extend_from_slice(&small.block);
        b
    });
    write(&frames_dir, "batch_v2_layout", &v2)?;

    // --- batch_decoder (first byte: mode, see fuzz_targets/batch_decoder.rs)
    write(&batches_dir, "zstd_5_records", &batch_body(0, &small)?)?;
    write(&batches_dir, "zstd_1_record", &batch_body(0, &one)?)?;
    write(&batches_dir, "zstd_mixed", &batch_body(0, &mixed)?)?;
    write(&batches_dir, "zstd_40_records", &batch_body(0, &larger)?)?;
    write(&batches_dir, "none_5_records", &batch_body(0, &none)?)?;
    write(
        &batches_dir,
        "none_mixed",
        &batch_body(0, &uncompressed(&mixed)?)?,
    )?;
    write(&batches_dir, "v2_zstd_5_records", &batch_body(3, &small)?)?;
    for (name, b) in [("5_records", &small), ("mixed", &mixed), ("1_record", &one)] {
        let raw = uncompressed(b)?.block;
        write(
            &batches_dir,
            &format!("block_{name}"),
            &[&[1u8][..], &raw].concat(),
        )?;
        write(
            &batches_dir,
            &format!("block_zstd_{name}"),
            &[&[2u8][..], &raw].concat(),
        )?;
    }
    Ok(())
}

fn readings(n: u64, streams: u64, first_seq: u64) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            seq: first_seq + i * 2,
            stream: format!("sensors/s{}", i % streams),
            timestamp_ms: 1_764_000_000_000 + i * 100,
            payload: format!(r#"{{"temp":{}.5,"n":{i}}}"#, 20 + i % 7).into_bytes(),
        })
        .collect()
}

/// Empty and unicode stream names, empty payloads, timestamps going back,
/// large seq gaps.
fn mixed_records() -> Vec<Record> {
    vec![
        Record {
            seq: 1,
            stream: String::new(),
            timestamp_ms: u64::MAX,
            payload: Vec::new(),
        },
        Record {
            seq: 2,
            stream: "ünïcode".into(),
            timestamp_ms: 0,
            payload: vec![0, 1, 2, 255],
        },
        Record {
            seq: 1 << 40,
            stream: String::new(),
            timestamp_ms: 5,
            payload: b"x".to_vec(),
        },
    ]
}

/// The same batch with its block stored uncompressed.
fn uncompressed(b: &BatchFrame) -> Result<BatchFrame, Box<dyn std::error::Error>> {
    let raw = zstd::bulk::decompress(&b.block, b.raw_len as usize)?;
    Ok(BatchFrame {
        codec: BlockCodec::None,
        block: raw,
        ..b.clone()
    })
}

fn stream(chunk_seed: u8, frames: &[Frame]) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let mut out = vec![chunk_seed];
    for f in frames {
        f.encode(&mut out)?;
    }
    Ok(out)
}

/// `mode` + the body of the Batch frame after its type byte; mode 3: the
/// version 2 layout (no codec byte).
fn batch_body(mode: u8, b: &BatchFrame) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let bytes = Frame::Batch(b.clone()).to_bytes()?;
    let mut out = vec![mode];
    if mode == 3 {
        let mut header = Vec::new();
        put_varint(&mut header, b.first_seq);
        put_varint(&mut header, b.last_seq);
        put_varint(&mut header, u64::from(b.record_count));
        put_varint(&mut header, u64::from(b.raw_len));
        out.extend_from_slice(&header);
        out.extend_from_slice(&b.block);
    } else {
        out.extend_from_slice(&bytes[5..]);
    }
    Ok(out)
}

fn frame_raw(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    fs::write(dir.join(name), bytes)
}
