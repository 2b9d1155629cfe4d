//! A function that misbehaves on purpose, to test the host's sandbox.
//! Never deploy it. `config = { mode = "…" }`:
//!
//! - `ok`: passes every message through.
//! - `trap`: panics (a trap) on a message whose payload is `boom`; passes the
//!   others, so tests can check the instance works again after a restart.
//! - `spin`: loops forever on a `boom` message (the call deadline must fire).
//! - `alloc`: allocates until memory runs out on a `boom` message (the
//!   memory cap must fire).
//! - `bad-index`: rejects an index past the end of the batch.
//! - `dup-index`: rejects index 0 twice.
//! - `bad-stream`: emits every message again with an empty stream.
//! - `flood`: emits each input `count` times.
//! - `big`: emits, per input, one message with a `size`-byte payload.
//! - `fail`: returns `Err` for the whole batch.
//! - `init-trap`: panics in `init`.
//! - `log`: logs one line per message at info level and passes it on.
//! - `escape`: per message, tries to reach outside the sandbox (list `/`,
//!   read the environment and arguments, open a TCP connection) and emits
//!   what it got as JSON: `{"fs":…,"env":…,"args":…,"net":…}`.

use std::cell::RefCell;

use fogline_sdk::__private::bindings::fogline::function::types::Rejection;
use fogline_sdk::__private::bindings::{Message as WitMessage, Output as WitOutput};
use fogline_sdk::__private::{export, init, process, tick, Guest};
use fogline_sdk::prelude::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Hostile {
    mode: String,
    #[serde(default)]
    count: usize,
    #[serde(default)]
    size: usize,
    // Keeps what `alloc` grabbed alive, so the optimiser cannot drop it.
    #[serde(skip)]
    hoard: Vec<Vec<u8>>,
}

impl Function for Hostile {
    fn init(config: Config) -> Result<Self> {
        let hostile: Hostile = config.parse()?;
        if hostile.mode == "init-trap" {
            panic!("hostile: panicking in init as configured");
        }
        Ok(hostile)
    }

    fn on_message(&mut self, msg: Message, out: &mut Output) -> Result<()> {
        let boom = msg.payload() == b"boom";
        match self.mode.as_str() {
            "trap" if boom => panic!("hostile: panicking in process as configured"),
            "spin" if boom => {
                let mut i: u64 = 0;
                loop {
                    i = std::hint::black_box(i.wrapping_add(1));
                }
            }
            "alloc" if boom => loop {
                let mut chunk = vec![0u8; 1 << 20];
                chunk[0] = 1;
                self.hoard.push(std::hint::black_box(chunk));
            },
            "flood" => {
                for _ in 0..self.count {
                    out.emit(msg.clone());
                }
            }
            "big" => out.emit_new(msg.stream(), msg.timestamp_ms(), vec![b'x'; self.size]),
            "bad-stream" => out.emit_new("", msg.timestamp_ms(), msg.payload()),
            "escape" => {
                let fs = std::fs::read_dir("/").map(|d| d.count()).ok();
                let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                let args = std::env::args().count();
                let net = std::net::TcpStream::connect(("127.0.0.1", 1883))
                    .map(|_| "connected".to_string())
                    .unwrap_or_else(|e| e.to_string());
                out.emit_json(
                    msg.stream(),
                    msg.timestamp_ms(),
                    &json!({ "fs": fs, "env": env, "args": args, "net": net }),
                )?;
            }
            "log" => {
                log::info!("hostile saw a message on {}", msg.stream());
                out.emit(msg);
            }
            _ => out.emit(msg),
        }
        Ok(())
    }
}

// `bad-index`, `dup-index` and `fail` forge a whole batch result, which the
// `Function` trait (rightly) cannot express, so this crate wires the raw WIT
// exports itself instead of using `export_function!`, and delegates to the
// SDK glue for everything else.
thread_local! {
    static STATE: RefCell<Option<Hostile>> = const { RefCell::new(None) };
}

struct Raw;

fn mode() -> Option<String> {
    STATE.with(|s| s.borrow().as_ref().map(|h| h.mode.clone()))
}

impl Guest for Raw {
    fn init(config: String) -> Result<(), String> {
        STATE.with(|s| init::<Hostile>(s, config))
    }

    fn process(batch: Vec<WitMessage>) -> Result<WitOutput, String> {
        let len = u32::try_from(batch.len()).unwrap_or(u32::MAX);
        let forged = |rejected| {
            Ok(WitOutput {
                messages: Vec::new(),
                rejected,
            })
        };
        let rejection = |index| Rejection {
            index,
            error: "hostile: forged rejection".to_string(),
        };
        match mode().as_deref() {
            Some("bad-index") => forged(vec![rejection(len)]),
            Some("dup-index") => forged(vec![rejection(0), rejection(0)]),
            Some("fail") => Err("hostile: failing the batch as configured".to_string()),
            _ => STATE.with(|s| process::<Hostile>(s, batch)),
        }
    }

    fn tick(now_ms: u64) -> Result<WitOutput, String> {
        STATE.with(|s| tick::<Hostile>(s, now_ms))
    }
}

export!(Raw with_types_in fogline_sdk::__private::bindings);
