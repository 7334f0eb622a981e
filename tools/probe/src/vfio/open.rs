//! Opening a discovered device. The opening itself is the VMM's and the probe's shared VFIO
//! layer (`devices::vfio::open`); here only what discovery adds (a device it found no way to
//! open) and what a refusal means, for the device line.

use std::path::Path;

use devices::vfio::open::{self as layer};
pub use devices::vfio::open::{derived_cdev, CdevOpen, Opened};
use vfio_ioctls::VfioError;

use super::discover::{Access, VfioDev};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Discovery found no way to open the device; why.
    #[error("{0}")]
    NoWay(String),
    #[error(transparent)]
    Open(#[from] layer::OpenError),
}

impl OpenError {
    /// What the refusal usually means, for the device line.
    pub fn meaning(&self) -> &'static str {
        match (self, super::errno_of(self)) {
            // drivers/vfio/device_cdev.c: the cdev path allows one bound open at a time.
            (
                OpenError::Open(layer::OpenError::Vfio {
                    source: VfioError::VfioDeviceBindIommufd(_),
                    ..
                }),
                Some(libc::EINVAL),
            ) => " (the device is already open through its cdev: a VM may hold it)",
            (_, code) => super::hint(code),
        }
    }
}

/// Opens `dev` the way discovery found, through nodes found under `dev_dir`.
pub fn open(dev: &VfioDev, dev_dir: &Path) -> Result<Opened, OpenError> {
    let access = match &dev.access {
        Access::Neither { why } => return Err(OpenError::NoWay(why.clone())),
        Access::Cdev { node, iommu } => layer::Access::Cdev {
            node: node.clone(),
            iommu: iommu.clone(),
        },
        Access::Group { node, id } => layer::Access::Group {
            node: node.clone(),
            id: *id,
        },
    };
    Ok(layer::open(&dev.sysfs, &access, dev_dir)?)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn dev(access: Access) -> VfioDev {
        VfioDev {
            bdf: "0000:01:00.0".into(),
            sysfs: PathBuf::from("/nonexistent"),
            group: Some(7),
            group_node: None,
            cdev_node: None,
            vendor: None,
            device: None,
            driver: None,
            access,
        }
    }

    #[test]
    fn no_way_in_is_said_before_any_node_is_touched() {
        let why = "no /dev/iommu and no group node".to_string();
        let r = open(
            &dev(Access::Neither { why: why.clone() }),
            Path::new("/dev"),
        );
        assert!(matches!(&r, Err(OpenError::NoWay(w)) if *w == why));
    }

    #[test]
    fn the_layer_refusals_keep_their_errno_and_meaning() {
        // /dev/null as both nodes: opened for real, refused by the kernel at IOMMU_IOAS_ALLOC.
        let access = Access::Cdev {
            node: PathBuf::from("/dev/null"),
            iommu: PathBuf::from("/dev/null"),
        };
        let Err(e) = open(&dev(access), Path::new("/dev")) else {
            panic!("/dev/null opened as a VFIO device");
        };
        assert!(
            matches!(e, OpenError::Open(layer::OpenError::Iommufd { .. })),
            "{e}"
        );
        assert_eq!(super::super::errno_of(&e), Some(libc::ENOTTY));
        assert!(e.to_string().starts_with("allocating an IOAS: "), "{e}");
        assert_eq!(e.meaning(), "");
    }
}
