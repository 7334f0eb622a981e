//! Dirty tracking while a guest runs: one backend (or none, for an untracked baseline), harvest
//! rounds with their cost, and, for the micro guest, each round checked against the reference
//! model. Rounds are taken at the micro guest's pass port (in the vCPU thread, while the guest
//! waits: an exact sync point) or periodically by a harvester thread (Linux guests).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use micro_guest::{PageBitmap, Workload};
use serde::Serialize;

use super::content_truth::TruthCounts;
use super::device_truth::{Coverage, DeviceMemory, DeviceTruth, Marker};
use crate::tracking::{
    self, thread_cpu_ns, DirtySet, DirtyTracker, TrackContext, TrackerKind, TrackingError,
};

/// What to track during a run.
#[derive(Debug, Clone)]
pub struct TrackingOptions {
    /// `None`: no tracking, but rounds are still timed (the baseline a benchmark compares with).
    pub backend: Option<TrackerKind>,
    /// Harvest period where the guest gives no sync point (Linux guests).
    pub interval: Duration,
    /// Alternate rounds between the VMM's harvest path and the bare kernel calls
    /// (`DirtyTracker::harvest_raw`), so both are measured on the same run.
    pub raw_every_other: bool,
    /// In-situ comparison on a Linux guest: each time the agent starts a workload, tracking
    /// switches to the next entry (`None`: untracked) on the same running guest. Empty: the
    /// one `backend` for the whole run.
    pub schedule: Vec<Option<TrackerKind>>,
    /// The in-situ scenario with a passed-through device (`device_truth`): each schedule entry
    /// is a phase the agent marks with `echo,devtrack:start:LABEL` .. `echo,devtrack:done`,
    /// every round (vCPUs parked) compares guest RAM and device memory with their content at
    /// the previous round and counts what the backend missed or reported in excess.
    pub content_truth: bool,
}

impl TrackingOptions {
    pub fn backend(kind: TrackerKind) -> Self {
        TrackingOptions {
            backend: Some(kind),
            interval: Duration::from_millis(100),
            raw_every_other: false,
            schedule: Vec::new(),
            content_truth: false,
        }
    }

    /// Whether any backend of the run needs the dirty ring (chosen at VM creation).
    pub fn needs_dirty_ring(&self) -> bool {
        self.backend
            .iter()
            .chain(self.schedule.iter().flatten())
            .any(|k| k.needs_dirty_ring())
    }
}

/// One harvest.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// Index into the report's phases (0 without a schedule).
    pub phase: usize,
    pub backend: Option<TrackerKind>,
    /// The micro guest pass this round closes.
    pub pass: Option<u64>,
    /// Time since the process started, at the harvest.
    pub at_ms: f64,
    /// How long the guest ran since the previous round ended (excludes harvest and checking).
    pub guest_ms: f64,
    pub dirty_pages: u64,
    pub harvest_us: f64,
    pub harvest_cpu_us: f64,
    /// True for a bare-kernel-call round (see `raw_every_other`).
    pub raw: bool,
    /// Pages the model says the pass wrote (micro guest only).
    pub expected: Option<u64>,
    /// Pages of the workload region the model wrote but the harvest lacked.
    pub misses: Option<u64>,
    /// Pages of the region the harvest reported but the model never wrote in this pass.
    pub false_positives: Option<u64>,
    /// The first missed page's GPA, to start debugging from.
    pub first_miss_gpa: Option<u64>,
    /// With content truth: this round's pages by memory and writer (whether in a phase or not).
    pub truth: Option<TruthCounts>,
    /// With content truth: whether every vCPU was parked for the round.
    pub paused: Option<bool>,
    /// With content truth: how long comparing the content took (the vCPUs stay parked).
    pub truth_us: Option<f64>,
}

/// One stretch of the run under one backend (a scheduled workload, or the whole run).
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub backend: Option<TrackerKind>,
    /// The workload's own time for its passes, as the guest agent reported it.
    pub guest_ms: Option<f64>,
    pub memory_overhead_bytes: u64,
    pub background_cpu_ms: f64,
    pub error: Option<String>,
    /// With content truth: the label the agent gave the phase.
    pub label: Option<String>,
    /// With content truth: the phase's rounds summed.
    pub truth: Option<TruthCounts>,
    /// With content truth: whether the backend was watching the device memory.
    pub device_memory: Option<Coverage>,
    /// Rounds in the phase.
    pub rounds: u64,
}

/// What the tracking did during the run.
#[derive(Debug, Clone, Serialize)]
pub struct TrackingReport {
    pub backend: Option<TrackerKind>,
    pub phases: Vec<Phase>,
    pub rounds: Vec<Round>,
    pub memory_overhead_bytes: u64,
    pub background_cpu_ms: f64,
    pub misses: u64,
    pub false_positives: u64,
    /// The first failure (start, a harvest or stop), if any: a run with one is not a result.
    pub error: Option<String>,
    /// On a VM with dirty rings: how full they got.
    pub ring: Option<crate::tracking::RingStats>,
    /// With content truth: the device memory watched, and its size in pages.
    pub device_memory: Option<(String, u64)>,
}

pub struct Session {
    tracker: Option<Box<dyn DirtyTracker>>,
    backend: Option<TrackerKind>,
    ctx: Option<TrackContext>,
    schedule: Vec<Option<TrackerKind>>,
    phases: Vec<Phase>,
    set: DirtySet,
    model: Option<Workload>,
    raw_every_other: bool,
    rounds: Vec<Round>,
    start: Instant,
    last_end: Instant,
    error: Option<String>,
    truth: Option<DeviceTruth>,
    /// With content truth: the open phase (label, sums so far, device memory coverage).
    open: Option<OpenPhase>,
}

struct OpenPhase {
    label: String,
    truth: TruthCounts,
    coverage: Coverage,
    rounds: u64,
}

impl Session {
    /// Creates and starts the backend. `model` is the micro guest's workload, if any.
    pub fn start(
        opts: &TrackingOptions,
        ctx: &TrackContext,
        model: Option<Workload>,
        start: Instant,
    ) -> Result<Session, TrackingError> {
        Self::start_on(opts, ctx, model, start, TrackerKind::check_host)
    }

    /// [`Session::start`] with the host's answer per backend given, so that the refusal of a
    /// scheduled backend can be tested on any host, whichever backends it has.
    fn start_on(
        opts: &TrackingOptions,
        ctx: &TrackContext,
        model: Option<Workload>,
        start: Instant,
        host: impl Fn(TrackerKind) -> Result<(), TrackingError>,
    ) -> Result<Session, TrackingError> {
        let tracker = match opts.backend {
            Some(kind) => Some(start_tracker(kind, ctx)?),
            None => None,
        };
        // Fail now, not in the middle of a guest's run, for a backend this host cannot offer.
        for &kind in opts.schedule.iter().flatten() {
            host(kind)?;
        }
        Ok(Session {
            tracker,
            backend: opts.backend,
            ctx: Some(ctx.clone()),
            schedule: opts.schedule.clone(),
            phases: Vec::new(),
            set: DirtySet::new(&ctx.slots),
            model,
            raw_every_other: opts.raw_every_other,
            rounds: Vec::new(),
            start,
            last_end: Instant::now(),
            error: None,
            truth: None,
            open: None,
        })
    }

    /// Turns on content truth (`TrackingOptions::content_truth`): copies guest RAM and
    /// `device` memory now.
    ///
    /// # Safety
    /// The RAM slots' and the device pieces' host mappings must outlive the session.
    pub unsafe fn with_content_truth(&mut self, device: Option<DeviceMemory>) {
        if let Some(ctx) = &self.ctx {
            // SAFETY: vouched for by our caller.
            self.truth = Some(unsafe { DeviceTruth::new(ctx.vm.clone(), &ctx.slots, device) });
        }
    }

    /// A session that tracks nothing (what is left behind once a session is finished).
    pub fn empty() -> Session {
        let now = Instant::now();
        Session {
            tracker: None,
            backend: None,
            ctx: None,
            schedule: Vec::new(),
            phases: Vec::new(),
            set: DirtySet::new(&[]),
            model: None,
            raw_every_other: false,
            rounds: Vec::new(),
            start: now,
            last_end: now,
            error: None,
            truth: None,
            open: None,
        }
    }

    /// Harvests once and records the round.
    pub fn round(&mut self, pass: Option<u64>) {
        let begin = Instant::now();
        let guest_ms = ms(begin.duration_since(self.last_end));
        let raw = self.raw_every_other && self.rounds.len() % 2 == 1;
        // Bookkeeping outside the timed part: only the harvest itself is measured.
        self.set.clear();
        let cpu0 = thread_cpu_ns();
        let t0 = Instant::now();
        let result = match self.tracker.as_mut() {
            Some(t) if raw => t.harvest_raw().map(Some),
            Some(t) => t.harvest(&mut self.set).map(|()| None),
            None => Ok(Some(0)),
        };
        let harvest_us = t0.elapsed().as_secs_f64() * 1e6;
        let harvest_cpu_us = (thread_cpu_ns() - cpu0) as f64 / 1000.0;
        let result = result.map(|n| n.unwrap_or_else(|| self.set.count()));
        let dirty_pages = match result {
            Ok(n) => n,
            Err(e) => {
                self.error.get_or_insert(e.to_string());
                0
            }
        };
        let mut round = Round {
            phase: self.phases.len(),
            backend: self.backend,
            pass,
            at_ms: ms(begin.duration_since(self.start)),
            guest_ms,
            dirty_pages,
            harvest_us,
            harvest_cpu_us,
            raw,
            expected: None,
            misses: None,
            false_positives: None,
            first_miss_gpa: None,
            truth: None,
            paused: None,
            truth_us: None,
        };
        if let (Some(model), Some(pass), Some(_), false) = (&self.model, pass, &self.tracker, raw) {
            check_round(model, pass, &self.set, &mut round);
        }
        if let Some(truth) = self.truth.as_mut() {
            let reported = self.tracker.is_some().then_some(&self.set);
            let t0 = Instant::now();
            let counted = truth.round(reported);
            round.truth_us = Some(t0.elapsed().as_secs_f64() * 1e6);
            match counted {
                Ok(counts) => {
                    if let Some(open) = self.open.as_mut() {
                        open.truth.add(&counts);
                        open.rounds += 1;
                    }
                    round.truth = Some(counts);
                }
                Err(e) => {
                    self.error.get_or_insert(e.to_string());
                }
            }
        }
        self.rounds.push(round);
        self.apply_markers();
        self.last_end = Instant::now();
    }

    /// A round with every vCPU parked or not (content truth), as the harvester took it.
    pub fn round_paused(&mut self, paused: bool) {
        self.round(None);
        if let Some(r) = self.rounds.last_mut() {
            r.paused = Some(paused);
        }
    }

    /// Applies the phase markers seen since the last round (content truth).
    fn apply_markers(&mut self) {
        let Some(truth) = self.truth.as_mut() else {
            return;
        };
        let markers = std::mem::take(&mut truth.pending);
        for m in markers {
            // A phase opened without an end closes here.
            if self.open.is_some() {
                self.close_phase(None);
                self.backend = None;
            }
            let Marker::Start(label) = m else { continue };
            let next = self.phases.len();
            let Some(&kind) = self.schedule.get(next) else {
                self.error.get_or_insert(format!(
                    "the agent started phase {} ({label}) but the schedule has {}",
                    next + 1,
                    self.schedule.len()
                ));
                continue;
            };
            self.backend = kind;
            if let (Some(kind), Some(ctx)) = (kind, &self.ctx) {
                match start_tracker(kind, ctx) {
                    Ok(t) => self.tracker = Some(t),
                    Err(e) => {
                        self.error.get_or_insert(e.to_string());
                    }
                }
            }
            let coverage = match self.truth.as_mut().map(|t| t.start_phase(kind)) {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    let how = e.to_string();
                    self.error.get_or_insert(how.clone());
                    Coverage {
                        covered: false,
                        how,
                    }
                }
                None => continue,
            };
            self.open = Some(OpenPhase {
                label,
                truth: TruthCounts::default(),
                coverage,
                rounds: 0,
            });
        }
    }

    /// Stops the current backend, closing its phase.
    fn close_phase(&mut self, guest_ms: Option<f64>) {
        let mut phase = Phase {
            backend: self.backend,
            guest_ms,
            memory_overhead_bytes: 0,
            background_cpu_ms: 0.0,
            error: None,
            label: None,
            truth: None,
            device_memory: None,
            rounds: 0,
        };
        if let Some(open) = self.open.take() {
            phase.label = Some(open.label);
            phase.truth = Some(open.truth);
            phase.device_memory = Some(open.coverage);
            phase.rounds = open.rounds;
            // The device memory's log goes before the backend (see `bar_log`).
            if let Some(Err(e)) = self.truth.as_mut().map(|t| t.stop_phase()) {
                phase.error = Some(e.to_string());
            }
        }
        if let Some(mut t) = self.tracker.take() {
            phase.memory_overhead_bytes = t.memory_overhead_bytes() + self.set.bitmap_bytes();
            phase.background_cpu_ms = t.background_cpu_ns() as f64 / 1e6;
            if let Err(e) = t.stop() {
                phase.error.get_or_insert(e.to_string());
            }
        }
        if let Some(e) = &phase.error {
            self.error.get_or_insert(e.clone());
        }
        self.phases.push(phase);
    }

    /// Reacts to an agent line: a workload start switches to the next scheduled backend, its
    /// end closes the phase with the time the agent measured.
    pub fn on_agent_line(&mut self, line: &str) {
        if let Some(truth) = self.truth.as_mut() {
            // Applied at the next round, with the vCPUs parked (`device_truth`).
            truth.pending.extend(Marker::parse(line));
            return;
        }
        if self.schedule.is_empty() {
            return;
        }
        if line.starts_with("workload start") {
            // A phase opened without an end (e.g. a failed workload) closes here.
            if self.backend.is_some() || self.tracker.is_some() {
                self.close_phase(None);
            }
            let next = self.phases.len();
            let Some(&kind) = self.schedule.get(next) else {
                return;
            };
            self.backend = kind;
            if let (Some(kind), Some(ctx)) = (kind, &self.ctx) {
                match start_tracker(kind, ctx) {
                    Ok(t) => self.tracker = Some(t),
                    Err(e) => {
                        self.error.get_or_insert(e.to_string());
                    }
                }
            }
            // A fresh tracker has nothing to report yet; only the guest-time clock restarts.
            self.last_end = Instant::now();
        } else if let Some(rest) = line.strip_prefix("workload done") {
            let ms = rest
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("ms="))
                .and_then(|v| v.parse().ok());
            // One last harvest so the phase's tail is counted.
            self.round(None);
            self.close_phase(ms);
            self.backend = None;
        }
    }

    /// Stops the backend and returns the report.
    pub fn finish(mut self) -> TrackingReport {
        if self.truth.is_some() {
            if self.open.is_some() {
                self.close_phase(None);
            }
        } else if self.schedule.is_empty() || self.tracker.is_some() {
            self.close_phase(None);
        }
        let device_memory = self.truth.as_ref().and_then(|t| t.device_memory());
        let (overhead, background) = self.phases.iter().fold((0, 0.0), |(o, b), p| {
            (o.max(p.memory_overhead_bytes), b + p.background_cpu_ms)
        });
        TrackingReport {
            backend: self.backend,
            phases: self.phases,
            misses: self.rounds.iter().filter_map(|r| r.misses).sum(),
            false_positives: self.rounds.iter().filter_map(|r| r.false_positives).sum(),
            rounds: self.rounds,
            memory_overhead_bytes: overhead,
            background_cpu_ms: background,
            error: self.error,
            ring: self
                .ctx
                .as_ref()
                .and_then(|c| c.rings.as_ref())
                .map(|r| r.stats()),
            device_memory,
        }
    }
}

fn start_tracker(
    kind: TrackerKind,
    ctx: &TrackContext,
) -> Result<Box<dyn DirtyTracker>, TrackingError> {
    let mut t = tracking::create(kind, ctx)?;
    t.start()?;
    Ok(t)
}

/// Compares the region part of a harvest with the pages the model wrote in `pass`.
fn check_round(model: &Workload, pass: u64, set: &DirtySet, round: &mut Round) {
    let expected = model.pages_written_in_pass(pass);
    let got = PageBitmap::from_words(
        model.pages(),
        &set.range_words(model.region_gpa(), model.pages()),
    );
    let mut misses = 0;
    let mut fps = 0;
    let mut first_miss = None;
    for (i, (e, g)) in expected.words().iter().zip(got.words()).enumerate() {
        let missed = e & !g;
        misses += u64::from(missed.count_ones());
        fps += u64::from((g & !e).count_ones());
        if missed != 0 && first_miss.is_none() {
            let page = i as u64 * 64 + u64::from(missed.trailing_zeros());
            first_miss = Some(model.page_gpa(page));
        }
    }
    round.expected = Some(expected.count());
    round.misses = Some(misses);
    round.false_positives = Some(fps);
    round.first_miss_gpa = first_miss;
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A session shared by the vCPU thread (pass hook) or the harvester thread, and the machine.
pub type SharedSession = Arc<Mutex<Session>>;

pub fn lock(s: &SharedSession) -> std::sync::MutexGuard<'_, Session> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Harvests every `interval` until stopped (guests without a sync point).
pub struct Harvester {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// Runs the closure with every vCPU parked if it can; returns whether they were.
pub type RoundPause = Arc<dyn Fn(&mut dyn FnMut()) -> bool + Send + Sync>;

impl Harvester {
    /// With `pause`, every round is taken with the vCPUs parked (content truth).
    pub fn spawn(
        session: SharedSession,
        interval: Duration,
        pause: Option<RoundPause>,
    ) -> std::io::Result<Harvester> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("dirty-harvester".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Tracking);
                let mut next = Instant::now() + interval;
                while !flag.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep((next - now).min(Duration::from_millis(20)));
                        continue;
                    }
                    match &pause {
                        // Parked outside the session's lock: a vCPU thread may be waiting
                        // for it (agent lines) and must get it to reach its park point.
                        Some(p) => {
                            let mut taken = false;
                            let paused = p(&mut || {
                                lock(&session).round_paused(true);
                                taken = true;
                            });
                            if !taken {
                                lock(&session).round_paused(paused);
                            }
                        }
                        None => lock(&session).round(None),
                    }
                    next += interval;
                }
            })?;
        Ok(Harvester { stop, thread })
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use crate::vstate::vm::Vm;

    fn ctx(ram: &GuestRam) -> TrackContext {
        let vm = Arc::new(Vm::new(ram.size()).unwrap());
        vm.register_ram(ram).unwrap();
        TrackContext {
            slots: tracking::slots_of(&vm),
            vm,
            memory: ram.memory().clone(),
            rings: None,
            kick: None,
        }
    }

    #[test]
    fn agent_lines_switch_backends_on_a_live_vm() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let opts = TrackingOptions {
            backend: None,
            interval: Duration::from_millis(100),
            raw_every_other: false,
            content_truth: false,
            schedule: vec![
                None,
                Some(TrackerKind::Bitmap),
                Some(TrackerKind::BitmapManual),
            ],
        };
        let mut s = Session::start(&opts, &ctx(&ram), None, Instant::now()).unwrap();
        s.on_agent_line("workload start size_mib=1 pages=256 pattern=random passes=1");
        s.on_agent_line("workload pass=1 checksum=00");
        s.on_agent_line("workload done pass=1 checksum=00 ms=12.5");
        s.on_agent_line("workload start size_mib=1 pages=256 pattern=random passes=1");
        s.round(None);
        s.on_agent_line("workload done pass=1 checksum=00 ms=7");
        // A workload that never finishes: its phase closes when the session does.
        s.on_agent_line("workload start size_mib=1 pages=256 pattern=random passes=1");
        let r = s.finish();
        assert!(r.error.is_none(), "{:?}", r.error);
        let phases: Vec<_> = r.phases.iter().map(|p| (p.backend, p.guest_ms)).collect();
        assert_eq!(
            phases,
            vec![
                (None, Some(12.5)),
                (Some(TrackerKind::Bitmap), Some(7.0)),
                (Some(TrackerKind::BitmapManual), None)
            ]
        );
        // Rounds carry their phase and backend: the explicit one and the closing one.
        assert!(r
            .rounds
            .iter()
            .any(|x| x.phase == 1 && x.backend == Some(TrackerKind::Bitmap)));
        assert!(r.phases[1].memory_overhead_bytes > 0);
    }

    /// Content truth: markers open and close phases at the next round (never at once), and a
    /// write the backend cannot see (one straight through the VMM's mapping, as the device's
    /// DMA is) is a miss, while one it sees (through vm-memory, which the VMM-writes bitmap
    /// records) is detected; written = detected + missed in every cell.
    #[test]
    fn content_truth_counts_what_the_backend_missed_by_phase() {
        use vm_memory::{Bytes, GuestAddress};
        let ram = GuestRam::new(16 << 20).unwrap();
        let ctx = ctx(&ram);
        let host = ctx.slots[0].host;
        let opts = TrackingOptions {
            content_truth: true,
            ..schedule(&[Some(TrackerKind::Bitmap)])
        };
        let mut s = Session::start(&opts, &ctx, None, Instant::now()).unwrap();
        // SAFETY: `ram` outlives the session.
        unsafe { s.with_content_truth(None) };
        s.on_agent_line("echo devtrack:start:dma");
        assert!(s.tracker.is_none(), "a marker applies at the next round");
        s.round(None);
        assert!(s.tracker.is_some() && s.open.is_some());
        // Three pages written behind every backend's back, two through vm-memory, one page
        // rewritten with the bytes it held (through vm-memory: reported, unchanged).
        for page in [10u64, 11, 12] {
            // SAFETY: inside the 16 MiB guest RAM mapping, which `ram` keeps alive.
            unsafe { *((host + page * 4096) as *mut u8) = 0xa5 };
        }
        for page in [20u64, 21] {
            ram.memory()
                .write_obj(0x5au8, GuestAddress(page * 4096))
                .unwrap();
        }
        ram.memory()
            .write_obj(0u8, GuestAddress(30 * 4096))
            .unwrap();
        s.on_agent_line("echo devtrack:done");
        s.round(None);
        let r = s.finish();
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.phases.len(), 1);
        let p = &r.phases[0];
        assert_eq!(p.label.as_deref(), Some("dma"));
        assert_eq!(p.rounds, 1);
        let c = p.truth.unwrap().ram_cpu;
        assert_eq!(
            (c.written, c.detected, c.missed, c.false_positives),
            (5, 2, 3, 1),
            "{c:?}"
        );
        assert_eq!(p.truth.unwrap().ram_device, Default::default());
        let cov = p.device_memory.as_ref().unwrap();
        assert!(!cov.covered, "{cov:?}");
    }

    fn schedule(kinds: &[Option<TrackerKind>]) -> TrackingOptions {
        TrackingOptions {
            backend: None,
            interval: Duration::from_millis(100),
            raw_every_other: false,
            schedule: kinds.to_vec(),
            content_truth: false,
        }
    }

    /// A host that lacks uffd-wp and soft-dirty, whatever this machine has.
    fn lacking(kind: TrackerKind) -> Result<(), TrackingError> {
        match kind {
            TrackerKind::UffdWp | TrackerKind::SoftDirty => Err(TrackingError::Unsupported {
                backend: kind,
                reason: format!("no {kind} in this test"),
            }),
            _ => Ok(()),
        }
    }

    #[test]
    fn a_schedule_with_a_backend_the_host_lacks_fails_up_front() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let ctx = ctx(&ram);
        let start = |kinds: &[Option<TrackerKind>]| {
            Session::start_on(&schedule(kinds), &ctx, None, Instant::now(), lacking)
        };
        use TrackerKind::*;
        // The first scheduled backend the host lacks is named, with the host's reason, even
        // after backends it has and untracked phases.
        match start(&[None, Some(Bitmap), Some(UffdWp), Some(SoftDirty)]) {
            Err(TrackingError::Unsupported { backend, reason }) => {
                assert_eq!(backend, UffdWp);
                assert_eq!(reason, "no uffd-wp in this test");
            }
            other => panic!("expected uffd-wp refused, got {:?}", other.err()),
        }
        match start(&[Some(Bitmap), None, Some(SoftDirty)]) {
            Err(TrackingError::Unsupported { backend, .. }) => assert_eq!(backend, SoftDirty),
            other => panic!("expected soft-dirty refused, got {:?}", other.err()),
        }
        // Nothing lacking: the session starts, untracked until the first workload.
        let s = start(&[None, Some(Bitmap), Some(UffdWpAsync)]).unwrap();
        assert!(s.tracker.is_none());
        assert!(s.finish().error.is_none());
    }

    /// The same check against this host's real answers: a scheduled backend starts exactly when
    /// the host offers it, and then really tracks its phase. Which backends a host offers is not
    /// asserted (PLATFORM.md §10).
    #[test]
    fn a_schedule_is_checked_against_this_hosts_backends() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let ctx = ctx(&ram);
        for kind in TrackerKind::ALL {
            let host = kind.check_host();
            let opts = schedule(&[Some(kind)]);
            match (Session::start(&opts, &ctx, None, Instant::now()), host) {
                (Err(refused), Err(why)) => {
                    assert!(
                        matches!(
                            refused,
                            TrackingError::Unsupported { backend, .. }
                            | TrackingError::HostSys { backend, .. }
                            | TrackingError::HostKvm { backend, .. } if backend == kind
                        ),
                        "{kind}: {refused:?}"
                    );
                    assert_eq!(refused.to_string(), why.to_string(), "{kind}");
                }
                // The ring is chosen when a VM is created (this one has none): only the check
                // applies to it here.
                (Ok(s), Ok(())) if kind.needs_dirty_ring() => {
                    assert!(s.finish().error.is_none(), "{kind}")
                }
                (Ok(mut s), Ok(())) => {
                    s.on_agent_line("workload start size_mib=1 pages=256 pattern=random passes=1");
                    assert!(s.tracker.is_some(), "{kind}: no tracker for its phase");
                    s.on_agent_line("workload done pass=1 checksum=00 ms=3");
                    let r = s.finish();
                    assert!(r.error.is_none(), "{kind}: {:?}", r.error);
                    assert_eq!(r.phases.len(), 1, "{kind}");
                    assert_eq!(r.phases[0].backend, Some(kind));
                    assert_eq!(r.phases[0].guest_ms, Some(3.0));
                    assert!(r.phases[0].memory_overhead_bytes > 0, "{kind}");
                }
                (session, host) => panic!(
                    "{kind}: the host says {host:?} but the session {:?}",
                    session.map(|_| "started")
                ),
            }
        }
    }
}
