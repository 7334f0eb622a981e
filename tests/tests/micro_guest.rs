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
        let run = vmm(&[
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

#[test]
fn int3_at_cpl0_ends_cleanly_naming_the_instruction() {
    // int3, then a spin so a host that *could* run it would not fall into garbage.
    let run = run_faulting_payload(&[0xcc, 0xeb, 0xfe]);
    assert!(
        run.stderr.contains("instruction bytes: cc"),
        "the exit must name the instruction bytes:\n{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("RIP=0x0000000000100000"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_payload_that_triple_faults_is_reported() {
    // mov rax, [0x7fff_ffff_f000]: unmapped (the identity map covers 4 GiB), so #PF with an
    // empty IDT: a triple fault.
    let run = run_faulting_payload(&[
        0x48, 0xa1, 0x00, 0xf0, 0xff, 0xff, 0xff, 0x7f, 0x00, 0x00, 0xeb, 0xfe,
    ]);
    assert!(
        run.stderr.contains("triple fault") || run.stderr.contains("emulation failure"),
        "{}",
        run.stderr
    );
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
    assert_eq!(run.report()["micro_check"]["mismatches"], 0);
}
