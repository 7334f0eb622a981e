//! The micro guest as a migration or snapshot source: it runs until told to stop (`--passes 0`,
//! then `vmm remote finish --after N`), so no test depends on a fixed pass budget outlasting
//! polling, spawning and migrating on a loaded machine. Its end state is a function of the
//! workload and the final pass count alone, so a run that was never restored or migrated gives
//! the reference RAM every restored or migrated one must end with, byte for byte.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{remote, wait_api, Bg};
use crate::vmm_bin;

/// The workload every micro source runs: random writes over a 4 MiB region, 256 a pass.
const WORKLOAD: [&str; 8] = [
    "--micro",
    "--pattern",
    "random",
    "--region-mib",
    "4",
    "--param",
    "256",
    "--verify",
];

/// How long a micro guest may take to reach a pass count, or to end after `finish`, on a
/// loaded 2-core machine (a pass takes well under a millisecond).
pub const PASS_TIMEOUT: Duration = Duration::from_secs(120);

/// Starts the micro guest (the shared workload, `extra` arguments) running until told to stop,
/// with its API socket at DIR/src.sock; returns once it answers.
pub fn micro_source(dir: &Path, extra: &[&str]) -> (Bg, PathBuf) {
    let sock = dir.join("src.sock");
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("run")
        .args(WORKLOAD)
        .args([
            "--passes",
            "0",
            "--console",
            "none",
            "--json",
            "--api-socket",
        ])
        .arg(&sock)
        .args(extra);
    let bg = Bg::spawn("source", cmd);
    wait_api(&sock, Duration::from_secs(20));
    (bg, sock)
}

/// Waits until the guest behind `sock` has run `passes` passes, so its memory is no longer as
/// booted; fails the test naming what it waited for after `PASS_TIMEOUT`.
pub fn wait_some_passes(sock: &Path, passes: u64) {
    let deadline = Instant::now() + PASS_TIMEOUT;
    let mut last = serde_json::Value::Null;
    while Instant::now() < deadline {
        let (_, v, _) = remote(sock, &["status", "--json"]);
        if v["micro_passes"].as_u64().unwrap_or(0) >= passes {
            return;
        }
        last = v;
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "the micro guest at {} did not reach {passes} passes within {PASS_TIMEOUT:?}; last \
         status: {last}",
        sock.display()
    );
}

/// Tells the micro guest behind `sock` to end after `after` more passes (`vmm remote finish`);
/// returns the pass count it will end at.
pub fn finish(sock: &Path, after: u64) -> u64 {
    let (code, v, err) = remote(sock, &["finish", "--after", &after.to_string(), "--json"]);
    assert_eq!(code, Some(0), "finish --after {after}: {err}\n{v}");
    assert_eq!(v["ok"], true, "finish --after {after}: {v}");
    v["passes"]
        .as_u64()
        .unwrap_or_else(|| panic!("finish named no pass count: {v}"))
}

/// Tells the micro guest in `bg` to end after `after` more passes and checks it does: every
/// pass done and its memory equal to the model (whole pages). Returns its report.
pub fn finish_intact(bg: Bg, sock: &Path, after: u64) -> serde_json::Value {
    let name = bg.name.clone();
    let passes = finish(sock, after);
    let (code, rep, err) = bg.finish(PASS_TIMEOUT);
    assert_eq!(code, Some(0), "{name}:\n{err}\n{rep}");
    assert_micro_exit(&name, &rep, passes);
    rep
}

/// `rep` is a run report of a micro guest that ended by itself after `passes` passes with its
/// memory equal to the model.
pub fn assert_micro_exit(what: &str, rep: &serde_json::Value, passes: u64) {
    assert_eq!(rep["outcome"]["kind"], "micro-exit", "{what}: {rep}");
    assert_eq!(rep["micro_passes"].as_u64(), Some(passes), "{what}: {rep}");
    assert_eq!(rep["micro_check"]["mismatches"], 0, "{what}: {rep}");
    assert!(
        rep["micro_check"]["pages_checked"].as_u64().unwrap_or(0) > 0,
        "{what}: nothing checked: {rep}"
    );
}

/// Runs the same workload (`extra` as the source had) from boot to `passes` passes, never
/// snapshotted or migrated, and returns its RAM at the end (`--dump-final` DIR/reference.bin):
/// what every restored or migrated copy must end with.
pub fn reference_final(dir: &Path, passes: u64, extra: &[&str]) -> PathBuf {
    let out = dir.join(format!("reference-{passes}.bin"));
    let passes_s = passes.to_string();
    let mut args = vec!["run"];
    args.extend(WORKLOAD);
    args.extend(["--passes", &passes_s, "--console", "none", "--json"]);
    args.extend(["--dump-final", out.to_str().unwrap()]);
    args.extend(extra);
    let run = crate::vmm(&args);
    assert_eq!(run.code(), Some(0), "reference run:\n{}", run.stderr);
    assert_micro_exit("reference run", &run.report(), passes);
    out
}

/// The 4 KiB pages (indices) where two RAM images differ.
pub fn differing_pages(a: &Path, b: &Path) -> Vec<usize> {
    let x = std::fs::read(a).unwrap_or_else(|e| panic!("{}: {e}", a.display()));
    let y = std::fs::read(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {}: sizes",
        a.display(),
        b.display()
    );
    x.chunks(4096)
        .zip(y.chunks(4096))
        .enumerate()
        .filter(|(_, (p, q))| p != q)
        .map(|(i, _)| i)
        .collect()
}

/// Two RAM images are equal byte for byte; otherwise fails naming the pages.
pub fn assert_same_memory(what: &str, a: &Path, b: &Path) {
    let differing = differing_pages(a, b);
    assert!(
        differing.is_empty(),
        "{what}: {} pages differ between {} and {}, first at 0x{:x}; pages {:x?}",
        differing.len(),
        a.display(),
        b.display(),
        differing[0] * 4096,
        &differing[..differing.len().min(16)]
    );
}
