//! `nonstop load`: an HTTP load generator that accounts for every scheduled request exactly and measures latency
//! from the scheduled time (no coordinated omission), with per-second timelines and pass/fail thresholds.

pub mod find_max;
pub mod h1;
pub mod html;
pub mod ledger;
pub mod report;
pub mod run;
pub mod scenario;
pub mod schedule;
pub mod threshold;

pub use ledger::{Counts, Outcome, Summary};
pub use run::{run, Model, RunConfig, RunResult, Target};
pub use schedule::{parse_duration, parse_stages, Schedule, Stage};
pub use threshold::Threshold;
