//! What the readers and shards count for the Prometheus endpoint, and how a scrape sums it.
//!
//! Counting stays off shared cache lines: each reader or shard thread owns a [`ThreadStats`]
//! and counts into plain integers in small maps keyed by already-interned ids. Once per tick
//! the owner calls [`ThreadStats::publish`], which adds those deltas into the thread's
//! published copy under a mutex that only the owner and the scraper ever take, and clears the
//! deltas (keeping their capacity, so steady state allocates nothing). A scrape locks each
//! published copy in turn and sums them ([`Telemetry::snapshot`]).
//!
//! Cardinality is bounded by [`LabelCap`]: the first `cap` identities and upstreams keep their
//! own label; later ones are counted under `other`, and the overflow is counted too.

use super::health::Health;
use super::Metrics;
use crate::correlate::{LossReason, Status};
use crate::diagnosis::Diagnosis;
use crate::dnstap::{Nanos, Role, SourceId, SourceRegistry};
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

/// Identity label key: the interned source, or `other` past the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityLabel {
    Source(SourceId),
    Other,
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
    /// cache stops growing at a bound so that a flood of over-the-cap values cannot grow it.
    fn admit_cached(&self, cache: &mut HashMap<K, bool>, k: K) -> bool {
        if let Some(&ok) = cache.get(&k) {
            return ok;
        }
        let ok = self.admit(k);
        if ok || cache.len() < self.cap * 2 + 64 {
            cache.insert(k, ok);
        }
        ok
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `sessions_total` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

impl Counts {
    /// Adds `delta` into `self` and empties `delta`, keeping its allocations.
    fn absorb(&mut self, delta: &mut Counts) {
        add_into(&mut self.sessions, delta.sessions.drain());
        add_into(&mut self.attempts, delta.attempts.drain());
        add_into(&mut self.upstream_rtt, delta.upstream_rtt.drain());
        add_into(&mut self.client_latency, delta.client_latency.drain());
        add_into(&mut self.messages, delta.messages.drain());
        self.merge_latest(delta.latest_event.drain());
        add_into(&mut self.evicted, delta.evicted.drain());
        for (a, b) in self.overflow.iter_mut().zip(&mut delta.overflow) {
            *a += std::mem::take(b);
        }
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
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            max_identity_labels: 256,
            max_upstream_labels: 256,
            stall_after: Duration::from_secs(30),
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
            identity_cache: HashMap::new(),
            upstream_cache: HashMap::new(),
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

    /// Sums every thread's published stats and reads the gauges.
    pub fn snapshot(&self) -> Snapshot {
        let mut counts = Counts::default();
        let mut open_sessions = Vec::new();
        for p in lock(&self.threads).iter() {
            counts.add(&lock(&p.counts));
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

    /// The identities the stages intern and the labels name.
    pub fn sources(&self) -> &Arc<SourceRegistry> {
        &self.sources
    }

    /// The label value of an identity.
    pub fn identity_name(&self, l: IdentityLabel) -> String {
        match l {
            IdentityLabel::Source(id) => self.sources.describe(id).0.to_string(),
            IdentityLabel::Other => "other".into(),
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
    identity_cache: HashMap<SourceId, bool>,
    upstream_cache: HashMap<SocketAddr, bool>,
    /// Namespaces this thread has labelled, so the lock is taken once per new name; it stops
    /// growing at a bound, as `LabelCap`'s cache does.
    namespace_cache: HashMap<Box<str>, NamespaceLabel>,
}

impl ThreadStats {
    fn identity(&mut self, id: SourceId) -> IdentityLabel {
        if self
            .telemetry
            .identities
            .admit_cached(&mut self.identity_cache, id)
        {
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
        if self
            .telemetry
            .upstreams
            .admit_cached(&mut self.upstream_cache, addr)
        {
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
            *self
                .delta
                .attempts
                .entry((identity, upstream, a.outcome()))
                .or_insert(0) += 1;
            if let Some(rtt) = a.rtt {
                self.delta
                    .upstream_rtt
                    .entry(upstream)
                    .or_default()
                    .observe(rtt);
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
        *self.delta.sessions.entry(key).or_insert(0) += 1;
        if let Some(latency) = d.latency {
            self.delta
                .client_latency
                .entry((identity, d.cause))
                .or_default()
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
        if self.delta.is_empty() {
            return;
        }
        lock(&self.published.counts).absorb(&mut self.delta);
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
