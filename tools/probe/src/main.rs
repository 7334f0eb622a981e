//! `vmm-probe [--json] [--markdown PATH]`: runs every mechanism on every memory kind here.
//! `vmm-probe --in-guest`: the same inside the lab guest (HMM rows on test_hmm, soft-dirty on),
//! booted with `vmm run`; the guest's report is printed here.
//! `vmm-probe --discover-vfio [--json]`: only the VFIO devices there are and how each would be
//! opened, nothing opened (tools/host-check.sh).
//! Exit 0 whatever the mechanisms did (that is the data); 1 only if the probe could not run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vmm_probe::in_guest::{self, InGuestOpts};
use vmm_probe::report::{Report, REPORT_VERSION};
use vmm_probe::vfio::discover::{discover, Access};
use vmm_probe::vfio::gpu_report;
use vmm_probe::{lab_init, render, run, ProbeError, ProbeOpts};

#[derive(Parser)]
#[command(about = "Which memory-tracking mechanisms work on which memory kinds on this host")]
struct Args {
    /// Print the report as JSON (schema: tools/probe/report.schema.json) instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the report as Markdown to PATH.
    #[arg(long, value_name = "PATH")]
    markdown: Option<PathBuf>,
    /// Directory for the file-mapping kind's temp file (unlinked at once).
    #[arg(long, default_value = "/var/tmp")]
    file_dir: PathBuf,
    /// The CUDA driver library, loaded at run time (no build-time CUDA).
    #[arg(long, default_value = "libcuda.so.1", value_name = "PATH")]
    cuda_library: PathBuf,
    /// Let the CPU and a KVM guest write the prefetchable (memory) BARs of bound VFIO devices,
    /// so write detection is tried on them too. Register BARs are never read or written.
    #[arg(long)]
    bar_writes: bool,
    /// Of the host memory kinds, probe only anonymous 4 KiB (HMM, GPU and VFIO as usual).
    #[arg(long)]
    quick: bool,
    /// Run the probe inside the lab guest (Linux 6.12 with test_hmm and soft-dirty): build it
    /// if needed (guest-images/build.sh --lab), boot it with `vmm run`, print its report.
    #[arg(long)]
    in_guest: bool,
    /// With --in-guest: the lab image directory.
    #[arg(long, default_value = "guest-images/out/lab", requires = "in_guest")]
    lab_dir: PathBuf,
    /// With --in-guest: the image build script (run with --lab first; a cache hit when
    /// nothing changed).
    #[arg(long, default_value = "guest-images/build.sh", requires = "in_guest")]
    build_script: PathBuf,
    /// With --in-guest: instead of the probe, the GPU test device served on SOCK (started by
    /// the caller: vmm-gpu-test-device --socket SOCK) passed into the guest, bound to vfio-pci
    /// no-IOMMU there and probed (its VRAM BAR, a buffer its DMA writes); prints the steps and
    /// cells (--json: as JSON; --markdown: a table).
    #[arg(long, value_name = "SOCK", requires = "in_guest")]
    gpu_device: Option<PathBuf>,
    /// With --in-guest: use the lab image as it is, do not run the build script.
    #[arg(long, requires = "in_guest")]
    no_build: bool,
    /// With --in-guest: the vmm binary (default: `vmm` beside this binary).
    #[arg(long, requires = "in_guest")]
    vmm: Option<PathBuf>,
    /// With --in-guest: where the guest console goes.
    #[arg(
        long,
        default_value = "/tmp/vmm-probe-lab-console.log",
        requires = "in_guest"
    )]
    console_log: PathBuf,
    /// With --in-guest: give up after this many seconds (boot 40-130 s + probe 1-7 min on
    /// PVM hosts, depending on load).
    #[arg(long, default_value_t = 1200, requires = "in_guest")]
    timeout_s: u64,
    /// Render a saved JSON report (as --json wrote it) instead of probing: as a table, or with
    /// --markdown / --json.
    #[arg(long, value_name = "PATH", conflicts_with = "in_guest")]
    from_json: Option<PathBuf>,
    /// Only list the devices bound to a VFIO driver and how each would be opened (cdev +
    /// iommufd, or group), from /dev and sysfs, opening nothing; with --json as JSON.
    /// tools/host-check.sh uses this.
    #[arg(long, conflicts_with_all = ["in_guest", "from_json", "markdown"])]
    discover_vfio: bool,
    /// With --discover-vfio: the /dev to look in (a fake tree in tests).
    #[arg(long, default_value = "/dev", requires = "discover_vfio")]
    dev_dir: PathBuf,
    /// With --discover-vfio: the /sys to look in.
    #[arg(long, default_value = "/sys", requires = "discover_vfio")]
    sys_dir: PathBuf,
    /// Run the VMM's kernel-VFIO transport against two fresh mtty mdev instances (needs root and
    /// a kernel with the mtty sample, as the lab guest's), one line per step; exit 1 if any step
    /// failed or was refused.
    #[arg(long)]
    vfio_selftest: bool,
    /// Internal: run as PID 1 of the lab guest (guest-images/lab/init).
    #[arg(long, hide = true)]
    lab_init: bool,
}

fn in_guest_main(args: Args) -> Result<(), String> {
    let vmm = match args.vmm {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(|e| format!("locating this binary: {e}"))?
            .with_file_name("vmm"),
    };
    let opts = InGuestOpts {
        lab_dir: args.lab_dir,
        build_script: (!args.no_build).then_some(args.build_script),
        vmm,
        console_log: args.console_log,
        timeout: Duration::from_secs(args.timeout_s),
        quick: args.quick,
    };
    if let Some(sock) = &args.gpu_device {
        // Builds the lab image first unless --no-build (in_guest::boot_with).
        let (booted, steps, cells) = in_guest::run_gpu_noiommu(&opts, sock)?;
        let run = gpu_report::GpuRun {
            ready_s: booted.ready_s,
            elapsed_s: booted.elapsed_s,
            steps,
            cells,
        };
        let md = gpu_report::markdown(&run);
        if args.json {
            let json = serde_json::to_string_pretty(&run).map_err(|e| e.to_string())?;
            println!("{json}");
        } else {
            print!("{md}");
        }
        if let Some(path) = args.markdown {
            std::fs::write(&path, &md).map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        return Ok(());
    }
    let r = in_guest::run(&opts)?;
    if args.json {
        print!("{}", r.json);
    } else {
        print!("{}", r.text);
    }
    if let Some(path) = args.markdown {
        std::fs::write(&path, &r.markdown)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    eprintln!(
        "vmm-probe: lab guest: probe started {} s after vmm run, report complete after {:.1} s \
         (console: {})",
        r.ready_s.map_or("?".into(), |s| format!("{s:.1}")),
        r.boot_to_report_s,
        opts.console_log.display()
    );
    Ok(())
}

fn main_inner(args: Args) -> Result<(), ProbeError> {
    let opts = ProbeOpts {
        file_dir: args.file_dir,
        cuda_library: args.cuda_library,
        bar_writes: args.bar_writes,
        quick: args.quick,
        ..ProbeOpts::default()
    };
    let report = match &args.from_json {
        Some(path) => saved(path)?,
        None => run(&opts)?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render::text(&report));
    }
    if let Some(path) = args.markdown {
        std::fs::write(&path, render::markdown(&report))
            .map_err(|source| ProbeError::Write { path, source })?;
    }
    Ok(())
}

/// `--discover-vfio`: discover.rs's findings, nothing opened.
fn discover_vfio(args: &Args) {
    let d = discover(&args.dev_dir, &args.sys_dir);
    if args.json {
        let devices: Vec<serde_json::Value> = d
            .devices
            .iter()
            .map(|v| {
                let (access, node) = match &v.access {
                    Access::Cdev { node, .. } => ("cdev", Some(node.display().to_string())),
                    Access::Group { node, .. } => ("group", Some(node.display().to_string())),
                    Access::Neither { .. } => ("none", None),
                };
                serde_json::json!({
                    "bdf": v.bdf,
                    "sysfs": v.sysfs.display().to_string(),
                    "vendor": v.vendor,
                    "device": v.device,
                    "driver": v.driver,
                    "group": v.group,
                    "access": access,
                    "node": node,
                    "how": v.access.describe(),
                })
            })
            .collect();
        let nodes: Vec<String> = d.nodes.iter().map(|n| n.display().to_string()).collect();
        let out = serde_json::json!({
            "vfio_dir": d.vfio_dir,
            "nodes": nodes,
            "devices": devices,
            "notes": d.notes,
        });
        println!("{out}");
        return;
    }
    let vfio = args.dev_dir.join("vfio");
    if !d.vfio_dir {
        println!("{}: absent (vfio not loaded)", vfio.display());
    } else if d.nodes.is_empty() {
        println!("{}: no groups and no cdevs", vfio.display());
    }
    for v in &d.devices {
        println!("{}: {}", v.describe(), v.access.describe());
    }
    for n in &d.notes {
        println!("note: {n}");
    }
}

/// A report read back from its JSON; only this version's reports are accepted, since the
/// meaning of fields changes with the version.
fn saved(path: &Path) -> Result<Report, ProbeError> {
    let text = std::fs::read_to_string(path).map_err(|source| ProbeError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let version = serde_json::from_str::<serde_json::Value>(&text)?["version"].as_u64();
    if version != Some(u64::from(REPORT_VERSION)) {
        return Err(ProbeError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    Ok(serde_json::from_str(&text)?)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.lab_init {
        lab_init::run_as_init();
    }
    if args.vfio_selftest {
        let bad = vmm_probe::vfio::selftest::run(Path::new("/sys"), &mut std::io::stdout().lock());
        return if bad == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let result = if args.discover_vfio {
        discover_vfio(&args);
        Ok(())
    } else if args.in_guest {
        in_guest_main(args)
    } else {
        main_inner(args).map_err(|e| e.to_string())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
