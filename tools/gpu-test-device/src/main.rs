//! `vmm-gpu-test-device`: a GPU-shaped PCI device served over vfio-user.
//!
//! It stands in for a GPU in every passthrough test: registers and an MSI-X table in BAR0, a
//! large mmappable VRAM BAR, a DMA engine and a page writer that write guest RAM through its
//! own mapping of the client's memory (so KVM never sees those writes), a VRAM kernel, and an
//! interrupt on completion. README.md documents the register map and the lifecycle.

mod config_space;
mod device;
mod dirty_log;
mod dma;
mod engines;
mod memory;
mod migration;
mod registers;
mod socket;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use gpu_test_device::pci;
use vfio_user::Server;

use crate::config_space::Identity;
use crate::device::Device;

/// Smallest and largest VRAM: a page (the BAR must be mmappable) and 1 TiB.
const VRAM_MIN: u64 = 4096;
const VRAM_MAX: u64 = 1 << 40;

#[derive(Debug, Parser)]
#[command(name = "vmm-gpu-test-device", version, about)]
struct Args {
    /// Unix socket to listen on. Must not exist, or be a stale socket (no listener).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// VRAM BAR size: a power of two, bytes or with a K/M/G/T suffix (sparse memfd).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_vram_size)]
    vram_size: u64,
    /// PCI vendor id (0x1234: see README.md).
    #[arg(long, value_name = "ID", default_value = "0x1234", value_parser = parse_id)]
    vendor: u16,
    /// PCI device id.
    #[arg(long, value_name = "ID", default_value = "0x7e57", value_parser = parse_id)]
    device: u16,
    /// MSI-X vectors (1 to 128).
    #[arg(long, value_name = "N", default_value_t = pci::DEFAULT_MSIX_VECTORS,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(pci::MAX_MSIX_VECTORS)))]
    msix_vectors: u16,
    /// Print one JSON line on stdout once the socket is listening.
    #[arg(long)]
    json: bool,
    /// Exit (status 0) when the first client disconnects, instead of waiting for the next.
    #[arg(long)]
    once: bool,
    /// Answer the migration features with ENOTSUP, as a device without migration support.
    #[arg(long)]
    no_migration: bool,
    /// Fault injection for tests: exit (status 3, no reply) when asked to enter this migration
    /// state: stop, running, stop-copy, resuming or pre-copy.
    #[arg(long, value_name = "STATE", value_parser = parse_state)]
    crash_at: Option<u32>,
}

fn parse_state(text: &str) -> Result<u32, String> {
    device::states_by_name(text).ok_or_else(|| {
        format!("unknown state {text:?} (stop, running, stop-copy, resuming or pre-copy)")
    })
}

fn parse_vram_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((at, 'K' | 'k')) => (&text[..at], 10),
        Some((at, 'M' | 'm')) => (&text[..at], 20),
        Some((at, 'G' | 'g')) => (&text[..at], 30),
        Some((at, 'T' | 't')) => (&text[..at], 40),
        _ => (text, 0),
    };
    let size = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("not a size: {text:?} (bytes, or a number with K, M, G or T)"))?;
    if !size.is_power_of_two() || !(VRAM_MIN..=VRAM_MAX).contains(&size) {
        return Err(format!(
            "VRAM size must be a power of two from 4K to 1T (a BAR's size), got {size} bytes"
        ));
    }
    Ok(size)
}

fn parse_id(text: &str) -> Result<u16, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16),
        None => text.parse(),
    };
    match parsed {
        Ok(0xffff) => Err("0xffff means \"no device\" in PCI".to_string()),
        Ok(id) => Ok(id),
        Err(e) => Err(format!("not a 16-bit id: {text:?} ({e})")),
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let identity = Identity {
        vendor_id: args.vendor,
        device_id: args.device,
        msix_vectors: args.msix_vectors,
        vram_size: args.vram_size,
    };
    let mut device = Device::new(identity, !args.no_migration).context("creating the device")?;
    device.crash_at(args.crash_at);
    let (listener, _socket_file) = socket::bind(&args.socket)?;
    let server = Server::from_owned_fd(
        OwnedFd::from(listener),
        true,
        device.irq_infos(),
        device.server_regions(),
    );

    if args.json {
        let status = serde_json::json!({
            "ready": true,
            "socket": args.socket,
            "pid": std::process::id(),
            "vendor_id": format!("{:#06x}", args.vendor),
            "device_id": format!("{:#06x}", args.device),
            "vram_size": args.vram_size,
            "msix_vectors": args.msix_vectors,
            "migration": !args.no_migration,
        });
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{status}").context("writing the status line")?;
        stdout.flush().context("writing the status line")?;
    } else {
        eprintln!(
            "vmm-gpu-test-device: listening on {}",
            args.socket.display()
        );
    }

    loop {
        let outcome = server.run(&mut device);
        device.disconnect();
        match outcome {
            Ok(()) => eprintln!("vmm-gpu-test-device: client disconnected"),
            Err(vfio_user::Error::SocketAccept(e)) => {
                return Err(e).context("accepting a client");
            }
            Err(e) => eprintln!("vmm-gpu-test-device: client connection ended: {e}"),
        }
        if args.once {
            return Ok(());
        }
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("vmm-gpu-test-device: {error:#}");
            ExitCode::FAILURE
        }
    }
}
