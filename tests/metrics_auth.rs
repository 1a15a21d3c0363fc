//! The metrics port behind `--metrics-web-config` (TLS, client certificates, basic auth), and
//! `--no-top`, through real clients on loopback:
//! - a real Prometheus scrapes the analyser over TLS with basic auth; a second job with a
//!   wrong password is a target down, and the analyser counts its refusals;
//! - curl (a real TLS client, like the kubelet's HTTPS probe that does not verify) gets
//!   `/healthz` and `/readyz` without credentials nor client certificate, and nothing else;
//! - a flood of new bad passwords is mostly refused without bcrypt, and `/healthz` answers
//!   within the kubelet's probe timeout all along;
//! - a changed web config and a renewed certificate are followed without a restart; a broken
//!   file keeps the previous one;
//! - a file with an unknown key stops the start (exit 2);
//! - `--no-top` leaves /top 404 and the top_failing_names family out.
//!
//! Certificates are made by the test (rcgen, tests/support/tls.rs). `prometheus` comes from
//! the Debian package `prometheus`, `curl` from `curl`.

mod support;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use support::{
    analyser_bin, http_get, poll_until, require_binary, run_to_end, text, Analyser, Exposition,
    Prometheus, TempDir, TestCa, SCRAPE_JOB,
};

const USER: &str = "prometheus";
const PASSWORD: &str = "scrape-secret";
/// The chart's livenessProbe timeoutSeconds: a probe slower than this fails in Kubernetes.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes the web config `yaml` into `dir`.
fn web_config(dir: &TempDir, yaml: &str) -> PathBuf {
    let path = dir.join("web.yml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn bcrypt_hash(password: &str, cost: u32) -> String {
    bcrypt::hash(password, cost).unwrap()
}

fn serve(web: &Path, extra: &[&str]) -> Analyser {
    let web = web.display().to_string();
    let mut args = vec!["--metrics-web-config", web.as_str()];
    args.extend(extra);
    Analyser::serve_tcp(&args)
}

/// `curl` of `https://127.0.0.1:PORT{path}` with `args`: the HTTP status, or None when no
/// HTTP answer came (handshake refused).
fn curl(port: u16, path: &str, args: &[&str]) -> (Option<u16>, String) {
    let out = run_to_end(
        Command::new(require_binary("curl", "curl"))
            .args(["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
            .args(args)
            .arg(format!("https://127.0.0.1:{port}{path}")),
        None,
        Duration::from_secs(60),
    );
    let stdout = text(&out.stdout);
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let code = code.trim().parse().ok().filter(|&c| c != 0);
    (code, format!("{body}{}", text(&out.stderr)))
}

#[test]
fn prometheus_scrapes_over_tls_with_basic_auth_and_a_wrong_password_is_down() {
    let dir = TempDir::new("metrics-auth-prom");
    let ca = TestCa::new("metrics");
    let server = ca.server_cert(dir.path(), "metrics-server");
    let ca_file = ca.write_ca(dir.path());
    let web = web_config(
        &dir,
        &format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  {USER}: '{}'\n",
            server.cert.display(),
            server.key.display(),
            bcrypt_hash(PASSWORD, 8)
        ),
    );
    let an = serve(&web, &[]);
    assert!(
        an.stderr_so_far()
            .contains(&format!("metrics on https://{}/metrics", an.metrics_addr())),
        "{}",
        an.stderr_so_far()
    );
    let tls = format!(
        "    scheme: https\n    tls_config:\n      ca_file: {}\n",
        ca_file.display()
    );
    let good =
        format!("{tls}    basic_auth:\n      username: {USER}\n      password: {PASSWORD}\n");
    let wrong = format!("{tls}    basic_auth:\n      username: {USER}\n      password: guess\n");
    let mut prom = Prometheus::start_with_jobs(
        &dir,
        &[an.metrics_addr()],
        &[
            (SCRAPE_JOB, &good),
            ("wrong-password", &wrong),
            ("plain-http", ""),
        ],
    );
    prom.wait_for_targets_up(Duration::from_secs(60));
    // The scrape over TLS with basic auth carried the analyser's own series.
    let up = prom.query(&format!(
        "dnstap_analyser_tls_handshakes_total{{job=\"{SCRAPE_JOB}\"}}"
    ));
    assert_eq!(up.len(), 1, "{}", prom.targets_report());
    // The wrong password and plain HTTP are targets down; the analyser saw the refusals.
    let refused_seen = poll_until(Duration::from_secs(60), || {
        let bad = prom.value(&format!(
            "dnstap_analyser_metrics_auth_refused_total{{job=\"{SCRAPE_JOB}\",reason=\"bad_credentials\"}}"
        ));
        bad.is_some_and(|v| v >= 1.0)
    });
    assert!(refused_seen, "{}", prom.targets_report());
    for job in ["wrong-password", "plain-http"] {
        let down = poll_until(Duration::from_secs(60), || {
            let up = prom.query(&format!("up{{job=\"{job}\"}}"));
            up.len() == 1 && up[0].value == 0.0
        });
        assert!(
            down,
            "{job} is not a target down: {}",
            prom.targets_report()
        );
    }
    let told = poll_until(Duration::from_secs(60), || {
        prom.targets_report().contains("401")
    });
    assert!(
        told,
        "the wrong password's error: {}",
        prom.targets_report()
    );
}

#[test]
fn probes_need_no_credentials_and_everything_else_needs_both() {
    let dir = TempDir::new("metrics-auth-probes");
    let ca = TestCa::new("metrics");
    let server = ca.server_cert(dir.path(), "metrics-server");
    let client = ca.client_cert(dir.path(), "prometheus-client", false);
    let ca_file = ca.write_ca(dir.path());
    let stranger = TestCa::new("stranger").client_cert(dir.path(), "stranger", false);
    let web = web_config(
        &dir,
        &format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  \
             client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {}\n\
             basic_auth_users:\n  {USER}: '{}'\n",
            server.cert.display(),
            server.key.display(),
            ca_file.display(),
            bcrypt_hash(PASSWORD, 6)
        ),
    );
    let an = serve(&web, &[]);
    let port = an.metrics_port();
    let ca_arg = ca_file.display().to_string();
    let (cert, key) = (
        client.cert.display().to_string(),
        client.key.display().to_string(),
    );
    let with_cert = ["--cacert", &ca_arg, "--cert", &cert, "--key", &key];
    let userpass = format!("{USER}:{PASSWORD}");

    // The kubelet: HTTPS without verifying, no certificate, no credentials.
    for probe in ["/healthz", "/readyz"] {
        let ready = poll_until(Duration::from_secs(30), || {
            curl(port, probe, &["--insecure"]).0 == Some(200)
        });
        assert!(ready, "{probe}: {:?}", curl(port, probe, &["--insecure"]));
    }
    let cases: [(&str, Vec<&str>, Option<u16>); 6] = [
        (
            "no certificate",
            vec!["--cacert", &ca_arg, "-u", &userpass],
            Some(403),
        ),
        ("no password", with_cert.to_vec(), Some(401)),
        (
            "wrong password",
            [&with_cert[..], &["-u", "prometheus:guess"]].concat(),
            Some(401),
        ),
        (
            "both",
            [&with_cert[..], &["-u", &userpass]].concat(),
            Some(200),
        ),
        (
            "a certificate of another CA",
            vec![
                "--cacert",
                &ca_arg,
                "--cert",
                stranger.cert.to_str().unwrap(),
                "--key",
                stranger.key.to_str().unwrap(),
                "-u",
                &userpass,
            ],
            None,
        ),
        ("/top without credentials", with_cert.to_vec(), Some(401)),
    ];
    for (what, args, want) in cases {
        let path = if what.starts_with("/top") {
            "/top"
        } else {
            "/metrics"
        };
        let (code, body) = curl(port, path, &args);
        assert_eq!(code, want, "{what}: {body}");
        if code == Some(200) {
            assert!(body.contains("dnstap_analyser_"), "{what}: {body}");
        }
    }
    // Plaintext HTTP on the TLS port gets no HTTP answer.
    assert!(
        http_get(&an.metrics_addr(), "/healthz", &[]).is_err(),
        "plaintext answered on the TLS port"
    );
    // The refusals are counted by reason.
    let (code, body) = curl(
        port,
        "/metrics",
        &[&with_cert[..], &["-u", &userpass]].concat(),
    );
    assert_eq!(code, Some(200), "{body}");
    let scrape = Exposition::parse(&body);
    let refused = |reason| {
        scrape.sum(
            "dnstap_analyser_metrics_auth_refused_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(refused("client_certificate"), 1.0, "{body}");
    assert_eq!(refused("no_credentials"), 2.0, "{body}");
    assert_eq!(refused("bad_credentials"), 1.0, "{body}");
    assert_eq!(
        refused("tls_handshake"),
        2.0,
        "the stranger's certificate and plaintext: {body}"
    );
    // Logged before the refusal's response, but read from the pipe by another thread.
    let logged = poll_until(Duration::from_secs(10), || {
        an.stderr_so_far()
            .contains("metrics endpoint refused 1 request(s) by client authentication")
    });
    assert!(logged, "{}", an.stderr_so_far());
}

/// One request with a new wrong password from `from` (a loopback address); true when the
/// analyser answered it at all.
fn bad_password(addr: &str, from: [u8; 4], n: u64) -> Option<u16> {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:guess-{n}"));
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    socket
        .bind(&std::net::SocketAddr::from((from, 0)).into())
        .ok()?;
    let target: std::net::SocketAddr = addr.parse().ok()?;
    socket.connect(&target.into()).ok()?;
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    use std::io::{Read, Write};
    let req = format!("GET /metrics HTTP/1.0\r\nAuthorization: Basic {token}\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).ok()?;
    let head = String::from_utf8_lossy(&reply);
    head.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn a_flood_of_bad_passwords_does_not_stall_the_probes() {
    let dir = TempDir::new("metrics-auth-flood");
    // Cost 13: a bcrypt run takes half a second or more; a handful in a row would hold a
    // probe past its timeout.
    let web = web_config(
        &dir,
        &format!(
            "basic_auth_users:\n  {USER}: '{}'\n",
            bcrypt_hash(PASSWORD, 13)
        ),
    );
    let an = serve(&web, &[]);
    let addr = an.metrics_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    // Six flooders on three loopback addresses, each request with a new password, until the
    // probes are done (20,000 at most).
    let flooders: Vec<_> = (0..6u8)
        .map(|i| {
            let (addr, stop, sent) = (addr.clone(), stop.clone(), sent.clone());
            thread::spawn(move || {
                let mut answered = 0u64;
                // Paced (200 per second each) so that the flood lasts as long as the probes.
                while !stop.load(Ordering::Relaxed) {
                    let n = sent.fetch_add(1, Ordering::Relaxed);
                    if n >= 20_000 {
                        break;
                    }
                    let from = [127, 0, 0, 2 + i % 3];
                    answered += u64::from(bad_password(&addr, from, n).is_some());
                    thread::sleep(Duration::from_millis(5));
                }
                answered
            })
        })
        .collect();
    // The kubelet: 20 probes, 200 ms apart, while the flood goes on; each within its timeout.
    let mut late = Vec::new();
    for _ in 0..20 {
        let asked = Instant::now();
        let answer = http_get_within(&addr, "/healthz", PROBE_TIMEOUT);
        if answer != Ok(200) {
            late.push(format!("{answer:?} after {:?}", asked.elapsed()));
        }
        thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let answered: u64 = flooders.into_iter().map(|f| f.join().unwrap()).sum();
    assert!(
        late.is_empty(),
        "{} of 20 probes failed their {PROBE_TIMEOUT:?} timeout: {late:?}",
        late.len()
    );
    // Prometheus's credentials still get through (once the common credit is back).
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let auth = format!("Basic {token}");
    let mut scrape = None;
    let scraped = poll_until(Duration::from_secs(30), || {
        let r = http_get(&addr, "/metrics", &[("Authorization", &auth)]);
        scrape = r.ok().filter(|r| r.status == 200).map(|r| r.body);
        scrape.is_some()
    });
    assert!(scraped, "the right password was never let in");
    let scrape = Exposition::parse(&scrape.unwrap());
    let refused = |reason| {
        scrape.sum(
            "dnstap_analyser_metrics_auth_refused_total",
            &[("reason", reason)],
        )
    };
    // Every flood request was answered; most without a bcrypt run.
    assert!(answered >= 100, "only {answered} flood requests answered");
    let (bcrypt_runs, throttled) = (refused("bad_credentials"), refused("rate_limited"));
    eprintln!(
        "[test] flood: {answered} requests answered, {bcrypt_runs} bcrypt runs, {throttled} \
         refused without one; 20 probes within {PROBE_TIMEOUT:?}"
    );
    assert!(
        bcrypt_runs + throttled >= answered as f64,
        "each answered flood request is counted: {bcrypt_runs} + {throttled} < {answered}"
    );
    assert!(
        throttled > 10.0 * bcrypt_runs,
        "bcrypt ran {bcrypt_runs} times, {throttled} refused without it"
    );
    // And said so in a line at most every 10 s.
    let out = an.stop();
    let lines = out
        .stderr
        .lines()
        .filter(|l| l.contains("refused") && l.contains("client authentication"))
        .count();
    assert!(
        (1..=3).contains(&lines),
        "{lines} refusal lines: {}",
        out.stderr
    );
}

/// `GET path` answered within `limit` (the probe's timeout): its status, else what went wrong.
fn http_get_within(addr: &str, path: &str, limit: Duration) -> Result<u16, String> {
    use std::io::{Read, Write};
    let addr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&addr, limit).map_err(|e| format!("connect: {e}"))?;
    let deadline = Instant::now() + limit;
    s.set_write_timeout(Some(limit))
        .and_then(|()| s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()))
        .map_err(|e| format!("write: {e}"))?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .ok_or("no answer in time")?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| format!("read timeout: {e}"))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            // A signal to the test process (a stopped and continued one, say) interrupts a read
            // with a timeout; the kubelet would read on, and so does the probe.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read after {} bytes: {e}", reply.len())),
        }
    }
    let reply = String::from_utf8_lossy(&reply);
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("reply {reply:?}"))
}

#[test]
fn an_unknown_key_in_the_web_config_stops_the_start() {
    let dir = TempDir::new("metrics-auth-bad-config");
    let web = web_config(&dir, "basic_auth_user:\n  prometheus: x\n");
    let out = run_to_end(
        Command::new(analyser_bin()).args([
            "--listen",
            "tcp://127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-web-config",
            web.to_str().unwrap(),
        ]),
        None,
        Duration::from_secs(60),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("basic_auth_user"), "{stderr}");
    assert!(stderr.contains("web.yml"), "{stderr}");
}

#[test]
fn no_top_serves_no_top_and_no_top_names_family() {
    for (flags, top_served) in [(&[][..], true), (&["--no-top"][..], false)] {
        let an = Analyser::serve_tcp(flags);
        let top = http_get(&an.metrics_addr(), "/top", &[]).unwrap();
        assert_eq!(top.status == 200, top_served, "{flags:?}: {}", top.body);
        if !top_served {
            assert_eq!(top.status, 404, "{}", top.body);
        }
        let scrape = support::scrape_text(&an.metrics_addr());
        assert_eq!(
            scrape.contains("dnstap_analyser_top_failing_names"),
            top_served,
            "{flags:?}"
        );
    }
}

/// `GET /metrics` with `user:password`: the status.
fn scrape_as(addr: &str, user_password: &str) -> u16 {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(user_password);
    let auth = format!("Basic {token}");
    http_get(addr, "/metrics", &[("Authorization", &auth)])
        .map(|r| r.status)
        .unwrap_or(0)
}

#[test]
fn a_changed_web_config_is_followed_and_a_broken_one_keeps_the_previous() {
    let dir = TempDir::new("metrics-auth-reload");
    let users = |password: &str| {
        format!(
            "basic_auth_users:\n  {USER}: '{}'\n",
            bcrypt_hash(password, 4)
        )
    };
    let web = web_config(&dir, &users("first"));
    let an = serve(&web, &[]);
    let addr = an.metrics_addr();
    assert_eq!(scrape_as(&addr, &format!("{USER}:first")), 200);
    // Written to the side and renamed, as the kubelet swaps a Secret's files.
    let swap = |text: &str| {
        let tmp = dir.join("web.yml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &web).unwrap();
    };
    swap(&users("second"));
    let followed = poll_until(Duration::from_secs(30), || {
        scrape_as(&addr, &format!("{USER}:second")) == 200
    });
    assert!(followed, "{}", an.stderr_so_far());
    assert_eq!(scrape_as(&addr, &format!("{USER}:first")), 401);
    swap("basic_auth_users:\n  prometheus: not-a-hash\n");
    let refused = poll_until(Duration::from_secs(30), || {
        // Each request is a new connection: the file is looked at (once a second) before it.
        scrape_as(&addr, &format!("{USER}:second"));
        an.stderr_so_far()
            .contains("metrics web config not reloaded")
    });
    assert!(refused, "{}", an.stderr_so_far());
    assert_eq!(scrape_as(&addr, &format!("{USER}:second")), 200);
}

#[test]
fn a_renewed_metrics_certificate_is_served_without_a_restart() {
    let dir = TempDir::new("metrics-auth-rotate");
    let (old_ca, new_ca) = (TestCa::new("old"), TestCa::new("new"));
    let served = old_ca.server_cert(dir.path(), "metrics");
    let web = web_config(
        &dir,
        &format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            served.cert.display(),
            served.key.display()
        ),
    );
    let an = serve(&web, &[]);
    let port = an.metrics_port();
    let trusts = |ca: &TestCa| {
        let ca_file = ca.write_ca(dir.path()).display().to_string();
        curl(port, "/healthz", &["--cacert", &ca_file]).0 == Some(200)
    };
    assert!(trusts(&old_ca) && !trusts(&new_ca));
    // The renewal writes new files to the side and renames them over the old ones.
    let renewed = new_ca.server_cert(dir.path(), "renewed");
    std::fs::rename(&renewed.key, &served.key).unwrap();
    std::fs::rename(&renewed.cert, &served.cert).unwrap();
    let followed = poll_until(Duration::from_secs(30), || trusts(&new_ca));
    assert!(followed, "{}", an.stderr_so_far());
    assert!(!trusts(&old_ca));
    let logged = poll_until(Duration::from_secs(10), || {
        an.stderr_so_far()
            .contains("metrics web config reloaded from")
    });
    assert!(logged, "{}", an.stderr_so_far());
}

/// `top --once` against `addr` with `--user`, its password in a file: the exit code and
/// what it printed.
fn top_as(dir: &TempDir, addr: &str, password: &str) -> (Option<i32>, String) {
    let file = dir.join("top-password");
    std::fs::write(&file, format!("{password}\n")).unwrap();
    let out = run_to_end(
        Command::new(analyser_bin())
            .args(["top", "--once", "--url", addr, "--user", USER])
            .arg("--password-file")
            .arg(&file),
        None,
        Duration::from_secs(60),
    );
    let printed = format!("{}{}", text(&out.stdout), text(&out.stderr));
    (out.status.code(), printed)
}

#[test]
fn top_reads_a_protected_endpoint_with_the_users_password() {
    let dir = TempDir::new("metrics-auth-top");
    let hash = bcrypt_hash(PASSWORD, 4);
    let web = web_config(&dir, &format!("basic_auth_users:\n  {USER}: '{hash}'\n"));
    let an = serve(&web, &[]);
    let addr = an.metrics_addr();

    let (code, printed) = top_as(&dir, &addr, PASSWORD);
    assert_eq!(code, Some(0), "{printed}");
    assert!(printed.contains("updated"), "no screen: {printed}");

    let (code, printed) = top_as(&dir, &addr, "wrong");
    assert_eq!(code, Some(2), "{printed}");
    assert!(printed.contains("status 401"), "{printed}");

    // Without credentials the endpoint refuses top as it refuses any other client.
    let out = run_to_end(
        Command::new(analyser_bin()).args(["top", "--once", "--url", &addr]),
        None,
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("status 401"),
        "{}",
        text(&out.stderr)
    );
}
