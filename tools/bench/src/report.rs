//! The data model of a `vmm bench tracking` report: what the runner measured, per workload and
//! per dirty-tracking backend, in a form the table, JSON and chart renderings all read.
//!
//! Every figure is a median over `runs` runs so that one noisy run (a host preemption, a THP
//! split) does not decide the comparison; the per-run samples are kept beside the medians so a
//! reader can judge the spread.

use serde::{Deserialize, Deserializer, Serialize};

/// A whole benchmark report: one host, several workloads, several backends per workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// The command that produced the report, e.g. "vmm bench tracking".
    pub tool: String,
    /// Host kind: "PVM" or "hardware".
    pub host: String,
    /// Free-form host description, e.g. kernel release and CPU count.
    pub host_detail: String,
    /// Runs per (workload, backend) cell; every figure is a median over them.
    pub runs: u32,
    pub workloads: Vec<WorkloadResult>,
    /// Backends that cannot work on this host, with the reason.
    pub unsupported: Vec<Unsupported>,
    pub notes: Vec<String>,
}

/// A backend that was not measured because the host cannot provide it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unsupported {
    pub backend: String,
    pub reason: String,
}

/// One guest workload, run untracked once and then under each backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadResult {
    /// Which guest ran it: "micro" or "linux".
    pub guest: String,
    /// Workload name, e.g. "sweep", "random", "hotset", "sparse", "agent random".
    pub name: String,
    pub region_mib: u64,
    pub pages: u64,
    /// Harvest rounds (passes over the region) per run.
    pub rounds_per_run: u64,
    /// The same workload with no tracking at all.
    pub baseline: Cell,
    pub backends: Vec<BackendResult>,
}

impl WorkloadResult {
    /// "micro sweep": the label the table and the chart use for this workload.
    pub fn label(&self) -> String {
        format!("{} {}", self.guest, self.name)
    }
}

/// A guest-time figure: the median and the per-run values it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Median over runs of guest milliseconds per round.
    #[serde(deserialize_with = "f64_or_nan")]
    pub guest_ms_per_round: f64,
    /// The per-run values the median came from.
    #[serde(deserialize_with = "vec_f64_or_nan")]
    pub samples: Vec<f64>,
}

impl Cell {
    /// Builds a cell whose figure is the median of `samples`.
    pub fn from_samples(samples: Vec<f64>) -> Self {
        Self {
            guest_ms_per_round: median(&samples),
            samples,
        }
    }
}

/// One backend's figures on one workload; all medians over the report's runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendResult {
    pub backend: String,
    /// Guest time per round while tracked.
    pub guest: Cell,
    /// `guest.guest_ms_per_round` / untracked baseline.
    #[serde(deserialize_with = "f64_or_nan")]
    pub slowdown: f64,
    /// Extra guest time the tracking cost, spread over the pages it had to record.
    pub extra_guest_us_per_dirty_page: Option<f64>,
    #[serde(deserialize_with = "f64_or_nan")]
    pub dirty_pages_per_round: f64,
    /// Ground truth where a model of the workload exists.
    pub expected_pages_per_round: Option<f64>,
    /// Summed over all rounds and runs; `None` where there is no ground truth (Linux guest).
    pub misses: Option<u64>,
    /// Summed like `misses`.
    pub false_positives: Option<u64>,
    /// Wall time of one harvest, including reset / re-protect.
    #[serde(deserialize_with = "f64_or_nan")]
    pub harvest_us_per_round: f64,
    pub harvest_ns_per_dirty_page: Option<f64>,
    /// CPU time of the harvesting thread(s) per round.
    #[serde(deserialize_with = "f64_or_nan")]
    pub harvest_cpu_us_per_round: f64,
    /// The bare ioctl loop, measured in the same run, per round.
    pub raw_ioctl_us_per_round: Option<f64>,
    /// `harvest_us_per_round` / `raw_ioctl_us_per_round`.
    pub harvest_vs_raw: Option<f64>,
    /// Bitmaps, rings and buffers the backend holds.
    pub memory_overhead_kib: u64,
    pub note: Option<String>,
}

/// Median of `values`: the mean of the middle two for an even count, NaN for none.
///
/// Sorting uses `total_cmp`, so NaN samples never panic; they sort to the ends (positive NaN
/// last) and only reach the median when they are most of the samples.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// serde_json writes non-finite floats as `null`; reading `null` back as NaN keeps a report
/// whose median failed (no samples) loadable instead of rejecting the whole file.
fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// As [`f64_or_nan`], for the per-run sample lists.
fn vec_f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    let values = Vec::<Option<f64>>::deserialize(d)?;
    Ok(values.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_count_is_middle_value() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn median_of_even_count_is_mean_of_middle_two() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn median_of_one_value_is_that_value() {
        assert_eq!(median(&[7.5]), 7.5);
    }

    #[test]
    fn median_of_nothing_is_nan() {
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn median_tolerates_nan_samples() {
        // Positive NaN sorts last, so one bad run out of three leaves a real median.
        assert_eq!(median(&[1.0, f64::NAN, 2.0]), 2.0);
        assert!(median(&[f64::NAN, f64::NAN, 1.0]).is_nan());
    }

    #[test]
    fn median_does_not_reorder_input() {
        let values = [3.0, 1.0, 2.0];
        let _ = median(&values);
        assert_eq!(values, [3.0, 1.0, 2.0]);
    }

    #[test]
    fn cell_from_samples_keeps_samples_and_takes_median() {
        let cell = Cell::from_samples(vec![10.0, 30.0, 20.0]);
        assert_eq!(cell.guest_ms_per_round, 20.0);
        assert_eq!(cell.samples, vec![10.0, 30.0, 20.0]);
    }
}
