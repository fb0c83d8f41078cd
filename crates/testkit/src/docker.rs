//! The machine's real Docker engine for tests: images built by `scripts/image`, and containers that are removed
//! when their handle drops, so a failing test leaves none behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Label on every container the tests start, so that leftovers of a killed test run can be found and removed.
pub const LABEL: &str = "nonstop.test";

fn run(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().unwrap_or_else(|e| {
        panic!("the Docker CLI could not be run ({e}): the container tests need a Docker engine (see .ci/run)")
    })
}

/// Runs `docker ARGS` and returns its standard output, trimmed; panics with its standard error on failure.
pub fn docker(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "docker {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Panics with a clear message unless the Docker engine answers.
pub fn require_engine() {
    let out = run(&["version", "--format", "{{.Server.Version}}"]);
    assert!(
        out.status.success(),
        "the Docker engine does not answer (docker version): the container tests need it; start dockerd \
         (.ci/run checks it). {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

/// A local image of the project's binary, built by `scripts/image VERSION` from `bin`; the tag is removed on
/// drop (the layers stay in the build cache, so the next build of the same binary is cheap).
pub struct Image {
    pub tag: String,
}

impl Image {
    pub fn build(bin: &Path, version: &str) -> Image {
        require_engine();
        // One build at a time: two at once each make their own copy of a layer the other would have found in the
        // build cache, and later builds then pick either copy as their parent.
        static BUILDS: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = BUILDS.lock().unwrap_or_else(|e| e.into_inner());
        let out = Command::new(repo_root().join("scripts/image"))
            .arg(version)
            .env("NONSTOP", bin)
            .output()
            .expect("run scripts/image");
        assert!(
            out.status.success(),
            "scripts/image {version} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let tag = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim().to_string();
        assert_eq!(tag, format!("nonstop-app:{version}"), "scripts/image printed its tag last");
        Image { tag }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = run(&["rmi", &self.tag]);
    }
}

/// A running container, removed (`docker rm -f`) when dropped.
pub struct Container {
    pub id: String,
    pub name: String,
}

impl Container {
    /// `docker run -d` of `image` with `args` for the image's entry point, named uniquely from `tag`, labelled
    /// [`LABEL`], and with `extra` options before the image (such as `-p 127.0.0.1::9001`).
    pub fn run(image: &str, tag: &str, extra: &[&str], args: &[&str]) -> Container {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("nonstop-test-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let label = format!("{LABEL}={}", std::process::id());
        let mut all = vec!["run", "-d", "--name", &name, "--label", &label];
        all.extend_from_slice(extra);
        all.push(image);
        all.extend_from_slice(args);
        let id = docker(&all);
        Container { id, name }
    }

    /// The loopback address that the container's `port`/tcp is published on.
    pub fn published(&self, port: u16) -> SocketAddr {
        let out = docker(&["port", &self.id, &format!("{port}/tcp")]);
        let line = out
            .lines()
            .find(|l| l.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| panic!("port {port} of {} is not published on 127.0.0.1: {out:?}", self.name));
        line.parse().unwrap_or_else(|e| panic!("bad published address {line:?}: {e}"))
    }

    /// The container's own address on Docker's default bridge network.
    pub fn bridge_ip(&self) -> String {
        docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &self.id])
    }

    /// Whether the container is running, from `docker inspect`.
    pub fn running(&self) -> bool {
        docker(&["inspect", "-f", "{{.State.Running}}", &self.id]) == "true"
    }

    /// The container's output so far (stdout and stderr), for failure messages.
    pub fn logs(&self) -> String {
        let out = run(&["logs", &self.id]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = run(&["rm", "-f", "-v", &self.id]);
    }
}
