//! `/top`: the qnames, clients, upstreams, client workloads and senders (CoreDNS pods) with the
//! most Failed sessions over a sliding window, in bounded memory. Each row also keeps the
//! qtypes of its failures (a bit set) and the time of the latest; a sender's row counts all
//! its sessions too, which gives it a failure ratio (the other keys see only failures: counting
//! every session's qname or client would put a sketch on the path of every session).
//!
//! # The sketch
//! Each dimension of each time bucket is a *space-saving* summary (Metwally, Agrawal and El
//! Abbadi, "Efficient computation of frequent and top-k elements in data streams", 2005) of at
//! most `K` counters. A key that has a counter adds one to it; a new key takes a free counter,
//! or, when all `K` are taken, the counter with the smallest count: it inherits that count
//! plus one and remembers the inherited part as its `error`. For a summary of `N` recordings:
//!
//! - a counter never undercounts: `count - error <= true count <= count`;
//! - `error <= min count <= N / K`;
//! - every key whose true count exceeds `N / K` has a counter (a key without one has a true
//!   count of at most the minimum counter, which is at most `N / K`);
//! - until `K` distinct keys were seen, every count is exact (`error` is 0).
//!
//! # Merging
//! The window is the union of several summaries: one per shard and bucket. A query adds them
//! up key by key: `count` sums the key's counters, plus, for every *full* summary the key is
//! missing from, that summary's minimum (the most the key can have had there; a summary that
//! is not full has seen every key, so a missing key had 0). `count - error` sums only the
//! lower bounds of the counters present. The guarantees above hold for the merged view with
//! `N` the window's total: a merged error is at most the sum of the parts' `N_i / K`, and a
//! key with more than `N / K` failures has more than `N_i / K` in at least one part, so it is
//! among the candidates. The document shows the candidates with the highest `count`.
//!
//! # The window
//! Time is cut into buckets (default 10 × 30 s). A shard records into its current bucket
//! without any lock and, once per tick, copies it into its published ring of buckets under a
//! mutex that only it and a `/top` query take. A query merges the buckets of the current and
//! the previous `buckets - 1` periods, so the window covers between `(buckets - 1) × bucket`
//! and `buckets × bucket` of the analyser's clock (monotonic, at the time a session is
//! finished, not the sender's timestamps). Older buckets are ignored, and overwritten.
//!
//! # Memory
//! Bounded whatever the senders send: per shard, `buckets + 1` buckets (the published ring and
//! the current one) of five summaries of `K` counters (qnames, clients, upstreams, the
//! clients' `namespace/pod` from the sender's `extra`, cut like a qname, and the senders, which
//! count every session, not only Failed ones); a qname key is cut to [`MAX_QNAME_BYTES`] (its
//! rightmost labels, which name the zone, are kept), clients are IP addresses (no port),
//! upstreams socket addresses. A counter takes at most 136 bytes plus, for a qname, a key
//! buffer of at most 2 × [`MAX_QNAME_BYTES`] (amortized growth); with K = 100 and 10 buckets
//! that is at most 11 × 100 × (392 + 136 + 136 + 392 + 136) bytes ≈ 1.3 MB per shard, plus the
//! index of the current bucket. Buffers are reused: in steady state recording allocates
//! nothing, and publishing copies into the buffers of the bucket it overwrites.

use super::model::{qtype_label, Cause, FailingName, TopHook, TopSource, QTYPE_LABELS};
use crate::dnstap::{SourceId, SourceRegistry};

/// Series of the `top_failing_names` family at most.
pub const MAX_FAILING_NAMES: usize = 100;

impl TopSource for TopBoard {
    fn document(&self) -> String {
        self.view(self.origin.elapsed()).to_json()
    }

    fn failing_names(&self) -> Vec<FailingName> {
        TopBoard::failing_names(self, self.origin.elapsed())
    }
}
use hashbrown::HashMap;
use hashbrown::HashTable;
use std::borrow::Borrow;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The longest qname key kept, in bytes of presentation format (with the `...` marking a cut).
pub const MAX_QNAME_BYTES: usize = 128;

const CAUSES: usize = Cause::ALL.len();
// A counter's qtypes are a `u16` of bits.
const _: () = assert!(QTYPE_LABELS.len() <= 16);

/// Sizes of the sketch and of the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopConfig {
    /// Counters per summary (`K`).
    pub capacity: usize,
    /// Buckets in the window.
    pub buckets: usize,
    /// Length of one bucket.
    pub bucket: Duration,
    /// Rows per dimension in the document.
    pub rows: usize,
}

impl Default for TopConfig {
    fn default() -> Self {
        Self {
            capacity: 100,
            buckets: 10,
            bucket: Duration::from_secs(30),
            rows: 20,
        }
    }
}

impl TopConfig {
    pub fn window(&self) -> Duration {
        self.bucket * self.buckets as u32
    }

    fn epoch(&self, at: Duration) -> u64 {
        (at.as_nanos() / self.bucket.as_nanos().max(1)) as u64
    }
}

/// One space-saving counter.
#[derive(Debug, PartialEq, Eq)]
pub struct Counter<K> {
    pub key: K,
    /// An upper bound of the key's true count.
    pub count: u64,
    /// How much of `count` was inherited from evicted keys: `count - error` is a lower bound.
    pub error: u64,
    /// The failures since this key took the counter, by cause (indexed like `Cause::ALL`).
    pub causes: [u64; CAUSES],
    /// Their qtypes: bit `i` for `QTYPE_LABELS[i]`.
    pub qtypes: u16,
    /// When the latest of them was recorded: whole seconds of the board's clock.
    pub last: u32,
}

impl<K: Clone> Clone for Counter<K> {
    fn clone(&self) -> Self {
        Self {
            key: self.key.clone(),
            count: self.count,
            error: self.error,
            causes: self.causes,
            qtypes: self.qtypes,
            last: self.last,
        }
    }

    /// Reuses the key's buffer: publishing a bucket allocates nothing in steady state.
    fn clone_from(&mut self, source: &Self) {
        self.key.clone_from(&source.key);
        self.count = source.count;
        self.error = source.error;
        self.causes = source.causes;
        self.qtypes = source.qtypes;
        self.last = source.last;
    }
}

/// The counters of one summary, without the index that recording needs: what a shard
/// publishes and a query merges.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary<K> {
    capacity: usize,
    /// Recordings, including those of evicted keys.
    total: u64,
    counters: Vec<Counter<K>>,
}

impl<K: Clone> Clone for Summary<K> {
    fn clone(&self) -> Self {
        Self {
            capacity: self.capacity,
            total: self.total,
            counters: self.counters.clone(),
        }
    }

    fn clone_from(&mut self, source: &Self) {
        self.capacity = source.capacity;
        self.total = source.total;
        // Element-wise `clone_from`, so the keys' buffers are reused.
        self.counters.clone_from(&source.counters);
    }
}

impl<K> Summary<K> {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            total: 0,
            counters: Vec::with_capacity(capacity.max(1)),
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn counters(&self) -> &[Counter<K>] {
        &self.counters
    }

    /// Whether keys may have been evicted: only then can a missing key have a count.
    pub fn is_full(&self) -> bool {
        self.counters.len() >= self.capacity
    }

    /// The most a key without a counter can have been recorded (0 while not full).
    pub fn min_count(&self) -> u64 {
        if self.is_full() {
            self.counters.iter().map(|c| c.count).min().unwrap_or(0)
        } else {
            0
        }
    }

    fn clear(&mut self) {
        self.total = 0;
        self.counters.clear();
    }
}

/// A space-saving summary being recorded into: the counters and a hash index over their keys.
pub struct SpaceSaving<K> {
    summary: Summary<K>,
    /// Indices into `summary.counters`, hashed by key.
    index: HashTable<usize>,
    /// Randomly seeded: qnames are chosen by whoever sends queries.
    hasher: ahash::RandomState,
    /// The counter counted last, tried before the index: a shard's sessions come in runs of
    /// one sender, and each is counted under it. Its key is compared, so eviction and
    /// clearing need not forget it.
    last: usize,
}

impl<K: Hash + Eq> SpaceSaving<K> {
    pub fn new(capacity: usize) -> Self {
        let summary = Summary::new(capacity);
        Self {
            index: HashTable::with_capacity(summary.capacity),
            summary,
            hasher: ahash::RandomState::new(),
            last: usize::MAX,
        }
    }

    pub fn summary(&self) -> &Summary<K> {
        &self.summary
    }

    /// Counts one failure of `key` under `cause`.
    pub fn record<Q>(&mut self, key: &Q, cause: Cause)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.count(key, Tally::failure(cause, None, 0));
    }

    /// Counts one recording of `key`. A miss on a full summary scans the `K` counters for the
    /// minimum: cheap for K ≈ 100, and only Failed sessions (and senders, few) get here.
    pub fn count<Q>(&mut self, key: &Q, t: Tally)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let Self {
            summary,
            index,
            hasher,
            last,
        } = self;
        summary.total += 1;
        let counters = &mut summary.counters;
        if let Some(c) = counters.get_mut(*last).filter(|c| c.key.borrow() == key) {
            t.add_to(c);
            return;
        }
        let hash = hasher.hash_one(key);
        if let Some(&i) = index.find(hash, |&i| counters[i].key.borrow() == key) {
            t.add_to(&mut counters[i]);
            *last = i;
            return;
        }
        let slot = if counters.len() < summary.capacity {
            counters.push(Counter {
                key: key.to_owned(),
                count: 0,
                error: 0,
                causes: [0; CAUSES],
                qtypes: 0,
                last: 0,
            });
            counters.len() - 1
        } else {
            // Evict the smallest counter; the newcomer inherits its count as error.
            let Some(min) = (0..counters.len()).min_by_key(|&i| counters[i].count) else {
                return;
            };
            let old = hasher.hash_one(&counters[min].key);
            if let Ok(entry) = index.find_entry(old, |&i| i == min) {
                entry.remove();
            }
            let c = &mut counters[min];
            key.clone_into(&mut c.key);
            c.error = c.count;
            c.causes = [0; CAUSES];
            c.qtypes = 0;
            c.last = 0;
            min
        };
        t.add_to(&mut counters[slot]);
        index.insert_unique(hash, slot, |&i| hasher.hash_one(&counters[i].key));
        *last = slot;
    }

    fn clear(&mut self) {
        self.summary.clear();
        self.index.clear();
    }
}

/// What a shard knows about one Failed session.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    pub cause: Cause,
    /// The question name in presentation format (cut to [`MAX_QNAME_BYTES`] when recorded).
    pub qname: Option<&'a str>,
    /// The client's address, without its port.
    pub client: Option<IpAddr>,
    /// The upstreams the session tried; each distinct one counts the session once.
    pub upstreams: &'a [SocketAddr],
    /// The client's `namespace/pod` (`-` for a part the sender did not say).
    pub workload: Option<&'a str>,
    /// The sender (a CoreDNS pod) that saw the session.
    pub source: SourceId,
    pub qtype: Option<u16>,
}

/// One recording: a session, failed under a cause or not, of a qtype, at a time.
#[derive(Debug, Clone, Copy)]
pub struct Tally {
    failed: Option<Cause>,
    qtypes: u16,
    /// Seconds of the board's clock; only a failure's time is kept.
    at: u32,
}

impl Tally {
    pub fn failure(cause: Cause, qtype: Option<u16>, at: u32) -> Self {
        Self {
            failed: Some(cause),
            qtypes: 1 << qtype_label(qtype),
            at,
        }
    }

    /// A session that did not fail: it counts, and changes nothing else.
    pub const SUCCESS: Self = Self {
        failed: None,
        qtypes: 0,
        at: 0,
    };

    fn add_to<K>(self, c: &mut Counter<K>) {
        c.count += 1;
        if let Some(cause) = self.failed {
            c.causes[cause as usize] += 1;
            c.qtypes |= self.qtypes;
            c.last = c.last.max(self.at);
        }
    }
}

/// The names of a qtype bit set, in `QTYPE_LABELS` order.
fn qtype_names(bits: u16) -> Vec<&'static str> {
    QTYPE_LABELS
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, (_, name))| *name)
        .collect()
}

/// One bucket's summaries, being recorded (`SpaceSaving`) or published (`Summary`).
#[derive(Debug, Clone)]
struct Published {
    epoch: u64,
    /// Finished sessions, Failed or not.
    sessions: u64,
    failed: u64,
    causes: [u64; CAUSES],
    qnames: Summary<String>,
    clients: Summary<IpAddr>,
    upstreams: Summary<SocketAddr>,
    workloads: Summary<String>,
    /// Every session by its sender: the one dimension with a failure ratio, since senders are
    /// few and counting a session under its sender is cheap.
    identities: Summary<SourceId>,
}

impl Published {
    fn new(capacity: usize) -> Self {
        Self {
            epoch: u64::MAX,
            sessions: 0,
            failed: 0,
            causes: [0; CAUSES],
            qnames: Summary::new(capacity),
            clients: Summary::new(capacity),
            upstreams: Summary::new(capacity),
            workloads: Summary::new(capacity),
            identities: Summary::new(capacity),
        }
    }
}

struct Current {
    epoch: u64,
    sessions: u64,
    failed: u64,
    causes: [u64; CAUSES],
    qnames: SpaceSaving<String>,
    clients: SpaceSaving<IpAddr>,
    upstreams: SpaceSaving<SocketAddr>,
    workloads: SpaceSaving<String>,
    identities: SpaceSaving<SourceId>,
}

impl Current {
    fn publish_into(&self, slot: &mut Published) {
        slot.epoch = self.epoch;
        slot.sessions = self.sessions;
        slot.failed = self.failed;
        slot.causes = self.causes;
        slot.qnames.clone_from(&self.qnames.summary);
        slot.clients.clone_from(&self.clients.summary);
        slot.upstreams.clone_from(&self.upstreams.summary);
        slot.workloads.clone_from(&self.workloads.summary);
        slot.identities.clone_from(&self.identities.summary);
    }

    fn reset(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.sessions = 0;
        self.failed = 0;
        self.causes = [0; CAUSES];
        self.qnames.clear();
        self.clients.clear();
        self.upstreams.clear();
        self.workloads.clear();
        self.identities.clear();
    }
}

/// A shard's published buckets, indexed by `epoch % buckets`.
type Ring = Vec<Published>;

/// Shared by the shards (which publish into it) and the `/top` hook (which merges it).
pub struct TopBoard {
    cfg: TopConfig,
    origin: Instant,
    /// The wall clock at `origin` (a whole second): what the board's seconds are shown as.
    origin_wall: SystemTime,
    /// Names the senders of the identity rows (without it, their ids).
    sources: Option<Arc<SourceRegistry>>,
    shards: Mutex<Vec<Arc<Mutex<Ring>>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TopBoard {
    pub fn new(cfg: TopConfig) -> Arc<Self> {
        Self::build(cfg, None)
    }

    /// A board whose identity rows are named by `sources`.
    pub fn naming(cfg: TopConfig, sources: Arc<SourceRegistry>) -> Arc<Self> {
        Self::build(cfg, Some(sources))
    }

    fn build(cfg: TopConfig, sources: Option<Arc<SourceRegistry>>) -> Arc<Self> {
        let cfg = TopConfig {
            capacity: cfg.capacity.max(1),
            buckets: cfg.buckets.max(1),
            bucket: cfg.bucket.max(Duration::from_millis(1)),
            rows: cfg.rows,
        };
        // The origin is put on a whole second of the wall clock, so that a time kept in whole
        // seconds of the board's clock is the wall clock's second it happened in.
        let (now, wall) = (Instant::now(), SystemTime::now());
        let into_second = wall.duration_since(UNIX_EPOCH).map_or(Duration::ZERO, |d| {
            Duration::from_nanos(d.subsec_nanos().into())
        });
        let (origin, origin_wall) = match now.checked_sub(into_second) {
            Some(origin) => (origin, wall - into_second),
            None => (now, wall),
        };
        Arc::new(Self {
            cfg,
            origin,
            origin_wall,
            sources,
            shards: Mutex::new(Vec::new()),
        })
    }

    pub fn config(&self) -> TopConfig {
        self.cfg
    }

    /// The sketch of one shard; call before spawning it and move it in.
    pub fn shard(self: &Arc<Self>) -> ShardTop {
        let cap = self.cfg.capacity;
        let ring: Ring = (0..self.cfg.buckets).map(|_| Published::new(cap)).collect();
        let ring = Arc::new(Mutex::new(ring));
        lock(&self.shards).push(ring.clone());
        ShardTop {
            cfg: self.cfg,
            origin: self.origin,
            current: Current {
                epoch: 0,
                sessions: 0,
                failed: 0,
                causes: [0; CAUSES],
                qnames: SpaceSaving::new(cap),
                clients: SpaceSaving::new(cap),
                upstreams: SpaceSaving::new(cap),
                workloads: SpaceSaving::new(cap),
                identities: SpaceSaving::new(cap),
            },
            dirty: false,
            ring,
            qname: String::with_capacity(MAX_QNAME_BYTES),
        }
    }

    /// The `/top` document and the failing names, for the endpoint.
    pub fn hook(self: &Arc<Self>) -> TopHook {
        self.clone()
    }

    /// The merged view of the window that ends at `at` (time since the board was made).
    pub fn view(&self, at: Duration) -> TopView {
        self.view_rows(at, self.cfg.rows)
    }

    /// The qnames of the window that ends at `at` whose Failed sessions certainly exceed the
    /// sketch's error bound (lower bound `failed - error` above N / K, N the window's Failed
    /// sessions, K the capacity): keys that surely hold a counter, so series come and go with
    /// real failures, not with the sketch's evictions. At most [`MAX_FAILING_NAMES`], most
    /// failures first.
    pub fn failing_names(&self, at: Duration) -> Vec<FailingName> {
        let view = self.view_rows(at, MAX_FAILING_NAMES);
        let bound = view.failed / self.cfg.capacity.max(1) as u64;
        view.qnames
            .iter()
            .filter(|e| e.failed - e.error > bound)
            .filter_map(|e| {
                Some(FailingName {
                    qname: e.key.clone(),
                    cause: e.dominant_cause()?,
                    failed: e.failed,
                })
            })
            .collect()
    }

    fn view_rows(&self, at: Duration, rows: usize) -> TopView {
        let now = self.cfg.epoch(at);
        let oldest = now.saturating_sub(self.cfg.buckets as u64 - 1);
        let in_window = |p: &Published| p.epoch != u64::MAX && (oldest..=now).contains(&p.epoch);
        let mut view = TopView {
            window: self.cfg.window(),
            bucket: self.cfg.bucket,
            capacity: self.cfg.capacity,
            origin_wall: self.origin_wall,
            at,
            sessions: 0,
            failed: 0,
            causes: [0; CAUSES],
            qnames: Vec::new(),
            clients: Vec::new(),
            upstreams: Vec::new(),
            workloads: Vec::new(),
            identities: Vec::new(),
        };
        // Copy the buckets out, one shard's lock at a time, so a shard waits for a copy at
        // most, never for the merge.
        let rings: Vec<Arc<Mutex<Ring>>> = lock(&self.shards).clone();
        let mut buckets: Vec<Published> = Vec::new();
        for ring in rings {
            buckets.extend(lock(&ring).iter().filter(|p| in_window(p)).cloned());
        }
        let (mut qnames, mut clients, mut upstreams, mut workloads, mut identities) = (
            Merger::default(),
            Merger::default(),
            Merger::default(),
            Merger::default(),
            Merger::default(),
        );
        for p in &buckets {
            view.sessions += p.sessions;
            view.failed += p.failed;
            for (a, b) in view.causes.iter_mut().zip(p.causes) {
                *a += b;
            }
            qnames.add(&p.qnames);
            clients.add(&p.clients);
            upstreams.add(&p.upstreams);
            workloads.add(&p.workloads);
            identities.add(&p.identities);
        }
        view.qnames = qnames.top(rows, |k| k.clone());
        view.clients = clients.top(rows, |k| k.to_string());
        view.upstreams = upstreams.top(rows, |k| k.to_string());
        view.workloads = workloads.top(rows, |k| k.clone());
        view.identities = self.identity_rows(identities, rows);
        view
    }

    /// The senders with the most Failed sessions: a sender's counter counts all its sessions,
    /// its causes the failed ones. Senders of one name (one pod at two addresses) are one row.
    fn identity_rows(&self, merged: Merger<'_, SourceId>, rows: usize) -> Vec<TopEntry> {
        let name = |id: &SourceId| match &self.sources {
            Some(sources) => match sources.describe(*id).0 {
                n if n.is_empty() => "(reclaimed)".to_string(),
                n => n.to_string(),
            },
            None => format!("#{}", id.0),
        };
        let mut by_name: HashMap<String, TopEntry> = HashMap::new();
        for e in merged.top(usize::MAX, name) {
            let sessions = e.failed;
            let row = by_name.entry(e.key.clone()).or_insert(TopEntry {
                sessions: Some(0),
                failed: 0,
                error: 0,
                causes: [0; CAUSES],
                ..e
            });
            row.sessions = row.sessions.map(|n| n + sessions);
            row.error += e.error;
            row.failed += e.causes.iter().sum::<u64>();
            for (a, b) in row.causes.iter_mut().zip(e.causes) {
                *a += b;
            }
            row.qtypes |= e.qtypes;
            row.last = row.last.max(e.last);
        }
        let mut entries: Vec<TopEntry> = by_name.into_values().collect();
        entries.sort_unstable_by(|a, b| {
            (b.failed, b.sessions)
                .cmp(&(a.failed, a.sessions))
                .then_with(|| a.key.cmp(&b.key))
        });
        entries.truncate(rows);
        entries
    }
}

/// The sketch one shard owns: recording touches nothing shared.
pub struct ShardTop {
    cfg: TopConfig,
    origin: Instant,
    current: Current,
    /// Recorded since the last publish.
    dirty: bool,
    ring: Arc<Mutex<Ring>>,
    /// The qname key being recorded, reused.
    qname: String,
}

impl ShardTop {
    /// The shard's clock for `record` and `publish`.
    pub fn since_origin(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.origin)
    }

    /// Counts one Failed session at `at` (see [`ShardTop::since_origin`]).
    pub fn record(&mut self, at: Duration, f: &Failure<'_>) {
        self.roll(at);
        let t = Tally::failure(f.cause, f.qtype, at.as_secs().min(u32::MAX.into()) as u32);
        let c = &mut self.current;
        c.sessions += 1;
        c.failed += 1;
        c.causes[f.cause as usize] += 1;
        c.identities.count(&f.source, t);
        if let Some(name) = f.qname {
            bounded_qname(name, &mut self.qname);
            c.qnames.count(self.qname.as_str(), t);
        }
        if let Some(ip) = f.client {
            c.clients.count(&ip, t);
        }
        if let Some(w) = f.workload {
            bounded_qname(w, &mut self.qname);
            c.workloads.count(self.qname.as_str(), t);
        }
        for (i, up) in f.upstreams.iter().enumerate() {
            if !f.upstreams[..i].contains(up) {
                c.upstreams.count(up, t);
            }
        }
        self.dirty = true;
    }

    /// Counts a session that did not fail, under its sender. Once per session, so it does not
    /// read the clock: the session lands in the bucket of the latest failure or tick, at most
    /// one tick (100 ms) early.
    pub fn record_success(&mut self, source: SourceId) {
        let c = &mut self.current;
        c.sessions += 1;
        c.identities.count(&source, Tally::SUCCESS);
        self.dirty = true;
    }

    /// Once per tick: makes the current bucket visible to `/top`.
    pub fn publish(&mut self, at: Duration) {
        self.roll(at);
        if self.dirty {
            self.publish_current();
        }
    }

    /// Starts a new bucket when `at` is past the current one, publishing the old one first.
    fn roll(&mut self, at: Duration) {
        let epoch = self.cfg.epoch(at);
        if epoch > self.current.epoch {
            if self.dirty {
                self.publish_current();
            }
            self.current.reset(epoch);
        }
    }

    fn publish_current(&mut self) {
        let slot = (self.current.epoch % self.cfg.buckets as u64) as usize;
        let mut ring = lock(&self.ring);
        self.current.publish_into(&mut ring[slot]);
        self.dirty = false;
    }
}

impl Drop for ShardTop {
    fn drop(&mut self) {
        if self.dirty {
            self.publish_current();
        }
    }
}

/// Cuts a qname to at most [`MAX_QNAME_BYTES`] into `out`, keeping its rightmost labels (the
/// zone) behind `...`; a presentation name never holds `..`, so the mark is unambiguous.
pub fn bounded_qname(name: &str, out: &mut String) {
    out.clear();
    if name.len() <= MAX_QNAME_BYTES {
        out.push_str(name);
        return;
    }
    let mut start = name.len() - (MAX_QNAME_BYTES - 3);
    while !name.is_char_boundary(start) {
        start += 1;
    }
    // Start at a label when one begins soon enough.
    if let Some(dot) = name[start..].find('.') {
        if dot + 1 < name.len() - start {
            start += dot + 1;
        }
    }
    out.push_str("...");
    out.push_str(&name[start..]);
}

/// One row of the document: a key and its merged counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopEntry {
    pub key: String,
    /// Failed sessions: an upper bound, see the module doc.
    pub failed: u64,
    /// `failed - error` is a lower bound.
    pub error: u64,
    /// By cause (indexed like `Cause::ALL`), counted while the key held its counters.
    pub causes: [u64; CAUSES],
    /// The qtypes of those failures (bit `i` for `QTYPE_LABELS[i]`).
    pub qtypes: u16,
    /// The latest of those failures, in whole seconds of the board's clock.
    pub last: u32,
    /// Of an identity row: its sessions, Failed or not (an upper bound, like `failed` of the
    /// other rows, with the same `error`); then `failed` sums the causes.
    pub sessions: Option<u64>,
}

impl TopEntry {
    /// The cause with the most failures (the first of `Cause::ALL` on a tie).
    pub fn dominant_cause(&self) -> Option<Cause> {
        let best = (0..CAUSES).max_by_key(|&i| (self.causes[i], std::cmp::Reverse(i)))?;
        (self.causes[best] > 0).then_some(Cause::ALL[best])
    }
}

/// Sums summaries key by key.
struct Merger<'a, K> {
    keys: HashMap<&'a K, Merged>,
    /// Sum of the minimum counts of the full summaries added.
    full_mins: u64,
}

impl<K> Default for Merger<'_, K> {
    fn default() -> Self {
        Self {
            keys: HashMap::new(),
            full_mins: 0,
        }
    }
}

#[derive(Default)]
struct Merged {
    count: u64,
    lower: u64,
    /// Minimum counts of the full summaries this key is in.
    mins_present: u64,
    causes: [u64; CAUSES],
    qtypes: u16,
    last: u32,
}

impl<'a, K: Hash + Eq> Merger<'a, K> {
    fn add(&mut self, s: &'a Summary<K>) {
        let min = s.min_count();
        self.full_mins += min;
        for c in &s.counters {
            let m = self.keys.entry(&c.key).or_default();
            m.count += c.count;
            m.lower += c.count - c.error;
            m.mins_present += min;
            for (a, b) in m.causes.iter_mut().zip(c.causes) {
                *a += b;
            }
            m.qtypes |= c.qtypes;
            m.last = m.last.max(c.last);
        }
    }

    /// The `rows` keys with the highest upper bound (ties: the higher lower bound, then key).
    fn top(self, rows: usize, name: impl Fn(&K) -> String) -> Vec<TopEntry> {
        let full_mins = self.full_mins;
        let mut entries: Vec<TopEntry> = self
            .keys
            .into_iter()
            .map(|(k, m)| {
                let failed = m.count + (full_mins - m.mins_present);
                TopEntry {
                    key: name(k),
                    failed,
                    error: failed - m.lower,
                    causes: m.causes,
                    qtypes: m.qtypes,
                    last: m.last,
                    sessions: None,
                }
            })
            .collect();
        entries.sort_unstable_by(|a, b| {
            (b.failed, b.failed - b.error)
                .cmp(&(a.failed, a.failed - a.error))
                .then_with(|| a.key.cmp(&b.key))
        });
        entries.truncate(rows);
        entries
    }
}

/// The merged window: what `/top` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopView {
    pub window: Duration,
    pub bucket: Duration,
    pub capacity: usize,
    /// The wall clock at the board's origin, and the time of the view on the board's clock:
    /// what the times of the document are computed from.
    pub origin_wall: SystemTime,
    pub at: Duration,
    /// Finished sessions in the window, Failed or not (exact, up to a tick at bucket edges).
    pub sessions: u64,
    /// Failed sessions in the window (exact).
    pub failed: u64,
    /// By cause (exact), indexed like `Cause::ALL`.
    pub causes: [u64; CAUSES],
    pub qnames: Vec<TopEntry>,
    pub clients: Vec<TopEntry>,
    pub upstreams: Vec<TopEntry>,
    /// `namespace/pod` of the client, from the sender's `extra` (CoreDNS ≥ 1.11).
    pub workloads: Vec<TopEntry>,
    /// The senders (CoreDNS pods) with the most Failed sessions, with their sessions.
    pub identities: Vec<TopEntry>,
}

fn causes_json(causes: &[u64; CAUSES]) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = Cause::ALL
        .iter()
        .zip(causes)
        .filter(|(_, &n)| n > 0)
        .map(|(c, &n)| (c.name().to_string(), n.into()))
        .collect();
    map.into()
}

/// `failed / sessions`, or null without sessions.
fn ratio_json(failed: u64, sessions: u64) -> serde_json::Value {
    match sessions {
        0 => serde_json::Value::Null,
        n => (failed as f64 / n as f64).into(),
    }
}

impl TopView {
    /// The RFC 3339 UTC time of `at` on the board's clock.
    fn time_text(&self, at: Duration) -> String {
        let nanos = (self.origin_wall + at)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut out = Vec::with_capacity(32);
        crate::output::json::write_rfc3339(&mut out, nanos);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The `/top` document; see docs/operations.md, "Top failures".
    pub fn to_json(&self) -> String {
        let rows = |entries: &[TopEntry], key: &str| -> serde_json::Value {
            entries
                .iter()
                .map(|e| {
                    let mut row = serde_json::json!({
                        key: e.key,
                        "failed": e.failed,
                        "error": e.error,
                        "cause": e.dominant_cause().map(Cause::name),
                        "causes": causes_json(&e.causes),
                        "qtypes": qtype_names(e.qtypes),
                        "last_failed_at": (e.failed > 0)
                            .then(|| self.time_text(Duration::from_secs(e.last.into()))),
                    });
                    if let Some(sessions) = e.sessions {
                        row["sessions"] = sessions.into();
                        row["failure_ratio"] = ratio_json(e.failed, sessions);
                    }
                    if let Some((namespace, _)) =
                        e.key.split_once('/').filter(|_| key == "workload")
                    {
                        row["namespace"] = (namespace != "-").then_some(namespace).into();
                    }
                    row
                })
                .collect::<Vec<_>>()
                .into()
        };
        serde_json::json!({
            "updated_at": self.time_text(self.at),
            "window_seconds": self.window.as_secs_f64(),
            "bucket_seconds": self.bucket.as_secs_f64(),
            "capacity": self.capacity,
            "sessions": self.sessions,
            "failed": self.failed,
            "failure_ratio": ratio_json(self.failed, self.sessions),
            "causes": causes_json(&self.causes),
            "identities": rows(&self.identities, "identity"),
            "qnames": rows(&self.qnames, "qname"),
            "clients": rows(&self.clients, "client"),
            "upstreams": rows(&self.upstreams, "upstream"),
            "workloads": rows(&self.workloads, "workload"),
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Cause = Cause::UpstreamTimeout;

    /// A deterministic skewed stream: key `i` of `keys` with weight about 1 / (i + 1).
    fn skewed_stream(seed: u64, len: usize, keys: u64) -> Vec<u64> {
        let mut x = seed | 1;
        let harmonic: f64 = (1..=keys).map(|i| 1.0 / i as f64).sum();
        (0..len)
            .map(|_| {
                // xorshift64*
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                let u = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
                let mut acc = 0.0;
                for i in 1..=keys {
                    acc += 1.0 / i as f64 / harmonic;
                    if u < acc {
                        return i - 1;
                    }
                }
                keys - 1
            })
            .collect()
    }

    fn true_counts(stream: &[u64]) -> HashMap<u64, u64> {
        let mut m = HashMap::new();
        for &k in stream {
            *m.entry(k).or_insert(0) += 1;
        }
        m
    }

    /// The space-saving guarantees for counters `(key, count, error)` of a stream of `n`.
    fn assert_guarantees(
        counters: &[(u64, u64, u64)],
        truth: &HashMap<u64, u64>,
        n: u64,
        k: usize,
    ) {
        for &(key, count, error) in counters {
            let t = truth.get(&key).copied().unwrap_or(0);
            assert!(
                count - error <= t && t <= count,
                "{key}: {t} not in {count}-{error}"
            );
            assert!(error * k as u64 <= n, "{key}: error {error} over N/K");
        }
        for (&key, &t) in truth {
            if t * k as u64 > n {
                assert!(
                    counters.iter().any(|c| c.0 == key),
                    "heavy hitter {key} ({t} of {n}) missing"
                );
            }
        }
    }

    #[test]
    fn every_heavy_hitter_is_kept_and_counts_are_bounded() {
        let k = 10;
        for seed in 1..=5 {
            let stream = skewed_stream(seed, 5000, 300);
            let mut ss = SpaceSaving::<u64>::new(k);
            for key in &stream {
                ss.record(key, TIMEOUT);
            }
            let s = ss.summary();
            assert_eq!(s.total(), 5000);
            assert!(s.is_full() && s.counters().len() == k);
            let counters: Vec<_> = s
                .counters()
                .iter()
                .map(|c| (c.key, c.count, c.error))
                .collect();
            let truth = true_counts(&stream);
            assert_guarantees(&counters, &truth, 5000, k);
            assert!(
                truth.values().any(|&t| t * k as u64 > 5000),
                "the stream has heavy hitters to find"
            );
        }
    }

    #[test]
    fn counts_are_exact_until_the_summary_is_full() {
        let mut ss = SpaceSaving::<String>::new(3);
        for name in ["a.", "b.", "a.", "c.", "a."] {
            ss.record(name, TIMEOUT);
        }
        let s = ss.summary();
        assert!(s.is_full());
        assert_eq!(s.min_count(), 1);
        let a = &s.counters()[0];
        assert_eq!((a.key.as_str(), a.count, a.error), ("a.", 3, 0));
        // A newcomer takes the smallest counter and inherits its count as error.
        ss.record("d.", Cause::ServerError);
        let d = ss
            .summary()
            .counters()
            .iter()
            .find(|c| c.key == "d.")
            .unwrap();
        assert_eq!((d.count, d.error), (2, 1));
        assert_eq!(d.causes[Cause::ServerError as usize], 1);
        assert_eq!(ss.summary().counters().len(), 3);
        // The evicted key is gone from the index too: it comes back as a newcomer.
        let gone = if ss.summary().counters().iter().any(|c| c.key == "b.") {
            "c."
        } else {
            "b."
        };
        ss.record(gone, TIMEOUT);
        let back = ss
            .summary()
            .counters()
            .iter()
            .find(|c| c.key == gone)
            .unwrap();
        assert_eq!((back.count, back.error), (2, 1));
    }

    fn failure<'a>(qname: &'a str, client: [u8; 4], upstreams: &'a [SocketAddr]) -> Failure<'a> {
        Failure {
            cause: TIMEOUT,
            qname: Some(qname),
            client: Some(IpAddr::from(client)),
            upstreams,
            workload: None,
            source: SourceId(7),
            qtype: Some(1),
        }
    }

    fn cfg() -> TopConfig {
        TopConfig {
            capacity: 10,
            buckets: 4,
            bucket: Duration::from_secs(30),
            rows: 5,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_window_slides_with_the_clock() {
        let board = TopBoard::new(cfg());
        let mut shard = board.shard();
        shard.record(secs(5), &failure("old.test.", [10, 0, 0, 1], &[]));
        assert_eq!(board.view(secs(5)).failed, 0, "nothing before a publish");
        shard.publish(secs(5));
        assert_eq!(board.view(secs(5)).failed, 1);
        // Moving on to the next bucket publishes the last one whole, without a tick.
        shard.record(secs(31), &failure("old.test.", [10, 0, 0, 1], &[]));
        shard.record(secs(65), &failure("new.test.", [10, 0, 0, 2], &[]));
        let v = board.view(secs(65));
        assert_eq!(v.failed, 2, "the bucket at 65 s is not published yet");
        shard.publish(secs(65));
        let v = board.view(secs(119));
        assert_eq!(v.failed, 3);
        assert_eq!(v.qnames[0].key, "old.test.");
        assert_eq!(v.qnames[0].failed, 2);
        // 4 buckets of 30 s: at 120 s the bucket of 0-30 s has left the window.
        let v = board.view(secs(120));
        assert_eq!(v.failed, 2);
        assert_eq!(v.qnames.len(), 2);
        assert!(v.qnames.iter().all(|e| e.failed == 1));
        // Later, only the newest bucket remains, then none.
        assert_eq!(board.view(secs(179)).failed, 1);
        assert_eq!(board.view(secs(180)).failed, 0);
        // A slot reused by a later bucket shows the later one only.
        shard.record(secs(125), &failure("reuse.test.", [10, 0, 0, 3], &[]));
        shard.publish(secs(125));
        let v = board.view(secs(125));
        assert_eq!(v.failed, 3);
        assert!(v.qnames.iter().any(|e| e.key == "reuse.test."));
        assert!(v
            .qnames
            .iter()
            .all(|e| e.key != "old.test." || e.failed == 1));
    }

    #[test]
    fn shards_merge_with_dominant_causes_and_distinct_upstreams() {
        let board = TopBoard::new(cfg());
        let up1: SocketAddr = "10.0.0.53:53".parse().unwrap();
        let up2: SocketAddr = "10.0.0.54:53".parse().unwrap();
        let mut a = board.shard();
        let mut b = board.shard();
        a.record(
            secs(1),
            &failure("x.test.", [10, 1, 1, 1], &[up1, up1, up1]),
        );
        b.record(secs(2), &failure("x.test.", [10, 1, 1, 1], &[up1, up2]));
        b.record(
            secs(3),
            &Failure {
                cause: Cause::UpstreamError,
                ..failure("x.test.", [10, 1, 1, 2], &[up2])
            },
        );
        b.record(
            secs(4),
            &Failure {
                cause: Cause::NoResponse,
                qname: None,
                client: None,
                upstreams: &[],
                workload: None,
                source: SourceId(8),
                qtype: None,
            },
        );
        a.publish(secs(4));
        drop(b); // a shard that ends publishes what it has
        let v = board.view(secs(4));
        assert_eq!(v.failed, 4);
        assert_eq!(v.causes[TIMEOUT as usize], 2);
        assert_eq!(v.causes[Cause::NoResponse as usize], 1);
        let x = &v.qnames[0];
        assert_eq!((x.key.as_str(), x.failed, x.error), ("x.test.", 3, 0));
        assert_eq!(x.dominant_cause(), Some(TIMEOUT));
        assert_eq!(v.clients[0].key, "10.1.1.1");
        assert_eq!(v.clients[0].failed, 2);
        let ups: Vec<(&str, u64)> = v
            .upstreams
            .iter()
            .map(|e| (e.key.as_str(), e.failed))
            .collect();
        assert_eq!(ups, [("10.0.0.53:53", 2), ("10.0.0.54:53", 2)]);
        let up2_row = &v.upstreams[1];
        assert_eq!(up2_row.causes[Cause::UpstreamError as usize], 1);
        assert_eq!(up2_row.causes[TIMEOUT as usize], 1);
        // A tie goes to the first cause in Cause::ALL order.
        assert_eq!(up2_row.dominant_cause(), Some(TIMEOUT));
    }

    #[test]
    fn merged_summaries_keep_the_guarantees_over_the_whole_window() {
        let k = 10;
        let board = TopBoard::new(TopConfig {
            capacity: k,
            buckets: 3,
            bucket: secs(10),
            rows: usize::MAX,
        });
        let mut shards = [board.shard(), board.shard(), board.shard()];
        let stream = skewed_stream(7, 9000, 500);
        let names: Vec<String> = (0..500).map(|i| format!("n{i}.test.")).collect();
        for (i, &key) in stream.iter().enumerate() {
            // Spread over shards and the three buckets of the window.
            let at = secs((i * 30 / stream.len()) as u64);
            shards[i % 3].record(at, &failure(&names[key as usize], [10, 0, 0, 1], &[]));
        }
        for s in &mut shards {
            s.publish(secs(29));
        }
        let v = board.view(secs(29));
        assert_eq!(v.failed, 9000);
        let counters: Vec<(u64, u64, u64)> = v
            .qnames
            .iter()
            .map(|e| {
                (
                    e.key[1..e.key.len() - 6].parse().unwrap(),
                    e.failed,
                    e.error,
                )
            })
            .collect();
        assert_guarantees(&counters, &true_counts(&stream), 9000, k);
    }

    #[test]
    fn long_names_keep_their_zone_and_the_memory_stays_bounded() {
        let label = "a".repeat(63);
        let long = format!("{label}.{label}.{label}.example.test.");
        let mut out = String::new();
        bounded_qname(&long, &mut out);
        assert!(out.len() <= MAX_QNAME_BYTES, "{}", out.len());
        assert!(
            out.starts_with("...") && out.ends_with(".example.test."),
            "{out}"
        );
        assert!(!out[3..].starts_with('.'));
        bounded_qname("short.test.", &mut out);
        assert_eq!(out, "short.test.");
        // A flood of distinct long names: K counters, each key no longer than the cut.
        let board = TopBoard::new(cfg());
        let mut shard = board.shard();
        for i in 0..10_000 {
            let name = format!("{label}.{label}.{label}.n{i}.example.test.");
            shard.record(secs(1), &failure(&name, [10, 0, 0, 1], &[]));
        }
        let s = shard.current.qnames.summary();
        assert_eq!(s.counters().len(), 10);
        assert!(s
            .counters()
            .iter()
            .all(|c| c.key.capacity() <= 2 * MAX_QNAME_BYTES));
        assert_eq!(shard.current.clients.summary().counters().len(), 1);
        // The sizes the module doc's memory bound is made of.
        use std::mem::size_of;
        assert!(size_of::<Counter<String>>() <= 136);
        assert!(size_of::<Counter<IpAddr>>() <= 136);
        assert!(size_of::<Counter<SocketAddr>>() <= 136);
        assert!(size_of::<Counter<SourceId>>() <= 136);
    }

    #[test]
    fn the_document_names_every_row_and_cause() {
        let sources = Arc::new(SourceRegistry::new(10, secs(600)));
        let (pod_a, pod_b) = (sources.intern(b"pod-a", b""), sources.intern(b"pod-b", b""));
        let board = TopBoard::naming(cfg(), sources);
        let mut shard = board.shard();
        let up: SocketAddr = "127.0.0.1:15402".parse().unwrap();
        let ups = [up];
        for i in 0..3 {
            let mut f = failure("www.example.test.", [127, 0, 0, 1], &ups);
            f.workload = (i < 2).then_some("team-a/web-1");
            f.source = pod_a;
            f.qtype = [Some(28), Some(1), Some(28)][i];
            shard.record(secs(1 + i as u64), &f);
        }
        for _ in 0..5 {
            shard.record_success(pod_a);
        }
        shard.record_success(pod_b);
        shard.publish(secs(3));
        let doc: serde_json::Value = serde_json::from_str(&board.view(secs(3)).to_json()).unwrap();
        assert_eq!(doc["window_seconds"], 120.0);
        assert_eq!(doc["sessions"], 9);
        assert_eq!(doc["failure_ratio"], 3.0 / 9.0);
        // The times are the board's wall clock: the view's, and each row's latest failure.
        let at = |d: Duration| board.view(d).time_text(d);
        assert_eq!(doc["updated_at"], at(secs(3)));
        assert_eq!(doc["qnames"][0]["last_failed_at"], at(secs(3)));
        // The board's seconds are the wall clock's: a row's time is a whole second.
        assert!(at(secs(3)).ends_with(".000000000Z"), "{}", at(secs(3)));
        assert_eq!(doc["qnames"][0]["qtypes"], serde_json::json!(["A", "AAAA"]));
        assert_eq!(doc["workloads"][0]["last_failed_at"], at(secs(2)));
        assert_eq!(doc["workloads"][0]["namespace"], "team-a");
        // Senders count every session: a failure ratio per CoreDNS pod.
        let pods = &doc["identities"];
        assert_eq!(pods[0]["identity"], "pod-a");
        assert_eq!(
            (&pods[0]["sessions"], &pods[0]["failed"]),
            (&8.into(), &3.into())
        );
        assert_eq!(pods[0]["failure_ratio"], 3.0 / 8.0);
        assert_eq!(pods[0]["cause"], "upstream_timeout");
        assert_eq!(pods[1]["identity"], "pod-b");
        assert_eq!(pods[1]["failure_ratio"], 0.0);
        assert_eq!(pods[1]["last_failed_at"], serde_json::Value::Null);
        assert_eq!(doc["failed"], 3);
        assert_eq!(doc["causes"]["upstream_timeout"], 3);
        assert_eq!(doc["qnames"][0]["qname"], "www.example.test.");
        assert_eq!(doc["qnames"][0]["failed"], 3);
        assert_eq!(doc["qnames"][0]["error"], 0);
        assert_eq!(doc["qnames"][0]["cause"], "upstream_timeout");
        assert_eq!(doc["clients"][0]["client"], "127.0.0.1");
        assert_eq!(doc["upstreams"][0]["upstream"], "127.0.0.1:15402");
        assert_eq!(doc["upstreams"][0]["causes"]["upstream_timeout"], 3);
        assert_eq!(doc["workloads"][0]["workload"], "team-a/web-1");
        assert_eq!(doc["workloads"][0]["failed"], 2);
    }
}
