//! A stream's read buffer: the kernel (or rustls) writes into it, frames are read where they
//! landed, and the part holding complete frames goes to the shards as one shared piece per
//! read. A shard copies the messages its sessions keep straight from the piece into its
//! `MessageStore`, so a message is copied once between the socket and the store, and the
//! reference count is touched once per piece and batch, not per message.

use bytes::{Bytes, BytesMut};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;

/// The read buffer of one connection or file.
pub struct ReadBuffer {
    /// Bytes read and not yet taken (a partial frame at most, between two feeds); its spare
    /// capacity is the room for the next read, left unwritten until a read lands there:
    /// zero-filling each fresh allocation first cost the reader up to a fifth of its time
    /// (docs/benchmarks.md, round 6).
    mem: BytesMut,
    /// How much to allocate when the room runs out.
    size: usize,
}

/// What a read buffer reads from: a descriptor, read straight into the buffer's room (or
/// bytes in memory, in tests).
pub trait Source {
    /// Reads once into `room`; returns how many of its first bytes it wrote (`Ok(0)`: the
    /// end of the stream).
    fn read_into(&mut self, room: &mut [MaybeUninit<u8>]) -> io::Result<usize>;
}

/// `read(2)` into memory not yet written, which `std::io::Read` cannot take.
fn read_fd(fd: &impl AsRawFd, room: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `room.len()` bytes at `room`, which is valid for
    // writes of that many bytes, and reads none.
    let n = unsafe { libc::read(fd.as_raw_fd(), room.as_mut_ptr().cast(), room.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

impl Source for std::fs::File {
    fn read_into(&mut self, room: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
        read_fd(self, room)
    }
}

impl Source for mio::net::TcpStream {
    fn read_into(&mut self, room: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
        read_fd(self, room)
    }
}

impl Source for mio::net::UnixStream {
    fn read_into(&mut self, room: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
        read_fd(self, room)
    }
}

#[cfg(test)]
impl Source for &[u8] {
    fn read_into(&mut self, room: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
        let n = self.len().min(room.len());
        let (now, rest) = self.split_at(n);
        for (to, &b) in room.iter_mut().zip(now) {
            to.write(b);
        }
        *self = rest;
        Ok(n)
    }
}

impl ReadBuffer {
    /// A buffer that allocates `size` bytes at a time (more for a frame that needs it).
    pub fn new(size: usize) -> Self {
        Self {
            mem: BytesMut::new(),
            size,
        }
    }

    /// The bytes read and not yet taken: a partial frame at most, between two feeds.
    pub fn data(&self) -> &[u8] {
        &self.mem
    }

    pub fn len(&self) -> usize {
        self.mem.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
    }

    /// Reads once from `src` into the room (making some first if little is left). `Ok(0)` at
    /// the end of the stream.
    pub fn read_from(&mut self, src: &mut impl Source) -> io::Result<usize> {
        self.make_room(self.size / 16);
        let n = loop {
            match src.read_into(self.mem.spare_capacity_mut()) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        let filled = self.mem.len() + n.min(self.mem.capacity() - self.mem.len());
        // SAFETY: `read_into` wrote the first `n` bytes of the spare capacity (a source
        // claiming more than the room is capped to it).
        unsafe { self.mem.set_len(filled) };
        Ok(n)
    }

    /// Appends `bytes` (TLS plaintext, tests).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.make_room(bytes.len());
        self.mem.extend_from_slice(bytes);
    }

    /// Makes room towards a frame of `total` bytes at the front (the decoder said it needs
    /// that): twice what has arrived at most, so the buffer grows as the frame arrives (copies
    /// stay linear in its size) and never ahead of it: announcing a large frame allocates
    /// nothing beyond the normal buffer.
    pub fn fit(&mut self, total: usize) {
        let target = total.min(self.size.max(2 * self.len()));
        if target > self.mem.capacity() {
            self.make_room(target - self.len());
        }
    }

    /// Splits off the first `n` bytes (complete frames) as a piece the shards can share.
    pub fn take(&mut self, n: usize) -> Bytes {
        debug_assert!(n <= self.len());
        self.mem.split_to(n).freeze()
    }

    /// At least `room` bytes of room after the data. Otherwise the data (a partial frame) moves
    /// to a fresh allocation: the old one is freed once the pieces taken from it are.
    fn make_room(&mut self, room: usize) {
        if self.mem.capacity() - self.mem.len() >= room.max(1) {
            return;
        }
        let mut fresh = BytesMut::with_capacity(self.size.max(self.len() + room));
        fresh.extend_from_slice(&self.mem);
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
            buf.mem.capacity() < 1000,
            "grown as the frame arrives, not ahead of it"
        );
        buf.extend_from_slice(&[1; 896]);
        buf.fit(1000);
        assert_eq!(buf.data().len(), 1000);
        let mut empty: &[u8] = &[];
        assert_eq!(buf.read_from(&mut empty).unwrap(), 0);
    }
}
