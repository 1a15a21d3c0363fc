//! The hot path's protobuf scan: only the fields correlation reads, borrowed from the frame,
//! with a hand-written wire walk instead of the generated decoder.

use super::{pb, DecodeError, MessageFacts, MessageType, SocketProtocol};

/// The fields of a dnstap payload that correlation reads, borrowed from the frame. The hot
/// path scans for these alone (no generated structs); rendering uses the full generated
/// `Dnstap` instead, and `tests/scan_matches_decode.rs` proves both read the same.
#[derive(Debug, Default, Clone, Copy)]
pub struct TapFields<'a> {
    pub identity: &'a [u8],
    pub version: &'a [u8],
    pub message: Option<MessageFields<'a>>,
    /// The encoded dnstap.Message: what a session keeps of each message.
    pub message_bytes: &'a [u8],
    /// The Dnstap frame's `extra` (CoreDNS ≥ 1.11: `extra "..."` in the dnstap block).
    pub extra: &'a [u8],
}

#[derive(Debug, Clone, Copy)]
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
    /// The message has more than one query_message field (the last one counts).
    pub query_message_repeated: bool,
    /// The message has a field 2047 of its own, which `scan_extra` would find before the
    /// `extra` stored after it.
    pub own_extra: bool,
    /// Where the values of query_time_sec, query_time_nsec, response_time_sec and
    /// response_time_nsec start (offsets, meaningful below 64 KiB; `u16::MAX` for a field not
    /// there): `MessageFacts`.
    pub times_at: [u16; 4],
}

impl Default for MessageFields<'_> {
    fn default() -> Self {
        Self {
            kind: None,
            protocol: None,
            query_address: None,
            response_address: None,
            query_port: None,
            response_port: None,
            query_time_sec: None,
            query_time_nsec: None,
            response_time_sec: None,
            response_time_nsec: None,
            query_message: None,
            response_message: None,
            query_message_repeated: false,
            own_extra: false,
            times_at: [u16::MAX; 4],
        }
    }
}

/// The field a stored message carries its frame's `extra` in: field 2047 (length-delimited)
/// of dnstap.Message, which the schema does not use, so the generated decoder skips it.
const EXTRA_TAG: u64 = 2047 << 3 | 2;
/// At most this much of `extra` is kept with a message (a sender controls it).
pub const MAX_EXTRA: usize = 256;

/// An encoded dnstap.Message as a session stores it: the message, then its frame's `extra`
/// (cut to [`MAX_EXTRA`] bytes) as field 2047, so that it travels with the message into the
/// session's store without an allocation of its own; [`scan_extra`] reads it back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Encoded<'a> {
    pub message: &'a [u8],
    /// Empty: the frame had none.
    pub extra: &'a [u8],
    /// Where the diagnosis finds its fields in `message` (none recorded: it scans them).
    pub facts: MessageFacts,
}

impl<'a> From<&'a [u8]> for Encoded<'a> {
    fn from(message: &'a [u8]) -> Self {
        Self {
            message,
            extra: &[],
            facts: MessageFacts::default(),
        }
    }
}

impl<'a, const N: usize> From<&'a [u8; N]> for Encoded<'a> {
    fn from(message: &'a [u8; N]) -> Self {
        Self {
            message,
            extra: &[],
            facts: MessageFacts::default(),
        }
    }
}

impl<'a> From<&'a Vec<u8>> for Encoded<'a> {
    fn from(message: &'a Vec<u8>) -> Self {
        Self {
            message,
            extra: &[],
            facts: MessageFacts::default(),
        }
    }
}

impl Encoded<'_> {
    fn extra(&self) -> &[u8] {
        &self.extra[..self.extra.len().min(MAX_EXTRA)]
    }

    /// Its length as stored.
    pub fn len(&self) -> usize {
        match self.extra().len() {
            0 => self.message.len(),
            n => self.message.len() + EXTRA_HEADER + n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes it into `out`, which is [`len`](Self::len) bytes long.
    pub fn write_to(&self, out: &mut [u8]) {
        let (message, rest) = out.split_at_mut(self.message.len());
        message.copy_from_slice(self.message);
        let extra = self.extra();
        if extra.is_empty() {
            return;
        }
        let (header, value) = rest.split_at_mut(EXTRA_HEADER);
        header.copy_from_slice(&Self::extra_header(extra.len() as u16));
        value.copy_from_slice(extra);
    }

    /// The tag and length in front of a stored `extra` of `len` bytes: tag 16378 and a length
    /// below 2^14, two varint bytes each.
    pub(super) fn extra_header(len: u16) -> [u8; EXTRA_HEADER] {
        [
            (EXTRA_TAG as u8) | 0x80,
            (EXTRA_TAG >> 7) as u8,
            (len as u8) | 0x80,
            (len >> 7) as u8,
        ]
    }
}

/// The tag and length in front of a stored `extra`.
const EXTRA_HEADER: usize = 4;

/// Scans a dnstap payload for the fields correlation needs.
#[inline]
pub fn scan(frame: &[u8]) -> Result<TapFields<'_>, DecodeError> {
    let mut t = TapFields::default();
    scan_into(frame, &mut t)?;
    Ok(t)
}

/// [`scan`] into a default `t` the caller holds: the reader's loop, where returning the
/// fields cost a copy of them (57 instructions a message).
#[inline]
pub fn scan_into<'a>(frame: &'a [u8], t: &mut TapFields<'a>) -> Result<(), DecodeError> {
    scan_tap(frame, t).ok_or(DecodeError::Malformed)
}

/// Fills `t` in place: the fields are large enough (about 200 bytes) that moving them out of
/// nested `Option`s cost more than the walk itself.
fn scan_tap<'a>(frame: &'a [u8], t: &mut TapFields<'a>) -> Option<()> {
    let mut r = Wire(frame);
    // The usual order first (golang-dnstap's, by field number; the load generator puts `type`
    // before the message), then whatever is left field by field.
    in_order!(r, [10, 18, 26, 120, 114, 120], |tag| tap_field(
        tag, &mut r, t
    ));
    while !r.0.is_empty() {
        tap_field(r.tag()?, &mut r, t)?;
    }
    Some(())
}

/// Reads the usual fields in their usual order as long as they come so: a field whose tag
/// (one byte) is the next one listed is read by `$read` with `$t` bound to its tag, as the
/// field-by-field walk that follows reads it; a field listed but absent is passed over. The
/// walk reads the rest. (Written out per tag rather than looped over, so that each read is
/// compiled for its constant tag.)
macro_rules! in_order {
    ($r:ident, [$($tag:literal),*], |$t:ident| $read:expr) => {
        $(
            if $r.next_is($tag) {
                let $t = $tag;
                $read?;
            }
        )*
    };
}
use in_order;

/// Reads the value of the Dnstap field `tag` into `t`.
#[inline(always)]
fn tap_field<'a>(tag: u64, r: &mut Wire<'a>, t: &mut TapFields<'a>) -> Option<()> {
    match tag {
        10 => t.identity = r.bytes()?,
        18 => t.version = r.bytes()?,
        26 => t.extra = r.bytes()?,
        // Dnstap.type, in every frame: skipped here rather than in the outlined `skip`.
        120 => {
            r.varint()?;
        }
        114 => {
            t.message_bytes = r.bytes()?;
            let m = t.message.insert(MessageFields::default());
            scan_message_into(t.message_bytes, m)?;
        }
        tag => r.skip(tag)?,
    }
    Some(())
}

/// Scans an encoded dnstap.Message (what a session stores) for the same fields; `None` when
/// it does not parse.
pub fn scan_message(b: &[u8]) -> Option<MessageFields<'_>> {
    let mut m = MessageFields::default();
    scan_message_into(b, &mut m)?;
    Some(m)
}

/// Tags are `field << 3 | wire type` of dnstap.Message (proto/dnstap.proto). Every sender
/// seen (golang-dnstap, the load generator) writes the fields in field number order.
#[inline]
fn scan_message_into<'a>(b: &'a [u8], m: &mut MessageFields<'a>) -> Option<()> {
    let mut r = Wire(b);
    let len = b.len();
    in_order!(
        r,
        [8, 16, 24, 34, 42, 48, 56, 64, 77, 82, 96, 109, 114],
        |tag| message_field(tag, &mut r, m, len)
    );
    while !r.0.is_empty() {
        message_field(r.tag()?, &mut r, m, len)?;
    }
    Some(())
}

/// Reads the value of the dnstap.Message field `tag` into `m`; the message is `len` bytes
/// long (where a time's value starts is recorded for `MessageFacts`).
#[inline(always)]
fn message_field<'a>(
    tag: u64,
    r: &mut Wire<'a>,
    m: &mut MessageFields<'a>,
    len: usize,
) -> Option<()> {
    let at = |r: &Wire<'_>| (len - r.0.len()) as u16;
    match tag {
        8 => m.kind = Some(MessageType::from(r.varint()? as i32)),
        // socket_family, in nearly every message: skipped without the outlined `skip`.
        16 => {
            r.varint()?;
        }
        24 => m.protocol = Some(SocketProtocol::from(r.varint()? as i32)),
        34 => m.query_address = Some(r.bytes()?),
        42 => m.response_address = Some(r.bytes()?),
        48 => m.query_port = Some(r.varint()? as u32),
        56 => m.response_port = Some(r.varint()? as u32),
        64 => {
            m.times_at[0] = at(r);
            m.query_time_sec = Some(r.varint()?);
        }
        77 => {
            m.times_at[1] = at(r);
            m.query_time_nsec = Some(r.fixed32()?);
        }
        82 => {
            m.query_message_repeated |= m.query_message.is_some();
            m.query_message = Some(r.bytes()?);
        }
        96 => {
            m.times_at[2] = at(r);
            m.response_time_sec = Some(r.varint()?);
        }
        109 => {
            m.times_at[3] = at(r);
            m.response_time_nsec = Some(r.fixed32()?);
        }
        114 => m.response_message = Some(r.bytes()?),
        tag => {
            m.own_extra |= tag == EXTRA_TAG;
            r.skip(tag)?
        }
    }
    Some(())
}

/// The varint `b` starts with.
pub(super) fn varint_at(b: &[u8]) -> Option<u64> {
    Wire(b).varint()
}

/// The frame's `extra` stored after a message ([`Encoded`]), if any.
/// Apart from [`scan_message`], so that the hot path's fields stay small.
pub fn scan_extra(message: &[u8]) -> Option<&[u8]> {
    let mut r = Wire(message);
    while !r.0.is_empty() {
        match r.tag()? {
            EXTRA_TAG => return r.bytes(),
            tag => r.skip(tag)?,
        }
    }
    None
}

/// Where the query_message field (tag, length and value) and its value lie in an encoded
/// dnstap.Message, if it has one.
pub fn query_message_field(
    message: &[u8],
) -> Option<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let mut r = Wire(message);
    while !r.0.is_empty() {
        let start = message.len() - r.0.len();
        let tag = r.tag()?;
        if tag == 82 {
            let value = r.bytes()?;
            let end = message.len() - r.0.len();
            return Some((start..end, end - value.len()..end));
        }
        r.skip(tag)?;
    }
    None
}

/// `decode_message`'s fast path: the whole message (as the generated decoder reads it) from a
/// walk of the fields senders send, for rendering (the generated decoder's generic reader cost
/// as much as the rest of a message's line but its DNS). `None` for anything else, which the
/// generated decoder then reads: policy and http_protocol fields, unknown fields (but the
/// stored frame's `extra`, which it skips too), other wire types, truncated fields, varints
/// longer than both read alike (4 bytes for 32 bits, 9 for 64).
pub(crate) fn walk_message(bytes: &[u8]) -> Option<pb::Message<'_>> {
    let mut m = pb::Message::default();
    walk_message_into(bytes, &mut m).map(|()| m)
}

/// [`walk_message`] into `m` (a default message), which a renderer keeps in place; on `None`
/// `m` holds part of the message.
pub(crate) fn walk_message_into<'a>(bytes: &'a [u8], m: &mut pb::Message<'a>) -> Option<()> {
    use std::borrow::Cow::Borrowed;
    let mut r = Wire(bytes);
    while !r.0.is_empty() {
        let tag = r.short_varint(4)?;
        match tag {
            8 | 16 | 24 => {
                let value = r.short_varint(4)? as i32;
                match tag {
                    8 => m.type_pb = value.into(),
                    16 => m.socket_family = Some(value.into()),
                    _ => m.socket_protocol = Some(value.into()),
                }
            }
            48 => m.query_port = Some(r.short_varint(4)? as u32),
            56 => m.response_port = Some(r.short_varint(4)? as u32),
            64 => m.query_time_sec = Some(r.short_varint(9)?),
            96 => m.response_time_sec = Some(r.short_varint(9)?),
            77 => m.query_time_nsec = Some(r.fixed32()?),
            109 => m.response_time_nsec = Some(r.fixed32()?),
            34 | 42 | 82 | 90 | 114 | EXTRA_TAG => {
                let len = r.short_varint(4)? as usize;
                let value = Some(Borrowed(r.take(len)?));
                match tag {
                    34 => m.query_address = value,
                    42 => m.response_address = value,
                    82 => m.query_message = value,
                    90 => m.query_zone = value,
                    114 => m.response_message = value,
                    _ => {}
                }
            }
            _ => return None,
        }
    }
    Some(())
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

    /// A field's tag. quick-protobuf, which renders the kept messages, reads tags as 32 bits
    /// and drops the higher ones, so a wider tag would be one field to it and an unknown one
    /// here: reject it (no valid field number needs more than 32 bits).
    /// A varint of at most `max_len` bytes: a longer one is left to a reader of its own.
    fn short_varint(&mut self, max_len: usize) -> Option<u64> {
        let before = self.0.len();
        let v = self.varint()?;
        (before - self.0.len() <= max_len).then_some(v)
    }

    #[inline(always)]
    fn tag(&mut self) -> Option<u64> {
        self.varint().filter(|&t| t <= u64::from(u32::MAX))
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

    /// Whether the next field's tag is `tag`, a tag of one byte (which a tag read as a
    /// varint is exactly when its first byte is); if so, the tag is read.
    #[inline(always)]
    fn next_is(&mut self, tag: u8) -> bool {
        match self.0.split_first() {
            Some((&first, rest)) if first == tag => {
                self.0 = rest;
                true
            }
            _ => false,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_and_unknown_wire_types_are_malformed_not_panics() {
        assert!(matches!(scan(b"\xff\xff\xff"), Err(DecodeError::Malformed)));
        assert!(
            matches!(scan(b"\x72\x05\x08"), Err(DecodeError::Malformed)),
            "truncated message"
        );
        assert!(
            matches!(scan(b"\x0b"), Err(DecodeError::Malformed)),
            "wire type 3"
        );
        assert!(scan(b"").unwrap().message.is_none());
    }

    #[test]
    fn a_tag_over_32_bits_is_malformed_as_the_renderer_would_misread_it() {
        // `10 | 1 << 35`: quick-protobuf keeps the low 32 bits, so to the renderer it is an
        // identity ("b") that the scan would otherwise skip as an unknown field.
        let frame = b"\x0a\x01a\x8a\x80\x80\x80\x80\x01\x01b";
        let full = super::super::decode(frame).unwrap();
        assert_eq!(full.identity.as_deref(), Some(&b"b"[..]));
        assert!(matches!(scan(frame), Err(DecodeError::Malformed)));
        // The same inside the message (a wide query_message tag), and when locating it.
        let message = b"\x08\x05\xd2\x80\x80\x80\x80\x01\x01x";
        assert!(scan_message(message).is_none());
        assert_eq!(query_message_field(message), None);
        // The widest valid tag is still skipped as an unknown field.
        assert!(scan(b"\x0a\x01a\xf8\xff\xff\xff\x0f\x00").is_ok());
    }

    /// The fields of a dnstap.Message the scan reads, in field number order as golang-dnstap
    /// writes them, one per element.
    fn message_fields() -> Vec<Vec<u8>> {
        vec![
            vec![8, 5],
            vec![16, 1],
            vec![24, 1],
            vec![34, 4, 127, 0, 0, 1],
            vec![42, 4, 10, 0, 0, 2],
            vec![48, 0xd2, 0xfe, 0x03],
            vec![56, 53],
            vec![64, 0x80, 0xa8, 0xd6, 0xb9, 0x06],
            vec![77, 1, 2, 3, 4],
            vec![82, 3, b'q', b'r', b'y'],
            vec![96, 0x81, 0xa8, 0xd6, 0xb9, 0x06],
            vec![109, 5, 6, 7, 8],
            vec![114, 2, b'o', b'k'],
        ]
    }

    /// The fields in order, and each one left out, doubled, moved to the end, and an unknown
    /// field or a field 2047 put in front of it.
    fn field_orders(fields: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut out = vec![fields.concat()];
        for i in 0..fields.len() {
            let mut f = fields.to_vec();
            f.remove(i);
            out.push(f.concat());
            let mut f = fields.to_vec();
            f.insert(i, fields[i].clone());
            out.push(f.concat());
            let mut f = fields.to_vec();
            let moved = f.remove(i);
            f.push(moved);
            out.push(f.concat());
            for extra in [&[0x58, 7][..], &[0xfa, 0x7f, 1, b'x'][..]] {
                let mut f = fields.to_vec();
                f.insert(i, extra.to_vec());
                out.push(f.concat());
            }
        }
        out
    }

    /// Each of `messages`, cut at every length and with every byte changed to a few values.
    fn damaged(messages: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for m in messages {
            out.extend((0..=m.len()).map(|n| m[..n].to_vec()));
            for i in 0..m.len() {
                // A tag byte with its continuation bit set starts a longer tag.
                for b in [0, 0x08, 0x72, 0x80, 0xff, m[i] | 0x80] {
                    let mut d = m.clone();
                    d[i] = b;
                    out.push(d);
                }
            }
        }
        out
    }

    /// A dnstap.Message read by the field-by-field walk alone: the fast path's reference.
    fn message_by_fields(b: &[u8]) -> Option<MessageFields<'_>> {
        let (mut r, mut m) = (Wire(b), MessageFields::default());
        while !r.0.is_empty() {
            message_field(r.tag()?, &mut r, &mut m, b.len())?;
        }
        Some(m)
    }

    /// A Dnstap frame read by the field-by-field walk alone (its message by `scan_message`).
    fn tap_by_fields(frame: &[u8]) -> Option<TapFields<'_>> {
        let (mut r, mut t) = (Wire(frame), TapFields::default());
        while !r.0.is_empty() {
            tap_field(r.tag()?, &mut r, &mut t)?;
        }
        Some(t)
    }

    #[test]
    fn the_ordered_fast_paths_read_what_the_field_walks_read() {
        let messages = damaged(&field_orders(&message_fields()));
        let mut parsed = 0;
        for b in &messages {
            let fast = scan_message(b).map(|m| format!("{m:?}"));
            let walked = message_by_fields(b).map(|m| format!("{m:?}"));
            assert_eq!(fast, walked, "{b:?}");
            parsed += fast.is_some() as usize;
        }
        assert!(parsed > 1000, "most messages are read, not only rejected");
        // Frames: identity, version, extra, type and message in golang-dnstap's order, in the
        // load generator's (type before the message) and the variations above.
        let message = message_fields().concat();
        let mut tap = vec![
            vec![10, 3, b'n', b's', b'1'],
            vec![18, 2, b'v', b'1'],
            vec![26, 1, b'e'],
            [&[114, message.len() as u8][..], &message].concat(),
            vec![120, 1],
        ];
        let mut frames = field_orders(&tap);
        tap.swap(3, 4);
        frames.extend(field_orders(&tap));
        let mut parsed = 0;
        for f in &damaged(&frames) {
            let fast = scan(f).ok().map(|t| format!("{t:?}"));
            let walked = tap_by_fields(f).map(|t| format!("{t:?}"));
            assert_eq!(fast, walked, "{f:?}");
            parsed += fast.is_some() as usize;
        }
        assert!(parsed > 1000, "most frames are read, not only rejected");
    }

    #[test]
    fn query_message_field_finds_tag_length_and_value() {
        // type CLIENT_QUERY, then query_message "abc".
        let m = b"\x08\x05\x52\x03abc";
        assert_eq!(query_message_field(m), Some((2..7, 4..7)));
        assert_eq!(query_message_field(b"\x08\x05"), None);
        assert_eq!(
            query_message_field(b"\x52\x09ab"),
            None,
            "longer than the message"
        );
    }
}
