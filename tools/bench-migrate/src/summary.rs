//! The run's results: medians per tool and mode, the vmm/QEMU, device and TLS comparisons.
//! The stream scenario's medians, the printed tables and the chart's input are in the
//! submodules, each its own concern; this file holds what the JSON summary is made of.

use serde::Serialize;

use super::sample::{DowntimeParts, Mode, Sample, Tool};
use super::stats::{median, ratio};
use super::*;

mod chart_input;
mod stream_summary;
mod tables;

pub(crate) use chart_input::{chart_input, stream_chart_input};
pub(crate) use stream_summary::{stream_refuses, summarize_stream, StreamSummary};
pub(crate) use tables::print_table;

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
