//! Running parsed commands. Every result is one `AGENT:` line; failures are
//! `AGENT: error <cmd>: <reason>` and the agent goes on.

use std::process;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::children::{describe_status, Reaper};
use crate::gpu::Gpus;
use crate::script::{parse_command, split_script, Command};
use crate::workload::{Started, Workloads};
use crate::{blk, pci, say, sysinfo};

/// What the caller should do after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// `poweroff`/`reboot` outside PID 1: end the process (a smoke test on the host).
    Exit,
}

pub struct Agent {
    /// Whether this is the guest's init: only then may it reboot the machine.
    pid1: bool,
    reaper: Option<Arc<Reaper>>,
    workloads: Workloads,
    gpus: Gpus,
}

impl Agent {
    pub fn new(pid1: bool, reaper: Option<Arc<Reaper>>) -> Agent {
        Agent {
            pid1,
            reaper,
            workloads: Workloads::new(),
            gpus: Gpus::default(),
        }
    }

    /// Runs every command of a script or input line, in order.
    pub fn run_script(&mut self, script: &str) -> Flow {
        for text in split_script(script) {
            let flow = match parse_command(text) {
                Ok(cmd) => self.run_guarded(cmd),
                Err(e) => {
                    say!("{e}");
                    Flow::Continue
                }
            };
            if flow == Flow::Exit {
                return Flow::Exit;
            }
        }
        Flow::Continue
    }

    /// Runs one command; a panic in it is reported, not fatal (an init that exits panics the
    /// kernel).
    fn run_guarded(&mut self, cmd: Command) -> Flow {
        let name = command_name(&cmd);
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(cmd))) {
            Ok(flow) => flow,
            Err(_) => {
                say!("error {name}: internal error (panic)");
                Flow::Continue
            }
        }
    }

    fn run(&mut self, cmd: Command) -> Flow {
        let name = command_name(&cmd);
        let result = match cmd {
            Command::Cpus => Ok(sysinfo::cpus()),
            Command::Meminfo => sysinfo::meminfo(),
            Command::BlkRead { dev, offset, len } => blk::read(&dev, offset, len)
                .map(|h| format!("blkread dev={dev} off={offset} len={len} fnv64={h:016x}")),
            Command::BlkWrite {
                dev,
                offset,
                len,
                seed,
            } => blk::write(&dev, offset, len, seed)
                .map(|h| format!("blkwrite dev={dev} off={offset} len={len} fnv64={h:016x}")),
            Command::Workload(spec) => self.workloads.start(spec).map(|started| match started {
                Started::Background => "workload running in the background".to_owned(),
                Started::Finished { pass, checksum, ms } => {
                    format!("workload done pass={pass} checksum={checksum:016x} ms={ms:.1}")
                }
            }),
            Command::WorkloadStop => self.workloads.stop().map(|(pass, checksum)| {
                format!("workload-stop pass={pass} checksum={checksum:016x}")
            }),
            Command::WorkloadVerify => self.workloads.verify().map(|v| {
                let mut line = format!(
                    "workload-verify checksum={:016x} expected={:016x} ok={} bad_pages={}",
                    v.checksum,
                    v.expected,
                    v.checksum == v.expected && v.bad_pages == 0,
                    v.bad_pages
                );
                if let Some(page) = v.first_bad_page {
                    line += &format!(" first_bad_page={page}");
                }
                line
            }),
            Command::Echo(text) => Ok(format!("echo {text}")),
            Command::Sleep { ms } => {
                thread::sleep(Duration::from_millis(ms));
                Ok(format!("sleep ms={ms}"))
            }
            Command::Sh => self.shell(),
            Command::PciList => pci_list(),
            Command::Vfio(cmd) => {
                // A stop of several workloads answers with a line for each.
                for result in self.gpus.run(cmd) {
                    match result {
                        Ok(line) => say!("{line}"),
                        Err(reason) => say!("error {name}: {reason}"),
                    }
                }
                return Flow::Continue;
            }
            Command::Poweroff | Command::Reboot => return self.power_off(name),
        };
        match result {
            Ok(line) => say!("{line}"),
            Err(reason) => say!("error {name}: {reason}"),
        }
        Flow::Continue
    }

    /// An interactive busybox shell on the console; the agent waits for it to exit.
    fn shell(&self) -> Result<String, String> {
        let mut cmd = process::Command::new("/bin/sh");
        let status = match &self.reaper {
            Some(reaper) => reaper.run_foreground(&mut cmd),
            // No reaper thread: wait directly (orphans may then linger as zombies).
            None => cmd
                .status()
                .map(std::os::unix::process::ExitStatusExt::into_raw),
        };
        reclaim_terminal();
        status
            .map(|s| format!("sh {}", describe_status(s)))
            .map_err(|e| format!("/bin/sh: {e}"))
    }

    /// As init, reboot: the kernel runs with `reboot=k`, so this is the keyboard-controller
    /// reset that the VMM takes as a clean exit (there is no ACPI to power off with, and a
    /// halt would leave the VMM waiting). Elsewhere, just end the process.
    fn power_off(&mut self, name: &str) -> Flow {
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        say!("{name}");
        if !self.pid1 {
            return Flow::Exit;
        }
        // SAFETY: reboot(2) with a valid command; on success it does not return.
        if unsafe { libc::reboot(libc::RB_AUTOBOOT) } != 0 {
            say!("error {name}: reboot: {}", std::io::Error::last_os_error());
        }
        Flow::Continue
    }
}

/// Makes our process group the terminal's foreground group again. A shell with job control
/// (possible when stdin is a controlling terminal, as in a test on a pty; not on the guest's
/// /dev/console) moves the terminal to its own group, and reads by a background group then fail.
/// Errors are ignored: without a controlling terminal there is nothing to reclaim.
fn reclaim_terminal() {
    // SAFETY: plain libc calls on fd 0 and on initialised signal sets.
    unsafe {
        if libc::isatty(0) != 1 {
            return;
        }
        // tcsetpgrp from a background group raises SIGTTOU, which would stop us.
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTTOU);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        libc::tcsetpgrp(0, libc::getpgrp());
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
}

/// One `AGENT: pci-list BDF ...` line per function, then the count (or an error) on the result line.
fn pci_list() -> Result<String, String> {
    let functions = pci::list(std::path::Path::new(pci::SYSFS_PCI_DEVICES))?;
    for f in &functions {
        say!("pci-list {f}");
    }
    Ok(format!("pci-list count={}", functions.len()))
}

fn command_name(cmd: &Command) -> &'static str {
    match cmd {
        Command::Cpus => "cpus",
        Command::Meminfo => "meminfo",
        Command::BlkRead { .. } => "blkread",
        Command::BlkWrite { .. } => "blkwrite",
        Command::Workload(_) => "workload",
        Command::WorkloadVerify => "workload-verify",
        Command::WorkloadStop => "workload-stop",
        Command::Echo(_) => "echo",
        Command::Sleep { .. } => "sleep",
        Command::Sh => "sh",
        Command::Poweroff => "poweroff",
        Command::Reboot => "reboot",
        Command::PciList => "pci-list",
        Command::Vfio(cmd) => cmd.name(),
    }
}
