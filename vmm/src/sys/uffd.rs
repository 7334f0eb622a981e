//! userfaultfd creation with the features the `userfaultfd` crate does not know (WP_ASYNC,
//! WP_UNPOPULATED, POISON, MOVE...). The resulting fd is handed to `userfaultfd::Uffd` for
//! register/write-protect/read_event, which need no new features.

use std::fs::OpenOptions;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};

use super::SysError;

/// Private so the generated ioctl-number functions do not become public API.
mod nr {
    vmm_sys_util::ioctl_io_nr!(USERFAULTFD_IOC_NEW, 0xAA, 0x00);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_API, 0xAA, 0x3F, super::UffdioApi);
}

/// struct uffdio_api from linux/userfaultfd.h.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

const UFFD_API: u64 = 0xAA;

// UFFD_FEATURE_* from include/uapi/linux/userfaultfd.h (6.18).
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const FEATURE_SIGBUS: u64 = 1 << 7;
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
pub const FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
/// Report-only: WP registration works on shmem and hugetlbfs.
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Write-protecting a never-touched anonymous page takes effect (a PTE marker is installed).
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const FEATURE_POISON: u64 = 1 << 14;
/// WP faults are resolved by the kernel without a message; PAGEMAP_SCAN reports what was written.
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;
pub const FEATURE_MOVE: u64 = 1 << 16;

const FEATURES: [(u64, &str); 17] = [
    (FEATURE_PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
    (FEATURE_EVENT_FORK, "EVENT_FORK"),
    (FEATURE_EVENT_REMAP, "EVENT_REMAP"),
    (FEATURE_EVENT_REMOVE, "EVENT_REMOVE"),
    (FEATURE_MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
    (FEATURE_MISSING_SHMEM, "MISSING_SHMEM"),
    (FEATURE_EVENT_UNMAP, "EVENT_UNMAP"),
    (FEATURE_SIGBUS, "SIGBUS"),
    (FEATURE_THREAD_ID, "THREAD_ID"),
    (FEATURE_MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
    (FEATURE_MINOR_SHMEM, "MINOR_SHMEM"),
    (FEATURE_EXACT_ADDRESS, "EXACT_ADDRESS"),
    (FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
    (FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED"),
    (FEATURE_POISON, "POISON"),
    (FEATURE_WP_ASYNC, "WP_ASYNC"),
    (FEATURE_MOVE, "MOVE"),
];

/// Names of the known features in `mask`, lowest bit first; bits newer than this table are
/// summarised as one "UNKNOWN" so a report never silently drops them.
pub fn feature_names(mask: u64) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = FEATURES
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|&(_, name)| name)
        .collect();
    let known = FEATURES.iter().fold(0, |acc, (bit, _)| acc | bit);
    if mask & !known != 0 {
        names.push("UNKNOWN");
    }
    names
}

/// A new userfaultfd (O_CLOEXEC | O_NONBLOCK), not yet API-negotiated. Faults from kernel mode
/// are caught too (no UFFD_USER_MODE_ONLY): KVM touches guest memory through get_user_pages.
pub fn open() -> Result<OwnedFd, SysError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let dev = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")
    {
        Ok(dev) => dev,
        // No device node (or no access to it): the syscall may still be allowed.
        Err(_) => return open_syscall(flags),
    };
    // SAFETY: `dev` is /dev/userfaultfd, whose only ioctl takes the new fd's flags by value.
    let fd = unsafe { ioctl_with_val(&dev, nr::USERFAULTFD_IOC_NEW(), flags as libc::c_ulong) };
    if fd < 0 {
        return Err(SysError::last_os("USERFAULTFD_IOC_NEW"));
    }
    // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_syscall(flags: libc::c_int) -> Result<OwnedFd, SysError> {
    // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(SysError::last_os("userfaultfd(2)"));
    }
    let fd = i32::try_from(fd)
        .map_err(|_| SysError::Invalid(format!("userfaultfd(2) returned {fd}")))?;
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// UFFDIO_API, enabling `features`; returns every feature the kernel offers. Allowed once per
/// fd. A requested feature the kernel lacks gives EINVAL (op "UFFDIO_API").
pub fn api(fd: &OwnedFd, features: u64) -> Result<u64, SysError> {
    let mut req = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes exactly one struct uffdio_api, which `req` is.
    let rc = unsafe { ioctl_with_mut_ref(fd, nr::UFFDIO_API(), &mut req) };
    if rc < 0 {
        return Err(SysError::last_os("UFFDIO_API"));
    }
    Ok(req.features)
}

/// The features this kernel offers, asked on a throwaway fd (the API handshake is one-shot).
pub fn available_features() -> Result<u64, SysError> {
    api(&open()?, 0)
}

/// A non-blocking `Uffd` with `features` enabled.
pub fn uffd_with_features(features: u64) -> Result<userfaultfd::Uffd, SysError> {
    let fd = open()?;
    api(&fd, features)?;
    // SAFETY: ownership of the descriptor moves into the Uffd, which closes it on drop.
    Ok(unsafe { userfaultfd::Uffd::from_raw_fd(fd.into_raw_fd()) })
}

#[cfg(test)]
mod tests;
