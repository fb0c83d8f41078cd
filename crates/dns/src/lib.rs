//! Servers by name. [`Tracker`] is the pure state machine of one name: when it is due to be resolved again (its
//! TTL, bounded by the configured interval and floor, sooner after a failed connect, backing off after failed
//! lookups), whether an answer changes its addresses, and which failures are worth a log line (a change, never
//! each retry). [`Resolver`] is the thin shell around hickory-resolver that asks.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// How names are resolved and how often again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// DNS servers to ask; empty: those of /etc/resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    /// A name is resolved again at least this often, whatever its TTL.
    pub interval: Duration,
    /// ... and at most this often, however short its TTL (or however many connects fail).
    pub ttl_min: Duration,
    /// One lookup takes at most this long.
    pub timeout: Duration,
}

/// What a name resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Sorted, without duplicates; never empty.
    pub addrs: Vec<IpAddr>,
    /// Until when the answer holds (its TTL).
    pub valid_until: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot set up the resolver: {0}")]
    Setup(String),
    #[error("{0}")]
    Lookup(String),
    #[error("the name has no address (no A or AAAA record)")]
    Empty,
    #[error("no answer within {0} ms")]
    Timeout(u128),
}

/// What a lookup's result changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing: the same addresses (or a failure that keeps the last good ones, already logged).
    None,
    /// The name now has these addresses.
    Addrs(Vec<IpAddr>),
    /// The lookup failed in a new way (the last good addresses are kept): worth one log line.
    Failing(String),
    /// It resolves again after failing: worth one log line, and these are its addresses.
    Recovered(Vec<IpAddr>),
}

/// The state of one name.
#[derive(Debug, Clone)]
pub struct Tracker {
    good: Option<Vec<IpAddr>>,
    due: Instant,
    resolved_at: Option<Instant>,
    failing: Option<String>,
    failures: u32,
}

impl Tracker {
    /// A name never resolved: due at once.
    pub fn new(now: Instant) -> Tracker {
        Tracker { good: None, due: now, resolved_at: None, failing: None, failures: 0 }
    }

    /// The last good addresses, if it ever resolved.
    pub fn addrs(&self) -> Option<&[IpAddr]> {
        self.good.as_deref()
    }

    pub fn due(&self, now: Instant) -> bool {
        now >= self.due
    }

    pub fn next_due(&self) -> Instant {
        self.due
    }

    /// Takes a lookup's answer.
    pub fn answered(&mut self, now: Instant, answer: Answer, s: &Settings) -> Change {
        let floor = now + s.ttl_min;
        self.due = answer.valid_until.clamp(floor, now + s.interval.max(s.ttl_min));
        self.resolved_at = Some(now);
        self.failures = 0;
        let recovered = self.failing.take().is_some();
        let changed = self.good.as_ref() != Some(&answer.addrs);
        self.good = Some(answer.addrs.clone());
        match (recovered, changed) {
            (true, _) => Change::Recovered(answer.addrs),
            (false, true) => Change::Addrs(answer.addrs),
            (false, false) => Change::None,
        }
    }

    /// Takes a failed lookup: the last good addresses stay, and the next try backs off (1 s, 2 s, 4 s, ... up to
    /// the interval).
    pub fn failed(&mut self, now: Instant, why: String, s: &Settings) -> Change {
        self.failures = self.failures.saturating_add(1);
        let backoff = Duration::from_secs(1u64 << self.failures.min(16).saturating_sub(1));
        self.due = now + backoff.clamp(s.ttl_min.min(Duration::from_secs(1)), s.interval.max(s.ttl_min));
        self.resolved_at = Some(now);
        if self.failing.as_deref() == Some(why.as_str()) {
            return Change::None;
        }
        self.failing = Some(why.clone());
        Change::Failing(why)
    }

    /// A connect to one of its addresses failed: the address may have moved, so resolve again soon, but not more
    /// often than `ttl_min` (a dead server must not turn into a flood of lookups).
    pub fn connect_failed(&mut self, now: Instant, s: &Settings) {
        let earliest = self.resolved_at.map_or(now, |at| at + s.ttl_min).max(now);
        self.due = self.due.min(earliest);
    }
}

/// Asks DNS servers (hickory-resolver on tokio).
pub struct Resolver {
    inner: hickory_resolver::TokioResolver,
    timeout: Duration,
}

impl Resolver {
    pub fn new(s: &Settings) -> Result<Resolver, Error> {
        use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ProtocolConfig, ResolverConfig};
        use hickory_resolver::net::runtime::TokioRuntimeProvider;
        let mut builder = if s.nameservers.is_empty() {
            hickory_resolver::Resolver::builder_tokio().map_err(|e| Error::Setup(e.to_string()))?
        } else {
            let servers = s
                .nameservers
                .iter()
                .map(|a| {
                    let conn = |protocol| {
                        let mut c = ConnectionConfig::new(protocol);
                        c.port = a.port();
                        c
                    };
                    NameServerConfig::new(a.ip(), true, vec![conn(ProtocolConfig::Udp), conn(ProtocolConfig::Tcp)])
                })
                .collect();
            hickory_resolver::Resolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        opts.timeout = s.timeout;
        opts.attempts = 2;
        // The tracker decides when to ask again; the cache must not answer past the TTL, nor hold a failure.
        opts.negative_max_ttl = Some(Duration::ZERO);
        opts.positive_max_ttl = Some(s.interval);
        let inner = builder.build().map_err(|e| Error::Setup(e.to_string()))?;
        Ok(Resolver { inner, timeout: s.timeout })
    }

    /// The addresses of `host` now.
    pub async fn lookup(&self, host: &str) -> Result<Answer, Error> {
        // A name with a trailing dot is absolute: no search domains are tried.
        let lookup = self.inner.lookup_ip(host);
        let found = match tokio::time::timeout(self.timeout * 3, lookup).await {
            Ok(r) => r.map_err(|e| Error::Lookup(e.to_string()))?,
            Err(_) => return Err(Error::Timeout(self.timeout.as_millis() * 3)),
        };
        let mut addrs: Vec<IpAddr> = found.iter().collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(Error::Empty);
        }
        Ok(Answer { addrs, valid_until: found.valid_until() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            nameservers: vec![],
            interval: Duration::from_secs(30),
            ttl_min: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_next_lookup_follows_the_ttl_within_the_floor_and_the_interval() {
        let s = settings();
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        assert!(t.due(t0));
        let a = vec![ip("10.0.0.1")];
        let ch = t.answered(t0, Answer { addrs: a.clone(), valid_until: t0 + Duration::from_secs(5) }, &s);
        assert_eq!(ch, Change::Addrs(a.clone()));
        assert_eq!(t.next_due(), t0 + Duration::from_secs(5));
        // A long TTL is cut to the interval; a zero TTL raised to the floor.
        t.answered(t0, Answer { addrs: a.clone(), valid_until: t0 + Duration::from_secs(3600) }, &s);
        assert_eq!(t.next_due(), t0 + Duration::from_secs(30));
        let same = t.answered(t0, Answer { addrs: a.clone(), valid_until: t0 }, &s);
        assert_eq!((same, t.next_due()), (Change::None, t0 + Duration::from_secs(1)));
        let b = vec![ip("10.0.0.1"), ip("10.0.0.2")];
        assert_eq!(t.answered(t0, Answer { addrs: b.clone(), valid_until: t0 }, &s), Change::Addrs(b.clone()));
        assert_eq!(t.addrs(), Some(b.as_slice()));
    }

    #[test]
    fn failures_keep_the_last_good_addresses_back_off_and_log_once_per_change() {
        let s = settings();
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        let a = vec![ip("10.0.0.1")];
        t.answered(t0, Answer { addrs: a.clone(), valid_until: t0 + Duration::from_secs(10) }, &s);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(t.failed(t1, "SERVFAIL".into(), &s), Change::Failing("SERVFAIL".into()));
        assert_eq!(t.next_due(), t1 + Duration::from_secs(1));
        assert_eq!(t.failed(t1, "SERVFAIL".into(), &s), Change::None, "the same failure is not logged again");
        assert_eq!(t.next_due(), t1 + Duration::from_secs(2));
        t.failed(t1, "SERVFAIL".into(), &s);
        assert_eq!(t.next_due(), t1 + Duration::from_secs(4));
        for _ in 0..20 {
            t.failed(t1, "SERVFAIL".into(), &s);
        }
        assert_eq!(t.next_due(), t1 + Duration::from_secs(30), "backs off up to the interval");
        assert_eq!(t.failed(t1, "timeout".into(), &s), Change::Failing("timeout".into()), "a new failure is");
        assert_eq!(t.addrs(), Some(a.as_slice()), "the last good addresses stay");
        let back = t.answered(t1, Answer { addrs: a.clone(), valid_until: t1 + Duration::from_secs(10) }, &s);
        assert_eq!(back, Change::Recovered(a));
    }

    #[test]
    fn a_failed_connect_brings_the_next_lookup_forward_but_not_before_the_floor() {
        let s = settings();
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.answered(t0, Answer { addrs: vec![ip("10.0.0.1")], valid_until: t0 + Duration::from_secs(30) }, &s);
        t.connect_failed(t0 + Duration::from_millis(200), &s);
        assert_eq!(t.next_due(), t0 + Duration::from_secs(1), "no sooner than ttl_min after the last lookup");
        t.connect_failed(t0 + Duration::from_secs(5), &s);
        assert_eq!(t.next_due(), t0 + Duration::from_secs(1), "never later than it was");
        let mut u = Tracker::new(t0);
        u.answered(t0, Answer { addrs: vec![ip("10.0.0.1")], valid_until: t0 + Duration::from_secs(30) }, &s);
        u.connect_failed(t0 + Duration::from_secs(7), &s);
        assert_eq!(u.next_due(), t0 + Duration::from_secs(7), "at once when the floor has passed");
    }
}
