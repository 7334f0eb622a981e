//! KVM_EXIT_DIRTY_RING_FULL, as each vCPU's `ExitHandler`: collect every ring (as the reaper
//! does) and re-enter. If nothing can be collected again and again, the ring has overflowed in
//! the host kernel: stop with the reason rather than spin.

use std::sync::Arc;

use super::DirtyRings;
use crate::sys::SysError;
use crate::vstate::exits::{ExitHandler, Outcome};

/// Consecutive ring-full exits with nothing to collect before the vCPU gives up: the host
/// kernel pushed past the ring's end (PLATFORM.md §5) and re-entering would livelock.
const RING_FULL_LIVELOCK: u32 = 1000;

/// What a ring-full exit needs of the rings (a trait so the counting is testable without KVM).
pub trait RingCollect: Send + Sync {
    /// Takes every dirty entry of every ring; returns how many.
    fn collect(&self) -> Result<u64, SysError>;
    fn note_full_exit(&self);
}

impl RingCollect for DirtyRings {
    fn collect(&self) -> Result<u64, SysError> {
        DirtyRings::collect(self)
    }

    fn note_full_exit(&self) {
        DirtyRings::note_full_exit(self)
    }
}

/// One vCPU's ring-full exits.
pub struct RingFullExits<R: ?Sized = DirtyRings> {
    rings: Arc<R>,
    /// Ring-full exits in a row that found nothing to collect.
    streak: u32,
}

impl<R: RingCollect + ?Sized> RingFullExits<R> {
    pub fn new(rings: Arc<R>) -> RingFullExits<R> {
        RingFullExits { rings, streak: 0 }
    }
}

impl<R: RingCollect + ?Sized> ExitHandler for RingFullExits<R> {
    fn ring_full(&mut self) -> Outcome {
        self.rings.note_full_exit();
        match self.rings.collect() {
            Ok(0) => {
                self.streak += 1;
                if self.streak >= RING_FULL_LIVELOCK {
                    return Outcome::Stop(format!(
                        "dirty ring full {} times in a row with nothing to collect: the host \
                         kernel overflowed the ring (see PLATFORM.md §5, check dmesg for a WARN \
                         in kvm_dirty_ring_push)",
                        self.streak
                    ));
                }
                std::thread::yield_now();
                Outcome::Resume
            }
            Ok(_) => {
                self.streak = 0;
                Outcome::Resume
            }
            Err(e) => Outcome::Stop(format!(
                "collecting the dirty rings on a ring-full exit failed: {e}"
            )),
        }
    }

    fn progress(&mut self) {
        self.streak = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    use super::*;

    /// Collects what `next` says, once per call (then nothing).
    #[derive(Default)]
    struct Rings {
        next: Mutex<Vec<Result<u64, SysError>>>,
        full: AtomicU64,
    }

    impl RingCollect for Rings {
        fn collect(&self) -> Result<u64, SysError> {
            self.next.lock().unwrap().pop().unwrap_or(Ok(0))
        }
        fn note_full_exit(&self) {
            self.full.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn full_until_stopped(h: &mut RingFullExits<Rings>) -> (u32, Outcome) {
        for n in 1..=RING_FULL_LIVELOCK {
            match h.ring_full() {
                Outcome::Resume => {}
                other => return (n, other),
            }
        }
        (RING_FULL_LIVELOCK + 1, Outcome::Resume)
    }

    #[test]
    fn an_overflowed_ring_stops_the_vcpu_after_the_livelock_limit_in_a_row() {
        let rings = Arc::new(Rings::default());
        let mut h = RingFullExits::new(rings.clone());
        let (n, why) = full_until_stopped(&mut h);
        assert_eq!(n, RING_FULL_LIVELOCK);
        assert!(
            matches!(&why, Outcome::Stop(m) if m.starts_with("dirty ring full 1000 times in a row")),
            "{why:?}"
        );
        assert_eq!(
            rings.full.load(Ordering::Relaxed),
            RING_FULL_LIVELOCK as u64
        );
    }

    #[test]
    fn a_collection_or_another_exit_restarts_the_count() {
        let rings = Arc::new(Rings::default());
        let mut h = RingFullExits::new(rings.clone());
        for _ in 0..RING_FULL_LIVELOCK - 1 {
            assert_eq!(h.ring_full(), Outcome::Resume);
        }
        h.progress();
        assert_eq!(full_until_stopped(&mut h).0, RING_FULL_LIVELOCK);

        let mut h = RingFullExits::new(rings.clone());
        for _ in 0..RING_FULL_LIVELOCK - 1 {
            assert_eq!(h.ring_full(), Outcome::Resume);
        }
        rings.next.lock().unwrap().push(Ok(5));
        assert_eq!(h.ring_full(), Outcome::Resume, "entries were collected");
        assert_eq!(full_until_stopped(&mut h).0, RING_FULL_LIVELOCK);
    }

    #[test]
    fn a_failed_collection_stops_the_vcpu_with_the_error() {
        let rings = Arc::new(Rings::default());
        rings.next.lock().unwrap().push(Err(SysError::Os {
            op: "KVM_RESET_DIRTY_RINGS",
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        }));
        let why = RingFullExits::new(rings).ring_full();
        assert!(
            matches!(&why, Outcome::Stop(m) if m.starts_with("collecting the dirty rings on a ring-full exit failed: ")
                && m.contains("KVM_RESET_DIRTY_RINGS")),
            "{why:?}"
        );
    }
}
