//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2): one 4 KiB page of registers per
//! device, config space from 0x100.
//!
//! Queue notifications are processed synchronously, in the vCPU thread that wrote QueueNotify:
//! simple and correct for now. The scalable path is an ioeventfd on QueueNotify and a worker
//! thread per device, which the `VirtioDevice` split (the device owns its queues after
//! `activate`) already allows.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::bus::{BusDevice, VcpuAction};
use crate::interrupt::Interrupt;
use crate::GuestMemory;

mod state;

pub use state::{MmioTransportState, QueueSnapshot};

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern (non-legacy) virtio-mmio register layout.
pub const MMIO_VERSION: u32 = 2;
/// No vendor in particular; Linux does not look at it.
pub const VENDOR_ID: u32 = 0;

/// The `virtio_mmio.device=` kernel parameter announcing a device (Linux
/// CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES), e.g. `virtio_mmio.device=4K@0xc0000000:5`.
pub fn mmio_cmdline_arg(base: u64, size: u64, irq: u32) -> String {
    let size = if size != 0 && size % (1 << 20) == 0 {
        format!("{}M", size >> 20)
    } else if size != 0 && size % (1 << 10) == 0 {
        format!("{}K", size >> 10)
    } else {
        size.to_string()
    };
    format!("virtio_mmio.device={size}@{base:#x}:{irq}")
}

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("device offers {0} queues, more than a u16 can select")]
    TooManyQueues(usize),
    #[error("queue {index}: invalid maximum size {size} (must be a power of two, at most 32768)")]
    BadQueueMaxSize { index: usize, size: u16 },
}

/// One queue's registers as the driver wrote them. Turned into a `virtio_queue::Queue` (and
/// validated against guest memory) when the driver sets QueueReady.
#[derive(Debug, Clone, Copy, Default)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Self::default()
        }
    }

    /// A ready `Queue` from these registers, or why not.
    fn build(&self, mem: &GuestMemory, event_idx: bool) -> Result<Queue, virtio_queue::Error> {
        let mut q = Queue::new(self.max_size)?;
        q.try_set_size(self.size)?;
        q.try_set_desc_table_address(GuestAddress(self.desc))?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))?;
        q.try_set_used_ring_address(GuestAddress(self.device))?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        // Every ring must lie inside guest RAM, so a later access can only fail if the guest
        // rewrites the rings, not because of where it put them.
        if !q.is_valid(mem) {
            return Err(virtio_queue::Error::QueueNotReady);
        }
        Ok(q)
    }
}

/// A virtio device on the MMIO bus. The VMM maps it at an MMIO slot it allocated, gives it an
/// [`Interrupt`] on a GSI it allocated, and adds [`mmio_cmdline_arg`] to the kernel command
/// line.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<QueueRegs>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
}

impl MmioTransport {
    /// `irq` is triggered for every interrupt the device raises.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irq: Arc<dyn Interrupt>,
    ) -> Result<Self, MmioError> {
        let sizes = device.queue_max_sizes();
        if u16::try_from(sizes.len()).is_err() {
            return Err(MmioError::TooManyQueues(sizes.len()));
        }
        let mut queues = Vec::with_capacity(sizes.len());
        for (index, &size) in sizes.iter().enumerate() {
            // virtio-queue's own rule; checked here so a bad device fails at creation.
            if Queue::new(size).is_err() {
                return Err(MmioError::BadQueueMaxSize { index, size });
            }
            queues.push(QueueRegs::new(size));
        }
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new(irq)),
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            activated: false,
        })
    }

    /// The interrupt the device raises.
    pub fn interrupt(&self) -> &Arc<dyn Interrupt> {
        self.interrupt.line()
    }

    /// The device status register (virtio 1.2 §2.1).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the driver has brought the device up (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    /// Marks the device broken and tells the driver (virtio 1.2 §2.1.2).
    fn needs_reset(&mut self, why: &str) {
        tracing::warn!(
            "virtio-mmio device {}: {why}; needs reset",
            self.device.device_type()
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if let Err(e) = self.interrupt.signal_config_change() {
            tracing::warn!("raising the virtio config interrupt: {e}");
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.clear();
    }

    fn read_reg(&self, offset: u32) -> u32 {
        let queue = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|sel| self.queues.get(sel));
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            // Zero means "no such queue" to the driver.
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: a length of all ones says so (§4.2.2).
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            // The config space never changes under the driver.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => {
                tracing::warn!(
                    offset,
                    "virtio-mmio read of a write-only or unknown register"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_reg(offset, value),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => tracing::warn!(
                offset,
                value,
                "virtio-mmio write to a read-only or unknown register"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            tracing::warn!("virtio-mmio: driver features written after FEATURES_OK, ignored");
            return;
        }
        let (shift, mask) = match self.driver_features_sel {
            0 => (0, 0xffff_ffff_u64),
            1 => (32, 0xffff_ffff_u64 << 32),
            sel => {
                tracing::warn!(sel, "virtio-mmio: driver features page out of range");
                return;
            }
        };
        let offered = self.offered_features();
        let wanted = u64::from(value) << shift;
        if wanted & !offered != 0 {
            tracing::warn!(
                "virtio-mmio: driver accepted features {:#x} never offered; dropped",
                wanted & !offered
            );
        }
        self.driver_features = (self.driver_features & !mask) | (wanted & offered);
    }

    fn write_queue_reg(&mut self, offset: u32, value: u32) {
        // Queue layout is frozen once the driver is running or the queue is live (§4.2.2.2).
        if self.activated || self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            tracing::warn!(
                offset,
                "virtio-mmio queue register written after DRIVER_OK, ignored"
            );
            return;
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let sel = self.queue_sel;
        let Some(q) = usize::try_from(sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
        else {
            tracing::warn!(
                sel,
                "virtio-mmio: write to a queue that does not exist, ignored"
            );
            return;
        };
        if q.ready && offset != VIRTIO_MMIO_QUEUE_READY {
            tracing::warn!(
                sel,
                offset,
                "virtio-mmio: ready queue reconfigured, ignored"
            );
            return;
        }
        let set_low = |reg: &mut u64| *reg = (*reg & !0xffff_ffff) | u64::from(value);
        let set_high = |reg: &mut u64| *reg = (*reg & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            // Out-of-range sizes are kept as written and refused when the queue goes ready.
            VIRTIO_MMIO_QUEUE_NUM => q.size = u16::try_from(value).unwrap_or(0),
            VIRTIO_MMIO_QUEUE_DESC_LOW => set_low(&mut q.desc),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => set_high(&mut q.desc),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => set_low(&mut q.driver),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => set_high(&mut q.driver),
            VIRTIO_MMIO_QUEUE_USED_LOW => set_low(&mut q.device),
            VIRTIO_MMIO_QUEUE_USED_HIGH => set_high(&mut q.device),
            VIRTIO_MMIO_QUEUE_READY if value == 0 => q.ready = false,
            VIRTIO_MMIO_QUEUE_READY => match q.build(&self.mem, event_idx) {
                Ok(_) => q.ready = true,
                Err(e) => {
                    let why = format!("queue {sel} refused: {e} ({q:x?})");
                    self.needs_reset(&why);
                }
            },
            _ => {}
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (§3.1.1); NEEDS_RESET is the device's own bit.
        let old = self.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if value & old != old {
            tracing::warn!(
                old,
                value,
                "virtio-mmio: status bits cleared without a reset, ignored"
            );
            return;
        }
        let added = value & !old;
        let mut status = value | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.driver_features & VIRTIO_F_VERSION_1 == 0
        {
            // The driver reads FEATURES_OK back and gives up: we are a modern-only device.
            tracing::warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
            status &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        self.status = status;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                tracing::warn!("virtio-mmio: DRIVER_OK without FEATURES_OK, ignored");
                self.status &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else {
                self.activate();
            }
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, regs) in self.queues.iter().enumerate() {
            let queue = if regs.ready {
                regs.build(&self.mem, event_idx)
            } else {
                // The device decides whether it can live without this queue.
                Queue::new(regs.max_size)
            };
            match queue {
                Ok(q) => queues.push(q),
                Err(e) => return self.needs_reset(&format!("queue {index}: {e}")),
            }
        }
        match self.device.activate(
            self.mem.clone(),
            queues,
            self.interrupt.clone(),
            self.driver_features,
        ) {
            Ok(()) => self.activated = true,
            Err(e) => self.needs_reset(&format!("activation failed: {e}")),
        }
    }

    fn notify(&mut self, value: u32) {
        if !self.activated || self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            tracing::debug!(value, "virtio-mmio: notify while not running, ignored");
            return;
        }
        // Without VIRTIO_F_NOTIFICATION_DATA the value is just the queue index.
        let Ok(index) = u16::try_from(value) else {
            tracing::warn!(value, "virtio-mmio: notify of a queue that does not exist");
            return;
        };
        if usize::from(index) >= self.queues.len() {
            tracing::warn!(index, "virtio-mmio: notify of a queue that does not exist");
            return;
        }
        if let Err(e) = self.device.process_queue(index) {
            self.needs_reset(&format!("queue {index}: {e}"));
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(config_offset) = offset.checked_sub(u64::from(VIRTIO_MMIO_CONFIG)) {
            data.fill(0);
            self.device.read_config(config_offset, data);
            return;
        }
        // Registers are 32 bits wide and must be accessed as such (§4.2.2.1).
        let value = match (u32::try_from(offset), data.len()) {
            (Ok(reg), 4) if reg % 4 == 0 => self.read_reg(reg),
            _ => {
                tracing::warn!(offset, len = data.len(), "bad virtio-mmio register read");
                0
            }
        };
        if data.len() == 4 {
            data.copy_from_slice(&value.to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        if let Some(config_offset) = offset.checked_sub(u64::from(VIRTIO_MMIO_CONFIG)) {
            self.device.write_config(config_offset, data);
            return VcpuAction::Continue;
        }
        match (u32::try_from(offset), <[u8; 4]>::try_from(data)) {
            (Ok(reg), Ok(bytes)) if reg % 4 == 0 => self.write_reg(reg, u32::from_le_bytes(bytes)),
            _ => tracing::warn!(offset, len = data.len(), "bad virtio-mmio register write"),
        }
        VcpuAction::Continue
    }
}
