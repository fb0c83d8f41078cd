//! A new user's first hour (issue 25, items 1 and 6), through the real binary over real sockets: the quickstart
//! runs with no `nonstop` on PATH ({nonstop} in command), an instance that cannot start says why on `serve`'s
//! stderr and in `status`, a failed deploy names the cause from the instance's log, instance logs are rotated with
//! a bound, instance ids survive a restart of the proxy, and the demo neither deletes what it did not create nor
//! leaves children behind on SIGINT.
//!
//! The tests share the machine's two cores, so they run one at a time.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nonstop_testkit::TempDir;
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A port range of its own for each test, so instances never meet another test's.
fn ports(slot: u16) -> (u16, u16) {
    let base = 12_000 + (std::process::id() % 100) as u16 * 80 + slot * 10;
    (base, base + 9)
}

/// A PATH without the directory of the binary under test (nor any `nonstop`).
const BARE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// `nonstop serve`, its stderr kept in a file; killed when dropped.
struct Serve {
    child: Child,
    admin: String,
    proxy: String,
    stderr: PathBuf,
}

impl Serve {
    fn start(config: &Path, cwd: &Path) -> Serve {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let stderr = cwd.join(format!("serve-{}.stderr", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        let mut child = Command::new(bin())
            .args(["serve", "--config", config.to_str().unwrap()])
            .current_dir(cwd)
            .env("PATH", BARE_PATH)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(line);
                }
            }
        });
        let banner = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("serve did not start: {}", std::fs::read_to_string(&stderr).unwrap_or_default())
        });
        let after = |label: &str| {
            banner.split(label).nth(1).and_then(|r| r.split([',', ')', ' ']).next()).unwrap_or_default().to_string()
        };
        let admin = after("admin http://");
        let proxy = after("listening on http://");
        assert!(!admin.is_empty() && !proxy.is_empty(), "{banner}");
        Serve { child, admin, proxy, stderr }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn nonstop(&self, args: &[&str]) -> Output {
        Command::new(bin()).args(args).args(["--admin", &self.admin]).env("PATH", BARE_PATH).output().unwrap()
    }

    fn status(&self) -> Value {
        let out = self.nonstop(&["status", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn instances(&self) -> Vec<Value> {
        self.status()["services"][0]["instances"].as_array().cloned().unwrap_or_default()
    }

    fn wait_serving(&self, n: usize, version: &str) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let inst = self.instances();
            if inst.len() == n
                && inst.iter().all(|i| i["version"] == version && i["state"] == "serving" && i["healthy"] == true)
            {
                return;
            }
            assert!(Instant::now() < until, "not {n} serving {version}: {inst:?}\nstderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        // SAFETY: kill(2) with the pid of our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let until = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < until, "serve did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> Option<String>) {
    let until = Instant::now() + limit;
    loop {
        match ok() {
            None => return,
            Some(state) if Instant::now() >= until => panic!("{what}: not within {limit:?}; {state}"),
            Some(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A config of one app service `app` on its own ports, in `dir`.
fn config(dir: &Path, slot: u16, app: &str) -> PathBuf {
    let (lo, hi) = ports(slot);
    let text = format!(
        "state_dir = \"{state}\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nservice = \"app\"\n[services.app.app]\nports = \"{lo}-{hi}\"\nready_interval_ms = 100\n\
         soak_ms = 1000\nready_timeout_ms = 5000\nrestart_backoff_base_ms = 100\nrestart_backoff_max_ms = 400\n{app}\n",
        state = dir.join("state").display(),
    );
    let path = dir.join("nonstop.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// examples/quickstart.toml as written, on ports of the test's own: it must run with `nonstop` not on PATH.
#[test]
fn the_quickstart_example_runs_without_nonstop_on_path() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("first-hour-quickstart");
    let example = std::fs::read_to_string(repo().join("examples/quickstart.toml")).unwrap();
    assert!(example.contains("command = \"{nonstop} app "), "the example names the running binary:\n{example}");
    let (lo, hi) = ports(0);
    let mine = example
        .replace("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:0\"")
        .replace("listen = \"127.0.0.1:9900\"", "listen = \"127.0.0.1:0\"")
        .replace("ports = \"9101-9110\"", &format!("ports = \"{lo}-{hi}\""));
    assert_eq!(mine.matches("127.0.0.1:0").count(), 2, "the example's addresses moved: {example}");
    let path = dir.path().join("quickstart.toml");
    std::fs::write(&path, mine).unwrap();
    let serve = Serve::start(&path, dir.path());
    serve.wait_serving(3, "v1");
    let out = Command::new(bin())
        .args(["load", &format!("http://{}/", serve.proxy), "--rate", "50", "--duration", "1s"])
        .args(["--threshold", "failed==0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    for i in serve.instances() {
        assert_eq!(i["restarts"], 0, "{i}");
    }
}

/// A command that fails at once (as `nonstop app` not on PATH did, exit 127): serve's stderr says so with the log's
/// tail, and `status` (the table) shows the last exit and the restarts.
#[test]
fn an_instance_that_exits_before_ready_is_reported_with_its_log_tail() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("first-hour-early-exit");
    let script = dir.path().join("broken.sh");
    let lines: String = (1..=30).map(|n| format!("echo noise line {n}\n")).collect();
    std::fs::write(&script, format!("{lines}echo 'fatal: cannot open settings.ini' >&2\nexit 3\n")).unwrap();
    let path = config(dir.path(), 1, &format!("count = 1\ncommand = \"sh {}\"", script.display()));
    let serve = Serve::start(&path, dir.path());
    wait_for("the warning on serve's stderr", Duration::from_secs(15), || {
        let err = serve.stderr();
        (!err.contains("exited before it was ever ready: exit status 3")).then_some(err)
    });
    let err = serve.stderr();
    let warning = &err[err.find("exited before it was ever ready").unwrap()..];
    assert!(warning.contains("app-1.log"), "names the log: {warning}");
    assert!(warning.contains("fatal: cannot open settings.ini"), "{warning}");
    // The warning's line, then the log's last lines, each "  | ...": ten at most.
    let shown: Vec<&str> = warning.lines().skip(1).take_while(|l| l.starts_with("  | ")).collect();
    assert_eq!(shown.len(), 10, "bounded to 10 lines: {warning}");
    assert_eq!(shown[0], "  | noise line 22", "{warning}");
    assert_eq!(shown[9], "  | fatal: cannot open settings.ini", "{warning}");
    wait_for("two restarts", Duration::from_secs(15), || {
        let i = serve.instances();
        (i[0]["restarts"].as_u64().unwrap_or(0) < 2).then(|| format!("{i:?}"))
    });
    let out = serve.nonstop(&["status"]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    let header = table.lines().find(|l| l.contains("restarts")).unwrap_or_else(|| panic!("{table}"));
    assert!(header.contains("last exit"), "{table}");
    let row = table.lines().find(|l| l.trim_start().starts_with("1 ")).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("exit status 3"), "{table}");
    // The column is right-aligned under its header: read the number that ends where "restarts" ends.
    let end = header.find("restarts").unwrap() + "restarts".len();
    let restarts: u64 =
        row.get(..end).and_then(|r| r.split_whitespace().last()).and_then(|r| r.parse().ok()).unwrap_or(0);
    assert!(restarts >= 2, "{table}");
}

/// A new version whose instance exits at once: the failure and the rollback give the cause from its log.
#[test]
fn a_failed_deploy_gives_the_tail_of_the_failed_instance_log() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("first-hour-deploy-tail");
    let script = dir.path().join("run.sh");
    std::fs::write(
        &script,
        "if [ -n \"$BROKEN\" ]; then echo \"fatal: $NONSTOP_VERSION has no database password\" >&2; exit 4; fi\nexec \"$@\"\n",
    )
    .unwrap();
    let db = dir.path().join("orders.db");
    let app = format!(
        "count = 2\ncommand = \"sh {} {{nonstop}} app --listen {{addr}} --version {{version}} --instance {{instance}} --db sqlite://{}\"",
        script.display(),
        db.display()
    );
    let path = config(dir.path(), 2, &app);
    let serve = Serve::start(&path, dir.path());
    serve.wait_serving(2, "v1");
    let out = serve.nonstop(&["deploy", "--version", "v2", "--env", "BROKEN=1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let log = text(&out);
    assert!(log.contains("exited: exit status 4"), "{log}");
    assert!(log.contains("the last lines of its log"), "{log}");
    assert!(log.matches("fatal: v2 has no database password").count() >= 2, "in the failure and the rollback: {log}");
    let last = serve.status()["services"][0]["last_deploy"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(last.contains("fatal: v2 has no database password"), "the history's reason: {last}");
    serve.wait_serving(2, "v1");
}

/// Logs past log_bytes_max: a running instance's is copied away and truncated; a crash-looping one's is renamed
/// at each restart; at most log_files_max are kept.
#[test]
fn instance_logs_are_rotated_by_size_with_a_bound_on_their_count() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("first-hour-logs");
    let script = dir.path().join("chatty.sh");
    // 3000 bytes, then either exit (a crash loop) or stay.
    std::fs::write(
        &script,
        "i=0; while [ $i -lt 30 ]; do echo \"$NONSTOP_INSTANCE start $$ $i ................................................................................................\"; i=$((i+1)); done\n\
         if [ -n \"$STAY\" ]; then exec sleep 1000; fi\nexit 1\n",
    )
    .unwrap();
    let (lo, hi) = ports(3);
    let text = format!(
        "state_dir = \"{state}\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nservice = \"stay\"\npath_prefix = \"/stay\"\n[[routes]]\nservice = \"crash\"\n\
         [services.stay.app]\nports = \"{lo}-{}\"\ncount = 1\ncommand = \"sh {s}\"\nenv = {{ STAY = \"1\" }}\n\
         stop_grace_ms = 1000\nlog_bytes_max = 1024\nlog_files_max = 2\n\
         [services.crash.app]\nports = \"{}-{hi}\"\ncount = 1\ncommand = \"sh {s}\"\nlog_bytes_max = 1024\nlog_files_max = 2\n\
         restart_backoff_base_ms = 50\nrestart_backoff_max_ms = 100\n",
        lo + 4,
        lo + 5,
        state = dir.path().join("state").display(),
        s = script.display(),
    );
    let path = dir.path().join("nonstop.toml");
    std::fs::write(&path, text).unwrap();
    let serve = Serve::start(&path, dir.path());
    let logs = dir.path().join("state/logs");
    let size = |name: &str| std::fs::metadata(logs.join(name)).map(|m| m.len()).ok();
    // The running instance: its 3000 bytes copied to .1 and the log emptied, while it still runs.
    wait_for("copy-truncate of a running instance's log", Duration::from_secs(10), || {
        let (log, one) = (size("stay-1.log"), size("stay-1.log.1"));
        (!(log == Some(0) && one.is_some_and(|n| n >= 3000))).then(|| format!("stay-1.log {log:?}, .1 {one:?}"))
    });
    let kept = std::fs::read_to_string(logs.join("stay-1.log.1")).unwrap();
    assert!(kept.starts_with("stay-1 start") && kept.contains(" 29 "), "{kept}");
    // The crash loop: each restart renames the oversized log; .1 and .2 stay, no .3.
    wait_for("renames at restarts", Duration::from_secs(15), || {
        let st = serve.status();
        let crash = st["services"].as_array().unwrap().iter().find(|s| s["service"] == "crash").cloned().unwrap();
        let restarts = crash["instances"][0]["restarts"].as_u64().unwrap_or(0);
        (restarts < 5 || size("crash-1.log.2").is_none()).then(|| format!("restarts {restarts}"))
    });
    assert!(size("crash-1.log.1").is_some_and(|n| n >= 3000));
    assert!(size("crash-1.log.3").is_none(), "at most log_files_max rotated logs");
    let names: Vec<String> =
        std::fs::read_dir(&logs).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.len() <= 6, "{names:?}");
}

/// Ids after a restart of the proxy go on from where they were: a new instance never appends to an old one's log.
#[test]
fn instance_ids_do_not_restart_after_a_restart_of_the_proxy() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("first-hour-ids");
    let db = dir.path().join("orders.db");
    let app = format!(
        "count = 2\ncommand = \"{{nonstop}} app --listen {{addr}} --version {{version}} --instance {{instance}} --db sqlite://{}\"",
        db.display()
    );
    let path = config(dir.path(), 4, &app);
    let ids = |s: &Serve| {
        let mut v: Vec<u64> = s.instances().iter().map(|i| i["id"].as_u64().unwrap()).collect();
        v.sort();
        v
    };
    let mut serve = Serve::start(&path, dir.path());
    serve.wait_serving(2, "v1");
    assert_eq!(ids(&serve), [1, 2]);
    serve.stop();
    let serve = Serve::start(&path, dir.path());
    serve.wait_serving(2, "v1");
    assert_eq!(ids(&serve), [3, 4], "after a restart");
    for n in 1..=4 {
        let log = std::fs::read_to_string(dir.path().join(format!("state/logs/app-{n}.log"))).unwrap();
        assert_eq!(log.matches("listening on").count(), 1, "one instance per log: app-{n}.log:\n{log}");
    }
}

#[test]
fn demo_out_refuses_a_directory_it_did_not_create_and_empties_its_own() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("first-hour-demo-out");
    let theirs = dir.path().join("theirs");
    std::fs::create_dir_all(theirs.join("sub")).unwrap();
    std::fs::write(theirs.join("sub/precious.txt"), "keep me").unwrap();
    let out = Command::new(bin()).args(["demo", "--out", theirs.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("refusing to delete it"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(theirs.join("sub/precious.txt")).unwrap(), "keep me");

    // A previous demo's directory (its marker) is emptied; bad ports then stop this demo before anything runs.
    let ours = dir.path().join("ours");
    std::fs::create_dir_all(&ours).unwrap();
    std::fs::write(ours.join(".nonstop-demo"), "").unwrap();
    std::fs::write(ours.join("phase-1.html"), "old").unwrap();
    let out =
        Command::new(bin()).args(["demo", "--out", ours.to_str().unwrap(), "--ports", "no-ports"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(!ours.join("phase-1.html").exists(), "the previous demo's files are gone");
    assert!(ours.join(".nonstop-demo").is_file() && ours.join("nonstop.toml").is_file());
}

/// Every process below `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        if let Some(pp) = after.split_whitespace().nth(1).and_then(|s| s.parse::<u32>().ok()) {
            parent_of.push((p, pp));
        }
    }
    let mut out = vec![pid];
    let mut k = 0;
    while k < out.len() {
        let me = out[k];
        out.extend(parent_of.iter().filter(|(_, pp)| *pp == me).map(|(p, _)| *p));
        k += 1;
    }
    out.remove(0);
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s[s.rfind(')').map_or(0, |i| i + 1)..].trim_start().starts_with('Z'))
}

#[test]
fn sigint_to_the_demo_ends_its_children() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("first-hour-demo-sigint");
    let out = dir.path().join("demo");
    let (lo, hi) = ports(5);
    let mut demo = Command::new(bin())
        .args(["demo", "--out", out.to_str().unwrap(), "--ports", &format!("{lo}-{hi}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = demo.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("1. steady") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("the demo reaches its first phase");
    // The first phase's load is running: three instances and a `nonstop load`.
    let mut kids = Vec::new();
    wait_for("the instances and the load", Duration::from_secs(5), || {
        kids = descendants(demo.id());
        (kids.len() < 4).then(|| format!("{kids:?}"))
    });
    // SAFETY: kill(2) with the pid of our own child.
    unsafe {
        libc::kill(demo.id() as i32, libc::SIGINT);
    }
    let until = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = demo.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "the demo did not exit on SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    let left: Vec<u32> = kids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "children left running after SIGINT: {left:?} of {kids:?} ({status:?})");
    assert_eq!(status.code(), Some(130), "{status:?}");
}

#[test]
fn gitignore_covers_the_demo_and_state_directories() {
    let out = Command::new("git")
        .current_dir(repo())
        .args(["check-ignore", "-v", "nonstop-demo/report.html", "nonstop-state/deploys.jsonl"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2, "{}", text(&out));
}

/// `--json` means one thing in every command: stdout is JSON and nothing else (one document, or one document a
/// line for the commands that follow a deploy), so that `| jq` works; the words for people go to stderr or away.
#[test]
fn json_on_every_command_is_json_alone_on_stdout() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("first-hour-json");
    let db = dir.path().join("orders.db");
    let app = format!(
        "count = 1\ncommand = \"{{nonstop}} app --listen {{addr}} --version {{version}} --instance {{instance}} --db sqlite://{}\"",
        db.display()
    );
    let path = config(dir.path(), 6, &app);
    let serve = Serve::start(&path, dir.path());
    serve.wait_serving(1, "v1");
    let document = |args: &[&str]| -> Value {
        let out = serve.nonstop(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON document ({e}):\n{}", text(&out)))
    };
    let lines = |args: &[&str]| -> Vec<Value> {
        let out = serve.nonstop(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let docs: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{args:?}: a line that is not JSON ({e}): {l}")))
            .collect();
        assert!(!docs.is_empty(), "{args:?}: no JSON lines:\n{}", text(&out));
        docs
    };
    let status = document(&["status", "--json"]);
    assert_eq!(status["services"].as_array().map(Vec::len), Some(1), "{status}");
    let deployed = lines(&["deploy", "--version", "v2", "--json"]);
    assert!(deployed.iter().any(|d| d.to_string().contains("v2")), "{deployed:?}");
    serve.wait_serving(1, "v2");
    let history = document(&["history", "--json"]);
    assert!(history.to_string().contains("v2"), "{history}");
    let rolled = lines(&["rollback", "--json"]);
    assert!(!rolled.is_empty());
    serve.wait_serving(1, "v1");
    assert!(document(&["queue", "list", "--json"])["queues"].is_array());
    // `load --json -`: the document is stdout, the report goes to stderr.
    let out = Command::new(bin())
        .args(["load", &format!("http://{}/", serve.proxy), "--rate", "20", "--duration", "1s", "--json", "-"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let load: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("load --json -: {e}\n{}", text(&out)));
    assert!(load.is_object(), "{load}");
}
