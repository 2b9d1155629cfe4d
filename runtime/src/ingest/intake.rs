//! What both ways in (the endpoint's connections and the broker client) do
//! with a sender's packets on one connection: PUBLISH and PUBREL become
//! chunk items through the sender's redelivery state, and acknowledgements
//! coming back from the pipeline are encoded in order.

use std::collections::HashSet;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::codec::{self, AckKind, PublishIn, Version};
use super::events;
use super::redelivery::{SenderState, Verdict};
use super::{Ack, Chunk, Item, Received};

/// One connection's intake.
pub(crate) struct Intake {
    /// Packet ids of QoS 1/2 PUBLISHes whose final acknowledgement (PUBACK,
    /// PUBCOMP, or a refusing PUBREC) is not written yet.
    pub in_flight: HashSet<u16>,
    /// Acknowledgements the pipeline owes for chunks it took.
    owed: usize,
    /// The receive maximum the sender must honour on this connection.
    receive_maximum: Option<u16>,
    received: metrics::Counter,
    resends: metrics::Counter,
    evicted: metrics::Counter,
    possible_duplicates: metrics::Counter,
    acks_sent: metrics::Counter,
}

impl Intake {
    /// Metrics are labelled with `source` (`endpoint` or `broker`).
    pub fn new(source: &'static str, receive_maximum: Option<u16>) -> Self {
        Self {
            in_flight: HashSet::new(),
            owed: 0,
            receive_maximum,
            received: metrics::counter!(events::RECEIVED_TOTAL, "source" => source),
            resends: metrics::counter!(events::RESENDS_TOTAL, "source" => source),
            evicted: metrics::counter!(events::MARKS_EVICTED_TOTAL, "source" => source),
            possible_duplicates: metrics::counter!(events::POSSIBLE_DUPLICATES_TOTAL, "source" => source),
            acks_sent: metrics::counter!(events::ACKS_SENT_TOTAL, "source" => source),
        }
    }

    /// A PUBLISH (already checked for the connection's own rules): a message
    /// to process and/or an acknowledgement, as the redelivery state says.
    pub fn publish(&mut self, state: &mut SenderState, p: PublishIn, chunk: &mut Chunk) {
        self.received.increment(1);
        let message = Received {
            topic: p.topic.to_vec(),
            payload: p.payload.to_vec(),
            received_ms: crate::clock::ingest_ms(),
        };
        let (verdict, kind) = match p.qos {
            0 => {
                chunk.push(Item {
                    message: Some(message),
                    ack: None,
                });
                return;
            }
            1 => (
                state.on_qos1(
                    p.pkid,
                    p.dup,
                    super::redelivery::digest(&p.topic, &p.payload),
                ),
                AckKind::PubAck,
            ),
            _ => (
                state.on_qos2(
                    p.pkid,
                    p.dup,
                    super::redelivery::digest(&p.topic, &p.payload),
                ),
                AckKind::PubRec,
            ),
        };
        self.in_flight.insert(p.pkid);
        if self
            .receive_maximum
            .is_some_and(|rm| self.in_flight.len() > usize::from(rm))
        {
            // More in flight than allowed: P2 would take unwritten acks for
            // received ones. Keep the marks instead.
            state.receive_maximum_broken();
        }
        let ack = Some(Ack {
            kind,
            pkid: p.pkid,
            reason: 0,
        });
        match verdict {
            Verdict::New => chunk.push(Item {
                message: Some(message),
                ack,
            }),
            Verdict::Resend => {
                self.resends.increment(1);
                chunk.push(Item { message: None, ack });
            }
        }
    }

    /// A PUBREL: the PUBCOMP follows the commit recording the release (0x92
    /// "packet identifier not found" for an id never received).
    pub fn pubrel(&mut self, state: &mut SenderState, pkid: u16, chunk: &mut Chunk) {
        let known = state.on_pubrel(pkid);
        self.in_flight.insert(pkid);
        chunk.push(Item {
            message: None,
            ack: Some(Ack {
                kind: AckKind::PubComp,
                pkid,
                reason: if known { 0 } else { 0x92 },
            }),
        });
    }

    /// Reports what the redelivery state counted since the last call.
    pub fn report(&mut self, state: &mut SenderState) {
        let c = state.take_counters();
        self.evicted.increment(c.evicted);
        self.possible_duplicates.increment(c.possible_duplicates);
    }

    /// The pipeline took `chunk`'s items: it owes their acknowledgements.
    /// Call after the chunk was queued.
    pub fn took(&mut self, acks: usize) {
        self.owed += acks;
    }

    /// Acknowledgements a chunk asks for.
    pub fn acks_in(chunk: &Chunk) -> usize {
        chunk.items.iter().filter(|i| i.ack.is_some()).count()
    }

    /// On shutdown: the connection stops reading, but everything the
    /// pipeline took is acknowledged once committed — until nothing is owed
    /// or `deadline`, whatever comes first (ARCHITECTURE.md I-16).
    pub async fn drain<W: AsyncWrite + Unpin>(
        &mut self,
        acks: &mut mpsc::UnboundedReceiver<Vec<Ack>>,
        wr: &mut W,
        wbuf: &mut BytesMut,
        version: Version,
        deadline: Instant,
    ) {
        while self.owed > 0 {
            match tokio::time::timeout_at(deadline, acks.recv()).await {
                Ok(Some(batch)) => {
                    self.write_acks(wbuf, version, batch);
                    while let Ok(batch) = acks.try_recv() {
                        self.write_acks(wbuf, version, batch);
                    }
                    let out = wbuf.split();
                    let write = async {
                        wr.write_all(&out).await?;
                        wr.flush().await
                    };
                    if tokio::time::timeout_at(deadline, write).await.is_err() {
                        return;
                    }
                }
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// Encodes acknowledgements from the pipeline; an exchange they finish
    /// leaves `in_flight`.
    pub fn write_acks(&mut self, wbuf: &mut BytesMut, version: Version, batch: Vec<Ack>) {
        self.acks_sent.increment(batch.len() as u64);
        self.owed = self.owed.saturating_sub(batch.len());
        for a in batch {
            codec::encode_ack(wbuf, version, a.kind, a.pkid, a.reason);
            let done = match a.kind {
                AckKind::PubAck | AckKind::PubComp => true,
                AckKind::PubRec => a.reason >= 0x80,
            };
            if done {
                self.in_flight.remove(&a.pkid);
            }
        }
    }
}
