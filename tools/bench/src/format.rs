//! Number formatting shared by the table and the chart axes.
//!
//! Benchmark figures carry run-to-run noise of a few percent, so three significant digits say
//! everything the measurement supports and keep the columns narrow.

/// `x` with three significant digits ("12.3", "0.0456"); whole numbers from 100 up are printed
/// in full ("65536", not "65500") because page counts should read as counts.
pub(crate) fn sig3(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    if x == 0.0 {
        return "0".to_owned();
    }
    if x.abs() >= 100.0 {
        return format!("{x:.0}");
    }
    if x.abs() < 0.001 {
        return format!("{x:.2e}");
    }
    // Round first, then pick the decimals from the rounded value, so 9.996 becomes "10.0" and
    // not the four-digit "10.00".
    let rounded = round_to_significant(x, 3);
    let magnitude = rounded.abs().log10().floor() as i32;
    let decimals = (2 - magnitude).clamp(0, 5) as usize;
    format!("{rounded:.decimals$}")
}

/// A ratio such as a slowdown: "1.07x".
pub(crate) fn ratio(x: f64) -> String {
    format!("{}x", sig3(x))
}

/// `sig3` without trailing zeros, for axis ticks where "0.5" reads better than "0.500".
pub(crate) fn tick(x: f64) -> String {
    let s = sig3(x);
    if s.contains('.') && !s.contains('e') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// "-" for a figure that does not exist (as opposed to one that is zero).
pub(crate) fn or_dash<T>(value: Option<T>, f: impl Fn(T) -> String) -> String {
    value.map_or_else(|| "-".to_owned(), f)
}

fn round_to_significant(x: f64, digits: i32) -> f64 {
    let magnitude = x.abs().log10().floor() as i32;
    let scale = 10f64.powi(digits - 1 - magnitude);
    (x * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sig3_keeps_three_significant_digits() {
        assert_eq!(sig3(12.345), "12.3");
        assert_eq!(sig3(1.2345), "1.23");
        assert_eq!(sig3(0.012345), "0.0123");
        assert_eq!(sig3(-4.567), "-4.57");
    }

    #[test]
    fn sig3_prints_large_values_whole() {
        assert_eq!(sig3(65536.0), "65536");
        assert_eq!(sig3(123.4), "123");
    }

    #[test]
    fn sig3_rounding_carries_into_next_magnitude() {
        assert_eq!(sig3(9.996), "10.0");
        assert_eq!(sig3(99.96), "100");
    }

    #[test]
    fn sig3_handles_zero_tiny_and_non_finite() {
        assert_eq!(sig3(0.0), "0");
        assert_eq!(sig3(0.000_123_4), "1.23e-4");
        assert_eq!(sig3(f64::NAN), "NaN");
        assert_eq!(sig3(f64::INFINITY), "inf");
    }

    #[test]
    fn ratio_and_tick() {
        assert_eq!(ratio(1.0712), "1.07x");
        assert_eq!(tick(0.5), "0.5");
        assert_eq!(tick(2.0), "2");
        assert_eq!(tick(1000.0), "1000");
    }

    #[test]
    fn or_dash_marks_missing() {
        assert_eq!(or_dash(None::<u64>, |v| v.to_string()), "-");
        assert_eq!(or_dash(Some(0u64), |v| v.to_string()), "0");
    }
}
