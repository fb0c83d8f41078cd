//! The Docker driver: each instance is a container of the app's image on the local Docker engine, its container
//! port published on 127.0.0.1 at the port the deployer chose, so the proxy reaches it as it reaches a local process.
//!
//! It drives the engine with the Docker CLI (`docker run`, `stop`, `kill`, `rm`, `ps`) rather than the Engine API
//! over its socket (bollard): the API client would add its own HTTP client stack and dozens of crates to a build
//! that runs on two shared cores, for the five operations the CLI already does. An attached `docker run` is the
//! container's life, as a child process is a local instance's: it exits with the container's status (128 + n
//! when a signal killed it) and streams the container's output to the instance log. So supervision, readiness and
//! back-off are the deployer's, unchanged.
//!
//! Containers run with no restart policy (`--restart no`): a restart by the engine behind the deployer's back
//! would put an instance back on its port before readiness checks, and would restart a deploy's new instances,
//! whose exit must fail the deploy instead. A container that exits (a crash) is removed and the supervisor starts
//! a new one under the same name with back-off. A container stopped because its version was replaced stays
//! (stopped) for `keep_versions` replaced versions: its logs and file system can be inspected, and
//! `docker start` brings it back by hand; the deploys themselves start fresh containers from the image. Every
//! container is removed when the proxy shuts down, and containers a killed proxy left behind (same service and
//! state directory) are removed when the next one starts.

use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use nonstop_config::DockerApp;

use crate::driver::{output, Driver, DriverError, Launch, Pending, Process};

/// Runs instances as containers on the local Docker engine.
pub struct DockerDriver {
    /// The `nonstop.state` label: the proxy's state directory, which tells apart two proxies' containers.
    state: String,
    /// Stopped containers of replaced versions, oldest first.
    kept: Mutex<Vec<(String, Vec<String>)>>,
    keep_versions: AtomicU32,
}

impl DockerDriver {
    /// A driver for `service`; removes containers of it that a proxy with the same state directory left behind
    /// (one killed with SIGKILL cannot stop its own).
    pub fn new(service: &str, state_dir: &Path) -> DockerDriver {
        let state = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf()).display().to_string();
        let left = std::process::Command::new("docker")
            .args(["ps", "-a", "-q", "--filter"])
            .arg(format!("label=nonstop.service={service}"))
            .arg("--filter")
            .arg(format!("label=nonstop.state={state}"))
            .output();
        match left {
            Ok(out) if out.status.success() => {
                let ids: Vec<String> =
                    String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect();
                if !ids.is_empty() {
                    tracing::warn!(service, count = ids.len(), "removing containers an earlier proxy left behind");
                    let _ = std::process::Command::new("docker").args(["rm", "-f", "-v"]).args(&ids).output();
                }
            }
            Ok(out) => {
                tracing::error!(service, error = %String::from_utf8_lossy(&out.stderr).trim(), "docker ps failed")
            }
            Err(e) => tracing::error!(service, error = %e, "the docker CLI cannot be run"),
        }
        DockerDriver { state, kept: Mutex::new(Vec::new()), keep_versions: AtomicU32::new(1) }
    }
}

/// The container's name: `nonstop-SERVICE-INSTANCE-VERSION`, with what Docker does not take in a name as `_`.
pub fn container_name(service: &str, instance: u64, version: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '_' }).collect()
    };
    format!("nonstop-{}-{instance}-{}", clean(service), clean(version))
}

/// The arguments of `docker run` for one instance (attached: it runs as long as the container does).
pub fn run_args(launch: &Launch, c: &DockerApp, name: &str, state: &str) -> Vec<String> {
    run_args_as(launch, c, name, state, false)
}

/// The arguments of `docker run` for one instance, attached or detached (`-d`, for an engine on another host).
/// The container port is published on the instance's address: 127.0.0.1 here, the host's address on a host.
pub fn run_args_as(launch: &Launch, c: &DockerApp, name: &str, state: &str, detached: bool) -> Vec<String> {
    let mut a: Vec<String> =
        ["run", "--name", name, "--pull", "never", "--restart", "no"].iter().map(|s| s.to_string()).collect();
    a.push(if detached { "--detach".into() } else { "--sig-proxy=false".into() });
    a.push("--stop-timeout".into());
    a.push(launch.stop_grace.as_secs_f64().ceil().to_string());
    let labels = [
        ("nonstop.service".to_string(), launch.service.clone()),
        ("nonstop.version".to_string(), launch.version.clone()),
        ("nonstop.instance".to_string(), launch.instance.to_string()),
        ("nonstop.state".to_string(), state.to_string()),
    ];
    for (k, v) in labels.iter().chain(&c.labels) {
        a.push("--label".into());
        a.push(format!("{k}={v}"));
    }
    a.push("--publish".into());
    a.push(format!("{}:{}/tcp", launch.addr, c.container_port));
    for (k, v) in &launch.env {
        a.push("--env".into());
        a.push(format!("{k}={v}"));
    }
    for v in &c.volumes {
        a.push("--volume".into());
        a.push(v.clone());
    }
    a.push(c.image.clone());
    a.extend(c.args.iter().cloned());
    a
}

/// Records the stopped containers of `version`, replaced by a successful deploy, and returns those to remove now:
/// the kept ones of the version that serves again (`now`) and of `version` before, and the oldest versions past
/// `keep` (at least 1, so the version just replaced, the last known good one, always stays).
pub fn keep(
    kept: &mut Vec<(String, Vec<String>)>,
    version: &str,
    containers: Vec<String>,
    now: &str,
    keep: usize,
) -> Vec<String> {
    let mut remove = Vec::new();
    kept.retain_mut(|(v, names)| {
        let stale = v == version || v == now;
        if stale {
            remove.append(names);
        }
        !stale
    });
    kept.push((version.to_string(), containers));
    while kept.len() > keep.max(1) {
        remove.extend(kept.remove(0).1);
    }
    remove
}

/// `docker rm -f -v` of these containers; failures are logged.
async fn remove(names: &[String]) {
    if names.is_empty() {
        return;
    }
    match tokio::process::Command::new("docker").args(["rm", "-f", "-v"]).args(names).output().await {
        Ok(out) if out.status.success() => tracing::info!(containers = ?names, "containers removed"),
        Ok(out) => {
            tracing::warn!(containers = ?names, error = %String::from_utf8_lossy(&out.stderr).trim(), "docker rm failed")
        }
        Err(e) => tracing::warn!(containers = ?names, error = %e, "docker rm could not run"),
    }
}

/// Runs `docker ARGS` in the background (its result is seen through the container's exit).
fn background(args: &[&str]) {
    let spawned = tokio::process::Command::new("docker")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Err(e) = spawned {
        tracing::warn!(?args, error = %e, "docker could not run");
    }
}

impl Driver for DockerDriver {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn start(&self, launch: &Launch) -> Result<Box<dyn Process>, DriverError> {
        let c = launch.container.as_ref().ok_or(DriverError::NoImage)?;
        self.keep_versions.store(c.keep_versions, Relaxed);
        let name = container_name(&launch.service, launch.instance, &launch.version);
        let args = run_args(launch, c, &name, &self.state);
        let mut cmd = tokio::process::Command::new("docker");
        cmd.args(&args).stdin(std::process::Stdio::null());
        let (out, err) = output(&launch.log)?;
        cmd.stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .map_err(|source| DriverError::Spawn { command: format!("docker {}", args.join(" ")), source })?;
        let pid = child.id().unwrap_or(0);
        Ok(Box::new(Container {
            child,
            pid,
            name,
            grace: launch.stop_grace.as_secs_f64().ceil().to_string(),
            stopping: Arc::new(AtomicBool::new(false)),
        }))
    }

    fn retired(&self, version: &str, containers: Vec<String>, replaced_by: Option<&str>) -> Pending<'_> {
        let gone = match replaced_by {
            Some(now) => {
                let mut kept = self.kept.lock().expect("kept lock");
                keep(&mut kept, version, containers, now, self.keep_versions.load(Relaxed) as usize)
            }
            None => containers,
        };
        Box::pin(async move { remove(&gone).await })
    }

    fn shutdown(&self) -> Pending<'_> {
        let all: Vec<String> = self.kept.lock().expect("kept lock").drain(..).flat_map(|(_, names)| names).collect();
        Box::pin(async move { remove(&all).await })
    }
}

/// One container, seen through its attached `docker run`.
struct Container {
    child: tokio::process::Child,
    pid: u32,
    name: String,
    /// `docker stop --time`, whole seconds.
    grace: String,
    /// Asked to stop: its exit is no crash, and it is kept until the deployer says what to do with it.
    stopping: Arc<AtomicBool>,
}

impl Process for Container {
    fn id(&self) -> u32 {
        self.pid
    }

    fn terminate(&self) {
        self.stopping.store(true, Relaxed);
        background(&["stop", "--time", &self.grace, &self.name]);
    }

    fn kill(&self) {
        self.stopping.store(true, Relaxed);
        background(&["kill", "--signal", "KILL", &self.name]);
    }

    fn wait(&mut self) -> Pin<Box<dyn std::future::Future<Output = String> + Send + '_>> {
        Box::pin(async move {
            let how = match self.child.wait().await {
                Ok(status) => describe(status),
                Err(e) => format!("cannot wait for docker run: {e}"),
            };
            if !self.stopping.load(Relaxed) {
                // A crash: its output is in the instance log; the supervisor starts a new one under this name.
                remove(std::slice::from_ref(&self.name)).await;
            }
            how
        })
    }

    fn container(&self) -> Option<String> {
        Some(self.name.clone())
    }
}

/// How a container's exit code reads: 128 + n is a signal.
pub fn describe_code(code: i64) -> String {
    if code > 128 && code < 160 {
        format!("exit status {code} (killed by signal {})", code - 128)
    } else {
        format!("exit status {code}")
    }
}

/// How `docker run` ended: 125 is the engine's own failure (no such image, a port taken), 128 + n a signal.
fn describe(status: std::process::ExitStatus) -> String {
    match status.code() {
        Some(125) => "exit status 125 (docker could not run the container: see the instance log)".into(),
        Some(c) if c > 128 && c < 160 => format!("exit status {c} (killed by signal {})", c - 128),
        _ => crate::driver::describe(status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn kept_versions_are_bounded_and_the_last_replaced_one_stays() {
        let mut kept = Vec::new();
        let n = |s: &str| vec![s.to_string()];
        assert!(keep(&mut kept, "v1", n("c1"), "v2", 2).is_empty());
        assert!(keep(&mut kept, "v2", n("c2"), "v3", 2).is_empty());
        // A third replaced version pushes out the oldest.
        assert_eq!(keep(&mut kept, "v3", n("c3"), "v4", 2), ["c1"]);
        assert_eq!(kept.iter().map(|(v, _)| v.as_str()).collect::<Vec<_>>(), ["v2", "v3"]);
        // Back to v2: its kept containers are stale (fresh ones serve), v4's are kept.
        assert_eq!(keep(&mut kept, "v4", n("c4"), "v2", 2), ["c2"]);
        assert_eq!(kept.iter().map(|(v, _)| v.as_str()).collect::<Vec<_>>(), ["v3", "v4"]);
        // keep 0 is taken as 1: the version just replaced is never removed.
        assert_eq!(keep(&mut kept, "v5", n("c5"), "v6", 0), ["c3", "c4"]);
        assert_eq!(kept, [("v5".to_string(), n("c5"))]);
    }

    #[test]
    fn run_args_name_label_and_publish_on_loopback_only() {
        let launch = Launch {
            command: String::new(),
            env: vec![("PORT".into(), "9001".into())],
            dir: None,
            log: None,
            service: "web".into(),
            version: "v2+b".into(),
            instance: 7,
            addr: "127.0.0.1:9105".parse().unwrap(),
            stop_grace: Duration::from_millis(2500),
            container: None,
            host: None,
            pid: Default::default(),
        };
        let c = DockerApp {
            image: "nonstop-app:v2".into(),
            args: vec!["app".into(), "--workers".into(), "4".into()],
            container_port: 9001,
            volumes: vec!["/srv:/data".into()],
            labels: vec![("nonstop.test".into(), "1".into())],
            keep_versions: 2,
            hosts: Vec::new(),
        };
        let name = container_name(&launch.service, launch.instance, &launch.version);
        assert_eq!(name, "nonstop-web-7-v2_b");
        let a = run_args(&launch, &c, &name, "/state").join(" ");
        for want in [
            "run --name nonstop-web-7-v2_b --pull never --restart no --sig-proxy=false",
            "--stop-timeout 3",
            "--label nonstop.service=web --label nonstop.version=v2+b --label nonstop.instance=7 --label nonstop.state=/state --label nonstop.test=1",
            "--publish 127.0.0.1:9105:9001/tcp",
            "--env PORT=9001",
            "--volume /srv:/data nonstop-app:v2 app --workers 4",
        ] {
            assert!(a.contains(want), "{want:?} not in {a:?}");
        }
        assert!(!a.contains("-d "), "attached, not detached: {a}");
    }
}
