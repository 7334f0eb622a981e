//! Helpers shared by the integration tests: find the `vmm` binary and the guest images, run vmm
//! and read its JSON report. Tests boot real guests on the real /dev/kvm.

pub mod console;
pub mod gpu;
pub mod micro;
pub mod migration;
pub mod netns;
pub mod process;
pub mod proxy;
pub mod snapshot;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The `vmm` binary of the same build profile as this test (target/<profile>/vmm), or $VMM_BIN.
pub fn vmm_bin() -> PathBuf {
    if let Ok(p) = std::env::var("VMM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/vmm
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("vmm");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build --workspace --bins`, as tools/test.sh does)",
        bin.display()
    );
    bin
}

/// The Linux test guest built by guest-images/build.sh.
pub struct Images {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Reads guest-images/out/images.env (or $VMM_KERNEL / $VMM_INITRAMFS). Fails the test with the
/// command to run when the images were never built: a Linux test never passes by skipping.
pub fn images() -> Images {
    let env = workspace_root().join("guest-images/out/images.env");
    let mut kernel = std::env::var("VMM_KERNEL").ok();
    let mut initramfs = std::env::var("VMM_INITRAMFS").ok();
    if let Ok(text) = std::fs::read_to_string(&env) {
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=') {
                let v = v.trim().trim_matches('"').to_string();
                match k.trim() {
                    "VMM_KERNEL" if kernel.is_none() => kernel = Some(v),
                    "VMM_INITRAMFS" if initramfs.is_none() => initramfs = Some(v),
                    _ => {}
                }
            }
        }
    }
    let missing = || {
        panic!(
            "guest images not built: run guest-images/build.sh (tools/test.sh does) to create {}",
            env.display()
        )
    };
    let images = Images {
        kernel: PathBuf::from(kernel.unwrap_or_else(missing)),
        initramfs: PathBuf::from(initramfs.unwrap_or_else(missing)),
    };
    assert!(
        images.kernel.is_file(),
        "kernel {} missing",
        images.kernel.display()
    );
    assert!(
        images.initramfs.is_file(),
        "initramfs {} missing",
        images.initramfs.display()
    );
    images
}

/// A finished vmm run.
pub struct Run {
    pub output: Output,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }
    /// The JSON report (last stdout line, with --json).
    pub fn report(&self) -> serde_json::Value {
        let line = self
            .stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("vmm printed no report; stderr:\n{}", self.stderr));
        serde_json::from_str(line).unwrap_or_else(|e| {
            panic!("report is not JSON ({e}): {line}\nstderr:\n{}", self.stderr)
        })
    }
    /// Asserts vmm did not panic (a panic is never an acceptable answer to bad input).
    pub fn assert_no_panic(&self) {
        assert!(
            !self.stderr.contains("panicked"),
            "vmm panicked:\n{}",
            self.stderr
        );
    }
}

/// How long a foreground `vmm` run may take before the test kills it and fails: the longest
/// run in the suite (a Linux guest boot plus its agent script) takes ~3 minutes on a loaded
/// 2-core machine. `VMM_TEST_TIMEOUT_S` raises it.
pub fn run_timeout() -> Duration {
    std::env::var("VMM_TEST_TIMEOUT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(600), Duration::from_secs)
}

/// Runs vmm with `args` (stdin from /dev/null); kills it and fails the test after
/// `run_timeout()`, so a hung guest cannot hang the suite.
pub fn vmm(args: &[&str]) -> Run {
    let mut cmd = Command::new(vmm_bin());
    cmd.args(args);
    run_with_timeout(cmd, &format!("vmm {}", args.join(" ")), run_timeout())
}

/// Runs `cmd` to its end (stdin from /dev/null, output collected); kills it and fails the test
/// with what it printed if it is still running after `limit`.
pub fn run_with_timeout(mut cmd: Command, what: &str, limit: Duration) -> Run {
    let bg = process::Bg::spawn(what, {
        cmd.stdin(std::process::Stdio::null());
        cmd
    });
    let (status, stdout, stderr) = bg.wait_output(limit);
    Run {
        output: Output {
            status,
            stdout: stdout.clone().into_bytes(),
            stderr: stderr.clone().into_bytes(),
        },
        stdout,
        stderr,
    }
}

/// `vmm backends --json`: every tracking backend vmm knows, as (name, available on this host,
/// the reason where not). What a test may expect of a backend is what this says of it.
pub fn backends() -> Vec<(String, bool, Option<String>)> {
    let run = vmm(&["backends", "--json"]);
    run.assert_no_panic();
    assert_eq!(run.code(), Some(0), "stderr:\n{}", run.stderr);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).expect("backends --json");
    v.as_array()
        .expect("a list")
        .iter()
        .map(|b| {
            (
                b["backend"].as_str().unwrap_or_default().to_string(),
                b["available"].as_bool().unwrap_or(false),
                b["reason"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// Lines the agent printed (`AGENT: ...`) in a console log.
pub fn agent_lines(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| {
            l.trim_end_matches('\r')
                .split_once(guest_abi::agent::RESULT_PREFIX)
                .map(|(_, rest)| rest.trim().to_string())
        })
        .collect()
}
