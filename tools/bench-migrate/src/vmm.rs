//! The vmm half: `vmm run` in namespace a, `vmm run --incoming` in namespace b, and
//! `vmm remote ... migrate` over the source's API socket, which prints one JSON report.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use vmm_tests::netns::{Side, TwoHosts};

use crate::guest::{self, ChildGuard, GuestError};
use crate::sample::{DeviceStats, DowntimeParts, FaultLatency, Mode, Sample, Tool};
use crate::{Config, DeviceConfig};

/// Where the first `--device` sits in the guest (vmm places functions from slot 1).
pub const DEVICE_BDF: &str = "0000:00:01.0";

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
    #[error("the test device {bin} is missing: build it (`cargo build -p gpu-test-device`) or pass --device-bin")]
    NoDevice { bin: String },
}

/// Fails unless the device server exists and `bin` takes `--device`.
pub fn check_device_support(bin: &Path, device: &DeviceConfig) -> Result<(), VmmError> {
    if !device.bin.is_file() {
        return Err(VmmError::NoDevice {
            bin: device.bin.display().to_string(),
        });
    }
    let out = Command::new(bin)
        .args(["run", "--help"])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| VmmError::Spawn {
            bin: bin.display().to_string(),
            source,
        })?;
    if !String::from_utf8_lossy(&out.stdout).contains("--device") {
        return Err(VmmError::Unsupported {
            bin: bin.display().to_string(),
            missing: "`vmm run` has no --device".into(),
        });
    }
    Ok(())
}

/// The agent script of a guest with the device: bind it to vfio-pci and start its page writer,
/// then the memory workload (whose first pass is what the bench waits for before migrating).
pub fn device_agent(device: &DeviceConfig, agent: &str) -> String {
    format!(
        "vfio-bind,{DEVICE_BDF};vfio-workload,{DEVICE_BDF},start,dma,{};{agent}",
        device.dma_pages_s
    )
}

/// Starts the test device server in namespace `side` on `sock`; returns once it listens.
fn start_device(
    hosts: &TwoHosts,
    side: Side,
    device: &DeviceConfig,
    sock: &Path,
    log: &Path,
) -> Result<ChildGuard, VmmError> {
    let mut cmd = hosts.command(side, &device.bin);
    cmd.arg("--socket")
        .arg(sock)
        .args(["--vram-size", &format!("{}M", device.vram_mib)]);
    let mut guard = ChildGuard::spawn(&format!("device server ({side:?})"), cmd, log)?;
    guest::wait_for_line(
        log,
        "the device server's `listening on`",
        |l| l.contains("listening on"),
        Duration::from_secs(30),
        Some(&mut guard),
    )?;
    Ok(guard)
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

/// `vmm remote` arguments of a migration from `src_sock` to `uri`, with the bench's settings
/// and the link's credentials.
pub(crate) fn migrate_args(
    cfg: &Config,
    src_sock: &str,
    uri: &str,
    mode: Mode,
    creds: &[String],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--api-socket",
        src_sock,
        "migrate",
        "--to",
        uri,
        "--mode",
        mode.name(),
        "--tracker",
        &cfg.tracker,
        "--downtime-ms",
        &cfg.downtime_ms.to_string(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(creds.iter().cloned());
    if cfg.max_bandwidth_mib > 0 {
        args.extend([
            "--bandwidth-mib-s".into(),
            cfg.max_bandwidth_mib.to_string(),
        ]);
    }
    if let Some(c) = cfg.channels {
        args.extend(["--channels".into(), c.to_string()]);
    }
    args
}

/// Runs a `vmm remote` command to completion within `limit`, returning (status, stdout, stderr).
pub(crate) fn remote(
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
pub(crate) fn parse_report(stdout: &str) -> Option<(bool, Value)> {
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
    sample.transport = report["transport"].as_str().map(str::to_string);
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
    let parts = &report["downtime_parts"];
    if parts.is_object() {
        let ms = |k: &str| parts[k].as_f64().unwrap_or(0.0);
        sample.downtime_parts = Some(DowntimeParts {
            pause_ms: ms("pause_ms"),
            device_stop_ms: ms("device_stop_ms"),
            harvest_ms: ms("harvest_ms"),
            capture_ms: ms("capture_ms"),
            final_pages_ms: ms("final_pages_ms"),
            device_data_ms: ms("device_data_ms"),
            state_ms: ms("state_ms"),
            confirm_ms: ms("confirm_ms"),
            destination_restore_ms: ms("destination_restore_ms"),
        });
    }
    let d = &report["devices"];
    if d.is_object() {
        let n = |k: &str| d[k].as_u64().unwrap_or(0);
        sample.device = Some(DeviceStats {
            devices: n("devices"),
            precopy_bytes: n("precopy_bytes"),
            stop_copy_bytes: n("stop_copy_bytes"),
            dirty: d["dirty"].as_str().unwrap_or_default().to_string(),
            dma_pages: n("dma_pages"),
            dma_harvests: n("dma_harvests"),
            dma_harvest_ms_per_round: d["dma_harvest_ms_per_round"].as_f64().unwrap_or(0.0),
        });
    }
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

/// The link's credentials on both sides: `vmm+tls` gets TLS 1.3 with a pre-shared key (made in
/// `dir`), the others plain TCP, named so (`--insecure`).
pub(crate) fn credentials(tool: Tool, dir: &Path) -> Vec<String> {
    if tool == Tool::VmmTls {
        let psk = vmm_tests::tls::psk_file(dir, "keys.psk");
        vec!["--tls-psk".into(), psk.display().to_string()]
    } else {
        vec!["--insecure".into()]
    }
}

/// Waits (30 s at most) until a destination serves its API on `sock`, which it does only once
/// the migrated VM is its own; fails early if it exits (its output is in `log`).
pub(crate) fn wait_api_socket(
    dst: &mut ChildGuard,
    sock: &Path,
    log: &Path,
) -> Result<(), VmmError> {
    const SECS: u64 = 30;
    let t = Instant::now();
    while !sock.exists() {
        if let Some(status) = dst.exited() {
            return Err(GuestError::Exited {
                what: dst.what.clone(),
                status,
                waiting_for: "its API socket".into(),
                log: log.to_path_buf(),
            }
            .into());
        }
        if t.elapsed() > Duration::from_secs(SECS) {
            return Err(VmmError::NoApiSocket {
                path: sock.display().to_string(),
                secs: SECS,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Migrates once; returns the filled sample (ok only if the destination verified its memory).
/// With `tool` [`Tool::VmmGpu`], each side gets its own test device server (in its namespace)
/// passed through, the source's page writer runs through the migration, and the destination
/// checks its stamps too.
#[allow(clippy::too_many_arguments)]
pub fn run(
    hosts: &TwoHosts,
    cfg: &Config,
    tool: Tool,
    mode: Mode,
    run: usize,
    port: u16,
    dir: &Path,
    progress: &dyn Fn(&str),
) -> Result<Sample, VmmError> {
    let mut sample = Sample::new(tool, mode, run);
    let p = |name: &str| dir.join(name).display().to_string();
    let uri = format!("tcp://{}:{port}", hosts.addr_b);
    let (src_sock, dst_sock) = (p("src.sock"), p("dst.sock"));
    let device = (tool == Tool::VmmGpu).then_some(&cfg.device);
    let (dev_a, dev_b) = (dir.join("gpu-a.sock"), dir.join("gpu-b.sock"));
    let agent = match device {
        Some(d) => device_agent(d, &cfg.agent),
        None => cfg.agent.clone(),
    };
    // Both device servers live until the run ends (the guards drop last).
    let mut servers = Vec::new();
    if let Some(d) = device {
        progress("starting the device servers");
        servers.push(start_device(
            hosts,
            Side::A,
            d,
            &dev_a,
            &dir.join("gpu-a.log"),
        )?);
        servers.push(start_device(
            hosts,
            Side::B,
            d,
            &dev_b,
            &dir.join("gpu-b.log"),
        )?);
    }

    let creds = credentials(tool, dir);

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
        .args(["--agent", &agent])
        .args(["--api-socket", &src_sock])
        .args(["--console", &format!("file:{}", p("src.console"))]);
    if device.is_some() {
        cmd.arg("--device")
            .arg(format!("vfio-user:{}", dev_a.display()));
    }
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
        .args(&creds)
        .arg("--json");
    if device.is_some() {
        cmd.arg("--device")
            .arg(format!("vfio-user:{}", dev_b.display()));
    }
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
    let mut migrate_args = migrate_args(cfg, &src_sock, &uri, mode, &creds);
    if let Some(dirty) = device.and_then(|d| d.dirty.as_deref()) {
        migrate_args.extend(["--device-dirty".to_string(), dirty.to_string()]);
    }
    let migrate_args: Vec<&str> = migrate_args.iter().map(String::as_str).collect();
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
    wait_api_socket(&mut dst, Path::new(&dst_sock), &dir.join("dst.stdout"))?;
    let mut command = "workload-stop;workload-verify".to_string();
    if device.is_some() {
        command += &format!(";vfio-workload,{DEVICE_BDF},stop");
    }
    let (status, _, stderr) = remote(
        hosts,
        cfg,
        &["--api-socket", &dst_sock, "console", &command],
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
    if device.is_some() {
        let line = guest::wait_for_line(
            &dir.join("dst.console"),
            "the agent's answer to stopping the page writer",
            guest::is_device_stop_result,
            cfg.verify_timeout,
            Some(&mut dst),
        )?;
        sample.record_device_verify(&line);
    }
    drop(dst);
    drop(servers);
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
        assert!(s.device.is_none() && s.downtime_parts.is_none());
        let with_device: Value = serde_json::from_str(
            r#"{"ok":true,"mode":"precopy","total_ms":104,"downtime_ms":15.5,"bytes":1,"rounds":2,
                "downtime_parts":{"pause_ms":1.1,"device_stop_ms":0.06,"final_pages_ms":1.5,
                  "device_data_ms":0.4,"state_ms":1.9,"confirm_ms":6.2},
                "devices":{"devices":1,"precopy_bytes":4096,"stop_copy_bytes":632,"dirty":"log",
                  "dma_pages":300,"dma_harvests":3,"dma_harvest_ms_per_round":2.2}}"#,
        )
        .expect("valid JSON");
        let mut g = Sample::new(Tool::VmmGpu, Mode::Precopy, 1);
        read_report(&mut g, &with_device);
        let parts = g.downtime_parts.expect("parts");
        assert_eq!((parts.pause_ms, parts.confirm_ms), (1.1, 6.2));
        let dev = g.device.expect("devices");
        assert_eq!(
            (dev.stop_copy_bytes, dev.dma_pages, dev.dirty.as_str()),
            (632, 300, "log")
        );
        assert_eq!(dev.dma_harvest_ms_per_round, 2.2);
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
