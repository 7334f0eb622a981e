//! Snapshots and restores of a VM with a passed-through device (the GPU-shaped test device over
//! vfio-user): the device's own state saved in the snapshot directory (`deviceN.bin`, listed
//! with its length and CRC-32 in vm.json) and loaded into a fresh device server on restore, by
//! the same rules as a live migration. A Linux guest whose device keeps stamping guest RAM
//! across the snapshot proves the state really moved; the micro guest covers the refusals.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vmm_tests::console::console;
use vmm_tests::micro::{finish_intact, micro_source, wait_some_passes};
use vmm_tests::process::{remote, wait_api, Bg};
use vmm_tests::snapshot::{assert_finished, snapshot_and_exit, snapshot_micro, Snap};
use vmm_tests::{gpu, run_with_timeout, vmm_bin};

const BDF: &str = "0000:00:01.0";

/// `vmm restore SNAP ARGS --console none --json`: (exit code, the JSON report, stderr).
fn restore(snap: &Path, args: &[&str]) -> (Option<i32>, Value, String) {
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("restore")
        .arg(snap)
        .args(["--console", "none", "--json"])
        .args(args);
    let run = run_with_timeout(cmd, "vmm restore", vmm_tests::run_timeout());
    let json = run
        .stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    run.assert_no_panic();
    (run.code(), json, run.stderr)
}

/// The restore was refused with `says`, before the guest ran (no run report).
fn refused_before_running(what: &str, r: (Option<i32>, Value, String), says: &str) {
    let (code, rep, err) = r;
    assert_eq!(code, Some(1), "{what}: {err}\n{rep}");
    assert!(rep.is_null(), "{what}: the guest ran: {rep}");
    assert!(err.contains(says), "{what}: wanted '{says}' in:\n{err}");
}

/// A snapshot directory like `snap`, with its device file replaced by `data`.
fn with_device_file(snap: &Snap, name: &str, data: &[u8]) -> std::path::PathBuf {
    let to = snap.dir.with_file_name(name);
    std::fs::create_dir(&to).unwrap();
    for f in ["vm.json", "memory"] {
        std::fs::copy(snap.dir.join(f), to.join(f)).unwrap();
    }
    std::fs::write(to.join("device0.bin"), data).unwrap();
    to
}

#[test]
fn a_micro_guest_with_a_device_is_restored_onto_a_fresh_device_which_gets_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let (_a, a_sock) = gpu::start(dir.path(), "a", &["--vram-size", "16M"]);
    let snap = snapshot_micro(dir.path(), &["--device", &gpu::spec(&a_sock)]);

    // The device's state is a file of its own, listed with its length and checksum.
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(snap.dir.join("vm.json")).unwrap()).unwrap();
    let listed = &manifest["devices"];
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["name"], "device0.bin", "{listed}");
    let file = snap.dir.join("device0.bin");
    let meta = std::fs::symlink_metadata(&file).unwrap();
    assert!(meta.is_file());
    assert!(meta.len() > 0, "the device saved nothing");
    assert_eq!(listed[0]["len"].as_u64(), Some(meta.len()), "{listed}");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // A fresh server of the same identity takes it, and the guest finishes its workload.
    let (_b, b_sock) = gpu::start(dir.path(), "b", &["--vram-size", "16M"]);
    let b = gpu::spec(&b_sock);
    let (code, rep, err) = restore(&snap.dir, &["--device", &b]);
    assert_finished("restore onto b", &snap, code, &rep, &err);
    assert_eq!(rep["run"]["passthrough"][0]["device"], b.as_str(), "{rep}");

    // The saved state reaches the device, which checks it: one with another VRAM size (same
    // vendor:device, so vmm's own check passes) refuses the stream, and says why.
    let (c, c_sock) = gpu::start(dir.path(), "c", &["--vram-size", "32M"]);
    refused_before_running(
        "a device with another VRAM size",
        restore(&snap.dir, &["--device", &gpu::spec(&c_sock)]),
        "writing its migration data",
    );
    let said = c.stderr();
    assert!(said.contains("VRAM size"), "{said}");
}

#[test]
fn a_restore_without_its_device_or_with_a_damaged_device_file_is_refused_before_the_guest_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (_a, a_sock) = gpu::start(dir.path(), "a", &["--vram-size", "16M"]);
    let snap = snapshot_micro(dir.path(), &["--device", &gpu::spec(&a_sock)]);
    let (_b, b_sock) = gpu::start(dir.path(), "b", &["--vram-size", "16M"]);
    let b = gpu::spec(&b_sock);

    refused_before_running(
        "no --device",
        restore(&snap.dir, &[]),
        "1 passed-through device(s) (1234:7e57)",
    );
    let (_other, other_sock) = gpu::start(
        dir.path(),
        "other",
        &["--vram-size", "16M", "--device", "0x1111"],
    );
    refused_before_running(
        "another function",
        restore(&snap.dir, &["--device", &gpu::spec(&other_sock)]),
        "passed-through device 0: the snapshot's is 1234:7e57",
    );

    let good = std::fs::read(snap.dir.join("device0.bin")).unwrap();
    let short = with_device_file(&snap, "short", &good[..good.len() - 1]);
    refused_before_running(
        "a truncated device file",
        restore(&short, &["--device", &b]),
        &format!("bytes, the manifest says {}", good.len()),
    );
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let corrupt = with_device_file(&snap, "corrupt", &flipped);
    refused_before_running(
        "a corrupted device file",
        restore(&corrupt, &["--device", &b]),
        "the file is corrupt",
    );
    let lazy = restore(
        &snap.dir,
        &["--device", &b, "--lazy", "--demand", "uffd-missing"],
    );
    refused_before_running("lazy without --prefetch", lazy, "needs --prefetch");

    // Server b was left as it was: the intact snapshot still restores onto it.
    let (code, rep, err) = restore(&snap.dir, &["--device", &b]);
    assert_finished("restore after the refusals", &snap, code, &rep, &err);
}

#[test]
fn a_lazy_restore_with_a_device_runs_it_once_every_page_is_in() {
    let dir = tempfile::tempdir().unwrap();
    let (_a, a_sock) = gpu::start(dir.path(), "a", &["--vram-size", "16M"]);
    let snap = snapshot_micro(dir.path(), &["--device", &gpu::spec(&a_sock)]);
    let (_b, b_sock) = gpu::start(dir.path(), "b", &["--vram-size", "16M"]);
    let (code, rep, err) = restore(
        &snap.dir,
        &[
            "--device",
            &gpu::spec(&b_sock),
            "--lazy",
            "--prefetch",
            "--demand",
            "uffd-missing",
        ],
    );
    assert_finished("lazy restore with a device", &snap, code, &rep, &err);
    assert!(rep["demand"]["filled_ms"].is_number(), "{rep}");
    assert!(
        err.contains("every page is in: passed-through devices run"),
        "{err}"
    );
}

#[test]
fn a_device_without_migration_refuses_the_snapshot_naming_it_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (_n, n_sock) = gpu::start(dir.path(), "n", &["--vram-size", "16M", "--no-migration"]);
    let spec = gpu::spec(&n_sock);
    let (src, sock) = micro_source(dir.path(), &["--device", &spec]);
    wait_some_passes(&sock, 5);
    let snap = dir.path().join("snap");
    let (code, reply, _) = remote(
        &sock,
        &["snapshot", "--to", snap.to_str().unwrap(), "--json"],
    );
    assert_ne!(code, Some(0), "{reply}");
    let err = reply["error"].as_str().unwrap_or_default();
    assert!(
        err.contains(&spec)
            && err.contains("no VFIO migration support")
            && err.contains("refused before anything was written"),
        "{reply}"
    );
    assert!(!snap.exists(), "a refused snapshot wrote something");
    // The guest was never paused for it: it runs on and ends intact.
    let (_, now, _) = remote(&sock, &["status", "--json"]);
    let passes = now["micro_passes"].as_u64().unwrap_or(0);
    wait_some_passes(&sock, passes + 5);
    finish_intact(src, &sock, passes + 10);
}

/// Waits until the console at `path` has an agent line starting with `prefix`, or an agent
/// error line (so a failing step fails the test at once, with its reason).
fn wait_agent(path: &Path, prefix: &str, vm: &mut Bg) -> String {
    vmm_tests::console::wait_agent_line(
        path,
        &format!("'{prefix}' (or an error)"),
        |l| l.starts_with(prefix) || l.starts_with("error "),
        Duration::from_secs(180),
        vm,
    )
}

/// The device's page writer stamps guest RAM by DMA before the snapshot, is saved mid-run with
/// it, and goes on from the restored state on a fresh server: at the stop, the agent checks
/// every page's stamp against the device's write count (which only the moved state has).
#[test]
fn a_linux_guest_whose_device_dma_runs_across_a_snapshot_and_restore_checks_out() {
    let dir = tempfile::tempdir().unwrap();
    let (_a, a_sock) = gpu::start(dir.path(), "a", &["--vram-size", "64M"]);
    let a_console = dir.path().join("a.txt");
    let a_api = dir.path().join("a-api.sock");
    let script = format!("vfio-bind,{BDF};vfio-workload,{BDF},start,dma,2000");
    let mut cmd = Command::new(vmm_bin());
    cmd.args(gpu::linux_run_args(&a_sock, &script, &a_console))
        .arg("--api-socket")
        .arg(&a_api)
        .arg("--json");
    let mut src = Bg::spawn("source", cmd);
    let started = format!("vfio-workload {BDF} started=dma");
    let line = wait_agent(&a_console, &started, &mut src);
    assert!(line.starts_with(&started), "{line}");
    let snap = dir.path().join("snap");
    snapshot_and_exit(src, &a_api, &snap);
    assert!(std::fs::metadata(snap.join("device0.bin")).unwrap().len() > 0);

    let (_b, b_sock) = gpu::start(dir.path(), "b", &["--vram-size", "64M"]);
    let b_console = dir.path().join("b.txt");
    let b_api = dir.path().join("b-api.sock");
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("restore")
        .arg(&snap)
        .args(["--device", &gpu::spec(&b_sock), "--json", "--console"])
        .arg(format!("file:{}", b_console.display()))
        .arg("--api-socket")
        .arg(&b_api);
    let mut dst = Bg::spawn("restored", cmd);
    wait_api(&b_api, Duration::from_secs(60));
    let (c, _, e) = remote(&b_api, &["console", &format!("vfio-workload,{BDF},stop")]);
    assert_eq!(c, Some(0), "{e}");
    let line = wait_agent(
        &b_console,
        &format!("vfio-workload {BDF} stopped"),
        &mut dst,
    );
    assert!(
        line.starts_with(&format!("vfio-workload {BDF} stopped=dma")) && line.contains("ok=true"),
        "{line}\nconsole:\n{}",
        console(&b_console)
    );
    let (c, _, e) = remote(&b_api, &["console", "poweroff"]);
    assert_eq!(c, Some(0), "{e}");
    let (code, rep, err) = dst.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{err}\n{rep}");
    assert_eq!(
        rep["run"]["passthrough"][0]["device"],
        gpu::spec(&b_sock),
        "{rep}"
    );
}

#[test]
fn a_snapshot_failing_after_the_devices_stopped_puts_them_back_and_the_guest_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let (_a, a_sock) = gpu::start(dir.path(), "a", &["--vram-size", "16M"]);
    let (src, sock) = micro_source(dir.path(), &["--device", &gpu::spec(&a_sock)]);
    wait_some_passes(&sock, 5);
    // Under a regular file: the device files cannot be created, after the devices stopped.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"").unwrap();
    let bad = blocker.join("snap");
    let (code, reply, _) = remote(
        &sock,
        &["snapshot", "--to", bad.to_str().unwrap(), "--json"],
    );
    assert_ne!(code, Some(0), "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("file/snap"),
        "{reply}"
    );
    // The device ran again (a second snapshot steps it from RUNNING once more) and the guest
    // was resumed.
    let (_, now, _) = remote(&sock, &["status", "--json"]);
    let passes = now["micro_passes"].as_u64().unwrap_or(0);
    wait_some_passes(&sock, passes + 5);
    let good = dir.path().join("snap");
    let (code, reply, err) = remote(
        &sock,
        &["snapshot", "--to", good.to_str().unwrap(), "--json"],
    );
    assert_eq!(code, Some(0), "{reply}\n{err}");
    assert!(good.join("vm.json").is_file());
    let log = src.stderr();
    assert!(!log.contains("after a failed snapshot"), "{log}");
    finish_intact(src, &sock, passes + 10);
}
