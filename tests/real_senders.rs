//! Real Frame Streams senders replay the CoreDNS captures into a serving analyser over TCP and
//! unix sockets: the sessions equal those of `read`. Bad input on other connections meanwhile
//! leaves the good stream exact and the process up.

mod support;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;
use support::{
    coredns_fixture, fstrm_replay_tcp, fstrm_replay_unix, go_dnstap_rewrite, go_dnstap_tcp, read,
    require_binary, run_sender, scrape_text, wait_until, Analyser, Exposition, TempDir,
};

const CAPTURES: [&str; 4] = [
    "b_forward.fstrm",
    "g_timeout.fstrm",
    "k_bind_tcp.fstrm",
    "h_burst_5k.fstrm",
];

#[test]
fn go_dnstap_cli_replay_equals_read() {
    for capture in CAPTURES {
        let file = coredns_fixture(capture);
        let served = Analyser::serve_tcp(&[]);
        run_sender(&mut go_dnstap_tcp(&served.addr(), &file));
        let live = served.stop();
        assert_eq!(
            live.signatures(),
            read(&[file], &[]).signatures(),
            "{capture} via dnstap -T"
        );
    }
}

#[test]
fn fstrm_replay_over_tcp_and_unix_equals_read() {
    for capture in CAPTURES {
        let file = coredns_fixture(capture);
        let served = Analyser::serve_tcp(&[]);
        run_sender(&mut fstrm_replay_tcp(served.port(), &file));
        let live = served.stop();
        assert_eq!(
            live.signatures(),
            read(std::slice::from_ref(&file), &[]).signatures(),
            "{capture} via fstrm_replay TCP"
        );
    }
    let dir = TempDir::new("unix");
    let sock = dir.join("tap.sock");
    let served = Analyser::serve_unix(&sock, &[]);
    let file = coredns_fixture("h_burst_5k.fstrm");
    run_sender(&mut fstrm_replay_unix(&sock, &file));
    let live = served.stop();
    assert_eq!(
        live.signatures(),
        read(&[file], &[]).signatures(),
        "h_burst_5k via unix socket"
    );
    assert!(!sock.exists(), "the socket file is removed on exit");
}

#[test]
fn a_silent_stream_is_flushed_by_the_wall_clock() {
    let served = Analyser::serve_tcp(&["--session-timeout", "1"]);
    let file = coredns_fixture("g_timeout.fstrm");
    // dnstap -T ends its stream with STOP; the timed-out sessions are still pending after it.
    run_sender(&mut go_dnstap_tcp(&served.addr(), &file));
    // The idle flush emits them about 5 s (IDLE_LAG) after the stream went quiet, without
    // any further traffic and before any shutdown.
    assert!(
        served.wait_for_lines(3, Duration::from_secs(60)),
        "pending sessions were not flushed while the stream was silent"
    );
    let out = served.stop();
    assert_eq!(out.counts().get("Failed/5"), Some(&2), "{:?}", out.counts());
}

fn control(kind: u32, types: &[&[u8]]) -> Vec<u8> {
    let body_len = 4 + types.iter().map(|t| 8 + t.len()).sum::<usize>();
    let mut v = Vec::new();
    v.extend_from_slice(&0u32.to_be_bytes());
    v.extend_from_slice(&(body_len as u32).to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    for t in types {
        v.extend_from_slice(&1u32.to_be_bytes());
        v.extend_from_slice(&(t.len() as u32).to_be_bytes());
        v.extend_from_slice(t);
    }
    v
}

fn established() -> Vec<u8> {
    control(2, &[b"protobuf:dnstap.Dnstap"]) // unidirectional START
}

/// Sends `bytes` on a new connection and closes it (or keeps it open for `hold`).
fn send_bad(addr: &str, bytes: &[u8], hold: Duration) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let _ = s.write_all(bytes);
    std::thread::sleep(hold);
    s
}

#[test]
fn bad_input_on_other_connections_leaves_the_good_stream_exact() {
    let served = Analyser::serve_tcp(&["--max-frame-size", "4096", "--max-connections", "20"]);
    let addr = served.addr();
    let file = coredns_fixture("h_burst_5k.fstrm");
    let good = {
        let (port, file) = (served.port(), file.clone());
        std::thread::spawn(move || run_sender(&mut fstrm_replay_tcp(port, &file)))
    };
    // A stalled handshake and idle connections up to the limit, held while the rest runs.
    let mut held = vec![send_bad(&addr, b"", Duration::ZERO)];
    for _ in 0..10 {
        held.push(send_bad(&addr, &established(), Duration::ZERO));
    }
    send_bad(
        &addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_millis(50),
    );
    send_bad(
        &addr,
        &control(4, &[b"protobuf:other.Thing"]),
        Duration::from_millis(50),
    );
    let mut huge_control = 0u32.to_be_bytes().to_vec();
    huge_control.extend_from_slice(&4000u32.to_be_bytes());
    send_bad(&addr, &huge_control, Duration::from_millis(50));
    let mut oversized = established();
    oversized.extend_from_slice(&100_000u32.to_be_bytes());
    send_bad(&addr, &oversized, Duration::from_millis(50));
    let mut undecodable = established();
    for payload in [&b"\xff\xff\xff\xff"[..], b"not a protobuf at all"] {
        undecodable.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        undecodable.extend_from_slice(payload);
    }
    undecodable.extend_from_slice(&control(3, &[]));
    send_bad(&addr, &undecodable, Duration::from_millis(50));
    let mut truncated = established();
    truncated.extend_from_slice(&100u32.to_be_bytes());
    truncated.extend_from_slice(b"only part of it");
    send_bad(&addr, &truncated, Duration::from_millis(50));
    good.join().unwrap();
    // Now past --max-connections: the extra ones are refused and counted.
    for _ in 0..15 {
        held.push(send_bad(&addr, &established(), Duration::ZERO));
    }
    // The stalled handshake ends at its 5 s deadline, while the others are still held.
    let metrics = served.metrics_addr();
    wait_until(
        "the stalled handshake to time out",
        Duration::from_secs(60),
        || {
            Exposition::parse(&scrape_text(&metrics)).sum(
                "dnstap_analyser_discarded_connections_total",
                &[("reason", "handshake_timeout")],
            ) > 0.0
        },
    );
    drop(held);
    let out = served.stop();
    assert_eq!(
        out.signatures(),
        read(&[file], &[]).signatures(),
        "the good stream stays exact"
    );
    for reason in [
        "bad_stream",
        "content_type",
        "protobuf_undecodable",
        "truncated_frame",
        "handshake_timeout",
        "connection_limit",
    ] {
        assert!(
            out.discarded(reason) > 0,
            "{reason} not counted: {}",
            out.summary
        );
    }
    assert!(out.stderr.contains("warning"), "problems are logged");
}

/// Splits a capture into two Frame Streams files by DNS id parity: every request stays on one
/// connection, as when CoreDNS opens a second connection while the first still delivers.
fn split_by_id(file: &std::path::Path, dir: &std::path::Path) -> [std::path::PathBuf; 2] {
    use dnstap_analyser::framestream::{
        self, ControlKind, Frame, FrameDecoder, DNSTAP_CONTENT_TYPE,
    };
    let mut buf = bytes::BytesMut::from(&std::fs::read(file).unwrap()[..]);
    let mut out = [Vec::new(), Vec::new()];
    for o in &mut out {
        framestream::encode_control(ControlKind::Start, &[DNSTAP_CONTENT_TYPE], o);
    }
    let dec = FrameDecoder::new(1 << 20);
    while let Some(frame) = dec.decode(&mut buf).unwrap() {
        let Frame::Data(d) = frame else { continue };
        let m = dnstap_analyser::dnstap::scan(&d).unwrap().message.unwrap();
        let wire = m.query_message.or(m.response_message).unwrap();
        framestream::encode_data(&d, &mut out[(wire[1] & 1) as usize]);
    }
    let paths = [dir.join("even.fstrm"), dir.join("odd.fstrm")];
    for (o, p) in out.iter_mut().zip(&paths) {
        framestream::encode_control(ControlKind::Stop, &[], o);
        std::fs::write(p, o).unwrap();
    }
    paths
}

#[test]
fn two_live_connections_with_the_same_identity_are_both_served() {
    let file = coredns_fixture("h_burst_5k.fstrm");
    let dir = TempDir::new("split");
    let parts = split_by_id(&file, dir.path());
    let served = Analyser::serve_tcp(&[]);
    let senders: Vec<_> = parts
        .iter()
        .map(|part| {
            let (port, part) = (served.port(), part.clone());
            std::thread::spawn(move || run_sender(&mut fstrm_replay_tcp(port, &part)))
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let live = served.stop();
    assert_eq!(
        live.signatures(),
        read(&[file], &[]).signatures(),
        "both connections of identity vm are joined in full"
    );
    assert_eq!(live.summary["connections"], 2);
}

#[test]
fn files_written_by_the_go_dnstap_cli_read_like_the_captures() {
    let file = coredns_fixture("k_bind_tcp.fstrm");
    let dir = TempDir::new("rewrite");
    let out = dir.join("rewritten.fstrm");
    run_sender(&mut go_dnstap_rewrite(&file, &out));
    let rewritten = read(std::slice::from_ref(&out), &[]);
    assert_eq!(rewritten.signatures(), read(&[file], &[]).signatures());
    assert_eq!(rewritten.sessions.len(), 4);
}

/// The rule every tier follows: a missing tool fails the test naming the package to install.
#[test]
#[should_panic(expected = "install the Debian package `no-such-package`")]
fn a_missing_tool_fails_naming_its_debian_package() {
    require_binary("no-such-tool-for-dnstap-tests", "no-such-package");
}
