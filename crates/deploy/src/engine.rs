//! The deployer of one service: it supervises the instances (restarting crashed ones with back-off) and runs one
//! deploy at a time, streaming its progress as JSON lines to every client that follows it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nonstop_config::{App, AppDriver, DockerApp, Strategy};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{broadcast, watch};

use crate::analysis::{self, Sample, Thresholds, Verdict};
use crate::driver::{Driver, Launch, LogRef, Place};
use crate::history::{History, Record};
use crate::logfile;
use crate::restart::Backoff;
use crate::{plan, Change, Role, Traffic};

/// How often the supervisor looks at the size of a running instance's log.
const LOG_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long fetching the tail of an instance's log for a message may take.
const TAIL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a running deploy looks at the new version's counters and processes.
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// Progress lines kept for `nonstop status`.
const EVENTS_KEPT_MAX: usize = 200;
/// Progress lines a slow follower may lag behind before it misses some.
const EVENTS_BUFFER: usize = 4096;
/// A readiness probe's own timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("a {kind} of service {service:?} to {version} is already running (for {secs:.1} s); one runs at a time")]
    Busy { kind: &'static str, service: String, version: String, secs: f64 },
    #[error("service {0:?} already runs version {1}")]
    SameVersion(String, String),
    #[error("{0}")]
    Invalid(String),
    #[error("service {0:?} has no previous version to roll back to")]
    NoPrevious(String),
    #[error("{0}")]
    RollbackTo(crate::history::RollbackToError),
    #[error("the proxy is shutting down")]
    ShuttingDown,
}

/// What a client asks for.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    pub version: String,
    /// `None`: the service's configured strategy.
    pub strategy: Option<Strategy>,
    /// Canary steps; `None`: the configured ones.
    pub steps: Option<Vec<u32>>,
    /// Environment variables for the new version's instances (on top of the app's env).
    pub env: Vec<(String, String)>,
}

/// One instance of the app.
pub struct Instance {
    pub id: u64,
    pub version: String,
    pub addr: SocketAddr,
    /// The `[hosts.NAME]` it runs on; `None`: this machine.
    pub host: Option<String>,
    env: Vec<(String, String)>,
    /// Its role: starting, serving, trial, standby, draining, stopping, stopped.
    state: Mutex<&'static str>,
    pid: Arc<AtomicU32>,
    /// The container it runs in, for a driver that runs containers.
    container: Mutex<Option<String>>,
    alive: AtomicBool,
    restarts: AtomicU32,
    /// Counts exits that were not asked for.
    crashes: watch::Sender<u32>,
    last_exit: Mutex<Option<String>>,
    /// Restart it when it crashes (a deploy's new instances are not supervised until the deploy succeeds: their
    /// crash fails the deploy).
    supervised: AtomicBool,
    stop: watch::Sender<bool>,
    /// True once its process is gone for good.
    done: watch::Sender<bool>,
}

impl Instance {
    /// "instance 4" or "instance 4 on web2", for messages.
    fn named(&self) -> String {
        match &self.host {
            Some(h) => format!("instance {} on host {h}", self.id),
            None => format!("instance {}", self.id),
        }
    }

    fn set_state(&self, s: &'static str) {
        *self.state.lock().expect("instance lock") = s;
    }

    fn state(&self) -> &'static str {
        *self.state.lock().expect("instance lock")
    }

    fn crashed(&self) -> Option<String> {
        (*self.crashes.borrow() > 0).then(|| self.last_exit.lock().expect("instance lock").clone().unwrap_or_default())
    }
}

struct Running {
    kind: &'static str,
    version: String,
    strategy: Strategy,
    started: Instant,
    events: Events,
    abort: watch::Sender<Option<String>>,
}

struct State {
    version: String,
    env: Vec<(String, String)>,
    instances: Vec<Arc<Instance>>,
    running: Option<Running>,
}

/// A deploy's progress: JSON lines, broadcast to every follower and kept for `nonstop status`.
#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<String>,
    started: Instant,
    kept: Arc<Mutex<Vec<String>>>,
}

impl Events {
    fn new() -> Events {
        Events { tx: broadcast::channel(EVENTS_BUFFER).0, started: Instant::now(), kept: Arc::default() }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.tx.subscribe()
    }

    /// The lines so far.
    pub fn so_far(&self) -> Vec<String> {
        self.kept.lock().expect("events lock").clone()
    }

    /// The lines so far and a receiver of every later one: none missed, none twice (lines are kept and sent under
    /// one lock).
    fn so_far_and_subscribe(&self) -> (Vec<String>, broadcast::Receiver<String>) {
        let kept = self.kept.lock().expect("events lock");
        (kept.clone(), self.tx.subscribe())
    }

    fn send(&self, step: &str, message: String) {
        self.send_value(json!({ "step": step, "message": message }));
    }

    fn send_value(&self, mut v: Value) {
        v["at_ms"] = json!(self.started.elapsed().as_millis() as u64);
        tracing::info!(event = %v, "deploy");
        let line = v.to_string();
        let mut kept = self.kept.lock().expect("events lock");
        if kept.len() >= EVENTS_KEPT_MAX {
            kept.remove(1);
        }
        kept.push(line.clone());
        let _ = self.tx.send(line);
    }
}

/// A deploy in progress: the instances it started, the old ones it moved out of service, and its baseline.
struct Ctx {
    id: u64,
    kind: &'static str,
    version: String,
    from_version: String,
    strategy: Strategy,
    env: Vec<(String, String)>,
    spec: App,
    steps: Vec<u32>,
    events: Events,
    abort: watch::Receiver<Option<String>>,
    old: Vec<Arc<Instance>>,
    /// Old instances drained and kept warm.
    standby: Vec<Arc<Instance>>,
    new: Vec<Arc<Instance>>,
    /// New instances taking traffic.
    in_service: Vec<Arc<Instance>>,
    baseline: Sample,
    started_ms: u64,
    /// The new instance that failed the deploy (exited, or not ready): its log's tail goes into the reason.
    culprit: Mutex<Option<Arc<Instance>>>,
}

pub struct Deployer {
    pub service: String,
    traffic: Arc<dyn Traffic>,
    driver: Arc<dyn Driver>,
    history: Arc<History>,
    log_dir: PathBuf,
    rt: tokio::runtime::Handle,
    spec: Mutex<App>,
    state: Mutex<State>,
    stopping: AtomicBool,
    /// The driver's places, fixed for the deployer's life.
    places: Vec<Place>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn addrs(list: &[Arc<Instance>]) -> Vec<SocketAddr> {
    list.iter().map(|i| i.addr).collect()
}

/// The containers of these instances (none for the process driver).
fn containers(list: &[Arc<Instance>]) -> Vec<String> {
    list.iter().filter_map(|i| i.container.lock().expect("instance lock").clone()).collect()
}

impl Deployer {
    /// A deployer for `service`, whose tasks run on `rt`. It starts nothing until [`Deployer::boot`].
    pub fn new(
        service: &str,
        spec: App,
        traffic: Arc<dyn Traffic>,
        driver: Arc<dyn Driver>,
        history: Arc<History>,
        log_dir: PathBuf,
        rt: tokio::runtime::Handle,
    ) -> Arc<Deployer> {
        let (version, env) = history.current(service).unwrap_or_else(|| (spec.version.clone(), Vec::new()));
        Arc::new(Deployer {
            service: service.to_string(),
            traffic,
            history,
            log_dir,
            rt,
            spec: Mutex::new(spec),
            state: Mutex::new(State { version, env, instances: Vec::new(), running: None }),
            stopping: AtomicBool::new(false),
            places: driver.places(),
            driver,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("deployer lock")
    }

    fn spec(&self) -> App {
        self.spec.lock().expect("spec lock").clone()
    }

    /// Instances that serve at once: `count` on each of the driver's places.
    fn total(&self, spec: &App) -> u32 {
        spec.count.saturating_mul(self.places.len().max(1) as u32)
    }

    /// Applies a reloaded app section; it takes effect with the next instance started.
    pub fn reconfigure(&self, spec: &App) {
        *self.spec.lock().expect("spec lock") = spec.clone();
    }

    /// Starts the service's instances at its current version; each joins the pool once ready.
    pub fn boot(self: &Arc<Self>) {
        let spec = self.spec();
        let (version, env) = {
            let g = self.lock();
            (g.version.clone(), g.env.clone())
        };
        tracing::info!(service = %self.service, %version, count = self.total(&spec), "starting instances");
        for _ in 0..self.total(&spec) {
            let inst = match self.start_instance(&spec, &version, &env, true) {
                Ok(i) => i,
                Err(e) => {
                    tracing::error!(service = %self.service, error = %e, "cannot start an instance");
                    continue;
                }
            };
            let (me, spec) = (self.clone(), spec.clone());
            self.rt.spawn(async move {
                // Wait (as long as it takes: a crash restarts it) until it is ready, then put it in service.
                let mut passes = 0;
                loop {
                    if *inst.done.borrow() {
                        return;
                    }
                    let ok = inst.alive.load(Relaxed) && probe(inst.addr, &spec.health_path).await.is_ok_and(ok_status);
                    passes = if ok { passes + 1 } else { 0 };
                    if passes >= spec.ready_passes {
                        break;
                    }
                    tokio::time::sleep(spec.ready_interval).await;
                }
                me.traffic.apply(vec![Change::Add { addr: inst.addr, warm: true, role: Role::Serving }]);
                inst.set_state("serving");
                tracing::info!(service = %me.service, instance = inst.id, addr = %inst.addr, "instance ready: in service");
            });
        }
    }

    /// Starts one instance (its supervisor task) on a free port of the range.
    fn start_instance(
        self: &Arc<Self>,
        spec: &App,
        version: &str,
        env: &[(String, String)],
        supervised: bool,
    ) -> Result<Arc<Instance>, String> {
        let (addr, host) = {
            let g = self.lock();
            let placed: Vec<plan::Placed> = g
                .instances
                .iter()
                .map(|i| plan::Placed {
                    place: self.places.iter().position(|p| p.host == i.host).unwrap_or(0),
                    same_version: i.version == version,
                    active: matches!(i.state(), "starting" | "serving" | "trial"),
                })
                .collect();
            let place = self.places.get(plan::place(self.places.len(), &placed)).cloned().unwrap_or_else(Place::local);
            let used: Vec<u16> = g.instances.iter().filter(|i| i.host == place.host).map(|i| i.addr.port()).collect();
            let addr = (spec.ports.0..=spec.ports.1)
                .filter(|p| !used.contains(p))
                .map(|p| SocketAddr::new(place.ip, p))
                // On this machine a port someone else holds is skipped; a host's ports are its own business.
                .find(|a| place.host.is_some() || std::net::TcpListener::bind(a).is_ok())
                .ok_or_else(|| {
                    let on = place.host.as_ref().map_or(String::new(), |h| format!(" on host {h}"));
                    format!("no free port left in {}-{}{on}", spec.ports.0, spec.ports.1)
                })?;
            (addr, place.host)
        };
        let inst = Arc::new(Instance {
            id: self.history.next_instance(&self.service),
            version: version.to_string(),
            addr,
            host,
            env: env.to_vec(),
            state: Mutex::new("starting"),
            pid: Arc::new(AtomicU32::new(0)),
            container: Mutex::new(None),
            alive: AtomicBool::new(false),
            restarts: AtomicU32::new(0),
            crashes: watch::channel(0).0,
            last_exit: Mutex::new(None),
            supervised: AtomicBool::new(supervised),
            stop: watch::channel(false).0,
            done: watch::channel(false).0,
        });
        self.lock().instances.push(inst.clone());
        self.rt.spawn(self.clone().supervise(inst.clone()));
        Ok(inst)
    }

    fn launch(&self, spec: &App, inst: &Instance) -> Launch {
        // {nonstop}: this binary, for the process driver (an SSH host or a container has its own path to it).
        let exe = match spec.driver {
            AppDriver::Process => std::env::current_exe().ok().map(|p| p.display().to_string()),
            _ => None,
        };
        let fill = |s: &str| {
            let s = match &exe {
                Some(exe) => s.replace("{nonstop}", exe),
                None => s.to_string(),
            };
            s.replace("{addr}", &inst.addr.to_string())
                .replace("{host}", &inst.addr.ip().to_string())
                .replace("{port}", &inst.addr.port().to_string())
                .replace("{version}", &inst.version)
                .replace("{instance}", &format!("{}-{}", self.service, inst.id))
        };
        let container = match &spec.driver {
            AppDriver::Process | AppDriver::Ssh(_) => None,
            AppDriver::Docker(d) => Some(DockerApp {
                image: d.image.replace("{version}", &inst.version),
                args: d.args.iter().map(|a| fill(a)).collect(),
                ..d.clone()
            }),
        };
        // Inside a container the app listens on the container port; the instance's port is the host's side.
        let port = container.as_ref().map_or(inst.addr.port(), |c| c.container_port);
        let mut env: Vec<(String, String)> = vec![
            ("PORT".into(), port.to_string()),
            ("NONSTOP_VERSION".into(), inst.version.clone()),
            ("NONSTOP_INSTANCE".into(), format!("{}-{}", self.service, inst.id)),
        ];
        env.extend(spec.env.iter().chain(&inst.env).map(|(k, v)| (k.clone(), fill(v))));
        Launch {
            command: match &exe {
                Some(exe) => fill(&spec.command.replace("{nonstop}", &shell_quote(exe))),
                None => fill(&spec.command),
            },
            env,
            dir: spec.dir.clone(),
            log: Some(self.log_path(inst.id)),
            service: self.service.clone(),
            version: inst.version.clone(),
            instance: inst.id,
            addr: inst.addr,
            stop_grace: spec.stop_grace,
            container,
            host: inst.host.clone(),
            pid: inst.pid.clone(),
        }
    }

    /// Runs one instance's process until it is asked to stop; restarts it with back-off when it crashes while
    /// supervised.
    async fn supervise(self: Arc<Self>, inst: Arc<Instance>) {
        let mut stop = inst.stop.subscribe();
        let spec = self.spec();
        let mut backoff = Backoff::new(spec.restart_backoff_base, spec.restart_backoff_max);
        let _ = std::fs::create_dir_all(&self.log_dir);
        let log = self.log_path(inst.id);
        loop {
            let started = Instant::now();
            let spec = self.spec();
            // Nothing writes to the log now: an oversized one is renamed away.
            if let Err(e) = logfile::rotate(&log, spec.log_bytes_max, spec.log_files_max) {
                tracing::warn!(service = %self.service, instance = inst.id, path = %log.display(), error = %e, "cannot rotate the instance log");
            }
            let exit = match self.driver.start(&self.launch(&spec, &inst)) {
                Err(e) => e.to_string(),
                Ok(mut proc) => {
                    if proc.id() != 0 {
                        inst.pid.store(proc.id(), Relaxed);
                    }
                    *inst.container.lock().expect("instance lock") = proc.container();
                    inst.alive.store(true, Relaxed);
                    tracing::info!(service = %self.service, instance = inst.id, version = %inst.version, addr = %inst.addr, pid = proc.id(), "instance started");
                    let outcome = {
                        let mut wait = proc.wait();
                        let first = tokio::time::Instant::now() + LOG_CHECK_EVERY;
                        let mut tick = tokio::time::interval_at(first, LOG_CHECK_EVERY);
                        loop {
                            tokio::select! {
                                how = &mut wait => break Err(how),
                                _ = stop.wait_for(|s| *s) => break Ok(()),
                                _ = tick.tick() => {
                                    // The instance appends to its log: copied away, then truncated.
                                    if let Err(e) = logfile::copy_truncate(&log, spec.log_bytes_max, spec.log_files_max) {
                                        tracing::warn!(service = %self.service, instance = inst.id, path = %log.display(), error = %e, "cannot rotate the instance log");
                                    }
                                }
                            }
                        }
                    };
                    match outcome {
                        Ok(()) => {
                            proc.terminate();
                            let how = match tokio::time::timeout(spec.stop_grace, proc.wait()).await {
                                Ok(how) => how,
                                Err(_) => {
                                    tracing::warn!(service = %self.service, instance = inst.id, "no exit after the grace period: SIGKILL");
                                    proc.kill();
                                    proc.wait().await
                                }
                            };
                            inst.alive.store(false, Relaxed);
                            tracing::info!(service = %self.service, instance = inst.id, %how, "instance stopped");
                            inst.set_state("stopped");
                            inst.done.send_replace(true);
                            return;
                        }
                        Err(how) => how,
                    }
                }
            };
            inst.alive.store(false, Relaxed);
            *inst.last_exit.lock().expect("instance lock") = Some(exit.clone());
            inst.crashes.send_modify(|n| *n += 1);
            self.traffic.exited(inst.addr);
            let supervised = inst.supervised.load(Relaxed) && !self.stopping.load(Relaxed) && !*stop.borrow();
            tracing::warn!(service = %self.service, instance = inst.id, addr = %inst.addr, %exit, supervised, "instance exited");
            if inst.state() == "starting" {
                // The usual first-hour failure (a command not found, a port taken, a bad flag): say it where the
                // operator looks, with the cause from the log.
                tracing::warn!(
                    "{} of service {} ({}) exited before it was ever ready: {exit}{}",
                    inst.named(),
                    self.service,
                    inst.version,
                    self.log_tail(&inst).await
                );
            }
            if !supervised {
                inst.set_state("stopped");
                inst.done.send_replace(true);
                return;
            }
            let delay = backoff.on_exit(started, Instant::now());
            inst.restarts.fetch_add(1, Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.wait_for(|s| *s) => {
                    inst.set_state("stopped");
                    inst.done.send_replace(true);
                    return;
                }
            }
        }
    }

    fn log_path(&self, id: u64) -> PathBuf {
        self.log_dir.join(format!("{}-{id}.log", self.service))
    }

    /// "; the last lines of its log PATH:" and those lines (bounded), for a message; empty when there are none.
    async fn log_tail(&self, inst: &Instance) -> String {
        let r = LogRef {
            service: self.service.clone(),
            instance: inst.id,
            host: inst.host.clone(),
            local: self.log_path(inst.id),
        };
        let where_ = match &inst.host {
            Some(h) => format!("on host {h} (nonstop logs --instance {})", inst.id),
            None => r.local.display().to_string(),
        };
        match tokio::time::timeout(TAIL_TIMEOUT, self.driver.logs(&r, logfile::TAIL_BYTES)).await {
            Ok(Ok(bytes)) if !bytes.iter().all(|b| b.is_ascii_whitespace()) => {
                let cut = bytes.len() as u64 >= logfile::TAIL_BYTES;
                format!("; the last lines of its log {where_}:\n{}", logfile::tail_lines(&bytes, cut).trim_end())
            }
            Ok(Ok(_)) => format!("; its log {where_} is empty"),
            Ok(Err(e)) => format!("; no log: {e}"),
            Err(_) => String::new(),
        }
    }

    /// Stops instances (SIGTERM, then SIGKILL after the grace period) and waits until they are gone.
    async fn stop_instances(&self, list: &[Arc<Instance>]) {
        for i in list {
            i.set_state("stopping");
            i.supervised.store(false, Relaxed);
            i.stop.send_replace(true);
        }
        for i in list {
            let mut done = i.done.subscribe();
            let _ = done.wait_for(|d| *d).await;
        }
        let mut g = self.lock();
        g.instances.retain(|i| !list.iter().any(|s| Arc::ptr_eq(s, i)));
    }

    /// Stops every instance (the proxy is shutting down).
    pub async fn shutdown(&self) {
        self.stopping.store(true, Relaxed);
        let (all, running) = {
            let g = self.lock();
            (g.instances.clone(), g.running.as_ref().map(|r| r.abort.clone()))
        };
        if let Some(abort) = running {
            abort.send_replace(Some("the proxy is shutting down".into()));
        }
        self.stop_instances(&all).await;
        let version = self.lock().version.clone();
        self.driver.retired(&version, containers(&all), None).await;
        self.driver.shutdown().await;
    }

    /// Starts a deploy; its progress follows on the returned receiver.
    pub fn deploy(self: &Arc<Self>, req: DeployRequest) -> Result<broadcast::Receiver<String>, DeployError> {
        self.begin(req, "deploy")
    }

    /// Follows the deploy or rollback that is running: its progress so far, then the rest on the receiver. `None`
    /// when none is running.
    pub fn follow(&self) -> Option<(Vec<String>, broadcast::Receiver<String>)> {
        let g = self.lock();
        g.running.as_ref().map(|r| r.events.so_far_and_subscribe())
    }

    /// Rolls back: a running deploy is aborted (traffic returns to the old instances, still warm); otherwise the
    /// previous version is deployed again.
    pub fn rollback(self: &Arc<Self>) -> Result<broadcast::Receiver<String>, DeployError> {
        {
            let g = self.lock();
            if let Some(r) = &g.running {
                if r.kind == "deploy" {
                    let rx = r.events.subscribe();
                    r.abort.send_replace(Some("rollback requested".into()));
                    return Ok(rx);
                }
            }
        }
        let (version, env) =
            self.history.previous(&self.service).ok_or_else(|| DeployError::NoPrevious(self.service.clone()))?;
        self.begin(DeployRequest { version, strategy: None, steps: None, env }, "rollback")
    }

    /// Rolls back to an earlier version the service ran successfully, with the env it ran with then.
    pub fn rollback_to(self: &Arc<Self>, version: &str) -> Result<broadcast::Receiver<String>, DeployError> {
        let (version, env) =
            self.history.version_to_roll_back_to(&self.service, version).map_err(DeployError::RollbackTo)?;
        self.begin(DeployRequest { version, strategy: None, steps: None, env }, "rollback")
    }

    fn begin(
        self: &Arc<Self>,
        req: DeployRequest,
        kind: &'static str,
    ) -> Result<broadcast::Receiver<String>, DeployError> {
        if self.stopping.load(Relaxed) {
            return Err(DeployError::ShuttingDown);
        }
        nonstop_config::check_version(&req.version).map_err(DeployError::Invalid)?;
        let spec = self.spec();
        let steps = req.steps.clone().unwrap_or_else(|| spec.canary_steps.clone());
        nonstop_config::check_canary_steps(&steps).map_err(|e| DeployError::Invalid(format!("canary steps {e}")))?;
        for (k, _) in &req.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(DeployError::Invalid(format!("{k:?} is not an environment variable name")));
            }
        }
        let strategy = req.strategy.unwrap_or(spec.strategy);
        let mut g = self.lock();
        if let Some(r) = &g.running {
            return Err(DeployError::Busy {
                kind: r.kind,
                service: self.service.clone(),
                version: r.version.clone(),
                secs: r.started.elapsed().as_secs_f64(),
            });
        }
        if g.version == req.version && g.env == req.env {
            return Err(DeployError::SameVersion(self.service.clone(), req.version));
        }
        let events = Events::new();
        let rx = events.subscribe();
        let (abort_tx, abort) = watch::channel(None);
        g.running = Some(Running {
            kind,
            version: req.version.clone(),
            strategy,
            started: Instant::now(),
            events: events.clone(),
            abort: abort_tx,
        });
        let old: Vec<Arc<Instance>> = g.instances.iter().filter(|i| i.state() == "serving").cloned().collect();
        let baseline = self.traffic.sample(&addrs(&old));
        let ctx = Ctx {
            id: self.history.next_id(),
            kind,
            version: req.version,
            from_version: g.version.clone(),
            strategy,
            env: req.env,
            spec,
            steps,
            events,
            abort,
            old,
            standby: Vec::new(),
            new: Vec::new(),
            in_service: Vec::new(),
            baseline,
            started_ms: now_ms(),
            culprit: Mutex::new(None),
        };
        drop(g);
        self.rt.spawn(self.clone().run(ctx));
        Ok(rx)
    }

    async fn run(self: Arc<Self>, mut ctx: Ctx) {
        ctx.events.send_value(json!({
            "step": "start",
            "message": format!("{} of {} from {} to {} ({}, {} old instances)", ctx.kind, self.service, ctx.from_version, ctx.version, ctx.strategy.as_str(), ctx.old.len()),
            "service": self.service, "version": ctx.version, "from_version": ctx.from_version, "strategy": ctx.strategy.as_str(),
        }));
        let mut result = self.prepare(&ctx).await;
        if result.is_ok() {
            result = match ctx.strategy {
                Strategy::Rolling => self.rolling(&mut ctx).await,
                Strategy::BlueGreen => self.blue_green(&mut ctx).await,
                Strategy::Canary => self.canary(&mut ctx).await,
            };
        }
        if result.is_ok() {
            result = self.soak(&mut ctx).await;
        }
        let (outcome, reason) = match result {
            Ok(()) => {
                self.commit(&mut ctx).await;
                ("succeeded", None)
            }
            Err(mut reason) => {
                let culprit = ctx.culprit.lock().expect("culprit lock").take();
                if let Some(i) = culprit {
                    reason.push_str(&self.log_tail(&i).await);
                }
                ctx.events.send("failed", reason.clone());
                self.roll_back(&mut ctx).await;
                ("rolled_back", Some(reason))
            }
        };
        let record = Record {
            id: ctx.id,
            service: self.service.clone(),
            kind: ctx.kind.to_string(),
            version: ctx.version.clone(),
            from_version: ctx.from_version.clone(),
            strategy: ctx.strategy.as_str().to_string(),
            started_ms: ctx.started_ms,
            ended_ms: now_ms(),
            result: outcome.to_string(),
            reason: reason.clone(),
            env: ctx.env.clone(),
        };
        if let Err(e) = self.history.append(&record) {
            tracing::error!(error = %e, "deploy history not written");
        }
        let serving = if outcome == "succeeded" { &ctx.version } else { &ctx.from_version };
        ctx.events.send_value(json!({
            "step": "done", "done": true, "result": outcome, "reason": reason, "version": serving,
            "message": match &reason {
                None => format!("{} now serves {}", self.service, ctx.version),
                Some(r) => format!("rolled back to {}: {r}", ctx.from_version),
            },
        }));
        self.lock().running = None;
    }

    /// Whether the deploy must stop: aborted, a new instance crashed, or the new version is worse than the old.
    fn check(&self, ctx: &Ctx) -> Result<(), String> {
        if let Some(why) = ctx.abort.borrow().clone() {
            return Err(why);
        }
        for i in &ctx.new {
            if let Some(how) = i.crashed() {
                *ctx.culprit.lock().expect("culprit lock") = Some(i.clone());
                return Err(format!("{} ({}, {}) exited: {how}", i.named(), i.addr, i.version));
            }
        }
        if ctx.in_service.is_empty() {
            return Ok(());
        }
        let new = self.traffic.sample(&addrs(&ctx.in_service));
        let old_now = self.traffic.sample(&addrs(&ctx.old));
        let mut old = old_now.since(&ctx.baseline);
        if old.requests < u64::from(ctx.spec.analysis_requests_min) {
            old = old_now;
        }
        match analysis::judge(&old, &new, &Thresholds::of(&ctx.spec)) {
            Verdict::Fail(why) => Err(format!("the new version is worse: {why}")),
            Verdict::Wait | Verdict::Pass => Ok(()),
        }
    }

    /// Checks the deploy for `d`.
    async fn watch(&self, ctx: &Ctx, d: Duration) -> Result<(), String> {
        let until = Instant::now() + d;
        loop {
            self.check(ctx)?;
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            tokio::time::sleep(left.min(CHECK_EVERY)).await;
        }
    }

    /// Makes the new version ready on every place at once (the release shipped to each host), before any of its
    /// instances starts; a place that fails fails the deploy.
    async fn prepare(&self, ctx: &Ctx) -> Result<(), String> {
        let prepared = tokio::select! {
            p = self.driver.prepare(&ctx.version) => p,
            _ = async { let mut a = ctx.abort.clone(); let _ = a.wait_for(|a| a.is_some()).await; } => {
                return Err(ctx.abort.borrow().clone().unwrap_or_default());
            }
        };
        let mut failed = Vec::new();
        for p in prepared {
            let on = p.host.clone().unwrap_or_else(|| "this machine".into());
            match &p.result {
                Ok(Some(bytes)) => ctx.events.send_value(json!({
                    "step": "shipped", "host": p.host, "ms": p.ms, "bytes": bytes,
                    "message": format!("{} of {} shipped to {on} in {} ms ({:.1} MB, {})", p.what, ctx.version, p.ms, *bytes as f64 / 1e6, if p.what == "image" { "image ID checked" } else { "SHA-256 checked" }),
                })),
                Ok(None) => ctx.events.send_value(json!({
                    "step": "shipped", "host": p.host, "ms": p.ms, "bytes": 0,
                    "message": format!("{} of {} already on {on} ({} ms)", p.what, ctx.version, p.ms),
                })),
                Err(e) => failed.push(e.clone()),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    /// Starts `n` instances of the new version.
    fn start_new(self: &Arc<Self>, ctx: &mut Ctx, n: u32) -> Result<Vec<Arc<Instance>>, String> {
        let mut out = Vec::new();
        for _ in 0..n {
            let i = self.start_instance(&ctx.spec, &ctx.version, &ctx.env, false)?;
            ctx.events.send_value(json!({
                "step": "started", "instance": i.id, "addr": i.addr.to_string(), "version": i.version, "host": i.host,
                "message": match &i.host {
                    Some(h) => format!("instance {} of {} started on {h} ({})", i.id, i.version, i.addr),
                    None => format!("instance {} of {} started on {}", i.id, i.version, i.addr),
                },
            }));
            ctx.new.push(i.clone());
            out.push(i);
        }
        Ok(out)
    }

    /// Waits until every instance answered its health path ready_passes times in a row; fails at once when one
    /// exits, and after ready_timeout.
    async fn await_ready(&self, ctx: &Ctx, list: &[Arc<Instance>]) -> Result<(), String> {
        let spec = &ctx.spec;
        let deadline = Instant::now() + spec.ready_timeout;
        let mut passes = vec![0u32; list.len()];
        let mut last = vec![String::from("no answer yet"); list.len()];
        loop {
            self.check(ctx)?;
            for (k, i) in list.iter().enumerate() {
                if passes[k] >= spec.ready_passes {
                    continue;
                }
                let answer = if i.alive.load(Relaxed) {
                    probe(i.addr, &spec.health_path).await
                } else {
                    Err("not running yet".into())
                };
                let ok = answer.as_ref().is_ok_and(|s| ok_status(*s));
                last[k] = match answer {
                    Ok(s) => format!("status {s}"),
                    Err(e) => e,
                };
                passes[k] = if ok { passes[k] + 1 } else { 0 };
                if passes[k] == spec.ready_passes {
                    ctx.events.send_value(json!({
                        "step": "ready", "instance": i.id, "addr": i.addr.to_string(),
                        "host": i.host,
                        "message": format!("{} is ready ({} health checks passed)", i.named(), spec.ready_passes),
                    }));
                }
            }
            if passes.iter().all(|&p| p >= spec.ready_passes) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let k = passes.iter().position(|&p| p < spec.ready_passes).expect("one is not ready");
                *ctx.culprit.lock().expect("culprit lock") = Some(list[k].clone());
                return Err(format!(
                    "{} ({}) not ready after {} ms: GET {} gave {}",
                    list[k].named(),
                    list[k].addr,
                    spec.ready_timeout.as_millis(),
                    spec.health_path,
                    last[k]
                ));
            }
            tokio::time::sleep(spec.ready_interval).await;
        }
    }

    /// Puts ready new instances in service, on trial.
    fn cut_over(&self, ctx: &mut Ctx, list: &[Arc<Instance>], warm: bool, mut extra: Vec<Change>) {
        let mut changes: Vec<Change> =
            list.iter().map(|i| Change::Add { addr: i.addr, warm, role: Role::Trial }).collect();
        changes.append(&mut extra);
        self.traffic.apply(changes);
        for i in list {
            i.set_state("trial");
            ctx.in_service.push(i.clone());
            ctx.events.send_value(json!({
                "step": "in_service", "instance": i.id, "addr": i.addr.to_string(),
                "host": i.host,
                "message": format!("{} takes traffic{}", i.named(), if warm { "" } else { " (slow start)" }),
            }));
        }
    }

    /// Drains old instances and keeps them warm; waits (bounded) until their in-flight requests are done.
    async fn standby(&self, ctx: &mut Ctx, list: Vec<Arc<Instance>>) -> Result<(), String> {
        if list.is_empty() {
            return Ok(());
        }
        self.traffic.apply(list.iter().map(|i| Change::Role { addr: i.addr, role: Role::Standby }).collect());
        for i in &list {
            i.set_state("standby");
        }
        ctx.standby.extend(list.iter().cloned());
        let until = Instant::now() + ctx.spec.drain_timeout;
        loop {
            let busy: u32 = list.iter().map(|i| self.traffic.in_flight(i.addr)).sum();
            if busy == 0 || Instant::now() >= until {
                for i in &list {
                    ctx.events.send_value(json!({
                        "step": "drained", "instance": i.id, "addr": i.addr.to_string(),
                        "host": i.host,
                        "message": format!("old {} drained{} (kept warm until the soak passes)", i.named(), if busy > 0 { ", drain timeout" } else { "" }),
                    }));
                }
                return Ok(());
            }
            self.check(ctx)?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn rolling(self: &Arc<Self>, ctx: &mut Ctx) -> Result<(), String> {
        let mut old_left: Vec<Arc<Instance>> = ctx.old.clone();
        for w in plan::rolling_waves(self.total(&ctx.spec), ctx.spec.max_surge, ctx.spec.max_unavailable) {
            let first: Vec<_> = old_left.drain(..(w.drain_first as usize).min(old_left.len())).collect();
            self.standby(ctx, first).await?;
            let news = self.start_new(ctx, w.start)?;
            self.await_ready(ctx, &news).await?;
            self.cut_over(ctx, &news, false, Vec::new());
            // Drain the old instances of the hosts the new ones run on first: each host keeps its share.
            old_left.sort_by_key(|o| !news.iter().any(|n| n.host == o.host));
            let after: Vec<_> = old_left.drain(..(w.drain_after as usize).min(old_left.len())).collect();
            self.standby(ctx, after).await?;
            self.check(ctx)?;
        }
        // More old instances than new ones (the count was lowered): drain the rest.
        self.standby(ctx, old_left).await
    }

    async fn blue_green(self: &Arc<Self>, ctx: &mut Ctx) -> Result<(), String> {
        let news = self.start_new(ctx, self.total(&ctx.spec))?;
        self.await_ready(ctx, &news).await?;
        let old = ctx.old.clone();
        let drain: Vec<Change> = old.iter().map(|i| Change::Role { addr: i.addr, role: Role::Standby }).collect();
        // One atomic switch: the new instances in, the old ones out.
        self.cut_over(ctx, &news, true, drain);
        ctx.events.send("switched", format!("traffic switched to {} at once", ctx.version));
        self.standby(ctx, old).await
    }

    async fn canary(self: &Arc<Self>, ctx: &mut Ctx) -> Result<(), String> {
        let news = self.start_new(ctx, self.total(&ctx.spec))?;
        self.await_ready(ctx, &news).await?;
        let steps = ctx.steps.clone();
        for (k, &percent) in steps.iter().enumerate() {
            let split = Change::Split((percent < 100).then(|| (addrs(&news), percent)));
            if k == 0 {
                self.cut_over(ctx, &news, true, vec![split]);
            } else {
                self.traffic.apply(vec![split]);
            }
            ctx.events.send_value(json!({
                "step": "canary", "percent": percent,
                "message": format!("{} takes {percent}% of requests", ctx.version),
            }));
            if percent == 100 {
                let old = ctx.old.clone();
                return self.standby(ctx, old).await;
            }
            self.watch(ctx, ctx.spec.step).await?;
            let new = self.traffic.sample(&addrs(&ctx.in_service));
            ctx.events.send_value(json!({
                "step": "analysis", "percent": percent, "requests": new.requests, "failed": new.failed,
                "message": format!("step {percent}% passed: {} tries, {:.1}% failed, p99 {} ms", new.requests, new.error_percent(), new.p99().map_or(0, |d| d.as_millis())),
            }));
        }
        Ok(())
    }

    async fn soak(&self, ctx: &mut Ctx) -> Result<(), String> {
        ctx.events.send("soak", format!("watching {} for {} ms", ctx.version, ctx.spec.soak.as_millis()));
        self.watch(ctx, ctx.spec.soak).await?;
        let new = self.traffic.sample(&addrs(&ctx.in_service));
        ctx.events.send_value(json!({
            "step": "soak_passed", "requests": new.requests, "failed": new.failed,
            "message": format!("soak passed: {} tries on {}, {:.1}% failed", new.requests, ctx.version, new.error_percent()),
        }));
        Ok(())
    }

    /// The new version passed: it serves for good, and the old instances are stopped.
    async fn commit(&self, ctx: &mut Ctx) {
        let mut changes: Vec<Change> =
            ctx.new.iter().map(|i| Change::Role { addr: i.addr, role: Role::Serving }).collect();
        changes.extend(ctx.old.iter().map(|i| Change::Role { addr: i.addr, role: Role::Draining }));
        changes.push(Change::Split(None));
        self.traffic.apply(changes);
        for i in &ctx.new {
            i.set_state("serving");
            i.supervised.store(true, Relaxed);
            // A crash seen during the deploy failed it; from now on crashes are restarted.
        }
        {
            let mut g = self.lock();
            g.version = ctx.version.clone();
            g.env = ctx.env.clone();
        }
        self.retire(ctx, ctx.old.clone()).await;
        self.driver.retired(&ctx.from_version, containers(&ctx.old), Some(&ctx.version)).await;
    }

    /// The new version failed: traffic goes back to the old instances (warm), and the new ones are stopped.
    async fn roll_back(&self, ctx: &mut Ctx) {
        let mut changes: Vec<Change> =
            ctx.old.iter().map(|i| Change::Role { addr: i.addr, role: Role::Serving }).collect();
        changes.push(Change::Split(None));
        changes.extend(ctx.in_service.iter().map(|i| Change::Role { addr: i.addr, role: Role::Draining }));
        self.traffic.apply(changes);
        for i in &ctx.old {
            i.set_state("serving");
        }
        ctx.events.send(
            "rolled_back",
            format!("traffic is back on the {} old instances of {}", ctx.old.len(), ctx.from_version),
        );
        self.retire(ctx, ctx.new.clone()).await;
        self.driver.retired(&ctx.version, containers(&ctx.new), None).await;
    }

    /// Drains instances (bounded by drain_timeout), stops them and takes them out of the pool.
    async fn retire(&self, ctx: &Ctx, list: Vec<Arc<Instance>>) {
        for i in &list {
            i.set_state("draining");
        }
        let until = Instant::now() + ctx.spec.drain_timeout;
        while Instant::now() < until && list.iter().any(|i| self.traffic.in_flight(i.addr) > 0) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop_instances(&list).await;
        self.traffic.apply(list.iter().map(|i| Change::Remove(i.addr)).collect());
        for i in &list {
            ctx.events.send_value(json!({
                "step": "stopped", "instance": i.id, "addr": i.addr.to_string(), "version": i.version,
                "host": i.host,
                "message": format!("{} ({}) stopped", i.named(), i.version),
            }));
        }
    }

    /// The service's instances, version and running deploy, for `nonstop status`.
    pub fn status(&self) -> Value {
        let g = self.lock();
        let instances: Vec<Value> = g
            .instances
            .iter()
            .map(|i| {
                json!({
                    "id": i.id,
                    "version": i.version,
                    "addr": i.addr.to_string(),
                    "host": i.host,
                    "state": i.state(),
                    "pid": i.pid.load(Relaxed),
                    "driver": self.driver.kind(),
                    "container": i.container.lock().expect("instance lock").clone(),
                    "running": i.alive.load(Relaxed),
                    "healthy": self.traffic.healthy(i.addr),
                    "in_flight": self.traffic.in_flight(i.addr),
                    "restarts": i.restarts.load(Relaxed),
                    "last_exit": i.last_exit.lock().expect("instance lock").clone(),
                })
            })
            .collect();
        let running = g.running.as_ref().map(|r| {
            json!({
                "kind": r.kind,
                "version": r.version,
                "strategy": r.strategy.as_str(),
                "running_ms": r.started.elapsed().as_millis() as u64,
                "events": r.events.so_far().iter().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect::<Vec<_>>(),
            })
        });
        let last = self.history.records(Some(&self.service)).pop();
        json!({
            "service": self.service,
            "version": g.version,
            "instances": instances,
            "deploy": running,
            "last_deploy": last,
        })
    }

    /// The last `bytes_max` bytes of the output of one instance, or of every current one, each under a header
    /// line naming it and its host.
    pub async fn logs(&self, instance: Option<u64>, bytes_max: u64) -> Result<String, DeployError> {
        let list: Vec<Arc<Instance>> = {
            let g = self.lock();
            g.instances.iter().filter(|i| instance.is_none_or(|id| i.id == id)).cloned().collect()
        };
        if list.is_empty() {
            return Err(DeployError::Invalid(match instance {
                Some(id) => format!("service {:?} has no instance {id}", self.service),
                None => format!("service {:?} has no instances", self.service),
            }));
        }
        let mut out = String::new();
        for i in list {
            let r = LogRef {
                service: self.service.clone(),
                instance: i.id,
                host: i.host.clone(),
                local: self.log_path(i.id),
            };
            let on = i.host.as_ref().map_or(String::new(), |h| format!(" on host {h}"));
            out.push_str(&format!("==> instance {}{on} ({}, {}, {}) <==\n", i.id, i.version, i.addr, i.state()));
            match self.driver.logs(&r, bytes_max).await {
                Ok(bytes) => {
                    out.push_str(&String::from_utf8_lossy(&bytes));
                    if !out.ends_with('\n') {
                        out.push('\n');
                    }
                }
                Err(e) => out.push_str(&format!("(no log: {e})\n")),
            }
        }
        Ok(out)
    }

    pub fn history(&self) -> Vec<Record> {
        self.history.records(Some(&self.service))
    }
}

/// `s` as one shell word: as it is when it holds nothing the shell treats specially, otherwise in single quotes.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+:,@%".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn ok_status(s: u16) -> bool {
    (200..300).contains(&s)
}

/// One readiness probe: GET `path` on a fresh connection; the status, or why there is none.
async fn probe(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let go = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: nonstop-deploy\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let k = s.read(&mut buf[n..]).await.map_err(|e| format!("read: {e}"))?;
            if k == 0 {
                return Err("closed without an answer".to_string());
            }
            n += k;
        }
        let head = std::str::from_utf8(&buf[..n]).unwrap_or_default();
        head.strip_prefix("HTTP/1.")
            .and_then(|r| r.get(2..5))
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| format!("not an HTTP answer: {head:?}"))
    };
    tokio::time::timeout(PROBE_TIMEOUT, go).await.map_err(|_| "timed out".to_string())?
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_binary_path_stays_one_shell_word() {
        assert_eq!(super::shell_quote("/work/target/release/nonstop"), "/work/target/release/nonstop");
        assert_eq!(super::shell_quote("/my dir/it's/nonstop"), "'/my dir/it'\\''s/nonstop'");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", super::shell_quote("/my dir/it's $HOME/x")))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "/my dir/it's $HOME/x");
    }
}
