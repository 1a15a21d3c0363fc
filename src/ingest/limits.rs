//! What senders may hold of the analyser, and the state all readers share to enforce it:
//! connection slots, the handshake deadline, idle connections reclaimed under pressure, and one
//! memory budget for partially received frames. docs/security.md lists them for operators.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
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
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
            frame_buffer_budget: 64 << 20,
        }
    }
}

/// No established connection on that reader.
const NONE: u64 = u64::MAX;

/// Connection state shared by every reader thread.
pub struct Slots {
    pub limits: ConnectionLimits,
    open: AtomicUsize,
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

    pub(crate) fn at_limit(&self) -> bool {
        self.open() >= self.limits.max_connections
    }

    pub(crate) fn opened(&self) {
        self.open.fetch_add(1, Relaxed);
    }

    pub(crate) fn closed(&self) {
        self.open.fetch_sub(1, Relaxed);
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
    fn partial_bytes_add_up_over_connections() {
        let s = slots(1);
        assert_eq!(s.partial_changed(0, 3000), 3000);
        assert_eq!(s.partial_changed(0, 2000), 5000);
        assert!(s.over_budget(5000));
        assert_eq!(s.partial_changed(3000, 0), 2000);
        assert_eq!(s.fair_share(), 1000);
    }
}
