//! `dnstap-analyser top`: polls a running analyser's `/top` and draws the failing qnames,
//! clients and upstreams as a terminal table — the `kubectl top` of DNS failures.
//!
//! The request is one plain HTTP/1.1 GET over a `TcpStream` (the endpoint closes every
//! connection after its response), the response head is parsed by `httparse`, the body by
//! `serde_json`. Rendering is a pure function of the document, so it is tested from a sample.

use serde_json::Value;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Connecting, sending and reading each give up after this long.
const NET_TIMEOUT: Duration = Duration::from_secs(5);
/// A `/top` document is a few KB; more than this is not one.
const MAX_RESPONSE_BYTES: u64 = 4 << 20;
/// Keys longer than this are cut on the left for the table (the zone stays visible).
const MAX_KEY_WIDTH: usize = 60;

/// Why a poll of `/top` failed.
#[derive(Debug)]
pub enum TopError {
    /// Not an `http://HOST:PORT[/PATH]` URL.
    Url(String),
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
            Self::Url(u) => write!(f, "not an http://HOST:PORT URL: {u:?}"),
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
            Self::Url(_) | Self::Response { .. } => None,
        }
    }
}

/// `http://HOST:PORT[/PATH]` → (`HOST:PORT`, path); the path defaults to `/top`.
fn split_url(url: &str) -> Result<(&str, &str), TopError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| TopError::Url(url.into()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains(char::is_whitespace) {
        return Err(TopError::Url(url.into()));
    }
    let path = if path == "/" { "/top" } else { path };
    Ok((authority, path))
}

/// GETs `url` (its path, or `/top`) and parses the JSON document.
pub fn fetch(url: &str) -> Result<Value, TopError> {
    let (authority, path) = split_url(url)?;
    let full = format!("http://{authority}{path}");
    let io_err = |source| TopError::Io {
        url: full.clone(),
        source,
    };
    let addr = authority
        .to_socket_addrs()
        .map_err(io_err)?
        .next()
        .ok_or_else(|| TopError::Url(url.into()))?;
    let mut stream = TcpStream::connect_timeout(&addr, NET_TIMEOUT).map_err(io_err)?;
    stream.set_read_timeout(Some(NET_TIMEOUT)).map_err(io_err)?;
    stream
        .set_write_timeout(Some(NET_TIMEOUT))
        .map_err(io_err)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(io_err)?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut raw)
        .map_err(io_err)?;
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

/// Replaces control characters, so that whatever a server returns cannot drive the terminal.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Cuts `key` to `MAX_KEY_WIDTH` characters, keeping its right end.
fn fit(key: &str) -> String {
    let key = sanitize(key);
    let n = key.chars().count();
    if n <= MAX_KEY_WIDTH {
        return key;
    }
    let tail: String = key.chars().skip(n - (MAX_KEY_WIDTH - 3)).collect();
    format!("...{tail}")
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

/// One table: the `rows` first entries of `doc[list]`, keyed by `doc[list][i][key]`.
fn table(out: &mut String, doc: &Value, list: &str, key: &str, title: &str, rows: usize) {
    let entries: Vec<(String, String, String, String)> = doc[list]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .take(rows)
        .map(|r| {
            (
                fit(r[key].as_str().unwrap_or("-")),
                count_text(r),
                sanitize(r["cause"].as_str().unwrap_or("-")),
                causes_text(&r["causes"]),
            )
        })
        .collect();
    let width = entries
        .iter()
        .map(|e| e.0.chars().count())
        .chain([title.len()])
        .max()
        .unwrap_or(0);
    let count_width = entries
        .iter()
        .map(|e| e.1.len())
        .chain([6])
        .max()
        .unwrap_or(6);
    let cause_width = entries
        .iter()
        .map(|e| e.2.len())
        .chain([15])
        .max()
        .unwrap_or(15);
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "{title:<width$}  {:>count_width$}  {:<cause_width$}  CAUSES",
        "FAILED", "CAUSE"
    );
    if entries.is_empty() {
        out.push_str("(none)\n");
    }
    for (k, n, c, all) in &entries {
        let line = format!("{k:<width$}  {n:>count_width$}  {c:<cause_width$}  {all}");
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// The whole screen for one `/top` document fetched from `source`.
pub fn render(doc: &Value, source: &str, rows: usize) -> String {
    let window = doc["window_seconds"].as_f64().unwrap_or(0.0);
    let failed = doc["failed"].as_u64().unwrap_or(0);
    let causes = causes_text(&doc["causes"]);
    let mut out = format!(
        "{}: {failed} failed sessions in the last {window}s",
        sanitize(source)
    );
    if !causes.is_empty() {
        out.push_str(&format!(" ({causes})"));
    }
    out.push_str("\n\n");
    table(&mut out, doc, "qnames", "qname", "QNAME", rows);
    out.push('\n');
    table(&mut out, doc, "clients", "client", "CLIENT", rows);
    out.push('\n');
    table(&mut out, doc, "upstreams", "upstream", "UPSTREAM", rows);
    // Only senders that say which workload asked (CoreDNS's `extra`) fill this one.
    if doc["workloads"].as_array().is_some_and(|w| !w.is_empty()) {
        out.push('\n');
        table(&mut out, doc, "workloads", "workload", "WORKLOAD", rows);
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

/// `top`: with `once`, prints one table (no escape codes) and returns its error if any;
/// otherwise redraws every `interval` until interrupted, showing errors in place of the table.
pub fn run(url: &str, interval: Duration, once: bool, rows: usize) -> Result<(), TopError> {
    split_url(url)?;
    let mut stdout = io::stdout().lock();
    if once {
        let doc = fetch(url)?;
        let _ = stdout.write_all(render(&doc, url, rows).as_bytes());
        return Ok(());
    }
    loop {
        let screen = match fetch(url) {
            Ok(doc) => render(&doc, url, rows),
            Err(e) => format!("{}\n", crate::metrics::ErrorChain(&e)),
        };
        let footer = format!("\n(every {:?}; Ctrl-C to quit)\n", interval);
        let drawn = stdout
            .write_all(format!("{CLEAR}{screen}{footer}").as_bytes())
            .and_then(|()| stdout.flush());
        if drawn.is_err() {
            // The terminal or pipe is gone: nobody is watching.
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
        "window_seconds": 300.0, "bucket_seconds": 30.0, "capacity": 100,
        "failed": 5, "causes": {"upstream_timeout": 4, "upstream_error": 1},
        "qnames": [
            {"qname": "www.example.test.", "failed": 3, "error": 0, "cause": "upstream_timeout",
             "causes": {"upstream_timeout": 3}},
            {"qname": "x.broken.test.", "failed": 7, "error": 5, "cause": "upstream_error",
             "causes": {"upstream_error": 1}}
        ],
        "clients": [
            {"client": "10.1.2.3", "failed": 5, "error": 0, "cause": "upstream_timeout",
             "causes": {"upstream_error": 1, "upstream_timeout": 4}}
        ],
        "upstreams": []
    }"#;

    #[test]
    fn the_table_shows_every_dimension_with_counts_and_causes() {
        let doc: Value = serde_json::from_str(SAMPLE).unwrap();
        let screen = render(&doc, "http://127.0.0.1:9435", 10);
        let lines: Vec<&str> = screen.lines().collect();
        assert_eq!(
            lines[0],
            "http://127.0.0.1:9435: 5 failed sessions in the last 300s \
             (upstream_timeout 4, upstream_error 1)"
        );
        assert_eq!(lines[1], "");
        assert!(lines[2].starts_with("QNAME ") && lines[2].contains("FAILED"));
        let www: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            www,
            [
                "www.example.test.",
                "3",
                "upstream_timeout",
                "upstream_timeout",
                "3"
            ]
        );
        // A count with a sketch error shows its range.
        assert!(lines[4].starts_with("x.broken.test.") && lines[4].contains(" 2..7 "));
        let client = lines.iter().find(|l| l.starts_with("10.1.2.3")).unwrap();
        assert!(
            client.ends_with("upstream_timeout 4, upstream_error 1"),
            "{client}"
        );
        let up = lines
            .iter()
            .position(|l| l.starts_with("UPSTREAM"))
            .unwrap();
        assert_eq!(lines[up + 1], "(none)");
        // Columns line up: the counts end in the same column.
        let end = |l: &str, n: &str| l.find(n).unwrap() + n.len();
        assert_eq!(end(lines[3], " 3 "), end(lines[4], " 2..7 "));
        assert_eq!(render(&doc, "u", 1).matches("x.broken.test.").count(), 0);
    }

    #[test]
    fn hostile_keys_cannot_drive_the_terminal_and_long_ones_keep_their_end() {
        let long = format!("{}.example.test.", "a".repeat(100));
        let doc = serde_json::json!({
            "failed": 2,
            "qnames": [
                {"qname": "evil\u{1b}[2J.test.", "failed": 1, "error": 0},
                {"qname": long, "failed": 1, "error": 0}
            ]
        });
        let screen = render(&doc, "u", 10);
        assert!(!screen.contains('\u{1b}'));
        assert!(screen.contains("evil?[2J.test."));
        let cut = screen.lines().find(|l| l.starts_with("...")).unwrap();
        assert!(cut
            .split_whitespace()
            .next()
            .unwrap()
            .ends_with("a.example.test."));
        assert_eq!(cut.split_whitespace().next().unwrap().len(), MAX_KEY_WIDTH);
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
        assert_eq!(
            split_url("http://127.0.0.1:9435").unwrap(),
            ("127.0.0.1:9435", "/top")
        );
        assert_eq!(split_url("http://a:1/other").unwrap(), ("a:1", "/other"));
        assert!(split_url("https://a:1").is_err());
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
