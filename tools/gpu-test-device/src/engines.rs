//! State shared with the engine threads, and the engines: DMA copier, page writer, VRAM kernel.
//!
//! Engines run on their own threads, as a device works while its driver does something else;
//! a client sees progress only through the status and counter registers and the interrupt.
//!
//! Every step that changes memory or engine state (a DMA chunk, a page stamp, a kernel chunk,
//! an engine's completion) runs inside a pass of the [`Gate`]: migration closes the gate to
//! stop the device, and once it is closed no engine is between a write and the position that
//! records it, so the positions in `Shared` are the exact place to resume from.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gpu_test_device::pci::PAGE_SIZE;
use gpu_test_device::regs::*;

use crate::dirty_log::DirtyLog;
use crate::dma::{DmaFault, DmaSpace, Segment};
use crate::memory::DeviceMemory;
use crate::registers::{Live, Registers};

/// Locks `mutex`; a thread that panicked holding it left plain register values, still usable.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the device's threads share.
pub struct Shared {
    pub regs: Mutex<Registers>,
    pub dma: RwLock<DmaSpace>,
    /// One eventfd per MSI-X vector, as the client set them (VFIO_USER_DEVICE_SET_IRQS).
    pub irqs: Mutex<Vec<Option<File>>>,
    pub vram: DeviceMemory,
    pub msix_vectors: u16,
    pub pw_written: AtomicU64,
    pub k_passes: AtomicU32,
    /// Guest-RAM pages the engines wrote, while the client has DMA logging started.
    pub dirty: DirtyLog,
    /// Closed while the device is stopped for migration.
    pub gate: Gate,
    /// VRAM pages the engines (and vfio-user region writes) wrote: migration resends them.
    pub vram_written: PageLog,
    /// The job each engine was started with (kept after it ends; its status says whether it
    /// runs).
    pub jobs: Mutex<Jobs>,
    /// Bytes of the current DMA transfer copied so far.
    pub dma_done: AtomicU64,
    /// Where the kernel is in its current pass (bytes from its offset), and the pattern of
    /// that pass (the register may have changed since the pass began).
    pub k_at: AtomicU64,
    pub k_pass_pattern: AtomicU32,
}

/// The engines' jobs, as started.
#[derive(Debug, Default, Clone, Copy)]
pub struct Jobs {
    pub dma: Option<DmaJob>,
    pub page_writer: Option<PageWriterJob>,
    pub kernel: Option<KernelJob>,
}

/// Lets engine steps through while open; closing it waits for the steps under way.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    busy: u32,
}

/// One engine step under way; the gate cannot close until it is dropped.
pub struct Pass<'a> {
    gate: &'a Gate,
    /// The step waited for the gate to open: time-paced engines restart their pacing.
    pub waited: bool,
}

impl Gate {
    /// Waits until the gate is open (or `stop` is set, so halting a paused engine never
    /// blocks) and starts a step.
    pub fn enter(&self, stop: &AtomicBool) -> Pass<'_> {
        let mut state = lock(&self.state);
        let mut waited = false;
        while state.closed && !stop.load(Ordering::Relaxed) {
            waited = true;
            // Polled: `stop` is set without touching the gate.
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        state.busy += 1;
        Pass { gate: self, waited }
    }

    /// Closes the gate and waits until no step is under way.
    pub fn close(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        while state.busy > 0 {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Opens the gate: paused engines go on.
    pub fn open(&self) {
        lock(&self.state).closed = false;
        self.changed.notify_all();
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        lock(&self.gate.state).busy -= 1;
        self.gate.changed.notify_all();
    }
}

/// One bit per device page, set by writers, taken by migration.
#[derive(Debug)]
pub struct PageLog {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl PageLog {
    /// A log of `size` bytes of pages, all clear.
    pub fn new(size: u64) -> Self {
        let pages = size.div_ceil(PAGE_SIZE);
        let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self { words, pages }
    }

    /// Marks the pages of `[offset, offset + len)` (clipped to the log).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / PAGE_SIZE;
        let last = offset.saturating_add(len - 1) / PAGE_SIZE;
        for page in first..=last.min(self.pages.saturating_sub(1)) {
            self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
    }

    /// Whether `page` was marked; clears it.
    pub fn take(&self, page: u64) -> bool {
        let bit = 1 << (page % 64);
        match self.words.get((page / 64) as usize) {
            Some(word) => word.fetch_and(!bit, Ordering::Relaxed) & bit != 0,
            None => false,
        }
    }

    /// Pages marked now.
    pub fn count(&self) -> u64 {
        let ones = self.words.iter();
        ones.map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Clears every mark.
    pub fn clear(&self) {
        for word in &self.words {
            word.store(0, Ordering::Relaxed);
        }
    }
}

impl Shared {
    /// The values registers read from outside the register file.
    pub fn live(&self) -> Live {
        Live {
            msix_vectors: self.msix_vectors,
            vram_size: self.vram.mapping().len(),
            pw_written: self.pw_written.load(Ordering::Relaxed),
            k_passes: self.k_passes.load(Ordering::Relaxed),
        }
    }

    /// Raises the selected vector if `source` is enabled in IRQ_ENABLE.
    pub fn raise(&self, source: u32) {
        let vector = {
            let regs = lock(&self.regs);
            if regs.irq_enable & source == 0 {
                return;
            }
            regs.irq_vector
        };
        if self.signal(vector) {
            lock(&self.regs).irq_count += 1;
        }
    }

    /// Signals `vector`'s eventfd; false if the client set none (or it failed).
    pub fn signal(&self, vector: u32) -> bool {
        let irqs = lock(&self.irqs);
        match irqs.get(vector as usize) {
            Some(Some(eventfd)) => (&*eventfd).write_all(&1u64.to_ne_bytes()).is_ok(),
            _ => false,
        }
    }

    fn dma(&self) -> std::sync::RwLockReadGuard<'_, DmaSpace> {
        self.dma.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn segments(&self, iova: u64, len: u64, write: bool) -> Result<Vec<Segment>, u32> {
        self.dma()
            .segments(iova, len, write)
            .map_err(|fault| match fault {
                DmaFault::Unmapped(_) => STATUS_ERR_UNMAPPED,
                DmaFault::ReadOnly(_) => STATUS_ERR_READ_ONLY,
            })
    }
}

/// One engine's thread and its stop flag.
#[derive(Default)]
pub struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Stops the running thread (if any) and starts `work` on a new one.
    pub fn start(
        &mut self,
        name: &str,
        work: impl FnOnce(&AtomicBool) + Send + 'static,
    ) -> std::io::Result<()> {
        self.halt();
        let stop = Arc::new(AtomicBool::new(false));
        self.stop = Arc::clone(&stop);
        self.thread = Some(
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || work(&stop))?,
        );
        Ok(())
    }

    /// Asks the thread to stop and waits for it.
    pub fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // A panicking engine has already reported itself on stderr.
            let _ = thread.join();
        }
    }
}

/// A DMA transfer, as the registers described it at the doorbell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaJob {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
    pub dir: u32,
}

/// Bytes a DMA transfer copies per gate pass: the most it runs on while being stopped.
const DMA_CHUNK: u64 = 256 * 1024;

/// Runs one transfer from byte `done` (0, or where a migrated one stopped), then records its
/// outcome and raises the completion interrupt. Halted midway, it records nothing: a reset or
/// a restored state replaces the registers.
pub fn run_dma(shared: &Shared, job: DmaJob, done: u64, stop: &AtomicBool) {
    let start = Instant::now();
    let (result, pass) = copy(shared, job, done, stop);
    if stop.load(Ordering::Relaxed) {
        return;
    }
    let _pass = pass.unwrap_or_else(|| shared.gate.enter(stop));
    let status = result.err().unwrap_or(STATUS_DONE);
    let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    {
        let mut regs = lock(&shared.regs);
        regs.dma_status = status;
        if status == STATUS_DONE {
            regs.dma_completions += 1;
            regs.dma_last_ns = ns;
        } else {
            regs.dma_errors += 1;
        }
    }
    shared.raise(IRQ_DMA);
}

/// The copy itself, chunk by chunk; `Err` is the status to report. Returns the pass of the
/// last chunk, so that the completion is recorded before the gate can close.
fn copy<'a>(
    shared: &'a Shared,
    job: DmaJob,
    mut done: u64,
    stop: &AtomicBool,
) -> (Result<(), u32>, Option<Pass<'a>>) {
    if job.len == 0 {
        return (Err(STATUS_ERR_INVALID), None);
    }
    let (vram_offset, iova, to_vram) = match job.dir {
        DIR_RAM_TO_VRAM => (job.dst, job.src, true),
        DIR_VRAM_TO_RAM => (job.src, job.dst, false),
        _ => return (Err(STATUS_ERR_INVALID), None),
    };
    let Some(vram) = shared.vram.mapping().slice(vram_offset, job.len) else {
        return (Err(STATUS_ERR_VRAM_RANGE), None);
    };
    loop {
        let pass = shared.gate.enter(stop);
        if stop.load(Ordering::Relaxed) {
            return (Ok(()), None);
        }
        let len = DMA_CHUNK.min(job.len - done);
        if let Err(status) = copy_chunk(shared, &vram, iova, done, len, to_vram) {
            return (Err(status), Some(pass));
        }
        if to_vram {
            shared.vram_written.mark(vram_offset + done, len);
        } else {
            shared.dirty.mark(iova + done, len);
        }
        done += len;
        shared.dma_done.store(done, Ordering::Relaxed);
        if done == job.len {
            return (Ok(()), Some(pass));
        }
    }
}

/// Copies `[at, at + len)` of the transfer between guest RAM at `iova` and `vram`.
fn copy_chunk(
    shared: &Shared,
    vram: &vm_memory::VolatileSlice<'_, ()>,
    iova: u64,
    at: u64,
    len: u64,
    to_vram: bool,
) -> Result<(), u32> {
    let mut offset = at as usize;
    for segment in shared.segments(iova + at, len, !to_vram)? {
        let guest = segment.slice().ok_or(STATUS_ERR_UNMAPPED)?;
        let device = vram
            .subslice(offset, guest.len())
            .map_err(|_| STATUS_ERR_VRAM_RANGE)?;
        if to_vram {
            guest.copy_to_volatile_slice(device);
        } else {
            device.copy_to_volatile_slice(guest);
        }
        offset += guest.len();
    }
    Ok(())
}

/// The page writer's parameters, taken at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageWriterJob {
    pub base: u64,
    pub pages: u32,
    pub stride: u32,
    pub rate: u32,
    pub limit: u32,
}

/// Writes the chosen pages in turn, after `written` earlier writes (0, or where a migrated
/// writer stopped), until stopped, the limit, or a fault; records the outcome.
pub fn run_page_writer(shared: &Shared, job: PageWriterJob, written: u64, stop: &AtomicBool) {
    let (outcome, pass) = write_pages(shared, job, written, stop);
    let _pass = pass.unwrap_or_else(|| shared.gate.enter(stop));
    let (status, interrupt) = match outcome {
        Ok(stopped) => (STATUS_DONE, !stopped),
        Err(status) => (status, true),
    };
    lock(&shared.regs).pw_status = status;
    if interrupt {
        shared.raise(IRQ_PAGE_WRITER);
    }
}

/// `Ok(true)` if stopped by the client, `Ok(false)` at the limit, `Err(status)` on a fault;
/// with the pass of the last write, so the outcome is recorded before the gate can close.
fn write_pages<'a>(
    shared: &'a Shared,
    job: PageWriterJob,
    mut written: u64,
    stop: &AtomicBool,
) -> (Result<bool, u32>, Option<Pass<'a>>) {
    if job.pages == 0 || job.base % PAGE_SIZE != 0 {
        return (Err(STATUS_ERR_INVALID), None);
    }
    let stride = u64::from(job.stride.max(1));
    let chosen = u64::from(job.pages).div_ceil(stride);
    let at_limit = |written| job.limit != 0 && written >= u64::from(job.limit);
    if at_limit(written) {
        return (Ok(false), None);
    }
    // The rate counts from here, and again after every pause (no burst to catch up).
    let mut paced_from = (Instant::now(), written);
    loop {
        if job.rate != 0 {
            let ahead = (written - paced_from.1) as f64 / f64::from(job.rate);
            let due = paced_from.0 + Duration::from_secs_f64(ahead);
            while let Some(wait) = due.checked_duration_since(Instant::now()) {
                if stop.load(Ordering::Relaxed) {
                    return (Ok(true), None);
                }
                std::thread::sleep(wait.min(Duration::from_millis(10)));
            }
        }
        let pass = shared.gate.enter(stop);
        if stop.load(Ordering::Relaxed) {
            return (Ok(true), None);
        }
        if pass.waited && job.rate != 0 {
            paced_from = (Instant::now(), written);
            continue;
        }
        // Guest-chosen base, pages and stride: a window past 2^64 is invalid, not a panic.
        let Some(iova) = ((written % chosen) * stride)
            .checked_mul(PAGE_SIZE)
            .and_then(|off| job.base.checked_add(off))
        else {
            return (Err(STATUS_ERR_INVALID), Some(pass));
        };
        let mut stamp = [0u8; 16];
        stamp[..8].copy_from_slice(&(written + 1).to_le_bytes());
        stamp[8..].copy_from_slice(&PW_MAGIC.to_le_bytes());
        if let Err(status) = stamp_page(shared, iova, &stamp) {
            return (Err(status), Some(pass));
        }
        shared.dirty.mark(iova, stamp.len() as u64);
        written += 1;
        shared.pw_written.store(written, Ordering::Relaxed);
        if at_limit(written) {
            return (Ok(false), Some(pass));
        }
    }
}

fn stamp_page(shared: &Shared, iova: u64, stamp: &[u8]) -> Result<(), u32> {
    let mut at = 0;
    for segment in shared.segments(iova, stamp.len() as u64, true)? {
        let guest = segment.slice().ok_or(STATUS_ERR_UNMAPPED)?;
        guest.copy_from(&stamp[at..at + guest.len()]);
        at += guest.len();
    }
    Ok(())
}

/// The kernel's parameters, taken at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelJob {
    pub offset: u64,
    pub len: u64,
    pub once: bool,
}

/// Where a kernel resumes: `at` bytes into a pass of `pattern` (`None`: a new pass, which
/// reads the pattern register).
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelResume {
    pub at: u64,
    pub pattern: Option<u32>,
}

/// Fills its VRAM range with the pattern, pass after pass (or once); records the outcome.
pub fn run_kernel(shared: &Shared, job: KernelJob, resume: KernelResume, stop: &AtomicBool) {
    let (result, pass) = fill_passes(shared, job, resume, stop);
    let _pass = pass.unwrap_or_else(|| shared.gate.enter(stop));
    lock(&shared.regs).k_status = result.err().unwrap_or(STATUS_DONE);
    if job.once || result.is_err() {
        shared.raise(IRQ_KERNEL);
    }
}

/// Bytes the kernel fills per gate pass.
const KERNEL_CHUNK: usize = 64 * 1024;

fn fill_passes<'a>(
    shared: &'a Shared,
    job: KernelJob,
    mut resume: KernelResume,
    stop: &AtomicBool,
) -> (Result<(), u32>, Option<Pass<'a>>) {
    if job.len == 0 || job.offset % 4 != 0 || job.len % 4 != 0 {
        return (Err(STATUS_ERR_INVALID), None);
    }
    let Some(vram) = shared.vram.mapping().slice(job.offset, job.len) else {
        return (Err(STATUS_ERR_VRAM_RANGE), None);
    };
    loop {
        let pattern = resume
            .pattern
            .take()
            .unwrap_or_else(|| lock(&shared.regs).k_pattern);
        shared.k_pass_pattern.store(pattern, Ordering::Relaxed);
        let chunk: Vec<u8> = pattern
            .to_le_bytes()
            .iter()
            .copied()
            .cycle()
            .take(KERNEL_CHUNK)
            .collect();
        // `at` stays a multiple of 4 (chunks are), so the pattern stays word aligned.
        let mut at = std::mem::take(&mut resume.at) as usize;
        while at < vram.len() {
            let pass = shared.gate.enter(stop);
            if stop.load(Ordering::Relaxed) {
                return (Ok(()), None);
            }
            let len = KERNEL_CHUNK.min(vram.len() - at);
            let Ok(piece) = vram.subslice(at, len) else {
                return (Err(STATUS_ERR_VRAM_RANGE), Some(pass));
            };
            piece.copy_from(&chunk[..len]);
            shared.vram_written.mark(job.offset + at as u64, len as u64);
            at += len;
            if at < vram.len() {
                shared.k_at.store(at as u64, Ordering::Relaxed);
                continue;
            }
            // The pass ends in the same step as its last chunk: a stopped device never sits
            // between the two.
            shared.k_at.store(0, Ordering::Relaxed);
            shared.k_passes.fetch_add(1, Ordering::Relaxed);
            if job.once {
                return (Ok(()), Some(pass));
            }
        }
        // Leave the shared CPUs some room between passes.
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_log_marks_every_page_touched_once() {
        let log = PageLog::new(8 * PAGE_SIZE);
        log.mark(PAGE_SIZE - 1, 2);
        log.mark(7 * PAGE_SIZE, u64::MAX);
        assert_eq!(log.count(), 3);
        assert!(log.take(0) && log.take(1) && log.take(7));
        assert!(!log.take(1) && !log.take(2) && !log.take(1000));
        assert_eq!(log.count(), 0);
    }

    #[test]
    fn a_closed_gate_waits_for_the_step_under_way_and_holds_the_next() {
        let gate = Arc::new(Gate::default());
        let stop = AtomicBool::new(false);
        let pass = gate.enter(&stop);
        assert!(!pass.waited);
        let closer = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || gate.close())
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(!closer.is_finished(), "close waits for the step");
        drop(pass);
        closer.join().unwrap();
        let opener = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                gate.open();
            })
        };
        assert!(gate.enter(&stop).waited);
        opener.join().unwrap();
        gate.close();
        stop.store(true, Ordering::Relaxed);
        let _halting = gate.enter(&stop);
    }
}
