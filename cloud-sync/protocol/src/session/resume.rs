//! Where to resume, given the edge's outbox and the aggregator's `Welcome`
//! (ARCHITECTURE.md I-8 and I-9). Decided by the client session; carried out
//! on the outbox by the edge.

use super::OutboxInfo;

/// How to resume, given this outbox and the aggregator's Welcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The cursor is this outbox's: delete through it, send after it.
    Continue,
    /// The cursor is this outbox's but below what was acknowledged: records
    /// `from..=to` were lost by the aggregator (restored store). Alarm, then
    /// continue: they were deleted here and cannot be resent.
    Regressed {
        /// First lost seq.
        from: u64,
        /// Last lost seq.
        to: u64,
    },
    /// The cursor belongs to another outbox of this node: renumber every
    /// buffered record above it, delete nothing.
    Foreign,
    /// The cursor claims this outbox's incarnation but is beyond anything it
    /// numbered: this file is an older copy (a restored image, a clone).
    /// Take a new incarnation and renumber above it; delete nothing; then
    /// reconnect to announce the new incarnation.
    Ahead,
}

/// What the aggregator's Welcome said about this node's outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Welcomed {
    /// Highest seq applied.
    pub cursor: u64,
    /// The incarnation that cursor belongs to (0: none recorded).
    pub incarnation: u64,
    /// The epoch last recorded with it (0: none).
    pub epoch: u64,
    /// The highest seq the store holds for the node (≥ `cursor`; above it
    /// when records were sent out of order). What renumbering must clear.
    pub top: u64,
}

/// Decides how to resume. An aggregator that recorded no incarnation (0, an
/// older store) is taken at its word only if its cursor is within what this
/// outbox numbered.
///
/// Same incarnation, but this file is an older copy of itself when the
/// aggregator last saw another start (epoch) of it and this start numbered
/// from at or below the cursor — a genuine restart numbers above everything
/// applied: its numbering forked, and nothing of it may be deleted by the
/// cursor.
///
/// "Seen" is the highest seq the store holds, which is above the cursor
/// when this outbox sent out of order: a seq this file never numbered, or a
/// restart that numbered from at or below one stored, would collide with a
/// stored record and be taken for a duplicate.
pub fn reconcile(outbox: OutboxInfo, w: Welcomed) -> Resume {
    let cursor = w.cursor;
    let seen = w.top.max(cursor);
    let ours =
        w.incarnation == outbox.incarnation || (w.incarnation == 0 && seen < outbox.next_seq);
    let forked =
        w.incarnation != 0 && w.epoch != 0 && w.epoch != outbox.epoch && outbox.epoch_start <= seen;
    if !ours {
        Resume::Foreign
    } else if seen >= outbox.next_seq || forked {
        Resume::Ahead
    } else if cursor < outbox.acked {
        Resume::Regressed {
            from: cursor + 1,
            to: outbox.acked,
        }
    } else {
        Resume::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(incarnation: u64, next_seq: u64, acked: u64) -> OutboxInfo {
        OutboxInfo {
            incarnation,
            next_seq,
            acked,
            epoch: 5,
            epoch_start: 1,
        }
    }

    fn w(cursor: u64, incarnation: u64) -> Welcomed {
        Welcomed {
            cursor,
            incarnation,
            epoch: 0,
            top: cursor,
        }
    }

    #[test]
    fn the_cursor_of_another_outbox_deletes_nothing() {
        // 100 synced by an old outbox, this one is new with 50 buffered.
        assert_eq!(reconcile(outbox(2, 51, 0), w(100, 1)), Resume::Foreign);
        // An older aggregator store that recorded no incarnation.
        assert_eq!(reconcile(outbox(2, 51, 0), w(100, 0)), Resume::Foreign);
        assert_eq!(reconcile(outbox(2, 51, 0), w(30, 0)), Resume::Continue);
    }

    #[test]
    fn same_outbox_continue_regressed_or_ahead() {
        assert_eq!(reconcile(outbox(7, 301, 250), w(250, 7)), Resume::Continue);
        assert_eq!(reconcile(outbox(7, 301, 250), w(280, 7)), Resume::Continue);
        assert_eq!(
            reconcile(outbox(7, 301, 250), w(200, 7)),
            Resume::Regressed { from: 201, to: 250 }
        );
        assert_eq!(reconcile(outbox(7, 301, 250), w(301, 7)), Resume::Ahead);
        assert_eq!(reconcile(outbox(7, 1, 0), w(0, 0)), Resume::Continue);
    }

    #[test]
    fn an_older_copy_whose_numbering_forked_is_told_by_its_epoch() {
        // The file restarted (epoch 6) numbering from seq 51, but the
        // aggregator applied up to 100 under epoch 5: a restored copy.
        let copy = OutboxInfo {
            epoch: 6,
            epoch_start: 51,
            ..outbox(7, 111, 50)
        };
        let seen = Welcomed {
            cursor: 100,
            incarnation: 7,
            epoch: 5,
            top: 100,
        };
        assert_eq!(reconcile(copy, seen), Resume::Ahead);
        // A genuine restart numbers above everything applied.
        let genuine = OutboxInfo {
            epoch: 6,
            epoch_start: 111,
            ..outbox(7, 130, 100)
        };
        assert_eq!(reconcile(genuine, seen), Resume::Continue);
        // A copy whose restart numbered above the cursor collides with
        // nothing applied: it goes on.
        let above = OutboxInfo {
            epoch: 4,
            epoch_start: 101,
            ..outbox(7, 130, 100)
        };
        assert_eq!(reconcile(above, seen), Resume::Continue);
        // Same start, a reconnect within it.
        let same = OutboxInfo {
            epoch: 5,
            epoch_start: 1,
            ..outbox(7, 130, 100)
        };
        assert_eq!(reconcile(same, seen), Resume::Continue);
    }

    #[test]
    fn records_stored_above_the_cursor_count_as_seen() {
        // Sent out of order: the store holds up to 400, its cursor is 100.
        let top = Welcomed {
            cursor: 100,
            incarnation: 7,
            epoch: 5,
            top: 400,
        };
        let same = OutboxInfo {
            epoch: 5,
            ..outbox(7, 401, 100)
        };
        assert_eq!(reconcile(same, top), Resume::Continue);
        // This file never numbered 400: an older copy.
        assert_eq!(
            reconcile(
                OutboxInfo {
                    epoch: 5,
                    ..outbox(7, 301, 100)
                },
                top
            ),
            Resume::Ahead
        );
        // A restart numbering from 201 would collide with what is stored.
        let restarted = OutboxInfo {
            epoch: 6,
            epoch_start: 201,
            ..outbox(7, 450, 100)
        };
        assert_eq!(reconcile(restarted, top), Resume::Ahead);
    }
}
