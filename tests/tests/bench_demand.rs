//! `vmm bench demand` runs end to end: it boots, snapshots and lazily restores the micro guest
//! through the vmm binary itself and prints the table, the JSON report and the chart.

use vmm_tests::vmm;

#[test]
fn bench_demand_quick_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("demand.svg");
    let json = dir.path().join("demand.json");
    let run = vmm(&[
        "bench",
        "demand",
        "--quick",
        "--quiet",
        "--svg",
        svg.to_str().unwrap(),
        "--json-out",
        json.to_str().unwrap(),
    ]);
    run.assert_no_panic();
    assert_eq!(run.code(), Some(0), "stderr:\n{}", run.stderr);
    let table = &run.stdout;
    for text in [
        "1 vCPU",
        "2 vCPUs",
        "eager",
        "uffd-missing",
        "pages/s/vCPU",
        "NOT measured on this host",
    ] {
        assert!(table.contains(text), "{text} missing:\n{table}");
    }
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(table.contains("NOT hardware timings"), "{table}");
    }
    assert!(!table.contains("failed runs"), "{table}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for c in cases {
        let vcpus = c["vcpus"].as_u64().unwrap();
        let rows = c["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 2, "{c}");
        for row in rows {
            assert!(row["pages_per_s_per_vcpu"].as_f64().unwrap() > 0.0, "{row}");
            assert!(row["guest_us_per_page"].as_f64().unwrap() > 0.0, "{row}");
            assert!(row["vs_eager"].as_f64().unwrap() > 0.0, "{row}");
        }
        let lazy = rows
            .iter()
            .find(|r| r["backend"] == "uffd-missing")
            .unwrap();
        // Every region page was paged in (2 MiB per vCPU), and latencies were measured.
        assert!(
            lazy["faults"].as_f64().unwrap() >= (512 * vcpus) as f64,
            "{lazy}"
        );
        assert!(lazy["fault_p50_us"].as_f64().unwrap() > 0.0, "{lazy}");
    }
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(
        chart.starts_with("<svg"),
        "{}",
        &chart[..chart.len().min(100)]
    );
    assert!(chart.contains("uffd-missing"));
}
