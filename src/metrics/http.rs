//! The metrics HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, `/top`.
//!
//! One thread with its own mio poll serves every scrape, off the data path. Sockets are
//! non-blocking, so a client that sends half a request and stays, or sends garbage, holds
//! nothing but its slot: each connection has a deadline (5 s to send its request, 10 s to take
//! the response), requests are capped at 8 KiB, and at most 64 connections are kept, 8 per
//! peer address — a new one evicts one of its own address's or of the address holding the
//! most, silent ones first, then the oldest that has not finished its request. Requests are parsed by `httparse`;
//! every response closes the connection, which Prometheus handles fine and keeps the server a
//! small state machine.
//!
//! With `--metrics-web-config` (src/metrics/web_config.rs) the port speaks TLS through rustls,
//! driven by the same loop, and every path but `/healthz` and `/readyz` needs the client
//! authentication the file asks for (a verified client certificate, basic authentication):
//! the kubelet's probes carry neither. Refusals are counted by reason and logged at most once
//! per 10 s.

use super::auth::Refusal;
use super::exposition::{Exposition, Format};
use super::model::Telemetry;
use super::web_config::{ClientAuth, LiveWebConfig, WebConfigError};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use rustls::ServerConnection;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;
const MAX_CONNECTIONS: usize = 64;
/// Slots one peer address may hold: a connect flood from one address takes its own.
const MAX_PER_ADDRESS: usize = 8;
const MAX_REQUEST_BYTES: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the response, unread input is drained this long so closing does not reset the
/// connection before the client has read the response.
const LINGER: Duration = Duration::from_secs(2);
const SWEEP: Duration = Duration::from_millis(250);

/// Refused authentication is logged at most this often, with the count since the last line.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The metrics endpoint could not start.
#[derive(Debug)]
pub struct StartError {
    pub addr: SocketAddr,
    source: StartFailure,
}

#[derive(Debug)]
enum StartFailure {
    Io(io::Error),
    WebConfig(Box<WebConfigError>),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            StartFailure::Io(e) => write!(f, "cannot serve metrics on {}: {e}", self.addr),
            StartFailure::WebConfig(e) => write!(
                f,
                "cannot serve metrics on {}: {}",
                self.addr,
                super::ErrorChain(e.as_ref())
            ),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.source {
            StartFailure::Io(e) => Some(e),
            StartFailure::WebConfig(e) => Some(e.as_ref()),
        }
    }
}

/// The running endpoint; `stop` (or drop) ends its thread.
pub struct MetricsServer {
    addr: SocketAddr,
    tls: bool,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks a free port, see `local_addr`) and serves on a thread of its
    /// own named `metrics-http`; `web_config`: TLS and client authentication
    /// (`--metrics-web-config`), loaded now so that a file that cannot serve is an error here.
    pub fn start(
        addr: SocketAddr,
        web_config: Option<&std::path::Path>,
        telemetry: Arc<Telemetry>,
    ) -> Result<Self, StartError> {
        let web = web_config
            .map(|p| LiveWebConfig::load(p, Instant::now()))
            .transpose()
            .map_err(|e| StartError {
                addr,
                source: StartFailure::WebConfig(Box::new(e)),
            })?;
        let err = |e| StartError {
            addr,
            source: StartFailure::Io(e),
        };
        let std_listener = std::net::TcpListener::bind(addr).map_err(err)?;
        std_listener.set_nonblocking(true).map_err(err)?;
        let local = std_listener.local_addr().map_err(err)?;
        let mut listener = TcpListener::from_std(std_listener);
        let poll = Poll::new().map_err(err)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(err)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(err)?);
        let stop = Arc::new(AtomicBool::new(false));
        let tls = web.as_ref().is_some_and(|w| w.tls().is_some());
        let server = Server {
            poll,
            listener,
            conns: (0..MAX_CONNECTIONS).map(|_| None).collect(),
            exposition: Exposition::new(telemetry.clone()),
            telemetry,
            stop: stop.clone(),
            web,
            refusals: RefusalLog::default(),
        };
        let thread = std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || server.run())
            .map_err(err)?;
        Ok(Self {
            addr: local,
            tls,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https` with the web config's TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        match self.tls {
            true => "https",
            false => "http",
        }
    }

    /// Stops serving and waits for the thread; open scrapes are cut off.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.stop.store(true, Relaxed);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shut_down();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Reading,
    Writing,
    Lingering,
}

struct Conn {
    stream: TcpStream,
    /// The TLS state with `--metrics-web-config`'s tls_server_config.
    tls: Option<Box<ServerConnection>>,
    /// The client's close_notify was sent (TLS only).
    closing: bool,
    /// The peer's address: one address holds at most `MAX_PER_ADDRESS` slots.
    peer: Option<std::net::IpAddr>,
    phase: Phase,
    accepted: Instant,
    deadline: Instant,
    request: Vec<u8>,
    response: Vec<u8>,
    sent: usize,
}

struct Server {
    poll: Poll,
    listener: TcpListener,
    conns: Vec<Option<Conn>>,
    exposition: Exposition,
    telemetry: Arc<Telemetry>,
    stop: Arc<AtomicBool>,
    web: Option<LiveWebConfig>,
    refusals: RefusalLog,
}

/// Refusals since the last log line.
#[derive(Default)]
struct RefusalLog {
    last_line: Option<Instant>,
    unlogged: u64,
}

impl Server {
    fn run(mut self) {
        let mut events = Events::with_capacity(128);
        while !self.stop.load(Relaxed) {
            if let Err(e) = self.poll.poll(&mut events, Some(SWEEP)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.warn(format_args!("metrics endpoint stopped: poll failed: {e}"));
                return;
            }
            for ev in events.iter() {
                if ev.token().0 >= FIRST_CONN {
                    self.serve(ev.token().0 - FIRST_CONN, Instant::now());
                }
            }
            // Every wake, not only on a listener event: after a failed accept (out of file
            // descriptors) the backlog would otherwise wait for the next connection's edge.
            self.accept(Instant::now());
            self.sweep(Instant::now());
        }
    }

    fn warn(&self, msg: std::fmt::Arguments<'_>) {
        self.telemetry.metrics.warn(msg);
    }

    fn accept(&mut self, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    if let Some(web) = &mut self.web {
                        web.refresh(now);
                    }
                    self.admit(stream, Some(peer.ip().to_canonical()), now)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.warn(format_args!("metrics endpoint: accept failed: {e}"));
                    return;
                }
            }
        }
    }

    /// Takes a free slot. An address at `MAX_PER_ADDRESS` gives up one of its own; a full
    /// table one of the address holding the most. Within those, a connection that has sent
    /// nothing goes first, then one still sending its request, oldest first: a connect flood
    /// evicts itself, and a scraper whose request comes a moment after connecting gets
    /// through.
    fn admit(&mut self, mut stream: TcpStream, peer: Option<std::net::IpAddr>, now: Instant) {
        let held = |p: Option<std::net::IpAddr>| {
            self.conns.iter().flatten().filter(|c| c.peer == p).count()
        };
        let own_full = held(peer) >= MAX_PER_ADDRESS;
        let slot = match self.conns.iter().position(Option::is_none) {
            Some(i) if !own_full => i,
            _ => {
                let busiest = match own_full {
                    true => peer,
                    false => self
                        .conns
                        .iter()
                        .flatten()
                        .map(|c| c.peer)
                        .max_by_key(|&p| held(p))
                        .flatten(),
                };
                let victim = self
                    .conns
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
                    .filter(|(_, c)| c.peer == busiest)
                    .min_by_key(|(_, c)| {
                        (c.phase != Phase::Reading, !c.request.is_empty(), c.accepted)
                    })
                    .map(|(i, _)| i);
                let Some(i) = victim else { return };
                self.close(i);
                i
            }
        };
        let tls = match self.web.as_ref().and_then(LiveWebConfig::tls) {
            None => None,
            Some(config) => match ServerConnection::new(config.clone()) {
                Ok(c) => Some(Box::new(c)),
                Err(e) => {
                    self.warn(format_args!(
                        "metrics endpoint: TLS refused a connection: {e}"
                    ));
                    return;
                }
            },
        };
        let token = Token(slot + FIRST_CONN);
        if self
            .poll
            .registry()
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            return;
        }
        self.conns[slot] = Some(Conn {
            stream,
            tls,
            closing: false,
            peer,
            phase: Phase::Reading,
            accepted: now,
            deadline: now + REQUEST_TIMEOUT,
            request: Vec::new(),
            response: Vec::new(),
            sent: 0,
        });
        // Data may have arrived before registration; edge-triggered events would not say so.
        self.serve(slot, now);
    }

    fn close(&mut self, slot: usize) {
        if let Some(mut c) = self.conns[slot].take() {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    fn sweep(&mut self, now: Instant) {
        for i in 0..self.conns.len() {
            if self.conns[i].as_ref().is_some_and(|c| now >= c.deadline) {
                self.close(i);
            }
        }
    }

    /// Advances one connection as far as its socket allows.
    fn serve(&mut self, slot: usize, now: Instant) {
        let Some(mut c) = self.conns[slot].take() else {
            return;
        };
        let keep = match c.phase {
            Phase::Reading => self.read_request(&mut c, now),
            Phase::Writing | Phase::Lingering => true,
        } && write_response(&mut c, now)
            && linger(&mut c);
        if keep {
            self.conns[slot] = Some(c);
        } else {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    /// Reads what is there; once the request is complete (or hopeless), prepares the
    /// response. False: close now.
    fn read_request(&mut self, c: &mut Conn, now: Instant) -> bool {
        let mut buf = [0u8; 4096];
        let mut eof = false;
        while c.request.len() < MAX_REQUEST_BYTES {
            match c.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => c.request.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Plaintext on the TLS port, a client certificate the CA does not vouch for.
                    if e.kind() == io::ErrorKind::InvalidData
                        && c.tls.as_ref().is_some_and(|t| t.is_handshaking())
                    {
                        self.refused(Refusal::TlsHandshake, c.peer, now);
                    }
                    return false;
                }
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let response = match req.parse(&c.request) {
            Ok(httparse::Status::Complete(_)) => self.answer(&req, c, now),
            Ok(httparse::Status::Partial) if c.request.len() >= MAX_REQUEST_BYTES => {
                Response::text(431, "request header fields too large\n")
            }
            Ok(httparse::Status::Partial) => return !eof,
            Err(httparse::Error::TooManyHeaders) => Response::text(431, "too many headers\n"),
            Err(_) => Response::text(400, "bad request\n"),
        };
        let head = req.method == Some("HEAD");
        c.response = response.into_bytes(head);
        c.phase = Phase::Writing;
        c.deadline = now + RESPONSE_TIMEOUT;
        true
    }

    /// The response to a complete request: the probes for anyone, every other path only for
    /// a client that passes `--metrics-web-config`'s authentication.
    fn answer(&mut self, req: &httparse::Request<'_, '_>, c: &Conn, now: Instant) -> Response {
        let path = req.path.unwrap_or("/");
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        if matches!(path, "/healthz" | "/readyz") {
            return self.respond(path, req);
        }
        match self.authenticate(req, c, now) {
            Ok(()) => self.respond(path, req),
            Err(why) => {
                self.refused(why, c.peer, now);
                match why {
                    Refusal::ClientCertificate | Refusal::TlsHandshake => {
                        Response::text(403, "a client certificate is required\n")
                    }
                    Refusal::RateLimited => {
                        let mut r = Response::text(429, "too many new credentials: retry\n");
                        r.header = Some("Retry-After: 1");
                        r
                    }
                    Refusal::NoCredentials | Refusal::BadCredentials => {
                        let mut r = Response::text(401, "unauthorized\n");
                        r.header = Some(
                            "WWW-Authenticate: Basic realm=\"dnstap-analyser\", charset=\"UTF-8\"",
                        );
                        r
                    }
                }
            }
        }
    }

    fn authenticate(
        &mut self,
        req: &httparse::Request<'_, '_>,
        c: &Conn,
        now: Instant,
    ) -> Result<(), Refusal> {
        let Some(web) = &mut self.web else {
            return Ok(());
        };
        // The handshake verified a certificate that was presented; here one must have been.
        let has_cert = c
            .tls
            .as_ref()
            .is_some_and(|t| t.peer_certificates().is_some());
        if web.client_auth() == ClientAuth::RequireAndVerify && !has_cert {
            return Err(Refusal::ClientCertificate);
        }
        let authorization = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("authorization"))
            .map(|h| h.value);
        web.auth.check(authorization, c.peer, now)
    }

    /// Counts a refusal; a line at most every `REFUSAL_LOG_EVERY`, a flood cannot fill the log.
    fn refused(&mut self, why: Refusal, peer: Option<std::net::IpAddr>, now: Instant) {
        self.telemetry.metrics.metrics_auth_refused[why as usize].fetch_add(1, Relaxed);
        let log = &mut self.refusals;
        log.unlogged += 1;
        if log
            .last_line
            .is_some_and(|t| now.saturating_duration_since(t) < REFUSAL_LOG_EVERY)
        {
            return;
        }
        let n = std::mem::take(&mut log.unlogged);
        log.last_line = Some(now);
        let peer = peer.map_or("?".to_string(), |p| p.to_string());
        eprintln!(
            "dnstap-analyser: warning: metrics endpoint refused {n} request(s) by client \
             authentication since the last such line (latest: {peer}, {}); \
             see dnstap_analyser_metrics_auth_refused_total",
            why.name()
        );
    }

    fn respond(&self, path: &str, req: &httparse::Request<'_, '_>) -> Response {
        match req.method {
            Some("GET" | "HEAD") => {}
            _ => {
                let mut r = Response::text(405, "only GET and HEAD\n");
                r.header = Some("Allow: GET, HEAD");
                return r;
            }
        }
        match path {
            "/metrics" => {
                let accept = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("accept"))
                    .and_then(|h| std::str::from_utf8(h.value).ok());
                let format = Format::negotiate(accept);
                match self.exposition.render(format) {
                    Ok(body) => Response {
                        status: 200,
                        content_type: format.content_type(),
                        body: body.into_bytes(),
                        header: None,
                    },
                    Err(_) => Response::text(500, "metrics encoding failed\n"),
                }
            }
            "/healthz" => {
                let stalls = self.telemetry.health.check(Instant::now());
                if stalls.is_empty() {
                    Response::text(200, "ok\n")
                } else {
                    let body: String = stalls.iter().map(|s| format!("stuck: {s}\n")).collect();
                    Response::text(503, &body)
                }
            }
            "/readyz" => match self.telemetry.health.ready() {
                Ok(()) => Response::text(200, "ready\n"),
                Err(why) => Response::text(503, &format!("not ready: {}\n", why.explain())),
            },
            "/top" => match self.telemetry.top() {
                Some(json) => Response {
                    status: 200,
                    content_type: "application/json",
                    body: json.into_bytes(),
                    header: None,
                },
                None => Response::text(404, "/top is not available\n"),
            },
            _ => Response::text(404, "not found: try /metrics, /healthz, /readyz or /top\n"),
        }
    }
}

/// Sends what the socket takes; once all is sent, half-closes and lingers. False: close now.
fn write_response(c: &mut Conn, now: Instant) -> bool {
    if c.phase != Phase::Writing {
        return true;
    }
    while c.sent < c.response.len() {
        match c.write() {
            Ok(0) => return false,
            Ok(n) => c.sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    match c.finish() {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
        Err(_) => return false,
    }
    let _ = c.stream.shutdown(Shutdown::Write);
    c.phase = Phase::Lingering;
    c.deadline = now + LINGER;
    c.response = Vec::new();
    true
}

impl Conn {
    /// Plaintext of the request: from the socket, or decrypted by rustls (whose handshake
    /// records are sent on the way). `Ok(0)`: the client closed.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return self.stream.read(buf);
        };
        // Handshake records a full socket refused last time: this may be the writable event.
        flush_tls_if_possible(tls, &mut self.stream)?;
        let mut eof = false;
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && eof => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Closed without close_notify: for a request, the same as a close.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            eof = tls.read_tls(&mut self.stream)? == 0;
            let state = tls.process_new_packets();
            // The handshake's answer, or the alert saying why it failed.
            let flushed = flush_tls_if_possible(tls, &mut self.stream);
            state.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            flushed?;
        }
    }

    /// Writes more of the response; the count is of plaintext bytes taken.
    fn write(&mut self) -> io::Result<usize> {
        let rest = &self.response[self.sent..];
        let Some(tls) = &mut self.tls else {
            return self.stream.write(rest);
        };
        // Records still waiting go first: rustls buffers what it is given.
        flush_tls(tls, &mut self.stream)?;
        let n = tls.writer().write(rest)?;
        flush_tls_if_possible(tls, &mut self.stream)?;
        Ok(n)
    }

    /// After the whole response: TLS sends close_notify and what is still encrypted.
    fn finish(&mut self) -> io::Result<()> {
        let Some(tls) = &mut self.tls else {
            return Ok(());
        };
        if !self.closing {
            tls.send_close_notify();
            self.closing = true;
        }
        flush_tls(tls, &mut self.stream)
    }
}

/// Writes the TLS records rustls has ready; `WouldBlock` if the socket is full.
fn flush_tls(tls: &mut ServerConnection, tcp: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        tls.write_tls(tcp)?;
    }
    Ok(())
}

/// Like `flush_tls`; what a full socket does not take waits for its writable event.
fn flush_tls_if_possible(tls: &mut ServerConnection, tcp: &mut TcpStream) -> io::Result<()> {
    match flush_tls(tls, tcp) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        other => other,
    }
}

/// Discards input until the client closes. False: close now.
fn linger(c: &mut Conn) -> bool {
    if c.phase != Phase::Lingering {
        return true;
    }
    let mut buf = [0u8; 1024];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// One more header line (Allow, WWW-Authenticate, Retry-After).
    header: Option<&'static str>,
}

impl Response {
    fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            header: None,
        }
    }

    /// The whole response; HEAD gets the same headers without the body.
    fn into_bytes(self, head: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            429 => "Too Many Requests",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            _ => "Service Unavailable",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if let Some(h) = self.header {
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head {
            out.extend_from_slice(&self.body);
        }
        out
    }
}
