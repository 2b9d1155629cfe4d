//! The [`Function`] trait, its inputs and outputs, and the glue that adapts it
//! to the WIT exports.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

use serde::de::DeserializeOwned;

use crate::batch::Batch;
use crate::bindings::fogline::function::types::{Batch as WitBatch, StateEntries};
use crate::output::Output;
use crate::state::{split_key, StateEntry, StateSet};
use crate::Message;

/// `Result` with the SDK's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error a function reports to the host: just a message, which ends up in
/// the dead-letter table (for a rejected message) or the daemon's log.
///
/// Any `std::error::Error` converts into it, so `?` works on serde, parse and
/// I/O errors; use [`Error::new`] or [`bail!`](crate::bail) for your own.
pub struct Error {
    message: String,
}

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The message, as the host will see it.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefix the message with what was being done: `"window-avg: " + msg`.
    pub fn context(self, context: impl fmt::Display) -> Self {
        Self::new(format!("{context}: {}", self.message))
    }
}

// Deliberately not `std::error::Error`: that keeps the blanket `From` below
// coherent (the same trick as `anyhow::Error`).
impl<E: std::error::Error> From<E> for Error {
    fn from(error: E) -> Self {
        Self::new(error.to_string())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.message, f)
    }
}

/// A stream function. Implement it, then [`export_function!`](crate::export_function).
///
/// The value lives as long as the instance, across batches. What must
/// survive a restart (a crash, a trap, a deploy) goes in durable containers
/// named in [`state`](Function::state): the host commits their changes with
/// every batch's outputs and restores them before the next call. Plain
/// fields are rebuilt by [`init`](Function::init).
pub trait Function: Sized + 'static {
    /// Build the function from its configuration (the function's table in
    /// the daemon's TOML config, as JSON). Usually `config.parse()`.
    ///
    /// An `Err` makes loading the function fail with this message.
    fn init(config: Config) -> Result<Self>;

    /// Handle one message of a batch. Emit zero or more messages to `out`.
    ///
    /// An `Err` rejects this message only: the host dead-letters it with the
    /// error text, and anything emitted during this call is discarded. State
    /// changed before the `Err` stays changed: check first, then change.
    fn on_message(&mut self, msg: Message, out: &mut Output) -> Result<()>;

    /// Called on the host's timer with the gateway's ingest clock (ms since
    /// the Unix epoch, never going backwards). Close windows, send
    /// heartbeats. Does nothing by default.
    ///
    /// An `Err` fails the tick: the host rolls the function back to its
    /// committed state and tries again at the next tick.
    fn on_tick(&mut self, now_ms: u64, out: &mut Output) -> Result<()> {
        let _ = (now_ms, out);
        Ok(())
    }

    /// Name the durable containers: `state.add("windows", &mut self.windows)`.
    /// Called to restore them and after every call to save what changed.
    /// Nothing by default: a stateless function.
    fn state(&mut self, state: &mut StateSet<'_>) {
        let _ = state;
    }

    /// A stored entry that no container takes (the previous version of the
    /// function wrote it: a renamed container, a changed type that serde
    /// defaults cannot bridge). Put what it means into the new containers,
    /// or ignore it; the old entry is deleted. An `Err` fails the start
    /// (a deploy then rolls back to the previous version and its state).
    ///
    /// By default: an error naming the entry.
    fn migrate(&mut self, entry: StateEntry) -> Result<()> {
        Err(Error::new(format!(
            "stored state `{}` ({} bytes) does not fit the current containers: {}; \
             implement Function::migrate to convert it",
            entry.container,
            entry.value.len(),
            entry.error
        )))
    }
}

/// A function's configuration: its TOML table from the daemon's config,
/// handed over as JSON.
#[derive(Debug, Clone)]
pub struct Config {
    json: String,
}

impl Config {
    /// Wrap a JSON text (an empty text counts as `{}`).
    pub fn new(json: impl Into<String>) -> Self {
        Self { json: json.into() }
    }

    /// Deserialize into your config type. Add
    /// `#[serde(deny_unknown_fields)]` to it so typos are errors.
    ///
    /// Errors read `invalid config: missing field `field` at line 1 column 2`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_str(self.as_str()).map_err(|e| Error::new(format!("invalid config: {e}")))
    }

    /// The raw JSON text.
    pub fn as_str(&self) -> &str {
        if self.json.trim().is_empty() {
            "{}"
        } else {
            &self.json
        }
    }
}

const NOT_INITIALISED: &str = "function called before a successful init";
const REENTERED: &str = "function re-entered while a call is running";

/// What the glue keeps beside the function value.
#[doc(hidden)]
pub struct Instance<F> {
    function: Option<F>,
    /// Keys of entries handed to `migrate`: deleted at the next save (before
    /// the containers' writes, which may store the same key anew).
    stale: Vec<Vec<u8>>,
}

impl<F> Instance<F> {
    #[doc(hidden)]
    pub const fn new() -> Self {
        Self {
            function: None,
            stale: Vec::new(),
        }
    }
}

impl<F> Default for Instance<F> {
    fn default() -> Self {
        Self::new()
    }
}

/// Make a panic explain itself: log `panic: <message and location>` at
/// error level just before the guest aborts, so the host can put the panic
/// message into the trap it reports (it recognises the `panic: ` prefix).
fn install_panic_hook() {
    // Only inside a component: on the host (unit tests) the `host.log`
    // import does not exist.
    #[cfg(target_arch = "wasm32")]
    {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                crate::log::log(crate::log::Level::Error, &format!("panic: {info}"));
            }));
        });
    }
}

#[doc(hidden)]
pub fn init<F: Function>(cell: &RefCell<Instance<F>>, config: String) -> Result<(), String> {
    install_panic_hook();
    let function = F::init(Config::new(config)).map_err(|e| e.message)?;
    let mut inst = cell.try_borrow_mut().map_err(|_| REENTERED.to_string())?;
    inst.function = Some(function);
    inst.stale.clear();
    Ok(())
}

#[doc(hidden)]
pub fn restore<F: Function>(
    cell: &RefCell<Instance<F>>,
    entries: StateEntries,
) -> Result<(), String> {
    let mut inst = cell.try_borrow_mut().map_err(|_| REENTERED.to_string())?;
    let inst = &mut *inst;
    let function = inst.function.as_mut().ok_or(NOT_INITIALISED)?;
    for (key, value) in crate::batch::state_entries(&entries)? {
        let (name, inner) = split_key(key).unwrap_or(("", key));
        let mut set = StateSet::load(name, inner, value);
        function.state(&mut set);
        let error = match set.loaded() {
            Some(Ok(())) => continue,
            Some(Err(e)) => e.message,
            None => format!("no state container is named `{name}`"),
        };
        function
            .migrate(StateEntry {
                container: name.to_string(),
                key: inner.to_vec(),
                value: value.to_vec(),
                error,
            })
            .map_err(|e| format!("restoring state `{name}`: {}", e.message))?;
        inst.stale.push(key.to_vec());
    }
    Ok(())
}

/// Write what the state containers changed, then hand everything to the host.
fn finish<F: Function>(
    function: &mut F,
    stale: &mut Vec<Vec<u8>>,
    out: &mut Output,
) -> Result<(), String> {
    for key in stale.drain(..) {
        let span = out.push_bytes(&key);
        out.state
            .push(crate::bindings::fogline::function::types::StateWrite {
                key: span,
                value: None,
            });
    }
    let mut set = StateSet::save(out);
    function.state(&mut set);
    set.saved()
        .map_err(|e| format!("saving state: {}", e.message))?;
    out.flush();
    Ok(())
}

#[doc(hidden)]
pub fn process<F: Function>(cell: &RefCell<Instance<F>>, batch: WitBatch) -> Result<(), String> {
    let mut inst = cell.try_borrow_mut().map_err(|_| REENTERED.to_string())?;
    let inst = &mut *inst;
    let function = inst.function.as_mut().ok_or(NOT_INITIALISED)?;
    let batch = Rc::new(Batch::decode(batch)?);
    let mut out = Output::new(batch.id);
    let len = u32::try_from(batch.len()).unwrap_or(u32::MAX);
    for index in 0..len {
        out.current_input = Some(index);
        let mark = out.mark();
        if let Err(e) = function.on_message(Message::input(&batch, index), &mut out) {
            // A rejected input must not leave outputs behind: the host
            // dead-letters the input, so its outputs would be orphans.
            out.rollback(mark);
            out.reject(index, &e.message);
        }
        if out.is_large() {
            out.flush();
        }
    }
    out.current_input = None;
    finish(function, &mut inst.stale, &mut out)
}

#[doc(hidden)]
pub fn tick<F: Function>(cell: &RefCell<Instance<F>>, now_ms: u64) -> Result<(), String> {
    let mut inst = cell.try_borrow_mut().map_err(|_| REENTERED.to_string())?;
    let inst = &mut *inst;
    let function = inst.function.as_mut().ok_or(NOT_INITIALISED)?;
    let mut out = Output::new(0);
    function.on_tick(now_ms, &mut out).map_err(|e| e.message)?;
    finish(function, &mut inst.stale, &mut out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::batch::tests::wit_batch;
    use crate::host::{Flushed, CAPTURED};
    use crate::state::Keyed;
    use serde::Deserialize;

    /// Emits the message twice, then rejects it if `value` is above `max`:
    /// checks that a rejection discards what was emitted for that input.
    /// Counts messages per stream in durable state.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Capped {
        max: f64,
        #[serde(skip)]
        seen: Keyed<String, u64>,
    }

    impl Function for Capped {
        fn init(config: Config) -> Result<Self> {
            config.parse()
        }

        fn on_message(&mut self, msg: Message, out: &mut Output) -> Result<()> {
            *self.seen.entry(msg.stream().to_string()) += 1;
            out.emit(msg.clone());
            out.emit(msg.clone());
            let v = msg.json_f64("value")?;
            if v > self.max {
                crate::bail!("value {v} is above {}", self.max);
            }
            Ok(())
        }

        fn on_tick(&mut self, now_ms: u64, out: &mut Output) -> Result<()> {
            let total: u64 = self.seen.iter().map(|(_, n)| n).sum();
            out.emit_json("stats", now_ms, &serde_json::json!({ "seen": total }))
        }

        fn state(&mut self, state: &mut StateSet<'_>) {
            state.add("seen", &mut self.seen);
        }
    }

    fn take() -> Flushed {
        let all = CAPTURED.with(|c| std::mem::take(&mut *c.borrow_mut()));
        let mut merged = Flushed::default();
        for f in all {
            let base = merged.bytes.len() as u32;
            let shift = |s: &mut crate::bindings::fogline::function::types::Span| s.offset += base;
            for mut e in f.emissions {
                if let Some(s) = e.stream.as_mut() {
                    shift(s)
                }
                if let Some(s) = e.payload.as_mut() {
                    shift(s)
                }
                merged.emissions.push(e);
            }
            for mut r in f.rejected {
                shift(&mut r.error);
                merged.rejected.push(r);
            }
            for mut w in f.state {
                shift(&mut w.key);
                if let Some(s) = w.value.as_mut() {
                    shift(s)
                }
                merged.state.push(w);
            }
            merged.bytes.extend(f.bytes);
        }
        merged
    }

    fn text(f: &Flushed, s: &crate::bindings::fogline::function::types::Span) -> String {
        String::from_utf8_lossy(&f.bytes[s.offset as usize..][..s.len as usize]).into_owned()
    }

    fn entries(pairs: &[(&[u8], &[u8])]) -> StateEntries {
        let mut e = StateEntries {
            keys: Vec::new(),
            key_ends: Vec::new(),
            values: Vec::new(),
            value_ends: Vec::new(),
        };
        for (k, v) in pairs {
            e.keys.extend_from_slice(k);
            e.key_ends.push(e.keys.len() as u32);
            e.values.extend_from_slice(v);
            e.value_ends.push(e.values.len() as u32);
        }
        e
    }

    #[test]
    fn config_parse_reports_bad_config_and_treats_empty_as_empty_object() {
        let err = Config::new(r#"{"max": "x"}"#)
            .parse::<Capped>()
            .unwrap_err();
        assert!(err.message().starts_with("invalid config: "), "{err}");
        let err = Config::new("").parse::<Capped>().unwrap_err();
        assert!(err.message().contains("missing field `max`"), "{err}");
        assert_eq!(Config::new("  ").as_str(), "{}");
    }

    #[test]
    fn process_rejects_by_index_and_drops_outputs_of_rejected_inputs() {
        let cell = RefCell::new(Instance::new());
        init::<Capped>(&cell, r#"{"max": 10}"#.into()).unwrap();
        take();
        process::<Capped>(
            &cell,
            wit_batch(&[
                ("s", 7, br#"{"value": 1}"#),
                ("s", 8, b"oops"),
                ("t", 9, br#"{"value": 11}"#),
            ]),
        )
        .unwrap();
        let out = take();
        // Only the first input passed; its two emissions are forwards of input 0.
        assert_eq!(out.emissions.len(), 2);
        assert!(out
            .emissions
            .iter()
            .all(|e| e.input == Some(0) && e.stream.is_none() && e.payload.is_none()));
        let rejected: Vec<_> = out
            .rejected
            .iter()
            .map(|r| (r.index, text(&out, &r.error)))
            .collect();
        assert_eq!(rejected.len(), 2);
        assert_eq!(rejected[0].0, 1);
        assert!(rejected[0].1.starts_with("payload is not JSON"));
        assert_eq!(rejected[1], (2, "value 11 is above 10".to_string()));
        // State changed before the rejection stays: s counted twice, t once.
        let mut writes: Vec<(String, Option<String>)> = out
            .state
            .iter()
            .map(|w| (text(&out, &w.key), w.value.as_ref().map(|v| text(&out, v))))
            .collect();
        writes.sort();
        assert_eq!(
            writes,
            vec![
                ("seen\x1f\"s\"".to_string(), Some("2".to_string())),
                ("seen\x1f\"t\"".to_string(), Some("1".to_string()))
            ]
        );
    }

    #[test]
    fn restore_loads_state_and_migrate_refuses_what_does_not_fit() {
        let cell = RefCell::new(Instance::new());
        init::<Capped>(&cell, r#"{"max": 10}"#.into()).unwrap();
        restore::<Capped>(&cell, entries(&[(b"seen\x1f\"s\"", b"41")])).unwrap();
        take();
        tick::<Capped>(&cell, 99).unwrap();
        let out = take();
        assert_eq!(out.emissions.len(), 1);
        let e = &out.emissions[0];
        assert_eq!((e.input, e.timestamp_ms), (None, 99));
        assert_eq!(text(&out, e.stream.as_ref().unwrap()), "stats");
        assert_eq!(text(&out, e.payload.as_ref().unwrap()), r#"{"seen":41}"#);
        assert!(out.state.is_empty(), "restoring is not a change");

        let err = restore::<Capped>(&cell, entries(&[(b"old\x1fk", b"1")])).unwrap_err();
        assert!(err.contains("no state container is named `old`"), "{err}");
        let err = restore::<Capped>(&cell, entries(&[(b"seen\x1f\"s\"", b"\"x\"")])).unwrap_err();
        assert!(err.contains("value does not decode"), "{err}");
    }

    #[test]
    fn calls_before_init_and_failed_init_are_errors() {
        let cell = RefCell::new(Instance::<Capped>::new());
        assert_eq!(
            process::<Capped>(&cell, wit_batch(&[("s", 1, b"{}")])).unwrap_err(),
            NOT_INITIALISED
        );
        assert_eq!(tick::<Capped>(&cell, 0).unwrap_err(), NOT_INITIALISED);
        let err = init::<Capped>(&cell, "{}".into()).unwrap_err();
        assert!(err.contains("missing field `max`"), "{err}");
        assert!(cell.borrow().function.is_none());
    }

    #[test]
    fn a_message_kept_from_an_earlier_batch_is_emitted_as_bytes() {
        struct Delay {
            held: Option<Message>,
        }
        impl Function for Delay {
            fn init(_: Config) -> Result<Self> {
                Ok(Delay { held: None })
            }
            fn on_message(&mut self, msg: Message, out: &mut Output) -> Result<()> {
                if let Some(old) = self.held.replace(msg) {
                    out.emit(old);
                }
                Ok(())
            }
        }
        let cell = RefCell::new(Instance::new());
        init::<Delay>(&cell, "{}".into()).unwrap();
        process::<Delay>(&cell, wit_batch(&[("a", 1, b"first")])).unwrap();
        process::<Delay>(&cell, wit_batch(&[("b", 2, b"second")])).unwrap();
        let out = take();
        assert_eq!(out.emissions.len(), 1);
        let e = &out.emissions[0];
        assert_eq!(e.input, Some(0), "derives from the input being handled");
        assert_eq!(text(&out, e.stream.as_ref().unwrap()), "a");
        assert_eq!(text(&out, e.payload.as_ref().unwrap()), "first");
    }

    #[test]
    fn errors_convert_and_take_context() {
        let parse: Result<f64> = "x".parse::<f64>().map_err(Error::from);
        let err = parse.unwrap_err().context("reading `temp`");
        assert_eq!(err.message(), "reading `temp`: invalid float literal");
        assert_eq!(err.to_string(), err.message());
    }
}
