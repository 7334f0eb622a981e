//! `vmm-gpu-test-device` as a child process serving one VM, for the device scenario.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::tracking::BenchError;

/// The test device serving one VM (`--once`), killed if still there when dropped.
pub struct Device {
    child: Child,
    pub socket: PathBuf,
}

impl Device {
    pub fn start(bin: &Path, socket: PathBuf, vram_mib: u64) -> Result<Device, BenchError> {
        let fail = |e: String| BenchError::Usage(format!("{}: {e}", bin.display()));
        let _ = std::fs::remove_file(&socket);
        let mut child = Command::new(bin)
            .arg("--socket")
            .arg(&socket)
            .args(["--vram-size", &format!("{vram_mib}M"), "--json", "--once"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| fail(format!("cannot start it: {e}")))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            // Its first line says it listens (or it exits, closing stdout).
            let _ = BufReader::new(out).read_line(&mut line);
        }
        if !line.contains("\"ready\":true") {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(format!("did not say it was ready: {line:?}")));
        }
        Ok(Device { child, socket })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
