//! Cron expressions: parsing (5 or 6 fields, Jenkins-style `H` and `@` aliases) with errors that name the field
//! and the value, and fire times in a time zone as Unix milliseconds.

use std::fmt;

use chrono::DateTime;
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};

/// Why a cron expression or its time zone was refused. The messages are shown to users as config errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error("schedule: the cron expression is empty")]
    Empty,
    #[error(
        "schedule: \"{expr}\": {count} fields, expected 5 (minute hour day-of-month month day-of-week) or 6 (second \
         minute hour day-of-month month day-of-week)"
    )]
    FieldCount { expr: String, count: usize },
    #[error(
        "schedule: \"{expr}\": unknown alias {alias} (expected @yearly, @annually, @monthly, @weekly, @daily, \
         @midnight or @hourly)"
    )]
    UnknownAlias { expr: String, alias: String },
    #[error("schedule: \"{expr}\": {field} {value} is out of range {min}-{max}")]
    OutOfRange { expr: String, field: &'static str, value: String, min: u32, max: u32 },
    #[error("schedule: \"{expr}\": {field} range {from}-{to} is backwards (the first value must not be larger)")]
    BackwardRange { expr: String, field: &'static str, from: u32, to: u32 },
    #[error("schedule: \"{expr}\": {field} step /{step} must be 1 or more")]
    ZeroStep { expr: String, field: &'static str, step: String },
    #[error("schedule: \"{expr}\": {field} \"{term}\": {reason}")]
    BadHash { expr: String, field: &'static str, term: String, reason: String },
    #[error("schedule: \"{expr}\": {field} has an empty list item")]
    EmptyItem { expr: String, field: &'static str },
    #[error("schedule: \"{expr}\": {reason}")]
    Invalid { expr: String, reason: String },
    #[error("schedule: \"{expr}\" never fires (no date matches it)")]
    NeverFires { expr: String },
    #[error("schedule: unknown time zone \"{zone}\" (expected an IANA name such as \"UTC\" or \"Europe/Berlin\")")]
    UnknownZone { zone: String },
}

/// A parsed cron schedule in a time zone.
#[derive(Clone)]
pub struct Cron {
    expr: String,
    resolved: String,
    zone: Tz,
    inner: croner::Cron,
}

impl fmt::Debug for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cron")
            .field("expr", &self.expr)
            .field("resolved", &self.resolved)
            .field("zone", &self.zone.name())
            .finish()
    }
}

impl fmt::Display for Cron {
    /// The resolved expression and its zone, e.g. `37 14 * * * (Europe/Berlin)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.resolved, self.zone.name())
    }
}

/// One cron field: its name in errors, the values it takes, and the values a plain `H` picks from.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    hash_min: u32,
    hash_max: u32,
}

const SECOND: Field = Field { name: "second", min: 0, max: 59, hash_min: 0, hash_max: 59 };
const MINUTE: Field = Field { name: "minute", min: 0, max: 59, hash_min: 0, hash_max: 59 };
const HOUR: Field = Field { name: "hour", min: 0, max: 23, hash_min: 0, hash_max: 23 };
// A plain H in the day of the month stays within 1-28, so that it exists in every month (as in Jenkins).
const DAY_OF_MONTH: Field = Field { name: "day-of-month", min: 1, max: 31, hash_min: 1, hash_max: 28 };
const MONTH: Field = Field { name: "month", min: 1, max: 12, hash_min: 1, hash_max: 12 };
// 0 and 7 are both Sunday; a plain H picks one of the seven days 0-6.
const DAY_OF_WEEK: Field = Field { name: "day-of-week", min: 0, max: 7, hash_min: 0, hash_max: 6 };

const FIVE: [&Field; 5] = [&MINUTE, &HOUR, &DAY_OF_MONTH, &MONTH, &DAY_OF_WEEK];
const SIX: [&Field; 6] = [&SECOND, &MINUTE, &HOUR, &DAY_OF_MONTH, &MONTH, &DAY_OF_WEEK];

/// The Jenkins aliases, H-spread as Jenkins spreads them.
fn alias(name: &str) -> Option<&'static str> {
    Some(match name.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => "H H H H *",
        "@monthly" => "H H H * *",
        "@weekly" => "H H * * H",
        "@daily" => "H H * * *",
        "@midnight" => "H H(0-2) * * *",
        "@hourly" => "H * * * *",
        _ => return None,
    })
}

impl Cron {
    /// Parses `expr` in the time zone `tz`, resolving every `H` with a stable hash of `seed` (the pipeline or job
    /// name).
    ///
    /// `expr` has 5 fields (minute hour day-of-month month day-of-week) or 6 (second first), or is one of the
    /// aliases @yearly @annually @monthly @weekly @daily @midnight @hourly (5 fields, H-spread as in Jenkins:
    /// @hourly = `H * * * *`, @daily = `H H * * *`, @midnight = `H H(0-2) * * *`, @weekly = `H H * * H`,
    /// @monthly = `H H H * *`, @yearly = `H H H H *`). `H` may stand wherever a value may, also in a list:
    /// `H` (a value within the field's range; 1-28 for the day of the month), `H(a-b)` (within a-b), `H/n` (every
    /// n, starting at hash % n) and `H(a-b)/n`. `tz` is an IANA zone name ("UTC", "Asia/Seoul").
    pub fn parse(expr: &str, seed: &str, tz: &str) -> Result<Cron, CronError> {
        let zone: Tz = tz.parse().map_err(|_| CronError::UnknownZone { zone: tz.to_string() })?;
        let trimmed = expr.trim();
        if trimmed.is_empty() {
            return Err(CronError::Empty);
        }
        let text = if trimmed.starts_with('@') {
            alias(trimmed)
                .ok_or_else(|| CronError::UnknownAlias { expr: expr.to_string(), alias: trimmed.to_string() })?
        } else {
            trimmed
        };
        let parts: Vec<&str> = text.split_whitespace().collect();
        let fields: &[&Field] = match parts.len() {
            5 => &FIVE,
            6 => &SIX,
            count => return Err(CronError::FieldCount { expr: expr.to_string(), count }),
        };
        let mut resolved = Vec::with_capacity(parts.len());
        for (part, field) in parts.iter().zip(fields) {
            resolved.push(resolve_field(expr, field, part, seed)?);
        }
        let resolved = resolved.join(" ");
        let parser = CronParser::builder().seconds(Seconds::Optional).year(Year::Disallowed).build();
        let inner = parser
            .parse(&resolved)
            .map_err(|e| CronError::Invalid { expr: expr.to_string(), reason: croner_reason(&e) })?;
        let cron = Cron { expr: expr.to_string(), resolved, zone, inner };
        if cron.next_after(0).is_none() {
            return Err(CronError::NeverFires { expr: expr.to_string() });
        }
        Ok(cron)
    }

    /// The expression as written.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The expression with H (and an alias) resolved, as it runs (for status pages and docs).
    pub fn resolved(&self) -> &str {
        &self.resolved
    }

    /// The IANA name of the time zone the fire times are wall-clock times in.
    pub fn zone(&self) -> &str {
        self.zone.name()
    }

    /// The first fire time strictly after `after_ms` (Unix ms), or None if it never fires again.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        // Fire times are whole seconds: t > after_ms exactly when t's second is past after_ms's second.
        let start = self.at_second(after_ms / 1000)?;
        let found = self.inner.find_next_occurrence(&start, false).ok()?;
        to_ms(found.timestamp()).filter(|&t| t > after_ms)
    }

    /// The last fire time at or before `at_ms` (Unix ms, not before 1970), if any.
    pub fn last_at_or_before(&self, at_ms: u64) -> Option<u64> {
        let start = self.at_second(at_ms / 1000)?;
        let found = self.inner.find_previous_occurrence(&start, true).ok()?;
        to_ms(found.timestamp()).filter(|&t| t <= at_ms)
    }

    /// The last fire time at or before `at_ms` that is strictly after `since_ms`, if any (for missed runs). One
    /// backward search from `at_ms`, however far back `since_ms` is.
    pub fn last_between(&self, since_ms: u64, at_ms: u64) -> Option<u64> {
        if at_ms <= since_ms {
            return None;
        }
        self.last_at_or_before(at_ms).filter(|&t| t > since_ms)
    }

    /// How many fire times lie in `(since_ms, at_ms]`, counting at most `cap` of them (so the work is bounded).
    pub fn count_between(&self, since_ms: u64, at_ms: u64, cap: u64) -> u64 {
        let mut count = 0;
        let mut t = since_ms;
        while count < cap {
            match self.next_after(t) {
                Some(next) if next <= at_ms => {
                    count += 1;
                    t = next;
                }
                _ => break,
            }
        }
        count
    }

    fn at_second(&self, second: u64) -> Option<DateTime<Tz>> {
        let second = i64::try_from(second).ok()?;
        DateTime::from_timestamp(second, 0).map(|utc| utc.with_timezone(&self.zone))
    }
}

fn to_ms(second: i64) -> Option<u64> {
    u64::try_from(second).ok()?.checked_mul(1000)
}

/// croner's message without its own "Invalid pattern:"-style prefix where it has one.
fn croner_reason(e: &croner::errors::CronError) -> String {
    use croner::errors::CronError as E;
    match e {
        E::InvalidPattern(msg) | E::IllegalCharacters(msg) | E::ComponentError(msg) => msg.clone(),
        other => other.to_string(),
    }
}

/// Resolves every `H` term of one field into plain cron text, and checks the plain numbers against the field's
/// range (croner's own messages do not name the field).
fn resolve_field(expr: &str, field: &Field, text: &str, seed: &str) -> Result<String, CronError> {
    let mut out = Vec::new();
    for (index, item) in text.split(',').enumerate() {
        if item.is_empty() {
            return Err(CronError::EmptyItem { expr: expr.to_string(), field: field.name });
        }
        if item.starts_with(['H', 'h']) {
            out.push(resolve_hash(expr, field, item, seed, index)?);
        } else {
            check_plain(expr, field, item)?;
            out.push(item.to_string());
        }
    }
    Ok(out.join(","))
}

fn check_plain(expr: &str, field: &Field, item: &str) -> Result<(), CronError> {
    let (base, step) = match item.split_once('/') {
        Some((base, step)) => (base, Some(step)),
        None => (item, None),
    };
    if let Some(step) = step {
        if is_digits(step) && step.bytes().all(|b| b == b'0') {
            return Err(CronError::ZeroStep { expr: expr.to_string(), field: field.name, step: step.to_string() });
        }
    }
    let (from, to) = match base.split_once('-') {
        Some((from, to)) => (from, Some(to)),
        None => (base, None),
    };
    let from = check_number(expr, field, from)?;
    let to = match to {
        Some(to) => check_number(expr, field, to)?,
        None => None,
    };
    if let (Some(from), Some(to)) = (from, to) {
        if from > to {
            return Err(CronError::BackwardRange { expr: expr.to_string(), field: field.name, from, to });
        }
    }
    Ok(())
}

/// Checks the number at the start of a range end (`5`, also `5L`, `15W`, `1#2`) against the field's range; returns
/// it when the whole piece is a plain number. Names (JAN, MON), `*`, `L` and `?` are left to croner.
fn check_number(expr: &str, field: &Field, piece: &str) -> Result<Option<u32>, CronError> {
    let digits_end = piece.find(|c: char| !c.is_ascii_digit()).unwrap_or(piece.len());
    let digits = &piece[..digits_end];
    if digits.is_empty() {
        return Ok(None);
    }
    let value = in_range(expr, field, digits, field.min, field.max)?;
    Ok((digits_end == piece.len()).then_some(value))
}

fn in_range(expr: &str, field: &Field, digits: &str, min: u32, max: u32) -> Result<u32, CronError> {
    match digits.parse::<u32>() {
        Ok(value) if (min..=max).contains(&value) => Ok(value),
        _ => Err(CronError::OutOfRange {
            expr: expr.to_string(),
            field: field.name,
            value: digits.to_string(),
            min,
            max,
        }),
    }
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// `H`, `H(a-b)`, `H/n` or `H(a-b)/n` as a plain value or list of values.
fn resolve_hash(expr: &str, field: &Field, term: &str, seed: &str, index: usize) -> Result<String, CronError> {
    let bad = |reason: String| CronError::BadHash {
        expr: expr.to_string(),
        field: field.name,
        term: term.to_string(),
        reason,
    };
    let rest = &term[1..];
    let (lo, hi, rest) = if let Some(inner) = rest.strip_prefix('(') {
        let Some(close) = inner.find(')') else {
            return Err(bad("missing \")\" (expected H(a-b))".to_string()));
        };
        let range = &inner[..close];
        let Some((a, b)) = range.split_once('-') else {
            return Err(bad(format!("\"{range}\" is not a range (expected H(a-b))")));
        };
        if !is_digits(a) || !is_digits(b) {
            return Err(bad(format!("\"{range}\" is not a range of numbers (expected H(a-b))")));
        }
        let a = in_range(expr, field, a, field.min, field.max)?;
        let b = in_range(expr, field, b, field.min, field.max)?;
        if a > b {
            return Err(bad(format!("the range {a}-{b} is backwards (the first value must not be larger)")));
        }
        (a, b, &inner[close + 1..])
    } else {
        (field.hash_min, field.hash_max, rest)
    };
    let span = hi - lo + 1;
    let step = if rest.is_empty() {
        None
    } else if let Some(step) = rest.strip_prefix('/') {
        if !is_digits(step) {
            return Err(bad(format!("step \"{step}\" is not a number")));
        }
        match step.parse::<u32>() {
            Ok(0) => return Err(bad("the step must be 1 or more".to_string())),
            Ok(n) if n <= span => Some(n),
            _ => return Err(bad(format!("the step {step} is larger than the range {lo}-{hi}"))),
        }
    } else {
        return Err(bad(format!("unexpected \"{rest}\" (expected H, H(a-b), H/n or H(a-b)/n)")));
    };
    let hash = spread_hash(seed, field.name, index);
    Ok(match step {
        None => (lo + (hash % u64::from(span)) as u32).to_string(),
        Some(n) => {
            let start = lo + (hash % u64::from(n)) as u32;
            (start..=hi).step_by(n as usize).map(|v| v.to_string()).collect::<Vec<_>>().join(",")
        }
    })
}

/// A hash of the seed, the field and the position in its list that is the same on every machine and Rust version:
/// FNV-1a (64 bits) with a SplitMix64 finish so that small moduli still see all bits.
fn spread_hash(seed: &str, field: &str, index: usize) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let index = u32::try_from(index).unwrap_or(u32::MAX).to_le_bytes();
    for &b in seed.as_bytes().iter().chain(&[0xff]).chain(field.as_bytes()).chain(&[0xff]).chain(&index) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
