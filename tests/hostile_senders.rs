//! Senders that lie (issues #10 and #16): a clock far in the future, a flood of identities,
//! another sender's identity, half-open connections. Files of hand-made dnstap go through
//! `dnstap-analyser read`, live attacks over loopback from their own 127.0.0.x address; the
//! honest sender's sessions must come out exactly, and what was refused or ignored must be
//! counted. Timeouts are shortened by flags to keep the suite fast.

mod support;

use dnstap_analyser::dnstap::pb::{self, mod_Dnstap::Type as TapType, mod_Message::Type};
use quick_protobuf::{MessageWrite, Writer};
use std::borrow::Cow;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::*;

/// A Frame Streams file being written: unidirectional START, data frames, STOP.
struct Capture(Vec<u8>);

impl Capture {
    fn new() -> Self {
        let ct = b"protobuf:dnstap.Dnstap";
        let mut v = vec![0, 0, 0, 0];
        v.extend_from_slice(&(12 + ct.len() as u32).to_be_bytes());
        v.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 1]);
        v.extend_from_slice(&(ct.len() as u32).to_be_bytes());
        v.extend_from_slice(ct);
        Capture(v)
    }

    /// A CQ or CR of `identity` for `qname` with DNS id `id`, stamped `secs` since 1970.
    fn message(&mut self, identity: &str, role: Type, qname: &str, id: u16, secs: u64) {
        let response = role == Type::CLIENT_RESPONSE;
        self.message_at(identity, role, qname, id, secs, response.then_some(secs));
    }

    /// Any message of `identity` for `qname` with DNS id `id`: query time `secs`, response
    /// time `response_secs` (responses), upstream 10.0.0.53:53 (forwarder messages).
    fn message_at(
        &mut self,
        identity: &str,
        role: Type,
        qname: &str,
        id: u16,
        secs: u64,
        response_secs: Option<u64>,
    ) {
        self.message_via(identity, role, (qname, id), secs, response_secs, 53);
    }

    /// `message_at` with the forwarder messages sent to upstream 10.0.0.53:`port`.
    fn message_via(
        &mut self,
        identity: &str,
        role: Type,
        (qname, id): (&str, u16),
        secs: u64,
        response_secs: Option<u64>,
        port: u16,
    ) {
        let response = matches!(role, Type::CLIENT_RESPONSE | Type::FORWARDER_RESPONSE);
        let upstream = matches!(role, Type::FORWARDER_QUERY | Type::FORWARDER_RESPONSE);
        let wire = dns_message(qname, id, response);
        let client = [10, 0, 0, 1];
        let server = [10, 0, 0, 53];
        let msg = pb::Message {
            type_pb: role,
            socket_family: Some(pb::SocketFamily::INET),
            socket_protocol: Some(pb::SocketProtocol::UDP),
            query_address: Some(Cow::Borrowed(&client[..])),
            query_port: Some(40_000 + id as u32),
            response_address: upstream.then_some(Cow::Borrowed(&server[..])),
            response_port: upstream.then_some(port as u32),
            query_time_sec: Some(secs),
            query_time_nsec: Some(0),
            response_time_sec: response_secs,
            response_time_nsec: response_secs.map(|_| 500_000),
            query_message: (!response).then_some(Cow::Borrowed(&wire[..])),
            response_message: response.then_some(Cow::Borrowed(&wire[..])),
            ..Default::default()
        };
        let tap = pb::Dnstap {
            identity: Some(Cow::Borrowed(identity.as_bytes())),
            version: Some(Cow::Borrowed(b"CoreDNS-1.10.1")),
            type_pb: TapType::MESSAGE,
            message: Some(msg),
            ..Default::default()
        };
        self.0
            .extend_from_slice(&(tap.get_size() as u32).to_be_bytes());
        tap.write_message(&mut Writer::new(&mut self.0)).unwrap();
    }

    /// A whole answered session: CQ, then CR with NOERROR.
    fn answered(&mut self, identity: &str, qname: &str, id: u16, secs: u64) {
        self.message(identity, Type::CLIENT_QUERY, qname, id, secs);
        self.message(identity, Type::CLIENT_RESPONSE, qname, id, secs);
    }

    /// The bytes written so far, to send on a connection; the capture goes on empty.
    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }

    fn save(mut self, dir: &TempDir, name: &str) -> PathBuf {
        self.0
            .extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 3]); // STOP
        let path = dir.join(name);
        std::fs::write(&path, &self.0).unwrap();
        path
    }
}

/// A DNS query (or its NOERROR response without answers) for `qname` A IN.
fn dns_message(qname: &str, id: u16, response: bool) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(if response {
        &[0x81, 0x80]
    } else {
        &[0x01, 0x00]
    });
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for label in qname.split('.') {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

/// An hour ago: a plausible time on any machine.
fn recent() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600
}

fn counts_of(out: &Output, identity: &str) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for s in out.sessions.iter().filter(|s| s["identity"] == identity) {
        *m.entry(format!("{}/{}", s_status(s), s_bitmap(s)))
            .or_default() += 1;
    }
    m
}

/// One identity's clock jumps to 2096 and to u64::MAX seconds. Those times are ignored and
/// counted; the messages still make sessions that are printed; neither that identity's later
/// sessions nor another identity's are disturbed.
#[test]
fn far_future_times_are_ignored_and_counted_and_disturb_no_clock() {
    let dir = TempDir::new("far-future");
    let t = recent();
    let mut c = Capture::new();
    c.answered("good", "a.example.test", 1, t);
    c.answered("evil", "b.example.test", 2, t);
    c.message(
        "evil",
        Type::CLIENT_QUERY,
        "never.example.test",
        3,
        4_000_000_000,
    );
    c.message("evil", Type::CLIENT_QUERY, "max.example.test", 4, u64::MAX);
    c.answered("evil", "max2.example.test", 5, u64::MAX);
    for i in 0..3u16 {
        let secs = t + 1 + i as u64;
        c.answered("good", &format!("g{i}.example.test"), 10 + i, secs);
        c.answered("evil", &format!("e{i}.example.test"), 20 + i, secs);
    }
    let out = read(&[c.save(&dir, "far-future.fstrm")], &[]);

    let answered_locally = |n| [("Succeeded/3".to_string(), n)].into_iter().collect();
    assert_eq!(
        counts_of(&out, "good"),
        answered_locally(4),
        "{}",
        describe_all(&out.sessions)
    );
    let mut evil = answered_locally(5);
    // The two far-future queries without a response, printed at the end of the input.
    evil.insert("Failed/1".into(), 2);
    assert_eq!(
        counts_of(&out, "evil"),
        evil,
        "{}",
        describe_all(&out.sessions)
    );
    assert_eq!(out.rejected_times(), 4, "{}", out.summary);
    assert_eq!(out.summary_messages(), Some(out.messages_in_sessions()));
}

/// 100,000 identities in one input against --max-identities 100: the honest sender, there
/// first, keeps every session; the identities beyond the limit are refused and counted, never
/// merged into one.
#[test]
fn a_flood_of_identities_is_refused_and_counted_and_hides_nothing() {
    let dir = TempDir::new("identity-flood");
    let t = recent();
    let mut c = Capture::new();
    let flood = 100_000u32;
    c.answered("good", "first.example.test", 1, t);
    for i in 0..flood {
        let name = format!("pod-{i}");
        c.message(&name, Type::CLIENT_QUERY, "x.example.test", i as u16, t);
        if i % 10_000 == 0 {
            c.answered(
                "good",
                &format!("g{i}.example.test"),
                2 + (i / 10_000) as u16,
                t,
            );
        }
    }
    let out = read(&[c.save(&dir, "flood.fstrm")], &["--max-identities", "100"]);
    assert_eq!(
        counts_of(&out, "good"),
        [("Succeeded/3".to_string(), 11)].into_iter().collect(),
        "{}",
        out.summary
    );
    let admitted = 99u64;
    assert_eq!(out.discarded("identity_limit"), flood as u64 - admitted);
    let identities: std::collections::BTreeSet<&str> = out
        .sessions
        .iter()
        .filter_map(|s| s["identity"].as_str())
        .collect();
    assert_eq!(identities.len() as u64, admitted + 1, "each its own");
    assert_eq!(out.summary_messages(), Some(out.messages_in_sessions()));
}

/// A plaintext connection to `to` from the loopback address 127.0.0.`host`: to the analyser a
/// sender is an identity at a peer address, so each attacker gets an address of its own.
fn connect_from(host: u8, to: &str) -> TcpStream {
    let to: SocketAddr = to.parse().unwrap();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, host], 0)).into())
        .unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

/// The sum of a metric's samples on the analyser's /metrics (0 when it has none).
fn scrape_sum(an: &Analyser, name: &str) -> f64 {
    let text = http_get_ok(&an.metrics_addr(), "/metrics").body;
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the analyser has read `n` data frames over all connections: what was sent
/// before is in the correlator's queues, in order per connection.
fn wait_frames(an: &Analyser, n: u64) {
    wait_until(&format!("{n} frames read"), Duration::from_secs(20), || {
        scrape_sum(an, "dnstap_analyser_frames_total") as u64 >= n
    });
}

/// One connection's worth of frames from 127.0.0.`host`: sent, counted, and kept open.
struct Sender {
    conn: TcpStream,
    capture: Capture,
    frames: u64,
}

impl Sender {
    fn new(host: u8, an: &Analyser) -> Self {
        Sender {
            conn: connect_from(host, &an.addr()),
            capture: Capture::new(),
            frames: 0,
        }
    }

    fn message(&mut self, identity: &str, role: Type, qname: &str, id: u16, secs: u64) {
        self.capture.message(identity, role, qname, id, secs);
        self.frames += 1;
    }

    fn send(&mut self) {
        self.conn.write_all(&self.capture.take()).unwrap();
    }

    /// STOP, then the connection closes: a clean end, no evidence of loss.
    fn stop(mut self) {
        self.capture
            .0
            .extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 3]);
        self.send();
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Counts by status/bitmap of the sessions of `identity` whose qname ends in `zone`.
fn counts_in(
    out: &Output,
    identity: &str,
    zone: &str,
) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for s in out
        .sessions
        .iter()
        .filter(|s| s["identity"] == identity && s_qname(s).ends_with(zone))
    {
        let reason = s["loss_reason"]
            .as_str()
            .map(|r| format!(" {r}"))
            .unwrap_or_default();
        *m.entry(format!("{}/{}{reason}", s_status(s), s_bitmap(s)))
            .or_default() += 1;
    }
    m
}

/// The honest sender's queries: 5 answered later, 5 never; what it must show whatever the
/// attacker did in between.
fn honest_queries(honest: &mut Sender, t: u64) {
    for id in 1..=10u16 {
        honest.message(
            "coredns-0",
            Type::CLIENT_QUERY,
            &format!("q{id}.honest.test"),
            id,
            t,
        );
    }
}

fn honest_answers(honest: &mut Sender, t: u64) {
    for id in 1..=5u16 {
        honest.message(
            "coredns-0",
            Type::CLIENT_RESPONSE,
            &format!("q{id}.honest.test"),
            id,
            t,
        );
    }
}

fn honest_truth() -> std::collections::BTreeMap<String, usize> {
    [("Succeeded/3".to_string(), 5), ("Failed/1".to_string(), 5)]
        .into_iter()
        .collect()
}

/// The honest sender (127.0.0.2) asks ten questions and answers five of them; between the two,
/// a spoofer (127.0.0.3) sends what `spoof` writes under the same identity. Returns the
/// analyser's output once the honest sessions are checked against [`honest_truth`].
fn honest_beside_a_spoofer(spoof: impl FnOnce(&mut Sender, u64)) -> Output {
    let an = Analyser::serve_tcp(&["--session-timeout", "30s", "--shards", "1"]);
    let t = now_secs() - 1;
    let mut honest = Sender::new(2, &an);
    honest_queries(&mut honest, t);
    honest.send();
    wait_frames(&an, honest.frames);
    let mut spoofer = Sender::new(3, &an);
    spoof(&mut spoofer, t);
    spoofer.send();
    wait_frames(&an, honest.frames + spoofer.frames);
    honest_answers(&mut honest, t);
    honest.send();
    wait_frames(&an, honest.frames + spoofer.frames);
    honest.stop();
    spoofer.stop();
    let out = an.stop();
    assert_eq!(
        counts_in(&out, "coredns-0", ".honest.test"),
        honest_truth(),
        "{}",
        describe_all(&out.sessions)
    );
    out
}

/// Finding 1 of #16: a second connection, from another address, under the honest sender's
/// identity sends orphan CLIENT_RESPONSEs, which from an in-order sender are evidence of loss.
/// It must not turn the honest sender's unanswered sessions into SampleLoss.
#[test]
fn a_spoofed_identity_cannot_hide_failures_with_loss_evidence() {
    let out = honest_beside_a_spoofer(|spoof, t| {
        for id in 0..4u16 {
            let qname = format!("orphan{id}.spoof.test");
            spoof.message("coredns-0", Type::CLIENT_RESPONSE, &qname, 500 + id, t);
        }
    });
    let spoofed = counts_in(&out, "coredns-0", ".spoof.test");
    assert_eq!(
        spoofed.values().sum::<usize>(),
        4,
        "the spoofer's own: {spoofed:?}"
    );
}

/// Finding 2 of #16: the spoofer stamps a query 23 h ahead (within --max-time-ahead). That
/// moves its own clock only: the honest sender's sessions do not expire early, so none splits
/// into a false Failed/1 and a response-only line.
#[test]
fn a_spoofed_identity_cannot_invent_failures_with_its_clock() {
    let out = honest_beside_a_spoofer(|spoof, t| {
        let ahead = t + 23 * 3600;
        spoof.message(
            "coredns-0",
            Type::CLIENT_QUERY,
            "ahead.spoof.test",
            900,
            ahead,
        );
    });
    assert_eq!(out.rejected_times(), 0, "23 h ahead is in range");
}

/// A CoreDNS pod that redials keeps its address: its new connection continues the old one's
/// state. Here the new connection's clock, 40 s on, expires the sessions the old one left
/// unanswered while the analyser runs (the wall-clock flush would take much longer; one shard,
/// so that the one later event reaches every session's shard).
#[test]
fn a_sender_redialing_from_its_address_continues_its_sessions() {
    let an = Analyser::serve_tcp(&["--session-timeout", "30s", "--shards", "1"]);
    let t = now_secs() - 60;
    let mut first = Sender::new(2, &an);
    honest_queries(&mut first, t);
    honest_answers(&mut first, t);
    first.send();
    wait_frames(&an, first.frames);
    let sent = first.frames;
    first.stop();
    let mut second = Sender::new(2, &an);
    second
        .capture
        .answered("coredns-0", "later.honest.test", 11, t + 40);
    second.frames += 2;
    second.send();
    wait_frames(&an, sent + second.frames);
    let expired = an.wait_for_sessions(Duration::from_secs(60), |s| {
        s.iter().filter(|s| s_status(s) == "Failed").count() == 5
    });
    assert!(expired, "{}", describe_all(&an.sessions_so_far()));
    second.stop();
    let out = an.stop();
    let mut truth = honest_truth();
    truth.insert("Succeeded/3".into(), 6);
    assert_eq!(counts_in(&out, "coredns-0", ".honest.test"), truth);
}

/// Finding 6 of #16: a flood of sessions from one address (four loadgen pods on 127.0.0.3)
/// fills a small session table. The table evicts from the address holding the most open
/// sessions, so the honest pod's 200 unanswered queries are still reported Failed, and the
/// evictions are counted under the flooding identities.
#[test]
fn a_session_flood_evicts_its_own_sessions_first() {
    let an = Analyser::serve_tcp(&[
        "--session-timeout",
        "30s",
        "--shards",
        "1",
        "--max-sessions",
        "2000",
    ]);
    let t = now_secs() - 1;
    let mut honest = Sender::new(2, &an);
    for id in 1..=200u16 {
        honest.message(
            "honest-pod",
            Type::CLIENT_QUERY,
            &format!("q{id}.honest.test"),
            id,
            t,
        );
    }
    honest.send();
    wait_frames(&an, honest.frames);
    let flood = run_ok(
        std::process::Command::new(loadgen_bin()).args([
            "run",
            "--connect",
            &an.addr(),
            "--bind",
            "127.0.0.3",
            "--connections",
            "4",
            "--sessions",
            "20000",
            "--mix",
            "no_response=1",
        ]),
        Duration::from_secs(60),
    );
    assert!(!flood.stdout.is_empty());
    wait_until("evictions counted", Duration::from_secs(60), || {
        scrape_sum(&an, "dnstap_analyser_sessions_evicted_total") >= 1.0
    });
    let evicted_honest = scrape_sum(
        &an,
        "dnstap_analyser_sessions_evicted_by_identity_total{identity=\"honest-pod\"}",
    );
    assert_eq!(evicted_honest, 0.0, "evictions are counted per identity");
    honest.stop();
    let out = an.stop();
    assert_eq!(
        counts_in(&out, "honest-pod", ".honest.test"),
        [("Failed/1".to_string(), 200)].into_iter().collect()
    );
    let evicted = out
        .sessions
        .iter()
        .filter(|s| s["loss_reason"] == "session_table_full")
        .count();
    assert!(evicted >= 20_000 - 2000, "{evicted}: {}", out.summary);
}

/// Finding 5 of #16: one connection sent sessions of 256 identities through 256 upstreams
/// each, within the label caps, and made 65,536 `upstream_attempts_total` series (80,330 in
/// all, an 8.4 MB scrape). The series budget bounds every family and the total in samples;
/// what is past it is counted under `other`, and nothing is lost from the sums.
#[test]
fn one_connection_cannot_create_tens_of_thousands_of_series() {
    let an = Analyser::serve_tcp(&["--log", "failed", "--session-timeout", "2s"]);
    let t = now_secs() - 1;
    let mut s = Sender::new(2, &an);
    let (identities, upstreams) = (256u16, 256u16);
    for i in 0..identities {
        let identity = format!("pod-{i}");
        for u in 0..upstreams {
            let q = (&*format!("q{u}.series.test"), u);
            for role in [
                Type::CLIENT_QUERY,
                Type::FORWARDER_QUERY,
                Type::FORWARDER_RESPONSE,
                Type::CLIENT_RESPONSE,
            ] {
                let response = matches!(role, Type::CLIENT_RESPONSE | Type::FORWARDER_RESPONSE);
                let port = 1000 + u;
                s.capture
                    .message_via(&identity, role, q, t, response.then_some(t), port);
                s.frames += 1;
            }
        }
        s.send();
    }
    wait_frames(&an, s.frames);
    let sessions = identities as f64 * upstreams as f64;
    wait_until("every session counted", Duration::from_secs(30), || {
        scrape_sum(&an, "dnstap_analyser_sessions_total") >= sessions
    });
    let body = http_get_ok(&an.metrics_addr(), "/metrics").body;
    let samples = |family: &str| {
        let names = [
            family.to_string(),
            format!("{family}_bucket"),
            format!("{family}_sum"),
            format!("{family}_count"),
        ];
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| names.iter().any(|n| l.split(['{', ' ']).next() == Some(n)))
            .count()
    };
    let budgeted = [
        "sessions_total",
        "upstream_attempts_total",
        "upstream_rtt_seconds",
        "client_latency_seconds",
        "messages_total",
        "watermark_lag_seconds",
        "sessions_evicted_by_identity_total",
    ];
    let mut total = 0;
    for family in budgeted {
        let n = samples(&format!("dnstap_analyser_{family}"));
        // The budget, and the label sets collapsed to `other` on top.
        assert!(n <= 10_000 + 100, "{family}: {n} samples");
        total += n;
    }
    assert!(
        total <= 30_000 + 300,
        "{total} samples in the budgeted families"
    );
    let all = body.lines().filter(|l| !l.starts_with('#')).count();
    assert!(all < 32_000, "{all} samples, {} bytes", body.len());
    let other = [("identity", "other"), ("upstream", "other")];
    let labels: Vec<String> = other.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let collapsed: f64 = body
        .lines()
        .filter(|l| l.starts_with("dnstap_analyser_upstream_attempts_total{"))
        .filter(|l| labels.iter().all(|x| l.contains(x.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        collapsed > sessions / 2.0,
        "{collapsed} attempts under other"
    );
    assert_eq!(
        scrape_sum(&an, "dnstap_analyser_upstream_attempts_total"),
        sessions,
        "every attempt counted"
    );
    let overflow = scrape_sum(
        &an,
        "dnstap_analyser_series_overflow_total{family=\"upstream_attempts_total\"}",
    );
    assert_eq!(overflow, collapsed, "the overflow is what went under other");
    s.stop();
    let out = an.stop();
    assert_eq!(out.summary_sessions(), Some(sessions as u64));
}

/// Connections the analyser has taken a decision on: accepted or refused.
fn connections_decided(an: &Analyser) -> u64 {
    (scrape_sum(an, "dnstap_analyser_connections_accepted_total")
        + scrape_sum(an, "dnstap_analyser_connections_refused_total")) as u64
}

/// Opens `n` connections from 127.0.0.`host` that never start the Frame Streams handshake,
/// and waits until the analyser has accepted or refused each.
fn half_open(an: &Analyser, host: u8, n: usize) -> Vec<TcpStream> {
    let before = connections_decided(an);
    let conns: Vec<TcpStream> = (0..n).map(|_| connect_from(host, &an.addr())).collect();
    wait_until(
        "half-open connections decided",
        Duration::from_secs(20),
        || connections_decided(an) >= before + n as u64,
    );
    conns
}

/// One whole connection of the honest sender: START, an answered session, STOP.
fn honest_try(an: &Analyser, host: u8, i: u16) {
    let mut s = Sender::new(host, an);
    s.capture.answered(
        "honest-pod",
        &format!("try{i}.honest.test"),
        i,
        now_secs() - 1,
    );
    s.stop();
}

/// Stops the analyser: all 10 honest tries came out whole, and `refused` attack connections
/// were refused.
fn every_try_served(an: Analyser, refused: u64) {
    // A try's connection is complete on the client's side once the kernel queued it, maybe
    // before the analyser accepted it; SIGTERM closes the listener and its queue. Stop only
    // once every try is printed (complete sessions are printed without waiting for the stop).
    let honest = |s: &[serde_json::Value]| {
        s.iter()
            .filter(|s| s["identity"] == "honest-pod" && s_qname(s).ends_with(".honest.test"))
            .count()
    };
    let served = an.wait_for_sessions(Duration::from_secs(60), |s| honest(s) >= 10);
    assert!(served, "{}", describe_all(&an.sessions_so_far()));
    let out = an.stop();
    assert_eq!(
        counts_in(&out, "honest-pod", ".honest.test"),
        [("Succeeded/3".to_string(), 10)].into_iter().collect(),
        "{}",
        tail(&out.stderr, 20)
    );
    assert_eq!(
        out.discarded("connection_limit"),
        refused,
        "{}",
        out.summary
    );
}

/// The connection-limit flags of the half-open tests: 8 slots, 8 handshakes, 4 per address,
/// and a handshake deadline long enough that the attack needs no replacing.
const SMALL_POOLS: [&str; 8] = [
    "--max-connections",
    "8",
    "--max-handshaking",
    "8",
    "--handshakes-per-address",
    "4",
    "--handshake-timeout",
    "60s",
];

/// Finding 3 of #16: one address keeps more half-open connections than there are slots. The
/// handshaking pool is apart from the established slots and the address gets 4 of it, so an
/// honest pod connecting for the first time gets in every time.
#[test]
fn half_open_connections_from_one_address_do_not_lock_out_a_sender() {
    let an = Analyser::serve_tcp(&SMALL_POOLS);
    let _attack = half_open(&an, 3, 20);
    for i in 1..=10 {
        honest_try(&an, 2, i);
    }
    every_try_served(an, 16);
}

/// Finding 3 of #16: twenty addresses fill the handshaking pool with half-open connections.
/// A pod that held an established connection within --identity-idle-timeout still gets a
/// slot every time it redials.
#[test]
fn a_known_sender_gets_a_slot_past_a_full_handshake_pool() {
    let an = Analyser::serve_tcp(&SMALL_POOLS);
    honest_try(&an, 2, 1);
    wait_until(
        "the first connection served",
        Duration::from_secs(20),
        || an.sessions_so_far().len() == 1,
    );
    let _attack: Vec<Vec<TcpStream>> = (10..30).map(|host| half_open(&an, host, 1)).collect();
    for i in 2..=10 {
        honest_try(&an, 2, i);
    }
    every_try_served(an, 12);
}

/// Finding 8 of #16: identities of 100 KB each would be held for the identity idle timeout.
/// An identity longer than 255 bytes is refused with its own reason and never truncated (two
/// long names sharing their first 255 bytes stay apart: both refused); 255 bytes is fine.
#[test]
fn identities_longer_than_a_dns_name_are_refused_not_truncated() {
    let dir = TempDir::new("long-identity");
    let t = recent();
    let mut c = Capture::new();
    let longest = "a".repeat(255);
    c.answered(&longest, "ok.example.test", 1, t);
    for i in 0..50u16 {
        let long = format!("{}{i}", "b".repeat(100_000));
        c.answered(&long, "long.example.test", 2 + i, t);
    }
    c.answered("good", "good.example.test", 100, t);
    let out = read(&[c.save(&dir, "long.fstrm")], &[]);
    assert_eq!(out.discarded("identity_too_long"), 100, "{}", out.summary);
    assert_eq!(counts_of(&out, &longest).get("Succeeded/3"), Some(&1));
    assert_eq!(counts_of(&out, "good").get("Succeeded/3"), Some(&1));
    assert_eq!(out.sessions.len(), 2, "{}", describe_all(&out.sessions));
}

/// Finding 11 of #16: a response stamped at the end of time (u64::MAX seconds) is counted as
/// time_out_of_range, and that time enters no computation: no 584-year RTT or latency on the
/// line nor in the metrics (one computation, `diagnosis::Diagnosis::refill`).
#[test]
fn a_time_out_of_range_enters_no_rtt_or_latency() {
    let dir = TempDir::new("rtt-out-of-range");
    let t = recent();
    let mut c = Capture::new();
    let (q, id) = ("far.example.test", 7);
    c.message("pod", Type::CLIENT_QUERY, q, id, t);
    c.message_at("pod", Type::FORWARDER_QUERY, q, id, t, None);
    c.message_at("pod", Type::FORWARDER_RESPONSE, q, id, t, Some(u64::MAX));
    c.message_at("pod", Type::CLIENT_RESPONSE, q, id, t, Some(u64::MAX));
    let out = read(&[c.save(&dir, "far.fstrm")], &[]);
    assert_eq!(out.rejected_times(), 2, "{}", out.summary);
    assert_eq!(out.sessions.len(), 1, "{}", describe_all(&out.sessions));
    let s = &out.sessions[0];
    assert_eq!(s_bitmap(s), 15, "{}", describe(s));
    assert!(s["latency_ms"].is_null(), "{}", describe(s));
    let upstreams = s_upstreams(s);
    assert!(!upstreams.is_empty(), "{}", describe(s));
    assert!(
        upstreams.iter().all(|u| u["rtt_ms"].is_null()),
        "{}",
        describe(s)
    );
}

/// Finding 4 of #16: nobody reads stdout (a stalled log pipeline). SIGTERM turns /readyz to
/// 503 at once; after --shutdown-timeout the analyser prints the summary with the number of
/// sessions it could not write, and exits with status 3, long before a kubelet's SIGKILL.
#[test]
fn a_stalled_output_ends_at_the_shutdown_deadline_with_a_count() {
    use std::io::Read as _;
    // /readyz can only be seen between SIGTERM and the deadline: long enough for a starved
    // test to poll it, still well before a kubelet's SIGKILL (30 s).
    const DEADLINE: Duration = Duration::from_secs(10);
    let mut child = std::process::Command::new(analyser_bin())
        .args([
            "--listen",
            "tcp://127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--shutdown-timeout",
            &format!("{}s", DEADLINE.as_secs()),
            "--shards",
            "1",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // stdout is kept open and never read: the pipe fills.
    let _stalled = child.stdout.take().unwrap();
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let (mut pipe, stderr) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                stderr
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let logged = || stderr.lock().unwrap().clone();
    wait_until("listening", Duration::from_secs(60), || {
        logged_listen_port(&logged(), "tcp").is_some() && logged_metrics_port(&logged()).is_some()
    });
    let port = logged_listen_port(&logged(), "tcp").unwrap();
    let metrics = format!("127.0.0.1:{}", logged_metrics_port(&logged()).unwrap());
    run_ok(
        std::process::Command::new(loadgen_bin()).args([
            "run",
            "--connect",
            &format!("127.0.0.1:{port}"),
            "--connections",
            "2",
            "--sessions",
            "30000",
            "--mix",
            "local=1",
        ]),
        Duration::from_secs(60),
    );
    signal_pid(child.id(), "TERM");
    wait_until("/readyz 503 after SIGTERM", DEADLINE, || {
        http_get(&metrics, "/readyz", &[]).is_ok_and(|r| r.status == 503)
    });
    let exit = wait_child(&mut child, DEADLINE + Duration::from_secs(50));
    if exit.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    reader.join().unwrap();
    let text = logged();
    let exit = exit.unwrap_or_else(|| panic!("no exit 60 s after SIGTERM:\n{}", tail(&text, 10)));
    assert_eq!(exit.code(), Some(3), "{}", tail(&text, 10));
    let summary: serde_json::Value = text
        .lines()
        .find_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("summary")
                .cloned()
        })
        .unwrap_or_else(|| panic!("no summary:\n{}", tail(&text, 10)));
    let not_written = summary["sessions_not_written"].as_u64().unwrap_or(0);
    assert!(not_written > 0, "{summary}");
    assert!(text.contains("--shutdown-timeout"), "{}", tail(&text, 10));
}

/// Finding 10 of #16: ESC, BEL and NUL in an identity reached /metrics raw. Every control
/// character in a label value is written as text.
#[test]
fn control_characters_in_an_identity_never_reach_metrics_raw() {
    let an = Analyser::serve_tcp(&[]);
    let mut s = Sender::new(2, &an);
    let evil = "evil\u{1b}[2J\u{7}\u{0}pod";
    s.capture
        .answered(evil, "x.example.test", 1, now_secs() - 1);
    s.frames += 2;
    s.send();
    wait_frames(&an, s.frames);
    wait_until("the identity in /metrics", Duration::from_secs(60), || {
        http_get_ok(&an.metrics_addr(), "/metrics")
            .body
            .contains("evil")
    });
    let body = http_get_ok(&an.metrics_addr(), "/metrics").body;
    let raw: Vec<char> = body
        .chars()
        .filter(|c| c.is_control() && *c != '\n')
        .collect();
    assert!(raw.is_empty(), "raw control characters {raw:?} in /metrics");
    assert!(
        body.contains(r#"identity="evil\\x1b[2J\\x07\\x00pod""#),
        "{body}"
    );
    s.stop();
    an.stop();
}

/// Finding 7 of #16: --max-identities is full of an attacker's names, whose refused newcomers
/// use up the ordinary warnings. A new pod from its own address is still named in the log
/// with its address, and counted under that address.
#[test]
fn a_refused_identity_is_named_in_the_log_with_its_address() {
    let an = Analyser::serve_tcp(&["--max-identities", "3"]);
    let t = now_secs() - 1;
    let mut flood = Sender::new(3, &an);
    for i in 0..300u16 {
        let name = format!("flood-{i}");
        flood.message(&name, Type::CLIENT_QUERY, "x.flood.test", i, t);
    }
    flood.send();
    wait_frames(&an, flood.frames);
    let mut pod = Sender::new(2, &an);
    pod.message("new-pod", Type::CLIENT_QUERY, "y.honest.test", 1, t);
    pod.send();
    wait_frames(&an, flood.frames + pod.frames);
    wait_until("the refusal counted", Duration::from_secs(60), || {
        scrape_sum(
            &an,
            "dnstap_analyser_identities_refused_total{peer=\"127.0.0.2\"}",
        ) >= 1.0
    });
    assert!(
        scrape_sum(
            &an,
            "dnstap_analyser_identities_refused_total{peer=\"127.0.0.3\"}"
        ) >= 297.0
    );
    flood.stop();
    pod.stop();
    let out = an.stop();
    let named = out
        .stderr
        .lines()
        .any(|l| l.contains("127.0.0.2") && l.contains("\"new-pod\""));
    assert!(named, "{}", tail(&out.stderr, 30));
}

/// Finding 9 of #16: a connect flood on the metrics port (from 127.0.0.3, nothing sent) while
/// a scraper from 127.0.0.2 sends its request 50 ms after connecting. The flood holds at most
/// its address's share and evicts its own silent connections: every scrape gets through.
#[test]
fn a_connect_flood_does_not_crowd_out_a_scraper() {
    use std::io::Read as _;
    let an = Analyser::serve_tcp(&[]);
    let addr = an.metrics_addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (addr, stop) = (addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held = std::collections::VecDeque::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                held.push_back(connect_from(3, &addr));
                if held.len() > 200 {
                    held.pop_front();
                }
            }
        })
    };
    let mut ok = 0;
    for _ in 0..40 {
        let mut c = connect_from(2, &addr);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut reply = String::new();
        let sent = c.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").is_ok();
        if sent && c.read_to_string(&mut reply).is_ok() && reply.starts_with("HTTP/1.1 200") {
            ok += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    an.stop();
    assert_eq!(ok, 40, "scrapes that got through a connect flood");
}
