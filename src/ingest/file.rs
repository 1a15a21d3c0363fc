//! `read FILE...`: Frame Streams files through the same path as connections. Files are read in
//! the order given as one stream per identity, so a capture split in parts joins up. A file may
//! hold several Frame Streams streams back to back (START…STOP, START…STOP): all are read.

use super::{ReadBuffer, Router, Shared, SourceCount, StreamEnd, StreamIngest};
use crate::metrics::Metrics;
use std::path::Path;

#[derive(Debug)]
pub struct FileError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Reads every file into the router. A file that cannot be opened or whose framing is broken
/// is reported; the files after it are still read. `counted` gets the per-source counts after
/// every read (the live metrics).
pub fn read_files(
    paths: &[impl AsRef<Path>],
    shared: &Shared,
    router: &mut Router,
    counted: &mut impl FnMut(&SourceCount),
) -> Vec<FileError> {
    let mut ingest = StreamIngest::new(shared.clone(), "file".into(), None);
    let mut errors = Vec::new();
    for path in paths {
        let path = path.as_ref();
        ingest.restart_framing();
        if let Err(message) = read_one(path, &mut ingest, router, &shared.metrics, counted) {
            errors.push(FileError {
                path: path.display().to_string(),
                message,
            });
        }
    }
    errors
}

fn read_one(
    path: &Path,
    ingest: &mut StreamIngest,
    router: &mut Router,
    metrics: &Metrics,
    counted: &mut impl FnMut(&SourceCount),
) -> Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut buf = ReadBuffer::new(1 << 20);
    // Files have no peer to answer: handshake replies are discarded.
    let mut replies = Vec::new();
    // A STOP ended the last stream and nothing of another one has come since.
    let mut between_streams = false;
    let mut looked_at_start = false;
    loop {
        let n = buf.read_from(&mut file).map_err(|e| e.to_string())?;
        if !looked_at_start && (buf.len() >= ESCAPE.len() || n == 0) {
            looked_at_start = true;
            if let Err(why) = frame_streams_start(buf.data()) {
                metrics.discard(
                    crate::metrics::Discard::BadStream,
                    u64::from(!buf.is_empty()),
                );
                return Err(why.into());
            }
        }
        let fed = feed_streams(ingest, &mut buf, router, &mut replies, &mut between_streams);
        ingest.take_source_counts(&mut *counted);
        router.flush();
        replies.clear();
        if let Err(e) = fed {
            ingest.finish(StreamEnd::Closed, 0, router);
            // Counted as for a connection: the rest of the file is not read.
            metrics.discard(e.drop_reason(), 1);
            return Err(e.to_string());
        }
        if n > 0 {
            continue;
        }
        if between_streams && buf.is_empty() && !ingest.is_established() {
            return Ok(());
        }
        ingest.finish(StreamEnd::Closed, buf.len(), router);
        return match buf.len() {
            0 => Ok(()),
            left => Err(format!(
                "ends inside a frame ({left} bytes left), without STOP"
            )),
        };
    }
}

/// What every Frame Streams file starts with: the escape of a control frame (START).
const ESCAPE: [u8; 4] = [0; 4];

/// Whether `head` (the first bytes of a file, at least 4 unless the file is shorter) can begin
/// a Frame Streams file. A text file would otherwise be read as a data frame of absurd length
/// ("exceeds --max-frame-size"), which invites raising a limit instead of fixing the input.
fn frame_streams_start(head: &[u8]) -> Result<(), &'static str> {
    match head {
        [] => Err(
            "empty file, not a Frame Streams capture (even an empty capture has START \
                   and STOP)",
        ),
        _ if !head.starts_with(&ESCAPE) => Err("not a Frame Streams file (dnstap capture): it \
                                                does not start with a control frame (START)"),
        _ => Ok(()),
    }
}

/// Feeds every complete frame in `buf`. A file may hold several captures back to back
/// (`cat a.fstrm b.fstrm`): after a STOP, the bytes that follow start a new stream with its
/// own handshake.
fn feed_streams(
    ingest: &mut StreamIngest,
    buf: &mut ReadBuffer,
    router: &mut Router,
    replies: &mut Vec<u8>,
    between_streams: &mut bool,
) -> Result<(), super::StreamError> {
    loop {
        if !ingest.feed(buf, router, replies)? {
            if !buf.is_empty() {
                *between_streams = false;
            }
            return Ok(());
        }
        ingest.finish(StreamEnd::Stopped, 0, router);
        ingest.restart_framing();
        *between_streams = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{QueueDepths, ShardInput};
    use crate::metrics::Discard;
    use std::path::PathBuf;
    use std::sync::atomic::AtomicU64;
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/coredns")
            .join(name)
    }

    /// What a file reader needs, with one shard whose queue the test reads.
    fn backend() -> (Shared, Router, crossbeam_channel::Receiver<ShardInput>) {
        let shared = Shared::for_tests(Default::default());
        let metrics = shared.metrics.clone();
        let (tx, rx) = crossbeam_channel::unbounded();
        let depths: QueueDepths = Arc::new([AtomicU64::new(0)]);
        (
            shared,
            Router::new(vec![tx], depths, 1 << 30, true, metrics),
            rx,
        )
    }

    /// Every event the files yield, in order, with its message bytes (batch offsets aside).
    fn events_of(paths: &[PathBuf]) -> Vec<String> {
        let (shared, mut router, rx) = backend();
        let errors = read_files(paths, &shared, &mut router, &mut |_| {});
        assert!(errors.is_empty(), "{paths:?}: {errors:?}");
        drop(router);
        let mut out = Vec::new();
        for batch in rx.iter().filter_map(ShardInput::into_batch) {
            for mut ev in batch.events.iter().cloned() {
                let message = batch.message(&ev).message.to_vec();
                ev.message = Default::default();
                ev.stream = Default::default();
                out.push(format!("{ev:?} {message:?}"));
            }
        }
        out
    }

    #[test]
    fn captures_back_to_back_in_one_file_read_like_two_files() {
        let parts = [fixture("b_forward.fstrm"), fixture("d_nxdomain.fstrm")];
        let mut joined = Vec::new();
        for p in &parts {
            joined.extend(std::fs::read(p).unwrap());
        }
        let cat = std::env::temp_dir().join(format!(
            "dnstap-analyser-{}-b_then_d.fstrm",
            std::process::id()
        ));
        std::fs::write(&cat, joined).unwrap();
        let from_cat = events_of(std::slice::from_ref(&cat));
        let _ = std::fs::remove_file(&cat);
        let first_alone = events_of(&parts[..1]);
        assert!(!first_alone.is_empty());
        let from_parts = events_of(&parts);
        assert!(from_parts.len() > first_alone.len());
        assert_eq!(from_cat, from_parts);
    }

    #[test]
    fn a_frame_cut_short_after_stop_is_reported() {
        let mut bytes = std::fs::read(fixture("b_forward.fstrm")).unwrap();
        bytes.extend_from_slice(&[0, 0, 0, 5, b'x']);
        let (_, errors) = read_bytes("trailing", &bytes);
        assert_eq!(errors.len(), 1, "{errors:?}");
    }

    /// Reads `bytes` as a file of their own; the metrics and the file errors.
    fn read_bytes(tag: &str, bytes: &[u8]) -> (Shared, Vec<FileError>) {
        let path = std::env::temp_dir().join(format!(
            "dnstap-analyser-{}-{tag}.fstrm",
            std::process::id()
        ));
        std::fs::write(&path, bytes).unwrap();
        let (shared, mut router, _rx) = backend();
        let errors = read_files(
            std::slice::from_ref(&path),
            &shared,
            &mut router,
            &mut |_| {},
        );
        let _ = std::fs::remove_file(&path);
        (shared, errors)
    }

    #[test]
    fn a_data_frame_before_start_is_a_bad_stream_not_a_frame() {
        // A 2-byte data frame where READY or START belongs (fuzz/regressions/pipeline/).
        let (shared, errors) = read_bytes("data_before_start", &[0, 0, 0, 2, 0x0a, 0]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let m = &shared.metrics;
        assert_eq!(m.frames.load(Relaxed), 0, "no frame was delivered as data");
        assert_eq!(
            m.discarded(Discard::BadStream),
            1,
            "the stream error is counted"
        );
    }

    #[test]
    fn a_text_file_is_not_frame_streams() {
        let (shared, errors) = read_bytes("passwd", b"root:x:0:0:root:/root:/bin/bash\n");
        assert_eq!(errors.len(), 1, "{errors:?}");
        let said = errors[0].to_string();
        assert!(said.contains("not a Frame Streams file"), "{said}");
        assert!(!said.contains("max-frame-size"), "{said}");
        assert_eq!(shared.metrics.discarded(Discard::BadStream), 1);
    }

    #[test]
    fn an_empty_file_is_an_error_and_start_stop_alone_is_not() {
        let (shared, errors) = read_bytes("empty", b"");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].message.contains("empty file"), "{errors:?}");
        assert_eq!(
            shared.metrics.discarded(Discard::BadStream),
            0,
            "nothing dropped"
        );
        // Unidirectional START (content type dnstap) and STOP: a capture of no messages.
        let ct = b"protobuf:dnstap.Dnstap";
        let mut start_stop = vec![0, 0, 0, 0, 0, 0, 0, 12 + ct.len() as u8, 0, 0, 0, 2];
        start_stop.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, ct.len() as u8]);
        start_stop.extend_from_slice(ct);
        start_stop.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 3]);
        let (_, errors) = read_bytes("start_stop", &start_stop);
        assert!(errors.is_empty(), "{errors:?}");
    }
}
