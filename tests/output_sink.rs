//! The output sink's failures reach the exit status: a full disk stops the process with a
//! message naming the error, in `read` and in serve mode; a reader that closes the pipe
//! (`| head`) ends the output but not the analysis. These runs point stdout somewhere the
//! harness's `read`/`Analyser` do not (a full device, a pipe closed early), so they start the
//! binary themselves with the harness's pieces.

mod support;

use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use support::{analyser_bin, coredns_fixture, wait_child, TempDir};

/// Long enough never to be hit by a working binary; it only keeps a broken one from hanging
/// the test run.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Collects a child's stderr on a thread, so a chatty child never blocks on it.
fn collect_stderr(child: &mut Child) -> JoinHandle<String> {
    let mut err = child.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    })
}

/// Waits for the child to exit; kills it and fails if it does not within `HANG_GUARD`.
fn wait(child: &mut Child, what: &str) -> ExitStatus {
    wait_child(child, HANG_GUARD).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what}: the analyser did not exit");
    })
}

/// The exit summary's session count (the summary is the stderr line that starts with it).
fn summary_sessions(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("{\"summary\""))
        .unwrap_or_else(|| panic!("no summary in {stderr}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["summary"]["sessions"].as_u64().unwrap()
}

#[cfg(target_os = "linux")]
fn dev_full() -> Stdio {
    Stdio::from(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap(),
    )
}

#[cfg(target_os = "linux")]
#[test]
fn read_into_a_full_disk_fails_with_the_error() {
    let mut child = Command::new(analyser_bin())
        .arg("read")
        .arg(coredns_fixture("h_burst_5k.fstrm"))
        .stdout(dev_full())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = collect_stderr(&mut child);
    let status = wait(&mut child, "read > /dev/full");
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("error: cannot write sessions to stdout: No space left on device"),
        "{stderr}"
    );
}

#[test]
fn a_reader_that_closes_the_pipe_ends_the_output_not_the_analysis() {
    let mut child = Command::new(analyser_bin())
        .arg("read")
        .arg(coredns_fixture("h_burst_5k.fstrm"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one line, then close the pipe, as `| head -1` does.
    let mut out = child.stdout.take().unwrap();
    let mut first = Vec::new();
    let mut byte = [0u8; 1];
    while out.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        first.push(byte[0]);
    }
    drop(out);
    let stderr = collect_stderr(&mut child);
    let status = wait(&mut child, "read | head -1");
    let stderr = stderr.join().unwrap();
    assert!(first.starts_with(b"{\"kind\":\"session\",\"status\":"));
    assert!(status.success(), "{status}: {stderr}");
    // (The summary names counters such as `server_error`: look for error lines only.)
    assert!(
        !stderr
            .lines()
            .any(|l| l.starts_with("error") || l.contains(": error")),
        "{stderr}"
    );
    assert_eq!(summary_sessions(&stderr), 5000, "every session analysed");
}

#[cfg(target_os = "linux")]
#[test]
fn serve_into_a_full_disk_shuts_down_with_the_error() {
    let dir = TempDir::new("output-sink");
    let socket = dir.join("in.sock");
    let mut child = Command::new(analyser_bin())
        .arg("--listen")
        .arg(format!("unix://{}", socket.display()))
        .args(["--shards", "2", "--metrics-listen", "127.0.0.1:0"])
        .stdout(dev_full())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = collect_stderr(&mut child);
    // A sender streams a capture (it starts with a unidirectional START) and stays connected:
    // only the failing output can end this process, not the sender or a signal.
    let start = Instant::now();
    let mut sender = loop {
        match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(s) => break s,
            Err(e) if start.elapsed() > HANG_GUARD => panic!("cannot connect: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let capture = std::fs::read(coredns_fixture("h_burst_5k.fstrm")).unwrap();
    // Without the final STOP frame (12 bytes: escape, length, type): the stream stays open.
    let stop = [0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 3];
    assert_eq!(capture[capture.len() - 12..], stop);
    let _ = sender.write_all(&capture[..capture.len() - 12]);
    let status = wait(&mut child, "serve > /dev/full");
    drop(sender);
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("error: cannot write sessions to stdout: No space left on device"),
        "{stderr}"
    );
}
