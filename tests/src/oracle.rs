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

/// Every record in a PostgreSQL aggregator store, by (node, seq).
pub async fn read_postgres(url: &str) -> anyhow::Result<Vec<Stored>> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT node, seq, stream, payload FROM records ORDER BY node, seq",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Stored {
            node: r.get(0),
            seq: r.get::<_, i64>(1) as u64,
            stream: r.get(2),
            payload: serde_json::from_slice(r.get::<_, &[u8]>(3))
                .unwrap_or(serde_json::Value::Null),
        })
        .collect())
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

/// What window outputs (`window-avg`'s `{"stream", "window_start_ms",
/// "count", "sum"}`) say, against the readings that were acknowledged.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WindowVerdict {
    /// Per input stream: readings counted in windows, and their sum.
    pub counted: BTreeMap<String, (u64, f64)>,
    /// Per input stream: readings expected, and their sum.
    pub expected: BTreeMap<String, (u64, f64)>,
    /// Windows emitted more than once: `stream@start`.
    pub twice: Vec<String>,
    /// Windows in the store.
    pub windows: usize,
}

impl WindowVerdict {
    /// Every acknowledged reading in exactly one window, sums matching, no
    /// window twice.
    pub fn is_exact(&self) -> bool {
        self.twice.is_empty()
            && self.counted.len() == self.expected.len()
            && self.expected.iter().all(|(s, (n, sum))| {
                self.counted
                    .get(s)
                    .is_some_and(|(cn, csum)| cn == n && (csum - sum).abs() < 1e-6)
            })
    }

    pub fn summary(&self) -> String {
        let counted: u64 = self.counted.values().map(|(n, _)| n).sum();
        let expected: u64 = self.expected.values().map(|(n, _)| n).sum();
        let mut out = format!(
            "{} windows; readings counted {counted} of {expected}; windows emitted twice {}",
            self.windows,
            self.twice.len()
        );
        for (s, (n, sum)) in &self.expected {
            let (cn, csum) = self.counted.get(s).copied().unwrap_or((0, 0.0));
            if cn != *n || (csum - sum).abs() >= 1e-6 {
                out += &format!("\n  {s}: counted {cn} (sum {csum}), expected {n} (sum {sum})");
            }
        }
        if let Some(t) = self.twice.first() {
            out += &format!("\n  first window twice: {t}");
        }
        out
    }
}

/// Judge the window records in `records` (those whose stream ends in
/// `suffix`, e.g. `/avg`) against `expected` readings per input stream.
pub fn judge_windows(
    records: &[Stored],
    suffix: &str,
    expected: &BTreeMap<String, (u64, f64)>,
) -> WindowVerdict {
    let mut v = WindowVerdict {
        expected: expected.clone(),
        ..WindowVerdict::default()
    };
    let mut seen = BTreeSet::new();
    for r in records.iter().filter(|r| r.stream.ends_with(suffix)) {
        let p = &r.payload;
        let (Some(stream), Some(start), Some(count), Some(sum)) = (
            p["stream"].as_str(),
            p["window_start_ms"].as_u64(),
            p["count"].as_u64(),
            p["sum"].as_f64(),
        ) else {
            continue;
        };
        v.windows += 1;
        if !seen.insert((stream.to_string(), start)) {
            v.twice.push(format!("{stream}@{start}"));
        }
        let e = v.counted.entry(stream.to_string()).or_insert((0, 0.0));
        e.0 += count;
        e.1 += sum;
    }
    v
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
