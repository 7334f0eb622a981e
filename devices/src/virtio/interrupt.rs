//! The virtio-mmio interrupt: the InterruptStatus bits plus the [`Interrupt`] the VMM gave the
//! transport (an edge on the device's GSI). Shared between the transport (which reads and acks
//! the status) and the device (which raises it).

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

use crate::interrupt::Interrupt;

#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irq: Arc<dyn Interrupt>,
}

impl VirtioInterrupt {
    pub fn new(irq: Arc<dyn Interrupt>) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Tells the driver there are new entries in a used ring.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_VRING)
    }

    /// Tells the driver the config space or the device status (NEEDS_RESET) changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_CONFIG)
    }

    fn signal(&self, bit: u32) -> io::Result<()> {
        // Set the status before the edge so the driver's handler finds the reason.
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.trigger()
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Loads a saved InterruptStatus and, if any bit is set, raises the line once: the driver
    /// may not have taken the interrupt before the pause, and a spare one is harmless (its
    /// handler finds nothing new and returns).
    pub fn restore(&self, status: u32) -> io::Result<()> {
        self.status.store(status, Ordering::SeqCst);
        if status != 0 {
            self.irq.trigger()?;
        }
        Ok(())
    }

    /// Clears every bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The interrupt it raises.
    pub fn line(&self) -> &Arc<dyn Interrupt> {
        &self.irq
    }
}
