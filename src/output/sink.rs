//! Where rendered lines go. The writer thread hands each batch of whole lines to one `Sink`;
//! the sink says whether it wants more, and its errors flow back to the writer, which ends
//! the output and halts the pipeline (modelled on ripgrep's searcher/printer `Sink`). A new
//! destination (a file, a socket) is one more `Sink`; the pipeline wiring does not change.

use std::io::{self, Write};

/// What a sink wants after a write: more lines, or none ever again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The consumer went away on purpose (stdout's reader closed the pipe, as `| head`
    /// does): the output ends, the analysis goes on and the exit is still clean.
    End,
}

/// A destination for session lines, owned by the writer thread.
///
/// Errors are failures (a full disk, a closed descriptor): the writer reports them and the
/// process stops with a non-zero exit. A sink that can end normally says so with `Flow::End`.
pub trait Sink: Send {
    /// Names the destination in error messages: "stdout", "file /var/log/sessions".
    fn name(&self) -> &str;

    /// Takes a batch of whole lines, each ending in `\n`. It may buffer them.
    fn write_lines(&mut self, lines: &[u8]) -> io::Result<Flow>;

    /// Pushes buffered lines out. Called whenever the writer has caught up with the shards,
    /// so lines show promptly at low rates while bursts still go out in large writes.
    fn flush(&mut self) -> io::Result<Flow>;

    /// The last call: flushes and releases the destination.
    fn close(&mut self) -> io::Result<()>;
}

impl<S: Sink + ?Sized> Sink for Box<S> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn write_lines(&mut self, lines: &[u8]) -> io::Result<Flow> {
        (**self).write_lines(lines)
    }

    fn flush(&mut self) -> io::Result<Flow> {
        (**self).flush()
    }

    fn close(&mut self) -> io::Result<()> {
        (**self).close()
    }
}

/// Any `io::Write` as a sink, behind a 1 MiB buffer. A broken pipe ends the output
/// (`Flow::End`); every other error is a failure.
pub struct WriteSink<W: Write> {
    name: String,
    out: io::BufWriter<W>,
}

impl WriteSink<io::Stdout> {
    pub fn stdout() -> Self {
        Self::new("stdout", io::stdout())
    }
}

impl<W: Write> WriteSink<W> {
    pub fn new(name: impl Into<String>, out: W) -> Self {
        Self {
            name: name.into(),
            out: io::BufWriter::with_capacity(1 << 20, out),
        }
    }
}

/// A closed pipe is the reader's way of saying it has seen enough.
fn flow(result: io::Result<()>) -> io::Result<Flow> {
    match result {
        Ok(()) => Ok(Flow::Continue),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Flow::End),
        Err(e) => Err(e),
    }
}

impl<W: Write + Send> Sink for WriteSink<W> {
    fn name(&self) -> &str {
        &self.name
    }

    fn write_lines(&mut self, lines: &[u8]) -> io::Result<Flow> {
        flow(self.out.write_all(lines))
    }

    fn flush(&mut self) -> io::Result<Flow> {
        flow(self.out.flush())
    }

    fn close(&mut self) -> io::Result<()> {
        self.flush().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts `room` bytes, then fails every write with `kind`.
    struct Limited {
        room: usize,
        kind: io::ErrorKind,
    }

    impl Write for Limited {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::from(self.kind));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_broken_pipe_ends_the_output() {
        let kind = io::ErrorKind::BrokenPipe;
        let mut sink = WriteSink::new("pipe", Limited { room: 3, kind });
        assert_eq!(sink.write_lines(b"a\n").unwrap(), Flow::Continue);
        assert_eq!(sink.write_lines(b"bb\n").unwrap(), Flow::Continue);
        assert_eq!(sink.flush().unwrap(), Flow::End);
        sink.close().unwrap();
    }

    #[test]
    fn other_write_errors_are_failures() {
        let kind = io::ErrorKind::StorageFull;
        let mut sink = WriteSink::new("disk", Limited { room: 0, kind });
        sink.write_lines(b"line\n").unwrap();
        assert_eq!(sink.flush().unwrap_err().kind(), kind);
        assert_eq!(sink.close().unwrap_err().kind(), kind);
    }
}
