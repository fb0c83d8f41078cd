//! The running configuration: routes and services with their live servers. A reload builds a new snapshot that
//! keeps the live state (counters, pools, drain flags) of every server whose address stays, then swaps it in
//! atomically; requests already running keep the snapshot they started with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::Method;
use nonstop_config::{Balance, Config, Protocol};

use crate::balance::{Algorithm, Balancer, Candidate};
use crate::metrics::Stats;
use crate::upstream::{ConnSettings, Server};

pub struct Snapshot {
    pub config: Config,
    routes: Vec<RouteEntry>,
    pub services: HashMap<String, Arc<ServiceState>>,
    /// The TLS acceptor of each listener (by index), if it serves TLS.
    pub tls: Vec<Option<tokio_rustls::TlsAcceptor>>,
}

pub struct RouteEntry {
    pub host: Option<String>,
    pub path_prefix: String,
    pub methods: Option<Vec<Method>>,
    pub body_bytes_max: u64,
    pub service: Arc<ServiceState>,
}

pub enum RouteMatch<'a> {
    Found(&'a RouteEntry),
    /// A route matched host and path but not the method.
    MethodNotAllowed,
    NotFound,
}

pub struct ServiceState {
    pub name: String,
    pub config: nonstop_config::Service,
    pub settings: ConnSettings,
    members: Mutex<Members>,
    /// Requests of this service answered by the proxy itself (no server was tried).
    pub unserved: Stats,
}

struct Members {
    servers: Vec<Arc<Server>>,
    balancer: Balancer,
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

impl ServiceState {
    fn new(config: nonstop_config::Service, old: Option<&ServiceState>) -> ServiceState {
        let servers = config
            .servers
            .iter()
            .map(|spec| {
                let kept = old.and_then(|o| o.find(spec.addr));
                match kept {
                    Some(s) => {
                        s.set_weight(spec.weight);
                        s
                    }
                    None => Server::new(spec.addr, spec.weight),
                }
            })
            .collect();
        let settings = ConnSettings {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.pool_idle_timeout,
            idle_max: config.pool_idle_max,
            h2: config.protocol == Protocol::H2,
        };
        let balancer = Balancer::new(algorithm(&config.balance), fastrand::u64(..));
        ServiceState {
            name: config.name.clone(),
            settings,
            members: Mutex::new(Members { servers, balancer }),
            unserved: Stats::default(),
            config,
        }
    }

    pub fn servers(&self) -> Vec<Arc<Server>> {
        self.members.lock().expect("members lock").servers.clone()
    }

    pub fn find(&self, addr: SocketAddr) -> Option<Arc<Server>> {
        self.members.lock().expect("members lock").servers.iter().find(|s| s.addr == addr).cloned()
    }

    /// Chooses a server for one request; `None` when no server is usable.
    pub fn pick(&self, key: Option<u64>) -> Option<Arc<Server>> {
        let mut m = self.members.lock().expect("members lock");
        let candidates: Vec<Candidate> = m
            .servers
            .iter()
            .map(|s| Candidate {
                addr: s.addr,
                weight: s.weight(),
                in_flight: s.in_flight(),
                latency_ns: if m.balancer.algorithm() == Algorithm::PeakEwma { s.latency_ns() } else { 0.0 },
                available: !s.draining(),
            })
            .collect();
        let i = m.balancer.pick(&candidates, key)?;
        Some(m.servers[i].clone())
    }

    pub fn add_server(&self, addr: SocketAddr, weight: u32) -> Result<Arc<Server>, PoolError> {
        if weight > nonstop_config::WEIGHT_MAX {
            return Err(PoolError::Weight(weight));
        }
        let mut m = self.members.lock().expect("members lock");
        if m.servers.iter().any(|s| s.addr == addr) {
            return Err(PoolError::Exists(addr));
        }
        let s = Server::new(addr, weight);
        m.servers.push(s.clone());
        m.balancer.servers_changed();
        Ok(s)
    }

    pub fn remove_server(&self, addr: SocketAddr) -> Result<Arc<Server>, PoolError> {
        let mut m = self.members.lock().expect("members lock");
        let i = m.servers.iter().position(|s| s.addr == addr).ok_or(PoolError::Missing(addr))?;
        let s = m.servers.remove(i);
        m.balancer.servers_changed();
        s.close_idle();
        Ok(s)
    }

    pub fn set_weight(&self, addr: SocketAddr, weight: u32) -> Result<(), PoolError> {
        if weight > nonstop_config::WEIGHT_MAX {
            return Err(PoolError::Weight(weight));
        }
        let mut m = self.members.lock().expect("members lock");
        let s = m.servers.iter().find(|s| s.addr == addr).ok_or(PoolError::Missing(addr))?;
        s.set_weight(weight);
        m.balancer.servers_changed();
        Ok(())
    }
}

impl Snapshot {
    /// Builds the snapshot for `config`, keeping the live servers of `old` where addresses stay. Fails only when a
    /// listener's certificate or key cannot be loaded.
    pub fn build(config: Config, old: Option<&Snapshot>) -> Result<Snapshot, crate::tls::TlsError> {
        let tls = config
            .listeners
            .iter()
            .map(|l| l.tls.as_ref().map(crate::tls::acceptor).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let services: HashMap<String, Arc<ServiceState>> = config
            .services
            .values()
            .map(|s| {
                let prev = old.and_then(|o| o.services.get(&s.name)).map(|a| a.as_ref());
                (s.name.clone(), Arc::new(ServiceState::new(s.clone(), prev)))
            })
            .collect();
        let mut routes: Vec<RouteEntry> = config
            .routes
            .iter()
            .map(|r| RouteEntry {
                host: r.host.clone(),
                path_prefix: r.path_prefix.clone(),
                methods: r.methods.as_ref().map(|ms| ms.iter().filter_map(|m| m.parse().ok()).collect()),
                body_bytes_max: r.body_bytes_max,
                service: services[&r.service].clone(),
            })
            .collect();
        // Host-specific routes first, then the longest prefix; the sort is stable, so file order breaks ties.
        routes.sort_by_key(|r| (r.host.is_none(), std::cmp::Reverse(r.path_prefix.len())));
        if let Some(old) = old {
            for (name, svc) in &old.services {
                let gone = |addr| services.get(name).is_none_or(|s: &Arc<ServiceState>| s.find(addr).is_none());
                svc.servers().iter().filter(|s| gone(s.addr)).for_each(|s| s.close_idle());
            }
        }
        Ok(Snapshot { config, routes, services, tls })
    }

    /// Finds the route for a request. `host` is lower-case and without port.
    pub fn route(&self, host: Option<&str>, path: &str, method: &Method) -> RouteMatch<'_> {
        let mut method_mismatch = false;
        for r in &self.routes {
            if r.host.as_deref().is_some_and(|h| Some(h) != host) || !path.starts_with(&r.path_prefix) {
                continue;
            }
            match &r.methods {
                Some(ms) if !ms.contains(method) => method_mismatch = true,
                _ => return RouteMatch::Found(r),
            }
        }
        if method_mismatch {
            RouteMatch::MethodNotAllowed
        } else {
            RouteMatch::NotFound
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(extra_routes: &str) -> Snapshot {
        let text = format!(
            "[[listeners]]\nlisten = \"127.0.0.1:1\"\n{extra_routes}\n[[routes]]\nservice = \"a\"\n\
             [services.a]\nservers = [{{ addr = \"127.0.0.1:2\" }}]\n\
             [services.b]\nservers = [{{ addr = \"127.0.0.1:3\" }}]\n"
        );
        Snapshot::build(Config::parse(&text).unwrap(), None).unwrap()
    }

    fn service_of(s: &Snapshot, host: Option<&str>, path: &str, m: Method) -> Option<String> {
        match s.route(host, path, &m) {
            RouteMatch::Found(r) => Some(r.service.name.clone()),
            _ => None,
        }
    }

    #[test]
    fn host_then_longest_prefix_then_methods() {
        let s = snapshot(
            "[[routes]]\npath_prefix = \"/api\"\nservice = \"b\"\n\
             [[routes]]\nhost = \"b.test\"\nservice = \"b\"\n\
             [[routes]]\npath_prefix = \"/orders\"\nmethods = [\"POST\"]\nservice = \"b\"\n",
        );
        assert_eq!(service_of(&s, None, "/", Method::GET).as_deref(), Some("a"));
        assert_eq!(service_of(&s, None, "/api/x", Method::GET).as_deref(), Some("b"));
        assert_eq!(service_of(&s, Some("b.test"), "/", Method::GET).as_deref(), Some("b"));
        assert_eq!(service_of(&s, None, "/orders", Method::POST).as_deref(), Some("b"));
        // GET /orders falls through to the catch-all route.
        assert_eq!(service_of(&s, None, "/orders", Method::GET).as_deref(), Some("a"));
    }

    #[test]
    fn reload_keeps_live_servers() {
        let old = snapshot("");
        let a = old.services["a"].servers()[0].clone();
        a.set_draining(true);
        let new = Snapshot::build(old.config.clone(), Some(&old)).unwrap();
        assert!(Arc::ptr_eq(&a, &new.services["a"].servers()[0]));
        assert!(new.services["a"].servers()[0].draining());
    }

    #[test]
    fn admin_pool_changes() {
        let s = snapshot("");
        let svc = &s.services["a"];
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        svc.add_server(addr, 2).unwrap();
        assert!(matches!(svc.add_server(addr, 2), Err(PoolError::Exists(_))));
        svc.set_weight(addr, 0).unwrap();
        for _ in 0..10 {
            assert_ne!(svc.pick(None).unwrap().addr, addr, "weight 0 takes no requests");
        }
        svc.remove_server(addr).unwrap();
        assert!(matches!(svc.remove_server(addr), Err(PoolError::Missing(_))));
    }
}
