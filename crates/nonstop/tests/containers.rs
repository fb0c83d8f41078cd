//! Integration tests on the machine's real Docker engine: images of the real binary built offline by
//! `scripts/image`, and containers reached over the network.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use nonstop_testkit::docker::{docker, Container, Image};
use nonstop_testkit::{get, post_json, wait_for_status};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

/// Waits until the app in `container` answers `GET /health` with 200 at `addr`, with its logs on failure.
async fn ready(container: &Container, addr: SocketAddr) {
    if !wait_for_status(addr, "/health", 200, Duration::from_secs(20)).await {
        panic!("the app in {} never became ready at {addr}: {}", container.name, container.logs());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_nonstop_app_reachable_over_the_network_and_is_removed() {
    let version = format!("ct{}", std::process::id());
    let image = Image::build(bin(), &version);
    // A rebuild of the same binary is the same image: the same layers, byte for byte (the build cache, or the
    // same bytes again).
    let layers = |tag: &str| docker(&["image", "inspect", "-f", "{{json .RootFS.Layers}}", tag]);
    let first = layers(&image.tag);
    let again = Image::build(bin(), &version);
    assert_eq!(layers(&again.tag), first);
    std::mem::forget(again); // the same tag: one removal, by `image`

    // `docker run --rm IMAGE app --help`, the issue's check, from inside the image.
    let help = docker(&["run", "--rm", &image.tag, "app", "--help"]);
    assert!(help.contains("--workers") && help.contains("--listen"), "app --help in the image: {help}");

    let name;
    {
        let c = Container::run(&image.tag, "app", &["-p", "127.0.0.1::9001"], &["app", "--workers", "4"]);
        name = c.name.clone();
        let published = c.published(9001);
        ready(&c, published).await;
        // The image's version is the tag's: scripts/image bakes it into the app's environment.
        let r = get(published, "/").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-nonstop-version"), Some(version.as_str()));
        let created =
            post_json(published, "/orders", &[("idempotency-key", "ct-1")], r#"{"item":"book","qty":2}"#).await;
        assert_eq!(created.status, 201, "{:?}", created.body);

        // The same container on its own address on the bridge network, as a proxy in another container sees it.
        let ip = c.bridge_ip();
        let direct: SocketAddr = format!("{ip}:9001").parse().unwrap_or_else(|e| panic!("bridge address {ip:?}: {e}"));
        ready(&c, direct).await;
        let count = get(direct, "/orders/count").await.json();
        assert_eq!(count["count"], 1, "the order written through the published port is in the container's store");
        assert!(c.running());
    }
    // Dropping the handle removed the container.
    let left = docker(&["ps", "-a", "-q", "--filter", &format!("name=^{name}$")]);
    assert_eq!(left, "", "container {name} was not removed");
}

// ---- The Docker driver: `nonstop serve` runs an app service's instances as containers. ----

/// The driver tests share the machine's two cores (and its Docker engine), so they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

const READS: &str = "[[flow]]\nname = \"read\"\n[[flow.step]]\nurl = \"/\"\n";
const ORDERS: &str =
    "[[flow]]\nname = \"order\"\n[[flow.step]]\nmethod = \"POST\"\nurl = \"/orders\"\njson = { item = \"book-{{seq}}\", qty = 1 }\n";

/// Removes every container labelled `nonstop.test=VALUE` when dropped: what the proxy under test started, if the
/// test failed before the proxy could remove them.
struct Leftovers(String);

impl Leftovers {
    fn ids(&self) -> Vec<String> {
        docker(&["ps", "-a", "-q", "--filter", &format!("label=nonstop.test={}", self.0)])
            .split_whitespace()
            .map(String::from)
            .collect()
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let ids = self.ids();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids.iter().map(String::as_str));
            let _ = std::process::Command::new("docker").args(&args).output();
        }
    }
}

/// An image derived from another by a Dockerfile's extra lines; its tag is removed on drop.
struct Derived(String);

impl Derived {
    fn build(from: &str, tag: &str, lines: &str) -> Derived {
        use std::io::Write;
        let mut child = std::process::Command::new("docker")
            .args(["build", "--quiet", "--tag", tag, "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("docker build");
        let dockerfile = format!("FROM {from}\n{lines}\n");
        child.stdin.take().unwrap().write_all(dockerfile.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "docker build {tag}: {}", String::from_utf8_lossy(&out.stderr));
        Derived(tag.to_string())
    }
}

impl Drop for Derived {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker").args(["rmi", &self.0]).output();
    }
}

/// A proxy whose app service runs three containers of `nonstop-app:{version}` sharing one SQLite file on a
/// bind-mounted directory. Fields drop in order: the proxy, then any container left, then the directory.
struct Rig {
    proxy: nonstop_testkit::Proc,
    admin: String,
    _leftovers: Leftovers,
    dir: nonstop_testkit::TempDir,
    config: std::path::PathBuf,
}

impl Rig {
    fn new(tag: &str, slot: u16, first: &str) -> Rig {
        let dir = nonstop_testkit::TempDir::new(tag);
        let label = format!("{}-{tag}", std::process::id());
        let leftovers = Leftovers(label.clone());
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let base = 32_000 + (std::process::id() % 200) as u16 * 40 + slot * 10;
        let config = format!(
            "state_dir = \"{state}\"\n\n[[listeners]]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout_ms = 1000\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\n[access_log]\npath = \"{log}\"\nflush_ms = 10\n\n[[routes]]\nservice = \"{tag}\"\n\n\
             [services.{tag}]\nresponse_timeout_ms = 2000\n\n[services.{tag}.retry]\nadd_idempotency_key = true\n\n\
             [services.{tag}.app]\ndriver = \"docker\"\nimage = \"nonstop-app:{{version}}\"\nversion = \"{first}\"\n\
             args = [\"app\", \"--instance\", \"{{instance}}\", \"--workers\", \"8\", \"--work-ms\", \"2\"]\n\
             volumes = [\"{data}:/data\"]\nlabels = {{ \"nonstop.test\" = \"{label}\" }}\n\
             ports = \"{lo}-{hi}\"\nready_interval_ms = 100\nsoak_ms = 3000\nready_timeout_ms = 10000\n\
             stop_grace_ms = 5000\nrestart_backoff_base_ms = 200\np99_slack_ms = 2000\n",
            state = dir.path().join("state").display(),
            log = dir.path().join("access.log").display(),
            data = data.display(),
            lo = base,
            hi = base + 9,
        );
        let path = dir.path().join("nonstop.toml");
        std::fs::write(&path, config).unwrap();
        std::fs::write(dir.path().join("reads.toml"), READS).unwrap();
        std::fs::write(dir.path().join("orders.toml"), ORDERS).unwrap();
        let check = std::process::Command::new(bin()).args(["check", "--config"]).arg(&path).output().unwrap();
        assert!(check.status.success(), "nonstop check: {}", text(&check));
        let (proxy, admin) = serve(&path);
        let rig = Rig { proxy, admin, _leftovers: leftovers, dir, config: path };
        rig.wait_serving(3, first);
        rig
    }

    fn nonstop(&self, args: &[&str]) -> std::process::Output {
        let out = std::process::Command::new(bin()).args(args).args(["--admin", &self.admin]).output().unwrap();
        eprintln!("$ nonstop {}\n{}", args.join(" "), text(&out));
        out
    }

    fn status(&self) -> serde_json::Value {
        let out = self.nonstop(&["status", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["services"][0].clone()
    }

    /// Waits until `count` containers of `version` serve and are healthy, and nothing else runs.
    fn wait_serving(&self, count: usize, version: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.status();
            let inst = s["instances"].as_array().unwrap();
            let ok = inst.len() == count
                && inst.iter().all(|i| {
                    i["version"] == version
                        && i["state"] == "serving"
                        && i["healthy"] == true
                        && i["driver"] == "docker"
                });
            if ok && s["deploy"].is_null() {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "not {count} healthy containers of {version}: {s:#}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `nonstop load` at `rate` requests/s for `seconds` of one scenario, on a thread; `join` gives its JSON.
    fn load(&self, scenario: &str, rate: u32, seconds: u32) -> std::thread::JoinHandle<serde_json::Value> {
        let (rate, duration) = (rate.to_string(), format!("{seconds}s"));
        let args = ["--rate", &rate, "--duration", &duration, "--connections", "2000", "--timeout", "30s"];
        let scenario = self.dir.path().join(format!("{scenario}.toml"));
        let args = [&args[..], &["--track-header", "X-Nonstop-Version"]].concat();
        nonstop_testkit::run_load(bin(), self.proxy.addr, &scenario, &args, self.dir.path())
    }

    /// The versions that answered 100 GETs.
    fn versions_now(&self) -> serde_json::Value {
        self.load("reads", 100, 1).join().unwrap()["headers"].clone()
    }

    /// (rows, distinct items) of the orders table in the database the containers share.
    fn orders(&self) -> (u64, u64) {
        let db = rusqlite::Connection::open(self.dir.path().join("data/app.db")).unwrap();
        let (rows, items): (i64, i64) = db
            .query_row("SELECT COUNT(*), COUNT(DISTINCT item) FROM orders", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        (rows as u64, items as u64)
    }

    fn assert_no_failures(&self, doc: &serde_json::Value) {
        let r = &doc["requests"];
        let brief = format!("requests {} errors {} status {}", r, doc["errors"], doc["status"]);
        assert!(n(&r["scheduled"]) > 0, "{brief}");
        let failures = logged_failures(&self.dir.path().join("access.log"));
        assert_eq!(n(&r["failed"]), 0, "{brief}; the proxy's log of failures: {failures:#?}");
        assert_eq!(n(&r["not_sent"]), 0, "{brief}");
        assert!(doc["valid"].as_bool().unwrap(), "{brief}");
    }

    /// Every order that got a 2xx is in the database exactly once (each has its own item name).
    fn assert_orders_stored_once(&self, orders: &serde_json::Value) {
        let sent = n(&orders["requests"]["ok"]);
        assert!(sent > 0, "orders were created: {}", orders["requests"]);
        assert_eq!(self.orders(), (sent, sent), "(rows, distinct items) against {sent} orders answered 2xx");
    }

    /// SIGTERM: the proxy stops and removes every container it started, and exits 0.
    fn shut_down(&mut self) {
        self.proxy.signal(libc::SIGTERM);
        assert!(self.proxy.wait_exit(Duration::from_secs(60)).is_some_and(|s| s.success()), "serve exits 0");
        assert_eq!(self._leftovers.ids(), Vec::<String>::new(), "containers left after the proxy shut down");
    }
}

/// The first failures (5xx) in the proxy's JSON access log, and how many there were of each (status, server, error).
fn logged_failures(log: &Path) -> (Vec<serde_json::Value>, std::collections::BTreeMap<String, usize>) {
    let all: Vec<serde_json::Value> = std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["status"].as_u64().unwrap_or(0) >= 500)
        .collect();
    let mut kinds = std::collections::BTreeMap::new();
    for l in &all {
        *kinds.entry(format!("{} {} {}", l["status"], l["server"], l["error"])).or_insert(0) += 1;
    }
    (all.into_iter().take(5).collect(), kinds)
}

fn serve(config: &Path) -> (nonstop_testkit::Proc, String) {
    let proxy = nonstop_testkit::Proc::start(bin(), &["serve", "--config", config.to_str().unwrap()]);
    let admin = proxy.addr_after("admin").expect("serve names its admin address").to_string();
    (proxy, admin)
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Versions unique to this test run, so that images of other runs on the same engine are never touched.
fn versions(tag: &str) -> (String, String) {
    let p = std::process::id();
    (format!("{tag}1.{p}"), format!("{tag}2.{p}"))
}

#[test]
fn docker_rolling_deploy_of_3_containers_under_load_fails_nothing_and_stores_every_order_once() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (v1, v2) = versions("roll");
    let (_i1, _i2) = (Image::build(bin(), &v1), Image::build(bin(), &v2));
    let mut rig = Rig::new("droll", 0, &v1);
    // Each container is named and labelled by service, version and instance, and published on 127.0.0.1 only.
    let s = rig.status();
    for i in s["instances"].as_array().unwrap() {
        let name = i["container"].as_str().unwrap_or_else(|| panic!("a container name: {i}"));
        let labels = docker(&[
            "inspect",
            "-f",
            "{{index .Config.Labels \"nonstop.service\"}} {{index .Config.Labels \"nonstop.version\"}} {{index .Config.Labels \"nonstop.instance\"}}",
            name,
        ]);
        assert_eq!(labels, format!("droll {v1} {}", i["id"]));
        let ports = docker(&["port", name, "9001/tcp"]);
        assert_eq!(ports, i["addr"].as_str().unwrap(), "published on the instance's address only");
    }
    let reads = rig.load("reads", 150, 16);
    let orders = rig.load("orders", 150, 16);
    std::thread::sleep(Duration::from_secs(2));
    let started = std::time::Instant::now();
    let out = rig.nonstop(&["deploy", "--version", &v2]);
    eprintln!("the rolling deploy of 3 containers took {:.1} s", started.elapsed().as_secs_f64());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(text(&out).matches("takes traffic (slow start)").count(), 3, "one at a time: {}", text(&out));
    let (reads, orders) = (reads.join().unwrap(), orders.join().unwrap());
    rig.assert_no_failures(&reads);
    rig.assert_no_failures(&orders);
    assert!(reads["headers"][&v2].as_u64().unwrap_or(0) > 0, "v2 served during the load: {}", reads["headers"]);
    rig.wait_serving(3, &v2);
    assert_eq!(rig.versions_now(), serde_json::json!({ v2.clone(): 100 }));
    rig.assert_orders_stored_once(&orders);
    // The replaced version's containers are stopped but kept (keep_versions = 2).
    let kept =
        docker(&["ps", "-a", "-q", "--filter", &format!("label=nonstop.version={v1}"), "--filter", "status=exited"]);
    assert_eq!(kept.lines().count(), 3, "the 3 stopped containers of {v1} are kept");
    rig.shut_down();
}

#[test]
fn docker_kill_of_a_serving_container_under_load_fails_nothing_and_it_is_restarted() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (v1, _) = versions("kill");
    let _i1 = Image::build(bin(), &v1);
    let mut rig = Rig::new("dkill", 1, &v1);
    let victim = rig.status()["instances"][0].clone();
    let name = victim["container"].as_str().unwrap().to_string();
    let reads = rig.load("reads", 150, 10);
    let orders = rig.load("orders", 150, 10);
    std::thread::sleep(Duration::from_secs(2));
    docker(&["kill", &name]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = rig.status();
        let i = s["instances"].as_array().unwrap().iter().find(|i| i["id"] == victim["id"]).unwrap().clone();
        if i["restarts"] == 1 && i["healthy"] == true && i["running"] == true {
            assert!(i["last_exit"].as_str().unwrap_or("").contains("killed by signal 9"), "{i:#}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "container restarted and healthy again: {i:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A new container under the same name runs.
    assert_eq!(docker(&["inspect", "-f", "{{.State.Running}}", &name]), "true");
    let (reads, orders) = (reads.join().unwrap(), orders.join().unwrap());
    rig.assert_no_failures(&reads);
    rig.assert_no_failures(&orders);
    rig.assert_orders_stored_once(&orders);
    rig.wait_serving(3, &v1);

    // A proxy killed with SIGKILL cannot stop its containers; the next one with the same state directory removes
    // them before it starts its own.
    let before = rig._leftovers.ids();
    assert_eq!(before.len(), 3, "three containers run: {before:?}");
    rig.proxy.signal(libc::SIGKILL);
    assert!(rig.proxy.wait_exit(Duration::from_secs(10)).is_some(), "the proxy died");
    assert_eq!(rig._leftovers.ids().len(), 3, "its containers outlive it");
    let (proxy, admin) = serve(&rig.config);
    (rig.proxy, rig.admin) = (proxy, admin);
    rig.wait_serving(3, &v1);
    let after = rig._leftovers.ids();
    assert_eq!(after.len(), 3, "three containers, not six: {after:?}");
    assert!(after.iter().all(|id| !before.contains(id)), "the old ones were removed: {before:?} -> {after:?}");
    rig.shut_down();
}

#[test]
fn an_image_whose_app_exits_at_start_rolls_back_with_no_failed_request_and_v1_serves() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (v1, bad) = versions("brk");
    let i1 = Image::build(bin(), &v1);
    // The same binary, configured to exit at once: an unusable database URL (a config error, exit status 2).
    let _bad = Derived::build(
        &i1.tag,
        &format!("nonstop-app:{bad}"),
        &format!("ENV NONSTOP_APP_VERSION={bad} NONSTOP_APP_DB=bogus://x"),
    );
    let mut rig = Rig::new("dbrk", 2, &v1);
    let reads = rig.load("reads", 150, 8);
    let orders = rig.load("orders", 150, 8);
    std::thread::sleep(Duration::from_secs(1));
    let out = rig.nonstop(&["deploy", "--version", &bad]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("exited: exit status 2"), "{}", text(&out));
    assert!(text(&out).contains(&format!("rolled back to {v1}")), "{}", text(&out));
    let (reads, orders) = (reads.join().unwrap(), orders.join().unwrap());
    rig.assert_no_failures(&reads);
    rig.assert_no_failures(&orders);
    assert_eq!(reads["headers"], serde_json::json!({ v1.clone(): n(&reads["requests"]["ok"]) }));
    rig.wait_serving(3, &v1);
    assert_eq!(rig.versions_now(), serde_json::json!({ v1.clone(): 100 }));
    let last = rig.status()["last_deploy"].clone();
    assert_eq!((last["version"].as_str(), last["result"].as_str()), (Some(bad.as_str()), Some("rolled_back")));
    // The failed version's container is removed, not kept.
    assert_eq!(docker(&["ps", "-a", "-q", "--filter", &format!("label=nonstop.version={bad}")]), "");
    rig.assert_orders_stored_once(&orders);

    // A reload cannot switch the service to the process driver under its running containers.
    let config = std::fs::read_to_string(&rig.config).unwrap();
    let start = config.find("driver = \"docker\"").unwrap();
    let end = start + config[start..].find("ports = ").unwrap();
    let process = format!("{}command = \"true\"\n{}", &config[..start], &config[end..]);
    std::fs::write(&rig.config, process).unwrap();
    let admin: std::net::SocketAddr = rig.admin.parse().unwrap();
    let r = tokio::runtime::Runtime::new().unwrap().block_on(nonstop_testkit::send(
        admin,
        nonstop_testkit::Method::POST,
        "/config/reload",
        &[],
        "",
    ));
    let r = r.unwrap();
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(r.json()["error"].as_str().unwrap_or("").contains("change their driver"), "{:?}", r.body);
    rig.wait_serving(3, &v1);
    rig.shut_down();
}

// ---- The Docker driver on SSH hosts: each host a network namespace with its own sshd and its own Docker engine. ----

/// A host with its own Docker engine: sshd's sessions talk to it (DOCKER_HOST), and it publishes ports on the host's
/// address. Fields drop in order: sshd (and the namespace), then the engine.
struct DockerHost {
    ssh: nonstop_testkit::sshd::SshHost,
    engine: nonstop_testkit::dockerd::Engine,
}

impl DockerHost {
    fn start(authorized: &str) -> DockerHost {
        let mut engine = None;
        let ssh = nonstop_testkit::sshd::SshHost::start_with(authorized, |ns| {
            let e = nonstop_testkit::dockerd::Engine::start_in(ns);
            let line = format!("SetEnv DOCKER_HOST={}\n", e.docker_host());
            engine = Some(e);
            line
        });
        DockerHost { ssh, engine: engine.expect("the engine started") }
    }
}

fn cli(args: &[&str], admin: Option<&str>) -> std::process::Output {
    let mut c = std::process::Command::new(bin());
    c.args(args).env("RUST_LOG", "warn");
    if let Some(a) = admin {
        c.args(["--admin", a]);
    }
    let out = c.output().unwrap();
    eprintln!("$ nonstop {}\n{}", args.join(" "), text(&out));
    out
}

#[test]
fn docker_on_3_ssh_hosts_ships_the_image_with_no_registry_and_a_rolling_deploy_under_load_fails_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (v1, v2) = versions("rdk");
    let (i1, i2) = (Image::build(bin(), &v1), Image::build(bin(), &v2));
    let dir = nonstop_testkit::TempDir::new("rdocker");
    let d = dir.path().display().to_string();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let base = 36_000 + (std::process::id() % 200) as u16 * 10;
    let head = format!(
        "state_dir = \"{d}/state\"\n\n[[listeners]]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout_ms = 1000\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n[access_log]\npath = \"{d}/access.log\"\nflush_ms = 10\n\n[[routes]]\nservice = \"rdk\"\n\n\
         [services.rdk]\nresponse_timeout_ms = 2000\n\n[services.rdk.retry]\nadd_idempotency_key = true\n\n"
    );
    let keys_config = dir.path().join("keys.toml");
    std::fs::write(
        &keys_config,
        format!("{head}[services.rdk.app]\ncommand = \"true\"\nports = \"{base}-{}\"\n", base + 9),
    )
    .unwrap();
    let out = cli(&["keys", "init", "--config", keys_config.to_str().unwrap()], None);
    assert!(out.status.success());
    let public = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let hosts: Vec<DockerHost> = (0..3).map(|_| DockerHost::start(&public)).collect();
    let mut config = format!(
        "{head}[services.rdk.app]\ndriver = \"docker\"\nhosts = [\"d1\", \"d2\", \"d3\"]\ncount = 1\n\
         image = \"nonstop-app:{{version}}\"\nversion = \"{v1}\"\n\
         args = [\"app\", \"--instance\", \"{{instance}}\", \"--workers\", \"8\", \"--work-ms\", \"2\"]\n\
         volumes = [\"{data}:/data\"]\nports = \"{base}-{}\"\nready_interval_ms = 100\nsoak_ms = 3000\n\
         ready_timeout_ms = 20000\nstop_grace_ms = 5000\nrestart_backoff_base_ms = 200\np99_slack_ms = 2000\n",
        base + 9,
        data = data.display(),
    );
    for (k, h) in hosts.iter().enumerate() {
        config.push_str(&format!(
            "\n[hosts.d{}]\naddress = \"{}:{}\"\nuser = \"root\"\ndir = \"{d}/hosts/d{}\"\nconnect_timeout_ms = 3000\n",
            k + 1,
            h.ssh.ip,
            nonstop_testkit::sshd::SSHD_PORT,
            k + 1
        ));
    }
    let path = dir.path().join("nonstop.toml");
    std::fs::write(&path, &config).unwrap();
    std::fs::write(dir.path().join("reads.toml"), READS).unwrap();
    std::fs::write(dir.path().join("orders.toml"), ORDERS).unwrap();
    let p = path.to_str().unwrap();
    assert!(cli(&["check", "--config", p], None).status.success());
    assert!(cli(&["hosts", "trust", "--all", "--config", p], None).status.success());
    // No host has the images: they are only on this machine's engine.
    for h in &hosts {
        let have = h.engine.docker(&["images", "-q", "nonstop-app"]);
        assert_eq!(have, "", "a fresh engine has no image");
    }

    let (mut proxy, admin) = serve(&path);
    let status = || {
        let out = cli(&["status", "--json"], Some(&admin));
        assert!(out.status.success());
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["services"][0].clone()
    };
    let wait_serving = |version: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let s = status();
            let inst = s["instances"].as_array().unwrap();
            let mut on: Vec<&str> = inst.iter().filter_map(|i| i["host"].as_str()).collect();
            on.sort();
            let ok = inst.len() == 3
                && on == ["d1", "d2", "d3"]
                && inst.iter().all(|i| {
                    i["version"] == version
                        && i["state"] == "serving"
                        && i["healthy"] == true
                        && i["driver"] == "docker"
                });
            if ok && s["deploy"].is_null() {
                return s;
            }
            assert!(std::time::Instant::now() < deadline, "not 3 healthy containers of {version} on d1..d3: {s:#}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let s = wait_serving(&v1);
    // Each host's engine got the image by docker load, with this machine's ID, and runs its container, published on
    // the host's address.
    let local_id = docker(&["image", "inspect", "-f", "{{.Id}}", &i1.tag]);
    for (k, h) in hosts.iter().enumerate() {
        assert_eq!(h.engine.docker(&["image", "inspect", "-f", "{{.Id}}", &i1.tag]), local_id, "host d{}", k + 1);
        let i = s["instances"].as_array().unwrap().iter().find(|i| i["host"] == format!("d{}", k + 1)).unwrap().clone();
        let name = i["container"].as_str().unwrap();
        assert_eq!(h.engine.docker(&["inspect", "-f", "{{.State.Running}}", name]), "true");
        let published = h.engine.docker(&["port", name, "9001/tcp"]);
        assert_eq!(published, i["addr"].as_str().unwrap(), "published on the host's address");
        assert!(published.starts_with(&h.ssh.ip), "{published} is on {}", h.ssh.ip);
    }

    let load = |scenario: &str, seconds: u32| {
        let args = ["--rate", "150", "--duration", &format!("{seconds}s"), "--connections", "2000", "--timeout", "30s"];
        let args = [&args[..], &["--track-header", "X-Nonstop-Version"]].concat();
        let scenario = dir.path().join(format!("{scenario}.toml"));
        nonstop_testkit::run_load(bin(), proxy.addr, &scenario, &args, dir.path())
    };
    let reads = load("reads", 20);
    let orders = load("orders", 20);
    std::thread::sleep(Duration::from_secs(2));
    let started = std::time::Instant::now();
    let out = cli(&["deploy", "--version", &v2], Some(&admin));
    eprintln!("the rolling deploy of 3 containers on 3 hosts took {:.1} s", started.elapsed().as_secs_f64());
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    for host in ["d1", "d2", "d3"] {
        assert!(
            printed.contains(&format!("image of {v2} shipped to {host} in ")),
            "the image shipped to {host}: {printed}"
        );
    }
    assert_eq!(printed.matches("takes traffic (slow start)").count(), 3, "one at a time: {printed}");
    let (reads, orders) = (reads.join().unwrap(), orders.join().unwrap());
    let log = dir.path().join("access.log");
    let failures = |doc: &serde_json::Value| {
        let r = &doc["requests"];
        assert!(n(&r["scheduled"]) > 0, "{r}");
        assert_eq!(
            (n(&r["failed"]), n(&r["not_sent"])),
            (0, 0),
            "requests {r} errors {} status {}; the proxy's log of failures: {:#?}",
            doc["errors"],
            doc["status"],
            logged_failures(&log)
        );
    };
    failures(&reads);
    failures(&orders);
    assert!(reads["headers"][&v2].as_u64().unwrap_or(0) > 0, "v2 served during the load: {}", reads["headers"]);
    wait_serving(&v2);
    let local_id2 = docker(&["image", "inspect", "-f", "{{.Id}}", &i2.tag]);
    for h in &hosts {
        assert_eq!(h.engine.docker(&["image", "inspect", "-f", "{{.Id}}", &i2.tag]), local_id2);
        // The replaced version's container is stopped but kept there (keep_versions = 2).
        let kept = h.engine.docker(&[
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=nonstop.version={v1}"),
            "--filter",
            "status=exited",
        ]);
        assert_eq!(kept.lines().count(), 1, "{v1}'s container kept, stopped");
    }
    // Every order that got a 2xx is in the shared database exactly once.
    let sent = n(&orders["requests"]["ok"]);
    let db = rusqlite::Connection::open(data.join("app.db")).unwrap();
    let (rows, items): (i64, i64) =
        db.query_row("SELECT COUNT(*), COUNT(DISTINCT item) FROM orders", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!((rows as u64, items as u64), (sent, sent), "(rows, distinct items) against {sent} orders answered 2xx");
    // The logs of a container come from its host's engine.
    let logs = cli(&["logs", "rdk"], Some(&admin));
    assert!(logs.status.success());
    let logs = text(&logs);
    assert!(logs.contains("==> instance ") && logs.contains(" on host d2 ("), "{logs}");
    assert_eq!(logs.matches(&format!("(version {v2}")).count(), 3, "each container's own output: {logs}");
    assert!(!logs.contains("(no log"), "{logs}");

    // SIGTERM: serve stops and removes every container it started on every host, and exits 0.
    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait_exit(Duration::from_secs(60)).is_some_and(|s| s.success()), "serve exits 0");
    for h in &hosts {
        assert_eq!(
            h.engine.docker(&["ps", "-a", "-q", "--filter", "label=nonstop.service=rdk"]),
            "",
            "containers left"
        );
    }
}
