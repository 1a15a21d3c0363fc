//! The one test harness: every integration test includes it with `mod support;`.
//!
//! - [`analyser`]: the analyser binary in `read` or serve mode ([`read`], [`Analyser`]), its
//!   session lines and `{"summary":...}` line ([`Output`]).
//! - [`senders`]: Frame Streams senders replaying captures (fstrm_replay, the Go `dnstap` CLI).
//! - [`servers`]: real DNS servers on loopback (nsd, unbound, named, kresd, dnsdist, CoreDNS),
//!   a silent upstream, dig and dnsperf.
//! - [`sessions`]: expected sessions ([`Expect`]) and their order-free comparison.
//! - [`process`]: child processes with time limits, signals, socket state from /proc.
//! - [`http`]: a minimal HTTP client for loopback servers (metrics port, Prometheus API).
//! - [`prometheus`]: a real Prometheus server scraping targets, its query API, `promtool`, and
//!   a parser for the text exposition of a scrape.
//!
//! Rules this harness enforces:
//! - Inputs come from the repository (`tests/fixtures/`, `tests/live/`); only the optional
//!   CoreDNS binary comes from outside, through `COREDNS` ([`coredns_binary`]).
//! - A missing tool fails the test naming the Debian package that provides it
//!   ([`require_binary`], [`require_venv_tool`]); nothing is skipped silently.
//! - Only loopback addresses. The analyser binds port 0 and logs the ports it got; the other
//!   servers get ports from 25000-25999 ([`alloc_port`]), and start again on another port when
//!   a test of another checkout took theirs between the probe and the bind
//!   ([`start_on_free_port`], [`Analyser::serve_on_free_port`]).
//! - Race-free under load: a child's output is read to its end before anything in it is parsed
//!   ([`finish`], [`Analyser::wait_exit`]), a log still being written by complete lines only;
//!   waits poll a condition with a generous deadline ([`wait_until`]). A fixed sleep only lets
//!   a clock pass (a timeout to expire), never stands for something to happen.
//! - Every process started here is killed when its guard is dropped, also when the test panics.
#![allow(dead_code, unused_imports)]

pub mod analyser;
pub mod http;
pub mod lookups;
pub mod process;
pub mod prometheus;
pub mod senders;
pub mod servers;
pub mod sessions;
pub mod tls;

pub use analyser::*;
pub use http::*;
pub use lookups::*;
pub use process::*;
pub use prometheus::*;
pub use senders::*;
pub use servers::*;
pub use sessions::*;
pub use tls::*;

use std::fs;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Paths and programs
// ---------------------------------------------------------------------------------------------

/// The repository root (the analyser's package).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The analyser binary cargo built for the integration tests.
pub fn analyser_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dnstap-analyser"))
}

/// The load generator binary. `cargo test --workspace` builds it next to the analyser; when only
/// the analyser's package is tested, it is built here the same way (release or not).
pub fn loadgen_bin() -> PathBuf {
    let analyser = analyser_bin();
    let path = analyser.with_file_name("dnstap-loadgen");
    if !path.exists() {
        let release = analyser.parent().is_some_and(|d| d.ends_with("release"));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-p", "dnstap-loadgen", "--bin", "dnstap-loadgen"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.current_dir(repo_root()).status().unwrap();
        assert!(status.success(), "building dnstap-loadgen failed");
    }
    assert!(path.exists(), "{} not found", path.display());
    path
}

/// `tests/fixtures/`: the real captures (see its README.md).
pub fn fixtures_dir() -> PathBuf {
    let dir = repo_root().join("tests").join("fixtures");
    assert!(
        dir.is_dir(),
        "fixture folder {} is missing from the checkout",
        dir.display()
    );
    dir
}

/// `tests/fixtures/<server>/<file>`, which must exist.
pub fn fixture(server: &str, file: &str) -> PathBuf {
    let p = fixtures_dir().join(server).join(file);
    assert!(p.is_file(), "fixture {} is missing", p.display());
    p
}

/// `tests/fixtures/coredns/<file>`.
pub fn coredns_fixture(file: &str) -> PathBuf {
    fixture("coredns", file)
}

/// `tests/live/`: config templates and zone files of the live tests.
pub fn live_dir() -> PathBuf {
    repo_root().join("tests").join("live")
}

/// Finds a program on PATH or in the sbin directories (root's PATH is not always inherited).
/// Panics naming the Debian package that provides it: a missing tool is a failure, never a skip.
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

/// A program of the Python virtual environment `.ci/venv` (from the PyPI package
/// `pypi_package`). Panics saying how to create it when it is missing.
pub fn require_venv_tool(name: &str, pypi_package: &str) -> PathBuf {
    let path = repo_root().join(".ci/venv/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `.ci/install-deps` (it creates .ci/venv with the PyPI package \
         `{pypi_package}`)",
        path.display()
    );
    path
}

/// The real CoreDNS binary named by the environment variable `COREDNS` (`.ci/run` sets it when
/// CI provides one). None when unset: the caller says loudly that it did not run.
pub fn coredns_binary() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("COREDNS").filter(|v| !v.is_empty())?);
    assert!(
        path.is_file(),
        "COREDNS={} is not a file: point it at a CoreDNS binary or unset it",
        path.display()
    );
    Some(path)
}

// ---------------------------------------------------------------------------------------------
// Ports, temp dirs, templates, waiting
// ---------------------------------------------------------------------------------------------

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A loopback port in 25000-25999 that is free for both TCP and UDP right now.
pub fn alloc_port() -> u16 {
    const LO: u16 = 25000;
    const SPAN: u16 = 1000;
    // Start at a random offset so that two test processes (say two CI jobs on one host,
    // whose fresh containers have the same pids) rarely probe the same ports in step.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id();
    let _ = NEXT_PORT.compare_exchange(
        0,
        (seed % SPAN as u32) as u16 + 1,
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

/// A loopback TCP port where nothing listens for as long as the returned socket lives: it is
/// bound, never listening, so a connection is refused and no other process can bind the port.
/// (A port probed free and released, as [`alloc_port`] gives, may be taken by a server of
/// another test before it is used.)
pub fn refusing_port() -> (socket2::Socket, u16) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a TCP socket");
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind a loopback port");
    let port = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("the bound address")
        .port();
    (socket, port)
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A temp dir removed on drop (kept when the test panics, or with DNSTAP_LIVE_KEEP=1).
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let mut base = std::env::temp_dir();
        // unix socket paths must stay below ~100 bytes
        if base.as_os_str().len() > 40 {
            base = PathBuf::from("/tmp");
        }
        let n = NEXT_DIR.fetch_add(1, Ordering::SeqCst);
        let path = base.join(format!("dnstap-test-{}-{}-{}", std::process::id(), n, tag));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path, keep: false }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
    /// Keeps the directory after the test (for a failure found after the fact).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

/// A `&TempDir` goes wherever a `&Path` does.
impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep || thread::panicking() || std::env::var_os("DNSTAP_LIVE_KEEP").is_some() {
            eprintln!("[test] keeping {}", self.path.display());
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
    if let Some(left) = placeholder(&text) {
        panic!("template {template}: placeholder {left} not substituted");
    }
    text
}

/// The first `@UPPER_CASE@` placeholder in `text`: any one left is a bug in the test.
fn placeholder(text: &str) -> Option<String> {
    let b = text.as_bytes();
    (0..b.len()).find_map(|i| {
        let rest = &b[i + 1..];
        let n = rest
            .iter()
            .take_while(|c| c.is_ascii_uppercase() || **c == b'_')
            .count();
        (b[i] == b'@' && n > 0 && rest.get(n) == Some(&b'@'))
            .then(|| String::from_utf8_lossy(&b[i..i + n + 2]).into_owned())
    })
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

/// Polls `f` until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    assert!(
        poll_until(timeout, &mut f),
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// Polls `f` until it holds or `timeout` passes; says which.
pub fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}
