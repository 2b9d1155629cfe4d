//! Durable state: typed containers whose changes the host commits in the same
//! outbox transaction as the batch that caused them.
//!
//! A function keeps its state in containers ([`State`], [`Keyed`],
//! [`Windows`](crate::Windows)) and names them in [`Function::state`](crate::Function::state):
//!
//! ```ignore
//! struct Dedup { seen: Keyed<String, u64> }
//! impl Function for Dedup {
//!     // ...
//!     fn state(&mut self, state: &mut StateSet) {
//!         state.add("seen", &mut self.seen);
//!     }
//! }
//! ```
//!
//! After every `process` and `tick` the SDK writes what changed (and only
//! that) to the host, which commits it with the call's outputs. After a
//! restart — a crash, a trap, a deploy — the host hands the committed entries
//! back and the SDK loads them into the same containers: the function resumes
//! from exactly the state that matches what was acknowledged.
//!
//! Rules that keep this exact:
//! - Check what can fail before changing state: an `Err` from `on_message`
//!   rejects that message but keeps what `on_message` changed before it.
//! - Keep everything that must survive a restart in containers; plain fields
//!   are rebuilt by `init`.
//!
//! Keys and values are JSON (`serde_json`), so a new field with
//! `#[serde(default)]` reads old state unchanged; for other shape changes
//! implement [`Function::migrate`](crate::Function::migrate).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Deref, DerefMut};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bindings::fogline::function::types::StateWrite;
use crate::output::Output;
use crate::{Error, Result};

/// Separates a container's name from the key inside it.
pub(crate) const SEPARATOR: u8 = 0x1f;
/// Longest key, container name included (the host's limit).
pub const MAX_KEY_BYTES: usize = 1024;

/// A state container: loads committed entries and writes its changes.
pub trait Durable {
    /// Take one committed entry (its key without the container's name).
    /// An `Err` hands the entry to [`Function::migrate`](crate::Function::migrate).
    fn load(&mut self, key: &[u8], value: &[u8]) -> Result<()>;
    /// Write every change since the last `save` and forget them.
    fn save(&mut self, out: &mut StateWriter<'_>) -> Result<()>;
}

/// Where a container writes its changes.
pub struct StateWriter<'a> {
    out: &'a mut Output,
    name: &'a str,
}

impl StateWriter<'_> {
    /// Set `key` to `value`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let key = self.key(key)?;
        let value = self.out.push_bytes(value);
        self.out.state.push(StateWrite {
            key,
            value: Some(value),
        });
        Ok(())
    }

    /// Set `key` to `value` as JSON.
    pub fn put_json<T: Serialize + ?Sized>(&mut self, key: &[u8], value: &T) -> Result<()> {
        let value = serde_json::to_vec(value)?;
        self.put(key, &value)
    }

    /// Delete `key`.
    pub fn delete(&mut self, key: &[u8]) -> Result<()> {
        let key = self.key(key)?;
        self.out.state.push(StateWrite { key, value: None });
        Ok(())
    }

    fn key(&mut self, key: &[u8]) -> Result<crate::bindings::fogline::function::types::Span> {
        let len = self.name.len() + 1 + key.len();
        if len > MAX_KEY_BYTES {
            return Err(Error::new(format!(
                "state key in `{}` is {len} bytes, the limit is {MAX_KEY_BYTES}",
                self.name
            )));
        }
        let start = self.out.bytes.len();
        self.out.bytes.extend_from_slice(self.name.as_bytes());
        self.out.bytes.push(SEPARATOR);
        self.out.bytes.extend_from_slice(key);
        Ok(crate::bindings::fogline::function::types::Span {
            offset: u32::try_from(start).unwrap_or(u32::MAX),
            len: u32::try_from(len).unwrap_or(u32::MAX),
        })
    }
}

/// The function's containers, by name; see [`Function::state`](crate::Function::state).
pub struct StateSet<'a> {
    op: Op<'a>,
}

enum Op<'a> {
    Load {
        name: &'a str,
        key: &'a [u8],
        value: &'a [u8],
        outcome: Option<Result<()>>,
    },
    Save {
        out: &'a mut Output,
        result: Result<()>,
    },
}

impl<'a> StateSet<'a> {
    pub(crate) fn load(name: &'a str, key: &'a [u8], value: &'a [u8]) -> Self {
        Self {
            op: Op::Load {
                name,
                key,
                value,
                outcome: None,
            },
        }
    }

    pub(crate) fn save(out: &'a mut Output) -> Self {
        Self {
            op: Op::Save {
                out,
                result: Ok(()),
            },
        }
    }

    /// `None`: no container has that name.
    pub(crate) fn loaded(self) -> Option<Result<()>> {
        match self.op {
            Op::Load { outcome, .. } => outcome,
            Op::Save { .. } => None,
        }
    }

    pub(crate) fn saved(self) -> Result<()> {
        match self.op {
            Op::Save { result, .. } => result,
            Op::Load { .. } => Ok(()),
        }
    }

    /// Name a container. Names are short, unique and never change (they are
    /// part of every key the container stores): renaming one is a migration.
    pub fn add(&mut self, name: &str, container: &mut dyn Durable) {
        match &mut self.op {
            Op::Load {
                name: wanted,
                key,
                value,
                outcome,
            } => {
                if *wanted == name && outcome.is_none() {
                    *outcome = Some(container.load(key, value));
                }
            }
            Op::Save { out, result } => {
                if result.is_err() {
                    return;
                }
                if name.is_empty() || name.as_bytes().contains(&SEPARATOR) {
                    *result = Err(Error::new(format!(
                        "state container name {name:?} is empty or contains \\x1f"
                    )));
                    return;
                }
                let mut w = StateWriter { out, name };
                *result = container.save(&mut w);
            }
        }
    }
}

/// A stored entry the current containers could not take: the previous
/// version wrote it (a renamed container, a changed type). See
/// [`Function::migrate`](crate::Function::migrate).
#[derive(Debug, Clone)]
pub struct StateEntry {
    /// The container's name.
    pub container: String,
    /// The key inside the container, as stored (JSON for [`Keyed`]; empty
    /// for [`State`]).
    pub key: Vec<u8>,
    /// The value, as stored (JSON).
    pub value: Vec<u8>,
    /// Why the current containers refused it.
    pub error: String,
}

impl StateEntry {
    /// The value as a JSON document.
    pub fn value_json(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&self.value)?)
    }

    /// The value as `T`.
    pub fn value_as<T: DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_slice(&self.value)?)
    }

    /// The key as `K` (a [`Keyed`] key).
    pub fn key_as<K: DeserializeOwned>(&self) -> Result<K> {
        Ok(serde_json::from_slice(&self.key)?)
    }
}

/// Split a stored key into `(container, key inside it)`.
pub(crate) fn split_key(key: &[u8]) -> Option<(&str, &[u8])> {
    let at = key.iter().position(|&b| b == SEPARATOR)?;
    let name = std::str::from_utf8(&key[..at]).ok()?;
    Some((name, &key[at + 1..]))
}

/// One durable value. Reading is free; any `&mut` access marks it changed,
/// and the next save writes it whole.
///
/// ```ignore
/// count: State<u64>,
/// *self.count += 1;
/// ```
#[derive(Debug, Default, Clone)]
pub struct State<T> {
    value: T,
    changed: bool,
}

impl<T> State<T> {
    /// A value (written at the first save).
    pub fn new(value: T) -> Self {
        Self {
            value,
            changed: true,
        }
    }
}

impl<T> Deref for State<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> DerefMut for State<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.changed = true;
        &mut self.value
    }
}

impl<T: Serialize + DeserializeOwned> Durable for State<T> {
    fn load(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        if !key.is_empty() {
            return Err(Error::new("a single value has no keys"));
        }
        self.value = serde_json::from_slice(value)?;
        self.changed = false;
        Ok(())
    }

    fn save(&mut self, out: &mut StateWriter<'_>) -> Result<()> {
        if self.changed {
            out.put_json(b"", &self.value)?;
            self.changed = false;
        }
        Ok(())
    }
}

/// A durable map. Each save writes only the keys changed since the last
/// one (any `&mut` access counts) and deletes the removed ones.
#[derive(Debug, Clone)]
pub struct Keyed<K, V> {
    map: BTreeMap<K, V>,
    changed: BTreeSet<K>,
    removed: BTreeSet<K>,
}

impl<K, V> Default for Keyed<K, V> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
            changed: BTreeSet::new(),
            removed: BTreeSet::new(),
        }
    }
}

impl<K: Ord + Clone, V> Keyed<K, V> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value at `key`.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.map.get(key)
    }

    /// The value at `key`, to change.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let v = self.map.get_mut(key)?;
        self.changed.insert(key.clone());
        self.removed.remove(key);
        Some(v)
    }

    /// The value at `key`, inserted with `V::default()` if absent, to change.
    pub fn entry(&mut self, key: K) -> &mut V
    where
        V: Default,
    {
        self.removed.remove(&key);
        self.changed.insert(key.clone());
        self.map.entry(key).or_default()
    }

    /// Set `key` to `value`; returns the old value.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.removed.remove(&key);
        self.changed.insert(key.clone());
        self.map.insert(key, value)
    }

    /// Remove `key`; returns its value.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let v = self.map.remove(key)?;
        self.changed.remove(key);
        self.removed.insert(key.clone());
        Some(v)
    }

    /// Keep only the entries `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        let gone: Vec<K> = self
            .map
            .iter()
            .filter(|(k, v)| !keep(k, v))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.remove(&k);
        }
    }

    /// Whether `key` is present.
    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.map.contains_key(key)
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter()
    }

    /// Entries in a key range, in order.
    pub fn range<R: std::ops::RangeBounds<K>>(&self, range: R) -> impl Iterator<Item = (&K, &V)> {
        self.map.range(range)
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl<K, V> Durable for Keyed<K, V>
where
    K: Ord + Clone + Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    fn load(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let k: K = serde_json::from_slice(key)
            .map_err(|e| Error::new(format!("key does not decode: {e}")))?;
        let v: V = serde_json::from_slice(value)
            .map_err(|e| Error::new(format!("value does not decode: {e}")))?;
        self.map.insert(k, v);
        Ok(())
    }

    fn save(&mut self, out: &mut StateWriter<'_>) -> Result<()> {
        for k in std::mem::take(&mut self.removed) {
            out.delete(&serde_json::to_vec(&k)?)?;
        }
        for k in std::mem::take(&mut self.changed) {
            if let Some(v) = self.map.get(&k) {
                out.put_json(&serde_json::to_vec(&k)?, v)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;

    /// `(key, Some(value))` or `(key, None)` for a delete, as the host sees them.
    pub(crate) fn writes(out: &Output) -> Vec<(String, Option<String>)> {
        let text = |s: &crate::bindings::fogline::function::types::Span| {
            String::from_utf8_lossy(&out.bytes[s.offset as usize..][..s.len as usize])
                .replace('\x1f', "|")
        };
        out.state
            .iter()
            .map(|w| (text(&w.key), w.value.as_ref().map(text)))
            .collect()
    }

    fn save(name: &str, c: &mut dyn Durable) -> Vec<(String, Option<String>)> {
        let mut out = Output::new(0);
        let mut set = StateSet::save(&mut out);
        set.add(name, c);
        set.saved().unwrap();
        writes(&out)
    }

    #[test]
    fn keyed_writes_only_what_changed_and_deletes_what_was_removed() {
        let mut k: Keyed<String, u64> = Keyed::new();
        k.insert("a".into(), 1);
        *k.entry("b".into()) += 2;
        assert_eq!(
            save("k", &mut k),
            vec![
                ("k|\"a\"".into(), Some("1".into())),
                ("k|\"b\"".into(), Some("2".into()))
            ]
        );
        assert_eq!(save("k", &mut k), vec![], "nothing changed since");
        assert_eq!(k.get("a"), Some(&1), "reading is not a change");
        assert_eq!(save("k", &mut k), vec![]);
        k.remove(&"a".to_string());
        *k.get_mut(&"b".to_string()).unwrap() = 5;
        assert_eq!(
            save("k", &mut k),
            vec![
                ("k|\"a\"".into(), None),
                ("k|\"b\"".into(), Some("5".into()))
            ]
        );
    }

    #[test]
    fn state_round_trips_through_load() {
        let mut s: State<Vec<u32>> = State::new(vec![1]);
        s.push(2);
        let w = save("v", &mut s);
        assert_eq!(w, vec![("v|".into(), Some("[1,2]".into()))]);
        let mut fresh: State<Vec<u32>> = State::default();
        fresh.load(b"", b"[1,2]").unwrap();
        assert_eq!(*fresh, vec![1, 2]);
        assert_eq!(save("v", &mut fresh), vec![], "loading is not a change");
        assert!(fresh.load(b"", b"\"x\"").is_err());
    }

    #[test]
    fn load_goes_to_the_named_container_only() {
        let mut a: Keyed<String, u64> = Keyed::new();
        let mut b: Keyed<String, u64> = Keyed::new();
        let mut set = StateSet::load("b", br#""x""#, b"7");
        set.add("a", &mut a);
        set.add("b", &mut b);
        assert!(set.loaded().unwrap().is_ok());
        assert!(a.is_empty());
        assert_eq!(b.get("x"), Some(&7));
        let mut set = StateSet::load("c", br#""x""#, b"7");
        set.add("a", &mut a);
        assert!(set.loaded().is_none(), "no container named c");
        assert_eq!(split_key(b"win\x1fkey"), Some(("win", &b"key"[..])));
        assert_eq!(split_key(b"nosep"), None);
    }

    #[test]
    fn overlong_keys_and_bad_names_are_errors() {
        let mut k: Keyed<String, u8> = Keyed::new();
        k.insert("x".repeat(2000), 1);
        let mut out = Output::new(0);
        let mut set = StateSet::save(&mut out);
        set.add("k", &mut k);
        assert!(set.saved().unwrap_err().message().contains("limit is 1024"));
        let mut out = Output::new(0);
        let mut set = StateSet::save(&mut out);
        set.add("", &mut k);
        assert!(set.saved().is_err());
    }
}
