//! A Docker engine of its own for a test host: Debian's `dockerd` run in the host's network namespace (entered with
//! `nsenter --net`, so that it keeps the machine's cgroup mounts), with its own data root, exec root, socket and
//! bridge, so that images must be shipped to it and containers publish ports on the host's address. The guard
//! stops the engine and removes everything it stored.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// One engine; `DOCKER_HOST` for it is [`Engine::docker_host`].
pub struct Engine {
    dir: PathBuf,
    child: Option<Child>,
}

impl Engine {
    /// Starts an engine in the network namespace `ns` and waits until it answers.
    pub fn start_in(ns: &str) -> Engine {
        static N: AtomicUsize = AtomicUsize::new(0);
        // Short: the engine's own containerd socket lives under it, and a socket path has at most 107 bytes.
        let dir = PathBuf::from(format!("/tmp/nsd-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("engine directory");
        // The machine's engine config names its data root: this one gets an empty config and its own roots, and
        // the machine's storage driver.
        std::fs::write(dir.join("daemon.json"), "{}\n").expect("daemon.json");
        let driver = crate::docker::docker(&["info", "--format", "{{.Driver}}"]);
        let log = std::fs::File::create(dir.join("dockerd.log")).expect("dockerd.log");
        let d = dir.display();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("dockerd")
            .args(["--config-file", &format!("{d}/daemon.json"), "--data-root", &format!("{d}/data")])
            .args(["--exec-root", &format!("{d}/exec"), "--pidfile", &format!("{d}/dockerd.pid")])
            .args(["--host", &format!("unix://{d}/docker.sock"), "--storage-driver", &driver])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dockerd (Debian's docker.io) with nsenter (util-linux)");
        let mut e = Engine { dir, child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = Command::new("docker")
                .args(["--host", &e.docker_host(), "version", "--format", "{{.Server.Version}}"])
                .output()
                .is_ok_and(|o| o.status.success());
            if up {
                break;
            }
            if let Some(status) = e.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("dockerd in {ns} exited ({status}): {}", e.log());
            }
            assert!(Instant::now() < deadline, "dockerd in {ns} does not answer after 60 s: {}", e.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        e
    }

    /// `unix:///...`: the engine's socket.
    pub fn docker_host(&self) -> String {
        format!("unix://{}/docker.sock", self.dir.display())
    }

    /// Runs the Docker CLI against this engine; its standard output, trimmed (panics when it fails).
    pub fn docker(&self, args: &[&str]) -> String {
        let host = self.docker_host();
        let mut all = vec!["--host", host.as_str()];
        all.extend_from_slice(args);
        crate::docker::docker(&all)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM: the engine stops its containers and its containerd, and unmounts their file systems.
            // SAFETY: kill(2) of the engine this guard started.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Whatever is still mounted under it (a killed engine's layers), then the files.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let root = self.dir.display().to_string();
            let mut under: Vec<&str> =
                mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|m| m.starts_with(&root)).collect();
            under.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in under {
                let _ = Command::new("umount").args(["-l", m]).output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
