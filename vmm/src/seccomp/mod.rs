//! The sandbox: a seccomp filter per thread, and an optional drop of root (`--user`).
//!
//! As in Firecracker, each thread installs its own filter (on itself only, no TSYNC) once its
//! setup is done: the fds it needs are open and guest memory is mapped, so what is left is the
//! steady work of its kind. The filters are compiled once, when the command line is read
//! ([`init`]); library users that never call [`init`] (the benches, unit tests) run unfiltered.
//!
//! # Modes (`--seccomp`)
//! - `kill` (default): a syscall off the thread's list does not run; the SIGSYS handler writes
//!   `vmm: seccomp: thread 'NAME' made syscall NR, ...` on stderr and the process exits with
//!   [`EXIT_BAD_SYSCALL`] (159, 128 + SIGSYS). `ausyscall NR` names the syscall.
//! - `log`: the syscall runs; the kernel logs it (dmesg or audit, type=1326, `comm=` the
//!   thread's name, `syscall=` the number). How the lists were made and how to extend them.
//! - `off`: nothing is installed.
//!
//! # Thread kinds and what each may do ([`rules`] has the lists)
//! Every thread may use memory, locks, time, stderr, signals to its own process's threads (the
//! vCPU kick), and exit.
//! - `Vcpu` (`vcpuN`): KVM ioctls and the exits handled in place (device emulation: the disk
//!   image, vfio-user messages on an open socket, VFIO region reads and writes; demand paging
//!   exits, whose page-server client connects on first need; a tracking schedule switch may
//!   start the next backend, so also its files and threads). Unix sockets only (an argument
//!   rule on `socket`); no bind, listen or exec.
//! - `Api` (`api`, `api-conn`): the control API. A connection runs the request it reads:
//!   snapshot (files in a new directory), live migration (TCP socket and connect, dirty
//!   tracking, the postcopy threads). The broadest list, and the one facing a local client.
//! - `Migration` (`postcopy-*`, `migrate-data*`, both sides): the migration streams, page
//!   installs, and the data connections' page reads (source) and stores (destination).
//! - `PageServer` (`lazy-restore`, `lazy-prefetch`, `page-server-*`): demand paging, in the
//!   restoring vmm or the `vmm page-server` process (whose main thread too, once it serves):
//!   fault reads, snapshot reads, installs, the server's Unix socket.
//! - `Tracking` (`dirty-harvester`, `dirty-ring-reaper`, `uffd-wp`): harvesting dirty pages.
//! - `MicroModel` (`micro-model`): computes the micro guest's expected memory; nothing else.
//! - `Main`: from the event loop on (console, stdin, the end of the run: stopping threads,
//!   the final dump, the report); it starts no thread by then. Its setup before (building the
//!   VM, receiving a migration) runs unfiltered.
//!
//! There are no device threads: devices are emulated in the vCPU threads, and a vfio-user
//! device is its own process (vmm-gpu-test-device).
//!
//! A thread starts with its parent's filter and adds its own (a syscall must pass both), so a
//! kind that starts threads allows what they do as well ([`ThreadKind::spawns`]).
//!
//! # `--user`
//! See [`user`]: after setup the process becomes another user for good.

pub mod mode;
pub mod rules;
pub mod trap;
pub mod user;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use mode::SeccompMode;
pub use trap::EXIT_BAD_SYSCALL;
pub use user::User;

/// Set in the environment of a vmm under test: the thread kind (as [`ThreadKind::name`]) that
/// makes a syscall only the API's list allows (`socket(AF_INET, ...)`) right after its filter goes in, to
/// show the filter catches it. Nothing else reads it.
pub const SELFTEST_ENV: &str = "VMM_SECCOMP_SELFTEST";

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {kind} seccomp filter: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("installing the {kind} seccomp filter in thread '{thread}': {source}")]
    Install {
        kind: &'static str,
        thread: String,
        source: seccompiler::Error,
    },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("the sandbox is configured once per process")]
    Twice,
    #[error("--user {spec}: {why}")]
    User { spec: String, why: String },
    #[error("--user needs a vmm started as root (this one runs as uid {euid})")]
    NotRoot { euid: u32 },
    #[error("--user: {what} failed: {source}")]
    Drop {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("--user: the privilege drop did not hold: {0}")]
    NotDropped(String),
    #[error("{SELFTEST_ENV}={0}: no such thread kind")]
    Selftest(String),
}

/// The kinds of thread, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    Vcpu,
    Api,
    Migration,
    PageServer,
    Tracking,
    MicroModel,
    Main,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::Migration,
        ThreadKind::PageServer,
        ThreadKind::Tracking,
        ThreadKind::MicroModel,
        ThreadKind::Main,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::Migration => "migration",
            ThreadKind::PageServer => "page-server",
            ThreadKind::Tracking => "tracking",
            ThreadKind::MicroModel => "micro-model",
            ThreadKind::Main => "main",
        }
    }

    /// The kinds of thread this kind starts after its filter is in (they inherit it).
    pub fn spawns(self) -> &'static [ThreadKind] {
        match self {
            // A tracking schedule switches backends when the agent's line arrives, on the
            // vCPU that wrote it: the next backend's threads start there.
            ThreadKind::Vcpu => &[ThreadKind::Tracking],
            // A migration starts its tracking and, for postcopy, its threads.
            // `finish` computes the micro guest's new model on a thread of its own.
            ThreadKind::Api => &[
                ThreadKind::Migration,
                ThreadKind::Tracking,
                ThreadKind::MicroModel,
            ],
            ThreadKind::Tracking => &[],
            ThreadKind::Migration => &[],
            ThreadKind::PageServer => &[],
            ThreadKind::MicroModel => &[],
            ThreadKind::Main => &[],
        }
    }

    /// Whether it may open Unix sockets (and connect them): a lazy restore's page-server
    /// client opens its data connections on the thread that first needs a page there (a vCPU
    /// at an exit, the fault or prefetch thread, the main thread's final dump).
    pub fn unix_sockets(self) -> bool {
        matches!(
            self,
            ThreadKind::Vcpu | ThreadKind::PageServer | ThreadKind::Main
        )
    }

    /// Its own syscalls and those of every kind it may start, recursively.
    pub fn allowed(self) -> BTreeSet<i64> {
        let mut set: BTreeSet<i64> = rules::own(self).into_iter().collect();
        for child in self.spawns() {
            set.extend(child.allowed());
        }
        set
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the command line asked for.
#[derive(Clone, Copy, Debug, Default)]
pub struct Policy {
    pub mode: SeccompMode,
    pub user: Option<User>,
}

struct Sandbox {
    policy: Policy,
    filters: HashMap<ThreadKind, BpfProgram>,
    selftest: Option<ThreadKind>,
}

static SANDBOX: OnceLock<Sandbox> = OnceLock::new();

/// Compiles one kind's filter.
pub fn compile(
    kind: ThreadKind,
    mode: SeccompMode,
    setxid: bool,
) -> Result<Option<BpfProgram>, SeccompError> {
    match mode.mismatch_action() {
        Some(mismatch) => compile_with(kind, mismatch, setxid).map(Some),
        None => Ok(None),
    }
}

/// [`compile`] with any action for what is not allowed (tests use an errno).
fn compile_with(
    kind: ThreadKind,
    mismatch: SeccompAction,
    setxid: bool,
) -> Result<BpfProgram, SeccompError> {
    let mut allowed = kind.allowed();
    if setxid {
        allowed.extend(rules::SETXID.iter().copied());
    }
    let build = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        allowed.into_iter().map(|nr| (nr, Vec::new())).collect();
    // A rule allowing the syscall when its first argument is `value`.
    let first_arg_is = |value: u64| {
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(build)
    };
    if kind.unix_sockets() && !rules.contains_key(&libc::SYS_socket) {
        // Unix sockets only (the page server's, a vfio-user device's): connect can then reach
        // local paths, never the network.
        rules.insert(libc::SYS_socket, vec![first_arg_is(libc::AF_UNIX as u64)?]);
        rules.insert(libc::SYS_connect, Vec::new());
    }
    if let Some(chain) = rules.get_mut(&libc::SYS_tgkill) {
        // Signals to this process's own threads only (a vCPU kick, an abort, glibc's setxid),
        // never to another process. The filters are compiled in the process they guard.
        *chain = vec![first_arg_is(u64::from(std::process::id()))?];
    }
    if let Some(chain) = rules.get_mut(&libc::SYS_prctl) {
        // A new thread names itself; a filter install sets no_new_privs first. Nothing else:
        // prctl can also make the process dumpable again, or change its death signal.
        *chain = vec![
            first_arg_is(libc::PR_SET_NAME as u64)?,
            first_arg_is(libc::PR_SET_NO_NEW_PRIVS as u64)?,
        ];
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(build)?;
    filter.try_into().map_err(build)
}

/// Sets the process's sandbox policy, once, from the command line: compiles every filter and
/// installs the SIGSYS handler (`kill`), so that a thread has nothing left to fail at but the
/// install itself. `--user` is refused here for a vmm that is not root.
pub fn init(policy: Policy) -> Result<(), SeccompError> {
    if policy.user.is_some() {
        user::check_root()?;
    }
    let selftest = match std::env::var(SELFTEST_ENV) {
        Ok(name) => Some(
            ThreadKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or(SeccompError::Selftest(name))?,
        ),
        Err(_) => None,
    };
    let mut filters = HashMap::new();
    for kind in ThreadKind::ALL {
        if let Some(bpf) = compile(kind, policy.mode, policy.user.is_some())? {
            filters.insert(kind, bpf);
        }
    }
    if policy.mode == SeccompMode::Kill {
        trap::install_handler()?;
    }
    SANDBOX
        .set(Sandbox {
            policy,
            filters,
            selftest,
        })
        .map_err(|_| SeccompError::Twice)
}

/// The mode in force (`off` where [`init`] was never called).
pub fn mode() -> SeccompMode {
    SANDBOX.get().map_or(SeccompMode::Off, |s| s.policy.mode)
}

/// Installs `kind`'s filter on the calling thread, if the policy asks for one.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(sandbox) = SANDBOX.get() else {
        return Ok(());
    };
    if let Some(bpf) = sandbox.filters.get(&kind) {
        trap::remember_thread_name();
        seccompiler::apply_filter(bpf).map_err(|source| SeccompError::Install {
            kind: kind.name(),
            thread: std::thread::current().name().unwrap_or("?").to_string(),
            source,
        })?;
    }
    if sandbox.selftest == Some(kind) {
        selftest(kind);
    }
    Ok(())
}

/// [`apply`] for a thread with no error path to report through: a thread that cannot be
/// filtered must not run unfiltered, so the vmm stops, saying why.
pub fn apply_or_exit(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        eprintln!("vmm: error: {e}");
        std::process::exit(1);
    }
}

/// Drops root for the `--user` of the policy, if any (see [`user`]).
pub fn drop_privileges() -> Result<(), SeccompError> {
    match SANDBOX.get().and_then(|s| s.policy.user) {
        Some(u) => user::drop_to(u),
        None => Ok(()),
    }
}

/// The syscall of [`SELFTEST_ENV`]: no list allows a TCP socket but the API's, and the test
/// names another kind. Under `kill` this never returns; otherwise it says what it got.
fn selftest(kind: ThreadKind) {
    // SAFETY: socket(2) with constant arguments; the fd it may return is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned to us and is owned by nothing else.
        unsafe { libc::close(fd) };
    }
    eprintln!(
        "vmm: seccomp selftest: socket() in a {kind} thread ran under --seccomp {} (result {fd})",
        mode()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_every_mode() {
        for kind in ThreadKind::ALL {
            assert!(compile(kind, SeccompMode::Off, false).unwrap().is_none());
            for mode in [SeccompMode::Log, SeccompMode::Kill] {
                for setxid in [false, true] {
                    let bpf = compile(kind, mode, setxid).unwrap().unwrap();
                    assert!(!bpf.is_empty(), "{kind} {mode}");
                }
            }
        }
    }

    #[test]
    fn parents_allow_what_their_children_do() {
        for kind in ThreadKind::ALL {
            let mine = kind.allowed();
            for child in kind.spawns() {
                assert!(child.allowed().is_subset(&mine), "{kind} starts {child}");
            }
        }
    }

    #[test]
    fn only_the_api_may_open_sockets_and_nobody_may_exec() {
        for kind in ThreadKind::ALL {
            let set = kind.allowed();
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_fork,
                libc::SYS_kill,
            ] {
                assert!(!set.contains(&nr), "{kind} allows syscall {nr}");
            }
            // Others open Unix sockets at most (an argument rule added in `compile`).
            assert_eq!(
                set.contains(&libc::SYS_socket),
                kind == ThreadKind::Api,
                "{kind} and socket"
            );
            for nr in rules::SETXID {
                assert!(!set.contains(nr), "{kind} allows setxid without --user");
            }
        }
    }

    /// Installs `kind`'s filter (EPERM for what it forbids) on a thread of its own and returns
    /// what `f` finds there.
    fn under<T: Send + 'static>(kind: ThreadKind, f: fn() -> T) -> T {
        let bpf = compile_with(kind, SeccompAction::Errno(libc::EPERM as u32), false).unwrap();
        std::thread::spawn(move || {
            seccompiler::apply_filter(&bpf).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    /// socket(domain) on this thread: Ok or the errno.
    fn socket(domain: libc::c_int) -> Result<(), i32> {
        // SAFETY: socket(2) with constant arguments; a returned fd is closed at once.
        let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        // SAFETY: `fd` was just returned to us.
        unsafe { libc::close(fd) };
        Ok(())
    }

    fn prctl(option: libc::c_int, arg: libc::c_ulong) -> i32 {
        // SAFETY: prctl with plain integer arguments (the name is a valid NUL-terminated
        // string for PR_SET_NAME).
        let rc = unsafe { libc::prctl(option, arg, 0, 0, 0) };
        if rc < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    #[test]
    fn the_argument_rules_hold_on_a_real_thread() {
        // A vCPU may open a Unix socket (a page server), not a TCP one.
        let (unix, tcp) = under(ThreadKind::Vcpu, || {
            (socket(libc::AF_UNIX), socket(libc::AF_INET))
        });
        assert_eq!(unix, Ok(()));
        assert_eq!(tcp, Err(libc::EPERM));
        // The API opens TCP sockets (migration).
        assert_eq!(under(ThreadKind::Api, || socket(libc::AF_INET)), Ok(()));
        // The tracking threads neither.
        assert_eq!(
            under(ThreadKind::Tracking, || socket(libc::AF_UNIX)),
            Err(libc::EPERM)
        );
        // prctl: a thread's name, yes; becoming dumpable again, no.
        let (name, dumpable) = under(ThreadKind::Api, || {
            let name = b"sandboxed\0";
            (
                prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong),
                prctl(libc::PR_SET_DUMPABLE, 1),
            )
        });
        assert_eq!((name, dumpable), (0, libc::EPERM));
        // tgkill: this process's threads, yes (signal 0 delivers nothing); another's, no.
        let (own, other) = under(ThreadKind::Vcpu, || {
            // SAFETY: plain integer syscalls; signal 0 only checks that the target exists.
            unsafe {
                let me = libc::gettid() as libc::c_long;
                let pid = libc::getpid() as libc::c_long;
                let own = libc::syscall(libc::SYS_tgkill, pid, me, 0);
                let other = libc::syscall(libc::SYS_tgkill, 1, 1, 0);
                let errno = std::io::Error::last_os_error().raw_os_error();
                (own, (other, errno))
            }
        });
        assert_eq!((own, other), (0, (-1, Some(libc::EPERM))));
        // Nothing off the list: exec, for one.
        let exec = under(ThreadKind::Main, || {
            // SAFETY: execve with null pointers fails (EFAULT) if it gets past the filter.
            let rc = unsafe { libc::execve(std::ptr::null(), std::ptr::null(), std::ptr::null()) };
            (rc, std::io::Error::last_os_error().raw_os_error())
        });
        assert_eq!(exec, (-1, Some(libc::EPERM)));
    }

    #[test]
    fn modes_parse_and_print() {
        use clap::ValueEnum;
        for m in [SeccompMode::Off, SeccompMode::Log, SeccompMode::Kill] {
            assert_eq!(SeccompMode::from_str(m.name(), false).unwrap(), m);
        }
        assert_eq!(SeccompMode::default(), SeccompMode::Kill);
    }
}
