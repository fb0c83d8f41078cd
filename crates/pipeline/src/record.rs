//! Run records on disk: `state_dir/pipelines/NAME/runs/N/run.json`, written whole, fsynced and renamed at every
//! change of state, with each step's log beside it; and artifacts kept by content hash.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Run states.
pub mod state {
    pub const QUEUED: &str = "queued";
    pub const RUNNING: &str = "running";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";
    pub const INTERRUPTED: &str = "interrupted";
    pub const SUPERSEDED: &str = "superseded";
    pub const SKIPPED: &str = "skipped";
    /// Step only: not reached yet.
    pub const PENDING: &str = "pending";

    pub fn is_final(s: &str) -> bool {
        !matches!(s, QUEUED | RUNNING | PENDING)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub pipeline: String,
    pub number: u64,
    /// push, manual, schedule, after.
    pub trigger: String,
    /// The forge's delivery id of the push that started it.
    pub delivery: Option<String>,
    pub branch: Option<String>,
    /// What was asked for: a ref or a commit.
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// The commit built, once checked out (or as pushed).
    pub commit: Option<String>,
    pub state: String,
    pub reason: Option<String>,
    pub queued_ms: u64,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    pub steps: Vec<StepRecord>,
    pub post: Vec<StepRecord>,
    /// Artifacts kept by this run: name → content hash.
    #[serde(default)]
    pub artifacts: Vec<(String, String)>,
    /// A service this run deployed, and the version it replaced (what a failed verify rolls back to).
    #[serde(default)]
    pub deployed: Vec<Deployed>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployed {
    pub service: String,
    pub version: String,
    pub from: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub stage: String,
    pub name: String,
    /// checkout, run, deploy, verify.
    pub kind: String,
    pub state: String,
    pub exit_code: Option<i32>,
    pub duration_ms: Option<u64>,
    pub attempts: u32,
    pub message: Option<String>,
    /// The process group of its command while it runs (to end what a crash left behind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgid: Option<i32>,
    /// Log bytes stored, and bytes dropped past `log_bytes_max`.
    #[serde(default)]
    pub log_bytes: u64,
    #[serde(default)]
    pub log_dropped_bytes: u64,
}

impl StepRecord {
    pub fn new(stage: &str, name: &str, kind: &str) -> StepRecord {
        StepRecord {
            stage: stage.into(),
            name: name.into(),
            kind: kind.into(),
            state: state::PENDING.into(),
            exit_code: None,
            duration_ms: None,
            attempts: 0,
            message: None,
            pgid: None,
            log_bytes: 0,
            log_dropped_bytes: 0,
        }
    }
}

/// The pipelines' part of the state directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Writes `bytes` to `path` whole: beside it, fsynced, renamed, and the directory fsynced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

impl Store {
    pub fn new(state_dir: &Path) -> Store {
        Store { root: state_dir.join("pipelines") }
    }

    pub fn pipeline_dir(&self, pipeline: &str) -> PathBuf {
        self.root.join(pipeline)
    }

    pub fn run_dir(&self, pipeline: &str, n: u64) -> PathBuf {
        self.root.join(pipeline).join("runs").join(n.to_string())
    }

    pub fn log_path(&self, pipeline: &str, n: u64, post: bool, index: usize) -> PathBuf {
        let name = if post { format!("post-{index}.log") } else { format!("step-{index}.log") };
        self.run_dir(pipeline, n).join("logs").join(name)
    }

    pub fn workspace(&self, pipeline: &str, n: u64) -> PathBuf {
        self.run_dir(pipeline, n).join("workspace")
    }

    pub fn artifacts_dir(&self) -> PathBuf {
        self.root.join("artifacts")
    }

    pub fn write(&self, run: &Run) -> std::io::Result<()> {
        let path = self.run_dir(&run.pipeline, run.number).join("run.json");
        let bytes = serde_json::to_vec_pretty(run).expect("a run serialises");
        write_atomic(&path, &bytes)
    }

    /// Every run of a pipeline found on disk, by number. A record that cannot be read is reported and skipped.
    pub fn load(&self, pipeline: &str) -> Vec<Run> {
        let dir = self.pipeline_dir(pipeline).join("runs");
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        let mut runs = Vec::new();
        for e in entries.flatten() {
            let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else { continue };
            let path = e.path().join("run.json");
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Run>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) if r.number == n => runs.push(r),
                Ok(_) => tracing::warn!(path = %path.display(), "run record numbered unlike its directory; skipped"),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "unreadable run record; skipped"),
            }
        }
        runs.sort_by_key(|r| r.number);
        runs
    }

    pub fn remove_run(&self, pipeline: &str, n: u64) {
        let _ = std::fs::remove_dir_all(self.run_dir(pipeline, n));
    }

    /// The `schedule.json` of a pipeline: the fire time of its last scheduled run.
    pub fn last_due_ms(&self, pipeline: &str) -> Option<u64> {
        let b = std::fs::read(self.pipeline_dir(pipeline).join("schedule.json")).ok()?;
        serde_json::from_slice::<serde_json::Value>(&b).ok()?["last_due_ms"].as_u64()
    }

    pub fn set_last_due_ms(&self, pipeline: &str, ms: u64) -> std::io::Result<()> {
        let bytes = serde_json::json!({ "last_due_ms": ms }).to_string();
        write_atomic(&self.pipeline_dir(pipeline).join("schedule.json"), bytes.as_bytes())
    }
}

/// SHA-256 over a file or directory tree: each entry's relative path, kind, mode and contents, in name order.
pub fn tree_hash(path: &Path) -> std::io::Result<String> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    fn walk(ctx: &mut ring::digest::Context, root: &Path, rel: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let full = root.join(rel);
        let meta = std::fs::symlink_metadata(&full)?;
        let name = rel.to_string_lossy();
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full)?;
            ctx.update(format!("L {name}\0{}\0", target.to_string_lossy()).as_bytes());
        } else if meta.is_dir() {
            ctx.update(format!("D {name}\0").as_bytes());
            let mut names: Vec<_> = std::fs::read_dir(&full)?.flatten().map(|e| e.file_name()).collect();
            names.sort();
            for n in names {
                walk(ctx, root, &rel.join(n))?;
            }
        } else {
            let mode = meta.permissions().mode() & 0o111;
            ctx.update(format!("F {name}\0{mode:o}\0{}\0", meta.len()).as_bytes());
            let mut f = std::fs::File::open(&full)?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = std::io::Read::read(&mut f, &mut buf)?;
                if n == 0 {
                    break;
                }
                ctx.update(&buf[..n]);
            }
        }
        Ok(())
    }
    walk(&mut ctx, path, Path::new(""))?;
    Ok(ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// Copies a file or tree (symlinks as links), keeping the executable bits.
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)
    } else if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)?.flatten() {
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else {
        std::fs::copy(from, to).map(|_| ())
    }
}

/// Keeps `path` (in `workspace`) as an artifact: returns its hash and its kept path,
/// `artifacts/HASH/NAME`, made once (beside and renamed) and shared by every run that built the same bytes.
pub fn keep_artifact(artifacts: &Path, workspace: &Path, rel: &str) -> std::io::Result<(String, PathBuf)> {
    let src = workspace.join(rel);
    let hash = tree_hash(&src)?;
    let base = Path::new(rel).file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "artifact".into());
    let dir = artifacts.join(&hash);
    let kept = dir.join(&base);
    if !kept.exists() {
        std::fs::create_dir_all(artifacts)?;
        let tmp = artifacts.join(format!(".{hash}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        copy_tree(&src, &tmp.join(&base))?;
        match std::fs::rename(&tmp, &dir) {
            Ok(()) => {}
            // Another run kept the same bytes first.
            Err(_) if kept.exists() => {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            Err(e) => return Err(e),
        }
    }
    Ok((hash, kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nonstop-record-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_run_is_written_and_read_back() {
        let d = tmp("rw");
        let store = Store::new(&d);
        let mut run = Run {
            pipeline: "web".into(),
            number: 7,
            trigger: "manual".into(),
            delivery: None,
            branch: Some("main".into()),
            git_ref: None,
            commit: None,
            state: state::QUEUED.into(),
            reason: None,
            queued_ms: 1,
            started_ms: None,
            ended_ms: None,
            steps: vec![StepRecord::new("build", "make", "run")],
            post: Vec::new(),
            artifacts: Vec::new(),
            deployed: Vec::new(),
        };
        store.write(&run).unwrap();
        run.state = state::RUNNING.into();
        store.write(&run).unwrap();
        std::fs::create_dir_all(d.join("pipelines/web/runs/junk")).unwrap();
        std::fs::create_dir_all(d.join("pipelines/web/runs/9")).unwrap();
        std::fs::write(d.join("pipelines/web/runs/9/run.json"), b"{torn").unwrap();
        assert_eq!(store.load("web"), vec![run]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_same_bytes_are_kept_once_and_a_change_makes_another_hash() {
        let d = tmp("art");
        let ws = d.join("ws");
        std::fs::create_dir_all(ws.join("dist/sub")).unwrap();
        std::fs::write(ws.join("dist/a"), b"one").unwrap();
        std::fs::write(ws.join("dist/sub/b"), b"two").unwrap();
        let (h1, p1) = keep_artifact(&d.join("artifacts"), &ws, "dist").unwrap();
        let (h2, p2) = keep_artifact(&d.join("artifacts"), &ws, "dist").unwrap();
        assert_eq!((&h1, &p1), (&h2, &p2));
        assert_eq!(std::fs::read(p1.join("sub/b")).unwrap(), b"two");
        std::fs::write(ws.join("dist/sub/b"), b"three").unwrap();
        let (h3, _) = keep_artifact(&d.join("artifacts"), &ws, "dist").unwrap();
        assert_ne!(h1, h3);
        let _ = std::fs::remove_dir_all(&d);
    }
}
