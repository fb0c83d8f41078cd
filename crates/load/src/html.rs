//! The HTML report: one self-contained page (inline SVG, no scripts, no network) with the run's summary and three
//! charts over time: throughput by outcome, latency percentiles, and the tracked header's mix.

use std::fmt::Write;

use crate::ledger::{Second, Summary};
use crate::report::{achieved_rate, valid, RunInfo};
use crate::threshold::Verdict;

const W: f64 = 900.0;
const H: f64 = 260.0;
const PAD_L: f64 = 60.0;
const PAD_B: f64 = 30.0;
const PAD_T: f64 = 10.0;
const PALETTE: [&str; 8] = ["#2b8cbe", "#e6550d", "#31a354", "#756bb1", "#d6616b", "#8c6d31", "#636363", "#17becf"];

/// The colour of a tracked header's value, the same on every page whatever other values a page shows: a value
/// with a number in it (`v3`, `1.4.2`) takes the palette's entry of its last number, any other one of a hash of it.
pub fn value_colour(value: &str) -> &'static str {
    let digits: String = value
        .chars()
        .rev()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let n = match digits.parse::<u64>() {
        Ok(n) => n,
        // FNV-1a: stable across runs and builds, unlike the standard library's hasher.
        Err(_) => value.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)),
    };
    PALETTE[(n % PALETTE.len() as u64) as usize]
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An event drawn on every chart of a page: a dashed vertical line `at_s` seconds into the run, with its label (a
/// deploy started, traffic switched, a server killed).
#[derive(Clone, Debug, PartialEq)]
pub struct Mark {
    pub at_s: f64,
    pub label: String,
}

/// Marks a page shows at most (a label each; more would be unreadable).
pub const MARKS_MAX: usize = 100;

/// Reads marks from JSON lines `{"at_ms": UNIX_MS, "label": "..."}` (`at_ms` in milliseconds since the Unix
/// epoch, so that whoever writes the file needs no knowledge of the run) against the run's start. Every bad line
/// is reported, with its number.
pub fn parse_marks(text: &str, start_unix_ms: u64) -> Result<Vec<Mark>, Vec<String>> {
    let mut marks = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("line {}: not JSON: {e}", i + 1));
                continue;
            }
        };
        match (v["at_ms"].as_u64(), v["label"].as_str()) {
            (Some(at), Some(label)) if !label.is_empty() && label.len() <= 200 => {
                marks.push(Mark { at_s: (at as f64 - start_unix_ms as f64) / 1000.0, label: label.to_string() })
            }
            _ => errors.push(format!(
                "line {}: expected {{\"at_ms\": milliseconds since the Unix epoch, \"label\": 1 to 200 bytes of text}}",
                i + 1
            )),
        }
    }
    if marks.len() > MARKS_MAX {
        errors.push(format!("{} marks: at most {MARKS_MAX}", marks.len()));
    }
    if errors.is_empty() {
        Ok(marks)
    } else {
        Err(errors)
    }
}

/// What a page shows besides the run itself.
#[derive(Default)]
pub struct Decor<'a> {
    /// A link above the title back to the page this one belongs to (such as a demo's summary): (href, text).
    pub back: Option<(&'a str, &'a str)>,
    /// Events to mark on the charts.
    pub marks: &'a [Mark],
}

/// A round step (1, 2 or 5 times a power of ten) that cuts `span` into at most `parts` pieces.
fn round_step(span: f64, parts: f64) -> f64 {
    let raw = (span / parts).max(1e-9);
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * power).find(|s| *s >= raw * (1.0 - 1e-9)).unwrap_or(10.0 * power)
}

/// A round step of seconds for the time axis: at most ten ticks.
fn time_step(seconds: usize) -> usize {
    [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600]
        .into_iter()
        .find(|s| seconds / s <= 10)
        .unwrap_or(seconds.div_ceil(10).max(1))
}

/// Axes and labels; returns the plot's x for second `t` and y for value `v`.
struct Frame {
    seconds: usize,
    max: f64,
}

impl Frame {
    /// A frame whose top is a round number at or above `peak`, so that its ticks are round too.
    fn new(seconds: usize, peak: f64) -> Frame {
        let peak = if peak > 0.0 { peak } else { 1.0 };
        let step = round_step(peak, 4.0);
        Frame { seconds, max: (peak / step).ceil() * step }
    }

    fn x(&self, t: f64) -> f64 {
        PAD_L + (W - PAD_L - 10.0) * t / self.seconds.max(1) as f64
    }

    fn y(&self, v: f64) -> f64 {
        H - PAD_B - (H - PAD_B - PAD_T) * (v / self.max.max(1e-9)).min(1.0)
    }

    fn bar_w(&self) -> f64 {
        ((W - PAD_L - 10.0) / self.seconds.max(1) as f64 - 1.0).max(1.0)
    }

    fn axes(&self, out: &mut String, unit: &str) {
        let _ = write!(
            out,
            r##"<line class="axis" x1="{PAD_L}" y1="{}" x2="{}" y2="{}" stroke="#999"/>"##,
            H - PAD_B,
            W - 10.0,
            H - PAD_B
        );
        let _ = write!(
            out,
            r##"<line class="axis" x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{}" stroke="#999"/>"##,
            H - PAD_B
        );
        let step = round_step(self.max, 4.0);
        let decimals = if step >= 1.0 { 0 } else { (-step.log10().floor()) as usize };
        let mut i = 0.0;
        while i * step <= self.max * (1.0 + 1e-9) {
            let v = i * step;
            let _ = write!(
                out,
                r##"<text class="ytick" x="{}" y="{}" font-size="11" text-anchor="end">{v:.decimals$}</text>"##,
                PAD_L - 5.0,
                self.y(v) + 4.0
            );
            i += 1.0;
        }
        let _ = write!(
            out,
            r##"<text x="12" y="{}" font-size="11" transform="rotate(-90 12 {})">{unit}</text>"##,
            H / 2.0,
            H / 2.0
        );
        for t in (0..=self.seconds).step_by(time_step(self.seconds)) {
            let _ = write!(
                out,
                r##"<text class="xtick" x="{}" y="{}" font-size="11" text-anchor="middle">{t}s</text>"##,
                self.x(t as f64),
                H - 10.0
            );
        }
    }
}

impl Frame {
    /// The marks inside the run, as dashed lines. Each label goes on the first of four rows where it overlaps no
    /// other; one that fits on none is left to the line's tooltip (and the page's list of events).
    fn marks(&self, out: &mut String, marks: &[Mark]) {
        let mut inside: Vec<&Mark> = marks.iter().filter(|m| m.at_s >= 0.0 && m.at_s <= self.seconds as f64).collect();
        inside.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
        let mut row_ends = [f64::MIN; 4];
        for m in inside {
            let x = self.x(m.at_s);
            let _ = write!(
                out,
                r##"<line class="mark" x1="{x:.1}" y1="{PAD_T}" x2="{x:.1}" y2="{}" stroke="#333" stroke-dasharray="4 3"><title>{:.1}s {}</title></line>"##,
                H - PAD_B,
                m.at_s,
                esc(&m.label)
            );
            // About 5.6 px a character at font-size 10.
            let width = m.label.chars().count() as f64 * 5.6 + 8.0;
            let Some(row) = row_ends.iter().position(|&end| end <= x) else { continue };
            row_ends[row] = x + 3.0 + width;
            let _ = write!(
                out,
                r##"<text class="mark-label" x="{:.1}" y="{}" font-size="10" fill="#333">{}</text>"##,
                x + 3.0,
                PAD_T + 10.0 + row as f64 * 12.0,
                esc(&m.label)
            );
        }
    }
}

fn legend(out: &mut String, items: &[(&str, &str)]) {
    out.push_str(r#"<div class="legend">"#);
    for (name, color) in items {
        let _ = write!(out, r#"<span><i style="background:{color}"></i>{}</span>"#, esc(name));
    }
    out.push_str("</div>");
}

/// A chart's series: name, colour, value at second i.
type Series<'a> = (String, &'a str, Vec<f64>);

/// Stacked bars per second.
fn stacked(id: &str, title: &str, unit: &str, seconds: usize, series: &[Series], marks: &[Mark]) -> String {
    let max = (0..seconds).map(|i| series.iter().map(|s| s.2[i]).sum::<f64>()).fold(0.0, f64::max);
    let f = Frame::new(seconds, max);
    let mut out = format!(r#"<h2>{}</h2>"#, esc(title));
    legend(&mut out, &series.iter().map(|s| (s.0.as_str(), s.1)).collect::<Vec<_>>());
    let _ = write!(out, r#"<svg class="chart" id="{id}" viewBox="0 0 {W} {H}" width="{W}" height="{H}">"#);
    f.axes(&mut out, unit);
    for i in 0..seconds {
        let mut base = 0.0;
        for (name, color, values) in series {
            let v = values[i];
            if v <= 0.0 {
                continue;
            }
            let (top, bottom) = (f.y(base + v), f.y(base));
            let _ = write!(
                out,
                r#"<rect class="bar" x="{:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{}s {}: {v}</title></rect>"#,
                f.x(i as f64),
                f.bar_w(),
                (bottom - top).max(0.5),
                i,
                esc(name)
            );
            base += v;
        }
    }
    f.marks(&mut out, marks);
    out.push_str("</svg>");
    out
}

fn lines(id: &str, title: &str, unit: &str, seconds: usize, series: &[Series], marks: &[Mark]) -> String {
    let max = series.iter().flat_map(|s| s.2.iter().copied()).fold(0.0, f64::max);
    let f = Frame::new(seconds, max);
    let mut out = format!(r#"<h2>{}</h2>"#, esc(title));
    legend(&mut out, &series.iter().map(|s| (s.0.as_str(), s.1)).collect::<Vec<_>>());
    let _ = write!(out, r#"<svg class="chart" id="{id}" viewBox="0 0 {W} {H}" width="{W}" height="{H}">"#);
    f.axes(&mut out, unit);
    for (name, color, values) in series {
        let points: Vec<String> =
            values.iter().enumerate().map(|(i, v)| format!("{:.1},{:.1}", f.x(i as f64 + 0.5), f.y(*v))).collect();
        let _ = write!(
            out,
            r#"<polyline class="line" fill="none" stroke="{color}" stroke-width="2" points="{}"><title>{}</title></polyline>"#,
            points.join(" "),
            esc(name)
        );
    }
    f.marks(&mut out, marks);
    out.push_str("</svg>");
    out
}

/// The three charts of a timeline (throughput by outcome, latency percentiles, the tracked header's mix), with
/// `marks` on each. `closed`: the closed model, whose latency is not measured from a schedule. Seconds missing from
/// `timeline` (between the runs of a page that shows several) are empty.
pub fn charts(timeline: &[Second], marks: &[Mark], closed: bool) -> String {
    let seconds = timeline.iter().map(|t| t.t as usize + 1).max().unwrap_or(0);
    let at = |f: &dyn Fn(&Second) -> f64| -> Vec<f64> {
        let mut v = vec![0.0; seconds];
        for t in timeline {
            v[t.t as usize] = f(t);
        }
        v
    };
    let throughput = vec![
        ("ok".to_string(), "#31a354", at(&|t| t.counts.ok as f64)),
        ("4xx".to_string(), "#fdae6b", at(&|t| t.counts.http_4xx as f64)),
        ("5xx".to_string(), "#de2d26", at(&|t| t.counts.http_5xx as f64)),
        (
            "connect/reset/timeout/check".to_string(),
            "#756bb1",
            at(&|t| (t.counts.connect + t.counts.reset + t.counts.timeout + t.counts.check) as f64),
        ),
        ("not sent".to_string(), "#969696", at(&|t| t.counts.not_sent as f64)),
    ];
    let latency = vec![
        ("p50".to_string(), "#2b8cbe", at(&|t| t.p50_ms)),
        ("p90".to_string(), "#31a354", at(&|t| t.p90_ms)),
        ("p99".to_string(), "#e6550d", at(&|t| t.p99_ms)),
        ("max".to_string(), "#756bb1", at(&|t| t.max_ms)),
    ];
    let values: std::collections::BTreeSet<&String> = timeline.iter().flat_map(|t| t.headers.keys()).collect();
    let mix: Vec<Series> = values
        .iter()
        .map(|v| ((*v).clone(), value_colour(v), at(&|t| *t.headers.get(*v).unwrap_or(&0) as f64)))
        .collect();
    let mut out = stacked("throughput", "Throughput by outcome", "requests/s", seconds, &throughput, marks);
    let latency_title = if closed { "Latency" } else { "Latency from the scheduled time" };
    out.push_str(&lines("latency", latency_title, "ms", seconds, &latency, marks));
    if mix.is_empty() {
        out.push_str("<h2>Tracked header</h2><svg class=\"chart\" id=\"headers\" width=\"900\" height=\"40\"><text x=\"10\" y=\"25\">no header tracked (use --track-header)</text></svg>");
    } else {
        out.push_str(&stacked("headers", "Tracked header's values", "responses/s", seconds, &mix, marks));
    }
    out
}

/// The whole page.
pub fn page(s: &Summary, info: &RunInfo, title: &str, verdicts: &[Verdict]) -> String {
    page_with(s, info, title, verdicts, &Decor::default())
}

/// The whole page, with a link back and marks.
pub fn page_with(s: &Summary, info: &RunInfo, title: &str, verdicts: &[Verdict], decor: &Decor) -> String {
    let c = &s.counts;
    let [p50, p90, p99, p999] = s.corrected_ms;
    let mut out = String::from("<!doctype html><html><head><meta charset=\"utf-8\">");
    let _ = write!(out, "<title>{}</title>", esc(title));
    out.push_str(
        "<style>body{font:14px system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse}\
         td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}th{text-align:left}\
         .legend span{margin-right:14px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}\
         .invalid{color:#b00;font-weight:bold}</style></head><body>",
    );
    if let Some((href, text)) = decor.back {
        let _ = write!(out, "<p><a id=\"back\" href=\"{}\">{}</a></p>", esc(href), esc(text));
    }
    let _ = write!(out, "<h1>{}</h1>", esc(title));
    if !valid(s) {
        out.push_str("<p class=\"invalid\">Invalid run: over 1% of requests could not be sent on time.</p>");
    }
    let _ = write!(
        out,
        "<table id=\"summary\"><tr><th>model</th><td>{}</td></tr><tr><th>duration</th><td>{:.1} s</td></tr>\
         <tr><th>scheduled</th><td>{}</td></tr><tr><th>ok</th><td>{}</td></tr><tr><th>failed</th><td>{}</td></tr>\
         <tr><th>4xx / 5xx</th><td>{} / {}</td></tr><tr><th>connect / reset / timeout</th><td>{} / {} / {}</td></tr>\
         <tr><th>not sent</th><td>{}</td></tr><tr><th>retried on a fresh connection</th><td id=\"retried\">{}</td></tr>\
         <tr><th>rate achieved</th><td>{:.1}/s{}</td></tr>\
         <tr><th>latency p50 / p90 / p99 / p99.9 / max</th><td>{p50:.2} / {p90:.2} / {p99:.2} / {p999:.2} / {:.2} ms</td></tr>\
         <tr><th>longest stretch without a success</th><td>{} ms</td></tr></table>",
        info.model,
        info.duration_s,
        c.total(),
        c.ok,
        c.failed(),
        c.http_4xx,
        c.http_5xx,
        c.connect,
        c.reset,
        c.timeout,
        c.not_sent,
        s.retried,
        achieved_rate(s, info),
        info.target_rate.map_or(String::new(), |r| format!(" (target {r:.0})")),
        s.corrected_max_ms,
        s.max_success_gap_ms,
    );
    if !verdicts.is_empty() {
        out.push_str(
            "<h2>Thresholds</h2><table id=\"thresholds\"><tr><th>threshold</th><th>measured</th><th>held</th></tr>",
        );
        for v in verdicts {
            let _ = write!(
                out,
                "<tr class=\"{}\"><th>{}</th><td>{:.2}</td><td>{}</td></tr>",
                if v.held { "held" } else { "failed" },
                esc(&v.threshold),
                v.measured,
                if v.held { "yes" } else { "<b class=\"invalid\">no</b>" }
            );
        }
        out.push_str("</table>");
    }
    if !s.steps.is_empty() {
        out.push_str(
            "<h2>By flow and step</h2><table id=\"by-step\"><tr><th>flow</th><th>step</th><th>request</th>\
             <th>requests</th><th>ok</th><th>failed</th><th>p50 ms</th><th>p99 ms</th><th>max ms</th></tr>",
        );
        for st in &s.steps {
            let _ = write!(
                out,
                "<tr><th>{}</th><td>{}</td><th>{}</th><td>{}</td><td>{}</td><td{}>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
                esc(&st.flow_name),
                st.step + 1,
                esc(&st.request),
                st.counts.total(),
                st.counts.ok,
                if st.counts.failed() > 0 { " class=\"invalid\"" } else { "" },
                st.counts.failed(),
                st.p50_ms,
                st.p99_ms,
                st.max_ms
            );
        }
        out.push_str("</table>");
    }
    if !decor.marks.is_empty() {
        out.push_str("<h2>Events</h2><table id=\"marks\"><tr><th>at</th><th>event</th></tr>");
        for m in decor.marks {
            let _ = write!(out, "<tr><td>{:.1} s</td><th>{}</th></tr>", m.at_s, esc(&m.label));
        }
        out.push_str("</table>");
    }
    out.push_str(&charts(&s.timeline, decor.marks, info.model == "closed"));
    out.push_str("</body></html>\n");
    out
}

/// The page of a `--find-max` search: the rate found, every step (rate, p99 ms, error rate %, passed), and the
/// whole report of the highest passing step.
pub fn find_max_page(
    title: &str,
    best: Option<f64>,
    steps: &[(f64, f64, f64, bool)],
    best_run: Option<(&Summary, RunInfo, &[Verdict])>,
) -> String {
    let mut table = String::from("<h2>Search</h2><p id=\"max-rate\">");
    match best {
        Some(r) => {
            let _ = write!(table, "max rate: {r:.0} requests/s");
        }
        None => table.push_str("max rate: none (even the lowest rate tried failed its bounds)"),
    }
    table.push_str("</p><table id=\"steps\"><tr><th>rate/s</th><th>p99 ms</th><th>errors %</th><th>passed</th></tr>");
    for (rate, p99, errors, passed) in steps {
        let _ = write!(
            table,
            "<tr class=\"{}\"><th>{rate:.0}</th><td>{p99:.2}</td><td>{errors:.2}</td><td>{}</td></tr>",
            if *passed { "held" } else { "failed" },
            if *passed { "yes" } else { "no" }
        );
    }
    table.push_str("</table>");
    match best_run {
        Some((s, info, verdicts)) => {
            let page = page(s, &info, title, verdicts);
            let heading = format!("<h1>{}</h1>", esc(title));
            let best_heading = format!("{table}<h2>The highest passing step, {:.0}/s</h2>", info.target_rate.unwrap_or(0.0));
            page.replacen(&heading, &format!("{heading}{best_heading}"), 1)
        }
        None => format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head><body><h1>{t}</h1>{table}</body></html>\n",
            t = esc(title)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_steps_are_round() {
        for (span, want) in [(1.0, 0.5), (4.0, 1.0), (7.3, 2.0), (105.0, 50.0), (398.0, 100.0), (0.03, 0.01)] {
            let got = round_step(span, 4.0);
            assert!((got - want).abs() < 1e-9, "span {span}: step {got}, want {want}");
        }
        let f = Frame::new(10, 398.0);
        assert_eq!(f.max, 400.0, "the top of the axis is a round number too");
        assert_eq!([3, 10, 11, 45, 61, 600].map(time_step), [1, 1, 2, 5, 10, 60]);
    }

    #[test]
    fn marks_are_read_against_the_run_start_and_bad_lines_named() {
        let text = "{\"at_ms\": 1500, \"label\": \"deploy started\"}\n\n{\"at_ms\": 4000, \"label\": \"switched\"}\n";
        let marks = parse_marks(text, 1000).unwrap();
        assert_eq!(
            marks,
            [Mark { at_s: 0.5, label: "deploy started".into() }, Mark { at_s: 3.0, label: "switched".into() }]
        );
        let errors = parse_marks("{\"at_ms\": 1}\nnope\n{\"at_ms\": -1, \"label\": \"x\"}\n", 0).unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("line 1: expected") && errors[1].starts_with("line 2: not JSON"), "{errors:?}");
        assert!(errors[2].starts_with("line 3: "), "{errors:?}");
        let many: String = (0..=MARKS_MAX).map(|i| format!("{{\"at_ms\": {i}, \"label\": \"m\"}}\n")).collect();
        assert!(parse_marks(&many, 0).is_err_and(|e| e[0].contains("at most")));
    }

    #[test]
    fn marks_are_drawn_on_every_chart_and_listed_with_a_link_back() {
        let mut l = crate::ledger::Ledger::new(std::time::Duration::from_secs(4));
        l.record(crate::ledger::Outcome::Ok(200), Default::default(), Default::default(), None, Some("v1"));
        let s = crate::ledger::conclude(vec![l], Default::default(), std::time::Duration::from_secs(3));
        let info = RunInfo { model: "open", scenario: false, target_rate: None, duration_s: 3.0 };
        let marks = [Mark { at_s: 0.5, label: "kill -9 <pid>".into() }, Mark { at_s: 99.0, label: "after".into() }];
        let html =
            page_with(&s, &info, "phase 3", &[], &Decor { back: Some(("report.html", "summary")), marks: &marks });
        assert!(html.contains("<a id=\"back\" href=\"report.html\">summary</a>"), "{html}");
        for id in ["throughput", "latency", "headers"] {
            let chart = html.split(&format!("id=\"{id}\"")).nth(1).unwrap().split("</svg>").next().unwrap();
            assert_eq!(chart.matches("class=\"mark\"").count(), 1, "{id}: one mark inside the run, none past it");
            assert!(chart.contains("kill -9 &lt;pid&gt;"), "{id}: the label, escaped");
        }
        let listed = html.split("id=\"marks\"").nth(1).unwrap().split("</table>").next().unwrap();
        assert!(listed.contains("0.5 s") && listed.contains("after"), "every mark is listed: {listed}");
        assert!(!page(&s, &info, "t", &[]).contains("id=\"marks\""), "no marks, no list");
        // Six marks in one instant: four labels on four rows, the other two left to their lines' tooltips.
        let crowd: Vec<Mark> = (0..6).map(|i| Mark { at_s: 0.2, label: format!("event {i}") }).collect();
        let html = page_with(&s, &info, "t", &[], &Decor { back: None, marks: &crowd });
        let chart = html.split("id=\"latency\"").nth(1).unwrap().split("</svg>").next().unwrap();
        assert_eq!(chart.matches("class=\"mark\"").count(), 6);
        let rows: std::collections::BTreeSet<&str> = chart
            .split("class=\"mark-label\"")
            .skip(1)
            .map(|t| t.split("y=\"").nth(1).unwrap().split('"').next().unwrap())
            .collect();
        assert_eq!((chart.matches("class=\"mark-label\"").count(), rows.len()), (4, 4), "{chart}");
    }

    #[test]
    fn a_version_keeps_its_colour_whatever_else_a_page_shows() {
        let colours: Vec<&str> = ["v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8"].map(value_colour).to_vec();
        let mut distinct = colours.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 8, "eight versions in a row get eight colours: {colours:?}");
        assert_eq!(value_colour("v2"), value_colour("app-2"));
        assert_eq!(value_colour("blue"), value_colour("blue"));
        // A page that shows only v2 colours it as a page showing v1 and v2 does.
        let page_of = |values: &[&str]| {
            let mut s = crate::ledger::Ledger::new(std::time::Duration::from_secs(2));
            for v in values {
                s.record(crate::ledger::Outcome::Ok(200), Default::default(), Default::default(), None, Some(v));
            }
            let s = crate::ledger::conclude(vec![s], Default::default(), std::time::Duration::from_secs(1));
            let info = RunInfo { model: "open", scenario: false, target_rate: None, duration_s: 1.0 };
            page(&s, &info, "t", &[])
        };
        let fill = |html: &str, v: &str| {
            let chart = html.split("id=\"headers\"").nth(1).unwrap().to_string();
            let at = chart.find(&format!("s {v}: ")).unwrap();
            chart[..at].rsplit("fill=\"").next().unwrap().split('"').next().unwrap().to_string()
        };
        assert_eq!(fill(&page_of(&["v2"]), "v2"), fill(&page_of(&["v1", "v2"]), "v2"));
    }
}
