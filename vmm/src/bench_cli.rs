//! `vmm bench ...` arguments and output.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use micro_guest::Pattern;
use vmm::bench::{self, tracking::TrackingBench};
use vmm::tracking::TrackerKind;

#[derive(Args)]
pub struct TrackingArgs {
    /// Backends to compare (comma-separated); default: all. Unsupported ones are listed with
    /// the reason.
    #[arg(long, value_delimiter = ',')]
    backends: Vec<String>,
    /// Micro guest region sizes in MiB (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [64u64, 256])]
    sizes: Vec<u64>,
    /// Micro guest patterns (comma-separated): sweep, random, hotset, sparse.
    #[arg(long, value_delimiter = ',', default_values_t = ["sweep".to_string(), "random".to_string(), "hotset".to_string(), "sparse".to_string()])]
    patterns: Vec<String>,
    /// Passes per run (harvest rounds; the first is not timed).
    #[arg(long, default_value_t = 8)]
    passes: u64,
    /// Runs per (workload, backend); figures are medians.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Write an SVG chart (slowdown and harvest cost per backend) to this file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn tracking(a: TrackingArgs) -> Result<i32> {
    let backends = if a.backends.is_empty() {
        TrackerKind::ALL.to_vec()
    } else {
        a.backends
            .iter()
            .map(|b| b.parse::<TrackerKind>())
            .collect::<Result<_, _>>()?
    };
    let patterns = a
        .patterns
        .iter()
        .map(|p| p.parse::<Pattern>())
        .collect::<Result<_, _>>()?;
    if a.sizes.iter().any(|&s| s == 0 || s > 2048) {
        anyhow::bail!("--sizes: each size must be between 1 and 2048 MiB");
    }
    let b = TrackingBench {
        backends,
        runs: a.runs,
        sizes_mib: a.sizes,
        patterns,
        passes: a.passes,
        progress: !a.quiet && !a.json,
    };
    let report = bench::tracking::run(&b)?;
    let json = bench::to_json(&report);
    if let Some(path) = &a.json_out {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.svg {
        let svg = bench::render_svg(&report)?;
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{json}");
    } else {
        print!("{}", bench::render_table(&report));
    }
    Ok(0)
}
