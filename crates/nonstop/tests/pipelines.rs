//! Pipeline and scheduled-job tests (docs/pipelines.md): the real `nonstop serve` with a config in a TempDir, a
//! bare git repository in the TempDir as the forge (testkit's `git::Repo`, holding examples/pipeline, the Python
//! example app), pushes announced by signed webhooks on the admin listener, and runs watched on the admin API.
//!
//! The app service of the deploy tests starts at version `v0` from a copy of examples/pipeline in the TempDir (the
//! "seed"): its command is `python3 ${NONSTOP_ARTIFACT:-SEED}/app.py ...`, so the first version serves before any
//! pipeline ran, and a version a pipeline deployed runs from its artifact (`NONSTOP_ARTIFACT`, the stored `dist`).
//! A rollback to `v0` runs the seed again.
//!
//! The tests share the machine's two cores, so they run one at a time; each has its own TempDir, repository,
//! state_dir and port range. Every wait is bounded by a deadline.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nonstop_testkit::git::{self, Repo};
use nonstop_testkit::{get, post_json, Proc, Resp, TempDir};
use serde_json::Value;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SECRET: &str = "hook-secret-4f1c9a";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

fn example_app() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/pipeline")
}

/// A port range of its own for each test (below the ephemeral range, apart from deploy.rs's), so instances never
/// meet another test's.
fn ports(slot: u16) -> (u16, u16) {
    let base = 23_000 + (std::process::id() % 200) as u16 * 40 + slot * 10;
    (base, base + 9)
}

/// A TOML basic string of `s`.
fn q(s: impl AsRef<str>) -> String {
    serde_json::to_string(s.as_ref()).unwrap()
}

/// `nonstop serve --config CONFIG` with `env` added to its environment (through env(1), which execs: the pid is
/// nonstop's), and its admin address.
struct Server {
    proc: Proc,
    admin: SocketAddr,
    config: PathBuf,
    env: Vec<(String, String)>,
}

impl Server {
    fn start(config: &Path, env: &[(&str, &str)]) -> Server {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut args: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        args.extend([bin().display().to_string(), "serve".into(), "--config".into(), config.display().to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = Proc::start(Path::new("/usr/bin/env"), &args);
        let admin = proc.addr_after("admin").expect("serve names its admin address");
        Server { proc, admin, config: config.to_path_buf(), env }
    }

    /// kill -9, then the same config (and environment) again.
    fn kill_9_and_restart(&mut self) {
        self.proc.signal(libc::SIGKILL);
        assert!(self.proc.wait_exit(Duration::from_secs(10)).is_some(), "serve died of SIGKILL");
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        *self = Server::start(&self.config.clone(), &env);
    }

    /// Runs `nonstop ARGS --admin ADMIN`, killed after `limit`; its output.
    fn cli(&self, args: &[&str], limit: Duration) -> Output {
        let admin = self.admin.to_string();
        let out = bounded(Command::new(bin()).args(args).args(["--admin", &admin]), limit);
        eprintln!(
            "$ nonstop {} (exit {:?})\n{}{}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

/// Runs `cmd` to its end, or kills it (by its pid) after `limit` and panics.
fn bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let read_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let read_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: read_out.join().unwrap(), stderr: read_err.join().unwrap() }
}

/// The number of the run a 202/200 names: `{"run": RUN}` (RUN's `number`), or a bare number.
fn number(v: &Value) -> u64 {
    v["number"].as_u64().or_else(|| v.as_u64()).unwrap_or_else(|| panic!("not a run: {v}"))
}

fn is_final(state: &Value) -> bool {
    matches!(state.as_str(), Some("succeeded" | "failed" | "cancelled" | "interrupted" | "superseded" | "skipped"))
}

async fn runs(admin: SocketAddr, name: &str) -> Vec<Value> {
    let r = get(admin, &format!("/pipelines/{name}/runs")).await;
    assert_eq!(r.status, 200, "GET /pipelines/{name}/runs: {:?}", r.body);
    r.json()["runs"].as_array().unwrap_or_else(|| panic!("no runs array: {}", r.json())).clone()
}

async fn run(admin: SocketAddr, name: &str, n: u64) -> Value {
    let r = get(admin, &format!("/pipelines/{name}/runs/{n}")).await;
    assert_eq!(r.status, 200, "GET /pipelines/{name}/runs/{n}: {:?}", r.body);
    r.json()
}

/// Polls run `n` until `ok` holds, up to `limit`.
async fn wait_run(
    admin: SocketAddr,
    name: &str,
    n: u64,
    limit: Duration,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let r = get(admin, &format!("/pipelines/{name}/runs/{n}")).await;
        if r.status == 200 && ok(&r.json()) {
            return r.json();
        }
        assert!(
            Instant::now() < deadline,
            "run {name}#{n} not {what} within {limit:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for run `n` to end (any final state); the run.
async fn wait_done(admin: SocketAddr, name: &str, n: u64, limit: Duration) -> Value {
    let r = wait_run(admin, name, n, limit, "ended", |r| is_final(&r["state"])).await;
    eprintln!("run {name}#{n} ended: {r:#}");
    r
}

/// The step `name` of a run (stages' steps).
fn step<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no step {name:?} in {run:#}"))
}

/// POST /hooks/NAME with a forge's (headers, body).
async fn hook(admin: SocketAddr, name: &str, (headers, body): (Vec<(String, String)>, Vec<u8>)) -> Resp {
    git::post_raw(admin, &format!("/hooks/{name}"), &headers, &body).await
}

/// A signed GitHub push of `commit` to main; the new run's number (202).
async fn push(admin: SocketAddr, name: &str, repo: &Repo, delivery: &str, commit: &str) -> u64 {
    let r = hook(admin, name, git::github_push(SECRET.as_bytes(), delivery, "main", commit, &repo.url())).await;
    assert_eq!(r.status, 202, "push {delivery}: {}", String::from_utf8_lossy(&r.body));
    number(&r.json()["run"])
}

/// POST /pipelines/NAME/runs {"ref": "main"}; the new run's number (202).
async fn start_run(admin: SocketAddr, name: &str) -> u64 {
    let r = post_json(admin, &format!("/pipelines/{name}/runs"), &[], r#"{"ref": "main"}"#).await;
    assert_eq!(r.status, 202, "start {name}: {}", String::from_utf8_lossy(&r.body));
    number(&r.json()["run"])
}

/// The body of GET `path` through the proxy, polled until it is `want`, up to `limit`.
async fn wait_body(addr: SocketAddr, path: &str, want: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let got = match nonstop_testkit::send(addr, nonstop_testkit::Method::GET, path, &[], Vec::new()).await {
            Ok(r) => format!("{} {}", r.status, String::from_utf8_lossy(&r.body)),
            Err(e) => format!("error {e}"),
        };
        if got == format!("200 {want}") {
            return;
        }
        assert!(Instant::now() < deadline, "GET {path} never answered {want:?} within {limit:?}; last: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The common part of a config: state_dir, a listener, the admin API on port 0.
fn head(dir: &TempDir) -> String {
    format!(
        "state_dir = {}\n\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [access_log]\nenabled = false\n\n",
        q(dir.path().join("state").display().to_string()),
    )
}

/// The config of the deploy tests: service `web` (two instances of the example app, `v0` from the seed) and
/// pipeline `web` (build, test, ship: deploy + verify with `thresholds`, a post step on failure).
fn web_config(dir: &TempDir, repo: &Repo, slot: u16, thresholds: &[&str]) -> PathBuf {
    let seed = dir.path().join("seed");
    git::copy_tree(&example_app(), &seed);
    let (lo, hi) = ports(slot);
    let command =
        format!("python3 ${{NONSTOP_ARTIFACT:-{}}}/app.py --port {{port}} --version {{version}}", seed.display());
    let thresholds: Vec<String> = thresholds.iter().map(q).collect();
    let text = format!(
        "{head}[[routes]]\nservice = \"web\"\n\n[services.web]\nresponse_timeout_ms = 10000\n\n\
         [services.web.app]\ncommand = {command}\nversion = \"v0\"\ncount = 2\nports = \"{lo}-{hi}\"\n\
         ready_interval_ms = 100\nready_timeout_ms = 15000\nsoak_ms = 2000\nstep_ms = 1000\n\
         # Two cores run the load, the proxy, the pipeline and the instances: latency is noise here, failures are not.\n\
         p99_slack_ms = 2000\n\n\
         [pipelines.web]\nrepo = {repo}\nbranch = \"main\"\nwebhook = {{ secret_env = \"WEB_HOOK_SECRET\" }}\n\n\
         [[pipelines.web.stages]]\nname = \"build\"\n\
         steps = [{{ name = \"compile\", run = \"sh build.sh\", artifacts = [\"dist\"] }}]\n\n\
         [[pipelines.web.stages]]\nname = \"test\"\n\
         steps = [{{ name = \"unit\", run = \"python3 -m unittest -q\", timeout_ms = 60000 }}]\n\n\
         [[pipelines.web.stages]]\nname = \"ship\"\nsteps = [\n\
         \x20 {{ name = \"deploy\", deploy = \"web\", artifact = \"dist\" }},\n\
         \x20 {{ name = \"verify\", verify = \"web\", rate = 20, duration_ms = 3000, thresholds = [{thresholds}] }},\n]\n\n\
         [[pipelines.web.post]]\non = \"failure\"\nrun = {post}\n",
        head = head(dir),
        command = q(command),
        repo = q(repo.url()),
        thresholds = thresholds.join(", "),
        post = q(format!("echo \"run $NONSTOP_RUN failed\" >> {}", dir.path().join("post-failure.txt").display())),
    );
    let path = dir.path().join("nonstop.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A repository of the example app and `nonstop serve` with the web config, serving `v0`.
async fn web_rig(tag: &str, slot: u16, thresholds: &[&str]) -> (TempDir, Repo, Server) {
    let dir = TempDir::new(tag);
    let repo = Repo::new(&dir.path().join("forge"), &example_app());
    let config = web_config(&dir, &repo, slot, thresholds);
    let server = Server::start(&config, &[("WEB_HOOK_SECRET", SECRET)]);
    wait_body(server.proc.addr, "/", "hello from v0\n", Duration::from_secs(30)).await;
    (dir, repo, server)
}

/// The version of each instance of the one app service (`nonstop status --json`), once no deploy runs.
fn instance_versions(server: &Server) -> Option<Vec<String>> {
    let out = server.cli(&["status", "--json"], Duration::from_secs(30));
    assert!(out.status.success());
    let s = serde_json::from_slice::<Value>(&out.stdout).unwrap()["services"][0].clone();
    if !s["deploy"].is_null() {
        return None;
    }
    Some(s["instances"].as_array()?.iter().map(|i| i["version"].as_str().unwrap_or_default().to_string()).collect())
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// The log of run `n`: every step's text, joined, and the raw answer.
async fn stored_log(admin: SocketAddr, name: &str, n: u64) -> (String, Value) {
    let r = get(admin, &format!("/pipelines/{name}/runs/{n}/log")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let doc = r.json();
    let text = doc["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps in the log: {doc}"))
        .iter()
        .map(|s| {
            format!(
                "[{} / {}]\n{}\n",
                s["stage"].as_str().unwrap_or(""),
                s["name"].as_str().unwrap_or(""),
                s["log"].as_str().unwrap_or("")
            )
        })
        .collect();
    (text, doc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_builds_tests_deploys_under_load_and_verifies() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (dir, repo, server) = web_rig("pipe-push", 0, &["p99<2s", "error_rate<1%"]).await;
    let admin = server.admin;
    assert_eq!(runs(admin, "web").await, Vec::<Value>::new(), "nothing ran before the push");

    // GET / through the proxy, at a modest rate, for longer than the run takes.
    let scenario = dir.path().join("reads.toml");
    std::fs::write(&scenario, "[[flow]]\nname = \"read\"\n[[flow.step]]\nurl = \"/\"\n").unwrap();
    let args = ["--rate", "25", "--duration", "35s", "--connections", "200", "--timeout", "30s"];
    let args = [&args[..], &["--track-header", "X-App-Version"]].concat();
    let load = nonstop_testkit::run_load(bin(), server.proc.addr, &scenario, &args, dir.path());
    tokio::time::sleep(Duration::from_secs(1)).await;

    let commit = repo.commit("say what changed", &[("CHANGES.txt", "the first release by a pipeline\n")]);
    let r = hook(admin, "web", git::github_push(SECRET.as_bytes(), "delivery-1", "main", &commit, &repo.url())).await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let queued = r.json()["run"].clone();
    let nr = number(&queued);
    assert_eq!((queued["pipeline"].as_str(), queued["trigger"].as_str()), (Some("web"), Some("push")), "{queued}");
    assert_eq!(queued["commit"], commit.as_str(), "{queued}");
    assert_eq!(queued["delivery"], "delivery-1", "{queued}");

    let done = wait_done(admin, "web", nr, Duration::from_secs(90)).await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    assert_eq!((done["branch"].as_str(), done["commit"].as_str()), (Some("main"), Some(commit.as_str())));
    let kinds: Vec<(&str, &str, &str)> = done["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["stage"].as_str().unwrap(), s["name"].as_str().unwrap(), s["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("checkout", "git", "checkout"),
            ("build", "compile", "run"),
            ("test", "unit", "run"),
            ("ship", "deploy", "deploy"),
            ("ship", "verify", "verify")
        ]
    );
    for s in done["steps"].as_array().unwrap() {
        assert_eq!(s["state"], "succeeded", "{s}");
        assert_eq!(s["attempts"], 1, "{s}");
    }
    assert_eq!(step(&done, "unit")["exit_code"], 0);
    assert!(done["started_ms"].as_u64().is_some() && done["ended_ms"].as_u64() >= done["started_ms"].as_u64());

    // The version is the commit's 12 first hex digits, and it serves from the artifact.
    let version = &commit[..12];
    let now = get(server.proc.addr, "/").await;
    assert_eq!(String::from_utf8_lossy(&now.body), format!("hello from {version}\n"));
    assert_eq!(now.header("x-app-version"), Some(version));
    assert_eq!(instance_versions(&server), Some(vec![version.to_string(), version.to_string()]));

    // Not one request failed, while both versions answered.
    let doc = load.join().unwrap();
    let req = &doc["requests"];
    let brief = format!("requests {req} errors {} status {} headers {}", doc["errors"], doc["status"], doc["headers"]);
    assert!(n(&req["ok"]) > 0, "{brief}");
    assert_eq!(n(&req["failed"]), 0, "{brief}");
    assert_eq!(n(&req["not_sent"]), 0, "{brief}");
    assert_eq!(n(&req["ok"]), n(&req["scheduled"]), "every outcome ok: {brief}");
    assert!(doc["headers"]["v0"].as_u64().unwrap_or(0) > 0, "{brief}");
    assert!(doc["headers"][version].as_u64().unwrap_or(0) > 0, "the load outlasted the deploy: {brief}");

    // The stored log, and the same as Server-Sent Events that end with the run's state.
    let (text, _) = stored_log(admin, "web", nr).await;
    assert!(text.contains("Ran 2 tests"), "{text}");
    let sse =
        tokio::time::timeout(Duration::from_secs(20), get(admin, &format!("/pipelines/web/runs/{nr}/log?follow=1")))
            .await
            .expect("the event stream of an ended run ends");
    assert_eq!(sse.status, 200);
    assert!(sse.header("content-type").unwrap_or_default().starts_with("text/event-stream"), "{:?}", sse.headers);
    let events = String::from_utf8_lossy(&sse.body).into_owned();
    let lines: Vec<Value> = events
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str(d.trim()).ok())
        .collect();
    assert!(
        lines.iter().any(|l| l["stage"] == "test"
            && l["name"] == "unit"
            && l["line"].as_str().is_some_and(|t| t.contains("Ran 2 tests"))),
        "{events}"
    );
    let end = events.split("event: end").nth(1).unwrap_or_else(|| panic!("no end event: {events}"));
    assert!(end.contains("\"succeeded\""), "{events}");

    // The CLI lists it, and GET /pipelines names it as the last run.
    let out = server.cli(&["runs", "web", "--json"], Duration::from_secs(30));
    assert!(out.status.success());
    let listed: Value = serde_json::from_slice(&out.stdout).expect("runs --json is JSON");
    let listed = listed.get("runs").cloned().unwrap_or(listed);
    assert_eq!(listed[0]["number"], nr, "{listed}");
    assert_eq!(listed[0]["state"], "succeeded", "{listed}");
    let all = get(admin, "/pipelines").await.json();
    let web =
        all["pipelines"].as_array().unwrap().iter().find(|p| p["name"] == "web").unwrap_or_else(|| panic!("{all}"));
    assert_eq!(web["kind"], "pipeline", "{web}");
    assert_eq!(web["last_run"]["number"], nr, "{web}");
    assert!(!dir.path().join("post-failure.txt").exists(), "the post step runs on failure only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_tests_fail_never_deploys() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (dir, repo, server) = web_rig("pipe-tests-fail", 1, &["p99<2s", "error_rate<1%"]).await;
    let admin = server.admin;
    let broken = repo.read("test_app.py").replace("\"hello from v7\\n\"", "\"goodbye from v7\\n\"");
    assert!(broken.contains("goodbye"), "test_app.py changed: {broken}");
    let commit = repo.commit("expect another greeting", &[("test_app.py", &broken)]);
    let nr = push(admin, "web", &repo, "delivery-broken", &commit).await;
    let done = wait_done(admin, "web", nr, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "failed", "{done:#}");
    assert_eq!(step(&done, "compile")["state"], "succeeded", "{done:#}");
    let unit = step(&done, "unit");
    assert_eq!(unit["state"], "failed", "{unit}");
    assert!(unit["exit_code"].as_i64().is_some_and(|c| c != 0), "a non-zero exit code: {unit}");
    for name in ["deploy", "verify"] {
        assert_eq!(step(&done, name)["state"], "skipped", "{done:#}");
    }
    let (text, _) = stored_log(admin, "web", nr).await;
    assert!(text.contains("goodbye from v7"), "the failing assertion is in the log: {text}");

    // The post step ran (on failure), and nothing was deployed.
    let post = dir.path().join("post-failure.txt");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !post.exists() {
        assert!(Instant::now() < deadline, "the post step on failure did not run: {done:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&post).unwrap();
        if text == format!("run {nr} failed\n") {
            break;
        }
        assert!(Instant::now() < deadline, "post step wrote {text:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_body(server.proc.addr, "/", "hello from v0\n", Duration::from_secs(1)).await;
    assert_eq!(instance_versions(&server), Some(vec!["v0".to_string(), "v0".to_string()]));

    // The CLI: a followed run of the same (broken) head exits 1; `runs --json` lists both, newest first.
    let out = server.cli(&["run", "web", "--follow"], Duration::from_secs(90));
    assert_eq!(out.status.code(), Some(1), "a failed run exits 1");
    let shown = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(shown.contains("goodbye from v7"), "--follow streams the log: {shown}");
    let out = server.cli(&["runs", "web", "--json"], Duration::from_secs(30));
    assert!(out.status.success());
    let listed: Value = serde_json::from_slice(&out.stdout).expect("runs --json is JSON");
    let listed = listed.get("runs").cloned().unwrap_or(listed);
    let got: Vec<(u64, &str, &str)> = listed
        .as_array()
        .unwrap_or_else(|| panic!("{listed}"))
        .iter()
        .map(|r| (n(&r["number"]), r["trigger"].as_str().unwrap_or(""), r["state"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(got, [(nr + 1, "manual", "failed"), (nr, "push", "failed")]);
    assert_eq!(instance_versions(&server), Some(vec!["v0".to_string(), "v0".to_string()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_fails_verify_is_rolled_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (_dir, repo, server) = web_rig("pipe-verify-fail", 2, &["p99<150ms"]).await;
    let admin = server.admin;
    let commit = repo.commit("think before answering", &[("settings.json", "{\"delay_ms\": 400}\n")]);
    let nr = push(admin, "web", &repo, "delivery-slow", &commit).await;
    let done = wait_done(admin, "web", nr, Duration::from_secs(90)).await;
    assert_eq!(done["state"], "failed", "{done:#}");
    for name in ["compile", "unit", "deploy"] {
        assert_eq!(step(&done, name)["state"], "succeeded", "{done:#}");
    }
    assert_eq!(step(&done, "verify")["state"], "failed", "{done:#}");
    let reason = done["reason"].as_str().unwrap_or_else(|| panic!("a failed run has a reason: {done:#}"));
    assert!(reason.contains("p99"), "the reason names the threshold: {reason}");
    // Rolled back to the version before the pipeline's deploy.
    wait_body(server.proc.addr, "/", "hello from v0\n", Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = instance_versions(&server);
        if v == Some(vec!["v0".to_string(), "v0".to_string()]) {
            break;
        }
        assert!(Instant::now() < deadline, "not rolled back to v0: {v:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signatures_get_401_and_replays_start_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = TempDir::new("pipe-hooks");
    let repo = Repo::new(&dir.path().join("forge"), &example_app());
    let echo = nonstop_testkit::echo::start("echo").await;
    let text = format!(
        "{head}[[routes]]\nservice = \"echo\"\n\n[services.echo]\nservers = [{{ addr = \"{echo}\" }}]\n\n\
         [pipelines.hooks]\nrepo = {repo}\nbranch = \"main\"\nwebhook = {{ secret_env = \"HOOKS_SECRET\" }}\n\n\
         [[pipelines.hooks.stages]]\nname = \"check\"\nsteps = [{{ name = \"true\", run = \"true\" }}]\n",
        head = head(&dir),
        repo = q(repo.url()),
    );
    let config = dir.path().join("nonstop.toml");
    std::fs::write(&config, text).unwrap();
    let server = Server::start(&config, &[("HOOKS_SECRET", SECRET)]);
    let admin = server.admin;
    let commit = repo.head();
    let url = repo.url();

    // A wrong secret, no signature, a signature of another body: 401, and nothing runs.
    let r = hook(admin, "hooks", git::github_push(b"not-the-secret", "d-wrong", "main", &commit, &url)).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    assert!(r.json()["error"].is_string(), "{}", r.json());
    let (headers, body) = git::github_push(SECRET.as_bytes(), "d-missing", "main", &commit, &url);
    let unsigned: Vec<(String, String)> = headers.iter().filter(|(k, _)| k != "x-hub-signature-256").cloned().collect();
    assert_eq!(hook(admin, "hooks", (unsigned, body.clone())).await.status, 401);
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    assert_eq!(hook(admin, "hooks", (headers.clone(), tampered)).await.status, 401);
    let r = hook(admin, "hooks", git::gitlab_push("not-the-secret", "d-gl-wrong", "main", &commit, &url)).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    let r = hook(admin, "hooks", git::gitea_push(b"not-the-secret", "d-gt-wrong", "main", &commit, &url)).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    assert_eq!(runs(admin, "hooks").await, Vec::<Value>::new(), "no run from an unsigned push");

    // A good delivery runs; the same delivery again is a duplicate of that run and starts nothing.
    let good = git::github_push(SECRET.as_bytes(), "d-good", "main", &commit, &url);
    let r = hook(admin, "hooks", good.clone()).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let first = number(&r.json()["run"]);
    let r = hook(admin, "hooks", good).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["duplicate"], true, "{}", r.json());
    assert_eq!(number(&r.json()["run"]), first, "{}", r.json());
    assert_eq!(runs(admin, "hooks").await.len(), 1);
    wait_done(admin, "hooks", first, Duration::from_secs(30)).await;

    // Gitea's and GitLab's signed pushes run too; a push to another branch is ignored.
    let r = hook(admin, "hooks", git::gitea_push(SECRET.as_bytes(), "d-gitea", "main", &commit, &url)).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let gitea = number(&r.json()["run"]);
    wait_done(admin, "hooks", gitea, Duration::from_secs(30)).await;
    let r = hook(admin, "hooks", git::gitlab_push(SECRET, "d-gitlab", "main", &commit, &url)).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let gitlab = number(&r.json()["run"]);
    let r = hook(admin, "hooks", git::github_push(SECRET.as_bytes(), "d-other", "feature", &commit, &url)).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert!(r.json()["ignored"].is_string(), "{}", r.json());
    assert!(r.json().get("run").is_none_or(Value::is_null), "{}", r.json());
    let done = wait_done(admin, "hooks", gitlab, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let all = runs(admin, "hooks").await;
    let got: Vec<(u64, &str, &str)> = all
        .iter()
        .map(|r| (n(&r["number"]), r["delivery"].as_str().unwrap_or(""), r["state"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        got,
        [(gitlab, "d-gitlab", "succeeded"), (gitea, "d-gitea", "succeeded"), (first, "d-good", "succeeded")],
        "newest first, one run per delivery"
    );
}

/// Polls the runs of `name` until run `last` ended; panics if two ever ran at once. The states seen, per run.
async fn watch_one_at_a_time(admin: SocketAddr, name: &str, last: u64, limit: Duration) -> BTreeMap<u64, Vec<String>> {
    let deadline = Instant::now() + limit;
    let mut seen: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    loop {
        let all = runs(admin, name).await;
        let running: Vec<u64> = all.iter().filter(|r| r["state"] == "running").map(|r| n(&r["number"])).collect();
        assert!(running.len() <= 1, "{name}: runs {running:?} run at once: {all:#?}");
        for r in &all {
            let states = seen.entry(n(&r["number"])).or_default();
            let s = r["state"].as_str().unwrap_or("?").to_string();
            if states.last() != Some(&s) {
                states.push(s);
            }
        }
        if all.iter().any(|r| n(&r["number"]) == last && is_final(&r["state"])) {
            return seen;
        }
        assert!(Instant::now() < deadline, "{name}#{last} did not end: {all:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_quick_pushes_follow_the_concurrency_policy() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = TempDir::new("pipe-concurrency");
    let repo = Repo::new(&dir.path().join("forge"), &example_app());
    let echo = nonstop_testkit::echo::start("echo").await;
    let pipeline = |name: &str, concurrency: &str| {
        format!(
            "[pipelines.{name}]\nrepo = {repo}\nbranch = \"main\"\n{concurrency}webhook = {{ secret_env = \"WEB_HOOK_SECRET\" }}\n\n\
             [[pipelines.{name}.stages]]\nname = \"slow\"\nsteps = [{{ name = \"wait\", run = \"sleep 3\" }}]\n\n",
            repo = q(repo.url()),
        )
    };
    let text = format!(
        "{head}[[routes]]\nservice = \"echo\"\n\n[services.echo]\nservers = [{{ addr = \"{echo}\" }}]\n\n{queue}{cancel}",
        head = head(&dir),
        queue = pipeline("queued", ""),
        cancel = pipeline("cancelling", "concurrency = \"cancel\"\n"),
    );
    let config = dir.path().join("nonstop.toml");
    std::fs::write(&config, text).unwrap();
    let server = Server::start(&config, &[("WEB_HOOK_SECRET", SECRET)]);
    let admin = server.admin;
    let commits: Vec<String> =
        (1..=3).map(|i| repo.commit(&format!("change {i}"), &[("CHANGES.txt", &format!("{i}\n"))])).collect();

    // "queue": the first runs, the second waits and is replaced by the third, which runs after the first.
    let first = push(admin, "queued", &repo, "q-1", &commits[0]).await;
    wait_run(admin, "queued", first, Duration::from_secs(30), "running", |r| r["state"] == "running").await;
    let second = push(admin, "queued", &repo, "q-2", &commits[1]).await;
    let third = push(admin, "queued", &repo, "q-3", &commits[2]).await;
    assert_eq!((second, third), (first + 1, first + 2));
    let seen = watch_one_at_a_time(admin, "queued", third, Duration::from_secs(60)).await;
    eprintln!("states seen: {seen:?}");
    let (r1, r2, r3) =
        (run(admin, "queued", first).await, run(admin, "queued", second).await, run(admin, "queued", third).await);
    assert_eq!(r1["state"], "succeeded", "{r1:#}");
    assert_eq!(r2["state"], "superseded", "{r2:#}");
    assert_eq!(r3["state"], "succeeded", "{r3:#}");
    assert_eq!(r3["commit"], commits[2].as_str(), "{r3:#}");
    assert!(r2["started_ms"].is_null(), "a superseded run never started: {r2:#}");
    assert!(n(&r3["started_ms"]) >= n(&r1["ended_ms"]), "the third started after the first ended: {r1:#} {r3:#}");

    // "cancel": the second push cancels the running first, and runs once it ended.
    let first = push(admin, "cancelling", &repo, "c-1", &commits[0]).await;
    wait_run(admin, "cancelling", first, Duration::from_secs(30), "running", |r| r["state"] == "running").await;
    let second = push(admin, "cancelling", &repo, "c-2", &commits[1]).await;
    watch_one_at_a_time(admin, "cancelling", second, Duration::from_secs(60)).await;
    let (r1, r2) = (run(admin, "cancelling", first).await, run(admin, "cancelling", second).await);
    assert_eq!(r1["state"], "cancelled", "{r1:#}");
    assert_eq!(step(&r1, "wait")["state"], "cancelled", "{r1:#}");
    assert_eq!(r2["state"], "succeeded", "{r2:#}");
    assert!(n(&r2["started_ms"]) >= n(&r1["ended_ms"]), "{r1:#} {r2:#}");
    // `nonstop run NAME --cancel N` cancels a run by hand.
    let third = start_run(admin, "cancelling").await;
    wait_run(admin, "cancelling", third, Duration::from_secs(30), "running", |r| r["state"] == "running").await;
    let out = server.cli(&["run", "cancelling", "--cancel", &third.to_string()], Duration::from_secs(30));
    assert!(out.status.success());
    let r3 = wait_done(admin, "cancelling", third, Duration::from_secs(30)).await;
    assert_eq!(r3["state"], "cancelled", "{r3:#}");
    assert_eq!(r3["trigger"], "manual", "{r3:#}");
}

/// Standard base64 (with padding) of `data`.
fn base64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let v = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | (b[2] as u32);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            files_under(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_a_stored_log() {
    let _one = ONE_AT_A_TIME.lock().await;
    assert_eq!(base64(b"what do ya want for nothing?"), "d2hhdCBkbyB5YSB3YW50IGZvciBub3RoaW5nPw==");
    let dir = TempDir::new("pipe-secrets");
    let repo = Repo::new(&dir.path().join("forge"), &example_app());
    let echo = nonstop_testkit::echo::start("echo").await;
    let s1 = "alpha-line-7Qx2Rt\nbravo-line-9Wm4Ys\ncharlie-line-3Zk8Pv";
    let s2 = "s2-token-Hq5Vd8LpNc";
    let secret_file = dir.path().join("s1.secret");
    std::fs::write(&secret_file, s1).unwrap();
    let steps = [
        ("echo", r#"echo "$S1"; echo "before $S2 after""#.to_string()),
        ("b64", r#"printf %s "$S2" | base64; printf %s "$S1" | base64 -w0; echo"#.to_string()),
        ("cat", format!("cat {}; echo; echo done", secret_file.display())),
    ];
    let steps: Vec<String> =
        steps.iter().map(|(name, run)| format!("{{ name = {}, run = {} }}", q(name), q(run))).collect();
    let text = format!(
        "{head}[[routes]]\nservice = \"echo\"\n\n[services.echo]\nservers = [{{ addr = \"{echo}\" }}]\n\n\
         [pipelines.secretive]\nrepo = {repo}\nbranch = \"main\"\n\n\
         [pipelines.secretive.secrets]\nS1 = {{ file = {file} }}\nS2 = {{ env = \"S2_FROM_ENV\" }}\n\n\
         [[pipelines.secretive.stages]]\nname = \"leak\"\nsteps = [{steps}]\n",
        head = head(&dir),
        repo = q(repo.url()),
        file = q(secret_file.display().to_string()),
        steps = steps.join(", "),
    );
    let config = dir.path().join("nonstop.toml");
    std::fs::write(&config, text).unwrap();
    let server = Server::start(&config, &[("S2_FROM_ENV", s2)]);
    let admin = server.admin;
    let nr = start_run(admin, "secretive").await;
    let done = wait_done(admin, "secretive", nr, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done:#}");

    let mut needles: Vec<String> = vec![s1.into(), s2.into(), base64(s1.as_bytes()), base64(s2.as_bytes())];
    needles.extend(s1.lines().map(String::from));
    let (text, raw) = stored_log(admin, "secretive", nr).await;
    let raw = raw.to_string();
    for needle in &needles {
        assert!(!text.contains(needle.as_str()) && !raw.contains(needle.as_str()), "{needle:?} is in the log: {text}");
    }
    assert!(text.contains("***"), "the masked values are there as ***: {text}");
    assert!(text.contains("before *** after"), "{text}");
    assert!(text.contains("done"), "{text}");
    let sse = tokio::time::timeout(
        Duration::from_secs(20),
        get(admin, &format!("/pipelines/secretive/runs/{nr}/log?follow=1")),
    )
    .await
    .expect("the event stream of an ended run ends");
    let events = String::from_utf8_lossy(&sse.body).into_owned();
    for needle in &needles {
        assert!(!events.contains(needle.as_str()), "{needle:?} is in the event stream: {events}");
    }

    // Nor in any file nonstop keeps.
    let mut files = Vec::new();
    files_under(&dir.path().join("state"), &mut files);
    assert!(!files.is_empty(), "the state_dir holds the run");
    for f in &files {
        let bytes = std::fs::read(f).unwrap_or_default();
        for needle in &needles {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle.as_bytes()), "{needle:?} is in {}", f.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_job_runs_on_time_and_never_overlaps() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = TempDir::new("pipe-job");
    let echo = nonstop_testkit::echo::start("echo").await;
    let ticks = dir.path().join("ticks.txt");
    let command = format!(
        "echo \"start $NONSTOP_RUN\" >> {f}; echo \"tick=$TICK\"; sleep 2.5; echo \"end $NONSTOP_RUN\" >> {f}",
        f = ticks.display()
    );
    let text = format!(
        "{head}[[routes]]\nservice = \"echo\"\n\n[services.echo]\nservers = [{{ addr = \"{echo}\" }}]\n\n\
         [jobs.tick]\nschedule = \"* * * * * *\"\ncommand = {command}\ntimeout_ms = 20000\n\
         env = {{ TICK = \"yes\" }}\n",
        head = head(&dir),
        command = q(command),
    );
    let config = dir.path().join("nonstop.toml");
    std::fs::write(&config, text).unwrap();
    let server = Server::start(&config, &[]);
    let admin = server.admin;

    // Every second is a fire time; a run takes 2.5 s: the fire times in between are skipped, never run at once.
    let deadline = Instant::now() + Duration::from_secs(20);
    let finished = loop {
        let all = runs(admin, "tick").await;
        let running = all.iter().filter(|r| r["state"] == "running").count();
        assert!(running <= 1, "two runs of a job at once: {all:#?}");
        let finished: Vec<Value> = all.iter().filter(|r| r["state"] == "succeeded").cloned().collect();
        if finished.len() >= 2 {
            break finished;
        }
        assert!(Instant::now() < deadline, "fewer than 2 runs finished: {all:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for r in runs(admin, "tick").await {
        assert_eq!((r["pipeline"].as_str(), r["trigger"].as_str()), (Some("tick"), Some("schedule")), "{r}");
    }
    let lines: Vec<String> = std::fs::read_to_string(&ticks).unwrap().lines().map(String::from).collect();
    let mut numbers = Vec::new();
    for (i, pair) in lines.chunks(2).enumerate() {
        let start = pair[0].strip_prefix("start ").unwrap_or_else(|| panic!("line {}: {lines:?}", 2 * i));
        if let Some(end) = pair.get(1) {
            assert_eq!(end.strip_prefix("end "), Some(start), "start and end alternate, same run: {lines:?}");
        }
        numbers.push(start.parse::<u64>().unwrap_or_else(|_| panic!("NONSTOP_RUN is a number: {lines:?}")));
    }
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
    for r in &finished {
        assert!(numbers.contains(&n(&r["number"])), "run {} wrote its lines: {lines:?}", r["number"]);
        assert_eq!(r["steps"].as_array().map(Vec::len), Some(1), "a job is a one-step run: {r}");
    }
    let all = get(admin, "/pipelines").await.json();
    let tick =
        all["pipelines"].as_array().unwrap().iter().find(|p| p["name"] == "tick").unwrap_or_else(|| panic!("{all}"));
    assert_eq!(tick["kind"], "job", "{tick}");
    assert!(tick["skipped_total"].as_u64().is_some_and(|s| s > 0), "fire times during a run are skipped: {tick}");
    assert!(tick["next_ms"].as_u64().is_some(), "{tick}");
    assert!(!tick["last_run"].is_null(), "{tick}");
    // The stored log of a job's run is its command's output, with the job's env.
    let (text, _) = stored_log(admin, "tick", n(&finished[0]["number"])).await;
    assert!(text.contains("tick=yes"), "{text}");
}

/// Kills (SIGKILL) the process whose pid `file` holds, if it is still a `sleep` of ours, when dropped.
struct KillOnDrop(PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let Some(pid) = std::fs::read_to_string(&self.0).ok().and_then(|s| s.trim().parse::<i32>().ok()) else {
            return;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.starts_with(b"sleep\0") {
            // SAFETY: kill(2) of the step's sleep this test started (checked by its command line just above).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cut_off_by_kill_9_is_marked_interrupted() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = TempDir::new("pipe-kill9");
    let repo = Repo::new(&dir.path().join("forge"), &example_app());
    let echo = nonstop_testkit::echo::start("echo").await;
    let pidfile = dir.path().join("step.pid");
    let _cleanup = KillOnDrop(pidfile.clone());
    // The first run sleeps (its pid in a file, so that the test can end it if the server does not); later ones
    // finish at once.
    let command =
        format!("if [ \"$NONSTOP_RUN\" = 1 ]; then echo $$ > {}; exec sleep 60; fi; echo quick", pidfile.display());
    let text = format!(
        "{head}[[routes]]\nservice = \"echo\"\n\n[services.echo]\nservers = [{{ addr = \"{echo}\" }}]\n\n\
         [pipelines.long]\nrepo = {repo}\nbranch = \"main\"\n\n\
         [[pipelines.long.stages]]\nname = \"wait\"\nsteps = [{{ name = \"sleep\", run = {step} }}]\n",
        head = head(&dir),
        repo = q(repo.url()),
        step = q(command),
    );
    let config = dir.path().join("nonstop.toml");
    std::fs::write(&config, text).unwrap();
    let mut server = Server::start(&config, &[]);
    let first = start_run(server.admin, "long").await;
    assert_eq!(first, 1);
    wait_run(server.admin, "long", first, Duration::from_secs(30), "running its step", |r| {
        r["state"] == "running"
            && r["steps"].as_array().into_iter().flatten().any(|s| s["name"] == "sleep" && s["state"] == "running")
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pidfile.exists() {
        assert!(Instant::now() < deadline, "the step did not start its sleep");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    server.kill_9_and_restart();
    let admin = server.admin;
    let r = run(admin, "long", first).await;
    assert_eq!(r["state"], "interrupted", "{r:#}");
    assert_eq!(step(&r, "git")["state"], "succeeded", "the checkout had ended: {r:#}");
    assert_eq!(step(&r, "sleep")["state"], "interrupted", "{r:#}");
    assert!(!r["ended_ms"].is_null(), "{r:#}");
    let listed = runs(admin, "long").await;
    assert!(listed.iter().all(|r| r["state"] != "running"), "{listed:#?}");
    // A new run starts and finishes.
    let second = start_run(admin, "long").await;
    assert!(second > first);
    let done = wait_done(admin, "long", second, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let (text, _) = stored_log(admin, "long", second).await;
    assert!(text.contains("quick"), "{text}");
    // Still interrupted after the new run, and after another restart.
    server.kill_9_and_restart();
    assert_eq!(run(server.admin, "long", first).await["state"], "interrupted");
}

/// The POSTs a backend received: (Idempotency-Key, when).
type Deliveries = Arc<Mutex<Vec<(String, SystemTime)>>>;

/// A backend on raw sockets: `GET` answers 200; each `POST` is recorded (its Idempotency-Key and when) and gets 201.
fn counting_backend() -> (SocketAddr, Deliveries) {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let record = record.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                loop {
                    let (mut line, mut len, mut start, mut key) = (String::new(), 0usize, String::new(), String::new());
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if start.is_empty() {
                            start = line.clone();
                        } else if line == "\r\n" {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if lower.starts_with("idempotency-key:") {
                            key = line["idempotency-key:".len()..].trim().to_string();
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let status = if start.starts_with("POST") {
                        record.lock().unwrap().push((key, SystemTime::now()));
                        201
                    } else {
                        200
                    };
                    let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok");
                    if w.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_with_a_delivery_window_holds_requests_until_it_opens() {
    window_holds_requests_until_it_opens("").await;
}

/// The same with the requests in RabbitMQ: the queue is consumed only while the window is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_queue_with_a_delivery_window_holds_requests_until_it_opens() {
    window_holds_requests_until_it_opens("store = \"rabbitmq\"\n").await;
}

/// Deletes a nonstop queue's three RabbitMQ queues when dropped.
struct DeleteBrokerQueues(String);

impl Drop for DeleteBrokerQueues {
    fn drop(&mut self) {
        for suffix in ["", ".retry", ".dead"] {
            let name = format!("nonstop.{}{suffix}", self.0);
            let _ = Command::new("rabbitmqctl").args(["delete_queue", &name]).output();
        }
    }
}

async fn window_holds_requests_until_it_opens(store: &str) {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = TempDir::new("pipe-window");
    let (backend, seen) = counting_backend();
    // A queue name of its own, and its broker queues deleted at the end: RabbitMQ's queues outlive the proxy.
    let queue = format!("nightly{}", std::process::id());
    let _broker_queues = (!store.is_empty()).then(|| DeleteBrokerQueues(queue.clone()));
    // The window opens (once a day, UTC) 8 s from now, for 12 s; S M H from the clock, wrapped by the division.
    let opens = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 8;
    let (s, m, h) = (opens % 60, opens / 60 % 60, opens / 3600 % 24);
    let opens_at = UNIX_EPOCH + Duration::from_secs(opens);
    let text = format!(
        "{head}[[routes]]\npath_prefix = \"/orders\"\nmethods = [\"POST\"]\nservice = \"app\"\nqueue = \"{queue}\"\n\n\
         [[routes]]\nservice = \"app\"\n\n\
         [services.app]\nservers = [{{ addr = \"{backend}\" }}]\n[services.app.health]\npath = \"/health\"\n\n\
         [queues.{queue}]\n{store}path = {path}\nbackoff_base_ms = 100\nbackoff_max_ms = 1000\n\
         deliver_window = {{ schedule = \"{s} {m} {h} * * *\", duration_ms = 12000, time_zone = \"UTC\" }}\n",
        head = head(&dir),
        path = q(dir.path().join("nonstop-data").display().to_string()),
    );
    let config = dir.path().join("nonstop.toml");
    std::fs::write(&config, text).unwrap();
    let server = Server::start(&config, &[]);
    let proxy = server.proc.addr;

    let mut accepted = Vec::new();
    for i in 0..5 {
        let r = post_json(proxy, "/orders", &[], &format!("{{\"item\":\"book-{i}\",\"qty\":1}}")).await;
        assert_eq!(r.status, 202, "{:?}", r.body);
        let id = r.json()["id"].as_str().unwrap().to_string();
        accepted.push((id, r.header("location").unwrap().to_string()));
    }
    // Until the window opens, every request waits, queued, and the backend sees none.
    let held_from = SystemTime::now();
    while SystemTime::now() + Duration::from_millis(1000) < opens_at {
        assert_eq!(seen.lock().unwrap().len(), 0, "delivered before the window opened");
        for (_, location) in &accepted {
            let s = get(proxy, location).await.json();
            assert_eq!(s["status"], "queued", "{s}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let held = SystemTime::now().duration_since(held_from).unwrap_or_default();
    assert!(held >= Duration::from_secs(3), "the requests were watched while held for {held:?} only (a slow start?)");

    // Once it opens, all are delivered, each once, under its key.
    let deadline = Instant::now() + Duration::from_secs(40);
    for (id, location) in &accepted {
        loop {
            let s = get(proxy, location).await.json();
            if s["status"] == "done" {
                break;
            }
            assert!(Instant::now() < deadline, "{id} not delivered in the window: {s}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A quiet while: nothing is delivered a second time.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen_all = seen.clone();
    let counted = |s: &Deliveries| s.lock().unwrap().len();
    let seen = seen.lock().unwrap().clone();
    let keys: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    let distinct: HashSet<&str> = keys.iter().copied().collect();
    assert_eq!((keys.len(), distinct.len()), (5, 5), "each delivered exactly once: {keys:?}");
    for (id, _) in &accepted {
        assert!(distinct.contains(id.as_str()), "{id} delivered under its key: {keys:?}");
    }
    for (key, at) in &seen {
        assert!(*at + Duration::from_millis(200) >= opens_at, "{key} delivered before the window opened");
    }

    // Once it has closed, new requests wait again (for tomorrow's opening).
    let closed_at = opens_at + Duration::from_secs(12);
    if let Ok(wait) = closed_at.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait + Duration::from_millis(500)).await;
    }
    let r = post_json(proxy, "/orders", &[], "{\"item\":\"late\",\"qty\":1}").await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let location = r.header("location").unwrap().to_string();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_eq!(get(proxy, &location).await.json()["status"], "queued", "delivered after the window closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(counted(&seen_all), 5, "nothing delivered after the window closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_runs_after_another_with_the_stages_of_its_repository_file() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = TempDir::new("pipe-after");
    let repo = Repo::new(&dir.path().join("forge"), &example_app());
    repo.commit(
        "the pipeline file",
        &[(
            "ci.toml",
            "[[stages]]\nname = \"from-file\"\nsteps = [{ name = \"hello\", run = \"echo from the file\" }]\n",
        )],
    );
    let echo = nonstop_testkit::echo::start("echo").await;
    let text = format!(
        "{head}[[routes]]\nservice = \"echo\"\n\n[services.echo]\nservers = [{{ addr = \"{echo}\" }}]\n\n\
         [pipelines.first]\nrepo = {repo}\n\n[[pipelines.first.stages]]\nsteps = [{{ run = \"true\" }}]\n\n\
         [pipelines.second]\nrepo = {repo}\nfile = \"ci.toml\"\nafter = [\"first\"]\n",
        head = head(&dir),
        repo = q(repo.url()),
    );
    let config = dir.path().join("nonstop.toml");
    std::fs::write(&config, text).unwrap();
    let server = Server::start(&config, &[]);
    let admin = server.admin;
    let first = start_run(admin, "first").await;
    assert_eq!(wait_done(admin, "first", first, Duration::from_secs(30)).await["state"], "succeeded");
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        if let Some(r) = runs(admin, "second").await.into_iter().find(|r| is_final(&r["state"])) {
            break r;
        }
        assert!(Instant::now() < deadline, "no run of second after first succeeded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((after["trigger"].as_str(), after["state"].as_str()), (Some("after"), Some("succeeded")), "{after:#}");
    assert_eq!(step(&after, "hello")["stage"], "from-file", "{after:#}");
    let (log, _) = stored_log(admin, "second", number(&after["number"])).await;
    assert!(log.contains("from the file"), "{log}");

    // A broken pipeline file fails the run, naming the file and the line.
    repo.commit("break it", &[("ci.toml", "[[stages]]\nname = \"x\"\nsteps = [{ nothing = 1 }]\n")]);
    let broken = start_run(admin, "second").await;
    let r = wait_done(admin, "second", broken, Duration::from_secs(30)).await;
    assert_eq!(r["state"], "failed", "{r:#}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("ci.toml") && reason.contains("line 3"), "{r:#}");
}

/// The `sleep` processes in the host's namespace whose command line is `sleep SECONDS`.
fn sleeps_on(host: &nonstop_testkit::sshd::SshHost, seconds: &str) -> Vec<i32> {
    host.processes().into_iter().filter(|(_, cmd)| *cmd == format!("sleep {seconds}")).map(|(p, _)| p).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_on_an_ssh_host_runs_there_masked_and_its_timeout_cancel_and_crash_end_its_process_group() {
    use nonstop_testkit::sshd::{SshHost, SSHD_PORT};
    let _one = ONE_AT_A_TIME.lock().await;
    nonstop_testkit::sshd::require_tools();
    let dir = TempDir::new("pipe-hostjob");
    let d = dir.path().display().to_string();
    let nonstop = |args: &[&str]| Command::new(bin()).args(args).output().expect("run nonstop");
    let echo = nonstop_testkit::echo::start("echo").await;
    let service = format!("[[routes]]\nservice = \"echo\"\n\n[services.echo]\nservers = [{{ addr = \"{echo}\" }}]\n\n");
    let config = dir.path().join("nonstop.toml");
    std::fs::write(&config, format!("{}{service}", head(&dir))).unwrap();
    let keys = nonstop(&["keys", "init", "--config", &config.display().to_string()]);
    assert!(keys.status.success(), "keys init: {}", String::from_utf8_lossy(&keys.stderr));
    let host = SshHost::start(String::from_utf8_lossy(&keys.stdout).trim());
    std::fs::create_dir_all(dir.path().join("work")).unwrap();
    let secret = "s3cret-on-the-host-7c21";
    let text = format!(
        "{head}{service}[hosts.h1]\naddress = \"{ip}:{SSHD_PORT}\"\nuser = \"root\"\ndir = \"{d}/h1\"\nconnect_timeout_ms = 3000\n\n\
         [jobs.report]\nhost = \"h1\"\ndir = \"{d}/work\"\nenv = {{ GREETING = \"hello from the job\" }}\n\
         command = {report}\n\n[jobs.report.secrets]\nTOKEN = {{ env = \"HOSTJOB_TOKEN\" }}\n\n\
         [jobs.slow]\nhost = \"h1\"\ntimeout_ms = 1500\ncommand = \"sleep 301 & echo started; sleep 301\"\n\n\
         [jobs.long]\nhost = \"h1\"\ncommand = \"sleep 302 & echo started; sleep 302\"\n",
        head = head(&dir),
        ip = host.ip,
        report = q("echo \"$GREETING in $(pwd) over $SSH_CONNECTION\"; echo \"token=$TOKEN\"; exit 7"),
    );
    std::fs::write(&config, text).unwrap();
    let trust = nonstop(&["hosts", "trust", "--all", "--config", &config.display().to_string()]);
    assert!(trust.status.success(), "hosts trust: {}", String::from_utf8_lossy(&trust.stderr));
    let mut server = Server::start(&config, &[("HOSTJOB_TOKEN", secret)]);
    let admin = server.admin;
    let start = |name: &'static str| async move {
        let r = post_json(admin, &format!("/pipelines/{name}/runs"), &[], "{}").await;
        assert_eq!(r.status, 202, "start {name}: {}", String::from_utf8_lossy(&r.body));
        number(&r.json()["run"])
    };

    // It runs on the host (sshd there saw the connection to its own address), in its dir, with env and secret.
    let n = start("report").await;
    let r = wait_done(admin, "report", n, Duration::from_secs(30)).await;
    assert_eq!(r["state"], "failed", "{r:#}");
    assert_eq!(r["steps"][0]["exit_code"], 7, "the command's own exit status: {r:#}");
    let (log, _) = stored_log(admin, "report", n).await;
    let on_host = format!("hello from the job in {d}/work over ");
    let line = log.lines().find(|l| l.starts_with(&on_host)).unwrap_or_else(|| panic!("{log}"));
    assert_eq!(line.split(' ').nth_back(1), Some(host.ip.as_str()), "sshd's own address: {line}");
    assert!(log.contains("token=***"), "the secret is masked: {log}");
    assert!(!log.contains(secret) && !log.contains("@@nonstop"), "{log}");
    let mut files = Vec::new();
    files_under(&dir.path().join("state"), &mut files);
    for f in files {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&bytes).contains(secret), "the secret is in {}", f.display());
    }

    // A timeout ends the whole process group on the host, the background sleep too.
    let n = start("slow").await;
    let r = wait_done(admin, "slow", n, Duration::from_secs(30)).await;
    assert_eq!(r["state"], "failed", "{r:#}");
    // The step's own timeout and the run's (both 1500 ms) race; either way the run ended by its timeout.
    let why = r["steps"][0]["message"].as_str().unwrap_or("");
    let reason = r["reason"].as_str().unwrap_or("");
    assert!(why.contains("timed out after 1500 ms") || reason.contains("timeout_ms passed"), "{r:#}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sleeps_on(&host, "301").is_empty() {
        assert!(Instant::now() < deadline, "the timed-out job left {:?} on the host", sleeps_on(&host, "301"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // So does a cancel.
    let n = start("long").await;
    wait_run(admin, "long", n, Duration::from_secs(20), "started on the host", |_| sleeps_on(&host, "302").len() == 2)
        .await;
    let r = post_json(admin, &format!("/pipelines/long/runs/{n}/cancel"), &[], "{}").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = wait_done(admin, "long", n, Duration::from_secs(20)).await;
    assert_eq!(r["state"], "cancelled", "{r:#}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sleeps_on(&host, "302").is_empty() {
        assert!(Instant::now() < deadline, "the cancelled job left {:?} on the host", sleeps_on(&host, "302"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // kill -9 of nonstop serve mid-run: the run is marked interrupted, and the next run of the job ends what the
    // lost one left running on the host before it starts.
    let n = start("long").await;
    wait_run(admin, "long", n, Duration::from_secs(20), "started on the host", |_| sleeps_on(&host, "302").len() == 2)
        .await;
    server.kill_9_and_restart();
    let admin = server.admin;
    let r = wait_done(admin, "long", n, Duration::from_secs(10)).await;
    assert_eq!(r["state"], "interrupted", "{r:#}");
    let left = sleeps_on(&host, "302");
    assert_eq!(left.len(), 2, "the lost run still runs on the host");
    let r = post_json(admin, "/pipelines/long/runs", &[], "{}").await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let again = number(&r.json()["run"]);
    wait_run(admin, "long", again, Duration::from_secs(20), "started", |r| r["state"] == "running").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sleeps_on(&host, "302").iter().any(|p| left.contains(p)) {
        assert!(Instant::now() < deadline, "the lost run's processes {left:?} were not ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let (log, _) = stored_log(admin, "long", again).await;
        if log.contains("killing it") {
            break log;
        }
        assert!(Instant::now() < deadline, "no note of the leftover: {log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(log.contains("an earlier run of this job is still running (process group"), "{log}");
    let r = post_json(admin, &format!("/pipelines/long/runs/{again}/cancel"), &[], "{}").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    wait_done(admin, "long", again, Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sleeps_on(&host, "302").is_empty() {
        assert!(Instant::now() < deadline, "left on the host: {:?}", sleeps_on(&host, "302"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
