//! Runs the real analyser binary: offline (`read`) or serving on a loopback port, and
//! collects its session lines and exit summary.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dnstap-analyser")
}

pub fn coredns_fixture(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/coredns")
        .join(name);
    assert!(
        p.exists(),
        "fixture {} missing: ../shared/fixtures must sit beside the checkout",
        p.display()
    );
    p
}

/// What one run printed: session lines on stdout, the summary line on stderr.
pub struct Output {
    pub sessions: Vec<Value>,
    pub summary: Value,
    pub stderr: String,
}

impl Output {
    fn parse(stdout: &[u8], stderr: String) -> Self {
        let sessions = stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_slice(l)
                    .unwrap_or_else(|e| panic!("bad line {e}: {}", String::from_utf8_lossy(l)))
            })
            .collect();
        let summary_line = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("{\"summary\""))
            .unwrap_or_else(|| panic!("no summary line on stderr:\n{stderr}"));
        let summary: Value = serde_json::from_str(summary_line).unwrap();
        Output {
            sessions,
            summary: summary["summary"].clone(),
            stderr,
        }
    }

    /// (status, bitmap) -> count, as "Status/bitmap" strings sorted.
    pub fn counts(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
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

    pub fn discarded(&self, reason: &str) -> u64 {
        self.summary["dropped"][reason]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {reason}"))
    }
}

pub fn read(files: &[PathBuf], extra: &[&str]) -> Output {
    let out = Command::new(bin())
        .arg("read")
        .args(files)
        .args(extra)
        .output()
        .expect("run dnstap-analyser read");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "read failed: {stderr}");
    Output::parse(&out.stdout, stderr)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A serving analyser; SIGTERM on `stop` (and on drop, if a test panics first).
pub struct Served {
    child: Option<Child>,
    /// Session lines as they arrive, so a test can watch them before stopping the analyser.
    lines: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    stdout: Option<JoinHandle<()>>,
    stderr: Option<JoinHandle<String>>,
    pub port: u16,
}

impl Served {
    pub fn start(extra: &[&str]) -> Served {
        let port = free_port();
        let mut child = Command::new(bin())
            .arg("--listen")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dnstap-analyser");
        let mut out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stdout = std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("analyser did not start listening");
        Served {
            child: Some(child),
            lines,
            stdout: Some(stdout),
            stderr: Some(stderr),
            port,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGTERM, wait for exit 0, and return what it printed.
    pub fn stop(mut self) -> Output {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "analyser did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        self.stdout.take().unwrap().join().unwrap();
        let stderr = self.stderr.take().unwrap().join().unwrap();
        assert!(status.success(), "analyser exited with {status}: {stderr}");
        let stdout = std::mem::take(&mut *self.lines.lock().unwrap());
        Output::parse(&stdout, stderr)
    }

    /// Waits until at least `n` complete session lines have been printed; false on timeout.
    pub fn wait_for_lines(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                >= n
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The Go `dnstap` CLI (CoreDNS's Frame Streams library) replaying a capture over TCP.
pub fn go_dnstap_tcp(addr: &str, file: &Path) -> Command {
    let mut cmd = Command::new("dnstap");
    cmd.arg("-r").arg(file).arg("-T").arg(addr);
    cmd
}

/// `fstrm_replay` (fstrm-bin) sending a capture to the analyser over TCP.
pub fn fstrm_replay_tcp(port: u16, file: &Path) -> Command {
    let mut cmd = Command::new("fstrm_replay");
    cmd.args(["-t", "protobuf:dnstap.Dnstap", "-a", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .arg("-r")
        .arg(file);
    cmd
}

/// Runs a sender command to completion, failing with its output if it fails.
pub fn run_sender(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install fstrm-bin and golang-github-dnstap-golang-dnstap-cli: .ci/install-deps)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
