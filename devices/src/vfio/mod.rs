//! VFIO passthrough. For now the kernel VFIO layer that the VMM and the probe share: opening a
//! device either way (open.rs: its group into a legacy type1 container, or its cdev bound to an
//! iommufd and attached to an IOAS, all through vfio-ioctls and iommufd-ioctls), and the ioctls
//! no crate wraps (sys/: region info, type1 dirty pages, iommufd HWPT dirty tracking). DMA
//! map/unmap and device DMA logging are vfio-ioctls' (`VfioOps`, `VfioDevice`), reached through
//! [`open::Opened`].
//!
//! `passthrough`: one passed-through PCI function over a transport trait (kernel VFIO on this
//! layer, vfio-user, a mock for unit tests), as ARCHITECTURE.md and PASSTHROUGH.md describe.

pub mod open;
pub mod passthrough;
pub mod sys;

pub use open::{Access, CdevOpen, OpenError, Opened};
pub use sys::errno_of;
