//! Sending frames: every message is checked as the peer's reader would check it before a byte
//! is written, so a sender's bug fails here with the error the peer would have reported, and
//! page data goes to the socket from the caller's slice, never copied into a frame buffer.

use std::io::Write;

use super::{
    check_pages, check_span, malformed, Message, ProtocolError, Role, HEADER_LEN, KIND_ABORT,
    KIND_ACCEPT, KIND_ALIVE, KIND_CHANNEL, KIND_COMPLETE, KIND_DEVICE_DATA, KIND_HELLO, KIND_PAGES,
    KIND_PAGE_REQUEST, KIND_POSTCOPY_START, KIND_REFUSE, KIND_RESUMED, KIND_ROUND_END, KIND_STATE,
    KIND_STATS, KIND_ZERO, MAGIC, MAX_DATA_CHANNELS, MAX_PAYLOAD, RANGE_LEN, VERSION,
};

/// Writes frames to one connection in one direction, numbering them from 0.
pub struct FrameWriter<W: Write> {
    inner: W,
    seq: u64,
    bytes: u64,
    /// Reused for PostcopyStart, the one payload that must be built before it is sent.
    scratch: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(w: W) -> Self {
        FrameWriter {
            inner: w,
            seq: 0,
            bytes: 0,
            scratch: Vec::new(),
        }
    }

    /// Validates and sends one message. On a validation error nothing is written and the
    /// sequence number does not advance; on an I/O error the connection is unusable.
    pub fn send(&mut self, msg: &Message) -> Result<(), ProtocolError> {
        let seq = self.seq;
        match msg {
            Message::Hello(json) => self.write_frame(KIND_HELLO, &[json]),
            Message::Accept => self.write_frame(KIND_ACCEPT, &[]),
            Message::AcceptWith(json) => self.write_frame(KIND_ACCEPT, &[json]),
            Message::Refuse(reason) => self.write_frame(KIND_REFUSE, &[reason.as_bytes()]),
            Message::Channel { session, role } => {
                if let Role::Data(i) = role {
                    if *i >= MAX_DATA_CHANNELS {
                        return Err(malformed(
                            msg.name(),
                            seq,
                            format!("data channel {i}, the most is {MAX_DATA_CHANNELS}"),
                        ));
                    }
                }
                let mut p = [0u8; 9];
                p[..8].copy_from_slice(&session.to_le_bytes());
                p[8] = role.to_wire();
                self.write_frame(KIND_CHANNEL, &[&p])
            }
            Message::Pages { gpa, data } => self.send_pages(*gpa, data),
            Message::Zero { gpa, pages } => {
                check_span(msg.name(), seq, *gpa, *pages)?;
                let mut p = [0u8; 16];
                p[..8].copy_from_slice(&gpa.to_le_bytes());
                p[8..].copy_from_slice(&pages.to_le_bytes());
                self.write_frame(KIND_ZERO, &[&p])
            }
            Message::RoundEnd { round, pages } => {
                let mut p = [0u8; 12];
                p[..4].copy_from_slice(&round.to_le_bytes());
                p[4..].copy_from_slice(&pages.to_le_bytes());
                self.write_frame(KIND_ROUND_END, &[&p])
            }
            Message::State(json) => self.write_frame(KIND_STATE, &[json]),
            Message::PostcopyStart { pending } => self.send_postcopy_start(pending),
            Message::PageRequest { gpa, pages } => {
                check_span(msg.name(), seq, *gpa, u64::from(*pages))?;
                let mut p = [0u8; 12];
                p[..8].copy_from_slice(&gpa.to_le_bytes());
                p[8..].copy_from_slice(&pages.to_le_bytes());
                self.write_frame(KIND_PAGE_REQUEST, &[&p])
            }
            Message::Complete => self.write_frame(KIND_COMPLETE, &[]),
            Message::Resumed => self.write_frame(KIND_RESUMED, &[]),
            Message::Alive => self.write_frame(KIND_ALIVE, &[]),
            Message::Abort(reason) => self.write_frame(KIND_ABORT, &[reason.as_bytes()]),
            Message::Stats(json) => self.write_frame(KIND_STATS, &[json]),
            Message::DeviceData { device, data } => {
                if data.is_empty() {
                    return Err(malformed(msg.name(), seq, "no device data".into()));
                }
                self.write_frame(KIND_DEVICE_DATA, &[&device.to_le_bytes(), data])
            }
        }
    }

    /// Sends `Pages { gpa, data }` straight from the caller's slice, with the same checks.
    pub fn send_pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), ProtocolError> {
        check_pages(self.seq, gpa, data.len())?;
        self.write_frame(KIND_PAGES, &[&gpa.to_le_bytes(), data])
    }

    fn send_postcopy_start(&mut self, pending: &[(u64, u64)]) -> Result<(), ProtocolError> {
        let seq = self.seq;
        // Checked before building so that a huge list costs nothing to refuse.
        let len = (pending.len() as u64)
            .saturating_mul(RANGE_LEN as u64)
            .saturating_add(4);
        if len > MAX_PAYLOAD as u64 {
            return Err(ProtocolError::TooLarge {
                len,
                max: MAX_PAYLOAD,
                kind: KIND_POSTCOPY_START,
                seq,
            });
        }
        let count = u32::try_from(pending.len()).map_err(|_| {
            malformed(
                "PostcopyStart",
                seq,
                format!("{} ranges do not fit a u32 count", pending.len()),
            )
        })?;
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.extend_from_slice(&count.to_le_bytes());
        for &(gpa, pages) in pending {
            if let Err(e) = check_span("PostcopyStart", seq, gpa, pages) {
                self.scratch = buf;
                return Err(e);
            }
            buf.extend_from_slice(&gpa.to_le_bytes());
            buf.extend_from_slice(&pages.to_le_bytes());
        }
        let result = self.write_frame(KIND_POSTCOPY_START, &[&buf]);
        self.scratch = buf;
        result
    }

    /// Writes header and payload parts without joining them, so page data is not copied.
    fn write_frame(&mut self, kind: u16, parts: &[&[u8]]) -> Result<(), ProtocolError> {
        let seq = self.seq;
        let len = parts
            .iter()
            .fold(0u64, |acc, p| acc.saturating_add(p.len() as u64));
        let wire_len = match u32::try_from(len) {
            Ok(l) if len <= MAX_PAYLOAD as u64 => l,
            _ => {
                return Err(ProtocolError::TooLarge {
                    len,
                    max: MAX_PAYLOAD,
                    kind,
                    seq,
                })
            }
        };
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&MAGIC);
        header[4..6].copy_from_slice(&VERSION.to_le_bytes());
        header[6..8].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&seq.to_le_bytes());
        header[16..20].copy_from_slice(&wire_len.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header[..20]);
        for part in parts {
            crc.update(part);
        }
        header[20..24].copy_from_slice(&crc.finalize().to_le_bytes());

        self.inner.write_all(&header)?;
        self.bytes += HEADER_LEN as u64;
        for part in parts {
            self.inner.write_all(part)?;
            self.bytes += part.len() as u64;
        }
        self.seq += 1;
        Ok(())
    }

    /// Bytes handed to the inner writer so far (headers included).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes
    }

    /// The sequence number the next frame will carry, i.e. frames sent so far.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        self.inner.flush()?;
        Ok(())
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}
