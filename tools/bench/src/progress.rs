//! The progress bar every benchmark shows on long work (hidden with --no-progress or --json).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `total` steps, each a `unit` ("runs", "boots", ...); hidden unless `on`.
pub fn bar(total: u64, on: bool, unit: &str) -> ProgressBar {
    if !on {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    let template = format!("{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
