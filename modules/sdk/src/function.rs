//! The [`Function`] trait, its inputs and outputs, and the glue that adapts it
//! to the WIT exports.

use std::cell::RefCell;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bindings::fogline::function::types::Rejection;
use crate::bindings::{Message as WitMessage, Output as WitOutput};
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
/// The value is the function's state; it lives as long as the instance,
/// across batches, until the host restarts the instance (after a trap or
/// timeout), which calls [`init`](Function::init) again.
pub trait Function: Sized + 'static {
    /// Build the function from its configuration (the function's table in
    /// the daemon's TOML config, as JSON). Usually `config.parse()`.
    ///
    /// An `Err` makes loading the function fail with this message.
    fn init(config: Config) -> Result<Self>;

    /// Handle one message of a batch. Emit zero or more messages to `out`.
    ///
    /// An `Err` rejects this message only: the host dead-letters it with the
    /// error text, and anything emitted during this call is discarded.
    fn on_message(&mut self, msg: Message, out: &mut Output) -> Result<()>;

    /// Called on the host's timer with its wall clock (ms since the Unix
    /// epoch). Close windows, send heartbeats. Does nothing by default.
    ///
    /// An `Err` fails the tick (the host logs it; nothing is emitted).
    fn on_tick(&mut self, now_ms: u64, out: &mut Output) -> Result<()> {
        let _ = (now_ms, out);
        Ok(())
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

/// What a call produces: messages to pass on down the pipeline.
#[derive(Debug, Default)]
pub struct Output {
    pub(crate) messages: Vec<WitMessage>,
}

impl Output {
    /// Pass a message on (unchanged, or after [`Message::set_payload`] and
    /// friends). Moves it: no copy of the payload.
    pub fn emit(&mut self, msg: Message) {
        self.messages.push(msg.into_wit());
    }

    /// Emit a new message.
    pub fn emit_new(
        &mut self,
        stream: impl Into<String>,
        timestamp_ms: u64,
        payload: impl Into<Vec<u8>>,
    ) {
        self.messages.push(WitMessage {
            stream: stream.into(),
            timestamp_ms,
            payload: payload.into(),
        });
    }

    /// Emit a new message whose payload is `value` serialized as JSON.
    pub fn emit_json<T: Serialize + ?Sized>(
        &mut self,
        stream: impl Into<String>,
        timestamp_ms: u64,
        value: &T,
    ) -> Result<()> {
        let payload = serde_json::to_vec(value)?;
        self.emit_new(stream, timestamp_ms, payload);
        Ok(())
    }

    /// How many messages were emitted so far in this call.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether nothing was emitted so far in this call.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

const NOT_INITIALISED: &str = "function called before a successful init";
const REENTERED: &str = "function re-entered while a call is running";

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
pub fn init<F: Function>(state: &RefCell<Option<F>>, config: String) -> Result<(), String> {
    install_panic_hook();
    let function = F::init(Config::new(config)).map_err(|e| e.message)?;
    *state.try_borrow_mut().map_err(|_| REENTERED.to_string())? = Some(function);
    Ok(())
}

#[doc(hidden)]
pub fn process<F: Function>(
    state: &RefCell<Option<F>>,
    batch: Vec<WitMessage>,
) -> Result<WitOutput, String> {
    let mut state = state.try_borrow_mut().map_err(|_| REENTERED.to_string())?;
    let function = state.as_mut().ok_or(NOT_INITIALISED)?;
    let mut out = Output::default();
    let mut rejected = Vec::new();
    for (index, msg) in batch.into_iter().enumerate() {
        let mark = out.messages.len();
        if let Err(e) = function.on_message(Message::from_wit(msg), &mut out) {
            // A rejected input must not leave outputs behind: the host
            // dead-letters the input, so its outputs would be orphans.
            out.messages.truncate(mark);
            rejected.push(Rejection {
                // A wasm32 batch cannot hold more than u32::MAX messages.
                index: u32::try_from(index).unwrap_or(u32::MAX),
                error: e.message,
            });
        }
    }
    Ok(WitOutput {
        messages: out.messages,
        rejected,
    })
}

#[doc(hidden)]
pub fn tick<F: Function>(state: &RefCell<Option<F>>, now_ms: u64) -> Result<WitOutput, String> {
    let mut state = state.try_borrow_mut().map_err(|_| REENTERED.to_string())?;
    let function = state.as_mut().ok_or(NOT_INITIALISED)?;
    let mut out = Output::default();
    function.on_tick(now_ms, &mut out).map_err(|e| e.message)?;
    Ok(WitOutput {
        messages: out.messages,
        rejected: Vec::new(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// Emits the message twice, then rejects it if `value` is above `max`:
    /// checks that a rejection discards what was emitted for that input.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Capped {
        max: f64,
        #[serde(skip)]
        seen: u64,
    }

    impl Function for Capped {
        fn init(config: Config) -> Result<Self> {
            config.parse()
        }

        fn on_message(&mut self, msg: Message, out: &mut Output) -> Result<()> {
            self.seen += 1;
            out.emit(msg.clone());
            out.emit(msg.clone());
            let v = msg.json_f64("value")?;
            if v > self.max {
                crate::bail!("value {v} is above {}", self.max);
            }
            Ok(())
        }

        fn on_tick(&mut self, now_ms: u64, out: &mut Output) -> Result<()> {
            out.emit_json("stats", now_ms, &serde_json::json!({ "seen": self.seen }))
        }
    }

    fn wit(payload: &str) -> WitMessage {
        WitMessage {
            stream: "s".into(),
            timestamp_ms: 7,
            payload: payload.as_bytes().to_vec(),
        }
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
        let state = RefCell::new(None);
        init::<Capped>(&state, r#"{"max": 10}"#.into()).unwrap();
        let out = process::<Capped>(
            &state,
            vec![wit(r#"{"value": 1}"#), wit("oops"), wit(r#"{"value": 11}"#)],
        )
        .unwrap();
        // Only the first input passed; its two emissions remain.
        assert_eq!(out.messages.len(), 2);
        assert!(out.messages.iter().all(|m| m.payload == br#"{"value": 1}"#));
        let rejected: Vec<_> = out
            .rejected
            .iter()
            .map(|r| (r.index, r.error.as_str()))
            .collect();
        assert_eq!(rejected.len(), 2);
        assert_eq!(rejected[0].0, 1);
        assert!(rejected[0].1.starts_with("payload is not JSON"));
        assert_eq!(rejected[1], (2, "value 11 is above 10"));
    }

    #[test]
    fn tick_sees_state_kept_across_batches() {
        let state = RefCell::new(None);
        init::<Capped>(&state, r#"{"max": 10}"#.into()).unwrap();
        process::<Capped>(&state, vec![wit(r#"{"value": 1}"#)]).unwrap();
        process::<Capped>(&state, vec![wit(r#"{"value": 2}"#)]).unwrap();
        let out = tick::<Capped>(&state, 99).unwrap();
        assert!(out.rejected.is_empty());
        assert_eq!(out.messages.len(), 1);
        assert_eq!(out.messages[0].stream, "stats");
        assert_eq!(out.messages[0].timestamp_ms, 99);
        assert_eq!(out.messages[0].payload, br#"{"seen":2}"#);
    }

    #[test]
    fn calls_before_init_and_failed_init_are_errors() {
        let state = RefCell::new(None::<Capped>);
        assert_eq!(
            process::<Capped>(&state, vec![wit("{}")]).unwrap_err(),
            NOT_INITIALISED
        );
        assert_eq!(tick::<Capped>(&state, 0).unwrap_err(), NOT_INITIALISED);
        let err = init::<Capped>(&state, "{}".into()).unwrap_err();
        assert!(err.contains("missing field `max`"), "{err}");
        assert!(state.borrow().is_none());
    }

    #[test]
    fn errors_convert_and_take_context() {
        let parse: Result<f64> = "x".parse::<f64>().map_err(Error::from);
        let err = parse.unwrap_err().context("reading `temp`");
        assert_eq!(err.message(), "reading `temp`: invalid float literal");
        assert_eq!(err.to_string(), err.message());
    }
}
