//! The command line where people first touch it (issue #17): a startup error is the error alone
//! (no all-zero summary) and exit 2; `read` says when a file is not a Frame Streams capture or is
//! empty; a long `read` shows a progress bar on a terminal and nothing extra anywhere else.

mod support;

use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::Duration;
use support::*;

fn analyser(args: &[&str]) -> Output {
    run_to_end(
        Command::new(analyser_bin()).args(args),
        None,
        Duration::from_secs(60),
    )
}

/// A failure before anything ran: exit 2, the error, and no summary line.
fn assert_startup_error(out: &Output, why: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("dnstap-analyser: error: "), "{stderr}");
    assert!(stderr.contains(why), "want {why:?} in:\n{stderr}");
    assert!(!stderr.contains("{\"summary\""), "no summary: {stderr}");
}

#[test]
fn startup_errors_say_why_and_print_no_summary() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let dir = TempDir::new("cli-startup");
    let serve = |extra: &[&str]| {
        let mut args = vec!["--metrics-listen", "127.0.0.1:0"];
        args.extend(extra);
        analyser(&args)
    };
    let listen_taken = format!("tcp://{taken}");
    assert_startup_error(
        &serve(&["--listen", &listen_taken]),
        "Address already in use",
    );
    let no_dir = format!("unix://{}/no/such/dir/tap.sock", dir.path().display());
    assert_startup_error(&serve(&["--listen", &no_dir]), "cannot listen on unix://");
    let missing = dir.join("missing.pem").display().to_string();
    let tls = [
        "--listen",
        "tls://127.0.0.1:0",
        "--tls-cert",
        &missing,
        "--tls-key",
        &missing,
    ];
    assert_startup_error(&serve(&tls), "missing.pem");
    let metrics_taken = analyser(&["--listen", "tcp://127.0.0.1:0", "--metrics-listen", &taken]);
    assert_startup_error(&metrics_taken, "cannot serve metrics on");
    let read_metrics_taken = analyser(&[
        "read",
        "--metrics-listen",
        &taken,
        coredns_fixture("a_hosts.fstrm").to_str().unwrap(),
    ]);
    assert_startup_error(&read_metrics_taken, "cannot serve metrics on");
}

#[test]
fn read_names_files_that_are_not_captures_and_reads_the_good_ones() {
    let dir = TempDir::new("cli-files");
    let empty = dir.join("empty.fstrm");
    std::fs::write(&empty, b"").unwrap();
    let good = coredns_fixture("b_forward.fstrm");
    let alone = read(std::slice::from_ref(&good), &[]);
    for (bad, why) in [
        (
            std::path::PathBuf::from("/etc/passwd"),
            "not a Frame Streams file",
        ),
        (empty.clone(), "empty file"),
        (dir.join("missing.fstrm"), "No such file"),
    ] {
        let out = analyser(&["read", bad.to_str().unwrap(), good.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", bad.display());
        assert!(stderr.contains(why), "{}: {stderr}", bad.display());
        assert!(!stderr.contains("max-frame-size"), "{stderr}");
        // The good file is read all the same, and the run is summarised.
        let lines = text(&out.stdout).lines().count();
        assert_eq!(lines, alone.sessions.len(), "{}", bad.display());
        assert!(stderr.contains("{\"summary\""), "{stderr}");
    }
}

#[test]
fn a_capture_of_start_and_stop_alone_is_read_with_no_sessions() {
    let dir = TempDir::new("cli-start-stop");
    let ct = b"protobuf:dnstap.Dnstap";
    let mut bytes = vec![0, 0, 0, 0, 0, 0, 0, 12 + ct.len() as u8, 0, 0, 0, 2];
    bytes.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, ct.len() as u8]);
    bytes.extend_from_slice(ct);
    bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 3]);
    let file = dir.join("start-stop.fstrm");
    std::fs::write(&file, bytes).unwrap();
    let out = read(&[file], &[]);
    assert_eq!(out.summary_sessions(), Some(0));
}

#[test]
fn read_shows_progress_on_a_terminal_and_nothing_elsewhere() {
    let burst = coredns_fixture("h_burst_5k.fstrm");
    let files = vec![burst.display().to_string(); 10];
    // Not a terminal: the summary line is all of stderr.
    let mut args = vec!["read"];
    args.extend(files.iter().map(String::as_str));
    let piped = analyser(&args);
    let stderr = text(&piped.stderr);
    assert!(piped.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("{\"summary\""), "{stderr}");
    // On a terminal (`script` gives it one), sessions going to a file: the bar, then cleared.
    // A fast machine reads the files before the first redraw: the bar may only ever show
    // `0 B/13.20 MiB`, so bytes are checked as `B/` of a total in MiB.
    let script = require_binary("script", "bsdutils");
    let command = format!(
        "{} read {} > /dev/null",
        analyser_bin().display(),
        files.join(" ")
    );
    let tty = run_to_end(
        Command::new(script).args(["-qec", &command, "/dev/null"]),
        None,
        Duration::from_secs(60),
    );
    let screen = text(&tty.stdout);
    assert!(tty.status.success(), "{screen}");
    for part in ["B/", "MiB", "%", "sessions", "ETA", "{\"summary\""] {
        assert!(
            screen.contains(part),
            "no {part:?} on the terminal:\n{screen}"
        );
    }
}

/// The long flags a help text lists (`--name` at the start of an option line).
fn long_flags(help: &str) -> std::collections::BTreeSet<String> {
    help.lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .filter_map(|l| l.split([' ', '=', '<', ',']).next())
        .map(|f| format!("--{f}"))
        .collect()
}

#[test]
fn top_help_lists_only_tops_flags_and_refuses_the_servers() {
    let help = |args: &[&str]| {
        let out = analyser(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let server = long_flags(&help(&["--help"]));
    let top = long_flags(&help(&["top", "--help"]));
    let read = long_flags(&help(&["read", "--help"]));
    let own: std::collections::BTreeSet<String> = [
        "--url",
        "--tls-ca",
        "--user",
        "--password-file",
        "--interval",
        "--once",
        "--rows",
        "--width",
        "--height",
    ]
    .map(String::from)
    .into();
    assert_eq!(top, own, "top --help");
    assert_eq!(long_flags(&help(&["help", "top"])), own, "help top");
    // The server's flags stay where they apply: serving, and `read`, before or after it.
    for flag in [
        "--listen",
        "--shards",
        "--log",
        "--metrics-listen",
        "--max-lookups",
    ] {
        assert!(server.contains(flag), "--help lacks {flag}: {server:?}");
        assert!(read.contains(flag), "read --help lacks {flag}: {read:?}");
    }
    assert!(server.len() > 30, "{server:?}");
    let fixture = coredns_fixture("a_hosts.fstrm").display().to_string();
    for args in [
        ["--log", "failed", "read", fixture.as_str()],
        ["read", "--log", "failed", fixture.as_str()],
    ] {
        let out = analyser(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    // A server flag given to `top` is an error naming it, not silently ignored.
    let out = analyser(&["top", "--once", "--shards", "2"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--shards is a flag of the analyser, not of `top`"),
        "{stderr}"
    );
    assert!(stderr.contains("Usage: dnstap-analyser top"), "{stderr}");
}
