//! The open model's arrival schedule: when the n-th request is due, for a constant rate or for stages that ramp
//! linearly from one rate to the next (a pure function of `n`, unit-tested without clocks).

use std::time::Duration;

/// One stage: over `duration`, the rate moves linearly from the previous stage's end rate to `rate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    pub duration: Duration,
    /// Requests per second at the end of the stage.
    pub rate: f64,
}

/// Why a stage list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StageError {
    #[error("stage {0:?}: expected DURATION:RATE, such as 10s:100")]
    Syntax(String),
    #[error("stage {0:?}: bad duration (use ms, s or m, such as 500ms, 30s, 2m)")]
    Duration(String),
    #[error("stage {0:?}: the rate must be a number of requests per second, 0 or more")]
    Rate(String),
    #[error("no stages")]
    Empty,
}

/// Parses a duration such as `500ms`, `30s`, `2m`, or a bare number of seconds.
pub fn parse_duration(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    let (num, unit) = match raw.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => raw.split_at(i),
        None => (raw, "s"),
    };
    let v: f64 = num.parse().ok().filter(|v: &f64| v.is_finite() && *v >= 0.0)?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// Parses `10s:100,30s:1000,10s:0`. The first stage ramps from 0.
pub fn parse_stages(raw: &str) -> Result<Vec<Stage>, StageError> {
    let mut out = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (d, r) = part.split_once(':').ok_or_else(|| StageError::Syntax(part.into()))?;
        let duration = parse_duration(d).ok_or_else(|| StageError::Duration(part.into()))?;
        let rate: f64 = r
            .trim()
            .parse()
            .ok()
            .filter(|r: &f64| r.is_finite() && *r >= 0.0)
            .ok_or_else(|| StageError::Rate(part.into()))?;
        out.push(Stage { duration, rate });
    }
    if out.is_empty() {
        return Err(StageError::Empty);
    }
    Ok(out)
}

/// The arrival schedule of a run.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// (start second, length seconds, rate at start, rate at end, requests before this stage)
    segments: Vec<(f64, f64, f64, f64, f64)>,
    total_secs: f64,
    total_requests: f64,
}

impl Schedule {
    /// A constant `rate` for `duration`.
    pub fn constant(rate: f64, duration: Duration) -> Schedule {
        Schedule::build(rate, &[Stage { duration, rate }])
    }

    /// Stages ramping from 0.
    pub fn stages(stages: &[Stage]) -> Schedule {
        Schedule::build(0.0, stages)
    }

    fn build(start_rate: f64, stages: &[Stage]) -> Schedule {
        let (mut t, mut prev, mut before) = (0.0, start_rate, 0.0);
        let mut segments = Vec::new();
        for s in stages {
            let len = s.duration.as_secs_f64();
            segments.push((t, len, prev, s.rate, before));
            before += len * (prev + s.rate) / 2.0;
            t += len;
            prev = s.rate;
        }
        Schedule { segments, total_secs: t, total_requests: before }
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.total_secs)
    }

    /// How many requests the whole schedule holds.
    pub fn total(&self) -> u64 {
        // A request is due at the instant the cumulative count reaches n + 1 (the first at 1/rate, not at 0);
        // tiny floating error must not add or drop one.
        (self.total_requests + 1e-9).floor() as u64
    }

    /// The target rate at `t` into the run.
    pub fn rate_at(&self, t: Duration) -> f64 {
        let t = t.as_secs_f64();
        for &(start, len, r0, r1, _) in &self.segments {
            if t < start + len {
                return r0 + (r1 - r0) * ((t - start) / len.max(f64::MIN_POSITIVE));
            }
        }
        self.segments.last().map_or(0.0, |s| s.3)
    }

    /// When request `n` (from 0) is due, or `None` past the schedule. Request n is due when the cumulative
    /// arrivals reach n + 1, found by inverting the (piecewise quadratic) cumulative count.
    pub fn due(&self, n: u64) -> Option<Duration> {
        let target = n as f64 + 1.0;
        if target > self.total_requests + 1e-9 {
            return None;
        }
        for &(start, len, r0, r1, before) in &self.segments {
            let in_stage = len * (r0 + r1) / 2.0;
            if target <= before + in_stage + 1e-9 {
                let k = target - before; // arrivals needed within this stage
                let a = (r1 - r0) / (2.0 * len.max(f64::MIN_POSITIVE)); // count(x) = r0 x + a x^2
                let x =
                    if a.abs() < 1e-12 { k / r0 } else { (-r0 + (r0 * r0 + 4.0 * a * k).max(0.0).sqrt()) / (2.0 * a) };
                return Some(Duration::from_secs_f64(start + x.clamp(0.0, len)));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(d: Option<Duration>) -> f64 {
        d.unwrap().as_secs_f64()
    }

    #[test]
    fn constant_rate_is_evenly_spaced() {
        let s = Schedule::constant(100.0, Duration::from_secs(2));
        assert_eq!(s.total(), 200);
        assert!((secs(s.due(0)) - 0.01).abs() < 1e-9);
        assert!((secs(s.due(99)) - 1.0).abs() < 1e-9);
        assert!((secs(s.due(199)) - 2.0).abs() < 1e-9);
        assert_eq!(s.due(200), None);
    }

    #[test]
    fn ramps_follow_the_area_under_the_rate() {
        // 0 -> 100 over 10 s is 500 requests; then 100 for 10 s is 1000; then 100 -> 0 over 10 s is 500.
        let s = Schedule::stages(&parse_stages("10s:100,10s:100,10s:0").unwrap());
        assert_eq!(s.total(), 2000);
        // Half the ramp's requests arrive in its last 29% (sqrt(0.5) of the way in).
        assert!((secs(s.due(249)) - 10.0 * 0.5f64.sqrt()).abs() < 1e-6);
        assert!((secs(s.due(499)) - 10.0).abs() < 1e-6);
        assert!((secs(s.due(1499)) - 20.0).abs() < 1e-6);
        assert!((secs(s.due(1999)) - 30.0).abs() < 1e-6);
        let mut last = 0.0;
        for n in 0..2000 {
            let t = secs(s.due(n));
            assert!(t >= last, "not monotonic at {n}");
            last = t;
        }
        assert!((s.rate_at(Duration::from_secs(5)) - 50.0).abs() < 1e-9);
    }

    #[test]
    fn parses_stages_and_durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration("3x"), None);
        assert!(matches!(parse_stages("10s"), Err(StageError::Syntax(_))));
        assert!(matches!(parse_stages("10q:5"), Err(StageError::Duration(_))));
        assert!(matches!(parse_stages("10s:-5"), Err(StageError::Rate(_))));
        assert_eq!(parse_stages(""), Err(StageError::Empty));
    }
}
