//! SSH hosts for nonstop's deployers: the key pair (`keys`), strict host-key trust against nonstop's own
//! known_hosts file (`known`, no trust on first use), `hosts check`, which logs in to every host in parallel
//! over one connection each (`session`) and judges what it found (`check`, pure), and the SSH process driver
//! (`driver`), which runs a service's instances on hosts over one kept connection each (`link`) with the shell
//! scripts of `remote` (pure), and the Docker driver on hosts (`docker`), which ships images with no registry.

pub mod check;
pub mod docker;
pub mod driver;
pub mod keys;
pub mod known;
pub mod link;
pub mod remote;
pub mod session;

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nonstop_config::Host;
use russh::keys::PrivateKey;
use tokio::sync::Semaphore;

pub use check::{failure, report, Probe, Reach};
pub use known::{fingerprint, host_pattern, KeyStatus, KnownHosts};

/// `state_dir/ssh`: the key pair and the known_hosts file.
pub fn ssh_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("ssh")
}

/// `state_dir/ssh/known_hosts`.
pub fn known_hosts_path(state_dir: &Path) -> PathBuf {
    ssh_dir(state_dir).join("known_hosts")
}

/// A failure of the hosts commands outside any one host's check.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {source}", path.display())]
    KnownHosts { path: PathBuf, source: known::KnownHostsError },
    #[error("host {host}: {message}")]
    Host { host: String, message: String },
}

fn read_known_text(path: &Path) -> Result<String, HostsError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(HostsError::Io { path: path.to_path_buf(), source }),
    }
}

/// Reads the known_hosts file (absent: nothing is pinned).
pub fn load_known(path: &Path) -> Result<KnownHosts, HostsError> {
    KnownHosts::parse(&read_known_text(path)?)
        .map_err(|source| HostsError::KnownHosts { path: path.to_path_buf(), source })
}

/// What `hosts trust` did for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trusted {
    pub key: check::OfferedKey,
    /// What was pinned before: [`KeyStatus::Pinned`] (nothing to do), unknown, or the replaced keys.
    pub before: KeyStatus,
}

/// Connects to `host`, learns its key and pins it in the known_hosts file at `path` (made 0600 in a 0700
/// directory), replacing any other key pinned for it.
pub async fn trust(host: &Host, path: &Path) -> Result<Trusted, HostsError> {
    let key =
        session::offered_key(host).await.map_err(|message| HostsError::Host { host: host.name.clone(), message })?;
    let pattern = host_pattern(&host.host, host.port);
    let text = read_known_text(path)?;
    let before = KnownHosts::parse(&text)
        .map_err(|source| HostsError::KnownHosts { path: path.to_path_buf(), source })?
        .status(&pattern, &key);
    if before != KeyStatus::Pinned {
        write_known(path, &known::pin(&text, &pattern, &key))?;
    }
    let key = check::OfferedKey { algorithm: key.algorithm().to_string(), fingerprint: fingerprint(&key) };
    Ok(Trusted { key, before })
}

fn write_known(path: &Path, text: &str) -> Result<(), HostsError> {
    let io = |source| HostsError::Io { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
    std::io::Write::write_all(&mut f, text.as_bytes()).and_then(|()| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Checks every host at once, each over one connection, with at most the smallest max_startups of the hosts
/// handshakes in progress at a time; each host costs at most its own connect_timeout_ms to reach. The probes
/// come back in the order of `hosts`.
pub async fn check_all(hosts: &[Host], known: KnownHosts) -> Vec<Probe> {
    let known = Arc::new(known);
    let startups = Arc::new(Semaphore::new(hosts.iter().map(|h| h.max_startups as usize).min().unwrap_or(1)));
    let mut identities: BTreeMap<PathBuf, Result<Arc<PrivateKey>, String>> = BTreeMap::new();
    for h in hosts {
        identities.entry(h.identity.clone()).or_insert_with(|| {
            russh::keys::load_secret_key(&h.identity, None).map(Arc::new).map_err(|e| {
                format!("cannot read the identity {}: {e} (make it with nonstop keys init)", h.identity.display())
            })
        });
    }
    let tasks: Vec<_> = hosts
        .iter()
        .map(|h| {
            let (h, known, startups) = (h.clone(), known.clone(), startups.clone());
            let identity = identities[&h.identity].clone();
            tokio::spawn(async move { check_one(h, known, identity, startups).await })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for (t, h) in tasks.into_iter().zip(hosts) {
        out.push(t.await.unwrap_or_else(|e| probe_of(h, None, Reach::Handshake(format!("check panicked: {e}")))));
    }
    out
}

fn probe_of(h: &Host, key: Option<check::OfferedKey>, reach: Reach) -> Probe {
    Probe {
        name: h.name.clone(),
        address: format!("{}:{}", h.host, h.port),
        user: h.user.clone(),
        dir: h.dir.clone(),
        key,
        reach,
    }
}

async fn check_one(
    h: Host,
    known: Arc<KnownHosts>,
    identity: Result<Arc<PrivateKey>, String>,
    startups: Arc<Semaphore>,
) -> Probe {
    let identity = match identity {
        Ok(i) => i,
        Err(e) => return probe_of(&h, None, Reach::Handshake(e)),
    };
    let (key, conn) = {
        let _handshake = startups.acquire().await.expect("semaphore is never closed");
        session::connect(&h, known, identity).await
    };
    let conn = match conn {
        Ok(c) => c,
        Err(reach) => return probe_of(&h, key, reach),
    };
    let dir = match conn.exec(&check::dir_command(&h.dir)).await {
        Ok(o) if o.status == Some(0) => Ok(()),
        Ok(o) => Err(format!(
            "exit status {}{}",
            o.status.map_or("none".to_string(), |s| s.to_string()),
            Some(String::from_utf8_lossy(&o.stderr).trim().to_string())
                .filter(|s| !s.is_empty())
                .map_or(String::new(), |s| format!(": {s}"))
        )),
        Err(e) => Err(e),
    };
    let docker = match conn.exec(check::DOCKER_COMMAND).await {
        Ok(o) if o.status == Some(0) => {
            Some(String::from_utf8_lossy(&o.stdout).trim().to_string()).filter(|v| !v.is_empty())
        }
        _ => None,
    };
    conn.close().await;
    probe_of(&h, key, Reach::LoggedIn { dir, docker })
}
