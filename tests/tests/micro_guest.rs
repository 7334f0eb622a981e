//! The bare-metal micro guest on the real /dev/kvm: passes, exit, exact memory contents, and a
//! clean end when a payload runs an instruction the host cannot execute.

use vmm_tests::{vmm, Run};

/// Runs `code` as a raw payload (entered at CPL0) and checks it ends as a guest fault.
fn run_faulting_payload(code: &[u8]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("payload.bin");
    std::fs::write(&payload, code).unwrap();
    let run = vmm(&[
        "run",
        "--payload",
        payload.to_str().unwrap(),
        "--console",
        "none",
    ]);
    run.assert_no_panic();
    assert_eq!(run.code(), Some(4), "stderr:\n{}", run.stderr);
    run
}

#[test]
fn micro_guest_runs_every_pass_and_memory_matches_the_model() {
    for pattern in ["sweep", "random", "hotset", "sparse"] {
        // The per-pass line is at debug level (one a pass would flood a long run's log).
        let run = vmm(&[
            "--log-level",
            "info,vmm::micro_port=debug",
            "run",
            "--micro",
            "--pattern",
            pattern,
            "--passes",
            "6",
            "--region-mib",
            "8",
            "--verify",
            "--console",
            "none",
            "--json",
        ]);
        run.assert_no_panic();
        assert_eq!(run.code(), Some(0), "{pattern}: stderr:\n{}", run.stderr);
        let r = run.report();
        assert_eq!(r["outcome"]["kind"], "micro-exit");
        assert_eq!(r["micro_passes"], 6, "{pattern}");
        assert_eq!(r["micro_check"]["mismatches"], 0, "{pattern}");
        assert_eq!(r["micro_check"]["pages_checked"], 2048);
        // Each pass was reported as it completed.
        for pass in 1..=6 {
            assert!(
                run.stderr
                    .contains(&format!("micro guest: pass {pass} done")),
                "{pattern}: pass {pass} not reported"
            );
        }
        eprintln!("{pattern}: wall {} ms", r["wall_ms"]);
    }
}

fn is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// int3 at CPL0 with an empty IDT ends as a guest fault (exit 4) on either kind of host, but
/// not the same one: on PVM guest ring 0 runs in KVM's emulator (PLATFORM.md §1), which cannot
/// execute int3, so the exit is an emulation failure naming the instruction bytes at the entry
/// RIP; on hardware KVM the CPU executes it, and #BP with no IDT escalates to a triple fault.
#[test]
fn int3_at_cpl0_ends_cleanly_naming_what_stopped_it() {
    // int3, then a spin so a host that *could* run it would not fall into garbage.
    let run = run_faulting_payload(&[0xcc, 0xeb, 0xfe]);
    if is_pvm() {
        // Only on PVM (/sys/module/kvm_pvm exists): KVM's emulator refuses int3.
        assert!(
            run.stderr.contains("instruction bytes: cc"),
            "PVM: the exit must name the instruction bytes:\n{}",
            run.stderr
        );
        assert!(
            run.stderr.contains("RIP=0x0000000000100000"),
            "PVM: the emulation failure is at the entry RIP:\n{}",
            run.stderr
        );
    } else {
        // Hardware KVM: the CPU runs int3; #BP -> #GP -> #DF through an empty IDT.
        assert!(
            run.stderr.contains("triple fault"),
            "hardware KVM: int3 with an empty IDT must end as a triple fault:\n{}",
            run.stderr
        );
    }
}

#[test]
fn a_payload_that_triple_faults_is_reported() {
    // mov rax, [0x7fff_ffff_f000]: unmapped (the identity map covers 4 GiB), so #PF with an
    // empty IDT: a triple fault.
    let run = run_faulting_payload(&[
        0x48, 0xa1, 0x00, 0xf0, 0xff, 0xff, 0xff, 0x7f, 0x00, 0x00, 0xeb, 0xfe,
    ]);
    // On either kind of host: the CPU (or PVM's emulator) takes the #PF, and with no IDT it
    // escalates to a shutdown; CR2 names the access.
    assert_eq!(run.code(), Some(4), "{}", run.stderr);
    assert!(run.stderr.contains("triple fault"), "{}", run.stderr);
    assert!(run.stderr.contains("CR2=0x7ffffffff000"), "{}", run.stderr);
}

#[test]
fn micro_guest_with_two_vcpus_still_runs() {
    let run = vmm(&[
        "run",
        "--micro",
        "--vcpus",
        "2",
        "--passes",
        "2",
        "--region-mib",
        "4",
        "--verify",
        "--console",
        "none",
        "--json",
    ]);
    assert_eq!(run.code(), Some(0), "stderr:\n{}", run.stderr);
    let r = run.report();
    assert_eq!(r["micro_check"]["mismatches"], 0);
    // Both vCPUs ran the workload, each on its own 4 MiB region.
    assert_eq!(r["micro_check"]["pages_checked"], 2 * 1024);
    assert_eq!(r["micro_passes"], 2);
}

/// Four vCPUs at once, each on its private region and its slots of a shared region (the
/// workload issue 6's lazy restore runs): every vCPU finishes, the run ends only then, and
/// memory matches the model word for word, shared words included.
#[test]
fn micro_guest_on_four_vcpus_writes_private_and_shared_regions_exactly() {
    let run = vmm(&[
        "--log-level",
        "info,vmm::micro_port=debug",
        "run",
        "--micro",
        "--vcpus",
        "4",
        "--pattern",
        "random",
        "--region-mib",
        "4",
        "--shared-pages",
        "16",
        "--passes",
        "5",
        "--seed",
        "7",
        "--verify",
        "--console",
        "none",
        "--json",
    ]);
    run.assert_no_panic();
    assert_eq!(run.code(), Some(0), "stderr:\n{}", run.stderr);
    let r = run.report();
    assert_eq!(r["outcome"]["kind"], "micro-exit");
    assert_eq!(r["vcpus"], 4);
    assert_eq!(r["micro_passes"], 5);
    assert_eq!(r["micro_check"]["mismatches"], 0, "{}", r["micro_check"]);
    assert_eq!(r["micro_check"]["pages_checked"], 4 * 1024);
    assert_eq!(r["micro_check"]["shared_words_checked"], 16 * 512);
    for vcpu in 0..4 {
        assert!(
            run.stderr
                .contains(&format!("micro guest: vCPU {vcpu} finished with status 0")),
            "vCPU {vcpu} did not finish:\n{}",
            run.stderr
        );
    }
    for pass in 1..=5 {
        assert!(
            run.stderr
                .contains(&format!("micro guest: pass {pass} done")),
            "pass {pass} not reported"
        );
    }
}

#[test]
fn micro_guest_refuses_more_vcpus_than_it_supports() {
    let run = vmm(&["run", "--micro", "--vcpus", "9", "--console", "none"]);
    run.assert_no_panic();
    assert_eq!(run.code(), Some(1), "stderr:\n{}", run.stderr);
    assert!(
        run.stderr
            .contains("the micro guest runs on 1 to 8 vCPUs, not 9"),
        "{}",
        run.stderr
    );
}

/// A micro guest started with `--passes 0` runs until told to stop: `vmm remote finish --after
/// N` sets its budget to the furthest vCPU's pass + N, every vCPU ends after exactly that pass,
/// and memory matches the model of that many passes, whole pages, shared region included. A
/// finish on a guest paused with `pause` leaves it paused; a later finish may lower the budget.
/// `--after 0` and a raw payload (whose code is not the micro guest's) are refused, nothing
/// changed.
#[test]
fn finish_ends_an_endless_micro_guest_after_exactly_its_budget() {
    use std::time::Duration;
    use vmm_tests::micro::{
        assert_micro_exit, finish, micro_source, wait_some_passes, PASS_TIMEOUT,
    };
    use vmm_tests::process::{remote, wait_api, Bg};

    let dir = tempfile::tempdir().unwrap();
    let (src, sock) = micro_source(dir.path(), &["--vcpus", "2", "--shared-pages", "8"]);
    wait_some_passes(&sock, 20);
    let status = |what: &str| {
        let (code, v, err) = remote(&sock, &["status", "--json"]);
        assert_eq!(code, Some(0), "status {what}: {err}");
        v
    };

    // --after 0: refused, the guest runs on with no budget.
    let (code, v, _) = remote(&sock, &["finish", "--after", "0", "--json"]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("at least 1"),
        "{v}"
    );
    let s = status("after a refused finish");
    assert_eq!(
        (s["state"].as_str(), s["micro_budget"].as_u64()),
        (Some("running"), Some(0))
    );

    // While it runs: a budget no host reaches during this test; the guest runs on.
    let far = finish(&sock, 1 << 40);
    assert!(far > 1 << 40, "{far}");
    let s = status("after the first finish");
    assert_eq!(
        (s["state"].as_str(), s["micro_budget"].as_u64()),
        (Some("running"), Some(far))
    );

    // Paused by the user: a nearer budget, and it stays paused until resumed.
    let (code, v, err) = remote(&sock, &["pause"]);
    assert_eq!(code, Some(0), "pause: {err}\n{v}");
    let reached = status("paused")["micro_passes"].as_u64().unwrap();
    let t = finish(&sock, 50);
    assert!(
        t >= reached + 50 && t < far,
        "budget {t}: {reached} passes done, far {far}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let s = status("after the paused finish");
    assert_eq!(s["state"], "paused", "{s}");
    assert_eq!(s["micro_budget"].as_u64(), Some(t), "{s}");
    assert_eq!(
        s["micro_passes"].as_u64(),
        Some(reached),
        "it ran while paused: {s}"
    );
    let (code, v, err) = remote(&sock, &["resume"]);
    assert_eq!(code, Some(0), "resume: {err}\n{v}");

    let (code, rep, err) = src.finish(PASS_TIMEOUT);
    assert_eq!(code, Some(0), "{err}\n{rep}");
    assert_micro_exit("finished micro guest", &rep, t);
    assert_eq!(rep["micro_check"]["pages_checked"], 2 * 1024, "{rep}");
    assert_eq!(rep["micro_check"]["shared_words_checked"], 8 * 512, "{rep}");
    for vcpu in 0..2 {
        assert!(
            err.contains(&format!("micro guest: vCPU {vcpu} finished with status 0")),
            "vCPU {vcpu} did not finish:\n{err}"
        );
    }
    assert!(
        err.contains(&format!("micro guest: finishing after pass {t}")),
        "{err}"
    );

    // A raw payload (a CPL0 spin) with the micro guest's mailbox: refused, left running.
    let payload = dir.path().join("spin.bin");
    std::fs::write(&payload, [0xeb, 0xfe]).unwrap();
    let raw_sock = dir.path().join("raw.sock");
    let mut cmd = std::process::Command::new(vmm_tests::vmm_bin());
    cmd.args(["run", "--payload"])
        .arg(&payload)
        .args(["--console", "none", "--api-socket"])
        .arg(&raw_sock);
    let raw = Bg::spawn("raw payload", cmd);
    wait_api(&raw_sock, Duration::from_secs(20));
    let (code, v, _) = remote(&raw_sock, &["finish", "--after", "50", "--json"]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("raw --payload"),
        "{v}"
    );
    let (_, s, _) = remote(&raw_sock, &["status", "--json"]);
    assert_eq!(s["state"], "running", "{s}");
    drop(raw);
}
