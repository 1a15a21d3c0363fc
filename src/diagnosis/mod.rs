//! What is known about a finished session, worked out once, in the shard that finished it:
//! when it started, who asked what, what the client got and how fast, every upstream attempt
//! with its RTT and outcome, the cause, and the sentence an operator reads. The renderer,
//! the live metrics and `/top` read this one value; none of them looks at the stored
//! messages again to find these facts (the renderer decodes them only to print them).
//!
//! The stored messages are not scanned again: each carries the offsets of its fields as the
//! reader's scan found them (`dnstap::MessageFacts`), so the fields are read where they are (no
//! decode, no allocation once the buffers have grown): this runs for every session, printed or
//! not. The client side (client socket, protocol, question) and the client's answer (answer
//! count, first CNAME target) cost a name walk each, so they are read when a consumer needs
//! them ([`Diagnosis::read_client_side`], [`Diagnosis::read_answer`]: the shard does for every
//! session, which the lookup stage joins), still once.

pub(crate) mod cause;
pub mod recall;

pub use cause::{AttemptOutcome, AttemptSummary, Cause, Recalled};

use crate::correlate::{BitMap, Message, MessageStore, Session, Status, Verdict};
use crate::dns::rcode_name;
use crate::dnstap::{Nanos, Recollection, Role, SocketProtocol, SourceId};
use std::borrow::Cow;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};

/// One upstream attempt: an FQ/RQ and the FR/RR that answered it, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// The forwarder target; `None` when the sender did not say.
    pub upstream: Option<SocketAddr>,
    pub query_time: Option<Nanos>,
    pub answered: bool,
    /// The response's header rcode.
    pub rcode: Option<u8>,
    /// FQ → FR, when both times are known.
    pub rtt: Option<Nanos>,
    /// False for a response whose query was never seen.
    pub has_query: bool,
}

impl Attempt {
    /// An attempt that ended as `outcome` (an error rcode is SERVFAIL), known only by that.
    pub fn ended(
        upstream: Option<SocketAddr>,
        outcome: AttemptOutcome,
        rtt: Option<Nanos>,
    ) -> Self {
        Self {
            upstream,
            query_time: None,
            answered: outcome != AttemptOutcome::Timeout,
            rcode: (outcome == AttemptOutcome::ErrorRcode).then_some(2),
            rtt,
            has_query: true,
        }
    }

    pub fn outcome(&self) -> AttemptOutcome {
        AttemptOutcome::of(self.answered, self.rcode.map(u16::from))
    }
}

/// Everything known about one finished session. A shard keeps one and refills it per
/// session ([`Diagnosis::refill`]), so its buffers are reused.
#[derive(Debug, Clone)]
pub struct Diagnosis {
    pub source: SourceId,
    pub verdict: Verdict,
    /// The session's earliest message time: the CQ's when there is one.
    pub time: Option<Nanos>,
    /// The CQ's query_time, and the (last) CR's response_time.
    pub query_time: Option<Nanos>,
    pub response_time: Option<Nanos>,
    /// The client's DNS id.
    pub dns_id: Option<u16>,
    /// The client's socket, from the first client message (CQ, or an orphan's CR).
    pub client: Option<SocketAddr>,
    pub protocol: Option<SocketProtocol>,
    /// The first question in presentation format (`\.`, `\\`, `\"`, `\DDD` escapes).
    qname: Vec<u8>,
    has_qname: bool,
    pub qtype: Option<u16>,
    pub qclass: Option<u16>,
    /// The client response's header rcode; `None` without a CR (or without wire data).
    pub rcode: Option<u8>,
    /// CQ query_time → CR response_time.
    pub latency: Option<Nanos>,
    pub attempts: Vec<Attempt>,
    /// What the stream showed before the session (a recent upstream answer to the same
    /// question, or the sender's failing upstream); the cause says whether it explains it.
    pub recalled: Recollection,
    pub cause: Cause,
    /// The sender logged DNS messages (`full`).
    pub has_wire: bool,
    /// `client`, `protocol` and the question have been read for this session.
    client_side_read: bool,
    /// The client message's `extra` (at most `dnstap::wire::MAX_EXTRA` bytes) and where its
    /// `namespace=` and `pod=` values lie in it.
    extra: Vec<u8>,
    has_extra: bool,
    namespace: Option<std::ops::Range<usize>>,
    pod: Option<std::ops::Range<usize>>,
    /// The client response's answer count and its first answer's CNAME target (presentation
    /// format), read by [`Diagnosis::read_answer`].
    answer_read: bool,
    answer_count: Option<u16>,
    cname_target: Vec<u8>,
    has_cname_target: bool,
}

impl Default for Diagnosis {
    fn default() -> Self {
        Self {
            source: SourceId(0),
            verdict: Verdict {
                status: Status::Failed,
                bitmap: BitMap::NONE,
                loss: None,
                incomplete: None,
            },
            time: None,
            query_time: None,
            response_time: None,
            dns_id: None,
            client: None,
            protocol: None,
            qname: Vec::new(),
            has_qname: false,
            qtype: None,
            qclass: None,
            rcode: None,
            latency: None,
            attempts: Vec::new(),
            recalled: Recollection::Nothing,
            cause: Cause::NoResponse,
            has_wire: true,
            client_side_read: false,
            extra: Vec::new(),
            has_extra: false,
            namespace: None,
            pod: None,
            answer_read: false,
            answer_count: None,
            cname_target: Vec::new(),
            has_cname_target: false,
        }
    }
}

impl Diagnosis {
    /// Works out the session `s` finished with `verdict`, from its stored messages, client
    /// side included.
    pub fn of(s: &Session, verdict: Verdict, store: &MessageStore) -> Self {
        let mut d = Self::default();
        d.refill(s, verdict, store);
        d.read_client_side(s, store);
        d.read_answer(s, store);
        d
    }

    /// What a session of `source` finished with `verdict` comes to, given its client latency
    /// and its attempts, when there are no stored messages (embedders, tests of consumers).
    pub fn from_parts(
        source: SourceId,
        verdict: Verdict,
        latency: Option<Nanos>,
        attempts: &[Attempt],
    ) -> Self {
        let mut d = Self {
            source,
            verdict,
            latency,
            attempts: attempts.to_vec(),
            ..Self::default()
        };
        d.cause = Cause::of(&verdict, d.summary(), None, Recalled::Nothing);
        d
    }

    fn summary(&self) -> AttemptSummary {
        let mut summary = AttemptSummary::default();
        for a in &self.attempts {
            summary.add(a.outcome());
        }
        summary
    }

    /// Replaces `self` with what is known of `s`, reusing the buffers.
    pub fn refill(&mut self, s: &Session, verdict: Verdict, store: &MessageStore) {
        self.source = s.source;
        self.verdict = verdict;
        self.has_wire = s.has_wire;
        self.time = s
            .cq_time()
            .or_else(|| s.messages.iter().filter_map(|m| m.time()).min());
        self.rcode = s.rcode();
        self.query_time =
            trusted_time(s.messages.iter().find(|m| m.role == Role::ClientQuery)).and(s.cq_time());
        self.response_time = trusted_time(client_response(s));
        self.dns_id = s.dns_id;
        self.latency = self
            .query_time
            .zip(self.response_time)
            .and_then(|(q, r)| r.checked_sub(q));
        self.client_side_read = false;
        (self.answer_read, self.answer_count, self.has_cname_target) = (false, None, false);
        (self.client, self.protocol) = (None, None);
        (self.qtype, self.qclass, self.has_qname) = (s.qtype, None, false);
        (self.has_extra, self.namespace, self.pod) = (false, None, None);
        // The workload is a label of the session counters: read it now when there is one.
        if s.messages.iter().any(|m| m.flags & Message::EXTRA != 0) {
            self.read_client_side(s, store);
        }
        pair_attempts(s, store, &mut self.attempts);
        self.recalled = s.recalled;
        self.cause = Cause::of(&verdict, self.summary(), self.rcode, recalled(s.recalled));
    }

    /// Reads the client, protocol and question of the session `self` was refilled from, once:
    /// from the first client message that has them (for an orphan, its CR), else from any
    /// message with a question.
    pub fn read_client_side(&mut self, s: &Session, store: &MessageStore) {
        if std::mem::replace(&mut self.client_side_read, true) {
            return;
        }
        let client_first = s.messages.iter().filter(|m| m.role.is_client());
        let others = s.messages.iter().filter(|m| !m.role.is_client());
        for m in client_first.chain(others) {
            let (facts, bytes) = store.get_with_facts(m.bytes);
            if !self.has_extra && m.flags & Message::EXTRA != 0 {
                if let Some(extra) = facts.extra(bytes) {
                    self.read_extra(extra);
                }
            }
            let Some(f) = facts.read(bytes, m.role) else {
                continue;
            };
            if self.client.is_none() && m.role.is_client() {
                self.client = f.peer();
                self.protocol = f.protocol();
            }
            if !self.has_qname {
                if let Some((t, c)) = f
                    .dns()
                    .and_then(|w| crate::dns::question_into(w, &mut self.qname))
                {
                    (self.qtype, self.qclass, self.has_qname) = (Some(t), Some(c), true);
                }
            }
            if self.has_qname && (self.client.is_some() || !m.role.is_client()) {
                return;
            }
        }
    }

    /// Reads the client response's answer count and, when it answered NOERROR with records,
    /// the first answer's CNAME target (what CoreDNS's `autopath` answers with), once.
    pub fn read_answer(&mut self, s: &Session, store: &MessageStore) {
        if std::mem::replace(&mut self.answer_read, true) {
            return;
        }
        let Some(cr) = client_response(s) else {
            return;
        };
        let (facts, bytes) = store.get_with_facts(cr.bytes);
        let Some(wire) = facts.read(bytes, cr.role).and_then(|f| f.dns()) else {
            return;
        };
        self.answer_count = wire.get(6..8).map(|c| u16::from_be_bytes([c[0], c[1]]));
        if self.rcode == Some(0) && self.answer_count.is_some_and(|n| n > 0) {
            self.cname_target.clear();
            self.has_cname_target =
                crate::dns::answer_cname_into(wire, &mut self.cname_target).is_some();
        }
    }

    /// The client response's answer count; `None` without a CR with wire data.
    pub fn answer_count(&self) -> Option<u16> {
        self.answer_count
    }

    /// The client response's first answer's target when it is a CNAME.
    pub fn cname_target(&self) -> Option<&str> {
        self.has_cname_target
            .then(|| std::str::from_utf8(&self.cname_target).ok())
            .flatten()
    }

    /// Keeps the sender's `extra` and finds the workload in it: `key=value` pairs separated by
    /// `;`, `,` or spaces, of which `namespace` and `pod` are read.
    fn read_extra(&mut self, extra: &[u8]) {
        self.extra.clear();
        self.extra.extend_from_slice(extra);
        self.has_extra = true;
        let mut start = 0;
        for part in extra.split(|b| matches!(b, b';' | b',' | b' ')) {
            let end = start + part.len();
            if let Some(eq) = part.iter().position(|&b| b == b'=') {
                let value = start + eq + 1..end;
                let valid = !value.is_empty() && std::str::from_utf8(&extra[value.clone()]).is_ok();
                match &part[..eq] {
                    b"namespace" if valid => self.namespace = Some(value),
                    b"pod" if valid => self.pod = Some(value),
                    _ => {}
                }
            }
            start = end + 1;
        }
    }

    /// As if the client message had carried `extra` (tests of consumers).
    #[cfg(test)]
    pub(crate) fn set_extra_for_tests(&mut self, extra: &[u8]) {
        self.read_extra(extra);
    }

    /// The sender's `extra` for this session's client message, raw (bounded).
    pub fn extra(&self) -> Option<&[u8]> {
        self.has_extra.then_some(&self.extra[..])
    }

    /// The client's namespace, from `namespace=` in `extra`.
    pub fn client_namespace(&self) -> Option<&str> {
        let r = self.namespace.clone()?;
        std::str::from_utf8(&self.extra[r]).ok()
    }

    /// The client's pod, from `pod=` in `extra`.
    pub fn client_pod(&self) -> Option<&str> {
        let r = self.pod.clone()?;
        std::str::from_utf8(&self.extra[r]).ok()
    }

    /// The first question's name in presentation format.
    pub fn qname(&self) -> Option<&str> {
        self.has_qname
            .then(|| std::str::from_utf8(&self.qname).ok())
            .flatten()
    }

    /// The distinct upstreams the session tried, in order (at most `N`; more are rare).
    pub fn upstreams(&self) -> impl Iterator<Item = Option<SocketAddr>> + '_ {
        self.attempts
            .iter()
            .enumerate()
            .filter(|(i, a)| !self.attempts[..*i].iter().any(|b| b.upstream == a.upstream))
            .map(|(_, a)| a.upstream)
    }

    /// Writes one sentence an operator can act on; `who` names the sender (its identity).
    /// `who` is the one part a sender controls: it goes through `escape` (the line's
    /// escaping); every other piece is plain ASCII, written as it is, without a `format!`.
    pub fn write_sentence(&self, who: &str, out: &mut Vec<u8>, escape: fn(&mut Vec<u8>, &str)) {
        let v = &self.verdict;
        let who = if who.is_empty() { "the server" } else { who };
        let w = &mut Words { out, who, escape };
        let rcode = self
            .rcode
            .map_or(Cow::Borrowed("an answer"), |r| rcode_name(r.into()));
        let (rcode, latency) = (&*rcode, self.latency);
        let tries = self.attempts.len();
        if self.write_recalled(w, rcode) {
        } else if let Some(loss) = v.loss {
            w.s("Incomplete sample: ").s(loss.explain());
            w.s("; seen: ").seen(v.bitmap).s(".");
        } else {
            match (v.status, v.bitmap) {
                (Status::Succeeded, BitMap::CQ_CR) => {
                    w.who()
                        .s(" answered ")
                        .s(rcode)
                        .s(" itself")
                        .latency(latency);
                    w.s(" (cache, hosts or a local zone), without forwarding.");
                }
                (Status::Succeeded, _) if tries == 0 => {
                    w.s("The client got ").s(rcode).latency(latency);
                    w.s("; seen: ").seen(v.bitmap).s(".");
                }
                (Status::Succeeded, _) => {
                    w.s("Forwarded to ").upstreams(self).s(" (").attempts(tries);
                    w.s("); the client got ").s(rcode).latency(latency).s(".");
                }
                (Status::Failed, BitMap::CQ_CR) => {
                    w.who()
                        .s(" answered ")
                        .s(rcode)
                        .s(" itself")
                        .latency(latency);
                    w.s(" without forwarding: check its zones, plugins and policy for this name.");
                }
                (Status::Failed, BitMap::FORWARDED) | (Status::Failed, BitMap::CQ_CR_FR) => {
                    let up = self
                        .attempts
                        .iter()
                        .rev()
                        .find(|a| a.answered)
                        .and_then(|a| a.rcode)
                        .map_or(Cow::Borrowed("an answer"), |r| rcode_name(r.into()));
                    w.s("Upstream ").upstreams(self).s(" answered ").s(&up);
                    w.s("; the client got ").s(rcode).latency(latency);
                    w.s(": the upstream is failing for this name.");
                }
                (Status::Failed, BitMap::UPSTREAM_UNREACHABLE) => {
                    w.s("Forwarded to ").upstreams(self).s(", no answer after ");
                    w.attempts(tries)
                        .s(": the upstream is unreachable or timing out; ");
                    w.s("the client got SERVFAIL from ").who();
                    w.s(" without a tap, or nothing.");
                }
                (Status::Failed, BitMap::CQ_CR_FQ) => {
                    w.s("Forwarded to ").upstreams(self).s(", no answer after ");
                    w.attempts(tries)
                        .s("; the client got ")
                        .s(rcode)
                        .latency(latency);
                    w.s(": the upstream is unreachable or timing out.");
                }
                (Status::Failed, BitMap::CQ_FQ_FR) | (Status::Failed, BitMap::CQ_FR) => {
                    w.s("Upstream ").upstreams(self);
                    w.s(" answered, but the client got no response from ")
                        .who()
                        .s(".");
                }
                (Status::Failed, BitMap::CQ) => {
                    w.s("No response and no upstream query: ").who().s(
                        " dropped the request or answered through a path dnstap does not see (e.g. max_concurrent, an error) before it timed out.",
                    );
                }
                (Status::Failed, _) => {
                    w.s("The client got ").s(rcode).latency(latency);
                    w.s("; seen: ").seen(v.bitmap).s(".");
                }
                (Status::SampleLoss, _) => {
                    w.s("Incomplete sample; seen: ").seen(v.bitmap).s(".");
                }
            }
        }
        if let Some(inc) = v.incomplete {
            w.s(" Incomplete sample: ").s(&inc.explain()).s(".");
        }
        if !self.has_wire {
            w.s(" The sender logs no DNS messages: add `full` to the dnstap line.");
        }
    }

    /// The sentence of the two causes the stream explains rather than the session, if the
    /// cause is one of them.
    fn write_recalled(&self, w: &mut Words<'_>, rcode: &str) -> bool {
        match (self.cause, self.recalled) {
            (Cause::CachedUpstreamError, Recollection::UpstreamAnswered { upstream, age, .. }) => {
                w.who().s(" answered ").s(rcode).latency(self.latency);
                w.s(" from its cache: upstream ")
                    .upstream(upstream)
                    .s(" answered ");
                w.s(rcode).s(" for this question ").seconds(age).s(
                    " earlier (CoreDNS caches SERVFAIL 5 s by default): the upstream is failing for this name.",
                );
            }
            (
                Cause::RejectedUpstreamFailing,
                Recollection::UpstreamFailing {
                    upstream,
                    timed_out,
                    age,
                },
            ) => {
                w.s("No response and no upstream query while ")
                    .who()
                    .s("'s upstream ");
                w.upstream(upstream).s(" was failing (").s(if timed_out {
                    "an attempt timed out"
                } else {
                    "it answered an error"
                });
                w.s(" ").seconds(age).s(
                    " before): the client most likely got REFUSED from forward's max_concurrent as queries piled up behind the failing upstream (or SERVFAIL from a plugin error), outside the tap.",
                );
            }
            _ => return false,
        }
        true
    }
}

/// A sentence being written into a line: plain ASCII pieces as they are, the sender's name
/// through the line's escaping.
struct Words<'a> {
    out: &'a mut Vec<u8>,
    who: &'a str,
    escape: fn(&mut Vec<u8>, &str),
}

impl Words<'_> {
    fn s(&mut self, text: &str) -> &mut Self {
        self.out.extend_from_slice(text.as_bytes());
        self
    }

    fn who(&mut self) -> &mut Self {
        (self.escape)(self.out, self.who);
        self
    }

    /// "1 attempt", "3 attempts".
    fn attempts(&mut self, n: usize) -> &mut Self {
        self.s(itoa::Buffer::new().format(n))
            .s(if n == 1 { " attempt" } else { " attempts" })
    }

    /// " in 12.3 ms", or nothing without a latency.
    fn latency(&mut self, latency: Option<Nanos>) -> &mut Self {
        match latency {
            Some(l) => self.s(" in ").tenths(l, 1_000_000).s(" ms"),
            None => self,
        }
    }

    /// "127.0.0.1:53" or "an unknown upstream".
    fn upstream(&mut self, u: Option<SocketAddr>) -> &mut Self {
        match u {
            Some(SocketAddr::V4(addr)) => {
                ipv4_into(self.out, *addr.ip());
                self.s(":").s(itoa::Buffer::new().format(addr.port()))
            }
            Some(addr) => {
                let _ = write!(self.out, "{addr}");
                self
            }
            None => self.s("an unknown upstream"),
        }
    }

    /// The distinct upstreams the session tried, or "an upstream".
    fn upstreams(&mut self, d: &Diagnosis) -> &mut Self {
        self.list(d.upstreams(), ", ", "an upstream", |w, u| {
            w.upstream(u);
        })
    }

    /// Each item as `write` spells it, separated by `sep`; `none` when there is none.
    fn list<T>(
        &mut self,
        items: impl Iterator<Item = T>,
        sep: &str,
        none: &str,
        mut write: impl FnMut(&mut Self, T),
    ) -> &mut Self {
        let mut empty = true;
        for item in items {
            if !std::mem::replace(&mut empty, false) {
                self.s(sep);
            }
            write(self, item);
        }
        if empty {
            self.s(none);
        }
        self
    }

    fn seconds(&mut self, age: Nanos) -> &mut Self {
        if age < 1_000_000_000 {
            self.tenths(age, 1_000_000).s(" ms")
        } else {
            self.tenths(age, 1_000_000_000).s(" s")
        }
    }

    /// The roles the bitmap says were seen ("CQ FQ FR CR"), or "nothing".
    fn seen(&mut self, bitmap: BitMap) -> &mut Self {
        let roles = [(1, "CQ"), (4, "FQ"), (8, "FR"), (2, "CR")];
        let seen = roles.into_iter().filter(|(bit, _)| bitmap.0 & bit != 0);
        self.list(seen, " ", "nothing", |w, (_, name)| {
            w.s(name);
        })
    }

    /// `n / unit` with one decimal: the text of `format!("{:.1}", n as f64 / unit as f64)`,
    /// in integer arithmetic. Where the two could differ it formats the float: halfway
    /// between two tenths (the float division rounds either way), and past 10^15 (the float
    /// no longer tells nanoseconds apart from the next tenth's boundary).
    fn tenths(&mut self, n: u64, unit: u64) -> &mut Self {
        let tenth = unit / 10;
        if n >= 1_000_000_000_000_000 || n % tenth == tenth / 2 {
            let _ = write!(self.out, "{:.1}", n as f64 / unit as f64);
            return self;
        }
        let tenths = (n + tenth / 2) / tenth;
        self.s(itoa::Buffer::new().format(tenths / 10));
        self.out
            .extend_from_slice(&[b'.', b'0' + (tenths % 10) as u8]);
        self
    }
}

/// Appends an IPv4 address as `Display` spells it, octet by octet into a stack buffer and
/// then one copy: the formatting machinery costs several times more, and the sentence and the
/// line write addresses for every printed session.
pub fn ipv4_into(out: &mut Vec<u8>, ip: Ipv4Addr) {
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        let (hundreds, tens, ones) = (octet / 100, octet / 10 % 10, octet % 10);
        if hundreds > 0 {
            text[len] = b'0' + hundreds;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + tens;
            len += 1;
        }
        text[len] = b'0' + ones;
        len += 1;
    }
    out.extend_from_slice(&text[..len]);
}

/// What of a recollection the cause weighs.
fn recalled(r: Recollection) -> Recalled {
    match r {
        Recollection::Nothing => Recalled::Nothing,
        Recollection::UpstreamAnswered { rcode, .. } => Recalled::UpstreamRcode(rcode),
        Recollection::UpstreamFailing { .. } => Recalled::UpstreamFailing,
    }
}

/// The session's last client response.
fn client_response(s: &Session) -> Option<&Message> {
    s.messages
        .iter()
        .rev()
        .find(|m| m.role == Role::ClientResponse)
}

/// The time of `m`, unless ingest rejected it as out of range (the
/// message then carries its stream's clock, which must enter no latency or RTT).
fn trusted_time(m: Option<&Message>) -> Option<Nanos> {
    m.filter(|m| m.flags & Message::TIME_REJECTED == 0)
        .and_then(Message::time)
}

/// Pairs the session's upstream queries with their responses, into `out`: same upstream,
/// and the same query_time where the sender copies it (CoreDNS), else the oldest open
/// attempt of that upstream. A response without an open attempt is an attempt of its own.
fn pair_attempts(s: &Session, store: &MessageStore, out: &mut Vec<Attempt>) {
    out.clear();
    for m in &s.messages {
        if !matches!(m.role, Role::UpstreamQuery | Role::UpstreamResponse) {
            continue;
        }
        let (facts, bytes) = store.get_with_facts(m.bytes);
        let f = facts.read(bytes, m.role);
        let upstream = f.and_then(|f| f.peer());
        let query_time = f.and_then(|f| f.query_time());
        if m.role == Role::UpstreamQuery {
            out.push(Attempt {
                upstream,
                query_time,
                answered: false,
                rcode: None,
                rtt: None,
                has_query: true,
            });
            continue;
        }
        // A time ingest rejected as out of range enters no RTT.
        let response_time = f
            .and_then(|f| f.response_time())
            .filter(|_| m.flags & Message::TIME_REJECTED == 0);
        let mut answer = Attempt {
            upstream,
            query_time,
            answered: true,
            rcode: m.rcode,
            rtt: query_time
                .zip(response_time)
                .and_then(|(q, r)| r.checked_sub(q)),
            has_query: false,
        };
        let open = |a: &Attempt| !a.answered && a.upstream == upstream;
        let i = out
            .iter()
            .position(|a| open(a) && a.query_time == query_time)
            .or_else(|| out.iter().position(open));
        match i {
            Some(i) => {
                answer.has_query = true;
                out[i] = answer;
            }
            None => out.push(answer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(extra: &str) -> (Option<String>, Option<String>) {
        let mut d = Diagnosis::default();
        d.read_extra(extra.as_bytes());
        assert_eq!(d.extra(), Some(extra.as_bytes()));
        let own = |s: Option<&str>| s.map(str::to_string);
        (own(d.client_namespace()), own(d.client_pod()))
    }

    #[test]
    fn the_workload_is_read_from_key_value_pairs_in_extra() {
        let both = (Some("team-a".to_string()), Some("web-1".to_string()));
        for extra in [
            "namespace=team-a;pod=web-1",
            "pod=web-1,namespace=team-a",
            "client=10.0.0.1 namespace=team-a pod=web-1",
            "namespace=team-a;;pod=web-1;",
        ] {
            assert_eq!(workload(extra), both, "{extra}");
        }
        assert_eq!(workload("client=127.0.0.1"), (None, None));
        // An empty value, a key without value, and a look-alike key name nothing.
        assert_eq!(workload("namespace=;pod;xnamespace=b"), (None, None));
        // Not UTF-8: no label from it, and the raw bytes are still kept.
        let mut d = Diagnosis::default();
        d.read_extra(b"namespace=\xff\xfe;pod=ok");
        assert_eq!((d.client_namespace(), d.client_pod()), (None, Some("ok")));
    }
    #[test]
    fn tenths_are_the_text_float_formatting_gives() {
        let mut values = vec![
            0,
            1,
            49_999,
            50_000,
            50_001,
            149_999,
            150_000,
            250_000,
            999_950_000,
        ];
        values.extend([
            u64::MAX,
            999_999_999_999_999,
            1_000_000_000_000_000,
            1 << 53,
        ]);
        // A deterministic spread over every magnitude (xorshift).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x >> (x % 64));
            values.push((x % 100_000) * 50_000);
        }
        for n in values {
            for unit in [1_000_000, 1_000_000_000] {
                let mut out = Vec::new();
                let w = &mut Words {
                    out: &mut out,
                    who: "",
                    escape: |_, _| {},
                };
                w.tenths(n, unit);
                let want = format!("{:.1}", n as f64 / unit as f64);
                assert_eq!(String::from_utf8(out).unwrap(), want, "{n} / {unit}");
            }
        }
    }
}
