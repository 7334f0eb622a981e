//! An open device: the VFIO device, its register and VRAM BARs, one eventfd per MSI-X vector,
//! and, when it is the gpu-test-device, the DMA engine driven one transfer at a time. Other
//! devices (a real GPU under `tools/host-check.sh --boot`) are opened too, but their registers
//! are never written.

use std::path::Path;
use std::time::Duration;

use super::regs::*;
use super::workload::Workloads;
use crate::pci::{driver_of, Bdf};
use crate::vfio::bind::{noiommu_group, Paths};
use crate::vfio::device::{Device, Region};
use crate::vfio::eventfd::EventFd;
use crate::vfio::sys::VFIO_PCI_MSIX_IRQ_INDEX;

/// How long any wait for the device (an interrupt, a first kernel pass) may take.
pub const WAIT: Duration = Duration::from_secs(5);

pub struct Session {
    pub dev: Device,
    regs: Region,
    pub vram: Region,
    irqs: Vec<EventFd>,
    pub workloads: Workloads,
    seed: u64,
    /// Whether BAR0 is the gpu-test-device's register file (its ID register said so).
    pub test_device: bool,
    id: Result<u32, String>,
}

impl Session {
    /// Opens a function bound to vfio-pci, checks it is the test device, gives every MSI-X
    /// vector an eventfd, turns on bus mastering and the DMA completion interrupt.
    pub fn open(bdf: &Bdf) -> Result<Session, String> {
        let paths = Paths::system();
        let dir = paths.devices.join(bdf.as_str());
        if !dir.is_dir() {
            return Err(format!("no PCI function {bdf}"));
        }
        match driver_of(&dir) {
            Some(d) if d == "vfio-pci" => {}
            other => {
                return Err(format!(
                    "{bdf} is bound to {}, not vfio-pci (vfio-bind it first)",
                    other.as_deref().unwrap_or("no driver")
                ))
            }
        }
        let group = noiommu_group(&paths, bdf)?;
        let dev = Device::open(bdf, Path::new(&group))?;
        let regs = dev.region(BAR_REGS)?;
        let vram = dev.region(BAR_VRAM)?;
        // Any other device is opened too (for `vfio-msix` by loopback) but never written.
        let id = dev.read32(&regs, ID);
        let test_device = id == Ok(ID_VALUE);
        let vectors = dev.irq_count(VFIO_PCI_MSIX_IRQ_INDEX)?;
        if vectors == 0 {
            return Err(format!("{bdf} has no MSI-X vectors"));
        }
        let irqs = (0..vectors)
            .map(|_| EventFd::new().map_err(|e| format!("eventfd: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let fds: Vec<_> = irqs.iter().map(EventFd::raw).collect();
        dev.set_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, &fds)?;
        let session = Session {
            dev,
            regs,
            vram,
            irqs,
            workloads: Workloads::default(),
            seed: 0,
            test_device,
            id,
        };
        if test_device {
            session.dev.enable_bus_master()?;
            session.write(IRQ_VECTOR, 0)?;
            session.write(IRQ_ENABLE, IRQ_DMA)?;
        }
        Ok(session)
    }

    /// Refuses to go on unless this is the gpu-test-device (whose registers the command
    /// writes).
    pub fn require_test_device(&self) -> Result<(), String> {
        match &self.id {
            _ if self.test_device => Ok(()),
            Ok(id) => Err(format!(
                "{} is not a gpu-test-device (ID register {id:#x})",
                self.bdf()
            )),
            Err(e) => Err(format!("{} is not a gpu-test-device ({e})", self.bdf())),
        }
    }

    pub fn bdf(&self) -> &Bdf {
        &self.dev.bdf
    }

    pub fn read(&self, reg: u64) -> Result<u32, String> {
        self.dev.read32(&self.regs, reg)
    }

    pub fn write(&self, reg: u64, value: u32) -> Result<(), String> {
        self.dev.write32(&self.regs, reg, value)
    }

    /// A `_LO`/`_HI` pair, as 4-byte reads: high, low, high again until the high half holds
    /// still (a running counter carrying into it).
    pub fn read64(&self, lo: u64) -> Result<u64, String> {
        let mut high = self.read(hi(lo))?;
        for _ in 0..8 {
            let low = self.read(lo)?;
            let again = self.read(hi(lo))?;
            if again == high {
                return Ok(u64::from(high) << 32 | u64::from(low));
            }
            high = again;
        }
        Err(format!("register {lo:#x} never held still"))
    }

    pub fn write64(&self, lo: u64, value: u64) -> Result<(), String> {
        self.write(hi(lo), (value >> 32) as u32)?;
        self.write(lo, value as u32)
    }

    /// BAR0, the register BAR.
    pub fn regs_region(&self) -> Region {
        self.regs
    }

    /// The eventfd of MSI-X vector `vector`.
    pub fn irq_fd(&self, vector: usize) -> Result<&EventFd, String> {
        self.irqs
            .get(vector)
            .ok_or_else(|| format!("no MSI-X vector {vector}"))
    }

    pub fn vectors(&self) -> usize {
        self.irqs.len()
    }

    /// VRAM bytes, as the device reports them.
    pub fn vram_size(&self) -> Result<u64, String> {
        self.read64(VRAM_SIZE_LO)
    }

    /// A new seed for each pattern, so a check can never pass on an earlier run's data.
    pub fn next_seed(&mut self) -> u64 {
        self.seed += 1;
        self.seed
    }

    /// Takes every pending interrupt count (left over, or stray); returns their sum.
    pub fn drain(&self) -> Result<u64, String> {
        self.irqs.iter().try_fold(0, |sum, fd| {
            fd.take()
                .map(|n| sum + n)
                .map_err(|e| format!("eventfd: {e}"))
        })
    }

    /// Waits for `vector`'s eventfd: the interrupts that arrived (at least 1).
    pub fn wait_irq(&self, vector: usize) -> Result<u64, String> {
        let fd = self
            .irqs
            .get(vector)
            .ok_or_else(|| format!("no MSI-X vector {vector}"))?;
        match fd.wait(WAIT).map_err(|e| format!("eventfd: {e}"))? {
            0 => Err(format!(
                "no interrupt on MSI-X vector {vector} within {} s",
                WAIT.as_secs()
            )),
            n => Ok(n),
        }
    }

    /// Has the guest's vfio-pci signal `vector`'s eventfd itself (no device involved).
    pub fn trigger(&self, vector: usize) -> Result<(), String> {
        self.dev.trigger_irq(VFIO_PCI_MSIX_IRQ_INDEX, vector as u32)
    }

    /// One DMA transfer, completion interrupt on `vector`; returns the interrupts counted.
    pub fn dma(
        &self,
        dir: u32,
        src: u64,
        dst: u64,
        len: u64,
        vector: usize,
    ) -> Result<u64, String> {
        let what = || format!("DMA {} {len:#x} bytes {src:#x} -> {dst:#x}", dir_name(dir));
        self.write(IRQ_VECTOR, vector as u32)?;
        self.write64(DMA_SRC_LO, src)?;
        self.write64(DMA_DST_LO, dst)?;
        self.write64(DMA_LEN_LO, len)?;
        self.write(DMA_DIR, dir)?;
        self.write(DMA_DOORBELL, 1)?;
        let irqs = self.wait_irq(vector).map_err(|e| {
            let status = self.read(DMA_STATUS).unwrap_or(u32::MAX);
            format!("{}: {e} (status {status:#x})", what())
        })?;
        match self.read(DMA_STATUS)? {
            STATUS_DONE => Ok(irqs),
            s => Err(format!("{}: status {s:#x} ({})", what(), status_name(s))),
        }
    }
}

fn dir_name(dir: u32) -> &'static str {
    match dir {
        DIR_RAM_TO_VRAM => "RAM->VRAM",
        DIR_VRAM_TO_RAM => "VRAM->RAM",
        _ => "?",
    }
}

impl Drop for Session {
    /// Engines off before the workload's buffer goes: the device must never write freed pages.
    fn drop(&mut self) {
        let _ = self.dev.disable_irqs(VFIO_PCI_MSIX_IRQ_INDEX);
        // Its thread ends before the VRAM mapping it writes goes.
        drop(self.workloads.cpu.take());
        if !self.test_device {
            return;
        }
        if self.write(PW_CTRL, CTRL_STOP).is_err() {
            // It may still be writing: its pages must never be reused.
            std::mem::forget(self.workloads.pages.take());
        }
        let _ = self.write(K_CTRL, CTRL_STOP);
    }
}
