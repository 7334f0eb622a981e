//! The micro guest's port window: pass notifications and its exit status. This is how the VMM
//! learns, exactly and without polling, where the workload is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::bus::{BusDevice, VcpuAction};
use guest_abi::ports;

/// Offsets inside the window starting at `ports::MICRO_PASS`.
const PASS_OFFSET: u64 = 0;
const EXIT_OFFSET: u64 = (ports::MICRO_EXIT - ports::MICRO_PASS) as u64;

/// Called in the vCPU thread with each completed pass number, while the guest waits on its
/// `out`: the exact point between two passes (dirty tracking harvests here).
pub type PassHook = Box<dyn FnMut(u64) + Send>;

/// Counts completed passes; an `out` to the exit port ends the VM with the guest's status.
#[derive(Default)]
pub struct MicroPort {
    passes: Arc<AtomicU64>,
    on_pass: Option<PassHook>,
}

impl MicroPort {
    pub fn new(passes: Arc<AtomicU64>) -> Self {
        MicroPort {
            passes,
            on_pass: None,
        }
    }

    pub fn with_hook(mut self, hook: Option<PassHook>) -> Self {
        self.on_pass = hook;
        self
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
                let pass = le_value(data);
                self.passes.store(pass, Ordering::Release);
                tracing::info!("micro guest: pass {pass} done");
                if let Some(hook) = self.on_pass.as_mut() {
                    hook(pass);
                }
                VcpuAction::Continue
            }
            EXIT_OFFSET => {
                let status = le_value(data) as u32;
                tracing::info!("micro guest: finished with status {status}");
                VcpuAction::Exit(status as i32)
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
}
