//! The micro guest's port window: pass notifications and its exit status. This is how the VMM
//! learns, exactly and without polling, where the workload is.
//!
//! With several vCPUs each value carries the writer's vCPU index in its top byte
//! (`guest_abi::micro::port_value`): the pass count the VMM reports is the number of passes
//! every vCPU has completed, and each vCPU's exit stops that vCPU (the machine ends once all
//! have exited with status 0, or at once on any other status).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::bus::{BusDevice, VcpuAction};
use devices::{DeviceStateError, Stateful};
use guest_abi::{micro, ports};

/// Offsets inside the window starting at `ports::MICRO_PASS`.
const PASS_OFFSET: u64 = 0;
const EXIT_OFFSET: u64 = (ports::MICRO_EXIT - ports::MICRO_PASS) as u64;

/// Called in the vCPU thread with each pass number vCPU 0 completes, while it waits on its
/// `out`: with one vCPU, the exact point between two passes (dirty tracking harvests here).
pub type PassHook = Box<dyn FnMut(u64) + Send>;

/// Pass numbers arrive modulo 2^24 (`micro::PORT_VALUE_BITS`).
const PASS_MODULUS: u64 = 1 << micro::PORT_VALUE_BITS;

/// Counts completed passes; an `out` to the exit port stops the vCPU with the guest's status.
pub struct MicroPort {
    /// Passes completed by every vCPU (shared with the control API and migration).
    passes: Arc<AtomicU64>,
    /// Per vCPU: passes completed, once it has reported one.
    vcpu_passes: Vec<Option<u64>>,
    on_pass: Option<PassHook>,
}

/// What moves with the VM: the pass count every vCPU had reached. Per-vCPU counts are not
/// saved; each vCPU's first report after a restore unwraps relative to this floor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MicroPortState {
    pub passes: u64,
}

impl Stateful for MicroPort {
    fn kind(&self) -> &'static str {
        "micro-port"
    }

    fn state_version(&self) -> u32 {
        1
    }

    fn save(&self) -> Result<serde_json::Value, DeviceStateError> {
        devices::state::to_data(&MicroPortState {
            passes: self.passes.load(Ordering::Acquire),
        })
    }

    fn restore(&mut self, data: &serde_json::Value) -> Result<(), DeviceStateError> {
        let state: MicroPortState = devices::state::from_data(data)?;
        self.passes.store(state.passes, Ordering::Release);
        Ok(())
    }
}

impl Default for MicroPort {
    fn default() -> Self {
        MicroPort::new(Arc::new(AtomicU64::new(0)))
    }
}

impl MicroPort {
    /// A port for one vCPU.
    pub fn new(passes: Arc<AtomicU64>) -> Self {
        MicroPort {
            passes,
            vcpu_passes: vec![None],
            on_pass: None,
        }
    }

    /// For a guest with `vcpus` vCPUs (at least 1).
    pub fn with_vcpus(mut self, vcpus: u8) -> Self {
        self.vcpu_passes = vec![None; usize::from(vcpus.max(1))];
        self
    }

    pub fn with_hook(mut self, hook: Option<PassHook>) -> Self {
        self.on_pass = hook;
        self
    }

    /// Records that `vcpu` completed the pass numbered `low` modulo 2^24; returns its full
    /// pass count, or None for a vCPU index the guest does not have.
    fn record_pass(&mut self, vcpu: u64, low: u64) -> Option<u64> {
        let floor = self.passes.load(Ordering::Acquire);
        let slot = self.vcpu_passes.get_mut(usize::try_from(vcpu).ok()?)?;
        // Unwrap relative to what is known: this vCPU's count, or (first report, e.g. after a
        // migration restored the shared count) the count every vCPU had reached.
        let prev = slot.unwrap_or(floor);
        let delta = low.wrapping_sub(prev) % PASS_MODULUS;
        let full = prev + delta;
        *slot = Some(full);
        let all = self
            .vcpu_passes
            .iter()
            .map(|p| p.unwrap_or(floor))
            .min()
            .unwrap_or(floor);
        self.passes.fetch_max(all, Ordering::AcqRel);
        if all > floor {
            // Debug: a fast guest finishes thousands of passes a second (150 MB of log in two
            // minutes at info); the run's report carries the count.
            tracing::debug!("micro guest: pass {all} done");
        }
        Some(full)
    }
}

fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl BusDevice for MicroPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        match offset {
            PASS_OFFSET => {
                let (vcpu, low) = micro::split_port_value(le_value(data) as u32);
                let Some(pass) = self.record_pass(vcpu, low) else {
                    tracing::warn!("micro guest: pass report from unknown vCPU {vcpu}; ignored");
                    return VcpuAction::Continue;
                };
                if self.vcpu_passes.len() > 1 {
                    tracing::debug!("micro guest: vCPU {vcpu} finished pass {pass}");
                }
                if vcpu == 0 {
                    if let Some(hook) = self.on_pass.as_mut() {
                        hook(pass);
                    }
                }
                VcpuAction::Continue
            }
            EXIT_OFFSET => {
                let (vcpu, status) = micro::split_port_value(le_value(data) as u32);
                if self.vcpu_passes.len() > 1 {
                    tracing::info!("micro guest: vCPU {vcpu} finished with status {status}");
                } else {
                    tracing::info!("micro guest: finished with status {status}");
                }
                // A status is below 2^24, so it fits.
                VcpuAction::Exit(i32::try_from(status).unwrap_or(i32::MAX))
            }
            other => {
                tracing::debug!("micro guest: write to unused port offset {other}");
                VcpuAction::Continue
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_sees_each_pass() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut p = MicroPort::new(Arc::new(AtomicU64::new(0)))
            .with_hook(Some(Box::new(move |pass| s.lock().unwrap().push(pass))));
        p.write(0, &1u32.to_le_bytes());
        p.write(0, &2u32.to_le_bytes());
        p.write(EXIT_OFFSET, &0u32.to_le_bytes());
        assert_eq!(*seen.lock().unwrap(), vec![1, 2]);
    }

    #[test]
    fn passes_count_when_every_vcpu_completed_them() {
        let passes = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut p = MicroPort::new(passes.clone())
            .with_vcpus(3)
            .with_hook(Some(Box::new(move |pass| s.lock().unwrap().push(pass))));
        let out = |p: &mut MicroPort, vcpu, pass| {
            p.write(0, &micro::port_value(vcpu, pass).to_le_bytes())
        };
        out(&mut p, 1, 1);
        out(&mut p, 1, 2);
        out(&mut p, 0, 1);
        assert_eq!(passes.load(Ordering::Acquire), 0);
        out(&mut p, 2, 1);
        assert_eq!(passes.load(Ordering::Acquire), 1);
        out(&mut p, 0, 2);
        out(&mut p, 2, 2);
        assert_eq!(passes.load(Ordering::Acquire), 2);
        // Only vCPU 0's passes reach the hook; an unknown vCPU is ignored.
        assert_eq!(*seen.lock().unwrap(), vec![1, 2]);
        assert_eq!(out(&mut p, 5, 9), VcpuAction::Continue);
        assert_eq!(passes.load(Ordering::Acquire), 2);
        // Each vCPU's exit carries its own status.
        let exit = |p: &mut MicroPort, vcpu, status| {
            p.write(EXIT_OFFSET, &micro::port_value(vcpu, status).to_le_bytes())
        };
        assert_eq!(exit(&mut p, 2, 0), VcpuAction::Exit(0));
        assert_eq!(exit(&mut p, 1, 4), VcpuAction::Exit(4));
    }

    #[test]
    fn pass_numbers_unwrap_past_24_bits() {
        let passes = Arc::new(AtomicU64::new(0));
        let mut p = MicroPort::new(passes.clone());
        let wrap = 1u64 << 24;
        for pass in [wrap - 1, wrap, wrap + 1] {
            p.write(0, &micro::port_value(0, pass).to_le_bytes());
            assert_eq!(passes.load(Ordering::Acquire), pass);
        }
        // After a restore, the count carries on from the shared value.
        let restored = Arc::new(AtomicU64::new(3 * wrap + 5));
        let mut p = MicroPort::new(restored.clone()).with_vcpus(2);
        p.write(0, &micro::port_value(0, 3 * wrap + 6).to_le_bytes());
        p.write(0, &micro::port_value(1, 3 * wrap + 6).to_le_bytes());
        assert_eq!(restored.load(Ordering::Acquire), 3 * wrap + 6);
    }

    #[test]
    fn passes_and_exit() {
        let passes = Arc::new(AtomicU64::new(0));
        let mut p = MicroPort::new(passes.clone());
        assert_eq!(p.write(0, &3u32.to_le_bytes()), VcpuAction::Continue);
        assert_eq!(passes.load(Ordering::Acquire), 3);
        assert_eq!(
            p.write(EXIT_OFFSET, &0u32.to_le_bytes()),
            VcpuAction::Exit(0)
        );
        assert_eq!(
            p.write(EXIT_OFFSET, &7u32.to_le_bytes()),
            VcpuAction::Exit(7)
        );
    }

    #[test]
    fn the_pass_count_moves_and_the_next_report_continues_from_it() {
        let src_passes = Arc::new(AtomicU64::new(0));
        let mut src = MicroPort::new(src_passes.clone());
        for pass in 1..=5u32 {
            src.write(0, &pass.to_le_bytes());
        }
        let json = serde_json::to_string(&src.save().unwrap()).unwrap();

        let passes = Arc::new(AtomicU64::new(0));
        let mut dst = MicroPort::new(passes.clone());
        dst.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(passes.load(Ordering::Acquire), 5);
        dst.write(0, &6u32.to_le_bytes());
        assert_eq!(passes.load(Ordering::Acquire), 6);
        assert!(dst.restore(&serde_json::json!({"passes": -1})).is_err());
    }
}
