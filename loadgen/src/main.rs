use clap::{Args, Parser, Subcommand};
use dnstap_loadgen::dnswire;
use dnstap_loadgen::gen::{self, Config, Outcome};
use dnstap_loadgen::run::{self, Output, RunOptions};
use dnstap_loadgen::send::{Target, TlsClient};
use dnstap_loadgen::verify::{self, Logged};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Load generator for dnstap-analyser: emulates CoreDNS pods sending dnstap over Frame
/// Streams (bidirectional handshake), prints the ground truth of what it sent, and verifies
/// the analyser's output against it.
#[derive(Parser)]
#[command(name = "dnstap-loadgen", version, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate traffic: send it to a receiver (--connect) or write a .fstrm file (--write),
    /// then print the ground-truth JSON summary.
    Run(Box<RunArgs>),
    /// Compare a run's ground truth with the analyser's summary line and/or session lines;
    /// exits 1 on any difference.
    Verify(VerifyArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Receiver address: tcp://HOST:PORT, HOST:PORT or unix:///path/to.sock.
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with = "write",
        required_unless_present = "write"
    )]
    connect: Option<String>,
    /// Send over TLS (the receiver's tls:// listener), as CoreDNS's `dnstap tls://` does.
    #[arg(long, requires_all = ["connect", "tls_ca"])]
    tls: bool,
    /// PEM CA certificates to trust for the receiver's certificate (with --tls).
    #[arg(long, value_name = "FILE", requires = "tls")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate chain for mTLS (with --tls-key).
    #[arg(long, value_name = "FILE", requires_all = ["tls", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Local address to connect from, e.g. 127.0.0.2: the analyser tells senders apart by
    /// peer address and identity, so pods on distinct loopback addresses are distinct senders.
    #[arg(long, value_name = "IP", requires = "connect")]
    bind: Option<std::net::IpAddr>,
    /// Name the receiver's certificate must carry; default: the host of --connect.
    #[arg(long, value_name = "NAME", requires = "tls")]
    tls_server_name: Option<String>,
    /// Write one Frame Streams file (START, data, STOP; all pods merged in time order)
    /// instead of sending.
    #[arg(long, value_name = "FILE")]
    write: Option<PathBuf>,
    /// Emulated CoreDNS pods: one connection each, identity coredns-<i>, version CoreDNS-1.11.3.
    #[arg(long, default_value_t = 4, value_name = "N")]
    connections: u32,
    /// Sessions per second over all pods, or "max" (as fast as the receiver reads). Paced runs
    /// stamp messages with the wall clock.
    #[arg(long, default_value = "max", value_name = "R|max")]
    rate: String,
    /// Stop starting sessions after this many seconds (with --rate: sessions = rate x
    /// duration).
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Sessions over all pods. Without --duration the default is 100000; a run is always
    /// bounded.
    #[arg(long, value_name = "N")]
    sessions: Option<u64>,
    /// Event-time sessions per second for max-rate and --write runs (the synthetic clock
    /// advances 1/RATE per session, so upstream timeouts resolve within the stream; sessions
    /// in flight at the analyser ~ RATE x --session-timeout). Paced runs use --rate.
    #[arg(long, default_value_t = 100_000.0, value_name = "R")]
    event_rate: f64,
    /// Outcome mix weights: local (CQ CR), forward (CQ FQ FR CR), timeout (CQ, FQ per failed
    /// attempt, no CR), no_response (CQ only).
    #[arg(
        long,
        default_value = "local=3,forward=15,timeout=5,no_response=1",
        value_name = "MIX"
    )]
    mix: String,
    /// Share of forwarded sessions whose first upstream attempt times out before a retry is
    /// answered (CQ FQ, 2 s later FQ FR, CR: still Succeeded/15 or Failed/15).
    #[arg(long, default_value_t = 0.05, value_name = "P")]
    retry_share: f64,
    /// Client-visible rcode mix weights for answered sessions (NOERROR and NXDOMAIN are
    /// Succeeded, the others Failed).
    #[arg(
        long,
        default_value = "NOERROR=80,NXDOMAIN=15,SERVFAIL=3,REFUSED=2",
        value_name = "MIX"
    )]
    rcodes: String,
    /// Distinct qnames per class (cluster-local and external), drawn from a Zipf distribution.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    names: usize,
    /// Zipf exponent for qname popularity (1.0: the hottest name gets ~10% of 10k names).
    #[arg(long, default_value_t = 1.0, value_name = "S")]
    zipf: f64,
    /// Client address pool size (10.244.x.y; at most 64000).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    clients: u32,
    /// Share of pods logging clients as 16-byte IPv4-mapped addresses (CoreDNS on a wildcard
    /// listener); upstream addresses are always 16 bytes.
    #[arg(long, default_value_t = 0.5, value_name = "P")]
    mapped_ipv4: f64,
    /// Share of AAAA queries (the rest are A).
    #[arg(long, default_value_t = 0.2, value_name = "P")]
    aaaa_share: f64,
    /// Upstream timeouts: attempts per timed-out session, 1..=N (each 2 s apart).
    #[arg(long, default_value_t = 3, value_name = "N")]
    max_attempts: u8,
    /// Fraction of messages the sender drops, in bursts of consecutive messages as CoreDNS
    /// does when its queue is full. Sessions that lost a message are recorded.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    loss: f64,
    /// Loss burst length range in messages.
    #[arg(long, default_value = "8-24", value_name = "MIN-MAX")]
    loss_burst: String,
    /// Seed: the same seed and flags give byte-identical traffic.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the ground-truth JSON here instead of stdout.
    #[arg(long, value_name = "FILE")]
    truth: Option<PathBuf>,
    /// Write one ground-truth line per session (TSV) for `verify --sessions`.
    #[arg(long, value_name = "FILE")]
    truth_sessions: Option<PathBuf>,
    /// Generate each pod's whole stream in memory before sending (max rate: measures the
    /// receiver, not the generator). Needs a session count.
    #[arg(long)]
    pregen: bool,
    /// Bytes encoded per write.
    #[arg(long, default_value_t = 256 * 1024, value_name = "BYTES")]
    chunk: usize,
    /// Seconds to keep retrying the connection and to wait for ACCEPT.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    connect_timeout: f64,
    /// Seconds to wait for FINISH after STOP.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    finish_timeout: f64,
}

#[derive(Args)]
struct VerifyArgs {
    /// Ground-truth JSON written by `run` (stdout or --truth).
    #[arg(long, value_name = "FILE")]
    ground_truth: PathBuf,
    /// Per-session ground truth written by `run --truth-sessions` (needed with --sessions).
    #[arg(long, value_name = "FILE")]
    truth_sessions: Option<PathBuf>,
    /// The analyser's stderr (its last {"summary":...} line is used).
    #[arg(long, value_name = "FILE")]
    summary: Option<PathBuf>,
    /// The analyser's JSON session lines (stdout, --format json): each is matched to a
    /// generated session by (identity, qname, DNS id, client).
    #[arg(long, value_name = "FILE")]
    sessions: Option<PathBuf>,
    /// Which statuses the analyser printed (its --log): all, or a comma list of succeeded,
    /// failed, sampleloss.
    #[arg(long, default_value = "all", value_name = "LIST")]
    logged: String,
}

fn parse_weights(s: &str, what: &str) -> Result<Vec<(String, f64)>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| format!("--{what}: expected NAME=WEIGHT, got {p:?}"))?;
            let w: f64 = v
                .trim()
                .parse()
                .map_err(|_| format!("--{what}: bad weight {v:?}"))?;
            if !(w >= 0.0 && w.is_finite()) {
                return Err(format!("--{what}: bad weight {v:?}"));
            }
            Ok((k.trim().to_string(), w))
        })
        .collect()
}

/// `--tls`: the TCP target wrapped in TLS with the CA, name and client certificate given.
fn with_tls(target: Target, a: &RunArgs) -> Result<Target, String> {
    if !a.tls {
        return Ok(target);
    }
    let Target::Tcp(addr) = target else {
        return Err("--tls needs a TCP --connect address".into());
    };
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => addr.as_str(),
    };
    let name = a.tls_server_name.as_deref().unwrap_or(host);
    let ca = a.tls_ca.as_deref().ok_or("--tls needs --tls-ca")?;
    let client = a.tls_cert.as_deref().zip(a.tls_key.as_deref());
    let tls = TlsClient::new(ca, name, client)?;
    Ok(Target::Tls(addr, tls))
}

fn build(a: &RunArgs) -> Result<(Config, RunOptions), String> {
    let mut cfg = Config::default();
    if a.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    cfg.pods = a.connections;
    cfg.seed = a.seed;
    let rate = match a.rate.as_str() {
        "max" | "0" => None,
        r => {
            let v: f64 = r
                .parse()
                .map_err(|_| format!("--rate: {r:?} is not a number or max"))?;
            if !(v > 0.0 && v.is_finite()) {
                return Err("--rate must be positive".into());
            }
            Some(v)
        }
    };
    let duration = a.duration.map(|d| {
        if d > 0.0 && d.is_finite() {
            Ok(Duration::from_secs_f64(d))
        } else {
            Err("--duration must be positive".to_string())
        }
    });
    let duration = duration.transpose()?;
    cfg.sessions = match (a.sessions, duration, rate) {
        (Some(n), _, _) => n,
        (None, Some(d), Some(r)) => (r * d.as_secs_f64()).round() as u64,
        (None, Some(_), None) => u64::MAX,
        (None, None, _) => 100_000,
    };
    cfg.event_rate = rate.unwrap_or(a.event_rate);
    if cfg.event_rate.is_nan() || cfg.event_rate <= 0.0 {
        return Err("--event-rate must be positive".into());
    }
    cfg.mix = [0.0; 4];
    for (k, w) in parse_weights(&a.mix, "mix")? {
        let o = Outcome::parse(&k).ok_or_else(|| {
            format!("--mix: unknown outcome {k:?} (local, forward, timeout, no_response)")
        })?;
        cfg.mix[Outcome::ALL.iter().position(|x| *x == o).unwrap()] = w;
    }
    if cfg.mix.iter().sum::<f64>() <= 0.0 {
        return Err("--mix: all weights are zero".into());
    }
    cfg.rcodes = parse_weights(&a.rcodes, "rcodes")?
        .into_iter()
        .map(|(k, w)| {
            dnswire::rcode_from_name(&k)
                .map(|r| (r, w))
                .ok_or_else(|| format!("--rcodes: unknown rcode {k:?}"))
        })
        .collect::<Result<_, _>>()?;
    if cfg.rcodes.iter().map(|r| r.1).sum::<f64>() <= 0.0 {
        return Err("--rcodes: all weights are zero".into());
    }
    for (name, v) in [
        ("retry-share", a.retry_share),
        ("mapped-ipv4", a.mapped_ipv4),
        ("aaaa-share", a.aaaa_share),
    ] {
        if !(0.0..=1.0).contains(&v) {
            return Err(format!("--{name} must be within 0..1"));
        }
    }
    if !(0.0..0.5).contains(&a.loss) {
        return Err("--loss must be within 0..0.5".into());
    }
    cfg.retry_share = a.retry_share;
    cfg.mapped_ipv4 = a.mapped_ipv4;
    cfg.aaaa_share = a.aaaa_share;
    cfg.loss = a.loss;
    let (lo, hi) = a
        .loss_burst
        .split_once('-')
        .and_then(|(l, h)| Some((l.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
        .filter(|(l, h)| *l >= 1 && l <= h)
        .ok_or("--loss-burst: expected MIN-MAX, e.g. 8-24")?;
    cfg.loss_burst = (lo, hi);
    if a.names == 0 || a.names > 5_000_000 {
        return Err("--names must be within 1..=5000000".into());
    }
    cfg.names = a.names;
    cfg.zipf_s = a.zipf;
    if a.clients == 0 || a.clients > 64_000 {
        return Err("--clients must be within 1..=64000".into());
    }
    cfg.clients = a.clients;
    if a.max_attempts == 0 {
        return Err("--max-attempts must be at least 1".into());
    }
    cfg.max_attempts = a.max_attempts;
    cfg.record_sessions = a.truth_sessions.is_some();
    cfg.start_ns = run::now_ns();
    let output = match (&a.connect, &a.write) {
        (Some(c), None) => Output::Send(with_tls(Target::parse(c)?, a)?),
        (None, Some(w)) => Output::File(w.clone()),
        _ => return Err("give exactly one of --connect or --write".into()),
    };
    let opts = RunOptions {
        output,
        rate,
        duration,
        pregen: a.pregen,
        chunk: a.chunk.max(4096),
        connect_patience: Duration::from_secs_f64(a.connect_timeout.max(0.1)),
        finish_patience: Duration::from_secs_f64(a.finish_timeout.max(0.1)),
        bind: a.bind,
    };
    Ok((cfg, opts))
}

fn cmd_run(a: RunArgs) -> Result<(), String> {
    let (cfg, opts) = build(&a)?;
    let result = run::run(cfg.clone(), &opts)?;
    let truth = run::truth_json(&cfg, &opts, &result);
    let text = serde_json::to_string_pretty(&truth).map_err(|e| e.to_string())?;
    match &a.truth {
        Some(p) => std::fs::write(p, text + "\n").map_err(|e| format!("{}: {e}", p.display()))?,
        None => println!("{text}"),
    }
    if let Some(p) = &a.truth_sessions {
        let f = std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let mut w = std::io::BufWriter::new(f);
        let io = |e: std::io::Error| e.to_string();
        w.write_all(gen::RECORD_HEADER.as_bytes()).map_err(io)?;
        for r in &result.records {
            w.write_all(r).map_err(io)?;
        }
        w.flush().map_err(io)?;
    }
    let c = &result.counts;
    eprintln!(
        "dnstap-loadgen: {} sessions, {} messages sent ({} dropped on purpose) in {:.2}s: {:.0} msgs/s",
        c.sessions,
        c.messages_sent(),
        c.messages_dropped(),
        result.timing.finish_s,
        c.messages_sent() as f64 / result.timing.finish_s.max(1e-9)
    );
    if matches!(opts.output, Output::Send(_)) && result.timing.finishes < cfg.pods {
        return Err(format!(
            "only {} of {} connections got FINISH after STOP",
            result.timing.finishes, cfg.pods
        ));
    }
    Ok(())
}

fn cmd_verify(a: VerifyArgs) -> Result<bool, String> {
    let logged = Logged::parse(&a.logged)?;
    let rep = verify::verify(&verify::Inputs {
        truth: &a.ground_truth,
        truth_sessions: a.truth_sessions.as_deref(),
        summary: a.summary.as_deref(),
        sessions: a.sessions.as_deref(),
        logged,
    })?;
    println!(
        "{}",
        serde_json::to_string_pretty(&rep.to_json()).map_err(|e| e.to_string())?
    );
    for e in rep.errors.iter().take(20) {
        eprintln!("verify: {e}");
    }
    Ok(rep.errors.is_empty())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => cmd_run(*a).map(|_| true),
        Cmd::Verify(a) => cmd_verify(a),
    };
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("verify: FAILED");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("dnstap-loadgen: {e}");
            ExitCode::from(2)
        }
    }
}
