//! Checks of the monitoring files (see docs/operations.md):
//! - the alert rules `deploy/helm/dnstap-analyser/files/alerts.yaml` (the chart's PrometheusRule
//!   rendered with the default values, tests/deploy.rs checks that), with `promtool check rules`;
//! - their unit tests `deploy/monitoring/alerts.test.yaml` with `promtool test rules`, which must
//!   cover every alert firing and not firing, and must fail when the rules are broken;
//! - the Grafana dashboard `deploy/helm/dnstap-analyser/files/dashboard.json`;
//! - that every metric the alerts and the dashboard use is one the analyser exposes
//!   (`EXPOSITION`, the names of the metrics contract) with labels and label values it has;
//! - that every alert's runbook link points at a section of docs/operations.md;
//! - that a REAL scrape of a serving analyser (after load-generator traffic with upstream
//!   timeouts, forwarded answers and sender loss) has exactly the contract's families and
//!   labels, and a sample of every metric the alerts and the dashboard use;
//! - that a REAL Prometheus scraping a serving analyser answers every dashboard query with data.
//!
//! `promtool` and `prometheus` come from the Debian package `prometheus` (listed in
//! .ci/apt-packages). A missing one is a test failure, never a skip.

mod support;

use serde_json::{json, Value as Json};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

// ---------------------------------------------------------------------------------------------
// The expected exposition: the metrics contract of the analyser (issue #9)

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

struct Metric {
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
}

const fn metric(name: &'static str, kind: Kind, labels: &'static [&'static str]) -> Metric {
    Metric { name, kind, labels }
}

/// Every metric the analyser exposes on /metrics, with its labels.
const EXPOSITION: &[Metric] = &[
    metric(
        "dnstap_analyser_sessions_total",
        Kind::Counter,
        &[
            "identity",
            "namespace",
            "status",
            "bitmap",
            "cause",
            "rcode",
            "qtype",
        ],
    ),
    metric(
        "dnstap_analyser_top_failing_names",
        Kind::Gauge,
        &["qname", "cause"],
    ),
    metric(
        "dnstap_analyser_upstream_attempts_total",
        Kind::Counter,
        &["identity", "upstream", "outcome"],
    ),
    metric(
        "dnstap_analyser_upstream_rtt_seconds",
        Kind::Histogram,
        &["upstream"],
    ),
    metric(
        "dnstap_analyser_client_latency_seconds",
        Kind::Histogram,
        &["identity", "cause"],
    ),
    metric(
        "dnstap_analyser_messages_total",
        Kind::Counter,
        &["identity", "type"],
    ),
    metric("dnstap_analyser_frames_total", Kind::Counter, &[]),
    metric("dnstap_analyser_tls_handshakes_total", Kind::Counter, &[]),
    metric(
        "dnstap_analyser_tls_certificate_reloads_total",
        Kind::Counter,
        &["result"],
    ),
    metric(
        "dnstap_analyser_metrics_auth_refused_total",
        Kind::Counter,
        &["reason"],
    ),
    metric("dnstap_analyser_received_bytes_total", Kind::Counter, &[]),
    // What was dropped, one family per unit (issue #17).
    metric(
        "dnstap_analyser_discarded_messages_total",
        Kind::Counter,
        &["reason"],
    ),
    metric(
        "dnstap_analyser_discarded_frames_total",
        Kind::Counter,
        &["reason"],
    ),
    metric(
        "dnstap_analyser_discarded_connections_total",
        Kind::Counter,
        &["reason"],
    ),
    metric("dnstap_analyser_rejected_times_total", Kind::Counter, &[]),
    // 1 when the identity's last stream ended with a clean STOP and none is open (scale-down).
    metric(
        "dnstap_analyser_identity_stopped",
        Kind::Gauge,
        &["identity"],
    ),
    metric(
        "dnstap_analyser_queue_depth_events",
        Kind::Gauge,
        &["shard"],
    ),
    metric("dnstap_analyser_queue_capacity_events", Kind::Gauge, &[]),
    metric("dnstap_analyser_open_sessions", Kind::Gauge, &["shard"]),
    metric("dnstap_analyser_sessions_evicted_total", Kind::Counter, &[]),
    metric("dnstap_analyser_recall_forgotten_total", Kind::Counter, &[]),
    metric(
        "dnstap_analyser_identities_refused_total",
        Kind::Counter,
        &["peer"],
    ),
    metric(
        "dnstap_analyser_sessions_evicted_by_identity_total",
        Kind::Counter,
        &["identity"],
    ),
    metric("dnstap_analyser_connections_open", Kind::Gauge, &[]),
    metric(
        "dnstap_analyser_connections_accepted_total",
        Kind::Counter,
        &[],
    ),
    metric(
        "dnstap_analyser_connections_refused_total",
        Kind::Counter,
        &[],
    ),
    metric(
        "dnstap_analyser_connections_closed_total",
        Kind::Counter,
        &["reason"],
    ),
    metric(
        "dnstap_analyser_watermark_lag_seconds",
        Kind::Gauge,
        &["identity"],
    ),
    metric(
        "dnstap_analyser_label_overflow_total",
        Kind::Counter,
        &["label"],
    ),
    // Recordings collapsed to "other" by the series budget (the labels branch, #16).
    metric(
        "dnstap_analyser_series_overflow_total",
        Kind::Counter,
        &["family"],
    ),
    metric("dnstap_analyser_build_info", Kind::Gauge, &["version"]),
    metric("dnstap_analyser_lookups_total", Kind::Counter, &["outcome"]),
    metric("dnstap_analyser_lookups_evicted_total", Kind::Counter, &[]),
    metric(
        "dnstap_analyser_lookup_latency_seconds",
        Kind::Histogram,
        &[],
    ),
    metric("dnstap_analyser_lookup_queries", Kind::Histogram, &[]),
    metric(
        "dnstap_analyser_lookup_wasted_queries_total",
        Kind::Counter,
        &["identity", "client_namespace"],
    ),
    metric(
        "dnstap_analyser_lookup_resolver_timeouts_total",
        Kind::Counter,
        &["identity", "client_namespace"],
    ),
    metric(
        "dnstap_analyser_lookup_waited_seconds_total",
        Kind::Counter,
        &["identity", "client_namespace"],
    ),
    // The process metrics of the Prometheus client libraries.
    metric("process_cpu_seconds_total", Kind::Counter, &[]),
    metric("process_resident_memory_bytes", Kind::Gauge, &[]),
    metric("process_virtual_memory_bytes", Kind::Gauge, &[]),
    metric("process_open_fds", Kind::Gauge, &[]),
    metric("process_max_fds", Kind::Gauge, &[]),
    metric("process_start_time_seconds", Kind::Gauge, &[]),
];

/// Labels Prometheus adds to every scraped series (target labels), usable in any selector.
const TARGET_LABELS: &[&str] = &[
    "cluster",
    "job",
    "instance",
    "namespace",
    "pod",
    "service",
    "container",
];

/// The closed value sets of the contract, per label name (and metric, where they differ).
fn label_values(metric: &str, label: &str) -> Option<&'static [&'static str]> {
    Some(match (metric, label) {
        (_, "status") => &["Succeeded", "Failed", "SampleLoss"],
        (_, "cause") => &[
            "local_answer",
            "forwarded_answer",
            "upstream_timeout",
            "upstream_error",
            "cached_upstream_error",
            "server_error",
            "rejected_upstream_failing",
            "no_response",
            "sender_loss",
            "analyser_loss",
        ],
        ("dnstap_analyser_lookups_total", "outcome") => {
            &["answered", "nodata", "nxdomain", "failed"]
        }
        (_, "outcome") => &["answered", "timeout", "error_rcode"],
        (_, "qtype") => &[
            "A", "AAAA", "CNAME", "PTR", "SRV", "MX", "TXT", "NS", "SOA", "HTTPS", "SVCB", "ANY",
            "other",
        ],
        (_, "rcode") => &[
            "none",
            "NOERROR",
            "FORMERR",
            "SERVFAIL",
            "NXDOMAIN",
            "NOTIMP",
            "REFUSED",
            "YXDOMAIN",
            "YXRRSET",
            "NXRRSET",
            "NOTAUTH",
            "NOTZONE",
            "DSOTYPENI",
            "other",
        ],
        (_, "type") => &[
            "CLIENT_QUERY",
            "CLIENT_RESPONSE",
            "FORWARDER_QUERY",
            "FORWARDER_RESPONSE",
        ],
        ("dnstap_analyser_discarded_messages_total", "reason") => &[
            "queue_full",
            "queue_disconnected",
            "session_table_full",
            "unsupported_message_type",
            "dns_undecodable",
            "upstream_without_wire",
            "identity_limit",
            "identity_too_long",
            "identity_not_certified",
        ],
        ("dnstap_analyser_discarded_frames_total", "reason") => &[
            "protobuf_undecodable",
            "no_message",
            "truncated_frame",
            "frame_budget",
        ],
        ("dnstap_analyser_discarded_connections_total", "reason") => &[
            "bad_stream",
            "content_type",
            "handshake_timeout",
            "connection_limit",
        ],
        ("dnstap_analyser_connections_closed_total", "reason") => &[
            "stopped",
            "peer_closed",
            "bad_stream",
            "idle_timeout",
            "frame_budget",
            "handshake_timeout",
            // Beyond the contract's list, found in a real scrape and documented in
            // docs/operations.md: connections still open at exit, and ones the analyser
            // could not serve.
            "shutdown",
            "server_error",
            // tls:// listeners (issue #11): failed handshakes, refused client certificates,
            // TLS errors after the handshake.
            "tls_handshake",
            "tls_client_cert",
            "tls_error",
        ],
        ("dnstap_analyser_tls_certificate_reloads_total", "result") => &["ok", "error"],
        // The metrics port's client authentication (--metrics-web-config, issue #16).
        ("dnstap_analyser_metrics_auth_refused_total", "reason") => &[
            "no_credentials",
            "bad_credentials",
            "rate_limited",
            "client_certificate",
            "tls_handshake",
        ],
        (_, "label") => &["identity", "upstream", "namespace"],
        (_, "family") => &[
            "sessions_total",
            "upstream_attempts_total",
            "upstream_rtt_seconds",
            "client_latency_seconds",
            "messages_total",
            "watermark_lag_seconds",
            "sessions_evicted_by_identity_total",
        ],
        _ => return None,
    })
}

/// The alerts of the contract (PrometheusRule group `dnstap-analyser`).
const ALERTS: &[&str] = &[
    "DnstapAnalyserDown",
    "DnstapAnalyserAbsent",
    "DnstapDNSFailing",
    "DnstapUpstreamTimingOut",
    "DnstapErrorRcodesRising",
    "DnstapCoreDNSNotAnswering",
    "DnstapCoreDNSDroppingTapMessages",
    "DnstapAnalyserDropping",
    "DnstapCoreDNSPodSilent",
];
/// Alerts that page (severity critical with the default values).
const CRITICAL_ALERTS: &[&str] = &[
    "DnstapAnalyserDown",
    "DnstapAnalyserAbsent",
    "DnstapDNSFailing",
];
/// Alerts about DNS failures: SampleLoss must never fire them.
const FAILURE_ALERTS: &[&str] = &[
    "DnstapDNSFailing",
    "DnstapUpstreamTimingOut",
    "DnstapErrorRcodesRising",
    "DnstapCoreDNSNotAnswering",
];

// ---------------------------------------------------------------------------------------------
// Paths, tools, parsing

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rules_path() -> PathBuf {
    root().join("deploy/helm/dnstap-analyser/files/alerts.yaml")
}

fn rule_tests_path() -> PathBuf {
    root().join("deploy/monitoring/alerts.test.yaml")
}

fn dashboard_path() -> PathBuf {
    root().join("deploy/helm/dnstap-analyser/files/dashboard.json")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(path: &Path) -> Json {
    let y: serde_yaml::Value = serde_yaml::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    serde_json::to_value(y).unwrap()
}

/// A scratch directory of this test run alone (tests of two runs of one checkout may run at
/// once), removed at the end unless the test failed.
fn scratch_dir(test: &str) -> support::TempDir {
    support::TempDir::new(&format!("monitoring-{test}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs promtool in the repository (the harness's: bounded in time; its absence fails the test
/// naming the package that provides it).
fn promtool(args: &[&str]) -> Output {
    support::promtool(args)
}

fn promtool_ok(args: &[&str]) -> String {
    let out = promtool(args);
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{report}");
    report
}

/// The alerting rules of the rule file, by name.
fn alert_rules() -> BTreeMap<String, Json> {
    let rules = yaml(&rules_path());
    let groups = rules["groups"].as_array().expect("rule file has groups");
    assert_eq!(groups.len(), 1, "one rule group");
    assert_eq!(groups[0]["name"], "dnstap-analyser");
    groups[0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let name = r["alert"]
                .as_str()
                .expect("only alerting rules")
                .to_string();
            (name, r.clone())
        })
        .collect()
}

fn dashboard() -> Json {
    serde_json::from_str(&read(&dashboard_path())).expect("dashboard.json is valid JSON")
}

/// Non-row panels of the dashboard (rows nest their panels only when collapsed).
fn dashboard_panels(d: &Json) -> Vec<Json> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("dashboard has panels") {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().into_iter().flatten().cloned());
        } else {
            out.push(p.clone());
        }
    }
    out
}

/// Every string of a JSON document, one per line (JSON escapes resolved).
fn all_strings(v: &Json) -> String {
    match v {
        Json::String(s) => format!("{s}\n"),
        Json::Array(a) => a.iter().map(all_strings).collect(),
        Json::Object(o) => o.values().map(all_strings).collect(),
        _ => String::new(),
    }
}

fn dashboard_exprs(d: &Json) -> Vec<(String, String)> {
    dashboard_panels(d)
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap_or("").to_string()))
        })
        .collect()
}

/// A selector in a PromQL text: the metric name and its label matchers (label, op, value).
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: Vec<(String, String, String)>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Prefixes of the metric names of the exposition: the analyser's own, and the process metrics.
const METRIC_PREFIXES: &[&str] = &["dnstap_analyser_", "process_"];

/// Every identifier in `src` that starts with one of [`METRIC_PREFIXES`], with the matchers in
/// braces right after it.
fn selectors(src: &str) -> Vec<Selector> {
    let mut out = Vec::new();
    let starts = METRIC_PREFIXES
        .iter()
        .flat_map(|p| src.match_indices(p).map(|(i, _)| i));
    for i in starts {
        if src[..i].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let name: String = src[i..].chars().take_while(|c| is_ident(*c)).collect();
        let rest = &src[i + name.len()..];
        let mut matchers = Vec::new();
        if let Some(body) = rest.strip_prefix('{') {
            let body = &body[..body.find('}').expect("selector braces close")];
            for m in body.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                let op_at = m.find(['=', '!']).expect("matcher has an operator");
                let label = m[..op_at].trim().to_string();
                let after = &m[op_at..];
                let op_len = if after.starts_with("=~")
                    || after.starts_with("!=")
                    || after.starts_with("!~")
                {
                    2
                } else {
                    1
                };
                let value = after[op_len..].trim().trim_matches('"').to_string();
                matchers.push((label, after[..op_len].to_string(), value));
            }
        }
        out.push(Selector { name, matchers });
    }
    out
}

/// The exposition entry of a name used in PromQL (`_bucket`, `_sum`, `_count` of a histogram).
fn exposed(name: &str) -> Option<(&'static Metric, bool)> {
    if let Some(m) = EXPOSITION.iter().find(|m| m.name == name) {
        return Some((m, false));
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if let Some(m) = EXPOSITION
                .iter()
                .find(|m| m.name == base && m.kind == Kind::Histogram)
            {
                return Some((m, suffix == "_bucket"));
            }
        }
    }
    None
}

/// Checks every selector of `src` against the exposition; returns the metric names used, or
/// what is wrong.
fn check_against_exposition(src: &str, what: &str) -> Result<BTreeSet<String>, String> {
    let mut used = BTreeSet::new();
    for s in selectors(src) {
        let name = &s.name;
        let (m, bucket) = exposed(name).ok_or_else(|| {
            format!("{what}: {name} is not a metric of the analyser's exposition")
        })?;
        used.insert(m.name.to_string());
        for (label, op, value) in &s.matchers {
            let known = m.labels.contains(&label.as_str())
                || TARGET_LABELS.contains(&label.as_str())
                || (bucket && label == "le");
            if !known {
                return Err(format!("{what}: {name} has no label {label}"));
            }
            // Dashboard variables ($identity) stand for whatever values exist.
            if value.starts_with('$') {
                continue;
            }
            let Some(allowed) = label_values(m.name, label) else {
                continue;
            };
            let alternatives: Vec<&str> = if op.contains('~') {
                value.split('|').collect()
            } else {
                vec![value.as_str()]
            };
            if let Some(v) = alternatives.iter().find(|v| !allowed.contains(v)) {
                return Err(format!(
                    "{what}: {name}{{{label}{op}\"{value}\"}}: {v:?} is not a value of {label} \
                     (contract: {allowed:?})"
                ));
            }
        }
    }
    Ok(used)
}

/// `promtool test rules` on the unit tests, run against `rules` instead of the shipped file.
fn run_rule_tests_against(rules: &str, dir: &Path) -> Output {
    let rules_file = dir.join("alerts.yaml");
    fs::write(&rules_file, rules).unwrap();
    let tests = read(&rule_tests_path()).replace(
        "  - ../helm/dnstap-analyser/files/alerts.yaml\n",
        &format!("  - {}\n", rules_file.display()),
    );
    assert!(
        tests.contains(&rules_file.display().to_string()),
        "rule_files entry not replaced"
    );
    let tests_file = dir.join("alerts.test.yaml");
    fs::write(&tests_file, tests).unwrap();
    promtool(&["test", "rules", tests_file.to_str().unwrap()])
}

// ---------------------------------------------------------------------------------------------
// Tests: alert rules

#[test]
fn alert_rules_pass_promtool_check() {
    let report = promtool_ok(&["check", "rules", rules_path().to_str().unwrap()]);
    assert!(
        report.contains(&format!("SUCCESS: {} rules found", ALERTS.len())),
        "{report}"
    );

    // The check must be able to fail: a rule with a PromQL syntax error.
    let dir = scratch_dir("check");
    let broken = read(&rules_path()).replacen("> 0.05", "> > 0.05", 1);
    let file = dir.join("broken.yaml");
    fs::write(&file, broken).unwrap();
    let out = promtool(&["check", "rules", file.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "promtool accepted a broken expression"
    );
}

#[test]
fn alert_rules_are_the_contract_with_annotations_and_runbooks() {
    let rules = alert_rules();
    let names: BTreeSet<&str> = rules.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ALERTS.iter().copied().collect(),
        "alerts of the rule file"
    );
    let operations = read(&root().join("docs/operations.md"));
    let values = yaml(&root().join("deploy/helm/dnstap-analyser/values.yaml"));
    let base = values["monitoring"]["prometheusRule"]["runbookBaseUrl"]
        .as_str()
        .expect("monitoring.prometheusRule.runbookBaseUrl");
    assert!(
        base.starts_with("https://") && base.ends_with("docs/operations.md"),
        "the default runbook base is the docs page: {base}"
    );
    for (name, rule) in &rules {
        assert!(rule["for"].is_string(), "{name}: no `for`");
        let severity = if CRITICAL_ALERTS.contains(&name.as_str()) {
            "critical"
        } else {
            "warning"
        };
        assert_eq!(rule["labels"]["severity"], severity, "{name}: severity");
        let a = &rule["annotations"];
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                a[key].as_str().is_some_and(|s| s.len() > 20),
                "{name}: annotation {key} missing or empty"
            );
        }
        // The runbook link points at this alert's section of docs/operations.md.
        let anchor = name.to_lowercase();
        assert_eq!(
            a["runbook_url"],
            format!("{base}#{anchor}"),
            "{name}: runbook_url"
        );
        // Scraped by a ServiceMonitor or by annotations, the job label differs: no rule may
        // depend on it.
        let expr = rule["expr"].as_str().unwrap();
        assert!(
            !expr.contains("job=") && !expr.contains("job!="),
            "{name} selects a job: {expr}"
        );
        assert!(
            operations
                .lines()
                .any(|l| l.trim() == format!("### {name}")),
            "docs/operations.md has no section `### {name}` (anchor #{anchor})"
        );
        // Alerts per CoreDNS pod / upstream name them.
        for label in ["identity", "upstream"] {
            if expr.contains(&format!("by ({label}")) || expr.contains(&format!(", {label})")) {
                let needle = format!("{{{{ $labels.{label} }}}}");
                assert!(
                    a["summary"].as_str().unwrap().contains(&needle)
                        && a["description"].as_str().unwrap().contains(&needle),
                    "{name}: summary and description must name {needle}"
                );
            }
        }
    }
    // Failure alerts look at failures only, never at SampleLoss.
    let errors = rules["DnstapErrorRcodesRising"]["expr"].as_str().unwrap();
    assert!(errors.contains(r#"status="Failed""#) && errors.contains(r#"status!="SampleLoss""#));
}

#[test]
fn alert_rule_unit_tests_pass_and_cover_every_alert() {
    let report = promtool_ok(&["test", "rules", rule_tests_path().to_str().unwrap()]);
    assert!(report.contains("SUCCESS"), "{report}");

    let tests = yaml(&rule_tests_path());
    assert_eq!(
        tests["rule_files"],
        json!(["../helm/dnstap-analyser/files/alerts.yaml"]),
        "the unit tests must run against the shipped rule file"
    );
    let groups = tests["tests"].as_array().expect("tests");
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for g in groups {
        for t in g["alert_rule_test"].as_array().into_iter().flatten() {
            let name = t["alertname"].as_str().unwrap().to_string();
            if t["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                fires.insert(name);
            } else {
                silent.insert(name);
            }
        }
    }
    for alert in ALERTS {
        assert!(fires.contains(*alert), "no unit test where {alert} fires");
        assert!(
            silent.contains(*alert),
            "no unit test where {alert} stays silent"
        );
    }

    // SampleLoss from CoreDNS (sender_loss) must be tested against the failure alerts: a group
    // with sender_loss sessions tests them all, and a scenario (the failure alerts aggregate per
    // `cluster`) with sender loss fires none.
    let sender_loss_group = groups.iter().find(|g| {
        let tested: BTreeSet<&str> = g["alert_rule_test"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["alertname"].as_str())
            .collect();
        let lossy: BTreeSet<String> = g["input_series"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["series"].as_str())
            .filter(|s| s.contains(r#"cause="sender_loss""#))
            .filter_map(|s| {
                s.split(r#"cluster=""#)
                    .nth(1)
                    .map(|r| r[..r.find('"').unwrap()].to_string())
            })
            .collect();
        let failing: BTreeSet<String> = g["alert_rule_test"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| FAILURE_ALERTS.contains(&t["alertname"].as_str().unwrap_or("")))
            .flat_map(|t| t["exp_alerts"].as_array().cloned().unwrap_or_default())
            .filter_map(|a| a["exp_labels"]["cluster"].as_str().map(str::to_string))
            .collect();
        FAILURE_ALERTS.iter().all(|a| tested.contains(a))
            && lossy.iter().any(|i| !failing.contains(i))
    });
    assert!(
        sender_loss_group.is_some(),
        "no unit test group shows sender_loss sessions not firing the failure alerts"
    );
}

/// Each mutation breaks one property of the rules; the unit tests must catch every one.
#[test]
fn alert_rule_unit_tests_catch_broken_rules() {
    let shipped = read(&rules_path());
    let mutations: &[(&str, &str, &str)] = &[
        (
            "SampleLoss dilutes the error ratio",
            r#"sum by (cluster) (rate(dnstap_analyser_sessions_total{status!="SampleLoss"}[5m]))
          ) > 0.05"#,
            r#"sum by (cluster) (rate(dnstap_analyser_sessions_total[5m]))
          ) > 0.05"#,
        ),
        (
            "SampleLoss counted as a failure",
            r#"{status="Failed", cause=~"upstream_error|cached_upstream_error|server_error"}"#,
            r#"{status=~"Failed|SampleLoss", cause=~"upstream_error|cached_upstream_error|server_error|sender_loss"}"#,
        ),
        (
            "timeouts counted as error rcodes",
            r#"cause=~"upstream_error|cached_upstream_error|server_error""#,
            r#"cause=~"upstream_error|cached_upstream_error|server_error|upstream_timeout|no_response""#,
        ),
        (
            "no_response not covered",
            r#"cause="no_response""#,
            r#"cause="upstream_timeout""#,
        ),
        (
            "no rate floor on upstream attempts",
            "rate(dnstap_analyser_upstream_attempts_total[5m])) >= 0.1",
            "rate(dnstap_analyser_upstream_attempts_total[5m])) >= 0",
        ),
        (
            "one upstream alert per CoreDNS pod",
            "by (cluster, upstream)",
            "by (cluster, identity, upstream)",
        ),
        ("threshold 50%", "> 0.05", "> 0.5"),
        ("critical at 40%", "> 0.2", "> 0.4"),
        ("no `for`", "for: 5m", "for: 0m"),
        (
            "analyser down only for the ServiceMonitor's job",
            "(up == 0)",
            r#"(up{job="dnstap-analyser"} == 0)"#,
        ),
        (
            "analyser absent only when absent everywhere",
            "count by (cluster) (last_over_time(dnstap_analyser_build_info[1d]))",
            "count by (cluster) (dnstap_analyser_build_info)",
        ),
        (
            "a scale-down (clean STOP) counts as silence",
            "last_over_time(dnstap_analyser_identity_stopped[1h])) == 1",
            "last_over_time(dnstap_analyser_identity_stopped[1h])) == 2",
        ),
        (
            "STOP read from the current series, which vanish when the identity is reclaimed",
            "last_over_time(dnstap_analyser_identity_stopped[1h])",
            "dnstap_analyser_identity_stopped",
        ),
        (
            "the reclaimed aggregate counts as a pod",
            r#"{identity!="reclaimed"}"#,
            "",
        ),
        (
            "sender loss alert on analyser loss",
            r#"{status="SampleLoss", cause="sender_loss"}"#,
            r#"{status="SampleLoss"}"#,
        ),
        (
            "analyser dropping on any discard",
            r#"{reason=~"queue_full|queue_disconnected|session_table_full"}"#,
            "",
        ),
        (
            "analyser_loss alerts per session label set, not per replica",
            r#"sum by (cluster, job, instance) (rate(dnstap_analyser_sessions_total{cause="analyser_loss"}"#,
            r#"sum without (identity, status, bitmap, cause) (rate(dnstap_analyser_sessions_total{cause="analyser_loss"}"#,
        ),
    ];
    let dir = scratch_dir("mutations");
    // The harness itself passes with the unchanged rules.
    let out = run_rule_tests_against(&shipped, &dir);
    assert!(
        out.status.success(),
        "unchanged rules fail in the scratch copy:\n{}",
        text(&out.stdout)
    );
    for (what, from, to) in mutations {
        assert!(
            shipped.contains(from),
            "mutation {what:?}: {from:?} not in the rules"
        );
        let out = run_rule_tests_against(&shipped.replace(from, to), &dir);
        assert!(
            !out.status.success(),
            "the unit tests pass although the rules are broken ({what})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tests: metric names

#[test]
fn alerts_and_dashboard_use_only_exposed_metrics() {
    let rules = alert_rules();
    let mut used_by_alerts = BTreeSet::new();
    for (name, rule) in &rules {
        let used = check_against_exposition(rule["expr"].as_str().unwrap(), name);
        used_by_alerts.extend(used.unwrap_or_else(|e| panic!("{e}")));
    }
    // The whole dashboard: panel queries, variable queries and texts.
    let used_by_dashboard = check_against_exposition(&all_strings(&dashboard()), "dashboard.json")
        .unwrap_or_else(|e| panic!("{e}"));
    for required in [
        "dnstap_analyser_sessions_total",
        "dnstap_analyser_upstream_attempts_total",
        "dnstap_analyser_discarded_messages_total",
        "dnstap_analyser_messages_total",
        "dnstap_analyser_identity_stopped",
        "dnstap_analyser_build_info",
    ] {
        assert!(
            used_by_alerts.contains(required),
            "alerts do not use {required}: {used_by_alerts:?}"
        );
    }
    for required in [
        "dnstap_analyser_sessions_total",
        "dnstap_analyser_upstream_attempts_total",
        "dnstap_analyser_upstream_rtt_seconds",
        "dnstap_analyser_client_latency_seconds",
        "dnstap_analyser_discarded_messages_total",
        "dnstap_analyser_discarded_frames_total",
        "dnstap_analyser_discarded_connections_total",
        "dnstap_analyser_rejected_times_total",
        "dnstap_analyser_queue_depth_events",
        "dnstap_analyser_open_sessions",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
    ] {
        assert!(
            used_by_dashboard.contains(required),
            "the dashboard does not use {required}: {used_by_dashboard:?}"
        );
    }

    // The checker must be able to fail.
    for (bad, what) in [
        (
            "rate(dnstap_analyser_session_total[5m])",
            "a misspelt metric name",
        ),
        (
            r#"dnstap_analyser_sessions_total{status="Timeout"}"#,
            "an unknown status value",
        ),
        (
            r#"dnstap_analyser_sessions_total{cause=~"local_answer|timeout"}"#,
            "an unknown cause in a regex",
        ),
        (
            r#"dnstap_analyser_upstream_rtt_seconds_bucket{identity="a"}"#,
            "a label the histogram lacks",
        ),
        ("dnstap_analyser_up", "dnstap_analyser_up (not exported)"),
    ] {
        assert!(
            check_against_exposition(bad, "negative").is_err(),
            "{what} passed: {bad}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tests: dashboard

#[test]
fn dashboard_has_the_panels() {
    let d = dashboard();
    assert_eq!(d["uid"], "dnstap-analyser");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        d["schemaVersion"].as_i64().unwrap_or(0) >= 36,
        "schemaVersion"
    );
    let vars = d["templating"]["list"]
        .as_array()
        .expect("template variables");
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("datasource variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for name in SCOPE_VARIABLES.iter().chain(&["identity", "upstream"]) {
        assert!(vars.iter().any(|v| v["name"] == *name), "{name} variable");
    }
    // Alert annotations: the firing alerts of these rules.
    let annotations = d["annotations"]["list"].as_array().expect("annotations");
    assert!(
        annotations.iter().any(|a| a["enable"] == true
            && a["expr"]
                .as_str()
                .is_some_and(|e| e.contains(r#"ALERTS{alertname=~"Dnstap.*""#))),
        "no annotation of the firing dnstap alerts: {annotations:?}"
    );
    // The first row is the overview, of stat panels.
    let top = d["panels"].as_array().unwrap();
    assert_eq!(top[0]["type"], "row");
    assert_eq!(top[0]["title"], "Overview");
    assert!(top[1..].iter().take_while(|p| p["type"] != "row").count() >= 4);
    assert!(top[1..]
        .iter()
        .take_while(|p| p["type"] != "row")
        .all(|p| p["type"] == "stat"));

    let panels = dashboard_panels(&d);
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_i64().expect("panel id")),
            "duplicate panel id {}",
            p["id"]
        );
        let g = &p["gridPos"];
        assert!(
            g["x"].as_i64().unwrap() + g["w"].as_i64().unwrap() <= 24,
            "{} too wide",
            p["title"]
        );
    }
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("");
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title}: data source variable"
        );
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "{title}: empty query"
            );
        }
    }

    // (title fragment, query fragment): the panels issue #9 asks for.
    let exprs = dashboard_exprs(&d);
    let required: &[(&str, &str)] = &[
        ("Failure ratio per CoreDNS pod", r#"sum by (identity, cause) (rate(dnstap_analyser_sessions_total{cluster=~"$cluster", job=~"$job", instance=~"$instance", status="Failed""#),
        ("Failure ratio per CoreDNS pod", r#"status!="SampleLoss""#),
        ("Upstream timeouts", r#"outcome="timeout""#),
        ("Upstream RTT", "histogram_quantile(0.99, sum by (upstream, le) (rate(dnstap_analyser_upstream_rtt_seconds_bucket"),
        // The RTT histogram has no identity: $identity picks the upstreams its pods used.
        ("Upstream RTT", r#"and on (upstream)
sum by (upstream) (rate(dnstap_analyser_upstream_attempts_total{cluster=~"$cluster", job=~"$job", instance=~"$instance", identity=~"$identity""#),
        ("Client latency", "histogram_quantile(0.99, sum by (identity, le) (rate(dnstap_analyser_client_latency_seconds_bucket"),
        ("SampleLoss", r#"status="SampleLoss""#),
        ("Discarded messages", "sum by (instance, reason) (rate(dnstap_analyser_discarded_messages_total"),
        ("Discarded frames", "sum by (instance, reason) (rate(dnstap_analyser_discarded_frames_total"),
        ("Discarded connections", "sum by (instance, reason) (rate(dnstap_analyser_discarded_connections_total"),
        ("Discarded connections", "dnstap_analyser_rejected_times_total"),
        ("Queue depth per replica", "sum by (instance, shard) (dnstap_analyser_queue_depth_events"),
        ("Open sessions", "dnstap_analyser_open_sessions"),
        ("CPU", "rate(process_cpu_seconds_total"),
        ("memory", "process_resident_memory_bytes"),
        ("File descriptors", "process_open_fds"),
        ("File descriptors", "process_max_fds"),
        ("Restarts", "process_start_time_seconds"),
        ("Failure ratio", r#"status="Failed""#),
        ("CoreDNS pods streaming", "dnstap_analyser_messages_total"),
    ];
    for (title, fragment) in required {
        assert!(
            exprs
                .iter()
                .any(|(t, e)| t.contains(title) && e.contains(fragment)),
            "no panel titled *{title}* with a query containing {fragment:?}"
        );
    }

    // Replicas and clusters are never summed together unseen: every selector of every panel
    // is scoped by the cluster, job and instance variables.
    for (title, e) in &exprs {
        for s in selectors(e) {
            for var in SCOPE_VARIABLES {
                assert!(
                    s.matchers
                        .iter()
                        .any(|(l, op, v)| l == var && op == "=~" && *v == format!("${var}")),
                    "{title}: {} is not scoped by {var}=~\"${var}\": {e}",
                    s.name
                );
            }
        }
    }
    // Frames and bytes per second have an axis each.
    let frames = panels
        .iter()
        .find(|p| p["title"] == "Received frames and bytes per second")
        .expect("frames and bytes panel");
    let bytes_axis = &frames["fieldConfig"]["overrides"][0];
    assert_eq!(bytes_axis["matcher"]["options"], ".*bytes/s$");
    assert_eq!(
        bytes_axis["properties"],
        json!([{"id": "unit", "value": "Bps"}, {"id": "custom.axisPlacement", "value": "right"}])
    );
}

/// The dashboard variables that scope every query to one cluster, job and set of replicas.
const SCOPE_VARIABLES: &[&str] = &["cluster", "job", "instance"];

#[test]
fn dashboard_queries_are_valid_promql() {
    // promtool parses every panel query as a recording rule, with the Grafana variables
    // replaced by what Grafana would put there.
    let d = dashboard();
    let rules: Vec<Json> = dashboard_exprs(&d)
        .iter()
        .enumerate()
        .map(|(i, (_, e))| {
            let expr = ["$cluster", "$job", "$instance", "$identity", "$upstream"]
                .iter()
                .fold(e.replace("$__rate_interval", "2m"), |e, v| {
                    e.replace(v, ".*")
                });
            json!({"record": format!("dashboard:query_{i}"), "expr": expr})
        })
        .collect();
    assert!(
        rules.len() >= 10,
        "too few dashboard queries: {}",
        rules.len()
    );
    let dir = scratch_dir("dashboard");
    let file = dir.join("queries.yaml");
    let doc = json!({"groups": [{"name": "dashboard", "rules": rules}]});
    fs::write(&file, serde_yaml::to_string(&doc).unwrap()).unwrap();
    let report = promtool_ok(&["check", "rules", file.to_str().unwrap()]);
    assert!(report.contains("SUCCESS"), "{report}");
    // Variables left over would be PromQL errors above; a `$` elsewhere is a typo.
    for (title, e) in dashboard_exprs(&d) {
        let cleaned = [
            "$__rate_interval",
            "$cluster",
            "$job",
            "$instance",
            "$identity",
            "$upstream",
        ]
        .iter()
        .fold(e.clone(), |e, v| e.replace(v, ""));
        assert!(!cleaned.contains('$'), "{title}: unknown variable in {e}");
    }
}

/// Panels whose queries may come back empty after the traffic of
/// [`dashboard_queries_run_against_a_real_prometheus`]: no name fails often enough to be
/// certain in `/top`'s sketch.
const MAY_BE_EMPTY: &[&str] = &["Top failing names"];

/// Every panel query of the dashboard, run by a real Prometheus that scrapes a real analyser
/// after load-generator traffic (the variables at "All"): each one is valid for Prometheus' own
/// engine, and each one but [`MAY_BE_EMPTY`] has data. The alert expressions run there too.
#[test]
fn dashboard_queries_run_against_a_real_prometheus() {
    let analyser = support::Analyser::serve_tcp(&[]);
    let dir = scratch_dir("prometheus");
    let mut prom = support::Prometheus::start(&dir, &[analyser.metrics_addr()]);
    prom.wait_for_targets_up(std::time::Duration::from_secs(60));
    // Traffic within the rate window of the queries (1 minute), so rates are not 0 yet, with
    // upstream timeouts and sender loss (SampleLoss) as in `real_scrape`. Paced over 4 s, so
    // that Prometheus (1 s interval) sees the counters grow, not only their final values.
    load(
        &analyser.addr(),
        &[
            "--sessions",
            "1000",
            "--rate",
            "250",
            "--seed",
            "8",
            "--loss",
            "0.02",
        ],
    );
    let seen = support::poll_until(std::time::Duration::from_secs(60), || {
        ["SampleLoss", "Failed", "Succeeded"].iter().all(|status| {
            let q = format!("sum(dnstap_analyser_sessions_total{{status=\"{status}\"}}) > 0");
            !prom.query(&q).is_empty()
        })
    });
    assert!(seen, "Prometheus has no sessions of every status");
    prom.wait_for_fresh_scrape(std::time::Duration::from_secs(30));
    let mut empty = Vec::new();
    let exprs = dashboard_exprs(&dashboard());
    for (title, e) in &exprs {
        let expr = ["$cluster", "$job", "$instance", "$identity", "$upstream"]
            .iter()
            .fold(e.replace("$__rate_interval", "1m"), |e, v| {
                e.replace(v, ".*")
            });
        // An invalid query fails inside `query` with Prometheus' error.
        if prom.query(&expr).is_empty() && !MAY_BE_EMPTY.iter().any(|t| title.starts_with(t)) {
            empty.push(format!("{title}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "{} of {} dashboard queries have no data:\n{}",
        empty.len(),
        exprs.len(),
        empty.join("\n")
    );
    // The variables' queries (Grafana's label_values(SELECTOR, LABEL)) as the PromQL Grafana
    // asks for: each finds values, the scoping ones chained as in Grafana with "All".
    for v in dashboard()["templating"]["list"].as_array().unwrap() {
        let Some(q) = v["query"]["query"].as_str() else {
            continue;
        };
        let (selector, label) = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|r| r.rsplit_once(", "))
            .unwrap_or_else(|| panic!("variable {}: not label_values(...): {q}", v["name"]));
        let selector = ["$cluster", "$job", "$instance"]
            .iter()
            .fold(selector.to_string(), |s, v| s.replace(v, ".*"));
        let values = prom.query(&format!("group by ({label}) ({selector})"));
        assert!(
            !values.is_empty(),
            "variable {}: no values for {q}",
            v["name"]
        );
    }
    // The alert expressions evaluate on the same real series (matching errors only show on
    // data). The injected sender loss holds; the analyser is up, keeps up, and every pod sends.
    for (name, rule) in alert_rules() {
        let holds = !prom.query(rule["expr"].as_str().unwrap()).is_empty();
        let expected = match name.as_str() {
            "DnstapCoreDNSDroppingTapMessages" => Some(true),
            "DnstapAnalyserDown"
            | "DnstapAnalyserAbsent"
            | "DnstapAnalyserDropping"
            | "DnstapCoreDNSPodSilent" => Some(false),
            _ => None,
        };
        assert!(
            expected.is_none_or(|e| e == holds),
            "{name}: the condition holds: {holds}, expected {expected:?}"
        );
    }
    analyser.stop();
}

// ---------------------------------------------------------------------------------------------
// Tests: a real scrape

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
        Kind::Histogram => "histogram",
    }
}

/// Identities of the load generator's emulated CoreDNS pods in [`real_scrape`].
const PODS: usize = 2;

/// One scrape (Prometheus text) of a serving analyser after load-generator traffic with
/// upstream timeouts, forwarded answers and sender loss (SampleLoss), taken once every
/// labelled family those give has samples. Shared by the tests below (one analyser run).
fn real_scrape() -> &'static support::Exposition {
    static SCRAPE: std::sync::OnceLock<support::Exposition> = std::sync::OnceLock::new();
    SCRAPE.get_or_init(|| {
        let analyser = support::Analyser::serve_tcp(&[]);
        let metrics = analyser.metrics_addr();
        // Two runs at max rate (the generator's synthetic clock lets upstream timeouts end
        // within the stream). The first is intact: upstream timeouts stay Failed. The second
        // drops bursts of messages as a CoreDNS with a full queue does: SampleLoss. It starts
        // once the first one's sessions are all out, since a loss turns every session of
        // the identity open at the time into SampleLoss.
        const INTACT: usize = 2000;
        load(
            &analyser.addr(),
            &["--sessions", &INTACT.to_string(), "--seed", "5"],
        );
        assert!(
            analyser.wait_for_lines(INTACT, std::time::Duration::from_secs(120)),
            "the analyser printed {} of {INTACT} sessions",
            analyser.sessions_so_far().len()
        );
        load(
            &analyser.addr(),
            &["--sessions", "1000", "--seed", "6", "--loss", "0.02"],
        );
        let wanted: &[(&str, &str, &str)] = &[
            (
                "dnstap_analyser_sessions_total",
                "cause",
                "forwarded_answer",
            ),
            (
                "dnstap_analyser_sessions_total",
                "cause",
                "upstream_timeout",
            ),
            ("dnstap_analyser_sessions_total", "cause", "no_response"),
            ("dnstap_analyser_sessions_total", "cause", "sender_loss"),
            (
                "dnstap_analyser_upstream_attempts_total",
                "outcome",
                "timeout",
            ),
            (
                "dnstap_analyser_upstream_attempts_total",
                "outcome",
                "answered",
            ),
        ];
        let mut scrape = String::new();
        let complete = support::poll_until(std::time::Duration::from_secs(60), || {
            scrape = support::scrape_text(&metrics);
            let e = support::Exposition::parse(&scrape);
            wanted
                .iter()
                .all(|(name, l, v)| e.sum(name, &[(l, v)]) > 0.0)
        });
        assert!(
            complete,
            "after the traffic, the scrape still lacks one of {wanted:?}:\n{scrape}"
        );
        analyser.stop();
        support::Exposition::parse(&scrape)
    })
}

/// One load-generator run of [`PODS`] emulated CoreDNS pods into the analyser at `addr`.
fn load(addr: &str, extra: &[&str]) {
    let gen = support::run_to_end(
        Command::new(support::loadgen_bin())
            .args(["run", "--connect", addr, "--connect-timeout", "20"])
            .args(["--connections", &PODS.to_string()])
            .args(extra),
        None,
        std::time::Duration::from_secs(120),
    );
    assert!(
        gen.status.success(),
        "loadgen {extra:?} failed:\n{}{}",
        text(&gen.stdout),
        text(&gen.stderr)
    );
}

#[test]
fn a_real_scrape_has_exactly_the_contract_families_and_labels() {
    let scrape = real_scrape();
    for m in EXPOSITION {
        assert_eq!(
            scrape.types.get(m.name).map(String::as_str),
            Some(kind_name(m.kind)),
            "# TYPE of {} in the scrape",
            m.name
        );
    }
    for (name, kind) in &scrape.types {
        assert!(
            EXPOSITION.iter().any(|m| m.name == name),
            "{name} ({kind}) is exposed but not in the contract"
        );
    }
    let mut identities = BTreeSet::new();
    for s in &scrape.samples {
        let (m, bucket) =
            exposed(&s.name).unwrap_or_else(|| panic!("sample {} of no contract family", s.name));
        let mut want: BTreeSet<&str> = m.labels.iter().copied().collect();
        if bucket {
            want.insert("le");
        }
        let have: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
        assert_eq!(have, want, "labels of {} {:?}", s.name, s.labels);
        for (label, value) in &s.labels {
            if let Some(allowed) = label_values(m.name, label) {
                assert!(
                    allowed.contains(&value.as_str()),
                    "{}{{{label}=\"{value}\"}}: not a value of the contract {allowed:?}",
                    s.name
                );
            }
        }
        if let Some(i) = s.labels.get("identity") {
            identities.insert(i.clone());
        }
        if let Some(u) = s.labels.get("upstream") {
            assert!(
                u == "other" || u == "unknown" || u.parse::<std::net::SocketAddr>().is_ok(),
                "upstream label {u:?} is not IP:PORT"
            );
        }
        if let Some(b) = s.labels.get("bitmap") {
            assert!(
                b.parse::<u8>().is_ok_and(|b| (1..=15).contains(&b)),
                "bitmap label {b:?}"
            );
        }
    }
    // The contract's buckets, sub-millisecond cache hits to multi-second timeouts.
    let buckets: BTreeSet<&str> = [
        "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
        "0.25", "0.5", "1", "2", "5", "10", "+Inf",
    ]
    .into();
    // (Queries per lookup counts queries, not seconds.)
    let seconds = |m: &&Metric| m.name != "dnstap_analyser_lookup_queries";
    for m in EXPOSITION
        .iter()
        .filter(|m| m.kind == Kind::Histogram)
        .filter(seconds)
    {
        let bucket = format!("{}_bucket", m.name);
        let les: BTreeSet<&str> = scrape
            .named(&bucket)
            .map(|s| s.labels["le"].as_str())
            .map(|le| le.strip_suffix(".0").unwrap_or(le))
            .collect();
        assert_eq!(les, buckets, "buckets of {}", m.name);
    }
    // The identity label is the CoreDNS pod, never a client or a qname.
    let pods: BTreeSet<String> = (0..PODS).map(|i| format!("coredns-{i}")).collect();
    assert_eq!(identities, pods, "identity label values");
    assert!(
        !scrape.types.contains_key("dnstap_analyser_up"),
        "dnstap_analyser_up is not exported (Prometheus has `up`)"
    );
}

#[test]
fn every_metric_of_the_alerts_and_the_dashboard_is_in_a_real_scrape() {
    let mut used: BTreeMap<String, String> = BTreeMap::new();
    for (alert, rule) in alert_rules() {
        for s in selectors(rule["expr"].as_str().unwrap()) {
            used.entry(s.name)
                .or_insert_with(|| format!("alert {alert}"));
        }
    }
    for s in selectors(&all_strings(&dashboard())) {
        used.entry(s.name)
            .or_insert_with(|| "dashboard.json".into());
    }
    assert!(used.len() >= 8, "too few metric names found: {used:?}");
    let scrape = real_scrape();
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| {
            // A histogram named without suffix: Prometheus stores its series under `_bucket`.
            let series = match exposed(name) {
                Some((m, false)) if m.kind == Kind::Histogram => format!("{name}_bucket"),
                _ => name.to_string(),
            };
            !scrape.has(&series)
        })
        .map(|(name, user)| format!("{name} (used by {user})"))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics without a sample in a real scrape: {missing:?}"
    );
}
