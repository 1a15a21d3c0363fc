//! What the readers and shards count for the Prometheus endpoint, and how a scrape sums it.
//!
//! Counting stays off shared cache lines: each reader or shard thread owns a [`ThreadStats`]
//! and counts into plain integers in small maps keyed by already-interned ids. Once per tick
//! the owner calls [`ThreadStats::publish`], which adds those deltas into the thread's
//! published copy under a mutex that only the owner and the scraper ever take, and clears the
//! deltas (keeping their capacity, so steady state allocates nothing). A scrape locks each
//! published copy in turn and sums them ([`Telemetry::snapshot`]).
//!
//! Cardinality is bounded twice. [`LabelCap`]: the first `cap` identities and upstreams keep
//! their own label; later ones are counted under `other`, and the overflow is counted too. And
//! the [`SeriesBudget`], in exposed samples per family and in all: a label set new to a thread
//! is admitted when it publishes (once per tick, off the per-session path) while the budget
//! has room; beyond it, its sender-chosen labels collapse to `other` and the recordings are
//! counted in `series_overflow_total`.
//!
//! Identities come and go (CoreDNS pods roll): once the registry reclaims one, each scrape
//! folds its counts into `identity="reclaimed"` and frees its label slot and its budget.

use super::health::Health;
use super::Metrics;
use crate::correlate::{LossReason, Status};
use crate::diagnosis::Diagnosis;
use crate::dnstap::{Liveness, Nanos, Role, SourceId, SourceRegistry};
use hashbrown::{HashMap, HashSet};
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// The `cause` and `outcome` labels are the diagnosis's, defined once there.
pub use crate::diagnosis::{AttemptOutcome, Cause};

/// The `type` label of `messages_total`; RESOLVER_* count as FORWARDER_*.
pub fn message_type_name(role: Role) -> &'static str {
    match role {
        Role::ClientQuery => "CLIENT_QUERY",
        Role::ClientResponse => "CLIENT_RESPONSE",
        Role::UpstreamQuery => "FORWARDER_QUERY",
        Role::UpstreamResponse => "FORWARDER_RESPONSE",
    }
}

/// Upper bounds of the latency histograms, in seconds (the contract's buckets).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0,
    5.0, 10.0,
];

/// The same bounds in nanoseconds, so observing needs no float arithmetic.
const BUCKET_NANOS: [Nanos; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Fixed buckets (not cumulative; the last one is `+Inf`) and the sum of the observations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram {
    pub counts: [u64; 17],
    pub sum_nanos: u128,
}

impl Histogram {
    pub fn observe(&mut self, v: Nanos) {
        // `le` is inclusive: a value equal to a bound belongs to that bound's bucket.
        self.counts[BUCKET_NANOS.partition_point(|&b| b < v)] += 1;
        self.sum_nanos += v as u128;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_nanos as f64 / 1e9
    }
}

/// The last key a map of the delta was counted under, and what was counted under it since:
/// added to the map when another key comes, or at publish. A shard's sessions come in runs of
/// one sender, cause and upstream, and each map lookup costs a hash and a probe.
#[derive(Debug)]
struct Run<K, V> {
    key: Option<K>,
    pending: V,
}

impl<K, V: Default> Default for Run<K, V> {
    fn default() -> Self {
        let (key, pending) = (None, V::default());
        Self { key, pending }
    }
}

impl<K: Copy + Eq + Hash, V: Merge + Default> Run<K, V> {
    fn at(&mut self, key: K, map: &mut HashMap<K, V>) -> &mut V {
        if self.key != Some(key) {
            self.flush(map);
            self.key = Some(key);
        }
        &mut self.pending
    }

    fn flush(&mut self, map: &mut HashMap<K, V>) {
        if let Some(k) = self.key.take() {
            map.entry(k)
                .or_default()
                .merge(&std::mem::take(&mut self.pending));
        }
    }
}

/// The runs of [`ThreadStats::record_session`]'s maps.
#[derive(Debug, Default)]
struct SessionRuns {
    sessions: Run<SessionKey, u64>,
    attempts: Run<AttemptKey, u64>,
    upstream_rtt: Run<UpstreamLabel, Histogram>,
    client_latency: Run<(IdentityLabel, Cause), Histogram>,
}

impl SessionRuns {
    fn flush(&mut self, into: &mut Counts) {
        self.sessions.flush(&mut into.sessions);
        self.attempts.flush(&mut into.attempts);
        self.upstream_rtt.flush(&mut into.upstream_rtt);
        self.client_latency.flush(&mut into.client_latency);
    }
}

/// Identity label key: the interned source, `other` past the cap or the series budget, or
/// `reclaimed` for the counts of identities the registry let go of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityLabel {
    Source(SourceId),
    Other,
    Reclaimed,
}

/// Upstream label key: the forwarder target, `unknown` when the sender gave none, or `other`
/// past the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UpstreamLabel {
    Addr(SocketAddr),
    Unknown,
    Other,
}

/// Namespace label key (the client workload's, from the sender's `extra`): an admitted name's
/// number in [`Namespaces`], `none` when the session names none, or `other` past the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamespaceLabel {
    Name(u32),
    None,
    Other,
}

/// The namespaces that have a label value of their own: at most `cap`, first come first
/// served, process-wide (like identities), numbered in the order they came.
#[derive(Debug)]
pub struct Namespaces {
    cap: usize,
    admitted: Mutex<NamespaceIds>,
}

/// Each admitted namespace's number, and the names by number.
type NamespaceIds = (HashMap<Arc<str>, u32>, Vec<Arc<str>>);

impl Namespaces {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            admitted: Mutex::new((HashMap::new(), Vec::new())),
        }
    }

    /// The label of `name`: its number, or `Other` once `cap` others have one.
    fn admit(&self, name: &str) -> NamespaceLabel {
        let mut g = lock(&self.admitted);
        let (ids, names) = &mut *g;
        if let Some(&id) = ids.get(name) {
            return NamespaceLabel::Name(id);
        }
        if names.len() >= self.cap {
            return NamespaceLabel::Other;
        }
        let name: Arc<str> = name.into();
        let id = names.len() as u32;
        ids.insert(name.clone(), id);
        names.push(name);
        NamespaceLabel::Name(id)
    }

    /// The label value of `l`.
    pub fn name(&self, l: NamespaceLabel) -> Arc<str> {
        match l {
            NamespaceLabel::Name(id) => lock(&self.admitted).1[id as usize].clone(),
            NamespaceLabel::None => "none".into(),
            NamespaceLabel::Other => "other".into(),
        }
    }
}

/// Admits at most `cap` distinct values of one label, first come first served, process-wide.
#[derive(Debug)]
pub struct LabelCap<K> {
    cap: usize,
    admitted: Mutex<HashSet<K>>,
}

impl<K: Hash + Eq + Copy> LabelCap<K> {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            admitted: Mutex::new(HashSet::new()),
        }
    }

    /// True when `k` has (or now gets) a label of its own.
    pub fn admit(&self, k: K) -> bool {
        let mut set = lock(&self.admitted);
        if set.contains(&k) {
            return true;
        }
        if set.len() < self.cap {
            set.insert(k);
            return true;
        }
        false
    }

    /// Remembered answers per thread, so the lock is taken once per new value per thread. The
    /// cache starts over at a bound so that neither a flood of over-the-cap values nor values
    /// that come and go over the process's life grow it.
    fn admit_cached(&self, cache: &mut HashMap<K, bool>, k: K) -> bool {
        if let Some(&ok) = cache.get(&k) {
            return ok;
        }
        let ok = self.admit(k);
        if cache.len() >= self.cap * 2 + 64 {
            cache.clear();
        }
        cache.insert(k, ok);
        ok
    }

    /// [`LabelCap::admit_cached`] behind the answer it gave last (`last`), which a shard asks
    /// for again and again: its sessions come in runs of one sender and upstream.
    fn admit_again(
        &self,
        cache: &mut HashMap<K, bool>,
        last: &mut Option<(K, bool)>,
        k: K,
    ) -> bool {
        match *last {
            Some((l, ok)) if l == k => ok,
            _ => {
                let ok = self.admit_cached(cache, k);
                *last = Some((k, ok));
                ok
            }
        }
    }

    /// Frees the slots of the values `keep` rejects.
    fn retain(&self, keep: impl Fn(&K) -> bool) {
        lock(&self.admitted).retain(|k| keep(k));
    }

    fn contains(&self, k: &K) -> bool {
        lock(&self.admitted).contains(k)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `sessions_total` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SessionKey {
    pub identity: IdentityLabel,
    pub namespace: NamespaceLabel,
    /// The client's rcode (4-bit header rcode); `None` without a CR. See [`rcode_label`].
    pub rcode: Option<u8>,
    /// Index into [`QTYPE_LABELS`].
    pub qtype: u8,
    pub status: Status,
    pub bitmap: u8,
    pub cause: Cause,
}

/// Hashed in one write rather than one per field and per enum tag, as derived: every
/// finished session looks its key up.
impl Hash for SessionKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let identity = match self.identity {
            IdentityLabel::Source(SourceId(id)) => u64::from(id),
            IdentityLabel::Other => 1 << 32,
            IdentityLabel::Reclaimed => 2 << 32,
        };
        let namespace = match self.namespace {
            NamespaceLabel::Name(n) => u64::from(n),
            NamespaceLabel::None => 1 << 32,
            NamespaceLabel::Other => 2 << 32,
        };
        let small = u64::from(self.rcode.map_or(0x100, u16::from))
            | u64::from(self.qtype) << 9
            | (self.status as u64) << 13
            | u64::from(self.bitmap) << 15
            | (self.cause as u64) << 19;
        state.write_u128(u128::from(identity | small << 34) << 64 | u128::from(namespace));
    }
}

/// `upstream_attempts_total` key.
pub type AttemptKey = (IdentityLabel, UpstreamLabel, AttemptOutcome);

/// The `rcode` label: the IANA mnemonic of the client's rcode, `none` without a response,
/// `other` for codes IANA has not assigned.
pub fn rcode_label(rcode: Option<u8>) -> &'static str {
    match rcode {
        None => "none",
        Some(0) => "NOERROR",
        Some(1) => "FORMERR",
        Some(2) => "SERVFAIL",
        Some(3) => "NXDOMAIN",
        Some(4) => "NOTIMP",
        Some(5) => "REFUSED",
        Some(6) => "YXDOMAIN",
        Some(7) => "YXRRSET",
        Some(8) => "NXRRSET",
        Some(9) => "NOTAUTH",
        Some(10) => "NOTZONE",
        Some(11) => "DSOTYPENI",
        Some(_) => "other",
    }
}

/// The `qtype` label's values: the types a cluster's clients ask for, and `other` (the last).
pub const QTYPE_LABELS: [(u16, &str); 13] = [
    (1, "A"),
    (28, "AAAA"),
    (5, "CNAME"),
    (12, "PTR"),
    (33, "SRV"),
    (15, "MX"),
    (16, "TXT"),
    (2, "NS"),
    (6, "SOA"),
    (65, "HTTPS"),
    (64, "SVCB"),
    (255, "ANY"),
    (0, "other"),
];

/// The index of `qtype`'s label in [`QTYPE_LABELS`] (`other` for the rest, and without one).
pub fn qtype_label(qtype: Option<u16>) -> u8 {
    let last = QTYPE_LABELS.len() - 1;
    let i = qtype.and_then(|t| QTYPE_LABELS[..last].iter().position(|&(v, _)| v == t));
    i.unwrap_or(last) as u8
}

/// Which label's cap was hit: the `label` label of `label_overflow_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CappedLabel {
    Identity,
    Upstream,
    Namespace,
}

impl CappedLabel {
    pub const ALL: [CappedLabel; 3] = [Self::Identity, Self::Upstream, Self::Namespace];

    pub fn name(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Upstream => "upstream",
            Self::Namespace => "namespace",
        }
    }
}

/// A family whose label sets senders multiply (identities × upstreams × namespaces × what
/// their sessions look like): each is bounded by the series budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesFamily {
    Sessions,
    UpstreamAttempts,
    UpstreamRtt,
    ClientLatency,
    Messages,
    WatermarkLag,
    EvictedByIdentity,
}

impl SeriesFamily {
    pub const ALL: [SeriesFamily; 7] = [
        Self::Sessions,
        Self::UpstreamAttempts,
        Self::UpstreamRtt,
        Self::ClientLatency,
        Self::Messages,
        Self::WatermarkLag,
        Self::EvictedByIdentity,
    ];

    /// The `family` label of `series_overflow_total`: the family's name without the prefix.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sessions => "sessions_total",
            Self::UpstreamAttempts => "upstream_attempts_total",
            Self::UpstreamRtt => "upstream_rtt_seconds",
            Self::ClientLatency => "client_latency_seconds",
            Self::Messages => "messages_total",
            Self::WatermarkLag => "watermark_lag_seconds",
            Self::EvictedByIdentity => "sessions_evicted_by_identity_total",
        }
    }

    /// Samples one label set exposes: a histogram's 17 buckets, sum and count; a message
    /// counter's four types.
    pub fn samples(self) -> usize {
        match self {
            Self::UpstreamRtt | Self::ClientLatency => LATENCY_BUCKETS.len() + 3,
            Self::Messages => 4,
            _ => 1,
        }
    }
}

/// `--max-series-per-family` and `--max-series`: exposed samples the sender-multiplied
/// families may hold, each and in all. The label sets collapsed to `other` (and the
/// `reclaimed` ones) come on top, bounded by the fixed values of their other labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeriesBudget {
    pub per_family: usize,
    pub total: usize,
}

impl Default for SeriesBudget {
    fn default() -> Self {
        Self {
            per_family: 10_000,
            total: 30_000,
        }
    }
}

/// The label sets admitted under the budget, process-wide, by family.
#[derive(Debug, Default)]
struct AdmittedSets {
    sessions: HashSet<SessionKey>,
    attempts: HashSet<AttemptKey>,
    upstream_rtt: HashSet<UpstreamLabel>,
    client_latency: HashSet<(IdentityLabel, Cause)>,
    messages: HashSet<IdentityLabel>,
    latest_event: HashSet<IdentityLabel>,
    evicted: HashSet<IdentityLabel>,
}

#[derive(Debug, Default)]
struct Admitted {
    sets: AdmittedSets,
    /// Samples of every admitted label set.
    samples: usize,
}

impl Admitted {
    /// True when `key` has (or now gets) a series of its own in `family`.
    fn admit<K: Hash + Eq + Copy>(
        &mut self,
        budget: &SeriesBudget,
        family: SeriesFamily,
        set: fn(&mut AdmittedSets) -> &mut HashSet<K>,
        key: K,
    ) -> bool {
        let set = set(&mut self.sets);
        if set.contains(&key) {
            return true;
        }
        let w = family.samples();
        if (set.len() + 1) * w > budget.per_family || self.samples + w > budget.total {
            return false;
        }
        set.insert(key);
        self.samples += w;
        true
    }

    /// Frees the label sets of the identities `live` rejects.
    fn forget(&mut self, live: &impl Fn(IdentityLabel) -> bool) {
        let s = &mut self.sets;
        s.sessions.retain(|k| live(k.identity));
        s.attempts.retain(|k| live(k.0));
        s.client_latency.retain(|k| live(k.0));
        s.messages.retain(|&k| live(k));
        s.latest_event.retain(|&k| live(k));
        s.evicted.retain(|&k| live(k));
        let f = |n: usize, family: SeriesFamily| n * family.samples();
        self.samples = f(s.sessions.len(), SeriesFamily::Sessions)
            + f(s.attempts.len(), SeriesFamily::UpstreamAttempts)
            + f(s.upstream_rtt.len(), SeriesFamily::UpstreamRtt)
            + f(s.client_latency.len(), SeriesFamily::ClientLatency)
            + f(s.messages.len(), SeriesFamily::Messages)
            + f(s.latest_event.len(), SeriesFamily::WatermarkLag)
            + f(s.evicted.len(), SeriesFamily::EvictedByIdentity);
    }
}

/// A `SessionKey` past the budget: every label a sender chooses is `other`.
fn collapsed_session(k: SessionKey) -> SessionKey {
    SessionKey {
        identity: IdentityLabel::Other,
        namespace: NamespaceLabel::Other,
        rcode: k.rcode.map(|_| OTHER_RCODE),
        qtype: qtype_label(None),
        ..k
    }
}

/// An rcode [`rcode_label`] names `other` (IANA has not assigned 12-15).
const OTHER_RCODE: u8 = 15;

/// Everything one thread counts; also the shape of a published copy and of a scrape's sum.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub sessions: HashMap<SessionKey, u64>,
    pub attempts: HashMap<AttemptKey, u64>,
    pub upstream_rtt: HashMap<UpstreamLabel, Histogram>,
    pub client_latency: HashMap<(IdentityLabel, Cause), Histogram>,
    /// Indexed like `Role` (CQ, CR, FQ, FR).
    pub messages: HashMap<IdentityLabel, [u64; 4]>,
    /// Latest event time seen per identity (max, not a sum).
    pub latest_event: HashMap<IdentityLabel, Nanos>,
    /// Sessions evicted from a full table, by identity (the flood's own, with fair eviction).
    pub evicted: HashMap<IdentityLabel, u64>,
    /// Recordings put under `other`, indexed like `CappedLabel::ALL`.
    pub overflow: [u64; 3],
    /// Recordings put under collapsed label sets by the series budget, indexed like
    /// `SeriesFamily::ALL`.
    pub series_overflow: [u64; 7],
}

trait Merge {
    fn merge(&mut self, other: &Self);
}

impl Merge for u64 {
    fn merge(&mut self, other: &Self) {
        *self += other;
    }
}

impl Merge for [u64; 4] {
    fn merge(&mut self, other: &Self) {
        for (a, b) in self.iter_mut().zip(other) {
            *a += b;
        }
    }
}

impl Merge for Histogram {
    fn merge(&mut self, other: &Self) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum_nanos += other.sum_nanos;
    }
}

fn add_into<K: Hash + Eq + Copy, V: Merge + Default>(
    into: &mut HashMap<K, V>,
    from: impl Iterator<Item = (K, V)>,
) {
    for (k, v) in from {
        into.entry(k).or_default().merge(&v);
    }
}

/// How a family adds a value into another, and how many recordings a value holds.
type MergeWeight<V> = (fn(&mut V, &V), fn(&V) -> u64);

/// Moves `from` into `into`, emptying `from` and keeping its allocation. A key `into` holds
/// adds to it; a new one needs `admit`, or its value goes under `collapse(key)` and its
/// weight into `overflow`. A key collapsed already (the label caps' `other`) takes no budget:
/// those are bounded like the collapsed ones.
fn absorb_family<K: Hash + Eq + Copy, V: Default>(
    (into, from): (&mut HashMap<K, V>, &mut HashMap<K, V>),
    mut admit: impl FnMut(K) -> bool,
    collapse: fn(K) -> K,
    (merge, weight): MergeWeight<V>,
    overflow: &mut u64,
) {
    for (k, v) in from.drain() {
        let k = if into.contains_key(&k) || collapse(k) == k || admit(k) {
            k
        } else {
            *overflow += weight(&v);
            collapse(k)
        };
        merge(into.entry(k).or_default(), &v);
    }
}

/// The budget's lock, taken at the first label set new to a thread's published copy, and
/// held to the end of its publish.
struct Admission<'a> {
    guard: Option<MutexGuard<'a, Admitted>>,
    admitted: &'a Mutex<Admitted>,
    budget: &'a SeriesBudget,
}

impl Admission<'_> {
    fn admit<K: Hash + Eq + Copy>(
        &mut self,
        family: SeriesFamily,
        set: fn(&mut AdmittedSets) -> &mut HashSet<K>,
        k: K,
    ) -> bool {
        let admitted = self.admitted;
        let a = self.guard.get_or_insert_with(|| lock(admitted));
        a.admit(self.budget, family, set, k)
    }
}

/// Moves the values whose key `moved` renames under the new key.
fn fold_keys<K: Hash + Eq + Copy, V: Merge + Default>(
    map: &mut HashMap<K, V>,
    moved: impl Fn(&K) -> Option<K>,
) {
    let gone: Vec<(K, K)> = map.keys().filter_map(|k| Some((*k, moved(k)?))).collect();
    for (old, new) in gone {
        if let Some(v) = map.remove(&old) {
            map.entry(new).or_default().merge(&v);
        }
    }
}

fn sum_merge<V: Merge>(a: &mut V, b: &V) {
    a.merge(b);
}

fn max_merge(a: &mut Nanos, b: &Nanos) {
    *a = (*a).max(*b);
}

impl Counts {
    /// Adds `delta` into `self` (a thread's published copy) and empties `delta`, keeping its
    /// allocations; label sets new to `self` are admitted under the series budget.
    fn absorb(&mut self, delta: &mut Counts, admitted: &Mutex<Admitted>, budget: &SeriesBudget) {
        use SeriesFamily as F;
        let mut adm = Admission {
            guard: None,
            admitted,
            budget,
        };
        let over = &mut self.series_overflow;
        let counts = (
            sum_merge as fn(&mut u64, &u64),
            (|v: &u64| *v) as fn(&u64) -> u64,
        );
        let histograms = (
            sum_merge as fn(&mut Histogram, &Histogram),
            Histogram::count as fn(&Histogram) -> u64,
        );
        absorb_family(
            (&mut self.sessions, &mut delta.sessions),
            |k| adm.admit(F::Sessions, |s| &mut s.sessions, k),
            collapsed_session,
            counts,
            &mut over[F::Sessions as usize],
        );
        absorb_family(
            (&mut self.attempts, &mut delta.attempts),
            |k| adm.admit(F::UpstreamAttempts, |s| &mut s.attempts, k),
            |(_, _, o)| (IdentityLabel::Other, UpstreamLabel::Other, o),
            counts,
            &mut over[F::UpstreamAttempts as usize],
        );
        absorb_family(
            (&mut self.upstream_rtt, &mut delta.upstream_rtt),
            |k| adm.admit(F::UpstreamRtt, |s| &mut s.upstream_rtt, k),
            |_| UpstreamLabel::Other,
            histograms,
            &mut over[F::UpstreamRtt as usize],
        );
        absorb_family(
            (&mut self.client_latency, &mut delta.client_latency),
            |k| adm.admit(F::ClientLatency, |s| &mut s.client_latency, k),
            |(_, cause)| (IdentityLabel::Other, cause),
            histograms,
            &mut over[F::ClientLatency as usize],
        );
        absorb_family(
            (&mut self.messages, &mut delta.messages),
            |k| adm.admit(F::Messages, |s| &mut s.messages, k),
            |_| IdentityLabel::Other,
            (sum_merge, |v| v.iter().sum()),
            &mut over[F::Messages as usize],
        );
        absorb_family(
            (&mut self.latest_event, &mut delta.latest_event),
            |k| adm.admit(F::WatermarkLag, |s| &mut s.latest_event, k),
            |_| IdentityLabel::Other,
            (max_merge, |_| 1),
            &mut over[F::WatermarkLag as usize],
        );
        absorb_family(
            (&mut self.evicted, &mut delta.evicted),
            |k| adm.admit(F::EvictedByIdentity, |s| &mut s.evicted, k),
            |_| IdentityLabel::Other,
            counts,
            &mut over[F::EvictedByIdentity as usize],
        );
        for (a, b) in self.overflow.iter_mut().zip(&mut delta.overflow) {
            *a += std::mem::take(b);
        }
    }

    /// Moves the counts of the identities `live` rejects (reclaimed ones) under
    /// `identity="reclaimed"`, so that sums stay whole, and drops their watermarks.
    fn fold_reclaimed(&mut self, live: &impl Fn(IdentityLabel) -> bool) {
        let gone = |l: IdentityLabel| (!live(l)).then_some(IdentityLabel::Reclaimed);
        fold_keys(&mut self.sessions, |k| {
            let identity = gone(k.identity)?;
            Some(SessionKey { identity, ..*k })
        });
        fold_keys(&mut self.attempts, |&(i, u, o)| Some((gone(i)?, u, o)));
        fold_keys(&mut self.client_latency, |&(i, c)| Some((gone(i)?, c)));
        fold_keys(&mut self.messages, |&i| gone(i));
        fold_keys(&mut self.evicted, |&i| gone(i));
        self.latest_event.retain(|&i, _| live(i));
    }

    /// Adds a published copy into a scrape's sum.
    fn add(&mut self, other: &Counts) {
        add_into(
            &mut self.sessions,
            other.sessions.iter().map(|(k, v)| (*k, *v)),
        );
        add_into(
            &mut self.attempts,
            other.attempts.iter().map(|(k, v)| (*k, *v)),
        );
        let rtt = other.upstream_rtt.iter().map(|(k, v)| (*k, v.clone()));
        add_into(&mut self.upstream_rtt, rtt);
        let latency = other.client_latency.iter().map(|(k, v)| (*k, v.clone()));
        add_into(&mut self.client_latency, latency);
        add_into(
            &mut self.messages,
            other.messages.iter().map(|(k, v)| (*k, *v)),
        );
        self.merge_latest(other.latest_event.iter().map(|(k, v)| (*k, *v)));
        add_into(
            &mut self.evicted,
            other.evicted.iter().map(|(k, v)| (*k, *v)),
        );
        for (a, b) in self.overflow.iter_mut().zip(&other.overflow) {
            *a += b;
        }
        for (a, b) in self.series_overflow.iter_mut().zip(&other.series_overflow) {
            *a += b;
        }
    }

    fn merge_latest(&mut self, from: impl Iterator<Item = (IdentityLabel, Nanos)>) {
        for (k, t) in from {
            let e = self.latest_event.entry(k).or_insert(0);
            *e = (*e).max(t);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
            && self.attempts.is_empty()
            && self.upstream_rtt.is_empty()
            && self.client_latency.is_empty()
            && self.messages.is_empty()
            && self.latest_event.is_empty()
            && self.evicted.is_empty()
            && self.overflow == [0; 3]
            && self.series_overflow == [0; 7]
    }
}

/// Which kind of thread a `ThreadStats` belongs to; shards also export per-shard gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Reader(usize),
    Shard(usize),
}

/// The part of a thread's stats the scraper reads.
#[derive(Debug)]
struct Published {
    kind: ThreadKind,
    counts: Mutex<Counts>,
    /// Written by the owning shard only.
    open_sessions: AtomicU64,
}

/// Settings of the metric model (flags, later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// `--max-identity-labels`.
    pub max_identity_labels: usize,
    /// `--max-upstream-labels`.
    pub max_upstream_labels: usize,
    /// A stage with work pending and no progress for this long makes `/healthz` fail.
    pub stall_after: Duration,
    pub series: SeriesBudget,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            max_identity_labels: 256,
            max_upstream_labels: 256,
            stall_after: Duration::from_secs(30),
            series: SeriesBudget::default(),
        }
    }
}

/// Reads a gauge owned elsewhere (e.g. the open connections), at scrape.
pub type CountProbe = Box<dyn Fn() -> u64 + Send + Sync>;

/// `/top` on demand (on the metrics server's thread): its JSON document, and the failing names
/// the `top_failing_names` family exports. One value, so that whatever leaves `/top` out leaves
/// the family out too.
pub trait TopSource: Send + Sync {
    fn document(&self) -> String;
    fn failing_names(&self) -> Vec<FailingName>;
}

/// A fixed `/top` document without failing names (tests of the endpoint, embedders).
impl<F: Fn() -> String + Send + Sync> TopSource for F {
    fn document(&self) -> String {
        self()
    }

    fn failing_names(&self) -> Vec<FailingName> {
        Vec::new()
    }
}

/// The `/top` registration.
pub type TopHook = Arc<dyn TopSource>;

/// A qname with many Failed sessions in `/top`'s window: a series of `top_failing_names`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailingName {
    pub qname: String,
    /// The cause most of its failures had.
    pub cause: Cause,
    /// Failed sessions in the window (an upper bound; see `metrics::top`).
    pub failed: u64,
}

/// Everything the metrics endpoint shows: the process-wide counters, the per-thread stats,
/// the gauges the pipeline registers, and the health of each stage.
pub struct Telemetry {
    /// The existing global counters (they also feed the exit summary).
    pub metrics: Arc<Metrics>,
    pub health: Health,
    sources: Arc<SourceRegistry>,
    identities: LabelCap<SourceId>,
    upstreams: LabelCap<SocketAddr>,
    /// Capped like the identities (`--max-identity-labels`).
    pub namespaces: Namespaces,
    series: SeriesBudget,
    admitted: Mutex<Admitted>,
    /// The registry's reclaim count when a recording thread last freed their label slots.
    reclaims_freed: AtomicU64,
    threads: Mutex<Vec<Arc<Published>>>,
    queue_depths: OnceLock<Arc<[AtomicU64]>>,
    queue_capacity: AtomicU64,
    connections_open: OnceLock<CountProbe>,
    top: OnceLock<TopHook>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    pub fn new(metrics: Arc<Metrics>, sources: Arc<SourceRegistry>, cfg: TelemetryConfig) -> Self {
        Self {
            metrics,
            health: Health::new(cfg.stall_after),
            sources,
            identities: LabelCap::new(cfg.max_identity_labels),
            upstreams: LabelCap::new(cfg.max_upstream_labels),
            namespaces: Namespaces::new(cfg.max_identity_labels),
            series: cfg.series,
            admitted: Mutex::default(),
            reclaims_freed: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
            queue_depths: OnceLock::new(),
            queue_capacity: AtomicU64::new(0),
            connections_open: OnceLock::new(),
            top: OnceLock::new(),
        }
    }

    /// Stats for one reader or shard thread; call before spawning it and move it in.
    pub fn thread_stats(self: &Arc<Self>, kind: ThreadKind) -> ThreadStats {
        let published = Arc::new(Published {
            kind,
            counts: Mutex::new(Counts::default()),
            open_sessions: AtomicU64::new(0),
        });
        lock(&self.threads).push(published.clone());
        ThreadStats {
            telemetry: self.clone(),
            published,
            delta: Counts::default(),
            runs: SessionRuns::default(),
            identity_cache: HashMap::new(),
            last_identity: None,
            reclaims_seen: self.sources.reclaims(),
            upstream_cache: HashMap::new(),
            last_upstream: None,
            namespace_cache: HashMap::new(),
        }
    }

    /// The shards' queue depths (`ingest::QueueDepths`) and their capacity, read at scrape.
    pub fn set_queues(&self, depths: Arc<[AtomicU64]>, capacity: u64) {
        let _ = self.queue_depths.set(depths);
        self.queue_capacity.store(capacity, Relaxed);
    }

    /// Reads the count of open dnstap connections at scrape (the readers keep it).
    pub fn set_connections_open(&self, open: CountProbe) {
        let _ = self.connections_open.set(open);
    }

    /// Plugs in the `/top` document; until then `/top` answers 404. Only the first call counts.
    pub fn set_top(&self, hook: TopHook) {
        let _ = self.top.set(hook);
    }

    pub fn top(&self) -> Option<String> {
        self.top.get().map(|t| t.document())
    }

    /// The `top_failing_names` series; `None` while `/top` is not served.
    pub fn top_failing_names(&self) -> Option<Vec<FailingName>> {
        self.top.get().map(|t| t.failing_names())
    }

    /// Sums every thread's published stats and reads the gauges. The counts of identities
    /// reclaimed since are folded under `reclaimed` first, for good (see `free_reclaimed`).
    pub fn snapshot(&self) -> Snapshot {
        let liveness = self.free_reclaimed();
        let live = |l| match l {
            IdentityLabel::Source(id) => liveness.is_live(id),
            _ => true,
        };
        let mut counts = Counts::default();
        let mut open_sessions = Vec::new();
        for p in lock(&self.threads).iter() {
            let mut published = lock(&p.counts);
            published.fold_reclaimed(&live);
            counts.add(&published);
            drop(published);
            if let ThreadKind::Shard(i) = p.kind {
                open_sessions.push((i, p.open_sessions.load(Relaxed)));
            }
        }
        open_sessions.sort_unstable();
        let queue_depths = self
            .queue_depths
            .get()
            .map(|d| d.iter().map(|a| a.load(Relaxed)).collect())
            .unwrap_or_default();
        Snapshot {
            counts,
            open_sessions,
            queue_depths,
            queue_capacity: self.queue_capacity.load(Relaxed),
            connections_open: self.connections_open.get().map(|open| open()),
        }
    }

    /// Frees the label slots and the series budget of the identities the registry reclaimed;
    /// returns the liveness it went by. Their series leave at the next scrape.
    fn free_reclaimed(&self) -> Liveness {
        let liveness = self.sources.liveness();
        let live = |l| match l {
            IdentityLabel::Source(id) => liveness.is_live(id),
            _ => true,
        };
        self.identities.retain(|&id| liveness.is_live(id));
        lock(&self.admitted).forget(&live);
        liveness
    }

    /// `identity_stopped`: every identity with a label of its own, and whether it stopped
    /// (no stream carries it, and the last one ended with STOP).
    pub fn identities_stopped(&self) -> Vec<(IdentityLabel, bool)> {
        let stopped = self.sources.stopped();
        let labelled = stopped
            .into_iter()
            .filter(|(id, _)| self.identities.contains(id));
        labelled
            .map(|(id, s)| (IdentityLabel::Source(id), s))
            .collect()
    }

    /// The identities the stages intern and the labels name.
    pub fn sources(&self) -> &Arc<SourceRegistry> {
        &self.sources
    }

    /// The label value of an identity.
    pub fn identity_name(&self, l: IdentityLabel) -> String {
        match l {
            IdentityLabel::Source(id) => self.sources.describe(id).0.to_string(),
            IdentityLabel::Other => "other".into(),
            IdentityLabel::Reclaimed => "reclaimed".into(),
        }
    }
}

pub fn upstream_name(l: UpstreamLabel) -> String {
    match l {
        UpstreamLabel::Addr(a) => a.to_string(),
        UpstreamLabel::Unknown => "unknown".into(),
        UpstreamLabel::Other => "other".into(),
    }
}

/// One scrape's view: summed counts and the gauges read at that moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub counts: Counts,
    /// (shard, open sessions), by shard.
    pub open_sessions: Vec<(usize, u64)>,
    /// Events waiting, indexed by shard.
    pub queue_depths: Vec<u64>,
    pub queue_capacity: u64,
    /// `None` until the pipeline registers the counter (file mode has no connections).
    pub connections_open: Option<u64>,
}

/// The stats one reader or shard thread owns. Recording touches only thread-local maps;
/// `publish` once per tick makes them visible to scrapes. Dropping it publishes what is left.
pub struct ThreadStats {
    telemetry: Arc<Telemetry>,
    published: Arc<Published>,
    delta: Counts,
    /// Counted but not yet in `delta`: flushed into it at publish.
    runs: SessionRuns,
    identity_cache: HashMap<SourceId, bool>,
    /// The last answer of `identity_cache` (see `LabelCap::admit_again`).
    last_identity: Option<(SourceId, bool)>,
    /// The registry's reclaim count when `identity_cache` was last cleared: a reclaim may
    /// have freed label slots that cached refusals would still deny.
    reclaims_seen: u64,
    upstream_cache: HashMap<SocketAddr, bool>,
    /// The last answer of `upstream_cache`; an upstream's answer never changes, as upstream
    /// slots are never freed.
    last_upstream: Option<(SocketAddr, bool)>,
    /// Namespaces this thread has labelled, so the lock is taken once per new name; it stops
    /// growing at a bound, as `LabelCap`'s cache does.
    namespace_cache: HashMap<Box<str>, NamespaceLabel>,
}

impl ThreadStats {
    fn identity(&mut self, id: SourceId) -> IdentityLabel {
        let reclaims = self.telemetry.sources.reclaims();
        if reclaims != self.reclaims_seen {
            self.reclaims_seen = reclaims;
            self.identity_cache.clear();
            self.last_identity = None;
            // One thread frees the slots per change of the count, not each of them.
            let freed = self.telemetry.reclaims_freed.swap(reclaims, Relaxed);
            if freed != reclaims {
                self.telemetry.free_reclaimed();
            }
        }
        let (cache, last) = (&mut self.identity_cache, &mut self.last_identity);
        if self.telemetry.identities.admit_again(cache, last, id) {
            IdentityLabel::Source(id)
        } else {
            self.delta.overflow[CappedLabel::Identity as usize] += 1;
            IdentityLabel::Other
        }
    }

    fn upstream(&mut self, addr: Option<SocketAddr>) -> UpstreamLabel {
        let Some(addr) = addr else {
            return UpstreamLabel::Unknown;
        };
        let (cache, last) = (&mut self.upstream_cache, &mut self.last_upstream);
        if self.telemetry.upstreams.admit_again(cache, last, addr) {
            UpstreamLabel::Addr(addr)
        } else {
            self.delta.overflow[CappedLabel::Upstream as usize] += 1;
            UpstreamLabel::Other
        }
    }

    fn namespace(&mut self, name: Option<&str>) -> NamespaceLabel {
        let Some(name) = name else {
            return NamespaceLabel::None;
        };
        let label = match self.namespace_cache.get(name) {
            Some(&l) => l,
            None => {
                let l = self.telemetry.namespaces.admit(name);
                if self.namespace_cache.len() < self.telemetry.namespaces.cap * 2 + 64 {
                    self.namespace_cache.insert(name.into(), l);
                }
                l
            }
        };
        if label == NamespaceLabel::Other {
            self.delta.overflow[CappedLabel::Namespace as usize] += 1;
        }
        label
    }

    /// Shard thread, once per finished session: counts the session under its diagnosed
    /// cause, its attempts, their RTTs and the client latency (CQ → CR).
    pub fn record_session(&mut self, d: &Diagnosis) {
        let identity = self.identity(d.source);
        for a in &d.attempts {
            let upstream = self.upstream(a.upstream);
            let key = (identity, upstream, a.outcome());
            *self.runs.attempts.at(key, &mut self.delta.attempts) += 1;
            if let Some(rtt) = a.rtt {
                let runs = &mut self.runs.upstream_rtt;
                runs.at(upstream, &mut self.delta.upstream_rtt).observe(rtt);
            }
        }
        let verdict = &d.verdict;
        let key = SessionKey {
            identity,
            namespace: self.namespace(d.client_namespace()),
            rcode: d.rcode,
            qtype: qtype_label(d.qtype),
            status: verdict.status,
            bitmap: verdict.bitmap.0 & 15,
            cause: d.cause,
        };
        *self.runs.sessions.at(key, &mut self.delta.sessions) += 1;
        if let Some(latency) = d.latency {
            let runs = &mut self.runs.client_latency;
            runs.at((identity, d.cause), &mut self.delta.client_latency)
                .observe(latency);
        }
        if verdict.loss == Some(LossReason::SessionTableFull) {
            *self.delta.evicted.entry(identity).or_insert(0) += 1;
        }
    }

    /// Reader thread, per read and stream (not per message): `n` messages of `role` from
    /// `identity`.
    pub fn count_messages(&mut self, identity: SourceId, role: Role, n: u64) {
        if n == 0 {
            return;
        }
        let identity = self.identity(identity);
        let i = match role {
            Role::ClientQuery => 0,
            Role::ClientResponse => 1,
            Role::UpstreamQuery => 2,
            Role::UpstreamResponse => 3,
        };
        self.delta.messages.entry(identity).or_default()[i] += n;
    }

    /// Reader or shard thread: the latest event time seen from `identity` (its watermark);
    /// the scrape exports wall clock minus the latest over all threads.
    pub fn note_event_time(&mut self, identity: SourceId, time: Nanos) {
        if time == 0 {
            return; // the sender gave no time
        }
        let identity = self.identity(identity);
        let t = self.delta.latest_event.entry(identity).or_insert(0);
        *t = (*t).max(time);
    }

    /// Shard thread, per tick: the sessions its correlator holds open.
    pub fn set_open_sessions(&self, n: u64) {
        self.published.open_sessions.store(n, Relaxed);
    }

    /// Once per tick (100 ms): makes the counts since the last publish visible to scrapes.
    pub fn publish(&mut self) {
        self.runs.flush(&mut self.delta);
        if self.delta.is_empty() {
            return;
        }
        let t = &self.telemetry;
        lock(&self.published.counts).absorb(&mut self.delta, &t.admitted, &t.series);
    }
}

impl Drop for ThreadStats {
    fn drop(&mut self) {
        self.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnosis::cause::tests::verdict;
    use crate::diagnosis::Attempt;

    #[test]
    fn bucket_bounds_agree_and_are_inclusive() {
        for (s, n) in LATENCY_BUCKETS.iter().zip(BUCKET_NANOS) {
            assert_eq!((s * 1e9).round() as u64, n);
        }
        let mut h = Histogram::default();
        h.observe(0);
        h.observe(100_000); // exactly 0.0001 s
        h.observe(100_001);
        h.observe(10_000_000_000); // exactly 10 s
        h.observe(10_000_000_001);
        assert_eq!(h.counts[0], 2);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[15], 1);
        assert_eq!(h.counts[16], 1);
        assert_eq!(h.count(), 5);
        assert_eq!(h.sum_nanos, 20_000_200_002);
    }

    fn telemetry(cfg: TelemetryConfig) -> (Arc<Telemetry>, Arc<SourceRegistry>) {
        let sources = Arc::new(SourceRegistry::default());
        let t = Telemetry::new(Arc::new(Metrics::default()), sources.clone(), cfg);
        (Arc::new(t), sources)
    }

    #[test]
    fn counts_are_invisible_until_published_and_sum_over_threads() {
        let (t, sources) = telemetry(TelemetryConfig::default());
        let a = sources.intern(b"pod-a", b"");
        let up: SocketAddr = "10.0.0.1:53".parse().unwrap();
        let v = verdict(Status::Failed, 5, None);
        let timeout = Attempt::ended(Some(up), AttemptOutcome::Timeout, None);
        let mut s0 = t.thread_stats(ThreadKind::Shard(0));
        let mut s1 = t.thread_stats(ThreadKind::Shard(1));
        let once = Diagnosis::from_parts(a, v, None, &[timeout]);
        assert_eq!(once.cause, Cause::UpstreamTimeout);
        s0.record_session(&once);
        s1.record_session(&Diagnosis::from_parts(
            a,
            v,
            Some(2_000_000),
            &[timeout, timeout],
        ));
        assert!(t.snapshot().counts.sessions.is_empty());
        s0.publish();
        s1.publish();
        s1.set_open_sessions(7);
        let snap = t.snapshot();
        let key = SessionKey {
            identity: IdentityLabel::Source(a),
            namespace: NamespaceLabel::None,
            rcode: None,
            qtype: qtype_label(None),
            status: Status::Failed,
            bitmap: 5,
            cause: Cause::UpstreamTimeout,
        };
        assert_eq!(snap.counts.sessions[&key], 2);
        let akey = (
            IdentityLabel::Source(a),
            UpstreamLabel::Addr(up),
            AttemptOutcome::Timeout,
        );
        assert_eq!(snap.counts.attempts[&akey], 3);
        let lat = &snap.counts.client_latency[&(IdentityLabel::Source(a), Cause::UpstreamTimeout)];
        assert_eq!(lat.count(), 1);
        assert_eq!(snap.open_sessions, vec![(0, 0), (1, 7)]);
        // Publishing again adds only what is new.
        s0.record_session(&Diagnosis::from_parts(a, v, None, &[]));
        drop(s0);
        assert_eq!(t.snapshot().counts.sessions[&key], 3);
    }

    #[test]
    fn labels_past_the_cap_become_other_and_are_counted() {
        let cfg = TelemetryConfig {
            max_identity_labels: 2,
            max_upstream_labels: 1,
            ..Default::default()
        };
        let (t, sources) = telemetry(cfg);
        let mut s = t.thread_stats(ThreadKind::Reader(0));
        let ids: Vec<SourceId> = (0..4)
            .map(|i| sources.intern(format!("pod-{i}").as_bytes(), b""))
            .collect();
        for &id in &ids {
            s.count_messages(id, Role::ClientQuery, 10);
        }
        let v = verdict(Status::Succeeded, 15, None);
        for port in [53, 54, 55] {
            let up = Some(SocketAddr::from(([10, 0, 0, 1], port)));
            let a = Attempt::ended(up, AttemptOutcome::Answered, Some(1000));
            s.record_session(&Diagnosis::from_parts(ids[0], v, None, &[a]));
        }
        s.publish();
        let c = t.snapshot().counts;
        assert_eq!(c.messages.len(), 3);
        assert_eq!(c.messages[&IdentityLabel::Other][0], 20);
        assert_eq!(c.messages[&IdentityLabel::Source(ids[1])][0], 10);
        assert_eq!(c.upstream_rtt[&UpstreamLabel::Other].count(), 2);
        assert_eq!(c.overflow, [2, 2, 0]);
        // Another thread sees the same admitted set.
        let mut s2 = t.thread_stats(ThreadKind::Reader(1));
        s2.count_messages(ids[3], Role::ClientResponse, 1);
        s2.count_messages(ids[1], Role::ClientResponse, 1);
        s2.publish();
        let c = t.snapshot().counts;
        assert_eq!(c.messages[&IdentityLabel::Other][1], 1);
        assert_eq!(c.messages[&IdentityLabel::Source(ids[1])][1], 1);
    }

    #[test]
    fn namespaces_label_sessions_up_to_the_identity_cap() {
        let cfg = TelemetryConfig {
            max_identity_labels: 2,
            ..Default::default()
        };
        let (t, sources) = telemetry(cfg);
        let a = sources.intern(b"pod-a", b"");
        let mut s = t.thread_stats(ThreadKind::Shard(0));
        let sessions = t.sessions_of(&mut s, a, &["team-a", "team-b", "team-c", "team-a", ""]);
        assert_eq!(sessions.get("team-a"), Some(&2));
        assert_eq!(sessions.get("team-b"), Some(&1));
        assert_eq!(sessions.get("other"), Some(&1));
        assert_eq!(sessions.get("none"), Some(&1));
        assert_eq!(t.snapshot().counts.overflow, [0, 0, 1]);
    }

    impl Telemetry {
        /// Records one session per namespace (`""`: none) and sums the sessions by label.
        fn sessions_of(
            &self,
            s: &mut ThreadStats,
            source: SourceId,
            namespaces: &[&str],
        ) -> HashMap<String, u64> {
            for ns in namespaces {
                let mut d =
                    Diagnosis::from_parts(source, verdict(Status::Succeeded, 3, None), None, &[]);
                if !ns.is_empty() {
                    d.set_extra_for_tests(format!("namespace={ns};pod=p").as_bytes());
                }
                s.record_session(&d);
            }
            s.publish();
            let mut by = HashMap::new();
            for (k, v) in &self.snapshot().counts.sessions {
                *by.entry(self.namespaces.name(k.namespace).to_string())
                    .or_insert(0) += v;
            }
            by
        }
    }

    /// One identity's sessions through `n` upstreams, each with one attempt.
    fn sessions_via(s: &mut ThreadStats, source: SourceId, upstreams: std::ops::Range<u16>) {
        let v = verdict(Status::Succeeded, 15, None);
        for port in upstreams {
            let up = Some(SocketAddr::from(([10, 0, 0, 1], port)));
            let a = Attempt::ended(up, AttemptOutcome::Answered, Some(1000));
            s.record_session(&Diagnosis::from_parts(source, v, Some(1), &[a]));
        }
    }

    #[test]
    fn label_sets_past_the_series_budget_collapse_to_other_and_are_counted() {
        let cfg = TelemetryConfig {
            series: SeriesBudget {
                per_family: 50,
                total: 1000,
            },
            ..Default::default()
        };
        let (t, sources) = telemetry(cfg);
        let ids: Vec<SourceId> = (0..20)
            .map(|i| sources.intern(format!("pod-{i}").as_bytes(), b""))
            .collect();
        let mut s0 = t.thread_stats(ThreadKind::Shard(0));
        let mut s1 = t.thread_stats(ThreadKind::Shard(1));
        // 20 identities x 20 upstreams: 400 attempt label sets wanted, 50 admitted.
        for (i, &id) in ids.iter().enumerate() {
            let s = if i % 2 == 0 { &mut s0 } else { &mut s1 };
            sessions_via(s, id, 0..20);
        }
        s0.publish();
        s1.publish();
        let c = t.snapshot().counts;
        let collapsed = (
            IdentityLabel::Other,
            UpstreamLabel::Other,
            AttemptOutcome::Answered,
        );
        assert_eq!(c.attempts.len(), 51, "50 admitted, and the collapsed one");
        assert_eq!(c.attempts[&collapsed], 350);
        assert_eq!(c.attempts.values().sum::<u64>(), 400, "nothing lost");
        let over = |f: SeriesFamily| c.series_overflow[f as usize];
        assert_eq!(over(SeriesFamily::UpstreamAttempts), 350);
        // 19 samples a histogram: 2 upstreams' RTT fit in 50, the rest collapse.
        assert_eq!(c.upstream_rtt.len(), 3);
        assert_eq!(c.upstream_rtt[&UpstreamLabel::Other].count(), 400 - 2 * 20);
        assert_eq!(over(SeriesFamily::UpstreamRtt), 360);
        assert_eq!(over(SeriesFamily::Sessions), 0, "20 session label sets fit");
        // Recording again under admitted label sets adds to them; the budget stays full.
        sessions_via(&mut s1, ids[1], 0..20);
        s1.publish();
        let c = t.snapshot().counts;
        assert_eq!(c.attempts.len(), 51);
        assert_eq!(c.attempts.values().sum::<u64>(), 420);
        assert!(lock(&t.admitted).samples <= 1000);
    }

    #[test]
    fn the_total_series_budget_bounds_every_family_together() {
        let cfg = TelemetryConfig {
            series: SeriesBudget {
                per_family: 1000,
                total: 60,
            },
            ..Default::default()
        };
        let (t, sources) = telemetry(cfg);
        let mut s = t.thread_stats(ThreadKind::Shard(0));
        for i in 0..40 {
            let id = sources.intern(format!("pod-{i}").as_bytes(), b"");
            sessions_via(&mut s, id, 0..3);
            s.count_messages(id, Role::ClientQuery, 1);
        }
        s.publish();
        let admitted = lock(&t.admitted).samples;
        assert!(admitted <= 60 && admitted > 40, "{admitted}");
        let c = t.snapshot().counts;
        assert_eq!(c.sessions.values().sum::<u64>(), 120);
        assert_eq!(c.messages.values().map(|m| m[0]).sum::<u64>(), 40);
        assert!(c.series_overflow.iter().sum::<u64>() > 0);
    }

    #[test]
    fn a_reclaimed_identity_leaves_its_series_and_label_slot_and_keeps_its_counts() {
        let cfg = TelemetryConfig {
            max_identity_labels: 1,
            ..Default::default()
        };
        let sources = Arc::new(SourceRegistry::new(4, Duration::from_secs(1)));
        let t = Arc::new(Telemetry::new(
            Arc::new(Metrics::default()),
            sources.clone(),
            cfg,
        ));
        let t0 = std::time::Instant::now();
        let old = sources.acquire(None, b"old-pod", b"", t0).unwrap();
        let mut s = t.thread_stats(ThreadKind::Shard(0));
        sessions_via(&mut s, old, 0..3);
        s.count_messages(old, Role::ClientQuery, 3);
        s.note_event_time(old, 1);
        s.publish();
        assert_eq!(
            t.identities_stopped(),
            [(IdentityLabel::Source(old), false)]
        );
        sources.release_stopped(old, t0);
        assert_eq!(t.identities_stopped(), [(IdentityLabel::Source(old), true)]);
        // A new pod while the old one holds the only label: `other`, until it is reclaimed.
        let new = sources.acquire(None, b"new-pod", b"", t0).unwrap();
        s.count_messages(new, Role::ClientQuery, 1);
        s.publish();
        assert_eq!(t.snapshot().counts.messages[&IdentityLabel::Other][0], 1);
        let later = t0 + Duration::from_secs(1);
        sources.acquire(None, b"third-pod", b"", later).unwrap();
        assert_eq!(sources.reclaims(), 1, "old-pod reclaimed");
        s.count_messages(new, Role::ClientQuery, 1);
        s.publish();
        let c = t.snapshot().counts;
        assert_eq!(
            c.messages[&IdentityLabel::Source(new)][0],
            1,
            "the slot is free"
        );
        let gone = IdentityLabel::Source(old);
        assert!(!c.messages.contains_key(&gone));
        assert!(!c.latest_event.contains_key(&gone), "no watermark left");
        assert!(c.sessions.keys().all(|k| k.identity != gone));
        assert!(c.attempts.keys().all(|k| k.0 != gone));
        assert_eq!(c.messages[&IdentityLabel::Reclaimed][0], 3);
        let reclaimed: u64 = c
            .sessions
            .iter()
            .filter(|(k, _)| k.identity == IdentityLabel::Reclaimed)
            .map(|(_, v)| v)
            .sum();
        assert_eq!(reclaimed, 3, "its sessions still count");
        assert!(t.identities_stopped().iter().all(|(i, _)| *i != gone));
        assert_eq!(t.identity_name(IdentityLabel::Reclaimed), "reclaimed");
        // Its budget is free again: only the new pod's series are admitted.
        let admitted = lock(&t.admitted);
        assert!(admitted.sets.messages.iter().all(|&i| i != gone));
        assert!(admitted.sets.sessions.iter().all(|k| k.identity != gone));
    }

    #[test]
    fn runs_of_one_key_and_their_breaks_all_count() {
        let (t, sources) = telemetry(TelemetryConfig::default());
        let (a, b) = (sources.intern(b"pod-a", b""), sources.intern(b"pod-b", b""));
        let mut s = t.thread_stats(ThreadKind::Shard(0));
        let v = verdict(Status::Succeeded, 3, None);
        for (source, latency) in [(a, 1), (a, 2), (b, 3), (a, 4), (b, 5), (b, 6)] {
            s.record_session(&Diagnosis::from_parts(source, v, Some(latency), &[]));
        }
        s.publish();
        let counts = t.snapshot().counts;
        let by = |id| {
            let of = |k: &&SessionKey| k.identity == IdentityLabel::Source(id);
            let sessions: u64 = counts
                .sessions
                .iter()
                .filter(|(k, _)| of(k))
                .map(|(_, n)| n)
                .sum();
            let latency = &counts.client_latency[&(IdentityLabel::Source(id), Cause::LocalAnswer)];
            (sessions, latency.count(), latency.sum_nanos)
        };
        assert_eq!(by(a), (3, 3, 7));
        assert_eq!(by(b), (3, 3, 14));
    }

    #[test]
    fn steady_state_recording_reuses_the_maps() {
        let (t, sources) = telemetry(TelemetryConfig::default());
        let a = sources.intern(b"pod-a", b"");
        let mut s = t.thread_stats(ThreadKind::Shard(0));
        let v = verdict(Status::Succeeded, 3, None);
        s.record_session(&Diagnosis::from_parts(a, v, Some(1), &[]));
        s.publish();
        let cap = s.delta.sessions.capacity();
        assert!(cap > 0);
        for _ in 0..1000 {
            s.record_session(&Diagnosis::from_parts(a, v, Some(1), &[]));
        }
        s.publish();
        assert_eq!(s.delta.sessions.capacity(), cap);
        assert_eq!(t.snapshot().counts.sessions.values().sum::<u64>(), 1001);
    }
}
