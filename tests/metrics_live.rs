//! The live metrics of a running analyser (issue #9), against what the same run printed: a real
//! sender (`fstrm_replay`) streams captures, the test scrapes `/metrics`, `/healthz` and
//! `/readyz` over HTTP, and compares with the session lines and the exit summary.
//!
//! Stuck and draining states are provoked honestly: stdout is a pipe the test does not read,
//! so the writer blocks on it exactly as it would on a stalled log collector.

mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;
use support::*;

/// The captures replayed: upstream answers, errors and timeouts, and a 5000-session burst.
const CAPTURES: [&str; 4] = [
    "b_forward.fstrm",
    "e_servfail.fstrm",
    "g_timeout.fstrm",
    "h_burst_5k.fstrm",
];

// ---------------------------------------------------------------------------------------------
// HTTP and the Prometheus text format
// ---------------------------------------------------------------------------------------------

/// `GET path` on 127.0.0.1:`port`: (status, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let reply = http_get(&format!("127.0.0.1:{port}"), path, &[])
        .unwrap_or_else(|e| panic!("GET {path} from the metrics port: {e}"));
    (reply.status, reply.body)
}

struct Scrape(Exposition);

impl Scrape {
    fn take(port: u16) -> Scrape {
        Scrape(Exposition::parse(&scrape_text(&format!(
            "127.0.0.1:{port}"
        ))))
    }

    /// Sums `name` over the samples whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.0.sum(name, labels) as u64
    }

    /// `name` summed by the values of `by` (label names), over every sample.
    fn by(&self, name: &str, by: &[&str]) -> BTreeMap<Vec<String>, u64> {
        let mut out = BTreeMap::new();
        for s in self.0.named(name) {
            let key = by
                .iter()
                .map(|k| s.labels.get(*k).cloned().unwrap_or_default())
                .collect();
            *out.entry(key).or_insert(0) += s.value as u64;
        }
        out.retain(|_, v| *v > 0);
        out
    }

    fn has(&self, name: &str) -> bool {
        self.0.has(name)
    }
}

// ---------------------------------------------------------------------------------------------
// What the printed lines say the metrics must be
// ---------------------------------------------------------------------------------------------

/// The contract's `outcome` of an upstream attempt as the line shows it.
fn outcome(attempt: &Value) -> &'static str {
    if attempt["timeout"] == true {
        "timeout"
    } else {
        match attempt["rcode"].as_str() {
            None | Some("NOERROR") | Some("NXDOMAIN") => "answered",
            Some(_) => "error_rcode",
        }
    }
}

/// The contract's `cause` of a session, from its line (METRICS-CONTRACT.md, "DNS outcomes").
fn cause(s: &Value) -> &'static str {
    // What the stream showed before the session (docs/output.md, "Causes"): the line says it.
    match s["cause"].as_str() {
        Some("cached_upstream_error") if s["bitmap"] == 3 => return "cached_upstream_error",
        Some("rejected_upstream_failing") if s["bitmap"] == 1 => {
            return "rejected_upstream_failing"
        }
        _ => {}
    }
    let bitmap = s["bitmap"].as_u64().unwrap();
    let attempts = s["upstreams"].as_array().cloned().unwrap_or_default();
    let upstream_leg = bitmap & 12 != 0 || !attempts.is_empty();
    match s["status"].as_str().unwrap() {
        "SampleLoss" => match s["loss_reason"].as_str() {
            Some("analyser_queue_full" | "session_table_full") => "analyser_loss",
            _ => "sender_loss",
        },
        "Succeeded" if upstream_leg => "forwarded_answer",
        "Succeeded" => "local_answer",
        _ if attempts.iter().any(|a| outcome(a) == "error_rcode") => "upstream_error",
        _ if upstream_leg && attempts.iter().all(|a| outcome(a) == "timeout") => "upstream_timeout",
        _ if bitmap & 2 != 0 => "server_error",
        _ => "no_response",
    }
}

fn count<K: Ord>(keys: impl IntoIterator<Item = K>) -> BTreeMap<K, u64> {
    let mut m = BTreeMap::new();
    for k in keys {
        *m.entry(k).or_insert(0) += 1;
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn a_scrape_agrees_with_the_printed_sessions_and_the_exit_summary() {
    let an = Analyser::serve_tcp(&["--log", "all"]);
    let mport = an.metrics_port();
    wait_until("/readyz says ready", Duration::from_secs(60), || {
        get(mport, "/readyz").0 == 200
    });
    for c in CAPTURES {
        run_sender(&mut fstrm_replay_tcp(an.port(), &coredns_fixture(c)));
    }
    // Every session ends by the idle flush; then the shards' last tick publishes it.
    let mut scrape = Scrape::take(mport);
    let settled = poll_until(Duration::from_secs(90), || {
        scrape = Scrape::take(mport);
        scrape.sum("dnstap_analyser_open_sessions", &[]) == 0
            && scrape.sum("dnstap_analyser_sessions_total", &[]) as usize
                == an.sessions_so_far().len()
            && scrape.sum("dnstap_analyser_messages_total", &[]) > 0
    });
    assert!(settled, "sessions still open or unpublished after 90 s");
    let (health, body) = get(mport, "/healthz");
    assert_eq!(health, 200, "/healthz of a healthy run: {body}");
    assert_eq!(get(mport, "/readyz").0, 200);
    let out = an.stop();
    let summary = &out.summary;

    // Sessions by status and bitmap: the summary's numbers.
    let total = |name| scrape.sum("dnstap_analyser_sessions_total", &[("status", name)]);
    for status in ["Succeeded", "Failed", "SampleLoss"] {
        assert_eq!(total(status), summary["status"][status], "{status}");
        for (bitmap, n) in summary["status_bitmap"][status].as_object().unwrap() {
            let labels = [("status", status), ("bitmap", bitmap.as_str())];
            let scraped = scrape.sum("dnstap_analyser_sessions_total", &labels);
            assert_eq!(scraped, n.as_u64().unwrap(), "{status}/{bitmap}");
        }
    }
    assert_eq!(
        scrape.sum("dnstap_analyser_sessions_total", &[]),
        summary["sessions"].as_u64().unwrap()
    );
    assert!(total("Failed") > 0 && total("Succeeded") > 0, "{summary}");

    // Causes, attempts and latencies: what the printed lines show (every session is printed).
    assert_eq!(
        out.sessions.len() as u64,
        summary["sessions"].as_u64().unwrap()
    );
    let causes = count(out.sessions.iter().map(|s| {
        vec![
            s["identity"].as_str().unwrap().to_string(),
            s["status"].as_str().unwrap().to_string(),
            s["bitmap"].to_string(),
            cause(s).to_string(),
        ]
    }));
    let by = ["identity", "status", "bitmap", "cause"];
    assert_eq!(scrape.by("dnstap_analyser_sessions_total", &by), causes);
    assert!(causes.keys().any(|k| k[3] == "upstream_timeout"));
    assert!(causes.keys().any(|k| k[3] == "upstream_error"));

    let attempts: Vec<&Value> = out
        .sessions
        .iter()
        .flat_map(|s| s["upstreams"].as_array().unwrap())
        .collect();
    let expected = count(attempts.iter().map(|a| {
        let upstream = a["address"].as_str().unwrap_or("unknown").to_string();
        vec![upstream, outcome(a).to_string()]
    }));
    let scraped = scrape.by(
        "dnstap_analyser_upstream_attempts_total",
        &["upstream", "outcome"],
    );
    assert_eq!(scraped, expected, "upstream attempts");
    let with_rtt = count(
        attempts
            .iter()
            .filter(|a| a["rtt_ms"].is_number())
            .map(|a| vec![a["address"].as_str().unwrap_or("unknown").to_string()]),
    );
    let rtt = scrape.by("dnstap_analyser_upstream_rtt_seconds_count", &["upstream"]);
    assert_eq!(rtt, with_rtt, "upstream RTT observations");
    let with_latency = count(
        out.sessions
            .iter()
            .filter(|s| s["latency_ms"].is_number())
            .map(|s| vec![cause(s).to_string()]),
    );
    let latency = scrape.by("dnstap_analyser_client_latency_seconds_count", &["cause"]);
    assert_eq!(latency, with_latency, "client latency observations");

    // Messages, frames, connections and discards.
    for name in [
        "CLIENT_QUERY",
        "CLIENT_RESPONSE",
        "FORWARDER_QUERY",
        "FORWARDER_RESPONSE",
    ] {
        let scraped = scrape.sum("dnstap_analyser_messages_total", &[("type", name)]);
        assert_eq!(scraped, summary["messages_by_type"][name], "{name}");
    }
    assert_eq!(
        scrape.sum("dnstap_analyser_frames_total", &[]),
        summary["frames"]
    );
    assert_eq!(
        scrape.sum("dnstap_analyser_connections_accepted_total", &[]),
        CAPTURES.len() as u64
    );
    assert_eq!(
        scrape.sum(
            "dnstap_analyser_connections_closed_total",
            &[("reason", "stopped")]
        ),
        CAPTURES.len() as u64
    );
    assert_eq!(scrape.sum("dnstap_analyser_connections_open", &[]), 0);
    // Each dropped reason of the summary is exported in exactly one family, with its count.
    let units = [
        "dnstap_analyser_discarded_messages_total",
        "dnstap_analyser_discarded_frames_total",
        "dnstap_analyser_discarded_connections_total",
    ];
    for (reason, n) in summary["dropped"].as_object().unwrap() {
        let labels = [("reason", reason.as_str())];
        let exported: Vec<_> = units
            .iter()
            .filter(|f| {
                scrape
                    .0
                    .named(f)
                    .any(|s| s.labels.get("reason") == Some(reason))
            })
            .collect();
        assert_eq!(exported.len(), 1, "discard reason {reason} in {exported:?}");
        assert_eq!(scrape.sum(exported[0], &labels), n.as_u64().unwrap());
    }
    let exported_reasons: usize = units.iter().map(|f| scrape.0.named(f).count()).sum();
    assert_eq!(
        exported_reasons,
        summary["dropped"].as_object().unwrap().len(),
        "a reason exported but not in the summary"
    );
    assert_eq!(
        scrape.sum("dnstap_analyser_rejected_times_total", &[]),
        summary["rejected_times"].as_u64().unwrap()
    );
    assert!(scrape.has("dnstap_analyser_watermark_lag_seconds"));
    assert!(scrape.has("dnstap_analyser_build_info"));
}

/// A serving analyser whose stdout is a pipe nobody reads until `read_stdout`: its writer
/// blocks once the pipe is full, as on a stalled log collector.
fn unread(extra: &[&str]) -> Analyser {
    let mut args = vec!["--log", "all"];
    args.extend(extra);
    Analyser::serve_with(Listen::Tcp(0), &args, Stdout::Unread)
}

/// The exit after SIGTERM: clean, every line of stdout read and counted in the summary.
fn exit(an: Analyser) -> Output {
    let out = an.wait_exit(Duration::from_secs(120));
    out.assert_clean("the analyser after SIGTERM");
    assert_eq!(
        out.sessions.len() as u64,
        out.summary["sessions_printed"].as_u64().unwrap(),
        "{}",
        out.summary
    );
    out
}

#[test]
fn healthz_names_a_writer_stuck_on_its_output_and_recovers_when_it_drains() {
    let mut an = unread(&["--stall-timeout", "2s"]);
    let port = an.metrics_port();
    assert_eq!(get(port, "/healthz").0, 200, "healthy before any work");
    // About 12 MB of lines into a 64 KiB pipe nobody reads.
    run_sender(&mut fstrm_replay_tcp(
        an.port(),
        &coredns_fixture("h_burst_5k.fstrm"),
    ));
    let mut last = (0, String::new());
    let stuck = poll_until(Duration::from_secs(60), || {
        last = get(port, "/healthz");
        last.0 == 503 && last.1.contains("writer")
    });
    assert!(
        stuck,
        "/healthz never named the blocked writer; last: {last:?}"
    );
    an.assert_running("its writer is stuck");
    assert_eq!(
        get(port, "/readyz").0,
        200,
        "stuck is not draining: still ready"
    );
    an.read_stdout();
    let recovered = poll_until(Duration::from_secs(60), || {
        last = get(port, "/healthz");
        last.0 == 200
    });
    assert!(
        recovered,
        "/healthz did not recover once stdout was read: {last:?}"
    );
    an.signal("TERM");
    let out = exit(an);
    assert_eq!(out.summary["sessions"], 5000, "{}", out.summary);
}

#[test]
fn readyz_is_false_while_draining_after_sigterm() {
    let mut an = unread(&[]);
    let port = an.metrics_port();
    wait_until("/readyz says ready", Duration::from_secs(60), || {
        get(port, "/readyz").0 == 200
    });
    run_sender(&mut fstrm_replay_tcp(
        an.port(),
        &coredns_fixture("h_burst_5k.fstrm"),
    ));
    // The drain cannot finish while the writer is blocked on the unread pipe.
    an.signal("TERM");
    let mut last = (0, String::new());
    let draining = poll_until(Duration::from_secs(60), || {
        last = get(port, "/readyz");
        last.0 == 503
    });
    assert!(draining, "/readyz stayed ready after SIGTERM: {last:?}");
    assert!(last.1.contains("draining"), "{last:?}");
    an.assert_running("draining");
    an.read_stdout();
    let out = exit(an);
    assert_eq!(out.summary["sessions"], 5000, "{}", out.summary);
    assert_eq!(
        out.sessions.len(),
        5000,
        "every session printed after the drain"
    );
}

#[test]
fn read_serves_metrics_only_when_asked_and_a_taken_port_is_an_error() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = busy.local_addr().unwrap().to_string();
    let out = run_to_end(
        Command::new(analyser_bin())
            .args(["read", "--metrics-listen", &taken])
            .arg(coredns_fixture("a_hosts.fstrm")),
        None,
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot serve metrics on {taken}")),
        "{stderr}"
    );
    // Without the flag `read` opens no endpoint, so the same taken port is no obstacle.
    let ok = read(&[coredns_fixture("a_hosts.fstrm")], &[]);
    assert!(!ok.stderr.contains("metrics on"), "{}", ok.stderr);
    let bad = run_to_end(
        Command::new(analyser_bin()).args(["--metrics-listen", "nowhere", "read", "x"]),
        None,
        Duration::from_secs(20),
    );
    assert_eq!(
        bad.status.code(),
        Some(2),
        "a malformed address is a usage error"
    );
}

/// `dnstap-loadgen` as `pods` CoreDNS pods (identities `coredns-0`, ...) from 127.0.0.`host`:
/// `sessions` answered sessions (CQ, CR), then STOP.
fn loadgen_pods(an: &Analyser, host: u8, pods: u32, sessions: u32) {
    run_ok(
        Command::new(loadgen_bin()).args([
            "run",
            "--connect",
            &an.addr(),
            "--bind",
            &format!("127.0.0.{host}"),
            "--connections",
            &pods.to_string(),
            "--sessions",
            &sessions.to_string(),
            "--mix",
            "local=1",
        ]),
        Duration::from_secs(60),
    );
}

/// #17 item 4: gone CoreDNS pods leave. A pod that stopped is reclaimed once a new identity
/// needs room after `--identity-idle-timeout` (at least `--session-timeout` + 60 s): its label
/// slot goes to a new pod (not `other`), its series leave, and its counts move to
/// `identity="reclaimed"`, so that the sums still equal the exit summary.
#[test]
fn a_reclaimed_identity_frees_its_label_and_its_counts_stay_summed() {
    let an = Analyser::serve_tcp(&[
        "--session-timeout",
        "1s",
        "--identity-idle-timeout",
        "1s",
        "--max-identity-labels",
        "2",
    ]);
    let port = an.metrics_port();
    let by_identity = |name: &str| Scrape::take(port).by(name, &["identity"]);
    // The old pod: 127.0.0.2, coredns-0, 50 sessions of 2 messages.
    loadgen_pods(&an, 2, 1, 50);
    wait_until("the old pod's sessions", Duration::from_secs(30), || {
        Scrape::take(port).sum("dnstap_analyser_sessions_total", &[]) == 50
    });
    // Released by its stream once the stream ended with STOP.
    let old = [("identity", "coredns-0")];
    wait_until("the old pod stopped", Duration::from_secs(30), || {
        Scrape::take(port).sum("dnstap_analyser_identity_stopped", &old) == 1
    });
    let stopped_at = std::time::Instant::now();
    // Reclaimed when a new identity arrives this long after its stream let go of it.
    std::thread::sleep(Duration::from_secs(62).saturating_sub(stopped_at.elapsed()));
    // Two new pods from another address: coredns-0 there is another sender.
    loadgen_pods(&an, 3, 2, 100);
    wait_until("every session counted", Duration::from_secs(30), || {
        Scrape::take(port).sum("dnstap_analyser_sessions_total", &[]) == 150
    });
    let messages = by_identity("dnstap_analyser_messages_total");
    let of = |i: &str| messages.get(&vec![i.to_string()]).copied().unwrap_or(0);
    assert_eq!(of("reclaimed"), 100, "the old pod's messages: {messages:?}");
    assert_eq!(of("other"), 0, "both new pods have a label: {messages:?}");
    assert_eq!(of("coredns-0") + of("coredns-1"), 200, "{messages:?}");
    let sessions = by_identity("dnstap_analyser_sessions_total");
    assert_eq!(sessions[&vec!["reclaimed".to_string()]], 50, "{sessions:?}");
    let lag = by_identity("dnstap_analyser_watermark_lag_seconds");
    assert!(!lag.contains_key(&vec!["reclaimed".to_string()]), "{lag:?}");
    let out = an.stop();
    assert_eq!(
        out.summary_sessions(),
        Some(150),
        "Σ sessions_total = the summary's sessions"
    );
}
