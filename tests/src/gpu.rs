//! The GPU-shaped test device (`vmm-gpu-test-device`, tools/gpu-test-device) as a vfio-user
//! server in the background, for tests that pass it through with `vmm run --device`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::Bg;

/// The test device's binary of the same build profile as `vmm` (built by
/// `cargo build --workspace --bins`), or $VMM_GPU_TEST_DEVICE.
pub fn device_bin() -> PathBuf {
    if let Ok(p) = std::env::var("VMM_GPU_TEST_DEVICE") {
        return PathBuf::from(p);
    }
    let bin = crate::vmm_bin().with_file_name("vmm-gpu-test-device");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build --workspace --bins`)",
        bin.display()
    );
    bin
}

/// Starts the device on DIR/NAME.sock with `extra` arguments; returns once it listens.
pub fn start(dir: &Path, name: &str, extra: &[&str]) -> (Bg, PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(device_bin());
    cmd.arg("--socket").arg(&sock).args(extra);
    let mut bg = Bg::spawn(name, cmd);
    bg.wait_for("listening on", Duration::from_secs(20));
    (bg, sock)
}

/// `--device vfio-user:SOCK`.
pub fn spec(sock: &Path) -> String {
    format!("vfio-user:{}", sock.display())
}

/// `vmm run` arguments for the Linux test guest (256 MiB) with the device on `sock` passed
/// through, the agent running `script`, the console in `console`.
pub fn linux_run_args(sock: &Path, script: &str, console: &Path) -> Vec<String> {
    let img = crate::images();
    [
        "run".to_string(),
        "--kernel".into(),
        img.kernel.display().to_string(),
        "--initrd".into(),
        img.initramfs.display().to_string(),
        "--mem".into(),
        "256M".into(),
        "--device".into(),
        spec(sock),
        "--agent".into(),
        script.into(),
        "--console".into(),
        format!("file:{}", console.display()),
    ]
    .into()
}
