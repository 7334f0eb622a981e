//! What the SVG chart shows, taken from the summary: its downtime bars and its stream panel.
//! Apart from `chart`, which draws whatever bars it is given, so that the choice of bars and
//! titles is made next to the medians it reads.

use super::Summary;
use crate::chart;

/// How many runs each figure stands for, as both panels' titles say it.
fn runs_phrase(s: &Summary) -> String {
    if s.runs == 1 {
        "a single run".to_string()
    } else {
        format!("medians of {} runs", s.runs)
    }
}

/// The chart's bars: per mode, vmm then vmm+gpu, each with its downtime parts' medians.
pub(crate) fn chart_input(s: &Summary) -> chart::ChartInput {
    let runs = runs_phrase(s);
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
            runs_phrase(s)
        ),
        bars,
        tcp_mib_s: st.tcp_mib_s,
    })
}
