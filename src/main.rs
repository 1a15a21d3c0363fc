//! dnstap-analyser: joins the dnstap messages of each DNS request into one session and prints
//! one diagnosed line per session.

use clap::{Parser, Subcommand};
use dnstap_analyser::correlate;
use dnstap_analyser::ingest::net::ListenAddr;
use dnstap_analyser::ingest::tls::TlsFiles;
use dnstap_analyser::metrics::Metrics;
use dnstap_analyser::output::{Format, LogFilter, WriteSink};
use dnstap_analyser::pipeline::{self, Settings};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "dnstap-analyser",
    version,
    about = "Tells why DNS resolution fails: joins the dnstap messages of each DNS request \
             (CLIENT_QUERY, FORWARDER_QUERY, FORWARDER_RESPONSE, CLIENT_RESPONSE) into one session \
             and prints one line per session with its Status, BitMap, diagnosis and messages.",
    after_help = "Point CoreDNS at it with `dnstap tcp://<analyser address>:6000 full` in the Corefile.\n\
                  Sessions go to stdout, logs and the exit summary to stderr. SIGTERM/SIGINT: stop \
                  accepting, flush pending sessions, print the summary, exit 0."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Where to accept Frame Streams senders: tcp://HOST:PORT, tls://HOST:PORT (needs
    /// --tls-cert and --tls-key) or unix:///PATH. Repeat for several listeners.
    #[arg(
        long,
        global = true,
        value_name = "ADDR",
        default_value = "tcp://0.0.0.0:6000"
    )]
    listen: Vec<ListenAddr>,

    /// Reader threads (mio event loops) that own connections and parse frames.
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    readers: u16,

    /// Correlator shards (threads); default: the number of cores.
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..))]
    shards: Option<u16>,

    /// Events buffered per shard queue (carried in batches of 128). A reader never waits: when
    /// a queue is full it drops the batch and counts it (queue_full), and the sessions open on
    /// that shard at the time are reported as SampleLoss (analyser_queue_full).
    #[arg(long, global = true, default_value_t = 262_144, value_parser = clap::value_parser!(u32).range(1..))]
    queue_capacity: u32,

    /// Pin reader and shard threads to cores.
    #[arg(long, global = true)]
    pin: bool,

    /// Seconds of the sender's clock after a CLIENT_QUERY before a session without response is
    /// emitted. CoreDNS taps the last upstream attempt of a timed-out request 6 s after it began.
    #[arg(long, global = true, default_value_t = 10.0, value_name = "SECS")]
    session_timeout: f64,

    /// Seconds of the sender's clock an orphan (a response whose query has not arrived) waits
    /// for its query before it is reported as SampleLoss.
    #[arg(long, global = true, default_value_t = 2.0, value_name = "SECS")]
    orphan_grace: f64,

    /// Open sessions kept at most, split evenly over the shards; beyond it the oldest session of
    /// the sender is evicted as SampleLoss (session_table_full). About 500 bytes per session.
    #[arg(long, global = true, default_value_t = 2_000_000)]
    max_sessions: usize,

    /// Concurrent sender connections. At the limit a new one takes the slot of the connection
    /// idle the longest if that one has been idle for --idle-timeout (counted under
    /// connections_closed.idle_timeout); otherwise it is refused and counted (connection_limit).
    #[arg(long, global = true, default_value_t = 1024)]
    max_connections: usize,

    /// Largest data frame accepted, in bytes; a larger one closes its connection.
    #[arg(long, global = true, default_value_t = 1 << 20)]
    max_frame_size: usize,

    /// Seconds a new connection has to finish the Frame Streams handshake (READY/START); then
    /// it is closed and counted (handshake_timeout).
    #[arg(long, global = true, default_value_t = 5.0, value_name = "SECS")]
    handshake_timeout: f64,

    /// Seconds without a byte after which an established connection may be closed, only when
    /// --max-connections is reached and a new sender needs the slot (longest idle first,
    /// counted as idle_timeout). Below the limit idle connections stay: a quiet CoreDNS sends
    /// nothing at all, and would lose the batch it next writes into a closed connection.
    #[arg(long, global = true, default_value_t = 120.0, value_name = "SECS")]
    idle_timeout: f64,

    /// Bytes of partially received frames buffered over all connections. Over it, the
    /// connections holding the largest partial frames (more than an equal share,
    /// budget / --max-connections) are closed and counted (frame_budget).
    #[arg(long, global = true, default_value_t = 64 << 20, value_name = "BYTES")]
    frame_buffer_budget: usize,

    /// PEM certificate chain the tls:// listeners present (server certificate first). Reread
    /// when the file changes: new connections get the new one, open ones keep theirs.
    #[arg(long, global = true, value_name = "FILE")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1), reread with it.
    #[arg(long, global = true, value_name = "FILE")]
    tls_key: Option<PathBuf>,

    /// PEM CA certificates for mTLS: a tls:// sender must present a certificate they signed,
    /// or it is refused (connections_closed.tls_client_cert). Without it no sender is asked.
    #[arg(long, global = true, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,

    /// Which sessions to print: all, failed, sampleloss, succeeded, or a comma list.
    #[arg(long, global = true, default_value = "all", value_parser = LogFilter::parse)]
    log: LogFilter,

    /// Output line format: json (one object per line) or text (Status: ... BitMap: ... Messages: [...]).
    #[arg(long, global = true, default_value = "json", value_parser = parse_format)]
    format: Format,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the pipeline over Frame Streams files (fstrm_capture, dnstap -w), in the order
    /// given as one stream per identity, print the sessions and exit.
    Read {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

fn parse_format(s: &str) -> Result<Format, String> {
    match s {
        "json" => Ok(Format::Json),
        "text" => Ok(Format::Text),
        _ => Err(format!("unknown format {s:?}: use json or text")),
    }
}

fn seconds(name: &str, v: f64) -> Result<u64, String> {
    if !(v.is_finite() && v > 0.0 && v < 86_400.0) {
        return Err(format!(
            "--{name} must be between 0 and 86400 seconds, got {v}"
        ));
    }
    Ok((v * 1e9) as u64)
}

/// The TLS files, required when a listener is tls://.
fn tls_files(cli: &Cli) -> Result<Option<TlsFiles>, String> {
    let wanted = cli.listen.iter().any(|l| matches!(l, ListenAddr::Tls(_)));
    match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: cli.tls_client_ca.clone(),
        })),
        (None, None) if !wanted && cli.tls_client_ca.is_none() => Ok(None),
        _ => Err(
            "TLS needs --listen tls://HOST:PORT with both --tls-cert and --tls-key \
                  (--tls-client-ca adds mTLS)"
                .into(),
        ),
    }
}

fn settings(cli: &Cli, idle_flush: bool) -> Result<Settings, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(Settings {
        readers: cli.readers as usize,
        shards: cli.shards.map_or(cores, |s| s as usize),
        queue_capacity: cli.queue_capacity as usize,
        pin: cli.pin,
        correlate: correlate::Config {
            session_timeout: seconds("session-timeout", cli.session_timeout)?,
            orphan_grace: seconds("orphan-grace", cli.orphan_grace)?,
            max_sessions: cli.max_sessions.max(1),
            idle_flush,
        },
        max_connections: cli.max_connections.max(1),
        max_frame_size: cli.max_frame_size.clamp(64, 64 << 20),
        handshake_timeout: Duration::from_nanos(seconds(
            "handshake-timeout",
            cli.handshake_timeout,
        )?),
        idle_timeout: Duration::from_nanos(seconds("idle-timeout", cli.idle_timeout)?),
        frame_buffer_budget: cli.frame_buffer_budget.max(1),
        tls: tls_files(cli)?,
        log: cli.log,
        format: cli.format,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let metrics = Arc::new(Metrics::default());
    let result = match &cli.command {
        Some(Command::Read { files }) => settings(&cli, false).and_then(|s| {
            let errors = pipeline::read_files(&s, files, WriteSink::stdout(), metrics.clone())
                .map_err(|e| e.to_string())?;
            for e in &errors {
                eprintln!("dnstap-analyser: {e}");
            }
            Ok(errors.is_empty())
        }),
        None => settings(&cli, true).and_then(|s| {
            let shutdown = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, shutdown.clone()).map_err(|e| e.to_string())?;
            }
            pipeline::serve(
                &s,
                &cli.listen,
                WriteSink::stdout(),
                metrics.clone(),
                shutdown,
            )
            .map_err(|e| e.to_string())?;
            Ok(true)
        }),
    };
    eprintln!("{}", metrics.summary_json());
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("dnstap-analyser: error: {e}");
            ExitCode::from(2)
        }
    }
}
