//! Exact accounting of a run: every scheduled request ends in exactly one [`Outcome`]. Each worker thread records
//! into its own [`Ledger`]: latency into HdrHistograms (corrected: from the scheduled time; uncorrected: from the
//! actual send) for the whole run and per second. Each second, the [`Timeline`] takes every worker's finished
//! seconds, merges their histograms and summarises them, so memory stays bounded however long the run.
//! Successes are also marked in a 1 ms bitmap, which gives the longest stretch without one exactly.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// How one scheduled request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// 2xx or 3xx.
    Ok(u16),
    Http4xx(u16),
    Http5xx(u16),
    /// Could not connect.
    Connect,
    /// The connection broke after the request was sent.
    Reset,
    /// No complete response within the timeout.
    Timeout,
    /// A response that failed a scenario step's check.
    CheckFailed,
    /// The generator could not send it on time (it fell behind, or the run ended first).
    NotSent,
}

impl Outcome {
    pub fn from_status(status: u16) -> Outcome {
        match status {
            400..=499 => Outcome::Http4xx(status),
            500..=599 => Outcome::Http5xx(status),
            s => Outcome::Ok(s),
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok(_))
    }
}

/// Highest latency a histogram records; longer ones are clamped (and still counted).
pub const LATENCY_MAX: Duration = Duration::from_secs(3600);
/// Most distinct values of the tracked header kept per second; the rest count as "(other)".
pub const HEADER_VALUES_MAX: usize = 32;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX.as_micros() as u64, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, LATENCY_MAX.as_micros() as u64)
}

/// Counts by outcome kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub ok: u64,
    pub http_4xx: u64,
    pub http_5xx: u64,
    pub connect: u64,
    pub reset: u64,
    pub timeout: u64,
    pub check: u64,
    pub not_sent: u64,
}

impl Counts {
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Ok(_) => self.ok += 1,
            Outcome::Http4xx(_) => self.http_4xx += 1,
            Outcome::Http5xx(_) => self.http_5xx += 1,
            Outcome::Connect => self.connect += 1,
            Outcome::Reset => self.reset += 1,
            Outcome::Timeout => self.timeout += 1,
            Outcome::CheckFailed => self.check += 1,
            Outcome::NotSent => self.not_sent += 1,
        }
    }

    pub fn merge(&mut self, o: &Counts) {
        self.ok += o.ok;
        self.http_4xx += o.http_4xx;
        self.http_5xx += o.http_5xx;
        self.connect += o.connect;
        self.reset += o.reset;
        self.timeout += o.timeout;
        self.check += o.check;
        self.not_sent += o.not_sent;
    }

    pub fn total(&self) -> u64 {
        self.ok + self.http_4xx + self.http_5xx + self.connect + self.reset + self.timeout + self.check + self.not_sent
    }

    /// Every outcome but ok (not_sent included: a request the generator could not send was not served).
    pub fn failed(&self) -> u64 {
        self.total() - self.ok
    }
}

/// One second of a run, being filled.
pub struct Open {
    counts: Counts,
    hist: Histogram<u64>,
    headers: BTreeMap<String, u64>,
}

impl Open {
    fn merge(&mut self, o: Open) {
        self.counts.merge(&o.counts);
        self.hist.add(&o.hist).expect("same bounds");
        for (k, v) in o.headers {
            *self.headers.entry(k).or_default() += v;
        }
    }
}

/// The run's seconds: finished seconds of every worker, merged (histograms included) and then summarised.
#[derive(Default)]
pub struct Timeline {
    open: BTreeMap<u64, Open>,
    closed: Vec<Second>,
}

impl Timeline {
    /// Takes a worker's finished seconds.
    pub fn absorb(&mut self, seconds: Vec<(u64, Open)>) {
        for (t, o) in seconds {
            match self.open.get_mut(&t) {
                Some(mine) => mine.merge(o),
                None => {
                    self.open.insert(t, o);
                }
            }
        }
    }

    /// Summarises the merged seconds before `limit_s`; every worker has handed over its part of them.
    pub fn close_before(&mut self, limit_s: u64) {
        while let Some((&t, _)) = self.open.first_key_value() {
            if t >= limit_s {
                break;
            }
            let o = self.open.remove(&t).expect("present");
            self.closed.push(summarise(t, o));
        }
    }

    pub fn finish(mut self) -> Vec<Second> {
        self.close_before(u64::MAX);
        self.closed
    }
}

/// Seconds of slack before a second counts as finished: a request completing late is still recorded in it.
pub const SECOND_SLACK: u64 = 1;

/// Ends a run: hands every worker's remaining seconds to the timeline, merges the ledgers, and summarises.
pub fn conclude(ledgers: Vec<Ledger>, mut timeline: Timeline, run: Duration) -> Summary {
    let mut ledgers = ledgers.into_iter();
    let mut merged = ledgers.next().expect("at least one ledger");
    timeline.absorb(merged.take_seconds_before(u64::MAX));
    for mut l in ledgers {
        timeline.absorb(l.take_seconds_before(u64::MAX));
        merged.merge(l);
    }
    merged.finish(run, timeline.finish())
}

/// The summary of one second.
#[derive(Debug, Clone, PartialEq)]
pub struct Second {
    pub t: u64,
    pub counts: Counts,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub headers: BTreeMap<String, u64>,
}

/// A recorder: one per worker thread, merged into one at the end ([`Ledger::merge`]).
pub struct Ledger {
    counts: Counts,
    statuses: BTreeMap<u16, u64>,
    headers: BTreeMap<String, u64>,
    corrected: Histogram<u64>,
    uncorrected: Histogram<u64>,
    /// Latency (from the scheduled time) of the 5xx answers alone: how fast failures come (a shed must be fast).
    failed: Histogram<u64>,
    open: BTreeMap<u64, Open>,
    /// Bit i set: a success completed during millisecond i of the run.
    success_ms: Vec<u64>,
    /// Requests sent a second time, on a fresh connection, after a reused one closed before one byte of answer.
    retried: u64,
    /// A scenario's requests by (flow, step), both indexes from 0.
    steps: BTreeMap<(usize, usize), StepTally>,
}

/// One step of a scenario's flow over the run: how its requests ended, and their latency from the time each was due.
struct StepTally {
    counts: Counts,
    hist: Histogram<u64>,
}

/// One step of a scenario's flow in the summary. `flow_name` and `request` are filled by the run, which knows the
/// scenario (the ledger keeps indexes only).
#[derive(Debug, Clone, PartialEq)]
pub struct StepSummary {
    pub flow: usize,
    pub step: usize,
    pub flow_name: String,
    /// The step's method and URL template, such as `POST /orders`.
    pub request: String,
    pub counts: Counts,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn ms_of(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn summarise(t: u64, o: Open) -> Second {
    let q = |v: f64| if o.hist.is_empty() { 0.0 } else { o.hist.value_at_quantile(v) as f64 / 1000.0 };
    Second {
        t,
        counts: o.counts,
        p50_ms: q(0.5),
        p90_ms: q(0.9),
        p99_ms: q(0.99),
        max_ms: if o.hist.is_empty() { 0.0 } else { o.hist.max() as f64 / 1000.0 },
        headers: o.headers,
    }
}

impl Ledger {
    /// A ledger for a run of at most `span` (the schedule plus the time to drain in-flight requests).
    pub fn new(span: Duration) -> Ledger {
        let bits = span.as_millis() as usize + 1;
        Ledger {
            counts: Counts::default(),
            statuses: BTreeMap::new(),
            headers: BTreeMap::new(),
            corrected: histogram(),
            uncorrected: histogram(),
            failed: histogram(),
            open: BTreeMap::new(),
            success_ms: vec![0; bits.div_ceil(64)],
            retried: 0,
            steps: BTreeMap::new(),
        }
    }

    /// Records one request. `due` is when it was scheduled, `done` when it ended (both from the run's start);
    /// `service` is the time from the actual send to the end (`None` when it was never sent).
    pub fn record(
        &mut self,
        outcome: Outcome,
        due: Duration,
        done: Duration,
        service: Option<Duration>,
        header: Option<&str>,
    ) {
        self.counts.add(outcome);
        let second = done.as_secs();
        let open = self.open.entry(second).or_insert_with(|| Open {
            counts: Counts::default(),
            hist: histogram(),
            headers: BTreeMap::new(),
        });
        open.counts.add(outcome);
        if let Outcome::Ok(s) | Outcome::Http4xx(s) | Outcome::Http5xx(s) = outcome {
            *self.statuses.entry(s).or_default() += 1;
            let corrected = micros(done.saturating_sub(due));
            let _ = self.corrected.record(corrected);
            let _ = open.hist.record(corrected);
            if let Outcome::Http5xx(_) = outcome {
                let _ = self.failed.record(corrected);
            }
            if let Some(s) = service {
                let _ = self.uncorrected.record(micros(s));
            }
            if let Some(v) = header {
                let key =
                    if open.headers.len() < HEADER_VALUES_MAX || open.headers.contains_key(v) { v } else { "(other)" };
                *open.headers.entry(key.to_string()).or_default() += 1;
                *self.headers.entry(key.to_string()).or_default() += 1;
            }
        }
        if outcome.is_ok() {
            let ms = done.as_millis() as usize;
            if let Some(word) = self.success_ms.get_mut(ms / 64) {
                *word |= 1 << (ms % 64);
            }
        }
    }

    /// Records a scenario request (already counted by [`Ledger::record`]) under its flow and step.
    pub fn record_step(&mut self, flow: usize, step: usize, outcome: Outcome, due: Duration, done: Duration) {
        let tally = self
            .steps
            .entry((flow, step))
            .or_insert_with(|| StepTally { counts: Counts::default(), hist: histogram() });
        tally.counts.add(outcome);
        if let Outcome::Ok(_) | Outcome::Http4xx(_) | Outcome::Http5xx(_) = outcome {
            let _ = tally.hist.record(micros(done.saturating_sub(due)));
        }
    }

    /// Counts a request sent again on a fresh connection (it still ends in one outcome, recorded once).
    pub fn record_retry(&mut self) {
        self.retried += 1;
    }

    /// The counts so far.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// p99 from the scheduled time so far (of this worker), ms.
    pub fn p99_so_far_ms(&self) -> f64 {
        if self.corrected.is_empty() {
            0.0
        } else {
            self.corrected.value_at_quantile(0.99) as f64 / 1000.0
        }
    }

    /// Hands over the seconds before `limit_s` (this worker's part of them) for the timeline to merge.
    pub fn take_seconds_before(&mut self, limit_s: u64) -> Vec<(u64, Open)> {
        let keep = self.open.split_off(&limit_s);
        std::mem::replace(&mut self.open, keep).into_iter().collect()
    }

    /// Folds another worker's ledger into this one.
    pub fn merge(&mut self, mut other: Ledger) {
        self.counts.merge(&other.counts);
        self.retried += other.retried;
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        for (k, v) in other.headers {
            *self.headers.entry(k).or_default() += v;
        }
        self.corrected.add(&other.corrected).expect("same bounds");
        self.uncorrected.add(&other.uncorrected).expect("same bounds");
        self.failed.add(&other.failed).expect("same bounds");
        for (t, o) in std::mem::take(&mut other.open) {
            match self.open.get_mut(&t) {
                Some(mine) => mine.merge(o),
                None => {
                    self.open.insert(t, o);
                }
            }
        }
        for (mine, theirs) in self.success_ms.iter_mut().zip(other.success_ms) {
            *mine |= theirs;
        }
        for (k, theirs) in other.steps {
            match self.steps.get_mut(&k) {
                Some(mine) => {
                    mine.counts.merge(&theirs.counts);
                    mine.hist.add(&theirs.hist).expect("same bounds");
                }
                None => {
                    self.steps.insert(k, theirs);
                }
            }
        }
    }

    /// The summary of the run, with its merged `timeline`.
    fn finish(self, run: Duration, timeline: Vec<Second>) -> Summary {
        let q = |h: &Histogram<u64>, v: f64| if h.is_empty() { 0.0 } else { h.value_at_quantile(v) as f64 / 1000.0 };
        let run_ms = run.as_millis() as usize;
        let mut gap = 0usize;
        let mut last = None::<usize>;
        for ms in 0..=run_ms {
            if self.success_ms.get(ms / 64).is_some_and(|w| w & (1 << (ms % 64)) != 0) {
                gap = gap.max(ms - last.map_or(0, |l| l));
                last = Some(ms);
            }
        }
        gap = gap.max(run_ms - last.map_or(0, |l| l));
        Summary {
            counts: self.counts,
            retried: self.retried,
            statuses: self.statuses,
            headers: self.headers,
            corrected_ms: [0.5, 0.9, 0.99, 0.999].map(|v| q(&self.corrected, v)),
            corrected_max_ms: if self.corrected.is_empty() { 0.0 } else { self.corrected.max() as f64 / 1000.0 },
            uncorrected_ms: [0.5, 0.9, 0.99, 0.999].map(|v| q(&self.uncorrected, v)),
            uncorrected_max_ms: if self.uncorrected.is_empty() { 0.0 } else { self.uncorrected.max() as f64 / 1000.0 },
            failed_ms: [0.5, 0.99].map(|v| q(&self.failed, v)),
            failed_max_ms: if self.failed.is_empty() { 0.0 } else { self.failed.max() as f64 / 1000.0 },
            max_success_gap_ms: gap as u64,
            steps: self
                .steps
                .iter()
                .map(|(&(flow, step), t)| StepSummary {
                    flow,
                    step,
                    flow_name: String::new(),
                    request: String::new(),
                    counts: t.counts,
                    p50_ms: q(&t.hist, 0.5),
                    p99_ms: q(&t.hist, 0.99),
                    max_ms: if t.hist.is_empty() { 0.0 } else { t.hist.max() as f64 / 1000.0 },
                })
                .collect(),
            timeline,
            run_ms: ms_of(run),
        }
    }
}

/// The merged result of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub counts: Counts,
    /// Requests sent again on a fresh connection after a reused one closed before answering (not outcomes: each
    /// of them is also in `counts`, once).
    pub retried: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub headers: BTreeMap<String, u64>,
    /// p50, p90, p99, p99.9 in ms, from the scheduled time.
    pub corrected_ms: [f64; 4],
    pub corrected_max_ms: f64,
    /// The same from the actual send (what coordinated omission would report).
    pub uncorrected_ms: [f64; 4],
    pub uncorrected_max_ms: f64,
    /// p50 and p99 in ms of the 5xx answers alone, from the scheduled time (0 when there were none).
    pub failed_ms: [f64; 2],
    pub failed_max_ms: f64,
    pub max_success_gap_ms: u64,
    /// A scenario's requests by flow and step, in flow then step order (empty without a scenario).
    pub steps: Vec<StepSummary>,
    pub timeline: Vec<Second>,
    pub run_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn every_outcome_lands_in_one_bucket_and_merges() {
        let mut a = Ledger::new(ms(5000));
        let mut b = Ledger::new(ms(5000));
        a.record(Outcome::from_status(200), ms(0), ms(10), Some(ms(10)), Some("v1"));
        a.record(Outcome::from_status(404), ms(5), ms(20), Some(ms(15)), None);
        b.record(Outcome::from_status(503), ms(1000), ms(1010), Some(ms(10)), Some("v2"));
        b.record(Outcome::Reset, ms(1100), ms(1200), Some(ms(100)), None);
        b.record(Outcome::Connect, ms(1200), ms(1201), None, None);
        b.record(Outcome::Timeout, ms(1300), ms(2300), Some(ms(1000)), None);
        b.record(Outcome::NotSent, ms(4000), ms(4000), None, None);
        a.record_retry();
        b.record_retry();
        let s = conclude(vec![a, b], Timeline::default(), ms(5000));
        assert_eq!(s.counts.total(), 7);
        assert_eq!(s.retried, 2, "retries merge, and are not outcomes");
        assert_eq!((s.counts.ok, s.counts.http_4xx, s.counts.http_5xx), (1, 1, 1));
        assert_eq!((s.counts.connect, s.counts.reset, s.counts.timeout, s.counts.not_sent), (1, 1, 1, 1));
        assert_eq!(s.counts.failed(), 6);
        assert_eq!(s.statuses.values().sum::<u64>(), 3);
        assert_eq!(s.headers.get("v1"), Some(&1));
        let per_second: u64 = s.timeline.iter().map(|t| t.counts.total()).sum();
        assert_eq!(per_second, 7, "the timeline accounts for every request too");
    }

    #[test]
    fn corrected_latency_counts_the_wait_before_sending() {
        let mut l = Ledger::new(ms(3000));
        // Scheduled at 0, sent at 900 (the generator waited for a free connection), answered at 1000.
        l.record(Outcome::Ok(200), ms(0), ms(1000), Some(ms(100)), None);
        let s = conclude(vec![l], Timeline::default(), ms(3000));
        assert!((s.corrected_max_ms - 1000.0).abs() < 2.0, "{}", s.corrected_max_ms);
        assert!((s.uncorrected_max_ms - 100.0).abs() < 1.0, "{}", s.uncorrected_max_ms);
    }

    #[test]
    fn longest_gap_between_successes_includes_the_edges() {
        let mut l = Ledger::new(ms(10_000));
        for t in [100, 200, 300, 2300, 2400] {
            l.record(Outcome::Ok(200), ms(t), ms(t), Some(ms(1)), None);
        }
        l.record(Outcome::Http5xx(502), ms(1000), ms(1000), Some(ms(1)), None);
        assert_eq!(conclude(vec![l], Timeline::default(), ms(3000)).max_success_gap_ms, 2000);
        let mut l = Ledger::new(ms(10_000));
        l.record(Outcome::Ok(200), ms(100), ms(100), Some(ms(1)), None);
        assert_eq!(conclude(vec![l], Timeline::default(), ms(5000)).max_success_gap_ms, 4900, "the quiet end counts");
    }

    #[test]
    fn seconds_are_merged_across_workers_before_they_are_summarised() {
        let (mut a, mut b) = (Ledger::new(ms(10_000)), Ledger::new(ms(10_000)));
        // Second 0: worker a saw 99 fast responses, worker b one slow one. Merged, p99 is the slow one's only if
        // the histograms are merged (b alone would say 900 ms at p50; a alone would say 1 ms at p99).
        for i in 0..99 {
            a.record(Outcome::Ok(200), ms(i), ms(i + 1), Some(ms(1)), Some("v1"));
        }
        b.record(Outcome::Ok(200), ms(50), ms(950), Some(ms(900)), Some("v2"));
        let mut timeline = Timeline::default();
        timeline.absorb(a.take_seconds_before(1));
        timeline.absorb(b.take_seconds_before(1));
        timeline.close_before(1);
        a.record(Outcome::Ok(200), ms(1500), ms(1600), Some(ms(100)), None); // second 1, still open in a
        let s = conclude(vec![a, b], timeline, ms(2000));
        assert_eq!(s.timeline.len(), 2);
        let first = &s.timeline[0];
        assert_eq!(first.counts.ok, 100);
        assert!(first.p50_ms < 2.0 && first.max_ms > 800.0, "{first:?}");
        assert_eq!((first.headers["v1"], first.headers["v2"]), (99, 1));
        assert_eq!(s.timeline[1].counts.total(), 1);
    }
}
