//! `vmm bench demand`: demand-paging backends compared on lazy restores of the micro guest.
//!
//! Per case (vCPU count, private regions or a shared one too) the runner boots the micro guest
//! with a sweep workload, lets it finish its first pass (so every region page holds data),
//! snapshots it with `exit`, and restores that snapshot eagerly (the no-fault baseline: every
//! page is in memory, the guest only pays KVM's own first-touch faults) and lazily with each
//! demand-paging backend, with every thread pinned to one CPU or free, with the fault handler
//! in the vmm process or in a page server. Everything runs as subprocesses of this very
//! binary, exactly as a user would run them, so the figures include nothing a real restore
//! would not pay.
//!
//! [`model`] is the report (and the parsing of `vmm restore --json`), [`runner`] fills it,
//! [`render`] and [`svg`] print it. The renderings only read the report, so a saved JSON file
//! can be re-rendered without re-running.

pub mod model;
pub mod render;
pub mod runner;
pub mod svg;

pub use model::{DemandBenchReport, RestoreOutput};
pub use render::{from_json, render_table, to_json};
pub use runner::{run, DemandBench, Handler, Placement};
pub use svg::render_svg;
