//! A rate limit per key, by GCRA (the generic cell rate algorithm, as in ATM networks and redis-cell): each key
//! keeps one instant, its theoretical arrival time (TAT), the time at which it would have used up nothing of its
//! burst. A request is let through when that leaves at most `burst` requests' worth of debt, and moves the TAT on
//! by one interval; a refused request changes nothing, so a client that keeps knocking is let in again at the
//! configured rate, not locked out. Over a span `T` at most `burst + T / interval` requests of a key pass.
//!
//! Memory is bounded: at most `keys_max` keys are kept, in shards so that concurrent requests rarely meet on one
//! lock. A key whose TAT has passed holds no debt and is the same as no entry; when a shard is full those go
//! first, then the eighth of the shard nearest to a clean slate (the least debt, so forgetting it forgives the
//! least). The clock is the caller's: `now` is passed in.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limit: a steady rate (one request per `interval`) and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// The time between two requests at the steady rate: 1 s / requests_per_s.
    pub interval: Duration,
    /// Requests a key may send at once after a quiet spell; at least 1.
    pub burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused; the same request would pass after `retry_after`.
    Limit {
        retry_after: Duration,
    },
}

const SHARDS_MAX: usize = 16;

struct Shard {
    /// Hash of the key to its theoretical arrival time.
    tat: HashMap<u64, Instant>,
    cap: usize,
}

pub struct Limiter {
    rate: Rate,
    keys_max: usize,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl Limiter {
    /// A limiter for `rate` that keeps at most `keys_max` keys (at least 1).
    pub fn new(rate: Rate, keys_max: usize) -> Limiter {
        let rate = Rate { interval: rate.interval, burst: rate.burst.max(1) };
        let keys_max = keys_max.max(1);
        let n = keys_max.min(SHARDS_MAX);
        let cap = keys_max / n;
        let shards = (0..n).map(|_| Mutex::new(Shard { tat: HashMap::new(), cap })).collect();
        Limiter { rate, keys_max: cap * n, hasher: RandomState::new(), shards }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// The most keys kept at once (`keys_max` rounded down to a multiple of the shard count).
    pub fn keys_max(&self) -> usize {
        self.keys_max
    }

    /// Whether a request of `key` at `now` passes; a passing one is counted.
    pub fn check(&self, key: &[u8], now: Instant) -> Verdict {
        // A keyed hash (random per limiter), so that nobody can pick keys that collide with another client's.
        let h = self.hasher.hash_one(key);
        let shard = &self.shards[(h >> 32) as usize % self.shards.len()];
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        shard.check(h, now, self.rate)
    }

    /// Keys kept now.
    pub fn keys(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).tat.len()).sum()
    }
}

impl Shard {
    fn check(&mut self, h: u64, now: Instant, rate: Rate) -> Verdict {
        let tolerance = rate.interval * rate.burst;
        let known = self.tat.get(&h).copied();
        let tat = known.map_or(now, |t| t.max(now));
        let next = tat + rate.interval;
        let debt = next - now;
        if debt > tolerance {
            return Verdict::Limit { retry_after: debt - tolerance };
        }
        if known.is_none() && self.tat.len() >= self.cap {
            self.make_room(now);
        }
        self.tat.insert(h, next);
        Verdict::Allow
    }

    /// Drops the keys with no debt left, then, if that freed less than an eighth, the eighth with the least debt.
    fn make_room(&mut self, now: Instant) {
        self.tat.retain(|_, t| *t > now);
        let eighth = self.cap.div_ceil(8);
        if self.tat.len() + eighth <= self.cap {
            return;
        }
        let mut by_debt: Vec<(Instant, u64)> = self.tat.iter().map(|(h, t)| (*t, *h)).collect();
        let k = eighth.min(by_debt.len());
        by_debt.select_nth_unstable(k - 1);
        for (_, h) in &by_debt[..k] {
            self.tat.remove(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_s: u32, burst: u32, keys_max: usize) -> Limiter {
        Limiter::new(Rate { interval: Duration::from_secs(1) / per_s, burst }, keys_max)
    }

    #[test]
    fn a_burst_passes_at_once_then_the_steady_rate_and_a_refusal_says_when_to_come_back() {
        let l = limiter(10, 5, 100);
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(l.check(b"a", t0), Verdict::Allow, "burst request {i}");
        }
        assert_eq!(l.check(b"a", t0), Verdict::Limit { retry_after: Duration::from_millis(100) });
        assert!(matches!(l.check(b"a", t0 + Duration::from_millis(50)), Verdict::Limit { retry_after }
            if retry_after == Duration::from_millis(50)));
        assert_eq!(l.check(b"a", t0 + Duration::from_millis(100)), Verdict::Allow);
        assert!(matches!(l.check(b"a", t0 + Duration::from_millis(100)), Verdict::Limit { .. }));
        // Another key has its own allowance.
        assert_eq!(l.check(b"b", t0), Verdict::Allow);
    }

    #[test]
    fn over_ten_seconds_of_hammering_a_key_gets_burst_plus_rate_times_ten_and_refusals_cost_nothing() {
        let l = limiter(50, 20, 100);
        let t0 = Instant::now();
        let mut passed = 0;
        // 1000 requests a second for 10 s.
        for ms in 0..10_000u64 {
            if l.check(b"client", t0 + Duration::from_millis(ms)) == Verdict::Allow {
                passed += 1;
            }
        }
        assert_eq!(passed, 20 + 50 * 10 - 1, "the burst, then one every 20 ms (the last at 9.98 s)");
        // After a quiet spell as long as the burst takes to refill, the whole burst passes again.
        let later = t0 + Duration::from_millis(10_000 + 20 * 20);
        assert!((0..20).all(|_| l.check(b"client", later) == Verdict::Allow));
        assert!(matches!(l.check(b"client", later), Verdict::Limit { .. }));
    }

    #[test]
    fn the_keys_kept_never_pass_keys_max_and_the_ones_without_debt_go_first() {
        let l = limiter(1, 5, 64);
        assert_eq!(l.keys_max(), 64);
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            assert_eq!(l.check(&i.to_le_bytes(), t0), Verdict::Allow, "a new key has its burst");
            assert!(l.keys() <= 64);
        }
        // Once their debt is paid (1 s), old keys make room without anyone being forgotten early.
        let later = t0 + Duration::from_secs(2);
        let hot = b"hot";
        assert!((0..5).all(|_| l.check(hot, later) == Verdict::Allow));
        assert!(matches!(l.check(hot, later), Verdict::Limit { .. }));
        for i in 0..63u32 {
            l.check(&(20_000 + i).to_le_bytes(), later);
        }
        assert!(matches!(l.check(hot, later), Verdict::Limit { .. }), "the hot key, with the most debt, was kept");
        assert!(l.keys() <= 64);
    }

    #[test]
    fn a_full_shard_of_indebted_keys_forgets_the_eighth_with_the_least_debt() {
        let mut s = Shard { tat: HashMap::new(), cap: 16 };
        let rate = Rate { interval: Duration::from_secs(1), burst: 100 };
        let t0 = Instant::now();
        // Key k has k+1 requests of debt.
        for k in 0..16u64 {
            for _ in 0..=k {
                assert_eq!(s.check(k, t0, rate), Verdict::Allow);
            }
        }
        assert_eq!(s.check(99, t0, rate), Verdict::Allow);
        assert_eq!(s.tat.len(), 15, "two went, one came");
        assert!(!s.tat.contains_key(&0) && !s.tat.contains_key(&1) && s.tat.contains_key(&2));
    }
}
