//! The concurrency policy of one pipeline as a pure state machine: which run starts, waits, is superseded,
//! skipped or cancelled when runs are triggered and end.

use nonstop_config::Concurrency;

/// What to do with a run just triggered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start it now.
    Start,
    /// It waits; `superseded` is the waiting run it replaced, which ends as superseded.
    Wait { superseded: Option<u64> },
    /// It is not run: `running` is still going (forbid).
    Skip { running: u64 },
    /// Cancel `cancel`, and start the new one when it ended; `superseded` as with [`Decision::Wait`].
    CancelThenWait { cancel: u64, superseded: Option<u64> },
}

/// One pipeline's lane: at most one run running, at most one waiting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lane {
    running: Option<u64>,
    waiting: Option<u64>,
}

impl Lane {
    pub fn running(&self) -> Option<u64> {
        self.running
    }

    pub fn waiting(&self) -> Option<u64> {
        self.waiting
    }

    /// Run `n` was triggered.
    pub fn trigger(&mut self, n: u64, policy: Concurrency) -> Decision {
        let Some(running) = self.running else {
            self.running = Some(n);
            return Decision::Start;
        };
        match policy {
            Concurrency::Forbid => Decision::Skip { running },
            Concurrency::Queue => Decision::Wait { superseded: self.waiting.replace(n) },
            Concurrency::Cancel => Decision::CancelThenWait { cancel: running, superseded: self.waiting.replace(n) },
        }
    }

    /// A run that waited is gone by other means (cancelled while waiting).
    pub fn forget(&mut self, n: u64) {
        if self.waiting == Some(n) {
            self.waiting = None;
        }
    }

    /// Run `n` ended; the run to start next, if one waits.
    pub fn ended(&mut self, n: u64) -> Option<u64> {
        if self.running != Some(n) {
            self.forget(n);
            return None;
        }
        self.running = self.waiting.take();
        self.running
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Concurrency::*;

    #[test]
    fn queue_keeps_one_waiting_and_the_newest_wins() {
        let mut l = Lane::default();
        assert_eq!(l.trigger(1, Queue), Decision::Start);
        assert_eq!(l.trigger(2, Queue), Decision::Wait { superseded: None });
        assert_eq!(l.trigger(3, Queue), Decision::Wait { superseded: Some(2) });
        assert_eq!(l.ended(1), Some(3));
        assert_eq!(l.running(), Some(3));
        assert_eq!(l.ended(3), None);
        assert_eq!(l.trigger(4, Queue), Decision::Start);
    }

    #[test]
    fn forbid_skips_while_one_runs() {
        let mut l = Lane::default();
        assert_eq!(l.trigger(1, Forbid), Decision::Start);
        assert_eq!(l.trigger(2, Forbid), Decision::Skip { running: 1 });
        assert_eq!(l.ended(1), None);
        assert_eq!(l.trigger(3, Forbid), Decision::Start);
    }

    #[test]
    fn cancel_cancels_the_running_one_and_starts_after_it() {
        let mut l = Lane::default();
        assert_eq!(l.trigger(1, Cancel), Decision::Start);
        assert_eq!(l.trigger(2, Cancel), Decision::CancelThenWait { cancel: 1, superseded: None });
        assert_eq!(l.trigger(3, Cancel), Decision::CancelThenWait { cancel: 1, superseded: Some(2) });
        assert_eq!(l.ended(1), Some(3));
    }

    #[test]
    fn a_waiting_run_cancelled_is_forgotten() {
        let mut l = Lane::default();
        l.trigger(1, Queue);
        l.trigger(2, Queue);
        assert_eq!(l.ended(2), None);
        assert_eq!(l.waiting(), None);
        assert_eq!(l.ended(1), None);
        assert_eq!(l.running(), None);
    }
}
