//! The bus's hot path (resolve + read, what every PIO/MMIO exit takes), through the bus as it
//! was before it could change at run time (a frozen `Arc<BTreeMap>`, copied below) and through
//! today's [`devices::Bus`] (an `arc-swap` snapshot), and through the `RwLock` design it was
//! chosen over. Prints the median of several runs of each,
//! run alternately, and their ratio.
//!
//! `cargo bench -p devices --bench bus [-- RUNS ITERS]`. Hand-timed with `Instant` rather than
//! criterion: one figure per bus is all this needs, and criterion is not in the tree.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use devices::bus::{Bus, BusDevice, VcpuAction};

struct Dev;

impl BusDevice for Dev {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) -> VcpuAction {
        VcpuAction::Continue
    }
}

/// Base -> (length, device), as both reference buses below keep it.
type Ranges = BTreeMap<u64, (u64, Arc<Mutex<dyn BusDevice>>)>;

/// The bus before run-time changes, reduced to what the hot path ran.
#[derive(Clone, Default)]
struct FrozenBus {
    ranges: Arc<Ranges>,
}

impl FrozenBus {
    fn insert(&mut self, dev: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) {
        Arc::make_mut(&mut self.ranges).insert(base, (len, dev));
    }

    fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), ()> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back().ok_or(())?;
        let offset = addr - base;
        let fits = u64::try_from(data.len())
            .ok()
            .and_then(|l| offset.checked_add(l))
            .is_some_and(|end| end <= *len);
        if offset >= *len || !fits {
            return Err(());
        }
        dev.lock().map_err(|_| ())?.read(offset, data);
        Ok(())
    }
}

/// The other design the issue named: one map behind an `RwLock`, shared by every clone. The
/// device is cloned out so the lock is not held while it runs (a device may change the bus).
#[derive(Clone, Default)]
struct LockedBus {
    ranges: Arc<RwLock<Ranges>>,
}

impl LockedBus {
    fn insert(&self, dev: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) {
        if let Ok(mut r) = self.ranges.write() {
            r.insert(base, (len, dev));
        }
    }

    fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), ()> {
        let (offset, dev) = {
            let ranges = self.ranges.read().map_err(|_| ())?;
            let (&base, (len, dev)) = ranges.range(..=addr).next_back().ok_or(())?;
            let offset = addr - base;
            let fits = u64::try_from(data.len())
                .ok()
                .and_then(|l| offset.checked_add(l))
                .is_some_and(|end| end <= *len);
            if offset >= *len || !fits {
                return Err(());
            }
            (offset, dev.clone())
        };
        dev.lock().map_err(|_| ())?.read(offset, data);
        Ok(())
    }
}

/// The port I/O map the VMM builds (COM1-4, i8042, boot ports, and so on).
const PORTS: [(u64, u64); 8] = [
    (0x20, 2),
    (0x40, 4),
    (0x60, 5),
    (0x70, 2),
    (0x2f8, 8),
    (0x3e8, 8),
    (0x3f8, 8),
    (0x510, 2),
];
const ADDR: u64 = 0x3fd;

fn time(iters: u64, threads: usize, read: impl Fn(u64, &mut [u8]) + Sync) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let read = &read;
            s.spawn(move || {
                // Each thread on its own device, as vCPUs mostly are.
                let addr = if t == 0 { ADDR } else { 0x2f8 };
                let mut data = [0u8; 1];
                for _ in 0..iters {
                    read(black_box(addr), &mut data);
                    black_box(&data);
                }
            });
        }
    });
    start.elapsed().as_nanos() as f64 / iters as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; numbers after it are ours.
    let nums: Vec<u64> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    let runs = nums.first().copied().unwrap_or(7).max(1) as usize;
    let iters = nums.get(1).copied().unwrap_or(2_000_000).max(1);

    let mut frozen = FrozenBus::default();
    let locked = LockedBus::default();
    let mut bus = Bus::new();
    for (base, len) in PORTS {
        frozen.insert(Arc::new(Mutex::new(Dev)), base, len);
        locked.insert(Arc::new(Mutex::new(Dev)), base, len);
        bus.insert(Arc::new(Mutex::new(Dev)), base, len)
            .expect("the ports do not overlap");
    }

    // The figures are user-space only, but say where they were taken (PLATFORM.md): the PVM
    // development machines share their cores with everything else on them.
    let host = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "a PVM host"
    } else {
        "not a PVM host"
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "bus hot path on {host} ({cpus} CPUs): 1-byte read at {ADDR:#x} among {} devices, \
         {iters} reads a run per thread, median of {runs} runs",
        PORTS.len()
    );
    for threads in [1, 2] {
        let (mut old, mut new, mut rw) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            old.push(time(iters, threads, |a, d| {
                let _ = frozen.read(a, d);
            }));
            new.push(time(iters, threads, |a, d| {
                let _ = bus.read(a, d);
            }));
            rw.push(time(iters, threads, |a, d| {
                let _ = locked.read(a, d);
            }));
        }
        let (old, new, rw) = (median(old), median(new), median(rw));
        println!(
            "{threads} thread(s), ns per read per thread: frozen Arc<BTreeMap> (old) {old:.1}, \
             arc-swap Bus (new) {new:.1}, RwLock<BTreeMap> {rw:.1}; ratio new/old {:.2}, \
             RwLock/old {:.2}",
            new / old,
            rw / old
        );
    }
}
