//! Reading one field of a JSON payload without building the whole document:
//! the parser still validates every byte (so garbage is still "not JSON"),
//! but skips what it does not need without allocating. A filter reads one
//! number per message; building a `serde_json::Value` for that (a map, a
//! string per key) costs several times the rest of the pipeline.
//!
//! The semantics are those of [`Message::json_field`](crate::Message::json_field):
//! a top-level key equal to the whole path wins; otherwise the dotted path is
//! followed through nested objects; with duplicate keys the last one counts
//! (as in `serde_json::Value`).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The value found at a path, reduced to what the accessors need.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scalar {
    /// A number: as `f64`, and exactly when it is a non-negative integer.
    Number {
        f: f64,
        u: Option<u64>,
    },
    Str(String),
    Bool(bool),
    Null,
    Array,
    Object,
}

impl Scalar {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Scalar::Number { .. } => "a number",
            Scalar::Str(_) => "a string",
            Scalar::Bool(_) => "a boolean",
            Scalar::Null => "null",
            Scalar::Array => "an array",
            Scalar::Object => "an object",
        }
    }
}

/// The outcome of a lookup in a valid JSON document.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Lookup {
    Found(Scalar),
    Missing,
    /// The document is not an object; what it is instead.
    NotObject(&'static str),
}

/// Look `path` up in `payload`. `Err` carries serde_json's message for a
/// payload that is not JSON.
pub(crate) fn lookup(payload: &[u8], path: &str) -> Result<Lookup, String> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    let found = Root { path }
        .deserialize(&mut de)
        .and_then(|found| de.end().map(|()| found))
        .map_err(|e| e.to_string())?;
    Ok(found)
}

/// Which target a key matched.
enum Key {
    Whole,
    First,
    Other,
}

struct KeySeed<'p> {
    whole: &'p str,
    /// The first segment of a dotted path (`None` without a dot).
    first: Option<&'p str>,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed<'_> {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
        Ok(if key == self.whole {
            Key::Whole
        } else if self.first == Some(key) {
            Key::First
        } else {
            Key::Other
        })
    }
}

/// The document's root: must be an object to hold the field.
struct Root<'p> {
    path: &'p str,
}

impl<'de> DeserializeSeed<'de> for Root<'_> {
    type Value = Lookup;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Lookup, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Root<'_> {
    type Value = Lookup;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON document")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Lookup, A::Error> {
        let (first, rest) = match self.path.split_once('.') {
            Some((first, rest)) => (Some(first), rest),
            None => (None, ""),
        };
        let mut whole = None;
        let mut dotted = None;
        while let Some(key) = map.next_key_seed(KeySeed {
            whole: self.path,
            first,
        })? {
            match key {
                Key::Whole => whole = Some(map.next_value_seed(ValueSeed)?),
                Key::First => dotted = Some(map.next_value_seed(Nested { path: rest })?),
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(match (whole, dotted) {
            (Some(v), _) => Lookup::Found(v),
            (None, Some(found)) => found,
            (None, None) => Lookup::Missing,
        })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Lookup, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Lookup::NotObject("an array"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Lookup, E> {
        Ok(Lookup::NotObject("a string"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Lookup, E> {
        Ok(Lookup::NotObject("a boolean"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Lookup, E> {
        Ok(Lookup::NotObject("null"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Lookup, E> {
        Ok(Lookup::NotObject("a number"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Lookup, E> {
        Ok(Lookup::NotObject("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Lookup, E> {
        Ok(Lookup::NotObject("a number"))
    }
}

/// The rest of a dotted path inside a nested value: anything but an object
/// on the way means the field is missing.
struct Nested<'p> {
    path: &'p str,
}

impl<'de> DeserializeSeed<'de> for Nested<'_> {
    type Value = Lookup;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Lookup, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Nested<'_> {
    type Value = Lookup;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Lookup, A::Error> {
        let (segment, rest) = match self.path.split_once('.') {
            Some((s, r)) => (s, Some(r)),
            None => (self.path, None),
        };
        let mut found = Lookup::Missing;
        while let Some(key) = map.next_key_seed(KeySeed {
            whole: segment,
            first: None,
        })? {
            match (key, rest) {
                (Key::Whole, None) => found = Lookup::Found(map.next_value_seed(ValueSeed)?),
                (Key::Whole, Some(rest)) => found = map.next_value_seed(Nested { path: rest })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Lookup, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Lookup::Missing)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Lookup, E> {
        Ok(Lookup::Missing)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Lookup, E> {
        Ok(Lookup::Missing)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Lookup, E> {
        Ok(Lookup::Missing)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Lookup, E> {
        Ok(Lookup::Missing)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Lookup, E> {
        Ok(Lookup::Missing)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Lookup, E> {
        Ok(Lookup::Missing)
    }
}

/// The value at the end of the path.
struct ValueSeed;

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Scalar;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Scalar, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed {
    type Value = Scalar;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar::Number {
            f: v as f64,
            u: Some(v),
        })
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(Scalar::Number {
            f: v as f64,
            u: u64::try_from(v).ok(),
        })
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
        Ok(Scalar::Number { f: v, u: None })
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
        Ok(Scalar::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
        Ok(Scalar::Str(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
        Ok(Scalar::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Object)
    }
}

/// The same lookup on an already parsed document (when `json()` ran first).
pub(crate) fn lookup_value(root: &serde_json::Value, path: &str) -> Lookup {
    use serde_json::Value;
    let Value::Object(top) = root else {
        return Lookup::NotObject(value_kind(root));
    };
    let found = top.get(path).or_else(|| {
        let mut current = root;
        for segment in path.split('.') {
            current = match current {
                Value::Object(map) => map.get(segment)?,
                _ => return None,
            };
        }
        Some(current)
    });
    match found {
        None => Lookup::Missing,
        Some(v) => Lookup::Found(match v {
            Value::Number(n) => Scalar::Number {
                f: n.as_f64().unwrap_or(f64::NAN),
                u: n.as_u64(),
            },
            Value::String(s) => Scalar::Str(s.clone()),
            Value::Bool(b) => Scalar::Bool(*b),
            Value::Null => Scalar::Null,
            Value::Array(_) => Scalar::Array,
            Value::Object(_) => Scalar::Object,
        }),
    }
}

/// "a string", "null", … for error messages.
pub(crate) fn value_kind(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The scanner agrees with the parsed document on every path.
    #[test]
    fn scanner_agrees_with_the_parsed_value() {
        let docs = [
            r#"{"temp": 21.5, "sensor": {"temp": -3, "deep": {"x": 7}}, "a.b": 1, "a": {"b": 2}}"#,
            r#"{"t": 1, "t": "two"}"#,
            r#"{"n": null, "b": true, "arr": [1, {"x": 2}], "o": {}, "s": "h\"i"}"#,
            r#"[1, 2]"#,
            r#""text""#,
            r#"17"#,
            r#"{"x": {"y": [1]}}"#,
            r#"{"big": 18446744073709551615, "neg": -5, "exp": 1e3}"#,
        ];
        let paths = [
            "temp",
            "sensor.temp",
            "sensor.deep.x",
            "a.b",
            "a",
            "t",
            "n",
            "b",
            "arr",
            "arr.x",
            "o",
            "s",
            "missing",
            "x.y",
            "x.y.z",
            "big",
            "neg",
            "exp",
            "sensor.nope",
        ];
        for doc in docs {
            let value: serde_json::Value = serde_json::from_str(doc).unwrap();
            for path in paths {
                assert_eq!(
                    lookup(doc.as_bytes(), path).unwrap(),
                    lookup_value(&value, path),
                    "{doc} at {path}"
                );
            }
        }
    }

    #[test]
    fn invalid_documents_are_errors_even_past_the_field() {
        for doc in [
            "not json",
            r#"{"temp": 31, garbage"#,
            r#"{"temp": 31} x"#,
            "{",
        ] {
            assert!(lookup(doc.as_bytes(), "temp").is_err(), "{doc}");
        }
        assert_eq!(
            lookup(br#"  {"temp": 31}  "#, "temp").unwrap(),
            Lookup::Found(Scalar::Number {
                f: 31.0,
                u: Some(31)
            })
        );
    }
}
