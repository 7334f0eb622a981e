//! Dirty tracking on the micro guest: every backend this host offers reports exactly the pages
//! each pass wrote (checked per pass against the reference model, harvested at the pass port
//! while the guest waits), backends the host cannot offer are refused with the reason `vmm
//! backends` gives, and `vmm bench tracking` runs end to end. Which backends a host offers is
//! the kernel's business: these tests hold vmm's verdicts to the evidence, on any host.

use vmm_tests::{backends, vmm};

#[test]
fn every_unavailable_backend_says_why_and_is_refused_for_that_reason() {
    let list = backends();
    let names: Vec<&str> = list.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "bitmap",
            "bitmap-manual",
            "ring",
            "uffd-wp",
            "uffd-wp-async",
            "soft-dirty"
        ],
        "{list:?}"
    );
    for (name, available, reason) in &list {
        if *available {
            // Exercised below: an available backend must then be exact.
            continue;
        }
        let reason = reason.as_deref().unwrap_or("");
        assert!(
            reason.len() > 20,
            "{name}: no real reason given: {reason:?}"
        );
        let run = vmm(&[
            "run",
            "--micro",
            "--passes",
            "2",
            "--track",
            name,
            "--console",
            "none",
        ]);
        run.assert_no_panic();
        assert_eq!(run.code(), Some(1), "{name}: stderr:\n{}", run.stderr);
        assert!(
            run.stderr
                .contains(&format!("{name} is not available here")),
            "{name}: {}",
            run.stderr
        );
        let head: String = reason.chars().take(40).collect();
        assert!(
            run.stderr.contains(&head),
            "{name}: the refusal does not give the reason `vmm backends` gives ({reason}): {}",
            run.stderr
        );
    }
}

#[test]
fn every_available_backend_is_exact_on_every_pattern() {
    let list = backends();
    let available: Vec<&str> = list
        .iter()
        .filter(|(_, a, _)| *a)
        .map(|(n, _, _)| n.as_str())
        .collect();
    // KVM_MEM_LOG_DIRTY_PAGES is KVM's base ABI (every KVM has it): a host where vmm does not
    // offer the bitmap means vmm's detection is broken, not that the host lacks it.
    assert!(available.contains(&"bitmap"), "{list:?}");
    for backend in &available {
        for pattern in ["sweep", "random", "hotset", "sparse"] {
            let run = vmm(&[
                "run",
                "--micro",
                "--pattern",
                pattern,
                "--passes",
                "4",
                "--region-mib",
                "8",
                "--verify",
                "--track",
                backend,
                "--console",
                "none",
                "--json",
            ]);
            run.assert_no_panic();
            let what = format!("{backend} {pattern}");
            assert_eq!(run.code(), Some(0), "{what}: stderr:\n{}", run.stderr);
            let r = run.report();
            let t = &r["tracking"];
            assert_eq!(t["backend"], *backend, "{what}");
            assert!(t["error"].is_null(), "{what}: {}", t["error"]);
            let rounds = t["rounds"].as_array().expect("rounds");
            assert_eq!(rounds.len(), 4, "{what}: one round per pass");
            for (i, round) in rounds.iter().enumerate() {
                let expected = round["expected"].as_u64().expect("checked round");
                assert!(expected > 0, "{what}: pass {} wrote nothing?", i + 1);
                assert_eq!(round["misses"], 0, "{what}: pass {}: {round}", i + 1);
                assert_eq!(
                    round["false_positives"],
                    0,
                    "{what}: pass {}: {round}",
                    i + 1
                );
                // The region's pages plus the few the payload writes outside it (its mailbox).
                let dirty = round["dirty_pages"].as_u64().unwrap_or(0);
                assert!(
                    dirty >= expected && dirty <= expected + 8,
                    "{what}: {round}"
                );
            }
            assert_eq!(t["misses"], 0);
            assert_eq!(t["false_positives"], 0);
        }
    }
}

#[test]
fn soft_dirty_is_refused_with_the_reason_or_is_exact() {
    let run = vmm(&[
        "run",
        "--micro",
        "--passes",
        "3",
        "--region-mib",
        "8",
        "--verify",
        "--track",
        "soft-dirty",
        "--console",
        "none",
    ]);
    run.assert_no_panic();
    let soft = backends().into_iter().find(|(n, _, _)| n == "soft-dirty");
    match soft {
        Some((_, false, reason)) => {
            assert_eq!(run.code(), Some(1), "stderr:\n{}", run.stderr);
            assert!(
                run.stderr.contains("soft-dirty is not available here"),
                "{}",
                run.stderr
            );
            assert!(run.stderr.contains("bit 55"), "{}", run.stderr);
            assert!(reason.unwrap_or_default().contains("bit 55"));
        }
        _ => assert_eq!(run.code(), Some(0), "stderr:\n{}", run.stderr),
    }
}

#[test]
fn unknown_backend_is_a_clear_error() {
    let run = vmm(&["run", "--micro", "--track", "pml", "--console", "none"]);
    run.assert_no_panic();
    assert_eq!(run.code(), Some(1));
    assert!(
        run.stderr.contains("unknown tracking backend 'pml'"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("uffd-wp-async"), "{}", run.stderr);
}

#[test]
fn bench_tracking_runs_end_to_end_and_prints_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("chart.svg");
    let json = dir.path().join("report.json");
    let run = vmm(&[
        "bench",
        "tracking",
        "--sizes",
        "8",
        "--patterns",
        "sweep,random",
        "--runs",
        "1",
        "--passes",
        "4",
        "--quiet",
        "--svg",
        svg.to_str().unwrap(),
        "--json-out",
        json.to_str().unwrap(),
    ]);
    run.assert_no_panic();
    assert_eq!(run.code(), Some(0), "stderr:\n{}", run.stderr);
    let table = &run.stdout;
    assert!(table.contains("micro sweep"), "{table}");
    assert!(table.contains("micro random"), "{table}");
    assert!(table.contains("bitmap"), "{table}");
    assert!(table.contains("slowdown"), "{table}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let workloads = report["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 2);
    for w in workloads {
        for b in w["backends"].as_array().unwrap() {
            assert_eq!(b["misses"], 0, "{b}");
            assert_eq!(b["false_positives"], 0, "{b}");
            assert!(b["dirty_pages_per_round"].as_f64().unwrap() > 0.0, "{b}");
        }
    }
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(
        chart.starts_with("<svg"),
        "{}",
        &chart[..chart.len().min(100)]
    );
}
