//! dnstap-analyser: joins the dnstap messages of each DNS request into one session and prints
//! one diagnosed line per session.

mod progress;

use clap::{Parser, Subcommand};
use dnstap_analyser::correlate;
use dnstap_analyser::diagnosis::recall::RecallConfig;
use dnstap_analyser::ingest::net::ListenAddr;
use dnstap_analyser::ingest::tls::TlsFiles;
use dnstap_analyser::ingest::SenderLimits;
use dnstap_analyser::lookup::{self, stage::LookupSettings};
use dnstap_analyser::metrics::model::{SeriesBudget, TelemetryConfig};
use dnstap_analyser::metrics::Metrics;
use dnstap_analyser::metrics::{top_client, ErrorChain};
use dnstap_analyser::output::lookup::LookupPolicy;
use dnstap_analyser::output::stats::PeriodicSummary;
use dnstap_analyser::output::{Format, LineOptions, LogFilter, Messages, SampleRate, WriteSink};
use dnstap_analyser::pipeline::{self, Settings};
use std::net::{SocketAddr, ToSocketAddrs};
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
                  accepting, flush pending sessions, print the summary, exit 0 (exit 3 if the \
                  flush is not done within --shutdown-timeout)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Where to accept Frame Streams senders: tcp://HOST:PORT, tls://HOST:PORT (needs
    /// --tls-cert and --tls-key) or unix:///PATH. Repeat for several listeners. Port 0 takes
    /// a free port; the startup log line `listening on ...` names every bound address.
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

    /// Time of the sender's clock after a CLIENT_QUERY before a session without response is
    /// emitted (15s, 500ms, 2m, or plain seconds). CoreDNS taps the last upstream attempt of a
    /// timed-out request 6 s after it began.
    #[arg(long, global = true, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    session_timeout: Duration,

    /// Time of the sender's clock an orphan (a response whose query has not arrived) waits
    /// for its query before it is reported as SampleLoss.
    #[arg(long, global = true, default_value = "2s", value_name = "DURATION", value_parser = parse_duration)]
    orphan_grace: Duration,

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

    /// Time a new connection has to finish the Frame Streams handshake (READY/START); then
    /// it is closed and counted (handshake_timeout).
    #[arg(long, global = true, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    handshake_timeout: Duration,

    /// Time without a byte after which an established connection may be closed, only when
    /// --max-connections is reached and a new sender needs the slot (longest idle first,
    /// counted as idle_timeout). Below the limit idle connections stay: a quiet CoreDNS sends
    /// nothing at all, and would lose the batch it next writes into a closed connection.
    #[arg(long, global = true, default_value = "120s", value_name = "DURATION", value_parser = parse_duration)]
    idle_timeout: Duration,

    /// After SIGTERM, how long flushing the pending sessions may take. If the output does not
    /// take them (nobody reads stdout), the analyser then tries to print the summary with the
    /// number of sessions not written, without waiting on stderr, and exits with status 3.
    /// Keep it below the pod's terminationGracePeriodSeconds (the chart's formula adds it).
    #[arg(long, default_value = "20s", value_name = "DURATION", value_parser = parse_duration)]
    shutdown_timeout: Duration,

    /// Connections still in their Frame Streams or TLS handshake, a pool apart from
    /// --max-connections: half-open connections cannot take established senders' slots.
    /// Beyond it a new connection is refused (connection_limit), except from an address that
    /// had an established connection within --identity-idle-timeout (a redialing CoreDNS).
    #[arg(long, global = true, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    max_handshaking: u32,

    /// Connections one peer address may hold in their handshake at once; more are refused
    /// (connection_limit). CoreDNS handshakes one at a time.
    #[arg(long, global = true, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    handshakes_per_address: u32,

    /// Connections one peer address may hold at once, handshaking or established; more are
    /// refused (connection_limit). A CoreDNS pod holds one, two while it redials.
    #[arg(long, global = true, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    connections_per_address: u32,

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

    /// With --tls-client-ca: a tls:// sender may send only identities its certificate is
    /// valid for (a DNS name in its subjectAltName, as a client checks a server's name).
    /// Other identities' messages are dropped and counted (identity_not_certified), so a
    /// certificate holder cannot speak for another sender. CoreDNS presents no certificate.
    #[arg(long, global = true, requires = "tls_client_ca")]
    tls_pin_identity: bool,

    /// Sender identities (the dnstap identity, or the peer address without one) registered at
    /// once. A message of a new identity beyond it is dropped and counted (identity_limit):
    /// identities are never merged, so one sender cannot hide another's sessions.
    #[arg(long, global = true, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    max_identities: u32,

    /// Identities one connection (or the files of `read`) may send at once; a message of
    /// another is dropped and counted (identity_limit). CoreDNS sends one; a relay, several.
    #[arg(long, global = true, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    identities_per_connection: u32,

    /// How long a connection keeps an identity it sent nothing of, and the analyser an
    /// identity no connection sends (then reclaimed, making room under --max-identities).
    /// At least --session-timeout + 60 s, so its sessions are out before its name goes.
    #[arg(long, global = true, default_value = "600s", value_name = "DURATION", value_parser = parse_duration)]
    identity_idle_timeout: Duration,

    /// How far a message's time may lie ahead of the wall clock. A later time (or one before
    /// 2000) is ignored and counted (rejected_times_total); the message keeps its stream's clock.
    #[arg(long, global = true, default_value = "24h", value_name = "DURATION", value_parser = parse_duration)]
    max_time_ahead: Duration,

    /// How long after an upstream answered an error rcode for a question a locally answered
    /// error with the same rcode counts as its cached replay (cause cached_upstream_error).
    /// CoreDNS's cache keeps SERVFAIL 5 s by default.
    #[arg(long, global = true, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    cache_window: Duration,

    /// How recent a sender's latest failed upstream attempt (timeout or error rcode, none
    /// answered since) must be for a CLIENT_QUERY without any other message to be blamed on
    /// it (cause rejected_upstream_failing). Two of forward's 5 s request deadlines.
    #[arg(long, global = true, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    upstream_failing_window: Duration,

    /// Which sessions to print: all, failed, sampleloss, succeeded, or a comma list.
    #[arg(long, global = true, default_value = "all", value_parser = LogFilter::parse)]
    log: LogFilter,

    /// Output line format: json (one object per line) or text (Status: ... BitMap: ... Messages: [...]).
    #[arg(long, global = true, default_value = "json", value_parser = parse_format)]
    format: Format,

    /// Fraction of the Succeeded sessions --log lets through to print (0 to 1, e.g. 0.01);
    /// Failed and SampleLoss are all printed. Chosen by a hash of the session, so a replay
    /// prints the same ones; the summary counts every session, and a sampled line says
    /// "sample_rate" to re-weight by.
    #[arg(long, global = true, default_value = "1", value_name = "RATE", value_parser = SampleRate::parse)]
    sample_succeeded: SampleRate,

    /// Which lines carry the decoded messages: all, failed (Failed and SampleLoss only) or
    /// none. Diagnosis, rcodes, upstream attempts and latencies are on every line. The default
    /// shows everything for a run someone watches; an analyser left on in a cluster wants
    /// `--messages failed --sample-succeeded 0.01` (the chart's default).
    #[arg(long, global = true, default_value = "all", value_name = "WHICH", value_parser = Messages::parse)]
    messages: Messages,

    /// Also print the summary line on stderr this often (e.g. 60s), marked "interval":true,
    /// with the counters since start. Default: only at exit.
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    stats_interval: Option<Duration>,
    /// Where to serve the live metrics (GET /metrics, Prometheus text or OpenMetrics), /healthz,
    /// /readyz and /top: HOST:PORT, or `none` for no endpoint. Serving defaults to 0.0.0.0:9435
    /// (clear of CoreDNS's 9153 and node-exporter's 9100); `read` serves them only when this is
    /// given, since a file run ends in seconds. An address that cannot be bound is an error.
    #[arg(long, global = true, value_name = "HOST:PORT|none", value_parser = parse_metrics_listen)]
    metrics_listen: Option<MetricsListen>,

    /// TLS and client authentication of the metrics port, in the format of the web config
    /// file of Prometheus exporters (YAML): tls_server_config (cert_file, key_file,
    /// client_auth_type, client_ca_file, min_version, max_version) and basic_auth_users (user:
    /// bcrypt hash). /healthz and /readyz need no credentials nor client certificate (the
    /// kubelet's probes have none); every other path does. Followed when it or its
    /// certificates change. An unknown key or an unsupported option is an error at startup.
    #[arg(long, global = true, value_name = "FILE")]
    metrics_web_config: Option<PathBuf>,

    /// Do not serve /top, nor the dnstap_analyser_top_failing_names metric family: they show
    /// the failing names and client addresses to whoever may read the metrics port.
    #[arg(long, global = true)]
    no_top: bool,

    /// Distinct `identity` label values (CoreDNS pods) the metrics keep; later identities are
    /// counted under `other`, and dnstap_analyser_label_overflow_total{label="identity"} counts them.
    #[arg(long, global = true, default_value_t = 256, value_name = "N")]
    max_identity_labels: usize,

    /// Distinct `upstream` label values (IP:PORT of forwarder targets) the metrics keep; later
    /// ones are counted under `other`, and label_overflow_total{label="upstream"} counts them.
    #[arg(long, global = true, default_value_t = 256, value_name = "N")]
    max_upstream_labels: usize,

    /// Samples /metrics may expose in each family whose label sets senders multiply
    /// (sessions_total, upstream_attempts_total, the latency histograms, messages_total, ...;
    /// a histogram's label set is 19 samples). Beyond it, new label sets are counted with
    /// identity, upstream, namespace, rcode and qtype "other", and
    /// dnstap_analyser_series_overflow_total{family} counts what went there.
    #[arg(long, global = true, default_value_t = 10_000, value_name = "N")]
    max_series_per_family: usize,

    /// Samples those families may expose in all (see --max-series-per-family).
    #[arg(long, global = true, default_value_t = 30_000, value_name = "N")]
    max_series: usize,

    /// /healthz answers 503 once a reader, shard or the writer has had work pending and made no
    /// progress for this long (e.g. the writer blocked on a full stdout). 30s, 500ms, 2m, or
    /// plain seconds.
    #[arg(long, global = true, default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    stall_timeout: Duration,

    /// Which lookup lines to print (the search-path candidates of one application lookup
    /// joined, docs/output.md): problems (not answered, or a resolver timeout waited out), all,
    /// or none. Every lookup is counted in the metrics.
    #[arg(long, global = true, default_value = "problems", value_name = "WHICH", value_parser = LookupPolicy::parse)]
    log_lookups: LookupPolicy,

    /// The cluster domain of the pods' search lists (<ns>.svc.DOMAIN, svc.DOMAIN, DOMAIN).
    #[arg(
        long,
        global = true,
        default_value = "cluster.local",
        value_name = "DOMAIN"
    )]
    cluster_domain: String,

    /// Search suffixes after the cluster ones (the nodes' domains, e.g. ec2.internal), in
    /// resolv.conf order; a comma list or repeated. Suffixes met continuing a lookup past the
    /// cluster ones are also learned (16 at most, given ones included).
    #[arg(long, global = true, value_name = "SUFFIX", value_delimiter = ',')]
    search_suffix: Vec<String>,

    /// Lookups open at once (joining their candidates); the oldest is ended early, and counted,
    /// to make room. 1/16 of them, and 256 at most, per client address.
    #[arg(long, global = true, default_value_t = 65_536, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_lookups: u32,
}

/// `--metrics-listen`: an address, or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetricsListen {
    At(SocketAddr),
    Off,
}

/// The serving default of `--metrics-listen`.
const METRICS_LISTEN: &str = "0.0.0.0:9435";

fn parse_metrics_listen(s: &str) -> Result<MetricsListen, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(MetricsListen::Off);
    }
    let mut addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("{s:?} is not HOST:PORT or none: {e}"))?;
    addrs
        .next()
        .map(MetricsListen::At)
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// The endpoint of a run: serving has one unless `none`; `read` only when asked.
fn metrics_listen(cli: &Cli, serving: bool) -> Option<SocketAddr> {
    match cli.metrics_listen {
        Some(MetricsListen::At(a)) => Some(a),
        Some(MetricsListen::Off) => None,
        None if serving => METRICS_LISTEN.parse().ok(),
        None => None,
    }
}

/// `--metrics-web-config` secures an endpoint: without one it is a mistake, not a no-op.
fn metrics_web_config(cli: &Cli, serving: bool) -> Result<Option<PathBuf>, String> {
    match (&cli.metrics_web_config, metrics_listen(cli, serving)) {
        (Some(_), None) => Err("--metrics-web-config needs a metrics endpoint \
             (--metrics-listen HOST:PORT)"
            .into()),
        (web, _) => Ok(web.clone()),
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the pipeline over Frame Streams files (fstrm_capture, dnstap -w), in the order
    /// given as one stream per identity, print the sessions and exit (1 if a file was missing,
    /// empty, not Frame Streams or broken). With the sessions going to a file or a pipe, a
    /// progress bar shows on stderr when it is a terminal.
    Read {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Show what fails most in a running analyser (its /top endpoint), redrawn every few
    /// seconds: the `kubectl top` of DNS failures.
    ///
    /// Tables of the senders (CoreDNS pods, with their failure ratio), qnames, clients,
    /// upstreams and client workloads with the most Failed sessions in the analyser's window,
    /// with each row's dominant cause, qtypes and the time of its latest failure (UTC). The
    /// screen fits the terminal (80×24 when stdout is not one): long lines are cut with `…`,
    /// and the tables share the height.
    Top {
        /// The analyser's metrics endpoint (--metrics-listen): HOST:PORT, http://HOST:PORT or
        /// https://HOST:PORT, optionally with a path (default /top).
        #[arg(long, default_value = "127.0.0.1:9435")]
        url: String,
        /// PEM CA certificates to check an https:// endpoint's certificate against (default:
        /// the system's, /etc/ssl/certs/ca-certificates.crt).
        #[arg(long, value_name = "FILE")]
        tls_ca: Option<PathBuf>,
        /// User name for an endpoint whose --metrics-web-config has basic_auth_users; the
        /// password comes from --password-file.
        #[arg(long, value_name = "NAME", requires = "password_file")]
        user: Option<String>,
        /// File holding the password of --user (its first line; kept off the command line,
        /// where `ps` shows it).
        #[arg(long, value_name = "FILE", requires = "user")]
        password_file: Option<PathBuf>,
        /// How often to poll and redraw: 2s, 500ms, 1m, or seconds.
        #[arg(long, default_value = "2s", value_parser = top_client::parse_interval)]
        interval: Duration,
        /// Print one screen without terminal escapes and exit (for scripts).
        #[arg(long)]
        once: bool,
        /// Rows per table at most; by default the tables share the screen's height.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        rows: Option<u32>,
        /// Columns to fit instead of the terminal's (80 when stdout is not a terminal).
        #[arg(long, value_parser = clap::value_parser!(u16).range(20..))]
        width: Option<u16>,
        /// Lines to fit instead of the terminal's (24 when stdout is not a terminal).
        #[arg(long, value_parser = clap::value_parser!(u16).range(5..))]
        height: Option<u16>,
    },
}

/// The command line, with `top` cleared of the server's flags: they are global so that they
/// go before or after `read`, and clap would list them under `top` too. `top` gets hidden
/// copies of them (clap does not copy a global flag into a subcommand that has one of the
/// same id), and [`refuse_server_flags`] says they are not `top`'s.
fn command_line() -> clap::Command {
    let cli = <Cli as clap::CommandFactory>::command();
    let hidden: Vec<clap::Arg> = cli
        .get_arguments()
        .filter(|a| a.is_global_set())
        .map(|a| a.clone().global(false).hide(true))
        .collect();
    cli.mut_subcommand("top", |top| top.args(hidden))
}

/// `top`'s `Authorization` header from `--user` and the first line of `--password-file`.
fn top_credentials(
    user: Option<&str>,
    password_file: Option<&std::path::Path>,
) -> Result<Option<String>, String> {
    let (Some(user), Some(file)) = (user, password_file) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read --password-file {}: {e}", file.display()))?;
    let password = text.lines().next().unwrap_or_default();
    Ok(Some(top_client::basic_credentials(user, password)))
}

/// `top` with a server flag: the error clap gives for an unknown one.
fn refuse_server_flags(cmd: &mut clap::Command, matches: &clap::ArgMatches) {
    let Some(("top", top)) = matches.subcommand() else {
        return;
    };
    let given = cmd.get_arguments().filter(|a| a.is_global_set()).find(|a| {
        top.value_source(a.get_id().as_str()) == Some(clap::parser::ValueSource::CommandLine)
    });
    let Some(arg) = given else {
        return;
    };
    let flag = format!("--{}", arg.get_long().unwrap_or(arg.get_id().as_str()));
    let msg = format!("{flag} is a flag of the analyser, not of `top`");
    cmd.build();
    if let Some(top_cmd) = cmd.find_subcommand_mut("top") {
        top_cmd
            .error(clap::error::ErrorKind::UnknownArgument, msg)
            .exit();
    }
}

/// Parses the command line (exiting with clap's message and status on an error).
fn parse_cli() -> Cli {
    let mut cmd = command_line();
    let matches = cmd.clone().get_matches();
    refuse_server_flags(&mut cmd, &matches);
    <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn parse_format(s: &str) -> Result<Format, String> {
    match s {
        "json" => Ok(Format::Json),
        "text" => Ok(Format::Text),
        _ => Err(format!("unknown format {s:?}: use json or text")),
    }
}

/// Longest duration a flag accepts.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Every duration flag: a number with a unit (`500ms`, `15s`, `2m`, `1h`) or plain seconds
/// (`10`, `2.5`, what the chart passes), above zero and at most 24 hours.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(format!(
            "{s:?} is not a duration: use e.g. 500ms, 15s, 2m, 1h or 10"
        ));
    }
    let scale = match unit.trim_start() {
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}: use ms, s, m or h (e.g. 500ms, 15s, 2m), or plain seconds"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: use e.g. 500ms, 15s, 2m, 1h or 10"))?;
    let secs = value * scale;
    // Digits and dots only: never NaN, at most infinite.
    if secs > MAX_DURATION.as_secs_f64() {
        return Err(format!("{s:?} is longer than the maximum of 24h"));
    }
    let d = Duration::from_secs_f64(secs);
    if d.is_zero() {
        return Err(format!("{s:?}: the duration must be above zero"));
    }
    Ok(d)
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos() as u64
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
            session_timeout: nanos(cli.session_timeout),
            orphan_grace: nanos(cli.orphan_grace),
            max_sessions: cli.max_sessions.max(1),
            idle_flush,
        },
        max_connections: cli.max_connections.max(1),
        max_frame_size: cli.max_frame_size.clamp(64, 64 << 20),
        handshake_timeout: cli.handshake_timeout,
        idle_timeout: cli.idle_timeout,
        frame_buffer_budget: cli.frame_buffer_budget.max(1),
        shutdown_timeout: cli.shutdown_timeout,
        max_handshaking: cli.max_handshaking as usize,
        handshakes_per_address: cli.handshakes_per_address as usize,
        connections_per_address: cli.connections_per_address as usize,
        tls: tls_files(cli)?,
        senders: SenderLimits {
            max_identities: cli.max_identities as usize,
            identities_per_stream: cli.identities_per_connection as usize,
            // Never before the identity's sessions are out of the shards.
            identity_idle: cli
                .identity_idle_timeout
                .max(cli.session_timeout + Duration::from_secs(60)),
            max_time_ahead: cli.max_time_ahead,
            pin_identity: cli.tls_pin_identity,
        },
        recall: RecallConfig {
            cache_window: nanos(cli.cache_window),
            failing_window: nanos(cli.upstream_failing_window),
        },
        log: cli.log,
        lines: LineOptions {
            sample_succeeded: cli.sample_succeeded,
            messages: cli.messages,
        },
        format: cli.format,
        // Only serving flushes idle streams: `idle_flush` says which mode this is.
        metrics_listen: metrics_listen(cli, idle_flush),
        metrics_web_config: metrics_web_config(cli, idle_flush)?,
        serve_top: !cli.no_top,
        telemetry: TelemetryConfig {
            max_identity_labels: cli.max_identity_labels,
            max_upstream_labels: cli.max_upstream_labels,
            stall_after: cli.stall_timeout,
            series: SeriesBudget {
                per_family: cli.max_series_per_family,
                total: cli.max_series,
            },
        },
        lookups: LookupSettings {
            config: lookup::Config {
                cluster_domain: cli.cluster_domain.clone(),
                search_suffixes: cli.search_suffix.clone(),
                max_open: cli.max_lookups as usize,
                max_per_client: (cli.max_lookups as usize / 16).clamp(1, 256),
                ..lookup::Config::default()
            },
            policy: cli.log_lookups,
        },
    })
}

fn main() -> ExitCode {
    let cli = parse_cli();
    let metrics = Arc::new(Metrics::default());
    let stats = cli
        .stats_interval
        .map(|every| PeriodicSummary::to_stderr(metrics.clone(), every))
        .transpose();
    let stats = match stats {
        Ok(stats) => stats,
        Err(e) => {
            eprintln!("dnstap-analyser: error: cannot start the --stats-interval thread: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match &cli.command {
        // A client of another analyser: no pipeline, no summary.
        Some(Command::Top {
            url,
            tls_ca,
            user,
            password_file,
            interval,
            once,
            rows,
            width,
            height,
        }) => {
            let authorization = match top_credentials(user.as_deref(), password_file.as_deref()) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("dnstap-analyser: error: {e}");
                    return ExitCode::from(2);
                }
            };
            let options = top_client::TopOptions {
                tls_ca: tls_ca.as_deref(),
                authorization: authorization.as_deref(),
                interval: *interval,
                once: *once,
                width: width.map(usize::from),
                height: height.map(usize::from),
                max_rows: rows.map(|n| n as usize),
            };
            return match top_client::run(url, options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("dnstap-analyser: error: {}", ErrorChain(&e));
                    ExitCode::from(2)
                }
            };
        }
        Some(Command::Read { files }) => {
            settings(&cli, false)
                .map_err(Failure::Startup)
                .and_then(|s| {
                    let progress = progress::Progress::start(files, metrics.clone());
                    let errors =
                        pipeline::read_files(&s, files, WriteSink::stdout(), metrics.clone())
                            .map_err(Failure::of);
                    drop(progress);
                    let errors = errors?;
                    for e in &errors {
                        eprintln!("dnstap-analyser: {e}");
                    }
                    Ok(errors.is_empty())
                })
        }
        None => settings(&cli, true)
            .map_err(Failure::Startup)
            .and_then(|s| {
                let shutdown = Arc::new(AtomicBool::new(false));
                for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                    signal_hook::flag::register(sig, shutdown.clone())
                        .map_err(|e| Failure::Startup(e.to_string()))?;
                }
                pipeline::serve(
                    &s,
                    &cli.listen,
                    WriteSink::stdout(),
                    metrics.clone(),
                    shutdown,
                )
                .map_err(Failure::of)?;
                Ok(true)
            }),
    };
    // The periodic lines end before the exit summary, which is always the last.
    drop(stats);
    let deadline_passed = metrics
        .sessions_not_written
        .lock()
        .is_ok_and(|n| n.is_some());
    if let (Err(Failure::Run(e)), true) = (&result, deadline_passed) {
        exit_without_waiting(&metrics, e);
    }
    // A run that never started has nothing to summarise: an all-zero summary would only hide
    // the error line above it.
    if !matches!(result, Err(Failure::Startup(_))) {
        eprintln!("{}", metrics.summary_json());
    }
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(Failure::Startup(e) | Failure::Run(e)) => {
            eprintln!("dnstap-analyser: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Why a run failed: before the pipeline started (a port in use, unreadable TLS files, a bad
/// unix path), or while it ran (the output failed, a thread panicked).
enum Failure {
    Startup(String),
    Run(String),
}

impl Failure {
    fn of(e: pipeline::Error) -> Failure {
        match e.at_startup() {
            true => Failure::Startup(e.to_string()),
            false => Failure::Run(e.to_string()),
        }
    }
}

/// The shutdown deadline passed: stdout is stalled, and stderr may be the same stalled pipe
/// (Kubernetes collects both). The summary and the error are written by a thread that may
/// block forever; the process exits with status 3 a moment later either way.
fn exit_without_waiting(metrics: &Metrics, error: &str) -> ! {
    let text = format!(
        "{}\ndnstap-analyser: error: {error}\n",
        metrics.summary_json()
    );
    let (done_tx, done) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        use std::io::Write;
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(text.as_bytes()).and_then(|()| err.flush());
        let _ = done_tx.send(());
    });
    let _ = done.recv_timeout(Duration::from_millis(500));
    std::process::exit(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_or_plain_seconds() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("15s", ms(15_000)),
            ("500ms", ms(500)),
            ("2m", ms(120_000)),
            ("1h", ms(3_600_000)),
            ("10", ms(10_000)),
            ("2.5", ms(2_500)),
            ("0.5m", ms(30_000)),
            ("1.5s", ms(1_500)),
            (" 30 s ", ms(30_000)),
            ("24h", ms(86_400_000)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn bad_durations_say_why() {
        for (text, reason) in [
            ("0", "above zero"),
            ("0ms", "above zero"),
            ("0.0000000001", "above zero"),
            ("25h", "maximum of 24h"),
            ("99999999999999999999", "maximum of 24h"),
            ("10d", "unknown unit"),
            ("5 sec", "unknown unit"),
            ("-5s", "not a duration"),
            ("", "not a duration"),
            ("s", "not a duration"),
            ("1.2.3s", "not a duration"),
        ] {
            let err = parse_duration(text).expect_err(text);
            assert!(err.contains(reason), "{text:?}: {err}");
        }
    }

    #[test]
    fn every_duration_flag_goes_through_the_parser() {
        let cli = Cli::try_parse_from([
            "dnstap-analyser",
            "--session-timeout=15s",
            "--orphan-grace=500ms",
            "--handshake-timeout=2m",
            "--idle-timeout=1h",
            "--stats-interval=60",
        ])
        .unwrap();
        assert_eq!(cli.session_timeout, Duration::from_secs(15));
        assert_eq!(cli.orphan_grace, Duration::from_millis(500));
        assert_eq!(cli.handshake_timeout, Duration::from_secs(120));
        assert_eq!(cli.idle_timeout, Duration::from_secs(3600));
        assert_eq!(cli.stats_interval, Some(Duration::from_secs(60)));
        let err = Cli::try_parse_from(["dnstap-analyser", "--idle-timeout=3d"]).unwrap_err();
        assert!(err.to_string().contains("unknown unit"), "{err}");
    }

    #[test]
    fn top_parses_its_flags_alone_and_the_server_flags_stay_global() {
        // Clap's consistency checks (run in debug builds) pass on the amended command.
        command_line().debug_assert();
        let matches = command_line()
            .try_get_matches_from(["dnstap-analyser", "top", "--url", "a:1", "--rows", "3"])
            .unwrap();
        let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Top { ref url, rows: Some(3), .. }) if url == "a:1"
        ));
        let matches = command_line()
            .try_get_matches_from(["dnstap-analyser", "read", "--shards", "2", "f"])
            .unwrap();
        let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
        assert_eq!(cli.shards, Some(2));
        let top = command_line();
        let top = top.find_subcommand("top").unwrap();
        let shown: Vec<&str> = top
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long())
            .collect();
        assert_eq!(
            shown,
            [
                "url",
                "tls-ca",
                "user",
                "password-file",
                "interval",
                "once",
                "rows",
                "width",
                "height"
            ]
        );
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let cli = Cli::try_parse_from(["dnstap-analyser"]).unwrap();
        assert_eq!(cli.session_timeout, Duration::from_secs(10));
        assert_eq!(cli.orphan_grace, Duration::from_secs(2));
        assert_eq!(cli.handshake_timeout, Duration::from_secs(5));
        assert_eq!(cli.idle_timeout, Duration::from_secs(120));
        assert_eq!(cli.stats_interval, None);
        assert_eq!(cli.sample_succeeded, SampleRate::ALL);
        assert_eq!(cli.messages, Messages::All);
    }
}
