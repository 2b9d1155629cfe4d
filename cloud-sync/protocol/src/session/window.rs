//! The sender's window: the cursor the aggregator acknowledged, the batches
//! in flight and what may be sent next. [`Window::check_send`] before
//! writing a batch, [`Window::on_sent`] after, and [`Window::on_ack`] for
//! each `Ack`.
//!
//! Batches need not come in seq order (protocol version 4: drain
//! priorities, live data first): what orders them is their `floor`, which
//! never goes down, and acks release them in the order they were sent.

use std::collections::VecDeque;

/// A batch written but not yet acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    /// Seq of its first record.
    pub first_seq: u64,
    /// Seq of its last record.
    pub last_seq: u64,
    /// Number of records.
    pub records: usize,
    /// Its floor (see [`crate::BatchFrame::floor`]).
    pub floor: u64,
}

/// The peer or the caller broke the sender's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// The window of in-flight batches is full; wait for an ack.
    #[error("{in_flight} batches in flight, window is {window}")]
    WindowFull {
        /// Batches in flight.
        in_flight: usize,
        /// Window size.
        window: usize,
    },
    /// A batch holds records the aggregator already acknowledged.
    #[error("batch starts at seq {first_seq}, at or below the acknowledged cursor {acked}")]
    NotAfterAcked {
        /// First seq of the rejected batch.
        first_seq: u64,
        /// The cursor.
        acked: u64,
    },
    /// A batch's floor went down.
    #[error("batch floor {floor} is below the previous batch's floor {previous}")]
    FloorBackwards {
        /// The rejected batch's floor.
        floor: u64,
        /// The highest floor sent.
        previous: u64,
    },
    /// Batch bounds are inverted.
    #[error("batch last_seq {last_seq} is below first_seq {first_seq}")]
    Inverted {
        /// First seq.
        first_seq: u64,
        /// Last seq.
        last_seq: u64,
    },
    /// The aggregator acknowledged less than it already had.
    #[error("ack went backwards: up_to {up_to} after {acked}")]
    AckBackwards {
        /// The new ack.
        up_to: u64,
        /// The previous ack.
        acked: u64,
    },
    /// The aggregator acknowledged something never sent.
    #[error("ack up_to {up_to} is beyond what was sent (floor {floor})")]
    AckBeyondSent {
        /// The new ack.
        up_to: u64,
        /// The highest floor sent.
        floor: u64,
    },
    /// The aggregator counted more applied batches than were sent, or fewer
    /// than before.
    #[error(
        "ack says {applied} batches applied; {acked} were acknowledged before and {sent} sent"
    )]
    AppliedOutOfRange {
        /// What the ack said.
        applied: u64,
        /// Acknowledged before.
        acked: u64,
        /// Sent on this connection.
        sent: u64,
    },
}

/// What an ack released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AckProgress {
    /// The new cursor.
    pub up_to: u64,
    /// Batches acknowledged by this ack.
    pub batches: usize,
    /// Records in those batches.
    pub records: usize,
}

/// The window of one session.
#[derive(Debug, Clone)]
pub struct Window {
    acked: u64,
    last_sent: u64,
    floor: u64,
    sent: u64,
    released: u64,
    in_flight: VecDeque<InFlight>,
    window: usize,
}

impl Window {
    /// A session that starts from the aggregator's Welcome `cursor`, allowing
    /// `window` (≥ 1) batches in flight.
    pub fn new(cursor: u64, window: usize) -> Self {
        Self {
            acked: cursor,
            last_sent: cursor,
            floor: cursor.saturating_add(1),
            sent: 0,
            released: 0,
            in_flight: VecDeque::new(),
            window: window.max(1),
        }
    }

    /// The cursor acknowledged (every record at or below it is applied).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Highest seq written to the link.
    pub fn last_sent(&self) -> u64 {
        self.last_sent
    }

    /// Batches of this session acknowledged so far.
    pub fn released(&self) -> u64 {
        self.released
    }

    /// Batches written and not yet acknowledged, oldest first.
    pub fn in_flight(&self) -> impl Iterator<Item = &InFlight> {
        self.in_flight.iter()
    }

    /// Whether the window has room for another batch.
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.window
    }

    /// Checks that `batch` may be sent now.
    pub fn check_send(&self, batch: &InFlight) -> Result<(), WindowError> {
        let (first_seq, last_seq) = (batch.first_seq, batch.last_seq);
        if last_seq < first_seq {
            return Err(WindowError::Inverted {
                first_seq,
                last_seq,
            });
        }
        if first_seq <= self.acked {
            return Err(WindowError::NotAfterAcked {
                first_seq,
                acked: self.acked,
            });
        }
        if batch.floor < self.floor {
            return Err(WindowError::FloorBackwards {
                floor: batch.floor,
                previous: self.floor,
            });
        }
        if !self.has_room() {
            return Err(WindowError::WindowFull {
                in_flight: self.in_flight.len(),
                window: self.window,
            });
        }
        Ok(())
    }

    /// Records that a batch was written.
    pub fn on_sent(&mut self, batch: InFlight) -> Result<(), WindowError> {
        self.check_send(&batch)?;
        self.last_sent = self.last_sent.max(batch.last_seq);
        self.floor = batch.floor;
        self.sent += 1;
        self.in_flight.push_back(batch);
        Ok(())
    }

    /// Applies an ack: the cursor `up_to` and, from aggregators of version
    /// 4, the number of this connection's batches applied (without it, the
    /// batches wholly at or below the cursor). An ack equal to the current
    /// one releases nothing; one going backwards or beyond what was sent is
    /// a protocol error.
    pub fn on_ack(&mut self, up_to: u64, applied: Option<u64>) -> Result<AckProgress, WindowError> {
        if up_to < self.acked {
            return Err(WindowError::AckBackwards {
                up_to,
                acked: self.acked,
            });
        }
        if up_to >= self.floor {
            return Err(WindowError::AckBeyondSent {
                up_to,
                floor: self.floor,
            });
        }
        if let Some(n) = applied {
            if n < self.released || n > self.sent {
                return Err(WindowError::AppliedOutOfRange {
                    applied: n,
                    acked: self.released,
                    sent: self.sent,
                });
            }
        }
        self.acked = up_to;
        let mut progress = AckProgress {
            up_to,
            ..AckProgress::default()
        };
        while let Some(front) = self.in_flight.front() {
            let done = match applied {
                Some(n) => self.released < n,
                None => front.last_seq <= up_to,
            };
            if !done {
                break;
            }
            progress.batches += 1;
            progress.records += front.records;
            self.released += 1;
            self.in_flight.pop_front();
        }
        Ok(progress)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn b(first_seq: u64, last_seq: u64) -> InFlight {
        InFlight {
            first_seq,
            last_seq,
            records: (last_seq + 1).saturating_sub(first_seq) as usize,
            floor: last_seq + 1,
        }
    }

    #[test]
    fn window_and_cumulative_acks() {
        let mut s = Window::new(10, 2);
        s.on_sent(b(11, 20)).unwrap();
        s.on_sent(b(25, 30)).unwrap();
        assert!(matches!(
            s.check_send(&b(31, 40)),
            Err(WindowError::WindowFull {
                in_flight: 2,
                window: 2
            })
        ));
        // One ack covering both batches (an aggregator before version 4).
        let p = s.on_ack(30, None).unwrap();
        assert_eq!((p.batches, p.records), (2, 16));
        assert_eq!(s.in_flight().count(), 0);
        s.on_sent(b(31, 40)).unwrap();
        // Duplicate ack: no progress, no error.
        assert_eq!(s.on_ack(30, None).unwrap().batches, 0);
        // Partial ack inside a batch keeps it in flight.
        assert_eq!(s.on_ack(35, None).unwrap().batches, 0);
        assert_eq!(s.in_flight().count(), 1);
        // Counted acks release by number.
        assert_eq!(s.on_ack(40, Some(3)).unwrap().batches, 1);
        assert_eq!(s.released(), 3);
    }

    #[test]
    fn out_of_order_batches_are_released_by_count_and_ordered_by_floor() {
        // Alerts (seqs 900..) go before the backlog (11..); the floor
        // stays at the backlog's first unsent record.
        let mut s = Window::new(10, 4);
        let alerts = InFlight {
            first_seq: 900,
            last_seq: 910,
            records: 3,
            floor: 11,
        };
        s.on_sent(alerts).unwrap();
        let backlog = InFlight {
            first_seq: 11,
            last_seq: 50,
            records: 40,
            floor: 51,
        };
        s.on_sent(backlog).unwrap();
        assert_eq!(s.last_sent(), 910);
        // The alerts applied: the cursor cannot move yet.
        let p = s.on_ack(10, Some(1)).unwrap();
        assert_eq!((p.batches, p.records, s.acked()), (1, 3, 10));
        let p = s.on_ack(50, Some(2)).unwrap();
        assert_eq!((p.batches, p.records, s.acked()), (1, 40, 50));
        // A floor going down is refused; so is a count beyond what was sent.
        assert!(matches!(
            s.check_send(&InFlight {
                floor: 40,
                ..backlog
            }),
            Err(WindowError::NotAfterAcked { .. })
        ));
        assert!(matches!(
            s.check_send(&InFlight {
                first_seq: 60,
                last_seq: 70,
                records: 11,
                floor: 50
            }),
            Err(WindowError::FloorBackwards { .. })
        ));
        assert!(matches!(
            s.on_ack(50, Some(3)),
            Err(WindowError::AppliedOutOfRange { .. })
        ));
        assert!(matches!(
            s.on_ack(50, Some(1)),
            Err(WindowError::AppliedOutOfRange { .. })
        ));
    }

    #[test]
    fn bad_acks_and_sends_are_errors() {
        let mut s = Window::new(10, 4);
        assert!(matches!(
            s.check_send(&b(10, 12)),
            Err(WindowError::NotAfterAcked { .. })
        ));
        assert!(matches!(
            s.check_send(&b(13, 12)),
            Err(WindowError::Inverted { .. })
        ));
        s.on_sent(b(11, 20)).unwrap();
        assert!(matches!(
            s.on_ack(21, None),
            Err(WindowError::AckBeyondSent { .. })
        ));
        assert!(matches!(
            s.on_ack(9, None),
            Err(WindowError::AckBackwards { .. })
        ));
        s.on_ack(20, None).unwrap();
        assert!(matches!(
            s.on_ack(15, None),
            Err(WindowError::AckBackwards { .. })
        ));
        assert!(matches!(
            s.on_sent(b(15, 25)),
            Err(WindowError::NotAfterAcked { .. })
        ));
    }
}
