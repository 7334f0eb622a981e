//! The bus changing under running vCPUs: threads hammering a device while another moves it, and
//! a device whose own write moves it (as a PCI BAR write will), and changes from several threads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::bus::{Bus, BusDevice, BusError, VcpuAction};

/// Answers a read with the offset's low byte and counts the reads it served.
struct Counter {
    reads: Arc<AtomicU64>,
}

impl BusDevice for Counter {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        data.fill(offset as u8);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) -> VcpuAction {
        VcpuAction::Continue
    }
}

const LEN: u64 = 0x100;
const A: u64 = 0x1000;
/// Half a range above A: [B, A + LEN) is inside both mappings.
const B: u64 = A + LEN / 2;
/// In both mappings: offset 0xc0 at A, 0x40 at B.
const BOTH: u64 = A + 0xc0;
/// Only in the mapping at A.
const ONLY_A: u64 = A + 0x10;

#[derive(Default)]
struct Tally {
    both_hits: u64,
    only_a_hits: u64,
    only_a_misses: u64,
    at_a: u64,
    at_b: u64,
}

/// Reads BOTH and ONLY_A until `stop`; panics on anything a correct bus cannot give.
fn hammer(bus: &Bus, stop: &AtomicBool) -> Tally {
    let mut t = Tally::default();
    let mut data = [0u8; 1];
    while !stop.load(Ordering::Relaxed) {
        // Covered by the old and the new mapping alike, so a move must never make it vanish,
        // and the offset says which mapping served it.
        bus.read(BOTH, &mut data)
            .expect("an address mapped both before and after a move went unmapped");
        match data[0] {
            0xc0 => t.at_a += 1,
            0x40 => t.at_b += 1,
            other => panic!("read at an offset neither mapping gives: {other:#x}"),
        }
        t.both_hits += 1;
        match bus.read(ONLY_A, &mut data) {
            Ok(()) => {
                assert_eq!(data[0], 0x10);
                t.only_a_hits += 1;
            }
            Err(BusError::NoDevice(ONLY_A)) => t.only_a_misses += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    t
}

#[test]
fn readers_always_find_a_device_that_another_thread_keeps_moving() {
    const READERS: usize = 3;
    const MOVES: u64 = 20_000;
    let reads = Arc::new(AtomicU64::new(0));
    let mut bus = Bus::new();
    let dev = Arc::new(Mutex::new(Counter {
        reads: reads.clone(),
    }));
    bus.insert(dev, A, LEN).unwrap();
    // A neighbour each move must be checked against, and that must never be disturbed.
    bus.insert(
        Arc::new(Mutex::new(Counter {
            reads: Arc::new(AtomicU64::new(0)),
        })),
        A + 2 * LEN,
        LEN,
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));

    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let (bus, stop) = (bus.clone(), stop.clone());
            thread::spawn(move || hammer(&bus, &stop))
        })
        .collect();
    let mover = {
        let bus = bus.clone();
        thread::spawn(move || {
            for i in 0..MOVES {
                let (from, to) = if i % 2 == 0 { (A, B) } else { (B, A) };
                bus.relocate(from, to).expect("move refused");
                // Two cores are shared by everything here: give the readers a turn now and then.
                if i % 64 == 0 {
                    thread::yield_now();
                }
            }
        })
    };
    mover.join().expect("mover panicked");
    stop.store(true, Ordering::Relaxed);
    let tallies: Vec<Tally> = readers
        .into_iter()
        .map(|r| r.join().expect("a reader panicked"))
        .collect();

    let sum = |f: fn(&Tally) -> u64| tallies.iter().map(f).sum::<u64>();
    let hits = sum(|t| t.both_hits) + sum(|t| t.only_a_hits);
    // Every successful access landed on the device, and nothing else touched it.
    assert_eq!(reads.load(Ordering::Relaxed), hits);
    assert!(sum(|t| t.both_hits) > 0);
    // Both mappings were seen (MOVES is even: it ends back at A).
    assert!(
        sum(|t| t.at_a) > 0 && sum(|t| t.at_b) > 0,
        "at A {}, at B {}",
        sum(|t| t.at_a),
        sum(|t| t.at_b)
    );
    // No device lost: after the last move it answers at A, and the neighbour still at its place.
    let mut data = [0u8; 1];
    bus.read(ONLY_A, &mut data).unwrap();
    assert_eq!(data, [0x10]);
    bus.read(A + 2 * LEN, &mut data).unwrap();
    assert_eq!(bus.relocate(B, A), Err(BusError::NoDevice(B)));
}

/// A device that moves itself to the base a guest writes to it (as a BAR write does).
struct SelfMover {
    bus: Bus,
    base: u64,
}

impl BusDevice for SelfMover {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.copy_from_slice(&self.base.to_le_bytes()[..data.len().min(8)]);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> VcpuAction {
        let Ok(bytes) = <[u8; 8]>::try_from(data) else {
            return VcpuAction::Continue;
        };
        let new = u64::from_le_bytes(bytes);
        if self.bus.relocate(self.base, new).is_ok() {
            self.base = new;
        }
        VcpuAction::Continue
    }
}

#[test]
fn a_device_write_that_moves_the_device_does_not_deadlock() {
    let (done_tx, done_rx) = mpsc::channel();
    // On its own thread so that a deadlock fails the test instead of hanging it.
    thread::spawn(move || {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(SelfMover {
            bus: bus.clone(),
            base: 0x1000,
        }));
        bus.insert(dev, 0x1000, 8).unwrap();
        bus.write(0x1000, &0x2000u64.to_le_bytes()).unwrap();
        let mut data = [0u8; 8];
        bus.read(0x2000, &mut data).unwrap();
        let moved = u64::from_le_bytes(data);
        let old = bus.read(0x1000, &mut data);
        // And again through a clone, as another vCPU would.
        bus.clone().write(0x2000, &0x3000u64.to_le_bytes()).unwrap();
        bus.read(0x3000, &mut data).unwrap();
        let _ = done_tx.send((moved, old, u64::from_le_bytes(data)));
    });
    let (moved, old, again) = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a device's write that moves the device deadlocked (or panicked)");
    assert_eq!(moved, 0x2000);
    assert_eq!(old, Err(BusError::NoDevice(0x1000)));
    assert_eq!(again, 0x3000);
}

#[test]
fn changes_from_several_threads_at_once_are_all_kept() {
    const PER_THREAD: u64 = 300;
    let bus = Bus::new();
    let writers: Vec<_> = (0..2u64)
        .map(|t| {
            let mut bus = bus.clone();
            thread::spawn(move || {
                for i in 0..PER_THREAD {
                    let dev = Arc::new(Mutex::new(Counter {
                        reads: Arc::new(AtomicU64::new(0)),
                    }));
                    // Interleaved bases: each change is built on a map the other just changed.
                    let base = (2 * i + t) * 0x10;
                    bus.insert(dev, base, 0x10).expect("distinct ranges");
                    if i % 2 == 1 {
                        bus.relocate(base, base + 0x10_0000).expect("free target");
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("a writer panicked");
    }
    // Every insert and every move survived: none was built on a map another change replaced.
    let mut data = [0u8; 1];
    for t in 0..2u64 {
        for i in 0..PER_THREAD {
            let base = (2 * i + t) * 0x10;
            let at = if i % 2 == 1 { base + 0x10_0000 } else { base };
            bus.read(at, &mut data)
                .unwrap_or_else(|e| panic!("range {i} of thread {t} lost: {e}"));
        }
    }
}
