//! Admission control and retry accounting, as pure decisions with `now` passed in: whether a request that finds
//! every server full may wait in the service's queue or is shed at once, which servers a retried request may still
//! go to, and the retry budget.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What the queue knows when a request finds no server it can use right now.
#[derive(Debug, Clone, Copy)]
pub struct QueueView {
    /// Requests already waiting.
    pub queued: usize,
    pub queue_length_max: usize,
    /// How long a request may wait in the queue.
    pub wait_max: Duration,
    /// How long a request may wait while servers are up but full (overload).
    pub overload_wait_max: Duration,
    /// What is left of the request's own deadline.
    pub deadline_left: Duration,
    /// Concurrent requests the usable servers take in all; 0 when no server is usable (all down or restarting).
    pub slots: u64,
    /// Mean latency of the usable servers.
    pub latency: Duration,
    /// Requests arriving per second, lately.
    pub arrival_rate: f64,
    /// The queue may still hold requests that arrived while no server was serving: it is an outage's backlog,
    /// which the servers, just back and warming up, work off more slowly than they will serve later. It is not
    /// overload.
    pub after_outage: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Wait in the queue for at most this long.
    Wait(Duration),
    /// Answer 503 with Retry-After now.
    Shed(ShedReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    QueueFull,
    /// The queue ahead is longer than the servers can work through in time.
    WaitTooLong {
        expected_ms: u64,
    },
    /// The request's deadline leaves no time to wait.
    NoTimeLeft,
}

/// Arrivals must outpace the servers' estimated capacity by this factor to count as overload: the estimate is
/// rough (servers slow down while they work off a backlog), and a backlog that drains by itself must not be shed.
pub const OVERLOAD_FACTOR: f64 = 1.5;

/// Decides between waiting and shedding for a request that found every server full or down.
pub fn admit(v: &QueueView) -> Admit {
    if v.queued >= v.queue_length_max {
        return Admit::Shed(ShedReason::QueueFull);
    }
    let limit = v.wait_max.min(v.deadline_left);
    if limit.is_zero() {
        return Admit::Shed(ShedReason::NoTimeLeft);
    }
    if v.slots == 0 {
        // Nothing is serving: the servers are restarting, so waiting for them is the point of the queue.
        return Admit::Wait(limit);
    }
    // Little's law: the requests ahead (and this one) leave at `slots` per `latency`.
    // While requests arrive faster than the servers can answer them (overload), the queue would only grow: keep
    // it short, and shed at once what would wait longer. Otherwise (a backlog after the servers came back) it
    // drains by itself: a request waits, bounded by the queue's length and the wait limit (the estimate is least
    // reliable right then, as restarted servers warm up).
    let capacity_rate = v.slots as f64 / v.latency.as_secs_f64().max(1e-6);
    let overloaded = v.arrival_rate > capacity_rate * OVERLOAD_FACTOR && !v.after_outage;
    let expected = v.latency.mul_f64((v.queued + 1) as f64 / v.slots as f64);
    if overloaded && expected > limit.min(v.overload_wait_max) {
        return Admit::Shed(ShedReason::WaitTooLong { expected_ms: expected.as_millis() as u64 });
    }
    Admit::Wait(limit)
}

/// After a failure that never reached the server, the same server may be tried again by the same request after
/// this long (it may have come back); after one that reached it, only once it has come back up.
pub const RETRY_SAME_SERVER_AFTER: Duration = Duration::from_secs(1);

/// The servers one request has tried.
#[derive(Debug, Default, Clone)]
pub struct Tried {
    entries: Vec<TriedEntry>,
    /// A server on trial (a deploy's new version) failed this request: prefer others, standby ones included.
    avoid_trial: bool,
}

#[derive(Debug, Clone, Copy)]
struct TriedEntry {
    addr: SocketAddr,
    epoch: u64,
    at: Instant,
    reached: bool,
}

impl Tried {
    pub fn push(&mut self, addr: SocketAddr, epoch: u64, at: Instant, reached: bool) {
        self.entries.retain(|e| e.addr != addr);
        self.entries.push(TriedEntry { addr, epoch, at, reached });
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn set_avoid_trial(&mut self) {
        self.avoid_trial = true;
    }

    pub fn avoid_trial(&self) -> bool {
        self.avoid_trial
    }

    /// Whether this request may go to `addr`, whose current epoch is `epoch`: it never tried it, or the server
    /// came back up since, or the try never reached it and was long enough ago.
    pub fn allows(&self, addr: SocketAddr, epoch: u64, now: Instant) -> bool {
        match self.entries.iter().find(|e| e.addr == addr) {
            None => true,
            Some(e) => {
                e.epoch != epoch || (!e.reached && now.saturating_duration_since(e.at) >= RETRY_SAME_SERVER_AFTER)
            }
        }
    }

    /// The earliest time a server this request tried becomes allowed again by the clock alone.
    pub fn next_allowed(&self) -> Option<Instant> {
        self.entries.iter().filter(|e| !e.reached).map(|e| e.at + RETRY_SAME_SERVER_AFTER).min()
    }
}

/// Seconds of history the retry budget looks at.
const BUDGET_WINDOW_S: usize = 10;

/// Retries (of requests that reached a server) stay under a share of requests, with a floor per second, over a
/// sliding window of seconds.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    origin: Instant,
    /// (second, requests, retries), indexed by second modulo the window.
    slots: [(u64, u64, u64); BUDGET_WINDOW_S],
}

impl RetryBudget {
    pub fn new(origin: Instant) -> RetryBudget {
        RetryBudget { origin, slots: [(u64::MAX, 0, 0); BUDGET_WINDOW_S] }
    }

    fn slot(&mut self, now: Instant) -> &mut (u64, u64, u64) {
        let sec = now.saturating_duration_since(self.origin).as_secs();
        let slot = &mut self.slots[(sec % BUDGET_WINDOW_S as u64) as usize];
        if slot.0 != sec {
            *slot = (sec, 0, 0);
        }
        slot
    }

    fn totals(&self, now: Instant) -> (u64, u64) {
        let sec = now.saturating_duration_since(self.origin).as_secs();
        self.slots
            .iter()
            .filter(|s| s.0 != u64::MAX && s.0 <= sec && sec - s.0 < BUDGET_WINDOW_S as u64)
            .fold((0, 0), |(r, t), s| (r + s.1, t + s.2))
    }

    pub fn record_request(&mut self, now: Instant) {
        self.slot(now).1 += 1;
    }

    /// Requests per second over the current second so far and the one before it.
    pub fn request_rate(&self, now: Instant) -> f64 {
        let since = now.saturating_duration_since(self.origin);
        let sec = since.as_secs();
        let count = |s: u64| self.slots[(s % BUDGET_WINDOW_S as u64) as usize];
        let current = count(sec);
        let current = if current.0 == sec { current.1 } else { 0 };
        let previous = match sec.checked_sub(1) {
            Some(p) if count(p).0 == p => count(p).1,
            _ => 0,
        };
        let span = 1.0 + f64::from(since.subsec_millis()) / 1000.0;
        (current + previous) as f64 / span
    }

    /// Takes one retry from the budget, if it has one.
    pub fn try_retry(&mut self, now: Instant, percent: u32, min_per_s: u32) -> bool {
        let (requests, retries) = self.totals(now);
        let allowed = (requests * u64::from(percent) / 100).max(u64::from(min_per_s) * BUDGET_WINDOW_S as u64);
        if retries >= allowed {
            return false;
        }
        self.slot(now).2 += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> QueueView {
        QueueView {
            queued: 0,
            queue_length_max: 100,
            wait_max: Duration::from_secs(10),
            overload_wait_max: Duration::from_secs(1),
            deadline_left: Duration::from_secs(60),
            slots: 4,
            latency: Duration::from_millis(10),
            // 4 slots of 10 ms answer 400 requests/s: these tests are overloaded unless they say otherwise.
            arrival_rate: 1000.0,
            after_outage: false,
        }
    }

    #[test]
    fn waits_while_the_queue_drains_in_time() {
        assert_eq!(admit(&view()), Admit::Wait(Duration::from_secs(10)));
        // 99 ahead, 4 slots of 10 ms: 250 ms, under the overload bound of 1 s.
        assert_eq!(
            admit(&QueueView { queued: 99, queue_length_max: 1000, ..view() }),
            Admit::Wait(Duration::from_secs(10))
        );
    }

    #[test]
    fn sheds_when_full_or_too_slow() {
        assert_eq!(admit(&QueueView { queued: 100, ..view() }), Admit::Shed(ShedReason::QueueFull));
        let slow = QueueView { queued: 500, queue_length_max: 1000, ..view() };
        assert_eq!(admit(&slow), Admit::Shed(ShedReason::WaitTooLong { expected_ms: 1252 }));
        let late = QueueView { deadline_left: Duration::from_millis(50), queued: 30, ..view() };
        assert_eq!(admit(&late), Admit::Shed(ShedReason::WaitTooLong { expected_ms: 77 }));
        assert_eq!(admit(&QueueView { deadline_left: Duration::ZERO, ..view() }), Admit::Shed(ShedReason::NoTimeLeft));
    }

    #[test]
    fn a_backlog_that_drains_by_itself_may_wait_longer() {
        // 500 ahead take 1.25 s: too long under overload, fine when arrivals are below capacity.
        let backlog = QueueView { queued: 500, queue_length_max: 1000, arrival_rate: 300.0, ..view() };
        assert_eq!(admit(&backlog), Admit::Wait(Duration::from_secs(10)));
        // Even past the wait limit by the estimate: the length and the wait limit bound it instead.
        let long = QueueView { queued: 4500, queue_length_max: 5000, arrival_rate: 300.0, ..view() };
        assert_eq!(admit(&long), Admit::Wait(Duration::from_secs(10)));
    }

    #[test]
    fn an_outage_backlog_is_not_overload() {
        // Servers just back, slow while they warm up (40 ms for 6 slots: 150/s under 300/s arriving), with the
        // 1,500 requests that arrived during a 5 s outage ahead: overload by the estimate, but not in fact.
        let warming = QueueView {
            queued: 1500,
            queue_length_max: 5000,
            slots: 6,
            latency: Duration::from_millis(40),
            arrival_rate: 300.0,
            ..view()
        };
        assert_eq!(admit(&warming), Admit::Shed(ShedReason::WaitTooLong { expected_ms: 10006 }));
        assert_eq!(admit(&QueueView { after_outage: true, ..warming }), Admit::Wait(Duration::from_secs(10)));
        // The queue's length still bounds it.
        let full = QueueView { queued: 5000, after_outage: true, ..warming };
        assert_eq!(admit(&full), Admit::Shed(ShedReason::QueueFull));
    }

    #[test]
    fn request_rate_counts_the_last_second_and_this_one() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(t0);
        for _ in 0..300 {
            b.record_request(t0 + Duration::from_millis(500));
        }
        for _ in 0..150 {
            b.record_request(t0 + Duration::from_millis(1200));
        }
        let r = b.request_rate(t0 + Duration::from_millis(1500));
        assert!((r - 300.0).abs() < 1e-9, "{r}");
        assert_eq!(b.request_rate(t0 + Duration::from_secs(5)), 0.0);
    }

    #[test]
    fn waits_for_servers_that_are_all_down() {
        let down = QueueView { slots: 0, queued: 99, ..view() };
        assert_eq!(admit(&down), Admit::Wait(Duration::from_secs(10)));
        let short = QueueView { slots: 0, deadline_left: Duration::from_secs(3), ..view() };
        assert_eq!(admit(&short), Admit::Wait(Duration::from_secs(3)));
    }

    #[test]
    fn tried_servers_come_back_by_epoch_or_time() {
        let t0 = Instant::now();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let mut tried = Tried::default();
        tried.push(a, 3, t0, false);
        tried.push(b, 7, t0, true);
        assert!(!tried.allows(a, 3, t0));
        assert!(tried.allows(a, 3, t0 + RETRY_SAME_SERVER_AFTER), "never reached: allowed again after a while");
        assert!(tried.allows(a, 4, t0), "came back up");
        assert!(!tried.allows(b, 7, t0 + Duration::from_secs(60)), "reached: only after coming back up");
        assert!(tried.allows(b, 8, t0));
        assert_eq!(tried.next_allowed(), Some(t0 + RETRY_SAME_SERVER_AFTER));
    }

    #[test]
    fn retry_budget_has_a_floor_and_a_share() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(t0);
        // No requests yet: the floor of 3 per second over the 10 s window allows 30.
        let granted = (0..100).filter(|_| b.try_retry(t0, 20, 3)).count();
        assert_eq!(granted, 30);
        let t1 = t0 + Duration::from_secs(11);
        for _ in 0..1000 {
            b.record_request(t1);
        }
        let granted = (0..1000).filter(|_| b.try_retry(t1, 20, 3)).count();
        assert_eq!(granted, 200, "20% of 1000 requests");
        let t2 = t1 + Duration::from_secs(10);
        assert!(b.try_retry(t2, 20, 3), "the window slid past them");
    }
}
