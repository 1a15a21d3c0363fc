//! Real DNS servers on loopback, started from the templates in `tests/live/`: the authoritative
//! upstream (nsd), the forwarders under test (unbound, BIND named, Knot Resolver, dnsdist,
//! CoreDNS), a silent upstream that never answers, and the DNS clients dig and dnsperf.

use super::analyser::Analyser;
use super::process::{
    start_on_free_port, tcp_connections_to, tcp_listening, udp_receive_queue, Server,
};
use super::sessions::{describe_all, s_qname};
use super::sessions::{Expect, UpKind};
use super::{live_dir, poll_until, render_to, require_binary, wait_until, TempDir};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// A silent upstream
// ---------------------------------------------------------------------------------------------

/// What a silent upstream has received.
#[derive(Default)]
struct Received {
    /// question name (lower case, no trailing dot) of every datagram, in arrival order
    qnames: Vec<String>,
    last: Option<Instant>,
}

/// A "silent" upstream: a UDP socket on loopback that receives queries and never answers.
/// It records the datagrams, so a test knows how many upstream attempts a forwarder made.
pub struct SilentUpstream {
    pub port: u16,
    received: Arc<Mutex<Received>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SilentUpstream {
    pub fn start() -> SilentUpstream {
        // Port 0: the kernel picks a free one, which nobody can take before the bind.
        let sock = UdpSocket::bind(("127.0.0.1", 0)).expect("bind silent upstream");
        let port = sock.local_addr().unwrap().port();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let received = Arc::new(Mutex::new(Received::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (received.clone(), stop.clone());
        // A datagram is taken off the socket only under the lock that records it (peek first,
        // then receive): once the socket's queue is empty, a reader that gets the lock sees
        // every datagram that arrived ([`SilentUpstream::count`]).
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::SeqCst) {
                if sock.peek_from(&mut buf).is_ok() {
                    let mut r = r.lock().unwrap();
                    if let Ok((n, _)) = sock.recv_from(&mut buf) {
                        r.qnames.push(question_name(&buf[..n]).unwrap_or_default());
                        r.last = Some(Instant::now());
                    }
                }
            }
        });
        SilentUpstream {
            port,
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// Datagrams received so far.
    pub fn count(&self) -> usize {
        self.received_so_far().qnames.len()
    }

    /// Datagrams received so far that ask for `qname` (any case, trailing dot optional); a
    /// forwarder's health checks ask for other names.
    pub fn count_for(&self, qname: &str) -> usize {
        let want = super::norm_name(qname);
        let r = self.received_so_far();
        r.qnames.iter().filter(|q| **q == want).count()
    }

    /// What arrived so far, datagrams still queued on the socket included: a forwarder's last
    /// attempt, sent just before it answered the client, may not have been read yet by a
    /// thread starved on a loaded machine. Waits until the socket's queue is empty (the thread
    /// takes a datagram off it only under the lock, so none is between the two).
    fn received_so_far(&self) -> std::sync::MutexGuard<'_, Received> {
        wait_until(
            "the silent upstream to read every datagram queued",
            Duration::from_secs(30),
            || udp_receive_queue(self.port) == Some(0),
        );
        self.received.lock().unwrap()
    }

    /// Waits until at least `min` datagrams arrived and none for `quiet`; returns the count.
    pub fn wait_quiet(&self, min: usize, quiet: Duration, timeout: Duration) -> usize {
        wait_until(
            "the silent upstream to stop receiving retries",
            timeout,
            || {
                let r = self.received.lock().unwrap();
                r.qnames.len() >= min && r.last.is_some_and(|t| t.elapsed() >= quiet)
            },
        );
        self.count()
    }
}

impl Drop for SilentUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The question name of a DNS message (lower case, no trailing dot); None if it does not parse
/// or uses compression (a query's first name never does).
fn question_name(msg: &[u8]) -> Option<String> {
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = *msg.get(at)? as usize;
        if len == 0 {
            return Some(labels.join("."));
        }
        if len > 63 {
            return None;
        }
        let label = msg.get(at + 1..at + 1 + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += 1 + len;
    }
}

// ---------------------------------------------------------------------------------------------
// DNS clients
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct DigAnswer {
    /// `status:` of the answer, None when no answer arrived.
    pub rcode: Option<String>,
    pub elapsed: Duration,
    pub output: String,
}

/// One query with dig, exactly one attempt (`+tries=1`, so exactly one client query on the wire).
pub fn dig(port: u16, qname: &str, qtype: &str, tcp: bool, timeout_s: u32) -> DigAnswer {
    let dig = require_binary("dig", "dnsutils");
    let mut cmd = Command::new(dig);
    cmd.arg("-p")
        .arg(port.to_string())
        .arg("@127.0.0.1")
        .arg(qname)
        .arg(qtype)
        .arg("+tries=1")
        .arg(format!("+time={timeout_s}"));
    if tcp {
        cmd.arg("+tcp");
    }
    let t0 = Instant::now();
    let out = cmd.output().expect("run dig");
    let elapsed = t0.elapsed();
    let output = String::from_utf8_lossy(&out.stdout).into_owned();
    let rcode = output
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or("").trim().to_string());
    DigAnswer {
        rcode,
        elapsed,
        output,
    }
}

/// Asks `server` (at `port`) for `qname`/`qtype` with dig and asserts the rcode it answers, so a
/// broken server setup shows up as such and not as an analyser bug.
pub fn dig_expect(server: &mut Server, port: u16, query: (&str, &str, bool), want: &str) {
    let (name, qtype, tcp) = query;
    server.assert_running();
    let a = dig(port, name, qtype, tcp, 5);
    assert_eq!(
        a.rcode.as_deref(),
        Some(want),
        "{}: dig {name} {qtype}{} answered {:?}, expected {want}:\n{}",
        server.name,
        if tcp { " +tcp" } else { "" },
        a.rcode,
        a.output
    );
}

/// The name the readiness probes ask for (example.test answers it): its sessions are no part
/// of any expectation.
pub const PROBE: &str = "ready.example.test";

/// The DNS server at `port` answers a probe (any rcode).
pub fn answers_dns(port: u16) -> bool {
    dig(port, PROBE, "A", false, 1).rcode.is_some()
}

/// Parsed `dnsperf` statistics.
#[derive(Debug, Clone, Default)]
pub struct PerfStats {
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
    pub rcodes: BTreeMap<String, u64>,
    pub output: String,
}

/// Runs dnsperf against 127.0.0.1:port with `args` (must bound the run: -n/-l and -Q).
pub fn dnsperf(port: u16, datafile: &Path, args: &[&str]) -> PerfStats {
    let bin = require_binary("dnsperf", "dnsperf");
    let out = Command::new(bin)
        .arg("-s")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(port.to_string())
        .arg("-d")
        .arg(datafile)
        .args(args)
        .output()
        .expect("run dnsperf");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "dnsperf failed ({}):\n{text}",
        out.status
    );
    let num = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("dnsperf output has no `{key}`:\n{text}"))
    };
    let mut rcodes = BTreeMap::new();
    if let Some(line) = text
        .lines()
        .find(|l| l.trim().starts_with("Response codes:"))
    {
        // "Response codes:       NOERROR 9000 (90.00%), NXDOMAIN 1000 (10.00%)"
        let rest = line.trim().trim_start_matches("Response codes:");
        for part in rest.split(',') {
            let mut w = part.split_whitespace();
            if let (Some(code), Some(n)) = (w.next(), w.next()) {
                if let Ok(n) = n.parse() {
                    rcodes.insert(code.to_string(), n);
                }
            }
        }
    }
    PerfStats {
        sent: num("Queries sent:"),
        completed: num("Queries completed:"),
        lost: num("Queries lost:"),
        rcodes,
        output: text,
    }
}

// ---------------------------------------------------------------------------------------------
// Servers (templates in tests/live/)
// ---------------------------------------------------------------------------------------------

/// The authoritative upstream: nsd serving example.test (NOERROR/NXDOMAIN) and a broken
/// servfail.test (SERVFAIL); everything else is REFUSED.
pub struct Upstream {
    pub port: u16,
    pub server: Server,
}

pub fn start_nsd(dir: &TempDir) -> Upstream {
    let nsd = require_binary("nsd", "nsd");
    for z in ["example.test.zone", "servfail.test.zone"] {
        fs::copy(live_dir().join(z), dir.join(z)).expect("copy zone file");
    }
    let spawn = |port: u16| {
        let vars = [
            ("DIR", dir.path().display().to_string()),
            ("PORT", port.to_string()),
        ];
        let conf = render_to("nsd.conf", dir, "nsd.conf", &vars);
        let mut cmd = Command::new(&nsd);
        cmd.arg("-d").arg("-c").arg(&conf);
        Server::spawn("nsd", cmd, dir.join("nsd.stdout"))
    };
    let (server, port) = start_on_free_port("nsd", spawn, answers_dns, READY_WITHIN);
    Upstream { port, server }
}

/// How long a server may take to answer its first query on a loaded machine.
pub const READY_WITHIN: Duration = Duration::from_secs(60);

/// A forwarder under test: its client port and its process.
pub struct Forwarder {
    pub port: u16,
    pub server: Server,
}

/// A forwarder `name` (binary `name` from Debian package `package`) with `name.conf` rendered
/// from tests/live/ with its listening PORT, UPSTREAM, SILENT and the given `vars`, started with
/// the arguments `args` gives for that config, and answering on PORT.
fn start_forwarder(
    dir: &TempDir,
    (name, package): (&str, &str),
    (upstream, silent): (u16, u16),
    vars: &[(&str, String)],
    args: impl Fn(&mut Command, &Path),
) -> Forwarder {
    let bin = require_binary(name, package);
    let spawn = |port: u16| {
        let mut all = vec![
            ("DIR", dir.path().display().to_string()),
            ("PORT", port.to_string()),
            ("UPSTREAM", upstream.to_string()),
            ("SILENT", silent.to_string()),
        ];
        all.extend(vars.iter().cloned());
        let conf_name = format!("{name}.conf");
        let conf = render_to(&conf_name, dir, &conf_name, &all);
        let mut cmd = Command::new(&bin);
        args(&mut cmd, &conf);
        Server::spawn(name, cmd, dir.join(&format!("{name}.log")))
    };
    let (server, port) = start_on_free_port(name, spawn, answers_dns, READY_WITHIN);
    Forwarder { port, server }
}

/// unbound forwarding to `upstream`, `silent.test` to the silent socket, dnstap over TCP to
/// 127.0.0.1:`tap_port`.
pub fn start_unbound(dir: &TempDir, upstream: u16, silent: u16, tap_port: u16) -> Forwarder {
    start_forwarder(
        dir,
        ("unbound", "unbound"),
        (upstream, silent),
        &[("TAP", tap_port.to_string())],
        |cmd, conf| {
            cmd.arg("-d").arg("-c").arg(conf);
        },
    )
}

/// BIND named forwarding (`forward only`), dnstap to the unix socket `tap_sock`.
pub fn start_named(dir: &TempDir, upstream: u16, silent: u16, tap_sock: &Path) -> Forwarder {
    start_forwarder(
        dir,
        ("named", "bind9"),
        (upstream, silent),
        &[("TAPSOCK", tap_sock.display().to_string())],
        // -g: foreground, log to stderr; no -u: stays root; -n 1: one worker thread
        |cmd, conf| {
            cmd.arg("-g").arg("-n").arg("1").arg("-c").arg(conf);
        },
    )
}

/// Knot Resolver (kresd) forwarding, dnstap to the unix socket `tap_sock` (must already exist).
pub fn start_kresd(dir: &TempDir, upstream: u16, silent: u16, tap_sock: &Path) -> Forwarder {
    let rundir = dir.join("kresd-run");
    fs::create_dir_all(&rundir).unwrap();
    start_forwarder(
        dir,
        ("kresd", "knot-resolver"),
        (upstream, silent),
        &[("TAPSOCK", tap_sock.display().to_string())],
        // -n: non-interactive (no console on stdin)
        |cmd, conf| {
            cmd.arg("-n").arg("-c").arg(conf).arg(&rundir);
        },
    )
}

/// dnsdist balancing to `upstream` (and `silent.test` to the silent socket), dnstap over TCP
/// to 127.0.0.1:`tap_port`.
pub fn start_dnsdist(dir: &TempDir, upstream: u16, silent: u16, tap_port: u16) -> Forwarder {
    start_forwarder(
        dir,
        ("dnsdist", "dnsdist"),
        (upstream, silent),
        &[("TAP", tap_port.to_string())],
        // --supervised: foreground, no console; no --uid/--gid: stays root
        |cmd, conf| {
            cmd.arg("--supervised")
                .arg("--disable-syslog")
                .arg("-C")
                .arg(conf);
        },
    )
}

/// The real CoreDNS binary `coredns` with `tests/live/Corefile`: `hosts` answers
/// `internal.test` locally, `cache`, `forward . 127.0.0.1:<upstream>`, and `dnstap
/// tcp://127.0.0.1:<tap_port> full`. Returns once CoreDNS listens and its dnstap stream is
/// connected (the analyser must already listen on `tap_port`). No readiness query: it would
/// be a session of its own.
pub fn start_coredns(dir: &TempDir, coredns: &Path, upstream: u16, tap_port: u16) -> Forwarder {
    let vars = [("UPSTREAM", upstream.to_string())];
    start_coredns_from(dir, coredns, "Corefile", &vars, tap_port)
}

/// CoreDNS from the Corefile `template` of tests/live, with `PORT` (a port free when it binds)
/// and `TAP` filled in besides `vars`; returns once it listens and its dnstap stream is up.
pub fn start_coredns_from(
    dir: &TempDir,
    coredns: &Path,
    template: &str,
    vars: &[(&str, String)],
    tap_port: u16,
) -> Forwarder {
    let spawn = |port: u16| {
        let mut all = vec![("PORT", port.to_string()), ("TAP", tap_port.to_string())];
        all.extend(vars.iter().cloned());
        let conf = render_to(template, dir, "Corefile", &all);
        let mut cmd = Command::new(coredns);
        cmd.arg("-conf").arg(&conf);
        Server::spawn("coredns", cmd, dir.join("coredns.log"))
    };
    let connected = |port| tcp_listening(port) && tcp_connections_to(tap_port) >= 1;
    let (server, port) = start_on_free_port("coredns", spawn, connected, READY_WITHIN);
    Forwarder { port, server }
}

/// NOERROR, same name again (cache), NXDOMAIN, SERVFAIL, REFUSED, NOERROR over TCP.
/// Asserts what dig got, so a broken server setup shows up as such and not as an analyser bug.
pub fn run_standard_queries(server: &mut Server, port: u16, refused_rcode: &str) {
    let cases: [(&str, &str, bool, &str); 6] = [
        ("www.example.test", "A", false, "NOERROR"),
        ("www.example.test", "A", false, "NOERROR"),
        ("nx.example.test", "A", false, "NXDOMAIN"),
        ("x.servfail.test", "A", false, "SERVFAIL"),
        ("x.refused.test", "A", false, refused_rcode),
        ("txt.example.test", "TXT", true, "NOERROR"),
    ];
    for (name, qtype, tcp, want) in cases {
        dig_expect(server, port, (name, qtype, tcp), want);
    }
}

/// Asks unbound on `port` for x.silent.test, which it forwards to `silent`: no answer comes, and
/// unbound gives up after two attempts 1 s apart (infra-cache-min-rtt 1000, -max-rtt 2000).
/// Returns how many queries the silent upstream got.
pub fn unbound_silent_query(port: u16, silent: &SilentUpstream) -> usize {
    let a = dig(port, "x.silent.test", "A", false, 3);
    assert_eq!(
        a.rcode, None,
        "unbound answered x.silent.test: {}",
        a.output
    );
    let attempts = silent.wait_quiet(1, Duration::from_millis(2500), Duration::from_secs(30));
    assert!(
        attempts >= 2,
        "unbound sent {attempts} queries to the silent upstream"
    );
    attempts
}

/// Waits until the forwarder's dnstap stream reaches `an`: asks the forwarder for [`PROBE`]
/// until the analyser prints a session for it. This proves the whole path, handshakes
/// included, where a connected socket does not.
pub fn wait_stream_flowing(an: &Analyser, fwd: &mut Forwarder) {
    let mut asked: Option<Instant> = None;
    wait_until(
        &format!(
            "a probe's session through {}'s dnstap stream",
            fwd.server.name
        ),
        DELIVERY,
        || {
            fwd.server.assert_running();
            if an.sessions_so_far().iter().any(|s| s_qname(s) == PROBE) {
                return true;
            }
            // A forwarder writes dnstap in batches: ask again only once in a while.
            if asked.is_none_or(|t| t.elapsed() > Duration::from_secs(2)) {
                dig(fwd.port, PROBE, "A", false, 1);
                asked = Some(Instant::now());
            }
            false
        },
    );
}

/// Waits until `an` has printed `n` sessions besides the probes' (a forwarder writes dnstap
/// in batches, and what it has not written when it stops is lost).
pub fn wait_for_sessions_besides_probes(an: &Analyser, n: usize, what: &str) {
    let arrived = an.wait_for_sessions(DELIVERY, |sessions| {
        sessions.iter().filter(|s| s_qname(s) != PROBE).count() >= n
    });
    assert!(
        arrived,
        "{what}: {n} sessions did not arrive within {DELIVERY:?}; so far:\n{}",
        describe_all(&an.sessions_so_far())
    );
}

/// How long sessions may take to show up: a forwarder's dnstap batching, the analyser's idle
/// flush, and a loaded machine.
pub const DELIVERY: Duration = Duration::from_secs(60);

/// Waits until `an` has every message of unbound's standard scenarios and silent query: the
/// sessions of `run_standard_queries` printed, and the silent query's CQ and `attempts` FQs
/// received in the session still open (no CR ends it). unbound loses what it has not written
/// when it stops.
pub fn wait_for_unbound_scenarios(an: &Analyser, attempts: usize) {
    let open = 1 + attempts as u64;
    let mut last = (0, 0);
    let delivered = poll_until(DELIVERY, || {
        let sessions = an.sessions_so_far();
        let printed: Vec<&Value> = sessions.iter().filter(|s| s_qname(s) != PROBE).collect();
        let in_lines: u64 = sessions
            .iter()
            .map(|s| s["messages"].as_array().map_or(0, |m| m.len() as u64))
            .sum();
        last = (
            printed.len(),
            an.messages_received().saturating_sub(in_lines),
        );
        last.0 >= 6 && last.1 >= open
    });
    assert!(
        delivered,
        "unbound's scenarios: (sessions printed, messages in open sessions) = {last:?} after \
         {DELIVERY:?}, want (6, {open}); so far:\n{}",
        describe_all(&an.sessions_so_far())
    );
}

/// The sessions of `run_standard_queries` plus one query to the silent upstream (answered
/// `attempts` times by nothing) through unbound: FQ/FR with fresh DNS ids, SERVFAIL and REFUSED
/// retried 5 times, the silent name without a client response.
pub fn unbound_expected(nsd_port: u16, silent_port: u16, attempts: usize) -> Vec<Expect> {
    let up = format!("127.0.0.1:{nsd_port}");
    let fwd = UpKind::Forwarder;
    vec![
        Expect::new("www.example.test", "Succeeded", 15)
            .rcode("NOERROR")
            .attempts(fwd, 1, Some("NOERROR"))
            .addr(&up),
        Expect::new("www.example.test", "Succeeded", 3).rcode("NOERROR"),
        Expect::new("nx.example.test", "Succeeded", 15)
            .rcode("NXDOMAIN")
            .attempts(fwd, 1, Some("NXDOMAIN"))
            .addr(&up),
        Expect::new("x.servfail.test", "Failed", 15)
            .rcode("SERVFAIL")
            .attempts(fwd, 5, Some("SERVFAIL"))
            .addr(&up),
        Expect::new("x.refused.test", "Failed", 15)
            .rcode("SERVFAIL")
            .attempts(fwd, 5, Some("REFUSED"))
            .addr(&up),
        Expect::new("txt.example.test", "Succeeded", 15)
            .qtype("TXT")
            .tcp()
            .rcode("NOERROR")
            .attempts(fwd, 1, Some("NOERROR"))
            .addr(&up),
        Expect::new("x.silent.test", "Failed", 5)
            .attempts(fwd, attempts, None)
            .addr(format!("127.0.0.1:{silent_port}")),
    ]
    .into_iter()
    .map(|e| e.ident("live-unbound", "unbound 1."))
    .collect()
}
