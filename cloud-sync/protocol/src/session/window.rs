//! The sender's window: the cumulative ack, the batches in flight and what
//! may be sent next. [`Window::check_send`] before writing a batch,
//! [`Window::on_sent`] after, and [`Window::on_ack`] for each `Ack`.

use std::collections::VecDeque;

/// A batch written but not yet fully acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    /// Seq of its first record.
    pub first_seq: u64,
    /// Seq of its last record.
    pub last_seq: u64,
    /// Number of records.
    pub records: usize,
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
    /// A batch must start after everything already sent (and after the cursor).
    #[error(
        "batch starts at seq {first_seq}, but seq {last_sent} was already sent or acknowledged"
    )]
    NotAfterSent {
        /// First seq of the rejected batch.
        first_seq: u64,
        /// Highest seq sent or acknowledged so far.
        last_sent: u64,
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
    #[error("ack up_to {up_to} is beyond the last seq sent ({last_sent})")]
    AckBeyondSent {
        /// The new ack.
        up_to: u64,
        /// Highest seq sent.
        last_sent: u64,
    },
}

/// What an ack released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AckProgress {
    /// The new cumulative ack.
    pub up_to: u64,
    /// Batches fully acknowledged by this ack.
    pub batches: usize,
    /// Records in those batches.
    pub records: usize,
}

/// The window of one session.
#[derive(Debug, Clone)]
pub struct Window {
    acked: u64,
    last_sent: u64,
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
            in_flight: VecDeque::new(),
            window: window.max(1),
        }
    }

    /// Highest seq acknowledged (durably applied by the aggregator).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Highest seq written to the link.
    pub fn last_sent(&self) -> u64 {
        self.last_sent
    }

    /// Batches written and not fully acknowledged, oldest first.
    pub fn in_flight(&self) -> impl Iterator<Item = &InFlight> {
        self.in_flight.iter()
    }

    /// Whether the window has room for another batch.
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.window
    }

    /// Checks that a batch spanning `first_seq..=last_seq` may be sent now.
    pub fn check_send(&self, first_seq: u64, last_seq: u64) -> Result<(), WindowError> {
        if last_seq < first_seq {
            return Err(WindowError::Inverted {
                first_seq,
                last_seq,
            });
        }
        if first_seq <= self.last_sent {
            return Err(WindowError::NotAfterSent {
                first_seq,
                last_sent: self.last_sent,
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

    /// Records that a batch was written. Call only after [`Self::check_send`] succeeded.
    pub fn on_sent(&mut self, batch: InFlight) -> Result<(), WindowError> {
        self.check_send(batch.first_seq, batch.last_seq)?;
        self.last_sent = batch.last_seq;
        self.in_flight.push_back(batch);
        Ok(())
    }

    /// Applies a cumulative ack. An ack equal to the current one is accepted and
    /// releases nothing; one below it or beyond what was sent is a protocol error.
    pub fn on_ack(&mut self, up_to: u64) -> Result<AckProgress, WindowError> {
        if up_to < self.acked {
            return Err(WindowError::AckBackwards {
                up_to,
                acked: self.acked,
            });
        }
        if up_to > self.last_sent {
            return Err(WindowError::AckBeyondSent {
                up_to,
                last_sent: self.last_sent,
            });
        }
        self.acked = up_to;
        let mut progress = AckProgress {
            up_to,
            ..AckProgress::default()
        };
        while let Some(front) = self.in_flight.front() {
            if front.last_seq > up_to {
                break;
            }
            progress.batches += 1;
            progress.records += front.records;
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
            records: (last_seq - first_seq + 1) as usize,
        }
    }

    #[test]
    fn window_and_cumulative_acks() {
        let mut s = Window::new(10, 2);
        s.on_sent(b(11, 20)).unwrap();
        s.on_sent(b(25, 30)).unwrap();
        assert!(matches!(
            s.check_send(31, 40),
            Err(WindowError::WindowFull {
                in_flight: 2,
                window: 2
            })
        ));
        // One ack covering both batches.
        let p = s.on_ack(30).unwrap();
        assert_eq!((p.batches, p.records), (2, 16));
        assert_eq!(s.in_flight().count(), 0);
        s.on_sent(b(31, 40)).unwrap();
        // Duplicate ack: no progress, no error.
        assert_eq!(s.on_ack(30).unwrap().batches, 0);
        // Partial ack inside a batch keeps it in flight.
        assert_eq!(s.on_ack(35).unwrap().batches, 0);
        assert_eq!(s.in_flight().count(), 1);
    }

    #[test]
    fn bad_acks_and_sends_are_errors() {
        let mut s = Window::new(10, 4);
        assert!(matches!(
            s.check_send(10, 12),
            Err(WindowError::NotAfterSent { .. })
        ));
        assert!(matches!(
            s.check_send(13, 12),
            Err(WindowError::Inverted { .. })
        ));
        s.on_sent(b(11, 20)).unwrap();
        assert!(matches!(
            s.on_ack(21),
            Err(WindowError::AckBeyondSent { .. })
        ));
        assert!(matches!(s.on_ack(9), Err(WindowError::AckBackwards { .. })));
        s.on_ack(20).unwrap();
        assert!(matches!(
            s.on_ack(15),
            Err(WindowError::AckBackwards { .. })
        ));
        assert!(matches!(
            s.on_sent(b(15, 25)),
            Err(WindowError::NotAfterSent { .. })
        ));
    }
}
