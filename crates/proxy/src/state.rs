//! The running configuration: routes and services with their live servers. A reload builds a new snapshot that
//! keeps the live state (counters, pools, drain flags) of every server whose address stays, then swaps it in
//! atomically; requests already running keep the snapshot they started with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::Method;
use nonstop_config::{Config, Protocol};

use crate::metrics::Stats;
use crate::pool::Pool;
pub use crate::pool::PoolError;
use crate::upstream::{ConnSettings, Server};

pub struct Snapshot {
    pub config: Config,
    routes: Vec<RouteEntry>,
    pub services: HashMap<String, Arc<ServiceState>>,
    /// The TLS acceptor of each listener (by index), if it serves TLS.
    pub tls: Vec<Option<tokio_rustls::TlsAcceptor>>,
    /// The Strict-Transport-Security value of each listener (by index), if it sends one.
    pub hsts: Vec<Option<http::HeaderValue>>,
}

pub struct RouteEntry {
    pub host: Option<String>,
    pub path_prefix: String,
    pub methods: Option<Vec<Method>>,
    pub body_bytes_max: u64,
    /// Where its requests go: a service, or static files.
    pub target: Target,
    /// The durable queue its requests go through.
    pub queue: Option<String>,
    pub access: Option<nonstop_guard::AccessList>,
    pub rate_limit: Option<RouteLimit>,
    pub rewrite: nonstop_rewrite::PathRewrite,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub compress: Option<RouteCompress>,
    pub basic_auth: Option<RouteAuth>,
    pub forward_auth: Option<Box<RouteForwardAuth>>,
    /// Whether any header template reads `{request_id}` or `{client}`.
    pub wants_request_id: bool,
    pub wants_client: bool,
}

/// What serves a route.
pub enum Target {
    Service(Arc<ServiceState>),
    Files(Arc<nonstop_files::Files>),
}

impl RouteEntry {
    /// Whether the route does more than match and forward (so that the plain path checks one flag).
    pub fn dressed(&self) -> bool {
        self.access.is_some()
            || self.rate_limit.is_some()
            || !self.rewrite.is_empty()
            || !self.request_headers.is_empty()
            || !self.response_headers.is_empty()
    }
}

/// A route's Basic authentication: its users, what passed lately, and how many hashes are being verified.
pub struct RouteAuth {
    pub users: Arc<nonstop_guard::basic::Users>,
    /// `Basic realm="...", charset="UTF-8"`.
    pub challenge: http::HeaderValue,
    pub verified: nonstop_guard::basic::Verified,
    pub verifying: tokio::sync::Semaphore,
}

/// A route's forward authentication: the service asked, as a bare route to it, and what is asked.
pub struct RouteForwardAuth {
    pub service: Arc<ServiceState>,
    /// A route that only forwards (no rules of its own), for the question's trip through the service.
    pub route: RouteEntry,
    pub uri: http::Uri,
    pub copy_headers: Vec<http::HeaderName>,
}

impl RouteEntry {
    /// A route that forwards to `service` and does nothing else.
    fn bare(service: Arc<ServiceState>) -> RouteEntry {
        RouteEntry {
            host: None,
            path_prefix: "/".to_string(),
            methods: None,
            body_bytes_max: 0,
            target: Target::Service(service),
            queue: None,
            access: None,
            rate_limit: None,
            rewrite: nonstop_rewrite::PathRewrite::default(),
            request_headers: HeaderOps::new(&nonstop_rewrite::HeaderRules::default()),
            response_headers: HeaderOps::new(&nonstop_rewrite::HeaderRules::default()),
            compress: None,
            basic_auth: None,
            forward_auth: None,
            wants_request_id: false,
            wants_client: false,
        }
    }
}

/// A route's compression and how many of its responses are being compressed now.
pub struct RouteCompress {
    pub settings: nonstop_compress::Settings,
    pub streams_max: usize,
    streams: Arc<std::sync::atomic::AtomicUsize>,
}

/// One of a route's compressed responses, counted until dropped.
pub struct StreamPermit(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl RouteCompress {
    /// A place among the route's compressed responses, unless streams_max are being compressed.
    pub fn permit(&self) -> Option<StreamPermit> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut n = self.streams.load(Relaxed);
        loop {
            if n >= self.streams_max {
                return None;
            }
            match self.streams.compare_exchange_weak(n, n + 1, Relaxed, Relaxed) {
                Ok(_) => return Some(StreamPermit(self.streams.clone())),
                Err(now) => n = now,
            }
        }
    }
}

/// A route's header rules with their names parsed once.
#[derive(Default)]
pub struct HeaderOps {
    pub remove: Vec<http::HeaderName>,
    pub set: Vec<(http::HeaderName, nonstop_rewrite::Template)>,
    pub add: Vec<(http::HeaderName, nonstop_rewrite::Template)>,
}

impl HeaderOps {
    fn new(rules: &nonstop_rewrite::HeaderRules) -> HeaderOps {
        // The config checked every name as an HTTP token, so none is dropped here.
        let name = |n: &String| http::HeaderName::from_bytes(n.as_bytes()).ok();
        HeaderOps {
            remove: rules.remove.iter().filter_map(name).collect(),
            set: rules.set.iter().filter_map(|(n, t)| Some((name(n)?, t.clone()))).collect(),
            add: rules.add.iter().filter_map(|(n, t)| Some((name(n)?, t.clone()))).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Removes, sets and adds on `headers` (a response's).
    pub fn apply(&self, headers: &mut http::HeaderMap, vars: &impl nonstop_rewrite::Vars) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, t) in &self.set {
            if let Ok(v) = http::HeaderValue::from_bytes(t.expand(vars).as_bytes()) {
                headers.insert(n.clone(), v);
            }
        }
        for (n, t) in &self.add {
            if let Ok(v) = http::HeaderValue::from_bytes(t.expand(vars).as_bytes()) {
                headers.append(n.clone(), v);
            }
        }
    }

    /// The same on a request on its way out: its head, and the headers the proxy adds to it (which a rule removes
    /// or replaces like any other).
    pub fn apply_outgoing(
        &self,
        headers: &mut http::HeaderMap,
        added: &mut Vec<(http::HeaderName, http::HeaderValue)>,
        vars: &impl nonstop_rewrite::Vars,
    ) {
        for n in self.remove.iter().chain(self.set.iter().map(|(n, _)| n)) {
            headers.remove(n);
            added.retain(|(a, _)| a != n);
        }
        for (n, t) in self.set.iter().chain(&self.add) {
            if let Ok(v) = http::HeaderValue::from_bytes(t.expand(vars).as_bytes()) {
                added.push((n.clone(), v));
            }
        }
    }
}

/// A route's rate limit and what it counts by; its state starts afresh with each snapshot.
pub struct RouteLimit {
    pub limiter: nonstop_guard::Limiter,
    pub key: nonstop_config::RateKey,
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
    /// The live pool, shared with the snapshots before and after this one.
    pub pool: Arc<Pool>,
    /// Requests of this service answered by the proxy itself (no server was tried).
    pub unserved: Stats,
}

impl ServiceState {
    /// The state for `config`, reusing (and reconfiguring) `old`'s pool when there is one.
    fn new(config: nonstop_config::Service, old: Option<&ServiceState>) -> ServiceState {
        let pool = match old {
            Some(o) => {
                o.pool.reconfigure(&config);
                o.pool.clone()
            }
            None => Pool::new(&config, true),
        };
        let settings = ConnSettings {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.pool_idle_timeout,
            idle_max: config.pool_idle_max,
            h2: config.protocol == Protocol::H2,
        };
        ServiceState { name: config.name.clone(), settings, pool, unserved: Stats::default(), config }
    }

    pub fn servers(&self) -> Vec<Arc<Server>> {
        self.pool.servers()
    }

    pub fn find(&self, addr: SocketAddr) -> Option<Arc<Server>> {
        self.pool.find(addr)
    }
}

/// Why a config cannot be put to work.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot serve files from {}: {source}", root.display())]
    Files { root: std::path::PathBuf, source: std::io::Error },
    #[error("the route for {0:?} has neither a service nor files")]
    NoTarget(String),
}

impl Snapshot {
    /// Builds the snapshot for `config`, keeping the live servers of `old` where addresses stay. Fails only when a
    /// listener's certificate or key cannot be loaded, or a root of static files cannot be opened.
    pub fn build(config: Config, old: Option<&Snapshot>) -> Result<Snapshot, BuildError> {
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
        let mut routes: Vec<RouteEntry> = Vec::with_capacity(config.routes.len());
        for r in &config.routes {
            let target = match (&r.files, &r.service) {
                (Some(f), _) => Target::Files(Arc::new(
                    nonstop_files::Files::new(&f.root, f.index.clone(), f.precompressed, f.hidden)
                        .map_err(|source| BuildError::Files { root: f.root.clone(), source })?,
                )),
                (None, Some(name)) => Target::Service(services[name].clone()),
                (None, None) => return Err(BuildError::NoTarget(r.path_prefix.clone())),
            };
            routes.push(RouteEntry {
                host: r.host.clone(),
                path_prefix: r.path_prefix.clone(),
                methods: r.methods.as_ref().map(|ms| ms.iter().filter_map(|m| m.parse().ok()).collect()),
                body_bytes_max: r.body_bytes_max,
                target,
                queue: r.queue.clone(),
                access: r.access.clone(),
                rate_limit: r.rate_limit.as_ref().map(|l| RouteLimit {
                    limiter: nonstop_guard::Limiter::new(l.rate, l.keys_max),
                    key: l.key.clone(),
                }),
                rewrite: r.rewrite.clone(),
                compress: r.compress.as_ref().map(|c| RouteCompress {
                    settings: c.settings.clone(),
                    streams_max: c.streams_max,
                    streams: Arc::default(),
                }),
                basic_auth: r.basic_auth.as_ref().map(|b| RouteAuth {
                    users: Arc::new(b.users.clone()),
                    challenge: http::HeaderValue::from_str(&format!("Basic realm=\"{}\", charset=\"UTF-8\"", b.realm))
                        .unwrap_or_else(|_| http::HeaderValue::from_static("Basic realm=\"nonstop\"")),
                    verified: nonstop_guard::basic::Verified::new(b.verified_max),
                    verifying: tokio::sync::Semaphore::new(b.verifying_max),
                }),
                forward_auth: r.forward_auth.as_ref().map(|f| {
                    let service = services[&f.service].clone();
                    Box::new(RouteForwardAuth {
                        route: RouteEntry::bare(service.clone()),
                        service,
                        uri: f.path.parse().unwrap_or_else(|_| http::Uri::from_static("/")),
                        copy_headers: f
                            .copy_headers
                            .iter()
                            .filter_map(|n| http::HeaderName::from_bytes(n.as_bytes()).ok())
                            .collect(),
                    })
                }),
                request_headers: HeaderOps::new(&r.request_headers),
                response_headers: HeaderOps::new(&r.response_headers),
                wants_request_id: r.request_headers.uses(nonstop_rewrite::Var::RequestId)
                    || r.response_headers.uses(nonstop_rewrite::Var::RequestId),
                wants_client: r.request_headers.uses(nonstop_rewrite::Var::Client)
                    || r.response_headers.uses(nonstop_rewrite::Var::Client),
            });
        }
        // Host-specific routes first, then the longest prefix; the sort is stable, so file order breaks ties.
        routes.sort_by_key(|r| (r.host.is_none(), std::cmp::Reverse(r.path_prefix.len())));
        if let Some(old) = old {
            for (name, svc) in &old.services {
                if !services.contains_key(name) {
                    svc.servers().iter().for_each(|s| s.close_idle());
                }
            }
        }
        let hsts = config
            .listeners
            .iter()
            .map(|l| l.hsts.and_then(|h| http::HeaderValue::from_str(&h.value()).ok()))
            .collect();
        Ok(Snapshot { config, routes, services, tls, hsts })
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
            RouteMatch::Found(r) => match &r.target {
                Target::Service(s) => Some(s.name.clone()),
                Target::Files(_) => None,
            },
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
        a.set_draining(true, std::time::Duration::from_secs(60));
        let new = Snapshot::build(old.config.clone(), Some(&old)).unwrap();
        assert!(Arc::ptr_eq(&a, &new.services["a"].servers()[0]));
        assert!(new.services["a"].servers()[0].draining());
    }

    #[test]
    fn admin_pool_changes() {
        let s = snapshot("");
        let svc = &s.services["a"].pool;
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        svc.add_server(addr, 2, false, true).unwrap();
        assert!(matches!(svc.add_server(addr, 2, false, true), Err(PoolError::Exists(_))));
        svc.set_weight(addr, 0).unwrap();
        let tried = crate::admission::Tried::default();
        for _ in 0..10 {
            let crate::pool::Acquired::Now(lease) =
                svc.acquire(std::time::Instant::now(), None, &tried, std::time::Duration::from_secs(1), true)
            else {
                panic!("no lease")
            };
            assert_ne!(lease.server().addr, addr, "weight 0 takes no requests");
        }
        svc.remove_server(addr).unwrap();
        assert!(matches!(svc.remove_server(addr), Err(PoolError::Missing(_))));
    }
}
