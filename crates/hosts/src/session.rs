//! The I/O shell: one SSH connection per host (russh), its host key judged by [`crate::known`] during the
//! handshake, public-key authentication with the identity, and commands run on channels of that one connection.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nonstop_config::Host;
use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::ChannelMsg;
use tokio::sync::Semaphore;

use crate::check::{OfferedKey, Reach};
use crate::known::{fingerprint, host_pattern, KeyStatus, KnownHosts};

/// A command run on a host must finish within this long.
pub const COMMAND_TIMEOUT_MS: u64 = 30_000;

/// What the handshake saw of the host's key.
type Seen = Arc<Mutex<Option<(PublicKey, KeyStatus)>>>;

struct Judge {
    known: Arc<KnownHosts>,
    pattern: String,
    seen: Seen,
    /// Only learn the key, never go on (for `hosts trust`).
    probe_only: bool,
}

impl client::Handler for Judge {
    type Error = russh::Error;

    async fn check_server_key(&mut self, offered: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let key = match offered {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(c) => PublicKey::new(c.public_key().clone(), ""),
        };
        let status = self.known.status(&self.pattern, &key);
        let accept = status == KeyStatus::Pinned && !self.probe_only;
        *self.seen.lock().expect("seen lock") = Some((key, status));
        Ok(accept)
    }
}

fn offered(key: &PublicKey) -> OfferedKey {
    OfferedKey { algorithm: key.algorithm().to_string(), fingerprint: fingerprint(key) }
}

/// Keepalives of a connection kept open (the SSH driver's): a dead link closes it instead of hanging commands.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval: Duration,
    pub max: usize,
}

fn config() -> Arc<client::Config> {
    config_with(None)
}

fn config_with(keepalive: Option<Keepalive>) -> Arc<client::Config> {
    Arc::new(client::Config {
        nodelay: true,
        keepalive_interval: keepalive.map(|k| k.interval),
        keepalive_max: keepalive.map_or(3, |k| k.max),
        ..Default::default()
    })
}

/// One logged-in connection to a host.
pub struct Connection {
    handle: client::Handle<Judge>,
    /// Channels open at once, at most the host's max_sessions.
    sessions: Semaphore,
}

/// What a command printed and its exit status (`None`: killed by a signal or no status sent).
#[derive(Debug, Clone)]
pub struct Output {
    pub status: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

async fn tcp(host: &Host) -> Result<tokio::net::TcpStream, String> {
    tokio::net::TcpStream::connect((host.host.as_str(), host.port)).await.map_err(|e| e.to_string())
}

fn timed_out(host: &Host) -> String {
    format!("no SSH handshake within connect_timeout_ms ({} ms)", host.connect_timeout.as_millis())
}

/// The key `host` offers, without logging in (the handshake is stopped once the key is seen).
pub async fn offered_key(host: &Host) -> Result<PublicKey, String> {
    let seen: Seen = Arc::default();
    let judge = Judge {
        known: Arc::new(KnownHosts::default()),
        pattern: host_pattern(&host.host, host.port),
        seen: seen.clone(),
        probe_only: true,
    };
    let attempt = async {
        let stream = tcp(host).await?;
        client::connect_stream(config(), stream, judge).await.map(drop).map_err(|e| e.to_string())
    };
    let result = tokio::time::timeout(host.connect_timeout, attempt).await;
    if let Some((key, _)) = seen.lock().expect("seen lock").take() {
        return Ok(key);
    }
    match result {
        Err(_) => Err(timed_out(host)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) => Err("the host offered no key".into()),
    }
}

/// Connects, judges the host's key against `known` and logs in with `identity`, all within the host's
/// connect_timeout_ms. On failure, how far it got; the offered key whenever it was seen.
pub async fn connect(
    host: &Host,
    known: Arc<KnownHosts>,
    identity: Arc<PrivateKey>,
) -> (Option<OfferedKey>, Result<Connection, Reach>) {
    connect_with(host, known, identity, None).await
}

/// [`connect`], with keepalives on the connection.
pub async fn connect_with(
    host: &Host,
    known: Arc<KnownHosts>,
    identity: Arc<PrivateKey>,
    keepalive: Option<Keepalive>,
) -> (Option<OfferedKey>, Result<Connection, Reach>) {
    let seen: Seen = Arc::default();
    let judge = Judge { known, pattern: host_pattern(&host.host, host.port), seen: seen.clone(), probe_only: false };
    let attempt = async {
        let stream = tcp(host).await.map_err(Reach::Unreachable)?;
        let mut handle = match client::connect_stream(config_with(keepalive), stream, judge).await {
            Ok(h) => h,
            Err(e) => {
                return Err(match seen.lock().expect("seen lock").as_ref() {
                    Some((_, status)) if *status != KeyStatus::Pinned => Reach::HostKey(status.clone()),
                    Some(_) => Reach::Handshake(e.to_string()),
                    None => Reach::Unreachable(format!("no SSH handshake: {e}")),
                })
            }
        };
        let hash = handle.best_supported_rsa_hash().await.ok().flatten().flatten();
        let auth = handle
            .authenticate_publickey(host.user.clone(), PrivateKeyWithHashAlg::new(identity, hash))
            .await
            .map_err(|e| Reach::Handshake(format!("authentication: {e}")))?;
        if !auth.success() {
            return Err(Reach::AuthRefused);
        }
        Ok(Connection { handle, sessions: Semaphore::new(host.max_sessions as usize) })
    };
    let result = match tokio::time::timeout(host.connect_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(Reach::Unreachable(timed_out(host))),
    };
    let key = seen.lock().expect("seen lock").as_ref().map(|(k, _)| offered(k));
    (key, result)
}

impl Connection {
    /// Whether the connection is gone (closed by either side, or by its keepalives).
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// An error of the connection, saying so when it was lost.
    fn lost(&self, e: russh::Error) -> String {
        if self.handle.is_closed() {
            format!("the SSH connection was lost ({e}: keepalives unanswered, or closed by the host)")
        } else {
            e.to_string()
        }
    }

    /// Runs `command` (by the login user's shell) on a new channel of this connection.
    pub async fn exec(&self, command: &str) -> Result<Output, String> {
        self.exec_input(command, None, Duration::from_millis(COMMAND_TIMEOUT_MS)).await
    }

    /// Runs `command` with `input` streamed to its standard input (then end of file), within `timeout`.
    pub async fn exec_input(
        &self,
        command: &str,
        input: Option<crate::link::Input>,
        timeout: Duration,
    ) -> Result<Output, String> {
        let _slot = self.sessions.acquire().await.map_err(|e| e.to_string())?;
        let lost = |e| self.lost(e);
        let run = async {
            let mut channel = self.handle.channel_open_session().await.map_err(lost)?;
            channel.exec(true, command).await.map_err(lost)?;
            match input {
                None => {}
                Some(crate::link::Input::Bytes(b)) => {
                    channel.data(&b[..]).await.map_err(|e| format!("sending input: {e}"))?;
                }
                Some(crate::link::Input::File(path)) => {
                    let f = tokio::fs::File::open(&path)
                        .await
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                    channel
                        .data(tokio::io::BufReader::with_capacity(256 * 1024, f))
                        .await
                        .map_err(|e| format!("sending {}: {e}", path.display()))?;
                }
            }
            channel.eof().await.map_err(lost)?;
            let mut out = Output { status: None, stdout: Vec::new(), stderr: Vec::new() };
            while let Some(msg) = channel.wait().await {
                match msg {
                    ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
                    ChannelMsg::ExtendedData { data, .. } => out.stderr.extend_from_slice(&data),
                    ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
                    _ => {}
                }
            }
            if out.status.is_none() && self.handle.is_closed() {
                return Err("the SSH connection was lost (keepalives unanswered, or closed by the host)".to_string());
            }
            Ok(out)
        };
        tokio::time::timeout(timeout, run).await.unwrap_or_else(|_| {
            let first = command.lines().find(|l| !l.trim().is_empty() && l.trim() != "set -e").unwrap_or(command);
            Err(format!("a command ({first:.60}...) did not finish within {} ms", timeout.as_millis()))
        })
    }

    /// Runs `command` with `input` on its standard input (then end of file), sending its output (standard output
    /// and error alike) to `out` as it arrives, until it exits: its exit status (`None`: killed by a signal, or
    /// none sent). No timeout: the caller bounds it (dropping the future closes the channel).
    pub async fn exec_stream(
        &self,
        command: &str,
        input: Vec<u8>,
        out: tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<Option<u32>, String> {
        let _slot = self.sessions.acquire().await.map_err(|e| e.to_string())?;
        let lost = |e| self.lost(e);
        let mut channel = self.handle.channel_open_session().await.map_err(lost)?;
        channel.exec(true, command).await.map_err(lost)?;
        if !input.is_empty() {
            channel.data(&input[..]).await.map_err(|e| format!("sending input: {e}"))?;
        }
        channel.eof().await.map_err(lost)?;
        let mut status = None;
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => {
                    // A reader that went away no longer wants the output; the command still runs to its end.
                    let _ = out.send(data.to_vec()).await;
                }
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                _ => {}
            }
        }
        if status.is_none() && self.handle.is_closed() {
            return Err("the SSH connection was lost (keepalives unanswered, or closed by the host)".to_string());
        }
        Ok(status)
    }

    pub async fn close(self) {
        let _ = self.handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    }
}
