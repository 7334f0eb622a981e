//! The kernel's sample mediated devices with a framebuffer BAR (samples/vfio-mdev: mbochs and
//! mdpy), created for the probe where their parents are registered (the lab guest), so that the
//! VFIO rows are measured on real kernel VFIO devices: a BAR the process mmaps from the device
//! fd, as it would a GPU's, opened through its group in a type1 container. Instances are
//! removed again when the guard drops.
//!
//! What the two framebuffers are (6.12 sources): mbochs hands out ordinary RAM pages from its
//! own fault handler (`mbochs_region_vm_fault`; no VM_IO, VM_PFNMAP or VM_MIXEDMAP), mdpy maps
//! a vmalloc buffer with `remap_vmalloc_range` (VM_MIXEDMAP). Neither is the VM_IO|VM_PFNMAP
//! mapping vfio-pci makes of a real BAR, which is why their cells are compared with TRACKING.md's
//! vfio-pci BAR row and not assumed to agree with it.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MdevError {
    #[error("no mdev type {ty} under {bus}")]
    NoType { ty: String, bus: PathBuf },
    #[error("{path}: {source}")]
    Sysfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One sample type the probe creates an instance of: (parent, type directory name, UUID).
/// The UUIDs are fixed so a leftover from an interrupted run is recognised and removed first.
pub const SAMPLES: [(&str, &str, &str); 2] = [
    (
        "mbochs",
        "mbochs-small",
        "0c9e5a1e-16b0-4a7c-9d1e-0000000000b1",
    ),
    ("mdpy", "mdpy-vga", "0c9e5a1e-16b0-4a7c-9d1e-0000000000d1"),
];

/// The instances created; each removed (through sysfs) on drop.
#[derive(Debug, Default)]
pub struct Instances {
    pub created: Vec<PathBuf>,
}

impl Drop for Instances {
    fn drop(&mut self) {
        for dev in self.created.drain(..) {
            // Nothing to do on failure but say so: the probe must not fail on its cleanup.
            if let Err(e) = std::fs::write(dev.join("remove"), "1") {
                eprintln!("vmm-probe: removing {}: {e}", dev.display());
            }
        }
    }
}

fn write(path: &Path, what: &str) -> Result<(), MdevError> {
    std::fs::write(path, what).map_err(|source| MdevError::Sysfs {
        path: path.to_path_buf(),
        source,
    })
}

/// The type directory `ty` under any parent of `<sys>/class/mdev_bus`.
pub fn find_type(sys: &Path, ty: &str) -> Result<PathBuf, MdevError> {
    let bus = sys.join("class/mdev_bus");
    let parents = std::fs::read_dir(&bus).map_err(|source| MdevError::Sysfs {
        path: bus.clone(),
        source,
    })?;
    for p in parents.flatten() {
        let dir = p.path().join("mdev_supported_types").join(ty);
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    Err(MdevError::NoType {
        ty: ty.to_string(),
        bus,
    })
}

/// Creates instance `uuid` of type `ty`, removing a leftover of the same name first; returns
/// its sysfs directory.
pub fn create(sys: &Path, ty: &str, uuid: &str) -> Result<PathBuf, MdevError> {
    let dir = find_type(sys, ty)?;
    let dev = sys.join("bus/mdev/devices").join(uuid);
    if dev.exists() {
        write(&dev.join("remove"), "1")?;
    }
    write(&dir.join("create"), uuid)?;
    Ok(dev)
}

/// Creates one instance of each sample in [`SAMPLES`] whose parent is registered; the notes
/// say what was created and what could not be, for the device line.
pub fn create_samples(sys: &Path) -> (Instances, Vec<String>) {
    let mut out = Instances::default();
    let mut notes = Vec::new();
    for (parent, ty, uuid) in SAMPLES {
        match create(sys, ty, uuid) {
            Ok(dev) => {
                notes.push(format!(
                    "created {parent} instance {uuid} ({ty}) for the probe"
                ));
                out.created.push(dev);
            }
            Err(e) => notes.push(format!("no {parent} instance: {e}")),
        }
    }
    (out, notes)
}

/// Whether `sysfs` is a mediated device whose type speaks the vfio-pci API (config space and
/// BARs as regions 0-7), i.e. one with BARs to probe.
pub fn is_pci_mdev(sysfs: &Path) -> bool {
    std::fs::read_to_string(sysfs.join("mdev_type/device_api"))
        .is_ok_and(|api| api.trim() == "vfio-pci")
}

/// The sample parent (mbochs, mdpy, mtty) of an mdev, from its type's name, for its label.
pub fn type_name(sysfs: &Path) -> Option<String> {
    let link = std::fs::read_link(sysfs.join("mdev_type")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_mdev_bus_nothing_is_created_and_the_notes_say_why() {
        let (i, notes) = create_samples(Path::new("/nonexistent"));
        assert!(i.created.is_empty());
        assert_eq!(notes.len(), SAMPLES.len());
        assert!(
            notes.iter().all(|n| n.contains("class/mdev_bus")),
            "{notes:?}"
        );
    }

    #[test]
    fn a_pci_mdev_is_told_by_its_device_api() {
        let dir = std::env::temp_dir().join(format!("vmm-probe-mdev-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("ty")).unwrap();
        std::fs::write(dir.join("ty/device_api"), "vfio-pci\n").unwrap();
        std::os::unix::fs::symlink(dir.join("ty"), dir.join("mdev_type")).unwrap();
        let yes = is_pci_mdev(&dir);
        let name = type_name(&dir);
        std::fs::write(dir.join("ty/device_api"), "vfio-ccw\n").unwrap();
        let no = is_pci_mdev(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(yes && !no);
        assert_eq!(name.as_deref(), Some("ty"));
        assert!(!is_pci_mdev(Path::new("/nonexistent")));
    }
}
