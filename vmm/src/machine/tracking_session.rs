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
}

impl TrackingOptions {
    pub fn backend(kind: TrackerKind) -> Self {
        TrackingOptions {
            backend: Some(kind),
            interval: Duration::from_millis(100),
            raw_every_other: false,
        }
    }
}

/// One harvest.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
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
}

/// What the tracking did during the run.
#[derive(Debug, Clone, Serialize)]
pub struct TrackingReport {
    pub backend: Option<TrackerKind>,
    pub rounds: Vec<Round>,
    pub memory_overhead_bytes: u64,
    pub background_cpu_ms: f64,
    pub misses: u64,
    pub false_positives: u64,
    /// The first failure (start, a harvest or stop), if any: a run with one is not a result.
    pub error: Option<String>,
}

pub struct Session {
    tracker: Option<Box<dyn DirtyTracker>>,
    backend: Option<TrackerKind>,
    set: DirtySet,
    model: Option<Workload>,
    raw_every_other: bool,
    rounds: Vec<Round>,
    start: Instant,
    last_end: Instant,
    error: Option<String>,
}

impl Session {
    /// Creates and starts the backend. `model` is the micro guest's workload, if any.
    pub fn start(
        opts: &TrackingOptions,
        ctx: &TrackContext,
        model: Option<Workload>,
        start: Instant,
    ) -> Result<Session, TrackingError> {
        let tracker = match opts.backend {
            Some(kind) => {
                let mut t = tracking::create(kind, ctx)?;
                t.start()?;
                Some(t)
            }
            None => None,
        };
        Ok(Session {
            tracker,
            backend: opts.backend,
            set: DirtySet::new(&ctx.slots),
            model,
            raw_every_other: opts.raw_every_other,
            rounds: Vec::new(),
            start,
            last_end: Instant::now(),
            error: None,
        })
    }

    /// A session that tracks nothing (what is left behind once a session is finished).
    pub fn empty() -> Session {
        let now = Instant::now();
        Session {
            tracker: None,
            backend: None,
            set: DirtySet::new(&[]),
            model: None,
            raw_every_other: false,
            rounds: Vec::new(),
            start: now,
            last_end: now,
            error: None,
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
        };
        if let (Some(model), Some(pass), Some(_), false) = (&self.model, pass, &self.tracker, raw) {
            check_round(model, pass, &self.set, &mut round);
        }
        self.rounds.push(round);
        self.last_end = Instant::now();
    }

    /// Stops the backend and returns the report.
    pub fn finish(mut self) -> TrackingReport {
        let mut overhead = 0;
        let mut background = 0;
        if let Some(mut t) = self.tracker.take() {
            overhead = t.memory_overhead_bytes() + self.set.bitmap_bytes();
            background = t.background_cpu_ns();
            if let Err(e) = t.stop() {
                self.error.get_or_insert(e.to_string());
            }
        }
        TrackingReport {
            backend: self.backend,
            misses: self.rounds.iter().filter_map(|r| r.misses).sum(),
            false_positives: self.rounds.iter().filter_map(|r| r.false_positives).sum(),
            rounds: self.rounds,
            memory_overhead_bytes: overhead,
            background_cpu_ms: background as f64 / 1e6,
            error: self.error,
        }
    }
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

impl Harvester {
    pub fn spawn(session: SharedSession, interval: Duration) -> std::io::Result<Harvester> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("dirty-harvester".into())
            .spawn(move || {
                let mut next = Instant::now() + interval;
                while !flag.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep((next - now).min(Duration::from_millis(20)));
                        continue;
                    }
                    lock(&session).round(None);
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
