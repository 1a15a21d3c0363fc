//! One test per joining rule, with the query sequences the C libraries send (glibc: search
//! list in order, A and AAAA together from one port per candidate, on past NXDOMAIN, NODATA
//! and SERVFAIL; musl: the same walk, stopping at NODATA or SERVFAIL).

use super::*;

const MS: Nanos = 1_000_000;
const S: Nanos = 1_000 * MS;
const T0: Nanos = 1_700_000_000 * S;

/// A client's queries, built up candidate by candidate.
struct Client {
    ip: [u8; 4],
    port: u16,
    identity: u32,
    t: Nanos,
    queries: Vec<Sent>,
}

/// One query as the client sent it, and what it got.
struct Sent {
    name: String,
    qtype: u16,
    outcome: Outcome,
    cname: Option<String>,
    port: u16,
    t: Nanos,
    identity: u32,
    id: u16,
}

impl Client {
    fn new(ip: [u8; 4]) -> Self {
        Self {
            ip,
            port: 40_000,
            identity: 1,
            t: T0,
            queries: Vec::new(),
        }
    }

    /// One candidate from a fresh port: A and AAAA, each answered `outcome` 1 ms later.
    fn pair(&mut self, name: &str, outcome: Outcome) -> &mut Self {
        self.port += 1;
        for qtype in [QTYPE_A, QTYPE_AAAA] {
            self.send(name, qtype, outcome);
        }
        self.t += 2 * MS;
        self
    }

    fn send(&mut self, name: &str, qtype: u16, outcome: Outcome) -> &mut Self {
        self.queries.push(Sent {
            name: name.into(),
            qtype,
            outcome,
            cname: None,
            port: self.port,
            t: self.t,
            identity: self.identity,
            id: self.next_id(name, qtype),
        });
        self
    }

    /// A resolver resends a query with its id: the id of an earlier send of the same query
    /// from the same port, else a fresh one.
    fn next_id(&self, name: &str, qtype: u16) -> u16 {
        let earlier = self
            .queries
            .iter()
            .rev()
            .find(|s| s.name == name && s.qtype == qtype && s.port == self.port);
        earlier.map_or(self.queries.len() as u16 + 1000, |s| s.id)
    }

    fn feed(&self, table: &mut LookupTable, done: &mut Vec<Lookup>) -> Vec<Option<u64>> {
        self.feed_at(table, done, 0)
    }

    /// `feed` at stage clock `now`.
    fn feed_at(
        &self,
        table: &mut LookupTable,
        done: &mut Vec<Lookup>,
        now: Nanos,
    ) -> Vec<Option<u64>> {
        self.queries
            .iter()
            .map(|s| {
                let q = Query {
                    client: SocketAddr::from((self.ip, s.port)),
                    identity: SourceId(s.identity),
                    qname: &s.name,
                    qtype: s.qtype,
                    outcome: s.outcome,
                    cname_target: s.cname.as_deref(),
                    query_time: s.t,
                    response_time: Some(s.t + MS),
                    dns_id: Some(s.id),
                };
                table.on_query(&q, now, &mut |l: &Lookup| done.push(l.clone()))
            })
            .collect()
    }
}

fn table() -> LookupTable {
    LookupTable::new(
        Config {
            search_suffixes: vec!["node.test".into()],
            ..Config::default()
        },
        0,
        1,
    )
}

fn run(clients: &[&Client]) -> Vec<Lookup> {
    let mut t = table();
    let mut done = Vec::new();
    for c in clients {
        c.feed(&mut t, &mut done);
    }
    t.flush(&mut |l: &Lookup| done.push(l.clone()));
    done
}

fn one(c: &Client) -> Lookup {
    let mut all = run(&[c]);
    assert_eq!(all.len(), 1, "{all:#?}");
    all.pop().unwrap()
}

use Outcome::*;

fn glibc_walk(c: &mut Client, base: &str, ns: &str, outcomes: &[Outcome]) {
    let names = [
        format!("{base}.{ns}.svc.cluster.local."),
        format!("{base}.svc.cluster.local."),
        format!("{base}.cluster.local."),
        format!("{base}.node.test."),
        format!("{base}."),
    ];
    for (name, o) in names.iter().zip(outcomes) {
        c.pair(name, *o);
    }
}

#[test]
fn answered_at_the_last_candidate_is_one_lookup_with_eight_wasted_queries() {
    let mut c = Client::new([10, 0, 0, 5]);
    glibc_walk(
        &mut c,
        "api.example.test",
        "default",
        &[NxDomain, NxDomain, NxDomain, NxDomain, Answered],
    );
    let l = one(&c);
    assert_eq!(l.asked, "api.example.test");
    assert_eq!(l.namespace.as_deref(), Some("default"));
    assert_eq!(l.queries, 10);
    assert_eq!(l.wasted_queries, 8);
    assert_eq!(l.outcome, Answered);
    assert_eq!(l.answered_by.as_deref(), Some("api.example.test."));
    assert_eq!(
        l.candidates[0],
        "api.example.test.default.svc.cluster.local."
    );
    assert_eq!(l.candidates[3], "api.example.test.node.test.");
    assert_eq!(l.candidates.len(), 5);
    assert_eq!(l.latency, 9 * MS, "first query to last response");
    assert_eq!((l.retries, l.waited), (0, 0));
}

#[test]
fn a_name_that_exists_nowhere_is_nxdomain_after_every_candidate() {
    let mut c = Client::new([10, 0, 0, 5]);
    glibc_walk(&mut c, "nothere.example.test", "default", &[NxDomain; 5]);
    let l = one(&c);
    assert_eq!((l.outcome, l.answered_by.as_deref()), (NxDomain, None));
    assert_eq!((l.queries, l.wasted_queries), (10, 8));
}

#[test]
fn a_short_name_answered_by_its_first_candidate_reads_as_the_short_name() {
    let mut c = Client::new([10, 0, 0, 5]);
    c.pair("web.default.svc.cluster.local.", Answered);
    let l = one(&c);
    assert_eq!(l.asked, "web");
    assert_eq!(l.candidates, ["web.default.svc.cluster.local."]);
    assert_eq!((l.queries, l.wasted_queries), (2, 0));
    assert_eq!(l.namespace.as_deref(), Some("default"));
}

#[test]
fn a_lone_candidate_with_a_dotted_base_and_an_absolute_name_read_as_asked() {
    let mut c = Client::new([10, 0, 0, 5]);
    c.pair("api.example.test.", Answered);
    let l = one(&c);
    assert_eq!(l.asked, "api.example.test.");
    assert_eq!(l.namespace, None);
    let mut c = Client::new([10, 0, 0, 5]);
    c.pair("a.b.default.svc.cluster.local.", Answered);
    assert_eq!(one(&c).asked, "a.b.default.svc.cluster.local.");
}

#[test]
fn candidates_arriving_out_of_order_still_join_and_are_listed_in_query_order() {
    let mut c = Client::new([10, 0, 0, 5]);
    glibc_walk(&mut c, "api", "prod", &[NxDomain, NxDomain, Answered]);
    c.queries.reverse();
    let l = one(&c);
    assert_eq!(
        l.candidates,
        [
            "api.prod.svc.cluster.local.",
            "api.svc.cluster.local.",
            "api.cluster.local."
        ]
    );
    assert_eq!(l.namespace.as_deref(), Some("prod"));
}

#[test]
fn concurrent_lookups_of_different_names_from_one_client_do_not_merge() {
    let mut c = Client::new([10, 0, 0, 5]);
    let names = ["a", "b", "c", "d", "e"];
    // Interleaved: each name's candidate k goes out before any name's candidate k+1.
    for sfx in ["default.svc.cluster.local.", "svc.cluster.local."] {
        for n in names {
            c.pair(&format!("{n}.{sfx}"), NxDomain);
        }
    }
    let all = run(&[&c]);
    let mut asked: Vec<&str> = all.iter().map(|l| l.asked.as_str()).collect();
    asked.sort();
    assert_eq!(asked, names);
    assert!(all
        .iter()
        .all(|l| l.queries == 4 && l.candidates.len() == 2));
}

#[test]
fn different_clients_never_share_a_lookup() {
    let mut a = Client::new([10, 0, 0, 5]);
    a.pair("web.default.svc.cluster.local.", NxDomain);
    let mut b = Client::new([10, 0, 0, 6]);
    b.pair("web.svc.cluster.local.", Answered);
    assert_eq!(run(&[&a, &b]).len(), 2);
}

#[test]
fn the_application_asking_again_from_a_fresh_socket_is_a_new_lookup() {
    let mut c = Client::new([10, 0, 0, 5]);
    c.pair("web.default.svc.cluster.local.", Answered);
    c.t += 100 * MS;
    c.pair("web.default.svc.cluster.local.", Answered);
    let all = run(&[&c]);
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|l| l.queries == 2 && l.retries == 0));
}

#[test]
fn glibc_goes_past_nodata_and_musl_stops_there() {
    let mut glibc = Client::new([10, 0, 0, 5]);
    glibc_walk(&mut glibc, "nodata", "default", &[NoData, Answered]);
    let l = one(&glibc);
    assert_eq!((l.outcome, l.queries, l.wasted_queries), (Answered, 4, 2));
    assert_eq!(l.answered_by.as_deref(), Some("nodata.svc.cluster.local."));
    let mut musl = Client::new([10, 0, 0, 5]);
    glibc_walk(&mut musl, "nodata", "default", &[NoData]);
    let l = one(&musl);
    assert_eq!((l.outcome, l.queries, l.wasted_queries), (NoData, 2, 0));
    assert_eq!(l.answered_by, None);
}

#[test]
fn the_best_outcome_wins_answered_nodata_nxdomain_failed() {
    let mut c = Client::new([10, 0, 0, 5]);
    glibc_walk(
        &mut c,
        "x",
        "default",
        &[Failed, NxDomain, NoData, NxDomain, NxDomain],
    );
    assert_eq!(one(&c).outcome, NoData);
    let mut c = Client::new([10, 0, 0, 5]);
    glibc_walk(&mut c, "x", "default", &[Failed, NxDomain, NxDomain]);
    assert_eq!(one(&c).outcome, NxDomain);
    let mut c = Client::new([10, 0, 0, 5]);
    c.send("x.default.svc.cluster.local.", QTYPE_A, Failed);
    assert_eq!(one(&c).outcome, Failed);
}

#[test]
fn a_candidate_answered_only_for_one_type_answers_the_pair() {
    let mut c = Client::new([10, 0, 0, 5]);
    c.port += 1;
    c.send("v4only.default.svc.cluster.local.", QTYPE_A, Answered)
        .send("v4only.default.svc.cluster.local.", QTYPE_AAAA, NoData);
    let l = one(&c);
    assert_eq!((l.outcome, l.queries), (Answered, 2));
}

#[test]
fn a_resend_from_the_same_port_is_a_retry_and_the_wait_is_counted_once() {
    // The five-second signature: the AAAA is lost, glibc waits 5 s and sends both again.
    let mut c = Client::new([10, 0, 0, 5]);
    c.port += 1;
    c.send("web.default.svc.cluster.local.", QTYPE_A, Answered);
    c.t += 5 * S;
    c.send("web.default.svc.cluster.local.", QTYPE_A, Answered)
        .send("web.default.svc.cluster.local.", QTYPE_AAAA, Answered);
    let l = one(&c);
    assert_eq!(l.queries, 3);
    assert_eq!(
        l.retries, 2,
        "the A sent again, and the AAAA whose first send was lost"
    );
    assert_eq!(l.waited, 5 * S);
    assert_eq!(l.latency, 5 * S + MS);
    assert_eq!(l.wasted_queries, 0);
}

#[test]
fn a_pair_whose_halves_are_milliseconds_apart_is_no_retry() {
    let mut c = Client::new([10, 0, 0, 5]);
    c.port += 1;
    c.send("web.default.svc.cluster.local.", QTYPE_A, Answered);
    c.t += 300 * MS;
    c.send("web.default.svc.cluster.local.", QTYPE_AAAA, Answered);
    assert_eq!(one(&c).retries, 0);
}

#[test]
fn waits_on_two_candidates_add_up() {
    let mut c = Client::new([10, 0, 0, 5]);
    for name in ["w.default.svc.cluster.local.", "w.svc.cluster.local."] {
        c.port += 1;
        c.send(name, QTYPE_A, NxDomain);
        c.t += 5 * S;
        c.send(name, QTYPE_A, NxDomain)
            .send(name, QTYPE_AAAA, NxDomain);
        c.t += MS;
    }
    let l = one(&c);
    assert_eq!((l.retries, l.waited), (4, 10 * S));
    assert_eq!(l.candidates.len(), 2);
}

#[test]
fn a_second_namespace_from_the_same_address_is_its_own_namespace() {
    let mut c = Client::new([10, 0, 0, 5]);
    glibc_walk(&mut c, "api", "kube-system", &[NxDomain, Answered]);
    let l = one(&c);
    assert_eq!(l.namespace.as_deref(), Some("kube-system"));
    assert_eq!(l.asked, "api");
}

#[test]
fn node_domains_not_given_are_learned_from_a_walk_past_the_cluster_suffixes() {
    let mut t = LookupTable::new(Config::default(), 0, 1);
    let mut c = Client::new([10, 0, 0, 5]);
    for name in [
        "api.example.test.default.svc.cluster.local.",
        "api.example.test.svc.cluster.local.",
        "api.example.test.cluster.local.",
        "api.example.test.ec2.internal.",
        "api.example.test.",
    ] {
        c.pair(name, NxDomain);
    }
    let mut done = Vec::new();
    c.feed(&mut t, &mut done);
    t.flush(&mut |l: &Lookup| done.push(l.clone()));
    assert_eq!(done.len(), 1, "{done:#?}");
    assert_eq!(done[0].candidates[3], "api.example.test.ec2.internal.");
    assert_eq!(t.search_list().learned(), ["ec2.internal".to_string()]);
}

#[test]
fn walks_that_share_a_first_label_stay_apart_and_learn_only_at_a_label_boundary() {
    // `api` and `api.e` from one client: one index entry (client, `api`) holds both. The
    // newer, `api.e`, is a prefix of `api.ec2.internal` but not at a label boundary.
    let mut t = LookupTable::new(Config::default(), 0, 1);
    let mut c = Client::new([10, 0, 0, 5]);
    for base in ["api", "api.e"] {
        for sfx in [
            "default.svc.cluster.local.",
            "svc.cluster.local.",
            "cluster.local.",
        ] {
            c.pair(&format!("{base}.{sfx}"), NxDomain);
        }
    }
    c.pair("api.ec2.internal.", Answered);
    c.pair("api.e.ec2.internal.", Answered);
    let mut done = Vec::new();
    c.feed(&mut t, &mut done);
    t.flush(&mut |l: &Lookup| done.push(l.clone()));
    let mut walks: Vec<(&str, &str)> = done
        .iter()
        .map(|l| (l.asked.as_str(), l.candidates[3].as_str()))
        .collect();
    walks.sort();
    assert_eq!(
        walks,
        [
            ("api", "api.ec2.internal."),
            ("api.e", "api.e.ec2.internal.")
        ],
        "{done:#?}"
    );
    assert!(done
        .iter()
        .all(|l| l.candidates.len() == 4 && l.queries == 8));
}

#[test]
fn a_query_reads_only_the_lookups_whose_base_its_name_starts_with() {
    // A forwarder's lookups under one first label: `www.b.com` is not read for `www.a.com`'s
    // candidates.
    let mut t = table();
    let mut c = Client::new([10, 0, 0, 5]);
    for name in ["www.a.com.", "www.b.com.", "www."] {
        c.send(name, QTYPE_A, NxDomain);
        c.port += 1;
    }
    let ids = c.feed(&mut t, &mut Vec::new());
    let name = "www.a.com.ns.svc.cluster.local";
    let read = t.indexed(t.key(IpAddr::from(c.ip), "www"), name);
    let read: Vec<Option<u64>> = read
        .iter()
        .map(|&s| open_at(&t.slots, s).map(|l| l.id))
        .collect();
    assert_eq!(read, [ids[2], ids[0]], "newest first");
}

#[test]
fn autopath_answers_the_first_candidate_with_a_cname_and_nothing_is_wasted() {
    let mut c = Client::new([10, 0, 0, 5]);
    c.port += 1;
    for qtype in [QTYPE_A, QTYPE_AAAA] {
        c.send(
            "api.example.test.default.svc.cluster.local.",
            qtype,
            Answered,
        );
        c.queries.last_mut().unwrap().cname = Some("api.example.test.".into());
    }
    let l = one(&c);
    assert_eq!(l.asked, "api.example.test");
    assert_eq!(l.autopath.as_deref(), Some("api.example.test."));
    assert_eq!((l.queries, l.wasted_queries), (2, 0));
    // A CNAME elsewhere (web → a CDN) is no autopath.
    let mut c = Client::new([10, 0, 0, 5]);
    c.pair("web.default.svc.cluster.local.", Answered);
    c.queries[0].cname = Some("cdn.example.net.".into());
    assert_eq!(one(&c).autopath, None);
}

#[test]
fn candidates_from_two_identities_join_and_both_are_named() {
    let mut c = Client::new([10, 0, 0, 5]);
    c.pair("api.default.svc.cluster.local.", NxDomain);
    c.identity = 2;
    c.pair("api.svc.cluster.local.", Answered);
    let l = one(&c);
    assert_eq!(l.identities, [SourceId(1), SourceId(2)]);
}

#[test]
fn other_types_make_lookups_of_their_own() {
    let mut c = Client::new([10, 0, 0, 5]);
    c.port += 1;
    c.send("web.default.svc.cluster.local.", QTYPE_A, Answered)
        .send("web.default.svc.cluster.local.", 33, NxDomain);
    assert_eq!(run(&[&c]).len(), 2);
}

#[test]
fn a_lookup_ends_after_the_gap_and_a_later_query_starts_another() {
    let mut t = table();
    let mut done = Vec::new();
    let mut c = Client::new([10, 0, 0, 5]);
    c.pair("web.default.svc.cluster.local.", NxDomain);
    c.feed(&mut t, &mut done);
    t.advance(10 * S, &mut |l: &Lookup| done.push(l.clone()));
    assert!(done.is_empty(), "still waiting for late sessions");
    t.advance(11 * S, &mut |l: &Lookup| done.push(l.clone()));
    assert_eq!(done.len(), 1, "gap + linger after the last join");
}

#[test]
fn a_query_joins_only_within_the_gap_of_event_time_however_late_it_arrives() {
    let mut c = Client::new([10, 0, 0, 5]);
    c.pair("web.default.svc.cluster.local.", NxDomain);
    c.t += 7 * S;
    c.pair("web.svc.cluster.local.", Answered);
    let all = run(&[&c]);
    assert_eq!(all.len(), 2);
    assert_ne!(all[0].id, all[1].id);
}

#[test]
fn open_lookups_are_capped_per_client_and_in_total_and_evictions_counted() {
    let mut t = LookupTable::new(
        Config {
            max_open: 10,
            max_per_client: 3,
            ..Config::default()
        },
        0,
        1,
    );
    let mut done = Vec::new();
    let mut c = Client::new([10, 0, 0, 1]);
    for i in 0..5 {
        c.pair(&format!("n{i}.default.svc.cluster.local."), NxDomain);
    }
    c.feed(&mut t, &mut done);
    assert_eq!(t.open_lookups(), 3);
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|l| l.evicted));
    for ip in 2..20u8 {
        let mut c = Client::new([10, 0, 0, ip]);
        c.pair("x.default.svc.cluster.local.", NxDomain);
        c.feed(&mut t, &mut done);
        assert!(t.open_lookups() <= 10);
    }
    assert_eq!(t.tally().evicted, done.len() as u64);
    t.flush(&mut |l: &Lookup| done.push(l.clone()));
    assert_eq!(done.len(), 5 + 18, "every lookup comes out once");
    assert_eq!(t.open_lookups(), 0);
    assert!(t.clients.is_empty());
}

#[test]
fn a_client_at_its_bound_ends_its_oldest_lookup_first_also_after_others_ended() {
    let cfg = Config {
        max_per_client: 3,
        ..Config::default()
    };
    let mut t = LookupTable::new(cfg, 0, 1);
    let mut done = Vec::new();
    let mut first = Client::new([10, 0, 0, 1]);
    for name in ["a", "b", "c"] {
        first.pair(&format!("{name}.example.test."), NxDomain);
    }
    first.feed_at(&mut t, &mut done, 0);
    // `a` sent again (its port, its id) later on the stage's clock: b and c end before it.
    let mut again = Client::new([10, 0, 0, 1]);
    again.port = first.queries[0].port - 1;
    again.pair("a.example.test.", NxDomain);
    again.feed_at(&mut t, &mut done, 20 * S);
    t.advance(20 * S, &mut |l: &Lookup| done.push(l.clone()));
    let asked = |done: &[Lookup]| -> Vec<(String, bool)> {
        done.iter().map(|l| (l.asked.clone(), l.evicted)).collect()
    };
    let ended = |n: &str, evicted| (format!("{n}.example.test."), evicted);
    assert_eq!(asked(&done), [ended("b", false), ended("c", false)]);
    let mut later = Client::new([10, 0, 0, 1]);
    later.port = 41_000;
    for name in ["d", "e", "f", "g"] {
        later.pair(&format!("{name}.example.test."), NxDomain);
    }
    later.feed_at(&mut t, &mut done, 20 * S);
    assert_eq!(
        asked(&done[2..]),
        [ended("a", true), ended("d", true)],
        "the oldest open first, whatever ended in between"
    );
    assert_eq!(t.open_lookups(), 3);
}

#[test]
fn ids_are_unique_across_partitions() {
    let mut a = LookupTable::new(Config::default(), 0, 2);
    let mut b = LookupTable::new(Config::default(), 1, 2);
    let mut c = Client::new([10, 0, 0, 5]);
    c.pair("a.default.svc.cluster.local.", NxDomain);
    c.pair("b.default.svc.cluster.local.", NxDomain);
    let mut done = Vec::new();
    let ia = c.feed(&mut a, &mut done);
    let ib = c.feed(&mut b, &mut done);
    let mut all: Vec<u64> = ia.into_iter().chain(ib).flatten().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4);
}

#[test]
fn the_root_joins_no_lookup() {
    let mut t = table();
    let q = Query {
        client: SocketAddr::from(([10, 0, 0, 5], 1)),
        identity: SourceId(1),
        qname: ".",
        qtype: 2,
        outcome: Answered,
        cname_target: None,
        query_time: T0,
        response_time: None,
        dns_id: None,
    };
    assert_eq!(t.on_query(&q, 0, &mut |_| {}), None);
}

#[test]
fn a_lone_later_candidate_arriving_first_is_read_again_with_the_walks_base() {
    // The walk of `nothere.example.test`; its `svc.cluster.local` candidate reaches the stage
    // first and reads best as `nothere.example` in namespace `test`.
    let mut c = Client::new([10, 0, 0, 5]);
    glibc_walk(&mut c, "nothere.example.test", "default", &[NxDomain; 5]);
    c.queries.swap(0, 2);
    let l = one(&c);
    assert_eq!(l.asked, "nothere.example.test");
    assert_eq!((l.queries, l.candidates.len()), (10, 5));
    assert_eq!(l.namespace.as_deref(), Some("default"));
    // `web.default`'s walk, its second candidate first.
    let mut c = Client::new([10, 0, 0, 5]);
    c.pair("web.default.default.svc.cluster.local.", NxDomain);
    c.pair("web.default.svc.cluster.local.", Answered);
    c.queries.swap(0, 2);
    c.queries.swap(1, 3);
    let l = one(&c);
    assert_eq!(l.asked, "web.default");
    assert_eq!(l.candidates.len(), 2);
}

#[test]
fn a_lookup_is_not_read_again_when_the_times_contradict_the_walk() {
    // `web` answered at its first candidate; then `web.default` asked: its first candidate
    // comes after, so it is no earlier step of the same walk.
    let mut c = Client::new([10, 0, 0, 5]);
    c.pair("web.default.svc.cluster.local.", Answered);
    c.pair("web.default.default.svc.cluster.local.", NxDomain);
    assert_eq!(run(&[&c]).len(), 2);
}

#[test]
fn the_same_query_with_a_fresh_id_from_one_socket_is_asked_again_not_resent() {
    // dnsperf, or a caching forwarder: one socket, the same name again and again.
    let mut c = Client::new([10, 0, 0, 5]);
    c.send("s1.broken.test.", QTYPE_A, Failed);
    c.t += 300 * MS;
    c.send("s1.broken.test.", QTYPE_A, Failed);
    c.queries[1].id += 1;
    let all = run(&[&c]);
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|l| l.retries == 0));
}

#[test]
fn queries_coredns_makes_itself_with_the_clients_socket_and_id_are_not_the_clients() {
    // `template` resolving its CNAME target through the server: logged as a client query for
    // the target from the client's socket, with the client's id, and finished first.
    let mut c = Client::new([10, 0, 0, 5]);
    c.port += 1;
    for qtype in [QTYPE_AAAA, QTYPE_A] {
        c.send(
            "auto.example.test.default.svc.cluster.local.",
            qtype,
            Answered,
        );
        c.queries.last_mut().unwrap().cname = Some("auto.example.test.".into());
        let id = c.queries.last().unwrap().id;
        c.t += MS / 10;
        c.send("auto.example.test.", qtype, Answered);
        c.queries.last_mut().unwrap().id = id;
        let n = c.queries.len();
        c.queries.swap(n - 2, n - 1);
    }
    let l = one(&c);
    assert_eq!(
        l.candidates,
        ["auto.example.test.default.svc.cluster.local."]
    );
    assert_eq!((l.queries, l.wasted_queries), (2, 0));
    assert_eq!(l.autopath.as_deref(), Some("auto.example.test."));
}

#[test]
fn base_names_short_and_long_read_back_as_set_in_a_reused_slot() {
    let mut b = BaseName::default();
    let long = "a-name-longer-than-the-inline-room.example.test";
    for name in [
        "web",
        long,
        "",
        "twenty-eight-bytes.long.test",
        "twenty-nine-bytes.long.testss",
        "grüße.example",
        "web",
    ] {
        b.set(name);
        assert_eq!(b.as_str(), name);
        assert_eq!(&*b, name);
    }
}

#[test]
fn lookups_not_named_differ_from_named_ones_only_in_their_candidates_names() {
    let mut clients = Vec::new();
    for (i, outcomes) in [
        &[NxDomain, Answered][..],
        &[NxDomain, NxDomain, NxDomain, NxDomain, Answered],
        &[NxDomain, NxDomain, NxDomain, NxDomain, NxDomain],
        &[Answered],
        &[NxDomain, NxDomain, Failed],
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = Client::new([10, 0, 0, 5 + i as u8]);
        glibc_walk(&mut c, "api.example.test", "default", outcomes);
        clients.push(c);
    }
    // Lone candidates, whose asked name is the candidate's (`svc`, an extra suffix).
    let mut c = Client::new([10, 0, 1, 1]);
    c.pair("web.default.svc.cluster.local.", NxDomain);
    c.t += 20 * S;
    c.pair("db.svc.cluster.local.", Answered);
    c.t += 20 * S;
    c.pair("api.node.test.", NxDomain);
    clients.push(c);
    let feed = |t: &mut LookupTable| {
        let mut done = Vec::new();
        for c in &clients {
            c.feed(t, &mut done);
        }
        t.flush(&mut |l: &Lookup| done.push(l.clone()));
        done
    };
    let all = feed(&mut table());
    let mut t = table();
    t.name_candidates_for(|l| l.outcome != Answered);
    let some = feed(&mut t);
    assert_eq!(all.len(), 8, "{all:#?}");
    assert_eq!(some.len(), all.len());
    assert!(all.iter().any(|l| l.asked == "db.svc.cluster.local."));
    for (named, l) in all.iter().zip(&some) {
        assert!(!named.candidates.is_empty());
        if l.outcome == Answered {
            assert!(l.candidates.is_empty() && l.answered_by.is_none(), "{l:#?}");
            let unnamed = Lookup {
                candidates: Vec::new(),
                answered_by: None,
                ..named.clone()
            };
            assert_eq!(*l, unnamed);
        } else {
            assert_eq!(l, named);
        }
    }
}

#[test]
fn an_open_lookup_takes_at_most_384_bytes() {
    // The slots of 65,536 open lookups are read at random: their size is cache misses.
    assert!(
        std::mem::size_of::<Open>() <= 384,
        "{}",
        std::mem::size_of::<Open>()
    );
}
