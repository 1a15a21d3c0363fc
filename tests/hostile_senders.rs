//! Senders that lie (issue #10): a clock far in the future, or a flood of identities. Files of
//! hand-made dnstap go through `dnstap-analyser read`; the honest sender's sessions must come
//! out exactly, and what was refused or ignored must be counted.

mod support;

use dnstap_analyser::dnstap::pb::{self, mod_Dnstap::Type as TapType, mod_Message::Type};
use quick_protobuf::{MessageWrite, Writer};
use std::borrow::Cow;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};
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
        let wire = dns_message(qname, id, response);
        let client = [10, 0, 0, 1];
        let msg = pb::Message {
            type_pb: role,
            socket_family: Some(pb::SocketFamily::INET),
            socket_protocol: Some(pb::SocketProtocol::UDP),
            query_address: Some(Cow::Borrowed(&client[..])),
            query_port: Some(40_000 + id as u32),
            query_time_sec: Some(secs),
            query_time_nsec: Some(0),
            response_time_sec: response.then_some(secs),
            response_time_nsec: response.then_some(500_000),
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
    assert_eq!(out.discarded("time_out_of_range"), 4, "{}", out.summary);
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
