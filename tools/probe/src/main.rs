//! `vmm-probe [--json] [--markdown PATH]`: runs every mechanism on every memory kind here.
//! Exit 0 whatever the mechanisms did (that is the data); 1 only if the probe could not run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm_probe::{render, run, ProbeError, ProbeOpts};

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
}

fn main_inner(args: Args) -> Result<(), ProbeError> {
    let opts = ProbeOpts {
        file_dir: args.file_dir,
        ..ProbeOpts::default()
    };
    let report = run(&opts)?;
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

fn main() -> ExitCode {
    match main_inner(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
