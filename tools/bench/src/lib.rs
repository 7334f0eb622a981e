//! Benchmarks run by `vmm bench` (the vmm-cli package parses the arguments and calls them).
//!
//! `vmm bench tracking` runs the same guest workloads under each memory dirty-tracking backend
//! (KVM dirty bitmap, bitmap with manual clear, dirty ring, userfaultfd write-protect,
//! userfaultfd WP_ASYNC + PAGEMAP_SCAN, soft-dirty) and compares guest slowdown, accuracy
//! against a model of the workload, and harvest cost. This crate also holds the output side:
//! [`report`] is the data model the runner fills, and [`table`], [`json`] and [`chart`] render
//! it as text, JSON and an SVG chart. The renderings only read the report, so a saved JSON file
//! can be re-rendered without re-running the benchmark.

mod axis;
pub mod chart;
pub mod demand;
pub mod device_table;
pub mod device_tracking;
mod format;
pub mod json;
mod legend;
mod palette;
pub mod passthrough;
mod progress;
pub mod report;
#[cfg(test)]
mod sample;
pub mod table;
mod test_device;
pub mod tracking;

pub use chart::{render_svg, ChartError};
pub use json::{from_json, to_json};
pub use report::{median, BackendResult, BenchReport, Cell, Unsupported, WorkloadResult};
pub use table::render_table;
