//! `vmm-probe --in-guest` (`vmm probe --in-guest`): the probe inside the lab guest, from the host.
//! Builds the lab image if needed (`guest-images/build.sh --lab`, a cache hit in seconds when
//! nothing changed), boots it with `vmm run` (the `vmm` binary beside this one), waits for the
//! guest's framed report on the console (frame.rs) and returns it. The guest needs no /dev/kvm
//! of its own: every KVM cell there says so; the HMM and soft-dirty rows are the point.

use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::report::Report;
use crate::{frame, render};

#[derive(Debug, Clone)]
pub struct InGuestOpts {
    /// Where `build.sh --lab` puts vmlinux and initramfs.cpio.
    pub lab_dir: PathBuf,
    /// The image build script; None: use what is in `lab_dir` as it is.
    pub build_script: Option<PathBuf>,
    /// The vmm binary.
    pub vmm: PathBuf,
    /// The guest console goes here (kept for a person to read).
    pub console_log: PathBuf,
    /// The whole boot-probe-report run must end within this.
    pub timeout: Duration,
    /// Run the guest's probe with [`crate::ProbeOpts::quick`].
    pub quick: bool,
}

/// The guest's report: its JSON as it came, parsed, rendered here, and timings.
#[derive(Debug, Clone)]
pub struct GuestReport {
    pub json: String,
    pub report: Report,
    pub text: String,
    pub markdown: String,
    /// Seconds from starting `vmm run` to the probe's ready marker / to its DONE line (read
    /// from the console file's growth, so within ~0.2 s).
    pub ready_s: Option<f64>,
    pub boot_to_report_s: f64,
}

fn build(script: &Path) -> Result<(), String> {
    eprintln!("vmm-probe: {} --lab", script.display());
    // The build's progress goes to stderr: stdout carries the report (--json).
    let to_stderr = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("duplicating stderr: {e}"))?;
    let status = Command::new(script)
        .arg("--lab")
        .stdout(Stdio::from(to_stderr))
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !status.success() {
        return Err(format!("{} --lab failed ({status})", script.display()));
    }
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The console of a lab-guest run that ended with the probe's `DONE ok`, and its timings.
#[derive(Debug, Clone)]
pub struct Booted {
    pub console: String,
    /// Seconds from starting `vmm run` to the ready marker / to the end of the run.
    pub ready_s: Option<f64>,
    pub elapsed_s: f64,
}

/// Boots the lab guest and returns its report; Err says why there is none (with the console's
/// last lines).
pub fn run(o: &InGuestOpts) -> Result<GuestReport, String> {
    let quick = [crate::lab_init::QUICK_PARAM];
    let booted = boot(o, if o.quick { &quick[..] } else { &[] })?;
    let mut json =
        frame::section(&booted.console, frame::JSON_BEGIN, frame::JSON_END).ok_or_else(|| {
            format!(
                "no JSON section in the console ({})",
                o.console_log.display()
            )
        })?;
    let mut report: Report = serde_json::from_str(json.trim()).map_err(|e| {
        format!(
            "the guest's JSON does not parse ({e}); console in {}",
            o.console_log.display()
        )
    })?;
    // The guest cannot see its kernel's build inputs; the host can: record them, and re-emit
    // the JSON with them (item 5 of issue 16: a report names the kernel and config it came from).
    if report.host.kernel_config.is_none() {
        report.host.kernel_config = lab_kernel_config(&o.lab_dir);
        if report.host.kernel_config.is_some() {
            json = serde_json::to_string(&report).map_err(|e| e.to_string())?;
        }
    }
    Ok(GuestReport {
        text: render::text(&report),
        markdown: render::markdown(&report),
        json,
        report,
        ready_s: booted.ready_s,
        boot_to_report_s: booted.elapsed_s,
    })
}

/// The lab kernel's cache entry (images.env's VMM_LAB_KERNEL_HASH), the fragments it is built
/// from, and the SHA-256 of the `.config` stored beside its vmlinux.
fn lab_kernel_config(lab_dir: &Path) -> Option<String> {
    let env = std::fs::read_to_string(lab_dir.join("images.env")).ok()?;
    let var = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_string)
    };
    let hash = var("VMM_LAB_KERNEL_HASH")?;
    let vmlinux = PathBuf::from(var("VMM_LAB_KERNEL")?);
    let config = vmlinux.with_file_name("config");
    let sha = crate::sha256_of(&config).map_or_else(
        || "sha256 unavailable".to_string(),
        |h| format!("sha256 {h}"),
    );
    Some(format!(
        "lab-kernel-{hash} (tinyconfig + guest-images/kernel/config-6.1.fragment + \
         config-lab-6.12.fragment); its .config {sha}"
    ))
}

/// Boots the lab guest with only the VFIO self-test (`vmm_probe.vfio_only`: no probe) and
/// returns the run with the self-test's lines (crate::vfio::selftest's format).
pub fn run_vfio_selftest(o: &InGuestOpts) -> Result<(Booted, Vec<String>), String> {
    let booted = boot(o, &[crate::lab_init::VFIO_ONLY_PARAM])?;
    let section = frame::section(
        &booted.console,
        crate::vfio::selftest::BEGIN,
        crate::vfio::selftest::END,
    )
    .ok_or_else(|| {
        format!(
            "no VFIO self-test section in the console ({})",
            o.console_log.display()
        )
    })?;
    let lines = section.lines().map(str::to_string).collect();
    Ok((booted, lines))
}

/// Boots the lab guest with the GPU test device served on `sock` passed in over vfio-user and
/// only its no-IOMMU steps run (crate::vfio::gpu_noiommu): the step lines and the cells.
pub fn run_gpu_noiommu(
    o: &InGuestOpts,
    sock: &std::path::Path,
) -> Result<(Booted, Vec<String>, Vec<crate::report::Cell>), String> {
    use crate::vfio::gpu_noiommu as gpu;
    let device = format!("vfio-user:{}", sock.display());
    let booted = boot_with(
        o,
        &[
            crate::lab_init::GPU_NOIOMMU_PARAM,
            // vfio is built in: its module parameter is set on the command line.
            "vfio.enable_unsafe_noiommu_mode=1",
        ],
        &["--device", &device],
    )?;
    let missing = |what: &str| {
        format!(
            "no {what} section in the console ({})",
            o.console_log.display()
        )
    };
    let lines = frame::section(&booted.console, gpu::BEGIN, gpu::END)
        .ok_or_else(|| missing("GPU no-IOMMU"))?
        .lines()
        .map(str::to_string)
        .collect();
    let json = frame::section(&booted.console, gpu::CELLS_BEGIN, gpu::CELLS_END)
        .ok_or_else(|| missing("GPU no-IOMMU cells"))?;
    let cells = serde_json::from_str(json.trim()).map_err(|e| format!("the cells' JSON: {e}"))?;
    Ok((booted, lines, cells))
}

/// Boots the lab guest with `append` on its command line and waits for the probe's DONE line.
pub fn boot(o: &InGuestOpts, append: &[&str]) -> Result<Booted, String> {
    boot_with(o, append, &[])
}

/// [`boot`] with `extra` arguments to `vmm run` (a `--device`).
pub fn boot_with(o: &InGuestOpts, append: &[&str], extra: &[&str]) -> Result<Booted, String> {
    if let Some(script) = &o.build_script {
        build(script)?;
    }
    let kernel = o.lab_dir.join("vmlinux");
    let initrd = o.lab_dir.join("initramfs.cpio");
    for p in [&kernel, &initrd] {
        if !p.exists() {
            return Err(format!(
                "{} is missing: build the lab guest with `guest-images/build.sh --lab`",
                p.display()
            ));
        }
    }
    if !o.vmm.is_file() {
        return Err(format!(
            "{} is missing: build it with `cargo build -p vmm-cli` (same profile as vmm-probe)",
            o.vmm.display()
        ));
    }
    let _ = std::fs::remove_file(&o.console_log);
    let console = format!("file:{}", o.console_log.display());
    let start = Instant::now();
    let mut cmd = Command::new(&o.vmm);
    cmd.args(["run", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        // 1 vCPU: boot is no faster with 2 here (PLATFORM.md section 3) and the probe is
        // single-threaded apart from its uffd handlers. 256 MiB: test_hmm's device-private
        // pages are backed by ordinary RAM pages.
        .args(["--vcpus", "1", "--mem", "256M", "--console", &console]);
    if !append.is_empty() {
        cmd.args(["--append", &append.join(" ")]);
    }
    cmd.args(extra);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and only makes one
    // async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| {
            // The guest dies with this process (e.g. a test harness killing it).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", o.vmm.display()))?;
    let mut ready_s = None;
    let exit = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| format!("waiting for vmm: {e}"))?
        {
            break Some(status);
        }
        if ready_s.is_none() && read_console(&o.console_log).contains(frame::READY) {
            ready_s = Some(start.elapsed().as_secs_f64());
        }
        if start.elapsed() > o.timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let elapsed = start.elapsed().as_secs_f64();
    let console = read_console(&o.console_log);
    let stderr = child
        .stderr
        .take()
        .map(|mut s| {
            let mut t = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut t);
            t
        })
        .unwrap_or_default();
    let why_not = |what: &str| {
        format!(
            "{what} (vmm {}, {elapsed:.0} s; console in {})\nvmm stderr:\n{}\nconsole tail:\n{}",
            match exit {
                Some(s) => s.to_string(),
                None => format!("killed after the {} s timeout", o.timeout.as_secs()),
            },
            o.console_log.display(),
            tail(&stderr, 10),
            tail(&console, 30)
        )
    };
    match frame::done(&console) {
        Some(s) if s == "ok" => {}
        Some(s) => return Err(why_not(&format!("the probe in the guest failed: {s}"))),
        None => return Err(why_not("the guest never finished its report")),
    }
    Ok(Booted {
        console,
        ready_s,
        elapsed_s: elapsed,
    })
}

fn read_console(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}
