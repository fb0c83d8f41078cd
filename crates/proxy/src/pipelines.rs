//! The proxy's side of pipelines: the deployers and listeners seen as [`nonstop_pipeline::Platform`], and the
//! thread whose runtime runs the pipelines' runs and schedules.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};

use nonstop_deploy::history::History;
use nonstop_deploy::{DeployError, DeployRequest, Deployer};

use crate::Shared;

pub struct ProxyPlatform {
    deployers: BTreeMap<String, Arc<Deployer>>,
    history: Option<Arc<History>>,
    /// The bound client listeners, and whether each serves TLS.
    listeners: Vec<(SocketAddr, bool)>,
    /// The routes of the current config, reached once the proxy's shared state exists.
    shared: OnceLock<Weak<Shared>>,
}

impl ProxyPlatform {
    pub fn new(
        deployers: BTreeMap<String, Arc<Deployer>>,
        history: Option<Arc<History>>,
        listeners: Vec<(SocketAddr, bool)>,
    ) -> ProxyPlatform {
        ProxyPlatform { deployers, history, listeners, shared: OnceLock::new() }
    }

    pub fn attach(&self, shared: &Arc<Shared>) {
        let _ = self.shared.set(Arc::downgrade(shared));
    }

    fn deployer(&self, service: &str) -> Result<&Arc<Deployer>, String> {
        self.deployers.get(service).ok_or_else(|| {
            let known: Vec<&str> = self.deployers.keys().map(String::as_str).collect();
            format!("no app service {service:?} (app services: {})", known.join(", "))
        })
    }
}

fn refused(e: DeployError) -> String {
    e.to_string()
}

impl nonstop_pipeline::Platform for ProxyPlatform {
    fn deploy(
        &self,
        service: &str,
        version: &str,
        env: Vec<(String, String)>,
        strategy: Option<nonstop_config::Strategy>,
    ) -> Result<tokio::sync::broadcast::Receiver<String>, String> {
        let d = self.deployer(service)?;
        d.deploy(DeployRequest { version: version.to_string(), strategy, steps: None, env }).map_err(refused)
    }

    fn rollback(&self, service: &str) -> Result<tokio::sync::broadcast::Receiver<String>, String> {
        self.deployer(service)?.rollback().map_err(refused)
    }

    fn version(&self, service: &str) -> Option<String> {
        let d = self.deployers.get(service)?;
        d.status()["version"].as_str().map(str::to_string)
    }

    fn service_url(&self, service: &str) -> Option<String> {
        let shared = self.shared.get()?.upgrade()?;
        let snap = shared.snapshot.load_full();
        let route = snap.config.routes.iter().find(|r| r.service.as_deref() == Some(service))?;
        let (addr, tls) = self.listeners.iter().find(|(_, tls)| !tls).or(self.listeners.first())?;
        let scheme = if *tls { "https" } else { "http" };
        let host = match addr.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        Some(format!("{scheme}://{host}:{}{}", addr.port(), route.path_prefix))
    }

    fn artifacts_in_use(&self) -> Vec<PathBuf> {
        let Some(h) = &self.history else { return Vec::new() };
        let mut out = Vec::new();
        for service in self.deployers.keys() {
            let versions = [h.current(service), h.previous(service)];
            for (_, env) in versions.into_iter().flatten() {
                out.extend(env.into_iter().filter(|(k, _)| k == "NONSTOP_ARTIFACT").map(|(_, v)| PathBuf::from(v)));
            }
        }
        out
    }
}
