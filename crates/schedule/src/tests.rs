//! Unit tests of the crate: parsing and errors, H spreading, fire times in zones (with DST), missed and late runs,
//! windows. Every `now` is a fixed value; nothing sleeps.

use chrono::{NaiveDate, TimeZone};
use chrono_tz::Tz;

use crate::*;

/// Unix ms of a UTC wall-clock time.
fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> u64 {
    let dt = NaiveDate::from_ymd_opt(y, mo, d).unwrap().and_hms_opt(h, mi, s).unwrap().and_utc();
    u64::try_from(dt.timestamp_millis()).unwrap()
}

/// Unix ms of an unambiguous wall-clock time in `zone`.
fn local(zone: &str, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> u64 {
    let tz: Tz = zone.parse().unwrap();
    let dt = tz.with_ymd_and_hms(y, mo, d, h, mi, 0).single().unwrap();
    u64::try_from(dt.timestamp_millis()).unwrap()
}

const MIN: u64 = 60_000;
const HOUR: u64 = 60 * MIN;

fn cron(expr: &str) -> Cron {
    Cron::parse(expr, "seed", "UTC").unwrap()
}

fn error(expr: &str) -> String {
    Cron::parse(expr, "seed", "UTC").unwrap_err().to_string()
}

fn fields(c: &Cron) -> Vec<String> {
    c.resolved().split(' ').map(str::to_string).collect()
}

#[test]
fn parses_five_and_six_fields() {
    let five = cron("30 9 * * 1-5");
    assert_eq!(five.resolved(), "30 9 * * 1-5");
    assert_eq!(five.expr(), "30 9 * * 1-5");
    assert_eq!(five.zone(), "UTC");
    // 2026-03-02 is a Monday.
    assert_eq!(five.next_after(utc(2026, 3, 1, 0, 0, 0)), Some(utc(2026, 3, 2, 9, 30, 0)));

    let six = cron("15 30 9 * * *");
    assert_eq!(six.resolved(), "15 30 9 * * *");
    assert_eq!(six.next_after(utc(2026, 3, 1, 0, 0, 0)), Some(utc(2026, 3, 1, 9, 30, 15)));

    let every_ten_seconds = cron("*/10 * * * * *");
    assert_eq!(every_ten_seconds.next_after(utc(2026, 3, 1, 0, 0, 1)), Some(utc(2026, 3, 1, 0, 0, 10)));

    // Names, lists, ranges and steps go through to croner.
    let named = cron("0 8,12 1-7 JAN-MAR MON");
    assert_eq!(named.resolved(), "0 8,12 1-7 JAN-MAR MON");
    assert!(named.next_after(utc(2026, 1, 1, 0, 0, 0)).is_some());
    assert_eq!(cron("0 0 * * 7").next_after(utc(2026, 3, 2, 0, 0, 0)), Some(utc(2026, 3, 8, 0, 0, 0)), "7 is Sunday");
}

#[test]
fn errors_name_the_field_and_the_value() {
    assert_eq!(error("61 * * * *"), "schedule: \"61 * * * *\": minute 61 is out of range 0-59");
    assert_eq!(error("60 * * * * *"), "schedule: \"60 * * * * *\": second 60 is out of range 0-59");
    assert_eq!(error("0 24 * * *"), "schedule: \"0 24 * * *\": hour 24 is out of range 0-23");
    assert_eq!(error("0 0 32 * *"), "schedule: \"0 0 32 * *\": day-of-month 32 is out of range 1-31");
    assert_eq!(error("0 0 0 * *"), "schedule: \"0 0 0 * *\": day-of-month 0 is out of range 1-31");
    assert_eq!(error("0 0 * 13 *"), "schedule: \"0 0 * 13 *\": month 13 is out of range 1-12");
    assert_eq!(error("0 0 * * 8"), "schedule: \"0 0 * * 8\": day-of-week 8 is out of range 0-7");
    assert_eq!(error("0-99 * * * *"), "schedule: \"0-99 * * * *\": minute 99 is out of range 0-59");
    assert_eq!(error("5,70 * * * *"), "schedule: \"5,70 * * * *\": minute 70 is out of range 0-59");
    assert_eq!(
        error("99999999999 * * * *"),
        "schedule: \"99999999999 * * * *\": minute 99999999999 is out of range 0-59"
    );
    assert_eq!(
        error("50-10 * * * *"),
        "schedule: \"50-10 * * * *\": minute range 50-10 is backwards (the first value must not be larger)"
    );
    assert_eq!(error("*/0 * * * *"), "schedule: \"*/0 * * * *\": minute step /0 must be 1 or more");
    assert_eq!(error("1,,2 * * * *"), "schedule: \"1,,2 * * * *\": minute has an empty list item");

    let few = error("* * * *");
    assert!(few.starts_with("schedule: \"* * * *\": 4 fields, expected 5"), "{few}");
    let many = error("* * * * * * *");
    assert!(many.starts_with("schedule: \"* * * * * * *\": 7 fields, expected 5"), "{many}");
    assert_eq!(error("   "), "schedule: the cron expression is empty");

    assert_eq!(
        error("H(5-2) * * * *"),
        "schedule: \"H(5-2) * * * *\": minute \"H(5-2)\": the range 5-2 is backwards (the first value must not be \
         larger)"
    );
    assert_eq!(error("H(0-60) * * * *"), "schedule: \"H(0-60) * * * *\": minute 60 is out of range 0-59");
    assert_eq!(error("0 H(0-24) * * *"), "schedule: \"0 H(0-24) * * *\": hour 24 is out of range 0-23");
    assert!(error("H(5-10 * * * *").contains("minute \"H(5-10\": missing \")\""));
    assert!(error("H(5) * * * *").contains("minute \"H(5)\": \"5\" is not a range"));
    assert!(error("H(a-b) * * * *").contains("\"a-b\" is not a range of numbers"));
    assert!(error("H/0 * * * *").contains("minute \"H/0\": the step must be 1 or more"));
    assert!(error("H/61 * * * *").contains("minute \"H/61\": the step 61 is larger than the range 0-59"));
    assert!(error("H/x * * * *").contains("minute \"H/x\": step \"x\" is not a number"));
    assert!(error("Hx * * * *").contains("minute \"Hx\": unexpected \"x\""));
    assert!(error("0 0 H/30 * *").contains("day-of-month \"H/30\": the step 30 is larger than the range 1-28"));

    let alias = error("@sometimes");
    assert!(alias.starts_with("schedule: \"@sometimes\": unknown alias @sometimes"), "{alias}");
    assert_eq!(error("0 0 31 2 *"), "schedule: \"0 0 31 2 *\" never fires (no date matches it)");
    let junk = error("foo * * * *");
    assert!(junk.starts_with("schedule: \"foo * * * *\": "), "{junk}");

    let zone = Cron::parse("* * * * *", "seed", "Mars/Olympus").unwrap_err();
    assert_eq!(zone, CronError::UnknownZone { zone: "Mars/Olympus".to_string() });
    assert!(zone.to_string().contains("unknown time zone \"Mars/Olympus\""), "{zone}");
}

#[test]
fn h_is_stable_for_a_seed_and_spreads_across_seeds() {
    let a = Cron::parse("H H * * *", "deploy-web", "UTC").unwrap();
    let b = Cron::parse("H H * * *", "deploy-web", "UTC").unwrap();
    assert_eq!(a.resolved(), b.resolved());
    assert!(!a.resolved().contains('H'));
    // The same field of a 6-field expression gets the same value as in a 5-field one.
    let six = Cron::parse("0 H H * * *", "deploy-web", "UTC").unwrap();
    assert_eq!(six.resolved(), format!("0 {}", a.resolved()));

    let mut minutes = std::collections::BTreeSet::new();
    let mut hours = std::collections::BTreeSet::new();
    for i in 0..50 {
        let c = Cron::parse("H H * * *", &format!("pipeline-{i}"), "UTC").unwrap();
        let f = fields(&c);
        let minute: u32 = f[0].parse().unwrap();
        let hour: u32 = f[1].parse().unwrap();
        assert!(minute < 60 && hour < 24);
        minutes.insert(minute);
        hours.insert(hour);
    }
    assert!(minutes.len() >= 25, "50 names gave only {} distinct minutes: {minutes:?}", minutes.len());
    assert!(hours.len() >= 12, "50 names gave only {} distinct hours: {hours:?}", hours.len());
}

#[test]
fn h_is_the_same_on_every_machine() {
    // Fixed by the FNV-1a + SplitMix64 hash: a change here moves every user's schedule.
    let c = Cron::parse("H H * * *", "nightly", "UTC").unwrap();
    let again = Cron::parse("H H * * *", "nightly", "UTC").unwrap();
    assert_eq!(c.resolved(), again.resolved());
    assert_eq!(c.resolved(), "33 14 * * *");
}

#[test]
fn h_with_a_range_stays_in_range() {
    for i in 0..200 {
        let seed = format!("job-{i}");
        let c = Cron::parse("H(10-20) H(22-23) H H H", &seed, "UTC").unwrap();
        let f = fields(&c);
        let minute: u32 = f[0].parse().unwrap();
        let hour: u32 = f[1].parse().unwrap();
        let day: u32 = f[2].parse().unwrap();
        let month: u32 = f[3].parse().unwrap();
        let weekday: u32 = f[4].parse().unwrap();
        assert!((10..=20).contains(&minute), "{seed}: {}", c.resolved());
        assert!((22..=23).contains(&hour), "{seed}: {}", c.resolved());
        assert!((1..=28).contains(&day), "{seed}: {}", c.resolved());
        assert!((1..=12).contains(&month), "{seed}: {}", c.resolved());
        assert!((0..=6).contains(&weekday), "{seed}: {}", c.resolved());
    }
    // A one-value range is that value; H mixes with plain list items.
    assert_eq!(cron("H(7-7) * * * *").resolved(), "7 * * * *");
    let mixed = cron("H(0-9),30 * * * *");
    let (h, rest) = mixed.resolved().split_once(',').unwrap();
    assert!(h.parse::<u32>().unwrap() <= 9);
    assert_eq!(rest, "30 * * * *");
}

#[test]
fn h_step_15_fires_four_times_an_hour_evenly() {
    for seed in ["a", "b", "c", "checkout", "nightly-report"] {
        let c = Cron::parse("H/15 * * * *", seed, "UTC").unwrap();
        let start = utc(2026, 5, 1, 10, 0, 0);
        let mut fires = vec![];
        let mut t = start - 1;
        while let Some(next) = c.next_after(t) {
            if next >= start + HOUR {
                break;
            }
            fires.push(next);
            t = next;
        }
        assert_eq!(fires.len(), 4, "{seed}: {}", c.resolved());
        assert!(fires[0] - start < 15 * MIN, "{seed}: starts at hash % 15");
        for pair in fires.windows(2) {
            assert_eq!(pair[1] - pair[0], 15 * MIN, "{seed}: {}", c.resolved());
        }
    }
    // H(a-b)/n: from a + hash % n, every n, up to b.
    for i in 0..50 {
        let c = Cron::parse("H(0-29)/10 * * * *", &format!("s{i}"), "UTC").unwrap();
        let values: Vec<u32> = fields(&c)[0].split(',').map(|v| v.parse().unwrap()).collect();
        assert_eq!(values.len(), 3, "{}", c.resolved());
        assert!(values[0] < 10 && values[2] <= 29, "{}", c.resolved());
        assert_eq!(values[1] - values[0], 10);
    }
}

#[test]
fn aliases_are_h_spread_as_in_jenkins() {
    let hourly = fields(&cron("@hourly"));
    assert_eq!(hourly[1..], ["*", "*", "*", "*"]);
    assert!(hourly[0].parse::<u32>().unwrap() < 60);

    let daily = fields(&cron("@daily"));
    assert_eq!(daily[2..], ["*", "*", "*"]);
    assert!(daily[1].parse::<u32>().unwrap() < 24);
    assert_eq!(cron("@DAILY").resolved(), cron("@daily").resolved(), "aliases ignore case");

    for i in 0..30 {
        let midnight = Cron::parse("@midnight", &format!("m{i}"), "UTC").unwrap();
        let f = fields(&midnight);
        assert!(f[1].parse::<u32>().unwrap() <= 2, "{}", midnight.resolved());
        assert_eq!(f[2..], ["*", "*", "*"]);
    }

    let weekly = fields(&cron("@weekly"));
    assert_eq!(weekly[2..4], ["*", "*"]);
    assert!(weekly[4].parse::<u32>().unwrap() <= 6);

    let monthly = fields(&cron("@monthly"));
    assert!((1..=28).contains(&monthly[2].parse::<u32>().unwrap()));
    assert_eq!(monthly[3..], ["*", "*"]);

    let yearly = fields(&cron("@yearly"));
    assert!((1..=12).contains(&yearly[3].parse::<u32>().unwrap()));
    assert_eq!(yearly[4], "*");
    assert_eq!(cron("@annually").resolved(), cron("@yearly").resolved());
    // An alias resolves exactly as its H expression does.
    assert_eq!(cron("@daily").resolved(), cron("H H * * *").resolved());
}

#[test]
fn next_after_in_utc_is_strictly_after() {
    let c = cron("30 9 * * *");
    assert_eq!(c.next_after(utc(2026, 3, 1, 0, 0, 0)), Some(utc(2026, 3, 1, 9, 30, 0)));
    assert_eq!(c.next_after(utc(2026, 3, 1, 9, 30, 0) - 1), Some(utc(2026, 3, 1, 9, 30, 0)));
    assert_eq!(c.next_after(utc(2026, 3, 1, 9, 30, 0)), Some(utc(2026, 3, 2, 9, 30, 0)));
    assert_eq!(c.next_after(utc(2026, 3, 1, 9, 30, 0) + 500), Some(utc(2026, 3, 2, 9, 30, 0)));
    // Year end and leap day.
    assert_eq!(c.next_after(utc(2026, 12, 31, 10, 0, 0)), Some(utc(2027, 1, 1, 9, 30, 0)));
    assert_eq!(cron("0 0 29 2 *").next_after(utc(2025, 1, 1, 0, 0, 0)), Some(utc(2028, 2, 29, 0, 0, 0)));
}

#[test]
fn next_after_in_asia_seoul() {
    // UTC+9 all year, no DST.
    let c = Cron::parse("0 9 * * *", "seed", "Asia/Seoul").unwrap();
    assert_eq!(c.zone(), "Asia/Seoul");
    assert_eq!(c.next_after(utc(2026, 6, 30, 23, 0, 0)), Some(utc(2026, 7, 1, 0, 0, 0)));
    assert_eq!(c.next_after(utc(2026, 7, 1, 0, 0, 0)), Some(utc(2026, 7, 2, 0, 0, 0)));
    // Midnight in Seoul is 15:00 UTC the day before.
    let midnight = Cron::parse("0 0 * * *", "seed", "Asia/Seoul").unwrap();
    assert_eq!(midnight.next_after(utc(2026, 1, 1, 0, 0, 0)), Some(utc(2026, 1, 1, 15, 0, 0)));
    assert_eq!(midnight.next_after(utc(2026, 1, 1, 0, 0, 0)), Some(local("Asia/Seoul", 2026, 1, 2, 0, 0)));
}

#[test]
fn next_after_in_europe_berlin_across_dst() {
    // 2026-03-29 02:00 CET (UTC+1) jumps to 03:00 CEST (UTC+2); 2026-10-25 03:00 CEST falls back to 02:00 CET.
    let nine = Cron::parse("0 9 * * *", "seed", "Europe/Berlin").unwrap();
    assert_eq!(nine.next_after(utc(2026, 3, 27, 12, 0, 0)), Some(utc(2026, 3, 28, 8, 0, 0)));
    assert_eq!(nine.next_after(utc(2026, 3, 28, 8, 0, 0)), Some(utc(2026, 3, 29, 7, 0, 0)));
    assert_eq!(nine.next_after(utc(2026, 10, 24, 7, 0, 0)), Some(utc(2026, 10, 25, 8, 0, 0)));

    // A fixed time in the spring gap fires once, at the first valid instant after it (03:00 CEST = 01:00 UTC).
    let gap = Cron::parse("30 2 * * *", "seed", "Europe/Berlin").unwrap();
    assert_eq!(gap.next_after(utc(2026, 3, 28, 12, 0, 0)), Some(utc(2026, 3, 29, 1, 0, 0)));
    assert_eq!(gap.next_after(utc(2026, 3, 29, 1, 0, 0)), Some(utc(2026, 3, 30, 0, 30, 0)));

    // A fixed time in the repeated autumn hour fires once, at the first pass (02:30 CEST = 00:30 UTC).
    let repeated = gap;
    assert_eq!(repeated.next_after(utc(2026, 10, 24, 12, 0, 0)), Some(utc(2026, 10, 25, 0, 30, 0)));
    assert_eq!(repeated.next_after(utc(2026, 10, 25, 0, 30, 0)), Some(utc(2026, 10, 26, 1, 30, 0)));

    // An interval job fires at each matching wall-clock time of both passes.
    let half_hourly = Cron::parse("*/30 2 * * *", "seed", "Europe/Berlin").unwrap();
    let mut t = utc(2026, 10, 24, 23, 0, 0);
    let mut fires = vec![];
    for _ in 0..4 {
        t = half_hourly.next_after(t).unwrap();
        fires.push(t);
    }
    assert_eq!(
        fires,
        [
            utc(2026, 10, 25, 0, 0, 0),
            utc(2026, 10, 25, 0, 30, 0),
            utc(2026, 10, 25, 1, 0, 0),
            utc(2026, 10, 25, 1, 30, 0)
        ]
    );
    // And skips its times inside the spring gap.
    let t = half_hourly.next_after(utc(2026, 3, 28, 12, 0, 0)).unwrap();
    assert_eq!(t, utc(2026, 3, 30, 0, 0, 0), "02:00 and 02:30 do not exist on 2026-03-29");
}

#[test]
fn last_between_with_since_years_back_is_fast_and_right() {
    let started = std::time::Instant::now();
    let since = utc(2000, 1, 1, 0, 0, 0);
    let at = utc(2026, 6, 15, 12, 34, 56);
    assert_eq!(cron("*/5 * * * *").last_between(since, at), Some(utc(2026, 6, 15, 12, 30, 0)));
    assert_eq!(cron("* * * * * *").last_between(since, at), Some(at));
    assert_eq!(cron("0 0 1 1 *").last_between(since, at), Some(utc(2026, 1, 1, 0, 0, 0)));
    assert_eq!(cron("0 0 29 2 *").last_between(since, at), Some(utc(2024, 2, 29, 0, 0, 0)));
    assert_eq!(cron("0 0 29 2 *").last_between(utc(2024, 3, 1, 0, 0, 0), at), None);
    // The end is inclusive, the start exclusive.
    let hourly = cron("0 * * * *");
    assert_eq!(hourly.last_between(since, utc(2026, 6, 15, 12, 0, 0)), Some(utc(2026, 6, 15, 12, 0, 0)));
    assert_eq!(hourly.last_between(utc(2026, 6, 15, 12, 0, 0), utc(2026, 6, 15, 12, 59, 59)), None);
    assert_eq!(hourly.last_between(at, at), None);
    assert_eq!(hourly.last_between(at, since), None);
    let berlin = Cron::parse("0 9 * * 1", "seed", "Europe/Berlin").unwrap();
    assert_eq!(berlin.last_between(since, utc(2026, 7, 1, 0, 0, 0)), Some(local("Europe/Berlin", 2026, 6, 29, 9, 0)));
    assert!(started.elapsed() < std::time::Duration::from_secs(1), "took {:?}", started.elapsed());
}

#[test]
fn backward_and_forward_searches_agree_across_dst() {
    for expr in ["30 2 * * *", "*/20 * * * *", "0 1-3 * * *", "H/15 H(1-3) * * *"] {
        let c = Cron::parse(expr, "seed", "Europe/Berlin").unwrap();
        for start in [utc(2026, 3, 28, 0, 0, 0), utc(2026, 10, 24, 0, 0, 0)] {
            let mut previous = c.last_at_or_before(start).unwrap();
            let mut t = start;
            while t < start + 48 * HOUR {
                let next = c.next_after(t).unwrap();
                assert!(next > t);
                assert_eq!(c.last_at_or_before(next), Some(next), "{expr}: at {next}");
                assert_eq!(c.last_at_or_before(next - 1), Some(previous), "{expr}: before {next}");
                assert_eq!(c.last_between(previous, next), Some(next), "{expr}");
                previous = next;
                t = next;
            }
        }
    }
}

#[test]
fn start_for_the_first_time_counts_nothing_missed() {
    let now = utc(2026, 6, 15, 13, 30, 0);
    for missed in [Missed::Skip, Missed::RunOnce] {
        let (schedule, decision) = Schedule::start(cron("0 * * * *"), missed, None, now);
        assert_eq!(decision, StartDecision { missed: Count(0), run_now: None });
        assert_eq!(schedule.next_due_ms(), Some(utc(2026, 6, 15, 14, 0, 0)));
        assert_eq!(schedule.missed(), missed);
    }
}

#[test]
fn start_with_run_once_runs_one_for_all_missed() {
    let now = utc(2026, 6, 15, 13, 30, 0);
    let last = utc(2026, 6, 15, 10, 0, 0);
    let (schedule, decision) = Schedule::start(cron("0 * * * *"), Missed::RunOnce, Some(last), now);
    // 11:00, 12:00 and 13:00 were missed; one run, for 13:00.
    assert_eq!(decision, StartDecision { missed: Count(3), run_now: Some(utc(2026, 6, 15, 13, 0, 0)) });
    assert_eq!(schedule.next_due_ms(), Some(utc(2026, 6, 15, 14, 0, 0)));

    // A fire time exactly at now counts as missed.
    let (_, decision) = Schedule::start(cron("0 * * * *"), Missed::RunOnce, Some(last), utc(2026, 6, 15, 11, 0, 0));
    assert_eq!(decision, StartDecision { missed: Count(1), run_now: Some(utc(2026, 6, 15, 11, 0, 0)) });

    // Nothing missed: the last run was for the latest fire time.
    let (_, decision) = Schedule::start(cron("0 * * * *"), Missed::RunOnce, Some(utc(2026, 6, 15, 13, 0, 0)), now);
    assert_eq!(decision, StartDecision { missed: Count(0), run_now: None });
}

#[test]
fn start_with_skip_runs_none() {
    let now = utc(2026, 6, 15, 13, 30, 0);
    let last = utc(2026, 6, 15, 10, 0, 0);
    let (schedule, decision) = Schedule::start(cron("0 * * * *"), Missed::Skip, Some(last), now);
    assert_eq!(decision, StartDecision { missed: Count(3), run_now: None });
    assert_eq!(schedule.next_due_ms(), Some(utc(2026, 6, 15, 14, 0, 0)));
}

#[test]
fn start_after_years_caps_the_count() {
    let started = std::time::Instant::now();
    let now = utc(2026, 6, 15, 13, 30, 30);
    let (_, decision) = Schedule::start(cron("* * * * *"), Missed::RunOnce, Some(utc(2020, 1, 1, 0, 0, 0)), now);
    assert_eq!(decision.missed, Count(COUNT_CAP));
    assert!(decision.missed.is_capped());
    assert_eq!(decision.missed.to_string(), "1000 or more");
    assert_eq!(decision.run_now, Some(utc(2026, 6, 15, 13, 30, 0)));
    assert_eq!(Count(3).to_string(), "3");
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[test]
fn due_on_time_runs_once_and_advances() {
    let (mut schedule, _) = Schedule::start(cron("0 * * * *"), Missed::Skip, None, utc(2026, 6, 15, 13, 30, 0));
    let at = utc(2026, 6, 15, 14, 0, 0);
    assert_eq!(schedule.next_due_ms(), Some(at));
    assert_eq!(schedule.due(at - 1), None);
    assert_eq!(schedule.next_due_ms(), Some(at), "nothing due: nothing changes");
    assert_eq!(schedule.due(at + 5), Some(Due { scheduled_ms: at, skipped: Count(0) }));
    assert_eq!(schedule.next_due_ms(), Some(utc(2026, 6, 15, 15, 0, 0)));
    assert_eq!(schedule.due(at + 10), None, "never twice for one fire time");
}

#[test]
fn due_when_woken_late_returns_the_latest_and_counts_skipped() {
    let (mut schedule, _) = Schedule::start(cron("0 * * * *"), Missed::Skip, None, utc(2026, 6, 15, 13, 30, 0));
    // Due at 14:00; woken at 17:10: 14:00, 15:00 and 16:00 are skipped, 17:00 runs.
    let due = schedule.due(utc(2026, 6, 15, 17, 10, 0)).unwrap();
    assert_eq!(due, Due { scheduled_ms: utc(2026, 6, 15, 17, 0, 0), skipped: Count(3) });
    assert_eq!(schedule.next_due_ms(), Some(utc(2026, 6, 15, 18, 0, 0)));

    // Woken exactly at a later fire time: that one runs.
    let due = schedule.due(utc(2026, 6, 15, 19, 0, 0)).unwrap();
    assert_eq!(due, Due { scheduled_ms: utc(2026, 6, 15, 19, 0, 0), skipped: Count(1) });

    // Very late: the count is capped.
    let (mut every_second, _) = Schedule::start(cron("* * * * * *"), Missed::Skip, None, utc(2026, 1, 1, 0, 0, 0));
    let due = every_second.due(utc(2026, 1, 2, 0, 0, 0)).unwrap();
    assert_eq!(due.scheduled_ms, utc(2026, 1, 2, 0, 0, 0));
    assert_eq!(due.skipped, Count(COUNT_CAP));
}

#[test]
fn missed_parses_skip_and_run_once() {
    assert_eq!(Missed::parse("skip"), Ok(Missed::Skip));
    assert_eq!(Missed::parse("run_once"), Ok(Missed::RunOnce));
    assert_eq!("run_once".parse::<Missed>(), Ok(Missed::RunOnce));
    assert_eq!(Missed::RunOnce.to_string(), "run_once");
    let err = Missed::parse("always").unwrap_err();
    assert!(err.contains("\"always\"") && err.contains("\"skip\", \"run_once\""), "{err}");
}

#[test]
fn window_is_open_from_its_fire_time_for_its_duration() {
    let window = Window::new(cron("0 14 * * *"), HOUR);
    let t = utc(2026, 6, 15, 14, 0, 0);
    assert!(!window.is_open(t - 1));
    assert!(window.is_open(t));
    assert!(window.is_open(t + HOUR - 1));
    assert!(!window.is_open(t + HOUR));
    assert_eq!(window.closes_at_ms(t), Some(t + HOUR));
    assert_eq!(window.closes_at_ms(t + HOUR - 1), Some(t + HOUR));
    assert_eq!(window.closes_at_ms(t + HOUR), None);
    assert_eq!(window.closes_at_ms(t - 1), None);
}

#[test]
fn window_next_open_while_open_and_closed() {
    let window = Window::new(cron("0 14 * * *"), HOUR);
    let t = utc(2026, 6, 15, 14, 0, 0);
    assert_eq!(window.next_open_ms(t + 10 * MIN), Some(t + 10 * MIN), "open now: now");
    assert_eq!(window.next_open_ms(t), Some(t));
    assert_eq!(window.next_open_ms(t - 1), Some(t));
    assert_eq!(window.next_open_ms(t + HOUR), Some(t + 24 * HOUR));
    assert_eq!(window.next_open_ms(utc(2026, 6, 15, 3, 0, 0)), Some(t));
}

#[test]
fn window_crossing_midnight() {
    let window = Window::new(cron("0 22 * * *"), 8 * HOUR);
    let opens = utc(2026, 6, 15, 22, 0, 0);
    let closes = utc(2026, 6, 16, 6, 0, 0);
    assert!(window.is_open(opens));
    assert!(window.is_open(utc(2026, 6, 15, 23, 59, 59)));
    assert!(window.is_open(utc(2026, 6, 16, 0, 0, 0)));
    assert!(window.is_open(closes - 1));
    assert!(!window.is_open(closes));
    assert!(!window.is_open(utc(2026, 6, 16, 12, 0, 0)));
    assert_eq!(window.closes_at_ms(utc(2026, 6, 16, 3, 0, 0)), Some(closes));
    assert_eq!(window.next_open_ms(utc(2026, 6, 16, 3, 0, 0)), Some(utc(2026, 6, 16, 3, 0, 0)));
    assert_eq!(window.next_open_ms(closes), Some(utc(2026, 6, 16, 22, 0, 0)));

    // The same window in Seoul: 22:00 KST is 13:00 UTC.
    let seoul = Window::new(Cron::parse("0 22 * * *", "seed", "Asia/Seoul").unwrap(), 8 * HOUR);
    assert!(seoul.is_open(utc(2026, 6, 15, 13, 0, 0)));
    assert!(seoul.is_open(utc(2026, 6, 15, 20, 59, 59)));
    assert!(!seoul.is_open(utc(2026, 6, 15, 21, 0, 0)));
}

#[test]
fn window_openings_that_overlap_close_together() {
    // Opens at 09:00 and 10:00 for 90 minutes each: open 09:00-11:30 without a gap.
    let window = Window::new(cron("0 9,10 * * *"), 90 * MIN);
    assert_eq!(window.closes_at_ms(utc(2026, 6, 15, 9, 15, 0)), Some(utc(2026, 6, 15, 11, 30, 0)));
    assert_eq!(window.closes_at_ms(utc(2026, 6, 15, 10, 45, 0)), Some(utc(2026, 6, 15, 11, 30, 0)));
    assert!(window.is_open(utc(2026, 6, 15, 10, 29, 0)));
    assert!(!window.is_open(utc(2026, 6, 15, 11, 30, 0)));
}

#[test]
fn window_of_zero_duration_never_opens() {
    let window = Window::new(cron("0 14 * * *"), 0);
    let t = utc(2026, 6, 15, 14, 0, 0);
    assert!(!window.is_open(t));
    assert_eq!(window.next_open_ms(t - 1), None);
    assert_eq!(window.closes_at_ms(t), None);
}
