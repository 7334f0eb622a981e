//! The syscalls each thread kind may make (x86-64 numbers, from libc).
//!
//! First written from what each thread does, then completed from evidence: the integration
//! suite run with `--seccomp log` and the kernel's type=1326 lines read back (`comm=` the
//! thread, `syscall=` the number), then the whole suite under `kill`. Whatever is not listed
//! here traps. To extend a list: run the failing case with `--seccomp log`, read `dmesg`.
//!
//! A thread's children inherit its filter (filters stack; a syscall must pass all of them), so
//! a kind that starts threads allows what those threads do too: [`ThreadKind::spawns`].

use super::ThreadKind;

macro_rules! sys {
    ($($name:ident),* $(,)?) => { &[$(libc::$name),*] };
}

/// Every thread: the Rust runtime and allocator, locks, logging to stderr, the vCPU kick
/// signal's return, a panic's abort, the end of a thread and of the process. `tgkill` (kicks,
/// abort, glibc's setxid) only within this process: an argument rule added in `compile`.
const COMMON: &[i64] = sys!(
    SYS_read,
    SYS_write,
    SYS_readv,
    SYS_writev,
    SYS_close,
    SYS_futex,
    SYS_mmap,
    SYS_munmap,
    SYS_mprotect,
    SYS_madvise,
    // Migration sends of a frozen guest look which pages are in memory (migration::pages).
    SYS_mincore,
    SYS_mremap,
    SYS_brk,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sigaltstack,
    SYS_sched_yield,
    SYS_nanosleep,
    SYS_clock_nanosleep,
    SYS_clock_gettime,
    SYS_gettid,
    SYS_getpid,
    SYS_tgkill,
    SYS_getrandom,
    SYS_sched_getaffinity,
    SYS_restart_syscall,
    SYS_exit,
    SYS_exit_group,
);

/// What a new thread does before its own filter goes in, under its parent's: glibc's thread
/// start (robust futex list, rseq, the name), Rust's guard page and signal stack, then the
/// install itself (no_new_privs, seccomp).
const SPAWN: &[i64] = sys!(
    SYS_clone,
    SYS_clone3,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_prctl,
    SYS_seccomp,
);

/// Files: opened by path (the snapshot's, a dump's, /proc/self/pagemap), read, written,
/// flushed, renamed into place.
const FILES: &[i64] = sys!(
    SYS_openat,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_lseek,
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_fsync,
    SYS_fdatasync,
    SYS_ftruncate,
    SYS_fallocate,
    SYS_fcntl,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_rename,
    SYS_renameat2,
    SYS_unlink,
    SYS_unlinkat,
    // A kernel-VFIO device's sysfs stand-in directory (devices/src/vfio/standin.rs) goes when
    // the device is dropped, at the end of the run.
    SYS_rmdir,
    SYS_getdents64,
    SYS_fchmod,
    SYS_readlink,
    SYS_getcwd,
);

/// vCPU threads: KVM_RUN and the exits they handle in place: port and MMIO devices (virtio-blk
/// reads and writes its image; a vfio-user device is a Unix socket message; VFIO regions are
/// pread/pwrite), eventfds, and the demand-paging exit backends (memslot changes are ioctls on
/// the VM fd; a page is read from the snapshot or requested from the page server). No socket,
/// connect or exec: a vCPU talks only over what was opened for it.
const VCPU: &[i64] = sys!(
    SYS_ioctl,
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_fsync,
    SYS_fdatasync,
    SYS_fallocate,
    SYS_lseek,
    SYS_fstat,
    SYS_fcntl,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_sendto,
    SYS_recvfrom,
    SYS_setsockopt,
    SYS_shutdown,
    SYS_poll,
    SYS_ppoll,
    SYS_userfaultfd,
    SYS_openat,
);

/// The control API: the accept thread and its connection threads, which run what a request
/// asks (pause and resume, snapshot into a directory, live migration to a TCP peer with its
/// dirty tracking, postcopy threads and micro guest check).
const API: &[i64] = sys!(
    SYS_accept4,
    SYS_accept,
    SYS_getsockopt,
    SYS_setsockopt,
    SYS_getsockname,
    SYS_getpeername,
    SYS_socket,
    SYS_connect,
    SYS_shutdown,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_sendto,
    SYS_recvfrom,
    SYS_poll,
    SYS_ppoll,
    SYS_ioctl,
    SYS_userfaultfd,
    SYS_memfd_create,
    SYS_eventfd2,
);

/// Migration threads (postcopy on either side, data connections on either side): the TCP
/// streams, the userfaultfd or exit backend installing pages (ioctls; /dev/userfaultfd is
/// opened), guest memory through its memfd (zero ranges punch holes in it: fallocate).
const MIGRATION: &[i64] = sys!(
    SYS_fallocate,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_sendto,
    SYS_recvfrom,
    SYS_shutdown,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_poll,
    SYS_ppoll,
    SYS_ioctl,
    SYS_pread64,
    SYS_pwrite64,
    SYS_lseek,
    SYS_fstat,
    SYS_fcntl,
    SYS_openat,
);

/// Demand paging (lazy restore in process, and the `vmm page-server` process): faults read off
/// the userfaultfd, pages read from the snapshot and installed (ioctls), a Unix socket to
/// accept the restore's connection and take its userfaultfd (SCM_RIGHTS). In the page-server
/// process the main thread too, once it serves (it removes its socket at the end).
const PAGE_SERVER: &[i64] = sys!(
    SYS_ioctl,
    SYS_poll,
    SYS_ppoll,
    SYS_pread64,
    SYS_preadv,
    SYS_pwrite64,
    SYS_fstat,
    SYS_fcntl,
    SYS_lseek,
    SYS_accept4,
    SYS_accept,
    SYS_getsockopt,
    SYS_setsockopt,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_sendto,
    SYS_recvfrom,
    SYS_shutdown,
    SYS_fallocate,
    SYS_unlink,
    SYS_unlinkat,
);

/// Dirty tracking threads (harvester, ring reaper, uffd-wp handler): dirty-log and ring
/// ioctls, write-protect faults, /proc/self/pagemap and clear_refs, kicking vCPUs (tgkill).
const TRACKING: &[i64] = sys!(
    SYS_ioctl,
    SYS_poll,
    SYS_ppoll,
    SYS_openat,
    SYS_pread64,
    SYS_pwrite64,
    SYS_lseek,
    SYS_fstat,
    SYS_fcntl,
);

/// The micro guest's reference model: computation only.
const MICRO_MODEL: &[i64] = &[];

/// The main thread from its event loop on: console output and stdin (terminal modes), the
/// exit eventfd, stopping and joining the other threads, removing the API socket, writing the
/// final dump and the report.
const MAIN: &[i64] = sys!(
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_ctl,
    SYS_epoll_create1,
    SYS_ioctl,
    SYS_poll,
    SYS_ppoll,
    SYS_rt_sigaction,
    SYS_userfaultfd,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_sendto,
    SYS_recvfrom,
    SYS_shutdown,
    SYS_setsockopt,
);

/// Privilege drop (`--user`): glibc has every thread make these three calls.
pub(super) const SETXID: &[i64] = sys!(SYS_setgroups, SYS_setgid, SYS_setuid);

/// A kind's own syscalls (before [`ThreadKind::spawns`] adds its children's).
pub(super) fn own(kind: ThreadKind) -> Vec<i64> {
    let lists: &[&[i64]] = match kind {
        // A tracking schedule starts the next backend's thread on the vCPU (`spawns`).
        ThreadKind::Vcpu => &[VCPU, SPAWN],
        ThreadKind::Api => &[API, FILES, SPAWN],
        ThreadKind::Migration => &[MIGRATION],
        ThreadKind::PageServer => &[PAGE_SERVER, SPAWN],
        ThreadKind::Tracking => &[TRACKING],
        ThreadKind::MicroModel => &[MICRO_MODEL],
        // Every thread of the run is started before the main thread's filter goes in.
        ThreadKind::Main => &[MAIN, FILES],
    };
    let mut all: Vec<i64> = COMMON.to_vec();
    for l in lists {
        all.extend_from_slice(l);
    }
    all
}
