//! Target 4: a Frame Streams file's bytes through the whole `read` pipeline
//! (`pipeline::read_files` on a temporary file, two shards, JSON output).
//!
//! Properties: no panic, no hang; every output line is a JSON object; one line per session
//! (`--log all`); every dnstap payload the receiver delivers is counted exactly once, either
//! as a message or under one of the per-message drop reasons; the summary's `frames` equals
//! the payloads delivered; a stream that breaks is counted once (`bad_stream` or
//! `content_type`); the sessions' lines show every counted message (`messages` entries plus
//! `messages_not_kept`). The last three were findings 1-3 (docs/fuzzing.md).

use bytes::BytesMut;
use dnstap_analyser::correlate;
use dnstap_analyser::framestream::{FrameDecoder, ReceiverStream, Step};
use dnstap_analyser::metrics::{Discard, Metrics};
use dnstap_analyser::output::{Flow, Format, LineOptions, LogFilter, Messages, SampleRate, Sink};
use dnstap_analyser::pipeline::{self, Settings};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

const MAX_FRAME_SIZE: usize = 4096;

/// Drops that account for one delivered payload each.
const PER_MESSAGE: [Discard; 6] = [
    Discard::QueueFull,
    Discard::Protobuf,
    Discard::NoMessage,
    Discard::UnsupportedMessageType,
    Discard::DnsUndecodable,
    Discard::UpstreamWithoutWire,
];

/// The writer thread's sink: a buffer the check reads afterwards.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Sink for Captured {
    fn name(&self) -> &str {
        "memory"
    }
    fn write_lines(&mut self, lines: &[u8]) -> std::io::Result<Flow> {
        self.0.lock().unwrap().extend_from_slice(lines);
        Ok(Flow::Continue)
    }
    fn flush(&mut self) -> std::io::Result<Flow> {
        Ok(Flow::Continue)
    }
    fn close(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn settings() -> Settings {
    Settings {
        readers: 1,
        shards: 2,
        queue_capacity: 64,
        pin: false,
        correlate: correlate::Config {
            idle_flush: false,
            ..Default::default()
        },
        max_connections: 1,
        max_frame_size: MAX_FRAME_SIZE,
        log: LogFilter::ALL,
        // Every session printed with all its messages: the checks count lines and messages.
        lines: LineOptions {
            sample_succeeded: SampleRate::ALL,
            messages: Messages::All,
        },
        format: Format::Json,
        ..Settings::default()
    }
}

pub fn check(data: &[u8]) {
    let path =
        std::env::temp_dir().join(format!("dnstap-fuzz-pipeline-{}.fstrm", std::process::id()));
    std::fs::write(&path, data).expect("write the temporary capture");
    let metrics = Arc::new(Metrics::default());
    let out = Captured::default();
    let errors = pipeline::read_files(
        &settings(),
        std::slice::from_ref(&path),
        out.clone(),
        metrics.clone(),
    )
    .expect("read_files");
    let _ = std::fs::remove_file(&path);
    for e in &errors {
        let _ = e.to_string();
    }

    let out = out.0.lock().unwrap();
    let mut lines = 0u64;
    let mut shown = 0u64;
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(line)));
        assert!(v.is_object(), "line is not an object");
        // Lookup lines (the sessions' lookups) come besides; they carry no messages.
        if v["kind"] == "lookup" {
            continue;
        }
        shown += v["messages"].as_array().expect("messages array").len() as u64
            + v.get("messages_not_kept")
                .and_then(|n| n.as_u64())
                .unwrap_or(0);
        lines += 1;
    }
    assert!(
        out.is_empty() || out.ends_with(b"\n"),
        "last line unterminated"
    );
    assert_eq!(
        lines,
        metrics.sessions.load(Relaxed),
        "one line per session"
    );
    assert_eq!(lines, metrics.sessions_printed.load(Relaxed));

    let delivered = Delivery::of(data);
    let summary = metrics.summary_json();
    let messages = metrics.messages.load(Relaxed);
    let dropped: u64 = PER_MESSAGE.iter().map(|&d| metrics.discarded(d)).sum();
    assert_eq!(
        messages + dropped,
        delivered.payloads,
        "payloads neither counted as messages nor dropped: {summary}"
    );
    assert_eq!(
        metrics.frames.load(Relaxed),
        delivered.payloads,
        "summary frames != data frames delivered: {summary}"
    );
    assert_eq!(
        metrics.discarded(Discard::BadStream) + metrics.discarded(Discard::ContentType),
        u64::from(delivered.broken),
        "stream errors counted: {summary}"
    );
    assert_eq!(shown, messages, "messages missing from the lines");
}

/// What a Frame Streams file reader hands on: the dnstap payloads (data frames after START),
/// up to the first framing or protocol error, which ends the file. After a STOP the bytes that
/// follow start a new stream with its own handshake (`cat a.fstrm b.fstrm`).
struct Delivery {
    payloads: u64,
    /// The file ended on a framing or protocol error.
    broken: bool,
}

impl Delivery {
    fn of(data: &[u8]) -> Self {
        // The file reader refuses, as one broken stream, a file that does not open with the
        // escape of a control frame (START): text is not read as a frame of absurd length.
        if !data.is_empty() && !data.starts_with(&[0; 4]) {
            return Self {
                payloads: 0,
                broken: true,
            };
        }
        let decoder = FrameDecoder::new(MAX_FRAME_SIZE);
        let mut rx = ReceiverStream::new();
        let mut buf = BytesMut::from(data);
        let mut payloads = 0;
        loop {
            let frame = match decoder.decode(&mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    return Self {
                        payloads,
                        broken: false,
                    }
                }
                Err(_) => {
                    return Self {
                        payloads,
                        broken: true,
                    }
                }
            };
            match rx.on_frame(frame) {
                Ok(Step::Data(_)) => payloads += 1,
                Ok(Step::Finished(_)) => rx = ReceiverStream::new(),
                Ok(_) => {}
                Err(_) => {
                    return Self {
                        payloads,
                        broken: true,
                    }
                }
            }
        }
    }
}
