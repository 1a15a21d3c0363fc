//! The edge where bytes come in: Frame Streams connections (`net`) and files (`file`) become
//! events (`StreamIngest`), routed to correlator shards by key (`router`), with the evidence
//! of lost messages kept per source (`loss`).

mod buffer;
pub mod file;
pub mod limits;
mod loss;
pub mod net;
mod router;
pub mod tls;

use buffer::ReadBuffer;
pub use loss::LossBoard;
pub use router::{Batch, QueueDepths, Router, ShardInput, BATCH};

use crate::diagnosis::recall::{Recall, RecallConfig};
use crate::dnstap::{
    self, Event, IdentityLimit, MessageSpan, Nanos, PeerKey, Role, SenderProfile, SourceId,
    SourceRegistry, StreamEnded, StreamId, TapFields,
};
use crate::framestream::{
    FrameAt, FrameDecoder, FrameError, Peek, ProtocolError, ReceiverStream, Step,
};
use crate::metrics::{Discard, ErrorChain, Metrics, Tally};
use hashbrown::HashMap;
use loss::SourceTrack;
use rustls::pki_types::CertificateDer;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Everything readers share.
#[derive(Clone)]
pub struct Shared {
    pub sources: Arc<SourceRegistry>,
    pub board: Arc<LossBoard>,
    pub metrics: Arc<Metrics>,
    pub max_frame_size: usize,
    pub session_timeout: Nanos,
    pub limits: SenderLimits,
    /// The windows of each stream's `diagnosis::Recall`.
    pub recall: RecallConfig,
}

impl Shared {
    /// What a reader in a unit test needs: these sender limits, 1 MiB frames, a 10 s session
    /// timeout, fresh counters.
    #[cfg(test)]
    pub(crate) fn for_tests(limits: SenderLimits) -> Self {
        Self {
            sources: Arc::new(limits.registry()),
            board: Arc::new(LossBoard::default()),
            metrics: Arc::new(Metrics::default()),
            max_frame_size: 1 << 20,
            session_timeout: 10_000_000_000,
            limits,
            recall: RecallConfig::default(),
        }
    }
}

impl SenderLimits {
    /// The registry of identities these limits bound.
    pub fn registry(&self) -> SourceRegistry {
        SourceRegistry::new(self.max_identities, self.identity_idle)
    }
}

/// Bounds on what senders control, beyond the connection limits (`limits`).
#[derive(Debug, Clone, Copy)]
pub struct SenderLimits {
    /// Identities registered at once (`--max-identities`).
    pub max_identities: usize,
    /// Identities one stream may track at once (`--identities-per-connection`).
    pub identities_per_stream: usize,
    /// A stream forgets an identity it has sent nothing of for this long (wall clock), and
    /// the registry reclaims one no stream tracks after it too (`--identity-idle-timeout`).
    pub identity_idle: Duration,
    /// Event times later than the wall clock plus this are out of range (`--max-time-ahead`).
    pub max_time_ahead: Duration,
    /// On `tls://` connections, only identities the client certificate is valid for are
    /// accepted (`--tls-pin-identity`).
    pub pin_identity: bool,
}

impl Default for SenderLimits {
    fn default() -> Self {
        Self {
            max_identities: 10_000,
            identities_per_stream: 1000,
            identity_idle: Duration::from_secs(600),
            max_time_ahead: Duration::from_secs(86_400),
            pin_identity: false,
        }
    }
}

/// The longest identity accepted, in bytes (a DNS name's 255 is plenty for a pod or host
/// name). A longer one is refused, never truncated: truncating would merge identities. With
/// versions cut to the same length, the registry holds at most
/// `--max-identities` x 2 x 255 bytes of names.
pub const MAX_IDENTITY_LEN: usize = 255;

/// Event times before this (2000-01-01) are out of range: no sender's clock is that wrong on
/// purpose, and 0 is what a zeroed field gives.
pub const EARLIEST_EVENT_TIME: Nanos = 946_684_800 * 1_000_000_000;

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// STOP was received (and FINISH sent where bidirectional).
    Stopped,
    /// The peer closed or reset without STOP.
    Closed,
    /// Closed by the analyser while idle (`--idle-timeout`): nothing was lost, but the sender
    /// did not stop.
    Idle,
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
    stream: StreamId,
    /// Name used as the source when a message carries no identity.
    peer: String,
    /// The peer's address: with the identity, it makes the sender (`SourceRegistry`).
    peer_ip: Option<IpAddr>,
    /// The peer address as events carry it, for the correlator's fair share per address.
    peer_key: PeerKey,
    decoder: FrameDecoder,
    receiver: ReceiverStream,
    /// Last identity seen and what it resolved to: identities rarely change within a stream.
    identity_cache: Option<(Vec<u8>, Resolved)>,
    /// The identities this stream tracks, each holding one reference in the registry.
    tracks: HashMap<SourceId, Tracked>,
    hasher: ahash::RandomState,
    tally: Tally,
    /// Messages and latest event time per source since the owner last took them
    /// (`take_source_counts`): a stream carries one identity or a few, so a short list.
    source_counts: Vec<SourceCount>,
    /// The wall clock at the current `feed`, read once per read rather than per message.
    now: Instant,
    /// The latest plausible event time at the current `feed`.
    latest_time: Nanos,
    /// When idle tracks were last looked for.
    swept_at: Instant,
    /// What the stream showed lately, for the causes a session cannot see by itself.
    recall: Recall,
    /// The stream ended with the sender's STOP and no partial frame: its identities are
    /// released as stopped (`identity_stopped`).
    sender_stopped: bool,
    pin: Pin,
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

/// What an identity resolved to on this stream.
#[derive(Debug, Clone, Copy)]
enum Resolved {
    Source(SourceId, SenderProfile),
    /// Refused (identity limit) at this time; asked again a second later.
    Refused(Instant),
    /// Not a name the connection's client certificate is valid for (`--tls-pin-identity`).
    Uncertified,
}

/// What a stream's identities are checked against (`--tls-pin-identity`).
enum Pin {
    /// Not pinned: plaintext, unix sockets, files, or the flag is off.
    Off,
    /// A `tls://` stream whose client certificate is not known yet (read after the handshake).
    Pending,
    /// The names of the client certificate (none when the sender presented none).
    Certificate(Option<CertificateDer<'static>>),
}

/// A stream's state for one of its identities.
struct Tracked {
    track: SourceTrack,
    last_used: Instant,
}

/// How often a stream looks for identities it no longer sends.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The next stream's number (0 is `StreamId::default()`, no stream's).
static NEXT_STREAM: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

impl StreamIngest {
    pub fn new(shared: Shared, peer: String, peer_ip: Option<IpAddr>) -> Self {
        let decoder = FrameDecoder::new(shared.max_frame_size);
        let recall = Recall::new(shared.recall);
        let now = Instant::now();
        // Relaxed: the number only has to be unique, not ordered with anything.
        let stream = StreamId(NEXT_STREAM.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        Self {
            shared,
            stream,
            peer,
            peer_ip,
            peer_key: PeerKey::of(peer_ip),
            decoder,
            receiver: ReceiverStream::new(),
            identity_cache: None,
            tracks: HashMap::new(),
            hasher: crate::dns::key_hasher(),
            tally: Tally::default(),
            source_counts: Vec::new(),
            now,
            latest_time: 0,
            swept_at: now,
            recall,
            sender_stopped: false,
            pin: Pin::Off,
        }
    }

    /// A `tls://` stream under `--tls-pin-identity`: its identities must be names its client
    /// certificate is valid for; the certificate is handed over with [`Self::pin_to`].
    pub fn pin_identities(&mut self) {
        if self.shared.limits.pin_identity {
            self.pin = Pin::Pending;
        }
    }

    /// Whether the stream waits for its client certificate ([`Self::pin_to`]).
    pub fn wants_certificate(&self) -> bool {
        matches!(self.pin, Pin::Pending)
    }

    /// The client certificate the TLS handshake verified (None: the sender presented none,
    /// and then no identity of this stream is accepted).
    pub fn pin_to(&mut self, certificate: Option<CertificateDer<'static>>) {
        self.pin = Pin::Certificate(certificate);
        self.identity_cache = None;
    }

    /// Whether `identity` may be sent on this stream: under a pin, a DNS name the client
    /// certificate is valid for (its subjectAltName, as a TLS client checks a server's).
    fn certified(&self, identity: &[u8]) -> bool {
        let cert = match &self.pin {
            Pin::Off => return true,
            Pin::Pending | Pin::Certificate(None) => return false,
            Pin::Certificate(Some(cert)) => cert,
        };
        let Ok(name) = std::str::from_utf8(identity) else {
            return false;
        };
        let Ok(name) = rustls::pki_types::ServerName::try_from(name) else {
            return false;
        };
        webpki::EndEntityCert::try_from(cert)
            .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
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

    /// Identities the stream tracks now.
    pub fn tracked_identities(&self) -> usize {
        self.tracks.len()
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
        buf: &mut ReadBuffer,
        router: &mut Router,
        replies: &mut Vec<u8>,
    ) -> Result<bool, StreamError> {
        self.feed_at(buf, router, replies, Instant::now(), SystemTime::now())
    }

    /// `feed` at a given time (tests).
    fn feed_at(
        &mut self,
        buf: &mut ReadBuffer,
        router: &mut Router,
        replies: &mut Vec<u8>,
        now: Instant,
        wall: SystemTime,
    ) -> Result<bool, StreamError> {
        self.now = now;
        let ahead = wall
            .checked_add(self.shared.limits.max_time_ahead)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(Nanos::MAX, |d| {
                Nanos::try_from(d.as_nanos()).unwrap_or(Nanos::MAX)
            });
        self.latest_time = ahead.min(crate::correlate::LATEST_EVENT_TIME);
        if now.saturating_duration_since(self.swept_at) >= SWEEP_EVERY {
            self.forget_idle_identities();
        }
        let result = self.feed_frames(buf, router, replies);
        self.tally.recall_forgotten += self.recall.take_forgotten();
        self.shared.metrics.add(&std::mem::take(&mut self.tally));
        result
    }

    /// Lets go of the identities this stream has sent nothing of for `identity_idle`: their
    /// open queries are older than any session the correlator still waits for.
    fn forget_idle_identities(&mut self) {
        self.swept_at = self.now;
        let (now, idle) = (self.now, self.shared.limits.identity_idle);
        let sources = &self.shared.sources;
        self.tracks.retain(|id, t| {
            let keep = now.saturating_duration_since(t.last_used) < idle;
            if !keep {
                sources.release(*id, now);
            }
            keep
        });
        if let Some((_, Resolved::Source(id, _))) = &self.identity_cache {
            if !self.tracks.contains_key(id) {
                self.identity_cache = None;
            }
        }
    }

    fn feed_frames(
        &mut self,
        buf: &mut ReadBuffer,
        router: &mut Router,
        replies: &mut Vec<u8>,
    ) -> Result<bool, StreamError> {
        loop {
            let complete = self.decoder.complete_prefix(buf.data())?;
            if complete == 0 {
                if let Peek::Incomplete { need } = self.decoder.peek(buf.data())? {
                    buf.fit(need);
                }
                return Ok(false);
            }
            // The complete frames go to the shards as one piece; they end with the first
            // control frame, which may end the stream.
            let piece = buf.take(complete);
            router.begin_piece(piece.clone());
            let mut at = 0;
            while let Some((frame, len)) = self.decoder.frame_at(&piece[at..])? {
                match frame {
                    FrameAt::Data(payload) => {
                        self.receiver.on_data()?;
                        // Counted once the receiver takes it as dnstap: a data frame it
                        // refuses (before START) ends the stream as bad_stream instead, so
                        // every frame counted is a message or a per-message drop.
                        self.tally.frames += 1;
                        self.tally.bytes += payload.len() as u64 + 4;
                        self.on_payload(payload, at + len - payload.len(), router);
                    }
                    FrameAt::Control(control) => match self.receiver.on_control(control)? {
                        Step::Reply(r) => replies.extend_from_slice(&r),
                        Step::Finished(reply) => {
                            if let Some(r) = reply {
                                replies.extend_from_slice(&r);
                            }
                            return Ok(true);
                        }
                        Step::Continue | Step::Data(_) => {}
                    },
                }
                at += len;
            }
        }
    }

    /// Loss became evident on this stream: every session open on its sources is touched.
    pub fn loss_evident(&self) {
        for source in self.tracks.keys() {
            self.shared.board.bump(*source);
        }
    }

    /// The stream is over. Without STOP, buffered frames were lost at the sender: that is
    /// evidence of loss for every session still open on its sources. The shards hear of the
    /// end after the stream's last event, and stop waiting for its clock.
    pub fn finish(&mut self, end: StreamEnd, leftover: usize, router: &mut Router) {
        if leftover > 0 {
            self.shared.metrics.discard(Discard::TruncatedFrame, 1);
        }
        if end == StreamEnd::Closed || leftover > 0 {
            self.loss_evident();
        }
        self.sender_stopped = end == StreamEnd::Stopped && leftover == 0;
        if self.tracks.is_empty() {
            // It carried no identity (a probe, a failed handshake): no shard knows it.
            return;
        }
        let board = &self.shared.board;
        router.end_stream(StreamEnded {
            stream: self.stream,
            sources: self.tracks.keys().map(|&s| (s, board.get(s))).collect(),
        });
    }
}

impl Drop for StreamIngest {
    /// The stream's identities are no longer tracked by it.
    fn drop(&mut self) {
        let now = Instant::now();
        for id in self.tracks.keys() {
            match self.sender_stopped {
                true => self.shared.sources.release_stopped(*id, now),
                false => self.shared.sources.release(*id, now),
            }
        }
    }
}

impl StreamIngest {
    /// One data frame's payload, which starts at `at` in the router's current piece.
    fn on_payload(&mut self, payload: &[u8], at: usize, router: &mut Router) {
        let mut tap = TapFields::default();
        if let Err(e) = dnstap::scan_into(payload, &mut tap) {
            let metrics = &self.shared.metrics;
            metrics.discard(Discard::from(&e), 1);
            metrics.warn(format_args!(
                "{}: {}; frame skipped",
                self.peer,
                ErrorChain(&e)
            ));
            return;
        }
        let Some((source, profile)) = self.source_of(tap.identity, tap.version) else {
            return;
        };
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
        self.drop_implausible_times(&mut ev);
        self.tally.message(ev.role);
        let Some(tracked) = self.tracks.get_mut(&source) else {
            return;
        };
        tracked.last_used = self.now;
        ev.stream = self.stream;
        ev.peer = self.peer_key;
        let track = &mut tracked.track;
        ev.watermark = track.advance(ev.time());
        if track.reveals_loss(&ev, self.shared.session_timeout) {
            self.shared.board.bump(source);
        }
        ev.loss_seq = self.shared.board.get(source);
        self.count_source(source, ev.role, ev.watermark);
        ev.recalled = self.recall.observe(&ev);
        ev.has_extra = !tap.extra.is_empty();
        let facts = ev.message.facts;
        ev.message = MessageSpan::within(payload, at, tap.message_bytes, tap.extra, facts);
        router.dispatch(ev);
    }

    /// A time before 2000 or past the wall clock plus `--max-time-ahead` is dropped from the
    /// event, which then takes its stream's clock: one sender's broken (or hostile) clock must
    /// neither move its identity's clock nor keep a session open forever. Counted
    /// (`time_out_of_range`) and logged; the message itself is kept.
    fn drop_implausible_times(&self, ev: &mut Event) {
        let plausible = |t: &Nanos| (EARLIEST_EVENT_TIME..=self.latest_time).contains(t);
        let (query, response) = (ev.query_time, ev.response_time);
        ev.query_time = query.filter(plausible);
        ev.response_time = response.filter(plausible);
        if (query, response) != (ev.query_time, ev.response_time) {
            ev.time_rejected = true;
            let metrics = &self.shared.metrics;
            metrics.discard(Discard::TimeOutOfRange, 1);
            let secs = |t: Option<Nanos>| t.map(|t| t / 1_000_000_000);
            metrics.warn(format_args!(
                "{}: {:?} with a time outside 2000..now+{}s (query {:?} s, response {:?} s \
                 since 1970); the time is ignored",
                self.peer,
                ev.role,
                self.shared.limits.max_time_ahead.as_secs(),
                secs(query),
                secs(response),
            ));
        }
    }

    /// The source and profile of a message's identity (the peer's name when it has none), now
    /// tracked by this stream; None when the identity is refused (counted and logged).
    fn source_of(&mut self, identity: &[u8], version: &[u8]) -> Option<(SourceId, SenderProfile)> {
        if identity.len() > MAX_IDENTITY_LEN {
            // Not cached: the cache would hold the long name.
            let metrics = &self.shared.metrics;
            metrics.discard(Discard::IdentityTooLong, 1);
            metrics.warn(format_args!(
                "{}: identity of {} bytes (more than {MAX_IDENTITY_LEN}) starting {:?}; its \
                 messages are dropped and counted (identity_too_long)",
                self.peer,
                identity.len(),
                String::from_utf8_lossy(&identity[..32])
                    .escape_debug()
                    .to_string(),
            ));
            return None;
        }
        let version = &version[..version.len().min(MAX_IDENTITY_LEN)];
        if let Some((id, resolved)) = &self.identity_cache {
            if id.as_slice() == identity {
                match *resolved {
                    Resolved::Source(s, p) => return Some((s, p)),
                    Resolved::Refused(at)
                        if self.now.saturating_duration_since(at) < SWEEP_EVERY =>
                    {
                        self.shared.metrics.discard(Discard::IdentityLimit, 1);
                        return None;
                    }
                    Resolved::Refused(_) => {}
                    Resolved::Uncertified => {
                        self.shared
                            .metrics
                            .discard(Discard::IdentityNotCertified, 1);
                        return None;
                    }
                }
            }
        }
        if !self.certified(identity) {
            let metrics = &self.shared.metrics;
            metrics.discard(Discard::IdentityNotCertified, 1);
            metrics.warn(format_args!(
                "{}: identity {:?} is not a name its client certificate is valid for; its \
                 messages are dropped and counted (identity_not_certified)",
                self.peer,
                String::from_utf8_lossy(identity).escape_debug().to_string(),
            ));
            self.identity_cache = Some((identity.to_vec(), Resolved::Uncertified));
            return None;
        }
        let resolved = match self.track(identity, version) {
            Ok(source) => Resolved::Source(source, SenderProfile::from_version(version)),
            Err(limit) => {
                let metrics = &self.shared.metrics;
                metrics.discard(Discard::IdentityLimit, 1);
                metrics.identity_refused(&self.peer, self.peer_ip, identity, &limit);
                Resolved::Refused(self.now)
            }
        };
        self.identity_cache = Some((identity.to_vec(), resolved));
        match resolved {
            Resolved::Source(s, p) => Some((s, p)),
            Resolved::Refused(_) | Resolved::Uncertified => None,
        }
    }

    /// Registers the identity with this stream: one registry reference per tracked identity.
    fn track(&mut self, identity: &[u8], version: &[u8]) -> Result<SourceId, IdentityLimit> {
        let peer;
        let name = if identity.is_empty() {
            peer = self.peer.clone();
            peer.as_bytes()
        } else {
            identity
        };
        let sources = self.shared.sources.clone();
        let peer = self.peer_ip;
        if let Some(source) = sources.lookup(peer, name) {
            if self.tracks.contains_key(&source) {
                // Tracked already: the version may have changed.
                sources.acquire(peer, name, version, self.now)?;
                sources.release(source, self.now);
                return Ok(source);
            }
        }
        // Refused before the registry sees it: a connection at its limit must not fill the
        // registry with names it cannot use.
        let per_stream = self.shared.limits.identities_per_stream;
        if self.tracks.len() >= per_stream {
            self.forget_idle_identities();
        }
        if self.tracks.len() >= per_stream {
            return Err(IdentityLimit {
                max: per_stream,
                per_connection: true,
            });
        }
        let source = sources.acquire(peer, name, version, self.now)?;
        let tracked = Tracked {
            track: SourceTrack::default(),
            last_used: self.now,
        };
        self.tracks.insert(source, tracked);
        Ok(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dnstap::{pb, DnstapMessage, MessageType};
    use quick_protobuf::{MessageWrite, Writer};
    use std::borrow::Cow;
    use std::sync::atomic::AtomicU64;

    const S: Nanos = 1_000_000_000;

    /// A reader's view: one stream into one shard whose queue the test reads.
    struct Stream {
        ingest: StreamIngest,
        router: Router,
        rx: crossbeam_channel::Receiver<ShardInput>,
        metrics: Arc<Metrics>,
        sources: Arc<SourceRegistry>,
        now: Instant,
        wall: SystemTime,
    }

    impl Stream {
        fn new(limits: SenderLimits) -> Self {
            let shared = Shared::for_tests(limits);
            let (metrics, sources) = (shared.metrics.clone(), shared.sources.clone());
            let (tx, rx) = crossbeam_channel::unbounded();
            let depths: QueueDepths = Arc::new([AtomicU64::new(0)]);
            let router = Router::new(vec![tx], depths, 1 << 30, true, metrics.clone());
            let mut s = Self {
                ingest: StreamIngest::new(shared, "peer".into(), None),
                router,
                rx,
                metrics,
                sources,
                now: Instant::now(),
                wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000),
            };
            // Unidirectional START.
            let ct = crate::framestream::DNSTAP_CONTENT_TYPE;
            let mut start = vec![0, 0, 0, 0];
            start.extend_from_slice(&(12 + ct.len() as u32).to_be_bytes());
            start.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 1]);
            start.extend_from_slice(&(ct.len() as u32).to_be_bytes());
            start.extend_from_slice(ct);
            s.feed(&start);
            s
        }

        fn feed(&mut self, bytes: &[u8]) {
            let mut buf = ReadBuffer::new(64 << 10);
            buf.extend_from_slice(bytes);
            let mut replies = Vec::new();
            let (now, wall) = (self.now, self.wall);
            let r = self
                .ingest
                .feed_at(&mut buf, &mut self.router, &mut replies, now, wall);
            assert!(r.is_ok() && buf.is_empty(), "{r:?}");
        }

        /// One message of `identity` (see [`frame`]).
        fn send(&mut self, identity: &[u8], role: MessageType, id: u16, secs: u64) {
            self.feed(&frame(identity, role, id, secs));
        }

        /// (identity, role, query_time, watermark) of every event routed so far.
        fn events(&mut self) -> Vec<(String, Role, Option<Nanos>, Nanos)> {
            self.router.flush();
            let mut out = Vec::new();
            for mut batch in self.rx.try_iter().filter_map(ShardInput::into_batch) {
                for ev in std::mem::take(&mut batch.events) {
                    let name = self.sources.describe(ev.source).0.to_string();
                    out.push((name, ev.role, ev.query_time, ev.watermark));
                }
            }
            out
        }
    }

    /// A CoreDNS data frame of `identity`: a query (CQ) or a response (CR) of DNS id `id`,
    /// stamped at `secs` since 1970.
    pub(crate) fn frame(identity: &[u8], role: MessageType, id: u16, secs: u64) -> Vec<u8> {
        let mut wire = crate::dns::tests::query(&["www", "example", "test"], id);
        let response = role == MessageType::CLIENT_RESPONSE;
        if response {
            wire[2] |= 0x80;
        }
        let client = [127, 0, 0, 1];
        let msg = DnstapMessage {
            type_pb: role,
            socket_family: Some(pb::SocketFamily::INET),
            socket_protocol: Some(pb::SocketProtocol::UDP),
            query_address: Some(Cow::Borrowed(&client[..])),
            query_port: Some(5300),
            query_time_sec: Some(secs),
            response_time_sec: response.then_some(secs),
            query_message: (!response).then_some(Cow::Borrowed(&wire[..])),
            response_message: response.then_some(Cow::Borrowed(&wire[..])),
            ..Default::default()
        };
        let tap = pb::Dnstap {
            identity: Some(Cow::Borrowed(identity)),
            version: Some(Cow::Borrowed(b"CoreDNS-1.10.1")),
            type_pb: pb::mod_Dnstap::Type::MESSAGE,
            message: Some(msg),
            ..Default::default()
        };
        let mut frame = (tap.get_size() as u32).to_be_bytes().to_vec();
        tap.write_message(&mut Writer::new(&mut frame)).unwrap();
        frame
    }

    const NOW: u64 = 1_750_000_000;

    #[test]
    fn implausible_times_are_dropped_counted_and_move_no_clock() {
        let mut s = Stream::new(SenderLimits::default());
        s.send(b"good", MessageType::CLIENT_QUERY, 1, NOW - 5);
        s.send(b"evil", MessageType::CLIENT_QUERY, 2, NOW - 3);
        s.send(b"evil", MessageType::CLIENT_QUERY, 3, u64::MAX);
        s.send(b"evil", MessageType::CLIENT_QUERY, 4, NOW + 2 * 86_400);
        s.send(b"evil", MessageType::CLIENT_QUERY, 5, 1);
        s.send(b"evil", MessageType::CLIENT_QUERY, 6, NOW - 2);
        s.send(b"good", MessageType::CLIENT_QUERY, 7, NOW - 1);
        s.send(b"evil", MessageType::CLIENT_QUERY, 8, NOW + 3600);
        let ev = s.events();
        let ev: Vec<(&str, Option<Nanos>, Nanos)> =
            ev.iter().map(|(n, _, t, w)| (n.as_str(), *t, *w)).collect();
        let t = |secs: u64| secs * S;
        assert_eq!(
            ev,
            [
                ("good", Some(t(NOW - 5)), t(NOW - 5)),
                ("evil", Some(t(NOW - 3)), t(NOW - 3)),
                ("evil", None, t(NOW - 3)),
                ("evil", None, t(NOW - 3)),
                ("evil", None, t(NOW - 3)),
                ("evil", Some(t(NOW - 2)), t(NOW - 2)),
                ("good", Some(t(NOW - 1)), t(NOW - 1)),
                ("evil", Some(t(NOW + 3600)), t(NOW + 3600)),
            ],
            "out-of-range times are gone and the clocks never saw them; within a day ahead is fine"
        );
        assert_eq!(s.metrics.discarded(Discard::TimeOutOfRange), 3);
        assert_eq!(
            s.metrics
                .messages
                .load(std::sync::atomic::Ordering::Relaxed),
            8,
            "the messages themselves are kept"
        );
    }

    fn limits(max: usize, per_stream: usize, idle_secs: u64) -> SenderLimits {
        SenderLimits {
            max_identities: max,
            identities_per_stream: per_stream,
            identity_idle: Duration::from_secs(idle_secs),
            ..SenderLimits::default()
        }
    }

    #[test]
    fn identities_beyond_the_limit_are_refused_and_counted_never_merged() {
        let mut s = Stream::new(limits(3, 1000, 600));
        for name in [&b"a"[..], b"b", b"c", b"d", b"e", b"a", b"d", b"c"] {
            s.send(name, MessageType::CLIENT_QUERY, 1, NOW);
        }
        let names: Vec<String> = s.events().into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["a", "b", "c", "a", "c"]);
        assert_eq!(s.metrics.discarded(Discard::IdentityLimit), 3);
        assert_eq!(s.sources.len(), 3);
    }

    #[test]
    fn a_connection_tracks_a_bounded_number_of_identities() {
        let mut s = Stream::new(limits(10_000, 2, 600));
        for name in [&b"a"[..], b"b", b"c", b"a"] {
            s.send(name, MessageType::CLIENT_QUERY, 1, NOW);
        }
        assert_eq!(s.events().len(), 3);
        assert_eq!(s.metrics.discarded(Discard::IdentityLimit), 1);
        assert_eq!(s.ingest.tracked_identities(), 2);
        assert_eq!(
            s.sources.len(),
            2,
            "the refused one holds no registry entry"
        );
    }

    #[test]
    fn a_hundred_thousand_identities_take_bounded_state_and_expire() {
        let idle = 60;
        let mut s = Stream::new(limits(1000, 1000, idle));
        // A pod that stays.
        s.send(b"steady", MessageType::CLIENT_QUERY, 1, NOW);
        for i in 0..100_000u32 {
            if i % 10_000 == 0 {
                s.send(b"steady", MessageType::CLIENT_QUERY, 2, NOW);
            }
            s.send(
                format!("churn-{i}").as_bytes(),
                MessageType::CLIENT_QUERY,
                3,
                NOW,
            );
            assert!(s.ingest.tracked_identities() <= 1000);
            assert!(s.sources.len() <= 1000 && s.sources.capacity_used() <= 1000);
            let _ = s.events();
        }
        let refused = s.metrics.discarded(Discard::IdentityLimit);
        assert_eq!(
            refused,
            100_000 - 999,
            "the first 999 got a slot, beside steady"
        );
        // Later: the churned identities went quiet; steady still sends.
        for step in 1..=3 {
            s.now += Duration::from_secs(idle);
            s.send(
                b"steady",
                MessageType::CLIENT_QUERY,
                10 + step,
                NOW + step as u64,
            );
        }
        assert_eq!(s.ingest.tracked_identities(), 1, "only steady is tracked");
        s.send(b"newcomer", MessageType::CLIENT_QUERY, 20, NOW + 4);
        assert_eq!(s.metrics.discarded(Discard::IdentityLimit), refused);
        assert_eq!(s.sources.len(), 2, "the quiet ones were reclaimed");
        let steady: Vec<_> = s
            .events()
            .into_iter()
            .filter(|e| e.0 == "steady" || e.0 == "newcomer")
            .collect();
        assert_eq!(steady.len(), 4, "steady was never refused: {steady:?}");
    }

    #[test]
    fn dropping_a_stream_lets_go_of_its_identities() {
        let mut s = Stream::new(limits(1, 10, 60));
        s.send(b"a", MessageType::CLIENT_QUERY, 1, NOW);
        let (sources, metrics, now) = (s.sources.clone(), s.metrics.clone(), s.now);
        drop(s);
        let later = now + Duration::from_secs(120);
        assert!(
            sources.acquire(None, b"b", b"", later).is_ok(),
            "a was reclaimed"
        );
        assert_eq!(metrics.discarded(Discard::IdentityLimit), 0);
    }
}
