//! The QEMU half: Debian's QEMU 7.2 (`-M microvm`, as bench-boot runs it) migrating the guest
//! from namespace a to namespace b over TCP, driven over QMP.
//!
//! The destination starts with `-incoming defer` so that its capabilities (postcopy-ram,
//! postcopy-blocktime) are set before `migrate-incoming` opens the listening socket. Each
//! console is a Unix-socket chardev with a `logfile`, so the log holds everything the guest
//! printed whether or not anyone is connected, and the bench can type into it.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use vmm_tests::netns::{Side, TwoHosts};

use crate::guest::{self, ChildGuard, GuestError};
use crate::qmp::{Qmp, QmpError};
use crate::sample::{Mode, Sample, Tool};
use crate::Config;

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("migration {status}: {desc}")]
    Failed { status: String, desc: String },
    #[error("migration still '{status}' after {secs} s")]
    Timeout { status: String, secs: u64 },
    #[error("destination not running after {secs} s (status '{status}')")]
    NotRunning { status: String, secs: u64 },
    #[error("cannot type into the destination console {path}: {source}")]
    Console {
        path: String,
        source: std::io::Error,
    },
}

/// `qemu-system-x86_64 --version`'s first line, or None if QEMU is not installed.
pub fn version() -> Option<String> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
}

/// Installs Debian's qemu-system-x86 when qemu-system-x86_64 is missing.
pub fn ensure_installed() -> anyhow::Result<String> {
    if let Some(v) = version() {
        return Ok(v);
    }
    tracing::warn!("qemu-system-x86_64 missing: installing qemu-system-x86 with apt-get");
    let ok = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    anyhow::ensure!(
        ok(&["update", "-qq"]) && ok(&["install", "-y", "-qq", "qemu-system-x86"]),
        "apt-get install qemu-system-x86 failed; install it or run with --tools vmm"
    );
    version().ok_or_else(|| anyhow::anyhow!("qemu-system-x86_64 still missing after apt-get"))
}

/// One QEMU process: the command line both sides share.
fn qemu_command(hosts: &TwoHosts, side: Side, cfg: &Config, dir: &Path, tag: &str) -> Command {
    let p = |ext: &str| dir.join(format!("{tag}.{ext}")).display().to_string();
    let mut cmd = hosts.command(side, "qemu-system-x86_64");
    cmd.args(["-M", "microvm,x-option-roms=off,rtc=off,acpi=off"])
        .args(["-cpu", "host,-cx16,-arch-capabilities", "-enable-kvm"])
        .args([
            "-m",
            &cfg.mem_mib.to_string(),
            "-smp",
            &cfg.vcpus.to_string(),
        ])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=con,path={},server=on,wait=off,logfile={}",
            p("serial"),
            p("console")
        ))
        .args(["-serial", "chardev:con"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", p("qmp")))
        .arg("-kernel")
        .arg(&cfg.kernel)
        .arg("-initrd")
        .arg(&cfg.initrd)
        .args(["-append", &cfg.cmdline()]);
    cmd
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// Migrates once; returns the filled sample (ok only if the destination verified its memory).
pub fn run(
    hosts: &TwoHosts,
    cfg: &Config,
    mode: Mode,
    run: usize,
    port: u16,
    dir: &Path,
    progress: &dyn Fn(&str),
) -> Result<Sample, QemuError> {
    let mut sample = Sample::new(Tool::Qemu, mode, run);
    let uri = format!("tcp:{}:{port}", hosts.addr_b);
    let qmp_wait = Duration::from_secs(30);

    progress("booting the source guest");
    let start = Instant::now();
    let mut src = ChildGuard::spawn(
        "source qemu",
        qemu_command(hosts, Side::A, cfg, dir, "src"),
        &dir.join("src.stderr"),
    )?;
    let mut src_qmp = Qmp::connect(&dir.join("src.qmp"), qmp_wait)?;
    guest::wait_for_line(
        &dir.join("src.console"),
        "the agent's first workload pass",
        guest::is_workload_running,
        cfg.boot_timeout,
        Some(&mut src),
    )?;
    sample.boot_ms = Some(start.elapsed().as_secs_f64() * 1000.0);

    progress("starting the destination");
    let mut dst_cmd = qemu_command(hosts, Side::B, cfg, dir, "dst");
    dst_cmd.args(["-incoming", "defer"]);
    let mut dst = ChildGuard::spawn("destination qemu", dst_cmd, &dir.join("dst.stderr"))?;
    let mut dst_qmp = Qmp::connect(&dir.join("dst.qmp"), qmp_wait)?;
    let caps: &[&str] = if mode.uses_postcopy() {
        &["postcopy-ram", "postcopy-blocktime"]
    } else {
        &[]
    };
    dst_qmp.set_capabilities(caps)?;
    dst_qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))?;

    // Let the workload dirty memory at full speed for a while before tracking starts.
    std::thread::sleep(cfg.settle);

    progress("migrating");
    if mode.uses_postcopy() {
        src_qmp.set_capabilities(&["postcopy-ram"])?;
    }
    src_qmp.execute(
        "migrate-set-parameters",
        Some(json!({
            "downtime-limit": cfg.downtime_ms,
            "max-bandwidth": cfg.max_bandwidth_bytes_s(),
        })),
    )?;
    let t0 = Instant::now();
    src_qmp.execute("migrate", Some(json!({ "uri": uri })))?;
    let mut postcopy_requested = false;
    if mode == Mode::Postcopy {
        // Switches over as soon as the first iteration starts: everything is then sent in
        // the background or fetched on demand.
        src_qmp.execute("migrate-start-postcopy", None)?;
        postcopy_requested = true;
    }
    let mut entered_postcopy = false;
    let info = loop {
        let info = src_qmp.execute("query-migrate", None)?;
        let status = info["status"].as_str().unwrap_or("?").to_string();
        entered_postcopy |= status.starts_with("postcopy");
        match status.as_str() {
            "completed" => break info,
            "failed" | "cancelled" => {
                return Err(QemuError::Failed {
                    desc: info["error-desc"]
                        .as_str()
                        .unwrap_or("no reason given")
                        .into(),
                    status,
                })
            }
            _ => {}
        }
        if mode == Mode::Hybrid
            && !postcopy_requested
            && status == "active"
            && info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0) >= 2
        {
            // The first full pass is done: switch to postcopy for the rest.
            src_qmp.execute("migrate-start-postcopy", None)?;
            postcopy_requested = true;
        }
        if t0.elapsed() > cfg.migrate_timeout {
            let _ = src_qmp.execute("migrate_cancel", None);
            return Err(QemuError::Timeout {
                status,
                secs: cfg.migrate_timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    sample.wall_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
    tracing::debug!("source query-migrate: {info}");
    sample.status = "completed".into();
    sample.total_ms = num(&info["total-time"]);
    sample.tool_downtime_ms = num(&info["downtime"]);
    sample.bytes = info["ram"]["transferred"].as_u64();
    sample.rounds = info["ram"]["dirty-sync-count"].as_u64();
    sample.postcopy_entered = Some(entered_postcopy);
    if mode.uses_postcopy() {
        sample.postcopy_faults = info["ram"]["postcopy-requests"].as_u64();
    }

    // The destination runs on its own once the source is done (in postcopy, already earlier).
    let t_run = Instant::now();
    loop {
        let st = dst_qmp.execute("query-status", None)?;
        let status = st["status"].as_str().unwrap_or("?");
        if status == "running" {
            break;
        }
        if t_run.elapsed() > Duration::from_secs(60) {
            return Err(QemuError::NotRunning {
                status: status.into(),
                secs: 60,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The RESUME event precedes the reply that said "running"; one more command to be sure.
    if dst_qmp.first_event("RESUME").is_none() {
        std::thread::sleep(Duration::from_millis(100));
        dst_qmp.execute("query-status", None)?;
    }
    sample.downtime_ms = match (src_qmp.first_event("STOP"), dst_qmp.first_event("RESUME")) {
        (Some(stop), Some(resume)) => Some((resume - stop) * 1000.0),
        _ => {
            tracing::warn!("no STOP/RESUME event pair: downtime unknown");
            None
        }
    };
    if mode.uses_postcopy() {
        let dinfo = dst_qmp.execute("query-migrate", None)?;
        tracing::debug!("destination query-migrate: {dinfo}");
        sample.blocktime_ms = num(&dinfo["postcopy-blocktime"]);
    }
    // The source is paused for good now; free its CPU for the destination.
    drop(src_qmp);
    drop(src);

    progress("verifying on the destination");
    let serial = dir.join("dst.serial");
    let console_err = |source| QemuError::Console {
        path: serial.display().to_string(),
        source,
    };
    let mut console = UnixStream::connect(&serial).map_err(console_err)?;
    console
        .write_all(b"workload-stop;workload-verify\n")
        .map_err(console_err)?;
    let line = guest::wait_for_line(
        &dir.join("dst.console"),
        "the agent's workload-verify answer",
        guest::is_verify_result,
        cfg.verify_timeout,
        Some(&mut dst),
    )?;
    sample.record_verify(&line);
    drop(dst_qmp);
    Ok(sample)
}
