//! The Docker driver on SSH hosts (`driver = "docker"` with `hosts`): each instance is a container on a host's
//! Docker engine, driven with the host's Docker CLI over its one SSH connection, its container port published on
//! the host's address at the instance's port.
//!
//! - **Image**: a host that lacks the version's image (or holds another image under its tag) gets it with no
//!   registry: `docker save` on this machine once per image (an archive in state_dir/images), streamed to
//!   `docker load` there; the image ID the host then reports must be this machine's (IDs are content hashes), or
//!   the deploy fails naming the host. An image built on the hosts themselves is used as it is.
//! - **Containers**: `docker run --detach`, named and labelled as by the local driver, with no restart policy
//!   (the deployer restarts, after its readiness gate; see `nonstop_deploy::docker`). One poller per host asks
//!   the engine for the state of all its containers in one command; an exit resolves the instance's wait.
//!   A crashed container is removed (the next start reuses its name); stopped ones of replaced versions are kept
//!   within keep_versions, the last replaced version always, and removed at shutdown. Containers of this service
//!   and state directory that an earlier proxy left on a host are removed when the driver first reaches it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use nonstop_config::{DockerApp, Host};
use nonstop_deploy::docker::{container_name, describe_code, keep, run_args_as};
use nonstop_deploy::driver::{Boxed, Driver, DriverError, Launch, LogRef, Pending, Place, Prepared, Process};
use tokio::sync::{watch, Mutex};

use crate::driver::{exit_once, join_all, resolve, timed, wait_exit, Once, POLL_EVERY};
use crate::link::{Input, Link};
use crate::remote::quote;

const COMMAND_MS: u64 = 15_000;
const SHIP_BASE_MS: u64 = 60_000;

struct Side {
    link: Link,
    ip: IpAddr,
    cleaned: AtomicBool,
    /// Images known to be there: tag → ID.
    images: Mutex<BTreeMap<String, String>>,
    watched: StdMutex<BTreeMap<String, Watch>>,
    poller: AtomicBool,
}

struct Watch {
    exit: watch::Sender<Option<String>>,
    /// Asked to stop: its exit is no crash (kept until the deployer says what to do with it).
    stopping: Arc<AtomicBool>,
    gone: u32,
}

/// A `docker save` archive of an image, and the image's ID.
struct Saved {
    path: PathBuf,
    bytes: u64,
}

struct Inner {
    service: String,
    app: DockerApp,
    /// The `nonstop.state` label.
    state: String,
    sides: Vec<Arc<Side>>,
    image_dir: PathBuf,
    saved: Mutex<BTreeMap<String, Once<Saved>>>,
    /// Container name → its host, for removing it.
    homes: StdMutex<BTreeMap<String, Arc<Side>>>,
    kept: StdMutex<Vec<(String, Vec<String>)>>,
}

/// The Docker driver of one service on SSH hosts.
pub struct RemoteDocker(Arc<Inner>);

impl RemoteDocker {
    pub fn new(
        service: &str,
        app: &DockerApp,
        hosts: &BTreeMap<String, Host>,
        state_dir: &Path,
    ) -> Result<RemoteDocker, crate::driver::SshDriverError> {
        let mut sides = Vec::new();
        for name in &app.hosts {
            let h = hosts.get(name).ok_or_else(|| crate::driver::SshDriverError::NoSuchHost {
                service: service.into(),
                host: name.clone(),
            })?;
            sides.push(Arc::new(Side {
                link: Link::new(h.clone(), crate::known_hosts_path(state_dir)),
                ip: resolve(h)?,
                cleaned: AtomicBool::new(false),
                images: Mutex::new(BTreeMap::new()),
                watched: StdMutex::new(BTreeMap::new()),
                poller: AtomicBool::new(false),
            }));
        }
        let state = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf()).display().to_string();
        Ok(RemoteDocker(Arc::new(Inner {
            service: service.to_string(),
            app: app.clone(),
            state,
            sides,
            image_dir: state_dir.join("images"),
            saved: Mutex::new(BTreeMap::new()),
            homes: StdMutex::new(BTreeMap::new()),
            kept: StdMutex::new(Vec::new()),
        })))
    }
}

/// The ID of `image` on this machine's engine, if it has it.
async fn local_id(image: &str) -> Result<Option<String>, String> {
    let out = tokio::process::Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .output()
        .await
        .map_err(|e| format!("cannot run the docker CLI here: {e}"))?;
    Ok(out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty()))
}

fn short(s: &str) -> String {
    s.trim_start_matches("sha256:").chars().take(12).collect()
}

impl Inner {
    fn side(&self, host: Option<&str>) -> Option<Arc<Side>> {
        self.sides.iter().find(|s| Some(s.link.host.name.as_str()) == host).cloned()
    }

    async fn run_ok(&self, side: &Side, what: &str, cmd: &str) -> Result<Vec<u8>, String> {
        side.link.run_ok(what, cmd, None, Duration::from_millis(COMMAND_MS)).await
    }

    /// Removes what an earlier proxy left of this service on the host, once.
    async fn clean(&self, side: &Side) -> Result<(), String> {
        if side.cleaned.load(Relaxed) {
            return Ok(());
        }
        let cmd = format!(
            "docker ps -a -q --filter {} --filter {} | xargs -r docker rm -f -v >/dev/null",
            quote(&format!("label=nonstop.service={}", self.service)),
            quote(&format!("label=nonstop.state={}", self.state))
        );
        self.run_ok(side, "removing leftover containers", &cmd).await?;
        side.cleaned.store(true, Relaxed);
        Ok(())
    }

    /// The image's `docker save` archive, made once.
    async fn saved(&self, image: &str) -> Result<Arc<Saved>, String> {
        let cell = self.saved.lock().await.entry(image.to_string()).or_default().clone();
        let dir = self.image_dir.clone();
        let img = image.to_string();
        let r = cell
            .get_or_init(|| async move {
                std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let file: String =
                    img.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
                let path = dir.join(format!("{file}.tar"));
                let tmp = path.with_extension("tar.tmp");
                let out = tokio::process::Command::new("docker")
                    .arg("save")
                    .arg("--output")
                    .arg(&tmp)
                    .arg(&img)
                    .output()
                    .await
                    .map_err(|e| format!("cannot run docker save: {e}"))?;
                if !out.status.success() {
                    return Err(format!("docker save {img} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
                }
                std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
                let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                Ok(Arc::new(Saved { path, bytes }))
            })
            .await
            .clone();
        if r.is_err() {
            self.saved.lock().await.remove(image);
        }
        r
    }

    /// Makes sure `image` is on the host with this machine's ID; `Ok(Some(bytes))` when it was shipped now.
    async fn ensure(&self, side: &Side, image: &str) -> Result<Option<u64>, String> {
        self.clean(side).await?;
        let mut images = side.images.lock().await;
        let local = local_id(image).await?;
        if let (Some(have), Some(want)) = (images.get(image), &local) {
            if have == want {
                return Ok(None);
            }
        }
        let inspect = format!("docker image inspect --format '{{{{.Id}}}}' {} 2>/dev/null || true", quote(image));
        let remote =
            String::from_utf8_lossy(&self.run_ok(side, "looking for the image", &inspect).await?).trim().to_string();
        let Some(want) = local else {
            if remote.is_empty() {
                return Err(format!(
                    "{}: no image {image} there, and none on this machine to ship (build it here, or there)",
                    side.link.label()
                ));
            }
            images.insert(image.to_string(), remote);
            return Ok(None);
        };
        if remote == want {
            images.insert(image.to_string(), want);
            return Ok(None);
        }
        let saved = self.saved(image).await?;
        let timeout = Duration::from_millis(SHIP_BASE_MS + saved.bytes / 4_000);
        side.link.run_ok("docker load", "docker load --quiet", Some(Input::File(saved.path.clone())), timeout).await?;
        let now = String::from_utf8_lossy(&self.run_ok(side, "checking the loaded image", &inspect).await?)
            .trim()
            .to_string();
        if now != want {
            return Err(format!(
                "{}: after docker load, {image} is {} there, not {} as here",
                side.link.label(),
                if now.is_empty() { "missing".to_string() } else { short(&now) },
                short(&want)
            ));
        }
        images.insert(image.to_string(), want);
        Ok(Some(saved.bytes))
    }

    async fn remove(&self, names: Vec<String>) {
        let mut by_host: BTreeMap<String, (Arc<Side>, Vec<String>)> = BTreeMap::new();
        {
            let mut homes = self.homes.lock().expect("homes lock");
            for n in names {
                if let Some(side) = homes.remove(&n) {
                    by_host.entry(side.link.host.name.clone()).or_insert_with(|| (side.clone(), Vec::new())).1.push(n);
                }
            }
        }
        let tasks = by_host.into_values().map(|(side, names)| async move {
            let list: Vec<String> = names.iter().map(|n| quote(n)).collect();
            let cmd = format!("docker rm -f -v {} >/dev/null", list.join(" "));
            if let Err(e) = side.link.run_ok("removing containers", &cmd, None, Duration::from_millis(COMMAND_MS)).await
            {
                tracing::warn!(containers = ?names, error = %e, "containers not removed");
            }
        });
        join_all(tasks).await;
    }
}

/// The poller of one host's containers.
async fn poll(side: Arc<Side>) {
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        let names: Vec<String> = side.watched.lock().expect("watched lock").keys().cloned().collect();
        if names.is_empty() {
            continue;
        }
        let list: Vec<String> = names.iter().map(|n| quote(n)).collect();
        let cmd = format!(
            "docker inspect --format '{{{{.Name}}}} {{{{.State.Status}}}} {{{{.State.ExitCode}}}}' {} 2>/dev/null; true",
            list.join(" ")
        );
        match side.link.run_ok("polling containers", &cmd, None, Duration::from_millis(5_000)).await {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out);
                let seen: BTreeMap<String, (String, i64)> = text
                    .lines()
                    .filter_map(|l| {
                        let mut w = l.split_whitespace();
                        let name = w.next()?.trim_start_matches('/').to_string();
                        Some((name, (w.next()?.to_string(), w.next()?.parse().ok()?)))
                    })
                    .collect();
                let mut crashed = Vec::new();
                let mut w = side.watched.lock().expect("watched lock");
                w.retain(|name, watch| match seen.get(name) {
                    Some((status, code)) if status == "exited" || status == "dead" => {
                        if !watch.stopping.load(Relaxed) {
                            crashed.push(name.clone());
                        }
                        watch.exit.send_replace(Some(describe_code(*code)));
                        false
                    }
                    Some(_) => {
                        watch.gone = 0;
                        true
                    }
                    None => {
                        watch.gone += 1;
                        if watch.gone >= 2 {
                            watch.exit.send_replace(Some("the container is gone".into()));
                        }
                        watch.gone < 2
                    }
                });
                drop(w);
                if !crashed.is_empty() {
                    // A crash: its output stays in the engine's log until the supervisor's next start replaces it.
                    tracing::warn!(host = %side.link.host.name, containers = ?crashed, "containers exited");
                }
            }
            Err(e) => {
                tracing::warn!(host = %side.link.host.name, error = %e, "host unreachable: its containers are lost");
                for (_, watch) in std::mem::take(&mut *side.watched.lock().expect("watched lock")) {
                    watch.exit.send_replace(Some(format!("lost: {e}")));
                }
            }
        }
    }
}

struct Shared {
    side: Arc<Side>,
    name: String,
    grace_s: u64,
    started: watch::Sender<bool>,
    stopping: Arc<AtomicBool>,
    exit: watch::Sender<Option<String>>,
}

impl Shared {
    fn docker(self: &Arc<Self>, args: String, timeout: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            // Only once the container was created: a stop asked for before then is carried out after it.
            let mut started = me.started.subscribe();
            let _ = started.wait_for(|s| *s).await;
            if me.exit.borrow().is_some() {
                return;
            }
            if let Err(e) = me.side.link.run(&args, None, timeout).await {
                tracing::warn!(container = %me.name, error = %e, "cannot stop a remote container");
                exit_once(&me.exit, format!("lost: {e}"));
            }
        });
    }
}

struct Container {
    shared: Arc<Shared>,
    exit: watch::Receiver<Option<String>>,
    pid: Arc<AtomicU32>,
}

impl Process for Container {
    fn id(&self) -> u32 {
        self.pid.load(Relaxed)
    }

    fn terminate(&self) {
        self.shared.stopping.store(true, Relaxed);
        let cmd = format!("docker stop --time {} {} >/dev/null", self.shared.grace_s, quote(&self.shared.name));
        self.shared.docker(cmd, Duration::from_millis(COMMAND_MS + self.shared.grace_s * 1000));
    }

    fn kill(&self) {
        self.shared.stopping.store(true, Relaxed);
        let cmd = format!("docker kill --signal KILL {} >/dev/null 2>&1 || true", quote(&self.shared.name));
        self.shared.docker(cmd, Duration::from_millis(COMMAND_MS));
    }

    fn wait(&mut self) -> Pin<Box<dyn std::future::Future<Output = String> + Send + '_>> {
        Box::pin(wait_exit(&mut self.exit))
    }

    fn container(&self) -> Option<String> {
        Some(self.shared.name.clone())
    }
}

impl Driver for RemoteDocker {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn places(&self) -> Vec<Place> {
        self.0.sides.iter().map(|s| Place { host: Some(s.link.host.name.clone()), ip: s.ip }).collect()
    }

    fn prepare(&self, version: &str) -> Boxed<'_, Vec<Prepared>> {
        let image = self.0.app.image.replace("{version}", version);
        let me = self.0.clone();
        Box::pin(async move {
            let tasks = me.sides.clone().into_iter().map(|side| {
                let (me, image) = (me.clone(), image.clone());
                async move {
                    let host = side.link.host.name.clone();
                    timed(host, "image", me.ensure(&side, &image)).await
                }
            });
            join_all(tasks).await
        })
    }

    fn start(&self, launch: &Launch) -> Result<Box<dyn Process>, DriverError> {
        let c = launch.container.clone().ok_or(DriverError::NoImage)?;
        let me = self.0.clone();
        let side = me.side(launch.host.as_deref()).ok_or_else(|| DriverError::Spawn {
            command: c.image.clone(),
            source: std::io::Error::other(format!("container placed on an unknown host {:?}", launch.host)),
        })?;
        if !side.poller.swap(true, Relaxed) {
            tokio::spawn(poll(side.clone()));
        }
        let name = container_name(&launch.service, launch.instance, &launch.version);
        me.homes.lock().expect("homes lock").insert(name.clone(), side.clone());
        let (tx, rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            side: side.clone(),
            name: name.clone(),
            grace_s: launch.stop_grace.as_secs_f64().ceil() as u64,
            started: watch::channel(false).0,
            stopping: Arc::new(AtomicBool::new(false)),
            exit: tx,
        });
        let args = run_args_as(launch, &c, &name, &me.state, true);
        let task = shared.clone();
        tokio::spawn(async move {
            let shared = task;
            let done = |e: String| {
                shared.exit.send_replace(Some(e));
                shared.started.send_replace(true);
            };
            if let Err(e) = me.ensure(&side, &c.image).await {
                return done(e);
            }
            let words: Vec<String> = args.iter().map(|a| quote(a)).collect();
            // The name is the instance's: what a crash left under it goes first.
            let cmd = format!("docker rm -f -v {} >/dev/null 2>&1; docker {}", quote(&name), words.join(" "));
            if let Err(e) = me.run_ok(&side, "docker run", &cmd).await {
                return done(e);
            }
            side.watched
                .lock()
                .expect("watched lock")
                .insert(name.clone(), Watch { exit: shared.exit.clone(), stopping: shared.stopping.clone(), gone: 0 });
            shared.started.send_replace(true);
        });
        Ok(Box::new(Container { shared, exit: rx, pid: launch.pid.clone() }))
    }

    fn retired(&self, version: &str, containers: Vec<String>, replaced_by: Option<&str>) -> Pending<'_> {
        let gone = match replaced_by {
            Some(now) => {
                let mut kept = self.0.kept.lock().expect("kept lock");
                keep(&mut kept, version, containers, now, self.0.app.keep_versions as usize)
            }
            None => containers,
        };
        let me = self.0.clone();
        Box::pin(async move { me.remove(gone).await })
    }

    fn logs(&self, log: &LogRef, bytes_max: u64) -> Boxed<'_, Result<Vec<u8>, String>> {
        let me = self.0.clone();
        let (host, service, instance) = (log.host.clone(), log.service.clone(), log.instance);
        Box::pin(async move {
            let side = me
                .side(host.as_deref())
                .ok_or_else(|| "the instance's host is not one of this service's".to_string())?;
            let name = {
                let homes = me.homes.lock().expect("homes lock");
                // `nonstop-SERVICE-ID-` and the version.
                let prefix = container_name(&service, instance, "");
                homes.keys().find(|n| n.starts_with(&prefix)).cloned()
            };
            let name = name.ok_or_else(|| "no container of this instance".to_string())?;
            let cmd =
                format!("docker logs {} 2>&1 | tail -c {}", quote(&name), bytes_max.min(crate::driver::LOG_BYTES_MAX));
            me.run_ok(&side, "docker logs", &cmd).await
        })
    }

    fn shutdown(&self) -> Pending<'_> {
        let me = self.0.clone();
        Box::pin(async move {
            let all: Vec<String> = me.kept.lock().expect("kept lock").drain(..).flat_map(|(_, n)| n).collect();
            me.remove(all).await;
            join_all(me.sides.clone().into_iter().map(|s| async move { s.link.close().await })).await;
        })
    }
}
