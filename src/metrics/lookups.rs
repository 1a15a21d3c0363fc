//! Lookup metrics: counted by each lookup partition into its own `LookupStats` and added into
//! the shared board once per tick (a lookup ends every few sessions; nothing here is per
//! message). Read by the Prometheus families, `/top` and the exit summary.
//!
//! Labels are bounded: namespaces and identities by the identity label cap (later ones count
//! as `other`), the names of `/top` by `TOP_NAMES`.

use super::model::Histogram;
use crate::dnstap::{Nanos, SourceId, SourceRegistry};
use crate::lookup::{Lookup, Outcome};
use hashbrown::HashMap;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Upper bounds of the queries-per-lookup histogram (the last bucket is `+Inf`): one pair,
/// the cluster suffixes, a node domain or two, the bare name.
pub const QUERY_BUCKETS: [u64; 8] = [1, 2, 4, 6, 8, 10, 12, 16];
/// The names with the most wasted queries kept for `/top` (Space-Saving: a new name replaces
/// the least counted one and inherits its count, an upper bound).
pub const TOP_NAMES: usize = 256;
/// hdrhistogram range: 1 µs to 120 s, two significant digits.
const HDR_MAX_MICROS: u64 = 120_000_000;

/// Latency quantiles of one label value (namespace or identity). A partition's counts of one
/// tick keep the latencies themselves, which the board records into its histogram: a histogram
/// per label and tick (2,688 counters) would be zeroed and summed whole ten times a second,
/// whatever the traffic.
#[derive(Debug, Clone, Default)]
pub struct Quantiles {
    /// The board's.
    histogram: Option<hdrhistogram::Histogram<u64>>,
    /// A tick's, in microseconds.
    pending: Vec<u64>,
}

impl Quantiles {
    fn histogram() -> hdrhistogram::Histogram<u64> {
        hdrhistogram::Histogram::new_with_bounds(1, HDR_MAX_MICROS, 2)
            .expect("valid hdrhistogram bounds")
    }

    fn record(&mut self, latency: Nanos) {
        let micros = micros(latency);
        match &mut self.histogram {
            Some(h) => h.saturating_record(micros),
            None => self.pending.push(micros),
        }
    }

    /// Adds `other` into `self`, which keeps a histogram from now on.
    fn add(&mut self, other: &Quantiles) {
        let h = self.histogram.get_or_insert_with(Self::histogram);
        for &micros in &self.pending {
            h.saturating_record(micros);
        }
        self.pending.clear();
        if let Some(o) = &other.histogram {
            let _ = h.add(o);
        }
        for &micros in &other.pending {
            h.saturating_record(micros);
        }
    }

    /// (count, p50, p90, p99) in milliseconds.
    pub fn summary(&self) -> (u64, f64, f64, f64) {
        let mut all = Quantiles::default();
        let h = match &self.histogram {
            Some(h) if self.pending.is_empty() => h,
            _ => {
                all.add(self);
                all.histogram.as_ref().expect("added")
            }
        };
        let q = |p: f64| h.value_at_quantile(p) as f64 / 1_000.0;
        (h.len(), q(0.5), q(0.9), q(0.99))
    }
}

/// What the timeouts cost per (identity, namespace): lookups that waited, and how long.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Waits {
    pub lookups: u64,
    pub retries: u64,
    pub waited: Nanos,
}

/// Counts of finished lookups.
#[derive(Debug, Clone, Default)]
pub struct LookupStats {
    pub outcomes: [u64; 4],
    pub evicted: u64,
    pub latency: Histogram,
    /// Per `QUERY_BUCKETS` bound, then `+Inf`; not cumulative.
    pub queries: [u64; QUERY_BUCKETS.len() + 1],
    pub queries_sum: u64,
    /// By (identity, namespace).
    pub wasted: BTreeMap<(String, String), u64>,
    pub waits: BTreeMap<(String, String), Waits>,
    pub by_namespace: BTreeMap<String, Quantiles>,
    pub by_identity: BTreeMap<String, Quantiles>,
    pub wasted_names: HashMap<String, u64>,
    /// The (identity, namespace) key being counted, reused: a known pair costs no allocation.
    pair: (String, String),
    /// This tick's latencies by the identity a lookup is counted under (`None`: it had none),
    /// with the label that identity counts under, decided at its first lookup of the tick as
    /// `observe` decides it (the label cannot change within a tick: `by_identity` only
    /// grows). Added into `by_identity` when published (`settle`): naming the identity
    /// through the registry (its lock) and searching `by_identity` for it cost ~230
    /// instructions a lookup.
    by_source: HashMap<Option<SourceId>, (String, Vec<u64>)>,
    /// The registry's reclaims when `by_source` was started: a reclaimed identity names as
    /// "" from then on, so its label must be decided again.
    reclaims: u64,
}

impl LookupStats {
    pub fn outcome(&self, o: Outcome) -> u64 {
        self.outcomes[o as usize]
    }

    /// Counts a finished lookup; `cap` bounds the identity and namespace labels.
    pub fn record(&mut self, l: &Lookup, sources: &SourceRegistry, cap: usize) {
        self.outcomes[l.outcome as usize] += 1;
        self.evicted += l.evicted as u64;
        self.latency.observe(l.latency);
        let q = QUERY_BUCKETS.partition_point(|&b| b < l.queries as u64);
        self.queries[q] += 1;
        self.queries_sum += l.queries as u64;
        if l.wasted_queries > 0 {
            self.count_wasted_name(&l.asked, l.wasted_queries as u64);
        }
        let reclaims = sources.reclaims();
        if reclaims != self.reclaims {
            self.settle();
            self.reclaims = reclaims;
        }
        let source = l.identities.first().copied();
        let (identity, latencies) = match self.by_source.entry(source) {
            hashbrown::hash_map::Entry::Occupied(e) => e.into_mut(),
            hashbrown::hash_map::Entry::Vacant(e) => {
                let described = source.map(|i| sources.describe(i).0);
                let name = described.as_deref().unwrap_or("unknown");
                let label = label(&mut self.by_identity, name, cap);
                e.insert((label.to_string(), Vec::new()))
            }
        };
        latencies.push(micros(l.latency));
        let identity = identity.as_str();
        let namespace = l.namespace.as_deref().unwrap_or("");
        let namespace = observe(&mut self.by_namespace, namespace, cap, l.latency);
        if l.wasted_queries > 0 {
            let pair = &mut self.pair;
            *entry(&mut self.wasted, pair, identity, namespace) += l.wasted_queries as u64;
        }
        if l.retries > 0 {
            let w = entry(&mut self.waits, &mut self.pair, identity, namespace);
            w.lookups += 1;
            w.retries += l.retries as u64;
            w.waited += l.waited;
        }
    }

    /// Adds the latencies of `by_source` into `by_identity` (before the tick is published).
    fn settle(&mut self) {
        for (_, (label, latencies)) in self.by_source.drain() {
            if let Some(q) = self.by_identity.get_mut(&label) {
                q.pending.extend_from_slice(&latencies);
            }
        }
    }

    fn count_wasted_name(&mut self, name: &str, n: u64) {
        if let Some(c) = self.wasted_names.get_mut(name) {
            *c += n;
            return;
        }
        if self.wasted_names.len() < TOP_NAMES {
            self.wasted_names.insert(name.to_string(), n);
            return;
        }
        // The least counted name leaves; its string is reused for the new one.
        let least = self.wasted_names.values().min().copied();
        let taken = self
            .wasted_names
            .extract_if(|_, c| Some(*c) == least)
            .next();
        let Some((mut key, inherited)) = taken else {
            return;
        };
        key.clear();
        key.push_str(name);
        self.wasted_names.insert(key, inherited + n);
    }

    /// Adds `other` into `self` (a partition's tick into the board).
    pub fn merge(&mut self, other: &LookupStats) {
        for (a, b) in self.outcomes.iter_mut().zip(other.outcomes) {
            *a += b;
        }
        self.evicted += other.evicted;
        for (a, b) in self.latency.counts.iter_mut().zip(other.latency.counts) {
            *a += b;
        }
        self.latency.sum_nanos += other.latency.sum_nanos;
        for (a, b) in self.queries.iter_mut().zip(other.queries) {
            *a += b;
        }
        self.queries_sum += other.queries_sum;
        for (k, v) in &other.wasted {
            *self
                .wasted
                .entry(bounded_pair(&self.wasted, k))
                .or_default() += v;
        }
        for (k, v) in &other.waits {
            let w = self.waits.entry(bounded_pair(&self.waits, k)).or_default();
            w.lookups += v.lookups;
            w.retries += v.retries;
            w.waited += v.waited;
        }
        for (mine, theirs) in [
            (&mut self.by_namespace, &other.by_namespace),
            (&mut self.by_identity, &other.by_identity),
        ] {
            for (k, q) in theirs {
                match mine.get_mut(k) {
                    Some(m) => m.add(q),
                    None => {
                        let mut m = Quantiles::default();
                        m.add(q);
                        mine.insert(k.clone(), m);
                    }
                }
            }
        }
        for (name, n) in &other.wasted_names {
            self.count_wasted_name(name, *n);
        }
    }

    /// The names with the most wasted queries, most first.
    pub fn top_wasted(&self, n: usize) -> Vec<(&str, u64)> {
        let mut v: Vec<(&str, u64)> = self
            .wasted_names
            .iter()
            .map(|(k, c)| (k.as_str(), *c))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v.truncate(n);
        v
    }

    /// The `lookups` part of `/top` and of the exit summary.
    pub fn to_json(&self) -> serde_json::Value {
        let mut outcomes = serde_json::Map::new();
        for o in Outcome::ALL {
            outcomes.insert(o.name().into(), self.outcome(o).into());
        }
        let quantiles = |m: &BTreeMap<String, Quantiles>| {
            let mut out = serde_json::Map::new();
            for (k, q) in m {
                let (count, p50, p90, p99) = q.summary();
                out.insert(
                    k.clone(),
                    serde_json::json!({"lookups": count, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99}),
                );
            }
            out
        };
        let wasted: u64 = self.wasted.values().sum();
        let (waited_lookups, waited): (u64, Nanos) = self
            .waits
            .values()
            .fold((0, 0), |(l, w), v| (l + v.lookups, w + v.waited));
        let top: Vec<serde_json::Value> = self
            .top_wasted(10)
            .into_iter()
            .map(|(name, n)| serde_json::json!({"asked": name, "wasted_queries": n}))
            .collect();
        serde_json::json!({
            "outcomes": outcomes,
            "evicted": self.evicted,
            "queries": self.queries_sum,
            "wasted_queries": wasted,
            "resolver_timeouts": waited_lookups,
            "waited_s": waited as f64 / 1e9,
            "latency_by_namespace": quantiles(&self.by_namespace),
            "latency_by_identity": quantiles(&self.by_identity),
            "most_wasted": top,
        })
    }
}

/// (identity, namespace) label pairs the board keeps per family: each label is capped, but
/// their product is not (256 x 256), so the pairs are bounded too, like the series budget.
pub const LABEL_PAIRS: usize = 3_000;

/// `key`, or (`other`, `other`) once `LABEL_PAIRS` pairs are known and it is not one of them.
fn bounded_pair<V>(
    known: &BTreeMap<(String, String), V>,
    key: &(String, String),
) -> (String, String) {
    if known.len() < LABEL_PAIRS || known.contains_key(key) {
        return key.clone();
    }
    ("other".to_string(), "other".to_string())
}

/// Records `latency` under the label for `value`, which it returns: `value` itself while under
/// the cap or already known, else `other`. A known label is searched for once and never
/// copied: a finished lookup is counted without allocating.
fn observe<'v>(
    m: &mut BTreeMap<String, Quantiles>,
    value: &'v str,
    cap: usize,
    latency: Nanos,
) -> &'v str {
    if let Some(q) = m.get_mut(value) {
        q.record(latency);
        return value;
    }
    let label = label(m, value, cap);
    m.get_mut(label).expect("labelled").record(latency);
    label
}

/// The label `value` counts under in `m`, which then holds it: `value` itself while under the
/// cap or already known, else `other`.
fn label<'v>(m: &mut BTreeMap<String, Quantiles>, value: &'v str, cap: usize) -> &'v str {
    if m.contains_key(value) {
        return value;
    }
    let label = if m.len() < cap { value } else { "other" };
    if !m.contains_key(label) {
        m.insert(label.to_string(), Quantiles::default());
    }
    label
}

/// A latency as the quantiles keep it: whole microseconds, at least one.
fn micros(latency: Nanos) -> u64 {
    (latency / 1_000).max(1)
}

/// The (identity, namespace) entry (only lookups that wasted queries or waited get here),
/// looked up through `pair`; the key is copied only when it is new.
fn entry<'m, V: Default>(
    m: &'m mut BTreeMap<(String, String), V>,
    pair: &mut (String, String),
    identity: &str,
    namespace: &str,
) -> &'m mut V {
    pair.0.clear();
    pair.0.push_str(identity);
    pair.1.clear();
    pair.1.push_str(namespace);
    if !m.contains_key(pair) {
        m.insert(pair.clone(), V::default());
    }
    m.get_mut(pair).expect("inserted above")
}

/// The process-wide sum of the partitions' published counts.
#[derive(Debug, Default)]
pub struct LookupBoard {
    published: Mutex<LookupStats>,
}

impl LookupBoard {
    pub fn publish(&self, delta: &mut LookupStats) {
        delta.settle();
        let mut p = self.published.lock().unwrap_or_else(|e| e.into_inner());
        p.merge(delta);
        *delta = LookupStats::default();
    }

    pub fn snapshot(&self) -> LookupStats {
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// `/top` with the lookups' part added (`"lookups"`, as in the exit summary).
pub fn with_lookups(
    top: super::model::TopHook,
    metrics: Arc<super::Metrics>,
) -> super::model::TopHook {
    Arc::new(WithLookups { top, metrics })
}

struct WithLookups {
    top: super::model::TopHook,
    metrics: Arc<super::Metrics>,
}

impl super::model::TopSource for WithLookups {
    fn document(&self) -> String {
        let doc = self.top.document();
        let Some(board) = self.metrics.lookups.get() else {
            return doc;
        };
        match serde_json::from_str::<serde_json::Value>(&doc) {
            Ok(mut v) if v.is_object() => {
                v["lookups"] = board.snapshot().to_json();
                v.to_string()
            }
            _ => doc,
        }
    }

    fn failing_names(&self) -> Vec<super::model::FailingName> {
        self.top.failing_names()
    }
}

/// Shared between the lookup partitions, `/metrics`, `/top` and the summary.
pub type SharedLookupBoard = Arc<LookupBoard>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dnstap::SourceId;

    fn lookup(asked: &str, ns: Option<&str>, outcome: Outcome, wasted: u32, ms: u64) -> Lookup {
        Lookup {
            id: 1,
            client: "10.0.0.5".parse().unwrap(),
            time: 0,
            identities: vec![SourceId(0)],
            asked: asked.into(),
            namespace: ns.map(str::to_string),
            candidates: vec![],
            queries: 2 + wasted,
            outcome,
            answered_by: None,
            autopath: None,
            wasted_queries: wasted,
            latency: ms * 1_000_000,
            retries: (ms >= 5000) as u32,
            waited: if ms >= 5000 { 5_000_000_000 } else { 0 },
            evicted: false,
        }
    }

    #[test]
    fn outcomes_waste_waits_and_quantiles_add_up_across_partitions() {
        let sources = SourceRegistry::new(4, std::time::Duration::from_secs(60));
        let (mut a, mut b) = (LookupStats::default(), LookupStats::default());
        for i in 0..98 {
            a.record(
                &lookup(
                    "api.example.test",
                    Some("default"),
                    Outcome::Answered,
                    8,
                    1 + i % 3,
                ),
                &sources,
                4,
            );
        }
        b.record(
            &lookup("slow", Some("default"), Outcome::Answered, 0, 5022),
            &sources,
            4,
        );
        b.record(
            &lookup("nothere", Some("prod"), Outcome::NxDomain, 8, 2),
            &sources,
            4,
        );
        let board = LookupBoard::default();
        board.publish(&mut a);
        board.publish(&mut b);
        assert_eq!(a.outcomes, [0; 4], "published deltas are cleared");
        let s = board.snapshot();
        assert_eq!(
            (s.outcome(Outcome::Answered), s.outcome(Outcome::NxDomain)),
            (99, 1)
        );
        assert_eq!(s.latency.count(), 100);
        assert_eq!(s.queries.iter().sum::<u64>(), 100);
        assert_eq!(s.wasted.values().sum::<u64>(), 98 * 8 + 8);
        let waits: Vec<&Waits> = s.waits.values().collect();
        assert_eq!(waits.len(), 1);
        assert_eq!((waits[0].lookups, waits[0].waited), (1, 5_000_000_000));
        let (n, p50, _, p99) = s.by_namespace["default"].summary();
        assert_eq!(n, 99);
        assert!((1.9..=2.1).contains(&p50), "p50 {p50}");
        assert!(
            (4900.0..=5100.0).contains(&p99),
            "p99 {p99}: the one 5 s lookup"
        );
        assert_eq!(s.top_wasted(1), [("api.example.test", 98 * 8)]);
        let json = s.to_json();
        assert_eq!(json["resolver_timeouts"], 1);
        assert_eq!(json["outcomes"]["nxdomain"], 1);
    }

    #[test]
    fn identity_labels_follow_the_cap_in_order_and_a_reclaimed_identity_names_as_empty() {
        let sources = SourceRegistry::new(8, std::time::Duration::ZERO);
        let now = std::time::Instant::now();
        let id = |name: &str| sources.acquire(None, name.as_bytes(), b"", now).unwrap();
        let (a, b, c) = (id("pod-a"), id("pod-b"), id("pod-c"));
        let with = |i: Option<SourceId>, ms| Lookup {
            identities: i.into_iter().collect(),
            ..lookup("web", Some("default"), Outcome::Answered, 0, ms)
        };
        let mut tick = LookupStats::default();
        // Cap 2: `pod-a` and `pod-b` are labels, `pod-c` and a lookup of no identity `other`.
        for (i, ms) in [(a, 1), (b, 2), (c, 3), (a, 4), (c, 5), (b, 6)] {
            tick.record(&with(Some(i), ms), &sources, 2);
        }
        tick.record(&with(None, 7), &sources, 2);
        // `pod-a` let go and reclaimed: its lookups ending later are counted under "", which
        // past the cap is `other`.
        sources.release(a, now);
        let _ = id("pod-d");
        assert_eq!(sources.reclaims(), 1);
        tick.record(&with(Some(a), 8), &sources, 2);
        tick.record(&with(Some(b), 9), &sources, 2);
        let board = LookupBoard::default();
        board.publish(&mut tick);
        let s = board.snapshot();
        let counts: BTreeMap<&str, u64> = s
            .by_identity
            .iter()
            .map(|(k, q)| (k.as_str(), q.summary().0))
            .collect();
        assert_eq!(
            counts,
            BTreeMap::from([("pod-a", 2), ("pod-b", 3), ("other", 4)])
        );
        let (_, p50, _, _) = s.by_identity["pod-a"].summary();
        assert!((0.9..=4.1).contains(&p50), "p50 {p50}");
    }

    #[test]
    fn identity_namespace_pairs_are_bounded_on_the_board() {
        let mut board = LookupStats::default();
        let mut tick = LookupStats::default();
        for i in 0..LABEL_PAIRS + 10 {
            let key = (format!("pod-{}", i % 100), format!("ns-{}", i / 100));
            tick.wasted.insert(key.clone(), 1);
            let w = Waits {
                lookups: 1,
                retries: 1,
                waited: 5,
            };
            tick.waits.insert(key, w);
        }
        board.merge(&tick);
        let other = ("other".to_string(), "other".to_string());
        assert_eq!(board.wasted.len(), LABEL_PAIRS + 1);
        assert_eq!(board.wasted[&other], 10);
        assert_eq!(board.waits[&other].lookups, 10);
        let total: u64 = board.wasted.values().sum();
        assert_eq!(total, LABEL_PAIRS as u64 + 10);
    }

    #[test]
    fn namespace_labels_and_names_are_bounded() {
        let sources = SourceRegistry::new(4, std::time::Duration::from_secs(60));
        let mut s = LookupStats::default();
        for i in 0..1000 {
            let ns = format!("ns{i}");
            s.record(
                &lookup(&format!("n{i}"), Some(&ns), Outcome::Answered, 2, 1),
                &sources,
                8,
            );
        }
        assert_eq!(s.by_namespace.len(), 9, "8 namespaces and other");
        assert!(s.by_namespace.contains_key("other"));
        assert!(s.wasted_names.len() <= TOP_NAMES);
        assert_eq!(
            s.wasted.values().sum::<u64>(),
            2000,
            "every wasted query counted"
        );
    }
}
