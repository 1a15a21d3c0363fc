//! The single thread that owns the output: shards hand it batches of rendered lines, it
//! hands them to the `Sink`. It returns as soon as the sink ends or fails; that drops the
//! batch receiver, so a shard waiting on the full channel wakes up with an error instead of
//! blocking forever, and stops rendering.

use super::sink::{Flow, Sink};
use crossbeam_channel::Receiver;
use std::io;

/// Lines are batched per shard up to this many bytes before they are handed over.
pub const BATCH_BYTES: usize = 256 * 1024;

/// A sink failed: the output is lost from here on.
#[derive(Debug)]
pub struct OutputError {
    pub sink: String,
    pub source: io::Error,
}

impl std::fmt::Display for OutputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot write sessions to {}: {}", self.sink, self.source)
    }
}

impl std::error::Error for OutputError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Writes every batch to `sink` until all senders are gone or the sink ends, then closes it.
/// `beat(busy)` stamps the writer's heartbeat: busy before a batch goes to the sink, idle once
/// it is written, so a sink that blocks (a pipe nobody reads) shows as a stuck writer.
pub fn run(
    batches: Receiver<Vec<u8>>,
    mut sink: impl Sink,
    beat: impl Fn(bool),
) -> Result<(), OutputError> {
    for batch in batches.iter() {
        beat(true);
        let mut flow = sink.write_lines(&batch).map_err(|e| fail(&sink, e))?;
        if flow == Flow::Continue && batches.is_empty() {
            flow = sink.flush().map_err(|e| fail(&sink, e))?;
        }
        beat(false);
        if flow == Flow::End {
            break;
        }
    }
    sink.close().map_err(|e| fail(&sink, e))
}

fn fail(sink: &impl Sink, source: io::Error) -> OutputError {
    OutputError {
        sink: sink.name().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records what reaches it; fails or ends after `limit` writes.
    #[derive(Default)]
    struct Probe {
        log: Arc<Mutex<Vec<String>>>,
        limit: Option<(usize, Option<io::ErrorKind>)>,
    }

    impl Sink for Probe {
        fn name(&self) -> &str {
            "probe"
        }

        fn write_lines(&mut self, lines: &[u8]) -> io::Result<Flow> {
            let mut log = self.log.lock().unwrap();
            log.push(String::from_utf8_lossy(lines).into_owned());
            match self.limit {
                Some((n, Some(kind))) if log.len() >= n => Err(kind.into()),
                Some((n, None)) if log.len() >= n => Ok(Flow::End),
                _ => Ok(Flow::Continue),
            }
        }

        fn flush(&mut self) -> io::Result<Flow> {
            self.log.lock().unwrap().push("flush".into());
            Ok(Flow::Continue)
        }

        fn close(&mut self) -> io::Result<()> {
            self.log.lock().unwrap().push("close".into());
            Ok(())
        }
    }

    fn feed(batches: &[&str]) -> Receiver<Vec<u8>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        for b in batches {
            tx.send(b.as_bytes().to_vec()).unwrap();
        }
        rx
    }

    #[test]
    fn flushes_when_caught_up_and_closes_at_the_end() {
        let probe = Probe::default();
        let log = probe.log.clone();
        run(feed(&["a\n", "b\n"]), probe, |_| {}).unwrap();
        assert_eq!(*log.lock().unwrap(), ["a\n", "b\n", "flush", "close"]);
    }

    #[test]
    fn a_failing_sink_stops_the_writer_with_its_error() {
        let probe = Probe {
            limit: Some((1, Some(io::ErrorKind::WriteZero))),
            ..Probe::default()
        };
        let log = probe.log.clone();
        let err = run(feed(&["a\n", "b\n"]), probe, |_| {}).unwrap_err();
        assert_eq!(err.source.kind(), io::ErrorKind::WriteZero);
        assert!(err
            .to_string()
            .starts_with("cannot write sessions to probe: "));
        assert_eq!(*log.lock().unwrap(), ["a\n"]);
    }

    #[test]
    fn an_ended_sink_gets_nothing_more() {
        let probe = Probe {
            limit: Some((1, None)),
            ..Probe::default()
        };
        let log = probe.log.clone();
        run(feed(&["a\n", "b\n"]), probe, |_| {}).unwrap();
        assert_eq!(*log.lock().unwrap(), ["a\n", "close"]);
    }
}
