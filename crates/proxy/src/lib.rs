//! `nonstop serve`: the reverse proxy and load balancer. Worker threads accept clients and forward their requests
//! to services' servers over the proxy's own connection pools; a separate thread serves the admin API.

mod admin;
mod admin_guard;
pub mod admission;
mod apps;
pub mod balance;
mod checker;
pub mod error;
pub mod ewma;
mod forward;
pub mod framing;
#[doc(hidden)]
pub mod fuzzing;
mod h1down;
mod h1up;
pub mod health;
mod holder;
mod idle;
mod io;
mod listener;
pub mod metrics;
mod pipelines;
pub mod pool;
pub mod queued;
mod resolve;
pub mod state;
mod tls;
mod upstream;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use nonstop_config::{Config, ConfigErrors};
use tokio::sync::{watch, Semaphore};

use crate::metrics::Stats;
use crate::state::Snapshot;
use nonstop_accesslog::AccessLog;

/// Where the config comes from, and comes again from on reload.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    /// Quick mode: a config built from flags; a reload re-applies it.
    Fixed(Box<Config>),
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, StartError> {
        match self {
            ConfigSource::Fixed(c) => Ok((**c).clone()),
            ConfigSource::File(path) => {
                let bytes = std::fs::read(path).map_err(|e| StartError::Read(path.clone(), e))?;
                let text = String::from_utf8(bytes).map_err(|e| StartError::Config(not_utf8(&e)))?;
                Config::parse(&text).map_err(StartError::Config)
            }
        }
    }
}

/// A config file that is not UTF-8, pointed to the line and column of its first bad byte.
fn not_utf8(e: &std::string::FromUtf8Error) -> ConfigErrors {
    let (bytes, at) = (e.as_bytes(), e.utf8_error().valid_up_to());
    let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
    let column = 1 + at - bytes[..at].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let message = format!("invalid UTF-8 (byte 0x{:02x} at column {column}): TOML files are UTF-8", bytes[at]);
    ConfigErrors(vec![nonstop_config::ConfigError { line, path: String::new(), message }])
}

/// What `serve` would still refuse at start in a config that parsed (for `nonstop check`), short of binding its
/// addresses: every listener's TLS certificate and key, the access log's file, the state directory. Each
/// problem names its key.
pub fn check(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        if let Some(t) = &l.tls {
            problems.extend(tls::problems(t).into_iter().map(|p| format!("listeners[{i}].tls: {p}")));
        }
    }
    if let (true, Some(path)) = (config.access_log.enabled, &config.access_log.path) {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        if path.is_dir() {
            problems.push(format!("access_log.path: {} is a directory", path.display()));
        } else if path.exists() {
            if let Err(e) = std::fs::OpenOptions::new().append(true).open(path) {
                problems.push(format!("access_log.path: cannot append to {}: {e}", path.display()));
            }
        } else if !dir.is_dir() {
            problems.push(format!(
                "access_log.path: {} does not exist, so {} cannot be made",
                dir.display(),
                path.display()
            ));
        }
    }
    if config.state_dir.exists() && !config.state_dir.is_dir() {
        problems.push(format!("state_dir: {} is not a directory", config.state_dir.display()));
    }
    problems
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}")]
    Config(ConfigErrors),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// Someone already has the address: binding beside it with `SO_REUSEPORT` would share its traffic.
    #[error("cannot listen on {addr}: the address is in use, {holder}")]
    Held { addr: SocketAddr, holder: String },
    #[error("cannot start: {0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Build(#[from] state::BuildError),
    #[error("reload cannot change listeners or the admin address (restart instead): {0}")]
    ListenersChanged(String),
    #[error("reload cannot change [queues] (restart instead)")]
    QueuesChanged,
    #[error("cannot open queue {0:?}: {1}")]
    Queue(String, nonstop_queue::StoreError),
    #[error("{0}")]
    State(nonstop_deploy::history::HistoryError),
    #[error("{0}")]
    Hosts(String),
    #[error("reload cannot add or remove app sections or change their driver (restart instead): {0:?} -> {1:?}")]
    AppsChanged(Vec<String>, Vec<String>),
    #[error("a reload cannot add or remove pipelines or jobs (was {0:?}, now {1:?}): restart nonstop serve")]
    PipelinesChanged(Vec<String>, Vec<String>),
    #[error("pipelines: {0}")]
    Pipelines(String),
}

/// State shared by every thread.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    access_log: Option<AccessLog>,
    /// Requests that matched no route.
    unrouted: Stats,
    /// Requests answered by routes of static files.
    files: Stats,
    /// The port of the first TLS listener, where `redirect_https` sends clients.
    https_port: Option<u16>,
    /// A connect to a server given by name failed: its name may have moved (see [`resolve`]).
    resolve_hint: tokio::sync::Notify,
    source: ConfigSource,
    reload_lock: Mutex<()>,
    /// Durable queues by name, opened at start.
    pub queues: std::collections::BTreeMap<String, Arc<queued::Queue>>,
    /// The deployers of the app services.
    apps: apps::Apps,
    /// The pipelines and jobs; `None` when the config has none.
    pub pipelines: Option<nonstop_pipeline::Runner>,
}

impl Shared {
    /// Re-reads the config and swaps it in atomically; on any error the running config stays.
    pub fn reload(&self) -> Result<(), StartError> {
        let _one_at_a_time = self.reload_lock.lock().expect("reload lock");
        let config = self.source.load()?;
        let old = self.snapshot.load_full();
        let addrs =
            |c: &Config| (c.listeners.iter().map(|l| l.listen).collect::<Vec<_>>(), c.admin.as_ref().map(|a| a.listen));
        if addrs(&config) != addrs(&old.config) {
            return Err(StartError::ListenersChanged(format!("{:?} -> {:?}", addrs(&old.config), addrs(&config))));
        }
        if config.queues != old.config.queues {
            return Err(StartError::QueuesChanged);
        }
        let (was, now) = (apps::Apps::names(&old.config), apps::Apps::names(&config));
        if was != now {
            return Err(StartError::AppsChanged(was, now));
        }
        let names = |c: &Config| c.pipelines.keys().cloned().collect::<Vec<_>>();
        if names(&old.config) != names(&config) {
            return Err(StartError::PipelinesChanged(names(&old.config), names(&config)));
        }
        self.apps.reconfigure(&config);
        if let Some(p) = &self.pipelines {
            p.reconfigure(&config.pipelines);
        }
        self.snapshot.store(Arc::new(Snapshot::build(config, Some(&old))?));
        tracing::info!("config reloaded");
        Ok(())
    }

    /// Loads the listeners' certificates and keys again, with the running config; on any error the ones in use
    /// stay. Connections already open keep theirs.
    pub fn reload_certificates(&self) -> Result<(), StartError> {
        let _one_at_a_time = self.reload_lock.lock().expect("reload lock");
        let old = self.snapshot.load_full();
        self.snapshot.store(Arc::new(Snapshot::build(old.config.clone(), Some(&old))?));
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Worker threads; each accepts and serves its own connections.
    pub threads: usize,
    /// On shutdown, how long in-flight requests may take.
    pub drain_timeout: Duration,
}

/// A thread named `name` running a current-thread runtime until its sender says stop: the runtime's handle, for
/// tasks spawned from elsewhere (the deploy thread's supervisors and deploys, the pipelines' runs).
fn runtime_thread(name: &str) -> Result<(watch::Sender<bool>, JoinHandle<()>, tokio::runtime::Handle), StartError> {
    let (stop, mut stop_rx) = watch::channel(false);
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let _ = handle_tx.send(rt.handle().clone());
            rt.block_on(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
        })
        .map_err(StartError::Io)?;
    let handle =
        handle_rx.recv().map_err(|_| StartError::Io(std::io::Error::other(format!("the {name} thread died"))))?;
    Ok((stop, thread, handle))
}

/// Refuses to start on an address that anything already holds (checked before the proxy binds its own
/// `SO_REUSEPORT` sockets, which the kernel would let share a port with another proxy of the same user). This is
/// the one place of the check: a start that takes over the sockets of the process it upgrades would skip it.
fn refuse_held_addresses(config: &Config) -> Result<(), StartError> {
    let admin = config.admin.as_ref().map(|a| a.listen);
    let mut addrs: Vec<SocketAddr> = config.listeners.iter().map(|l| l.listen).collect();
    if let Some(admin) = admin.filter(|a| a.port() != 0) {
        if addrs.contains(&admin) {
            let e = std::io::Error::new(std::io::ErrorKind::AddrInUse, "a listener and the admin API both ask for it");
            return Err(StartError::Bind(admin, e));
        }
    }
    addrs.extend(admin);
    for addr in addrs {
        if !holder::is_free(addr).map_err(|e| bind_error(addr, e))? {
            return Err(bind_error(addr, std::io::ErrorKind::AddrInUse.into()));
        }
    }
    Ok(())
}

/// A failed bind; an address in use names its holder.
fn bind_error(addr: SocketAddr, e: std::io::Error) -> StartError {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => StartError::Held { addr, holder: holder::describe(&holder::find(addr)) },
        _ => StartError::Bind(addr, e),
    }
}

/// Where the access log goes.
#[derive(Debug, PartialEq, Eq)]
enum AccessLogOutput {
    Off,
    /// Off because it would go to a terminal and the config did not ask for that.
    OffOnTerminal,
    On,
}

/// The access log's default, as an nginx user expects: no JSON line per request on the terminal. To a file, to
/// a pipe or when `enabled = true` is written, it is on.
fn access_log_output(a: &nonstop_config::AccessLog, stdout_is_terminal: bool) -> AccessLogOutput {
    match (a.enabled, a.path.is_some() || a.enabled_explicitly || !stdout_is_terminal) {
        (false, _) => AccessLogOutput::Off,
        (true, false) => AccessLogOutput::OffOnTerminal,
        (true, true) => AccessLogOutput::On,
    }
}

/// A running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
    /// The deploy thread, stopped last: it stops the app instances once requests have drained.
    deploy: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    /// The pipelines thread, and what stops it.
    pipeline_thread: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    listen_addrs: Vec<SocketAddr>,
    admin_addr: Option<SocketAddr>,
}

impl Proxy {
    /// Loads the config, binds every listener and starts the threads.
    pub fn start(source: ConfigSource, opts: Options) -> Result<Proxy, StartError> {
        let config = source.load()?;
        let snapshot = Snapshot::build(config.clone(), None)?;
        let access_log = match access_log_output(&config.access_log, std::io::stdout().is_terminal()) {
            AccessLogOutput::Off => None,
            AccessLogOutput::OffOnTerminal => {
                tracing::info!(
                    "access log off: standard output is a terminal (set access_log.path to log to a file, or \
                     access_log.enabled = true to log here)"
                );
                None
            }
            AccessLogOutput::On => {
                let a = &config.access_log;
                let settings = nonstop_accesslog::Settings {
                    path: a.path.clone(),
                    format: match a.format {
                        nonstop_config::LogFormat::Json => nonstop_accesslog::Format::Json,
                        nonstop_config::LogFormat::Combined => nonstop_accesslog::Format::Combined,
                    },
                    flush_ms: a.flush_ms,
                    success_sample_percent: a.success_sample_percent,
                };
                Some(AccessLog::open(&settings).map_err(StartError::Io)?)
            }
        };
        let threads = opts.threads.max(1);
        refuse_held_addresses(&config)?;
        // One SO_REUSEPORT socket per listener and thread; the first fixes the port when port 0 was asked for.
        let mut per_thread: Vec<Vec<listener::Bound>> = (0..threads).map(|_| Vec::new()).collect();
        let mut listen_addrs = Vec::new();
        for (index, l) in config.listeners.iter().enumerate() {
            let first = listener::bind(l.listen).map_err(|e| bind_error(l.listen, e))?;
            let addr = first.local_addr().map_err(StartError::Io)?;
            listen_addrs.push(addr);
            // Each thread accepts only from its own socket, so each gets its own share of the connection limit
            // (a shared one could hand a freed slot to a thread with nothing queued while another starves).
            let share = l.max_connections.div_ceil(threads);
            let mut socket = Some(first);
            for bound in per_thread.iter_mut() {
                let connections = Arc::new(Semaphore::new(share));
                let s = match socket.take() {
                    Some(s) => s,
                    None => listener::bind(addr).map_err(|e| bind_error(addr, e))?,
                };
                bound.push(listener::Bound { index, socket: s, connections });
            }
        }
        let admin_socket = match &config.admin {
            Some(a) => Some(listener::bind_exclusive(a.listen).map_err(|e| bind_error(a.listen, e))?),
            None => None,
        };
        let admin_addr = admin_socket.as_ref().map(|s| s.local_addr()).transpose().map_err(StartError::Io)?;

        let mut queues = std::collections::BTreeMap::new();
        for q in config.queues.values() {
            queues.insert(q.name.clone(), queued::Queue::open(q).map_err(|e| StartError::Queue(q.name.clone(), e))?);
        }
        // The deploy thread's runtime runs the app instances' supervisors and the deploys.
        let (deploy_stop, deploy_thread, rt) = runtime_thread("deploy")?;
        let apps = apps::Apps::new(&config, &snapshot, rt)?;
        // The pipelines thread's runtime runs the runs (their commands, deploys and loads) and the schedules.
        let mut pipeline_thread = None;
        let mut platform = None;
        let runner = if config.pipelines.is_empty() {
            None
        } else {
            let (stop, thread, prt) = runtime_thread("pipelines")?;
            pipeline_thread = Some((stop, thread));
            let tls: Vec<(SocketAddr, bool)> =
                listen_addrs.iter().zip(&config.listeners).map(|(a, l)| (*a, l.tls.is_some())).collect();
            let p = Arc::new(pipelines::ProxyPlatform::new(apps.deployers.clone(), apps.history.clone(), tls));
            platform = Some(p.clone());
            let exe = std::env::current_exe().map_err(StartError::Io)?;
            Some(
                nonstop_pipeline::Runner::start(&config.pipelines, &config.state_dir, p, prt, exe)
                    .map_err(|e| StartError::Pipelines(e.to_string()))?,
            )
        };
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            access_log,
            unrouted: Stats::default(),
            files: Stats::default(),
            https_port: config
                .listeners
                .iter()
                .zip(&listen_addrs)
                .find(|(l, _)| l.tls.is_some())
                .map(|(_, a)| a.port()),
            resolve_hint: tokio::sync::Notify::new(),
            source,
            reload_lock: Mutex::new(()),
            queues,
            apps,
            pipelines: runner,
        });
        if let Some(p) = &platform {
            p.attach(&shared);
        }
        shared.apps.boot();
        // Before any listener takes a request: a service of named servers has them from the first request on.
        let names = resolve::initial(&shared);
        let (shutdown, rx) = watch::channel(false);
        let mut handles = Vec::new();
        for (i, bound) in per_thread.into_iter().enumerate() {
            let (shared, rx) = (shared.clone(), rx.clone());
            let drain = opts.drain_timeout;
            let h = std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    upstream::set_worker(i);
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                    rt.block_on(listener::run_worker(shared, bound, rx, drain));
                })
                .map_err(StartError::Io)?;
            handles.push(h);
        }
        {
            let (shared, rx) = (shared.clone(), rx.clone());
            let h = std::thread::Builder::new()
                .name("health".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                    // Health checks, the certificate watch and servers by name: light loops that share a thread.
                    rt.block_on(async {
                        tokio::join!(
                            checker::run(shared.clone(), rx.clone()),
                            tls::watch(shared.clone(), rx.clone()),
                            resolve::run(shared, names, rx)
                        );
                    });
                })
                .map_err(StartError::Io)?;
            handles.push(h);
        }
        for q in shared.queues.values() {
            let (shared, rx, q) = (shared.clone(), rx.clone(), q.clone());
            let h = std::thread::Builder::new()
                .name(format!("queue-{}", q.name))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                    rt.block_on(queued::dispatch(q, shared, rx));
                })
                .map_err(StartError::Io)?;
            handles.push(h);
        }
        if let Some(socket) = admin_socket {
            let (shared, rx) = (shared.clone(), rx.clone());
            let h = std::thread::Builder::new()
                .name("admin".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                    rt.block_on(admin::serve(shared, socket, rx));
                })
                .map_err(StartError::Io)?;
            handles.push(h);
        }
        Ok(Proxy {
            shared,
            shutdown,
            threads: handles,
            deploy: Some((deploy_stop, deploy_thread)),
            pipeline_thread,
            listen_addrs,
            admin_addr,
        })
    }

    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen_addrs
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn reload(&self) -> Result<(), StartError> {
        self.shared.reload()
    }

    /// Reopens the access log file (SIGUSR1, after logrotate moved it).
    pub fn reopen_access_log(&self) {
        if let Some(log) = &self.shared.access_log {
            log.reopen();
        }
    }

    /// Stops accepting, lets in-flight requests finish (bounded by the drain timeout), and returns.
    pub fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        self.stop_apps();
        // Every request answered is in the log before the process exits.
        if let Some(log) = &self.shared.access_log {
            log.flush();
        }
    }

    /// Stops the app instances (after the requests drained) and the deploy thread.
    fn stop_apps(&mut self) {
        // Runs end first (interrupted, their commands stopped), so that no deploy step starts as instances stop.
        if let Some(p) = self.shared.pipelines.clone() {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(p.shutdown(nonstop_pipeline::exec::KILL_GRACE + Duration::from_secs(2)));
            }
        }
        if let Some((stop, thread)) = self.pipeline_thread.take() {
            let _ = stop.send(true);
            let _ = thread.join();
        }
        let Some((stop, thread)) = self.deploy.take() else { return };
        let deployers: Vec<_> = self.shared.apps.deployers.values().cloned().collect();
        if !deployers.is_empty() {
            // A runtime of its own: the deploy thread's runs the supervisors that see the instances exit.
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(async {
                    for d in deployers {
                        d.shutdown().await;
                    }
                });
            }
        }
        let _ = stop.send(true);
        let _ = thread.join();
    }
}
