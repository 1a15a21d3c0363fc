//! End to end at small scale: the real analyser receives the load generator's CoreDNS-shaped
//! traffic over TCP on loopback, and `dnstap-loadgen verify` checks every reported session
//! against the ground truth. No timing assertions: the machine is shared and noisy.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn analyser() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dnstap-analyser"))
}

/// `cargo test --workspace` builds the loadgen binary next to the analyser; when only this
/// package is tested, build it the same way.
fn loadgen() -> PathBuf {
    let path = analyser().with_file_name("dnstap-loadgen");
    if !path.exists() {
        let release = analyser().parent().is_some_and(|d| d.ends_with("release"));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "dnstap-loadgen", "--bin", "dnstap-loadgen"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "building dnstap-loadgen failed");
    }
    assert!(path.exists(), "{} not found", path.display());
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_with_timeout(child: &mut Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loadgen-verify-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Sends `sessions` at `rate` into a fresh analyser, stops it with SIGTERM, and returns
/// verify's exit status and report.
fn run_and_verify(name: &str, extra: &[&str]) -> (bool, String) {
    // One scenario at a time: two analysers and two generators on a 2-core machine would
    // only measure contention.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch(name);
    let port = free_port();
    let out = dir.join("sessions.jsonl");
    let err = dir.join("analyser.stderr");
    let mut analyser = Command::new(analyser())
        .args([
            "--listen",
            &format!("tcp://127.0.0.1:{port}"),
            "--shards",
            "2",
            // Unoptimised test builds on a shared machine may fall behind for a moment: a
            // deep queue makes them buffer instead of shedding, so the match can be exact.
            "--queue-capacity",
            "1000000",
        ])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let truth = dir.join("truth.json");
    let truth_sessions = dir.join("truth.tsv");
    let mut gen = Command::new(loadgen())
        .args(["run", "--connect", &format!("127.0.0.1:{port}")])
        .args([
            "--connections",
            "4",
            "--sessions",
            "20000",
            "--rate",
            "5000",
            "--seed",
            "7",
        ])
        .args(["--connect-timeout", "20"])
        .arg("--truth")
        .arg(&truth)
        .arg("--truth-sessions")
        .arg(&truth_sessions)
        .args(extra)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let gen_status = wait_with_timeout(&mut gen, Duration::from_secs(120), "dnstap-loadgen run");
    let term = Command::new("kill")
        .args(["-TERM", &analyser.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let st = wait_with_timeout(&mut analyser, Duration::from_secs(60), "dnstap-analyser");
    assert!(
        gen_status.success(),
        "loadgen failed; analyser stderr:\n{}",
        read(&err)
    );
    assert!(
        st.success(),
        "analyser exited with {st}; stderr:\n{}",
        read(&err)
    );
    let v = Command::new(loadgen())
        .arg("verify")
        .arg("--ground-truth")
        .arg(&truth)
        .arg("--truth-sessions")
        .arg(&truth_sessions)
        .arg("--summary")
        .arg(&err)
        .arg("--sessions")
        .arg(&out)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    if v.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("inputs kept in {}", dir.display());
    }
    (v.status.success(), report)
}

#[test]
fn every_session_is_classified_as_generated() {
    let (ok, report) = run_and_verify("exact", &[]);
    println!("{report}");
    assert!(ok, "verify failed:\n{report}");
    assert!(
        report.contains("\"lines_matched_exactly\": 20000"),
        "{report}"
    );
}

#[test]
fn sessions_that_lost_messages_are_sample_loss() {
    let (ok, report) = run_and_verify("loss", &["--loss", "0.01"]);
    println!("{report}");
    assert!(ok, "verify failed:\n{report}");
}
