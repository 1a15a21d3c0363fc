//! A stream's read buffer: the kernel (or rustls) writes into it, frames are read where they
//! landed, and the part holding complete frames goes to the shards as one shared piece per
//! read. A shard copies the messages its sessions keep straight from the piece into its
//! `MessageStore`, so a message is copied once between the socket and the store, and the
//! reference count is touched once per piece and batch, not per message.

use bytes::{Bytes, BytesMut};
use std::io::{self, Read};

/// The read buffer of one connection or file.
pub struct ReadBuffer {
    /// Zero-filled when allocated and never shortened but from the front: bytes
    /// `[..filled]` are read and not yet taken, the rest is room for the next read. Being
    /// initialised, the room can be read into without zeroing it for every read.
    mem: BytesMut,
    filled: usize,
    /// How much to allocate when the room runs out.
    size: usize,
}

impl ReadBuffer {
    /// A buffer that allocates `size` bytes at a time (more for a frame that needs it).
    pub fn new(size: usize) -> Self {
        Self {
            mem: BytesMut::new(),
            filled: 0,
            size,
        }
    }

    /// The bytes read and not yet taken: a partial frame at most, between two feeds.
    pub fn data(&self) -> &[u8] {
        &self.mem[..self.filled]
    }

    pub fn len(&self) -> usize {
        self.filled
    }

    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Reads once from `src` into the room (making some first if little is left). `Ok(0)` at
    /// the end of the stream.
    pub fn read_from(&mut self, src: &mut impl Read) -> io::Result<usize> {
        self.make_room(self.size / 16);
        let n = loop {
            match src.read(&mut self.mem[self.filled..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        self.filled += n;
        Ok(n)
    }

    /// Appends `bytes` (TLS plaintext, tests).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.make_room(bytes.len());
        self.mem[self.filled..self.filled + bytes.len()].copy_from_slice(bytes);
        self.filled += bytes.len();
    }

    /// Makes room towards a frame of `total` bytes at the front (the decoder said it needs
    /// that): twice what has arrived at most, so the buffer grows as the frame arrives (copies
    /// stay linear in its size) and never ahead of it: announcing a large frame allocates
    /// nothing beyond the normal buffer.
    pub fn fit(&mut self, total: usize) {
        let target = total.min(self.size.max(2 * self.filled));
        if target > self.mem.len() {
            self.make_room(target - self.filled);
        }
    }

    /// Splits off the first `n` bytes (complete frames) as a piece the shards can share.
    pub fn take(&mut self, n: usize) -> Bytes {
        debug_assert!(n <= self.filled);
        self.filled -= n;
        self.mem.split_to(n).freeze()
    }

    /// At least `room` bytes of room after the data. Otherwise the data (a partial frame) moves
    /// to a fresh allocation: the old one is freed once the pieces taken from it are.
    fn make_room(&mut self, room: usize) {
        if self.mem.len() - self.filled >= room.max(1) {
            return;
        }
        let mut fresh = BytesMut::zeroed(self.size.max(self.filled + room));
        fresh[..self.filled].copy_from_slice(&self.mem[..self.filled]);
        self.mem = fresh;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_land_in_place_and_pieces_outlive_the_buffer() {
        let mut buf = ReadBuffer::new(64);
        let mut src: &[u8] = &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        assert_eq!(buf.read_from(&mut src).unwrap(), 10);
        assert_eq!(buf.data(), &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        let piece = buf.take(6);
        assert_eq!(buf.data(), &[7, 8, 9, 10]);
        // Filling the rest moves the partial frame to a new allocation; the piece stays.
        buf.extend_from_slice(&[0xaa; 100]);
        assert_eq!(&buf.data()[..5], &[7, 8, 9, 10, 0xaa]);
        assert_eq!(buf.len(), 104);
        assert_eq!(&piece[..], &[1, 2, 3, 4, 5, 6]);
        buf.fit(1000);
        assert_eq!(buf.len(), 104, "fitting a large frame keeps the data");
        assert_eq!(&buf.data()[..4], &[7, 8, 9, 10]);
        assert!(
            buf.mem.len() < 1000,
            "grown as the frame arrives, not ahead of it"
        );
        buf.extend_from_slice(&[1; 896]);
        buf.fit(1000);
        assert_eq!(buf.data().len(), 1000);
        let mut empty: &[u8] = &[];
        assert_eq!(buf.read_from(&mut empty).unwrap(), 0);
    }
}
