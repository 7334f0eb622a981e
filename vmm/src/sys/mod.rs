//! Raw kernel interfaces the rust-vmm crates lack: KVM manual dirty-log protection and the dirty
//! ring (`kvm_dirty`), userfaultfd features past 5.13 (`uffd`) and `/proc/self/pagemap` with
//! `PAGEMAP_SCAN` (`pagemap`). TRACKING.md lists what each interface can and cannot see.

pub mod kvm_dirty;
pub mod kvm_userfault;
pub mod pagemap;
pub mod uffd;

#[cfg(test)]
mod testutil;

/// The one error type of the raw layer: either the kernel refused (with its errno), or the
/// arguments were rejected before asking it.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("{op} failed: {source}")]
    Os {
        op: &'static str,
        source: std::io::Error,
    },
    /// What is wrong with the arguments or the kernel's answer, described: a message, not a
    /// flattened error.
    #[error("{0}")]
    Invalid(String),
}

impl SysError {
    /// The kernel's errno, so callers can tell "unsupported" (EINVAL, ENXIO...) from real failures.
    pub fn errno(&self) -> Option<i32> {
        match self {
            SysError::Os { source, .. } => source.raw_os_error(),
            SysError::Invalid(_) => None,
        }
    }

    /// Captures errno right after a failed call; nothing may run in between.
    pub(crate) fn last_os(op: &'static str) -> SysError {
        SysError::Os {
            op,
            source: std::io::Error::last_os_error(),
        }
    }

    pub(crate) fn os(op: &'static str, source: std::io::Error) -> SysError {
        SysError::Os { op, source }
    }
}

/// The host page size. Every offset into the dirty ring, pagemap and uffd ranges is in these units.
pub fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    // sysconf cannot fail for _SC_PAGESIZE on Linux; 4 KiB is the only size on x86_64 anyway.
    usize::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_exposed_only_for_os_errors() {
        let os = SysError::os("X", std::io::Error::from_raw_os_error(libc::ENXIO));
        assert_eq!(os.errno(), Some(libc::ENXIO));
        assert!(os.to_string().starts_with("X failed: "), "{os}");
        assert_eq!(SysError::Invalid("bad".into()).errno(), None);
        assert_eq!(page_size(), 4096);
    }
}
