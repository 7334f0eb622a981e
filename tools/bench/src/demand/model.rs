//! The data model of a `vmm bench demand` report, the parsing of what `vmm restore --json`
//! prints, and the arithmetic that turns one restore into one sample.
//!
//! Every figure in a row is a median over the report's runs; the per-run pages/s/vCPU are kept
//! beside it so a reader can judge the spread.

use serde::{Deserialize, Serialize};

use crate::median;

/// Upstream reference figures (TRACKING.md, "KVM Userfault"): the kernel selftest
/// `demand_paging_test` on hardware KVM, as posted with the KVM Userfault series. Not measured
/// here; printed beside our figures so the two can be read together, never mixed with them.
pub const UPSTREAM_REFERENCE: &[&str] = &[
    "upstream demand_paging_test on hardware KVM (figures posted with the KVM Userfault series; NOT measured on this host):",
    "  2 vCPUs: ~3.3 us/page with no faults; userfaultfd MISSING 11.5 us/page (3.5x); KVM Userfault 6.2 us/page (1.9x)",
    "  64 vCPUs: userfaultfd 1,664 vs KVM Userfault 39,913 pages/s/vCPU (contention on the single userfaultfd's wait-queue lock)",
];

/// The vCPU count of upstream's per-page figures: only our case with as many vCPUs (private
/// regions) is set beside them.
pub const UPSTREAM_VCPUS: u32 = 2;

/// Upstream us/page at 2 vCPUs for a row's backend, where the upstream test has a figure.
pub fn upstream_us_per_page(backend: &str) -> Option<f64> {
    match backend {
        EAGER => Some(3.3),
        "uffd-missing" => Some(11.5),
        "kvm-userfault" => Some(6.2),
        _ => None,
    }
}

/// The backend name the eager (no-fault) baseline rows carry.
pub const EAGER: &str = "eager";

/// A whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemandBenchReport {
    /// "vmm bench demand".
    pub tool: String,
    /// "PVM" or "hardware".
    pub host: String,
    /// Kernel release and CPU count.
    pub host_detail: String,
    /// Runs per row; every figure is a median over them.
    pub runs: u32,
    /// Private region of each vCPU, MiB.
    pub region_mib: u64,
    /// Bytes brought in per fault (`--demand-chunk`).
    pub chunk: String,
    pub cases: Vec<CaseResult>,
    /// Backends the host refused, with its answer.
    pub refused: Vec<Refused>,
    /// Parts of the matrix not run, with the reason.
    pub skipped: Vec<String>,
    pub notes: Vec<String>,
}

impl DemandBenchReport {
    pub fn is_pvm(&self) -> bool {
        self.host == "PVM"
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refused {
    pub backend: String,
    pub reason: String,
}

/// One guest shape: how many vCPUs, and whether they also share a region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// "2 vCPUs", "4 vCPUs + shared".
    pub label: String,
    pub vcpus: u32,
    /// Pages of the region every vCPU writes (0: private regions only).
    pub shared_pages: u64,
    /// Region pages the workload touches in all (private regions plus the shared one).
    pub pages: u64,
    /// Calibrated time of one pass over memory already present, ms (used to take the passes
    /// that follow the first touch out of the eager baseline).
    pub warm_pass_ms: f64,
    /// Per run: complete passes the restored guest had left to run.
    pub remaining_passes: Vec<u64>,
    pub rows: Vec<Row>,
    /// Runs that failed as a whole (no snapshot), with the reason.
    #[serde(default)]
    pub failures: Vec<String>,
}

/// One (placement, handler, backend) on one case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// "pinned" (every thread on CPU 0) or "free".
    pub placement: String,
    /// "in-process", "page-server", or "-" for the eager baseline.
    pub handler: String,
    /// A demand-paging backend, or [`EAGER`].
    pub backend: String,
    /// Median pages brought in per second per vCPU: pages installed / (resume -> last page
    /// installed) / vCPUs (eager: region pages / touch_ms / vCPUs).
    pub pages_per_s_per_vcpu: Option<f64>,
    /// Median time from resume until every vCPU had touched each of its pages once (from the
    /// restored vmm's pass log), ms.
    pub touch_ms: Option<f64>,
    /// touch_ms per page of one vCPU, us: what the guest sees each page cost.
    pub guest_us_per_page: Option<f64>,
    /// guest_us_per_page over the eager baseline's, same case and placement, same snapshots.
    pub vs_eager: Option<f64>,
    pub fault_p50_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
    /// Median faults served per restore.
    pub faults: Option<f64>,
    /// Per-run pages/s/vCPU the median came from.
    pub samples: Vec<f64>,
    /// Runs that failed, with the reason.
    pub failures: Vec<String>,
}

/// One restore's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub pages_per_s_per_vcpu: f64,
    pub touch_ms: Option<f64>,
    /// touch_ms * 1000 / pages per vCPU.
    pub guest_us_per_page: Option<f64>,
    pub fault_p50_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
    pub faults: Option<u64>,
}

/// What `vmm restore DIR [--lazy] --json` prints (only the parts this benchmark reads).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RestoreOutput {
    pub run: RunPart,
    pub restore_ms: f64,
    pub run_ms: f64,
    #[serde(default)]
    pub demand: Option<DemandPart>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RunPart {
    pub exit_code: i32,
    #[serde(default)]
    pub vcpus: u32,
    #[serde(default)]
    pub micro_passes: Option<u64>,
    #[serde(default)]
    pub outcome: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DemandPart {
    pub backend: String,
    #[serde(default)]
    pub faults: u64,
    #[serde(default)]
    pub zero_faults: u64,
    #[serde(default)]
    pub pages_installed: u64,
    #[serde(default)]
    pub data_pages: u64,
    #[serde(default)]
    pub eager_pages: u64,
    #[serde(default)]
    pub fault_us: Option<Percentiles>,
    #[serde(default)]
    pub last_install_ms: Option<f64>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    #[serde(default)]
    pub p90: f64,
    pub p99: f64,
    #[serde(default)]
    pub max: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleError {
    #[error("vmm restore printed no JSON report")]
    NoJson,
    #[error("vmm restore printed a report this benchmark cannot read: {0}")]
    BadJson(String),
    #[error(
        "the restored guest did not finish its workload (exit code {code}, outcome {outcome})"
    )]
    Guest { code: i32, outcome: String },
    #[error("demand paging failed: {0}")]
    Demand(String),
    #[error("{0}")]
    Figures(String),
}

impl RestoreOutput {
    /// The report in `stdout`: the last line that is a JSON object (the console is off, but a
    /// stray line before the report must not break the benchmark).
    pub fn parse(stdout: &str) -> Result<RestoreOutput, SampleError> {
        let line = stdout
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('{'))
            .ok_or(SampleError::NoJson)?;
        serde_json::from_str(line).map_err(|e| SampleError::BadJson(e.to_string()))
    }

    fn check_guest(&self) -> Result<(), SampleError> {
        if self.run.exit_code != 0 {
            return Err(SampleError::Guest {
                code: self.run.exit_code,
                outcome: self.run.outcome.to_string(),
            });
        }
        Ok(())
    }

    /// The eager baseline: `pages` first touched by `vcpus` vCPUs in `touch_ms` (from the pass
    /// log: nothing else in an eager restore says when the first touch was over).
    pub fn eager_sample(
        &self,
        pages: u64,
        vcpus: u32,
        touch_ms: Option<f64>,
    ) -> Result<Sample, SampleError> {
        self.check_guest()?;
        let touch = touch_ms.filter(|t| *t > 0.0).ok_or_else(|| {
            SampleError::Figures(
                "eager restore: no pass times in its log, so no first-touch time".into(),
            )
        })?;
        if pages == 0 || vcpus == 0 {
            return Err(SampleError::Figures("no pages or no vCPUs".into()));
        }
        Ok(Sample {
            pages_per_s_per_vcpu: pages as f64 / (touch / 1000.0) / f64::from(vcpus),
            touch_ms: Some(touch),
            guest_us_per_page: Some(per_page_us(touch, pages, vcpus)),
            fault_p50_us: None,
            fault_p99_us: None,
            faults: None,
        })
    }

    /// A lazy restore: pages installed over resume-to-last-install, per vCPU; the guest's view
    /// (`touch_ms` over the `pages` of the workload) beside it where the log has it.
    pub fn lazy_sample(
        &self,
        pages: u64,
        vcpus: u32,
        touch_ms: Option<f64>,
    ) -> Result<Sample, SampleError> {
        self.check_guest()?;
        let d = self
            .demand
            .as_ref()
            .ok_or_else(|| SampleError::Demand("the report has no demand section".into()))?;
        if let Some(e) = &d.error {
            return Err(SampleError::Demand(e.clone()));
        }
        let ms = d.last_install_ms.unwrap_or(f64::NAN);
        if ms.is_nan() || ms <= 0.0 || d.pages_installed == 0 || vcpus == 0 {
            return Err(SampleError::Figures(format!(
                "{}: {} pages installed, last at {ms} ms: no rate to compute",
                d.backend, d.pages_installed
            )));
        }
        let touch = touch_ms.filter(|t| *t > 0.0 && pages > 0);
        Ok(Sample {
            pages_per_s_per_vcpu: d.pages_installed as f64 / (ms / 1000.0) / f64::from(vcpus),
            touch_ms: touch,
            guest_us_per_page: touch.map(|t| per_page_us(t, pages, vcpus)),
            fault_p50_us: d.fault_us.map(|p| p.p50),
            fault_p99_us: d.fault_us.map(|p| p.p99),
            faults: Some(d.faults),
        })
    }
}

/// `touch_ms` spread over the pages of one vCPU (the vCPUs touch theirs in parallel).
fn per_page_us(touch_ms: f64, pages: u64, vcpus: u32) -> f64 {
    touch_ms * 1000.0 / (pages as f64 / f64::from(vcpus.max(1)))
}

/// The pass log of a restored micro guest (its vmm's stderr at log level info, with
/// `vmm::micro_port=debug` for the per-vCPU lines): when it resumed and when each vCPU
/// completed each pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PassLog {
    /// Seconds since the epoch of the "resuming ..." line.
    pub resume_s: Option<f64>,
    /// Per vCPU (index order), the times of its "vCPU V finished pass N" lines (several vCPUs).
    pub vcpu_passes: Vec<Vec<f64>>,
    /// Times of the "micro guest: pass N done" lines (every vCPU done; the only pass lines a
    /// one-vCPU guest writes).
    pub all_passes: Vec<f64>,
}

impl PassLog {
    /// Reads tracing-subscriber's default format (ANSI colours or not).
    pub fn parse(stderr: &str) -> PassLog {
        let mut log = PassLog::default();
        for raw in stderr.lines() {
            let line = strip_ansi(raw);
            let Some(t) = line.split_whitespace().next().and_then(parse_utc) else {
                continue;
            };
            let Some((_, msg)) = line.split_once(": ") else {
                continue;
            };
            if msg.starts_with("resuming ") && log.resume_s.is_none() {
                log.resume_s = Some(t);
            } else if let Some(rest) = msg.strip_prefix("micro guest: vCPU ") {
                let Some((v, what)) = rest.split_once(' ') else {
                    continue;
                };
                let (Ok(v), true) = (v.parse::<usize>(), what.starts_with("finished pass ")) else {
                    continue;
                };
                if v < 1024 {
                    if log.vcpu_passes.len() <= v {
                        log.vcpu_passes.resize(v + 1, Vec::new());
                    }
                    log.vcpu_passes[v].push(t);
                }
            } else if msg.starts_with("micro guest: pass ") && msg.ends_with(" done") {
                log.all_passes.push(t);
            }
        }
        log
    }

    /// Resume until every vCPU has touched each of its pages once since: the end of its second
    /// pass after the resume (it resumed between or inside its first), or of its last if it
    /// had only one left. With several vCPUs each counts for itself, as they drift apart.
    pub fn touch_ms(&self) -> Option<f64> {
        let resume = self.resume_s?;
        let end_of = |times: &[f64]| times.get(1).or(times.last()).copied();
        let end = if self.vcpu_passes.iter().any(|v| !v.is_empty()) {
            self.vcpu_passes
                .iter()
                .filter_map(|v| end_of(v))
                .fold(f64::NEG_INFINITY, f64::max)
        } else {
            end_of(&self.all_passes)?
        };
        Some((end - resume) * 1000.0)
    }
}

pub(crate) fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// "2026-11-21T18:21:17.643004Z" as seconds since the epoch.
fn parse_utc(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

/// Median of the `Some` values; `None` when there are none.
pub fn median_of(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values
        .into_iter()
        .flatten()
        .filter(|x| x.is_finite())
        .collect();
    (!v.is_empty()).then(|| median(&v))
}

impl Row {
    /// A row from the samples of its runs (failed runs listed in `failures`).
    pub fn from_samples(
        placement: &str,
        handler: &str,
        backend: &str,
        samples: &[Sample],
        failures: Vec<String>,
    ) -> Row {
        Row {
            placement: placement.into(),
            handler: handler.into(),
            backend: backend.into(),
            pages_per_s_per_vcpu: median_of(samples.iter().map(|s| Some(s.pages_per_s_per_vcpu))),
            touch_ms: median_of(samples.iter().map(|s| s.touch_ms)),
            guest_us_per_page: median_of(samples.iter().map(|s| s.guest_us_per_page)),
            vs_eager: None,
            fault_p50_us: median_of(samples.iter().map(|s| s.fault_p50_us)),
            fault_p99_us: median_of(samples.iter().map(|s| s.fault_p99_us)),
            faults: median_of(samples.iter().map(|s| s.faults.map(|f| f as f64))),
            samples: samples.iter().map(|s| s.pages_per_s_per_vcpu).collect(),
            failures,
        }
    }
}

impl CaseResult {
    /// Fills each row's `vs_eager` from the eager row of the same placement.
    pub fn fill_ratios(&mut self) {
        let eager: Vec<(String, Option<f64>)> = self
            .rows
            .iter()
            .filter(|r| r.backend == EAGER)
            .map(|r| (r.placement.clone(), r.guest_us_per_page))
            .collect();
        for row in &mut self.rows {
            let base = eager
                .iter()
                .find(|(p, _)| *p == row.placement)
                .and_then(|(_, us)| *us);
            row.vs_eager = match (row.guest_us_per_page, base) {
                (Some(us), Some(b)) if b > 0.0 => Some(us / b),
                _ => None,
            };
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What `vmm restore --lazy --json` printed on this host (trimmed RunReport).
    pub(crate) const LAZY: &str = r#"{"run":{"host":"pvm","outcome":{"micro_exit":{"status":0}},"exit_code":0,"vcpus":2,"mem_mib":128,"setup_ms":3.1,"boot_timer_ms":null,"agent_ready_ms":null,"micro_passes":40,"micro_check":null,"rss_beyond_guest_kib":9000,"wall_ms":300.0,"tracking":null,"migration":null},"restore_ms":12.5,"run_ms":250.0,"demand":{"backend":"uffd-missing","faults":4100,"zero_faults":3,"pages_installed":4100,"data_pages":4200,"eager_pages":0,"fault_us":{"p50":40.0,"p90":60.0,"p99":120.0,"max":900.0},"exits":null,"filled_ms":null,"last_install_ms":205.0,"error":null}}"#;

    #[test]
    fn parses_the_lazy_report_and_computes_the_rate() {
        let out = RestoreOutput::parse(&format!("noise\n{LAZY}\n")).unwrap();
        assert_eq!(out.run.exit_code, 0);
        assert_eq!(out.run.micro_passes, Some(40));
        let d = out.demand.as_ref().unwrap();
        assert_eq!(d.backend, "uffd-missing");
        assert_eq!(d.fault_us.unwrap().p99, 120.0);
        let s = out.lazy_sample(4096, 2, Some(204.8)).unwrap();
        // 4100 pages in 205 ms on 2 vCPUs.
        assert!((s.pages_per_s_per_vcpu - 10_000.0).abs() < 1e-6);
        // 2048 pages per vCPU in 204.8 ms.
        assert!((s.guest_us_per_page.unwrap() - 100.0).abs() < 1e-9);
        assert_eq!(s.fault_p50_us, Some(40.0));
        assert_eq!(s.faults, Some(4100));
        assert_eq!(
            out.lazy_sample(4096, 2, None).unwrap().guest_us_per_page,
            None
        );
    }

    #[test]
    fn eager_rate_comes_from_the_touch_time() {
        let out = RestoreOutput::parse(
            r#"{"run":{"exit_code":0,"outcome":"x"},"restore_ms":5.0,"run_ms":30.0,"demand":null}"#,
        )
        .unwrap();
        assert!(out.demand.is_none());
        // 20 ms for 4000 pages on 2 vCPUs: 100,000 pages/s/vCPU, 10 us per page.
        let s = out.eager_sample(4000, 2, Some(20.0)).unwrap();
        assert!((s.pages_per_s_per_vcpu - 100_000.0).abs() < 1e-6);
        assert!((s.guest_us_per_page.unwrap() - 10.0).abs() < 1e-9);
        assert!(out.eager_sample(4000, 2, None).is_err());
    }

    #[test]
    fn pass_log_gives_the_touch_time() {
        let log = "\x1b[2m2026-11-21T18:21:17.642924Z\x1b[0m \x1b[32m INFO\x1b[0m \x1b[2mvmm::snapshot::restore\x1b[0m\x1b[2m:\x1b[0m restored 524 data pages in 3.3 ms
\x1b[2m2026-11-21T18:21:17.643004Z\x1b[0m \x1b[32m INFO\x1b[0m \x1b[2mvmm::machine::run\x1b[0m\x1b[2m:\x1b[0m resuming micro guest on PVM (software nested virtualization): 1 vCPU(s), 128 MiB
2026-11-21T18:21:17.722027Z  INFO vmm::micro_port: micro guest: pass 11 done
2026-11-21T18:21:17.723004Z  INFO vmm::micro_port: micro guest: pass 12 done
2026-11-21T18:21:17.724004Z  INFO vmm::micro_port: micro guest: pass 13 done
2026-11-21T18:21:17.723100Z  WARN vmm::x: something else
not a log line
";
        let p = PassLog::parse(log);
        assert_eq!(p.all_passes.len(), 3);
        // One vCPU: the second pass after the resume ends 80 ms after it.
        assert!(
            (p.touch_ms().unwrap() - 80.0).abs() < 1e-3,
            "{:?}",
            p.touch_ms()
        );
        assert_eq!(PassLog::parse("").touch_ms(), None);

        // Two vCPUs drifting apart: vCPU 1 is done with its second pass at +50 ms, vCPU 0 at
        // +120 ms; vCPU 2 had a single pass left (+30 ms). The "all done" lines do not count.
        let log = "2026-11-21T00:00:00.000000Z  INFO vmm::machine::run: resuming micro guest on PVM: 3 vCPU(s), 128 MiB
2026-11-21T00:00:00.010000Z DEBUG vmm::micro_port: micro guest: vCPU 1 finished pass 8
2026-11-21T00:00:00.030000Z DEBUG vmm::micro_port: micro guest: vCPU 2 finished pass 9
2026-11-21T00:00:00.050000Z DEBUG vmm::micro_port: micro guest: vCPU 1 finished pass 9
2026-11-21T00:00:00.060000Z DEBUG vmm::micro_port: micro guest: vCPU 1 finished pass 10
2026-11-21T00:00:00.070000Z  INFO vmm::micro_port: micro guest: vCPU 2 finished with status 0
2026-11-21T00:00:00.100000Z DEBUG vmm::micro_port: micro guest: vCPU 0 finished pass 8
2026-11-21T00:00:00.120000Z DEBUG vmm::micro_port: micro guest: vCPU 0 finished pass 9
2026-11-21T00:00:00.121000Z  INFO vmm::micro_port: micro guest: pass 9 done
";
        let p = PassLog::parse(log);
        assert_eq!(
            p.vcpu_passes.iter().map(Vec::len).collect::<Vec<_>>(),
            [2, 3, 1]
        );
        assert!(
            (p.touch_ms().unwrap() - 120.0).abs() < 1e-3,
            "{:?}",
            p.touch_ms()
        );
        assert_eq!(
            PassLog {
                resume_s: None,
                ..p
            }
            .touch_ms(),
            None
        );
    }

    #[test]
    fn utc_timestamps_parse_across_days() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(parse_utc("1970-01-02T00:00:01.5Z"), Some(86_401.5));
        // 2000-03-01 (after a leap day) is day 11017.
        assert_eq!(parse_utc("2000-03-01T00:00:00Z"), Some(11_017.0 * 86_400.0));
        assert_eq!(parse_utc("2026-11-21 18:21"), None);
        assert_eq!(parse_utc("INFO"), None);
    }

    #[test]
    fn failures_are_reported_not_measured() {
        assert_eq!(
            RestoreOutput::parse("no json here"),
            Err(SampleError::NoJson)
        );
        assert!(matches!(
            RestoreOutput::parse("{not json"),
            Err(SampleError::BadJson(_))
        ));
        let failed = LAZY.replace(r#""error":null"#, r#""error":"page server gone""#);
        let out = RestoreOutput::parse(&failed).unwrap();
        assert_eq!(
            out.lazy_sample(4096, 2, None),
            Err(SampleError::Demand("page server gone".into()))
        );
        let bad_guest = LAZY.replace(r#""exit_code":0"#, r#""exit_code":5"#);
        let out = RestoreOutput::parse(&bad_guest).unwrap();
        assert!(matches!(
            out.lazy_sample(4096, 2, None),
            Err(SampleError::Guest { code: 5, .. })
        ));
    }

    #[test]
    fn medians_skip_missing_values() {
        assert_eq!(
            median_of([Some(3.0), None, Some(1.0), Some(2.0)]),
            Some(2.0)
        );
        assert_eq!(median_of([Some(1.0), Some(4.0)]), Some(2.5));
        assert_eq!(median_of([None, Some(f64::NAN)]), None);
        assert_eq!(median_of(std::iter::empty()), None);
    }

    fn sample(rate: f64, us: f64, p50: Option<f64>) -> Sample {
        Sample {
            pages_per_s_per_vcpu: rate,
            touch_ms: Some(us),
            guest_us_per_page: Some(us),
            fault_p50_us: p50,
            fault_p99_us: p50.map(|p| p * 3.0),
            faults: p50.map(|_| 100),
        }
    }

    #[test]
    fn rows_take_medians_and_ratios_follow_the_placement() {
        let eager =
            |p: &str, us| Row::from_samples(p, "-", EAGER, &[sample(1.0, us, None)], vec![]);
        let lazy = Row::from_samples(
            "pinned",
            "in-process",
            "uffd-missing",
            &[
                sample(10_000.0, 60.0, Some(40.0)),
                sample(30_000.0, 40.0, Some(20.0)),
                sample(20_000.0, 50.0, Some(30.0)),
            ],
            vec!["run 4: boom".into()],
        );
        assert_eq!(lazy.pages_per_s_per_vcpu, Some(20_000.0));
        assert_eq!(lazy.guest_us_per_page, Some(50.0));
        assert_eq!(lazy.fault_p50_us, Some(30.0));
        assert_eq!(lazy.fault_p99_us, Some(90.0));
        assert_eq!(lazy.faults, Some(100.0));
        let mut case = CaseResult {
            label: "1 vCPU".into(),
            vcpus: 1,
            shared_pages: 0,
            pages: 1024,
            warm_pass_ms: 0.1,
            remaining_passes: vec![10],
            rows: vec![eager("pinned", 10.0), eager("free", 25.0), lazy],
            failures: vec![],
        };
        case.fill_ratios();
        assert_eq!(case.rows[0].vs_eager, Some(1.0));
        assert_eq!(case.rows[1].vs_eager, Some(1.0));
        assert!((case.rows[2].vs_eager.unwrap() - 5.0).abs() < 1e-9);
        let none = Row::from_samples("free", "in-process", "memslot-exits", &[], vec!["x".into()]);
        assert_eq!(none.pages_per_s_per_vcpu, None);
        assert_eq!(none.guest_us_per_page, None);
    }

    #[test]
    fn upstream_reference_is_only_for_its_backends() {
        assert_eq!(upstream_us_per_page("uffd-missing"), Some(11.5));
        assert_eq!(upstream_us_per_page("memslot-exits"), None);
    }
}
