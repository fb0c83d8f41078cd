//! Choosing a server: a pure function of the pool's state (and, for peak-EWMA, a seeded random source), unit-tested
//! without sockets.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;

/// What the balancer needs to know of one server at the moment of choosing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub addr: SocketAddr,
    pub weight: u32,
    pub in_flight: u32,
    /// Peak-EWMA latency estimate, nanoseconds.
    pub latency_ns: f64,
    /// False while draining or ejected: never chosen.
    pub available: bool,
    /// Slow start: the share (0.1 to 1) of its normal traffic the server takes while ramping up.
    pub ramp: f64,
}

impl Candidate {
    fn usable(&self) -> bool {
        self.available && self.weight > 0
    }
}

/// The algorithms of `balance =` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    Weighted,
    LeastInflight,
    PeakEwma,
    Hash,
}

/// Balancer state for one service.
#[derive(Debug, Clone)]
pub struct Balancer {
    algorithm: Algorithm,
    next: usize,
    /// Smooth weighted round robin's current weights, one per candidate.
    current: Vec<i64>,
    rng: fastrand::Rng,
    /// The consistent-hash ring: (point, server index), sorted; rebuilt after [`Balancer::servers_changed`].
    ring: Vec<(u64, usize)>,
}

/// Points a server of weight 1 gets on the hash ring.
const RING_POINTS_PER_WEIGHT: u32 = 64;
/// Points one server gets at most, whatever its weight.
const RING_POINTS_MAX: u32 = 4096;

impl Balancer {
    pub fn new(algorithm: Algorithm, seed: u64) -> Balancer {
        Balancer { algorithm, next: 0, current: Vec::new(), rng: fastrand::Rng::with_seed(seed), ring: Vec::new() }
    }

    /// Must be called when servers are added, removed or re-weighted.
    pub fn servers_changed(&mut self) {
        self.ring.clear();
        self.current.clear();
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Picks the index of a server in `servers`, or `None` when none is usable. `key` is the request's hash key
    /// (used only by [`Algorithm::Hash`]; without a key, hashing falls back to round robin).
    ///
    /// A ramping server (slow start) keeps a pick with probability `ramp`; otherwise the pick goes to another
    /// usable server, if there is one. This works the same for every algorithm.
    pub fn pick(&mut self, servers: &[Candidate], key: Option<u64>) -> Option<usize> {
        let first = self.pick_once(servers, key)?;
        let ramp = servers[first].ramp;
        if ramp >= 1.0 || self.rng.f64() < ramp {
            return Some(first);
        }
        let mut others = servers.to_vec();
        others[first].available = false;
        Some(self.pick_once(&others, key).unwrap_or(first))
    }

    fn pick_once(&mut self, servers: &[Candidate], key: Option<u64>) -> Option<usize> {
        if !servers.iter().any(Candidate::usable) {
            return None;
        }
        match self.algorithm {
            Algorithm::RoundRobin => self.round_robin(servers),
            Algorithm::Weighted => self.smooth_weighted(servers),
            Algorithm::LeastInflight => self.least_inflight(servers),
            Algorithm::PeakEwma => self.power_of_two(servers),
            Algorithm::Hash => match key {
                Some(k) => {
                    if self.ring.is_empty() {
                        self.ring = build_ring(servers);
                    }
                    ring_pick(&self.ring, servers, k)
                }
                None => self.round_robin(servers),
            },
        }
    }

    fn round_robin(&mut self, servers: &[Candidate]) -> Option<usize> {
        let n = servers.len();
        for i in 0..n {
            let idx = (self.next + i) % n;
            if servers[idx].usable() {
                self.next = idx + 1;
                return Some(idx);
            }
        }
        None
    }

    /// nginx's smooth weighted round robin: each pick adds every weight to its current value, takes the largest,
    /// and subtracts the total from the winner. Weights 5,1,1 give a a b a c a a, never five a's in a row.
    fn smooth_weighted(&mut self, servers: &[Candidate]) -> Option<usize> {
        self.current.resize(servers.len(), 0);
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, s) in servers.iter().enumerate() {
            if !s.usable() {
                continue;
            }
            self.current[i] += i64::from(s.weight);
            total += i64::from(s.weight);
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        self.current[b] -= total;
        Some(b)
    }

    /// Fewest in-flight requests relative to weight; ties go round robin so that an idle pool still spreads.
    fn least_inflight(&mut self, servers: &[Candidate]) -> Option<usize> {
        let n = servers.len();
        let mut best: Option<(usize, f64)> = None;
        for i in 0..n {
            let idx = (self.next + i) % n;
            let s = &servers[idx];
            if !s.usable() {
                continue;
            }
            let load = f64::from(s.in_flight) / f64::from(s.weight);
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((idx, load));
            }
        }
        let (idx, _) = best?;
        self.next = idx + 1;
        Some(idx)
    }

    /// Power of two choices: two distinct random usable servers, the one with the lower
    /// latency × (in-flight + 1) / weight wins.
    fn power_of_two(&mut self, servers: &[Candidate]) -> Option<usize> {
        let usable: Vec<usize> = (0..servers.len()).filter(|&i| servers[i].usable()).collect();
        match usable.len() {
            0 => None,
            1 => Some(usable[0]),
            n => {
                let a = self.rng.usize(0..n);
                let mut b = self.rng.usize(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let cost = |i: usize| {
                    let s = &servers[i];
                    s.latency_ns.max(1.0) * f64::from(s.in_flight + 1) / f64::from(s.weight)
                };
                let (a, b) = (usable[a], usable[b]);
                Some(if cost(b) < cost(a) { b } else { a })
            }
        }
    }
}

fn hash64(value: impl Hash) -> u64 {
    // FNV-style stability is not needed across versions, only within a process; DefaultHasher with fixed keys is
    // deterministic.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// Hashes a request's key (a header value, a cookie, a client address).
pub fn hash_key(bytes: &[u8]) -> u64 {
    hash64(bytes)
}

/// Consistent hashing on a ring of virtual points: each server owns points in proportion to its weight, and a key
/// goes to the first usable server clockwise from its hash. Draining or ejecting one server moves only its keys.
/// The ring is derived from addresses, so every reload computes the same one.
fn build_ring(servers: &[Candidate]) -> Vec<(u64, usize)> {
    let mut ring = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        let points = s.weight.saturating_mul(RING_POINTS_PER_WEIGHT).min(RING_POINTS_MAX);
        ring.extend((0..points).map(|p| (hash64((s.addr, p)), i)));
    }
    ring.sort_unstable();
    ring
}

fn ring_pick(ring: &[(u64, usize)], servers: &[Candidate], key: u64) -> Option<usize> {
    let start = ring.partition_point(|&(point, _)| point < key);
    (0..ring.len()).map(|i| ring[(start + i) % ring.len()].1).find(|&i| servers.get(i).is_some_and(Candidate::usable))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Candidate {
                addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
                weight: w,
                in_flight: 0,
                latency_ns: 1e6,
                available: true,
                ramp: 1.0,
            })
            .collect()
    }

    fn counts(b: &mut Balancer, servers: &[Candidate], n: usize) -> Vec<usize> {
        let mut c = vec![0; servers.len()];
        for _ in 0..n {
            c[b.pick(servers, None).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn round_robin_cycles_and_skips_unavailable() {
        let mut s = pool(&[1, 1, 1]);
        let mut b = Balancer::new(Algorithm::RoundRobin, 1);
        let seq: Vec<usize> = (0..6).map(|_| b.pick(&s, None).unwrap()).collect();
        assert_eq!(seq, [0, 1, 2, 0, 1, 2]);
        s[1].available = false;
        let seq: Vec<usize> = (0..4).map(|_| b.pick(&s, None).unwrap()).collect();
        assert_eq!(seq, [0, 2, 0, 2]);
        s.iter_mut().for_each(|c| c.available = false);
        assert_eq!(b.pick(&s, None), None);
    }

    #[test]
    fn smooth_weighted_is_proportional_and_interleaved() {
        let s = pool(&[5, 1, 1]);
        let mut b = Balancer::new(Algorithm::Weighted, 1);
        let seq: Vec<usize> = (0..7).map(|_| b.pick(&s, None).unwrap()).collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(counts(&mut b, &s, 700), [500, 100, 100]);
        let s = pool(&[3, 0, 1]);
        assert_eq!(counts(&mut Balancer::new(Algorithm::Weighted, 1), &s, 400), [300, 0, 100]);
    }

    #[test]
    fn least_inflight_prefers_the_idle_server() {
        let mut s = pool(&[1, 1, 1]);
        s[0].in_flight = 5;
        s[1].in_flight = 1;
        s[2].in_flight = 3;
        let mut b = Balancer::new(Algorithm::LeastInflight, 1);
        assert_eq!(b.pick(&s, None), Some(1));
        s[1].in_flight = 9;
        assert_eq!(b.pick(&s, None), Some(2));
        // Idle pool: ties spread round robin.
        let s = pool(&[1, 1, 1]);
        assert_eq!(counts(&mut b, &s, 300), [100, 100, 100]);
    }

    #[test]
    fn peak_ewma_avoids_the_slow_server() {
        let mut s = pool(&[1, 1, 1]);
        s[2].latency_ns = 500e6;
        let mut b = Balancer::new(Algorithm::PeakEwma, 7);
        let c = counts(&mut b, &s, 3000);
        // The slow server only wins when it is not drawn, i.e. never: two distinct draws always include a fast one.
        assert_eq!(c[2], 0, "{c:?}");
        assert!(c[0] > 1200 && c[1] > 1200, "{c:?}");
        // Load counts too: a fast server with many requests in flight loses to an idle one.
        let mut s = pool(&[1, 1]);
        s[0].in_flight = 50;
        assert_eq!(counts(&mut b, &s, 100), [0, 100]);
    }

    #[test]
    fn hash_is_sticky_and_moves_only_the_removed_servers_keys() {
        let mut s = pool(&[1, 1, 1, 1]);
        let mut b = Balancer::new(Algorithm::Hash, 1);
        let keys: Vec<u64> = (0..2000).map(|i| hash_key(format!("user-{i}").as_bytes())).collect();
        let before: Vec<usize> = keys.iter().map(|&k| b.pick(&s, Some(k)).unwrap()).collect();
        let again: Vec<usize> = keys.iter().map(|&k| b.pick(&s, Some(k)).unwrap()).collect();
        assert_eq!(before, again, "same key, same server");
        let mut spread = [0usize; 4];
        before.iter().for_each(|&i| spread[i] += 1);
        assert!(spread.iter().all(|&n| n > 300), "roughly even: {spread:?}");
        s[2].available = false; // unavailable servers keep their ring points, so no rebuild is needed
        for (k, &was) in keys.iter().zip(&before) {
            let now = b.pick(&s, Some(*k)).unwrap();
            assert_ne!(now, 2);
            if was != 2 {
                assert_eq!(now, was, "a key not on the removed server moved");
            }
        }
    }

    #[test]
    fn slow_start_ramps_the_share_for_every_algorithm() {
        for alg in [Algorithm::RoundRobin, Algorithm::Weighted, Algorithm::LeastInflight, Algorithm::PeakEwma] {
            let mut s = pool(&[1, 1]);
            s[1].ramp = 0.25;
            let mut b = Balancer::new(alg, 3);
            let c = counts(&mut b, &s, 4000);
            // Without the ramp it would take half; with a quarter of its picks kept it takes far less (how much
            // less depends on how the algorithm's state moves after a refused pick), but still some.
            assert!((200..1200).contains(&c[1]), "{alg:?}: {c:?}");
            s[0].available = false;
            assert_eq!(counts(&mut b, &s, 100), [0, 100], "{alg:?}: a ramping server alone takes everything");
        }
    }
}
