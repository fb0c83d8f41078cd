//! The adaptive concurrency limit of one server: a pure state machine that learns how many requests a server can
//! work on at once from what its answers show, with `now` passed in. No clock, no I/O, no locks: the proxy feeds it
//! one sample per answer and a tick now and then, and reads the limit.
//!
//! The rules, per window of answers (at least [`Settings::window_ms`] long):
//! - **Unloaded latency** is the lowest latency of the last [`Settings::baseline_window_ms`]: a request that found
//!   a free worker. Queueing shows as latency above it.
//! - **Latency held** (the window's mean at most [`Settings::tolerance`] times the unloaded latency) while the limit
//!   was reached: the limit grows by a tenth (at least 1).
//! - **Latency rose** past that: the limit shrinks by the ratio, at most by half (a gradient, as in Netflix's
//!   concurrency-limits): Little's law makes queueing latency fall with the limit.
//! - **Overload answers** (503, 429, refused connections) in the window: the limit shrinks by a fifth.
//! - **A stall** (requests waiting and no answer for [`Settings::stall_ms_min`], or four times the usual latency):
//!   the limit drops to the floor at once, without waiting for a window.
//! - **Slower service**: when cutting the limit for five windows in a row did not bring latency down, the server
//!   itself got slower (a new version, a cold cache): its latency now is the new unloaded latency.
//!
//! The limit never leaves `floor..=ceiling`, and it is **enforced** only once the server showed that it can be
//! overloaded: an overload answer or a stall engages it, and it stays engaged until 30 s passed with neither and
//! demand stayed under the limit for 5 s. Until then the server may be sent up to the ceiling: latency that rises
//! with concurrency on a shared, CPU-bound machine is not a server's queue, and holding requests back in the
//! proxy would only cost throughput.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What the limiter is told, with units in the names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Where the limit starts.
    pub initial: u32,
    pub floor: u32,
    /// The user's `server_in_flight_max`.
    pub ceiling: u32,
    /// Latency up to this multiple of the unloaded latency is the server working, not requests queueing in it.
    pub tolerance: f64,
    /// Shortest window of answers judged together.
    pub window_ms: u64,
    /// A window closes with at least this many answers, or when ten times its length passed.
    pub window_samples_min: u32,
    /// How long the lowest latency is remembered.
    pub baseline_window_ms: u64,
    /// No answer for this long (or four times the usual latency, if longer) while requests wait is a stall.
    pub stall_ms_min: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            initial: 8,
            floor: 1,
            ceiling: 256,
            tolerance: 2.0,
            window_ms: 100,
            window_samples_min: 8,
            baseline_window_ms: 30_000,
            stall_ms_min: 500,
        }
    }
}

/// How one answer went, for the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer whose latency says how loaded the server is (any status but an overload answer).
    Answered,
    /// The server said it is full: 503, 429, or a refused connection.
    Overload,
    /// A failure that says nothing of load (a reset, a broken connection): counted as a sign of life only.
    Failed,
}

/// Why the limit last moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Initial,
    /// Latency held near the unloaded latency while the limit was reached: grown.
    LatencyHeld,
    /// Latency rose past the tolerance: shrunk.
    LatencyRose,
    /// The server answered 503 or 429, or refused connections: shrunk.
    Overload,
    /// No answer while requests waited: dropped to the floor.
    Stalled,
    /// Cutting the limit did not bring latency down: the server got slower, and its latency now is the new norm.
    Rebaselined,
    /// The ceiling (`server_in_flight_max`) changed.
    Ceiling,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Initial => "initial",
            Why::LatencyHeld => "latency held",
            Why::LatencyRose => "latency rose",
            Why::Overload => "overload answers",
            Why::Stalled => "stalled",
            Why::Rebaselined => "server got slower",
            Why::Ceiling => "ceiling changed",
        }
    }
}

/// Growth per window while latency holds: a tenth of the limit, at least 1.
const GROWTH: f64 = 0.1;
/// Shrink per window with overload answers.
const OVERLOAD_CUT: f64 = 0.8;
/// The most one window's latency shrinks the limit by.
const LATENCY_CUT_MAX: f64 = 0.5;
/// Windows of latency cuts in a row, with latency not falling, that make the latency of now the new norm.
const REBASELINE_STREAK: u32 = 5;
/// Latency counts as not fallen while above this share of what it was when the cuts began.
const NOT_FALLEN: f64 = 0.8;
/// Baseline history: one lowest latency per bucket of this length.
const BUCKET_MS: u64 = 1_000;
/// Buckets kept at most (bounds memory whatever `baseline_window_ms` says).
const BUCKETS_MAX: usize = 600;
/// A stall is no answer for this many times the usual latency (when longer than `stall_ms_min`).
const STALL_LATENCIES: f64 = 4.0;
/// The limit stays enforced this long after the last overload answer or stall,
const ENGAGED_FOR: Duration = Duration::from_secs(30);
/// and while demand reached it within this long.
const ENGAGED_WHILE_BOUND: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
struct Window {
    start: Instant,
    samples: u32,
    answered: u32,
    sum_ns: f64,
    min_ns: u64,
    overloads: u32,
    /// An answer came while as many requests as the limit were out: the limit, not demand, bounded concurrency.
    bound: bool,
}

impl Window {
    fn new(start: Instant) -> Window {
        Window { start, samples: 0, answered: 0, sum_ns: 0.0, min_ns: u64::MAX, overloads: 0, bound: false }
    }
}

/// One server's limit.
#[derive(Debug, Clone)]
pub struct Limiter {
    s: Settings,
    limit: f64,
    why: Why,
    changed_at: Instant,
    window: Window,
    /// (bucket start, lowest latency in it), oldest first.
    buckets: VecDeque<(Instant, u64)>,
    last_answer: Instant,
    /// Smoothed mean latency of closed windows, nanoseconds (0 before the first).
    usual_ns: f64,
    /// Latency cuts in a row, and the mean latency when they began.
    cuts: u32,
    cuts_from_ns: f64,
    /// The limit is enforced (the server showed overload), since this overload answer or stall.
    engaged: Option<Instant>,
    /// When demand last reached the limit.
    last_bound: Instant,
}

/// What the limiter shows: the limit, why it last moved, and since when.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct View {
    pub limit: u32,
    pub why: Why,
    pub changed_at: Instant,
    /// The unloaded latency it judges by, if it has seen an answer.
    pub baseline: Option<Duration>,
    /// Whether the limit is enforced (the server showed overload lately); otherwise the ceiling applies.
    pub enforced: bool,
}

impl Limiter {
    pub fn new(mut s: Settings, now: Instant) -> Limiter {
        s.floor = s.floor.max(1);
        s.ceiling = s.ceiling.max(s.floor);
        let limit = f64::from(s.initial.clamp(s.floor, s.ceiling));
        Limiter {
            s,
            limit,
            why: Why::Initial,
            changed_at: now,
            window: Window::new(now),
            buckets: VecDeque::new(),
            last_answer: now,
            usual_ns: 0.0,
            cuts: 0,
            cuts_from_ns: 0.0,
            engaged: None,
            last_bound: now,
        }
    }

    /// Requests the server may be sent at once now: the limit when enforced, else the ceiling.
    pub fn effective(&self) -> u32 {
        if self.engaged.is_some() {
            self.limit()
        } else {
            self.s.ceiling
        }
    }

    /// Requests the server may be sent at once now.
    pub fn limit(&self) -> u32 {
        self.limit as u32
    }

    pub fn view(&self) -> View {
        View {
            limit: self.limit(),
            why: self.why,
            changed_at: self.changed_at,
            baseline: self.baseline_ns().map(Duration::from_nanos),
            enforced: self.engaged.is_some(),
        }
    }

    /// A new ceiling (a reload changed `server_in_flight_max`).
    pub fn set_ceiling(&mut self, ceiling: u32, now: Instant) {
        let ceiling = ceiling.max(self.s.floor);
        if ceiling == self.s.ceiling {
            return;
        }
        self.s.ceiling = ceiling;
        if self.limit > f64::from(ceiling) {
            self.set(f64::from(ceiling), Why::Ceiling, now);
        }
    }

    /// One answer (or failure) of the server: its latency, and how many requests were out to it, this one included.
    pub fn on_answer(&mut self, now: Instant, latency: Duration, in_flight: u32, outcome: Outcome) {
        self.last_answer = now;
        let w = &mut self.window;
        w.samples += 1;
        w.bound |= in_flight >= self.limit as u32;
        match outcome {
            Outcome::Answered => {
                let ns = latency.as_nanos().min(u128::from(u64::MAX)) as u64;
                w.answered += 1;
                w.sum_ns += ns as f64;
                w.min_ns = w.min_ns.min(ns);
            }
            Outcome::Overload => {
                w.overloads += 1;
                self.engaged = Some(now);
            }
            Outcome::Failed => {}
        }
        let age = now.saturating_duration_since(w.start);
        let window = Duration::from_millis(self.s.window_ms);
        if age >= window && (w.samples >= self.s.window_samples_min || age >= window * 10) {
            self.close_window(now);
        }
    }

    /// Now and then: `waiting` requests are out to the server with no answer yet. No answer for long while some
    /// wait is a stall, and the limit drops to the floor at once.
    pub fn on_tick(&mut self, now: Instant, waiting: u32) {
        if waiting == 0 || self.why == Why::Stalled {
            return;
        }
        let quiet = now.saturating_duration_since(self.last_answer);
        let stall = Duration::from_millis(self.s.stall_ms_min)
            .max(Duration::from_nanos((self.usual_ns * STALL_LATENCIES) as u64));
        if quiet >= stall {
            self.engaged = Some(now);
            self.set(f64::from(self.s.floor), Why::Stalled, now);
            self.cuts = 0;
            // What is out now was sent before the stall: its answers, when they come, say nothing of the limit.
            self.window = Window::new(now);
        }
    }

    fn baseline_ns(&self) -> Option<u64> {
        self.buckets.iter().map(|b| b.1).min()
    }

    fn close_window(&mut self, now: Instant) {
        let w = std::mem::replace(&mut self.window, Window::new(now));
        if w.answered > 0 {
            self.remember_low(now, w.min_ns);
        }
        if w.bound {
            self.last_bound = now;
        }
        if self.engaged.is_some_and(|since| now.saturating_duration_since(since) >= ENGAGED_FOR)
            && now.saturating_duration_since(self.last_bound) >= ENGAGED_WHILE_BOUND
        {
            self.engaged = None;
        }
        let mut limit = self.limit;
        let mut why = None;
        let mut cut_for_latency = false;
        if w.answered > 0 {
            let mean = w.sum_ns / f64::from(w.answered);
            self.usual_ns = if self.usual_ns == 0.0 { mean } else { self.usual_ns * 0.8 + mean * 0.2 };
            let baseline = self.baseline_ns().unwrap_or(w.min_ns) as f64;
            let allowed = self.s.tolerance * baseline.max(1.0);
            if mean > allowed {
                cut_for_latency = true;
                if self.cuts == 0 {
                    self.cuts_from_ns = mean;
                }
                self.cuts += 1;
                if self.cuts >= REBASELINE_STREAK && mean > self.cuts_from_ns * NOT_FALLEN {
                    // Fewer requests out did not make them faster: it is the server, not queueing in it.
                    self.buckets.clear();
                    self.remember_low(now, w.min_ns);
                    self.cuts = 0;
                    why = Some(Why::Rebaselined);
                } else {
                    limit *= (allowed / mean).max(LATENCY_CUT_MAX);
                    why = Some(Why::LatencyRose);
                }
            } else if w.bound && w.overloads == 0 {
                limit += (limit * GROWTH).max(1.0);
                why = Some(Why::LatencyHeld);
            }
        }
        if !cut_for_latency {
            self.cuts = 0;
        }
        if w.overloads > 0 {
            limit = limit.min(self.limit * OVERLOAD_CUT);
            why = Some(Why::Overload);
        }
        if let Some(why) = why {
            self.set(limit, why, now);
        } else if self.why == Why::Stalled {
            // Answers again: the stall is over, whatever the window showed.
            self.why = Why::LatencyHeld;
        }
    }

    fn remember_low(&mut self, now: Instant, ns: u64) {
        let keep = Duration::from_millis(self.s.baseline_window_ms);
        while self.buckets.front().is_some_and(|b| now.saturating_duration_since(b.0) > keep) {
            self.buckets.pop_front();
        }
        match self.buckets.back_mut() {
            Some(b) if now.saturating_duration_since(b.0) < Duration::from_millis(BUCKET_MS) => b.1 = b.1.min(ns),
            _ => {
                if self.buckets.len() >= BUCKETS_MAX {
                    self.buckets.pop_front();
                }
                self.buckets.push_back((now, ns));
            }
        }
    }

    fn set(&mut self, limit: f64, why: Why, now: Instant) {
        let limit = limit.clamp(f64::from(self.s.floor), f64::from(self.s.ceiling));
        if limit as u32 != self.limit as u32 || why != self.why {
            self.changed_at = now;
        }
        self.limit = limit;
        self.why = why;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// Feeds `n` answers of `latency` spread over `span`, each with `in_flight` out.
    fn feed(l: &mut Limiter, t: &mut Instant, span: Duration, n: u32, latency: Duration, in_flight: u32, o: Outcome) {
        for _ in 0..n {
            *t += span / n;
            l.on_answer(*t, latency, in_flight, o);
        }
    }

    #[test]
    fn grows_while_latency_holds_and_the_limit_is_reached() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Settings::default(), t0);
        let mut t = t0;
        feed(&mut l, &mut t, ms(110), 10, ms(20), 8, Outcome::Answered);
        assert_eq!((l.limit(), l.view().why), (9, Why::LatencyHeld));
        // Below the limit, demand bounds concurrency: no reason to grow.
        feed(&mut l, &mut t, ms(110), 10, ms(20), 3, Outcome::Answered);
        assert_eq!(l.limit(), 9);
    }

    #[test]
    fn shrinks_by_the_latency_ratio_at_most_by_half() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Settings { initial: 20, ..Settings::default() }, t0);
        let mut t = t0;
        feed(&mut l, &mut t, ms(110), 10, ms(10), 20, Outcome::Answered);
        feed(&mut l, &mut t, ms(110), 10, ms(25), 22, Outcome::Answered);
        // 22 * 20/25
        assert_eq!((l.limit(), l.view().why), (17, Why::LatencyRose));
        feed(&mut l, &mut t, ms(110), 10, ms(500), 17, Outcome::Answered);
        assert_eq!(l.limit(), 8, "at most half");
    }

    #[test]
    fn overload_answers_cut_and_never_grow() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Settings { initial: 10, ..Settings::default() }, t0);
        let mut t = t0;
        feed(&mut l, &mut t, ms(90), 8, ms(5), 10, Outcome::Answered);
        feed(&mut l, &mut t, ms(20), 1, ms(1), 10, Outcome::Overload);
        assert_eq!((l.limit(), l.view().why), (8, Why::Overload));
    }

    #[test]
    fn a_stall_drops_to_the_floor_and_answers_bring_it_back() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Settings::default(), t0);
        let mut t = t0;
        feed(&mut l, &mut t, ms(110), 10, ms(20), 8, Outcome::Answered);
        l.on_tick(t + ms(300), 8);
        assert_eq!(l.limit(), 9, "not yet");
        l.on_tick(t + ms(500), 0);
        assert_eq!(l.limit(), 9, "nothing waits: idle, not stalled");
        l.on_tick(t + ms(500), 8);
        assert_eq!((l.limit(), l.view().why), (1, Why::Stalled));
        t += ms(3000);
        // The stalled requests come back late, then fresh ones at the usual speed.
        feed(&mut l, &mut t, ms(110), 10, ms(3000), 1, Outcome::Answered);
        assert_eq!(l.limit(), 1);
        for _ in 0..10 {
            let n = l.limit();
            feed(&mut l, &mut t, ms(110), 10, ms(20), n, Outcome::Answered);
        }
        assert!(l.limit() >= 8, "{:?}", l.view());
    }

    #[test]
    fn a_slower_server_becomes_the_new_norm() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Settings { initial: 4, ..Settings::default() }, t0);
        let mut t = t0;
        feed(&mut l, &mut t, ms(110), 10, ms(10), 2, Outcome::Answered);
        // Ten times slower, whatever the limit.
        for _ in 0..REBASELINE_STREAK {
            let n = l.limit();
            feed(&mut l, &mut t, ms(110), 10, ms(100), n, Outcome::Answered);
        }
        assert_eq!(l.view().why, Why::Rebaselined);
        assert_eq!(l.view().baseline, Some(ms(100)));
        let before = l.limit();
        let n = l.limit();
        feed(&mut l, &mut t, ms(110), 10, ms(100), n, Outcome::Answered);
        assert!(l.limit() > before, "grows again: {:?}", l.view());
    }

    #[test]
    fn the_limit_is_enforced_only_after_overload_and_released_once_demand_falls() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Settings { ceiling: 64, ..Settings::default() }, t0);
        let mut t = t0;
        // Latency rising with concurrency alone (a busy CPU): the limit moves, but the ceiling applies.
        feed(&mut l, &mut t, ms(110), 10, ms(1), 8, Outcome::Answered);
        feed(&mut l, &mut t, ms(110), 10, ms(10), 40, Outcome::Answered);
        assert!(l.limit() < 64 && !l.view().enforced);
        assert_eq!(l.effective(), 64);
        feed(&mut l, &mut t, ms(20), 1, ms(1), 40, Outcome::Overload);
        assert!(l.view().enforced);
        assert_eq!(l.effective(), l.limit());
        // Demand at the limit keeps it enforced past 30 s.
        for _ in 0..300 {
            let n = l.limit();
            feed(&mut l, &mut t, ms(110), 10, ms(1), n, Outcome::Answered);
        }
        assert!(l.view().enforced);
        // Demand below it for 5 s more: released.
        for _ in 0..50 {
            feed(&mut l, &mut t, ms(110), 10, ms(1), 1, Outcome::Answered);
        }
        assert!(!l.view().enforced);
        assert_eq!(l.effective(), 64);
    }

    #[test]
    fn the_ceiling_and_floor_bound_it() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Settings { initial: 1000, ceiling: 16, ..Settings::default() }, t0);
        assert_eq!(l.limit(), 16);
        let mut t = t0;
        feed(&mut l, &mut t, ms(110), 10, ms(10), 16, Outcome::Answered);
        assert_eq!(l.limit(), 16);
        l.set_ceiling(4, t);
        assert_eq!((l.limit(), l.view().why), (4, Why::Ceiling));
        for _ in 0..10 {
            feed(&mut l, &mut t, ms(110), 10, ms(1), 4, Outcome::Overload);
        }
        assert_eq!(l.limit(), 1);
    }
}
