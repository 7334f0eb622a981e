//! Opening a discovered device, all through the crates: its group into a legacy type1 container
//! (vfio-ioctls' `VfioContainer` + `VfioDevice::new`), or its cdev bound to an iommufd and
//! attached to a fresh IOAS (iommufd-ioctls' `IommuFd` + `IommufdIoas`, vfio-ioctls'
//! `VfioIommufd` + `VfioDevice::new`, which binds and attaches).
//!
//! vfio-ioctls opens the nodes itself, at fixed paths: /dev/vfio/vfio and /dev/vfio/<group> from
//! the device's sysfs `iommu_group` link; /dev/vfio/devices/<name> from the one entry of its
//! sysfs `vfio-dev/` directory. So a device is only opened when the probe looks at /dev, and a
//! cdev only when that derivation names the node discovery found. The iommufd node is opened
//! here (`IommuFd::new_from_fd`) and can lie anywhere. Never run with a bound device here.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use iommufd_ioctls::{IommuFd, IommufdError, IommufdIoas};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioIommufd};

use super::discover::{Access, VfioDev};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    NoWay(String),
    #[error("{path} is not a character device")]
    NotCharDevice { path: PathBuf },
    #[error("cannot stat {path}: {source}")]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "vfio-ioctls opens /dev/vfio/vfio and /dev/vfio/<group> itself, but the probe looks at \
         {dev_dir}: the group is not opened"
    )]
    FixedDevPaths { dev_dir: PathBuf },
    #[error(
        "vfio-ioctls opens /dev/vfio/devices/<cdev> itself, but the probe looks at {dev_dir}: \
         the device is not opened"
    )]
    FixedCdevPath { dev_dir: PathBuf },
    /// The cdev vfio-ioctls would open is not the one discovery found (or cannot be derived).
    #[error(
        "vfio-ioctls would open {derived}, not the cdev found ({node}): the device is not opened"
    )]
    CdevElsewhere { derived: String, node: PathBuf },
    #[error("opening the iommufd {path}: {source}")]
    OpenIommu {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{step}: {source}")]
    Vfio {
        step: &'static str,
        source: VfioError,
    },
    #[error("{step}: {source}")]
    Iommufd {
        step: &'static str,
        source: IommufdError,
    },
}

impl OpenError {
    /// What the refusal usually means, for the device line.
    pub fn meaning(&self) -> &'static str {
        match (self, super::errno_of(self)) {
            // drivers/vfio/device_cdev.c: the cdev path allows one bound open at a time.
            (
                OpenError::Vfio {
                    source: VfioError::VfioDeviceBindIommufd(_),
                    ..
                },
                Some(libc::EINVAL),
            ) => " (the device is already open through its cdev: a VM may hold it)",
            (_, code) => super::hint(code),
        }
    }
}

/// A device opened one way or the other. Field order is drop order.
pub enum Opened {
    /// The device goes before its container (closing its fd first lets the group leave the
    /// container; vfio-ioctls' Drop relies on that order).
    Legacy {
        device: VfioDevice,
        container: Arc<VfioContainer>,
        group: u32,
    },
    Cdev(CdevOpen),
}

/// A cdev bound to an iommufd and attached to its IOAS. Dropping it drops the device first
/// (vfio-ioctls detaches it, panicking should the kernel refuse, and closes the cdev, which
/// unbinds it), then the last reference to the iommufd wrapper (iommufd-ioctls destroys the
/// IOAS, then closes the iommufd).
pub struct CdevOpen {
    pub device: VfioDevice,
    pub iommufd: Arc<VfioIommufd>,
    /// The device's id in the iommufd (for HW_INFO and HWPT_ALLOC).
    pub dev_id: u32,
    pub node: PathBuf,
}

impl CdevOpen {
    /// The iommufd: the crate's calls, and the fd of the hand-written ioctls.
    pub fn fd(&self) -> &IommuFd {
        self.iommufd.iommufd()
    }

    /// The IOAS the device was attached to when opened.
    pub fn ioas(&self) -> u32 {
        self.iommufd.ioas().id()
    }
}

impl Opened {
    pub fn describe(&self) -> String {
        match self {
            Opened::Legacy { group, .. } => {
                format!("through group {group} in a type1 container (/dev/vfio/vfio)")
            }
            Opened::Cdev(c) => format!(
                "through {} bound to iommufd (device id {}, IOAS {})",
                c.node.display(),
                c.dev_id,
                c.ioas()
            ),
        }
    }

    pub fn device(&self) -> &VfioDevice {
        match self {
            Opened::Legacy { device, .. } => device,
            Opened::Cdev(c) => &c.device,
        }
    }
}

/// The device fd (regions, mmap, features).
impl AsRawFd for Opened {
    fn as_raw_fd(&self) -> RawFd {
        self.device().as_raw_fd()
    }
}

fn char_device(path: &Path) -> Result<(), OpenError> {
    let meta = std::fs::metadata(path).map_err(|source| OpenError::Stat {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_char_device() {
        return Err(OpenError::NotCharDevice {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// The cdev `VfioDevice::new` opens for the device at `sysfs` on the iommufd path, as
/// vfio-ioctls 0.10 derives it (`VfioDevice::open_cdev`): /dev/vfio/devices/ joined with the
/// name of the one entry of `<sysfs>/vfio-dev/`, which must be a directory.
pub fn derived_cdev(sysfs: &Path) -> Result<PathBuf, String> {
    let dir = sysfs.join("vfio-dev");
    let entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("nothing ({}: {e})", dir.display()))?
        .filter_map(|e| Some(e.ok()?.path()))
        .collect();
    match entries.as_slice() {
        [one] if one.is_dir() => match one.file_name() {
            Some(name) => Ok(Path::new("/dev/vfio/devices").join(name)),
            None => Err(format!("nothing ({} is unnamed)", one.display())),
        },
        _ => Err(format!(
            "nothing ({} holds {} entries, not one directory)",
            dir.display(),
            entries.len()
        )),
    }
}

pub fn open(dev: &VfioDev, dev_dir: &Path) -> Result<Opened, OpenError> {
    match &dev.access {
        Access::Neither { why } => Err(OpenError::NoWay(why.clone())),
        Access::Group { node, id } => {
            char_device(node)?;
            if dev_dir != Path::new("/dev") {
                return Err(OpenError::FixedDevPaths {
                    dev_dir: dev_dir.to_path_buf(),
                });
            }
            let container = VfioContainer::new(None).map_err(|source| OpenError::Vfio {
                step: "opening the container /dev/vfio/vfio",
                source,
            })?;
            let container = Arc::new(container);
            // Reads <sysfs>/iommu_group for the group, opens /dev/vfio/<group> (EBUSY while a
            // VM holds it), sets the type1v2 IOMMU, and asks the group for the device by name.
            let device =
                VfioDevice::new(&dev.sysfs, container.clone(), false).map_err(|source| {
                    OpenError::Vfio {
                        step: "opening the device through its group",
                        source,
                    }
                })?;
            Ok(Opened::Legacy {
                device,
                container,
                group: *id,
            })
        }
        Access::Cdev { node, iommu } => {
            char_device(node)?;
            char_device(iommu)?;
            if dev_dir != Path::new("/dev") {
                return Err(OpenError::FixedCdevPath {
                    dev_dir: dev_dir.to_path_buf(),
                });
            }
            open_cdev(dev, node, iommu).map(Opened::Cdev)
        }
    }
}

fn open_cdev(dev: &VfioDev, node: &Path, iommu: &Path) -> Result<CdevOpen, OpenError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(iommu)
        .map_err(|source| OpenError::OpenIommu {
            path: iommu.to_path_buf(),
            source,
        })?;
    let fd = Arc::new(IommuFd::new_from_fd(file));
    let ioas = IommufdIoas::new(fd.clone()).map_err(|source| OpenError::Iommufd {
        step: "allocating an IOAS",
        source,
    })?;
    let iommufd =
        VfioIommufd::new(fd, Some(Arc::new(ioas)), None).map_err(|source| OpenError::Vfio {
            step: "wrapping the iommufd and its IOAS",
            source,
        })?;
    let iommufd = Arc::new(iommufd);
    let derived = derived_cdev(&dev.sysfs);
    if derived.as_deref() != Ok(node) {
        return Err(OpenError::CdevElsewhere {
            derived: derived.map_or_else(|why| why, |p| p.display().to_string()),
            node: node.to_path_buf(),
        });
    }
    // Opens the cdev, binds it to the iommufd (EBUSY while its group is open, EINVAL while it
    // is bound elsewhere), attaches it to the IOAS and reads its regions and IRQs.
    let device =
        VfioDevice::new(&dev.sysfs, iommufd.clone(), true).map_err(|source| OpenError::Vfio {
            step: "opening the device through its cdev",
            source,
        })?;
    let Some(dev_id) = device.iommufd_dev_id() else {
        return Err(OpenError::NoWay(
            "vfio-ioctls bound the cdev but returned no iommufd device id".into(),
        ));
    };
    Ok(CdevOpen {
        device,
        iommufd,
        dev_id,
        node: node.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
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

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vmm-probe-vfio-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_regular_file_is_refused_before_any_vfio_call() {
        let dir = temp("open");
        let node = dir.join("7");
        std::fs::write(&node, b"").unwrap();
        let r = open(
            &dev(Access::Group {
                node: node.clone(),
                id: 7,
            }),
            Path::new("/dev"),
        );
        let cdev = open(
            &dev(Access::Cdev {
                node: node.clone(),
                iommu: node.clone(),
            }),
            &dir,
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(r, Err(OpenError::NotCharDevice { .. })));
        assert!(matches!(cdev, Err(OpenError::NotCharDevice { .. })));
    }

    #[test]
    fn nodes_outside_dev_are_not_handed_to_vfio_ioctls() {
        // /dev/null stands in for the nodes: character devices, just not under /dev/vfio.
        let null = PathBuf::from("/dev/null");
        let group = Access::Group {
            node: null.clone(),
            id: 7,
        };
        let r = open(&dev(group), Path::new("/tmp/fake-dev"));
        assert!(matches!(r, Err(OpenError::FixedDevPaths { .. })));
        let cdev = Access::Cdev {
            node: null.clone(),
            iommu: null,
        };
        let r = open(&dev(cdev), Path::new("/tmp/fake-dev"));
        assert!(matches!(r, Err(OpenError::FixedCdevPath { .. })));
    }

    #[test]
    fn a_cdev_that_is_not_one_fails_at_the_iommufd() {
        // Both nodes are /dev/null: opened for real; iommufd-ioctls' IOMMU_IOAS_ALLOC on it
        // says ENOTTY.
        let access = Access::Cdev {
            node: PathBuf::from("/dev/null"),
            iommu: PathBuf::from("/dev/null"),
        };
        let Err(e) = open(&dev(access), Path::new("/dev")) else {
            panic!("/dev/null opened as a VFIO device");
        };
        assert!(
            matches!(
                e,
                OpenError::Iommufd {
                    step: "allocating an IOAS",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(super::super::errno_of(&e), Some(libc::ENOTTY));
    }

    #[test]
    fn the_cdev_vfio_ioctls_opens_comes_from_sysfs_vfio_dev() {
        let dir = temp("derive");
        let none = derived_cdev(&dir);
        std::fs::create_dir_all(dir.join("vfio-dev/vfio3")).unwrap();
        let one = derived_cdev(&dir);
        std::fs::create_dir_all(dir.join("vfio-dev/vfio4")).unwrap();
        let two = derived_cdev(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(none.is_err());
        assert_eq!(one, Ok(PathBuf::from("/dev/vfio/devices/vfio3")));
        assert!(two.unwrap_err().contains("2 entries"));
    }
}
