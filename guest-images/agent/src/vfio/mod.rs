//! Kernel VFIO from inside the guest, in no-IOMMU mode: binding a function to vfio-pci, the
//! hand-written ioctls, the device fd, BAR mappings and interrupt eventfds.

pub mod bind;
pub mod device;
pub mod eventfd;
pub mod mapping;
pub mod sys;
