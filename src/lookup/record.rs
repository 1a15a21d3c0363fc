//! What a shard hands the lookup stage per finished session: the few facts lookups need
//! (`SessionFacts`, copied from the session's `Diagnosis`, which has read the stored CQ and CR
//! once for every consumer) and the session's rendered line, if it is printed, which the stage
//! completes with its lookup id. Batched like the writer's lines: names live in one string and
//! lines in one byte buffer per batch, so a session costs no allocation of its own.

use super::{Outcome, Query};
use crate::diagnosis::Diagnosis;
use crate::dnstap::{Nanos, SourceId};
use std::net::SocketAddr;
use std::ops::Range;

/// One finished session in a batch. `line` is empty when the session is not printed.
#[derive(Debug, Clone)]
pub struct Record {
    pub facts: Option<SessionFacts>,
    pub line: Range<usize>,
}

/// A session as the lookup stage sees it; names are spans of the batch's names.
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
    /// The sessions' lines.
    pub bytes: Vec<u8>,
    /// Their names, lowercased: a `String`, so that the stage reads them without checking
    /// their bytes again.
    names: String,
}

impl RecordBatch {
    /// Room for as many line bytes and names as `like` holds (the batch it replaces).
    pub fn with_room_of(like: &RecordBatch) -> Self {
        Self {
            records: Vec::with_capacity(128),
            bytes: Vec::with_capacity(like.bytes.capacity()),
            names: String::with_capacity(like.names.capacity()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Adds a session: its facts (none for one without a client query) and, through
    /// `render` (which appends to the batch's bytes), its line when it is printed.
    pub fn push(&mut self, d: &Diagnosis, render: Option<impl FnOnce(&mut Vec<u8>)>) {
        let facts = facts(d, &mut self.names);
        let start = self.bytes.len();
        if let Some(render) = render {
            render(&mut self.bytes);
        }
        let line = start..self.bytes.len();
        self.records.push(Record { facts, line });
    }

    /// The query of record `r`, borrowing its names from the batch.
    pub fn query<'a>(&'a self, f: &SessionFacts) -> Option<Query<'a>> {
        let text = |r: &Range<usize>| self.names.get(r.clone());
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

/// The client side of the session as lookups need it: the CQ's client socket, time and
/// question, the CR's time, outcome and first answer's CNAME target. None without a CQ with a
/// question. Names are copied lowercased (lookups compare them case-insensitively).
fn facts(d: &Diagnosis, names: &mut String) -> Option<SessionFacts> {
    let query_time = d.query_time?;
    let client = d.client?;
    let (qname, qtype) = (d.qname()?, d.qtype?);
    let outcome = Outcome::of(d.rcode.zip(d.answer_count()));
    let cname_target = d.cname_target().filter(|_| outcome == Outcome::Answered);
    Some(SessionFacts {
        client,
        identity: d.source,
        qtype,
        outcome,
        query_time,
        response_time: d.response_time,
        dns_id: d.dns_id,
        qname: lowercase_into(qname, names),
        cname_target: cname_target.map(|t| lowercase_into(t, names)),
    })
}

/// Appends `name` lowercased; returns where it lies. Copied, then lowercased in place: a
/// byte at a time through an iterator cost ~250 instructions a session.
fn lowercase_into(name: &str, names: &mut String) -> Range<usize> {
    let start = names.len();
    names.push_str(name);
    names[start..].make_ascii_lowercase();
    start..names.len()
}
