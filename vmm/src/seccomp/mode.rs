//! What a filter does with a syscall that is not on its thread's list (`--seccomp`).

use seccompiler::SeccompAction;

/// `--seccomp off|log|kill`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// No filter is installed.
    Off,
    /// The syscall proceeds and the kernel logs it (dmesg / audit, type=1326, `comm=` the
    /// thread's name): how the lists are built and checked.
    Log,
    /// The syscall never runs: SIGSYS, whose handler names the syscall and the thread on
    /// stderr and ends the process with [`super::EXIT_BAD_SYSCALL`].
    #[default]
    Kill,
}

impl SeccompMode {
    pub fn name(self) -> &'static str {
        match self {
            SeccompMode::Off => "off",
            SeccompMode::Log => "log",
            SeccompMode::Kill => "kill",
        }
    }

    /// The action for a syscall off the list; None: no filter at all.
    pub(super) fn mismatch_action(self) -> Option<SeccompAction> {
        match self {
            SeccompMode::Off => None,
            SeccompMode::Log => Some(SeccompAction::Log),
            // Trap rather than KillProcess: the handler says which syscall in which thread,
            // where KillProcess would leave only a core-less death by SIGSYS.
            SeccompMode::Kill => Some(SeccompAction::Trap),
        }
    }
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
