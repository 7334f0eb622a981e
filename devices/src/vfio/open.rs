//! Opening a VFIO device, all through the crates: its group into a legacy type1 container
//! (vfio-ioctls' `VfioContainer` + `VfioDevice::new`), or its cdev bound to an iommufd and
//! attached to a fresh IOAS (iommufd-ioctls' `IommuFd` + `IommufdIoas`, vfio-ioctls'
//! `VfioIommufd` + `VfioDevice::new`, which binds and attaches).
//!
//! vfio-ioctls opens the nodes itself, at fixed paths: /dev/vfio/vfio and /dev/vfio/<group> from
//! the `iommu_group` link of the path it is given (on the group path a stand-in with the device's
//! link, standin.rs, so that its drop survives the device's removal); /dev/vfio/devices/<name>
//! from the one entry of the device's sysfs `vfio-dev/` directory. So a device is only opened
//! when its nodes were found under /dev, and a cdev only when that derivation names the node the
//! caller found. The iommufd node is opened here (`IommuFd::new_from_fd`) and can lie anywhere.
//! No VFIO hardware on the machines this was written on: both paths run in the lab guest against
//! the kernel's sample mdevs (guest-images/lab/README.md, tools/probe's VFIO self-test).

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use iommufd_ioctls::{IommuFd, IommufdError, IommufdIoas};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioIommufd};

use super::standin::{StandIn, StandInError};

/// How a device is opened: the nodes to open it through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Its cdev bound to an iommufd (/dev/iommu): the iommufd path (HW dirty tracking).
    Cdev { node: PathBuf, iommu: PathBuf },
    /// Its group added to a legacy type1 container (/dev/vfio/vfio).
    Group { node: PathBuf, id: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path} is not a character device")]
    NotCharDevice { path: PathBuf },
    #[error("cannot stat {path}: {source}")]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "vfio-ioctls opens /dev/vfio/vfio and /dev/vfio/<group> itself, but the nodes were found \
         under {dev_dir}: the group is not opened"
    )]
    FixedDevPaths { dev_dir: PathBuf },
    #[error(
        "vfio-ioctls opens /dev/vfio/devices/<cdev> itself, but the nodes were found under \
         {dev_dir}: the device is not opened"
    )]
    FixedCdevPath { dev_dir: PathBuf },
    #[error("reading {dir}: {source}")]
    CdevDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir} holds {entries} entries, not one directory")]
    CdevDirEntries { dir: PathBuf, entries: usize },
    /// Which cdev vfio-ioctls would open cannot be told.
    #[error("vfio-ioctls would open no cdev for {node}: the device is not opened")]
    CdevUnknown {
        node: PathBuf,
        source: Box<OpenError>,
    },
    /// The cdev vfio-ioctls would open is not the one the caller found.
    #[error(
        "vfio-ioctls would open {derived}, not the cdev found ({node}): the device is not opened"
    )]
    CdevElsewhere { derived: PathBuf, node: PathBuf },
    #[error("vfio-ioctls bound the cdev but returned no iommufd device id")]
    NoDeviceId,
    #[error("opening the iommufd {path}: {source}")]
    OpenIommu {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a PCI device's sysfs directory (no `config` and `vendor` in it)")]
    NotPciDevice { path: PathBuf },
    #[error(
        "{path} is bound to {driver}, not vfio-pci: bind it first (tools/host-check.sh --bind)"
    )]
    NotVfioPci { path: PathBuf, driver: String },
    #[error("{path} has neither a VFIO cdev ({cdev}) nor an IOMMU group node ({group}){why}")]
    NoNode {
        path: PathBuf,
        cdev: String,
        group: String,
        why: &'static str,
    },
    /// The stand-in sysfs path for vfio-ioctls (standin.rs) could not be made.
    #[error("{0}")]
    StandIn(#[from] StandInError),
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

/// A device opened one way or the other. Field order is drop order.
pub enum Opened {
    /// The device goes before its container (closing its fd first lets the group leave the
    /// container; vfio-ioctls' Drop relies on that order).
    Legacy {
        device: VfioDevice,
        /// The path vfio-ioctls was given for the device (standin.rs: its drop reads it again,
        /// and the device's own sysfs directory may be gone by then). Dropped after the device.
        stand_in: StandIn,
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
pub fn derived_cdev(sysfs: &Path) -> Result<PathBuf, OpenError> {
    let dir = sysfs.join("vfio-dev");
    let entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|source| OpenError::CdevDir {
            dir: dir.clone(),
            source,
        })?
        .filter_map(|e| Some(e.ok()?.path()))
        .collect();
    match entries.as_slice() {
        [one] if one.is_dir() => match one.file_name() {
            Some(name) => Ok(Path::new("/dev/vfio/devices").join(name)),
            None => Err(OpenError::CdevDirEntries { dir, entries: 0 }),
        },
        _ => Err(OpenError::CdevDirEntries {
            dir,
            entries: entries.len(),
        }),
    }
}

/// Which way to open a device, when the user chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefer {
    /// The cdev with iommufd where the host has both, else the group.
    Any,
    Group,
    Iommufd,
}

/// How to open the PCI device whose sysfs directory is `sysfs` (any link to it), found under
/// /dev: its cdev + /dev/iommu, or its group node. Refuses a directory that is not a PCI
/// device's and a device bound to another driver than vfio-pci, naming it.
pub fn access_of(sysfs: &Path, prefer: Prefer) -> Result<(PathBuf, Access), OpenError> {
    let real = std::fs::canonicalize(sysfs).map_err(|source| OpenError::Stat {
        path: sysfs.to_path_buf(),
        source,
    })?;
    if !real.join("config").is_file() || !real.join("vendor").is_file() {
        return Err(OpenError::NotPciDevice { path: real });
    }
    let driver = std::fs::read_link(real.join("driver"))
        .ok()
        .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()));
    match driver.as_deref() {
        Some("vfio-pci") => {}
        other => {
            return Err(OpenError::NotVfioPci {
                path: real,
                driver: other.unwrap_or("no driver").to_string(),
            })
        }
    }
    let iommu = PathBuf::from("/dev/iommu");
    let cdev = derived_cdev(&real).ok().filter(|n| n.exists());
    let group = std::fs::read_link(real.join("iommu_group"))
        .ok()
        .and_then(|l| l.file_name()?.to_str()?.parse::<u32>().ok());
    let group_node = group
        .map(|id| (id, PathBuf::from(format!("/dev/vfio/{id}"))))
        .filter(|(_, n)| n.exists());
    let show = |p: Option<&PathBuf>| p.map_or("none".to_string(), |p| p.display().to_string());
    let access = match (prefer, cdev, group_node) {
        (Prefer::Any | Prefer::Iommufd, Some(node), _) if iommu.exists() => {
            Access::Cdev { node, iommu }
        }
        (Prefer::Any | Prefer::Group, _, Some((id, node))) => Access::Group { node, id },
        (_, cdev, group_node) => {
            return Err(OpenError::NoNode {
                path: real,
                cdev: show(cdev.as_ref()),
                group: show(group_node.as_ref().map(|(_, n)| n)),
                why: match prefer {
                    Prefer::Iommufd => " usable with /dev/iommu (asked for iommufd)",
                    Prefer::Group => " (asked for the group)",
                    Prefer::Any => "",
                },
            })
        }
    };
    Ok((real, access))
}

/// Opens the device whose sysfs directory is `sysfs` the `access` way; `dev_dir` is where its
/// nodes were found (vfio-ioctls only opens them under /dev).
pub fn open(sysfs: &Path, access: &Access, dev_dir: &Path) -> Result<Opened, OpenError> {
    match access {
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
            // vfio-ioctls reads the group off the path when it opens the device and again when
            // it drops it, after the device may have been removed: it gets a stand-in that
            // outlives the device (standin.rs).
            let stand_in = StandIn::new(sysfs)?;
            // Reads <stand-in>/iommu_group for the group, opens /dev/vfio/<group> (EBUSY while
            // a VM holds it), sets the type1v2 IOMMU, and asks the group for the device by name.
            let device =
                VfioDevice::new(stand_in.path(), container.clone(), false).map_err(|source| {
                    OpenError::Vfio {
                        step: "opening the device through its group",
                        source,
                    }
                })?;
            Ok(Opened::Legacy {
                device,
                stand_in,
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
            open_cdev(sysfs, node, iommu).map(Opened::Cdev)
        }
    }
}

fn open_cdev(sysfs: &Path, node: &Path, iommu: &Path) -> Result<CdevOpen, OpenError> {
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
    let derived = derived_cdev(sysfs).map_err(|source| OpenError::CdevUnknown {
        node: node.to_path_buf(),
        source: Box::new(source),
    })?;
    if derived != node {
        return Err(OpenError::CdevElsewhere {
            derived,
            node: node.to_path_buf(),
        });
    }
    // Opens the cdev, binds it to the iommufd (EBUSY while its group is open, EINVAL while it
    // is bound elsewhere), attaches it to the IOAS and reads its regions and IRQs.
    let device =
        VfioDevice::new(sysfs, iommufd.clone(), true).map_err(|source| OpenError::Vfio {
            step: "opening the device through its cdev",
            source,
        })?;
    let Some(dev_id) = device.iommufd_dev_id() else {
        return Err(OpenError::NoDeviceId);
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

    /// Opens a device whose sysfs directory does not exist: every test here fails before or at
    /// the first call that would need it.
    fn open_at(access: Access, dev_dir: &Path) -> Result<Opened, OpenError> {
        open(Path::new("/nonexistent"), &access, dev_dir)
    }

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vmm-devices-vfio-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_regular_file_is_refused_before_any_vfio_call() {
        let dir = temp("open");
        let node = dir.join("7");
        std::fs::write(&node, b"").unwrap();
        let r = open_at(
            Access::Group {
                node: node.clone(),
                id: 7,
            },
            Path::new("/dev"),
        );
        let cdev = open_at(
            Access::Cdev {
                node: node.clone(),
                iommu: node.clone(),
            },
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
        let r = open_at(group, Path::new("/tmp/fake-dev"));
        assert!(matches!(r, Err(OpenError::FixedDevPaths { .. })));
        let cdev = Access::Cdev {
            node: null.clone(),
            iommu: null,
        };
        let r = open_at(cdev, Path::new("/tmp/fake-dev"));
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
        let Err(e) = open_at(access, Path::new("/dev")) else {
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
        assert_eq!(crate::vfio::errno_of(&e), Some(libc::ENOTTY));
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
        assert!(matches!(none, Err(OpenError::CdevDir { .. })));
        assert_eq!(one.ok(), Some(PathBuf::from("/dev/vfio/devices/vfio3")));
        assert!(matches!(
            two,
            Err(OpenError::CdevDirEntries { entries: 2, .. })
        ));
    }

    fn fake_pci(name: &str, driver: Option<&str>) -> PathBuf {
        let root = temp(name);
        let dev = root.join("0000:01:00.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("config"), [0u8; 64]).unwrap();
        std::fs::write(dev.join("vendor"), "0x10de\n").unwrap();
        if let Some(d) = driver {
            let drv = root.join("drivers").join(d);
            std::fs::create_dir_all(&drv).unwrap();
            std::os::unix::fs::symlink(&drv, dev.join("driver")).unwrap();
        }
        dev
    }

    #[test]
    fn access_refuses_what_is_not_a_pci_device_or_not_bound_to_vfio_pci() {
        let root = temp("access-notpci");
        let err = access_of(&root, Prefer::Any).unwrap_err();
        assert!(matches!(err, OpenError::NotPciDevice { .. }), "{err}");
        let missing = access_of(&root.join("nope"), Prefer::Any).unwrap_err();
        assert!(matches!(missing, OpenError::Stat { .. }), "{missing}");

        let nvidia = fake_pci("access-nvidia", Some("nvidia"));
        let err = access_of(&nvidia, Prefer::Any).unwrap_err().to_string();
        assert!(err.contains("bound to nvidia, not vfio-pci"), "{err}");
        let none = fake_pci("access-nodriver", None);
        let err = access_of(&none, Prefer::Any).unwrap_err().to_string();
        assert!(err.contains("bound to no driver"), "{err}");
    }

    #[test]
    fn a_vfio_pci_device_without_nodes_names_what_it_looked_for() {
        let dev = fake_pci("access-nonodes", Some("vfio-pci"));
        for (prefer, says) in [
            (
                Prefer::Any,
                "neither a VFIO cdev (none) nor an IOMMU group node (none)",
            ),
            (Prefer::Group, "(asked for the group)"),
            (Prefer::Iommufd, "(asked for iommufd)"),
        ] {
            let err = access_of(&dev, prefer).unwrap_err().to_string();
            assert!(err.contains(says), "{prefer:?}: {err}");
        }
    }
}
