//! The I/O shell of pipelines: triggers, the lane of each pipeline, run execution (checkout, steps, native
//! deploy and verify, post steps), records, logs for followers, retention, schedules and recovery after a crash.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nonstop_config::{Action, Concurrency, Pipeline, PipelineFile, PipelineKind, PostOn, Step};
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

use crate::exec::{run_shell, Live, Sink, Stop};
use crate::mask::Masker;
use crate::policy::{Decision, Lane};
use crate::record::{state, Deployed, Run, StepRecord, Store};
use crate::{PipelineError, Platform};

/// Longest a follower may lag behind before it misses lines.
const RUNS_LISTED_MAX: usize = 1000;

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What started a run.
#[derive(Debug, Clone, Default)]
pub struct Trigger {
    /// push, manual, schedule, after.
    pub kind: &'static str,
    /// A ref or commit to build; `None`: the pipeline's branch.
    pub git_ref: Option<String>,
    /// The commit a push names.
    pub commit: Option<String>,
    pub delivery: Option<String>,
    /// A note for the run's reason (a missed schedule, the pipeline it came after).
    pub note: Option<String>,
}

/// What a trigger did.
#[derive(Debug, Clone)]
pub enum Triggered {
    /// A run was recorded (started, waiting, or skipped by the policy).
    Run(Run),
    /// The delivery was seen before: its run.
    Duplicate(Run),
    /// A scheduled fire time while the job runs: not run, counted.
    Skipped(String),
}

struct Active {
    stop: watch::Sender<Option<Stop>>,
    live: Arc<Live>,
}

struct Pipe {
    spec: Pipeline,
    lane: Lane,
    runs: BTreeMap<u64, Run>,
    active: BTreeMap<u64, Active>,
    next_number: u64,
    skipped_total: u64,
    next_ms: Option<u64>,
}

struct Inner {
    store: Store,
    rt: tokio::runtime::Handle,
    platform: Arc<dyn Platform>,
    exe: PathBuf,
    pipes: Mutex<BTreeMap<String, Pipe>>,
    /// Held while an artifact is kept and recorded, and while unused ones are deleted.
    artifacts: tokio::sync::Mutex<()>,
    shutdown: watch::Sender<bool>,
    /// nonstop's known_hosts file, which the links to jobs' hosts are judged by.
    known_hosts: PathBuf,
    /// One kept SSH connection per host that jobs run on, made when first needed (again if the host changed).
    links: Mutex<BTreeMap<String, Arc<nonstop_hosts::link::Link>>>,
}

/// Pipelines and jobs of one `nonstop serve`.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

fn kill_orphan(pipeline: &str, n: u64, pgid: i32) {
    // Only a process group whose leader still carries this run's id: a reused pid is left alone.
    let Ok(environ) = std::fs::read(format!("/proc/{pgid}/environ")) else { return };
    let mark = format!("NONSTOP_RUN_ID={pipeline}/{n}");
    if environ.split(|b| *b == 0).any(|e| e == mark.as_bytes()) {
        // SAFETY: kill(2) on a process group; no memory is involved.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

impl Runner {
    /// Loads every pipeline's runs, marks those a crash cut off as interrupted, starts again those that were
    /// acknowledged but never started, and starts the schedules, on `rt`.
    pub fn start(
        pipelines: &BTreeMap<String, Pipeline>,
        state_dir: &Path,
        platform: Arc<dyn Platform>,
        rt: tokio::runtime::Handle,
        exe: PathBuf,
    ) -> Result<Runner, PipelineError> {
        let store = Store::new(state_dir);
        std::fs::create_dir_all(store.artifacts_dir()).map_err(|e| PipelineError::Store(e.to_string()))?;
        let mut pipes = BTreeMap::new();
        let mut requeue = Vec::new();
        for (name, spec) in pipelines {
            let mut runs = BTreeMap::new();
            for mut run in store.load(name) {
                if run.state == state::RUNNING {
                    for s in run.steps.iter_mut().chain(run.post.iter_mut()) {
                        if s.state == state::RUNNING {
                            if let Some(pgid) = s.pgid {
                                kill_orphan(name, run.number, pgid);
                            }
                            s.state = state::INTERRUPTED.into();
                        } else if s.state == state::PENDING {
                            s.state = state::SKIPPED.into();
                        }
                    }
                    run.state = state::INTERRUPTED.into();
                    run.reason = Some("nonstop serve stopped while the run ran (killed, crashed or restarted)".into());
                    run.ended_ms = Some(now_ms());
                    store.write(&run).map_err(|e| PipelineError::Store(e.to_string()))?;
                    let _ = std::fs::remove_dir_all(store.workspace(name, run.number));
                } else if run.state == state::QUEUED {
                    requeue.push((name.clone(), run.number));
                }
                runs.insert(run.number, run);
            }
            let next_number = runs.keys().next_back().map_or(1, |n| n + 1);
            pipes.insert(
                name.clone(),
                Pipe {
                    spec: spec.clone(),
                    lane: Lane::default(),
                    runs,
                    active: BTreeMap::new(),
                    next_number,
                    skipped_total: 0,
                    next_ms: None,
                },
            );
        }
        let runner = Runner {
            inner: Arc::new(Inner {
                store,
                rt,
                platform,
                exe,
                pipes: Mutex::new(pipes),
                artifacts: tokio::sync::Mutex::new(()),
                shutdown: watch::channel(false).0,
                known_hosts: nonstop_hosts::known_hosts_path(state_dir),
                links: Mutex::new(BTreeMap::new()),
            }),
        };
        for (name, n) in requeue {
            runner.admit(&name, n);
        }
        for (name, spec) in pipelines {
            if let Some(s) = &spec.schedule {
                let cron = nonstop_schedule::Cron::parse(&s.cron, name, &s.time_zone)
                    .map_err(|e| PipelineError::Invalid(format!("pipelines.{name}.schedule: {e}")))?;
                let missed = nonstop_schedule::Missed::parse(&s.missed).map_err(PipelineError::Invalid)?;
                let r = runner.clone();
                let name = name.clone();
                runner.inner.rt.spawn(async move { r.schedule_loop(name, cron, missed).await });
            }
        }
        Ok(runner)
    }

    /// The kept connection to `host`, made anew when the host's config changed.
    fn link(&self, host: &nonstop_config::Host) -> Arc<nonstop_hosts::link::Link> {
        let mut links = self.inner.links.lock().expect("links lock");
        match links.get(&host.name) {
            Some(l) if l.host == *host => l.clone(),
            _ => {
                let l = Arc::new(nonstop_hosts::link::Link::new(host.clone(), self.inner.known_hosts.clone()));
                links.insert(host.name.clone(), l.clone());
                l
            }
        }
    }

    fn pipes(&self) -> MutexGuard<'_, BTreeMap<String, Pipe>> {
        self.inner.pipes.lock().expect("pipelines lock")
    }

    /// Takes in a new config's pipelines (same names): their definitions change for runs that start later.
    pub fn reconfigure(&self, pipelines: &BTreeMap<String, Pipeline>) {
        for (name, p) in self.pipes().iter_mut() {
            if let Some(spec) = pipelines.get(name) {
                p.spec = spec.clone();
            }
        }
    }

    fn no_pipeline(pipes: &BTreeMap<String, Pipe>, name: &str) -> PipelineError {
        PipelineError::NoPipeline(name.to_string(), pipes.keys().cloned().collect::<Vec<_>>().join(", "))
    }

    /// Records a run of `name` (fsynced before this returns), then starts it, queues it or skips it by the
    /// pipeline's concurrency policy.
    pub fn trigger(&self, name: &str, t: Trigger) -> Result<Triggered, PipelineError> {
        let n = {
            let mut pipes = self.pipes();
            let Some(p) = pipes.get_mut(name) else { return Err(Self::no_pipeline(&pipes, name)) };
            if let Some(d) = &t.delivery {
                if let Some(run) = p.runs.values().find(|r| r.delivery.as_ref() == Some(d)) {
                    return Ok(Triggered::Duplicate(run.clone()));
                }
            }
            if t.kind == "schedule" && p.spec.concurrency == Concurrency::Forbid {
                if let Some(running) = p.lane.running() {
                    p.skipped_total += 1;
                    let why =
                        format!("{name}: a scheduled run is due while run {running} still runs; it is not run twice");
                    tracing::warn!("{why}");
                    return Ok(Triggered::Skipped(why));
                }
            }
            let branch = match (&t.git_ref, &p.spec.source) {
                (Some(r), _) if !is_commit_id(r) => Some(r.strip_prefix("refs/heads/").unwrap_or(r).to_string()),
                (_, Some(src)) => Some(src.branch.clone()),
                (_, None) => None,
            };
            let n = p.next_number;
            let mut steps = Vec::new();
            if p.spec.kind == PipelineKind::Job {
                steps.push(StepRecord::new("job", "command", "run"));
            } else {
                steps.push(StepRecord::new("checkout", "git", "checkout"));
            }
            let run = Run {
                pipeline: name.to_string(),
                number: n,
                trigger: t.kind.to_string(),
                delivery: t.delivery.clone(),
                branch,
                git_ref: t.git_ref.clone(),
                commit: t.commit.clone(),
                state: state::QUEUED.into(),
                reason: t.note.clone(),
                queued_ms: now_ms(),
                started_ms: None,
                ended_ms: None,
                steps,
                post: Vec::new(),
                artifacts: Vec::new(),
                deployed: Vec::new(),
            };
            // Acknowledged only once on disk.
            self.inner.store.write(&run).map_err(|e| PipelineError::Store(e.to_string()))?;
            p.next_number += 1;
            p.runs.insert(n, run);
            n
        };
        self.admit(name, n);
        self.retain(name);
        let pipes = self.pipes();
        Ok(Triggered::Run(pipes[name].runs[&n].clone()))
    }

    /// Puts a recorded, queued run through the lane.
    fn admit(&self, name: &str, n: u64) {
        let mut pipes = self.pipes();
        let Some(p) = pipes.get_mut(name) else { return };
        let decision = p.lane.trigger(n, p.spec.concurrency);
        let finish = |p: &mut Pipe, m: u64, st: &str, why: String| {
            if let Some(r) = p.runs.get_mut(&m) {
                r.state = st.into();
                r.reason = Some(why);
                r.ended_ms = Some(now_ms());
                for s in r.steps.iter_mut().chain(r.post.iter_mut()) {
                    s.state = state::SKIPPED.into();
                }
                if let Err(e) = self.inner.store.write(r) {
                    tracing::error!(error = %e, "run record not written");
                }
            }
        };
        match decision {
            Decision::Start => self.launch(p, name, n),
            Decision::Wait { superseded } => {
                if let Some(old) = superseded {
                    finish(p, old, state::SUPERSEDED, format!("superseded by run {n} before it started"));
                }
            }
            Decision::Skip { running } => {
                finish(p, n, state::SKIPPED, format!("run {running} was running (concurrency = \"forbid\")"))
            }
            Decision::CancelThenWait { cancel, superseded } => {
                if let Some(old) = superseded {
                    finish(p, old, state::SUPERSEDED, format!("superseded by run {n} before it started"));
                }
                if let Some(a) = p.active.get(&cancel) {
                    a.stop.send_if_modified(|s| {
                        if s.is_none() {
                            *s = Some(Stop::Cancel(format!("cancelled by run {n} (concurrency = \"cancel\")")));
                            true
                        } else {
                            false
                        }
                    });
                }
            }
        }
    }

    fn launch(&self, p: &mut Pipe, name: &str, n: u64) {
        let (stop, stop_rx) = watch::channel(None);
        let live = Live::new();
        p.active.insert(n, Active { stop, live: live.clone() });
        let r = self.clone();
        let name = name.to_string();
        let timeout = p.spec.run_timeout;
        self.inner.rt.spawn(async move {
            let runner = r.clone();
            let (tname, tn) = (name.clone(), n);
            // The run's own deadline.
            let deadline = tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                runner.stop(&tname, tn, Stop::Timeout);
            });
            r.execute(&name, n, stop_rx, live).await;
            deadline.abort();
            r.ended(&name, n);
        });
    }

    fn stop(&self, name: &str, n: u64, why: Stop) -> bool {
        let pipes = self.pipes();
        let Some(a) = pipes.get(name).and_then(|p| p.active.get(&n)) else { return false };
        a.stop.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(why.clone());
                true
            } else {
                false
            }
        });
        true
    }

    /// Cancels run `n`: a running one is stopped (its process group ends), a waiting one ends cancelled.
    pub fn cancel(&self, name: &str, n: u64) -> Result<Run, PipelineError> {
        if self.stop(name, n, Stop::Cancel("cancelled by an operator".into())) {
            return self.run(name, n);
        }
        let mut pipes = self.pipes();
        let Some(p) = pipes.get_mut(name) else { return Err(Self::no_pipeline(&pipes, name)) };
        let Some(r) = p.runs.get_mut(&n) else { return Err(PipelineError::NoRun(name.into(), n)) };
        if r.state != state::QUEUED {
            return Err(PipelineError::Finished(name.into(), n, r.state.clone()));
        }
        r.state = state::CANCELLED.into();
        r.reason = Some("cancelled by an operator before it started".into());
        r.ended_ms = Some(now_ms());
        for s in r.steps.iter_mut() {
            s.state = state::SKIPPED.into();
        }
        self.inner.store.write(r).map_err(|e| PipelineError::Store(e.to_string()))?;
        let run = r.clone();
        p.lane.forget(n);
        Ok(run)
    }

    /// A run ended: the next waiting one starts, and pipelines that come after this one start if it succeeded.
    fn ended(&self, name: &str, n: u64) {
        let (succeeded, followers) = {
            let mut pipes = self.pipes();
            let Some(p) = pipes.get_mut(name) else { return };
            if let Some(a) = p.active.remove(&n) {
                let st = p.runs.get(&n).map(|r| r.state.clone()).unwrap_or_default();
                let _order = a.live.lock.lock().expect("live lock");
                let _ = a.live.tx.send(json!({ "end": true, "state": st }).to_string());
            }
            if let Some(next) = p.lane.ended(n) {
                self.launch(p, name, next);
            }
            let ok = p.runs.get(&n).is_some_and(|r| r.state == state::SUCCEEDED);
            let followers: Vec<String> = pipes
                .values()
                .filter(|q| q.spec.after.iter().any(|a| a == name))
                .map(|q| q.spec.name.clone())
                .collect();
            (ok, followers)
        };
        self.retain(name);
        if succeeded && !*self.inner.shutdown.borrow() {
            for f in followers {
                let t = Trigger {
                    kind: "after",
                    note: Some(format!("after {name} run {n} succeeded")),
                    ..Trigger::default()
                };
                if let Err(e) = self.trigger(&f, t) {
                    tracing::error!(pipeline = %f, error = %e, "cannot start a run after {name}");
                }
            }
        }
    }

    /// Keeps at most `keep_runs` finished runs of `name`, then deletes artifacts no run and no service uses.
    fn retain(&self, name: &str) {
        let mut doomed = Vec::new();
        {
            let mut pipes = self.pipes();
            let Some(p) = pipes.get_mut(name) else { return };
            let finished: Vec<u64> = p.runs.values().filter(|r| state::is_final(&r.state)).map(|r| r.number).collect();
            let excess = finished.len().saturating_sub(p.spec.keep_runs as usize);
            for n in finished.into_iter().take(excess) {
                p.runs.remove(&n);
                doomed.push(n);
            }
        }
        for n in &doomed {
            self.inner.store.remove_run(name, *n);
        }
        if !doomed.is_empty() {
            let r = self.clone();
            self.inner.rt.spawn(async move { r.collect_artifacts().await });
        }
    }

    async fn collect_artifacts(&self) {
        let _held = self.inner.artifacts.lock().await;
        let mut used: std::collections::BTreeSet<String> = {
            let pipes = self.pipes();
            pipes.values().flat_map(|p| p.runs.values()).flat_map(|r| r.artifacts.iter().map(|a| a.1.clone())).collect()
        };
        let dir = self.inner.store.artifacts_dir();
        for p in self.inner.platform.artifacts_in_use() {
            if let Ok(rel) = p.strip_prefix(&dir) {
                if let Some(first) = rel.components().next() {
                    used.insert(first.as_os_str().to_string_lossy().into_owned());
                }
            }
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.len() == 64 && !used.contains(&name) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    fn update(&self, name: &str, n: u64, f: impl FnOnce(&mut Run)) -> Run {
        let mut pipes = self.pipes();
        let run = pipes.get_mut(name).and_then(|p| p.runs.get_mut(&n)).expect("a run being executed is kept");
        f(run);
        if let Err(e) = self.inner.store.write(run) {
            tracing::error!(pipeline = name, run = n, error = %e, "run record not written");
        }
        run.clone()
    }

    fn spec(&self, name: &str) -> Pipeline {
        self.pipes()[name].spec.clone()
    }

    /// Runs one run to its end; every state change is written as it happens.
    async fn execute(&self, name: &str, n: u64, mut stop: watch::Receiver<Option<Stop>>, live: Arc<Live>) {
        let spec = self.spec(name);
        let run = self.update(name, n, |r| {
            r.state = state::RUNNING.into();
            r.started_ms = Some(now_ms());
        });
        let store = self.inner.store.clone();
        let ws = store.workspace(name, n);
        let dir_for_job = spec.stages.first().and_then(|s| s.steps.first()).and_then(|s| s.dir.clone());
        let _ = std::fs::create_dir_all(&ws);
        // Secrets, read at the start of each run.
        let mut env: Vec<(String, String)> = spec.env.clone();
        let mut values = Vec::new();
        let mut problems = Vec::new();
        for s in &spec.secrets {
            match s.source.read() {
                Ok(v) => {
                    env.push((s.name.clone(), v.clone()));
                    values.push(v);
                }
                Err(e) => problems.push(format!("secret {}: {e}", s.name)),
            }
        }
        let (masker, short) = Masker::new(&values);
        let masker = Arc::new(masker);
        let branch = run.branch.clone().unwrap_or_default();
        env.extend([
            ("NONSTOP_PIPELINE".to_string(), name.to_string()),
            ("NONSTOP_RUN".to_string(), n.to_string()),
            ("NONSTOP_RUN_ID".to_string(), format!("{name}/{n}")),
            ("NONSTOP_BRANCH".to_string(), branch.clone()),
            ("NONSTOP_TRIGGER".to_string(), run.trigger.clone()),
        ]);
        let cap = spec.log_bytes_max;
        let sink = |post: bool, i: usize, stage: &str, step: &str| {
            Sink::open(store.log_path(name, n, post, i), cap, masker.clone(), live.clone(), stage, step)
        };
        let mut failure: Option<String> = None;
        let mut first = match sink(false, 0, &run.steps[0].stage, &run.steps[0].name) {
            Ok(s) => s,
            Err(e) => {
                self.finish(name, n, &ws, Some(format!("cannot write the run's log: {e}")), &stop);
                return;
            }
        };
        for i in short {
            first.line(&format!(
                "[nonstop: secret {} is shorter than {} characters and is not masked]",
                spec.secrets[i].name,
                crate::mask::PIECE_CHARS_MIN
            ));
        }
        if !problems.is_empty() {
            for p in &problems {
                first.line(&format!("[nonstop: {p}]"));
            }
            self.update(name, n, |r| {
                r.steps[0].state = state::FAILED.into();
                r.steps[0].message = Some(problems.join("; "));
            });
            self.finish(name, n, &ws, Some(problems.join("; ")), &stop);
            return;
        }
        // The stages: from the config, or from the repository's pipeline file after checkout.
        let mut stages: Vec<(String, Step)> =
            spec.stages.iter().flat_map(|s| s.steps.iter().map(move |st| (s.name.clone(), st.clone()))).collect();
        let mut post = spec.post.clone();
        let mut commit = run.commit.clone();
        let mut offset = 0;
        if let Some(src) = &spec.source {
            offset = 1;
            let want =
                run.commit.clone().or(run.git_ref.clone()).unwrap_or_else(|| format!("refs/heads/{}", src.branch));
            let script = format!(
                "git init -q . && git fetch -q --depth 1 {} {} && git -c advice.detachedHead=false checkout -q FETCH_HEAD \
                 && git log -1 --format='checked out %H: %s'",
                shell_quote(&src.repo),
                shell_quote(&want)
            );
            let started = std::time::Instant::now();
            self.update(name, n, |r| {
                r.steps[0].state = state::RUNNING.into();
                r.steps[0].attempts = 1;
            });
            let mut on_start = |pgid: i32| {
                self.update(name, n, |r| r.steps[0].pgid = Some(pgid));
            };
            let ended =
                run_shell(&script, &ws, &env, Duration::from_secs(600), &mut stop, &mut first, &mut on_start).await;
            let mut message = None;
            if ended.ok() {
                commit = git_head(&ws);
                if let Some(file) = &src.file {
                    match std::fs::read_to_string(ws.join(file)) {
                        Ok(text) => match PipelineFile::parse(&text) {
                            Ok(pf) => {
                                stages = pf
                                    .stages
                                    .iter()
                                    .flat_map(|s| s.steps.iter().map(move |st| (s.name.clone(), st.clone())))
                                    .collect();
                                post = pf.post;
                            }
                            Err(errs) => {
                                for e in &errs.0 {
                                    first.line(&format!("{file}: {e}"));
                                }
                                message = Some(format!(
                                    "{file}: {}",
                                    errs.0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
                                ));
                            }
                        },
                        Err(e) => message = Some(format!("cannot read the pipeline file {file}: {e}")),
                    }
                }
            } else {
                message = Some(format!(
                    "git checkout of {want} from {} {}",
                    src.repo,
                    ended.describe(Duration::from_secs(600))
                ));
            }
            let ok = ended.ok() && message.is_none();
            if let Some(m) = &message {
                first.line(&format!("[nonstop: {m}]"));
            }
            let (written, dropped) = (first.written, first.dropped);
            self.update(name, n, |r| {
                let s = &mut r.steps[0];
                s.state = if ok { state::SUCCEEDED } else { stopped_state(&stop).unwrap_or(state::FAILED) }.into();
                s.exit_code = ended.exit_code();
                s.duration_ms = Some(started.elapsed().as_millis() as u64);
                s.message = message.clone();
                s.log_bytes = written;
                s.log_dropped_bytes = dropped;
                r.commit = commit.clone();
            });
            if !ok {
                failure = Some(message.unwrap_or_else(|| "checkout failed".into()));
            }
            // The stages' records, now that they are known.
            self.update(name, n, |r| {
                r.steps.extend(stages.iter().map(|(stage, st)| StepRecord::new(stage, &st.name, st.action.kind())));
                r.post.extend(post.iter().map(|p| StepRecord::new("post", &p.step.name, p.step.action.kind())));
            });
        } else {
            self.update(name, n, |r| {
                r.post.extend(post.iter().map(|p| StepRecord::new("post", &p.step.name, p.step.action.kind())));
            });
        }
        let short_commit = commit.as_deref().map(|c| c.chars().take(12).collect::<String>()).unwrap_or_default();
        env.push(("NONSTOP_COMMIT".to_string(), commit.clone().unwrap_or_default()));
        let cx =
            StepCx { name, n, ws: &ws, env: &env, branch: &branch, short_commit: &short_commit, trigger: &run.trigger };
        let mut first = Some(first);
        for (i, (_stage, step)) in stages.iter().enumerate() {
            let index = i + offset;
            let why_not = if let Some(st) = stopped_state(&stop) {
                // A step a timeout never reached did not fail: it was skipped.
                let st = if st == state::FAILED { state::SKIPPED } else { st };
                Some((st, "not run: the run was stopped".to_string()))
            } else if let Some(f) = &failure {
                Some((state::SKIPPED, format!("not run: {f}")))
            } else if !step.when.holds(&branch, &run.trigger) {
                Some((
                    state::SKIPPED,
                    format!("not run: when does not hold for branch {branch:?}, trigger {}", run.trigger),
                ))
            } else {
                None
            };
            if let Some((st, msg)) = why_not {
                self.update(name, n, |r| {
                    r.steps[index].state = st.into();
                    r.steps[index].message = Some(msg);
                });
                continue;
            }
            let mut sink = match (index, first.take()) {
                (0, Some(s)) => s,
                _ => match sink(false, index, &stages[i].0, &step.name) {
                    Ok(s) => s,
                    Err(e) => {
                        failure = Some(format!("cannot write the log of step {}: {e}", step.name));
                        continue;
                    }
                },
            };
            let dir = if spec.kind == PipelineKind::Job {
                dir_for_job.clone().unwrap_or_else(|| ws.clone())
            } else {
                ws.clone()
            };
            if let Err(why) = self.step(&cx, false, index, step, &dir, &mut sink, &mut stop).await {
                failure = Some(format!("step {}/{} failed: {why}", stages[i].0, step.name));
            }
        }
        // Post steps: their result does not change the run's.
        let succeeded = failure.is_none() && !stopped(&stop);
        for (i, p) in post.iter().enumerate() {
            let fits = match p.on {
                PostOn::Always => true,
                PostOn::Success => succeeded,
                PostOn::Failure => !succeeded,
            };
            if !fits || !p.step.when.holds(&branch, &run.trigger) || matches!(&*stop.borrow(), Some(Stop::Shutdown)) {
                self.update(name, n, |r| {
                    r.post[i].state = state::SKIPPED.into();
                });
                continue;
            }
            let Ok(mut sink) = sink(true, i, "post", &p.step.name) else { continue };
            // A post step runs even after a cancel: it has a stop channel of its own.
            let (_keep, mut own) = watch::channel(None);
            let mut stop_for_post = if stopped(&stop) { own.clone() } else { stop.clone() };
            let _ = own.borrow_and_update();
            let _ = self.step(&cx, true, i, &p.step, &ws, &mut sink, &mut stop_for_post).await;
        }
        self.finish(name, n, &ws, failure, &stop);
    }

    fn finish(&self, name: &str, n: u64, ws: &Path, failure: Option<String>, stop: &watch::Receiver<Option<Stop>>) {
        let why = stop.borrow().clone();
        self.update(name, n, |r| {
            let (st, reason) = match (&why, failure) {
                (Some(Stop::Shutdown), _) => {
                    (state::INTERRUPTED, Some("nonstop serve stopped while the run ran".to_string()))
                }
                (Some(Stop::Cancel(w)), _) => (state::CANCELLED, Some(w.clone())),
                (Some(Stop::Timeout), _) => {
                    (state::FAILED, Some("the run's timeout_ms passed; it was stopped".to_string()))
                }
                (None, Some(f)) => (state::FAILED, Some(f)),
                (None, None) => (state::SUCCEEDED, r.reason.clone()),
            };
            r.state = st.into();
            r.reason = reason;
            r.ended_ms = Some(now_ms());
            for s in r.steps.iter_mut().chain(r.post.iter_mut()) {
                if s.state == state::PENDING {
                    s.state = state::SKIPPED.into();
                } else if s.state == state::RUNNING {
                    s.state = if st == state::INTERRUPTED { state::INTERRUPTED } else { state::CANCELLED }.into();
                }
            }
        });
        let _ = std::fs::remove_dir_all(ws);
    }

    /// One step, with its retries; `Err` names why it failed.
    #[allow(clippy::too_many_arguments)]
    async fn step(
        &self,
        cx: &StepCx<'_>,
        post: bool,
        index: usize,
        step: &Step,
        dir: &Path,
        sink: &mut Sink,
        stop: &mut watch::Receiver<Option<Stop>>,
    ) -> Result<(), String> {
        let (name, n) = (cx.name, cx.n);
        let set = |f: &dyn Fn(&mut StepRecord)| {
            self.update(name, n, |r| f(if post { &mut r.post[index] } else { &mut r.steps[index] }));
        };
        set(&|s| s.state = state::RUNNING.into());
        let started = std::time::Instant::now();
        let mut env = cx.env.to_vec();
        env.extend(step.env.iter().cloned());
        let mut attempts = 0;
        let result: Result<(), (String, Option<i32>)> = loop {
            attempts += 1;
            set(&|s| s.attempts = attempts);
            if attempts > 1 {
                sink.line(&format!("[nonstop: try {attempts} of {}]", step.retries + 1));
            }
            let r = match &step.action {
                Action::Run(command) => {
                    let ended = match &step.host {
                        Some(host) => {
                            let job = crate::remote::RemoteJob {
                                link: self.link(host),
                                job: name,
                                workdir: step
                                    .dir
                                    .as_ref()
                                    .map_or_else(|| host.dir.clone(), |d| d.to_string_lossy().into_owned()),
                                env: &env,
                                command,
                                timeout: step.timeout,
                            };
                            crate::remote::run_on_host(&job, stop, sink).await
                        }
                        None => {
                            let mut on_start = |pgid: i32| set(&|s| s.pgid = Some(pgid));
                            run_shell(command, dir, &env, step.timeout, stop, sink, &mut on_start).await
                        }
                    };
                    if ended.ok() {
                        self.keep_artifacts(cx, step, sink).await.map_err(|e| (e, Some(0)))
                    } else {
                        Err((ended.describe(step.timeout), ended.exit_code()))
                    }
                }
                Action::Deploy { service, version, artifact, strategy } => {
                    self.deploy(cx, service, version, artifact.as_deref(), *strategy, sink).await.map_err(|e| (e, None))
                }
                Action::Verify { service, url, rate, duration, thresholds } => {
                    self.verify(cx, service, url.as_deref(), *rate, *duration, thresholds, dir, &env, stop, sink).await
                }
            };
            match r {
                Ok(()) => break Ok(()),
                Err(e) if stopped(stop) || attempts > step.retries || !matches!(step.action, Action::Run(_)) => {
                    break Err(e)
                }
                Err((why, _)) => sink.line(&format!("[nonstop: {why}; trying again]")),
            }
        };
        let (written, dropped) = (sink.written, sink.dropped);
        let elapsed = started.elapsed().as_millis() as u64;
        let stopped_state = stopped_state(stop);
        match &result {
            Ok(()) => set(&|s| {
                s.state = state::SUCCEEDED.into();
                s.exit_code = matches!(step.action, Action::Run(_)).then_some(0);
                s.duration_ms = Some(elapsed);
                s.log_bytes = written;
                s.log_dropped_bytes = dropped;
            }),
            Err((why, code)) => set(&|s| {
                s.state = stopped_state.unwrap_or(state::FAILED).into();
                s.exit_code = *code;
                s.duration_ms = Some(elapsed);
                s.message = Some(why.clone());
                s.log_bytes = written;
                s.log_dropped_bytes = dropped;
            }),
        }
        result.map_err(|(why, _)| why)
    }

    async fn keep_artifacts(&self, cx: &StepCx<'_>, step: &Step, sink: &mut Sink) -> Result<(), String> {
        if step.artifacts.is_empty() {
            return Ok(());
        }
        let _held = self.inner.artifacts.lock().await;
        for a in &step.artifacts {
            let dir = self.inner.store.artifacts_dir();
            let ws = cx.ws.to_path_buf();
            let rel = a.clone();
            let kept = tokio::task::spawn_blocking(move || crate::record::keep_artifact(&dir, &ws, &rel))
                .await
                .map_err(|e| e.to_string())?;
            match kept {
                Ok((hash, path)) => {
                    sink.line(&format!("[nonstop: artifact {a} kept as {} ({})]", &hash[..12], path.display()));
                    self.update(cx.name, cx.n, |r| r.artifacts.push((a.clone(), hash.clone())));
                }
                Err(e) => return Err(format!("artifact {a} cannot be kept: {e}")),
            }
        }
        Ok(())
    }

    fn artifact_path(&self, cx: &StepCx<'_>, artifact: &str) -> Option<PathBuf> {
        let pipes = self.pipes();
        let run = pipes.get(cx.name)?.runs.get(&cx.n)?;
        let (_, hash) = run.artifacts.iter().rev().find(|(a, _)| a == artifact)?;
        let base = Path::new(artifact).file_name()?.to_os_string();
        Some(self.inner.store.artifacts_dir().join(hash).join(base))
    }

    async fn follow_deploy(&self, mut rx: broadcast::Receiver<String>, sink: &mut Sink) -> Result<Value, String> {
        loop {
            match rx.recv().await {
                Ok(line) => {
                    let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                    if let Some(m) = v["message"].as_str() {
                        sink.line(m);
                    }
                    if v["done"] == json!(true) {
                        return Ok(v);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(k)) => {
                    sink.line(&format!("[nonstop: {k} deploy lines skipped]"))
                }
                Err(broadcast::error::RecvError::Closed) => return Err("the deploy ended without a result".into()),
            }
        }
    }

    async fn deploy(
        &self,
        cx: &StepCx<'_>,
        service: &str,
        version: &str,
        artifact: Option<&str>,
        strategy: Option<nonstop_config::Strategy>,
        sink: &mut Sink,
    ) -> Result<(), String> {
        let version = version
            .replace("{commit}", cx.short_commit)
            .replace("{run}", &cx.n.to_string())
            .replace("{branch}", cx.branch);
        let mut env = Vec::new();
        if let Some(a) = artifact {
            let path = self.artifact_path(cx, a).ok_or_else(|| format!("artifact {a} was not kept by this run"))?;
            env.push(("NONSTOP_ARTIFACT".to_string(), path.to_string_lossy().into_owned()));
        }
        let from = self.inner.platform.version(service);
        if from.as_deref() == Some(version.as_str()) {
            sink.line(&format!("{service} already runs {version}"));
            return Ok(());
        }
        sink.line(&format!("deploying {service} {} -> {version}", from.as_deref().unwrap_or("(none)")));
        let rx = self.inner.platform.deploy(service, &version, env, strategy)?;
        let done = self.follow_deploy(rx, sink).await?;
        match done["result"].as_str() {
            Some("succeeded") => {
                self.update(cx.name, cx.n, |r| {
                    r.deployed.push(Deployed { service: service.into(), version: version.clone(), from: from.clone() })
                });
                Ok(())
            }
            other => Err(format!(
                "the deploy of {service} to {version} {}: {}",
                match other {
                    Some("rolled_back") => "rolled back",
                    _ => "failed",
                },
                done["reason"].as_str().unwrap_or("no reason given")
            )),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn verify(
        &self,
        cx: &StepCx<'_>,
        service: &str,
        url: Option<&str>,
        rate: u32,
        duration: Duration,
        thresholds: &[String],
        dir: &Path,
        env: &[(String, String)],
        stop: &mut watch::Receiver<Option<Stop>>,
        sink: &mut Sink,
    ) -> Result<(), (String, Option<i32>)> {
        let url = match url.map(str::to_string).or_else(|| self.inner.platform.service_url(service)) {
            Some(u) => u,
            None => return Err((format!("no listener routes to {service}: set url on the verify step"), None)),
        };
        let mut cmd = format!(
            "exec {} load {} --rate {rate} --duration {}ms",
            shell_quote(&self.inner.exe.to_string_lossy()),
            shell_quote(&url),
            duration.as_millis()
        );
        for t in thresholds {
            cmd.push_str(&format!(" --threshold {}", shell_quote(t)));
        }
        let timeout = duration + Duration::from_secs(60);
        let mut on_start = |_pgid: i32| {};
        let ended = run_shell(&cmd, dir, env, timeout, stop, sink, &mut on_start).await;
        if ended.ok() {
            return Ok(());
        }
        if stopped(stop) {
            return Err((ended.describe(timeout), ended.exit_code()));
        }
        // The thresholds that failed, as nonstop load printed them.
        let log = std::fs::read_to_string(&sink.path).unwrap_or_default();
        let failed: Vec<String> = log
            .lines()
            .filter_map(|l| l.strip_prefix("threshold "))
            .filter(|l| l.contains(": FAILED"))
            .map(|l| l.replace(": FAILED", " failed"))
            .collect();
        let mut why = if failed.is_empty() {
            format!("nonstop load {}", ended.describe(timeout))
        } else {
            format!("threshold {}", failed.join(", "))
        };
        let deployed = {
            let pipes = self.pipes();
            pipes[cx.name].runs[&cx.n].deployed.iter().rev().find(|d| d.service == service).cloned()
        };
        match deployed {
            Some(d) => {
                sink.line(&format!("verify failed ({why}): rolling {service} back from {}", d.version));
                match self.inner.platform.rollback(service) {
                    Ok(rx) => match self.follow_deploy(rx, sink).await {
                        Ok(done) if done["result"] == json!("succeeded") => {
                            why.push_str(&format!(
                                "; {service} rolled back to {}",
                                done["version"].as_str().unwrap_or("?")
                            ));
                        }
                        Ok(done) => why.push_str(&format!("; the rollback of {service} failed: {}", done["reason"])),
                        Err(e) => why.push_str(&format!("; the rollback of {service} failed: {e}")),
                    },
                    Err(e) => why.push_str(&format!("; the rollback of {service} could not start: {e}")),
                }
            }
            None => why.push_str(&format!(" (this run deployed nothing to {service}: nothing rolled back)")),
        }
        Err((why, ended.exit_code()))
    }

    /// Every pipeline and job, with its last run and next fire time.
    pub fn list(&self) -> Value {
        let pipes = self.pipes();
        let items: Vec<Value> = pipes
            .values()
            .map(|p| {
                json!({
                    "name": p.spec.name,
                    "kind": if p.spec.kind == PipelineKind::Job { "job" } else { "pipeline" },
                    "repo": p.spec.source.as_ref().map(|s| s.repo.clone()),
                    "branch": p.spec.source.as_ref().map(|s| s.branch.clone()),
                    "schedule": p.spec.schedule.as_ref().map(|s| s.cron.clone()),
                    "time_zone": p.spec.schedule.as_ref().map(|s| s.time_zone.clone()),
                    "concurrency": p.spec.concurrency.as_str(),
                    "webhook": p.spec.webhook.is_some(),
                    "last_run": p.runs.values().next_back(),
                    "running": p.lane.running(),
                    "waiting": p.lane.waiting(),
                    "next_ms": p.next_ms,
                    "skipped_total": p.skipped_total,
                })
            })
            .collect();
        json!({ "pipelines": items })
    }

    pub fn runs(&self, name: &str) -> Result<Vec<Run>, PipelineError> {
        let pipes = self.pipes();
        let p = pipes.get(name).ok_or_else(|| Self::no_pipeline(&pipes, name))?;
        Ok(p.runs.values().rev().take(RUNS_LISTED_MAX).cloned().collect())
    }

    pub fn run(&self, name: &str, n: u64) -> Result<Run, PipelineError> {
        let pipes = self.pipes();
        let p = pipes.get(name).ok_or_else(|| Self::no_pipeline(&pipes, name))?;
        p.runs.get(&n).cloned().ok_or_else(|| PipelineError::NoRun(name.into(), n))
    }

    fn stored_logs(&self, run: &Run) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for (post, list) in [(false, &run.steps), (true, &run.post)] {
            for (i, s) in list.iter().enumerate() {
                let text = std::fs::read_to_string(self.inner.store.log_path(&run.pipeline, run.number, post, i))
                    .unwrap_or_default();
                out.push((s.stage.clone(), s.name.clone(), text));
            }
        }
        out
    }

    /// The stored logs of a run, step by step.
    pub fn logs(&self, name: &str, n: u64) -> Result<Value, PipelineError> {
        let run = self.run(name, n)?;
        let steps: Vec<Value> = self
            .stored_logs(&run)
            .into_iter()
            .map(|(stage, name, log)| json!({ "stage": stage, "name": name, "log": log }))
            .collect();
        Ok(json!({ "pipeline": run.pipeline, "number": run.number, "state": run.state, "steps": steps }))
    }

    /// The stored lines of a run as events, then its live ones until it ends (`None` when it has ended).
    pub fn follow(
        &self,
        name: &str,
        n: u64,
    ) -> Result<(Vec<String>, Option<broadcast::Receiver<String>>), PipelineError> {
        let (run, live) = {
            let pipes = self.pipes();
            let p = pipes.get(name).ok_or_else(|| Self::no_pipeline(&pipes, name))?;
            let run = p.runs.get(&n).cloned().ok_or_else(|| PipelineError::NoRun(name.into(), n))?;
            (run, p.active.get(&n).map(|a| a.live.clone()))
        };
        let events = |run: &Run| -> Vec<String> {
            self.stored_logs(run)
                .into_iter()
                .flat_map(|(stage, step, text)| {
                    text.lines()
                        .map(|l| json!({ "stage": stage, "name": step, "line": l }).to_string())
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        match live {
            Some(live) => {
                // Under the live lock no line is being written: the stored ones and the live ones do not overlap.
                let _order = live.lock.lock().expect("live lock");
                let rx = live.tx.subscribe();
                let current = self.run(name, n)?;
                Ok((events(&current), Some(rx)))
            }
            None => {
                let mut backlog = events(&run);
                backlog.push(json!({ "end": true, "state": run.state }).to_string());
                Ok((backlog, None))
            }
        }
    }

    /// A push webhook for `name`: checked, de-duplicated, recorded, then answered. Returns the HTTP status and
    /// the JSON body.
    pub fn hook(&self, name: &str, headers: &[(String, String)], body: &[u8]) -> (u16, Value) {
        let spec = {
            let pipes = self.pipes();
            match pipes.get(name) {
                Some(p) => p.spec.clone(),
                None => return (404, json!({ "error": Self::no_pipeline(&pipes, name).to_string() })),
            }
        };
        let Some(secret) = &spec.webhook else {
            return (
                404,
                json!({ "error": format!("pipeline {name:?} has no webhook (set [pipelines.{name}] webhook)") }),
            );
        };
        let secret = match secret.read() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(pipeline = name, error = %e, "webhook secret unreadable");
                return (
                    500,
                    json!({ "error": format!("the webhook secret of {name:?} cannot be read; see the server's log") }),
                );
            }
        };
        let hook = match crate::webhook::verify(headers, body, secret.as_bytes()) {
            Ok(h) => h,
            Err(crate::webhook::HookError::Unauthenticated(m)) => return (401, json!({ "error": m })),
            Err(crate::webhook::HookError::BadPayload(m)) => return (400, json!({ "error": m })),
        };
        let Some(push) = hook.push else {
            return (
                202,
                json!({ "ignored": format!("{} event {:?}: only pushes start runs", hook.forge.as_str(), hook.event) }),
            );
        };
        let branch = spec.source.as_ref().map(|s| s.branch.clone()).unwrap_or_default();
        if push.branch.as_deref() != Some(branch.as_str()) {
            return (
                202,
                json!({ "ignored": format!("a push to {}: pipeline {name} builds branch {branch}", push.git_ref) }),
            );
        }
        let Some(commit) = push.commit else {
            return (202, json!({ "ignored": format!("{} was deleted", push.git_ref) }));
        };
        let t = Trigger {
            kind: "push",
            git_ref: Some(push.git_ref),
            commit: Some(commit),
            delivery: hook.delivery,
            note: None,
        };
        match self.trigger(name, t) {
            Ok(Triggered::Run(run)) => (202, json!({ "run": run })),
            Ok(Triggered::Duplicate(run)) => (200, json!({ "duplicate": true, "run": run })),
            Ok(Triggered::Skipped(why)) => (202, json!({ "ignored": why })),
            Err(e) => (e.status(), json!({ "error": e.to_string() })),
        }
    }

    async fn schedule_loop(self, name: String, cron: nonstop_schedule::Cron, missed: nonstop_schedule::Missed) {
        let last = self.inner.store.last_due_ms(&name);
        let (mut schedule, decision) = nonstop_schedule::Schedule::start(cron, missed, last, now_ms());
        let mut shutdown = self.inner.shutdown.subscribe();
        if let Some(at) = decision.run_now {
            let note = format!("{} fire time(s) missed while nonstop was not running", decision.missed);
            let _ = self.inner.store.set_last_due_ms(&name, at);
            if let Err(e) = self.trigger(&name, Trigger { kind: "schedule", note: Some(note), ..Trigger::default() }) {
                tracing::error!(pipeline = %name, error = %e, "scheduled run not started");
            }
        }
        loop {
            let next = schedule.next_due_ms();
            if let Some(p) = self.pipes().get_mut(&name) {
                p.next_ms = next;
            }
            let Some(next) = next else { return };
            let wait = Duration::from_millis(next.saturating_sub(now_ms()));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let now = now_ms();
            if now < next {
                continue;
            }
            let Some(due) = schedule.due(now) else { continue };
            if let Err(e) = self.inner.store.set_last_due_ms(&name, due.scheduled_ms) {
                tracing::error!(pipeline = %name, error = %e, "schedule state not written");
            }
            if due.skipped.0 > 0 {
                tracing::warn!(pipeline = %name, skipped = %due.skipped, "fire times passed while the scheduler was late");
            }
            if let Err(e) = self.trigger(&name, Trigger { kind: "schedule", ..Trigger::default() }) {
                tracing::error!(pipeline = %name, error = %e, "scheduled run not started");
            }
        }
    }

    /// Stops every running run (they end interrupted) and the schedules; waits up to `grace` for their steps to
    /// end.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.shutdown.send_replace(true);
        let names: Vec<(String, u64)> = {
            let pipes = self.pipes();
            pipes.iter().flat_map(|(name, p)| p.active.keys().map(move |n| (name.clone(), *n))).collect()
        };
        for (name, n) in &names {
            self.stop(name, *n, Stop::Shutdown);
        }
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if self.pipes().values().all(|p| p.active.is_empty()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct StepCx<'a> {
    name: &'a str,
    n: u64,
    ws: &'a Path,
    env: &'a [(String, String)],
    branch: &'a str,
    short_commit: &'a str,
    #[allow(dead_code)]
    trigger: &'a str,
}

/// The state a step stopped by `stop` ends in, if it was stopped.
fn stopped_state(stop: &watch::Receiver<Option<Stop>>) -> Option<&'static str> {
    match &*stop.borrow() {
        None => None,
        Some(Stop::Shutdown) => Some(state::INTERRUPTED),
        Some(Stop::Timeout) => Some(state::FAILED),
        Some(Stop::Cancel(_)) => Some(state::CANCELLED),
    }
}

fn stopped(stop: &watch::Receiver<Option<Stop>>) -> bool {
    stop.borrow().is_some()
}

fn is_commit_id(s: &str) -> bool {
    (7..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn git_head(ws: &Path) -> Option<String> {
    let out = std::process::Command::new("git").arg("-C").arg(ws).args(["rev-parse", "HEAD"]).output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && is_commit_id(&s)).then_some(s)
}

/// Quotes a word for sh.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_survives_quotes() {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote("it's a \"test\" $HOME")))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's a \"test\" $HOME");
    }

    #[test]
    fn commit_ids_are_hex_of_a_commit_length() {
        assert!(is_commit_id("0123abc"));
        assert!(!is_commit_id("main"));
        assert!(!is_commit_id("abc"));
    }
}
