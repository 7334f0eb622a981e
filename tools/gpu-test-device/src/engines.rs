//! State shared with the engine threads, and the engines: DMA copier, page writer, VRAM kernel.
//!
//! Engines run on their own threads, as a device works while its driver does something else;
//! a client sees progress only through the status and counter registers and the interrupt.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
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
#[derive(Debug, Clone, Copy)]
pub struct DmaJob {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
    pub dir: u32,
}

/// Runs one transfer, then records its outcome and raises the completion interrupt.
pub fn run_dma(shared: &Shared, job: DmaJob) {
    let start = Instant::now();
    let status = copy(shared, job).err().unwrap_or(STATUS_DONE);
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

/// The copy itself; `Err` is the status to report.
fn copy(shared: &Shared, job: DmaJob) -> Result<(), u32> {
    if job.len == 0 {
        return Err(STATUS_ERR_INVALID);
    }
    let (vram_offset, iova, to_vram) = match job.dir {
        DIR_RAM_TO_VRAM => (job.dst, job.src, true),
        DIR_VRAM_TO_RAM => (job.src, job.dst, false),
        _ => return Err(STATUS_ERR_INVALID),
    };
    let vram = shared
        .vram
        .mapping()
        .slice(vram_offset, job.len)
        .ok_or(STATUS_ERR_VRAM_RANGE)?;
    let mut at = 0;
    for segment in shared.segments(iova, job.len, !to_vram)? {
        let guest = segment.slice().ok_or(STATUS_ERR_UNMAPPED)?;
        let device = vram
            .subslice(at, guest.len())
            .map_err(|_| STATUS_ERR_VRAM_RANGE)?;
        if to_vram {
            guest.copy_to_volatile_slice(device);
        } else {
            device.copy_to_volatile_slice(guest);
            shared.dirty.mark(iova + at as u64, guest.len() as u64);
        }
        at += guest.len();
    }
    Ok(())
}

/// The page writer's parameters, taken at start.
#[derive(Debug, Clone, Copy)]
pub struct PageWriterJob {
    pub base: u64,
    pub pages: u32,
    pub stride: u32,
    pub rate: u32,
    pub limit: u32,
}

/// Writes the chosen pages in turn until stopped, the limit, or a fault; records the outcome.
pub fn run_page_writer(shared: &Shared, job: PageWriterJob, stop: &AtomicBool) {
    let (status, interrupt) = match write_pages(shared, job, stop) {
        Ok(stopped) => (STATUS_DONE, !stopped),
        Err(status) => (status, true),
    };
    lock(&shared.regs).pw_status = status;
    if interrupt {
        shared.raise(IRQ_PAGE_WRITER);
    }
}

/// `Ok(true)` if stopped by the client, `Ok(false)` at the limit, `Err(status)` on a fault.
fn write_pages(shared: &Shared, job: PageWriterJob, stop: &AtomicBool) -> Result<bool, u32> {
    if job.pages == 0 || job.base % PAGE_SIZE != 0 {
        return Err(STATUS_ERR_INVALID);
    }
    let stride = u64::from(job.stride.max(1));
    let chosen = u64::from(job.pages).div_ceil(stride);
    let start = Instant::now();
    let mut written: u64 = 0;
    loop {
        if job.limit != 0 && written == u64::from(job.limit) {
            return Ok(false);
        }
        if job.rate != 0 {
            let due = start + Duration::from_secs_f64(written as f64 / f64::from(job.rate));
            while let Some(wait) = due.checked_duration_since(Instant::now()) {
                if stop.load(Ordering::Relaxed) {
                    return Ok(true);
                }
                std::thread::sleep(wait.min(Duration::from_millis(10)));
            }
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(true);
        }
        // Guest-chosen base, pages and stride: a window past 2^64 is invalid, not a panic.
        let iova = ((written % chosen) * stride)
            .checked_mul(PAGE_SIZE)
            .and_then(|off| job.base.checked_add(off))
            .ok_or(STATUS_ERR_INVALID)?;
        let mut stamp = [0u8; 16];
        stamp[..8].copy_from_slice(&(written + 1).to_le_bytes());
        stamp[8..].copy_from_slice(&PW_MAGIC.to_le_bytes());
        let mut at = 0;
        for segment in shared.segments(iova, stamp.len() as u64, true)? {
            let guest = segment.slice().ok_or(STATUS_ERR_UNMAPPED)?;
            guest.copy_from(&stamp[at..at + guest.len()]);
            at += guest.len();
        }
        shared.dirty.mark(iova, stamp.len() as u64);
        written += 1;
        shared.pw_written.store(written, Ordering::Relaxed);
    }
}

/// The kernel's parameters, taken at start.
#[derive(Debug, Clone, Copy)]
pub struct KernelJob {
    pub offset: u64,
    pub len: u64,
    pub once: bool,
}

/// Fills its VRAM range with the pattern, pass after pass (or once); records the outcome.
pub fn run_kernel(shared: &Shared, job: KernelJob, stop: &AtomicBool) {
    let result = fill_passes(shared, job, stop);
    lock(&shared.regs).k_status = result.err().unwrap_or(STATUS_DONE);
    if job.once || result.is_err() {
        shared.raise(IRQ_KERNEL);
    }
}

fn fill_passes(shared: &Shared, job: KernelJob, stop: &AtomicBool) -> Result<(), u32> {
    if job.len == 0 || job.offset % 4 != 0 || job.len % 4 != 0 {
        return Err(STATUS_ERR_INVALID);
    }
    let vram = shared
        .vram
        .mapping()
        .slice(job.offset, job.len)
        .ok_or(STATUS_ERR_VRAM_RANGE)?;
    const CHUNK: usize = 64 * 1024;
    loop {
        let pattern = lock(&shared.regs).k_pattern.to_le_bytes();
        let chunk: Vec<u8> = pattern.iter().copied().cycle().take(CHUNK).collect();
        let mut at = 0;
        while at < vram.len() {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let len = CHUNK.min(vram.len() - at);
            let piece = vram.subslice(at, len).map_err(|_| STATUS_ERR_VRAM_RANGE)?;
            piece.copy_from(&chunk[..len]);
            at += len;
        }
        shared.k_passes.fetch_add(1, Ordering::Relaxed);
        if job.once {
            return Ok(());
        }
        // Leave the shared CPUs some room between passes.
        std::thread::sleep(Duration::from_millis(1));
    }
}
