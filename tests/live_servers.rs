//! Live tests: real DNS servers send dnstap to the analyser, real queries go through them, and
//! the analyser's sessions are checked (one per client query, Status, BitMap, upstream attempts).
//!
//! Topology per test (all on 127.0.0.1, ports from 25000-25999, files in a temp dir):
//!
//!   dig/dnsperf --> forwarder (unbound | named | kresd | dnsdist) --> nsd (example.test,
//!                       |                                             servfail.test, REFUSED else)
//!                       |--> silent UDP socket for silent.test (receives, never answers)
//!                       `--dnstap--> dnstap-analyser (TCP: unbound, dnsdist; unix: named, kresd)
//!
//! Needs the Debian packages nsd, unbound, bind9, knot-resolver, dnsdist, dnsutils, dnsperf
//! (.ci/apt-packages). A missing one fails the test naming the package. Expected sessions per
//! server are explained in docs/senders.md.

mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};
use support::*;

fn without_probe(sessions: Vec<Value>) -> Vec<Value> {
    sessions
        .into_iter()
        .filter(|s| s_qname(s) != PROBE)
        .collect()
}

/// The client side of the standard scenarios, in this order:
/// Stops the analyser, saves what it printed into `dir`, checks that every session line is
/// counted in the summary, and returns the output and the sessions without the probes.
fn finish(what: &str, t0: Instant, an: Analyser, dir: &TempDir) -> (Output, Vec<Value>) {
    let out = an.stop_unchecked();
    out.save(&dir.join("sessions.jsonl"));
    out.assert_clean(what);
    let all = out.sessions.len() as u64;
    assert_eq!(
        out.summary_sessions(),
        Some(all),
        "{what}: summary.sessions differs from the number of session lines printed"
    );
    let sessions = without_probe(out.sessions.clone());
    // A burst's sessions are too many to list.
    let listing = if sessions.len() <= 100 {
        describe_all(&sessions)
    } else {
        String::new()
    };
    eprintln!(
        "[live] {what}: {} sessions ({} without probes), {:.1} s\n{listing}",
        all,
        sessions.len(),
        t0.elapsed().as_secs_f64(),
    );
    (out, sessions)
}

fn no_sample_loss(what: &str, sessions: &[Value]) {
    let bad: Vec<&Value> = sessions
        .iter()
        .filter(|s| s_status(s) == "SampleLoss")
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} SampleLoss sessions, e.g.\n{}",
        bad.len(),
        describe_all(
            &bad.iter()
                .take(10)
                .map(|v| (*v).clone())
                .collect::<Vec<_>>()
        )
    );
}

/// unbound -> analyser over TCP. unbound logs FQ/FR with fresh DNS ids; SERVFAIL and REFUSED are
/// retried 5 times (outbound-msg-retry); the silent upstream gets several retries and the client
/// never gets an answer (no CR).
#[test]
fn unbound_tcp_sessions() {
    let t0 = Instant::now();
    let dir = TempDir::new("unbound");
    let silent = SilentUpstream::start();
    let nsd = start_nsd(&dir);
    let (an, mut ub) = behind_tcp_analyser(&dir, &nsd, &silent);

    run_standard_queries(&mut ub.server, ub.port, "SERVFAIL");
    let attempts = unbound_silent_query(ub.port, &silent);
    wait_for_unbound_scenarios(&an, attempts);

    ub.server.stop();
    let (_, sessions) = finish("unbound live", t0, an, &dir);
    let expected = unbound_expected(nsd.port, silent.port, attempts);
    assert_sessions("unbound live", &sessions, &expected);
}

/// The analyser listening on TCP, then unbound forwarding to `nsd` (silent.test to `silent`),
/// connected to it.
fn behind_tcp_analyser(
    dir: &TempDir,
    nsd: &Upstream,
    silent: &SilentUpstream,
) -> (Analyser, Forwarder) {
    let an = Analyser::serve_tcp(&[]);
    let mut ub = start_unbound(dir, nsd.port, silent.port, an.port());
    wait_stream_flowing(&an, &mut ub);
    (an, ub)
}

/// The analyser listening on a unix socket (with a 20 s session timeout: BIND and Knot Resolver
/// answer a silent upstream late), then the forwarder `start` makes, connected to it. The socket
/// must exist first: kresd disables dnstap for good if it does not.
fn behind_unix_analyser(
    dir: &TempDir,
    start: impl FnOnce(&Path) -> Forwarder,
) -> (Analyser, Forwarder) {
    let sock = dir.join("tap.sock");
    let an = Analyser::serve_unix(&sock, &["--session-timeout", "20"]);
    let mut fwd = start(&sock);
    wait_stream_flowing(&an, &mut fwd);
    (an, fwd)
}

/// BIND named -> analyser over a unix socket (named has no TCP output). named logs the upstream
/// leg as RESOLVER_QUERY/RESPONSE with fresh ids, writes CR before RR, and answers the silent
/// upstream with SERVFAIL after resolver-query-timeout (10 s, its minimum).
#[test]
fn named_unix_sessions() {
    let t0 = Instant::now();
    let dir = TempDir::new("named");
    let silent = SilentUpstream::start();
    let nsd = start_nsd(&dir);
    // named answers the silent query after 10 s: its session stays open long enough
    let (an, mut nm) =
        behind_unix_analyser(&dir, |sock| start_named(&dir, nsd.port, silent.port, sock));

    run_standard_queries(&mut nm.server, nm.port, "SERVFAIL");
    let a = dig(nm.port, "x.silent.test", "A", false, 20);
    assert_eq!(
        a.rcode.as_deref(),
        Some("SERVFAIL"),
        "named x.silent.test: {}",
        a.output
    );
    let attempts = silent.count();
    assert!(
        attempts >= 2,
        "named sent {attempts} queries to the silent upstream"
    );
    // libfstrm flushes about once a second; named flushes on STOP anyway
    wait_for_sessions_besides_probes(&an, 7, "named live");

    nm.server.stop();
    let (_, sessions) = finish("named live", t0, an, &dir);
    let up = format!("127.0.0.1:{}", nsd.port);
    let res = UpKind::Resolver;
    let expected = vec![
        Expect::new("www.example.test", "Succeeded", 15)
            .rcode("NOERROR")
            .attempts(res, 1, Some("NOERROR"))
            .addr(&up),
        Expect::new("www.example.test", "Succeeded", 3).rcode("NOERROR"),
        Expect::new("nx.example.test", "Succeeded", 15)
            .rcode("NXDOMAIN")
            .attempts(res, 1, Some("NXDOMAIN"))
            .addr(&up),
        Expect::new("x.servfail.test", "Failed", 15)
            .rcode("SERVFAIL")
            .attempts(res, 1, Some("SERVFAIL"))
            .addr(&up),
        Expect::new("x.refused.test", "Failed", 15)
            .rcode("SERVFAIL")
            .attempts(res, 1, Some("REFUSED"))
            .addr(&up),
        Expect::new("txt.example.test", "Succeeded", 15)
            .qtype("TXT")
            .tcp()
            .rcode("NOERROR")
            .attempts(res, 1, Some("NOERROR"))
            .addr(&up),
        Expect::new("x.silent.test", "Failed", 7)
            .rcode("SERVFAIL")
            .attempts(res, attempts, None)
            .addr(format!("127.0.0.1:{}", silent.port))
            .latency(9000.0, 13000.0),
    ];
    let expected: Vec<Expect> = expected
        .into_iter()
        .map(|e| e.ident("live-named", "BIND 9."))
        .collect();
    assert_sessions("named live", &sessions, &expected);
}

/// Knot Resolver -> analyser over a unix socket. kresd logs only CQ and CR: every session is
/// bitmap 3 (or 1); an upstream REFUSED becomes SERVFAIL; the silent upstream gives SERVFAIL
/// after a few seconds.
#[test]
fn kresd_unix_sessions() {
    let t0 = Instant::now();
    let dir = TempDir::new("kresd");
    let silent = SilentUpstream::start();
    let nsd = start_nsd(&dir);
    // kresd answers the silent query after 2-16 s: its session stays open long enough
    let (an, mut kr) =
        behind_unix_analyser(&dir, |sock| start_kresd(&dir, nsd.port, silent.port, sock));

    run_standard_queries(&mut kr.server, kr.port, "SERVFAIL");
    let a = dig(kr.port, "x.silent.test", "A", false, 20);
    assert_eq!(
        a.rcode.as_deref(),
        Some("SERVFAIL"),
        "kresd x.silent.test: {}",
        a.output
    );
    let answered_after = a.elapsed.as_secs_f64() * 1000.0;
    wait_for_sessions_besides_probes(&an, 7, "kresd live");

    kr.server.stop();
    let (_, sessions) = finish("kresd live", t0, an, &dir);
    let expected = vec![
        Expect::new("www.example.test", "Succeeded", 3).rcode("NOERROR"),
        Expect::new("www.example.test", "Succeeded", 3).rcode("NOERROR"),
        Expect::new("nx.example.test", "Succeeded", 3).rcode("NXDOMAIN"),
        Expect::new("x.servfail.test", "Failed", 3).rcode("SERVFAIL"),
        Expect::new("x.refused.test", "Failed", 3).rcode("SERVFAIL"),
        Expect::new("txt.example.test", "Succeeded", 3)
            .qtype("TXT")
            .tcp()
            .rcode("NOERROR"),
        Expect::new("x.silent.test", "Failed", 3)
            .rcode("SERVFAIL")
            .latency((answered_after - 1000.0).max(500.0), answered_after + 100.0),
    ];
    let expected: Vec<Expect> = expected
        .into_iter()
        .map(|e| e.ident("live-kresd", "knot-resolver "))
        .collect();
    assert_sessions("kresd live", &sessions, &expected);
}

/// dnsdist -> analyser over TCP. dnsdist logs CQ (DnstapLogAction) and CR (backend answers and
/// cache hits); it passes upstream rcodes through (REFUSED stays REFUSED) and drops a query whose
/// backend is silent (CQ only, bitmap 1).
#[test]
fn dnsdist_tcp_sessions() {
    let t0 = Instant::now();
    let dir = TempDir::new("dnsdist");
    let silent = SilentUpstream::start();
    let nsd = start_nsd(&dir);
    let an = Analyser::serve_tcp(
        // The silent query's session (CQ only) must time out while dnsdist is still connected:
        // dnsdist closes without STOP, and a session still open at that moment cannot be told
        // from one whose CR was lost. One shard, so that the next query's time expires it.
        &["--session-timeout", "3", "--shards", "1"],
    );
    let mut dd = start_dnsdist(&dir, nsd.port, silent.port, an.port());
    wait_stream_flowing(&an, &mut dd);

    run_standard_queries(&mut dd.server, dd.port, "REFUSED");
    let a = dig(dd.port, "x.silent.test", "A", false, 3);
    assert_eq!(
        a.rcode, None,
        "dnsdist answered x.silent.test: {}",
        a.output
    );
    assert!(
        silent.count() >= 1,
        "dnsdist did not forward x.silent.test to the silent backend"
    );
    // dnsdist had the silent query (its CQ's time) before it forwarded it, so before now: a
    // bound that holds however late dig or dnsdist ran on a loaded machine.
    let forwarded = Instant::now();
    // One more (probe) query moves dnsdist's clock past the silent session's 3 s timeout, so
    // the analyser emits it as timed out before dnsdist disconnects: its time must be well past
    // the silent query's (a clock to pass, not a wait for something to happen).
    if let Some(rest) = Duration::from_millis(3500).checked_sub(forwarded.elapsed()) {
        thread::sleep(rest);
    }
    let probe = dig(dd.port, PROBE, "A", false, 3);
    assert_eq!(
        probe.rcode.as_deref(),
        Some("NOERROR"),
        "dnsdist probe: {}",
        probe.output
    );
    // dnsdist writes every ~2 s and loses what it has not written when it stops.
    wait_for_sessions_besides_probes(&an, 7, "dnsdist live");

    dd.server.stop();
    let (_, sessions) = finish("dnsdist live", t0, an, &dir);
    let expected = vec![
        Expect::new("www.example.test", "Succeeded", 3).rcode("NOERROR"),
        // 2nd one: a packet-cache hit, logged by addCacheHitResponseAction
        Expect::new("www.example.test", "Succeeded", 3).rcode("NOERROR"),
        Expect::new("nx.example.test", "Succeeded", 3).rcode("NXDOMAIN"),
        Expect::new("x.servfail.test", "Failed", 3).rcode("SERVFAIL"),
        Expect::new("x.refused.test", "Failed", 3).rcode("REFUSED"),
        Expect::new("txt.example.test", "Succeeded", 3)
            .qtype("TXT")
            .tcp()
            .rcode("NOERROR"),
        Expect::new("x.silent.test", "Failed", 1),
    ];
    let expected: Vec<Expect> = expected
        .into_iter()
        .map(|e| e.ident("live-dnsdist", "dnsdist 1."))
        .collect();
    assert_sessions("dnsdist live", &sessions, &expected);
}

/// 12,000+ queries through unbound at a bounded 2000 q/s: exactly one session per query sent,
/// no SampleLoss, and the upstream leg exactly where the cache missed.
#[test]
fn unbound_burst_one_session_per_query() {
    const UNIQUE: usize = 3000; // cache misses: u<i>.w.example.test (wildcard, NOERROR)
    const TOTAL: usize = 12_000;
    let t0 = Instant::now();
    let dir = TempDir::new("burst");
    let silent = SilentUpstream::start();
    let nsd = start_nsd(&dir);
    let (an, mut ub) = behind_tcp_analyser(&dir, &nsd, &silent);

    // Small name list, warmed one query at a time so that each name misses exactly once.
    let mut small: Vec<String> = (1..=20).map(|i| format!("h{i}.example.test A")).collect();
    small.push("www.example.test A".into());
    small.push("nx.example.test A".into());
    small.push("txt.example.test TXT".into());
    let warm_file = dir.join("warm.txt");
    fs::write(&warm_file, small.join("\n") + "\n").unwrap();
    let warm = dnsperf(
        ub.port,
        &warm_file,
        &["-n", "1", "-q", "1", "-t", "5", "-l", "20"],
    );
    assert_eq!(warm.sent, small.len() as u64, "warm-up:\n{}", warm.output);

    // Burst: every 4th query a new name (upstream), the rest from the warm list (cache hits).
    let mut lines = Vec::with_capacity(TOTAL);
    for i in 0..TOTAL {
        if i % 4 == 0 {
            lines.push(format!("u{}.w.example.test A", i / 4));
        } else {
            lines.push(small[i % small.len()].clone());
        }
    }
    let burst_file = dir.join("burst.txt");
    fs::write(&burst_file, lines.join("\n") + "\n").unwrap();
    let t_burst = Instant::now();
    let burst = dnsperf(
        ub.port,
        &burst_file,
        &[
            "-n", "1", "-Q", "2000", "-c", "4", "-q", "500", "-t", "5", "-l", "30",
        ],
    );
    eprintln!(
        "[live] burst: sent {} completed {} lost {} in {:.1} s, rcodes {:?}",
        burst.sent,
        burst.completed,
        burst.lost,
        t_burst.elapsed().as_secs_f64(),
        burst.rcodes
    );
    assert_eq!(
        burst.sent, TOTAL as u64,
        "dnsperf did not send the whole file:\n{}",
        burst.output
    );
    assert_eq!(
        burst.lost, 0,
        "unbound did not answer every query:\n{}",
        burst.output
    );
    assert_eq!(silent.count(), 0);
    // unbound drops what is still queued for dnstap when it stops: let the tail drain first
    wait_for_sessions_besides_probes(&an, (warm.sent + burst.sent) as usize, "unbound burst");

    ub.server.stop();
    let (out, sessions) = finish("unbound burst", t0, an, &dir);
    let queries = warm.sent + burst.sent;
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_bitmap: BTreeMap<u64, usize> = BTreeMap::new();
    for s in &sessions {
        *by_status.entry(s_status(s).to_string()).or_default() += 1;
        *by_bitmap.entry(s_bitmap(s)).or_default() += 1;
    }
    eprintln!(
        "[live] burst: {queries} queries, {} sessions, status {by_status:?}, bitmap {by_bitmap:?}, \
         summary {:?}",
        sessions.len(),
        out.summary
    );
    no_sample_loss("unbound burst", &sessions);
    assert_eq!(
        sessions.len() as u64,
        queries,
        "unbound burst: {} sessions for {queries} client queries (status {by_status:?}, bitmap \
         {by_bitmap:?})",
        sessions.len()
    );
    let misses = small.len() + UNIQUE;
    assert_eq!(
        by_bitmap.get(&15).copied().unwrap_or(0),
        misses,
        "unbound burst: sessions with an upstream leg (bitmap 15) should be the {misses} cache \
         misses; bitmaps {by_bitmap:?}"
    );
    assert_eq!(
        by_bitmap.get(&3).copied().unwrap_or(0) as u64,
        queries - misses as u64,
        "unbound burst: cache hits (bitmap 3); bitmaps {by_bitmap:?}"
    );
    // the Status follows the rcode: NXDOMAIN and NOERROR are both Succeeded
    assert_eq!(
        by_status.get("Succeeded").copied().unwrap_or(0) as u64,
        queries,
        "unbound burst: status {by_status:?}"
    );
    // One answered attempt per miss. Another one is unbound sending the query again when the
    // answer is later than its timeout (infra-cache-min-rtt, 1 s in tests/live/unbound.conf):
    // on a very loaded machine that can happen, and the analyser rightly shows it as timed out.
    let mut resent = 0;
    for s in sessions.iter().filter(|s| s_bitmap(s) == 15) {
        let attempts = s_upstreams(s);
        let answered = attempts.iter().filter(|a| a["timeout"] != true).count();
        assert_eq!(
            answered,
            1,
            "one answered attempt per miss: {}",
            describe(s)
        );
        resent += attempts.len() - answered;
    }
    eprintln!("[live] unbound burst: {resent} attempts sent again after a late answer");
    eprintln!("[live] unbound burst: {:.1} s", t0.elapsed().as_secs_f64());
}
