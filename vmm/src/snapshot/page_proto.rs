//! The page-server wire protocol: small, versioned, length-checked frames over a Unix stream
//! socket between a restoring `vmm restore --lazy --page-server PATH` (the client) and
//! `vmm page-server` (the server), which reads the snapshot's memory file.
//!
//! # Frames
//!
//! A 16-byte header and a payload; integers little-endian. No checksum: the socket is local and
//! reliable; every field is still checked.
//!
//! ```text
//! offset  size  field
//!      0     4  magic    b"VPSF"
//!      4     2  version  VERSION (1); any other value is refused
//!      6     2  kind     message type (table below)
//!      8     4  id       request id (Read / Data / Error on a data connection), else 0
//!     12     4  len      payload bytes, at most MAX_PAYLOAD (checked before allocating)
//!     16   len  payload
//! ```
//!
//! | kind | message    | direction | payload                                                |
//! |-----:|------------|-----------|--------------------------------------------------------|
//! |    1 | `Hello`    | c → s     | JSON `Handshake` (first frame of the main connection);  |
//! |      |            |           | uffd backends attach the descriptors (SCM_RIGHTS)       |
//! |    2 | `Ready`    | s → c     | JSON `Ready` (session id for data connections)          |
//! |    3 | `Refuse`   | s → c     | reason, UTF-8                                           |
//! |    4 | `Join`     | c → s     | `session` u64: 8 B (first frame of a data connection)   |
//! |    5 | `Resuming` | c → s     | empty: the vCPUs are about to run                       |
//! |    6 | `Finish`   | c → s     | empty: the run is over, report and exit                 |
//! |    7 | `Stats`    | s → c     | JSON of what the server measured                        |
//! |    8 | `Read`     | c → s     | `gpa` u64, `pages` u32: 12 B; gpa page aligned,         |
//! |      |            |           | 1..=MAX_PAGES pages, no overflow                        |
//! |    9 | `Data`     | s → c     | `pages` × 4096 bytes answering the `Read` with this id  |
//! |   10 | `Error`    | either    | reason, UTF-8: the sender gives up on this connection   |
//! |   11 | `Alive`    | s → c     | empty: heartbeat on the main connection, every          |
//! |      |            |           | HEARTBEAT while the session lasts                       |
//!
//! # Sessions
//!
//! ```text
//!   client (vmm restore)                          server (vmm page-server)
//!     | -- Hello(handshake) [+ uffd, memfd, dump] --> |  checks the layout against the file
//!     | <------------------------- Ready / Refuse --- |  uffd: fault thread (and prefetch) run
//!     | -- Resuming -------------------------------> |
//!     |   ... guest runs; uffd: the server installs pages itself ...
//!     |==== exit backends: one data connection per concurrent caller ====|
//!     | -- Join(session) ---------------------------> |
//!     | -- Read{id, gpa, pages} --------------------> |
//!     | <----------------------------- Data{id} ----- |  (or Error{id}: the request was bad)
//!     |==== main connection ====|
//!     | -- Finish ----------------------------------> |
//!     | <---------------------------------- Stats --- |  the server exits
//! ```
//!
//! The server sends nothing unsolicited on the main connection except `Alive` every
//! `HEARTBEAT` and `Error` when it fails (its fault thread could not install a page): the client
//! then stops the guest, which must never run on with memory missing. The heartbeat is how the
//! client tells a stopped or hung server from an idle one: with the uffd backends the server
//! alone reads the userfaultfd, so a server that goes silent leaves a faulting vCPU blocked in
//! the kernel with nothing in the restoring process to notice.

use std::io::{ErrorKind, Read, Write};

pub const MAGIC: [u8; 4] = *b"VPSF";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;
pub const PAGE: u64 = 4096;
/// Pages in one `Read` / `Data` (2 MiB, the largest demand chunk).
pub const MAX_PAGES: u32 = 512;
/// The largest payload accepted: a full `Data` frame, or a JSON handshake / report.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// How often the server says `Alive` on the main connection.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

const KIND_HELLO: u16 = 1;
const KIND_READY: u16 = 2;
const KIND_REFUSE: u16 = 3;
const KIND_JOIN: u16 = 4;
const KIND_RESUMING: u16 = 5;
const KIND_FINISH: u16 = 6;
const KIND_STATS: u16 = 7;
const KIND_READ: u16 = 8;
const KIND_DATA: u16 = 9;
const KIND_ERROR: u16 = 10;
const KIND_ALIVE: u16 = 11;

/// `Refuse` and `Error` carry text for the other side's user: messages, not error chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Vec<u8>),
    Ready(Vec<u8>),
    Refuse(String),
    Join { session: u64 },
    Resuming,
    Finish,
    Stats(Vec<u8>),
    Read { gpa: u64, pages: u32 },
    Data(Vec<u8>),
    Error(String),
    Alive,
}

impl Message {
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello(_) => KIND_HELLO,
            Message::Ready(_) => KIND_READY,
            Message::Refuse(_) => KIND_REFUSE,
            Message::Join { .. } => KIND_JOIN,
            Message::Resuming => KIND_RESUMING,
            Message::Finish => KIND_FINISH,
            Message::Stats(_) => KIND_STATS,
            Message::Read { .. } => KIND_READ,
            Message::Data(_) => KIND_DATA,
            Message::Error(_) => KIND_ERROR,
            Message::Alive => KIND_ALIVE,
        }
    }

    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }
}

pub fn kind_name(kind: u16) -> &'static str {
    match kind {
        KIND_HELLO => "Hello",
        KIND_READY => "Ready",
        KIND_REFUSE => "Refuse",
        KIND_JOIN => "Join",
        KIND_RESUMING => "Resuming",
        KIND_FINISH => "Finish",
        KIND_STATS => "Stats",
        KIND_READ => "Read",
        KIND_DATA => "Data",
        KIND_ERROR => "Error",
        KIND_ALIVE => "Alive",
        _ => "unknown",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("connection closed inside a frame's {part}: got {got} of {expected} bytes")]
    Truncated {
        part: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("page-server connection I/O failed: {0}")]
    Io(std::io::Error),
    /// The socket's read timeout passed (EAGAIN, which alone would say nothing useful).
    #[error("timed out waiting for the peer's {part}: nothing arrived within the connection's read timeout")]
    TimedOut { part: &'static str },
    #[error("bad frame magic \"{}\", expected \"VPSF\" (not a vmm page-server peer, or out of step)", .0.escape_ascii())]
    BadMagic([u8; 4]),
    #[error("peer speaks page-server protocol version {0}; this build speaks version {VERSION}")]
    Version(u16),
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("{} frame of {len} bytes exceeds the limit of {MAX_PAYLOAD}", kind_name(*.kind))]
    TooLarge { kind: u16, len: u32 },
    #[error("malformed {kind} frame: {reason}")]
    Malformed { kind: &'static str, reason: String },
    #[error("expected {expected}, got {found}")]
    Unexpected {
        expected: &'static str,
        found: &'static str,
    },
}

impl From<std::io::Error> for ProtoError {
    fn from(e: std::io::Error) -> Self {
        ProtoError::Io(e)
    }
}

fn malformed(kind: u16, reason: String) -> ProtoError {
    ProtoError::Malformed {
        kind: kind_name(kind),
        reason,
    }
}

/// Checks a `Read` request: page aligned, 1..=MAX_PAGES pages, no overflow.
pub fn check_read(gpa: u64, pages: u32) -> Result<(), ProtoError> {
    if gpa % PAGE != 0 {
        return Err(malformed(
            KIND_READ,
            format!("gpa 0x{gpa:x} is not page aligned"),
        ));
    }
    if pages == 0 || pages > MAX_PAGES {
        return Err(malformed(
            KIND_READ,
            format!("{pages} pages at 0x{gpa:x}: expected 1 to {MAX_PAGES}"),
        ));
    }
    if gpa.checked_add(u64::from(pages) * PAGE).is_none() {
        return Err(malformed(
            KIND_READ,
            format!("0x{gpa:x} + {pages} pages overflows"),
        ));
    }
    Ok(())
}

/// Encodes `msg` with request id `id` as one frame (header and payload), copying its payload
/// once.
pub fn encode(id: u32, msg: &Message) -> Result<Vec<u8>, ProtoError> {
    let mut fixed = [0u8; 12];
    let payload: &[u8] = match msg {
        Message::Hello(b) | Message::Ready(b) | Message::Stats(b) => b,
        Message::Data(d) => {
            if d.is_empty() || d.len() as u64 % PAGE != 0 {
                return Err(malformed(
                    KIND_DATA,
                    format!("{} bytes: not whole pages", d.len()),
                ));
            }
            d
        }
        Message::Refuse(s) | Message::Error(s) => s.as_bytes(),
        Message::Join { session } => {
            fixed[..8].copy_from_slice(&session.to_le_bytes());
            &fixed[..8]
        }
        Message::Resuming | Message::Finish | Message::Alive => &[],
        Message::Read { gpa, pages } => {
            check_read(*gpa, *pages)?;
            fixed[..8].copy_from_slice(&gpa.to_le_bytes());
            fixed[8..].copy_from_slice(&pages.to_le_bytes());
            &fixed[..]
        }
    };
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtoError::TooLarge {
            kind: msg.kind(),
            len: payload.len().min(u32::MAX as usize) as u32,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&msg.kind().to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// A decoded header: (kind, id, payload length), all checked.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<(u16, u32, usize), ProtoError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(ProtoError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(ProtoError::Version(version));
    }
    let kind = u16::from_le_bytes([h[6], h[7]]);
    if kind_name(kind) == "unknown" {
        return Err(ProtoError::UnknownKind(kind));
    }
    let id = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let len = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if len as usize > MAX_PAYLOAD {
        return Err(ProtoError::TooLarge { kind, len });
    }
    Ok((kind, id, len as usize))
}

/// The peer's text, made fit for a terminal and a log (see `peer_text`).
fn text(b: Vec<u8>) -> String {
    crate::peer_text::sanitize(&String::from_utf8_lossy(&b))
}

/// Decodes a payload of `kind` strictly: fixed layouts must have exactly their size.
pub fn decode_payload(kind: u16, p: Vec<u8>) -> Result<Message, ProtoError> {
    let exact = |n: usize| -> Result<(), ProtoError> {
        if p.len() != n {
            return Err(malformed(
                kind,
                format!("payload of {} bytes, expected {n}", p.len()),
            ));
        }
        Ok(())
    };
    Ok(match kind {
        KIND_HELLO => Message::Hello(p),
        KIND_READY => Message::Ready(p),
        KIND_REFUSE => Message::Refuse(text(p)),
        KIND_JOIN => {
            exact(8)?;
            let mut b = [0u8; 8];
            b.copy_from_slice(&p);
            Message::Join {
                session: u64::from_le_bytes(b),
            }
        }
        KIND_RESUMING => {
            exact(0)?;
            Message::Resuming
        }
        KIND_FINISH => {
            exact(0)?;
            Message::Finish
        }
        KIND_STATS => Message::Stats(p),
        KIND_READ => {
            exact(12)?;
            let mut g = [0u8; 8];
            g.copy_from_slice(&p[..8]);
            let mut n = [0u8; 4];
            n.copy_from_slice(&p[8..]);
            let (gpa, pages) = (u64::from_le_bytes(g), u32::from_le_bytes(n));
            check_read(gpa, pages)?;
            Message::Read { gpa, pages }
        }
        KIND_DATA => {
            if p.is_empty() || p.len() as u64 % PAGE != 0 {
                return Err(malformed(
                    kind,
                    format!("{} bytes: not whole pages", p.len()),
                ));
            }
            Message::Data(p)
        }
        KIND_ERROR => Message::Error(text(p)),
        KIND_ALIVE => {
            exact(0)?;
            Message::Alive
        }
        other => return Err(ProtoError::UnknownKind(other)),
    })
}

/// Reads exactly `buf.len()` bytes; `Closed` when the stream ends before the first one.
fn read_full(r: &mut impl Read, buf: &mut [u8], part: &'static str) -> Result<(), ProtoError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 && part == "header" => return Err(ProtoError::Closed),
            Ok(0) => {
                return Err(ProtoError::Truncated {
                    part,
                    got,
                    expected: buf.len(),
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(ProtoError::TimedOut { part })
            }
            Err(e) => return Err(ProtoError::Io(e)),
        }
    }
    Ok(())
}

/// Reads the rest of a frame whose first `have` header bytes are in `h`.
pub fn recv_rest(
    r: &mut impl Read,
    h: &mut [u8; HEADER_LEN],
    have: usize,
) -> Result<(u32, Message), ProtoError> {
    if have < HEADER_LEN {
        match read_full(r, &mut h[have..], "header") {
            // Part of the header came already: the stream ended inside it.
            Err(ProtoError::Closed) if have > 0 => {
                return Err(ProtoError::Truncated {
                    part: "header",
                    got: have,
                    expected: HEADER_LEN,
                })
            }
            other => other?,
        }
    }
    let (kind, id, len) = decode_header(h)?;
    let mut payload = vec![0u8; len];
    read_full(r, &mut payload, "payload")?;
    Ok((id, decode_payload(kind, payload)?))
}

/// Reads one frame: (request id, message).
pub fn recv(r: &mut impl Read) -> Result<(u32, Message), ProtoError> {
    let mut h = [0u8; HEADER_LEN];
    recv_rest(r, &mut h, 0)
}

pub fn send(w: &mut impl Write, id: u32, msg: &Message) -> Result<(), ProtoError> {
    let frame = encode(id, msg)?;
    w.write_all(&frame)?;
    Ok(())
}

/// A `Read` answer that does not fit its request is a protocol error, not data.
pub fn expect_data(
    id: u32,
    want_id: u32,
    msg: Message,
    want_len: usize,
) -> Result<Vec<u8>, ProtoError> {
    match msg {
        Message::Data(d) if id == want_id && d.len() == want_len => Ok(d),
        Message::Data(d) => Err(malformed(
            KIND_DATA,
            format!(
                "answer {id} of {} bytes to request {want_id} of {want_len} bytes",
                d.len()
            ),
        )),
        Message::Error(reason) => Err(ProtoError::Malformed {
            kind: "Read",
            reason: format!("the page server refused it: {reason}"),
        }),
        other => Err(ProtoError::Unexpected {
            expected: "Data",
            found: other.name(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: Message) {
        let f = encode(7, &m).unwrap();
        let (id, back) = recv(&mut f.as_slice()).unwrap();
        assert_eq!(id, 7);
        assert_eq!(back, m);
    }

    #[test]
    fn every_message_round_trips() {
        roundtrip(Message::Hello(b"{}".to_vec()));
        roundtrip(Message::Ready(b"{\"session\":1}".to_vec()));
        roundtrip(Message::Refuse("no".into()));
        roundtrip(Message::Join { session: u64::MAX });
        roundtrip(Message::Resuming);
        roundtrip(Message::Finish);
        roundtrip(Message::Alive);
        roundtrip(Message::Stats(b"{}".to_vec()));
        roundtrip(Message::Read {
            gpa: 0x1000,
            pages: MAX_PAGES,
        });
        roundtrip(Message::Data(vec![0xab; 8192]));
        roundtrip(Message::Error("gone".into()));
    }

    #[test]
    fn bad_headers_are_refused_precisely() {
        let good = encode(1, &Message::Finish).unwrap();
        let mut f = good.clone();
        f[0] = b'X';
        assert!(matches!(
            recv(&mut f.as_slice()),
            Err(ProtoError::BadMagic(_))
        ));
        let mut f = good.clone();
        f[4] = 2;
        assert!(matches!(
            recv(&mut f.as_slice()),
            Err(ProtoError::Version(2))
        ));
        let mut f = good.clone();
        f[6] = 0;
        assert!(matches!(
            recv(&mut f.as_slice()),
            Err(ProtoError::UnknownKind(0))
        ));
        f[6] = 12;
        assert!(matches!(
            recv(&mut f.as_slice()),
            Err(ProtoError::UnknownKind(12))
        ));
        // A huge length is refused before anything is allocated or read.
        let mut f = good.clone();
        f[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            recv(&mut f.as_slice()),
            Err(ProtoError::TooLarge { .. })
        ));
        // Finish with a payload.
        let mut f = good.clone();
        f[12] = 1;
        f.push(0);
        let e = recv(&mut f.as_slice()).unwrap_err().to_string();
        assert!(e.contains("Finish") && e.contains("expected 0"), "{e}");
    }

    #[test]
    fn truncation_and_eof_are_told_apart() {
        assert!(matches!(recv(&mut [].as_slice()), Err(ProtoError::Closed)));
        let f = encode(1, &Message::Data(vec![1; 4096])).unwrap();
        assert!(matches!(
            recv(&mut &f[..5]),
            Err(ProtoError::Truncated {
                part: "header",
                got: 5,
                ..
            })
        ));
        assert!(matches!(
            recv(&mut &f[..100]),
            Err(ProtoError::Truncated {
                part: "payload",
                got: 84,
                expected: 4096
            })
        ));
    }

    #[test]
    fn reads_and_data_are_checked() {
        assert!(check_read(0x1001, 1).is_err());
        assert!(check_read(0x1000, 0).is_err());
        assert!(check_read(0x1000, MAX_PAGES + 1).is_err());
        assert!(check_read(!(PAGE - 1), 2).is_err());
        assert!(encode(0, &Message::Read { gpa: 3, pages: 1 }).is_err());
        assert!(encode(0, &Message::Data(vec![0; 100])).is_err());
        assert!(encode(0, &Message::Data(Vec::new())).is_err());
        // Read with a wrong size, and Data that is not whole pages, from a peer.
        let mut f = encode(0, &Message::Read { gpa: 0, pages: 1 }).unwrap();
        f.push(0);
        f[12] = 13;
        assert!(recv(&mut f.as_slice()).is_err());
        let mut f = encode(0, &Message::Data(vec![0; 4096])).unwrap();
        f.truncate(HEADER_LEN + 10);
        f[12..16].copy_from_slice(&10u32.to_le_bytes());
        let e = recv(&mut f.as_slice()).unwrap_err().to_string();
        assert!(e.contains("not whole pages"), "{e}");
        // An answer must match its request.
        assert!(expect_data(3, 3, Message::Data(vec![0; 4096]), 4096).is_ok());
        assert!(expect_data(2, 3, Message::Data(vec![0; 4096]), 4096).is_err());
        assert!(expect_data(3, 3, Message::Data(vec![0; 4096]), 8192).is_err());
        let e = expect_data(3, 3, Message::Error("bad gpa".into()), 4096)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad gpa"), "{e}");
        assert!(expect_data(3, 3, Message::Finish, 4096).is_err());
    }
}
