//! The runner of `vmm bench demand`: boots, snapshots and restores the micro guest by running
//! this very binary (`vmm run`, the control API, `vmm restore`, `vmm page-server`) as
//! subprocesses, and reduces what the restores print to a [`DemandBenchReport`].
//!
//! How a case is measured:
//! 1. Calibration, once per placement: a micro guest with a practically endless sweep is
//!    polled through its API socket until its first pass is done, then for a while longer, to
//!    learn how long one pass over memory that is already present takes (a "warm" pass).
//! 2. Per run, a source guest sweeps its regions just long enough to be caught after its first
//!    pass: it is snapshotted with `exit` as soon as the API reports that pass, so every page
//!    of every region holds data and the restored guest has a known number of passes left.
//! 3. That snapshot is restored eagerly (the baseline: memory is all there, the guest only pays
//!    the hypervisor's first-touch faults; the warm passes that follow are subtracted with the
//!    calibrated time) and lazily with every backend, pinned to CPU 0 or free, with the
//!    handler in the vmm or in a page server. Each lazy restore prints its demand report:
//!    pages installed, resume to last install, fault latency percentiles.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use super::model::{
    CaseResult, DemandBenchReport, PassLog, Refused, RestoreOutput, Row, Sample, EAGER,
};
use vmm::api::client::Client;
use vmm::api::{Request, SnapshotParams};
use vmm::host::HostKind;

/// Where the restoring process's threads may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// `taskset -c 0`: the vCPU threads, the fault handler and any page server share CPU 0.
    Pinned,
    /// No affinity: the scheduler spreads the threads over every CPU.
    Free,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Placement::Pinned => "pinned",
            Placement::Free => "free",
        }
    }
}

impl std::str::FromStr for Placement {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pinned" => Ok(Placement::Pinned),
            "free" => Ok(Placement::Free),
            _ => Err(format!("unknown placement {s:?} (pinned, free)")),
        }
    }
}

/// Where the fault handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    InProcess,
    /// `vmm page-server` over a Unix socket (`vmm restore --page-server`).
    PageServer,
}

impl Handler {
    pub fn name(self) -> &'static str {
        match self {
            Handler::InProcess => "in-process",
            Handler::PageServer => "page-server",
        }
    }
}

impl std::str::FromStr for Handler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "in-process" => Ok(Handler::InProcess),
            "page-server" | "out-of-process" => Ok(Handler::PageServer),
            _ => Err(format!("unknown handler {s:?} (in-process, page-server)")),
        }
    }
}

/// One guest shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    pub vcpus: u32,
    /// Pages of a region every vCPU also writes; 0: private regions only.
    pub shared_pages: u64,
}

impl Case {
    pub fn label(&self) -> String {
        let cpus = if self.vcpus == 1 {
            "1 vCPU".to_owned()
        } else {
            format!("{} vCPUs", self.vcpus)
        };
        if self.shared_pages > 0 {
            format!("{cpus} + shared")
        } else {
            cpus
        }
    }

    fn pages(&self, region_mib: u64) -> u64 {
        u64::from(self.vcpus) * region_mib * 256 + self.shared_pages
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct DemandBench {
    /// The vmm binary to drive (normally `std::env::current_exe()`).
    pub exe: PathBuf,
    pub runs: u32,
    /// Each vCPU's private region, MiB.
    pub region_mib: u64,
    pub cases: Vec<Case>,
    /// Demand-paging backends (`vmm restore --demand` names).
    pub backends: Vec<String>,
    pub placements: Vec<Placement>,
    pub handlers: Vec<Handler>,
    /// `--demand-chunk`.
    pub chunk: String,
    /// Warm passes the source guest gets after its first, in ms of its calibrated pass time:
    /// the window in which the snapshot must land.
    pub margin_ms: f64,
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemandBenchError {
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Guest(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemandBenchError {
    let what = what.into();
    move |source| DemandBenchError::Io { what, source }
}

const RESTORE_TIMEOUT: Duration = Duration::from_secs(180);
const SOURCE_TIMEOUT: Duration = Duration::from_secs(120);
/// Passes of the calibration guest: more than it can run before it is stopped.
const ENDLESS_PASSES: u64 = 1 << 22;
/// Calibration watches at least this many warm passes, for at least this long.
const CALIBRATION_PASSES: u64 = 5;
const CALIBRATION_MS: f64 = 60.0;

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        // VMM_BENCH_DEMAND_KEEP=1 keeps every subprocess's output for a post-mortem.
        if std::env::var_os("VMM_BENCH_DEMAND_KEEP").is_some() {
            eprintln!("vmm bench demand: kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Does this vmm have an out-of-process page server? Read from its own help text, so the
/// benchmark follows the binary it drives.
pub fn page_server_available(exe: &Path) -> Result<(), String> {
    let help = Command::new(exe)
        .args(["restore", "--help"])
        .output()
        .map_err(|e| format!("cannot run {} restore --help: {e}", exe.display()))?;
    if !String::from_utf8_lossy(&help.stdout).contains("--page-server") {
        return Err("`vmm restore` has no --page-server option in this build".into());
    }
    let ps = Command::new(exe)
        .args(["page-server", "--help"])
        .output()
        .map_err(|e| format!("cannot run {} page-server --help: {e}", exe.display()))?;
    if !ps.status.success() {
        return Err("this build has no `vmm page-server` command".into());
    }
    Ok(())
}

/// A finished subprocess: exit status and its output, read back from files.
struct Finished {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
    timed_out: bool,
}

impl Finished {
    /// The most telling line of stderr, for a failure message.
    fn reason(&self) -> String {
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let lines: Vec<String> = lines.iter().map(|l| super::model::strip_ansi(l)).collect();
        let pick = lines
            .iter()
            .map(String::as_str)
            .rev()
            .find(|l| l.contains("rror") || l.contains("refus") || l.contains("failed"))
            .or(lines.last().map(String::as_str))
            .unwrap_or("");
        let status = match (self.timed_out, self.status) {
            (true, _) => "timed out".to_owned(),
            (false, Some(s)) => s.to_string(),
            (false, None) => "no exit status".to_owned(),
        };
        if pick.is_empty() {
            status
        } else {
            format!("{pick} ({status})")
        }
    }
}

struct Logs {
    out: PathBuf,
    err: PathBuf,
}

impl Logs {
    fn new(dir: &Path, name: &str) -> Logs {
        Logs {
            out: dir.join(format!("{name}.out")),
            err: dir.join(format!("{name}.err")),
        }
    }

    fn attach(&self, cmd: &mut Command) -> Result<(), DemandBenchError> {
        let out = File::create(&self.out).map_err(io(self.out.display().to_string()))?;
        let err = File::create(&self.err).map_err(io(self.err.display().to_string()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        Ok(())
    }

    fn read(&self, status: Option<ExitStatus>, timed_out: bool) -> Finished {
        Finished {
            status,
            stdout: std::fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.err).unwrap_or_default(),
            timed_out,
        }
    }
}

/// Waits for `child` at most `limit`, killing it after that.
fn wait_within(child: &mut Child, limit: Duration) -> (Option<ExitStatus>, bool) {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return (Some(s), false),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                return (child.wait().ok(), true);
            }
        }
    }
}

fn stop(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

struct Runner<'a> {
    b: &'a DemandBench,
    dir: PathBuf,
    bar: ProgressBar,
    seq: u64,
}

/// A snapshot ready to restore.
struct Snap {
    dir: PathBuf,
    /// Passes the restored guest has left (the first may be a partial one).
    remaining: u64,
}

/// Calibrated figures of one placement.
#[derive(Debug, Clone, Copy)]
struct Calibration {
    warm_pass_ms: f64,
}

impl Runner<'_> {
    fn next_name(&mut self, what: &str) -> String {
        self.seq += 1;
        format!("{:04}-{what}", self.seq)
    }

    fn command(&self, placement: Placement) -> Command {
        match placement {
            Placement::Pinned => {
                let mut c = Command::new("taskset");
                c.args(["-c", "0"]).arg(&self.b.exe);
                c
            }
            Placement::Free => Command::new(&self.b.exe),
        }
    }

    /// Starts a micro guest with `passes` sweep passes and an API socket.
    fn boot(
        &mut self,
        case: Case,
        passes: u64,
        placement: Placement,
    ) -> Result<(Child, PathBuf, Logs), DemandBenchError> {
        let name = self.next_name("source");
        let socket = self.dir.join(format!("{name}.sock"));
        let logs = Logs::new(&self.dir, &name);
        let region_total =
            u64::from(case.vcpus) * self.b.region_mib + case.shared_pages.div_ceil(256);
        // The region starts at 4 MiB; page tables, stacks and the shared region follow.
        let mem = (region_total + 16).max(128);
        let mut cmd = self.command(placement);
        cmd.args(["run", "--micro", "--pattern", "sweep"])
            .args(["--region-mib", &self.b.region_mib.to_string()])
            .args(["--passes", &passes.to_string()])
            .args(["--vcpus", &case.vcpus.to_string()])
            .args(["--mem", &mem.to_string()])
            .args(["--console", "none", "--no-console-input", "--json"])
            .arg("--api-socket")
            .arg(&socket);
        if case.shared_pages > 0 {
            cmd.args(["--shared-pages", &case.shared_pages.to_string()]);
        }
        logs.attach(&mut cmd)?;
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {}", self.b.exe.display())))?;
        Ok((child, socket, logs))
    }

    /// Connects to a guest's API socket once it exists.
    fn connect(child: &mut Child, socket: &Path, logs: &Logs) -> Result<Client, DemandBenchError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(c) = Client::connect(socket) {
                return Ok(c);
            }
            if let Ok(Some(s)) = child.try_wait() {
                return Err(DemandBenchError::Guest(format!(
                    "the micro guest ended before its API socket came up: {}",
                    logs.read(Some(s), false).reason()
                )));
            }
            if Instant::now() > deadline {
                stop(child);
                return Err(DemandBenchError::Guest(
                    "the micro guest's API socket did not come up in 30 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn passes(client: &mut Client) -> Result<u64, String> {
        let v = client.call(&Request::Status).map_err(|e| e.to_string())?;
        v["micro_passes"]
            .as_u64()
            .ok_or_else(|| format!("status without micro_passes: {v}"))
    }

    /// Waits (polling every `poll`) until every vCPU completed `at_least` passes.
    fn wait_passes(
        client: &mut Client,
        at_least: u64,
        poll: Duration,
        limit: Duration,
    ) -> Result<(u64, Instant), String> {
        let deadline = Instant::now() + limit;
        loop {
            let p = Self::passes(client)?;
            if p >= at_least {
                return Ok((p, Instant::now()));
            }
            if Instant::now() > deadline {
                return Err(format!("still at pass {p} after {limit:?}"));
            }
            std::thread::sleep(poll);
        }
    }

    /// Time of one pass over memory that is present, with the guest placed as `placement`.
    fn calibrate(
        &mut self,
        case: Case,
        placement: Placement,
    ) -> Result<Calibration, DemandBenchError> {
        let (mut child, socket, logs) = self.boot(case, ENDLESS_PASSES, placement)?;
        let result = (|| {
            let mut client = Self::connect(&mut child, &socket, &logs)?;
            let guest = |e: String| DemandBenchError::Guest(format!("calibration: {e}"));
            let (p0, t0) =
                Self::wait_passes(&mut client, 1, Duration::from_micros(500), SOURCE_TIMEOUT)
                    .map_err(guest)?;
            let min = Duration::from_secs_f64(CALIBRATION_MS / 1000.0);
            std::thread::sleep(min);
            let (p1, t1) = Self::wait_passes(
                &mut client,
                p0 + CALIBRATION_PASSES,
                Duration::from_millis(1),
                Duration::from_secs(30),
            )
            .map_err(guest)?;
            Ok(Calibration {
                warm_pass_ms: (t1 - t0).as_secs_f64() * 1000.0 / (p1 - p0) as f64,
            })
        })();
        stop(&mut child);
        result
    }

    /// Boots a source guest with enough warm passes for the snapshot to land after its first
    /// pass, snapshots it with `exit`; retries with a wider window if the guest was too quick.
    fn snapshot(&mut self, case: Case, cal: Calibration) -> Result<Snap, DemandBenchError> {
        let mut margin = self.b.margin_ms;
        let mut last = String::new();
        // vCPUs drift apart on a busy host: the fastest may finish every pass before the
        // slowest completes its first, so each retry gives them more passes.
        for _attempt in 0..6 {
            let passes = 1 + (margin / cal.warm_pass_ms.max(1e-3)).ceil().max(2.0) as u64;
            let passes = passes.min(ENDLESS_PASSES);
            let (mut child, socket, logs) = self.boot(case, passes, Placement::Free)?;
            let name = self.next_name("snapshot");
            let dir = self.dir.join(name);
            let taken = (|| -> Result<u64, String> {
                let mut client =
                    Self::connect(&mut child, &socket, &logs).map_err(|e| e.to_string())?;
                Self::wait_passes(&mut client, 1, Duration::from_micros(300), SOURCE_TIMEOUT)?;
                let reply = client
                    .call(&Request::Snapshot(SnapshotParams {
                        to: dir.clone(),
                        exit: true,
                    }))
                    .map_err(|e| e.to_string())?;
                if reply["ok"] != serde_json::Value::Bool(true) {
                    return Err(format!("snapshot refused: {}", reply["error"]));
                }
                reply["snapshot"]["micro_passes"]
                    .as_u64()
                    .ok_or_else(|| format!("snapshot reply without micro_passes: {reply}"))
            })();
            let (status, timed_out) = wait_within(&mut child, Duration::from_secs(30));
            match taken {
                Ok(at) if at + 2 <= passes => {
                    return Ok(Snap {
                        dir,
                        remaining: passes - at,
                    })
                }
                Ok(at) => {
                    last = format!("snapshot at pass {at} of {passes}: nothing left to restore")
                }
                Err(e) => last = format!("{e}; source: {}", logs.read(status, timed_out).reason()),
            }
            let _ = std::fs::remove_dir_all(&dir);
            margin *= 4.0;
        }
        Err(DemandBenchError::Guest(format!(
            "could not snapshot the source guest after its first pass: {last}"
        )))
    }

    /// `vmm restore` of `snap`: eager when `backend` is None.
    fn restore(
        &mut self,
        snap: &Snap,
        backend: Option<&str>,
        placement: Placement,
        handler: Handler,
    ) -> Result<Finished, DemandBenchError> {
        let name = self.next_name(backend.unwrap_or(EAGER));
        let mut server = None;
        let mut cmd = self.command(placement);
        cmd.arg("restore").arg(&snap.dir);
        if let Some(b) = backend {
            cmd.args(["--lazy", "--demand", b, "--demand-chunk", &self.b.chunk]);
            if handler == Handler::PageServer {
                let socket = self.dir.join(format!("{name}.pages.sock"));
                let logs = Logs::new(&self.dir, &format!("{name}.server"));
                let mut s = self.command(placement);
                s.arg("page-server")
                    .arg("--snapshot")
                    .arg(&snap.dir)
                    .arg("--socket")
                    .arg(&socket);
                logs.attach(&mut s)?;
                let mut child = s.spawn().map_err(io("starting vmm page-server"))?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while !socket.exists() {
                    if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
                        stop(&mut child);
                        return Ok(logs.read(None, false));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                cmd.arg("--page-server").arg(&socket);
                server = Some(child);
            }
        }
        cmd.args(["--console", "none", "--no-console-input", "--json"]);
        // The pass log ("micro guest: pass N done" at info, per vCPU at debug) times the first
        // touch.
        cmd.env("RUST_LOG", "info,vmm::micro_port=debug");
        let logs = Logs::new(&self.dir, &name);
        logs.attach(&mut cmd)?;
        let mut child = cmd.spawn().map_err(io("starting vmm restore"))?;
        let (status, timed_out) = wait_within(&mut child, RESTORE_TIMEOUT);
        if let Some(mut s) = server {
            let _ = wait_within(&mut s, Duration::from_secs(2));
            stop(&mut s);
        }
        Ok(logs.read(status, timed_out))
    }

    fn tick(&self, msg: String) {
        self.bar.set_message(msg);
        self.bar.inc(1);
    }
}

/// Per (placement, handler, backend): the samples of every run and the failures.
struct Cells {
    keys: Vec<(Placement, Option<Handler>, String)>,
    samples: Vec<Vec<Sample>>,
    failures: Vec<Vec<String>>,
}

impl Cells {
    fn slot(&mut self, p: Placement, h: Option<Handler>, b: &str) -> usize {
        if let Some(i) = self
            .keys
            .iter()
            .position(|(kp, kh, kb)| *kp == p && *kh == h && kb == b)
        {
            return i;
        }
        self.keys.push((p, h, b.to_owned()));
        self.samples.push(Vec::new());
        self.failures.push(Vec::new());
        self.keys.len() - 1
    }
}

fn host_detail() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("Linux {}, {cpus} CPUs", release.trim())
}

/// Runs the whole matrix.
pub fn run(b: &DemandBench) -> Result<DemandBenchReport, DemandBenchError> {
    if b.runs == 0 || b.cases.is_empty() || b.placements.is_empty() || b.handlers.is_empty() {
        return Err(DemandBenchError::Usage(
            "nothing to run: runs, vCPU counts, placements and handlers must not be empty".into(),
        ));
    }
    let mut skipped = Vec::new();
    let mut handlers = b.handlers.clone();
    if handlers.contains(&Handler::PageServer) {
        if let Err(why) = page_server_available(&b.exe) {
            skipped.push(format!("out-of-process handler (page-server): {why}"));
            handlers.retain(|h| *h != Handler::PageServer);
        }
    }
    if b.placements.contains(&Placement::Pinned)
        && Command::new("taskset").arg("-V").output().is_err()
    {
        return Err(DemandBenchError::Usage(
            "the pinned placement needs taskset (util-linux)".into(),
        ));
    }
    let dir = std::env::temp_dir().join(format!("vmm-bench-demand-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io(dir.display().to_string()))?;
    let _scratch = Scratch(dir.clone());

    let per_run =
        1 + b.placements.len() as u64 * (1 + handlers.len() as u64 * b.backends.len() as u64);
    let total = b.cases.len() as u64 * (1 + u64::from(b.runs) * per_run);
    let mut r = Runner {
        b,
        dir,
        bar: crate::progress::bar(total, b.progress, "steps"),
        seq: 0,
    };
    let host = HostKind::detect();
    if b.progress {
        r.bar.println(format!(
            "vmm bench demand: host {host}{}",
            if host == HostKind::Pvm {
                ": PVM timings, not hardware timings"
            } else {
                ""
            }
        ));
    }

    let mut refused: Vec<Refused> = Vec::new();
    let mut cases = Vec::new();
    for &case in &b.cases {
        let label = case.label();
        r.bar
            .set_message(format!("{label}: timing the guest's passes"));
        let free_cal = r.calibrate(case, Placement::Free)?;
        r.bar.inc(1);
        let mut cells = Cells {
            keys: Vec::new(),
            samples: Vec::new(),
            failures: Vec::new(),
        };
        let mut remaining = Vec::new();
        let mut run_failures = Vec::new();
        for run in 1..=b.runs {
            r.bar
                .set_message(format!("{label}, run {run}: source guest"));
            let snap = match r.snapshot(case, free_cal) {
                Ok(s) => s,
                Err(e) => {
                    run_failures.push(format!("run {run}: {e}"));
                    r.bar.inc(per_run);
                    continue;
                }
            };
            r.tick(format!("{label}, run {run}: snapshot taken"));
            remaining.push(snap.remaining);
            let pages = case.pages(b.region_mib);
            for &p in &b.placements {
                let fin = r.restore(&snap, None, p, Handler::InProcess)?;
                let touch = PassLog::parse(&fin.stderr).touch_ms();
                let i = cells.slot(p, None, EAGER);
                match RestoreOutput::parse(&fin.stdout)
                    .and_then(|o| o.eager_sample(pages, case.vcpus, touch))
                {
                    Ok(s) => cells.samples[i].push(s),
                    Err(e) => cells.failures[i].push(format!("run {run}: {e}; {}", fin.reason())),
                }
                r.tick(format!("{label}, run {run}: eager, {}", p.name()));
                for &h in &handlers {
                    for be in &b.backends {
                        let i = cells.slot(p, Some(h), be);
                        if refused.iter().any(|x| &x.backend == be) {
                            r.tick(format!("{label}: {be} refused"));
                            continue;
                        }
                        let fin = r.restore(&snap, Some(be), p, h)?;
                        let touch = PassLog::parse(&fin.stderr).touch_ms();
                        match RestoreOutput::parse(&fin.stdout)
                            .and_then(|o| o.lazy_sample(pages, case.vcpus, touch))
                        {
                            Ok(s) => cells.samples[i].push(s),
                            Err(e) => {
                                let reason = fin.reason();
                                // kvm-userfault is refused by kernels without the series: say
                                // what the kernel answered, once, instead of a failed row.
                                if be == "kvm-userfault" && cells.samples[i].is_empty() {
                                    refused.push(Refused {
                                        backend: be.clone(),
                                        reason: refusal_text(&e.to_string(), &reason),
                                    });
                                } else {
                                    cells.failures[i].push(format!("run {run}: {e}; {reason}"));
                                }
                            }
                        }
                        r.tick(format!(
                            "{label}, run {run}: {be}, {}, {}",
                            p.name(),
                            h.name()
                        ));
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&snap.dir);
        }
        let rows = cells
            .keys
            .iter()
            .enumerate()
            .filter(|(_, (_, _, be))| !refused.iter().any(|x| &x.backend == be))
            .map(|(i, (p, h, be))| {
                Row::from_samples(
                    p.name(),
                    h.map_or("-", Handler::name),
                    be,
                    &cells.samples[i],
                    cells.failures[i].clone(),
                )
            })
            .collect();
        let mut c = CaseResult {
            label,
            vcpus: case.vcpus,
            shared_pages: case.shared_pages,
            pages: case.pages(b.region_mib),
            warm_pass_ms: free_cal.warm_pass_ms,
            remaining_passes: remaining,
            rows,
            failures: run_failures,
        };
        c.fill_ratios();
        cases.push(c);
    }
    r.bar.finish_and_clear();

    let mut notes = vec![
        format!(
            "micro guest, sweep workload at CPL3, {} MiB private region per vCPU (+ a shared region where the case says so); snapshot taken after the first pass, so every region page holds data",
            b.region_mib
        ),
        "placement: pinned = the restoring vmm (vCPU threads, fault-handler threads) and any page server started under `taskset -c 0`, all on CPU 0; free = no affinity, spread over every CPU by the scheduler. The source guest always runs free".into(),
        "pages/s/vCPU: lazy = pages installed / (resume -> last page installed) / vCPUs; eager = region pages / touch ms / vCPUs".into(),
        "touch ms = resume -> every vCPU has touched each of its pages once (end of the second pass after the snapshot, from the restored vmm's pass log); guest us/page = touch ms per page of one vCPU: what each page cost the guest, paging-in and the hypervisor's own first-touch fault together".into(),
        "eager = the same snapshot restored with all memory copied in before resuming: no demand faults, only the hypervisor's first-touch faults (upstream's no-fault figure pays those too); x eager = guest us/page over eager's, same case and placement".into(),
        "fault p50/p99 = fault seen -> page installed, as the vmm measures it (each restore's percentile, median over runs); faults = median count per restore".into(),
    ];
    if host == HostKind::Pvm {
        notes.push("host is PVM (/sys/module/kvm_pvm exists): software nested virtualization with shadow paging; these are PVM timings, NOT hardware timings".into());
    }
    Ok(DemandBenchReport {
        tool: "vmm bench demand".into(),
        host: match host {
            HostKind::Pvm => "PVM".into(),
            HostKind::Hardware => "hardware".into(),
        },
        host_detail: host_detail(),
        runs: b.runs,
        region_mib: b.region_mib,
        chunk: b.chunk.clone(),
        cases,
        refused,
        skipped,
        notes,
    })
}

/// The kernel's answer in a refusal, without the surrounding wrapping.
fn refusal_text(error: &str, stderr_reason: &str) -> String {
    if stderr_reason.is_empty() || error.contains(stderr_reason) {
        error.to_owned()
    } else {
        stderr_reason.to_owned()
    }
}

#[cfg(test)]
mod tests;
