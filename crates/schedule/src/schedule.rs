//! The pure scheduler of one schedule: when it is next due, what is due when the caller wakes (at most one run, the
//! rest counted as skipped), and what to do on start with fire times missed while nonstop was not running.

use std::fmt;

use crate::cron::Cron;

/// Missed and skipped fire times are counted up to this many; a count of `COUNT_CAP` means "this many or more".
pub const COUNT_CAP: u64 = 1000;

/// What to do with fire times missed while nonstop was not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Missed {
    /// Missed fire times are not run (they are counted and reported).
    #[default]
    Skip,
    /// If any fire time was missed, one run (never more) is due at once.
    RunOnce,
}

impl Missed {
    /// `"skip"` or `"run_once"`.
    pub fn parse(text: &str) -> Result<Missed, String> {
        match text {
            "skip" => Ok(Missed::Skip),
            "run_once" => Ok(Missed::RunOnce),
            other => Err(format!("missed = \"{other}\" is not one of \"skip\", \"run_once\"")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Missed::Skip => "skip",
            Missed::RunOnce => "run_once",
        }
    }
}

impl std::str::FromStr for Missed {
    type Err = String;
    fn from_str(text: &str) -> Result<Missed, String> {
        Missed::parse(text)
    }
}

impl fmt::Display for Missed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bounded count of fire times: exact below [`COUNT_CAP`], "COUNT_CAP or more" at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Count(pub u64);

impl Count {
    /// Whether the count hit the cap (the real number may be larger).
    pub fn is_capped(self) -> bool {
        self.0 >= COUNT_CAP
    }
}

impl fmt::Display for Count {
    /// `3`, or `1000 or more`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_capped() {
            write!(f, "{COUNT_CAP} or more")
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// What [`Schedule::start`] decided about the fire times missed while nonstop was not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartDecision {
    /// How many fire times in `(last_due_ms, now_ms]` were missed (0 on first start).
    pub missed: Count,
    /// With [`Missed::RunOnce`] and at least one missed: the run due at once, scheduled at the latest missed fire
    /// time (the caller stores it as the new `last_due_ms`). None otherwise.
    pub run_now: Option<u64>,
}

/// A fire time that is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// The fire time this run is for (Unix ms, at or before the wake-up time).
    pub scheduled_ms: u64,
    /// Earlier fire times that passed since the previous due one and are not run (the caller woke late).
    pub skipped: Count,
}

/// The pure scheduler of one schedule: when it is due, and how missed fire times are treated.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    missed: Missed,
    next: Option<u64>,
}

impl Schedule {
    /// Starts the schedule at `now_ms`. `last_due_ms` is the fire time of the last run started by this schedule, as
    /// stored by the caller (None on first start: nothing counts as missed). With [`Missed::RunOnce`], if one or
    /// more fire times in `(last_due_ms, now_ms]` were missed, one run is due at once (never more than one, however
    /// many were missed); with [`Missed::Skip`] none is run. Either way the decision counts the missed ones.
    pub fn start(cron: Cron, missed: Missed, last_due_ms: Option<u64>, now_ms: u64) -> (Schedule, StartDecision) {
        let decision = match last_due_ms {
            None => StartDecision { missed: Count(0), run_now: None },
            Some(last) => {
                let latest = cron.last_between(last, now_ms);
                let count = match latest {
                    Some(_) => Count(cron.count_between(last, now_ms, COUNT_CAP)),
                    None => Count(0),
                };
                let run_now = match missed {
                    Missed::RunOnce => latest,
                    Missed::Skip => None,
                };
                StartDecision { missed: count, run_now }
            }
        };
        let next = cron.next_after(now_ms);
        (Schedule { cron, missed, next }, decision)
    }

    pub fn cron(&self) -> &Cron {
        &self.cron
    }

    pub fn missed(&self) -> Missed {
        self.missed
    }

    /// The next time the caller should wake (Unix ms), for a sleep_until; None if it never fires again.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.next
    }

    /// Called when the caller wakes: the fire time that is due (at or before `now_ms`), at most one. If the caller
    /// woke late and several fire times passed, only the latest is returned and the others are counted as skipped.
    /// Advances the schedule past `now_ms`; None (and nothing changes) when nothing is due yet.
    pub fn due(&mut self, now_ms: u64) -> Option<Due> {
        let next = self.next?;
        if now_ms < next {
            return None;
        }
        // `next` is a fire time at or before now, so the latest one is at least `next`.
        let latest = self.cron.last_at_or_before(now_ms).filter(|&t| t >= next).unwrap_or(next);
        let skipped = if latest > next { 1 + self.cron.count_between(next, latest - 1, COUNT_CAP - 1) } else { 0 };
        self.next = self.cron.next_after(now_ms);
        Some(Due { scheduled_ms: latest, skipped: Count(skipped) })
    }
}
