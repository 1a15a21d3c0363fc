//! Loss bookkeeping: which sources have shown evidence of lost messages, and the per-stream
//! memory of recent client queries that lets in-order senders reveal it on arrival.

use crate::dnstap::{Event, Nanos, Role, SourceId};
use hashbrown::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

/// Slots `0..2^FIRST_BITS` live in chunk 0; chunk k holds the next `2^(FIRST_BITS + k)`.
const FIRST_BITS: u32 = 10;
/// Enough doubling chunks to cover every registry slot (`SourceId::MAX_SLOTS`).
const CHUNKS: usize = (SourceId::MAX_SLOTS.trailing_zeros() + 1 - FIRST_BITS) as usize;

/// Per-source sender-loss sequence numbers, shared by all readers and shards. A source's
/// number grows whenever loss becomes evident on it; sessions compare it over their lifetime.
///
/// Exactly one counter per registry slot, so per identity at any time (an identity that
/// reuses a reclaimed slot inherits its number, harmlessly: sessions compare it, never read it
/// absolutely). Counters live in chunks of doubling size, allocated when a slot in them
/// first shows loss, so memory follows `--max-identities`. Reading is lock-free
/// (one acquire load for the chunk, one relaxed load for the counter): readers read their
/// source's number for every message.
pub struct LossBoard {
    chunks: [OnceLock<Box<[AtomicU64]>>; CHUNKS],
}

impl Default for LossBoard {
    fn default() -> Self {
        Self {
            chunks: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

/// (chunk, index in it) of a source's counter.
fn locate(source: SourceId) -> (usize, usize) {
    let n = source.slot() as u64 + (1 << FIRST_BITS);
    let top = 63 - n.leading_zeros();
    ((top - FIRST_BITS) as usize, (n - (1 << top)) as usize)
}

impl LossBoard {
    /// Records evidence of loss on a source.
    pub fn bump(&self, source: SourceId) {
        let (chunk, i) = locate(source);
        let counters = self.chunks[chunk].get_or_init(|| {
            (0..1usize << (FIRST_BITS as usize + chunk))
                .map(|_| AtomicU64::new(0))
                .collect()
        });
        counters[i].fetch_add(1, Relaxed);
    }

    /// How often loss has become evident on a source so far.
    pub fn get(&self, source: SourceId) -> u64 {
        let (chunk, i) = locate(source);
        self.chunks[chunk].get().map_or(0, |c| c[i].load(Relaxed))
    }
}

/// CLIENT_QUERY keys seen recently on a stream, to notice orphans the moment they arrive
/// from senders that write in order (CoreDNS): an FR or CR whose CQ never came proves loss.
/// Two generations, each about one session timeout long, bound the memory; keys are kept as
/// 32-bit fingerprints (a collision can only hide an orphan, never invent one).
#[derive(Default)]
pub(crate) struct OpenQueries {
    current: HashMap<u32, u16>,
    previous: HashMap<u32, u16>,
    generation_start: Nanos,
}

fn fingerprint(key: u64) -> u32 {
    (key >> 32) as u32 ^ key as u32
}

impl OpenQueries {
    /// Starts a new generation once the current one is `span` old: what is still open in the
    /// previous one is forgotten (its sessions have timed out by now).
    pub(crate) fn rotate(&mut self, now: Nanos, span: Nanos) {
        if now.saturating_sub(self.generation_start) >= span {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear();
            self.generation_start = now;
        }
    }

    pub(crate) fn open(&mut self, key: u64) {
        let n = self.current.entry(fingerprint(key)).or_insert(0);
        *n = n.saturating_add(1);
    }

    pub(crate) fn contains(&self, key: u64) -> bool {
        let f = fingerprint(key);
        self.current.contains_key(&f) || self.previous.contains_key(&f)
    }

    /// Closes one query with this key; false if none was open.
    pub(crate) fn close(&mut self, key: u64) -> bool {
        let key = fingerprint(key);
        for map in [&mut self.current, &mut self.previous] {
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
                return true;
            }
        }
        false
    }
}

/// What a stream knows about one of its sources: its clock and its open client queries.
#[derive(Default)]
pub(crate) struct SourceTrack {
    watermark: Nanos,
    open: OpenQueries,
}

impl SourceTrack {
    /// Moves the source's clock forward to the event's time; returns the clock.
    pub(crate) fn advance(&mut self, event_time: Option<Nanos>) -> Nanos {
        self.watermark = self.watermark.max(event_time.unwrap_or(0));
        self.watermark
    }

    /// Whether this event proves that a message of its request was lost before it: from a
    /// sender that writes in order, a CR, FQ or FR whose CQ is not open. Other senders'
    /// orphans may just be early (their CQ can still come) and prove nothing here.
    pub(crate) fn reveals_loss(&mut self, ev: &Event, span: Nanos) -> bool {
        if !ev.profile.writes_in_order() || ev.question.is_none() {
            return false;
        }
        self.open.rotate(self.watermark, span);
        match ev.role {
            Role::ClientQuery => {
                self.open.open(ev.key);
                false
            }
            Role::ClientResponse => !self.open.close(ev.key),
            Role::UpstreamQuery | Role::UpstreamResponse => !self.open.contains(ev.key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::QuestionSummary;
    use crate::dnstap::SenderProfile;

    #[test]
    fn loss_on_one_identity_never_shows_on_another() {
        let board = LossBoard::default();
        board.bump(SourceId(5000));
        assert_eq!(board.get(SourceId(5000)), 1);
        assert_eq!(board.get(SourceId(5000 % 4096)), 0, "904 shares no counter");
        board.bump(SourceId(904));
        board.bump(SourceId(904));
        assert_eq!(board.get(SourceId(5000)), 1);
        assert_eq!(board.get(SourceId(904)), 2);
    }

    #[test]
    fn every_slot_has_its_own_counter_across_chunk_edges() {
        let board = LossBoard::default();
        let last = SourceId::MAX_SLOTS as u32 - 1;
        let ids: Vec<u32> = (0..11)
            .flat_map(|k| {
                let edge = (1u32 << (FIRST_BITS + k)) - (1 << FIRST_BITS);
                [edge.saturating_sub(1), edge, edge + 1]
            })
            .chain([last - 1, last])
            .filter(|&id| id <= last)
            .collect::<std::collections::BTreeSet<u32>>()
            .into_iter()
            .collect();
        let mut seen = std::collections::HashSet::new();
        for &id in &ids {
            let (chunk, i) = locate(SourceId(id));
            assert!(
                chunk < CHUNKS && i < 1 << (FIRST_BITS as usize + chunk),
                "id {id}"
            );
            assert!(seen.insert((chunk, i)), "id {id} shares a counter");
        }
        for (n, &id) in ids.iter().take(20).enumerate() {
            for _ in 0..=n {
                board.bump(SourceId(id));
            }
        }
        for (n, &id) in ids.iter().take(20).enumerate() {
            assert_eq!(board.get(SourceId(id)), n as u64 + 1, "id {id}");
        }
        assert_eq!(board.get(SourceId(1 << 19)), 0, "untouched chunk reads 0");
        // Any u32 is a valid id: its generation bits select no other counter.
        let before = board.get(SourceId(last));
        board.bump(SourceId(u32::MAX));
        assert_eq!(board.get(SourceId(last)), before + 1);
    }

    #[test]
    fn open_queries_close_once_per_open_and_survive_one_rotation() {
        let mut q = OpenQueries::default();
        q.open(7);
        q.open(7);
        assert!(q.contains(7) && !q.contains(8));
        assert!(q.close(7) && q.contains(7), "opened twice");
        assert!(q.close(7) && !q.contains(7));
        assert!(!q.close(7), "none left");
        q.open(9);
        q.rotate(100, 100);
        assert!(q.contains(9), "kept for one more generation");
        q.open(10);
        q.rotate(150, 100);
        assert!(q.contains(9) && q.contains(10), "generation not over yet");
        q.rotate(200, 100);
        assert!(!q.contains(9), "two generations old");
        assert!(q.close(10), "closes from the previous generation");
        assert!(!q.contains(10));
    }

    fn event(role: Role, profile: SenderProfile, key: u64, with_wire: bool) -> Event {
        let question = with_wire.then_some(QuestionSummary {
            id: 1,
            is_response: role.is_response(),
            rcode: 0,
            qname_hash: 42,
            qtype: 1,
            qclass: 1,
        });
        Event::for_tests(profile, role, key, question, Some(1))
    }

    #[test]
    fn orphans_reveal_loss_only_from_in_order_senders() {
        let span = 10_000_000_000;
        let mut track = SourceTrack::default();
        let coredns = |role, key| event(role, SenderProfile::CoreDns, key, true);
        assert!(!track.reveals_loss(&coredns(Role::ClientQuery, 1), span));
        assert!(!track.reveals_loss(&coredns(Role::UpstreamQuery, 1), span));
        assert!(!track.reveals_loss(&coredns(Role::UpstreamResponse, 1), span));
        assert!(!track.reveals_loss(&coredns(Role::ClientResponse, 1), span));
        assert!(
            track.reveals_loss(&coredns(Role::ClientResponse, 1), span),
            "CR twice"
        );
        assert!(track.reveals_loss(&coredns(Role::UpstreamResponse, 2), span));
        for profile in [
            SenderProfile::Unbound,
            SenderProfile::Bind,
            SenderProfile::Unknown,
        ] {
            for role in [
                Role::ClientResponse,
                Role::UpstreamQuery,
                Role::UpstreamResponse,
            ] {
                let ev = event(role, profile, 3, true);
                assert!(!track.reveals_loss(&ev, span), "{profile:?} {role:?}");
            }
        }
        let no_wire = event(Role::ClientResponse, SenderProfile::CoreDns, 4, false);
        assert!(
            !track.reveals_loss(&no_wire, span),
            "no question, no key to check"
        );
    }

    #[test]
    fn queries_older_than_two_generations_are_forgotten() {
        let span = 10;
        let mut track = SourceTrack::default();
        let ev = |role| event(role, SenderProfile::CoreDns, 5, true);
        track.advance(Some(1));
        assert!(!track.reveals_loss(&ev(Role::ClientQuery), span));
        track.advance(Some(15));
        assert!(!track.reveals_loss(&ev(Role::UpstreamQuery), span));
        track.advance(Some(30));
        assert!(track.reveals_loss(&ev(Role::UpstreamResponse), span));
        assert_eq!(track.advance(Some(3)), 30, "the clock never goes back");
    }
}
