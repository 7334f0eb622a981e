//! Taking a snapshot of a running VM (the API's `snapshot` request): pause every vCPU with its
//! state saved, write the state and guest RAM, then resume the guest, or end this VM's run when
//! asked to (the snapshot then is the only copy).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::device_files::SnapshotDevices;
use super::files;
use super::SnapshotError;
use crate::machine::saved_state::VmSnapshot;
use crate::machine::shared::Shared;
use crate::output::OutputDir;
use crate::vstate::pause::Owner;
use crate::vstate::vcpu::VcpuStop;

const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize)]
pub struct Taken {
    pub dir: String,
    /// Bytes of device state saved (all devices' files).
    pub device_bytes: u64,
    pub data_pages: u64,
    pub mem_mib: u64,
    /// Time the guest was paused for the snapshot.
    pub paused_ms: f64,
    pub micro_passes: u64,
}

/// Takes a snapshot into `dir`. With `exit`, the VM's run ends afterwards (outcome
/// `snapshotted`); otherwise the guest resumes, or stays paused if it was paused through the
/// API before (as Firecracker's pause, snapshot, resume). On failure the guest is left as it
/// was and nothing is left half-written under `vm.json`.
pub fn take(shared: &Shared, dir: &Path, exit: bool) -> Result<Taken, SnapshotError> {
    // Asked before the pause: a device that cannot save its state refuses the snapshot with
    // the guest untouched and nothing written.
    let mut devices = SnapshotDevices::check(&shared.passthrough)?;
    let owner = match shared.pause.owner() {
        None => Owner::Migration,
        Some(Owner::Api) => Owner::Api,
        Some(other) => {
            return Err(SnapshotError::Busy(format!(
                "the VM is paused by {other}; try again once that is over"
            )))
        }
    };
    shared.memory_complete().map_err(SnapshotError::Busy)?;
    let t0 = Instant::now();
    let vcpus = match owner {
        Owner::Api => shared.pause.states_while_paused(Owner::Api, PAUSE_TIMEOUT),
        _ => shared
            .pause
            .pause(&shared.kicker, Owner::Migration, true, PAUSE_TIMEOUT),
    }
    .map_err(SnapshotError::Pause)?;
    // Made here, after the pause, when the first file is written; discarded on failure so the
    // same path can be used again (an existing directory is refused).
    let mut out_dir = None;
    let written = (|| -> Result<files::Manifest, SnapshotError> {
        // The devices stop before guest RAM is read: their DMA into it ends here.
        devices.stop()?;
        let state = VmSnapshot::capture(shared, vcpus).map_err(SnapshotError::State)?;
        let out = out_dir.insert(OutputDir::create(dir).map_err(files::SnapshotFileError::from)?);
        let device_files = devices.save(out)?;
        files::write(
            out,
            files::Contents {
                vm: &shared.describe(),
                state: &state,
                host: &shared.vm.host_kind().to_string(),
                devices: device_files,
            },
            &shared.memfd,
            &shared.ranges,
        )
        .map_err(SnapshotError::Files)
    })();
    let paused_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let manifest = match written {
        Ok(m) => m,
        Err(e) => {
            if let Some(out) = out_dir {
                out.discard();
            }
            // Devices first: the guest must not run against a stopped device.
            devices.recover();
            if owner == Owner::Migration {
                let _ = shared.pause.resume(Owner::Migration);
            }
            return Err(e);
        }
    };
    let taken = Taken {
        dir: dir.display().to_string(),
        device_bytes: manifest.devices.iter().map(|d| d.len).sum(),
        data_pages: manifest.data_pages,
        mem_mib: manifest.vm.mem_bytes >> 20,
        paused_ms,
        // Still inside the pause: the count the micro port saved.
        micro_passes: shared.micro_passes(),
    };
    tracing::info!(
        "snapshot written to {} ({} data pages, guest paused {:.1} ms)",
        taken.dir,
        taken.data_pages,
        paused_ms
    );
    // A device runs again whenever the VM goes on (even paused through the API, as it ran
    // before); with `exit` its state now lives only in the files, and it stays stopped.
    devices.finish(!exit);
    if !exit && owner == Owner::Migration {
        shared
            .pause
            .resume(Owner::Migration)
            .map_err(SnapshotError::Pause)?;
    }
    Ok(taken)
}

/// Ends the VM's run after a snapshot taken with `exit` (the caller has its answer already).
pub fn end_after(shared: &Shared) {
    shared.end_run(VcpuStop::Snapshotted);
}
