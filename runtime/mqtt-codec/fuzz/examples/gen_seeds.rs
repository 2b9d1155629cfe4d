//! Writes the seed corpus of `packet_decoder` into `seeds/packet_decoder/`:
//! real CONNECTs (3.1.1 and 5, with login and will) followed by PUBLISHes,
//! acknowledgements, SUBSCRIBE, PINGREQ and DISCONNECT, whole and in
//! chunks; a CONNECT over the limit; a header cut short.
//!
//!   cargo run --manifest-path runtime/mqtt-codec/fuzz/Cargo.toml --example gen_seeds

use bytes::{Bytes, BytesMut};
use fogline_mqtt::{
    encode_ack, encode_connect, encode_disconnect, encode_pingreq, encode_publish,
    encode_pubrel, encode_subscribe, AckKind, ConnectOut, Version, Will,
};

fn session(v: Version, will: bool) -> Vec<u8> {
    let mut b = BytesMut::new();
    let mut c = ConnectOut::new(v, "sensor-1");
    c.keep_alive = 30;
    c.username = Some("sensor".into());
    c.password = Some("pw".into());
    if v == Version::V5 {
        c.session_expiry = Some(60);
        c.receive_maximum = Some(10);
    }
    if will {
        c.will = Some(Will {
            topic: Bytes::from_static(b"wills/sensor-1"),
            payload: Bytes::from_static(b"{\"gone\":true}"),
            qos: 1,
            delay_secs: if v == Version::V5 { 30 } else { 0 },
        });
    }
    encode_connect(&mut b, &c).expect("connect");
    for (i, qos) in [0u8, 1, 2].into_iter().enumerate() {
        encode_publish(
            &mut b,
            v,
            b"sensors/t1",
            Bytes::from(format!("{{\"id\":{i},\"temp\":21.5}}")),
            qos,
            i as u16 + 1,
            i == 2,
            false,
        )
        .expect("publish");
    }
    encode_pubrel(&mut b, v, 3);
    encode_ack(&mut b, v, AckKind::PubAck, 7, 0);
    encode_subscribe(&mut b, v, 9, &["a/#".to_string()], 1).expect("subscribe");
    encode_pingreq(&mut b, v);
    encode_disconnect(&mut b, v, 0, None, false);
    b.to_vec()
}

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/packet_decoder");
    std::fs::create_dir_all(&dir).expect("seeds dir");
    let write = |name: &str, mode: u8, bytes: &[u8]| {
        let mut data = vec![mode];
        data.extend_from_slice(bytes);
        std::fs::write(dir.join(name), data).expect("write seed");
    };
    for (v, tag) in [(Version::V311, "v311"), (Version::V5, "v5")] {
        let s = session(v, true);
        write(&format!("{tag}_session_whole"), 0, &s);
        write(&format!("{tag}_session_chunk7"), 7 << 2, &s);
        write(&format!("{tag}_session_no_will_chunk1"), 1 << 2, &session(v, false));
    }
    // A CONNECT announcing 320 KB, of which a little arrives (the flood).
    write("connect_too_large", 0, &[0x10, 0x80, 0xC4, 0x13, 0x00, 0x04, b'M', b'Q']);
    // A header cut short, and garbage.
    write("header_cut", 1, &[0x30, 0xFF, 0xFF]);
    write("http_get", 0, b"GET / HTTP/1.1\r\n\r\n");
    println!("seeds written to {}", dir.display());
}
