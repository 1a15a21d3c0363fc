//! Joins events into sessions: a pure state machine, one per shard. Events in, finished
//! sessions out; time is the senders' event time, plus a wall clock only to flush streams
//! that went silent.

mod expiry;
mod session;
mod store;
mod table;

pub use session::{BitMap, Incomplete, LossReason, Message, Session, Status, Verdict};
pub use store::{MessageRef, MessageStore};

use crate::dnstap::{
    Encoded, Event, Nanos, PeerKey, Recollection, Role, SourceId, StreamEnded, StreamId,
};
use expiry::{Due, ExpiryQueue};
use hashbrown::{HashMap, HashSet};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::Range;
use std::time::{Duration, Instant};
use table::{SessionTable, SlotId, MAX_SLOTS};

/// Event times past this (about the year 2116) are taken as no time at all: a sender clock
/// there would saturate deadlines and run its source's expiry far ahead of every real event.
/// With times and waits bounded, every deadline is below `Nanos::MAX`, which flush uses.
pub const LATEST_EVENT_TIME: Nanos = 1 << 62;
/// The longest wait a configuration may give a session.
const LONGEST_WAIT: Nanos = 1 << 62;
/// A silent stream's clock is assumed to advance with the wall clock, lagging this much:
/// CoreDNS holds frames in a 4 KB buffer, so at low rates they arrive seconds late.
pub const IDLE_LAG: Duration = Duration::from_secs(5);
/// A stream this far behind its source's leading stream holds nothing back: a sender cannot
/// keep its identity's sessions open with one connection's broken clock.
const STREAM_SKEW_LIMIT: Nanos = 60_000_000_000;
/// Ticks come every 100 ms; a gap this long between two is the analyser's own stall (SIGSTOP,
/// a starved node), not the streams' silence: their frames piled up unread meanwhile.
const OWN_STALL: Duration = Duration::from_secs(1);
/// Stream clocks kept per source (a sender's connections at once: CoreDNS has one, two while
/// it redials); the per-event cost stays that of a short list.
const MAX_STREAMS_PER_SOURCE: usize = 8;
/// How long an answered-locally CoreDNS session waits for evidence of loss around it.
const LOSS_HOLD: Nanos = 1_000_000_000;
/// Messages kept per session; a retry storm beyond this is counted, not stored.
const MAX_MESSAGES: usize = 64;
/// Match scores: lower wins. An exact join (same query_time, or the FR of an open attempt)
/// beats every time-distance score; a fallback (an orphan's leg, an FR pairing with no open
/// attempt) loses to any plausible time-distance match.
const EXACT_MATCH: u64 = 0;
const FALLBACK_MATCH: u64 = 1 << 62;

#[derive(Debug, Clone)]
pub struct Config {
    pub session_timeout: Nanos,
    pub orphan_grace: Nanos,
    pub max_sessions: usize,
    /// Flush silent streams by the wall clock (serving); off when reading files.
    pub idle_flush: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            session_timeout: 10_000_000_000,
            orphan_grace: 2_000_000_000,
            max_sessions: 2_000_000,
            idle_flush: true,
        }
    }
}

/// Per-source clock and expiry order, as this shard sees the source.
struct SourceClock {
    /// The sender's clock: the latest event time on its streams when our latest event left.
    watermark: Nanos,
    /// When that watermark last advanced, for the idle flush.
    advanced_at: Instant,
    /// The clock of each stream that carried the source recently: usually one.
    streams: Vec<StreamClock>,
    /// The latest sender-loss sequence seen on the source.
    loss_seq: u64,
    /// (deadline, slot, slot generation); entries of finished or rescheduled sessions go
    /// stale and are skipped.
    expiry: ExpiryQueue<Due>,
    /// Sessions of the source in the table.
    open: u32,
    /// The peer address the sender sends from (one per source: see `SourceRegistry`).
    peer: PeerKey,
    /// When the source's latest event arrived, to forget sources that went quiet.
    seen_at: Instant,
    /// Whether the source has an entry in `Correlator::retiring`.
    retire_queued: bool,
}

/// One stream's clock for a source, as this shard sees it.
struct StreamClock {
    stream: StreamId,
    watermark: Nanos,
    advanced_at: Instant,
}

impl SourceClock {
    /// The clock sessions expire by: the slowest of the source's streams still moving. A
    /// sender's second connection (CoreDNS redials when the first stalls) must not expire
    /// sessions whose remaining messages, or the evidence that they were lost, are still
    /// unread on the first. A stream silent for `IDLE_LAG`, or `STREAM_SKEW_LIMIT` behind,
    /// holds nothing back.
    fn expiry_clock(&self, now: Instant) -> Nanos {
        // The usual case, one stream that is the source's clock: nothing to compare.
        if let [only] = self.streams.as_slice() {
            if only.watermark >= self.watermark {
                return self.watermark;
            }
        }
        let slowest = self.moving_streams(now).map(|s| s.watermark).min();
        let floor = self.watermark.saturating_sub(STREAM_SKEW_LIMIT);
        slowest.map_or(self.watermark, |w| w.max(floor))
    }

    /// The streams whose clock advanced within `IDLE_LAG`: the ones that hold expiry back.
    fn moving_streams(&self, now: Instant) -> impl Iterator<Item = &StreamClock> {
        self.streams
            .iter()
            .filter(move |s| now.saturating_duration_since(s.advanced_at) < IDLE_LAG)
    }

    fn advance_stream(&mut self, stream: StreamId, watermark: Nanos, now: Instant) {
        if let Some(s) = self.streams.iter_mut().find(|s| s.stream == stream) {
            if watermark > s.watermark {
                s.watermark = watermark;
                s.advanced_at = now;
            }
            return;
        }
        // Streams that hold nothing back any more make room (closed ones left already); one
        // identity spread over many connections holds back by its slowest few at most.
        self.streams
            .retain(|s| now.saturating_duration_since(s.advanced_at) < IDLE_LAG);
        if self.streams.len() >= MAX_STREAMS_PER_SOURCE {
            let slowest = (0..self.streams.len()).min_by_key(|&i| self.streams[i].watermark);
            self.streams.swap_remove(slowest.unwrap_or(0));
        }
        self.streams.push(StreamClock {
            stream,
            watermark,
            advanced_at: now,
        });
    }
}

/// Where a finished session goes. Its messages' bytes are in `store` until the call returns.
pub trait SessionSink {
    fn session(&mut self, session: &Session, verdict: Verdict, store: &MessageStore);
}

impl<F: FnMut(&Session, Verdict, &MessageStore)> SessionSink for F {
    fn session(&mut self, session: &Session, verdict: Verdict, store: &MessageStore) {
        self(session, verdict, store)
    }
}

pub struct Correlator {
    cfg: Config,
    table: SessionTable,
    sources: HashMap<SourceId, SourceClock>,
    /// Sources with open sessions: the only ones the idle flush has to look at.
    busy: HashSet<SourceId>,
    /// The source a full table evicts from, and how many more sessions before its address is
    /// down to an equal share and the choice is made again.
    evict_from: Option<(SourceId, u32)>,
    /// Reused when choosing: per peer address, its open sessions and its busiest source.
    peer_load: HashMap<PeerKey, (u32, SourceId, u32)>,
    /// Sources without open sessions, by the arrival of their latest event: each is forgotten
    /// once quiet for the session timeout plus `IDLE_LAG`, so identities that come and go
    /// (pod restarts) don't accumulate.
    retiring: BinaryHeap<Reverse<(Instant, SourceId)>>,
    /// Reused by the idle flush.
    idle: Vec<(SourceId, Nanos)>,
    /// The previous idle-flush tick, to tell our own stalls from silent streams.
    last_tick: Option<Instant>,
    /// Messages no session could take (the table was full and held nothing to evict).
    discarded: u64,
    /// Grows each time the analyser dropped events bound for this shard.
    drop_epoch: u32,
    upstream_hasher: ahash::RandomState,
    store: MessageStore,
}

impl Correlator {
    pub fn new(mut cfg: Config) -> Self {
        cfg.max_sessions = cfg.max_sessions.min(MAX_SLOTS);
        cfg.session_timeout = cfg.session_timeout.min(LONGEST_WAIT);
        cfg.orphan_grace = cfg.orphan_grace.min(LONGEST_WAIT);
        Self {
            cfg,
            table: SessionTable::default(),
            sources: HashMap::new(),
            busy: HashSet::new(),
            evict_from: None,
            peer_load: HashMap::new(),
            retiring: BinaryHeap::new(),
            idle: Vec::new(),
            last_tick: None,
            discarded: 0,
            drop_epoch: 0,
            upstream_hasher: crate::dns::key_hasher(),
            store: MessageStore::default(),
        }
    }

    pub fn open_sessions(&self) -> usize {
        self.table.len()
    }

    /// Sources whose clock this shard keeps: those with open sessions or recent events.
    pub fn tracked_sources(&self) -> usize {
        self.sources.len()
    }

    /// Messages discarded since the last call because no session could take them.
    pub fn take_discarded(&mut self) -> u64 {
        std::mem::take(&mut self.discarded)
    }

    /// Joins one event; `message` is its encoded dnstap.Message, kept if a session takes it.
    pub fn on_event<'a>(
        &mut self,
        ev: &mut Event,
        message: impl Into<crate::dnstap::Encoded<'a>>,
        now: Instant,
        sink: &mut impl SessionSink,
    ) {
        self.handle(ev, message.into(), now, sink);
    }

    /// `message` is copied into the store once, by the session that takes it.
    fn handle(
        &mut self,
        ev: &mut Event,
        message: Encoded<'_>,
        now: Instant,
        sink: &mut impl SessionSink,
    ) {
        if ev.drops_before > 0 {
            self.drop_epoch = self.drop_epoch.wrapping_add(1);
        }
        ev.query_time = ev.query_time.filter(|&t| t <= LATEST_EVENT_TIME);
        ev.response_time = ev.response_time.filter(|&t| t <= LATEST_EVENT_TIME);
        let stream_clock = (ev.watermark <= LATEST_EVENT_TIME).then_some(ev.watermark);
        let clock = self
            .sources
            .entry(ev.source)
            .or_insert_with(|| SourceClock {
                watermark: 0,
                advanced_at: now,
                streams: Vec::new(),
                loss_seq: 0,
                expiry: ExpiryQueue::default(),
                open: 0,
                peer: ev.peer,
                seen_at: now,
                retire_queued: false,
            });
        clock.seen_at = now;
        let t = ev.time().or(stream_clock).unwrap_or(clock.watermark);
        let watermark = stream_clock.unwrap_or(0).max(t);
        if watermark > clock.watermark {
            clock.watermark = watermark;
            clock.advanced_at = now;
        }
        clock.advance_stream(ev.stream, watermark, now);
        clock.loss_seq = clock.loss_seq.max(ev.loss_seq);
        let source = ev.source;
        match ev.role {
            Role::ClientQuery => self.on_client_query(ev, message, t, sink),
            Role::ClientResponse => self.on_client_response(ev, message, t, sink),
            Role::UpstreamQuery | Role::UpstreamResponse => self.on_upstream(ev, message, t, sink),
        }
        self.expire_by_streams(source, now, sink);
        if self.sources.get(&source).is_some_and(|c| c.open == 0) {
            self.queue_retirement(source);
        }
    }

    /// A stream ended: it holds its sources' clocks back no more, and the sessions it leaves
    /// open learn whether its end was evidence of loss (or the analyser dropped events of
    /// this shard just before: `drops_before`) before they expire.
    pub fn on_stream_end(
        &mut self,
        ended: &StreamEnded,
        drops_before: u32,
        now: Instant,
        sink: &mut impl SessionSink,
    ) {
        if drops_before > 0 {
            self.drop_epoch = self.drop_epoch.wrapping_add(1);
        }
        for &(source, loss_seq) in &ended.sources {
            let Some(c) = self.sources.get_mut(&source) else {
                continue;
            };
            c.loss_seq = c.loss_seq.max(loss_seq);
            c.streams.retain(|s| s.stream != ended.stream);
            self.expire_by_streams(source, now, sink);
        }
    }

    /// Emits what the source's streams have all passed (see `SourceClock::expiry_clock`).
    fn expire_by_streams(&mut self, source: SourceId, now: Instant, sink: &mut impl SessionSink) {
        if let Some(clock) = self.sources.get(&source).map(|c| c.expiry_clock(now)) {
            self.expire(source, clock, sink);
        }
    }

    /// Emits what the silent streams' clocks have passed (wall-clock idle flush). A silent
    /// source has no more events to tell us about loss, so `loss_seq` (the ingest's view)
    /// is consulted directly.
    pub fn on_tick(
        &mut self,
        now: Instant,
        loss_seq: impl Fn(SourceId) -> u64,
        sink: &mut impl SessionSink,
    ) {
        if let Some(gap) = self
            .last_tick
            .replace(now)
            .map(|t| now.saturating_duration_since(t))
        {
            if gap > OWN_STALL {
                self.forgive_stall(gap, now);
            }
        }
        if self.cfg.idle_flush {
            let mut idle = std::mem::take(&mut self.idle);
            idle.clear();
            for id in &self.busy {
                let Some(c) = self.sources.get_mut(id) else {
                    continue;
                };
                // A slower stream still moving holds the source; its events expire it.
                if c.moving_streams(now).next().is_some() {
                    continue;
                }
                let Some(silent) = now
                    .saturating_duration_since(c.advanced_at)
                    .checked_sub(IDLE_LAG)
                else {
                    continue;
                };
                c.loss_seq = c.loss_seq.max(loss_seq(*id));
                let silent = Nanos::try_from(silent.as_nanos()).unwrap_or(Nanos::MAX);
                idle.push((*id, c.watermark.saturating_add(silent)));
            }
            for &(source, clock) in &idle {
                self.expire(source, clock, sink);
            }
            self.idle = idle;
        }
        self.retire_quiet_sources(now);
    }

    /// The analyser stood still for `gap`: no stream was read, so none fell silent meanwhile.
    /// Their silence counts from now on, minus what they had before the stall, so what the
    /// reader finds in the piled-up frames (a stream's end, the loss it reveals) comes first.
    fn forgive_stall(&mut self, gap: Duration, now: Instant) {
        let forgiven = |at: &mut Instant| *at = at.checked_add(gap).map_or(now, |t| t.min(now));
        for c in self.sources.values_mut() {
            forgiven(&mut c.advanced_at);
            c.streams
                .iter_mut()
                .for_each(|s| forgiven(&mut s.advanced_at));
        }
    }

    /// Forgets the sources without open sessions that sent nothing for the session timeout
    /// plus `IDLE_LAG` of wall clock. One that comes back starts a fresh clock; it had nothing
    /// open that the old clock could still expire.
    fn retire_quiet_sources(&mut self, now: Instant) {
        let quiet = Duration::from_nanos(self.cfg.session_timeout).saturating_add(IDLE_LAG);
        while let Some(&Reverse((seen_at, source))) = self.retiring.peek() {
            if now.saturating_duration_since(seen_at) < quiet {
                return;
            }
            self.retiring.pop();
            let Some(c) = self.sources.get_mut(&source) else {
                continue;
            };
            c.retire_queued = false;
            if c.open > 0 {
                // Busy again: queued anew when its last session ends.
                continue;
            }
            if now.saturating_duration_since(c.seen_at) >= quiet {
                self.sources.remove(&source);
            } else {
                self.queue_retirement(source);
            }
        }
    }

    /// Puts a source without open sessions in line to be forgotten.
    fn queue_retirement(&mut self, source: SourceId) {
        if let Some(c) = self.sources.get_mut(&source) {
            if !c.retire_queued {
                c.retire_queued = true;
                self.retiring.push(Reverse((c.seen_at, source)));
            }
        }
    }

    /// Counts a session opened for `source`.
    fn opened(&mut self, source: SourceId) {
        if let Some(c) = self.sources.get_mut(&source) {
            c.open += 1;
            if c.open == 1 {
                self.busy.insert(source);
            }
        }
    }

    /// Counts a session of `source` gone from the table.
    fn closed(&mut self, source: SourceId) {
        if let Some(c) = self.sources.get_mut(&source) {
            c.open = c.open.saturating_sub(1);
            if c.open == 0 {
                self.busy.remove(&source);
                self.queue_retirement(source);
            }
        }
    }

    /// Emits every pending session (end of input, shutdown).
    pub fn flush(&mut self, loss_seq: impl Fn(SourceId) -> u64, sink: &mut impl SessionSink) {
        let sources: Vec<SourceId> = self.sources.keys().copied().collect();
        for source in sources {
            if let Some(c) = self.sources.get_mut(&source) {
                c.loss_seq = c.loss_seq.max(loss_seq(source));
            }
            self.expire(source, Nanos::MAX, sink);
        }
    }

    fn on_client_query(
        &mut self,
        ev: &Event,
        message: Encoded<'_>,
        t: Nanos,
        sink: &mut impl SessionSink,
    ) {
        let client = self.client_hash(ev);
        // A sender that reorders (BIND) may have written this query's upstream leg or
        // response first: adopt such an orphan instead of opening a second session.
        let adopt = self.find(ev.key, |s| {
            !s.has(Role::ClientQuery) && s.source == ev.source && explains_orphan(ev, client, t, s)
        });
        let slot = match adopt {
            Some(slot) => slot,
            None => match self.insert(ev, t, sink) {
                Some(slot) => slot,
                None => return,
            },
        };
        let timeout = self.cfg.session_timeout.max(ev.profile.min_session_wait());
        let s = self.session_mut(slot);
        s.cq_time = ev.query_time.unwrap_or(0);
        s.client = client;
        s.first_time = s.first_time.min(t);
        if let Some(q) = ev.question {
            s.dns_id = Some(q.id);
        }
        let deadline = if s.has(Role::ClientResponse) {
            // Already answered: only the reorder grace remains.
            s.deadline
        } else {
            t.saturating_add(timeout)
        };
        self.push_message(slot, ev, message);
        self.reschedule(slot, deadline);
        if adopt.is_some() && self.session_mut(slot).has(Role::ClientResponse) {
            self.complete(slot, sink);
        }
    }

    fn on_client_response(
        &mut self,
        ev: &Event,
        message: Encoded<'_>,
        t: Nanos,
        sink: &mut impl SessionSink,
    ) {
        let client = self.client_hash(ev);
        let id = ev.question.map(|q| q.id);
        let found = self.find_best(ev.key, |s| {
            if s.source != ev.source || s.has(Role::ClientResponse) {
                return None;
            }
            if !s.has(Role::ClientQuery) {
                // An orphan upstream leg of the same request (its CQ was lost): join it.
                let same = s.dns_id.is_none_or(|d| Some(d) == id);
                return same.then_some(FALLBACK_MATCH);
            }
            // CoreDNS and dnsdist copy the CQ's query_time into the CR: an exact join.
            if let (Some(a), Some(b)) = (ev.query_time, s.cq_time()) {
                return (a == b).then_some(EXACT_MATCH);
            }
            let same_client = client == 0 || s.client == 0 || client == s.client;
            let cq = s.cq_time().unwrap_or(s.first_time);
            (same_client && id == s.dns_id && cq <= t.saturating_add(ev.profile.time_slack()))
                .then(|| t.saturating_sub(cq))
        });
        let slot = match found {
            Some(slot) => slot,
            None => match self.insert(ev, t, sink) {
                Some(slot) => {
                    let s = self.session_mut(slot);
                    s.client = client;
                    s.dns_id = id;
                    slot
                }
                None => return,
            },
        };
        self.push_message(slot, ev, message);
        let has_query = self
            .table
            .get(slot)
            .is_some_and(|s| s.has(Role::ClientQuery));
        if found.is_some() && has_query {
            self.complete(slot, sink);
        } else if found.is_none() {
            let grace = self.cfg.orphan_grace;
            self.reschedule(slot, t.saturating_add(grace));
        }
    }

    fn on_upstream(
        &mut self,
        ev: &Event,
        message: Encoded<'_>,
        t: Nanos,
        sink: &mut impl SessionSink,
    ) {
        let is_response = ev.role == Role::UpstreamResponse;
        let keeps_id = ev.profile.upstream_keeps_client_id();
        let id = ev.question.map(|q| q.id);
        let upstream = self.upstream_hash(ev);
        let found = self.find_best(ev.key, |s| {
            // Only senders that write CR before RR get upstream messages after the CR.
            let answered = s.has(Role::ClientResponse);
            if s.source != ev.source || (answered && (!s.completed || s.profile.writes_in_order()))
            {
                return None;
            }
            if keeps_id && s.dns_id.is_some() && id != s.dns_id {
                return None;
            }
            if is_response {
                // Prefer the session with an open attempt to this upstream at this time.
                let pairs = s.messages.iter().any(|m| {
                    m.role == Role::UpstreamQuery
                        && m.upstream == upstream
                        && (!keeps_id || m.time() == ev.query_time)
                });
                let open = s.upstream_queries > s.upstream_responses;
                return Some(if pairs && open {
                    EXACT_MATCH
                } else {
                    FALLBACK_MATCH
                });
            }
            let start = s.cq_time().unwrap_or(s.first_time);
            (start <= t.saturating_add(ev.profile.time_slack())).then(|| t.saturating_sub(start))
        });
        let slot = match found {
            Some(slot) => slot,
            None => match self.insert(ev, t, sink) {
                Some(slot) => {
                    self.session_mut(slot).dns_id = if keeps_id { id } else { None };
                    let grace = self.cfg.orphan_grace;
                    self.reschedule(slot, t.saturating_add(grace));
                    slot
                }
                None => return,
            },
        };
        let s = self.session_mut(slot);
        if is_response {
            if s.upstream_queries <= s.upstream_responses && s.has(Role::ClientQuery) {
                s.loss.get_or_insert(LossReason::UpstreamQueryMissing);
            }
            s.upstream_responses = s.upstream_responses.saturating_add(1);
        } else {
            s.upstream_queries = s.upstream_queries.saturating_add(1);
        }
        self.push_message(slot, ev, message);
        let s = self.session_mut(slot);
        if s.completed && s.upstream_responses >= s.upstream_queries {
            self.finish(slot, sink);
        }
    }

    /// CR arrived. Emit now, except in two cases that wait a little event time:
    /// - the sender writes CR before its upstream response (BIND) and an attempt is still
    ///   unanswered: wait the reorder grace for it;
    /// - CoreDNS answered without an upstream leg: a lost FQ+FR pair would look exactly like
    ///   this, and loss shows up only when the burst's orphans arrive, just after. Wait
    ///   `LOSS_HOLD` so that evidence still counts.
    fn complete(&mut self, slot: SlotId, sink: &mut impl SessionSink) {
        let grace = self.cfg.orphan_grace;
        let s = self.session_mut(slot);
        let in_order = s.profile.writes_in_order();
        if in_order && s.upstream_queries > 0 && s.upstream_responses == 0 {
            s.loss.get_or_insert(LossReason::UpstreamResponseMissing);
        }
        let hold = if !in_order && s.upstream_queries > s.upstream_responses {
            grace
        } else if in_order && s.upstream_queries == 0 {
            LOSS_HOLD
        } else {
            0
        };
        if hold == 0 || !s.has(Role::ClientQuery) {
            return self.finish(slot, sink);
        }
        s.completed = true;
        let cr_time = s
            .messages
            .last()
            .and_then(|m| m.time())
            .unwrap_or(s.first_time);
        let deadline = cr_time.max(s.first_time).saturating_add(hold);
        self.reschedule(slot, deadline);
    }

    /// Sockets are kept as 32-bit hashes (0 = none): only equality matters for matching.
    fn client_hash(&self, ev: &Event) -> u32 {
        ev.client
            .map_or(0, |c| (self.upstream_hasher.hash_one(c) as u32).max(1))
    }

    fn upstream_hash(&self, ev: &Event) -> u32 {
        self.upstream_hasher.hash_one(ev.upstream) as u32
    }

    fn find(&self, key: u64, mut pred: impl FnMut(&Session) -> bool) -> Option<SlotId> {
        self.find_best(key, |s| pred(s).then_some(EXACT_MATCH))
    }

    /// The candidate in the key's chain with the lowest score (None = not a candidate); ties
    /// go to the lowest slot.
    fn find_best(
        &self,
        key: u64,
        mut score: impl FnMut(&Session) -> Option<u64>,
    ) -> Option<SlotId> {
        self.table
            .candidates(key)
            .filter_map(|(slot, s)| score(s).map(|sc| (sc, slot)))
            .min()
            .map(|(_, slot)| slot)
    }

    /// Opens a session for this event. When the table is full, one session of the peer
    /// address holding the most is emitted first (`eviction_victim`); a message that still
    /// finds no room (the table holds no session at all) is counted in `discarded`.
    fn insert(&mut self, ev: &Event, t: Nanos, sink: &mut impl SessionSink) -> Option<SlotId> {
        if self.table.len() >= self.cfg.max_sessions {
            if let Some(victim) = self.eviction_victim() {
                self.session_mut(victim).loss = Some(LossReason::SessionTableFull);
                self.finish(victim, sink);
            }
        }
        if self.table.len() >= self.cfg.max_sessions {
            self.discarded += 1;
            return None;
        }
        let clock_seq = self.sources.get(&ev.source).map_or(0, |c| c.loss_seq);
        let mut session = Session::open(ev.source, ev.profile, ev.key, t, ev.question.is_some());
        session.loss_seq_at_open = ev.loss_seq.max(clock_seq);
        session.drop_epoch_at_open = self.drop_epoch;
        self.opened(ev.source);
        Some(self.table.insert(session))
    }

    /// The session a full table gives up: of the peer address holding the most open sessions
    /// (a flood evicts its own sessions first, however many identities it spreads over, and
    /// an honest pod keeps an equal share), of that address's busiest source, the one due
    /// first. The choice holds until the address is down to an equal share (or the source
    /// has nothing open), so a flood costs one scan of the busy sources per that many
    /// evictions, and the hot path keeps no count per address.
    fn eviction_victim(&mut self) -> Option<SlotId> {
        let chosen = self
            .evict_from
            .filter(|&(s, left)| left > 0 && self.sources.get(&s).is_some_and(|c| c.open > 0));
        let (source, left) = match chosen {
            Some(c) => c,
            None => self.choose_eviction_source()?,
        };
        self.evict_from = Some((source, left - 1));
        let c = self.sources.get_mut(&source)?;
        while let Some(due) = c.expiry.peek() {
            if self
                .table
                .is_live(due.slot(), due.generation(), due.deadline())
            {
                return Some(due.slot());
            }
            c.expiry.pop();
        }
        // Every open session has a deadline in its source's heap; this is only a fallback.
        self.table.oldest()
    }

    /// The busiest source of the address holding the most open sessions, and how many of its
    /// sessions the address holds beyond an equal share (at least 1).
    fn choose_eviction_source(&mut self) -> Option<(SourceId, u32)> {
        self.peer_load.clear();
        for id in &self.busy {
            let Some(c) = self.sources.get(id) else {
                continue;
            };
            let e = self.peer_load.entry(c.peer).or_insert((0, *id, 0));
            e.0 += c.open;
            if c.open > e.2 {
                (e.1, e.2) = (*id, c.open);
            }
        }
        let share = self.table.len() / self.peer_load.len().max(1);
        let &(held, source, _) = self.peer_load.values().max_by_key(|l| l.0)?;
        Some((source, (held as usize).saturating_sub(share).max(1) as u32))
    }

    fn session_mut(&mut self, slot: SlotId) -> &mut Session {
        self.table.get_mut(slot)
    }

    fn push_message(&mut self, slot: SlotId, ev: &Event, message: Encoded<'_>) {
        let upstream = if matches!(ev.role, Role::UpstreamQuery | Role::UpstreamResponse) {
            self.upstream_hash(ev)
        } else {
            0
        };
        let s = self.table.get_mut(slot);
        s.bitmap = s.bitmap.with(BitMap::of(ev.role));
        if ev.recalled != Recollection::Nothing {
            s.recalled = ev.recalled;
        }
        if s.qtype.is_none() {
            s.qtype = ev.question.map(|q| q.qtype);
        }
        if s.messages.len() >= MAX_MESSAGES {
            s.messages_dropped = s.messages_dropped.saturating_add(1);
            return;
        }
        let mut flags = if ev.has_extra { Message::EXTRA } else { 0 };
        if ev.time_rejected {
            flags |= Message::TIME_REJECTED;
        }
        let cq = s.messages.iter().find(|m| m.role == Role::ClientQuery);
        let query = match (ev.role, cq) {
            (Role::UpstreamQuery, Some(cq)) => query_of_cq(&self.store, cq.bytes, &message),
            _ => None,
        };
        let mut bytes = match query {
            Some(field) => {
                flags |= Message::QUERY_FROM_CQ;
                self.store.put_without(message, field)
            }
            None => self.store.put(message),
        };
        let repeat = s.messages.last().is_some_and(|prev| {
            prev.role == ev.role
                && prev.flags & Message::QUERY_FROM_CQ == flags & Message::QUERY_FROM_CQ
                && self.store.get(prev.bytes) == self.store.get(bytes)
        });
        if repeat {
            self.store.release(bytes);
            bytes = s.messages.last().map_or(bytes, |prev| prev.bytes);
            flags |= Message::REPEAT;
        }
        s.messages.push(Message {
            role: ev.role,
            rcode: ev.question.filter(|q| q.is_response).map(|q| q.rcode),
            time: if ev.role == Role::ClientResponse {
                ev.response_time.or(ev.query_time)
            } else {
                ev.query_time
            }
            .unwrap_or(0),
            upstream,
            bytes,
            flags,
        });
    }

    fn reschedule(&mut self, slot: SlotId, deadline: Nanos) {
        let generation = self.table.generation(slot);
        let s = self.session_mut(slot);
        if s.deadline == deadline {
            return;
        }
        s.deadline = deadline;
        let source = s.source;
        if let Some(c) = self.sources.get_mut(&source) {
            c.expiry.push(Due::new(deadline, slot, generation));
        }
    }

    /// Emits the source's sessions whose deadline `clock` has passed.
    fn expire(&mut self, source: SourceId, clock: Nanos, sink: &mut impl SessionSink) {
        loop {
            let Some(c) = self.sources.get_mut(&source) else {
                return;
            };
            let Some(due) = c.expiry.peek() else {
                return;
            };
            if due.deadline() > clock {
                return;
            }
            c.expiry.pop();
            if self
                .table
                .is_live(due.slot(), due.generation(), due.deadline())
            {
                self.finish(due.slot(), sink);
            }
        }
    }

    /// Hands the session to the sink with its verdict, then removes it from the table.
    fn finish(&mut self, slot: SlotId, sink: &mut impl SessionSink) {
        let Some(session) = self.table.get(slot) else {
            return;
        };
        let source = session.source;
        let loss_seq_now = self.sources.get(&source).map_or(0, |c| c.loss_seq);
        let evident = if self.drop_epoch != session.drop_epoch_at_open {
            Some(LossReason::AnalyserQueueFull)
        } else if loss_seq_now != session.loss_seq_at_open {
            Some(LossReason::SenderLoss)
        } else {
            None
        };
        let verdict = session.verdict(evident);
        sink.session(session, verdict, &self.store);
        for m in session
            .messages
            .iter()
            .filter(|m| m.flags & Message::REPEAT == 0)
        {
            self.store.release(m.bytes);
        }
        self.table.discard(slot);
        self.closed(source);
    }
}

/// An upstream query usually carries the client's query byte for byte; then it is stored
/// without it (about half its size): the query_message field of `fq` to leave out, if so.
fn query_of_cq(store: &MessageStore, cq: MessageRef, fq: &Encoded<'_>) -> Option<Range<usize>> {
    let (cq_facts, cq_bytes) = store.get_with_facts(cq);
    let (_, cq_value) = cq_facts.query_field(cq_bytes)?;
    let (fq_field, fq_value) = fq.facts.query_field(fq.message)?;
    let same = match (cq_bytes.get(cq_value), fq.message.get(fq_value)) {
        (Some(cq), Some(fq)) => cq == fq,
        _ => false,
    };
    (same && fq_field.end <= fq.message.len()).then_some(fq_field)
}

/// Whether a CQ explains an orphan opened by its own response or upstream leg.
fn explains_orphan(cq: &Event, client: u32, t: Nanos, orphan: &Session) -> bool {
    let slack = cq.profile.time_slack();
    let client_ok = orphan.client == 0 || orphan.client == client;
    let id_ok = orphan.dns_id.is_none() || orphan.dns_id == cq.question.map(|q| q.id);
    let cr_time_ok = orphan
        .messages
        .iter()
        .filter(|m| m.role == Role::ClientResponse)
        .all(|m| m.time().is_none_or(|rt| rt.saturating_add(slack) >= t));
    client_ok && id_ok && cr_time_ok && orphan.first_time.saturating_add(slack) >= t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::QuestionSummary;
    use crate::dnstap::SenderProfile;

    const S: Nanos = 1_000_000_000;
    const T0: Nanos = 1_700_000_000 * S;

    /// A CoreDNS-shaped event: `id` picks the request, `t` its event time.
    fn ev(
        role: Role,
        id: u16,
        query_time: Nanos,
        response_time: Option<Nanos>,
        rcode: u8,
    ) -> Event {
        Event {
            source: SourceId(1),
            stream: StreamId::default(),
            peer: PeerKey::default(),
            time_rejected: false,
            profile: SenderProfile::CoreDns,
            role,
            key: 1000 + id as u64,
            question: Some(QuestionSummary {
                id,
                is_response: role.is_response(),
                rcode,
                qname_hash: 7,
                qtype: 1,
                qclass: 1,
            }),
            query_time: Some(query_time),
            response_time,
            client: Some(([127, 0, 0, 1], 5000 + id).into()),
            upstream: matches!(role, Role::UpstreamQuery | Role::UpstreamResponse)
                .then(|| ([10, 0, 0, 2], 53).into()),
            protocol: None,
            recalled: Recollection::Nothing,
            has_extra: false,
            watermark: 0,
            loss_seq: 0,
            drops_before: 0,
            message: Default::default(),
        }
    }

    /// A sink that keeps every session it is given, with its verdict.
    fn keep(
        out: &mut Vec<(Session, Verdict)>,
    ) -> impl FnMut(&Session, Verdict, &MessageStore) + '_ {
        move |s, v, _| out.push((s.clone(), v))
    }

    struct Run {
        corr: Correlator,
        out: Vec<(Session, Verdict)>,
        now: Instant,
    }

    impl Run {
        fn new() -> Self {
            Self {
                corr: Correlator::new(Config::default()),
                out: Vec::new(),
                now: Instant::now(),
            }
        }
        fn feed(&mut self, mut e: Event) {
            let t = e.time().unwrap();
            e.watermark = t;
            self.corr
                .on_event(&mut e, &[], self.now, &mut keep(&mut self.out));
        }
        /// `e` on stream `stream`, whose clock `e` advances.
        fn feed_on(&mut self, stream: u32, mut e: Event) {
            e.stream = StreamId(stream);
            self.feed(e);
        }
        /// The wall-clock tick (idle flush) now, no loss on the board.
        fn tick(&mut self) {
            self.tick_at(self.now);
        }
        /// The wall-clock tick at `at`, no loss on the board.
        fn tick_at(&mut self, at: Instant) {
            self.corr.on_tick(at, |_| 0, &mut keep(&mut self.out));
        }
        /// Ticks every 100 ms, as a shard does, from the last tick (or now) up to `at`.
        fn tick_steadily_to(&mut self, at: Instant) {
            let step = Duration::from_millis(100);
            let mut t = self.corr.last_tick.unwrap_or(self.now);
            while t + step < at {
                t += step;
                self.tick_at(t);
            }
            self.tick_at(at);
        }
        /// Stream `stream` of source 1 ended, the source's loss sequence being `loss_seq`.
        fn end_stream(&mut self, stream: u32, loss_seq: u64) {
            let ended = StreamEnded {
                stream: StreamId(stream),
                sources: vec![(SourceId(1), loss_seq)],
            };
            let sink = &mut keep(&mut self.out);
            self.corr.on_stream_end(&ended, 0, self.now, sink);
        }
        fn flush(&mut self) {
            self.corr.flush(|_| 0, &mut keep(&mut self.out));
        }
        fn verdicts(&self) -> Vec<(Status, BitMap, Option<LossReason>)> {
            self.out
                .iter()
                .map(|(_, v)| (v.status, v.bitmap, v.loss))
                .collect()
        }
        fn incomplete(&self) -> Vec<Option<(BitMap, LossReason)>> {
            self.out
                .iter()
                .map(|(_, v)| v.incomplete.map(|i| (i.missing, i.cause)))
                .collect()
        }
    }

    fn forwarded(run: &mut Run, id: u16, t: Nanos, rcode: u8) {
        let fq = t + 70_000;
        run.feed(ev(Role::ClientQuery, id, t, None, 0));
        run.feed(ev(Role::UpstreamQuery, id, fq, None, 0));
        run.feed(ev(
            Role::UpstreamResponse,
            id,
            fq,
            Some(fq + 300_000),
            rcode,
        ));
        run.feed(ev(Role::ClientResponse, id, t, Some(t + 400_000), rcode));
    }

    #[test]
    fn a_client_response_completes_the_session_at_once() {
        let mut run = Run::new();
        forwarded(&mut run, 1, T0, 0);
        assert_eq!(
            run.verdicts(),
            [(Status::Succeeded, BitMap::FORWARDED, None)]
        );
        assert_eq!(run.corr.open_sessions(), 0);
    }

    #[test]
    fn interleaved_requests_join_by_id_and_query_time() {
        let mut run = Run::new();
        run.feed(ev(Role::ClientQuery, 1, T0, None, 0));
        run.feed(ev(Role::ClientQuery, 2, T0 + 1000, None, 0));
        run.feed(ev(Role::ClientResponse, 2, T0 + 1000, Some(T0 + 5000), 3));
        run.feed(ev(Role::ClientResponse, 1, T0, Some(T0 + 6000), 2));
        run.flush();
        assert_eq!(
            run.verdicts(),
            [
                (Status::Succeeded, BitMap::CQ_CR, None),
                (Status::Failed, BitMap::CQ_CR, None)
            ]
        );
        assert_eq!(run.out[0].0.dns_id, Some(2));
    }

    #[test]
    fn upstream_timeouts_expire_on_event_time_not_before() {
        let mut run = Run::new();
        run.feed(ev(Role::ClientQuery, 1, T0, None, 0));
        for attempt in 0..3 {
            // Every attempt's FQ carries the same query_time; they are tapped 2 s apart.
            let mut fq = ev(Role::UpstreamQuery, 1, T0 + 70_000, None, 0);
            fq.watermark = T0 + attempt * 2 * S;
            run.corr
                .on_event(&mut fq, &[], run.now, &mut keep(&mut run.out));
        }
        forwarded(&mut run, 2, T0 + 9 * S, 0);
        assert_eq!(
            run.verdicts(),
            [(Status::Succeeded, BitMap::FORWARDED, None)],
            "9 s in: still waiting"
        );
        forwarded(&mut run, 3, T0 + 10 * S + 1, 0);
        assert_eq!(run.out[1].1.status, Status::Failed);
        assert_eq!(run.out[1].1.bitmap, BitMap::UPSTREAM_UNREACHABLE);
        assert_eq!(run.out[1].0.upstream_queries, 3);
    }

    #[test]
    fn orphans_wait_for_their_query_then_keep_their_answer_with_the_query_missing() {
        let mut run = Run::new();
        let fq = T0 + 70_000;
        run.feed(ev(Role::UpstreamQuery, 9, fq, None, 0));
        run.feed(ev(Role::UpstreamResponse, 9, fq, Some(fq + 1000), 0));
        run.feed(ev(Role::ClientResponse, 9, T0, Some(fq + 2000), 0));
        assert!(run.out.is_empty(), "held for the reorder grace");
        forwarded(&mut run, 1, T0 + 3 * S, 0);
        assert_eq!(
            run.verdicts(),
            [
                (Status::Succeeded, BitMap::CR_FQ_FR, None),
                (Status::Succeeded, BitMap::FORWARDED, None)
            ]
        );
        assert_eq!(
            run.incomplete(),
            [Some((BitMap::CQ, LossReason::ClientQueryMissing)), None]
        );
    }

    #[test]
    fn sender_loss_between_query_and_expiry_makes_sample_loss() {
        let mut run = Run::new();
        run.feed(ev(Role::ClientQuery, 1, T0, None, 0));
        let mut later = ev(Role::ClientQuery, 2, T0 + 11 * S, None, 0);
        later.loss_seq = 1; // the ingest saw loss on this source in between
        run.feed(later);
        assert_eq!(
            run.verdicts(),
            [(Status::SampleLoss, BitMap::CQ, Some(LossReason::SenderLoss))]
        );
        run.flush();
        assert_eq!(
            run.verdicts()[1],
            (Status::Failed, BitMap::CQ, None),
            "opened after the loss"
        );
    }

    /// CoreDNS redials when its connection stalls: the new stream runs ahead while the old
    /// one's tail, here a session whose FR and CR were lost, is still being read. The session
    /// waits for the old stream, whose end without STOP is the evidence of loss.
    #[test]
    fn a_second_stream_does_not_expire_what_the_first_still_owes() {
        let mut run = Run::new();
        run.feed_on(1, ev(Role::ClientQuery, 1, T0, None, 0));
        run.feed_on(1, ev(Role::UpstreamQuery, 1, T0 + 1000, None, 0));
        run.feed_on(2, ev(Role::ClientQuery, 2, T0 + 30 * S, None, 0));
        assert!(run.out.is_empty(), "held while stream 1 is open");
        // The leading stream falls silent while the slower one still moves: the idle flush
        // must not expire by the leading clock either.
        run.now += IDLE_LAG + Duration::from_secs(1);
        run.feed_on(1, ev(Role::ClientQuery, 3, T0 + S, None, 0));
        run.tick();
        assert!(run.out.is_empty(), "held while stream 1 moves");
        // Its end (without STOP) is the evidence; stream 2 now sets the clock alone.
        run.end_stream(1, 1);
        let loss = Some(LossReason::SenderLoss);
        assert_eq!(
            run.verdicts(),
            [
                (Status::SampleLoss, BitMap::CQ_FQ, loss),
                (Status::SampleLoss, BitMap::CQ, loss)
            ]
        );
        run.flush();
        assert_eq!(
            run.verdicts()[2],
            (Status::SampleLoss, BitMap::CQ, loss),
            "open on the identity when its loss became evident"
        );
    }

    /// What may hold a source back is bounded: a stream silent for the idle lag, or one
    /// `STREAM_SKEW_LIMIT` behind the leading stream, no longer does.
    #[test]
    fn a_silent_or_far_behind_stream_holds_nothing_back() {
        let mut run = Run::new();
        run.feed_on(1, ev(Role::ClientQuery, 1, T0, None, 0));
        run.now += IDLE_LAG;
        run.feed_on(2, ev(Role::ClientQuery, 2, T0 + 11 * S, None, 0));
        assert_eq!(
            run.verdicts(),
            [(Status::Failed, BitMap::CQ, None)],
            "silent"
        );

        let mut run = Run::new();
        run.feed_on(1, ev(Role::ClientQuery, 1, T0, None, 0));
        run.feed_on(
            2,
            ev(
                Role::ClientQuery,
                2,
                T0 + STREAM_SKEW_LIMIT + 9 * S,
                None,
                0,
            ),
        );
        assert!(
            run.out.is_empty(),
            "within the limit plus the session timeout"
        );
        run.feed_on(
            2,
            ev(
                Role::ClientQuery,
                3,
                T0 + STREAM_SKEW_LIMIT + 11 * S,
                None,
                0,
            ),
        );
        assert_eq!(
            run.verdicts(),
            [(Status::Failed, BitMap::CQ, None)],
            "behind"
        );
    }

    #[test]
    fn analyser_drops_mark_sessions_open_in_that_shard() {
        let mut run = Run::new();
        run.feed(ev(Role::ClientQuery, 1, T0, None, 0));
        let mut cr = ev(Role::ClientResponse, 1, T0, Some(T0 + 1000), 0);
        cr.drops_before = 3;
        run.feed(cr);
        forwarded(&mut run, 2, T0 + S, 0);
        assert_eq!(
            run.verdicts(),
            [
                (Status::Succeeded, BitMap::CQ_CR, None),
                (Status::Succeeded, BitMap::FORWARDED, None)
            ]
        );
        assert_eq!(
            run.incomplete(),
            [
                Some((BitMap::UPSTREAM, LossReason::AnalyserQueueFull)),
                None
            ]
        );
    }

    #[test]
    fn a_full_table_evicts_the_oldest_as_sample_loss() {
        let mut run = Run::new();
        run.corr = Correlator::new(Config {
            max_sessions: 2,
            ..Config::default()
        });
        for id in 1..=3 {
            run.feed(ev(Role::ClientQuery, id, T0 + id as Nanos, None, 0));
        }
        assert_eq!(
            run.verdicts(),
            [(
                Status::SampleLoss,
                BitMap::CQ,
                Some(LossReason::SessionTableFull)
            )]
        );
        assert_eq!(run.out[0].0.dns_id, Some(1));
        assert_eq!(run.corr.open_sessions(), 2);
    }

    #[test]
    fn a_full_table_evicts_the_oldest_of_any_source_for_a_new_sender() {
        let mut run = Run::new();
        run.corr = Correlator::new(Config {
            max_sessions: 2,
            ..Config::default()
        });
        for id in 1..=2 {
            run.feed(ev(Role::ClientQuery, id, T0 + id as Nanos, None, 0));
        }
        let other = |mut e: Event| {
            e.source = SourceId(2);
            e
        };
        run.feed(other(ev(Role::ClientQuery, 3, T0 + 3, None, 0)));
        run.feed(other(ev(Role::ClientResponse, 3, T0 + 3, Some(T0 + 4), 0)));
        assert_eq!(
            run.verdicts()[0],
            (
                Status::SampleLoss,
                BitMap::CQ,
                Some(LossReason::SessionTableFull)
            )
        );
        assert_eq!(
            run.out[0].0.dns_id,
            Some(1),
            "the oldest, of the other source"
        );
        assert_eq!(
            run.corr.take_discarded(),
            0,
            "the new sender's messages were kept"
        );
        run.flush();
        let of_source_2: Vec<_> = run
            .out
            .iter()
            .filter(|(s, _)| s.source == SourceId(2))
            .map(|(_, v)| (v.status, v.bitmap))
            .collect();
        assert_eq!(of_source_2, [(Status::Succeeded, BitMap::CQ_CR)]);
    }

    /// A flood from one address evicts its own sessions, however many identities it spreads
    /// over; the honest address keeps its share.
    #[test]
    fn a_full_table_evicts_from_the_address_holding_the_most() {
        let mut run = Run::new();
        run.corr = Correlator::new(Config {
            max_sessions: 10,
            ..Config::default()
        });
        let from = |peer: u32, source: u32, mut e: Event| {
            e.peer = PeerKey(peer);
            e.source = SourceId(source);
            e
        };
        for id in 1..=3 {
            run.feed(from(
                1,
                1,
                ev(Role::ClientQuery, id, T0 + id as Nanos, None, 0),
            ));
        }
        for id in 100..200u16 {
            let source = 10 + id as u32 % 7;
            run.feed(from(2, source, ev(Role::ClientQuery, id, T0 + S, None, 0)));
        }
        assert_eq!(run.out.len(), 93);
        assert!(
            run.out.iter().all(|(s, _)| s.source != SourceId(1)),
            "the honest address's three sessions stay open"
        );
        run.flush();
        let honest = run.out.iter().filter(|(s, _)| s.source == SourceId(1));
        assert!(honest
            .map(|(_, v)| (v.status, v.loss))
            .all(|v| v == (Status::Failed, None)));
    }

    #[test]
    fn messages_that_find_no_room_are_counted() {
        let mut run = Run::new();
        run.corr = Correlator::new(Config {
            max_sessions: 0,
            ..Config::default()
        });
        forwarded(&mut run, 1, T0, 0);
        assert!(run.out.is_empty());
        assert_eq!(run.corr.take_discarded(), 4);
        assert_eq!(run.corr.take_discarded(), 0, "taken");
    }

    #[test]
    fn a_response_without_its_upstream_response_keeps_its_rcode_with_the_fr_missing() {
        let mut run = Run::new();
        run.feed(ev(Role::ClientQuery, 1, T0, None, 0));
        run.feed(ev(Role::UpstreamQuery, 1, T0 + 70_000, None, 0));
        run.feed(ev(Role::ClientResponse, 1, T0, Some(T0 + S), 0));
        assert_eq!(
            run.verdicts(),
            [(Status::Succeeded, BitMap::CQ_CR_FQ, None)]
        );
        assert_eq!(
            run.incomplete(),
            [Some((BitMap::FR, LossReason::UpstreamResponseMissing))]
        );
    }

    #[test]
    fn silent_streams_are_flushed_by_the_wall_clock() {
        let mut run = Run::new();
        run.feed(ev(Role::ClientQuery, 1, T0, None, 0));
        let later = run.now + Duration::from_secs(14);
        run.tick_steadily_to(later);
        assert!(run.out.is_empty(), "10 s timeout + 5 s lag not yet passed");
        run.tick_steadily_to(later + Duration::from_secs(2));
        assert_eq!(run.verdicts(), [(Status::Failed, BitMap::CQ, None)]);
    }

    /// The analyser itself stood still (SIGSTOP, a starved node): the gap in its ticks is not
    /// the streams' silence. Their frames piled up unread, and what they hold (a stream's end
    /// revealing loss) must be read before the idle flush judges the sessions.
    #[test]
    fn our_own_stall_is_not_the_streams_silence() {
        let mut run = Run::new();
        run.feed(ev(Role::ClientQuery, 1, T0, None, 0));
        let t0 = run.now;
        run.tick_steadily_to(t0 + Duration::from_secs(1));
        run.tick_at(t0 + Duration::from_secs(13));
        assert!(
            run.out.is_empty(),
            "a 12 s stall of ours, then the first tick"
        );
        // Silence counts from the stall's end: 1 s before it, 14 s after.
        run.tick_steadily_to(t0 + Duration::from_secs(26));
        assert!(run.out.is_empty(), "15 s of silence not yet passed");
        run.tick_steadily_to(t0 + Duration::from_secs(28));
        assert_eq!(run.verdicts(), [(Status::Failed, BitMap::CQ, None)]);
    }

    #[test]
    fn sources_are_forgotten_once_their_sessions_ended_and_they_went_quiet() {
        let mut run = Run::new();
        for source in 0..10_000 {
            let mut cq = ev(Role::ClientQuery, 1, T0, None, 0);
            cq.source = SourceId(source);
            run.feed(cq);
        }
        assert_eq!(run.corr.tracked_sources(), 10_000);
        run.tick_steadily_to(run.now + Duration::from_secs(14));
        assert_eq!(run.corr.tracked_sources(), 10_000, "sessions still open");
        run.tick_steadily_to(run.now + Duration::from_secs(16));
        assert_eq!(run.out.len(), 10_000, "every session expired");
        assert_eq!(run.corr.tracked_sources(), 0);
        assert!(run.corr.busy.is_empty() && run.corr.retiring.is_empty());
    }

    #[test]
    fn a_source_is_kept_while_it_sends_or_has_sessions_open() {
        let mut run = Run::new();
        let t0 = run.now;
        let tick = |run: &mut Run, secs: u64| run.tick_at(t0 + Duration::from_secs(secs));
        forwarded(&mut run, 1, T0, 0); // done at once: nothing open
        tick(&mut run, 10);
        run.now = t0 + Duration::from_secs(10);
        forwarded(&mut run, 2, T0 + S, 0); // still sending
        tick(&mut run, 20);
        assert_eq!(run.corr.tracked_sources(), 1, "sent 10 s ago");
        tick(&mut run, 25);
        assert_eq!(run.corr.tracked_sources(), 0, "quiet for 15 s");
        // It comes back: a fresh clock, sessions as before.
        run.now = t0 + Duration::from_secs(30);
        forwarded(&mut run, 3, T0 + 30 * S, 0);
        assert_eq!(run.corr.tracked_sources(), 1);
        assert_eq!(run.verdicts().len(), 3);
    }

    #[test]
    fn senders_that_answer_late_keep_the_session_open_past_the_timeout() {
        let mut run = Run::new();
        let bind = |mut e: Event| {
            e.profile = SenderProfile::Bind;
            e.query_time = (e.role == Role::ClientQuery).then_some(e.query_time.unwrap());
            e
        };
        run.feed(bind(ev(Role::ClientQuery, 1, T0, None, 0)));
        run.feed(bind(ev(Role::ClientQuery, 2, T0 + 15 * S, None, 0)));
        run.feed(bind(ev(
            Role::ClientResponse,
            2,
            T0 + 15 * S,
            Some(T0 + 15 * S + 1000),
            0,
        )));
        assert_eq!(run.verdicts(), [(Status::Succeeded, BitMap::CQ_CR, None)]);
        // BIND's SERVFAIL for the first query, 16 s late, still joins it.
        run.feed(bind(ev(Role::ClientResponse, 1, T0, Some(T0 + 16 * S), 2)));
        assert_eq!(run.verdicts()[1], (Status::Failed, BitMap::CQ_CR, None));
    }

    #[test]
    fn loss_revealed_just_after_a_local_answer_marks_its_upstream_leg_maybe_missing() {
        let mut run = Run::new();
        run.feed(ev(Role::ClientQuery, 1, T0, None, 0));
        run.feed(ev(Role::ClientResponse, 1, T0, Some(T0 + 1000), 0));
        assert!(
            run.out.is_empty(),
            "held: a lost FQ+FR pair looks just like this"
        );
        let mut orphan = ev(Role::ClientResponse, 2, T0 + S / 2, Some(T0 + S / 2), 0);
        orphan.loss_seq = 1;
        run.feed(orphan);
        forwarded(&mut run, 3, T0 + 3 * S, 0);
        assert_eq!(run.verdicts()[0], (Status::Succeeded, BitMap::CQ_CR, None));
        assert_eq!(
            run.incomplete()[0],
            Some((BitMap::UPSTREAM, LossReason::SenderLoss))
        );
        // Loss after the hold does not touch a session that ended before it.
        let mut run = Run::new();
        run.feed(ev(Role::ClientQuery, 1, T0, None, 0));
        run.feed(ev(Role::ClientResponse, 1, T0, Some(T0 + 1000), 0));
        run.feed(ev(Role::ClientQuery, 4, T0 + 3 * S / 2, None, 0));
        let mut late = ev(Role::ClientQuery, 2, T0 + 2 * S, None, 0);
        late.loss_seq = 1;
        run.feed(late);
        assert_eq!(run.verdicts(), [(Status::Succeeded, BitMap::CQ_CR, None)]);
        assert_eq!(run.incomplete(), [None]);
    }

    #[test]
    fn under_sender_loss_only_unanswered_sessions_are_sample_loss() {
        let mut run = Run::new();
        run.feed(ev(Role::ClientQuery, 1, T0, None, 0)); // never answered
        run.feed(ev(Role::ClientQuery, 2, T0 + 1, None, 0));
        run.feed(ev(Role::UpstreamQuery, 2, T0 + 70_000, None, 0));
        let mut lossy = ev(Role::ClientResponse, 2, T0 + 1, Some(T0 + 2 * S), 2);
        lossy.loss_seq = 1; // the sender lost messages while both were open
        run.feed(lossy);
        forwarded(&mut run, 3, T0 + 11 * S, 0);
        assert_eq!(
            run.verdicts(),
            [
                (Status::Failed, BitMap::CQ_CR_FQ, None),
                (Status::SampleLoss, BitMap::CQ, Some(LossReason::SenderLoss)),
                (Status::Succeeded, BitMap::FORWARDED, None),
            ]
        );
        assert_eq!(
            run.incomplete(),
            [
                Some((BitMap::FR, LossReason::UpstreamResponseMissing)),
                None,
                None
            ]
        );
    }

    #[test]
    fn a_time_near_the_end_of_the_clock_is_no_time() {
        let mut run = Run::new();
        forwarded(&mut run, 1, T0, 0);
        // Seconds near u64::MAX saturate to Nanos::MAX in the decoder.
        run.feed(ev(Role::ClientQuery, 2, Nanos::MAX, None, 0));
        forwarded(&mut run, 3, T0 + S, 0);
        assert_eq!(
            run.verdicts(),
            [
                (Status::Succeeded, BitMap::FORWARDED, None),
                (Status::Succeeded, BitMap::FORWARDED, None)
            ],
            "the source's clock stayed where its real events are"
        );
        forwarded(&mut run, 4, T0 + 12 * S, 0);
        assert_eq!(
            run.verdicts()[2],
            (Status::Failed, BitMap::CQ, None),
            "the far-future query expires on the source's clock"
        );
        assert_eq!(run.out[2].0.dns_id, Some(2));
        assert_eq!(run.corr.open_sessions(), 0);
    }

    #[test]
    fn a_silent_clock_near_its_end_does_not_overflow() {
        let mut run = Run::new();
        run.corr = Correlator::new(Config {
            session_timeout: Nanos::MAX,
            ..Config::default()
        });
        run.feed(ev(Role::ClientQuery, 1, LATEST_EVENT_TIME, None, 0));
        run.tick_at(run.now + Duration::from_secs(1 << 40));
        assert_eq!(run.verdicts(), [(Status::Failed, BitMap::CQ, None)]);
    }

    #[test]
    fn repeated_upstream_attempts_share_their_bytes_and_are_kept_intact() {
        let mut corr = Correlator::new(Config::default());
        let now = Instant::now();
        let mut seen: Vec<Vec<Vec<u8>>> = Vec::new();
        for (id, payload) in [(1u16, b"first".as_slice()), (2, b"second".as_slice())] {
            let t = T0 + id as Nanos * S;
            let mut feed = |e: Event, bytes: &[u8]| {
                let mut e = e;
                e.watermark = e.time().unwrap();
                corr.on_event(
                    &mut e,
                    bytes,
                    now,
                    &mut |_: &Session, _, _: &MessageStore| {},
                );
            };
            feed(ev(Role::ClientQuery, id, t, None, 0), b"cq");
            for _ in 0..3 {
                feed(ev(Role::UpstreamQuery, id, t + 70_000, None, 0), payload);
            }
        }
        corr.flush(|_| 0, &mut |s: &Session, _, store: &MessageStore| {
            seen.push(
                s.messages
                    .iter()
                    .map(|m| store.get(m.bytes).to_vec())
                    .collect(),
            );
        });
        seen.sort();
        let expect = |p: &[u8]| vec![b"cq".to_vec(), p.to_vec(), p.to_vec(), p.to_vec()];
        assert_eq!(seen, [expect(b"first"), expect(b"second")]);
    }

    #[test]
    fn flush_emits_everything_pending() {
        let mut run = Run::new();
        run.feed(ev(Role::ClientQuery, 1, T0, None, 0));
        run.feed(ev(Role::UpstreamQuery, 1, T0 + 1, None, 0));
        run.feed(ev(Role::UpstreamResponse, 1, T0 + 1, Some(T0 + 2), 0));
        run.feed(ev(Role::ClientQuery, 2, T0 + 3, None, 0));
        run.flush();
        assert_eq!(
            run.verdicts(),
            [
                // The input ended before the CR CoreDNS writes right after the FR.
                (
                    Status::SampleLoss,
                    BitMap::CQ_FQ_FR,
                    Some(LossReason::ClientResponseMissing)
                ),
                (Status::Failed, BitMap::CQ, None)
            ]
        );
        assert_eq!(run.corr.open_sessions(), 0);
    }
}
