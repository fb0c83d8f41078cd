//! The proxy's side of deploys: each app service's pool seen as [`nonstop_deploy::Traffic`], and the thread that
//! runs the deployers (instance supervisors and deploys).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use nonstop_config::{AppDriver, Config};
use nonstop_deploy::analysis::Sample;
use nonstop_deploy::docker::DockerDriver;
use nonstop_deploy::driver::{Driver, LocalDriver};
use nonstop_deploy::history::History;
use nonstop_deploy::{Change, Deployer, Traffic};
use nonstop_hosts::docker::RemoteDocker;
use nonstop_hosts::driver::SshDriver;

use crate::pool::Pool;
use crate::state::Snapshot;

struct PoolTraffic(Arc<Pool>);

impl Traffic for PoolTraffic {
    fn apply(&self, changes: Vec<Change>) {
        self.0.apply(changes);
    }

    fn in_flight(&self, addr: SocketAddr) -> u32 {
        self.0.find(addr).map_or(0, |s| s.in_flight())
    }

    fn sample(&self, addrs: &[SocketAddr]) -> Sample {
        self.0.sample(addrs)
    }

    fn exited(&self, addr: SocketAddr) {
        self.0.mark_down(addr);
    }

    fn healthy(&self, addr: SocketAddr) -> Option<bool> {
        self.0.healthy(addr)
    }
}

/// The deployers of every app service, and the runtime they run on.
pub struct Apps {
    pub deployers: BTreeMap<String, Arc<Deployer>>,
    pub history: Option<Arc<History>>,
}

impl Apps {
    /// Creates a deployer per app service of `config`, on `rt`; nothing starts until [`Apps::boot`].
    pub fn new(config: &Config, snapshot: &Snapshot, rt: tokio::runtime::Handle) -> Result<Apps, crate::StartError> {
        let apps: Vec<_> = config.services.values().filter(|s| s.app.is_some()).collect();
        if apps.is_empty() {
            return Ok(Apps { deployers: BTreeMap::new(), history: None });
        }
        let history = Arc::new(History::open(&config.state_dir).map_err(crate::StartError::State)?);
        let mut deployers = BTreeMap::new();
        for svc in apps {
            let pool = snapshot.services[&svc.name].pool.clone();
            let app = svc.app.clone().expect("an app service");
            let driver: Arc<dyn Driver> = match &app.driver {
                AppDriver::Process => Arc::new(LocalDriver),
                AppDriver::Docker(d) if d.hosts.is_empty() => Arc::new(DockerDriver::new(&svc.name, &config.state_dir)),
                AppDriver::Docker(d) => Arc::new(
                    RemoteDocker::new(&svc.name, d, &config.hosts, &config.state_dir)
                        .map_err(|e| crate::StartError::Hosts(e.to_string()))?,
                ),
                AppDriver::Ssh(ssh) => Arc::new(
                    SshDriver::new(&svc.name, ssh, &config.hosts, &config.state_dir)
                        .map_err(|e| crate::StartError::Hosts(e.to_string()))?,
                ),
            };
            let d = Deployer::new(
                &svc.name,
                app,
                Arc::new(PoolTraffic(pool)),
                driver,
                history.clone(),
                config.state_dir.join("logs"),
                rt.clone(),
            );
            deployers.insert(svc.name.clone(), d);
        }
        Ok(Apps { deployers, history: Some(history) })
    }

    pub fn boot(&self) {
        self.deployers.values().for_each(|d| d.boot());
    }

    /// A reload: the app sections apply to instances started from now on.
    pub fn reconfigure(&self, config: &Config) {
        for (name, d) in &self.deployers {
            if let Some(app) = config.services.get(name).and_then(|s| s.app.as_ref()) {
                d.reconfigure(app);
            }
        }
    }

    /// The names of the app services of a config, each with its driver (a reload may not change them).
    pub fn names(config: &Config) -> Vec<String> {
        config
            .services
            .values()
            .filter_map(|s| {
                let app = s.app.as_ref()?;
                Some(match &app.driver {
                    // The hosts, and where they are, are the driver's for its life.
                    AppDriver::Ssh(nonstop_config::SshApp { hosts, .. })
                    | AppDriver::Docker(nonstop_config::DockerApp { hosts, .. })
                        if !hosts.is_empty() =>
                    {
                        let at: Vec<String> = hosts
                            .iter()
                            .map(|h| match config.hosts.get(h) {
                                Some(h) => format!("{}={}@{}:{}", h.name, h.user, h.host, h.port),
                                None => h.clone(),
                            })
                            .collect();
                        format!("{} ({} on {})", s.name, app.driver.as_str(), at.join(", "))
                    }
                    d => format!("{} ({})", s.name, d.as_str()),
                })
            })
            .collect()
    }
}
