//! MQTT topic filters (MQTT 3.1.1 §4.7): the edge routes by them and the
//! aggregator's queries select streams by them. Stream names are the MQTT
//! topics the readings came in on.

/// Check a topic filter is well formed: `#` only last and alone in its level,
/// `+` alone in its level, no empty filter, no NUL.
pub fn validate_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("is empty");
    }
    if filter.contains('\0') {
        return Err("contains a NUL character");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err("uses `#` other than as the whole last level");
        }
        if level.contains('+') && *level != "+" {
            return Err("uses `+` other than as a whole level");
        }
    }
    Ok(())
}

/// Does `topic` match `filter`? Topics starting with `$` match no filter that
/// starts with a wildcard, as brokers do.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_a_broker() {
        assert!(matches("sensors/+/reading", "sensors/t1/reading"));
        assert!(!matches("sensors/+/reading", "sensors/t1/x/reading"));
        assert!(matches("sensors/#", "sensors"));
        assert!(matches("sensors/#", "sensors/a/b"));
        assert!(!matches("sensors/#", "other/a"));
        assert!(matches("#", "a/b"));
        assert!(!matches("#", "$SYS/broker"));
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
        assert!(matches("+/+", "a/"));
    }

    #[test]
    fn malformed_filters_are_refused() {
        assert!(validate_filter("a/#/b").is_err());
        assert!(validate_filter("a/b#").is_err());
        assert!(validate_filter("a/x+/b").is_err());
        assert!(validate_filter("").is_err());
        assert!(validate_filter("a/+/#").is_ok());
    }
}
