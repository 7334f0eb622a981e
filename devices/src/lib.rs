//! Device models on an address bus: legacy devices on port I/O (16550 UART, i8042) and MMIO
//! (boot timer), virtio devices behind a virtio-mmio transport, PCI (`pci`: host bridge, config
//! mechanism #1, config spaces, MSI-X/MSI), and VFIO (`vfio`): the kernel layer, and one
//! passed-through PCI function over kernel VFIO or vfio-user (`vfio::passthrough`).
//!
//! Every device implements [`BusDevice`] and sits on a [`Bus`] (the VMM keeps one for port I/O
//! and one for MMIO). Nothing the guest writes may panic the VMM: a bad access is logged and
//! ignored, answered with zeros, or (virtio) turned into an error status.

pub mod bus;
#[cfg(test)]
mod bus_tests;
pub mod device_states;
pub mod interrupt;
pub mod legacy;
pub mod pci;
pub mod state;
pub mod vfio;
pub mod virtio;
pub mod write_bitmap;

pub use bus::{Bus, BusDevice, BusError, VcpuAction};
pub use device_states::{DeviceStates, SavedState, StateRegistry, StatesError};
pub use interrupt::{Interrupt, IrqLine, MsiVector};
pub use state::{DeviceStateError, Stateful};

pub use write_bitmap::WriteBitmap;

/// Guest RAM as every device sees it. The `WriteBitmap` (vm-memory's `AtomicBitmap` plus a
/// summary bit) records each page a device (or the VMM) writes through vm-memory, which KVM's
/// dirty log cannot see; dirty tracking ORs it into every harvest. The VMM builds its guest
/// memory with this same type.
pub type GuestMemory = vm_memory::GuestMemoryMmap<WriteBitmap>;
