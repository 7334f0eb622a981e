//! Payload decoding: strict fixed layouts, no trailing bytes, every span checked.

use super::{
    check_pages, check_span, kind_name, malformed, Message, ProtocolError, Role, KIND_ABORT,
    KIND_ACCEPT, KIND_ALIVE, KIND_CHANNEL, KIND_COMPLETE, KIND_DEVICE_DATA, KIND_HELLO, KIND_PAGES,
    KIND_PAGE_REQUEST, KIND_POSTCOPY_START, KIND_REFUSE, KIND_RESUMED, KIND_ROUND_END, KIND_STATE,
    KIND_STATS, KIND_ZERO, PAGES_PREFIX, RANGE_LEN,
};

/// Takes fixed-size fields off a payload, reporting short or long payloads precisely.
struct Fields<'a> {
    kind: &'static str,
    seq: u64,
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    /// Starts decoding a payload that must be exactly `expected` bytes.
    fn exact(
        kind: &'static str,
        seq: u64,
        buf: &'a [u8],
        expected: usize,
    ) -> Result<Self, ProtocolError> {
        if buf.len() != expected {
            return Err(malformed(
                kind,
                seq,
                format!("payload is {} bytes, expected {expected}", buf.len()),
            ));
        }
        Ok(Fields { kind, seq, buf })
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        let Some((head, rest)) = self.buf.split_first_chunk::<N>() else {
            return Err(malformed(
                self.kind,
                self.seq,
                format!("payload ends {} bytes short", N - self.buf.len()),
            ));
        };
        self.buf = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        self.take::<1>().map(|[b]| b)
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.take().map(u64::from_le_bytes)
    }
}

/// A peer's reason, made fit for a terminal and a log (see `peer_text`).
fn lossy_string(bytes: Vec<u8>) -> String {
    crate::peer_text::sanitize(&String::from_utf8_lossy(&bytes))
}

fn expect_empty(kind: &'static str, seq: u64, body: &[u8]) -> Result<(), ProtocolError> {
    Fields::exact(kind, seq, body, 0).map(|_| ())
}

pub(super) fn decode(
    kind: u16,
    seq: u64,
    prefix: &[u8],
    body: Vec<u8>,
) -> Result<Message, ProtocolError> {
    let name = kind_name(kind);
    let msg = match kind {
        KIND_HELLO => Message::Hello(body),
        KIND_ACCEPT if body.is_empty() => Message::Accept,
        KIND_ACCEPT => Message::AcceptWith(body),
        KIND_REFUSE => Message::Refuse(lossy_string(body)),
        KIND_CHANNEL => {
            let mut f = Fields::exact(name, seq, &body, 9)?;
            let session = f.u64()?;
            let role_byte = f.u8()?;
            let role = Role::from_wire(role_byte).ok_or_else(|| {
                malformed(
                    name,
                    seq,
                    format!(
                        "role {role_byte}, expected 0 (Main), 1 (Urgent) or 2..{} (Data)",
                        2 + super::MAX_DATA_CHANNELS - 1
                    ),
                )
            })?;
            Message::Channel { session, role }
        }
        KIND_PAGES => {
            let Ok(gpa) = <[u8; PAGES_PREFIX]>::try_from(prefix).map(u64::from_le_bytes) else {
                return Err(malformed(
                    name,
                    seq,
                    format!(
                        "payload is {} bytes, shorter than the {PAGES_PREFIX}-byte gpa",
                        prefix.len()
                    ),
                ));
            };
            check_pages(seq, gpa, body.len())?;
            Message::Pages { gpa, data: body }
        }
        KIND_ZERO => {
            let mut f = Fields::exact(name, seq, &body, 16)?;
            let (gpa, pages) = (f.u64()?, f.u64()?);
            check_span(name, seq, gpa, pages)?;
            Message::Zero { gpa, pages }
        }
        KIND_ROUND_END => {
            let mut f = Fields::exact(name, seq, &body, 12)?;
            Message::RoundEnd {
                round: f.u32()?,
                pages: f.u64()?,
            }
        }
        KIND_STATE => Message::State(body),
        KIND_POSTCOPY_START => Message::PostcopyStart {
            pending: decode_ranges(name, seq, &body)?,
        },
        KIND_PAGE_REQUEST => {
            let mut f = Fields::exact(name, seq, &body, 12)?;
            let (gpa, pages) = (f.u64()?, f.u32()?);
            check_span(name, seq, gpa, u64::from(pages))?;
            Message::PageRequest { gpa, pages }
        }
        KIND_COMPLETE => {
            expect_empty(name, seq, &body)?;
            Message::Complete
        }
        KIND_RESUMED => {
            expect_empty(name, seq, &body)?;
            Message::Resumed
        }
        KIND_ALIVE => {
            expect_empty(name, seq, &body)?;
            Message::Alive
        }
        KIND_ABORT => Message::Abort(lossy_string(body)),
        KIND_STATS => Message::Stats(body),
        KIND_DEVICE_DATA => {
            let Some((device, data)) = body.split_first_chunk::<4>() else {
                return Err(malformed(
                    name,
                    seq,
                    format!(
                        "payload is {} bytes, shorter than the 4-byte device index",
                        body.len()
                    ),
                ));
            };
            if data.is_empty() {
                return Err(malformed(name, seq, "no device data".into()));
            }
            Message::DeviceData {
                device: u32::from_le_bytes(*device),
                data: data.to_vec(),
            }
        }
        _ => return Err(ProtocolError::UnknownKind { kind, seq }),
    };
    Ok(msg)
}

fn decode_ranges(
    name: &'static str,
    seq: u64,
    body: &[u8],
) -> Result<Vec<(u64, u64)>, ProtocolError> {
    let Some((count, _)) = body.split_first_chunk::<4>() else {
        return Err(malformed(
            name,
            seq,
            format!(
                "payload is {} bytes, shorter than the 4-byte count",
                body.len()
            ),
        ));
    };
    let count = u32::from_le_bytes(*count) as usize;
    // u64 so a hostile count cannot overflow; the exact length also bounds the allocation below.
    let expected = 4 + count as u64 * RANGE_LEN as u64;
    if body.len() as u64 != expected {
        return Err(malformed(
            name,
            seq,
            format!(
                "{count} ranges need {expected} bytes, payload is {}",
                body.len()
            ),
        ));
    }
    let mut f = Fields::exact(name, seq, body, body.len())?;
    f.u32()?;
    let mut ranges = Vec::with_capacity(count);
    for _ in 0..count {
        let (gpa, pages) = (f.u64()?, f.u64()?);
        check_span(name, seq, gpa, pages)?;
        ranges.push((gpa, pages));
    }
    Ok(ranges)
}
