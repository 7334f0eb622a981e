//! Snapshots: `vmm snapshot` (through the control API) writes the complete VM state and guest
//! RAM to a directory; `vmm restore` brings it back, either eagerly (all of RAM copied in before
//! the vCPUs run) or lazily (`--lazy --demand NAME`: the vCPUs run at once and each page comes
//! in from the snapshot file on first touch, through a `DemandPager` backend). Lazy restore is
//! the demand-paging test bed that needs no second host.

pub mod device_files;
pub mod files;
pub mod lazy;
pub mod page_proto;
pub mod page_server;
pub mod restore;
pub mod take;

use crate::machine::assemble::AssembleError;

// Messages include their source's text (the API answers with `to_string()`) and name it as
// `source()` too; `vmm`'s error printer skips a cause whose text is already shown.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Why the VM cannot be snapshotted now: a message (the machine's own state).
    #[error("cannot snapshot now: {0}")]
    Busy(String),
    #[error("cannot snapshot now: {0}")]
    Pause(#[source] crate::vstate::pause::PauseError),
    #[error(transparent)]
    State(#[from] crate::machine::saved_state::SnapshotError),
    #[error(transparent)]
    Files(#[from] files::SnapshotFileError),
    #[error(transparent)]
    Devices(#[from] device_files::DeviceFileError),
    #[error("building the VM: {0}")]
    Machine(#[source] crate::machine::MachineError),
    /// `--dump-final` could not be written (the run itself ended as reported); the machine's
    /// message.
    #[error("{0}")]
    FinalDump(String),
    /// Why this snapshot does not fit here: a description, not a chain.
    #[error("this snapshot cannot be restored here: {0}")]
    Refused(String),
    #[error(transparent)]
    Demand(#[from] crate::userfault::UserfaultError),
    #[error(transparent)]
    PageServer(#[from] page_server::PageServerError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

// Written out rather than a variant of its own: the messages stay those of restore's steps.
impl From<AssembleError> for SnapshotError {
    fn from(e: AssembleError) -> Self {
        match e {
            AssembleError::Refused { reason } | AssembleError::Config { reason } => {
                SnapshotError::Refused(reason)
            }
            AssembleError::Build(e) | AssembleError::Run(e) => SnapshotError::Machine(e),
            AssembleError::Restore(e) => SnapshotError::State(e),
            AssembleError::FinalDump { reason } => SnapshotError::FinalDump(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembly_errors_read_as_the_restores_own() {
        for e in [
            AssembleError::Refused { reason: "x".into() },
            AssembleError::Config { reason: "x".into() },
        ] {
            let e = SnapshotError::from(e);
            assert!(matches!(e, SnapshotError::Refused(_)));
            assert_eq!(e.to_string(), "this snapshot cannot be restored here: x");
        }
        let e = SnapshotError::from(AssembleError::FinalDump {
            reason: "--dump-final: y".into(),
        });
        assert_eq!(e.to_string(), "--dump-final: y");
    }
}
