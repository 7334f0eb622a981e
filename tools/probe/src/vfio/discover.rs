//! Which VFIO devices there are and how to open them: groups (/dev/vfio/<N>, their devices listed
//! in sysfs under kernel/iommu_groups/<N>/devices/) and cdevs (/dev/vfio/devices/vfioX, whose
//! device is class/vfio-dev/vfioX/device in sysfs). Only sysfs and /dev are read; nothing is
//! opened. Never run against a real VFIO tree here (no VFIO on this machine): the tests build one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How a device will be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Its cdev bound to an iommufd (/dev/iommu): the iommufd path (HW dirty tracking).
    Cdev { node: PathBuf, iommu: PathBuf },
    /// Its group added to a legacy type1 container (/dev/vfio/vfio).
    Group { node: PathBuf, id: u32 },
    /// Neither is possible; why.
    Neither { why: String },
}

impl Access {
    pub fn describe(&self) -> String {
        match self {
            Access::Cdev { node, iommu } => {
                format!("cdev {} + iommufd {}", node.display(), iommu.display())
            }
            Access::Group { node, id } => format!("group {id} ({})", node.display()),
            Access::Neither { why } => why.clone(),
        }
    }
}

/// One device bound to a VFIO driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioDev {
    /// PCI address, e.g. 0000:01:00.0.
    pub bdf: String,
    /// Its sysfs directory, resolved to the device's own (ending in the BDF) where possible.
    pub sysfs: PathBuf,
    pub group: Option<u32>,
    pub group_node: Option<PathBuf>,
    pub cdev_node: Option<PathBuf>,
    /// From sysfs, for the evidence: "10de", "2330", "vfio-pci".
    pub vendor: Option<String>,
    pub device: Option<String>,
    pub driver: Option<String>,
    pub access: Access,
}

impl VfioDev {
    /// "0000:01:00.0 [10de:2330, vfio-pci]".
    pub fn describe(&self) -> String {
        let id = match (&self.vendor, &self.device) {
            (Some(v), Some(d)) => format!("{v}:{d}"),
            _ => "ids unknown".into(),
        };
        let driver = self.driver.as_deref().unwrap_or("driver unknown");
        format!("{} [{id}, {driver}]", self.bdf)
    }
}

#[derive(Debug, Default)]
pub struct Discovery {
    /// Whether <dev>/vfio exists at all (it does whenever the vfio module is loaded).
    pub vfio_dir: bool,
    /// Every group and cdev node found.
    pub nodes: Vec<PathBuf>,
    pub devices: Vec<VfioDev>,
    /// Nodes that led to no device, and why.
    pub notes: Vec<String>,
}

fn names(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn link_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

fn read_id(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    Some(s.strip_prefix("0x").unwrap_or(s).to_string())
}

/// A PCI address: domain:bus:slot.function, all hex. Only PCI devices have BARs.
pub fn is_bdf(s: &str) -> bool {
    let hex = |p: &str, n: usize| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit());
    let mut parts = s.split(':');
    let (Some(dom), Some(bus), Some(rest), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Some((slot, func)) = rest.split_once('.') else {
        return false;
    };
    hex(dom, 4) && hex(bus, 2) && hex(slot, 2) && func.len() == 1 && hex(func, 1)
}

pub fn discover(dev_dir: &Path, sys_dir: &Path) -> Discovery {
    let vfio = dev_dir.join("vfio");
    let mut out = Discovery {
        vfio_dir: vfio.is_dir(),
        ..Default::default()
    };
    let mut devs: BTreeMap<String, VfioDev> = BTreeMap::new();
    let groups_dir = sys_dir.join("kernel/iommu_groups");
    for name in names(&vfio) {
        // /dev/vfio/vfio is the container node, present whenever the module is loaded.
        if name == "vfio" || name == "devices" {
            continue;
        }
        let node = vfio.join(&name);
        out.nodes.push(node.clone());
        let Ok(id) = name.parse::<u32>() else {
            out.notes.push(if name.starts_with("noiommu-") {
                format!(
                    "{}: a no-IOMMU group (no DMA isolation): not probed",
                    node.display()
                )
            } else {
                format!("{}: not a numbered group: not probed", node.display())
            });
            continue;
        };
        let members = groups_dir.join(id.to_string()).join("devices");
        let bdfs = names(&members);
        if bdfs.is_empty() {
            out.notes.push(format!(
                "{}: no devices listed in {}",
                node.display(),
                members.display()
            ));
        }
        for bdf in bdfs {
            let d = entry(&mut devs, &bdf, members.join(&bdf));
            d.group = Some(id);
            d.group_node = Some(node.clone());
        }
    }
    let cdevs = vfio.join("devices");
    for name in names(&cdevs) {
        let node = cdevs.join(&name);
        out.nodes.push(node.clone());
        let link = sys_dir.join("class/vfio-dev").join(&name).join("device");
        let Some(bdf) = link_name(&link) else {
            out.notes.push(format!(
                "{}: {} is not a readable link to its device",
                node.display(),
                link.display()
            ));
            continue;
        };
        let d = entry(&mut devs, &bdf, link);
        d.cdev_node = Some(node);
        if d.group.is_none() {
            // A device seen only through its cdev: its group, for the legacy path's fallback.
            if let Some(id) = link_name(&d.sysfs.join("iommu_group")).and_then(|n| n.parse().ok()) {
                d.group = Some(id);
                let node = vfio.join(id.to_string());
                d.group_node = node.exists().then_some(node);
            }
        }
    }
    let iommu = dev_dir.join("iommu");
    for (bdf, mut d) in devs {
        // A mediated device speaking the vfio-pci API (the kernel's samples) has BARs too.
        let mdev = !is_bdf(&bdf) && super::mdev::is_pci_mdev(&d.sysfs);
        if !is_bdf(&bdf) && !mdev {
            out.notes
                .push(format!("{bdf}: not a PCI device (no BARs): not probed"));
            continue;
        }
        // The device's own directory (…/0000:01:00.0), whichever link led to it: vfio-ioctls
        // takes the path's file name as the device's name within its group, and on the cdev
        // path opens /dev/vfio/devices/ + the name in its vfio-dev/ (open.rs checks that this
        // is the node found here).
        if let Ok(real) = std::fs::canonicalize(&d.sysfs) {
            if real.file_name().is_some_and(|n| *n == *bdf) {
                d.sysfs = real;
            }
        }
        d.vendor = read_id(&d.sysfs.join("vendor"));
        d.device = read_id(&d.sysfs.join("device"));
        d.driver = link_name(&d.sysfs.join("driver"));
        if mdev {
            d.driver = super::mdev::type_name(&d.sysfs).map(|t| format!("mdev {t}"));
        }
        d.access = match (&d.cdev_node, &d.group_node) {
            // An mdev through its group: its type1 container is where VFIO_IOMMU_DIRTY_PAGES
            // is (the cdev path of the same devices is the self-test's, selftest.rs).
            (_, Some(node)) if mdev => Access::Group {
                node: node.clone(),
                id: d.group.unwrap_or_default(),
            },
            (Some(node), _) if iommu.exists() => Access::Cdev {
                node: node.clone(),
                iommu: iommu.clone(),
            },
            (_, Some(node)) => Access::Group {
                node: node.clone(),
                // Set whenever group_node is.
                id: d.group.unwrap_or_default(),
            },
            (Some(_), None) => Access::Neither {
                why: format!(
                    "has a cdev but {} is absent and it has no group node",
                    iommu.display()
                ),
            },
            (None, None) => Access::Neither {
                why: "no group node and no cdev".into(),
            },
        };
        out.devices.push(d);
    }
    out
}

fn entry<'a>(
    devs: &'a mut BTreeMap<String, VfioDev>,
    bdf: &str,
    sysfs: PathBuf,
) -> &'a mut VfioDev {
    devs.entry(bdf.to_string()).or_insert_with(|| VfioDev {
        bdf: bdf.to_string(),
        sysfs,
        group: None,
        group_node: None,
        cdev_node: None,
        vendor: None,
        device: None,
        driver: None,
        access: Access::Neither { why: String::new() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses() {
        assert!(is_bdf("0000:01:00.0"));
        assert!(is_bdf("0000:af:1f.7"));
        assert!(!is_bdf("vfio-platform.0"));
        assert!(!is_bdf("0000:01:00"));
        assert!(!is_bdf("00:01:00.0"));
    }
}
