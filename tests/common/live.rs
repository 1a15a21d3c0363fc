//! Test harness for running real DNS servers and the analyser side by side.
//!
//! Used by `tests/live_servers.rs` (live nsd/unbound/named/kresd/dnsdist) and by
//! `tests/other_senders.rs` (fixture files through `dnstap-analyser read`). Include it with
//! `#[path = "common/live.rs"] mod live;`.
//!
//! Rules this module enforces:
//! - Only loopback addresses; ports come from 25000-25999 ([`alloc_port`]).
//! - Every process started here is its own process group and is killed (SIGTERM, then SIGKILL)
//!   when its guard is dropped, also when the test panics. On a panic the server logs are printed
//!   and the temp dir is kept (set `DNSTAP_LIVE_KEEP=1` to keep it always).
//! - A missing server binary fails the test with the Debian package to install; nothing is skipped.
//! - Signals are sent with the `kill` command (no libc).
#![allow(dead_code)]

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Paths, binaries, ports, temp dirs
// ---------------------------------------------------------------------------------------------

/// The analyser binary built by cargo for integration tests.
pub fn analyser_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dnstap-analyser"))
}

/// `tests/live/` in the source tree (config templates and zone files).
pub fn live_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("live")
}

/// `../shared/fixtures` next to the checkout (same layout locally and in CI).
pub fn fixtures_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    if !dir.is_dir() {
        panic!(
            "fixture folder {} is missing: the captures live in ../shared/fixtures next to the \
             checkout (CI provides the same layout)",
            dir.display()
        );
    }
    dir
}

/// Finds a program on PATH or in the sbin directories (root's PATH is not always inherited).
/// Panics with the Debian package that provides it: a missing server is a failure, never a skip.
pub fn require_binary(name: &str, debian_package: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for extra in ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(extra));
    }
    for d in dirs {
        let candidate = d.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` is not installed: install the Debian package `{debian_package}` \
         (listed in .ci/apt-packages; .ci/install-deps installs it)"
    );
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A loopback port in 25000-25999 that is free for both TCP and UDP right now.
pub fn alloc_port() -> u16 {
    const LO: u16 = 25000;
    const SPAN: u16 = 1000;
    // Start at a pid-dependent offset so two test processes rarely probe the same ports.
    let _ = NEXT_PORT.compare_exchange(
        0,
        (std::process::id() % SPAN as u32) as u16 + 1,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let n = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
        let port = LO + (n % SPAN);
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 25000-25999");
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A temp dir removed on drop (kept when the test panics, or with DNSTAP_LIVE_KEEP=1).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let mut base = std::env::temp_dir();
        // unix socket paths must stay below ~100 bytes
        if base.as_os_str().len() > 40 {
            base = PathBuf::from("/tmp");
        }
        let n = NEXT_DIR.fetch_add(1, Ordering::SeqCst);
        let path = base.join(format!("dnstap-live-{}-{}-{}", std::process::id(), n, tag));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var_os("DNSTAP_LIVE_KEEP").is_some() {
            eprintln!("[live] keeping {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Reads `tests/live/<template>` and replaces every `@KEY@` with its value.
pub fn render(template: &str, vars: &[(&str, String)]) -> String {
    let path = live_dir().join(template);
    let mut text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    for (k, v) in vars {
        text = text.replace(&format!("@{k}@"), v);
    }
    // any placeholder left is a bug in the test
    let b = text.as_bytes();
    for i in 0..b.len() {
        if b[i] == b'@' {
            let rest = &b[i + 1..];
            let n = rest
                .iter()
                .take_while(|c| c.is_ascii_uppercase() || **c == b'_')
                .count();
            if n > 0 && rest.get(n) == Some(&b'@') {
                panic!(
                    "template {template}: placeholder {} not substituted",
                    String::from_utf8_lossy(&b[i..i + n + 2])
                );
            }
        }
    }
    text
}

/// Renders a template into `dir/<out_name>`.
pub fn render_to(
    template: &str,
    dir: &TempDir,
    out_name: &str,
    vars: &[(&str, String)],
) -> PathBuf {
    let out = dir.join(out_name);
    fs::write(&out, render(template, vars))
        .unwrap_or_else(|e| panic!("write {}: {e}", out.display()));
    out
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn signal_group(pgid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn signal_pid(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------------

/// A server process (its own process group). Dropping it stops it: SIGTERM to the group, up to
/// 10 s for a clean exit (the dnstap STOP/FINISH handshake happens here), then SIGKILL.
pub struct Server {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    pub exit: Option<ExitStatus>,
}

impl Server {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Server {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log fd");
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let desc = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {desc}: {e}"));
        eprintln!("[live] started {name} pid {}: {desc}", child.id());
        Server {
            name: name.to_string(),
            child: Some(child),
            log,
            exit: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!(
                    "{} exited early ({st}); log {}:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log_text(), 40)
                );
            }
        }
    }

    pub fn log_text(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Graceful stop: SIGTERM, wait for the exit (10 s), else SIGKILL. Idempotent.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            signal_group(pid, "TERM");
            let st = wait_child(&mut child, Duration::from_secs(10));
            if st.is_none() {
                eprintln!(
                    "[live] {} (pid {pid}) ignored SIGTERM for 10 s: SIGKILL",
                    self.name
                );
            }
            // whatever is left in the group (e.g. nsd's worker processes)
            signal_group(pid, "KILL");
            let st = st.or_else(|| {
                let _ = child.kill();
                child.wait().ok()
            });
            self.exit = st;
        }
        self.exit
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let was_running = self.child.is_some();
        self.stop();
        if thread::panicking() && was_running {
            eprintln!(
                "[live] ---- {} log ({}) ----\n{}",
                self.name,
                self.log.display(),
                tail(&self.log_text(), 30)
            );
        }
    }
}

/// A "silent" upstream: a UDP socket on loopback that receives queries and never answers.
/// It counts the datagrams, so a test knows how many upstream attempts the forwarder made.
pub struct SilentUpstream {
    pub port: u16,
    count: Arc<AtomicUsize>,
    last: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SilentUpstream {
    pub fn start() -> SilentUpstream {
        let port = alloc_port();
        let sock = UdpSocket::bind(("127.0.0.1", port)).expect("bind silent upstream");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let last = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, l, s) = (count.clone(), last.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::SeqCst) {
                if sock.recv_from(&mut buf).is_ok() {
                    c.fetch_add(1, Ordering::SeqCst);
                    *l.lock().unwrap() = Some(Instant::now());
                }
            }
        });
        SilentUpstream {
            port,
            count,
            last,
            stop,
            thread: Some(thread),
        }
    }

    /// Datagrams received so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until at least `min` datagrams arrived and none for `quiet`; returns the count.
    pub fn wait_quiet(&self, min: usize, quiet: Duration, timeout: Duration) -> usize {
        wait_until(
            "the silent upstream to stop receiving retries",
            timeout,
            || {
                let last = *self.last.lock().unwrap();
                self.count() >= min && last.is_some_and(|t| t.elapsed() >= quiet)
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

// ---------------------------------------------------------------------------------------------
// Socket state from /proc (no side effects on the analyser, unlike a probe connection)
// ---------------------------------------------------------------------------------------------

fn proc_tcp_rows() -> Vec<(u16, u16, u8)> {
    let mut rows = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 4 {
                continue;
            }
            let port = |s: &str| {
                s.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    .unwrap_or(0)
            };
            let st = u8::from_str_radix(cols[3], 16).unwrap_or(0);
            rows.push((port(cols[1]), port(cols[2]), st));
        }
    }
    rows
}

/// Something listens on TCP `port`.
pub fn tcp_listening(port: u16) -> bool {
    proc_tcp_rows()
        .iter()
        .any(|&(l, _, st)| l == port && st == 0x0A)
}

/// Number of established TCP connections whose remote end is `port` (i.e. senders connected to
/// a receiver listening on `port`).
pub fn tcp_connections_to(port: u16) -> usize {
    proc_tcp_rows()
        .iter()
        .filter(|&&(_, r, st)| r == port && st == 0x01)
        .count()
}

fn proc_unix_states(path: &Path) -> Vec<u8> {
    let want = path.to_string_lossy();
    let Ok(text) = fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() >= 8 && cols[7] == want {
                u8::from_str_radix(cols[5], 16).ok()
            } else {
                None
            }
        })
        .collect()
}

/// A listening unix socket is bound at `path`.
pub fn unix_listening(path: &Path) -> bool {
    proc_unix_states(path).contains(&0x01)
}

/// Number of accepted (connected) unix stream sockets on the receiver bound at `path`.
pub fn unix_connections_to(path: &Path) -> usize {
    proc_unix_states(path)
        .iter()
        .filter(|&&s| s == 0x03)
        .count()
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

/// Polls with dig until the server at `port` answers `qname` (any rcode).
pub fn wait_dns_ready(server: &mut Server, port: u16, qname: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        server.assert_running();
        let a = dig(port, qname, "A", false, 1);
        if a.rcode.is_some() {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "{} on port {port} did not answer {qname} within {timeout:?}; log:\n{}",
                server.name,
                tail(&server.log_text(), 30)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
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
// The analyser
// ---------------------------------------------------------------------------------------------

/// What the analyser printed: sessions from stdout, the summary from stderr.
#[derive(Debug, Clone)]
pub struct AnalyserOutput {
    pub sessions: Vec<Value>,
    /// stdout lines that are not JSON objects (must be empty)
    pub bad_lines: Vec<String>,
    /// the `{"summary":{...}}` object's inner value, if printed
    pub summary: Option<Value>,
    pub stderr: String,
    pub exit: Option<ExitStatus>,
}

impl AnalyserOutput {
    /// Panics unless the analyser exited 0, printed only JSON lines and a summary.
    pub fn assert_clean(&self, what: &str) {
        assert!(
            self.exit.is_some_and(|s| s.success()),
            "{what}: analyser exit status {:?}; stderr:\n{}",
            self.exit,
            tail(&self.stderr, 40)
        );
        assert!(
            self.bad_lines.is_empty(),
            "{what}: analyser printed non-JSON lines on stdout: {:?}",
            &self.bad_lines[..self.bad_lines.len().min(5)]
        );
        assert!(
            self.summary.is_some(),
            "{what}: no {{\"summary\":...}} line on stderr:\n{}",
            tail(&self.stderr, 40)
        );
    }

    /// Writes the sessions as JSON lines to `path` (for a post-mortem in a kept temp dir).
    pub fn save(&self, path: &Path) {
        let mut text = String::new();
        for s in &self.sessions {
            text.push_str(&s.to_string());
            text.push('\n');
        }
        let _ = fs::write(path, text);
        let _ = fs::write(path.with_extension("stderr"), &self.stderr);
    }

    /// `summary.sessions`
    pub fn summary_sessions(&self) -> Option<u64> {
        self.summary.as_ref()?.get("sessions")?.as_u64()
    }
    /// `summary.messages`
    pub fn summary_messages(&self) -> Option<u64> {
        self.summary.as_ref()?.get("messages")?.as_u64()
    }
}

fn parse_summary(stderr: &str) -> Option<Value> {
    stderr.lines().rev().find_map(|l| {
        let v: Value = serde_json::from_str(l.trim()).ok()?;
        v.get("summary").cloned()
    })
}

/// A running `dnstap-analyser` (serve mode). Stdout is parsed line by line as it arrives.
pub struct Analyser {
    child: Option<Child>,
    pub args: Vec<String>,
    sessions: Arc<Mutex<Vec<Value>>>,
    bad_lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Analyser {
    /// Starts the analyser with `args` (e.g. `["--listen", "tcp://127.0.0.1:25001"]`);
    /// `--format json` is added.
    pub fn start(args: &[String]) -> Analyser {
        let mut cmd = Command::new(analyser_bin());
        cmd.args(args)
            .arg("--format")
            .arg("json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", analyser_bin().display()));
        eprintln!("[live] started analyser pid {}: {args:?}", child.id());
        let sessions = Arc::new(Mutex::new(Vec::new()));
        let bad_lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let (s, b) = (sessions.clone(), bad_lines.clone());
        let t1 = thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v.is_object() => s.lock().unwrap().push(v),
                    _ => b.lock().unwrap().push(line),
                }
            }
        });
        let e = stderr.clone();
        let t2 = thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            loop {
                match r.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        *e.lock().unwrap() = String::from_utf8_lossy(&buf).into_owned();
                    }
                }
            }
        });
        Analyser {
            child: Some(child),
            args: args.to_vec(),
            sessions,
            bad_lines,
            stderr,
            readers: vec![t1, t2],
        }
    }

    fn assert_running(&mut self, what: &str) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                thread::sleep(Duration::from_millis(100));
                panic!(
                    "analyser exited ({st}) while {what}; stderr:\n{}",
                    tail(&self.stderr.lock().unwrap(), 40)
                );
            }
        }
    }

    /// Waits until the analyser listens on TCP `port`.
    pub fn wait_tcp(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !tcp_listening(port) {
            self.assert_running("waiting for its TCP listener");
            assert!(
                Instant::now() < deadline,
                "analyser does not listen on TCP {port} after 15 s"
            );
            thread::sleep(Duration::from_millis(30));
        }
    }

    /// Waits until the analyser listens on the unix socket `path`.
    pub fn wait_unix(&mut self, path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !unix_listening(path) {
            self.assert_running("waiting for its unix listener");
            assert!(
                Instant::now() < deadline,
                "analyser does not listen on unix socket {} after 15 s",
                path.display()
            );
            thread::sleep(Duration::from_millis(30));
        }
    }

    /// Sessions printed so far. The analyser batches stdout, so at a low rate they may only
    /// show up at exit: do not wait on this for correctness.
    pub fn sessions_so_far(&self) -> Vec<Value> {
        self.sessions.lock().unwrap().clone()
    }

    /// SIGTERM (which flushes every open session), wait for the exit, return everything printed.
    pub fn stop(mut self) -> AnalyserOutput {
        let mut child = self.child.take().expect("analyser already stopped");
        let pid = child.id();
        signal_pid(pid, "TERM");
        let exit = wait_child(&mut child, Duration::from_secs(20));
        if exit.is_none() {
            signal_group(pid, "KILL");
            let _ = child.wait();
        }
        for t in self.readers.drain(..) {
            let _ = t.join();
        }
        let stderr = self.stderr.lock().unwrap().clone();
        if exit.is_none() {
            panic!(
                "analyser did not exit within 20 s of SIGTERM; stderr:\n{}",
                tail(&stderr, 40)
            );
        }
        AnalyserOutput {
            sessions: std::mem::take(&mut *self.sessions.lock().unwrap()),
            bad_lines: std::mem::take(&mut *self.bad_lines.lock().unwrap()),
            summary: parse_summary(&stderr),
            stderr,
            exit,
        }
    }
}

impl Drop for Analyser {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(child.id(), "KILL");
            let _ = child.kill();
            let _ = child.wait();
            if thread::panicking() {
                eprintln!(
                    "[live] ---- analyser stderr ----\n{}",
                    tail(&self.stderr.lock().unwrap(), 30)
                );
            }
        }
    }
}

/// `dnstap-analyser read FILE... --format json` plus `extra` options; waits at most 60 s.
pub fn run_read(files: &[PathBuf], extra: &[&str]) -> AnalyserOutput {
    let mut cmd = Command::new(analyser_bin());
    cmd.arg("read")
        .args(files)
        .args(["--format", "json"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let exit = wait_child(&mut child, Duration::from_secs(60));
    if exit.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{desc} did not finish within 60 s");
    }
    let stdout = t_out.join().unwrap();
    let stderr = t_err.join().unwrap();
    let mut sessions = Vec::new();
    let mut bad_lines = Vec::new();
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Value>(line) {
            Ok(v) if v.is_object() => sessions.push(v),
            _ => bad_lines.push(line.to_string()),
        }
    }
    AnalyserOutput {
        sessions,
        bad_lines,
        summary: parse_summary(&stderr),
        stderr,
        exit,
    }
}

// ---------------------------------------------------------------------------------------------
// Starting the servers (templates in tests/live/)
// ---------------------------------------------------------------------------------------------

/// The authoritative upstream: nsd serving example.test (NOERROR/NXDOMAIN) and a broken
/// servfail.test (SERVFAIL); everything else is REFUSED.
pub struct Upstream {
    pub port: u16,
    pub server: Server,
}

pub fn start_nsd(dir: &TempDir) -> Upstream {
    let nsd = require_binary("nsd", "nsd");
    let port = alloc_port();
    for z in ["example.test.zone", "servfail.test.zone"] {
        fs::copy(live_dir().join(z), dir.join(z)).expect("copy zone file");
    }
    let conf = render_to(
        "nsd.conf",
        dir,
        "nsd.conf",
        &[
            ("DIR", dir.path().display().to_string()),
            ("PORT", port.to_string()),
        ],
    );
    let mut cmd = Command::new(nsd);
    cmd.arg("-d").arg("-c").arg(&conf);
    let mut server = Server::spawn("nsd", cmd, dir.join("nsd.stdout"));
    wait_dns_ready(
        &mut server,
        port,
        "ready.example.test",
        Duration::from_secs(15),
    );
    Upstream { port, server }
}

/// Ports and paths of one forwarder under test.
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
    args: impl FnOnce(&mut Command, &Path),
    ready_within: Duration,
) -> Forwarder {
    let bin = require_binary(name, package);
    let port = alloc_port();
    let mut all = vec![
        ("DIR", dir.path().display().to_string()),
        ("PORT", port.to_string()),
        ("UPSTREAM", upstream.to_string()),
        ("SILENT", silent.to_string()),
    ];
    all.extend(vars.iter().cloned());
    let conf_name = format!("{name}.conf");
    let conf = render_to(&conf_name, dir, &conf_name, &all);
    let mut cmd = Command::new(bin);
    args(&mut cmd, &conf);
    let mut server = Server::spawn(name, cmd, dir.join(&format!("{name}.log")));
    wait_dns_ready(&mut server, port, "ready.example.test", ready_within);
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
        Duration::from_secs(20),
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
        Duration::from_secs(30),
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
        Duration::from_secs(20),
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
        Duration::from_secs(20),
    )
}

// ---------------------------------------------------------------------------------------------
// Sessions: accessors and expectations
// ---------------------------------------------------------------------------------------------

/// qname lower-cased without the trailing dot.
pub fn norm_name(s: &str) -> String {
    s.trim_end_matches('.').to_ascii_lowercase()
}

pub fn s_qname(v: &Value) -> String {
    norm_name(v.get("qname").and_then(Value::as_str).unwrap_or(""))
}
pub fn s_status(v: &Value) -> &str {
    v.get("status").and_then(Value::as_str).unwrap_or("")
}
pub fn s_bitmap(v: &Value) -> u64 {
    v.get("bitmap").and_then(Value::as_u64).unwrap_or(u64::MAX)
}
pub fn s_rcode(v: &Value) -> Option<&str> {
    v.get("rcode").and_then(Value::as_str)
}
pub fn s_upstreams(v: &Value) -> Vec<Value> {
    v.get("upstreams")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}
pub fn s_messages(v: &Value) -> Vec<Value> {
    v.get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// One line describing a session, for assertion messages.
pub fn describe(v: &Value) -> String {
    let ups: Vec<String> = s_upstreams(v)
        .iter()
        .map(|u| {
            format!(
                "{}{}{}",
                u.get("address").and_then(Value::as_str).unwrap_or("?"),
                u.get("rcode")
                    .and_then(Value::as_str)
                    .map(|r| format!("={r}"))
                    .unwrap_or_default(),
                if u.get("timeout").and_then(Value::as_bool) == Some(true) {
                    " timeout"
                } else {
                    ""
                }
            )
        })
        .collect();
    let types: Vec<String> = s_messages(v)
        .iter()
        .map(|m| short_type(m.get("type").and_then(Value::as_str).unwrap_or("?")).to_string())
        .collect();
    format!(
        "{}/{} {} {} bitmap={} rcode={} latency_ms={} client={} upstreams=[{}] messages=[{}]",
        s_qname(v),
        v.get("qtype").and_then(Value::as_str).unwrap_or("?"),
        v.get("protocol").and_then(Value::as_str).unwrap_or("?"),
        s_status(v),
        s_bitmap(v),
        s_rcode(v).unwrap_or("null"),
        v.get("latency_ms")
            .map(|l| l.to_string())
            .unwrap_or("-".into()),
        v.get("client").map(|l| l.to_string()).unwrap_or("-".into()),
        ups.join(", "),
        types.join(" ")
    )
}

pub fn short_type(t: &str) -> &str {
    match t {
        "CLIENT_QUERY" => "CQ",
        "CLIENT_RESPONSE" => "CR",
        "FORWARDER_QUERY" => "FQ",
        "FORWARDER_RESPONSE" => "FR",
        "RESOLVER_QUERY" => "RQ",
        "RESOLVER_RESPONSE" => "RR",
        other => other,
    }
}

pub fn describe_all(sessions: &[Value]) -> String {
    let mut s = String::new();
    for v in sessions {
        let _ = writeln!(s, "  {}", describe(v));
    }
    s
}

/// How the upstream leg appears in `messages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpKind {
    /// FORWARDER_QUERY / FORWARDER_RESPONSE (unbound, CoreDNS)
    Forwarder,
    /// RESOLVER_QUERY / RESOLVER_RESPONSE (BIND named)
    Resolver,
    /// no upstream messages at all (kresd, dnsdist)
    None,
}

/// What one expected session looks like.
#[derive(Debug, Clone)]
pub struct Expect {
    pub qname: &'static str,
    pub qtype: &'static str,
    /// "UDP" or "TCP" (client side)
    pub protocol: &'static str,
    pub status: &'static str,
    pub bitmap: u64,
    /// rcode of the CR, None when there is no CR
    pub rcode: Option<&'static str>,
    /// number of entries in `upstreams` (one per FQ/RQ)
    pub attempts: usize,
    /// rcode of every upstream attempt; None = no attempt got a response (timeout, rtt null)
    pub attempt_rcode: Option<&'static str>,
    /// expected `address` of every attempt ("127.0.0.1:15353"), None = not checked
    pub attempt_addr: Option<String>,
    pub up_kind: UpKind,
    /// inclusive latency range in ms (checked when Some; must be null when there is no CR)
    pub latency_ms: Option<(f64, f64)>,
    pub identity: Option<&'static str>,
    /// prefix of `version` (package versions move with Debian updates)
    pub version: Option<&'static str>,
}

impl Expect {
    pub fn new(qname: &'static str, status: &'static str, bitmap: u64) -> Expect {
        Expect {
            qname,
            qtype: "A",
            protocol: "UDP",
            status,
            bitmap,
            rcode: None,
            attempts: 0,
            attempt_rcode: None,
            attempt_addr: None,
            up_kind: UpKind::None,
            latency_ms: None,
            identity: None,
            version: None,
        }
    }
    pub fn rcode(mut self, r: &'static str) -> Self {
        self.rcode = Some(r);
        self
    }
    pub fn qtype(mut self, t: &'static str) -> Self {
        self.qtype = t;
        self
    }
    pub fn tcp(mut self) -> Self {
        self.protocol = "TCP";
        self
    }
    /// `n` upstream attempts of kind `kind`, each answered with `rcode` (None = none answered).
    pub fn attempts(mut self, kind: UpKind, n: usize, rcode: Option<&'static str>) -> Self {
        self.up_kind = kind;
        self.attempts = n;
        self.attempt_rcode = rcode;
        self
    }
    pub fn addr(mut self, a: impl Into<String>) -> Self {
        self.attempt_addr = Some(a.into());
        self
    }
    pub fn latency(mut self, lo: f64, hi: f64) -> Self {
        self.latency_ms = Some((lo, hi));
        self
    }
    pub fn ident(mut self, identity: &'static str, version: &'static str) -> Self {
        self.identity = Some(identity);
        self.version = Some(version);
        self
    }

    pub fn short(&self) -> String {
        format!(
            "{}/{} {} {}/{} rcode={} attempts={}{}",
            self.qname,
            self.qtype,
            self.protocol,
            self.status,
            self.bitmap,
            self.rcode.unwrap_or("null"),
            self.attempts,
            self.attempt_rcode
                .map(|r| format!("={r}"))
                .unwrap_or(" (no answer)".into())
        )
    }

    /// Expected counts of message types in `messages`.
    pub fn message_types(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        if self.bitmap & 1 != 0 {
            m.insert("CLIENT_QUERY".to_string(), 1);
        }
        if self.bitmap & 2 != 0 {
            m.insert("CLIENT_RESPONSE".to_string(), 1);
        }
        let (q, r) = match self.up_kind {
            UpKind::Forwarder => ("FORWARDER_QUERY", "FORWARDER_RESPONSE"),
            UpKind::Resolver => ("RESOLVER_QUERY", "RESOLVER_RESPONSE"),
            UpKind::None => return m,
        };
        if self.attempts > 0 {
            m.insert(q.to_string(), self.attempts);
            if self.attempt_rcode.is_some() {
                m.insert(r.to_string(), self.attempts);
            }
        }
        m
    }

    /// Every mismatch between this expectation and session `v`.
    pub fn check(&self, v: &Value) -> Vec<String> {
        let mut errs = Vec::new();
        let mut want = |ok: bool, msg: String| {
            if !ok {
                errs.push(msg)
            }
        };
        want(
            s_qname(v) == norm_name(self.qname),
            format!("qname {} != {}", s_qname(v), self.qname),
        );
        let qtype = v.get("qtype").and_then(Value::as_str).unwrap_or("");
        want(
            qtype == self.qtype,
            format!("qtype {qtype} != {}", self.qtype),
        );
        let proto = v.get("protocol").and_then(Value::as_str).unwrap_or("");
        want(
            proto == self.protocol,
            format!("protocol {proto} != {}", self.protocol),
        );
        want(
            s_status(v) == self.status,
            format!("status {} != {}", s_status(v), self.status),
        );
        want(
            s_bitmap(v) == self.bitmap,
            format!("bitmap {} != {}", s_bitmap(v), self.bitmap),
        );
        want(
            s_rcode(v) == self.rcode,
            format!("rcode {:?} != {:?}", s_rcode(v), self.rcode),
        );
        let diag = v.get("diagnosis").and_then(Value::as_str).unwrap_or("");
        want(!diag.is_empty(), "diagnosis is empty".into());
        want(
            v.get("loss_reason").is_none_or(Value::is_null) || self.status == "SampleLoss",
            "loss_reason set on a session that is not SampleLoss".into(),
        );
        let ups = s_upstreams(v);
        want(
            ups.len() == self.attempts,
            format!("{} upstream attempts != {}", ups.len(), self.attempts),
        );
        for (i, u) in ups.iter().enumerate() {
            let rc = u.get("rcode").and_then(Value::as_str);
            let timeout = u.get("timeout").and_then(Value::as_bool);
            let rtt = u.get("rtt_ms").and_then(Value::as_f64);
            let addr = u.get("address").and_then(Value::as_str).unwrap_or("");
            match self.attempt_rcode {
                Some(r) => {
                    want(rc == Some(r), format!("upstream #{i} rcode {rc:?} != {r}"));
                    want(
                        timeout == Some(false),
                        format!("upstream #{i} timeout {timeout:?} != false"),
                    );
                    want(
                        rtt.is_some_and(|x| x >= 0.0),
                        format!("upstream #{i} rtt_ms {rtt:?} is not a number >= 0"),
                    );
                }
                None => {
                    want(
                        rc.is_none(),
                        format!("upstream #{i} rcode {rc:?} != null (no answer)"),
                    );
                    want(
                        timeout == Some(true),
                        format!("upstream #{i} timeout {timeout:?} != true"),
                    );
                    want(
                        rtt.is_none(),
                        format!("upstream #{i} rtt_ms {rtt:?} != null"),
                    );
                }
            }
            if let Some(a) = &self.attempt_addr {
                want(addr == a, format!("upstream #{i} address {addr} != {a}"));
            }
        }
        let latency = v.get("latency_ms").and_then(Value::as_f64);
        if self.bitmap & 2 == 0 {
            want(
                latency.is_none(),
                format!("latency_ms {latency:?} without a CR"),
            );
        } else {
            want(
                latency.is_some_and(|l| l >= 0.0),
                format!("latency_ms {latency:?} is not a number >= 0"),
            );
        }
        if let (Some((lo, hi)), Some(l)) = (self.latency_ms, latency) {
            want(
                l >= lo && l <= hi,
                format!("latency_ms {l} not in [{lo}, {hi}]"),
            );
        }
        let mut types: BTreeMap<String, usize> = BTreeMap::new();
        for m in s_messages(v) {
            let t = m
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string();
            *types.entry(t).or_default() += 1;
        }
        let want_types = self.message_types();
        want(
            types == want_types,
            format!("message types {types:?} != {want_types:?}"),
        );
        if let Some(id) = self.identity {
            let got = v.get("identity").and_then(Value::as_str);
            want(got == Some(id), format!("identity {got:?} != {id}"));
        }
        if let Some(ver) = self.version {
            let got = v.get("version").and_then(Value::as_str);
            want(
                got.is_some_and(|g| g.starts_with(ver)),
                format!("version {got:?} does not start with {ver}"),
            );
        }
        errs
    }
}

/// Matches `expected` one to one against `actual` (order-free) and panics with a full report if
/// any expected session is missing or any session is left over.
pub fn assert_sessions(what: &str, actual: &[Value], expected: &[Expect]) {
    let mut left: Vec<Option<&Value>> = actual.iter().map(Some).collect();
    let mut report = String::new();
    let mut failed = false;
    for e in expected {
        let pos = left
            .iter()
            .position(|s| s.is_some_and(|s| e.check(s).is_empty()));
        match pos {
            Some(i) => left[i] = None,
            None => {
                failed = true;
                let _ = writeln!(report, "missing: {}", e.short());
                for s in left.iter().flatten() {
                    if s_qname(s) == norm_name(e.qname) {
                        let _ = writeln!(
                            report,
                            "    closest: {}\n      differs: {}",
                            describe(s),
                            e.check(s).join("; ")
                        );
                    }
                }
            }
        }
    }
    for s in left.iter().flatten() {
        failed = true;
        let _ = writeln!(report, "unexpected: {}", describe(s));
    }
    if failed {
        panic!(
            "{what}: sessions differ from the expectation\n{report}\nall {} sessions:\n{}",
            actual.len(),
            describe_all(actual)
        );
    }
}
