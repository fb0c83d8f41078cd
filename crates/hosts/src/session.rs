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

fn config() -> Arc<client::Config> {
    Arc::new(client::Config { nodelay: true, ..Default::default() })
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
    let seen: Seen = Arc::default();
    let judge = Judge { known, pattern: host_pattern(&host.host, host.port), seen: seen.clone(), probe_only: false };
    let attempt = async {
        let stream = tcp(host).await.map_err(Reach::Unreachable)?;
        let mut handle = match client::connect_stream(config(), stream, judge).await {
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
    /// Runs `command` (by the login user's shell) on a new channel of this connection.
    pub async fn exec(&self, command: &str) -> Result<Output, String> {
        let _slot = self.sessions.acquire().await.map_err(|e| e.to_string())?;
        let run = async {
            let mut channel = self.handle.channel_open_session().await.map_err(|e| e.to_string())?;
            channel.exec(true, command).await.map_err(|e| e.to_string())?;
            let mut out = Output { status: None, stdout: Vec::new(), stderr: Vec::new() };
            while let Some(msg) = channel.wait().await {
                match msg {
                    ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
                    ChannelMsg::ExtendedData { data, .. } => out.stderr.extend_from_slice(&data),
                    ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
                    _ => {}
                }
            }
            Ok(out)
        };
        tokio::time::timeout(Duration::from_millis(COMMAND_TIMEOUT_MS), run)
            .await
            .unwrap_or_else(|_| Err(format!("{command:?} did not finish within {COMMAND_TIMEOUT_MS} ms")))
    }

    pub async fn close(self) {
        let _ = self.handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    }
}
