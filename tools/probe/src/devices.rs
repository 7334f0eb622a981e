//! The device lines of the report: one each for the GPU (cuda/), VFIO (vfio/) and HMM (test_hmm,
//! hmm/), saying what was found and probed, or in one line why nothing was.

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

/// The HMM line before the life cycle runs: test_hmm's device nodes under `dev`, or why none.
pub fn hmm_line(dev: &Path) -> DeviceLine {
    let mut found: Vec<String> = std::fs::read_dir(dev)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("hmm_dmirror"))
                .map(|n| format!("{}/{n}", dev.display()))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    DeviceLine {
        device: "HMM".into(),
        found: !found.is_empty(),
        line: if found.is_empty() {
            "no HMM device: no /dev/hmm_dmirror*".into()
        } else {
            format!("present ({})", found.join(", "))
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmm_nodes_are_named_and_others_ignored() {
        let dir = std::env::temp_dir().join(format!("vmm-probe-devtest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let none = hmm_line(&dir);
        std::fs::write(dir.join("hmm_dmirror1"), b"").unwrap();
        std::fs::write(dir.join("hmm_dmirror0"), b"").unwrap();
        std::fs::write(dir.join("nvidia0"), b"").unwrap();
        let some = hmm_line(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!none.found);
        assert_eq!(none.line, "no HMM device: no /dev/hmm_dmirror*");
        assert!(some.found);
        let d = dir.display();
        assert_eq!(
            some.line,
            format!("present ({d}/hmm_dmirror0, {d}/hmm_dmirror1)")
        );
    }
}
