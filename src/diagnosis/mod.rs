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
use std::net::SocketAddr;

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

    /// One sentence an operator can act on; `who` names the sender (its identity).
    pub fn sentence(&self, who: &str) -> String {
        let v = &self.verdict;
        let who = if who.is_empty() { "the server" } else { who };
        let rcode = self
            .rcode
            .map_or("an answer".into(), |r| rcode_name(r.into()));
        let latency = self
            .latency
            .map(|l| format!(" in {:.1} ms", l as f64 / 1e6))
            .unwrap_or_default();
        let upstreams = self.upstream_list();
        let tries = self.attempts.len();
        let mut text = if let Some(text) = self.recalled_sentence(who, &rcode, &latency) {
            text
        } else if let Some(loss) = v.loss {
            format!(
                "Incomplete sample: {}; seen: {}.",
                loss.explain(),
                seen(v.bitmap)
            )
        } else {
            match (v.status, v.bitmap) {
                (Status::Succeeded, BitMap::CQ_CR) => {
                    format!("{who} answered {rcode} itself{latency} (cache, hosts or a local zone), without forwarding.")
                }
                (Status::Succeeded, _) if tries == 0 => {
                    format!("The client got {rcode}{latency}; seen: {}.", seen(v.bitmap))
                }
                (Status::Succeeded, _) => format!(
                    "Forwarded to {upstreams} ({tries} attempt{}); the client got {rcode}{latency}.",
                    plural(tries)
                ),
                (Status::Failed, BitMap::CQ_CR) => format!(
                    "{who} answered {rcode} itself{latency} without forwarding: check its zones, plugins and policy for this name."
                ),
                (Status::Failed, BitMap::FORWARDED) | (Status::Failed, BitMap::CQ_CR_FR) => {
                    let up = self
                        .attempts
                        .iter()
                        .rev()
                        .find(|a| a.answered)
                        .and_then(|a| a.rcode)
                        .map_or("an answer".into(), |r| rcode_name(r.into()));
                    format!(
                        "Upstream {upstreams} answered {up}; the client got {rcode}{latency}: the upstream is failing for this name."
                    )
                }
                (Status::Failed, BitMap::UPSTREAM_UNREACHABLE) => format!(
                    "Forwarded to {upstreams}, no answer after {tries} attempt{}: the upstream is unreachable or timing out; the client got SERVFAIL from {who} without a tap, or nothing.",
                    plural(tries)
                ),
                (Status::Failed, BitMap::CQ_CR_FQ) => format!(
                    "Forwarded to {upstreams}, no answer after {tries} attempt{}; the client got {rcode}{latency}: the upstream is unreachable or timing out.",
                    plural(tries)
                ),
                (Status::Failed, BitMap::CQ_FQ_FR) | (Status::Failed, BitMap::CQ_FR) => format!(
                    "Upstream {upstreams} answered, but the client got no response from {who}."
                ),
                (Status::Failed, BitMap::CQ) => format!(
                    "No response and no upstream query: {who} dropped the request or answered through a path dnstap does not see (e.g. max_concurrent, an error) before it timed out."
                ),
                (Status::Failed, _) => {
                    format!("The client got {rcode}{latency}; seen: {}.", seen(v.bitmap))
                }
                (Status::SampleLoss, _) => {
                    format!("Incomplete sample; seen: {}.", seen(v.bitmap))
                }
            }
        };
        if let Some(inc) = v.incomplete {
            text.push_str(" Incomplete sample: ");
            text.push_str(&inc.explain());
            text.push('.');
        }
        if !self.has_wire {
            text.push_str(" The sender logs no DNS messages: add `full` to the dnstap line.");
        }
        text
    }

    /// The sentence of the two causes the stream explains rather than the session.
    fn recalled_sentence(&self, who: &str, rcode: &str, latency: &str) -> Option<String> {
        match (self.cause, self.recalled) {
            (
                Cause::CachedUpstreamError,
                Recollection::UpstreamAnswered { upstream, age, .. },
            ) => Some(format!(
                "{who} answered {rcode}{latency} from its cache: upstream {} answered {rcode} for this question {} earlier (CoreDNS caches SERVFAIL 5 s by default): the upstream is failing for this name.",
                upstream_name(upstream),
                seconds(age),
            )),
            (
                Cause::RejectedUpstreamFailing,
                Recollection::UpstreamFailing { upstream, timed_out, age },
            ) => Some(format!(
                "No response and no upstream query while {who}'s upstream {} was failing ({} {} before): the client most likely got REFUSED from forward's max_concurrent as queries piled up behind the failing upstream (or SERVFAIL from a plugin error), outside the tap.",
                upstream_name(upstream),
                if timed_out { "an attempt timed out" } else { "it answered an error" },
                seconds(age),
            )),
            _ => None,
        }
    }

    fn upstream_list(&self) -> String {
        let names: Vec<String> = self.upstreams().map(upstream_name).collect();
        if names.is_empty() {
            "an upstream".into()
        } else {
            names.join(", ")
        }
    }
}

/// What of a recollection the cause weighs.
fn recalled(r: Recollection) -> Recalled {
    match r {
        Recollection::Nothing => Recalled::Nothing,
        Recollection::UpstreamAnswered { rcode, .. } => Recalled::UpstreamRcode(rcode),
        Recollection::UpstreamFailing { .. } => Recalled::UpstreamFailing,
    }
}

/// "127.0.0.1:53" or "an unknown upstream".
fn upstream_name(u: Option<SocketAddr>) -> String {
    u.map_or("an unknown upstream".to_string(), |x| x.to_string())
}

fn seconds(age: Nanos) -> String {
    if age < 1_000_000_000 {
        format!("{:.1} ms", age as f64 / 1e6)
    } else {
        format!("{:.1} s", age as f64 / 1e9)
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

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn seen(bitmap: BitMap) -> String {
    let names: Vec<&str> = [(1, "CQ"), (4, "FQ"), (8, "FR"), (2, "CR")]
        .iter()
        .filter(|(b, _)| bitmap.0 & b != 0)
        .map(|(_, n)| *n)
        .collect();
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(" ")
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
}
