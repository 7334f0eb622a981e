//! NVIDIA memory through the CUDA driver API, opened at run time (dlopen of libcuda.so.1): each
//! kind of memory CUDA makes is run through external.rs, every CPU-side mechanism and then, with
//! a GPU kernel as the device writer, whether each mechanism sees the GPU's writes. The kinds,
//! 16 pages each, in this order (HMM last: TRACKING.md predicts fatal GPU faults there, which
//! lose the context):
//!
//! - CUDA managed (cuMemAllocManaged): TRACKING.md's "UVM managed memory" row;
//! - CUDA pinned (cuMemHostAlloc): nvidia.ko maps it into the process ("nvidia.ko BAR mmap");
//! - CUDA registered anon (cuMemHostRegister): "pinned host memory written by GPU DMA";
//! - CUDA device memory (cuMemAlloc): no CPU mapping, so every cell is n/a, with the reason;
//! - HMM malloc range (UVM HMM): plain anonymous memory the kernel stores to directly, only
//!   where the GPU can reach pageable memory (CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS).
//!
//! Without a GPU this is one line saying why. This code has never run on a GPU (no GPU machine
//! was lent to the task that wrote it): its first GPU run is its real test.

mod driver;
mod error;
mod memory;
mod ptx;
mod resources;
mod writer;

use std::path::Path;

pub use error::CudaError;

use crate::devices::DeviceFindings;
use crate::kinds::SMALL;
use crate::report::DeviceLine;
use crate::ProbeOpts;
use driver::{CuDevice, Driver};
use resources::{Health, Module, PrimaryContext};
use writer::KernelWriter;

pub const MANAGED: &str = "CUDA managed (cuMemAllocManaged)";
pub const PINNED: &str = "CUDA pinned (cuMemHostAlloc)";
pub const REGISTERED: &str = "CUDA registered anon (cuMemHostRegister)";
pub const DEVICE_ONLY: &str = "CUDA device memory (cuMemAlloc)";
pub const HMM: &str = "HMM malloc range (UVM HMM)";

/// Each range: 16 pages, enough for external.rs's CPU and device pages apart.
const LEN: usize = 16 * SMALL;

/// The nvidia* nodes under `dev` (nvidia0, nvidiactl, nvidia-uvm, ...), as paths.
fn nvidia_nodes(dev: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dev) else {
        return Vec::new();
    };
    let mut nodes: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("nvidia"))
        .map(|e| e.path().display().to_string())
        .collect();
    nodes.sort();
    nodes
}

fn line(found: bool, line: String) -> DeviceFindings {
    DeviceFindings {
        kinds: Vec::new(),
        cells: Vec::new(),
        line: DeviceLine {
            device: "GPU".into(),
            found,
            line,
        },
    }
}

/// Nothing probed: "no GPU" when neither a device node nor the driver says there is one.
fn not_probed(dev: &Path, nodes: &[String], e: &CudaError) -> DeviceFindings {
    if nodes.is_empty() {
        line(
            false,
            format!("no GPU: no {}/nvidia* device; {e}", dev.display()),
        )
    } else {
        line(
            true,
            format!("present ({}) but not probed: {e}", nodes.join(", ")),
        )
    }
}

/// What the driver says about the device probed.
struct Gpu {
    dev: CuDevice,
    name: String,
    /// Name, compute capability and driver version, for the line.
    about: String,
}

fn identify(drv: &Driver) -> Result<Gpu, CudaError> {
    let version = drv.version()?;
    let dev = drv.first_device()?;
    let name = drv.device_name(dev)?;
    let major = drv.attribute(dev, driver::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = drv.attribute(dev, driver::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let about = format!(
        "{name} (compute {major}.{minor}, CUDA driver {}.{})",
        version / 1000,
        version % 1000 / 10
    );
    Ok(Gpu { dev, name, about })
}

/// Finds the GPU, makes each memory kind on it and probes it; the line says what was done or
/// exactly why not.
pub fn probe(opts: &ProbeOpts) -> DeviceFindings {
    let nodes = nvidia_nodes(&opts.dev_dir);
    let drv = match Driver::load(&opts.cuda_library).and_then(|d| d.init().map(|()| d)) {
        Ok(d) => d,
        Err(e) => return not_probed(&opts.dev_dir, &nodes, &e),
    };
    let gpu = match identify(&drv) {
        Ok(g) => g,
        Err(e) => return not_probed(&opts.dev_dir, &nodes, &e),
    };
    crate::progress(format_args!("GPU: {}", gpu.about));
    // Declared before everything that borrows it, so dropped after.
    let health = Health::default();
    let _ctx = match PrimaryContext::retain(&drv, &health, gpu.dev) {
        Ok(c) => c,
        Err(e) => return line(true, format!("{} not probed: {e}", gpu.about)),
    };
    let module = match Module::load(&drv, &health, ptx::PTX) {
        Ok(m) => m,
        Err(e) => return line(true, format!("{} not probed: {e}", gpu.about)),
    };
    let writer = match KernelWriter::new(&drv, &health, &module, gpu.name.clone()) {
        Ok(w) => w,
        Err(e) => return line(true, format!("{} not probed: {e}", gpu.about)),
    };
    let (kinds, cells) = memory::probe_all(&drv, &health, gpu.dev, writer);
    let made = kinds.iter().filter(|k| k.available).count();
    let mut summary = format!(
        "{}: {made} of {} CUDA memory kinds made, {} cells",
        gpu.about,
        kinds.len(),
        cells.len()
    );
    if let Some(why) = health.unusable() {
        summary.push_str(&format!("; at the end {why}"));
    }
    DeviceFindings {
        kinds,
        cells,
        line: DeviceLine {
            device: "GPU".into(),
            found: true,
            line: summary,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-probe-cuda-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn nvidia_nodes_are_found_sorted_and_nothing_else() {
        let d = temp_dir("nodes");
        for n in ["nvidiactl", "nvidia0", "nvidia-uvm", "null", "vfio"] {
            std::fs::write(d.join(n), b"").unwrap();
        }
        let nodes = nvidia_nodes(&d);
        std::fs::remove_dir_all(&d).unwrap();
        let names: Vec<_> = nodes
            .iter()
            .map(|p| Path::new(p).file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["nvidia-uvm", "nvidia0", "nvidiactl"]);
        assert!(nvidia_nodes(Path::new("/nonexistent")).is_empty());
    }
}
