//! Running one shell command of a step: `sh -c` in a process group of its own, its output merged, masked, capped
//! and streamed line by line; a timeout or a cancel ends the whole group (SIGTERM, then SIGKILL).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{broadcast, watch};

use crate::mask::Masker;

/// How long a process group has between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);
/// Longest line kept; the rest of a longer one is dropped.
const LINE_BYTES_MAX: usize = 16 * 1024;
/// How long output may keep flowing after the command exited (from what it left running), before the group is
/// killed.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// The live lines of one run, and the lock that orders them against followers reading the stored ones.
pub struct Live {
    pub lock: Mutex<()>,
    pub tx: broadcast::Sender<String>,
}

impl Live {
    pub fn new() -> Arc<Live> {
        Arc::new(Live { lock: Mutex::new(()), tx: broadcast::channel(4096).0 })
    }
}

/// Where one step's output goes: its log file (within a byte cap) and the live followers.
pub struct Sink {
    file: Option<std::fs::File>,
    pub path: PathBuf,
    pub written: u64,
    pub dropped: u64,
    cap: u64,
    masker: Arc<Masker>,
    live: Arc<Live>,
    stage: String,
    name: String,
}

impl Sink {
    pub fn open(
        path: PathBuf,
        cap: u64,
        masker: Arc<Masker>,
        live: Arc<Live>,
        stage: &str,
        name: &str,
    ) -> std::io::Result<Sink> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Sink {
            file: Some(file),
            path,
            written,
            dropped: 0,
            cap,
            masker,
            live,
            stage: stage.into(),
            name: name.into(),
        })
    }

    /// One line of output (without its newline): masked, then stored within the cap and sent to followers.
    pub fn line(&mut self, raw: &str) {
        let line = self.masker.mask(raw);
        let _order = self.live.lock.lock().expect("live lock");
        let bytes = line.len() as u64 + 1;
        if self.written + bytes <= self.cap {
            if let Some(f) = &mut self.file {
                if f.write_all(format!("{line}\n").as_bytes()).is_err() {
                    self.file = None;
                }
            }
            self.written += bytes;
        } else {
            if self.dropped == 0 {
                let note = format!("[nonstop: log_bytes_max ({} bytes) reached; the rest is not stored]\n", self.cap);
                if let Some(f) = &mut self.file {
                    let _ = f.write_all(note.as_bytes());
                }
            }
            self.dropped += bytes;
        }
        let event = serde_json::json!({ "stage": self.stage, "name": self.name, "line": line });
        let _ = self.live.tx.send(event.to_string());
    }
}

/// Why a run is being stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// By an operator or the concurrency policy; the text says which.
    Cancel(String),
    /// The run's `timeout_ms` passed.
    Timeout,
    /// `nonstop serve` is shutting down: the run ends interrupted.
    Shutdown,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    /// Killed by a signal it did not ask for.
    Signalled(i32),
    TimedOut,
    Cancelled,
    /// It could not be started.
    NotStarted(String),
    /// Its end was not seen: the SSH connection to its host was lost, or the host sent no exit status.
    Lost(String),
}

impl Ended {
    pub fn ok(&self) -> bool {
        *self == Ended::Exited(0)
    }

    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Ended::Exited(c) => Some(*c),
            _ => None,
        }
    }

    pub fn describe(&self, timeout: Duration) -> String {
        match self {
            Ended::Exited(0) => "exited 0".into(),
            Ended::Exited(c) => format!("exited {c}"),
            Ended::Signalled(s) => format!("killed by signal {s}"),
            Ended::TimedOut => format!("timed out after {} ms", timeout.as_millis()),
            Ended::Cancelled => "cancelled".into(),
            Ended::NotStarted(e) => format!("could not start: {e}"),
            Ended::Lost(e) => e.clone(),
        }
    }
}

/// Waits for `cancel` to turn true; why it did.
pub async fn stop_reason(cancel: &mut watch::Receiver<Option<Stop>>) -> String {
    match cancel.wait_for(|c| c.is_some()).await.as_deref() {
        Ok(Some(Stop::Cancel(why))) => why.clone(),
        Ok(Some(Stop::Timeout)) => "the run timed out".into(),
        Ok(Some(Stop::Shutdown)) | Ok(None) => "nonstop serve is stopping".into(),
        Err(_) => "the run was dropped".into(),
    }
}

fn kill_group(pgid: i32, sig: i32) {
    if pgid > 0 {
        // SAFETY: kill(2) with a negative pid signals the process group; no memory is involved.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

async fn pump<R: AsyncRead + Unpin>(r: R, tx: tokio::sync::mpsc::Sender<String>) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    buf.pop();
                }
                buf.truncate(LINE_BYTES_MAX);
                if tx.send(String::from_utf8_lossy(&buf).into_owned()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Runs `command` with `sh -c` in `dir`, with `env` added, until it exits, `timeout` passes or `cancel` turns
/// true. Whatever it leaves running in its process group is killed when it ends.
pub async fn run_shell(
    command: &str,
    dir: &Path,
    env: &[(String, String)],
    timeout: Duration,
    cancel: &mut watch::Receiver<Option<Stop>>,
    sink: &mut Sink,
    on_start: &mut (dyn FnMut(i32) + Send),
) -> Ended {
    use std::os::unix::process::ExitStatusExt;
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Ended::NotStarted(e.to_string()),
    };
    let pgid = child.id().map_or(0, |p| p as i32);
    on_start(pgid);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump(out, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump(err, tx.clone()));
    }
    drop(tx);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut stopping: Option<Ended> = None;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let status = loop {
        tokio::select! {
            s = child.wait() => break s,
            Some(line) = rx.recv() => sink.line(&line),
            _ = tokio::time::sleep_until(deadline), if stopping.is_none() => {
                sink.line(&format!("[nonstop: timed out after {} ms; stopping the step]", timeout.as_millis()));
                kill_group(pgid, libc::SIGTERM);
                stopping = Some(Ended::TimedOut);
                kill_at = Some(tokio::time::Instant::now() + KILL_GRACE);
            }
            why = stop_reason(cancel), if stopping.is_none() => {
                sink.line(&format!("[nonstop: {why}; stopping the step]"));
                kill_group(pgid, libc::SIGTERM);
                stopping = Some(Ended::Cancelled);
                kill_at = Some(tokio::time::Instant::now() + KILL_GRACE);
            }
            _ = async { tokio::time::sleep_until(kill_at.expect("armed")).await }, if kill_at.is_some() => {
                kill_group(pgid, libc::SIGKILL);
                kill_at = None;
            }
        }
    };
    // What it left running may still hold the pipes: let its output drain a moment, then end the group.
    let drain_until = tokio::time::Instant::now() + DRAIN_AFTER_EXIT;
    loop {
        tokio::select! {
            line = rx.recv() => match line { Some(l) => sink.line(&l), None => break },
            _ = tokio::time::sleep_until(drain_until) => {
                kill_group(pgid, libc::SIGKILL);
                while let Ok(Some(l)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                    sink.line(&l);
                }
                break;
            }
        }
    }
    kill_group(pgid, libc::SIGKILL);
    if let Some(why) = stopping {
        return why;
    }
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => Ended::Exited(c),
            (None, Some(sig)) => Ended::Signalled(sig),
            (None, None) => Ended::Exited(-1),
        },
        Err(e) => Ended::NotStarted(e.to_string()),
    }
}
