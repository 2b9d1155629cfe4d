//! MQTT topic filters: validation, matching (MQTT 3.1.1 §4.7), and the
//! non-overlapping cover ingest subscribes to at an external broker.

// Filter syntax and matching are shared with the aggregator's queries.
pub use fogline_protocol::topic::{matches, validate_filter};

/// Does every topic `f` matches also match `g`?
pub fn subsumes(g: &str, f: &str) -> bool {
    let (g, f): (Vec<&str>, Vec<&str>) = (g.split('/').collect(), f.split('/').collect());
    for i in 0.. {
        match (g.get(i), f.get(i)) {
            (Some(&"#"), _) => return i > 0 || !f.first().is_some_and(|l| l.starts_with('$')),
            (None, None) => return true,
            (Some(&"+"), Some(l)) if *l != "#" => {
                if i == 0 && l.starts_with('$') {
                    return false;
                }
            }
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
    false
}

/// Is there a topic both filters match?
pub fn overlaps(f: &str, g: &str) -> bool {
    let (f, g): (Vec<&str>, Vec<&str>) = (f.split('/').collect(), g.split('/').collect());
    for i in 0.. {
        match (f.get(i), g.get(i)) {
            (Some(&"#"), Some(b)) | (Some(b), Some(&"#")) => {
                // `$` topics match no filter starting with a wildcard.
                return !(i == 0 && b.starts_with('$'));
            }
            (Some(&"#"), None) | (None, Some(&"#")) => return true,
            (None, None) => return true,
            (Some(&"+"), Some(b)) | (Some(b), Some(&"+")) => {
                if i == 0 && b.starts_with('$') {
                    return false;
                }
            }
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
    false
}

/// The most specific filter matching everything `f` or `g` matches.
fn generalize(f: &str, g: &str) -> String {
    let (f, g): (Vec<&str>, Vec<&str>) = (f.split('/').collect(), g.split('/').collect());
    let mut out: Vec<&str> = Vec::new();
    for i in 0.. {
        match (f.get(i), g.get(i)) {
            (None, None) => break,
            (Some(a), Some(b)) if a == b && *a != "#" => out.push(a),
            (Some(a), Some(b)) if *a != "#" && *b != "#" => out.push("+"),
            _ => {
                out.push("#");
                break;
            }
        }
    }
    out.join("/")
}

/// A set of filters that matches exactly the topics any of `filters`
/// matches (or more), with no two overlapping, so a broker delivers each
/// message once. Subsumed filters are dropped; partly overlapping ones are
/// replaced by their generalisation (`a/+/x` and `a/b/#` → `a/b/#` and `a/+/x`
/// → `a/+/#`); ingest routes inside by the original filters and counts what
/// no pipeline wants.
pub fn cover(filters: &[String]) -> Vec<String> {
    let mut set: Vec<String> = filters.to_vec();
    set.sort();
    set.dedup();
    loop {
        // Drop filters another one subsumes.
        let mut kept: Vec<String> = Vec::with_capacity(set.len());
        for (i, f) in set.iter().enumerate() {
            let covered = set
                .iter()
                .enumerate()
                .any(|(j, g)| j != i && subsumes(g, f) && (!subsumes(f, g) || j < i));
            if !covered {
                kept.push(f.clone());
            }
        }
        set = kept;
        let pair = (0..set.len())
            .flat_map(|i| (i + 1..set.len()).map(move |j| (i, j)))
            .find(|&(i, j)| overlaps(&set[i], &set[j]));
        let Some((i, j)) = pair else {
            set.sort();
            return set;
        };
        let merged = generalize(&set[i], &set[j]);
        set.remove(j);
        set.remove(i);
        set.push(merged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cover_has_no_overlaps_and_loses_nothing() {
        let c = cover(&[
            "sensors/#".to_string(),
            "sensors/+/x".to_string(),
            "other/a".to_string(),
        ]);
        assert_eq!(c, vec!["other/a".to_string(), "sensors/#".to_string()]);
        let c = cover(&["a/+/x".to_string(), "a/b/#".to_string()]);
        assert_eq!(c, vec!["a/+/#".to_string()]);
        let c = cover(&["a/b".to_string(), "a/b".to_string(), "a/c".to_string()]);
        assert_eq!(c, vec!["a/b".to_string(), "a/c".to_string()]);
        let c = cover(&["$SYS/x".to_string(), "+/x".to_string()]);
        assert_eq!(c.len(), 2, "$ topics do not match wildcard levels: {c:?}");
    }

    proptest::proptest! {
        #[test]
        fn every_topic_matched_before_is_matched_exactly_once_after(
            filters in proptest::collection::vec("(a|b|\\+)(/(a|b|c|\\+))?(/(x|#))?", 1..6),
            topic in "(a|b|c)(/(a|b|c))?(/(x|y))?",
        ) {
            let c = cover(&filters);
            let before = filters.iter().any(|f| matches(f, &topic));
            let hits = c.iter().filter(|f| matches(f, &topic)).count();
            if before {
                proptest::prop_assert_eq!(hits, 1, "filters {:?} cover {:?} topic {}", filters, c, topic);
            } else {
                proptest::prop_assert!(hits <= 1);
            }
        }
    }
}
