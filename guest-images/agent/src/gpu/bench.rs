//! `vfio-bench`: what the passed-through test device costs guest user space, measured there.
//!
//! - Access: 4-byte reads and writes to a mapped BAR page (VRAM through the VFIO mmap: a
//!   memory slot in the host, no exit) and to the trapped register page (SCRATCH at BAR0+0x8:
//!   each access exits to the VMM, which forwards it to the vfio-user server), through an mmap
//!   of BAR0 where vfio-pci allows it, else pread/pwrite on the region (`trapped_via`). Each
//!   figure is the median over batches of the ns per access of a batch.
//! - MSI-X: the doorbell of a 64-byte DMA (the device's quickest interrupt) to the wake-up of
//!   poll(2) on the vector's eventfd, median and p90, with the doorbell write's own cost.
//! - DMA throughput, VRAM -> RAM and RAM -> VRAM, of one physically contiguous buffer (a 2 MiB
//!   hugetlb page if the guest has one, else the longest run of consecutive frames of a locked
//!   buffer, from pagemap: `dma_contig`), completion seen by polling DMA_STATUS (interrupts
//!   off, so the figure is the copy, not the interrupt path), against a plain memcpy of the
//!   same size in guest RAM measured in the same command.

use std::hint::black_box;
use std::time::Instant;

use guest_abi::pattern::fill_pattern;

use super::ops::first_difference;
use super::regs::*;
use super::session::{Session, WAIT};
use super::stats::{median, mib_per_s, per_access_ns, percentile, Figures};
use crate::pagemap::{longest_run, DmaBuffer, HUGE_PAGE};
use crate::sysinfo::meminfo_kib;
use crate::vfio::mapping::Mapping;

/// Default accesses per trapped batch, and MSI-X samples.
pub const DEFAULT_ITERATIONS: u64 = 200;
pub const MAX_ITERATIONS: u64 = 100_000;
/// Batches per access figure and transfers per DMA figure (odd: the median is a sample).
const BATCHES: usize = 9;
/// A mapped access costs orders of magnitude less than a trapped one: more of them per batch.
const MAPPED_SCALE: u64 = 256;
/// The locked buffer whose longest physically contiguous run (up to half of it) the DMA
/// figures use.
const POOL_BYTES: usize = 16 << 20;
/// Below this a contiguous run is too short to say anything about throughput.
const MIN_TRANSFER: usize = 64 << 10;
/// Guest memory left free after the buffers (an out-of-memory init panics the kernel).
const HEADROOM_KIB: u64 = 24 << 10;

/// The trapped register page, as the guest reaches it.
enum Regs<'a> {
    Mapped(Mapping),
    Region(&'a Session),
}

impl Regs<'_> {
    fn via(&self) -> &'static str {
        match self {
            Regs::Mapped(_) => "mmap",
            Regs::Region(_) => "pread",
        }
    }

    fn read(&self, reg: u64) -> Result<u32, String> {
        match self {
            Regs::Mapped(m) => Ok(m.read_u32(reg as usize)),
            Regs::Region(s) => s.read(reg),
        }
    }

    fn write(&self, reg: u64, value: u32) -> Result<(), String> {
        match self {
            Regs::Mapped(m) => {
                m.write_u32(reg as usize, value);
                Ok(())
            }
            Regs::Region(s) => s.write(reg, value),
        }
    }
}

fn registers(s: &Session) -> Regs<'_> {
    // vfio-pci maps whole pages of a BAR it allows mmap on; any refusal means pread/pwrite.
    match s.dev.map(&s.regs_region(), 0, 4096) {
        Ok(m) if m.read_u32(ID as usize) == ID_VALUE => Regs::Mapped(m),
        _ => Regs::Region(s),
    }
}

/// ns per access of each of `BATCHES` batches of `per_batch` calls of `op(i)`.
fn batches(
    per_batch: u64,
    mut op: impl FnMut(u64) -> Result<(), String>,
) -> Result<Vec<f64>, String> {
    let mut out = Vec::with_capacity(BATCHES);
    for b in 0..BATCHES as u64 {
        let start = Instant::now();
        for i in 0..per_batch {
            op(b * per_batch + i)?;
        }
        out.extend(per_access_ns(start.elapsed().as_nanos(), per_batch));
    }
    Ok(out)
}

fn access(s: &Session, regs: &Regs, iterations: u64, f: &mut Figures) -> Result<(), String> {
    let vram = s.dev.map(&s.vram, 0, 4096)?;
    let mapped = iterations * MAPPED_SCALE;
    let mapped_read = batches(mapped, |_| {
        black_box(vram.read_u32(8));
        Ok(())
    })?;
    let mapped_write = batches(mapped, |i| {
        vram.write_u32(8, i as u32);
        Ok(())
    })?;
    let last = (BATCHES as u64 * mapped - 1) as u32;
    if vram.read_u32(8) != last {
        return Err("a VRAM word through the mmap did not keep the last write".into());
    }
    let trapped_read = batches(iterations, |_| regs.read(SCRATCH).map(drop))?;
    let trapped_write = batches(iterations, |i| regs.write(SCRATCH, i as u32))?;
    let last = (BATCHES as u64 * iterations - 1) as u32;
    if regs.read(SCRATCH)? != last {
        return Err("SCRATCH did not keep the last write".into());
    }
    let (mr, mw) = (median(&mapped_read), median(&mapped_write));
    let (tr, tw) = (median(&trapped_read), median(&trapped_write));
    f.text("trapped_via", regs.via());
    f.num("mapped_read_ns", mr)?;
    f.num("mapped_write_ns", mw)?;
    f.num("trapped_read_ns", tr)?;
    f.num("trapped_write_ns", tw)?;
    f.num("read_ratio", tr.zip(mr).map(|(t, m)| t / m))?;
    f.num("write_ratio", tw.zip(mw).map(|(t, m)| t / m))
}

/// The cost of reading the clock, so a reader can judge the per-sample figures.
fn clock_ns() -> Option<f64> {
    let samples: Vec<f64> = (0..BATCHES)
        .filter_map(|_| {
            let start = Instant::now();
            for _ in 0..1000 {
                black_box(Instant::now());
            }
            per_access_ns(start.elapsed().as_nanos(), 1000)
        })
        .collect();
    median(&samples)
}

fn msix(s: &Session, regs: &Regs, samples: u64, f: &mut Figures) -> Result<(), String> {
    let scratch = DmaBuffer::new(4096)?;
    let phys = scratch
        .segments()
        .first()
        .map(|seg| seg.phys)
        .ok_or("empty scratch buffer")?;
    let fd = s.irq_fd(0)?;
    s.write(IRQ_VECTOR, 0)?;
    s.write64(DMA_SRC_LO, 0)?;
    s.write64(DMA_DST_LO, phys)?;
    s.write64(DMA_LEN_LO, 64)?;
    s.write(DMA_DIR, DIR_VRAM_TO_RAM)?;
    s.write(IRQ_ENABLE, IRQ_DMA)?;
    s.drain()?;
    let (mut latency, mut doorbell) = (Vec::new(), Vec::new());
    for i in 0..samples {
        let t0 = Instant::now();
        regs.write(DMA_DOORBELL, 1)?;
        let t1 = Instant::now();
        let woke = fd
            .poll_readable(WAIT)
            .map_err(|e| format!("eventfd: {e}"))?;
        let t2 = Instant::now();
        if !woke {
            return Err(format!(
                "sample {i}: no interrupt within {} s (status {:#x})",
                WAIT.as_secs(),
                regs.read(DMA_STATUS).unwrap_or(u32::MAX)
            ));
        }
        s.drain()?;
        match regs.read(DMA_STATUS)? {
            STATUS_DONE => {}
            st => {
                return Err(format!(
                    "sample {i}: DMA status {st:#x} ({})",
                    status_name(st)
                ))
            }
        }
        latency.push((t2 - t0).as_nanos() as f64);
        doorbell.push((t1 - t0).as_nanos() as f64);
    }
    scratch.check_frames()?;
    f.text("msix_samples", samples);
    f.num("msix_p50_ns", percentile(&latency, 50.0))?;
    f.num("msix_p90_ns", percentile(&latency, 90.0))?;
    f.num("doorbell_p50_ns", percentile(&doorbell, 50.0))
}

/// A physically contiguous piece of locked guest RAM, and locked memory for the memcpy
/// baseline (already faulted in: a page fault costs the emulated guest kernel milliseconds).
struct Contiguous {
    buf: DmaBuffer,
    how: &'static str,
    phys: u64,
    /// Buffer byte offset of each page of the piece, in physical order.
    pages: Vec<usize>,
    page: usize,
    /// At least twice the piece: the memcpy copies its first half into its second.
    copy: Option<DmaBuffer>,
}

impl Contiguous {
    fn bytes(&self) -> usize {
        self.pages.len() * self.page
    }

    /// A 2 MiB hugetlb page, else the longest run of consecutive frames of a locked pool (of
    /// at most half the pool, so the pool also serves the memcpy).
    fn get() -> Result<Contiguous, String> {
        if let Ok(buf) = DmaBuffer::new_huge(HUGE_PAGE) {
            let page = buf.page_bytes();
            if let Some((first, pages)) = longest_run(buf.pfns(), HUGE_PAGE / page) {
                if pages.len() * page == HUGE_PAGE {
                    return Ok(Contiguous {
                        phys: first * page as u64,
                        pages: pages.iter().map(|p| p * page).collect(),
                        buf,
                        how: "hugetlb-2M",
                        page,
                        copy: Some(DmaBuffer::new(2 * HUGE_PAGE)?),
                    });
                }
            }
        }
        let avail = meminfo_kib("MemAvailable").unwrap_or(0);
        let pool = POOL_BYTES.min(avail.saturating_sub(HEADROOM_KIB) as usize * 1024);
        if pool < 2 * MIN_TRANSFER {
            return Err(format!(
                "{avail} KiB available: too little for a DMA buffer"
            ));
        }
        let buf = DmaBuffer::new(pool)?;
        let page = buf.page_bytes();
        let (first, pages) = longest_run(buf.pfns(), pool / 2 / page).ok_or("empty DMA buffer")?;
        if pages.len() * page < MIN_TRANSFER {
            return Err(format!(
                "the longest physically contiguous run of a {pool}-byte buffer is {} pages",
                pages.len()
            ));
        }
        Ok(Contiguous {
            phys: first * page as u64,
            pages: pages.iter().map(|p| p * page).collect(),
            buf,
            how: "pagemap-run",
            page,
            copy: None,
        })
    }

    /// Page `i` of the piece's pattern.
    fn pattern(&self, seed: u64, i: usize, out: &mut [u8]) {
        fill_pattern(seed.wrapping_add(i as u64), out);
    }

    fn fill(&mut self, seed: u64) {
        let mut piece = vec![0u8; self.page];
        for i in 0..self.pages.len() {
            self.pattern(seed, i, &mut piece);
            self.buf.write_at(self.pages[i], &piece);
        }
    }

    /// The first byte of the piece (in physical order) that does not hold the pattern.
    fn check(&self, seed: u64) -> Option<usize> {
        let mut want = vec![0u8; self.page];
        self.pages.iter().enumerate().find_map(|(i, &at)| {
            self.pattern(seed, i, &mut want);
            let got = self.buf.read_at(at, self.page).unwrap_or_default();
            first_difference(&want, &got).map(|d| i * self.page + d)
        })
    }

    /// MiB/s of `BATCHES` plain copies of the piece's size within locked, present memory
    /// (after a warm-up copy). Overwrites the pool: call it last.
    fn memcpy_mib_s(&mut self) -> Vec<f64> {
        let bytes = self.bytes();
        let mem = self.copy.as_mut().unwrap_or(&mut self.buf);
        (0..=BATCHES)
            .filter_map(|k| {
                let start = Instant::now();
                if !mem.copy_within(0, bytes, bytes) {
                    return None;
                }
                let ns = start.elapsed().as_nanos();
                (k > 0).then(|| mib_per_s(bytes as u64, ns)).flatten()
            })
            .collect()
    }
}

/// One transfer, completion polled through DMA_STATUS: (ns from the doorbell as the guest
/// saw it, ns the device's engine spent copying, from its DMA_LAST_NS register).
fn timed_transfer(
    s: &Session,
    regs: &Regs,
    dir: u32,
    src: u64,
    dst: u64,
    len: u64,
) -> Result<(u128, u64), String> {
    s.write64(DMA_SRC_LO, src)?;
    s.write64(DMA_DST_LO, dst)?;
    s.write64(DMA_LEN_LO, len)?;
    s.write(DMA_DIR, dir)?;
    let start = Instant::now();
    regs.write(DMA_DOORBELL, 1)?;
    let status = loop {
        match regs.read(DMA_STATUS)? {
            STATUS_BUSY if start.elapsed() < WAIT => {}
            st => break st,
        }
    };
    let ns = start.elapsed().as_nanos();
    match status {
        STATUS_DONE => Ok((ns, s.read64(DMA_LAST_NS_LO)?)),
        st => Err(format!(
            "DMA of {len} bytes: status {st:#x} ({})",
            status_name(st)
        )),
    }
}

fn dma(s: &Session, regs: &Regs, seed: u64, f: &mut Figures) -> Result<(), String> {
    let mut c = Contiguous::get()?;
    let len = c.bytes() as u64;
    if len > s.vram_size()? {
        return Err(format!("{len} bytes do not fit in VRAM"));
    }
    c.fill(seed);
    // Completion is polled: no interrupt (and no guest kernel) in the timed path.
    s.write(IRQ_ENABLE, 0)?;
    // (guest-seen MiB/s, device-side MiB/s) per transfer.
    let run = |dir: u32| -> Result<Vec<(f64, f64)>, String> {
        let (src, dst) = match dir {
            DIR_RAM_TO_VRAM => (c.phys, 0),
            _ => (0, c.phys),
        };
        // The first transfer also allocates the server's VRAM pages: not timed.
        timed_transfer(s, regs, dir, src, dst, len)?;
        (0..BATCHES)
            .map(|_| {
                let (ns, device_ns) = timed_transfer(s, regs, dir, src, dst, len)?;
                let none = || "a transfer took no time".to_string();
                let guest = mib_per_s(len, ns).ok_or_else(none)?;
                let device = mib_per_s(len, u128::from(device_ns)).ok_or_else(none)?;
                Ok((guest, device))
            })
            .collect()
    };
    let to_vram = run(DIR_RAM_TO_VRAM);
    let to_ram = to_vram.is_ok().then(|| {
        c.buf.fill(0);
        run(DIR_VRAM_TO_RAM)
    });
    s.write(IRQ_ENABLE, IRQ_DMA)?;
    let (to_vram, to_ram) = (to_vram?, to_ram.ok_or("no transfer to RAM")??);
    c.buf.check_frames()?;
    if let Some(at) = c.check(seed) {
        return Err(format!("RAM -> VRAM -> RAM differs at byte {at} of {len}"));
    }
    let memcpy = c.memcpy_mib_s();
    let split = |v: &[(f64, f64)]| -> (Vec<f64>, Vec<f64>) { v.iter().copied().unzip() };
    let ((to_ram, to_ram_dev), (to_vram, to_vram_dev)) = (split(&to_ram), split(&to_vram));
    let (r, v, m) = (median(&to_ram), median(&to_vram), median(&memcpy));
    let (rd, vd) = (median(&to_ram_dev), median(&to_vram_dev));
    f.text("dma_contig", c.how);
    f.text("dma_bytes", len);
    f.text("dma_completion", "poll");
    f.num("dma_to_ram_mib_s", r)?;
    f.num("dma_to_vram_mib_s", v)?;
    f.num("dma_to_ram_device_mib_s", rd)?;
    f.num("dma_to_vram_device_mib_s", vd)?;
    f.num("memcpy_mib_s", m)?;
    f.num("to_ram_vs_memcpy", r.zip(m).map(|(r, m)| r / m))?;
    f.num("to_vram_vs_memcpy", v.zip(m).map(|(v, m)| v / m))?;
    f.num("to_ram_device_vs_memcpy", rd.zip(m).map(|(r, m)| r / m))?;
    f.num("to_vram_device_vs_memcpy", vd.zip(m).map(|(v, m)| v / m))
}

/// `vfio-bench,BDF[,ITERATIONS]`.
pub fn bench(s: &mut Session, iterations: u64) -> Result<String, String> {
    s.require_test_device()?;
    if iterations == 0 || iterations > MAX_ITERATIONS {
        return Err(format!(
            "ITERATIONS must be 1..={MAX_ITERATIONS}, got {iterations}"
        ));
    }
    let seed = s.next_seed();
    let s = &*s;
    let start = Instant::now();
    let mut f = Figures::default();
    f.text("iterations", iterations);
    f.text("batches", BATCHES);
    f.num("clock_ns", clock_ns())?;
    let regs = registers(s);
    let phase = Instant::now();
    access(s, &regs, iterations, &mut f)?;
    f.text("access_ms", phase.elapsed().as_millis());
    let phase = Instant::now();
    msix(s, &regs, iterations, &mut f)?;
    f.text("msix_ms", phase.elapsed().as_millis());
    let phase = Instant::now();
    dma(s, &regs, seed, &mut f)?;
    f.text("dma_ms", phase.elapsed().as_millis());
    f.text("elapsed_ms", start.elapsed().as_millis());
    f.text("ok", "true");
    Ok(format!("vfio-bench {} {}", s.bdf(), f.line()))
}
