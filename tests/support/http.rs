//! A minimal HTTP client for loopback test servers (the analyser's metrics port, Prometheus'
//! API): one HTTP/1.0 request per connection, so the server closes after the body and never
//! chunks it; the response head is parsed with `httparse` (already a dependency).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Bounds every connect, write and read: a server that wrongly blocks fails the test.
const GUARD: Duration = Duration::from_secs(20);

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` (with its query string) from `addr` (`127.0.0.1:PORT`) with extra `headers`.
/// Err when the server cannot be reached or does not answer with an HTTP response.
pub fn http_get(addr: &str, path: &str, headers: &[(&str, &str)]) -> Result<HttpReply, String> {
    let sock = addr
        .parse()
        .map_err(|e| format!("bad address {addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&sock, GUARD).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(GUARD)).unwrap();
    s.set_write_timeout(Some(GUARD)).unwrap();
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("{addr}: write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("{addr}{path}: read: {e}"))?;
    parse_reply(&raw).map_err(|e| format!("{addr}{path}: {e}"))
}

/// Like [`http_get`], panicking unless the status is 200.
pub fn http_get_ok(addr: &str, path: &str) -> HttpReply {
    let r = http_get(addr, path, &[]).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(r.status, 200, "GET {addr}{path}: {}", r.body);
    r
}

fn parse_reply(raw: &[u8]) -> Result<HttpReply, String> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut slots);
    let head_len = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(format!("incomplete head: {raw:?}")),
        Err(e) => return Err(format!("not an HTTP response ({e}): {raw:?}")),
    };
    let headers = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    Ok(HttpReply {
        status: resp.code.unwrap_or(0),
        headers,
        body: String::from_utf8_lossy(&raw[head_len..]).into_owned(),
    })
}

/// Percent-encodes a query parameter value (everything but RFC 3986 unreserved characters).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
