//! The statistics of `vfio-bench`: medians and percentiles of samples, per-access costs of timed
//! batches, throughputs, and the `key=value` figures of its result line.

/// The `p`-th percentile (0..=100) of `samples` by nearest rank: the smallest sample with at
/// least p% of the samples at or below it. `None` for no samples or a NaN among them.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() || samples.iter().any(|s| s.is_nan()) || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).copied()
}

/// The median: the mean of the two middle samples for an even count.
pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() || samples.iter().any(|s| s.is_nan()) {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// Nanoseconds per access of a batch of `accesses` that took `batch_ns`.
pub fn per_access_ns(batch_ns: u128, accesses: u64) -> Option<f64> {
    (accesses > 0).then(|| batch_ns as f64 / accesses as f64)
}

/// MiB/s of `bytes` moved in `ns`.
pub fn mib_per_s(bytes: u64, ns: u128) -> Option<f64> {
    (ns > 0).then(|| bytes as f64 / (1 << 20) as f64 / (ns as f64 / 1e9))
}

/// The `key=value` figures of a result line, in order.
#[derive(Debug, Default)]
pub struct Figures(Vec<(String, String)>);

impl Figures {
    pub fn text(&mut self, key: &str, value: impl std::fmt::Display) {
        self.0.push((key.to_owned(), value.to_string()));
    }

    /// A measured figure with two decimals; a missing one (no samples) is an error, so the
    /// line never carries a made-up number.
    pub fn num(&mut self, key: &str, value: Option<f64>) -> Result<(), String> {
        match value {
            Some(v) if v.is_finite() => {
                self.text(key, format!("{v:.2}"));
                Ok(())
            }
            _ => Err(format!("no valid samples for {key}")),
        }
    }

    pub fn line(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        assert_eq!(percentile(&s, 90.0), Some(9.0));
        assert_eq!(percentile(&s, 50.0), Some(5.0));
        assert_eq!(percentile(&s, 100.0), Some(10.0));
        assert_eq!(percentile(&s, 0.0), Some(1.0));
        assert_eq!(percentile(&s, 101.0), None);
        assert_eq!(percentile(&[], 50.0), None);
        // One slow outlier among 20 moves p90 not at all.
        let mut t = vec![100.0; 19];
        t.push(1e6);
        assert_eq!(percentile(&t, 90.0), Some(100.0));
    }

    #[test]
    fn per_access_costs_and_throughputs() {
        assert_eq!(per_access_ns(1000, 10), Some(100.0));
        assert_eq!(per_access_ns(1000, 0), None);
        assert_eq!(mib_per_s(1 << 20, 1_000_000_000), Some(1.0));
        assert_eq!(mib_per_s(64 << 20, 500_000_000), Some(128.0));
        assert_eq!(mib_per_s(1, 0), None);
    }

    #[test]
    fn figures_refuse_missing_values() {
        let mut f = Figures::default();
        f.text("via", "mmap");
        f.num("read_ns", Some(12.345)).expect("finite");
        assert!(f.num("write_ns", None).is_err());
        assert!(f.num("x", Some(f64::INFINITY)).is_err());
        assert_eq!(f.line(), "via=mmap read_ns=12.35");
    }
}
