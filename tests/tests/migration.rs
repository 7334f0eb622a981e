//! Live migration of the micro guest on the real /dev/kvm over real TCP (loopback): precopy with
//! every tracker, postcopy and hybrid on every demand backend. The source runs until told to
//! stop, so no migration races its workload. Each checks that the destination ends with the
//! RAM of a run that was never migrated, byte for byte (`--dump-final`: read as the guest sees
//! it once every page has arrived), that its workload goes on to the end there and matches its
//! model, and for precopy also that the destination's RAM before it runs equals the source's
//! at its pause. A corrupted postcopy install (test builds' fault injection) must fail it.
//! Every migration here runs over TLS with a pre-shared key (`--tls-psk`, the default way of
//! the house; both connections of postcopy and hybrid), and the reports must say so.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vmm_tests::micro::{
    assert_same_memory, differing_pages, finish, micro_source, reference_final, wait_some_passes,
    PASS_TIMEOUT,
};
use vmm_tests::process::{free_port, remote, wait_api, Bg};
use vmm_tests::vmm_bin;

/// Passes the guest runs on the destination after the migration.
const AFTER: u64 = 2000;

/// The pre-shared key both sides of a migration in `dir` name (made on first use).
fn psk(dir: &Path) -> String {
    let path = dir.join("keys.psk");
    if !path.exists() {
        vmm_tests::tls::psk_file(dir, "keys.psk");
    }
    path.to_str().unwrap().to_string()
}

fn destination(dir: &Path, port: u16, mode: &str, extra: &[&str], env: &[(&str, &str)]) -> Bg {
    let mut cmd = Command::new(vmm_bin());
    cmd.args(["run", "--incoming", &format!("tcp://127.0.0.1:{port}")])
        .args(["--tls-psk", &psk(dir)])
        .args(["--console", "none", "--json", "--api-socket"])
        .arg(dir.join("dst.sock"))
        .arg("--dump-final")
        .arg(dir.join("dst-final.bin"))
        .args(extra)
        .envs(env.iter().copied());
    if mode == "precopy" {
        cmd.arg("--dump-memory").arg(dir.join("dst-received.bin"));
    }
    let mut bg = Bg::spawn("destination", cmd);
    bg.wait_for("waiting for an incoming migration", Duration::from_secs(20));
    bg
}

/// Migrates a micro source to a destination (`dest_extra`, `env`), tells the destination's
/// guest to end `AFTER` passes later and checks how it ended. Returns the temporary directory
/// and the pages where the destination's final RAM differs from the reference.
fn migrate(
    mode: &str,
    tracker: &str,
    source_extra: &[&str],
    dest_extra: &[&str],
    env: &[(&str, &str)],
) -> (tempfile::TempDir, Vec<usize>) {
    migrate_with(mode, tracker, source_extra, dest_extra, env, None)
}

/// `migrate`, with `channels` data connections asked for (`--channels`) and checked in both
/// sides' reports.
fn migrate_with(
    mode: &str,
    tracker: &str,
    source_extra: &[&str],
    dest_extra: &[&str],
    env: &[(&str, &str)],
    channels: Option<u8>,
) -> (tempfile::TempDir, Vec<usize>) {
    let what = format!("{mode}/{tracker} {dest_extra:?} channels {channels:?}");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let dst = destination(dir.path(), port, mode, dest_extra, env);
    let (src, sock) = micro_source(dir.path(), source_extra);
    // Let it run some passes first, so memory is not as booted.
    wait_some_passes(&sock, 20);
    let src_dump = dir.path().join("src.bin");
    let psk_file = psk(dir.path());
    let to = format!("tcp://127.0.0.1:{port}");
    let n = channels.map(|c| c.to_string());
    let mut args = vec![
        "migrate",
        "--tls-psk",
        &psk_file,
        "--to",
        &to,
        "--mode",
        mode,
        "--tracker",
        tracker,
        "--dump-memory",
        src_dump.to_str().unwrap(),
        "--json",
    ];
    if let Some(n) = &n {
        args.extend(["--channels", n.as_str()]);
    }
    let (code, reply, err) = remote(&sock, &args);
    assert_eq!(code, Some(0), "{what}: migrate failed: {err}\n{reply}");
    let report = &reply["report"];
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["transport"], "tls-psk", "{report}");
    // Postcopy has no precopy rounds and opens no data connection.
    let expected_channels = match channels {
        Some(c) if c > 0 && mode != "postcopy" => serde_json::json!(c),
        _ => serde_json::Value::Null,
    };
    assert_eq!(report["channels"], expected_channels, "{what}: {report}");
    eprintln!(
        "{what}: total {} ms, downtime {} ms, rounds {}, pages/round {}, postcopy {}",
        report["total_ms"],
        report["downtime_ms"],
        report["rounds"],
        report["pages_per_round"],
        report["postcopy"]
    );
    let (scode, srep, serr) = src.finish(Duration::from_secs(30));
    assert_eq!(scode, Some(0), "source:\n{serr}");
    assert_eq!(srep["outcome"]["kind"], "migrated", "{srep}");

    let dst_sock = dir.path().join("dst.sock");
    wait_api(&dst_sock, Duration::from_secs(20));
    let passes = finish(&dst_sock, AFTER);
    let (dcode, drep, derr) = dst.finish(PASS_TIMEOUT);
    assert_eq!(drep["migration"]["ok"], true, "{what}: {drep}\n{derr}");
    assert_eq!(drep["migration"]["transport"], "tls-psk", "{what}: {drep}");
    assert_eq!(
        drep["migration"]["channels"], expected_channels,
        "{what}: {drep}"
    );
    if env.is_empty() {
        assert_eq!(dcode, Some(0), "{what}: destination:\n{derr}\n{drep}");
        vmm_tests::micro::assert_micro_exit(&what, &drep, passes);
    }
    if mode == "precopy" {
        assert_same_memory(
            &format!("{what}: received vs the source at its pause"),
            &src_dump,
            &dir.path().join("dst-received.bin"),
        );
    }
    let reference = reference_final(dir.path(), passes, source_extra);
    let differing = differing_pages(&reference, &dir.path().join("dst-final.bin"));
    (dir, differing)
}

fn migrate_micro(mode: &str, tracker: &str, source_extra: &[&str], dest_extra: &[&str]) {
    let (dir, differing) = migrate(mode, tracker, source_extra, dest_extra, &[]);
    assert!(
        differing.is_empty(),
        "{mode}/{tracker} {dest_extra:?}: the destination's final RAM differs from a run never \
         migrated on {} pages, first 0x{:x}; pages {:x?} (kept in {})",
        differing.len(),
        differing[0] * 4096,
        &differing[..differing.len().min(16)],
        dir.keep().display()
    );
}

/// Every tracker `vmm backends` offers here (soft-dirty is refused for migration by design);
/// one it does not offer must be refused with its reason, the source running on.
#[test]
fn precopy_with_every_tracker_this_host_offers_moves_memory_byte_for_byte() {
    let mut tried = 0;
    for (tracker, available, reason) in vmm_tests::backends() {
        if tracker == "soft-dirty" {
            continue;
        }
        let source_extra: &[&str] = if tracker == "ring" {
            &["--dirty-ring"]
        } else {
            &[]
        };
        if available {
            migrate_micro("precopy", &tracker, source_extra, &[]);
            tried += 1;
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let dst = destination(dir.path(), port, "precopy", &[], &[]);
        let (src, sock) = micro_source(dir.path(), source_extra);
        let to = format!("tcp://127.0.0.1:{port}");
        let (code, reply, err) = remote(
            &sock,
            &[
                "migrate",
                "--tls-psk",
                &psk(dir.path()),
                "--to",
                &to,
                "--tracker",
                &tracker,
                "--json",
            ],
        );
        assert_eq!(code, Some(1), "{tracker}: {reply}\n{err}");
        let why = reply["error"].as_str().unwrap_or_default();
        let head: String = reason.unwrap_or_default().chars().take(40).collect();
        assert!(why.contains(&head), "{tracker}: {why} (reason: {head})");
        drop(dst);
        vmm_tests::micro::finish_intact(src, &sock, 100);
    }
    assert!(
        tried > 0,
        "no tracker offered here: vmm could not migrate at all"
    );
}

/// Precopy pages over several data connections (`--channels`), each stored by its own thread on
/// the destination: the received RAM is the source's at its pause, and the final RAM the
/// reference's, for precopy (2 and 3 connections) and for hybrid.
#[test]
fn data_channels_move_memory_byte_for_byte() {
    for (mode, tracker, channels) in [
        ("precopy", "bitmap", 2),
        ("precopy", "bitmap", 3),
        ("hybrid", "bitmap", 2),
    ] {
        let (dir, differing) = migrate_with(mode, tracker, &[], &[], &[], Some(channels));
        assert!(
            differing.is_empty(),
            "{mode}/{tracker} over {channels} channels: final RAM differs on {} pages (kept in \
             {})",
            differing.len(),
            dir.keep().display()
        );
    }
}

#[test]
fn postcopy_moves_memory_byte_for_byte() {
    migrate_micro("postcopy", "bitmap", &[], &[]);
}

#[test]
fn hybrid_moves_memory_byte_for_byte() {
    migrate_micro("hybrid", "bitmap", &[], &[]);
}

/// The destination's other demand-paging backends: userfaultfd MINOR, and vCPU exits from
/// memslot holes (whose page tables, GDT and TSS the destination maps before resuming).
#[test]
fn postcopy_on_every_demand_backend_moves_memory_byte_for_byte() {
    migrate_micro("postcopy", "bitmap", &[], &["--demand", "uffd-minor"]);
    migrate_micro("postcopy", "bitmap", &[], &["--demand", "memslot-exits"]);
    migrate_micro(
        "hybrid",
        "bitmap",
        &[],
        &["--demand", "memslot-exits", "--demand-chunk", "64K"],
    );
}

/// The postcopy check, proven able to fail: the destination installs the TSS page with one
/// byte flipped in its middle (test builds' `VMM_INJECT_INSTALL_FAULT`; the guest runs on
/// unharmed), and its final RAM must differ from the reference on exactly that page. A
/// destination started with --dump-memory (RAM before the guest runs, never whole in postcopy)
/// refuses a postcopy migration, and the source runs on.
#[test]
fn a_corrupted_postcopy_install_fails_the_byte_for_byte_check() {
    let tss = guest_abi::layout::TSS_GPA;
    let inject = format!("corrupt@0x{tss:x}");
    let (_dir, differing) = migrate(
        "postcopy",
        "bitmap",
        &[],
        &[],
        &[("VMM_INJECT_INSTALL_FAULT", &inject)],
    );
    assert_eq!(differing, vec![(tss / 4096) as usize], "{inject}");

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let dst = destination(dir.path(), port, "precopy", &[], &[]);
    let (src, sock) = micro_source(dir.path(), &[]);
    let to = format!("tcp://127.0.0.1:{port}");
    let (code, reply, _) = remote(
        &sock,
        &[
            "migrate",
            "--tls-psk",
            &psk(dir.path()),
            "--to",
            &to,
            "--mode",
            "postcopy",
            "--json",
        ],
    );
    assert_eq!(code, Some(1), "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or("")
            .contains("--dump-final"),
        "{reply}"
    );
    let (dcode, _, derr) = dst.finish(Duration::from_secs(30));
    assert_eq!(dcode, Some(1), "{derr}");
    vmm_tests::micro::finish_intact(src, &sock, 100);
}

/// A guest the user paused (`vmm remote pause`) migrates as it is, as QEMU migrates a stopped
/// VM: the stop-and-copy takes over the user's pause instead of failing on it, and the
/// destination keeps the guest paused until its own `resume`. Then it runs to the end there,
/// its memory equal to the model and to a run never migrated.
fn migrate_paused(mode: &str) {
    let what = format!("paused {mode}");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let dst = destination(dir.path(), port, mode, &[], &[]);
    let (src, sock) = micro_source(dir.path(), &[]);
    wait_some_passes(&sock, 20);
    let (code, v, err) = remote(&sock, &["pause"]);
    assert_eq!(code, Some(0), "{what}: pause: {err}\n{v}");
    let (_, status, _) = remote(&sock, &["status", "--json"]);
    assert_eq!(status["state"], "paused", "{what}: {status}");
    let paused_at = status["micro_passes"].as_u64().unwrap();
    let (code, reply, err) = remote(
        &sock,
        &[
            "migrate",
            "--tls-psk",
            &psk(dir.path()),
            "--to",
            &format!("tcp://127.0.0.1:{port}"),
            "--mode",
            mode,
            "--json",
        ],
    );
    assert_eq!(code, Some(0), "{what}: migrate failed: {err}\n{reply}");
    assert_eq!(reply["report"]["ok"], true, "{what}: {reply}");
    let (scode, srep, serr) = src.finish(Duration::from_secs(30));
    assert_eq!(scode, Some(0), "{what}: source:\n{serr}");
    assert_eq!(srep["outcome"]["kind"], "migrated", "{what}: {srep}");

    let dst_sock = dir.path().join("dst.sock");
    wait_api(&dst_sock, Duration::from_secs(20));
    // Still paused a while later: not a moment before the vCPUs started.
    std::thread::sleep(Duration::from_millis(300));
    let (_, status, _) = remote(&dst_sock, &["status", "--json"]);
    assert_eq!(status["state"], "paused", "{what}: destination: {status}");
    assert_eq!(
        status["micro_passes"].as_u64(),
        Some(paused_at),
        "{what}: the guest ran on the destination while paused: {status}"
    );
    let (code, v, err) = remote(&dst_sock, &["resume"]);
    assert_eq!(
        code,
        Some(0),
        "{what}: resume on the destination: {err}\n{v}"
    );
    let passes = finish(&dst_sock, AFTER);
    let (dcode, drep, derr) = dst.finish(PASS_TIMEOUT);
    assert_eq!(dcode, Some(0), "{what}: destination:\n{derr}\n{drep}");
    assert_eq!(drep["migration"]["ok"], true, "{what}: {drep}");
    vmm_tests::micro::assert_micro_exit(&what, &drep, passes);
    let reference = reference_final(dir.path(), passes, &[]);
    let differing = differing_pages(&reference, &dir.path().join("dst-final.bin"));
    assert!(
        differing.is_empty(),
        "{what}: the destination's final RAM differs from a run never migrated on {} pages",
        differing.len()
    );
}

#[test]
fn a_guest_paused_by_the_user_migrates_by_precopy_and_stays_paused_there() {
    migrate_paused("precopy");
}

#[test]
fn a_guest_paused_by_the_user_migrates_by_postcopy_and_stays_paused_there() {
    migrate_paused("postcopy");
}

#[test]
fn a_guest_paused_by_the_user_migrates_by_hybrid_and_stays_paused_there() {
    migrate_paused("hybrid");
}
