//! One passed-through PCI function over a transport trait (PASSTHROUGH.md, Cloud Hypervisor's
//! split): [`VfioTransport`] is the host side (kernel VFIO in `kernel`, vfio-user in `user`, a
//! mock for unit tests in `mock`); [`PassthroughDevice`] is everything the guest sees, built
//! once over it: the config shadow (`shadow`), BARs, MSI-X, DMA, reset and teardown
//! (`device`).

pub mod device;
pub mod kernel;
pub mod shadow;
pub mod transport;
pub mod user;

#[cfg(test)]
mod device_tests;
#[cfg(test)]
pub mod mock;

pub use device::{BarPiece, MappedPiece, PassthroughDevice, PassthroughError, PassthroughRoutes};
pub use kernel::{KernelError, KernelTransport};
pub use shadow::ShadowError;
pub use transport::{
    DeviceInfo, DmaRegion, IrqInfo, MmapArea, RegionFile, RegionInfo, TransportError, VfioTransport,
};
pub use user::{UserError, UserTransport};

/// An error and its sources on one line, for logs.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
