//! The I/O shell of servers by name: on the health thread, resolves the host names of every service's servers when
//! their [`nonstop_dns::Tracker`] says so (TTL, interval, failed connects), and hands each service's pool the
//! servers its names resolve to now ([`crate::pool::Pool::set_resolved`]). Failures keep the last good addresses
//! and are logged once per change.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nonstop_config::ServerSpec;
use nonstop_dns::{Change, Resolver, Settings, Tracker};
use tokio::sync::watch;

use crate::Shared;

/// How often due names are looked for.
const TICK: Duration = Duration::from_millis(100);

fn settings(c: &nonstop_config::Resolver) -> Settings {
    Settings { nameservers: c.nameservers.clone(), interval: c.interval, ttl_min: c.ttl_min, timeout: c.timeout }
}

/// The names being resolved, and the resolver asking.
#[derive(Default)]
pub struct Names {
    resolver: Option<(Settings, Arc<Resolver>)>,
    setup_failed: Option<String>,
    trackers: HashMap<String, Tracker>,
}

/// Resolves every name of the config once, before the listeners take requests, so that a service of named servers
/// has its servers from the first request on. Bounded by the resolver's timeout.
pub fn initial(shared: &Arc<Shared>) -> Names {
    let mut names = Names::default();
    if shared.snapshot.load().services.values().all(|s| s.config.named.is_empty()) {
        return names;
    }
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => {
            rt.block_on(names.pass(shared, false, None));
        }
        Err(e) => tracing::error!(error = %e, "no runtime to resolve servers by name before start"),
    }
    // The resolver's connections live on the runtime that made them, which ends here: the thread makes its own.
    names.resolver = None;
    names
}

pub async fn run(shared: Arc<Shared>, mut names: Names, mut shutdown: watch::Receiver<bool>) {
    loop {
        let mut hinted = false;
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shared.resolve_hint.notified() => hinted = true,
            _ = shutdown.changed() => return,
        }
        if !names.pass(&shared, hinted, Some(&mut shutdown)).await {
            return;
        }
    }
}

impl Names {
    /// Resolves the names that are due and hands the pools their servers. `false`: shutdown came meanwhile.
    async fn pass(&mut self, shared: &Shared, hinted: bool, shutdown: Option<&mut watch::Receiver<bool>>) -> bool {
        let snap = shared.snapshot.load_full();
        let wanted: BTreeSet<&str> =
            snap.services.values().flat_map(|s| s.config.named.iter().map(|n| n.host.as_str())).collect();
        if wanted.is_empty() {
            self.trackers.clear();
            return true;
        }
        let s = settings(&snap.config.resolver);
        if self.resolver.as_ref().is_none_or(|(had, _)| *had != s) {
            match Resolver::new(&s) {
                Ok(r) => {
                    self.resolver = Some((s.clone(), Arc::new(r)));
                    self.setup_failed = None;
                }
                Err(e) => {
                    if self.setup_failed.as_deref() != Some(&e.to_string()) {
                        tracing::error!(error = %e, "servers by name cannot be resolved");
                        self.setup_failed = Some(e.to_string());
                    }
                    return true;
                }
            }
        }
        let Some((_, dns)) = self.resolver.clone() else { return true };
        let now = Instant::now();
        self.trackers.retain(|h, _| wanted.contains(h.as_str()));
        for h in &wanted {
            self.trackers.entry(h.to_string()).or_insert_with(|| Tracker::new(now));
        }
        if hinted {
            self.trackers.values_mut().for_each(|t| t.connect_failed(now, &s));
        }
        let due: Vec<String> = self.trackers.iter().filter(|(_, t)| t.due(now)).map(|(h, _)| h.clone()).collect();
        if !due.is_empty() {
            let mut set = tokio::task::JoinSet::new();
            for host in due {
                let dns = dns.clone();
                set.spawn(async move {
                    let r = dns.lookup(&host).await;
                    (host, r)
                });
            }
            let mut results = Vec::new();
            let all = async {
                while let Some(Ok(r)) = set.join_next().await {
                    results.push(r);
                }
            };
            match shutdown {
                Some(rx) => tokio::select! {
                    _ = all => {}
                    _ = rx.changed() => return false,
                },
                None => all.await,
            }
            let now = Instant::now();
            for (host, result) in results {
                let Some(t) = self.trackers.get_mut(&host) else { continue };
                let change = match result {
                    Ok(answer) => t.answered(now, answer, &s),
                    Err(e) => t.failed(now, e.to_string(), &s),
                };
                match change {
                    Change::None => {}
                    Change::Addrs(a) => tracing::info!(host = %host, addrs = ?a, "resolved"),
                    Change::Recovered(a) => tracing::info!(host = %host, addrs = ?a, "resolves again"),
                    Change::Failing(why) => match t.addrs() {
                        Some(kept) => {
                            tracing::warn!(host = %host, error = %why, kept = ?kept, "cannot resolve; keeping the last good addresses")
                        }
                        None => tracing::warn!(host = %host, error = %why, "cannot resolve; no server for it yet"),
                    },
                }
            }
        }
        for svc in snap.services.values().filter(|s| !s.config.named.is_empty()) {
            let mut specs: Vec<ServerSpec> = Vec::new();
            for n in &svc.config.named {
                for ip in self.trackers.get(&n.host).and_then(Tracker::addrs).unwrap_or_default() {
                    let addr = SocketAddr::new(*ip, n.port);
                    if !specs.iter().any(|s| s.addr == addr) {
                        specs.push(ServerSpec {
                            addr,
                            weight: n.weight,
                            backup: n.backup,
                            in_flight_max: n.in_flight_max,
                        });
                    }
                }
            }
            svc.pool.set_resolved(specs);
        }
        true
    }
}
