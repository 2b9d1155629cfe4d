//! The oracle: the test owns the truth (which reading ids must arrive) and
//! compares it with what the aggregator's store holds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::Context;
use rusqlite::{Connection, OpenFlags};

/// One stored record, as the oracle sees it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub node: String,
    pub seq: u64,
    pub stream: String,
    pub payload: serde_json::Value,
}

/// Every record in the aggregator's SQLite store, by (node, seq).
pub fn read_store(path: &Path) -> anyhow::Result<Vec<Stored>> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening store {}", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mut stmt =
        conn.prepare("SELECT node, seq, stream, payload FROM records ORDER BY node, seq")?;
    let rows = stmt.query_map([], |r| {
        let payload: Vec<u8> = r.get(3)?;
        Ok(Stored {
            node: r.get(0)?,
            seq: r.get::<_, i64>(1)? as u64,
            stream: r.get(2)?,
            payload: serde_json::from_slice(&payload).unwrap_or(serde_json::Value::Null),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Lost, duplicated, unexpected and out-of-order counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub expected: usize,
    pub received: usize,
    pub lost: Vec<String>,
    pub duplicated: Vec<String>,
    pub unexpected: Vec<String>,
    /// Streams whose records are not in publish order (by `n`) along `seq`.
    pub out_of_order: Vec<String>,
}

impl Verdict {
    pub fn is_exact(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.unexpected.is_empty()
            && self.out_of_order.is_empty()
    }

    pub fn summary(&self) -> String {
        format!(
            "expected {}, received {}, lost {}, duplicated {}, unexpected {}, streams out of order {}{}",
            self.expected,
            self.received,
            self.lost.len(),
            self.duplicated.len(),
            self.unexpected.len(),
            self.out_of_order.len(),
            if self.lost.is_empty() { String::new() } else { format!(" (first lost: {:?})", &self.lost[..self.lost.len().min(5)]) },
        )
    }
}

/// Compare readings (those whose payload has an `id`) against `expected`.
pub fn judge(records: &[Stored], expected: &BTreeSet<String>) -> Verdict {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut per_stream: BTreeMap<(String, String), Vec<(u64, u64)>> = BTreeMap::new();
    let mut received = 0;
    for r in records {
        let Some(id) = r.payload.get("id").and_then(|v| v.as_str()) else {
            continue;
        };
        received += 1;
        *seen.entry(id.to_string()).or_default() += 1;
        if let Some(n) = r.payload.get("n").and_then(|v| v.as_u64()) {
            per_stream
                .entry((r.node.clone(), r.stream.clone()))
                .or_default()
                .push((r.seq, n));
        }
    }
    let mut v = Verdict {
        expected: expected.len(),
        received,
        ..Verdict::default()
    };
    for id in expected {
        if !seen.contains_key(id) {
            v.lost.push(id.clone());
        }
    }
    for (id, count) in &seen {
        if *count > 1 {
            v.duplicated.push(id.clone());
        }
        if !expected.contains(id) {
            v.unexpected.push(id.clone());
        }
    }
    for ((node, stream), mut items) in per_stream {
        items.sort();
        if items.windows(2).any(|w| w[0].1 >= w[1].1) {
            v.out_of_order.push(format!("{node}:{stream}"));
        }
    }
    v.duplicated.sort();
    v.unexpected.sort();
    v
}

/// How many records the store holds (0 if it does not exist yet).
pub fn count(path: &Path) -> u64 {
    let Ok(conn) = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return 0;
    };
    let _ = conn.busy_timeout(std::time::Duration::from_secs(2));
    conn.query_row("SELECT COUNT(*) FROM records", [], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, id: &str, n: u64) -> Stored {
        Stored {
            node: "a".into(),
            seq,
            stream: "s".into(),
            payload: serde_json::json!({"id": id, "n": n}),
        }
    }

    #[test]
    fn the_oracle_sees_loss_duplicates_strangers_and_disorder() {
        let expected: BTreeSet<String> = ["x", "y", "z"].iter().map(|s| s.to_string()).collect();
        let v = judge(&[rec(1, "x", 1), rec(2, "x", 1), rec(3, "q", 0)], &expected);
        assert_eq!(v.lost, vec!["y".to_string(), "z".to_string()]);
        assert_eq!(v.duplicated, vec!["x".to_string()]);
        assert_eq!(v.unexpected, vec!["q".to_string()]);
        assert_eq!(v.out_of_order.len(), 1);
        let ok = judge(&[rec(1, "x", 1), rec(2, "y", 2), rec(5, "z", 3)], &expected);
        assert!(ok.is_exact(), "{}", ok.summary());
    }
}
