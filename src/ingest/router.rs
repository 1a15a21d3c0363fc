//! Routes events to correlator shards by key, in batches. A full shard queue never blocks a
//! reader: the batch is dropped and counted, and the shard is told with the next batch it
//! gets. Files block instead (nothing is lost offline).

use crate::dnstap::{Encoded, Event, MessageSpan, StreamEnded};
use crate::metrics::{Discard, Metrics};
use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use smallvec::SmallVec;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// What a shard receives: events in stream order, in batches so the queue is touched once
/// per batch rather than once per message.
pub enum ShardInput {
    /// Boxed: the shard queue is an array of `--queue-capacity` slots (its bound in batches
    /// must let small batches through), so the slot's size is memory for every slot.
    Events(Box<Batch>),
    /// Sent to every shard after the stream's last batch, with the events for that shard
    /// dropped since the last batch that got through (the stream's last batch may be one).
    StreamEnded {
        ended: Arc<StreamEnded>,
        drops_before: u32,
    },
}

impl ShardInput {
    /// The events, for tests that look only at those.
    #[cfg(test)]
    pub(crate) fn into_batch(self) -> Option<Box<Batch>> {
        match self {
            Self::Events(batch) => Some(batch),
            Self::StreamEnded { .. } => None,
        }
    }
}

/// Events and the read pieces their encoded messages are in. The reader copies nothing: the
/// shard copies each message it keeps from the piece into its store, and a piece's reference
/// count is touched once per batch, not per message (per message, it would bounce between the
/// reader's core and the shard's).
#[derive(Default)]
pub struct Batch {
    pub events: Vec<Event>,
    /// `MessageSpan::piece` indexes this.
    pub pieces: SmallVec<[Bytes; 2]>,
    /// The router's number of the last piece added.
    last_piece: u64,
    /// What it holds, as read mode's in-flight bound counts it: its events and their messages.
    bytes: usize,
    /// Read mode: the count this batch is in, until it is dropped (processed or not).
    in_flight: Option<Arc<InFlight>>,
}

impl Batch {
    fn with_capacity() -> Self {
        Self {
            events: Vec::with_capacity(BATCH),
            pieces: SmallVec::new(),
            last_piece: 0,
            bytes: 0,
            in_flight: None,
        }
    }

    fn piece(&self, span: MessageSpan) -> &[u8] {
        self.pieces.get(span.piece as usize).map_or(&[], |p| &p[..])
    }

    /// The encoded message of one of its events.
    pub fn message(&self, ev: &Event) -> Encoded<'_> {
        ev.message.of(self.piece(ev.message))
    }

    /// Hands each event with its message to `f`, in order. In place: an event is 248 bytes,
    /// and moving each out of the batch was ~2 % of a shard's time.
    pub fn each(mut self, mut f: impl FnMut(&mut Event, Encoded<'_>)) {
        let mut events = std::mem::take(&mut self.events);
        for ev in &mut events {
            let span = ev.message;
            f(ev, span.of(self.piece(span)));
        }
    }

    fn push(&mut self, mut ev: Event, piece: (u64, &Bytes)) {
        if self.last_piece != piece.0 || self.pieces.is_empty() {
            self.pieces.push(piece.1.clone());
            self.last_piece = piece.0;
        }
        ev.message.piece = (self.pieces.len() - 1) as u16;
        self.bytes += EVENT_BYTES + (ev.message.len + u32::from(ev.message.extra_len)) as usize;
        self.events.push(ev);
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(in_flight) = &self.in_flight {
            in_flight.release(self.bytes);
        }
    }
}

const EVENT_BYTES: usize = std::mem::size_of::<Event>();

/// Read mode's in-flight bytes between the reader and the shards: what the batches sent and
/// not yet dropped hold (events and messages). The reader waits while it is over
/// [`READ_IN_FLIGHT`]; a batch's drop gives its bytes back and wakes the reader.
pub struct InFlight {
    bytes: AtomicUsize,
    freed: (Sender<()>, Receiver<()>),
}

/// Read mode's bound on [`InFlight`]. The read pieces the messages lie in stay allocated while
/// a queued batch points into them: at most the bytes read since the oldest batch still
/// queued, about this bound times the share of the slowest shard, plus one read buffer.
pub const READ_IN_FLIGHT: usize = 16 << 20;

impl InFlight {
    fn new() -> Self {
        Self {
            bytes: AtomicUsize::new(0),
            freed: crossbeam_channel::bounded(1),
        }
    }

    fn release(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Relaxed);
        // A wake-up already pending covers this one too.
        let _ = self.freed.0.try_send(());
    }

    /// Waits until `bytes` more fit under `budget` (or nothing is in flight), then counts them.
    fn admit(&self, bytes: usize, budget: usize) {
        loop {
            let now = self.bytes.load(Relaxed);
            if now == 0 || now + bytes <= budget {
                break;
            }
            // The timeout only guards against a shard that ends without dropping its queue.
            let _ = self
                .freed
                .1
                .recv_timeout(std::time::Duration::from_millis(100));
        }
        self.bytes.fetch_add(bytes, Relaxed);
    }
}

/// Events per batch; a reader sends partial batches at the end of every read.
pub const BATCH: usize = 128;

/// Events waiting in each shard's queue: readers add what they send, shards subtract what
/// they took. `--queue-capacity` bounds this count, whatever the batch sizes.
pub type QueueDepths = Arc<[AtomicU64]>;

/// The shard of a key among `shards`: multiply-shift, uniform without a division. Every
/// reader must pick the same shard for a key, so this depends on nothing else.
fn shard_of(key: u64, shards: usize) -> usize {
    (((key >> 32) * shards as u64) >> 32) as usize
}

/// Sends events to shards; one per reader thread.
pub struct Router {
    shards: Vec<Sender<ShardInput>>,
    depths: QueueDepths,
    capacity: u64,
    batches: Vec<Batch>,
    /// Events dropped per shard since the last batch that got through.
    pending_drops: Vec<u32>,
    /// Files apply backpressure instead of dropping: nothing is lost offline.
    blocking: bool,
    /// With backpressure, what is in flight is bounded in bytes (`in_flight_budget`) too.
    in_flight: Option<Arc<InFlight>>,
    in_flight_budget: usize,
    metrics: Arc<Metrics>,
    /// The read piece the events dispatched now point into, and its number.
    piece: Bytes,
    piece_number: u64,
}

impl Router {
    pub fn new(
        shards: Vec<Sender<ShardInput>>,
        depths: QueueDepths,
        capacity: usize,
        blocking: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        let n = shards.len();
        Self {
            shards,
            depths,
            capacity: capacity as u64,
            batches: (0..n).map(|_| Batch::with_capacity()).collect(),
            pending_drops: vec![0; n],
            blocking,
            in_flight: blocking.then(|| Arc::new(InFlight::new())),
            in_flight_budget: READ_IN_FLIGHT,
            metrics,
            piece: Bytes::new(),
            piece_number: 0,
        }
    }

    /// The events dispatched from now on have their messages in `piece`.
    pub fn begin_piece(&mut self, piece: Bytes) {
        self.piece = piece;
        self.piece_number += 1;
    }

    /// Routes `ev`, whose `message` span lies in the current piece.
    #[inline]
    pub fn dispatch(&mut self, ev: Event) {
        let shard = shard_of(ev.key, self.shards.len());
        self.batches[shard].push(ev, (self.piece_number, &self.piece));
        if self.batches[shard].events.len() >= BATCH {
            self.send(shard);
        }
    }

    /// Sends every partial batch (end of a read: don't hold events back at low rates).
    pub fn flush(&mut self) {
        for shard in 0..self.shards.len() {
            if !self.batches[shard].events.is_empty() {
                self.send(shard);
            }
        }
    }

    /// Tells every shard that a stream ended, after everything it sent. A shard that cannot
    /// take the notice now (its queue is full) stops waiting for the stream's clock once the
    /// stream has been silent for the idle lag, and hears of the drops with its next batch:
    /// nothing is lost, sessions wait a little longer.
    pub fn end_stream(&mut self, ended: StreamEnded) {
        self.flush();
        let ended = Arc::new(ended);
        for (shard, queue) in self.shards.iter().enumerate() {
            let notice = ShardInput::StreamEnded {
                ended: ended.clone(),
                drops_before: self.pending_drops[shard],
            };
            let sent = match self.blocking {
                true => queue.send(notice).is_ok(),
                false => queue.try_send(notice).is_ok(),
            };
            if sent {
                self.pending_drops[shard] = 0;
            }
        }
    }

    fn send(&mut self, shard: usize) {
        let mut batch = std::mem::replace(&mut self.batches[shard], Batch::with_capacity());
        let len = batch.events.len() as u32;
        // The shard learns of earlier drops before it sees anything that came after them.
        batch.events[0].drops_before = self.pending_drops[shard];
        if let Some(in_flight) = &self.in_flight {
            in_flight.admit(batch.bytes, self.in_flight_budget);
            batch.in_flight = Some(in_flight.clone());
        }
        match self.enqueue(shard, ShardInput::Events(Box::new(batch)), len as u64) {
            Ok(()) => self.pending_drops[shard] = 0,
            Err(why) => {
                self.pending_drops[shard] = self.pending_drops[shard].saturating_add(len);
                self.metrics.discard(why, len as u64);
            }
        }
    }

    /// Puts a batch of `len` events on a shard's queue, or says why it could not.
    fn enqueue(&self, shard: usize, input: ShardInput, len: u64) -> Result<(), Discard> {
        let depth = &self.depths[shard];
        if !self.blocking && depth.load(Relaxed) + len > self.capacity {
            return Err(Discard::QueueFull);
        }
        depth.fetch_add(len, Relaxed);
        let sent = if self.blocking {
            self.shards[shard]
                .send(input)
                .map_err(|_| Discard::QueueDisconnected)
        } else {
            self.shards[shard].try_send(input).map_err(|e| match e {
                TrySendError::Full(_) => Discard::QueueFull,
                TrySendError::Disconnected(_) => Discard::QueueDisconnected,
            })
        };
        if sent.is_err() {
            depth.fetch_sub(len, Relaxed);
        }
        sent
    }
}

#[cfg(test)]
impl Router {
    /// Read mode's in-flight bound set to `bytes`, and the count it applies to.
    fn with_in_flight_budget(mut self, bytes: usize) -> (Self, Arc<InFlight>) {
        self.in_flight_budget = bytes;
        let in_flight = self.in_flight.clone().expect("a blocking router");
        (self, in_flight)
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dnstap::{Role, SenderProfile};
    use crossbeam_channel::{bounded, Receiver};

    fn event(key: u64) -> Event {
        Event::for_tests(SenderProfile::CoreDns, Role::ClientQuery, key, None, None)
    }

    /// Routes `ev` with `message`, read as a piece of its own.
    fn dispatch(router: &mut Router, mut ev: Event, message: &[u8]) {
        router.begin_piece(Bytes::copy_from_slice(message));
        ev.message.len = message.len() as u32;
        router.dispatch(ev);
    }

    /// A key that lands on `shard` of `n`.
    fn key_for(shard: usize, n: usize) -> u64 {
        let key = (((shard as u64) << 32) / n as u64 + 1) << 32;
        assert_eq!(shard_of(key, n), shard);
        key
    }

    struct Rig {
        router: Router,
        queues: Vec<Receiver<ShardInput>>,
        depths: QueueDepths,
        metrics: Arc<Metrics>,
    }

    /// `n` shards whose channels hold `slots` batches, `capacity` queued events, and mode.
    fn rig(n: usize, slots: usize, capacity: usize, blocking: bool) -> Rig {
        let (senders, queues) = (0..n).map(|_| bounded(slots)).unzip();
        let depths: QueueDepths = (0..n).map(|_| AtomicU64::new(0)).collect();
        let metrics = Arc::new(Metrics::default());
        let router = Router::new(senders, depths.clone(), capacity, blocking, metrics.clone());
        Rig {
            router,
            queues,
            depths,
            metrics,
        }
    }

    fn received(q: &Receiver<ShardInput>) -> Vec<Batch> {
        q.try_iter()
            .filter_map(ShardInput::into_batch)
            .map(|b| *b)
            .collect()
    }

    #[test]
    fn shard_choice_is_deterministic_and_spreads_keys_evenly() {
        let hasher = crate::dns::key_hasher();
        for n in [1, 2, 3, 8, 13] {
            let mut counts = vec![0u32; n];
            for i in 0..13_000u64 {
                let key = hasher.hash_one(i);
                let shard = shard_of(key, n);
                assert_eq!(shard, shard_of(key, n));
                counts[shard] += 1;
            }
            let fair = 13_000 / n as u32;
            for (s, &c) in counts.iter().enumerate() {
                assert!(
                    c > fair * 9 / 10 && c < fair * 11 / 10,
                    "{n} shards: {s} got {c}"
                );
            }
        }
        assert_eq!(shard_of(0, 4), 0);
        assert_eq!(shard_of(u64::MAX, 4), 3);
    }

    #[test]
    fn events_go_out_in_batches_of_128_with_their_messages() {
        let mut r = rig(2, 16, 1 << 20, false);
        let k = key_for(1, 2);
        for i in 0..BATCH + 5 {
            dispatch(&mut r.router, event(k), &[i as u8; 3]);
        }
        assert!(received(&r.queues[0]).is_empty());
        let batches = received(&r.queues[1]);
        assert_eq!(batches.len(), 1, "a full batch goes at once");
        assert_eq!(batches[0].events.len(), BATCH);
        assert_eq!(batches[0].message(&batches[0].events[7]).message, [7; 3]);
        assert_eq!(r.depths[1].load(Relaxed), BATCH as u64);
        r.router.flush();
        let rest = received(&r.queues[1]);
        assert_eq!(rest.len(), 1, "flush sends the partial batch");
        assert_eq!(rest[0].events.len(), 5);
        assert_eq!(
            rest[0].message(&rest[0].events[0]).message,
            [BATCH as u8; 3]
        );
        r.router.flush();
        assert!(received(&r.queues[1]).is_empty(), "nothing to flush");
    }

    /// Every shard hears of a stream's end after the events it sent before.
    #[test]
    fn a_stream_end_follows_the_streams_events_on_every_shard() {
        let mut r = rig(2, 8, 1000, false);
        dispatch(&mut r.router, event(key_for(1, 2)), b"m");
        let ended = StreamEnded {
            stream: crate::dnstap::StreamId(7),
            sources: vec![(crate::dnstap::SourceId(3), 2)],
        };
        r.router.end_stream(ended.clone());
        let kinds = |q: &Receiver<ShardInput>| -> Vec<String> {
            q.try_iter()
                .map(|i| match i {
                    ShardInput::Events(b) => format!("{} events", b.events.len()),
                    ShardInput::StreamEnded {
                        ended: e,
                        drops_before,
                    } => {
                        assert_eq!(*e, ended);
                        format!("end after {drops_before} drops")
                    }
                })
                .collect()
        };
        assert_eq!(kinds(&r.queues[0]), ["end after 0 drops"]);
        assert_eq!(kinds(&r.queues[1]), ["1 events", "end after 0 drops"]);

        // The stream's last batch did not fit: the notice carries its drops, once.
        let mut r = rig(2, 8, 2, false);
        for _ in 0..3 {
            dispatch(&mut r.router, event(key_for(0, 2)), b"m");
        }
        r.router.end_stream(ended.clone());
        r.router.end_stream(ended.clone());
        let expected = ["end after 3 drops", "end after 0 drops"];
        assert_eq!(kinds(&r.queues[0]), expected);
    }

    #[test]
    fn a_full_queue_drops_counts_and_tells_the_next_batch() {
        let mut r = rig(2, 16, 10, false);
        let (k0, k1) = (key_for(0, 2), key_for(1, 2));
        for _ in 0..8 {
            dispatch(&mut r.router, event(k0), b"m");
        }
        r.router.flush();
        for _ in 0..3 {
            dispatch(&mut r.router, event(k0), b"m");
        }
        dispatch(&mut r.router, event(k1), b"m");
        r.router.flush();
        assert_eq!(r.metrics.discarded(Discard::QueueFull), 3, "8 + 3 > 10");
        assert_eq!(received(&r.queues[1])[0].events[0].drops_before, 0);
        let first = received(&r.queues[0]);
        assert_eq!(first.len(), 1);
        assert_eq!(r.depths[0].load(Relaxed), 8);
        // The shard takes its events; the next batch gets through and carries the drops.
        r.depths[0].fetch_sub(8, Relaxed);
        dispatch(&mut r.router, event(k0), b"m");
        dispatch(&mut r.router, event(k0), b"m");
        r.router.flush();
        let next = received(&r.queues[0]);
        assert_eq!(next[0].events[0].drops_before, 3);
        assert_eq!(next[0].events[1].drops_before, 0);
        dispatch(&mut r.router, event(k0), b"m");
        r.router.flush();
        assert_eq!(
            received(&r.queues[0])[0].events[0].drops_before,
            0,
            "told once"
        );
        assert_eq!(r.metrics.discarded(Discard::QueueDisconnected), 0);
    }

    #[test]
    fn a_full_channel_counts_as_queue_full_and_restores_the_depth() {
        let mut r = rig(1, 1, 1 << 20, false);
        for _ in 0..2 {
            dispatch(&mut r.router, event(0), b"m");
            r.router.flush();
        }
        assert_eq!(r.metrics.discarded(Discard::QueueFull), 1);
        assert_eq!(r.depths[0].load(Relaxed), 1, "only the batch that got in");
    }

    #[test]
    fn a_disconnected_queue_counts_queue_disconnected() {
        for blocking in [false, true] {
            let mut r = rig(1, 4, 1 << 20, blocking);
            r.queues.clear();
            dispatch(&mut r.router, event(0), b"m");
            dispatch(&mut r.router, event(0), b"m");
            r.router.flush();
            assert_eq!(
                r.metrics.discarded(Discard::QueueDisconnected),
                2,
                "{blocking}"
            );
            assert_eq!(r.metrics.discarded(Discard::QueueFull), 0);
            assert_eq!(r.depths[0].load(Relaxed), 0);
        }
    }

    /// Read mode: the reader waits for the shards while the batches it sent hold more than
    /// the bound, whatever the queue's capacity in events.
    #[test]
    fn blocking_mode_bounds_what_is_in_flight_in_bytes() {
        let r = rig(1, 1 << 20, 1 << 30, true);
        let per_event = EVENT_BYTES + 100;
        let budget = 4 * BATCH * per_event;
        let (mut router, in_flight) = r.router.with_in_flight_budget(budget);
        let queue = r.queues.into_iter().next().unwrap();
        let shard = std::thread::spawn(move || {
            let (mut held, mut most, mut events, mut waits) = (Vec::new(), 0, 0, 0);
            for b in queue.iter().filter_map(ShardInput::into_batch) {
                most = most.max(in_flight.bytes.load(Relaxed));
                events += b.events.len();
                held.push(b);
                // Hold batches until the reader has to wait for room, then let them all go.
                if queue.is_empty() && in_flight.bytes.load(Relaxed) + BATCH * per_event > budget {
                    waits += 1;
                    held.clear();
                }
            }
            (most, events, waits)
        });
        for i in 0..100 * BATCH as u64 {
            dispatch(&mut router, event(i << 40), &[0; 100]);
        }
        drop(router);
        let (most, events, waits) = shard.join().unwrap();
        assert_eq!(events, 100 * BATCH);
        assert!(most <= budget, "{most} bytes in flight, bound {budget}");
        assert!(waits > 10, "the reader waited for room {waits} times");
    }

    #[test]
    fn blocking_mode_waits_for_the_shard_and_never_drops() {
        let mut r = rig(1, 1, 1, true);
        let queue = r.queues.pop().unwrap();
        let depths = r.depths.clone();
        let shard = std::thread::spawn(move || {
            let mut events = 0;
            for b in queue.iter().filter_map(ShardInput::into_batch) {
                depths[0].fetch_sub(b.events.len() as u64, Relaxed);
                events += b.events.len();
            }
            events
        });
        for i in 0..1000u64 {
            dispatch(&mut r.router, event(i << 40), b"m");
            if i % 7 == 0 {
                r.router.flush();
            }
        }
        let metrics = r.metrics.clone();
        drop(r.router); // flushes the rest and disconnects
        assert_eq!(shard.join().unwrap(), 1000);
        for d in Discard::ALL {
            assert_eq!(metrics.discarded(d), 0, "{}", d.name());
        }
    }
}
