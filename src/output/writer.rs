//! The single thread that owns stdout: shards hand it batches of rendered lines.

use crossbeam_channel::Receiver;
use std::io::{self, Write};
use std::thread::JoinHandle;

/// Lines are batched per shard up to this many bytes before they are handed over.
pub const BATCH_BYTES: usize = 256 * 1024;

/// Writes every batch to `out` until all senders are gone, then flushes.
pub fn spawn<W: Write + Send + 'static>(
    batches: Receiver<Vec<u8>>,
    out: W,
) -> JoinHandle<io::Result<()>> {
    std::thread::Builder::new()
        .name("writer".into())
        .spawn(move || {
            let mut out = io::BufWriter::with_capacity(1 << 20, out);
            for batch in batches.iter() {
                // Flush whenever we catch up, so lines show up promptly at low rates while
                // bursts still go out in large writes.
                let written = out.write_all(&batch).and_then(|()| {
                    if batches.is_empty() {
                        out.flush()
                    } else {
                        Ok(())
                    }
                });
                if let Err(e) = written {
                    // A closed pipe (`| head`) ends the output, not the analysis.
                    if e.kind() == io::ErrorKind::BrokenPipe {
                        return Ok(());
                    }
                    return Err(e);
                }
            }
            out.flush()
        })
        .expect("spawn writer thread")
}
