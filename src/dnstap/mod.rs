//! dnstap payloads: protobuf decoding (zero-copy, quick-protobuf) and the `Event` the
//! correlator consumes.

pub mod pb;

use crate::dns::{self, QuestionSummary};
use quick_protobuf::{BytesReader, MessageRead};

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub use pb::mod_Message::Type as MessageType;
pub use pb::{Dnstap, Message as DnstapMessage, SocketProtocol};

/// Nanoseconds since the Unix epoch, as the sender stamped them.
pub type Nanos = u64;

/// Interned sender identity (the dnstap identity, or the peer address when it is empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId(pub u32);

/// Interns source names (identity, or peer address when the identity is empty) so events
/// carry a small id. Readers cache their lookups; the lock is taken once per new stream.
#[derive(Debug, Default)]
pub struct SourceRegistry {
    inner: std::sync::Mutex<Interned>,
}

/// Name to id, and id (index) to name.
type Interned = (
    hashbrown::HashMap<Vec<u8>, SourceId>,
    Vec<(std::sync::Arc<str>, std::sync::Arc<str>)>,
);

impl SourceRegistry {
    /// The id of a source, and the version it announced (the latest one wins).
    pub fn intern(&self, name: &[u8], version: &[u8]) -> SourceId {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let version: std::sync::Arc<str> = String::from_utf8_lossy(version).into();
        if let Some(&id) = g.0.get(name) {
            g.1[id.0 as usize].1 = version;
            return id;
        }
        let id = SourceId(g.1.len() as u32);
        g.1.push((String::from_utf8_lossy(name).into(), version));
        g.0.insert(name.to_vec(), id);
        id
    }

    /// (identity or peer name, version) of a source.
    pub fn describe(&self, id: SourceId) -> (std::sync::Arc<str>, std::sync::Arc<str>) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.1.get(id.0 as usize)
            .cloned()
            .unwrap_or_else(|| ("".into(), "".into()))
    }
}

/// What a DNS server is known to send; picked from the dnstap version string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenderProfile {
    CoreDns,
    Unbound,
    Bind,
    KnotResolver,
    Dnsdist,
    Unknown,
}

impl SenderProfile {
    pub fn from_version(version: &[u8]) -> Self {
        let starts =
            |p: &[u8]| version.len() >= p.len() && version[..p.len()].eq_ignore_ascii_case(p);
        if starts(b"CoreDNS-") {
            Self::CoreDns
        } else if starts(b"unbound") {
            Self::Unbound
        } else if starts(b"BIND") {
            Self::Bind
        } else if starts(b"Knot Resolver") {
            Self::KnotResolver
        } else if starts(b"dnsdist") {
            Self::Dnsdist
        } else {
            Self::Unknown
        }
    }

    /// CoreDNS copies the client's DNS id into its upstream messages; others use fresh ids.
    pub fn upstream_keeps_client_id(self) -> bool {
        self == Self::CoreDns
    }

    /// Senders that write a session's messages in causal order, so anything unmatched on
    /// arrival is already evidence of loss.
    pub fn writes_in_order(self) -> bool {
        self == Self::CoreDns
    }

    /// How long, at least, a query may wait for its response. BIND answers SERVFAIL 10 s after
    /// a silent upstream, Knot Resolver after up to 16 s: waiting less would split one request
    /// into a Failed session and an orphan response.
    pub fn min_session_wait(self) -> Nanos {
        match self {
            Self::Bind | Self::KnotResolver => 20_000_000_000,
            _ => 0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::CoreDns => "CoreDNS",
            Self::Unbound => "unbound",
            Self::Bind => "BIND",
            Self::KnotResolver => "Knot Resolver",
            Self::Dnsdist => "dnsdist",
            Self::Unknown => "unknown",
        }
    }
}

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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Protobuf,
    NoMessage,
    /// AUTH_*, STUB_*, TOOL_*, UPDATE_*: not part of a client session.
    UnsupportedType(MessageType),
    Dns(dns::DnsError),
}

impl DecodeError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Protobuf => "protobuf",
            Self::NoMessage => "no_message",
            Self::UnsupportedType(_) => "unsupported_message_type",
            Self::Dns(e) => e.reason(),
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Protobuf => f.write_str("undecodable dnstap protobuf"),
            Self::NoMessage => f.write_str("dnstap payload without a message"),
            Self::UnsupportedType(t) => write!(f, "message type {t:?} is not part of a session"),
            Self::Dns(e) => write!(f, "undecodable DNS message ({})", e.reason()),
        }
    }
}

/// Decodes an encoded dnstap.Message (what sessions keep), borrowing from it.
pub fn decode_message(bytes: &[u8]) -> Result<DnstapMessage<'_>, DecodeError> {
    let mut reader = BytesReader::from_bytes(bytes);
    DnstapMessage::from_reader(&mut reader, bytes).map_err(|_| DecodeError::Protobuf)
}

/// Decodes a dnstap frame, borrowing every byte field from it.
pub fn decode(frame: &[u8]) -> Result<Dnstap<'_>, DecodeError> {
    let mut reader = BytesReader::from_bytes(frame);
    Dnstap::from_reader(&mut reader, frame).map_err(|_| DecodeError::Protobuf)
}

/// The fields of a dnstap payload that correlation reads, borrowed from the frame. The hot
/// path scans for these alone (quick-protobuf's reader, no generated structs); rendering uses
/// the full generated `Dnstap` instead.
#[derive(Debug, Default, Clone, Copy)]
pub struct TapFields<'a> {
    pub identity: &'a [u8],
    pub version: &'a [u8],
    pub message: Option<MessageFields<'a>>,
    /// The encoded dnstap.Message: what a session keeps of each message.
    pub message_bytes: &'a [u8],
}

#[derive(Debug, Default, Clone, Copy)]
pub struct MessageFields<'a> {
    pub kind: Option<MessageType>,
    pub protocol: Option<SocketProtocol>,
    pub query_address: Option<&'a [u8]>,
    pub response_address: Option<&'a [u8]>,
    pub query_port: Option<u32>,
    pub response_port: Option<u32>,
    pub query_time_sec: Option<u64>,
    pub query_time_nsec: Option<u32>,
    pub response_time_sec: Option<u64>,
    pub response_time_nsec: Option<u32>,
    pub query_message: Option<&'a [u8]>,
    pub response_message: Option<&'a [u8]>,
}

/// Scans a dnstap payload for the fields correlation needs.
pub fn scan(frame: &[u8]) -> Result<TapFields<'_>, DecodeError> {
    scan_tap(frame).ok_or(DecodeError::Protobuf)
}

fn scan_tap(frame: &[u8]) -> Option<TapFields<'_>> {
    let mut r = Wire(frame);
    let mut t = TapFields::default();
    while !r.0.is_empty() {
        match r.varint()? {
            10 => t.identity = r.bytes()?,
            18 => t.version = r.bytes()?,
            114 => {
                t.message_bytes = r.bytes()?;
                t.message = Some(scan_message(t.message_bytes)?);
            }
            tag => r.skip(tag)?,
        }
    }
    Some(t)
}

/// Tags are `field << 3 | wire type` of dnstap.Message (proto/dnstap.proto).
fn scan_message(b: &[u8]) -> Option<MessageFields<'_>> {
    let mut r = Wire(b);
    let mut m = MessageFields::default();
    while !r.0.is_empty() {
        match r.varint()? {
            8 => m.kind = Some(MessageType::from(r.varint()? as i32)),
            24 => m.protocol = Some(SocketProtocol::from(r.varint()? as i32)),
            34 => m.query_address = Some(r.bytes()?),
            42 => m.response_address = Some(r.bytes()?),
            48 => m.query_port = Some(r.varint()? as u32),
            56 => m.response_port = Some(r.varint()? as u32),
            64 => m.query_time_sec = Some(r.varint()?),
            77 => m.query_time_nsec = Some(r.fixed32()?),
            82 => m.query_message = Some(r.bytes()?),
            96 => m.response_time_sec = Some(r.varint()?),
            109 => m.response_time_nsec = Some(r.fixed32()?),
            114 => m.response_message = Some(r.bytes()?),
            tag => r.skip(tag)?,
        }
    }
    Some(m)
}

/// Where the query_message field (tag, length and value) and its value lie in an encoded
/// dnstap.Message, if it has one.
pub fn query_message_field(
    message: &[u8],
) -> Option<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let mut r = Wire(message);
    while !r.0.is_empty() {
        let start = message.len() - r.0.len();
        let tag = r.varint()?;
        if tag == 82 {
            let value = r.bytes()?;
            let end = message.len() - r.0.len();
            return Some((start..end, end - value.len()..end));
        }
        r.skip(tag)?;
    }
    None
}

/// Protobuf wire primitives over a shrinking slice. quick-protobuf's `BytesReader` does the
/// same with a `Result` per byte; this scan runs for every message, and written this way it
/// costs a fraction (see `cargo bench --bench stages -- protobuf`).
struct Wire<'a>(&'a [u8]);

impl<'a> Wire<'a> {
    #[inline(always)]
    fn varint(&mut self) -> Option<u64> {
        // Tags, lengths, ports and enums are almost always one byte.
        let (&first, rest) = self.0.split_first()?;
        if first < 0x80 {
            self.0 = rest;
            return Some(first as u64);
        }
        let mut v = (first & 0x7f) as u64;
        for (i, &b) in rest.iter().take(9).enumerate() {
            v |= ((b & 0x7f) as u64) << (7 * (i + 1));
            if b < 0x80 {
                self.0 = &rest[i + 1..];
                return Some(v);
            }
        }
        None
    }

    #[inline(always)]
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    #[inline(always)]
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.varint()?;
        self.take(usize::try_from(n).ok()?)
    }

    #[inline(always)]
    fn fixed32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Skips a field this scan does not read (its wire type is in the tag's low bits).
    fn skip(&mut self, tag: u64) -> Option<()> {
        match tag & 7 {
            0 => self.varint().map(drop),
            1 => self.take(8).map(drop),
            2 => self.bytes().map(drop),
            5 => self.take(4).map(drop),
            _ => None,
        }
    }
}

/// One dnstap message, reduced to what correlation needs. The frame rides along (shared, not
/// copied) so the session can render the original message when it is emitted.
#[derive(Debug, Clone)]
pub struct Event {
    pub source: SourceId,
    pub profile: SenderProfile,
    pub role: Role,
    /// Shard routing and bucket key: source, qname, qtype, qclass (and the DNS id where the
    /// sender keeps it on the upstream leg). Without a DNS message: source, client, query_time.
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
    /// Where the encoded dnstap.Message is in the batch that carries this event (identity
    /// and version are the source's, kept once in the registry).
    pub message: MessageSpan,
}

/// Offset and length of an event's encoded message in its batch's byte buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageSpan {
    pub start: u32,
    pub len: u32,
}

impl MessageSpan {
    pub fn of(self, bytes: &[u8]) -> &[u8] {
        bytes
            .get(self.start as usize..(self.start + self.len) as usize)
            .unwrap_or(&[])
    }
}

impl Event {
    /// Extracts an event from a scanned payload.
    pub fn from_fields(
        tap: &TapFields<'_>,
        source: SourceId,
        profile: SenderProfile,
        hasher: &ahash::RandomState,
    ) -> Result<Self, DecodeError> {
        let m = tap.message.as_ref().ok_or(DecodeError::NoMessage)?;
        let kind = m.kind.ok_or(DecodeError::Protobuf)?;
        let role = Role::of(kind).ok_or(DecodeError::UnsupportedType(kind))?;
        let wire = if role.is_response() {
            m.response_message
        } else {
            m.query_message
        };
        let question = match wire {
            Some(w) => Some(dns::parse_question(w, hasher).map_err(DecodeError::Dns)?),
            None => None,
        };
        let query_time = time(m.query_time_sec, m.query_time_nsec);
        let response_time = time(m.response_time_sec, m.response_time_nsec);
        let is_client = matches!(role, Role::ClientQuery | Role::ClientResponse);
        let query_socket = socket(m.query_address, m.query_port);
        let client = if is_client { query_socket } else { None };
        let upstream = if is_client {
            None
        } else {
            socket(m.response_address, m.response_port)
        };
        let mut h = hasher.build_hasher();
        source.hash(&mut h);
        match &question {
            Some(q) => {
                (q.qname_hash, q.qtype, q.qclass).hash(&mut h);
                if profile.upstream_keeps_client_id() {
                    q.id.hash(&mut h);
                }
            }
            None => (client, query_time).hash(&mut h),
        }
        Ok(Event {
            source,
            profile,
            role,
            key: h.finish(),
            question,
            query_time,
            response_time,
            client,
            upstream,
            protocol: m.protocol,
            watermark: 0,
            loss_seq: 0,
            drops_before: 0,
            message: MessageSpan::default(),
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

pub fn time(sec: Option<u64>, nsec: Option<u32>) -> Option<Nanos> {
    let sec = sec?;
    Some(
        sec.saturating_mul(1_000_000_000)
            .saturating_add(nsec.unwrap_or(0) as u64),
    )
}

/// An address field as a socket; IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes plain IPv4.
pub fn socket(addr: Option<&[u8]>, port: Option<u32>) -> Option<SocketAddr> {
    Some(SocketAddr::new(ip(addr?)?, port.unwrap_or(0) as u16))
}

pub fn ip(addr: &[u8]) -> Option<IpAddr> {
    match addr.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            addr[0], addr[1], addr[2], addr[3],
        ))),
        16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(addr);
            let v6 = Ipv6Addr::from(b);
            Some(match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_ipv4_is_normalised_and_other_lengths_are_rejected() {
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(ip(&mapped), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(ip(&[10, 0, 0, 2]), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(
            ip(&Ipv6Addr::LOCALHOST.octets()),
            Some("::1".parse().unwrap())
        );
        assert_eq!(ip(&[1, 2, 3]), None);
    }

    #[test]
    fn profiles_come_from_version_strings() {
        for (version, profile) in [
            (&b"CoreDNS-1.10.1"[..], SenderProfile::CoreDns),
            (b"unbound 1.17.1", SenderProfile::Unbound),
            (b"BIND 9.18.49", SenderProfile::Bind),
            (b"Knot Resolver 5.6.0", SenderProfile::KnotResolver),
            (b"dnsdist 1.7.3", SenderProfile::Dnsdist),
            (b"", SenderProfile::Unknown),
        ] {
            assert_eq!(SenderProfile::from_version(version), profile);
        }
    }

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

    fn event(frame: Vec<u8>) -> Result<Event, DecodeError> {
        assert_eq!(decode(&frame)?.identity.as_deref(), Some(&b"pod-1"[..]));
        let tap = scan(&frame)?;
        assert_eq!(tap.identity, b"pod-1");
        Event::from_fields(
            &tap,
            SourceId(3),
            SenderProfile::CoreDns,
            &crate::dns::key_hasher(),
        )
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
        assert_eq!(decode(b"\xff\xff\xff").unwrap_err(), DecodeError::Protobuf);
        assert_eq!(scan(b"\xff\xff\xff").unwrap_err(), DecodeError::Protobuf);
        assert_eq!(
            scan(b"\x72\x05\x08").unwrap_err(),
            DecodeError::Protobuf,
            "truncated message"
        );
        let err = event(tap(MessageType::CLIENT_QUERY, Some(&[1, 2, 3]), 1)).unwrap_err();
        assert_eq!(err, DecodeError::Dns(crate::dns::DnsError::Short));
        let err = event(tap(MessageType::AUTH_QUERY, None, 1)).unwrap_err();
        assert_eq!(err, DecodeError::UnsupportedType(MessageType::AUTH_QUERY));
    }

    #[test]
    fn times_combine_seconds_and_nanoseconds() {
        assert_eq!(time(Some(2), Some(5)), Some(2_000_000_005));
        assert_eq!(time(None, Some(5)), None);
        assert_eq!(time(Some(1), None), Some(1_000_000_000));
    }
}
