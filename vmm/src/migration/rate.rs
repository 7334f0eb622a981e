//! The bandwidth cap: a sender sleeps whenever it is ahead of `bytes_per_s`.

use std::time::{Duration, Instant};

pub struct RateLimiter {
    bytes_per_s: Option<u64>,
    start: Instant,
    sent: u64,
}

impl RateLimiter {
    /// `None` or 0: unlimited.
    pub fn new(bytes_per_s: Option<u64>) -> Self {
        RateLimiter {
            bytes_per_s: bytes_per_s.filter(|&b| b > 0),
            start: Instant::now(),
            sent: 0,
        }
    }

    /// Accounts `bytes` and sleeps until the average rate is back under the cap.
    pub fn account(&mut self, bytes: u64) {
        self.sent += bytes;
        if let Some(rate) = self.bytes_per_s {
            let due = Duration::from_secs_f64(self.sent as f64 / rate as f64);
            let elapsed = self.start.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_holds_the_average_rate() {
        // 1 MiB at 10 MiB/s must take at least 100 ms; unlimited takes none of that.
        let mut r = RateLimiter::new(Some(10 << 20));
        let t = Instant::now();
        for _ in 0..16 {
            r.account(64 << 10);
        }
        // A sleep lasts at least as long as asked: this bound cannot flake on a busy machine.
        assert!(t.elapsed() >= Duration::from_millis(95));
    }
}
