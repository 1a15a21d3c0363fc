//! Where the fields a finished session's diagnosis reads lie in an encoded dnstap.Message,
//! recorded by the reader's scan, so that no one scans a stored message again.

use super::wire::{query_message_field, scan_extra, scan_message, varint_at, MessageFields};
use super::{ip, socket, time, Encoded, Nanos, Role, SocketProtocol, MAX_EXTRA};
use std::net::SocketAddr;
use std::ops::Range;

/// The offsets, from the message's start, of what the diagnosis reads of one message: its DNS
/// message, its peer's socket and its times. A shard keeps them in front of the stored message
/// ([`MessageFacts::LEN`] bytes). A message of 64 KiB or more, or one whose facts were not
/// recorded (`Default`: messages handed over as bare bytes), is scanned when read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageFacts {
    /// `RECORDED`, `V6` (the address is 16 bytes, else 4), `QUERIES` (more than one
    /// query_message field), `OWN_EXTRA` (a field 2047 in the message itself).
    flags: u8,
    /// The `SocketProtocol` value, 0 for none.
    protocol: u8,
    /// The DNS message of the role (response_message for responses, else query_message).
    dns_at: u16,
    dns_len: u16,
    /// The peer's address: the client's (query_address) for client messages, the upstream's
    /// (response_address) for upstream ones; `NONE` unless it is 4 or 16 bytes long.
    address_at: u16,
    /// Its port, as `socket` reads it (16 bits, 0 when absent).
    port: u16,
    /// query_time_sec, query_time_nsec, response_time_sec, response_time_nsec.
    times_at: [u16; 4],
    /// The length of the frame's `extra` stored after the message (`Encoded`), 0 for none.
    extra_len: u16,
}

const NONE: u16 = u16::MAX;
const RECORDED: u8 = 1;
const V6: u8 = 2;
const QUERIES: u8 = 4;
const OWN_EXTRA: u8 = 8;

/// What the diagnosis reads of one stored message, for its role: read where the reader's
/// scan found it, or (a message without recorded facts) from a scan now.
#[derive(Debug, Clone, Copy)]
pub struct StoredFields<'a>(Fields<'a>);

#[derive(Debug, Clone, Copy)]
enum Fields<'a> {
    Recorded(MessageFacts, &'a [u8]),
    Scanned(MessageFields<'a>, Role),
}

impl<'a> StoredFields<'a> {
    /// The DNS message of the role (response_message for responses, else query_message).
    pub fn dns(&self) -> Option<&'a [u8]> {
        match self.0 {
            Fields::Recorded(f, b) => part(b, f.dns_at, usize::from(f.dns_len)),
            Fields::Scanned(m, role) if role.is_response() => m.response_message,
            Fields::Scanned(m, _) => m.query_message,
        }
    }

    /// The client's socket for client messages, the upstream's for upstream ones.
    pub fn peer(&self) -> Option<SocketAddr> {
        match self.0 {
            Fields::Recorded(f, b) => {
                let len = if f.flags & V6 != 0 { 16 } else { 4 };
                let ip = ip(part(b, f.address_at, len)?)?;
                Some(SocketAddr::new(ip, f.port))
            }
            Fields::Scanned(m, role) if role.is_client() => socket(m.query_address, m.query_port),
            Fields::Scanned(m, _) => socket(m.response_address, m.response_port),
        }
    }

    pub fn protocol(&self) -> Option<SocketProtocol> {
        match self.0 {
            Fields::Recorded(f, _) => {
                (f.protocol != 0).then(|| SocketProtocol::from(i32::from(f.protocol)))
            }
            Fields::Scanned(m, _) => m.protocol,
        }
    }

    pub fn query_time(&self) -> Option<Nanos> {
        match self.0 {
            Fields::Recorded(f, b) => time(f.sec(b, 0), f.nsec(b, 1)),
            Fields::Scanned(m, _) => time(m.query_time_sec, m.query_time_nsec),
        }
    }

    pub fn response_time(&self) -> Option<Nanos> {
        match self.0 {
            Fields::Recorded(f, b) => time(f.sec(b, 2), f.nsec(b, 3)),
            Fields::Scanned(m, _) => time(m.response_time_sec, m.response_time_nsec),
        }
    }
}

/// `len` bytes at `at` (`NONE`: none).
fn part(b: &[u8], at: u16, len: usize) -> Option<&[u8]> {
    let start = usize::from(at);
    b.get(start..start + len).filter(|_| at != NONE)
}

impl MessageFacts {
    /// Bytes in front of a stored message.
    pub const LEN: usize = 20;

    /// The facts of `message` with the fields `m` the scan found in it (slices of it), to be
    /// stored with the frame's `extra` after it.
    #[inline]
    pub fn of(message: &[u8], m: &MessageFields<'_>, role: Role, extra: &[u8]) -> Self {
        if message.len() >= usize::from(NONE) {
            return Self::default();
        }
        // Every slice is part of `message`, shorter than NONE.
        let base = message.as_ptr() as usize;
        let at = |part: Option<&[u8]>| part.map_or(NONE, |p| (p.as_ptr() as usize - base) as u16);
        let (dns, address, port) = match (role.is_response(), role.is_client()) {
            (true, true) => (m.response_message, m.query_address, m.query_port),
            (false, true) => (m.query_message, m.query_address, m.query_port),
            (true, false) => (m.response_message, m.response_address, m.response_port),
            (false, false) => (m.query_message, m.response_address, m.response_port),
        };
        let (address, v6) = match address.map(<[u8]>::len) {
            Some(4) => (address, 0),
            Some(16) => (address, V6),
            _ => (None, 0),
        };
        let queries = if m.query_message_repeated { QUERIES } else { 0 };
        let own_extra = if m.own_extra { OWN_EXTRA } else { 0 };
        Self {
            flags: RECORDED | v6 | queries | own_extra,
            protocol: m.protocol.map_or(0, |p| p as u8),
            dns_at: at(dns),
            dns_len: dns.map_or(0, |d| d.len() as u16),
            address_at: at(address),
            port: port.unwrap_or(0) as u16,
            // The scan leaves NONE for a time field not there.
            times_at: m.times_at,
            extra_len: extra.len().min(MAX_EXTRA) as u16,
        }
    }

    /// The facts once `removed` (a whole field) has been cut out of the message.
    pub fn without(self, removed: Range<usize>) -> Self {
        let cut = removed.len() as u16;
        let moved = |at: u16| match at as usize {
            _ if at == NONE => NONE,
            a if a >= removed.end => at - cut,
            a if a >= removed.start => NONE,
            _ => at,
        };
        let mut f = self;
        f.dns_at = moved(self.dns_at);
        f.address_at = moved(self.address_at);
        f.times_at = self.times_at.map(moved);
        f
    }

    /// The fields of `stored` (the message these facts are of) for `role`; `None` when
    /// there are no facts and `stored` does not scan.
    pub fn read(self, stored: &[u8], role: Role) -> Option<StoredFields<'_>> {
        Some(StoredFields(if self.flags & RECORDED != 0 {
            Fields::Recorded(self, stored)
        } else {
            Fields::Scanned(scan_message(stored)?, role)
        }))
    }

    /// `dnstap::query_message_field` of `stored`, a query (whose DNS message is its
    /// query_message) these facts are of: where its first query_message field (tag, length
    /// and value) and that value lie. Taken from the facts when the message has one such field
    /// whose length is encoded in the fewest bytes, as senders do; else found by a walk.
    pub fn query_field(self, stored: &[u8]) -> Option<(Range<usize>, Range<usize>)> {
        if self.flags & RECORDED == 0 || self.flags & QUERIES != 0 {
            return query_message_field(stored);
        }
        if self.dns_at == NONE {
            return None;
        }
        let (at, len) = (usize::from(self.dns_at), usize::from(self.dns_len));
        let length_bytes = match len {
            0..=0x7f => 1,
            0x80..=0x3fff => 2,
            _ => 3,
        };
        // A longer length has a byte with its top bit set where the tag (82) would be.
        let start = at.saturating_sub(1 + length_bytes);
        let tag_and_length = stored.get(start..at).filter(|_| at > length_bytes);
        match tag_and_length {
            Some([82, length @ ..]) if varint_at(length) == Some(len as u64) => {
                Some((start..at + len, at..at + len))
            }
            _ => query_message_field(stored),
        }
    }

    /// `dnstap::scan_extra` of `stored`, the message these facts are of: the frame's `extra`
    /// stored after it, taken from its end unless the message has a field 2047 of its own.
    pub fn extra(self, stored: &[u8]) -> Option<&[u8]> {
        if self.flags & RECORDED == 0 || self.flags & OWN_EXTRA != 0 {
            return scan_extra(stored);
        }
        if self.extra_len == 0 {
            return None;
        }
        // Behind the tag and length `Encoded` writes: checked, as a message stored without its
        // `extra` must not lend its tail.
        let start = stored.len().checked_sub(usize::from(self.extra_len))?;
        match stored.get(start.checked_sub(4)?..start) {
            Some(header) if *header == Encoded::extra_header(self.extra_len) => stored.get(start..),
            _ => scan_extra(stored),
        }
    }

    /// The seconds of time `i` (a varint).
    fn sec(self, b: &[u8], i: usize) -> Option<u64> {
        let at = self.times_at[i];
        b.get(usize::from(at)..)
            .filter(|_| at != NONE)
            .and_then(varint_at)
    }

    /// The nanoseconds of time `i` (fixed 32 bits).
    fn nsec(self, b: &[u8], i: usize) -> Option<u32> {
        part(b, self.times_at[i], 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Written in front of a stored message.
    pub fn write_to(&self, out: &mut [u8]) {
        let [a, b, c, d] = self.times_at;
        let words = [
            self.dns_at,
            self.dns_len,
            self.address_at,
            self.port,
            a,
            b,
            c,
            d,
            self.extra_len,
        ];
        out[0] = self.flags;
        out[1] = self.protocol;
        for (o, w) in out[2..Self::LEN].chunks_exact_mut(2).zip(words) {
            o.copy_from_slice(&w.to_le_bytes());
        }
    }

    /// Read back from the front of a stored message.
    pub fn read_from(b: &[u8]) -> Self {
        let w = |i: usize| u16::from_le_bytes([b[2 + 2 * i], b[3 + 2 * i]]);
        Self {
            flags: b[0],
            protocol: b[1],
            dns_at: w(0),
            dns_len: w(1),
            address_at: w(2),
            port: w(3),
            times_at: [w(4), w(5), w(6), w(7)],
            extra_len: w(8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{scan, DnstapMessage, MessageType};
    use super::*;
    use crate::framestream::{Frame, FrameDecoder};

    /// Every accessor, as a comparable tuple.
    type Read<'a> = (
        Option<&'a [u8]>,
        Option<SocketAddr>,
        Option<SocketProtocol>,
        Option<Nanos>,
        Option<Nanos>,
    );

    fn all<'a>(f: &StoredFields<'a>) -> Read<'a> {
        let times = (f.query_time(), f.response_time());
        (f.dns(), f.peer(), f.protocol(), times.0, times.1)
    }

    /// What the facts recorded by the scan read, and what a scan of the message reads.
    fn both(message: &[u8], role: Role) -> (Read<'_>, Read<'_>) {
        let m = super::super::scan_message(message).unwrap();
        let facts = MessageFacts::of(message, &m, role, &[]);
        let mut stored = [0; MessageFacts::LEN];
        facts.write_to(&mut stored);
        let kept = MessageFacts::read_from(&stored);
        assert_eq!(kept, facts);
        let recorded = kept.read(message, role).unwrap();
        let scanned = MessageFacts::default().read(message, role).unwrap();
        (all(&recorded), all(&scanned))
    }

    fn roles() -> [Role; 4] {
        use Role::*;
        [ClientQuery, ClientResponse, UpstreamQuery, UpstreamResponse]
    }

    #[test]
    fn recorded_facts_read_what_a_scan_reads_in_every_capture() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/coredns");
        let (mut messages, mut extras) = (0, 0);
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "fstrm") {
                continue;
            }
            let mut buf = bytes::BytesMut::from(&std::fs::read(&path).unwrap()[..]);
            let decoder = FrameDecoder::new(1 << 20);
            while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                let Frame::Data(frame) = frame else { continue };
                let tap = scan(&frame).unwrap();
                for role in roles() {
                    let (recorded, scanned) = both(tap.message_bytes, role);
                    assert_eq!(recorded, scanned, "{path:?} as {role:?}");
                }
                same_query_field(tap.message_bytes);
                extras += usize::from(same_extra(tap.message_bytes, tap.extra).is_some());
                messages += 1;
            }
        }
        assert!(messages > 10_000, "{messages}");
        assert!(extras > 0, "j_extra's messages carry an extra");
    }

    /// The facts of a query find its query_message field where a walk finds it.
    fn same_query_field(message: &[u8]) {
        let m = super::super::scan_message(message).unwrap();
        let facts = MessageFacts::of(message, &m, Role::ClientQuery, &[]);
        let walked = query_message_field(message);
        assert_eq!(facts.query_field(message), walked);
        assert_eq!(MessageFacts::default().query_field(message), walked);
    }

    /// `message` stored with `extra` after it: the facts find the `extra` a scan finds.
    fn same_extra(message: &[u8], extra: &[u8]) -> Option<Vec<u8>> {
        let m = super::super::scan_message(message).unwrap();
        let facts = MessageFacts::of(message, &m, Role::ClientQuery, extra);
        let encoded = Encoded {
            message,
            extra,
            facts,
        };
        let mut stored = vec![0; encoded.len()];
        encoded.write_to(&mut stored);
        let scanned = scan_extra(&stored);
        assert_eq!(facts.extra(&stored), scanned);
        assert_eq!(MessageFacts::default().extra(&stored), scanned);
        // Stored without its extra, the message lends nothing of its tail.
        assert_eq!(facts.extra(message), scan_extra(message));
        scanned.map(<[u8]>::to_vec)
    }

    #[test]
    fn the_stored_extra_is_found_as_a_scan_finds_it() {
        let fq = forwarder_query(&crate::dns::tests::query(&["a", "test"], 9));
        assert_eq!(same_extra(&fq, b"pod=a").as_deref(), Some(&b"pod=a"[..]));
        assert_eq!(same_extra(&fq, &[]), None);
        let long = [b'x'; 300];
        assert_eq!(same_extra(&fq, &long).map(|e| e.len()), Some(MAX_EXTRA));
        // A field 2047 of the message's own comes first, for the scan and the facts.
        let mut own = fq.clone();
        own.extend_from_slice(&Encoded::extra_header(3));
        own.extend_from_slice(b"own");
        assert_eq!(same_extra(&own, b"pod=a").as_deref(), Some(&b"own"[..]));
    }

    #[test]
    fn the_query_field_is_found_as_a_walk_finds_it_however_encoded() {
        let q = crate::dns::tests::query(&["a", "test"], 9);
        let fq = forwarder_query(&q);
        same_query_field(&fq);
        let long = forwarder_query(&vec![7; 300]);
        same_query_field(&long);
        let (field, _) = query_message_field(&fq).unwrap();
        // The length in two bytes where one does, and a second query_message field.
        let mut padded = fq[..field.start].to_vec();
        padded.extend_from_slice(&[82, 0x80 | q.len() as u8, 0]);
        padded.extend_from_slice(&fq[field.start + 2..]);
        same_query_field(&padded);
        let mut twice = fq.clone();
        twice.extend_from_slice(&fq[field.clone()]);
        twice[field.start + 2] ^= 1; // the two values differ
        same_query_field(&twice);
        same_query_field(&fq[..field.start]);
    }

    fn message(m: DnstapMessage<'_>) -> Vec<u8> {
        use quick_protobuf::{MessageWrite, Writer};
        let mut out = Vec::new();
        m.write_message(&mut Writer::new(&mut out)).unwrap();
        out
    }

    fn forwarder_query(query: &[u8]) -> Vec<u8> {
        use std::borrow::Cow;
        message(DnstapMessage {
            type_pb: MessageType::FORWARDER_QUERY,
            socket_protocol: Some(SocketProtocol::TCP),
            query_address: Some(Cow::Borrowed(&[127, 0, 0, 1])),
            response_address: Some(Cow::Borrowed(&[
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
            ])),
            query_port: Some(5300),
            response_port: Some(70_000),
            query_time_sec: Some(1_700_000_000),
            query_time_nsec: Some(7),
            query_message: Some(Cow::Borrowed(query)),
            response_time_sec: Some(1_700_000_001),
            response_time_nsec: None,
            ..Default::default()
        })
    }

    #[test]
    fn odd_fields_read_the_same_recorded_or_scanned() {
        let q = crate::dns::tests::query(&["a", "test"], 9);
        let fq = forwarder_query(&q);
        for role in roles() {
            let (recorded, scanned) = both(&fq, role);
            assert_eq!(recorded, scanned, "{role:?}");
        }
        let (recorded, _) = both(&fq, Role::UpstreamQuery);
        assert_eq!(
            recorded.1,
            Some("[::1]:4464".parse().unwrap()),
            "port cut to 16 bits"
        );
        assert_eq!(
            recorded.4,
            Some(1_700_000_001_000_000_000),
            "no nanoseconds"
        );
        // Repeated fields: the last one counts, as in the scan; an address of 5 bytes is none.
        let mut twice = fq.clone();
        twice.extend_from_slice(&message(DnstapMessage {
            query_address: Some(std::borrow::Cow::Borrowed(&[1, 2, 3, 4, 5])),
            query_time_sec: Some(1_600_000_000),
            ..Default::default()
        }));
        for role in roles() {
            let (recorded, scanned) = both(&twice, role);
            assert_eq!(recorded, scanned, "{role:?}");
        }
    }

    #[test]
    fn facts_follow_the_fields_when_the_query_is_cut_out() {
        let q = crate::dns::tests::query(&["a", "test"], 9);
        let fq = forwarder_query(&q);
        let (field, _) = super::super::query_message_field(&fq).unwrap();
        let mut cut = fq[..field.start].to_vec();
        cut.extend_from_slice(&fq[field.end..]);
        let m = super::super::scan_message(&fq).unwrap();
        let facts = MessageFacts::of(&fq, &m, Role::UpstreamQuery, &[]).without(field);
        let recorded = all(&facts.read(&cut, Role::UpstreamQuery).unwrap());
        let scanned = all(&MessageFacts::default()
            .read(&cut, Role::UpstreamQuery)
            .unwrap());
        assert_eq!(recorded, scanned);
        assert_eq!(recorded.0, None, "the query went with its field");
        assert!(
            recorded.4.is_some(),
            "the response time moved with the rest"
        );
    }

    #[test]
    fn a_message_of_64_kib_or_more_is_scanned() {
        let big = vec![b'x'; 70_000];
        let fq = forwarder_query(&big);
        let m = super::super::scan_message(&fq).unwrap();
        let facts = MessageFacts::of(&fq, &m, Role::UpstreamQuery, &[]);
        assert_eq!(facts, MessageFacts::default());
        let read = facts.read(&fq, Role::UpstreamQuery).unwrap();
        assert_eq!(read.dns().map(<[u8]>::len), Some(70_000));
        assert_eq!(read.query_time(), Some(1_700_000_000_000_000_007));
        // A frame that does not scan reads as nothing.
        assert!(MessageFacts::default()
            .read(b"\xff", Role::ClientQuery)
            .is_none());
    }
}
