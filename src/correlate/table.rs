//! The session table's storage: sessions in fixed pages of slots, chained per key.

use super::Session;
use std::hash::{BuildHasher, Hasher};

pub(super) struct Slot {
    pub(super) generation: u32,
    /// The next session in the same bucket (`NO_SLOT` ends the chain).
    pub(super) next: u32,
    pub(super) session: Option<Session>,
}

pub(super) const NO_SLOT: u32 = u32::MAX;

/// Session slots in fixed pages: the table grows without the copy (and the brief double
/// footprint) of a doubling vector.
#[derive(Default)]
pub(super) struct Slots {
    pages: Vec<Box<[Slot]>>,
    len: usize,
}

const SLOTS_PER_PAGE: usize = 4096;

impl Slots {
    pub(super) fn push(&mut self, slot: Slot) -> u32 {
        let (page, i) = (self.len / SLOTS_PER_PAGE, self.len % SLOTS_PER_PAGE);
        if page == self.pages.len() {
            self.pages.push(
                (0..SLOTS_PER_PAGE)
                    .map(|_| Slot {
                        generation: 0,
                        next: NO_SLOT,
                        session: None,
                    })
                    .collect(),
            );
        }
        self.pages[page][i] = slot;
        self.len += 1;
        (self.len - 1) as u32
    }
}

impl std::ops::Index<u32> for Slots {
    type Output = Slot;
    fn index(&self, i: u32) -> &Slot {
        &self.pages[i as usize / SLOTS_PER_PAGE][i as usize % SLOTS_PER_PAGE]
    }
}

impl std::ops::IndexMut<u32> for Slots {
    fn index_mut(&mut self, i: u32) -> &mut Slot {
        &mut self.pages[i as usize / SLOTS_PER_PAGE][i as usize % SLOTS_PER_PAGE]
    }
}

/// Buckets are keyed by an already well-mixed 64-bit hash: don't hash it again.
#[derive(Default, Clone, Copy)]
pub(super) struct KeyIsHash;
impl BuildHasher for KeyIsHash {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}
#[derive(Default)]
pub(super) struct KeyHasher(u64);
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
