//! `vfio-workload,BDF,start,vram-cpu`: a thread of the agent writes VRAM pages through the BAR
//! mmap, the way a guest driver uploads data, and records in agent memory what each page must
//! hold. Nothing but the guest CPU writes these pages, so the device only sees them if whoever
//! migrates VRAM looks at the mapping (a device that digests only what its own engines wrote
//! would lose them). The range is the second MiB of VRAM, clear of the device kernel's first MiB.

use std::sync::atomic::{compiler_fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::vfio::mapping::Mapping;

/// Where the writer's pages start in VRAM: right after the kernel's range.
pub const OFFSET: u64 = super::workload::KERNEL_BYTES;
/// Pages written, round after round (1 MiB of 4 KiB pages).
pub const PAGES: u64 = 256;
pub const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;

/// Word `word` of a page written with sequence number `seq`: every word differs, so a page
/// migrated half old and half new, or from another page, never matches.
pub fn word(seq: u64, w: u64) -> u64 {
    // splitmix64 of (seq, word): cheap and well mixed.
    let mut z = seq
        .wrapping_mul(WORDS)
        .wrapping_add(w)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What the agent knows VRAM holds: each page's last sequence number, and the write under way.
/// The in-flight entry is recorded before the page is touched and cleared after the record is
/// updated, so a vCPU stopped anywhere in between (a migration pauses the guest at an
/// arbitrary instruction) leaves a record that still explains VRAM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub last: Vec<u64>,
    pub inflight: Option<(usize, u64)>,
    pub writes: u64,
}

/// The outcome of checking every page against the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub bad_pages: u64,
    /// The first page that matched neither its record nor the write in flight, and its first
    /// word.
    pub first_bad: Option<(usize, u64)>,
}

/// Checks `pages` pages, reading word `w` of page `p` with `read(p, w)`. A page matches when
/// every word is its recorded sequence number's; the page in flight may also hold any mix of
/// the old and the new write (the store loop was cut short).
pub fn check(record: &Record, read: impl Fn(usize, u64) -> u64) -> Check {
    let mut bad_pages = 0;
    let mut first_bad = None;
    for (p, &seq) in record.last.iter().enumerate() {
        let new = record.inflight.filter(|&(q, _)| q == p).map(|(_, s)| s);
        let good = (0..WORDS).all(|w| {
            let got = read(p, w);
            got == word(seq, w) || new.is_some_and(|s| got == word(s, w))
        });
        if !good {
            bad_pages += 1;
            first_bad.get_or_insert((p, read(p, 0)));
        }
    }
    Check {
        bad_pages,
        first_bad,
    }
}

/// Writes page `p` of `map` with sequence number `seq`, updating `record` around it.
fn write_page(map: &Mapping, record: &mut Record, p: usize, seq: u64) {
    record.inflight = Some((p, seq));
    // The record must be in memory before the first VRAM store, and updated only after the
    // last: program order is what a paused vCPU leaves behind.
    compiler_fence(Ordering::SeqCst);
    let base = p as u64 * PAGE;
    for w in 0..WORDS {
        map.write_u64((base + 8 * w) as usize, word(seq, w));
    }
    compiler_fence(Ordering::SeqCst);
    record.last[p] = seq;
    record.writes += 1;
    compiler_fence(Ordering::SeqCst);
    record.inflight = None;
}

/// The running writer.
pub struct CpuWriter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(Mapping, Record)>>,
    pub rate: u32,
    pub started: Instant,
}

impl CpuWriter {
    /// Writes every page once (so each has a known value), then leaves a thread writing page
    /// after page, round-robin, `rate` pages a second (0: as fast as it goes).
    pub fn start(map: Mapping, rate: u32) -> Result<CpuWriter, String> {
        let mut record = Record {
            last: vec![0; PAGES as usize],
            ..Record::default()
        };
        let mut seq = 0;
        for p in 0..PAGES as usize {
            seq += 1;
            write_page(&map, &mut record, p, seq);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let started = Instant::now();
        let thread = std::thread::Builder::new()
            .name("vram-cpu".into())
            .spawn(move || {
                let mut done = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    if rate != 0 {
                        let due = started.elapsed().as_secs_f64() * f64::from(rate);
                        if done as f64 >= due {
                            // A guest tick is 10 ms (HZ_100): shorter sleeps round up anyway.
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                    }
                    seq += 1;
                    let p = ((seq - 1) % PAGES) as usize;
                    write_page(&map, &mut record, p, seq);
                    done += 1;
                }
                (map, record)
            })
            .map_err(|e| format!("spawn the VRAM writer: {e}"))?;
        Ok(CpuWriter {
            stop,
            thread: Some(thread),
            rate,
            started,
        })
    }

    /// Stops the thread after its current page; returns the mapping and the record.
    pub fn stop(mut self) -> Result<(Mapping, Record), String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .ok_or("the VRAM writer is gone")?
            .join()
            .map_err(|_| "the VRAM writer thread panicked".to_string())
    }
}

impl Drop for CpuWriter {
    /// A session closing with the writer running: stop it before the BAR goes.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vram(record: &Record) -> Vec<Vec<u64>> {
        record
            .last
            .iter()
            .map(|&s| (0..WORDS).map(|w| word(s, w)).collect())
            .collect()
    }

    fn run(record: &Record, mem: &[Vec<u64>]) -> Check {
        check(record, |p, w| mem[p][w as usize])
    }

    #[test]
    fn words_differ_between_writes_and_within_a_page() {
        assert_ne!(word(1, 0), word(2, 0));
        assert_ne!(word(1, 0), word(1, 1));
        // (seq, word) pairs never alias across pages' word ranges.
        assert_ne!(word(1, WORDS - 1), word(2, 0));
    }

    #[test]
    fn a_page_matching_its_record_passes_and_a_stale_one_fails() {
        let record = Record {
            last: vec![5, 6, 7],
            ..Record::default()
        };
        let mut mem = vram(&record);
        assert_eq!(
            run(&record, &mem),
            Check {
                bad_pages: 0,
                first_bad: None
            }
        );
        // Page 1 lost its last write: it still holds write 3's words.
        mem[1] = (0..WORDS).map(|w| word(3, w)).collect();
        assert_eq!(
            run(&record, &mem),
            Check {
                bad_pages: 1,
                first_bad: Some((1, word(3, 0)))
            }
        );
        // One wrong word is enough.
        let mut mem = vram(&record);
        mem[2][WORDS as usize - 1] ^= 1;
        assert_eq!(run(&record, &mem).bad_pages, 1);
    }

    #[test]
    fn the_page_in_flight_may_hold_old_new_or_a_mix() {
        // Paused mid-write of sequence 9 to page 0 (which held 5): half new, half old.
        let record = Record {
            last: vec![5, 6],
            inflight: Some((0, 9)),
            writes: 2,
        };
        let mut mem = vram(&record);
        for w in 0..WORDS / 2 {
            mem[0][w as usize] = word(9, w);
        }
        assert_eq!(run(&record, &mem).bad_pages, 0);
        // ... but the in-flight allowance covers only that page.
        mem[1] = (0..WORDS).map(|w| word(9, w)).collect();
        assert_eq!(run(&record, &mem).bad_pages, 1);
    }

    #[test]
    fn the_thread_keeps_a_record_that_explains_every_page_it_wrote() {
        // A file stands in for the VRAM BAR: the same shared mapping, the same stores.
        let path = std::env::temp_dir().join(format!("vmm-agent-vram-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        let bytes = PAGES * PAGE;
        file.set_len(bytes).expect("size");
        let map = Mapping::new(&file, 0, bytes as usize).expect("map");
        let writer = CpuWriter::start(map, 0).expect("start");
        // Let it go round: wait (without a deadline on speed) until it wrote past the first
        // round, read from a second mapping of the same file.
        let view = Mapping::new(&file, 0, bytes as usize).expect("map");
        while view.read_u64(0) == word(1, 0) {
            std::thread::yield_now();
        }
        let (map, record) = writer.stop().expect("stop");
        assert!(record.writes > PAGES, "{}", record.writes);
        assert_eq!(record.inflight, None);
        let read = |p: usize, w: u64| map.read_u64((p as u64 * PAGE + 8 * w) as usize);
        assert_eq!(check(&record, read).bad_pages, 0);
        // A lost write (the page set back to an older sequence number) is caught.
        let p = 7;
        for w in 0..WORDS {
            map.write_u64(
                (p * PAGE + 8 * w) as usize,
                word(record.last[p as usize] - 1, w),
            );
        }
        let c = check(&record, read);
        assert_eq!(c.bad_pages, 1);
        assert_eq!(c.first_bad.map(|(q, _)| q), Some(p as usize));
        drop((map, view));
        std::fs::remove_file(path).expect("cleanup");
    }
}
