//! Snapshots and lazy restore of the micro guest on the real /dev/kvm, with every demand-paging
//! backend this host has: the pages installed must be the snapshot's byte for byte (with
//! --prefetch every page gets installed, so the dump must equal the snapshot's memory file),
//! and the workload must finish and match its reference model. Then each special case of the
//! exit backend (instruction fetch, pages KVM touches itself, the memslot limit), and the
//! backend this kernel lacks (kvm-userfault), refused with the kernel's answer.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vmm_tests::process::{remote, wait_api, Bg};
use vmm_tests::snapshot::{assert_finished, assert_same_memory, snapshot_micro};
use vmm_tests::vmm_bin;

/// `vmm restore SNAP ARGS --json`: (exit code, the JSON report, stderr).
fn restore(snap: &Path, args: &[&str]) -> (Option<i32>, Value, String) {
    let out = Command::new(vmm_bin())
        .arg("restore")
        .arg(snap)
        .args(["--console", "none", "--json"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    (
        out.status.code(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn backends_here() -> Vec<&'static str> {
    vec!["uffd-missing", "uffd-minor", "memslot-exits"]
}

#[test]
fn eager_and_lazy_restores_give_back_the_snapshot_and_finish_the_workload() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot_micro(dir.path(), &[]);
    let memory = snap.join("memory");

    let dump = dir.path().join("eager.bin");
    let (code, rep, err) = restore(&snap, &["--dump-memory", dump.to_str().unwrap()]);
    assert_finished("eager", code, &rep, &err);
    assert_same_memory("eager", &memory, &dump);

    for backend in backends_here() {
        // Pure demand paging: each page comes in when first touched.
        let (code, rep, err) = restore(&snap, &["--lazy", "--demand", backend]);
        assert_finished(backend, code, &rep, &err);
        let d = &rep["demand"];
        assert_eq!(d["backend"], backend);
        assert!(d["faults"].as_u64().unwrap() > 0, "{backend}: {d}");
        eprintln!(
            "{backend}: {} faults, {} of {} pages installed, {} eager, fault p50 {} us",
            d["faults"],
            d["pages_installed"],
            d["data_pages"],
            d["eager_pages"],
            d["fault_us"]["p50"]
        );
        // With the prefetch every page comes in: the dump of installed pages is the snapshot.
        let dump = dir.path().join(format!("{backend}.bin"));
        let (code, rep, err) = restore(
            &snap,
            &[
                "--lazy",
                "--demand",
                backend,
                "--prefetch",
                "--dump-memory",
                dump.to_str().unwrap(),
            ],
        );
        assert_finished(&format!("{backend} --prefetch"), code, &rep, &err);
        assert_eq!(
            rep["demand"]["pages_installed"], rep["demand"]["data_pages"],
            "{backend}: {rep}"
        );
        assert_same_memory(backend, &memory, &dump);
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
        &snap,
        &[
            "--lazy",
            "--demand",
            "memslot-exits",
            "--demand-soft-slots",
            "8",
        ],
    );
    assert_finished("memslot-exits", code, &rep, &err);
    let d = &rep["demand"];
    let x = &d["exits"];
    assert!(
        x["ifetch"].as_u64().unwrap() >= 1,
        "no code fetch exit: {d}"
    );
    // PML4 + PDPT + 4 PDs + GDT + TSS at least.
    assert!(d["eager_pages"].as_u64().unwrap() >= 6, "{d}");
    assert!(x["merges"].as_u64().unwrap() > 0, "{d}");
    // 8 + the runs mapped at arm and the pinned pages (~40 here), nowhere near one per page.
    assert!(x["memslots_max"].as_u64().unwrap() <= 80, "{d}");

    // 2 MiB chunks: far fewer exits, the same memory.
    let (code, rep2, err) = restore(
        &snap,
        &[
            "--lazy",
            "--demand",
            "memslot-exits",
            "--demand-chunk",
            "2M",
        ],
    );
    assert_finished("memslot-exits 2M", code, &rep2, &err);
    assert!(
        rep2["demand"]["exits"]["fetched"].as_u64() < x["fetched"].as_u64(),
        "{rep2}"
    );
}

#[test]
fn kvm_userfault_is_refused_with_the_kernels_answer_and_bad_snapshots_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot_micro(dir.path(), &[]);
    let (code, rep, err) = restore(&snap, &["--lazy", "--demand", "kvm-userfault"]);
    if err.contains("is not available") {
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("KVM_MEM_USERFAULT"), "{err}");
        assert!(err.contains("EINVAL"), "{err}");
    } else {
        // A kernel with the series: the backend must then do the whole job.
        assert_finished("kvm-userfault", code, &rep, &err);
    }

    let (code, _, err) = restore(&snap, &["--lazy", "--demand", "nope"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("unknown backend"), "{err}");
    let (code, _, err) = restore(&snap, &["--lazy", "--demand-chunk", "3K"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("power of two"), "{err}");

    // A truncated memory file, a manifest from the future, and no snapshot at all.
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(snap.join("vm.json"), bad.join("vm.json")).unwrap();
    std::fs::write(bad.join("memory"), vec![0u8; 4096]).unwrap();
    let (code, _, err) = restore(&bad, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("the VM has"), "{err}");
    let manifest = std::fs::read_to_string(snap.join("vm.json")).unwrap();
    std::fs::write(
        bad.join("vm.json"),
        manifest.replacen("\"version\": 1", "\"version\": 99", 1),
    )
    .unwrap();
    let (code, _, err) = restore(&bad, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("version 99"), "{err}");
    let (code, _, err) = restore(&dir.path().join("none"), &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("vm.json"), "{err}");
}

/// Four vCPUs, each on its own region and all on a shared one (each its own slot of every
/// shared page), demand-paging at once: every backend gives back the snapshot and the model.
#[test]
fn four_vcpus_on_private_and_shared_regions_restore_lazily_with_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let snap = snapshot_micro(dir.path(), &["--vcpus", "4", "--shared-pages", "64"]);
    let memory = snap.join("memory");
    for backend in backends_here() {
        let (code, rep, err) = restore(&snap, &["--lazy", "--demand", backend]);
        assert_finished(&format!("{backend} x4"), code, &rep, &err);
        assert_eq!(rep["run"]["vcpus"], 4, "{rep}");
        assert!(
            rep["run"]["micro_check"]["shared_words_checked"]
                .as_u64()
                .unwrap_or(0)
                > 0,
            "{rep}"
        );
        let dump = dir.path().join(format!("{backend}-x4.bin"));
        let (code, rep, err) = restore(
            &snap,
            &[
                "--lazy",
                "--demand",
                backend,
                "--prefetch",
                "--dump-memory",
                dump.to_str().unwrap(),
            ],
        );
        assert_finished(&format!("{backend} x4 --prefetch"), code, &rep, &err);
        assert_same_memory(&format!("{backend} x4"), &memory, &dump);
    }
}

/// A raw payload (the micro guest's entry contract) that drops to CPL3 like the micro guest,
/// reports pass 1, spins long enough to be snapshotted, then does two SSE loads from pages it
/// wrote at boot: an aligned `pxor (DATA), %xmm0` and an unaligned `lddqu` across two pages,
/// and exits with status 0 only if both loaded the right values. After a lazy restore under
/// memslot-exits those pages are in no memslot: KVM's emulator cannot run either instruction,
/// so the exit is an emulation failure without an address, and vmm must decode the
/// instruction (`vstate::operands`), map its operands' pages and let it run natively.
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
        movabs  $3000000000, %rcx
1:      dec     %rcx
        jnz     1b
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
    for _ in 0..1000 {
        let (_, v, _) = remote(&sock, &["status", "--json"]);
        if v["micro_passes"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let snap = dir.path().join("snap");
    let (c, reply, e) = remote(
        &sock,
        &[
            "snapshot",
            "--to",
            snap.to_str().unwrap(),
            "--exit",
            "--json",
        ],
    );
    assert_eq!(c, Some(0), "{e}\n{reply}");
    let (code, rep, err) = src.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(rep["outcome"]["kind"], "snapshotted", "{rep}");
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
