//! A source's expiry entries in deadline order, at O(1) amortised per entry.
//!
//! A deadline is an event time plus one of a few fixed waits (session timeout, orphan grace,
//! loss hold), and a sender's event times are nearly monotonic, so the entries of each wait
//! arrive nearly sorted. They go into a few sorted FIFO lanes (patience sorting): a push goes
//! to the back of the lane it extends in order, a pop takes the earliest lane front. The rare
//! entry no lane takes in order (a sender's clock stepping back) goes to a heap of stragglers,
//! so a hostile clock costs what a heap costs and nothing more. Entries leave in exactly a
//! min-heap's order (ascending, ties by the whole entry), so which session expires first does
//! not depend on the structure.

use super::table::SlotId;
use crate::dnstap::Nanos;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// Lanes kept: CoreDNS's waits need three; the rest absorb small steps back of the clock.
/// Lanes stay once opened (an empty one keeps its buffer), so the queue allocates only while
/// it grows to its largest size.
const MAX_LANES: usize = 6;

/// Where the earliest entry is: a lane, or the stragglers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Lane(usize),
    Straggler,
}

pub(super) struct ExpiryQueue<T> {
    /// Each lane sorted ascending, front first.
    lanes: Vec<VecDeque<T>>,
    stragglers: BinaryHeap<Reverse<T>>,
    /// The earliest entry and its place; `None` when the queue is empty.
    head: Option<(T, Place)>,
}

impl<T> Default for ExpiryQueue<T> {
    fn default() -> Self {
        Self {
            lanes: Vec::new(),
            stragglers: BinaryHeap::new(),
            head: None,
        }
    }
}

impl<T: Ord + Copy> ExpiryQueue<T> {
    /// The earliest entry.
    pub(super) fn peek(&self) -> Option<T> {
        self.head.map(|(e, _)| e)
    }

    /// Removes and returns the earliest entry.
    pub(super) fn pop(&mut self) -> Option<T> {
        let (e, place) = self.head?;
        match place {
            Place::Lane(i) => self.lanes[i].pop_front(),
            Place::Straggler => self.stragglers.pop().map(|e| e.0),
        };
        self.head = self.find_head();
        Some(e)
    }

    pub(super) fn push(&mut self, e: T) {
        let place = match self.lane_for(e) {
            Some(i) => {
                self.lanes[i].push_back(e);
                Place::Lane(i)
            }
            None => {
                self.stragglers.push(Reverse(e));
                Place::Straggler
            }
        };
        // An entry that extends a non-empty lane is not below that lane's front: it becomes
        // the head only as a lane's (or the stragglers') new earliest entry.
        if self.head.is_none_or(|(h, _)| e < h) {
            self.head = Some((e, place));
        }
    }

    /// The lane `e` extends in order: the one whose last entry is the latest not after `e`
    /// (keeping the lanes tight), else an empty lane, else a new one while there is room.
    fn lane_for(&mut self, e: T) -> Option<usize> {
        let mut best: Option<(T, usize)> = None;
        let mut empty = None;
        for (i, lane) in self.lanes.iter().enumerate() {
            match lane.back() {
                Some(&b) if b <= e && best.is_none_or(|(x, _)| b > x) => best = Some((b, i)),
                None if empty.is_none() => empty = Some(i),
                _ => {}
            }
        }
        if let Some((_, i)) = best {
            return Some(i);
        }
        if empty.is_none() && self.lanes.len() < MAX_LANES {
            self.lanes.push(VecDeque::new());
            empty = Some(self.lanes.len() - 1);
        }
        empty
    }

    fn find_head(&self) -> Option<(T, Place)> {
        let mut head = self.stragglers.peek().map(|e| (e.0, Place::Straggler));
        for (i, lane) in self.lanes.iter().enumerate() {
            if let Some(&f) = lane.front() {
                if head.is_none_or(|(h, _)| f < h) {
                    head = Some((f, Place::Lane(i)));
                }
            }
        }
        head
    }
}

/// An expiry entry, packed so that comparing two is one wide comparison: ordered by deadline,
/// then slot, then the slot's generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Due(u128);

impl Due {
    pub(super) fn new(deadline: Nanos, slot: SlotId, generation: u32) -> Self {
        Self((deadline as u128) << 64 | (slot.index() as u128) << 32 | generation as u128)
    }

    pub(super) fn deadline(self) -> Nanos {
        (self.0 >> 64) as Nanos
    }

    pub(super) fn slot(self) -> SlotId {
        SlotId::from_index((self.0 >> 32) as u32)
    }

    pub(super) fn generation(self) -> u32 {
        self.0 as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random sequence (no dependency needed for a test's noise).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    /// Pushes and pops as `ops` says into both the queue and a heap; both must agree.
    fn agrees_with_a_heap(entries: impl Iterator<Item = (u64, u32)>, pop_every: usize) {
        let mut q = ExpiryQueue::default();
        let mut heap = BinaryHeap::new();
        for (n, e) in entries.enumerate() {
            q.push(e);
            heap.push(Reverse(e));
            assert_eq!(q.peek(), heap.peek().map(|r| r.0));
            if n % pop_every == 0 {
                assert_eq!(q.pop(), heap.pop().map(|r| r.0));
            }
        }
        while let Some(Reverse(e)) = heap.pop() {
            assert_eq!(q.pop(), Some(e));
        }
        assert_eq!(q.pop(), None);
        assert_eq!(q.peek(), None);
    }

    #[test]
    fn nearly_monotonic_deadlines_of_three_waits_come_out_sorted() {
        let mut rng = Lcg(7);
        let waits = [10_000, 1_000, 2_000];
        let entries = (0..20_000u32).map(move |i| {
            let jitter = rng.next() % 50;
            let t = i as u64 * 10 + jitter;
            (t + waits[(rng.next() % 3) as usize], i % 97)
        });
        agrees_with_a_heap(entries, 3);
    }

    #[test]
    fn a_random_clock_falls_back_to_the_heap_order() {
        let mut rng = Lcg(11);
        let entries = (0..5_000u32).map(move |i| (rng.next() % 1000, i % 5));
        agrees_with_a_heap(entries, 2);
    }

    #[test]
    fn equal_deadlines_leave_by_the_rest_of_the_entry() {
        let entries = [(5, 3), (5, 1), (5, 2), (4, 9), (5, 1)].into_iter();
        agrees_with_a_heap(entries, 100);
    }

    #[test]
    fn a_due_entry_orders_like_its_tuple() {
        let due = |d, s, g| Due::new(d, SlotId::from_index(s), g);
        let mut tuples = [
            (5, 2, 1),
            (5, 1, 9),
            (4, 7, 7),
            (Nanos::MAX, 0, 0),
            (5, 1, 2),
        ];
        let mut packed = tuples.map(|(d, s, g)| due(d, s, g));
        tuples.sort();
        packed.sort();
        let unpacked = packed.map(|p| (p.deadline(), p.slot().index(), p.generation()));
        assert_eq!(unpacked, tuples);
    }

    #[test]
    fn in_order_entries_need_no_straggler_heap() {
        let mut q = ExpiryQueue::default();
        for i in 0..1000u64 {
            q.push((i + 10_000, 0u32));
            q.push((i + 1_000, 1));
        }
        assert!(q.stragglers.is_empty());
        assert!(q.lanes.len() <= 2);
        assert_eq!(q.pop(), Some((1_000, 1)));
    }
}
