//! Where a shard keeps the bytes of the messages its open sessions hold.
//!
//! Sessions live from microseconds (cache hits) to many seconds (upstream timeouts). Holding
//! slices of the readers' buffers would pin every buffer a long-lived session touches, and one
//! heap allocation per message is what the hot path must not do. Instead each message is
//! copied into a slot of a size class, straight from the reader's buffer (`ingest::Batch`); freed slots are reused at once, so memory follows the
//! open sessions, not the traffic. In front of each message, its `MessageFacts` (where the
//! diagnosis finds its fields in it, as the reader's scan found them).

use crate::dnstap::{Encoded, MessageFacts};
use std::ops::Range;

/// The facts in front of each stored message.
const HEADER: usize = MessageFacts::LEN;

/// Slot sizes in bytes, 8 apart where CoreDNS's messages fall with their facts (upstream
/// queries stored without the client's query are 40-70 bytes, the rest 90-250, and 20 more); larger classes take big responses;
/// anything beyond the last class gets a slot of its own size.
const CLASSES: [usize; 23] = [
    32, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128, 144, 160, 192, 224, 256, 384, 512, 1024,
    2048, 4096, 16384,
];
/// Slots are carved from pages of at most this many bytes (a power of two of slots).
const PAGE_BYTES: usize = 64 << 10;

/// Where one message's bytes are: size class in the top byte, slot below; then the length (of
/// the message, without its facts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef {
    class_slot: u32,
    len: u32,
}

const LARGE: u32 = 0xff;
const SLOT_BITS: u32 = 24;

impl MessageRef {
    fn new(class: u32, slot: u32, len: usize) -> Self {
        Self {
            class_slot: class << SLOT_BITS | slot,
            len: len as u32,
        }
    }
    fn class(self) -> usize {
        (self.class_slot >> SLOT_BITS) as usize
    }
    fn slot(self) -> u32 {
        self.class_slot & ((1 << SLOT_BITS) - 1)
    }
}

#[derive(Default)]
struct Class {
    size: usize,
    /// A page holds 2^`page_shift` slots (the most that fit in `PAGE_BYTES`, at least one):
    /// a slot's page and place in it are a shift and a mask, not a division.
    page_shift: u32,
    pages: Vec<Box<[u8]>>,
    free: Vec<u32>,
    /// Slots handed out from the newest page so far.
    used_in_last: usize,
}

impl Class {
    fn new(size: usize) -> Self {
        Self {
            size,
            page_shift: (PAGE_BYTES / size).max(1).ilog2(),
            ..Self::default()
        }
    }

    fn slots_per_page(&self) -> usize {
        1 << self.page_shift
    }

    /// A free slot; None when the class has run out of slot numbers.
    fn take(&mut self) -> Option<u32> {
        if let Some(slot) = self.free.pop() {
            return Some(slot);
        }
        let per_page = self.slots_per_page();
        if self.pages.is_empty() || self.used_in_last == per_page {
            self.pages
                .push(vec![0u8; per_page * self.size].into_boxed_slice());
            self.used_in_last = 0;
        }
        let slot = (self.pages.len() - 1) * per_page + self.used_in_last;
        if slot >= 1 << SLOT_BITS {
            return None;
        }
        self.used_in_last += 1;
        Some(slot as u32)
    }

    /// The page and the byte range of `slot` in it.
    fn place(&self, slot: u32) -> (usize, std::ops::Range<usize>) {
        let (page, i) = (
            slot as usize >> self.page_shift,
            slot as usize & (self.slots_per_page() - 1),
        );
        (page, i * self.size..(i + 1) * self.size)
    }

    fn bytes_mut(&mut self, slot: u32) -> &mut [u8] {
        let (page, range) = self.place(slot);
        &mut self.pages[page][range]
    }

    fn bytes(&self, slot: u32) -> &[u8] {
        let (page, range) = self.place(slot);
        &self.pages[page][range]
    }
}

pub struct MessageStore {
    classes: Vec<Class>,
    /// Messages larger than every class, each in its own box.
    large: Vec<Option<Box<[u8]>>>,
    large_free: Vec<u32>,
}

impl Default for MessageStore {
    fn default() -> Self {
        Self {
            classes: CLASSES.iter().map(|&size| Class::new(size)).collect(),
            large: Vec::new(),
            large_free: Vec::new(),
        }
    }
}

impl MessageStore {
    /// Stores a message (with its frame's `extra`, if any) and its facts: written straight
    /// into its slot.
    pub fn put<'a>(&mut self, message: impl Into<Encoded<'a>>) -> MessageRef {
        self.put_after(&[], message.into())
    }

    /// Stores `message` without its bytes `cut` (a field of it), its facts moved to match.
    pub fn put_without(&mut self, message: Encoded<'_>, cut: Range<usize>) -> MessageRef {
        let rest = Encoded {
            message: &message.message[cut.end..],
            facts: message.facts.without(cut.clone()),
            ..message
        };
        self.put_after(&message.message[..cut.start], rest)
    }

    /// Stores `head`, then `message` (with its extra) as one message with `message`'s facts:
    /// each byte copied once, straight into its slot.
    fn put_after(&mut self, head: &[u8], message: Encoded<'_>) -> MessageRef {
        let len = head.len() + message.len();
        let write = |out: &mut [u8]| {
            let (facts, bytes) = out.split_at_mut(HEADER);
            message.facts.write_to(facts);
            let (head_out, rest) = bytes.split_at_mut(head.len());
            if !head.is_empty() {
                head_out.copy_from_slice(head);
            }
            message.write_to(rest);
        };
        let class = CLASSES.partition_point(|&size| size < HEADER + len);
        if class < CLASSES.len() {
            let c = &mut self.classes[class];
            if let Some(slot) = c.take() {
                write(&mut c.bytes_mut(slot)[..HEADER + len]);
                return MessageRef::new(class as u32, slot, len);
            }
        }
        let mut boxed: Box<[u8]> = vec![0; HEADER + len].into_boxed_slice();
        write(&mut boxed);
        let slot = match self.large_free.pop() {
            Some(slot) => {
                self.large[slot as usize] = Some(boxed);
                slot
            }
            None => {
                self.large.push(Some(boxed));
                (self.large.len() - 1) as u32
            }
        };
        MessageRef::new(LARGE, slot, len)
    }

    pub fn get(&self, r: MessageRef) -> &[u8] {
        &self.slot(r)[HEADER..]
    }

    /// The message and its facts.
    pub fn get_with_facts(&self, r: MessageRef) -> (MessageFacts, &[u8]) {
        let (facts, message) = self.slot(r).split_at(HEADER);
        (MessageFacts::read_from(facts), message)
    }

    /// The facts and the message.
    fn slot(&self, r: MessageRef) -> &[u8] {
        match self.classes.get(r.class()) {
            Some(c) => &c.bytes(r.slot())[..HEADER + r.len as usize],
            None => self.large[r.slot() as usize]
                .as_deref()
                .unwrap_or(&[0; HEADER]),
        }
    }

    pub fn release(&mut self, r: MessageRef) {
        match self.classes.get_mut(r.class()) {
            Some(c) => c.free.push(r.slot()),
            None => {
                self.large[r.slot() as usize] = None;
                self.large_free.push(r.slot());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_every_size_and_reuses_freed_slots() {
        let mut store = MessageStore::default();
        let sizes = [0, 1, 64, 65, 200, 4096, 16384, 16385, 100_000];
        let refs: Vec<_> = sizes
            .iter()
            .map(|&n| store.put(&vec![(n % 251) as u8; n]))
            .collect();
        for (&n, &r) in sizes.iter().zip(&refs) {
            assert_eq!(store.get(r), &vec![(n % 251) as u8; n][..], "size {n}");
        }
        store.release(refs[4]);
        let again = store.put(&[7; 190]);
        assert_eq!(
            again.slot(),
            refs[4].slot(),
            "a freed slot of the class is reused first"
        );
        assert_eq!(store.get(again), &[7; 190][..]);
        store.release(refs[8]);
        let big = store.put(&[1; 70_000]);
        assert_eq!(store.get(big).len(), 70_000);
    }

    #[test]
    fn each_message_keeps_its_facts() {
        let mut store = MessageStore::default();
        let q = crate::dns::tests::query(&["a", "test"], 1);
        let mut message = vec![0x52, q.len() as u8];
        message.extend_from_slice(&q);
        let fields = crate::dnstap::scan_message(&message).unwrap();
        let facts = MessageFacts::of(&message, &fields, crate::dnstap::Role::ClientQuery, &[]);
        assert_ne!(facts, MessageFacts::default());
        let with = store.put(Encoded {
            facts,
            ..Encoded::from(&message)
        });
        let without = store.put(&message);
        let large = store.put(&[9; 20_000]);
        assert_eq!(store.get_with_facts(large).0, MessageFacts::default());
        assert_eq!(store.get_with_facts(with), (facts, &message[..]));
        assert_eq!(
            store.get_with_facts(without),
            (MessageFacts::default(), &message[..])
        );
    }

    #[test]
    fn a_message_stored_without_a_field_is_the_message_cut_then_stored() {
        let mut store = MessageStore::default();
        let q = crate::dns::tests::query(&["a", "test"], 1);
        let mut message = vec![0x10, 0x01, 0x52, q.len() as u8];
        message.extend_from_slice(&q);
        message.extend_from_slice(&[0x18, 0x05]);
        let fields = crate::dnstap::scan_message(&message).unwrap();
        let facts = MessageFacts::of(&message, &fields, crate::dnstap::Role::ClientQuery, &[]);
        let (field, _) = facts.query_field(&message).unwrap();
        assert_eq!(field, 2..4 + q.len());
        for extra in [&b""[..], b"pod=a"] {
            let encoded = Encoded {
                message: &message,
                extra,
                facts,
            };
            let cut = store.put_without(encoded, field.clone());
            let mut rest = message[..field.start].to_vec();
            rest.extend_from_slice(&message[field.end..]);
            let expected = store.put(Encoded {
                message: &rest,
                extra,
                facts: facts.without(field.clone()),
            });
            assert_eq!(store.get_with_facts(cut), store.get_with_facts(expected));
            assert_eq!(&store.get(cut)[..rest.len()], &rest[..]);
        }
    }

    #[test]
    fn many_messages_span_pages() {
        let mut store = MessageStore::default();
        let refs: Vec<_> = (0..5000u32)
            .map(|i| store.put(&i.to_be_bytes().repeat(30)))
            .collect();
        for (i, r) in refs.iter().enumerate() {
            assert_eq!(store.get(*r), &(i as u32).to_be_bytes().repeat(30)[..]);
        }
    }
}
