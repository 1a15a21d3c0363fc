//! Wires the stages into threads: readers (or the file reader) → bounded shard queues →
//! correlator shards → one writer feeding an `output::Sink`. Data flows one way; shutdown
//! follows it: readers stop, their queue senders drop, shards flush everything and drop
//! theirs, the writer ends.
//!
//! Failures travel the other way, once: a thread that panics, or a writer whose sink fails,
//! sets the halt flag the readers stop on (the same flag as SIGTERM), and the error comes back
//! from `read_files`/`serve` when the threads are joined. A sink that ends on purpose (stdout
//! closed by `| head`) is not a failure: the shards stop rendering and the analysis goes on.

use crate::correlate::{self, Correlator};

// A connection cut off inside a frame must show loss before the correlator stops waiting for it.
const _: () = assert!(
    crate::ingest::net::CUT_OFF_AFTER.as_secs() < correlate::IDLE_LAG.as_secs(),
    "CUT_OFF_AFTER must be shorter than IDLE_LAG"
);
use crate::diagnosis::recall::RecallConfig;
use crate::ingest::limits::{ConnectionLimits, Slots};
use crate::ingest::net::{ListenAddr, Listener, Reader};
use crate::ingest::tls::{TlsAcceptor, TlsFiles};
use crate::ingest::{file, LossBoard, QueueDepths, Router, SenderLimits, ShardInput, Shared};
use crate::lookup::stage::LookupRoute;
use crate::metrics::health::Heartbeat;
use crate::metrics::http::{MetricsServer, StartError};
use crate::metrics::model::{Telemetry, TelemetryConfig, ThreadKind, ThreadStats};
use crate::metrics::top::{ShardTop, TopBoard, TopConfig};
use crate::metrics::{Discard, Metrics};
use crate::output::lines::{LineSink, LineSinkParts};
use crate::output::writer::{self, OutputError};
use crate::output::{Format, LineOptions, LinePolicy, LogFilter, Renderer, Sink};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct Settings {
    pub readers: usize,
    pub shards: usize,
    pub queue_capacity: usize,
    pub pin: bool,
    pub correlate: correlate::Config,
    pub max_connections: usize,
    pub max_frame_size: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub frame_buffer_budget: usize,
    /// After SIGTERM, how long the flush may take before the run ends without it
    /// (`--shutdown-timeout`).
    pub shutdown_timeout: Duration,
    /// `--max-handshaking`, `--handshakes-per-address`, `--connections-per-address`.
    pub max_handshaking: usize,
    pub handshakes_per_address: usize,
    pub connections_per_address: usize,
    /// Certificates of the `tls://` listeners; `None` when there are none.
    pub tls: Option<TlsFiles>,
    /// Identities, their expiry, plausible event times.
    pub senders: SenderLimits,
    /// `--cache-window`, `--upstream-failing-window`.
    pub recall: RecallConfig,
    pub log: LogFilter,
    /// `--sample-succeeded`, `--messages`.
    pub lines: LineOptions,
    pub format: Format,
    /// Where to serve /metrics, /healthz, /readyz and /top; `None`: no endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// `--metrics-web-config`: TLS and client authentication of that endpoint.
    pub metrics_web_config: Option<std::path::PathBuf>,
    /// False with `--no-top`: no /top, no top_failing_names family.
    pub serve_top: bool,
    /// Label caps and the stall limit of the live metrics.
    pub telemetry: TelemetryConfig,
    /// The lookup stage: search list, bounds, `--log-lookups`.
    pub lookups: crate::lookup::stage::LookupSettings,
}

/// The command line's defaults (one reader, one shard per core, no TLS, no metrics endpoint),
/// for embedders and tests that change a few fields.
impl Default for Settings {
    fn default() -> Self {
        Self {
            readers: 1,
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            queue_capacity: 262_144,
            pin: false,
            correlate: correlate::Config::default(),
            max_connections: 1024,
            max_frame_size: 1 << 20,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
            frame_buffer_budget: 64 << 20,
            shutdown_timeout: Duration::from_secs(20),
            max_handshaking: 256,
            handshakes_per_address: 8,
            connections_per_address: 64,
            tls: None,
            senders: SenderLimits::default(),
            recall: RecallConfig::default(),
            log: LogFilter::ALL,
            lines: LineOptions::default(),
            format: Format::Json,
            metrics_listen: None,
            metrics_web_config: None,
            serve_top: true,
            telemetry: TelemetryConfig::default(),
            lookups: Default::default(),
        }
    }
}

/// Why the pipeline stopped short of a clean end.
#[derive(Debug)]
pub enum Error {
    /// Listeners or readers could not be set up.
    Setup(io::Error),
    /// The metrics endpoint could not start (its address is taken, say).
    Metrics(StartError),
    /// The sink failed; the sessions from then on were not written.
    Output(OutputError),
    /// A thread panicked (the panic hook has already printed where and why).
    Panicked { thread: String, message: String },
    /// `--shutdown-timeout` passed before every session was written (stdout stalled).
    ShutdownDeadline { after: Duration, not_written: u64 },
}

impl Error {
    /// The pipeline never ran (a listener, a reader or the metrics endpoint could not be set
    /// up): there is nothing to summarise.
    pub fn at_startup(&self) -> bool {
        matches!(self, Self::Setup(_) | Self::Metrics(_))
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Setup(e) => e.fmt(f),
            Self::Metrics(e) => e.fmt(f),
            Self::Output(e) => e.fmt(f),
            Self::Panicked { thread, message } => {
                write!(f, "thread {thread} panicked: {message}")
            }
            Self::ShutdownDeadline { after, not_written } => write!(
                f,
                "shutdown not done {}s after SIGTERM (--shutdown-timeout): {not_written} \
                 sessions not written (the output does not take lines)",
                after.as_secs_f64()
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Setup(e) => Some(e),
            Self::Metrics(e) => Some(e),
            Self::Output(e) => Some(e),
            Self::Panicked { .. } | Self::ShutdownDeadline { .. } => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Self::Setup(e)
    }
}

/// A pipeline thread whose failure halts the process.
struct Watched<E> {
    name: String,
    handle: JoinHandle<Result<(), E>>,
}

/// Sets the halt flag if its thread unwinds: a dead shard or writer must not leave the
/// readers feeding queues nobody empties.
struct HaltOnPanic(Arc<AtomicBool>);

impl Drop for HaltOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// Starts a pipeline thread (pinned to `core` if given). An error it returns, or a panic,
/// sets `halt`.
fn spawn_watched<E: Send + 'static>(
    name: String,
    core: Option<core_affinity::CoreId>,
    halt: &Arc<AtomicBool>,
    run: impl FnOnce() -> Result<(), E> + Send + 'static,
) -> Watched<E> {
    let halt = halt.clone();
    let handle = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let guard = HaltOnPanic(halt);
            if let Some(c) = core {
                core_affinity::set_for_current(c);
            }
            let result = run();
            if result.is_err() {
                guard.0.store(true, Ordering::SeqCst);
            }
            result
        })
        .unwrap_or_else(|e| panic!("cannot spawn thread {name}: {e}"));
    Watched { name, handle }
}

impl<E> Watched<E> {
    /// Waits for the thread; a panic becomes `Error::Panicked`, a returned error is kept.
    fn join(self) -> Result<Result<(), E>, Error> {
        self.handle.join().map_err(|payload| Error::Panicked {
            thread: self.name,
            message: panic_message(payload.as_ref()),
        })
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// The first failure is the result; any later ones are printed so none is hidden.
fn first_failure(failures: impl IntoIterator<Item = Error>) -> Result<(), Error> {
    let mut first = None;
    for e in failures {
        if first.is_none() {
            first = Some(e);
        } else {
            eprintln!("dnstap-analyser: error: {e}");
        }
    }
    first.map_or(Ok(()), Err)
}

/// The running shards and writer, fed through `senders`.
struct Backend {
    senders: Vec<Sender<ShardInput>>,
    depths: QueueDepths,
    shards: Vec<Watched<Infallible>>,
    lookups: Vec<Watched<Infallible>>,
    writer: Watched<OutputError>,
    shared: Shared,
}

/// The live view of a run: the telemetry every stage counts into, and its HTTP endpoint if
/// one was asked for. Made before the stages, so that they can register with it.
struct Live {
    telemetry: Arc<Telemetry>,
    server: Option<MetricsServer>,
}

impl Live {
    fn start(s: &Settings, metrics: Arc<Metrics>) -> Result<Self, Error> {
        let sources = Arc::new(s.senders.registry());
        let telemetry = Arc::new(Telemetry::new(metrics, sources, s.telemetry));
        let server = match s.metrics_listen {
            Some(addr) => {
                let web = s.metrics_web_config.as_deref();
                let server =
                    MetricsServer::start(addr, web, telemetry.clone()).map_err(Error::Metrics)?;
                eprintln!(
                    "dnstap-analyser: metrics on {}://{}/metrics",
                    server.scheme(),
                    server.local_addr()
                );
                Some(server)
            }
            None => None,
        };
        Ok(Self { telemetry, server })
    }

    /// Stops the endpoint: the run is over (its last numbers are in the exit summary).
    fn stop(self) {
        if let Some(server) = self.server {
            server.stop();
        }
    }
}

/// Starts the writer on `sink` and the shards; `halt` is set if either fails.
fn start_backend(
    s: &Settings,
    sink: impl Sink + 'static,
    telemetry: &Arc<Telemetry>,
    halt: &Arc<AtomicBool>,
) -> Backend {
    let shared = Shared {
        sources: telemetry.sources().clone(),
        board: Arc::new(LossBoard::default()),
        metrics: telemetry.metrics.clone(),
        max_frame_size: s.max_frame_size,
        session_timeout: s.correlate.session_timeout,
        limits: s.senders,
        recall: s.recall,
    };
    let (batch_tx, batch_rx) = crossbeam_channel::bounded::<Vec<u8>>(64);
    let heartbeat = telemetry.health.stage("writer", None);
    let writer = spawn_watched("writer".into(), None, halt, move || {
        writer::run(batch_rx, sink, |busy| heartbeat.beat(Instant::now(), busy))
    });
    // Sessions reach the writer through the lookup stage (src/lookup/stage.rs).
    let (lookup_senders, writer_gone, lookups) =
        crate::lookup::stage::start(s, telemetry, batch_tx, |name, run| {
            spawn_watched(name, None, halt, move || {
                run();
                Ok(())
            })
        });
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut senders = Vec::new();
    let mut shards = Vec::new();
    let depths: QueueDepths = (0..s.shards.max(1)).map(|_| AtomicU64::new(0)).collect();
    telemetry.set_queues(depths.clone(), s.queue_capacity as u64);
    let top = TopBoard::naming(TopConfig::default(), telemetry.sources().clone());
    // Unregistered, /top answers 404 and the top_failing_names family is left out.
    if s.serve_top {
        telemetry.set_top(crate::metrics::lookups::with_lookups(
            top.hook(),
            telemetry.metrics.clone(),
        ));
    }
    for i in 0..s.shards.max(1) {
        // The depth counter bounds the events; the channel only bounds the number of batches,
        // which may be small at low rates.
        let (tx, rx) = crossbeam_channel::bounded(s.queue_capacity.max(1));
        senders.push(tx);
        let mut cfg = s.correlate.clone();
        cfg.max_sessions = (cfg.max_sessions / s.shards.max(1)).max(1);
        let core = s
            .pin
            .then(|| cores.get((s.readers + i) % cores.len().max(1)).copied())
            .flatten();
        let depth = depths.clone();
        let pending = Box::new(move || depth[i].load(Relaxed) > 0);
        let ctx = ShardContext {
            rx,
            out: LookupRoute::new(lookup_senders.clone(), writer_gone.clone()),
            renderer: Renderer::new(s.format, shared.sources.clone()).with_options(s.lines),
            policy: LinePolicy::new(s.log, s.lines),
            shared: shared.clone(),
            depths: depths.clone(),
            index: i,
            stats: telemetry.thread_stats(ThreadKind::Shard(i)),
            heartbeat: telemetry.health.stage(format!("shard-{i}"), Some(pending)),
            top: top.shard(),
        };
        shards.push(spawn_watched(format!("shard-{i}"), core, halt, move || {
            run_shard(Correlator::new(cfg), ctx);
            Ok(())
        }));
    }
    Backend {
        senders,
        depths,
        shards,
        lookups,
        writer,
        shared,
    }
}

impl Backend {
    /// Waits for the shards to flush and the writer to drain; reports the first failure.
    fn finish(self) -> Result<(), Error> {
        drop(self.senders);
        let shards = self.shards.into_iter().filter_map(|s| s.join().err());
        let mut shards: Vec<Error> = shards.collect();
        shards.extend(self.lookups.into_iter().filter_map(|s| s.join().err()));
        let writer = match self.writer.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(Error::Output(e)),
            Err(panicked) => Some(panicked),
        };
        // The writer first: when it fails, it is the cause.
        first_failure(writer.into_iter().chain(shards))
    }
}

struct ShardContext {
    rx: Receiver<ShardInput>,
    depths: QueueDepths,
    index: usize,
    out: LookupRoute,
    renderer: Renderer,
    policy: LinePolicy,
    shared: Shared,
    stats: ThreadStats,
    heartbeat: Arc<Heartbeat>,
    top: ShardTop,
}

fn run_shard(mut corr: Correlator, ctx: ShardContext) {
    let board = ctx.shared.board.clone();
    let metrics = ctx.shared.metrics.clone();
    let mut sink = LineSink::new(LineSinkParts {
        out: ctx.out,
        renderer: ctx.renderer,
        policy: ctx.policy,
        metrics: ctx.shared.metrics.clone(),
        stats: ctx.stats,
        heartbeat: ctx.heartbeat,
        top: ctx.top,
    });
    let mut last_tick = Instant::now();
    loop {
        let input = ctx.rx.recv_timeout(TICK);
        // One clock read per burst: the wall clock drives the idle flush and the heartbeat.
        let now = Instant::now();
        sink.heartbeat.beat(now, true);
        match input {
            Ok(ShardInput::Events(batch)) => {
                ctx.depths[ctx.index].fetch_sub(batch.events.len() as u64, Relaxed);
                batch.each(|ev, message| corr.on_event(ev, message, now, &mut sink));
            }
            Ok(ShardInput::StreamEnded {
                ended,
                drops_before,
            }) => corr.on_stream_end(&ended, drops_before, now, &mut sink),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let tick = now.duration_since(last_tick) >= TICK;
        if tick {
            last_tick = now;
            corr.on_tick(now, |s| board.get(s), &mut sink);
            publish(&mut corr, &mut sink.stats, &metrics);
            sink.top.publish(sink.top.since_origin(now));
        }
        sink.hand_over(tick);
        sink.heartbeat.beat(now, false);
    }
    corr.flush(|s| board.get(s), &mut sink);
    sink.hand_over(true);
    publish(&mut corr, &mut sink.stats, &metrics);
}

/// Once per tick: what the correlator could not keep, its open sessions, and the counts.
fn publish(corr: &mut Correlator, stats: &mut ThreadStats, metrics: &Metrics) {
    let discarded = corr.take_discarded();
    if discarded > 0 {
        metrics.discard(Discard::SessionTableFull, discarded);
    }
    stats.set_open_sessions(corr.open_sessions() as u64);
    stats.publish();
}

/// `read FILE...`: the whole pipeline over files into `sink`, then exit. The files are
/// read to the end even when the sink fails (the analysis is cheap without rendering and
/// keeps the summary whole); the failure is the result.
pub fn read_files(
    s: &Settings,
    paths: &[std::path::PathBuf],
    sink: impl Sink + 'static,
    metrics: Arc<Metrics>,
) -> Result<Vec<file::FileError>, Error> {
    let halt = Arc::new(AtomicBool::new(false));
    let live = Live::start(s, metrics.clone())?;
    let telemetry = live.telemetry.clone();
    let backend = start_backend(s, sink, &telemetry, &halt);
    let mut router = Router::new(
        backend.senders.clone(),
        backend.depths.clone(),
        s.queue_capacity,
        true,
        metrics,
    );
    let mut stats = telemetry.thread_stats(ThreadKind::Reader(0));
    let heartbeat = telemetry.health.stage("reader-0", None);
    let mut published = Instant::now();
    // Reading files is this run's way of accepting dnstap.
    telemetry.health.set_listening();
    let errors = file::read_files(paths, &backend.shared, &mut router, &mut |c| {
        c.record(&mut stats);
        let now = Instant::now();
        heartbeat.beat(now, true);
        if now.duration_since(published) >= TICK {
            published = now;
            stats.publish();
        }
    });
    heartbeat.beat(Instant::now(), false);
    drop((router, stats));
    telemetry.health.set_draining();
    let finished = backend.finish();
    live.stop();
    if let Err(e) = finished {
        // The failure is the result; the unreadable files must not go unsaid.
        for f in &errors {
            eprintln!("dnstap-analyser: {f}");
        }
        return Err(e);
    }
    Ok(errors)
}

/// Serves until `shutdown` is set, then drains, flushes and returns. A failing sink or a
/// panicking thread sets `shutdown` itself, and is the result.
pub fn serve(
    s: &Settings,
    listen: &[ListenAddr],
    sink: impl Sink + 'static,
    metrics: Arc<Metrics>,
    shutdown: Arc<AtomicBool>,
) -> Result<(), Error> {
    let mut listeners = Vec::new();
    for addr in listen {
        let listener = match (addr, &s.tls) {
            (ListenAddr::Tls(a), Some(files)) => TlsAcceptor::load(files, metrics.clone())
                .map_err(|e| {
                    let why = crate::metrics::ErrorChain(&e).to_string();
                    io::Error::new(io::ErrorKind::InvalidInput, why)
                })
                .and_then(|acceptor| Listener::bind_tls(*a, acceptor)),
            _ => Listener::bind(addr),
        };
        listeners.push(
            listener
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?,
        );
    }
    let live = Live::start(s, metrics.clone())?;
    let telemetry = live.telemetry.clone();
    let names: Vec<String> = listeners
        .iter()
        .zip(listen)
        .map(|(l, asked)| l.local_addr().as_ref().unwrap_or(asked).to_string())
        .collect();
    eprintln!("dnstap-analyser: listening on {}", names.join(", "));
    let written = Arc::new(AtomicU64::new(0));
    let sink = CountedSink {
        inner: sink,
        written: written.clone(),
        pending: 0,
    };
    let backend = start_backend(s, sink, &telemetry, &shutdown);
    let limits = ConnectionLimits {
        max_connections: s.max_connections,
        handshake_timeout: s.handshake_timeout,
        idle_timeout: s.idle_timeout,
        frame_buffer_budget: s.frame_buffer_budget,
        max_handshaking: s.max_handshaking,
        handshakes_per_address: s.handshakes_per_address,
        connections_per_address: s.connections_per_address,
        known_for: s.senders.identity_idle,
    };
    let slots = Arc::new(Slots::new(limits, s.readers.max(1)));
    let open = slots.clone();
    telemetry.set_connections_open(Box::new(move || open.open() as u64));
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut readers = Vec::new();
    let mut handles = Vec::new();
    for i in 0..s.readers.max(1) {
        let router = Router::new(
            backend.senders.clone(),
            backend.depths.clone(),
            s.queue_capacity,
            false,
            metrics.clone(),
        );
        let (mut reader, handle) = Reader::new(
            backend.shared.clone(),
            router,
            shutdown.clone(),
            slots.clone(),
        )?;
        reader.instrument(
            telemetry.thread_stats(ThreadKind::Reader(i)),
            telemetry.health.stage(format!("reader-{i}"), None),
        );
        readers.push(reader);
        handles.push(handle);
    }
    handles.remove(0);
    readers[0].accept_on(listeners, handles)?;
    let threads: Vec<Watched<Infallible>> = readers
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let core = s
                .pin
                .then(|| cores.get(i % cores.len().max(1)).copied())
                .flatten();
            spawn_watched(format!("reader-{i}"), core, &shutdown, move || {
                r.run();
                Ok(())
            })
        })
        .collect();
    // The listeners are registered with reader 0, which now runs: connections are accepted.
    telemetry.health.set_listening();
    // A panicking thread sets the flag too, so this wait ends whatever stops the run.
    while !shutdown.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    telemetry.health.set_draining();
    let (done_tx, done) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let readers: Vec<Error> = threads.into_iter().filter_map(|t| t.join().err()).collect();
        let backend = backend.finish();
        let _ = done_tx.send(first_failure(readers.into_iter().chain(backend.err())));
    });
    // A stalled output (nobody reads stdout) would block the shards' flush forever; the
    // kubelet's SIGKILL would then lose every pending session without a trace.
    let result = done.recv_timeout(s.shutdown_timeout).unwrap_or_else(|_| {
        let open: u64 = telemetry.snapshot().open_sessions.iter().map(|o| o.1).sum();
        let printed = metrics.sessions_printed.load(Ordering::Relaxed);
        let not_written = open + printed.saturating_sub(written.load(Ordering::Relaxed));
        *metrics
            .sessions_not_written
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(not_written);
        Err(Error::ShutdownDeadline {
            after: s.shutdown_timeout,
            not_written,
        })
    });
    if !matches!(result, Err(Error::ShutdownDeadline { .. })) {
        live.stop();
    }
    result
}

/// Counts the session lines its sink confirmed written (flushed), for the shutdown deadline's
/// count of lines that never made it.
struct CountedSink<S> {
    inner: S,
    written: Arc<AtomicU64>,
    pending: u64,
}

impl<S: Sink> CountedSink<S> {
    fn confirm(&mut self) {
        self.written
            .fetch_add(std::mem::take(&mut self.pending), Ordering::Relaxed);
    }
}

impl<S: Sink> Sink for CountedSink<S> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn write_lines(&mut self, lines: &[u8]) -> io::Result<crate::output::Flow> {
        let flow = self.inner.write_lines(lines)?;
        self.pending += lines.iter().filter(|&&b| b == b'\n').count() as u64;
        Ok(flow)
    }

    fn flush(&mut self) -> io::Result<crate::output::Flow> {
        let flow = self.inner.flush()?;
        self.confirm();
        Ok(flow)
    }

    fn close(&mut self) -> io::Result<()> {
        self.inner.close()?;
        self.confirm();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::Flow;
    use std::sync::Mutex;

    fn settings() -> Settings {
        Settings {
            readers: 1,
            shards: 2,
            queue_capacity: 4096,
            pin: false,
            correlate: correlate::Config {
                session_timeout: 10_000_000_000,
                orphan_grace: 2_000_000_000,
                max_sessions: 100_000,
                idle_flush: false,
            },
            max_connections: 16,
            ..Settings::default()
        }
    }

    /// 5000 sessions, about 12 MB of JSON: many batches.
    fn burst() -> Vec<std::path::PathBuf> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        vec![dir.join("tests/fixtures/coredns/h_burst_5k.fstrm")]
    }

    /// What a sink does on its `after`-th write.
    #[derive(Clone, Copy)]
    enum Then {
        Panic,
        Fail,
        End,
    }

    /// Keeps the lines; on its `after`-th write it panics, fails or ends.
    struct Scripted {
        lines: Arc<Mutex<Vec<u8>>>,
        writes: usize,
        after: usize,
        then: Then,
    }

    impl Scripted {
        fn new(after: usize, then: Then) -> (Self, Arc<Mutex<Vec<u8>>>) {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = Self {
                lines: lines.clone(),
                writes: 0,
                after,
                then,
            };
            (sink, lines)
        }
    }

    impl Sink for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }

        fn write_lines(&mut self, lines: &[u8]) -> io::Result<Flow> {
            self.writes += 1;
            if self.writes >= self.after {
                match self.then {
                    Then::Panic => panic!("scripted sink gives up"),
                    Then::Fail => return Err(io::ErrorKind::StorageFull.into()),
                    Then::End => return Ok(Flow::End),
                }
            }
            self.lines.lock().unwrap().extend_from_slice(lines);
            Ok(Flow::Continue)
        }

        fn flush(&mut self) -> io::Result<Flow> {
            Ok(Flow::Continue)
        }

        fn close(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn read_into(sink: Scripted) -> (Result<Vec<file::FileError>, Error>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let result = read_files(&settings(), &burst(), sink, metrics.clone());
        (result, metrics)
    }

    #[test]
    fn every_session_reaches_a_healthy_sink() {
        let (sink, lines) = Scripted::new(usize::MAX, Then::End);
        let (result, metrics) = read_into(sink);
        assert!(result.unwrap().is_empty());
        let lines = lines.lock().unwrap();
        // Lookup lines come besides (those that were not answered, by default).
        let sessions = lines.split(|&b| b == b'\n');
        let kind = b"\"kind\":\"session\"";
        let sessions = sessions.filter(|l| l.windows(kind.len()).any(|w| w == kind));
        assert_eq!(sessions.count(), 5000);
        assert_eq!(metrics.sessions_printed.load(Relaxed), 5000);
    }

    #[test]
    fn a_panicking_writer_is_the_result() {
        let (sink, _) = Scripted::new(2, Then::Panic);
        match read_into(sink).0 {
            Err(Error::Panicked { thread, message }) => {
                assert_eq!(thread, "writer");
                assert_eq!(message, "scripted sink gives up");
            }
            other => panic!("expected the writer's panic, got {other:?}"),
        }
    }

    #[test]
    fn a_failing_sink_is_the_result_and_the_analysis_still_counts_everything() {
        let (sink, _) = Scripted::new(2, Then::Fail);
        let (result, metrics) = read_into(sink);
        match result {
            Err(Error::Output(e)) => {
                assert_eq!(e.sink, "scripted");
                assert_eq!(e.source.kind(), io::ErrorKind::StorageFull);
            }
            other => panic!("expected the sink's error, got {other:?}"),
        }
        assert_eq!(metrics.sessions.load(Relaxed), 5000);
    }

    #[test]
    fn an_ended_sink_ends_the_output_not_the_analysis() {
        let (sink, lines) = Scripted::new(2, Then::End);
        let (result, metrics) = read_into(sink);
        assert!(result.unwrap().is_empty());
        assert_eq!(metrics.sessions.load(Relaxed), 5000);
        let printed = lines
            .lock()
            .unwrap()
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        assert!(printed > 0 && printed < 5000, "{printed} lines");
    }

    #[test]
    fn a_panicking_pipeline_thread_halts_and_is_reported_by_name() {
        let halt = Arc::new(AtomicBool::new(false));
        let shard = spawn_watched(
            "shard-7".into(),
            None,
            &halt,
            || -> Result<(), Infallible> { panic!("correlator invariant broken") },
        );
        match shard.join() {
            Err(Error::Panicked { thread, message }) => {
                assert_eq!(thread, "shard-7");
                assert_eq!(message, "correlator invariant broken");
            }
            other => panic!("expected the shard's panic, got {other:?}"),
        }
        assert!(halt.load(Ordering::SeqCst));
    }

    #[test]
    fn a_thread_that_returns_an_error_halts_and_one_that_ends_well_does_not() {
        let halt = Arc::new(AtomicBool::new(false));
        let fine = spawn_watched("fine".into(), None, &halt, || Ok::<(), String>(()));
        assert!(matches!(fine.join(), Ok(Ok(()))));
        assert!(!halt.load(Ordering::SeqCst));
        let failing = spawn_watched("failing".into(), None, &halt, || Err("no".to_string()));
        assert!(matches!(failing.join(), Ok(Err(e)) if e == "no"));
        assert!(halt.load(Ordering::SeqCst));
    }
}
