//! The `workload` command: a user-space memory writer whose memory can be verified later, e.g.
//! after a live migration.
//!
//! The buffer is `SIZE_MIB` MiB of 4 KiB pages, allocated and touched up front. A write stores
//! `guest_abi::micro::store_value(pass, i)` in the first 8 bytes of a page, as the micro guest
//! does, and the page choice follows the micro guest's patterns with `param = pages`: sweep
//! writes every page in order; random and hotset make `pages` writes per pass to pages drawn by
//! `guest_abi::micro::page_for` from an xorshift64 state seeded with `SEED`, advanced before each
//! write and carried over from pass to pass.
//!
//! Next to the buffer the agent keeps a record of each page's last value. After a pass it
//! prints the checksum the buffer must have (computed from that record, so a pass costs
//! O(pages) on top of its writes and the dirty rate stays high): for the first and the last
//! pass, and otherwise at most once a second. `workload-verify` hashes the real buffer and
//! compares, and also counts pages that differ from the record. The expected checksum depends
//! only on the size, pattern and pass count, so it is the same on every run and on both sides
//! of a migration.
//!
//! Checksum: FNV-1a 64 over the buffer's little-endian u64 words (xor a whole word, multiply by
//! the FNV prime), in address order. Word-wise to be ~8x cheaper than byte-wise FNV-1a.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use guest_abi::micro;
use guest_abi::pattern::{FNV1A64_OFFSET, FNV1A64_PRIME};

use crate::say;

/// The PRNG seed of random and hotset workloads.
pub const SEED: u64 = 1;
const PAGE_SIZE: u64 = 4096;
const WORDS_PER_PAGE: usize = (PAGE_SIZE / 8) as usize;
/// Room left for the rest of the guest when sizing a buffer against MemAvailable.
const MEM_MARGIN_KIB: u64 = 16 * 1024;
/// At most one pass line per interval (besides the first and the last pass): a pass of a small
/// buffer takes well under a millisecond, while every console byte goes through the guest
/// kernel's serial driver, which is emulated (slow) on PVM hosts. A line per pass would flood
/// the console and throttle the workload to the console's speed.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Page-choice patterns (the micro guest's, minus sparse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Sweep,
    Random,
    Hotset,
}

impl Pattern {
    fn abi(self) -> u64 {
        match self {
            Pattern::Sweep => micro::PATTERN_SWEEP,
            Pattern::Random => micro::PATTERN_RANDOM,
            Pattern::Hotset => micro::PATTERN_HOTSET,
        }
    }
}

impl FromStr for Pattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sweep" => Ok(Pattern::Sweep),
            "random" => Ok(Pattern::Random),
            "hotset" => Ok(Pattern::Hotset),
            _ => Err(format!(
                "unknown pattern {s:?} (expected sweep, random or hotset)"
            )),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pattern::Sweep => "sweep",
            Pattern::Random => "random",
            Pattern::Hotset => "hotset",
        })
    }
}

/// What a `workload` command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    pub size_mib: u64,
    pub pattern: Pattern,
    /// 0 = until `workload-stop`.
    pub passes: u64,
    /// Limit on dirtied pages, in MiB/s; None = as fast as possible.
    pub rate_mib_s: Option<u64>,
}

/// The buffer and the record of what it must hold.
struct Memory {
    buf: Vec<u64>,
    /// Last value written to each page (0: never written).
    expected: Vec<u64>,
}

/// A workload that has stopped: its memory stays for `workload-verify`.
struct Finished {
    mem: Memory,
    pass: u64,
    checksum: u64,
    /// Time the passes took (allocation excluded), as the guest's clock saw it.
    ms: f64,
}

enum State {
    Idle,
    Running {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<Finished>,
    },
    Stopped(Finished),
}

/// Result of `workload-verify`.
pub struct Verification {
    pub checksum: u64,
    pub expected: u64,
    /// Pages whose content is not exactly the recorded value followed by zeros.
    pub bad_pages: u64,
    pub first_bad_page: Option<u64>,
}

/// The agent's (single) workload.
pub struct Workloads {
    state: State,
}

/// How `start` went.
pub enum Started {
    /// `passes` was 0: running in a background thread.
    Background,
    /// Ran all its passes in the foreground, in `ms` milliseconds.
    Finished { pass: u64, checksum: u64, ms: f64 },
}

impl Workloads {
    pub fn new() -> Workloads {
        Workloads { state: State::Idle }
    }

    /// Starts a workload, replacing a stopped one. Finite workloads run to the end before this
    /// returns, so a script can verify right after; endless ones run in a thread.
    pub fn start(&mut self, spec: Spec) -> Result<Started, String> {
        if matches!(self.state, State::Running { .. }) {
            return Err("a workload is running; send workload-stop first".into());
        }
        // A stopped workload of the same size lends its buffer: zeroing it here runs at native
        // speed, while fresh pages cost the guest kernel a fault and a clear_page each, which
        // on PVM hosts (emulated ring 0) is ~8 ms a page, a minute for 32 MiB.
        let mem = match std::mem::replace(&mut self.state, State::Idle) {
            State::Stopped(done)
                if spec.size_mib.checked_mul(256) == Some(done.mem.expected.len() as u64) =>
            {
                let mut mem = done.mem;
                mem.buf.fill(0);
                mem.expected.fill(0);
                mem
            }
            // Otherwise free the old buffer before allocating the new one.
            _ => allocate(spec.size_mib)?,
        };
        say!(
            "workload start size_mib={} pages={} pattern={} passes={} rate_mib_s={}",
            spec.size_mib,
            mem.expected.len(),
            spec.pattern,
            spec.passes,
            spec.rate_mib_s.unwrap_or(0)
        );
        if spec.passes != 0 {
            let done = run(mem, spec, &AtomicBool::new(false));
            let started = Started::Finished {
                pass: done.pass,
                checksum: done.checksum,
                ms: done.ms,
            };
            self.state = State::Stopped(done);
            return Ok(started);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name("workload".into())
            .spawn(move || run(mem, spec, &thread_stop))
            .map_err(|e| format!("cannot start the workload thread: {e}"))?;
        self.state = State::Running { stop, thread };
        Ok(Started::Background)
    }

    /// Stops a running workload after its current pass; returns the last pass and checksum.
    pub fn stop(&mut self) -> Result<(u64, u64), String> {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle => Err("no workload".into()),
            State::Running { stop, thread } => {
                stop.store(true, Ordering::Relaxed);
                let done = thread
                    .join()
                    .map_err(|_| "the workload thread panicked".to_owned())?;
                let result = (done.pass, done.checksum);
                self.state = State::Stopped(done);
                Ok(result)
            }
            State::Stopped(done) => {
                let result = (done.pass, done.checksum);
                self.state = State::Stopped(done);
                Ok(result)
            }
        }
    }

    /// Hashes the buffer of a stopped workload and compares it with the record.
    pub fn verify(&self) -> Result<Verification, String> {
        let done = match &self.state {
            State::Idle => return Err("no workload".into()),
            State::Running { .. } => {
                return Err("the workload is running; send workload-stop first".into())
            }
            State::Stopped(done) => done,
        };
        let (bad_pages, first_bad_page) = compare_pages(&done.mem);
        Ok(Verification {
            checksum: buffer_checksum(&done.mem.buf),
            expected: done.checksum,
            bad_pages,
            first_bad_page,
        })
    }
}

fn allocate(size_mib: u64) -> Result<Memory, String> {
    let too_big = || format!("{size_mib} MiB is too large");
    let pages = size_mib.checked_mul(256).ok_or_else(too_big)?;
    // The guest's init cannot be OOM-killed: running out of memory would panic the kernel, so
    // refuse what does not fit instead of finding out.
    if let Some(avail_kib) = crate::sysinfo::meminfo_kib("MemAvailable") {
        // 1024 KiB of buffer and 2 KiB of record (256 pages * 8 bytes) per MiB.
        let need_kib = size_mib
            .checked_mul(1026)
            .and_then(|kib| kib.checked_add(MEM_MARGIN_KIB))
            .ok_or_else(too_big)?;
        if need_kib > avail_kib {
            return Err(format!(
                "{size_mib} MiB does not fit: MemAvailable is {avail_kib} KiB"
            ));
        }
    }
    let pages = usize::try_from(pages).map_err(|_| too_big())?;
    let words = pages.checked_mul(WORDS_PER_PAGE).ok_or_else(too_big)?;
    Ok(Memory {
        buf: touched_zeros(words).map_err(|e| format!("cannot allocate {size_mib} MiB: {e}"))?,
        expected: touched_zeros(pages).map_err(|e| format!("cannot allocate the record: {e}"))?,
    })
}

/// A zeroed vector whose memory is really there: the zeros are written, not just mapped.
fn touched_zeros(len: usize) -> Result<Vec<u64>, std::collections::TryReserveError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)?;
    v.resize(len, 0);
    Ok(v)
}

/// Runs passes until `spec.passes` are done or `stop` is set (checked between passes).
fn run(mut mem: Memory, spec: Spec, stop: &AtomicBool) -> Finished {
    let pages = mem.expected.len() as u64;
    let pattern = spec.pattern.abi();
    let mut rng = guest_abi::pattern::pattern_state(SEED);
    let mut throttle = Throttle::new(spec.rate_mib_s);
    let mut pass = 0;
    let mut checksum = image_checksum(&mem.expected);
    let mut last_report = Instant::now();
    let began = Instant::now();
    while !stop.load(Ordering::Relaxed) && (spec.passes == 0 || pass < spec.passes) {
        pass += 1;
        throttle.restart();
        for i in 0..pages {
            if spec.pattern != Pattern::Sweep {
                rng = micro::xorshift64(rng);
            }
            let page = micro::page_for(pattern, pages, pages, i, rng) as usize;
            let value = micro::store_value(pass, i);
            // Volatile so that every store reaches memory in program order: the dirty rate is
            // the point of the exercise.
            // SAFETY: page < pages, so the index is inside `buf`, a live exclusive borrow.
            unsafe { std::ptr::write_volatile(&mut mem.buf[page * WORDS_PER_PAGE], value) };
            mem.expected[page] = value;
            throttle.page_written();
        }
        checksum = image_checksum(&mem.expected);
        let last = pass == spec.passes || stop.load(Ordering::Relaxed);
        if pass == 1 || last || last_report.elapsed() >= REPORT_INTERVAL {
            say!("workload pass={pass} checksum={checksum:016x}");
            last_report = Instant::now();
        }
    }
    Finished {
        mem,
        pass,
        checksum,
        ms: began.elapsed().as_secs_f64() * 1000.0,
    }
}

/// Sleeps as needed to keep dirtied pages under a rate.
struct Throttle {
    bytes_per_s: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl Throttle {
    /// Check the clock every this many bytes, not on every page.
    const CHECK_EVERY: u64 = 64 * PAGE_SIZE;

    fn new(rate_mib_s: Option<u64>) -> Throttle {
        Throttle {
            bytes_per_s: rate_mib_s.map(|r| r.saturating_mul(1 << 20)),
            start: Instant::now(),
            bytes: 0,
        }
    }

    fn restart(&mut self) {
        self.start = Instant::now();
        self.bytes = 0;
    }

    fn page_written(&mut self) {
        let Some(rate) = self.bytes_per_s else { return };
        self.bytes += PAGE_SIZE;
        // CHECK_EVERY is a power of two.
        if self.bytes & (Self::CHECK_EVERY - 1) != 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        if let Some(ahead) = due.checked_sub(self.start.elapsed()) {
            thread::sleep(ahead);
        }
    }
}

/// FNV-1a 64 over u64 words (see the module docs).
pub fn fnv1a64_words(words: impl IntoIterator<Item = u64>) -> u64 {
    words
        .into_iter()
        .fold(FNV1A64_OFFSET, |h, w| (h ^ w).wrapping_mul(FNV1A64_PRIME))
}

/// The checksum of the real buffer. Volatile reads: the compiler must not answer from what it
/// believes was stored, since checking memory that may have been moved underneath us (a
/// migration) is the point.
fn buffer_checksum(buf: &[u64]) -> u64 {
    fnv1a64_words(buf.iter().map(|w| {
        // SAFETY: a reference to a live u64.
        unsafe { std::ptr::read_volatile(w) }
    }))
}

/// The checksum of a buffer whose page `p` holds `expected[p]` followed by zeros, in O(pages):
/// a zero word only multiplies by the prime, so 511 of them multiply by prime^511.
pub fn image_checksum(expected: &[u64]) -> u64 {
    let zeros = FNV1A64_PRIME.wrapping_pow(WORDS_PER_PAGE as u32 - 1);
    expected.iter().fold(FNV1A64_OFFSET, |h, &v| {
        (h ^ v).wrapping_mul(FNV1A64_PRIME).wrapping_mul(zeros)
    })
}

/// Pages of the buffer that differ from the record: (count, first).
fn compare_pages(mem: &Memory) -> (u64, Option<u64>) {
    let mut bad = 0;
    let mut first = None;
    for (page, (words, &value)) in mem
        .buf
        .chunks_exact(WORDS_PER_PAGE)
        .zip(&mem.expected)
        .enumerate()
    {
        // SAFETY: references to live u64s (volatile for the reason given at buffer_checksum).
        let mut actual = words.iter().map(|w| unsafe { std::ptr::read_volatile(w) });
        let ok = actual.next() == Some(value) && actual.all(|w| w == 0);
        if !ok {
            bad += 1;
            first.get_or_insert(page as u64);
        }
    }
    (bad, first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pattern: Pattern, passes: u64) -> Spec {
        Spec {
            size_mib: 1,
            pattern,
            passes,
            rate_mib_s: None,
        }
    }

    #[test]
    fn image_checksum_matches_hashing_the_buffer() {
        let expected = [0, 5, u64::MAX, 1 << 40];
        let mut buf = vec![0u64; expected.len() * WORDS_PER_PAGE];
        for (p, &v) in expected.iter().enumerate() {
            buf[p * WORDS_PER_PAGE] = v;
        }
        assert_eq!(image_checksum(&expected), buffer_checksum(&buf));
        assert_eq!(image_checksum(&[]), FNV1A64_OFFSET);
    }

    #[test]
    fn word_hash_is_fnv1a_shape() {
        let h = fnv1a64_words([1, 2]);
        let step = |h: u64, w: u64| (h ^ w).wrapping_mul(FNV1A64_PRIME);
        assert_eq!(h, step(step(FNV1A64_OFFSET, 1), 2));
    }

    #[test]
    fn runs_verify_and_detects_corruption() {
        for pattern in [Pattern::Sweep, Pattern::Random, Pattern::Hotset] {
            let mut w = Workloads::new();
            let Ok(Started::Finished { pass, checksum, .. }) = w.start(spec(pattern, 3)) else {
                panic!("finite workload runs in the foreground");
            };
            assert_eq!(pass, 3);
            let v = w.verify().expect("stopped");
            assert_eq!(
                (v.checksum, v.expected, v.bad_pages),
                (checksum, checksum, 0)
            );
            assert_eq!(w.stop(), Ok((3, checksum)));

            // Flip a byte in the middle of page 7.
            if let State::Stopped(done) = &mut w.state {
                done.mem.buf[7 * WORDS_PER_PAGE + 100] ^= 1;
            }
            let v = w.verify().expect("stopped");
            assert_ne!(v.checksum, v.expected);
            assert_eq!((v.bad_pages, v.first_bad_page), (1, Some(7)));
        }
    }

    #[test]
    fn a_second_workload_of_the_same_size_reuses_a_clean_buffer() {
        let mut w = Workloads::new();
        let first = match w.start(spec(Pattern::Random, 2)) {
            Ok(Started::Finished { checksum, .. }) => checksum,
            _ => panic!("foreground"),
        };
        // Same size: the buffer is lent, zeroed, and the run is the same as on a fresh one.
        let second = match w.start(spec(Pattern::Random, 2)) {
            Ok(Started::Finished { checksum, .. }) => checksum,
            _ => panic!("foreground"),
        };
        assert_eq!(first, second);
        let v = w.verify().expect("stopped");
        assert_eq!((v.checksum, v.bad_pages), (second, 0));
    }

    #[test]
    fn sweep_writes_every_page_with_the_last_pass() {
        let mem = allocate(1).expect("1 MiB");
        let done = run(mem, spec(Pattern::Sweep, 2), &AtomicBool::new(false));
        for (p, &v) in done.mem.expected.iter().enumerate() {
            assert_eq!(v, micro::store_value(2, p as u64));
            assert_eq!(done.mem.buf[p * WORDS_PER_PAGE], v);
        }
    }

    #[test]
    fn runs_are_deterministic_and_patterns_differ() {
        let checksum = |pattern| {
            let mut w = Workloads::new();
            match w.start(spec(pattern, 2)) {
                Ok(Started::Finished { checksum, .. }) => checksum,
                _ => panic!("foreground"),
            }
        };
        assert_eq!(checksum(Pattern::Random), checksum(Pattern::Random));
        assert_ne!(checksum(Pattern::Random), checksum(Pattern::Hotset));
        assert_ne!(checksum(Pattern::Random), checksum(Pattern::Sweep));
    }

    #[test]
    fn background_workload_stops_after_a_whole_pass() {
        let mut w = Workloads::new();
        assert!(matches!(
            w.start(spec(Pattern::Hotset, 0)),
            Ok(Started::Background)
        ));
        assert!(w.verify().is_err(), "verify refuses a running workload");
        assert!(w.start(spec(Pattern::Sweep, 1)).is_err(), "one at a time");
        thread::sleep(Duration::from_millis(20));
        let (pass, checksum) = w.stop().expect("running");
        let v = w.verify().expect("stopped");
        assert_eq!(
            (v.checksum, v.expected, v.bad_pages),
            (checksum, checksum, 0)
        );
        // The recorded checksum is that of `pass` complete passes.
        let mut again = Workloads::new();
        if pass > 0 {
            match again.start(spec(Pattern::Hotset, pass)) {
                Ok(Started::Finished { checksum: c, .. }) => assert_eq!(c, checksum),
                _ => panic!("foreground"),
            }
        }
    }

    #[test]
    fn throttle_limits_the_rate() {
        let mut t = Throttle::new(Some(64)); // 64 MiB/s: 4 MiB take >= 62.5 ms
        let start = Instant::now();
        for _ in 0..1024 {
            t.page_written();
        }
        assert!(
            start.elapsed() >= Duration::from_millis(60),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn refuses_what_does_not_fit() {
        assert!(allocate(u64::MAX / 2).is_err());
    }
}
