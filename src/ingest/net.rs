//! Listening sockets and reader threads: mio event loops that own connections, parse Frame
//! Streams and route events. Reader 0 also accepts and deals connections out round-robin.
//! The limits they enforce (connections, handshake, idle, frame budget) are in `limits`.

use super::limits::{Refusal, Slots};
use super::tls::{TlsAcceptor, TlsFailure, TlsStream};
use super::{ReadBuffer, Router, Shared, StreamEnd, StreamIngest};
use crate::metrics::{Discard, Disconnect};
use crossbeam_channel::{Receiver, Sender};
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::HashMap;
use std::io::{self, Write};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a reader checks deadlines, publishes its idlest connection and the frame budget.
const SWEEP: Duration = Duration::from_millis(100);
/// A sender silent this long inside a frame was cut off mid-write. CoreDNS flushes its 4 KB
/// buffer (which may end inside a frame) at least once a second, so a healthy stream never
/// holds a partial frame this long; one that gave up a stalled connection without closing it
/// does, and what it had buffered is lost. Shorter than the correlator's idle lag, so the
/// evidence is there before a silent stream stops holding its sessions (`pipeline` checks).
pub const CUT_OFF_AFTER: Duration = Duration::from_secs(3);
/// Bytes read from one connection per wake-up before others get their turn.
const READ_BUDGET: usize = 4 << 20;
const READ_CHUNK: usize = 256 << 10;
const WAKER: Token = Token(usize::MAX);
const FIRST_CONN: usize = 1 << 20;

/// Where to listen: `tcp://host:port`, `tls://host:port` or `unix:///path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(std::net::SocketAddr),
    /// Frame Streams inside TLS, with the certificate of `--tls-cert`.
    Tls(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err("unix:// needs a path, e.g. unix:///run/dnstap.sock".into());
            }
            return Ok(Self::Unix(path.into()));
        }
        let (addr, tls) = match s.strip_prefix("tls://") {
            Some(a) => (a, true),
            None => (s.strip_prefix("tcp://").unwrap_or(s), false),
        };
        use std::net::ToSocketAddrs;
        let addr = addr
            .to_socket_addrs()
            .map_err(|e| {
                format!("{s:?} is not tcp://HOST:PORT, tls://HOST:PORT or unix:///PATH ({e})")
            })?
            .next()
            .ok_or_else(|| format!("{s:?} resolves to no address"))?;
        Ok(if tls {
            Self::Tls(addr)
        } else {
            Self::Tcp(addr)
        })
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp://{a}"),
            Self::Tls(a) => write!(f, "tls://{a}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

pub enum Listener {
    Tcp(TcpListener),
    Tls(TcpListener, Box<TlsAcceptor>),
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    /// A plaintext listener; `tls://` needs its certificates: see `bind_tls`.
    pub fn bind(addr: &ListenAddr) -> io::Result<Self> {
        Ok(match addr {
            ListenAddr::Tcp(a) => Self::Tcp(TcpListener::bind(*a)?),
            ListenAddr::Tls(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "tls:// needs --tls-cert and --tls-key",
                ))
            }
            ListenAddr::Unix(p) => {
                clear_stale_socket(p)?;
                Self::Unix(UnixListener::bind(p)?, p.clone())
            }
        })
    }

    /// A TLS listener on `addr` whose handshakes use `acceptor`'s certificates.
    pub fn bind_tls(addr: std::net::SocketAddr, acceptor: TlsAcceptor) -> io::Result<Self> {
        Ok(Self::Tls(TcpListener::bind(addr)?, Box::new(acceptor)))
    }

    /// The address it is bound to: with port 0 the kernel picked one, and operators (and
    /// tests) need to know which.
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        Ok(match self {
            Self::Tcp(l) => ListenAddr::Tcp(l.local_addr()?),
            Self::Tls(l, _) => ListenAddr::Tls(l.local_addr()?),
            Self::Unix(_, path) => ListenAddr::Unix(path.clone()),
        })
    }

    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Self::Tcp(l) | Self::Tls(l, _) => l,
            Self::Unix(l, _) => l,
        }
    }

    fn accept(&mut self) -> io::Result<(Stream, Peer)> {
        match self {
            Self::Tcp(l) => {
                let (s, peer) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), Peer::new(peer.to_string(), Some(peer.ip()))))
            }
            Self::Tls(l, acceptor) => {
                let (s, peer) = l.accept()?;
                let _ = s.set_nodelay(true);
                let tls = acceptor.accept(s)?;
                let name = format!("tls:{peer}");
                Ok((Stream::Tls(Box::new(tls)), Peer::new(name, Some(peer.ip()))))
            }
            Self::Unix(l, path) => {
                let (s, _) = l.accept()?;
                let name = format!("unix:{}", path.display());
                Ok((Stream::Unix(s), Peer::new(name, None)))
            }
        }
    }
}

/// Who is at the other end of a connection: its name in log lines, and its address (none on
/// a unix socket), which with the identity makes a sender and which the limits count by.
#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    pub ip: Option<IpAddr>,
}

impl Peer {
    pub fn new(name: String, ip: Option<IpAddr>) -> Self {
        // An IPv4 client of a dual-stack listener is the same peer as over IPv4.
        let ip = ip.map(|ip| ip.to_canonical());
        Self { name, ip }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Makes way for a unix listener: a socket file left by a previous run (nobody accepts on it)
/// is removed. Anything else at the path, a regular file, a directory, a symlink or a socket
/// some process still listens on, is not ours to delete: refuse it, naming the path.
fn clear_stale_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot inspect {shown}: {e}"),
            ))
        }
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{shown} exists and is not a socket; refusing to replace it"),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{shown} is a live socket: another process accepts on it"),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("cannot remove stale socket {shown}: {e}"))
            }),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("{shown} is a socket that cannot be probed ({e}); refusing to replace it"),
        )),
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
    Unix(UnixStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Self::Tcp(s) => s,
            Self::Tls(s) => s.socket(),
            Self::Unix(s) => s,
        }
    }

    /// Appends what arrived to `buf`, decrypted if TLS (the ciphertext through `scratch`);
    /// `Ok(0)` at the end of the stream.
    fn read_into(
        &mut self,
        scratch: &mut [u8],
        buf: &mut ReadBuffer,
        metrics: &crate::metrics::Metrics,
    ) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => buf.read_from(s),
            Self::Tls(s) => s.read_into(scratch, buf, metrics),
            Self::Unix(s) => buf.read_from(s),
        }
    }

    /// A `tls://` stream's client certificate, once its handshake is done.
    fn client_certificate(&self) -> Option<Option<rustls::pki_types::CertificateDer<'static>>> {
        match self {
            Self::Tls(s) if !s.is_handshaking() => Some(s.client_certificate()),
            _ => None,
        }
    }

    fn is_tls_handshaking(&self) -> bool {
        matches!(self, Self::Tls(s) if s.is_handshaking())
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }
    /// TLS records already made (handshake, encrypted replies) that wait for the socket.
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tls(s) => s.flush(),
            _ => Ok(()),
        }
    }
}

struct Conn {
    stream: Stream,
    peer: Peer,
    ingest: StreamIngest,
    buf: ReadBuffer,
    /// Bytes of `buf` last added to the shared partial-frame total.
    partial: usize,
    /// Replies (ACCEPT, FINISH) not yet written.
    out: Vec<u8>,
    opened: Instant,
    /// When bytes last arrived.
    last_active: Instant,
    /// Silent inside a frame for `CUT_OFF_AFTER` since bytes last arrived (said once).
    cut_off: bool,
    /// Past its handshake: it holds an established slot, no longer a handshaking one.
    established: bool,
}

impl Conn {
    /// Past the handshake and not stopped: the idle timeout applies, the handshake one not.
    fn is_streaming(&self) -> bool {
        self.ingest.is_established() && !self.ingest.is_stopped()
    }
}

/// Why the reader closes a connection; each maps to one `Disconnect` counter.
enum Ending {
    Stopped,
    PeerClosed,
    Broken(super::StreamError),
    HandshakeTimeout,
    IdleTimeout,
    FrameBudget,
    Shutdown,
    Tls(TlsFailure),
}

impl Ending {
    fn counter(&self) -> Disconnect {
        match self {
            Self::Stopped => Disconnect::Stopped,
            Self::PeerClosed => Disconnect::PeerClosed,
            Self::Broken(_) => Disconnect::BadStream,
            Self::HandshakeTimeout => Disconnect::HandshakeTimeout,
            Self::IdleTimeout => Disconnect::IdleTimeout,
            Self::FrameBudget => Disconnect::FrameBudget,
            Self::Shutdown => Disconnect::Shutdown,
            Self::Tls(e) => e.counter(),
        }
    }
}

/// What other readers send a reader.
enum Mail {
    /// A connection the acceptor dealt to it.
    Conn(Stream, Peer),
    /// The acceptor is at --max-connections and picked this reader's longest-idle connection.
    MakeRoom,
}

/// A reader thread's inbox.
pub struct ReaderHandle {
    mail: Sender<Mail>,
    waker: Arc<Waker>,
}

impl ReaderHandle {
    fn send(&self, mail: Mail) -> Result<(), Mail> {
        self.mail.send(mail).map_err(|e| e.0)?;
        let _ = self.waker.wake();
        Ok(())
    }
}

pub struct Reader {
    poll: Poll,
    listeners: Vec<Listener>,
    inbox: Receiver<Mail>,
    /// Other readers (for reader 0, which deals out accepted connections): reader i+1 at i.
    peers: Vec<ReaderHandle>,
    /// This reader's index in `slots`; 0 is the acceptor.
    index: usize,
    next_peer: usize,
    conns: HashMap<Token, Conn>,
    next_token: usize,
    shared: Shared,
    router: Router,
    shutdown: Arc<AtomicBool>,
    slots: Arc<Slots>,
    /// The time of the current poll wake-up: one clock read per wake-up, not per read.
    now: Instant,
    last_sweep: Instant,
    /// TLS ciphertext on its way to rustls (plaintext streams read into their own buffer).
    scratch: Box<[u8]>,
    /// Live metrics and heartbeat, once `instrument`ed (the pipeline does; unit tests don't).
    live: Option<Live>,
}

/// A reader's share of the live metrics: its own stats (published every sweep) and the
/// heartbeat `/healthz` watches.
struct Live {
    stats: crate::metrics::model::ThreadStats,
    heartbeat: Arc<crate::metrics::health::Heartbeat>,
}

impl Reader {
    /// A reader and the handle other readers use to give it connections. The first reader
    /// created on `slots` is the one to call `accept_on`.
    pub fn new(
        shared: Shared,
        router: Router,
        shutdown: Arc<AtomicBool>,
        slots: Arc<Slots>,
    ) -> io::Result<(Self, ReaderHandle)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let now = Instant::now();
        let reader = Self {
            poll,
            listeners: Vec::new(),
            inbox: rx,
            peers: Vec::new(),
            index: slots.join(),
            next_peer: 0,
            conns: HashMap::new(),
            next_token: FIRST_CONN,
            shared,
            router,
            shutdown,
            slots,
            now,
            last_sweep: now,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            live: None,
        };
        Ok((reader, ReaderHandle { mail: tx, waker }))
    }

    /// Counts messages per identity into `stats` and beats `heartbeat` on every wake-up.
    pub fn instrument(
        &mut self,
        stats: crate::metrics::model::ThreadStats,
        heartbeat: Arc<crate::metrics::health::Heartbeat>,
    ) {
        self.live = Some(Live { stats, heartbeat });
    }

    /// Makes this reader the acceptor: it owns the listeners and deals to `peers` too.
    pub fn accept_on(
        &mut self,
        listeners: Vec<Listener>,
        peers: Vec<ReaderHandle>,
    ) -> io::Result<()> {
        self.listeners = listeners;
        for (i, l) in self.listeners.iter_mut().enumerate() {
            self.poll
                .registry()
                .register(l.source(), Token(i), Interest::READABLE)?;
        }
        self.peers = peers;
        Ok(())
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            if self.shutdown.load(Relaxed) {
                self.close_all();
                return;
            }
            if let Err(e) = self.poll.poll(&mut events, Some(SWEEP)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.shared.metrics.warn(format_args!("poll failed: {e}"));
                }
                continue;
            }
            self.now = Instant::now();
            if let Some(l) = &self.live {
                l.heartbeat.beat(self.now, true);
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKER => self.take_inbox(),
                    Token(i) if i < self.listeners.len() => self.accept(i),
                    token => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.on_readable(token);
                        }
                        if ev.is_writable() {
                            self.on_writable(token);
                        }
                    }
                }
            }
            // Everything ready has been read: send the partial batches now.
            self.router.flush();
            if self.now.duration_since(self.last_sweep) >= SWEEP {
                self.last_sweep = self.now;
                self.sweep();
                if let Some(l) = &mut self.live {
                    l.stats.publish();
                }
            }
            if let Some(l) = &self.live {
                l.heartbeat.beat(self.now, false);
            }
        }
    }

    fn take_inbox(&mut self) {
        while let Ok(mail) = self.inbox.try_recv() {
            match mail {
                Mail::Conn(stream, peer) => self.adopt(stream, peer),
                Mail::MakeRoom => {
                    self.close_idlest();
                }
            }
        }
    }

    fn accept(&mut self, i: usize) {
        loop {
            let (stream, peer) = match self.listeners[i].accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.shared.metrics.warn(format_args!("accept failed: {e}"));
                    return;
                }
            };
            let slots = self.slots.clone();
            if let Err(why) = slots.admit(peer.ip, self.now, || self.make_room()) {
                self.refused(&peer, why);
                continue;
            }
            self.shared
                .metrics
                .connections_accepted
                .fetch_add(1, Relaxed);
            let ip = peer.ip;
            let n = self.peers.len() + 1;
            let pick = self.next_peer % n;
            self.next_peer = self.next_peer.wrapping_add(1);
            if pick == 0 {
                self.adopt(stream, peer);
            } else if let Err(ip) = self.peers[pick - 1]
                .send(Mail::Conn(stream, peer))
                .map_err(|_| ip)
            {
                // That reader has already stopped: the process is shutting down.
                self.slots.closed(ip, false, self.now);
                self.shared.metrics.disconnected(Disconnect::Shutdown);
            }
        }
    }

    /// Counts and logs a connection refused by the limits.
    fn refused(&self, peer: &Peer, why: Refusal) {
        let l = &self.slots.limits;
        let metrics = &self.shared.metrics;
        metrics.discard(Discard::ConnectionLimit, 1);
        match why {
            Refusal::Connections => metrics.warn(format_args!(
                "{peer}: refused, already {} connections and none idle for {}s \
                 (--max-connections, --idle-timeout)",
                l.max_connections,
                l.idle_timeout.as_secs()
            )),
            Refusal::Handshaking => metrics.warn(format_args!(
                "{peer}: refused, already {} connections in their handshake \
                 (--max-handshaking)",
                l.max_handshaking
            )),
            Refusal::AddressHandshakes => metrics.warn(format_args!(
                "{peer}: refused, its address already has {} connections in their handshake \
                 (--handshakes-per-address)",
                l.handshakes_per_address
            )),
            Refusal::AddressConnections => metrics.warn(format_args!(
                "{peer}: refused, its address already has {} connections \
                 (--connections-per-address)",
                l.connections_per_address
            )),
        }
    }

    /// At --max-connections: closes the connection idle the longest, if it has been idle for
    /// --idle-timeout, so that a new sender gets its slot. A quiet CoreDNS sends nothing at all
    /// (Frame Streams has no keepalive) and loses the batch it writes into a closed
    /// connection, so idle connections are only closed when a slot is needed.
    fn make_room(&mut self) -> bool {
        let Some(reader) = self.slots.claim_idlest(self.now) else {
            return false;
        };
        if reader == self.index {
            return self.close_idlest();
        }
        // Another reader's: it closes it when it reads its mail. Until then the count is over
        // the limit by one.
        self.peers
            .get(reader.wrapping_sub(1))
            .is_some_and(|p| p.send(Mail::MakeRoom).is_ok())
    }

    /// Closes this reader's longest-idle established connection if it has been idle for
    /// --idle-timeout; false if there is none.
    fn close_idlest(&mut self) -> bool {
        let Some((token, since)) = self
            .conns
            .iter()
            .filter(|(_, c)| c.is_streaming())
            .map(|(t, c)| (*t, c.last_active))
            .min_by_key(|(_, since)| *since)
        else {
            return false;
        };
        let idle = Instant::now().saturating_duration_since(since);
        if idle < self.slots.limits.idle_timeout {
            return false;
        }
        self.close(token, Ending::IdleTimeout);
        true
    }

    fn adopt(&mut self, mut stream: Stream, peer: Peer) {
        let token = Token(self.next_token);
        self.next_token += 1;
        if let Err(e) = self
            .poll
            .registry()
            .register(stream.source(), token, Interest::READABLE)
        {
            self.shared
                .metrics
                .warn(format_args!("{peer}: cannot register: {e}"));
            self.slots.closed(peer.ip, false, self.now);
            self.shared.metrics.disconnected(Disconnect::ServerError);
            return;
        }
        let mut ingest = StreamIngest::new(self.shared.clone(), peer.name.clone(), peer.ip);
        if matches!(stream, Stream::Tls(_)) {
            ingest.pin_identities();
        }
        self.conns.insert(
            token,
            Conn {
                stream,
                peer,
                ingest,
                buf: ReadBuffer::new(64 << 10),
                partial: 0,
                out: Vec::new(),
                opened: self.now,
                last_active: self.now,
                cut_off: false,
                established: false,
            },
        );
        // Data may have arrived before registration.
        self.on_readable(token);
    }

    fn on_readable(&mut self, token: Token) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let mut budget = READ_BUDGET;
        let end = loop {
            let metrics = &self.shared.metrics;
            let n = match conn
                .stream
                .read_into(&mut self.scratch, &mut conn.buf, metrics)
            {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                // CoreDNS resets right after FINISH; before STOP it is a lost stream.
                Err(e) => break Some(TlsFailure::take(e).map_or(Ending::PeerClosed, Ending::Tls)),
            };
            if n == 0 {
                break Some(Ending::PeerClosed);
            }
            conn.last_active = self.now;
            conn.cut_off = false;
            if conn.ingest.wants_certificate() {
                if let Some(certificate) = conn.stream.client_certificate() {
                    conn.ingest.pin_to(certificate);
                }
            }
            match conn
                .ingest
                .feed(&mut conn.buf, &mut self.router, &mut conn.out)
            {
                Ok(true) => break Some(Ending::Stopped),
                Ok(false) => {}
                Err(e) => break Some(Ending::Broken(e)),
            }
            budget = budget.saturating_sub(n);
            if budget == 0 {
                // Let other connections run; mio is edge-triggered, so come back at once.
                let _ = self.poll.registry().reregister(
                    conn.stream.source(),
                    token,
                    Interest::READABLE | Interest::WRITABLE,
                );
                break None;
            }
        };
        if let Some(l) = &mut self.live {
            conn.ingest.take_source_counts(|c| c.record(&mut l.stats));
        }
        if !conn.established && conn.ingest.is_established() {
            conn.established = true;
            self.slots.established_from(conn.peer.ip, self.now);
        }
        // One shared update per wake-up of a connection, not per frame.
        let partial = conn.buf.len();
        let mut total = None;
        if partial != conn.partial {
            total = Some(self.slots.partial_changed(conn.partial, partial));
            conn.partial = partial;
        }
        self.write_replies(token);
        if let Some(end) = end {
            self.close(token, end);
        }
        if total.is_some_and(|t| self.slots.over_budget(t)) {
            self.shed_partial_frames();
        }
    }

    /// Over --frame-buffer-budget: closes this reader's connections holding the largest partial
    /// frames until the total fits, but none holding no more than an equal share of the budget.
    fn shed_partial_frames(&mut self) {
        let share = self.slots.fair_share();
        while self.slots.over_budget(self.slots.partial_bytes()) {
            let Some((token, held)) = self
                .conns
                .iter()
                .map(|(t, c)| (*t, c.partial))
                .max_by_key(|(_, held)| *held)
            else {
                return;
            };
            if held <= share {
                return;
            }
            self.close(token, Ending::FrameBudget);
        }
    }

    /// Writable: replies can go out, or a connection that used up its read budget resumes.
    fn on_writable(&mut self, token: Token) {
        self.write_replies(token);
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if conn.out.is_empty() {
            let _ =
                self.poll
                    .registry()
                    .reregister(conn.stream.source(), token, Interest::READABLE);
            self.on_readable(token);
        }
    }

    fn write_replies(&mut self, token: Token) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        loop {
            let written = if conn.out.is_empty() {
                conn.stream.flush().map(|()| None)
            } else {
                conn.stream.write(&conn.out).map(Some)
            };
            match written {
                Ok(None) => return,
                Ok(Some(n)) => {
                    conn.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let _ = self.poll.registry().reregister(
                        conn.stream.source(),
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    );
                    return;
                }
                Err(_) => {
                    // The peer went away (unbound on unix closes before reading FINISH).
                    conn.out.clear();
                    return;
                }
            }
        }
    }

    /// Closes a connection and counts it once, under `why`. Bytes of a partial frame are
    /// counted as a truncated frame only where no other counter already covers them.
    fn close(&mut self, token: Token, why: Ending) {
        let Some(mut conn) = self.conns.remove(&token) else {
            return;
        };
        let _ = self.poll.registry().deregister(conn.stream.source());
        self.slots.partial_changed(conn.partial, 0);
        let held = conn.buf.len();
        let metrics = self.shared.metrics.clone();
        let peer = &conn.peer;
        let limits = &self.slots.limits;
        match &why {
            Ending::Stopped => conn
                .ingest
                .finish(StreamEnd::Stopped, held, &mut self.router),
            Ending::PeerClosed | Ending::Shutdown => {
                conn.ingest
                    .finish(StreamEnd::Closed, held, &mut self.router);
                if held > 0 {
                    metrics.warn(format_args!(
                        "{peer}: connection ended inside a frame ({held} bytes), without STOP"
                    ));
                }
            }
            Ending::Broken(e) => {
                conn.ingest.finish(StreamEnd::Closed, 0, &mut self.router);
                metrics.discard(e.drop_reason(), 1);
                metrics.warn(format_args!("{peer}: {e}; connection closed"));
            }
            Ending::HandshakeTimeout => {
                // The handshake bytes it sent are what handshake_timeout counts.
                conn.ingest.finish(StreamEnd::Closed, 0, &mut self.router);
                metrics.discard(Discard::HandshakeTimeout, 1);
                let layer = match conn.stream.is_tls_handshaking() {
                    true => "TLS",
                    false => "Frame Streams",
                };
                metrics.warn(format_args!(
                    "{peer}: no {layer} handshake within {}s (--handshake-timeout); \
                     connection closed",
                    limits.handshake_timeout.as_secs_f64()
                ));
            }
            Ending::Tls(e) => {
                // A partial frame is lost with the stream; the TLS counter says why.
                conn.ingest
                    .finish(StreamEnd::Closed, held, &mut self.router);
                let why = crate::metrics::ErrorChain(e);
                metrics.warn(format_args!("{peer}: {why}; connection closed"));
            }
            Ending::IdleTimeout => {
                // Everything it sent was read: nothing is lost unless a frame was half done.
                conn.ingest.finish(StreamEnd::Idle, held, &mut self.router);
                metrics.warn(format_args!(
                    "{peer}: idle for over {}s while at {} connections; closed to make room \
                     (--idle-timeout, --max-connections)",
                    limits.idle_timeout.as_secs(),
                    limits.max_connections
                ));
            }
            Ending::FrameBudget => {
                conn.ingest.finish(StreamEnd::Closed, 0, &mut self.router);
                metrics.discard(Discard::FrameBudget, 1);
                metrics.warn(format_args!(
                    "{peer}: holds the largest partial frame ({held} bytes) while partial frames \
                     exceed {} bytes; connection closed (--frame-buffer-budget)",
                    limits.frame_buffer_budget
                ));
            }
        }
        self.slots.closed(conn.peer.ip, conn.established, self.now);
        metrics.disconnected(why.counter());
    }

    /// Housekeeping every `SWEEP`: handshake deadlines, this reader's longest-idle connection
    /// for the acceptor, and the frame budget (another reader may have pushed it over).
    fn sweep(&mut self) {
        let deadline = self.slots.limits.handshake_timeout;
        let late: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                !c.ingest.is_established() && self.now.duration_since(c.opened) > deadline
            })
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            self.close(token, Ending::HandshakeTimeout);
        }
        self.notice_cut_off_senders();
        let idlest = self
            .conns
            .values()
            .filter(|c| c.is_streaming())
            .map(|c| c.last_active)
            .min();
        self.slots.publish_idlest(self.index, idlest);
        if self.slots.over_budget(self.slots.partial_bytes()) {
            self.shed_partial_frames();
        }
    }

    /// A stream silent inside a frame is evidence of loss on its identities now, not when
    /// its sender finally closes it (CoreDNS keeps a connection it gave up open until it
    /// exits): the sessions open on them must not be taken for unanswered meanwhile.
    fn notice_cut_off_senders(&mut self) {
        for conn in self.conns.values_mut() {
            let silent = self.now.saturating_duration_since(conn.last_active);
            if conn.cut_off || conn.buf.is_empty() || !conn.is_streaming() || silent < CUT_OFF_AFTER
            {
                continue;
            }
            conn.cut_off = true;
            conn.ingest.loss_evident();
            self.shared.metrics.warn(format_args!(
                "{}: silent for {}s inside a frame ({} bytes held): the sender was cut off \
                 mid-write; sessions open on its identities may be incomplete",
                conn.peer,
                silent.as_secs(),
                conn.buf.len()
            ));
        }
    }

    /// Shutdown: read what the kernel already holds, then close every connection. That
    /// includes the connections still in the listen queue: the kernel completed them and may
    /// hold their frames, and closing the listener would reset them uncounted.
    fn close_all(&mut self) {
        for i in 0..self.listeners.len() {
            self.accept(i);
        }
        self.listeners.clear();
        // Connections dealt to this reader but not adopted yet are served too.
        self.take_inbox();
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for token in tokens {
            self.on_readable(token);
            self.close(token, Ending::Shutdown);
        }
        self.slots.publish_idlest(self.index, None);
        self.router.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framestream::{encode_control, encode_data, ControlKind, DNSTAP_CONTENT_TYPE};
    use crate::ingest::limits::ConnectionLimits;
    use crate::ingest::{QueueDepths, ShardInput};
    use crate::metrics::Metrics;
    use std::io::Read;
    use std::net::{Shutdown, SocketAddr, TcpStream as Client};
    use std::sync::atomic::AtomicU64;
    use std::thread::JoinHandle;

    /// Readers on a loopback port, their events going into a queue nobody needs to read.
    struct Analyser {
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        shared: Shared,
        slots: Arc<Slots>,
        shutdown: Arc<AtomicBool>,
        threads: Vec<JoinHandle<()>>,
        _events: Receiver<ShardInput>,
    }

    impl Analyser {
        fn start(limits: ConnectionLimits, readers: usize) -> Self {
            let (mut a, readers) = Self::built(limits, readers);
            a.run(readers);
            a
        }

        /// Listening, but its readers not running yet: connections wait in the listen queue.
        fn built(limits: ConnectionLimits, readers: usize) -> (Self, Vec<Reader>) {
            let shared = Shared::for_tests(Default::default());
            let metrics = shared.metrics.clone();
            let listener = Listener::bind(&"tcp://127.0.0.1:0".parse().unwrap()).unwrap();
            let Listener::Tcp(l) = &listener else {
                unreachable!()
            };
            let addr = l.local_addr().unwrap();
            assert_eq!(listener.local_addr().unwrap(), ListenAddr::Tcp(addr));
            assert_ne!(addr.port(), 0, "port 0 is resolved to the bound port");
            let (tx, rx) = crossbeam_channel::unbounded();
            let depths: QueueDepths = Arc::new([AtomicU64::new(0)]);
            let slots = Arc::new(Slots::new(limits, readers));
            let shutdown = Arc::new(AtomicBool::new(false));
            let (mut all, mut handles) = (Vec::new(), Vec::new());
            for _ in 0..readers {
                let router = Router::new(vec![tx.clone()], depths.clone(), 1 << 30, false, {
                    metrics.clone()
                });
                let (r, h) =
                    Reader::new(shared.clone(), router, shutdown.clone(), slots.clone()).unwrap();
                all.push(r);
                handles.push(h);
            }
            handles.remove(0);
            all[0].accept_on(vec![listener], handles).unwrap();
            let a = Self {
                addr,
                metrics,
                shared,
                slots,
                shutdown,
                threads: Vec::new(),
                _events: rx,
            };
            (a, all)
        }

        fn run(&mut self, readers: Vec<Reader>) {
            self.threads = readers
                .into_iter()
                .map(|r| std::thread::spawn(move || r.run()))
                .collect();
        }

        /// Waits until `n` connections are past their handshake (the analyser read START).
        fn wait_established(&self, n: usize) {
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.slots.established() < n {
                assert!(
                    Instant::now() < deadline,
                    "{n} connections never established"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        fn connect(&self) -> Client {
            let c = Client::connect(self.addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c
        }

        /// A sender that got through the bidirectional handshake, or None if it was refused.
        fn sender(&self) -> Option<Client> {
            let mut c = self.connect();
            let mut ready = Vec::new();
            encode_control(ControlKind::Ready, &[DNSTAP_CONTENT_TYPE], &mut ready);
            c.write_all(&ready).ok()?;
            let mut accept = Vec::new();
            encode_control(ControlKind::Accept, &[DNSTAP_CONTENT_TYPE], &mut accept);
            let mut got = vec![0; accept.len()];
            c.read_exact(&mut got).ok()?;
            assert_eq!(got, accept);
            let mut start = Vec::new();
            encode_control(ControlKind::Start, &[DNSTAP_CONTENT_TYPE], &mut start);
            c.write_all(&start).ok()?;
            Some(c)
        }

        /// Retries until a sender gets in (a refused one may get a slot a moment later); the
        /// test fails if none does within a minute.
        fn sender_eventually(&self) -> Client {
            for _ in 0..600 {
                if let Some(c) = self.sender() {
                    return c;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            panic!("no connection slot became free");
        }

        fn stop(self) -> Arc<Metrics> {
            self.shutdown.store(true, Relaxed);
            for t in self.threads {
                t.join().unwrap();
            }
            self.metrics
        }
    }

    /// Sends STOP; true if FINISH comes back, i.e. the analyser still served the connection.
    fn served_to_the_end(c: &mut Client) -> bool {
        let mut stop = Vec::new();
        encode_control(ControlKind::Stop, &[], &mut stop);
        if c.write_all(&stop).is_err() {
            return false;
        }
        let mut finish = Vec::new();
        encode_control(ControlKind::Finish, &[], &mut finish);
        let mut got = vec![0; finish.len()];
        c.read_exact(&mut got).is_ok() && got == finish
    }

    /// Waits for the analyser to close `c` (EOF or reset); false if it is still open after 10 s.
    fn closed_by_analyser(c: &mut Client) -> bool {
        let mut byte = [0];
        match c.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        }
    }

    fn limits(max_connections: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            ..Default::default()
        }
    }

    /// CoreDNS keeps a connection it gave up on open, cut inside a frame: after
    /// `CUT_OFF_AFTER` of silence that is evidence of loss on its identity, once.
    #[test]
    fn a_sender_silent_inside_a_frame_shows_loss_on_its_identity() {
        use crate::dnstap::MessageType;
        let a = Analyser::start(limits(4), 1);
        let mut c = a.sender().unwrap();
        let query = super::super::tests::frame(b"pod", MessageType::CLIENT_QUERY, 1, 1_750_000_000);
        c.write_all(&query).unwrap();
        c.write_all(&query[..query.len() / 2]).unwrap();
        let (board, sources) = (&a.shared.board, &a.shared.sources);
        let pod = || sources.lookup(Some([127, 0, 0, 1].into()), b"pod");
        let deadline = Instant::now() + Duration::from_secs(20);
        while pod().is_none_or(|s| board.get(s) == 0) {
            assert!(Instant::now() < deadline, "no loss evident after 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(CUT_OFF_AFTER + Duration::from_millis(500));
        assert_eq!(board.get(pod().unwrap()), 1, "said once per stall");
        a.stop();
    }

    #[test]
    fn at_the_limit_the_longest_idle_connection_makes_room() {
        let a = Analyser::start(
            ConnectionLimits {
                idle_timeout: Duration::from_millis(50),
                ..limits(2)
            },
            1,
        );
        let mut first = a.sender().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut second = a.sender().unwrap();
        a.wait_established(2);
        let mut third = a.sender_eventually();
        assert!(closed_by_analyser(&mut first), "the idlest one goes");
        assert!(served_to_the_end(&mut second));
        assert!(served_to_the_end(&mut third));
        let m = a.stop();
        assert_eq!(m.disconnects(Disconnect::IdleTimeout), 1);
        assert_eq!(m.disconnects(Disconnect::Stopped), 2);
        assert_eq!(m.connections_accepted.load(Relaxed), 3);
    }

    #[test]
    fn an_active_connection_keeps_its_slot_and_another_reader_makes_room() {
        let a = Analyser::start(
            ConnectionLimits {
                idle_timeout: Duration::from_millis(300),
                ..limits(2)
            },
            2,
        );
        // Dealt round-robin: the first to reader 0 (the acceptor), the second to reader 1.
        let mut active = a.sender().unwrap();
        let mut idle = a.sender().unwrap();
        a.wait_established(2);
        let keep_going = Arc::new(AtomicBool::new(true));
        let keeper = {
            let mut w = active.try_clone().unwrap();
            let keep_going = keep_going.clone();
            std::thread::spawn(move || {
                let mut frame = Vec::new();
                encode_data(b"not dnstap", &mut frame);
                while keep_going.load(Relaxed) {
                    w.write_all(&frame).unwrap();
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        let mut third = a.sender_eventually();
        keep_going.store(false, Relaxed);
        keeper.join().unwrap();
        assert!(closed_by_analyser(&mut idle));
        assert!(served_to_the_end(&mut active));
        assert!(served_to_the_end(&mut third));
        let m = a.stop();
        assert_eq!(m.disconnects(Disconnect::IdleTimeout), 1);
    }

    #[test]
    fn partial_frames_over_the_budget_close_the_largest_holder() {
        let a = Analyser::start(
            ConnectionLimits {
                frame_buffer_budget: 4096,
                ..limits(4)
            },
            1,
        );
        // Equal share: 1024 bytes. Partial frames of 3004, 1504 and 54 bytes: 4562 in all.
        let partial = |len: u32, sent: usize| {
            let mut b = len.to_be_bytes().to_vec();
            b.resize(4 + sent, b'x');
            b
        };
        let mut big = a.sender().unwrap();
        let mut mid = a.sender().unwrap();
        let mut small = a.sender().unwrap();
        small.write_all(&partial(100, 50)).unwrap();
        big.write_all(&partial(100_000, 3000)).unwrap();
        mid.write_all(&partial(2000, 1500)).unwrap();
        assert!(closed_by_analyser(&mut big));
        // The others are whole once their frames complete.
        mid.write_all(&[b'x'; 500]).unwrap();
        small.write_all(&[b'x'; 50]).unwrap();
        assert!(served_to_the_end(&mut mid));
        assert!(served_to_the_end(&mut small));
        let m = a.stop();
        assert_eq!(m.disconnects(Disconnect::FrameBudget), 1);
        assert_eq!(m.discarded(Discard::FrameBudget), 1);
        assert_eq!(m.discarded(Discard::TruncatedFrame), 0);
    }

    #[test]
    fn a_handshake_timeout_is_counted_once() {
        let a = Analyser::start(
            ConnectionLimits {
                handshake_timeout: Duration::from_millis(100),
                ..limits(4)
            },
            1,
        );
        let mut c = a.connect();
        // Half a READY frame, then nothing.
        c.write_all(&[0, 0, 0, 0, 0, 0]).unwrap();
        assert!(closed_by_analyser(&mut c));
        let m = a.stop();
        assert_eq!(m.discarded(Discard::HandshakeTimeout), 1);
        assert_eq!(m.discarded(Discard::TruncatedFrame), 0);
        assert_eq!(m.disconnects(Disconnect::HandshakeTimeout), 1);
        assert_eq!(m.connections_closed.load(Relaxed), 1);
    }

    #[test]
    fn every_connection_is_counted_under_one_reason() {
        let a = Analyser::start(limits(3), 1);
        let mut stopped = a.sender().unwrap();
        assert!(served_to_the_end(&mut stopped));
        let gone = a.sender().unwrap();
        gone.shutdown(Shutdown::Both).unwrap();
        let mut broken = a.connect();
        let mut data_first = Vec::new();
        encode_data(b"data before the handshake", &mut data_first);
        broken.write_all(&data_first).unwrap();
        assert!(closed_by_analyser(&mut broken));
        // Its slot must be free before the limit is tested.
        for _ in 0..600 {
            if a.metrics.disconnects(Disconnect::PeerClosed) == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let open: Vec<Client> = (0..3).map(|_| a.sender().unwrap()).collect();
        a.wait_established(3);
        assert!(a.sender().is_none(), "over --max-connections");
        let m = a.stop();
        drop(open);
        assert_eq!(m.disconnects(Disconnect::Stopped), 1);
        assert_eq!(m.disconnects(Disconnect::PeerClosed), 1);
        assert_eq!(m.disconnects(Disconnect::BadStream), 1);
        assert_eq!(m.discarded(Discard::BadStream), 1);
        assert_eq!(m.disconnects(Disconnect::Shutdown), 3);
        assert_eq!(m.discarded(Discard::ConnectionLimit), 1);
        let closed: u64 = Disconnect::ALL.iter().map(|d| m.disconnects(*d)).sum();
        assert_eq!(m.connections_accepted.load(Relaxed), 6);
        assert_eq!(m.connections_closed.load(Relaxed), closed);
        assert_eq!(closed, 6);
    }

    /// SIGTERM while a sender's connection is still in the listen queue (the kernel completed
    /// it, no reader accepted it yet): it is accepted, served what it sent and counted, not
    /// reset when the listener closes.
    #[test]
    fn shutdown_serves_the_connections_still_in_the_listen_queue() {
        let (mut a, readers) = Analyser::built(limits(3), 1);
        let mut queued = a.connect();
        let mut ready = Vec::new();
        encode_control(ControlKind::Ready, &[DNSTAP_CONTENT_TYPE], &mut ready);
        queued.write_all(&ready).unwrap();
        a.shutdown.store(true, Relaxed);
        a.run(readers);
        let mut accept = Vec::new();
        encode_control(ControlKind::Accept, &[DNSTAP_CONTENT_TYPE], &mut accept);
        let mut got = vec![0; accept.len()];
        queued.read_exact(&mut got).unwrap();
        assert_eq!(got, accept, "its READY was answered");
        let m = a.stop();
        assert_eq!(m.connections_accepted.load(Relaxed), 1);
        assert_eq!(m.disconnects(Disconnect::Shutdown), 1);
        assert_eq!(m.connections_closed.load(Relaxed), 1);
    }

    fn scratch_path(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!(
            "dnstap-analyser-{}-{name}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_dir(&p);
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn a_regular_file_at_the_unix_path_is_left_alone() {
        let path = scratch_path("regular");
        std::fs::write(&path, "keep me").unwrap();
        let err = Listener::bind(&ListenAddr::Unix(path.clone()))
            .err()
            .expect("bind must refuse a regular file");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_directory_at_the_unix_path_is_left_alone() {
        let path = scratch_path("directory");
        std::fs::create_dir(&path).unwrap();
        let err = Listener::bind(&ListenAddr::Unix(path.clone())).err();
        assert!(err.is_some());
        assert!(path.is_dir());
        std::fs::remove_dir(&path).unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let path = scratch_path("stale");
        // std does not remove the file when the listener goes: a crashed run's leftover.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let listener = Listener::bind(&ListenAddr::Unix(path.clone())).unwrap();
        std::os::unix::net::UnixStream::connect(&path).expect("the new listener answers");
        drop(listener);
        assert!(!path.exists());
    }

    #[test]
    fn a_live_socket_is_not_taken_over() {
        let path = scratch_path("live");
        let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = Listener::bind(&ListenAddr::Unix(path.clone()))
            .err()
            .expect("bind must refuse a socket another process accepts on");
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        std::os::unix::net::UnixStream::connect(&path).expect("the other listener still answers");
        drop(other);
        std::fs::remove_file(&path).unwrap();
    }
}
