//! The DNS facts correlation needs: header and first question, parsed with NLnet Labs'
//! `domain` straight from the frame's bytes. Full decoding for output lives in `output`.

use domain::base::Message;

/// The header and question of one DNS message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuestionSummary {
    pub id: u16,
    pub is_response: bool,
    /// The 4-bit header rcode (extended rcodes only matter when rendering).
    pub rcode: u8,
    /// Hash of the lowercased wire-format qname: correlation is case-insensitive (0x20).
    pub qname_hash: u64,
    pub qtype: u16,
    pub qclass: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsError {
    /// Shorter than the 12-byte header.
    Short,
    /// No question, or one that does not parse.
    NoQuestion,
}

impl std::fmt::Display for DnsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Short => "shorter than the 12-byte DNS header",
            Self::NoQuestion => "no parseable question",
        })
    }
}

impl std::error::Error for DnsError {}

/// Fixed seeds: every reader thread must hash a name to the same shard.
pub fn key_hasher() -> ahash::RandomState {
    ahash::RandomState::with_seeds(
        0x5eed_d457_a9a1_7c3e,
        0x0123_4567_89ab_cdef,
        0xfeed_face_cafe_beef,
        0x0bad_c0de_dead_10cc,
    )
}

/// Header and first question, straight from the wire. This runs for every message: walking
/// the question by hand costs a fraction of going through `domain`'s parser (instruction
/// counts in docs/benchmarks.md); `domain` still decodes everything that is rendered.
pub fn parse_question(
    wire: &[u8],
    hasher: &ahash::RandomState,
) -> Result<QuestionSummary, DnsError> {
    question_with(wire, hasher, read_qname)
}

/// `parse_question` with the qname read by `read_name` (tests compare the two readers).
#[inline(always)]
fn question_with(
    wire: &[u8],
    hasher: &ahash::RandomState,
    read_name: impl FnOnce(&[u8], &mut [u8; 256]) -> Option<(usize, usize)>,
) -> Result<QuestionSummary, DnsError> {
    if wire.len() < 12 {
        return Err(DnsError::Short);
    }
    if u16::from_be_bytes([wire[4], wire[5]]) == 0 {
        return Err(DnsError::NoQuestion);
    }
    // A wire name is at most 255 bytes: copy it to the stack, lowercase it there in one go
    // (length bytes are below 64, which ASCII lowercasing leaves alone), hash it once.
    let mut name = [0u8; 256];
    let (len, end) = read_name(wire, &mut name).ok_or(DnsError::NoQuestion)?;
    name[..len].make_ascii_lowercase();
    let tail = wire.get(end..end + 4).ok_or(DnsError::NoQuestion)?;
    Ok(QuestionSummary {
        id: u16::from_be_bytes([wire[0], wire[1]]),
        is_response: wire[2] & 0x80 != 0,
        rcode: wire[3] & 0x0f,
        qname_hash: hasher.hash_one(&name[..len]),
        qtype: u16::from_be_bytes([tail[0], tail[1]]),
        qclass: u16::from_be_bytes([tail[2], tail[3]]),
    })
}

/// The qname into `name` as `name_to` reads it. The usual one is not compressed: found by its
/// length bytes and copied in one piece (a copy per label cost more than the rest).
#[inline(always)]
fn read_qname(wire: &[u8], name: &mut [u8; 256]) -> Option<(usize, usize)> {
    match flat_name_end(wire, 12) {
        Some(end) => {
            name[..end - 12].copy_from_slice(&wire[12..end]);
            Some((end - 12, end))
        }
        None => name_to(wire, 12, name),
    }
}

/// Where the name at `pos` ends if it is made of labels alone (no pointer) and `name_to`
/// would take it as it is; None for anything else, which `name_to` then reads.
#[inline]
fn flat_name_end(wire: &[u8], start: usize) -> Option<usize> {
    let mut pos = start;
    loop {
        let l = *wire.get(pos)? as usize;
        if l == 0 {
            return Some(pos + 1);
        }
        // A pointer or a reserved label type, or past `name_to`'s 256 bytes.
        if l >= 0x40 || pos - start + 1 + l >= 256 {
            return None;
        }
        pos += 1 + l;
    }
}

/// Copies the name at `pos` into `out` in wire form, following compression pointers. Returns
/// its length and where the name ends in the message (after the first pointer, if any); None
/// for a malformed name.
fn name_to(wire: &[u8], mut pos: usize, out: &mut [u8; 256]) -> Option<(usize, usize)> {
    let mut len = 0;
    let mut end = None;
    let mut jumps = 0;
    loop {
        let l = *wire.get(pos)? as usize;
        match l & 0xc0 {
            0x00 if l == 0 => {
                out[len] = 0;
                return Some((len + 1, end.unwrap_or(pos + 1)));
            }
            0x00 => {
                let label = wire.get(pos + 1..pos + 1 + l)?;
                if len + 1 + l >= out.len() {
                    return None;
                }
                out[len] = l as u8;
                out[len + 1..len + 1 + l].copy_from_slice(label);
                len += 1 + l;
                pos += 1 + l;
            }
            0xc0 => {
                jumps += 1;
                if jumps > 16 {
                    return None;
                }
                let target = (l & 0x3f) << 8 | *wire.get(pos + 1)? as usize;
                end.get_or_insert(pos + 2);
                pos = target;
            }
            _ => return None,
        }
    }
}

/// The first question of a DNS message: its name in presentation format into `out`
/// (cleared first; `\.`, `\\`, `\"` and `\DDD` escapes, "." for the root), and its type and
/// class. Walked by hand like `parse_question`, for every finished session; `None` without a
/// parseable question.
pub fn question_into(wire: &[u8], out: &mut Vec<u8>) -> Option<(u16, u16)> {
    out.clear();
    if wire.len() < 12 || u16::from_be_bytes([wire[4], wire[5]]) == 0 {
        return None;
    }
    let end = name_into(wire, 12, out)?;
    if out.is_empty() {
        out.push(b'.');
    }
    let tail = wire.get(end..end + 4)?;
    Some((
        u16::from_be_bytes([tail[0], tail[1]]),
        u16::from_be_bytes([tail[2], tail[3]]),
    ))
}

/// Appends the target of the first answer record to `out` when that record is a CNAME (the
/// question and the owner skipped, not parsed): CoreDNS's `autopath` answers with one. `None`,
/// and `out` unchanged, otherwise.
pub fn answer_cname_into(wire: &[u8], out: &mut Vec<u8>) -> Option<()> {
    const CNAME: u16 = 5;
    let qdcount = u16::from_be_bytes([*wire.get(4)?, *wire.get(5)?]);
    let ancount = u16::from_be_bytes([*wire.get(6)?, *wire.get(7)?]);
    if qdcount != 1 || ancount == 0 {
        return None;
    }
    let owner = skip_name(wire, 12)? + 4;
    let rtype_at = skip_name(wire, owner)?;
    if u16::from_be_bytes([*wire.get(rtype_at)?, *wire.get(rtype_at + 1)?]) != CNAME {
        return None;
    }
    let start = out.len();
    let target = name_into(wire, rtype_at + 10, out);
    if target.is_none() {
        out.truncate(start);
    }
    target.map(|_| ())
}

/// Where the name at `pos` ends, without reading it (a pointer ends it).
fn skip_name(wire: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let l = *wire.get(pos)? as usize;
        match l & 0xc0 {
            0x00 if l == 0 => return Some(pos + 1),
            0x00 => pos += 1 + l,
            0xc0 => return wire.get(pos + 1).map(|_| pos + 2),
            _ => return None,
        }
    }
}

/// Appends the name at `pos` in presentation format (no dot for the root), following
/// compression pointers (16 at most). Returns where the name ends in the message; `None` for a
/// malformed name (with part of it appended).
fn name_into(wire: &[u8], mut pos: usize, out: &mut Vec<u8>) -> Option<usize> {
    if let Some(end) = plain_name_into(wire, pos, out) {
        return Some(end);
    }
    let (mut end, mut jumps, mut total) = (None, 0, 0);
    loop {
        let l = *wire.get(pos)? as usize;
        match l & 0xc0 {
            0x00 if l == 0 => return Some(end.unwrap_or(pos + 1)),
            0x00 => {
                total += 1 + l;
                if total > 255 {
                    return None;
                }
                presentation_label(out, wire.get(pos + 1..pos + 1 + l)?);
                pos += 1 + l;
            }
            0xc0 => {
                jumps += 1;
                if jumps > 16 {
                    return None;
                }
                end.get_or_insert(pos + 2);
                pos = (l & 0x3f) << 8 | *wire.get(pos + 1)? as usize;
            }
            _ => return None,
        }
    }
}

/// The common case of [`name_into`], an uncompressed name of plain bytes, in one copy: its
/// length bytes become the dots. `None`, and `out` unchanged, for any other name (the caller
/// then walks it label by label). This runs for every finished session's question.
fn plain_name_into(wire: &[u8], start: usize, out: &mut Vec<u8>) -> Option<usize> {
    let (mut pos, mut labels) = (start, 0u32);
    loop {
        let l = *wire.get(pos)? as usize;
        match l {
            0 => break,
            1..=0x3f => (pos, labels) = (pos + 1 + l, labels + 1),
            _ => return None,
        }
    }
    if pos - start > 255 {
        return None;
    }
    let base = out.len();
    out.extend_from_slice(&wire[start + 1..=pos]);
    let mut at = start;
    while wire[at] != 0 {
        at += 1 + wire[at] as usize;
        out[base + at - start - 1] = b'.';
    }
    // Each dot counts 1, any byte to escape more than a name holds: the sum is the number
    // of labels only when every other byte is plain (no branch per byte).
    let weight = out[base..]
        .iter()
        .fold(0u32, |sum, &b| sum + NAME_BYTE_WEIGHT[usize::from(b)]);
    if weight != labels {
        out.truncate(base);
        return None;
    }
    Some(pos + 1)
}

/// 0 for a byte shown as it is, 1 for `.`, 256 (more than a name's length) for the others.
const NAME_BYTE_WEIGHT: [u32; 256] = {
    let mut weight = [256; 256];
    let mut b = 0;
    while b < 256 {
        if PLAIN[b] {
            weight[b] = 0;
        }
        b += 1;
    }
    weight[b'.' as usize] = 1;
    weight
};

/// The bytes a label shows as they are: printable ASCII but `.`, `\` and `"` (one lookup
/// per byte: this runs for every finished session's question).
const PLAIN: [bool; 256] = {
    let mut plain = [false; 256];
    let mut b = 0x21;
    while b <= 0x7e {
        plain[b] = !matches!(b as u8, b'.' | b'\\' | b'"');
        b += 1;
    }
    plain
};

/// Appends one label and its dot, escaped for presentation format.
fn presentation_label(out: &mut Vec<u8>, label: &[u8]) {
    if label.iter().all(|&b| PLAIN[usize::from(b)]) {
        out.extend_from_slice(label);
        out.push(b'.');
        return;
    }
    for &b in label {
        match b {
            b'.' | b'\\' | b'"' => out.extend_from_slice(&[b'\\', b]),
            0x21..=0x7e => out.push(b),
            _ => out.extend_from_slice(&[b'\\', b'0' + b / 100, b'0' + b / 10 % 10, b'0' + b % 10]),
        }
    }
    out.push(b'.');
}

/// Just the header, for messages whose question is missing (some error responses).
pub fn parse_header(wire: &[u8]) -> Option<(u16, u8)> {
    let msg = Message::from_octets(wire).ok()?;
    Some((msg.header().id(), msg.header().rcode().to_int()))
}

/// IANA mnemonic of an rcode (4-bit or extended).
pub fn rcode_name(rcode: u16) -> std::borrow::Cow<'static, str> {
    let name = match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        11 => "DSOTYPENI",
        16 => "BADVERS",
        17 => "BADKEY",
        18 => "BADTIME",
        19 => "BADMODE",
        20 => "BADNAME",
        21 => "BADALG",
        22 => "BADTRUNC",
        23 => "BADCOOKIE",
        other => return format!("RCODE{other}").into(),
    };
    name.into()
}

/// Mnemonic of a record type ("A", "AAAA", or "TYPE65280").
pub fn rtype_name(rtype: u16) -> String {
    domain::base::Rtype::from_int(rtype).to_string()
}

/// Mnemonic of a class ("IN", or "CLASS3").
pub fn class_name(class: u16) -> String {
    domain::base::iana::Class::from_int(class).to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// www.Example.test A IN query with id 0x1234.
    pub(crate) fn query(name_labels: &[&str], id: u16) -> Vec<u8> {
        let mut v = id.to_be_bytes().to_vec();
        v.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for l in name_labels {
            v.push(l.len() as u8);
            v.extend_from_slice(l.as_bytes());
        }
        v.extend_from_slice(&[0, 0, 1, 0, 1]);
        v
    }

    #[test]
    fn question_parses_and_names_compare_case_insensitively() {
        let h = key_hasher();
        let a = parse_question(&query(&["www", "Example", "TEST"], 0x1234), &h).unwrap();
        let b = parse_question(&query(&["WWW", "example", "test"], 0x1234), &h).unwrap();
        let c = parse_question(&query(&["www", "example", "tes"], 0x1234), &h).unwrap();
        assert_eq!(a.id, 0x1234);
        assert_eq!(
            (a.qtype, a.qclass, a.rcode, a.is_response),
            (1, 1, 0, false)
        );
        assert_eq!(a.qname_hash, b.qname_hash);
        assert_ne!(a.qname_hash, c.qname_hash);
    }

    #[test]
    fn the_question_is_written_into_a_reused_buffer() {
        let mut buf = b"left over".to_vec();
        let q = query(&["www", "Example", "test"], 7);
        assert_eq!(question_into(&q, &mut buf), Some((1, 1)));
        assert_eq!(buf, b"www.Example.test.");
        assert_eq!(question_into(&q[..14], &mut buf), None);
        assert_eq!(question_into(&query(&[], 7), &mut buf), Some((1, 1)));
        assert_eq!(buf, b".");
        // "a" then a pointer to "B." placed after the question; a pointer loop.
        let mut compressed = q[..12].to_vec();
        compressed.extend_from_slice(&[1, b'a', 0xc0, 20, 0, 1, 0, 1, 1, b'B', 0]);
        assert_eq!(question_into(&compressed, &mut buf), Some((1, 1)));
        assert_eq!(buf, b"a.B.");
        let mut looped = q[..12].to_vec();
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(question_into(&looped, &mut buf), None);
    }

    #[test]
    fn names_with_bytes_to_escape_leave_the_one_copy_path() {
        let mut buf = Vec::new();
        for (labels, shown) in [
            (&["a.b", "c"][..], &b"a\\.b.c."[..]),
            (&["x\\y\"", "z"], b"x\\\\y\\\".z."),
            (&["sp ace", "\u{7f}"], b"sp\\032ace.\\127."),
            (&["plain", "name"], b"plain.name."),
        ] {
            let q = query(labels, 1);
            assert_eq!(question_into(&q, &mut buf), Some((1, 1)));
            assert_eq!(buf, shown, "{labels:?}");
        }
        // 128 labels of one byte: the name is 256 bytes, one too many.
        let long = vec!["a"; 128];
        assert_eq!(question_into(&query(&long, 1), &mut buf), None);
        assert_eq!(question_into(&query(&long[1..], 1), &mut buf), Some((1, 1)));
        assert_eq!(buf.len(), 254);
    }

    #[test]
    fn short_and_questionless_messages_are_errors() {
        let h = key_hasher();
        assert_eq!(parse_question(&[0; 5], &h), Err(DnsError::Short));
        let mut no_q = query(&["a"], 1);
        no_q[5] = 0; // qdcount 0
        assert_eq!(parse_question(&no_q, &h), Err(DnsError::NoQuestion));
        let truncated = &query(&["abc"], 1)[..14];
        assert_eq!(parse_question(truncated, &h), Err(DnsError::NoQuestion));
    }

    #[test]
    fn the_first_answer_cname_target_is_read_through_pointers() {
        // Question `Web.Default.svc.` A IN; answer: owner pointer to 12, CNAME to `x\.y` and
        // a pointer to `Default.svc.`.
        let mut wire = vec![0, 1, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        wire.extend_from_slice(b"\x03Web\x07Default\x03svc\x00\x00\x01\x00\x01");
        wire.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 7]);
        wire.extend_from_slice(b"\x03x.y\xc0\x10");
        let mut out = b"kept:".to_vec();
        assert_eq!(answer_cname_into(&wire, &mut out), Some(()));
        assert_eq!(out, b"kept:x\\.y.Default.svc.");
        // An A answer, a cut target and no answer leave `out` as it was.
        let mut a = wire.clone();
        a[36] = 1;
        for w in [&a[..], &wire[..wire.len() - 1], &wire[..34]] {
            let mut out = b"kept:".to_vec();
            assert_eq!(answer_cname_into(w, &mut out), None);
            assert_eq!(out, b"kept:");
        }
    }

    #[test]
    fn compressed_and_malformed_names() {
        let h = key_hasher();
        let plain = parse_question(&query(&["a", "b"], 1), &h).unwrap();
        // "a" then a pointer to "B." placed after the question.
        let mut compressed = query(&["a", "b"], 1)[..12].to_vec();
        compressed.extend_from_slice(&[1, b'a', 0xc0, 20, 0, 1, 0, 1, 1, b'B', 0]);
        let got = parse_question(&compressed, &h).unwrap();
        assert_eq!(
            (got.qname_hash, got.qtype, got.qclass),
            (plain.qname_hash, 1, 1)
        );
        let mut looped = compressed[..12].to_vec();
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_question(&looped, &h), Err(DnsError::NoQuestion));
        let mut bad_label = compressed[..12].to_vec();
        bad_label.extend_from_slice(&[0x41, 0, 0, 1, 0, 1]);
        assert_eq!(parse_question(&bad_label, &h), Err(DnsError::NoQuestion));
    }

    #[test]
    fn the_flat_qname_fast_path_reads_what_the_walk_reads() {
        let h = key_hasher();
        let walk = |w: &[u8]| question_with(w, &h, |w, n| name_to(w, 12, n));
        let mut messages = vec![query(&[], 1), query(&["Www", "ExAmple", "TEST"], 2)];
        // Names around `name_to`'s limit of 256 wire bytes: 63-byte labels and a last one of
        // every length.
        let big = "aB".repeat(32);
        for last in 0..64 {
            let tail = "Z".repeat(last);
            let mut labels = vec![&big[..63]; 3];
            labels.push(&tail);
            messages.push(query(&labels, 3));
        }
        // A pointer after a label, a reserved label type, a label of 64.
        let mut compressed = query(&["a", "b"], 1)[..12].to_vec();
        compressed.extend_from_slice(&[1, b'A', 0xc0, 20, 0, 1, 0, 1, 1, b'B', 0]);
        messages.push(compressed);
        messages.push([&query(&["a"], 1)[..14], &[0x80, 0, 0, 1, 0, 1][..]].concat());
        messages.push(query(&[&"x".repeat(64)], 4));
        let mut compared = 0;
        for m in &messages {
            for cut in 0..=m.len() {
                let w = &m[..cut];
                assert_eq!(parse_question(w, &h), walk(w), "{w:?}");
                compared += parse_question(w, &h).is_ok() as usize;
            }
        }
        assert!(compared > 60, "the names are read, not only rejected");
    }

    #[test]
    fn mnemonics() {
        assert_eq!(rcode_name(3), "NXDOMAIN");
        assert_eq!(rcode_name(4095), "RCODE4095");
        assert_eq!(rtype_name(28), "AAAA");
        assert_eq!(rtype_name(65280), "TYPE65280");
        assert_eq!(class_name(1), "IN");
    }
}
