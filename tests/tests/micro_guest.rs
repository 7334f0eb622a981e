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
