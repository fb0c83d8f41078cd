//! The rollout planner: which instances a deploy starts and drains in what order. Pure functions, no I/O.

/// One wave of a rolling deploy: drain `drain_first` old instances, start `start` new ones and wait until they are
/// ready, put them in service, then drain `drain_after` more old ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wave {
    pub drain_first: u32,
    pub start: u32,
    pub drain_after: u32,
}

/// The waves that replace `count` instances while at most `count + max_surge` serve and at least
/// `count - max_unavailable` do. `max_surge + max_unavailable` must be at least 1 (config validation ensures it).
pub fn rolling_waves(count: u32, max_surge: u32, max_unavailable: u32) -> Vec<Wave> {
    let mut waves = Vec::new();
    // Invariant at the start of each wave: as many old instances drained as new ones started.
    let mut left = count;
    while left > 0 {
        let drain_first = max_unavailable.min(left);
        let start = (max_surge + drain_first).min(left);
        if start == 0 {
            break;
        }
        waves.push(Wave { drain_first, start, drain_after: start - drain_first });
        left -= start;
    }
    waves
}

/// One instance as placement sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// Index of its place (host).
    pub place: usize,
    /// Of the version being placed.
    pub same_version: bool,
    /// Starting or taking traffic (not drained, not stopping).
    pub active: bool,
}

/// The place (of `places`) for the next instance of a version: the one with the fewest instances of that
/// version, then the fewest active instances, then the first. So a service's count spreads evenly over its
/// hosts, and a rolling deploy replaces instances host by host, on the host an old instance was just drained from.
pub fn place(places: usize, instances: &[Placed]) -> usize {
    (0..places.max(1))
        .min_by_key(|&p| {
            let on = instances.iter().filter(|i| i.place == p);
            let same = on.clone().filter(|i| i.same_version).count();
            let active = on.filter(|i| i.active).count();
            (same, active, p)
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_spread_over_places_and_a_new_version_follows_the_drained_host() {
        // Boot: 2 per host on 3 hosts, round robin.
        let mut booted = Vec::new();
        for _ in 0..6 {
            let p = place(3, &booted);
            booted.push(Placed { place: p, same_version: true, active: true });
        }
        assert_eq!(booted.iter().map(|i| i.place).collect::<Vec<_>>(), [0, 1, 2, 0, 1, 2]);
        // A deploy: the old ones are of another version. With nothing drained the first host takes the first new one.
        let mut all: Vec<Placed> = booted.iter().map(|i| Placed { same_version: false, ..*i }).collect();
        assert_eq!(place(3, &all), 0);
        // max_unavailable: one old instance on host 2 is drained first, so the new one goes there.
        all[2].active = false;
        assert_eq!(place(3, &all), 2);
        all.push(Placed { place: 2, same_version: true, active: true });
        // Then host 0 (fewest of the new version, then fewest active, then order).
        assert_eq!(place(3, &all), 0);
        // One place only: always it.
        assert_eq!(place(1, &all), 0);
        assert_eq!(place(0, &[]), 0);
    }

    fn totals(w: &[Wave]) -> (u32, u32) {
        (w.iter().map(|w| w.start).sum(), w.iter().map(|w| w.drain_first + w.drain_after).sum())
    }

    #[test]
    fn one_at_a_time_by_default() {
        let w = rolling_waves(3, 1, 0);
        assert_eq!(w, vec![Wave { drain_first: 0, start: 1, drain_after: 1 }; 3]);
    }

    #[test]
    fn surge_and_unavailability_bound_each_wave() {
        for count in 1..8 {
            for surge in 0..4 {
                for unavailable in 0..4 {
                    if surge + unavailable == 0 {
                        continue;
                    }
                    let waves = rolling_waves(count, surge, unavailable);
                    assert_eq!(totals(&waves), (count, count), "{count} {surge} {unavailable}");
                    let (mut serving_old, mut serving_new) = (count, 0u32);
                    for w in &waves {
                        serving_old -= w.drain_first;
                        assert!(serving_old + serving_new + unavailable >= count, "too few serve: {waves:?}");
                        serving_new += w.start;
                        assert!(serving_old + serving_new <= count + surge, "too many serve: {waves:?}");
                        serving_old -= w.drain_after;
                        assert_eq!(serving_old + serving_new, count);
                    }
                }
            }
        }
    }

    #[test]
    fn unavailability_alone_drains_before_starting() {
        assert_eq!(rolling_waves(2, 0, 1), vec![Wave { drain_first: 1, start: 1, drain_after: 0 }; 2]);
        assert_eq!(
            rolling_waves(3, 2, 0),
            vec![Wave { drain_first: 0, start: 2, drain_after: 2 }, Wave { drain_first: 0, start: 1, drain_after: 1 }]
        );
    }
}
