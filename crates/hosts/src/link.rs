//! One host as the SSH driver reaches it: a single connection, made when first needed and made again after it
//! broke, judged against the known_hosts file as it is at that moment (so `nonstop hosts trust` applies without a
//! restart), with at most max_startups handshakes at once. Every error names the host.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nonstop_config::Host;
use tokio::sync::{Mutex, Semaphore};

use crate::check::{failure, Probe};
use crate::session::{self, Connection, Output};

/// An SSH connection sends a keepalive after this long with nothing received...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// ...and is closed when this many went unanswered: a dead link is noticed within about 4 s.
const KEEPALIVE_MAX: usize = 3;

pub struct Link {
    pub host: Host,
    known_path: PathBuf,
    conn: Mutex<Option<Arc<Connection>>>,
    startups: Semaphore,
}

impl Link {
    pub fn new(host: Host, known_path: PathBuf) -> Link {
        let startups = Semaphore::new(host.max_startups as usize);
        Link { host, known_path, conn: Mutex::new(None), startups }
    }

    /// "host web1 (10.0.0.5:22)", for messages.
    pub fn label(&self) -> String {
        format!("host {} ({}:{})", self.host.name, self.host.host, self.host.port)
    }

    fn fail(&self, why: impl std::fmt::Display) -> String {
        format!("{}: {why}", self.label())
    }

    /// The connection, made now if there is none or it broke (within the host's connect_timeout_ms).
    pub async fn connection(&self) -> Result<Arc<Connection>, String> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        *slot = None;
        let known = crate::load_known(&self.known_path).map_err(|e| self.fail(e))?;
        let identity = russh::keys::load_secret_key(&self.host.identity, None).map_err(|e| {
            self.fail(format!(
                "cannot read the identity {}: {e} (make it with nonstop keys init)",
                self.host.identity.display()
            ))
        })?;
        let _handshake = self.startups.acquire().await.map_err(|e| self.fail(e))?;
        let keepalive = session::Keepalive { interval: KEEPALIVE_INTERVAL, max: KEEPALIVE_MAX };
        let (key, conn) = session::connect_with(&self.host, Arc::new(known), Arc::new(identity), Some(keepalive)).await;
        match conn {
            Ok(c) => {
                let c = Arc::new(c);
                *slot = Some(c.clone());
                Ok(c)
            }
            Err(reach) => {
                let probe = Probe {
                    name: self.host.name.clone(),
                    address: format!("{}:{}", self.host.host, self.host.port),
                    user: self.host.user.clone(),
                    dir: self.host.dir.clone(),
                    key,
                    reach,
                };
                Err(self.fail(failure(&probe).unwrap_or_else(|| "cannot log in".into())))
            }
        }
    }

    /// Forgets the connection (after a command on it failed): the next command connects again.
    pub async fn broken(&self, c: &Arc<Connection>) {
        let mut slot = self.conn.lock().await;
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, c)) {
            *slot = None;
        }
    }

    /// Runs `command` with `input` on its standard input, within `timeout`. A failure of the connection itself
    /// (not the command's exit status) drops it.
    pub async fn run(&self, command: &str, input: Option<Input>, timeout: Duration) -> Result<Output, String> {
        let c = self.connection().await?;
        match c.exec_input(command, input, timeout).await {
            Ok(o) => Ok(o),
            Err(e) => {
                self.broken(&c).await;
                Err(self.fail(e))
            }
        }
    }

    /// Like [`Link::run`], but a non-zero exit status is an error too, with the command's standard error.
    pub async fn run_ok(
        &self,
        what: &str,
        command: &str,
        input: Option<Input>,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        let o = self.run(command, input, timeout).await?;
        if o.status == Some(0) {
            return Ok(o.stdout);
        }
        let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
        Err(self.fail(format!(
            "{what} failed (exit status {}){}",
            o.status.map_or("none".to_string(), |s| s.to_string()),
            if err.is_empty() { String::new() } else { format!(": {err}") }
        )))
    }

    /// Runs `command` with `input` on its standard input, its output sent to `out` as it arrives (see
    /// [`Connection::exec_stream`]). A failure of the connection drops it.
    pub async fn stream(
        &self,
        command: &str,
        input: Vec<u8>,
        out: tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<Option<u32>, String> {
        let c = self.connection().await?;
        match c.exec_stream(command, input, out).await {
            Ok(status) => Ok(status),
            Err(e) => {
                self.broken(&c).await;
                Err(self.fail(e))
            }
        }
    }

    pub async fn close(&self) {
        if let Some(c) = self.conn.lock().await.take() {
            if let Ok(c) = Arc::try_unwrap(c) {
                c.close().await;
            }
        }
    }
}

/// What a command reads on its standard input.
pub enum Input {
    Bytes(Vec<u8>),
    File(PathBuf),
}
