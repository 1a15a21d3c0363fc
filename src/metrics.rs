//! Counters shared by every stage, and the summary line printed on exit; the live view of
//! them (per-thread stats, exposition, health and the HTTP endpoint) is in the submodules.

pub mod auth;
pub mod exposition;
pub mod health;
pub mod http;
pub mod lookups;
pub mod model;
pub mod process;
pub mod top;
pub mod top_client;
pub mod web_config;

use crate::correlate::{Status, Verdict};
use crate::dnstap::{DecodeError, Role};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a message, frame or connection was dropped. Every drop has exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// A shard's queue was full; the sessions it touched become SampleLoss.
    QueueFull,
    /// A shard's queue was gone (its shard had stopped): only during shutdown.
    QueueDisconnected,
    /// A valid frame whose protobuf does not decode.
    Protobuf,
    /// A dnstap payload without a message.
    NoMessage,
    /// AUTH/STUB/TOOL/UPDATE messages: not part of client sessions.
    UnsupportedMessageType,
    /// A DNS message without a parseable header or question.
    DnsUndecodable,
    /// Upstream messages without wire data cannot be joined (CoreDNS without `full`).
    UpstreamWithoutWire,
    /// Bytes after which a stream could not continue: garbage, oversized or bad frames.
    BadStream,
    /// A truncated frame at the end of a connection.
    TruncatedFrame,
    /// A sender offering another content type than dnstap.
    ContentType,
    /// The handshake did not finish within 5 s.
    HandshakeTimeout,
    /// Over --max-connections.
    ConnectionLimit,
    /// A partial frame dropped with its connection: over --frame-buffer-budget.
    FrameBudget,
    /// A message no session could take: the session table was full (--max-sessions) and held
    /// nothing to evict.
    SessionTableFull,
    /// A message time outside the plausible range (before 2000, or later than --max-time-ahead
    /// past the wall clock): the time is dropped, the message kept at its stream's clock.
    TimeOutOfRange,
    /// A message of a new identity refused: --max-identities (or
    /// --identities-per-connection on its connection) were in use.
    IdentityLimit,
    /// A message whose identity is longer than `MAX_IDENTITY_LEN` bytes: refused, never
    /// truncated (truncating would merge identities).
    IdentityTooLong,
    /// A message on a `tls://` connection whose identity is not a name its client certificate
    /// is valid for (`--tls-pin-identity`).
    IdentityNotCertified,
}

impl Discard {
    pub const ALL: [Discard; 18] = [
        Discard::QueueFull,
        Discard::QueueDisconnected,
        Discard::Protobuf,
        Discard::NoMessage,
        Discard::UnsupportedMessageType,
        Discard::DnsUndecodable,
        Discard::UpstreamWithoutWire,
        Discard::BadStream,
        Discard::TruncatedFrame,
        Discard::ContentType,
        Discard::HandshakeTimeout,
        Discard::ConnectionLimit,
        Discard::FrameBudget,
        Discard::SessionTableFull,
        Discard::TimeOutOfRange,
        Discard::IdentityLimit,
        Discard::IdentityTooLong,
        Discard::IdentityNotCertified,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::QueueDisconnected => "queue_disconnected",
            Self::Protobuf => "protobuf_undecodable",
            Self::NoMessage => "no_message",
            Self::UnsupportedMessageType => "unsupported_message_type",
            Self::DnsUndecodable => "dns_undecodable",
            Self::UpstreamWithoutWire => "upstream_without_wire",
            Self::BadStream => "bad_stream",
            Self::TruncatedFrame => "truncated_frame",
            Self::ContentType => "content_type",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::ConnectionLimit => "connection_limit",
            Self::FrameBudget => "frame_budget",
            Self::SessionTableFull => "session_table_full",
            Self::TimeOutOfRange => "time_out_of_range",
            Self::IdentityLimit => "identity_limit",
            Self::IdentityTooLong => "identity_too_long",
            Self::IdentityNotCertified => "identity_not_certified",
        }
    }

    /// What was dropped: the metric family the reason is counted in.
    pub fn unit(self) -> DiscardUnit {
        match self {
            Self::QueueFull
            | Self::QueueDisconnected
            | Self::UnsupportedMessageType
            | Self::DnsUndecodable
            | Self::UpstreamWithoutWire
            | Self::SessionTableFull
            | Self::IdentityLimit
            | Self::IdentityTooLong
            | Self::IdentityNotCertified => DiscardUnit::Message,
            Self::Protobuf | Self::NoMessage | Self::TruncatedFrame | Self::FrameBudget => {
                DiscardUnit::Frame
            }
            Self::BadStream
            | Self::ContentType
            | Self::HandshakeTimeout
            | Self::ConnectionLimit => DiscardUnit::Connection,
            Self::TimeOutOfRange => DiscardUnit::Time,
        }
    }
}

/// The unit of a drop: one family each (`discarded_messages_total`, `discarded_frames_total`,
/// `discarded_connections_total`, `rejected_times_total`), so a rate of one never adds
/// messages to connections. A rejected time drops no message: only its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardUnit {
    Message,
    Frame,
    Connection,
    Time,
}

/// Why an accepted connection ended. Every closed connection has exactly one, so accepted =
/// open + the sum of these; refused connections are `Discard::ConnectionLimit` instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// The sender sent STOP.
    Stopped,
    /// The sender closed or reset without STOP.
    PeerClosed,
    /// Bytes the stream could not continue after (see the discard counted with it).
    BadStream,
    /// No READY/START within --handshake-timeout.
    HandshakeTimeout,
    /// Idle longer than --idle-timeout while --max-connections was reached: closed to make room.
    IdleTimeout,
    /// Held the largest partial frame while --frame-buffer-budget was exceeded.
    FrameBudget,
    /// Still open at shutdown.
    Shutdown,
    /// The analyser could not serve it (registering the socket failed).
    ServerError,
    /// The TLS handshake failed: not TLS, nothing in common, or our certificate refused.
    TlsHandshake,
    /// mTLS: no client certificate, or one the client CA does not vouch for.
    TlsClientCert,
    /// TLS failed after the handshake: a corrupt record, a renegotiation pressed, a fatal alert.
    TlsError,
}

impl Disconnect {
    pub const ALL: [Disconnect; 11] = [
        Disconnect::Stopped,
        Disconnect::PeerClosed,
        Disconnect::BadStream,
        Disconnect::HandshakeTimeout,
        Disconnect::IdleTimeout,
        Disconnect::FrameBudget,
        Disconnect::Shutdown,
        Disconnect::ServerError,
        Disconnect::TlsHandshake,
        Disconnect::TlsClientCert,
        Disconnect::TlsError,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::PeerClosed => "peer_closed",
            Self::BadStream => "bad_stream",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::FrameBudget => "frame_budget",
            Self::Shutdown => "shutdown",
            Self::ServerError => "server_error",
            Self::TlsHandshake => "tls_handshake",
            Self::TlsClientCert => "tls_client_cert",
            Self::TlsError => "tls_error",
        }
    }
}

/// The one reason a payload that yields no event is counted under.
impl From<&DecodeError> for Discard {
    fn from(e: &DecodeError) -> Self {
        match e {
            DecodeError::Protobuf(_) | DecodeError::Malformed | DecodeError::NoMessageType => {
                Self::Protobuf
            }
            DecodeError::NoMessage => Self::NoMessage,
            DecodeError::UnsupportedType(_) => Self::UnsupportedMessageType,
            DecodeError::Dns(_) => Self::DnsUndecodable,
        }
    }
}

/// Displays an error with its causes: `error: cause: cause's cause`.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

/// Counts one reader accumulates between two `Metrics::add`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub frames: u64,
    pub bytes: u64,
    pub by_role: [u64; 4],
    /// Upstream answers and attempts a stream's `diagnosis::Recall` forgot within its windows.
    pub recall_forgotten: u64,
}

impl Tally {
    pub fn message(&mut self, role: Role) {
        let i = match role {
            Role::ClientQuery => 0,
            Role::ClientResponse => 1,
            Role::UpstreamQuery => 2,
            Role::UpstreamResponse => 3,
        };
        self.by_role[i] += 1;
    }
}

/// A shard's count of finished sessions, added to [`Metrics`] every few dozen sessions: one
/// shared atomic add per session from every shard kept a cache line moving between cores.
#[derive(Debug, Default)]
pub struct SessionCounts {
    sessions: u64,
    /// [status][bitmap], as `Metrics::sessions_by`.
    by: [[u64; 16]; 3],
}

impl SessionCounts {
    pub fn count(&mut self, v: &Verdict) {
        self.sessions += 1;
        self.by[v.status as usize][(v.bitmap.0 & 15) as usize] += 1;
    }

    /// Sessions counted since the counts were last added.
    pub fn pending(&self) -> u64 {
        self.sessions
    }
}

#[derive(Default)]
pub struct Metrics {
    /// The lookup stage's counts (set when the stage starts), for the summary and /metrics.
    pub lookups: std::sync::OnceLock<std::sync::Arc<lookups::LookupBoard>>,
    pub messages: AtomicU64,
    pub messages_by_role: [AtomicU64; 4],
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_closed: AtomicU64,
    connections_closed_by: [AtomicU64; Disconnect::ALL.len()],
    pub sessions: AtomicU64,
    /// [status][bitmap]
    pub sessions_by: [[AtomicU64; 16]; 3],
    pub sessions_printed: AtomicU64,
    /// What the streams' recall forgot to stay bounded (see `diagnosis::recall`).
    pub recall_forgotten: AtomicU64,
    /// Set when the shutdown deadline passed (`--shutdown-timeout`): session lines not
    /// written plus sessions still open; the summary shows it only then.
    pub sessions_not_written: std::sync::Mutex<Option<u64>>,
    discards: [AtomicU64; Discard::ALL.len()],
    /// TLS handshakes completed (connections that got to Frame Streams over TLS).
    pub tls_handshakes: AtomicU64,
    /// Changed certificate files loaded, and changed ones that did not load (the old stay).
    pub tls_cert_reloads: AtomicU64,
    pub tls_cert_reload_errors: AtomicU64,
    /// Requests the metrics port refused by client authentication, by `auth::Refusal`.
    pub metrics_auth_refused: [AtomicU64; auth::Refusal::ALL.len()],
    log_limiter: Mutex<LogLimiter>,
    /// Identities refused (identity limits), by peer address: their own log lines and counts.
    refused: Mutex<RefusedIdentities>,
}

impl Metrics {
    pub fn discard(&self, why: Discard, n: u64) {
        self.discards[why as usize].fetch_add(n, Relaxed);
    }

    pub fn discarded(&self, why: Discard) -> u64 {
        self.discards[why as usize].load(Relaxed)
    }

    /// One accepted connection ended, for this reason.
    pub fn disconnected(&self, why: Disconnect) {
        self.connections_closed_by[why as usize].fetch_add(1, Relaxed);
        self.connections_closed.fetch_add(1, Relaxed);
    }

    pub fn disconnects(&self, why: Disconnect) -> u64 {
        self.connections_closed_by[why as usize].load(Relaxed)
    }

    /// Adds a reader's local tally (kept per read, so the hot path touches no shared counter).
    pub fn add(&self, t: &Tally) {
        self.frames.fetch_add(t.frames, Relaxed);
        self.bytes.fetch_add(t.bytes, Relaxed);
        self.messages.fetch_add(t.by_role.iter().sum(), Relaxed);
        for (c, n) in self.messages_by_role.iter().zip(t.by_role) {
            c.fetch_add(n, Relaxed);
        }
        if t.recall_forgotten > 0 {
            self.recall_forgotten.fetch_add(t.recall_forgotten, Relaxed);
        }
    }

    /// Adds a shard's session counts and empties them.
    pub fn add_sessions(&self, c: &mut SessionCounts) {
        if c.sessions == 0 {
            return;
        }
        self.sessions.fetch_add(c.sessions, Relaxed);
        for (shared, mine) in self.sessions_by.iter().flatten().zip(c.by.iter().flatten()) {
            if *mine > 0 {
                shared.fetch_add(*mine, Relaxed);
            }
        }
        *c = SessionCounts::default();
    }

    /// Logs a problem on stderr, at most 10 lines per 10 s per process; the rest are counted
    /// and the number suppressed is said with the next line that gets through.
    pub fn warn(&self, msg: std::fmt::Arguments<'_>) {
        let mut l = self.log_limiter.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(l.window_start) > Duration::from_secs(10) {
            l.window_start = now;
            l.in_window = 0;
        }
        if l.in_window >= 10 {
            l.suppressed += 1;
            return;
        }
        l.in_window += 1;
        let suppressed = std::mem::take(&mut l.suppressed);
        drop(l);
        if suppressed > 0 {
            eprintln!("dnstap-analyser: warning: {msg} ({suppressed} similar lines suppressed)");
        } else {
            eprintln!("dnstap-analyser: warning: {msg}");
        }
    }

    /// A new identity was refused (its registry or connection limit): the victim of a flood
    /// of identities must be visible. A name not logged before gets a line of its own, under
    /// a budget per peer address (and a global one) apart from every other warning, so an
    /// attacker's names, or its repeats, cannot use up the line naming another address's
    /// pod; repeats go through the ordinary rate limit. Counted per peer address (bounded).
    pub fn identity_refused(
        &self,
        peer: &str,
        ip: Option<std::net::IpAddr>,
        identity: &[u8],
        why: &dyn std::fmt::Display,
    ) {
        let name = String::from_utf8_lossy(identity).escape_debug().to_string();
        let mut r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let new = r.note(ip, identity, Instant::now());
        drop(r);
        let line = format_args!(
            "{peer}: identity {name:?} refused: {why}; its messages are dropped and counted \
             (identity_limit)"
        );
        match new {
            true => eprintln!("dnstap-analyser: warning: {line}"),
            false => self.warn(line),
        }
    }

    /// Identity refusals per peer address as a label value: at most
    /// `RefusedIdentities::ADDRESSES` addresses, the rest as `other`; unix sockets and files
    /// as `local`.
    pub fn identities_refused(&self) -> Vec<(String, u64)> {
        let r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let name = |ip: &Option<std::net::IpAddr>| ip.map_or("local".into(), |ip| ip.to_string());
        let mut v: Vec<_> = r
            .by_peer
            .iter()
            .map(|(ip, p)| (name(ip), p.refused))
            .collect();
        if r.other > 0 {
            v.push(("other".into(), r.other));
        }
        v
    }

    /// `{"summary":{...}}`, printed on stderr at exit.
    pub fn summary_json(&self) -> String {
        let mut status = serde_json::Map::new();
        let mut bitmap = serde_json::Map::new();
        let mut by = serde_json::Map::new();
        for st in Status::ALL {
            let row = &self.sessions_by[st as usize];
            let total: u64 = row.iter().map(|c| c.load(Relaxed)).sum();
            status.insert(st.name().into(), total.into());
            let mut per = serde_json::Map::new();
            for (b, c) in row.iter().enumerate() {
                let n = c.load(Relaxed);
                if n > 0 {
                    per.insert(b.to_string(), n.into());
                    let e = bitmap.entry(b.to_string()).or_insert(0u64.into());
                    *e = (e.as_u64().unwrap_or(0) + n).into();
                }
            }
            by.insert(st.name().into(), per.into());
        }
        // Messages, frames and connections by reason (their reasons are distinct); the
        // rejected times apart, as their messages were kept.
        let mut dropped = serde_json::Map::new();
        for d in Discard::ALL
            .into_iter()
            .filter(|d| d.unit() != DiscardUnit::Time)
        {
            dropped.insert(d.name().into(), self.discarded(d).into());
        }
        let mut closed = serde_json::Map::new();
        for d in Disconnect::ALL {
            closed.insert(d.name().into(), self.disconnects(d).into());
        }
        // The names the lines and the metrics use (RESOLVER_* count as FORWARDER_*).
        let mut by_type = serde_json::Map::new();
        let roles = [
            Role::ClientQuery,
            Role::ClientResponse,
            Role::UpstreamQuery,
            Role::UpstreamResponse,
        ];
        for (role, c) in roles.iter().zip(&self.messages_by_role) {
            let name = model::message_type_name(*role);
            by_type.insert(name.into(), c.load(Relaxed).into());
        }
        let lookups = self.lookups.get().map(|b| b.snapshot().to_json());
        let not_written = *self
            .sessions_not_written
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut summary = serde_json::json!({"summary": {
            "messages": self.messages.load(Relaxed),
            "messages_by_type": by_type,
            "frames": self.frames.load(Relaxed),
            "connections": self.connections_accepted.load(Relaxed),
            "connections_closed": closed,
            "sessions": self.sessions.load(Relaxed),
            "sessions_printed": self.sessions_printed.load(Relaxed),
            "sessions_not_written": not_written,
            "status": status,
            "bitmap": bitmap,
            "status_bitmap": by,
            "dropped": dropped,
            "rejected_times": self.discarded(Discard::TimeOutOfRange),
            "tls": {
                "handshakes": self.tls_handshakes.load(Relaxed),
                "cert_reloads": self.tls_cert_reloads.load(Relaxed),
                "cert_reload_errors": self.tls_cert_reload_errors.load(Relaxed),
            },
        }});
        if let Some(lookups) = lookups {
            summary["summary"]["lookups"] = lookups;
        }
        if not_written.is_none() {
            // Present only when the shutdown deadline passed.
            if let Some(o) = summary["summary"].as_object_mut() {
                o.remove("sessions_not_written");
            }
        }
        summary.to_string()
    }
}

/// Identities refused, per peer address: counts, names already logged, and the log budget.
#[derive(Default)]
struct RefusedIdentities {
    by_peer: hashbrown::HashMap<Option<std::net::IpAddr>, RefusedFrom>,
    /// Refusals of addresses beyond `ADDRESSES`.
    other: u64,
    /// Hashes of the (address, identity) pairs already logged; cleared when full.
    logged: hashbrown::HashSet<u64>,
    hasher: ahash::RandomState,
    /// New-name lines in the current 10 s window, over all addresses.
    window_start: Option<Instant>,
    in_window: u32,
}

#[derive(Default)]
struct RefusedFrom {
    refused: u64,
    /// New-name lines of this address in the current window.
    logged_in_window: u32,
}

impl RefusedIdentities {
    const ADDRESSES: usize = 256;
    const LOGGED: usize = 10_000;
    /// New-name lines per address, and over all addresses, per 10 s.
    const PER_ADDRESS: u32 = 3;
    const OVERALL: u32 = 100;

    /// Counts a refusal; true if it is to be logged as a new name.
    fn note(&mut self, ip: Option<std::net::IpAddr>, identity: &[u8], now: Instant) -> bool {
        if self
            .window_start
            .is_none_or(|t| now.duration_since(t) > Duration::from_secs(10))
        {
            self.window_start = Some(now);
            self.in_window = 0;
            self.by_peer
                .values_mut()
                .for_each(|p| p.logged_in_window = 0);
        }
        let full = self.by_peer.len() >= Self::ADDRESSES && !self.by_peer.contains_key(&ip);
        if full {
            self.other += 1;
            return false;
        }
        let from = self.by_peer.entry(ip).or_default();
        from.refused += 1;
        let key = self.hasher.hash_one((ip, identity));
        if self.logged.contains(&key)
            || from.logged_in_window >= Self::PER_ADDRESS
            || self.in_window >= Self::OVERALL
        {
            return false;
        }
        if self.logged.len() >= Self::LOGGED {
            self.logged.clear();
        }
        self.logged.insert(key);
        from.logged_in_window += 1;
        self.in_window += 1;
        true
    }
}

struct LogLimiter {
    window_start: Instant,
    in_window: u32,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self {
            window_start: Instant::now(),
            in_window: 0,
            suppressed: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shards_session_counts_reach_the_summary_once_and_are_emptied() {
        use crate::correlate::{BitMap, LossReason, Status};
        let verdict = |status, bitmap, loss| Verdict {
            status,
            bitmap: BitMap(bitmap),
            loss,
            incomplete: None,
        };
        let mut counts = SessionCounts::default();
        counts.count(&verdict(Status::Succeeded, 15, None));
        counts.count(&verdict(Status::Succeeded, 15, None));
        counts.count(&verdict(Status::Failed, 5, None));
        let lost = verdict(Status::SampleLoss, 1, Some(LossReason::SessionTableFull));
        counts.count(&lost);
        assert_eq!(counts.pending(), 4);
        let m = Metrics::default();
        m.add_sessions(&mut counts);
        assert_eq!(counts.pending(), 0);
        m.add_sessions(&mut counts);
        counts.count(&lost);
        m.add_sessions(&mut counts);
        let summary: serde_json::Value = serde_json::from_str(&m.summary_json()).unwrap();
        let summary = &summary["summary"];
        assert_eq!(summary["sessions"], 5);
        assert_eq!(summary["status"]["Succeeded"], 2);
        assert_eq!(summary["status_bitmap"]["Succeeded"]["15"], 2);
        assert_eq!(summary["status_bitmap"]["Failed"]["5"], 1);
        assert_eq!(summary["status_bitmap"]["SampleLoss"]["1"], 2);
    }

    #[test]
    fn every_discard_has_its_own_counter_and_summary_name() {
        let m = Metrics::default();
        for (i, d) in Discard::ALL.into_iter().enumerate() {
            assert_eq!(d as usize, i, "{d:?} out of place in ALL");
            m.discard(d, i as u64 + 1);
        }
        let summary: serde_json::Value = serde_json::from_str(&m.summary_json()).unwrap();
        let summary = &summary["summary"];
        let dropped = summary["dropped"].as_object().unwrap();
        assert_eq!(dropped.len(), Discard::ALL.len() - 1, "names are distinct");
        for (i, d) in Discard::ALL.into_iter().enumerate() {
            let n = match d.unit() {
                DiscardUnit::Time => &summary["rejected_times"],
                _ => &dropped[d.name()],
            };
            assert_eq!(*n, i as u64 + 1, "{}", d.name());
        }
        assert_eq!(m.discarded(Discard::QueueDisconnected), 2);
    }

    #[test]
    fn decode_errors_map_to_one_reason_each() {
        use crate::dns::DnsError;
        use crate::dnstap::MessageType;
        for (e, d) in [
            (DecodeError::Malformed, Discard::Protobuf),
            (DecodeError::NoMessageType, Discard::Protobuf),
            (DecodeError::NoMessage, Discard::NoMessage),
            (
                DecodeError::UnsupportedType(MessageType::AUTH_QUERY),
                Discard::UnsupportedMessageType,
            ),
            (DecodeError::Dns(DnsError::Short), Discard::DnsUndecodable),
        ] {
            assert_eq!(Discard::from(&e), d, "{e}");
        }
        let e = crate::dnstap::decode(b"\xff").unwrap_err();
        assert_eq!(Discard::from(&e), Discard::Protobuf);
    }

    #[test]
    fn error_chains_show_every_cause() {
        let e = DecodeError::Dns(crate::dns::DnsError::NoQuestion);
        assert_eq!(
            ErrorChain(&e).to_string(),
            "undecodable DNS message: no parseable question"
        );
    }
}
