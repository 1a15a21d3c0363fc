//! Frame Streams over TLS and mTLS (issue #11): real senders (unbound's `dnstap-tls`,
//! `openssl s_client`) and an in-process rustls client that misbehaves step by step. Every
//! certificate is made inside the test (rcgen); none is committed.
//!
//! Needs the Debian packages unbound, nsd, dnsutils and openssl (.ci/apt-packages). A missing
//! one fails the test naming the package.

mod support;

use serde_json::Value;
use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;
use support::*;

/// A TLS 1.3 sender and a TLS 1.2 sender give exactly the sessions of their captures, like a
/// plaintext sender on the listener beside them.
#[test]
fn tls_senders_give_the_sessions_of_their_captures() {
    let dir = TempDir::new("tls-exact");
    let ca = TestCa::new("exact");
    let server = ca.server_cert(dir.path(), "server");
    let ca_pem = ca.write_ca(dir.path());
    for (what, config) in [
        ("TLS 1.3", client_config(&ca_pem, None)),
        ("TLS 1.2", client_config_tls12(&ca_pem)),
    ] {
        let t = TlsAnalyser::serve(&server, None, &[]);
        let burst = coredns_fixture("h_burst_5k.fstrm");
        let mut c = tls_connect(t.tls_port, config);
        send_capture(&mut c, &burst).unwrap();
        c.conn.send_close_notify();
        c.flush().unwrap();
        drop(c);
        // The plaintext listener beside it still serves (another sender identity).
        let small = fixture("unbound", "a_noerror.fstrm");
        run_sender(&mut fstrm_replay_tcp(t.an.port(), &small));
        let out = t.an.stop();
        let mut want = read(&[burst], &[]).signatures();
        want.extend(read(&[small], &[]).signatures());
        want.sort();
        assert_eq!(out.signatures(), want, "{what}");
        assert_eq!(tls_count(&out, "handshakes"), 1, "{what}");
        assert_eq!(closed(&out, "stopped"), 2, "{what}");
    }
}

/// Plaintext on the TLS port, stalled handshakes, close_notify at odd points and a corrupt
/// record are closed and each counted under its reason, while a good TLS stream stays exact.
#[test]
fn hostile_tls_clients_are_closed_and_counted() {
    let dir = TempDir::new("tls-hostile");
    let ca = TestCa::new("hostile");
    let server = ca.server_cert(dir.path(), "server");
    let ca_pem = ca.write_ca(dir.path());
    // The stalled handshakes end at this deadline; the good ones must beat it, TLS and Frame
    // Streams handshakes of a client and an analyser starved on a loaded machine included
    // (1 s was not always enough).
    let t = TlsAnalyser::serve(&server, None, &["--handshake-timeout", "5"]);
    let port = t.tls_port;
    let config = client_config(&ca_pem, None);

    // The good stream, while the others misbehave.
    let burst = coredns_fixture("h_burst_5k.fstrm");
    let good = {
        let (config, burst) = (config.clone(), burst.clone());
        thread::spawn(move || {
            let mut c = tls_connect(port, config);
            send_capture(&mut c, &burst).unwrap();
        })
    };

    // Plaintext Frame Streams on the TLS port: tls_handshake.
    let mut plain = TcpStream::connect(("127.0.0.1", port)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    plain.write_all(&control(FS_READY, true)).unwrap();
    assert!(closed_by_peer(&mut plain), "plaintext on the TLS port");

    // Stalled: nothing at all, and half a TLS record header: handshake_timeout twice.
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut half = TcpStream::connect(("127.0.0.1", port)).unwrap();
    half.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    half.write_all(&[22, 3, 1]).unwrap();
    assert!(closed_by_peer(&mut silent), "silent connection");
    assert!(closed_by_peer(&mut half), "stalled handshake");

    // A close_notify alert before any handshake, then the end: peer_closed.
    let mut early = TcpStream::connect(("127.0.0.1", port)).unwrap();
    early.write_all(&[21, 3, 3, 0, 2, 1, 0]).unwrap();
    drop(early);

    // close_notify right after the TLS handshake: peer_closed.
    let mut c = tls_connect(port, config.clone());
    handshake(&mut c).unwrap();
    c.conn.send_close_notify();
    c.flush().unwrap();
    drop(c);

    // close_notify inside a data frame: peer_closed, and the frame is a truncated_frame.
    let mut c = tls_connect(port, config.clone());
    fs_ready(&mut c).unwrap();
    c.write_all(&control(FS_START, true)).unwrap();
    c.write_all(&[0, 0, 0, 100, 1, 2, 3]).unwrap();
    c.conn.send_close_notify();
    c.flush().unwrap();
    // The rustls client reads nothing more once it has sent close_notify: watch the socket.
    assert!(closed_by_peer(&mut c.sock), "close_notify mid-frame");
    drop(c);

    // A record that does not decrypt after the handshake: tls_error.
    let mut c = tls_connect(port, config.clone());
    fs_ready(&mut c).unwrap();
    let mut forged = vec![23, 3, 3, 0, 40];
    forged.extend([0x5a; 40]);
    c.sock.write_all(&forged).unwrap();
    assert!(closed_by_peer(&mut c), "corrupt record");

    good.join().unwrap();
    wait_until(
        "every connection to the TLS port to be closed",
        Duration::from_secs(20),
        || tcp_connections_to(port) == 0,
    );
    let out = t.an.stop();
    assert_eq!(
        out.signatures(),
        read(&[burst], &[]).signatures(),
        "the good TLS stream"
    );
    assert_eq!(closed(&out, "tls_handshake"), 1, "{}", out.stderr);
    assert_eq!(closed(&out, "handshake_timeout"), 2, "{}", out.stderr);
    assert_eq!(closed(&out, "peer_closed"), 3, "{}", out.stderr);
    assert_eq!(closed(&out, "tls_error"), 1, "{}", out.stderr);
    assert_eq!(closed(&out, "stopped"), 1, "{}", out.stderr);
    assert_eq!(out.discarded("truncated_frame"), 1);
    assert_eq!(out.discarded("handshake_timeout"), 2);
    // The good one, close_notify after the handshake, mid-frame, corrupt record.
    assert_eq!(tls_count(&out, "handshakes"), 4);
    assert!(
        out.stderr.contains("no TLS handshake within 5s"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("TLS handshake failed"),
        "{}",
        out.stderr
    );
}

/// mTLS: a sender without a certificate, with one from another CA, or with an expired one is
/// refused and counted (tls_client_cert); one with a valid certificate streams exactly.
#[test]
fn mtls_refuses_senders_the_client_ca_does_not_vouch_for() {
    let dir = TempDir::new("mtls");
    let ca = TestCa::new("mtls");
    let other = TestCa::new("other");
    let server = ca.server_cert(dir.path(), "server");
    let ca_pem = ca.write_ca(dir.path());
    let t = TlsAnalyser::serve(&server, Some(&ca_pem), &[]);
    let valid = ca.client_cert(dir.path(), "valid", false);
    let expired = ca.client_cert(dir.path(), "expired", true);
    let stranger = other.client_cert(dir.path(), "stranger", false);

    for (what, client) in [
        ("no certificate", None),
        ("another CA's certificate", Some(&stranger)),
        ("an expired certificate", Some(&expired)),
    ] {
        let mut c = tls_connect(t.tls_port, client_config(&ca_pem, client));
        // TLS 1.3: the client finishes first; the refusal comes as an alert after it.
        let _ = handshake(&mut c);
        assert!(closed_by_peer(&mut c), "{what} was not refused");
    }

    let burst = coredns_fixture("h_burst_5k.fstrm");
    let mut c = tls_connect(t.tls_port, client_config(&ca_pem, Some(&valid)));
    send_capture(&mut c, &burst).unwrap();
    drop(c);
    let out = t.an.stop();
    assert_eq!(out.signatures(), read(&[burst], &[]).signatures());
    assert_eq!(closed(&out, "tls_client_cert"), 3, "{}", out.stderr);
    assert_eq!(closed(&out, "stopped"), 1);
    for why in [
        "sent no certificates",
        "UnknownIssuer",
        "certificate expired",
    ] {
        assert!(out.stderr.contains(why), "no {why} logged:\n{}", out.stderr);
    }
}

/// `--tls-pin-identity`: a certificate valid for the capture's identity (`vm`) streams exactly;
/// one valid for another name cannot speak for `vm`: every message is dropped and counted
/// (identity_not_certified), and no session of `vm` comes out.
#[test]
fn a_pinned_certificate_speaks_only_for_its_own_identity() {
    let dir = TempDir::new("mtls-pin");
    let ca = TestCa::new("pin");
    let server = ca.server_cert(dir.path(), "server");
    let ca_pem = ca.write_ca(dir.path());
    let vm = ca.client_cert_for(dir.path(), "vm", &["vm"]);
    let impostor = ca.client_cert_for(dir.path(), "impostor", &["coredns-other"]);
    let burst = coredns_fixture("h_burst_5k.fstrm");
    let expected = read(std::slice::from_ref(&burst), &[]);

    for (client, speaks) in [(&vm, true), (&impostor, false)] {
        let t = TlsAnalyser::serve(&server, Some(&ca_pem), &["--tls-pin-identity"]);
        let mut c = tls_connect(t.tls_port, client_config(&ca_pem, Some(client)));
        send_capture(&mut c, &burst).unwrap();
        drop(c);
        let out = t.an.stop();
        let refused = out.discarded("identity_not_certified");
        if speaks {
            assert_eq!(out.signatures(), expected.signatures());
            assert_eq!(refused, 0, "{}", out.summary);
        } else {
            assert!(
                out.signatures().is_empty(),
                "the impostor's sessions came out"
            );
            assert_eq!(
                Some(refused),
                expected.summary_messages(),
                "{}",
                out.summary
            );
            assert!(
                out.stderr
                    .contains("\"vm\" is not a name its client certificate"),
                "no log line:\n{}",
                out.stderr
            );
        }
    }
}

/// `openssl s_client -tls1_2` asking to renegotiate: rustls refuses, openssl gives up with a
/// fatal alert, and the connection is closed and counted (tls_error).
#[test]
fn a_renegotiation_attempt_is_closed_and_counted() {
    let openssl = require_binary("openssl", "openssl");
    let dir = TempDir::new("reneg");
    let ca = TestCa::new("reneg");
    let server = ca.server_cert(dir.path(), "server");
    let ca_pem = ca.write_ca(dir.path());
    let t = TlsAnalyser::serve(&server, None, &[]);
    // s_client takes its R command only without -ign_eof, and quits at the end of its input:
    // the input stays open until the refusal has ended it.
    let (log, err) = (dir.join("s_client.out"), dir.join("s_client.err"));
    let mut child = Command::new(openssl)
        .args(["s_client", "-tls1_2", "-servername", "localhost"])
        .arg("-connect")
        .arg(format!("127.0.0.1:{}", t.tls_port))
        .arg("-CAfile")
        .arg(&ca_pem)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(b"R\n").unwrap();
    let status = wait_child(&mut child, Duration::from_secs(30));
    let _ = child.kill();
    drop(input);
    let said = fs::read_to_string(&log).unwrap() + &fs::read_to_string(&err).unwrap();
    assert!(status.is_some(), "s_client still runs after R:\n{said}");
    assert!(said.contains("RENEGOTIATING"), "{said}");
    wait_until(
        "the renegotiating connection to be closed",
        Duration::from_secs(20),
        || tcp_connections_to(t.tls_port) == 0,
    );
    let out = t.an.stop();
    assert_eq!(closed(&out, "tls_error"), 1, "{said}\n{}", out.stderr);
    assert_eq!(tls_count(&out, "handshakes"), 1);
}

/// New files are used by new handshakes (kubelet-style symlink swap); a connection opened
/// before keeps streaming; a broken new set keeps the previous certificate, logged and counted.
#[test]
fn certificates_rotate_without_dropping_connections() {
    let dir = TempDir::new("rotate");
    let ca = TestCa::new("rotate");
    let ca_pem = ca.write_ca(dir.path());
    let generation = |n: u32| {
        let gen = dir.join(&format!("gen{n}"));
        fs::create_dir_all(&gen).unwrap();
        let files = ca.server_cert(&gen, "tls");
        (gen, files)
    };
    let (gen1, first) = generation(1);
    let current = dir.join("current");
    std::os::unix::fs::symlink(&gen1, &current).unwrap();
    let mounted = CertFiles {
        cert: current.join("tls.pem"),
        key: current.join("tls.key"),
    };
    let swap_to = |gen: &std::path::Path| {
        let next = dir.join("current.next");
        let _ = fs::remove_file(&next);
        std::os::unix::fs::symlink(gen, &next).unwrap();
        fs::rename(&next, &current).unwrap();
    };
    let t = TlsAnalyser::serve(&mounted, None, &[]);
    let config = client_config(&ca_pem, None);

    let mut before = tls_connect(t.tls_port, config.clone());
    fs_ready(&mut before).unwrap();
    assert_eq!(presented_cert(&before), pem_der(&first.cert));

    let (gen2, second) = generation(2);
    swap_to(&gen2);
    wait_until(
        "a new connection to get the new certificate",
        Duration::from_secs(20),
        || {
            let mut c = tls_connect(t.tls_port, config.clone());
            handshake(&mut c).unwrap();
            presented_cert(&c) == pem_der(&second.cert)
        },
    );

    // A broken set: a certificate whose key is another one's.
    let gen3 = dir.join("gen3");
    fs::create_dir_all(&gen3).unwrap();
    let stray = ca.server_cert(&gen3, "stray");
    fs::copy(&stray.cert, gen3.join("tls.pem")).unwrap();
    fs::copy(&first.key, gen3.join("tls.key")).unwrap();
    swap_to(&gen3);
    // New connections look at the files at most once a second: connect until one has seen
    // the broken set, each getting the kept certificate.
    wait_until(
        "a new connection to find the broken set",
        Duration::from_secs(60),
        || {
            let mut after = tls_connect(t.tls_port, config.clone());
            handshake(&mut after).unwrap();
            assert_eq!(presented_cert(&after), pem_der(&second.cert), "kept");
            t.an.stderr_so_far()
                .contains("TLS certificate not reloaded")
        },
    );

    // The connection from before the rotations streams to the end.
    let capture = coredns_fixture("b_forward.fstrm");
    let bytes = fs::read(&capture).unwrap();
    before.write_all(&bytes).unwrap();
    let want = control(FS_FINISH, false);
    let mut got = vec![0; want.len()];
    std::io::Read::read_exact(&mut before, &mut got).unwrap();
    assert_eq!(got, want);
    drop(before);

    let out = t.an.stop();
    assert_eq!(out.signatures(), read(&[capture], &[]).signatures());
    assert_eq!(tls_count(&out, "cert_reloads"), 1, "{}", out.stderr);
    assert_eq!(tls_count(&out, "cert_reload_errors"), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("TLS certificate not reloaded"),
        "{}",
        out.stderr
    );
    assert_eq!(closed(&out, "stopped"), 1);
}

// ---------------------------------------------------------------------------------------------
// unbound over TLS and mTLS
// ---------------------------------------------------------------------------------------------

/// unbound sends dnstap over TLS: the plaintext live test's scenarios, the same sessions.
#[test]
fn unbound_tls_sessions() {
    let dir = TempDir::new("unbound-tls");
    let ca = TestCa::new("unbound");
    let server = ca.server_cert(dir.path(), "server");
    let ca_pem = ca.write_ca(dir.path());
    let t = TlsAnalyser::serve(&server, None, &[]);
    let tls = UnboundTls {
        ca_bundle: &ca_pem,
        client: None,
    };
    let out = unbound_scenarios(&dir, t, &tls, |_| {});
    assert_eq!(tls_count(&out, "handshakes"), 1, "{}", out.stderr);
}

/// unbound sends dnstap over mTLS; meanwhile `openssl s_client` without a certificate and with
/// one from another CA are refused, and unbound's stream keeps flowing.
#[test]
fn unbound_mtls_sessions_while_strangers_are_refused() {
    let openssl = require_binary("openssl", "openssl");
    let dir = TempDir::new("unbound-mtls");
    let ca = TestCa::new("unbound");
    let other = TestCa::new("other");
    let server = ca.server_cert(dir.path(), "server");
    let ca_pem = ca.write_ca(dir.path());
    let client = ca.client_cert(dir.path(), "unbound-client", false);
    let stranger = other.client_cert(dir.path(), "stranger", false);
    let t = TlsAnalyser::serve(&server, Some(&ca_pem), &[]);
    let tls = UnboundTls {
        ca_bundle: &ca_pem,
        client: Some(&client),
    };
    let tls_port = t.tls_port;
    let out = unbound_scenarios(&dir, t, &tls, |_| {
        for (version, cert) in [("-tls1_3", None), ("-tls1_2", Some(&stranger))] {
            let mut cmd = Command::new(&openssl);
            cmd.args(["s_client", version, "-servername", "localhost", "-quiet"])
                .arg("-connect")
                .arg(format!("127.0.0.1:{tls_port}"))
                .arg("-CAfile")
                .arg(&ca_pem)
                .stdin(Stdio::null());
            if let Some(c) = cert {
                cmd.arg("-cert").arg(&c.cert).arg("-key").arg(&c.key);
            }
            // The analyser's refusal ends s_client; a stream would keep it waiting on -ign_eof.
            cmd.arg("-ign_eof");
            run_to_end(&mut cmd, None, Duration::from_secs(30));
        }
    });
    assert_eq!(closed(&out, "tls_client_cert"), 2, "{}", out.stderr);
    assert_eq!(tls_count(&out, "handshakes"), 1, "unbound's only");
}

/// Starts unbound sending to `t`'s TLS port, calls `meanwhile` once its stream is up, runs the
/// standard scenarios, stops, and checks the sessions of the plaintext unbound live test.
fn unbound_scenarios(
    dir: &TempDir,
    t: TlsAnalyser,
    tls: &UnboundTls<'_>,
    meanwhile: impl FnOnce(&TlsAnalyser),
) -> Output {
    let silent = SilentUpstream::start();
    let nsd = start_nsd(dir);
    let mut ub = start_unbound_tls(dir, (nsd.port, silent.port), t.tls_port, tls);
    wait_stream_flowing(&t.an, &mut ub);
    let port = ub.port;
    meanwhile(&t);
    run_standard_queries(&mut ub.server, port, "SERVFAIL");
    let attempts = unbound_silent_query(port, &silent);
    wait_for_unbound_scenarios(&t.an, attempts);
    ub.server.stop();

    let out = t.an.stop_unchecked();
    out.save(&dir.join("sessions.jsonl"));
    out.assert_clean("unbound over TLS");
    let sessions: Vec<Value> = out
        .sessions
        .iter()
        .filter(|s| s_qname(s) != PROBE)
        .cloned()
        .collect();
    let expected = unbound_expected(nsd.port, silent.port, attempts);
    assert_sessions("unbound over TLS", &sessions, &expected);
    out
}
