//! Turning a batch of deliveries into chain inputs: size checks and
//! duplicate detection.

use std::collections::HashMap;

use crate::ingest::{digest, Delivery};
use crate::message::Message;
use crate::outbox::{DeadLetter, DeliveryMark};

/// Oversized payloads keep this much in the dead-letter table.
const DEAD_LETTER_KEEP: usize = 1024;

/// What to do with one batch of deliveries.
#[derive(Debug, Default)]
pub struct BatchPlan {
    /// Per pipeline, the messages routed to it.
    pub per_pipeline: Vec<Vec<Message>>,
    /// Deliveries refused before any function (oversized, bad topic).
    pub dead_letters: Vec<DeadLetter>,
    /// Marks to commit.
    pub delivered: Vec<DeliveryMark>,
    /// Redeliveries of committed messages: ack only.
    pub duplicates: usize,
    /// Deliveries that matched no pipeline.
    pub unrouted: usize,
}

fn human(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

/// Plan a batch. `marks` is the in-memory copy of the delivery marks; it is
/// updated as if the batch committed (the caller retries the commit until it
/// does, so that holds).
pub fn plan_batch(
    deliveries: &[Delivery],
    pipelines: usize,
    max_payload: usize,
    marks: &mut HashMap<u16, u64>,
    mut route: impl FnMut(&str) -> Vec<usize>,
) -> BatchPlan {
    let mut plan = BatchPlan {
        per_pipeline: vec![Vec::new(); pipelines],
        ..BatchPlan::default()
    };
    for d in deliveries {
        let p = &d.publish;
        let pkid = p.pkid;
        if pkid != 0 {
            let dg = digest(&p.topic, &p.payload);
            if p.dup && marks.get(&pkid) == Some(&dg) {
                plan.duplicates += 1;
                continue;
            }
            marks.insert(pkid, dg);
            plan.delivered.push(DeliveryMark { pkid, digest: dg });
        }
        let topic = match std::str::from_utf8(&p.topic) {
            Ok(t) => t.to_string(),
            Err(_) => {
                plan.dead_letters.push(DeadLetter {
                    pipeline: "ingest".into(),
                    function: "topic".into(),
                    error: "topic is not valid UTF-8".into(),
                    message: Message {
                        stream: String::from_utf8_lossy(&p.topic).into_owned(),
                        timestamp_ms: d.received_ms,
                        payload: p.payload[..p.payload.len().min(DEAD_LETTER_KEEP)].to_vec(),
                    },
                    payload_size: p.payload.len(),
                });
                continue;
            }
        };
        if p.payload.len() > max_payload {
            metrics::counter!("fogline_ingest_oversized_total").increment(1);
            tracing::warn!(topic = %topic, size = p.payload.len(), limit = max_payload, "Oversized payload dead-lettered.");
            plan.dead_letters.push(DeadLetter {
                pipeline: "ingest".into(),
                function: "max_payload_bytes".into(),
                error: format!(
                    "payload is {}, limit is {} (topic {topic}); first {} bytes kept",
                    human(p.payload.len()),
                    human(max_payload),
                    DEAD_LETTER_KEEP
                ),
                message: Message {
                    stream: topic,
                    timestamp_ms: d.received_ms,
                    payload: p.payload[..DEAD_LETTER_KEEP.min(p.payload.len())].to_vec(),
                },
                payload_size: p.payload.len(),
            });
            continue;
        }
        let routes = route(&topic);
        if routes.is_empty() {
            plan.unrouted += 1;
            continue;
        }
        let message = Message {
            stream: topic,
            timestamp_ms: d.received_ms,
            payload: p.payload.to_vec(),
        };
        let (last, rest) = routes
            .split_last()
            .map(|(l, r)| (*l, r.to_vec()))
            .unwrap_or((0, vec![]));
        for i in rest {
            plan.per_pipeline[i].push(message.clone());
        }
        plan.per_pipeline[last].push(message);
    }
    plan
}
