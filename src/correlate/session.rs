//! A session (every message of one client request) and its verdict.

use super::store::MessageRef;
use crate::dnstap::{Nanos, Recollection, Role, SenderProfile, SourceId};
use smallvec::SmallVec;

/// 1 CQ | 2 CR | 4 FQ/RQ | 8 FR/RR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct BitMap(pub u8);

impl BitMap {
    pub const NONE: Self = Self(0);
    pub const CQ: Self = Self(1);
    pub const CR: Self = Self(2);
    /// FORWARDER_QUERY, or RESOLVER_QUERY for recursive resolvers.
    pub const FQ: Self = Self(4);
    /// FORWARDER_RESPONSE, or RESOLVER_RESPONSE.
    pub const FR: Self = Self(8);
    /// Answered without an upstream leg (cache, hosts, a local zone).
    pub const CQ_CR: Self = Self::CQ.with(Self::CR);
    /// Forwarded, no upstream answer, no client response: upstream unreachable or timing out.
    pub const CQ_FQ: Self = Self::CQ.with(Self::FQ);
    pub const UPSTREAM_UNREACHABLE: Self = Self::CQ_FQ;
    /// Forwarded without an upstream answer, and the client got a response.
    pub const CQ_CR_FQ: Self = Self::CQ_CR.with(Self::FQ);
    pub const CQ_FR: Self = Self::CQ.with(Self::FR);
    pub const CQ_CR_FR: Self = Self::CQ_CR.with(Self::FR);
    /// The upstream answered, the client got no response.
    pub const CQ_FQ_FR: Self = Self::CQ_FQ.with(Self::FR);
    /// Everything but the client query.
    pub const CR_FQ_FR: Self = Self::CR.with(Self::FQ).with(Self::FR);
    /// Every role: a forwarded request, answered.
    pub const CQ_CR_FQ_FR: Self = Self::CQ_CR.with(Self::FQ).with(Self::FR);
    pub const FORWARDED: Self = Self::CQ_CR_FQ_FR;
    /// The upstream leg of a request.
    pub const UPSTREAM: Self = Self::FQ.with(Self::FR);

    /// The roles in either map.
    pub const fn with(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// The roles of `self` that are not in `other`.
    pub const fn without(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn of(role: Role) -> Self {
        Self(role.bit())
    }

    pub fn has(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    /// The roles' short names (CQ, CR, FQ, FR), in bit order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        [
            (Self::CQ, "CQ"),
            (Self::CR, "CR"),
            (Self::FQ, "FQ"),
            (Self::FR, "FR"),
        ]
        .into_iter()
        .filter(move |(bit, _)| self.0 & bit.0 != 0)
        .map(|(_, name)| name)
    }
}

/// One message kept in a session: the original frame plus what matching needs again.
#[derive(Debug, Clone)]
pub struct Message {
    pub role: Role,
    /// Header rcode of the DNS message, for responses with wire data.
    pub rcode: Option<u8>,
    /// query_time for queries and the upstream leg (FQ and FR share it in CoreDNS), the
    /// response_time for a CR; 0 when the sender gave none.
    pub time: Nanos,
    /// Hash of the upstream socket (upstream messages): pairs FR with FQ without storing it.
    pub upstream: u32,
    /// The encoded dnstap.Message, in the shard's store.
    pub bytes: MessageRef,
    /// `REPEAT`: byte-identical to the previous message and sharing its bytes (CoreDNS repeats
    /// the very same FQ for every attempt of a timed-out request). `QUERY_FROM_CQ`: stored
    /// without its query_message, which is byte-identical to the CQ's (CoreDNS forwards the
    /// client's query as it came); the renderer takes it from the CQ. `TIME_REJECTED`: ingest
    /// found one of its times out of range (`time_out_of_range`): the times in its bytes
    /// enter no computation (latency, RTT).
    pub flags: u8,
}

impl Message {
    pub const REPEAT: u8 = 1;
    pub const QUERY_FROM_CQ: u8 = 2;
    /// The stored bytes end with the frame's `extra` (`dnstap::Encoded`).
    pub const EXTRA: u8 = 4;
    pub const TIME_REJECTED: u8 = 8;

    pub fn time(&self) -> Option<Nanos> {
        (self.time != 0).then_some(self.time)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Succeeded,
    Failed,
    SampleLoss,
}

impl Status {
    pub const ALL: [Status; 3] = [Status::Succeeded, Status::Failed, Status::SampleLoss];

    pub fn name(self) -> &'static str {
        match self {
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::SampleLoss => "SampleLoss",
        }
    }
}

/// Why a session is SampleLoss. Every SampleLoss line names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LossReason {
    /// FR/CR/FQ arrived but their CLIENT_QUERY never did.
    ClientQueryMissing,
    /// CoreDNS wrote a CR after forwarding but the FR of the answered attempt is missing.
    UpstreamResponseMissing,
    /// An FR arrived without its FQ.
    UpstreamQueryMissing,
    /// A sender that writes in order (CoreDNS) got the upstream's answer, but the CR it
    /// writes right after never came.
    ClientResponseMissing,
    /// This analyser's shard queue overflowed while the session was open.
    AnalyserQueueFull,
    /// The sender lost messages on this identity while the session was open (orphans,
    /// a stream that ended without STOP, undecodable frames).
    SenderLoss,
    /// The session table was full; the oldest session was evicted.
    SessionTableFull,
}

impl LossReason {
    pub fn name(self) -> &'static str {
        match self {
            Self::ClientQueryMissing => "client_query_missing",
            Self::UpstreamResponseMissing => "upstream_response_missing",
            Self::UpstreamQueryMissing => "upstream_query_missing",
            Self::ClientResponseMissing => "client_response_missing",
            Self::AnalyserQueueFull => "analyser_queue_full",
            Self::SenderLoss => "sender_loss",
            Self::SessionTableFull => "session_table_full",
        }
    }

    pub fn explain(self) -> &'static str {
        match self {
            Self::ClientQueryMissing => "its CLIENT_QUERY was never received (lost by the sender or during a reconnect)",
            Self::UpstreamResponseMissing => "the client got an answer but the FORWARDER_RESPONSE it came from was never received",
            Self::UpstreamQueryMissing => "a FORWARDER_RESPONSE arrived without its FORWARDER_QUERY",
            Self::ClientResponseMissing => "the upstream answered, but the CLIENT_RESPONSE the sender writes right after was never received",
            Self::AnalyserQueueFull => "the analyser dropped messages of this shard while the session was open (queue full: raise --shards or --queue-capacity)",
            Self::SenderLoss => "the sender lost dnstap messages on this identity while the session was open (CoreDNS queue full or reconnect)",
            Self::SessionTableFull => "the session table was full (--max-sessions) and this session was evicted before it ended",
        }
    }
}

/// The outcome of a finished session.
///
/// A session whose CLIENT_RESPONSE arrived has a known outcome: its status is that response's
/// (Succeeded for NOERROR/NXDOMAIN, Failed otherwise) whatever was lost around it, and
/// `incomplete` says which of its messages loss may have hidden. Only a session without a
/// response, where loss could explain the missing response, is SampleLoss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub status: Status,
    /// The roles observed, never the roles presumed lost.
    pub bitmap: BitMap,
    /// Why the session is SampleLoss: Some exactly when `status` is SampleLoss.
    pub loss: Option<LossReason>,
    /// An answered session (Succeeded or Failed) that loss touched: what may be missing.
    pub incomplete: Option<Incomplete>,
}

/// What an answered session may lack, and the evidence of loss that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incomplete {
    /// Roles that may never have been received: the CQ when it is absent, the upstream
    /// message(s) loss could hide (a whole FQ+FR pair when no upstream leg was seen, the FR
    /// when no attempt was answered, the FQ when responses outnumber queries). Never empty.
    pub missing: BitMap,
    pub cause: LossReason,
}

impl Incomplete {
    /// E.g. "FQ, FR may be missing: the sender lost dnstap messages ...".
    pub fn explain(self) -> String {
        let roles: Vec<&str> = self.missing.names().collect();
        format!(
            "{} may be missing: {}",
            roles.join(", "),
            self.cause.explain()
        )
    }
}

/// All messages of one client request as seen by one sender.
#[derive(Debug, Clone)]
pub struct Session {
    pub source: SourceId,
    pub profile: SenderProfile,
    pub key: u64,
    pub bitmap: BitMap,
    /// Four inline: CoreDNS's forwarded request (CQ, FQ, FR, CR) needs no allocation.
    pub messages: SmallVec<[Message; 4]>,
    /// Messages past the per-session cap (a retry storm); counted, not kept.
    pub messages_dropped: u16,
    /// The CQ's query_time; 0 until the CQ arrives.
    pub(super) cq_time: Nanos,
    /// Hash of the client socket (0: unknown), to join a CR that carries no query_time.
    pub(super) client: u32,
    pub dns_id: Option<u16>,
    /// Earliest event time in the session (orphans have no CQ time).
    pub first_time: Nanos,
    pub(super) deadline: Nanos,
    pub(super) upstream_queries: u16,
    pub(super) upstream_responses: u16,
    /// Evidence of loss noticed by the correlator itself.
    pub(super) loss: Option<LossReason>,
    /// The sender loss sequence and this shard's drop epoch when the session opened.
    pub(super) loss_seq_at_open: u64,
    pub(super) drop_epoch_at_open: u32,
    /// CR seen, but held for late upstream messages (senders that write CR before RR).
    pub(super) completed: bool,
    /// True when the sender sent wire messages (CoreDNS `full`).
    pub has_wire: bool,
    /// What the stream showed before the session's client messages (`diagnosis::recall`).
    pub recalled: Recollection,
    /// The question's type, from the first message that had one.
    pub qtype: Option<u16>,
}

impl Session {
    /// A session opened by its first message (usually the CQ) at event time `first_time`.
    pub(super) fn open(
        source: SourceId,
        profile: SenderProfile,
        key: u64,
        first_time: Nanos,
        has_wire: bool,
    ) -> Self {
        Session {
            source,
            profile,
            key,
            bitmap: BitMap::NONE,
            messages: SmallVec::new(),
            messages_dropped: 0,
            cq_time: 0,
            client: 0,
            dns_id: None,
            first_time,
            deadline: Nanos::MAX,
            upstream_queries: 0,
            upstream_responses: 0,
            loss: None,
            loss_seq_at_open: 0,
            drop_epoch_at_open: 0,
            completed: false,
            has_wire,
            recalled: Recollection::Nothing,
            qtype: None,
        }
    }

    /// The CQ's query_time, once the CQ has arrived.
    pub fn cq_time(&self) -> Option<Nanos> {
        (self.cq_time != 0).then_some(self.cq_time)
    }

    pub fn has(&self, role: Role) -> bool {
        self.bitmap.has(role)
    }

    pub fn rcode(&self) -> Option<u8> {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == Role::ClientResponse)
            .and_then(|m| m.rcode)
    }

    /// The verdict, given whether loss became evident while the session was open.
    pub fn verdict(&self, loss_evident: Option<LossReason>) -> Verdict {
        let bitmap = self.bitmap;
        let cause = if !self.has(Role::ClientQuery) {
            Some(LossReason::ClientQueryMissing)
        } else {
            self.loss.or(loss_evident)
        };
        if !self.has(Role::ClientResponse) {
            // An in-order sender writes the CR right after the answered exchange: an FR
            // without it proves the CR lost, even when nothing else on the stream shows it.
            let answered = self.upstream_responses > 0 && self.profile.writes_in_order();
            let cause = cause.or(answered.then_some(LossReason::ClientResponseMissing));
            // The outcome is unknown when loss could have taken the response.
            return Verdict {
                status: cause.map_or(Status::Failed, |_| Status::SampleLoss),
                bitmap,
                loss: cause,
                incomplete: None,
            };
        }
        // NOERROR (0) and NXDOMAIN (3) are answers; without wire data a CR is an answer.
        let status = match self.rcode() {
            Some(0 | 3) | None => Status::Succeeded,
            Some(_) => Status::Failed,
        };
        let missing = self.may_be_missing();
        Verdict {
            status,
            bitmap,
            loss: None,
            incomplete: cause
                .filter(|_| !missing.is_empty())
                .map(|cause| Incomplete { missing, cause }),
        }
    }

    /// The roles loss could have hidden from this session. A session with its CQ and every
    /// upstream attempt answered looks whole: nothing is presumed missing.
    fn may_be_missing(&self) -> BitMap {
        let client = if self.has(Role::ClientQuery) {
            BitMap::NONE
        } else {
            BitMap::CQ
        };
        let upstream = match (self.upstream_queries, self.upstream_responses) {
            (0, 0) => BitMap::UPSTREAM,
            (_, 0) => BitMap::FR,
            (q, r) if q < r => BitMap::FQ,
            _ => BitMap::NONE,
        };
        client.with(upstream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(roles: &[(Role, Option<u8>)]) -> Session {
        let mut store = super::super::store::MessageStore::default();
        let mut s = Session::open(SourceId(0), SenderProfile::CoreDns, 0, 0, true);
        for &(role, rcode) in roles {
            s.bitmap = s.bitmap.with(BitMap::of(role));
            match role {
                UpstreamQuery => s.upstream_queries += 1,
                UpstreamResponse => s.upstream_responses += 1,
                _ => {}
            }
            s.messages.push(Message {
                role,
                rcode,
                time: 0,
                upstream: 0,
                bytes: store.put(&[]),
                flags: 0,
            });
        }
        s
    }

    use Role::*;

    #[test]
    fn noerror_and_nxdomain_succeed_other_rcodes_fail() {
        let v = session(&[(ClientQuery, None), (ClientResponse, Some(0))]).verdict(None);
        assert_eq!((v.status, v.bitmap), (Status::Succeeded, BitMap::CQ_CR));
        let v = session(&[
            (ClientQuery, None),
            (UpstreamQuery, None),
            (UpstreamResponse, Some(3)),
            (ClientResponse, Some(3)),
        ])
        .verdict(None);
        assert_eq!((v.status, v.bitmap), (Status::Succeeded, BitMap::FORWARDED));
        for rcode in [2, 5, 1, 4] {
            let v = session(&[(ClientQuery, None), (ClientResponse, Some(rcode))]).verdict(None);
            assert_eq!(v.status, Status::Failed, "rcode {rcode}");
        }
    }

    #[test]
    fn no_client_response_fails_unless_loss_is_evident() {
        let s = session(&[(ClientQuery, None), (UpstreamQuery, None)]);
        assert_eq!(s.verdict(None).status, Status::Failed);
        assert_eq!(s.verdict(None).bitmap, BitMap::CQ_FQ);
        let v = s.verdict(Some(LossReason::SenderLoss));
        assert_eq!(
            (v.status, v.loss),
            (Status::SampleLoss, Some(LossReason::SenderLoss))
        );
        let v = session(&[(ClientQuery, None)]).verdict(None);
        assert_eq!((v.status, v.bitmap), (Status::Failed, BitMap::CQ));
    }

    /// CoreDNS writes the CR right after an answered exchange, so an FR without a CR is proof
    /// of loss by itself. A sender that does not write in order proves nothing that way.
    #[test]
    fn an_answered_exchange_without_client_response_is_loss_from_coredns() {
        let roles = [
            (ClientQuery, None),
            (UpstreamQuery, None),
            (UpstreamResponse, Some(0)),
        ];
        let v = session(&roles).verdict(None);
        assert_eq!(
            (v.status, v.bitmap, v.loss),
            (
                Status::SampleLoss,
                BitMap::CQ_FQ_FR,
                Some(LossReason::ClientResponseMissing)
            )
        );
        let mut unbound = session(&roles);
        unbound.profile = SenderProfile::Unbound;
        assert_eq!(unbound.verdict(None).status, Status::Failed);
    }

    #[test]
    fn a_missing_client_query_leaves_the_answer_its_verdict() {
        // Before issue #10 this was SampleLoss client_query_missing: the outcome (the CR's
        // rcode) is known, so the CR decides, and the missing CQ is reported as incomplete.
        let v = session(&[
            (UpstreamQuery, None),
            (UpstreamResponse, Some(0)),
            (ClientResponse, Some(0)),
        ])
        .verdict(None);
        assert_eq!(
            (v.status, v.bitmap, v.loss),
            (Status::Succeeded, BitMap::CR_FQ_FR, None)
        );
        assert_eq!(
            v.incomplete,
            Some(Incomplete {
                missing: BitMap::CQ,
                cause: LossReason::ClientQueryMissing
            })
        );
        // A lone CR: its CQ is missing, and so may be an upstream leg.
        let v = session(&[(ClientResponse, Some(2))]).verdict(None);
        assert_eq!((v.status, v.loss), (Status::Failed, None));
        assert_eq!(
            v.incomplete.map(|i| i.missing),
            Some(BitMap::CQ.with(BitMap::UPSTREAM))
        );
    }

    #[test]
    fn orphans_without_a_response_are_sample_loss() {
        for roles in [
            &[(UpstreamQuery, None)][..],
            &[(UpstreamResponse, Some(0))],
            &[(UpstreamQuery, None), (UpstreamResponse, Some(0))],
        ] {
            let v = session(roles).verdict(None);
            assert_eq!(
                (v.status, v.loss, v.incomplete),
                (
                    Status::SampleLoss,
                    Some(LossReason::ClientQueryMissing),
                    None
                )
            );
        }
    }

    #[test]
    fn an_answered_session_keeps_its_status_under_loss_and_says_what_may_be_missing() {
        let cases = [
            // Answered without an upstream leg: a lost FQ+FR pair would look the same.
            (
                &[(ClientQuery, None), (ClientResponse, Some(0))][..],
                Status::Succeeded,
                Some(BitMap::UPSTREAM),
            ),
            (
                &[
                    (ClientQuery, None),
                    (UpstreamQuery, None),
                    (ClientResponse, Some(2)),
                ],
                Status::Failed,
                Some(BitMap::FR),
            ),
            (
                &[
                    (ClientQuery, None),
                    (UpstreamResponse, Some(3)),
                    (ClientResponse, Some(3)),
                ],
                Status::Succeeded,
                Some(BitMap::FQ),
            ),
            // Every role and every attempt answered: nothing is presumed missing.
            (
                &[
                    (ClientQuery, None),
                    (UpstreamQuery, None),
                    (UpstreamResponse, Some(0)),
                    (ClientResponse, Some(0)),
                ],
                Status::Succeeded,
                None,
            ),
        ];
        for cause in [LossReason::SenderLoss, LossReason::AnalyserQueueFull] {
            for (roles, status, missing) in cases {
                let s = session(roles);
                let v = s.verdict(Some(cause));
                assert_eq!((v.status, v.loss), (status, None), "{roles:?}");
                assert_eq!(v.bitmap, s.bitmap, "the bitmap stays what was observed");
                assert_eq!(
                    v.incomplete,
                    missing.map(|missing| Incomplete { missing, cause }),
                    "{roles:?}"
                );
                assert_eq!(s.verdict(None).incomplete, None, "no loss, nothing missing");
            }
        }
    }

    #[test]
    fn incomplete_names_the_roles_and_the_cause() {
        let i = Incomplete {
            missing: BitMap::UPSTREAM,
            cause: LossReason::SenderLoss,
        };
        assert!(i
            .explain()
            .starts_with("FQ, FR may be missing: the sender lost"));
        assert_eq!(
            BitMap::FORWARDED.names().collect::<Vec<_>>(),
            ["CQ", "CR", "FQ", "FR"]
        );
    }

    #[test]
    fn without_wire_data_a_client_response_counts_as_answered() {
        let v = session(&[(ClientQuery, None), (ClientResponse, None)]).verdict(None);
        assert_eq!(v.status, Status::Succeeded);
    }
}
