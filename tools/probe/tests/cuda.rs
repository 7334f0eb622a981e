//! `cuda::probe` where there is no GPU (this machine): one line saying why, no kinds, no cells,
//! no panic. Device directories are temp dirs and the libraries named on purpose, so these
//! hold on a GPU host too. Nothing here runs a GPU.

use std::path::{Path, PathBuf};

use vmm_probe::{cuda, ProbeOpts};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str, files: &[&str]) -> TempDir {
        let d =
            std::env::temp_dir().join(format!("vmm-probe-cudatest-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        for f in files {
            std::fs::write(d.join(f), b"").unwrap();
        }
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn opts(dev: &Path, library: &str) -> ProbeOpts {
    ProbeOpts {
        dev_dir: dev.to_path_buf(),
        cuda_library: PathBuf::from(library),
        ..ProbeOpts::default()
    }
}

#[test]
fn no_device_and_no_library_is_one_no_gpu_line() {
    let dev = TempDir::new("empty", &[]);
    let f = cuda::probe(&opts(&dev.0, "/nonexistent/libcuda.so.1"));
    assert_eq!(f.line.device, "GPU");
    assert!(!f.line.found);
    assert!(f.line.line.starts_with("no GPU: no "), "{}", f.line.line);
    assert!(f.line.line.contains("/nvidia* device"), "{}", f.line.line);
    assert!(
        f.line
            .line
            .contains("/nonexistent/libcuda.so.1 not loadable ("),
        "{}",
        f.line.line
    );
    assert!(f.kinds.is_empty() && f.cells.is_empty());
}

#[test]
fn a_device_node_without_the_library_says_present_but_not_probed() {
    let dev = TempDir::new("node", &["nvidia0", "nvidiactl"]);
    let f = cuda::probe(&opts(&dev.0, "/nonexistent/libcuda.so.1"));
    assert!(f.line.found);
    let l = &f.line.line;
    assert!(l.starts_with("present ("), "{l}");
    assert!(l.contains("nvidia0") && l.contains("nvidiactl"), "{l}");
    assert!(
        l.contains("but not probed: /nonexistent/libcuda.so.1 not loadable ("),
        "{l}"
    );
    assert!(f.kinds.is_empty() && f.cells.is_empty());
}

#[test]
fn a_library_that_is_not_cuda_is_named_by_the_missing_symbol() {
    let dev = TempDir::new("libc", &[]);
    let f = cuda::probe(&opts(&dev.0, "libc.so.6"));
    assert!(!f.line.found);
    let l = &f.line.line;
    assert!(l.starts_with("no GPU: "), "{l}");
    assert!(
        l.contains("libc.so.6 is not the CUDA driver: it has no cuInit"),
        "{l}"
    );
}

/// The default library on this machine: whatever is there, one line and no panic; where
/// neither a node nor libcuda exists it is the "no GPU" line.
#[test]
fn the_default_library_gives_one_line() {
    let dev = TempDir::new("default", &[]);
    let f = cuda::probe(&opts(&dev.0, "libcuda.so.1"));
    assert_eq!(f.line.device, "GPU");
    if !f.line.found {
        assert!(f.line.line.starts_with("no GPU: "), "{}", f.line.line);
        assert!(f.cells.is_empty());
    }
}
