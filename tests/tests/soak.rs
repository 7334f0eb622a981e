//! Soak and fault campaigns (issue 18 item 8): not part of the suite (`#[ignore]`), run by
//! `tools/soak.sh`, which builds release binaries and records the figures in the README.
//!
//! - `hops`: one micro guest, writing all the time, migrated `VMM_SOAK_HOPS` (100) times in a
//!   row, each destination the next hop's source; modes and trackers rotate (precopy with every
//!   tracker this host offers, postcopy, hybrid). Every precopy hop's received RAM must equal
//!   the source's at its pause, and the guest's RAM at the end must equal a run never migrated:
//!   0 bytes differing.
//! - `cuts`: `VMM_SOAK_CUTS` (60) migrations of one source through a proxy that cuts the link
//!   at a random byte, alternately precopy and postcopy; every one must end with the documented
//!   outcome (README, "Failures"): precopy: the migration fails, the source runs on, the
//!   destination exits with an error; postcopy: before the destination runs the guest, the
//!   same; after, the source holds the guest paused with every page and the destination exits
//!   with "postcopy failed", and `resume` on the source goes on. The source then finishes with
//!   its memory equal to its model.
//!
//! Every migration runs over TLS with a pre-shared key, as users are told to run them.
//! Each writes a JSON summary to `VMM_SOAK_OUT` (if set) and prints it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vmm_tests::micro::{
    differing_pages, finish, finish_intact, micro_source, reference_final, wait_some_passes,
    PASS_TIMEOUT,
};
use vmm_tests::process::{free_port, remote, wait_api, Bg};
use vmm_tests::proxy::CutProxy;
use vmm_tests::vmm_bin;

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("VMM_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

/// xorshift64: reproducible from the printed seed.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn write_summary(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap());
    if let Ok(out) = std::env::var("VMM_SOAK_OUT") {
        std::fs::write(&out, serde_json::to_vec_pretty(v).unwrap())
            .unwrap_or_else(|e| panic!("{out}: {e}"));
    }
}

/// Every migration of the campaigns runs over TLS with this key (the default way of the tool).
fn psk(dir: &Path) -> String {
    let path = dir.join("keys.psk");
    if !path.exists() {
        vmm_tests::tls::psk_file(dir, "keys.psk");
    }
    path.display().to_string()
}

fn destination(dir: &Path, hop: usize, port: u16, extra: &[PathBuf], precopy: bool) -> Bg {
    let mut cmd = Command::new(vmm_bin());
    cmd.args(["run", "--incoming", &format!("tcp://127.0.0.1:{port}")])
        .args(["--tls-psk", &psk(dir)])
        .args(["--console", "none", "--json", "--api-socket"])
        .arg(dir.join(format!("hop{hop}.sock")));
    if precopy {
        cmd.arg("--dump-memory")
            .arg(dir.join(format!("hop{hop}-received.bin")));
    }
    for e in extra {
        cmd.arg(e);
    }
    let mut bg = Bg::spawn(&format!("hop {hop}"), cmd);
    bg.wait_for("waiting for an incoming migration", Duration::from_secs(20));
    bg
}

/// The migrations the hops rotate through: precopy with each tracker offered here, postcopy,
/// hybrid.
fn rotation() -> Vec<(&'static str, String)> {
    let mut r: Vec<(&'static str, String)> = vmm_tests::backends()
        .into_iter()
        .filter(|(t, available, _)| *available && t != "soft-dirty" && t != "ring")
        .map(|(t, _, _)| ("precopy", t))
        .collect();
    r.push(("postcopy", "bitmap".into()));
    r.push(("hybrid", "bitmap".into()));
    r
}

#[test]
#[ignore = "a soak campaign: tools/soak.sh runs it"]
fn hops() {
    let hops = env_count("VMM_SOAK_HOPS", 100);
    let dir = tempfile::tempdir().unwrap();
    let (mut src, mut sock) = micro_source(dir.path(), &[]);
    wait_some_passes(&sock, 20);
    let rotation = rotation();
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut differing_bytes_total = 0u64;
    for hop in 0..hops {
        let (mode, tracker) = &rotation[hop % rotation.len()];
        let precopy = *mode == "precopy";
        let last = hop + 1 == hops;
        let final_dump = dir.path().join("final.bin");
        let extra: Vec<PathBuf> = if last {
            vec!["--dump-final".into(), final_dump.clone()]
        } else {
            Vec::new()
        };
        let port = free_port();
        let dst = destination(dir.path(), hop, port, &extra, precopy);
        let src_dump = dir.path().join(format!("hop{hop}-paused.bin"));
        let mut args = vec![
            "migrate".to_string(),
            "--to".into(),
            format!("tcp://127.0.0.1:{port}"),
            "--mode".into(),
            mode.to_string(),
            "--tracker".into(),
            tracker.clone(),
            "--tls-psk".into(),
            psk(dir.path()),
            "--json".into(),
        ];
        if precopy {
            args.extend(["--dump-memory".into(), src_dump.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // A guest that arrived by postcopy cannot leave before its last page has: retry.
        let deadline = Instant::now() + PASS_TIMEOUT;
        let (code, reply, err) = loop {
            let r = remote(&sock, &args);
            let busy = r.1["error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot migrate now"));
            if !busy || Instant::now() > deadline {
                break r;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            code,
            Some(0),
            "hop {hop} ({mode}/{tracker}): {err}\n{reply}"
        );
        let report = &reply["report"];
        let (scode, srep, serr) = src.finish(Duration::from_secs(30));
        assert_eq!(scode, Some(0), "hop {hop} source:\n{serr}");
        assert_eq!(srep["outcome"]["kind"], "migrated", "{srep}");
        let mut differing = 0u64;
        if precopy {
            let pages = differing_pages(
                &src_dump,
                &dir.path().join(format!("hop{hop}-received.bin")),
            );
            differing = pages.len() as u64 * 4096;
            // Only a differing hop's files are kept (the disk would fill otherwise).
            if pages.is_empty() {
                let _ = std::fs::remove_file(&src_dump);
                let _ = std::fs::remove_file(dir.path().join(format!("hop{hop}-received.bin")));
            }
        }
        differing_bytes_total += differing;
        eprintln!(
            "hop {hop}: {mode}/{tracker}: total {} ms, downtime {} ms, {} B differing",
            report["total_ms"], report["downtime_ms"], differing
        );
        rows.push(serde_json::json!({
            "hop": hop, "mode": mode, "tracker": tracker,
            "total_ms": report["total_ms"], "downtime_ms": report["downtime_ms"],
            "differing_bytes": differing,
        }));
        src = dst;
        sock = dir.path().join(format!("hop{hop}.sock"));
        wait_api(&sock, Duration::from_secs(20));
    }
    let passes = finish(&sock, 2000);
    let (code, rep, err) = src.finish(PASS_TIMEOUT);
    assert_eq!(code, Some(0), "last hop:\n{err}\n{rep}");
    vmm_tests::micro::assert_micro_exit("last hop", &rep, passes);
    let reference = reference_final(dir.path(), passes, &[]);
    let final_differing = differing_pages(&reference, &dir.path().join("final.bin")).len() as u64;
    let summary = serde_json::json!({
        "campaign": "hops",
        "hops": hops,
        "passes": passes,
        "seconds": started.elapsed().as_secs_f64(),
        "received_vs_paused_differing_bytes": differing_bytes_total,
        "final_vs_never_migrated_differing_bytes": final_differing * 4096,
        "rows": rows,
    });
    write_summary(&summary);
    assert_eq!(differing_bytes_total, 0, "a hop received other memory");
    assert_eq!(final_differing, 0, "the guest ended with other memory");
}

fn state(sock: &Path) -> String {
    let (_, v, _) = remote(sock, &["status", "--json"]);
    v["state"].as_str().unwrap_or("?").to_string()
}

#[test]
#[ignore = "a fault campaign: tools/soak.sh runs it"]
fn cuts() {
    let cuts = env_count("VMM_SOAK_CUTS", 60);
    let seed = seed();
    eprintln!("cut seed {seed} (VMM_SOAK_SEED replays it)");
    let mut x = seed | 1;
    let dir = tempfile::tempdir().unwrap();
    let (src, sock) = micro_source(dir.path(), &[]);
    wait_some_passes(&sock, 20);
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut outcomes = std::collections::BTreeMap::<String, u64>::new();
    for i in 0..cuts {
        let mode = if i % 2 == 0 { "precopy" } else { "postcopy" };
        // Anywhere from inside the first header to well into the pages (this guest's stream is
        // ~4-7 MiB); one in three within the first 16 KiB (Hello, state, the switch to
        // postcopy), where the outcomes change.
        let span = if next(&mut x) % 3 == 0 {
            16 << 10
        } else {
            3 << 20
        };
        let cut = 10 + next(&mut x) % span;
        let port = free_port();
        let mut cmd = Command::new(vmm_bin());
        cmd.args(["run", "--incoming", &format!("tcp://127.0.0.1:{port}")])
            .args(["--tls-psk", &psk(dir.path()), "--console", "none", "--json"]);
        let mut dst = Bg::spawn("destination", cmd);
        dst.wait_for("waiting for an incoming migration", Duration::from_secs(20));
        let proxy = CutProxy::start_counting_all(format!("127.0.0.1:{port}").parse().unwrap(), cut);
        let t = Instant::now();
        let (code, reply, err) = remote(
            &sock,
            &[
                "migrate",
                "--to",
                &format!("tcp://{}", proxy.addr),
                "--mode",
                mode,
                "--tls-psk",
                &psk(dir.path()),
                "--json",
            ],
        );
        let took = t.elapsed();
        let (dcode, _, derr) = dst.finish(Duration::from_secs(60));
        let what = format!("attempt {i}: {mode} cut at {cut} B");
        assert!(
            proxy.cut.load(Ordering::Acquire),
            "{what}: the link was never cut ({} B forwarded): {reply}",
            proxy.forwarded.load(Ordering::Acquire)
        );
        assert_ne!(
            code,
            Some(0),
            "{what}: the migration cannot succeed: {reply} {err}"
        );
        assert_ne!(dcode, Some(0), "{what}: destination:\n{derr}");
        assert!(derr.contains("vmm: error:"), "{what}: {derr}");
        let here = state(&sock);
        let outcome = match (mode, here.as_str()) {
            (_, "running") => "failed; source runs on",
            // Past the source's PostcopyStart it cannot know whether the destination ran the
            // guest: it holds it paused with every page either way (README, "Postcopy
            // failures"). The destination says "postcopy failed" if it had started, else the
            // broken stream.
            ("postcopy", "paused") => {
                let (rcode, _, rerr) = remote(&sock, &["resume"]);
                assert_eq!(rcode, Some(0), "{what}: resume: {rerr}");
                assert_eq!(state(&sock), "running", "{what}: after resume");
                if derr.contains("postcopy failed") {
                    "postcopy failed on the destination; source paused with every page, resumed"
                } else {
                    "cut after PostcopyStart left the source, before the destination had it; \
                     source paused with every page, resumed"
                }
            }
            (_, other) => panic!("{what}: undocumented outcome: source {other}: {reply}\n{derr}"),
        };
        *outcomes.entry(format!("{mode}: {outcome}")).or_default() += 1;
        eprintln!("{what}: {outcome} ({:.0} ms)", took.as_secs_f64() * 1e3);
        rows.push(serde_json::json!({
            "attempt": i, "mode": mode, "cut_at": cut, "outcome": outcome,
            "source_exit": code, "destination_exit": dcode,
            "ms": (took.as_secs_f64() * 1e3).round(),
            "source_error": reply["error"],
            "destination_error": derr.lines().rfind(|l| l.contains("vmm: error:")),
        }));
    }
    let rep = finish_intact(src, &sock, 100);
    let summary = serde_json::json!({
        "campaign": "cuts",
        "cuts": cuts,
        "seed": seed,
        "seconds": started.elapsed().as_secs_f64(),
        "outcomes": outcomes,
        "source_finished_intact": rep["micro_check"]["mismatches"] == 0,
        "rows": rows,
    });
    write_summary(&summary);
}
