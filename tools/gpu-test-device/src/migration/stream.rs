//! The migration data stream: versioned records, written by the source, parsed incrementally
//! (split anywhere) and validated by the destination.
//!
//! Every number is little endian. The stream is a sequence of records, each
//! `{ u32 kind; u32 len; u8 payload[len] }`:
//!
//! | kind | name         | payload                                                          |
//! |------|--------------|------------------------------------------------------------------|
//! | 1    | HEADER       | u64 magic "GPUTMIG\0", u32 version (1), u32 page size (4096), u64 VRAM size, u16 vendor, u16 device, u16 MSI-X vectors, u16 0 |
//! | 2    | VRAM_DATA    | u64 offset, u32 count (1..=64), u32 0, then `count` pages        |
//! | 3    | VRAM_ZERO    | u64 offset, u64 count (>= 1): pages that read as zero            |
//! | 4    | DEVICE_STATE | see [`DeviceState`]                                              |
//! | 5    | END          | nothing                                                          |
//!
//! HEADER comes first and once; VRAM records any number of times (a later one for the same
//! page replaces an earlier one); DEVICE_STATE once, then END last. Offsets are page aligned
//! and every range lies inside VRAM.

use gpu_test_device::pci::PAGE_SIZE;

use crate::config_space::Identity;
use crate::engines::{DmaJob, KernelJob, PageWriterJob};
use crate::registers::Registers;

/// "GPUTMIG\0".
pub const MAGIC: u64 = u64::from_le_bytes(*b"GPUTMIG\0");
/// Version of this format.
pub const VERSION: u32 = 1;

pub const KIND_HEADER: u32 = 1;
pub const KIND_VRAM_DATA: u32 = 2;
pub const KIND_VRAM_ZERO: u32 = 3;
pub const KIND_DEVICE_STATE: u32 = 4;
pub const KIND_END: u32 = 5;

/// Bytes of a record's `{ kind, len }`.
pub const RECORD_HEADER: usize = 8;
/// Bytes of a HEADER payload.
const HEADER_LEN: usize = 32;
/// Bytes before the pages of a VRAM_DATA payload.
pub const VRAM_DATA_HEADER: usize = 16;
/// The most pages one VRAM_DATA record carries.
pub const MAX_DATA_PAGES: usize = 64;
/// The longest payload a reader accepts: a full VRAM_DATA record (the device state is
/// smaller: 128 MSI-X vectors are 2 KiB of table).
pub const MAX_RECORD_LEN: usize = VRAM_DATA_HEADER + MAX_DATA_PAGES * PAGE_SIZE as usize;

/// A stream the destination refuses.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("the stream does not begin with a header record")]
    NoHeader,
    #[error("bad magic {0:#x}")]
    Magic(u64),
    #[error("version {0}, this device reads version {VERSION}")]
    Version(u32),
    #[error("{what}: the stream has {theirs}, this device {ours}")]
    Mismatch {
        what: &'static str,
        theirs: u64,
        ours: u64,
    },
    #[error("record kind {0} unknown or out of place")]
    Kind(u32),
    #[error("record kind {kind} with a {len}-byte payload")]
    Length { kind: u32, len: u32 },
    #[error("VRAM range {offset:#x} + {count} pages is misaligned, empty or outside VRAM")]
    Range { offset: u64, count: u64 },
    #[error("device state: {0}")]
    State(&'static str),
    #[error("bytes after the end record")]
    Trailing,
    #[error("the stream ended before its end record")]
    Incomplete,
}

/// Appends a record.
pub fn record(out: &mut Vec<u8>, kind: u32, payload: &[&[u8]]) {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    for part in payload {
        out.extend_from_slice(part);
    }
}

/// The HEADER record of a device of `identity`.
pub fn header(out: &mut Vec<u8>, identity: &Identity) {
    let mut payload = Writer::default();
    payload.u64(MAGIC);
    payload.u32(VERSION);
    payload.u32(PAGE_SIZE as u32);
    payload.u64(identity.vram_size);
    payload.u16(identity.vendor_id);
    payload.u16(identity.device_id);
    payload.u16(identity.msix_vectors);
    payload.u16(0);
    record(out, KIND_HEADER, &[&payload.0]);
}

/// Little-endian writer.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
}

/// Little-endian reader of a payload whose length was checked: reading past it is an error
/// all the same, never a panic.
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StreamError> {
        if self.0.len() < n {
            return Err(StreamError::State("shorter than its fields"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, StreamError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, StreamError> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, StreamError> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
}

/// Everything of the device that is not memory: registers, counters, engines and where they
/// are, config space, MSI-X table. Not state: eventfds, DMA maps and DMA logging (the
/// destination's VMM sets its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    pub regs: Registers,
    pub pw_written: u64,
    pub k_passes: u32,
    /// A running transfer and the bytes of it copied.
    pub dma: Option<(DmaJob, u64)>,
    /// A running page writer (its position is `pw_written`).
    pub page_writer: Option<PageWriterJob>,
    /// A running kernel, how far into its pass and with which pattern.
    pub kernel: Option<(KernelJob, u64, u32)>,
    pub config: Vec<u8>,
    pub msix_table: Vec<u8>,
}

impl DeviceState {
    /// The DEVICE_STATE payload, in field order (the layout of version 1).
    pub fn encode(&self) -> Vec<u8> {
        let r = &self.regs;
        let mut w = Writer::default();
        for v in [r.scratch, r.irq_enable, r.irq_vector, r.irq_count] {
            w.u32(v);
        }
        for v in [r.dma_src, r.dma_dst, r.dma_len] {
            w.u64(v);
        }
        for v in [r.dma_dir, r.dma_status, r.dma_completions, r.dma_errors] {
            w.u32(v);
        }
        w.u64(r.dma_last_ns);
        w.u64(r.pw_base);
        for v in [r.pw_pages, r.pw_stride, r.pw_rate, r.pw_limit, r.pw_status] {
            w.u32(v);
        }
        w.u64(r.k_offset);
        w.u64(r.k_len);
        w.u32(r.k_pattern);
        w.u32(r.k_status);
        w.u64(self.pw_written);
        w.u32(self.k_passes);
        let (dma, done) = self.dma.unwrap_or((
            DmaJob {
                src: 0,
                dst: 0,
                len: 0,
                dir: 0,
            },
            0,
        ));
        w.u32(u32::from(self.dma.is_some()));
        w.u64(dma.src);
        w.u64(dma.dst);
        w.u64(dma.len);
        w.u32(dma.dir);
        w.u64(done);
        let pw = self.page_writer.unwrap_or(PageWriterJob {
            base: 0,
            pages: 0,
            stride: 0,
            rate: 0,
            limit: 0,
        });
        w.u32(u32::from(self.page_writer.is_some()));
        w.u64(pw.base);
        for v in [pw.pages, pw.stride, pw.rate, pw.limit] {
            w.u32(v);
        }
        let (k, at, pattern) = self.kernel.unwrap_or((
            KernelJob {
                offset: 0,
                len: 0,
                once: false,
            },
            0,
            0,
        ));
        w.u32(u32::from(self.kernel.is_some()));
        w.u64(k.offset);
        w.u64(k.len);
        w.u32(u32::from(k.once));
        w.u64(at);
        w.u32(pattern);
        w.0.extend_from_slice(&self.config);
        w.0.extend_from_slice(&self.msix_table);
        w.0
    }

    /// Parses and checks a DEVICE_STATE payload for a device of `identity`: exact length,
    /// flags 0 or 1, positions inside their jobs, a running engine only with a busy status.
    pub fn decode(payload: &[u8], identity: &Identity) -> Result<Self, StreamError> {
        let table_len = usize::from(identity.msix_vectors) * 16;
        if payload.len() != FIXED_STATE_LEN + gpu_test_device::pci::CONFIG_SIZE as usize + table_len
        {
            return Err(StreamError::Length {
                kind: KIND_DEVICE_STATE,
                len: payload.len() as u32,
            });
        }
        let mut rd = Reader(payload);
        let flag = |v: u32| match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(StreamError::State("a flag is neither 0 nor 1")),
        };
        let mut r = Registers {
            scratch: rd.u32()?,
            irq_enable: rd.u32()?,
            irq_vector: rd.u32()?,
            irq_count: rd.u32()?,
            dma_src: rd.u64()?,
            dma_dst: rd.u64()?,
            dma_len: rd.u64()?,
            ..Registers::default()
        };
        r.dma_dir = rd.u32()?;
        r.dma_status = rd.u32()?;
        r.dma_completions = rd.u32()?;
        r.dma_errors = rd.u32()?;
        r.dma_last_ns = rd.u64()?;
        r.pw_base = rd.u64()?;
        r.pw_pages = rd.u32()?;
        r.pw_stride = rd.u32()?;
        r.pw_rate = rd.u32()?;
        r.pw_limit = rd.u32()?;
        r.pw_status = rd.u32()?;
        r.k_offset = rd.u64()?;
        r.k_len = rd.u64()?;
        r.k_pattern = rd.u32()?;
        r.k_status = rd.u32()?;
        let pw_written = rd.u64()?;
        let k_passes = rd.u32()?;
        let dma_running = flag(rd.u32()?)?;
        let dma = DmaJob {
            src: rd.u64()?,
            dst: rd.u64()?,
            len: rd.u64()?,
            dir: rd.u32()?,
        };
        let dma_done = rd.u64()?;
        let pw_running = flag(rd.u32()?)?;
        let pw = PageWriterJob {
            base: rd.u64()?,
            pages: rd.u32()?,
            stride: rd.u32()?,
            rate: rd.u32()?,
            limit: rd.u32()?,
        };
        let k_running = flag(rd.u32()?)?;
        let k = KernelJob {
            offset: rd.u64()?,
            len: rd.u64()?,
            once: flag(rd.u32()?)?,
        };
        let k_at = rd.u64()?;
        let k_pattern = rd.u32()?;
        let config = rd
            .take(gpu_test_device::pci::CONFIG_SIZE as usize)?
            .to_vec();
        let msix_table = rd.take(table_len)?.to_vec();

        use gpu_test_device::regs::STATUS_BUSY;
        if r.irq_vector >= u32::from(identity.msix_vectors) {
            return Err(StreamError::State("IRQ vector beyond the MSI-X table"));
        }
        if dma_running != (r.dma_status == STATUS_BUSY) || dma_done > dma.len {
            return Err(StreamError::State("DMA engine and its status disagree"));
        }
        if pw_running != (r.pw_status == STATUS_BUSY) {
            return Err(StreamError::State("page writer and its status disagree"));
        }
        // A pass in progress is at a multiple of 4 strictly inside its range.
        let k_position = k_at % 4 == 0 && (k_at == 0 || k_at < k.len);
        if k_running != (r.k_status == STATUS_BUSY) || !k_position {
            return Err(StreamError::State(
                "kernel and its status or position disagree",
            ));
        }
        Ok(Self {
            regs: r,
            pw_written,
            k_passes,
            dma: dma_running.then_some((dma, dma_done)),
            page_writer: pw_running.then_some(pw),
            kernel: k_running.then_some((k, k_at, k_pattern)),
            config,
            msix_table,
        })
    }
}

/// Bytes of the DEVICE_STATE payload before config space and the MSI-X table.
const FIXED_STATE_LEN: usize = 4 * 4 + 3 * 8 + 4 * 4 + 8 + 8 + 5 * 4 + 2 * 8 + 2 * 4 // registers
    + 8 + 4 // counters
    + 4 + 3 * 8 + 4 + 8 // DMA
    + 4 + 8 + 4 * 4 // page writer
    + 4 + 2 * 8 + 4 + 8 + 4; // kernel

/// What a parsed record asks of the destination.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    Data { offset: u64, pages: &'a [u8] },
    Zero { offset: u64, count: u64 },
    State(Box<DeviceState>),
    End,
}

/// The destination's incremental parser: bytes in, checked records out.
pub struct Parser {
    identity: Identity,
    pending: Vec<u8>,
    seen_header: bool,
    seen_state: bool,
    ended: bool,
    failed: Option<StreamError>,
}

impl Parser {
    pub fn new(identity: Identity) -> Self {
        Self {
            identity,
            pending: Vec::new(),
            seen_header: false,
            seen_state: false,
            ended: false,
            failed: None,
        }
    }

    /// Takes the next piece of the stream; hands each whole record to `apply`. After an
    /// error every later call fails with it: a broken stream is not resumed.
    pub fn feed(
        &mut self,
        data: &[u8],
        apply: &mut dyn FnMut(Record<'_>),
    ) -> Result<(), StreamError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let result = self.feed_inner(data, apply);
        if let Err(error) = &result {
            self.failed = Some(error.clone());
            self.pending = Vec::new();
        }
        result
    }

    fn feed_inner(
        &mut self,
        data: &[u8],
        apply: &mut dyn FnMut(Record<'_>),
    ) -> Result<(), StreamError> {
        if self.ended && !data.is_empty() {
            return Err(StreamError::Trailing);
        }
        self.pending.extend_from_slice(data);
        let mut at = 0;
        let pending = std::mem::take(&mut self.pending);
        let outcome = loop {
            let rest = &pending[at..];
            if rest.len() < RECORD_HEADER {
                break Ok(());
            }
            let kind = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
            if len as usize > MAX_RECORD_LEN {
                break Err(StreamError::Length { kind, len });
            }
            let Some(payload) = rest.get(RECORD_HEADER..RECORD_HEADER + len as usize) else {
                break Ok(());
            };
            if let Err(e) = self.record(kind, payload, apply) {
                break Err(e);
            }
            at += RECORD_HEADER + len as usize;
            if self.ended && at < pending.len() {
                break Err(StreamError::Trailing);
            }
        };
        self.pending = pending;
        self.pending.drain(..at);
        outcome
    }

    fn record(
        &mut self,
        kind: u32,
        payload: &[u8],
        apply: &mut dyn FnMut(Record<'_>),
    ) -> Result<(), StreamError> {
        let bad_len = || StreamError::Length {
            kind,
            len: payload.len() as u32,
        };
        if !self.seen_header {
            if kind != KIND_HEADER {
                return Err(StreamError::NoHeader);
            }
            if payload.len() != HEADER_LEN {
                return Err(bad_len());
            }
            return self.check_header(payload);
        }
        let mut rd = Reader(payload);
        match kind {
            KIND_VRAM_DATA if !self.seen_state => {
                if payload.len() < VRAM_DATA_HEADER {
                    return Err(bad_len());
                }
                let offset = rd.u64()?;
                let count = rd.u32()?;
                let _reserved = rd.u32()?;
                let pages = &payload[VRAM_DATA_HEADER..];
                let fits = (count as usize) <= MAX_DATA_PAGES
                    && pages.len() == count as usize * PAGE_SIZE as usize;
                if !fits {
                    return Err(bad_len());
                }
                self.check_range(offset, u64::from(count))?;
                apply(Record::Data { offset, pages });
            }
            KIND_VRAM_ZERO if !self.seen_state => {
                if payload.len() != 16 {
                    return Err(bad_len());
                }
                let offset = rd.u64()?;
                let count = rd.u64()?;
                self.check_range(offset, count)?;
                apply(Record::Zero { offset, count });
            }
            KIND_DEVICE_STATE if !self.seen_state => {
                let state = DeviceState::decode(payload, &self.identity)?;
                self.seen_state = true;
                apply(Record::State(Box::new(state)));
            }
            KIND_END if self.seen_state => {
                if !payload.is_empty() {
                    return Err(bad_len());
                }
                self.ended = true;
                apply(Record::End);
            }
            _ => return Err(StreamError::Kind(kind)),
        }
        Ok(())
    }

    fn check_header(&mut self, payload: &[u8]) -> Result<(), StreamError> {
        let mut rd = Reader(payload);
        let magic = rd.u64()?;
        if magic != MAGIC {
            return Err(StreamError::Magic(magic));
        }
        let version = rd.u32()?;
        if version != VERSION {
            return Err(StreamError::Version(version));
        }
        let id = self.identity;
        let fields: [(&'static str, u64, u64); 5] = [
            ("page size", u64::from(rd.u32()?), PAGE_SIZE),
            ("VRAM size", rd.u64()?, id.vram_size),
            ("vendor id", u64::from(rd.u16()?), u64::from(id.vendor_id)),
            ("device id", u64::from(rd.u16()?), u64::from(id.device_id)),
            (
                "MSI-X vectors",
                u64::from(rd.u16()?),
                u64::from(id.msix_vectors),
            ),
        ];
        for (what, theirs, ours) in fields {
            if theirs != ours {
                return Err(StreamError::Mismatch { what, theirs, ours });
            }
        }
        self.seen_header = true;
        Ok(())
    }

    /// `count` pages from `offset` are a non-empty, aligned range inside VRAM.
    fn check_range(&self, offset: u64, count: u64) -> Result<(), StreamError> {
        let inside = count
            .checked_mul(PAGE_SIZE)
            .and_then(|len| offset.checked_add(len))
            .is_some_and(|end| end <= self.identity.vram_size);
        if count == 0 || offset % PAGE_SIZE != 0 || !inside {
            return Err(StreamError::Range { offset, count });
        }
        Ok(())
    }

    /// Whether the whole stream, END included, arrived and was valid.
    pub fn finish(&self) -> Result<(), StreamError> {
        match &self.failed {
            Some(error) => Err(error.clone()),
            None if self.ended => Ok(()),
            None => Err(StreamError::Incomplete),
        }
    }
}
