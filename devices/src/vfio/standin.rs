//! A stand-in for a device's sysfs directory, for vfio-ioctls' legacy (group) path.
//!
//! vfio-ioctls 0.10 takes the device's sysfs path and uses two things of it: the group id, the
//! file name of the `iommu_group` link in it (read by `VfioDevice::new`, and read again by
//! `VfioDevice::drop` to find the group to put back), and the device's name, the path's file
//! name (`VFIO_GROUP_GET_DEVICE_FD`). Its drop `unwrap`s the second read. That read comes right
//! after it closes the device fd, and closing the fd is what lets a pending removal of the
//! device proceed (6.12 `vfio_unregister_group_dev` waits for the last fd, then
//! `vfio_device_remove_group` drops the device from its IOMMU group, deleting the link; a real
//! IOMMU group loses it on `device_del`, also after the driver's remove). So a device removed
//! under a holder panics the holder's drop, racily: measured in the lab guest (vanish.rs in
//! tools/probe), and a check of the link before the drop cannot help, the link being there
//! until the fd closes.
//!
//! The cure here: the crate is handed a directory of our own named like the device, holding an
//! `iommu_group` link with the same target as the device's. Nothing in sysfs is read through
//! it, so it outlives the device, and the crate's drop puts the group back and closes it as it
//! does for a device still present. It lives in a fresh 0700 directory under the temp dir
//! (created, not reused: `create_dir` fails on an existing name), from the open until after
//! the device's drop.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum StandInError {
    #[error("{path} has no file name to ask the group for the device by")]
    NoName { path: PathBuf },
    #[error("reading {link}: {source}")]
    Link {
        link: PathBuf,
        source: std::io::Error,
    },
    #[error("creating the stand-in {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Names tried before giving up on finding a free one (each taken name is someone else's).
const TRIES: u32 = 64;
static SEQ: AtomicU32 = AtomicU32::new(0);

/// `<temp>/vmm-vfio-<pid>-<n>/<device name>/iommu_group -> <the device's link target>`;
/// removed when dropped.
#[derive(Debug)]
pub struct StandIn {
    root: PathBuf,
    dev: PathBuf,
}

impl StandIn {
    /// Under the process's temp dir (`TMPDIR`, else /tmp).
    pub fn new(sysfs: &Path) -> Result<Self, StandInError> {
        Self::new_in(sysfs, &std::env::temp_dir())
    }

    pub fn new_in(sysfs: &Path, parent: &Path) -> Result<Self, StandInError> {
        let name = sysfs.file_name().ok_or_else(|| StandInError::NoName {
            path: sysfs.to_path_buf(),
        })?;
        let link = sysfs.join("iommu_group");
        let target = std::fs::read_link(&link).map_err(|source| StandInError::Link {
            link: link.clone(),
            source,
        })?;
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o700);
        let mut tries = 0;
        let root = loop {
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            let root = parent.join(format!("vmm-vfio-{}-{seq}", std::process::id()));
            match builder.create(&root) {
                Ok(()) => break root,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < TRIES => {
                    tries += 1;
                }
                Err(source) => return Err(StandInError::Create { path: root, source }),
            }
        };
        // From here on, dropping `me` removes what was made.
        let me = StandIn {
            dev: root.join(name),
            root,
        };
        let create = |path: &Path, r: std::io::Result<()>| {
            r.map_err(|source| StandInError::Create {
                path: path.to_path_buf(),
                source,
            })
        };
        create(&me.dev, builder.create(&me.dev))?;
        let stand_link = me.dev.join("iommu_group");
        create(
            &stand_link,
            std::os::unix::fs::symlink(&target, &stand_link),
        )?;
        Ok(me)
    }

    /// The path to hand vfio-ioctls instead of the device's sysfs directory.
    pub fn path(&self) -> &Path {
        &self.dev
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        // Best effort: a leftover is an empty directory and a dangling link in the temp dir,
        // named after this process, and nothing reads it.
        let _ = std::fs::remove_file(self.dev.join("iommu_group"));
        let _ = std::fs::remove_dir(&self.dev);
        let _ = std::fs::remove_dir(&self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vmm-devices-standin-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// What vfio-ioctls 0.10 reads of the path (`VfioDevice::get_group_id_from_path` and
    /// `VfioGroup::get_device`), restated.
    fn as_vfio_ioctls_reads(path: &Path) -> Option<(u32, String)> {
        let group = std::fs::read_link(path.join("iommu_group")).ok()?;
        let id = group.file_name()?.to_str()?.parse().ok()?;
        Some((id, path.file_name()?.to_str()?.to_string()))
    }

    #[test]
    fn the_stand_in_reads_like_the_device_and_outlives_it() {
        let root = temp("outlives");
        let sysfs = root.join("sys/devices/virtual/mtty/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001");
        std::fs::create_dir_all(&sysfs).unwrap();
        std::os::unix::fs::symlink(
            "../../../../kernel/iommu_groups/12",
            sysfs.join("iommu_group"),
        )
        .unwrap();
        let stand = StandIn::new_in(&sysfs, &root).unwrap();
        let before = as_vfio_ioctls_reads(stand.path());
        // The device vanishes, its link with it (what removal does).
        std::fs::remove_dir_all(root.join("sys")).unwrap();
        let device_after = as_vfio_ioctls_reads(&sysfs);
        let stand_after = as_vfio_ioctls_reads(stand.path());
        let path = stand.path().to_path_buf();
        let meta = std::fs::metadata(path.parent().unwrap()).unwrap();
        drop(stand);
        let left = std::fs::read_dir(&root).unwrap().count();
        std::fs::remove_dir_all(&root).unwrap();
        let want = Some((12, "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001".to_string()));
        assert_eq!(before, want);
        assert_eq!(device_after, None, "the device's own path no longer reads");
        assert_eq!(stand_after, want, "the stand-in still does");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        assert!(!path.exists());
        assert_eq!(left, 0, "the stand-in is removed when dropped");
    }

    #[test]
    fn a_device_without_a_group_link_is_refused_naming_it() {
        let root = temp("nolink");
        let err = StandIn::new_in(&root.join("dev0"), &root).unwrap_err();
        let left = std::fs::read_dir(&root).unwrap().count();
        std::fs::remove_dir_all(&root).unwrap();
        assert!(matches!(err, StandInError::Link { .. }), "{err}");
        assert!(err.to_string().contains("dev0/iommu_group"), "{err}");
        assert_eq!(left, 0);
    }

    #[test]
    fn two_stand_ins_of_one_device_do_not_collide() {
        let root = temp("two");
        let sysfs = root.join("0000:00:05.0");
        std::fs::create_dir_all(&sysfs).unwrap();
        std::os::unix::fs::symlink("/sys/kernel/iommu_groups/3", sysfs.join("iommu_group"))
            .unwrap();
        let a = StandIn::new_in(&sysfs, &root).unwrap();
        let b = StandIn::new_in(&sysfs, &root).unwrap();
        let differ = a.path() != b.path();
        drop((a, b));
        std::fs::remove_dir_all(&root).unwrap();
        assert!(differ);
    }
}
