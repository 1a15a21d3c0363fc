//! Wires the stages into threads: readers (or the file reader) → bounded shard queues →
//! correlator shards → one stdout writer. Data flows one way; shutdown follows it: readers
//! stop, their queue senders drop, shards flush everything and drop theirs, the writer ends.

use crate::correlate::{self, Correlator, MessageStore, Session, Verdict};
use crate::ingest::limits::{ConnectionLimits, Slots};
use crate::ingest::net::{ListenAddr, Listener, Reader};
use crate::ingest::{file, LossBoard, QueueDepths, Router, ShardInput, Shared};
use crate::metrics::Metrics;
use crate::output::{writer, Format, LogFilter, Renderer};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
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
    pub log: LogFilter,
    pub format: Format,
}

/// The running shards and writer, fed through `senders`.
struct Backend {
    senders: Vec<Sender<ShardInput>>,
    depths: QueueDepths,
    shards: Vec<JoinHandle<()>>,
    writer: JoinHandle<io::Result<()>>,
    shared: Shared,
}

fn start_backend(
    s: &Settings,
    out: impl io::Write + Send + 'static,
    metrics: Arc<Metrics>,
) -> Backend {
    let shared = Shared {
        sources: Default::default(),
        board: Arc::new(LossBoard::default()),
        metrics,
        max_frame_size: s.max_frame_size,
        session_timeout: s.correlate.session_timeout,
    };
    let (batch_tx, batch_rx) = crossbeam_channel::bounded::<Vec<u8>>(64);
    let writer = writer::spawn(batch_rx, out);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut senders = Vec::new();
    let mut shards = Vec::new();
    let depths: QueueDepths = (0..s.shards.max(1)).map(|_| AtomicU64::new(0)).collect();
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
        let ctx = ShardContext {
            rx,
            out: batch_tx.clone(),
            renderer: Renderer::new(s.format, shared.sources.clone()),
            log: s.log,
            shared: shared.clone(),
            depths: depths.clone(),
            index: i,
        };
        shards.push(
            std::thread::Builder::new()
                .name(format!("shard-{i}"))
                .spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    run_shard(Correlator::new(cfg), ctx)
                })
                .expect("spawn shard thread"),
        );
    }
    Backend {
        senders,
        depths,
        shards,
        writer,
        shared,
    }
}

impl Backend {
    /// Waits for the shards to flush and the writer to drain.
    fn finish(self) -> io::Result<()> {
        drop(self.senders);
        for s in self.shards {
            let _ = s.join();
        }
        self.writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("writer thread panicked")))
    }
}

struct ShardContext {
    rx: Receiver<ShardInput>,
    depths: QueueDepths,
    index: usize,
    out: Sender<Vec<u8>>,
    renderer: Renderer,
    log: LogFilter,
    shared: Shared,
}

/// Counts every finished session, renders the ones `--log` wants into a batch for the writer.
struct LineSink {
    batch: Vec<u8>,
    out: Sender<Vec<u8>>,
    renderer: Renderer,
    log: LogFilter,
    metrics: Arc<Metrics>,
}

impl correlate::SessionSink for LineSink {
    fn session(&mut self, s: &Session, v: Verdict, store: &MessageStore) {
        self.metrics.session(&v);
        if self.log.allows(v.status) {
            self.renderer.render(s, &v, store, &mut self.batch);
            self.metrics
                .sessions_printed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // A flush can emit a million sessions in one call: hand over as we go.
            self.hand_over(false);
        }
    }
}

impl LineSink {
    /// Hands the batch to the writer when it is big enough, or when `force`d (each tick, so
    /// lines never wait long at low rates).
    fn hand_over(&mut self, force: bool) {
        if self.batch.len() >= writer::BATCH_BYTES || (force && !self.batch.is_empty()) {
            let full = std::mem::replace(
                &mut self.batch,
                Vec::with_capacity(writer::BATCH_BYTES + 4096),
            );
            let _ = self.out.send(full);
        }
    }
}

fn run_shard(mut corr: Correlator, ctx: ShardContext) {
    let board = ctx.shared.board.clone();
    let mut sink = LineSink {
        batch: Vec::with_capacity(writer::BATCH_BYTES + 4096),
        out: ctx.out,
        renderer: ctx.renderer,
        log: ctx.log,
        metrics: ctx.shared.metrics.clone(),
    };
    let mut last_tick = Instant::now();
    loop {
        let input = ctx.rx.recv_timeout(TICK);
        // One clock read per burst: the wall clock only drives the idle flush.
        let now = Instant::now();
        match input {
            Ok(ShardInput::Events(batch)) => {
                ctx.depths[ctx.index].fetch_sub(batch.events.len() as u64, Relaxed);
                for ev in batch.events {
                    let message = ev.message.of(&batch.bytes);
                    corr.on_event(ev, message, now, &mut sink);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let tick = now.duration_since(last_tick) >= TICK;
        if tick {
            last_tick = now;
            corr.on_tick(now, |s| board.get(s), &mut sink);
        }
        sink.hand_over(tick);
    }
    corr.flush(|s| board.get(s), &mut sink);
    sink.hand_over(true);
}

/// `read FILE...`: the whole pipeline over files, then exit.
pub fn read_files(
    s: &Settings,
    paths: &[std::path::PathBuf],
    out: impl io::Write + Send + 'static,
    metrics: Arc<Metrics>,
) -> io::Result<Vec<file::FileError>> {
    let backend = start_backend(s, out, metrics.clone());
    let mut router = Router::new(
        backend.senders.clone(),
        backend.depths.clone(),
        s.queue_capacity,
        true,
        metrics,
    );
    let errors = file::read_files(paths, &backend.shared, &mut router);
    drop(router);
    backend.finish()?;
    Ok(errors)
}

/// Serves until `shutdown` is set, then drains, flushes and returns.
pub fn serve(
    s: &Settings,
    listen: &[ListenAddr],
    out: impl io::Write + Send + 'static,
    metrics: Arc<Metrics>,
    shutdown: Arc<AtomicBool>,
) -> io::Result<()> {
    let mut listeners = Vec::new();
    for addr in listen {
        listeners.push(
            Listener::bind(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?,
        );
    }
    let names: Vec<String> = listen.iter().map(|l| l.to_string()).collect();
    eprintln!("dnstap-analyser: listening on {}", names.join(", "));
    let backend = start_backend(s, out, metrics.clone());
    let limits = ConnectionLimits {
        max_connections: s.max_connections,
        handshake_timeout: s.handshake_timeout,
        idle_timeout: s.idle_timeout,
        frame_buffer_budget: s.frame_buffer_budget,
    };
    let slots = Arc::new(Slots::new(limits, s.readers.max(1)));
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut readers = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..s.readers.max(1) {
        let router = Router::new(
            backend.senders.clone(),
            backend.depths.clone(),
            s.queue_capacity,
            false,
            metrics.clone(),
        );
        let (reader, handle) = Reader::new(
            backend.shared.clone(),
            router,
            shutdown.clone(),
            slots.clone(),
        )?;
        readers.push(reader);
        handles.push(handle);
    }
    handles.remove(0);
    readers[0].accept_on(listeners, handles)?;
    let threads: Vec<_> = readers
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let core = s
                .pin
                .then(|| cores.get(i % cores.len().max(1)).copied())
                .flatten();
            std::thread::Builder::new()
                .name(format!("reader-{i}"))
                .spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    r.run()
                })
                .expect("spawn reader thread")
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    backend.finish()
}
