//! The live metrics of a running analyser (issue #9), against what the same run printed: a real
//! sender (`fstrm_replay`) streams captures, the test scrapes `/metrics`, `/healthz` and
//! `/readyz` over HTTP, and compares with the session lines and the exit summary.
//!
//! Stuck and draining states are provoked honestly: stdout is a pipe the test does not read,
//! so the writer blocks on it exactly as it would on a stalled log collector.

mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
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
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect to the metrics port {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_string())
}

/// One sample: metric name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a Prometheus text exposition.
fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| parse_sample(l).unwrap_or_else(|| panic!("unparseable sample line {l:?}")))
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, mut rest) = match series.split_once('{') {
        Some((n, r)) => (n, r.strip_suffix('}')?),
        None => (series, ""),
    };
    let mut labels = BTreeMap::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut val = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => val.push('\n'),
                    c => val.push(c),
                },
                (_, c) => val.push(c),
            }
        };
        labels.insert(key.trim_start_matches(',').to_string(), val);
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

struct Scrape(Vec<Sample>);

impl Scrape {
    fn take(port: u16) -> Scrape {
        let (status, body) = get(port, "/metrics");
        assert_eq!(status, 200, "/metrics: {body}");
        Scrape(parse_exposition(&body))
    }

    /// Sums `name` over the samples whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.0
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value as u64)
            .sum()
    }

    /// `name` summed by the values of `by` (label names), over every sample.
    fn by(&self, name: &str, by: &[&str]) -> BTreeMap<Vec<String>, u64> {
        let mut out = BTreeMap::new();
        for s in self.0.iter().filter(|s| s.name == name) {
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
        self.0.iter().any(|s| s.name == name)
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
    wait_until("/readyz says ready", Duration::from_secs(20), || {
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
    for (summary_type, metric_type) in [
        ("CLIENT_QUERY", "CLIENT_QUERY"),
        ("CLIENT_RESPONSE", "CLIENT_RESPONSE"),
        ("UPSTREAM_QUERY", "FORWARDER_QUERY"),
        ("UPSTREAM_RESPONSE", "FORWARDER_RESPONSE"),
    ] {
        let scraped = scrape.sum("dnstap_analyser_messages_total", &[("type", metric_type)]);
        assert_eq!(
            scraped, summary["messages_by_type"][summary_type],
            "{metric_type}"
        );
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
    for (reason, n) in summary["dropped"].as_object().unwrap() {
        let labels = [("reason", reason.as_str())];
        assert!(
            scrape
                .0
                .iter()
                .any(|s| s.name == "dnstap_analyser_discarded_total"
                    && s.labels.get("reason") == Some(reason)),
            "discard reason {reason} is not exported"
        );
        assert_eq!(
            scrape.sum("dnstap_analyser_discarded_total", &labels),
            n.as_u64().unwrap()
        );
    }
    assert!(scrape.has("dnstap_analyser_watermark_lag_seconds"));
    assert!(scrape.has("dnstap_analyser_build_info"));
}

/// A serving analyser whose stdout is a pipe nobody reads until `read_stdout`: its writer
/// blocks once the pipe is full, as on a stalled log collector.
struct Unread {
    child: Child,
    stdout: Option<ChildStdout>,
    stderr: Arc<Mutex<String>>,
    metrics_port: u16,
    dnstap_port: u16,
}

impl Unread {
    fn serve(extra: &[&str]) -> Unread {
        // Port 0: the kernel picks both ports, the analyser logs them.
        let mut child = Command::new(analyser_bin())
            .args(["--listen", "tcp://127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--log", "all", "--format", "json"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start the analyser");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let text = stderr.clone();
        thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                text.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        let stdout = child.stdout.take();
        let mut an = Unread {
            child,
            stdout,
            stderr,
            metrics_port: 0,
            dnstap_port: 0,
        };
        wait_until("the analyser listens", Duration::from_secs(20), || {
            an.assert_running();
            let log = an.stderr.lock().unwrap();
            match (logged_listen_port(&log, "tcp"), logged_metrics_port(&log)) {
                (Some(dnstap), Some(metrics)) => {
                    (an.dnstap_port, an.metrics_port) = (dnstap, metrics);
                    true
                }
                _ => false,
            }
        });
        an
    }

    fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("analyser exited ({st}):\n{}", self.stderr.lock().unwrap());
        }
    }

    /// Starts reading stdout; the thread returns the number of lines.
    fn read_stdout(&mut self) -> JoinHandle<usize> {
        let stdout = self.stdout.take().expect("stdout already read");
        // Session lines only: the lookup lines printed besides are not sessions.
        thread::spawn(move || {
            let lines = BufReader::new(stdout).lines().map_while(Result::ok);
            lines
                .filter(|l| !l.starts_with("{\"kind\":\"lookup\""))
                .count()
        })
    }

    /// Waits for the exit (after SIGTERM) and returns the summary.
    fn exit(mut self) -> Value {
        let status = wait_child(&mut self.child, Duration::from_secs(60));
        let stderr = self.stderr.lock().unwrap().clone();
        assert!(
            status.is_some_and(|s| s.success()),
            "exit {status:?}:\n{stderr}"
        );
        stderr
            .lines()
            .rev()
            .find_map(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()?
                    .get("summary")
                    .cloned()
            })
            .unwrap_or_else(|| panic!("no summary:\n{stderr}"))
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal_group(self.child.id(), "KILL");
            let _ = self.child.wait();
        }
    }
}

#[test]
fn healthz_names_a_writer_stuck_on_its_output_and_recovers_when_it_drains() {
    let mut an = Unread::serve(&["--stall-timeout", "2s"]);
    let port = an.metrics_port;
    assert_eq!(get(port, "/healthz").0, 200, "healthy before any work");
    // About 12 MB of lines into a 64 KiB pipe nobody reads.
    run_sender(&mut fstrm_replay_tcp(
        an.dnstap_port,
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
    an.assert_running();
    assert_eq!(
        get(port, "/readyz").0,
        200,
        "stuck is not draining: still ready"
    );
    let lines = an.read_stdout();
    let recovered = poll_until(Duration::from_secs(60), || {
        last = get(port, "/healthz");
        last.0 == 200
    });
    assert!(
        recovered,
        "/healthz did not recover once stdout was read: {last:?}"
    );
    signal_pid(an.child.id(), "TERM");
    let summary = an.exit();
    let printed = lines.join().unwrap() as u64;
    assert_eq!(printed, summary["sessions_printed"].as_u64().unwrap());
    assert_eq!(summary["sessions"], 5000, "{summary}");
}

#[test]
fn readyz_is_false_while_draining_after_sigterm() {
    let mut an = Unread::serve(&[]);
    let port = an.metrics_port;
    wait_until("/readyz says ready", Duration::from_secs(20), || {
        get(port, "/readyz").0 == 200
    });
    run_sender(&mut fstrm_replay_tcp(
        an.dnstap_port,
        &coredns_fixture("h_burst_5k.fstrm"),
    ));
    // The drain cannot finish while the writer is blocked on the unread pipe.
    signal_pid(an.child.id(), "TERM");
    let mut last = (0, String::new());
    let draining = poll_until(Duration::from_secs(30), || {
        last = get(port, "/readyz");
        last.0 == 503
    });
    assert!(draining, "/readyz stayed ready after SIGTERM: {last:?}");
    assert!(last.1.contains("draining"), "{last:?}");
    an.assert_running();
    let lines = an.read_stdout();
    let summary = an.exit();
    assert_eq!(summary["sessions"], 5000, "{summary}");
    assert_eq!(
        lines.join().unwrap(),
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
