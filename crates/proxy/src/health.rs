//! Whether one server may take requests: active health checks (rise and fall), passive ejection with a growing
//! back-off, and the slow-start ramp after a recovery. A pure state machine: every call is given `now`.

use std::time::{Duration, Instant};

/// The service's health settings, from its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub rise: u32,
    pub fall: u32,
    pub eject: bool,
    pub eject_after: u32,
    pub eject_base: Duration,
    pub eject_max: Duration,
    pub slow_start: Duration,
}

impl Policy {
    pub fn of(svc: &nonstop_config::Service) -> Policy {
        Policy {
            rise: svc.health.rise,
            fall: svc.health.fall,
            eject: svc.eject.enabled,
            eject_after: svc.eject.consecutive_failures,
            eject_base: svc.eject.base,
            eject_max: svc.eject.max,
            slow_start: svc.slow_start,
        }
    }
}

/// What a call changed, for logs and for waking the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    /// Active checks took the server down.
    Down,
    /// Active checks brought the server back up.
    Up,
    /// Passive ejection, for this long.
    Ejected(Duration),
    /// The server should have been ejected, but the pool's ejection share is used up (fail open).
    EjectRefused,
}

/// Logging of a condition that a pool may meet on every request (its ejection share used up while every server
/// fails): the condition's start is logged at once (at most once per [`Repeats::CHANGE_EVERY`], if it comes and
/// goes), and while it lasts, one line per [`Repeats::REPEAT_EVERY`] says how many times it recurred unlogged.
#[derive(Debug, Clone, Default)]
pub struct Repeats {
    active: bool,
    logged: Option<Instant>,
    unlogged: u64,
}

impl Repeats {
    pub const CHANGE_EVERY: Duration = Duration::from_secs(1);
    pub const REPEAT_EVERY: Duration = Duration::from_secs(10);

    /// The condition happened now: `Some(n)` when a line is due, `n` being the times it happened since the last
    /// line without one.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        let since = self.logged.map(|t| now.saturating_duration_since(t));
        let due = match since {
            None => true,
            Some(d) if !self.active => d >= Self::CHANGE_EVERY,
            Some(d) => d >= Self::REPEAT_EVERY,
        };
        self.active = true;
        if !due {
            self.unlogged += 1;
            return None;
        }
        self.logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }

    /// The condition ended; its next start is a change again.
    pub fn end(&mut self) {
        self.active = false;
    }
}

/// The share of requests a ramping server starts with.
pub const RAMP_FLOOR: f64 = 0.1;

#[derive(Debug, Clone)]
pub struct Health {
    up: bool,
    /// Consecutive active passes while down, or failures while up.
    streak: u32,
    /// Consecutive failed requests.
    failures: u32,
    ejected_until: Option<Instant>,
    /// Ejections in a row without a success in between: the back-off exponent.
    ejections: u32,
    /// Set when an ejection ends: the next failure ejects again at once, the next success clears it.
    probation: bool,
    /// When the server last became usable (for slow start).
    ready_since: Instant,
    /// Counts the times the server became usable again, so a request that failed on it can tell.
    epoch: u64,
}

impl Health {
    /// A server that starts up. `warm`: it takes its full share at once (servers present when the proxy starts);
    /// otherwise it ramps up over the slow-start time.
    pub fn new(now: Instant, warm: bool, p: &Policy) -> Health {
        let ready_since = if warm { now.checked_sub(p.slow_start).unwrap_or(now) } else { now };
        Health {
            up: true,
            streak: 0,
            failures: 0,
            ejected_until: None,
            ejections: 0,
            probation: false,
            ready_since,
            epoch: 0,
        }
    }

    /// Turns an ejection that has run out into a recovery.
    fn refresh(&mut self, now: Instant) {
        if let Some(until) = self.ejected_until {
            if now >= until {
                self.ejected_until = None;
                self.probation = true;
                if self.up {
                    self.ready_since = until;
                    self.epoch += 1;
                }
            }
        }
    }

    pub fn up(&self) -> bool {
        self.up
    }

    pub fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|u| now < u)
    }

    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }

    /// May take requests: up by active checks, and not ejected.
    pub fn usable(&self, now: Instant) -> bool {
        self.up && !self.ejected(now)
    }

    pub fn epoch(&mut self, now: Instant) -> u64 {
        self.refresh(now);
        self.epoch
    }

    /// True while a success would change something (so that callers can skip reporting plain successes).
    pub fn wants_success(&self) -> bool {
        self.failures > 0 || self.probation || self.ejections > 0
    }

    /// The share (from [`RAMP_FLOOR`] to 1) of its normal traffic the server takes while slow-starting.
    pub fn ramp(&self, now: Instant, p: &Policy) -> f64 {
        if p.slow_start.is_zero() {
            return 1.0;
        }
        // An ejection that ran out but was not refreshed yet counts as a recovery at its end.
        let since = match self.ejected_until {
            Some(until) if until <= now && self.up => self.ready_since.max(until),
            _ => self.ready_since,
        };
        let f = now.saturating_duration_since(since).as_secs_f64() / p.slow_start.as_secs_f64();
        f.clamp(RAMP_FLOOR, 1.0)
    }

    /// The server's process is known to be gone: down at once, without waiting for checks to fail.
    pub fn force_down(&mut self) -> Transition {
        self.streak = 0;
        if std::mem::replace(&mut self.up, false) {
            Transition::Down
        } else {
            Transition::None
        }
    }

    /// One active check's result.
    pub fn on_check(&mut self, now: Instant, passed: bool, p: &Policy) -> Transition {
        self.refresh(now);
        if passed == self.up {
            self.streak = 0;
            return Transition::None;
        }
        self.streak += 1;
        if self.up && self.streak >= p.fall {
            self.up = false;
            self.streak = 0;
            return Transition::Down;
        }
        if !self.up && self.streak >= p.rise {
            self.up = true;
            self.streak = 0;
            self.failures = 0;
            if !self.ejected(now) {
                self.ready_since = now;
                self.epoch += 1;
            }
            return Transition::Up;
        }
        Transition::None
    }

    /// One real request's result. `may_eject` is false when ejecting this server would take the pool past its
    /// ejection share.
    pub fn on_result(&mut self, now: Instant, failed: bool, may_eject: bool, p: &Policy) -> Transition {
        self.refresh(now);
        if !failed {
            self.failures = 0;
            self.probation = false;
            self.ejections = 0;
            return Transition::None;
        }
        self.failures += 1;
        if !p.eject || self.ejected(now) || (self.failures < p.eject_after && !self.probation) {
            return Transition::None;
        }
        if !may_eject {
            return Transition::EjectRefused;
        }
        let factor = 1u32 << self.ejections.min(16);
        let length = p.eject_base.saturating_mul(factor).min(p.eject_max);
        self.ejected_until = Some(now + length);
        self.ejections += 1;
        self.failures = 0;
        self.probation = false;
        Transition::Ejected(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            rise: 2,
            fall: 2,
            eject: true,
            eject_after: 3,
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(5),
            slow_start: Duration::from_secs(10),
        }
    }

    #[test]
    fn repeats_log_a_change_once_and_repeats_at_most_every_ten_seconds() {
        let t0 = Instant::now();
        let mut r = Repeats::default();
        assert_eq!(r.hit(t0), Some(0), "the first occurrence is logged");
        let lines = (1..=473u64).filter(|i| r.hit(t0 + Duration::from_millis(2 * i)).is_some()).count();
        assert_eq!(lines, 0, "473 repeats within a second: no line");
        assert_eq!(r.hit(t0 + Repeats::REPEAT_EVERY), Some(473), "then one line, with the count");
        r.end();
        assert_eq!(r.hit(t0 + Repeats::REPEAT_EVERY + Duration::from_millis(10)), None, "flapping is rate-limited");
        r.end();
        let later = t0 + Repeats::REPEAT_EVERY + Repeats::CHANGE_EVERY;
        assert_eq!(r.hit(later), Some(1), "a new start a second later is logged");
    }

    #[test]
    fn fall_and_rise_thresholds() {
        let p = policy();
        let t0 = Instant::now();
        let mut h = Health::new(t0, true, &p);
        assert_eq!(h.on_check(t0, false, &p), Transition::None);
        assert_eq!(h.on_check(t0, true, &p), Transition::None, "a pass resets the failure streak");
        assert_eq!(h.on_check(t0, false, &p), Transition::None);
        assert_eq!(h.on_check(t0, false, &p), Transition::Down);
        assert!(!h.usable(t0));
        let epoch = h.epoch(t0);
        assert_eq!(h.on_check(t0, true, &p), Transition::None);
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(h.on_check(t1, true, &p), Transition::Up);
        assert!(h.usable(t1));
        assert_eq!(h.epoch(t1), epoch + 1, "coming back up is a new epoch");
        assert_eq!(h.ramp(t1, &p), RAMP_FLOOR, "slow start begins at the floor");
        assert!((h.ramp(t1 + Duration::from_secs(5), &p) - 0.5).abs() < 1e-9);
        assert_eq!(h.ramp(t1 + Duration::from_secs(20), &p), 1.0);
    }

    #[test]
    fn warm_servers_take_their_full_share() {
        let p = policy();
        let t0 = Instant::now();
        assert_eq!(Health::new(t0, true, &p).ramp(t0, &p), 1.0);
        assert_eq!(Health::new(t0, false, &p).ramp(t0, &p), RAMP_FLOOR);
    }

    #[test]
    fn ejection_backs_off_and_probation_re_ejects_at_once() {
        let p = policy();
        let t0 = Instant::now();
        let mut h = Health::new(t0, true, &p);
        assert_eq!(h.on_result(t0, true, true, &p), Transition::None);
        assert_eq!(h.on_result(t0, true, true, &p), Transition::None);
        assert_eq!(h.on_result(t0, true, true, &p), Transition::Ejected(Duration::from_secs(1)));
        assert!(!h.usable(t0 + Duration::from_millis(999)));
        let t1 = t0 + Duration::from_secs(1);
        let e = h.epoch(t1);
        assert!(h.usable(t1));
        assert!(e > 0);
        // On probation: one failure ejects again, for twice as long.
        assert_eq!(h.on_result(t1, true, true, &p), Transition::Ejected(Duration::from_secs(2)));
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(h.on_result(t2, true, true, &p), Transition::Ejected(Duration::from_secs(4)));
        let t3 = t2 + Duration::from_secs(4);
        assert_eq!(h.on_result(t3, true, true, &p), Transition::Ejected(Duration::from_secs(5)), "capped");
        // A success after the ejection clears the back-off.
        let t4 = t3 + Duration::from_secs(5);
        assert!(h.wants_success());
        assert_eq!(h.on_result(t4, false, true, &p), Transition::None);
        assert!(!h.wants_success());
        for _ in 0..2 {
            assert_eq!(h.on_result(t4, true, true, &p), Transition::None);
        }
        assert_eq!(h.on_result(t4, true, true, &p), Transition::Ejected(Duration::from_secs(1)));
    }

    #[test]
    fn ejection_share_fails_open() {
        let p = policy();
        let t0 = Instant::now();
        let mut h = Health::new(t0, true, &p);
        h.on_result(t0, true, false, &p);
        h.on_result(t0, true, false, &p);
        assert_eq!(h.on_result(t0, true, false, &p), Transition::EjectRefused);
        assert!(h.usable(t0));
    }

    #[test]
    fn ejection_off_never_ejects() {
        let p = Policy { eject: false, ..policy() };
        let t0 = Instant::now();
        let mut h = Health::new(t0, true, &p);
        for _ in 0..10 {
            assert_eq!(h.on_result(t0, true, true, &p), Transition::None);
        }
        assert!(h.usable(t0));
    }

    #[test]
    fn recovering_while_ejected_waits_for_the_ejection() {
        let p = policy();
        let t0 = Instant::now();
        let mut h = Health::new(t0, true, &p);
        for _ in 0..3 {
            h.on_result(t0, true, true, &p);
        }
        h.on_check(t0, false, &p);
        h.on_check(t0, false, &p);
        h.on_check(t0, true, &p);
        assert_eq!(h.on_check(t0, true, &p), Transition::Up);
        assert!(!h.usable(t0), "still ejected");
        let t1 = t0 + Duration::from_secs(1);
        assert!(h.usable(t1));
        assert_eq!(h.ramp(t1, &p), RAMP_FLOOR, "slow start runs from the end of the ejection");
    }
}
