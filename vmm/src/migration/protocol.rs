//! The migration wire protocol: framed, checksummed, sequenced messages over TCP.
//!
//! # Frames
//!
//! Every message travels in one frame: a 24-byte header and a payload. All integers are
//! little-endian.
//!
//! ```text
//! offset  size  field
//!      0     4  magic    b"VMMF"
//!      4     2  version  VERSION (3); any other value is refused, naming both
//!      6     2  kind     message type (table below)
//!      8     8  seq      per connection and direction: 0 for the first frame, +1 per frame
//!     16     4  len      payload bytes, at most MAX_PAYLOAD (8 MiB)
//!     20     4  crc      CRC-32 (IEEE, crc32fast) of header bytes 0..20 followed by the payload
//!     24   len  payload
//! ```
//!
//! The reader checks, in this order: magic, version, `len <= MAX_PAYLOAD` (before allocating
//! anything for the payload), the CRC over the whole frame, the sequence number, then decodes the
//! payload strictly: fixed layouts must have exactly their size, with no trailing bytes. The CRC
//! is checked before `seq` and `kind` so that a flipped bit anywhere reports as a checksum error
//! rather than as whatever the corrupted field happens to look like.
//!
//! # Messages
//!
//! "raw" payloads are carried as they are; their meaning (JSON, UTF-8) belongs to the layers
//! above. `gpa` is a guest physical address; every `gpa` below must be page aligned (4096), every
//! page count at least 1, and `gpa + pages * 4096` must not overflow u64.
//!
//! | kind | message         | direction     | payload                                            |
//! |-----:|-----------------|---------------|----------------------------------------------------|
//! |    1 | `Hello`         | source → dest | raw: JSON VM description (first frame, main conn.) |
//! |    2 | `Accept`        | dest → source | empty, or JSON options (`presend::AcceptOptions`)  |
//! |    3 | `Refuse`        | dest → source | raw: reason, UTF-8 (decoded lossily)               |
//! |    4 | `Channel`       | source → dest | `session` u64, `role` u8 (0 Main, 1 Urgent, 2+i Data i): 9 B |
//! |    5 | `Pages`         | source → dest | `gpa` u64, then 1..=256 whole pages of data        |
//! |    6 | `Zero`          | source → dest | `gpa` u64, `pages` u64: 16 B                       |
//! |    7 | `RoundEnd`      | source → dest | `round` u32, `pages` u64: 12 B                     |
//! |    8 | `State`         | source → dest | raw: JSON vCPU + VM + device state                 |
//! |    9 | `PostcopyStart` | source → dest | `count` u32, then `count` × (`gpa` u64, `pages` u64) |
//! |   10 | `PageRequest`   | dest → source | `gpa` u64, `pages` u32: 12 B (Urgent connection)   |
//! |   11 | `Complete`      | source → dest | empty                                              |
//! |   12 | `Resumed`       | dest → source | empty                                              |
//! |   13 | `Abort`         | either        | raw: reason, UTF-8 (decoded lossily)               |
//! |   14 | `Stats`         | dest → source | raw: JSON of what the destination measured         |
//! |   15 | `DeviceData`    | source → dest | `device` u32, then that device's next migration bytes |
//! |   16 | `Alive`         | source → dest | empty (main, while data channels carry a round)    |
//!
//! Kind 0 and kinds above 16 are refused with [`ProtocolError::UnknownKind`]. `Pages` data is sent
//! straight from the caller's slice ([`FrameWriter::send_pages`]) and read straight into the
//! message's buffer, so page data is never copied inside this module.
//!
//! # Connections
//!
//! The source opens the main connection and sends `Hello` first. Every additional connection
//! starts with `Channel { session, role }`: `session` names the migration it belongs to (the
//! source picks it, the destination matches it against the migration it is serving) and `role`
//! what it carries. `Urgent` carries postcopy demand traffic only, so that a faulting vCPU never
//! waits behind the background push. Each connection and each direction numbers its frames on
//! its own.
//!
//! # Data channels
//!
//! With `channels: n` in its Hello (1..=MAX_DATA_CHANNELS; 0 or absent: none), the source opens
//! n more connections after the urgent one, `Channel { session, role: Data(i) }` for i in
//! 0..n, and sends every precopy round's `Pages` and `Zero` over them instead of over main
//! (QEMU's multifd): the page at `gpa` always travels on channel `(gpa / CHUNK) % n`
//! (`channels::CHUNK_BYTES`, 2 MiB), so the versions of one page arrive in order on one
//! connection, and the channels need no ordering between them. Each channel closes each round
//! with its own `RoundEnd { round, pages }` (its share); main's `RoundEnd { round, pages }`
//! (the total) is a barrier: the destination goes past it only once every channel's `RoundEnd`
//! for that round has arrived and the shares add up to the total. So everything sent before a
//! round's end is in guest RAM before `State`, `Complete` or `PostcopyStart` is read. Device
//! data, `State` and postcopy traffic stay on main and urgent; the source closes the data
//! channels at the switch to postcopy or at the end.
//!
//! # Precopy
//!
//! ```text
//!   source                                      destination
//!     | -- Hello(vm description) -------------------> |  checks it can host this VM
//!     | <------------------------- Accept / Refuse --- |  Refuse: nothing moved, source carries on
//!     |                                                |
//!     | -- Pages / Zero ... ---------------------------> |  round 0: all of RAM, zero pages as Zero
//!     | -- RoundEnd{round 0, pages} -------------------> |
//!     | -- Pages / Zero ... ---------------------------> |  round n: pages dirtied during round n-1
//!     | -- RoundEnd{round n, pages} -------------------> |
//!     |  (converged: pauses the guest)                 |
//!     | -- Pages / Zero ... ---------------------------> |  last round: what is still dirty
//!     | -- RoundEnd{last, pages} ----------------------> |
//!     | -- State(json) --------------------------------> |
//!     | -- Complete -----------------------------------> |  restores state, resumes the guest
//!     | <---------------------------------- Resumed --- |
//!     | <----------------------------- Stats(json) --- |  restore time (best effort)
//!     |  exits                                         |
//! ```
//!
//! Until `Resumed` arrives the source still owns the guest: if anything fails before then
//! (an error, `Abort`, a closed connection) it resumes its own guest and the destination throws
//! its copy away. `Stats` is informational: the source reads it if it comes and does not wait
//! for it to decide anything.
//!
//! # Postcopy
//!
//! ```text
//!   source                                      destination
//!     | -- Hello ------------------------------------> |
//!     | <----------------------------------- Accept --- |
//!     |  pauses the guest                              |
//!     | -- State(json) --------------------------------> |
//!     | -- PostcopyStart{pending: [(gpa, pages)]} -----> |  restores state, registers every
//!     |                                                |  pending range with userfaultfd
//!     |                                                |  (MISSING), resumes the guest
//!     |==== second connection (Urgent) ================|
//!     | -- Channel{session, role: Urgent} -------------> |
//!     | <------------------------ PageRequest{gpa, n} --- |  a vCPU faulted on a missing page
//!     | -- Pages / Zero (the requested neighbourhood) --> |  UFFDIO_COPY wakes the vCPU
//!     |        ... more requests and answers ...       |
//!     |==== main connection, at the same time ==========|
//!     | -- Pages / Zero ... ---------------------------> |  background push of every pending
//!     |                                                |  page, jumping to the neighbourhood
//!     |                                                |  of each request
//!     | -- Complete -----------------------------------> |  every pending page has been sent
//!     | <---------------------------------- Resumed --- |  sent once it holds every page
//!     | <----------------------------- Stats(json) --- |  restore time, fault latencies
//!     |  exits                                         |
//! ```
//!
//! A page may arrive twice (answered on Urgent and pushed on main). The destination keeps the
//! first copy and ignores later ones (UFFDIO_COPY's EEXIST), because the guest may have written
//! the page in between. Once `PostcopyStart` is sent the destination may be running the guest
//! with memory the source no longer has a current copy of, so the source must not resume: from
//! then on a failure loses the guest (there is no postcopy recovery).
//!
//! # Hybrid
//!
//! Precopy rounds (`Pages`/`Zero`/`RoundEnd`) as above, then, instead of a last round, the
//! postcopy part from "pauses the guest" on: `pending` is the set of pages dirtied since the
//! last round.
//!
//! # Errors
//!
//! - Any error from [`FrameReader::recv`] aborts the migration: after one the position in the
//!   stream is unknown, so the connection must be dropped. The side that sees it sends
//!   `Abort(reason)` if it still can, and closes.
//! - The receiver bounds-checks every guest range with [`check_range`] before writing guest RAM;
//!   the structural checks here (alignment, counts, overflow) are not a substitute.
//! - A refused handshake happens before any memory moves: the source sends nothing but `Hello`
//!   until `Accept`.
//! - [`FrameWriter`] applies the same checks before sending, so a bug on the sending side fails
//!   locally with the same error the peer would have reported.

// Only std, crc32fast, thiserror and serde, here and in the submodules: vmm/fuzz compiles this
// file and its folder on their own, without the KVM crates.
mod decode;
mod reader;
#[cfg(test)]
mod tests;
mod writer;

pub use reader::FrameReader;
pub use writer::FrameWriter;

pub const MAGIC: [u8; 4] = *b"VMMF";
/// 2: the `State` frame carries device state by device id (`devices::DeviceStates`) and the
/// Hello lists devices by id. A version-1 peer is refused at its first frame.
pub const VERSION: u16 = 3;
pub const HEADER_LEN: usize = 24;
pub const PAGE_SIZE: u64 = 4096;
/// 1 MiB of page data per frame: large enough to amortise the header and CRC setup, small enough
/// that a demand answer on the Urgent connection is not stuck behind a huge frame.
pub const MAX_PAGES_PER_FRAME: usize = 256;
/// Bounds what a peer can make us allocate for one frame; JSON state may be large-ish.
pub const MAX_PAYLOAD: usize = 8 << 20;
/// How an `Abort` from the destination begins when no vCPU ran there: the source, which still
/// holds the only live copy, resumes the guest even after `PostcopyStart`.
pub const ABORT_NOT_STARTED: &str = "the destination never ran the guest: ";

const KIND_HELLO: u16 = 1;
const KIND_ACCEPT: u16 = 2;
const KIND_REFUSE: u16 = 3;
const KIND_CHANNEL: u16 = 4;
const KIND_PAGES: u16 = 5;
const KIND_ZERO: u16 = 6;
const KIND_ROUND_END: u16 = 7;
const KIND_STATE: u16 = 8;
const KIND_POSTCOPY_START: u16 = 9;
const KIND_PAGE_REQUEST: u16 = 10;
const KIND_COMPLETE: u16 = 11;
const KIND_RESUMED: u16 = 12;
const KIND_ABORT: u16 = 13;
const KIND_STATS: u16 = 14;
const KIND_DEVICE_DATA: u16 = 15;
const KIND_ALIVE: u16 = 16;

/// The `gpa` that precedes page data in a `Pages` payload.
const PAGES_PREFIX: usize = 8;
const RANGE_LEN: usize = 16;

/// Data connections a migration may open besides the main and urgent ones.
pub const MAX_DATA_CHANNELS: u8 = 8;

/// What an additional connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    Main,
    Urgent,
    /// Data connection `i` (< MAX_DATA_CHANNELS): precopy pages of its share of guest RAM
    /// (`channels`), each round closed by its own `RoundEnd`.
    Data(u8),
}

impl Role {
    fn to_wire(self) -> u8 {
        match self {
            Role::Main => 0,
            Role::Urgent => 1,
            // Validated on construction by the sender (`FrameWriter::send` refuses others).
            Role::Data(i) => 2u8.saturating_add(i),
        }
    }

    pub(super) fn from_wire(b: u8) -> Option<Role> {
        match b {
            0 => Some(Role::Main),
            1 => Some(Role::Urgent),
            b if b >= 2 && b - 2 < MAX_DATA_CHANNELS => Some(Role::Data(b - 2)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Source → destination, first frame on the main connection: JSON VM description.
    Hello(Vec<u8>),
    /// Destination → source: the destination can host the VM described in `Hello`.
    Accept,
    /// `Accept` with options (JSON `presend::AcceptOptions`; same kind, non-empty payload).
    AcceptWith(Vec<u8>),
    /// Destination → source: it cannot, and why (text for the source's user, as `Abort`).
    Refuse(String),
    /// Source → destination: first frame on every additional connection.
    Channel { session: u64, role: Role },
    /// Guest pages from `gpa`: a non-zero multiple of PAGE_SIZE, at most MAX_PAGES_PER_FRAME pages.
    Pages { gpa: u64, data: Vec<u8> },
    /// `pages` pages from `gpa` are all zero.
    Zero { gpa: u64, pages: u64 },
    /// End of precopy round `round`, in which `pages` pages were sent.
    RoundEnd { round: u32, pages: u64 },
    /// Full vCPU + VM + device state (JSON).
    State(Vec<u8>),
    /// Ranges `(gpa, pages)` the destination does not have yet; it resumes the guest on them.
    PostcopyStart { pending: Vec<(u64, u64)> },
    /// Destination → source on the Urgent connection: a vCPU is waiting on these pages.
    PageRequest { gpa: u64, pages: u32 },
    /// Source → destination: everything has been sent.
    Complete,
    /// Destination → source: the guest runs on the destination, which holds every page.
    Resumed,
    /// Either way: giving up, with the reason.
    Abort(String),
    /// Destination → source, after `Resumed`: JSON of the destination's own measurements
    /// (restore time, postcopy faults and their latency).
    Stats(Vec<u8>),
    /// Source → destination: the next bytes of passed-through device `device`'s VFIO
    /// migration data stream (opaque to vmm; the destination's device checks them), in order.
    /// Never empty.
    DeviceData { device: u32, data: Vec<u8> },
    /// Source → destination on main while the data channels carry a round: the source is
    /// there (main is otherwise silent then, and silence ends a migration).
    Alive,
}

impl Message {
    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }

    /// The `kind` field this message travels with.
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello(_) => KIND_HELLO,
            Message::Accept | Message::AcceptWith(_) => KIND_ACCEPT,
            Message::Refuse(_) => KIND_REFUSE,
            Message::Channel { .. } => KIND_CHANNEL,
            Message::Pages { .. } => KIND_PAGES,
            Message::Zero { .. } => KIND_ZERO,
            Message::RoundEnd { .. } => KIND_ROUND_END,
            Message::State(_) => KIND_STATE,
            Message::PostcopyStart { .. } => KIND_POSTCOPY_START,
            Message::PageRequest { .. } => KIND_PAGE_REQUEST,
            Message::Complete => KIND_COMPLETE,
            Message::Resumed => KIND_RESUMED,
            Message::Abort(_) => KIND_ABORT,
            Message::Stats(_) => KIND_STATS,
            Message::DeviceData { .. } => KIND_DEVICE_DATA,
            Message::Alive => KIND_ALIVE,
        }
    }
}

/// The message name for a wire `kind`, or "unknown" for one this version does not define.
pub fn kind_name(kind: u16) -> &'static str {
    match kind {
        KIND_HELLO => "Hello",
        KIND_ACCEPT => "Accept",
        KIND_REFUSE => "Refuse",
        KIND_CHANNEL => "Channel",
        KIND_PAGES => "Pages",
        KIND_ZERO => "Zero",
        KIND_ROUND_END => "RoundEnd",
        KIND_STATE => "State",
        KIND_POSTCOPY_START => "PostcopyStart",
        KIND_PAGE_REQUEST => "PageRequest",
        KIND_COMPLETE => "Complete",
        KIND_RESUMED => "Resumed",
        KIND_ABORT => "Abort",
        KIND_STATS => "Stats",
        KIND_DEVICE_DATA => "DeviceData",
        KIND_ALIVE => "Alive",
        _ => "unknown",
    }
}

fn frame_context(kind: &Option<u16>, seq: &Option<u64>) -> String {
    match (kind, seq) {
        (Some(k), Some(s)) => format!(" (frame {s}, {} kind {k})", kind_name(*k)),
        _ => String::new(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("connection closed inside a frame {part}: got {got} of {expected} bytes{}", frame_context(.kind, .seq))]
    Truncated {
        /// "header" or "payload".
        part: &'static str,
        got: usize,
        expected: usize,
        /// Known once the header has been read.
        kind: Option<u16>,
        seq: Option<u64>,
    },
    #[error("migration connection I/O failed: {0}")]
    Io(std::io::Error),
    /// The socket's read timeout passed (EAGAIN, which alone would say nothing useful).
    #[error(
        "timed out waiting for the peer: nothing arrived within the connection's read timeout"
    )]
    TimedOut,
    #[error("bad frame magic \"{}\", expected \"VMMF\" (not a vmm migration stream, or out of step)", .found.escape_ascii())]
    BadMagic { found: [u8; 4] },
    #[error(
        "peer speaks migration protocol version {found}; this build supports version {supported}"
    )]
    Version { found: u16, supported: u16 },
    #[error("frame {seq}: unknown message kind {kind}")]
    UnknownKind { kind: u16, seq: u64 },
    #[error("frame {seq} ({} kind {kind}): payload of {len} bytes exceeds the limit of {max}", kind_name(*.kind))]
    TooLarge {
        len: u64,
        max: usize,
        kind: u16,
        seq: u64,
    },
    /// `expected` is the CRC carried in the header, `found` the CRC of the bytes received.
    #[error("frame {seq} ({} kind {kind}): checksum mismatch: header says {expected:#010x}, data gives {found:#010x}", kind_name(*.kind))]
    Checksum {
        kind: u16,
        seq: u64,
        expected: u32,
        found: u32,
    },
    #[error("frame sequence number {found}, expected {expected}: a frame was lost, repeated or reordered")]
    Sequence { expected: u64, found: u64 },
    #[error("frame {seq} ({kind}): malformed payload: {reason}")]
    Malformed {
        kind: &'static str,
        seq: u64,
        reason: String,
    },
    #[error("guest range [{gpa:#x}, {gpa:#x} + {len:#x}) is not inside guest RAM")]
    OutOfRange { gpa: u64, len: u64 },
    #[error("expected {expected}, got {found}")]
    Unexpected {
        expected: &'static str,
        found: &'static str,
    },
}

// Not `#[from]`: that would make the I/O error the `source()` too, and error chains would print
// it twice.
impl From<std::io::Error> for ProtocolError {
    fn from(e: std::io::Error) -> Self {
        ProtocolError::Io(e)
    }
}

impl ProtocolError {
    /// For state machines: `msg` arrived where `expected` (a `Message::name`, or a description
    /// such as "Pages, Zero or RoundEnd") was due.
    pub fn unexpected(expected: &'static str, msg: &Message) -> Self {
        ProtocolError::Unexpected {
            expected,
            found: msg.name(),
        }
    }
}

fn malformed(kind: &'static str, seq: u64, reason: String) -> ProtocolError {
    ProtocolError::Malformed { kind, seq, reason }
}

/// Checks a run of `pages` pages from `gpa`, as carried by Zero, PageRequest and PostcopyStart.
fn check_span(kind: &'static str, seq: u64, gpa: u64, pages: u64) -> Result<(), ProtocolError> {
    if gpa & (PAGE_SIZE - 1) != 0 {
        return Err(malformed(
            kind,
            seq,
            format!("gpa {gpa:#x} is not aligned to {PAGE_SIZE}"),
        ));
    }
    if pages == 0 {
        return Err(malformed(kind, seq, format!("zero pages at gpa {gpa:#x}")));
    }
    let end = pages
        .checked_mul(PAGE_SIZE)
        .and_then(|bytes| gpa.checked_add(bytes));
    if end.is_none() {
        return Err(malformed(
            kind,
            seq,
            format!("gpa {gpa:#x} + {pages} pages overflows the address space"),
        ));
    }
    Ok(())
}

fn check_pages(seq: u64, gpa: u64, data_len: usize) -> Result<(), ProtocolError> {
    let kind = kind_name(KIND_PAGES);
    if data_len == 0 {
        return Err(malformed(
            kind,
            seq,
            format!("no page data at gpa {gpa:#x}"),
        ));
    }
    let len = data_len as u64;
    if len & (PAGE_SIZE - 1) != 0 {
        return Err(malformed(
            kind,
            seq,
            format!("{len} bytes of page data at gpa {gpa:#x}: not a multiple of {PAGE_SIZE}"),
        ));
    }
    let pages = len / PAGE_SIZE;
    if pages > MAX_PAGES_PER_FRAME as u64 {
        return Err(malformed(
            kind,
            seq,
            format!("{pages} pages at gpa {gpa:#x}, more than the {MAX_PAGES_PER_FRAME} allowed per frame"),
        ));
    }
    check_span(kind, seq, gpa, pages)
}

/// Is `[gpa, gpa + len)` entirely inside one of `ram` = `[(start_gpa, size)]`?
///
/// An empty range is refused: no valid message produces one, and accepting it would let a
/// corrupt `gpa` through unchecked. A range spanning two adjacent regions is refused too, since
/// the receiver writes each range into one region's mapping.
pub fn check_range(ram: &[(u64, u64)], gpa: u64, len: u64) -> Result<(), ProtocolError> {
    let out = ProtocolError::OutOfRange { gpa, len };
    if len == 0 {
        return Err(out);
    }
    let Some(end) = gpa.checked_add(len) else {
        return Err(out);
    };
    // A region reaching past u64::MAX is nonsense, but saturating keeps the test correct for it.
    let inside = ram
        .iter()
        .any(|&(start, size)| gpa >= start && end <= start.saturating_add(size));
    if inside {
        Ok(())
    } else {
        Err(out)
    }
}
