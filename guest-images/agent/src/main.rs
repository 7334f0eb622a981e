//! vmm-agent: the guest agent, run as PID 1 (exec'd by the initramfs's /init once /proc, /sys
//! and /dev are mounted). The host drives it through the serial console: commands from the
//! kernel command line first, then one line at a time from stdin. Guest user space runs at
//! native speed even where the guest kernel is emulated, so workloads belong here, and keeping
//! the logic in one long-lived static process avoids the startup crashes of freshly exec'd
//! busybox seen on PVM hosts (design/PLATFORM.md §7).
//!
//! # Start-up
//! 1. Writes `guest_abi::boot_timer::MAGIC` to `boot_timer::GPA` through /dev/mem (only as
//!    PID 1, see below); on failure prints `AGENT: boot-timer error ...` and goes on.
//! 2. Prints `guest_abi::agent::READY_MARKER` on a line of its own.
//! 3. Runs the script in `vmm.agent=` on the kernel command line, then reads commands from
//!    stdin until EOF, then idles forever (init must never exit: that panics the kernel).
//!
//! # Syntax
//! Commands are separated by `;` (on the command line, or within an input line) or newlines;
//! arguments by `,`. Numbers are decimal or `0x` hex. Every result line starts with
//! `AGENT:`; a bad command gives `AGENT: error <cmd>: <reason>` and the agent goes on.
//!
//! # Commands
//! - `cpus` -> `AGENT: cpus=<sysconf online CPUs> online=<contents of .../cpu/online>`
//! - `meminfo` -> `AGENT: mem_total_kib=<N> mem_available_kib=<N>`
//! - `blkread,DEV,OFFSET,LEN` -> `AGENT: blkread dev=DEV off=OFFSET len=LEN fnv64=<16 hex>`:
//!   FNV-1a 64 of the bytes read (`guest_abi::pattern::fnv1a64`).
//! - `blkwrite,DEV,OFFSET,LEN,SEED` -> writes LEN bytes of `guest_abi::pattern::fill_pattern`
//!   for SEED at OFFSET, fsyncs, prints `AGENT: blkwrite dev=DEV off=OFFSET len=LEN
//!   fnv64=<16 hex>` (FNV-1a 64 of the bytes written).
//! - `workload,SIZE_MIB,PATTERN,PASSES[,RATE_MIB_S]` -> a memory workload (see `workload`):
//!   prints `AGENT: workload start ...`, then `AGENT: workload pass=N checksum=<16 hex>` after
//!   the first and the last pass and at most once a second in between. PATTERN is sweep, random or hotset; RATE_MIB_S limits dirtied MiB/s (0 or
//!   absent: no limit). PASSES > 0 runs in the foreground and ends with `AGENT: workload done
//!   pass=N checksum=<16 hex> ms=<guest milliseconds the passes took>`; PASSES = 0 runs in a background thread until `workload-stop`
//!   (`AGENT: workload running in the background`).
//! - `workload-stop` -> stops the workload after its current pass: `AGENT: workload-stop
//!   pass=N checksum=<16 hex>`.
//! - `workload-verify` -> (stopped workload only) hashes the buffer: `AGENT: workload-verify
//!   checksum=<actual> expected=<recorded> ok=true|false bad_pages=N [first_bad_page=P]`.
//! - `echo,TEXT` -> `AGENT: echo TEXT` (TEXT may contain commas).
//! - `sleep,MS` -> sleeps, then `AGENT: sleep ms=MS`.
//! - `sh` -> runs `/bin/sh` on the console and waits for it: `AGENT: sh exit=N`.
//! - `pci-list` -> `AGENT: pci-list BDF vendor=0x.... device=0x.... class=0x...... driver=NAME|none
//!   [barN=0xADDR+0xSIZE:mem32|mem64|io[:pf][:unset]]... msix=N|none [msix_table=barB+0xOFF]
//!   msi=N|none` per function, then `AGENT: pci-list count=N`.
//! - `vfio-bind,BDF` -> `AGENT: vfio-bind BDF driver=vfio-pci group=/dev/vfio/noiommu-N
//!   previous=DRIVER|none`.
//! - `vfio-dma,BDF,BYTES` -> `AGENT: vfio-dma BDF bytes=N ok=true transfers=T irqs=T
//!   device_irqs=T elapsed_ns=NS fnv64=<16 hex>`.
//! - `vfio-vram,BDF,OFFSET,BYTES` -> `AGENT: vfio-vram BDF offset=0x.. bytes=N mmap=ok dma=ok
//!   transfers=T irqs=T fnv64=<16 hex>`.
//! - `vfio-msix,BDF,COUNT` -> `AGENT: vfio-msix BDF count=C received=C vectors=V
//!   source=device|loopback [device_irqs=C] elapsed_ns=NS ok=true`.
//! - `vfio-bench,BDF[,ITERATIONS]` -> `AGENT: vfio-bench BDF iterations=N ... ok=true`: mapped
//!   vs trapped BAR access, MSI-X latency, DMA throughput against memcpy (`gpu::bench`).
//! - `vfio-workload,BDF,start,dma[,RATE]` | `vfio-workload,BDF,start,vram` |
//!   `vfio-workload,BDF,start,vram-cpu[,RATE]` | `vfio-workload,BDF,stop[,dma|vram|vram-cpu]`:
//!   the device's page writer, its VRAM kernel, the agent writing VRAM through the BAR; one of
//!   each may run at once, stop checks what each left (see `gpu`).
//!
//!   README.md says what each `vfio-*` command does; any failure is `AGENT: error vfio-...`.
//! - `poweroff`, `reboot` -> `sync()`, `AGENT: poweroff` (or `reboot`), then
//!   `reboot(RB_AUTOBOOT)`: with `reboot=k` on the kernel command line that is a keyboard
//!   controller reset, which the VMM treats as a clean exit (the guest has no ACPI to power
//!   off with).
//!
//! # Running outside a VM
//! Not being PID 1 changes three things, so the agent can be smoke-tested on the host safely:
//! the boot-timer write is skipped (/dev/mem on the host is the host's memory), `poweroff` and
//! `reboot` end the process instead of rebooting, and EOF on stdin ends the process.
//! Environment variables for tests:
//! - `VMM_AGENT_CMDLINE`: a file to read instead of /proc/cmdline.
//! - `VMM_AGENT_DEVMEM`: a file to use instead of /dev/mem; the boot-timer write is then done
//!   even when not PID 1 (the file must be at least `boot_timer::GPA` + 4 KiB long; sparse is
//!   fine).

mod blk;
mod children;
mod commands;
mod devmem;
mod gpu;
mod pagemap;
mod pci;
mod script;
mod sysinfo;
mod vfio;
mod workload;

use guest_abi::agent::READY_MARKER;
use std::io::{BufRead, Write};

use crate::children::Reaper;
use crate::commands::{Agent, Flow};

/// Prints one `AGENT:` result line and flushes it; output errors are ignored (there is nowhere
/// else to report them, and init must not die of them).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::print_line(&format!("{} {}", guest_abi::agent::RESULT_PREFIX, format_args!($($arg)*)))
    };
}

/// Writes `line` and a newline in one locked write, so lines from the workload thread and the
/// main thread never interleave.
pub fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{line}\n").as_bytes());
    let _ = out.flush();
}

const PROC_CMDLINE: &str = "/proc/cmdline";

fn main() {
    let pid1 = std::process::id() == 1;
    if pid1 {
        // Our own session and process group, as inits do (the kernel starts PID 1 in session
        // 0): children then share a real group, and with no controlling terminal a `sh` runs
        // without job control and cannot take the console away from us.
        // SAFETY: setsid has no preconditions; failure (already a group leader) is harmless.
        unsafe { libc::setsid() };
    }

    // Before any thread exists, so every thread inherits the blocked SIGCHLD.
    let reaper = match children::block_sigchld().and_then(|()| Reaper::start()) {
        Ok(reaper) => Some(reaper),
        Err(e) => {
            say!("error reaper: {e} (children will not be reaped)");
            None
        }
    };

    boot_timer(pid1);
    print_line(READY_MARKER);

    let mut agent = Agent::new(pid1, reaper);
    let flow = match read_script() {
        Ok(Some(script)) => agent.run_script(&script),
        Ok(None) => Flow::Continue,
        Err(e) => {
            say!("error cmdline: {e}");
            Flow::Continue
        }
    };
    if flow == Flow::Continue {
        read_stdin(&mut agent, pid1);
    }
    if !pid1 {
        return;
    }
    loop {
        // SAFETY: pause has no preconditions; it returns after each handled signal.
        unsafe { libc::pause() };
    }
}

fn boot_timer(pid1: bool) {
    let path = match std::env::var("VMM_AGENT_DEVMEM") {
        Ok(path) => path,
        Err(_) if pid1 => devmem::DEV_MEM.to_owned(),
        Err(_) => {
            say!("boot-timer skipped: not PID 1");
            return;
        }
    };
    if let Err(e) = devmem::write_boot_timer(&path) {
        say!("boot-timer error {path}: {e}");
    }
}

/// The `vmm.agent=` script from the kernel command line (or `VMM_AGENT_CMDLINE`'s file).
fn read_script() -> Result<Option<String>, String> {
    let path = std::env::var("VMM_AGENT_CMDLINE").unwrap_or_else(|_| PROC_CMDLINE.to_owned());
    let cmdline = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
    Ok(script::script_from_cmdline(&String::from_utf8_lossy(
        &cmdline,
    )))
}

/// Runs input lines as scripts until EOF or a `poweroff` outside PID 1. Read errors end it
/// outside PID 1; as PID 1 they are retried once a second, since an init that stops listening
/// leaves the host no way in.
fn read_stdin(agent: &mut Agent, pid1: bool) {
    let mut stdin = std::io::stdin().lock();
    let mut line = Vec::new();
    let mut failing = false;
    loop {
        line.clear();
        match stdin.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {
                failing = false;
                if agent.run_script(&String::from_utf8_lossy(&line)) == Flow::Exit {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Once per run of failures, not once a second.
                if !failing {
                    say!("error stdin: {e}");
                }
                if !pid1 {
                    return;
                }
                failing = true;
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}
