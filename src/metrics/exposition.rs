//! `/metrics`: one `Collector` turns a [`Snapshot`] into metric families, and
//! prometheus-client encodes them as Prometheus text 0.0.4 or OpenMetrics 1.0, so both formats
//! come from the same families and share the crate's name, escaping and number rules.

use super::model::{
    message_type_name, rcode_label, upstream_name, CappedLabel, Histogram, IdentityLabel,
    SeriesFamily, Snapshot, Telemetry, LATENCY_BUCKETS, QTYPE_LABELS,
};
use super::{Discard, DiscardUnit, Disconnect};
use crate::dnstap::Role;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub const PREFIX: &str = "dnstap_analyser";

/// One family per unit of drop, each with every reason of its unit (also at 0).
const DISCARD_FAMILIES: [(DiscardUnit, &str, &str); 4] = [
    (
        DiscardUnit::Message,
        "discarded_messages",
        "dnstap messages dropped, by reason.",
    ),
    (
        DiscardUnit::Frame,
        "discarded_frames",
        "Frame Streams data frames dropped without a message, by reason.",
    ),
    (
        DiscardUnit::Connection,
        "discarded_connections",
        "dnstap connections dropped or refused, by reason.",
    ),
    (
        DiscardUnit::Time,
        "rejected_times",
        "Message times rejected as implausible (before 2000, or past --max-time-ahead): the message is kept at its stream's clock.",
    ),
];

/// The exposition format a scraper gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4: the default.
    Prometheus,
    /// OpenMetrics text 1.0.0, when the `Accept` header prefers it.
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// OpenMetrics when the `Accept` header lists `application/openmetrics-text` (version
    /// 1.0.0, 0.0.1 or none) with a quality at least that of any text/plain or wildcard range;
    /// Prometheus text otherwise, as Go's `expfmt.Negotiate` does.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Self::Prometheus;
        };
        let (mut openmetrics, mut other) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let (mut q, mut version_ok) = (1.0f32, true);
            for p in parts {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                match k.trim().to_ascii_lowercase().as_str() {
                    "q" => q = v.trim().parse().unwrap_or(0.0),
                    "version" => version_ok = matches!(v.trim(), "1.0.0" | "0.0.1"),
                    _ => {}
                }
            }
            match media.as_str() {
                "application/openmetrics-text" if version_ok => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => other = other.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= other {
            Self::OpenMetrics
        } else {
            Self::Prometheus
        }
    }
}

/// Renders `/metrics` from the telemetry; built once per server.
#[derive(Debug)]
pub struct Exposition {
    registry: Registry,
}

impl Exposition {
    pub fn new(telemetry: Arc<Telemetry>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessFamilies));
        registry
            .sub_registry_with_prefix(PREFIX)
            .register_collector(Box::new(Families { telemetry }));
        Self { registry }
    }

    pub fn render(&self, format: Format) -> Result<String, fmt::Error> {
        let mut out = String::with_capacity(64 * 1024);
        match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?
            }
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &self.registry)?
            }
        }
        Ok(out)
    }
}

struct Families {
    telemetry: Arc<Telemetry>,
}

impl fmt::Debug for Families {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Families")
    }
}

/// The client libraries' `process_*` families, unprefixed so that dashboards and rules made
/// for any exporter find them.
#[derive(Debug)]
struct ProcessFamilies;

impl Collector for ProcessFamilies {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let Some(p) = super::process::ProcessStats::read() else {
            return Ok(());
        };
        let enc = &mut enc;
        let m = &mut family(
            enc,
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            MetricType::Counter,
        )?;
        let no_labels: [(&str, &str); 0] = [];
        ConstCounter::new(p.cpu_seconds).encode(m.encode_family(&no_labels)?)?;
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                p.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                p.virtual_bytes as f64,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                p.open_fds as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                p.start_time_seconds,
            ),
        ];
        for (name, help, v) in gauges {
            gauge(
                &mut family(enc, name, help, None, MetricType::Gauge)?,
                [],
                v,
            )?;
        }
        if let Some(max) = p.max_fds {
            let m = &mut family(
                enc,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                None,
                MetricType::Gauge,
            )?;
            gauge(m, [], max as f64)?;
        }
        Ok(())
    }
}

/// One family: its descriptor, then one sample (or histogram) per label set.
fn family<'a>(
    enc: &'a mut DescriptorEncoder<'_>,
    name: &'a str,
    help: &str,
    unit: Option<&'a Unit>,
    kind: MetricType,
) -> Result<MetricEncoder<'a>, fmt::Error> {
    enc.encode_descriptor(name, help, unit, kind)
}

fn counter<const N: usize>(
    m: &mut MetricEncoder<'_>,
    labels: [(&str, &str); N],
    v: u64,
) -> fmt::Result {
    ConstCounter::new(v).encode(m.encode_family(&labels)?)
}

fn gauge<const N: usize>(
    m: &mut MetricEncoder<'_>,
    labels: [(&str, &str); N],
    v: f64,
) -> fmt::Result {
    ConstGauge::new(v).encode(m.encode_family(&labels)?)
}

/// Gauges of counts print as integers.
fn gauge_count<const N: usize>(
    m: &mut MetricEncoder<'_>,
    labels: [(&str, &str); N],
    v: u64,
) -> fmt::Result {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(m.encode_family(&labels)?)
}

fn histogram<const N: usize>(
    m: &mut MetricEncoder<'_>,
    labels: [(&str, &str); N],
    h: &Histogram,
) -> fmt::Result {
    let mut buckets = [(0.0, 0u64); 17];
    for (i, b) in buckets.iter_mut().enumerate() {
        *b = (
            LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY),
            h.counts[i],
        );
    }
    m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
        h.sum_seconds(),
        h.count(),
        &buckets,
        None,
    )
}

impl Collector for Families {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let snap = self.telemetry.snapshot();
        let names = IdentityNames::new(&self.telemetry);
        self.dns_outcomes(&mut enc, &snap, &names)?;
        self.analyser(&mut enc, &snap, &names)?;
        match self.telemetry.metrics.lookups.get() {
            Some(board) => lookup_families(&mut enc, &board.snapshot()),
            None => Ok(()),
        }
    }
}

/// Identity label values, resolved once per scrape.
struct IdentityNames<'a> {
    telemetry: &'a Telemetry,
    cache: std::cell::RefCell<BTreeMap<IdentityLabel, Arc<str>>>,
}

impl<'a> IdentityNames<'a> {
    fn new(telemetry: &'a Telemetry) -> Self {
        Self {
            telemetry,
            cache: Default::default(),
        }
    }

    fn get(&self, l: IdentityLabel) -> Arc<str> {
        self.cache
            .borrow_mut()
            .entry(l)
            .or_insert_with(|| label_value(&self.telemetry.identity_name(l)).into())
            .clone()
    }
}

/// [`label_value`] of a stored name, sharing it when it needs no change.
fn label_arc(name: Arc<str>) -> Arc<str> {
    match label_value(&name) {
        std::borrow::Cow::Borrowed(_) => name.clone(),
        std::borrow::Cow::Owned(text) => text.into(),
    }
}

/// A sender-controlled string as a label value: control characters (ESC, BEL, NUL, …) written
/// as `\xHH` / `\u{H}` text, so no terminal or parser reading /metrics sees them raw. The
/// text format itself escapes `\`, `"` and newline (kept as they are here for that).
pub(crate) fn label_value(s: &str) -> std::borrow::Cow<'_, str> {
    use std::fmt::Write;
    if !s.chars().any(|c| c.is_control() && c != '\n') {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push(c),
            c if (c as u32) < 0x100 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.into()
}

impl Families {
    fn dns_outcomes(
        &self,
        enc: &mut DescriptorEncoder<'_>,
        snap: &Snapshot,
        names: &IdentityNames<'_>,
    ) -> fmt::Result {
        let c = &snap.counts;
        let sessions: BTreeMap<_, _> = c
            .sessions
            .iter()
            .map(|(k, v)| {
                let namespace = label_arc(self.telemetry.namespaces.name(k.namespace));
                let (rcode, qtype) = (rcode_label(k.rcode), QTYPE_LABELS[k.qtype as usize].1);
                let key = (
                    names.get(k.identity),
                    namespace,
                    k.status,
                    k.bitmap,
                    k.cause,
                );
                ((key, rcode, qtype), *v)
            })
            .fold(BTreeMap::new(), sum_into);
        let mut m = family(
            enc,
            "sessions",
            "Finished DNS request sessions by sender identity, client namespace (from the sender's extra; none without), status, message bitmap (1 CQ|2 CR|4 FQ|8 FR), cause, the client's rcode (none without a response) and qtype.",
            None,
            MetricType::Counter,
        )?;
        for (((identity, namespace, status, bitmap, cause), rcode, qtype), v) in sessions {
            let bitmap = bitmap.to_string();
            let labels = [
                ("identity", &*identity),
                ("namespace", &*namespace),
                ("status", status.name()),
                ("bitmap", &bitmap),
                ("cause", cause.name()),
                ("rcode", rcode),
                ("qtype", qtype),
            ];
            counter(&mut m, labels, v)?;
        }

        // Fed by /top's sketch, and only while /top is served: the one family with a qname.
        if let Some(names) = self.telemetry.top_failing_names() {
            let mut m = family(
                enc,
                "top_failing_names",
                "Failed sessions in /top's window of the question names with the most failures (at most 100; only names certainly above the sketch's error bound), by their dominant cause.",
                None,
                MetricType::Gauge,
            )?;
            for n in names {
                gauge_count(
                    &mut m,
                    [
                        ("qname", &*label_value(&n.qname)),
                        ("cause", n.cause.name()),
                    ],
                    n.failed,
                )?;
            }
        }

        let attempts: BTreeMap<_, _> = c
            .attempts
            .iter()
            .map(|((i, u, o), v)| ((names.get(*i), upstream_name(*u), *o), *v))
            .fold(BTreeMap::new(), sum_into);
        let mut m = family(
            enc,
            "upstream_attempts",
            "Upstream (forwarder) attempts by sender identity, upstream IP:PORT and outcome.",
            None,
            MetricType::Counter,
        )?;
        for ((identity, upstream, outcome), v) in attempts {
            let labels = [
                ("identity", &*identity),
                ("upstream", &upstream),
                ("outcome", outcome.name()),
            ];
            counter(&mut m, labels, v)?;
        }

        let rtt: BTreeMap<_, _> = c
            .upstream_rtt
            .iter()
            .map(|(u, h)| (upstream_name(*u), h))
            .collect();
        let mut m = family(
            enc,
            "upstream_rtt",
            "Upstream round-trip time, FORWARDER_QUERY to FORWARDER_RESPONSE.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (upstream, h) in rtt {
            histogram(&mut m, [("upstream", &upstream)], h)?;
        }

        let latency: BTreeMap<_, _> = c
            .client_latency
            .iter()
            .map(|((i, cause), h)| ((names.get(*i), *cause), h.clone()))
            .fold(BTreeMap::new(), |mut acc, (k, h)| {
                let e: &mut Histogram = acc.entry(k).or_default();
                for (a, b) in e.counts.iter_mut().zip(h.counts) {
                    *a += b;
                }
                e.sum_nanos += h.sum_nanos;
                acc
            });
        let mut m = family(
            enc,
            "client_latency",
            "Client latency, CLIENT_QUERY to CLIENT_RESPONSE, by sender identity and cause.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for ((identity, cause), h) in latency {
            histogram(
                &mut m,
                [("identity", &*identity), ("cause", cause.name())],
                &h,
            )?;
        }
        Ok(())
    }

    fn analyser(
        &self,
        enc: &mut DescriptorEncoder<'_>,
        snap: &Snapshot,
        names: &IdentityNames<'_>,
    ) -> fmt::Result {
        let metrics = &self.telemetry.metrics;
        let c = &snap.counts;
        let roles = [
            Role::ClientQuery,
            Role::ClientResponse,
            Role::UpstreamQuery,
            Role::UpstreamResponse,
        ];
        let messages: BTreeMap<_, _> = c
            .messages
            .iter()
            .flat_map(|(i, by)| {
                let name = names.get(*i);
                roles
                    .iter()
                    .zip(*by)
                    .map(move |(r, n)| ((name.clone(), message_type_name(*r)), n))
            })
            .fold(BTreeMap::new(), sum_into);
        let mut m = family(
            enc,
            "messages",
            "dnstap messages received by sender identity and type (RESOLVER_* counted as FORWARDER_*).",
            None,
            MetricType::Counter,
        )?;
        for ((identity, kind), v) in messages {
            counter(&mut m, [("identity", &*identity), ("type", kind)], v)?;
        }

        let mut m = family(
            enc,
            "frames",
            "Frame Streams data frames received.",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, [], metrics.frames.load(Relaxed))?;
        let mut m = family(
            enc,
            "received",
            "Bytes of dnstap received.",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?;
        counter(&mut m, [], metrics.bytes.load(Relaxed))?;

        for (unit, name, help) in DISCARD_FAMILIES {
            let mut m = family(enc, name, help, None, MetricType::Counter)?;
            for d in Discard::ALL.into_iter().filter(|d| d.unit() == unit) {
                match unit {
                    DiscardUnit::Time => counter(&mut m, [], metrics.discarded(d))?,
                    _ => counter(&mut m, [("reason", d.name())], metrics.discarded(d))?,
                }
            }
        }

        let mut m = family(
            enc,
            "queue_depth_events",
            "Events waiting in each shard's queue.",
            None,
            MetricType::Gauge,
        )?;
        for (i, depth) in snap.queue_depths.iter().enumerate() {
            gauge_count(&mut m, [("shard", &i.to_string())], *depth)?;
        }
        let mut m = family(
            enc,
            "queue_capacity_events",
            "Events each shard's queue holds at most (--queue-capacity).",
            None,
            MetricType::Gauge,
        )?;
        gauge_count(&mut m, [], snap.queue_capacity)?;

        let mut m = family(
            enc,
            "open_sessions",
            "Sessions each shard holds open.",
            None,
            MetricType::Gauge,
        )?;
        for (i, n) in &snap.open_sessions {
            gauge_count(&mut m, [("shard", &i.to_string())], *n)?;
        }
        let mut m = family(
            enc,
            "sessions_evicted",
            "Sessions evicted from a full session table (--max-sessions).",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, [], c.evicted.values().sum())?;
        let mut m = family(
            enc,
            "sessions_evicted_by_identity",
            "Sessions evicted from a full session table, by the evicted session's sender identity.",
            None,
            MetricType::Counter,
        )?;
        let evicted: BTreeMap<_, _> = c
            .evicted
            .iter()
            .map(|(i, v)| (names.get(*i), *v))
            .fold(BTreeMap::new(), sum_into);
        for (identity, v) in evicted {
            counter(&mut m, [("identity", &*identity)], v)?;
        }
        let mut m = family(
            enc,
            "recall_forgotten",
            "Upstream answers and attempts a stream forgot within their windows to stay bounded: cached_upstream_error and rejected_upstream_failing may be missed for them.",
            None,
            MetricType::Counter,
        )?;
        let forgotten = self.telemetry.metrics.recall_forgotten.load(Relaxed);
        counter(&mut m, [], forgotten)?;

        self.connections(enc, snap)?;

        let mut m = family(
            enc,
            "identities_refused",
            "New identities refused (--max-identities, --identities-per-connection), by peer address (256 at most, then \"other\"; \"local\": unix sockets and files).",
            None,
            MetricType::Counter,
        )?;
        let mut refused = metrics.identities_refused();
        refused.sort_unstable();
        for (peer, v) in refused {
            counter(&mut m, [("peer", &*peer)], v)?;
        }

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let lag: BTreeMap<_, _> = c
            .latest_event
            .iter()
            .map(|(i, t)| (names.get(*i), (now - *t as i128) as f64 / 1e9))
            .collect();
        let mut m = family(
            enc,
            "watermark_lag",
            "Wall clock minus the latest event time of each sender identity.",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for (identity, lag) in lag {
            gauge(&mut m, [("identity", &*identity)], lag)?;
        }

        let mut m = family(
            enc,
            "label_overflow",
            "Recordings counted under label value \"other\" because the label's cap was reached.",
            None,
            MetricType::Counter,
        )?;
        for l in CappedLabel::ALL {
            counter(&mut m, [("label", l.name())], c.overflow[l as usize])?;
        }
        let mut m = family(
            enc,
            "series_overflow",
            "Recordings counted under a label set collapsed to \"other\" because the family's or the total series budget was full (--max-series-per-family, --max-series).",
            None,
            MetricType::Counter,
        )?;
        for f in SeriesFamily::ALL {
            counter(
                &mut m,
                [("family", f.name())],
                c.series_overflow[f as usize],
            )?;
        }

        // The scale-down signal: a pod that shut down cleanly sent STOP; a silent one did not.
        // One name from two addresses is stopped when both are.
        let mut stopped = BTreeMap::new();
        for (i, s) in self.telemetry.identities_stopped() {
            *stopped.entry(names.get(i)).or_insert(true) &= s;
        }
        let mut m = family(
            enc,
            "identity_stopped",
            "1 when no stream carries the sender identity and the last one that did ended with the sender's Frame Streams STOP (a clean shutdown, e.g. scale-down); 0 while a stream carries it, or when the last one ended without STOP.",
            None,
            MetricType::Gauge,
        )?;
        for (identity, s) in stopped {
            gauge_count(&mut m, [("identity", &*identity)], s as u64)?;
        }

        let mut m = family(
            enc,
            "build_info",
            "Version of this analyser; always 1.",
            None,
            MetricType::Gauge,
        )?;
        gauge_count(&mut m, [("version", env!("CARGO_PKG_VERSION"))], 1)
    }

    fn connections(&self, enc: &mut DescriptorEncoder<'_>, snap: &Snapshot) -> fmt::Result {
        let metrics = &self.telemetry.metrics;
        if let Some(open) = snap.connections_open {
            let mut m = family(
                enc,
                "connections_open",
                "Open dnstap connections.",
                None,
                MetricType::Gauge,
            )?;
            gauge_count(&mut m, [], open)?;
        }
        let mut m = family(
            enc,
            "connections_accepted",
            "dnstap connections accepted.",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, [], metrics.connections_accepted.load(Relaxed))?;
        let mut m = family(
            enc,
            "connections_refused",
            "dnstap connections refused over --max-connections.",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, [], metrics.discarded(Discard::ConnectionLimit))?;
        let mut m = family(
            enc,
            "connections_closed",
            "dnstap connections closed, by reason.",
            None,
            MetricType::Counter,
        )?;
        for d in Disconnect::ALL {
            counter(&mut m, [("reason", d.name())], metrics.disconnects(d))?;
        }
        // How an operator sees that CoreDNS really connected over TLS, and that a rotated
        // certificate was picked up (or refused).
        let mut m = family(
            enc,
            "tls_handshakes",
            "TLS handshakes completed on tls:// listeners.",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, [], metrics.tls_handshakes.load(Relaxed))?;
        let mut m = family(
            enc,
            "tls_certificate_reloads",
            "Certificate files reloaded after they changed, by result (error: the old certificate stays).",
            None,
            MetricType::Counter,
        )?;
        counter(
            &mut m,
            [("result", "ok")],
            metrics.tls_cert_reloads.load(Relaxed),
        )?;
        counter(
            &mut m,
            [("result", "error")],
            metrics.tls_cert_reload_errors.load(Relaxed),
        )?;
        let mut m = family(
            enc,
            "metrics_auth_refused",
            "Requests to the metrics port refused by client authentication (--metrics-web-config), by reason.",
            None,
            MetricType::Counter,
        )?;
        for (r, n) in super::auth::Refusal::ALL
            .iter()
            .zip(&metrics.metrics_auth_refused)
        {
            counter(&mut m, [("reason", r.name())], n.load(Relaxed))?;
        }
        Ok(())
    }
}

/// Folds samples whose label values coincide after naming (two sources with one name).
/// The lookup families (src/metrics/lookups.rs, docs/lookups.md): what applications felt.
fn lookup_families(
    enc: &mut DescriptorEncoder<'_>,
    l: &super::lookups::LookupStats,
) -> fmt::Result {
    use super::lookups::QUERY_BUCKETS;
    let mut m = family(
        enc,
        "lookups",
        "Application lookups (the search-path candidates of one getaddrinfo joined) by outcome.",
        None,
        MetricType::Counter,
    )?;
    for o in crate::lookup::Outcome::ALL {
        counter(&mut m, [("outcome", o.name())], l.outcome(o))?;
    }
    let mut m = family(
        enc,
        "lookups_evicted",
        "Lookups ended early because --max-lookups were open.",
        None,
        MetricType::Counter,
    )?;
    counter(&mut m, [], l.evicted)?;
    let mut m = family(
        enc,
        "lookup_latency",
        "Lookup latency as the application sees it: first query to last response.",
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?;
    histogram(&mut m, [], &l.latency)?;
    let mut m = family(
        enc,
        "lookup_queries",
        "Queries per lookup (every candidate, A and AAAA, resends included).",
        None,
        MetricType::Histogram,
    )?;
    let mut buckets = [(0.0, 0u64); QUERY_BUCKETS.len() + 1];
    for (i, b) in buckets.iter_mut().enumerate() {
        let bound = QUERY_BUCKETS.get(i).map_or(f64::INFINITY, |&q| q as f64);
        *b = (bound, l.queries[i]);
    }
    let count = l.queries.iter().sum();
    let no_labels: [(&str, &str); 0] = [];
    m.encode_family(&no_labels)?
        .encode_histogram::<NoLabelSet>(l.queries_sum as f64, count, &buckets, None)?;
    let mut m = family(
        enc,
        "lookup_wasted_queries",
        "Queries for search-path candidates before the one a lookup ended at, by the identity that saw its first query and namespace.",
        None,
        MetricType::Counter,
    )?;
    for ((identity, ns), v) in &l.wasted {
        counter(
            &mut m,
            [("identity", identity), ("client_namespace", ns)],
            *v,
        )?;
    }
    let mut m = family(
        enc,
        "lookup_resolver_timeouts",
        "Lookups whose resolver waited out a timeout and sent queries again (the five-second signature), by identity and namespace.",
        None,
        MetricType::Counter,
    )?;
    for ((identity, ns), w) in &l.waits {
        counter(
            &mut m,
            [("identity", identity), ("client_namespace", ns)],
            w.lookups,
        )?;
    }
    let mut m = family(
        enc,
        "lookup_waited_seconds",
        "Time applications lost to resolver timeouts, by identity and namespace.",
        None,
        MetricType::Counter,
    )?;
    for ((identity, ns), w) in &l.waits {
        let labels = [
            ("identity", identity.as_str()),
            ("client_namespace", ns.as_str()),
        ];
        prometheus_client::metrics::counter::ConstCounter::new(w.waited as f64 / 1e9)
            .encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn sum_into<K: Ord>(mut acc: BTreeMap<K, u64>, (k, v): (K, u64)) -> BTreeMap<K, u64> {
    *acc.entry(k).or_insert(0) += v;
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlate::{BitMap, LossReason, Status, Verdict};
    use crate::diagnosis::{Attempt, Cause, Diagnosis};
    use crate::dnstap::SourceRegistry;
    use crate::metrics::model::{AttemptOutcome, TelemetryConfig, ThreadKind, UpstreamLabel};
    use crate::metrics::Metrics;
    use std::collections::{BTreeSet, HashMap};

    pub(crate) const NASTY: &str = "pod \"a\"\\b\nc";

    #[test]
    fn control_characters_in_label_values_are_written_as_text() {
        assert_eq!(label_value("pod-1"), "pod-1");
        assert_eq!(label_value(NASTY), NASTY, "the format escapes these itself");
        assert_eq!(
            label_value("a\u{1b}[31mb\u{7}\u{0}c\u{9f}"),
            "a\\x1b[31mb\\x07\\x00c\\x9f"
        );
    }

    /// The namespace label comes from the sender's `extra`: its control characters too.
    #[test]
    fn a_namespace_with_control_characters_is_written_as_text() {
        let sources = Arc::new(SourceRegistry::default());
        let t = Arc::new(Telemetry::new(
            Arc::new(Metrics::default()),
            sources.clone(),
            TelemetryConfig::default(),
        ));
        let source = sources.intern(b"coredns-2", b"1.11");
        let ok = Verdict {
            status: Status::Succeeded,
            bitmap: BitMap(3),
            loss: None,
            incomplete: None,
        };
        let mut d = Diagnosis::from_parts(source, ok, None, &[]);
        d.set_extra_for_tests("namespace=ns\u{1b}[31m".as_bytes());
        let mut shard = t.thread_stats(ThreadKind::Shard(0));
        shard.record_session(&d);
        drop(shard);
        let text = Exposition::new(t).render(Format::Prometheus).unwrap();
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.contains("namespace=\"ns\\\\x1b[31m\""), "{text}");
    }

    /// A telemetry with a bit of everything, including an identity that needs escaping.
    pub(crate) fn sample_telemetry() -> Arc<Telemetry> {
        let sources = Arc::new(SourceRegistry::default());
        let t = Arc::new(Telemetry::new(
            Arc::new(Metrics::default()),
            sources.clone(),
            TelemetryConfig::default(),
        ));
        let nasty = sources.intern(NASTY.as_bytes(), b"1.11");
        let plain = sources.intern(b"coredns-1", b"1.11");
        let mut shard = t.thread_stats(ThreadKind::Shard(0));
        let up = Some("10.0.0.1:53".parse().unwrap());
        let answered = Attempt::ended(up, AttemptOutcome::Answered, Some(3_000_000));
        let timeout = Attempt::ended(up, AttemptOutcome::Timeout, None);
        let ok = Verdict {
            status: Status::Succeeded,
            bitmap: BitMap(15),
            loss: None,
            incomplete: None,
        };
        let failed = Verdict {
            status: Status::Failed,
            bitmap: BitMap(5),
            loss: None,
            incomplete: None,
        };
        let lost = Verdict {
            status: Status::SampleLoss,
            bitmap: BitMap(1),
            loss: Some(LossReason::SessionTableFull),
            incomplete: None,
        };
        for _ in 0..3 {
            shard.record_session(&Diagnosis::from_parts(
                nasty,
                ok,
                Some(4_000_000),
                &[answered],
            ));
        }
        shard.record_session(&Diagnosis::from_parts(
            plain,
            failed,
            None,
            &[timeout, timeout],
        ));
        shard.record_session(&Diagnosis::from_parts(plain, lost, None, &[]));
        shard.record_session(&Diagnosis::from_parts(
            plain,
            ok,
            Some(20_000_000_000),
            &[answered],
        ));
        shard.set_open_sessions(2);
        shard.note_event_time(plain, 1);
        drop(shard);
        let mut reader = t.thread_stats(ThreadKind::Reader(0));
        reader.count_messages(nasty, Role::ClientQuery, 3);
        reader.count_messages(plain, Role::UpstreamResponse, 2);
        drop(reader);
        t.metrics.frames.store(9, Relaxed);
        t.metrics.discard(Discard::QueueFull, 4);
        t.metrics.discard(Discard::Protobuf, 5);
        t.metrics.discard(Discard::ConnectionLimit, 6);
        t.metrics.discard(Discard::TimeOutOfRange, 7);
        t.set_queues((0..2).map(|_| Default::default()).collect(), 1024);
        t
    }

    type Labels = Vec<(String, String)>;

    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: Labels,
        value: f64,
    }

    /// Parses `name{l="v",...} value`, undoing the escapes of label values.
    fn parse_sample(line: &str) -> Sample {
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let Some((name, rest)) = series.split_once('{') else {
            return Sample {
                name: series.into(),
                labels: vec![],
                value,
            };
        };
        let mut labels = Vec::new();
        let mut chars = rest.chars().peekable();
        loop {
            let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
            assert_eq!(chars.next(), Some('"'), "label value quoted in {line:?}");
            let mut v = String::new();
            loop {
                match chars.next().expect("unterminated label value") {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('n') => v.push('\n'),
                        Some(c @ ('\\' | '"')) => v.push(c),
                        other => panic!("bad escape {other:?} in {line:?}"),
                    },
                    '\n' => panic!("raw newline in {line:?}"),
                    c => v.push(c),
                }
            }
            labels.push((key, v));
            match chars.next() {
                Some(',') => {}
                Some('}') => break,
                other => panic!("unexpected {other:?} in {line:?}"),
            }
        }
        Sample {
            name: name.into(),
            labels,
            value,
        }
    }

    struct Parsed {
        types: HashMap<String, String>,
        samples: Vec<Sample>,
    }

    /// Structural checks in the spirit of `promtool check metrics`: HELP and TYPE once per
    /// family and before its samples, samples belong to a declared family, names follow the
    /// conventions, histogram buckets are cumulative and end with `+Inf` equal to `_count`.
    fn check_exposition(text: &str, openmetrics: bool) -> Parsed {
        let mut types = HashMap::new();
        let mut helps = BTreeSet::new();
        let mut samples = Vec::new();
        let mut lines: Vec<&str> = text.lines().collect();
        if openmetrics {
            assert_eq!(lines.pop(), Some("# EOF"), "OpenMetrics ends with # EOF");
        }
        for line in lines {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(helps.insert(name.clone()), "HELP twice for {name}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(helps.contains(name), "TYPE before HELP for {name}");
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "TYPE twice for {name}"
                );
            } else if line.starts_with("# UNIT ") {
                assert!(openmetrics, "UNIT only in OpenMetrics");
            } else {
                assert!(!line.starts_with('#'), "unknown comment {line:?}");
                samples.push(parse_sample(line));
            }
        }
        for s in &samples {
            assert!(
                s.name.starts_with("dnstap_analyser_") || s.name.starts_with("process_"),
                "{}",
                s.name
            );
            let family = family_of(&s.name, &types)
                .unwrap_or_else(|| panic!("sample {} of no declared family", s.name));
            match types[family].as_str() {
                "counter" => {
                    assert!(s.name.ends_with("_total"), "{}", s.name);
                    assert!(s.value >= 0.0);
                }
                "histogram" | "gauge" => {}
                other => panic!("unexpected type {other}"),
            }
            if !openmetrics {
                assert!(!family.ends_with("_total") || types[family] == "counter");
            }
        }
        check_histograms(&samples, &types);
        Parsed { types, samples }
    }

    fn family_of<'a>(name: &str, types: &'a HashMap<String, String>) -> Option<&'a String> {
        let candidates = [
            Some(name),
            name.strip_suffix("_total"),
            name.strip_suffix("_bucket"),
            name.strip_suffix("_sum"),
            name.strip_suffix("_count"),
        ];
        candidates
            .into_iter()
            .flatten()
            .find_map(|n| types.get_key_value(n).map(|(k, _)| k))
    }

    fn check_histograms(samples: &[Sample], types: &HashMap<String, String>) {
        let hist: Vec<&String> = types
            .iter()
            .filter(|(_, t)| *t == "histogram")
            .map(|(n, _)| n)
            .collect();
        assert!(!hist.is_empty());
        for family in hist {
            let bucket = format!("{family}_bucket");
            let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
            for s in samples.iter().filter(|s| s.name == bucket) {
                let le = s.labels.iter().find(|(k, _)| k == "le").expect("le label");
                let le: f64 = if le.1 == "+Inf" {
                    f64::INFINITY
                } else {
                    le.1.parse().unwrap()
                };
                let rest: Vec<_> = s
                    .labels
                    .iter()
                    .filter(|(k, _)| k != "le")
                    .cloned()
                    .collect();
                series.entry(rest).or_default().push((le, s.value));
            }
            assert!(!series.is_empty(), "{family} has samples");
            for (labels, buckets) in series {
                assert_eq!(buckets.len(), 17, "{family}{labels:?}: 16 bounds and +Inf");
                for w in buckets.windows(2) {
                    assert!(w[0].0 < w[1].0, "le ascending");
                    assert!(w[0].1 <= w[1].1, "cumulative");
                }
                assert_eq!(buckets.last().unwrap().0, f64::INFINITY);
                let count = samples
                    .iter()
                    .find(|s| s.name == format!("{family}_count") && s.labels == labels)
                    .expect("_count");
                assert_eq!(count.value, buckets.last().unwrap().1);
                assert!(samples
                    .iter()
                    .any(|s| s.name == format!("{family}_sum") && s.labels == labels));
            }
        }
    }

    fn value(p: &Parsed, name: &str, labels: &[(&str, &str)]) -> f64 {
        p.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
            })
            .unwrap_or_else(|| panic!("no {name}{labels:?}"))
            .value
    }

    const CONTRACT_FAMILIES: [(&str, &str); 23] = [
        ("dnstap_analyser_sessions_total", "counter"),
        ("dnstap_analyser_upstream_attempts_total", "counter"),
        ("dnstap_analyser_upstream_rtt_seconds", "histogram"),
        ("dnstap_analyser_client_latency_seconds", "histogram"),
        ("dnstap_analyser_messages_total", "counter"),
        ("dnstap_analyser_frames_total", "counter"),
        ("dnstap_analyser_received_bytes_total", "counter"),
        ("dnstap_analyser_discarded_messages_total", "counter"),
        ("dnstap_analyser_discarded_frames_total", "counter"),
        ("dnstap_analyser_discarded_connections_total", "counter"),
        ("dnstap_analyser_rejected_times_total", "counter"),
        ("dnstap_analyser_queue_depth_events", "gauge"),
        ("dnstap_analyser_queue_capacity_events", "gauge"),
        ("dnstap_analyser_open_sessions", "gauge"),
        ("dnstap_analyser_sessions_evicted_total", "counter"),
        ("dnstap_analyser_connections_accepted_total", "counter"),
        ("dnstap_analyser_connections_refused_total", "counter"),
        ("dnstap_analyser_connections_closed_total", "counter"),
        ("dnstap_analyser_watermark_lag_seconds", "gauge"),
        ("dnstap_analyser_label_overflow_total", "counter"),
        ("dnstap_analyser_build_info", "gauge"),
        ("dnstap_analyser_connections_open", "gauge"),
        ("dnstap_analyser_queue_depth_events", "gauge"),
    ];

    #[test]
    fn prometheus_text_has_every_contract_family_well_formed() {
        let t = sample_telemetry();
        t.set_connections_open(Box::new(|| 3));
        let text = Exposition::new(t).render(Format::Prometheus).unwrap();
        let p = check_exposition(&text, false);
        for (name, kind) in CONTRACT_FAMILIES {
            assert_eq!(p.types.get(name).map(String::as_str), Some(kind), "{name}");
        }
        let nasty = [("identity", NASTY)];
        assert_eq!(value(&p, "dnstap_analyser_sessions_total", &nasty), 3.0);
        let lat = [
            ("identity", NASTY),
            ("cause", "forwarded_answer"),
            ("le", "0.005"),
        ];
        assert_eq!(
            value(&p, "dnstap_analyser_client_latency_seconds_bucket", &lat),
            3.0
        );
        let lat = [
            ("identity", NASTY),
            ("cause", "forwarded_answer"),
            ("le", "0.0025"),
        ];
        assert_eq!(
            value(&p, "dnstap_analyser_client_latency_seconds_bucket", &lat),
            0.0
        );
        let slow = [("identity", "coredns-1"), ("le", "10")];
        assert_eq!(
            value(&p, "dnstap_analyser_client_latency_seconds_bucket", &slow),
            0.0
        );
        let slow = [("identity", "coredns-1"), ("le", "+Inf")];
        assert_eq!(
            value(&p, "dnstap_analyser_client_latency_seconds_bucket", &slow),
            1.0
        );
        let timeouts = [("upstream", "10.0.0.1:53"), ("outcome", "timeout")];
        assert_eq!(
            value(&p, "dnstap_analyser_upstream_attempts_total", &timeouts),
            2.0
        );
        let failed = [
            ("identity", "coredns-1"),
            ("status", "Failed"),
            ("bitmap", "5"),
            ("cause", "upstream_timeout"),
        ];
        assert_eq!(value(&p, "dnstap_analyser_sessions_total", &failed), 1.0);
        let cq = [("identity", NASTY), ("type", "CLIENT_QUERY")];
        assert_eq!(value(&p, "dnstap_analyser_messages_total", &cq), 3.0);
        let fr = [("identity", "coredns-1"), ("type", "FORWARDER_RESPONSE")];
        assert_eq!(value(&p, "dnstap_analyser_messages_total", &fr), 2.0);
        assert_eq!(
            value(&p, "dnstap_analyser_sessions_evicted_total", &[]),
            1.0
        );
        assert_eq!(
            value(
                &p,
                "dnstap_analyser_sessions_evicted_by_identity_total",
                &[("identity", "coredns-1")]
            ),
            1.0
        );
        assert_eq!(value(&p, "dnstap_analyser_frames_total", &[]), 9.0);
        let qf = [("reason", "queue_full")];
        assert_eq!(
            value(&p, "dnstap_analyser_discarded_messages_total", &qf),
            4.0
        );
        let protobuf = [("reason", "protobuf_undecodable")];
        assert_eq!(
            value(&p, "dnstap_analyser_discarded_frames_total", &protobuf),
            5.0
        );
        let limit = [("reason", "connection_limit")];
        assert_eq!(
            value(&p, "dnstap_analyser_discarded_connections_total", &limit),
            6.0
        );
        assert_eq!(value(&p, "dnstap_analyser_rejected_times_total", &[]), 7.0);
        assert!(!text.contains("dnstap_analyser_discarded_total"));
        assert_eq!(
            value(&p, "dnstap_analyser_open_sessions", &[("shard", "0")]),
            2.0
        );
        assert_eq!(
            value(&p, "dnstap_analyser_queue_depth_events", &[("shard", "1")]),
            0.0
        );
        assert_eq!(
            value(&p, "dnstap_analyser_queue_capacity_events", &[]),
            1024.0
        );
        assert_eq!(value(&p, "dnstap_analyser_connections_open", &[]), 3.0);
        for (name, kind) in [
            ("process_cpu_seconds_total", "counter"),
            ("process_resident_memory_bytes", "gauge"),
            ("process_virtual_memory_bytes", "gauge"),
            ("process_open_fds", "gauge"),
            ("process_max_fds", "gauge"),
            ("process_start_time_seconds", "gauge"),
        ] {
            assert_eq!(p.types.get(name).map(String::as_str), Some(kind), "{name}");
            assert!(value(&p, name, &[]) >= 0.0);
        }
        assert!(value(&p, "process_resident_memory_bytes", &[]) > 1e5);
        let v = [("version", env!("CARGO_PKG_VERSION"))];
        assert_eq!(value(&p, "dnstap_analyser_build_info", &v), 1.0);
        assert!(
            value(
                &p,
                "dnstap_analyser_watermark_lag_seconds",
                &[("identity", "coredns-1")]
            ) > 1e9
        );
        // The raw text carries the escaped form, never a raw newline inside a label.
        assert!(text.contains(r#"identity="pod \"a\"\\b\nc""#), "{text}");
    }

    #[test]
    fn openmetrics_text_comes_from_the_same_families() {
        let text = Exposition::new(sample_telemetry())
            .render(Format::OpenMetrics)
            .unwrap();
        let p = check_exposition(&text, true);
        // OpenMetrics names the counter family without `_total`, the samples with it.
        assert_eq!(p.types["dnstap_analyser_sessions"], "counter");
        assert!(text.contains("# UNIT dnstap_analyser_upstream_rtt_seconds seconds\n"));
        let nasty = [("identity", NASTY)];
        assert_eq!(value(&p, "dnstap_analyser_sessions_total", &nasty), 3.0);
        let rtt = [("upstream", "10.0.0.1:53"), ("le", "0.005")];
        assert_eq!(
            value(&p, "dnstap_analyser_upstream_rtt_seconds_bucket", &rtt),
            4.0
        );
        // No connection counter registered (file mode): no connections_open family.
        assert!(!p.types.contains_key("dnstap_analyser_connections_open"));
    }

    /// The failing names come from /top's sketch, only above its error bound, and only while
    /// /top is served; the session counter says rcode and qtype.
    #[test]
    fn top_failing_names_follow_top_and_sessions_carry_rcode_and_qtype() {
        use crate::metrics::top::{Failure, TopBoard, TopConfig};
        let t = sample_telemetry();
        let text = Exposition::new(t.clone())
            .render(Format::Prometheus)
            .unwrap();
        assert!(!text.contains("top_failing_names"), "no /top, no family");
        let p = check_exposition(&text, false);
        let ok = [("identity", NASTY), ("rcode", "none"), ("qtype", "other")];
        assert_eq!(value(&p, "dnstap_analyser_sessions_total", &ok), 3.0);

        let cfg = TopConfig {
            capacity: 4,
            ..TopConfig::default()
        };
        let board = TopBoard::new(cfg);
        let mut shard = board.shard();
        let at = shard.since_origin(std::time::Instant::now());
        let fail = |qname: &'static str, cause| Failure {
            cause,
            qname: Some(qname),
            client: None,
            upstreams: &[],
            workload: None,
            source: crate::dnstap::SourceId(0),
            qtype: None,
        };
        for _ in 0..10 {
            shard.record(at, &fail("storm.test.", Cause::CachedUpstreamError));
        }
        // 8 names once each: below the bound N / K = 18 / 4.
        for q in ["a.", "b.", "c.", "d.", "e.", "f.", "g.", "h."] {
            shard.record(at, &fail(q, Cause::UpstreamTimeout));
        }
        shard.publish(at);
        t.set_top(board.hook());
        let text = Exposition::new(t).render(Format::Prometheus).unwrap();
        let p = check_exposition(&text, false);
        assert_eq!(p.types["dnstap_analyser_top_failing_names"], "gauge");
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("dnstap_analyser_top_failing_names{"))
            .collect();
        assert_eq!(
            series,
            ["dnstap_analyser_top_failing_names{qname=\"storm.test.\",cause=\"cached_upstream_error\"} 10"]
        );
    }

    #[test]
    fn other_and_unknown_labels_have_names() {
        assert_eq!(upstream_name(UpstreamLabel::Other), "other");
        assert_eq!(upstream_name(UpstreamLabel::Unknown), "unknown");
    }

    #[test]
    fn negotiation_prefers_what_the_scraper_prefers() {
        use Format::*;
        assert_eq!(Format::negotiate(None), Prometheus);
        assert_eq!(Format::negotiate(Some("*/*")), Prometheus);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Prometheus
        );
        // What Prometheus 2.x and 3.x send by default.
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prom)), OpenMetrics);
        let prefer_text =
            "application/openmetrics-text;version=1.0.0;q=0.2,text/plain;version=0.0.4;q=0.9";
        assert_eq!(Format::negotiate(Some(prefer_text)), Prometheus);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; version=2.0.0")),
            Prometheus
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Prometheus
        );
        assert_eq!(
            Format::negotiate(Some("Application/OpenMetrics-Text")),
            OpenMetrics
        );
    }
}
