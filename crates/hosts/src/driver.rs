//! The SSH process driver (`driver = "ssh"`): instances are processes on SSH hosts, started over each host's one
//! connection from the release shipped there, listening on the host's address, and outliving the SSH session.
//!
//! - **Release**: built once per version on this machine (a tar archive of the file or directory, and its
//!   SHA-256), and shipped to each host that lacks `releases/VERSION`: streamed over the connection, checked by
//!   SHA-256 there, unpacked and renamed into place ([`crate::remote::receive_release`]). After a successful deploy
//!   the oldest releases past keep_releases are removed, never the serving one or the one it replaced.
//! - **Instances**: started by a wrapper under `setsid` that records the process id and, once it exits, its exit
//!   status. A poller per host reads the exit statuses of all its running instances in one command every
//!   [`POLL_EVERY`]; an exit resolves the instance's [`Process::wait`], so the deployer takes it out of rotation and
//!   restarts it with back-off, as it does a local process. A host that cannot be reached resolves all of its
//!   instances as lost (their traffic is already failing over); when one starts again, the launch first kills
//!   whatever of it is left there.
//! - **Stop**: `kill -TERM`, then `kill -KILL` after the grace period (the deployer's), over SSH.
//! - A slow or dead host costs its own connect_timeout_ms: every host's work runs in tasks of its own.

use std::collections::BTreeMap;
use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use nonstop_config::{Host, SshApp};
use nonstop_deploy::driver::{Boxed, Driver, DriverError, Launch, LogRef, Pending, Place, Prepared, Process};
use tokio::sync::{watch, Mutex, OnceCell};

use crate::link::{Input, Link};
use crate::remote;

/// How often a host is asked which of its instances exited.
pub const POLL_EVERY: Duration = Duration::from_millis(250);
/// A short command (launch, poll, signal, log tail) must finish within this long.
const COMMAND_MS: u64 = 15_000;
/// Shipping a release may take this long, plus a second per 4 MB.
const SHIP_BASE_MS: u64 = 30_000;
/// Log bytes one `nonstop logs` may fetch per instance, at most.
pub const LOG_BYTES_MAX: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SshDriverError {
    #[error("service {service}: app.hosts names {host:?}, which is not a [hosts.NAME]")]
    NoSuchHost { service: String, host: String },
    #[error("host {host}: cannot resolve {address}: {why}")]
    Resolve { host: String, address: String, why: String },
}

/// A release built on this machine: the archive and its SHA-256.
struct Archive {
    path: PathBuf,
    sha256: String,
    bytes: u64,
}

struct HostSide {
    link: Link,
    ip: IpAddr,
    /// Versions known to be in place there.
    shipped: Mutex<Vec<String>>,
    /// Leftovers of this service killed (once, when first reached).
    cleaned: AtomicBool,
    /// Runs watched by the poller: run name → where its exit goes.
    watched: StdMutex<BTreeMap<String, Watch>>,
    poller: AtomicBool,
}

struct Watch {
    exit: watch::Sender<Option<String>>,
    /// Polls that found it gone with no exit status, in a row.
    gone: u32,
}

/// The SSH process driver of one service.
pub struct SshDriver(Arc<Inner>);

struct Inner {
    service: String,
    app: SshApp,
    hosts: Vec<Arc<HostSide>>,
    /// Where release archives are built: state_dir/releases.
    archive_dir: PathBuf,
    archives: Mutex<BTreeMap<String, Once<Archive>>>,
    tokens: AtomicU64,
}

/// Work done once per key (a version's archive, an image's save) and shared; a failure is forgotten.
pub(crate) type Once<T> = Arc<OnceCell<Result<Arc<T>, String>>>;

impl SshDriver {
    /// A driver for `service` on the hosts `app` names (all defined in `hosts`: config validation ensures it).
    pub fn new(
        service: &str,
        app: &SshApp,
        hosts: &BTreeMap<String, Host>,
        state_dir: &Path,
    ) -> Result<SshDriver, SshDriverError> {
        let mut sides = Vec::new();
        for name in &app.hosts {
            let h = hosts
                .get(name)
                .ok_or_else(|| SshDriverError::NoSuchHost { service: service.into(), host: name.clone() })?;
            let ip = resolve(h)?;
            sides.push(Arc::new(HostSide {
                link: Link::new(h.clone(), crate::known_hosts_path(state_dir)),
                ip,
                shipped: Mutex::new(Vec::new()),
                cleaned: AtomicBool::new(false),
                watched: StdMutex::new(BTreeMap::new()),
                poller: AtomicBool::new(false),
            }));
        }
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Ok(SshDriver(Arc::new(Inner {
            service: service.to_string(),
            app: app.clone(),
            hosts: sides,
            archive_dir: state_dir.join("releases"),
            archives: Mutex::new(BTreeMap::new()),
            tokens: AtomicU64::new(seed),
        })))
    }
}

impl Inner {
    fn side(&self, host: Option<&str>) -> Option<Arc<HostSide>> {
        self.hosts.iter().find(|h| Some(h.link.host.name.as_str()) == host).cloned()
    }

    /// The release archive of `version`, built once.
    async fn archive(&self, version: &str) -> Result<Arc<Archive>, String> {
        let cell = self.archives.lock().await.entry(version.to_string()).or_default().clone();
        let release = self.app.release.clone().expect("archive is only asked for with a release");
        let dir = self.archive_dir.clone();
        let (service, v) = (self.service.clone(), version.to_string());
        let r = cell
            .get_or_init(|| async move {
                tokio::task::spawn_blocking(move || build_archive(&release, &dir, &service, &v).map(Arc::new))
                    .await
                    .unwrap_or_else(|e| Err(format!("building the release archive panicked: {e}")))
            })
            .await
            .clone();
        if r.is_err() {
            // A failure is not remembered: the next deploy or start tries again.
            self.archives.lock().await.remove(version);
        }
        r
    }

    /// Makes sure `version`'s release is on `side`; `Ok(Some(bytes))` when it was shipped now.
    async fn ensure(&self, side: &HostSide, version: &str) -> Result<Option<u64>, String> {
        self.clean(side).await?;
        if self.app.release.is_none() {
            return Ok(None);
        }
        let mut shipped = side.shipped.lock().await;
        if shipped.iter().any(|v| v == version) {
            return Ok(None);
        }
        let short = Duration::from_millis(COMMAND_MS);
        let present = side
            .link
            .run_ok("looking for the release", &remote::has_release(&side.link.host.dir, version), None, short)
            .await?;
        if String::from_utf8_lossy(&present).trim() == "yes" {
            shipped.push(version.to_string());
            return Ok(None);
        }
        let archive = self.archive(version).await?;
        let timeout = Duration::from_millis(SHIP_BASE_MS + archive.bytes / 4_000);
        let script = remote::receive_release(&side.link.host.dir, version, &archive.sha256);
        side.link.run_ok("shipping the release", &script, Some(Input::File(archive.path.clone())), timeout).await?;
        shipped.push(version.to_string());
        Ok(Some(archive.bytes))
    }

    /// Kills what an earlier proxy left of this service on the host, once.
    async fn clean(&self, side: &HostSide) -> Result<(), String> {
        if side.cleaned.load(Relaxed) {
            return Ok(());
        }
        let script = remote::clean(&side.link.host.dir, &self.service);
        side.link.run_ok("removing leftovers", &script, None, Duration::from_millis(COMMAND_MS)).await?;
        side.cleaned.store(true, Relaxed);
        Ok(())
    }
}

/// The address of a host, which its instances listen on.
pub(crate) fn resolve(h: &Host) -> Result<IpAddr, SshDriverError> {
    match h.host.parse::<IpAddr>() {
        Ok(ip) => Ok(ip),
        Err(_) => (h.host.as_str(), h.port)
            .to_socket_addrs()
            .map_err(|e| e.to_string())
            .and_then(|mut a| a.next().map(|a| a.ip()).ok_or_else(|| "no address".to_string()))
            .map_err(|why| SshDriverError::Resolve { host: h.name.clone(), address: h.host.clone(), why }),
    }
}

/// Builds `release` (a file or a directory, `{version}` replaced) into a tar archive in `dir` and hashes it.
fn build_archive(release: &Path, dir: &Path, service: &str, version: &str) -> Result<Archive, String> {
    let release = PathBuf::from(release.display().to_string().replace("{version}", version));
    let meta = std::fs::metadata(&release).map_err(|e| format!("the release {}: {e}", release.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("{service}-{version}.tar"));
    let tmp = path.with_extension("tar.tmp");
    let mut tar = std::process::Command::new("tar");
    tar.arg("-cf").arg(&tmp);
    if meta.is_dir() {
        tar.arg("-C").arg(&release).arg(".");
    } else {
        let parent = release.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = release.file_name().ok_or_else(|| format!("the release {} has no file name", release.display()))?;
        tar.arg("-C").arg(parent).arg(name);
    }
    let out = tar.output().map_err(|e| format!("cannot run tar: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tar of the release {} failed: {}",
            release.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let (sha256, bytes) = sha256_file(&tmp)?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Archive { path, sha256, bytes })
}

/// The SHA-256 of a file, in hex, and its length.
pub fn sha256_file(path: &Path) -> Result<(String, u64), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        ctx.update(&buf[..n]);
    }
    let hex: String = ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, total))
}

/// The poller of one host: every [`POLL_EVERY`], one command reports which watched runs exited. While the host
/// cannot be reached, its runs are resolved as lost.
async fn poll(side: Arc<HostSide>) {
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        let runs: Vec<String> = side.watched.lock().expect("watched lock").keys().cloned().collect();
        if runs.is_empty() {
            continue;
        }
        let script = remote::poll(&side.link.host.dir, &runs);
        match side.link.run_ok("polling instances", &script, None, Duration::from_millis(3_000)).await {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out);
                let reported: BTreeMap<String, Option<i32>> = text.lines().filter_map(remote::parse_poll).collect();
                let mut w = side.watched.lock().expect("watched lock");
                w.retain(|run, watch| match reported.get(run) {
                    Some(Some(status)) => {
                        watch.exit.send_replace(Some(remote::describe_exit(Some(*status))));
                        false
                    }
                    Some(None) => {
                        watch.gone += 1;
                        if watch.gone >= 2 {
                            watch.exit.send_replace(Some(remote::describe_exit(None)));
                        }
                        watch.gone < 2
                    }
                    None => {
                        watch.gone = 0;
                        true
                    }
                });
            }
            Err(e) => {
                tracing::warn!(host = %side.link.host.name, error = %e, "host unreachable: its instances are lost");
                let mut w = side.watched.lock().expect("watched lock");
                for (_, watch) in std::mem::take(&mut *w) {
                    watch.exit.send_replace(Some(format!("lost: {e}")));
                }
            }
        }
    }
}

struct Shared {
    side: Arc<HostSide>,
    pid: Arc<AtomicU32>,
    exit: watch::Sender<Option<String>>,
    /// The signal asked for before the process id was known.
    asked: StdMutex<Option<&'static str>>,
}

impl Shared {
    fn signal(self: &Arc<Self>, sig: &'static str) {
        let pid = self.pid.load(Relaxed);
        if pid == 0 {
            let mut asked = self.asked.lock().expect("asked lock");
            if asked.is_none() || sig == "KILL" {
                *asked = Some(sig);
            }
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let r = me.side.link.run(&remote::signal(pid, sig), None, Duration::from_millis(COMMAND_MS)).await;
            if let Err(e) = r {
                tracing::warn!(pid, sig, error = %e, "cannot signal a remote instance");
                if sig == "KILL" {
                    // It cannot be reached to be stopped: the poller resolves it as lost; this resolves it now.
                    exit_once(&me.exit, format!("lost: {e}"));
                }
            }
        });
    }
}

/// One remote instance.
struct Remote {
    shared: Arc<Shared>,
    exit: watch::Receiver<Option<String>>,
}

impl Process for Remote {
    fn id(&self) -> u32 {
        self.shared.pid.load(Relaxed)
    }

    fn terminate(&self) {
        self.shared.signal("TERM");
    }

    fn kill(&self) {
        self.shared.signal("KILL");
    }

    fn wait(&mut self) -> Pin<Box<dyn std::future::Future<Output = String> + Send + '_>> {
        Box::pin(wait_exit(&mut self.exit))
    }
}

impl Driver for SshDriver {
    fn kind(&self) -> &'static str {
        "ssh"
    }

    fn places(&self) -> Vec<Place> {
        self.0.hosts.iter().map(|h| Place { host: Some(h.link.host.name.clone()), ip: h.ip }).collect()
    }

    fn prepare(&self, version: &str) -> Boxed<'_, Vec<Prepared>> {
        let version = version.to_string();
        let me = self.0.clone();
        Box::pin(async move {
            let tasks = me.hosts.clone().into_iter().map(|side| {
                let (v, me) = (version.clone(), me.clone());
                async move {
                    let host = side.link.host.name.clone();
                    timed(host, "release", me.ensure(&side, &v)).await
                }
            });
            join_all(tasks).await
        })
    }

    fn start(&self, launch: &Launch) -> Result<Box<dyn Process>, DriverError> {
        let me = self.0.clone();
        let side = me.side(launch.host.as_deref()).ok_or_else(|| DriverError::Spawn {
            command: launch.command.clone(),
            source: std::io::Error::other(format!("instance placed on an unknown host {:?}", launch.host)),
        })?;
        if !side.poller.swap(true, Relaxed) {
            tokio::spawn(poll(side.clone()));
        }
        launch.pid.store(0, Relaxed);
        let (tx, rx) = watch::channel(None);
        let shared =
            Arc::new(Shared { side: side.clone(), pid: launch.pid.clone(), exit: tx, asked: StdMutex::new(None) });
        let token = format!("{:x}", me.tokens.fetch_add(1, Relaxed));
        let launch = launch.clone();
        let (release, task_shared) = (me.app.release.is_some(), shared.clone());
        let service = me.service.clone();
        tokio::spawn(async move {
            let shared = task_shared;
            let side = shared.side.clone();
            if let Err(e) = me.ensure(&side, &launch.version).await {
                shared.exit.send_replace(Some(e));
                return;
            }
            let dir = &side.link.host.dir;
            let workdir = remote::workdir(dir, release.then_some(launch.version.as_str()));
            let script = remote::instance_script(&workdir, &launch.env, &launch.command);
            let run = format!("{}.{token}", remote::instance_name(&service, launch.instance));
            let started = side
                .link
                .run_ok(
                    "starting the instance",
                    &remote::launch(dir, &service, launch.instance, &token),
                    Some(Input::Bytes(script.into_bytes())),
                    Duration::from_millis(COMMAND_MS),
                )
                .await
                .and_then(|out| {
                    String::from_utf8_lossy(&out)
                        .trim()
                        .parse::<u32>()
                        .map_err(|_| format!("{}: the launch printed no process id", side.link.label()))
                });
            let pid = match started {
                Ok(p) => p,
                Err(e) => {
                    shared.exit.send_replace(Some(e));
                    return;
                }
            };
            // Watch it before anyone can see its pid, so that no exit is missed.
            side.watched.lock().expect("watched lock").insert(run, Watch { exit: shared.exit.clone(), gone: 0 });
            shared.pid.store(pid, Relaxed);
            let asked = shared.asked.lock().expect("asked lock").take();
            if let Some(sig) = asked {
                shared.signal(sig);
            }
        });
        Ok(Box::new(Remote { shared, exit: rx }))
    }

    fn retired(&self, version: &str, _containers: Vec<String>, replaced_by: Option<&str>) -> Pending<'_> {
        let (version, now) = (version.to_string(), replaced_by.map(String::from));
        let me = self.0.clone();
        Box::pin(async move {
            let Some(now) = now.filter(|_| me.app.release.is_some()) else { return };
            let tasks = me.hosts.clone().into_iter().map(|side| {
                let script = remote::prune_releases(&side.link.host.dir, me.app.keep_releases, &now, &version);
                async move {
                    if let Err(e) =
                        side.link.run_ok("pruning releases", &script, None, Duration::from_millis(COMMAND_MS)).await
                    {
                        tracing::warn!(error = %e, "old releases not pruned");
                    }
                }
            });
            join_all(tasks).await;
        })
    }

    fn logs(&self, log: &LogRef, bytes_max: u64) -> Boxed<'_, Result<Vec<u8>, String>> {
        let side = self.0.side(log.host.as_deref());
        let name = remote::instance_name(&log.service, log.instance);
        Box::pin(async move {
            let side = side.ok_or_else(|| "the instance's host is not one of this service's".to_string())?;
            let script = remote::log_tail(&side.link.host.dir, &name, bytes_max.min(LOG_BYTES_MAX));
            side.link.run_ok("reading the log", &script, None, Duration::from_millis(COMMAND_MS)).await
        })
    }

    fn shutdown(&self) -> Pending<'_> {
        let hosts = self.0.hosts.clone();
        Box::pin(async move {
            join_all(hosts.into_iter().map(|h| async move { h.link.close().await })).await;
        })
    }
}

/// Resolves an instance's exit with `why`, unless it already has one.
pub(crate) fn exit_once(exit: &watch::Sender<Option<String>>, why: String) {
    exit.send_if_modified(|x| {
        let unset = x.is_none();
        if unset {
            *x = Some(why);
        }
        unset
    });
}

/// Waits until an instance's exit is known, and says how it ended.
pub(crate) async fn wait_exit(exit: &mut watch::Receiver<Option<String>>) -> String {
    match exit.wait_for(|x| x.is_some()).await {
        Ok(x) => x.clone().unwrap_or_default(),
        Err(_) => "the driver is gone".into(),
    }
}

/// How making `what` ready on `host` went, and how long it took.
pub(crate) async fn timed(
    host: String,
    what: &'static str,
    work: impl std::future::Future<Output = Result<Option<u64>, String>>,
) -> Prepared {
    let started = Instant::now();
    let result = work.await;
    Prepared { host: Some(host), what, result, ms: started.elapsed().as_millis() as u64 }
}

/// Runs each future as a task of its own (so each host's timeout runs beside the others') and collects their
/// outputs in order.
pub(crate) async fn join_all<T: Send + 'static>(
    futures: impl IntoIterator<Item = impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(v) => out.push(v),
            Err(e) => tracing::error!(error = %e, "a host task panicked"),
        }
    }
    out
}
