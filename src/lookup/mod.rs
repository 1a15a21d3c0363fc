//! Lookups: the search-path expansions of one application lookup (`getaddrinfo("web")`),
//! joined from the finished sessions of its candidates. A pure state machine without I/O:
//! queries (one per finished session) in, each told the lookup it joined; finished lookups out
//! once nothing joined them for `gap + linger` of the stage's clock (`now`, given by the
//! caller: a monotonic wall clock).
//!
//! Joining is decided by event time alone (a query joins only within `gap` of the lookup's
//! queries), so the result does not depend on how late sessions reach the stage; ending is
//! decided by the stage's clock, because sessions of one lookup reach it from several
//! identities and shards, each with its own delay (CoreDNS buffers frames for seconds).
//!
//! The rules (docs/lookups.md has the why):
//! - one client IP (each candidate leaves from a fresh source port), one base name, one
//!   family (A and AAAA together; any other type on its own);
//! - a name joins an open lookup when it reads as that lookup's base plus a search suffix
//!   the lookup has not tried yet for that type (`names::SearchList::readings`), or as its
//!   base plus a suffix not known yet once the cluster suffixes are behind (a node domain,
//!   learned);
//! - the same candidate and type again from the same port is a resolver retry; from another
//!   port it is a new lookup (the application asked again);
//! - the two halves of a pair (A, AAAA) from one port seconds apart: the later one's first
//!   send was lost and the resolver waited out its timeout (the five-second signature).

mod expiry;
pub mod names;
pub mod record;
pub mod stage;

use crate::dnstap::{Nanos, SourceId};
use arrayvec::ArrayString;
use expiry::{Due, Expiry};
use hashbrown::hash_map::Entry;
use hashbrown::HashMap;
use names::{Reading, Readings, SearchList, Suffix};
use smallvec::SmallVec;
use std::net::{IpAddr, SocketAddr};

pub const QTYPE_A: u16 = 1;
pub const QTYPE_AAAA: u16 = 28;

/// The two halves of a pair sent this far apart from one port are no longer "together": the
/// later one is a resend after a timeout (glibc's shortest is 1 s).
const PAIR_GAP: Nanos = 1_000_000_000;
/// Identities kept per lookup (more are counted in the first ones' place: kube-proxy spreads
/// one lookup over a handful of CoreDNS pods at most).
const MAX_IDENTITIES: usize = 8;
/// Candidates per lookup: a search list has at most 6 domains (glibc's MAXDNSRCH), plus the
/// bare name; a further one starts a lookup of its own.
const MAX_CANDIDATES: usize = 8;

/// What the client got for one query, best last: the order a lookup's outcome is taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Another rcode (SERVFAIL, REFUSED…), or no response at all.
    Failed,
    NxDomain,
    /// NOERROR without answer records.
    NoData,
    Answered,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Answered,
        Outcome::NoData,
        Outcome::NxDomain,
        Outcome::Failed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::NxDomain => "nxdomain",
            Self::NoData => "nodata",
            Self::Answered => "answered",
        }
    }

    /// From the client response's rcode and answer count; `None`: no response.
    pub fn of(response: Option<(u8, u16)>) -> Self {
        match response {
            Some((0, 0)) => Self::NoData,
            Some((0, _)) => Self::Answered,
            Some((3, _)) => Self::NxDomain,
            _ => Self::Failed,
        }
    }
}

/// One finished session, as the lookup stage needs it. Names are lowercase presentation form.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub client: SocketAddr,
    pub identity: SourceId,
    pub qname: &'a str,
    pub qtype: u16,
    pub outcome: Outcome,
    /// The owner of the first answer record's target when that record is a CNAME: CoreDNS's
    /// `autopath` answers the first candidate with a CNAME to the name that exists.
    pub cname_target: Option<&'a str>,
    pub query_time: Nanos,
    pub response_time: Option<Nanos>,
    /// The client's DNS id: tells a resend (same id) from the same name asked again.
    pub dns_id: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub cluster_domain: String,
    /// `--search-suffix`: node domains and other extra search suffixes, in resolv.conf order.
    pub search_suffixes: Vec<String>,
    /// Open lookups in total, and per client IP.
    pub max_open: usize,
    pub max_per_client: usize,
    /// A query joins a lookup only within this much event time of its queries and responses:
    /// longer than glibc's 5 s timeout, so that the resend after it still joins.
    pub gap: Nanos,
    /// How long past `gap` (stage clock) a lookup waits for late sessions before it ends.
    pub linger: Nanos,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".into(),
            search_suffixes: Vec::new(),
            max_open: 65_536,
            max_per_client: 64,
            gap: 6_000_000_000,
            linger: 5_000_000_000,
        }
    }
}

/// A finished lookup: what the application experienced.
#[derive(Debug, Clone, PartialEq)]
pub struct Lookup {
    pub id: u64,
    pub client: IpAddr,
    /// The first query's time.
    pub time: Nanos,
    pub identities: Vec<SourceId>,
    /// The name the application asked; with a trailing dot when it was absolute.
    pub asked: String,
    pub namespace: Option<String>,
    /// The names tried, in the order they were first queried, with trailing dots (empty for a
    /// lookup its table did not name: `LookupTable::name_candidates_for`).
    pub candidates: Vec<String>,
    /// Queries seen (sessions), resends included.
    pub queries: u32,
    pub outcome: Outcome,
    /// The candidate answered (named like `candidates`).
    pub answered_by: Option<String>,
    /// The CNAME target when the first candidate was answered by CoreDNS's `autopath`.
    pub autopath: Option<String>,
    /// Queries for the candidates before the last one tried.
    pub wasted_queries: u32,
    /// First query to last response (to the last query when nothing answered).
    pub latency: Nanos,
    pub retries: u32,
    /// Time lost waiting for lost queries (the union of the retry intervals).
    pub waited: Nanos,
    /// Closed early to bound memory, not because it ended.
    pub evicted: bool,
}

/// Counters the stage reports besides the lookups.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Lookups closed early by `max_open` or `max_per_client`.
    pub evicted: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Half {
    queries: u16,
    port: u16,
    /// The DNS id: a resolver resends the same query, id included.
    id: Option<u16>,
    first_query: Nanos,
    last_query: Nanos,
    /// The same query sent again (same port and id).
    resends: u16,
    outcome: Option<Outcome>,
}

#[derive(Debug, Clone)]
struct Candidate {
    suffix: Suffix,
    first_query: Nanos,
    /// A (or any single type) and AAAA.
    halves: [Half; 2],
}

impl Candidate {
    fn outcome(&self) -> Option<Outcome> {
        self.halves.iter().filter_map(|h| h.outcome).max()
    }

    fn queries(&self) -> u32 {
        self.halves.iter().map(|h| h.queries as u32).sum()
    }
}

/// A and AAAA are one lookup (getaddrinfo asks both); any other type is its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Address,
    Other(u16),
}

impl Family {
    fn of(qtype: u16) -> (Self, usize) {
        match qtype {
            QTYPE_A => (Self::Address, 0),
            QTYPE_AAAA => (Self::Address, 1),
            t => (Self::Other(t), 0),
        }
    }
}

#[derive(Debug)]
struct Open {
    /// `VACANT` once it has ended: the slot keeps its buffers for the next lookup.
    id: u64,
    client: IpAddr,
    family: Family,
    base: BaseName,
    namespace: Option<String>,
    /// Two inline: a lookup answered at its first or second candidate (a Service by its short
    /// name, every load-generator lookup). A longer walk spills to the heap once per slot; the
    /// slot's next lookups reuse that room.
    candidates: Candidates,
    identities: SmallVec<[SourceId; 2]>,
    autopath: Option<String>,
    first_query: Nanos,
    last_query: Nanos,
    last_response: Option<Nanos>,
    /// The stage clock when a query last joined.
    touched: Nanos,
    /// Its entry in `LookupTable::by_first_label`.
    key: u64,
    /// It has tried a cluster or extra suffix: `learn` may continue it with a node domain.
    learning: bool,
}

/// Candidates inline: with five (glibc's usual walk) a slot was 664 bytes, 43 MB for the
/// default 65,536 open lookups; with two it is 384 (one index key, not four).
type Candidates = SmallVec<[Candidate; 2]>;

/// A lookup's base name, in the lookup's own memory when short (nearly always): on the heap
/// it is one cache miss more for every lookup that ends (its candidates are written from it)
/// and every query that meets it, in a table of 65k lookups. An `ArrayString` reads as a
/// `str` without checking its bytes again (a `[u8; N]` would be checked at every use).
#[derive(Debug, Default)]
struct BaseName {
    short: ArrayString<28>,
    /// A longer name (`short` then empty); kept once grown: the slot's next lookups reuse it.
    long: String,
}

impl BaseName {
    fn set(&mut self, name: &str) {
        self.short.clear();
        self.long.clear();
        if self.short.try_push_str(name).is_err() {
            self.long.push_str(name);
        }
    }

    fn as_str(&self) -> &str {
        match self.long.is_empty() {
            true => &self.short,
            false => &self.long,
        }
    }
}

impl std::ops::Deref for BaseName {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

/// The id of no lookup (ids start at 1).
const VACANT: u64 = 0;

/// The open lookup in `slot`, if any.
fn open_at(slots: &[Open], slot: usize) -> Option<&Open> {
    slots.get(slot).filter(|l| l.id != VACANT)
}

fn open_at_mut(slots: &mut [Open], slot: usize) -> Option<&mut Open> {
    slots.get_mut(slot).filter(|l| l.id != VACANT)
}

impl Open {
    fn vacant() -> Self {
        Self {
            id: VACANT,
            client: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            family: Family::Address,
            base: BaseName::default(),
            namespace: None,
            candidates: SmallVec::new(),
            identities: SmallVec::new(),
            autopath: None,
            first_query: 0,
            last_query: 0,
            last_response: None,
            touched: 0,
            key: 0,
            learning: false,
        }
    }

    /// Starts lookup `id` in a vacant slot, in place: an open lookup is large (its candidates
    /// inline), and its buffers are reused. Every field is named, so none is left stale.
    fn start(
        &mut self,
        id: u64,
        q: &Query<'_>,
        base: &str,
        key: u64,
        now: Nanos,
        spare: &mut Vec<String>,
    ) {
        let Open {
            id: my_id,
            client,
            family: my_family,
            base: my_base,
            namespace,
            candidates,
            identities,
            autopath,
            first_query,
            last_query,
            last_response,
            touched,
            key: my_key,
            learning,
        } = self;
        *my_id = id;
        *client = q.client.ip();
        *my_family = Family::of(q.qtype).0;
        my_base.set(base);
        set(namespace, None, spare);
        candidates.clear();
        identities.clear();
        set(autopath, None, spare);
        *first_query = q.query_time;
        *last_query = q.query_time;
        *last_response = None;
        *touched = now;
        *my_key = key;
        *learning = false;
    }

    /// Whether event time `t` is within `gap` of this lookup.
    fn near(&self, t: Nanos, gap: Nanos) -> bool {
        let last = self.last_query.max(self.last_response.unwrap_or(0));
        t <= last.saturating_add(gap) && t.saturating_add(gap) >= self.first_query
    }
}

/// How a query fits an open lookup.
enum Fit {
    /// A candidate (or half) it has not tried.
    New,
    /// The same query again from the same port: a resend.
    Retry,
}

/// The open lookups of one partition of clients, and the rules that join queries into them.
pub struct LookupTable {
    cfg: Config,
    search: SearchList,
    /// Open lookups in slots; the id tells a reused slot from the lookup that left it.
    slots: Vec<Open>,
    free: Vec<usize>,
    /// Each client's open lookups.
    clients: HashMap<IpAddr, ClientLookups>,
    /// Open lookups by (client, first label), oldest first. Every reading of a name, every
    /// candidate of a lookup and every prefix `learn` tries starts with the name's first
    /// label: one probe finds a query's lookups, one entry per lookup, without looking at the
    /// client's others (a forwarder or a load generator has as many open as it may).
    by_first_label: HashMap<u64, SmallVec<[Indexed; 2]>>,
    hasher: ahash::RandomState,
    /// Lazily checked: a lookup touched since is queued again when its turn comes.
    expiry: Expiry,
    open: usize,
    next_id: u64,
    id_step: u64,
    tally: Tally,
    /// The lookup that ends, written into the strings and vectors of the one before and
    /// handed out by reference: ending one allocates nothing and moves nothing.
    finished: Lookup,
    /// Optional names let go (a lookup's namespace and autopath target, the finished
    /// lookup's), for the next ones that have one: lookups start and end without allocating.
    spare: Vec<String>,
    /// Which finished lookups get their candidates named (see `name_candidates_for`).
    named: Box<dyn Fn(&Lookup) -> bool>,
}

/// One client's open lookups.
#[derive(Debug, Default)]
struct ClientLookups {
    /// Oldest first (for the per-client bound), from `head` on.
    slots: SmallVec<[usize; 4]>,
    /// The oldest ones ended are skipped, not shifted out: a client at its bound ends its
    /// oldest lookup for each new one, and would move all the others each time.
    head: usize,
    /// How many are `learning`: with none, no query of the client needs `learn`'s look at
    /// every prefix of its name (a client outside Kubernetes never has one).
    learning: u32,
}

impl ClientLookups {
    fn open(&self) -> &[usize] {
        &self.slots[self.head..]
    }

    fn remove(&mut self, slot: usize) {
        match self.open().iter().position(|&s| s == slot) {
            Some(0) => self.head += 1,
            Some(i) => {
                self.slots.remove(self.head + i);
            }
            None => {}
        }
        // Shifted out once half are skipped: amortised constant per lookup.
        if self.head > 0 && self.head * 2 >= self.slots.len() {
            self.slots.drain(..self.head);
            self.head = 0;
        }
    }
}

/// Strings kept for reuse.
const MAX_SPARE: usize = 1024;

impl LookupTable {
    /// `partition` of `partitions`: ids are unique across partitions (`partition + k·partitions`).
    pub fn new(cfg: Config, partition: u64, partitions: u64) -> Self {
        Self {
            search: SearchList::new(&cfg.cluster_domain, &cfg.search_suffixes),
            cfg,
            slots: Vec::new(),
            free: Vec::new(),
            clients: HashMap::new(),
            by_first_label: HashMap::new(),
            hasher: crate::dns::key_hasher(),
            expiry: Expiry::default(),
            open: 0,
            next_id: partition + 1,
            id_step: partitions.max(1),
            tally: Tally::default(),
            finished: Lookup::blank(),
            spare: Vec::new(),
            named: Box::new(|_| true),
        }
    }

    /// Only the finished lookups `wanted` accepts (given all but their candidates' names and
    /// `answered_by`) get those written; the others end with none. Naming the candidates was
    /// a fifth of `finish`, and only printed lookups show them. By default all are named.
    pub fn name_candidates_for(&mut self, wanted: impl Fn(&Lookup) -> bool + 'static) {
        self.named = Box::new(wanted);
    }

    pub fn open_lookups(&self) -> usize {
        self.open
    }

    pub fn tally(&self) -> Tally {
        self.tally
    }

    pub fn search_list(&self) -> &SearchList {
        &self.search
    }

    /// Joins `q` into a lookup at stage clock `now` and returns its id; `None` for a query of
    /// the root. Lookups evicted to make room go to `done`.
    pub fn on_query(
        &mut self,
        q: &Query<'_>,
        now: Nanos,
        done: &mut impl FnMut(&Lookup),
    ) -> Option<u64> {
        let name = names::normalise(q.qname);
        if name.is_empty() {
            return None;
        }
        let (family, half) = Family::of(q.qtype);
        let mut readings = Readings::new();
        self.search.readings(name, &mut readings);
        let ip = q.client.ip();
        // Hashed once: for the lookups it may join, and for a new lookup's entry.
        let key = self.key(ip, first_label(name));
        let indexed = self.indexed(key, name);
        let found = match self.find(q, family, half, &readings, &indexed) {
            Ok(found) => Some(found),
            Err(other_bases) => self.rebase(q, &readings, &other_bases),
        };
        let (slot, r, fit) = match found {
            Some((slot, i, fit)) => (slot, readings[i], fit),
            None => {
                // The client looked up once for both: whether `learn` can apply (a lookup
                // past the cluster suffixes), and its oldest lookup when it is at its bound.
                let (learning, oldest) = self.client_state(ip);
                match learning
                    .then(|| self.learn(q, family, half, name, &indexed))
                    .flatten()
                {
                    Some((slot, suffix, fit)) => {
                        let r = Reading {
                            base: name,
                            suffix,
                            namespace: None,
                        };
                        (slot, r, fit)
                    }
                    None => {
                        // A client at its bound makes room: its oldest lookup ends.
                        if let Some(oldest) = oldest {
                            self.close(oldest, true, done);
                        }
                        let slot = self.open_lookup(q, readings[0].base, key, now, done);
                        (slot, readings[0], Fit::New)
                    }
                }
            }
        };
        self.join(slot, q, r, half, fit, now);
        self.note_learning(slot);
        open_at(&self.slots, slot).map(|l| l.id)
    }

    /// Whether the client has a `learning` lookup, and its oldest lookup when it has as many
    /// open as it may.
    fn client_state(&self, ip: IpAddr) -> (bool, Option<usize>) {
        self.clients.get(&ip).map_or((false, None), |c| {
            let full = c.open().len() >= self.cfg.max_per_client.max(1);
            (c.learning > 0, full.then(|| c.open()[0]))
        })
    }

    /// Keeps the client's count of `learning` lookups in step with the lookup's candidates.
    fn note_learning(&mut self, slot: usize) {
        let Some(l) = open_at_mut(&mut self.slots, slot) else {
            return;
        };
        let learning = l
            .candidates
            .iter()
            .any(|c| matches!(c.suffix, Suffix::Cluster | Suffix::Extra(_)));
        if learning == l.learning {
            return;
        }
        l.learning = learning;
        if let Some(c) = self.clients.get_mut(&l.client) {
            match learning {
                true => c.learning += 1,
                false => c.learning -= 1,
            }
        }
    }

    fn key(&self, ip: IpAddr, base: &str) -> u64 {
        self.hasher.hash_one((ip, base))
    }

    /// The open lookups under `key` (a client's first label) whose base is a prefix of `name`
    /// that ends at a label, newest first. Decided on the index entries alone (length and
    /// fingerprint): a lookup that only shares the first label is not looked at.
    fn indexed(&self, key: u64, name: &str) -> SmallVec<[usize; 8]> {
        let mut out = SmallVec::new();
        let Some(list) = self.by_first_label.get(&key) else {
            return out;
        };
        // Each prefix's fingerprint made once, when an entry's length first asks for it: a
        // forwarder has hundreds of lookups under `www`, most as long as the name.
        let mut whole = None;
        let mut shorter: SmallVec<[(u32, u32); 4]> = SmallVec::new();
        for e in list.iter().rev() {
            let len = e.base_len as usize;
            let f = if len == name.len() {
                *whole.get_or_insert_with(|| self.fingerprint(name))
            } else if name.as_bytes().get(len) == Some(&b'.') {
                match shorter.iter().find(|(l, _)| *l == e.base_len) {
                    Some(&(_, f)) => f,
                    None => {
                        let f = self.fingerprint(&name[..len]);
                        shorter.push((e.base_len, f));
                        f
                    }
                }
            } else {
                continue;
            };
            if f == e.base {
                out.push(e.slot);
            }
        }
        out
    }

    fn fingerprint(&self, base: &str) -> u32 {
        self.hasher.hash_one(base) as u32
    }

    /// The `by_first_label` entry of the lookup in `slot`, whose base is `base`.
    fn index_entry(&self, slot: usize, base: &str) -> Indexed {
        Indexed {
            slot,
            base_len: base.len() as u32,
            base: self.fingerprint(base),
        }
    }

    /// The newest open lookup of the client the query fits, reading its name every way; else
    /// the lookups `rebase` may read again: of the family, near, and of none of its bases.
    /// `indexed` holds the client's lookups whose base is a prefix of the name: every base
    /// the name reads as is one.
    fn find(
        &self,
        q: &Query<'_>,
        family: Family,
        half: usize,
        readings: &[Reading<'_>],
        indexed: &[usize],
    ) -> Result<(usize, usize, Fit), SmallVec<[usize; 8]>> {
        let mut other_bases = SmallVec::new();
        for &slot in indexed {
            let Some(l) = open_at(&self.slots, slot)
                .filter(|l| l.family == family && l.near(q.query_time, self.cfg.gap))
            else {
                continue;
            };
            let mut same_base = false;
            for (i, r) in readings
                .iter()
                .enumerate()
                .filter(|(_, r)| r.base == l.base.as_str())
            {
                same_base = true;
                if r.suffix == Suffix::Namespace
                    && l.namespace
                        .as_deref()
                        .is_some_and(|ns| Some(ns) != r.namespace)
                {
                    continue;
                }
                if let Some(fit) = fits(l, r.suffix, half, q) {
                    return Ok((slot, i, fit));
                }
            }
            if !same_base {
                other_bases.push(slot);
            }
        }
        Err(other_bases)
    }

    /// Sessions reach the stage out of order (several shards and identities): a lookup opened
    /// by a lone later candidate may have been read with the wrong base
    /// (`web.default.svc.cluster.local` as `web` in namespace `default`, when the walk was
    /// `web.default`'s). A query that reads as an earlier candidate of the same walk under
    /// another base re-reads such a lookup with that base, when the query times agree with
    /// the suffixes' order. The lookups looked at are `find`'s `other_bases` (a lookup with one
    /// of the query's bases did not fit there).
    fn rebase(
        &mut self,
        q: &Query<'_>,
        readings: &[Reading<'_>],
        other_bases: &[usize],
    ) -> Option<(usize, usize, Fit)> {
        for &slot in other_bases {
            let Some(l) = open_at(&self.slots, slot) else {
                continue;
            };
            let [c] = l.candidates.as_slice() else {
                continue;
            };
            let name = self
                .search
                .candidate_name(&l.base, c.suffix, l.namespace.as_deref());
            let mut old = Readings::new();
            self.search.readings(names::normalise(&name), &mut old);
            for (i, r) in readings.iter().enumerate() {
                let Some(o) = old
                    .iter()
                    .find(|o| o.base == r.base && o.suffix != r.suffix)
                else {
                    continue;
                };
                let in_order = o.suffix == Suffix::Bare
                    || r.suffix == Suffix::Bare
                    || (r.suffix < o.suffix) == (q.query_time < c.first_query);
                if !in_order {
                    continue;
                }
                let (base, suffix, ns) = (
                    o.base.to_string(),
                    o.suffix,
                    o.namespace.map(str::to_string),
                );
                let l = open_at_mut(&mut self.slots, slot)?;
                l.base.set(&base);
                l.namespace = ns;
                l.candidates[0].suffix = suffix;
                let (key, new) = (l.key, self.index_entry(slot, &base));
                let mut entries = self.by_first_label.get_mut(&key).into_iter().flatten();
                if let Some(e) = entries.find(|e| e.slot == slot) {
                    *e = new;
                }
                return Some((slot, i, Fit::New));
            }
        }
        None
    }

    /// A name no known suffix explains, continuing an open lookup past its cluster suffixes:
    /// base + a node domain, learned.
    /// `indexed`: the client's lookups whose base is a prefix of the name, newest first.
    fn learn(
        &mut self,
        q: &Query<'_>,
        family: Family,
        half: usize,
        name: &str,
        indexed: &[usize],
    ) -> Option<(usize, Suffix, Fit)> {
        let slot = indexed.iter().copied().find(|&slot| {
            open_at(&self.slots, slot).is_some_and(|l| {
                l.family == family
                    && l.near(q.query_time, self.cfg.gap)
                    && name.len() > l.base.len() + 1
                    && name.starts_with(l.base.as_str())
                    && name.as_bytes()[l.base.len()] == b'.'
                    && l.candidates
                        .iter()
                        .any(|c| matches!(c.suffix, Suffix::Cluster | Suffix::Extra(_)))
            })
        })?;
        let base = &open_at(&self.slots, slot)?.base;
        let suffix = self.search.learn(name, base)?;
        let fit = fits(open_at(&self.slots, slot)?, suffix, half, q)?;
        Some((slot, suffix, fit))
    }

    fn open_lookup(
        &mut self,
        q: &Query<'_>,
        base: &str,
        key: u64,
        now: Nanos,
        done: &mut impl FnMut(&Lookup),
    ) -> usize {
        let ip = q.client.ip();
        while self.open >= self.cfg.max_open.max(1) {
            let Some(Due { slot, id, .. }) = self.expiry.pop() else {
                break;
            };
            if open_at(&self.slots, slot).is_some_and(|l| l.id == id) {
                self.close(slot, true, done);
            }
        }
        let id = self.next_id;
        self.next_id += self.id_step;
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Open::vacant());
            self.slots.len() - 1
        });
        let l = &mut self.slots[slot];
        l.start(id, q, base, key, now, &mut self.spare);
        self.open += 1;
        let entry = self.index_entry(slot, base);
        self.by_first_label.entry(key).or_default().push(entry);
        self.clients.entry(ip).or_default().slots.push(slot);
        self.expiry.push(Due {
            touched: now,
            id,
            slot,
        });
        self.compact_expiry();
        slot
    }

    /// Drops the expiry entries of lookups that have ended. Nothing else takes them out before
    /// their time comes, and a client at its bound (a load generator, a forwarder) ends one
    /// lookup per query by eviction: the queue would hold every lookup of the last `gap +
    /// linger`. Compacted when it has grown to twice the open lookups: amortised constant per
    /// lookup.
    fn compact_expiry(&mut self) {
        if self.expiry.len() <= 2 * self.open + 1024 {
            return;
        }
        let slots = &self.slots;
        self.expiry
            .retain(|d| open_at(slots, d.slot).is_some_and(|l| l.id == d.id));
    }

    fn join(
        &mut self,
        slot: usize,
        q: &Query<'_>,
        r: Reading<'_>,
        half: usize,
        fit: Fit,
        now: Nanos,
    ) {
        let Some(l) = open_at_mut(&mut self.slots, slot) else {
            return;
        };
        l.touched = l.touched.max(now);
        let (suffix, namespace) = (r.suffix, r.namespace);
        if suffix == Suffix::Namespace && l.namespace.is_none() {
            set(&mut l.namespace, namespace, &mut self.spare);
        }
        if l.identities.len() < MAX_IDENTITIES && !l.identities.contains(&q.identity) {
            l.identities.push(q.identity);
        }
        l.first_query = l.first_query.min(q.query_time);
        l.last_query = l.last_query.max(q.query_time);
        if let Some(r) = q.response_time {
            l.last_response = Some(l.last_response.map_or(r, |t| t.max(r)));
        }
        let i = match l.candidates.iter().position(|c| c.suffix == suffix) {
            Some(i) => i,
            None => {
                l.candidates.push(Candidate {
                    suffix,
                    first_query: q.query_time,
                    halves: [Half::default(); 2],
                });
                l.candidates.len() - 1
            }
        };
        let c = &mut l.candidates[i];
        c.first_query = c.first_query.min(q.query_time);
        let h = &mut c.halves[half];
        if h.queries == 0 {
            h.port = q.client.port();
            h.id = q.dns_id;
            h.first_query = q.query_time;
            h.last_query = q.query_time;
        }
        if matches!(fit, Fit::Retry) {
            h.resends = h.resends.saturating_add(1);
        }
        h.first_query = h.first_query.min(q.query_time);
        h.last_query = h.last_query.max(q.query_time);
        h.queries = h.queries.saturating_add(1);
        h.outcome = h.outcome.max(Some(q.outcome));
        if suffix == Suffix::Namespace && q.outcome == Outcome::Answered {
            if let Some(t) = q.cname_target.map(names::normalise) {
                if is_autopath_target(&self.search, &l.base, t) {
                    set(&mut l.autopath, Some(t), &mut self.spare);
                    l.autopath.iter_mut().for_each(|a| a.push('.'));
                }
            }
        }
    }

    /// Ends every lookup nothing joined for `gap + linger` before stage clock `now`.
    pub fn advance(&mut self, now: Nanos, done: &mut impl FnMut(&Lookup)) {
        let quiet = self.cfg.gap.saturating_add(self.cfg.linger);
        while let Some(Due { touched, id, slot }) = self.expiry.peek() {
            if touched.saturating_add(quiet) > now {
                break;
            }
            self.expiry.pop();
            let Some(l) = open_at(&self.slots, slot).filter(|l| l.id == id) else {
                continue;
            };
            if l.touched > touched {
                let again = l.touched;
                self.expiry.push(Due {
                    touched: again,
                    id,
                    slot,
                });
            } else {
                self.close(slot, false, done);
            }
        }
    }

    /// Ends every open lookup (the input has ended).
    pub fn flush(&mut self, done: &mut impl FnMut(&Lookup)) {
        let mut open: Vec<(Nanos, usize)> = (0..self.slots.len())
            .filter_map(|s| open_at(&self.slots, s).map(|l| (l.first_query, s)))
            .collect();
        open.sort_unstable();
        for (_, slot) in open {
            self.close(slot, false, done);
        }
        self.expiry.clear();
    }

    fn close(&mut self, slot: usize, evicted: bool, done: &mut impl FnMut(&Lookup)) {
        // Worked on in place: an open lookup is large (its candidates inline), not moved.
        let Some(l) = open_at_mut(&mut self.slots, slot) else {
            return;
        };
        self.free.push(slot);
        self.open -= 1;
        // Through the entry: the list is found once, also when it goes.
        if let Entry::Occupied(mut list) = self.by_first_label.entry(l.key) {
            remove_slot(list.get_mut(), slot);
            if list.get().is_empty() {
                list.remove();
            }
        }
        if let Entry::Occupied(mut client) = self.clients.entry(l.client) {
            let c = client.get_mut();
            c.remove(slot);
            c.learning -= l.learning as u32;
            if c.open().is_empty() {
                client.remove();
            }
        }
        if evicted {
            self.tally.evicted += 1;
        }
        finish(
            &self.search,
            l,
            evicted,
            &mut self.finished,
            &mut self.spare,
            &*self.named,
        );
        l.id = VACANT;
        done(&self.finished);
    }
}

/// Takes `slot` out of a `by_first_label` list that holds it once, keeping the order (oldest first).
fn remove_slot(list: &mut SmallVec<[Indexed; 2]>, slot: usize) {
    if let Some(i) = list.iter().position(|e| e.slot == slot) {
        list.remove(i);
    }
}

/// An open lookup in `LookupTable::by_first_label`: its slot, and its base's length and
/// fingerprint. A client can have hundreds of lookups open under one first label (a forwarder
/// asking for `www.a.com`, `www.b.com`...): these keep a query from reading the slots of those
/// whose base its name does not start with, each a cache miss.
#[derive(Debug, Clone, Copy)]
struct Indexed {
    slot: usize,
    base_len: u32,
    base: u32,
}

/// The name up to its first dot.
fn first_label(name: &str) -> &str {
    name.split_once('.').map_or(name, |(label, _)| label)
}

/// Whether the query fits lookup `l` as candidate `suffix`, half `half`.
fn fits(l: &Open, suffix: Suffix, half: usize, q: &Query<'_>) -> Option<Fit> {
    let Some(c) = l.candidates.iter().find(|c| c.suffix == suffix) else {
        // More is no resolver's walk: a lookup of its own.
        return (l.candidates.len() < MAX_CANDIDATES).then_some(Fit::New);
    };
    let h = &c.halves[half];
    if h.queries == 0 {
        Some(Fit::New)
    } else if h.port == q.client.port() && h.id == q.dns_id {
        Some(Fit::Retry)
    } else {
        // The same candidate from a fresh socket, or with a fresh id (a client such as
        // dnsperf or a caching forwarder reusing one socket): asked again.
        None
    }
}

/// `autopath` answers `<base>.<ns>.svc.<cd>` with a CNAME to the name a later candidate
/// would have found: `<base>.svc.<cd>`, `<base>.<cd>`, `<base>.<extra>` or `<base>` itself.
fn is_autopath_target(search: &SearchList, base: &str, target: &str) -> bool {
    let mut readings = Readings::new();
    search.readings(target, &mut readings);
    readings
        .iter()
        .any(|r| r.base == base && r.suffix != Suffix::Namespace)
}

impl Lookup {
    /// An empty lookup for `finish` to fill.
    fn blank() -> Self {
        Self {
            id: 0,
            client: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            time: 0,
            identities: Vec::new(),
            asked: String::new(),
            namespace: None,
            candidates: Vec::new(),
            queries: 0,
            outcome: Outcome::Failed,
            answered_by: None,
            autopath: None,
            wasted_queries: 0,
            latency: 0,
            retries: 0,
            waited: 0,
            evicted: false,
        }
    }
}

/// Writes the finished lookup `l` into `out`, reusing `out`'s strings and vectors. Its
/// candidates' names and `answered_by` only when `named` wants them (see `name_candidates_for`).
fn finish(
    search: &SearchList,
    l: &mut Open,
    evicted: bool,
    out: &mut Lookup,
    spare: &mut Vec<String>,
    named: &dyn Fn(&Lookup) -> bool,
) {
    drop_server_lookups(&mut l.candidates);
    l.candidates.sort_by_key(|c| c.first_query);
    let (base, ns) = (l.base.as_str(), l.namespace.as_deref());
    out.queries = l.candidates.iter().map(Candidate::queries).sum();
    out.outcome = l
        .candidates
        .iter()
        .filter_map(Candidate::outcome)
        .max()
        .unwrap_or(Outcome::Failed);
    out.wasted_queries = match l.candidates.split_last() {
        Some((_, before)) => before.iter().map(Candidate::queries).sum(),
        None => 0,
    };
    let end = l.last_response.unwrap_or(l.last_query).max(l.last_query);
    asked(search, l, base, &mut out.asked);
    let mut waits = SmallVec::new();
    out.retries = l.candidates.iter().map(|c| retries(c, &mut waits)).sum();
    out.id = l.id;
    out.client = l.client;
    out.time = l.first_query;
    out.identities.clear();
    out.identities.extend_from_slice(&l.identities);
    set(&mut out.namespace, ns, spare);
    set(&mut out.autopath, l.autopath.as_deref(), spare);
    out.latency = end.saturating_sub(l.first_query);
    out.waited = union_length(&mut waits);
    out.evicted = evicted;
    if !named(out) {
        let_go(&mut out.candidates, 0, spare);
        set(&mut out.answered_by, None, spare);
        return;
    }
    let_go(&mut out.candidates, l.candidates.len(), spare);
    for (i, c) in l.candidates.iter().enumerate() {
        if out.candidates.len() == i {
            out.candidates.push(spare.pop().unwrap_or_default());
        }
        search.candidate_name_into(base, c.suffix, ns, &mut out.candidates[i]);
    }
    let answered_by = l
        .candidates
        .iter()
        .position(|c| c.outcome() == Some(Outcome::Answered))
        .map(|i| out.candidates[i].as_str());
    set(&mut out.answered_by, answered_by, spare);
}

/// Keeps the first `keep` of `names`; the others go to `spare`.
fn let_go(names: &mut Vec<String>, keep: usize, spare: &mut Vec<String>) {
    for name in names.drain(keep.min(names.len())..) {
        if spare.len() < MAX_SPARE {
            spare.push(name);
        }
    }
}

/// Sets an optional string, reusing the one there or a `spare` one, and keeping the one let go.
fn set(slot: &mut Option<String>, value: Option<&str>, spare: &mut Vec<String>) {
    match (slot.take(), value) {
        (s, Some(v)) => {
            let mut s = s.or_else(|| spare.pop()).unwrap_or_default();
            s.clear();
            s.push_str(v);
            *slot = Some(s);
        }
        (Some(s), None) if spare.len() < MAX_SPARE => spare.push(s),
        (_, None) => {}
    }
}

/// The name the application asked (into `out`). Several candidates prove a search walk: the
/// base name. A lone candidate cannot show whether the short or the full name was asked: a
/// lone `<name>.<ns>.svc.<cd>` whose `<name>` has no dot (or that `autopath` answered) reads
/// as the short name, the likelier ask; anything else as the absolute name it is.
fn asked(search: &SearchList, l: &Open, base: &str, out: &mut String) {
    out.clear();
    match l.candidates.as_slice() {
        [c] if c.suffix == Suffix::Bare => {
            out.push_str(base);
            out.push('.');
        }
        [c] if c.suffix == Suffix::Namespace && (!base.contains('.') || l.autopath.is_some()) => {
            out.push_str(base)
        }
        [c] => search.candidate_name_into(base, c.suffix, l.namespace.as_deref(), out),
        _ => out.push_str(base),
    }
}

/// Removes the queries CoreDNS made itself while answering one of the candidates: a plugin
/// that resolves a CNAME target through the server (`template`) is logged as a client query
/// from the client's socket with the client's DNS id, for another name. A resolver never asks
/// two names with one id from one socket, so the later of two such halves is the server's.
fn drop_server_lookups(candidates: &mut Candidates) {
    // The halves of one candidate are a pair, never the server's: most lookups end here.
    if candidates.len() < 2 {
        return;
    }
    let halves: SmallVec<[(usize, usize, Half); 2 * MAX_CANDIDATES]> = candidates
        .iter()
        .enumerate()
        .flat_map(|(i, c)| c.halves.iter().enumerate().map(move |(k, h)| (i, k, *h)))
        .filter(|(_, _, h)| h.queries > 0 && h.id.is_some())
        .collect();
    let mut internal: SmallVec<[(usize, usize); 4]> = SmallVec::new();
    for &(i, k, h) in &halves {
        let earlier = halves.iter().any(|&(j, _, o)| {
            j != i && o.port == h.port && o.id == h.id && (o.first_query, j) < (h.first_query, i)
        });
        if earlier {
            internal.push((i, k));
        }
    }
    for (i, k) in internal {
        candidates[i].halves[k] = Half::default();
    }
    candidates.retain(|c| c.queries() > 0);
}

/// The resends of a candidate, and the time lost before each (into `waits`): a query sent
/// again with its id, and a half whose first send was lost — it left the port more than
/// `PAIR_GAP` after the other half, when that half was being resent (glibc sends both again
/// after its timeout, and only the resend of the lost one reached the server).
fn retries(c: &Candidate, waits: &mut Waits) -> u32 {
    let mut n = 0;
    for (i, h) in c.halves.iter().enumerate() {
        if h.resends > 0 {
            n += h.resends as u32;
            waits.push((h.first_query, h.last_query));
        }
        let o = &c.halves[1 - i];
        let lost_first = h.queries > 0
            && o.resends > 0
            && h.port == o.port
            && h.first_query > o.first_query + PAIR_GAP
            && h.first_query.abs_diff(o.last_query) <= PAIR_GAP;
        if lost_first {
            n += 1;
            waits.push((o.first_query, h.first_query));
        }
    }
    n
}

/// Retry intervals of one lookup: two per candidate at most.
type Waits = SmallVec<[(Nanos, Nanos); 2 * MAX_CANDIDATES]>;

/// The total length of the union of the intervals.
fn union_length(intervals: &mut [(Nanos, Nanos)]) -> Nanos {
    intervals.sort_unstable();
    let mut total = 0;
    let mut current: Option<(Nanos, Nanos)> = None;
    for &(a, b) in intervals.iter() {
        current = match current {
            Some((s, e)) if a <= e => Some((s, e.max(b))),
            Some((s, e)) => {
                total += e - s;
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    total + current.map_or(0, |(s, e)| e - s)
}

#[cfg(test)]
mod tests;
