//! The printed tables: the Linux guest's migrations, where vmm's downtime went and what the
//! device costs, and the stream scenario. Apart from the medians they print because their
//! layout (column widths, the notes under each table) changes for readers, not for the data.

use super::{StreamSummary, Summary};
use crate::sample::{DowntimeParts, Tool};
use crate::PLACEMENT;

/// A median in a table: `prec` decimals, or "-" where there is none, so that columns line up.
fn cell(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".to_string(), |x| format!("{x:.prec$}"))
}

pub(crate) fn print_table(s: &Summary) {
    println!(
        "live migration, host {} ({}), medians of {} run(s) per row",
        s.host,
        if s.host == "pvm" {
            "PVM: software nested virtualization, guest kernel emulated; not hardware KVM timings"
        } else {
            "hardware KVM"
        },
        s.runs
    );
    let linux = !s.groups.is_empty() || !s.samples.is_empty();
    if linux {
        println!(
            "guest {} MiB, {} vCPU, agent '{}', downtime target {} ms; {}",
            s.mem_mib, s.vcpus, s.agent, s.downtime_target_ms, PLACEMENT
        );
    } else {
        println!("{PLACEMENT}");
    }
    if let Some(q) = &s.qemu {
        println!("qemu: {q}");
    }
    if let Some(v) = &s.vmm {
        println!("vmm: {v} (tracker {})", s.tracker);
    }
    if let Some(d) = &s.device {
        println!(
            "vmm+gpu: {} passed through over vfio-user ({} MiB VRAM), its page writer stamping {} \
             pages/s into guest RAM; agent '{}'",
            d.server, d.vram_mib, d.dma_pages_s, d.agent
        );
    }
    let b = &s.baseline;
    println!(
        "baseline a->b: TCP {} MiB/s ({} MiB, one connection); 4 KiB ping-pong RTT p50 {} us, p99 {} us",
        cell(b.tcp_mib_s, 0),
        b.tcp_mib,
        cell(b.rtt_p50_us, 1),
        cell(b.rtt_p99_us, 1)
    );
    if linux {
        print_linux_table(s);
    }
    if let Some(stream) = &s.stream {
        print_stream_table(stream);
    }
}

/// The Linux guest's migrations: per tool and mode, the comparisons, what failed.
fn print_linux_table(s: &Summary) {
    println!();
    println!(
        "{:<7} {:<9} {:>5} {:>9} {:>9} {:>9} {:>8} {:>7} {:>6} {:>6} {:>7} {:>8} {:>7}",
        "tool",
        "mode",
        "ok",
        "total ms",
        "down ms",
        "wall ms",
        "MiB sent",
        "MiB/s",
        "/TCP",
        "rounds",
        "faults",
        "fault us",
        "/RTT"
    );
    for g in &s.groups {
        let mode = if g.mode.uses_postcopy() && g.ok > 0 && g.postcopy_entered < g.ok {
            format!("{}*", g.mode.name())
        } else {
            g.mode.name().to_string()
        };
        println!(
            "{:<7} {:<9} {:>5} {:>9} {:>9} {:>9} {:>8} {:>7} {:>6} {:>6} {:>7} {:>8} {:>7}",
            g.tool.name(),
            mode,
            format!("{}/{}", g.ok, g.runs),
            cell(g.total_ms, 0),
            cell(g.downtime_ms, 0),
            cell(g.wall_ms, 0),
            cell(g.mib_sent, 1),
            cell(g.throughput_mib_s, 0),
            cell(g.throughput_vs_tcp, 3),
            cell(g.rounds, 0),
            cell(g.postcopy_faults, 0),
            cell(g.fault_us, 0),
            cell(g.fault_vs_rtt, 1),
        );
    }
    println!();
    for c in &s.comparisons {
        println!(
            "vmm/qemu {:<9} downtime {}  total {}",
            c.mode.name(),
            cell(c.downtime_vmm_over_qemu, 3),
            cell(c.total_vmm_over_qemu, 3)
        );
    }
    print_device_table(s);
    for c in &s.tls_comparisons {
        println!(
            "TLS cost {:<9} throughput plain TCP {} MiB/s, TLS (PSK) {} MiB/s, TLS/plain {}; \
             total {} / {} ms, downtime {} / {} ms",
            c.mode.name(),
            cell(c.plain_mib_s, 0),
            cell(c.tls_mib_s, 0),
            cell(c.tls_over_plain, 3),
            cell(c.plain_total_ms, 0),
            cell(c.tls_total_ms, 0),
            cell(c.plain_downtime_ms, 0),
            cell(c.tls_downtime_ms, 0),
        );
    }
    for k in &s.skipped {
        println!("skipped {} {}: {}", k.tool.name(), k.mode.name(), k.reason);
    }
    println!(
        "ok: migrated and the destination agent's workload-verify said ok=true (vmm+gpu: and so"
    );
    println!("did stopping the page writer, which checks every stamp it wrote). total/down: as");
    println!("each tool reports them; wall: migrate command to completion, timed by this bench.");
    println!(
        "fault us: vmm's postcopy fault p50; for QEMU, postcopy-blocktime / requested pages (a"
    );
    println!(
        "mean: QEMU 7.2 reports no per-fault latency). * = some runs finished before postcopy."
    );
    for sample in s.samples.iter().filter(|s| !s.ok) {
        println!(
            "FAILED {} {} run {}: {}",
            sample.tool.name(),
            sample.mode.name(),
            sample.run,
            sample.error.as_deref().unwrap_or("?")
        );
    }
}

/// Where vmm's downtime went, per tool and mode, and the device comparison (vmm without and
/// with the device) when vmm+gpu ran.
pub(crate) fn print_device_table(s: &Summary) {
    let with_device =
        !s.device_comparisons.is_empty() || s.groups.iter().any(|g| g.tool == Tool::VmmGpu);
    let with_parts = s
        .groups
        .iter()
        .any(|g| g.tool.is_vmm() && g.downtime_parts.is_some());
    if !with_device && !with_parts {
        return;
    }
    println!();
    if with_device {
        println!(
            "downtime parts, and vmm without and with the test device passed through (medians, ms \
             unless named)"
        );
    } else {
        println!("downtime parts: where vmm's downtime went (medians, ms)");
    }
    println!(
        "{:<7} {:<8} {:>5} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7} {:>7} {:>9} {:>9} {:>6} {:>7}",
        "tool",
        "mode",
        "ok",
        "total",
        "down",
        "pause",
        "devstp",
        "harv",
        "capt",
        "pages",
        "devdat",
        "state",
        "confirm",
        "dstrest",
        "dev pre B",
        "dev stop B",
        "dma pg",
        "log ms/r"
    );
    for g in s.groups.iter().filter(|g| g.tool.is_vmm()) {
        let p = g.downtime_parts.as_ref();
        let d = g.device.as_ref();
        let pp = |f: fn(&DowntimeParts) -> f64| p.map(f);
        println!(
            "{:<7} {:<8} {:>5} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7} {:>7} {:>9} {:>9} {:>6} {:>7}",
            g.tool.name(),
            g.mode.name(),
            format!("{}/{}", g.ok, g.runs),
            cell(g.total_ms, 1),
            cell(g.downtime_ms, 1),
            cell(pp(|p| p.pause_ms), 2),
            cell(pp(|p| p.device_stop_ms), 2),
            cell(pp(|p| p.harvest_ms), 2),
            cell(pp(|p| p.capture_ms), 2),
            cell(pp(|p| p.final_pages_ms), 2),
            cell(pp(|p| p.device_data_ms), 2),
            cell(pp(|p| p.state_ms), 2),
            cell(pp(|p| p.confirm_ms), 2),
            cell(pp(|p| p.destination_restore_ms), 2),
            cell(d.and_then(|d| d.precopy_bytes), 0),
            cell(d.and_then(|d| d.stop_copy_bytes), 0),
            cell(d.and_then(|d| d.dma_pages), 0),
            cell(d.and_then(|d| d.dma_harvest_ms_per_round), 2),
        );
    }
    for c in &s.device_comparisons {
        println!(
            "vmm+gpu/vmm {:<8} downtime {} ({} -> {} ms)  total {} ({} -> {} ms)",
            c.mode.name(),
            cell(c.downtime_with_over_without, 2),
            cell(c.downtime_without_ms, 1),
            cell(c.downtime_with_ms, 1),
            cell(c.total_with_over_without, 2),
            cell(c.total_without_ms, 1),
            cell(c.total_with_ms, 1),
        );
    }
    for line in [
        "downtime parts (precopy only; hybrid's source reports none): pause; devstp: devices to",
        "STOP_COPY; pages: the last dirty pages sent; devdat: the devices' stop-copy data sent;",
        "state; confirm: until the destination said it runs. dev pre/stop B: device data sent in",
        "precopy rounds / in the downtime. dma pg: pages the device's DMA log reported over the",
        "migration; log ms/r: DMA-log harvest cost per round (ms).",
    ] {
        println!("{line}");
    }
}

pub(crate) fn print_stream_table(s: &StreamSummary) {
    println!();
    println!(
        "stream (micro guest, {} MiB swept, paused): {} MiB guest, every page of the region \
         stamped (non-zero), paused, then precopy",
        s.region_mib, s.mem_mib
    );
    println!(
        "raw TCP a->b {} MiB/s (median, {} MiB, one connection, same run)",
        cell(s.tcp_mib_s, 0),
        s.tcp_mib
    );
    println!(
        "{:<8} {:>5} {:>9} {:>9} {:>9} {:>8} {:>7} {:>6} {:>9} {:>7} {:>9} {:>9} {:>7}",
        "tool",
        "ok",
        "MiB sent",
        "total ms",
        "down ms",
        "wall ms",
        "MiB/s",
        "/TCP",
        "TLS/plain",
        "adj TCP",
        "/adj TCP",
        "fresh TCP",
        "/fresh"
    );
    for g in &s.groups {
        println!(
            "{:<8} {:>5} {:>9} {:>9} {:>9} {:>8} {:>7} {:>6} {:>9} {:>7} {:>9} {:>9} {:>7}",
            g.tool.name(),
            format!("{}/{}", g.ok, g.runs),
            cell(g.mib_sent, 1),
            cell(g.total_ms, 0),
            cell(g.downtime_ms, 1),
            cell(g.wall_ms, 0),
            cell(g.throughput_mib_s, 0),
            cell(g.throughput_vs_tcp, 3),
            if g.tool == Tool::VmmTls {
                cell(s.tls_over_plain, 3)
            } else {
                "-".into()
            },
            cell(g.adjacent_tcp_mib_s, 0),
            cell(g.throughput_vs_adjacent_tcp, 3),
            cell(g.adjacent_tcp_fresh_mib_s, 0),
            cell(g.throughput_vs_adjacent_tcp_fresh, 3),
        );
    }
    println!(
        "MiB/s: MiB sent / vmm's total_ms, median; /TCP: that over the raw TCP median above; adj"
    );
    println!(
        "TCP: a raw TCP copy ({} MiB) timed just before each migration, both VMs paused (median);",
        s.tcp_mib
    );
    println!(
        "/adj TCP: median of each migration's MiB/s over its own copy. fresh TCP, /fresh: the"
    );
    println!(
        "same with the receiver writing into a fresh memfd, as a destination writes guest RAM."
    );
    println!("ok: the destination's micro guest ran on and its memory check found no page wrong.");
    for k in &s.skipped {
        println!("stream: skipped {}: {}", k.tool.name(), k.reason);
    }
    for sample in s.samples.iter().filter(|s| !s.ok) {
        println!(
            "FAILED stream {} run {}: {}",
            sample.tool.name(),
            sample.run,
            sample.error.as_deref().unwrap_or("?")
        );
    }
}
