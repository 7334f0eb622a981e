//! What kind of KVM this host offers. PVM (software nested virtualization, see PLATFORM.md) and
//! hardware KVM differ in cost by orders of magnitude; every figure vmm prints says which it was.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostKind {
    /// kvm_pvm: guest ring 0 is emulated, shadow paging.
    Pvm,
    /// VMX/SVM hardware virtualization.
    Hardware,
}

impl HostKind {
    pub fn detect() -> Self {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            HostKind::Pvm
        } else {
            HostKind::Hardware
        }
    }
}

impl std::fmt::Display for HostKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostKind::Pvm => write!(f, "PVM (software nested virtualization)"),
            HostKind::Hardware => write!(f, "hardware KVM"),
        }
    }
}
