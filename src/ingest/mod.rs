//! The edge where bytes come in: Frame Streams connections (`net`) and files (`file`) become
//! events, routed to correlator shards by key. A full shard queue never blocks a reader: the
//! event is dropped and counted, and the shard is told with the next event it gets.

pub mod file;
pub mod limits;
pub mod net;

use crate::dnstap::{self, Event, Nanos, Role, SenderProfile, SourceId, SourceRegistry};
use crate::framestream::{Frame, FrameDecoder, FrameError, ProtocolError, ReceiverStream, Step};
use crate::metrics::{Discard, Metrics, Tally};
use bytes::BytesMut;
use crossbeam_channel::{Sender, TrySendError};
use hashbrown::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Reads once from `src` and appends what arrived to `buf`, through `scratch`: copying the
/// bytes that came is cheaper than zeroing spare capacity before every read.
pub fn read_into(
    src: &mut impl std::io::Read,
    scratch: &mut [u8],
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    let n = loop {
        match src.read(scratch) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r?,
        }
    };
    buf.extend_from_slice(&scratch[..n]);
    Ok(n)
}

/// What a shard receives: events in stream order, in batches so the queue is touched once
/// per batch rather than once per message.
pub enum ShardInput {
    Events(Batch),
}

/// Events and the encoded messages they point into. The reader copies each message here
/// (about a hundred bytes): sharing the read buffer instead would make every message an
/// atomic reference count bounced between the reader's core and the shard's.
#[derive(Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub bytes: Vec<u8>,
}

impl Batch {
    fn with_capacity() -> Self {
        Self {
            events: Vec::with_capacity(BATCH),
            bytes: Vec::with_capacity(BATCH * 160),
        }
    }

    fn push(&mut self, mut ev: Event, message: &[u8]) {
        ev.message = dnstap::MessageSpan {
            start: self.bytes.len() as u32,
            len: message.len() as u32,
        };
        self.bytes.extend_from_slice(message);
        self.events.push(ev);
    }
}

/// Events per batch; a reader sends partial batches at the end of every read.
pub const BATCH: usize = 128;

/// Per-source sender-loss sequence numbers, shared by all readers and shards. A source's
/// number grows whenever loss becomes evident on it; sessions compare it over their lifetime.
pub struct LossBoard {
    slots: Box<[AtomicU64]>,
}

impl Default for LossBoard {
    fn default() -> Self {
        Self {
            // Sources beyond this share slots: a collision only over-reports loss.
            slots: (0..4096).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl LossBoard {
    pub fn bump(&self, source: SourceId) {
        self.slots[source.0 as usize % self.slots.len()].fetch_add(1, Relaxed);
    }

    pub fn get(&self, source: SourceId) -> u64 {
        self.slots[source.0 as usize % self.slots.len()].load(Relaxed)
    }
}

/// Everything readers share.
#[derive(Clone)]
pub struct Shared {
    pub sources: Arc<SourceRegistry>,
    pub board: Arc<LossBoard>,
    pub metrics: Arc<Metrics>,
    pub max_frame_size: usize,
    pub session_timeout: Nanos,
}

/// Events waiting in each shard's queue: readers add what they send, shards subtract what
/// they took. `--queue-capacity` bounds this count, whatever the batch sizes.
pub type QueueDepths = Arc<[AtomicU64]>;

/// Sends events to shards; one per reader thread.
pub struct Router {
    shards: Vec<Sender<ShardInput>>,
    depths: QueueDepths,
    capacity: u64,
    batches: Vec<Batch>,
    /// Events dropped per shard since the last batch that got through.
    pending_drops: Vec<u32>,
    /// Files apply backpressure instead of dropping: nothing is lost offline.
    blocking: bool,
    metrics: Arc<Metrics>,
}

impl Router {
    pub fn new(
        shards: Vec<Sender<ShardInput>>,
        depths: QueueDepths,
        capacity: usize,
        blocking: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        let n = shards.len();
        Self {
            shards,
            depths,
            capacity: capacity as u64,
            batches: (0..n).map(|_| Batch::with_capacity()).collect(),
            pending_drops: vec![0; n],
            blocking,
            metrics,
        }
    }

    pub fn dispatch(&mut self, ev: Event, message: &[u8]) {
        // Multiply-shift: uniform over shards without a division.
        let shard = (((ev.key >> 32) * self.shards.len() as u64) >> 32) as usize;
        self.batches[shard].push(ev, message);
        if self.batches[shard].events.len() >= BATCH {
            self.send(shard);
        }
    }

    /// Sends every partial batch (end of a read: don't hold events back at low rates).
    pub fn flush(&mut self) {
        for shard in 0..self.shards.len() {
            if !self.batches[shard].events.is_empty() {
                self.send(shard);
            }
        }
    }

    fn send(&mut self, shard: usize) {
        let mut batch = std::mem::replace(&mut self.batches[shard], Batch::with_capacity());
        let len = batch.events.len() as u32;
        // The shard learns of earlier drops before it sees anything that came after them.
        batch.events[0].drops_before = self.pending_drops[shard];
        let input = ShardInput::Events(batch);
        let depth = &self.depths[shard];
        let sent = if self.blocking {
            depth.fetch_add(len as u64, Relaxed);
            self.shards[shard].send(input).is_ok()
        } else if depth.load(Relaxed) + len as u64 > self.capacity {
            false
        } else {
            depth.fetch_add(len as u64, Relaxed);
            match self.shards[shard].try_send(input) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    depth.fetch_sub(len as u64, Relaxed);
                    false
                }
            }
        };
        if sent {
            self.pending_drops[shard] = 0;
        } else {
            self.pending_drops[shard] = self.pending_drops[shard].saturating_add(len);
            self.metrics.discard(Discard::QueueFull, len as u64);
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.flush();
    }
}

/// CLIENT_QUERY keys seen recently on a stream, to notice orphans the moment they arrive
/// from senders that write in order (CoreDNS): an FR or CR whose CQ never came proves loss.
/// Two generations, each about one session timeout long, bound the memory; keys are kept as
/// 32-bit fingerprints (a collision can only hide an orphan, never invent one).
#[derive(Default)]
struct OpenQueries {
    current: HashMap<u32, u16>,
    previous: HashMap<u32, u16>,
    generation_start: Nanos,
}

fn fingerprint(key: u64) -> u32 {
    (key >> 32) as u32 ^ key as u32
}

impl OpenQueries {
    fn rotate(&mut self, now: Nanos, span: Nanos) {
        if now.saturating_sub(self.generation_start) >= span {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear();
            self.generation_start = now;
        }
    }

    fn open(&mut self, key: u64) {
        let n = self.current.entry(fingerprint(key)).or_insert(0);
        *n = n.saturating_add(1);
    }

    fn contains(&self, key: u64) -> bool {
        let f = fingerprint(key);
        self.current.contains_key(&f) || self.previous.contains_key(&f)
    }

    /// Closes one query with this key; false if none was open.
    fn close(&mut self, key: u64) -> bool {
        let key = fingerprint(key);
        for map in [&mut self.current, &mut self.previous] {
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
                return true;
            }
        }
        false
    }
}

/// What a stream knows about one of its sources.
#[derive(Default)]
struct SourceTrack {
    watermark: Nanos,
    open: OpenQueries,
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// STOP was received (and FINISH sent where bidirectional).
    Stopped,
    /// The peer closed or reset without STOP.
    Closed,
}

/// Why a stream had to be closed.
#[derive(Debug)]
pub enum StreamError {
    Frame(FrameError),
    Protocol(ProtocolError),
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Frame(e) => e.fmt(f),
            Self::Protocol(e) => e.fmt(f),
        }
    }
}

impl StreamError {
    pub fn drop_reason(&self) -> Discard {
        match self {
            Self::Protocol(ProtocolError::UnsupportedContentType(_)) => Discard::ContentType,
            _ => Discard::BadStream,
        }
    }
}

/// One Frame Streams byte stream (a connection, or a file) turned into routed events.
pub struct StreamIngest {
    shared: Shared,
    /// Name used as the source when a message carries no identity.
    peer: String,
    decoder: FrameDecoder,
    receiver: ReceiverStream,
    /// Last identity seen and what it resolved to: identities rarely change within a stream.
    identity_cache: Option<(Vec<u8>, SourceId, SenderProfile)>,
    tracks: HashMap<SourceId, SourceTrack>,
    hasher: ahash::RandomState,
    tally: Tally,
}

impl StreamIngest {
    pub fn new(shared: Shared, peer: String) -> Self {
        let decoder = FrameDecoder::new(shared.max_frame_size);
        Self {
            shared,
            peer,
            decoder,
            receiver: ReceiverStream::new(),
            identity_cache: None,
            tracks: HashMap::new(),
            hasher: crate::dns::key_hasher(),
            tally: Tally::default(),
        }
    }

    /// Starts a new Frame Streams stream (the next file) keeping the per-source state.
    pub fn restart_framing(&mut self) {
        self.receiver = ReceiverStream::new();
    }

    pub fn is_established(&self) -> bool {
        self.receiver.is_established()
    }

    pub fn is_stopped(&self) -> bool {
        self.receiver.is_stopped()
    }

    /// Consumes every complete frame in `buf`, routing events and appending handshake replies
    /// to `replies`. Returns true once the sender has sent STOP. The caller flushes the router
    /// when it has nothing more to read for now, so batches fill up across connections.
    pub fn feed(
        &mut self,
        buf: &mut BytesMut,
        router: &mut Router,
        replies: &mut Vec<u8>,
    ) -> Result<bool, StreamError> {
        let result = self.feed_frames(buf, router, replies);
        self.shared.metrics.add(&std::mem::take(&mut self.tally));
        result
    }

    fn feed_frames(
        &mut self,
        buf: &mut BytesMut,
        router: &mut Router,
        replies: &mut Vec<u8>,
    ) -> Result<bool, StreamError> {
        loop {
            let frame = match self.decoder.decode(buf).map_err(StreamError::Frame)? {
                Some(f) => f,
                None => return Ok(false),
            };
            if let Frame::Data(d) = &frame {
                self.tally.frames += 1;
                self.tally.bytes += d.len() as u64 + 4;
            }
            match self
                .receiver
                .on_frame(frame)
                .map_err(StreamError::Protocol)?
            {
                Step::Continue => {}
                Step::Reply(r) => replies.extend_from_slice(&r),
                Step::Data(payload) => self.on_payload(payload, router),
                Step::Finished(reply) => {
                    if let Some(r) = reply {
                        replies.extend_from_slice(&r);
                    }
                    return Ok(true);
                }
            }
        }
    }

    /// The stream is over. Without STOP, buffered frames were lost at the sender: that is
    /// evidence of loss for every session still open on its sources.
    pub fn finish(&mut self, end: StreamEnd, leftover: usize) {
        if leftover > 0 {
            self.shared.metrics.discard(Discard::TruncatedFrame, 1);
        }
        if end == StreamEnd::Closed || leftover > 0 {
            for source in self.tracks.keys() {
                self.shared.board.bump(*source);
            }
        }
    }

    fn on_payload(&mut self, payload: bytes::Bytes, router: &mut Router) {
        let metrics = &self.shared.metrics;
        let tap = match dnstap::scan(&payload) {
            Ok(t) => t,
            Err(e) => {
                metrics.discard(Discard::Protobuf, 1);
                metrics.warn(format_args!("{}: {e}; frame skipped", self.peer));
                return;
            }
        };
        let identity = tap.identity;
        let (source, profile) = match &self.identity_cache {
            Some((id, s, p)) if id.as_slice() == identity => (*s, *p),
            _ => {
                let name = if identity.is_empty() {
                    self.peer.as_bytes()
                } else {
                    identity
                };
                let source = self.shared.sources.intern(name, tap.version);
                let profile = SenderProfile::from_version(tap.version);
                self.identity_cache = Some((identity.to_vec(), source, profile));
                (source, profile)
            }
        };
        let mut ev = match Event::from_fields(&tap, source, profile, &self.hasher) {
            Ok(ev) => ev,
            Err(e) => {
                let why = match e {
                    dnstap::DecodeError::Protobuf => Discard::Protobuf,
                    dnstap::DecodeError::NoMessage => Discard::NoMessage,
                    dnstap::DecodeError::UnsupportedType(_) => {
                        metrics.discard(Discard::UnsupportedMessageType, 1);
                        return;
                    }
                    dnstap::DecodeError::Dns(_) => Discard::DnsUndecodable,
                };
                metrics.discard(why, 1);
                metrics.warn(format_args!("{}: {e}; message skipped", self.peer));
                // A message of some session is gone.
                self.shared.board.bump(source);
                return;
            }
        };
        if ev.question.is_none() && matches!(ev.role, Role::UpstreamQuery | Role::UpstreamResponse)
        {
            metrics.discard(Discard::UpstreamWithoutWire, 1);
            return;
        }
        self.tally.message(ev.role);
        let span = self.shared.session_timeout;
        let track = self.tracks.entry(source).or_default();
        track.watermark = track.watermark.max(ev.time().unwrap_or(0));
        ev.watermark = track.watermark;
        if profile.writes_in_order() && ev.question.is_some() {
            track.open.rotate(track.watermark, span);
            let orphan = match ev.role {
                Role::ClientQuery => {
                    track.open.open(ev.key);
                    false
                }
                Role::ClientResponse => !track.open.close(ev.key),
                Role::UpstreamQuery | Role::UpstreamResponse => !track.open.contains(ev.key),
            };
            if orphan {
                self.shared.board.bump(source);
            }
        }
        ev.loss_seq = self.shared.board.get(source);
        router.dispatch(ev, tap.message_bytes);
    }
}
