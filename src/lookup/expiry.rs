//! When open lookups end: by the stage clock of the last query that joined them (`touched`),
//! oldest first, ties in opening order (ids grow as lookups open).
//!
//! Lookups open in stage-clock order, so their entries arrive sorted: a FIFO holds them and
//! gives the oldest in constant time, reading memory in order (a heap of the 65k open lookups
//! sifted through a dozen cache lines at every eviction). An entry that would break the order
//! (a lookup touched since it opened, queued again when its first time comes, or a clock that
//! went back) goes to a heap of its own, which stays small: it holds only lookups touched after
//! their opening batch, for the few milliseconds their walk lasted.
//!
//! Entries are checked lazily: one whose lookup has ended (or was touched since) is only
//! skipped when it comes out.

use crate::dnstap::Nanos;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// An open lookup's turn to end: ordered by (`touched`, `id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Due {
    pub touched: Nanos,
    pub id: u64,
    pub slot: usize,
}

#[derive(Debug, Default)]
pub(super) struct Expiry {
    /// Sorted: each entry at least the one before.
    fifo: VecDeque<Due>,
    /// The entries that arrived out of order.
    late: BinaryHeap<Reverse<Due>>,
}

impl Expiry {
    pub fn push(&mut self, d: Due) {
        match self.fifo.back() {
            Some(last) if *last > d => self.late.push(Reverse(d)),
            _ => self.fifo.push_back(d),
        }
    }

    /// The first to end.
    pub fn peek(&self) -> Option<Due> {
        match (self.fifo.front(), self.late.peek()) {
            (Some(a), Some(Reverse(b))) => Some(*a.min(b)),
            (a, b) => a.copied().or(b.map(|r| r.0)),
        }
    }

    pub fn pop(&mut self) -> Option<Due> {
        let d = self.peek()?;
        if self.fifo.front() == Some(&d) {
            self.fifo.pop_front()
        } else {
            self.late.pop().map(|r| r.0)
        }
    }

    pub fn len(&self) -> usize {
        self.fifo.len() + self.late.len()
    }

    /// Keeps the entries `live` accepts, in order.
    pub fn retain(&mut self, mut live: impl FnMut(&Due) -> bool) {
        self.fifo.retain(|d| live(d));
        self.late.retain(|Reverse(d)| live(d));
    }

    pub fn clear(&mut self) {
        self.fifo.clear();
        self.late.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_out_in_order_of_time_then_id_whatever_order_they_went_in() {
        let mut e = Expiry::default();
        let pushed = [
            (5, 1),
            (5, 2),
            (7, 3),
            (6, 9),
            (7, 4),
            (3, 8),
            (9, 5),
            (7, 3),
        ];
        for (touched, id) in pushed {
            e.push(Due {
                touched,
                id,
                slot: id as usize,
            });
        }
        assert_eq!(e.len(), pushed.len());
        let mut sorted = pushed.to_vec();
        sorted.sort();
        let out: Vec<(Nanos, u64)> = std::iter::from_fn(|| e.pop())
            .map(|d| (d.touched, d.id))
            .collect();
        assert_eq!(out, sorted);
    }
}
