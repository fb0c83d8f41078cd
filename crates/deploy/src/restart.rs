//! Restart back-off of a supervised instance: a pure state machine with `now` passed in.

use std::time::{Duration, Instant};

/// An instance that ran at least this long before it crashed starts its back-off over.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    /// Crashes in a row.
    streak: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max, streak: 0 }
    }

    /// The instance, started at `started`, exited at `now`: how long to wait before starting it again.
    pub fn on_exit(&mut self, started: Instant, now: Instant) -> Duration {
        if now.saturating_duration_since(started) >= STABLE_AFTER {
            self.streak = 0;
        }
        let delay = self.base.saturating_mul(1u32 << self.streak.min(20)).min(self.max);
        self.streak = self.streak.saturating_add(1);
        delay
    }

    pub fn streak(&self) -> u32 {
        self.streak
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_max_and_resets_after_a_stable_run() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(3));
        let t0 = Instant::now();
        let quick = |b: &mut Backoff| b.on_exit(t0, t0 + Duration::from_millis(100)).as_millis();
        assert_eq!([quick(&mut b), quick(&mut b), quick(&mut b), quick(&mut b)], [500, 1000, 2000, 3000]);
        assert_eq!(b.on_exit(t0, t0 + STABLE_AFTER).as_millis(), 500);
        assert_eq!(b.streak(), 1);
    }
}
