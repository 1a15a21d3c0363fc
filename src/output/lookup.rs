//! Lookup lines (`"kind":"lookup"`): one per application lookup, when it ends, for the lookups
//! `--log-lookups` prints. The schema is in docs/output.md.

use super::json::Json;
use super::{text, Format};
use crate::dnstap::SourceRegistry;
use crate::lookup::{Lookup, Outcome};
use std::sync::Arc;

/// `--log-lookups`: which lookup lines are printed. Every lookup is counted in the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LookupPolicy {
    None,
    /// What the application felt: lookups not answered, and those that waited out a resolver
    /// timeout. A lookup answered at once says nothing the metrics do not (its waste is counted
    /// there), and printing every one would add a line for every few sessions.
    #[default]
    Problems,
    All,
}

impl LookupPolicy {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "problems" => Ok(Self::Problems),
            "all" => Ok(Self::All),
            other => Err(format!(
                "unknown --log-lookups value {other:?}: use problems, all or none"
            )),
        }
    }

    pub fn prints(self, l: &Lookup) -> bool {
        match self {
            Self::None => false,
            Self::Problems => l.outcome != Outcome::Answered || l.retries > 0,
            Self::All => true,
        }
    }
}

/// Renders lookups; identities are named through the registry.
pub struct LookupLines {
    format: Format,
    sources: Arc<SourceRegistry>,
    /// The diagnosis being written, reused: a line allocates nothing.
    diagnosis: String,
    /// The seconds the last line's time was in (successive lookups end in the same ones).
    seconds: super::json::Seconds,
}

impl LookupLines {
    pub fn new(format: Format, sources: Arc<SourceRegistry>) -> Self {
        Self {
            format,
            sources,
            diagnosis: String::new(),
            seconds: Default::default(),
        }
    }

    /// Appends one line (with its newline) for the lookup to `out`.
    pub fn render(&mut self, l: &Lookup, out: &mut Vec<u8>) {
        diagnose(l, &mut self.diagnosis);
        let diagnosis = self.diagnosis.as_str();
        let identities = l.identities.iter().map(|id| self.sources.describe(*id).0);
        match self.format {
            Format::Json => {
                let mut j = Json::with_seconds(out, self.seconds);
                j.begin_object();
                // Time first, as on session lines (log pipelines index it), then the kind.
                j.key("time");
                j.time(l.time);
                j.field_str("kind", "lookup");
                j.field_uint("id", l.id);
                j.key("client");
                j.ip(l.client);
                j.key("identities");
                j.begin_array();
                for i in identities {
                    j.string(&i);
                }
                j.end_array();
                j.field_str("asked", &l.asked);
                j.field_opt_str("namespace", l.namespace.as_deref());
                j.key("candidates");
                j.begin_array();
                for c in &l.candidates {
                    j.string(c);
                }
                j.end_array();
                j.field_uint("queries", l.queries as u64);
                j.field_str("outcome", l.outcome.name());
                j.field_opt_str("answered_by", l.answered_by.as_deref());
                j.field_opt_str("autopath", l.autopath.as_deref());
                j.field_uint("wasted_queries", l.wasted_queries as u64);
                j.key("latency_ms");
                j.millis(l.latency);
                j.field_uint("retries", l.retries as u64);
                j.key("waited_ms");
                j.millis(l.waited);
                j.key("evicted");
                j.bool(l.evicted);
                j.field_str("diagnosis", diagnosis);
                j.end_object();
                self.seconds = j.seconds();
            }
            Format::Text => {
                use std::io::Write;
                out.extend_from_slice(b"Time: ");
                super::json::write_rfc3339(out, l.time);
                let _ = write!(out, " Lookup: {} Client: {} Asked: ", l.id, l.client);
                text::escape_into(out, &l.asked);
                let _ = write!(
                    out,
                    " Outcome: {} Queries: {} Wasted: {} Latency: {:.3}ms Retries: {} \
                     Waited: {:.3}ms Candidates: ",
                    l.outcome.name(),
                    l.queries,
                    l.wasted_queries,
                    l.latency as f64 / 1e6,
                    l.retries,
                    l.waited as f64 / 1e6,
                );
                // Comma-separated: escaping leaves commas alone, so each is escaped alone.
                for (i, c) in l.candidates.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    text::escape_into(out, c);
                }
                out.extend_from_slice(b" Identities: ");
                for (i, name) in identities.enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    text::escape_into(out, &name);
                }
                out.extend_from_slice(b" Diagnosis: ");
                text::escape_into(out, diagnosis);
            }
        }
        out.push(b'\n');
    }
}

/// What happened to the application, and what to do about it (into `d`, replacing what it
/// held). Pieces are appended, not formatted: one per printed lookup.
pub fn diagnose(l: &Lookup, d: &mut String) {
    let n = l.candidates.len();
    let mut num = itoa::Buffer::new();
    d.clear();
    match l.outcome {
        Outcome::Answered if l.autopath.is_some() => {
            d.push_str("Answered at the first candidate by CoreDNS autopath (CNAME to ");
            d.push_str(l.autopath.as_deref().unwrap_or("?"));
            d.push_str("): no search-path round trips.");
        }
        Outcome::Answered if l.wasted_queries == 0 => {
            d.push_str("Answered by ");
            d.push_str(l.answered_by.as_deref().unwrap_or("the first candidate"));
            d.push('.');
        }
        Outcome::Answered => {
            let at = l
                .candidates
                .iter()
                .position(|c| Some(c) == l.answered_by.as_ref())
                .map_or(n, |i| i + 1);
            d.push_str("Answered by candidate ");
            d.push_str(num.format(at));
            d.push_str(" of ");
            d.push_str(num.format(n));
            d.push_str(" (");
            d.push_str(l.answered_by.as_deref().unwrap_or("?"));
            d.push_str(") after ");
            d.push_str(num.format(l.wasted_queries));
            d.push_str(" queries for the search-path candidates before it: ask for ");
            d.push_str(l.asked.trim_end_matches('.'));
            d.push_str(
                ". with a trailing dot, lower ndots (dnsConfig ndots:2), or enable CoreDNS \
                 autopath.",
            );
        }
        Outcome::NoData => {
            d.push_str("No candidate has an address record: ");
            d.push_str(l.candidates.first().map_or("the name", String::as_str));
            d.push_str(" exists without A/AAAA (NODATA) and none of the ");
            d.push_str(num.format(n));
            d.push_str(
                " candidates answered; musl stops at the first NODATA, glibc tries the rest.",
            );
        }
        Outcome::NxDomain => {
            d.push_str("The name does not exist under any of the ");
            d.push_str(num.format(n));
            d.push_str(" candidates (");
            d.push_str(num.format(l.queries));
            d.push_str(" queries): a typo, a Service that does not exist, or the wrong namespace.");
        }
        Outcome::Failed => d.push_str(
            "No candidate was answered: the resolver got SERVFAIL, REFUSED or nothing (see \
             the session lines).",
        ),
    }
    if l.retries > 0 {
        use std::fmt::Write;
        let _ = write!(d, " The resolver waited {:.1} s", l.waited as f64 / 1e9);
        d.push_str(" for lost queries and sent ");
        d.push_str(num.format(l.retries));
        d.push_str(
            " again: the five-second signature of A/AAAA queries sent in parallel from one \
             socket with one lost (the node's conntrack race) or of packet loss to CoreDNS. \
             Fixes: dnsConfig option single-request-reopen (glibc), TCP (use-vc), NodeLocal \
             DNSCache, or a node kernel with the conntrack race fixes.",
        );
    }
    if l.evicted {
        d.push_str(" Ended early: too many open lookups (--max-lookups).");
    }
}
