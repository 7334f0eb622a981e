//! VFIO passthrough. For now the kernel VFIO layer that the VMM and the probe share: opening a
//! device either way (open.rs: its group into a legacy type1 container, or its cdev bound to an
//! iommufd and attached to an IOAS, all through vfio-ioctls and iommufd-ioctls), and the ioctls
//! no crate wraps (sys/: region info, type1 dirty pages, iommufd HWPT dirty tracking). DMA
//! map/unmap and device DMA logging are vfio-ioctls' (`VfioOps`, `VfioDevice`), reached through
//! [`open::Opened`].
//!
//! `passthrough`: one passed-through PCI function over a transport trait (kernel VFIO on this
//! layer, vfio-user, a mock for unit tests), as ARCHITECTURE.md and PASSTHROUGH.md describe.
//!
//! # Who can see a device's DMA writes, per transport
//!
//! KVM's dirty log sees only vCPU stores; a passed-through device's DMA into guest RAM needs one
//! of these (TRACKING.md, "Writes by a passed-through device"):
//!
//! | transport | source | API | sees DMA? |
//! |---|---|---|---|
//! | kernel VFIO, either way | the device's DMA logging (mlx5, pds variant drivers) | `DeviceMigration::dma_logging_*` | yes |
//! | kernel VFIO, cdev + iommufd | IOMMU hardware dirty bits (AMD v1, VT-d SSADS, SMMUv3 HTTU; 6.7+) | [`sys::iommufd::HwptDirty`] | yes |
//! | kernel VFIO, group + type1 | `VFIO_IOMMU_DIRTY_PAGES` | [`sys::type1::Type1Dirty`] | no: every pinned page reads dirty |
//! | vfio-user | the server's DMA logging | `DeviceMigration` defaults: unsupported so far | - |
//! | mock | none | `DeviceMigration` defaults | - |
//!
//! Device state (VRAM included) travels only in migration v2 data
//! (`DeviceMigration::migration_*`), from a variant driver.
//!
//! Verified here, without VFIO or an IOMMU: the ioctl numbers (const assertions), the uapi
//! structs' sizes and offsets, the bitmap arithmetic (bounded, no overflow), every hand-written
//! ioctl reaching the kernel and failing cleanly on a file that is not a VFIO or iommufd fd
//! (ENOTTY, the ioctl named), and the transport's handling of what the crate returns (short
//! reads, ENOMSG, ENOTTY). Needs hardware: every success path. Tests skip with the reason
//! where `/dev/vfio/vfio`, `/dev/iommu` or a bound device (`VMM_VFIO_SYSFS`) is absent; with
//! `/dev/iommu` they check the iommufd ioctls on ids that name nothing (ENOENT).

pub mod open;
pub mod passthrough;
pub mod standin;
pub mod sys;

pub use open::{Access, CdevOpen, OpenError, Opened};
pub use sys::errno_of;
