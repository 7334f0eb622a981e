//! One measured migration, whichever tool made it.

use serde::Serialize;

/// `vmm+gpu`: vmm with the test device (tools/gpu-test-device) passed through over vfio-user, its
/// page writer DMAing into guest RAM while the memory workload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
pub enum Tool {
    #[serde(rename = "qemu")]
    Qemu,
    #[serde(rename = "vmm")]
    Vmm,
    #[serde(rename = "vmm+gpu")]
    #[value(name = "vmm+gpu")]
    VmmGpu,
    /// vmm over TLS with a pre-shared key (`--tls-psk`); `vmm` runs plain TCP (`--insecure`), so
    /// the two measure what TLS costs.
    #[serde(rename = "vmm+tls")]
    #[value(name = "vmm+tls")]
    VmmTls,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Tool::Qemu => "qemu",
            Tool::Vmm => "vmm",
            Tool::VmmGpu => "vmm+gpu",
            Tool::VmmTls => "vmm+tls",
        }
    }
    /// Runs vmm (with or without the device).
    pub fn is_vmm(self) -> bool {
        self != Tool::Qemu
    }
    /// Why this tool cannot migrate in `mode`, if it cannot.
    pub fn refuses(self, mode: Mode) -> Option<&'static str> {
        (self == Tool::VmmGpu && mode == Mode::Postcopy).then_some(
            "vmm refuses postcopy with a passed-through device (all guest RAM is pinned for its \
             DMA, yet pages not yet sent would be missing on the destination)",
        )
    }
}

/// precopy: rounds until the rest fits the downtime target. postcopy: switch over at once and
/// fetch pages on demand. hybrid: one precopy round, then postcopy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Precopy,
    Postcopy,
    Hybrid,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Hybrid => "hybrid",
        }
    }
    pub fn uses_postcopy(self) -> bool {
        self != Mode::Precopy
    }
}

/// Postcopy page-fault latency as vmm reports it (us).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FaultLatency {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

/// What vmm's report says about the passed-through devices (`report.devices`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeviceStats {
    pub devices: u64,
    /// Device migration data sent during precopy rounds (PRE_COPY) and in the downtime.
    pub precopy_bytes: u64,
    pub stop_copy_bytes: u64,
    /// `--device-dirty`: how device DMA was tracked.
    pub dirty: String,
    /// Pages the device's DMA log reported over the migration, and what reading it cost.
    pub dma_pages: u64,
    pub dma_harvests: u64,
    pub dma_harvest_ms_per_round: f64,
}

/// vmm's precopy downtime, piece by piece (ms), as its source saw it (`report.downtime_parts`;
/// absent for hybrid, whose source reports none).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct DowntimeParts {
    pub pause_ms: f64,
    pub device_stop_ms: f64,
    pub harvest_ms: f64,
    pub capture_ms: f64,
    pub final_pages_ms: f64,
    pub device_data_ms: f64,
    pub state_ms: f64,
    pub confirm_ms: f64,
    /// The destination's part of `confirm_ms` (0 when it sent no Stats).
    pub destination_restore_ms: f64,
}

impl DowntimeParts {
    /// (name, value) in the order they happen; `confirm` split into the destination's restore
    /// and the rest (the link, the Resumed message), so the parts add up to the downtime.
    pub fn named(&self) -> [(&'static str, f64); 9] {
        let restore = self.destination_restore_ms.min(self.confirm_ms);
        [
            ("pause", self.pause_ms),
            ("device stop", self.device_stop_ms),
            ("last harvest", self.harvest_ms),
            ("state capture", self.capture_ms),
            ("final pages", self.final_pages_ms),
            ("device data", self.device_data_ms),
            ("state sent", self.state_ms),
            ("destination restore", restore),
            ("link and resume", self.confirm_ms - restore),
        ]
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub tool: Tool,
    pub mode: Mode,
    pub run: usize,
    /// Migration completed and the destination's agent verified its workload memory.
    pub ok: bool,
    /// The tool's final migration status ("completed", "failed", ...), or "error".
    pub status: String,
    pub error: Option<String>,
    /// Source spawn to the agent's first workload pass.
    pub boot_ms: Option<f64>,
    /// Total migration time as the tool reports it.
    pub total_ms: Option<f64>,
    /// Guest paused: source stop to destination running. vmm: as it reports it. QEMU: its STOP
    /// event on the source to its RESUME event on the destination (QMP timestamps, one clock),
    /// since QEMU 7.2's own postcopy downtime is broken (it reports the host's uptime).
    pub downtime_ms: Option<f64>,
    /// Downtime exactly as the tool itself reports it (QEMU: query-migrate `downtime`).
    pub tool_downtime_ms: Option<f64>,
    /// Migrate command to completion, timed by this bench the same way for both tools.
    pub wall_ms: Option<f64>,
    /// Bytes the tool says it sent (QEMU: ram.transferred).
    pub bytes: Option<u64>,
    /// Precopy dirty-sync rounds (QEMU: ram.dirty-sync-count).
    pub rounds: Option<u64>,
    pub pages_per_round: Option<Vec<u64>>,
    /// Whether the migration actually ran in postcopy (a fast precopy may finish first).
    pub postcopy_entered: Option<bool>,
    /// Pages the destination requested (vmm: faults; QEMU: ram.postcopy-requests).
    pub postcopy_faults: Option<u64>,
    /// vmm only: per-fault latency.
    pub fault_latency_us: Option<FaultLatency>,
    /// QEMU only (postcopy-blocktime capability): total time vCPUs waited on faults.
    pub blocktime_ms: Option<f64>,
    /// The destination agent's `workload-verify` line.
    pub verify: Option<String>,
    /// vmm only: where the precopy downtime went.
    pub downtime_parts: Option<DowntimeParts>,
    /// vmm+gpu only: the device's share of the migration.
    pub device: Option<DeviceStats>,
    /// vmm+gpu only: the destination agent's answer to stopping the page writer, which checks
    /// every stamp it wrote (a run counts only if this and `verify` both say ok=true).
    pub device_verify: Option<String>,
    /// vmm only: how the link was secured, as its report says ("tcp-insecure", "tls-psk").
    pub transport: Option<String>,
}

impl Sample {
    /// Records the destination agent's `workload-verify` answer (both tools end a run with it).
    pub fn record_verify(&mut self, line: &str) {
        self.ok = crate::guest::verify_ok(line);
        self.verify = crate::guest::agent_result(line).map(str::to_string);
        if !self.ok {
            self.error = Some(format!("destination memory check failed: {line}"));
        }
    }

    /// Records the destination agent's answer to `vfio-workload,BDF,stop` (after
    /// [`Sample::record_verify`]): the run stays ok only if the page writer's stamps all check.
    pub fn record_device_verify(&mut self, line: &str) {
        let ok = crate::guest::verify_ok(line);
        self.device_verify = crate::guest::agent_result(line).map(str::to_string);
        if !ok {
            self.ok = false;
            let why = format!("the device's page writer check failed: {line}");
            self.error = Some(match self.error.take() {
                Some(before) => format!("{before}; {why}"),
                None => why,
            });
        }
    }

    pub fn new(tool: Tool, mode: Mode, run: usize) -> Self {
        Sample {
            tool,
            mode,
            run,
            ok: false,
            status: "error".into(),
            error: None,
            boot_ms: None,
            total_ms: None,
            downtime_ms: None,
            tool_downtime_ms: None,
            wall_ms: None,
            bytes: None,
            rounds: None,
            pages_per_round: None,
            postcopy_entered: None,
            postcopy_faults: None,
            fault_latency_us: None,
            blocktime_ms: None,
            verify: None,
            downtime_parts: None,
            device: None,
            device_verify: None,
            transport: None,
        }
    }

    /// Migration throughput: bytes over the tool's total time (MiB/s).
    pub fn throughput_mib_s(&self) -> Option<f64> {
        match (self.bytes, self.total_ms) {
            (Some(b), Some(t)) if t > 0.0 => Some(b as f64 / (1 << 20) as f64 / (t / 1000.0)),
            _ => None,
        }
    }

    /// QEMU: mean vCPU wait per requested page (blocktime / requests), the nearest thing QEMU 7.2
    /// reports to a fault latency. vmm: its p50.
    pub fn fault_p50_us(&self) -> Option<f64> {
        match self.tool {
            Tool::Vmm | Tool::VmmGpu | Tool::VmmTls => {
                self.fault_latency_us.as_ref().and_then(|l| l.p50)
            }
            Tool::Qemu => match (self.blocktime_ms, self.postcopy_faults) {
                (Some(b), Some(n)) if n > 0 => Some(b * 1000.0 / n as f64),
                _ => None,
            },
        }
    }
}
