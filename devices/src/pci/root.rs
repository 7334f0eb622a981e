//! The PCI root: bus 0's functions by (device, function), with the host bridge at 00:00.0.
//! Config accesses (from [`super::conf1::ConfigIo`], later perhaps ECAM) reach a function
//! through here; a function that is absent reads as all ones, which is how a guest's scan
//! learns it is not there. What a write changes (a BAR moved, decode switched) is handed,
//! with the function's address, to the owner's [`PciEvents`], after the function is unlocked,
//! so the owner may relocate bus ranges (and even touch the function) from there.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use super::config::ConfigEvent;
use super::device::PciDevice;
use super::host_bridge::HostBridge;

pub const MAX_DEVICES: u8 = 32;
pub const MAX_FUNCTIONS: u8 = 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RootError {
    #[error("{0}: only bus 0, devices 0..32 and functions 0..8 exist")]
    BadAddress(PciAddress),
    #[error("{0} is taken")]
    Taken(PciAddress),
    #[error("no free device number on bus 0")]
    Full,
    #[error("no function at {0}")]
    NotFound(PciAddress),
}

/// Bus, device, function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciAddress {
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Self {
            bus,
            device,
            function,
        }
    }

    fn is_valid(&self) -> bool {
        self.bus == 0 && self.device < MAX_DEVICES && self.function < MAX_FUNCTIONS
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// The owner's side of guest config writes (the VMM relocates BAR ranges on its buses).
///
/// Called on the vCPU thread that made the write, with the root locked (through
/// [`super::conf1::ConfigIo`]) and the function unlocked: it may change the buses and lock the
/// function, but must not lock the root.
pub trait PciEvents: Send {
    fn config_event(&mut self, function: PciAddress, event: ConfigEvent);
}

/// Bus 0 and its functions. See the module comment.
#[derive(Default)]
pub struct PciRoot {
    functions: BTreeMap<PciAddress, Arc<Mutex<dyn PciDevice>>>,
    events: Option<Box<dyn PciEvents>>,
}

impl fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.functions.keys()).finish()
    }
}

impl PciRoot {
    /// Bus 0 with the host bridge at 00:00.0.
    pub fn new() -> Self {
        let mut root = Self::default();
        root.functions.insert(
            PciAddress::new(0, 0, 0),
            Arc::new(Mutex::new(HostBridge::new())),
        );
        root
    }

    /// Where config writes' events go (dropped, with a log line, until one is set).
    pub fn set_events(&mut self, events: Box<dyn PciEvents>) {
        self.events = Some(events);
    }

    /// Adds `device` as function 0 of the lowest free device number.
    pub fn add_device(
        &mut self,
        device: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<PciAddress, RootError> {
        let address = (0..MAX_DEVICES)
            .map(|d| PciAddress::new(0, d, 0))
            .find(|a| !self.functions.keys().any(|k| k.device == a.device))
            .ok_or(RootError::Full)?;
        self.functions.insert(address, device);
        Ok(address)
    }

    /// Adds `device` at `address` (a multi-function device's other functions).
    pub fn add_device_at(
        &mut self,
        address: PciAddress,
        device: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<(), RootError> {
        if !address.is_valid() {
            return Err(RootError::BadAddress(address));
        }
        if self.functions.contains_key(&address) {
            return Err(RootError::Taken(address));
        }
        self.functions.insert(address, device);
        Ok(())
    }

    pub fn remove_device(
        &mut self,
        address: PciAddress,
    ) -> Result<Arc<Mutex<dyn PciDevice>>, RootError> {
        self.functions
            .remove(&address)
            .ok_or(RootError::NotFound(address))
    }

    pub fn device(&self, address: PciAddress) -> Option<Arc<Mutex<dyn PciDevice>>> {
        self.functions.get(&address).cloned()
    }

    /// A guest config read; an absent function (or one whose lock is poisoned) reads all ones.
    pub fn config_read(&self, address: PciAddress, offset: usize, data: &mut [u8]) {
        match self.functions.get(&address).map(|d| d.lock()) {
            Some(Ok(mut d)) => d.config_read(offset, data),
            Some(Err(_)) => {
                tracing::warn!("config read of {address}: the function panicked earlier");
                data.fill(0xff);
            }
            None => data.fill(0xff),
        }
    }

    /// A guest config write; one to an absent function is dropped. Hands the events to the
    /// owner once the function is unlocked.
    pub fn config_write(&mut self, address: PciAddress, offset: usize, data: &[u8]) {
        let events = match self.functions.get(&address).map(|d| d.lock()) {
            Some(Ok(mut d)) => d.config_write(offset, data),
            Some(Err(_)) => {
                tracing::warn!("config write to {address}: the function panicked earlier");
                return;
            }
            None => return,
        };
        for event in events {
            match self.events.as_mut() {
                Some(sink) => sink.config_event(address, event),
                None => tracing::warn!("{address}: {event:?} with no one to act on it"),
            }
        }
    }
}
