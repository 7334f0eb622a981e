//! The stream scenario's results (`--stream-mib`: the paused micro guest's stream against raw
//! TCP): per tool, medians of the ok runs and their ratios to TCP. Apart from the Linux guest's
//! groups because it measures other things (throughput only) over other samples.

use serde::Serialize;

use super::BaselineSummary;
use crate::sample::Tool;
use crate::stats::{median, ratio};
use crate::stream;

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
    /// The same for the copies into fresh memory (`baseline::Sink::FreshMemory`).
    pub(crate) adjacent_tcp_fresh_mib_s: Option<f64>,
    pub(crate) throughput_vs_adjacent_tcp_fresh: Option<f64>,
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
                adjacent_tcp_fresh_mib_s: med(&|s| s.adjacent_tcp_fresh_mib_s),
                throughput_vs_adjacent_tcp_fresh: med(&|s| s.throughput_vs_adjacent_tcp_fresh),
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
