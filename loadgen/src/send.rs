//! The sender's side of a bidirectional Frame Streams connection, as CoreDNS speaks it:
//! READY(content type) -> ACCEPT -> START, data frames, STOP -> FINISH.

use bytes::BytesMut;
use dnstap_analyser::framestream::{
    encode_control, ControlKind, Frame, FrameDecoder, DNSTAP_CONTENT_TYPE,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp(String),
    /// TCP with TLS around the Frame Streams, as CoreDNS's `dnstap tls://`.
    Tls(String, TlsClient),
    Unix(PathBuf),
}

/// How the load generator speaks TLS: the CAs it trusts, the name it expects, and the client
/// certificate it presents for mTLS if any.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsClient({:?})", self.server_name)
    }
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}

impl Eq for TlsClient {}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate", path.display()));
    }
    Ok(certs)
}

impl TlsClient {
    /// Trusts the CAs in `ca` (PEM), expects `server_name` in the receiver's certificate, and
    /// presents `client` = (certificate chain, key) PEM files if given.
    pub fn new(
        ca: &Path,
        server_name: &str,
        client: Option<(&Path, &Path)>,
    ) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in pem_certs(ca)? {
            roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("{}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(pem_certs(cert)?, key)
                    .map_err(|e| format!("{}: {e}", cert.display()))?
            }
        };
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| format!("--tls-server-name {server_name:?}: {e}"))?;
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }
}

impl Target {
    /// `tcp://HOST:PORT`, `HOST:PORT` or `unix:///path`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix://") {
            if p.is_empty() {
                return Err(format!("{s}: empty unix socket path"));
            }
            return Ok(Target::Unix(PathBuf::from(p)));
        }
        let hp = s.strip_prefix("tcp://").unwrap_or(s);
        if !hp.contains(':') {
            return Err(format!(
                "{s}: expected tcp://HOST:PORT, HOST:PORT or unix:///path"
            ));
        }
        Ok(Target::Tcp(hp.to_string()))
    }
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

pub enum Conn {
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
    Unix(UnixStream),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    /// TLS: records rustls holds go out (the others write straight to the socket).
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tls(s) => s.flush(),
            _ => Ok(()),
        }
    }
}

impl Conn {
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(d),
            Conn::Tls(s) => s.sock.set_read_timeout(d),
            Conn::Unix(s) => s.set_read_timeout(d),
        }
    }

    fn shutdown(&mut self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Tls(s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
                s.sock.shutdown(std::net::Shutdown::Both)
            }
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// A TCP connection to `addr`, from the local address `bind` when given (several emulated
/// pods on distinct loopback addresses, 127.0.0.x, are distinct senders to the analyser).
fn tcp(addr: &str, bind: Option<IpAddr>) -> io::Result<TcpStream> {
    let s = match bind {
        None => TcpStream::connect(addr)?,
        Some(ip) => {
            use std::net::ToSocketAddrs;
            let to = addr
                .to_socket_addrs()?
                .find(|a| a.is_ipv4() == ip.is_ipv4())
                .ok_or_else(|| io::Error::other(format!("{addr}: no address like {ip}")))?;
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(to),
                socket2::Type::STREAM,
                None,
            )?;
            socket.bind(&std::net::SocketAddr::new(ip, 0).into())?;
            socket.connect(&to.into())?;
            socket.into()
        }
    };
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Connects (from `bind` if given), retrying until `patience` runs out (the receiver may
/// still be starting).
pub fn connect(target: &Target, bind: Option<IpAddr>, patience: Duration) -> Result<Conn, String> {
    let deadline = Instant::now() + patience;
    loop {
        let r = match target {
            Target::Tcp(a) => tcp(a, bind).map(Conn::Tcp),
            Target::Tls(a, tls) => tcp(a, bind).and_then(|s| {
                let name = tls.server_name.clone();
                let c = rustls::ClientConnection::new(tls.config.clone(), name)
                    .map_err(io::Error::other)?;
                Ok(Conn::Tls(Box::new(rustls::StreamOwned::new(c, s))))
            }),
            Target::Unix(p) => UnixStream::connect(p).map(Conn::Unix),
        };
        match r {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("connect {target:?}: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn read_control(
    conn: &mut Conn,
    buf: &mut BytesMut,
    patience: Duration,
) -> Result<ControlKind, String> {
    let decoder = FrameDecoder::new(1 << 20);
    let deadline = Instant::now() + patience;
    let mut chunk = [0u8; 4096];
    loop {
        match decoder.decode(buf) {
            Ok(Some(Frame::Control(c))) => return Ok(c.kind),
            Ok(Some(Frame::Data(_))) => return Err("receiver sent a data frame".into()),
            Ok(None) => {}
            Err(e) => return Err(format!("bad frame from receiver: {e}")),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timed out waiting for a control frame from the receiver".into());
        }
        conn.set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match conn.read(&mut chunk) {
            Ok(0) => return Err("receiver closed the connection".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err("timed out waiting for a control frame from the receiver".into())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// READY -> ACCEPT -> START.
pub fn open(conn: &mut Conn, patience: Duration) -> Result<(), String> {
    let mut out = Vec::with_capacity(64);
    encode_control(ControlKind::Ready, &[DNSTAP_CONTENT_TYPE], &mut out);
    conn.write_all(&out)
        .and_then(|()| conn.flush())
        .map_err(|e| format!("write READY: {e}"))?;
    let mut buf = BytesMut::new();
    match read_control(conn, &mut buf, patience)? {
        ControlKind::Accept => {}
        k => return Err(format!("expected ACCEPT, got {k:?}")),
    }
    out.clear();
    encode_control(ControlKind::Start, &[DNSTAP_CONTENT_TYPE], &mut out);
    conn.write_all(&out)
        .map_err(|e| format!("write START: {e}"))
}

/// STOP, then waits for FINISH. Returns whether FINISH arrived in time.
pub fn close(conn: &mut Conn, patience: Duration) -> Result<bool, String> {
    let mut out = Vec::with_capacity(16);
    encode_control(ControlKind::Stop, &[], &mut out);
    conn.write_all(&out)
        .and_then(|()| conn.flush())
        .map_err(|e| format!("write STOP: {e}"))?;
    let mut buf = BytesMut::new();
    let r = read_control(conn, &mut buf, patience);
    conn.shutdown();
    match r {
        Ok(ControlKind::Finish) => Ok(true),
        Ok(k) => Err(format!("expected FINISH, got {k:?}")),
        Err(e) => {
            eprintln!("dnstap-loadgen: no FINISH: {e}");
            Ok(false)
        }
    }
}

/// START for a file (unidirectional: no READY/ACCEPT).
pub fn file_start(out: &mut Vec<u8>) {
    encode_control(ControlKind::Start, &[DNSTAP_CONTENT_TYPE], out);
}

pub fn file_stop(out: &mut Vec<u8>) {
    encode_control(ControlKind::Stop, &[], out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            Target::parse("127.0.0.1:6000").unwrap(),
            Target::Tcp("127.0.0.1:6000".into())
        );
        assert_eq!(
            Target::parse("tcp://[::1]:6000").unwrap(),
            Target::Tcp("[::1]:6000".into())
        );
        assert_eq!(
            Target::parse("unix:///tmp/x.sock").unwrap(),
            Target::Unix("/tmp/x.sock".into())
        );
        assert!(Target::parse("nowhere").is_err());
    }
}
