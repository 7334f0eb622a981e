//! How a device raises an interrupt without knowing who delivers it.
//!
//! The VMM owns GSI numbers and the interrupt routing table; a device only holds an
//! [`Interrupt`] and calls [`Interrupt::trigger`]. Both kinds here are an eventfd the VMM
//! registers as a KVM irqfd on the GSI it allocated, so a trigger reaches the guest without
//! passing through the VMM again; they differ in what the GSI routes to (an IOAPIC pin, or an
//! MSI message), which matters to the VMM's routing table, not to the device.

use std::fmt;
use std::io;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// An interrupt a device can raise.
pub trait Interrupt: Send + Sync + fmt::Debug {
    /// Raises it once: an edge on a pin, or one MSI message.
    fn trigger(&self) -> io::Result<()>;

    /// The eventfd that raises it, to register as a KVM irqfd (or to hand to VFIO), if it is
    /// raised through one.
    fn eventfd(&self) -> Option<&EventFd>;

    /// The GSI it was given, for logs and the kernel command line.
    fn gsi(&self) -> u32;
}

/// A legacy interrupt line: a GSI routed to an IOAPIC pin (and, below 16, a PIC pin).
#[derive(Debug)]
pub struct IrqLine {
    gsi: u32,
    evt: EventFd,
}

impl IrqLine {
    /// A line on `gsi`, raised through a fresh non-blocking eventfd.
    pub fn new(gsi: u32) -> io::Result<Self> {
        Ok(Self {
            gsi,
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }
}

impl Interrupt for IrqLine {
    fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }
    fn eventfd(&self) -> Option<&EventFd> {
        Some(&self.evt)
    }
    fn gsi(&self) -> u32 {
        self.gsi
    }
}

/// An MSI (or MSI-X) vector: a GSI the VMM routes to an MSI message (address, data).
#[derive(Debug)]
pub struct MsiVector {
    gsi: u32,
    evt: EventFd,
}

impl MsiVector {
    /// A vector on `gsi`, raised through a fresh non-blocking eventfd.
    pub fn new(gsi: u32) -> io::Result<Self> {
        Ok(Self {
            gsi,
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// A vector on `gsi` raised through `evt`, an eventfd made before the vector had a GSI
    /// (a passed-through device's: VFIO is given it when the guest enables MSI-X, before
    /// the guest unmasks the vector).
    pub fn with_eventfd(gsi: u32, evt: EventFd) -> Self {
        Self { gsi, evt }
    }
}

impl Interrupt for MsiVector {
    fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }
    fn eventfd(&self) -> Option<&EventFd> {
        Some(&self.evt)
    }
    fn gsi(&self) -> u32 {
        self.gsi
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trigger_is_one_count_on_the_eventfd() {
        for irq in [
            Box::new(IrqLine::new(5).unwrap()) as Box<dyn Interrupt>,
            Box::new(MsiVector::new(24).unwrap()),
        ] {
            irq.trigger().unwrap();
            irq.trigger().unwrap();
            assert_eq!(irq.eventfd().unwrap().read().unwrap(), 2);
            assert!(
                irq.eventfd().unwrap().read().is_err(),
                "drained, non-blocking"
            );
        }
    }
}
