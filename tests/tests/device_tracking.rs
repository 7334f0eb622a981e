//! `vmm bench tracking --device-scenario`: the in-situ tracking scenario with the GPU-shaped
//! test device passed through to a Linux guest (issue 14). What each backend sees of the
//! guest CPU writing VRAM, the device writing guest RAM and the device writing its VRAM is
//! measured, not expected: the test holds the report to its own evidence (every cell adds
//! up, every backend the host offers was measured on every source, the device really wrote)
//! and prints the table.

use vmm_tests::{backends, gpu, images, vmm};

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn the_device_scenario_measures_every_backend_on_every_source_and_its_cells_add_up() {
    let img = images();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let device = gpu::device_bin();
    let run = vmm(&[
        "bench",
        "tracking",
        "--device-scenario",
        "--device-vram-mib",
        "16",
        "--device-mem-mib",
        "192",
        "--device-steps",
        "1",
        // Rounds park the vCPUs to compare 250 MiB: fewer of them let the emulated guest
        // kernel get on (keeps the test near two minutes on PVM hosts).
        "--device-interval-ms",
        "200",
        "--kernel",
        img.kernel.to_str().unwrap(),
        "--initrd",
        img.initramfs.to_str().unwrap(),
        "--device-bin",
        device.to_str().unwrap(),
        "--json-out",
        json.to_str().unwrap(),
        "--linux-console-dir",
        dir.path().to_str().unwrap(),
    ]);
    run.assert_no_panic();
    // The table, for the CI log.
    println!("{}", run.stdout);
    assert_eq!(run.code(), Some(0), "stderr:\n{}", run.stderr);
    assert!(run.stdout.contains("false pos"), "{}", run.stdout);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().expect("rows");
    let unsupported: Vec<&str> = report["unsupported"]
        .as_array()
        .expect("unsupported")
        .iter()
        .filter_map(|u| u["backend"].as_str())
        .collect();

    for (name, available, _) in backends() {
        if !available {
            assert!(
                unsupported.contains(&name.as_str()),
                "{name}: neither measured nor listed as unsupported"
            );
            continue;
        }
        for source in ["cpu-vram", "dma", "device-vram"] {
            let cells: Vec<&serde_json::Value> = rows
                .iter()
                .filter(|r| r["backend"] == name.as_str() && r["source"] == source)
                .collect();
            let memories: Vec<&str> = cells.iter().filter_map(|r| r["memory"].as_str()).collect();
            assert_eq!(
                memories,
                ["ram (other)", "ram (page writer)", "vram"],
                "{name} {source}"
            );
        }
    }

    for r in rows {
        let what = format!("{} {} {}", r["source"], r["backend"], r["memory"]);
        let (written, detected, missed) = (num(r, "written"), num(r, "detected"), num(r, "missed"));
        let (reported, fps) = (num(r, "reported"), num(r, "false_positives"));
        assert_eq!(detected + missed, written, "{what}: {r}");
        assert_eq!(detected + fps, reported, "{what}: {r}");
        assert!(num(r, "rounds") > 0, "{what}: a phase without a round: {r}");
        if r["memory"] == "vram" {
            let how = r["coverage"].as_str().unwrap_or_default();
            assert!(how.len() > 10, "{what}: coverage not explained: {r}");
            if r["covered"] == false {
                // Not watched: nothing reported, every written page missed.
                assert_eq!((reported, missed), (0, written), "{what}: {r}");
            }
        }
    }

    // The scenario exercised the device: its page writer's pages changed in the dma phases,
    // and VRAM changed in the phases that write it (whatever the backends saw of it).
    let truth = |source: &str, memory: &str| -> u64 {
        rows.iter()
            .filter(|r| r["source"] == source && r["memory"] == memory)
            .map(|r| num(r, "written"))
            .sum()
    };
    assert!(truth("dma", "ram (page writer)") > 0, "{}", run.stdout);
    assert!(truth("cpu-vram", "vram") > 0, "{}", run.stdout);
    assert!(truth("device-vram", "vram") > 0, "{}", run.stdout);
}
