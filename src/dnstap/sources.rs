//! Senders: interned once per stream so events carry a small id. A sender is an identity
//! *at a peer address*: two connections from one address under one identity (a CoreDNS pod
//! that redials keeps its pod IP) are one sender and continue each other's state; the same
//! identity from another address is another sender, whose loss evidence, clock and sessions
//! never touch the first's (docs/security.md, "Who is a sender").
//!
//! Identities are chosen by senders, so their number is bounded (`max`, `--max-identities`) and
//! the ones nobody uses any more are reclaimed: an identity is referenced by every stream that
//! tracks it ([`SourceRegistry::acquire`] / [`SourceRegistry::release`]); once no stream does,
//! it is kept for `idle` more (its sessions still leave the shards and are rendered with its
//! name), then its slot may be reused. A reused slot gets a new generation, so a `SourceId`
//! never names two identities: sessions of the old one never join events of the new one.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Interned sender: an identity (the dnstap identity, or the peer address when it is empty)
/// at a peer address; a slot of the registry and the generation of that slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId(pub u32);

/// Bits of a `SourceId` that name the slot; the rest count its reuses.
const SLOT_BITS: u32 = 20;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;

impl SourceId {
    /// The most identities a registry can hold at once.
    pub const MAX_SLOTS: usize = 1 << SLOT_BITS;

    fn new(slot: u32, generation: u32) -> Self {
        Self(generation << SLOT_BITS | slot)
    }

    /// The registry slot: below `MAX_SLOTS`, shared by the identities that reuse it in turn.
    pub fn slot(self) -> usize {
        (self.0 & SLOT_MASK) as usize
    }

    fn generation(self) -> u32 {
        self.0 >> SLOT_BITS
    }
}

/// A new identity arrived while `--max-identities` were in use and none could be reclaimed
/// (or its connection had `--identities-per-connection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityLimit {
    pub max: usize,
    /// The limit of one connection rather than the registry's.
    pub per_connection: bool,
}

impl std::fmt::Display for IdentityLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, flag) = if self.per_connection {
            ("on this connection", "--identities-per-connection")
        } else {
            ("in use", "--max-identities")
        };
        write!(
            f,
            "{} sender identities {what} ({flag}): a new identity is refused",
            self.max
        )
    }
}

impl std::error::Error for IdentityLimit {}

/// Interns source names (identity, or peer address when the identity is empty) so events
/// carry a small id. Readers cache their lookups; the lock is taken once per new stream or
/// identity change, never per message.
#[derive(Debug)]
pub struct SourceRegistry {
    inner: Mutex<Interned>,
    max: usize,
    idle: Duration,
    /// Identities reclaimed so far: the metrics drop their label values when it moves.
    reclaims: AtomicU64,
}

impl Default for SourceRegistry {
    /// Room for every slot, reclaimed after 10 minutes unreferenced.
    fn default() -> Self {
        Self::new(SourceId::MAX_SLOTS, Duration::from_secs(600))
    }
}

#[derive(Debug, Default)]
struct Interned {
    /// Slots of live identities, found by their name's hash; the name itself is stored once,
    /// in the slot.
    by_name: hashbrown::HashTable<u32>,
    hasher: ahash::RandomState,
    slots: Vec<Slot>,
    /// Reclaimed slots, reused before new ones are added.
    free: Vec<u32>,
    /// Identities no stream references, about in the order they became so: at most one entry
    /// per slot (`Slot::queued`); an identity referenced again meanwhile is skipped, one
    /// released again later is queued anew.
    unreferenced: VecDeque<(Instant, SourceId)>,
    live: usize,
}

#[derive(Debug)]
struct Slot {
    /// The peer address the identity came from (none for files and unix sockets).
    peer: Option<IpAddr>,
    /// The name as printed (invalid UTF-8 replaced).
    name: Arc<str>,
    /// The name's bytes when they are not valid UTF-8 (otherwise `name` is exact).
    raw: Option<Box<[u8]>>,
    version: Arc<str>,
    generation: u32,
    /// Streams tracking the identity.
    refs: u32,
    /// When `refs` last fell to 0.
    unreferenced_since: Instant,
    /// Whether `Interned::unreferenced` holds an entry for it.
    queued: bool,
    live: bool,
    /// No stream references it, and the last one that did ended with the sender's STOP: a
    /// sender that shut down cleanly (a CoreDNS pod scaled down), not one that went silent.
    stopped: bool,
}

impl Slot {
    fn key(&self) -> &[u8] {
        self.raw.as_deref().unwrap_or(self.name.as_bytes())
    }
}

impl Interned {
    fn find(&self, peer: Option<IpAddr>, name: &[u8]) -> Option<u32> {
        let hash = self.hasher.hash_one((peer, name));
        self.by_name
            .find(hash, |&s| {
                let slot = &self.slots[s as usize];
                slot.peer == peer && slot.key() == name
            })
            .copied()
    }

    /// Frees the identities unreferenced for `idle` by `now`; returns how many.
    fn reclaim(&mut self, now: Instant, idle: Duration) -> u64 {
        let mut reclaimed = 0;
        while let Some(&(since, id)) = self.unreferenced.front() {
            if now.saturating_duration_since(since) < idle {
                return reclaimed;
            }
            self.unreferenced.pop_front();
            let slot = &mut self.slots[id.slot()];
            if !slot.live || slot.generation != id.generation() {
                continue;
            }
            slot.queued = false;
            if slot.refs > 0 {
                // Referenced again: queued anew when its last stream lets go.
                continue;
            }
            if now.saturating_duration_since(slot.unreferenced_since) < idle {
                slot.queued = true;
                let since = slot.unreferenced_since;
                self.unreferenced.push_back((since, id));
                continue;
            }
            let hash = self.hasher.hash_one((slot.peer, slot.key()));
            let index = id.slot() as u32;
            if let Ok(entry) = self.by_name.find_entry(hash, |&s| s == index) {
                entry.remove();
            }
            let slot = &mut self.slots[id.slot()];
            slot.live = false;
            slot.queued = false;
            slot.name = "".into();
            slot.raw = None;
            slot.version = "".into();
            self.free.push(index);
            self.live -= 1;
            reclaimed += 1;
        }
        reclaimed
    }
}

impl SourceRegistry {
    /// At most `max` identities at once (capped at `SourceId::MAX_SLOTS`); one no stream
    /// references is reclaimed after `idle`.
    pub fn new(max: usize, idle: Duration) -> Self {
        Self {
            inner: Mutex::default(),
            max: max.clamp(1, SourceId::MAX_SLOTS),
            idle,
            reclaims: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Interned> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The id of a source for a stream that will track it, and the version it announced (the
    /// latest one wins). Each success takes one reference, given back with `release`.
    pub fn acquire(
        &self,
        peer: Option<IpAddr>,
        name: &[u8],
        version: &[u8],
        now: Instant,
    ) -> Result<SourceId, IdentityLimit> {
        let mut g = self.lock();
        let version: Arc<str> = String::from_utf8_lossy(version).into();
        if let Some(index) = g.find(peer, name) {
            let slot = &mut g.slots[index as usize];
            slot.refs += 1;
            slot.stopped = false;
            if *slot.version != *version {
                slot.version = version;
            }
            return Ok(SourceId::new(index, slot.generation));
        }
        // New names are rare (a stream's first message, a pod restart): the moment to let go
        // of the ones nobody used for `idle`.
        let reclaimed = g.reclaim(now, self.idle);
        if reclaimed > 0 {
            self.reclaims.fetch_add(reclaimed, Relaxed);
        }
        if g.live >= self.max {
            return Err(IdentityLimit {
                max: self.max,
                per_connection: false,
            });
        }
        let text = String::from_utf8_lossy(name);
        let raw = (text.as_bytes() != name).then(|| name.into());
        let fresh = Slot {
            peer,
            name: text.into(),
            raw,
            version,
            generation: 0,
            refs: 1,
            unreferenced_since: now,
            queued: false,
            live: true,
            stopped: false,
        };
        let index = match g.free.pop() {
            Some(index) => {
                let slot = &mut g.slots[index as usize];
                let generation = (slot.generation + 1) & (u32::MAX >> SLOT_BITS);
                *slot = Slot {
                    generation,
                    ..fresh
                };
                index
            }
            None => {
                g.slots.push(fresh);
                (g.slots.len() - 1) as u32
            }
        };
        let hash = g.hasher.hash_one((peer, name));
        let Interned {
            by_name,
            slots,
            hasher,
            ..
        } = &mut *g;
        by_name.insert_unique(hash, index, |&s| {
            let slot = &slots[s as usize];
            hasher.hash_one((slot.peer, slot.key()))
        });
        g.live += 1;
        Ok(SourceId::new(index, g.slots[index as usize].generation))
    }

    /// The id registered for a name at a peer address, if any, taking no reference.
    pub fn lookup(&self, peer: Option<IpAddr>, name: &[u8]) -> Option<SourceId> {
        let g = self.lock();
        let index = g.find(peer, name)?;
        Some(SourceId::new(index, g.slots[index as usize].generation))
    }

    /// A stream no longer tracks the source. Unreferenced, it is reclaimed `idle` after `now`
    /// when room is needed.
    pub fn release(&self, id: SourceId, now: Instant) {
        self.release_as(id, now, false);
    }

    /// `release` by a stream that ended with the sender's STOP: the last one to let go
    /// marks the identity stopped (see `stopped`).
    pub fn release_stopped(&self, id: SourceId, now: Instant) {
        self.release_as(id, now, true);
    }

    fn release_as(&self, id: SourceId, now: Instant, stopped: bool) {
        let mut g = self.lock();
        let Some(slot) = g.slots.get_mut(id.slot()) else {
            return;
        };
        if !slot.live || slot.generation != id.generation() || slot.refs == 0 {
            return;
        }
        slot.refs -= 1;
        if slot.refs == 0 {
            slot.stopped = stopped;
            slot.unreferenced_since = now;
            if !slot.queued {
                slot.queued = true;
                g.unreferenced.push_back((now, id));
            }
        }
    }

    /// The id of a source, taking no reference (tests, tools): `acquire` then `release`.
    pub fn intern(&self, name: &[u8], version: &[u8]) -> SourceId {
        let now = Instant::now();
        match self.acquire(None, name, version, now) {
            Ok(id) => {
                self.release(id, now);
                id
            }
            Err(_) => SourceId(u32::MAX),
        }
    }

    /// (identity or peer name, version) of a source; empty for an id that is not (or no
    /// longer) registered.
    pub fn describe(&self, id: SourceId) -> (Arc<str>, Arc<str>) {
        let g = self.lock();
        match g.slots.get(id.slot()) {
            Some(s) if s.live && s.generation == id.generation() => {
                (s.name.clone(), s.version.clone())
            }
            _ => ("".into(), "".into()),
        }
    }

    /// Identities reclaimed since the registry was made: a change says label values may name
    /// identities that are gone.
    pub fn reclaims(&self) -> u64 {
        self.reclaims.load(Relaxed)
    }

    /// Which ids name a registered identity, as of now (see [`Liveness`]).
    pub fn liveness(&self) -> Liveness {
        let g = self.lock();
        Liveness(g.slots.iter().map(|s| (s.generation, s.live)).collect())
    }

    /// Every registered identity, and whether it is stopped: no stream carries it and the
    /// last one that did ended with the sender's STOP.
    pub fn stopped(&self) -> Vec<(SourceId, bool)> {
        let g = self.lock();
        let live = g.slots.iter().enumerate().filter(|(_, s)| s.live);
        live.map(|(i, s)| {
            (
                SourceId::new(i as u32, s.generation),
                s.refs == 0 && s.stopped,
            )
        })
        .collect()
    }

    /// Identities registered now (referenced, or unreferenced and not reclaimed yet).
    pub fn len(&self) -> usize {
        self.lock().live
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Slots ever allocated: what the registry's memory follows.
    pub fn capacity_used(&self) -> usize {
        self.lock().slots.len()
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// A registry's slots at one moment: (generation, live) by slot.
#[derive(Debug, Clone, Default)]
pub struct Liveness(Vec<(u32, bool)>);

impl Liveness {
    /// False for an id whose identity was reclaimed. An id registered after the snapshot
    /// (a new slot, or the next generation of a reclaimed one) counts as live.
    pub fn is_live(&self, id: SourceId) -> bool {
        let Some(&(generation, live)) = self.0.get(id.slot()) else {
            return true;
        };
        let next = (generation + 1) & (u32::MAX >> SLOT_BITS);
        (id.generation() == generation && live) || id.generation() == next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_their_id_and_the_latest_version_wins() {
        let r = SourceRegistry::default();
        let a = r.intern(b"pod-a", b"CoreDNS-1.10.1");
        let b = r.intern(b"pod-b", b"CoreDNS-1.10.1");
        assert_ne!(a, b);
        assert_eq!(r.intern(b"pod-a", b"CoreDNS-1.11.3"), a);
        assert_eq!(r.describe(a), ("pod-a".into(), "CoreDNS-1.11.3".into()));
        assert_eq!(r.describe(SourceId(99)), ("".into(), "".into()));
    }

    #[test]
    fn a_sender_is_an_identity_at_an_address() {
        let r = SourceRegistry::default();
        let t0 = Instant::now();
        let pod = Some(IpAddr::from([10, 0, 0, 7]));
        let other = Some(IpAddr::from([10, 0, 0, 66]));
        let a = r.acquire(pod, b"coredns", b"", t0).unwrap();
        assert_eq!(
            r.acquire(pod, b"coredns", b"", t0),
            Ok(a),
            "a redial from the pod's address continues its state"
        );
        let b = r.acquire(other, b"coredns", b"", t0).unwrap();
        assert_ne!(
            a, b,
            "the same identity from another address is another sender"
        );
        assert_eq!(
            r.describe(a).0,
            r.describe(b).0,
            "both print as the identity"
        );
        assert_eq!(r.lookup(other, b"coredns"), Some(b));
        assert_eq!(r.lookup(None, b"coredns"), None);
    }

    #[test]
    fn names_that_are_not_utf8_stay_distinct() {
        let r = SourceRegistry::default();
        let a = r.intern(b"pod\xff", b"");
        let b = r.intern(b"pod\xfe", b"");
        assert_ne!(a, b, "both print as pod\u{FFFD}");
        assert_eq!(r.intern(b"pod\xff", b""), a);
        assert_eq!(&*r.describe(b).0, "pod\u{FFFD}");
    }

    #[test]
    fn identities_beyond_the_limit_are_refused_until_one_is_reclaimed() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(60);
        let r = SourceRegistry::new(2, idle);
        let a = r.acquire(None, b"a", b"", t0).unwrap();
        let b = r.acquire(None, b"b", b"", t0).unwrap();
        assert_eq!(
            r.acquire(None, b"c", b"", t0),
            Err(IdentityLimit {
                max: 2,
                per_connection: false
            })
        );
        assert_eq!(
            r.acquire(None, b"a", b"", t0),
            Ok(a),
            "a known name is never refused"
        );
        r.release(a, t0);
        r.release(a, t0);
        let later = t0 + idle;
        assert_eq!(
            r.acquire(None, b"c", b"", t0 + idle / 2),
            Err(IdentityLimit {
                max: 2,
                per_connection: false
            }),
            "unreferenced, but not for long enough"
        );
        let c = r.acquire(None, b"c", b"", later).unwrap();
        assert_eq!(c.slot(), a.slot(), "a's slot is reused");
        assert_ne!(c, a, "with a new generation: the old id names nothing now");
        assert_eq!(r.describe(a), ("".into(), "".into()));
        assert_eq!(&*r.describe(c).0, "c");
        assert_eq!(&*r.describe(b).0, "b", "b is still referenced");
        r.release(a, later);
        assert_eq!(&*r.describe(c).0, "c", "a stale release touches nothing");
        assert_eq!((r.len(), r.capacity_used()), (2, 2));
    }

    #[test]
    fn an_identity_is_stopped_when_its_last_stream_ended_with_stop() {
        let t0 = Instant::now();
        let r = SourceRegistry::new(4, Duration::from_secs(60));
        let stopped = |id| r.stopped().into_iter().find(|&(i, _)| i == id).map(|s| s.1);
        let a = r.acquire(None, b"a", b"", t0).unwrap();
        let redial = r.acquire(None, b"a", b"", t0).unwrap();
        assert_eq!(stopped(a), Some(false), "streams carry it");
        r.release_stopped(a, t0);
        assert_eq!(stopped(a), Some(false), "another stream still carries it");
        r.release(redial, t0);
        assert_eq!(
            stopped(a),
            Some(false),
            "the last stream ended without STOP"
        );
        r.acquire(None, b"a", b"", t0).unwrap();
        r.release_stopped(a, t0);
        assert_eq!(stopped(a), Some(true), "the last stream ended with STOP");
        r.acquire(None, b"a", b"", t0).unwrap();
        assert_eq!(stopped(a), Some(false), "carried again");
        r.release(a, t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(r.reclaims(), 0);
        r.acquire(None, b"b", b"", later).unwrap();
        assert_eq!(r.reclaims(), 1);
        assert_eq!(stopped(a), None, "reclaimed: gone");
    }

    #[test]
    fn liveness_tells_reclaimed_ids_from_new_ones() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(1);
        let r = SourceRegistry::new(1, idle);
        let a = r.acquire(None, b"a", b"", t0).unwrap();
        r.release(a, t0);
        let before = r.liveness();
        assert!(before.is_live(a));
        let b = r.acquire(None, b"b", b"", t0 + idle).unwrap();
        assert_eq!(b.slot(), a.slot());
        assert!(before.is_live(b), "registered after the snapshot: live");
        let after = r.liveness();
        assert!(!after.is_live(a), "reclaimed");
        assert!(after.is_live(b));
        assert!(after.is_live(SourceId::new(5, 0)), "a slot made later");
    }

    #[test]
    fn an_identity_referenced_again_is_not_reclaimed() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(1);
        let r = SourceRegistry::new(1, idle);
        let a = r.acquire(None, b"a", b"", t0).unwrap();
        r.release(a, t0);
        assert_eq!(r.acquire(None, b"a", b"", t0), Ok(a));
        assert!(r.acquire(None, b"b", b"", t0 + 2 * idle).is_err());
        r.release(a, t0 + 2 * idle);
        assert!(
            r.acquire(None, b"b", b"", t0 + 2 * idle + idle / 2)
                .is_err(),
            "unreferenced for half its idle time only"
        );
        assert!(r.acquire(None, b"b", b"", t0 + 3 * idle).is_ok());
    }

    #[test]
    fn a_hundred_thousand_passing_identities_take_bounded_memory() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(10);
        let r = SourceRegistry::new(1000, idle);
        let mut refused = 0;
        for i in 0..100_000u32 {
            let now = t0 + Duration::from_millis(i as u64);
            match r.acquire(None, format!("pod-{i}").as_bytes(), b"CoreDNS-1.10.1", now) {
                Ok(id) => r.release(id, now),
                Err(_) => refused += 1,
            }
        }
        // One new identity per ms, each idle 10 s before its slot is reused: 1000 slots are
        // always full, so only those arriving when a slot had just come free got one.
        assert!(r.len() <= 1000 && r.capacity_used() <= 1000);
        assert!(refused > 0 && refused < 100_000, "{refused}");
        let live = r.len();
        let g = r.lock();
        assert!(g.unreferenced.len() <= 1000);
        assert_eq!(g.by_name.len(), live);
    }
}
