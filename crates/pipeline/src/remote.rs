//! Running a job's command on an SSH host: the script of `nonstop_hosts::remote::job_script` over the host's one
//! kept connection, its output streamed, masked and capped like a local command's; a timeout or a cancel ends the
//! run's whole process group on the host (SIGTERM, then SIGKILL), and so does its end.

use std::sync::Arc;
use std::time::Duration;

use nonstop_hosts::link::Link;
use nonstop_hosts::remote::{job_script, job_signal, JOB_PGID_MARK};
use tokio::sync::watch;

use crate::exec::{stop_reason, Ended, Sink, Stop, KILL_GRACE};

/// Longest line kept, as for a local command.
const LINE_BYTES_MAX: usize = 16 * 1024;
/// A signal to the run's group must be sent within this long.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);

/// What one remote run needs to know.
pub struct RemoteJob<'a> {
    pub link: Arc<Link>,
    pub job: &'a str,
    /// The directory on the host: the job's `dir`, or the host's.
    pub workdir: String,
    pub env: &'a [(String, String)],
    pub command: &'a str,
    pub timeout: Duration,
}

/// Splits arriving bytes into lines (without their end), each cut at [`LINE_BYTES_MAX`].
#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    fn push(&mut self, data: &[u8], out: &mut Vec<String>) {
        for &b in data {
            if b == b'\n' {
                while self.partial.last() == Some(&b'\r') {
                    self.partial.pop();
                }
                out.push(String::from_utf8_lossy(&self.partial).into_owned());
                self.partial.clear();
            } else if self.partial.len() < LINE_BYTES_MAX {
                self.partial.push(b);
            }
        }
    }

    fn rest(&mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned())
    }
}

async fn signal(j: &RemoteJob<'_>, pgid: Option<u32>, sig: &str, forget: bool) {
    let Some(pgid) = pgid else { return };
    let script = job_signal(&j.link.host.dir, j.job, pgid, sig, forget);
    if let Err(e) = j.link.run(&script, None, SIGNAL_TIMEOUT).await {
        tracing::warn!(job = j.job, "cannot signal the job's process group {pgid}: {e}");
    }
}

/// Runs the job on its host until it exits, its timeout passes or `cancel` turns true. A lost connection fails
/// the run, naming the host.
pub async fn run_on_host(j: &RemoteJob<'_>, cancel: &mut watch::Receiver<Option<Stop>>, sink: &mut Sink) -> Ended {
    let script = job_script(&j.link.host.dir, j.job, &j.workdir, j.env, j.command);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(256);
    let link = j.link.clone();
    let mut run = Box::pin(async move { link.stream("sh -s", script.into_bytes(), tx).await });
    let mut lines = Lines::default();
    let mut pgid: Option<u32> = None;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + j.timeout;
    let mut stopping: Option<Ended> = None;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut take = |data: &[u8], pgid: &mut Option<u32>, sink: &mut Sink| {
        got.clear();
        lines.push(data, &mut got);
        for l in got.drain(..) {
            match l.strip_prefix(JOB_PGID_MARK).and_then(|p| p.trim().parse().ok()) {
                Some(p) if pgid.is_none() => *pgid = Some(p),
                _ => sink.line(&l),
            }
        }
    };
    let result = loop {
        tokio::select! {
            r = &mut run => break r,
            Some(data) = rx.recv() => take(&data, &mut pgid, sink),
            _ = tokio::time::sleep_until(deadline), if stopping.is_none() => {
                sink.line(&format!("[nonstop: timed out after {} ms; stopping the job on {}]", j.timeout.as_millis(), j.link.label()));
                signal(j, pgid, "TERM", false).await;
                stopping = Some(Ended::TimedOut);
                kill_at = Some(tokio::time::Instant::now() + KILL_GRACE);
            }
            why = stop_reason(cancel), if stopping.is_none() => {
                sink.line(&format!("[nonstop: {why}; stopping the job on {}]", j.link.label()));
                signal(j, pgid, "TERM", false).await;
                stopping = Some(Ended::Cancelled);
                kill_at = Some(tokio::time::Instant::now() + KILL_GRACE);
            }
            _ = async { tokio::time::sleep_until(kill_at.expect("armed")).await }, if kill_at.is_some() => {
                signal(j, pgid, "KILL", false).await;
                kill_at = None;
            }
        }
    };
    while let Ok(data) = rx.try_recv() {
        take(&data, &mut pgid, sink);
    }
    if let Some(l) = lines.rest() {
        sink.line(&l);
    }
    // What the command left running in its group is ended with it, and the run's record on the host removed.
    signal(j, pgid, "KILL", true).await;
    if let Some(why) = stopping {
        return why;
    }
    match result {
        Ok(Some(125)) if pgid.is_none() => Ended::NotStarted(format!("the job could not start on {}", j.link.label())),
        Ok(Some(code)) if code > 128 && code < 160 => Ended::Signalled(code as i32 - 128),
        Ok(Some(code)) => Ended::Exited(code as i32),
        Ok(None) => Ended::Lost(format!("{} sent no exit status (the command was killed there)", j.link.label())),
        Err(e) if pgid.is_none() => Ended::NotStarted(e),
        Err(e) => Ended::Lost(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_become_lines_across_chunks_and_long_lines_are_cut() {
        let mut l = Lines::default();
        let mut out = Vec::new();
        l.push(b"ab", &mut out);
        l.push(b"c\r\nd\n\ne", &mut out);
        assert_eq!(out, ["abc", "d", ""]);
        assert_eq!(l.rest().as_deref(), Some("e"));
        assert_eq!(l.rest(), None);
        out.clear();
        l.push(&vec![b'x'; LINE_BYTES_MAX + 10], &mut out);
        l.push(b"\n", &mut out);
        assert_eq!(out[0].len(), LINE_BYTES_MAX);
    }
}
