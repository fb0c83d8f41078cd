//! Deploy tests: `nonstop serve` runs three supervised `nonstop app` instances (one shared SQLite file) from an app
//! section, `nonstop load` drives GETs and POSTs (with the Idempotency-Key the proxy adds) through it, and
//! `nonstop deploy` / `rollback` / `status` talk to the admin API, while versions roll out, fail and roll back.
//! The load generator accounts for every request, so "0 failed" is exact.
//!
//! The tests share the machine's two cores, so they run one at a time.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nonstop_testkit::{Proc, TempDir};
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

const READS: &str = "[[flow]]\nname = \"read\"\n[[flow.step]]\nurl = \"/\"\n";
const ORDERS: &str =
    "[[flow]]\nname = \"order\"\n[[flow.step]]\nmethod = \"POST\"\nurl = \"/orders\"\njson = { item = \"book-{{seq}}\", qty = 1 }\n";

struct Rig {
    dir: TempDir,
    config: std::path::PathBuf,
    proxy: Proc,
    admin: String,
}

/// A port range of its own for each test (below the ephemeral range), so instances never meet another test's.
fn ports(slot: u16) -> (u16, u16) {
    let base = 21_000 + (std::process::id() % 250) as u16 * 40 + slot * 10;
    (base, base + 9)
}

impl Rig {
    fn new(tag: &str, slot: u16, app_extra: &str) -> Rig {
        let dir = TempDir::new(tag);
        let (lo, hi) = ports(slot);
        let command = format!(
            "{bin} app --listen {{addr}} --version {{version}} --instance {{instance}} --db sqlite://{db} \
             --work-ms 2 --workers 8 --fail-rate ${{FAIL_RATE:-0}} --ready-after-ms ${{READY_AFTER_MS:-0}}",
            bin = bin().display(),
            db = dir.path().join("orders.db").display(),
        );
        let config = format!(
            "state_dir = \"{state}\"\n\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n\
             # Idle client connections are closed often, while instances start: none may leak into them.\n\
             header_read_timeout_ms = 1000\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [access_log]\npath = \"{log}\"\nflush_ms = 10\n\n[[routes]]\nservice = \"app\"\n\n\
             [services.app]\nresponse_timeout_ms = 2000\n\n[services.app.retry]\nadd_idempotency_key = true\n\n\
             [services.app.app]\ncommand = \"{command}\"\nports = \"{lo}-{hi}\"\nready_interval_ms = 100\n\
             soak_ms = 3000\nstep_ms = 2000\nready_timeout_ms = 4000\n\
             # Two cores run the load, the proxy and six instances: latency is noise here, failures are not.\n\
             p99_slack_ms = 2000\n{app_extra}",
            state = dir.path().join("state").display(),
            log = dir.path().join("access.log").display(),
            command = command.replace('\\', "\\\\").replace('"', "\\\""),
        );
        let path = dir.path().join("nonstop.toml");
        std::fs::write(&path, config).unwrap();
        std::fs::write(dir.path().join("reads.toml"), READS).unwrap();
        std::fs::write(dir.path().join("orders.toml"), ORDERS).unwrap();
        let (proxy, admin) = start_proxy(&path);
        let rig = Rig { dir, config: path, proxy, admin };
        rig.wait_serving(3, "v1");
        rig
    }

    fn restart(&mut self) {
        self.proxy.signal(libc::SIGTERM);
        assert!(self.proxy.wait_exit(Duration::from_secs(30)).is_some_and(|s| s.success()), "serve exits 0");
        let (proxy, admin) = start_proxy(&self.config);
        self.proxy = proxy;
        self.admin = admin;
    }

    fn nonstop(&self, args: &[&str]) -> Output {
        let out = Command::new(bin()).args(args).args(["--admin", &self.admin]).output().expect("run nonstop");
        eprintln!(
            "$ nonstop {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn status(&self) -> Value {
        let out = self.nonstop(&["status", "--json"]);
        assert!(out.status.success());
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["services"][0].clone()
    }

    /// Waits until `count` instances of `version` serve and are healthy, and nothing else runs.
    fn wait_serving(&self, count: usize, version: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status();
            let inst = s["instances"].as_array().unwrap();
            let ok = inst.len() == count
                && inst.iter().all(|i| i["version"] == version && i["state"] == "serving" && i["healthy"] == true);
            if ok && s["deploy"].is_null() {
                return;
            }
            assert!(Instant::now() < deadline, "not {count} healthy instances of {version}: {s:#}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `nonstop load` at `rate` requests/s of one scenario, on a thread; `join` gives its JSON result.
    fn load(&self, scenario: &str, rate: u32, seconds: u32) -> std::thread::JoinHandle<Value> {
        let (rate, duration) = (rate.to_string(), format!("{seconds}s"));
        let args = ["--rate", &rate, "--duration", &duration, "--connections", "2000", "--timeout", "30s"];
        let scenario = self.dir.path().join(format!("{scenario}.toml"));
        let args = [&args[..], &["--track-header", "X-Nonstop-Version"]].concat();
        nonstop_testkit::run_load(bin(), self.proxy.addr, &scenario, &args, self.dir.path())
    }

    /// (rows, distinct items) of the orders table.
    fn orders(&self) -> (u64, u64) {
        let db = rusqlite::Connection::open(self.dir.path().join("orders.db")).unwrap();
        let (rows, items): (i64, i64) = db
            .query_row("SELECT COUNT(*), COUNT(DISTINCT item) FROM orders", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        (rows as u64, items as u64)
    }

    /// The versions that answered 100 GETs.
    fn versions_now(&self) -> Value {
        self.load("reads", 100, 1).join().unwrap()["headers"].clone()
    }

    fn failed_in_log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["status"].as_u64().unwrap_or(0) >= 500 || l["duration_ms"].as_f64().unwrap_or(0.0) > 5000.0)
            .take(5)
            .collect()
    }

    fn assert_no_failures(&self, doc: &Value) {
        let r = &doc["requests"];
        let brief = format!("requests {} errors {} status {}", r, doc["errors"], doc["status"]);
        assert!(n(&r["scheduled"]) > 0, "{brief}");
        if n(&r["failed"]) > 0 {
            let log: Vec<Value> = std::fs::read_to_string(self.dir.path().join("access.log"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .collect();
            let posts = log.iter().filter(|l| l["method"] == "POST").count();
            let gets = log.iter().filter(|l| l["method"] == "GET").count();
            let retried: Vec<&Value> = log.iter().filter(|l| n(&l["attempts"]) > 1).take(5).collect();
            eprintln!("DIAG the proxy logged {posts} POSTs and {gets} GETs; retried sample {retried:#?}");
        }
        assert_eq!(n(&r["failed"]), 0, "{brief}; the proxy's log of failures: {:#?}", self.failed_in_log());
        assert_eq!(n(&r["not_sent"]), 0, "{brief}");
        assert_eq!(n(&doc["errors"]["reset"]), 0, "{brief}");
        assert!(doc["valid"].as_bool().unwrap(), "{brief}");
    }
}

fn start_proxy(config: &Path) -> (Proc, String) {
    let proxy = Proc::start(bin(), &["serve", "--config", config.to_str().unwrap()]);
    let admin = proxy.addr_after("admin").expect("serve names its admin address").to_string();
    (proxy, admin)
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn rolling_deploy_under_500_rps_fails_nothing_and_every_order_is_stored_once() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rig = Rig::new("deploy-rolling", 0, "");
    let reads = rig.load("reads", 250, 14);
    let orders = rig.load("orders", 250, 14);
    std::thread::sleep(Duration::from_secs(2));
    let out = rig.nonstop(&["deploy", "--version", "v2"]);
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    assert_eq!(log.matches("takes traffic (slow start)").count(), 3, "one at a time: {log}");
    let (reads, orders) = (reads.join().unwrap(), orders.join().unwrap());
    rig.assert_no_failures(&reads);
    rig.assert_no_failures(&orders);
    // Both versions answered during the deploy; only v2 answers now.
    assert!(reads["headers"]["v1"].as_u64().unwrap_or(0) > 0 && reads["headers"]["v2"].as_u64().unwrap_or(0) > 0);
    assert_eq!(rig.versions_now(), serde_json::json!({ "v2": 100 }));
    rig.wait_serving(3, "v2");
    // Every order that got a 2xx (all of them) is in the database exactly once.
    let sent = n(&orders["requests"]["ok"]);
    assert_eq!(rig.orders(), (sent, sent));
}

#[test]
fn a_version_that_never_becomes_ready_or_exits_at_start_rolls_back_with_no_failed_request() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rig = Rig::new("deploy-unready", 1, "");
    let reads = rig.load("reads", 150, 14);
    let orders = rig.load("orders", 150, 14);
    std::thread::sleep(Duration::from_secs(1));
    let out = rig.nonstop(&["deploy", "--version", "v2", "--env", "READY_AFTER_MS=100000000"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not ready after 4000 ms: GET /health gave status 503"), "{}", text(&out));
    // A version that exits at start fails at once, not after the readiness timeout.
    let started = Instant::now();
    let out = rig.nonstop(&["deploy", "--version", "v3", "--env", "FAIL_RATE=7"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("exited: exit status 2"), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(3), "failed fast: {:?}", started.elapsed());
    let (reads, orders) = (reads.join().unwrap(), orders.join().unwrap());
    rig.assert_no_failures(&reads);
    rig.assert_no_failures(&orders);
    assert_eq!(reads["headers"], serde_json::json!({ "v1": n(&reads["requests"]["ok"]) }));
    rig.wait_serving(3, "v1");
    let history = rig.status()["last_deploy"].clone();
    assert_eq!((history["version"].as_str(), history["result"].as_str()), (Some("v3"), Some("rolled_back")));
    let sent = n(&orders["requests"]["ok"]);
    assert_eq!(rig.orders(), (sent, sent));
}

#[test]
fn a_version_failing_30_percent_after_cutover_rolls_back_and_clients_see_no_failure() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rig = Rig::new("deploy-500s", 2, "");
    let reads = rig.load("reads", 250, 12);
    let orders = rig.load("orders", 250, 12);
    std::thread::sleep(Duration::from_secs(2));
    let out = rig.nonstop(&["deploy", "--version", "v2", "--env", "FAIL_RATE=0.3"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("the new version is worse: error rate"), "{}", text(&out));
    let (reads, orders) = (reads.join().unwrap(), orders.join().unwrap());
    let failed = n(&reads["requests"]["failed"]) + n(&orders["requests"]["failed"]);
    eprintln!("client-visible failures during the bad deploy: {failed}");
    rig.assert_no_failures(&reads);
    rig.assert_no_failures(&orders);
    assert!(reads["headers"]["v2"].as_u64().unwrap_or(0) > 0, "v2 did take traffic before the rollback");
    assert_eq!(rig.versions_now(), serde_json::json!({ "v1": 100 }));
    let sent = n(&orders["requests"]["ok"]);
    assert_eq!(rig.orders(), (sent, sent));
}

#[test]
fn blue_green_and_canary_deploys_fail_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rig = Rig::new("deploy-bg-canary", 3, "");
    let reads = rig.load("reads", 150, 22);
    let orders = rig.load("orders", 150, 22);
    std::thread::sleep(Duration::from_secs(1));
    let out = rig.nonstop(&["deploy", "--version", "v2", "--strategy", "blue-green"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("traffic switched to v2 at once"), "{}", text(&out));
    let out = rig.nonstop(&["deploy", "--version", "v3", "--strategy", "canary", "--steps", "25,100"]);
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    assert!(log.contains("v3 takes 25% of requests") && log.contains("step 25% passed"), "{log}");
    let (reads, orders) = (reads.join().unwrap(), orders.join().unwrap());
    rig.assert_no_failures(&reads);
    rig.assert_no_failures(&orders);
    for v in ["v1", "v2", "v3"] {
        assert!(reads["headers"][v].as_u64().unwrap_or(0) > 0, "{v} served: {}", reads["headers"]);
    }
    // During the 25% step both versions served, in about that proportion.
    let timeline = reads["timeline"].as_array().unwrap();
    let mixed = timeline.iter().any(|t| {
        let (v2, v3) = (t["headers"]["v2"].as_u64().unwrap_or(0), t["headers"]["v3"].as_u64().unwrap_or(0));
        v3 > 0 && v2 > v3
    });
    assert!(mixed, "a second where v3 had the smaller share: {timeline:#?}");
    assert_eq!(rig.versions_now(), serde_json::json!({ "v3": 100 }));
    let sent = n(&orders["requests"]["ok"]);
    assert_eq!(rig.orders(), (sent, sent));
}

#[test]
fn one_deploy_at_a_time_crashes_restart_history_persists_and_rollback_returns() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = Rig::new("deploy-lock", 4, "");
    // A crashed instance is restarted by the supervisor and comes back into service.
    let victim = rig.status()["instances"][0].clone();
    unsafe {
        libc::kill(victim["pid"].as_i64().unwrap() as i32, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = rig.status();
        let i = s["instances"].as_array().unwrap().iter().find(|i| i["id"] == victim["id"]).unwrap().clone();
        if i["restarts"] == 1 && i["healthy"] == true && i["pid"] != victim["pid"] {
            break;
        }
        assert!(Instant::now() < deadline, "instance restarted and healthy again: {i:#}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let first = {
        let mut cmd = Command::new(bin());
        cmd.args(["deploy", "--version", "v2", "--admin", &rig.admin]);
        std::thread::spawn(move || cmd.output().unwrap())
    };
    std::thread::sleep(Duration::from_millis(500));
    let second = rig.nonstop(&["deploy", "--version", "v9"]);
    assert_eq!(second.status.code(), Some(1));
    assert!(
        text(&second).contains("refused (409): a deploy of service \"app\" to v2 is already running"),
        "{}",
        text(&second)
    );
    let first = first.join().unwrap();
    assert!(first.status.success(), "{}", text(&first));
    let bad = rig.nonstop(&["deploy", "--version", "v 3"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("a version is 1 to 64 letters"), "{}", text(&bad));

    // The version and the history outlive the proxy.
    rig.restart();
    rig.wait_serving(3, "v2");
    let s = rig.status();
    assert_eq!(s["last_deploy"]["version"], "v2");
    assert_eq!(s["last_deploy"]["result"], "succeeded");

    let back = rig.nonstop(&["rollback"]);
    assert!(back.status.success(), "{}", text(&back));
    rig.wait_serving(3, "v1");
    assert_eq!(rig.versions_now(), serde_json::json!({ "v1": 100 }));
    let s = rig.status();
    assert_eq!(
        (s["last_deploy"]["kind"].as_str(), s["last_deploy"]["version"].as_str()),
        (Some("rollback"), Some("v1"))
    );
}

#[test]
fn repeated_rollbacks_walk_back_through_history_and_rollback_to_names_the_versions() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rig = Rig::new("deploy-walk", 5, "");
    for v in ["v2", "v3"] {
        let out = rig.nonstop(&["deploy", "--version", v]);
        assert!(out.status.success(), "{}", text(&out));
        rig.wait_serving(3, v);
    }
    // v1 -> v2 -> v3: rollback to v2, then to v1 (not back to v3).
    for v in ["v2", "v1"] {
        let out = rig.nonstop(&["rollback"]);
        assert!(out.status.success(), "{}", text(&out));
        rig.wait_serving(3, v);
    }
    let out = rig.nonstop(&["rollback"]);
    assert_eq!(out.status.code(), Some(1), "v1 is where it started: {}", text(&out));
    assert!(text(&out).contains("no previous version"), "{}", text(&out));
    let out = rig.nonstop(&["rollback", "--to", "v9"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("(404)") && text(&out).contains("earlier versions: v2, v3"), "{}", text(&out));
    let out = rig.nonstop(&["rollback", "--to", "v3"]);
    assert!(out.status.success(), "{}", text(&out));
    rig.wait_serving(3, "v3");

    let out = rig.nonstop(&["history", "app"]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 5, "{table}");
    for (row, (kind, move_)) in rows.iter().zip([
        ("deploy", "v1 -> v2"),
        ("deploy", "v2 -> v3"),
        ("rollback", "v3 -> v2"),
        ("rollback", "v2 -> v1"),
        ("rollback", "v1 -> v3"),
    ]) {
        assert!(row.contains(kind) && row.contains(move_) && row.contains("succeeded"), "{row}\n{table}");
        // UTC, YYYY-MM-DD HH:MM:SS.
        let date = row.split_whitespace().nth(2).unwrap();
        assert!(date.len() == 10 && date.as_bytes()[4] == b'-' && date.starts_with("20"), "{row}");
    }
    let json = rig.nonstop(&["history", "--json"]);
    let v: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["deploys"].as_array().unwrap().len(), 5);
}

/// The proxy runs a deploy, not the command that asked for it: Ctrl-C (SIGINT) to `nonstop deploy` leaves the deploy
/// going, and `nonstop deploy --follow` re-attaches, with the progress so far, the rest, and the exit status.
#[test]
fn a_deploy_outlives_the_command_that_started_it_and_deploy_follow_reattaches() {
    use std::io::BufRead;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rig = Rig::new("deploy-follow", 6, "");
    let idle = rig.nonstop(&["deploy", "--follow"]);
    assert_eq!(idle.status.code(), Some(1), "{}", text(&idle));
    assert!(text(&idle).contains("no deploy or rollback of \"app\" is running"), "{}", text(&idle));
    let both = rig.nonstop(&["deploy", "--follow", "--version", "v2"]);
    assert_eq!(both.status.code(), Some(2), "--follow starts nothing: {}", text(&both));

    let mut first = Command::new(bin())
        .args(["deploy", "--version", "v2", "--admin", &rig.admin])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(first.stdout.take().unwrap()).lines();
    let start = lines.next().expect("a first progress line").unwrap();
    assert!(start.contains("start") && start.contains("deploy of app from v1 to v2"), "{start}");
    unsafe {
        libc::kill(first.id() as i32, libc::SIGINT);
    }
    let gone = first.wait_with_output().unwrap();
    assert!(!gone.status.success(), "Ctrl-C ends the command");
    let said = String::from_utf8_lossy(&gone.stderr);
    assert!(said.contains("Ctrl-C only stops following it") && said.contains("nonstop deploy --follow"), "{said}");
    assert!(!rig.status()["deploy"].is_null(), "the deploy goes on without its command");

    let again = rig.nonstop(&["deploy", "--follow"]);
    assert!(again.status.success(), "{}", text(&again));
    let shown = String::from_utf8_lossy(&again.stdout);
    assert!(shown.lines().next().is_some_and(|l| l.contains("deploy of app from v1 to v2")), "from the start: {shown}");
    assert_eq!(shown.matches("deploy of app from v1 to v2").count(), 1, "no line twice: {shown}");
    assert!(shown.trim_end().ends_with("app now serves v2"), "to the end: {shown}");
    rig.wait_serving(3, "v2");
    let done = rig.nonstop(&["deploy", "--follow", "--json"]);
    assert_eq!(done.status.code(), Some(1), "nothing left to follow: {}", text(&done));
}
