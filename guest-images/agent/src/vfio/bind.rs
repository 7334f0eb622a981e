//! `vfio-bind`: hands a PCI function to vfio-pci in no-IOMMU mode and finds its group device
//! (/dev/vfio/noiommu-N). The guest has no IOMMU, so vfio-pci only takes a function once
//! `enable_unsafe_noiommu_mode` is set; it then makes a fake IOMMU group for it.

use std::fs;
use std::path::{Path, PathBuf};

use crate::pci::{driver_of, Bdf};

const DRIVER: &str = "vfio-pci";

/// Where the kernel interfaces are; tests point them into a made-up tree.
#[derive(Debug, Clone)]
pub struct Paths {
    pub devices: PathBuf,
    pub noiommu_param: PathBuf,
    pub driver_dir: PathBuf,
    pub dev_vfio: PathBuf,
}

impl Paths {
    pub fn system() -> Paths {
        Paths {
            devices: PathBuf::from(crate::pci::SYSFS_PCI_DEVICES),
            noiommu_param: PathBuf::from("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode"),
            driver_dir: PathBuf::from("/sys/bus/pci/drivers").join(DRIVER),
            dev_vfio: PathBuf::from("/dev/vfio"),
        }
    }
}

/// What `vfio-bind` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Bound {
    /// The driver it was bound to before (`None`: none, or already vfio-pci).
    pub previous: Option<String>,
    pub group: PathBuf,
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    fs::write(path, value).map_err(|e| format!("write {value:?} to {}: {e}", path.display()))
}

/// The group number in the target of a device's `iommu_group` link
/// (`../../../kernel/iommu_groups/N`).
pub fn group_number(link: &Path) -> Option<u32> {
    link.file_name()?.to_str()?.parse().ok()
}

/// The no-IOMMU group device of a function bound to vfio-pci.
pub fn noiommu_group(paths: &Paths, bdf: &Bdf) -> Result<PathBuf, String> {
    let dir = paths.devices.join(bdf.as_str());
    let link = fs::read_link(dir.join("iommu_group"))
        .map_err(|e| format!("{bdf} has no IOMMU group ({e}): not bound to vfio-pci?"))?;
    let n = group_number(&link)
        .ok_or_else(|| format!("{bdf}: odd iommu_group link {}", link.display()))?;
    let group = paths.dev_vfio.join(format!("noiommu-{n}"));
    if group.exists() {
        Ok(group)
    } else {
        Err(format!(
            "{bdf} is in group {n} but {} is missing (not a no-IOMMU group)",
            group.display()
        ))
    }
}

/// Binds `bdf` to vfio-pci (no-op if it already is) and returns its no-IOMMU group.
pub fn bind(paths: &Paths, bdf: &Bdf) -> Result<Bound, String> {
    let dir = paths.devices.join(bdf.as_str());
    if !dir.is_dir() {
        return Err(format!("no PCI function {bdf}"));
    }
    if !paths.noiommu_param.exists() {
        return Err(format!(
            "{} missing: kernel without VFIO_NOIOMMU",
            paths.noiommu_param.display()
        ));
    }
    // Before binding: vfio-pci refuses a function without an IOMMU group unless it is set.
    write(&paths.noiommu_param, "Y")?;
    let previous = driver_of(&dir);
    if previous.as_deref() != Some(DRIVER) {
        write(&dir.join("driver_override"), DRIVER)?;
        if previous.is_some() {
            write(&dir.join("driver/unbind"), bdf.as_str())?;
        }
        write(&paths.driver_dir.join("bind"), bdf.as_str())?;
        let now = driver_of(&dir);
        if now.as_deref() != Some(DRIVER) {
            return Err(format!(
                "{bdf} is bound to {} after binding to {DRIVER}",
                now.as_deref().unwrap_or("no driver")
            ));
        }
    }
    Ok(Bound {
        previous: previous.filter(|d| d != DRIVER),
        group: noiommu_group(paths, bdf)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn fake(name: &str) -> (PathBuf, Paths) {
        let root =
            std::env::temp_dir().join(format!("vmm-agent-bind-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let paths = Paths {
            devices: root.join("devices"),
            noiommu_param: root.join("enable_unsafe_noiommu_mode"),
            driver_dir: root.join("drivers/vfio-pci"),
            dev_vfio: root.join("dev-vfio"),
        };
        for d in [&paths.driver_dir, &paths.dev_vfio] {
            fs::create_dir_all(d).expect("mkdir");
        }
        fs::create_dir_all(paths.devices.join("0000:00:01.0")).expect("mkdir");
        (root, paths)
    }

    #[test]
    fn reads_group_numbers() {
        assert_eq!(
            group_number(Path::new("../../../kernel/iommu_groups/3")),
            Some(3)
        );
        assert_eq!(
            group_number(Path::new("../../../kernel/iommu_groups/x")),
            None
        );
        assert_eq!(group_number(Path::new("/")), None);
    }

    #[test]
    fn an_already_bound_function_reports_its_group() {
        let (root, paths) = fake("bound");
        let dir = paths.devices.join("0000:00:01.0");
        fs::write(&paths.noiommu_param, "N").expect("param");
        symlink("../../drivers/vfio-pci", dir.join("driver")).expect("link");
        symlink("../../kernel/iommu_groups/0", dir.join("iommu_group")).expect("link");
        fs::write(paths.dev_vfio.join("noiommu-0"), "").expect("group");
        let bdf = Bdf::parse("00:01.0").expect("bdf");
        assert_eq!(
            bind(&paths, &bdf),
            Ok(Bound {
                previous: None,
                group: paths.dev_vfio.join("noiommu-0")
            })
        );
        assert_eq!(fs::read_to_string(&paths.noiommu_param).expect("read"), "Y");
        fs::remove_file(paths.dev_vfio.join("noiommu-0")).expect("rm");
        assert!(bind(&paths, &bdf)
            .expect_err("no group")
            .contains("missing"));
        fs::remove_dir_all(root).expect("cleanup");
    }

    #[test]
    fn refuses_missing_functions_and_kernels_without_noiommu() {
        let (root, paths) = fake("missing");
        let err = bind(&paths, &Bdf::parse("00:02.0").expect("bdf")).expect_err("missing");
        assert_eq!(err, "no PCI function 0000:00:02.0");
        let err = bind(&paths, &Bdf::parse("00:01.0").expect("bdf")).expect_err("param");
        assert!(err.contains("VFIO_NOIOMMU"), "{err}");
        fs::remove_dir_all(root).expect("cleanup");
    }

    #[test]
    fn a_bind_that_does_not_take_is_an_error() {
        // A plain directory accepts the writes but no kernel acts on them.
        let (root, paths) = fake("nottaken");
        fs::write(&paths.noiommu_param, "N").expect("param");
        let err = bind(&paths, &Bdf::parse("00:01.0").expect("bdf")).expect_err("not taken");
        assert_eq!(
            err,
            "0000:00:01.0 is bound to no driver after binding to vfio-pci"
        );
        let dir = paths.devices.join("0000:00:01.0");
        assert_eq!(
            fs::read_to_string(dir.join("driver_override")).expect("read"),
            "vfio-pci"
        );
        assert_eq!(
            fs::read_to_string(paths.driver_dir.join("bind")).expect("read"),
            "0000:00:01.0"
        );
        fs::remove_dir_all(root).expect("cleanup");
    }
}
