//! `read FILE...`: Frame Streams files through the same path as connections. Files are read in
//! the order given as one stream per identity, so a capture split in parts joins up.

use super::{Router, Shared, StreamEnd, StreamIngest};
use bytes::BytesMut;
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
/// is reported; the files after it are still read.
pub fn read_files(
    paths: &[impl AsRef<Path>],
    shared: &Shared,
    router: &mut Router,
) -> Vec<FileError> {
    let mut ingest = StreamIngest::new(shared.clone(), "file".into());
    let mut errors = Vec::new();
    for path in paths {
        let path = path.as_ref();
        ingest.restart_framing();
        if let Err(message) = read_one(path, &mut ingest, router) {
            errors.push(FileError {
                path: path.display().to_string(),
                message,
            });
        }
    }
    errors
}

fn read_one(path: &Path, ingest: &mut StreamIngest, router: &mut Router) -> Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(1 << 20);
    let mut scratch = vec![0u8; 1 << 20];
    // Files have no peer to answer: handshake replies are discarded.
    let mut replies = Vec::new();
    loop {
        let n = super::read_into(&mut file, &mut scratch, &mut buf).map_err(|e| e.to_string())?;
        let fed = ingest.feed(&mut buf, router, &mut replies);
        router.flush();
        match fed {
            Ok(true) => {
                ingest.finish(StreamEnd::Stopped, buf.len());
                return Ok(());
            }
            Ok(false) if n == 0 => {
                ingest.finish(StreamEnd::Closed, buf.len());
                return match buf.len() {
                    0 => Ok(()),
                    left => Err(format!(
                        "ends inside a frame ({left} bytes left), without STOP"
                    )),
                };
            }
            Ok(false) => {}
            Err(e) => {
                ingest.finish(StreamEnd::Closed, 0);
                return Err(e.to_string());
            }
        }
        replies.clear();
    }
}
