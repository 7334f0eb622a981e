//! The vmm half: `vmm run` in namespace a, `vmm run --incoming` in namespace b, and
//! `vmm remote ... migrate` over the source's API socket, which prints one JSON report.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use vmm_tests::netns::{Side, TwoHosts};

use crate::guest::{self, ChildGuard, GuestError};
use crate::sample::{FaultLatency, Mode, Sample, Tool};
use crate::Config;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(
        "{bin} has no migration support yet ({missing}); build a vmm with `vmm remote` and \
         `vmm run --incoming`, pass it with --vmm, or run only QEMU with --tools qemu"
    )]
    Unsupported { bin: String, missing: String },
    #[error("cannot run {bin}: {source}")]
    Spawn { bin: String, source: std::io::Error },
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("the destination's API socket {path} did not appear within {secs} s")]
    NoApiSocket { path: String, secs: u64 },
    #[error("vmm remote migrate failed ({status}): {stderr}")]
    Migrate { status: String, stderr: String },
    #[error("vmm remote migrate printed no JSON report: {stdout}")]
    NoReport { stdout: String },
    #[error("vmm remote migrate reported failure: {report}")]
    NotOk { report: String },
    #[error("vmm remote migrate did not finish within {secs} s")]
    Timeout { secs: u64 },
    #[error("vmm remote console failed ({status}): {stderr}")]
    Console { status: String, stderr: String },
}

/// Fails with [`VmmError::Unsupported`] unless `bin` has `remote` and `run --incoming`.
pub fn check_support(bin: &Path) -> Result<(), VmmError> {
    let name = bin.display().to_string();
    let help = |args: &[&str]| -> Result<(bool, String), VmmError> {
        let out = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| VmmError::Spawn {
                bin: name.clone(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        Ok((out.status.success(), text))
    };
    let unsupported = |missing: &str| VmmError::Unsupported {
        bin: name.clone(),
        missing: missing.to_string(),
    };
    let (ok, text) = help(&["remote", "--help"])?;
    if !ok {
        return Err(unsupported("no `vmm remote` command"));
    }
    for word in ["migrate", "console"] {
        if !text.contains(word) {
            return Err(unsupported(&format!("`vmm remote` has no `{word}`")));
        }
    }
    let (_, text) = help(&["run", "--help"])?;
    for opt in ["--incoming", "--api-socket"] {
        if !text.contains(opt) {
            return Err(unsupported(&format!("`vmm run` has no {opt}")));
        }
    }
    Ok(())
}

/// Runs a `vmm remote` command to completion within `limit`, returning (status, stdout, stderr).
fn remote(
    hosts: &TwoHosts,
    cfg: &Config,
    args: &[&str],
    limit: Duration,
) -> Result<(std::process::ExitStatus, String, String), VmmError> {
    let mut cmd = hosts.command(Side::A, &cfg.vmm);
    cmd.arg("remote").args(args);
    tracing::debug!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| VmmError::Spawn {
            bin: cfg.vmm.display().to_string(),
            source,
        })?;
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(VmmError::Timeout {
                    secs: limit.as_secs(),
                });
            }
            Err(source) => {
                return Err(VmmError::Spawn {
                    bin: cfg.vmm.display().to_string(),
                    source,
                })
            }
        }
    };
    Ok((
        status,
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    ))
}

/// The last JSON object `vmm remote migrate --json` printed (pretty-printed or on one line),
/// unwrapped from `{"ok":..,"report":{..}}` if it is wrapped, and whether it says ok.
fn parse_report(stdout: &str) -> Option<(bool, Value)> {
    let whole = serde_json::Deserializer::from_str(stdout)
        .into_iter::<Value>()
        .map_while(Result::ok)
        .filter(Value::is_object)
        .last();
    let v = whole.or_else(|| {
        stdout
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(Value::is_object)
    })?;
    let report = if v["report"].is_object() {
        v["report"].clone()
    } else {
        v.clone()
    };
    let ok = v["ok"].as_bool() == Some(true) && report["ok"].as_bool() != Some(false);
    Some((ok, report))
}

fn u64s(v: &Value) -> Option<Vec<u64>> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
}

/// Fills `sample` from vmm's migrate report.
fn read_report(sample: &mut Sample, report: &Value) {
    sample.total_ms = report["total_ms"].as_f64();
    sample.downtime_ms = report["downtime_ms"].as_f64();
    sample.tool_downtime_ms = sample.downtime_ms;
    sample.bytes = report["bytes"].as_u64();
    sample.rounds = report["rounds"].as_u64();
    sample.pages_per_round = u64s(&report["pages_per_round"]);
    let pc = if report["postcopy"].is_null() {
        &report["destination"]["postcopy"]
    } else {
        &report["postcopy"]
    };
    sample.postcopy_entered = Some(!pc.is_null());
    if !pc.is_null() {
        sample.postcopy_faults = pc["faults"].as_u64();
        let l = &pc["latency_us"];
        sample.fault_latency_us = Some(FaultLatency {
            p50: l["p50"].as_f64(),
            p90: l["p90"].as_f64(),
            p99: l["p99"].as_f64(),
            max: l["max"].as_f64(),
        });
    }
}

/// Migrates once; returns the filled sample (ok only if the destination verified its memory).
pub fn run(
    hosts: &TwoHosts,
    cfg: &Config,
    mode: Mode,
    run: usize,
    port: u16,
    dir: &Path,
    progress: &dyn Fn(&str),
) -> Result<Sample, VmmError> {
    let mut sample = Sample::new(Tool::Vmm, mode, run);
    let p = |name: &str| dir.join(name).display().to_string();
    let uri = format!("tcp://{}:{port}", hosts.addr_b);
    let (src_sock, dst_sock) = (p("src.sock"), p("dst.sock"));

    progress("booting the source guest");
    let start = Instant::now();
    let mut cmd = hosts.command(Side::A, &cfg.vmm);
    cmd.arg("run")
        .arg("--kernel")
        .arg(&cfg.kernel)
        .arg("--initrd")
        .arg(&cfg.initrd)
        .args(["--mem", &format!("{}M", cfg.mem_mib)])
        .args(["--vcpus", &cfg.vcpus.to_string()])
        .args(["--agent", &cfg.agent])
        .args(["--api-socket", &src_sock])
        .args(["--console", &format!("file:{}", p("src.console"))]);
    let mut src = ChildGuard::spawn("source vmm", cmd, &dir.join("src.stderr"))?;
    guest::wait_for_line(
        &dir.join("src.console"),
        "the agent's first workload pass",
        guest::is_workload_running,
        cfg.boot_timeout,
        Some(&mut src),
    )?;
    sample.boot_ms = Some(start.elapsed().as_secs_f64() * 1000.0);

    progress("starting the destination");
    let mut cmd = hosts.command(Side::B, &cfg.vmm);
    cmd.arg("run")
        .args(["--incoming", &uri])
        .args(["--api-socket", &dst_sock])
        .args(["--console", &format!("file:{}", p("dst.console"))])
        .arg("--json");
    let mut dst = ChildGuard::spawn("destination vmm", cmd, &dir.join("dst.stdout"))?;
    // The destination serves its API only once it holds a VM: wait for its listening socket.
    guest::wait_listening(
        &mut dst,
        port,
        Duration::from_secs(30),
        &dir.join("dst.stdout"),
    )?;

    std::thread::sleep(cfg.settle);

    progress("migrating");
    let downtime = cfg.downtime_ms.to_string();
    let bandwidth = cfg.max_bandwidth_mib.to_string();
    let mut migrate_args = vec![
        "--api-socket",
        &src_sock,
        "migrate",
        "--to",
        &uri,
        "--mode",
        mode.name(),
        "--tracker",
        &cfg.tracker,
        "--downtime-ms",
        &downtime,
        "--json",
    ];
    if cfg.max_bandwidth_mib > 0 {
        migrate_args.extend(["--bandwidth-mib-s", &bandwidth]);
    }
    let t0 = Instant::now();
    let (status, stdout, stderr) = remote(hosts, cfg, &migrate_args, cfg.migrate_timeout)?;
    sample.wall_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
    std::fs::write(dir.join("migrate.json"), &stdout).ok();
    if !status.success() {
        return Err(VmmError::Migrate {
            status: status.to_string(),
            stderr: stderr.trim().to_string(),
        });
    }
    let (ok, report) = parse_report(&stdout).ok_or_else(|| VmmError::NoReport {
        stdout: stdout.clone(),
    })?;
    if !ok {
        return Err(VmmError::NotOk {
            report: report.to_string(),
        });
    }
    sample.status = "completed".into();
    read_report(&mut sample, &report);
    drop(src);

    progress("verifying on the destination");
    let t = Instant::now();
    while !Path::new(&dst_sock).exists() {
        if let Some(status) = dst.exited() {
            return Err(GuestError::Exited {
                what: dst.what.clone(),
                status,
                waiting_for: "its API socket".into(),
                log: dir.join("dst.stdout"),
            }
            .into());
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(VmmError::NoApiSocket {
                path: dst_sock,
                secs: 30,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, _, stderr) = remote(
        hosts,
        cfg,
        &[
            "--api-socket",
            &dst_sock,
            "console",
            "workload-stop;workload-verify",
        ],
        Duration::from_secs(30),
    )?;
    if !status.success() {
        return Err(VmmError::Console {
            status: status.to_string(),
            stderr: stderr.trim().to_string(),
        });
    }
    let line = guest::wait_for_line(
        &dir.join("dst.console"),
        "the agent's workload-verify answer",
        guest::is_verify_result,
        cfg.verify_timeout,
        Some(&mut dst),
    )?;
    sample.record_verify(&line);
    Ok(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_report() {
        let report: Value = serde_json::from_str(
            r#"{"ok":true,"mode":"postcopy","total_ms":812.5,"downtime_ms":41,"bytes":134217728,
                "rounds":1,"pages_per_round":[32768],
                "postcopy":{"faults":120,"latency_us":{"p50":95,"p90":140,"p99":300,"max":900}}}"#,
        )
        .expect("valid JSON");
        let mut s = Sample::new(Tool::Vmm, Mode::Postcopy, 1);
        read_report(&mut s, &report);
        assert_eq!(s.total_ms, Some(812.5));
        assert_eq!(s.bytes, Some(134217728));
        assert_eq!(s.pages_per_round, Some(vec![32768]));
        assert_eq!(s.postcopy_entered, Some(true));
        assert_eq!(s.postcopy_faults, Some(120));
        assert_eq!(s.fault_p50_us(), Some(95.0));
        let precopy: Value = serde_json::from_str(
            r#"{"ok":true,"mode":"precopy","total_ms":1,"downtime_ms":1,"bytes":1,"rounds":3,
                "pages_per_round":[1,2,3],"postcopy":null}"#,
        )
        .expect("valid JSON");
        let mut s = Sample::new(Tool::Vmm, Mode::Precopy, 1);
        read_report(&mut s, &precopy);
        // What vmm prints today: pretty-printed, wrapped.
        let wrapped = "{\n  \"ok\": true,\n  \"report\": {\n    \"bytes\": 5,\n    \"ok\": true,\n    \"pages_per_round\": [\n      32768,\n      1849\n    ],\n    \"postcopy\": null\n  }\n}\n";
        let (ok, r) = parse_report(wrapped).expect("a report");
        assert!(ok);
        assert_eq!(r["bytes"].as_u64(), Some(5));
        assert!(parse_report("no json here\n1849\n").is_none());
        let (ok, _) = parse_report("{\"ok\":false,\"error\":\"x\"}").expect("a report");
        assert!(!ok);
        assert_eq!(s.postcopy_entered, Some(false));
        assert!(s.fault_latency_us.is_none());
    }
}
