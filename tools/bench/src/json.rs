//! JSON rendering of a report, for keeping results and comparing hosts later.
//!
//! Non-finite figures (a median of no samples) are written as `null`, as serde_json does for
//! any NaN or infinity; the report model reads `null` back as NaN, so such a file still loads.

use super::report::BenchReport;

/// The report as pretty-printed JSON (no trailing newline).
pub fn to_json(r: &BenchReport) -> String {
    match serde_json::to_string_pretty(r) {
        Ok(text) => text,
        // Serialising these plain structs (string keys, derived impls) cannot fail; should a
        // future field make it fail, the output still says what went wrong instead of panicking
        // at the end of a long benchmark.
        Err(e) => {
            tracing::error!("cannot serialise the benchmark report: {e}");
            serde_json::json!({ "error": format!("cannot serialise the benchmark report: {e}") })
                .to_string()
        }
    }
}

/// Reads a report written by [`to_json`].
pub fn from_json(s: &str) -> Result<BenchReport, serde_json::Error> {
    serde_json::from_str(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::median;
    use crate::sample;

    use serde_json::Value;

    /// Equal up to the last bit or so of each float: serde_json's default float parser (without
    /// its `float_roundtrip` feature) may read a value back one ULP off, which no benchmark
    /// figure cares about.
    fn assert_close(a: &Value, b: &Value, path: &str) {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
                let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                assert!(
                    (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
                    "{path}: {x} != {y}"
                );
            }
            (Value::Array(xs), Value::Array(ys)) => {
                assert_eq!(xs.len(), ys.len(), "{path}: lengths differ");
                for (i, (x, y)) in xs.iter().zip(ys).enumerate() {
                    assert_close(x, y, &format!("{path}[{i}]"));
                }
            }
            (Value::Object(xs), Value::Object(ys)) => {
                assert_eq!(xs.len(), ys.len(), "{path}: fields differ");
                for (key, x) in xs {
                    let y = ys
                        .get(key)
                        .unwrap_or_else(|| panic!("{path}.{key} missing"));
                    assert_close(x, y, &format!("{path}.{key}"));
                }
            }
            _ => assert_eq!(a, b, "{path}"),
        }
    }

    fn assert_round_trips(report: &BenchReport) {
        let back = from_json(&to_json(report)).unwrap();
        let (a, b) = (serde_json::to_value(report), serde_json::to_value(&back));
        assert_close(&a.unwrap(), &b.unwrap(), "report");
    }

    #[test]
    fn round_trips() {
        assert_round_trips(&sample::report());
    }

    #[test]
    fn empty_report_round_trips() {
        assert_round_trips(&sample::empty());
    }

    #[test]
    fn is_pretty_and_uses_field_names() {
        let text = to_json(&sample::report());
        assert!(text.starts_with("{\n"));
        assert!(text.contains("\"harvest_ns_per_dirty_page\""));
        assert!(text.contains("\"misses\": null"));
    }

    #[test]
    fn non_finite_figures_read_back_as_nan() {
        let mut report = sample::report();
        report.workloads[0].baseline.guest_ms_per_round = median(&[]);
        report.workloads[0].baseline.samples.push(f64::INFINITY);
        report.workloads[0].backends[0].slowdown = f64::NAN;
        report.workloads[0].backends[0].harvest_ns_per_dirty_page = Some(f64::NAN);
        let back = from_json(&to_json(&report)).unwrap();
        let w = &back.workloads[0];
        assert!(w.baseline.guest_ms_per_round.is_nan());
        assert!(w.baseline.samples.last().is_some_and(|v| v.is_nan()));
        assert!(w.backends[0].slowdown.is_nan());
        // An optional figure that was not finite has no value to show, so `None` is right.
        assert_eq!(w.backends[0].harvest_ns_per_dirty_page, None);
    }

    #[test]
    fn rejects_malformed_input() {
        assert!(from_json("{\"tool\": 3}").is_err());
        assert!(from_json("not json").is_err());
    }
}
