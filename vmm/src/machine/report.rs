//! How a run ended, and the figures measured on the way. Printed as text or JSON (`--json`).

use serde::Serialize;

use crate::host::HostKind;
use crate::vstate::vcpu::VcpuStop;

/// How the guest ended. Exit codes are part of the CLI contract (README).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Outcome {
    /// The guest reset itself (reboot, or the agent's poweroff; see README): exit code 0.
    Reset,
    /// The guest powered off through KVM: exit code 0.
    Poweroff,
    /// The micro guest finished with this status: 0 -> exit code 0, else 5.
    MicroExit { status: i32 },
    /// The guest kernel panicked (seen on the console) and then reset: exit code 3.
    KernelPanic { line: String },
    /// The guest did something that cannot go on (emulation failure, triple fault, ...): 4.
    Fault { message: String },
    /// The user quit from the console (Ctrl-A x): exit code 0.
    Stopped,
    /// The guest was migrated to another host and runs there: exit code 0.
    Migrated,
    /// A snapshot was taken with `exit`: the guest lives on in the snapshot: exit code 0.
    Snapshotted,
    /// SIGTERM or SIGINT ended a run that served an API socket (`machine::terminate`): exit
    /// code 128 + the signal, as a shell reports a process a signal ended.
    Terminated { signal: i32 },
}

pub const EXIT_KERNEL_PANIC: i32 = 3;
pub const EXIT_GUEST_FAULT: i32 = 4;
pub const EXIT_MICRO_FAILED: i32 = 5;

impl Outcome {
    pub fn from_stop(stop: VcpuStop, kernel_panic: Option<String>) -> Self {
        match (stop, kernel_panic) {
            (VcpuStop::Fault(message), _) => Outcome::Fault { message },
            (_, Some(line)) => Outcome::KernelPanic { line },
            (VcpuStop::Reset, None) => Outcome::Reset,
            (VcpuStop::Poweroff, None) => Outcome::Poweroff,
            (VcpuStop::DeviceExit(status), None) => Outcome::MicroExit { status },
            (VcpuStop::Stopped, None) => Outcome::Stopped,
            (VcpuStop::Migrated, None) => Outcome::Migrated,
            (VcpuStop::Snapshotted, None) => Outcome::Snapshotted,
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Reset
            | Outcome::Poweroff
            | Outcome::Stopped
            | Outcome::Migrated
            | Outcome::Snapshotted => 0,
            Outcome::MicroExit { status: 0 } => 0,
            Outcome::MicroExit { .. } => EXIT_MICRO_FAILED,
            Outcome::KernelPanic { .. } => EXIT_KERNEL_PANIC,
            Outcome::Fault { .. } => EXIT_GUEST_FAULT,
            Outcome::Terminated { signal } => 128 + signal,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Outcome::Reset => "guest reset (reboot/poweroff request)".into(),
            Outcome::Poweroff => "guest powered off".into(),
            Outcome::MicroExit { status } => format!("micro guest exited with status {status}"),
            Outcome::KernelPanic { line } => format!("guest kernel panicked: {line}"),
            Outcome::Fault { message } => format!("guest fault: {message}"),
            Outcome::Stopped => "stopped from the console".into(),
            Outcome::Migrated => "guest migrated away; it runs on the destination now".into(),
            Outcome::Snapshotted => "snapshot taken; the guest lives on in it".into(),
            Outcome::Terminated { signal } => format!(
                "ended by {} (the run stopped cleanly)",
                super::terminate::name(*signal)
            ),
        }
    }
}

/// Everything a run measured. Times are milliseconds since vmm's process start.
/// One step of the set-up and when it ended (`RunReport::setup_parts_ms`).
#[derive(Debug, Clone, Serialize)]
pub struct SetupPart {
    pub step: &'static str,
    pub at_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub host: HostKind,
    pub outcome: Outcome,
    pub exit_code: i32,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// Process start to the first KVM_RUN of vCPU 0.
    pub setup_ms: Option<f64>,
    /// When each set-up step ended, from process start (a fresh boot; restores and incoming
    /// migrations list the steps they share with it).
    pub setup_parts_ms: Vec<SetupPart>,
    /// Process start to the guest's boot-timer write.
    pub boot_timer_ms: Option<f64>,
    /// Process start to the agent's ready marker on the console.
    pub agent_ready_ms: Option<f64>,
    pub micro_passes: Option<u64>,
    /// With --verify: the micro guest's region compared with its reference model.
    pub micro_check: Option<crate::micro_check::CheckResult>,
    /// Resident memory of the vmm process other than guest RAM (RSS minus shared memory), KiB.
    pub rss_beyond_guest_kib: Option<u64>,
    pub wall_ms: f64,
    /// With --track: the harvest rounds and their cost.
    pub tracking: Option<super::TrackingReport>,
    /// The last migration this VM took part in (as source or destination).
    pub migration: Option<crate::machine::progress::MigrationReport>,
    /// Each `--device`: what attaching it cost (absent without one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub passthrough: Vec<PassthroughReport>,
}

/// One passed-through device's DMA-mapping of guest RAM (vfio-user DMA_MAP messages, or the
/// kernel's VFIO_IOMMU_MAP_DMA / IOMMU_IOAS_MAP, which pin the pages).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PassthroughReport {
    /// The `--device` spec.
    pub device: String,
    /// `vfio-user` or `vfio` (kernel).
    pub transport: &'static str,
    pub dma_mapped_bytes: u64,
    pub dma_map_ms: f64,
    /// `dma_map_ms` scaled to one GiB of guest RAM.
    pub dma_map_ms_per_gib: f64,
}

impl PassthroughReport {
    pub fn new(device: String, transport: &'static str, bytes: u64, elapsed_ms: f64) -> Self {
        let gib = bytes as f64 / (1u64 << 30) as f64;
        PassthroughReport {
            device,
            transport,
            dma_mapped_bytes: bytes,
            dma_map_ms: elapsed_ms,
            dma_map_ms_per_gib: if gib > 0.0 { elapsed_ms / gib } else { 0.0 },
        }
    }
}

/// VmRSS - RssShmem from /proc/self/status: guest RAM is the only shared memory vmm maps.
pub fn rss_beyond_shmem_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some(field("VmRSS:")?.saturating_sub(field("RssShmem:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_map_time_scales_to_a_gib() {
        let r = PassthroughReport::new("vfio-user:/s".into(), "vfio-user", 256 << 20, 0.5);
        assert_eq!(r.dma_map_ms_per_gib, 2.0);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["dma_mapped_bytes"], 256u64 << 20);
        assert_eq!(json["transport"], "vfio-user");
        assert_eq!(
            PassthroughReport::new(String::new(), "vfio", 0, 1.0).dma_map_ms_per_gib,
            0.0
        );
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Outcome::from_stop(VcpuStop::Reset, None).exit_code(), 0);
        assert_eq!(
            Outcome::from_stop(VcpuStop::Reset, Some("Kernel panic".into())).exit_code(),
            EXIT_KERNEL_PANIC
        );
        assert_eq!(
            Outcome::from_stop(VcpuStop::DeviceExit(2), None).exit_code(),
            EXIT_MICRO_FAILED
        );
        assert_eq!(
            Outcome::from_stop(VcpuStop::Fault("x".into()), None).exit_code(),
            EXIT_GUEST_FAULT
        );
        assert!(rss_beyond_shmem_kib().is_some());
    }
}
