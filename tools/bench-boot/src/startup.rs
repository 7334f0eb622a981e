//! `bench-boot --startup`: vmm's set-up time (main entered to first KVM_RUN, the run report's
//! `setup_ms`) for the micro guest and the Linux guest, against a floor measured in the same run.
//!
//! The floor is the shortest program that does what any VMM must before a vCPU runs: open KVM,
//! create a VM, register the same guest RAM (a memfd of the micro guest's size), the TSS and the
//! irqchip, one vCPU, and one KVM_RUN until its first exit (a fresh vCPU faults at the reset
//! vector; what it returns does not matter, its kernel entry is what costs). Set-up time on
//! these hosts swings with the host's load (SRCU grace periods, page allocation), so every round
//! measures floor, micro and Linux back to back and the summary gives medians and the ratio of
//! each median to the floor's.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvm_ioctls::Kvm;
use serde::Serialize;

use crate::median;

/// Guest RAM of the micro and floor runs.
const MICRO_MEM: &str = "64M";
const MICRO_MEM_BYTES: u64 = 64 << 20;

#[derive(Serialize, Default, Clone, Copy)]
pub struct Sample {
    pub floor_ms: f64,
    pub micro_setup_ms: Option<f64>,
    pub micro_rss_beyond_guest_kib: Option<u64>,
    pub linux_setup_ms: Option<f64>,
    pub linux_rss_beyond_guest_kib: Option<u64>,
}

#[derive(Serialize)]
pub struct Summary {
    pub host: &'static str,
    pub runs: u32,
    pub floor_ms_median: Option<f64>,
    pub micro_setup_ms_median: Option<f64>,
    pub linux_setup_ms_median: Option<f64>,
    /// Median over the floor's median: how much vmm adds to what KVM itself costs.
    pub micro_over_floor: Option<f64>,
    pub linux_over_floor: Option<f64>,
    pub micro_rss_beyond_guest_kib_median: Option<f64>,
    pub linux_rss_beyond_guest_kib_median: Option<f64>,
    pub samples: Vec<Sample>,
}

/// The floor: milliseconds from opening /dev/kvm to the first KVM_RUN's return.
pub fn kvm_floor_ms() -> Result<f64> {
    let t0 = Instant::now();
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    // Declared before the VM: dropped after it, so RAM outlives the memslot that names it.
    let ram = vmm::memory::GuestRam::new(MICRO_MEM_BYTES).context("guest RAM")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MICRO_MEM_BYTES,
        userspace_addr: ram.host_addrs()[0],
    };
    // SAFETY: the address maps MICRO_MEM_BYTES of `ram`, which is dropped after `vm`.
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
    vm.set_tss_address(0xfffb_d000)
        .context("KVM_SET_TSS_ADDR")?;
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
    let mut vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    // Whichever exit ends the first entry (a fresh vCPU faults at its reset vector), only the
    // time counts; a refused KVM_RUN would be no entry at all.
    vcpu.run().context("the first KVM_RUN")?;
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

fn report_of(stdout: &[u8]) -> serde_json::Value {
    String::from_utf8_lossy(stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_default()
}

/// One micro guest run of a single pass: `(setup_ms, rss_beyond_guest_kib)`.
fn micro(vmm: &Path) -> Result<(Option<f64>, Option<u64>)> {
    let out = Command::new(vmm)
        .args(["run", "--micro", "--passes", "1", "--region-mib", "4"])
        .args(["--mem", MICRO_MEM, "--console", "none", "--json"])
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running {}", vmm.display()))?;
    if !out.status.success() {
        bail!("vmm run --micro failed: {}", out.status);
    }
    let r = report_of(&out.stdout);
    Ok((r["setup_ms"].as_f64(), r["rss_beyond_guest_kib"].as_u64()))
}

/// One Linux guest start, ended by SIGTERM once its API socket exists (the socket is served
/// after the set-up; the report is printed on SIGTERM only when an API socket is served).
fn linux(
    vmm: &Path,
    kernel: &str,
    initrd: &str,
    dir: &Path,
    limit: Duration,
) -> Result<(Option<f64>, Option<u64>)> {
    let sock = dir.join("api.sock");
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(vmm)
        .args(["run", "--kernel", kernel, "--initrd", initrd])
        .args([
            "--mem",
            "128M",
            "--console",
            "none",
            "--json",
            "--log-level",
            "warn",
        ])
        .arg("--api-socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawning {}", vmm.display()))?;
    let started = Instant::now();
    while !sock.exists() && started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(5));
    }
    // The socket is served just before the vCPUs start: give the first KVM_RUN time to
    // happen (a run ended before it has no set-up time, and is refused below).
    std::thread::sleep(Duration::from_millis(200));
    let pid = child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status();
    let out = child.wait_with_output().context("waiting for vmm")?;
    if !matches!(killed, Ok(s) if s.success()) {
        bail!("could not send SIGTERM to vmm {pid}");
    }
    let r = report_of(&out.stdout);
    if r["setup_ms"].as_f64().is_none() {
        bail!("the Linux guest's run report has no setup_ms (no vCPU ran before SIGTERM?)");
    }
    Ok((r["setup_ms"].as_f64(), r["rss_beyond_guest_kib"].as_u64()))
}

/// A private directory for the API socket (vmm refuses a socket in a directory others can
/// write, such as /tmp itself).
fn socket_dir() -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!("bench-boot-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

pub fn run(
    vmm: &Path,
    kernel: &str,
    initrd: &str,
    runs: u32,
    limit: Duration,
    host: &'static str,
) -> Result<Summary> {
    let dir = socket_dir()?;
    let mut samples = Vec::new();
    let result = (1..=runs).try_for_each(|run| {
        let floor_ms = kvm_floor_ms()?;
        let (micro_setup_ms, micro_rss_beyond_guest_kib) = micro(vmm)?;
        let (linux_setup_ms, linux_rss_beyond_guest_kib) = linux(vmm, kernel, initrd, &dir, limit)?;
        let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.1}"));
        eprintln!(
            "[{run}/{runs}] floor {floor_ms:.1} ms, micro {} ms, linux {} ms",
            f(micro_setup_ms),
            f(linux_setup_ms)
        );
        samples.push(Sample {
            floor_ms,
            micro_setup_ms,
            micro_rss_beyond_guest_kib,
            linux_setup_ms,
            linux_rss_beyond_guest_kib,
        });
        Ok::<(), anyhow::Error>(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let m = |f: fn(&Sample) -> Option<f64>| median(samples.iter().filter_map(f).collect());
    let floor = m(|s| Some(s.floor_ms));
    let micro = m(|s| s.micro_setup_ms);
    let linux = m(|s| s.linux_setup_ms);
    let over = |v: Option<f64>| v.zip(floor).map(|(v, f)| v / f);
    Ok(Summary {
        host,
        runs,
        floor_ms_median: floor,
        micro_setup_ms_median: micro,
        linux_setup_ms_median: linux,
        micro_over_floor: over(micro),
        linux_over_floor: over(linux),
        micro_rss_beyond_guest_kib_median: m(|s| s.micro_rss_beyond_guest_kib.map(|v| v as f64)),
        linux_rss_beyond_guest_kib_median: m(|s| s.linux_rss_beyond_guest_kib.map(|v| v as f64)),
        samples,
    })
}

pub fn print(s: &Summary) {
    let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.1}"));
    let r = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.2}x"));
    println!(
        "start-up (main entered to first KVM_RUN), host {}, medians of {} runs",
        s.host, s.runs
    );
    println!(
        "  KVM floor   : {:>6} ms (open, VM, RAM slot, TSS, irqchip, vCPU, first KVM_RUN)",
        f(s.floor_ms_median)
    );
    println!(
        "  vmm micro   : {:>6} ms = {} the floor, RSS beyond guest RAM {} KiB",
        f(s.micro_setup_ms_median),
        r(s.micro_over_floor),
        f(s.micro_rss_beyond_guest_kib_median)
    );
    println!(
        "  vmm linux   : {:>6} ms = {} the floor, RSS beyond guest RAM {} KiB",
        f(s.linux_setup_ms_median),
        r(s.linux_over_floor),
        f(s.linux_rss_beyond_guest_kib_median)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor really enters the guest: every step succeeds and KVM_RUN returns an exit (an
    /// error here is a broken floor, not a slow host).
    #[test]
    fn the_floor_runs_a_vcpu() {
        let ms = kvm_floor_ms().unwrap();
        assert!(ms > 0.0, "{ms}");
    }

    #[test]
    fn the_report_is_the_last_json_line() {
        let out = b"log line\n{\"setup_ms\": 1.5}\ntrailing text\n";
        assert_eq!(report_of(out)["setup_ms"].as_f64(), Some(1.5));
        assert!(report_of(b"no json").is_null());
    }
}
