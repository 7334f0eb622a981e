//! The chart's x axis: one unit per workload, with a tick (and so a label) at the centre of
//! each unit, where that workload's group of bars sits.
//!
//! plotters' own f64 axis picks "nice" tick values that would fall between groups, and its
//! key-point override (`with_key_points`) loses the value formatting that the mesh needs, so
//! this small axis does both jobs.

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};

/// Linear axis over `0.0..groups`, ticks at `i + 0.5`.
pub(crate) struct GroupAxis {
    groups: usize,
}

impl GroupAxis {
    pub(crate) fn new(groups: usize) -> Self {
        Self { groups }
    }

    fn end(&self) -> f64 {
        // An empty axis still needs a non-zero length to map onto.
        self.groups.max(1) as f64
    }
}

impl Ranged for GroupAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let fraction = value / self.end();
        let span = f64::from(limit.1 - limit.0);
        // Same rounding as plotters' f64 axis, so bars and mesh agree to the pixel.
        limit.0 + (span * fraction + 1e-3).floor() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // Every group gets its label whatever the hint's budget, since a bar group without a
        // name is unreadable; light mesh lines between groups would only be clutter.
        if hint.weight().allow_light_points() {
            return Vec::new();
        }
        (0..self.groups).map(|i| i as f64 + 0.5).collect()
    }

    fn range(&self) -> Range<f64> {
        0.0..self.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plotters::coord::ranged1d::BoldPoints;

    #[test]
    fn no_light_points() {
        assert!(GroupAxis::new(3).key_points(10usize).is_empty());
    }

    #[test]
    fn ticks_at_group_centres() {
        let axis = GroupAxis::new(3);
        assert_eq!(axis.key_points(BoldPoints(10)), vec![0.5, 1.5, 2.5]);
        assert_eq!(axis.range(), 0.0..3.0);
    }

    #[test]
    fn maps_linearly() {
        let axis = GroupAxis::new(4);
        assert_eq!(axis.map(&0.0, (0, 400)), 0);
        assert_eq!(axis.map(&2.0, (0, 400)), 200);
        assert_eq!(axis.map(&4.0, (0, 400)), 400);
    }

    #[test]
    fn empty_axis_has_a_length() {
        let axis = GroupAxis::new(0);
        assert_eq!(axis.range(), 0.0..1.0);
        assert!(axis.key_points(BoldPoints(10)).is_empty());
    }
}
