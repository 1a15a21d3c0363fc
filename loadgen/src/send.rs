//! The sender's side of a bidirectional Frame Streams connection, as CoreDNS speaks it:
//! READY(content type) -> ACCEPT -> START, data frames, STOP -> FINISH.

use bytes::BytesMut;
use dnstap_analyser::framestream::{
    encode_control, ControlKind, Frame, FrameDecoder, DNSTAP_CONTENT_TYPE,
};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp(String),
    Unix(PathBuf),
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

pub enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Conn {
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(d),
            Conn::Unix(s) => s.set_read_timeout(d),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// Connects, retrying until `patience` runs out (the receiver may still be starting).
pub fn connect(target: &Target, patience: Duration) -> Result<Conn, String> {
    let deadline = Instant::now() + patience;
    loop {
        let r = match target {
            Target::Tcp(a) => TcpStream::connect(a.as_str()).map(|s| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
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
