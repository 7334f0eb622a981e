//! GPU, VFIO and HMM devices: looked for under /dev, one line each. This version probes none of
//! them; a device that is present is reported as such so its absence from the cells is explained.

use std::path::Path;

use crate::report::{Cell, DeviceLine, KindStatus};

/// What probing one device class (CUDA, VFIO) found: the memory kinds it tried to create (with
/// why not), the cells run on them, and the one device line for the report.
#[derive(Debug, Clone)]
pub struct DeviceFindings {
    pub kinds: Vec<KindStatus>,
    pub cells: Vec<Cell>,
    pub line: DeviceLine,
}

fn entries(dir: &Path, prefix: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

fn line(device: &str, found: Vec<String>, absent: String) -> DeviceLine {
    if found.is_empty() {
        DeviceLine {
            device: device.into(),
            found: false,
            line: absent,
        }
    } else {
        DeviceLine {
            device: device.into(),
            found: true,
            line: format!(
                "present ({}) but not probed yet by this version",
                found.join(", ")
            ),
        }
    }
}

/// Looks under `dev` (normally /dev).
pub fn scan(dev: &Path) -> Vec<DeviceLine> {
    let gpu = entries(dev, "nvidia")
        .into_iter()
        .map(|n| format!("/dev/{n}"))
        .collect();
    // /dev/vfio/vfio is the container node, present whenever the module is loaded: a device is
    // a numbered group or an iommufd cdev under /dev/vfio/devices/.
    let vfio_dir = dev.join("vfio");
    let mut vfio: Vec<String> = entries(&vfio_dir, "")
        .into_iter()
        .filter(|n| n != "vfio" && n != "devices")
        .map(|n| format!("/dev/vfio/{n}"))
        .collect();
    vfio.extend(
        entries(&vfio_dir.join("devices"), "")
            .into_iter()
            .map(|n| format!("/dev/vfio/devices/{n}")),
    );
    let hmm = entries(dev, "hmm_dmirror")
        .into_iter()
        .map(|n| format!("/dev/{n}"))
        .collect();
    vec![
        line("GPU", gpu, "no GPU: no /dev/nvidia* device".into()),
        line(
            "VFIO",
            vfio,
            if vfio_dir.exists() {
                "no VFIO device: /dev/vfio/ has no group or cdev".into()
            } else {
                "no VFIO: /dev/vfio/ absent".into()
            },
        ),
        line("HMM", hmm, "no HMM device: no /dev/hmm_dmirror*".into()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_devices_are_named_and_not_claimed_probed() {
        let dir = std::env::temp_dir().join(format!("vmm-probe-devtest-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("vfio/devices")).unwrap();
        std::fs::write(dir.join("nvidia0"), b"").unwrap();
        std::fs::write(dir.join("vfio/vfio"), b"").unwrap();
        let lines = scan(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(lines[0].found);
        assert!(lines[0].line.contains("/dev/nvidia0"), "{}", lines[0].line);
        assert!(lines[0].line.contains("not probed yet"));
        assert!(!lines[1].found, "the container node alone is no device");
        assert!(!lines[2].found);
    }
}
