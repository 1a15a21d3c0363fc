//! The lookup stage's threads, between the correlator shards and the writer: one per partition
//! of client addresses, so that the candidates of one lookup meet whichever identity and shard
//! they came through. Each runs a `LookupTable`, completes the session lines it is handed with
//! their lookup id, and adds the lookup lines `--log-lookups` prints.

use super::record::{Record, RecordBatch};
use super::{Config, Lookup, LookupTable};
use crate::diagnosis::Diagnosis;
use crate::dnstap::{Nanos, SourceRegistry};
use crate::metrics::health::Heartbeat;
use crate::metrics::lookups::{LookupBoard, LookupStats};
use crate::metrics::model::Telemetry;
use crate::output::lookup::{LookupLines, LookupPolicy};
use crate::output::{writer, Format};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(100);
/// Sessions per lookup partition a shard's channel holds, in batches.
const QUEUE_BATCHES: usize = 64;

/// The command line's part: the search list and bounds, and which lookup lines are printed.
#[derive(Debug, Clone, Default)]
pub struct LookupSettings {
    pub config: Config,
    pub policy: LookupPolicy,
}

/// One lookup partition per four shards: a partition does less per session than a shard.
pub fn partitions(shards: usize) -> usize {
    shards.div_ceil(4).max(1)
}

/// Starts the partitions, each writing to `out` (the writer), through `spawn` (the
/// pipeline's watched threads). Returns the senders the shards route sessions through
/// (`LookupRoute::new`) and the threads.
pub fn start<W>(
    s: &crate::pipeline::Settings,
    telemetry: &Arc<Telemetry>,
    out: Sender<Vec<u8>>,
    mut spawn: impl FnMut(String, Box<dyn FnOnce() + Send>) -> W,
) -> (Vec<Sender<RecordBatch>>, Arc<AtomicBool>, Vec<W>) {
    let n = partitions(s.shards.max(1));
    let gone = Arc::new(AtomicBool::new(false));
    let board = telemetry
        .metrics
        .lookups
        .get_or_init(|| Arc::new(LookupBoard::default()))
        .clone();
    let mut senders = Vec::new();
    let mut threads = Vec::new();
    for p in 0..n {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_BATCHES);
        senders.push(tx);
        // The bounds are the whole stage's: each partition holds its share.
        let mut config = s.lookups.config.clone();
        config.max_open = (config.max_open / n).max(1);
        config.max_per_client = config.max_per_client.min(config.max_open);
        let ctx = StageContext {
            config,
            partition: p,
            partitions: n,
            format: s.format,
            policy: s.lookups.policy,
            sources: telemetry.sources().clone(),
            stats: LookupStats::default(),
            board: board.clone(),
            label_cap: s.telemetry.max_identity_labels,
            heartbeat: telemetry.health.stage(format!("lookup-{p}"), None),
            gone: gone.clone(),
        };
        let out = out.clone();
        threads.push(spawn(
            format!("lookup-{p}"),
            Box::new(move || run(rx, out, ctx)),
        ));
    }
    (senders, gone, threads)
}

/// Which partition a client's sessions go to.
pub fn partition_of(ip: Option<IpAddr>, partitions: usize) -> usize {
    let Some(ip) = ip else {
        return 0;
    };
    let mut h = crate::dns::key_hasher().build_hasher();
    ip.hash(&mut h);
    (std::hash::Hasher::finish(&h) % partitions.max(1) as u64) as usize
}

/// What the stage needs besides its input and output.
pub struct StageContext {
    pub config: Config,
    pub partition: usize,
    pub partitions: usize,
    pub format: Format,
    pub policy: LookupPolicy,
    pub sources: Arc<SourceRegistry>,
    /// This partition's counts since the last tick, and where they are published.
    pub stats: LookupStats,
    pub board: Arc<LookupBoard>,
    /// Distinct identity and namespace labels kept.
    pub label_cap: usize,
    pub heartbeat: Arc<Heartbeat>,
    /// Set when the writer has gone: the shards stop rendering lines.
    pub gone: Arc<AtomicBool>,
}

/// Runs until every shard has dropped its sender; then ends every open lookup.
pub fn run(rx: Receiver<RecordBatch>, out: Sender<Vec<u8>>, mut ctx: StageContext) {
    let mut table = LookupTable::new(
        ctx.config.clone(),
        ctx.partition as u64,
        ctx.partitions as u64,
    );
    let policy = ctx.policy;
    table.name_candidates_for(move |l| policy.prints(l));
    let mut lines = LookupLines::new(ctx.format, ctx.sources.clone());
    let mut batch = Vec::with_capacity(writer::BATCH_BYTES + 4096);
    let mut writer_gone = false;
    let origin = Instant::now();
    let clock = |now: Instant| now.duration_since(origin).as_nanos() as Nanos;
    let mut last_tick = Instant::now();
    loop {
        let input = rx.recv_timeout(TICK);
        let now = Instant::now();
        ctx.heartbeat.beat(now, true);
        match input {
            Ok(records) => {
                // One reading of the clock for the batch (it was ~40 instructions a session).
                let at = clock(now);
                for r in &records.records {
                    let id = r
                        .facts
                        .as_ref()
                        .and_then(|f| records.query(f))
                        .and_then(|q| {
                            let mut done =
                                |l: &Lookup| emit(&mut ctx, &mut lines, l, writer_gone, &mut batch);
                            table.on_query(&q, at, &mut done)
                        });
                    if !writer_gone && !r.line.is_empty() {
                        complete_line(&records, r, id, ctx.format, &mut batch);
                    }
                    // Handed over as soon as it is full, not after the whole batch of sessions
                    // (up to a full batch itself): the buffer never grows (reallocated and
                    // copied) past its capacity.
                    if batch.len() >= writer::BATCH_BYTES {
                        writer_gone |= send(&out, &mut batch);
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let tick = now.duration_since(last_tick) >= TICK;
        if tick {
            last_tick = now;
            let mut done = |l: &Lookup| emit(&mut ctx, &mut lines, l, writer_gone, &mut batch);
            table.advance(clock(now), &mut done);
            publish(&mut ctx);
        }
        if batch.len() >= writer::BATCH_BYTES || (tick && !batch.is_empty()) {
            writer_gone |= send(&out, &mut batch);
        }
        if writer_gone {
            ctx.gone.store(true, Relaxed);
        }
        ctx.heartbeat.beat(now, false);
    }
    table.flush(&mut |l| emit(&mut ctx, &mut lines, l, writer_gone, &mut batch));
    publish(&mut ctx);
    if !writer_gone && !batch.is_empty() {
        send(&out, &mut batch);
    }
}

/// Counts a lookup that ended and renders it when the policy prints it: as it ends, after
/// the lines of its sessions.
fn emit(
    ctx: &mut StageContext,
    lines: &mut LookupLines,
    l: &Lookup,
    writer_gone: bool,
    batch: &mut Vec<u8>,
) {
    ctx.stats.record(l, &ctx.sources, ctx.label_cap);
    if !writer_gone && ctx.policy.prints(l) {
        lines.render(l, batch);
    }
}

/// Adds this partition's counts into the board.
fn publish(ctx: &mut StageContext) {
    ctx.board.publish(&mut ctx.stats);
}

/// Hands the batch to the writer; true when the writer has gone.
fn send(out: &Sender<Vec<u8>>, batch: &mut Vec<u8>) -> bool {
    let full = std::mem::replace(batch, Vec::with_capacity(writer::BATCH_BYTES + 4096));
    out.send(full).is_err()
}

/// The session's line with its lookup id: `"lookup":N` as the JSON object's last field, or
/// ` Lookup: N` at the end of a text line (`null`/`-` for a session in no lookup).
fn complete_line(
    records: &RecordBatch,
    r: &Record,
    id: Option<u64>,
    format: Format,
    out: &mut Vec<u8>,
) {
    let line = records.line(r);
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    let mut n = itoa::Buffer::new();
    let id = id.map(|i| n.format(i).as_bytes());
    match (format, body.strip_suffix(b"}")) {
        (Format::Json, Some(open)) => {
            out.extend_from_slice(open);
            out.extend_from_slice(b",\"lookup\":");
            out.extend_from_slice(id.unwrap_or(b"null"));
            out.push(b'}');
        }
        _ => {
            out.extend_from_slice(body);
            out.extend_from_slice(b" Lookup: ");
            out.extend_from_slice(id.unwrap_or(b"-"));
        }
    }
    out.push(b'\n');
}

/// A shard's way into the lookup stage: one batch per partition, handed over when big
/// enough or when forced (each tick).
pub struct LookupRoute {
    batches: Vec<RecordBatch>,
    senders: Vec<Sender<RecordBatch>>,
    writer_gone: Arc<AtomicBool>,
}

/// Records per batch before it is handed over (the reader's batch size).
const BATCH_RECORDS: usize = 128;

/// Whether `batch` goes to its partition now: full, or not empty when `force`d.
fn due(batch: &RecordBatch, force: bool) -> bool {
    let full = batch.bytes.len() >= writer::BATCH_BYTES || batch.records.len() >= BATCH_RECORDS;
    full || (force && !batch.is_empty())
}

impl LookupRoute {
    pub fn new(senders: Vec<Sender<RecordBatch>>, writer_gone: Arc<AtomicBool>) -> Self {
        Self {
            batches: senders.iter().map(|_| RecordBatch::default()).collect(),
            senders,
            writer_gone,
        }
    }

    /// Adds a finished session, as its diagnosis `d` describes it, to its client's partition,
    /// with its line when `render` is given.
    pub fn push(&mut self, d: &Diagnosis, render: Option<impl FnOnce(&mut Vec<u8>)>) {
        let p = match self.senders.len() {
            1 => 0,
            n => partition_of(d.client.map(|c| c.ip()), n),
        };
        self.batches[p].push(d, render);
    }

    /// Whether `hand_over(force)` would send a batch (and so may wait for a full stage).
    pub fn has_due(&self, force: bool) -> bool {
        self.batches.iter().any(|b| due(b, force))
    }

    /// Hands over the batches that are full (or every non-empty one when `force`d): whether
    /// any was sent, or None once the writer or a partition's thread has gone (lines are no
    /// longer wanted).
    pub fn hand_over(&mut self, force: bool) -> Option<bool> {
        let (mut alive, mut sent) = (!self.writer_gone.load(Relaxed), false);
        for (batch, tx) in self.batches.iter_mut().zip(&self.senders) {
            if due(batch, force) {
                let next = RecordBatch::with_room_of(batch);
                alive &= tx.send(std::mem::replace(batch, next)).is_ok();
                sent = true;
            }
        }
        alive.then_some(sent)
    }
}
