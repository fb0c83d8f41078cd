//! The deploy history: one JSON line per finished deploy or rollback, appended and fsynced, read back at start.
//! It also answers which version each service runs (the last one that succeeded) and which one it ran before, and
//! hands out instance ids that never repeat, across restarts of the proxy (`instance-ids.json`, the next id of each
//! service, replaced atomically before an id is used).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Records kept in memory (and returned by the admin API); the file keeps all of them.
const RECORDS_IN_MEMORY_MAX: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub service: String,
    /// "deploy" or "rollback".
    pub kind: String,
    pub version: String,
    pub from_version: String,
    pub strategy: String,
    pub started_ms: u64,
    pub ended_ms: u64,
    /// "succeeded", "rolled_back" or "failed".
    pub result: String,
    pub reason: Option<String>,
    /// Environment variables the deploy set on the new version's instances.
    #[serde(default)]
    pub env: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("cannot open the deploy history {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("cannot write the deploy history {0}: {1}")]
    Write(PathBuf, std::io::Error),
}

pub struct History {
    path: PathBuf,
    file: Mutex<(File, Vec<Record>)>,
    /// `instance-ids.json` and the next instance id of each service.
    ids_path: PathBuf,
    ids: Mutex<BTreeMap<String, u64>>,
}

impl History {
    /// Opens (or creates) `dir/deploys.jsonl`. A torn last line (a crash mid-write) is skipped with a warning.
    pub fn open(dir: &Path) -> Result<History, HistoryError> {
        let path = dir.join("deploys.jsonl");
        std::fs::create_dir_all(dir).map_err(|e| HistoryError::Open(path.clone(), e))?;
        let mut records = Vec::new();
        if let Ok(f) = File::open(&path) {
            for (i, line) in BufReader::new(f).lines().enumerate() {
                let line = line.map_err(|e| HistoryError::Open(path.clone(), e))?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Record>(&line) {
                    Ok(r) => records.push(r),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), line = i + 1, error = %e, "skipping an unreadable history line")
                    }
                }
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| HistoryError::Open(path.clone(), e))?;
        // End a torn last line, so that the next record starts on a line of its own.
        let text_ends_clean = std::fs::read(&path).map(|b| b.last().is_none_or(|&c| c == b'\n')).unwrap_or(true);
        if !text_ends_clean {
            file.write_all(b"\n").map_err(|e| HistoryError::Open(path.clone(), e))?;
        }
        if records.len() > RECORDS_IN_MEMORY_MAX {
            records.drain(..records.len() - RECORDS_IN_MEMORY_MAX);
        }
        let ids_path = dir.join("instance-ids.json");
        let ids = match std::fs::read(&ids_path) {
            Ok(b) => serde_json::from_slice::<BTreeMap<String, u64>>(&b).unwrap_or_else(|e| {
                tracing::warn!(path = %ids_path.display(), error = %e, "unreadable instance ids: starting over past the logs");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        Ok(History { path, file: Mutex::new((file, records)), ids_path, ids: Mutex::new(ids) })
    }

    /// A new instance id of `service`, never handed out before (the next one is stored before this one is used).
    /// When the file cannot be written, the id is still unique within this run, and the error is logged.
    pub fn next_instance(&self, service: &str) -> u64 {
        let mut ids = self.ids.lock().expect("ids lock");
        let id = *ids.get(service).unwrap_or(&1);
        ids.insert(service.to_string(), id + 1);
        if let Err(e) = write_atomically(&self.ids_path, &serde_json::to_vec(&*ids).expect("ids serialize")) {
            tracing::error!(path = %self.ids_path.display(), error = %e, "instance ids not stored: they may repeat after a restart");
        }
        id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record durably (fsync) before returning.
    pub fn append(&self, r: &Record) -> Result<(), HistoryError> {
        let mut g = self.file.lock().expect("history lock");
        let mut line = serde_json::to_string(r).expect("records serialize");
        line.push('\n');
        let werr = |e| HistoryError::Write(self.path.clone(), e);
        g.0.write_all(line.as_bytes()).map_err(werr)?;
        g.0.sync_data().map_err(werr)?;
        g.1.push(r.clone());
        if g.1.len() > RECORDS_IN_MEMORY_MAX {
            g.1.remove(0);
        }
        Ok(())
    }

    pub fn records(&self, service: Option<&str>) -> Vec<Record> {
        let g = self.file.lock().expect("history lock");
        g.1.iter().filter(|r| service.is_none_or(|s| r.service == s)).cloned().collect()
    }

    pub fn next_id(&self) -> u64 {
        self.file.lock().expect("history lock").1.last().map_or(1, |r| r.id + 1)
    }

    /// The version a service runs, with its deploy env: that of its last successful deploy or rollback.
    pub fn current(&self, service: &str) -> Option<(String, Vec<(String, String)>)> {
        let g = self.file.lock().expect("history lock");
        g.1.iter()
            .rev()
            .find(|r| r.service == service && r.result == "succeeded")
            .map(|r| (r.version.clone(), r.env.clone()))
    }

    /// The version `nonstop rollback` returns a service to, with its env (see [`rollback_target`]).
    pub fn previous(&self, service: &str) -> Option<(String, Vec<(String, String)>)> {
        rollback_target(&self.file.lock().expect("history lock").1, service)
    }

    /// The earlier version `nonstop rollback --to VERSION` returns a service to, with its env.
    pub fn version_to_roll_back_to(
        &self,
        service: &str,
        version: &str,
    ) -> Result<(String, Vec<(String, String)>), RollbackToError> {
        rollback_to(&self.file.lock().expect("history lock").1, service, version)
    }
}

/// Where a rollback goes: to the version the current one replaced when it last arrived by a deploy. Rollbacks
/// do not count as arrivals, so repeated rollbacks walk back through the history (v1 -> v2 -> v3, rollback to v2,
/// rollback to v1) instead of flipping between the last two versions; a version deployed again (v1 -> v2 -> v1)
/// rolls back to the one it replaced that time (v2). The env is that of the latest success that installed the version
/// (none for the version the service started with).
pub fn rollback_target(records: &[Record], service: &str) -> Option<(String, Vec<(String, String)>)> {
    let ok: Vec<&Record> = records.iter().filter(|r| r.service == service && r.result == "succeeded").collect();
    let last = ok.last()?;
    let current = &last.version;
    // Installed by a deploy: back to what it replaced. Installed by a rollback: to what it replaced when it
    // last arrived by a deploy before that.
    let arrival = if last.kind == "deploy" {
        *last
    } else {
        *ok.iter().rev().find(|r| r.kind == "deploy" && &r.version == current && r.id < last.id)?
    };
    let target = &arrival.from_version;
    if target.is_empty() || target == current {
        return None;
    }
    Some((target.clone(), env_of(&ok, target)))
}

/// Why `rollback --to` cannot go to a version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RollbackToError {
    #[error("service {service:?} never ran version {version:?} successfully; earlier versions: {}", list(.available))]
    Unknown { service: String, version: String, available: Vec<String> },
    #[error("service {service:?} already runs version {version:?}")]
    Current { service: String, version: String },
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// `rollback --to VERSION`: a version the service ran before (installed by a successful deploy or rollback, or
/// the one it started with), not the current one.
pub fn rollback_to(
    records: &[Record],
    service: &str,
    version: &str,
) -> Result<(String, Vec<(String, String)>), RollbackToError> {
    let ok: Vec<&Record> = records.iter().filter(|r| r.service == service && r.result == "succeeded").collect();
    let current = ok.last().map(|r| r.version.as_str());
    if current == Some(version) {
        return Err(RollbackToError::Current { service: service.into(), version: version.into() });
    }
    // Every version it ran, newest first, without the current one.
    let mut available: Vec<String> = Vec::new();
    for r in ok.iter().rev() {
        for v in [&r.version, &r.from_version] {
            if !v.is_empty() && Some(v.as_str()) != current && !available.contains(v) {
                available.push(v.clone());
            }
        }
    }
    if !available.iter().any(|v| v == version) {
        return Err(RollbackToError::Unknown { service: service.into(), version: version.into(), available });
    }
    Ok((version.to_string(), env_of(&ok, version)))
}

fn env_of(ok: &[&Record], version: &str) -> Vec<(String, String)> {
    ok.iter().rev().find(|r| r.version == version).map(|r| r.env.clone()).unwrap_or_default()
}

/// Writes a file whole or not at all: a temporary file, fsynced, renamed over it, the directory fsynced.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, version: &str, from: &str, result: &str) -> Record {
        Record {
            id,
            service: "app".into(),
            kind: "deploy".into(),
            version: version.into(),
            from_version: from.into(),
            strategy: "rolling".into(),
            started_ms: id,
            ended_ms: id + 1,
            result: result.into(),
            reason: None,
            env: vec![("K".into(), version.into())],
        }
    }

    #[test]
    fn survives_reopen_and_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("nonstop-history-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let h = History::open(&dir).unwrap();
        assert_eq!(h.current("app"), None);
        h.append(&rec(1, "v2", "v1", "succeeded")).unwrap();
        h.append(&rec(2, "v3", "v2", "rolled_back")).unwrap();
        drop(h);
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("deploys.jsonl"))
            .unwrap()
            .write_all(b"{\"id\":3,\"serv")
            .unwrap();
        let h = History::open(&dir).unwrap();
        assert_eq!(h.records(Some("app")).len(), 2);
        assert_eq!(h.current("app").unwrap().0, "v2");
        assert_eq!(h.previous("app").unwrap().0, "v1");
        assert_eq!(h.next_id(), 3);
        h.append(&rec(3, "v4", "v2", "succeeded")).unwrap();
        assert_eq!(h.previous("app"), Some(("v2".to_string(), vec![("K".to_string(), "v2".to_string())])));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn rollback(id: u64, version: &str, from: &str) -> Record {
        Record { kind: "rollback".into(), ..rec(id, version, from, "succeeded") }
    }

    #[test]
    fn repeated_rollbacks_walk_back_through_the_history() {
        let mut h = vec![rec(1, "v2", "v1", "succeeded"), rec(2, "v3", "v2", "succeeded")];
        assert_eq!(rollback_target(&h, "app").unwrap().0, "v2");
        h.push(rollback(3, "v2", "v3"));
        let (v, env) = rollback_target(&h, "app").unwrap();
        assert_eq!((v.as_str(), env), ("v1", vec![]), "v1 was never installed by a record: no env");
        h.push(rollback(4, "v1", "v2"));
        assert_eq!(rollback_target(&h, "app"), None, "v1 is where the service started");
        assert_eq!(rollback_target(&h, "other"), None);
        // Deployed again: back to what it replaced that time.
        let again = vec![rec(1, "v2", "v1", "succeeded"), rec(2, "v1", "v2", "succeeded")];
        assert_eq!(rollback_target(&again, "app").unwrap().0, "v2");
        // A deploy after the rollbacks starts a new arrival: rolling back goes to where it came from.
        h.push(rec(5, "v4", "v1", "succeeded"));
        h.push(rec(6, "v5", "v4", "rolled_back"));
        assert_eq!(rollback_target(&h, "app").unwrap().0, "v1", "a rolled-back deploy is no arrival");
    }

    #[test]
    fn rollback_to_a_version_names_the_ones_there_are() {
        let h = vec![rec(1, "v2", "v1", "succeeded"), rec(2, "v3", "v2", "succeeded"), rec(3, "v9", "v3", "failed")];
        assert_eq!(rollback_to(&h, "app", "v2").unwrap(), ("v2".into(), vec![("K".into(), "v2".into())]));
        assert_eq!(rollback_to(&h, "app", "v1").unwrap(), ("v1".into(), vec![]));
        let e = rollback_to(&h, "app", "v9").unwrap_err();
        assert_eq!(e.to_string(), "service \"app\" never ran version \"v9\" successfully; earlier versions: v2, v1");
        assert!(matches!(rollback_to(&h, "app", "v3"), Err(RollbackToError::Current { .. })));
        assert!(rollback_to(&[], "app", "v1").unwrap_err().to_string().ends_with("earlier versions: none"));
    }

    #[test]
    fn instance_ids_do_not_restart_when_the_history_is_opened_again() {
        let dir = std::env::temp_dir().join(format!("nonstop-history-ids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let h = History::open(&dir).unwrap();
        assert_eq!([h.next_instance("app"), h.next_instance("app"), h.next_instance("web")], [1, 2, 1]);
        drop(h);
        let h = History::open(&dir).unwrap();
        assert_eq!([h.next_instance("app"), h.next_instance("web")], [3, 2]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
