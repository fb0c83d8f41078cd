//! Drivers start and stop one instance of an app. The local-process driver runs the command with `sh -c exec`;
//! SSH hosts and Docker containers are further implementations of the same trait.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

/// What one instance runs: the command with its placeholders already replaced.
#[derive(Debug, Clone)]
pub struct Launch {
    pub command: String,
    pub env: Vec<(String, String)>,
    pub dir: Option<PathBuf>,
    /// Where its standard output and error go (appended); `None` discards them.
    pub log: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot open the instance log {0}: {1}")]
    Log(PathBuf, std::io::Error),
    #[error("cannot start {command:?}: {source}")]
    Spawn { command: String, source: std::io::Error },
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
}

pub trait Driver: Send + Sync {
    fn start(&self, launch: &Launch) -> Result<Box<dyn Process>, DriverError>;
}

/// Runs instances as child processes of the proxy.
pub struct LocalDriver;

struct LocalProcess {
    child: tokio::process::Child,
    pid: u32,
}

impl Driver for LocalDriver {
    fn start(&self, launch: &Launch) -> Result<Box<dyn Process>, DriverError> {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c").arg(format!("exec {}", launch.command));
        cmd.envs(launch.env.iter().map(|(k, v)| (k, v)));
        if let Some(d) = &launch.dir {
            cmd.current_dir(d);
        }
        cmd.stdin(std::process::Stdio::null());
        match &launch.log {
            Some(path) => {
                let open = || std::fs::OpenOptions::new().create(true).append(true).open(path);
                let out = open().map_err(|e| DriverError::Log(path.clone(), e))?;
                let err = out.try_clone().map_err(|e| DriverError::Log(path.clone(), e))?;
                cmd.stdout(out).stderr(err);
            }
            None => {
                cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
            }
        }
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

fn signal(pid: u32, sig: libc::c_int) {
    if pid > 0 {
        // SAFETY: kill has no memory effects; the pid is our own child's (reaped only by wait).
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}
