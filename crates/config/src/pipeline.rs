//! Pipelines (`[pipelines.NAME]`), scheduled jobs (`[jobs.NAME]`) and pipeline files kept in a repository: raw
//! tables walked into typed, validated definitions, every error with its line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use crate::walk::{ConfigErrors, Cx, Table};
use crate::Strategy;

/// One pipeline, or one job (a pipeline of one step with no source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    pub name: String,
    pub kind: PipelineKind,
    /// Where the code comes from; `None` for a job.
    pub source: Option<Source>,
    /// The stages; empty when `source.file` names a pipeline file in the repository.
    pub stages: Vec<Stage>,
    pub post: Vec<PostStep>,
    pub env: Vec<(String, String)>,
    pub secrets: Vec<Secret>,
    pub keep_runs: u32,
    pub concurrency: Concurrency,
    /// The push webhook's secret; `None`: no webhook.
    pub webhook: Option<SecretSource>,
    pub schedule: Option<ScheduleSpec>,
    /// Pipelines whose success starts a run of this one.
    pub after: Vec<String>,
    /// A whole run takes at most this long.
    pub run_timeout: Duration,
    /// Stored log bytes per step at most.
    pub log_bytes_max: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineKind {
    Pipeline,
    Job,
}

/// A git source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Any URL or path `git fetch` takes.
    pub repo: String,
    pub branch: String,
    /// A pipeline file in the repository that holds the stages.
    pub file: Option<String>,
}

/// What to do when a run is triggered while another runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// One running, at most one waiting; a newer trigger replaces the waiting one.
    Queue,
    /// A trigger while one runs is skipped.
    Forbid,
    /// A trigger cancels the running one, and runs once it ended.
    Cancel,
}

impl Concurrency {
    pub fn as_str(self) -> &'static str {
        match self {
            Concurrency::Queue => "queue",
            Concurrency::Forbid => "forbid",
            Concurrency::Cancel => "cancel",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub name: String,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub action: Action,
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    /// Runs again after a failure, at most.
    pub retries: u32,
    pub when: When,
    /// Paths in the workspace kept after the step succeeded.
    pub artifacts: Vec<String>,
    /// Where a command runs: `None`, the workspace (or a job's `dir`; on a host, the host's `dir`).
    pub dir: Option<PathBuf>,
    /// The SSH host a job's command runs on (`host = "NAME"`, a `[hosts.NAME]`); `None`: this machine.
    pub host: Option<crate::Host>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A shell command.
    Run(String),
    /// Deploy an app service through the running proxy.
    Deploy { service: String, version: String, artifact: Option<String>, strategy: Option<Strategy> },
    /// `nonstop load` against a service, with thresholds; a failure rolls the service back.
    Verify { service: String, url: Option<String>, rate: u32, duration: Duration, thresholds: Vec<String> },
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Run(_) => "run",
            Action::Deploy { .. } => "deploy",
            Action::Verify { .. } => "verify",
        }
    }
}

/// When a step runs: every list empty means always.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct When {
    pub branches: Vec<String>,
    pub triggers: Vec<String>,
}

impl When {
    pub fn holds(&self, branch: &str, trigger: &str) -> bool {
        (self.branches.is_empty() || self.branches.iter().any(|b| b == branch))
            && (self.triggers.is_empty() || self.triggers.iter().any(|t| t == trigger))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostOn {
    Success,
    Failure,
    Always,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostStep {
    pub on: PostOn,
    pub step: Step,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// The environment variable the steps see it as.
    pub name: String,
    pub source: SecretSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

impl SecretSource {
    /// Reads the value (a file's whole text, without one trailing newline).
    pub fn read(&self) -> Result<String, String> {
        match self {
            SecretSource::File(p) => std::fs::read_to_string(p)
                .map(|s| s.strip_suffix('\n').map(str::to_string).unwrap_or(s))
                .map_err(|e| format!("cannot read the secret file {}: {e}", p.display())),
            SecretSource::Env(v) => {
                std::env::var(v).map_err(|_| format!("the environment variable {v} (a secret) is not set"))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleSpec {
    pub cron: String,
    pub time_zone: String,
    /// "run_once" or "skip".
    pub missed: String,
}

/// Trigger kinds a `when` may name.
pub const TRIGGERS: &[&str] = &["push", "manual", "schedule", "after"];

/// Whether `name` may name a pipeline or job: it is a directory name and a path segment of the admin API.
pub fn valid_pipeline_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// What the root parser knows when it reads pipelines: the names it can check references against.
pub(crate) struct Known<'k> {
    /// Every `[services.NAME]`, parsed or not.
    pub services: &'k BTreeSet<String>,
    /// Those that parsed, and those of them with an app section.
    pub parsed: &'k BTreeSet<String>,
    pub app_services: &'k BTreeSet<String>,
    /// Every `[hosts.NAME]`, and those that parsed.
    pub host_names: &'k BTreeSet<String>,
    pub hosts: &'k BTreeMap<String, crate::Host>,
}

fn parse_schedule(t: &Table<'_, '_>, seed: &str) -> Option<Option<ScheduleSpec>> {
    let cron = if t.has("schedule") { Some(t.string("schedule")?) } else { None };
    let tz = t.string("time_zone")?;
    let missed = t.string("missed")?;
    if missed != "run_once" && missed != "skip" {
        t.invalid("missed", format!("{missed:?}: expected \"run_once\" or \"skip\""));
        return None;
    }
    let Some(cron) = cron else { return Some(None) };
    match nonstop_schedule::Cron::parse(&cron, seed, &tz) {
        Ok(_) => Some(Some(ScheduleSpec { cron, time_zone: tz, missed })),
        Err(e) => {
            let key = if e.to_string().contains("zone") { "time_zone" } else { "schedule" };
            t.invalid(key, e.to_string());
            None
        }
    }
}

fn parse_secret_source(t: &Table<'_, '_>, what: &str) -> Option<SecretSource> {
    match (t.has("file"), t.has("env")) {
        (true, false) => Some(SecretSource::File(PathBuf::from(t.string("file")?))),
        (false, true) => {
            let v = t.string("env")?;
            if !valid_env_name(&v) {
                t.invalid("env", format!("{v:?} is not an environment variable name"));
                return None;
            }
            Some(SecretSource::Env(v))
        }
        _ => {
            t.invalid_table(format!("{what}: set exactly one of file or env"));
            None
        }
    }
}

/// Checks that an environment map's names are names.
fn env_of(t: &Table<'_, '_>, key: &str) -> Option<Vec<(String, String)>> {
    let env = t.string_map(key)?;
    let mut ok = true;
    for (k, _) in &env {
        if !valid_env_name(k) {
            t.invalid(key, format!("{k:?} is not an environment variable name"));
            ok = false;
        }
    }
    ok.then_some(env)
}

/// One step of a stage or of `post`; `section` is its schema section.
fn parse_step(t: Table<'_, '_>, index: usize, known: Option<&Known<'_>>, post: bool) -> Option<PostStep> {
    let actions: Vec<&str> = ["run", "deploy", "verify"].into_iter().filter(|k| t.has(k)).collect();
    let name = if t.has("name") { t.string("name") } else { Some(actions.first().map_or("step", |a| a).to_string()) };
    let name = name.map(|n| if n.is_empty() { format!("step{}", index + 1) } else { n });
    let env = env_of(&t, "env");
    let timeout = t.ms_in("timeout_ms", 1, 7 * 86_400_000);
    let retries = t.int_in("retries", 0, 100);
    let artifacts = t.strings("artifacts");
    if let Some(a) = &artifacts {
        for p in a {
            let bad = p.is_empty()
                || p.starts_with('/')
                || std::path::Path::new(p).components().any(|c| matches!(c, std::path::Component::ParentDir));
            if bad {
                t.invalid("artifacts", format!("{p:?}: an artifact is a relative path inside the workspace"));
            }
        }
    }
    let when = if t.has("when") {
        t.table("when", if post { "post[].when" } else { "stages[].steps[].when" }).and_then(|w| {
            let branches = w.strings("branch");
            let triggers = w.strings("trigger");
            if let Some(ts) = &triggers {
                for tr in ts {
                    if !TRIGGERS.contains(&tr.as_str()) {
                        w.invalid("trigger", format!("{tr:?}: expected one of {}", TRIGGERS.join(", ")));
                    }
                }
            }
            w.finish();
            Some(When { branches: branches?, triggers: triggers? })
        })
    } else {
        Some(When::default())
    };
    let on = if post {
        match t.string("on").as_deref() {
            Some("success") => Some(PostOn::Success),
            Some("failure") => Some(PostOn::Failure),
            Some("always") => Some(PostOn::Always),
            Some(other) => {
                t.invalid("on", format!("{other:?}: expected \"success\", \"failure\" or \"always\""));
                None
            }
            None => None,
        }
    } else {
        Some(PostOn::Always)
    };
    let check_service = |key: &str, s: &str, app: bool| {
        if let Some(k) = known {
            if !k.services.contains(s) {
                t.invalid(key, format!("{s:?} is no [services.NAME]"));
            } else if app && k.parsed.contains(s) && !k.app_services.contains(s) {
                t.invalid(key, format!("service {s:?} has no app section: nonstop deploys only app services"));
            }
        }
    };
    let action = match actions.as_slice() {
        ["run"] => {
            for k in ["version", "artifact", "strategy", "url", "rate", "duration_ms", "thresholds"] {
                if t.has(k) {
                    t.invalid(k, "only deploy and verify steps take this key");
                }
            }
            t.string("run").map(Action::Run)
        }
        ["deploy"] => {
            let service = t.string("deploy");
            if let Some(s) = &service {
                check_service("deploy", s, true);
            }
            let version = t.string("version");
            let artifact = if t.has("artifact") { t.string("artifact").map(Some) } else { Some(None) };
            let strategy = if t.has("strategy") {
                t.string("strategy")
                    .and_then(|s| Strategy::parse(&s).map_err(|e| t.invalid("strategy", e)).ok())
                    .map(Some)
            } else {
                Some(None)
            };
            Some(Action::Deploy { service: service?, version: version?, artifact: artifact?, strategy: strategy? })
        }
        ["verify"] => {
            let service = t.string("verify");
            if let Some(s) = &service {
                check_service("verify", s, false);
            }
            let url = if t.has("url") { t.string("url").map(Some) } else { Some(None) };
            let rate = t.int_in("rate", 1, 1_000_000);
            let duration = t.ms_in("duration_ms", 100, 3_600_000);
            let thresholds = t.strings("thresholds");
            Some(Action::Verify {
                service: service?,
                url: url?,
                rate: rate? as u32,
                duration: duration?,
                thresholds: thresholds?,
            })
        }
        [] => {
            t.invalid_table("a step needs one of run (a shell command), deploy (a service) or verify (a service)");
            None
        }
        several => {
            t.invalid_table(format!("a step is one of run, deploy or verify, not {}", several.join(" and ")));
            None
        }
    };
    t.finish();
    Some(PostStep {
        on: on?,
        step: Step {
            name: name?,
            action: action?,
            env: env?,
            timeout: timeout?,
            retries: retries? as u32,
            when: when?,
            artifacts: artifacts?,
            dir: None,
            host: None,
        },
    })
}

/// `stages` and `post` of a table (a `[pipelines.NAME]` or a pipeline file's root).
fn parse_stages(t: &Table<'_, '_>, known: Option<&Known<'_>>) -> (Option<Vec<Stage>>, Option<Vec<PostStep>>) {
    let mut ok = true;
    let mut stages = Vec::new();
    let mut step_names = BTreeSet::new();
    for (i, s) in t.array_of_tables("stages", "stages[]").into_iter().enumerate() {
        let name = if s.has("name") { s.string("name") } else { Some(format!("stage{}", i + 1)) };
        let mut steps = Vec::new();
        let raw_steps = s.array_of_tables("steps", "stages[].steps[]");
        if raw_steps.is_empty() && !s.has("steps") {
            s.required("steps");
            ok = false;
        }
        for (j, st) in raw_steps.into_iter().enumerate() {
            match parse_step(st, j, known, false) {
                Some(p) => steps.push(p.step),
                None => ok = false,
            }
        }
        s.finish();
        match name {
            Some(name) => {
                for st in &steps {
                    if !step_names.insert(format!("{name}/{}", st.name)) {
                        s.invalid("steps", format!("two steps of stage {name:?} are named {:?}", st.name));
                        ok = false;
                    }
                }
                stages.push(Stage { name, steps });
            }
            None => ok = false,
        }
    }
    let mut post = Vec::new();
    for (j, p) in t.array_of_tables("post", "post[]").into_iter().enumerate() {
        if !p.has("on") {
            p.required("on");
        }
        match parse_step(p, j, known, true) {
            Some(p) => post.push(p),
            None => ok = false,
        }
    }
    if !ok {
        return (None, None);
    }
    // A deploy's artifact must come from an earlier step.
    let mut made: BTreeSet<&str> = BTreeSet::new();
    for st in stages.iter().flat_map(|s| &s.steps) {
        if let Action::Deploy { artifact: Some(a), .. } = &st.action {
            if !made.contains(a.as_str()) {
                t.invalid(
                    "stages",
                    format!("step {:?} deploys artifact {a:?}, which no earlier step declares in artifacts", st.name),
                );
                return (None, None);
            }
        }
        made.extend(st.artifacts.iter().map(String::as_str));
    }
    (Some(stages), Some(post))
}

pub(crate) fn parse_pipeline(name: String, t: Table<'_, '_>, known: &Known<'_>) -> Option<Pipeline> {
    if !valid_pipeline_name(&name) {
        t.invalid_table(format!("{name:?} is not a pipeline name: 1 to 64 characters of [A-Za-z0-9_-]"));
    }
    if !t.has("repo") {
        t.required("repo");
    }
    let repo = t.string("repo");
    let branch = t.string("branch");
    let file = if t.has("file") { t.string("file").map(Some) } else { Some(None) };
    let (stages, post) = parse_stages(&t, Some(known));
    if let (Some(Some(_)), true) = (&file, t.has("stages") || t.has("post")) {
        t.invalid("file", "stages and post come from the file in the repository: set either file or stages");
    }
    if file.as_ref().is_some_and(Option::is_none) && !t.has("stages") {
        t.invalid_table("a pipeline needs stages, or file (a pipeline file in the repository)");
    }
    let common = parse_common(&t, &name);
    let webhook = if t.has("webhook") {
        t.table("webhook", "pipelines.NAME.webhook").and_then(|w| {
            let s = match (w.has("secret_file"), w.has("secret_env")) {
                (true, false) => w.string("secret_file").map(|f| SecretSource::File(PathBuf::from(f))),
                (false, true) => w.string("secret_env").map(SecretSource::Env),
                _ => {
                    w.invalid_table("set exactly one of secret_file or secret_env: a webhook is always signed");
                    None
                }
            };
            w.finish();
            s
        })
    } else {
        None
    };
    let webhook_ok = !t.has("webhook") || webhook.is_some();
    let after = t.strings("after");
    let concurrency = t.string("concurrency").and_then(|c| match c.as_str() {
        "queue" => Some(Concurrency::Queue),
        "forbid" => Some(Concurrency::Forbid),
        "cancel" => Some(Concurrency::Cancel),
        other => {
            t.invalid("concurrency", format!("{other:?}: expected \"queue\", \"forbid\" or \"cancel\""));
            None
        }
    });
    t.finish();
    let c = common?;
    if !webhook_ok {
        return None;
    }
    Some(Pipeline {
        name,
        kind: PipelineKind::Pipeline,
        source: Some(Source { repo: repo?, branch: branch?, file: file? }),
        stages: stages?,
        post: post?,
        env: c.env,
        secrets: c.secrets,
        keep_runs: c.keep_runs,
        concurrency: concurrency?,
        webhook,
        schedule: c.schedule,
        after: after?,
        run_timeout: c.run_timeout,
        log_bytes_max: c.log_bytes_max,
    })
}

struct Common {
    env: Vec<(String, String)>,
    secrets: Vec<Secret>,
    keep_runs: u32,
    schedule: Option<ScheduleSpec>,
    run_timeout: Duration,
    log_bytes_max: u64,
}

/// The keys pipelines and jobs share.
fn parse_common(t: &Table<'_, '_>, name: &str) -> Option<Common> {
    let env = env_of(t, "env");
    let mut secrets = Some(Vec::new());
    if t.has("secrets") {
        for (sname, st) in t.table_of_tables("secrets", "pipelines.NAME.secrets.NAME") {
            if !valid_env_name(&sname) {
                st.invalid_table(format!("{sname:?} is not an environment variable name (a secret's name is one)"));
            }
            let source = parse_secret_source(&st, "a secret");
            st.finish();
            match (source, &mut secrets) {
                (Some(source), Some(list)) => list.push(Secret { name: sname, source }),
                _ => secrets = None,
            }
        }
    }
    let keep_runs = t.int_in("keep_runs", 1, 100_000);
    let schedule = parse_schedule(t, name);
    let run_timeout = t.ms_in("timeout_ms", 1, 7 * 86_400_000);
    let log_bytes_max = t.int_in("log_bytes_max", 1024, 1 << 30);
    Some(Common {
        env: env?,
        secrets: secrets?,
        keep_runs: keep_runs? as u32,
        schedule: schedule?,
        run_timeout: run_timeout?,
        log_bytes_max: log_bytes_max?,
    })
}

pub(crate) fn parse_job(name: String, t: Table<'_, '_>, known: &Known<'_>) -> Option<Pipeline> {
    if !valid_pipeline_name(&name) {
        t.invalid_table(format!("{name:?} is not a job name: 1 to 64 characters of [A-Za-z0-9_-]"));
    }
    if !t.has("command") {
        t.required("command");
    }
    let command = t.string("command");
    let dir = if t.has("dir") { t.string("dir").map(|d| Some(PathBuf::from(d))) } else { Some(None) };
    let host = if t.has("host") {
        t.string("host").and_then(|h| match known.hosts.get(&h) {
            Some(host) => Some(Some(host.clone())),
            // Its own errors are reported where it is.
            None if known.host_names.contains(&h) => None,
            None => {
                let defined: Vec<&str> = known.host_names.iter().map(String::as_str).collect();
                t.invalid(
                    "host",
                    format!(
                        "{h:?} is not a [hosts.NAME] table (defined: {})",
                        if defined.is_empty() { "none".to_string() } else { defined.join(", ") }
                    ),
                );
                None
            }
        })
    } else {
        Some(None)
    };
    let common = parse_common(&t, &name);
    t.finish();
    let c = common?;
    let step = Step {
        name: "command".into(),
        action: Action::Run(command?),
        env: Vec::new(),
        timeout: c.run_timeout,
        retries: 0,
        when: When::default(),
        artifacts: Vec::new(),
        dir: dir?,
        host: host?,
    };
    Some(Pipeline {
        name,
        kind: PipelineKind::Job,
        source: None,
        stages: vec![Stage { name: "job".into(), steps: vec![step] }],
        post: Vec::new(),
        env: c.env,
        secrets: c.secrets,
        keep_runs: c.keep_runs,
        // A job never overlaps itself.
        concurrency: Concurrency::Forbid,
        webhook: None,
        schedule: c.schedule,
        after: Vec::new(),
        run_timeout: c.run_timeout,
        log_bytes_max: c.log_bytes_max,
    })
}

/// A pipeline file kept in a repository: its `stages` and `post`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineFile {
    pub stages: Vec<Stage>,
    pub post: Vec<PostStep>,
}

impl PipelineFile {
    /// Parses a pipeline file's text. Services named by deploy and verify steps are checked by the runner, which
    /// knows them, not here.
    pub fn parse(text: &str) -> Result<PipelineFile, ConfigErrors> {
        let root = crate::walk::parse_toml(text)?;
        let cx = Cx::new(text);
        let t = Table::new(&cx, "pipeline file", String::new(), root.get_ref(), 1);
        let (stages, post) = parse_stages(&t, None);
        if !t.has("stages") {
            t.required("stages");
        }
        t.finish();
        cx.finish(stages.zip(post).map(|(stages, post)| PipelineFile { stages, post }))
    }
}
