//! The live metrics through real components, on loopback only:
//! - a real Prometheus server scrapes the analyser every second during a load-generator run,
//!   and its query API then gives the session totals of the generator's ground truth and of
//!   the analyser's exit summary;
//! - `promtool check metrics` accepts a real scrape of the analyser serving a capture;
//! - slow and garbage HTTP clients on the metrics port leave a running stream exact.
//!
//! `prometheus` and `promtool` come from the Debian package `prometheus`; a missing one fails
//! the test naming the package. No timing assertions: every wait has a generous deadline.

mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;
use support::{
    coredns_fixture, fstrm_replay_tcp, loadgen_bin, poll_until, promtool_check_metrics, read,
    run_sender, run_to_end, scrape_text, text, Analyser, Exposition, Prometheus, TempDir,
};

// ---------------------------------------------------------------------------------------------
// The load generator's ground truth

/// Counts keyed `.../cause` with the causes the stream decides (a lone CQ after failing
/// attempts, a local error after the same upstream error) under the ones the generator knows.
fn folded(counts: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (key, n) in counts {
        let (head, cause) = key
            .rsplit_once('/')
            .map_or(("", key.as_str()), |(h, c)| (h, c));
        let cause = match cause {
            "rejected_upstream_failing" => "no_response",
            "cached_upstream_error" => "server_error",
            c => c,
        };
        let key = if head.is_empty() {
            cause.to_string()
        } else {
            format!("{head}/{cause}")
        };
        *out.entry(key).or_insert(0) += n;
    }
    out
}

/// What `dnstap-loadgen run` says it generated: `--truth` (JSON) and `--truth-sessions` (TSV).
struct Truth {
    json: Value,
    /// one row per session: (identity, outcome, status, bitmap, lost messages, rcode)
    sessions: Vec<TruthSession>,
}

struct TruthSession {
    identity: String,
    outcome: String,
    status: String,
    bitmap: String,
    lost: bool,
}

impl TruthSession {
    /// The contract's `cause` of a generated session (docs/operations.md, METRICS): what the
    /// generator made happen, independent of how the analyser classifies it.
    fn cause(&self) -> &'static str {
        if self.lost {
            // Only the sender (the generator) loses messages in these runs.
            return "sender_loss";
        }
        let failed = match self.status.as_str() {
            "Succeeded" => false,
            "Failed" => true,
            other => panic!("intact session expected {other}"),
        };
        match (self.outcome.as_str(), failed) {
            // CQ, CR: answered by CoreDNS itself; an error rcode is CoreDNS's own.
            ("local", false) => "local_answer",
            ("local", true) => "server_error",
            // CQ, FQ, FR, CR (after a timed-out attempt with retries): the client gets the
            // upstream's rcode, so a failure is the upstream's error rcode.
            (o, false) if o.starts_with("forward") => "forwarded_answer",
            (o, true) if o.starts_with("forward") => "upstream_error",
            // CQ and unanswered FQs, no CR.
            ("timeout", true) => "upstream_timeout",
            // CQ only.
            ("no_response", true) => "no_response",
            (o, f) => panic!("unknown generated outcome {o} (failed: {f})"),
        }
    }
}

impl Truth {
    fn load(json: &Path, tsv: &Path) -> Truth {
        let json: Value = serde_json::from_str(&fs::read_to_string(json).unwrap()).unwrap();
        let tsv = fs::read_to_string(tsv).unwrap();
        let mut lines = tsv.lines();
        let header: Vec<&str> = lines.next().expect("TSV header").split('\t').collect();
        let col = |name: &str| {
            header
                .iter()
                .position(|h| h.trim_start_matches('#') == name)
                .unwrap_or_else(|| panic!("no column {name} in {header:?}"))
        };
        let (identity, outcome, status, bitmap, lost) = (
            col("identity"),
            col("outcome"),
            col("status"),
            col("bitmap"),
            col("lost"),
        );
        let sessions = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let c: Vec<&str> = l.split('\t').collect();
                TruthSession {
                    identity: c[identity].to_string(),
                    outcome: c[outcome].to_string(),
                    status: c[status].to_string(),
                    bitmap: c[bitmap].to_string(),
                    lost: c[lost] != "0",
                }
            })
            .collect();
        Truth {
            json: json["ground_truth"].clone(),
            sessions,
        }
    }

    fn count_by(&self, key: impl Fn(&TruthSession) -> String) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for s in &self.sessions {
            *m.entry(key(s)).or_insert(0) += 1;
        }
        m
    }

    /// A JSON object of counts as a map, without zero entries (Prometheus has no series
    /// for what never happened, when asked `sum by`).
    fn object(&self, path: &[&str]) -> BTreeMap<String, u64> {
        let mut v = &self.json;
        for p in path {
            v = &v[*p];
        }
        nonzero(v)
    }
}

fn nonzero(v: &Value) -> BTreeMap<String, u64> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn without_zeros(m: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    m.into_iter().filter(|(_, n)| *n > 0).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Prometheus' view of a load-generator run

const SESSIONS: u64 = 20_000;

#[test]
fn prometheus_query_api_gives_the_ground_truth_and_the_exit_summary() {
    let dir = TempDir::new("prom-loadgen");
    let analyser = Analyser::serve_tcp(&[
        "--shards",
        "2",
        // A deep queue: an unoptimised build on a shared machine buffers instead of shedding,
        // so the counts can be exact.
        "--queue-capacity",
        "1000000",
    ]);
    let metrics = analyser.metrics_addr();
    let mut prom = Prometheus::start(&dir, std::slice::from_ref(&metrics));
    prom.wait_for_targets_up(Duration::from_secs(60));

    let (truth_json, truth_tsv) = (dir.join("truth.json"), dir.join("truth.tsv"));
    let gen = run_to_end(
        Command::new(loadgen_bin())
            .args(["run", "--connect", &analyser.addr(), "--connections", "4"])
            .args(["--sessions", &SESSIONS.to_string(), "--rate", "4000"])
            .args(["--seed", "9", "--connect-timeout", "20"])
            .arg("--truth")
            .arg(&truth_json)
            .arg("--truth-sessions")
            .arg(&truth_tsv),
        None,
        Duration::from_secs(180),
    );
    assert!(
        gen.status.success(),
        "loadgen failed:\n{}{}",
        text(&gen.stdout),
        text(&gen.stderr)
    );
    let truth = Truth::load(&truth_json, &truth_tsv);
    assert_eq!(truth.sessions.len() as u64, SESSIONS, "truth TSV rows");

    // The generator has stopped; the last sessions (upstream timeouts, 2 s per attempt) end
    // when the idle flush passes the session timeout. The analyser keeps running meanwhile.
    assert!(
        analyser.wait_for_lines(SESSIONS as usize, Duration::from_secs(120)),
        "the analyser printed {} of {SESSIONS} sessions",
        analyser.sessions_so_far().len()
    );
    // Then a scrape after the flush: Prometheus has every session.
    let counted = poll_until(Duration::from_secs(60), || {
        prom.value("sum(dnstap_analyser_sessions_total)") == Some(SESSIONS as f64)
    });
    prom.wait_for_fresh_scrape(Duration::from_secs(30));
    let total = prom.value("sum(dnstap_analyser_sessions_total)");
    assert!(
        counted,
        "Prometheus counts {total:?} sessions, the analyser printed {SESSIONS}; targets: {}",
        prom.targets_report()
    );

    let by_status = prom.counts(
        "sum by (status) (dnstap_analyser_sessions_total)",
        &["status"],
    );
    // The generator knows what it made happen to each session, not what the stream around it
    // showed: a lone CQ after timed-out attempts is `rejected_upstream_failing` to the analyser
    // and `no_response` to the generator (a local error after the same upstream error would be
    // `cached_upstream_error` and `server_error`). They are folded for the comparison.
    let by_cause = folded(prom.counts(
        "sum by (cause) (dnstap_analyser_sessions_total)",
        &["cause"],
    ));
    let by_everything = folded(prom.counts(
        "sum by (identity, status, bitmap, cause) (dnstap_analyser_sessions_total)",
        &["identity", "status", "bitmap", "cause"],
    ));
    // rcode and qtype on the session counter: what the clients got, and what they asked.
    let by_rcode = prom.counts(
        "sum by (rcode) (dnstap_analyser_sessions_total)",
        &["rcode"],
    );
    let by_qtype = prom.counts(
        "sum by (qtype) (dnstap_analyser_sessions_total)",
        &["qtype"],
    );
    // The failing names /top's sketch is sure of, as a gauge family.
    let failing_names = prom.counts(
        "sum by (qname, cause) (dnstap_analyser_top_failing_names)",
        &["qname", "cause"],
    );
    let by_type = prom.counts("sum by (type) (dnstap_analyser_messages_total)", &["type"]);
    let attempts = prom.counts(
        "sum by (outcome) (dnstap_analyser_upstream_attempts_total)",
        &["outcome"],
    );
    let latency_by_cause = folded(prom.counts(
        "sum by (cause) (dnstap_analyser_client_latency_seconds_count)",
        &["cause"],
    ));
    let rtts = prom.value("sum(dnstap_analyser_upstream_rtt_seconds_count)");
    let discarded = prom.value(
        r#"sum({__name__=~"dnstap_analyser_discarded_(messages|frames|connections)_total"})"#,
    );
    // Only now SIGTERM: Prometheus has scraped the final values.
    let out = analyser.stop();
    drop(prom);

    println!("Prometheus: by status {by_status:?}\nby cause {by_cause:?}\nattempts {attempts:?}");
    // Prometheus = ground truth.
    assert_eq!(by_status, truth.object(&["status"]), "sessions by status");
    let truth_causes = truth.count_by(|s| s.cause().to_string());
    assert_eq!(by_cause, truth_causes, "sessions by cause");
    assert_eq!(
        by_everything,
        truth.count_by(|s| format!("{}/{}/{}/{}", s.identity, s.status, s.bitmap, s.cause())),
        "sessions by identity/status/bitmap/cause"
    );
    assert_eq!(
        by_type,
        truth.object(&["messages", "by_type"]),
        "messages by type"
    );
    // Every FR answers one attempt (an error rcode for the failed forwards); every FQ
    // without its FR timed out.
    let sent = &truth.json["messages"]["by_type"];
    let (fq, fr) = (
        sent["FORWARDER_QUERY"].as_u64().unwrap(),
        sent["FORWARDER_RESPONSE"].as_u64().unwrap(),
    );
    let upstream_errors = truth_causes.get("upstream_error").copied().unwrap_or(0);
    assert_eq!(
        attempts,
        without_zeros(BTreeMap::from([
            ("answered".to_string(), fr - upstream_errors),
            ("error_rcode".to_string(), upstream_errors),
            ("timeout".to_string(), fq - fr),
        ])),
        "upstream attempts by outcome"
    );
    assert_eq!(
        rtts,
        Some(fr as f64),
        "one upstream RTT per answered attempt"
    );
    // A client latency for every session whose client got a response (CQ and CR).
    let answered_causes = [
        "local_answer",
        "forwarded_answer",
        "server_error",
        "upstream_error",
    ];
    assert_eq!(
        latency_by_cause,
        truth_causes
            .iter()
            .filter(|(c, _)| answered_causes.contains(&c.as_str()))
            .map(|(c, n)| (c.clone(), *n))
            .collect(),
        "client latencies by cause"
    );
    assert_eq!(discarded, Some(0.0), "nothing discarded");

    // rcode and qtype = the printed lines'.
    let lines_by = |f: &dyn Fn(&Value) -> String| {
        let mut m = BTreeMap::new();
        for s in &out.sessions {
            *m.entry(f(s)).or_insert(0u64) += 1;
        }
        m
    };
    let rcode_of = |s: &Value| s["rcode"].as_str().unwrap_or("none").to_string();
    assert_eq!(by_rcode, lines_by(&rcode_of), "sessions by rcode");
    assert!(
        by_rcode.contains_key("NOERROR") && by_rcode.contains_key("none"),
        "{by_rcode:?}"
    );
    let qtype_of = |s: &Value| s["qtype"].as_str().unwrap_or("other").to_string();
    assert_eq!(by_qtype, lines_by(&qtype_of), "sessions by qtype");
    // Every failing name Prometheus got is one whose Failed lines are above the sketch's
    // bound (N / K, K = 100), counted at least that often (the sketch overcounts, never under).
    let failed_lines: Vec<&Value> = out
        .sessions
        .iter()
        .filter(|s| s["status"] == "Failed")
        .collect();
    let bound = failed_lines.len() as u64 / 100;
    let failed_by_name = lines_by(&|s: &Value| {
        if s["status"] == "Failed" {
            s["qname"].as_str().unwrap_or("").to_string()
        } else {
            String::new()
        }
    });
    println!("failing names {failing_names:?} (bound {bound})");
    assert!(failing_names.len() <= 100);
    for (key, n) in &failing_names {
        let qname = key.rsplit_once('/').map_or(key.as_str(), |(q, _)| q);
        let truth = failed_by_name.get(qname).copied().unwrap_or(0);
        assert!(
            truth > bound && *n >= truth,
            "{key}: {n} in Prometheus, {truth} Failed lines"
        );
    }
    let expected_names = failed_by_name
        .iter()
        .filter(|(q, &n)| !q.is_empty() && n > 2 * bound + 1)
        .count();
    assert!(
        failing_names.len() >= expected_names.min(100),
        "{} failing names in Prometheus, {expected_names} names with more than twice the bound",
        failing_names.len()
    );

    // Prometheus = the analyser's exit summary.
    assert_eq!(out.summary_sessions(), Some(SESSIONS), "{}", out.summary);
    assert_eq!(
        by_status,
        nonzero(&out.summary["status"]),
        "Prometheus vs exit summary, by status"
    );
    let summary_by_status_bitmap: BTreeMap<String, u64> = out.summary["status_bitmap"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(st, per)| {
            nonzero(per)
                .into_iter()
                .map(move |(b, n)| (format!("{st}/{b}"), n))
        })
        .collect();
    assert_eq!(
        status_bitmap_of(&by_everything),
        summary_by_status_bitmap,
        "Prometheus vs exit summary, by status and bitmap"
    );
    let summary_dropped: u64 = nonzero(&out.summary["dropped"]).values().sum();
    assert_eq!(summary_dropped, 0, "{}", out.summary);
}

/// Folds `identity/status/bitmap/cause` counts into `status/bitmap`.
fn status_bitmap_of(m: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (k, n) in m {
        let parts: Vec<&str> = k.split('/').collect();
        *out.entry(format!("{}/{}", parts[1], parts[2])).or_insert(0) += n;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 2. promtool on a real scrape

#[test]
fn promtool_check_metrics_passes_on_a_real_scrape() {
    let analyser = Analyser::serve_tcp(&[]);
    let metrics = analyser.metrics_addr();
    // h_burst_5k has local and forwarded answers, server and upstream errors: every histogram
    // and most labelled families get samples.
    let file = coredns_fixture("h_burst_5k.fstrm");
    let expected = read(std::slice::from_ref(&file), &[]).sessions.len() as f64;
    run_sender(&mut fstrm_replay_tcp(analyser.port(), &file));
    let mut scrape = String::new();
    let complete = poll_until(Duration::from_secs(60), || {
        scrape = scrape_text(&metrics);
        Exposition::parse(&scrape).sum("dnstap_analyser_sessions_total", &[]) == expected
    });
    assert!(
        complete,
        "the scrape does not count the capture's {expected} sessions:\n{scrape}"
    );
    let report = promtool_check_metrics(&scrape)
        .unwrap_or_else(|e| panic!("promtool check metrics rejects the scrape:\n{e}\n{scrape}"));
    println!("promtool check metrics: ok {report}");
    analyser.stop();

    // The check must be able to fail: the same scrape with one malformed sample.
    let broken = scrape.replacen(
        "dnstap_analyser_frames_total ",
        "dnstap_analyser_frames_total{ ",
        1,
    );
    assert_ne!(broken, scrape, "no frames_total sample to break");
    assert!(
        promtool_check_metrics(&broken).is_err(),
        "promtool accepted a malformed sample"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Slow and garbage HTTP clients on the metrics port

/// Connections that misbehave on the metrics port; closed when dropped.
struct Nuisances {
    held: Vec<TcpStream>,
    dribbling: Arc<AtomicBool>,
    dribbler: Option<thread::JoinHandle<()>>,
}

impl Nuisances {
    fn connect(addr: &str) -> Nuisances {
        let connect = || {
            let s = TcpStream::connect(addr).expect("connect to the metrics port");
            // A full socket buffer must not block the test.
            s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        };
        let mut held = Vec::new();
        // 100 idle connections: connected, nothing sent.
        held.extend((0..100).map(|_| connect()));
        // Half-sent requests, then silence.
        for _ in 0..10 {
            let mut s = connect();
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: slo");
            held.push(s);
        }
        // Clients that never read: many pipelined scrapes, no reads.
        for _ in 0..5 {
            let mut s = connect();
            let _ = s.write_all(
                &b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".repeat(200),
            );
            held.push(s);
        }
        // Random bytes (xorshift; the same every run).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..5 {
            let bytes: Vec<u8> = (0..65_536)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let mut s = connect();
            let _ = s.write_all(&bytes);
            held.push(s);
        }
        // A slowloris: one byte of an endless header every 50 ms until dropped.
        let dribbling = Arc::new(AtomicBool::new(true));
        let mut slow = connect();
        let go_on = dribbling.clone();
        let dribbler = thread::spawn(move || {
            let _ = slow.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ");
            while go_on.load(Ordering::Relaxed) && slow.write_all(b"a").is_ok() {
                thread::sleep(Duration::from_millis(50));
            }
        });
        Nuisances {
            held,
            dribbling,
            dribbler: Some(dribbler),
        }
    }
}

impl Drop for Nuisances {
    fn drop(&mut self) {
        self.dribbling.store(false, Ordering::Relaxed);
        if let Some(t) = self.dribbler.take() {
            let _ = t.join();
        }
        self.held.clear();
    }
}

#[test]
fn slow_and_garbage_http_clients_leave_a_running_stream_exact() {
    let analyser = Analyser::serve_tcp(&[]);
    let metrics = analyser.metrics_addr();
    let file = coredns_fixture("h_burst_5k.fstrm");
    let nuisances = Nuisances::connect(&metrics);
    // The stream runs while they are all connected and the slowloris dribbles.
    let replay = {
        let (port, file) = (analyser.port(), file.clone());
        thread::spawn(move || run_sender(&mut fstrm_replay_tcp(port, &file)))
    };
    // A scrape meanwhile still gets an answer.
    let during = scrape_text(&metrics);
    replay.join().expect("the replay failed");
    assert!(during.contains("dnstap_analyser_build_info"), "{during}");
    drop(nuisances);
    let after = Exposition::parse(&scrape_text(&metrics));
    let out = analyser.stop();

    let want = read(std::slice::from_ref(&file), &[]);
    assert_eq!(
        out.signatures(),
        want.signatures(),
        "the stream's sessions differ from `read` of the capture"
    );
    assert_eq!(out.summary_messages(), want.summary_messages(), "messages");
    let dropped = nonzero(&out.summary["dropped"]);
    assert!(dropped.is_empty(), "dropped: {dropped:?}");
    assert_eq!(
        ["messages", "frames", "connections"]
            .map(|unit| after.sum(&format!("dnstap_analyser_discarded_{unit}_total"), &[]))
            .iter()
            .sum::<f64>(),
        0.0,
        "discards in the last scrape"
    );
    assert_eq!(
        out.summary["connections"], 1,
        "the HTTP clients are no dnstap connections: {}",
        out.summary
    );
}
