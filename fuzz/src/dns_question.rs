//! Target 3: the analyser's hand-written header-and-question parser (`dns::parse_question`)
//! against NLnet Labs' `domain` (which the renderer uses).
//!
//! Rule checked: whatever `domain` accepts the analyser accepts too, and reads the same id,
//! QR bit, 4-bit rcode, qtype, qclass and lowercased qname (compared through the same hash).
//! The analyser accepts more, in exactly two ways (`leniency`): a qname reached through a
//! forward compression pointer (`domain` only follows pointers to earlier bytes; the analyser
//! follows any, at most 16 hops), and a qname of 256 wire bytes (one over RFC 1035's 255).

use dnstap_analyser::metrics::ErrorChain;
use domain::base::Message;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Agreement {
    BothOk,
    BothErr,
    OnlyAnalyser,
}

pub fn check(data: &[u8]) {
    classify(data);
}

pub fn classify(data: &[u8]) -> Agreement {
    let hasher = dnstap_analyser::dns::key_hasher();
    let ours = dnstap_analyser::dns::parse_question(data, &hasher);
    let theirs = reference(data);
    let (ours, theirs) = match (ours, theirs) {
        (Ok(o), Some(t)) => (o, t),
        (Err(e), None) => {
            let _ = ErrorChain(&e).to_string();
            return Agreement::BothErr;
        }
        (Ok(_), None) => {
            assert!(
                leniency(data).is_some(),
                "the analyser accepts a question domain rejects, for no known reason"
            );
            return Agreement::OnlyAnalyser;
        }
        (Err(e), Some(t)) => panic!("domain reads {:?}, the analyser fails: {e:?}", t.qname),
    };
    assert_eq!(ours.id, theirs.id, "id");
    assert_eq!(ours.is_response, theirs.qr, "qr");
    assert_eq!(ours.rcode, theirs.rcode, "rcode");
    assert_eq!(ours.qtype, theirs.qtype, "qtype");
    assert_eq!(ours.qclass, theirs.qclass, "qclass");
    assert_eq!(
        ours.qname_hash,
        hasher.hash_one(&theirs.qname[..]),
        "qname {:?}",
        theirs.qname
    );
    Agreement::BothOk
}

/// Why the analyser may accept a question that `domain` rejects, if it is one of the known
/// leniencies. Walks the qname as `parse_question` does.
pub fn leniency(wire: &[u8]) -> Option<&'static str> {
    let (mut pos, mut len, mut forward) = (12usize, 0usize, false);
    for _ in 0..=16 * 64 {
        let l = *wire.get(pos)? as usize;
        match l {
            0 => break,
            1..=63 => {
                len += 1 + l;
                pos += 1 + l;
            }
            0xc0.. => {
                let target = (l & 0x3f) << 8 | *wire.get(pos + 1)? as usize;
                forward |= target >= pos;
                pos = target;
            }
            _ => return None,
        }
    }
    if forward {
        Some("forward compression pointer")
    } else if len + 1 == 256 {
        Some("256-byte qname")
    } else {
        None
    }
}

pub struct Reference {
    pub id: u16,
    pub qr: bool,
    pub rcode: u8,
    pub qtype: u16,
    pub qclass: u16,
    /// Wire form, lowercased, root label included.
    pub qname: Vec<u8>,
}

/// Header and first question as `domain` reads them.
pub fn reference(data: &[u8]) -> Option<Reference> {
    let msg = Message::from_octets(data).ok()?;
    let q = msg.first_question()?;
    let mut qname = Vec::new();
    for label in q.qname().iter() {
        qname.push(label.len() as u8);
        qname.extend(label.as_slice().iter().map(u8::to_ascii_lowercase));
    }
    let h = msg.header();
    Some(Reference {
        id: h.id(),
        qr: h.qr(),
        rcode: h.rcode().to_int(),
        qtype: q.qtype().to_int(),
        qclass: q.qclass().to_int(),
        qname,
    })
}
