//! What a stream showed shortly before a client message, for the two causes a session cannot
//! see in its own messages (docs/output.md, "Causes"):
//!
//! - `cached_upstream_error`: CoreDNS's `cache` replays an upstream's error answer (SERVFAIL for
//!   5 s by default) without forwarding. The upstream's answer is in another session, and the
//!   shard key includes the DNS id, so it is usually in another shard.
//! - `rejected_upstream_failing`: `forward` refuses queries over `max_concurrent` (and a plugin
//!   error is answered) outside the dnstap writer, so the session is a lone CQ; what explains
//!   it is the failing upstream attempts of other sessions.
//!
//! A `Recall` runs per stream where every message passes in order (the reader, before the
//! router), so what it attaches to an event does not depend on `--shards` or on timing. Its
//! memory is bounded per stream (`MAX_ANSWERS`, `MAX_OPEN_ATTEMPTS`); what it has to forget
//! to stay within them while still inside its windows is counted (`recall_forgotten`).

use crate::dnstap::{Event, Nanos, Recollection, Role, SourceId};
use hashbrown::HashMap;
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::net::SocketAddr;

/// Upstream error answers a stream remembers at once.
pub const MAX_ANSWERS: usize = 1024;
/// Upstream queries without their response yet that a stream remembers at once.
pub const MAX_OPEN_ATTEMPTS: usize = 1024;
/// An upstream query this old without a response will never get one on an in-order stream
/// (CoreDNS's `forward` gives up after 5 s): it is dropped from memory without counting.
const ATTEMPT_GIVEN_UP: Nanos = 30_000_000_000;

/// The windows (`--cache-window`, `--upstream-failing-window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecallConfig {
    /// How long an upstream's error answer may be replayed from a cache: CoreDNS's `cache`
    /// keeps SERVFAIL 5 s by default (`servfail` option).
    pub cache_window: Nanos,
    /// How recent the identity's latest failed upstream attempt must be for a lone CQ to be
    /// blamed on it.
    pub failing_window: Nanos,
}

impl Default for RecallConfig {
    fn default() -> Self {
        Self {
            cache_window: 5_000_000_000,
            failing_window: 10_000_000_000,
        }
    }
}

/// A question's latest upstream error answer.
#[derive(Debug, Clone, Copy)]
struct Answer {
    question: Question,
    upstream: Option<SocketAddr>,
    rcode: u8,
    at: Nanos,
}

/// Identity, qname hash, qtype, qclass: what a cache answers by.
type Question = (SourceId, u64, u16, u16);

/// An upstream query waiting for its response.
#[derive(Debug, Clone, Copy)]
struct OpenAttempt {
    source: SourceId,
    /// The event key: the request's (CoreDNS keeps the client's DNS id upstream).
    key: u64,
    query_time: Option<Nanos>,
    upstream: Option<SocketAddr>,
    open: bool,
}

/// An identity's latest failed upstream attempt.
#[derive(Debug, Clone, Copy)]
struct Failure {
    upstream: Option<SocketAddr>,
    timed_out: bool,
    at: Nanos,
    /// That upstream answered an attempt after it.
    recovered: bool,
}

/// One stream's memory. See the module documentation.
#[derive(Debug, Default)]
pub struct Recall {
    cfg: RecallConfig,
    answers: HashMap<u64, Answer>,
    /// The answers' keys in the order they were remembered, with their time.
    answer_order: VecDeque<(u64, Nanos)>,
    attempts: VecDeque<OpenAttempt>,
    /// The open attempts per request (source, key); empty when none is open, so most CRs need
    /// not look at them at all. A CR or FQ whose request has none (nearly all of them) skips the
    /// walk over `attempts`, which holds up to `MAX_OPEN_ATTEMPTS`
    /// unanswered ones while an upstream times out (issue #18: that walk was 15 % of the CPU).
    open_by_request: HashMap<(SourceId, u64), u16>,
    failures: SmallVec<[(SourceId, Failure); 2]>,
    forgotten: u64,
}

impl Recall {
    pub fn new(cfg: RecallConfig) -> Self {
        Self {
            cfg,
            ..Self::default()
        }
    }

    /// Takes in the stream's next event; what the stream showed before it that its session
    /// should know.
    #[inline]
    pub fn observe(&mut self, ev: &Event) -> Recollection {
        // Most client messages have nothing to recall and change nothing: decided here, in
        // the reader's loop, without a call (issue #14: the cost per message must not rise).
        let nothing = match ev.role {
            Role::ClientQuery => {
                return match (ev.question, ev.time()) {
                    (Some(_), Some(t)) => self.failing(ev.source, t),
                    _ => Recollection::Nothing,
                };
            }
            Role::ClientResponse => {
                self.open_by_request.is_empty()
                    && (self.answers.is_empty() || ev.question.is_none_or(|q| !is_error(q.rcode)))
            }
            Role::UpstreamQuery | Role::UpstreamResponse => false,
        };
        if nothing {
            return Recollection::Nothing;
        }
        self.recall(ev)
    }

    /// The whole of `observe`, out of line: upstream messages, and the client messages that
    /// may find something.
    #[inline(never)]
    fn recall(&mut self, ev: &Event) -> Recollection {
        let Some(q) = ev.question else {
            return Recollection::Nothing;
        };
        let Some(t) = ev.time() else {
            return Recollection::Nothing;
        };
        // Pairing attempts needs the request's own key and the order CoreDNS writes in.
        let pairs = ev.profile.upstream_keeps_client_id() && ev.profile.writes_in_order();
        let question = (ev.source, q.qname_hash, q.qtype, q.qclass);
        match ev.role {
            Role::UpstreamQuery if pairs => {
                // An earlier attempt of the same request without a response was retried.
                self.time_out_attempts(ev.source, ev.key, t);
                self.open_attempt(ev, t);
                Recollection::Nothing
            }
            Role::UpstreamResponse => {
                if pairs {
                    self.close_attempt(ev);
                }
                self.upstream_answered(question, ev.source, ev.upstream, q.rcode, t);
                Recollection::Nothing
            }
            Role::ClientResponse => {
                if pairs {
                    // CoreDNS writes an answered attempt's FR before the CR.
                    self.time_out_attempts(ev.source, ev.key, t);
                }
                if is_error(q.rcode) {
                    self.replayed(question, q.rcode, t)
                } else {
                    Recollection::Nothing
                }
            }
            Role::ClientQuery => self.failing(ev.source, t),
            Role::UpstreamQuery => Recollection::Nothing,
        }
    }

    /// Answers and attempts forgotten to stay within the bounds, since the last call.
    pub fn take_forgotten(&mut self) -> u64 {
        std::mem::take(&mut self.forgotten)
    }

    fn open_attempt(&mut self, ev: &Event, t: Nanos) {
        while let Some(front) = self.attempts.front() {
            let given_up = front.query_time.is_none_or(|q| q + ATTEMPT_GIVEN_UP < t);
            if front.open && !given_up && self.attempts.len() < MAX_OPEN_ATTEMPTS {
                break;
            }
            if front.open {
                let request = (front.source, front.key);
                self.closed(request);
                self.forgotten += u64::from(!given_up);
            }
            self.attempts.pop_front();
        }
        self.attempts.push_back(OpenAttempt {
            source: ev.source,
            key: ev.key,
            query_time: ev.query_time,
            upstream: ev.upstream,
            open: true,
        });
        *self.open_by_request.entry((ev.source, ev.key)).or_insert(0) += 1;
    }

    /// Counts one open attempt of `request` as closed.
    fn closed(&mut self, request: (SourceId, u64)) {
        if let Some(n) = self.open_by_request.get_mut(&request) {
            *n -= 1;
            if *n == 0 {
                self.open_by_request.remove(&request);
            }
        }
    }

    /// The FR's attempt: the latest open one of the request with its query_time.
    fn close_attempt(&mut self, ev: &Event) {
        if !self.open_by_request.contains_key(&(ev.source, ev.key)) {
            return;
        }
        let found = self.attempts.iter_mut().rev().find(|a| {
            a.open && a.source == ev.source && a.key == ev.key && a.query_time == ev.query_time
        });
        if let Some(a) = found {
            a.open = false;
            self.closed((ev.source, ev.key));
        }
        self.drop_closed();
    }

    /// Answered and timed-out attempts at the front are of no more use.
    fn drop_closed(&mut self) {
        while self.attempts.front().is_some_and(|a| !a.open) {
            self.attempts.pop_front();
        }
    }

    /// The request's open attempts got no response: each is a timeout, at `t`. The walk
    /// stops at the last of them: `open_by_request` counts them, and a request's attempts are
    /// near the back (the deque keeps up to `MAX_OPEN_ATTEMPTS` of other requests before them).
    fn time_out_attempts(&mut self, source: SourceId, key: u64, t: Nanos) {
        let Some(mut open) = self.open_by_request.remove(&(source, key)) else {
            return;
        };
        let mut timed_out = None;
        for a in self.attempts.iter_mut().rev() {
            if a.open && a.source == source && a.key == key {
                a.open = false;
                timed_out.get_or_insert(a.upstream);
                open -= 1;
                if open == 0 {
                    break;
                }
            }
        }
        if let Some(upstream) = timed_out {
            self.drop_closed();
            self.failed(source, upstream, true, t);
        }
    }

    fn upstream_answered(
        &mut self,
        question: Question,
        source: SourceId,
        upstream: Option<SocketAddr>,
        rcode: u8,
        t: Nanos,
    ) {
        let key = question_key(question);
        if !is_error(rcode) {
            if !self.answers.is_empty() {
                // A cache now holds the good answer.
                self.answers.remove(&key);
            }
            if let Some((_, f)) = self.failures.iter_mut().find(|(s, _)| *s == source) {
                f.recovered |= f.upstream == upstream && t >= f.at;
            }
            return;
        }
        self.failed(source, upstream, false, t);
        self.remember_answer(
            key,
            Answer {
                question,
                upstream,
                rcode,
                at: t,
            },
        );
    }

    fn remember_answer(&mut self, key: u64, answer: Answer) {
        let window = self.cfg.cache_window;
        while let Some(&(k, at)) = self.answer_order.front() {
            let expired = at.saturating_add(window) < answer.at;
            if !expired && self.answer_order.len() < MAX_ANSWERS {
                break;
            }
            self.answer_order.pop_front();
            // Only the entry's latest remembering removes it.
            if self.answers.get(&k).is_some_and(|a| a.at == at) {
                self.answers.remove(&k);
                if !expired {
                    self.forgotten += 1;
                }
            }
        }
        self.answers.insert(key, answer);
        self.answer_order.push_back((key, answer.at));
    }

    fn failed(
        &mut self,
        source: SourceId,
        upstream: Option<SocketAddr>,
        timed_out: bool,
        t: Nanos,
    ) {
        let f = Failure {
            upstream,
            timed_out,
            at: t,
            recovered: false,
        };
        match self.failures.iter_mut().find(|(s, _)| *s == source) {
            Some((_, old)) if old.at <= t => *old = f,
            Some(_) => {}
            None => self.failures.push((source, f)),
        }
    }

    /// An error CR: did the same question's upstream answer the same rcode within the window?
    fn replayed(&self, question: Question, rcode: u8, t: Nanos) -> Recollection {
        let Some(a) = self.answers.get(&question_key(question)) else {
            return Recollection::Nothing;
        };
        match t.checked_sub(a.at) {
            Some(age)
                if a.question == question && a.rcode == rcode && age <= self.cfg.cache_window =>
            {
                Recollection::UpstreamAnswered {
                    upstream: a.upstream,
                    rcode,
                    age,
                }
            }
            _ => Recollection::Nothing,
        }
    }

    /// A CQ: was the identity's latest upstream attempt a failure, recent, and not since
    /// recovered from?
    #[inline]
    fn failing(&self, source: SourceId, t: Nanos) -> Recollection {
        let Some((_, f)) = self.failures.iter().find(|(s, _)| *s == source) else {
            return Recollection::Nothing;
        };
        match t.checked_sub(f.at) {
            Some(age) if !f.recovered && age <= self.cfg.failing_window => {
                Recollection::UpstreamFailing {
                    upstream: f.upstream,
                    timed_out: f.timed_out,
                    age,
                }
            }
            _ => Recollection::Nothing,
        }
    }
}

/// NOERROR and NXDOMAIN are answers; every other rcode is an error (as in the verdict).
fn is_error(rcode: u8) -> bool {
    !matches!(rcode, 0 | 3)
}

fn question_key((source, qname, qtype, qclass): Question) -> u64 {
    let mixed = qname ^ (u64::from(qtype) << 16 | u64::from(qclass)) ^ u64::from(source.0) << 40;
    mixed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Recall {
        fn open_attempts(&self) -> usize {
            self.open_by_request.values().map(|&n| usize::from(n)).sum()
        }
    }
    use crate::dns::QuestionSummary;
    use crate::dnstap::SenderProfile;

    const SEC: Nanos = 1_000_000_000;
    const T0: Nanos = 1_700_000_000 * SEC;

    fn up(port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from(([10, 0, 0, 1], port)))
    }

    /// A CoreDNS event of request `id` for qname `name` at `t`; `rcode` for responses.
    fn ev(role: Role, name: u64, id: u64, t: Nanos, rcode: u8) -> Event {
        let question = QuestionSummary {
            id: id as u16,
            is_response: role.is_response(),
            rcode,
            qname_hash: name,
            qtype: 1,
            qclass: 1,
        };
        let mut e = Event::for_tests(
            SenderProfile::CoreDns,
            role,
            name * 1000 + id,
            Some(question),
            Some(t),
        );
        if role.is_response() {
            e.response_time = Some(t);
        }
        if !role.is_client() {
            e.upstream = up(53);
            // FQ and FR of one attempt share the FQ's query_time.
            e.query_time = Some(t - t % SEC);
        }
        e
    }

    fn recall() -> Recall {
        Recall::new(RecallConfig::default())
    }

    #[test]
    fn a_local_error_after_the_same_upstream_error_is_its_replay_within_the_window() {
        let mut r = recall();
        // Request 1 forwarded: the upstream answers SERVFAIL, CoreDNS passes it on.
        for e in [
            ev(Role::ClientQuery, 7, 1, T0, 0),
            ev(Role::UpstreamQuery, 7, 1, T0, 0),
            ev(Role::UpstreamResponse, 7, 1, T0 + 100, 2),
        ] {
            assert_eq!(r.observe(&e), Recollection::Nothing);
        }
        let own = r.observe(&ev(Role::ClientResponse, 7, 1, T0 + 200, 2));
        assert!(matches!(
            own,
            Recollection::UpstreamAnswered { rcode: 2, .. }
        ));
        // Request 2 answered from the cache 2 s later.
        let cached = r.observe(&ev(Role::ClientResponse, 7, 2, T0 + 2 * SEC, 2));
        assert_eq!(
            cached,
            Recollection::UpstreamAnswered {
                upstream: up(53),
                rcode: 2,
                age: 2 * SEC - 100,
            }
        );
        // Another rcode, another name, or past the window: no replay.
        assert_eq!(
            r.observe(&ev(Role::ClientResponse, 7, 3, T0 + 3 * SEC, 5)),
            Recollection::Nothing
        );
        assert_eq!(
            r.observe(&ev(Role::ClientResponse, 8, 4, T0 + 3 * SEC, 2)),
            Recollection::Nothing
        );
        assert_eq!(
            r.observe(&ev(Role::ClientResponse, 7, 5, T0 + 6 * SEC, 2)),
            Recollection::Nothing
        );
    }

    #[test]
    fn a_good_upstream_answer_ends_the_replay() {
        let mut r = recall();
        r.observe(&ev(Role::UpstreamQuery, 7, 1, T0, 0));
        r.observe(&ev(Role::UpstreamResponse, 7, 1, T0, 2));
        r.observe(&ev(Role::UpstreamQuery, 7, 2, T0 + SEC, 0));
        r.observe(&ev(Role::UpstreamResponse, 7, 2, T0 + SEC, 0));
        assert_eq!(
            r.observe(&ev(Role::ClientResponse, 7, 3, T0 + 2 * SEC, 2)),
            Recollection::Nothing
        );
    }

    #[test]
    fn a_lone_query_after_timed_out_attempts_recalls_the_failing_upstream() {
        let mut r = recall();
        assert_eq!(
            r.observe(&ev(Role::ClientQuery, 7, 1, T0, 0)),
            Recollection::Nothing
        );
        // Two attempts of request 1 without a response (the retry shows the first timed
        // out), then the CR shows the second did.
        r.observe(&ev(Role::UpstreamQuery, 7, 1, T0 + 2 * SEC, 0));
        r.observe(&ev(Role::UpstreamQuery, 7, 1, T0 + 4 * SEC, 0));
        r.observe(&ev(Role::ClientResponse, 7, 1, T0 + 5 * SEC, 2));
        let lone = r.observe(&ev(Role::ClientQuery, 9, 2, T0 + 6 * SEC, 0));
        assert_eq!(
            lone,
            Recollection::UpstreamFailing {
                upstream: up(53),
                timed_out: true,
                age: SEC,
            }
        );
        // Past the window, nothing.
        assert_eq!(
            r.observe(&ev(Role::ClientQuery, 9, 3, T0 + 16 * SEC, 0)),
            Recollection::Nothing
        );
    }

    #[test]
    fn an_answer_from_the_failing_upstream_ends_the_failure() {
        let mut r = recall();
        r.observe(&ev(Role::UpstreamQuery, 7, 1, T0, 0));
        r.observe(&ev(Role::UpstreamResponse, 7, 1, T0, 2));
        let q = r.observe(&ev(Role::ClientQuery, 9, 2, T0 + SEC, 0));
        assert!(matches!(
            q,
            Recollection::UpstreamFailing {
                timed_out: false,
                ..
            }
        ));
        r.observe(&ev(Role::UpstreamQuery, 8, 3, T0 + 2 * SEC, 0));
        r.observe(&ev(Role::UpstreamResponse, 8, 3, T0 + 2 * SEC, 0));
        assert_eq!(
            r.observe(&ev(Role::ClientQuery, 9, 4, T0 + 3 * SEC, 0)),
            Recollection::Nothing
        );
    }

    #[test]
    fn a_retry_times_out_every_open_attempt_of_its_request_and_no_other() {
        let mut r = recall();
        // Request 1's two attempts, among open attempts of other requests before and after.
        for (id, t) in [(2, 0), (1, 1), (3, 2), (1, 3), (4, 4)] {
            r.observe(&ev(Role::UpstreamQuery, 7, id, T0 + t * SEC, 0));
        }
        r.observe(&ev(Role::ClientResponse, 7, 1, T0 + 5 * SEC, 2));
        let open: Vec<u64> = r
            .attempts
            .iter()
            .filter(|a| a.open)
            .map(|a| a.key % 1000)
            .collect();
        assert_eq!(open, [2, 3, 4]);
        assert_eq!(r.open_attempts(), 3);
    }

    #[test]
    fn memory_is_bounded_and_what_it_forgets_in_the_window_is_counted() {
        let mut r = recall();
        let n = (MAX_ANSWERS + 10) as u64;
        for name in 0..n {
            r.observe(&ev(Role::UpstreamQuery, name, 1, T0, 0));
            r.observe(&ev(Role::UpstreamResponse, name, 1, T0, 2));
        }
        assert!(r.answers.len() <= MAX_ANSWERS);
        assert!(r.answer_order.len() <= MAX_ANSWERS);
        assert_eq!(r.take_forgotten(), 10);
        // Open attempts: a flood of queries that never get their response.
        for id in 0..n {
            r.observe(&ev(Role::UpstreamQuery, 99, id, T0, 0));
        }
        assert!(r.attempts.len() <= MAX_OPEN_ATTEMPTS);
        assert_eq!(
            r.open_attempts(),
            r.attempts.iter().filter(|a| a.open).count()
        );
        assert_eq!(r.take_forgotten(), 10);
        // Expired entries go without counting.
        let late = T0 + 60 * SEC;
        r.observe(&ev(Role::UpstreamQuery, 5, 1, late, 0));
        r.observe(&ev(Role::UpstreamResponse, 5, 1, late, 2));
        assert_eq!(r.answers.len(), 1);
        // The stale open attempts went, and the answered one with them.
        assert_eq!((r.attempts.len(), r.open_attempts()), (0, 0));
        assert_eq!(r.take_forgotten(), 0);
    }
}
