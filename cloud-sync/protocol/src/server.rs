//! Receiver (aggregator) side of a session, without I/O.
//!
//! Expects `Hello` first and answers `Welcome` with the node id from the
//! certificate and the cursor read from the store. Then each batch must start
//! after the previous one; records at or below the Welcome cursor are skipped
//! (already applied), the rest go to the store, and only the store's answer
//! produces an `Ack`.

use super::frame::{BatchFrame, ErrorCode, Frame};
use super::{Record, PROTOCOL_VERSION};

/// A frame the session does not accept in its current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The peer speaks another protocol version.
    #[error("node speaks protocol version {got}, this aggregator speaks {expected}")]
    UnsupportedVersion {
        /// The peer's version.
        got: u32,
        /// Ours.
        expected: u32,
    },
    /// A frame arrived that is not allowed now.
    #[error("unexpected {frame} frame {state}")]
    Unexpected {
        /// Frame kind.
        frame: &'static str,
        /// Where the session was.
        state: &'static str,
    },
    /// Batches must arrive in ascending seq order, without overlap.
    #[error("batch {first_seq}..={last_seq} does not start after the previous batch (last seq {prev_last})")]
    OutOfOrder {
        /// First seq of the batch.
        first_seq: u64,
        /// Last seq of the batch.
        last_seq: u64,
        /// Last seq of the previous batch.
        prev_last: u64,
    },
    /// The peer sent an Error frame.
    #[error("node reported {code}: {message}")]
    PeerError {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
}

impl SessionError {
    /// The code to report to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            SessionError::PeerError { .. } => ErrorCode::Ok,
            _ => ErrorCode::ProtocolViolation,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    AwaitHello,
    Active {
        cursor: u64,
        incarnation: u64,
        epoch: u64,
        prev_last: Option<u64>,
    },
}

/// What the store holds for a node when it says Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoredCursor {
    /// Highest seq applied.
    pub seq: u64,
    /// The outbox incarnation that cursor belongs to (`None`: not recorded).
    pub incarnation: Option<u64>,
    /// The outbox epoch last recorded with it (0: none).
    pub epoch: u64,
}

/// The edge's outbox, as its `Hello` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HelloInfo {
    /// Outbox incarnation.
    pub incarnation: u64,
    /// Next seq it will give out.
    pub next_seq: u64,
    /// Highest seq it was told is applied.
    pub acked: u64,
    /// This start of the outbox (a random id per daemon start).
    pub epoch: u64,
    /// The seq this epoch's numbering started from.
    pub epoch_start: u64,
}

/// The store is behind what it acknowledged to this very outbox (restored
/// from a backup): records `from..=to` were acknowledged, then forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regression {
    /// First forgotten seq.
    pub from: u64,
    /// Last forgotten seq.
    pub to: u64,
}

/// Compares the store's cursor with the Hello of the same outbox
/// incarnation: a cursor below what that outbox was acknowledged means the
/// store lost applied records (ARCHITECTURE.md I-9).
pub fn regression(stored: StoredCursor, hello: HelloInfo) -> Option<Regression> {
    (stored.incarnation == Some(hello.incarnation) && stored.seq < hello.acked).then_some(
        Regression {
            from: stored.seq + 1,
            to: hello.acked,
        },
    )
}

/// What to do with a batch the session accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Records above the cursor, to apply in one store transaction (may be empty).
    pub to_apply: Vec<Record>,
    /// Records at or below the cursor, dropped as already applied.
    pub skipped: usize,
    /// Last seq of the batch: once the apply commits, the ack is `max(cursor, last_seq)`.
    pub last_seq: u64,
}

/// Receiver session state for one connection.
#[derive(Debug, Clone)]
pub struct ReceiverSession {
    node_id: String,
    state: State,
}

impl ReceiverSession {
    /// A new session for the node authenticated as `node_id`.
    pub fn new(node_id: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            state: State::AwaitHello,
        }
    }

    /// The authenticated node.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Handles `Hello`; `stored` is what the store holds for this node, read
    /// while holding the node's apply lock. Returns the `Welcome` to send.
    pub fn on_hello(
        &mut self,
        protocol_version: u32,
        hello: HelloInfo,
        stored: StoredCursor,
    ) -> Result<Frame, SessionError> {
        if self.state != State::AwaitHello {
            return Err(SessionError::Unexpected {
                frame: "Hello",
                state: "after Hello",
            });
        }
        if protocol_version != PROTOCOL_VERSION {
            return Err(SessionError::UnsupportedVersion {
                got: protocol_version,
                expected: PROTOCOL_VERSION,
            });
        }
        self.state = State::Active {
            cursor: stored.seq,
            incarnation: hello.incarnation,
            epoch: hello.epoch,
            prev_last: None,
        };
        Ok(Frame::Welcome {
            node_id: self.node_id.clone(),
            cursor: stored.seq,
            incarnation: stored.incarnation.unwrap_or(0),
            epoch: stored.epoch,
        })
    }

    /// The outbox incarnation and epoch this session applies for (recorded
    /// with the cursor by every apply). 0 before Hello.
    pub fn outbox(&self) -> (u64, u64) {
        match self.state {
            State::Active {
                incarnation, epoch, ..
            } => (incarnation, epoch),
            State::AwaitHello => (0, 0),
        }
    }

    /// Checks a batch header against the session before decoding it.
    pub fn check_batch(&self, frame: &BatchFrame) -> Result<(), SessionError> {
        match &self.state {
            State::AwaitHello => Err(SessionError::Unexpected {
                frame: "Batch",
                state: "before Hello",
            }),
            State::Active { prev_last, .. } => match prev_last {
                Some(prev) if frame.first_seq <= *prev => Err(SessionError::OutOfOrder {
                    first_seq: frame.first_seq,
                    last_seq: frame.last_seq,
                    prev_last: *prev,
                }),
                _ => Ok(()),
            },
        }
    }

    /// Accepts a decoded batch (whose header passed [`Self::check_batch`]):
    /// splits off the records already applied.
    pub fn on_batch(
        &mut self,
        frame: &BatchFrame,
        records: Vec<Record>,
    ) -> Result<Accepted, SessionError> {
        self.check_batch(frame)?;
        let State::Active {
            cursor, prev_last, ..
        } = &mut self.state
        else {
            return Err(SessionError::Unexpected {
                frame: "Batch",
                state: "before Hello",
            });
        };
        *prev_last = Some(frame.last_seq);
        let total = records.len();
        let to_apply: Vec<Record> = records.into_iter().filter(|r| r.seq > *cursor).collect();
        Ok(Accepted {
            skipped: total - to_apply.len(),
            to_apply,
            last_seq: frame.last_seq,
        })
    }

    /// Any other frame from the node.
    pub fn on_other(&mut self, frame: &Frame) -> Result<(), SessionError> {
        match frame {
            Frame::Error { code, message } => Err(SessionError::PeerError {
                code: *code,
                message: message.clone(),
            }),
            other => Err(SessionError::Unexpected {
                frame: other.kind(),
                state: "from a node",
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::batch::encode_batch;
    use crate::batch::tests::readings;

    #[test]
    fn hello_then_batches_in_order_skipping_below_cursor() {
        let mut s = ReceiverSession::new("n1");
        let records = readings(20, 2);
        let f1 = encode_batch(&records[..10], 3).unwrap();
        assert!(s.check_batch(&f1).is_err(), "batch before hello");
        assert!(matches!(
            s.on_hello(99, HelloInfo::default(), StoredCursor::default()),
            Err(SessionError::UnsupportedVersion { got: 99, .. })
        ));
        let stored = StoredCursor {
            seq: 5,
            incarnation: Some(77),
            epoch: 3,
        };
        let hello = HelloInfo {
            incarnation: 77,
            next_seq: 21,
            acked: 5,
            epoch: 4,
            epoch_start: 6,
        };
        assert_eq!(
            s.on_hello(PROTOCOL_VERSION, hello, stored).unwrap(),
            Frame::Welcome {
                node_id: "n1".into(),
                cursor: 5,
                incarnation: 77,
                epoch: 3,
            }
        );
        assert_eq!(s.outbox(), (77, 4));
        let a = s.on_batch(&f1, records[..10].to_vec()).unwrap();
        assert_eq!((a.skipped, a.to_apply.len(), a.last_seq), (5, 5, 10));
        assert_eq!(a.to_apply[0].seq, 6);
        // Same batch again in the same session: out of order.
        assert!(matches!(
            s.check_batch(&f1),
            Err(SessionError::OutOfOrder { .. })
        ));
        let f2 = encode_batch(&records[10..], 3).unwrap();
        assert_eq!(
            s.on_batch(&f2, records[10..].to_vec())
                .unwrap()
                .to_apply
                .len(),
            10
        );
        assert!(
            s.on_hello(PROTOCOL_VERSION, hello, stored).is_err(),
            "second hello"
        );
    }

    #[test]
    fn a_store_behind_its_own_acknowledgements_is_a_regression() {
        let hello = HelloInfo {
            incarnation: 7,
            next_seq: 300,
            acked: 250,
            ..HelloInfo::default()
        };
        let behind = StoredCursor {
            seq: 200,
            incarnation: Some(7),
            epoch: 0,
        };
        assert_eq!(
            regression(behind, hello),
            Some(Regression { from: 201, to: 250 })
        );
        // Another outbox's cursor says nothing about this one.
        let other = StoredCursor {
            seq: 200,
            incarnation: Some(8),
            epoch: 0,
        };
        assert_eq!(regression(other, hello), None);
        let fine = StoredCursor {
            seq: 250,
            incarnation: Some(7),
            epoch: 0,
        };
        assert_eq!(regression(fine, hello), None);
    }
}
