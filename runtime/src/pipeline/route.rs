//! Which pipelines a topic goes to.

use std::collections::HashMap;

use crate::ingest::topic;

/// Topic → pipeline indices, with a bounded cache (sensor topics repeat).
pub struct Router {
    filters: Vec<Vec<String>>,
    cache: HashMap<String, Vec<usize>>,
}

const CACHE_LIMIT: usize = 65_536;

impl Router {
    /// `filters[i]` are the topic filters of pipeline `i`.
    pub fn new(filters: Vec<Vec<String>>) -> Self {
        Self {
            filters,
            cache: HashMap::new(),
        }
    }

    /// The pipelines `topic` goes to, in config order.
    pub fn route(&mut self, topic_name: &str) -> &[usize] {
        if !self.cache.contains_key(topic_name) {
            if self.cache.len() >= CACHE_LIMIT {
                self.cache.clear();
            }
            let hits = self
                .filters
                .iter()
                .enumerate()
                .filter(|(_, fs)| fs.iter().any(|f| topic::matches(f, topic_name)))
                .map(|(i, _)| i)
                .collect();
            self.cache.insert(topic_name.to_string(), hits);
        }
        self.cache.get(topic_name).map(Vec::as_slice).unwrap_or(&[])
    }
}
