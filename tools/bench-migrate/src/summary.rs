//! The run's results: medians per tool and mode, the vmm/QEMU and device comparisons, the
//! printed tables and the chart's input.

use serde::Serialize;

use super::sample::{DowntimeParts, Mode, Sample, Tool};
use super::stats::{median, ratio};
use super::*;
#[derive(Serialize)]
pub(crate) struct Group {
    pub(crate) tool: Tool,
    pub(crate) mode: Mode,
    pub(crate) runs: usize,
    pub(crate) ok: usize,
    /// How many of the ok runs really ran in postcopy.
    pub(crate) postcopy_entered: usize,
    pub(crate) total_ms: Option<f64>,
    pub(crate) downtime_ms: Option<f64>,
    pub(crate) tool_downtime_ms: Option<f64>,
    pub(crate) wall_ms: Option<f64>,
    pub(crate) mib_sent: Option<f64>,
    pub(crate) throughput_mib_s: Option<f64>,
    /// Migration throughput / raw TCP throughput.
    pub(crate) throughput_vs_tcp: Option<f64>,
    pub(crate) rounds: Option<f64>,
    pub(crate) postcopy_faults: Option<f64>,
    /// vmm: p50 fault latency; QEMU: blocktime / requested pages (a mean, QEMU 7.2 has no
    /// per-fault figure).
    pub(crate) fault_us: Option<f64>,
    pub(crate) fault_p99_us: Option<f64>,
    /// fault_us / TCP 4 KiB round trip p50.
    pub(crate) fault_vs_rtt: Option<f64>,
    pub(crate) blocktime_ms: Option<f64>,
    /// vmm: medians of each downtime part (precopy only; hybrid's source reports none).
    pub(crate) downtime_parts: Option<DowntimeParts>,
    /// vmm+gpu: medians of the device's figures.
    pub(crate) device: Option<DeviceMedians>,
}

#[derive(Serialize)]
pub(crate) struct DeviceMedians {
    pub(crate) precopy_bytes: Option<f64>,
    pub(crate) stop_copy_bytes: Option<f64>,
    pub(crate) dma_pages: Option<f64>,
    pub(crate) dma_harvests: Option<f64>,
    pub(crate) dma_harvest_ms_per_round: Option<f64>,
    pub(crate) dirty: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct Comparison {
    pub(crate) mode: Mode,
    pub(crate) downtime_vmm_over_qemu: Option<f64>,
    pub(crate) total_vmm_over_qemu: Option<f64>,
}

/// vmm with the device against vmm without it, same mode, same run of the bench.
#[derive(Serialize)]
pub(crate) struct DeviceComparison {
    pub(crate) mode: Mode,
    pub(crate) downtime_without_ms: Option<f64>,
    pub(crate) downtime_with_ms: Option<f64>,
    pub(crate) downtime_with_over_without: Option<f64>,
    pub(crate) total_without_ms: Option<f64>,
    pub(crate) total_with_ms: Option<f64>,
    pub(crate) total_with_over_without: Option<f64>,
}

/// vmm over TLS (pre-shared key) against vmm over plain TCP, same mode, same run of the bench.
#[derive(Serialize)]
pub(crate) struct TlsComparison {
    pub(crate) mode: Mode,
    pub(crate) plain_mib_s: Option<f64>,
    pub(crate) tls_mib_s: Option<f64>,
    /// TLS throughput / plain TCP throughput (below 1: what TLS costs).
    pub(crate) tls_over_plain: Option<f64>,
    pub(crate) plain_total_ms: Option<f64>,
    pub(crate) tls_total_ms: Option<f64>,
    pub(crate) plain_downtime_ms: Option<f64>,
    pub(crate) tls_downtime_ms: Option<f64>,
}

pub(crate) fn tls_comparisons(groups: &[Group], modes: &[Mode]) -> Vec<TlsComparison> {
    let find = |tool, mode| groups.iter().find(|g| g.tool == tool && g.mode == mode);
    modes
        .iter()
        .filter_map(|&mode| {
            let (plain, tls) = (find(Tool::Vmm, mode)?, find(Tool::VmmTls, mode)?);
            Some(TlsComparison {
                mode,
                plain_mib_s: plain.throughput_mib_s,
                tls_mib_s: tls.throughput_mib_s,
                tls_over_plain: ratio(tls.throughput_mib_s, plain.throughput_mib_s),
                plain_total_ms: plain.total_ms,
                tls_total_ms: tls.total_ms,
                plain_downtime_ms: plain.downtime_ms,
                tls_downtime_ms: tls.downtime_ms,
            })
        })
        .collect()
}

/// A tool and mode not run, and why.
#[derive(Serialize)]
pub(crate) struct Skipped {
    pub(crate) tool: Tool,
    pub(crate) mode: Mode,
    pub(crate) reason: &'static str,
}

#[derive(Serialize)]
pub(crate) struct BaselineSummary {
    pub(crate) tcp_mib: u64,
    pub(crate) tcp_mib_s: Option<f64>,
    pub(crate) rtt_p50_us: Option<f64>,
    pub(crate) rtt_p99_us: Option<f64>,
    pub(crate) runs: Vec<baseline::Baseline>,
}

#[derive(Serialize)]
pub(crate) struct Summary {
    pub(crate) host: &'static str,
    pub(crate) placement: &'static str,
    pub(crate) qemu: Option<String>,
    pub(crate) vmm: Option<String>,
    pub(crate) runs: usize,
    pub(crate) mem_mib: u64,
    pub(crate) vcpus: u32,
    pub(crate) agent: String,
    pub(crate) downtime_target_ms: u64,
    pub(crate) tracker: String,
    /// vmm+gpu's device (absent when not measured).
    pub(crate) device: Option<DeviceSummary>,
    pub(crate) baseline: BaselineSummary,
    pub(crate) groups: Vec<Group>,
    pub(crate) comparisons: Vec<Comparison>,
    pub(crate) device_comparisons: Vec<DeviceComparison>,
    pub(crate) tls_comparisons: Vec<TlsComparison>,
    pub(crate) skipped: Vec<Skipped>,
    pub(crate) samples: Vec<Sample>,
    /// `--stream-mib`: the paused micro guest's stream against raw TCP (absent when not run).
    pub(crate) stream: Option<StreamSummary>,
}

#[derive(Serialize)]
pub(crate) struct DeviceSummary {
    pub(crate) server: String,
    pub(crate) vram_mib: u64,
    pub(crate) dma_pages_s: u64,
    pub(crate) agent: String,
}

pub(crate) fn summarize(
    samples: &[Sample],
    baselines: &[baseline::Baseline],
    tools: &[Tool],
    modes: &[Mode],
) -> (
    BaselineSummary,
    Vec<Group>,
    Vec<Comparison>,
    Vec<DeviceComparison>,
) {
    let tcp = median(baselines.iter().map(|b| b.tcp_mib_s));
    let rtt = median(baselines.iter().map(|b| b.rtt_p50_us));
    let base = BaselineSummary {
        tcp_mib: baselines.first().map_or(0, |b| b.tcp_mib),
        tcp_mib_s: tcp,
        rtt_p50_us: rtt,
        rtt_p99_us: median(baselines.iter().map(|b| b.rtt_p99_us)),
        runs: baselines.to_vec(),
    };
    let mut groups = Vec::new();
    for &mode in modes {
        for &tool in tools.iter().filter(|t| t.refuses(mode).is_none()) {
            let all: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.tool == tool && s.mode == mode)
                .collect();
            let ok: Vec<&Sample> = all.iter().copied().filter(|s| s.ok).collect();
            let med = |f: &dyn Fn(&Sample) -> Option<f64>| median(ok.iter().filter_map(|s| f(s)));
            let throughput = med(&|s| s.throughput_mib_s());
            let fault = med(&|s| s.fault_p50_us());
            let part = |f: fn(&DowntimeParts) -> f64| {
                median(ok.iter().filter_map(|s| s.downtime_parts.as_ref().map(f)))
            };
            let downtime_parts =
                ok.iter()
                    .any(|s| s.downtime_parts.is_some())
                    .then(|| DowntimeParts {
                        pause_ms: part(|p| p.pause_ms).unwrap_or(0.0),
                        device_stop_ms: part(|p| p.device_stop_ms).unwrap_or(0.0),
                        harvest_ms: part(|p| p.harvest_ms).unwrap_or(0.0),
                        capture_ms: part(|p| p.capture_ms).unwrap_or(0.0),
                        final_pages_ms: part(|p| p.final_pages_ms).unwrap_or(0.0),
                        device_data_ms: part(|p| p.device_data_ms).unwrap_or(0.0),
                        state_ms: part(|p| p.state_ms).unwrap_or(0.0),
                        confirm_ms: part(|p| p.confirm_ms).unwrap_or(0.0),
                        destination_restore_ms: part(|p| p.destination_restore_ms).unwrap_or(0.0),
                    });
            let dev = |f: &dyn Fn(&sample::DeviceStats) -> f64| {
                median(ok.iter().filter_map(|s| s.device.as_ref().map(f)))
            };
            let device = ok
                .iter()
                .any(|s| s.device.is_some())
                .then(|| DeviceMedians {
                    precopy_bytes: dev(&|d| d.precopy_bytes as f64),
                    stop_copy_bytes: dev(&|d| d.stop_copy_bytes as f64),
                    dma_pages: dev(&|d| d.dma_pages as f64),
                    dma_harvests: dev(&|d| d.dma_harvests as f64),
                    dma_harvest_ms_per_round: dev(&|d| d.dma_harvest_ms_per_round),
                    dirty: ok
                        .iter()
                        .find_map(|s| s.device.as_ref().map(|d| d.dirty.clone())),
                });
            groups.push(Group {
                tool,
                mode,
                runs: all.len(),
                ok: ok.len(),
                postcopy_entered: ok
                    .iter()
                    .filter(|s| s.postcopy_entered == Some(true))
                    .count(),
                total_ms: med(&|s| s.total_ms),
                downtime_ms: med(&|s| s.downtime_ms),
                tool_downtime_ms: med(&|s| s.tool_downtime_ms),
                wall_ms: med(&|s| s.wall_ms),
                mib_sent: med(&|s| s.bytes.map(|b| b as f64 / (1 << 20) as f64)),
                throughput_mib_s: throughput,
                throughput_vs_tcp: ratio(throughput, tcp),
                rounds: med(&|s| s.rounds.map(|r| r as f64)),
                postcopy_faults: med(&|s| s.postcopy_faults.map(|r| r as f64)),
                fault_us: fault,
                fault_p99_us: med(&|s| s.fault_latency_us.as_ref().and_then(|l| l.p99)),
                fault_vs_rtt: ratio(fault, rtt),
                blocktime_ms: med(&|s| s.blocktime_ms),
                downtime_parts,
                device,
            });
        }
    }
    let find = |tool, mode| groups.iter().find(|g| g.tool == tool && g.mode == mode);
    let comparisons = modes
        .iter()
        .filter_map(|&mode| {
            let (v, q) = (find(Tool::Vmm, mode)?, find(Tool::Qemu, mode)?);
            Some(Comparison {
                mode,
                downtime_vmm_over_qemu: ratio(v.downtime_ms, q.downtime_ms),
                total_vmm_over_qemu: ratio(v.total_ms, q.total_ms),
            })
        })
        .collect();
    let device_comparisons = modes
        .iter()
        .filter_map(|&mode| {
            let (without, with) = (find(Tool::Vmm, mode)?, find(Tool::VmmGpu, mode)?);
            Some(DeviceComparison {
                mode,
                downtime_without_ms: without.downtime_ms,
                downtime_with_ms: with.downtime_ms,
                downtime_with_over_without: ratio(with.downtime_ms, without.downtime_ms),
                total_without_ms: without.total_ms,
                total_with_ms: with.total_ms,
                total_with_over_without: ratio(with.total_ms, without.total_ms),
            })
        })
        .collect();
    (base, groups, comparisons, device_comparisons)
}

pub(crate) fn print_table(s: &Summary) {
    let f = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |x| format!("{x:.prec$}"));
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
        f(b.tcp_mib_s, 0),
        b.tcp_mib,
        f(b.rtt_p50_us, 1),
        f(b.rtt_p99_us, 1)
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
    let f = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |x| format!("{x:.prec$}"));
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
            f(g.total_ms, 0),
            f(g.downtime_ms, 0),
            f(g.wall_ms, 0),
            f(g.mib_sent, 1),
            f(g.throughput_mib_s, 0),
            f(g.throughput_vs_tcp, 3),
            f(g.rounds, 0),
            f(g.postcopy_faults, 0),
            f(g.fault_us, 0),
            f(g.fault_vs_rtt, 1),
        );
    }
    println!();
    for c in &s.comparisons {
        println!(
            "vmm/qemu {:<9} downtime {}  total {}",
            c.mode.name(),
            f(c.downtime_vmm_over_qemu, 3),
            f(c.total_vmm_over_qemu, 3)
        );
    }
    print_device_table(s);
    for c in &s.tls_comparisons {
        println!(
            "TLS cost {:<9} throughput plain TCP {} MiB/s, TLS (PSK) {} MiB/s, TLS/plain {}; \
             total {} / {} ms, downtime {} / {} ms",
            c.mode.name(),
            f(c.plain_mib_s, 0),
            f(c.tls_mib_s, 0),
            f(c.tls_over_plain, 3),
            f(c.plain_total_ms, 0),
            f(c.tls_total_ms, 0),
            f(c.plain_downtime_ms, 0),
            f(c.tls_downtime_ms, 0),
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

/// The chart's bars: per mode, vmm then vmm+gpu, each with its downtime parts' medians.
pub(crate) fn chart_input(s: &Summary) -> chart::ChartInput {
    let runs = if s.runs == 1 {
        "a single run".to_string()
    } else {
        format!("medians of {} runs", s.runs)
    };
    let bars = s
        .groups
        .iter()
        .filter(|g| g.tool.is_vmm())
        .filter_map(|g| {
            let downtime_ms = g.downtime_ms?;
            let segments = match &g.downtime_parts {
                Some(p) => p.named().to_vec(),
                None => vec![("not split", downtime_ms)],
            };
            Some(chart::Bar {
                label: format!("{} {}", g.mode.name(), g.tool.name()),
                segments,
                downtime_ms,
            })
        })
        .collect();
    chart::ChartInput {
        title: format!(
            "vmm downtime without and with a passed-through device: {runs}, host {}, {} MiB guest",
            s.host, s.mem_mib
        ),
        bars,
    }
}

/// The stream panel's bars: each tool's median MiB/s, then the raw TCP median.
pub(crate) fn stream_chart_input(s: &Summary) -> Option<chart::StreamChart> {
    let st = s.stream.as_ref()?;
    let mut bars: Vec<(String, f64)> = st
        .groups
        .iter()
        .filter_map(|g| Some((g.tool.name().to_string(), g.throughput_mib_s?)))
        .collect();
    if bars.is_empty() {
        return None;
    }
    if let Some(t) = st.tcp_mib_s {
        bars.push(("raw TCP".into(), t));
    }
    Some(chart::StreamChart {
        title: format!(
            "stream: micro guest, {} MiB swept, paused, precopy; host {}, {}",
            st.region_mib,
            s.host,
            if s.runs == 1 {
                "a single run".to_string()
            } else {
                format!("medians of {} runs", s.runs)
            }
        ),
        bars,
        tcp_mib_s: st.tcp_mib_s,
    })
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
    let f = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |x| format!("{x:.prec$}"));
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
            f(g.total_ms, 1),
            f(g.downtime_ms, 1),
            f(pp(|p| p.pause_ms), 2),
            f(pp(|p| p.device_stop_ms), 2),
            f(pp(|p| p.harvest_ms), 2),
            f(pp(|p| p.capture_ms), 2),
            f(pp(|p| p.final_pages_ms), 2),
            f(pp(|p| p.device_data_ms), 2),
            f(pp(|p| p.state_ms), 2),
            f(pp(|p| p.confirm_ms), 2),
            f(pp(|p| p.destination_restore_ms), 2),
            f(d.and_then(|d| d.precopy_bytes), 0),
            f(d.and_then(|d| d.stop_copy_bytes), 0),
            f(d.and_then(|d| d.dma_pages), 0),
            f(d.and_then(|d| d.dma_harvest_ms_per_round), 2),
        );
    }
    for c in &s.device_comparisons {
        println!(
            "vmm+gpu/vmm {:<8} downtime {} ({} -> {} ms)  total {} ({} -> {} ms)",
            c.mode.name(),
            f(c.downtime_with_over_without, 2),
            f(c.downtime_without_ms, 1),
            f(c.downtime_with_ms, 1),
            f(c.total_with_over_without, 2),
            f(c.total_without_ms, 1),
            f(c.total_with_ms, 1),
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

/// The stream scenario per tool: medians of the ok runs, against the raw TCP median.
#[derive(Serialize)]
pub(crate) struct StreamGroup {
    pub(crate) tool: Tool,
    pub(crate) runs: usize,
    pub(crate) ok: usize,
    pub(crate) mib_sent: Option<f64>,
    pub(crate) zero_pages: Option<f64>,
    pub(crate) total_ms: Option<f64>,
    pub(crate) downtime_ms: Option<f64>,
    pub(crate) wall_ms: Option<f64>,
    /// MiB sent / vmm's total seconds, per run, then the median.
    pub(crate) throughput_mib_s: Option<f64>,
    /// throughput_mib_s / the raw TCP median of the same bench run.
    pub(crate) throughput_vs_tcp: Option<f64>,
    /// The raw TCP copies timed just before each ok migration (median), and the median of each
    /// migration's throughput over its own copy (side by side).
    pub(crate) adjacent_tcp_mib_s: Option<f64>,
    pub(crate) throughput_vs_adjacent_tcp: Option<f64>,
}

#[derive(Serialize)]
pub(crate) struct StreamSkipped {
    pub(crate) tool: Tool,
    pub(crate) reason: &'static str,
}

#[derive(Serialize)]
pub(crate) struct StreamSummary {
    /// The micro guest's swept region (MiB) and its RAM.
    pub(crate) region_mib: u64,
    pub(crate) mem_mib: u64,
    pub(crate) tcp_mib: u64,
    pub(crate) tcp_mib_s: Option<f64>,
    pub(crate) groups: Vec<StreamGroup>,
    /// vmm+tls / vmm throughput (below 1: what TLS costs the stream).
    pub(crate) tls_over_plain: Option<f64>,
    /// Tools asked for that the scenario does not run, and why.
    pub(crate) skipped: Vec<StreamSkipped>,
    pub(crate) samples: Vec<stream::StreamSample>,
}

/// Why `tool` has no stream scenario, if it has none.
pub(crate) fn stream_refuses(tool: Tool) -> Option<&'static str> {
    match tool {
        Tool::Vmm | Tool::VmmTls => None,
        Tool::Qemu => Some("the micro guest is vmm's own"),
        Tool::VmmGpu => Some("measures the stream without a device"),
    }
}

pub(crate) fn summarize_stream(
    region_mib: u64,
    baseline: &BaselineSummary,
    tools: &[Tool],
    samples: Vec<stream::StreamSample>,
) -> StreamSummary {
    let groups: Vec<StreamGroup> = tools
        .iter()
        .copied()
        .filter(|&t| stream_refuses(t).is_none())
        .map(|tool| {
            let all: Vec<&stream::StreamSample> =
                samples.iter().filter(|s| s.tool == tool).collect();
            let ok: Vec<&stream::StreamSample> = all.iter().copied().filter(|s| s.ok).collect();
            let med = |f: &dyn Fn(&stream::StreamSample) -> Option<f64>| {
                median(ok.iter().filter_map(|s| f(s)))
            };
            let throughput = med(&|s| s.throughput_mib_s());
            StreamGroup {
                tool,
                runs: all.len(),
                ok: ok.len(),
                mib_sent: med(&|s| s.mib_sent()),
                zero_pages: med(&|s| s.zero_pages.map(|z| z as f64)),
                total_ms: med(&|s| s.total_ms),
                downtime_ms: med(&|s| s.downtime_ms),
                wall_ms: med(&|s| s.wall_ms),
                throughput_mib_s: throughput,
                throughput_vs_tcp: ratio(throughput, baseline.tcp_mib_s),
                adjacent_tcp_mib_s: med(&|s| s.adjacent_tcp_mib_s),
                throughput_vs_adjacent_tcp: med(&|s| s.throughput_vs_adjacent_tcp),
            }
        })
        .collect();
    let mib_s = |tool| {
        groups
            .iter()
            .find(|g| g.tool == tool)
            .and_then(|g| g.throughput_mib_s)
    };
    StreamSummary {
        region_mib,
        mem_mib: region_mib + stream::EXTRA_MEM_MIB,
        tcp_mib: baseline.tcp_mib,
        tcp_mib_s: baseline.tcp_mib_s,
        tls_over_plain: ratio(mib_s(Tool::VmmTls), mib_s(Tool::Vmm)),
        skipped: tools
            .iter()
            .filter_map(|&tool| stream_refuses(tool).map(|reason| StreamSkipped { tool, reason }))
            .collect(),
        groups,
        samples,
    }
}

pub(crate) fn print_stream_table(s: &StreamSummary) {
    let f = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |x| format!("{x:.prec$}"));
    println!();
    println!(
        "stream (micro guest, {} MiB swept, paused): {} MiB guest, every page of the region \
         stamped (non-zero), paused, then precopy",
        s.region_mib, s.mem_mib
    );
    println!(
        "raw TCP a->b {} MiB/s (median, {} MiB, one connection, same run)",
        f(s.tcp_mib_s, 0),
        s.tcp_mib
    );
    println!(
        "{:<8} {:>5} {:>9} {:>9} {:>9} {:>8} {:>7} {:>6} {:>9} {:>7} {:>9}",
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
        "/adj TCP"
    );
    for g in &s.groups {
        println!(
            "{:<8} {:>5} {:>9} {:>9} {:>9} {:>8} {:>7} {:>6} {:>9} {:>7} {:>9}",
            g.tool.name(),
            format!("{}/{}", g.ok, g.runs),
            f(g.mib_sent, 1),
            f(g.total_ms, 0),
            f(g.downtime_ms, 1),
            f(g.wall_ms, 0),
            f(g.throughput_mib_s, 0),
            f(g.throughput_vs_tcp, 3),
            if g.tool == Tool::VmmTls {
                f(s.tls_over_plain, 3)
            } else {
                "-".into()
            },
            f(g.adjacent_tcp_mib_s, 0),
            f(g.throughput_vs_adjacent_tcp, 3),
        );
    }
    println!(
        "MiB/s: MiB sent / vmm's total_ms, median; /TCP: that over the raw TCP median above; adj"
    );
    println!(
        "TCP: a raw TCP copy ({} MiB) timed just before each migration, both VMs paused (median);",
        s.tcp_mib
    );
    println!("/adj TCP: median of each migration's MiB/s over its own copy. ok: the destination's");
    println!("micro guest ran on and its memory check found no page wrong.");
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

#[cfg(test)]
mod tests {
    use super::*;
    use stream::StreamSample;

    fn sample(tool: Tool, run: usize, total_ms: f64, tcp: f64, ok: bool) -> StreamSample {
        let mut s = StreamSample::new(tool, run, 512);
        s.bytes = Some(512 << 20);
        s.total_ms = Some(total_ms);
        s.zero_pages = Some(10);
        s.adjacent_tcp_mib_s = Some(tcp);
        s.throughput_vs_adjacent_tcp = ratio(s.throughput_mib_s(), Some(tcp));
        s.ok = ok;
        s
    }

    #[test]
    fn stream_medians_and_ratios() {
        let base = BaselineSummary {
            tcp_mib: 512,
            tcp_mib_s: Some(2000.0),
            rtt_p50_us: None,
            rtt_p99_us: None,
            runs: vec![],
        };
        let samples = vec![
            // vmm: 512 MiB in 0.5, 0.4, 0.25 s -> 1024, 1280, 2048 MiB/s: median 1280; over
            // the copies just before (2048, 1600, 2048): 0.5, 0.8, 1.0, median 0.8.
            sample(Tool::Vmm, 1, 500.0, 2048.0, true),
            sample(Tool::Vmm, 2, 400.0, 1600.0, true),
            sample(Tool::Vmm, 3, 250.0, 2048.0, true),
            // vmm+tls: the failed run is left out of the medians.
            sample(Tool::VmmTls, 1, 800.0, 1280.0, true),
            sample(Tool::VmmTls, 2, 1.0, 9999.0, false),
        ];
        let tools = [Tool::Qemu, Tool::Vmm, Tool::VmmTls];
        let s = summarize_stream(512, &base, &tools, samples);
        assert_eq!(s.mem_mib, 576);
        assert_eq!(s.groups.len(), 2);
        let (v, t) = (&s.groups[0], &s.groups[1]);
        assert_eq!((v.tool, v.runs, v.ok), (Tool::Vmm, 3, 3));
        assert_eq!(v.throughput_mib_s, Some(1280.0));
        assert_eq!(v.throughput_vs_tcp, Some(0.64));
        assert_eq!(v.total_ms, Some(400.0));
        assert_eq!(v.mib_sent, Some(512.0));
        assert_eq!(v.adjacent_tcp_mib_s, Some(2048.0));
        assert_eq!(v.throughput_vs_adjacent_tcp, Some(0.8));
        assert_eq!((t.tool, t.runs, t.ok), (Tool::VmmTls, 2, 1));
        assert_eq!(t.throughput_mib_s, Some(640.0));
        assert_eq!(t.throughput_vs_adjacent_tcp, Some(0.5));
        assert_eq!(s.tls_over_plain, Some(0.5));
        assert_eq!(s.skipped.len(), 1);
        assert_eq!(s.skipped[0].tool, Tool::Qemu);

        let none = summarize_stream(512, &base, &[Tool::Vmm], vec![]);
        assert_eq!(none.groups[0].throughput_mib_s, None);
        assert_eq!(none.tls_over_plain, None);
    }
}
