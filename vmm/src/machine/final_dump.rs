//! `--dump-final PATH`: guest RAM when the run ends, read through the VMM's own mapping (as the
//! guest sees it, not from any installer's buffer), after whoever pages memory in (lazy
//! restore, postcopy) has brought in every page the run never touched. The byte-for-byte
//! checks of lazy restore and postcopy compare this with a run that was never restored or
//! migrated.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::build::Machine;

/// Brings in every page still missing before the dump; Err says why it could not. The dump's
/// outcome is a message for the run's report (`AssembleError::FinalDump`, vmm's exit), which the
/// migration and snapshot sides take as text: a typed error here would change their enums too.
pub type Fill = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// How the dump went, read after the run.
pub struct FinalDump {
    path: PathBuf,
    outcome: Arc<Mutex<Option<Result<(), String>>>>,
}

impl FinalDump {
    /// Dumps guest RAM into `path` once `machine`'s vCPUs have stopped, `fill` first.
    pub fn arm(machine: &mut Machine, path: PathBuf, fill: Fill) -> FinalDump {
        let outcome = Arc::new(Mutex::new(None));
        let ranges = machine.ram.ranges().to_vec();
        let (to, out) = (path.clone(), outcome.clone());
        machine.on_ended = Some(Box::new(move |mem| {
            let r = fill().and_then(|()| {
                crate::memory::ram_file::dump_mapped(mem, &ranges, &to)
                    .map_err(|e| format!("writing {}: {e}", to.display()))
            });
            *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        }));
        FinalDump { path, outcome }
    }

    /// `arm` for a run whose memory is all there already, or whose missing pages a read through
    /// the mapping brings in (an out-of-process userfaultfd pager).
    pub fn arm_whole(machine: &mut Machine, path: PathBuf) -> FinalDump {
        Self::arm(machine, path, Box::new(|| Ok(())))
    }

    /// Ok once the dump is written; the reason otherwise (also when the run ended before it).
    pub fn result(&self) -> Result<(), String> {
        let taken = self
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match taken {
            Some(Ok(())) => {
                tracing::info!(
                    "guest RAM at the end of the run written to {}",
                    self.path.display()
                );
                Ok(())
            }
            Some(Err(e)) => Err(format!("--dump-final: {e}")),
            None => Err(format!(
                "--dump-final: the run ended before {} could be written",
                self.path.display()
            )),
        }
    }
}
