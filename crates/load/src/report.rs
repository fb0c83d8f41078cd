//! The run's report: a text summary for people and a JSON document for tools.

use serde_json::{json, Map, Value};

use crate::ledger::{Counts, Second, Summary};
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
/// The text table of a scenario's requests by flow and step (a failed step ends its flow, so a later step may
/// count fewer requests than the one before it).
fn steps_table(s: &Summary) -> String {
    let width = s.steps.iter().map(|st| st.flow_name.len()).max().unwrap_or(0).max(4);
    let request = s.steps.iter().map(|st| st.request.len()).max().unwrap_or(0).clamp(7, 40);
    let mut out = format!(
        "by flow and step:\n  {:<width$} {:>4}  {:<request$} {:>9} {:>9} {:>7} {:>9} {:>9}\n",
        "flow", "step", "request", "requests", "ok", "failed", "p50 ms", "p99 ms"
    );
    for st in &s.steps {
        let shown: String = st.request.chars().take(request).collect();
        out.push_str(&format!(
            "  {:<width$} {:>4}  {:<request$} {:>9} {:>9} {:>7} {:>9.2} {:>9.2}\n",
            st.flow_name,
            st.step + 1,
            shown,
            st.counts.total(),
            st.counts.ok,
            st.counts.failed(),
            st.p50_ms,
            st.p99_ms
        ));
    }
    out
}

/// One second of a report's `timeline` read back (as [`json`] wrote it), shifted `offset_s` seconds later: to
/// chart several runs' reports on one time axis. `None` for an entry that is not one.
pub fn second_of_json(v: &Value, offset_s: u64) -> Option<Second> {
    let n = |k: &str| v[k].as_u64();
    let f = |k: &str| v[k].as_f64();
    let counts = Counts {
        ok: n("ok")?,
        http_4xx: n("http_4xx")?,
        http_5xx: n("http_5xx")?,
        connect: n("connect")?,
        reset: n("reset")?,
        timeout: n("timeout")?,
        check: n("check")?,
        not_sent: n("not_sent")?,
    };
    let headers =
        v["headers"].as_object()?.iter().map(|(k, c)| Some((k.clone(), c.as_u64()?))).collect::<Option<_>>()?;
    Some(Second {
        t: n("t")? + offset_s,
        counts,
        p50_ms: f("p50_ms")?,
        p90_ms: f("p90_ms")?,
        p99_ms: f("p99_ms")?,
        max_ms: f("max_ms")?,
        headers,
    })
}

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
    let steps: Vec<Value> = s
        .steps
        .iter()
        .map(|st| {
            let c = &st.counts;
            json!({
                "flow": st.flow_name,
                "step": st.step + 1,
                "request": st.request,
                "requests": c.total(),
                "ok": c.ok,
                "failed": c.failed(),
                "http_4xx": c.http_4xx,
                "http_5xx": c.http_5xx,
                "connect": c.connect,
                "reset": c.reset,
                "timeout": c.timeout,
                "check": c.check,
                "not_sent": c.not_sent,
                "p50_ms": st.p50_ms,
                "p99_ms": st.p99_ms,
                "max_ms": st.max_ms,
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
        "steps": steps,
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
    if !s.steps.is_empty() {
        out.push_str(&steps_table(s));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeline_second_reads_back_as_it_was_written_and_shifted() {
        let mut l = crate::ledger::Ledger::new(std::time::Duration::from_secs(3));
        let ms = std::time::Duration::from_millis;
        l.record(crate::ledger::Outcome::Ok(200), ms(10), ms(12), None, Some("v2"));
        l.record(crate::ledger::Outcome::Http5xx(503), ms(1200), ms(1250), None, Some("v1"));
        let s = crate::ledger::conclude(vec![l], Default::default(), std::time::Duration::from_secs(2));
        let info = RunInfo { model: "open", scenario: false, target_rate: Some(1.0), duration_s: 2.0 };
        let doc = json(&s, &info, &[]);
        let back: Vec<Second> =
            doc["timeline"].as_array().unwrap().iter().map(|v| second_of_json(v, 0).unwrap()).collect();
        assert_eq!(back, s.timeline);
        let later = second_of_json(&doc["timeline"][0], 7).unwrap();
        assert_eq!(later.t, s.timeline[0].t + 7);
        assert_eq!(second_of_json(&serde_json::json!({ "t": 1 }), 0), None);
    }
}
