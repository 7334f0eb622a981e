//! A vfio-pci device opened in no-IOMMU mode (`vfio.enable_unsafe_noiommu_mode=1`): its group
//! node is `/dev/vfio/noiommu-<N>` and its container takes `VFIO_NOIOMMU_IOMMU`, which
//! vfio-ioctls never sets (its `VfioContainer` asks for type1v2 and opens `/dev/vfio/<N>`), so
//! the five ioctls of the legacy path are made here by hand. With no IOMMU there is no DMA
//! mapping: the device's DMA addresses are physical addresses (pagemap.rs finds them).
//!
//! Needs: a kernel with CONFIG_VFIO_NOIOMMU and the mode on, the device bound to vfio-pci.
//! Each step's refusal comes back with its errno and the ioctl named.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

use vfio_bindings::bindings::vfio::{
    vfio_group_status, VFIO_API_VERSION, VFIO_BASE, VFIO_GROUP_FLAGS_VIABLE, VFIO_NOIOMMU_IOMMU,
};

#[derive(Debug, thiserror::Error)]
pub enum NoIommuError {
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{ioctl}: {source}")]
    Ioctl {
        ioctl: &'static str,
        source: std::io::Error,
    },
    #[error("VFIO_GET_API_VERSION says {0}, this code speaks {VFIO_API_VERSION}")]
    ApiVersion(i32),
    #[error(
        "the container does not offer VFIO_NOIOMMU_IOMMU (no-IOMMU mode off: \
         vfio.enable_unsafe_noiommu_mode=1)"
    )]
    NotOffered,
    #[error("group {0} is not viable (a device in it is bound to another driver)")]
    NotViable(String),
    #[error("{0:?} cannot be passed to the kernel (NUL in it)")]
    BadName(String),
}

/// `_IO(';', VFIO_BASE + n)`: VFIO's ioctls encode neither size nor direction.
const fn io_nr(n: u32) -> libc::c_ulong {
    ((b';' as libc::c_ulong) << 8) | (VFIO_BASE + n) as libc::c_ulong
}
pub const VFIO_GET_API_VERSION: libc::c_ulong = io_nr(0);
pub const VFIO_CHECK_EXTENSION: libc::c_ulong = io_nr(1);
pub const VFIO_SET_IOMMU: libc::c_ulong = io_nr(2);
pub const VFIO_GROUP_GET_STATUS: libc::c_ulong = io_nr(3);
pub const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = io_nr(4);
pub const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = io_nr(6);
// include/uapi/linux/vfio.h: VFIO_TYPE ';' (0x3b), VFIO_BASE 100 (0x64).
const _: () = assert!(VFIO_GET_API_VERSION == 0x3b64 && VFIO_GROUP_GET_DEVICE_FD == 0x3b6a);

fn ioctl_err(ioctl: &'static str) -> NoIommuError {
    NoIommuError::Ioctl {
        ioctl,
        source: std::io::Error::last_os_error(),
    }
}

/// An ioctl whose argument is a plain integer (or none); returns its non-negative result.
fn ioctl_val(
    f: &File,
    req: libc::c_ulong,
    arg: libc::c_ulong,
    name: &'static str,
) -> Result<i32, NoIommuError> {
    // SAFETY: these requests take an integer argument (or ignore it) and touch no memory of
    // ours; the fd is valid for the call (borrowed from `f`).
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req, arg) };
    if r < 0 {
        return Err(ioctl_err(name));
    }
    Ok(r)
}

/// The container's answer to VFIO_CHECK_EXTENSION(VFIO_NOIOMMU_IOMMU): 1 while no-IOMMU mode is
/// on, 0 otherwise.
pub fn offers_noiommu(container: &File) -> Result<bool, NoIommuError> {
    ioctl_val(
        container,
        VFIO_CHECK_EXTENSION,
        VFIO_NOIOMMU_IOMMU as libc::c_ulong,
        "VFIO_CHECK_EXTENSION(VFIO_NOIOMMU_IOMMU)",
    )
    .map(|r| r > 0)
}

fn open_rw(path: &Path) -> Result<File, NoIommuError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| NoIommuError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// The device, its group and its container; dropped in that order (the device fd first, then
/// the group, whose release takes it out of the container).
pub struct NoIommuDevice {
    pub device: File,
    _group: File,
    _container: File,
    pub group: String,
}

impl NoIommuDevice {
    /// What the DMA write trackers answer for this device, each tried for real: type1's
    /// VFIO_IOMMU_DIRTY_PAGES on the no-IOMMU container, VFIO DMA logging on the device (vfio-pci
    /// has log ops only in variant drivers); iommufd's HW dirty bits need an IOMMU, which a
    /// no-IOMMU device by definition is not behind.
    pub fn dma_trackers(&self) -> String {
        use devices::vfio::sys::feature::{self, Direction};
        use vfio_bindings::bindings::vfio::VFIO_DEVICE_FEATURE_DMA_LOGGING_START;
        let answer = |r: Result<(), String>| match r {
            Ok(()) => "accepted".to_string(),
            Err(e) => e,
        };
        let type1 = answer(
            super::type1::start(&self._container)
                .map(|()| {
                    let _ = super::type1::stop(&self._container);
                })
                .map_err(|e| super::chain(&e)),
        );
        let logging = answer(
            feature::probe(
                &self.device,
                VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
                Direction::Set,
            )
            .map_err(|e| super::chain(&e)),
        );
        format!(
            "VFIO type1 dirty on the no-IOMMU container: {type1}; VFIO DMA logging on the \
             device (FEATURE_PROBE of DMA_LOGGING_START): {logging}; iommufd HW dirty: not \
             tried, no IOMMU translates this device's DMA (no dirty bits to read)"
        )
    }
}

impl AsRawFd for NoIommuDevice {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.device.as_raw_fd()
    }
}

/// Opens device `name` (its PCI address) of no-IOMMU group `group_node`
/// (`/dev/vfio/noiommu-<N>`) through a fresh container set to VFIO_NOIOMMU_IOMMU.
pub fn open(vfio_dir: &Path, group_node: &Path, name: &str) -> Result<NoIommuDevice, NoIommuError> {
    let container = open_rw(&vfio_dir.join("vfio"))?;
    let version = ioctl_val(&container, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")?;
    if version != VFIO_API_VERSION as i32 {
        return Err(NoIommuError::ApiVersion(version));
    }
    if !offers_noiommu(&container)? {
        return Err(NoIommuError::NotOffered);
    }
    let group = open_rw(group_node)?;
    let group_name = group_node.display().to_string();
    let mut status = vfio_group_status {
        argsz: std::mem::size_of::<vfio_group_status>() as u32,
        flags: 0,
    };
    // SAFETY: the kernel writes at most argsz bytes into `status`, which lives across the call.
    let r = unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_STATUS, &mut status) };
    if r < 0 {
        return Err(ioctl_err("VFIO_GROUP_GET_STATUS"));
    }
    if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
        return Err(NoIommuError::NotViable(group_name));
    }
    let cfd: libc::c_int = container.as_raw_fd();
    // SAFETY: the kernel reads one int (the container fd) from the pointer; `cfd` outlives the
    // call.
    let r = unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_SET_CONTAINER, &cfd) };
    if r < 0 {
        return Err(ioctl_err("VFIO_GROUP_SET_CONTAINER"));
    }
    ioctl_val(
        &container,
        VFIO_SET_IOMMU,
        VFIO_NOIOMMU_IOMMU as libc::c_ulong,
        "VFIO_SET_IOMMU(VFIO_NOIOMMU_IOMMU)",
    )?;
    let cname = CString::new(name).map_err(|_| NoIommuError::BadName(name.to_string()))?;
    // SAFETY: the kernel reads a NUL-terminated string from the pointer; `cname` outlives the
    // call.
    let fd = unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_DEVICE_FD, cname.as_ptr()) };
    if fd < 0 {
        return Err(ioctl_err("VFIO_GROUP_GET_DEVICE_FD"));
    }
    // SAFETY: a fresh fd the kernel just returned, owned by nothing else.
    let device = unsafe { File::from_raw_fd(fd) };
    Ok(NoIommuDevice {
        device,
        _group: group,
        _container: container,
        group: group_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno(e: &NoIommuError) -> Option<i32> {
        match e {
            NoIommuError::Ioctl { source, .. } | NoIommuError::Open { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }

    #[test]
    fn each_hand_made_ioctl_on_a_file_that_is_no_vfio_node_says_enotty() {
        // /dev/null stands in for the container and the group: the kernel answers ENOTTY to
        // every one of these, which shows each call reaches it and fails cleanly.
        let null = open_rw(Path::new("/dev/null")).unwrap();
        let e = ioctl_val(&null, VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION").unwrap_err();
        assert_eq!(errno(&e), Some(libc::ENOTTY), "{e}");
        let e = offers_noiommu(&null).unwrap_err();
        assert_eq!(errno(&e), Some(libc::ENOTTY), "{e}");
        assert!(e.to_string().contains("VFIO_CHECK_EXTENSION"), "{e}");
        // The whole open, its container a directory holding /dev/null as `vfio`.
        let dir = std::env::temp_dir().join(format!("vmm-probe-noiommu-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink("/dev/null", dir.join("vfio")).unwrap();
        let r = open(&dir, Path::new("/dev/null"), "0000:00:05.0");
        std::fs::remove_dir_all(&dir).unwrap();
        let Err(e) = r else {
            panic!("/dev/null opened as a VFIO container")
        };
        assert!(e.to_string().starts_with("VFIO_GET_API_VERSION"), "{e}");
        assert_eq!(errno(&e), Some(libc::ENOTTY));
    }

    #[test]
    fn the_dma_trackers_are_each_tried_and_named() {
        // /dev/null in every role: each tracker's ioctl reaches the kernel and says ENOTTY.
        let null = || open_rw(Path::new("/dev/null")).unwrap();
        let d = NoIommuDevice {
            device: null(),
            _group: null(),
            _container: null(),
            group: "/dev/null".into(),
        };
        let ev = d.dma_trackers();
        assert!(ev.contains("VFIO_IOMMU_DIRTY_PAGES(START)"), "{ev}");
        assert!(ev.contains("DMA_LOGGING_START): "), "{ev}");
        assert_eq!(ev.matches("os error 25").count(), 2, "{ev}");
    }

    #[test]
    fn a_container_offers_noiommu_exactly_when_the_mode_is_on() {
        // Consistency, not a feature: where the host has a VFIO container, its answer agrees
        // with the module parameter; elsewhere the test says why it checked nothing.
        let Ok(container) = open_rw(Path::new("/dev/vfio/vfio")) else {
            eprintln!("skipped: no /dev/vfio/vfio on this host");
            return;
        };
        let param =
            std::fs::read_to_string("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode");
        let offered = offers_noiommu(&container).unwrap();
        match param {
            Ok(p) => assert_eq!(offered, p.trim() == "Y", "parameter {p:?}"),
            // Without CONFIG_VFIO_NOIOMMU there is no parameter and no such IOMMU.
            Err(_) => assert!(!offered),
        }
    }
}
