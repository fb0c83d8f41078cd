//! Latency estimates of one server: peak-EWMA (jumps up to a slow sample at once, decays toward fast samples over
//! time, `now` passed in) for balancing, and a plain per-sample mean for queue-wait estimates.

use std::time::{Duration, Instant};

/// How quickly old latency is forgotten.
pub const DECAY: Duration = Duration::from_secs(10);
/// Weight of one sample in the plain mean.
const MEAN_ALPHA: f64 = 0.05;

#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    /// Current estimate in nanoseconds.
    estimate_ns: f64,
    updated: Instant,
    /// Plain exponentially weighted mean of the samples, nanoseconds.
    mean_ns: f64,
}

impl PeakEwma {
    /// A new estimate, starting at `initial` so that untried servers are neither favoured nor avoided.
    pub fn new(now: Instant, initial: Duration) -> PeakEwma {
        PeakEwma { estimate_ns: initial.as_nanos() as f64, updated: now, mean_ns: initial.as_nanos() as f64 }
    }

    /// Records one observed latency.
    pub fn observe(&mut self, now: Instant, rtt: Duration) {
        // (Through f64 seconds: a u128 of nanoseconds converts to f64 by a slow library call.)
        let rtt = rtt.as_secs_f64() * 1e9;
        self.mean_ns += (rtt - self.mean_ns) * MEAN_ALPHA;
        if rtt > self.estimate_ns {
            self.estimate_ns = rtt;
        } else {
            let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            self.estimate_ns = self.estimate_ns * w + rtt * (1.0 - w);
        }
        self.updated = now;
    }

    /// The estimate in nanoseconds.
    pub fn estimate_ns(&self) -> f64 {
        self.estimate_ns
    }

    /// The plain mean in nanoseconds: a spike moves it by a twentieth only.
    pub fn mean_ns(&self) -> f64 {
        self.mean_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_at_once_and_decays_over_time() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0, Duration::from_millis(1));
        e.observe(t0, Duration::from_millis(100));
        assert_eq!(e.estimate_ns(), 100e6, "a slow sample is taken at once");
        e.observe(t0 + Duration::from_millis(1), Duration::from_millis(1));
        assert!(e.estimate_ns() > 99e6, "one fast sample right after barely moves it");
        e.observe(t0 + Duration::from_secs(60), Duration::from_millis(1));
        assert!(e.estimate_ns() < 2e6, "after a long quiet time fast samples dominate: {}", e.estimate_ns());
        let mut m = PeakEwma::new(t0, Duration::from_millis(10));
        m.observe(t0, Duration::from_millis(210));
        assert!((m.mean_ns() - 20e6).abs() < 1.0, "one spike moves the mean by a twentieth: {}", m.mean_ns());
    }
}
