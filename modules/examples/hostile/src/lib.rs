//! A function that misbehaves on purpose, to test the host's sandbox.
//! Never deploy it. `config = { mode = "…" }` (with `count`, `size` where a
//! mode says so). Every message with payload `boom` triggers the mode's
//! misbehaviour where the mode is per message; other messages pass through.
//!
//! Durable state: it counts the messages it handled (`seen`, committed with
//! every batch); with `report = true` every tick emits `{"seen": n}` on
//! `hostile/seen`, so tests can check the state after traps and restarts.
//!
//! Per message (`boom`):
//! - `trap`: panics. `spin`: loops forever. `sleep`: sleeps an hour in a WASI
//!   call. `alloc`: allocates until memory runs out. `resources`: creates WASI
//!   resources (pollables) until the host refuses.
//!
//! Per message (every one):
//! - `ok`: passes it on. `flood`: emits it `count` times. `big`: emits a
//!   `size`-byte payload. `bad-stream`: emits it with an empty stream.
//!   `long-stream`: emits it on a stream of `size` bytes. `log`: logs a line
//!   and passes it on. `log-flood`: logs `count` lines. `print`: writes to
//!   stdout and stderr and passes it on. `escape`: tries to
//!   reach outside the sandbox (list `/`, read the environment and
//!   arguments, open a TCP connection, read the clocks) and emits what it got
//!   as JSON.
//!
//! Per batch (forged output, through the raw `host.emit`):
//! - `bad-index`: rejects an index past the end of the batch. `dup-index`:
//!   rejects index 0 twice. `bad-span`: a payload span past the end of the
//!   buffer. `alias`: `count` emissions whose payloads all point at the same
//!   `size` bytes. `state-flood`: `count` state keys of `size` bytes.
//!   `fail`: returns `Err` for the whole batch.
//!
//! Elsewhere: `init-trap` panics in `init`; `init-spin` loops in `init`;
//! `init-sleep` sleeps in `init`; `tick-trap` panics in `tick`.

use std::cell::RefCell;

use fogline_sdk::__private::bindings::fogline::function::host as raw;
use fogline_sdk::__private::bindings::fogline::function::types::{
    Batch as WitBatch, Emission, Rejection, Span, StateEntries, StateWrite,
};
use fogline_sdk::__private::{export, init, process, restore, tick, Guest, Instance};
use fogline_sdk::prelude::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Hostile {
    mode: String,
    #[serde(default)]
    count: usize,
    #[serde(default)]
    size: usize,
    #[serde(default)]
    report: bool,
    #[serde(skip)]
    seen: State<u64>,
    // Keeps what `alloc` grabbed alive, so the optimiser cannot drop it.
    #[serde(skip)]
    hoard: Vec<Vec<u8>>,
}

fn spin() -> ! {
    let mut i: u64 = 0;
    loop {
        i = std::hint::black_box(i.wrapping_add(1));
    }
}

fn sleep_an_hour() {
    std::thread::sleep(std::time::Duration::from_secs(3600));
}

impl Function for Hostile {
    fn init(config: Config) -> Result<Self> {
        let hostile: Hostile = config.parse()?;
        match hostile.mode.as_str() {
            "init-trap" => panic!("hostile: panicking in init as configured"),
            "init-spin" => spin(),
            "init-sleep" => sleep_an_hour(),
            _ => {}
        }
        Ok(hostile)
    }

    fn on_message(&mut self, msg: Message, out: &mut Output) -> Result<()> {
        *self.seen += 1;
        let boom = msg.payload() == b"boom";
        match self.mode.as_str() {
            "trap" if boom => panic!("hostile: panicking in process as configured"),
            "spin" if boom => spin(),
            "sleep" if boom => sleep_an_hour(),
            "alloc" if boom => loop {
                let mut chunk = vec![0u8; 1 << 20];
                chunk[0] = 1;
                self.hoard.push(std::hint::black_box(chunk));
            },
            "resources" if boom => loop {
                // Each pollable is a host resource; leak them until refused.
                let p = wasip2::clocks::monotonic_clock::subscribe_duration(1_000_000_000);
                std::mem::forget(p);
            },
            "flood" => {
                for _ in 0..self.count {
                    out.emit(msg.clone());
                }
            }
            "big" => out.emit_new(msg.stream(), msg.timestamp_ms(), vec![b'x'; self.size]),
            "bad-stream" => out.emit_new("", msg.timestamp_ms(), msg.payload()),
            "long-stream" => {
                let stream = "s".repeat(self.size);
                out.emit_new(stream, msg.timestamp_ms(), msg.payload());
            }
            "escape" => {
                let fs = std::fs::read_dir("/").map(|d| d.count()).ok();
                let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                let args = std::env::args().count();
                let net = std::net::TcpStream::connect(("127.0.0.1", 1883))
                    .map(|_| "connected".to_string())
                    .unwrap_or_else(|e| e.to_string());
                let wall = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                out.emit_json(
                    msg.stream(),
                    msg.timestamp_ms(),
                    &json!({ "fs": fs, "env": env, "args": args, "net": net, "wall_ms": wall }),
                )?;
            }
            "log" => {
                log::info!("hostile saw a message on {}", msg.stream());
                out.emit(msg);
            }
            "print" => {
                // stdout and stderr go nowhere, and writing them must not
                // disturb the host (their blocking flush included).
                println!("hostile prints a line");
                eprintln!("hostile prints an error");
                out.emit(msg);
            }
            "log-flood" => {
                for i in 0..self.count {
                    log::warn!("hostile log line {i}");
                }
                out.emit(msg);
            }
            _ => out.emit(msg),
        }
        Ok(())
    }

    fn on_tick(&mut self, now_ms: u64, out: &mut Output) -> Result<()> {
        if self.mode == "tick-trap" {
            panic!("hostile: panicking in tick as configured");
        }
        if self.report {
            out.emit_json("hostile/seen", now_ms, &json!({ "seen": *self.seen }))?;
        }
        Ok(())
    }

    fn state(&mut self, state: &mut StateSet<'_>) {
        state.add("seen", &mut self.seen);
    }

    // Takes over any function's state (ignoring what it does not know), so
    // tests can deploy it over a real function and watch it fail there.
    fn migrate(&mut self, _entry: StateEntry) -> Result<()> {
        Ok(())
    }
}

// The forging modes build a whole call's output by hand, which the
// `Function` trait (rightly) cannot express, so this crate wires the raw WIT
// exports itself and delegates to the SDK glue for everything else.
thread_local! {
    static STATE: RefCell<Instance<Hostile>> = const { RefCell::new(Instance::new()) };
}

struct Raw;

thread_local! {
    static MODE: RefCell<Option<(String, usize, usize)>> = const { RefCell::new(None) };
}

fn span(offset: usize, len: usize) -> Span {
    Span {
        offset: offset as u32,
        len: len as u32,
    }
}

impl Guest for Raw {
    fn init(config_json: String) -> Result<(), String> {
        let parsed: serde_json::Value = serde_json::from_str(&config_json).unwrap_or_default();
        let mode = parsed["mode"].as_str().unwrap_or("").to_string();
        let count = parsed["count"].as_u64().unwrap_or(0) as usize;
        let size = parsed["size"].as_u64().unwrap_or(0) as usize;
        MODE.with(|m| *m.borrow_mut() = Some((mode, count, size)));
        STATE.with(|s| init::<Hostile>(s, config_json))
    }

    fn restore(entries: StateEntries) -> Result<(), String> {
        STATE.with(|s| restore::<Hostile>(s, entries))
    }

    fn process(batch: WitBatch) -> Result<(), String> {
        let (mode, count, size) = MODE.with(|m| m.borrow().clone()).unwrap_or_default();
        let len = batch.payload_ends.len() as u32;
        let forged = |message: &str| Rejection {
            index: 0,
            error: span(0, message.len()),
        };
        match mode.as_str() {
            "bad-index" => {
                let text = b"hostile: forged rejection";
                let mut r = forged("hostile: forged rejection");
                r.index = len;
                raw::emit(&[], &[r], &[], text);
                Ok(())
            }
            "dup-index" => {
                let text = b"hostile: forged rejection";
                let r = forged("hostile: forged rejection");
                raw::emit(&[], &[r, r], &[], text);
                Ok(())
            }
            "bad-span" => {
                let e = Emission {
                    input: Some(0),
                    stream: None,
                    timestamp_ms: 0,
                    payload: Some(span(0, 1 << 20)),
                };
                raw::emit(&[e], &[], &[], b"tiny");
                Ok(())
            }
            "alias" => {
                // `count` payloads of `size` bytes claimed, one buffer held.
                let bytes = vec![b'a'; size];
                let e = Emission {
                    input: Some(0),
                    stream: None,
                    timestamp_ms: 0,
                    payload: Some(span(0, size)),
                };
                let emissions = vec![e; count];
                raw::emit(&emissions, &[], &[], &bytes);
                Ok(())
            }
            "state-flood" => {
                let mut bytes = Vec::with_capacity(count * 16 + size);
                let value = span(0, size);
                bytes.resize(size, b'v');
                let mut writes = Vec::with_capacity(count);
                for i in 0..count {
                    let start = bytes.len();
                    bytes.extend_from_slice(format!("flood\x1f{i:012}").as_bytes());
                    writes.push(StateWrite {
                        key: span(start, bytes.len() - start),
                        value: Some(value),
                    });
                }
                raw::emit(&[], &[], &writes, &bytes);
                Ok(())
            }
            "fail" => Err("hostile: failing the batch as configured".to_string()),
            _ => STATE.with(|s| process::<Hostile>(s, batch)),
        }
    }

    fn tick(now_ms: u64) -> Result<(), String> {
        STATE.with(|s| tick::<Hostile>(s, now_ms))
    }
}

export!(Raw with_types_in fogline_sdk::__private::bindings);
