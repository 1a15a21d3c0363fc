//! Every real CoreDNS capture, read offline, gives exactly the sessions its README lists.

mod support;
use support::{coredns_fixture, read};

fn sessions(file: &str) -> Vec<(String, u64, String, String, usize)> {
    read(&[coredns_fixture(file)], &[])
        .sessions
        .iter()
        .map(|s| {
            (
                s["status"].as_str().unwrap().to_string(),
                s["bitmap"].as_u64().unwrap(),
                s["qname"].as_str().unwrap_or("").to_string(),
                s["rcode"].as_str().unwrap_or("-").to_string(),
                s["upstreams"].as_array().unwrap().len(),
            )
        })
        .collect()
}

fn expect(file: &str, want: &[(&str, u64, &str, &str, usize)]) {
    let mut got = sessions(file);
    got.sort();
    let mut want: Vec<_> = want
        .iter()
        .map(|(s, b, q, r, u)| (s.to_string(), *b, q.to_string(), r.to_string(), *u))
        .collect();
    want.sort();
    assert_eq!(got, want, "{file}");
}

#[test]
fn a_hosts_is_answered_locally() {
    expect(
        "a_hosts.fstrm",
        &[("Succeeded", 3, "internal.test.", "NOERROR", 0)],
    );
}

#[test]
fn b_forward_is_forwarded_and_answered() {
    expect(
        "b_forward.fstrm",
        &[("Succeeded", 15, "www.example.test.", "NOERROR", 1)],
    );
}

#[test]
fn c_cache_hit_is_a_miss_then_a_hit() {
    expect(
        "c_cache_hit.fstrm",
        &[
            ("Succeeded", 15, "www.example.test.", "NOERROR", 1),
            ("Succeeded", 3, "www.example.test.", "NOERROR", 0),
        ],
    );
}

#[test]
fn d_nxdomain_succeeds() {
    expect(
        "d_nxdomain.fstrm",
        &[("Succeeded", 15, "nope.example.test.", "NXDOMAIN", 1)],
    );
}

#[test]
fn e_servfail_and_f_refused_fail() {
    expect(
        "e_servfail.fstrm",
        &[("Failed", 15, "x.broken.test.", "SERVFAIL", 1)],
    );
    expect(
        "f_refused.fstrm",
        &[("Failed", 15, "x.other.test.", "REFUSED", 1)],
    );
}

#[test]
fn g_timeout_counts_each_upstream_attempt() {
    expect(
        "g_timeout.fstrm",
        &[
            ("Failed", 5, "www.example.test.", "-", 3),
            ("Failed", 5, "api.example.test.", "-", 1),
            ("Succeeded", 3, "internal.test.", "NOERROR", 0),
        ],
    );
    let out = read(&[coredns_fixture("g_timeout.fstrm")], &[]);
    let www = out
        .sessions
        .iter()
        .find(|s| s["qname"] == "www.example.test.")
        .unwrap();
    assert!(www["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .all(|u| u["timeout"] == true));
    assert_eq!(www["upstreams"][0]["address"], "127.0.0.1:15402");
    let diagnosis = www["diagnosis"].as_str().unwrap();
    assert!(
        diagnosis.contains("no answer after 3 attempts"),
        "{diagnosis}"
    );
}

#[test]
fn k_bind_tcp_joins_udp_and_tcp_clients() {
    expect(
        "k_bind_tcp.fstrm",
        &[
            ("Succeeded", 15, "www.example.test.", "NOERROR", 1),
            ("Succeeded", 15, "api.example.test.", "NOERROR", 1),
            ("Succeeded", 3, "internal.test.", "NOERROR", 0),
            ("Succeeded", 3, "api.example.test.", "NOERROR", 0),
        ],
    );
    let out = read(&[coredns_fixture("k_bind_tcp.fstrm")], &[]);
    let protocols: std::collections::BTreeSet<_> = out
        .sessions
        .iter()
        .map(|s| s["protocol"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(protocols.into_iter().collect::<Vec<_>>(), ["TCP", "UDP"]);
}

#[test]
fn h_burst_5k_gives_5000_sessions_without_loss() {
    for shards in ["1", "2", "4"] {
        let out = read(
            &[coredns_fixture("h_burst_5k.fstrm")],
            &["--shards", shards],
        );
        let counts = out.counts();
        let want: std::collections::BTreeMap<String, usize> = [
            ("Succeeded/3", 4363),
            ("Succeeded/15", 76),
            ("Failed/3", 275),
            ("Failed/15", 286),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
        assert_eq!(counts, want, "--shards {shards}");
        assert_eq!(out.summary["sessions"], 5000);
        assert_eq!(out.summary["messages"], 10724);
    }
}

#[test]
fn i_reconnect_reports_what_was_lost() {
    let files = [
        coredns_fixture("i_reconnect.part1.fstrm"),
        coredns_fixture("i_reconnect.part2.fstrm"),
    ];
    for shards in ["1", "2", "3"] {
        let out = read(&files, &["--shards", shards]);
        let counts = out.counts();
        let want: std::collections::BTreeMap<String, usize> = [
            ("Succeeded/3", 128),
            ("Succeeded/15", 90),
            ("SampleLoss/5", 1),
            // The NXDOMAIN whose CQ was lost in the reconnect: its CR arrived, so its outcome
            // is known and kept; what is missing is said beside it.
            ("Succeeded/14", 1),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
        assert_eq!(counts, want, "--shards {shards}");
        let orphan = out.sessions.iter().find(|s| s["bitmap"] == 14).unwrap();
        assert_eq!(orphan["rcode"], "NXDOMAIN");
        assert!(orphan.get("loss_reason").is_none(), "{orphan}");
        assert_eq!(
            orphan["incomplete"],
            serde_json::json!({"missing": ["CQ"], "cause": "client_query_missing"})
        );
        let cut = out.sessions.iter().find(|s| s["bitmap"] == 5).unwrap();
        assert_eq!(cut["loss_reason"], "sender_loss");
    }
}

/// CoreDNS's cache replays an upstream's SERVFAIL for 5 s. In the burst, each s0–s4.broken.test
/// SERVFAIL forwarded to the upstream is followed by local SERVFAILs for the same name (275 in
/// all): each is `cached_upstream_error`, naming the upstream, however the sessions are spread
/// over shards (the key includes the DNS id, so a replay and its origin rarely share one).
#[test]
fn cached_servfails_are_blamed_on_the_upstream_at_any_shard_count() {
    for shards in ["1", "4"] {
        let out = read(
            &[coredns_fixture("h_burst_5k.fstrm")],
            &["--shards", shards, "--log", "failed", "--messages", "none"],
        );
        let local: Vec<_> = out.sessions.iter().filter(|s| s["bitmap"] == 3).collect();
        assert_eq!(local.len(), 275, "--shards {shards}");
        for s in local {
            assert_eq!(s["rcode"], "SERVFAIL", "{s}");
            assert!(
                s["qname"].as_str().unwrap().ends_with(".broken.test."),
                "{s}"
            );
            assert_eq!(
                s["cause"], "cached_upstream_error",
                "--shards {shards}: {s}"
            );
            let d = s["diagnosis"].as_str().unwrap();
            assert!(
                d.contains("from its cache: upstream 127.0.0.1:15401 answered SERVFAIL"),
                "{d}"
            );
        }
    }
}

/// CoreDNS ≥ 1.11's `extra` (here the 1.14.7 dnstap plugin on 1.10.1, `Corefile.extra`): one
/// server block says `namespace=team-a;pod=web-1`, the other `client={remote}`. The workload
/// reaches the line; without `namespace=`/`pod=` only the raw `extra` does.
#[test]
fn the_workload_in_extra_reaches_the_line() {
    let out = read(&[coredns_fixture("j_extra.fstrm")], &["--messages", "none"]);
    assert_eq!(out.sessions.len(), 5);
    let team_a: Vec<_> = out
        .sessions
        .iter()
        .filter(|s| s["extra"] == "namespace=team-a;pod=web-1")
        .collect();
    assert_eq!(team_a.len(), 3);
    for s in team_a {
        assert_eq!(s["client_namespace"], "team-a", "{s}");
        assert_eq!(s["client_pod"], "web-1", "{s}");
    }
    let remote: Vec<_> = out
        .sessions
        .iter()
        .filter(|s| s["extra"] == "client=127.0.0.1")
        .collect();
    assert_eq!(remote.len(), 2);
    for s in remote {
        assert!(
            s["client_namespace"].is_null() && s["client_pod"].is_null(),
            "{s}"
        );
    }
    // A plugin's SERVFAIL (template) is written outside the tap: a lone CQ.
    let lone = out.sessions.iter().filter(|s| s["bitmap"] == 1).count();
    assert_eq!(lone, 2);
    // Captures without extra have no such fields.
    let plain = read(&[coredns_fixture("a_hosts.fstrm")], &[]);
    assert!(plain.sessions[0].get("extra").is_none());
}

/// `time` (the CQ's query_time, RFC 3339 UTC with nanoseconds) and `cause` (one of the metrics'
/// cause label values) on every line of the burst, Failed or not.
#[test]
fn every_line_has_its_time_and_cause() {
    let out = read(&[coredns_fixture("h_burst_5k.fstrm")], &[]);
    assert_eq!(out.sessions.len(), 5000);
    let causes: Vec<&str> = dnstap_analyser::diagnosis::Cause::ALL
        .iter()
        .map(|c| c.name())
        .collect();
    for s in &out.sessions {
        let time = s["time"].as_str().unwrap_or_else(|| panic!("no time: {s}"));
        assert_eq!(time.len(), "2026-11-25T17:16:02.500000000Z".len(), "{time}");
        assert!(time.ends_with('Z'), "{time}");
        let cq = &s["messages"][0];
        assert_eq!(cq["type"], "CLIENT_QUERY");
        assert_eq!(cq["query_time"], time);
        let cause = s["cause"]
            .as_str()
            .unwrap_or_else(|| panic!("no cause: {s}"));
        assert!(causes.contains(&cause), "{cause}");
    }
}

/// The exit summary names message types as the lines and the metrics do.
#[test]
fn the_summary_counts_forwarder_messages_by_their_dnstap_names() {
    let out = read(&[coredns_fixture("b_forward.fstrm")], &[]);
    let by_type = &out.summary["messages_by_type"];
    assert_eq!(by_type["FORWARDER_QUERY"], 1, "{by_type}");
    assert_eq!(by_type["FORWARDER_RESPONSE"], 1, "{by_type}");
    assert!(by_type.get("UPSTREAM_QUERY").is_none(), "{by_type}");
    let types: Vec<&str> = out.sessions[0]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["type"].as_str().unwrap())
        .collect();
    for t in by_type.as_object().unwrap().keys() {
        assert!(
            types.contains(&t.as_str()),
            "{t} not among the line's types {types:?}"
        );
    }
}

#[test]
fn every_line_carries_the_documented_fields() {
    let out = read(&[coredns_fixture("b_forward.fstrm")], &[]);
    let s = &out.sessions[0];
    for field in [
        "time",
        "status",
        "bitmap",
        "cause",
        "diagnosis",
        "identity",
        "client",
        "protocol",
        "qname",
        "qtype",
        "rcode",
        "latency_ms",
        "upstreams",
        "messages",
    ] {
        assert!(s.get(field).is_some(), "missing {field}: {s}");
    }
    assert_eq!(s["identity"], "vm");
    assert_eq!(s["client"], "127.0.0.1:60908");
    assert_eq!(s["qtype"], "A");
    assert!((s["latency_ms"].as_f64().unwrap() - 0.476).abs() < 0.001);
    let up = &s["upstreams"][0];
    assert_eq!(up["address"], "127.0.0.1:15401");
    assert_eq!(up["rcode"], "NOERROR");
    assert!((up["rtt_ms"].as_f64().unwrap() - 0.344).abs() < 0.001);
    let types: Vec<_> = s["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "CLIENT_QUERY",
            "FORWARDER_QUERY",
            "FORWARDER_RESPONSE",
            "CLIENT_RESPONSE"
        ]
    );
    // CoreDNS forwards the client's query byte for byte (the analyser stores it once).
    assert_eq!(s["messages"][1]["dns"], s["messages"][0]["dns"]);
    assert_eq!(s["messages"][1]["dns"]["id"], 34131);
    let fr = &s["messages"][2]["dns"];
    assert_eq!(fr["answer"][0]["rdata"], "192.0.2.10");
    assert_eq!(fr["answer"][0]["ttl"], 300);
    assert_eq!(s["messages"][0]["dns"]["edns"]["udp_size"], 1232);
    assert_eq!(
        s["messages"][0]["dns"]["edns"]["options"][0]["name"],
        "COOKIE"
    );
    assert_eq!(
        s["messages"][0]["query_time"],
        "2026-11-25T17:10:59.525087273Z"
    );
}

#[test]
fn log_filter_and_text_format() {
    let g = [coredns_fixture("g_timeout.fstrm")];
    let failed = read(&g, &["--log", "failed"]);
    assert_eq!(failed.sessions.len(), 2);
    assert!(failed.sessions.iter().all(|s| s["status"] == "Failed"));
    assert_eq!(
        failed.summary["sessions"], 3,
        "the summary counts every session"
    );
    let out = support::run_ok(
        std::process::Command::new(support::analyser_bin())
            .args(["read", "--format", "text"])
            .arg(&g[0]),
        std::time::Duration::from_secs(60),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    // Besides the sessions, the two lookups that were not answered (docs/lookups.md); both
    // kinds of line start with their time.
    let (sessions, lookups): (Vec<&str>, Vec<&str>) = text
        .lines()
        .partition(|l| l.split(' ').nth(2) != Some("Lookup:"));
    assert_eq!((sessions.len(), lookups.len()), (3, 2), "{text}");
    for line in lookups {
        assert!(line.starts_with("Time: 2026-"), "{line}");
    }
    for line in sessions {
        assert!(line.starts_with("Time: 2026-"), "{line}");
        assert!(
            line.contains(" Status: ") && line.contains(" Cause: "),
            "{line}"
        );
        assert!(
            line.contains(" BitMap: ") && line.contains(" Messages: ["),
            "{line}"
        );
    }
}
