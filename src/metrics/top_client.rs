//! `dnstap-analyser top`: polls a running analyser's `/top` and draws the failing senders,
//! qnames, clients, upstreams and workloads as tables fitted to the terminal — the `kubectl
//! top` of DNS failures.
//!
//! The request is one HTTP/1.1 GET over a `TcpStream`, or over rustls for `https://` (the
//! endpoint closes every connection after its response), the response head is parsed by
//! `httparse`, the body by `serde_json`. Rendering is a pure function of the document, so it is
//! tested from a sample.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The CA certificates an `https://` URL is checked against without `--tls-ca` (Debian's
/// ca-certificates bundle).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Connecting, sending and reading each give up after this long.
const NET_TIMEOUT: Duration = Duration::from_secs(5);
/// A `/top` document is a few KB; more than this is not one.
const MAX_RESPONSE_BYTES: u64 = 4 << 20;

/// Why a poll of `/top` failed.
#[derive(Debug)]
pub enum TopError {
    /// Neither `HOST:PORT` nor an `http://` or `https://HOST:PORT[/PATH]` URL.
    Url(String),
    /// The CA certificates for `https://` cannot be used.
    Tls(String),
    Io {
        url: String,
        source: io::Error,
    },
    /// A response that is not HTTP, not 200, or not JSON.
    Response {
        url: String,
        problem: String,
    },
    Json {
        url: String,
        source: serde_json::Error,
    },
}

impl std::fmt::Display for TopError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Url(u) => write!(f, "not HOST:PORT or an http(s)://HOST:PORT URL: {u:?}"),
            Self::Tls(problem) => f.write_str(problem),
            Self::Io { url, .. } => write!(f, "cannot fetch {url}"),
            Self::Response { url, problem } => write!(f, "bad response from {url}: {problem}"),
            Self::Json { url, .. } => write!(f, "{url} did not return a /top document"),
        }
    }
}

impl std::error::Error for TopError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::Json { source, .. } => Some(source),
            Self::Url(_) | Self::Tls(_) | Self::Response { .. } => None,
        }
    }
}

/// Where `/top` is: over TLS or not, `HOST:PORT` and the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Target<'a> {
    tls: bool,
    authority: &'a str,
    path: &'a str,
}

impl Target<'_> {
    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority, self.path)
    }

    /// The name the server's certificate must carry: the host, without port or brackets.
    fn server_name(&self) -> Result<ServerName<'static>, TopError> {
        let host = self
            .authority
            .rsplit_once(':')
            .map_or(self.authority, |h| h.0);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_string()).map_err(|_| TopError::Url(self.url()))
    }
}

/// `HOST:PORT[/PATH]`, `http://HOST:PORT[/PATH]` or `https://HOST:PORT[/PATH]`; the path
/// defaults to `/top`.
fn split_url(url: &str) -> Result<Target<'_>, TopError> {
    let (tls, rest) = match url.split_once("://") {
        Some(("http", rest)) => (false, rest),
        Some(("https", rest)) => (true, rest),
        Some(_) => return Err(TopError::Url(url.into())),
        None => (false, url),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains(char::is_whitespace) {
        return Err(TopError::Url(url.into()));
    }
    let path = if path == "/" { "/top" } else { path };
    Ok(Target {
        tls,
        authority,
        path,
    })
}

/// A TLS client trusting the PEM CA certificates in `ca`, or the system's.
pub fn tls_client(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TopError> {
    let path = ca.unwrap_or(Path::new(SYSTEM_ROOTS));
    let problem = |what: String| TopError::Tls(format!("{}: {what}", path.display()));
    let pem = std::fs::read(path).map_err(|e| problem(format!("cannot read: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| problem(format!("not PEM certificates: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| problem(format!("not a CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(problem("no certificate in it".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TopError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Reads a response to the end of the connection, at most `MAX_RESPONSE_BYTES`. A TLS peer
/// that closes without close_notify ends it too: the response's length is checked anyway.
fn read_response(stream: impl Read) -> io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    match stream.take(MAX_RESPONSE_BYTES).read_to_end(&mut raw) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !raw.is_empty() => Ok(raw),
        Err(e) => Err(e),
        Ok(_) => Ok(raw),
    }
}

/// GETs `url` (its path, or `/top`) and parses the JSON document.
pub fn fetch(url: &str) -> Result<Value, TopError> {
    let target = split_url(url)?;
    let tls = match target.tls {
        true => Some(tls_client(None)?),
        false => None,
    };
    fetch_from(target, tls, None)
}

/// The `Authorization` header's value for HTTP basic authentication (RFC 7617).
pub fn basic_credentials(user: &str, password: &str) -> String {
    use base64::Engine;
    let pair = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// GETs `target`, over TLS with `tls` for an `https://` one, with `authorization` as the
/// `Authorization` header when the endpoint requires credentials.
fn fetch_from(
    target: Target<'_>,
    tls: Option<Arc<rustls::ClientConfig>>,
    authorization: Option<&str>,
) -> Result<Value, TopError> {
    let full = target.url();
    let io_err = |source| TopError::Io {
        url: full.clone(),
        source,
    };
    let addr = target
        .authority
        .to_socket_addrs()
        .map_err(io_err)?
        .next()
        .ok_or_else(|| TopError::Url(full.clone()))?;
    let mut stream = TcpStream::connect_timeout(&addr, NET_TIMEOUT).map_err(io_err)?;
    stream.set_read_timeout(Some(NET_TIMEOUT)).map_err(io_err)?;
    stream
        .set_write_timeout(Some(NET_TIMEOUT))
        .map_err(io_err)?;
    let authorization = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n{authorization}Connection: close\r\n\r\n",
        target.path, target.authority
    );
    let raw = match (target.tls, tls) {
        (true, Some(config)) => {
            let conn = rustls::ClientConnection::new(config, target.server_name()?)
                .map_err(|e| io_err(io::Error::other(e)))?;
            let mut tls = rustls::StreamOwned::new(conn, stream);
            tls.write_all(request.as_bytes()).map_err(io_err)?;
            read_response(tls).map_err(io_err)?
        }
        (true, None) => return Err(TopError::Tls("https:// without a TLS client".into())),
        (false, _) => {
            stream.write_all(request.as_bytes()).map_err(io_err)?;
            read_response(stream).map_err(io_err)?
        }
    };
    let body = response_body(&raw).map_err(|problem| TopError::Response {
        url: full.clone(),
        problem,
    })?;
    serde_json::from_slice(body).map_err(|source| TopError::Json { url: full, source })
}

/// The body of a complete `200` response read to the end of the connection.
fn response_body(raw: &[u8]) -> Result<&[u8], String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("connection closed mid-header".into()),
        Err(e) => return Err(format!("not HTTP: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    let body = &raw[head..];
    if code != 200 {
        let text = String::from_utf8_lossy(body);
        return Err(format!("status {code}: {}", sanitize(text.trim())));
    }
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    match length {
        Some(n) if n > body.len() => Err(format!("body cut short: {} of {n} bytes", body.len())),
        Some(n) => Ok(&body[..n]),
        None => Ok(body),
    }
}

/// Replaces all but printable ASCII, so that whatever a server (or a sender, whose identity
/// and pod names it shows) returns cannot drive the terminal, and every character takes one
/// column: no escapes, no wide or zero-width characters, no bidi overrides. Qnames are ASCII
/// already (presentation format escapes the rest).
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// The terminal the screen is drawn for, in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScreenSize {
    pub width: usize,
    pub height: usize,
}

impl ScreenSize {
    /// What is drawn when the output is not a terminal (and no flag says otherwise).
    pub const FALLBACK: Self = Self {
        width: 80,
        height: 24,
    };

    /// Stdout's terminal size, or [`ScreenSize::FALLBACK`]; `width` and `height` override.
    pub fn of_stdout(width: Option<usize>, height: Option<usize>) -> Self {
        let tty = terminal_size::terminal_size().map(|(w, h)| Self {
            width: w.0.into(),
            height: h.0.into(),
        });
        let found = tty.filter(|s| s.width > 0 && s.height > 0);
        let base = found.unwrap_or(Self::FALLBACK);
        Self {
            width: width.unwrap_or(base.width).max(1),
            height: height.unwrap_or(base.height).max(1),
        }
    }
}

/// `text` cut to `width` characters, its end replaced by `…` when cut.
fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    if width > 0 {
        cut.push('…');
    }
    cut
}

/// `key` cut to `width` characters keeping its right end (the zone of a qname, the suffix
/// that tells pods apart), behind `…`.
fn truncate_left(key: &str, width: usize) -> String {
    let n = key.chars().count();
    if n <= width {
        return key.to_string();
    }
    let tail: String = key.chars().skip(n - width.saturating_sub(1)).collect();
    if width == 0 {
        return tail;
    }
    format!("…{tail}")
}

fn causes_text(causes: &Value) -> String {
    let Some(map) = causes.as_object() else {
        return String::new();
    };
    let mut parts: Vec<(u64, &str)> = map
        .iter()
        .map(|(k, v)| (v.as_u64().unwrap_or(0), k.as_str()))
        .collect();
    parts.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let parts: Vec<String> = parts
        .iter()
        .map(|(n, k)| format!("{} {n}", sanitize(k)))
        .collect();
    parts.join(", ")
}

/// `failed`, or `lower..failed` when the sketch's error makes the count a range.
fn count_text(row: &Value) -> String {
    let failed = row["failed"].as_u64().unwrap_or(0);
    match row["error"].as_u64().unwrap_or(0) {
        0 => failed.to_string(),
        e => format!("{}..{failed}", failed.saturating_sub(e)),
    }
}

/// A ratio as a percentage: `2.5%`, `<0.1%` for a small non-zero one, `-` without one.
fn ratio_text(ratio: &Value) -> String {
    match ratio.as_f64() {
        Some(r) if r > 0.0 && r < 0.001 => "<0.1%".into(),
        Some(r) => format!("{:.1}%", r * 100.0),
        None => "-".into(),
    }
}

/// `HH:MM:SS` of an RFC 3339 time (the server's UTC), `-` without one.
fn clock_text(time: &Value) -> String {
    time.as_str()
        .and_then(|t| t.get(11..19))
        .map_or_else(|| "-".into(), sanitize)
}

fn qtypes_text(qtypes: &Value) -> String {
    let names: Vec<String> = qtypes
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|q| q.as_str().map(sanitize))
        .collect();
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

/// One dimension of the document: its list, the key of its rows, and its title.
struct Section {
    list: &'static str,
    key: &'static str,
    title: &'static str,
    /// The rows have sessions and a failure ratio (the senders).
    with_sessions: bool,
}

const SECTIONS: [Section; 5] = [
    Section {
        list: "identities",
        key: "identity",
        title: "IDENTITY",
        with_sessions: true,
    },
    Section {
        list: "qnames",
        key: "qname",
        title: "QNAME",
        with_sessions: false,
    },
    Section {
        list: "clients",
        key: "client",
        title: "CLIENT",
        with_sessions: false,
    },
    Section {
        list: "upstreams",
        key: "upstream",
        title: "UPSTREAM",
        with_sessions: false,
    },
    // Only senders that say which workload asked (CoreDNS's `extra`) fill this one.
    Section {
        list: "workloads",
        key: "workload",
        title: "NAMESPACE/POD",
        with_sessions: false,
    },
];

/// The narrowest the key column gets while other columns are shown in full.
const MIN_KEY_WIDTH: usize = 16;
/// The CAUSES column is left out rather than cut to less than this.
const MIN_CAUSES_WIDTH: usize = 12;

impl Section {
    fn rows<'a>(&self, doc: &'a Value) -> &'a [Value] {
        doc[self.list]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Whether the screen shows it: a server that predates a list leaves it out, and the
    /// workloads only when some sender says which workload asked.
    fn shown(&self, doc: &Value) -> bool {
        match self.list {
            "workloads" | "identities" => !self.rows(doc).is_empty(),
            _ => true,
        }
    }

    /// The header and `rows` lines of the table, each at most `width` characters.
    fn draw(&self, doc: &Value, rows: usize, width: usize, out: &mut Vec<String>) {
        let mut header = vec![self.title.to_string(), "FAILED".into()];
        if self.with_sessions {
            header.extend(["SESSIONS".into(), "RATIO".into()]);
        }
        header.extend([
            "CAUSE".into(),
            "QTYPES".into(),
            "LAST".into(),
            "CAUSES".into(),
        ]);
        let cells: Vec<Vec<String>> = self.rows(doc)[..rows.min(self.rows(doc).len())]
            .iter()
            .map(|r| {
                let mut c = vec![sanitize(r[self.key].as_str().unwrap_or("-")), count_text(r)];
                if self.with_sessions {
                    let sessions = r["sessions"].as_u64().map_or("-".into(), |n| n.to_string());
                    c.extend([sessions, ratio_text(&r["failure_ratio"])]);
                }
                c.extend([
                    sanitize(r["cause"].as_str().unwrap_or("-")),
                    qtypes_text(&r["qtypes"]),
                    clock_text(&r["last_failed_at"]),
                    causes_text(&r["causes"]),
                ]);
                c
            })
            .collect();
        let column = |i: usize| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        };
        let mut last = header.len() - 1;
        let mut widths: Vec<usize> = (0..last).map(column).collect();
        // The key column takes what the fixed ones leave; CAUSES, last, whatever remains, and
        // gives way to the key when too little would (CAUSE names the main one).
        let fixed: usize = widths[1..].iter().map(|w| w + 2).sum();
        let room = width.saturating_sub(fixed);
        if room < widths[0] + 2 + MIN_CAUSES_WIDTH {
            last -= 1;
            widths[0] = widths[0].min(room.max(MIN_KEY_WIDTH));
        }
        let line = |c: &[String]| -> String {
            let mut l = String::new();
            for (i, text) in c[..=last].iter().enumerate() {
                let w = widths.get(i).copied().unwrap_or(0);
                let text = if i == 0 {
                    truncate_left(text, w)
                } else {
                    text.clone()
                };
                // Counts are right-aligned, the rest left.
                let count = i == 1 || (self.with_sessions && (i == 2 || i == 3));
                let pad = w.saturating_sub(text.chars().count());
                if i > 0 {
                    l.push_str("  ");
                }
                if count {
                    l.extend(std::iter::repeat_n(' ', pad));
                }
                l.push_str(&text);
                if !count {
                    l.extend(std::iter::repeat_n(' ', pad));
                }
            }
            truncate(l.trim_end(), width)
        };
        out.push(line(&header));
        if cells.is_empty() {
            out.push("(none)".into());
        }
        out.extend(cells.iter().map(|c| line(c)));
    }
}

/// Shares `budget` lines among tables that want `wants` rows: each gets an equal share, and
/// what a table leaves of its share goes to the others.
fn share_rows(wants: &[usize], budget: usize) -> Vec<usize> {
    let mut got = vec![0; wants.len()];
    let mut left = budget;
    loop {
        let open: Vec<usize> = (0..wants.len()).filter(|&i| got[i] < wants[i]).collect();
        if open.is_empty() || left == 0 {
            return got;
        }
        let share = (left / open.len()).max(1);
        for i in open {
            let more = share.min(wants[i] - got[i]).min(left);
            got[i] += more;
            left -= more;
        }
    }
}

/// The screen for one `/top` document fetched from `source`: at most `size.height` lines
/// (less `reserved` ones the caller adds), none longer than `size.width`. The tables share the
/// height; `max_rows` caps each.
pub fn render(
    doc: &Value,
    source: &str,
    size: ScreenSize,
    reserved: usize,
    max_rows: Option<usize>,
) -> String {
    let window = doc["window_seconds"].as_f64().unwrap_or(0.0);
    let failed = doc["failed"].as_u64().unwrap_or(0);
    let mut lines = vec![format!(
        "{}  updated {} UTC  window {window}s",
        sanitize(source),
        clock_text(&doc["updated_at"])
    )];
    let mut summary = match doc["sessions"].as_u64() {
        Some(sessions) => format!(
            "{failed} failed of {sessions} sessions ({})",
            ratio_text(&doc["failure_ratio"])
        ),
        None => format!("{failed} failed sessions"),
    };
    let causes = causes_text(&doc["causes"]);
    if !causes.is_empty() {
        summary.push_str(&format!(": {causes}"));
    }
    lines.push(summary);
    let shown: Vec<&Section> = SECTIONS.iter().filter(|s| s.shown(doc)).collect();
    // A blank line and a header above each table, and one line for a table without rows.
    let fixed = lines.len() + reserved + shown.len() * 2;
    let wants: Vec<usize> = shown
        .iter()
        .map(|s| s.rows(doc).len().min(max_rows.unwrap_or(usize::MAX)))
        .collect();
    let empty = wants.iter().filter(|&&w| w == 0).count();
    let rows = share_rows(&wants, size.height.saturating_sub(fixed + empty));
    for (section, rows) in shown.iter().zip(rows) {
        lines.push(String::new());
        section.draw(doc, rows, size.width, &mut lines);
    }
    lines.truncate(size.height.saturating_sub(reserved));
    let mut out = String::new();
    for l in &lines {
        out.push_str(&truncate(l, size.width));
        out.push('\n');
    }
    out
}

/// `--interval`: `2s`, `500ms`, `1m`, or plain seconds.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    match number.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v * scale >= 0.1 && v * scale <= 3600.0 => {
            Ok(Duration::from_secs_f64(v * scale))
        }
        _ => Err(format!(
            "invalid interval {s:?}: use 100ms to 1h, like 2s, 500ms or 1m"
        )),
    }
}

/// Clears the terminal and homes the cursor (plain ANSI).
const CLEAR: &str = "\x1b[H\x1b[2J";

/// How `top` draws: every `interval`, or `once`; the screen size (`None`: the terminal's, or
/// 80×24); `max_rows` per table.
#[derive(Debug, Clone, Copy)]
pub struct TopOptions<'a> {
    /// PEM CA certificates an `https://` URL is checked against (default: the system's).
    pub tls_ca: Option<&'a Path>,
    /// The `Authorization` header for an endpoint with `basic_auth_users` ([`basic_credentials`]).
    pub authorization: Option<&'a str>,
    pub interval: Duration,
    pub once: bool,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub max_rows: Option<usize>,
}

/// `top`: with `once`, prints one screen (no escape codes) and returns its error if any;
/// otherwise redraws every `interval` until interrupted, showing errors in place of the tables.
pub fn run(url: &str, o: TopOptions<'_>) -> Result<(), TopError> {
    let target = split_url(url)?;
    let source = target.url();
    let tls = match target.tls {
        true => Some(tls_client(o.tls_ca)?),
        false => None,
    };
    let fetch = || fetch_from(target, tls.clone(), o.authorization);
    let mut stdout = io::stdout().lock();
    if o.once {
        let doc = fetch()?;
        let size = ScreenSize::of_stdout(o.width, o.height);
        let _ = stdout.write_all(render(&doc, &source, size, 0, o.max_rows).as_bytes());
        return Ok(());
    }
    let footer = format!("(every {:?}; Ctrl-C to quit)", o.interval);
    loop {
        // Read each time: the terminal may have been resized.
        let size = ScreenSize::of_stdout(o.width, o.height);
        // The footer takes the last line; no newline after it, which would scroll.
        let screen = match fetch() {
            Ok(doc) => render(&doc, &source, size, 1, o.max_rows),
            Err(e) => format!(
                "{}\n",
                truncate(&crate::metrics::ErrorChain(&e).to_string(), size.width)
            ),
        };
        let footer = truncate(&footer, size.width);
        let drawn = stdout
            .write_all(format!("{CLEAR}{screen}{footer}").as_bytes())
            .and_then(|()| stdout.flush());
        if drawn.is_err() {
            // The terminal or pipe is gone: nobody is watching.
            return Ok(());
        }
        std::thread::sleep(o.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
        "updated_at": "2026-12-06T11:12:13.000000000Z",
        "window_seconds": 300.0, "bucket_seconds": 30.0, "capacity": 100,
        "sessions": 200, "failed": 5, "failure_ratio": 0.025,
        "causes": {"upstream_timeout": 4, "upstream_error": 1},
        "identities": [
            {"identity": "coredns-5d78c9869d-x2v7q", "sessions": 200, "failed": 5, "error": 0,
             "failure_ratio": 0.025, "cause": "upstream_timeout",
             "causes": {"upstream_timeout": 4, "upstream_error": 1}, "qtypes": ["A", "AAAA"],
             "last_failed_at": "2026-12-06T11:12:09.000000000Z"}
        ],
        "qnames": [
            {"qname": "www.example.test.", "failed": 3, "error": 0, "cause": "upstream_timeout",
             "causes": {"upstream_timeout": 3}, "qtypes": ["AAAA"],
             "last_failed_at": "2026-12-06T11:12:09.000000000Z"},
            {"qname": "x.broken.test.", "failed": 7, "error": 5, "cause": "upstream_error",
             "causes": {"upstream_error": 1}, "qtypes": ["A"],
             "last_failed_at": "2026-12-06T11:10:00.000000000Z"}
        ],
        "clients": [
            {"client": "10.1.2.3", "failed": 5, "error": 0, "cause": "upstream_timeout",
             "causes": {"upstream_error": 1, "upstream_timeout": 4}}
        ],
        "upstreams": []
    }"#;

    const WIDE: ScreenSize = ScreenSize {
        width: 200,
        height: 100,
    };

    fn sample() -> Value {
        serde_json::from_str(SAMPLE).unwrap()
    }

    fn words(line: &str) -> Vec<&str> {
        line.split_whitespace().collect()
    }

    #[test]
    fn the_screen_shows_every_dimension_with_counts_causes_qtypes_and_times() {
        let screen = render(&sample(), "http://127.0.0.1:9435/top", WIDE, 0, None);
        let lines: Vec<&str> = screen.lines().collect();
        assert_eq!(
            lines[0],
            "http://127.0.0.1:9435/top  updated 11:12:13 UTC  window 300s"
        );
        assert_eq!(
            lines[1],
            "5 failed of 200 sessions (2.5%): upstream_timeout 4, upstream_error 1"
        );
        assert_eq!(lines[2], "");
        assert_eq!(
            words(lines[3]),
            ["IDENTITY", "FAILED", "SESSIONS", "RATIO", "CAUSE", "QTYPES", "LAST", "CAUSES"]
        );
        assert_eq!(
            words(lines[4]),
            [
                "coredns-5d78c9869d-x2v7q",
                "5",
                "200",
                "2.5%",
                "upstream_timeout",
                "A,AAAA",
                "11:12:09",
                "upstream_timeout",
                "4,",
                "upstream_error",
                "1"
            ]
        );
        let qname = lines.iter().position(|l| l.starts_with("QNAME")).unwrap();
        assert_eq!(
            words(lines[qname]),
            ["QNAME", "FAILED", "CAUSE", "QTYPES", "LAST", "CAUSES"]
        );
        assert_eq!(
            words(lines[qname + 1]),
            [
                "www.example.test.",
                "3",
                "upstream_timeout",
                "AAAA",
                "11:12:09",
                "upstream_timeout",
                "3"
            ]
        );
        // A count with a sketch error shows its range; the counts end in one column.
        let broken = lines[qname + 2];
        assert!(broken.starts_with("x.broken.test.") && broken.contains(" 2..7 "));
        let end = |l: &str, n: &str| l.find(n).unwrap() + n.len();
        assert_eq!(end(lines[qname + 1], " 3 "), end(broken, " 2..7 "));
        // A row of an older server, without qtypes or times.
        let client = lines.iter().find(|l| l.starts_with("10.1.2.3")).unwrap();
        assert_eq!(
            words(client)[..5],
            ["10.1.2.3", "5", "upstream_timeout", "-", "-"]
        );
        let up = lines
            .iter()
            .position(|l| l.starts_with("UPSTREAM"))
            .unwrap();
        assert_eq!(lines[up + 1], "(none)");
        // No workloads, no table of them.
        assert!(!screen.contains("NAMESPACE/POD"));
        assert_eq!(
            render(&sample(), "u", WIDE, 0, Some(1))
                .matches("x.broken.test.")
                .count(),
            0
        );
    }

    #[test]
    fn an_80_column_screen_cuts_lines_with_an_ellipsis_and_never_wraps() {
        let long = format!("{}.example.test.", "a".repeat(100));
        let mut doc = sample();
        doc["qnames"][0]["qname"] = long.clone().into();
        doc["causes"]["rejected_upstream_failing"] = 9.into();
        let size = ScreenSize {
            width: 80,
            height: 40,
        };
        let screen = render(&doc, "http://127.0.0.1:9435/top", size, 0, None);
        for line in screen.lines() {
            assert!(line.chars().count() <= 80, "{} > 80: {line}", line.len());
        }
        // The summary line and the CAUSES column are cut at the edge.
        let summary = screen.lines().nth(1).unwrap();
        assert_eq!(summary.chars().count(), 80);
        assert!(summary.ends_with('…'), "{summary}");
        // A long key keeps its right end (the zone), and the columns after it stay.
        let row = screen
            .lines()
            .find(|l| l.contains(".example.test."))
            .unwrap();
        let key = words(row)[0];
        assert!(key.ends_with("aaa.example.test."), "{row}");
        assert!(key.chars().count() >= MIN_KEY_WIDTH, "{row}");
        assert_eq!(words(row)[1..4], ["3", "upstream_timeout", "AAAA"]);
        // CAUSES gives way to a key that would be cut; a short key leaves it room.
        let header = |title: &str| screen.lines().find(|l| l.starts_with(title)).unwrap();
        assert!(!header("QNAME").contains("CAUSES"), "{screen}");
        assert!(header("CLIENT").ends_with("CAUSES"), "{screen}");
        // Nothing is cut where there is room.
        let wide = render(&doc, "u", WIDE, 0, None);
        assert!(wide.contains(&long) && !wide.contains('…'), "{wide}");
    }

    #[test]
    fn the_tables_share_the_height() {
        assert_eq!(share_rows(&[20, 20, 20], 12), [4, 4, 4]);
        // What a short table leaves goes to the long ones.
        assert_eq!(share_rows(&[1, 20, 20, 0], 12), [1, 6, 5, 0]);
        assert_eq!(share_rows(&[2, 3], 100), [2, 3]);
        assert_eq!(share_rows(&[5, 5], 0), [0, 0]);
        let row = |i: usize| serde_json::json!({"qname": format!("n{i}.test."), "failed": 1});
        let mut doc = sample();
        doc["qnames"] = (0..50).map(row).collect::<Vec<_>>().into();
        doc["clients"] = (0..50)
            .map(|i| serde_json::json!({"client": format!("10.0.0.{i}"), "failed": 1}))
            .collect::<Vec<_>>()
            .into();
        for height in [24, 40] {
            let size = ScreenSize { width: 80, height };
            let screen = render(&doc, "u", size, 1, None);
            assert_eq!(screen.lines().count(), height - 1, "{screen}");
            let qnames = screen.lines().filter(|l| l.starts_with('n')).count();
            let clients = screen.lines().filter(|l| l.starts_with("10.0.")).count();
            // 2 header lines, 4 tables of a blank line and a header, "(none)" of upstreams,
            // the identity's row: the rest is shared by the two long tables.
            let rest = height - 1 - 2 - 4 * 2 - 1 - 1;
            assert_eq!(qnames + clients, rest, "{screen}");
            assert!(qnames.abs_diff(clients) <= 1, "{screen}");
        }
        // --rows caps each table.
        let capped = render(&doc, "u", WIDE, 0, Some(3));
        assert_eq!(capped.lines().filter(|l| l.starts_with('n')).count(), 3);
        // A screen too small for all tables ends where the height does.
        let tiny = ScreenSize {
            width: 80,
            height: 5,
        };
        assert_eq!(render(&doc, "u", tiny, 0, None).lines().count(), 5);
    }

    #[test]
    fn hostile_keys_cannot_drive_the_terminal() {
        let doc = serde_json::json!({
            "failed": 2,
            "qnames": [{"qname": "evil\u{1b}[2J.test.", "failed": 1, "error": 0,
                        "qtypes": ["\u{1b}c"], "last_failed_at": "2026-12-06T1\u{7}:00:00Z"}]
        });
        let screen = render(&doc, "u", WIDE, 0, None);
        assert!(
            !screen.chars().any(|c| c.is_control() && c != '\n'),
            "{screen:?}"
        );
        assert!(screen.contains("evil?[2J.test."));
        // A sender names itself: wide, zero-width and bidi characters take one column each.
        let doc = serde_json::json!({
            "identities": [{"identity": "pod\u{202e}\u{200b}\u{4e2d}-1", "failed": 1, "sessions": 1}]
        });
        let screen = render(&doc, "u", WIDE, 0, None);
        assert!(screen.contains("\npod???-1 "), "{screen:?}");
    }

    #[test]
    fn responses_are_checked() {
        let ok =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(response_body(ok).unwrap(), b"{}");
        let no_length = b"HTTP/1.1 200 OK\r\n\r\n{}";
        assert_eq!(response_body(no_length).unwrap(), b"{}");
        let missing = b"HTTP/1.1 404 Not Found\r\n\r\n/top is not available\n";
        assert_eq!(
            response_body(missing).unwrap_err(),
            "status 404: /top is not available"
        );
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}";
        assert!(response_body(short).unwrap_err().contains("cut short"));
        assert!(response_body(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(response_body(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn urls_and_intervals() {
        let url = |u: &str| split_url(u).map(|t| t.url()).unwrap();
        assert_eq!(url("http://127.0.0.1:9435"), "http://127.0.0.1:9435/top");
        assert_eq!(url("127.0.0.1:9435"), "http://127.0.0.1:9435/top");
        assert_eq!(url("[::1]:9435/"), "http://[::1]:9435/top");
        assert_eq!(url("http://a:1/other"), "http://a:1/other");
        assert_eq!(url("a:1/other"), "http://a:1/other");
        assert_eq!(url("https://a:1"), "https://a:1/top");
        let name = |u: &str| {
            split_url(u)
                .unwrap()
                .server_name()
                .unwrap()
                .to_str()
                .into_owned()
        };
        assert_eq!(name("https://metrics.example:9435"), "metrics.example");
        assert_eq!(name("https://[::1]:9435"), "::1");
        assert_eq!(name("https://127.0.0.1:9435"), "127.0.0.1");
        assert!(split_url("ftp://a:1").is_err());
        assert!(split_url("").is_err());
        assert!(split_url("http:///top").is_err());
        assert_eq!(parse_interval("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_interval("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_interval("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_interval("1.5").unwrap(), Duration::from_millis(1500));
        for bad in ["0s", "-1", "fast", "2h", "NaN"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fetching_from_nothing_is_an_error_with_its_cause() {
        // A port just closed: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = fetch(&format!("http://127.0.0.1:{port}")).unwrap_err();
        assert!(matches!(e, TopError::Io { .. }), "{e:?}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
