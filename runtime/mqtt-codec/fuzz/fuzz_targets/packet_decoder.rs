//! The MQTT packet decoder as the endpoint drives it: bytes arrive in
//! chunks; before more is buffered, `framing` reads the fixed header and
//! checks the announced size against the limit; once a frame is whole,
//! `decode` decodes it — the first packet with the version unknown (it must
//! be CONNECT), then in the version the CONNECT declared.
//!
//! Input: `mode:u8 stream...` — bits 0-1 the starting version (0: unknown,
//! as before CONNECT; 1: 3.1.1; 2: 5), bits 2-7 the chunk size (0: the
//! whole stream at once).
//!
//! Checks: no panic escapes (the codec's own are caught and reported as
//! malformed); `framing` and `decode` agree — a frame announced over the
//! limit is refused by both, nothing is consumed until the frame is whole,
//! and a decoded packet consumed exactly the frame `framing` announced;
//! decoded acknowledgements and PUBLISHes survive encode → decode.
#![no_main]

use bytes::BytesMut;
use fogline_mqtt::{
    decode, encode_ack, encode_publish, framing, AckKind, CodecError, Framing, Inbound, Version,
};
use libfuzzer_sys::fuzz_target;

/// The limit the fuzzer decodes under (small, so "too large" is reached).
const MAX_PACKET: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let version = match mode & 3 {
        1 => Some(Version::V311),
        2 => Some(Version::V5),
        _ => None,
    };
    let chunk = match usize::from(mode >> 2) {
        0 => stream.len().max(1),
        n => n,
    };
    run(stream, chunk, version);
});

fn run(stream: &[u8], chunk: usize, mut version: Option<Version>) {
    let mut buf = BytesMut::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            let framed = framing(&buf, MAX_PACKET);
            let decoded = decode(&mut buf, version, MAX_PACKET);
            match (framed, decoded) {
                (Err(CodecError::TooLarge { .. }), Err(CodecError::TooLarge { .. })) => return,
                (Err(CodecError::TooLarge { size, .. }), other) => {
                    panic!("framing refused {size} bytes, decode said {other:?}")
                }
                (_, Err(_)) => return,
                (Ok(Framing::NeedHeader), Ok(r)) => {
                    assert!(r.is_none(), "decoded {r:?} without a whole header");
                    assert_eq!(buf.len(), before, "consumed without a whole header");
                    break;
                }
                (Ok(Framing::Packet { len }), Ok(None)) => {
                    assert!(before < len, "a whole frame of {len} bytes was not decoded");
                    assert_eq!(buf.len(), before, "consumed an incomplete frame");
                    break;
                }
                (Ok(Framing::Packet { len }), Ok(Some(p))) => {
                    assert_eq!(before - buf.len(), len, "consumed other than the frame");
                    assert!(len <= MAX_PACKET + 5, "a packet over the limit");
                    if version.is_none() {
                        let Inbound::Connect(c) = &p else {
                            // The endpoint closes a connection whose first
                            // packet is not CONNECT.
                            return;
                        };
                        version = Some(c.version);
                    }
                    if let Some(v) = version {
                        round_trip(&p, v);
                    }
                }
                (Err(e), Ok(r)) => panic!("framing failed ({e}) but decode said {r:?}"),
            }
        }
    }
}

fn round_trip(p: &Inbound, v: Version) {
    let mut b = BytesMut::new();
    match p {
        Inbound::PubAck(pkid, code) => encode_ack(&mut b, v, AckKind::PubAck, *pkid, *code),
        Inbound::PubRec(pkid, code) => encode_ack(&mut b, v, AckKind::PubRec, *pkid, *code),
        Inbound::Publish(x) if x.topic_alias.is_none() && !x.topic.is_empty() => {
            if encode_publish(
                &mut b,
                v,
                &x.topic,
                x.payload.clone(),
                x.qos,
                x.pkid,
                x.dup,
                x.retain,
            )
            .is_err()
            {
                return;
            }
        }
        _ => return,
    }
    let again = decode(&mut b, Some(v), usize::MAX >> 8);
    match (p, again) {
        (Inbound::Publish(x), Ok(Some(Inbound::Publish(y)))) => {
            assert_eq!((&x.topic, &x.payload, x.qos, x.pkid), (&y.topic, &y.payload, y.qos, y.pkid))
        }
        (a, Ok(Some(b))) => assert_eq!(*a, b, "encode → decode changed the packet"),
        (a, other) => panic!("{a:?} re-encoded does not decode: {other:?}"),
    }
    assert!(b.is_empty(), "stray bytes after re-encoding {p:?}");
}
