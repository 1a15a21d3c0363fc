//! The lookup scenario of tests/live_lookups.rs: what the applications asked, through which C
//! library and resolv.conf, and the lookup each must give. The expectations are worked out from
//! the C libraries' documented behaviour, not from the analyser's output:
//!
//! - resolv.conf: `search default.svc.cluster.local svc.cluster.local cluster.local node.test`,
//!   `options ndots:5`. A name with fewer than 5 dots is tried with each search suffix in order,
//!   then as is (glibc `res_search`; musl `name_from_dns_search`). A trailing dot: as is only.
//! - glibc `getaddrinfo(AF_UNSPEC)` sends A and AAAA for each candidate from one fresh socket
//!   and goes on past NXDOMAIN, NODATA and SERVFAIL (`__res_context_search`: `got_nodata`,
//!   `got_servfail`); a candidate answers when either half has answer records.
//! - musl does the same walk but stops at a candidate whose answer is NODATA or SERVFAIL
//!   (`name_from_dns` returns EAI_NODATA / EAI_AGAIN, and only 0 continues the walk).
//! - `LOCALDOMAIN` replaces glibc's search list (resolver(5)).
//! - `options rotate` makes glibc start each query's server list at the next server.
//! - `RES_OPTIONS=ndots:2` lowers glibc's ndots: a name with 2 dots is asked as is first.
//! - A first candidate answered with a CNAME to the bare name (CoreDNS `autopath`'s shape) ends
//!   the walk: the answer has the address.
//! - glibc waits `timeout` (5 s) for a lost query, then sends both halves again from the same
//!   socket.

use serde_json::Value;

/// The CoreDNS identities of the two servers (127.0.0.1 and 127.0.0.2).
pub const IDENTITY_ONE: &str = "lookups-one";
pub const IDENTITY_TWO: &str = "lookups-two";

/// The search list of the pod the applications run in; `LOCALDOMAIN` for the second namespace.
pub const SEARCH: &str = "default.svc.cluster.local svc.cluster.local cluster.local node.test";
pub const SEARCH_KUBE_SYSTEM: &str =
    "kube-system.svc.cluster.local svc.cluster.local cluster.local node.test";

/// The analyser options the scenario is read with: the node domain as a given suffix, every
/// lookup printed.
pub const ANALYSER_ARGS: [&str; 4] = ["--search-suffix", "node.test", "--log-lookups", "all"];

/// One expected lookup line.
#[derive(Debug, Clone)]
pub struct ExpectLookup {
    pub case: &'static str,
    pub asked: String,
    pub candidates: Vec<String>,
    pub queries: u64,
    pub outcome: &'static str,
    pub answered_by: Option<String>,
    pub wasted: u64,
    pub namespace: Option<&'static str>,
    /// Both identities must be listed (the `rotate` case); else only the first.
    pub both_identities: bool,
    /// The dropped-query case: at least one retry and 4.5 s waited.
    pub waited: bool,
    /// The CNAME target of an autopath answer.
    pub autopath: Option<&'static str>,
}

/// The candidates glibc and musl try for `base` with search list `ns`: the search suffixes
/// in order, then the name as is; the first `n` of them.
fn walk(base: &str, ns: &str, n: usize) -> Vec<String> {
    let all = [
        format!("{base}.{ns}.svc.cluster.local."),
        format!("{base}.svc.cluster.local."),
        format!("{base}.cluster.local."),
        format!("{base}.node.test."),
        format!("{base}."),
    ];
    all[..n].to_vec()
}

/// A lookup that tried the first `n` candidates, two queries (A, AAAA) each.
fn expect(case: &'static str, base: &str, n: usize, outcome: &'static str) -> ExpectLookup {
    let candidates = walk(base, "default", n);
    ExpectLookup {
        case,
        asked: base.to_string(),
        answered_by: (outcome == "answered").then(|| candidates[n - 1].clone()),
        queries: 2 * n as u64,
        wasted: 2 * (n as u64 - 1),
        candidates,
        outcome,
        namespace: Some("default"),
        both_identities: false,
        waited: false,
        autopath: None,
    }
}

/// Every lookup of the scenario (tests/live_lookups.rs runs the clients in this order).
pub fn expected_lookups() -> Vec<ExpectLookup> {
    let mut v = vec![
        // nftables drops the second query (the AAAA): glibc resends both after 5 s.
        ExpectLookup {
            queries: 3,
            waited: true,
            ..expect("dropped query (glibc)", "slow", 1, "answered")
        },
        expect("first candidate (glibc)", "web", 1, "answered"),
        expect("last candidate (glibc)", "api.example.test", 5, "answered"),
        expect("nonexistent (glibc)", "nothere.example.test", 5, "nxdomain"),
        ExpectLookup {
            asked: "abs.example.test.".into(),
            candidates: vec!["abs.example.test.".into()],
            answered_by: Some("abs.example.test.".into()),
            namespace: None,
            ..expect("absolute name (glibc)", "abs.example.test", 1, "answered")
        },
    ];
    for i in 1..=5 {
        let name: &'static str = ["svc1", "svc2", "svc3", "svc4", "svc5"][i - 1];
        v.push(expect("five concurrent (glibc)", name, 2, "answered"));
    }
    let ks = walk("metrics", "kube-system", 2);
    v.push(ExpectLookup {
        answered_by: Some(ks[1].clone()),
        candidates: ks,
        namespace: Some("kube-system"),
        ..expect(
            "second namespace (glibc LOCALDOMAIN)",
            "metrics",
            2,
            "answered",
        )
    });
    v.push(expect("musl", "mapi.example.test", 5, "answered"));
    // NODATA at the first candidate: glibc goes on and the second answers; musl stops.
    v.push(expect("NODATA first (glibc)", "nodata", 2, "answered"));
    v.push(ExpectLookup {
        answered_by: None,
        wasted: 0,
        ..expect("NODATA first (musl)", "nodatam", 1, "nodata")
    });
    // ndots:2: two dots are enough to be asked as is first, and the name exists.
    v.push(ExpectLookup {
        asked: "ndots.example.test.".into(),
        candidates: vec!["ndots.example.test.".into()],
        answered_by: Some("ndots.example.test.".into()),
        namespace: None,
        ..expect(
            "ndots:2 (glibc RES_OPTIONS)",
            "ndots.example.test",
            1,
            "answered",
        )
    });
    v.push(ExpectLookup {
        autopath: Some("auto.example.test."),
        ..expect(
            "autopath's answer (glibc)",
            "auto.example.test",
            1,
            "answered",
        )
    });
    v.push(ExpectLookup {
        both_identities: true,
        ..expect(
            "two identities (glibc rotate)",
            "rot.example.test",
            5,
            "answered",
        )
    });
    v
}

/// Checks the lookup lines against [`expected_lookups`]: exactly one line per case with the
/// right facts, no other lookup, and one session line per query.
pub fn check_lookups(lookups: &[Value], sessions: &[Value], what: &str) {
    let expected = expected_lookups();
    let show = || {
        lookups
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    for e in &expected {
        let found: Vec<&Value> = lookups.iter().filter(|l| l["asked"] == e.asked).collect();
        assert_eq!(
            found.len(),
            1,
            "{what}: {}: want one lookup asked {:?}; lookups:\n{}",
            e.case,
            e.asked,
            show()
        );
        let l = found[0];
        let candidates: Vec<&str> = l["candidates"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no candidates in {l}"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let ctx = format!("{what}: {}: {l}", e.case);
        assert_eq!(candidates, e.candidates, "{ctx}");
        assert_eq!(l["queries"].as_u64(), Some(e.queries), "{ctx}");
        assert_eq!(l["outcome"], e.outcome, "{ctx}");
        assert_eq!(l["answered_by"].as_str(), e.answered_by.as_deref(), "{ctx}");
        assert_eq!(l["wasted_queries"].as_u64(), Some(e.wasted), "{ctx}");
        assert_eq!(l["namespace"].as_str(), e.namespace, "{ctx}");
        let identities: Vec<&str> = l["identities"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if e.both_identities {
            assert!(
                identities.contains(&IDENTITY_ONE) && identities.contains(&IDENTITY_TWO),
                "{ctx}: both identities"
            );
        } else {
            assert_eq!(identities, [IDENTITY_ONE], "{ctx}");
        }
        if e.waited {
            assert!(l["retries"].as_u64() >= Some(1), "{ctx}: retries");
            assert!(l["waited_ms"].as_f64() >= Some(4500.0), "{ctx}: waited_ms");
        } else {
            assert_eq!(l["retries"].as_u64(), Some(0), "{ctx}");
        }
        assert!(l["latency_ms"].as_f64().is_some(), "{ctx}: latency_ms");
        assert_eq!(l["autopath"].as_str(), e.autopath, "{ctx}");
    }
    assert_eq!(
        lookups.len(),
        expected.len(),
        "{what}: lookups other than the expected ones:\n{}",
        show()
    );
    // Session lines stay one per query, each naming its lookup; besides, the two lookups
    // CoreDNS's `template` made itself for the autopath-shaped CNAME (logged as client
    // queries with the client's socket and id, docs/senders.md).
    let queries: u64 = expected.iter().map(|e| e.queries).sum();
    let server_made = 2;
    assert_eq!(
        sessions.len() as u64,
        queries + server_made,
        "{what}: one session per query"
    );
    for s in sessions {
        assert_eq!(s["kind"], "session", "{what}: {s}");
        let id = &s["lookup"];
        assert!(
            lookups.iter().any(|l| &l["id"] == id),
            "{what}: session {} names lookup {id}, which is not printed",
            s["qname"]
        );
    }
}

/// The exit summary's `lookups` against [`expected_lookups`]: counts by outcome, wasted queries,
/// the one resolver timeout, latency quantiles per namespace, the names with most waste.
pub fn check_lookup_summary(summary: &Value, what: &str) {
    let l = &summary["lookups"];
    let expected = expected_lookups();
    for outcome in ["answered", "nodata", "nxdomain", "failed"] {
        let want = expected.iter().filter(|e| e.outcome == outcome).count() as u64;
        assert_eq!(
            l["outcomes"][outcome].as_u64(),
            Some(want),
            "{what}: {outcome}: {l}"
        );
    }
    let wasted: u64 = expected.iter().map(|e| e.wasted).sum();
    assert_eq!(l["wasted_queries"].as_u64(), Some(wasted), "{what}: {l}");
    assert_eq!(l["resolver_timeouts"].as_u64(), Some(1), "{what}: {l}");
    assert!(l["waited_s"].as_f64() >= Some(4.5), "{what}: {l}");
    let default = &l["latency_by_namespace"]["default"];
    let in_default = expected
        .iter()
        .filter(|e| e.namespace == Some("default"))
        .count();
    assert_eq!(
        default["lookups"].as_u64(),
        Some(in_default as u64),
        "{what}: {l}"
    );
    // The 5 s lookup is one of 14 in `default`: above the 90th percentile, at the 99th.
    assert!(default["p99_ms"].as_f64() >= Some(4500.0), "{what}: {l}");
    assert!(default["p50_ms"].as_f64() < Some(100.0), "{what}: {l}");
    let top = &l["most_wasted"][0];
    assert_eq!(top["wasted_queries"].as_u64(), Some(8), "{what}: {l}");
}
