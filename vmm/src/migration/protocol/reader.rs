//! Receiving frames: the header is checked in the order the protocol's documentation gives
//! (nothing is allocated for a payload before its length is known to be allowed, and the CRC
//! comes before the fields it covers), and `Pages` data is read straight into a reused buffer.

use std::io::{ErrorKind, Read};

use super::decode::decode;
use super::{
    Message, ProtocolError, HEADER_LEN, KIND_PAGES, MAGIC, MAX_PAYLOAD, PAGES_PREFIX, VERSION,
};

/// Reads frames from one connection in one direction, expecting them numbered from 0.
pub struct FrameReader<R: Read> {
    inner: R,
    seq: u64,
    bytes: u64,
    /// A `Pages` payload given back by `recycle`: the next one is read into it, so the bulk of
    /// a migration allocates and zero-fills no memory per frame.
    spare: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(r: R) -> Self {
        FrameReader {
            inner: r,
            seq: 0,
            bytes: 0,
            spare: Vec::new(),
        }
    }

    /// Gives a `Pages` payload back once its bytes are stored, for the next one to reuse.
    pub fn recycle(&mut self, data: Vec<u8>) {
        if data.capacity() <= MAX_PAYLOAD {
            self.spare = data;
        }
    }

    /// Reads and checks one whole frame. After an error the stream is out of step: drop it.
    pub fn recv(&mut self) -> Result<Message, ProtocolError> {
        let mut header = [0u8; HEADER_LEN];
        let got = self.read_full(&mut header)?;
        if got == 0 {
            return Err(ProtocolError::Closed);
        }
        if got < HEADER_LEN {
            return Err(ProtocolError::Truncated {
                part: "header",
                got,
                expected: HEADER_LEN,
                kind: None,
                seq: None,
            });
        }
        let [m0, m1, m2, m3, v0, v1, k0, k1, s0, s1, s2, s3, s4, s5, s6, s7, l0, l1, l2, l3, c0, c1, c2, c3] =
            header;
        let magic = [m0, m1, m2, m3];
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([v0, v1]);
        if version != VERSION {
            return Err(ProtocolError::Version {
                found: version,
                supported: VERSION,
            });
        }
        let kind = u16::from_le_bytes([k0, k1]);
        let seq = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        let crc = u32::from_le_bytes([c0, c1, c2, c3]);
        // Refused before any allocation: a peer must not choose how much memory we commit.
        let len = match usize::try_from(len) {
            Ok(l) if l <= MAX_PAYLOAD => l,
            _ => {
                return Err(ProtocolError::TooLarge {
                    len: u64::from(len),
                    max: MAX_PAYLOAD,
                    kind,
                    seq,
                })
            }
        };

        // Pages' gpa is read apart so the data lands directly in the Vec the message keeps.
        let prefix_len = if kind == KIND_PAGES {
            len.min(PAGES_PREFIX)
        } else {
            0
        };
        let mut prefix = [0u8; PAGES_PREFIX];
        let mut body = if kind == KIND_PAGES {
            // Only grown parts are zero-filled: a recycled payload of the same size is not.
            let mut b = std::mem::take(&mut self.spare);
            b.resize(len - prefix_len, 0);
            b
        } else {
            vec![0u8; len - prefix_len]
        };
        let mut got = self.read_full(&mut prefix[..prefix_len])?;
        if got == prefix_len {
            got += self.read_full(&mut body)?;
        }
        if got < len {
            return Err(ProtocolError::Truncated {
                part: "payload",
                got,
                expected: len,
                kind: Some(kind),
                seq: Some(seq),
            });
        }

        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header[..20]);
        hasher.update(&prefix[..prefix_len]);
        hasher.update(&body);
        let computed = hasher.finalize();
        if computed != crc {
            return Err(ProtocolError::Checksum {
                kind,
                seq,
                expected: crc,
                found: computed,
            });
        }
        if seq != self.seq {
            return Err(ProtocolError::Sequence {
                expected: self.seq,
                found: seq,
            });
        }
        // Wrapping: 2^64 frames cannot happen, but a panic must not be reachable from the wire.
        self.seq = self.seq.wrapping_add(1);
        decode(kind, seq, &prefix[..prefix_len], body)
    }

    /// Reads until `buf` is full or EOF; returns how much was read.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<usize, ProtocolError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => {
                    // A misbehaving reader could claim more than it was given.
                    let n = n.min(buf.len() - got);
                    got += n;
                    self.bytes += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(ProtocolError::TimedOut)
                }
                Err(e) => return Err(ProtocolError::Io(e)),
            }
        }
        Ok(got)
    }

    /// Bytes taken from the inner reader so far (headers and partial frames included).
    pub fn bytes_received(&self) -> u64 {
        self.bytes
    }

    /// The sequence number the next frame must carry, i.e. frames accepted so far.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}
