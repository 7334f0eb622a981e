//! Boot-time benchmark: vmm against QEMU (Debian's qemu-system-x86, `-M microvm`) on the same
//! kernel and initramfs, in one run.
//!
//! Both are timed the same way, from outside: process spawn to the agent's ready marker on the
//! serial console. vmm's own figures (setup = process start to first KVM_RUN, boot-timer write,
//! resident memory beyond guest RAM) come from its JSON report. Prints medians of N runs and the
//! vmm/QEMU ratio; `--json` for scripts. No thresholds: the numbers are the result.
//! `--startup` measures vmm's start-up alone against a KVM floor (`startup`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

mod startup;

#[derive(Parser)]
#[command(about = "Boot time of the Linux test guest: vmm vs QEMU")]
struct Args {
    /// Runs per VMM (at least 1: a median of nothing is no figure).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// vCPUs for both.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// The vmm binary.
    #[arg(long, default_value = "target/release/vmm")]
    vmm: PathBuf,
    /// Kernel and initramfs (default: guest-images/out/images.env).
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Skip QEMU (e.g. when it is not installed).
    #[arg(long)]
    no_qemu: bool,
    /// Per-boot limit in seconds.
    #[arg(long, default_value_t = 240)]
    timeout_s: u64,
    #[arg(long)]
    json: bool,
    /// Measure start-up instead of boot: vmm's set-up time (main entered to first KVM_RUN) for
    /// the micro and the Linux guest, `--runs` each, against the KVM floor in the same run.
    #[arg(long)]
    startup: bool,
}

const MARKER: &str = guest_abi::agent::READY_MARKER;
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 noxsave clearcpuid=151,288,308,158,306 tsc=reliable clocksource=kvm-clock no-kvmapf vmm.agent=poweroff";

#[derive(Serialize, Default)]
struct Sample {
    marker_ms: f64,
    setup_ms: Option<f64>,
    boot_timer_ms: Option<f64>,
    rss_beyond_guest_kib: Option<u64>,
}

#[derive(Serialize)]
struct Summary {
    host: &'static str,
    runs: u32,
    vcpus: u32,
    vmm_marker_ms_median: Option<f64>,
    vmm_setup_ms_median: Option<f64>,
    vmm_boot_timer_ms_median: Option<f64>,
    vmm_rss_beyond_guest_kib_median: Option<f64>,
    qemu_marker_ms_median: Option<f64>,
    /// vmm / QEMU, time to the agent marker (below 1: vmm is faster).
    ratio_vmm_over_qemu: Option<f64>,
    vmm: Vec<Sample>,
    qemu: Vec<Sample>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Spawns `cmd`, reads its stdout until the marker line, then lets it finish (the agent powers
/// off) or, with `kill_after_marker`, kills it (QEMU's microvm has no keyboard controller, so
/// the guest's reset request never ends it). Returns ms to the marker and everything printed
/// after it (vmm's JSON report).
fn time_to_marker(
    mut cmd: Command,
    limit: Duration,
    kill_after_marker: bool,
) -> Result<(f64, String)> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let (marker_tx, marker_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut marker = None;
        let mut rest = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if marker.is_none() && line.trim_end_matches('\r').trim() == MARKER {
                marker = Some(start.elapsed());
                let _ = marker_tx.send(());
            } else if marker.is_some() {
                rest.push_str(&line);
                rest.push('\n');
            }
        }
        let _ = tx.send((marker, rest));
    });
    if kill_after_marker && marker_rx.recv_timeout(limit).is_ok() {
        let _ = child.kill();
    }
    let (marker, rest) = match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => {
            let _ = child.kill();
            bail!("no marker within {} s", limit.as_secs());
        }
    };
    let _ = child.wait();
    match marker {
        Some(d) => Ok((d.as_secs_f64() * 1000.0, rest)),
        None => bail!("the guest exited without printing {MARKER}"),
    }
}

fn images(args: &Args) -> Result<(PathBuf, PathBuf)> {
    if let (Some(k), Some(i)) = (&args.kernel, &args.initrd) {
        return Ok((k.clone(), i.clone()));
    }
    let env = std::fs::read_to_string("guest-images/out/images.env")
        .context("guest-images/out/images.env missing: run guest-images/build.sh")?;
    let get = |key: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(|v| PathBuf::from(v.trim().trim_matches('"')))
            .with_context(|| format!("{key} missing from images.env"))
    };
    Ok((get("VMM_KERNEL")?, get("VMM_INITRAMFS")?))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (kernel, initrd) = images(&args)?;
    let limit = Duration::from_secs(args.timeout_s);
    let host = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "pvm"
    } else {
        "hardware"
    };
    let (k, i) = (kernel.to_string_lossy(), initrd.to_string_lossy());
    if args.startup {
        let summary = startup::run(&args.vmm, &k, &i, args.runs, limit, host)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            startup::print(&summary);
        }
        return Ok(());
    }
    let mut vmm_samples = Vec::new();
    let mut qemu_samples = Vec::new();
    for run in 1..=args.runs {
        eprintln!("[{run}/{}] vmm ...", args.runs);
        let mut cmd = Command::new(&args.vmm);
        cmd.args([
            "run", "--kernel", &k, "--initrd", &i, "--mem", "128M", "--json",
        ])
        .args(["--vcpus", &args.vcpus.to_string(), "--no-console-input"])
        .args(["--cmdline", CMDLINE]);
        let (ms, rest) = time_to_marker(cmd, limit, false)?;
        let report: serde_json::Value = rest
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        vmm_samples.push(Sample {
            marker_ms: ms,
            setup_ms: report["setup_ms"].as_f64(),
            boot_timer_ms: report["boot_timer_ms"].as_f64(),
            rss_beyond_guest_kib: report["rss_beyond_guest_kib"].as_u64(),
        });
        eprintln!("    vmm: marker at {ms:.0} ms");
        if !args.no_qemu {
            eprintln!("[{run}/{}] qemu ...", args.runs);
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args(["-M", "microvm,x-option-roms=off,rtc=off,acpi=off"])
                .args(["-cpu", "host,-cx16,-arch-capabilities", "-enable-kvm"])
                .args(["-m", "128", "-smp", &args.vcpus.to_string()])
                .args([
                    "-nodefaults",
                    "-no-user-config",
                    "-nographic",
                    "-serial",
                    "stdio",
                ])
                .args([
                    "-no-reboot",
                    "-kernel",
                    &k,
                    "-initrd",
                    &i,
                    "-append",
                    CMDLINE,
                ]);
            let (ms, _) = time_to_marker(cmd, limit, true)?;
            qemu_samples.push(Sample {
                marker_ms: ms,
                ..Default::default()
            });
            eprintln!("    qemu: marker at {ms:.0} ms");
        }
    }
    // Every run either produced a sample or ended the bench with an error, and `--runs` is at
    // least 1, so this is a real median; a missing one is still printed as "-", never as 0.
    let vmm_marker = median(vmm_samples.iter().map(|s| s.marker_ms).collect());
    let qemu_marker = median(qemu_samples.iter().map(|s| s.marker_ms).collect());
    let opt_median =
        |f: fn(&Sample) -> Option<f64>| median(vmm_samples.iter().filter_map(f).collect());
    let summary = Summary {
        host,
        runs: args.runs,
        vcpus: args.vcpus,
        vmm_marker_ms_median: vmm_marker,
        vmm_setup_ms_median: opt_median(|s| s.setup_ms),
        vmm_boot_timer_ms_median: opt_median(|s| s.boot_timer_ms),
        vmm_rss_beyond_guest_kib_median: opt_median(|s| s.rss_beyond_guest_kib.map(|v| v as f64)),
        qemu_marker_ms_median: qemu_marker,
        ratio_vmm_over_qemu: vmm_marker.zip(qemu_marker).map(|(v, q)| v / q),
        vmm: vmm_samples,
        qemu: qemu_samples,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.1}"));
    println!(
        "boot to agent marker, host {host}, {} vCPU(s), medians of {} runs",
        args.vcpus, args.runs
    );
    println!(
        "  vmm : {:>10} ms to marker (setup {} ms, boot-timer {} ms, RSS beyond guest RAM {} KiB)",
        f(summary.vmm_marker_ms_median),
        f(summary.vmm_setup_ms_median),
        f(summary.vmm_boot_timer_ms_median),
        f(summary.vmm_rss_beyond_guest_kib_median)
    );
    println!(
        "  qemu: {:>10} ms to marker",
        f(summary.qemu_marker_ms_median)
    );
    println!(
        "  ratio vmm/qemu: {}",
        summary
            .ratio_vmm_over_qemu
            .map_or("-".into(), |r| format!("{r:.3}"))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_is_a_usage_error() {
        let e = Args::try_parse_from(["bench-boot", "--runs", "0"])
            .err()
            .expect("--runs 0 accepted");
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        // clap exits with 2 for usage errors, as vmm does.
        assert_eq!(e.exit_code(), 2);
        assert_eq!(
            Args::try_parse_from(["bench-boot", "--runs", "1"])
                .unwrap()
                .runs,
            1
        );
    }

    #[test]
    fn median_of_nothing_is_no_figure() {
        assert_eq!(median(Vec::new()), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
    }
}
