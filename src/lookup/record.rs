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
    let msg = domain::base::Message::from_octets(wire).ok()?;
    let q = msg.first_question()?;
    let start = out.len();
    append_name(out, q.qname());
    out[start..].make_ascii_lowercase();
    Some(q.qtype().to_int())
}

/// Appends the target of the first answer record when it is a CNAME.
fn cname_target_into(wire: &[u8], out: &mut Vec<u8>) -> Option<()> {
    use domain::base::iana::Rtype;
    use domain::base::ParsedName;
    use domain::rdata::Cname;
    let msg = domain::base::Message::from_octets(wire).ok()?;
    let first = msg.answer().ok()?.next()?.ok()?;
    if first.rtype() != Rtype::CNAME {
        return None;
    }
    let record = first.to_record::<Cname<ParsedName<&[u8]>>>().ok()??;
    let start = out.len();
    append_name(out, record.data().cname());
    out[start..].make_ascii_lowercase();
    Some(())
}

fn append_name<Octs: AsRef<[u8]>>(out: &mut Vec<u8>, name: &domain::base::ParsedName<Octs>) {
    use std::io::Write;
    let _ = write!(out, "{name}.");
}
