//! The session table: open sessions in fixed pages of slots, chained per key, with a free
//! list. It knows nothing of matching; the correlator decides which candidate a message joins.

use super::Session;
use crate::dnstap::Nanos;
use hashbrown::HashMap;
use std::hash::{BuildHasher, Hasher};

/// Where a session lives in the table. A slot is reused once its session is removed; the
/// slot's generation tells a stale reference (an old expiry entry) from the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct SlotId(u32);

impl SlotId {
    pub(super) fn index(self) -> u32 {
        self.0
    }

    pub(super) fn from_index(index: u32) -> Self {
        Self(index)
    }
}

/// Ends a chain.
const NO_SLOT: u32 = u32::MAX;
/// Slot numbers stop one short of the chain terminator.
pub(super) const MAX_SLOTS: usize = NO_SLOT as usize;

struct Entry {
    generation: u32,
    /// The next session in the same bucket (`NO_SLOT` ends the chain).
    next: u32,
    /// Neighbours in opening order, for eviction.
    older: u32,
    newer: u32,
    session: Option<Session>,
}

impl Entry {
    fn vacant() -> Self {
        Entry {
            generation: 0,
            next: NO_SLOT,
            older: NO_SLOT,
            newer: NO_SLOT,
            session: None,
        }
    }
}

/// Entries in fixed pages: the table grows without the copy (and the brief double footprint)
/// of a doubling vector.
#[derive(Default)]
struct Pages {
    pages: Vec<Box<[Entry]>>,
    len: usize,
}

const SLOTS_PER_PAGE: usize = 4096;

impl Pages {
    /// A new vacant entry.
    fn grow(&mut self) -> u32 {
        let page = self.len / SLOTS_PER_PAGE;
        if page == self.pages.len() {
            self.pages
                .push((0..SLOTS_PER_PAGE).map(|_| Entry::vacant()).collect());
        }
        self.len += 1;
        (self.len - 1) as u32
    }
}

impl std::ops::Index<u32> for Pages {
    type Output = Entry;
    fn index(&self, i: u32) -> &Entry {
        &self.pages[i as usize / SLOTS_PER_PAGE][i as usize % SLOTS_PER_PAGE]
    }
}

impl std::ops::IndexMut<u32> for Pages {
    fn index_mut(&mut self, i: u32) -> &mut Entry {
        &mut self.pages[i as usize / SLOTS_PER_PAGE][i as usize % SLOTS_PER_PAGE]
    }
}

/// Open sessions, found by key. Sessions with the same key (retries of a question, colliding
/// hashes) share one chain; the chain's head is in a hash map keyed by the key itself. All
/// sessions are also linked in the order they were opened, so the oldest is found in O(1)
/// whatever its source: arrival order is the one clock every source of a shard shares.
pub(super) struct SessionTable {
    entries: Pages,
    free: Vec<u32>,
    /// Key to the first slot of its chain.
    buckets: HashMap<u64, u32, KeyIsHash>,
    len: usize,
    oldest: u32,
    newest: u32,
}

impl Default for SessionTable {
    fn default() -> Self {
        Self {
            entries: Pages::default(),
            free: Vec::new(),
            buckets: HashMap::with_hasher(KeyIsHash),
            len: 0,
            oldest: NO_SLOT,
            newest: NO_SLOT,
        }
    }
}

impl SessionTable {
    /// Number of open sessions.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Stores the session under its key, reusing a freed slot first.
    pub(super) fn insert(&mut self, session: Session) -> SlotId {
        let key = session.key;
        let slot = self.free.pop().unwrap_or_else(|| self.entries.grow());
        let next = self.buckets.insert(key, slot).unwrap_or(NO_SLOT);
        let e = &mut self.entries[slot];
        e.session = Some(session);
        e.next = next;
        e.older = self.newest;
        e.newer = NO_SLOT;
        match self.newest {
            NO_SLOT => self.oldest = slot,
            newest => self.entries[newest].newer = slot,
        }
        self.newest = slot;
        self.len += 1;
        SlotId(slot)
    }

    /// Takes the session out: see [`SessionTable::discard`].
    #[cfg(test)]
    pub(super) fn remove(&mut self, slot: SlotId) -> Option<Session> {
        let session = self.entries[slot.0].session.clone()?;
        self.discard(slot);
        Some(session)
    }

    /// Drops the session where it is (a session is a few hundred bytes: not moved out to be
    /// dropped), unlinks it from its chain, bumps the slot's generation (so references to it
    /// go stale) and frees the slot. False if the slot holds no session.
    pub(super) fn discard(&mut self, slot: SlotId) -> bool {
        let entry = &mut self.entries[slot.0];
        let Some(key) = entry.session.as_ref().map(|s| s.key) else {
            return false;
        };
        entry.session = None;
        entry.generation = entry.generation.wrapping_add(1);
        self.unlink(key, slot.0);
        self.unlink_age(slot.0);
        self.free.push(slot.0);
        self.len -= 1;
        true
    }

    /// The live sessions chained under `key`, newest first, with their slots.
    pub(super) fn candidates(&self, key: u64) -> Candidates<'_> {
        Candidates {
            table: self,
            slot: self.buckets.get(&key).copied().unwrap_or(NO_SLOT),
        }
    }

    /// The session opened longest ago that is still in the table.
    pub(super) fn oldest(&self) -> Option<SlotId> {
        (self.oldest != NO_SLOT).then_some(SlotId(self.oldest))
    }

    pub(super) fn get(&self, slot: SlotId) -> Option<&Session> {
        self.entries[slot.0].session.as_ref()
    }

    /// The session in a slot the caller knows to be live (from `insert` or `candidates`).
    pub(super) fn get_mut(&mut self, slot: SlotId) -> &mut Session {
        self.entries[slot.0]
            .session
            .as_mut()
            .expect("slot holds a live session")
    }

    pub(super) fn generation(&self, slot: SlotId) -> u32 {
        self.entries[slot.0].generation
    }

    /// Whether an expiry entry still describes the slot's session: same generation (the slot
    /// was not reused) and same deadline (the session was not rescheduled since).
    pub(super) fn is_live(&self, slot: SlotId, generation: u32, deadline: Nanos) -> bool {
        let e = &self.entries[slot.0];
        e.generation == generation && e.session.as_ref().is_some_and(|s| s.deadline == deadline)
    }

    fn unlink_age(&mut self, slot: u32) {
        let (older, newer) = (self.entries[slot].older, self.entries[slot].newer);
        match older {
            NO_SLOT => self.oldest = newer,
            older => self.entries[older].newer = newer,
        }
        match newer {
            NO_SLOT => self.newest = older,
            newer => self.entries[newer].older = older,
        }
        let e = &mut self.entries[slot];
        (e.older, e.newer, e.next) = (NO_SLOT, NO_SLOT, NO_SLOT);
    }

    fn unlink(&mut self, key: u64, slot: u32) {
        let next = self.entries[slot].next;
        let Some(head) = self.buckets.get_mut(&key) else {
            return;
        };
        if *head == slot {
            if next == NO_SLOT {
                self.buckets.remove(&key);
            } else {
                *head = next;
            }
            return;
        }
        let mut prev = *head;
        while prev != NO_SLOT {
            if self.entries[prev].next == slot {
                self.entries[prev].next = next;
                return;
            }
            prev = self.entries[prev].next;
        }
    }
}

/// Iterator over one key's chain: `(slot, session)`.
pub(super) struct Candidates<'a> {
    table: &'a SessionTable,
    slot: u32,
}

impl<'a> Iterator for Candidates<'a> {
    type Item = (SlotId, &'a Session);
    fn next(&mut self) -> Option<Self::Item> {
        while self.slot != NO_SLOT {
            let slot = self.slot;
            let entry = &self.table.entries[slot];
            self.slot = entry.next;
            if let Some(s) = entry.session.as_ref() {
                return Some((SlotId(slot), s));
            }
        }
        None
    }
}

/// Buckets are keyed by an already well-mixed 64-bit hash: don't hash it again.
#[derive(Default, Clone, Copy)]
struct KeyIsHash;
impl BuildHasher for KeyIsHash {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}
#[derive(Default)]
struct KeyHasher(u64);
impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) ^ (*b as u64);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dnstap::{SenderProfile, SourceId};

    /// A session under `key`, told apart by its `dns_id`.
    fn session(key: u64, id: u16) -> Session {
        let mut s = Session::open(SourceId(1), SenderProfile::CoreDns, key, 0, true);
        s.dns_id = Some(id);
        s
    }

    fn ids(t: &SessionTable, key: u64) -> Vec<u16> {
        t.candidates(key).filter_map(|(_, s)| s.dns_id).collect()
    }

    #[test]
    fn colliding_keys_share_a_chain_and_other_keys_stay_apart() {
        let mut t = SessionTable::default();
        let a = t.insert(session(7, 1));
        t.insert(session(7, 2));
        t.insert(session(8, 3));
        t.insert(session(7, 4));
        assert_eq!(ids(&t, 7), [4, 2, 1], "newest first");
        assert_eq!(ids(&t, 8), [3]);
        assert!(ids(&t, 9).is_empty());
        assert_eq!(t.len(), 4);
        let slots: Vec<SlotId> = t.candidates(7).map(|(slot, _)| slot).collect();
        assert_eq!(slots.last(), Some(&a));
        assert_eq!(t.get(a).and_then(|s| s.dns_id), Some(1));
        t.get_mut(a).dns_id = Some(10);
        assert_eq!(ids(&t, 7), [4, 2, 10]);
    }

    #[test]
    fn removing_head_middle_or_tail_keeps_the_rest_of_the_chain() {
        for (victim, rest) in [(4u16, [3u16, 2, 1]), (3, [4, 2, 1]), (1, [4, 3, 2])] {
            let mut t = SessionTable::default();
            let mut slots = Vec::new();
            for id in 1..=4 {
                slots.push(t.insert(session(7, id)));
            }
            let removed = t.remove(slots[victim as usize - 1]).map(|s| s.dns_id);
            assert_eq!(removed, Some(Some(victim)));
            assert_eq!(ids(&t, 7), rest, "removing {victim}");
            assert_eq!(t.len(), 3);
        }
    }

    #[test]
    fn removing_the_last_session_of_a_key_empties_its_bucket() {
        let mut t = SessionTable::default();
        let a = t.insert(session(7, 1));
        let b = t.insert(session(7, 2));
        assert!(t.remove(b).is_some());
        assert!(t.remove(a).is_some());
        assert!(t.buckets.is_empty());
        assert_eq!(t.len(), 0);
        assert!(t.remove(a).is_none(), "already removed");
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn the_oldest_session_is_the_first_opened_still_in_the_table() {
        let mut t = SessionTable::default();
        assert_eq!(t.oldest(), None);
        let slots: Vec<SlotId> = (1..=4).map(|id| t.insert(session(id as u64, id))).collect();
        assert_eq!(t.oldest(), Some(slots[0]));
        t.remove(slots[1]); // the middle
        assert_eq!(t.oldest(), Some(slots[0]));
        t.remove(slots[0]); // the oldest
        assert_eq!(t.oldest(), Some(slots[2]));
        t.remove(slots[3]); // the newest
        let again = t.insert(session(9, 9)); // reuses a freed slot, yet is the newest
        assert_eq!(t.oldest(), Some(slots[2]));
        t.remove(slots[2]);
        assert_eq!(t.oldest(), Some(again));
        t.remove(again);
        assert_eq!((t.oldest(), t.len()), (None, 0));
    }

    #[test]
    fn a_reused_slot_has_a_new_generation_so_old_expiry_entries_are_stale() {
        let mut t = SessionTable::default();
        let a = t.insert(session(7, 1));
        t.get_mut(a).deadline = 100;
        let old = t.generation(a);
        assert!(t.is_live(a, old, 100));
        assert!(!t.is_live(a, old, 99), "rescheduled since");
        t.remove(a);
        assert!(!t.is_live(a, old, 100), "removed");
        let b = t.insert(session(9, 2));
        assert_eq!(b, a, "the freed slot is reused");
        t.get_mut(b).deadline = 100;
        assert!(
            !t.is_live(b, old, 100),
            "same slot and deadline, older generation"
        );
        assert!(t.is_live(b, t.generation(b), 100));
        assert_eq!(ids(&t, 9), [2]);
        assert!(ids(&t, 7).is_empty(), "the reused slot left its old chain");
    }
}
