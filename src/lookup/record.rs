//! What a shard hands the lookup stage per finished session: the few facts lookups need
//! (`SessionFacts`, read from the stored CQ and CR with the hot path's wire scan) and the
//! session's rendered line, if it is printed, which the stage completes with its lookup id.
//! Batched like the writer's lines: names and lines live in one byte buffer per batch, so a
//! session costs no allocation of its own.

use super::{Outcome, Query};
use crate::correlate::{MessageStore, Session};
use crate::dnstap::{self, Nanos, Role, SourceId};
use std::net::SocketAddr;
use std::ops::Range;

/// One finished session in a batch. `line` is empty when the session is not printed.
#[derive(Debug, Clone)]
pub struct Record {
    pub facts: Option<SessionFacts>,
    pub line: Range<usize>,
}

/// A session as the lookup stage sees it; names are spans of the batch's bytes.
#[derive(Debug, Clone)]
pub struct SessionFacts {
    pub client: SocketAddr,
    pub identity: SourceId,
    pub qtype: u16,
    pub outcome: Outcome,
    pub query_time: Nanos,
    pub response_time: Option<Nanos>,
    pub dns_id: Option<u16>,
    qname: Range<usize>,
    cname_target: Option<Range<usize>>,
}

/// Finished sessions of one shard for one lookup partition, in the order they finished.
#[derive(Debug, Default)]
pub struct RecordBatch {
    pub records: Vec<Record>,
    pub bytes: Vec<u8>,
}

impl RecordBatch {
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            records: Vec::with_capacity(128),
            bytes: Vec::with_capacity(bytes),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Adds a session: its facts (none for one without a client query) and, through
    /// `render` (which appends to the batch's bytes), its line when it is printed.
    pub fn push(
        &mut self,
        s: &Session,
        store: &MessageStore,
        render: Option<impl FnOnce(&mut Vec<u8>)>,
    ) {
        let facts = facts(s, store, &mut self.bytes);
        let start = self.bytes.len();
        if let Some(render) = render {
            render(&mut self.bytes);
        }
        let line = start..self.bytes.len();
        self.records.push(Record { facts, line });
    }

    /// The query of record `r`, borrowing its names from the batch.
    pub fn query<'a>(&'a self, f: &SessionFacts) -> Option<Query<'a>> {
        let text = |r: &Range<usize>| std::str::from_utf8(self.bytes.get(r.clone())?).ok();
        Some(Query {
            client: f.client,
            identity: f.identity,
            qname: text(&f.qname)?,
            qtype: f.qtype,
            outcome: f.outcome,
            cname_target: f.cname_target.as_ref().and_then(text),
            query_time: f.query_time,
            response_time: f.response_time,
            dns_id: f.dns_id,
        })
    }

    pub fn line(&self, r: &Record) -> &[u8] {
        &self.bytes[r.line.clone()]
    }
}

/// The client's address, from the CQ: what picks the session's lookup partition.
pub fn client_ip(s: &Session, store: &MessageStore) -> Option<std::net::IpAddr> {
    let cq = s.messages.iter().find(|m| m.role == Role::ClientQuery)?;
    let q = dnstap::scan_message(store.get(cq.bytes))?;
    dnstap::socket(q.query_address, q.query_port).map(|a| a.ip())
}

/// The client side of the session: the CQ's client socket, time and question, the CR's time,
/// rcode, answer count and first answer's CNAME target. None without a CQ with a question.
fn facts(s: &Session, store: &MessageStore, bytes: &mut Vec<u8>) -> Option<SessionFacts> {
    let cq = s.messages.iter().find(|m| m.role == Role::ClientQuery)?;
    let q = dnstap::scan_message(store.get(cq.bytes))?;
    let client = dnstap::socket(q.query_address, q.query_port)?;
    let query_time = dnstap::time(q.query_time_sec, q.query_time_nsec)?;
    let cr = s
        .messages
        .iter()
        .rev()
        .find(|m| m.role == Role::ClientResponse)
        .and_then(|m| dnstap::scan_message(store.get(m.bytes)));
    let start = bytes.len();
    let qtype = question_into(q.query_message?, bytes)?;
    let qname = start..bytes.len();
    let response = cr.and_then(|r| r.response_message);
    let header = response.and_then(|w| {
        let rcode = w.get(3)? & 0x0f;
        let ancount = u16::from_be_bytes([*w.get(6)?, *w.get(7)?]);
        Some((rcode, ancount))
    });
    let outcome = Outcome::of(header);
    let start = bytes.len();
    let cname_target = (outcome == Outcome::Answered)
        .then(|| response.and_then(|w| cname_target_into(w, bytes)))
        .flatten()
        .map(|()| start..bytes.len());
    Some(SessionFacts {
        client,
        identity: s.source,
        qtype,
        outcome,
        query_time,
        response_time: cr.and_then(|r| dnstap::time(r.response_time_sec, r.response_time_nsec)),
        dns_id: s.dns_id,
        qname,
        cname_target,
    })
}

/// Appends the question's name, lowercased, in presentation form; returns its type.
fn question_into(wire: &[u8], out: &mut Vec<u8>) -> Option<u16> {
    if u16::from_be_bytes([*wire.get(4)?, *wire.get(5)?]) == 0 {
        return None;
    }
    let end = name_into(wire, 12, out)?;
    Some(u16::from_be_bytes([*wire.get(end)?, *wire.get(end + 1)?]))
}

/// Appends the target of the first answer record when it is a CNAME (the question skipped,
/// the owner's name skipped, the type read, the target read): no full parse per session.
fn cname_target_into(wire: &[u8], out: &mut Vec<u8>) -> Option<()> {
    const CNAME: u16 = 5;
    let mut scratch = Vec::new();
    let question_end = name_into(wire, 12, &mut scratch)? + 4;
    let owner_end = name_into(wire, question_end, &mut scratch)?;
    let rtype = u16::from_be_bytes([*wire.get(owner_end)?, *wire.get(owner_end + 1)?]);
    if rtype != CNAME {
        return None;
    }
    let start = out.len();
    match name_into(wire, owner_end + 10, out) {
        Some(_) => Some(()),
        None => {
            out.truncate(start);
            None
        }
    }
}

/// Appends the name at `pos` lowercased in presentation form (a dot after each label; `.`,
/// `\` and bytes outside printable ASCII escaped as `\DDD`), following compression pointers
/// (16 at most). Returns where the name ends in the message; None, and `out` unchanged, for a
/// malformed name.
fn name_into(wire: &[u8], mut pos: usize, out: &mut Vec<u8>) -> Option<usize> {
    let start = out.len();
    let (mut end, mut jumps, mut len) = (None, 0, 0usize);
    let result = loop {
        let Some(&l) = wire.get(pos) else { break None };
        match l & 0xc0 {
            0x00 if l == 0 => break Some(end.unwrap_or(pos + 1)),
            0x00 => {
                let Some(label) = wire.get(pos + 1..pos + 1 + l as usize) else {
                    break None;
                };
                len += 1 + label.len();
                if len > 255 {
                    break None;
                }
                for &b in label {
                    match b.to_ascii_lowercase() {
                        b @ (b'.' | b'\\') => out.extend_from_slice(&[b'\\', b]),
                        b @ 0x21..=0x7e => out.push(b),
                        b => out.extend_from_slice(&[
                            b'\\',
                            b'0' + b / 100,
                            b'0' + b / 10 % 10,
                            b'0' + b % 10,
                        ]),
                    }
                }
                out.push(b'.');
                pos += 1 + label.len();
            }
            0xc0 => {
                jumps += 1;
                let Some(&low) = wire.get(pos + 1) else {
                    break None;
                };
                if jumps > 16 {
                    break None;
                }
                end.get_or_insert(pos + 2);
                pos = ((l & 0x3f) as usize) << 8 | low as usize;
            }
            _ => break None,
        }
    };
    if result.is_none() {
        out.truncate(start);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_lowercased_escaped_and_through_pointers() {
        // Header, question `Web.Default.svc.` A IN, answer: owner pointer to 12, CNAME to
        // `x\.y` + pointer to `default.svc.`.
        let mut wire = vec![0, 1, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        wire.extend_from_slice(b"\x03Web\x07Default\x03svc\x00\x00\x01\x00\x01");
        wire.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 7]);
        wire.extend_from_slice(b"\x03x.y\xc0\x10");
        let mut out = Vec::new();
        assert_eq!(question_into(&wire, &mut out), Some(1));
        assert_eq!(out, b"web.default.svc.");
        out.clear();
        assert_eq!(cname_target_into(&wire, &mut out), Some(()));
        assert_eq!(out, b"x\\.y.default.svc.");
        // A pointer loop and a cut name leave nothing behind.
        let mut looped = wire[..12].to_vec();
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        out.clear();
        assert_eq!(question_into(&looped, &mut out), None);
        assert!(out.is_empty());
        assert_eq!(question_into(&wire[..16], &mut out), None);
        assert!(out.is_empty());
    }
}
