//! Every capture of the four other servers (tests/fixtures/{unbound,named,kresd,dnsdist})
//! through `dnstap-analyser read FILE --format json`, with the default options, must give the
//! sessions a person expects from the scenario. The expectations and their reasons are the
//! tables in docs/senders.md; keep both in step.
//!
//! Upstream addresses in the captures: 127.0.0.1:15353 = nsd, :15354 = silent (blackholed),
//! :15355 = closed port (ICMP port unreachable).

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use support::*;

const NSD: &str = "127.0.0.1:15353";
const SILENT: &str = "127.0.0.1:15354";
const CLOSED: &str = "127.0.0.1:15355";

/// Quick answers (everything except the timeouts) take well under 100 ms.
const QUICK: (f64, f64) = (0.0, 100.0);

fn capture(server: &str, scenario: &str) -> PathBuf {
    fixture(server, &format!("{scenario}.fstrm"))
}

/// Facts from the `.txt` table next to a capture: data frame count and the CQ client addresses.
struct Table {
    frames: u64,
    clients: BTreeSet<String>,
}

fn table(server: &str, scenario: &str) -> Table {
    let p = fixtures_dir().join(server).join(format!("{scenario}.txt"));
    let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    let frames = text
        .lines()
        .find_map(|l| l.split("data frames: ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}: no `data frames:` header", p.display()));
    let clients = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            (c.len() > 5 && c[1] == "CQ").then(|| c[5].to_string())
        })
        .collect();
    Table { frames, clients }
}

/// Runs `read` on one capture and checks the sessions, the summary and the client addresses.
fn check(
    server: &str,
    scenario: &str,
    identity: &'static str,
    version: &'static str,
    expected: Vec<Expect>,
) {
    let what = format!("{server}/{scenario}.fstrm");
    let out = read(&[capture(server, scenario)], &[]);
    let expected: Vec<Expect> = expected
        .into_iter()
        .map(|e| e.ident(identity, version))
        .collect();
    assert_sessions(&what, &out.sessions, &expected);

    let t = table(server, scenario);
    assert_eq!(
        out.summary_messages(),
        Some(t.frames),
        "{what}: summary.messages should count every data frame of the capture; stderr:\n{}",
        out.stderr
    );
    assert_eq!(
        out.summary_sessions(),
        Some(expected.len() as u64),
        "{what}: summary.sessions; stderr:\n{}",
        out.stderr
    );
    let mut seen = BTreeSet::new();
    for s in &out.sessions {
        let client = s
            .get("client")
            .and_then(|c| c.as_str())
            .unwrap_or("")
            .to_string();
        assert!(
            t.clients.contains(&client),
            "{what}: client {client:?} is not one of the capture's CQ clients {:?}: {}",
            t.clients,
            describe(s)
        );
        assert!(
            seen.insert(client.clone()),
            "{what}: two sessions for client {client}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// unbound 1.17 (TCP): CQ FQ FR CR; FQ ids are fresh; SERVFAIL/REFUSED retried 5x; a silent or
// closed upstream gets 9 FQ and the client never gets a CR.
// ---------------------------------------------------------------------------------------------

fn unbound(scenario: &str, expected: Vec<Expect>) {
    check(
        "unbound",
        scenario,
        "rig-unbound",
        "unbound 1.17.1",
        expected,
    );
}
const FWD: UpKind = UpKind::Forwarder;

#[test]
fn unbound_a_noerror() {
    unbound(
        "a_noerror",
        vec![Expect::new("www.example.test", "Succeeded", 15)
            .rcode("NOERROR")
            .attempts(FWD, 1, Some("NOERROR"))
            .addr(NSD)
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn unbound_b_cachehit() {
    unbound(
        "b_cachehit",
        vec![
            Expect::new("www.example.test", "Succeeded", 15)
                .rcode("NOERROR")
                .attempts(FWD, 1, Some("NOERROR"))
                .addr(NSD)
                .latency(QUICK.0, QUICK.1),
            Expect::new("www.example.test", "Succeeded", 3)
                .rcode("NOERROR")
                .latency(QUICK.0, QUICK.1),
        ],
    );
}

#[test]
fn unbound_c_nxdomain() {
    unbound(
        "c_nxdomain",
        vec![Expect::new("nx.example.test", "Succeeded", 15)
            .rcode("NXDOMAIN")
            .attempts(FWD, 1, Some("NXDOMAIN"))
            .addr(NSD)
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn unbound_d_servfail() {
    unbound(
        "d_servfail",
        vec![Expect::new("x.servfail.test", "Failed", 15)
            .rcode("SERVFAIL")
            .attempts(FWD, 5, Some("SERVFAIL"))
            .addr(NSD)
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn unbound_e_refused() {
    unbound(
        "e_refused",
        vec![Expect::new("x.refused.test", "Failed", 15)
            .rcode("SERVFAIL")
            .attempts(FWD, 5, Some("REFUSED"))
            .addr(NSD)
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn unbound_f_timeout() {
    unbound(
        "f_timeout",
        vec![Expect::new("x.silent.test", "Failed", 5)
            .attempts(FWD, 9, None)
            .addr(SILENT)],
    );
}

#[test]
fn unbound_h_closed() {
    unbound(
        "h_closed",
        vec![Expect::new("x.closed.test", "Failed", 5)
            .attempts(FWD, 9, None)
            .addr(CLOSED)],
    );
}

#[test]
fn unbound_i_tcp() {
    unbound(
        "i_tcp",
        vec![Expect::new("txt.example.test", "Succeeded", 15)
            .qtype("TXT")
            .tcp()
            .rcode("NOERROR")
            .attempts(FWD, 1, Some("NOERROR"))
            .addr(NSD)
            .latency(QUICK.0, QUICK.1)],
    );
}

// ---------------------------------------------------------------------------------------------
// BIND named 9.18 (unix): CQ RQ CR RR (CR before RR), RQ ids fresh, ms-quantised timestamps;
// RQ/RR are the upstream leg (bits 4/8) and keep their RESOLVER_* type in `messages`.
// ---------------------------------------------------------------------------------------------

fn named(scenario: &str, expected: Vec<Expect>) {
    check(
        "named",
        scenario,
        "rig-named",
        "BIND 9.18.49-1~deb12u3-Debian",
        expected,
    );
}
const RES: UpKind = UpKind::Resolver;

#[test]
fn named_a_noerror() {
    named(
        "a_noerror",
        vec![Expect::new("www.example.test", "Succeeded", 15)
            .rcode("NOERROR")
            .attempts(RES, 1, Some("NOERROR"))
            .addr(NSD)
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn named_b_cachehit() {
    named(
        "b_cachehit",
        vec![
            Expect::new("www.example.test", "Succeeded", 15)
                .rcode("NOERROR")
                .attempts(RES, 1, Some("NOERROR"))
                .addr(NSD)
                .latency(QUICK.0, QUICK.1),
            Expect::new("www.example.test", "Succeeded", 3)
                .rcode("NOERROR")
                .latency(QUICK.0, QUICK.1),
        ],
    );
}

#[test]
fn named_c_nxdomain() {
    named(
        "c_nxdomain",
        vec![Expect::new("nx.example.test", "Succeeded", 15)
            .rcode("NXDOMAIN")
            .attempts(RES, 1, Some("NXDOMAIN"))
            .addr(NSD)
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn named_d_servfail() {
    named(
        "d_servfail",
        vec![Expect::new("x.servfail.test", "Failed", 15)
            .rcode("SERVFAIL")
            .attempts(RES, 1, Some("SERVFAIL"))
            .addr(NSD)
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn named_e_refused() {
    named(
        "e_refused",
        vec![Expect::new("x.refused.test", "Failed", 15)
            .rcode("SERVFAIL")
            .attempts(RES, 1, Some("REFUSED"))
            .addr(NSD)
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn named_f_timeout() {
    // 6 unanswered RQ, then CR SERVFAIL 10.004 s after the CQ: one session, not a timed-out
    // session plus an orphan CR.
    named(
        "f_timeout",
        vec![Expect::new("x.silent.test", "Failed", 7)
            .rcode("SERVFAIL")
            .attempts(RES, 6, None)
            .addr(SILENT)
            .latency(9990.0, 10020.0)],
    );
}

#[test]
fn named_h_closed() {
    named(
        "h_closed",
        vec![Expect::new("x.closed.test", "Failed", 7)
            .rcode("SERVFAIL")
            .attempts(RES, 1, None)
            .addr(CLOSED)
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn named_i_tcp() {
    named(
        "i_tcp",
        vec![Expect::new("txt.example.test", "Succeeded", 15)
            .qtype("TXT")
            .tcp()
            .rcode("NOERROR")
            .attempts(RES, 1, Some("NOERROR"))
            .addr(NSD)
            .latency(QUICK.0, QUICK.1)],
    );
}

// ---------------------------------------------------------------------------------------------
// Knot Resolver 5.6 (unix): CQ and CR only. Bitmap 3 is all there is; REFUSED upstream and
// unreachable upstreams become SERVFAIL, late (4 s, 16 s).
// ---------------------------------------------------------------------------------------------

fn kresd(scenario: &str, expected: Vec<Expect>) {
    check(
        "kresd",
        scenario,
        "rig-kresd",
        "knot-resolver 5.6.0",
        expected,
    );
}

#[test]
fn kresd_a_noerror() {
    kresd(
        "a_noerror",
        vec![Expect::new("www.example.test", "Succeeded", 3)
            .rcode("NOERROR")
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn kresd_b_cachehit() {
    kresd(
        "b_cachehit",
        vec![
            Expect::new("www.example.test", "Succeeded", 3)
                .rcode("NOERROR")
                .latency(QUICK.0, QUICK.1),
            Expect::new("www.example.test", "Succeeded", 3)
                .rcode("NOERROR")
                .latency(QUICK.0, QUICK.1),
        ],
    );
}

#[test]
fn kresd_c_nxdomain() {
    kresd(
        "c_nxdomain",
        vec![Expect::new("nx.example.test", "Succeeded", 3)
            .rcode("NXDOMAIN")
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn kresd_d_servfail() {
    kresd(
        "d_servfail",
        vec![Expect::new("x.servfail.test", "Failed", 3)
            .rcode("SERVFAIL")
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn kresd_e_refused() {
    kresd(
        "e_refused",
        vec![Expect::new("x.refused.test", "Failed", 3)
            .rcode("SERVFAIL")
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn kresd_f_timeout() {
    // CR SERVFAIL 16.007 s after the CQ: still one session.
    kresd(
        "f_timeout",
        vec![Expect::new("x.silent.test", "Failed", 3)
            .rcode("SERVFAIL")
            .latency(15990.0, 16020.0)],
    );
}

#[test]
fn kresd_h_closed() {
    kresd(
        "h_closed",
        vec![Expect::new("x.closed.test", "Failed", 3)
            .rcode("SERVFAIL")
            .latency(3990.0, 4020.0)],
    );
}

#[test]
fn kresd_i_tcp() {
    kresd(
        "i_tcp",
        vec![Expect::new("txt.example.test", "Succeeded", 3)
            .qtype("TXT")
            .tcp()
            .rcode("NOERROR")
            .latency(QUICK.0, QUICK.1)],
    );
}

// ---------------------------------------------------------------------------------------------
// dnsdist 1.7 (TCP): CQ and CR only (CR.query_time == CQ.query_time); upstream rcode passed
// through; a silent/closed backend means CQ only (the client gets nothing).
// ---------------------------------------------------------------------------------------------

fn dnsdist(scenario: &str, expected: Vec<Expect>) {
    check(
        "dnsdist",
        scenario,
        "rig-dnsdist",
        "dnsdist 1.7.3",
        expected,
    );
}

#[test]
fn dnsdist_a_noerror() {
    dnsdist(
        "a_noerror",
        vec![Expect::new("www.example.test", "Succeeded", 3)
            .rcode("NOERROR")
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn dnsdist_b_cachehit() {
    dnsdist(
        "b_cachehit",
        vec![
            Expect::new("www.example.test", "Succeeded", 3)
                .rcode("NOERROR")
                .latency(QUICK.0, QUICK.1),
            Expect::new("www.example.test", "Succeeded", 3)
                .rcode("NOERROR")
                .latency(QUICK.0, QUICK.1),
        ],
    );
}

#[test]
fn dnsdist_c_nxdomain() {
    dnsdist(
        "c_nxdomain",
        vec![Expect::new("nx.example.test", "Succeeded", 3)
            .rcode("NXDOMAIN")
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn dnsdist_d_servfail() {
    dnsdist(
        "d_servfail",
        vec![Expect::new("x.servfail.test", "Failed", 3)
            .rcode("SERVFAIL")
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn dnsdist_e_refused() {
    dnsdist(
        "e_refused",
        vec![Expect::new("x.refused.test", "Failed", 3)
            .rcode("REFUSED")
            .latency(QUICK.0, QUICK.1)],
    );
}

#[test]
fn dnsdist_f_timeout() {
    dnsdist("f_timeout", vec![Expect::new("x.silent.test", "Failed", 1)]);
}

#[test]
fn dnsdist_h_closed() {
    dnsdist("h_closed", vec![Expect::new("x.closed.test", "Failed", 1)]);
}

#[test]
fn dnsdist_i_tcp() {
    dnsdist(
        "i_tcp",
        vec![Expect::new("txt.example.test", "Succeeded", 3)
            .qtype("TXT")
            .tcp()
            .rcode("NOERROR")
            .latency(QUICK.0, QUICK.1)],
    );
}

/// Every capture in the four folders has a test above (a new capture must get expectations).
#[test]
fn every_capture_has_expectations() {
    let covered = [
        "a_noerror",
        "b_cachehit",
        "c_nxdomain",
        "d_servfail",
        "e_refused",
        "f_timeout",
        "h_closed",
        "i_tcp",
    ];
    for server in ["unbound", "named", "kresd", "dnsdist"] {
        let dir = fixtures_dir().join(server);
        let mut found = Vec::new();
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "fstrm") {
                found.push(p.file_stem().unwrap().to_string_lossy().into_owned());
            }
        }
        found.sort();
        assert!(!found.is_empty(), "no captures in {}", dir.display());
        for f in &found {
            assert!(
                covered.contains(&f.as_str()),
                "{server}/{f}.fstrm has no expectations in tests/other_senders.rs / docs/senders.md"
            );
        }
        for c in covered {
            assert!(
                found.iter().any(|f| f == c),
                "{server}/{c}.fstrm is missing"
            );
        }
    }
}
