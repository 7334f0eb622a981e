//! `vmm bench passthrough --runs 1 --json` runs end to end: the test device, one boot of the
//! Linux guest with it, the agent's `vfio-bench`, the host's DMA-map figure. Only structure and
//! consistency are checked (every figure present, finite and positive; each ratio the two
//! medians divided); never a timing threshold.

use vmm_tests::{gpu, images, vmm};

const FIGURES: [&str; 13] = [
    "mapped_read_ns",
    "trapped_read_ns",
    "mapped_write_ns",
    "trapped_write_ns",
    "msix_p50_ns",
    "msix_p90_ns",
    "doorbell_p50_ns",
    "dma_to_ram_mib_s",
    "dma_to_vram_mib_s",
    "dma_to_ram_device_mib_s",
    "dma_to_vram_device_mib_s",
    "memcpy_mib_s",
    "dma_map_ms_per_gib",
];

fn positive(v: &serde_json::Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    x
}

#[test]
fn bench_passthrough_one_run_reports_every_figure_consistently() {
    let img = images();
    let device = gpu::device_bin();
    let run = vmm(&[
        "bench",
        "passthrough",
        "--runs",
        "1",
        "--iterations",
        "50",
        "--json",
        "--kernel",
        img.kernel.to_str().unwrap(),
        "--initrd",
        img.initramfs.to_str().unwrap(),
        "--device-bin",
        device.to_str().unwrap(),
    ]);
    run.assert_no_panic();
    assert_eq!(run.code(), Some(0), "stderr:\n{}", run.stderr);
    let r: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("{e}: stdout:\n{}", run.stdout));

    assert_eq!(r["tool"], "vmm bench passthrough");
    assert!(
        r["host"] == "PVM" || r["host"] == "hardware",
        "{}",
        r["host"]
    );
    assert_eq!(
        (r["runs"].as_u64(), r["runs_ok"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(r["failures"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(r["iterations"], 50);
    assert!(
        ["mmap", "pread"].contains(&r["trapped_via"].as_str().unwrap()),
        "{r}"
    );
    assert!(
        ["hugetlb-2M", "pagemap-run"].contains(&r["dma_contig"].as_str().unwrap()),
        "{r}"
    );
    positive(&r["dma_bytes"], "dma_bytes");

    let figures = r["figures"].as_array().expect("figures");
    let median = |key: &str| -> f64 {
        let f = figures
            .iter()
            .find(|f| f["key"] == key)
            .unwrap_or_else(|| panic!("no figure {key} in {r}"));
        let samples = f["samples"].as_array().expect("samples");
        assert_eq!(samples.len(), 1, "{f}");
        let m = positive(&f["median"], key);
        assert_eq!(
            positive(&samples[0], key),
            m,
            "one run: the median is the sample"
        );
        m
    };
    for key in FIGURES {
        median(key);
    }
    assert_eq!(figures.len(), FIGURES.len());

    let ratios = r["ratios"].as_array().expect("ratios");
    assert_eq!(ratios.len(), 6, "{r}");
    for q in ratios {
        let value = positive(&q["value"], "ratio");
        let (num, den) = (
            q["numerator"].as_str().unwrap(),
            q["denominator"].as_str().unwrap(),
        );
        let want = median(num) / median(den);
        assert!((value - want).abs() <= want * 1e-12, "{q}: want {want}");
    }
    assert_eq!(
        r["kernel_vfio_skipped"],
        "skipped: no kernel VFIO device on this host"
    );
    assert!(r["kernel_vfio_dma_map"].is_null(), "{r}");
}
