//! One service's live pool: its servers with their health, the balancer, the admission queue and the retry
//! budget, behind one lock. The decisions come from the pure modules ([`crate::balance`], [`crate::health`],
//! [`crate::admission`]); this module keeps their state and hands out leases (a server's in-flight slot). The pool
//! outlives reloads: a reload reconfigures it in place, so health, queue and counters survive.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nonstop_config::{Balance, ServerSpec, Service};
use tokio::sync::oneshot;

use crate::admission::{self, Admit, QueueView, RetryBudget, ShedReason, Tried};
use crate::balance::{Algorithm, Balancer, Candidate};
use crate::health::{Health, Policy, Transition};
use crate::upstream::{InFlight, Role, Server};
use nonstop_deploy::analysis::Sample;
use nonstop_deploy::Change;

/// Why an admin change to a pool was refused.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("server {0} is already in the pool")]
    Exists(SocketAddr),
    #[error("no server {0} in the pool")]
    Missing(SocketAddr),
    #[error("weight {0} is out of range 0..={max}", max = nonstop_config::WEIGHT_MAX)]
    Weight(u32),
}

/// Counters of the pool, for metrics.
#[derive(Default)]
pub struct PoolCounters {
    /// Requests that had to wait in the queue.
    pub queued: AtomicU64,
    /// Requests answered 503 at once (queue full, or expected wait too long).
    pub shed: AtomicU64,
    /// Requests that waited the longest allowed time and got 503.
    pub queue_timeouts: AtomicU64,
    /// Total time spent waiting in the queue, microseconds.
    pub queue_wait_us: AtomicU64,
    /// Longest wait in the queue so far, microseconds.
    pub queue_wait_max_us: AtomicU64,
    /// Tries after the first.
    pub retries: AtomicU64,
    /// Retries refused by the retry budget.
    pub budget_exhausted: AtomicU64,
    pub ejections: AtomicU64,
}

/// What [`Pool::acquire`] gives a request.
pub enum Acquired {
    /// A server with a free slot.
    Now(InFlight),
    /// Wait in the queue for at most this long.
    Wait(oneshot::Receiver<InFlight>, Duration),
    /// Answer 503 now.
    Shed(ShedReason),
    /// No server is left that this request may try (it tried every one that is up).
    Exhausted,
}

struct Member {
    server: Arc<Server>,
    health: Health,
    backup: bool,
    /// Overrides the service's `server_in_flight_max`.
    in_flight_max: Option<u32>,
}

impl Member {
    /// Takes traffic by its own state: up and not ejected, not draining, weight above 0.
    fn serving(&self, now: Instant) -> bool {
        self.health.usable(now) && !self.server.draining() && self.server.weight() > 0
    }

    /// A drained server kept warm for a rollback takes the retries of requests that failed on a server on trial.
    fn standby_for(&self, now: Instant, tried: &Tried) -> bool {
        tried.avoid_trial() && self.server.role() == Role::Standby && self.health.usable(now)
    }

    /// Serving (or standing by for it), and allowed to this request by the servers it tried.
    fn open_to(&mut self, now: Instant, tried: &Tried) -> bool {
        let epoch = self.health.epoch(now);
        (self.serving(now) || self.standby_for(now, tried)) && tried.allows(self.server.addr, epoch, now)
    }
}

struct Waiter {
    key: Option<u64>,
    tried: Tried,
    tx: oneshot::Sender<InFlight>,
}

struct Inner {
    policy: Policy,
    admission: nonstop_config::Admission,
    retry: nonstop_config::Retry,
    eject_max_percent: u32,
    members: Vec<Member>,
    balancer: Balancer,
    queue: VecDeque<Waiter>,
    budget: RetryBudget,
    drain_deadline: Duration,
    /// A canary split: these servers get this percentage of requests, the others the rest.
    split: Option<(Vec<SocketAddr>, u32)>,
    /// The servers come from the service's app instances (a deploy adds and removes them), not its config.
    managed: bool,
    /// `choose`'s scratch list, kept so that a choice allocates nothing.
    candidates: Vec<Candidate>,
    /// Until when the queue may still hold requests that arrived while no server was serving (the last such
    /// arrival plus its longest wait): till then, a queue is an outage's backlog worked off by servers that are
    /// still warming up, not overload.
    after_outage_until: Option<Instant>,
    /// The warning "ejection share used up", rate-limited: with every server failing it would come on every
    /// request.
    fail_open_log: crate::health::Repeats,
    /// The servers the config lists by address.
    literal: Vec<ServerSpec>,
    /// The servers its host names resolve to now (see [`Pool::set_resolved`]).
    resolved: Vec<ServerSpec>,
}

pub struct Pool {
    pub name: String,
    me: Weak<Pool>,
    inner: Mutex<Inner>,
    /// Live waiters, readable without the lock.
    queued: AtomicUsize,
    pub counters: PoolCounters,
}

fn algorithm(b: &Balance) -> Algorithm {
    match b {
        Balance::RoundRobin => Algorithm::RoundRobin,
        Balance::Weighted => Algorithm::Weighted,
        Balance::LeastInflight => Algorithm::LeastInflight,
        Balance::PeakEwma => Algorithm::PeakEwma,
        Balance::Hash(_) => Algorithm::Hash,
    }
}

/// A server's state for the admin API.
pub struct MemberView {
    pub server: Arc<Server>,
    pub backup: bool,
    pub up: bool,
    pub ejected_ms: Option<u64>,
    pub ramp: f64,
    /// The learned limit (under the ceiling) and why it last moved; `None` without `adaptive_limit`.
    pub limit: Option<(u32, nonstop_limit::View)>,
    /// `server_in_flight_max` for this server.
    pub in_flight_max: u32,
}

impl Pool {
    /// A new pool for `svc`; its servers are warm (no slow start) when `warm`.
    pub fn new(svc: &Service, warm: bool) -> Arc<Pool> {
        let now = Instant::now();
        let policy = Policy::of(svc);
        let pool = Arc::new_cyclic(|me: &Weak<Pool>| Pool {
            name: svc.name.clone(),
            me: me.clone(),
            inner: Mutex::new(Inner {
                policy,
                admission: svc.admission,
                retry: svc.retry.clone(),
                eject_max_percent: svc.eject.max_percent,
                members: svc
                    .servers
                    .iter()
                    .map(|s| Member {
                        server: Server::new(s.addr, s.weight, me.clone()),
                        health: Health::new(now, warm, &policy),
                        backup: s.backup,
                        in_flight_max: s.in_flight_max,
                    })
                    .collect(),
                balancer: Balancer::new(algorithm(&svc.balance), fastrand::u64(..)),
                candidates: Vec::new(),
                after_outage_until: None,
                fail_open_log: Default::default(),
                queue: VecDeque::new(),
                budget: RetryBudget::new(now),
                drain_deadline: svc.drain_deadline,
                split: None,
                managed: svc.app.is_some(),
                literal: svc.servers.clone(),
                resolved: Vec::new(),
            }),
            queued: AtomicUsize::new(0),
            counters: PoolCounters::default(),
        });
        pool.lock().set_ceilings();
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("pool lock")
    }

    /// Applies a reloaded config: servers whose address stays keep their live state; new ones slow-start.
    pub fn reconfigure(&self, svc: &Service) {
        let now = Instant::now();
        let mut g = self.lock();
        let policy = Policy::of(svc);
        g.policy = policy;
        g.admission = svc.admission;
        g.retry = svc.retry.clone();
        g.eject_max_percent = svc.eject.max_percent;
        g.drain_deadline = svc.drain_deadline;
        g.managed = svc.app.is_some();
        if g.managed {
            // The app's instances are the servers; a reload leaves them to the deployer.
            if g.balancer.algorithm() != algorithm(&svc.balance) {
                g.balancer = Balancer::new(algorithm(&svc.balance), fastrand::u64(..));
            }
            g.set_ceilings();
            g.dispatch(now, &self.queued);
            return;
        }
        g.literal = svc.servers.clone();
        if svc.named.is_empty() {
            g.resolved.clear();
        }
        self.sync_members(&mut g, now, false);
        if g.balancer.algorithm() != algorithm(&svc.balance) {
            g.balancer = Balancer::new(algorithm(&svc.balance), fastrand::u64(..));
        }
        g.balancer.servers_changed();
        g.set_ceilings();
        g.dispatch(now, &self.queued);
    }

    /// Sets the servers the service's host names resolve to now: new addresses join (slow-starting, unless the
    /// pool had no server at all), vanished ones leave (requests in flight on them finish), kept ones keep their
    /// live state. An address the config also lists by itself keeps the config's settings.
    pub fn set_resolved(&self, resolved: Vec<ServerSpec>) {
        let now = Instant::now();
        let mut g = self.lock();
        if g.managed || g.resolved == resolved {
            return;
        }
        let warm = g.members.is_empty();
        g.resolved = resolved;
        self.sync_members(&mut g, now, warm);
        g.balancer.servers_changed();
        g.set_ceilings();
        g.dispatch(now, &self.queued);
    }

    /// The servers set by [`Pool::set_resolved`].
    pub fn resolved(&self) -> Vec<ServerSpec> {
        self.lock().resolved.clone()
    }

    /// Makes the members the literal servers and then the resolved ones not among them.
    fn sync_members(&self, g: &mut Inner, now: Instant, warm: bool) {
        let policy = g.policy;
        let mut specs = g.literal.clone();
        for r in &g.resolved {
            if !specs.iter().any(|s| s.addr == r.addr) {
                specs.push(*r);
            }
        }
        let mut old: Vec<Member> = std::mem::take(&mut g.members);
        for spec in &specs {
            let member = match old.iter().position(|m| m.server.addr == spec.addr) {
                Some(i) => {
                    let mut m = old.swap_remove(i);
                    m.server.set_weight(spec.weight);
                    m.backup = spec.backup;
                    m.in_flight_max = spec.in_flight_max;
                    m
                }
                None => Member {
                    server: Server::new(spec.addr, spec.weight, self.me.clone()),
                    health: Health::new(now, warm, &policy),
                    backup: spec.backup,
                    in_flight_max: spec.in_flight_max,
                },
            };
            g.members.push(member);
        }
        for gone in old {
            gone.server.close_idle();
        }
    }

    pub fn servers(&self) -> Vec<Arc<Server>> {
        self.lock().members.iter().map(|m| m.server.clone()).collect()
    }

    pub fn members(&self) -> Vec<MemberView> {
        let now = Instant::now();
        let g = self.lock();
        g.members
            .iter()
            .map(|m| MemberView {
                server: m.server.clone(),
                backup: m.backup,
                up: m.health.up(),
                ejected_ms: m
                    .health
                    .ejected_until()
                    .filter(|&u| u > now)
                    .map(|u| u.saturating_duration_since(now).as_millis() as u64),
                ramp: m.health.ramp(now, &g.policy),
                limit: g.admission.adaptive_limit.then(|| (g.slots_of(m), m.server.limit_view())),
                in_flight_max: g.max_of(m),
            })
            .collect()
    }

    pub fn find(&self, addr: SocketAddr) -> Option<Arc<Server>> {
        self.lock().members.iter().find(|m| m.server.addr == addr).map(|m| m.server.clone())
    }

    /// Requests waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queued.load(Relaxed)
    }

    /// A slot on a server for one request, or a place in the queue, or a refusal. `tried` holds the servers the
    /// request already failed on; `deadline_left` what is left of its deadline. `wait_for_recovery`: when no
    /// server is open to the request (all down, or all tried), wait for one to come back rather than give up.
    /// Without it, the request still waits when some server is down or ejected (it may come back), and gives up
    /// only when every server is up and was tried.
    pub fn acquire(
        &self,
        now: Instant,
        key: Option<u64>,
        tried: &Tried,
        deadline_left: Duration,
        wait_for_recovery: bool,
    ) -> Acquired {
        let mut g = self.lock();
        if tried.is_empty() {
            g.budget.record_request(now);
        }
        if g.queue.is_empty() {
            if let Some(i) = g.choose(now, key, tried) {
                return Acquired::Now(g.lease(i));
            }
        }
        if !wait_for_recovery && !g.any_open(now, tried) && !g.any_recovering(now) {
            return Acquired::Exhausted;
        }
        // A request that already tried a server keeps its seniority: it goes to the head of the queue, and the
        // length of the queue behind it does not count against it.
        let retrying = !tried.is_empty();
        let mut view = g.view(now, deadline_left);
        if retrying {
            view.queued = 0;
        }
        match admission::admit(&view) {
            Admit::Shed(reason) => {
                self.counters.shed.fetch_add(1, Relaxed);
                Acquired::Shed(reason)
            }
            Admit::Wait(limit) => {
                // No server serves (all down or restarting): the queue builds from an outage, not from overload.
                if !g.members.iter().any(|m| m.serving(now)) {
                    g.after_outage_until = g.after_outage_until.max(Some(now + limit));
                }
                let (tx, rx) = oneshot::channel();
                let waiter = Waiter { key, tried: tried.clone(), tx };
                if retrying {
                    g.queue.push_front(waiter);
                } else {
                    g.queue.push_back(waiter);
                }
                self.counters.queued.fetch_add(1, Relaxed);
                // Servers this request may use but the ones ahead may not can take it at once.
                g.dispatch(now, &self.queued);
                Acquired::Wait(rx, limit)
            }
        }
    }

    /// Records the result of one try on `server` (passive health), and returns the server's epoch for
    /// [`Tried`].
    pub fn report(&self, server: &Server, now: Instant, failed: bool) -> u64 {
        if !failed && !server.wants_report() {
            return 0;
        }
        let mut g = self.lock();
        let share = g.ejection_share(now);
        let policy = g.policy;
        let Some(m) = g.members.iter_mut().find(|m| std::ptr::eq(Arc::as_ptr(&m.server), server)) else {
            return 0;
        };
        let may_eject = m.backup || share;
        let t = m.health.on_result(now, failed, may_eject, &policy);
        m.server.set_wants_report(m.health.wants_success());
        let epoch = m.health.epoch(now);
        if share {
            g.fail_open_log.end();
        }
        match t {
            Transition::Ejected(d) => {
                self.counters.ejections.fetch_add(1, Relaxed);
                tracing::warn!(service = %self.name, server = %server.addr, ms = d.as_millis() as u64, "server ejected");
            }
            Transition::EjectRefused => match g.fail_open_log.hit(now) {
                Some(0) => {
                    tracing::warn!(service = %self.name, server = %server.addr, "ejection share used up: failing open")
                }
                Some(n) => tracing::warn!(
                    service = %self.name,
                    server = %server.addr,
                    "ejection share used up: failing open (and {n} more times since the last such line)"
                ),
                None => {}
            },
            _ => {}
        }
        epoch
    }

    /// The current epoch of `server` (for [`Tried`]).
    pub fn epoch(&self, server: &Server, now: Instant) -> u64 {
        let mut g = self.lock();
        g.members.iter_mut().find(|m| std::ptr::eq(Arc::as_ptr(&m.server), server)).map_or(0, |m| m.health.epoch(now))
    }

    /// Whether a server other than `except` is open to this request now (so a retry has somewhere to go).
    pub fn other_open(&self, now: Instant, tried: &Tried, except: SocketAddr) -> bool {
        let mut g = self.lock();
        g.members.iter_mut().any(|m| m.server.addr != except && m.open_to(now, tried))
    }

    /// Takes one retry (of a request that reached a server) from the budget.
    pub fn try_retry(&self, now: Instant) -> bool {
        let mut g = self.lock();
        let (percent, min) = (g.retry.budget_percent, g.retry.budget_min_per_s);
        let ok = g.budget.try_retry(now, percent, min);
        if ok {
            self.counters.retries.fetch_add(1, Relaxed);
        } else {
            self.counters.budget_exhausted.fetch_add(1, Relaxed);
        }
        ok
    }

    /// Counts a retry that needs no budget (the failed try never reached a server).
    pub fn count_free_retry(&self) {
        self.counters.retries.fetch_add(1, Relaxed);
    }

    /// Records a queue wait.
    pub fn waited(&self, d: Duration) {
        let us = d.as_micros() as u64;
        self.counters.queue_wait_us.fetch_add(us, Relaxed);
        self.counters.queue_wait_max_us.fetch_max(us, Relaxed);
    }

    /// One active health check's result.
    pub fn on_check(&self, addr: SocketAddr, now: Instant, passed: bool) {
        let mut g = self.lock();
        let policy = g.policy;
        let Some(m) = g.members.iter_mut().find(|m| m.server.addr == addr) else { return };
        match m.health.on_check(now, passed, &policy) {
            Transition::Down => tracing::warn!(service = %self.name, server = %addr, "server down (health checks)"),
            Transition::Up => {
                tracing::info!(service = %self.name, server = %addr, "server up (health checks)");
                g.dispatch(now, &self.queued);
            }
            _ => {}
        }
    }

    /// Periodic work: ends ejections that ran out, forgets waiters that gave up, and dispatches.
    pub fn tick(&self, now: Instant) {
        let mut g = self.lock();
        let adaptive = g.admission.adaptive_limit;
        for m in g.members.iter_mut() {
            m.health.epoch(now);
            if adaptive {
                m.server.limit_tick(now);
            }
        }
        g.dispatch(now, &self.queued);
    }

    /// Gives freed capacity to the queue (called when a lease ends while requests wait).
    pub fn released(&self) {
        if self.queued.load(Relaxed) > 0 {
            self.lock().dispatch(Instant::now(), &self.queued);
        }
    }

    /// Adds a server; it slow-starts unless `warm`.
    pub fn add_server(
        &self,
        addr: SocketAddr,
        weight: u32,
        backup: bool,
        warm: bool,
    ) -> Result<Arc<Server>, PoolError> {
        if weight > nonstop_config::WEIGHT_MAX {
            return Err(PoolError::Weight(weight));
        }
        let now = Instant::now();
        let mut g = self.lock();
        if g.members.iter().any(|m| m.server.addr == addr) {
            return Err(PoolError::Exists(addr));
        }
        let server = Server::new(addr, weight, self.me.clone());
        let health = Health::new(now, warm, &g.policy);
        g.members.push(Member { server: server.clone(), health, backup, in_flight_max: None });
        g.balancer.servers_changed();
        g.set_ceilings();
        g.dispatch(now, &self.queued);
        Ok(server)
    }

    pub fn remove_server(&self, addr: SocketAddr) -> Result<Arc<Server>, PoolError> {
        let mut g = self.lock();
        let i = g.members.iter().position(|m| m.server.addr == addr).ok_or(PoolError::Missing(addr))?;
        let m = g.members.remove(i);
        g.balancer.servers_changed();
        m.server.close_idle();
        Ok(m.server)
    }

    pub fn set_weight(&self, addr: SocketAddr, weight: u32) -> Result<(), PoolError> {
        if weight > nonstop_config::WEIGHT_MAX {
            return Err(PoolError::Weight(weight));
        }
        let mut g = self.lock();
        let m = g.members.iter().find(|m| m.server.addr == addr).ok_or(PoolError::Missing(addr))?;
        m.server.set_weight(weight);
        g.balancer.servers_changed();
        g.dispatch(Instant::now(), &self.queued);
        Ok(())
    }

    /// Applies a deploy's changes at once, under the lock: no request sees half of them.
    pub fn apply(&self, changes: Vec<Change>) {
        let now = Instant::now();
        let mut g = self.lock();
        let deadline = g.drain_deadline;
        let set_role = |server: &Arc<Server>, role: Role| {
            server.set_role(role);
            server.mark_draining(matches!(role, Role::Standby | Role::Draining), deadline);
        };
        for c in changes {
            match c {
                Change::Add { addr, warm, role } => {
                    if g.members.iter().any(|m| m.server.addr == addr) {
                        tracing::warn!(service = %self.name, server = %addr, "already in the pool");
                        continue;
                    }
                    let server = Server::new(addr, 1, self.me.clone());
                    set_role(&server, role);
                    let health = Health::new(now, warm, &g.policy);
                    g.members.push(Member { server, health, backup: false, in_flight_max: None });
                }
                Change::Role { addr, role } => {
                    if let Some(m) = g.members.iter().find(|m| m.server.addr == addr) {
                        set_role(&m.server, role);
                    }
                }
                Change::Remove(addr) => {
                    if let Some(i) = g.members.iter().position(|m| m.server.addr == addr) {
                        let m = g.members.remove(i);
                        m.server.close_idle();
                    }
                }
                Change::Split(split) => g.split = split,
            }
        }
        g.balancer.servers_changed();
        g.set_ceilings();
        g.dispatch(now, &self.queued);
    }

    /// The server's process is gone: take it down now (active checks bring it back up).
    pub fn mark_down(&self, addr: SocketAddr) {
        let mut g = self.lock();
        if let Some(m) = g.members.iter_mut().find(|m| m.server.addr == addr) {
            if m.health.force_down() == Transition::Down {
                tracing::warn!(service = %self.name, server = %addr, "server down (its process exited)");
            }
        }
    }

    /// Whether a server is up by health checks; `None` when it is not in the pool.
    pub fn healthy(&self, addr: SocketAddr) -> Option<bool> {
        self.lock().members.iter().find(|m| m.server.addr == addr).map(|m| m.health.up())
    }

    /// The try counters of these servers, summed, for deploy analysis.
    pub fn sample(&self, addrs: &[SocketAddr]) -> Sample {
        let servers: Vec<Arc<Server>> =
            self.lock().members.iter().filter(|m| addrs.contains(&m.server.addr)).map(|m| m.server.clone()).collect();
        let mut out = Sample::default();
        for s in servers {
            out.add(&s.tries.sample());
        }
        out
    }

    /// Re-runs dispatch after a server's drain flag changed.
    pub fn changed(&self) {
        self.lock().dispatch(Instant::now(), &self.queued);
    }
}

impl Inner {
    /// Whether one more primary may be ejected without passing the ejection share.
    fn ejection_share(&self, now: Instant) -> bool {
        let primaries = self.members.iter().filter(|m| !m.backup).count();
        let ejected = self.members.iter().filter(|m| !m.backup && m.health.ejected(now)).count();
        let allowed = (primaries * self.eject_max_percent as usize / 100).max(1);
        ejected < allowed
    }

    /// Whether a server is down or ejected (not drained): it may come back and take the request.
    fn any_recovering(&self, now: Instant) -> bool {
        self.members.iter().any(|m| !m.health.usable(now) && !m.server.draining() && m.server.weight() > 0)
    }

    /// Whether any server is open to this request, capacity aside.
    fn any_open(&mut self, now: Instant, tried: &Tried) -> bool {
        self.members.iter_mut().any(|m| m.open_to(now, tried))
    }

    /// Chooses a member for a request; `None` when none may take it now.
    /// Requests `m` is sent at once at most.
    fn max_of(&self, m: &Member) -> u32 {
        m.in_flight_max.unwrap_or(self.admission.server_in_flight_max)
    }

    /// Requests `m` may work on at once: its learned limit (under the ceiling), or the ceiling itself.
    fn slots_of(&self, m: &Member) -> u32 {
        if self.admission.adaptive_limit {
            m.server.limit().min(self.max_of(m))
        } else {
            self.max_of(m)
        }
    }

    /// Whether `m` may be sent one more request now, by its limits.
    fn has_room(&self, m: &Member) -> bool {
        m.server.in_flight() < self.max_of(m)
            && (!self.admission.adaptive_limit || m.server.pending() < m.server.limit())
    }

    /// Tells each server's adaptive limit its ceiling.
    fn set_ceilings(&self) {
        for m in &self.members {
            m.server.set_limit_ceiling(self.max_of(m));
        }
    }

    fn choose(&mut self, now: Instant, key: Option<u64>, tried: &Tried) -> Option<usize> {
        let policy = self.policy;
        let peak = self.balancer.algorithm() == Algorithm::PeakEwma;
        // First: which members are open to this request, capacity aside.
        let mut primary_open = false;
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.clear();
        for m in self.members.iter_mut() {
            let epoch = m.health.epoch(now);
            let open = m.health.usable(now)
                && (!m.server.draining() || m.standby_for(now, tried))
                && tried.allows(m.server.addr, epoch, now);
            primary_open |= open && !m.backup;
            candidates.push(Candidate {
                addr: m.server.addr,
                weight: m.server.weight(),
                in_flight: m.server.in_flight(),
                latency_ns: if peak { m.server.latency_ns() } else { 0.0 },
                available: open,
                ramp: m.health.ramp(now, &policy),
            });
        }
        // Then: backups only when no primary is open, and only servers with a free slot.
        for (c, m) in candidates.iter_mut().zip(&self.members) {
            c.available = c.available && m.backup != primary_open && self.has_room(m);
        }
        if tried.avoid_trial() {
            // A server on trial failed this request: another one on trial is the last resort.
            self.narrow(&mut candidates, |m| m.server.role() != Role::Trial);
        } else if let Some((canary, percent)) = &self.split {
            let want = fastrand::u32(0..100) < *percent;
            self.narrow(&mut candidates, |m| canary.contains(&m.server.addr) == want);
        }
        let chosen = self.balancer.pick(&candidates, key);
        self.candidates = candidates;
        chosen
    }

    /// Keeps only the candidates whose member passes `keep`, unless that leaves none.
    fn narrow(&self, candidates: &mut [Candidate], keep: impl Fn(&Member) -> bool) {
        let any = candidates.iter().zip(&self.members).any(|(c, m)| c.available && keep(m));
        if any {
            for (c, m) in candidates.iter_mut().zip(&self.members) {
                c.available = c.available && keep(m);
            }
        }
    }

    fn lease(&self, i: usize) -> InFlight {
        self.members[i].server.begin()
    }

    fn view(&self, now: Instant, deadline_left: Duration) -> QueueView {
        let up = |m: &&Member| m.serving(now);
        // The primaries serve while any is up; the backups only when none is.
        let primaries_up = self.members.iter().filter(up).any(|m| !m.backup);
        let serving: Vec<&Member> = self.members.iter().filter(up).filter(|m| m.backup != primaries_up).collect();
        // Overload is when every serving server is full. A queue that builds while some have free slots waits
        // for servers to recover (its requests already failed on those), not for capacity: no estimate applies.
        let full = serving.iter().all(|m| !self.has_room(m));
        let slots = if full { serving.iter().map(|m| u64::from(self.slots_of(m))).sum() } else { 0 };
        let latency_ns = if serving.is_empty() {
            0.0
        } else {
            serving.iter().map(|m| m.server.mean_latency_ns()).sum::<f64>() / serving.len() as f64
        };
        let after_outage = self.after_outage_until.is_some_and(|u| now < u);
        QueueView {
            queued: self.queue.len(),
            queue_length_max: self.admission.queue_length_max,
            wait_max: self.admission.queue_wait_max,
            overload_wait_max: self.admission.overload_wait_max,
            deadline_left,
            slots,
            latency: Duration::from_nanos(latency_ns as u64),
            arrival_rate: self.budget.request_rate(now),
            after_outage,
        }
    }

    /// Hands free slots to waiters, oldest first; a waiter that cannot use any free slot (it tried those
    /// servers) keeps its place.
    fn dispatch(&mut self, now: Instant, queued: &AtomicUsize) {
        let mut i = 0;
        while i < self.queue.len() {
            if self.queue[i].tx.is_closed() {
                self.queue.remove(i);
                continue;
            }
            let free = self.members.iter().any(|m| m.serving(now) && self.has_room(m));
            if !free {
                break;
            }
            let (key, tried) = (self.queue[i].key, self.queue[i].tried.clone());
            match self.choose(now, key, &tried) {
                Some(m) => {
                    let waiter = self.queue.remove(i).expect("index checked");
                    if let Err(lease) = waiter.tx.send(self.lease(m)) {
                        // The waiter gave up just now: free the slot without re-entering dispatch.
                        lease.release_quietly();
                    }
                }
                None => i += 1,
            }
        }
        queued.store(self.queue.len(), Relaxed);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Ok(g) = self.inner.get_mut() {
            g.members.iter().for_each(|m| m.server.close_idle());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nonstop_config::Config;

    fn pool(extra: &str) -> Arc<Pool> {
        let text = format!(
            "[[listeners]]\nlisten = \"127.0.0.1:1\"\n[[routes]]\nservice = \"a\"\n[services.a]\n\
             servers = [{{ addr = \"127.0.0.1:2\" }}, {{ addr = \"127.0.0.1:3\" }}, {{ addr = \"127.0.0.1:4\", backup = true }}]\n{extra}"
        );
        let c = Config::parse(&text).unwrap();
        Pool::new(&c.services["a"], true)
    }

    fn now_lease(p: &Pool, tried: &Tried) -> InFlight {
        match p.acquire(Instant::now(), None, tried, Duration::from_secs(60), true) {
            Acquired::Now(l) => l,
            Acquired::Wait(..) => panic!("waited"),
            Acquired::Shed(r) => panic!("shed: {r:?}"),
            Acquired::Exhausted => panic!("exhausted"),
        }
    }

    #[test]
    fn resolved_servers_join_and_leave_beside_the_listed_ones_and_survive_a_reload() {
        let p = pool("");
        let spec = |port: u16| ServerSpec {
            addr: SocketAddr::from(([127, 0, 0, 9], port)),
            weight: 1,
            backup: false,
            in_flight_max: None,
        };
        let ports = |p: &Pool| {
            let mut v: Vec<String> = p.servers().iter().map(|s| s.addr.to_string()).collect();
            v.sort();
            v
        };
        p.set_resolved(vec![spec(10), spec(11)]);
        assert_eq!(ports(&p), ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4", "127.0.0.9:10", "127.0.0.9:11"]);
        let kept = p.find("127.0.0.9:10".parse().unwrap()).unwrap();
        p.set_resolved(vec![spec(10)]);
        assert_eq!(ports(&p), ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4", "127.0.0.9:10"]);
        assert!(Arc::ptr_eq(&kept, &p.find("127.0.0.9:10".parse().unwrap()).unwrap()), "a kept server keeps its state");
        // A reload keeps what the names resolve to until the resolver says otherwise.
        let text = "[[listeners]]\nlisten = \"127.0.0.1:1\"\n[[routes]]\nservice = \"a\"\n[services.a]\n\
                    servers = [{ addr = \"127.0.0.1:2\" }, { addr = \"app.test:10\" }]\n";
        p.reconfigure(&Config::parse(text).unwrap().services["a"]);
        assert_eq!(ports(&p), ["127.0.0.1:2", "127.0.0.9:10"]);
        assert_eq!(p.resolved(), vec![spec(10)]);
        // Without names, nothing resolved stays.
        let text = "[[listeners]]\nlisten = \"127.0.0.1:1\"\n[[routes]]\nservice = \"a\"\n[services.a]\n\
                    servers = [{ addr = \"127.0.0.1:2\" }]\n";
        p.reconfigure(&Config::parse(text).unwrap().services["a"]);
        assert_eq!(ports(&p), ["127.0.0.1:2"]);
    }

    #[test]
    fn backup_only_when_no_primary_can_take_the_request() {
        let p = pool("");
        let primaries: Vec<u16> = (0..4).map(|_| now_lease(&p, &Tried::default()).server().addr.port()).collect();
        assert_eq!(primaries, [2, 3, 2, 3]);
        let now = Instant::now();
        let mut tried = Tried::default();
        for s in p.servers().iter().take(2) {
            tried.push(s.addr, p.epoch(s, now), now, true);
        }
        assert_eq!(now_lease(&p, &tried).server().addr.port(), 4, "tried every primary");
        for s in p.servers().iter().take(2) {
            p.on_check(s.addr, now, false);
            p.on_check(s.addr, now, false);
        }
        assert_eq!(now_lease(&p, &Tried::default()).server().addr.port(), 4, "every primary down");
    }

    #[test]
    fn full_servers_queue_then_dispatch_in_order() {
        let p = pool("[services.a.admission]\nserver_in_flight_max = 1\n");
        let a = now_lease(&p, &Tried::default());
        let b = now_lease(&p, &Tried::default());
        let now = Instant::now();
        let Acquired::Wait(mut first, _) = p.acquire(now, None, &Tried::default(), Duration::from_secs(60), true)
        else {
            panic!("expected a wait")
        };
        let Acquired::Wait(mut second, _) = p.acquire(now, None, &Tried::default(), Duration::from_secs(60), true)
        else {
            panic!("expected a wait")
        };
        assert_eq!(p.queued(), 2);
        assert!(first.try_recv().is_err());
        drop(a);
        let got = first.try_recv().expect("the oldest waiter gets the freed slot");
        assert!(second.try_recv().is_err());
        drop(b);
        assert!(second.try_recv().is_ok());
        assert_eq!(p.queued(), 0);
        drop(got);
    }

    #[test]
    fn a_waiter_that_gave_up_frees_its_place() {
        let p = pool("[services.a.admission]\nserver_in_flight_max = 1\nqueue_length_max = 1\n");
        let a = now_lease(&p, &Tried::default());
        let _b = now_lease(&p, &Tried::default());
        let now = Instant::now();
        let Acquired::Wait(rx, _) = p.acquire(now, None, &Tried::default(), Duration::from_secs(60), true) else {
            panic!("expected a wait")
        };
        assert!(matches!(
            p.acquire(now, None, &Tried::default(), Duration::from_secs(60), true),
            Acquired::Shed(ShedReason::QueueFull)
        ));
        drop(rx);
        drop(a);
        assert_eq!(p.queued(), 0);
        assert_eq!(p.servers()[0].in_flight(), 0, "the slot offered to the gone waiter was freed");
    }

    #[test]
    fn ejection_share_keeps_half_the_primaries() {
        let p = pool("[services.a.eject]\nconsecutive_failures = 1\n");
        let now = Instant::now();
        let servers = p.servers();
        p.report(&servers[0], now, true);
        p.report(&servers[1], now, true);
        let m = p.members();
        assert!(m[0].ejected_ms.is_some());
        assert!(m[1].ejected_ms.is_none(), "the second primary stays: fail open");
        assert_eq!(p.counters.ejections.load(Relaxed), 1);
    }

    #[test]
    fn all_down_queues_until_a_server_comes_back() {
        let p = pool("[services.a.health]\nrise = 1\nfall = 1\n");
        let now = Instant::now();
        for s in p.servers() {
            p.on_check(s.addr, now, false);
        }
        let Acquired::Wait(mut rx, limit) = p.acquire(now, None, &Tried::default(), Duration::from_secs(60), true)
        else {
            panic!("expected a wait")
        };
        assert_eq!(limit, Duration::from_secs(10));
        assert!(rx.try_recv().is_err());
        let back = p.servers()[1].addr;
        p.on_check(back, now, true);
        assert_eq!(rx.try_recv().expect("dispatched on recovery").server().addr, back);
    }

    #[test]
    fn an_outage_backlog_waits_however_slow_the_servers_come_back() {
        let p = pool("[services.a.health]\nrise = 1\nfall = 1\n[services.a.admission]\nserver_in_flight_max = 1\n");
        let now = Instant::now();
        let wait = |p: &Pool, at: Instant| match p.acquire(at, None, &Tried::default(), Duration::from_secs(60), true) {
            Acquired::Wait(rx, _) => Ok(rx),
            Acquired::Shed(reason) => Err(reason),
            _ => panic!("expected a wait or a shed"),
        };
        for s in p.servers() {
            p.on_check(s.addr, now, false);
        }
        // 300 requests arrive while every server is down; the primaries come back, at 1 s a request.
        let backlog: Vec<_> = (0..300).map(|_| wait(&p, now).expect("waits for the servers")).collect();
        for s in p.servers().iter().take(2) {
            (0..200).for_each(|_| s.observe_latency(now, Duration::from_secs(1)));
            p.on_check(s.addr, now, true);
        }
        // By the estimate this is overload (300/s arriving, 2/s served) with a wait of minutes, but the queue is
        // the outage's backlog: a new arrival waits behind it.
        assert_eq!(p.queued(), 298);
        let behind = wait(&p, now).expect("an outage's backlog is not overload");
        drop(backlog);
        drop(behind);
        // Once every request of the outage is gone (the longest wait has passed), the same estimate sheds.
        let later = now + Duration::from_secs(11);
        let _busy = (now_lease(&p, &Tried::default()), now_lease(&p, &Tried::default()));
        assert_eq!(p.queued(), 0);
        let tries: Vec<_> = (0..10).map(|_| wait(&p, later)).collect();
        let shed = tries.iter().find_map(|t| t.as_ref().err());
        assert!(matches!(shed, Some(ShedReason::WaitTooLong { .. })), "{shed:?}");
    }

    fn app_pool() -> Arc<Pool> {
        let text =
            "[[listeners]]\nlisten = \"127.0.0.1:1\"\n[[routes]]\nservice = \"a\"\n[services.a]\nslow_start_ms = 0\n\
                    [services.a.app]\ncommand = \"x\"\nports = \"9101-9106\"\n";
        Pool::new(&Config::parse(text).unwrap().services["a"], true)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn ports_of(p: &Pool, n: usize, tried: &Tried) -> Vec<u16> {
        (0..n).map(|_| now_lease(p, tried).server().addr.port()).collect()
    }

    #[test]
    fn deploy_changes_apply_at_once_and_standby_takes_only_retries_of_trial_failures() {
        let p = app_pool();
        assert!(p.servers().is_empty(), "an app service starts with no servers");
        let add = |port, role| Change::Add { addr: addr(port), warm: true, role };
        p.apply(vec![add(9101, Role::Serving), add(9102, Role::Serving)]);
        // A blue-green switch: the new server in on trial, the old ones on standby, in one change.
        p.apply(vec![
            add(9103, Role::Trial),
            Change::Role { addr: addr(9101), role: Role::Standby },
            Change::Role { addr: addr(9102), role: Role::Standby },
        ]);
        assert_eq!(ports_of(&p, 4, &Tried::default()), [9103; 4], "only the new server serves");
        let now = Instant::now();
        let mut tried = Tried::default();
        tried.push(addr(9103), 0, now, true);
        tried.set_avoid_trial();
        let retry = now_lease(&p, &tried).server().addr.port();
        assert!([9101, 9102].contains(&retry), "a trial failure is retried on a warm standby server: {retry}");
        // Rollback: the old ones serve again, the new one drains, then goes.
        p.apply(vec![
            Change::Role { addr: addr(9101), role: Role::Serving },
            Change::Role { addr: addr(9102), role: Role::Serving },
            Change::Role { addr: addr(9103), role: Role::Draining },
        ]);
        assert!(ports_of(&p, 6, &Tried::default()).iter().all(|&p| p != 9103));
        p.apply(vec![Change::Remove(addr(9103))]);
        assert_eq!(p.servers().len(), 2);
        // A reload keeps the instances of an app service.
        p.reconfigure(&Config::parse("[[listeners]]\nlisten = \"127.0.0.1:1\"\n[[routes]]\nservice = \"a\"\n[services.a.app]\ncommand = \"y\"\nports = \"9101-9106\"\n").unwrap().services["a"]);
        assert_eq!(p.servers().len(), 2);
    }

    #[test]
    fn a_canary_split_sends_its_share_whatever_the_algorithm() {
        let p = app_pool();
        let add = |port, role| Change::Add { addr: addr(port), warm: true, role };
        p.apply(vec![
            add(9101, Role::Serving),
            add(9102, Role::Serving),
            add(9103, Role::Trial),
            add(9104, Role::Trial),
        ]);
        p.apply(vec![Change::Split(Some((vec![addr(9103), addr(9104)], 10)))]);
        let picks = ports_of(&p, 4000, &Tried::default());
        let canary = picks.iter().filter(|&&p| p >= 9103).count();
        assert!((300..500).contains(&canary), "about 10% to the canary: {canary} of 4000");
        p.apply(vec![Change::Split(None)]);
        let canary = ports_of(&p, 400, &Tried::default()).iter().filter(|&&p| p >= 9103).count();
        assert_eq!(canary, 200, "round robin again without the split");
    }

    #[test]
    fn an_exited_server_is_down_at_once() {
        let p = app_pool();
        p.apply(vec![Change::Add { addr: addr(9101), warm: true, role: Role::Serving }]);
        assert_eq!(p.healthy(addr(9101)), Some(true));
        p.mark_down(addr(9101));
        assert_eq!(p.healthy(addr(9101)), Some(false));
        assert_eq!(p.healthy(addr(9109)), None);
    }
}
