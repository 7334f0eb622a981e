//! Live migration of the micro guest on the real /dev/kvm over real TCP (loopback): precopy with
//! every tracker this host offers, postcopy and hybrid. Each checks that the destination's
//! memory equals the source's at its pause byte for byte (both sides dump it) and that the
//! workload goes on to the end there and matches its reference model.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vmm_tests::micro::{micro_source, wait_some_passes};
use vmm_tests::process::{free_port, remote, Bg};
use vmm_tests::vmm_bin;

/// Passes long enough that the guest is still running when the migration starts, short enough
/// that it finishes soon after on the destination.
const PASSES: u64 = 20000;

fn destination(dir: &Path, port: u16, extra: &[&str]) -> Bg {
    let mut cmd = Command::new(vmm_bin());
    cmd.args(["run", "--incoming", &format!("tcp://127.0.0.1:{port}")])
        .args(["--console", "none", "--json", "--dump-memory"])
        .arg(dir.join("dst.bin"))
        .args(extra);
    let mut bg = Bg::spawn("destination", cmd);
    bg.wait_for("waiting for an incoming migration", Duration::from_secs(20));
    bg
}

fn migrate_micro(mode: &str, tracker: &str, source_extra: &[&str]) {
    migrate_micro_to(mode, tracker, source_extra, &[]);
}

fn migrate_micro_to(mode: &str, tracker: &str, source_extra: &[&str], dest_extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let dst = destination(dir.path(), port, dest_extra);
    let (src, sock) = micro_source(dir.path(), PASSES, source_extra);
    // Let it run some passes first, so memory is not as booted.
    wait_some_passes(&sock, 200);
    let src_dump = dir.path().join("src.bin");
    let (code, reply, err) = remote(
        &sock,
        &[
            "migrate",
            "--to",
            &format!("tcp://127.0.0.1:{port}"),
            "--mode",
            mode,
            "--tracker",
            tracker,
            "--dump-memory",
            src_dump.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(
        code,
        Some(0),
        "{mode}/{tracker}: migrate failed: {err}\n{reply}"
    );
    let report = &reply["report"];
    assert_eq!(report["ok"], true, "{report}");
    eprintln!(
        "{mode}/{tracker}: total {} ms, downtime {} ms, rounds {}, pages/round {}, postcopy {}",
        report["total_ms"],
        report["downtime_ms"],
        report["rounds"],
        report["pages_per_round"],
        report["postcopy"]
    );
    let (scode, srep, serr) = src.finish(Duration::from_secs(30));
    assert_eq!(scode, Some(0), "source:\n{serr}");
    assert_eq!(srep["outcome"]["kind"], "migrated", "{srep}");
    let (dcode, drep, derr) = dst.finish(Duration::from_secs(120));
    assert_eq!(
        dcode,
        Some(0),
        "{mode}/{tracker}: destination:\n{derr}\n{drep}"
    );
    assert_eq!(drep["outcome"]["kind"], "micro-exit", "{drep}");
    assert_eq!(drep["micro_passes"].as_u64(), Some(PASSES));
    assert_eq!(drep["micro_check"]["mismatches"], 0, "{drep}");
    assert_eq!(drep["migration"]["ok"], true, "{drep}");
    let a = std::fs::read(&src_dump).unwrap();
    let b = std::fs::read(dir.path().join("dst.bin")).unwrap();
    assert_eq!(a.len(), b.len());
    let differing: Vec<usize> = a
        .chunks(4096)
        .zip(b.chunks(4096))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect();
    if let Some(&first) = differing.first() {
        let at = first * 4096;
        let word = |m: &[u8]| u64::from_le_bytes(m[at..at + 8].try_into().unwrap());
        panic!(
            "{mode}/{tracker}: memory differs on {} pages, first 0x{:x} (source word 0x{:x}, destination 0x{:x}); pages {:x?}\nsource report {srep}\ndestination report {drep}",
            differing.len(),
            at,
            word(&a),
            word(&b),
            &differing[..differing.len().min(16)]
        );
    }
}

#[test]
fn precopy_with_every_tracker_moves_memory_byte_for_byte() {
    for tracker in ["bitmap", "bitmap-manual", "uffd-wp", "uffd-wp-async"] {
        migrate_micro("precopy", tracker, &[]);
    }
    migrate_micro("precopy", "ring", &["--dirty-ring"]);
}

#[test]
fn postcopy_moves_memory_byte_for_byte() {
    migrate_micro("postcopy", "bitmap", &[]);
}

#[test]
fn hybrid_moves_memory_byte_for_byte() {
    migrate_micro("hybrid", "bitmap", &[]);
}

/// The destination's other demand-paging backends: userfaultfd MINOR, and vCPU exits from
/// memslot holes (whose page tables, GDT and TSS the destination maps before resuming).
#[test]
fn postcopy_on_every_demand_backend_moves_memory_byte_for_byte() {
    migrate_micro_to("postcopy", "bitmap", &[], &["--demand", "uffd-minor"]);
    migrate_micro_to("postcopy", "bitmap", &[], &["--demand", "memslot-exits"]);
    migrate_micro_to(
        "hybrid",
        "bitmap",
        &[],
        &["--demand", "memslot-exits", "--demand-chunk", "64K"],
    );
}
