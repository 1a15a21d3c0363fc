//! The contract between ingest and correlate: the `Event` a dnstap message becomes, its role,
//! and the key that sends every message of one request to the same shard and bucket.

use super::{socket, time, DecodeError, MessageType, SenderProfile, SocketProtocol, SourceId};
use super::{Encoded, MessageFacts, MessageFields, TapFields, MAX_EXTRA};
use crate::dns::{self, QuestionSummary};
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::SocketAddr;

/// Nanoseconds since the Unix epoch, as the sender stamped them.
pub type Nanos = u64;

/// The four message roles a session is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    ClientQuery,
    ClientResponse,
    UpstreamQuery,
    UpstreamResponse,
}

impl Role {
    /// The session BitMap bit: 1 CQ, 2 CR, 4 FQ (or RQ), 8 FR (or RR).
    pub fn bit(self) -> u8 {
        match self {
            Self::ClientQuery => 1,
            Self::ClientResponse => 2,
            Self::UpstreamQuery => 4,
            Self::UpstreamResponse => 8,
        }
    }

    /// Forwarder and resolver messages are both the upstream leg.
    fn of(t: MessageType) -> Option<Self> {
        use MessageType::*;
        Some(match t {
            CLIENT_QUERY => Self::ClientQuery,
            CLIENT_RESPONSE => Self::ClientResponse,
            FORWARDER_QUERY | RESOLVER_QUERY => Self::UpstreamQuery,
            FORWARDER_RESPONSE | RESOLVER_RESPONSE => Self::UpstreamResponse,
            _ => return None,
        })
    }

    pub fn is_response(self) -> bool {
        matches!(self, Self::ClientResponse | Self::UpstreamResponse)
    }

    pub fn is_client(self) -> bool {
        matches!(self, Self::ClientQuery | Self::ClientResponse)
    }
}

/// The stream (connection, or file) an event came on. A sender may have several at once:
/// CoreDNS opens a new connection when the old one stalls, while the old one's tail is still
/// unread. Numbered per process; a number reused after 2^32 streams could only make a
/// long-gone stream's clock count again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct StreamId(pub u32);

/// The peer address a sender's stream comes from, as the correlator groups sessions by it (a
/// fair share of the session table per address): a hash, 0 for files and unix sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey(pub u32);

impl PeerKey {
    pub fn of(ip: Option<std::net::IpAddr>) -> Self {
        Self(ip.map_or(0, |ip| (dns::key_hasher().hash_one(ip) as u32).max(1)))
    }
}

/// A stream ended (a connection closed, a file was read): besides [`Event`], the one thing
/// ingest tells the correlator. `sources` are the identities it carried, each with its
/// sender-loss sequence once the end was accounted for (a stream that ends without STOP is
/// evidence of loss), so the sessions it leaves open learn of that before they expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEnded {
    pub stream: StreamId,
    pub sources: Vec<(SourceId, u64)>,
}

/// One dnstap message, reduced to what correlation needs. The frame rides along (shared, not
/// copied) so the session can render the original message when it is emitted.
#[derive(Debug, Clone)]
pub struct Event {
    pub source: SourceId,
    pub stream: StreamId,
    /// The peer address of the stream (set by ingest).
    pub peer: PeerKey,
    /// Ingest dropped a time of this message as out of range: the times in its bytes must
    /// enter no computation either.
    pub time_rejected: bool,
    pub profile: SenderProfile,
    pub role: Role,
    /// Shard routing and bucket key (see `key`).
    pub key: u64,
    /// DNS facts, absent when the sender logs no wire messages (CoreDNS without `full`).
    pub question: Option<QuestionSummary>,
    pub query_time: Option<Nanos>,
    pub response_time: Option<Nanos>,
    /// The client's socket for client messages.
    pub client: Option<SocketAddr>,
    /// The upstream's socket for upstream messages.
    pub upstream: Option<SocketAddr>,
    pub protocol: Option<SocketProtocol>,
    /// Latest event time seen on this stream when the event was dispatched: the sender's clock.
    pub watermark: Nanos,
    /// The source's sender-loss sequence at dispatch: it grows whenever loss becomes evident
    /// on the stream (orphans, truncated streams), so a session can tell whether loss
    /// happened between two of its messages.
    pub loss_seq: u64,
    /// Events for this event's shard that the analyser dropped just before it.
    pub drops_before: u32,
    /// What the stream showed before this client message that its session cannot see
    /// itself (`diagnosis::Recall`, run where every message of the stream passes in order).
    pub recalled: Recollection,
    /// The frame had an `extra`, stored after the message's bytes (`Encoded`).
    pub has_extra: bool,
    /// Where the encoded dnstap.Message is in the batch that carries this event (identity
    /// and version are the source's, kept once in the registry).
    pub message: MessageSpan,
}

/// A fact about earlier messages of the same stream that a client message's session cannot
/// see itself: the shard key includes the DNS id, so a cached answer and the upstream answer it
/// replays land in different sessions (and shards).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Recollection {
    #[default]
    Nothing,
    /// On an error CR: the same question (identity, qname, qtype, qclass) got an upstream
    /// answer with this rcode `age` nanoseconds before it.
    UpstreamAnswered {
        upstream: Option<SocketAddr>,
        rcode: u8,
        age: Nanos,
    },
    /// On a CQ: the identity's latest upstream attempt failed (timed out, or answered an
    /// error rcode) `age` nanoseconds before it, and none was answered since.
    UpstreamFailing {
        upstream: Option<SocketAddr>,
        timed_out: bool,
        age: Nanos,
    },
}

/// Where an event's encoded dnstap.Message and its frame's `extra` lie: in which of its batch's
/// read pieces (`ingest::Batch`), at which offsets. The shard copies them from there into its
/// message store, the one copy between the socket and the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageSpan {
    pub piece: u16,
    /// At most `MAX_EXTRA`: the rest of a longer `extra` is not kept.
    pub extra_len: u16,
    pub start: u32,
    pub len: u32,
    pub extra_start: u32,
    /// Where the diagnosis finds its fields in the message (`Event::from_fields`).
    pub facts: MessageFacts,
}

impl MessageSpan {
    /// The span of `message` and `extra`, slices of `payload`, which starts at `at` in its
    /// piece (an empty `extra` is none), with the message's `facts`.
    pub fn within(
        payload: &[u8],
        at: usize,
        message: &[u8],
        extra: &[u8],
        facts: MessageFacts,
    ) -> Self {
        // Saturating: a part that is not in `payload` (none is) must not panic.
        let offset = |part: &[u8]| {
            ((part.as_ptr() as usize).saturating_sub(payload.as_ptr() as usize) + at) as u32
        };
        let extra = &extra[..extra.len().min(MAX_EXTRA)];
        Self {
            piece: 0,
            extra_len: extra.len() as u16,
            start: offset(message),
            len: message.len() as u32,
            extra_start: if extra.is_empty() { 0 } else { offset(extra) },
            facts,
        }
    }

    /// The message in `piece` (empty if the span does not fit, which no reader makes).
    pub fn of(self, piece: &[u8]) -> Encoded<'_> {
        let part = |start: u32, len: usize| {
            let start = start as usize;
            piece.get(start..start + len).unwrap_or(&[])
        };
        Encoded {
            message: part(self.start, self.len as usize),
            extra: part(self.extra_start, self.extra_len as usize),
            facts: self.facts,
        }
    }
}

impl Event {
    /// An event with only what routing and loss bookkeeping look at, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests(
        profile: SenderProfile,
        role: Role,
        key: u64,
        question: Option<QuestionSummary>,
        query_time: Option<Nanos>,
    ) -> Self {
        Event {
            source: SourceId(0),
            stream: StreamId::default(),
            peer: PeerKey::default(),
            time_rejected: false,
            profile,
            role,
            key,
            question,
            query_time,
            response_time: None,
            client: None,
            upstream: None,
            protocol: None,
            watermark: 0,
            loss_seq: 0,
            drops_before: 0,
            recalled: Recollection::Nothing,
            has_extra: false,
            message: MessageSpan::default(),
        }
    }

    /// Extracts an event from a scanned payload.
    #[inline]
    pub fn from_fields(
        tap: &TapFields<'_>,
        source: SourceId,
        profile: SenderProfile,
        hasher: &ahash::RandomState,
    ) -> Result<Self, DecodeError> {
        let m = tap.message.as_ref().ok_or(DecodeError::NoMessage)?;
        let kind = m.kind.ok_or(DecodeError::NoMessageType)?;
        let role = Role::of(kind).ok_or(DecodeError::UnsupportedType(kind))?;
        let wire = if role.is_response() {
            m.response_message
        } else {
            m.query_message
        };
        let question = match wire {
            Some(w) => Some(dns::parse_question(w, hasher)?),
            None => None,
        };
        let query_time = time(m.query_time_sec, m.query_time_nsec);
        let (client, upstream) = sockets(m, role);
        Ok(Event {
            source,
            stream: StreamId::default(),
            peer: PeerKey::default(),
            time_rejected: false,
            profile,
            role,
            key: key(
                hasher,
                source,
                profile,
                question.as_ref(),
                client,
                query_time,
            ),
            question,
            query_time,
            response_time: time(m.response_time_sec, m.response_time_nsec),
            client,
            upstream,
            protocol: m.protocol,
            watermark: 0,
            loss_seq: 0,
            drops_before: 0,
            recalled: Recollection::Nothing,
            has_extra: false,
            message: MessageSpan {
                facts: MessageFacts::of(tap.message_bytes, m, role, tap.extra),
                ..MessageSpan::default()
            },
        })
    }

    /// When it happened at the sender: queries at query_time, responses at response_time.
    pub fn time(&self) -> Option<Nanos> {
        if self.role.is_response() {
            self.response_time.or(self.query_time)
        } else {
            self.query_time
        }
    }
}

/// (client, upstream): client messages name the client in the query address, upstream
/// messages name the upstream in the response address.
fn sockets(m: &MessageFields<'_>, role: Role) -> (Option<SocketAddr>, Option<SocketAddr>) {
    if role.is_client() {
        (socket(m.query_address, m.query_port), None)
    } else {
        (None, socket(m.response_address, m.response_port))
    }
}

/// The key all messages of one request share: source, qname (lowercased), qtype, qclass, and
/// the DNS id where the sender keeps it on the upstream leg. Without a DNS message: source,
/// client and query_time, which CQ and CR share.
fn key(
    hasher: &ahash::RandomState,
    source: SourceId,
    profile: SenderProfile,
    question: Option<&QuestionSummary>,
    client: Option<SocketAddr>,
    query_time: Option<Nanos>,
) -> u64 {
    let mut h = hasher.build_hasher();
    source.hash(&mut h);
    match question {
        Some(q) => {
            (q.qname_hash, q.qtype, q.qclass).hash(&mut h);
            if profile.upstream_keeps_client_id() {
                q.id.hash(&mut h);
            }
        }
        None => (client, query_time).hash(&mut h),
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::super::{decode, pb, scan, Dnstap, DnstapMessage};
    use super::*;

    fn tap(role: MessageType, wire: Option<&[u8]>, port: u32) -> Vec<u8> {
        use quick_protobuf::{MessageWrite, Writer};
        use std::borrow::Cow;
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];
        let is_response = matches!(role, MessageType::CLIENT_RESPONSE);
        let msg = DnstapMessage {
            type_pb: role,
            socket_family: Some(pb::SocketFamily::INET),
            socket_protocol: Some(SocketProtocol::UDP),
            query_address: Some(Cow::Borrowed(&mapped[..])),
            query_port: Some(port),
            query_time_sec: Some(1_700_000_000),
            query_time_nsec: Some(5),
            response_time_sec: is_response.then_some(1_700_000_000),
            response_time_nsec: is_response.then_some(900),
            query_message: if is_response {
                None
            } else {
                wire.map(Cow::Borrowed)
            },
            response_message: if is_response {
                wire.map(Cow::Borrowed)
            } else {
                None
            },
            ..Default::default()
        };
        let d = Dnstap {
            identity: Some(Cow::Borrowed(b"pod-1")),
            version: Some(Cow::Borrowed(b"CoreDNS-1.11.3")),
            type_pb: pb::mod_Dnstap::Type::MESSAGE,
            message: Some(msg),
            ..Default::default()
        };
        let mut out = Vec::new();
        d.write_message(&mut Writer::new(&mut out)).unwrap();
        out
    }

    fn event_as(frame: Vec<u8>, profile: SenderProfile) -> Result<Event, DecodeError> {
        assert_eq!(decode(&frame)?.identity.as_deref(), Some(&b"pod-1"[..]));
        let tap = scan(&frame)?;
        assert_eq!(tap.identity, b"pod-1");
        Event::from_fields(&tap, SourceId(3), profile, &crate::dns::key_hasher())
    }

    fn event(frame: Vec<u8>) -> Result<Event, DecodeError> {
        event_as(frame, SenderProfile::CoreDns)
    }

    #[test]
    fn events_carry_roles_times_and_normalised_clients() {
        let q = crate::dns::tests::query(&["www", "example", "test"], 77);
        let cq = event(tap(MessageType::CLIENT_QUERY, Some(&q), 5353)).unwrap();
        assert_eq!(cq.role, Role::ClientQuery);
        assert_eq!(cq.client, Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(cq.time(), Some(1_700_000_000_000_000_005));
        assert_eq!(cq.question.unwrap().id, 77);
        let mut r = q.clone();
        r[2] |= 0x80; // qr
        let cr = event(tap(MessageType::CLIENT_RESPONSE, Some(&r), 5353)).unwrap();
        assert_eq!(cr.time(), Some(1_700_000_000_000_000_900));
        assert_eq!(cq.key, cr.key, "all messages of a request share the key");
    }

    #[test]
    fn the_dns_id_is_part_of_the_key_only_for_senders_that_keep_it_upstream() {
        let name = ["www", "example", "test"];
        let (a, b) = (
            crate::dns::tests::query(&name, 1),
            crate::dns::tests::query(&name, 2),
        );
        let keys = |profile| {
            let frame = |q| tap(MessageType::CLIENT_QUERY, Some(q), 53);
            let key = |q| event_as(frame(q), profile).unwrap().key;
            (key(&a), key(&b))
        };
        let (a1, b1) = keys(SenderProfile::CoreDns);
        assert_ne!(a1, b1);
        let (a2, b2) = keys(SenderProfile::Unbound);
        assert_eq!(a2, b2);
    }

    #[test]
    fn without_wire_messages_cq_and_cr_share_a_key_from_client_and_query_time() {
        let cq = event(tap(MessageType::CLIENT_QUERY, None, 4000)).unwrap();
        let cr = event(tap(MessageType::CLIENT_RESPONSE, None, 4000)).unwrap();
        let other = event(tap(MessageType::CLIENT_QUERY, None, 4001)).unwrap();
        assert!(cq.question.is_none());
        assert_eq!(cq.key, cr.key);
        assert_ne!(cq.key, other.key);
    }

    #[test]
    fn undecodable_payloads_and_messages_are_errors_not_panics() {
        assert!(matches!(
            decode(b"\xff\xff\xff"),
            Err(DecodeError::Protobuf(_))
        ));
        assert!(matches!(scan(b"\xff\xff\xff"), Err(DecodeError::Malformed)));
        assert!(
            matches!(scan(b"\x72\x05\x08"), Err(DecodeError::Malformed)),
            "truncated message"
        );
        let err = event(tap(MessageType::CLIENT_QUERY, Some(&[1, 2, 3]), 1)).unwrap_err();
        assert!(matches!(err, DecodeError::Dns(crate::dns::DnsError::Short)));
        let err = event(tap(MessageType::AUTH_QUERY, None, 1)).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::UnsupportedType(MessageType::AUTH_QUERY)
        ));
        assert!(!err.loses_a_session_message());
        let no_type = TapFields {
            message: Some(MessageFields::default()),
            ..Default::default()
        };
        let err = Event::from_fields(
            &no_type,
            SourceId(0),
            SenderProfile::CoreDns,
            &crate::dns::key_hasher(),
        )
        .unwrap_err();
        assert!(matches!(err, DecodeError::NoMessageType));
        let err = Event::from_fields(
            &TapFields::default(),
            SourceId(0),
            SenderProfile::CoreDns,
            &crate::dns::key_hasher(),
        )
        .unwrap_err();
        assert!(matches!(err, DecodeError::NoMessage));
    }
}
