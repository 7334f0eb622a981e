//! How an MSI or MSI-X vector reaches the VM: the device's capability emulation decides when a
//! vector may deliver and with which message; the owner's [`VectorRoutes`] turns that into a
//! KVM MSI route on the vector's GSI with the vector's eventfd as an irqfd, so interrupts go
//! from the eventfd (a passed-through device's, handed to VFIO) to the guest without the VMM.

/// An MSI message: what the device writes, and where, to raise a vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// An owner's failure to (re)program a route, kept whole as the source of the module's error.
pub type RouteError = Box<dyn std::error::Error + Send + Sync>;

/// The owner's side of a function's vectors (numbered from 0 within the function).
pub trait VectorRoutes {
    /// `vector` may deliver from now on, with `msg`: create its route (and irqfd) the first
    /// time, or point the route at `msg` and reconnect the irqfd. Called again whenever the
    /// guest changes the message of a live vector.
    fn unmask(&mut self, vector: u16, msg: MsiMessage) -> Result<(), RouteError>;
    /// `vector` may not deliver (masked, or MSI/MSI-X disabled): disconnect its irqfd and keep
    /// the GSI. A trigger meanwhile stays counted in the eventfd, and KVM delivers it when the
    /// irqfd is connected again, which is what the pending bit means.
    fn mask(&mut self, vector: u16) -> Result<(), RouteError>;
    /// Raises `vector` once (an emulated device firing, or a pending bit released on unmask).
    fn trigger(&mut self, vector: u16) -> Result<(), RouteError>;
}

/// What became of a trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Sent to the guest.
    Sent,
    /// The vector is masked: its pending bit is set and it is sent on unmask.
    Pending,
    /// MSI/MSI-X is disabled (or the vector is not allotted): nothing happens.
    Dropped,
}

/// Brings `vector`'s route in line with what the emulation says now (`now`: its message if it
/// may deliver). `programmed` is what the owner was last told and is updated only on success.
/// Returns whether the vector just became live, so the caller can release a pending bit.
pub(crate) fn reconcile(
    vector: u16,
    programmed: &mut Option<MsiMessage>,
    now: Option<MsiMessage>,
    routes: &mut dyn VectorRoutes,
) -> Result<bool, RouteError> {
    if *programmed == now {
        return Ok(false);
    }
    let was_live = programmed.is_some();
    match now {
        Some(msg) => routes.unmask(vector, msg)?,
        None => routes.mask(vector)?,
    }
    *programmed = now;
    Ok(!was_live && now.is_some())
}
