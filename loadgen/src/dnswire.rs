//! DNS wire messages shaped like what CoreDNS logs: the client's query (with EDNS and a client
//! cookie), the upstream's answer re-encoded without name compression (as CoreDNS re-packs
//! FORWARDER_RESPONSE), and the client's answer with compression, cache-rewritten TTLs and
//! the cookie echoed.

pub const TYPE_A: u16 = 1;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const CLASS_IN: u16 = 1;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_REFUSED: u8 = 5;

const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
const FLAG_AD: u16 = 0x0020;

/// IANA mnemonic of a client-visible rcode (the analyser's own table).
pub fn rcode_name(rcode: u8) -> String {
    dnstap_analyser::dns::rcode_name(rcode as u16).into_owned()
}

pub fn rcode_from_name(name: &str) -> Option<u8> {
    Some(match name.to_ascii_uppercase().as_str() {
        "NOERROR" => 0,
        "FORMERR" => 1,
        "SERVFAIL" => 2,
        "NXDOMAIN" => 3,
        "NOTIMP" => 4,
        "REFUSED" => 5,
        _ => return None,
    })
}

/// What the analyser calls a success: NOERROR or NXDOMAIN in the client's answer.
pub fn rcode_succeeds(rcode: u8) -> bool {
    rcode == RCODE_NOERROR || rcode == RCODE_NXDOMAIN
}

/// Names in wire format, stored back to back; each knows where its zone suffix starts.
#[derive(Debug, Clone, Default)]
pub struct NameTable {
    data: Vec<u8>,
    /// (offset into data, length, zone suffix offset within the name)
    index: Vec<(u32, u8, u8)>,
}

impl NameTable {
    /// `labels(k)` gives the host labels of rank k, `zone` the zone they live in.
    pub fn build(n: usize, zone: &[&str], labels: impl Fn(usize) -> Vec<String>) -> Self {
        let mut t = NameTable::default();
        for k in 0..n {
            let start = t.data.len();
            for l in labels(k) {
                t.data.push(l.len() as u8);
                t.data.extend_from_slice(l.as_bytes());
            }
            let zone_at = t.data.len() - start;
            for l in zone {
                t.data.push(l.len() as u8);
                t.data.extend_from_slice(l.as_bytes());
            }
            t.data.push(0);
            let len = t.data.len() - start;
            assert!(len <= 255, "name too long");
            t.index.push((start as u32, len as u8, zone_at as u8));
        }
        t
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The wire name and the offset of its zone suffix within it.
    #[inline]
    pub fn get(&self, k: usize) -> (&[u8], usize) {
        let (off, len, zone) = self.index[k];
        (
            &self.data[off as usize..off as usize + len as usize],
            zone as usize,
        )
    }

    /// Presentation form without the trailing dot, e.g. `s1.ns1.svc.cluster.local`.
    pub fn text(&self, k: usize) -> String {
        wire_name_text(self.get(k).0)
    }
}

pub fn wire_name_text(wire: &[u8]) -> String {
    let mut s = String::new();
    let mut i = 0;
    while i < wire.len() && wire[i] != 0 {
        let l = wire[i] as usize;
        if !s.is_empty() {
            s.push('.');
        }
        s.push_str(&String::from_utf8_lossy(&wire[i + 1..i + 1 + l]));
        i += 1 + l;
    }
    s
}

#[inline]
fn u16be(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

#[inline]
fn u32be(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn header(out: &mut Vec<u8>, id: u16, flags: u16, counts: [u16; 4]) {
    u16be(out, id);
    u16be(out, flags);
    for c in counts {
        u16be(out, c);
    }
}

fn opt(out: &mut Vec<u8>, cookie: Option<u64>) {
    out.push(0);
    u16be(out, TYPE_OPT);
    u16be(out, 1232);
    u32be(out, 0);
    match cookie {
        Some(c) => {
            u16be(out, 12);
            u16be(out, 10); // COOKIE
            u16be(out, 8);
            out.extend_from_slice(&c.to_be_bytes());
        }
        None => u16be(out, 0),
    }
}

/// A client query: RD+AD, one question, EDNS(0) with a client cookie.
pub fn query(out: &mut Vec<u8>, id: u16, qname: &[u8], qtype: u16, cookie: u64) {
    header(out, id, FLAG_RD | FLAG_AD, [1, 0, 0, 1]);
    out.extend_from_slice(qname);
    u16be(out, qtype);
    u16be(out, CLASS_IN);
    opt(out, Some(cookie));
}

/// How a response is packed.
#[derive(Debug, Clone, Copy)]
pub struct ResponseShape {
    pub id: u16,
    pub rcode: u8,
    pub authoritative: bool,
    /// Name compression (what a client gets); false for CoreDNS's re-encoded FR.
    pub compress: bool,
    pub ttl: u32,
    /// Echoed client cookie (client responses) or none (upstream responses).
    pub cookie: Option<u64>,
    /// Answer count for NOERROR (1 or 2).
    pub answers: u8,
    /// Seeds the answer addresses.
    pub addr_seed: u32,
}

/// A response to `query(id, qname, qtype)`: answers for NOERROR, the zone's SOA for NXDOMAIN,
/// nothing for other rcodes.
pub fn response(out: &mut Vec<u8>, qname: &[u8], zone_at: usize, qtype: u16, s: &ResponseShape) {
    let mut flags = FLAG_QR | FLAG_RD | FLAG_RA | s.rcode as u16;
    if s.authoritative {
        flags |= FLAG_AA;
    }
    let (an, ns) = match s.rcode {
        RCODE_NOERROR => (s.answers.max(1) as u16, 0),
        RCODE_NXDOMAIN => (0, 1),
        _ => (0, 0),
    };
    header(out, s.id, flags, [1, an, ns, 1]);
    out.extend_from_slice(qname);
    u16be(out, qtype);
    u16be(out, CLASS_IN);
    for i in 0..an {
        if s.compress {
            u16be(out, 0xc00c);
        } else {
            out.extend_from_slice(qname);
        }
        u16be(out, qtype);
        u16be(out, CLASS_IN);
        u32be(out, s.ttl);
        let a = s.addr_seed.wrapping_add(i as u32 * 7919);
        if qtype == TYPE_AAAA {
            u16be(out, 16);
            out.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0]);
            u32be(out, a);
        } else {
            u16be(out, 4);
            out.extend_from_slice(&[10, 96, (a >> 8) as u8, (a as u8).max(1)]);
        }
    }
    if ns == 1 {
        let zone = &qname[zone_at..];
        if s.compress {
            u16be(out, 0xc000 | (12 + zone_at) as u16);
        } else {
            out.extend_from_slice(zone);
        }
        u16be(out, TYPE_SOA);
        u16be(out, CLASS_IN);
        u32be(out, s.ttl.min(30));
        let len_at = out.len();
        u16be(out, 0);
        // MNAME ns.dns.<zone>, RNAME hostmaster.<zone>
        out.extend_from_slice(b"\x02ns\x03dns");
        out.extend_from_slice(zone);
        out.extend_from_slice(b"\x0ahostmaster");
        out.extend_from_slice(zone);
        for v in [1_700_000_000u32, 7200, 1800, 86400, 30] {
            u32be(out, v);
        }
        let rdlen = (out.len() - len_at - 2) as u16;
        out[len_at..len_at + 2].copy_from_slice(&rdlen.to_be_bytes());
    }
    opt(out, s.cookie);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_to_text() {
        let t = NameTable::build(3, &["cluster", "local"], |k| {
            vec![format!("s{k}"), "svc".into()]
        });
        assert_eq!(t.text(2), "s2.svc.cluster.local");
        let (wire, zone_at) = t.get(1);
        assert_eq!(&wire[zone_at..], b"\x07cluster\x05local\x00");
    }
}
