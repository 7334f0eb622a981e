//! The report of `vmm bench passthrough`, and the parsing of what each run gives it: the
//! agent's `vfio-bench` line (guest side) and `vmm run --json`'s passthrough entry (host side).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The figures every run must yield: (key, what it is, unit). Keys are the agent's, but
/// `dma_map_ms_per_gib`, which vmm's run report gives.
pub const FIGURES: [(&str, &str, &str); 13] = [
    ("mapped_read_ns", "mapped BAR read (VRAM mmap)", "ns"),
    ("trapped_read_ns", "trapped BAR read (BAR0 SCRATCH)", "ns"),
    ("mapped_write_ns", "mapped BAR write", "ns"),
    ("trapped_write_ns", "trapped BAR write", "ns"),
    ("msix_p50_ns", "MSI-X doorbell -> eventfd wake-up p50", "ns"),
    ("msix_p90_ns", "MSI-X doorbell -> eventfd wake-up p90", "ns"),
    (
        "doorbell_p50_ns",
        "the trapped doorbell write alone p50",
        "ns",
    ),
    ("dma_to_ram_mib_s", "DMA VRAM -> guest RAM", "MiB/s"),
    ("dma_to_vram_mib_s", "DMA guest RAM -> VRAM", "MiB/s"),
    (
        "dma_to_ram_device_mib_s",
        "DMA VRAM -> guest RAM, the device's own clock",
        "MiB/s",
    ),
    (
        "dma_to_vram_device_mib_s",
        "DMA guest RAM -> VRAM, the device's own clock",
        "MiB/s",
    ),
    ("memcpy_mib_s", "memcpy in guest RAM, same size", "MiB/s"),
    (
        "dma_map_ms_per_gib",
        "vfio-user DMA_MAP of guest RAM, per GiB",
        "ms",
    ),
];

/// The ratios of the table: (label, numerator key, denominator key).
pub const RATIOS: [(&str, &str, &str); 6] = [
    ("trapped / mapped read", "trapped_read_ns", "mapped_read_ns"),
    (
        "trapped / mapped write",
        "trapped_write_ns",
        "mapped_write_ns",
    ),
    ("DMA -> RAM / memcpy", "dma_to_ram_mib_s", "memcpy_mib_s"),
    ("DMA -> VRAM / memcpy", "dma_to_vram_mib_s", "memcpy_mib_s"),
    (
        "DMA -> RAM (device clock) / memcpy",
        "dma_to_ram_device_mib_s",
        "memcpy_mib_s",
    ),
    (
        "DMA -> VRAM (device clock) / memcpy",
        "dma_to_vram_device_mib_s",
        "memcpy_mib_s",
    ),
];

/// Printed where no kernel VFIO device was given.
pub const NO_KERNEL_VFIO: &str = "skipped: no kernel VFIO device on this host";

/// One figure over the runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub key: String,
    pub label: String,
    pub unit: String,
    /// One per run that yielded it.
    pub samples: Vec<f64>,
    pub median: f64,
}

/// Two figures' medians divided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    pub label: String,
    pub numerator: String,
    pub denominator: String,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassthroughBenchReport {
    pub tool: String,
    /// "PVM" or "hardware".
    pub host: String,
    pub host_detail: String,
    /// "release" or "debug": the vmm (and device) build that ran.
    pub build: String,
    pub runs: u32,
    /// Runs that yielded every figure.
    pub runs_ok: u32,
    pub mem_mib: u64,
    pub iterations: u64,
    /// How the guest reached the trapped page: "mmap" or "pread" (per run, if they differ).
    pub trapped_via: String,
    /// How the DMA buffer was made physically contiguous ("hugetlb-2M", "pagemap-run").
    pub dma_contig: String,
    /// Bytes per timed transfer (median over runs).
    pub dma_bytes: u64,
    pub figures: Vec<Figure>,
    pub ratios: Vec<Ratio>,
    /// Kernel VFIO's DMA map per GiB (ms), where a device was given...
    pub kernel_vfio_dma_map: Option<Figure>,
    /// ... else why not ([`NO_KERNEL_VFIO`]), or why it failed.
    pub kernel_vfio_skipped: Option<String>,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
}

impl PassthroughBenchReport {
    pub fn figure(&self, key: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.key == key)
    }
}

/// The `key=value` tokens of a line.
pub fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSample {
    pub values: BTreeMap<String, f64>,
    pub trapped_via: String,
    pub dma_contig: String,
    pub dma_bytes: u64,
}

/// The `AGENT: vfio-bench ...` line among a console's lines (or the agent's error for it).
pub fn agent_bench_line(console: &str) -> Result<String, String> {
    let lines = console.lines().filter_map(|l| {
        l.trim_end_matches('\r')
            .split_once("AGENT: ")
            .map(|(_, r)| r)
    });
    for l in lines {
        if l.starts_with("vfio-bench ") {
            return Ok(l.to_owned());
        }
        if l.starts_with("error vfio-") {
            return Err(format!("the guest agent said: {l}"));
        }
    }
    Err("no `AGENT: vfio-bench` line on the guest console".into())
}

/// The first passthrough entry of `vmm run --json`'s report: (transport, ms per GiB).
pub fn dma_map_ms_per_gib(report_json: &str) -> Result<(String, f64), String> {
    let v: serde_json::Value = serde_json::from_str(report_json.trim())
        .map_err(|e| format!("vmm run --json printed no report: {e}"))?;
    let p = &v["passthrough"][0];
    let ms = p["dma_map_ms_per_gib"]
        .as_f64()
        .ok_or("the run report has no passthrough[0].dma_map_ms_per_gib")?;
    Ok((p["transport"].as_str().unwrap_or("?").to_owned(), ms))
}

impl RunSample {
    /// The agent's line plus the host's DMA-map figure; every figure must be there, finite and
    /// positive.
    pub fn parse(agent_line: &str, dma_map_ms_per_gib: f64) -> Result<RunSample, String> {
        let f = fields(agent_line);
        if f.get("ok").map(String::as_str) != Some("true") {
            return Err(format!("vfio-bench did not say ok=true: {agent_line}"));
        }
        let mut values = BTreeMap::new();
        for (key, _, _) in FIGURES {
            let v = if key == "dma_map_ms_per_gib" {
                dma_map_ms_per_gib
            } else {
                let text = f
                    .get(key)
                    .ok_or_else(|| format!("vfio-bench gave no {key}"))?;
                text.parse::<f64>()
                    .map_err(|_| format!("vfio-bench {key}={text}: not a number"))?
            };
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{key}={v}: not a positive figure"));
            }
            values.insert(key.to_owned(), v);
        }
        let text = |k: &str| f.get(k).cloned().unwrap_or_else(|| "?".into());
        Ok(RunSample {
            values,
            trapped_via: text("trapped_via"),
            dma_contig: text("dma_contig"),
            dma_bytes: f.get("dma_bytes").and_then(|b| b.parse().ok()).unwrap_or(0),
        })
    }
}

/// Per-figure medians over the runs, and the ratios of those medians.
pub fn reduce(samples: &[RunSample]) -> (Vec<Figure>, Vec<Ratio>) {
    let figures: Vec<Figure> = FIGURES
        .iter()
        .map(|&(key, label, unit)| {
            let s: Vec<f64> = samples
                .iter()
                .filter_map(|r| r.values.get(key))
                .copied()
                .collect();
            Figure {
                key: key.into(),
                label: label.into(),
                unit: unit.into(),
                median: crate::median(&s),
                samples: s,
            }
        })
        .collect();
    let median_of = |k: &str| {
        figures
            .iter()
            .find(|f| f.key == k)
            .map_or(f64::NAN, |f| f.median)
    };
    let ratios = RATIOS
        .iter()
        .map(|&(label, num, den)| Ratio {
            label: label.into(),
            numerator: num.into(),
            denominator: den.into(),
            value: median_of(num) / median_of(den),
        })
        .collect();
    (figures, ratios)
}

/// The one value all runs agree on, else every value seen ("mmap/pread").
pub fn agreed<'a>(values: impl Iterator<Item = &'a str>) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for v in values {
        if !seen.contains(&v) {
            seen.push(v);
        }
    }
    if seen.is_empty() {
        "-".into()
    } else {
        seen.join("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const LINE: &str = "vfio-bench 0000:00:01.0 iterations=200 batches=9 \
        clock_ns=25.20 trapped_via=mmap mapped_read_ns=0.55 mapped_write_ns=0.24 \
        trapped_read_ns=135515.86 trapped_write_ns=101369.66 read_ratio=248581.70 \
        write_ratio=426539.00 access_ms=478 msix_samples=200 msix_p50_ns=4516686.00 \
        msix_p90_ns=7122678.00 doorbell_p50_ns=225066.00 msix_ms=2080 dma_contig=pagemap-run \
        dma_bytes=4100096 dma_completion=poll dma_to_ram_mib_s=6340.67 \
        dma_to_vram_mib_s=5636.24 dma_to_ram_device_mib_s=9000.5 dma_to_vram_device_mib_s=8000.25 memcpy_mib_s=46898.99 to_ram_vs_memcpy=0.14 \
        to_vram_vs_memcpy=0.12 dma_ms=19782 elapsed_ms=22365 ok=true";

    #[test]
    fn parses_the_agent_line_and_the_run_report() {
        let console = format!("boot\nAGENT: vfio-bind x\r\nAGENT: {LINE}\nAGENT: poweroff\n");
        let line = agent_bench_line(&console).unwrap();
        let (transport, per_gib) = dma_map_ms_per_gib(
            r#"{"host":"pvm","passthrough":[{"transport":"vfio-user","dma_map_ms_per_gib":0.37}]}"#,
        )
        .unwrap();
        assert_eq!(transport, "vfio-user");
        let s = RunSample::parse(&line, per_gib).unwrap();
        assert_eq!(s.values.len(), FIGURES.len());
        assert_eq!(s.values["trapped_read_ns"], 135515.86);
        assert_eq!(s.values["dma_map_ms_per_gib"], 0.37);
        assert_eq!((s.trapped_via.as_str(), s.dma_bytes), ("mmap", 4100096));
    }

    #[test]
    fn refuses_incomplete_or_failed_runs() {
        assert!(agent_bench_line("AGENT: error vfio-bench: no PCI function")
            .unwrap_err()
            .contains("no PCI function"));
        assert!(agent_bench_line("AGENT: poweroff").is_err());
        assert!(RunSample::parse(&LINE.replace("ok=true", ""), 1.0).is_err());
        let e = RunSample::parse(&LINE.replace("msix_p90_ns", "x"), 1.0).unwrap_err();
        assert!(e.contains("msix_p90_ns"), "{e}");
        assert!(RunSample::parse(LINE, 0.0).is_err());
        assert!(RunSample::parse(&LINE.replace("=0.55", "=nan"), 1.0).is_err());
        assert!(dma_map_ms_per_gib(r#"{"host":"pvm"}"#).is_err());
        assert!(dma_map_ms_per_gib("garbage").is_err());
    }

    #[test]
    fn reduces_to_medians_and_ratios_of_medians() {
        let runs: Vec<RunSample> = [1.0, 3.0, 2.0]
            .iter()
            .map(|&k| {
                let mut s = RunSample::parse(LINE, k).unwrap();
                s.values.insert("mapped_read_ns".into(), k);
                s
            })
            .collect();
        let (figures, ratios) = reduce(&runs);
        let f = figures.iter().find(|f| f.key == "mapped_read_ns").unwrap();
        assert_eq!((f.median, f.samples.len()), (2.0, 3));
        assert_eq!(ratios[0].value, 135515.86 / 2.0);
        assert_eq!(ratios[2].value, 6340.67 / 46898.99);
        assert_eq!(agreed(["mmap", "mmap"].into_iter()), "mmap");
        assert_eq!(agreed(["mmap", "pread", "mmap"].into_iter()), "mmap/pread");
    }
}
