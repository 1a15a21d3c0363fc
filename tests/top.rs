//! `/top` and `dnstap-analyser top` on real CoreDNS captures: a serving analyser fed by
//! `fstrm_replay` lists the failing qnames, clients and upstreams with the counts the same
//! captures give offline, and the dominant cause of each.

mod support;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;
use support::*;

const CAPTURES: [&str; 2] = ["g_timeout.fstrm", "e_servfail.fstrm"];

/// What the captures say when read offline: Failed sessions by qname, client IP and upstream
/// (each distinct upstream of a session once).
#[derive(Default, Debug, PartialEq)]
struct Expected {
    failed: u64,
    qnames: BTreeMap<String, u64>,
    clients: BTreeMap<String, u64>,
    upstreams: BTreeMap<String, u64>,
}

fn expected() -> Expected {
    let mut e = Expected::default();
    for capture in CAPTURES {
        let out = read(&[coredns_fixture(capture)], &[]);
        out.assert_clean(capture);
        for s in out.sessions.iter().filter(|s| s["status"] == "Failed") {
            e.failed += 1;
            *e.qnames
                .entry(s["qname"].as_str().unwrap().into())
                .or_default() += 1;
            let client: std::net::SocketAddr = s["client"].as_str().unwrap().parse().unwrap();
            *e.clients.entry(client.ip().to_string()).or_default() += 1;
            let mut ups: Vec<&str> = s["upstreams"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u["address"].as_str().unwrap())
                .collect();
            ups.sort_unstable();
            ups.dedup();
            for u in ups {
                *e.upstreams.entry(u.into()).or_default() += 1;
            }
        }
    }
    e
}

/// `rows` of a `/top` document as key → (failed, error, dominant cause).
fn rows(doc: &Value, list: &str, key: &str) -> BTreeMap<String, (u64, u64, String)> {
    doc[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {doc}"))
        .iter()
        .map(|r| {
            (
                r[key].as_str().unwrap().to_string(),
                (
                    r["failed"].as_u64().unwrap(),
                    r["error"].as_u64().unwrap(),
                    r["cause"].as_str().unwrap_or("-").to_string(),
                ),
            )
        })
        .collect()
}

fn counts(rows: &BTreeMap<String, (u64, u64, String)>) -> BTreeMap<String, u64> {
    rows.iter().map(|(k, v)| (k.clone(), v.0)).collect()
}

#[test]
fn top_lists_the_failing_qnames_clients_and_upstreams_of_a_live_stream() {
    let want = expected();
    // The captures have what this test is about.
    assert_eq!(want.failed, 3, "{want:?}");
    assert!(want.qnames.contains_key("www.example.test."));
    assert!(want.qnames.contains_key("x.broken.test."));

    let an = Analyser::serve_tcp(&[]);
    let url = format!("http://{}", an.metrics_addr());
    // Before any session: an empty document, not an error.
    let empty = dnstap_analyser::metrics::top_client::fetch(&url).expect("/top answers");
    assert_eq!(empty["failed"], 0, "{empty}");
    assert_eq!(empty["window_seconds"], 300.0);

    // One capture after the other: both come from the same CoreDNS identity.
    let mut printed = 0;
    for capture in CAPTURES {
        run_sender(&mut fstrm_replay_tcp(an.port(), &coredns_fixture(capture)));
        let want_lines = printed + read(&[coredns_fixture(capture)], &[]).sessions.len();
        assert!(
            an.wait_for_lines(want_lines, Duration::from_secs(60)),
            "sessions of {capture}: {:?}",
            an.sessions_so_far()
        );
        printed = want_lines;
    }

    // Shards publish every 100 ms: poll until the window holds every Failed session.
    let mut doc = Value::Null;
    let complete = poll_until(Duration::from_secs(60), || {
        doc = dnstap_analyser::metrics::top_client::fetch(&url).expect("/top answers");
        doc["failed"].as_u64() >= Some(want.failed)
    });
    assert!(complete, "/top after the replay: {doc}");
    assert_eq!(doc["failed"], want.failed, "{doc}");
    assert_eq!(doc["causes"]["upstream_timeout"], 2, "{doc}");
    assert_eq!(doc["causes"]["upstream_error"], 1, "{doc}");

    let qnames = rows(&doc, "qnames", "qname");
    assert_eq!(counts(&qnames), want.qnames, "{doc}");
    assert!(
        !qnames.contains_key("internal.test."),
        "succeeded names stay out"
    );
    assert!(qnames.values().all(|r| r.1 == 0), "exact below K: {doc}");
    assert_eq!(qnames["www.example.test."].2, "upstream_timeout");
    assert_eq!(qnames["api.example.test."].2, "upstream_timeout");
    assert_eq!(qnames["x.broken.test."].2, "upstream_error");

    let clients = rows(&doc, "clients", "client");
    assert_eq!(counts(&clients), want.clients, "{doc}");
    let upstreams = rows(&doc, "upstreams", "upstream");
    assert_eq!(counts(&upstreams), want.upstreams, "{doc}");
    assert_eq!(upstreams["127.0.0.1:15402"].2, "upstream_timeout");
    assert_eq!(upstreams["127.0.0.1:15401"].2, "upstream_error");

    // The same view as a table.
    let out = run_to_end(
        Command::new(analyser_bin()).args(["top", "--once", "--url", &url]),
        None,
        Duration::from_secs(60),
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "top --once failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !table.contains('\u{1b}'),
        "--once prints no escapes:\n{table}"
    );
    assert!(
        table.starts_with(&format!("{url}: 3 failed sessions in the last 300s")),
        "{table}"
    );
    let line = |key: &str| -> Vec<String> {
        table
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no row {key} in:\n{table}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    assert_eq!(line("www.example.test.")[1..3], ["1", "upstream_timeout"]);
    assert_eq!(line("x.broken.test.")[1..3], ["1", "upstream_error"]);
    assert_eq!(line("127.0.0.1:15402")[1..3], ["2", "upstream_timeout"]);
    assert!(!table.contains("internal.test."), "{table}");
    an.stop();
}

#[test]
fn top_without_an_analyser_fails_naming_the_url() {
    let port = alloc_port();
    let url = format!("http://127.0.0.1:{port}");
    let out = run_to_end(
        Command::new(analyser_bin()).args(["top", "--once", "--url", &url]),
        None,
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot fetch {url}/top")),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}
