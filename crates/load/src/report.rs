//! The run's report: a text summary for people and a JSON document for tools.

use serde_json::{json, Map, Value};

use crate::ledger::Summary;
use crate::threshold::Verdict;

/// Share of not-sent requests above which a run is invalid: the generator, not the target, was the bottleneck.
pub const NOT_SENT_INVALID_SHARE: f64 = 0.01;

/// What the report needs besides the summary.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub model: &'static str,
    /// True when arrivals start scenario flows (the target rate is in flows/s, the achieved one in requests/s).
    pub scenario: bool,
    pub target_rate: Option<f64>,
    pub duration_s: f64,
}

pub fn achieved_rate(s: &Summary, info: &RunInfo) -> f64 {
    (s.counts.total() - s.counts.not_sent) as f64 / info.duration_s.max(1e-9)
}

pub fn valid(s: &Summary) -> bool {
    (s.counts.not_sent as f64) <= NOT_SENT_INVALID_SHARE * s.counts.total() as f64
}

/// The JSON document of a run, with its thresholds as judged at the end (`verdicts`).
pub fn json(s: &Summary, info: &RunInfo, verdicts: &[Verdict]) -> Value {
    let thresholds: Vec<Value> =
        verdicts.iter().map(|v| json!({ "threshold": v.threshold, "measured": v.measured, "held": v.held })).collect();
    let c = &s.counts;
    let status: Map<String, Value> = s.statuses.iter().map(|(k, v)| (k.to_string(), (*v).into())).collect();
    let headers: Map<String, Value> = s.headers.iter().map(|(k, v)| (k.clone(), (*v).into())).collect();
    let timeline: Vec<Value> = s
        .timeline
        .iter()
        .map(|t| {
            let h: Map<String, Value> = t.headers.iter().map(|(k, v)| (k.clone(), (*v).into())).collect();
            json!({
                "t": t.t,
                "ok": t.counts.ok,
                "http_4xx": t.counts.http_4xx,
                "http_5xx": t.counts.http_5xx,
                "connect": t.counts.connect,
                "reset": t.counts.reset,
                "timeout": t.counts.timeout,
                "check": t.counts.check,
                "not_sent": t.counts.not_sent,
                "p50_ms": t.p50_ms,
                "p90_ms": t.p90_ms,
                "p99_ms": t.p99_ms,
                "max_ms": t.max_ms,
                "headers": h,
            })
        })
        .collect();
    let [p50, p90, p99, p999] = s.corrected_ms;
    let [u50, u90, u99, u999] = s.uncorrected_ms;
    json!({
        "model": info.model,
        "duration_s": info.duration_s,
        "valid": valid(s),
        "requests": { "scheduled": c.total(), "ok": c.ok, "failed": c.failed(), "not_sent": c.not_sent, "retried": s.retried },
        "status": status,
        "errors": { "connect": c.connect, "reset": c.reset, "timeout": c.timeout, "check": c.check },
        "latency_ms": { "p50": p50, "p90": p90, "p99": p99, "p999": p999, "max": s.corrected_max_ms },
        "latency_uncorrected_ms": { "p50": u50, "p90": u90, "p99": u99, "p999": u999, "max": s.uncorrected_max_ms },
        "latency_5xx_ms": { "p50": s.failed_ms[0], "p99": s.failed_ms[1], "max": s.failed_max_ms },
        "rate": { "target": info.target_rate, "target_unit": if info.scenario { "flows/s" } else { "requests/s" }, "achieved": achieved_rate(s, info) },
        "max_success_gap_ms": s.max_success_gap_ms,
        "timeline": timeline,
        "headers": headers,
        "thresholds": thresholds,
        "thresholds_held": verdicts.iter().all(|v| v.held),
    })
}

pub fn text(s: &Summary, info: &RunInfo) -> String {
    let c = &s.counts;
    let [p50, p90, p99, p999] = s.corrected_ms;
    let [u50, _, u99, _] = s.uncorrected_ms;
    let mut out = format!(
        "{} model, {:.1} s: {} scheduled, {} ok, {} failed ({} 4xx, {} 5xx, {} connect, {} reset, {} timeout, {} check, {} not sent)\n",
        info.model, info.duration_s, c.total(), c.ok, c.failed(), c.http_4xx, c.http_5xx, c.connect, c.reset, c.timeout, c.check, c.not_sent
    );
    if s.retried > 0 {
        out.push_str(&format!(
            "retried: {} (sent again on a fresh connection: a reused one closed before one byte of answer)\n",
            s.retried
        ));
    }
    let unit = if info.scenario { "flows" } else { "requests" };
    let target = info.target_rate.map_or(String::new(), |r| format!(" (target {r:.0} {unit}/s)"));
    out.push_str(&format!("rate: {:.1} requests/s achieved{target}\n", achieved_rate(s, info)));
    if info.model == "closed" {
        // Each request is sent when the previous one ends: there is no schedule, so one latency, from the send.
        out.push_str(&format!(
            "latency (ms): p50 {p50:.2}  p90 {p90:.2}  p99 {p99:.2}  p99.9 {p999:.2}  max {:.2}\n",
            s.corrected_max_ms
        ));
    } else {
        out.push_str(&format!(
            "latency from schedule (ms): p50 {p50:.2}  p90 {p90:.2}  p99 {p99:.2}  p99.9 {p999:.2}  max {:.2}\n",
            s.corrected_max_ms
        ));
        out.push_str(&format!(
            "latency from send (ms):     p50 {u50:.2}  p99 {u99:.2}  max {:.2}\n",
            s.uncorrected_max_ms
        ));
    }
    if c.http_5xx > 0 {
        out.push_str(&format!(
            "latency of the 5xx answers (ms): p50 {:.2}  p99 {:.2}  max {:.2}\n",
            s.failed_ms[0], s.failed_ms[1], s.failed_max_ms
        ));
    }
    out.push_str(&format!("longest stretch without a success: {} ms\n", s.max_success_gap_ms));
    if !s.headers.is_empty() {
        let mix: Vec<String> = s.headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!("tracked header: {}\n", mix.join(" ")));
    }
    if !valid(s) {
        out.push_str(&format!(
            "INVALID RUN: {} of {} requests could not be sent on time (over {}%): the generator was the bottleneck\n",
            c.not_sent,
            c.total(),
            NOT_SENT_INVALID_SHARE * 100.0
        ));
    }
    out
}
