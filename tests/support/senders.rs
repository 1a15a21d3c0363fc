//! Real Frame Streams senders replaying a capture: `fstrm_replay` (fstrm-bin, libfstrm as in
//! unbound, BIND and Knot Resolver) and the Go `dnstap` CLI (CoreDNS's Frame Streams library).

use super::process::run_ok;
use super::require_binary;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn fstrm_replay() -> Command {
    let mut cmd = Command::new(require_binary("fstrm_replay", "fstrm-bin"));
    cmd.args(["-t", "protobuf:dnstap.Dnstap"]);
    cmd
}

fn go_dnstap() -> Command {
    Command::new(require_binary(
        "dnstap",
        "golang-github-dnstap-golang-dnstap-cli",
    ))
}

/// `fstrm_replay` sending `file` to 127.0.0.1:`port`.
pub fn fstrm_replay_tcp(port: u16, file: &Path) -> Command {
    let mut cmd = fstrm_replay();
    cmd.args(["-a", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .arg("-r")
        .arg(file);
    cmd
}

/// `fstrm_replay` sending `file` to the unix socket `socket`.
pub fn fstrm_replay_unix(socket: &Path, file: &Path) -> Command {
    let mut cmd = fstrm_replay();
    cmd.arg("-u").arg(socket).arg("-r").arg(file);
    cmd
}

/// The Go `dnstap` CLI replaying `file` over TCP to `addr` (`127.0.0.1:PORT`).
pub fn go_dnstap_tcp(addr: &str, file: &Path) -> Command {
    let mut cmd = go_dnstap();
    cmd.arg("-r").arg(file).arg("-T").arg(addr);
    cmd
}

/// The Go `dnstap` CLI reading `file` and writing it again as a Frame Streams file `out`.
pub fn go_dnstap_rewrite(file: &Path, out: &Path) -> Command {
    let mut cmd = go_dnstap();
    cmd.arg("-r").arg(file).arg("-w").arg(out);
    cmd
}

/// Runs a sender to completion (at most 120 s), failing with its output if it fails.
pub fn run_sender(cmd: &mut Command) {
    run_ok(cmd, Duration::from_secs(120));
}
