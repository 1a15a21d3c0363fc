//! The traffic model: N CoreDNS pods, each a deterministic stream of dnstap messages in the
//! order CoreDNS writes them, with the ground truth of every session it started.
//!
//! Event time: session `n` of a pod starts (CLIENT_QUERY query_time) at
//! `start_ns + n / per-pod event rate`; the rest of the session is scheduled on that clock
//! (CR a few hundred µs later, FQ+FR after the upstream round trip, a timed-out attempt's FQ
//! 2 s after the forward started) and kept in a queue ordered by emit time, so many sessions
//! are in flight and interleaved, and upstream timeouts resolve within the stream.

use crate::dnswire::{self, NameTable, ResponseShape};
use crate::rng::{self, Rng, Weighted};
use dnstap_analyser::dnstap::pb::{
    self, mod_Dnstap::Type as TapType, mod_Message::Type as MsgType, SocketFamily, SocketProtocol,
};
use quick_protobuf::{MessageWrite, Writer};
use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Write as _;
use std::sync::Arc;

pub const VERSION: &str = "CoreDNS-1.11.3";
pub const NS: u64 = 1_000_000_000;
/// CoreDNS forward's per-attempt read timeout.
pub const ATTEMPT_TIMEOUT_NS: u64 = 2 * NS;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Answered by a local plugin (kubernetes, hosts, cache): CQ CR.
    Local,
    /// Forwarded and answered: CQ FQ FR CR (FQ of a timed-out first attempt before, on retry).
    Forward,
    /// Every upstream attempt timed out: CQ, one FQ per attempt, no FR, no CR.
    Timeout,
    /// A plugin answered without writing (e.g. max_concurrent): CQ only.
    NoResponse,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [Self::Local, Self::Forward, Self::Timeout, Self::NoResponse];

    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Forward => "forward",
            Self::Timeout => "timeout",
            Self::NoResponse => "no_response",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "local" => Self::Local,
            "forward" | "forwarded" => Self::Forward,
            "timeout" => Self::Timeout,
            "no_response" | "noresponse" | "noresp" => Self::NoResponse,
            _ => return None,
        })
    }
}

/// Expected analyser Status, indexed like the analyser's names.
pub const STATUS_NAMES: [&str; 3] = ["Succeeded", "Failed", "SampleLoss"];
pub const SUCCEEDED: usize = 0;
pub const FAILED: usize = 1;
pub const SAMPLE_LOSS: usize = 2;

/// dnstap message types in the order CQ, CR, FQ, FR (the BitMap bits 1, 2, 4, 8).
pub const TYPE_NAMES: [&str; 4] = [
    "CLIENT_QUERY",
    "CLIENT_RESPONSE",
    "FORWARDER_QUERY",
    "FORWARDER_RESPONSE",
];

#[derive(Debug, Clone)]
pub struct Config {
    pub pods: u32,
    pub seed: u64,
    /// Sessions over all pods; `u64::MAX` when bounded by a duration instead.
    pub sessions: u64,
    pub names: usize,
    pub zipf_s: f64,
    /// Weights for local, forward, timeout, no response.
    pub mix: [f64; 4],
    /// Share of forwarded sessions whose first upstream attempt times out (then a retry answers).
    pub retry_share: f64,
    pub rcodes: Vec<(u8, f64)>,
    pub clients: u32,
    /// Share of pods that log clients as 16-byte IPv4-mapped addresses (wildcard listener).
    pub mapped_ipv4: f64,
    pub aaaa_share: f64,
    /// Fraction of messages the sender drops, in bursts.
    pub loss: f64,
    pub loss_burst: (u32, u32),
    /// Sessions per second of event time, over all pods.
    pub event_rate: f64,
    pub start_ns: u64,
    pub upstreams: u32,
    pub max_attempts: u8,
    /// Keep one ground-truth line per session.
    pub record_sessions: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pods: 1,
            seed: 1,
            sessions: 1000,
            names: 10_000,
            zipf_s: 1.0,
            mix: [3.0, 15.0, 5.0, 1.0],
            retry_share: 0.05,
            rcodes: vec![
                (dnswire::RCODE_NOERROR, 80.0),
                (dnswire::RCODE_NXDOMAIN, 15.0),
                (dnswire::RCODE_SERVFAIL, 3.0),
                (dnswire::RCODE_REFUSED, 2.0),
            ],
            clients: 1000,
            mapped_ipv4: 0.5,
            aaaa_share: 0.2,
            loss: 0.0,
            loss_burst: (8, 24),
            event_rate: 100_000.0,
            start_ns: 1_700_000_000 * NS,
            upstreams: 2,
            max_attempts: 3,
            record_sessions: false,
        }
    }
}

/// What all pods share (read-only).
pub struct Model {
    pub cfg: Config,
    /// Names for locally answered sessions (cluster names) and forwarded ones.
    names: [NameTable; 2],
    zipf: Weighted,
    mix: Weighted,
    rcodes: Weighted,
}

impl Model {
    pub fn new(cfg: Config) -> Arc<Self> {
        assert!(cfg.pods > 0 && cfg.names > 0 && cfg.clients > 0 && cfg.upstreams > 0);
        let local = NameTable::build(cfg.names, &["svc", "cluster", "local"], |k| {
            vec![format!("s{k}"), format!("ns{}", k % 64)]
        });
        let external = NameTable::build(cfg.names, &["example", "com"], |k| {
            vec![format!("w{k}"), format!("d{}", k % 97)]
        });
        let rcode_w: Vec<f64> = cfg.rcodes.iter().map(|r| r.1).collect();
        Arc::new(Model {
            zipf: rng::zipf(cfg.names, cfg.zipf_s),
            mix: Weighted::new(&cfg.mix),
            rcodes: Weighted::new(&rcode_w),
            names: [local, external],
            cfg,
        })
    }

    pub fn identity(pod: u32) -> String {
        format!("coredns-{pod}")
    }

    /// Sessions pod `pod` starts when the run is bounded by a session count.
    pub fn pod_quota(&self, pod: u32) -> u64 {
        let c = &self.cfg;
        if c.sessions == u64::MAX {
            return u64::MAX;
        }
        c.sessions / c.pods as u64 + u64::from((pod as u64) < c.sessions % c.pods as u64)
    }

    pub fn qname_text(&self, class: u8, name: u32) -> String {
        self.names[class as usize].text(name as usize)
    }
}

/// Ground-truth counters of one pod (or all, once merged).
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub sessions: u64,
    /// local, forward, forward_retry (subset of forward), timeout, no_response
    pub outcomes: [u64; 5],
    /// Client-visible rcode per answered session (local and forward), by rcode value.
    pub rcodes: [u64; 16],
    /// Expected (Status, BitMap of delivered messages) per session with something delivered.
    pub status_bitmap: [[u64; 16]; 3],
    pub intact: u64,
    pub lost_some: u64,
    pub lost_all: u64,
    /// Sessions that lost messages but whose CLIENT_RESPONSE was delivered, by expected
    /// status (Succeeded, Failed): their outcome is known despite the loss.
    pub lost_answered: [u64; 2],
    pub generated: [u64; 4],
    pub dropped: [u64; 4],
    pub bursts: u64,
    pub bytes: u64,
    /// Most sessions the pod had in flight at once (started, not all messages emitted yet).
    pub max_in_flight: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.sessions += o.sessions;
        for (a, b) in self.outcomes.iter_mut().zip(o.outcomes) {
            *a += b;
        }
        for (a, b) in self.rcodes.iter_mut().zip(o.rcodes) {
            *a += b;
        }
        for s in 0..3 {
            for b in 0..16 {
                self.status_bitmap[s][b] += o.status_bitmap[s][b];
            }
        }
        self.intact += o.intact;
        self.lost_some += o.lost_some;
        self.lost_all += o.lost_all;
        for (a, b) in self.lost_answered.iter_mut().zip(o.lost_answered) {
            *a += b;
        }
        for i in 0..4 {
            self.generated[i] += o.generated[i];
            self.dropped[i] += o.dropped[i];
        }
        self.bursts += o.bursts;
        self.bytes += o.bytes;
        self.max_in_flight += o.max_in_flight;
    }

    pub fn messages_generated(&self) -> u64 {
        self.generated.iter().sum()
    }

    pub fn messages_dropped(&self) -> u64 {
        self.dropped.iter().sum()
    }

    pub fn messages_sent(&self) -> u64 {
        self.messages_generated() - self.messages_dropped()
    }
}

#[derive(Debug, Clone)]
struct Sess {
    t_cq: u64,
    t_fq: u64,
    t_fr: u64,
    t_cr: u64,
    cookie: u64,
    name: u32,
    addr_seed: u32,
    client_ip: [u8; 4],
    port: u16,
    id: u16,
    qtype: u16,
    outcome: Outcome,
    class: u8,
    retry: bool,
    rcode: u8,
    attempts: u8,
    upstream: u8,
    answers: u8,
    delivered: u8,
    lost: bool,
    pending: u8,
    fq_sent: u8,
}

const EV_CR: u8 = 0;
const EV_FQ_FAILED: u8 = 1;
const EV_FQ_FR: u8 = 2;

/// What `fill` stopped on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Every session started and every message emitted.
    Done,
    /// The next message is due at this event time, after `until`.
    Due(u64),
    /// The output reached `max_bytes`.
    Full,
}

/// One emulated CoreDNS pod.
pub struct PodGen {
    model: Arc<Model>,
    pub pod: u32,
    identity: Vec<u8>,
    mapped: bool,
    rng: Rng,
    loss_rng: Rng,
    loss_q: f64,
    burst_left: u32,
    quota: u64,
    started: u64,
    spacing_ns: f64,
    offset_ns: u64,
    start_ns: u64,
    heap: BinaryHeap<Reverse<(u64, u64, u32, u8)>>,
    /// Timed-out attempts' FQs, due 2 s x attempt after the forward started: per attempt
    /// number a FIFO that is sorted up to the 50 µs jitter of the forward's start, moved into
    /// the heap shortly before they are due, so the heap stays small.
    delayed: Vec<std::collections::VecDeque<(u64, u32)>>,
    seq: u64,
    slab: Vec<Sess>,
    free: Vec<u32>,
    in_flight: u64,
    id_counters: [Vec<u16>; 2],
    id_salt: u64,
    q_wire: Vec<u8>,
    r_wire: Vec<u8>,
    pub counts: Counts,
    /// Keep pending messages until their emit time even after the last session started
    /// (merging pods into one file); otherwise they are flushed at once at the end.
    pub hold_pending: bool,
    /// Ground-truth lines (TSV), when `record_sessions`.
    pub records: Vec<u8>,
}

impl PodGen {
    pub fn new(model: Arc<Model>, pod: u32) -> Self {
        let c = &model.cfg;
        let mut rng = Rng::derive(c.seed, pod as u64 + 1);
        let mapped = rng.chance(c.mapped_ipv4);
        let spacing_ns = NS as f64 * c.pods as f64 / c.event_rate;
        let (lo, hi) = c.loss_burst;
        let mean = (lo + hi) as f64 / 2.0;
        let f = c.loss.clamp(0.0, 0.99);
        let loss_q = if f > 0.0 {
            f / (mean * (1.0 - f) + f)
        } else {
            0.0
        };
        let quota = model.pod_quota(pod);
        PodGen {
            identity: Model::identity(pod).into_bytes(),
            mapped,
            loss_rng: Rng::derive(c.seed ^ 0x1055, pod as u64 + 1),
            loss_q,
            burst_left: 0,
            quota,
            started: 0,
            spacing_ns,
            offset_ns: (spacing_ns * pod as f64 / c.pods as f64) as u64,
            start_ns: c.start_ns,
            heap: BinaryHeap::new(),
            delayed: vec![Default::default(); c.max_attempts.max(1) as usize],
            seq: 0,
            slab: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            id_counters: [vec![0; c.names], vec![0; c.names]],
            id_salt: rng.next_u64(),
            rng,
            q_wire: Vec::with_capacity(512),
            r_wire: Vec::with_capacity(512),
            counts: Counts::default(),
            hold_pending: false,
            records: Vec::new(),
            pod,
            model,
        }
    }

    /// Moves the event clock (before the first `fill`): paced runs start at the wall clock.
    pub fn set_start(&mut self, start_ns: u64) {
        self.start_ns = start_ns;
    }

    pub fn is_mapped(&self) -> bool {
        self.mapped
    }

    /// Starts no more sessions; the ones in flight still finish.
    pub fn stop_new(&mut self) {
        self.quota = self.started;
    }

    pub fn started(&self) -> u64 {
        self.started
    }

    fn start_time(&self, n: u64) -> u64 {
        self.start_ns + self.offset_ns + (n as f64 * self.spacing_ns) as u64
    }

    /// Moves delayed attempts due before `horizon` (plus the FIFOs' jitter) into the heap.
    fn migrate(&mut self, horizon: u64) {
        const MARGIN: u64 = 1_000_000;
        for q in 0..self.delayed.len() {
            while let Some(&(t, slot)) = self.delayed[q].front() {
                if t > horizon.saturating_add(MARGIN) {
                    break;
                }
                self.delayed[q].pop_front();
                self.seq += 1;
                self.heap.push(Reverse((t, self.seq, slot, EV_FQ_FAILED)));
            }
        }
    }

    /// Event time of the first message not yet emitted.
    pub fn next_due(&mut self) -> Option<u64> {
        let s = (self.started < self.quota).then(|| self.start_time(self.started));
        self.migrate(s.unwrap_or(u64::MAX));
        let e = self.heap.peek().map(|Reverse(e)| e.0);
        match (s, e) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Appends Frame Streams data frames for every message due by event time `until` (all
    /// pending ones once no session is left to start) until `out` holds `max_bytes`.
    pub fn fill(&mut self, out: &mut Vec<u8>, until: u64, max_bytes: usize) -> Progress {
        let before = out.len();
        let p = loop {
            if out.len() >= max_bytes {
                break Progress::Full;
            }
            let next_start = (self.started < self.quota).then(|| self.start_time(self.started));
            let mut next_ev = self.heap.peek().map(|Reverse(e)| e.0);
            let horizon = next_start
                .unwrap_or(u64::MAX)
                .min(next_ev.unwrap_or(u64::MAX));
            if self.delayed.iter().any(|q| {
                q.front()
                    .is_some_and(|f| f.0 <= horizon.saturating_add(1_000_000))
            }) {
                self.migrate(horizon);
                next_ev = self.heap.peek().map(|Reverse(e)| e.0);
            }
            match (next_start, next_ev) {
                (None, None) => break Progress::Done,
                (s, Some(e)) if s.is_none_or(|s| e <= s) => {
                    if (s.is_some() || self.hold_pending) && e > until {
                        break Progress::Due(e);
                    }
                    let Reverse((t, _, slot, kind)) = self.heap.pop().expect("peeked");
                    self.on_event(out, t, slot, kind);
                }
                (Some(s), _) => {
                    if s > until {
                        break Progress::Due(s);
                    }
                    self.start_session(out, s);
                }
                (None, Some(_)) => unreachable!(),
            }
        };
        self.counts.bytes += (out.len() - before) as u64;
        p
    }

    fn push(&mut self, t: u64, slot: u32, kind: u8) {
        self.seq += 1;
        self.heap.push(Reverse((t, self.seq, slot, kind)));
        self.slab[slot as usize].pending += 1;
    }

    /// A timed-out attempt `j` (1-based) of the forward that started at `t_fq`.
    fn push_delayed(&mut self, t_fq: u64, j: usize, slot: u32) {
        self.delayed[j - 1].push_back((t_fq + ATTEMPT_TIMEOUT_NS * j as u64, slot));
        self.slab[slot as usize].pending += 1;
    }

    fn start_session(&mut self, out: &mut Vec<u8>, t: u64) {
        let m = Arc::clone(&self.model);
        let c = &m.cfg;
        let rng = &mut self.rng;
        let outcome = Outcome::ALL[m.mix.sample(rng)];
        let class = u8::from(outcome != Outcome::Local);
        let name = m.zipf.sample(rng) as u32;
        // Per-name id sequence through a bijection of u16: a name's ids repeat only after
        // 65536 of its sessions, so concurrent sessions of one name never share an id.
        let ctr = &mut self.id_counters[class as usize][name as usize];
        let base = (self.id_salt ^ (name as u64).wrapping_mul(0x9e37_79b9) ^ class as u64) as u16;
        let id = base.wrapping_add(ctr.wrapping_mul(40503));
        *ctr = ctr.wrapping_add(1);
        let ci = rng.below(c.clients as u64) as u32;
        let client_ip = [10, 244, (ci / 250) as u8, (ci % 250 + 2) as u8];
        let port = rng.range(1024, 65535) as u16;
        let qtype = if rng.chance(c.aaaa_share) {
            dnswire::TYPE_AAAA
        } else {
            dnswire::TYPE_A
        };
        let rcode = c.rcodes[m.rcodes.sample(rng)].0;
        let mut s = Sess {
            t_cq: t,
            t_fq: 0,
            t_fr: 0,
            t_cr: 0,
            cookie: rng.next_u64(),
            name,
            addr_seed: rng.next_u64() as u32,
            client_ip,
            port,
            id,
            qtype,
            outcome,
            class,
            retry: false,
            rcode,
            attempts: 0,
            upstream: rng.below(c.upstreams as u64) as u8,
            answers: 1 + rng.below(2) as u8,
            delivered: 0,
            lost: false,
            pending: 0,
            fq_sent: 0,
        };
        let mut events: [(u64, u8); 2] = [(0, 0); 2];
        let mut n = 0;
        match outcome {
            Outcome::Local => {
                s.t_cr = t + rng.range(30_000, 400_000);
                events[0] = (s.t_cr, EV_CR);
                n = 1;
            }
            Outcome::Forward => {
                s.t_fq = t + rng.range(50_000, 100_000);
                // Upstream round trip: 0.2 ms to ~30 ms, log-uniform.
                let rtt = (200_000.0 * 150f64.powf(rng.f64())) as u64;
                s.retry = rng.chance(c.retry_share);
                let mut at = s.t_fq;
                if s.retry {
                    s.attempts = 1;
                    at += ATTEMPT_TIMEOUT_NS;
                }
                s.t_fr = at + rtt;
                s.t_cr = s.t_fr + rng.range(15_000, 80_000);
                events[n] = (s.t_fr, EV_FQ_FR);
                events[n + 1] = (s.t_cr, EV_CR);
                n += 2;
            }
            Outcome::Timeout => {
                s.t_fq = t + rng.range(50_000, 100_000);
                s.attempts = rng.range(1, c.max_attempts.max(1) as u64) as u8;
            }
            Outcome::NoResponse => {}
        }
        self.counts.sessions += 1;
        self.counts.outcomes[match outcome {
            Outcome::Local => 0,
            Outcome::Forward => 1,
            Outcome::Timeout => 3,
            Outcome::NoResponse => 4,
        }] += 1;
        if s.retry {
            self.counts.outcomes[2] += 1;
        }
        let slot = match self.free.pop() {
            Some(i) => {
                self.slab[i as usize] = s;
                i
            }
            None => {
                self.slab.push(s);
                (self.slab.len() - 1) as u32
            }
        };
        self.started += 1;
        self.in_flight += 1;
        self.counts.max_in_flight = self.counts.max_in_flight.max(self.in_flight);
        let (t_fq, failed) = (
            self.slab[slot as usize].t_fq,
            self.slab[slot as usize].attempts,
        );
        for j in 1..=failed as usize {
            self.push_delayed(t_fq, j, slot);
        }
        for &(at, kind) in &events[..n] {
            self.push(at, slot, kind);
        }
        self.emit_client_query(out, slot);
        if self.slab[slot as usize].pending == 0 {
            self.finish(slot);
        }
    }

    fn on_event(&mut self, out: &mut Vec<u8>, _t: u64, slot: u32, kind: u8) {
        match kind {
            EV_CR => self.emit_client_response(out, slot),
            EV_FQ_FAILED | EV_FQ_FR => {
                // Each attempt goes to the next upstream, as forward's policy moves on.
                let s = &mut self.slab[slot as usize];
                let up = (s.upstream as u32 + s.fq_sent as u32) % self.model.cfg.upstreams;
                s.fq_sent += 1;
                self.emit_forwarder(out, slot, up as u8, false);
                if kind == EV_FQ_FR {
                    self.emit_forwarder(out, slot, up as u8, true);
                }
            }
            _ => unreachable!(),
        }
        let s = &mut self.slab[slot as usize];
        s.pending -= 1;
        if s.pending == 0 {
            self.finish(slot);
        }
    }

    /// Whether the sender drops this message (CoreDNS's queue is full): bursts of consecutive
    /// messages. No burst starts among the last sessions of a bounded run, so every loss is
    /// followed by traffic that makes it evident, as it would be under real load.
    fn drops(&mut self) -> bool {
        if self.burst_left > 0 {
            self.burst_left -= 1;
            return true;
        }
        if self.loss_q > 0.0 {
            let guard = (self.quota / 10).min(200);
            let active = self.quota == u64::MAX || self.started + guard < self.quota;
            if active && self.loss_rng.chance(self.loss_q) {
                let (lo, hi) = self.model.cfg.loss_burst;
                self.burst_left = self
                    .loss_rng
                    .range(lo.max(1) as u64, hi.max(lo).max(1) as u64)
                    as u32
                    - 1;
                self.counts.bursts += 1;
                return true;
            }
        }
        false
    }

    /// Counts the message and says whether to write it.
    fn account(&mut self, slot: u32, ty: usize) -> bool {
        self.counts.generated[ty] += 1;
        if self.drops() {
            self.counts.dropped[ty] += 1;
            self.slab[slot as usize].lost = true;
            false
        } else {
            self.slab[slot as usize].delivered |= 1 << ty;
            true
        }
    }

    fn emit_client_query(&mut self, out: &mut Vec<u8>, slot: u32) {
        if !self.account(slot, 0) {
            return;
        }
        let s = &self.slab[slot as usize];
        let (qname, _) = self.model.names[s.class as usize].get(s.name as usize);
        self.q_wire.clear();
        dnswire::query(&mut self.q_wire, s.id, qname, s.qtype, s.cookie);
        let f = Fields {
            ty: MsgType::CLIENT_QUERY,
            query_time: s.t_cq,
            response_time: None,
            upstream: None,
            query: Some(&self.q_wire),
            response: None,
        };
        encode(out, &self.identity, self.mapped, s, &f);
    }

    /// The session's answer into `r_wire`: as the client gets it (CR: compressed, with the
    /// cookie, TTL 5 from the kubernetes plugin or the cache's countdown from 300) or as the
    /// upstream sent it (FR: re-encoded without compression, TTL 300).
    fn fill_response(&mut self, slot: u32, to_client: bool) {
        let s = &self.slab[slot as usize];
        let (qname, zone_at) = self.model.names[s.class as usize].get(s.name as usize);
        let local = s.outcome == Outcome::Local;
        self.r_wire.clear();
        dnswire::response(
            &mut self.r_wire,
            qname,
            zone_at,
            s.qtype,
            &ResponseShape {
                id: s.id,
                rcode: s.rcode,
                authoritative: to_client && local,
                compress: to_client,
                ttl: match (to_client, local) {
                    (true, true) => 5,
                    (true, false) => 300 - (s.addr_seed % 270),
                    (false, _) => 300,
                },
                cookie: to_client.then_some(s.cookie),
                answers: s.answers,
                addr_seed: s.addr_seed,
            },
        );
    }

    fn emit_client_response(&mut self, out: &mut Vec<u8>, slot: u32) {
        if !self.account(slot, 1) {
            return;
        }
        self.fill_response(slot, true);
        let s = &self.slab[slot as usize];
        let f = Fields {
            ty: MsgType::CLIENT_RESPONSE,
            query_time: s.t_cq,
            response_time: Some(s.t_cr),
            upstream: None,
            query: None,
            response: Some(&self.r_wire),
        };
        encode(out, &self.identity, self.mapped, s, &f);
    }

    fn emit_forwarder(&mut self, out: &mut Vec<u8>, slot: u32, upstream: u8, response: bool) {
        if !self.account(slot, if response { 3 } else { 2 }) {
            return;
        }
        if response {
            self.fill_response(slot, false);
        }
        let s = &self.slab[slot as usize];
        let (qname, _) = self.model.names[s.class as usize].get(s.name as usize);
        let wire = if response {
            &self.r_wire
        } else {
            // Byte-identical to the client's query.
            self.q_wire.clear();
            dnswire::query(&mut self.q_wire, s.id, qname, s.qtype, s.cookie);
            &self.q_wire
        };
        let f = Fields {
            ty: if response {
                MsgType::FORWARDER_RESPONSE
            } else {
                MsgType::FORWARDER_QUERY
            },
            query_time: s.t_fq,
            response_time: response.then_some(s.t_fr),
            upstream: Some(upstream),
            query: (!response).then_some(wire.as_slice()),
            response: response.then_some(wire.as_slice()),
        };
        encode(out, &self.identity, self.mapped, s, &f);
    }

    fn finish(&mut self, slot: u32) {
        self.in_flight -= 1;
        self.free.push(slot);
        let s = &self.slab[slot as usize];
        let answered = matches!(s.outcome, Outcome::Local | Outcome::Forward);
        if answered {
            self.counts.rcodes[s.rcode as usize & 15] += 1;
        }
        let status = expected_status(s.delivered, s.lost, answered, s.rcode);
        match (status, s.lost) {
            (None, _) => self.counts.lost_all += 1,
            (Some(st), true) => {
                self.counts.lost_some += 1;
                if st != SAMPLE_LOSS {
                    self.counts.lost_answered[st] += 1;
                }
            }
            (Some(_), false) => self.counts.intact += 1,
        }
        if let Some(st) = status {
            self.counts.status_bitmap[st][s.delivered as usize] += 1;
        }
        if self.model.cfg.record_sessions {
            let s = s.clone();
            self.record(&s, status);
        }
    }

    fn record(&mut self, s: &Sess, status: Option<usize>) {
        let qname = self.model.qname_text(s.class, s.name);
        let ip = s.client_ip;
        let _ = writeln!(
            Records(&mut self.records),
            "{}\t{}\t{}\t{}.{}.{}.{}:{}\t{}\t{}\t{}\t{}\t{}\t{}",
            Model::identity(self.pod),
            qname,
            s.id,
            ip[0],
            ip[1],
            ip[2],
            ip[3],
            s.port,
            s.outcome.name(),
            status.map_or("-", |st| STATUS_NAMES[st]),
            s.delivered,
            u8::from(s.lost),
            if matches!(s.outcome, Outcome::Local | Outcome::Forward) {
                dnswire::rcode_name(s.rcode)
            } else {
                "-".to_string()
            },
            s.t_cq,
        );
    }
}

/// The Status the analyser must give a session (issue #10): one whose CLIENT_RESPONSE was
/// delivered carries that response's verdict, whatever else was lost; one without a delivered
/// response is SampleLoss when it lost messages (the response may be among them) and Failed
/// otherwise (CoreDNS never answered). None: nothing of it was delivered.
pub fn expected_status(delivered: u8, lost: bool, answered: bool, rcode: u8) -> Option<usize> {
    const CR: u8 = 1 << 1;
    if delivered == 0 {
        None
    } else if delivered & CR != 0 {
        debug_assert!(answered, "a CR is only generated for answered sessions");
        Some(if dnswire::rcode_succeeds(rcode) {
            SUCCEEDED
        } else {
            FAILED
        })
    } else if lost {
        Some(SAMPLE_LOSS)
    } else {
        Some(FAILED)
    }
}

struct Records<'a>(&'a mut Vec<u8>);
impl std::fmt::Write for Records<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Header line of the per-session ground truth file.
pub const RECORD_HEADER: &str =
    "#identity\tqname\tid\tclient\toutcome\tstatus\tbitmap\tlost\trcode\tcq_time_ns\n";

struct Fields<'a> {
    ty: MsgType,
    query_time: u64,
    response_time: Option<u64>,
    upstream: Option<u8>,
    query: Option<&'a [u8]>,
    response: Option<&'a [u8]>,
}

fn mapped(ip: [u8; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12..].copy_from_slice(&ip);
    a
}

/// Encodes one dnstap message as a Frame Streams data frame onto `out`.
fn encode(out: &mut Vec<u8>, identity: &[u8], mapped_client: bool, s: &Sess, f: &Fields) {
    let client16;
    let client: &[u8] = if mapped_client {
        client16 = mapped(s.client_ip);
        &client16
    } else {
        &s.client_ip
    };
    // Upstream addresses are always 16 bytes in CoreDNS's FQ/FR.
    let up16 = f.upstream.map(|u| mapped([192, 0, 2, 53 + u]));
    let msg = pb::Message {
        type_pb: f.ty,
        socket_family: Some(SocketFamily::INET),
        socket_protocol: Some(SocketProtocol::UDP),
        query_address: Some(Cow::Borrowed(client)),
        response_address: up16.as_ref().map(|a| Cow::Borrowed(&a[..])),
        query_port: Some(s.port as u32),
        response_port: f.upstream.map(|_| 53),
        query_time_sec: Some(f.query_time / NS),
        query_time_nsec: Some((f.query_time % NS) as u32),
        query_message: f.query.map(Cow::Borrowed),
        query_zone: None,
        response_time_sec: f.response_time.map(|t| t / NS),
        response_time_nsec: f.response_time.map(|t| (t % NS) as u32),
        response_message: f.response.map(Cow::Borrowed),
        policy: None,
        http_protocol: None,
    };
    let tap = pb::Dnstap {
        identity: Some(Cow::Borrowed(identity)),
        version: Some(Cow::Borrowed(VERSION.as_bytes())),
        extra: None,
        type_pb: TapType::MESSAGE,
        message: Some(msg),
    };
    let size = tap.get_size();
    out.reserve(4 + size);
    out.extend_from_slice(&(size as u32).to_be_bytes());
    let at = out.len();
    tap.write_message(&mut Writer::new(&mut *out))
        .expect("writing to a Vec cannot fail");
    debug_assert_eq!(out.len() - at, size);
}
