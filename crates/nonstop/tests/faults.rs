//! Fault tests of the proxy's resilience: three real `nonstop app` processes (`--work-ms 5`, one shared SQLite file)
//! behind `nonstop serve`, under a steady 300 requests/s of `nonstop load` (half GET /, half POST /orders with the
//! Idempotency-Key added by the proxy), while servers are killed, stopped, restarted and overloaded. The load
//! generator accounts for every request, so "0 failed" is exact.
//!
//! The scenarios share the machine's two cores, so they run one at a time.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nonstop_testkit::{Proc, TempDir};
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

/// The per-try timeout the rig's proxy uses.
const PER_TRY_MS: u64 = 1000;
/// The longest queue wait (the default).
const QUEUE_WAIT_MS: f64 = 10_000.0;
/// Requests one app runs at once; the proxy sends it no more.
const APP_WORKERS: &str = "2";
/// The same for the backup server.
const BACKUP_WORKERS: &str = "6";

const SCENARIO: &str = r#"
[[flow]]
name = "read"
[[flow.step]]
url = "/"

[[flow]]
name = "order"
[[flow.step]]
method = "POST"
url = "/orders"
json = { item = "book-{{seq}}", qty = 1 }
"#;

struct Rig {
    dir: TempDir,
    apps: Vec<Proc>,
    addrs: Vec<SocketAddr>,
    backup: Option<Proc>,
    proxy: Proc,
}

fn start_app(dir: &TempDir, listen: &str, instance: &str) -> Proc {
    start_app_sized(dir, listen, instance, APP_WORKERS)
}

fn start_app_sized(dir: &TempDir, listen: &str, instance: &str, workers: &str) -> Proc {
    let db = format!("sqlite://{}", dir.path().join("orders.db").display());
    Proc::start(
        bin(),
        &["app", "--listen", listen, "--db", &db, "--work-ms", "5", "--workers", workers, "--instance", instance],
    )
}

impl Rig {
    fn new(tag: &str, with_backup: bool) -> Rig {
        let dir = TempDir::new(tag);
        let apps: Vec<Proc> = (0..3).map(|i| start_app(&dir, "127.0.0.1:0", &format!("app{i}"))).collect();
        let addrs: Vec<SocketAddr> = apps.iter().map(|a| a.addr).collect();
        // The backup is bigger than one primary: alone, it must carry the whole steady load.
        let backup = with_backup.then(|| start_app_sized(&dir, "127.0.0.1:0", "backup", BACKUP_WORKERS));
        let mut servers: Vec<String> = addrs.iter().map(|a| format!("{{ addr = \"{a}\" }}")).collect();
        if let Some(b) = &backup {
            servers.push(format!("{{ addr = \"{}\", backup = true, in_flight_max = {BACKUP_WORKERS} }}", b.addr));
        }
        // Everything else is the default: resilience is on without extra keys.
        let config = format!(
            "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [access_log]\npath = \"{log}\"\nflush_ms = 10\n\n[[routes]]\nservice = \"app\"\n\n\
             [services.app]\nresponse_timeout_ms = {PER_TRY_MS}\nservers = [{servers}]\n\n\
             [services.app.health]\npath = \"/health\"\n\n\
             [services.app.retry]\nadd_idempotency_key = true\n\n\
             [services.app.admission]\nserver_in_flight_max = {APP_WORKERS}\n",
            log = dir.path().join("access.log").display(),
            servers = servers.join(", "),
        );
        let path = dir.path().join("nonstop.toml");
        std::fs::write(&path, config).unwrap();
        std::fs::write(dir.path().join("mix.toml"), SCENARIO).unwrap();
        let proxy = Proc::start(bin(), &["serve", "--config", path.to_str().unwrap()]);
        Rig { dir, apps, addrs, backup, proxy }
    }

    /// Starts `nonstop load` against the proxy on a thread; `join` gives its JSON result.
    fn load(&self, args: &[&str]) -> std::thread::JoinHandle<Value> {
        let args = [&["--timeout", "30s"][..], args].concat();
        nonstop_testkit::run_load(bin(), self.proxy.addr, &self.dir.path().join("mix.toml"), &args, self.dir.path())
    }

    fn steady(&self, seconds: u64) -> std::thread::JoinHandle<Value> {
        // Enough connections that no request waits in the generator instead of in the proxy.
        self.load(&["--rate", "300", "--duration", &format!("{seconds}s"), "--connections", "4000"])
    }

    /// Starts the three apps again on their old addresses.
    fn restart_all(&mut self) {
        self.apps = (0..3).map(|i| start_app(&self.dir, &self.addrs[i].to_string(), &format!("app{i}"))).collect();
    }

    /// Every scheduled request was answered with a success; on failure, the proxy's own account of the failed
    /// requests is shown too.
    fn assert_no_failures(&self, doc: &Value) {
        if n(&doc["requests"]["failed"]) > 0 {
            let failed: Vec<Value> = self.access_log().into_iter().filter(|l| n(&l["status"]) >= 500).take(5).collect();
            panic!("{} failed; the proxy's log of them: {failed:#?}", brief(doc));
        }
        assert_no_failures(doc);
    }

    fn access_log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect()
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn brief(doc: &Value) -> String {
    format!(
        "requests {} status {} errors {} latency {}",
        doc["requests"], doc["status"], doc["errors"], doc["latency_ms"]
    )
}

/// Every scheduled request was answered with a success.
fn assert_no_failures(doc: &Value) {
    let r = &doc["requests"];
    assert!(n(&r["scheduled"]) > 0, "{}", brief(doc));
    assert_eq!(n(&r["failed"]), 0, "{}", brief(doc));
    assert_eq!(n(&r["not_sent"]), 0, "{}", brief(doc));
    assert_eq!(n(&r["ok"]), n(&r["scheduled"]), "{}", brief(doc));
    assert!(doc["valid"].as_bool().unwrap(), "{}", brief(doc));
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn sleep_until(start: Instant, at: Duration) {
    std::thread::sleep(at.saturating_sub(start.elapsed()));
}

#[test]
fn kill_9_of_one_server_fails_no_request() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = Rig::new("fault-kill", false);
    let start = Instant::now();
    let load = rig.steady(8);
    sleep_until(start, Duration::from_secs(3));
    rig.apps.remove(1); // SIGKILL on drop
    let doc = load.join().unwrap();
    rig.assert_no_failures(&doc);
    assert_eq!(n(&doc["requests"]["scheduled"]), 2400);
}

#[test]
fn a_server_stopped_for_10_s_fails_no_request_and_p99_stays_under_the_per_try_timeout() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rig = Rig::new("fault-stop", false);
    let start = Instant::now();
    let load = rig.steady(16);
    sleep_until(start, Duration::from_secs(2));
    rig.apps[0].signal(libc::SIGSTOP);
    sleep_until(start, Duration::from_secs(12));
    rig.apps[0].signal(libc::SIGCONT);
    let doc = load.join().unwrap();
    rig.assert_no_failures(&doc);
    let latency = &doc["latency_ms"];
    assert!(latency["p99"].as_f64().unwrap() < PER_TRY_MS as f64, "{}", brief(&doc));
    // No request waited out two tries.
    assert!(latency["max"].as_f64().unwrap() < 2.0 * PER_TRY_MS as f64, "{}", brief(&doc));
    let retried = rig.access_log().iter().filter(|l| n(&l["attempts"]) > 1).count();
    assert!(retried > 0, "requests caught on the stopped server were retried elsewhere");
}

#[test]
fn all_servers_down_for_5_s_are_waited_for_in_the_queue() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = Rig::new("fault-all-down", false);
    let start = Instant::now();
    let load = rig.steady(14);
    sleep_until(start, Duration::from_secs(2));
    eprintln!("killed at {} ms", unix_ms());
    rig.apps.clear();
    sleep_until(start, Duration::from_secs(7));
    eprintln!("restarted at {} ms", unix_ms());
    rig.restart_all();
    let doc = load.join().unwrap();
    rig.assert_no_failures(&doc);
    let log = rig.access_log();
    let waited = log.iter().map(|l| l["queue_wait_ms"].as_f64().unwrap()).fold(0.0, f64::max);
    assert!(waited > 1000.0, "requests were held in the queue during the outage (longest wait {waited} ms)");
    assert!(waited <= QUEUE_WAIT_MS, "no request waits longer than the maximum wait: {waited} ms");
    assert!(doc["latency_ms"]["max"].as_f64().unwrap() < QUEUE_WAIT_MS + PER_TRY_MS as f64, "{}", brief(&doc));
}

#[test]
fn all_primaries_dead_go_to_the_backup_then_fail_back() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = Rig::new("fault-backup", true);
    let start = Instant::now();
    let load = rig.load(&[
        "--rate",
        "300",
        "--duration",
        "16s",
        "--connections",
        "4000",
        "--track-header",
        "X-Nonstop-Instance",
    ]);
    sleep_until(start, Duration::from_secs(2));
    let killed_ms = unix_ms();
    rig.apps.clear();
    sleep_until(start, Duration::from_secs(7));
    rig.restart_all();
    let doc = load.join().unwrap();
    rig.assert_no_failures(&doc);
    let backup = n(&doc["headers"]["backup"]);
    assert!(backup > 300, "the backup served while the primaries were dead: {}", doc["headers"]);
    let timeline = doc["timeline"].as_array().unwrap();
    // The load's clock starts a little after the test's, so its seconds do not say when the primaries died: the
    // proxy's log does (a line is written when its request ends).
    let backup_addr = rig.backup.as_ref().expect("the rig has a backup").addr.to_string();
    let early: Vec<Value> = rig
        .access_log()
        .into_iter()
        .filter(|l| l["server"] == backup_addr && n(&l["ts_ms"]) < killed_ms)
        .take(3)
        .collect();
    assert!(early.is_empty(), "the backup served before the primaries died: {early:#?}");
    let tail = &timeline[timeline.len().saturating_sub(5)..];
    for t in tail {
        assert!(t["headers"].get("backup").is_none(), "failed back to the primaries: {t}");
    }
    assert!(rig.backup.is_some());
}

#[test]
fn four_times_capacity_gets_2xx_or_fast_503_and_recovers_at_once() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rig = Rig::new("fault-overload", false);
    // Capacity, measured through the proxy with more clients than the servers take.
    let cap_doc = rig.load(&["--connections", "32", "--duration", "4s"]).join().unwrap();
    assert_no_failures(&cap_doc);
    let capacity = cap_doc["rate"]["achieved"].as_f64().unwrap();
    let rss_before = rss_kib(rig.proxy.pid());

    let rate = format!("{}", (4.0 * capacity).round());
    let doc = rig
        .load(&["--rate", &rate, "--duration", "10s", "--connections", "4000", "--track-header", "Retry-After"])
        .join()
        .unwrap();
    let rss_after = rss_kib(rig.proxy.pid());
    let statuses = doc["status"].as_object().unwrap();
    let ok: u64 = statuses.iter().filter(|(k, _)| k.starts_with('2')).map(|(_, v)| n(v)).sum();
    let shed = statuses.get("503").map_or(0, n);
    assert_eq!(ok + shed, n(&doc["requests"]["scheduled"]), "only 2xx and 503: {}", brief(&doc));
    assert!(shed > 0, "{}", brief(&doc));
    assert_eq!(doc["headers"]["1"], shed, "every 503 carries Retry-After: {}", brief(&doc));
    let ok_rate = ok as f64 / 10.0;
    assert!(ok_rate >= 0.9 * capacity, "2xx throughput {ok_rate}/s against a capacity of {capacity}/s");
    // The 503s were shed at arrival, not after waiting.
    let log = rig.access_log();
    let slow_503: Vec<&Value> =
        log.iter().filter(|l| l["status"] == 503 && !(l["shed"] == true && n(&l["attempts"]) == 0)).collect();
    assert!(slow_503.is_empty(), "503s that were not shed at once: {:?}", &slow_503[..slow_503.len().min(3)]);
    assert!(rss_after < rss_before + 150 * 1024, "proxy RSS grew from {rss_before} KiB to {rss_after} KiB");

    // Right afterwards, the normal rate is served in full.
    let after = rig.steady(3).join().unwrap();
    assert_no_failures(&after);
    assert!(after["latency_ms"]["p99"].as_f64().unwrap() < PER_TRY_MS as f64, "{}", brief(&after));
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}
