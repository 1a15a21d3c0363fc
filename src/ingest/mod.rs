//! The edge where bytes come in: Frame Streams connections (`net`) and files (`file`) become
//! events (`StreamIngest`), routed to correlator shards by key (`router`), with the evidence
//! of lost messages kept per source (`loss`).

pub mod file;
pub mod limits;
mod loss;
pub mod net;
mod router;

pub use loss::LossBoard;
pub use router::{Batch, QueueDepths, Router, ShardInput, BATCH};

use crate::dnstap::{self, Event, Nanos, Role, SenderProfile, SourceId, SourceRegistry};
use crate::framestream::{FrameDecoder, FrameError, ProtocolError, ReceiverStream, Step};
use crate::metrics::{Discard, ErrorChain, Metrics, Tally};
use bytes::BytesMut;
use hashbrown::HashMap;
use loss::SourceTrack;
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

/// Everything readers share.
#[derive(Clone)]
pub struct Shared {
    pub sources: Arc<SourceRegistry>,
    pub board: Arc<LossBoard>,
    pub metrics: Arc<Metrics>,
    pub max_frame_size: usize,
    pub session_timeout: Nanos,
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// STOP was received (and FINISH sent where bidirectional).
    Stopped,
    /// The peer closed or reset without STOP.
    Closed,
}

/// Why a stream had to be closed: the layer that failed, and its error. Transparent: it
/// displays as the layer's error and passes on that error's source.
#[derive(Debug)]
pub enum StreamError {
    Frame(FrameError),
    Protocol(ProtocolError),
}

impl StreamError {
    fn layer(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            Self::Frame(e) => e,
            Self::Protocol(e) => e,
        }
    }
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self.layer(), f)
    }
}

impl std::error::Error for StreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.layer().source()
    }
}

impl From<FrameError> for StreamError {
    fn from(e: FrameError) -> Self {
        Self::Frame(e)
    }
}

impl From<ProtocolError> for StreamError {
    fn from(e: ProtocolError) -> Self {
        Self::Protocol(e)
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
    /// Messages and latest event time per source since the owner last took them
    /// (`take_source_counts`): a stream carries one identity or a few, so a short list.
    source_counts: Vec<SourceCount>,
}

/// What a stream counted for one source between two `StreamIngest::take_source_counts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceCount {
    pub source: SourceId,
    /// Indexed like `SourceCount::ROLES`.
    pub by_role: [u64; 4],
    /// The source's watermark (latest event time) on this stream.
    pub latest: Nanos,
}

impl SourceCount {
    pub const ROLES: [Role; 4] = [
        Role::ClientQuery,
        Role::ClientResponse,
        Role::UpstreamQuery,
        Role::UpstreamResponse,
    ];

    /// Adds these counts to a reader's live stats.
    pub fn record(&self, stats: &mut crate::metrics::model::ThreadStats) {
        for (role, n) in Self::ROLES.into_iter().zip(self.by_role) {
            stats.count_messages(self.source, role, n);
        }
        stats.note_event_time(self.source, self.latest);
    }
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
            source_counts: Vec::new(),
        }
    }

    /// Hands over the per-source counts gathered since the last call (a reader calls this per
    /// read, so the live metrics cost nothing per message), keeping the list's capacity.
    pub fn take_source_counts(&mut self, mut f: impl FnMut(&SourceCount)) {
        for c in self.source_counts.drain(..) {
            f(&c);
        }
    }

    fn count_source(&mut self, source: SourceId, role: Role, watermark: Nanos) {
        let i = SourceCount::ROLES
            .iter()
            .position(|r| *r == role)
            .unwrap_or(0);
        match self.source_counts.iter_mut().find(|c| c.source == source) {
            Some(c) => {
                c.by_role[i] += 1;
                c.latest = c.latest.max(watermark);
            }
            None => {
                let mut by_role = [0; 4];
                by_role[i] = 1;
                self.source_counts.push(SourceCount {
                    source,
                    by_role,
                    latest: watermark,
                });
            }
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
            let frame = match self.decoder.decode(buf)? {
                Some(f) => f,
                None => return Ok(false),
            };
            match self.receiver.on_frame(frame)? {
                Step::Continue => {}
                Step::Reply(r) => replies.extend_from_slice(&r),
                Step::Data(payload) => {
                    // Counted once the receiver takes it as dnstap: a data frame it refuses
                    // (before START) ends the stream as bad_stream instead, so every frame
                    // counted is a message or a per-message drop.
                    self.tally.frames += 1;
                    self.tally.bytes += payload.len() as u64 + 4;
                    self.on_payload(payload, router)
                }
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
        let tap = match dnstap::scan(&payload) {
            Ok(t) => t,
            Err(e) => {
                let metrics = &self.shared.metrics;
                metrics.discard(Discard::from(&e), 1);
                metrics.warn(format_args!(
                    "{}: {}; frame skipped",
                    self.peer,
                    ErrorChain(&e)
                ));
                return;
            }
        };
        let (source, profile) = self.source_of(tap.identity, tap.version);
        let metrics = &self.shared.metrics;
        let mut ev = match Event::from_fields(&tap, source, profile, &self.hasher) {
            Ok(ev) => ev,
            Err(e) => {
                metrics.discard(Discard::from(&e), 1);
                if e.loses_a_session_message() {
                    let why = ErrorChain(&e);
                    metrics.warn(format_args!("{}: {why}; message skipped", self.peer));
                    self.shared.board.bump(source);
                }
                return;
            }
        };
        if ev.question.is_none() && matches!(ev.role, Role::UpstreamQuery | Role::UpstreamResponse)
        {
            metrics.discard(Discard::UpstreamWithoutWire, 1);
            return;
        }
        self.tally.message(ev.role);
        let track = self.tracks.entry(source).or_default();
        ev.watermark = track.advance(ev.time());
        if track.reveals_loss(&ev, self.shared.session_timeout) {
            self.shared.board.bump(source);
        }
        ev.loss_seq = self.shared.board.get(source);
        self.count_source(source, ev.role, ev.watermark);
        router.dispatch(ev, tap.message_bytes);
    }

    /// The source and profile of a message's identity (the peer's name when it has none).
    fn source_of(&mut self, identity: &[u8], version: &[u8]) -> (SourceId, SenderProfile) {
        if let Some((id, s, p)) = &self.identity_cache {
            if id.as_slice() == identity {
                return (*s, *p);
            }
        }
        let name = if identity.is_empty() {
            self.peer.as_bytes()
        } else {
            identity
        };
        let source = self.shared.sources.intern(name, version);
        let profile = SenderProfile::from_version(version);
        self.identity_cache = Some((identity.to_vec(), source, profile));
        (source, profile)
    }
}
