//! GSI numbers and the interrupt routing table, with one owner.
//!
//! KVM_SET_GSI_ROUTING replaces the VM's whole table, so the table is kept here and sent whole
//! after every change. It starts as KVM's own default (what `kvm_setup_default_irq_routing`
//! installs with the in-kernel irqchip), so sending it changes nothing until a route is added:
//! GSI 0-15 to the IOAPIC pin of the same number and to the PIC (master for 0-7, slave for 8-15,
//! pin `gsi % 8`; GSI 2 included, as KVM does), GSI 16-23 to the IOAPIC only. MSI routes get
//! GSIs from 24 up.
//!
//! Devices get an [`IrqLine`] or [`MsiVector`]: an eventfd registered here as a KVM irqfd on
//! the GSI allocated for it, which refuses a GSI with no route.

use std::collections::BTreeMap;
use std::sync::Arc;

use devices::interrupt::{Interrupt, IrqLine, MsiVector};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::VmFd;
use vm_allocator::IdAllocator;
use vmm_sys_util::eventfd::EventFd;

/// Pins of the in-kernel IOAPIC (KVM's is 24 pins).
pub const IOAPIC_PINS: u32 = 24;
/// Legacy GSIs below this are ISA interrupts with fixed owners the guest assumes (timer,
/// keyboard, cascade, COM2, COM1); devices the host numbers get the pins from here up.
pub const FIRST_DEVICE_PIN: u32 = 5;
/// First GSI for MSI routes: right after the IOAPIC's pins.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("no free {what} GSI: {source}")]
    Exhausted {
        what: &'static str,
        #[source]
        source: vm_allocator::Error,
    },
    #[error("ISA IRQ {0} is not one of the fixed ISA interrupts (0..{FIRST_DEVICE_PIN})")]
    NotIsa(u32),
    #[error("ISA IRQ {0} is already wired")]
    IsaTaken(u32),
    #[error("GSI {0} has no route: an irqfd on it would never reach the guest")]
    NoRoute(u32),
    #[error("GSI {0} is not an MSI route")]
    NotMsi(u32),
    #[error("cannot create an interrupt eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("building the routing table ({entries} entries): {source}")]
    Table {
        entries: usize,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    #[error("KVM_SET_GSI_ROUTING ({entries} entries) failed: {source}")]
    SetRouting {
        entries: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_IRQFD on GSI {gsi} failed: {source}")]
    Irqfd {
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Where a GSI's interrupt goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A pin of one of the in-kernel interrupt controllers.
    Pin { chip: IrqChip, pin: u32 },
    /// An MSI message: written to `address`, carrying `data` (the guest programs both).
    Msi(MsiMessage),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqChip {
    PicMaster,
    PicSlave,
    Ioapic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

impl Route {
    fn entry(&self, gsi: u32) -> kvm_irq_routing_entry {
        let (type_, u) = match *self {
            Route::Pin { chip, pin } => {
                let irqchip = match chip {
                    IrqChip::PicMaster => KVM_IRQCHIP_PIC_MASTER,
                    IrqChip::PicSlave => KVM_IRQCHIP_PIC_SLAVE,
                    IrqChip::Ioapic => KVM_IRQCHIP_IOAPIC,
                };
                let irqchip = kvm_irq_routing_irqchip { irqchip, pin };
                (
                    KVM_IRQ_ROUTING_IRQCHIP,
                    kvm_irq_routing_entry__bindgen_ty_1 { irqchip },
                )
            }
            Route::Msi(m) => {
                let msi = kvm_irq_routing_msi {
                    address_lo: m.address as u32,
                    address_hi: (m.address >> 32) as u32,
                    data: m.data,
                    ..Default::default()
                };
                (
                    KVM_IRQ_ROUTING_MSI,
                    kvm_irq_routing_entry__bindgen_ty_1 { msi },
                )
            }
        };
        kvm_irq_routing_entry {
            gsi,
            type_,
            u,
            ..Default::default()
        }
    }
}

/// KVM's default table for an in-kernel PIC + IOAPIC (see the module comment).
fn default_routes() -> BTreeMap<u32, Vec<Route>> {
    (0..IOAPIC_PINS)
        .map(|gsi| {
            let mut routes = vec![Route::Pin {
                chip: IrqChip::Ioapic,
                pin: gsi,
            }];
            if gsi < 16 {
                let chip = if gsi < 8 {
                    IrqChip::PicMaster
                } else {
                    IrqChip::PicSlave
                };
                routes.push(Route::Pin { chip, pin: gsi % 8 });
            }
            (gsi, routes)
        })
        .collect()
}

/// The VM's GSIs and routing table.
#[derive(Debug)]
pub struct InterruptRouting {
    /// IOAPIC pins for devices the host numbers (virtio-mmio, INTx).
    pins: IdAllocator,
    /// ISA IRQs already wired (each has one owner).
    isa_taken: Vec<u32>,
    msi: IdAllocator,
    routes: BTreeMap<u32, Vec<Route>>,
}

impl InterruptRouting {
    /// KVM's default table (not yet sent) and every device GSI free.
    pub fn new() -> Result<Self, InterruptError> {
        let exhausted = |what| move |source| InterruptError::Exhausted { what, source };
        Ok(Self {
            pins: IdAllocator::new(FIRST_DEVICE_PIN, IOAPIC_PINS - 1)
                .map_err(exhausted("IOAPIC pin"))?,
            isa_taken: Vec::new(),
            msi: IdAllocator::new(FIRST_MSI_GSI, KVM_MAX_IRQ_ROUTES as u32 - 1)
                .map_err(exhausted("MSI"))?,
            routes: default_routes(),
        })
    }

    /// The table as KVM gets it, in GSI order.
    pub fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        self.routes
            .iter()
            .flat_map(|(&gsi, routes)| routes.iter().map(move |r| r.entry(gsi)))
            .collect()
    }

    /// The routes of `gsi` (empty when it has none).
    pub fn routes(&self, gsi: u32) -> &[Route] {
        self.routes.get(&gsi).map_or(&[], Vec::as_slice)
    }

    /// Sends the whole table (KVM_SET_GSI_ROUTING replaces the VM's table at once).
    pub fn send(&self, fd: &VmFd) -> Result<(), InterruptError> {
        let entries = self.entries();
        let n = entries.len();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|source| InterruptError::Table { entries: n, source })?;
        fd.set_gsi_routing(&table)
            .map_err(|source| InterruptError::SetRouting { entries: n, source })
    }

    /// Wires one of the fixed ISA interrupts (COM1's IRQ 4, ...): its routes are KVM's default.
    pub fn isa_line(&mut self, fd: &VmFd, irq: u32) -> Result<Arc<IrqLine>, InterruptError> {
        if irq >= FIRST_DEVICE_PIN {
            return Err(InterruptError::NotIsa(irq));
        }
        if self.isa_taken.contains(&irq) {
            return Err(InterruptError::IsaTaken(irq));
        }
        let line = Arc::new(IrqLine::new(irq).map_err(InterruptError::EventFd)?);
        self.register_irqfd(fd, line.as_ref())?;
        self.isa_taken.push(irq);
        Ok(line)
    }

    /// A device interrupt line on the next free IOAPIC pin (its route already exists).
    pub fn irq_line(&mut self, fd: &VmFd) -> Result<Arc<IrqLine>, InterruptError> {
        let gsi = self
            .pins
            .allocate_id()
            .map_err(|source| InterruptError::Exhausted {
                what: "IOAPIC pin",
                source,
            })?;
        let line = IrqLine::new(gsi)
            .map_err(InterruptError::EventFd)
            .and_then(|line| self.register_irqfd(fd, &line).map(|()| line));
        match line {
            Ok(line) => Ok(Arc::new(line)),
            Err(e) => {
                self.free_id(gsi);
                Err(e)
            }
        }
    }

    /// An MSI vector on a fresh GSI routed to `msg`; the table is sent before the irqfd is
    /// registered, so the first trigger already finds its route.
    pub fn msi_vector(
        &mut self,
        fd: &VmFd,
        msg: MsiMessage,
    ) -> Result<Arc<MsiVector>, InterruptError> {
        self.msi_vector_on(fd, msg, None)
    }

    /// [`Self::msi_vector`] raised through `evt` when given (an eventfd the owner already
    /// handed to a device), a fresh one otherwise.
    pub fn msi_vector_on(
        &mut self,
        fd: &VmFd,
        msg: MsiMessage,
        evt: Option<EventFd>,
    ) -> Result<Arc<MsiVector>, InterruptError> {
        let gsi = self
            .msi
            .allocate_id()
            .map_err(|source| InterruptError::Exhausted {
                what: "MSI",
                source,
            })?;
        self.routes.insert(gsi, vec![Route::Msi(msg)]);
        let vector = self.send(fd).and_then(|()| {
            let v = match evt {
                Some(evt) => MsiVector::with_eventfd(gsi, evt),
                None => MsiVector::new(gsi).map_err(InterruptError::EventFd)?,
            };
            self.register_irqfd(fd, &v)?;
            Ok(v)
        });
        match vector {
            Ok(v) => Ok(Arc::new(v)),
            Err(e) => {
                self.drop_msi_route(fd, gsi);
                Err(e)
            }
        }
    }

    /// Points an MSI vector at a new message (the guest reprogrammed it) and re-sends the table.
    pub fn update_msi(
        &mut self,
        fd: &VmFd,
        gsi: u32,
        msg: MsiMessage,
    ) -> Result<(), InterruptError> {
        match self.routes.get_mut(&gsi) {
            Some(routes) if matches!(routes.as_slice(), [Route::Msi(_)]) => {
                let old = std::mem::replace(&mut routes[0], Route::Msi(msg));
                self.send(fd).inspect_err(|_| {
                    if let Some(r) = self.routes.get_mut(&gsi) {
                        r[0] = old;
                    }
                })
            }
            _ => Err(InterruptError::NotMsi(gsi)),
        }
    }

    /// Takes an MSI vector down: its irqfd, its route (the table is re-sent) and its GSI.
    pub fn release_msi(&mut self, fd: &VmFd, vector: &MsiVector) -> Result<(), InterruptError> {
        let gsi = vector.gsi();
        if !matches!(self.routes(gsi), [Route::Msi(_)]) {
            return Err(InterruptError::NotMsi(gsi));
        }
        if let Some(evt) = vector.eventfd() {
            fd.unregister_irqfd(evt, gsi)
                .map_err(|source| InterruptError::Irqfd { gsi, source })?;
        }
        self.routes.remove(&gsi);
        self.free_id(gsi);
        self.send(fd)
    }

    /// Registers `irq`'s eventfd as a KVM irqfd on its GSI, which must have a route.
    pub fn register_irqfd(&self, fd: &VmFd, irq: &dyn Interrupt) -> Result<(), InterruptError> {
        let gsi = irq.gsi();
        if self.routes(gsi).is_empty() {
            return Err(InterruptError::NoRoute(gsi));
        }
        let Some(evt) = irq.eventfd() else {
            return Ok(());
        };
        fd.register_irqfd(evt, gsi)
            .map_err(|source| InterruptError::Irqfd { gsi, source })
    }

    fn drop_msi_route(&mut self, fd: &VmFd, gsi: u32) {
        self.routes.remove(&gsi);
        self.free_id(gsi);
        if let Err(e) = self.send(fd) {
            tracing::warn!("re-sending the routing table without GSI {gsi}: {e}");
        }
    }

    fn free_id(&mut self, gsi: u32) {
        let freed = if gsi >= FIRST_MSI_GSI {
            self.msi.free_id(gsi)
        } else {
            self.pins.free_id(gsi)
        };
        if let Err(e) = freed {
            tracing::warn!("freeing GSI {gsi}: {e}");
        }
    }
}

#[cfg(test)]
#[path = "interrupts_tests.rs"]
mod tests;
