//! Pass/fail thresholds on a run's summary, such as `p99<50ms`, `failed==0` or `rate>=990`.

use crate::ledger::Summary;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
}

/// One parsed threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    raw: String,
    metric: String,
    op: Op,
    value: f64,
}

const METRICS: &str = "p50, p90, p99, p999, max (ms), failed, ok, not_sent, errors (connect+reset+timeout+check), \
                       error_rate (% failed), rate (achieved requests/s), max_success_gap (ms)";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("threshold {0:?}: {1}")]
pub struct ThresholdError(String, String);

impl Threshold {
    pub fn parse(raw: &str) -> Result<Threshold, ThresholdError> {
        let bad = |why: &str| ThresholdError(raw.to_string(), why.to_string());
        let ops = [("<=", Op::Le), (">=", Op::Ge), ("==", Op::Eq), ("<", Op::Lt), (">", Op::Gt)];
        let (at, sym, op) = ops
            .iter()
            .filter_map(|(sym, op)| raw.find(sym).map(|at| (at, *sym, *op)))
            .min_by_key(|(at, sym, _)| (*at, std::cmp::Reverse(sym.len())))
            .ok_or_else(|| bad("expected METRIC<VALUE (or <=, >, >=, ==)"))?;
        let metric = raw[..at].trim().to_ascii_lowercase();
        let value_raw = raw[at + sym.len()..].trim();
        let timed = ["p50", "p90", "p99", "p999", "max", "max_success_gap"].contains(&metric.as_str());
        let value: f64 = if timed {
            // A latency reads as every duration of the command line does (250ms, 5s, 1.5s, 2m); a bare number is
            // milliseconds, the unit the metric is measured in.
            match value_raw.parse::<f64>() {
                Ok(ms) if ms.is_finite() && ms >= 0.0 => ms,
                _ => crate::parse_duration(value_raw)
                    .filter(|_| value_raw.ends_with(|c: char| c.is_ascii_alphabetic()))
                    .map(|d| d.as_secs_f64() * 1000.0)
                    .ok_or_else(|| bad("expected a duration such as 250ms, 5s or 2m (a bare number is ms)"))?,
            }
        } else {
            let number = value_raw.trim_end_matches('%').trim();
            number.parse().map_err(|_| bad("the value is not a number"))?
        };
        let known = [
            "p50",
            "p90",
            "p99",
            "p999",
            "max",
            "failed",
            "ok",
            "not_sent",
            "errors",
            "error_rate",
            "rate",
            "max_success_gap",
        ];
        if !known.contains(&metric.as_str()) {
            return Err(bad(&format!("unknown metric {metric:?}; known: {METRICS}")));
        }
        Ok(Threshold { raw: raw.to_string(), metric, op, value })
    }

    /// The measured value of this threshold's metric.
    pub fn measure(&self, s: &Summary, achieved_rate: f64) -> f64 {
        let c = &s.counts;
        match self.metric.as_str() {
            "p50" => s.corrected_ms[0],
            "p90" => s.corrected_ms[1],
            "p99" => s.corrected_ms[2],
            "p999" => s.corrected_ms[3],
            "max" => s.corrected_max_ms,
            "failed" => c.failed() as f64,
            "ok" => c.ok as f64,
            "not_sent" => c.not_sent as f64,
            "errors" => (c.connect + c.reset + c.timeout + c.check) as f64,
            "error_rate" => 100.0 * c.failed() as f64 / (c.total().max(1)) as f64,
            "rate" => achieved_rate,
            "max_success_gap" => s.max_success_gap_ms as f64,
            _ => f64::NAN,
        }
    }

    /// The metric's value mid-run, from the counts and p99 so far; `None` for metrics judged only at the end
    /// (p50, p90, p99.9, max, max_success_gap).
    pub fn measure_live(&self, c: &crate::ledger::Counts, p99_ms: f64) -> Option<f64> {
        Some(match self.metric.as_str() {
            "p99" => p99_ms,
            "failed" => c.failed() as f64,
            "not_sent" => c.not_sent as f64,
            "errors" => (c.connect + c.reset + c.timeout + c.check) as f64,
            // A share is meaningful once there is something to share.
            "error_rate" if c.total() >= 100 => 100.0 * c.failed() as f64 / c.total() as f64,
            // ok, rate and the rest depend on the whole run.
            _ => return None,
        })
    }

    pub fn holds(&self, measured: f64) -> bool {
        match self.op {
            Op::Lt => measured < self.value,
            Op::Le => measured <= self.value,
            Op::Gt => measured > self.value,
            Op::Ge => measured >= self.value,
            Op::Eq => (measured - self.value).abs() < 1e-9,
        }
    }

    pub fn text(&self) -> &str {
        &self.raw
    }
}

/// One threshold as judged at the end of a run, for the reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub threshold: String,
    pub measured: f64,
    pub held: bool,
}

/// Judges every threshold against the run.
pub fn judge(thresholds: &[Threshold], s: &Summary, achieved_rate: f64) -> Vec<Verdict> {
    thresholds
        .iter()
        .map(|t| {
            let measured = t.measure(s, achieved_rate);
            Verdict { threshold: t.text().to_string(), measured, held: t.holds(measured) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_judges() {
        let t = Threshold::parse("p99<50ms").unwrap();
        assert!(t.holds(49.9) && !t.holds(50.0));
        let t = Threshold::parse("failed==0").unwrap();
        assert!(t.holds(0.0) && !t.holds(1.0));
        let t = Threshold::parse("rate >= 990").unwrap();
        assert!(t.holds(990.0) && !t.holds(989.0));
        let t = Threshold::parse("error_rate<=1%").unwrap();
        assert!(t.holds(1.0));
        assert!(Threshold::parse("p98<1").is_err());
        assert!(Threshold::parse("p99 50").is_err());
        assert!(Threshold::parse("p99<fast").is_err());
    }

    #[test]
    fn latencies_take_any_duration_of_the_command_line() {
        for (raw, ms) in [("p99<5s", 5000.0), ("p99<250ms", 250.0), ("max<1.5s", 1500.0), ("p50<2m", 120_000.0)] {
            let t = Threshold::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert!(t.holds(ms - 0.5) && !t.holds(ms), "{raw}");
        }
        assert_eq!(Threshold::parse("max_success_gap<=2s").unwrap().value, 2000.0);
        assert_eq!(Threshold::parse("p99<40").unwrap().value, 40.0, "a bare number is ms");
        assert!(Threshold::parse("rate>5s").is_err(), "a rate is no duration");
        assert!(Threshold::parse("p99<5parsecs").is_err());
    }
}
