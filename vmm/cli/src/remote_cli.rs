//! `vmm remote ...` (the control API's client) and `vmm run --incoming` (a migration's
//! destination).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;
use vmm::api::client::Client;
use vmm::api::{MigrateParams, Request, SnapshotParams};
use vmm::machine::description::Constraints;
use vmm::machine::ConsoleOutput;
use vmm::memory::parse_size;
use vmm::migration::dest::{run_incoming, IncomingOptions};
use vmm::migration::parse_tcp_url;

use crate::{parse_disk, print_report, RunArgs};

#[derive(Args)]
pub struct RemoteArgs {
    /// The VM's API socket (vmm run --api-socket PATH).
    #[arg(long)]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: RemoteCommand,
}

#[derive(Subcommand)]
enum RemoteCommand {
    /// Show the VM's state (running, paused, migrating, migrated) and migration progress.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Pause every vCPU.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Micro guest: end every vCPU after N more passes than the furthest one has run (its pass
    /// now + N), and check the run against the model of that many passes. Prints the budget.
    Finish {
        /// Passes to run beyond the furthest vCPU's current pass (at least 1).
        #[arg(long)]
        after: u64,
        #[arg(long)]
        json: bool,
    },
    /// Type a line on the guest console (a newline is added).
    Console { text: String },
    /// Write a snapshot (state + memory) into a directory; `vmm restore DIR` brings it back.
    Snapshot {
        #[command(flatten)]
        params: SnapshotParams,
        #[arg(long)]
        json: bool,
    },
    /// Live-migrate the VM to a destination started with `vmm run --incoming tcp://ADDR:PORT`.
    /// Prints the metrics when done; the source VM exits after a successful migration.
    Migrate {
        #[command(flatten)]
        params: Box<MigrateParams>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn remote(a: RemoteArgs) -> Result<i32> {
    // The request is checked (a migration's credentials chosen) before the VM is reached.
    let (req, json) = match a.command {
        RemoteCommand::Status { json } => (Request::Status, json),
        RemoteCommand::Pause => (Request::Pause, false),
        RemoteCommand::Resume => (Request::Resume, false),
        RemoteCommand::Finish { after, json } => (Request::Finish { after }, json),
        RemoteCommand::Console { text } => (Request::Console { input: text }, false),
        RemoteCommand::Snapshot { mut params, json } => {
            params.to = absolute(params.to)?;
            (Request::Snapshot(params), json)
        }
        RemoteCommand::Migrate { mut params, json } => {
            parse_tcp_url(&params.to)?;
            // The VMM reads the credential files, perhaps from another directory.
            params.transport.absolute(&std::env::current_dir()?);
            params.options()?;
            params.dump_memory = params.dump_memory.map(absolute).transpose()?;
            (Request::Migrate(params), json)
        }
    };
    let mut client = Client::connect(&a.api_socket)?;
    let migrating = matches!(req, Request::Migrate(_));
    let bar = migrating.then(|| progress_bar(a.api_socket.clone()));
    let reply = client.call(&req);
    if let Some((stop, handle)) = bar {
        stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = handle.join();
    }
    let reply = reply?;
    let ok = reply.get("ok").and_then(Value::as_bool).unwrap_or(false);
    if json || (!migrating && matches!(req, Request::Status)) {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else if let Some(report) = reply.get("report").filter(|r| !r.is_null()) {
        print_migration(report);
    } else if let Some(t) = reply.get("passes").and_then(Value::as_u64) {
        eprintln!("vmm: the micro guest ends after pass {t}");
    } else if let Some(s) = reply.get("snapshot") {
        let f = |k: &str| s.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        eprintln!(
            "vmm: snapshot in {}: {} data pages of {} MiB, guest paused {:.1} ms",
            s.get("dir").and_then(Value::as_str).unwrap_or("?"),
            f("data_pages"),
            f("mem_mib"),
            f("paused_ms")
        );
    }
    if !ok {
        let err = reply
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("the VM refused the request");
        eprintln!("vmm: error: {err}");
        return Ok(1);
    }
    Ok(0)
}

fn absolute(p: PathBuf) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p);
    }
    Ok(std::env::current_dir()?.join(p))
}

fn print_migration(r: &Value) {
    let f = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let u = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
    println!(
        "migration {} ({}, {}): total {:.1} ms, downtime {:.1} ms, {:.1} MiB sent, {} rounds, {:.1} MiB/s",
        if r.get("ok").and_then(Value::as_bool) == Some(true) { "done" } else { "FAILED" },
        r.get("mode").and_then(Value::as_str).unwrap_or("?"),
        r.get("transport").and_then(Value::as_str).unwrap_or("?"),
        f("total_ms"),
        f("downtime_ms"),
        u("bytes") as f64 / (1 << 20) as f64,
        u("rounds"),
        f("throughput_mib_s"),
    );
    if let Some(p) = r.get("pages_per_round").and_then(Value::as_array) {
        println!("  pages per round: {}", Value::Array(p.clone()));
    }
    if let Some(s) = r.get("switchover").and_then(Value::as_str) {
        println!("  switchover: {s}");
    }
    if let Some(pc) = r.get("postcopy").filter(|p| !p.is_null()) {
        let lat = pc.get("latency_us").cloned().unwrap_or(Value::Null);
        println!(
            "  postcopy: {} faults, {} pages requested, {} pushed; fault latency (us) {}",
            pc.get("faults").and_then(Value::as_u64).unwrap_or(0),
            pc.get("requested_pages")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            pc.get("pushed_pages").and_then(Value::as_u64).unwrap_or(0),
            lat
        );
    }
}

/// Polls `status` on a second connection and draws a progress bar until `stop`.
fn progress_bar(
    socket: PathBuf,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let handle = std::thread::spawn(move || {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let Ok(mut c) = Client::connect(&socket) else {
            return;
        };
        while !s.load(std::sync::atomic::Ordering::Acquire) {
            if let Ok(v) = c.call(&Request::Status) {
                let m = &v["migration"];
                let ram = m["ram_bytes"].as_u64().unwrap_or(0);
                let bytes = m["bytes"].as_u64().unwrap_or(0);
                bar.set_length(ram.max(bytes));
                bar.set_position(bytes);
                bar.set_message(format!(
                    "{} round {} ({} pages left)",
                    m["phase"].as_str().unwrap_or("?"),
                    m["round"],
                    m["remaining_pages"]
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bar.finish_and_clear();
    });
    (stop, handle)
}

/// `vmm run --incoming tcp://ADDR:PORT`.
pub fn incoming(a: &RunArgs, start: Instant) -> Result<i32> {
    let url = a.incoming.as_deref().unwrap_or_default();
    let listen = parse_tcp_url(url).context("--incoming")?;
    let transport =
        vmm::migration::tls::Transport::choose(&a.transport, a.tls_authz.as_deref(), None)?;
    let console: ConsoleOutput = a
        .console
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--console: {e}"))?;
    let mem_bytes = match &a.mem {
        Some(m) => Some(parse_size(m).map_err(|e| anyhow::anyhow!("--mem: {e}"))?),
        None => None,
    };
    if a.track.is_some() || !a.track_schedule.is_empty() {
        bail!("--track cannot be combined with --incoming (start tracking on the destination after the migration)");
    }
    let disks = a
        .disk
        .iter()
        .map(|d| parse_disk(d))
        .collect::<Result<Vec<_>>>()?;
    let opts = IncomingOptions {
        listen,
        console_input: !a.no_console_input && console == ConsoleOutput::Stdout,
        console,
        api_socket: a.api_socket.clone(),
        constraints: Constraints {
            mem_bytes,
            vcpus: a.vcpus,
            disks,
            devices: a.device.clone(),
            // A Hello is the peer's word: disks come from this command line only.
            local_description: false,
        },
        dump_memory: a.dump_memory.clone(),
        dump_final: a.dump_final.clone(),
        demand: vmm::migration::postcopy_dst::Demand {
            backend: a.demand,
            chunk: crate::restore_cli::parse_chunk(&a.demand_chunk)?,
            ..Default::default()
        },
        transport,
    };
    let report = run_incoming(&opts, start)?;
    print_report(&report, a.json)?;
    Ok(report.exit_code)
}

/// `vmm snapshot --api-socket PATH --to DIR`: the same as `vmm remote ... snapshot`.
pub fn snapshot(api_socket: PathBuf, params: SnapshotParams, json: bool) -> Result<i32> {
    remote(RemoteArgs {
        api_socket,
        command: RemoteCommand::Snapshot { params, json },
    })
}
