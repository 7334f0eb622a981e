//! Snapshots and lazy restore of the micro guest on the real /dev/kvm, with every demand-paging
//! backend: each restored guest must end with the RAM of a run that was never snapshotted,
//! byte for byte (`--dump-final` reads guest RAM as the guest sees it, after every page the run
//! did not touch was brought in through the same installs), and its workload must finish and
//! match its reference model, whole pages. A corrupted or misplaced install (test builds'
//! fault injection) must fail those checks. Then each special case of the exit backend
//! (instruction fetch, pages KVM touches itself, the memslot limit), and kvm-userfault: done
//! whole where the kernel has KVM_MEM_USERFAULT, refused with the kernel's answer where not.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vmm_tests::micro::{assert_same_memory, differing_pages, reference_final, wait_some_passes};
use vmm_tests::process::{remote, wait_api, Bg};
use vmm_tests::snapshot::{assert_finished, snapshot_micro, Snap};
use vmm_tests::{run_with_timeout, vmm_bin};

/// `vmm restore SNAP ARGS --json` with `env` set: (exit code, the JSON report, stderr).
fn restore_env(snap: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, Value, String) {
    let mut cmd = Command::new(vmm_bin());
    cmd.arg("restore")
        .arg(snap)
        .args(["--console", "none", "--json"])
        .args(args)
        .envs(env.iter().copied());
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

fn restore(snap: &Path, args: &[&str]) -> (Option<i32>, Value, String) {
    restore_env(snap, args, &[])
}

/// Every demand backend these tests run on any host (kvm-userfault has its own test).
const BACKENDS: [&str; 3] = ["uffd-missing", "uffd-minor", "memslot-exits"];

/// Restores `snap` with `args` plus `--dump-final`; checks the run and that it ended with the
/// reference RAM.
fn restore_matches(what: &str, snap: &Snap, reference: &Path, args: &[&str]) -> Value {
    let dump = snap
        .dir
        .with_file_name(format!("{}.bin", what.replace([' ', '/'], "_")));
    let mut all = args.to_vec();
    all.extend(["--dump-final", dump.to_str().unwrap()]);
    let (code, rep, err) = restore(&snap.dir, &all);
    assert_finished(what, snap, code, &rep, &err);
    assert_same_memory(what, reference, &dump);
    rep
}

#[test]
fn eager_and_lazy_restores_end_with_the_ram_of_a_run_never_snapshotted() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot_micro(dir.path(), &[]);
    let reference = reference_final(dir.path(), snap.passes, &[]);

    // Eager: guest RAM as restored is the snapshot's memory, and at the end the reference.
    let start = dir.path().join("eager-start.bin");
    restore_matches(
        "eager",
        &snap,
        &reference,
        &["--dump-memory", start.to_str().unwrap()],
    );
    assert_same_memory("eager as restored", &snap.dir.join("memory"), &start);

    for backend in BACKENDS {
        // Pure demand paging: each page comes in when first touched; the rest after the run.
        let rep = restore_matches(backend, &snap, &reference, &["--lazy", "--demand", backend]);
        let d = &rep["demand"];
        assert_eq!(d["backend"], backend);
        assert!(d["faults"].as_u64().unwrap_or(0) > 0, "{backend}: {d}");
        eprintln!(
            "{backend}: {} faults, {} of {} pages installed, {} eager, fault p50 {} us",
            d["faults"],
            d["pages_installed"],
            d["data_pages"],
            d["eager_pages"],
            d["fault_us"]["p50"]
        );
        // With the prefetch every page comes in while the guest runs.
        let what = format!("{backend} --prefetch");
        let args = ["--lazy", "--demand", backend, "--prefetch"];
        let rep = restore_matches(&what, &snap, &reference, &args);
        assert_eq!(
            rep["demand"]["pages_installed"], rep["demand"]["data_pages"],
            "{backend}: {rep}"
        );
    }
}

/// The page of the snapshot's memory file at `gpa` (low RAM: file offset = GPA).
fn snapshot_page(snap: &Snap, gpa: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(snap.dir.join("memory")).unwrap();
    let mut page = vec![0u8; 4096];
    f.read_exact_at(&mut page, gpa).unwrap();
    page
}

/// The checks above, proven able to fail: each backend installs one page wrong (test builds'
/// `VMM_INJECT_INSTALL_FAULT`), and the restore must fail its model check or end with RAM
/// that differs from the reference on exactly that page. A region page with one byte flipped
/// in its middle is caught by both; the TSS filled from the next page's data (the guest runs
/// on unharmed, its TSS already loaded) only by the RAM comparison.
#[test]
fn a_corrupted_or_misplaced_install_fails_the_byte_for_byte_check() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot_micro(dir.path(), &[]);
    let reference = reference_final(dir.path(), snap.passes, &[]);
    // A region page that holds data in the snapshot (so it is installed, not zero-filled).
    let region = guest_abi::layout::MICRO_REGION_GPA;
    let page = (8..1024)
        .map(|i| region + i * 4096)
        .find(|&gpa| snapshot_page(&snap, gpa).iter().any(|&b| b != 0))
        .expect("a written region page in the snapshot");
    let tss = guest_abi::layout::TSS_GPA;
    assert_ne!(snapshot_page(&snap, tss), snapshot_page(&snap, tss + 4096));
    for backend in BACKENDS {
        for (fault, at) in [("corrupt", page), ("misplace", tss)] {
            let what = format!("{backend} {fault}@0x{at:x}");
            let dump = dir.path().join("injected.bin");
            let _ = std::fs::remove_file(&dump);
            let inject = format!("{fault}@0x{at:x}");
            let (code, rep, err) = restore_env(
                &snap.dir,
                &[
                    "--lazy",
                    "--demand",
                    backend,
                    "--dump-final",
                    dump.to_str().unwrap(),
                ],
                &[("VMM_INJECT_INSTALL_FAULT", &inject)],
            );
            assert!(
                err.contains("VMM_INJECT_INSTALL_FAULT"),
                "{what}: not injected\n{err}"
            );
            let model_failed =
                code != Some(0) || rep["run"]["micro_check"]["mismatches"].as_u64() != Some(0);
            let differing = if dump.exists() {
                differing_pages(&reference, &dump)
            } else {
                Vec::new()
            };
            eprintln!(
                "{what}: exit {code:?}, model mismatches {}, pages differing from the reference {:x?}",
                rep["run"]["micro_check"]["mismatches"],
                differing.iter().map(|p| p * 4096).collect::<Vec<_>>()
            );
            assert!(
                model_failed || !differing.is_empty(),
                "{what}: a wrong install went unseen\n{rep}"
            );
            // A guest that still ran every pass ends with the reference RAM but for that page
            // (one that crashed on it, as another host might, fails the checks anyway).
            if rep["run"]["micro_passes"].as_u64() == Some(snap.passes) {
                assert_eq!(differing, vec![(at / 4096) as usize], "{what}");
            }
            if fault == "corrupt" {
                // The page's middle byte: only a whole-page model check sees it.
                assert!(model_failed, "{what}: the model check missed it\n{rep}");
                assert!(
                    !differing.is_empty(),
                    "{what}: the RAM comparison missed it"
                );
            }
        }
    }
}

/// memslot-exits' special cases, each shown handled on the real guest:
/// - the first instruction fetch from a missing code page (an emulation failure without a GPA:
///   the vCPU translates its RIP);
/// - pages KVM touches itself (page tables, GDT/TSS with the I/O bitmap every CPL3 `out`
///   reads): mapped before the vCPU runs, or the guest would triple-fault;
/// - the memslot limit: with a soft limit of 8 slots, chunks get merged with their neighbours.
#[test]
fn memslot_exits_handles_code_fetches_kvms_own_pages_and_the_slot_limit() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot_micro(dir.path(), &[]);
    let (code, rep, err) = restore(
        &snap.dir,
        &[
            "--lazy",
            "--demand",
            "memslot-exits",
            "--demand-soft-slots",
            "8",
        ],
    );
    assert_finished("memslot-exits", &snap, code, &rep, &err);
    let d = &rep["demand"];
    let x = &d["exits"];
    let num = |v: &Value| {
        v.as_u64()
            .unwrap_or_else(|| panic!("missing figure in the demand report: {d}"))
    };
    assert!(num(&x["ifetch"]) >= 1, "no code fetch exit: {d}");
    // PML4 + PDPT + 4 PDs + GDT + TSS at least.
    assert!(num(&d["eager_pages"]) >= 6, "{d}");
    assert!(num(&x["merges"]) > 0, "{d}");
    // Merging keeps the slots nowhere near one per installed page (the VMM's own policy:
    // the 8 soft slots plus the runs mapped at arm and the pinned pages).
    assert!(
        num(&x["memslots_max"]) * 8 < num(&d["pages_installed"]),
        "{d}"
    );

    // 2 MiB chunks: far fewer exits, the same memory.
    let (code, rep2, err) = restore(
        &snap.dir,
        &[
            "--lazy",
            "--demand",
            "memslot-exits",
            "--demand-chunk",
            "2M",
        ],
    );
    assert_finished("memslot-exits 2M", &snap, code, &rep2, &err);
    assert!(
        num(&rep2["demand"]["exits"]["fetched"]) < num(&x["fetched"]),
        "{rep2}"
    );
}

#[test]
fn kvm_userfault_is_refused_with_the_kernels_answer_and_bad_snapshots_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot_micro(dir.path(), &[]);
    let (code, rep, err) = restore(&snap.dir, &["--lazy", "--demand", "kvm-userfault"]);
    if err.contains("is not available") {
        // A kernel without the series: the refusal names the capability and the errno the
        // kernel answered (which errno is the kernel's business, not this test's).
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("KVM_MEM_USERFAULT"), "{err}");
        assert!(
            err.contains("returned E") || err.contains("returned errno"),
            "no errno: {err}"
        );
    } else {
        // A kernel with the series: the backend must then do the whole job.
        assert_finished("kvm-userfault", &snap, code, &rep, &err);
    }

    let (code, _, err) = restore(&snap.dir, &["--lazy", "--demand", "nope"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("unknown backend"), "{err}");
    let (code, _, err) = restore(&snap.dir, &["--lazy", "--demand-chunk", "3K"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("power of two"), "{err}");
    // Guest RAM before the run is not whole under lazy restore: refused, pointing elsewhere.
    let (code, _, err) = restore(
        &snap.dir,
        &[
            "--lazy",
            "--dump-memory",
            dir.path().join("x").to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--dump-memory") && err.contains("--lazy"),
        "{err}"
    );

    // A truncated memory file, a manifest from the future, and no snapshot at all.
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(snap.dir.join("vm.json"), bad.join("vm.json")).unwrap();
    std::fs::write(bad.join("memory"), vec![0u8; 4096]).unwrap();
    let (code, _, err) = restore(&bad, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("the VM has"), "{err}");
    let manifest = std::fs::read_to_string(snap.dir.join("vm.json")).unwrap();
    let current = format!("\"version\": {}", vmm::snapshot::files::VERSION);
    assert!(manifest.contains(&current), "{manifest}");
    std::fs::write(
        bad.join("vm.json"),
        manifest.replacen(&current, "\"version\": 99", 1),
    )
    .unwrap();
    let (code, _, err) = restore(&bad, &[]);
    assert_eq!(code, Some(1));
    let ours = format!("version {}", vmm::snapshot::files::VERSION);
    assert!(err.contains("version 99") && err.contains(&ours), "{err}");
    let (code, _, err) = restore(&dir.path().join("none"), &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("vm.json"), "{err}");
}

/// Four vCPUs, each on its own region and all on a shared one (each its own slot of every
/// shared page), demand-paging at once: every backend ends with the reference RAM and the
/// model.
#[test]
fn four_vcpus_on_private_and_shared_regions_restore_lazily_with_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let extra = ["--vcpus", "4", "--shared-pages", "64"];
    let snap = snapshot_micro(dir.path(), &extra);
    let reference = reference_final(dir.path(), snap.passes, &extra);
    for backend in BACKENDS {
        let what = format!("{backend} x4");
        let rep = restore_matches(&what, &snap, &reference, &["--lazy", "--demand", backend]);
        assert_eq!(rep["run"]["vcpus"], 4, "{rep}");
        assert!(
            rep["run"]["micro_check"]["shared_words_checked"]
                .as_u64()
                .unwrap_or(0)
                > 0,
            "{rep}"
        );
        let what = format!("{backend} x4 --prefetch");
        let args = ["--lazy", "--demand", backend, "--prefetch"];
        restore_matches(&what, &snap, &reference, &args);
    }
}

/// A raw payload (the micro guest's entry contract) that drops to CPL3 like the micro guest,
/// reports pass 1, spins until the word at `FLAG` is non-zero (never on the source: the test
/// snapshots it there, then sets the word in the snapshot's memory file), then does two SSE
/// loads from pages it
/// wrote at boot: an aligned `pxor (DATA), %xmm0` and an unaligned `lddqu` across two pages,
/// and exits with status 0 only if both loaded the right values. After a lazy restore under
/// memslot-exits those pages are in no memslot: KVM's emulator cannot run either instruction,
/// so the exit is an emulation failure without an address, and vmm must decode the
/// instruction (`userfault::operands`), map its operands' pages and let it run natively.
const FLAG: u64 = 0x80_4000;

fn sse_payload(dir: &Path) -> PathBuf {
    use guest_abi::{gdt, layout, ports};
    const DATA: u64 = 0x80_0000;
    let iopb_off = layout::MICRO_IOPB_OFFSET;
    let iopb_bytes = layout::MICRO_IOPB_BYTES;
    let (base, limit) = (layout::TSS_GPA, iopb_off + iopb_bytes);
    let desc_lo = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | 0x89 << 40
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    let src = format!(
        r#"
        .code64
        .text
entry:
        mov     %cr4, %rax
        or      $0x600, %rax
        mov     %rax, %cr4
        movw    ${iopb_off}, {tss} + 102
        lea     {tss} + {iopb_off}, %rdi
        mov     ${qwords}, %ecx
        xor     %eax, %eax
        rep stosq
        movb    $0xff, (%rdi)
        movabs  ${desc_lo}, %rax
        mov     %rax, {gdt} + {tss_sel}
        movq    ${desc_hi}, {gdt} + {tss_sel} + 8
        mov     ${tss_sel}, %eax
        ltr     %ax
        movabs  $0x1122334455667788, %rax
        mov     %rax, {data}
        mov     %rax, {data} + 0x1ff8
        movabs  $0x99aabbccddeeff00, %rax
        mov     %rax, {data} + 0x2000
        pushq   ${user_ds}
        pushq   ${stack}
        pushq   $0x3002
        pushq   ${user_cs}
        lea     user(%rip), %rax
        push    %rax
        iretq
user:
        mov     ${pass_port}, %dx
        mov     $1, %eax
        out     %eax, %dx
1:      cmpq    $0, {flag}
        je      1b
        mov     ${data}, %rbx
        pxor    %xmm0, %xmm0
        pxor    (%rbx), %xmm0
        movq    %xmm0, %rax
        movabs  $0x1122334455667788, %rdx
        xor     %ecx, %ecx
        cmp     %rdx, %rax
        setne   %cl
        mov     ${data} + 0x1ff8, %rbx
        lddqu   (%rbx), %xmm1
        psrldq  $8, %xmm1
        movq    %xmm1, %rax
        movabs  $0x99aabbccddeeff00, %rdx
        cmp     %rdx, %rax
        setne   %al
        movzbl  %al, %eax
        or      %eax, %ecx
        mov     %ecx, %eax
        mov     ${exit_port}, %dx
        out     %eax, %dx
2:      jmp     2b
"#,
        tss = layout::TSS_GPA,
        gdt = layout::GDT_GPA,
        tss_sel = gdt::TSS,
        qwords = iopb_bytes / 8,
        desc_hi = base >> 32,
        data = DATA,
        flag = FLAG,
        user_ds = gdt::USER_DS,
        user_cs = gdt::USER_CS,
        stack = layout::MICRO_USER_STACK_TOP,
        pass_port = ports::MICRO_PASS,
        exit_port = ports::MICRO_EXIT,
    );
    let s = dir.join("sse.S");
    let o = dir.join("sse.o");
    let bin = dir.join("sse.bin");
    std::fs::write(&s, src).unwrap();
    let ok = Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(&o)
        .arg(&s)
        .status()
        .unwrap();
    assert!(ok.success(), "as failed");
    let ok = Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&o)
        .arg(&bin)
        .status()
        .unwrap();
    assert!(ok.success(), "objcopy failed");
    bin
}

#[test]
fn memslot_exits_serves_sse_loads_from_missing_pages_by_decoding_them() {
    let dir = tempfile::tempdir().unwrap();
    let payload = sse_payload(dir.path());
    let sock = dir.path().join("sse.sock");
    let mut cmd = Command::new(vmm_bin());
    cmd.args(["run", "--payload"])
        .arg(&payload)
        .args(["--console", "none", "--json", "--api-socket"])
        .arg(&sock);
    let src = Bg::spawn("sse", cmd);
    wait_api(&sock, Duration::from_secs(20));
    wait_some_passes(&sock, 1);
    let snap = dir.path().join("snap");
    vmm_tests::snapshot::snapshot_and_exit(src, &sock, &snap);
    // Let the restored payload go on to its loads (low RAM: file offset = GPA).
    {
        use std::os::unix::fs::FileExt;
        let mem = std::fs::OpenOptions::new()
            .write(true)
            .open(snap.join("memory"))
            .unwrap();
        mem.write_all_at(&1u64.to_le_bytes(), FLAG).unwrap();
    }
    for backend in ["memslot-exits", "uffd-missing"] {
        let (code, rep, err) = restore(&snap, &["--lazy", "--demand", backend]);
        assert_eq!(code, Some(0), "{backend}: {err}\n{rep}");
        assert_eq!(rep["run"]["outcome"]["kind"], "micro-exit", "{rep}");
        assert_eq!(
            rep["run"]["outcome"]["status"], 0,
            "{backend}: wrong value loaded"
        );
        if backend == "memslot-exits" {
            let x = &rep["demand"]["exits"];
            assert_eq!(x["decoded"], 2, "both loads decoded: {rep}");
        }
    }
}

/// A VM paused through the API is snapshotted inside that pause (as Firecracker's pause,
/// snapshot, resume): it stays paused, runs no pass meanwhile, and goes on once resumed.
#[test]
fn a_paused_vm_is_snapshotted_inside_its_pause_and_stays_paused() {
    let dir = tempfile::tempdir().unwrap();
    let (src, sock) = vmm_tests::micro::micro_source(dir.path(), &[]);
    wait_some_passes(&sock, 20);
    let (code, v, err) = remote(&sock, &["pause"]);
    assert_eq!(code, Some(0), "pause: {err}\n{v}");
    let status = |what: &str| {
        let (code, v, err) = remote(&sock, &["status", "--json"]);
        assert_eq!(code, Some(0), "{what}: {err}");
        v
    };
    let before = status("paused");
    let snap = dir.path().join("snap");
    let (code, reply, err) = remote(
        &sock,
        &["snapshot", "--to", snap.to_str().unwrap(), "--json"],
    );
    assert_eq!(code, Some(0), "{err}\n{reply}");
    let after = status("after the snapshot");
    assert_eq!(after["state"], "paused", "{after}");
    assert_eq!(after["micro_passes"], before["micro_passes"], "{after}");
    assert_eq!(
        reply["snapshot"]["micro_passes"], before["micro_passes"],
        "{reply}"
    );
    let (code, v, err) = remote(&sock, &["resume"]);
    assert_eq!(code, Some(0), "resume: {err}\n{v}");
    vmm_tests::micro::finish_intact(src, &sock, 100);
}
