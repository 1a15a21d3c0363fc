//! The metrics endpoint in process: real sockets on 127.0.0.1, plain TcpStream clients.

mod support;

use dnstap_analyser::correlate::{BitMap, Status, Verdict};
use dnstap_analyser::diagnosis::Diagnosis;
use dnstap_analyser::dnstap::{Role, SourceRegistry};
use dnstap_analyser::metrics::http::MetricsServer;
use dnstap_analyser::metrics::model::{Telemetry, TelemetryConfig, ThreadKind};
use dnstap_analyser::metrics::Metrics;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bounds every read, so a server that wrongly blocks fails the test instead of hanging it.
const GUARD: Duration = Duration::from_secs(20);

fn telemetry(stall_after: Duration) -> Arc<Telemetry> {
    let sources = Arc::new(SourceRegistry::default());
    let t = Arc::new(Telemetry::new(
        Arc::new(Metrics::default()),
        sources.clone(),
        TelemetryConfig {
            stall_after,
            ..Default::default()
        },
    ));
    let id = sources.intern(b"coredns-0", b"1.11.1");
    let mut stats = t.thread_stats(ThreadKind::Shard(0));
    let ok = Verdict {
        status: Status::Succeeded,
        bitmap: BitMap(3),
        loss: None,
        incomplete: None,
    };
    stats.record_session(&Diagnosis::from_parts(id, ok, Some(150_000), &[]));
    stats.count_messages(id, Role::ClientQuery, 1);
    stats.count_messages(id, Role::ClientResponse, 1);
    stats.publish();
    t
}

fn start(t: &Arc<Telemetry>) -> MetricsServer {
    MetricsServer::start("127.0.0.1:0".parse().unwrap(), None, t.clone()).expect("start")
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(GUARD)).unwrap();
    s
}

/// Sends `request` as is and reads the response to the end (the server closes).
fn exchange(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut s = connect(addr);
    s.write_all(request).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("response before the guard");
    let raw = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

fn get(addr: SocketAddr, path: &str) -> Reply {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
    )
}

#[test]
fn metrics_default_to_prometheus_text_and_openmetrics_when_asked() {
    let t = telemetry(Duration::from_secs(30));
    let server = start(&t);
    let r = get(server.local_addr(), "/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(r.header("content-length"), Some(&*r.body.len().to_string()));
    assert!(r
        .body
        .contains("# TYPE dnstap_analyser_sessions_total counter\n"));
    assert!(r.body.contains(
        "dnstap_analyser_sessions_total{identity=\"coredns-0\",namespace=\"none\",status=\"Succeeded\",bitmap=\"3\",cause=\"local_answer\",rcode=\"none\",qtype=\"other\"} 1\n"
    ));
    assert!(!r.body.contains("# EOF"));

    let om = exchange(
        server.local_addr(),
        b"GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n",
    );
    assert_eq!(om.status, 200);
    assert_eq!(
        om.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.body.ends_with("# EOF\n"));

    let head = exchange(
        server.local_addr(),
        b"HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    let announced: usize = head.header("content-length").unwrap().parse().unwrap();
    assert!(announced > 1000);
    server.stop();
}

#[test]
fn health_readiness_top_and_errors() {
    // A stall limit of zero: any busy stage that has not beaten since is stuck.
    let t = telemetry(Duration::ZERO);
    let server = start(&t);
    let addr = server.local_addr();

    assert_eq!(get(addr, "/healthz").status, 200);
    let shard = t.health.stage("shard-3", None);
    shard.beat(Instant::now(), true);
    std::thread::sleep(Duration::from_millis(5));
    let r = get(addr, "/healthz");
    assert_eq!(r.status, 503);
    assert!(r.body.contains("shard-3"), "{}", r.body);
    shard.beat(Instant::now(), false);
    assert_eq!(get(addr, "/healthz").status, 200);

    let r = get(addr, "/readyz");
    assert_eq!((r.status, r.body.contains("starting")), (503, true));
    t.health.set_listening();
    assert_eq!(get(addr, "/readyz").status, 200);
    t.health.set_draining();
    let r = get(addr, "/readyz");
    assert_eq!((r.status, r.body.contains("draining")), (503, true));

    assert_eq!(get(addr, "/top").status, 404);
    t.set_top(Arc::new(|| "{\"top\":[]}".to_string()));
    let r = get(addr, "/top");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.body, "{\"top\":[]}");

    assert_eq!(get(addr, "/nope").status, 404);
    assert_eq!(get(addr, "/metrics?x=1").status, 200);
    let post = exchange(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    server.stop();
}

#[test]
fn slow_and_garbage_clients_do_not_block_a_scrape() {
    let t = telemetry(Duration::from_secs(30));
    let server = start(&t);
    let addr = server.local_addr();

    // Half a request, then silence.
    let mut slow = connect(addr);
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: sl")
        .unwrap();
    // Connected, nothing sent.
    let _mute = connect(addr);
    // Garbage: answered 400 and closed.
    let garbage = exchange(
        addr,
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n",
    );
    assert_eq!(garbage.status, 400);
    // An endless header line: cut off at the size limit.
    let mut long = b"GET /metrics HTTP/1.1\r\nX-Long: ".to_vec();
    long.resize(20_000, b'a');
    assert_eq!(exchange(addr, &long).status, 431);

    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200);
    assert!(r.body.contains("dnstap_analyser_build_info"));

    // More idle connections than the server keeps: the oldest are evicted, scrapes go on.
    let idle: Vec<TcpStream> = (0..80).map(|_| connect(addr)).collect();
    assert_eq!(get(addr, "/metrics").status, 200);
    drop(idle);

    // The first half request was evicted by the flood; a new one is closed by the server at
    // its request deadline, without a response.
    let mut late = connect(addr);
    late.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    assert_closed_without_response(&mut slow);
    assert_closed_without_response(&mut late);
    server.stop();
}

fn assert_closed_without_response(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    // A signal to the test process interrupts a read with a timeout: read again.
    let read = loop {
        match s.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            read => break read,
        }
    };
    match read {
        Ok(0) => {}
        Ok(n) => panic!("unexpected {n} bytes for a half request"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let t = telemetry(Duration::from_secs(30));
    let server = start(&t);
    let taken = server.local_addr();
    let err = MetricsServer::start(taken, None, t.clone())
        .err()
        .expect("port in use");
    let msg = err.to_string();
    assert!(msg.contains(&taken.to_string()), "{msg}");
    assert!(std::error::Error::source(&err).is_some());
    server.stop();
}

/// `promtool check metrics` (from Debian's `prometheus` package) on a real scrape.
#[test]
fn promtool_accepts_a_scrape() {
    let t = telemetry(Duration::from_secs(30));
    let server = start(&t);
    let body = get(server.local_addr(), "/metrics").body;
    server.stop();
    if let Err(report) = support::promtool_check_metrics(&body) {
        panic!("promtool check metrics failed:\n{report}");
    }
}
