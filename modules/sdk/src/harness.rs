//! [`Harness`]: run a [`Function`] on the host, in plain `cargo test`, the
//! way the daemon drives it: `init`, `restore`, batches and ticks, outputs and
//! state committed together, a failed call rolled back.
//!
//! ```ignore
//! #[cfg(test)]
//! mod tests {
//!     use super::*;
//!     use fogline_sdk::harness::Harness;
//!
//!     #[test]
//!     fn passes_readings_above_the_bound() {
//!         let mut h = Harness::<Threshold>::new(r#"{"field": "t", "above": 20}"#).unwrap();
//!         let out = h.send_json("s/1", 1_000, &json!({"t": 25})).unwrap();
//!         assert_eq!(out.emitted.len(), 1);
//!         assert_eq!(out.emitted[0].json().unwrap()["t"], 25);
//!     }
//! }
//! ```
//!
//! Only on the host: inside a component the daemon is the harness.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;

use crate::bindings::fogline::function::types::{Batch as WitBatch, Span, StateEntries};
use crate::function::{self, Function, Instance};
use crate::host::{Flushed, CAPTURED};
use crate::state::{split_key, SEPARATOR};
use crate::{Error, Result};

/// One message fed to the function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The stream (MQTT topic) it arrived on.
    pub stream: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// The payload, as received.
    pub payload: Vec<u8>,
}

impl Input {
    /// A message with these bytes.
    pub fn new(stream: impl Into<String>, timestamp_ms: u64, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            stream: stream.into(),
            timestamp_ms,
            payload: payload.into(),
        }
    }

    /// A message whose payload is `value` as JSON.
    pub fn json(stream: impl Into<String>, timestamp_ms: u64, value: &serde_json::Value) -> Self {
        Self::new(stream, timestamp_ms, value.to_string())
    }
}

/// One message the function emitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// The input it derives from (its index in the batch); `None` for what
    /// a tick emitted.
    pub input: Option<u32>,
    /// Its stream.
    pub stream: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Emitted {
    /// The payload parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            Error::new(format!(
                "emitted payload on `{}` is not JSON: {e}",
                self.stream
            ))
        })
    }

    /// The payload as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// One input the function refused (the daemon dead-letters it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Its index in the batch.
    pub index: u32,
    /// The function's error text.
    pub error: String,
}

/// What one `process` or `tick` call produced, as the daemon commits it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Messages passed on, in order.
    pub emitted: Vec<Emitted>,
    /// Inputs refused, in order.
    pub rejected: Vec<Rejected>,
}

/// A durable state entry as committed: the container's name, the key inside
/// it and the value (JSON for the SDK's containers).
#[derive(Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// The container's name, as given to [`StateSet::add`](crate::StateSet::add).
    pub container: String,
    /// The key inside the container (JSON for [`Keyed`](crate::Keyed); empty for [`State`](crate::State)).
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
}

impl StoredEntry {
    /// The value parsed as JSON.
    pub fn value_json(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&self.value)?)
    }
}

impl fmt::Debug for StoredEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}[{}] = {}",
            self.container,
            String::from_utf8_lossy(&self.key),
            String::from_utf8_lossy(&self.value)
        )
    }
}

/// Drives one instance of `F` as the daemon would, and keeps the committed
/// state so [`restart`](Harness::restart) can show what survives.
///
/// - [`process`](Harness::process) hands a batch; a rejected input (an
///   `Err` from `on_message`) appears in [`Outcome::rejected`] with its
///   outputs discarded, and the rest of the batch goes on.
/// - A call that fails as a whole (an `Err` from `on_tick`, a state that
///   does not save) returns the error; as on the daemon, nothing it emitted
///   or changed is committed and the instance restarts from the committed
///   state. (The daemon then retries a failed batch in halves to find the
///   input that fails; the harness leaves that to the test.)
/// - A panic is a trap on the daemon; here it fails the test.
pub struct Harness<F: Function> {
    config: String,
    instance: RefCell<Instance<F>>,
    committed: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl<F: Function> fmt::Debug for Harness<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Harness")
            .field("config", &self.config)
            .field("state_entries", &self.committed.len())
            .finish()
    }
}

impl<F: Function> Harness<F> {
    /// `init` with this configuration (the function's TOML table as JSON; an
    /// empty text counts as `{}`). The init's error is returned as is.
    pub fn new(config_json: impl Into<String>) -> Result<Self> {
        Self::with_state(config_json, std::iter::empty())
    }

    /// `init`, then `restore` these committed entries (as read from
    /// [`state`](Harness::state), say of another harness): tests migrations
    /// and restarts.
    pub fn with_state(
        config_json: impl Into<String>,
        state: impl IntoIterator<Item = StoredEntry>,
    ) -> Result<Self> {
        let committed = state
            .into_iter()
            .map(|e| (full_key(&e.container, &e.key), e.value))
            .collect();
        let mut h = Self {
            config: config_json.into(),
            instance: RefCell::new(Instance::new()),
            committed,
        };
        h.restart()?;
        Ok(h)
    }

    /// Start a fresh instance from `init` and the committed state, as the
    /// daemon does after a crash, a trap or a deploy. What the function kept
    /// outside its durable containers is gone.
    pub fn restart(&mut self) -> Result<()> {
        self.instance = RefCell::new(Instance::new());
        drain();
        function::init(&self.instance, self.config.clone()).map_err(Error::new)?;
        let result = function::restore(&self.instance, self.entries());
        // `restore` may hand stale keys to `migrate`; they are deleted at
        // the next save, as on the daemon.
        drain();
        result.map_err(Error::new)
    }

    /// Hand one batch to `process`.
    pub fn process(&mut self, inputs: impl IntoIterator<Item = Input>) -> Result<Outcome> {
        let inputs: Vec<Input> = inputs.into_iter().collect();
        drain();
        let result = function::process(&self.instance, wit_batch(&inputs));
        self.commit(result, &inputs)
    }

    /// A batch of one message.
    pub fn send(
        &mut self,
        stream: impl Into<String>,
        timestamp_ms: u64,
        payload: impl Into<Vec<u8>>,
    ) -> Result<Outcome> {
        self.process([Input::new(stream, timestamp_ms, payload)])
    }

    /// A batch of one message whose payload is `value` as JSON.
    pub fn send_json(
        &mut self,
        stream: impl Into<String>,
        timestamp_ms: u64,
        value: &serde_json::Value,
    ) -> Result<Outcome> {
        self.process([Input::json(stream, timestamp_ms, value)])
    }

    /// Call `tick` with the gateway's clock at `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Result<Outcome> {
        drain();
        let result = function::tick(&self.instance, now_ms);
        self.commit(result, &[])
    }

    /// The committed durable state, in key order.
    pub fn state(&self) -> Vec<StoredEntry> {
        self.committed
            .iter()
            .map(|(k, v)| {
                let (container, key) = split_key(k).unwrap_or(("", k));
                StoredEntry {
                    container: container.to_string(),
                    key: key.to_vec(),
                    value: v.clone(),
                }
            })
            .collect()
    }

    /// The committed value of a [`State`](crate::State) container, as JSON.
    pub fn state_value(&self, container: &str) -> Option<serde_json::Value> {
        let v = self.committed.get(&full_key(container, b""))?;
        serde_json::from_slice(v).ok()
    }

    /// The committed entries of a [`Keyed`](crate::Keyed) container: key and
    /// value, both as JSON.
    pub fn state_map(&self, container: &str) -> Vec<(serde_json::Value, serde_json::Value)> {
        self.state()
            .into_iter()
            .filter(|e| e.container == container && !e.key.is_empty())
            .filter_map(|e| {
                let k = serde_json::from_slice(&e.key).ok()?;
                let v = serde_json::from_slice(&e.value).ok()?;
                Some((k, v))
            })
            .collect()
    }

    fn entries(&self) -> StateEntries {
        let mut e = StateEntries {
            keys: Vec::new(),
            key_ends: Vec::new(),
            values: Vec::new(),
            value_ends: Vec::new(),
        };
        for (k, v) in &self.committed {
            e.keys.extend_from_slice(k);
            e.key_ends.push(len32(e.keys.len()));
            e.values.extend_from_slice(v);
            e.value_ends.push(len32(e.values.len()));
        }
        e
    }

    /// Commit what the call handed over, or roll back to the committed
    /// state when it failed.
    fn commit(
        &mut self,
        result: std::result::Result<(), String>,
        inputs: &[Input],
    ) -> Result<Outcome> {
        let flushed = drain();
        if let Err(e) = result {
            self.restart()?;
            return Err(Error::new(e));
        }
        let mut outcome = Outcome::default();
        for f in flushed {
            let bytes = |s: &Span| -> Vec<u8> {
                f.bytes
                    .get(s.offset as usize..)
                    .and_then(|b| b.get(..s.len as usize))
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default()
            };
            for e in &f.emissions {
                let input = e.input.and_then(|i| inputs.get(i as usize));
                let stream = match (&e.stream, input) {
                    (Some(s), _) => String::from_utf8_lossy(&bytes(s)).into_owned(),
                    (None, Some(i)) => i.stream.clone(),
                    (None, None) => String::new(),
                };
                let payload = match (&e.payload, input) {
                    (Some(s), _) => bytes(s),
                    (None, Some(i)) => i.payload.clone(),
                    (None, None) => Vec::new(),
                };
                outcome.emitted.push(Emitted {
                    input: e.input,
                    stream,
                    timestamp_ms: e.timestamp_ms,
                    payload,
                });
            }
            for r in &f.rejected {
                outcome.rejected.push(Rejected {
                    index: r.index,
                    error: String::from_utf8_lossy(&bytes(&r.error)).into_owned(),
                });
            }
            for w in &f.state {
                let key = bytes(&w.key);
                match &w.value {
                    Some(v) => {
                        self.committed.insert(key, bytes(v));
                    }
                    None => {
                        self.committed.remove(&key);
                    }
                }
            }
        }
        Ok(outcome)
    }
}

/// What the SDK handed the stand-in host since the last drain.
fn drain() -> Vec<Flushed> {
    CAPTURED.with(|c| std::mem::take(&mut *c.borrow_mut()))
}

fn full_key(container: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(container.len() + 1 + key.len());
    k.extend_from_slice(container.as_bytes());
    k.push(SEPARATOR);
    k.extend_from_slice(key);
    k
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The batch as the daemon lowers it: columnar, each stream name once.
pub(crate) fn wit_batch(inputs: &[Input]) -> WitBatch {
    let mut b = WitBatch {
        payloads: Vec::new(),
        payload_ends: Vec::new(),
        timestamps_ms: Vec::new(),
        streams: Vec::new(),
        stream_names: Vec::new(),
        stream_name_ends: Vec::new(),
    };
    let mut names: Vec<&str> = Vec::new();
    for i in inputs {
        let idx = match names.iter().position(|n| *n == i.stream) {
            Some(p) => p,
            None => {
                names.push(&i.stream);
                b.stream_names.extend_from_slice(i.stream.as_bytes());
                b.stream_name_ends.push(len32(b.stream_names.len()));
                names.len() - 1
            }
        };
        b.payloads.extend_from_slice(&i.payload);
        b.payload_ends.push(len32(b.payloads.len()));
        b.timestamps_ms.push(i.timestamp_ms);
        b.streams.push(len32(idx));
    }
    b
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::prelude::*;

    /// Passes values under `max`, rejects the others; counts per stream
    /// (durable) and in a plain field (lost on restart); reports on tick.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Capped {
        max: f64,
        #[serde(skip)]
        seen: Keyed<String, u64>,
        #[serde(skip)]
        volatile: u64,
    }

    impl Function for Capped {
        fn init(config: Config) -> Result<Self> {
            config.parse()
        }
        fn on_message(&mut self, msg: Message, out: &mut Output) -> Result<()> {
            *self.seen.entry(msg.stream().to_string()) += 1;
            self.volatile += 1;
            out.emit(msg.clone());
            let v = msg.json_f64("value")?;
            if v > self.max {
                bail!("value {v} is above {}", self.max);
            }
            Ok(())
        }
        fn on_tick(&mut self, now_ms: u64, out: &mut Output) -> Result<()> {
            if now_ms == 0 {
                bail!("no clock");
            }
            out.emit_json(
                "stats",
                now_ms,
                &json!({"seen": self.seen.iter().map(|(_, n)| n).sum::<u64>(), "volatile": self.volatile}),
            )
        }
        fn state(&mut self, state: &mut StateSet<'_>) {
            state.add("seen", &mut self.seen);
        }
    }

    #[test]
    fn a_batch_shows_what_was_emitted_and_rejected_with_rejected_outputs_dropped() {
        let mut h = Harness::<Capped>::new(r#"{"max": 10}"#).unwrap();
        let out = h
            .process([
                Input::json("a", 1, &json!({"value": 5})),
                Input::json("b", 2, &json!({"value": 50})),
                Input::json("a", 3, &json!({"value": 7})),
            ])
            .unwrap();
        let got: Vec<(Option<u32>, &str, u64)> = out
            .emitted
            .iter()
            .map(|e| (e.input, e.stream.as_str(), e.timestamp_ms))
            .collect();
        assert_eq!(got, vec![(Some(0), "a", 1), (Some(2), "a", 3)]);
        assert_eq!(out.emitted[1].json().unwrap()["value"], 7);
        assert_eq!(
            out.rejected,
            vec![Rejected {
                index: 1,
                error: "value 50 is above 10".into()
            }]
        );
        assert_eq!(
            h.state_map("seen"),
            vec![(json!("a"), json!(2)), (json!("b"), json!(1))]
        );
    }

    #[test]
    fn a_restart_keeps_durable_state_and_loses_plain_fields() {
        let mut h = Harness::<Capped>::new(r#"{"max": 10}"#).unwrap();
        h.send_json("a", 1, &json!({"value": 1})).unwrap();
        h.send_json("a", 2, &json!({"value": 2})).unwrap();
        h.restart().unwrap();
        let out = h.tick(100).unwrap();
        assert_eq!(out.emitted.len(), 1);
        assert_eq!(out.emitted[0].input, None);
        assert_eq!(
            out.emitted[0].json().unwrap(),
            json!({"seen": 2, "volatile": 0})
        );
        // Carried to another harness, as the daemon's store would.
        let h2 = Harness::<Capped>::with_state(r#"{"max": 10}"#, h.state()).unwrap();
        assert_eq!(h2.state_map("seen"), vec![(json!("a"), json!(2))]);
    }

    #[test]
    fn a_failed_call_commits_nothing_and_rolls_back() {
        let mut h = Harness::<Capped>::new(r#"{"max": 10}"#).unwrap();
        h.send_json("a", 1, &json!({"value": 1})).unwrap();
        let err = h.tick(0).unwrap_err();
        assert_eq!(err.message(), "no clock");
        let out = h.tick(5).unwrap();
        assert_eq!(
            out.emitted[0].json().unwrap(),
            json!({"seen": 1, "volatile": 0})
        );
    }

    #[test]
    fn a_bad_config_is_the_init_error() {
        let err = Harness::<Capped>::new(r#"{"max": "x"}"#).unwrap_err();
        assert!(err.message().starts_with("invalid config: "), "{err}");
    }
}
