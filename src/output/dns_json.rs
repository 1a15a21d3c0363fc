//! The whole DNS message as JSON (all sections, typed record data, EDNS), decoded with
//! `domain` only when a session is rendered.

use super::json::{put_uint, Json};
use crate::dns::rcode_name;
use domain::base::iana::{Class, Opcode, Rtype};
use domain::base::opt::{Opt, OptRecord, UnknownOptData};
use domain::base::ToName;
use domain::base::{Message, ParsedName, ParsedRecord, RecordSection};
use domain::rdata::AllRecordData;
use std::borrow::Cow;
use std::net::IpAddr;
use std::ops::Range;

/// The message as JSON: walked by hand when it is the usual kind (see [`write_walked`]),
/// else parsed with `domain`; the same text either way.
pub fn write_dns(j: &mut Json<'_>, wire: &[u8]) {
    let mark = j.mark();
    if write_walked(j, wire).is_none() {
        j.rewind(mark);
        write_parsed(j, wire);
    }
}

/// The DNS messages a line has written so far, for [`write_dns_once`]: the JSON of each of the
/// first few, by its wire bytes.
#[derive(Default)]
pub struct WrittenDns<'w> {
    written: smallvec::SmallVec<[(&'w [u8], Range<usize>); WRITTEN_DNS]>,
}

/// Messages a line remembers: a session's distinct DNS messages are its query and a response
/// or two; the rest are written again.
const WRITTEN_DNS: usize = 4;

/// [`write_dns`] as a value after a key, unless the line already holds the JSON of the same
/// wire bytes: then that text is copied. CoreDNS forwards the client's query as it came, so an
/// upstream query (and each retry of it) is the CQ's message byte for byte.
pub fn write_dns_once<'w>(j: &mut Json<'_>, wire: &'w [u8], written: &mut WrittenDns<'w>) {
    if let Some((_, text)) = written.written.iter().find(|(w, _)| *w == wire) {
        return j.copy_value(text.clone());
    }
    let start = j.out.len();
    write_dns(j, wire);
    // After a key the value begins at `start`, without a separator.
    if written.written.len() < WRITTEN_DNS && j.out.get(start) == Some(&b'{') {
        written.written.push((wire, start..j.out.len()));
    }
}

/// The message as JSON, parsed with `domain`: any message, malformed ones included.
fn write_parsed(j: &mut Json<'_>, wire: &[u8]) {
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

/// [`write_parsed`]'s text, from one walk over the message, for messages whose every name
/// and record `domain` parses and whose records are of the types senders mostly send (A,
/// AAAA, CNAME, NS, PTR, SOA, MX of class IN, one OPT in the additional section). `None`
/// (with part of the text written) for anything else: unknown types, malformed or odd
/// messages are left to `domain`. `domain`'s generic parsing cost more than the rest of a
/// message's rendering.
fn write_walked(j: &mut Json<'_>, wire: &[u8]) -> Option<()> {
    let header = wire.get(..12)?;
    let count = |i: usize| u16::from_be_bytes([header[4 + 2 * i], header[5 + 2 * i]]);
    j.begin_object();
    j.field_uint("id", u16::from_be_bytes([header[0], header[1]]).into());
    match header[2] >> 3 & 0x0f {
        0 => j.members(",\"opcode\":\"QUERY(0)\""),
        opcode => {
            j.key("opcode");
            write_opcode(j, Opcode::from_int(opcode));
        }
    }
    // An OPT record's extended rcode would add to it: such a message is left to `domain`.
    j.key("rcode");
    match rcode_name((header[3] & 0x0f).into()) {
        // A mnemonic is plain ASCII: nothing to escape.
        Cow::Borrowed(mnemonic) => j.name(mnemonic),
        Cow::Owned(number) => j.string(&number),
    }
    j.key("flags");
    // The array put together in one buffer: `"qr",` for each flag set, the last comma (or
    // the byte after `[`) then becoming the `]`.
    let mut flags = [b'['; 40];
    let mut len = 1;
    for (set, [a, b]) in [
        (header[2] & 0x80, *b"qr"),
        (header[2] & 0x04, *b"aa"),
        (header[2] & 0x02, *b"tc"),
        (header[2] & 0x01, *b"rd"),
        (header[3] & 0x80, *b"ra"),
        (header[3] & 0x20, *b"ad"),
        (header[3] & 0x10, *b"cd"),
    ] {
        if set != 0 {
            flags[len..len + 5].copy_from_slice(&[b'"', a, b, b'"', b',']);
            len += 5;
        }
    }
    len = len.max(2);
    flags[len - 1] = b']';
    j.value_text(&flags, len);
    j.key("question");
    j.begin_array();
    let mut at = 12;
    for _ in 0..count(0) {
        let name = WalkedName::at(wire, at, wire.len())?;
        let [t0, t1, c0, c1] = array::<4>(wire.get(name.end..name.end + 4)?)?;
        j.begin_object();
        j.key("name");
        name.write(j, wire);
        write_type_and_class(j, [t0, t1], [c0, c1]);
        j.end_object();
        at = name.end + 4;
    }
    j.end_array();
    let mut opt = None;
    for (i, section) in ["answer", "authority", "additional"]
        .into_iter()
        .enumerate()
    {
        if count(i + 1) == 0 {
            // Empty sections (most answers' authority, most queries' every section).
            match i {
                0 => j.members(",\"answer\":[]"),
                1 => j.members(",\"authority\":[]"),
                _ => j.members(",\"additional\":[]"),
            }
            continue;
        }
        j.key(section);
        j.begin_array();
        for _ in 0..count(i + 1) {
            let owner = WalkedName::at(wire, at, wire.len())?;
            let fixed = wire.get(owner.end..owner.end + 10)?;
            let [t0, t1, c0, c1, ttl @ .., l0, l1] = array::<10>(fixed)?;
            let data = owner.end + 10..owner.end + 10 + usize::from(u16::from_be_bytes([l0, l1]));
            wire.get(data.clone())?;
            at = data.end;
            if [t0, t1] == Rtype::OPT.to_int().to_be_bytes() {
                // The one OPT record `write_parsed` reads, with a root owner as it should.
                if i != 2 || opt.is_some() || wire[owner.start] != 0 {
                    return None;
                }
                opt = Some(([c0, c1], ttl, data));
                continue;
            }
            j.begin_object();
            j.key("name");
            owner.write(j, wire);
            write_type_and_class(j, [t0, t1], [c0, c1]);
            j.field_uint("ttl", u32::from_be_bytes(ttl).into());
            j.key("rdata");
            if [c0, c1] != [0, 1] {
                return None;
            }
            write_rdata_walked(j, wire, u16::from_be_bytes([t0, t1]), data)?;
            j.end_object();
        }
        j.end_array();
    }
    if let Some((udp_size, [extended_rcode, version, flags, _], data)) = opt {
        if extended_rcode != 0 {
            return None;
        }
        j.key("edns");
        j.begin_object();
        // `"version":…,"udp_size":…,"do":…,"options":` in one buffer.
        let mut text = [0u8; 64];
        text[..10].copy_from_slice(b"\"version\":");
        let mut len = put_uint(&mut text, 10, version.into());
        text[len..len + 12].copy_from_slice(b",\"udp_size\":");
        len = put_uint(&mut text, len + 12, u16::from_be_bytes(udp_size).into());
        let (tail, n) = match flags & 0x80 {
            0 => (b",\"do\":false,\"options\":", 22),
            _ => (b",\"do\":true,\"options\": ", 21),
        };
        text[len..len + 22].copy_from_slice(tail);
        j.members_and_key(&text, len + n);
        j.begin_array();
        let mut options = &wire[data];
        while !options.is_empty() {
            let [c0, c1, l0, l1] = array::<4>(options.get(..4)?)?;
            let len = usize::from(u16::from_be_bytes([l0, l1]));
            let value = options.get(4..4 + len)?;
            let code = u16::from_be_bytes([c0, c1]);
            j.begin_object();
            j.field_uint("code", code.into());
            j.key("name");
            j.name(option_name(code));
            j.key("data");
            j.string_with(|out| hex_into(out, value));
            j.end_object();
            options = &options[4 + len..];
        }
        j.end_array();
        j.end_object();
    }
    j.end_object();
    Some(())
}

/// `N` bytes as an array; `None` for another length.
fn array<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
    b.try_into().ok()
}

fn write_type_and_class(j: &mut Json<'_>, rtype: [u8; 2], class: [u8; 2]) {
    if let (Some((name, n)), [0, 1]) = (common_type(u16::from_be_bytes(rtype)), class) {
        // `,"type":"A","class":"IN"` in one buffer (a name always precedes).
        let mut text = [0u8; 40];
        text[..9].copy_from_slice(b",\"type\":\"");
        text[9..17].copy_from_slice(name);
        text[9 + n..23 + n].copy_from_slice(b"\",\"class\":\"IN\"");
        return j.members_text(&text, 23 + n);
    }
    let rtype = Rtype::from_int(u16::from_be_bytes(rtype));
    let class = Class::from_int(u16::from_be_bytes(class));
    j.key("type");
    mnemonic(j, rtype.to_mnemonic_str(), rtype);
    j.key("class");
    mnemonic(j, class.to_mnemonic_str(), class);
}

/// The mnemonics of the usual types, as `domain` spells them, padded to eight bytes, and
/// their length.
fn common_type(rtype: u16) -> Option<(&'static [u8; 8], usize)> {
    Some(match rtype {
        1 => (b"A       ", 1),
        2 => (b"NS      ", 2),
        5 => (b"CNAME   ", 5),
        6 => (b"SOA     ", 3),
        12 => (b"PTR     ", 3),
        15 => (b"MX      ", 2),
        16 => (b"TXT     ", 3),
        28 => (b"AAAA    ", 4),
        33 => (b"SRV     ", 3),
        64 => (b"SVCB    ", 4),
        65 => (b"HTTPS   ", 5),
        _ => return None,
    })
}

/// The record data at `data` of the types [`write_rdata`] writes field by field, as it
/// writes them; `None` for other types, or data that is not exactly one such value.
fn write_rdata_walked(j: &mut Json<'_>, wire: &[u8], rtype: u16, data: Range<usize>) -> Option<()> {
    let rdata = &wire[data.clone()];
    let name_at = |at: usize| WalkedName::at(wire, at, data.end);
    match Rtype::from_int(rtype) {
        Rtype::A => j.ip(IpAddr::from(array::<4>(rdata)?)),
        Rtype::AAAA => j.ip(IpAddr::from(array::<16>(rdata)?)),
        Rtype::CNAME | Rtype::NS | Rtype::PTR => {
            let name = name_at(data.start).filter(|n| n.end == data.end)?;
            name.write(j, wire);
        }
        Rtype::SOA => {
            let mname = name_at(data.start)?;
            let rname = name_at(mname.end)?;
            let numbers = array::<20>(wire.get(rname.end..data.end)?)?;
            j.string_with(|out| {
                mname.spell_into(out, wire);
                out.push(b' ');
                rname.spell_into(out, wire);
                let mut b = itoa::Buffer::new();
                for n in numbers.chunks_exact(4) {
                    out.push(b' ');
                    let n = u32::from_be_bytes([n[0], n[1], n[2], n[3]]);
                    out.extend_from_slice(b.format(n).as_bytes());
                }
            });
        }
        Rtype::MX => {
            let [p0, p1] = array::<2>(rdata.get(..2)?)?;
            let exchange = name_at(data.start + 2).filter(|n| n.end == data.end)?;
            j.string_with(|out| {
                let preference = u16::from_be_bytes([p0, p1]);
                out.extend_from_slice(itoa::Buffer::new().format(preference).as_bytes());
                out.push(b' ');
                exchange.spell_into(out, wire);
            });
        }
        _ => return None,
    }
    Some(())
}

/// A name in a message that `ParsedName::parse` would take as it is: labels of up to 63
/// bytes and compression pointers each pointing before itself, within `limit` (the end of
/// the message, or of the record data it is in), well short of 255 bytes and of
/// `domain`'s limit of pointers.
#[derive(Debug, Clone, Copy)]
struct WalkedName {
    start: usize,
    /// Where what follows the name starts.
    end: usize,
    compressed: bool,
}

impl WalkedName {
    fn at(wire: &[u8], start: usize, limit: usize) -> Option<Self> {
        let wire = wire.get(..limit)?;
        let (mut at, mut end, mut len, mut pointers) = (start, None, 0, 0);
        loop {
            let b = *wire.get(at)?;
            match b {
                0 => {
                    return Some(Self {
                        start,
                        end: end.unwrap_or(at + 1),
                        compressed: end.is_some(),
                    })
                }
                1..=0x3f => {
                    len += usize::from(b) + 1;
                    at += usize::from(b) + 1;
                }
                0xc0..=0xff => {
                    let target = usize::from(b & 0x3f) << 8 | usize::from(*wire.get(at + 1)?);
                    pointers += 1;
                    if target >= at || pointers > 64 {
                        return None;
                    }
                    end.get_or_insert(at + 2);
                    at = target;
                }
                _ => return None,
            }
            if len > 240 {
                return None;
            }
        }
    }

    fn write(&self, j: &mut Json<'_>, wire: &[u8]) {
        j.string_with(|out| self.spell_into(out, wire));
    }

    /// [`name_into`]'s text (which the walk checked the name for).
    fn spell_into(&self, out: &mut Vec<u8>, wire: &[u8]) {
        let (backslash, quote) = (b"\\\\", b"\\\"");
        if !self.compressed {
            return flat_presentation_into(out, &wire[self.start..self.end], backslash, quote);
        }
        let mut at = self.start;
        let mut empty = true;
        loop {
            let b = wire[at];
            match b {
                0 => break,
                0xc0..=0xff => at = usize::from(b & 0x3f) << 8 | usize::from(wire[at + 1]),
                _ => {
                    let label = &wire[at + 1..at + 1 + usize::from(b)];
                    label_into(out, label, backslash, quote);
                    out.push(b'.');
                    empty = false;
                    at += label.len() + 1;
                }
            }
        }
        if empty {
            out.push(b'.');
        }
    }
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
        j.key("data");
        j.string_with(|out| hex_into(out, option.as_slice()));
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
    let mut s = Vec::with_capacity(b.len() * 2);
    hex_into(&mut s, b);
    String::from_utf8(s).unwrap_or_default()
}

/// `b` in lower-case hex, appended to a line (no String of its own).
fn hex_into(out: &mut Vec<u8>, b: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let hex = |x: u8| [DIGITS[usize::from(x >> 4)], DIGITS[usize::from(x & 15)]];
    // Eight bytes at a time into a buffer (cookies are 8 to 40 bytes): one copy each.
    let mut chunks = b.chunks_exact(8);
    for chunk in &mut chunks {
        let mut text = [0u8; 16];
        for (pair, &x) in text.chunks_exact_mut(2).zip(chunk) {
            pair.copy_from_slice(&hex(x));
        }
        out.extend_from_slice(&text);
    }
    for &x in chunks.remainder() {
        out.extend_from_slice(&hex(x));
    }
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

    /// Whether the walk wrote the DNS message `wire`; if it did, it wrote `domain`'s text.
    fn walked_as_parsed(wire: &[u8]) -> bool {
        let mut walked = Vec::new();
        if write_walked(&mut Json::new(&mut walked), wire).is_none() {
            return false;
        }
        let mut parsed = Vec::new();
        write_parsed(&mut Json::new(&mut parsed), wire);
        assert_eq!(
            String::from_utf8_lossy(&walked),
            String::from_utf8_lossy(&parsed),
            "{}",
            hex(wire)
        );
        true
    }

    /// Every DNS message (queries and responses) of every capture.
    fn captured_dns() -> Vec<Vec<u8>> {
        let mut wires = Vec::new();
        for frame in super::super::tests::captured_frames() {
            let Some(m) = crate::dnstap::decode(&frame).ok().and_then(|t| t.message) else {
                continue;
            };
            wires.extend(m.query_message.into_iter().map(|q| q.to_vec()));
            wires.extend(m.response_message.into_iter().map(|r| r.to_vec()));
        }
        wires
    }

    #[test]
    fn the_walk_writes_what_domain_writes_for_every_captured_message() {
        let wires = captured_dns();
        let mut walked = 0;
        for wire in &wires {
            walked += usize::from(walked_as_parsed(wire));
        }
        assert!(wires.len() > 10_000, "{}", wires.len());
        // The captures are what senders send: nearly all of it is walked.
        assert!(
            walked * 100 > wires.len() * 95,
            "{walked} of {}",
            wires.len()
        );
    }

    #[test]
    fn the_walk_writes_what_domain_writes_or_leaves_odd_messages_to_it() {
        // Captured messages cut short and with bytes changed (lengths, counts, pointers,
        // label types, types and classes): the walk writes `domain`'s text or nothing.
        let (mut walked, mut left) = (0, 0);
        for wire in captured_dns().iter().step_by(97) {
            for v in super::super::tests::damaged(wire) {
                match walked_as_parsed(&v) {
                    true => walked += 1,
                    false => left += 1,
                }
            }
        }
        assert!(walked > 1000 && left > 1000, "{walked} walked, {left} left");
    }

    #[test]
    fn a_walked_name_is_one_domain_parses_the_same() {
        // Names before and after a two-byte slot holding every pair of bytes: labels, the
        // root, pointers backwards, to themselves and forwards, bad label types.
        let mut wire = vec![0; 12];
        wire.extend_from_slice(b"\x01a\x00\x01b\xc0\x0c");
        let slot = wire.len();
        wire.extend_from_slice(b"..\x00\x01c\x00");
        let mut walked = 0;
        for pair in 0..=u16::MAX {
            wire[slot..slot + 2].copy_from_slice(&pair.to_be_bytes());
            let Some(name) = WalkedName::at(&wire, slot, wire.len()) else {
                continue;
            };
            let mut parser = domain::dep::octseq::Parser::from_ref(&wire[..]);
            parser.advance(slot).unwrap();
            let parsed = ParsedName::parse(&mut parser).unwrap_or_else(|e| panic!("{pair:x}: {e}"));
            assert_eq!(parser.pos(), name.end, "{pair:x}");
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            name.write(&mut Json::new(&mut ours), &wire);
            write_name(&mut Json::new(&mut theirs), &parsed);
            assert_eq!(ours, theirs, "{pair:x}");
            walked += 1;
        }
        assert!(walked > 100, "{walked}");
    }

    #[test]
    fn a_message_left_to_domain_is_written_as_domain_writes_it_in_the_line() {
        // A TXT answer: not walked; the line holds `domain`'s text once, after what came before.
        let mut wire = crate::dns::tests::query(&["a", "test"], 7);
        wire[7] = 1; // one answer
        wire.extend_from_slice(b"\xc0\x0c\x00\x10\x00\x01\x00\x00\x00\x3c\x00\x03\x02hi");
        assert!(!walked_as_parsed(&wire));
        let mut parsed = Vec::new();
        write_parsed(&mut Json::new(&mut parsed), &wire);
        let mut line = Vec::new();
        let mut j = Json::new(&mut line);
        j.begin_array();
        j.uint(1);
        write_dns(&mut j, &wire);
        j.end_array();
        let mut expected = b"[1,".to_vec();
        expected.extend_from_slice(&parsed);
        expected.push(b']');
        assert_eq!(
            String::from_utf8(line).unwrap(),
            String::from_utf8(expected).unwrap()
        );
    }

    #[test]
    fn a_message_written_again_in_a_line_is_the_same_text() {
        // A query, a response, the query again (other bytes, same content), the query with
        // one byte changed (same length), the response again, then more distinct messages
        // than the line remembers, then the first again.
        let query = crate::dns::tests::query(&["a", "test"], 7);
        let mut response = query.clone();
        response[2] |= 0x80;
        let mut other_id = query.clone();
        other_id[1] ^= 1;
        let others: Vec<Vec<u8>> = (0..WRITTEN_DNS as u16)
            .map(|id| crate::dns::tests::query(&["b", "test"], id))
            .collect();
        let copy = query.clone();
        let mut wires = vec![&query, &response, &copy, &other_id, &response];
        wires.extend(&others);
        wires.push(&query);
        let line = |once: bool| {
            let mut out = b"x".to_vec();
            let mut j = Json::new(&mut out);
            let mut written = WrittenDns::default();
            j.begin_array();
            for wire in &wires {
                j.begin_object();
                j.key("dns");
                match once {
                    true => write_dns_once(&mut j, wire, &mut written),
                    false => write_dns(&mut j, wire),
                }
                j.field_uint("n", wire.len() as u64);
                j.end_object();
            }
            j.end_array();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(line(true), line(false));
        assert_eq!(line(true).matches(r#""id":7,"#).count(), 5);
    }

    #[test]
    fn the_usual_types_are_spelled_as_domain_spells_them() {
        for code in 0..=u16::MAX {
            if let Some((name, n)) = common_type(code) {
                let spelled = Rtype::from_int(code).to_mnemonic_str();
                assert_eq!(Some(&name[..n]), spelled.map(str::as_bytes), "{code}");
                assert!(name[n..].iter().all(|&b| b == b' '));
            }
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
