//! Where a migration stands (for `status` while it runs) and what it measured (its report):
//! plain data the machine holds (`Shared::progress`, `RunReport::migration`) so that the API,
//! the run report and the micro guest's `finish` can read it; `migration` writes it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Precopy,
    Postcopy,
    Hybrid,
}

// `Err = String`: a message about the user's `--mode` text (no error underneath); it also serves
// clap and the API's `ApiError::Mode`.
impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "precopy" => Ok(Mode::Precopy),
            "postcopy" => Ok(Mode::Postcopy),
            "hybrid" => Ok(Mode::Hybrid),
            other => Err(format!(
                "unknown migration mode '{other}' (precopy, postcopy, hybrid)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    #[default]
    None,
    Connecting,
    Precopy,
    StopAndCopy,
    Postcopy,
    Completed,
    Failed,
    /// Destination: the guest runs here while postcopy still brings pages in.
    Incoming,
}

/// Live figures, updated by the migration threads.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    pub phase: Phase,
    pub round: u32,
    pub bytes: u64,
    /// Guest RAM in bytes (what a first round moves at most).
    pub ram_bytes: u64,
    /// Pages still to send (dirty set of the last harvest, or pending postcopy pages).
    pub remaining_pages: u64,
    /// The last finished migration (or the one that just failed).
    pub report: Option<MigrationReport>,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (sorted here).
    pub fn of(samples: &mut [f64]) -> Option<Percentiles> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let i = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i]
        };
        Some(Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: samples[samples.len() - 1],
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct PostcopyStats {
    /// Guest (or VMM) accesses that found a page missing.
    pub faults: u64,
    /// Pages the destination asked for on the urgent channel.
    pub requested_pages: u64,
    /// Fault to page installed, microseconds.
    pub latency_us: Option<Percentiles>,
    /// Pages that arrived through the background push.
    pub pushed_pages: u64,
    /// Time from resume on the destination until it held every page.
    pub fill_ms: f64,
}

/// Final metrics of one migration, printed by `vmm remote migrate` and in `--json` reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationReport {
    pub role: String,
    pub ok: bool,
    pub mode: Option<Mode>,
    pub tracker: Option<String>,
    /// How the link was secured: "tls-x509", "tls-psk" or "tcp-insecure" (`--insecure`).
    pub transport: Option<String>,
    /// Data connections that carried the precopy pages (None: the main connection did).
    pub channels: Option<u32>,
    pub total_ms: f64,
    /// Source: from pausing the guest until the destination said it runs. Destination: from
    /// receiving the state until its vCPUs ran.
    pub downtime_ms: f64,
    pub bytes: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub rounds: u32,
    pub pages_per_round: Vec<u64>,
    /// Payload throughput over the whole migration, MiB/s.
    pub throughput_mib_s: f64,
    /// Why the precopy rounds ended: converged, round limit, time limit.
    pub switchover: Option<String>,
    pub postcopy: Option<PostcopyStats>,
    /// Postcopy to a destination that asked for it: pages that could be page tables, sent
    /// while the guest was paused, and the time the scan and send took (part of the downtime).
    pub presend_pages: Option<u64>,
    pub presend_ms: Option<f64>,
    /// What the destination measured (sent back after it confirmed it runs).
    pub destination: Option<DestinationStats>,
    /// Precopy: where the downtime went, as the source saw it (the destination's own restore
    /// time is `destination.restore_ms`).
    pub downtime_parts: Option<DowntimeParts>,
    /// Passed-through devices: what their state and their DMA cost.
    pub devices: Option<DeviceMigrationStats>,
    pub error: Option<String>,
}

/// The source's downtime, piece by piece (ms), in the order they happen.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct DowntimeParts {
    /// Until every vCPU was out of the guest.
    pub pause_ms: f64,
    /// The last harvest of the dirty tracker (after the devices stopped).
    #[serde(default)]
    pub harvest_ms: f64,
    /// vCPU, VM and device state read (KVM_GET_*), before anything of it is sent.
    #[serde(default)]
    pub capture_ms: f64,
    /// Devices to STOP_COPY, and reading their stop-copy data (with `device_data_ms`).
    pub device_stop_ms: f64,
    /// The last harvest's dirty pages sent.
    pub final_pages_ms: f64,
    /// The devices' stop-copy data sent.
    pub device_data_ms: f64,
    /// vCPU and device state captured and sent (capture is in `pause_ms`... see README).
    pub state_ms: f64,
    /// From `Complete` until the destination said its vCPUs run (its restore and resume).
    pub confirm_ms: f64,
    /// The destination's part of `confirm_ms`: the State frame's arrival to its vCPUs running
    /// (its own clock, from its Stats; absent if it sent none). The rest of `confirm_ms` is the
    /// link and the Resumed message.
    #[serde(default)]
    pub destination_restore_ms: Option<f64>,
}

/// Passed-through devices in a migration.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct DeviceMigrationStats {
    pub devices: usize,
    /// Device migration data sent during precopy rounds (PRE_COPY) and in the downtime.
    pub precopy_bytes: u64,
    pub stop_copy_bytes: u64,
    /// How device DMA was tracked (`--device-dirty`).
    pub dirty: String,
    /// Pages the devices' DMA logs reported over the migration, and what reading them cost.
    pub dma_pages: u64,
    pub dma_harvests: u64,
    pub dma_harvest_ms_per_round: f64,
}

/// The destination's side of a migration.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct DestinationStats {
    /// From the State frame's arrival until the vCPUs ran.
    pub restore_ms: f64,
    pub postcopy: Option<PostcopyStats>,
    /// Passed-through devices: the destination's part of `restore_ms` spent checking their
    /// state (RESUMING -> STOP) and starting them (STOP -> RUNNING; after postcopy in hybrid,
    /// outside the downtime).
    #[serde(default)]
    pub device_load_ms: Option<f64>,
    #[serde(default)]
    pub device_run_ms: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&mut v).unwrap();
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        assert!(Percentiles::of(&mut []).is_none());
        let p = Percentiles::of(&mut [7.0]).unwrap();
        assert_eq!(p.p99, 7.0);
    }
}
