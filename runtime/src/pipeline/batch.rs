//! Turning a batch of chunks from ingest into chain inputs: the limits the
//! replication protocol imposes are checked here, before anything can enter
//! the outbox (ARCHITECTURE.md I-6).

use crate::config::UnroutedPolicy;
use crate::ingest::{Chunk, Received};
use crate::message::Message;
use crate::outbox::{human_bytes, DeadLetter};

/// The dead-letter `function` and `reason` of a message no pipeline takes.
pub const UNROUTED: &str = "unrouted";

/// Refused payloads keep this much in the dead-letter table.
const DEAD_LETTER_KEEP: usize = 1024;

/// MQTT 5 reason codes for refusals.
const TOPIC_NAME_INVALID: u8 = 0x90;
const QUOTA_EXCEEDED: u8 = 0x97;

/// What to do with one batch.
#[derive(Debug, Default)]
pub struct BatchPlan {
    /// Per pipeline, the messages routed to it.
    pub per_pipeline: Vec<Vec<Message>>,
    /// Messages refused before any function (oversized, bad topic).
    pub dead_letters: Vec<DeadLetter>,
    /// Messages taken (not counting acknowledgement-only items).
    pub messages: usize,
    /// Messages that matched no pipeline.
    pub unrouted: usize,
    /// Unrouted messages dropped (`ingest.unrouted = "drop"`), to report.
    pub dropped: Vec<fogline_protocol::LossReport>,
    /// Topics of unrouted messages in this batch.
    pub unrouted_topics: Vec<String>,
}

fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn refuse(
    function: &str,
    error: String,
    stream: String,
    mut payload: Vec<u8>,
    at: u64,
) -> DeadLetter {
    let size = payload.len();
    payload.truncate(DEAD_LETTER_KEEP);
    DeadLetter {
        pipeline: "ingest".into(),
        function: function.into(),
        reason: function.into(),
        stage: crate::outbox::Stage::Input,
        error,
        message: Message {
            stream,
            timestamp_ms: at,
            payload,
        },
        payload_size: size,
    }
}

/// Plans a batch: takes each item's message out of its chunk, refuses what
/// the outbox must not hold (a non-UTF-8 topic, a topic longer than
/// `max_topic`, a payload above the chunk's limit) into dead letters —
/// setting an MQTT 5 reason code on its acknowledgement when the client can
/// be told — and routes the rest.
pub fn plan_batch(
    chunks: &mut [Chunk],
    pipelines: usize,
    max_topic: usize,
    unrouted: UnroutedPolicy,
    mut route: impl FnMut(&str) -> Vec<usize>,
) -> BatchPlan {
    let mut plan = BatchPlan {
        per_pipeline: vec![Vec::new(); pipelines],
        ..BatchPlan::default()
    };
    for chunk in chunks.iter_mut() {
        let tell = chunk.route.as_ref().is_some_and(|r| r.reports_refusals);
        let max_payload = chunk.max_payload;
        for item in &mut chunk.items {
            let Some(Received {
                topic,
                payload,
                received_ms: at,
            }) = item.message.take()
            else {
                continue;
            };
            plan.messages += 1;
            let mut refused = |code: u8, dead: DeadLetter, plan: &mut BatchPlan| {
                super::events::MessageRefused { dead: &dead }.emit();
                if tell {
                    if let Some(a) = &mut item.ack {
                        a.reason = code;
                    }
                }
                plan.dead_letters.push(dead);
            };
            let topic = match String::from_utf8(topic) {
                Ok(t) => t,
                Err(e) => {
                    let stream = truncated(&String::from_utf8_lossy(e.as_bytes()), max_topic);
                    let dead = refuse(
                        "topic",
                        "topic is not valid UTF-8".into(),
                        stream,
                        payload,
                        at,
                    );
                    refused(TOPIC_NAME_INVALID, dead, &mut plan);
                    continue;
                }
            };
            if topic.len() > max_topic {
                let error = format!(
                    "topic is {} bytes, the limit is {max_topic} (the replication protocol's stream-name limit)",
                    topic.len()
                );
                let dead = refuse(
                    "max_topic_bytes",
                    error,
                    truncated(&topic, max_topic),
                    payload,
                    at,
                );
                refused(TOPIC_NAME_INVALID, dead, &mut plan);
                continue;
            }
            if fogline_protocol::loss::is_reserved(&topic) {
                let error = format!(
                    "topic `{topic}` is under `{}`, which the replication protocol reserves for itself",
                    fogline_protocol::loss::RESERVED_PREFIX
                );
                let dead = refuse("reserved_topic", error, topic, payload, at);
                refused(TOPIC_NAME_INVALID, dead, &mut plan);
                continue;
            }
            if payload.len() > max_payload {
                let error = format!(
                    "payload is {}, limit is {} (topic {topic}); first {DEAD_LETTER_KEEP} bytes kept",
                    human_bytes(payload.len() as u64),
                    human_bytes(max_payload as u64),
                );
                let dead = refuse("max_payload_bytes", error, topic, payload, at);
                refused(QUOTA_EXCEEDED, dead, &mut plan);
                continue;
            }
            let routes = route(&topic);
            let Some((&last, rest)) = routes.split_last() else {
                plan.unrouted += 1;
                if !plan.unrouted_topics.contains(&topic) {
                    plan.unrouted_topics.push(topic.clone());
                }
                match unrouted {
                    UnroutedPolicy::DeadLetter => plan.dead_letters.push(DeadLetter {
                        pipeline: "ingest".into(),
                        function: UNROUTED.into(),
                        reason: UNROUTED.into(),
                        stage: crate::outbox::Stage::Input,
                        error: format!(
                            "topic `{topic}` matches no pipeline (ingest.unrouted = \"dead_letter\"); replay it once a pipeline takes it"
                        ),
                        payload_size: payload.len(),
                        message: Message {
                            stream: topic,
                            timestamp_ms: at,
                            payload,
                        },
                    }),
                    UnroutedPolicy::Drop => plan.dropped.push(fogline_protocol::LossReport {
                        bytes: (topic.len() + payload.len()) as u64,
                        stream: topic,
                        reason: fogline_protocol::LossReason::Unrouted,
                        detail: Some("ingest.unrouted = \"drop\"".into()),
                        records: 1,
                        first_seq: None,
                        last_seq: None,
                        first_ms: at,
                        last_ms: at,
                    }),
                }
                continue;
            };
            let message = Message {
                stream: topic,
                timestamp_ms: at,
                payload,
            };
            for &i in rest {
                plan.per_pipeline[i].push(message.clone());
            }
            plan.per_pipeline[last].push(message);
        }
    }
    plan
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::ingest::{Ack, AckKind, AckRoute, Item};

    fn item(topic: &[u8], payload: usize, pkid: u16) -> Item {
        Item {
            message: Some(Received {
                topic: topic.to_vec(),
                payload: vec![b'x'; payload],
                received_ms: 5,
            }),
            ack: Some(Ack {
                kind: AckKind::PubAck,
                pkid,
                reason: 0,
            }),
        }
    }

    #[test]
    fn what_the_protocol_cannot_carry_never_reaches_a_pipeline() {
        let (route, _rx) = AckRoute::new(true);
        let mut chunk = Chunk::new(Some(route), 100);
        chunk.push(item(b"ok/1", 10, 1));
        chunk.push(item(&[b'a'; 2000], 10, 2));
        chunk.push(item(b"ok/2", 101, 3));
        chunk.push(item(&[0xff, 0xfe], 1, 4));
        chunk.push(item(b"nobody", 1, 5));
        chunk.push(item(b"$fogline/loss", 1, 6));
        let mut chunks = vec![chunk];
        let plan = plan_batch(&mut chunks, 1, 1024, UnroutedPolicy::Drop, |t| {
            if t.starts_with("ok/") {
                vec![0]
            } else {
                vec![]
            }
        });
        assert_eq!(plan.per_pipeline[0].len(), 1);
        assert_eq!(
            plan.dead_letters.len(),
            4,
            "a reserved topic is refused too"
        );
        assert_eq!(plan.dead_letters[3].reason, "reserved_topic");
        assert_eq!(plan.unrouted, 1);
        assert_eq!(plan.dropped.len(), 1, "dropped, and reported (I-33)");
        assert_eq!(plan.dropped[0].stream, "nobody");
        let reasons: Vec<u8> = chunks[0]
            .items
            .iter()
            .map(|i| i.ack.unwrap().reason)
            .collect();
        assert_eq!(reasons, vec![0, 0x90, 0x97, 0x90, 0, 0x90]);
        assert!(plan.dead_letters[0].error.contains("2000 bytes"));
        assert!(plan.dead_letters[0].message.stream.len() <= 1024 + 3);
        assert_eq!(plan.dead_letters[1].message.payload.len(), 101);
    }

    /// I-33: by default a message no pipeline takes is kept as a dead letter.
    #[test]
    fn unrouted_messages_are_dead_letters_by_default() {
        let (route, _rx) = AckRoute::new(true);
        let mut chunk = Chunk::new(Some(route), 100);
        chunk.push(item(b"typo/1", 10, 1));
        let mut chunks = vec![chunk];
        let plan = plan_batch(&mut chunks, 1, 1024, UnroutedPolicy::DeadLetter, |_| vec![]);
        assert_eq!(plan.unrouted, 1);
        assert!(plan.dropped.is_empty());
        assert_eq!(plan.dead_letters.len(), 1);
        assert_eq!(plan.dead_letters[0].reason, UNROUTED);
        assert_eq!(plan.dead_letters[0].message.payload.len(), 10, "kept whole");
        assert_eq!(plan.unrouted_topics, vec!["typo/1".to_string()]);
    }

    #[test]
    fn a_broker_is_acknowledged_with_success_even_for_refusals() {
        let (route, _rx) = AckRoute::new(false);
        let mut chunk = Chunk::new(Some(route), 100);
        chunk.push(item(&[b'a'; 2000], 10, 2));
        let mut chunks = vec![chunk];
        let plan = plan_batch(&mut chunks, 1, 1024, UnroutedPolicy::DeadLetter, |_| {
            vec![0]
        });
        assert_eq!(plan.dead_letters.len(), 1);
        assert_eq!(chunks[0].items[0].ack.unwrap().reason, 0);
    }
}
