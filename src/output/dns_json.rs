//! The whole DNS message as JSON (all sections, typed record data, EDNS), decoded with
//! `domain` only when a session is rendered.

use super::json::Json;
use crate::dns::rcode_name;
use domain::base::iana::{Opcode, Rtype};
use domain::base::opt::{Opt, OptRecord, UnknownOptData};
use domain::base::ToName;
use domain::base::{Message, ParsedName, ParsedRecord, RecordSection};
use domain::rdata::AllRecordData;

pub fn write_dns(j: &mut Json<'_>, wire: &[u8]) {
    let Ok(msg) = Message::from_octets(wire) else {
        j.begin_object();
        j.field_str("error", "shorter than a DNS header");
        j.field_str("hex", &hex(wire));
        j.end_object();
        return;
    };
    let h = msg.header();
    j.begin_object();
    j.field_uint("id", h.id() as u64);
    j.key("opcode");
    write_opcode(j, h.opcode());
    // One walk to the sections, and the OPT record found from it: `Message::opt` would walk
    // the question, answer and authority sections again to find the additional one.
    let sections = msg.sections().map(|(_, an, ns, ar)| [an, ns, ar]);
    let opt = match sections.as_ref().map(|s| s[2].limit_to::<Opt<_>>().next()) {
        Ok(Some(Ok(rr))) => Some(OptRecord::from(rr)),
        _ => None,
    };
    let rcode = match &opt {
        Some(opt) => opt.rcode(h).to_int(),
        None => h.rcode().to_int() as u16,
    };
    j.field_str("rcode", &rcode_name(rcode));
    j.key("flags");
    j.begin_array();
    for (set, name) in [
        (h.qr(), "qr"),
        (h.aa(), "aa"),
        (h.tc(), "tc"),
        (h.rd(), "rd"),
        (h.ra(), "ra"),
        (h.ad(), "ad"),
        (h.cd(), "cd"),
    ] {
        if set {
            j.name(name);
        }
    }
    j.end_array();
    j.key("question");
    j.begin_array();
    let mut error = None;
    for q in msg.question() {
        match q {
            Ok(q) => {
                j.begin_object();
                j.key("name");
                write_name(j, q.qname());
                j.key("type");
                mnemonic(j, q.qtype().to_mnemonic_str(), q.qtype());
                j.key("class");
                mnemonic(j, q.qclass().to_mnemonic_str(), q.qclass());
                j.end_object();
            }
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    j.end_array();
    for (i, name) in ["answer", "authority", "additional"]
        .into_iter()
        .enumerate()
    {
        j.key(name);
        j.begin_array();
        match &sections {
            Ok(s) => {
                if let Err(e) = write_records(j, s[i]) {
                    error.get_or_insert(e);
                }
            }
            Err(e) => {
                error.get_or_insert(e.to_string());
            }
        }
        j.end_array();
    }
    if let Some(opt) = opt {
        j.key("edns");
        j.begin_object();
        j.field_uint("version", opt.version() as u64);
        j.field_uint("udp_size", opt.udp_payload_size() as u64);
        j.key("do");
        j.bool(opt.dnssec_ok());
        j.key("options");
        j.begin_array();
        write_options(j, opt.opt());
        j.end_array();
        j.end_object();
    }
    if let Some(e) = error {
        j.field_str("error", &e);
    }
    j.end_object();
}

/// The opcode as `domain` displays it (`QUERY(0)`, or the number alone), without the
/// formatting machinery.
fn write_opcode(j: &mut Json<'_>, opcode: Opcode) {
    j.string_with(|out| {
        let mut number = itoa::Buffer::new();
        let number = number.format(opcode.to_int()).as_bytes();
        match opcode.to_mnemonic_str() {
            Some(m) => {
                out.extend_from_slice(m.as_bytes());
                out.push(b'(');
                out.extend_from_slice(number);
                out.push(b')');
            }
            None => out.extend_from_slice(number),
        }
    });
}

/// An IANA code by its mnemonic, written as it is (`domain`'s mnemonics are plain ASCII
/// letters, digits and dashes), else as `domain` displays it (a number, `TYPE65280`): the same
/// text as `Display` without the formatting machinery.
fn mnemonic(j: &mut Json<'_>, name: Option<&'static str>, code: impl std::fmt::Display) {
    match name {
        Some(name) => j.name(name),
        None => j.display(code),
    }
}

fn write_records(j: &mut Json<'_>, section: RecordSection<'_, &[u8]>) -> Result<(), String> {
    for rec in section {
        let rec: ParsedRecord<'_, &[u8]> = rec.map_err(|e| e.to_string())?;
        if rec.rtype() == Rtype::OPT {
            continue; // rendered as "edns"
        }
        j.begin_object();
        j.key("name");
        write_name(j, &rec.owner());
        j.key("type");
        mnemonic(j, rec.rtype().to_mnemonic_str(), rec.rtype());
        j.key("class");
        mnemonic(j, rec.class().to_mnemonic_str(), rec.class());
        j.field_uint("ttl", rec.ttl().as_secs() as u64);
        j.key("rdata");
        match rec.to_any_record::<AllRecordData<_, ParsedName<_>>>() {
            Ok(r) => write_rdata(j, r.data()),
            Err(e) => j.display(format_args!("undecodable: {e}")),
        }
        j.end_object();
    }
    Ok(())
}

/// Record data in presentation format. The common types are written field by field; the
/// rest go through `domain`'s Display, which is complete but formats a character at a time.
fn write_rdata<Octs: AsRef<[u8]>>(j: &mut Json<'_>, data: &AllRecordData<Octs, ParsedName<Octs>>)
where
    AllRecordData<Octs, ParsedName<Octs>>: std::fmt::Display,
{
    match data {
        AllRecordData::A(a) => j.ip(a.addr().into()),
        AllRecordData::Aaaa(a) => j.ip(a.addr().into()),
        AllRecordData::Cname(c) => write_name(j, c.cname()),
        AllRecordData::Ns(n) => write_name(j, n.nsdname()),
        AllRecordData::Ptr(p) => write_name(j, p.ptrdname()),
        AllRecordData::Soa(soa) => j.string_with(|out| {
            name_into(out, soa.mname());
            out.push(b' ');
            name_into(out, soa.rname());
            let mut b = itoa::Buffer::new();
            for n in [
                soa.serial().into_int(),
                soa.refresh().as_secs(),
                soa.retry().as_secs(),
                soa.expire().as_secs(),
                soa.minimum().as_secs(),
            ] {
                out.push(b' ');
                out.extend_from_slice(b.format(n).as_bytes());
            }
        }),
        AllRecordData::Mx(mx) => j.string_with(|out| {
            out.extend_from_slice(itoa::Buffer::new().format(mx.preference()).as_bytes());
            out.push(b' ');
            name_into(out, mx.exchange());
        }),
        other => j.display(other),
    }
}

/// EDNS options as code, mnemonic and hex data (cookies, client subnet, padding...).
fn write_options(j: &mut Json<'_>, opt: &Opt<&[u8]>) {
    for option in opt.iter::<UnknownOptData<&[u8]>>() {
        let Ok(option) = option else {
            j.begin_object();
            j.field_str("error", "malformed option");
            j.end_object();
            return;
        };
        let code = option.code().to_int();
        j.begin_object();
        j.field_uint("code", code as u64);
        j.key("name");
        j.name(option_name(code));
        j.field_str("data", &hex(option.as_slice()));
        j.end_object();
    }
}

fn option_name(code: u16) -> &'static str {
    match code {
        3 => "NSID",
        8 => "ECS",
        9 => "EXPIRE",
        10 => "COOKIE",
        11 => "TCP-KEEPALIVE",
        12 => "PADDING",
        13 => "CHAIN",
        14 => "KEY-TAG",
        15 => "EDE",
        _ => "OPTION",
    }
}

/// A domain name in presentation format ("www.example.test.", "." for the root), written
/// byte by byte: `domain`'s Display goes through the formatter one character at a time.
pub fn write_name<Octs: AsRef<[u8]>>(j: &mut Json<'_>, name: &ParsedName<Octs>) {
    j.string_with(|out| name_into(out, name));
}

/// Appends a name in presentation format, JSON-escaped.
pub fn name_into<Octs: AsRef<[u8]>>(out: &mut Vec<u8>, name: &ParsedName<Octs>) {
    // A JSON-escaped presentation escape: \\. and \\\\ in the text.
    presentation_into(out, name, b"\\\\", b"\\\"");
}

/// `backslash` and `quote` are how the escape character and a quote are spelled.
fn presentation_into<Octs: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    name: &ParsedName<Octs>,
    backslash: &[u8],
    quote: &[u8],
) {
    if let Some(flat) = name.as_flat_slice() {
        return flat_presentation_into(out, flat, backslash, quote);
    }
    let mut empty = true;
    for label in name.iter().filter(|l| !l.is_root()) {
        empty = false;
        label_into(out, label.as_slice(), backslash, quote);
        out.push(b'.');
    }
    if empty {
        out.push(b'.');
    }
}

/// An uncompressed name's wire form (which `ParsedName` has checked: labels of at most 63
/// bytes, then the root), label by label without `domain`'s label iterator: most names in a
/// message are not compressed.
fn flat_presentation_into(out: &mut Vec<u8>, flat: &[u8], backslash: &[u8], quote: &[u8]) {
    if let Some(text) = flat.get(1..).filter(|_| plain_labels(flat)) {
        // Nothing to escape (the usual case): the wire form after its first length byte is
        // the text once every later length byte, and the root's 0, becomes a dot.
        let start = out.len();
        out.extend_from_slice(text);
        let text = &mut out[start..];
        let mut at = usize::from(flat[0]);
        while let Some(len) = text.get_mut(at) {
            let next = at + usize::from(*len) + 1;
            *len = b'.';
            at = next;
        }
        return;
    }
    let mut rest = flat;
    let mut empty = true;
    while let Some((&len, tail)) = rest.split_first() {
        let Some(label) = tail.get(..usize::from(len)).filter(|_| len > 0) else {
            break;
        };
        empty = false;
        label_into(out, label, backslash, quote);
        out.push(b'.');
        rest = &tail[label.len()..];
    }
    if empty {
        out.push(b'.');
    }
}

/// Whether an uncompressed name has labels (not only the root) and none holds a byte its
/// presentation escapes.
fn plain_labels(flat: &[u8]) -> bool {
    let mut rest = flat;
    let mut labels = 0;
    while let Some((&len, tail)) = rest.split_first() {
        let Some(label) = tail.get(..usize::from(len)).filter(|_| len > 0) else {
            return labels > 0 && len == 0 && tail.is_empty();
        };
        if !label.iter().all(|&b| is_plain(b)) {
            return false;
        }
        labels += 1;
        rest = &tail[label.len()..];
    }
    false
}

fn is_plain(b: u8) -> bool {
    matches!(b, 0x21..=0x7e) && !matches!(b, b'.' | b'\\' | b'"')
}

/// One label in presentation format; a label with nothing to escape is copied in one go.
fn label_into(out: &mut Vec<u8>, label: &[u8], backslash: &[u8], quote: &[u8]) {
    if label.iter().all(|&b| is_plain(b)) {
        out.extend_from_slice(label);
        return;
    }
    for &b in label {
        match b {
            b'.' => {
                out.extend_from_slice(backslash);
                out.push(b'.');
            }
            b'\\' => {
                out.extend_from_slice(backslash);
                out.extend_from_slice(backslash);
            }
            b'"' => {
                out.extend_from_slice(backslash);
                out.extend_from_slice(quote);
            }
            0x21..=0x7e => out.push(b),
            _ => {
                use std::io::Write;
                out.extend_from_slice(backslash);
                let _ = write!(out, "{b:03}");
            }
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_for_presentation_and_for_json() {
        // Labels: `a.b`, `c\d`, `"`, ` `, 0xff, then the root.
        let wire = b"\x03a.b\x03c\\d\x01\"\x01 \x01\xff\x00";
        let name =
            ParsedName::parse(&mut domain::dep::octseq::Parser::from_ref(&wire[..])).unwrap();
        let mut buf = Vec::new();
        write_name(&mut Json::new(&mut buf), &name);
        let text: String = serde_json::from_slice(&buf).unwrap();
        assert_eq!(text, r#"a\.b.c\\d.\".\032.\255."#);
        // The shards' hand-written walk spells it the same.
        let mut message = crate::dns::tests::query(&[], 7);
        message.truncate(12);
        message.extend_from_slice(wire);
        message.extend_from_slice(&[0, 28, 0, 1]);
        let mut walked = Vec::new();
        assert_eq!(
            crate::dns::question_into(&message, &mut walked),
            Some((28, 1))
        );
        assert_eq!(walked, text.as_bytes());
    }

    #[test]
    fn compressed_and_flat_names_are_spelled_alike() {
        // `a.b`, `c\d`, then a name that points into the first one's second label.
        let wire = b"\x03a.b\x03c\\d\x00\x02x\"\xc0\x04";
        let mut parser = domain::dep::octseq::Parser::from_ref(&wire[..]);
        let flat = ParsedName::parse(&mut parser).unwrap();
        let compressed = ParsedName::parse(&mut parser).unwrap();
        assert!(!flat.is_compressed() && compressed.is_compressed());
        let spelled = |name: &ParsedName<&[u8]>| {
            let mut buf = Vec::new();
            write_name(&mut Json::new(&mut buf), name);
            serde_json::from_slice::<String>(&buf).unwrap()
        };
        assert_eq!(spelled(&flat), r#"a\.b.c\\d."#);
        assert_eq!(spelled(&compressed), r#"x\".c\\d."#);
        for (wire, text) in [
            (&b"\x03www\x07example\x04test\x00"[..], "www.example.test."),
            (b"\x01a\x00", "a."),
            (b"\x00", "."),
        ] {
            let name = ParsedName::parse(&mut domain::dep::octseq::Parser::from_ref(wire));
            assert_eq!(spelled(&name.unwrap()), text);
        }
    }

    #[test]
    fn opcodes_are_spelled_as_domain_displays_them() {
        for code in 0..16 {
            let opcode = Opcode::from_int(code);
            let mut buf = Vec::new();
            write_opcode(&mut Json::new(&mut buf), opcode);
            assert_eq!(buf, format!("\"{opcode}\"").into_bytes());
        }
    }
}
