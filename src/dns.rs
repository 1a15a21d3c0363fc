//! The DNS facts correlation needs: header and first question, parsed with NLnet Labs'
//! `domain` straight from the frame's bytes. Full decoding for output lives in `output`.

use domain::base::{Message, ParsedName};
use std::hash::{BuildHasher, Hasher};

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

impl DnsError {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Short => "dns_short",
            Self::NoQuestion => "dns_no_question",
        }
    }
}

/// Fixed seeds: every reader thread must hash a name to the same shard.
pub fn key_hasher() -> ahash::RandomState {
    ahash::RandomState::with_seeds(
        0x5eed_d457_a9a1_7c3e,
        0x0123_4567_89ab_cdef,
        0xfeed_face_cafe_beef,
        0x0bad_c0de_dead_10cc,
    )
}

pub fn parse_question(
    wire: &[u8],
    hasher: &ahash::RandomState,
) -> Result<QuestionSummary, DnsError> {
    let msg = Message::from_octets(wire).map_err(|_| DnsError::Short)?;
    let header = msg.header();
    let q = msg.first_question().ok_or(DnsError::NoQuestion)?;
    Ok(QuestionSummary {
        id: header.id(),
        is_response: header.qr(),
        rcode: header.rcode().to_int(),
        qname_hash: hash_name_lowercase(q.qname(), hasher),
        qtype: q.qtype().to_int(),
        qclass: q.qclass().to_int(),
    })
}

/// Just the header, for messages whose question is missing (some error responses).
pub fn parse_header(wire: &[u8]) -> Option<(u16, u8)> {
    let msg = Message::from_octets(wire).ok()?;
    Some((msg.header().id(), msg.header().rcode().to_int()))
}

fn hash_name_lowercase(name: &ParsedName<&[u8]>, hasher: &ahash::RandomState) -> u64 {
    // A wire name is at most 255 bytes: lowercase it on the stack, hash it once.
    let mut buf = [0u8; 256];
    let mut len = 0;
    for label in name.iter() {
        let bytes = label.as_slice();
        let end = (len + 1 + bytes.len()).min(buf.len());
        buf[len] = bytes.len() as u8;
        for (dst, src) in buf[len + 1..end].iter_mut().zip(bytes) {
            *dst = src.to_ascii_lowercase();
        }
        len = end;
    }
    let mut h = hasher.build_hasher();
    h.write(&buf[..len]);
    h.finish()
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
    fn mnemonics() {
        assert_eq!(rcode_name(3), "NXDOMAIN");
        assert_eq!(rcode_name(4095), "RCODE4095");
        assert_eq!(rtype_name(28), "AAAA");
        assert_eq!(rtype_name(65280), "TYPE65280");
        assert_eq!(class_name(1), "IN");
    }
}
