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
}

impl LookupLines {
    pub fn new(format: Format, sources: Arc<SourceRegistry>) -> Self {
        Self { format, sources }
    }

    /// Appends one line (with its newline) for the lookup to `out`.
    pub fn render(&self, l: &Lookup, out: &mut Vec<u8>) {
        let identities: Vec<Arc<str>> = l
            .identities
            .iter()
            .map(|id| self.sources.describe(*id).0)
            .collect();
        let diagnosis = diagnose(l);
        match self.format {
            Format::Json => {
                let mut j = Json::new(out);
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
                for i in &identities {
                    j.string(i);
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
                j.field_str("diagnosis", &diagnosis);
                j.end_object();
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
                text::escape_into(out, &l.candidates.join(","));
                out.extend_from_slice(b" Identities: ");
                let names: Vec<&str> = identities.iter().map(|i| &**i).collect();
                text::escape_into(out, &names.join(","));
                out.extend_from_slice(b" Diagnosis: ");
                text::escape_into(out, &diagnosis);
            }
        }
        out.push(b'\n');
    }
}

/// What happened to the application, and what to do about it.
pub fn diagnose(l: &Lookup) -> String {
    let n = l.candidates.len();
    let mut d = match l.outcome {
        Outcome::Answered if l.autopath.is_some() => format!(
            "Answered at the first candidate by CoreDNS autopath (CNAME to {}): no search-path \
             round trips.",
            l.autopath.as_deref().unwrap_or("?")
        ),
        Outcome::Answered if l.wasted_queries == 0 => format!(
            "Answered by {}.",
            l.answered_by.as_deref().unwrap_or("the first candidate")
        ),
        Outcome::Answered => format!(
            "Answered by candidate {} of {n} ({}) after {} queries for the search-path \
             candidates before it: ask for {}. with a trailing dot, lower ndots \
             (dnsConfig ndots:2), or enable CoreDNS autopath.",
            l.candidates
                .iter()
                .position(|c| Some(c) == l.answered_by.as_ref())
                .map_or(n, |i| i + 1),
            l.answered_by.as_deref().unwrap_or("?"),
            l.wasted_queries,
            l.asked.trim_end_matches('.'),
        ),
        Outcome::NoData => format!(
            "No candidate has an address record: {} exists without A/AAAA (NODATA) and none of \
             the {n} candidates answered; musl stops at the first NODATA, glibc tries the rest.",
            l.candidates.first().map_or("the name", String::as_str)
        ),
        Outcome::NxDomain => format!(
            "The name does not exist under any of the {n} candidates ({} queries): a typo, a \
             Service that does not exist, or the wrong namespace.",
            l.queries
        ),
        Outcome::Failed => "No candidate was answered: the resolver got SERVFAIL, REFUSED or \
                            nothing (see the session lines)."
            .to_string(),
    };
    if l.retries > 0 {
        d.push_str(&format!(
            " The resolver waited {:.1} s for lost queries and sent {} again: the five-second \
             signature of A/AAAA queries sent in parallel from one socket with one lost (the \
             node's conntrack race) or of packet loss to CoreDNS. Fixes: dnsConfig option \
             single-request-reopen (glibc), TCP (use-vc), NodeLocal DNSCache, or a node kernel \
             with the conntrack race fixes.",
            l.waited as f64 / 1e9,
            l.retries
        ));
    }
    if l.evicted {
        d.push_str(" Ended early: too many open lookups (--max-lookups).");
    }
    d
}
