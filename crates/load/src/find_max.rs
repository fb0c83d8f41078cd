//! `--find-max`: the highest arrival rate at which a step still meets its bounds (p99, error rate, and a valid run).
//! The search is a pure state machine, unit-tested without running load: double the rate until a step fails,
//! then bisect between the last pass and the first failure until they are within 5% of each other.

/// Steps at most, whatever the bounds.
pub const STEPS_MAX: usize = 12;
/// The search ends when the failing rate is within this factor of the passing one.
pub const PRECISION: f64 = 1.05;

#[derive(Debug, Clone)]
pub struct Search {
    pass: Option<f64>,
    fail: Option<f64>,
    next: f64,
    limit: f64,
    steps: usize,
}

impl Search {
    pub fn new(start: f64, limit: f64) -> Search {
        Search { pass: None, fail: None, next: start.min(limit), limit, steps: 0 }
    }

    /// The rate to try now, or `None` when the search is over.
    pub fn rate(&self) -> Option<f64> {
        let done = self.steps >= STEPS_MAX
            || matches!((self.pass, self.fail), (Some(p), Some(f)) if f <= p * PRECISION)
            || (self.pass.is_some_and(|p| p >= self.limit))
            || (self.fail.is_some_and(|f| f <= 1.0));
        (!done).then_some(self.next)
    }

    /// Records whether the current rate met the bounds.
    pub fn record(&mut self, passed: bool) {
        let r = self.next;
        self.steps += 1;
        if passed {
            self.pass = Some(self.pass.map_or(r, |p: f64| p.max(r)));
        } else {
            self.fail = Some(self.fail.map_or(r, |f: f64| f.min(r)));
        }
        self.next = match (self.pass, self.fail) {
            (Some(p), None) => (p * 2.0).min(self.limit),
            (None, Some(f)) => (f / 2.0).max(1.0),
            (Some(p), Some(f)) => ((p + f) / 2.0).round(),
            (None, None) => r,
        };
    }

    /// The highest rate that met the bounds.
    pub fn best(&self) -> Option<f64> {
        self.pass
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the search against a target whose capacity is `capacity` requests/s.
    fn against(capacity: f64, start: f64) -> (Option<f64>, usize) {
        let mut s = Search::new(start, 1e6);
        while let Some(r) = s.rate() {
            s.record(r <= capacity);
        }
        (s.best(), s.steps)
    }

    #[test]
    fn finds_the_capacity_within_precision_and_bounded_steps() {
        for capacity in [150.0, 1234.0, 9000.0, 47_000.0] {
            let (best, steps) = against(capacity, 100.0);
            let best = best.unwrap();
            assert!(best <= capacity && best * PRECISION >= capacity * 0.999, "capacity {capacity}: found {best}");
            assert!(steps <= STEPS_MAX);
        }
    }

    #[test]
    fn a_target_below_the_start_rate_is_searched_downwards() {
        let (best, _) = against(30.0, 100.0);
        assert!(best.unwrap() <= 30.0 && best.unwrap() >= 25.0, "{best:?}");
        assert_eq!(against(0.5, 100.0).0, None, "nothing passes");
    }
}
