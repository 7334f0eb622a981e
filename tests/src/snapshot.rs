//! Snapshot helpers shared by the lazy-restore tests: a micro guest snapshotted mid-run, and
//! the checks every restore must pass.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::micro::{micro_source, wait_some_passes};
use crate::vmm_bin;

/// Passes of the snapshotted micro guest: still running when the snapshot is taken, finished
/// soon after a restore.
pub const PASSES: u64 = 20000;

/// Runs the micro guest, lets it do some passes, snapshots it with --exit into DIR/snap.
pub fn snapshot_micro(dir: &Path, extra: &[&str]) -> PathBuf {
    let (src, sock) = micro_source(dir, PASSES, extra);
    wait_some_passes(&sock, 500);
    let snap = dir.join("snap");
    let out = Command::new(vmm_bin())
        .args(["snapshot", "--api-socket"])
        .arg(&sock)
        .arg("--to")
        .arg(&snap)
        .args(["--exit", "--json"])
        .output()
        .unwrap();
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "snapshot failed: {reply}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(reply["ok"], true, "{reply}");
    let (code, rep, err) = src.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "source:\n{err}");
    assert_eq!(rep["outcome"]["kind"], "snapshotted", "{rep}");
    let passes = rep["micro_passes"].as_u64().unwrap();
    assert!(passes < PASSES, "the guest finished before the snapshot");
    snap
}

/// The workload finished after the restore and matched its model.
pub fn assert_finished(what: &str, code: Option<i32>, rep: &Value, err: &str) {
    assert_eq!(code, Some(0), "{what}: {err}\n{rep}");
    let run = &rep["run"];
    assert_eq!(run["outcome"]["kind"], "micro-exit", "{what}: {rep}");
    assert_eq!(run["micro_passes"].as_u64(), Some(PASSES), "{what}: {rep}");
    assert_eq!(run["micro_check"]["mismatches"], 0, "{what}: {rep}");
    if !rep["demand"].is_null() {
        assert!(rep["demand"]["error"].is_null(), "{what}: {rep}");
    }
}

pub fn assert_same_memory(what: &str, a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(x.len(), y.len(), "{what}: sizes");
    let differing: Vec<usize> = x
        .chunks(4096)
        .zip(y.chunks(4096))
        .enumerate()
        .filter(|(_, (p, q))| p != q)
        .map(|(i, _)| i)
        .collect();
    assert!(
        differing.is_empty(),
        "{what}: {} pages differ from the snapshot, first at 0x{:x}",
        differing.len(),
        differing[0] * 4096
    );
}
