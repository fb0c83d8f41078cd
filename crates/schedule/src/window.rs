//! Delivery windows: a window opens at each fire time of a cron and stays open for a fixed duration.

use crate::cron::Cron;

/// How many back-to-back openings [`Window::closes_at_ms`] follows before it stops looking further.
const CHAIN_CAP: usize = 1000;

/// A delivery window: opens at each fire time of a cron and stays open for `duration_ms`. A window with a
/// duration of 0 never opens.
#[derive(Debug, Clone)]
pub struct Window {
    cron: Cron,
    duration_ms: u64,
}

impl Window {
    pub fn new(cron: Cron, duration_ms: u64) -> Window {
        Window { cron, duration_ms }
    }

    pub fn cron(&self) -> &Cron {
        &self.cron
    }

    pub fn duration_ms(&self) -> u64 {
        self.duration_ms
    }

    /// The start of the latest opening that covers `now_ms`, if the window is open.
    fn opened_at(&self, now_ms: u64) -> Option<u64> {
        // The latest fire time at or before now closes last, so it alone decides.
        let t = self.cron.last_at_or_before(now_ms)?;
        (now_ms < t.saturating_add(self.duration_ms)).then_some(t)
    }

    /// Whether the window is open at `now_ms`: some fire time t with t <= now_ms < t + duration_ms.
    pub fn is_open(&self, now_ms: u64) -> bool {
        self.opened_at(now_ms).is_some()
    }

    /// When it next opens: `now_ms` itself when open now, else the next fire time; None if it never opens again.
    pub fn next_open_ms(&self, now_ms: u64) -> Option<u64> {
        if self.duration_ms == 0 {
            return None;
        }
        if self.is_open(now_ms) {
            return Some(now_ms);
        }
        self.cron.next_after(now_ms)
    }

    /// When the current opening closes (the first instant it is closed), if open now. Openings that begin before
    /// the previous one has closed run together and are followed (up to 1000 of them).
    pub fn closes_at_ms(&self, now_ms: u64) -> Option<u64> {
        let opened = self.opened_at(now_ms)?;
        let mut closes = opened.saturating_add(self.duration_ms);
        let mut from = now_ms;
        for _ in 0..CHAIN_CAP {
            match self.cron.next_after(from) {
                Some(next) if next <= closes => {
                    closes = closes.max(next.saturating_add(self.duration_ms));
                    from = next;
                }
                _ => break,
            }
        }
        Some(closes)
    }
}
