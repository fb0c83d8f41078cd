//! Deploy analysis: is the new version worse than the old one? A pure judgement over counters the proxy keeps per
//! server (every try, retried ones included), with no I/O.

use std::time::Duration;

/// Counters of a set of servers: tries, failed tries (5xx, timeouts, resets) and a latency histogram.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub requests: u64,
    pub failed: u64,
    /// (upper bound in seconds, count) per bucket, rising; the last bound is infinite.
    pub buckets: Vec<(f64, u64)>,
}

impl Sample {
    /// Adds another sample (another server's counters).
    pub fn add(&mut self, other: &Sample) {
        self.requests += other.requests;
        self.failed += other.failed;
        if self.buckets.is_empty() {
            self.buckets = other.buckets.clone();
        } else {
            for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
                mine.1 += theirs.1;
            }
        }
    }

    /// What happened since `earlier` (counters only grow).
    pub fn since(&self, earlier: &Sample) -> Sample {
        let mut buckets = self.buckets.clone();
        for (b, e) in buckets.iter_mut().zip(&earlier.buckets) {
            b.1 = b.1.saturating_sub(e.1);
        }
        Sample {
            requests: self.requests.saturating_sub(earlier.requests),
            failed: self.failed.saturating_sub(earlier.failed),
            buckets,
        }
    }

    /// Share of failed tries, percent.
    pub fn error_percent(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            100.0 * self.failed as f64 / self.requests as f64
        }
    }

    /// The 99th percentile's bucket bound (a conservative estimate); `None` without samples.
    pub fn p99(&self) -> Option<Duration> {
        let total: u64 = self.buckets.iter().map(|b| b.1).sum();
        if total == 0 {
            return None;
        }
        let rank = (total * 99).div_ceil(100);
        let mut seen = 0;
        for &(bound, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                let bound = if bound.is_finite() { bound } else { 60.0 };
                return Some(Duration::from_secs_f64(bound));
            }
        }
        None
    }
}

/// When the new version counts as worse.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub error_rate_margin_percent: u32,
    pub p99_max_percent: u32,
    pub p99_slack: Duration,
    pub requests_min: u32,
}

impl Thresholds {
    pub fn of(app: &nonstop_config::App) -> Thresholds {
        Thresholds {
            error_rate_margin_percent: app.error_rate_margin_percent,
            p99_max_percent: app.p99_max_percent,
            p99_slack: app.p99_slack,
            requests_min: app.analysis_requests_min,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Too few requests to judge yet.
    Wait,
    Pass,
    Fail(String),
}

/// Compares the new version's sample with the old one's.
pub fn judge(old: &Sample, new: &Sample, t: &Thresholds) -> Verdict {
    if new.requests < u64::from(t.requests_min) {
        return Verdict::Wait;
    }
    let (old_err, new_err) = (old.error_percent(), new.error_percent());
    if new_err > old_err + f64::from(t.error_rate_margin_percent) && significantly_more_failures(old, new) {
        return Verdict::Fail(format!(
            "error rate {new_err:.1}% ({} of {} tries failed) against {old_err:.1}% for the old version (margin {} points)",
            new.failed, new.requests, t.error_rate_margin_percent
        ));
    }
    if old.requests >= u64::from(t.requests_min) {
        if let (Some(old_p99), Some(new_p99)) = (old.p99(), new.p99()) {
            let limit = (old_p99 * t.p99_max_percent / 100).max(old_p99 + t.p99_slack);
            if new_p99 > limit {
                return Verdict::Fail(format!(
                    "p99 latency {} ms against {} ms for the old version (limit {} ms)",
                    new_p99.as_millis(),
                    old_p99.as_millis(),
                    limit.as_millis()
                ));
            }
        }
    }
    Verdict::Pass
}

/// How many standard errors apart two failure rates must be to count as different (about 1 in 740 by chance).
const Z_MIN: f64 = 3.0;

/// A two-proportion z-test: does the new version fail more often than the old one beyond chance? A handful of
/// unlucky requests on a busy machine is not a regression.
fn significantly_more_failures(old: &Sample, new: &Sample) -> bool {
    if old.requests == 0 {
        return true;
    }
    let (n0, n1) = (old.requests as f64, new.requests as f64);
    let (p0, p1) = (old.failed as f64 / n0, new.failed as f64 / n1);
    let pooled = (old.failed + new.failed) as f64 / (n0 + n1);
    let se = (pooled * (1.0 - pooled) * (1.0 / n0 + 1.0 / n1)).sqrt();
    if se == 0.0 {
        return p1 > p0;
    }
    (p1 - p0) / se >= Z_MIN
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: [f64; 4] = [0.001, 0.01, 0.1, f64::INFINITY];

    fn sample(requests: u64, failed: u64, per_bucket: [u64; 4]) -> Sample {
        Sample { requests, failed, buckets: BOUNDS.iter().copied().zip(per_bucket).collect() }
    }

    fn t() -> Thresholds {
        Thresholds {
            error_rate_margin_percent: 2,
            p99_max_percent: 300,
            p99_slack: Duration::from_millis(50),
            requests_min: 20,
        }
    }

    #[test]
    fn waits_for_enough_requests() {
        assert_eq!(judge(&sample(100, 0, [100, 0, 0, 0]), &sample(19, 19, [19, 0, 0, 0]), &t()), Verdict::Wait);
    }

    #[test]
    fn fails_on_an_error_rate_past_the_margin() {
        let old = sample(1000, 10, [1000, 0, 0, 0]);
        assert_eq!(judge(&old, &sample(100, 2, [100, 0, 0, 0]), &t()), Verdict::Pass, "2% within 1% + 2");
        match judge(&old, &sample(100, 30, [100, 0, 0, 0]), &t()) {
            Verdict::Fail(why) => assert!(why.starts_with("error rate 30.0%"), "{why}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn a_few_unlucky_requests_are_not_a_regression() {
        // 12 of 35 against 23%: past the margin, but well within chance.
        let old = sample(1000, 229, [1000, 0, 0, 0]);
        assert_eq!(judge(&old, &sample(35, 12, [35, 0, 0, 0]), &t()), Verdict::Pass);
        // The same share over many requests is a regression.
        assert!(matches!(judge(&old, &sample(3500, 1200, [3500, 0, 0, 0]), &t()), Verdict::Fail(_)));
    }

    #[test]
    fn fails_on_p99_past_ratio_and_slack() {
        let old = sample(1000, 0, [990, 10, 0, 0]); // p99 bound 1 ms
        assert_eq!(judge(&old, &sample(100, 0, [0, 100, 0, 0]), &t()), Verdict::Pass, "10 ms < 1 ms + 50 ms");
        assert!(matches!(judge(&old, &sample(100, 0, [0, 0, 0, 100]), &t()), Verdict::Fail(_)));
        // Without enough old requests, latency is not judged.
        assert_eq!(judge(&sample(5, 0, [5, 0, 0, 0]), &sample(100, 0, [0, 0, 0, 100]), &t()), Verdict::Pass);
    }

    #[test]
    fn samples_subtract_and_add() {
        let a = sample(10, 1, [5, 5, 0, 0]);
        let b = sample(30, 4, [10, 15, 5, 0]);
        assert_eq!(b.since(&a), sample(20, 3, [5, 10, 5, 0]));
        let mut s = Sample::default();
        s.add(&a);
        s.add(&a);
        assert_eq!(s, sample(20, 2, [10, 10, 0, 0]));
        assert_eq!(sample(100, 0, [98, 1, 1, 0]).p99(), Some(Duration::from_secs_f64(0.01)));
    }
}
