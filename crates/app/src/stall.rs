//! The periodic stall schedule (`--stall-every-ms`, `--stall-ms`): a pure function of time since start.

use std::time::Duration;

/// A repeating stall window: during the first `stall` of every `every`, all workers are frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallSchedule {
    pub every: Duration,
    pub stall: Duration,
}

impl StallSchedule {
    /// How long a worker that starts work `elapsed` after start-up must wait before it may proceed.
    /// The first window starts one full period after start-up, so a fresh instance answers at once.
    pub fn remaining(&self, elapsed: Duration) -> Duration {
        let every = self.every.as_nanos();
        if every == 0 || self.stall.is_zero() || elapsed < self.every {
            return Duration::ZERO;
        }
        let into = elapsed.as_nanos() % every;
        let stall = self.stall.as_nanos().min(every);
        if into < stall {
            Duration::from_nanos((stall - into) as u64)
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn stalls_at_the_start_of_each_period_after_the_first() {
        let s = StallSchedule { every: ms(5000), stall: ms(1000) };
        assert_eq!(s.remaining(ms(0)), ms(0));
        assert_eq!(s.remaining(ms(4999)), ms(0));
        assert_eq!(s.remaining(ms(5000)), ms(1000));
        assert_eq!(s.remaining(ms(5400)), ms(600));
        assert_eq!(s.remaining(ms(6000)), ms(0));
        assert_eq!(s.remaining(ms(10_250)), ms(750));
    }

    #[test]
    fn disabled_when_zero() {
        assert_eq!(StallSchedule { every: ms(0), stall: ms(10) }.remaining(ms(99)), ms(0));
        assert_eq!(StallSchedule { every: ms(10), stall: ms(0) }.remaining(ms(99)), ms(0));
    }

    #[test]
    fn stall_longer_than_period_is_capped() {
        let s = StallSchedule { every: ms(100), stall: ms(500) };
        assert_eq!(s.remaining(ms(150)), ms(50));
    }
}
