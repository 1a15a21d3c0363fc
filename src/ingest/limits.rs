//! What senders may hold of the analyser, and the state all readers share to enforce it:
//! connection slots, a separate pool for connections still handshaking, limits per peer
//! address, the handshake deadline, idle connections reclaimed under pressure, and one memory
//! budget for partially received frames. docs/security.md lists them for operators.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limits one analyser process enforces on its Frame Streams connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Concurrent connections; over it a new one is refused unless an idle one makes room.
    pub max_connections: usize,
    /// READY/ACCEPT/START must be done within this.
    pub handshake_timeout: Duration,
    /// An established connection silent this long may be closed to make room for a new one.
    pub idle_timeout: Duration,
    /// Bytes of incomplete frames buffered over all connections.
    pub frame_buffer_budget: usize,
    /// Connections still in the Frame Streams (or TLS) handshake, a pool apart from the
    /// established ones: half-open connections cannot take the slots of senders.
    pub max_handshaking: usize,
    /// Handshaking connections one peer address may hold at once.
    pub handshakes_per_address: usize,
    /// Connections (handshaking or established) one peer address may hold at once.
    pub connections_per_address: usize,
    /// A peer address that held an established connection this recently is always let in
    /// (the identity idle timeout: a CoreDNS pod that redials).
    pub known_for: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
            frame_buffer_budget: 64 << 20,
            max_handshaking: 256,
            handshakes_per_address: 8,
            connections_per_address: 64,
            known_for: Duration::from_secs(600),
        }
    }
}

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `--max-connections` established and none idle for `--idle-timeout`.
    Connections,
    /// `--max-handshaking` connections are in their handshake.
    Handshaking,
    /// The peer address holds `--handshakes-per-address` handshaking connections.
    AddressHandshakes,
    /// The peer address holds `--connections-per-address` connections.
    AddressConnections,
}

/// Connections a known address gets past full pools: its old connection and the redial
/// (CoreDNS redials while its stalled connection is still open). The pools are overcommitted
/// by at most this many per known address.
const KNOWN_SLOTS: usize = 2;

/// What one peer address holds now.
#[derive(Debug, Default, Clone, Copy)]
struct AddressLoad {
    handshaking: u32,
    established: u32,
}

/// Connections by peer address, and the addresses that recently had an established one.
#[derive(Debug, Default)]
struct AddressBook {
    load: hashbrown::HashMap<IpAddr, AddressLoad>,
    /// When each address last had an established connection (at most `max_connections * 4`
    /// addresses, the stalest forgotten first).
    known: hashbrown::HashMap<IpAddr, Instant>,
}

impl AddressBook {
    /// Whether `ip` is a sender the pools must not lock out: it had an established
    /// connection within `known_for` and holds fewer than `KNOWN_SLOTS` connections now.
    fn is_known(&self, ip: IpAddr, now: Instant, known_for: Duration) -> bool {
        let load = self.load.get(&ip).copied().unwrap_or_default();
        let recent = load.established > 0
            || self
                .known
                .get(&ip)
                .is_some_and(|t| now.saturating_duration_since(*t) < known_for);
        recent && ((load.handshaking + load.established) as usize) < KNOWN_SLOTS
    }

    fn remember(&mut self, ip: IpAddr, now: Instant, cap: usize) {
        if self.known.len() >= cap && !self.known.contains_key(&ip) {
            // Rare (a cap's worth of addresses came and went): forget the stalest.
            if let Some(stalest) = self.known.iter().min_by_key(|(_, t)| **t).map(|(a, _)| *a) {
                self.known.remove(&stalest);
            }
        }
        self.known.insert(ip, now);
    }

    fn change(&mut self, ip: IpAddr, f: impl FnOnce(&mut AddressLoad)) {
        let load = self.load.entry(ip).or_default();
        f(load);
        if load.handshaking == 0 && load.established == 0 {
            self.load.remove(&ip);
        }
    }
}

/// No established connection on that reader.
const NONE: u64 = u64::MAX;

/// Connection state shared by every reader thread.
pub struct Slots {
    pub limits: ConnectionLimits,
    open: AtomicUsize,
    /// Of `open`, the connections still handshaking.
    handshaking: AtomicUsize,
    /// Per peer address; taken once per connection accepted, established or closed.
    addresses: Mutex<AddressBook>,
    partial_bytes: AtomicUsize,
    epoch: Instant,
    /// Per reader: when its longest-idle established connection last received bytes
    /// (milliseconds since `epoch`), republished by the reader every sweep.
    idlest: Box<[AtomicU64]>,
    next_reader: AtomicUsize,
}

impl Slots {
    pub fn new(limits: ConnectionLimits, readers: usize) -> Self {
        Self {
            limits,
            open: AtomicUsize::new(0),
            handshaking: AtomicUsize::new(0),
            addresses: Mutex::default(),
            partial_bytes: AtomicUsize::new(0),
            epoch: Instant::now(),
            idlest: (0..readers.max(1)).map(|_| AtomicU64::new(NONE)).collect(),
            next_reader: AtomicUsize::new(0),
        }
    }

    /// The index of a new reader; the first one is the acceptor.
    pub(crate) fn join(&self) -> usize {
        let i = self.next_reader.fetch_add(1, Relaxed);
        assert!(
            i < self.idlest.len(),
            "more readers than Slots::new was told"
        );
        i
    }

    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    /// Connections past their handshake.
    pub fn established(&self) -> usize {
        self.open().saturating_sub(self.handshaking.load(Relaxed))
    }

    pub(crate) fn at_limit(&self) -> bool {
        self.established() >= self.limits.max_connections
    }

    fn book(&self) -> std::sync::MutexGuard<'_, AddressBook> {
        self.addresses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a new connection from `ip` may start its handshake: the handshaking pool and
    /// the address's share of it, then the established pool (`make_room` may free a slot of
    /// an idle connection). An address that held an established connection within
    /// `known_for` (a CoreDNS pod redialing) is always let in: no flood of half-open or
    /// talking connections from elsewhere can lock it out. Takes the slot on success.
    pub(crate) fn admit(
        &self,
        ip: Option<IpAddr>,
        now: Instant,
        make_room: impl FnOnce() -> bool,
    ) -> Result<(), Refusal> {
        let known = {
            let book = self.book();
            if let Some(ip) = ip {
                let load = book.load.get(&ip).copied().unwrap_or_default();
                if load.handshaking as usize >= self.limits.handshakes_per_address {
                    return Err(Refusal::AddressHandshakes);
                }
                let held = (load.handshaking + load.established) as usize;
                if held >= self.limits.connections_per_address {
                    return Err(Refusal::AddressConnections);
                }
            }
            ip.is_some_and(|ip| book.is_known(ip, now, self.limits.known_for))
        };
        if !known {
            if self.handshaking.load(Relaxed) >= self.limits.max_handshaking {
                return Err(Refusal::Handshaking);
            }
            // Not under the lock: making room closes a connection, which updates the book.
            if self.at_limit() && !make_room() {
                return Err(Refusal::Connections);
            }
        }
        if let Some(ip) = ip {
            self.book().change(ip, |l| l.handshaking += 1);
        }
        self.handshaking.fetch_add(1, Relaxed);
        self.open.fetch_add(1, Relaxed);
        Ok(())
    }

    /// A connection from `ip` finished its handshake.
    pub(crate) fn established_from(&self, ip: Option<IpAddr>, now: Instant) {
        self.handshaking.fetch_sub(1, Relaxed);
        if let Some(ip) = ip {
            let mut book = self.book();
            book.change(ip, |l| {
                l.handshaking -= 1;
                l.established += 1;
            });
            let cap = self.limits.max_connections.saturating_mul(4).max(64);
            book.remember(ip, now, cap);
        }
    }

    /// A connection from `ip` closed, `established` or still handshaking.
    pub(crate) fn closed(&self, ip: Option<IpAddr>, established: bool, now: Instant) {
        self.open.fetch_sub(1, Relaxed);
        if !established {
            self.handshaking.fetch_sub(1, Relaxed);
        }
        if let Some(ip) = ip {
            let mut book = self.book();
            book.change(ip, |l| match established {
                true => l.established -= 1,
                false => l.handshaking -= 1,
            });
            if established {
                let cap = self.limits.max_connections.saturating_mul(4).max(64);
                book.remember(ip, now, cap);
            }
        }
    }

    /// Bytes of incomplete frames buffered now, over all readers.
    pub fn partial_bytes(&self) -> usize {
        self.partial_bytes.load(Relaxed)
    }

    /// A connection's partial frame went from `was` to `now` bytes; returns the new total.
    pub(crate) fn partial_changed(&self, was: usize, now: usize) -> usize {
        if now >= was {
            self.partial_bytes.fetch_add(now - was, Relaxed) + (now - was)
        } else {
            self.partial_bytes.fetch_sub(was - now, Relaxed) - (was - now)
        }
    }

    pub(crate) fn over_budget(&self, total: usize) -> bool {
        total > self.limits.frame_buffer_budget
    }

    /// Over budget, only a connection holding more than this is closed: then the total can
    /// only exceed the budget through connections that hold more than an equal share.
    pub(crate) fn fair_share(&self) -> usize {
        self.limits.frame_buffer_budget / self.limits.max_connections.max(1)
    }

    pub(crate) fn publish_idlest(&self, reader: usize, last_active: Option<Instant>) {
        let ms = last_active.map_or(NONE, |t| self.millis(t));
        self.idlest[reader].store(ms, Relaxed);
    }

    /// The reader whose longest-idle connection has been silent for at least the idle timeout,
    /// taken off the board so that the next caller does not pick the same connection.
    pub(crate) fn claim_idlest(&self, now: Instant) -> Option<usize> {
        let (reader, since) = self
            .idlest
            .iter()
            .map(|a| a.load(Relaxed))
            .enumerate()
            .min_by_key(|(_, since)| *since)?;
        let idle_ms = self.millis(now).checked_sub(since)?;
        if since == NONE || idle_ms < self.limits.idle_timeout.as_millis() as u64 {
            return None;
        }
        self.idlest[reader]
            .compare_exchange(since, NONE, Relaxed, Relaxed)
            .ok()
            .map(|_| reader)
    }

    fn millis(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(readers: usize) -> Slots {
        let limits = ConnectionLimits {
            max_connections: 4,
            idle_timeout: Duration::from_secs(10),
            frame_buffer_budget: 4000,
            ..Default::default()
        };
        Slots::new(limits, readers)
    }

    #[test]
    fn the_longest_idle_reader_is_claimed_once() {
        let s = slots(2);
        let t0 = s.epoch + Duration::from_secs(1);
        s.publish_idlest(0, Some(t0 + Duration::from_secs(5)));
        s.publish_idlest(1, Some(t0));
        assert_eq!(
            s.claim_idlest(t0 + Duration::from_secs(9)),
            None,
            "too early"
        );
        let later = t0 + Duration::from_secs(16);
        assert_eq!(s.claim_idlest(later), Some(1));
        assert_eq!(s.claim_idlest(later), Some(0));
        assert_eq!(s.claim_idlest(later), None, "both claimed");
    }

    #[test]
    fn half_open_connections_have_a_pool_and_a_share_per_address_of_their_own() {
        let s = Slots::new(
            ConnectionLimits {
                max_connections: 2,
                max_handshaking: 3,
                handshakes_per_address: 2,
                ..Default::default()
            },
            1,
        );
        let now = s.epoch;
        let ip = |n: u8| Some(IpAddr::from([10, 0, 0, n]));
        let no_room = || false;
        assert_eq!(s.admit(ip(1), now, no_room), Ok(()));
        assert_eq!(s.admit(ip(1), now, no_room), Ok(()));
        assert_eq!(
            s.admit(ip(1), now, no_room),
            Err(Refusal::AddressHandshakes)
        );
        assert_eq!(s.admit(ip(2), now, no_room), Ok(()));
        assert_eq!(s.admit(ip(3), now, no_room), Err(Refusal::Handshaking));
        assert_eq!(s.established(), 0, "handshakes hold no established slot");
        // ip 2 finishes its handshake and leaves: it is known from now on.
        s.established_from(ip(2), now);
        s.closed(ip(2), true, now);
        s.admit(ip(4), now, no_room).unwrap();
        assert_eq!(
            s.admit(ip(2), now, no_room),
            Ok(()),
            "a known address gets in"
        );
        let later = now + s.limits.known_for;
        assert_eq!(s.admit(ip(2), later, no_room), Err(Refusal::Handshaking));
        assert_eq!(s.open(), 4);
    }

    #[test]
    fn partial_bytes_add_up_over_connections() {
        let s = slots(1);
        assert_eq!(s.partial_changed(0, 3000), 3000);
        assert_eq!(s.partial_changed(0, 2000), 5000);
        assert!(s.over_budget(5000));
        assert_eq!(s.partial_changed(3000, 0), 2000);
        assert_eq!(s.fair_share(), 1000);
    }
}
