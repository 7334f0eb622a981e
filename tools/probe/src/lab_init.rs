//! `vmm-probe --lab-init`: the probe as PID 1 of the lab guest (guest-images/lab/init execs it
//! after mounting /proc, /sys, /dev and /tmp). It runs every probe (the HMM life cycle on
//! /dev/hmm_dmirror0 included), prints the report framed for the host (frame.rs) on the console,
//! and reboots the machine (first, the kernel-VFIO self-test against mtty, vfio/selftest.rs): with `reboot=k` on the command line that is the keyboard-controller
//! reset vmm treats as a clean exit. PID 1 must never exit, so every path ends in the reboot.
//! With `vmm_probe.gpu_noiommu` it runs only the GPU test device's no-IOMMU steps and cells
//! (vfio/gpu_noiommu.rs; the host passes the device in) and reboots.

use std::io::Write;
use std::path::PathBuf;

use crate::frame;
use crate::{run, ProbeOpts};

/// The kernel command-line word that selects [`ProbeOpts::quick`] in the guest.
pub const QUICK_PARAM: &str = "vmm_probe.quick";
/// The kernel command-line word that runs only the VFIO self-test (crate::vfio::selftest), not
/// the probe: its test then needs no probe run (minutes on a PVM host).
pub const VFIO_ONLY_PARAM: &str = "vmm_probe.vfio_only";
/// The kernel command-line word that runs only the GPU test device's no-IOMMU steps and cells
/// (crate::vfio::gpu_noiommu; the host passes the device in over vfio-user), then reboots.
pub const GPU_NOIOMMU_PARAM: &str = "vmm_probe.gpu_noiommu";

fn cmdline_has(word: &str) -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|w| w == word))
        .unwrap_or(false)
}

fn emit(out: &mut impl Write, begin: &str, body: &str, end: &str) {
    let _ = writeln!(out, "{begin}");
    let _ = out.write_all(body.as_bytes());
    if !body.ends_with('\n') {
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "{end}");
    let _ = out.flush();
}

fn report(out: &mut impl Write) -> Result<(), String> {
    let opts = ProbeOpts {
        // The initramfs has /var/tmp on its rootfs (tmpfs); there is no disk in the lab guest.
        file_dir: PathBuf::from("/var/tmp"),
        // `vmm probe --in-guest --quick` appends this to the kernel command line.
        quick: cmdline_has(QUICK_PARAM),
        // The lab guest's VFIO devices are the kernel's sample mdevs, which the probe creates
        // itself; their framebuffer BARs are RAM the probe may write (no device registers).
        sample_mdevs: true,
        bar_writes: true,
        ..ProbeOpts::default()
    };
    let r = run(&opts).map_err(|e| e.to_string())?;
    // Compact JSON: every console byte crosses an emulated UART on PVM hosts.
    let json = serde_json::to_string(&r).map_err(|e| e.to_string())?;
    // Only the JSON: the host renders text and Markdown from it (the UART is slow, ~0.5 KB/s
    // measured with a loaded PVM host).
    emit(out, frame::JSON_BEGIN, &json, frame::JSON_END);
    Ok(())
}

/// Never returns: runs, reports, reboots (or, outside PID 1, exits with the status).
pub fn run_as_init() -> ! {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let _ = writeln!(out, "{}", frame::READY);
    let _ = out.flush();
    // The kernel-VFIO self-test first (seconds), where the kernel has mdev: its lines are
    // framed apart from the report, and its refusals are its findings, not the probe's failure.
    let gpu_only = cmdline_has(GPU_NOIOMMU_PARAM);
    if gpu_only {
        crate::vfio::gpu_noiommu::emit(std::path::Path::new("/sys"), &mut out);
    }
    let vfio_only = cmdline_has(VFIO_ONLY_PARAM) || gpu_only;
    if !gpu_only && (vfio_only || std::path::Path::new("/sys/class/mdev_bus").exists()) {
        crate::vfio::selftest::run(std::path::Path::new("/sys"), &mut out);
    }
    crate::PROGRESS.store(true, std::sync::atomic::Ordering::Relaxed);
    let status = if vfio_only { Ok(()) } else { report(&mut out) };
    match &status {
        Ok(()) => {
            let _ = writeln!(out, "{} ok", frame::DONE);
        }
        Err(e) => {
            let _ = writeln!(out, "{} error: {e}", frame::DONE);
        }
    }
    let _ = out.flush();
    drop(out);
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } == 1 {
        // SAFETY: sync and reboot(2) with a valid command; on success reboot does not return.
        unsafe {
            libc::sync();
            libc::reboot(libc::RB_AUTOBOOT);
        }
        eprintln!(
            "vmm-probe: reboot failed: {}",
            std::io::Error::last_os_error()
        );
        // Init must not exit (the kernel would panic); idle until vmm's timeout ends the VM.
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    std::process::exit(if status.is_ok() { 0 } else { 1 })
}
