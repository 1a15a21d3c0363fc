//! Listening sockets and reader threads: mio event loops that own connections, parse Frame
//! Streams and route events. Reader 0 also accepts and deals connections out round-robin.

use super::{Router, Shared, StreamEnd, StreamIngest};
use crate::metrics::Discard;
use bytes::BytesMut;
use crossbeam_channel::{Receiver, Sender};
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A sender must finish READY/ACCEPT/START within this; established streams may idle forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read from one connection per wake-up before others get their turn.
const READ_BUDGET: usize = 4 << 20;
const READ_CHUNK: usize = 256 << 10;
const WAKER: Token = Token(usize::MAX);
const FIRST_CONN: usize = 1 << 20;

/// Where to listen: `tcp://host:port` or `unix:///path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(std::net::SocketAddr),
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
        let addr = s.strip_prefix("tcp://").unwrap_or(s);
        use std::net::ToSocketAddrs;
        addr.to_socket_addrs()
            .map_err(|e| format!("{s:?} is not tcp://HOST:PORT or unix:///PATH ({e})"))?
            .next()
            .map(Self::Tcp)
            .ok_or_else(|| format!("{s:?} resolves to no address"))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp://{a}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    pub fn bind(addr: &ListenAddr) -> io::Result<Self> {
        Ok(match addr {
            ListenAddr::Tcp(a) => Self::Tcp(TcpListener::bind(*a)?),
            ListenAddr::Unix(p) => {
                // A stale socket file from a previous run would make bind fail.
                if std::os::unix::net::UnixStream::connect(p).is_err() {
                    let _ = std::fs::remove_file(p);
                }
                Self::Unix(UnixListener::bind(p)?, p.clone())
            }
        })
    }

    fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Self::Tcp(l) => {
                let (s, peer) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), peer.to_string()))
            }
            Self::Unix(l, path) => {
                let (s, _) = l.accept()?;
                Ok((Stream::Unix(s), format!("unix:{}", path.display())))
            }
        }
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
    Unix(UnixStream),
}

impl Stream {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Self::Tcp(s) => s,
            Self::Unix(s) => s,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Conn {
    stream: Stream,
    peer: String,
    ingest: StreamIngest,
    buf: BytesMut,
    /// Replies (ACCEPT, FINISH) not yet written.
    out: Vec<u8>,
    opened: Instant,
}

/// A reader thread's inbox for connections accepted by reader 0.
pub struct ReaderHandle {
    conns: Sender<(Stream, String)>,
    waker: Arc<Waker>,
}

pub struct Reader {
    poll: Poll,
    listeners: Vec<Listener>,
    inbox: Receiver<(Stream, String)>,
    /// Other readers (for reader 0, which deals out accepted connections).
    peers: Vec<ReaderHandle>,
    next_peer: usize,
    conns: HashMap<Token, Conn>,
    next_token: usize,
    shared: Shared,
    router: Router,
    shutdown: Arc<AtomicBool>,
    open_connections: Arc<AtomicUsize>,
    max_connections: usize,
    scratch: Box<[u8]>,
}

impl Reader {
    /// A reader and the handle other readers use to give it connections.
    pub fn new(
        shared: Shared,
        router: Router,
        shutdown: Arc<AtomicBool>,
        open_connections: Arc<AtomicUsize>,
        max_connections: usize,
    ) -> io::Result<(Self, ReaderHandle)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = crossbeam_channel::unbounded();
        let reader = Self {
            poll,
            listeners: Vec::new(),
            inbox: rx,
            peers: Vec::new(),
            next_peer: 0,
            conns: HashMap::new(),
            next_token: FIRST_CONN,
            shared,
            router,
            shutdown,
            open_connections,
            max_connections,
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
        };
        Ok((reader, ReaderHandle { conns: tx, waker }))
    }

    /// Makes this reader the acceptor: it owns the listeners and deals to `peers` too.
    pub fn accept_on(
        &mut self,
        listeners: Vec<Listener>,
        peers: Vec<ReaderHandle>,
    ) -> io::Result<()> {
        self.listeners = listeners;
        for (i, l) in self.listeners.iter_mut().enumerate() {
            let token = Token(i);
            match l {
                Listener::Tcp(l) => self
                    .poll
                    .registry()
                    .register(l, token, Interest::READABLE)?,
                Listener::Unix(l, _) => {
                    self.poll
                        .registry()
                        .register(l, token, Interest::READABLE)?
                }
            }
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
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(Duration::from_millis(200)))
            {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.shared.metrics.warn(format_args!("poll failed: {e}"));
                }
                continue;
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
            self.expire_handshakes();
        }
    }

    fn take_inbox(&mut self) {
        while let Ok((stream, peer)) = self.inbox.try_recv() {
            self.adopt(stream, peer);
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
            if self.open_connections.load(Relaxed) >= self.max_connections {
                self.shared.metrics.discard(Discard::ConnectionLimit, 1);
                self.shared.metrics.warn(format_args!(
                    "{peer}: refused, already {} connections (--max-connections)",
                    self.max_connections
                ));
                continue;
            }
            self.open_connections.fetch_add(1, Relaxed);
            self.shared
                .metrics
                .connections_accepted
                .fetch_add(1, Relaxed);
            let n = self.peers.len() + 1;
            let pick = self.next_peer % n;
            self.next_peer = self.next_peer.wrapping_add(1);
            if pick == 0 {
                self.adopt(stream, peer);
            } else {
                let h = &self.peers[pick - 1];
                if h.conns.send((stream, peer)).is_ok() {
                    let _ = h.waker.wake();
                }
            }
        }
    }

    fn adopt(&mut self, mut stream: Stream, peer: String) {
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
            self.open_connections.fetch_sub(1, Relaxed);
            return;
        }
        let ingest = StreamIngest::new(self.shared.clone(), peer.clone());
        self.conns.insert(
            token,
            Conn {
                stream,
                peer,
                ingest,
                buf: BytesMut::with_capacity(64 << 10),
                out: Vec::new(),
                opened: Instant::now(),
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
            let n = match super::read_into(&mut conn.stream, &mut self.scratch, &mut conn.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                // CoreDNS resets right after FINISH; before STOP it is a lost stream.
                Err(_) => break Some(Ok(())),
            };
            if n == 0 {
                break Some(Ok(()));
            }
            match conn
                .ingest
                .feed(&mut conn.buf, &mut self.router, &mut conn.out)
            {
                Ok(true) => break Some(Ok(())),
                Ok(false) => {}
                Err(e) => break Some(Err(e)),
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
        self.write_replies(token);
        match end {
            None => {}
            Some(Ok(())) => self.close(token, None),
            Some(Err(e)) => self.close(token, Some(e)),
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
        while !conn.out.is_empty() {
            match conn.stream.write(&conn.out) {
                Ok(n) => {
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

    fn close(&mut self, token: Token, error: Option<super::StreamError>) {
        let Some(mut conn) = self.conns.remove(&token) else {
            return;
        };
        let _ = self.poll.registry().deregister(conn.stream.source());
        let end = if conn.ingest.is_stopped() {
            StreamEnd::Stopped
        } else {
            StreamEnd::Closed
        };
        let leftover = if error.is_some() { 0 } else { conn.buf.len() };
        conn.ingest.finish(end, leftover);
        if let Some(e) = error {
            self.shared.metrics.discard(e.drop_reason(), 1);
            self.shared
                .metrics
                .warn(format_args!("{}: {e}; connection closed", conn.peer));
        } else if leftover > 0 {
            self.shared.metrics.warn(format_args!(
                "{}: connection ended inside a frame ({leftover} bytes), without STOP",
                conn.peer
            ));
        }
        self.open_connections.fetch_sub(1, Relaxed);
        self.shared.metrics.connections_closed.fetch_add(1, Relaxed);
    }

    fn expire_handshakes(&mut self) {
        let late: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.ingest.is_established() && c.opened.elapsed() > HANDSHAKE_TIMEOUT)
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            if let Some(c) = self.conns.get(&token) {
                self.shared.metrics.discard(Discard::HandshakeTimeout, 1);
                self.shared.metrics.warn(format_args!(
                    "{}: no Frame Streams handshake within {}s; connection closed",
                    c.peer,
                    HANDSHAKE_TIMEOUT.as_secs()
                ));
            }
            self.close(token, None);
        }
    }

    /// Shutdown: read what the kernel already holds, then close every connection.
    fn close_all(&mut self) {
        self.listeners.clear();
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for token in tokens {
            self.on_readable(token);
            self.close(token, None);
        }
        self.router.flush();
    }
}
