//! The device behind the vfio-user server: regions, register dispatch, interrupts, DMA maps.
//!
//! `vfio_user::Server` owns the socket and the protocol; it calls this `ServerBackend` for
//! every region access, DMA_MAP/UNMAP, SET_IRQS and reset, and for migration (`migrate`).

mod migrate;

use std::fs::File;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use gpu_test_device::pci::{self, PAGE_SIZE};
use gpu_test_device::regs::{self, CTRL_ONCE, CTRL_START, CTRL_STOP, STATUS_BUSY};
use vfio_bindings::bindings::vfio::*;
use vfio_user::{
    DmaLoggingRange, DmaMapFlags, DmaUnmapFlags, IrqInfo, ServerBackend, ServerRegion, SparseArea,
};

use crate::config_space::{ConfigError, ConfigSpace, Identity};
use crate::dirty_log::{DirtyLog, LogError};
use crate::dma::{DmaMapError, DmaSpace};
use crate::engines::{
    lock, run_dma, run_kernel, run_page_writer, DmaJob, Gate, Jobs, KernelJob, KernelResume,
    PageLog, PageWriterJob, Shared, Worker,
};
use crate::memory::{DeviceMemory, MemoryError};
use crate::migration::{Migration, MigrationError};
use crate::registers::{self, Action, RegisterError, Registers};

/// Where the page holding the MSI-X table starts (trapped: no mmap).
const MSIX_TABLE_PAGE: u64 = pci::MSIX_TABLE_OFFSET & !(PAGE_SIZE - 1);
/// Where the page holding the PBA starts (trapped: no mmap).
const MSIX_PBA_PAGE: u64 = pci::MSIX_PBA_OFFSET & !(PAGE_SIZE - 1);
/// MSI-X table entry: address (8), data (4), vector control (4).
const MSIX_ENTRY_SIZE: u64 = 16;

/// Failures of the device's backend calls; each answers the client with an errno.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("creating the {what} backing")]
    Memory {
        what: &'static str,
        #[source]
        source: MemoryError,
    },
    #[error("config space")]
    Config(#[from] ConfigError),
    #[error("BAR0 registers")]
    Register(#[from] RegisterError),
    #[error("DMA map")]
    DmaMap(#[from] DmaMapError),
    #[error("region {region} access {offset:#x}+{len} is outside it or crosses a boundary")]
    OutOfRange {
        region: u32,
        offset: u64,
        len: usize,
    },
    #[error("region {0} has no accesses")]
    NoAccess(u32),
    #[error("SET_IRQS index {index} flags {flags:#x} start {start} count {count} with {fds} fds")]
    SetIrqs {
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: usize,
    },
    #[error("DMA logging")]
    DmaLog(#[from] LogError),
    #[error("starting the {0} engine thread")]
    Spawn(&'static str, #[source] std::io::Error),
    #[error("migration")]
    Migration(#[from] MigrationError),
}

impl DeviceError {
    fn errno(&self) -> i32 {
        match self {
            Self::DmaMap(e) => e.errno(),
            Self::DmaLog(e) => e.errno(),
            Self::Migration(e) => e.errno(),
            Self::Spawn(..) | Self::Memory { .. } => libc::EAGAIN,
            _ => libc::EINVAL,
        }
    }
}

/// Reports `error` (with its sources) on stderr and turns it into the errno the client gets.
fn reply_error(error: DeviceError) -> std::io::Error {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("vmm-gpu-test-device: {message}");
    std::io::Error::from_raw_os_error(error.errno())
}

/// The device: everything a client can reach.
pub struct Device {
    identity: Identity,
    shared: Arc<Shared>,
    config: ConfigSpace,
    bar0: DeviceMemory,
    bar3: DeviceMemory,
    msix_table: Vec<u8>,
    dma_worker: Worker,
    page_writer: Worker,
    kernel: Worker,
    migration: Migration,
}

impl Device {
    /// A device at reset, its memories created (sparse: nothing allocated until touched);
    /// See `--crash-at`.
    pub fn crash_at(&mut self, state: Option<u32>) {
        self.migration.crash_at = state;
    }

    /// `migration` false makes it a device without migration support.
    pub fn new(identity: Identity, migration: bool) -> Result<Self, DeviceError> {
        let memory = |what, name, size| {
            DeviceMemory::new(name, size).map_err(|source| DeviceError::Memory { what, source })
        };
        let vram = memory("VRAM", c"gpu-test-device-vram", identity.vram_size)?;
        let shared = Arc::new(Shared {
            regs: Mutex::new(Registers::default()),
            dma: RwLock::new(DmaSpace::default()),
            irqs: Mutex::new(vec_of_none(identity.msix_vectors)),
            vram,
            msix_vectors: identity.msix_vectors,
            pw_written: AtomicU64::new(0),
            k_passes: AtomicU32::new(0),
            dirty: DirtyLog::default(),
            gate: Gate::default(),
            vram_written: PageLog::new(identity.vram_size),
            jobs: Mutex::new(Jobs::default()),
            dma_done: AtomicU64::new(0),
            k_at: AtomicU64::new(0),
            k_pass_pattern: AtomicU32::new(0),
        });
        Ok(Self {
            identity,
            shared,
            config: ConfigSpace::new(identity),
            bar0: memory("BAR0", c"gpu-test-device-bar0", pci::BAR0_SIZE)?,
            bar3: memory("BAR3", c"gpu-test-device-bar3", pci::BAR3_SIZE)?,
            msix_table: masked_msix_table(identity.msix_vectors),
            dma_worker: Worker::default(),
            page_writer: Worker::default(),
            kernel: Worker::default(),
            migration: Migration::new(migration),
        })
    }

    /// The regions the server announces, in VFIO PCI region order (BAR0..5, ROM, config, VGA).
    pub fn server_regions(&self) -> Vec<ServerRegion> {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let mmap = rw | VFIO_REGION_INFO_FLAG_MMAP;
        let area = |offset, size| SparseArea {
            area: vfio_region_sparse_mmap_area { offset, size },
        };
        let region = |index, size, flags, areas: Vec<SparseArea>, fd| ServerRegion {
            region_info: vfio_region_info {
                argsz: std::mem::size_of::<vfio_region_info>() as u32,
                flags,
                index,
                cap_offset: 0,
                size,
                offset: 0,
            },
            sparse_areas: areas,
            mmap_fd: fd,
        };
        let vram_size = self.identity.vram_size;
        vec![
            region(
                VFIO_PCI_BAR0_REGION_INDEX,
                pci::BAR0_SIZE,
                mmap,
                vec![
                    area(regs::REGS_SIZE, MSIX_TABLE_PAGE - regs::REGS_SIZE),
                    area(
                        MSIX_TABLE_PAGE + PAGE_SIZE,
                        MSIX_PBA_PAGE - MSIX_TABLE_PAGE - PAGE_SIZE,
                    ),
                    area(
                        MSIX_PBA_PAGE + PAGE_SIZE,
                        pci::BAR0_SIZE - MSIX_PBA_PAGE - PAGE_SIZE,
                    ),
                ],
                Some(self.bar0.raw_fd()),
            ),
            region(
                VFIO_PCI_BAR1_REGION_INDEX,
                vram_size,
                mmap,
                vec![area(0, vram_size)],
                Some(self.shared.vram.raw_fd()),
            ),
            region(VFIO_PCI_BAR2_REGION_INDEX, 0, 0, vec![], None),
            region(
                VFIO_PCI_BAR3_REGION_INDEX,
                pci::BAR3_SIZE,
                mmap,
                vec![area(0, pci::BAR3_SIZE)],
                Some(self.bar3.raw_fd()),
            ),
            region(VFIO_PCI_BAR4_REGION_INDEX, 0, 0, vec![], None),
            region(VFIO_PCI_BAR5_REGION_INDEX, 0, 0, vec![], None),
            region(VFIO_PCI_ROM_REGION_INDEX, 0, 0, vec![], None),
            region(
                VFIO_PCI_CONFIG_REGION_INDEX,
                pci::CONFIG_SIZE,
                rw,
                vec![],
                None,
            ),
            region(VFIO_PCI_VGA_REGION_INDEX, 0, 0, vec![], None),
        ]
    }

    /// The interrupts the server announces: MSI-X only (no INTx pin, no MSI capability).
    pub fn irq_infos(&self) -> Vec<IrqInfo> {
        let info = |index, flags, count| IrqInfo {
            index,
            flags,
            count,
        };
        vec![
            info(VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_INFO_EVENTFD, 0),
            info(VFIO_PCI_MSI_IRQ_INDEX, VFIO_IRQ_INFO_EVENTFD, 0),
            info(
                VFIO_PCI_MSIX_IRQ_INDEX,
                VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
                u32::from(self.identity.msix_vectors),
            ),
            info(VFIO_PCI_ERR_IRQ_INDEX, VFIO_IRQ_INFO_EVENTFD, 0),
            info(VFIO_PCI_REQ_IRQ_INDEX, VFIO_IRQ_INFO_EVENTFD, 0),
        ]
    }

    /// The client left: stop every engine and DMA logging, forget its DMA regions and
    /// eventfds, reset. Device memory (VRAM, BAR0, BAR3) keeps its contents for the next client.
    pub fn disconnect(&mut self) {
        self.reset_device();
        self.shared.dirty.stop();
        self.shared
            .dma
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        *lock(&self.shared.irqs) = vec_of_none(self.identity.msix_vectors);
    }

    /// Function-level reset: engines stopped, registers, config space and MSI-X table to
    /// their reset values, migration back to RUNNING with no stream. DMA regions and eventfds
    /// (the client's setup) stay.
    fn reset_device(&mut self) {
        self.dma_worker.halt();
        self.page_writer.halt();
        self.kernel.halt();
        self.shared.gate.open();
        self.migration.reset();
        *lock(&self.shared.regs) = Registers::default();
        self.shared.pw_written.store(0, Ordering::Relaxed);
        self.shared.k_passes.store(0, Ordering::Relaxed);
        self.config = ConfigSpace::new(self.identity);
        self.msix_table = masked_msix_table(self.identity.msix_vectors);
    }

    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        match bar0_zone(offset, data.len())? {
            Zone::Registers => {
                let live = self.shared.live();
                let regs = lock(&self.shared.regs);
                for (word, chunk) in registers::words(offset, data.len())?.zip(data.chunks_mut(4)) {
                    chunk.copy_from_slice(&regs.read(word, live).to_le_bytes());
                }
            }
            Zone::MsixTable => {
                for (i, byte) in data.iter_mut().enumerate() {
                    *byte = self.msix_table_byte(offset + i as u64).map_or(0, |b| *b);
                }
            }
            Zone::MsixPba => data.fill(0),
            Zone::Memory => memory_read(&self.bar0, 0, offset, data)?,
        }
        Ok(())
    }

    fn bar0_write(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        match bar0_zone(offset, data.len())? {
            Zone::Registers => {
                for (word, chunk) in registers::words(offset, data.len())?.zip(data.chunks(4)) {
                    let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                    let action =
                        lock(&self.shared.regs).write(word, value, self.identity.msix_vectors);
                    self.act(action)?;
                }
            }
            Zone::MsixTable => {
                for (i, value) in data.iter().enumerate() {
                    if let Some(byte) = self.msix_table_byte(offset + i as u64) {
                        *byte = *value;
                    }
                }
            }
            Zone::MsixPba => {}
            Zone::Memory => memory_write(&self.bar0, 0, offset, data)?,
        }
        Ok(())
    }

    fn msix_table_byte(&mut self, offset: u64) -> Option<&mut u8> {
        let index = offset.checked_sub(pci::MSIX_TABLE_OFFSET)?;
        self.msix_table.get_mut(usize::try_from(index).ok()?)
    }

    /// Carries out what a register write asked for.
    fn act(&mut self, action: Action) -> Result<(), DeviceError> {
        let shared = Arc::clone(&self.shared);
        match action {
            Action::None => {}
            Action::DmaDoorbell => {
                let job = {
                    let mut regs = lock(&shared.regs);
                    if regs.dma_status == STATUS_BUSY {
                        regs.dma_errors += 1;
                        return Ok(());
                    }
                    regs.dma_status = STATUS_BUSY;
                    DmaJob {
                        src: regs.dma_src,
                        dst: regs.dma_dst,
                        len: regs.dma_len,
                        dir: regs.dma_dir,
                    }
                };
                self.start_dma(job, 0)?;
            }
            Action::PageWriter(CTRL_STOP) => self.page_writer.halt(),
            Action::PageWriter(CTRL_START) => {
                self.page_writer.halt();
                let job = {
                    let mut regs = lock(&shared.regs);
                    regs.pw_status = STATUS_BUSY;
                    PageWriterJob {
                        base: regs.pw_base,
                        pages: regs.pw_pages,
                        stride: regs.pw_stride,
                        rate: regs.pw_rate,
                        limit: regs.pw_limit,
                    }
                };
                shared.pw_written.store(0, Ordering::Relaxed);
                self.start_page_writer(job)?;
            }
            Action::Kernel(CTRL_STOP) => self.kernel.halt(),
            Action::Kernel(ctrl @ (CTRL_START | CTRL_ONCE)) => {
                self.kernel.halt();
                let job = {
                    let mut regs = lock(&shared.regs);
                    regs.k_status = STATUS_BUSY;
                    KernelJob {
                        offset: regs.k_offset,
                        len: regs.k_len,
                        once: ctrl == CTRL_ONCE,
                    }
                };
                shared.k_passes.store(0, Ordering::Relaxed);
                self.start_kernel(job, KernelResume::default())?;
            }
            // Unknown control values are ignored, as for unknown registers.
            Action::PageWriter(_) | Action::Kernel(_) => {}
        }
        Ok(())
    }

    /// Starts (or, after a migration, resumes from byte `done`) a DMA transfer. In a
    /// stopped migration state the engine waits at the gate.
    fn start_dma(&mut self, job: DmaJob, done: u64) -> Result<(), DeviceError> {
        let shared = Arc::clone(&self.shared);
        lock(&shared.jobs).dma = Some(job);
        shared.dma_done.store(done, Ordering::Relaxed);
        self.dma_worker
            .start("gpu-dma", move |stop| run_dma(&shared, job, done, stop))
            .map_err(|e| DeviceError::Spawn("DMA", e))
    }

    /// Starts the page writer after `pw_written` writes (0 for a client's start).
    fn start_page_writer(&mut self, job: PageWriterJob) -> Result<(), DeviceError> {
        let shared = Arc::clone(&self.shared);
        lock(&shared.jobs).page_writer = Some(job);
        let written = shared.pw_written.load(Ordering::Relaxed);
        self.page_writer
            .start("gpu-page-writer", move |stop| {
                run_page_writer(&shared, job, written, stop)
            })
            .map_err(|e| DeviceError::Spawn("page writer", e))
    }

    /// Starts the kernel, from the start of a pass or where a migrated one stopped.
    fn start_kernel(&mut self, job: KernelJob, resume: KernelResume) -> Result<(), DeviceError> {
        let shared = Arc::clone(&self.shared);
        lock(&shared.jobs).kernel = Some(job);
        shared.k_at.store(resume.at, Ordering::Relaxed);
        self.kernel
            .start("gpu-kernel", move |stop| {
                run_kernel(&shared, job, resume, stop)
            })
            .map_err(|e| DeviceError::Spawn("kernel", e))
    }

    fn region_read_inner(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceError> {
        match region {
            VFIO_PCI_BAR0_REGION_INDEX => self.bar0_read(offset, data),
            VFIO_PCI_BAR1_REGION_INDEX => memory_read(&self.shared.vram, region, offset, data),
            VFIO_PCI_BAR3_REGION_INDEX => memory_read(&self.bar3, region, offset, data),
            VFIO_PCI_CONFIG_REGION_INDEX => Ok(self.config.read(offset, data)?),
            _ => Err(DeviceError::NoAccess(region)),
        }
    }

    fn region_write_inner(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), DeviceError> {
        match region {
            VFIO_PCI_BAR0_REGION_INDEX => self.bar0_write(offset, data),
            VFIO_PCI_BAR1_REGION_INDEX => {
                memory_write(&self.shared.vram, region, offset, data)?;
                self.shared.vram_written.mark(offset, data.len() as u64);
                Ok(())
            }
            VFIO_PCI_BAR3_REGION_INDEX => memory_write(&self.bar3, region, offset, data),
            VFIO_PCI_CONFIG_REGION_INDEX => Ok(self.config.write(offset, data)?),
            _ => Err(DeviceError::NoAccess(region)),
        }
    }

    fn set_irqs_inner(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), DeviceError> {
        let refused = DeviceError::SetIrqs {
            index,
            flags,
            start,
            count,
            fds: fds.len(),
        };
        let action = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        let data = flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        let vectors = u32::from(self.identity.msix_vectors);
        let in_table = start.checked_add(count).is_some_and(|end| end <= vectors);
        if index != VFIO_PCI_MSIX_IRQ_INDEX || action != VFIO_IRQ_SET_ACTION_TRIGGER || !in_table {
            // Other interrupt types have no vectors: disabling them (count 0) is a no-op.
            let disable = count == 0 && data == VFIO_IRQ_SET_DATA_NONE && fds.is_empty();
            return if disable { Ok(()) } else { Err(refused) };
        }
        match data {
            VFIO_IRQ_SET_DATA_NONE if count == 0 && fds.is_empty() => {
                *lock(&self.shared.irqs) = vec_of_none(self.identity.msix_vectors);
            }
            VFIO_IRQ_SET_DATA_NONE if fds.is_empty() => {
                for vector in start..start + count {
                    self.shared.signal(vector);
                }
            }
            VFIO_IRQ_SET_DATA_EVENTFD if fds.len() == count as usize => {
                let mut irqs = lock(&self.shared.irqs);
                for (vector, fd) in (start as usize..).zip(fds) {
                    irqs[vector] = Some(fd);
                }
            }
            _ => return Err(refused),
        }
        Ok(())
    }
}

/// Part of BAR0 an access falls in; it must not cross into another.
enum Zone {
    Registers,
    MsixTable,
    MsixPba,
    Memory,
}

fn bar0_zone(offset: u64, len: usize) -> Result<Zone, DeviceError> {
    let out = || DeviceError::OutOfRange {
        region: VFIO_PCI_BAR0_REGION_INDEX,
        offset,
        len,
    };
    let last = offset
        .checked_add(len as u64)
        .filter(|&end| len > 0 && end <= pci::BAR0_SIZE)
        .ok_or_else(out)?
        - 1;
    let zone = |at: u64| match at {
        _ if at < regs::REGS_SIZE => 0,
        _ if at & !(PAGE_SIZE - 1) == MSIX_TABLE_PAGE => 1,
        _ if at & !(PAGE_SIZE - 1) == MSIX_PBA_PAGE => 2,
        _ => 3,
    };
    match (zone(offset), zone(last)) {
        (0, 0) => Ok(Zone::Registers),
        (1, 1) => Ok(Zone::MsixTable),
        (2, 2) => Ok(Zone::MsixPba),
        (3, 3) => Ok(Zone::Memory),
        _ => Err(out()),
    }
}

fn memory_read(
    memory: &DeviceMemory,
    region: u32,
    offset: u64,
    data: &mut [u8],
) -> Result<(), DeviceError> {
    let slice = memory.mapping().slice(offset, data.len() as u64);
    let slice = slice.ok_or(DeviceError::OutOfRange {
        region,
        offset,
        len: data.len(),
    })?;
    slice.copy_to(data);
    Ok(())
}

fn memory_write(
    memory: &DeviceMemory,
    region: u32,
    offset: u64,
    data: &[u8],
) -> Result<(), DeviceError> {
    let slice = memory.mapping().slice(offset, data.len() as u64);
    let slice = slice.ok_or(DeviceError::OutOfRange {
        region,
        offset,
        len: data.len(),
    })?;
    slice.copy_from(data);
    Ok(())
}

fn vec_of_none(vectors: u16) -> Vec<Option<File>> {
    (0..vectors).map(|_| None).collect()
}

/// MSI-X table at reset: every vector masked (vector control bit 0).
fn masked_msix_table(vectors: u16) -> Vec<u8> {
    let mut table = vec![0; usize::from(vectors) * MSIX_ENTRY_SIZE as usize];
    for entry in table.chunks_mut(MSIX_ENTRY_SIZE as usize) {
        entry[12] = 1;
    }
    table
}

impl ServerBackend for Device {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        self.region_read_inner(region, offset, data)
            .map_err(reply_error)
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.region_write_inner(region, offset, data)
            .map_err(reply_error)
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        let writable = flags.contains(DmaMapFlags::WRITE);
        self.shared
            .dma
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .map(address, size, offset, fd, writable)
            .map_err(|e| reply_error(e.into()))
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> std::io::Result<()> {
        let mut dma = self
            .shared
            .dma
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if flags.contains(DmaUnmapFlags::UNMAP_ALL) {
            dma.clear();
            return Ok(());
        }
        dma.unmap(address, size).map_err(|e| reply_error(e.into()))
    }

    fn reset(&mut self) -> std::io::Result<()> {
        self.reset_device();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        self.set_irqs_inner(index, flags, start, count, fds)
            .map_err(reply_error)
    }

    fn dma_logging_probe(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn dma_logging_start(
        &mut self,
        page_size: u64,
        ranges: &[DmaLoggingRange],
    ) -> std::io::Result<u64> {
        self.shared
            .dirty
            .start(page_size, ranges)
            .map_err(|e| reply_error(e.into()))
    }

    fn dma_logging_stop(&mut self) -> std::io::Result<()> {
        self.shared.dirty.stop();
        Ok(())
    }

    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> std::io::Result<()> {
        self.shared
            .dirty
            .report(iova, length, page_size, bitmap)
            .map_err(|e| reply_error(e.into()))
    }

    fn migration_flags(&mut self) -> std::io::Result<u64> {
        self.migration_on()?;
        Ok(crate::migration::FLAGS)
    }

    fn set_mig_state(&mut self, state: u32) -> std::io::Result<()> {
        self.migration_on()?;
        self.set_state(state).map_err(reply_error)
    }

    fn mig_state(&mut self) -> std::io::Result<u32> {
        self.migration_on()?;
        Ok(self.migration.state)
    }

    fn mig_data_size(&mut self) -> std::io::Result<u64> {
        self.migration_on()?;
        Ok(self.data_size())
    }

    fn mig_data_read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.migration_on()?;
        self.read_data(buf).map_err(reply_error)
    }

    fn mig_data_write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.migration_on()?;
        self.write_data(data).map_err(reply_error)
    }
}

impl Device {
    /// Migration requests answer ENOTSUP with `--no-migration`.
    fn migration_on(&self) -> std::io::Result<()> {
        if self.migration.enabled {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(libc::ENOTSUP))
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.dma_worker.halt();
        self.page_writer.halt();
        self.kernel.halt();
    }
}

/// A migration state by its `--crash-at` name.
pub fn states_by_name(name: &str) -> Option<u32> {
    crate::migration::states::by_name(name)
}
