//! `vmm bench passthrough`: what a passed-through device costs the guest, measured where the
//! guest runs it. Per run a fresh gpu-test-device (vfio-user) and a fresh boot of the Linux
//! test guest, whose agent's `vfio-bench` measures, from guest user space: a 4-byte access to
//! a mapped BAR page against one to the trapped register page, MSI-X delivery (doorbell to
//! eventfd wake-up), and DMA throughput between VRAM and guest RAM against a plain memcpy of
//! the same size in the same run. The host side adds what DMA-mapping guest RAM cost (from the
//! run's `--json` report), and kernel VFIO's where a host device is given.
//!
//! [`model`] is the report and the parsing of what a run prints, [`runner`] fills it,
//! [`render`] prints it.

pub mod model;
pub mod render;
pub mod runner;

pub use model::PassthroughBenchReport;
pub use render::{from_json, render_table, to_json};
pub use runner::{run, PassthroughBench};
