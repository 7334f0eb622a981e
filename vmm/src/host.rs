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

/// Raises this process's soft limit on open files to its hard limit, as QEMU and Cloud
/// Hypervisor do: each passed-through MSI-X vector holds a few eventfds (the route's, the one
/// handed to the device, a clone for the irqfd), so a device with hundreds of vectors would
/// otherwise run out at the usual soft limit of 1024. Returns the limit now in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one `rlimit`; raising the soft limit to the hard one needs
        // no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod fd_limit_tests {
    #[test]
    fn the_soft_fd_limit_is_raised_to_the_hard_one() {
        let now = super::raise_fd_limit().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in raise_fd_limit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!((lim.rlim_cur, now), (lim.rlim_max, lim.rlim_max));
    }
}
