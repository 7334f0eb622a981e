//! A PCI function's MSI/MSI-X vectors as KVM routes: [`MsiRoutes`] is the VMM's
//! [`VectorRoutes`] over the VM's interrupt routing. A vector's first unmask allocates its GSI
//! with an MSI route and registers its eventfd as an irqfd (`InterruptRouting::msi_vector`);
//! later unmasks point the route at the current message and reconnect the irqfd; a mask
//! disconnects the irqfd and keeps the GSI, so a trigger meanwhile stays counted in the eventfd
//! and KVM delivers it when the irqfd is registered again (the pending bit's meaning). The
//! eventfd is what a passed-through device hands to VFIO, so its interrupts reach the guest
//! without passing through the VMM.

use std::collections::BTreeMap;
use std::sync::Arc;

use devices::interrupt::{Interrupt, MsiVector};
use devices::pci::{MsiMessage, RouteError, VectorRoutes};
use devices::vfio::passthrough::PassthroughRoutes;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::resources::interrupts::{self, InterruptError};
use crate::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("vector {vector}: {source}")]
    Interrupt {
        vector: u16,
        #[source]
        source: InterruptError,
    },
    #[error("vector {vector}: KVM_IRQFD deassign on GSI {gsi} failed: {source}")]
    Unregister {
        vector: u16,
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vector {0} has no route: the guest never unmasked it")]
    NotRouted(u16),
    #[error("vector {vector}: writing its eventfd: {source}")]
    Trigger {
        vector: u16,
        #[source]
        source: std::io::Error,
    },
}

/// One vector with a GSI.
#[derive(Debug)]
struct Routed {
    vector: Arc<MsiVector>,
    msg: MsiMessage,
    /// Whether its eventfd is registered as an irqfd (the vector is live).
    connected: bool,
}

/// One function's vectors (numbered from 0 within it) on the VM's GSIs. Dropping it releases
/// every GSI it took.
pub struct MsiRoutes {
    vm: Arc<Vm>,
    vectors: BTreeMap<u16, Routed>,
    /// Eventfds handed out before their vector was routed (to a passed-through device, which
    /// gives them to VFIO at MSI-X enable): a vector's first unmask routes it through its own.
    prepared: BTreeMap<u16, EventFd>,
}

impl std::fmt::Debug for MsiRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.vectors.iter()).finish()
    }
}

fn kvm_message(msg: MsiMessage) -> interrupts::MsiMessage {
    interrupts::MsiMessage {
        address: msg.address,
        data: msg.data,
    }
}

impl MsiRoutes {
    pub fn new(vm: Arc<Vm>) -> Self {
        Self {
            vm,
            vectors: BTreeMap::new(),
            prepared: BTreeMap::new(),
        }
    }

    /// The GSI of `vector`, once the guest has unmasked it.
    pub fn gsi(&self, vector: u16) -> Option<u32> {
        self.vectors.get(&vector).map(|r| r.vector.gsi())
    }

    /// The eventfd that raises `vector`: its route's once the guest has unmasked it, else the
    /// one handed out for it before (see [`PassthroughRoutes::eventfd`]).
    pub fn eventfd_of(&self, vector: u16) -> Option<&EventFd> {
        self.vectors
            .get(&vector)
            .and_then(|r| r.vector.eventfd())
            .or_else(|| self.prepared.get(&vector))
    }

    /// Whether `vector`'s irqfd is registered (it may deliver).
    pub fn is_live(&self, vector: u16) -> bool {
        self.vectors.get(&vector).is_some_and(|r| r.connected)
    }

    fn unmask_vector(&mut self, vector: u16, msg: MsiMessage) -> Result<(), RoutesError> {
        let fd = self.vm.fd();
        let mut interrupts = self.vm.resources().interrupts();
        let err = |source| RoutesError::Interrupt { vector, source };
        match self.vectors.get_mut(&vector) {
            None => {
                let evt = match self.prepared.get(&vector) {
                    Some(e) => Some(e.try_clone().map_err(|e| err(InterruptError::EventFd(e)))?),
                    None => None,
                };
                let v = interrupts
                    .msi_vector_on(fd, kvm_message(msg), evt)
                    .map_err(err)?;
                self.vectors.insert(
                    vector,
                    Routed {
                        vector: v,
                        msg,
                        connected: true,
                    },
                );
            }
            Some(r) => {
                if r.msg != msg {
                    interrupts
                        .update_msi(fd, r.vector.gsi(), kvm_message(msg))
                        .map_err(err)?;
                    r.msg = msg;
                }
                if !r.connected {
                    interrupts
                        .register_irqfd(fd, r.vector.as_ref())
                        .map_err(err)?;
                    r.connected = true;
                }
            }
        }
        Ok(())
    }

    fn mask_vector(&mut self, vector: u16) -> Result<(), RoutesError> {
        let Some(r) = self.vectors.get_mut(&vector) else {
            return Ok(()); // Never routed: nothing can deliver.
        };
        if !r.connected {
            return Ok(());
        }
        let gsi = r.vector.gsi();
        if let Some(evt) = r.vector.eventfd() {
            self.vm
                .fd()
                .unregister_irqfd(evt, gsi)
                .map_err(|source| RoutesError::Unregister {
                    vector,
                    gsi,
                    source,
                })?;
        }
        r.connected = false;
        Ok(())
    }

    fn trigger_vector(&self, vector: u16) -> Result<(), RoutesError> {
        let r = self
            .vectors
            .get(&vector)
            .ok_or(RoutesError::NotRouted(vector))?;
        r.vector
            .trigger()
            .map_err(|source| RoutesError::Trigger { vector, source })
    }

    /// Gives every GSI back (irqfds, routes; the table is re-sent). Carries on past errors and
    /// returns the first.
    pub fn release(&mut self) -> Result<(), RoutesError> {
        let mut first = Ok(());
        let fd = self.vm.fd();
        let mut interrupts = self.vm.resources().interrupts();
        for (vector, r) in std::mem::take(&mut self.vectors) {
            if let Err(source) = interrupts.release_msi(fd, &r.vector) {
                if first.is_ok() {
                    first = Err(RoutesError::Interrupt { vector, source });
                }
            }
        }
        first
    }
}

impl Drop for MsiRoutes {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!("releasing MSI routes: {e}");
        }
    }
}

impl PassthroughRoutes for MsiRoutes {
    fn eventfd(&mut self, vector: u16) -> Result<EventFd, RouteError> {
        let clone = |e: &EventFd| {
            e.try_clone().map_err(|source| {
                RouteError::from(RoutesError::Interrupt {
                    vector,
                    source: InterruptError::EventFd(source),
                })
            })
        };
        if let Some(evt) = self.eventfd_of(vector) {
            return clone(evt);
        }
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| {
            RouteError::from(RoutesError::Interrupt {
                vector,
                source: InterruptError::EventFd(source),
            })
        })?;
        let out = clone(&evt)?;
        self.prepared.insert(vector, evt);
        Ok(out)
    }
}

impl VectorRoutes for MsiRoutes {
    fn unmask(&mut self, vector: u16, msg: MsiMessage) -> Result<(), RouteError> {
        self.unmask_vector(vector, msg).map_err(Into::into)
    }
    fn mask(&mut self, vector: u16) -> Result<(), RouteError> {
        self.mask_vector(vector).map_err(Into::into)
    }
    fn trigger(&mut self, vector: u16) -> Result<(), RouteError> {
        self.trigger_vector(vector).map_err(Into::into)
    }
}
