//! Pure decision logic for schedules: no I/O, no sleeps, no clock. Every `now` is passed in as Unix milliseconds
//! (`u64`), and the caller sleeps, runs and stores.
//!
//! - [`Cron`]: a cron expression (5 fields, or 6 with seconds first) in an IANA time zone, with Jenkins-style `H`
//!   (`H`, `H(a-b)`, `H/n`, `H(a-b)/n`) resolved by a stable hash of a seed (the pipeline or job name) so that
//!   different names spread over the hour while one name always gets the same time, and the aliases @yearly
//!   @annually @monthly @weekly @daily @midnight @hourly (H-spread as in Jenkins). [`Cron::resolved`] shows the
//!   expression as it runs.
//! - [`Schedule`]: when one schedule is next due, what is due when the caller wakes (at most one run; fire times
//!   passed while it slept late are counted as skipped), and on start what to do with fire times missed while
//!   nonstop was not running ([`Missed::Skip`] or [`Missed::RunOnce`]).
//! - [`Window`]: a delivery window that opens at each fire time of a cron and stays open for a duration.
//!
//! # Time zones and daylight saving time
//!
//! Fire times are wall-clock times in the cron's zone, found by [croner](https://docs.rs/croner) (which follows the
//! Open Cron Pattern Specification and Vixie cron). The rule on DST transitions depends on the kind of job:
//!
//! - A **fixed-time** job has exactly one second, one minute and one hour (e.g. `30 2 * * *`, or `H H * * *` once
//!   H is resolved to single values). When its local time falls into a gap (clocks spring forward, e.g.
//!   02:00-03:00 does not exist), it fires once at the first valid instant after the gap, on the same day. When
//!   its local time happens twice (clocks fall back), it fires once, at the first of the two.
//! - An **interval** job has a wildcard, a step or several values in the second, minute or hour field (e.g.
//!   `*/15 * * * *`, or `H/15 * * * *`, which resolves to a list). Its local times inside a gap do not exist and
//!   are skipped; in a repeated hour it fires at each matching wall-clock time in both passes (in real-time order).
//!
//! Zones without DST (UTC, Asia/Seoul) have no such cases. Searches move along real time, so
//! [`Cron::next_after`] is always later than its argument and [`Cron::last_at_or_before`] never later.
//!
//! A plain `H` in the day of the month picks from 1-28 (a day every month has); `H` in the day of the week from
//! 0-6. `H/n` starts at hash % n (from the range's start) and repeats every n within the range.

pub mod cron;
pub mod schedule;
pub mod window;

pub use cron::{Cron, CronError};
pub use schedule::{Count, Due, Missed, Schedule, StartDecision, COUNT_CAP};
pub use window::Window;

#[cfg(test)]
mod tests;
