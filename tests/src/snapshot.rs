//! Snapshot helpers shared by the lazy-restore tests: a micro guest snapshotted mid-run at a
//! point the test chose (paused, its end set, then snapshotted: no race with its workload),
//! and the checks every restore must pass.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::micro::{assert_micro_exit, finish, micro_source, wait_some_passes};
use crate::process::{remote, Bg};

/// Passes a restored guest runs to its end.
pub const AFTER: u64 = 4000;

/// A snapshot of a micro guest that ends by itself after `passes` passes once restored.
pub struct Snap {
    pub dir: PathBuf,
    pub passes: u64,
}

/// Runs the micro guest, lets it do some passes, pauses it, sets its end `AFTER` passes later
/// and snapshots it with --exit into DIR/snap.
pub fn snapshot_micro(dir: &Path, extra: &[&str]) -> Snap {
    let (src, sock) = micro_source(dir, extra);
    wait_some_passes(&sock, 20);
    let (code, v, err) = remote(&sock, &["pause"]);
    assert_eq!(code, Some(0), "pause: {err}\n{v}");
    let passes = finish(&sock, AFTER);
    let snap = dir.join("snap");
    let rep = snapshot_and_exit(src, &sock, &snap);
    let at = rep["micro_passes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        at < passes,
        "snapshotted at pass {at}, past its end {passes}"
    );
    Snap { dir: snap, passes }
}

/// `vmm remote snapshot --to SNAP --exit` on the VM in `src`, which must then end as
/// snapshotted; returns its report.
pub fn snapshot_and_exit(src: Bg, sock: &Path, snap: &Path) -> Value {
    let (code, reply, err) = remote(
        sock,
        &[
            "snapshot",
            "--to",
            snap.to_str().unwrap(),
            "--exit",
            "--json",
        ],
    );
    assert_eq!(code, Some(0), "snapshot failed: {reply}\n{err}");
    assert_eq!(reply["ok"], true, "{reply}");
    let (code, rep, err) = src.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "the snapshotted VM:\n{err}\n{rep}");
    assert_eq!(rep["outcome"]["kind"], "snapshotted", "{rep}");
    rep
}

/// The workload finished after the restore and matched its model.
pub fn assert_finished(what: &str, snap: &Snap, code: Option<i32>, rep: &Value, err: &str) {
    assert_eq!(code, Some(0), "{what}: {err}\n{rep}");
    assert_micro_exit(what, &rep["run"], snap.passes);
    if !rep["demand"].is_null() {
        assert!(rep["demand"]["error"].is_null(), "{what}: {rep}");
    }
}
