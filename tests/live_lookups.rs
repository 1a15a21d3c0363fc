//! Lookups with real resolvers: a small C program calling `getaddrinfo`, built against glibc and
//! against musl, resolves names through two real CoreDNS servers on 127.0.0.1:53 and
//! 127.0.0.2:53 inside a private network and mount namespace (`unshare -n -m`: its own
//! loopback, its own /etc/resolv.conf through a bind mount). CoreDNS streams dnstap to
//! `fstrm_capture`; the analyser reads both captures and must print exactly the lookups the
//! C libraries' documented behaviour gives (tests/support/lookups.rs).
//!
//!   resolve-glibc / resolve-musl --UDP 53--> CoreDNS lookups-one (127.0.0.1) --dnstap--> one.fstrm
//!                                       `--> CoreDNS lookups-two (127.0.0.2) --dnstap--> two.fstrm
//!
//! The test re-runs this test binary inside the namespace (`inside_a_private_namespace`, which
//! does nothing elsewhere). It needs root, `COREDNS` (else SKIPPED), gcc, musl-gcc
//! (musl-tools), ip and ss (iproute2), nft (nftables), fstrm_capture (fstrm-bin).
//! The capture of one run is committed in tests/fixtures/lookups/ and checked from a plain clone
//! by `lookups_from_the_committed_capture`.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::*;

/// Set to the scenario's directory for the run inside the namespace.
const INNER_DIR: &str = "DNSTAP_LOOKUPS_INNER_DIR";
/// Set to a directory to keep the capture of a live run there (tests/fixtures/lookups/).
const SAVE_TO: &str = "DNSTAP_LOOKUPS_SAVE";
const INNER_TEST: &str = "inside_a_private_namespace";

#[test]
fn lookups_of_real_resolvers_through_real_coredns() {
    let Some(coredns) = coredns_binary() else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: live lookup test did not run: set COREDNS=/path/to/coredns (.ci/run does)"
        );
        return;
    };
    let unshare = require_binary("unshare", "util-linux");
    for (tool, package) in [
        ("ip", "iproute2"),
        ("ss", "iproute2"),
        ("nft", "nftables"),
        ("fstrm_capture", "fstrm-bin"),
        ("mount", "mount"),
    ] {
        require_binary(tool, package);
    }
    let dir = TempDir::new("lookups");
    build_resolvers(dir.path());
    for (n, bind, tap, identity) in [
        ("one", "127.0.0.1", 6001, IDENTITY_ONE),
        ("two", "127.0.0.2", 6002, IDENTITY_TWO),
    ] {
        let vars = [
            ("BIND", bind.to_string()),
            ("TAP", tap.to_string()),
            ("IDENTITY", identity.to_string()),
        ];
        render_to("lookups/Corefile", &dir, &format!("Corefile.{n}"), &vars);
    }
    let resolv = |servers: &str, options: &str| {
        format!("{servers}search {SEARCH}\noptions ndots:5{options}\n")
    };
    let one_server = resolv("nameserver 127.0.0.1\n", "");
    let two_servers = resolv("nameserver 127.0.0.1\nnameserver 127.0.0.2\n", " rotate");
    std::fs::write(dir.join("resolv.conf"), one_server).unwrap();
    std::fs::write(dir.join("resolv.rotate.conf"), two_servers).unwrap();

    let exe = std::env::current_exe().unwrap();
    let mut inner = Command::new(unshare);
    inner
        .args(["-n", "-m", "--"])
        .arg(exe)
        .args(["--exact", INNER_TEST, "--include-ignored", "--nocapture"])
        .env(INNER_DIR, dir.path())
        .env("COREDNS", coredns);
    let out = run_to_end(&mut inner, None, Duration::from_secs(180));
    assert!(
        out.status.success(),
        "the scenario in the namespace failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        tail(&text(&out.stderr), 60)
    );
    let results = std::fs::read_to_string(dir.join("resolvers.txt")).unwrap();
    check_resolver_results(&results);

    if let Some(to) = std::env::var_os(SAVE_TO) {
        let to = PathBuf::from(to);
        for f in ["lookups-one.fstrm", "lookups-two.fstrm", "resolvers.txt"] {
            std::fs::copy(dir.join(f), to.join(f)).unwrap();
        }
    }
    let captures = [dir.join("lookups-one.fstrm"), dir.join("lookups-two.fstrm")];
    let out = read(&captures, &ANALYSER_ARGS);
    out.save(&dir.join("analyser.jsonl"));
    check_lookups(&out.lookups, &out.sessions, "live capture");
    check_lookup_summary(&out.summary, "live capture");
}

#[test]
fn lookups_from_the_committed_capture() {
    let files = [
        fixture("lookups", "lookups-one.fstrm"),
        fixture("lookups", "lookups-two.fstrm"),
    ];
    let out = read(&files, &ANALYSER_ARGS);
    check_lookups(&out.lookups, &out.sessions, "tests/fixtures/lookups");
    check_lookup_summary(&out.summary, "tests/fixtures/lookups");
    let results = std::fs::read_to_string(fixture("lookups", "resolvers.txt")).unwrap();
    check_resolver_results(&results);
}

/// The application's side: what getaddrinfo returned, and how long the dropped query took.
fn check_resolver_results(results: &str) {
    let rc = |name: &str| {
        let line = results
            .lines()
            .find(|l| l.split(' ').next() == Some(name))
            .unwrap_or_else(|| panic!("no result for {name} in:\n{results}"));
        let ms: u64 = line.rsplit("ms=").next().unwrap().trim().parse().unwrap();
        (line.contains("rc=0 "), ms)
    };
    for name in [
        "slow",
        "web",
        "api.example.test",
        "abs.example.test.",
        "svc1",
        "svc5",
        "metrics",
        "mapi.example.test",
        "nodata",
        "rot.example.test",
        "ndots.example.test",
        "auto.example.test",
    ] {
        assert!(rc(name).0, "{name} must resolve:\n{results}");
    }
    assert!(!rc("nothere.example.test").0, "{results}");
    assert!(!rc("nodatam").0, "musl stops at NODATA:\n{results}");
    assert!(
        rc("slow").1 >= 4500,
        "glibc waited out its timeout:\n{results}"
    );
}

/// The C program against glibc and, statically, against musl.
fn build_resolvers(dir: &Path) {
    let src = live_dir().join("lookups/resolve.c");
    let gcc = require_binary("gcc", "build-essential");
    let musl = require_binary("musl-gcc", "musl-tools");
    run_ok(
        Command::new(gcc)
            .args(["-O2", "-pthread", "-o"])
            .arg(dir.join("resolve-glibc"))
            .arg(&src),
        Duration::from_secs(60),
    );
    run_ok(
        Command::new(musl)
            .args(["-static", "-O2", "-o"])
            .arg(dir.join("resolve-musl"))
            .arg(&src),
        Duration::from_secs(60),
    );
}

/// The scenario, inside the namespace: loopback up, resolv.conf mounted, two captures, two
/// CoreDNS, then the clients in the order of `expected_lookups`.
#[test]
#[ignore = "run by lookups_of_real_resolvers_through_real_coredns inside `unshare -n -m`"]
fn inside_a_private_namespace() {
    let Some(dir) = std::env::var_os(INNER_DIR).map(PathBuf::from) else {
        return;
    };
    let coredns = coredns_binary().expect("COREDNS");
    let sh = |args: &[&str]| {
        let (cmd, rest) = args.split_first().unwrap();
        run_ok(Command::new(cmd).args(rest), Duration::from_secs(20));
    };
    sh(&["ip", "link", "set", "lo", "up"]);
    let resolv = dir.join("resolv.conf");
    sh(&[
        "mount",
        "--bind",
        resolv.to_str().unwrap(),
        "/etc/resolv.conf",
    ]);

    let mut servers = Vec::new();
    for (n, port) in [("one", 6001), ("two", 6002)] {
        let mut cmd = Command::new(require_binary("fstrm_capture", "fstrm-bin"));
        cmd.args(["-t", "protobuf:dnstap.Dnstap", "-a", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg("-w")
            .arg(dir.join(format!("lookups-{n}.fstrm")));
        let capture = Server::spawn(
            &format!("fstrm_capture {n}"),
            cmd,
            dir.join(format!("capture-{n}.log")),
        );
        wait_until("fstrm_capture listening", Duration::from_secs(10), || {
            sockets(&format!("sport = :{port}"), "-l")
        });
        let mut cmd = Command::new(&coredns);
        cmd.arg("-conf").arg(dir.join(format!("Corefile.{n}")));
        let server = Server::spawn(
            &format!("coredns {n}"),
            cmd,
            dir.join(format!("coredns-{n}.log")),
        );
        // Queries before dnstap is connected would leave no frames.
        wait_until(
            "CoreDNS's dnstap connection",
            Duration::from_secs(20),
            || sockets(&format!("dport = :{port}"), ""),
        );
        servers.push((server, capture));
    }

    let glibc = dir.join("resolve-glibc");
    let musl = dir.join("resolve-musl");
    let mut results = String::new();
    let mut resolve = |bin: &Path, args: &[&str], env: Option<(&str, &str)>| {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        results.push_str(&text(&run_ok(&mut cmd, Duration::from_secs(60)).stdout));
    };
    // The second UDP query to port 53 from here on (slow's AAAA) is lost on its way in.
    sh(&["nft", "add", "table", "inet", "lookups"]);
    sh(&[
        "nft",
        "add chain inet lookups input { type filter hook input priority 0; }",
    ]);
    sh(&[
        "nft",
        "add rule inet lookups input udp dport 53 numgen inc mod 1000 == 1 drop",
    ]);
    resolve(&glibc, &["slow"], None);
    sh(&["nft", "delete", "table", "inet", "lookups"]);
    let names = [
        "web",
        "api.example.test",
        "nothere.example.test",
        "abs.example.test.",
    ];
    resolve(&glibc, &names, None);
    resolve(
        &glibc,
        &["-c", "svc1", "svc2", "svc3", "svc4", "svc5"],
        None,
    );
    resolve(
        &glibc,
        &["metrics"],
        Some(("LOCALDOMAIN", SEARCH_KUBE_SYSTEM)),
    );
    resolve(&musl, &["mapi.example.test"], None);
    resolve(&glibc, &["nodata"], None);
    resolve(&musl, &["nodatam"], None);
    resolve(
        &glibc,
        &["ndots.example.test"],
        Some(("RES_OPTIONS", "ndots:2")),
    );
    resolve(&glibc, &["auto.example.test"], None);
    let rotate = dir.join("resolv.rotate.conf");
    sh(&[
        "mount",
        "--bind",
        rotate.to_str().unwrap(),
        "/etc/resolv.conf",
    ]);
    resolve(&glibc, &["rot.example.test"], None);

    // CoreDNS drops the messages still queued when SIGTERM comes (its dnstap writer picks
    // `quit` over a non-empty queue): wait until each stream has been quiet for longer than
    // its 1 s flush timer, then stop CoreDNS first (it ends the stream with STOP).
    for port in [6001, 6002] {
        wait_stream_quiet(port);
    }
    for (mut server, mut capture) in servers {
        server.stop();
        capture.stop();
    }
    std::fs::write(dir.join("resolvers.txt"), results).unwrap();
}

/// Whether `ss` lists a TCP socket matching `filter` (listening with `-l`, else established).
fn sockets(filter: &str, listening: &str) -> bool {
    let mut cmd = Command::new(require_binary("ss", "iproute2"));
    cmd.arg("-Htn");
    if listening.is_empty() {
        cmd.args(["state", "established"]);
    } else {
        cmd.arg(listening);
    }
    cmd.arg(filter);
    let out = run_to_end(&mut cmd, None, Duration::from_secs(10));
    !text(&out.stdout).trim().is_empty()
}

/// Waits until the capture's side of the dnstap connection on `port` has received nothing new
/// for 3 s: CoreDNS's 1 s flush timer, with room for a CoreDNS starved on a loaded machine to
/// run it late (1.5 s left it half a second), so everything sent is in.
fn wait_stream_quiet(port: u16) {
    let received = || {
        let mut cmd = Command::new(require_binary("ss", "iproute2"));
        cmd.args(["-Htni", "state", "established"])
            .arg(format!("sport = :{port}"));
        let out = text(&run_to_end(&mut cmd, None, Duration::from_secs(10)).stdout);
        out.split_whitespace()
            .find_map(|w| w.strip_prefix("bytes_received:"))
            .and_then(|n| n.parse::<u64>().ok())
    };
    let quiet = Duration::from_secs(3);
    let (mut last, mut since) = (received(), std::time::Instant::now());
    wait_until("a quiet dnstap stream", Duration::from_secs(20), || {
        let now = received();
        if now != last {
            (last, since) = (now, std::time::Instant::now());
        }
        since.elapsed() >= quiet
    });
}
