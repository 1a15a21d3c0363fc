//! `/top` and `dnstap-analyser top` on real CoreDNS captures: a serving analyser fed by
//! `fstrm_replay` lists the failing qnames, clients and upstreams with the counts the same
//! captures give offline, and the dominant cause of each. Fed by the load generator's pods, it
//! shows each sender's failure ratio, the qtypes and the time of each row's latest failure, and
//! `top` fits the terminal it runs in (a pty from `script`), or 80×24 off one.

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
    assert_eq!(empty["sessions"], 0, "{empty}");
    assert_eq!(empty["failure_ratio"], Value::Null, "{empty}");
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
    // One CoreDNS, `vm`: every session of both captures, 3 of them Failed.
    let vm = &doc["identities"][0];
    assert_eq!(vm["identity"], "vm", "{doc}");
    assert_eq!(vm["sessions"], printed as u64, "{doc}");
    assert_eq!(vm["failed"], 3, "{doc}");
    assert_eq!(doc["sessions"], printed as u64, "{doc}");
    assert_eq!(
        doc["qnames"][0]["qtypes"],
        serde_json::json!(["A"]),
        "{doc}"
    );

    // The same view as a table, from HOST:PORT alone.
    let table = top_once(&an.metrics_addr());
    assert!(
        !table.contains('\u{1b}'),
        "--once prints no escapes:\n{table}"
    );
    assert!(
        table.starts_with(&format!("{url}/top  updated ")),
        "{table}"
    );
    assert!(
        table.lines().nth(1).unwrap().starts_with(&format!(
            "3 failed of {printed} sessions ({:.1}%): upstream_timeout 2, upstream_error 1",
            300.0 / printed as f64
        )),
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
    assert_eq!(line("vm")[1..3], ["3", &printed.to_string()]);
    assert!(!table.contains("internal.test."), "{table}");
    an.stop();
}

#[test]
fn top_without_an_analyser_fails_naming_the_url() {
    let (_held, port) = refusing_port();
    let url = format!("http://127.0.0.1:{port}");
    for given in [url.clone(), format!("127.0.0.1:{port}")] {
        let out = run_to_end(
            Command::new(analyser_bin()).args(["top", "--once", "--url", &given]),
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
}

/// What the session lines of one sender, or one qname, say: sessions, Failed ones, and the
/// qtypes of those.
#[derive(Default, Debug)]
struct Seen {
    sessions: u64,
    failed: u64,
    qtypes: std::collections::BTreeSet<String>,
}

/// The screen of `top --once --url URL`, which must succeed.
fn top_once(url: &str) -> String {
    let out = run_to_end(
        Command::new(analyser_bin()).args(["top", "--once", "--url", url]),
        None,
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "top --once --url {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `qtypes` of a `/top` row, as a set.
fn qtypes(row: &Value) -> std::collections::BTreeSet<String> {
    row["qtypes"]
        .as_array()
        .unwrap_or_else(|| panic!("no qtypes in {row}"))
        .iter()
        .map(|q| q.as_str().unwrap().to_string())
        .collect()
}

/// Runs the shell `command` on a terminal: a pty of `script` (bsdutils), which copies what it
/// shows to its stdout.
fn on_a_terminal(command: &str) -> std::process::Output {
    let script = require_binary("script", "bsdutils");
    run_to_end(
        Command::new(script).args(["-qec", command, "/dev/null"]),
        None,
        Duration::from_secs(60),
    )
}

/// Lines of a terminal's output (`script` ends them with CR LF).
fn screen_lines(out: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(out);
    let text = text.strip_suffix("\r\n").unwrap_or(&text);
    text.split('\n')
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

#[test]
fn top_shows_senders_ratios_qtypes_and_times_of_load_generator_pods() {
    let an = Analyser::serve_tcp(&["--messages", "none", "--log-lookups", "none"]);
    let addr = an.metrics_addr();
    // HOST:PORT is a URL for the library too.
    let before = dnstap_analyser::metrics::top_client::fetch(&addr).expect("/top answers");
    let since = before["updated_at"].as_str().unwrap().to_string();
    // 3 pods; few names and clients, so that every key keeps an exact counter (K = 100).
    let sessions = 3000;
    let gen = run_to_end(
        Command::new(loadgen_bin())
            .args(["run", "--connect", &an.addr(), "--connect-timeout", "20"])
            .args(["--connections", "3", "--sessions", &sessions.to_string()])
            .args(["--names", "20", "--clients", "30", "--aaaa-share", "0.5"])
            .args(["--seed", "17"]),
        None,
        Duration::from_secs(120),
    );
    assert!(
        gen.status.success(),
        "loadgen failed:\n{}{}",
        String::from_utf8_lossy(&gen.stdout),
        String::from_utf8_lossy(&gen.stderr)
    );
    assert!(
        an.wait_for_lines(sessions, Duration::from_secs(60)),
        "sessions of the load: {} of {sessions}",
        an.sessions_so_far().len()
    );
    let lines = an.sessions_so_far();
    let mut by_identity: BTreeMap<String, Seen> = BTreeMap::new();
    let mut by_qname: BTreeMap<String, Seen> = BTreeMap::new();
    for s in &lines {
        let failed = s["status"] == "Failed";
        let qtype = s["qtype"].as_str().unwrap_or("other").to_string();
        for seen in [
            by_identity
                .entry(s["identity"].as_str().unwrap().into())
                .or_default(),
            by_qname
                .entry(s["qname"].as_str().unwrap().into())
                .or_default(),
        ] {
            seen.sessions += 1;
            if failed {
                seen.failed += 1;
                seen.qtypes.insert(qtype.clone());
            }
        }
    }
    let failed: u64 = by_identity.values().map(|s| s.failed).sum();
    assert_eq!(by_identity.len(), 3, "{:?}", by_identity.keys());
    assert!(failed > 0 && by_qname.values().any(|s| s.qtypes.len() == 2));

    // Shards publish every 100 ms: poll until the window holds every session.
    let mut doc = Value::Null;
    let complete = poll_until(Duration::from_secs(60), || {
        doc = dnstap_analyser::metrics::top_client::fetch(&addr).expect("/top answers");
        doc["sessions"].as_u64() >= Some(sessions as u64)
    });
    assert!(complete, "/top after the load: {doc}");
    assert_eq!(doc["sessions"], sessions as u64, "{doc}");
    assert_eq!(doc["failed"], failed, "{doc}");
    let ratio = failed as f64 / sessions as f64;
    assert_eq!(doc["failure_ratio"], ratio, "{doc}");
    let updated = doc["updated_at"].as_str().unwrap();
    // RFC 3339 UTC with nanoseconds: the strings sort as the times do. A row's time is the
    // second its latest failure happened in (`YYYY-MM-DDTHH:MM:SS` is 19 characters).
    let recent = |row: &Value| {
        let t = row["last_failed_at"].as_str().unwrap_or("");
        t.ends_with(".000000000Z") && since[..19] <= t[..19] && t <= updated
    };

    let identities = doc["identities"].as_array().unwrap();
    assert_eq!(identities.len(), 3, "{doc}");
    for row in identities {
        let name = row["identity"].as_str().unwrap();
        let seen = &by_identity[name];
        assert_eq!(row["sessions"], seen.sessions, "{name}: {row}");
        assert_eq!(row["failed"], seen.failed, "{name}: {row}");
        assert_eq!(row["error"], 0, "{name}: {row}");
        let want = seen.failed as f64 / seen.sessions as f64;
        assert_eq!(row["failure_ratio"], want, "{name}: {row}");
        assert_eq!(qtypes(row), seen.qtypes, "{name}: {row}");
        assert!(recent(row), "{name}: {since} .. {updated}: {row}");
    }
    let qnames = doc["qnames"].as_array().unwrap();
    assert!(!qnames.is_empty(), "{doc}");
    for row in qnames {
        let name = row["qname"].as_str().unwrap();
        let seen = &by_qname[name];
        assert_eq!(
            (&row["failed"], &row["error"]),
            (&seen.failed.into(), &0.into())
        );
        assert_eq!(qtypes(row), seen.qtypes, "{name}: {row}");
        assert!(recent(row), "{name}: {since} .. {updated}: {row}");
    }

    // Off a terminal: 80×24, every line within 80 columns, the tables filling the height.
    let screen = top_once(&addr);
    assert_eq!(screen.lines().count(), 24, "{screen}");
    assert!(screen.lines().all(|l| l.chars().count() <= 80), "{screen}");
    assert!(screen.lines().any(|l| l.ends_with('…')), "{screen}");
    for (name, seen) in &by_identity {
        let row = screen
            .lines()
            .find(|l| l.starts_with(name.as_str()))
            .unwrap_or_else(|| panic!("no row of {name} in:\n{screen}"));
        let words: Vec<&str> = row.split_whitespace().collect();
        let pct = format!("{:.1}%", seen.failed as f64 * 100.0 / seen.sessions as f64);
        let counts = [seen.failed.to_string(), seen.sessions.to_string(), pct];
        assert_eq!(words[1..4], counts, "{screen}");
    }
    // Each table gets a share of the height: none takes it all.
    for title in ["QNAME", "CLIENT", "UPSTREAM"] {
        assert!(screen.lines().any(|l| l.starts_with(title)), "{screen}");
    }

    // On a terminal, its size: a pty from `script`, sized with stty; the flags override it.
    let on_tty = |size: &str, flags: &str| {
        let command = format!(
            "stty {size}; {} top --once --url {addr} {flags}",
            analyser_bin().display()
        );
        let out = on_a_terminal(&command);
        assert!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        screen_lines(&out.stdout)
    };
    let tall = on_tty("cols 120 rows 40", "");
    assert_eq!(tall.len(), 40, "{tall:#?}");
    assert!(tall.iter().all(|l| l.chars().count() <= 120), "{tall:#?}");
    assert!(tall.iter().any(|l| l.chars().count() > 80), "{tall:#?}");
    let small = on_tty("cols 120 rows 40", "--width 60 --height 12");
    assert_eq!(small.len(), 12, "{small:#?}");
    assert!(small.iter().all(|l| l.chars().count() <= 60), "{small:#?}");

    // Redrawing: each screen fills the terminal to its last line, the footer, and never
    // scrolls (no newline after the footer). `timeout` ends it; the last screen may be cut.
    let command = format!(
        "stty cols 80 rows 20; timeout 4 {} top --interval 500ms --url {addr}",
        analyser_bin().display()
    );
    let text = String::from_utf8_lossy(&on_a_terminal(&command).stdout).into_owned();
    let screens: Vec<&str> = text.split("\x1b[H\x1b[2J").skip(1).collect();
    assert!(screens.len() >= 3, "{text:?}");
    for screen in &screens[..screens.len() - 1] {
        let lines = screen_lines(screen.as_bytes());
        assert_eq!(lines.len(), 20, "{lines:#?}");
        assert!(lines.iter().all(|l| l.chars().count() <= 80), "{lines:#?}");
        assert_eq!(lines[19], "(every 500ms; Ctrl-C to quit)", "{lines:#?}");
        assert!(!screen.ends_with('\n'), "{screen:?}");
    }
    an.stop();
}

/// `top` over `https://`: a real TLS server (`openssl s_server -WWW`, serving a saved `/top`
/// document) with a certificate of a test CA; `--tls-ca` trusts it, the system's CAs do not.
#[test]
fn top_reads_an_https_endpoint_whose_ca_it_is_given() {
    let openssl = require_binary("openssl", "openssl");
    let dir = TempDir::new("top-https");
    let ca = support::tls::TestCa::new("top");
    let ca_file = ca.write_ca(dir.path());
    let server = ca.server_cert(dir.path(), "metrics");
    let doc = serde_json::json!({
        "updated_at": "2026-12-06T11:32:25.150915885Z", "window_seconds": 300.0,
        "sessions": 4, "failed": 3, "failure_ratio": 0.75, "causes": {"upstream_timeout": 3},
        "qnames": [{"qname": "tls.example.test.", "failed": 3, "error": 0,
                    "cause": "upstream_timeout", "causes": {"upstream_timeout": 3},
                    "qtypes": ["AAAA"], "last_failed_at": "2026-12-06T11:32:15.000000000Z"}],
        "clients": [], "upstreams": []
    });
    std::fs::write(dir.join("top"), doc.to_string()).unwrap();
    let (mut s_server, port) = start_on_free_port(
        "openssl s_server",
        |port| {
            let mut cmd = Command::new(&openssl);
            cmd.args(["s_server", "-quiet", "-WWW", "-accept"])
                .arg(format!("127.0.0.1:{port}"))
                .arg("-cert")
                .arg(&server.cert)
                .arg("-key")
                .arg(&server.key)
                .current_dir(dir.path());
            Server::spawn(
                "openssl s_server",
                cmd,
                dir.join(&format!("s_server-{port}.log")),
            )
        },
        tcp_listening,
        Duration::from_secs(30),
    );
    let top = |url: &str, ca: Option<&std::path::Path>| {
        let mut cmd = Command::new(analyser_bin());
        cmd.args(["top", "--once", "--url", url]);
        if let Some(ca) = ca {
            cmd.arg("--tls-ca").arg(ca);
        }
        run_to_end(&mut cmd, None, Duration::from_secs(60))
    };
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("https://{host}:{port}");
        let out = top(&url, Some(&ca_file));
        let screen = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            screen.starts_with(&format!("{url}/top  updated 11:32:25 UTC")),
            "{screen}"
        );
        let row = screen.lines().find(|l| l.starts_with("tls.example.test."));
        let row: Vec<&str> = row
            .unwrap_or_else(|| panic!("{screen}"))
            .split_whitespace()
            .collect();
        assert_eq!(
            row[1..5],
            ["3", "upstream_timeout", "AAAA", "11:32:15"],
            "{screen}"
        );
    }
    // Without the CA: the system's CAs do not know the test CA.
    let url = format!("https://127.0.0.1:{port}");
    let out = top(&url, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot fetch {url}/top")) && stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    s_server.stop();
}

/// A sender that says which workload asked (CoreDNS's `extra`, the `j_extra` capture): `/top`
/// has its namespace, and `top` a NAMESPACE/POD table beside the sender's failure ratio.
#[test]
fn top_shows_the_namespace_and_pod_a_sender_names() {
    let capture = coredns_fixture("j_extra.fstrm");
    let offline = read(std::slice::from_ref(&capture), &[]);
    let sessions = offline.sessions.len();
    let failed = offline
        .sessions
        .iter()
        .filter(|s| s["status"] == "Failed")
        .count();
    assert_eq!((sessions, failed), (5, 2), "{:?}", offline.sessions);
    let an = Analyser::serve_tcp(&["--log-lookups", "none"]);
    run_sender(&mut fstrm_replay_tcp(an.port(), &capture));
    assert!(
        an.wait_for_lines(sessions, Duration::from_secs(60)),
        "sessions of j_extra: {:?}",
        an.sessions_so_far()
    );
    let addr = an.metrics_addr();
    let mut doc = Value::Null;
    let complete = poll_until(Duration::from_secs(60), || {
        doc = dnstap_analyser::metrics::top_client::fetch(&addr).expect("/top answers");
        doc["sessions"].as_u64() >= Some(sessions as u64)
    });
    assert!(complete, "/top after j_extra: {doc}");
    let workloads = doc["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 1, "{doc}");
    assert_eq!(workloads[0]["workload"], "team-a/web-1", "{doc}");
    assert_eq!(workloads[0]["namespace"], "team-a", "{doc}");
    assert_eq!(workloads[0]["failed"], 1, "{doc}");
    let pod = &doc["identities"][0];
    assert_eq!(pod["identity"], "extra-coredns", "{doc}");
    assert_eq!((&pod["sessions"], &pod["failed"]), (&5.into(), &2.into()));

    let screen = top_once(&addr);
    let words = |key: &str| -> Vec<String> {
        let line = screen.lines().find(|l| l.starts_with(key));
        let line = line.unwrap_or_else(|| panic!("no row {key} in:\n{screen}"));
        line.split_whitespace().map(String::from).collect()
    };
    assert_eq!(words("NAMESPACE/POD")[1], "FAILED", "{screen}");
    assert_eq!(words("team-a/web-1")[1], "1", "{screen}");
    assert_eq!(
        words("extra-coredns")[1..4],
        ["2", "5", "40.0%"],
        "{screen}"
    );
    an.stop();
}
