//! The analyser binary: `read` over files ([`read`]), or serving on a loopback TCP port or a
//! unix socket ([`Analyser`]), and what it printed ([`Output`]): session lines on stdout, the
//! `{"summary":...}` line on stderr.

use super::process::{run_to_end, says_port_taken, signal_group, signal_pid};
use super::{alloc_port, analyser_bin, poll_until, tail};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// What one run printed.
#[derive(Debug, Clone)]
pub struct Output {
    /// stdout as printed, one entry per non-empty line
    pub lines: Vec<String>,
    /// the lines that are JSON objects: the sessions
    pub sessions: Vec<Value>,
    /// the `"kind":"lookup"` lines (kept apart: every other list here is of sessions)
    pub lookups: Vec<Value>,
    /// stdout lines that are not JSON objects (must be empty)
    pub bad_lines: Vec<String>,
    /// the inner value of the last `{"summary":{...}}` line on stderr; Null if none
    pub summary: Value,
    pub stderr: String,
    pub exit: Option<ExitStatus>,
}

impl Output {
    fn parse(lines: Vec<String>, stderr: String, exit: Option<ExitStatus>) -> Output {
        let mut sessions = Vec::with_capacity(lines.len());
        let mut bad_lines = Vec::new();
        let mut lookups = Vec::new();
        for line in &lines {
            match serde_json::from_str::<Value>(line) {
                Ok(v) if v["kind"] == "lookup" => lookups.push(v),
                Ok(v) if v.is_object() => sessions.push(v),
                _ => bad_lines.push(line.clone()),
            }
        }
        let summary = stderr
            .lines()
            .rev()
            .find_map(|l| {
                let v: Value = serde_json::from_str(l.trim()).ok()?;
                v.get("summary").cloned()
            })
            .unwrap_or(Value::Null);
        Output {
            lines,
            sessions,
            lookups,
            bad_lines,
            summary,
            stderr,
            exit,
        }
    }

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
            self.summary.is_object(),
            "{what}: no {{\"summary\":...}} line on stderr:\n{}",
            tail(&self.stderr, 40)
        );
    }

    /// "Status/bitmap" -> number of sessions.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for s in &self.sessions {
            *m.entry(format!("{}/{}", s["status"].as_str().unwrap(), s["bitmap"]))
                .or_insert(0) += 1;
        }
        m
    }

    /// Sorted per-session signatures: the facts a replay must reproduce exactly.
    pub fn signatures(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .sessions
            .iter()
            .map(|s| {
                format!(
                    "{} {} {} {} {} {} {} {}",
                    s["status"],
                    s["bitmap"],
                    s["identity"],
                    s["qname"],
                    s["qtype"],
                    s["rcode"],
                    s["dns_id"],
                    s["upstreams"].as_array().map_or(0, |a| a.len())
                )
            })
            .collect();
        v.sort();
        v
    }

    /// `summary.rejected_times`: message times rejected (the messages were kept).
    pub fn rejected_times(&self) -> u64 {
        self.summary["rejected_times"]
            .as_u64()
            .unwrap_or_else(|| panic!("no rejected_times in {}", self.summary))
    }

    /// `summary.dropped.<reason>`; panics when the summary has no such counter.
    pub fn discarded(&self, reason: &str) -> u64 {
        self.summary["dropped"][reason]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {reason} in {}", self.summary))
    }

    /// `summary.sessions`
    pub fn summary_sessions(&self) -> Option<u64> {
        self.summary.get("sessions")?.as_u64()
    }

    /// `summary.messages`
    pub fn summary_messages(&self) -> Option<u64> {
        self.summary.get("messages")?.as_u64()
    }

    /// Messages listed in the printed sessions (all of them when every session is printed).
    pub fn messages_in_sessions(&self) -> u64 {
        self.sessions
            .iter()
            .map(|s| s["messages"].as_array().map_or(0, |m| m.len() as u64))
            .sum()
    }

    /// Writes stdout as printed to `path` and stderr next to it (`.stderr`), for a post-mortem
    /// in a kept temp dir or for a tool that reads the analyser's output files.
    pub fn save(&self, path: &Path) {
        let mut text = String::new();
        for l in &self.lines {
            text.push_str(l);
            text.push('\n');
        }
        fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        let err = path.with_extension("stderr");
        fs::write(&err, &self.stderr).unwrap_or_else(|e| panic!("write {}: {e}", err.display()));
    }
}

/// `dnstap-analyser read FILE... --format json` plus `extra` options; waits at most 60 s and
/// panics unless the run is clean ([`Output::assert_clean`]).
pub fn read(files: &[PathBuf], extra: &[&str]) -> Output {
    let mut cmd = Command::new(analyser_bin());
    cmd.arg("read")
        .args(files)
        .args(["--format", "json"])
        .args(extra);
    let what = format!("{cmd:?}");
    let out = run_to_end(&mut cmd, None, Duration::from_secs(60));
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let out = Output::parse(lines, stderr, Some(out.status));
    out.assert_clean(&what);
    out
}

/// The start of the line an analyser logs once every listener is bound and listening.
const LISTENING: &str = "dnstap-analyser: listening on ";

/// How long an analyser may take to start listening on a loaded machine.
const STARTUP: Duration = Duration::from_secs(60);

/// The port of the first `scheme://` listener in an analyser's log
/// (`dnstap-analyser: listening on URL, URL`, printed once every listener is bound).
pub fn logged_listen_port(stderr: &str, scheme: &str) -> Option<u16> {
    let line = complete_lines(stderr).find_map(|l| l.strip_prefix(LISTENING))?;
    let prefix = format!("{scheme}://");
    line.split(", ").find_map(|url| {
        let addr = url.strip_prefix(&prefix)?;
        addr.rsplit_once(':')?.1.parse().ok()
    })
}

/// The port of the metrics endpoint in an analyser's log
/// (`dnstap-analyser: metrics on http://ADDR/metrics`, `https://` with TLS).
pub fn logged_metrics_port(stderr: &str) -> Option<u16> {
    let url = complete_lines(stderr).find_map(|l| {
        let url = l.strip_prefix("dnstap-analyser: metrics on ")?;
        url.strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
    })?;
    let addr = url.strip_suffix("/metrics")?;
    addr.rsplit_once(':')?.1.parse().ok()
}

/// The lines of a log that is still being written, without the last one until its newline
/// came: stderr is unbuffered, so a line can arrive in pieces (`listening on tcp://127.0.0.1:4`
/// first, `6585` later), and a piece must not be read as the whole.
fn complete_lines(log: &str) -> impl Iterator<Item = &str> {
    log.split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
}

/// Where a serving analyser listens. `Tcp(0)` lets the kernel pick a free port, which the
/// analyser then logs: no other process can take it between choosing and binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(u16),
    Unix(PathBuf),
}

impl Listen {
    pub fn url(&self) -> String {
        match self {
            Listen::Tcp(port) => format!("tcp://127.0.0.1:{port}"),
            Listen::Unix(path) => format!("unix://{}", path.display()),
        }
    }
}

/// Where a serving analyser's stdout (its session lines) goes.
pub enum Stdout {
    /// Collected line by line as it arrives ([`Analyser::sessions_so_far`]).
    Collect,
    /// A pipe nobody reads until [`Analyser::read_stdout`]: once it is full the writer blocks,
    /// as on a stalled log collector.
    Unread,
    /// Somewhere else, e.g. a full device.
    To(Stdio),
}

/// A serving `dnstap-analyser` (its own process group). Stdout lines are collected as they
/// arrive, so a test can watch sessions before stopping it. Dropping it kills it.
pub struct Analyser {
    child: Option<Child>,
    pub listen: Listen,
    pub args: Vec<String>,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    /// The pipe of [`Stdout::Unread`] until it is read.
    unread: Option<ChildStdout>,
    /// The threads reading stdout and stderr; joined (to the pipes' end) before any parsing of
    /// what the process printed last.
    readers: Vec<JoinHandle<()>>,
}

impl Analyser {
    /// Serves on a free loopback TCP port with `extra` options; returns once it listens.
    pub fn serve_tcp(extra: &[&str]) -> Analyser {
        Analyser::serve(Listen::Tcp(0), extra)
    }

    /// Serves on the unix socket `path` with `extra` options; returns once it listens.
    pub fn serve_unix(path: &Path, extra: &[&str]) -> Analyser {
        Analyser::serve(Listen::Unix(path.to_path_buf()), extra)
    }

    /// Serves on `listen` with `extra` options (`--format json` is added); returns once it
    /// listens.
    pub fn serve(listen: Listen, extra: &[&str]) -> Analyser {
        Analyser::serve_with(listen, extra, Stdout::Collect)
    }

    /// Like [`Analyser::serve`], with stdout going where `stdout` says.
    pub fn serve_with(listen: Listen, extra: &[&str], stdout: Stdout) -> Analyser {
        Analyser::start(listen, extra, stdout).unwrap_or_else(|stderr| {
            panic!(
                "analyser exited before it listened; stderr:\n{}",
                tail(&stderr, 40)
            )
        })
    }

    /// Serves with the listener and options `setup(port)` gives for a port from
    /// [`alloc_port`], and returns it and that port once it listens. The port was free when
    /// probed, but a test of another checkout may take it first: then again on another port.
    pub fn serve_on_free_port(setup: impl Fn(u16) -> (Listen, Vec<String>)) -> (Analyser, u16) {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let port = alloc_port();
            let (listen, extra) = setup(port);
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            match Analyser::start(listen, &extra, Stdout::Collect) {
                Ok(an) => return (an, port),
                Err(stderr) if attempt < ATTEMPTS && says_port_taken(&stderr) => {
                    eprintln!("[test] analyser: port {port} was taken before it bound it: again");
                }
                Err(stderr) => panic!("analyser exited before it listened:\n{stderr}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts the analyser and returns once it listens; Err with its stderr, read to the end,
    /// if it exits before.
    fn start(listen: Listen, extra: &[&str], stdout: Stdout) -> Result<Analyser, String> {
        let mut args = vec!["--listen".to_string(), listen.url()];
        args.extend(extra.iter().map(|s| s.to_string()));
        // The metrics endpoint runs in every test, on a free port unless the test picks one:
        // the default 0.0.0.0:9435 would collide between tests running at once.
        if !extra.iter().any(|a| a.starts_with("--metrics-listen")) {
            args.extend(["--metrics-listen".to_string(), "127.0.0.1:0".to_string()]);
        }
        args.extend(["--format".to_string(), "json".to_string()]);
        let (stdout_to, collect) = match stdout {
            Stdout::Collect => (Stdio::piped(), true),
            Stdout::Unread => (Stdio::piped(), false),
            Stdout::To(to) => (to, false),
        };
        let mut child = Command::new(analyser_bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(stdout_to)
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", analyser_bin().display()));
        eprintln!("[test] started analyser pid {}: {args:?}", child.id());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = vec![collect_text(child.stderr.take().unwrap(), stderr.clone())];
        let mut unread = child.stdout.take();
        if collect {
            readers.push(collect_lines(unread.take().unwrap(), lines.clone()));
        }
        let mut an = Analyser {
            child: Some(child),
            listen,
            args,
            lines,
            stderr,
            unread,
            readers,
        };
        an.wait_listening()?;
        Ok(an)
    }

    /// Starts reading the stdout of [`Stdout::Unread`]: its lines are collected from now on.
    pub fn read_stdout(&mut self) {
        let pipe = self.unread.take().expect("stdout is not an unread pipe");
        self.readers.push(collect_lines(pipe, self.lines.clone()));
    }

    /// Returns once every listener is bound and listening: the analyser logs them all in one
    /// line then (ports chosen by the kernel resolved). Err with its stderr if it exits first.
    fn wait_listening(&mut self) -> Result<(), String> {
        let mut exited = false;
        let listening = poll_until(STARTUP, || {
            exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            exited || complete_lines(&self.stderr_so_far()).any(|l| l.starts_with(LISTENING))
        });
        if exited {
            self.child = None;
            self.join_readers();
            return Err(self.stderr_so_far());
        }
        assert!(
            listening,
            "analyser logs no listener after {STARTUP:?}:\n{}",
            self.stderr_so_far()
        );
        if self.listen == Listen::Tcp(0) {
            let port = self
                .bound_port("tcp")
                .expect("a tcp:// listener in its log");
            self.listen = Listen::Tcp(port);
            self.args[1] = self.listen.url();
        }
        Ok(())
    }

    /// The port of its first `scheme://` listener, as bound (port 0 resolved).
    pub fn bound_port(&self, scheme: &str) -> Option<u16> {
        logged_listen_port(&self.stderr_so_far(), scheme)
    }

    /// The loopback port of its metrics endpoint, as bound (port 0 resolved).
    pub fn metrics_port(&self) -> u16 {
        logged_metrics_port(&self.stderr_so_far()).expect("the metrics endpoint in its log")
    }

    /// `127.0.0.1:PORT` of its metrics endpoint (for scrapes and Prometheus targets).
    pub fn metrics_addr(&self) -> String {
        format!("127.0.0.1:{}", self.metrics_port())
    }

    /// Messages received so far, as its metrics endpoint counts them (the shards publish every
    /// 100 ms): with the messages of the printed sessions, it tells what is still open.
    pub fn messages_received(&self) -> u64 {
        let scrape = super::prometheus::scrape_text(&self.metrics_addr());
        super::prometheus::Exposition::parse(&scrape).sum("dnstap_analyser_messages_total", &[])
            as u64
    }

    /// Everything printed on stderr so far (logs, periodic summaries). A poisoned lock is
    /// read anyway: a test that panicked must not hide the analyser's own words.
    pub fn stderr_so_far(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Panics with its stderr, read to the end, if the analyser has exited.
    pub fn assert_running(&mut self, what: &str) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                self.join_readers();
                panic!(
                    "analyser exited ({st}) while {what}; stderr:\n{}",
                    tail(&self.stderr_so_far(), 40)
                );
            }
        }
    }

    /// Sends `sig` (e.g. "TERM", "STOP") to the analyser.
    pub fn signal(&self, sig: &str) {
        signal_pid(self.pid(), sig);
    }

    /// Its process id (e.g. to stall it with SIGSTOP); panics once it is stopped.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("analyser already stopped").id()
    }

    /// The TCP port it listens on.
    pub fn port(&self) -> u16 {
        match &self.listen {
            Listen::Tcp(port) => *port,
            Listen::Unix(path) => panic!("analyser listens on unix {}", path.display()),
        }
    }

    /// `127.0.0.1:PORT` of its TCP listener.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// Session lines printed so far. Complete sessions show up within about a second at low
    /// rates; wait for them with a deadline ([`Analyser::wait_for_sessions`]).
    pub fn sessions_so_far(&self) -> Vec<Value> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["kind"] != "lookup")
            .collect()
    }

    /// Lookup lines printed so far.
    pub fn lookups_so_far(&self) -> Vec<Value> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["kind"] == "lookup")
            .collect()
    }

    /// Waits until at least `n` lines have been printed; false on timeout.
    pub fn wait_for_lines(&self, n: usize, timeout: Duration) -> bool {
        poll_until(timeout, || self.lines.lock().unwrap().len() >= n)
    }

    /// Waits until the sessions printed so far satisfy `done`; false on timeout.
    pub fn wait_for_sessions(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Value]) -> bool,
    ) -> bool {
        poll_until(timeout, || done(&self.sessions_so_far()))
    }

    /// SIGTERM (which flushes every open session), wait for the exit, and return everything
    /// printed; panics unless the run is clean ([`Output::assert_clean`]).
    pub fn stop(self) -> Output {
        let what = format!("analyser {:?}", self.args);
        let out = self.stop_unchecked();
        out.assert_clean(&what);
        out
    }

    /// Like [`Analyser::stop`], leaving the judgement to the caller (e.g. to save the output
    /// first). Panics only if the analyser does not exit within 60 s.
    pub fn stop_unchecked(self) -> Output {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(60))
    }

    /// Waits (at most `limit`) for the analyser to exit by itself or after a signal the test
    /// sent, and returns everything it printed: both pipes are read to their end first.
    /// Leaves the judgement to the caller; panics if it does not exit in time.
    pub fn wait_exit(mut self, limit: Duration) -> Output {
        let mut child = self.child.take().expect("analyser already stopped");
        let pid = child.id();
        let exit = super::process::wait_child(&mut child, limit);
        if exit.is_none() {
            signal_group(pid, "KILL");
            let _ = child.wait();
        }
        // Unread output would keep a stdout reader waiting: nobody reads it any more.
        drop(self.unread.take());
        self.join_readers();
        let stderr = std::mem::take(&mut *self.stderr.lock().unwrap());
        assert!(
            exit.is_some(),
            "analyser did not exit within {limit:?}; stderr:\n{}",
            tail(&stderr, 40)
        );
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        Output::parse(lines, stderr, exit)
    }

    /// Waits for the reading threads, which end at the end of their pipes (the process exited).
    fn join_readers(&mut self) {
        for t in self.readers.drain(..) {
            let _ = t.join();
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
                let stderr = self.stderr_so_far();
                eprintln!("[test] ---- analyser stderr ----\n{}", tail(&stderr, 30));
            }
        }
    }
}

/// Appends every non-empty line of `pipe` to `lines` as it arrives.
fn collect_lines(
    pipe: impl Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']);
                    if !line.trim().is_empty() {
                        lines.lock().unwrap().push(line.to_string());
                    }
                }
            }
        }
    })
}

/// Appends everything `pipe` writes to `text` as it arrives.
fn collect_text(mut pipe: impl Read + Send + 'static, text: Arc<Mutex<String>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => text
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n])),
            }
        }
    })
}
