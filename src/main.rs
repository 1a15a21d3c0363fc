//! dnstap-analyser: joins the dnstap messages of each DNS request into one session and prints
//! one diagnosed line per session.

use clap::{Parser, Subcommand};
use dnstap_analyser::correlate;
use dnstap_analyser::ingest::net::ListenAddr;
use dnstap_analyser::ingest::SenderLimits;
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

    /// Where to accept Frame Streams senders: tcp://HOST:PORT or unix:///PATH. Repeat for several listeners.
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

    /// Sender identities (the dnstap identity, or the peer address without one) registered at
    /// once. A message of a new identity beyond it is dropped and counted (identity_limit):
    /// identities are never merged, so one sender cannot hide another's sessions.
    #[arg(long, global = true, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    max_identities: u32,

    /// Identities one connection (or the files of `read`) may send at once; a message of
    /// another is dropped and counted (identity_limit). CoreDNS sends one; a relay, several.
    #[arg(long, global = true, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    identities_per_connection: u32,

    /// Seconds after which a connection forgets an identity it sent nothing of, and the
    /// analyser reclaims an identity no connection sends (making room under --max-identities).
    /// At least --session-timeout + 60 s, so its sessions are out before its name goes.
    #[arg(long, global = true, default_value_t = 600.0, value_name = "SECS")]
    identity_idle_timeout: f64,

    /// Seconds a message's time may lie ahead of the wall clock. A later time (or one before
    /// 2000) is ignored and counted (time_out_of_range); the message keeps its stream's clock.
    #[arg(long, global = true, default_value_t = 86_400.0, value_name = "SECS")]
    max_time_ahead: f64,

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

fn settings(cli: &Cli, idle_flush: bool) -> Result<Settings, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let session_timeout = seconds("session-timeout", cli.session_timeout)?;
    Ok(Settings {
        readers: cli.readers as usize,
        shards: cli.shards.map_or(cores, |s| s as usize),
        queue_capacity: cli.queue_capacity as usize,
        pin: cli.pin,
        correlate: correlate::Config {
            session_timeout,
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
        senders: SenderLimits {
            max_identities: cli.max_identities as usize,
            identities_per_stream: cli.identities_per_connection as usize,
            // Never before the identity's sessions are out of the shards.
            identity_idle: Duration::from_nanos(seconds(
                "identity-idle-timeout",
                cli.identity_idle_timeout,
            )?)
            .max(Duration::from_nanos(session_timeout) + Duration::from_secs(60)),
            max_time_ahead: Duration::try_from_secs_f64(cli.max_time_ahead)
                .ok()
                .filter(|d| *d <= Duration::from_secs(366 * 86_400))
                .ok_or_else(|| {
                    format!(
                        "--max-time-ahead must be between 0 and 31622400 seconds, got {}",
                        cli.max_time_ahead
                    )
                })?,
        },
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
