//! Drivers start and stop one instance of an app. The local-process driver runs the command with `sh -c exec`;
//! the Docker driver ([`crate::docker`]) runs a container; the SSH driver (in `nonstop-hosts`) runs processes on
//! other machines. A driver also says where instances may run ([`Driver::places`]), prepares a version there
//! before a deploy starts it ([`Driver::prepare`], the release shipped to SSH hosts) and fetches an instance's log.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;

use nonstop_config::DockerApp;

/// A future a driver returns, boxed (the trait is object safe).
pub type Pending<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A boxed future with a result.
pub type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A machine the instances of a service run on, `count` of them on each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// `None`: this machine (the process and docker drivers); otherwise the `[hosts.NAME]` name.
    pub host: Option<String>,
    /// The address instances listen on there, which the proxy connects to.
    pub ip: IpAddr,
}

impl Place {
    /// This machine, at 127.0.0.1.
    pub fn local() -> Place {
        Place { host: None, ip: IpAddr::V4(Ipv4Addr::LOCALHOST) }
    }
}

/// How a version was made ready on one place before its instances start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub host: Option<String>,
    /// What was made ready: "release", "image".
    pub what: &'static str,
    /// `Ok(None)`: nothing to do (already there); `Ok(Some(bytes))`: shipped; `Err`: why not, the host named.
    pub result: Result<Option<u64>, String>,
    pub ms: u64,
}

/// An instance's log, as the deployer names it.
#[derive(Debug, Clone)]
pub struct LogRef {
    pub service: String,
    pub instance: u64,
    pub host: Option<String>,
    /// The log on this machine (process and docker drivers).
    pub local: PathBuf,
}

/// What one instance runs: the command with its placeholders already replaced.
#[derive(Debug, Clone)]
pub struct Launch {
    pub command: String,
    pub env: Vec<(String, String)>,
    pub dir: Option<PathBuf>,
    /// Where its standard output and error go (appended); `None` discards them.
    pub log: Option<PathBuf>,
    /// Who it is: the docker driver names, labels and publishes the container from these.
    pub service: String,
    pub version: String,
    pub instance: u64,
    /// Where the proxy reaches it (127.0.0.1 and the port the deployer chose).
    pub addr: SocketAddr,
    /// How long a stop may take before SIGKILL.
    pub stop_grace: Duration,
    /// The docker driver's part of the app section, with `{version}` and `{instance}` filled in.
    pub container: Option<DockerApp>,
    /// The `[hosts.NAME]` it runs on (the ssh driver).
    pub host: Option<String>,
    /// Where a driver that learns the process id later (the ssh driver) puts it, for `nonstop status`.
    pub pid: Arc<AtomicU32>,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot open the instance log {0}: {1}")]
    Log(PathBuf, std::io::Error),
    #[error("cannot start {command:?}: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("the docker driver needs the app section's image")]
    NoImage,
}

/// A running instance.
pub trait Process: Send {
    /// The OS process id, or another identifier for logs.
    fn id(&self) -> u32;
    /// Asks it to stop (SIGTERM for a process).
    fn terminate(&self);
    /// Stops it now (SIGKILL).
    fn kill(&self);
    /// Resolves when it exited, with how (for example "exit status 1" or "killed by signal 9").
    fn wait(&mut self) -> Pin<Box<dyn Future<Output = String> + Send + '_>>;
    /// The container's name, for a driver that runs containers.
    fn container(&self) -> Option<String> {
        None
    }
}

pub trait Driver: Send + Sync {
    /// "process", "docker", "ssh": shown by `nonstop status`.
    fn kind(&self) -> &'static str;
    /// Where instances run: `count` on each place, in this order. The local drivers run on this machine only.
    fn places(&self) -> Vec<Place> {
        vec![Place::local()]
    }
    /// Makes `version` ready on every place, all at once (the ssh driver ships its release); one result per place.
    fn prepare(&self, _version: &str) -> Boxed<'_, Vec<Prepared>> {
        Box::pin(async { Vec::new() })
    }
    /// The last `bytes_max` bytes of an instance's output.
    fn logs(&self, log: &LogRef, bytes_max: u64) -> Boxed<'_, Result<Vec<u8>, String>> {
        let path = log.local.clone();
        Box::pin(async move { tail_file(&path, bytes_max) })
    }
    fn start(&self, launch: &Launch) -> Result<Box<dyn Process>, DriverError>;
    /// Instances of `version` were stopped for good; `containers` are their [`Process::container`] names.
    /// `replaced_by`: the version a successful deploy put in its place, so what they leave behind may be kept
    /// (within the driver's limit); `None` (a failed deploy's instances, a shutdown): it is removed.
    fn retired(&self, _version: &str, _containers: Vec<String>, _replaced_by: Option<&str>) -> Pending<'_> {
        Box::pin(async {})
    }
    /// The proxy shuts down, every instance is stopped: remove whatever is left.
    fn shutdown(&self) -> Pending<'_> {
        Box::pin(async {})
    }
}

/// Runs instances as child processes of the proxy.
pub struct LocalDriver;

struct LocalProcess {
    child: tokio::process::Child,
    pid: u32,
}

impl Driver for LocalDriver {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn start(&self, launch: &Launch) -> Result<Box<dyn Process>, DriverError> {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c").arg(format!("exec {}", launch.command));
        cmd.envs(launch.env.iter().map(|(k, v)| (k, v)));
        if let Some(d) = &launch.dir {
            cmd.current_dir(d);
        }
        cmd.stdin(std::process::Stdio::null());
        let (out, err) = output(&launch.log)?;
        cmd.stdout(out).stderr(err);
        cmd.kill_on_drop(true);
        // SAFETY: prctl and getppid are async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                // The instance dies with the proxy, even when the proxy is killed with SIGKILL.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| DriverError::Spawn { command: launch.command.clone(), source })?;
        let pid = child.id().unwrap_or(0);
        Ok(Box::new(LocalProcess { child, pid }))
    }
}

impl Process for LocalProcess {
    fn id(&self) -> u32 {
        self.pid
    }

    fn terminate(&self) {
        signal(self.pid, libc::SIGTERM);
    }

    fn kill(&self) {
        signal(self.pid, libc::SIGKILL);
    }

    fn wait(&mut self) -> Pin<Box<dyn Future<Output = String> + Send + '_>> {
        Box::pin(async move {
            match self.child.wait().await {
                Ok(status) => describe(status),
                Err(e) => format!("cannot wait for it: {e}"),
            }
        })
    }
}

/// The last `bytes_max` bytes of a file.
pub fn tail_file(path: &Path, bytes_max: u64) -> Result<Vec<u8>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let len = f.metadata().map_err(|e| format!("{}: {e}", path.display()))?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(bytes_max))).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    f.take(bytes_max).read_to_end(&mut out).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(out)
}

/// Standard output and error for an instance: appended to its log, or discarded.
pub(crate) fn output(log: &Option<PathBuf>) -> Result<(std::process::Stdio, std::process::Stdio), DriverError> {
    use std::process::Stdio;
    match log {
        Some(path) => {
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| DriverError::Log(path.clone(), e))?;
            let err = out.try_clone().map_err(|e| DriverError::Log(path.clone(), e))?;
            Ok((Stdio::from(out), Stdio::from(err)))
        }
        None => Ok((Stdio::null(), Stdio::null())),
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if pid > 0 {
        // SAFETY: kill has no memory effects; the pid is our own child's (reaped only by wait).
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

pub(crate) fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}
