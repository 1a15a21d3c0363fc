//! Sessions as the analyser prints them: accessors, a one-line description for assertion
//! messages, and expectations ([`Expect`]) matched one to one against what was printed
//! ([`assert_sessions`]).

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// qname lower-cased without the trailing dot.
pub fn norm_name(s: &str) -> String {
    s.trim_end_matches('.').to_ascii_lowercase()
}

pub fn s_qname(v: &Value) -> String {
    norm_name(v.get("qname").and_then(Value::as_str).unwrap_or(""))
}
pub fn s_status(v: &Value) -> &str {
    v.get("status").and_then(Value::as_str).unwrap_or("")
}
pub fn s_bitmap(v: &Value) -> u64 {
    v.get("bitmap").and_then(Value::as_u64).unwrap_or(u64::MAX)
}
pub fn s_rcode(v: &Value) -> Option<&str> {
    v.get("rcode").and_then(Value::as_str)
}
pub fn s_upstreams(v: &Value) -> Vec<Value> {
    v.get("upstreams")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}
pub fn s_messages(v: &Value) -> Vec<Value> {
    v.get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// One line describing a session, for assertion messages.
pub fn describe(v: &Value) -> String {
    let ups: Vec<String> = s_upstreams(v)
        .iter()
        .map(|u| {
            format!(
                "{}{}{}",
                u.get("address").and_then(Value::as_str).unwrap_or("?"),
                u.get("rcode")
                    .and_then(Value::as_str)
                    .map(|r| format!("={r}"))
                    .unwrap_or_default(),
                if u.get("timeout").and_then(Value::as_bool) == Some(true) {
                    " timeout"
                } else {
                    ""
                }
            )
        })
        .collect();
    let types: Vec<String> = s_messages(v)
        .iter()
        .map(|m| short_type(m.get("type").and_then(Value::as_str).unwrap_or("?")).to_string())
        .collect();
    let loss = v
        .get("loss_reason")
        .and_then(Value::as_str)
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    format!(
        "{}/{} {} {}{loss} bitmap={} rcode={} latency_ms={} client={} upstreams=[{}] messages=[{}]",
        s_qname(v),
        v.get("qtype").and_then(Value::as_str).unwrap_or("?"),
        v.get("protocol").and_then(Value::as_str).unwrap_or("?"),
        s_status(v),
        s_bitmap(v),
        s_rcode(v).unwrap_or("null"),
        v.get("latency_ms")
            .map(|l| l.to_string())
            .unwrap_or("-".into()),
        v.get("client").map(|l| l.to_string()).unwrap_or("-".into()),
        ups.join(", "),
        types.join(" ")
    )
}

pub fn short_type(t: &str) -> &str {
    match t {
        "CLIENT_QUERY" => "CQ",
        "CLIENT_RESPONSE" => "CR",
        "FORWARDER_QUERY" => "FQ",
        "FORWARDER_RESPONSE" => "FR",
        "RESOLVER_QUERY" => "RQ",
        "RESOLVER_RESPONSE" => "RR",
        other => other,
    }
}

pub fn describe_all(sessions: &[Value]) -> String {
    let mut s = String::new();
    for v in sessions {
        let _ = writeln!(s, "  {}", describe(v));
    }
    s
}

/// How the upstream leg appears in `messages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpKind {
    /// FORWARDER_QUERY / FORWARDER_RESPONSE (unbound, CoreDNS)
    Forwarder,
    /// RESOLVER_QUERY / RESOLVER_RESPONSE (BIND named)
    Resolver,
    /// no upstream messages at all (kresd, dnsdist)
    None,
}

/// What one expected session looks like.
#[derive(Debug, Clone)]
pub struct Expect {
    pub qname: &'static str,
    pub qtype: &'static str,
    /// "UDP" or "TCP" (client side)
    pub protocol: &'static str,
    pub status: &'static str,
    pub bitmap: u64,
    /// rcode of the CR, None when there is no CR
    pub rcode: Option<&'static str>,
    /// number of entries in `upstreams` (one per FQ/RQ)
    pub attempts: usize,
    /// rcode of every upstream attempt; None = no attempt got a response (timeout, rtt null)
    pub attempt_rcode: Option<&'static str>,
    /// expected `address` of every attempt ("127.0.0.1:15353"), None = not checked
    pub attempt_addr: Option<String>,
    pub up_kind: UpKind,
    /// inclusive latency range in ms (checked when Some; must be null when there is no CR)
    pub latency_ms: Option<(f64, f64)>,
    pub identity: Option<String>,
    /// prefix of `version` (package versions move with Debian updates)
    pub version: Option<String>,
}

impl Expect {
    pub fn new(qname: &'static str, status: &'static str, bitmap: u64) -> Expect {
        Expect {
            qname,
            qtype: "A",
            protocol: "UDP",
            status,
            bitmap,
            rcode: None,
            attempts: 0,
            attempt_rcode: None,
            attempt_addr: None,
            up_kind: UpKind::None,
            latency_ms: None,
            identity: None,
            version: None,
        }
    }
    pub fn rcode(mut self, r: &'static str) -> Self {
        self.rcode = Some(r);
        self
    }
    pub fn qtype(mut self, t: &'static str) -> Self {
        self.qtype = t;
        self
    }
    pub fn tcp(mut self) -> Self {
        self.protocol = "TCP";
        self
    }
    /// `n` upstream attempts of kind `kind`, each answered with `rcode` (None = none answered).
    pub fn attempts(mut self, kind: UpKind, n: usize, rcode: Option<&'static str>) -> Self {
        self.up_kind = kind;
        self.attempts = n;
        self.attempt_rcode = rcode;
        self
    }
    pub fn addr(mut self, a: impl Into<String>) -> Self {
        self.attempt_addr = Some(a.into());
        self
    }
    pub fn latency(mut self, lo: f64, hi: f64) -> Self {
        self.latency_ms = Some((lo, hi));
        self
    }
    pub fn ident(mut self, identity: impl Into<String>, version: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self.version = Some(version.into());
        self
    }

    pub fn short(&self) -> String {
        format!(
            "{}/{} {} {}/{} rcode={} attempts={}{}",
            self.qname,
            self.qtype,
            self.protocol,
            self.status,
            self.bitmap,
            self.rcode.unwrap_or("null"),
            self.attempts,
            self.attempt_rcode
                .map(|r| format!("={r}"))
                .unwrap_or(" (no answer)".into())
        )
    }

    /// Expected counts of message types in `messages`.
    pub fn message_types(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        if self.bitmap & 1 != 0 {
            m.insert("CLIENT_QUERY".to_string(), 1);
        }
        if self.bitmap & 2 != 0 {
            m.insert("CLIENT_RESPONSE".to_string(), 1);
        }
        let (q, r) = match self.up_kind {
            UpKind::Forwarder => ("FORWARDER_QUERY", "FORWARDER_RESPONSE"),
            UpKind::Resolver => ("RESOLVER_QUERY", "RESOLVER_RESPONSE"),
            UpKind::None => return m,
        };
        if self.attempts > 0 {
            m.insert(q.to_string(), self.attempts);
            if self.attempt_rcode.is_some() {
                m.insert(r.to_string(), self.attempts);
            }
        }
        m
    }

    /// Every mismatch between this expectation and session `v`.
    pub fn check(&self, v: &Value) -> Vec<String> {
        let mut errs = Vec::new();
        let mut want = |ok: bool, msg: String| {
            if !ok {
                errs.push(msg)
            }
        };
        want(
            s_qname(v) == norm_name(self.qname),
            format!("qname {} != {}", s_qname(v), self.qname),
        );
        let qtype = v.get("qtype").and_then(Value::as_str).unwrap_or("");
        want(
            qtype == self.qtype,
            format!("qtype {qtype} != {}", self.qtype),
        );
        let proto = v.get("protocol").and_then(Value::as_str).unwrap_or("");
        want(
            proto == self.protocol,
            format!("protocol {proto} != {}", self.protocol),
        );
        want(
            s_status(v) == self.status,
            format!("status {} != {}", s_status(v), self.status),
        );
        want(
            s_bitmap(v) == self.bitmap,
            format!("bitmap {} != {}", s_bitmap(v), self.bitmap),
        );
        want(
            s_rcode(v) == self.rcode,
            format!("rcode {:?} != {:?}", s_rcode(v), self.rcode),
        );
        let diag = v.get("diagnosis").and_then(Value::as_str).unwrap_or("");
        want(!diag.is_empty(), "diagnosis is empty".into());
        want(
            v.get("loss_reason").is_none_or(Value::is_null) || self.status == "SampleLoss",
            "loss_reason set on a session that is not SampleLoss".into(),
        );
        let ups = s_upstreams(v);
        want(
            ups.len() == self.attempts,
            format!("{} upstream attempts != {}", ups.len(), self.attempts),
        );
        for (i, u) in ups.iter().enumerate() {
            let rc = u.get("rcode").and_then(Value::as_str);
            let timeout = u.get("timeout").and_then(Value::as_bool);
            let rtt = u.get("rtt_ms").and_then(Value::as_f64);
            let addr = u.get("address").and_then(Value::as_str).unwrap_or("");
            match self.attempt_rcode {
                Some(r) => {
                    want(rc == Some(r), format!("upstream #{i} rcode {rc:?} != {r}"));
                    want(
                        timeout == Some(false),
                        format!("upstream #{i} timeout {timeout:?} != false"),
                    );
                    want(
                        rtt.is_some_and(|x| x >= 0.0),
                        format!("upstream #{i} rtt_ms {rtt:?} is not a number >= 0"),
                    );
                }
                None => {
                    want(
                        rc.is_none(),
                        format!("upstream #{i} rcode {rc:?} != null (no answer)"),
                    );
                    want(
                        timeout == Some(true),
                        format!("upstream #{i} timeout {timeout:?} != true"),
                    );
                    want(
                        rtt.is_none(),
                        format!("upstream #{i} rtt_ms {rtt:?} != null"),
                    );
                }
            }
            if let Some(a) = &self.attempt_addr {
                want(addr == a, format!("upstream #{i} address {addr} != {a}"));
            }
        }
        let latency = v.get("latency_ms").and_then(Value::as_f64);
        if self.bitmap & 2 == 0 {
            want(
                latency.is_none(),
                format!("latency_ms {latency:?} without a CR"),
            );
        } else {
            want(
                latency.is_some_and(|l| l >= 0.0),
                format!("latency_ms {latency:?} is not a number >= 0"),
            );
        }
        if let (Some((lo, hi)), Some(l)) = (self.latency_ms, latency) {
            want(
                l >= lo && l <= hi,
                format!("latency_ms {l} not in [{lo}, {hi}]"),
            );
        }
        let mut types: BTreeMap<String, usize> = BTreeMap::new();
        for m in s_messages(v) {
            let t = m
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string();
            *types.entry(t).or_default() += 1;
        }
        let want_types = self.message_types();
        want(
            types == want_types,
            format!("message types {types:?} != {want_types:?}"),
        );
        if let Some(id) = &self.identity {
            let got = v.get("identity").and_then(Value::as_str);
            want(
                got == Some(id.as_str()),
                format!("identity {got:?} != {id}"),
            );
        }
        if let Some(ver) = &self.version {
            let got = v.get("version").and_then(Value::as_str);
            want(
                got.is_some_and(|g| g.starts_with(ver.as_str())),
                format!("version {got:?} does not start with {ver}"),
            );
        }
        errs
    }
}

/// Matches `expected` one to one against `actual` (order-free) and panics with a full report if
/// any expected session is missing or any session is left over.
pub fn assert_sessions(what: &str, actual: &[Value], expected: &[Expect]) {
    let mut left: Vec<Option<&Value>> = actual.iter().map(Some).collect();
    let mut report = String::new();
    let mut failed = false;
    for e in expected {
        let pos = left
            .iter()
            .position(|s| s.is_some_and(|s| e.check(s).is_empty()));
        match pos {
            Some(i) => left[i] = None,
            None => {
                failed = true;
                let _ = writeln!(report, "missing: {}", e.short());
                for s in left.iter().flatten() {
                    if s_qname(s) == norm_name(e.qname) {
                        let _ = writeln!(
                            report,
                            "    closest: {}\n      differs: {}",
                            describe(s),
                            e.check(s).join("; ")
                        );
                    }
                }
            }
        }
    }
    for s in left.iter().flatten() {
        failed = true;
        let _ = writeln!(report, "unexpected: {}", describe(s));
    }
    if failed {
        panic!(
            "{what}: sessions differ from the expectation\n{report}\nall {} sessions:\n{}",
            actual.len(),
            describe_all(actual)
        );
    }
}
