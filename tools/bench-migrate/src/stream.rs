//! The stream scenario (`--stream-mib N`): how fast vmm's migration stream moves memory that is
//! not zero, next to a raw TCP copy over the same link in the same run.
//!
//! The Linux guest's memory is mostly zero (vmm sends a zero page as a range, not as 4 KiB), and
//! a Linux guest cannot fill much of it here (its page faults are emulated, ~8 ms a page). The
//! micro guest can: with `--pattern sweep` each pass stamps 8 bytes at the start of every page
//! of its N MiB region, at native speed. The bench waits for its first full pass (every page of
//! the region is then non-zero), pauses it (`vmm remote pause`) so nothing changes while it
//! moves, and migrates it by precopy: one full round, then a stop-and-copy with no dirty page
//! left. On the destination the guest stays paused until `vmm remote resume`; it then runs one
//! more pass (`vmm remote finish --after 1`) and checks its whole region against the model
//! (`--verify`): a run counts only if that check finds no mismatch.
//!
//! Right before each migration, with both VMs paused, the bench also times a raw TCP copy of
//! the same link (`--tcp-mib`): on a loaded machine the link's speed drifts within a run, and
//! the ratio to this adjacent copy is the side-by-side one. A second copy right after it writes
//! what it receives into a fresh memfd, as the destination must write guest RAM: the link plus
//! fresh memory, the floor under a migration on this host.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use vmm_tests::netns::{Side, TwoHosts};

use crate::baseline::Sink;
use crate::guest::{self, ChildGuard, GuestError};
use crate::sample::{Mode, Tool};
use crate::vmm::{self, VmmError};
use crate::Config;

/// Guest RAM beyond the swept region: the micro guest's page tables, mailbox and payload sit
/// below its region (which starts at 4 MiB).
pub const EXTRA_MEM_MIB: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("vmm remote {what} failed ({status}): {detail}")]
    Remote {
        what: &'static str,
        status: String,
        detail: String,
    },
    #[error(
        "the source's micro guest did not complete a pass within {secs} s (last status: {last})"
    )]
    NoPass { secs: u64, last: String },
    #[error("the source is {state} after `vmm remote pause`, not paused: {status}")]
    NotPaused { state: String, status: String },
    #[error("the destination did not end within {secs} s of `finish --after 1`; see {log}")]
    NoEnd { secs: u64, log: String },
    #[error("the destination printed no run report; see {log}")]
    NoRunReport { log: String },
    #[error("the destination's memory check failed: {0}")]
    Check(String),
    #[error("the raw TCP copy before the migration: {0}")]
    Tcp(#[from] crate::baseline::BaselineError),
}

/// One migration of the paused micro guest.
#[derive(Clone, Debug, Serialize)]
pub struct StreamSample {
    pub tool: Tool,
    pub run: usize,
    /// Migrated, and the destination's micro guest ended with its memory equal to the model.
    pub ok: bool,
    pub error: Option<String>,
    /// The swept region (MiB) and the guest's RAM (MiB).
    pub region_mib: u64,
    pub mem_mib: u64,
    /// Source spawn to its first complete pass (the region all written).
    pub fill_ms: Option<f64>,
    /// Passes the source had completed when paused.
    pub passes_at_pause: Option<u64>,
    /// From vmm's migrate report.
    pub transport: Option<String>,
    pub bytes: Option<u64>,
    pub pages_sent: Option<u64>,
    pub zero_pages: Option<u64>,
    pub rounds: Option<u64>,
    pub pages_per_round: Option<Vec<u64>>,
    pub total_ms: Option<f64>,
    pub downtime_ms: Option<f64>,
    /// vmm's own figure: payload over the whole migration.
    pub report_mib_s: Option<f64>,
    /// Migrate command to completion, timed by this bench.
    pub wall_ms: Option<f64>,
    /// A raw TCP copy a -> b timed just before this migration (MiB/s), and the stream's
    /// throughput over it.
    pub adjacent_tcp_mib_s: Option<f64>,
    pub throughput_vs_adjacent_tcp: Option<f64>,
    /// The same copy with the receiver writing into a fresh memfd (`Sink::FreshMemory`: what a
    /// destination must do with guest RAM), timed right after it, and the stream over it.
    pub adjacent_tcp_fresh_mib_s: Option<f64>,
    pub throughput_vs_adjacent_tcp_fresh: Option<f64>,
    /// The destination's state before `vmm remote resume` (a paused source stays paused there).
    pub destination_state: Option<String>,
    /// The destination's micro guest: final pass count and its memory check.
    pub final_passes: Option<u64>,
    pub pages_checked: Option<u64>,
    pub mismatches: Option<u64>,
}

impl StreamSample {
    pub fn new(tool: Tool, run: usize, region_mib: u64) -> Self {
        StreamSample {
            tool,
            run,
            ok: false,
            error: None,
            region_mib,
            mem_mib: region_mib + EXTRA_MEM_MIB,
            fill_ms: None,
            passes_at_pause: None,
            transport: None,
            bytes: None,
            pages_sent: None,
            zero_pages: None,
            rounds: None,
            pages_per_round: None,
            total_ms: None,
            downtime_ms: None,
            report_mib_s: None,
            wall_ms: None,
            adjacent_tcp_mib_s: None,
            throughput_vs_adjacent_tcp: None,
            adjacent_tcp_fresh_mib_s: None,
            throughput_vs_adjacent_tcp_fresh: None,
            destination_state: None,
            final_passes: None,
            pages_checked: None,
            mismatches: None,
        }
    }

    pub fn mib_sent(&self) -> Option<f64> {
        self.bytes.map(|b| b as f64 / (1 << 20) as f64)
    }

    /// MiB sent over the whole migration's time (vmm's total_ms), MiB/s.
    pub fn throughput_mib_s(&self) -> Option<f64> {
        match (self.mib_sent(), self.total_ms) {
            (Some(m), Some(t)) if t > 0.0 => Some(m / (t / 1000.0)),
            _ => None,
        }
    }

    /// Fills the migration's figures from vmm's migrate report (the `report` object).
    pub fn read_report(&mut self, report: &Value) {
        self.transport = report["transport"].as_str().map(str::to_string);
        self.bytes = report["bytes"].as_u64();
        self.pages_sent = report["pages_sent"].as_u64();
        self.zero_pages = report["zero_pages"].as_u64();
        self.rounds = report["rounds"].as_u64();
        self.pages_per_round = report["pages_per_round"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect());
        self.total_ms = report["total_ms"].as_f64();
        self.downtime_ms = report["downtime_ms"].as_f64();
        self.report_mib_s = report["throughput_mib_s"].as_f64();
    }

    /// Reads the destination's run report: ok only if its micro guest ended by itself after
    /// `passes` passes (the budget `finish` named) with no page differing from the model.
    pub fn read_run_report(&mut self, rep: &Value, passes: u64) -> Result<(), StreamError> {
        self.final_passes = rep["micro_passes"].as_u64();
        self.pages_checked = rep["micro_check"]["pages_checked"].as_u64();
        self.mismatches = rep["micro_check"]["mismatches"].as_u64();
        let kind = rep["outcome"]["kind"].as_str().unwrap_or("?");
        let why = if kind != "micro-exit" {
            Some(format!("outcome {kind}, not micro-exit"))
        } else if self.final_passes != Some(passes) {
            Some(format!(
                "{} passes, not the {passes} finish named",
                self.final_passes.map_or("?".into(), |p| p.to_string())
            ))
        } else if self.pages_checked.unwrap_or(0) == 0 {
            Some("no page checked (was --verify lost in the migration?)".into())
        } else if self.mismatches != Some(0) {
            Some(format!(
                "{} of {} pages differ from the model",
                self.mismatches.map_or("?".into(), |m| m.to_string()),
                self.pages_checked.unwrap_or(0)
            ))
        } else if rep["migration"]["ok"].as_bool() != Some(true) {
            Some("its migration report does not say ok".into())
        } else {
            None
        };
        match why {
            Some(why) => Err(StreamError::Check(format!("{why}: {rep}"))),
            None => {
                self.ok = true;
                Ok(())
            }
        }
    }
}

/// The last line of `log` that is a JSON object with an `outcome`: `vmm run --json`'s report
/// (its stdout and stderr share the log).
pub fn run_report(log: &str) -> Option<Value> {
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(|v| v.is_object() && !v["outcome"].is_null())
}

/// `vmm remote ARGS` that must succeed; returns its stdout parsed as JSON (Null if it is not).
fn remote_ok(
    hosts: &TwoHosts,
    cfg: &Config,
    what: &'static str,
    args: &[&str],
) -> Result<Value, StreamError> {
    let (status, stdout, stderr) = vmm::remote(hosts, cfg, args, Duration::from_secs(30))?;
    let v = serde_json::from_str::<Value>(&stdout).unwrap_or(Value::Null);
    if !status.success() || v["ok"].as_bool() == Some(false) {
        return Err(StreamError::Remote {
            what,
            status: status.to_string(),
            detail: format!("{} {}", stderr.trim(), stdout.trim()),
        });
    }
    Ok(v)
}

/// Migrates the paused micro guest once (see the module's documentation) for `sample`'s tool
/// and region, filling `sample` (what was measured stays there on error); `tcp_copy` times the raw TCP copy done just before
/// the migration. An error leaves the logs in `dir`.
pub fn run(
    hosts: &TwoHosts,
    cfg: &Config,
    port: u16,
    dir: &Path,
    progress: &dyn Fn(&str),
    tcp_copy: &dyn Fn(Sink) -> Result<f64, crate::baseline::BaselineError>,
    sample: &mut StreamSample,
) -> Result<(), StreamError> {
    let p = |name: &str| dir.join(name).display().to_string();
    let uri = format!("tcp://{}:{port}", hosts.addr_b);
    let (src_sock, dst_sock) = (p("src.sock"), p("dst.sock"));
    let creds = vmm::credentials(sample.tool, dir);

    progress("filling the source's memory");
    let start = Instant::now();
    let mut cmd = hosts.command(Side::A, &cfg.vmm);
    cmd.arg("run")
        .args(["--micro", "--pattern", "sweep", "--verify"])
        .args(["--region-mib", &sample.region_mib.to_string()])
        .args(["--mem", &format!("{}M", sample.mem_mib)])
        .args(["--passes", "0", "--console", "none", "--json"])
        .args(["--api-socket", &src_sock]);
    let mut src = ChildGuard::spawn("source vmm", cmd, &dir.join("src.stdout"))?;
    let mut last = Value::Null;
    loop {
        if let Some(status) = src.exited() {
            return Err(GuestError::Exited {
                what: src.what.clone(),
                status,
                waiting_for: "its first pass".into(),
                log: dir.join("src.stdout"),
            }
            .into());
        }
        if Path::new(&src_sock).exists() {
            if let Ok((_, out, _)) = vmm::remote(
                hosts,
                cfg,
                &["--api-socket", &src_sock, "status", "--json"],
                Duration::from_secs(10),
            ) {
                last = serde_json::from_str(&out).unwrap_or(Value::Null);
                if last["micro_passes"].as_u64().unwrap_or(0) >= 1 {
                    break;
                }
            }
        }
        if start.elapsed() > cfg.boot_timeout {
            return Err(StreamError::NoPass {
                secs: cfg.boot_timeout.as_secs(),
                last: last.to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    sample.fill_ms = Some(start.elapsed().as_secs_f64() * 1000.0);

    progress("pausing the source");
    remote_ok(hosts, cfg, "pause", &["--api-socket", &src_sock, "pause"])?;
    let status = remote_ok(
        hosts,
        cfg,
        "status",
        &["--api-socket", &src_sock, "status", "--json"],
    )?;
    let state = status["state"].as_str().unwrap_or("?");
    if state != "paused" {
        return Err(StreamError::NotPaused {
            state: state.to_string(),
            status: status.to_string(),
        });
    }
    sample.passes_at_pause = status["micro_passes"].as_u64();

    progress("starting the destination");
    let mut cmd = hosts.command(Side::B, &cfg.vmm);
    cmd.arg("run")
        .args(["--incoming", &uri])
        .args(["--api-socket", &dst_sock])
        .args(["--console", "none", "--json"])
        .args(&creds);
    let dst_log = dir.join("dst.stdout");
    let mut dst = ChildGuard::spawn("destination vmm", cmd, &dst_log)?;
    guest::wait_listening(&mut dst, port, Duration::from_secs(30), &dst_log)?;

    progress("raw TCP copy");
    sample.adjacent_tcp_mib_s = Some(tcp_copy(Sink::Discard)?);
    progress("raw TCP copy into fresh memory");
    sample.adjacent_tcp_fresh_mib_s = Some(tcp_copy(Sink::FreshMemory)?);

    progress("migrating");
    let args = vmm::migrate_args(cfg, &src_sock, &uri, Mode::Precopy, &creds);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    let (status, stdout, stderr) = vmm::remote(hosts, cfg, &args, cfg.migrate_timeout)?;
    sample.wall_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
    std::fs::write(dir.join("migrate.json"), &stdout).ok();
    if !status.success() {
        return Err(VmmError::Migrate {
            status: status.to_string(),
            stderr: format!("{} {}", stderr.trim(), stdout.trim()),
        }
        .into());
    }
    let (ok, report) = vmm::parse_report(&stdout).ok_or_else(|| VmmError::NoReport {
        stdout: stdout.clone(),
    })?;
    if !ok {
        return Err(VmmError::NotOk {
            report: report.to_string(),
        }
        .into());
    }
    sample.read_report(&report);
    sample.throughput_vs_adjacent_tcp =
        crate::stats::ratio(sample.throughput_mib_s(), sample.adjacent_tcp_mib_s);
    sample.throughput_vs_adjacent_tcp_fresh =
        crate::stats::ratio(sample.throughput_mib_s(), sample.adjacent_tcp_fresh_mib_s);
    drop(src);

    progress("checking on the destination");
    vmm::wait_api_socket(&mut dst, Path::new(&dst_sock), &dst_log)?;
    let status = remote_ok(
        hosts,
        cfg,
        "status",
        &["--api-socket", &dst_sock, "status", "--json"],
    )?;
    sample.destination_state = status["state"].as_str().map(str::to_string);
    remote_ok(hosts, cfg, "resume", &["--api-socket", &dst_sock, "resume"])?;
    let reply = remote_ok(
        hosts,
        cfg,
        "finish",
        &[
            "--api-socket",
            &dst_sock,
            "finish",
            "--after",
            "1",
            "--json",
        ],
    )?;
    let passes = reply["passes"]
        .as_u64()
        .ok_or_else(|| StreamError::Remote {
            what: "finish",
            status: "ok".into(),
            detail: format!("no pass count in {reply}"),
        })?;
    let t = Instant::now();
    while dst.exited().is_none() {
        if t.elapsed() > cfg.verify_timeout {
            return Err(StreamError::NoEnd {
                secs: cfg.verify_timeout.as_secs(),
                log: dst_log.display().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read(&dst_log).unwrap_or_default();
    let rep =
        run_report(&String::from_utf8_lossy(&text)).ok_or_else(|| StreamError::NoRunReport {
            log: dst_log.display().to_string(),
        })?;
    sample.read_run_report(&rep, passes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_migrate_report_and_its_throughput() {
        let report: Value = serde_json::from_str(
            r#"{"ok":true,"mode":"precopy","transport":"tls-psk","total_ms":400.0,
                "downtime_ms":3.5,"bytes":536870912,"pages_sent":131072,"zero_pages":16384,
                "rounds":1,"pages_per_round":[147456],"throughput_mib_s":1280.0}"#,
        )
        .expect("valid JSON");
        let mut s = StreamSample::new(Tool::VmmTls, 1, 512);
        s.read_report(&report);
        assert_eq!(s.mem_mib, 576);
        assert_eq!(s.transport.as_deref(), Some("tls-psk"));
        assert_eq!(s.mib_sent(), Some(512.0));
        assert_eq!(s.throughput_mib_s(), Some(1280.0));
        assert_eq!((s.pages_sent, s.zero_pages), (Some(131072), Some(16384)));
        assert_eq!(s.pages_per_round, Some(vec![147456]));
        let mut none = StreamSample::new(Tool::Vmm, 1, 8);
        none.read_report(&serde_json::json!({"bytes": 5, "total_ms": 0.0}));
        assert_eq!(none.throughput_mib_s(), None);
    }

    #[test]
    fn the_destination_run_report_decides_ok() {
        let log = "vmm: listening\n{\"outcome\":{\"kind\":\"micro-exit\"},\"micro_passes\":3,\
                   \"micro_check\":{\"pages_checked\":131072,\"mismatches\":0},\
                   \"migration\":{\"ok\":true}}\nvmm: bye\n";
        let rep = run_report(log).expect("a report");
        let mut s = StreamSample::new(Tool::Vmm, 1, 512);
        s.read_run_report(&rep, 3).expect("ok");
        assert!(s.ok);
        assert_eq!(s.pages_checked, Some(131072));

        let mut s = StreamSample::new(Tool::Vmm, 1, 512);
        let e = s.read_run_report(&rep, 4).expect_err("wrong pass count");
        assert!(e.to_string().contains("not the 4"), "{e}");
        assert!(!s.ok);

        let bad: Value = serde_json::from_str(
            r#"{"outcome":{"kind":"micro-exit"},"micro_passes":3,
                "micro_check":{"pages_checked":10,"mismatches":2},"migration":{"ok":true}}"#,
        )
        .expect("valid JSON");
        let e = s.read_run_report(&bad, 3).expect_err("mismatches");
        assert!(e.to_string().contains("2 of 10 pages differ"), "{e}");
        let unchecked: Value = serde_json::from_str(
            r#"{"outcome":{"kind":"micro-exit"},"micro_passes":3,"migration":{"ok":true}}"#,
        )
        .expect("valid JSON");
        assert!(s.read_run_report(&unchecked, 3).is_err());
        assert!(run_report("no report\n{\"ok\":true}\n").is_none());
    }
}
