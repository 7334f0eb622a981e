//! The demand-paging backends by the names the CLI, the API, a snapshot's page server and the
//! reports use, and the properties callers used to read off those names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A demand-paging backend (`--demand NAME`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DemandKind {
    /// userfaultfd MISSING on the shared memfd mapping; UFFDIO_COPY installs.
    #[default]
    UffdMissing,
    /// userfaultfd MINOR on the memfd; the page is written to the file, UFFDIO_CONTINUE maps it.
    UffdMinor,
    /// Missing memory left out of every memslot: vCPU accesses exit as MMIO (stock kernels).
    MemslotExits,
    /// KVM_MEM_USERFAULT memslots, where the host kernel has them.
    KvmUserfault,
}

/// A name that is not a demand-paging backend.
#[derive(Debug, thiserror::Error)]
#[error("unknown backend {name:?}; known: {}", backend_names())]
pub struct UnknownDemand {
    pub name: String,
}

impl DemandKind {
    pub const ALL: [DemandKind; 4] = [
        DemandKind::UffdMissing,
        DemandKind::UffdMinor,
        DemandKind::MemslotExits,
        DemandKind::KvmUserfault,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DemandKind::UffdMissing => "uffd-missing",
            DemandKind::UffdMinor => "uffd-minor",
            DemandKind::MemslotExits => "memslot-exits",
            DemandKind::KvmUserfault => "kvm-userfault",
        }
    }

    /// Faults arrive on a userfaultfd, which another process can serve (page server); the
    /// others make vCPU accesses exit to this process's vCPU threads.
    pub const fn is_uffd(self) -> bool {
        matches!(self, DemandKind::UffdMissing | DemandKind::UffdMinor)
    }

    /// Resolving a fault needs the guest-RAM memfd itself (MINOR installs by writing the file).
    pub const fn needs_memfd(self) -> bool {
        matches!(self, DemandKind::UffdMinor)
    }

    /// The descriptors a restore hands a page server, in order, by the names its handshake
    /// announces them with.
    pub const fn handed_fds(self) -> &'static [&'static str] {
        match self {
            DemandKind::UffdMissing => &["uffd"],
            DemandKind::UffdMinor => &["uffd", "memfd"],
            DemandKind::MemslotExits | DemandKind::KvmUserfault => &[],
        }
    }

    /// KVM's own accesses (page-table walks, paravirtual pages) are invisible to the backend:
    /// those pages must be present before the vCPUs run.
    pub const fn misses_kvm_accesses(self) -> bool {
        matches!(self, DemandKind::MemslotExits)
    }

    /// What this host offers for the backend: `Err` says what is missing. Only KVM Userfault
    /// depends on the kernel (checked by trying the memslot flag on a throwaway VM).
    pub fn check_host(self) -> Result<(), super::UserfaultError> {
        match self {
            DemandKind::KvmUserfault => super::kvm_userfault_support(),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for DemandKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DemandKind {
    type Err = UnknownDemand;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DemandKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownDemand { name: s.to_owned() })
    }
}

/// The names of all backends, for messages.
pub fn backend_names() -> String {
    DemandKind::ALL.map(|k| k.name()).join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips_through_parse_display_and_json() {
        for k in DemandKind::ALL {
            assert_eq!(k.name().parse::<DemandKind>().unwrap(), k);
            assert_eq!(k.to_string(), k.name());
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.name()));
            assert_eq!(serde_json::from_str::<DemandKind>(&json).unwrap(), k);
        }
    }

    #[test]
    fn the_wire_names_are_the_ones_users_type() {
        let names: Vec<&str> = DemandKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(
            names,
            [
                "uffd-missing",
                "uffd-minor",
                "memslot-exits",
                "kvm-userfault"
            ]
        );
        assert_eq!(DemandKind::default(), DemandKind::UffdMissing);
    }

    #[test]
    fn unknown_names_are_refused_with_the_known_ones() {
        for bad in ["", "nope", "uffd", "UFFD-MISSING", "uffd-missing "] {
            let e = bad.parse::<DemandKind>().unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("unknown backend"), "{msg}");
            assert!(msg.contains("uffd-minor, memslot-exits"), "{msg}");
        }
        assert!(serde_json::from_str::<DemandKind>("\"nope\"").is_err());
    }

    #[test]
    fn properties_follow_the_mechanism() {
        use DemandKind::*;
        assert!(UffdMissing.is_uffd() && UffdMinor.is_uffd());
        assert!(!MemslotExits.is_uffd() && !KvmUserfault.is_uffd());
        assert!(UffdMinor.needs_memfd());
        assert!(!UffdMissing.needs_memfd() && !MemslotExits.needs_memfd());
        assert_eq!(UffdMissing.handed_fds(), ["uffd"]);
        assert_eq!(UffdMinor.handed_fds(), ["uffd", "memfd"]);
        assert!(MemslotExits.handed_fds().is_empty() && KvmUserfault.handed_fds().is_empty());
        assert!(MemslotExits.misses_kvm_accesses() && !KvmUserfault.misses_kvm_accesses());
        for k in [UffdMissing, UffdMinor, MemslotExits] {
            assert!(k.check_host().is_ok(), "{k}");
        }
    }
}
