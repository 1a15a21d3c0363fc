//! Child processes: run to the end with a time limit, or keep running as a daemon in its own
//! process group; signals (sent with the `kill` command, no libc); socket state from /proc.

use super::{alloc_port, require_binary, tail};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

fn kill() -> Command {
    Command::new(require_binary("kill", "procps"))
}

pub fn signal_group(pgid: u32, sig: &str) {
    let _ = kill()
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

pub fn signal_pid(pid: u32, sig: &str) {
    let _ = kill()
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits for `child` to exit; None when it is still running after `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
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

/// Runs `cmd` to its end with `stdin` as input and both outputs captured; panics if it cannot
/// start or does not finish within `limit`. The exit status is the caller's to judge.
pub fn run_to_end(cmd: &mut Command, stdin: Option<&str>, limit: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let input = stdin.map(|text| (child.stdin.take().unwrap(), text.as_bytes().to_vec()));
    finish(child, input, limit, &format!("{cmd:?}"))
}

/// Waits for a started `child` to end and returns what it printed on the outputs that are
/// pipes (empty for the others), each read to its end: a line written just before the exit is
/// never missed. Writes `input` to its stdin first (from a thread, so that a child busy writing
/// never deadlocks us). Panics naming `what` if it does not exit within `limit`.
pub fn finish(
    mut child: Child,
    input: Option<(ChildStdin, Vec<u8>)>,
    limit: Duration,
    what: &str,
) -> Output {
    // Drain both pipes in threads so that a child with a lot of output never blocks.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let writer = input.map(|(mut pipe, bytes)| thread::spawn(move || pipe.write_all(&bytes)));
    let Some(status) = wait_child(&mut child, limit) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{what} did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
            text(&stdout.join().unwrap()),
            text(&stderr.join().unwrap())
        );
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Runs `cmd` like [`run_to_end`] and panics with its output unless it exits 0.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> Output {
    let out = run_to_end(cmd, None, limit);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A daemon (its own process group) with stdout and stderr in a log file. Dropping it stops it:
/// SIGTERM to the group, up to 10 s for a clean exit (the dnstap STOP/FINISH handshake happens
/// here), then SIGKILL. On a panic its log is printed.
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
        eprintln!("[test] started {name} pid {}: {desc}", child.id());
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
        if let Some(st) = self.exited() {
            panic!(
                "{} exited early ({st}); log {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log_text(), 40)
            );
        }
    }

    /// The exit status, once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
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
                    "[test] {} (pid {pid}) ignored SIGTERM for 10 s: SIGKILL",
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
                "[test] ---- {} log ({}) ----\n{}",
                self.name,
                self.log.display(),
                tail(&self.log_text(), 30)
            );
        }
    }
}

/// Starts a server on a port from [`alloc_port`] and returns it and its port once `ready(port)`
/// holds (polled for up to `timeout`). The port was free when probed, but a test of another
/// checkout on this machine may take it before the server binds it: a server that exits
/// saying its address is in use is started again on another port (up to 5 times). Any other
/// early exit fails with the server's log.
pub fn start_on_free_port(
    name: &str,
    mut spawn: impl FnMut(u16) -> Server,
    mut ready: impl FnMut(u16) -> bool,
    timeout: Duration,
) -> (Server, u16) {
    const ATTEMPTS: usize = 5;
    for attempt in 1..=ATTEMPTS {
        let port = alloc_port();
        let mut server = spawn(port);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = server.exited() {
                let log = server.log_text();
                if attempt < ATTEMPTS && says_port_taken(&log) {
                    eprintln!("[test] {name}: port {port} was taken before it bound it: again");
                    break;
                }
                panic!("{name} exited early ({st}); log:\n{}", tail(&log, 40));
            }
            if ready(port) {
                return (server, port);
            }
            assert!(
                Instant::now() < deadline,
                "{name} on port {port} not ready within {timeout:?}; log:\n{}",
                tail(&server.log_text(), 30)
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// A server's log says it could not bind its port (the wording of the analyser, nsd, unbound,
/// kresd, dnsdist, CoreDNS and Prometheus, and BIND's "address in use").
pub fn says_port_taken(log: &str) -> bool {
    let log = log.to_ascii_lowercase();
    log.contains("address already in use") || log.contains("address in use")
}

// ---------------------------------------------------------------------------------------------
// Socket state from /proc (no side effects on the analyser, unlike a probe connection)
// ---------------------------------------------------------------------------------------------

const TCP_ESTABLISHED: u8 = 0x01;
const TCP_LISTEN: u8 = 0x0A;

/// (local port, remote port, state) of every TCP socket.
fn proc_tcp_rows() -> Vec<(u16, u16, u8)> {
    let port = |s: &str| {
        s.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
            .unwrap_or(0)
    };
    let mut rows = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() >= 4 {
                let st = u8::from_str_radix(cols[3], 16).unwrap_or(0);
                rows.push((port(cols[1]), port(cols[2]), st));
            }
        }
    }
    rows
}

/// Something listens on TCP `port`.
pub fn tcp_listening(port: u16) -> bool {
    proc_tcp_rows()
        .iter()
        .any(|&(l, _, st)| l == port && st == TCP_LISTEN)
}

/// Number of established TCP connections whose remote end is `port` (i.e. senders connected to
/// a receiver listening on `port`).
pub fn tcp_connections_to(port: u16) -> usize {
    proc_tcp_rows()
        .iter()
        .filter(|&&(_, r, st)| r == port && st == TCP_ESTABLISHED)
        .count()
}

/// Bytes queued for reading on the loopback UDP socket bound to `port` (0: every datagram that
/// arrived has been read); None if no such socket.
pub fn udp_receive_queue(port: u16) -> Option<u64> {
    let text = fs::read_to_string("/proc/net/udp").ok()?;
    text.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let local = cols.get(1)?.rsplit(':').next()?;
        (u16::from_str_radix(local, 16).ok()? == port).then_some(())?;
        let rx = cols.get(4)?.split(':').nth(1)?;
        u64::from_str_radix(rx, 16).ok()
    })
}
