//! The output sink's failures reach the exit status: a full disk stops the process with a
//! message naming the error, in `read` and in serve mode; a reader that closes the pipe
//! (`| head`) ends the output but not the analysis. These runs point stdout somewhere the
//! harness's `read` does not (a full device, a pipe closed early).

mod support;

use std::io::{Read, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use support::{analyser_bin, coredns_fixture, finish, text, Analyser, Listen, Stdout, TempDir};

/// Long enough never to be hit by a working binary; it only keeps a broken one from hanging
/// the test run.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Waits for the child to exit (failing if it does not within `HANG_GUARD`); its stderr read
/// to the end.
fn wait(child: Child, what: &str) -> (Output, String) {
    let out = finish(child, None, HANG_GUARD, what);
    let stderr = text(&out.stderr);
    (out, stderr)
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
    let child = Command::new(analyser_bin())
        .arg("read")
        .arg(coredns_fixture("h_burst_5k.fstrm"))
        .stdout(dev_full())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, stderr) = wait(child, "read > /dev/full");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
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
    let (out, stderr) = wait(child, "read | head -1");
    let first = String::from_utf8_lossy(&first);
    assert!(
        first.starts_with("{\"time\":") && first.contains(",\"status\":"),
        "{first}"
    );
    assert!(out.status.success(), "{}: {stderr}", out.status);
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
    let an = Analyser::serve_with(
        Listen::Unix(socket.clone()),
        &["--shards", "2"],
        Stdout::To(dev_full()),
    );
    // A sender streams a capture (it starts with a unidirectional START) and stays connected:
    // only the failing output can end this process, not the sender or a signal.
    let mut sender = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let capture = std::fs::read(coredns_fixture("h_burst_5k.fstrm")).unwrap();
    // Without the final STOP frame (12 bytes: escape, length, type): the stream stays open.
    let stop = [0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 3];
    assert_eq!(capture[capture.len() - 12..], stop);
    let _ = sender.write_all(&capture[..capture.len() - 12]);
    let out = an.wait_exit(HANG_GUARD);
    drop(sender);
    assert_eq!(out.exit.and_then(|s| s.code()), Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("error: cannot write sessions to stdout: No space left on device"),
        "{}",
        out.stderr
    );
}
